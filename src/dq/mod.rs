//! The data-quality scorecard: a catalogue of checks (`queries/checks/`),
//! each a SQL query counting, per source, the rows that violate it and the
//! rows it checked; compared with a threshold (status) and with the same
//! source's earlier runs (drift).
//!
//! Checks read what ingest kept of every source — the staged rows
//! (`staging_<table>`) and the refused ones (`rejects`) — and this run's
//! record → person links (`person_link`), plus views made for them:
//!
//! - `dq_rows(source, table_name, accepted, rejected)`: rows per source and
//!   table, the refused included (a reject-rule check's denominator);
//! - `dq_layout(source, table_name, column_name)`: the columns each source's
//!   layout fills (its mapping's fields; every column for FHIR), so that a
//!   completeness check asks only what the source's layout promises;
//! - `dq_facts(source, table_name, source_patient_id, source_encounter_id,
//!   event_date)`: every fact of every table with its day.
//!
//! Outputs hold counts only — never a patient value.

pub mod catalog;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, UInt64Array,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::prelude::{SessionConfig, SessionContext};
use serde::{Deserialize, Serialize};

pub use catalog::{Category, Check, Severity, Subcategory, catalog};

use crate::error::{Result, WardError};
use crate::ingest::{SourceConfig, SourceFormat};
use crate::schema::Table;
use crate::warehouse::Warehouse;

/// Drift settings and a site's own thresholds (`[dq]` in ward.toml).
#[derive(Debug, Clone, PartialEq)]
pub struct DqOptions {
    /// A rate that moves more than this many percentage points from its
    /// baseline is drift (a check may set its own).
    pub drift_tolerance_pct: f64,
    /// The baseline is the median rate of the source's last this many
    /// published runs.
    pub drift_runs: usize,
    /// Tonight's rows (those loaded in this run; of a file that grew, its
    /// appended records) are judged on their own too, once a check has at
    /// least this many of them to check: a change in a new delivery shows
    /// the night it arrives, not diluted by every row staged before.
    pub min_new_rows: u64,
    /// Per check id: the site's threshold and severity, over the catalogue's
    /// (`[dq.checks.<id>]`).
    pub overrides: BTreeMap<String, CheckOverride>,
}

impl Default for DqOptions {
    fn default() -> Self {
        DqOptions {
            drift_tolerance_pct: 5.0,
            drift_runs: 7,
            min_new_rows: 20,
            overrides: BTreeMap::new(),
        }
    }
}

/// A site's setting of one check (`[dq.checks.<id>]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckOverride {
    pub threshold_pct: Option<f64>,
    pub severity: Option<Severity>,
}

impl DqOptions {
    /// Applies the overrides to `checks`; an override of no check is an
    /// error naming it (a typo must not leave a check at its default).
    pub fn apply(&self, checks: &mut [Check]) -> std::result::Result<(), String> {
        for (id, o) in &self.overrides {
            let check = checks
                .iter_mut()
                .find(|c| &c.id == id)
                .ok_or_else(|| format!("dq.checks.{id}: no check '{id}' in queries/checks/"))?;
            if let Some(t) = o.threshold_pct {
                check.threshold_pct = t;
            }
            if let Some(s) = o.severity {
                check.severity = s;
            }
        }
        Ok(())
    }
}

/// A check's outcome on one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// At or below the threshold.
    Pass,
    /// Above the threshold of a `fail` check: the night fails.
    Fail,
    /// Above the threshold of a `warn` check.
    Warn,
    /// Above the threshold of an `info` check.
    Info,
    /// The source has no row the check applies to.
    NoData,
}

impl Status {
    /// The status as written in the outputs (`pass`, `no_data`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Warn => "warn",
            Status::Info => "info",
            Status::NoData => "no_data",
        }
    }
}

/// One check on one source: the row of `dq.{json,csv,parquet}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub check: String,
    pub category: Category,
    pub subcategory: Option<Subcategory>,
    pub table: Option<String>,
    pub column: Option<String>,
    pub source: String,
    pub severity: Severity,
    pub threshold_pct: f64,
    pub violating: u64,
    pub checked: u64,
    /// `violating / checked` in %; `None` when nothing was checked.
    pub rate_pct: Option<f64>,
    /// The same check on tonight's rows only (the files loaded in this run).
    pub new_violating: u64,
    pub new_checked: u64,
    /// `new_violating / new_checked` in %, when there were at least
    /// [`DqOptions::min_new_rows`] of them.
    pub new_rate_pct: Option<f64>,
    /// Judged on the rate, or on tonight's rate when it is worse.
    pub status: Status,
    /// The median rate of the source's previous runs (`None`: no history).
    pub baseline_pct: Option<f64>,
    pub drift_tolerance_pct: f64,
    /// The rate, or tonight's rate, is more than the tolerance away from
    /// the baseline.
    pub drift: bool,
    pub description: String,
}

/// One check's rate on one source in a published run (kept in the run
/// history for drift and trends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DqRate {
    pub check: String,
    pub source: String,
    pub rate_pct: f64,
}

impl DqRate {
    /// The rates of `results` that were measured.
    pub fn of(results: &[CheckResult]) -> Vec<DqRate> {
        results
            .iter()
            .filter_map(|r| {
                Some(DqRate {
                    check: r.check.clone(),
                    source: r.source.clone(),
                    rate_pct: r.rate_pct?,
                })
            })
            .collect()
    }
}

/// Which staged rows are tonight's.
#[derive(Debug, Clone, PartialEq)]
pub enum Tonight {
    /// Every staged file was loaded in this run (a first night, a full
    /// reload): tonight's counts are the counts, computed once.
    Everything,
    /// The staged and rejected Parquet files this run wrote
    /// (warehouse-relative; of a file that grew, those of its appended
    /// records): empty when nothing new came.
    Staged(BTreeSet<String>),
}

/// The files of `outputs` (warehouse-relative staged and rejected Parquet
/// files) per check input they hold rows of: `staging_<table>`, `rejects`.
pub fn inputs<'a>(
    outputs: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, BTreeSet<&'a str>> {
    let mut out: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for o in outputs {
        let mut parts = o.split('/');
        let input = match (parts.next(), parts.next()) {
            (Some("staging"), Some(table)) => format!("staging_{table}"),
            (Some("rejects"), Some(_)) => "rejects".to_string(),
            _ => continue,
        };
        out.entry(input).or_default().insert(o);
    }
    out
}

/// How a source's check input (`staging_<table>`, `rejects`,
/// `person_link`) differs from what the kept counts counted; an input not
/// listed is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The same files and tonight's: only rows were added.
    Grew,
    /// Files were replaced or removed.
    Changed,
}

