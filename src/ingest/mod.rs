//! The ingest stage: provider extracts → validated, normalized staging
//! Parquet, with a reject row for every refused record.
//!
//! Files are processed in parallel (rayon), patient files first, because
//! facts are checked against the source's accepted patients (unknown patient,
//! dates before birth). A file is read, mapped and written a slice at a
//! time (CSV records, NDJSON lines), so what ingest holds of a file is its
//! bytes and one slice. Each input file becomes one batch; the ingest state
//! remembers which file content produced which batch, so a re-run loads only
//! new or changed files and a changed file replaces its own batch.

pub mod csv;
pub mod fhir;
pub mod rows;
mod source;

pub use source::{IgnoredPath, SourceConfig, SourceFormat};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::NaiveDate;
use datafusion::arrow::array::{
    Array, BooleanArray, Date32Array, RecordBatch, StringArray, StringBuilder, UInt64Array,
    UInt64Builder,
};
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::Progress;
use crate::error::{Result, WardError};
use crate::mapping::{CsvMapping, FileMapping};
use crate::schema::{Table, rejects_schema};
use crate::warehouse::{FileStat, FileState, IngestState, ParquetFile, Warehouse};
use rows::{RejectRow, RowContext};

/// How ingest runs.
#[derive(Debug, Clone, Default)]
pub struct IngestOptions {
    /// Dates after this day are rejected as `future_date`.
    pub today: NaiveDate,
    /// Check every file against its mapping and report, writing nothing.
    pub dry_run: bool,
    /// Keep the first this many rejects of each rule of each file as
    /// [`FileReport::reject_examples`] (`ward validate --examples`).
    pub examples: usize,
    /// Keep the offending value in those examples: patient data, for a
    /// terminal the operator may see PHI on (`--show-values`).
    pub show_values: bool,
    /// Records of a CSV file read, mapped and written at a time (default
    /// [`CSV_SLICE`]): what ingest holds of a file besides its bytes. The
    /// staged rows and rejects do not depend on it.
    pub slice_records: Option<usize>,
}

/// Where one rejected record is, and why (`ward validate --examples`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectExample {
    pub line: u64,
    pub column: Option<String>,
    pub rule: &'static str,
    /// The column's value (or the unsplit record): only with
    /// [`IngestOptions::show_values`].
    pub value: Option<String>,
}

/// What happened to one input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    /// Read, mapped and (unless a dry run) published.
    Loaded,
    /// Same content, mapping and patients as already loaded: nothing to do.
    Unchanged,
    /// Same content as another file of the source that is already loaded.
    Duplicate,
    /// No entry of the source's mapping matches the file name.
    Unmapped,
    /// The file could not be loaded as a whole (see `detail`).
    Failed,
    /// Matched by the source's glob but not read (see `detail`): not a
    /// regular file, reached through a directory symlink, or outside the
    /// source's directory.
    Ignored,
}

/// The outcome of one input file.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub source: String,
    /// Path relative to the source's folder.
    pub file: String,
    pub table: Option<&'static str>,
    pub status: FileStatus,
    /// Why a file failed, or which file it duplicates.
    pub detail: Option<String>,
    pub rows_read: u64,
    pub rows_accepted: u64,
    pub rows_rejected: u64,
    /// FHIR resources of types Ward does not load.
    pub rows_skipped: u64,
    /// Skipped FHIR resources per resource type.
    pub skipped_by_type: BTreeMap<String, u64>,
    /// Rejected rows per rule (first failing rule of each row).
    pub rejects_by_rule: BTreeMap<String, u64>,
    /// Values of accepted rows kept as `unknown` or empty because they could
    /// not be normalized (a race code Ward does not know, a misspelt state),
    /// per `column: rule`.
    pub values_flagged: BTreeMap<String, u64>,
    /// The first [`IngestOptions::examples`] rejects of each rule, in file
    /// order (empty unless asked for).
    pub reject_examples: Vec<RejectExample>,
}

impl FileReport {
    /// A file's report before anything was read from it: every count zero.
    fn new(
        source: &str,
        file: &str,
        table: Option<&'static str>,
        status: FileStatus,
        detail: Option<String>,
    ) -> FileReport {
        FileReport {
            source: source.to_string(),
            file: file.to_string(),
            table,
            status,
            detail,
            rows_read: 0,
            rows_accepted: 0,
            rows_rejected: 0,
            rows_skipped: 0,
            skipped_by_type: BTreeMap::new(),
            rejects_by_rule: BTreeMap::new(),
            values_flagged: BTreeMap::new(),
            reject_examples: Vec::new(),
        }
    }

    /// An input's report before anything was read from it.
    fn of_input(input: &Input, status: FileStatus, detail: Option<String>) -> FileReport {
        FileReport::new(
            &input.source.name,
            &input.rel,
            Some(input.table()),
            status,
            detail,
        )
    }

    /// An input not reloaded: the counts of its last load.
    fn unchanged(input: &Input, known: &FileState) -> FileReport {
        FileReport {
            rows_read: known.rows_read,
            rows_accepted: known.rows_accepted,
            rows_rejected: known.rows_rejected,
            rows_skipped: known.rows_skipped,
            skipped_by_type: known.skipped_by_type.clone(),
            rejects_by_rule: known.rejects_by_rule.clone(),
            values_flagged: known.values_flagged.clone(),
            ..FileReport::of_input(input, FileStatus::Unchanged, None)
        }
    }

    /// An input just mapped: its counts, and the first rejects of each rule
    /// as examples if asked for.
    fn loaded(input: &Input, loaded: &Loaded, opts: &IngestOptions) -> FileReport {
        let mut file_report = FileReport {
            rows_read: loaded.read,
            rows_accepted: loaded.accepted,
            rows_rejected: loaded.rejects.len() as u64,
            rows_skipped: loaded.skipped_total(),
            skipped_by_type: loaded.skipped.clone(),
            values_flagged: loaded.flagged.clone(),
            ..FileReport::of_input(input, FileStatus::Loaded, None)
        };
        for r in &loaded.rejects {
            let n = file_report
                .rejects_by_rule
                .entry(r.rule.to_string())
                .or_default();
            *n += 1;
            if *n <= opts.examples as u64 {
                file_report
                    .reject_examples
                    .push(example(r, opts.show_values));
            }
        }
        file_report
    }
}

