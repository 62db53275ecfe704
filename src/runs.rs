//! Nightly operations: the warehouse lock, run directories and their atomic
//! publication, run manifests, data-quality gates and the run history.
//!
//! ```text
//! <warehouse>/ward.lock                 who holds the warehouse (pid, host, start, run id)
//! <warehouse>/runs/<run_id>/            one run's outputs: core/, marts/, reports/, research/
//! <warehouse>/runs/<run_id>/manifest.json   what the run read, did, wrote (written last)
//! <warehouse>/runs/<run_id>/history.json    headline figures of every published run up to this one
//! <warehouse>/runs/CURRENT              id of the last published run
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

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, WardError};
use crate::warehouse::IngestState;

/// File naming the current (last published) run, under `runs/`.
pub const CURRENT: &str = "CURRENT";
/// The manifest file of a run directory.
pub const MANIFEST: &str = "manifest.json";
/// The run history file of a run directory.
pub const HISTORY: &str = "history.json";

/// `<warehouse>/runs`.
pub fn runs_dir(warehouse: &Path) -> PathBuf {
    warehouse.join("runs")
}

/// The id of the last published run, if any.
pub fn current(warehouse: &Path) -> Result<Option<String>> {
    let path = runs_dir(warehouse).join(CURRENT);
    match fs::read_to_string(&path) {
        Ok(id) => Ok(Some(id.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WardError::io("cannot read", path, e)),
    }
}

/// The directory of the last published run, if any.
pub fn current_dir(warehouse: &Path) -> Result<Option<PathBuf>> {
    Ok(current(warehouse)?.map(|id| runs_dir(warehouse).join(id)))
}

/// Who holds (or last held) a warehouse lock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
    /// UTC, RFC 3339.
    pub started: String,
    pub command: String,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {} ({}), since {}",
            self.pid, self.host, self.command, self.started
        )
    }
}

/// The exclusive lock of a warehouse, held until dropped.
#[derive(Debug)]
pub struct Lock {
    file: fs::File,
    path: PathBuf,
    /// The holder of a lock its process left behind (it died), taken over.
    pub stale: Option<LockHolder>,
}

impl Lock {
    /// Takes the lock of `warehouse` for `command`, or fails at once with
    /// [`WardError::Locked`] naming the holder.
    pub fn acquire(warehouse: &Path, command: &str) -> Result<Lock> {
        fs::create_dir_all(warehouse).map_err(|e| WardError::io("cannot create", warehouse, e))?;
        let path = warehouse.join("ward.lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| WardError::io("cannot open", &path, e))?;
        // A holder that is just releasing, or `ward status` looking, holds
        // it for an instant: retry for about a second before giving up.
        let mut attempts = 0;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if attempts < 20 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(WardError::Locked {
                        path,
                        holder: read_holder(&mut file)
                            .map(|h| h.to_string())
                            .unwrap_or_else(|| "a process that has not written its name".into()),
                    });
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(WardError::io("cannot lock", path, e));
                }
            }
        }
        // Locked: whatever the file still names is a holder that died.
        let stale = read_holder(&mut file);
        let me = LockHolder {
            pid: std::process::id(),
            host: hostname(),
            started: now(),
            command: command.to_string(),
        };
        let json = serde_json::to_vec(&me).expect("serializable");
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(&json))
            .and_then(|()| file.sync_all())
            .map_err(|e| WardError::io("cannot write", &path, e))?;
        Ok(Lock { file, path, stale })
    }

    /// The holder recorded in a warehouse's lock file and whether it still
    /// holds it; `None` when no one ever held it or it was released.
    pub fn inspect(warehouse: &Path) -> Result<Option<(LockHolder, bool)>> {
        let path = warehouse.join("ward.lock");
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(WardError::io("cannot open", path, e)),
        };
        let Some(holder) = read_holder(&mut file) else {
            return Ok(None);
        };
        // A shared lock, released at once: it fails only while a run holds
        // the exclusive one (and a run starting meanwhile retries).
        let held = match file.try_lock_shared() {
            Ok(()) => false,
            Err(fs::TryLockError::WouldBlock) => true,
            Err(fs::TryLockError::Error(e)) => return Err(WardError::io("cannot lock", path, e)),
        };
        Ok(Some((holder, held)))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // An empty file means "released cleanly"; the flock goes with the file.
        if let Err(e) = self.file.set_len(0) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot clear the lock file");
        }
    }
}