/// The counts of the current run that tonight can keep: its results, and
/// per source the inputs that changed since (`staging_<table>` and
/// `rejects`: the source's files; `person_link`: the links). Valid when the
/// checks and their settings are the current run's, since every check
/// counts a source from its own staged rows and rejects and the person
/// links: a check keeps a source's counts when nothing it reads changed,
/// adds tonight's counts to them when it is [`Check::per_row`] and what it
/// reads only grew, and counts the source again otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Kept<'a> {
    pub results: &'a [CheckResult],
    /// Per source, its changed inputs; a source not listed is unchanged.
    pub changes: &'a BTreeMap<String, BTreeMap<String, Change>>,
}

impl Kept<'_> {
    /// Of the kept results, per check and source, how many `checks` keep,
    /// add tonight's counts to, and count again.
    pub fn recounts(&self, checks: &[Check]) -> Recounts {
        let mut out = Recounts::default();
        for check in checks {
            for r in self.results.iter().filter(|r| r.check == check.id) {
                *match Recount::of(check, self.changes.get(&r.source)) {
                    Recount::Keep => &mut out.kept,
                    Recount::AddTonight => &mut out.added_to,
                    Recount::Again => &mut out.counted_again,
                } += 1;
            }
        }
        out
    }
}

/// What became of the current run's counts, one per check and source (see
/// [`Kept`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recounts {
    pub kept: u64,
    /// Tonight's counts added (a `per_row` check whose inputs only grew).
    pub added_to: u64,
    pub counted_again: u64,
}

/// What a check does with a source's kept counts (see [`Kept`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recount {
    Keep,
    AddTonight,
    Again,
}

impl Recount {
    fn of(check: &Check, changes: Option<&BTreeMap<String, Change>>) -> Recount {
        let mut read = changes
            .into_iter()
            .flatten()
            .filter(|(input, _)| check.reads.as_ref().is_none_or(|r| r.contains(*input)))
            .peekable();
        if read.peek().is_none() {
            Recount::Keep
        } else if check.per_row && read.all(|(_, c)| *c == Change::Grew) {
            Recount::AddTonight
        } else {
            Recount::Again
        }
    }
}

/// Runs every check over the warehouse's staging and rejects and the
/// run's `core/person_link.parquet`, for every source of `sources` (and any
/// other source a check reports) — once over everything staged, once over
/// tonight's rows (see [`Tonight`]). With `kept`, a source's rows are
/// counted again only by the checks whose inputs changed (see [`Kept`]).
/// `previous` holds the rates of earlier published runs, oldest first.
/// Results are sorted by source, then check.
pub fn evaluate(
    warehouse: &Warehouse,
    sources: &[SourceConfig],
    checks: &[Check],
    previous: &[Vec<DqRate>],
    tonight: &Tonight,
    opts: &DqOptions,
    kept: Option<Kept>,
) -> Result<Vec<CheckResult>> {
    let (all, new) = crate::engine::block_on(async {
        // Everything (or what changed) and tonight's files at once.
        let all = async {
            match kept {
                None => run_checks(&session(warehouse, sources, Rows::All).await?, checks).await,
                Some(kept) => {
                    // The sources that count again the same checks, counted
                    // together: new links make every source count the checks
                    // of the links, not every check the others need again.
                    // A check of the links alone counts every source from
                    // the same rows (the links are not split by source): it
                    // runs once, for every source that needs it, in a session
                    // without staged rows.
                    let again = |i: usize, source: &str| {
                        Recount::of(&checks[i], kept.changes.get(source)) == Recount::Again
                    };
                    let links_only = |c: &Check| {
                        c.reads
                            .as_ref()
                            .is_some_and(|r| r.iter().eq([LINKS].iter()))
                    };
                    let mut groups: BTreeMap<Vec<bool>, BTreeSet<String>> = BTreeMap::new();
                    let mut of_links = vec![false; checks.len()];
                    for source in kept.changes.keys() {
                        let mut own = vec![false; checks.len()];
                        for (i, check) in checks.iter().enumerate() {
                            match (again(i, source), links_only(check)) {
                                (true, true) => of_links[i] = true,
                                (true, false) => own[i] = true,
                                _ => {}
                            }
                        }
                        if own.contains(&true) {
                            groups.entry(own).or_default().insert(source.clone());
                        }
                    }
                    // (checks, sources whose rows are read, whether it is the
                    // checks of the links, whose counts are every source's).
                    let none = BTreeSet::new();
                    let mut runs: Vec<(&Vec<bool>, &BTreeSet<String>, bool)> =
                        groups.iter().map(|(c, s)| (c, s, false)).collect();
                    if of_links.contains(&true) {
                        runs.push((&of_links, &none, true));
                    }
                    let mut counts = vec![Counted::new(); checks.len()];
                    for (recounted, names, every_source) in runs {
                        let recount: Vec<Check> = checks
                            .iter()
                            .zip(recounted)
                            .filter(|(_, again)| **again)
                            .map(|(c, _)| c.clone())
                            .collect();
                        tracing::debug!(
                            checks = recount.len(),
                            sources = names.len(),
                            "data-quality counts taken again"
                        );
                        let ctx = session(warehouse, sources, Rows::Sources(names)).await?;
                        let counted = run_checks(&ctx, &recount).await?;
                        let at = recounted
                            .iter()
                            .enumerate()
                            .filter(|(_, a)| **a)
                            .map(|(i, _)| i);
                        for (i, counted) in at.zip(counted) {
                            counts[i].extend(counted.into_iter().filter(
                                |(s, _)| match every_source {
                                    true => again(i, s),
                                    false => names.contains(s),
                                },
                            ));
                        }
                    }
                    Ok(counts)
                }
            }
        };
        let new = async {
            match tonight {
                Tonight::Staged(files) if !files.is_empty() => {
                    // Only the checks that read tonight's rows: the others
                    // would count none (none for every source).
                    let rows = inputs(files.iter().map(String::as_str));
                    let at: Vec<usize> = (0..checks.len())
                        .filter(|i| reads_any(&checks[*i], &rows))
                        .collect();
                    let reading: Vec<Check> = at.iter().map(|i| checks[*i].clone()).collect();
                    let ctx = session(warehouse, sources, Rows::Staged(files)).await?;
                    let mut counts = vec![Counted::new(); checks.len()];
                    for (i, counted) in at.into_iter().zip(run_checks(&ctx, &reading).await?) {
                        counts[i] = counted;
                    }
                    Ok(Some(counts))
                }
                _ => Ok(None),
            }
        };
        let (all, new): (Counts, Option<Counts>) = futures::try_join!(all, new)?;
        let new = match tonight {
            Tonight::Everything => all.clone(),
            Tonight::Staged(_) => new.unwrap_or_default(),
        };
        let all = match kept {
            Some(kept) => keep_counts(checks, all, &new, kept),
            None => all,
        };
        Ok((all, new))
    })?;
    Ok(judge(sources, checks, &all, &new, previous, opts))
}