fn example(r: &RejectRow, show_values: bool) -> RejectExample {
    let value = show_values.then(|| {
        // `raw` is the record keyed by header name, or the unsplit line.
        match (serde_json::from_str::<serde_json::Value>(&r.raw), &r.column) {
            (Ok(serde_json::Value::Object(fields)), Some(column)) => match fields.get(column) {
                Some(serde_json::Value::String(v)) => v.clone(),
                Some(other) => other.to_string(),
                None => r.raw.clone(),
            },
            _ => r.raw.clone(),
        }
    });
    RejectExample {
        line: r.line,
        column: r.column.clone(),
        rule: r.rule,
        value,
    }
}

/// A whole source that could not be read (e.g. its glob matched nothing).
#[derive(Debug, Clone, Serialize)]
pub struct SourceFailure {
    pub source: String,
    pub message: String,
}

/// The outcome of an ingest run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct IngestReport {
    pub files: Vec<FileReport>,
    pub source_failures: Vec<SourceFailure>,
    /// Files left by an interrupted run and removed at start.
    pub orphans_removed: usize,
}

impl IngestReport {
    /// Messages of everything that failed, files and sources.
    pub fn failures(&self) -> Vec<String> {
        self.source_failures
            .iter()
            .map(|f| f.message.clone())
            .chain(
                self.files
                    .iter()
                    .filter(|f| f.status == FileStatus::Failed)
                    .map(|f| f.detail.clone().unwrap_or_default()),
            )
            .collect()
    }
}

/// How a file is read.
#[derive(Clone, Copy)]
enum FileKind<'a> {
    Csv(&'a CsvMapping, &'a FileMapping),
    Ndjson,
    Bundle,
}

/// Version of the FHIR flattening rules, standing in for a mapping hash.
const FHIR_RULES: &str = "fhir-r4-1";

/// One input file and what to do with it.
struct Input<'a> {
    source: &'a SourceConfig,
    kind: FileKind<'a>,
    path: PathBuf,
    rel: String,
    sha256: String,
    /// Its stat before it was hashed, when settled.
    stat: Option<FileStat>,
    /// What the state recorded of its last load, if any.
    earlier: Option<FileState>,
}

impl Input<'_> {
    /// Whether the file is loaded before the source's fact files: patient
    /// files, and Bundles (self-contained: facts checked against their own patients).
    fn first_phase(&self) -> bool {
        match self.kind {
            FileKind::Csv(_, e) => e.table == Table::Patient,
            FileKind::Ndjson => ndjson_is_patients(&self.path),
            FileKind::Bundle => true,
        }
    }

    /// What the state records as the file's table.
    fn table(&self) -> &'static str {
        match self.kind {
            FileKind::Csv(_, e) => e.table.name(),
            FileKind::Ndjson if ndjson_is_patients(&self.path) => Table::Patient.name(),
            FileKind::Ndjson => "fhir-ndjson",
            FileKind::Bundle => "fhir-bundle",
        }
    }

    /// The rules the file was mapped with: the mapping's hash, or FHIR's.
    fn rules_hash(&self) -> &str {
        match self.kind {
            FileKind::Csv(m, _) => &m.hash,
            _ => FHIR_RULES,
        }
    }
}

/// NDJSON files named `Patient*.ndjson` hold the source's patients.
fn ndjson_is_patients(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("Patient"))
}

/// A file mapped in this run.
#[derive(Default)]
struct Loaded {
    /// Its batch: the name of its staged files.
    batch_id: String,
    /// The staged files its accepted rows were written to (none in a dry
    /// run), relative to the warehouse.
    outputs: Vec<String>,
    /// Birth dates of its accepted patients (patient files).
    births: PatientLookup,
    rejects: Vec<RejectRow>,
    /// Records read: CSV rows, NDJSON lines, Bundle entries.
    read: u64,
    /// Records accepted (a FHIR resource may fill several rows).
    accepted: u64,
    /// FHIR resources of types Ward does not load, per type.
    skipped: BTreeMap<String, u64>,
    /// Values kept as `unknown` or empty, per `column: rule`.
    flagged: BTreeMap<String, u64>,
    /// The file's size (CSV files).
    bytes: Option<u64>,
    /// The earlier load whose file this one is with records appended:
    /// only the appended records were read ([`appended_after`]).
    base: Option<FileState>,
}

impl Loaded {
    fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}

/// Records of a CSV file read, mapped and written at a time, unless
/// [`IngestOptions::slice_records`] says otherwise.
pub const CSV_SLICE: usize = 128 * 1024;

/// Where a file's accepted rows go as they are mapped: one Parquet file per
/// table under `.tmp/`, published into staging once the whole file is
/// mapped ([`Staged::close`]); nothing is written in a dry run.
struct Staged<'w> {
    wh: &'w Warehouse,
    source: &'w str,
    batch_id: String,
    /// The source's patients fingerprint the rows are checked against.
    fingerprint: Option<String>,
    dry_run: bool,
    files: Vec<(Table, ParquetFile)>,
    births: PatientLookup,
    /// The first write that failed: it fails the ingest, not just the file.
    error: Option<WardError>,
    /// A file checked again because its source's patients grew: only the
    /// rows its earlier load did not stage are written.
    recheck: Option<Recheck>,
}

/// The rows of a fact file its earlier load staged: those of patients the
/// source already had, up to the earlier load's last line.
struct Recheck {
    known: Arc<PatientLookup>,
    through_line: u64,
    /// The earlier load's rejects: line, rule and every failure.
    rejected: HashSet<(u64, String, String)>,
    /// CSV: only the records that can come out otherwise are mapped again.
    again: Option<Again>,
}

/// Of the earlier load's records (up to its last line), the ones a load
/// against the grown patients may map otherwise: those it refused naming
/// an unknown patient. Every other record names a patient the source
/// already had (with the same birth date) or none, and its row or reject
/// is the earlier load's, so its reject is kept as written.
#[derive(Default)]
struct Again {
    lines: HashSet<u64>,
    /// The earlier load's rejects of the other records.
    kept: Vec<RecordBatch>,
}

impl Recheck {
    /// Whether the record on `line` is mapped tonight.
    fn maps(&self, line: u64) -> bool {
        line > self.through_line || self.again.as_ref().is_none_or(|a| a.lines.contains(&line))
    }