fn read_holder(file: &mut fs::File) -> Option<LockHolder> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// This machine's name (Linux), for lock files and manifests.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown host".into())
}

/// Now, UTC, RFC 3339 with seconds.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A new run id (UTC start time, `20261125T063000Z`), unique among the
/// warehouse's run directories.
pub fn new_run_id(warehouse: &Path) -> String {
    let base = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let runs = runs_dir(warehouse);
    let mut id = base.clone();
    let mut n = 1;
    while runs.join(&id).exists() {
        n += 1;
        id = format!("{base}-{n}");
    }
    id
}

/// Removes run directories without a manifest (runs that were killed),
/// except `keep`, and pointer files a killed publication left; returns the
/// ids of the runs removed. Call with the lock held.
pub fn remove_interrupted(warehouse: &Path, keep: &str) -> Result<Vec<String>> {
    let runs = runs_dir(warehouse);
    if let Ok(entries) = fs::read_dir(&runs) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(&format!(".{CURRENT}.")) {
                fs::remove_file(&path).map_err(|e| WardError::io("cannot remove", &path, e))?;
            } else if name.starts_with(".trash-") {
                fs::remove_dir_all(&path).map_err(|e| WardError::io("cannot remove", &path, e))?;
            }
        }
    }
    let mut removed = Vec::new();
    for (id, dir) in run_dirs(warehouse)? {
        if id != keep && !dir.join(MANIFEST).exists() {
            remove_run(&dir)?;
            removed.push(id);
        }
    }
    Ok(removed)
}

/// Removes a run directory: renamed to `.trash-<id>` first, so a removal
/// cut short never leaves something that looks like a run.
fn remove_run(dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trash = dir.with_file_name(format!(".trash-{name}"));
    fs::rename(dir, &trash).map_err(|e| WardError::io("cannot move aside", dir, e))?;
    fs::remove_dir_all(&trash).map_err(|e| WardError::io("cannot remove", &trash, e))
}

/// Syncs every file and directory under `dir` to disk (before a rename
/// publishes it: after a power loss the pointer must not name a run whose
/// files are not there).
pub fn sync_tree(dir: &Path) -> Result<()> {
    let (files, dirs) = walk(dir)?;
    for path in files.iter().chain(&dirs) {
        fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| WardError::io("cannot sync", path, e))?;
    }
    Ok(())
}