/// Whether `check` reads any of the rows of `tonight` (check inputs, see
/// [`inputs`]): what it reads of the staged rows, the rejects and the
/// links, the views over them included, holds some of them (`dq_layout`,
/// the sources' layouts, holds no rows of anyone's). A check whose
/// inputs are unknown reads them.
fn reads_any(check: &Check, tonight: &BTreeMap<String, BTreeSet<&str>>) -> bool {
    let rows = |t: &&String| t.starts_with("staging_") || *t == "rejects" || *t == LINKS;
    check.reads.as_ref().is_none_or(|r| {
        let mut read = r.iter().filter(rows).peekable();
        read.peek().is_none() || read.any(|t| tonight.contains_key(t))
    })
}

/// Per check, each source's counts: kept, kept plus tonight's (`new`), or
/// counted again (`counted`), as [`Recount::of`] says.
fn keep_counts(checks: &[Check], counted: Counts, new: &[Counted], kept: Kept) -> Counts {
    checks
        .iter()
        .zip(counted)
        .enumerate()
        .map(|(i, (check, counted))| {
            let how = |source: &str| Recount::of(check, kept.changes.get(source));
            let tonight = |source: &str| {
                new.get(i)
                    .and_then(|n| n.get(source))
                    .copied()
                    .unwrap_or_default()
            };
            let mut out: Counted = counted
                .into_iter()
                .filter(|(source, _)| how(source) == Recount::Again)
                .collect();
            for r in kept.results.iter().filter(|r| r.check == check.id) {
                let (v, c) = match how(&r.source) {
                    Recount::Keep => (0, 0),
                    Recount::AddTonight => tonight(&r.source),
                    Recount::Again => continue,
                };
                out.insert(r.source.clone(), (r.violating + v, r.checked + c));
            }
            // A source with no counts before: tonight's are all it has.
            for source in kept.changes.keys() {
                if how(source) == Recount::AddTonight && !out.contains_key(source) {
                    out.insert(source.clone(), tonight(source));
                }
            }
            out
        })
        .collect()
}

/// The results of the run whose `earlier` results these are, judged again
/// against tonight's history and options: what [`evaluate`] gives when
/// nothing was staged or linked since (the counts are the same) and no
/// file was loaded tonight.
pub fn reevaluate(
    sources: &[SourceConfig],
    checks: &[Check],
    earlier: &[CheckResult],
    previous: &[Vec<DqRate>],
    opts: &DqOptions,
) -> Vec<CheckResult> {
    let all: Vec<Counted> = checks
        .iter()
        .map(|check| {
            earlier
                .iter()
                .filter(|r| r.check == check.id)
                .map(|r| (r.source.clone(), (r.violating, r.checked)))
                .collect()
        })
        .collect();
    judge(sources, checks, &all, &[], previous, opts)
}

/// Per source, `(violating, checked)` rows of one check.
type Counted = BTreeMap<String, (u64, u64)>;

/// Scores every check's counts on every source (over everything and over
/// tonight's rows, `new`, empty when nothing came) against its threshold
/// and the rates of the last [`DqOptions::drift_runs`] of `previous`.
fn judge(
    sources: &[SourceConfig],
    checks: &[Check],
    all: &[Counted],
    new: &[Counted],
    previous: &[Vec<DqRate>],
    opts: &DqOptions,
) -> Vec<CheckResult> {
    let recent = &previous[previous.len().saturating_sub(opts.drift_runs)..];
    let mut results = Vec::new();
    for (i, (check, by_source)) in checks.iter().zip(all).enumerate() {
        let names: BTreeSet<&str> = sources
            .iter()
            .map(|s| s.name.as_str())
            .chain(by_source.keys().map(String::as_str))
            .collect();
        for source in names {
            let counts = by_source.get(source).copied().unwrap_or((0, 0));
            let new_counts = new
                .get(i)
                .and_then(|n| n.get(source).copied())
                .unwrap_or((0, 0));
            let history: Vec<f64> = recent
                .iter()
                .filter_map(|run| {
                    run.iter()
                        .find(|r| r.check == check.id && r.source == source)
                        .map(|r| r.rate_pct)
                })
                .collect();
            results.push(score(check, source, counts, new_counts, &history, opts));
        }
    }
    results.sort_by(|a, b| (&a.source, &a.check).cmp(&(&b.source, &b.check)));
    results
}

