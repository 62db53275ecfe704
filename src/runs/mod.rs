//! Nightly operations: the warehouse lock, run directories and their atomic
//! publication, run manifests, data-quality gates and the run history.
//!
//! ```text
//! <warehouse>/ward.lock                 who holds the warehouse (pid, host, start, run id)
//! <warehouse>/runs/<run_id>/            one run's outputs: core/, marts/, reports/, research/
//! <warehouse>/runs/<run_id>/manifest.json   what the run read, did, wrote (written last)
//! <warehouse>/runs/<run_id>/history.json    headline figures of every published run up to this one
//! <warehouse>/runs/CURRENT              id of the last published run
//! <warehouse>/runs/file_hashes.json     its files' SHA-256 by identity (a cache, see keep_hashes)
//! ```
//!
//! A run writes everything into its own directory; publication is one
//! `rename` of `runs/CURRENT`, so readers (`ward query`, `ward status`) see
//! either the previous run or the new one, whole. A run killed before its
//! manifest is written leaves a directory without one, which the next run
//! removes; one killed between its manifest and the rename leaves a
//! complete run that never became current (pruned like any other). The
//! lock is an advisory `flock` on `ward.lock`: the kernel releases it when
//! its holder dies (`kill -9` included), so a lock left by a dead process is
//! taken over, and the takeover is logged.

mod gates;
mod history;
mod lock;
mod manifest;
mod publish;
mod reuse;

pub use gates::*;
pub use history::*;
pub use lock::*;
pub use manifest::*;
pub use publish::*;
pub use reuse::*;

#[cfg(test)]
mod tests {
    use super::history::HISTORY_LIMIT;
    use super::publish::run_dirs;
    use super::*;
    use crate::error::WardError;
    use std::fs;
    use std::path::{Path, PathBuf};

    /// A history entry of run `id` with no figures.
    fn entry(id: &str) -> HistoryEntry {
        HistoryEntry {
            dq: Vec::new(),
            run_id: id.into(),
            finished: String::new(),
            period: PeriodInfo::default(),
            persons: 0,
            overall: Vec::new(),
        }
    }

    #[test]
    fn a_second_lock_names_the_holder_and_a_released_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let first = Lock::acquire(dir.path(), "ward run").unwrap();
        assert!(first.stale.is_none());
        let (holder, held) = Lock::inspect(dir.path()).unwrap().unwrap();
        assert!(held);
        assert_eq!(holder.pid, std::process::id());
        match Lock::acquire(dir.path(), "ward run") {
            Err(WardError::Locked { holder, .. }) => {
                assert!(
                    holder.contains(&format!("pid {}", std::process::id())),
                    "{holder}"
                )
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        assert_eq!(Lock::inspect(dir.path()).unwrap(), None);
        assert!(
            Lock::acquire(dir.path(), "ward run")
                .unwrap()
                .stale
                .is_none()
        );
    }

    #[test]
    fn a_lock_left_by_a_dead_holder_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let dead = LockHolder {
            pid: 999_999,
            host: "elsewhere".into(),
            started: "2026-01-01T00:00:00Z".into(),
            command: "ward run".into(),
        };
        fs::write(
            dir.path().join("ward.lock"),
            serde_json::to_vec(&dead).unwrap(),
        )
        .unwrap();
        assert_eq!(
            Lock::inspect(dir.path()).unwrap(),
            Some((dead.clone(), false))
        );
        let lock = Lock::acquire(dir.path(), "ward run").unwrap();
        assert_eq!(lock.stale, Some(dead));
    }

