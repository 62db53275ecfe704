//! The run manifest (`manifest.json`, written last): what a run read, did
//! and wrote, with the stage timings and peak memory.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, WardError};
use crate::warehouse::IngestState;

use super::gates::GateResult;
use super::lock::{hostname, now};
use super::publish::{MANIFEST, walk};

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
    /// The highest of the stages' peak memory, bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Files written, relative to the run directory, with size and SHA-256.
    pub outputs: Vec<OutputFile>,
    /// Identified outputs among `outputs` (care-gap lists).
    pub phi_outputs: Vec<String>,
    pub warnings: Vec<String>,
    /// Why the run failed.
    pub error: Option<String>,
    /// Per stage, the hash of everything its outputs depend on (see
    /// [`super::reuse`]): the next run reuses a stage whose fingerprint it
    /// shares.
    pub fingerprints: BTreeMap<String, String>,
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

pub(super) fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).expect("serializable");
    write_synced(&path.with_extension("json.tmp"), path, &bytes)
}

/// Writes `bytes` to `tmp`, syncs it and renames it to `path`.
pub(super) fn write_synced(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
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
    /// The files its load wrote, relative to the warehouse: its accepted
    /// rows (`staging/<table>/source=<source>/<batch>.parquet`) and
    /// rejects (`rejects/<source>/<batch>.parquet`). Absent for a file not
    /// staged, and in manifests written before Ward recorded them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<String>>,
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
    /// Peak memory during the stage, bytes: the most the process had
    /// allocated at once when it counts its allocations (the `ward` binary
    /// does, see [`set_memory_counter`]), else its resident peak (Linux).
    pub peak_memory_bytes: Option<u64>,
    /// The run whose outputs the stage took, its inputs being unchanged
    /// (see [`super::reuse`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<String>,
    /// Of a stage that took only some of its outputs (`build`: core
    /// tables whose staged rows did not change), the ones it took from the
    /// current run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reused_tables: Vec<String>,
    /// Of a stage that kept some tables' files from the current run and
    /// added a file of new rows to each (`build`: core tables whose new
    /// staged files only add facts; `deid`: their research tables), those
    /// tables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub appended_tables: Vec<String>,
    /// Of a stage computed per source (`dq`), the sources whose results it
    /// took from the current run, their staged files being unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reused_sources: Vec<String>,
    /// Of a stage that counted again only what changed (`dq`): what became
    /// of the current run's counts, per check and source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recounts: Option<crate::dq::Recounts>,
    /// Of a stage computed only for the persons whose core rows changed
    /// (`measures`), how many, the rest being another run's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recomputed: Option<Recomputed>,
}

/// A stage computed for some persons only (see [`StageInfo::recomputed`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Recomputed {
    /// Persons computed tonight: those whose core rows changed where the
    /// stage reads them (a person whose person row changed only in
    /// columns no query of the stage reads keeps their results).
    pub persons: u64,
    /// Persons in tonight's core.
    pub of: u64,
    /// The run whose results the other persons keep.
    pub rest_from: String,
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
    use rayon::prelude::*;
    // Hashed in parallel: a night writes hundreds of megabytes anew.
    let mut files = walk(run_dir)?
        .0
        .into_par_iter()
        .filter_map(|path| {
            let rel = path
                .strip_prefix(run_dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            (rel != MANIFEST).then(|| {
                let (sha256, bytes) = crate::warehouse::sha256_file(&path)?;
                Ok(OutputFile {
                    path: rel,
                    bytes,
                    sha256,
                })
            })
        })
        .collect::<Result<Vec<_>>>()?;
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
                outputs: Some(s.outputs.clone()),
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
                outputs: None,
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

/// A program's own count of the bytes it has allocated, read as a stage's
/// peak memory instead of the resident peak (see [`set_memory_counter`]).
pub struct MemoryCounter {
    /// Most bytes allocated at once since the last `reset`.
    pub peak: fn() -> u64,
    /// Starts a new peak from the bytes allocated now.
    pub reset: fn(),
}

static COUNTER: std::sync::OnceLock<MemoryCounter> = std::sync::OnceLock::new();

/// Measures stages' peak memory with `counter` from now on (set once). The
/// `ward` binary counts its allocations: its allocator keeps freed memory
/// for reuse, so the resident peak would include what earlier stages freed.
pub fn set_memory_counter(counter: MemoryCounter) {
    let _ = COUNTER.set(counter);
}

/// Peak memory since the last [`reset_peak_memory`], bytes: the
/// [`MemoryCounter`]'s when one is set, else the resident peak (Linux:
/// `VmHWM` of /proc/self/status).
pub fn peak_memory() -> Option<u64> {
    if let Some(counter) = COUNTER.get() {
        return Some((counter.peak)());
    }
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak-memory mark so the next stage measures its own peak
/// (the counter's, else Linux `clear_refs`; a no-op elsewhere).
pub fn reset_peak_memory() {
    match COUNTER.get() {
        Some(counter) => (counter.reset)(),
        None => {
            let _ = fs::write("/proc/self/clear_refs", "5");
        }
    }
}