/// A check's counts on one source — everything staged, and tonight's rows
/// — against its threshold and its history.
fn score(
    check: &Check,
    source: &str,
    (violating, checked): (u64, u64),
    (new_violating, new_checked): (u64, u64),
    history: &[f64],
    opts: &DqOptions,
) -> CheckResult {
    let rate = |v: u64, c: u64| 100.0 * v as f64 / c as f64;
    let rate_pct = (checked > 0).then(|| rate(violating, checked));
    let new_rate_pct = (new_checked > 0 && new_checked >= opts.min_new_rows)
        .then(|| rate(new_violating, new_checked));
    let worst = match (rate_pct, new_rate_pct) {
        (Some(r), Some(n)) => Some(r.max(n)),
        (r, n) => r.or(n),
    };
    let status = match worst {
        None => Status::NoData,
        Some(r) if r <= check.threshold_pct => Status::Pass,
        Some(_) => match check.severity {
            Severity::Fail => Status::Fail,
            Severity::Warn => Status::Warn,
            Severity::Info => Status::Info,
        },
    };
    let baseline_pct = median(history);
    let drift_tolerance_pct = check
        .drift_tolerance_pct
        .unwrap_or(opts.drift_tolerance_pct);
    let drift = baseline_pct.is_some_and(|b| {
        [rate_pct, new_rate_pct]
            .into_iter()
            .flatten()
            .any(|r| (r - b).abs() > drift_tolerance_pct)
    });
    CheckResult {
        check: check.id.clone(),
        category: check.category,
        subcategory: check.subcategory,
        table: check.table.map(|t| t.name().to_string()),
        column: check.column.clone(),
        source: source.to_string(),
        severity: check.severity,
        threshold_pct: check.threshold_pct,
        violating,
        checked,
        rate_pct,
        new_violating,
        new_checked,
        new_rate_pct,
        status,
        baseline_pct,
        drift_tolerance_pct,
        drift,
        description: check.description.clone(),
    }
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Which staged rows and rejects a session's checks count.
#[derive(Debug, Clone, Copy)]
enum Rows<'a> {
    /// Everything staged.
    All,
    /// The rows of these sources, with every person link.
    Sources(&'a BTreeSet<String>),
    /// The rows of these staged and rejected Parquet files
    /// (warehouse-relative), with no person link (linkage is judged as a
    /// whole).
    Staged(&'a BTreeSet<String>),
}

/// The session checks run in (see the module documentation), over `rows`.
async fn session(
    warehouse: &Warehouse,
    sources: &[SourceConfig],
    rows: Rows<'_>,
) -> Result<SessionContext> {
    let root = warehouse.root();
    let ctx = crate::engine::session(SessionConfig::new())?;
    // The files a table (check input `input`) reads: all under its folder
    // `all`, those of the sources' folders (`of`), or tonight's.
    let tonight = match rows {
        Rows::Staged(outputs) => inputs(outputs.iter().map(String::as_str)),
        _ => BTreeMap::new(),
    };
    let files = |all: &Path, input: &str, of: &dyn Fn(&str) -> PathBuf| -> Result<Vec<PathBuf>> {
        Ok(match rows {
            Rows::All => crate::warehouse::parquet_files(all)?,
            Rows::Sources(names) => {
                let mut files = Vec::new();
                for name in names {
                    files.extend(crate::warehouse::parquet_files(&of(name))?);
                }
                files
            }
            Rows::Staged(_) => tonight
                .get(input)
                .into_iter()
                .flatten()
                .map(|o| root.join(o))
                .collect(),
        })
    };
    for table in Table::ALL {
        let all = warehouse.staging_table_dir(table);
        let name = format!("staging_{}", table.name());
        let files = files(&all, &name, &|s| warehouse.staging_dir(table, s))?;
        crate::engine::register_parquet_files(&ctx, &name, &all, files, table.schema())?;
    }
    let all = root.join("rejects");
    let files = files(&all, "rejects", &|s| warehouse.rejects_dir(s))?;
    let schema = crate::schema::rejects_schema();
    crate::engine::register_parquet_files(&ctx, "rejects", &all, files, schema)?;
    let links = crate::schema::person_link_schema();
    let link_path = warehouse.out().join("core").join("person_link.parquet");
    match rows {
        Rows::All | Rows::Sources(_) => {
            crate::engine::register_parquet(&ctx, LINKS, &link_path, links).await?;
        }
        Rows::Staged(_) => register_batch(&ctx, LINKS, RecordBatch::new_empty(links), root)?,
    }
    register_batch(&ctx, "dq_layout", layout(sources)?, root)?;
    // `dq_rows` is a few rows that every reject-rule check reads (twice):
    // counted once per session rather than by each check over every table.
    let err = |e| WardError::data(PREPARING, root, e);
    let rows = ctx.sql(&rows_query()).await.map_err(err)?;
    let schema = rows.schema().inner().clone();
    let counts = rows.collect().await.map_err(err)?;
    crate::engine::register_batches(&ctx, ROWS, schema, counts, root)?;
    crate::engine::collect_about(&ctx, &facts_view(), PREPARING, root).await?;
    Ok(ctx)
}

const PREPARING: &str = "preparing the data-quality checks";

/// The check input of the person links, whole in every session but
/// tonight's (not split by source).
const LINKS: &str = "person_link";

/// Registers one in-memory batch as table `name`.
fn register_batch(ctx: &SessionContext, name: &str, batch: RecordBatch, root: &Path) -> Result<()> {
    crate::engine::register_batches(ctx, name, batch.schema(), vec![batch], root)
}

/// `dq_layout`: the canonical columns each source's layout fills.
fn layout(sources: &[SourceConfig]) -> Result<RecordBatch> {
    let mut rows: Vec<(String, &'static str, &'static str)> = Vec::new();
    for s in sources {
        match (s.format, &s.mapping) {
            (SourceFormat::Csv, Some(path)) => {
                let mapping = crate::mapping::CsvMapping::load(path)?;
                let mut filled = BTreeSet::new();
                for f in &mapping.files {
                    let columns = f.table.columns();
                    for (name, _) in &f.fields {
                        filled.insert((f.table.name(), *name));
                    }
                    if f.value.is_some() {
                        for c in ["value_num", "value_text", "value_code"] {
                            if columns.iter().any(|x| x.name == c) {
                                filled.insert((f.table.name(), c));
                            }
                        }
                    }
                    if !f.codings.is_empty() {
                        filled.insert((f.table.name(), "codings"));
                    }
                }
                rows.extend(filled.into_iter().map(|(t, c)| (s.name.clone(), t, c)));
            }
            _ => {
                for t in Table::ALL {
                    for c in t.columns().iter().filter(|c| c.mappable) {
                        rows.push((s.name.clone(), t.name(), c.name));
                    }
                }
            }
        }
    }
    let sources: StringArray = rows.iter().map(|r| Some(r.0.as_str())).collect();
    let tables: StringArray = rows.iter().map(|r| Some(r.1)).collect();
    let columns: StringArray = rows.iter().map(|r| Some(r.2)).collect();
    RecordBatch::try_new(
        crate::schema::dq_layout_schema(),
        vec![Arc::new(sources), Arc::new(tables), Arc::new(columns)],
    )
    .map_err(|e| WardError::data("listing the sources' layouts", PathBuf::new(), e))
}

/// The name of the table of [`rows_query`].
const ROWS: &str = "dq_rows";

/// `dq_rows` as a view (planning reads the tables through it).
fn rows_view() -> String {
    format!("CREATE VIEW {ROWS} AS {}", rows_query())
}

/// `dq_rows`: accepted and refused rows per source and table.
fn rows_query() -> String {
    let accepted: Vec<String> = Table::ALL
        .iter()
        .map(|t| {
            format!(
                "SELECT source, '{0}' AS table_name, COUNT(*) AS accepted, 0 AS rejected \
                 FROM staging_{0} GROUP BY source",
                t.name()
            )
        })
        .collect();
    format!(
        "SELECT source, table_name, \
         CAST(SUM(accepted) AS BIGINT) AS accepted, CAST(SUM(rejected) AS BIGINT) AS rejected \
         FROM ({} UNION ALL SELECT source, \"table\" AS table_name, 0 AS accepted, \
         COUNT(*) AS rejected FROM rejects GROUP BY source, \"table\") \
         GROUP BY source, table_name",
        accepted.join(" UNION ALL ")
    )
}

/// `dq_facts`: every fact with its patient, encounter and day.
fn facts_view() -> String {
    let facts: Vec<String> = Table::ALL
        .iter()
        .filter_map(|t| {
            let event = *t.event_columns().first()?;
            let encounter = match t.column("source_encounter_id") {
                Some(_) if *t != Table::Encounter => "source_encounter_id",
                _ => "CAST(NULL AS VARCHAR)",
            };
            (*t != Table::Patient).then(|| {
                format!(
                    "SELECT source, '{0}' AS table_name, source_patient_id, \
                     {encounter} AS source_encounter_id, CAST({event} AS DATE) AS event_date \
                     FROM staging_{0}",
                    t.name()
                )
            })
        })
        .collect();
    format!("CREATE VIEW dq_facts AS {}", facts.join(" UNION ALL "))
}

/// Plans every check against empty tables of the session's shape, so that
/// a check whose SQL does not parse, names a table or column that does not
/// exist, or does not return `source`, `violating` and `checked` is a
/// configuration error naming its file and id before any data is read
/// (not after the night's linkage); records the tables each reads
/// ([`Check::reads`]).
pub fn validate(checks: &mut [Check]) -> Result<()> {
    crate::engine::block_on(async {
        // Planning only: never on a cluster.
        let ctx = crate::engine::local_session(SessionConfig::new());
        let root = Path::new("queries/checks");
        let empty = |schema: SchemaRef| RecordBatch::new_empty(schema);
        for table in Table::ALL {
            let name = format!("staging_{}", table.name());
            register_batch(&ctx, &name, empty(table.schema()), root)?;
        }
        register_batch(
            &ctx,
            "rejects",
            empty(crate::schema::rejects_schema()),
            root,
        )?;
        let links = empty(crate::schema::person_link_schema());
        register_batch(&ctx, "person_link", links, root)?;
        let layout = empty(crate::schema::dq_layout_schema());
        register_batch(&ctx, "dq_layout", layout, root)?;
        for view in [rows_view(), facts_view()] {
            crate::engine::collect_about(&ctx, &view, PREPARING, root).await?;
        }
        for check in checks {
            let bad = |m: String| {
                crate::tomlfile::file_error(&check.file, format!("check '{}': {m}", check.id))
            };
            let plan = ctx.sql(&check.sql).await.map_err(|e| bad(e.to_string()))?;
            for column in ["source", "violating", "checked"] {
                if plan.schema().field_with_unqualified_name(column).is_err() {
                    return Err(bad(format!(
                        "returns no '{column}' column (a check returns source, violating, checked)"
                    )));
                }
            }
            let mut reads = BTreeSet::new();
            tables_read(plan.logical_plan(), &mut reads).map_err(|e| bad(e.to_string()))?;
            check.reads = Some(reads);
        }
        Ok(())
    })
}

/// Adds to `out` the tables `plan` scans, those of the views it reads
/// included.
fn tables_read(
    plan: &datafusion::logical_expr::LogicalPlan,
    out: &mut BTreeSet<String>,
) -> datafusion::error::Result<()> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::logical_expr::LogicalPlan;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            match scan.source.get_logical_plan() {
                Some(view) => tables_read(&view, out)?,
                None => {
                    out.insert(scan.table_name.table().to_string());
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(())
}

/// Counts per source of every check, in order.
type Counts = Vec<Counted>;

async fn run_checks(ctx: &SessionContext, checks: &[Check]) -> Result<Counts> {
    use futures::{StreamExt, TryStreamExt};
    // Most checks are small queries whose planning and start-up dominate:
    // a few at a time keep both cores busy. Results stay in check order.
    futures::stream::iter(checks.iter().map(|check| run_check(ctx, check)))
        .buffered(CHECKS_AT_ONCE)
        .try_collect()
        .await
}

/// How many checks [`run_checks`] runs at once.
const CHECKS_AT_ONCE: usize = 4;

/// Runs one check: `(violating, checked)` per source.
async fn run_check(ctx: &SessionContext, check: &Check) -> Result<BTreeMap<String, (u64, u64)>> {
    let start = std::time::Instant::now();
    let batches =
        crate::engine::collect_about(ctx, &check.sql, "running a data-quality check", &check.file)
            .await?;
    let bad = |m: String| WardError::data("running a data-quality check", &check.file, m);
    let mut out = BTreeMap::new();
    for b in &batches {
        let column = |name: &str, to: &DataType| -> Result<ArrayRef> {
            let c = b.column_by_name(name).ok_or_else(|| {
                bad(format!(
                    "check '{}' returns no '{name}' column (a check returns source, violating, checked)",
                    check.id
                ))
            })?;
            cast(c, to).map_err(|e| bad(format!("check '{}': {name}: {e}", check.id)))
        };
        let sources = column("source", &DataType::Utf8)?;
        let violating = column("violating", &DataType::Int64)?;
        let checked = column("checked", &DataType::Int64)?;
        let sources = sources
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("cast");
        let int = |a: &ArrayRef, i: usize| {
            let a = a.as_any().downcast_ref::<Int64Array>().expect("cast");
            if a.is_null(i) { 0 } else { a.value(i) }
        };
        for i in 0..b.num_rows() {
            let (v, c) = (int(&violating, i), int(&checked, i));
            if sources.is_null(i) || v < 0 || v > c {
                return Err(bad(format!(
                    "check '{}' returned a row with no source, or violating rows not between 0 and the rows checked",
                    check.id
                )));
            }
            let source = sources.value(i).to_string();
            if out.insert(source, (v as u64, c as u64)).is_some() {
                return Err(bad(format!(
                    "check '{}' returned a source twice (GROUP BY source)",
                    check.id
                )));
            }
        }
    }
    tracing::debug!(check = %check.id, seconds = start.elapsed().as_secs_f64(), "check ran");
    Ok(out)
}

/// Writes `dq.json`, `dq.csv` and `dq.parquet` into `dir` (a run's
/// `reports/<run_id>/`).
pub fn write(warehouse: &Warehouse, dir: &Path, results: &[CheckResult]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| WardError::io("cannot create", dir, e))?;
    let text = |f: &dyn Fn(&CheckResult) -> Option<&str>| -> ArrayRef {
        Arc::new(results.iter().map(f).collect::<StringArray>())
    };
    let count = |f: fn(&CheckResult) -> u64| -> ArrayRef {
        Arc::new(results.iter().map(|r| Some(f(r))).collect::<UInt64Array>())
    };
    let float = |f: fn(&CheckResult) -> Option<f64>| -> ArrayRef {
        Arc::new(results.iter().map(f).collect::<Float64Array>())
    };
    let schema = crate::schema::dq_schema();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            text(&|r| Some(&r.check)),
            text(&|r| Some(r.category.name())),
            text(&|r| r.subcategory.map(Subcategory::name)),
            text(&|r| r.table.as_deref()),
            text(&|r| r.column.as_deref()),
            text(&|r| Some(&r.source)),
            text(&|r| Some(r.severity.name())),
            float(|r| Some(r.threshold_pct)),
            count(|r| r.violating),
            count(|r| r.checked),
            float(|r| r.rate_pct),
            count(|r| r.new_violating),
            count(|r| r.new_checked),
            float(|r| r.new_rate_pct),
            text(&|r| Some(r.status.name())),
            float(|r| r.baseline_pct),
            float(|r| Some(r.drift_tolerance_pct)),
            Arc::new(
                results
                    .iter()
                    .map(|r| Some(r.drift))
                    .collect::<BooleanArray>(),
            ),
        ],
    )
    .map_err(|e| WardError::data("building the data-quality results", dir, e))?;
    warehouse.write_parquet(&dir.join("dq.parquet"), schema, &[batch])?;
    let json = serde_json::to_vec_pretty(results).expect("results serialize");
    warehouse.publish_bytes(&dir.join("dq.json"), &json)?;
    let path = dir.join("dq.csv");
    let mut csv = csv::Writer::from_writer(Vec::new());
    for r in results {
        csv.serialize(CsvRow::of(r))
            .map_err(|e| WardError::data("writing the data-quality results", &path, e))?;
    }
    let bytes = csv
        .into_inner()
        .map_err(|e| WardError::data("writing the data-quality results", &path, e))?;
    warehouse.publish_bytes(&path, &bytes)
}