    /// The rows of `batch` not staged before.
    fn new_rows(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let err = |message: &str| WardError::Data {
            context: "checking a file again against grown patients",
            path: PathBuf::new(),
            source: message.to_string().into(),
        };
        let ids = batch
            .column_by_name("source_patient_id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| err("no source_patient_id column"))?;
        let lines = batch
            .column_by_name("source_line")
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
            .ok_or_else(|| err("no source_line column"))?;
        let keep: BooleanArray = (0..batch.num_rows())
            .map(|i| {
                // A row without a patient did not depend on them: staged
                // before unless appended.
                Some(
                    lines.value(i) > self.through_line
                        || (ids.is_valid(i) && !self.known.contains_key(ids.value(i))),
                )
            })
            .collect();
        datafusion::arrow::compute::filter_record_batch(batch, &keep)
            .map_err(|e| err(&e.to_string()))
    }

    /// `rejects` split into those the earlier load made too (each row
    /// refused the same way) and tonight's own.
    fn split<'r>(&self, rejects: &'r [RejectRow]) -> (Vec<&'r RejectRow>, Vec<&'r RejectRow>) {
        rejects.iter().partition(|r| {
            r.line <= self.through_line
                && self
                    .rejected
                    .contains(&(r.line, r.rule.to_string(), r.errors.clone()))
        })
    }
}

impl<'w> Staged<'w> {
    fn new(wh: &'w Warehouse, input: &'w Input, fingerprint: Option<&str>, dry_run: bool) -> Self {
        let mut h = Sha256::new();
        for part in [
            input.rel.as_str(),
            input.sha256.as_str(),
            input.rules_hash(),
            fingerprint.unwrap_or(""),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        Staged {
            wh,
            source: &input.source.name,
            batch_id: hex::encode(&h.finalize()[..8]),
            fingerprint: fingerprint.map(str::to_string),
            dry_run,
            files: Vec::new(),
            births: PatientLookup::default(),
            error: None,
            recheck: None,
        }
    }

    /// Writes accepted rows of `table` (keeping patients' birth dates).
    fn write(&mut self, table: Table, mut batch: RecordBatch) -> Result<()> {
        if table == Table::Patient {
            add_birth_dates(&batch, &mut self.births);
        } else if let Some(recheck) = &self.recheck {
            batch = recheck.new_rows(&batch)?;
        }
        if self.dry_run || batch.num_rows() == 0 {
            return Ok(());
        }
        let written = self.file(table).and_then(|f| f.write(&batch));
        written.map_err(|e| {
            let message = format!("stopped: {e}");
            self.error = Some(e);
            WardError::Data {
                context: "staging accepted rows",
                path: PathBuf::new(),
                source: message.into(),
            }
        })
    }

    fn file(&mut self, table: Table) -> Result<&mut ParquetFile> {
        let at = match self.files.iter().position(|(t, _)| *t == table) {
            Some(at) => at,
            None => {
                let path = self
                    .wh
                    .staging_dir(table, self.source)
                    .join(format!("{}.parquet", self.batch_id));
                let file = self.wh.staging_writer(&path, table)?;
                self.files.push((table, file));
                self.files.len() - 1
            }
        };
        Ok(&mut self.files[at].1)
    }

    /// Publishes the staged files; their paths relative to the warehouse.
    fn close(&mut self) -> Result<Vec<String>> {
        self.files.sort_by_key(|(t, _)| *t);
        self.files
            .drain(..)
            .map(|(_, file)| {
                let relative = self.wh.relative(file.path());
                file.finish().map(|()| relative)
            })
            .collect()
    }
}

/// Runs ingest for every source, in order, into the warehouse at `warehouse`.
pub fn ingest(
    warehouse: &Path,
    sources: &[SourceConfig],
    opts: &IngestOptions,
    progress: &dyn Progress,
) -> Result<IngestReport> {
    let wh = Warehouse::new(warehouse);
    let mut report = IngestReport::default();
    let mut state = open_state(&wh, opts, &mut report)?;
    let mappings: Vec<Option<CsvMapping>> = sources
        .iter()
        .map(|s| s.mapping.as_deref().map(CsvMapping::load).transpose())
        .collect::<Result<_>>()?;
    let candidates = list_files(sources, &mappings, &mut report);
    let inputs = classify(hash_all(candidates, &state), &state, &mut report);

    let (patient_inputs, fact_inputs): (Vec<&Input>, Vec<&Input>) =
        inputs.iter().partition(|i| i.first_phase());
    let to_load: Vec<&Input> = patient_inputs
        .iter()
        .copied()
        .filter(|i| needs_load(opts, &state, i, None))
        .collect();
    progress.set_total(to_load.len() as u64);

    // Phase 1: patients, published before the facts load (their birth
    // dates stay in the lookups the facts are checked against).
    let no_patients = SourcePatients::default();
    let mut patient_results = load_all(&wh, &to_load, opts, &no_patients, progress, |_, r| r)
        .into_iter()
        .map(|(input, result)| Ok((input, result?)))
        .collect::<Result<Vec<_>>>()?;
    let patients = source_patients(
        sources,
        &state,
        &wh,
        opts,
        &fact_inputs,
        &mut patient_results,
    )?;
    let patient_done = patient_results
        .into_iter()
        .map(|(input, result)| Ok((input, finish(input, result, None, opts))))
        .collect::<Result<Vec<_>>>()?;

    // Phase 2: facts, checked against the patients. Each file is published
    // as soon as it is mapped, so a night holds the files in flight (one
    // per core), not the whole extract.
    let fact_load: Vec<&Input> = fact_inputs
        .iter()
        .copied()
        .filter(|i| needs_load(opts, &state, i, patients.fingerprints.get(&i.source.name)))
        .collect();
    progress.set_total((to_load.len() + fact_load.len()) as u64);
    let fact_done = load_all(
        &wh,
        &fact_load,
        opts,
        &patients,
        progress,
        |input, result| {
            let fingerprint = patients.fingerprints.get(&input.source.name).cloned();
            Ok(finish(input, result?, fingerprint, opts))
        },
    )
    .into_iter()
    .map(|(input, done)| Ok((input, done?)))
    .collect::<Result<Vec<_>>>()?;

    // Report and record.
    let loaded_names: HashSet<(&str, &str)> = to_load
        .iter()
        .chain(&fact_load)
        .map(|i| (i.source.name.as_str(), i.rel.as_str()))
        .collect();
    // An unchanged file's stat is recorded anew (touched, copied back, or
    // first seen by a version that records it): the next night need not
    // read it.
    let mut restat = false;
    for input in &inputs {
        if !loaded_names.contains(&(input.source.name.as_str(), input.rel.as_str())) {
            tracing::debug!(source = %input.source.name, file = %input.rel, "unchanged");
            let known = &state.sources[&input.source.name][&input.rel];
            report.files.push(FileReport::unchanged(input, known));
            if input.stat.is_some() && known.stat != input.stat {
                let known = state
                    .sources
                    .get_mut(&input.source.name)
                    .and_then(|files| files.get_mut(&input.rel))
                    .expect("just read");
                known.stat = input.stat;
                restat = true;
            }
        }
    }
    let mut superseded = std::mem::take(&mut state.superseded);
    for (input, (file_report, new)) in patient_done.into_iter().chain(fact_done) {
        if let Some(new) = new {
            record(&mut state, &mut superseded, input, new);
        }
        report.files.push(file_report);
    }
    // A file loaded again into a batch of the same name (same content,
    // rules and patients: after the state's version changed) is no longer
    // superseded.
    let listed: BTreeSet<String> = state.all_outputs().into_iter().collect();
    superseded.retain(|o| !listed.contains(o));
    if !opts.dry_run && (restat || !loaded_names.is_empty() || !superseded.is_empty()) {
        wh.save_state(&state)?;
        wh.remove(&superseded)?;
    }
    report
        .files
        .sort_by(|a, b| (&a.source, &a.file).cmp(&(&b.source, &b.file)));
    Ok(report)
}

/// Records a published file in the state; the outputs of its previous
/// load that it no longer writes join `superseded`.
fn record(state: &mut IngestState, superseded: &mut Vec<String>, input: &Input, new: FileState) {
    let files = state.sources.entry(input.source.name.clone()).or_default();
    if let Some(old) = files.insert(input.rel.clone(), new) {
        let current = &files[&input.rel].outputs;
        superseded.extend(old.outputs.into_iter().filter(|o| !current.contains(o)));
    }
}

/// The ingest state (empty for a dry run), after removing the files an
/// interrupted run left behind.
fn open_state(
    wh: &Warehouse,
    opts: &IngestOptions,
    report: &mut IngestReport,
) -> Result<IngestState> {
    if opts.dry_run {
        return Ok(IngestState::default());
    }
    let state = wh.load_state()?;
    report.orphans_removed = wh.remove_unlisted(&state)?;
    if report.orphans_removed > 0 {
        tracing::warn!(
            files = report.orphans_removed,
            "removed files left by an interrupted run"
        );
    }
    Ok(state)
}

/// Every input file of every source, with the source's mapping; reports the
/// files the sources' globs matched but ignore, and the sources that could
/// not be listed.
fn list_files<'a>(
    sources: &'a [SourceConfig],
    mappings: &'a [Option<CsvMapping>],
    report: &mut IngestReport,
) -> Vec<(&'a SourceConfig, Option<&'a CsvMapping>, PathBuf)> {
    let mut candidates = Vec::new();
    for (source, mapping) in sources.iter().zip(mappings) {
        match source.input_files() {
            Ok((files, ignored)) => {
                candidates.extend(files.into_iter().map(|p| (source, mapping.as_ref(), p)));
                for (path, reason) in ignored {
                    let file = relative_name(source, &path);
                    tracing::warn!(source = %source.name, file = %file, "ignored: {reason}");
                    report.files.push(FileReport::new(
                        &source.name,
                        &file,
                        None,
                        FileStatus::Ignored,
                        Some(reason.to_string()),
                    ));
                }
            }
            Err(e) => {
                tracing::error!(source = %source.name, "{e}");
                report.source_failures.push(SourceFailure {
                    source: source.name.clone(),
                    message: e.to_string(),
                });
            }
        }
    }
    candidates
}