/// The files and the directories (`dir` included) under `dir`.
fn walk(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut files, mut dirs) = (Vec::new(), vec![dir.to_path_buf()]);
    let mut next = 0;
    while let Some(d) = dirs.get(next).cloned() {
        next += 1;
        for entry in fs::read_dir(&d).map_err(|e| WardError::io("cannot list", &d, e))? {
            let path = entry
                .map_err(|e| WardError::io("cannot list", &d, e))?
                .path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    Ok((files, dirs))
}

/// Run directories, oldest first.
fn run_dirs(warehouse: &Path) -> Result<Vec<(String, PathBuf)>> {
    let runs = runs_dir(warehouse);
    let entries = match fs::read_dir(&runs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(WardError::io("cannot list", runs, e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| WardError::io("cannot list", &runs, e))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if entry.path().is_dir() && !hidden {
            dirs.push((
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            ));
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Makes `run_id` the current run: writes `runs/CURRENT` aside, syncs it,
/// renames it into place and syncs the directory.
pub fn publish(warehouse: &Path, run_id: &str) -> Result<()> {
    let runs = runs_dir(warehouse);
    let tmp = runs.join(format!(".{CURRENT}.{}", std::process::id()));
    write_synced(&tmp, &runs.join(CURRENT), run_id.as_bytes())?;
    fs::File::open(&runs)
        .and_then(|d| d.sync_all())
        .map_err(|e| WardError::io("cannot sync", &runs, e))
}

/// Keeps the newest `keep` published runs (those the current run's history
/// lists; the current run always, and the one before it always, so a
/// reader still on the previous run never loses it mid-query), the newest
/// `keep` failed runs (kept for diagnosis) and any run newer than the
/// current one; removes runs that completed but never published, and
/// runs beyond those counts. Returns the ids removed.
pub fn prune(warehouse: &Path, keep: usize) -> Result<Vec<String>> {
    let Some(current) = current(warehouse)? else {
        return Ok(Vec::new());
    };
    let history = load_history(Some(&runs_dir(warehouse).join(&current)))?;
    let published: std::collections::BTreeSet<&str> =
        history.iter().map(|h| h.run_id.as_str()).collect();
    let (mut kept, mut kept_failed) = (0, 0);
    let mut removed = Vec::new();
    for (id, dir) in run_dirs(warehouse)?.into_iter().rev() {
        let keep_it = if id > current {
            true
        } else if id == current || published.contains(id.as_str()) {
            kept += 1;
            kept <= keep.max(2)
        } else if Manifest::load(&dir).is_ok_and(|m| m.status == RunStatus::Failed) {
            kept_failed += 1;
            kept_failed <= keep
        } else {
            false
        };
        if !keep_it {
            remove_run(&dir)?;
            removed.push(id);
        }
    }
    removed.reverse();
    Ok(removed)
}

/// The outcome of a run, as its manifest records it. A complete run is
/// published by the rename of `runs/CURRENT` that follows its manifest;
/// `history.json` of the current run lists every run ever published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every stage done, every output written.
    Complete,
    /// Stopped by an error or a data-quality gate; outputs not published.
    #[default]
    Failed,
}

/// Everything a run read, did and wrote: `runs/<run_id>/manifest.json`.
/// Fields missing from a manifest (one written by an older Ward) read as
/// empty.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Manifest {
    pub run_id: String,
    pub status: RunStatus,
    pub ward_version: String,
    pub started: String,
    pub finished: String,
    pub host: String,
    pub pid: u32,
    pub config: ConfigInfo,
    pub period: PeriodInfo,
    /// Every input file the run's data comes from (the ingest state), with
    /// what this run did with it.
    pub inputs: Vec<InputFile>,
    /// Rows per source and table over `inputs`.
    pub sources: Vec<SourceTable>,
    pub linkage: Option<crate::link::LinkReport>,
    /// Core rows per table.
    pub core: BTreeMap<String, u64>,
    pub measures: Vec<MeasureFigures>,
    pub gates: Vec<GateResult>,
    pub stages: Vec<StageInfo>,
    /// Peak resident memory of the process over the run, bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Files written, relative to the run directory, with size and SHA-256.
    pub outputs: Vec<OutputFile>,
    /// Identified outputs among `outputs` (care-gap lists).
    pub phi_outputs: Vec<String>,
    pub warnings: Vec<String>,
    /// Why the run failed.
    pub error: Option<String>,
}

impl Manifest {
    /// The manifest of a run starting now on this host: status `failed`
    /// until the run completes, everything else still empty.
    pub fn start(run_id: &str, config: ConfigInfo, period: PeriodInfo) -> Manifest {
        Manifest {
            run_id: run_id.to_string(),
            status: RunStatus::Failed,
            ward_version: env!("CARGO_PKG_VERSION").to_string(),
            started: now(),
            host: hostname(),
            pid: std::process::id(),
            config,
            period,
            ..Manifest::default()
        }
    }

    /// Reads `runs/<run_id>/manifest.json`.
    pub fn load(run_dir: &Path) -> Result<Manifest> {
        let path = run_dir.join(MANIFEST);
        let text = fs::read_to_string(&path).map_err(|e| WardError::io("cannot read", &path, e))?;
        serde_json::from_str(&text).map_err(|e| WardError::State {
            path,
            message: e.to_string(),
        })
    }

    /// Writes the manifest into `run_dir` atomically (aside, synced, renamed).
    pub fn write(&self, run_dir: &Path) -> Result<PathBuf> {
        let path = run_dir.join(MANIFEST);
        write_json_atomic(&path, self)?;
        Ok(path)
    }
}

fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).expect("serializable");
    write_synced(&path.with_extension("json.tmp"), path, &bytes)
}

/// Writes `bytes` to `tmp`, syncs it and renames it to `path`.
fn write_synced(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    fs::File::create(tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| WardError::io("cannot write", tmp, e))?;
    fs::rename(tmp, path).map_err(|e| WardError::io("cannot publish", path, e))
}

/// The config a run used.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigInfo {
    pub path: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PeriodInfo {
    pub start: String,
    pub end: String,
}

/// One input file: its hash and rows, and what this run did with it
/// (`loaded`, `unchanged`, `duplicate`, `unmapped`, `failed`, or `kept`
/// for a file loaded by an earlier run and no longer delivered).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputFile {
    pub source: String,
    pub file: String,
    pub table: String,
    pub sha256: Option<String>,
    pub this_run: String,
    /// Not part of the last published run (with this content): a delivery.
    pub new: bool,
    pub rows_read: u64,
    pub rows_accepted: u64,
    pub rows_rejected: u64,
    pub rows_skipped: u64,
    /// Values kept as `unknown` or empty, per `column: rule`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values_flagged: BTreeMap<String, u64>,
    pub detail: Option<String>,
}

