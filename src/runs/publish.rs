//! Run directories and their atomic publication: `runs/<run_id>/`,
//! `runs/CURRENT`, interrupted runs, pruning and the listing `ward runs` prints.

use std::fs;
use std::path::{Path, PathBuf};

use super::history::load_history;
use super::manifest::{Manifest, RunStatus, write_synced};
use crate::error::{Result, WardError};

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
/// except `keep`, and pointer and hash files a killed publication left;
/// returns the ids of the runs removed. Call with the lock held.
pub fn remove_interrupted(warehouse: &Path, keep: &str) -> Result<Vec<String>> {
    let runs = runs_dir(warehouse);
    if let Ok(entries) = fs::read_dir(&runs) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(&format!(".{CURRENT}.")) || name == format!("{HASHES}.tmp") {
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
    use rayon::prelude::*;
    let (files, dirs) = walk(dir)?;
    // The files first, in parallel, then the directories that name them.
    let sync = |path: &PathBuf| {
        fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| WardError::io("cannot sync", path, e))
    };
    files.par_iter().try_for_each(sync)?;
    dirs.iter().try_for_each(sync)
}

/// The files and the directories (`dir` included) under `dir`.
pub(super) fn walk(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
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
pub(super) fn run_dirs(warehouse: &Path) -> Result<Vec<(String, PathBuf)>> {
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

/// The hashes of the current run's files as the last night took them
/// (see [`keep_hashes`]), under `runs/`.
pub const HASHES: &str = "file_hashes.json";

/// Keeps for the next night the hashes this process took of the files
/// `outputs` of the run in `run_dir` (its manifest's), each with the
/// identity the file had then: while a file keeps it, the next night
/// takes the file from this run without reading it to check its SHA-256
/// ([`crate::warehouse::sha256_file`]). `runs/file_hashes.json`, replaced.
pub fn keep_hashes(warehouse: &Path, run_dir: &Path, outputs: &[super::OutputFile]) -> Result<()> {
    let known = crate::warehouse::known_hashes(run_dir, outputs.iter().map(|o| o.path.as_str()));
    let path = runs_dir(warehouse).join(HASHES);
    // Aside, then renamed (one killed here leaves the aside file, which
    // the next run removes).
    let tmp = runs_dir(warehouse).join(format!("{HASHES}.tmp"));
    fs::write(&tmp, serde_json::to_vec(&known).expect("serializable"))
        .map_err(|e| WardError::io("cannot write", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| WardError::io("cannot publish", &path, e))
}

/// Tells [`crate::warehouse::sha256_file`] the hashes the last night kept
/// ([`keep_hashes`]); none when it kept none.
pub fn remember_kept_hashes(warehouse: &Path) -> Result<()> {
    let path = runs_dir(warehouse).join(HASHES);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(WardError::io("cannot read", path, e)),
    };
    let known: Vec<crate::warehouse::KnownHash> = serde_json::from_slice(&bytes)
        .map_err(|e| WardError::data("reading the kept file hashes", &path, e))?;
    crate::warehouse::remember_hashes(&known);
    Ok(())
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
            // A reader (`ward serve`) still on the run holds its lease: the
            // run stays until a later prune finds it free.
            let Some(_lease) = try_lease_exclusive(warehouse, &id)? else {
                tracing::info!(run = %id, "run kept: a reader is still using it");
                continue;
            };
            remove_run(&dir)?;
            remove_lease_file(warehouse, &id);
            removed.push(id);
        }
    }
    removed.reverse();
    Ok(removed)
}

/// `runs/.readers/`: one lock file per run a reader is using (see
/// [`ReaderLease`]).
fn leases_dir(warehouse: &Path) -> PathBuf {
    runs_dir(warehouse).join(".readers")
}

fn open_lease_file(warehouse: &Path, run_id: &str) -> Result<fs::File> {
    let dir = leases_dir(warehouse);
    fs::create_dir_all(&dir).map_err(|e| WardError::io("cannot create", &dir, e))?;
    let path = dir.join(format!("{run_id}.lock"));
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| WardError::io("cannot open", &path, e))
}

/// The exclusive lease of `run_id` when no reader holds it, else `None`.
fn try_lease_exclusive(warehouse: &Path, run_id: &str) -> Result<Option<fs::File>> {
    let file = open_lease_file(warehouse, run_id)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(WardError::io(
            "cannot lock",
            leases_dir(warehouse).join(format!("{run_id}.lock")),
            e,
        )),
    }
}

fn remove_lease_file(warehouse: &Path, run_id: &str) {
    // A reader that opened the file before its removal finds the run gone
    // once it holds its lease (see [`ReaderLease::take`]); a file left
    // behind is harmless.
    let _ = fs::remove_file(leases_dir(warehouse).join(format!("{run_id}.lock")));
}

/// A reader's hold on a published run (a shared `flock` on
/// `runs/.readers/<run_id>.lock`): while it is held, [`prune`] keeps the
/// run, so a query that started on it reads it to the end. The kernel
/// releases it with its holder, however that ends.
#[derive(Debug)]
pub struct ReaderLease {
    _file: fs::File,
    /// The run held.
    pub run_id: String,
    /// Its directory.
    pub dir: PathBuf,
}

impl ReaderLease {
    /// Holds `run_id`, or `None` when the run is not there (pruned).
    pub fn take(warehouse: &Path, run_id: &str) -> Result<Option<ReaderLease>> {
        let file = open_lease_file(warehouse, run_id)?;
        // Waits while a prune holds it exclusively (an instant: a rename).
        file.lock_shared().map_err(|e| {
            WardError::io(
                "cannot lock",
                leases_dir(warehouse).join(format!("{run_id}.lock")),
                e,
            )
        })?;
        let dir = runs_dir(warehouse).join(run_id);
        // Checked with the lease held: a prune removes a run only under
        // the exclusive lease, so a run seen here stays.
        if !dir.join(MANIFEST).is_file() {
            return Ok(None);
        }
        Ok(Some(ReaderLease {
            _file: file,
            run_id: run_id.to_string(),
            dir,
        }))
    }

    /// Holds the current run, or `None` when nothing is published.
    pub fn current(warehouse: &Path) -> Result<Option<ReaderLease>> {
        // A publication and a prune between reading CURRENT and taking the
        // lease can remove the run just read: read CURRENT again.
        for _ in 0..8 {
            let Some(id) = current(warehouse)? else {
                return Ok(None);
            };
            if let Some(lease) = ReaderLease::take(warehouse, &id)? {
                return Ok(Some(lease));
            }
        }
        Err(WardError::State {
            path: runs_dir(warehouse),
            message: "the current run changed under every attempt to read it".into(),
        })
    }
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