/// A listed file with its content's SHA-256 and, when settled, its stat
/// (or why it could not be read).
type Hashed<'a> = (
    &'a SourceConfig,
    Option<&'a CsvMapping>,
    PathBuf,
    Result<(String, Option<FileStat>)>,
);

/// Hashes the files in parallel.
fn hash_all<'a>(
    candidates: Vec<(&'a SourceConfig, Option<&'a CsvMapping>, PathBuf)>,
    state: &IngestState,
) -> Vec<Hashed<'a>> {
    candidates
        .into_par_iter()
        .map(|(source, mapping, path)| {
            // Taken before reading: a change while it is read makes the
            // next night's stat differ, so the file is read again then.
            let stat = FileStat::of_settled(&path);
            let known = state
                .file(&source.name, &relative_name(source, &path))
                .filter(|f| stat.is_some() && f.stat == stat);
            let sha = match known {
                Some(f) => Ok(f.sha256.clone()),
                None => crate::warehouse::sha256_file(&path).map(|(hash, _)| hash),
            };
            (source, mapping, path, sha.map(|sha| (sha, stat)))
        })
        .collect()
}

/// Sorts the hashed files into the inputs to consider, reporting those
/// that failed to hash, match no mapping entry or repeat another file's
/// content (loaded before, or earlier in this run).
fn classify<'a>(
    hashed: Vec<Hashed<'a>>,
    state: &IngestState,
    report: &mut IngestReport,
) -> Vec<Input<'a>> {
    let mut inputs: Vec<Input> = Vec::new();
    for (source, mapping, path, sha) in hashed {
        let rel = relative_name(source, &path);
        let file_report = |status, detail: Option<String>| {
            FileReport::new(&source.name, &rel, None, status, detail)
        };
        let (sha, stat) = match sha {
            Ok(s) => s,
            Err(e) => {
                report
                    .files
                    .push(file_report(FileStatus::Failed, Some(e.to_string())));
                continue;
            }
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = match (source.format, mapping) {
            (SourceFormat::Csv, Some(mapping)) => match mapping.entry_for(&name) {
                Some(entry) => FileKind::Csv(mapping, entry),
                None => {
                    tracing::warn!(source = %source.name, file = %rel, "no mapping entry matches this file; skipped");
                    report.files.push(file_report(FileStatus::Unmapped, None));
                    continue;
                }
            },
            (SourceFormat::FhirNdjson, _) => FileKind::Ndjson,
            (SourceFormat::FhirBundle, _) => FileKind::Bundle,
            (SourceFormat::Csv, None) => unreachable!("config requires a mapping for csv"),
        };
        if let Some(twin) = same_content(state, &inputs, &source.name, &rel, &sha) {
            tracing::info!(source = %source.name, file = %rel, same_as = %twin, "same content as a loaded file; skipped");
            report.files.push(file_report(
                FileStatus::Duplicate,
                Some(format!("same content as {twin}")),
            ));
            continue;
        }
        inputs.push(Input {
            source,
            kind,
            earlier: state.file(&source.name, &rel).cloned(),
            path,
            rel,
            sha256: sha,
            stat,
        });
    }
    inputs
}