    #[test]
    fn publication_pruning_and_interrupted_runs() {
        let dir = tempfile::tempdir().unwrap();
        let wh = dir.path();
        assert_eq!(current(wh).unwrap(), None);
        // r1, r2, r4 published; r3 failed before r4; r5 failed after it.
        for id in ["r1", "r2", "r3", "r4", "r5"] {
            fs::create_dir_all(runs_dir(wh).join(id)).unwrap();
            fs::write(runs_dir(wh).join(id).join(MANIFEST), "{}").unwrap();
        }
        let history = vec![entry("r1"), entry("r2")];
        write_history(&runs_dir(wh).join("r4"), history, entry("r4")).unwrap();
        fs::create_dir_all(runs_dir(wh).join("r6/core")).unwrap(); // killed
        fs::create_dir_all(runs_dir(wh).join(".trash-r0/core")).unwrap(); // removal cut short
        publish(wh, "r4").unwrap();
        fs::write(runs_dir(wh).join(".CURRENT.1"), "r6").unwrap(); // killed while publishing
        let hashes_aside = runs_dir(wh).join(format!("{HASHES}.tmp"));
        fs::write(&hashes_aside, "[").unwrap(); // killed while keeping the hashes
        assert_eq!(current(wh).unwrap().as_deref(), Some("r4"));
        assert_eq!(remove_interrupted(wh, "r7").unwrap(), vec!["r6"]);
        assert!(!runs_dir(wh).join(".CURRENT.1").exists());
        assert!(!hashes_aside.exists());
        assert!(!runs_dir(wh).join(".trash-r0").exists());
        assert_eq!(current(wh).unwrap().as_deref(), Some("r4"));
        // Keep 2 published (r4 current, r2); r1 is one too many; r3 failed
        // (kept for diagnosis); r5 is newer than the current run: kept too.
        assert_eq!(prune(wh, 2).unwrap(), vec!["r1"]);
        let left = |wh: &Path| -> Vec<String> {
            run_dirs(wh)
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        };
        assert_eq!(left(wh), ["r2", "r3", "r4", "r5"]);
        // keep = 1 still keeps the run before the current one (a reader may
        // hold it) and one failed run; a complete run that never published
        // is removed.
        fs::write(
            runs_dir(wh).join("r2").join(MANIFEST),
            r#"{"status":"complete"}"#,
        )
        .unwrap();
        fs::create_dir_all(runs_dir(wh).join("r0")).unwrap();
        fs::write(
            runs_dir(wh).join("r0").join(MANIFEST),
            r#"{"status":"complete"}"#,
        )
        .unwrap();
        fs::create_dir_all(runs_dir(wh).join("r2a")).unwrap();
        fs::write(runs_dir(wh).join("r2a").join(MANIFEST), "{}").unwrap();
        assert_eq!(prune(wh, 1).unwrap(), vec!["r0", "r2a"]);
        assert_eq!(left(wh), ["r2", "r3", "r4", "r5"]);
        let names: Vec<String> = fs::read_dir(runs_dir(wh))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && n != ".readers")
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn a_run_a_reader_holds_is_kept_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let wh = dir.path();
        for id in ["r1", "r2", "r3"] {
            fs::create_dir_all(runs_dir(wh).join(id)).unwrap();
            fs::write(runs_dir(wh).join(id).join(MANIFEST), "{}").unwrap();
        }
        publish(wh, "r1").unwrap();
        let reader = ReaderLease::current(wh).unwrap().unwrap();
        assert_eq!(reader.run_id, "r1");
        assert_eq!(reader.dir, runs_dir(wh).join("r1"));
        // Two nights later r1 is past `keep`, but its reader is mid-query.
        write_history(
            &runs_dir(wh).join("r3"),
            vec![entry("r1"), entry("r2")],
            entry("r3"),
        )
        .unwrap();
        publish(wh, "r3").unwrap();
        assert_eq!(prune(wh, 1).unwrap(), Vec::<String>::new());
        assert!(runs_dir(wh).join("r1").join(MANIFEST).is_file());
        // A second reader of r1 shares the lease.
        let second = ReaderLease::take(wh, "r1").unwrap().unwrap();
        drop((reader, second));
        assert_eq!(prune(wh, 1).unwrap(), vec!["r1"]);
        // A ticket for the pruned run finds it gone; the current run is r3.
        assert!(ReaderLease::take(wh, "r1").unwrap().is_none());
        assert_eq!(ReaderLease::current(wh).unwrap().unwrap().run_id, "r3");
    }

    fn table(source: &str, read: u64, rejected: u64, new: u64) -> SourceTable {
        SourceTable {
            source: source.into(),
            table: "patient".into(),
            files: 1,
            files_new: new,
            rows_read: read,
            rows_accepted: read - rejected,
            rows_rejected: rejected,
            rows_skipped: 0,
        }
    }

    fn source(name: &str, nightly: bool) -> crate::ingest::SourceConfig {
        crate::ingest::SourceConfig {
            name: name.into(),
            format: crate::ingest::SourceFormat::Csv,
            pattern: String::new(),
            mapping: None,
            nightly,
        }
    }

    #[test]
    fn gates_grade_reject_rates_row_drops_and_deliveries() {
        let gates = Gates::default();
        let sources = [source("a", false), source("b", true), source("c", true)];
        let tables = [
            table("a", 1000, 60, 1), // 6 % rejected: fail
            table("b", 1000, 20, 1), // 2 %: warn
            table("c", 700, 0, 0),   // clean, but nothing delivered, and 30 % fewer rows
        ];
        let mut prev = Manifest::start(
            "r0",
            ConfigInfo {
                path: PathBuf::new(),
                sha256: String::new(),
            },
            PeriodInfo {
                start: String::new(),
                end: String::new(),
            },
        );
        prev.sources = vec![table("b", 1100, 0, 1), table("c", 1000, 0, 1)];
        let results = check_gates(&gates, &sources, &tables, Some(&prev));
        let outcome = |gate: &str, source: &str| {
            results
                .iter()
                .find(|r| r.gate == gate && r.source == source)
                .map(|r| r.outcome)
        };
        assert_eq!(outcome("reject_rate", "a"), Some(GateOutcome::Fail));
        assert_eq!(outcome("reject_rate", "b"), Some(GateOutcome::Warn));
        assert_eq!(outcome("reject_rate", "c"), Some(GateOutcome::Pass));
        assert_eq!(outcome("row_drop", "a"), None, "no previous figures for a");
        assert_eq!(outcome("row_drop", "b"), Some(GateOutcome::Warn)); // 980 vs 1100: 11 %
        assert_eq!(outcome("row_drop", "c"), Some(GateOutcome::Fail));
        assert_eq!(outcome("delivery", "a"), None, "a is not expected nightly");
        assert_eq!(outcome("delivery", "b"), Some(GateOutcome::Pass));
        assert_eq!(outcome("delivery", "c"), Some(GateOutcome::Fail));
        let fail = results
            .iter()
            .find(|r| r.gate == "reject_rate" && r.source == "a")
            .unwrap();
        assert!(fail.message.contains("'a'") && fail.message.contains("60 of 1000"));
    }

    #[test]
    fn history_is_carried_forward_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |id: &str| HistoryEntry {
            dq: Vec::new(),
            run_id: id.into(),
            finished: String::new(),
            period: PeriodInfo {
                start: "2025-01-01".into(),
                end: "2025-12-31".into(),
            },
            persons: 1,
            overall: Vec::new(),
        };
        assert!(load_history(None).unwrap().is_empty());
        let h = write_history(dir.path(), Vec::new(), entry("r1")).unwrap();
        let h = write_history(dir.path(), h, entry("r2")).unwrap();
        assert_eq!(load_history(Some(dir.path())).unwrap(), h);
        assert_eq!(h.len(), 2);
        let long: Vec<HistoryEntry> = (0..HISTORY_LIMIT).map(|i| entry(&i.to_string())).collect();
        let h = write_history(dir.path(), long, entry("last")).unwrap();
        assert_eq!(h.len(), HISTORY_LIMIT);
        assert_eq!(h.last().unwrap().run_id, "last");
        assert_eq!(h[0].run_id, "1");
    }

    #[test]
    fn hashes_kept_for_the_next_night_hold_while_the_files_are_unchanged() {
        let wh = tempfile::tempdir().unwrap();
        let run = runs_dir(wh.path()).join("r1");
        fs::create_dir_all(&run).unwrap();
        let (old, new) = (run.join("old.csv"), run.join("new.csv"));
        fs::write(&old, "abc").unwrap();
        fs::write(&new, "xyz").unwrap();
        // `old` was written a while ago; `new` as good as now (its time not
        // yet past): its time could still be the one a change gives it.
        let now = std::time::SystemTime::now();
        let ten = std::time::Duration::from_secs(10);
        for (path, time) in [(&old, now - ten), (&new, now + ten)] {
            fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(time)
                .unwrap();
        }
        let outputs = list_outputs(&run).unwrap();
        keep_hashes(wh.path(), &run, &outputs).unwrap();
        let kept: Vec<crate::warehouse::KnownHash> =
            serde_json::from_slice(&fs::read(runs_dir(wh.path()).join(HASHES)).unwrap()).unwrap();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!((kept[0].path.as_str(), kept[0].bytes), ("old.csv", 3));
        assert_eq!(kept[0].sha256, outputs[1].sha256);
        // The next night is told the kept hash, not the file's: it does not
        // read the file while the file is as it was.
        let mut told = kept.clone();
        told[0].sha256 = "0".repeat(64);
        fs::write(
            runs_dir(wh.path()).join(HASHES),
            serde_json::to_vec(&told).unwrap(),
        )
        .unwrap();
        remember_kept_hashes(wh.path()).unwrap();
        let hash = |p: &Path| crate::warehouse::sha256_file(p).unwrap().0;
        assert_eq!(hash(&old), "0".repeat(64));
        // Changed (its time is another), it is read again.
        fs::write(&old, "abd").unwrap();
        assert_ne!(hash(&old), "0".repeat(64));
        // A warehouse without kept hashes, or with an unreadable list.
        let other = tempfile::tempdir().unwrap();
        remember_kept_hashes(other.path()).unwrap();
        fs::create_dir_all(runs_dir(other.path())).unwrap();
        fs::write(runs_dir(other.path()).join(HASHES), "[{").unwrap();
        let e = remember_kept_hashes(other.path()).unwrap_err().to_string();
        assert!(e.contains(HASHES), "{e}");
    }

    #[test]
    fn outputs_are_listed_with_hashes_but_not_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("reports/x")).unwrap();
        fs::write(dir.path().join("reports/x/a.csv"), "abc").unwrap();
        fs::write(dir.path().join(MANIFEST), "{}").unwrap();
        let out = list_outputs(dir.path()).unwrap();
        assert_eq!(
            out,
            vec![OutputFile {
                path: "reports/x/a.csv".into(),
                bytes: 3,
                sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
            }]
        );
    }
}