/// Rows of one source and table over the files the run used.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceTable {
    pub source: String,
    pub table: String,
    pub files: u64,
    /// Files new or changed since the last published run.
    pub files_new: u64,
    pub rows_read: u64,
    pub rows_accepted: u64,
    pub rows_rejected: u64,
    pub rows_skipped: u64,
}

/// Population counts of one measure, overall.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MeasureFigures {
    pub id: String,
    pub initial_population: u64,
    pub denominator: u64,
    pub denominator_exclusion: u64,
    pub denominator_exception: u64,
    pub numerator: u64,
    pub rate: Option<f64>,
}

impl MeasureFigures {
    pub fn of(result: &crate::measure::MeasureResult) -> MeasureFigures {
        let c = &result.counts;
        MeasureFigures {
            id: result.key(),
            initial_population: c.initial_population,
            denominator: c.denominator,
            denominator_exclusion: c.denominator_exclusion,
            denominator_exception: c.denominator_exception,
            numerator: c.numerator,
            rate: result.score,
        }
    }
}

/// Time and memory of one stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageInfo {
    pub stage: String,
    pub seconds: f64,
    /// Peak resident memory during the stage, bytes (Linux).
    pub peak_memory_bytes: Option<u64>,
}

/// One file written by a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Every file under `run_dir` (but the manifest), sorted, with size and
/// SHA-256.
pub fn list_outputs(run_dir: &Path) -> Result<Vec<OutputFile>> {
    let mut files = Vec::new();
    for path in walk(run_dir)?.0 {
        let rel = path
            .strip_prefix(run_dir)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        if rel == MANIFEST {
            continue;
        }
        let (sha256, bytes) = crate::warehouse::sha256_file(&path)?;
        files.push(OutputFile {
            path: rel,
            bytes,
            sha256,
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Every input file of the ingest state with what this run did to it, and
/// whether the last published run (`previous`) had it.
pub fn inputs(
    state: &IngestState,
    ingest: &crate::IngestReport,
    previous: Option<&Manifest>,
) -> Vec<InputFile> {
    let published: std::collections::BTreeSet<(&str, &str, &str)> = previous
        .map(|m| {
            m.inputs
                .iter()
                .filter_map(|f| Some((f.source.as_str(), f.file.as_str(), f.sha256.as_deref()?)))
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    let this_run: BTreeMap<(&str, &str), &crate::ingest::FileReport> = ingest
        .files
        .iter()
        .map(|f| ((f.source.as_str(), f.file.as_str()), f))
        .collect();
    for (source, files) in &state.sources {
        for (file, s) in files {
            let status = this_run
                .get(&(source.as_str(), file.as_str()))
                .map(|r| status_name(r.status))
                .unwrap_or("kept");
            out.push(InputFile {
                source: source.clone(),
                file: file.clone(),
                table: s.table.clone(),
                sha256: Some(s.sha256.clone()),
                this_run: status.to_string(),
                new: !published.contains(&(source.as_str(), file.as_str(), s.sha256.as_str())),
                rows_read: s.rows_read,
                rows_accepted: s.rows_accepted,
                rows_rejected: s.rows_rejected,
                rows_skipped: s.rows_skipped,
                values_flagged: s.values_flagged.clone(),
                detail: None,
            });
        }
    }
    // Files this run saw that the state does not hold (failed, unmapped, duplicates).
    for f in &ingest.files {
        let held = state
            .sources
            .get(&f.source)
            .is_some_and(|files| files.contains_key(&f.file));
        if !held {
            out.push(InputFile {
                source: f.source.clone(),
                file: f.file.clone(),
                table: f.table.unwrap_or("").to_string(),
                sha256: None,
                this_run: status_name(f.status).to_string(),
                new: false,
                rows_read: 0,
                rows_accepted: 0,
                rows_rejected: 0,
                rows_skipped: 0,
                values_flagged: BTreeMap::new(),
                detail: f.detail.clone(),
            });
        }
    }
    out.sort_by(|a, b| (&a.source, &a.file).cmp(&(&b.source, &b.file)));
    out
}

fn status_name(status: crate::ingest::FileStatus) -> &'static str {
    use crate::ingest::FileStatus::*;
    match status {
        Loaded => "loaded",
        Unchanged => "unchanged",
        Duplicate => "duplicate",
        Unmapped => "unmapped",
        Failed => "failed",
        Ignored => "ignored",
    }
}

/// Rows per source and table over the files the state holds.
pub fn source_tables(inputs: &[InputFile]) -> Vec<SourceTable> {
    let mut by: BTreeMap<(String, String), SourceTable> = BTreeMap::new();
    for f in inputs.iter().filter(|f| f.sha256.is_some()) {
        let t = by
            .entry((f.source.clone(), f.table.clone()))
            .or_insert_with(|| SourceTable {
                source: f.source.clone(),
                table: f.table.clone(),
                ..SourceTable::default()
            });
        t.files += 1;
        t.files_new += u64::from(f.new);
        t.rows_read += f.rows_read;
        t.rows_accepted += f.rows_accepted;
        t.rows_rejected += f.rows_rejected;
        t.rows_skipped += f.rows_skipped;
    }
    by.into_values().collect()
}

/// Data-quality gates (`[gates]`): thresholds that fail a nightly run
/// (exit code 1, nothing published) or warn.
#[derive(Debug, Clone, PartialEq)]
pub struct Gates {
    /// Fail when a source's rejected rows exceed this share of rows read.
    pub max_reject_rate: f64,
    /// Warn when a source's reject rate exceeds this share.
    pub warn_reject_rate: f64,
    /// Fail when a source's accepted rows fell by more than this share since
    /// the last published run.
    pub max_row_drop: f64,
    /// Warn when they fell by more than this share.
    pub warn_row_drop: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            max_reject_rate: 0.05,
            warn_reject_rate: 0.01,
            max_row_drop: 0.2,
            warn_row_drop: 0.05,
        }
    }
}

/// The outcome of one gate for one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOutcome {
    Pass,
    Warn,
    Fail,
}

/// One gate checked for one source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateResult {
    /// `reject_rate`, `row_drop` or `delivery`.
    pub gate: String,
    pub source: String,
    pub outcome: GateOutcome,
    /// The measured value (a share), when the gate measures one.
    pub value: Option<f64>,
    pub message: String,
}

/// Checks the gates per source: reject rate over the source's files,
/// accepted rows against the previous published run, and delivery for the
/// sources expected every night (`nightly`).
pub fn check_gates(
    gates: &Gates,
    sources: &[crate::config::SourceConfig],
    tables: &[SourceTable],
    previous: Option<&Manifest>,
) -> Vec<GateResult> {
    let mut results = Vec::new();
    for source in sources {
        let name = &source.name;
        let rows = |f: fn(&SourceTable) -> u64| -> u64 {
            tables.iter().filter(|t| &t.source == name).map(f).sum()
        };
        let (read, rejected, accepted) = (
            rows(|t| t.rows_read),
            rows(|t| t.rows_rejected),
            rows(|t| t.rows_accepted),
        );
        let rate = if read == 0 {
            0.0
        } else {
            rejected as f64 / read as f64
        };
        let outcome = grade(rate, gates.warn_reject_rate, gates.max_reject_rate);
        results.push(GateResult {
            gate: "reject_rate".into(),
            source: name.clone(),
            outcome,
            value: Some(rate),
            message: format!(
                "source '{name}': {rejected} of {read} rows rejected ({:.2} %; warn above {:.2} %, fail above {:.2} %)",
                rate * 100.0,
                gates.warn_reject_rate * 100.0,
                gates.max_reject_rate * 100.0
            ),
        });
        if let Some(prev) = previous {
            let before: u64 = prev
                .sources
                .iter()
                .filter(|t| &t.source == name)
                .map(|t| t.rows_accepted)
                .sum();
            if before > 0 {
                let drop = before.saturating_sub(accepted) as f64 / before as f64;
                results.push(GateResult {
                    gate: "row_drop".into(),
                    source: name.clone(),
                    outcome: grade(drop, gates.warn_row_drop, gates.max_row_drop),
                    value: Some(drop),
                    message: format!(
                        "source '{name}': {accepted} rows accepted, {before} in run {} (a drop of {:.1} %; warn above {:.1} %, fail above {:.1} %)",
                        prev.run_id,
                        drop * 100.0,
                        gates.warn_row_drop * 100.0,
                        gates.max_row_drop * 100.0
                    ),
                });
            }
        }
        if source.nightly {
            let loaded = rows(|t| t.files_new);
            results.push(GateResult {
                gate: "delivery".into(),
                source: name.clone(),
                outcome: if loaded == 0 {
                    GateOutcome::Fail
                } else {
                    GateOutcome::Pass
                },
                value: None,
                message: format!(
                    "source '{name}' is expected nightly: {loaded} file(s) new or changed since the last published run"
                ),
            });
        }
    }
    results
}

fn grade(value: f64, warn: f64, fail: f64) -> GateOutcome {
    if value > fail {
        GateOutcome::Fail
    } else if value > warn {
        GateOutcome::Warn
    } else {
        GateOutcome::Pass
    }
}

/// Headline figures of one published run, kept in every later run's
/// `history.json` (so trends survive the pruning of old run directories).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEntry {
    pub run_id: String,
    pub finished: String,
    pub period: PeriodInfo,
    pub persons: u64,
    /// Each measure's published overall cell (small counts suppressed:
    /// the history feeds published trends).
    pub overall: Vec<crate::report::Cell>,
}