/// Reads a run's `dq.json`.
pub fn read(path: &Path) -> Result<Vec<CheckResult>> {
    let text = std::fs::read_to_string(path).map_err(|e| WardError::io("cannot read", path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| WardError::data("reading the data-quality results", path, e))
}

/// A CSV row: the same columns as the Parquet file (the description is in
/// dq.json only).
#[derive(Serialize)]
struct CsvRow<'a> {
    check: &'a str,
    category: &'a str,
    subcategory: &'a str,
    table: &'a str,
    column: &'a str,
    source: &'a str,
    severity: Severity,
    threshold_pct: f64,
    violating: u64,
    checked: u64,
    rate_pct: Option<f64>,
    new_violating: u64,
    new_checked: u64,
    new_rate_pct: Option<f64>,
    status: Status,
    baseline_pct: Option<f64>,
    drift_tolerance_pct: f64,
    drift: bool,
}

impl<'a> CsvRow<'a> {
    fn of(r: &'a CheckResult) -> Self {
        CsvRow {
            check: &r.check,
            category: r.category.name(),
            subcategory: r.subcategory.map_or("", Subcategory::name),
            table: r.table.as_deref().unwrap_or(""),
            column: r.column.as_deref().unwrap_or(""),
            source: &r.source,
            severity: r.severity,
            threshold_pct: r.threshold_pct,
            violating: r.violating,
            checked: r.checked,
            rate_pct: r.rate_pct,
            new_violating: r.new_violating,
            new_checked: r.new_checked,
            new_rate_pct: r.new_rate_pct,
            status: r.status,
            baseline_pct: r.baseline_pct,
            drift_tolerance_pct: r.drift_tolerance_pct,
            drift: r.drift,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(severity: Severity, threshold_pct: f64) -> Check {
        Check {
            id: "c".into(),
            category: Category::Plausibility,
            subcategory: Some(Subcategory::Atemporal),
            table: Some(Table::Observation),
            column: Some("value_num".into()),
            description: String::new(),
            severity,
            threshold_pct,
            drift_tolerance_pct: None,
            sql: String::new(),
            per_row: false,
            reads: None,
            file: PathBuf::new(),
        }
    }

    #[test]
    fn status_follows_threshold_and_severity() {
        let opts = DqOptions::default();
        let s = |sev, v, c| score(&check(sev, 5.0), "a", (v, c), (0, 0), &[], &opts).status;
        assert_eq!(s(Severity::Fail, 5, 100), Status::Pass);
        assert_eq!(s(Severity::Fail, 6, 100), Status::Fail);
        assert_eq!(s(Severity::Warn, 6, 100), Status::Warn);
        assert_eq!(s(Severity::Info, 6, 100), Status::Info);
        assert_eq!(s(Severity::Fail, 0, 0), Status::NoData);
    }

    #[test]
    fn the_shipped_checks_plan_and_a_broken_one_is_named() {
        let queries = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
        let mut shipped = catalog(&queries).unwrap();
        validate(&mut shipped).unwrap();
        // What each reads, through the views.
        let reads = |id: &str| {
            let check = shipped.iter().find(|c| c.id == id).unwrap();
            let reads = check.reads.clone().unwrap();
            reads.into_iter().collect::<Vec<_>>().join(" ")
        };
        assert_eq!(reads("patients_found_nowhere_else"), "person_link");
        assert_eq!(reads("bmi_implausible"), "staging_observation");
        assert_eq!(
            reads("patient_birth_date_missing"),
            "dq_layout staging_patient"
        );
        let facts = reads("facts_encounter_unresolved");
        assert!(
            facts.contains("staging_encounter")
                && facts.contains("staging_observation")
                && !facts.contains("staging_patient"),
            "{facts}"
        );
        let refused = reads("observation_code_invalid");
        assert!(
            refused.contains("rejects") && refused.contains("staging_patient"),
            "{refused}"
        );
        for (sql, expected) in [
            (
                "SELECT source, 1 AS violating, COUNT(*) AS checked FROM staging_nope GROUP BY source",
                "staging_nope",
            ),
            (
                "SELECT source, COUNT(*) AS checked FROM staging_patient GROUP BY source",
                "no 'violating' column",
            ),
            ("SELEC 1", "SELEC"),
        ] {
            let broken = Check {
                sql: sql.into(),
                file: PathBuf::from("queries/checks/x.toml"),
                ..check(Severity::Warn, 1.0)
            };
            let e = validate(&mut [broken]).unwrap_err();
            assert!(e.is_config_error(), "{e}");
            let e = e.to_string();
            assert!(
                e.contains("x.toml") && e.contains("check 'c'") && e.contains(expected),
                "{e}"
            );
        }
    }

    #[test]
    fn a_site_overrides_a_threshold_and_a_typo_is_an_error() {
        let mut checks = [check(Severity::Fail, 5.0)];
        let mut opts = DqOptions::default();
        opts.overrides.insert(
            "c".into(),
            CheckOverride {
                threshold_pct: Some(20.0),
                severity: Some(Severity::Warn),
            },
        );
        opts.apply(&mut checks).unwrap();
        assert_eq!(
            (checks[0].threshold_pct, checks[0].severity),
            (20.0, Severity::Warn)
        );
        opts.overrides.insert(
            "typo".into(),
            CheckOverride {
                threshold_pct: None,
                severity: None,
            },
        );
        assert!(
            opts.apply(&mut checks)
                .unwrap_err()
                .contains("no check 'typo'")
        );
    }

    #[test]
    fn tonight_s_rows_are_judged_once_there_are_enough_of_them() {
        let opts = DqOptions::default();
        let c = check(Severity::Fail, 5.0);
        // A new delivery wholly wrong, diluted in everything staged.
        let r = score(&c, "a", (30, 1000), (30, 30), &[0.0], &opts);
        assert_eq!(r.rate_pct, Some(3.0));
        assert_eq!(r.new_rate_pct, Some(100.0));
        assert_eq!(r.status, Status::Fail);
        assert!(r.drift);
        // Too few new rows to judge: only everything staged counts.
        let r = score(&c, "a", (3, 1000), (3, 3), &[0.0], &opts);
        assert_eq!(
            (r.new_rate_pct, r.status, r.drift),
            (None, Status::Pass, false)
        );
    }

    #[test]
    fn a_source_is_counted_again_only_by_the_checks_whose_inputs_changed() {
        let reading = |per_row: bool, reads: Option<&[&str]>| Check {
            per_row,
            reads: reads.map(|r| r.iter().map(|t| t.to_string()).collect()),
            ..check(Severity::Warn, 1.0)
        };
        let changes = |of: &[(&str, Change)]| -> BTreeMap<String, Change> {
            of.iter().map(|(i, c)| (i.to_string(), *c)).collect()
        };
        let observations = Some(&["staging_observation", "dq_layout"][..]);
        let grew = changes(&[("staging_observation", Change::Grew)]);
        let elsewhere = changes(&[("staging_condition", Change::Changed)]);
        let replaced = changes(&[
            ("staging_observation", Change::Grew),
            ("rejects", Change::Changed),
        ]);
        let of = |c: &Check, ch: &BTreeMap<String, Change>| Recount::of(c, Some(ch));
        assert_eq!(of(&reading(true, observations), &grew), Recount::AddTonight);
        assert_eq!(of(&reading(false, observations), &grew), Recount::Again);
        assert_eq!(of(&reading(false, observations), &elsewhere), Recount::Keep);
        assert_eq!(
            Recount::of(&reading(false, observations), None),
            Recount::Keep
        );
        // Unknown reads are everything.
        assert_eq!(of(&reading(true, None), &elsewhere), Recount::Again);
        assert_eq!(of(&reading(true, None), &grew), Recount::AddTonight);
        let both = Some(&["staging_observation", "rejects"][..]);
        assert_eq!(of(&reading(true, both), &replaced), Recount::Again);
        assert_eq!(
            of(&reading(true, observations), &replaced),
            Recount::AddTonight
        );
    }

    #[test]
    fn drift_compares_with_the_median_of_earlier_runs() {
        let opts = DqOptions::default();
        let c = check(Severity::Info, 100.0);
        let r = score(&c, "a", (50, 100), (0, 0), &[1.0, 2.0, 90.0], &opts);
        assert_eq!(r.baseline_pct, Some(2.0));
        assert!(r.drift);
        let r = score(&c, "a", (4, 100), (0, 0), &[1.0, 2.0, 90.0], &opts);
        assert!(!r.drift, "2 points below the tolerance");
        let r = score(&c, "a", (50, 100), (0, 0), &[], &opts);
        assert!(!r.drift && r.baseline_pct.is_none());
        assert_eq!(median(&[1.0, 3.0]), Some(2.0));
    }

    /// A session over every staged row and reject, or over those of one
    /// parity of their line number (`parity`): two halves of every file.
    async fn half(
        warehouse: &Warehouse,
        sources: &[SourceConfig],
        parity: Option<u8>,
    ) -> SessionContext {
        let ctx = crate::engine::session(SessionConfig::new()).unwrap();
        let root = warehouse.root();
        let where_ = |line: &str| match parity {
            Some(p) => format!("WHERE COALESCE({line}, 0) % 2 = {p}"),
            None => String::new(),
        };
        let mut tables: Vec<(String, PathBuf, SchemaRef, &str)> = Table::ALL
            .iter()
            .map(|t| {
                let name = format!("staging_{}", t.name());
                (
                    name,
                    warehouse.staging_table_dir(*t),
                    t.schema(),
                    "source_line",
                )
            })
            .collect();
        let rejects = crate::schema::rejects_schema();
        tables.push(("rejects".into(), root.join("rejects"), rejects, "line"));
        for (name, dir, schema, line) in tables {
            let files = crate::warehouse::parquet_files(&dir).unwrap();
            let all = format!("all_{name}");
            crate::engine::register_parquet_files(&ctx, &all, &dir, files, schema).unwrap();
            let view = format!("CREATE VIEW {name} AS SELECT * FROM {all} {}", where_(line));
            ctx.sql(&view).await.unwrap();
        }
        let links = RecordBatch::new_empty(crate::schema::person_link_schema());
        register_batch(&ctx, "person_link", links, root).unwrap();
        register_batch(&ctx, "dq_layout", layout(sources).unwrap(), root).unwrap();
        for view in [rows_view(), facts_view()] {
            ctx.sql(&view).await.unwrap();
        }
        ctx
    }

    /// `config`'s sources ingested into a new warehouse (kept while the
    /// directory is).
    fn ingested(config: &crate::config::PipelineConfig) -> (tempfile::TempDir, Warehouse) {
        let wh = tempfile::tempdir().unwrap();
        let opts = crate::ingest::IngestOptions {
            today: chrono::NaiveDate::from_ymd_opt(2026, 1, 31).unwrap(),
            ..Default::default()
        };
        crate::ingest::ingest(wh.path(), &config.sources, &opts, &()).unwrap();
        let warehouse = Warehouse::new(wh.path());
        (wh, warehouse)
    }

    /// The checks of the links count what they say on links made by hand:
    /// records of persons no other source reports, and records of persons
    /// the same source registered more than once.
    #[test]
    fn the_checks_of_the_links_count_persons_by_their_sources() {
        use datafusion::arrow::array::StringArray;
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut checks = catalog(&repo.join("queries")).unwrap();
        validate(&mut checks).unwrap();
        let ids = ["patients_found_nowhere_else", "patients_registered_twice"];
        let checks: Vec<Check> = checks
            .into_iter()
            .filter(|c| ids.contains(&c.id.as_str()))
            .collect();
        assert_eq!(checks.len(), 2);
        // (source, record, person): p1 only at a (twice), p2 at a and b,
        // p3 only at b, p4 at b twice and at c, p5 only at c.
        let links = [
            ("a", "1", "p1"),
            ("a", "2", "p1"),
            ("a", "3", "p2"),
            ("b", "1", "p2"),
            ("b", "2", "p3"),
            ("b", "3", "p4"),
            ("b", "4", "p4"),
            ("c", "1", "p4"),
            ("c", "2", "p5"),
        ];
        let column = |k: usize| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(
                links.iter().map(|l| [l.0, l.1, l.2][k]),
            ))
        };
        let schema = crate::schema::person_link_schema();
        let n = links.len();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                column(0),
                column(1),
                column(2),
                Arc::new(Float64Array::from(vec![None; n])),
                Arc::new(StringArray::from(vec![None::<&str>; n])),
            ],
        )
        .unwrap();
        let counts = crate::engine::block_on(async {
            let ctx = crate::engine::session(SessionConfig::new()).unwrap();
            register_batch(&ctx, LINKS, batch, Path::new("")).unwrap();
            run_checks(&ctx, &checks).await
        })
        .unwrap();
        let of = |i: usize| -> Vec<(&str, (u64, u64))> {
            counts[i].iter().map(|(s, c)| (s.as_str(), *c)).collect()
        };
        assert_eq!(
            of(0),
            [("a", (2, 3)), ("b", (1, 4)), ("c", (1, 2))],
            "{}",
            checks[0].id
        );
        assert_eq!(
            of(1),
            [("a", (2, 3)), ("b", (2, 4)), ("c", (0, 2))],
            "{}",
            checks[1].id
        );
    }

    /// Tonight's counts leave out the checks that read none of tonight's
    /// rows: run over tonight's files, every one of them counts nothing.
    #[test]
    fn checks_that_read_none_of_tonight_s_rows_count_none() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut checks = catalog(&repo.join("queries")).unwrap();
        validate(&mut checks).unwrap();
        let config =
            crate::config::PipelineConfig::load(&repo.join("sample_data/ward.toml")).unwrap();
        let (_wh, warehouse) = ingested(&config);
        // Tonight: one source's patients and rejects.
        let source = "northside_clinic";
        let files: BTreeSet<String> = [
            warehouse.staging_dir(Table::Patient, source),
            warehouse.rejects_dir(source),
        ]
        .iter()
        .flat_map(|d| crate::warehouse::parquet_files(d).unwrap())
        .map(|f| warehouse.relative(&f))
        .collect();
        let rows = inputs(files.iter().map(String::as_str));
        assert_eq!(rows.len(), 2, "{rows:?}");
        let (read, skipped): (Vec<Check>, Vec<Check>) =
            checks.into_iter().partition(|c| reads_any(c, &rows));
        assert!(read.iter().any(|c| c.id == "patient_birth_date_missing"));
        assert!(skipped.iter().any(|c| c.id == "bmi_implausible"));
        assert!(
            skipped
                .iter()
                .any(|c| c.id == "patients_found_nowhere_else")
        );
        let counts = crate::engine::block_on(async {
            let ctx = session(&warehouse, &config.sources, Rows::Staged(&files)).await?;
            run_checks(&ctx, &skipped).await
        })
        .unwrap();
        for (check, counted) in skipped.iter().zip(counts) {
            assert!(
                counted.values().all(|c| *c == (0, 0)),
                "{}: {counted:?}",
                check.id
            );
        }
    }

    #[test]
    fn per_row_checks_add_up_over_two_halves_of_every_file() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut checks = catalog(&repo.join("queries")).unwrap();
        validate(&mut checks).unwrap();
        assert!(checks.iter().filter(|c| c.per_row).count() >= 30);
        let bad = tempfile::tempdir().unwrap();
        std::fs::write(
            bad.path().join("ward.toml"),
            format!(
                "warehouse = \"wh\"\nmeasurement_period = {{ start = 2025-01-01, end = 2025-12-31 }}\n\
                 [[sources]]\nname = \"bad\"\nformat = \"csv\"\npath = \"{0}/csv/*.csv\"\n\
                 mapping = \"{0}/mapping.toml\"\n\
                 [[sources]]\nname = \"bad_fhir\"\nformat = \"fhir-ndjson\"\npath = \"{0}/fhir/*.ndjson\"\n",
                repo.join("tests/fixtures/dq_bad").display()
            ),
        )
        .unwrap();
        let (mut apart, mut counted) = (BTreeSet::new(), BTreeSet::new());
        for config in [
            repo.join("sample_data/ward.toml"),
            bad.path().join("ward.toml"),
        ] {
            let config = crate::config::PipelineConfig::load(&config).unwrap();
            let (_wh, warehouse) = ingested(&config);
            let counts = |parity| {
                crate::engine::block_on(async {
                    run_checks(&half(&warehouse, &config.sources, parity).await, &checks).await
                })
                .unwrap()
            };
            let (all, even, odd) = (counts(None), counts(Some(0)), counts(Some(1)));
            for (i, check) in checks.iter().enumerate() {
                let sources: BTreeSet<&String> = all[i].keys().chain(even[i].keys()).collect();
                let sum = |s: &String| {
                    let (a, b) = (even[i].get(s).copied(), odd[i].get(s).copied());
                    let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
                    (a.0 + b.0, a.1 + b.1)
                };
                let adds_up = sources
                    .iter()
                    .all(|s| all[i].get(*s).copied().unwrap_or_default() == sum(s));
                if check.per_row {
                    assert!(
                        adds_up,
                        "{}: {:?} {:?} {:?}",
                        check.id, all[i], even[i], odd[i]
                    );
                    if all[i].values().any(|c| c.1 > 0) {
                        counted.insert(check.id.clone());
                    }
                } else if !adds_up {
                    apart.insert(check.id.clone());
                }
            }
        }
        let idle: Vec<&str> = checks
            .iter()
            .filter(|c| c.per_row && !counted.contains(&c.id))
            .map(|c| c.id.as_str())
            .collect();
        assert!(idle.is_empty(), "no row to check: {idle:?}");
        // The split sees what rows do together: checks that compare rows
        // do not add up over it.
        for id in ["observation_repeated", "facts_encounter_unresolved"] {
            assert!(apart.contains(id), "{id}: {apart:?}");
        }
    }
}