/// Another file of the source with content `sha`: one already loaded, or
/// one earlier in this run.
fn same_content(
    state: &IngestState,
    inputs: &[Input],
    source: &str,
    rel: &str,
    sha: &str,
) -> Option<String> {
    state
        .sources
        .get(source)
        .into_iter()
        .flatten()
        .find(|(other, f)| *other != rel && f.sha256 == sha)
        .map(|(other, _)| other.clone())
        .or_else(|| {
            inputs
                .iter()
                .find(|i| i.source.name == source && i.sha256 == sha)
                .map(|i| i.rel.clone())
        })
}

/// Whether the file must be (re)loaded: always in a dry run, else when its
/// content, its rules or (for facts) its source's patients changed.
fn needs_load(
    opts: &IngestOptions,
    state: &IngestState,
    input: &Input,
    fingerprint: Option<&String>,
) -> bool {
    opts.dry_run
        || state
            .sources
            .get(&input.source.name)
            .and_then(|files| files.get(&input.rel))
            .is_none_or(|f| {
                f.sha256 != input.sha256
                    || f.mapping_sha256 != input.rules_hash()
                    || f.patients_fingerprint.as_ref() != fingerprint
            })
}

/// The sources' accepted patients after phase 1, per source name.
#[derive(Default)]
struct SourcePatients {
    /// Patients to check the source's facts against.
    lookups: HashMap<String, PatientLookup>,
    /// A hash of the source's patient files (names and contents): fact files
    /// checked against other patients are reloaded.
    fingerprints: HashMap<String, String>,
    /// Sources whose patients only grew tonight (every earlier patient is
    /// still there with the same birth date): the fingerprint their fact
    /// files were checked against and those earlier patients. A fact file
    /// checked against them is checked again, but only the rows it did not
    /// stage then are staged ([`recheck`]).
    grown: HashMap<String, (String, Arc<PatientLookup>)>,
}

/// Gathers each source's patients, from the patient files just loaded
/// (taking their birth dates) and (unless a dry run) from staging for the
/// others. Only sources with fact files to load tonight (of `facts`) have
/// their patients gathered; every source's patient files are fingerprinted.
fn source_patients(
    sources: &[SourceConfig],
    state: &IngestState,
    wh: &Warehouse,
    opts: &IngestOptions,
    facts: &[&Input],
    patient_results: &mut [(&Input, Result<Loaded>)],
) -> Result<SourcePatients> {
    let mut out = SourcePatients::default();
    for source in sources {
        let earlier_files = || {
            state
                .sources
                .get(&source.name)
                .into_iter()
                .flatten()
                .filter(|(_, f)| f.table == Table::Patient.name())
        };
        let before: BTreeMap<String, String> = earlier_files()
            .map(|(rel, f)| (rel.clone(), f.sha256.clone()))
            .collect();
        let mut files = before.clone();
        let mut fresh: Vec<_> = patient_results
            .iter_mut()
            .filter(|(i, r)| i.source.name == source.name && r.is_ok())
            .collect();
        for (input, _) in &fresh {
            if input.table() == Table::Patient.name() {
                files.insert(input.rel.clone(), input.sha256.clone());
            }
        }
        if files.is_empty() {
            continue;
        }
        let fingerprint = patients_fingerprint(&files);
        let wanted = facts.iter().any(|i| {
            i.source.name == source.name && needs_load(opts, state, i, Some(&fingerprint))
        });
        out.fingerprints.insert(source.name.clone(), fingerprint);
        if !wanted {
            continue;
        }
        let mut lookup = PatientLookup::default();
        if !opts.dry_run {
            // Patient files unchanged, failed to reload or with patients
            // appended: their (earlier) birth dates come from staging.
            for (rel, f) in earlier_files() {
                let loaded_whole = fresh
                    .iter()
                    .any(|(i, r)| i.rel == *rel && r.as_ref().is_ok_and(|l| l.base.is_none()));
                if !loaded_whole {
                    for out in f.outputs.iter().filter(|o| o.starts_with("staging/")) {
                        read_birth_dates(&wh.root().join(out), &mut lookup)?;
                    }
                }
            }
        }
        for (input, result) in &mut fresh {
            if let Ok(loaded) = result
                && input.table() == Table::Patient.name()
            {
                let births = std::mem::take(&mut loaded.births);
                if lookup.is_empty() {
                    lookup = births;
                } else {
                    lookup.extend(births);
                }
            }
        }
        if !opts.dry_run && !before.is_empty() && before != files {
            // The patients the facts were checked against: every patient
            // file's earlier staged rows (still there until the state is
            // saved).
            let mut earlier = PatientLookup::default();
            for (_, f) in earlier_files() {
                for out in f.outputs.iter().filter(|o| o.starts_with("staging/")) {
                    read_birth_dates(&wh.root().join(out), &mut earlier)?;
                }
            }
            if earlier
                .iter()
                .all(|(id, birth)| lookup.get(id) == Some(birth))
            {
                out.grown.insert(
                    source.name.clone(),
                    (patients_fingerprint(&before), Arc::new(earlier)),
                );
            }
        }
        out.lookups.insert(source.name.clone(), lookup);
    }
    Ok(out)
}