/// The HTML report's trend points: each measure's published overall rate
/// in every run of `history`, labelled with the day the run finished.
pub fn trend(history: &[HistoryEntry]) -> Vec<crate::report::html::TrendPoint> {
    history
        .iter()
        .flat_map(|h| {
            h.overall.iter().map(|c| crate::report::html::TrendPoint {
                run_id: h.run_id.clone(),
                date: h.finished.get(..10).unwrap_or(&h.finished).to_string(),
                measure: c.measure.clone(),
                rate: c.rate,
                ci_low: c.ci_low,
                ci_high: c.ci_high,
            })
        })
        .collect()
}

/// At most this many runs are kept in `history.json`.
const HISTORY_LIMIT: usize = 1000;

/// The history of the current run (empty when there is none).
pub fn load_history(run_dir: Option<&Path>) -> Result<Vec<HistoryEntry>> {
    let Some(dir) = run_dir else {
        return Ok(Vec::new());
    };
    let path = dir.join(HISTORY);
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| WardError::State {
            path,
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(WardError::io("cannot read", path, e)),
    }
}

/// Writes `history` plus `entry` into `run_dir/history.json`.
pub fn write_history(
    run_dir: &Path,
    mut history: Vec<HistoryEntry>,
    entry: HistoryEntry,
) -> Result<Vec<HistoryEntry>> {
    history.push(entry);
    if history.len() > HISTORY_LIMIT {
        history.drain(..history.len() - HISTORY_LIMIT);
    }
    write_json_atomic(&run_dir.join(HISTORY), &history)?;
    Ok(history)
}