/// A hash of a source's patient files: relative name → content SHA-256.
fn patients_fingerprint(files: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (rel, sha) in files {
        h.update(rel.as_bytes());
        h.update([0]);
        h.update(sha.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Maps `inputs` in parallel (checked against `patients`), handing each
/// file's outcome (see [`load_file`]) to `then` on the thread that loaded it.
fn load_all<'a, T: Send>(
    wh: &Warehouse,
    inputs: &[&'a Input<'a>],
    opts: &IngestOptions,
    patients: &SourcePatients,
    progress: &dyn Progress,
    then: impl Fn(&'a Input<'a>, Result<Result<Loaded>>) -> T + Sync,
) -> Vec<(&'a Input<'a>, T)> {
    inputs
        .par_iter()
        .map(|input| {
            let source = &input.source.name;
            let mut staged = Staged::new(
                wh,
                input,
                patients.fingerprints.get(source).map(String::as_str),
                opts.dry_run,
            );
            let result = load_file(
                input,
                opts,
                patients.lookups.get(source),
                patients.grown.get(source),
                &mut staged,
            );
            progress.advance(1);
            (*input, then(input, result))
        })
        .collect()
}

/// A loaded file's report and, unless a dry run, its published state: a
/// file that failed to load is reported as failed (the night goes on); a
/// failed write fails the ingest.
fn finish(
    input: &Input,
    result: Result<Loaded>,
    fingerprint: Option<String>,
    opts: &IngestOptions,
) -> (FileReport, Option<FileState>) {
    let loaded = match result {
        Err(e) => {
            tracing::error!(source = %input.source.name, file = %input.rel, "{e}");
            let failed = FileReport::of_input(input, FileStatus::Failed, Some(e.to_string()));
            return (failed, None);
        }
        Ok(loaded) => loaded,
    };
    let file_report = FileReport::loaded(input, &loaded, opts);
    tracing::info!(
        source = %input.source.name,
        file = %input.rel,
        table = input.table(),
        read = loaded.read,
        accepted = file_report.rows_accepted,
        rejected = file_report.rows_rejected,
        "mapped"
    );
    let new = (!opts.dry_run).then(|| file_state(input, loaded, fingerprint));
    (file_report, new)
}

/// Loads one file, writing its accepted rows and rejects to `staged` as it
/// goes: `Ok(Err(_))` when the file cannot be loaded (reported; the night
/// goes on), `Err(_)` when what it loaded could not be written (the ingest
/// fails).
fn load_file(
    input: &Input,
    opts: &IngestOptions,
    patients: Option<&PatientLookup>,
    grown: Option<&(String, Arc<PatientLookup>)>,
    staged: &mut Staged,
) -> Result<Result<Loaded>> {
    let result = map_file(input, opts, patients, grown, staged);
    if let Some(e) = staged.error.take() {
        return Err(e);
    }
    let Ok(mut loaded) = result else {
        return Ok(result);
    };
    if !staged.dry_run {
        loaded.outputs = staged.close()?;
        // A file checked again keeps the rejects its earlier load made
        // apart from tonight's: tonight's rows are the rows that changed.
        let (kept, tonight) = match &staged.recheck {
            Some(recheck) => recheck.split(&loaded.rejects),
            None => (Vec::new(), loaded.rejects.iter().collect()),
        };
        let unmapped = staged
            .recheck
            .as_ref()
            .and_then(|r| r.again.as_ref())
            .map_or(&[][..], |a| &a.kept[..]);
        for (rejects, earlier, suffix) in [(kept, unmapped, "-kept"), (tonight, &[][..], "")] {
            if let Some(path) = write_rejects(staged, input, &rejects, earlier, suffix)? {
                loaded.outputs.push(path);
            }
        }
    }
    loaded.batch_id = std::mem::take(&mut staged.batch_id);
    loaded.births = std::mem::take(&mut staged.births);
    Ok(Ok(loaded))
}

/// Reads and maps one file, its accepted rows to `staged`.
fn map_file(
    input: &Input,
    opts: &IngestOptions,
    patients: Option<&PatientLookup>,
    grown: Option<&(String, Arc<PatientLookup>)>,
    staged: &mut Staged,
) -> Result<Loaded> {
    let read =
        || std::fs::read(&input.path).map_err(|e| WardError::io("cannot read", &input.path, e));
    let mut ctx = RowContext {
        path: &input.path,
        source: &input.source.name,
        file: &input.rel,
        today: opts.today,
        patients: None,
    };
    let loaded = match input.kind {
        FileKind::Csv(mapping, entry) => {
            let file = std::fs::File::open(&input.path)
                .map_err(|e| WardError::io("cannot open", &input.path, e))?;
            let mut reader = csv::CsvReader::open(&input.path, csv::Extract::File(file), mapping)?;
            let unused: Vec<&str> = reader
                .header()
                .iter()
                .map(String::as_str)
                .filter(|h| !entry.columns().any(|c| c == *h))
                .collect();
            if !unused.is_empty() {
                tracing::debug!(file = %input.rel, columns = %unused.join(", "), "columns not used by the mapping");
            }
            if entry.table != Table::Patient {
                ctx.patients = patients;
            }
            let mut loaded = Loaded {
                bytes: Some(reader.size()),
                ..Loaded::default()
            };
            let base = (!opts.dry_run)
                .then(|| appended_after(input, staged.fingerprint.as_deref(), reader.size()))
                .transpose()?
                .flatten();
            if let Some((_, lines)) = &base {
                tracing::info!(source = %input.source.name, file = %input.rel, after_line = lines, "records appended: only they are read");
            }
            let rechecked = match (&base, grown) {
                (None, Some(grown)) if !opts.dry_run && entry.table != Table::Patient => {
                    recheck(input, grown, Some(reader.size()), staged)?
                }
                _ => None,
            };
            let mut patient_ids = rows::PatientIds::default();
            let slice = opts.slice_records.unwrap_or(CSV_SLICE).max(1);
            while let Some(text) = reader.next_slice(slice)? {
                // The earlier records are read (they are what appended
                // records may repeat) but mapped again only when they may
                // come out otherwise.
                let text = match (&base, &staged.recheck) {
                    (Some((_, lines)), _) => {
                        // Patients: the ids of the rows loaded before stay
                        // taken (`duplicate_patient_id`).
                        if entry.table == Table::Patient
                            && let Some(before) = text.only(|line| line <= *lines)
                        {
                            rows::note_patient_ids(&before, entry, &ctx, &mut patient_ids)?;
                        }
                        text.only(|line| line > *lines)
                    }
                    (None, Some(recheck)) => text.only(|line| recheck.maps(line)),
                    (None, None) => Some(text),
                };
                let Some(text) = text else { continue };
                let mapped = rows::map_rows(&text, entry, &ctx, &mut patient_ids)?;
                loaded.read += text.records();
                loaded.accepted += mapped.accepted() as u64;
                for b in mapped.batches {
                    staged.write(entry.table, b)?;
                }
                loaded.rejects.extend(mapped.rejects);
                for (k, n) in mapped.flagged {
                    *loaded.flagged.entry(k).or_default() += n;
                }
            }
            loaded.base = base.map(|(b, _)| b).or(rechecked);
            loaded
        }
        FileKind::Ndjson | FileKind::Bundle => {
            let rechecked = match grown {
                Some(grown)
                    if !opts.dry_run
                        && matches!(input.kind, FileKind::Ndjson)
                        && !ndjson_is_patients(&input.path) =>
                {
                    recheck(input, grown, None, staged)?
                }
                _ => None,
            };
            let mut sink = |table, batch| staged.write(table, batch);
            let f = if let FileKind::Bundle = input.kind {
                fhir::load_bundle(&input.path, &read()?, &ctx, &mut sink)?
            } else {
                let check = if ndjson_is_patients(&input.path) {
                    fhir::PatientCheck::Off
                } else {
                    patients.map_or(fhir::PatientCheck::Off, fhir::PatientCheck::Against)
                };
                let file = std::fs::File::open(&input.path)
                    .map_err(|e| WardError::io("cannot open", &input.path, e))?;
                fhir::load_ndjson(
                    &input.path,
                    std::io::BufReader::with_capacity(1 << 20, file),
                    &ctx,
                    check,
                    &mut sink,
                )?
            };
            Loaded {
                accepted: f.accepted,
                skipped: f.skipped,
                flagged: f.flagged,
                read: f.read,
                rejects: f.rejects,
                base: rechecked,
                ..Loaded::default()
            }
        }
    };
    let (read, accepted, rejected, skipped) = (
        loaded.read,
        loaded.accepted,
        loaded.rejects.len() as u64,
        loaded.skipped_total(),
    );
    if accepted + rejected + skipped != read {
        return Err(WardError::Extract {
            path: input.path.clone(),
            line: None,
            message: format!(
                "counts do not reconcile: read {read}, accepted {accepted}, rejected {rejected}, skipped {skipped}"
            ),
        });
    }
    Ok(loaded)
}

/// When the CSV file `input` (`len` bytes) is its last load's file
/// with records appended, that load's state and the file's lines then: its
/// first bytes are the ones loaded (same size and SHA-256, ending a line),
/// under the same rules and patients (`fingerprint`), and no record of them
/// was cut off by an unbalanced quote (which appended bytes could close).
/// The records after those lines are then all that needs loading; the
/// earlier ones stay staged.
fn appended_after(
    input: &Input,
    fingerprint: Option<&str>,
    len: u64,
) -> Result<Option<(FileState, u64)>> {
    let Some(earlier) = input.earlier.as_ref() else {
        return Ok(None);
    };
    let Some(n) = earlier.bytes.filter(|n| (1..len).contains(n)) else {
        return Ok(None);
    };
    let same_load = earlier.mapping_sha256 == input.rules_hash()
        && earlier.patients_fingerprint.as_deref() == fingerprint;
    if !same_load {
        return Ok(None);
    }
    Ok(lines_loaded(input, earlier, n)?.map(|lines| (earlier.clone(), lines)))
}

/// The lines of `input`'s first `n` bytes, when they are the file its
/// `earlier` load read (same SHA-256, ending a line) and no record of them
/// was cut off by an unbalanced quote (which appended bytes could close).
fn lines_loaded(input: &Input, earlier: &FileState, n: u64) -> Result<Option<u64>> {
    use std::io::Read;
    if earlier.rejects_by_rule.contains_key("malformed_record") {
        return Ok(None);
    }
    let cannot = |e| WardError::io("cannot read", &input.path, e);
    let mut prefix = std::fs::File::open(&input.path).map_err(cannot)?.take(n);
    let (mut sha, mut lines, mut last) = (Sha256::new(), 0u64, 0u8);
    let mut buf = vec![0; 1 << 20];
    loop {
        let k = prefix.read(&mut buf).map_err(cannot)?;
        let Some(&end) = buf[..k].last() else { break };
        sha.update(&buf[..k]);
        lines += buf[..k].iter().filter(|b| **b == b'\n').count() as u64;
        last = end;
    }
    if prefix.limit() > 0 || last != b'\n' || hex::encode(sha.finalize()) != earlier.sha256 {
        return Ok(None);
    }
    Ok(Some(lines))
}

/// When the fact file `input` (`len` bytes, for CSV) was last loaded, under
/// the same rules, against the patients its source had before they grew
/// (`grown`: their fingerprint and those patients) — the same file, or
/// (CSV) with records appended — it is checked again against tonight's
/// patients, but its earlier staged files stay: they hold the same rows a
/// load now would stage for the earlier patients (each keeps its birth
/// date), and `staged` writes only the others (rows of new patients, once
/// rejected as unknown, and appended records). Returns the earlier load to
/// build on: its staged files and, for CSV, its counts but for the records
/// mapped again ([`Again`]); for NDJSON, read whole, none of its counts.
fn recheck(
    input: &Input,
    grown: &(String, Arc<PatientLookup>),
    len: Option<u64>,
    staged: &mut Staged,
) -> Result<Option<FileState>> {
    let Some(earlier) = input.earlier.as_ref() else {
        return Ok(None);
    };
    if earlier.mapping_sha256 != input.rules_hash()
        || earlier.patients_fingerprint.as_ref() != Some(&grown.0)
    {
        return Ok(None);
    }
    let through_line = if earlier.sha256 == input.sha256 {
        u64::MAX
    } else {
        match (earlier.bytes, len) {
            (Some(n), Some(len)) if (1..len).contains(&n) => {
                match lines_loaded(input, earlier, n)? {
                    Some(lines) => lines,
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        }
    };
    // CSV files map only the records that can come out otherwise
    // ([`Again`]); the others keep the earlier load's outcome and counts.
    let selective = len.is_some();
    let (mut rejected, mut again) = (HashSet::new(), Again::default());
    let mut base = FileState {
        outputs: earlier
            .outputs
            .iter()
            .filter(|o| o.starts_with("staging/"))
            .cloned()
            .collect(),
        ..earlier.clone()
    };
    for out in earlier.outputs.iter().filter(|o| o.starts_with("rejects/")) {
        let path = staged.wh.root().join(out);
        for b in crate::warehouse::read_parquet(&path, "reading a file's earlier rejects")? {
            if b.schema().fields() != rejects_schema().fields() {
                return Ok(None);
            }
            let text = |name: &str| {
                b.column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            };
            let lines = b
                .column_by_name("line")
                .and_then(|c| c.as_any().downcast_ref::<UInt64Array>());
            let (Some(lines), Some(rules), Some(errors)) = (lines, text("rule"), text("errors"))
            else {
                return Ok(None);
            };
            let mut keep = Vec::with_capacity(b.num_rows());
            for i in 0..b.num_rows() {
                let (line, rule, errors) = (lines.value(i), rules.value(i), errors.value(i));
                let unknown = errors.split("; ").any(|e| e.ends_with(": unknown_patient"));
                keep.push(!unknown);
                if unknown && selective {
                    again.lines.insert(line);
                    base.rows_read = base.rows_read.saturating_sub(1);
                    base.rows_rejected = base.rows_rejected.saturating_sub(1);
                    if let Some(n) = base.rejects_by_rule.get_mut(rule) {
                        *n -= 1;
                        if *n == 0 {
                            base.rejects_by_rule.remove(rule);
                        }
                    }
                }
                rejected.insert((line, rule.to_string(), errors.to_string()));
            }
            if selective {
                let keep = BooleanArray::from(keep);
                again.kept.push(
                    datafusion::arrow::compute::filter_record_batch(&b, &keep).map_err(|e| {
                        WardError::data("reading a file's earlier rejects", &path, e)
                    })?,
                );
            }
        }
    }
    tracing::info!(
        source = %input.source.name,
        file = %input.rel,
        again = selective.then_some(again.lines.len()),
        "the source's patients grew: checked again, staging only the rows not staged before"
    );
    staged.recheck = Some(Recheck {
        known: grown.1.clone(),
        through_line,
        rejected,
        again: selective.then_some(again),
    });
    if !selective {
        // The file is read whole: none of the earlier counts stand.
        base = FileState {
            rows_read: 0,
            rows_accepted: 0,
            rows_rejected: 0,
            rows_skipped: 0,
            rejects_by_rule: BTreeMap::new(),
            values_flagged: BTreeMap::new(),
            ..base
        };
    }
    Ok(Some(base))
}

/// Writes a file's rejects (if any) — `rejects` and the rows of `earlier`,
/// reject batches of the file written before, in line order — to
/// `<batch><suffix>.parquet` of its source's rejects; returns the path
/// written, relative to the warehouse.
fn write_rejects(
    staged: &Staged,
    input: &Input,
    rejects: &[&RejectRow],
    earlier: &[RecordBatch],
    suffix: &str,
) -> Result<Option<String>> {
    if rejects.is_empty() && earlier.iter().all(|b| b.num_rows() == 0) {
        return Ok(None);
    }
    let path = staged
        .wh
        .rejects_dir(&input.source.name)
        .join(format!("{}{suffix}.parquet", staged.batch_id));
    let mut batch = rejects_batch(
        &input.source.name,
        &input.rel,
        input.table(),
        rejects,
        &path,
    )?;
    if !earlier.is_empty() {
        use datafusion::arrow::compute;
        let err = |e| WardError::data("writing rejects", &path, e);
        let all = compute::concat_batches(&rejects_schema(), earlier.iter().chain([&batch]))
            .map_err(err)?;
        let line = all.column_by_name("line").expect("the rejects schema");
        let order = compute::sort_to_indices(line, None, None).map_err(err)?;
        batch = compute::take_record_batch(&all, &order).map_err(err)?;
    }
    staged.wh.write_parquet(&path, rejects_schema(), &[batch])?;
    Ok(Some(staged.wh.relative(&path)))
}

/// A published file's state entry.
fn file_state(input: &Input, mut loaded: Loaded, fingerprint: Option<String>) -> FileState {
    let base = loaded.base.take();
    let mut state = FileState {
        sha256: input.sha256.clone(),
        stat: input.stat,
        bytes: loaded.bytes,
        mapping_sha256: input.rules_hash().to_string(),
        patients_fingerprint: fingerprint,
        table: input.table().to_string(),
        rows_read: loaded.read,
        rows_accepted: loaded.accepted,
        rows_rejected: loaded.rejects.len() as u64,
        rows_skipped: loaded.skipped_total(),
        rejects_by_rule: loaded.rejects.iter().fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.rule.to_string()).or_default() += 1;
            m
        }),
        skipped_by_type: loaded.skipped,
        values_flagged: loaded.flagged,
        batch_id: loaded.batch_id,
        outputs: loaded.outputs,
        loaded_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    // Appended records: the earlier load's files and counts, and theirs.
    if let Some(base) = base {
        let mut outputs = base.outputs;
        outputs.append(&mut state.outputs);
        state.outputs = outputs;
        state.rows_read += base.rows_read;
        state.rows_accepted += base.rows_accepted;
        state.rows_rejected += base.rows_rejected;
        state.rows_skipped += base.rows_skipped;
        for (k, n) in base.rejects_by_rule {
            *state.rejects_by_rule.entry(k).or_default() += n;
        }
        for (k, n) in base.values_flagged {
            *state.values_flagged.entry(k).or_default() += n;
        }
    }
    state
}

fn rejects_batch(
    source: &str,
    file: &str,
    table: &str,
    rejects: &[&RejectRow],
    path: &Path,
) -> Result<RecordBatch> {
    let n = rejects.len();
    let constant = |v: &str| Arc::new(StringArray::from(vec![v; n])) as Arc<dyn Array>;
    let strings = |f: &dyn Fn(&RejectRow) -> Option<&str>| {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        rejects.iter().for_each(|r| b.append_option(f(r)));
        Arc::new(b.finish()) as Arc<dyn Array>
    };
    let mut lines = UInt64Builder::with_capacity(n);
    rejects.iter().for_each(|r| lines.append_value(r.line));
    RecordBatch::try_new(
        rejects_schema(),
        vec![
            constant(source),
            constant(file),
            Arc::new(lines.finish()),
            Arc::new(
                rejects
                    .iter()
                    .map(|r| Some(r.table.map_or(table, |t| t.name())))
                    .collect::<StringArray>(),
            ),
            strings(&|r| r.column.as_deref()),
            strings(&|r| Some(r.rule)),
            strings(&|r| Some(&r.message)),
            strings(&|r| Some(&r.errors)),
            strings(&|r| Some(&r.raw)),
        ],
    )
    .map_err(|e| WardError::data("building rejects", path, e))
}

/// A source's accepted patients: id → birth date (`None`: unknown, the
/// patient was kept without one).
/// (ahash: a lookup per fact row; ids are the provider's, not an attacker's.)
pub(crate) type PatientLookup = HashMap<String, Option<NaiveDate>, ahash::RandomState>;

pub(crate) fn add_birth_dates(batch: &RecordBatch, lookup: &mut PatientLookup) {
    let (Some(ids), Some(births)) = (
        batch
            .column_by_name("source_patient_id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>()),
        batch
            .column_by_name("birth_date")
            .and_then(|c| c.as_any().downcast_ref::<Date32Array>()),
    ) else {
        return;
    };
    for i in 0..batch.num_rows() {
        let birth = births
            .is_valid(i)
            .then(|| births.value_as_date(i))
            .flatten();
        lookup.insert(ids.value(i).to_string(), birth);
    }
}

fn read_birth_dates(path: &Path, lookup: &mut PatientLookup) -> Result<()> {
    for batch in crate::warehouse::read_parquet(path, "reading staged patients")? {
        add_birth_dates(&batch, lookup);
    }
    Ok(())
}

/// A file's path relative to the fixed (glob-free) part of its source's pattern.
fn relative_name(source: &SourceConfig, path: &Path) -> String {
    path.strip_prefix(source.base_dir())
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}