/// A run directory as `ward runs` lists it.
#[derive(Debug, Clone)]
pub struct RunListing {
    pub run_id: String,
    pub current: bool,
    /// Published at some point (the current run's history lists it).
    pub published: bool,
    /// `None`: no manifest (interrupted, or still running), or an
    /// unreadable one (`unreadable`).
    pub manifest: Option<Manifest>,
    /// Why the manifest could not be read.
    pub unreadable: Option<String>,
}

impl RunListing {
    /// `current`, `published`, `complete` (never published: stopped just
    /// before), `failed`, or `incomplete` (killed, or running now).
    pub fn status(&self) -> &'static str {
        match (&self.manifest, self.current, self.published) {
            (None, _, _) if self.unreadable.is_some() => "unreadable",
            (None, _, _) => "incomplete",
            (Some(_), true, _) => "current",
            (Some(_), false, true) => "published",
            (Some(m), false, false) => match m.status {
                RunStatus::Complete => "complete",
                RunStatus::Failed => "failed",
            },
        }
    }
}

/// Every run directory, newest first.
pub fn list(warehouse: &Path) -> Result<Vec<RunListing>> {
    let current = current(warehouse)?;
    let history = load_history(current_dir(warehouse)?.as_deref()).unwrap_or_default();
    let published: std::collections::BTreeSet<&str> =
        history.iter().map(|h| h.run_id.as_str()).collect();
    let mut runs = Vec::new();
    for (id, dir) in run_dirs(warehouse)?.into_iter().rev() {
        let (manifest, unreadable) = if dir.join(MANIFEST).exists() {
            match Manifest::load(&dir) {
                Ok(m) => (Some(m), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        runs.push(RunListing {
            unreadable,
            current: Some(&id) == current.as_ref(),
            published: published.contains(id.as_str()),
            run_id: id,
            manifest,
        });
    }
    Ok(runs)
}

/// Peak resident memory since the last [`reset_peak_memory`] (Linux:
/// `VmHWM` of /proc/self/status), bytes.
pub fn peak_memory() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak-memory mark so the next stage measures its own peak
/// (Linux `clear_refs`; a no-op elsewhere).
pub fn reset_peak_memory() {
    let _ = fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let entry = |id: &str| HistoryEntry {
            run_id: id.into(),
            finished: String::new(),
            period: PeriodInfo::default(),
            persons: 0,
            overall: Vec::new(),
        };
        let history = vec![entry("r1"), entry("r2")];
        write_history(&runs_dir(wh).join("r4"), history, entry("r4")).unwrap();
        fs::create_dir_all(runs_dir(wh).join("r6/core")).unwrap(); // killed
        fs::create_dir_all(runs_dir(wh).join(".trash-r0/core")).unwrap(); // removal cut short
        publish(wh, "r4").unwrap();
        fs::write(runs_dir(wh).join(".CURRENT.1"), "r6").unwrap(); // killed while publishing
        assert_eq!(current(wh).unwrap().as_deref(), Some("r4"));
        assert_eq!(remove_interrupted(wh, "r7").unwrap(), vec!["r6"]);
        assert!(!runs_dir(wh).join(".CURRENT.1").exists());
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
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(names.is_empty(), "{names:?}");
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

    fn source(name: &str, nightly: bool) -> crate::config::SourceConfig {
        crate::config::SourceConfig {
            name: name.into(),
            format: crate::config::SourceFormat::Csv,
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
