//! Linkage: which source patient records are the same person.
//!
//! 1. Standardize demographics ([`standardize`]).
//! 2. Block: candidate pairs from several rules, unioned, computed as
//!    DataFusion self-joins (so the same plan can run distributed).
//! 3. Compare each pair field by field and weigh it with a Fellegi–Sunter
//!    model fitted without labels ([`model`]).
//! 4. Cluster pairs above the threshold, strongest first, never merging two
//!    clusters that already hold a record of the same source (a provider
//!    lists a person once), so one bad link cannot chain unrelated people.
//! 5. Write `core/person_link` and `core/person`; [`build`] then writes the
//!    core fact tables with `person_id`.

pub mod build;
pub mod model;
pub mod standardize;
pub mod state;

use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use chrono::NaiveDate;
use compact_str::{CompactString, ToCompactString};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Float64Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder, UInt32Array,
};
use datafusion::arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef};
use datafusion::prelude::SessionConfig;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{BoxError, Result, WardError};
use crate::warehouse::Warehouse;
use model::{Model, Rec};

/// Linkage settings (`[link]` in the config).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkOptions {
    /// Minimum match probability of a pair to link it.
    pub threshold: f64,
    /// Records of one source are merged into one person (a provider that
    /// registered a patient twice) only by a pair at least this probable;
    /// `None`: never (each provider lists a person once).
    pub within_source_threshold: Option<f64>,
    /// Weigh pairs whose given names differ while the rest of a family
    /// agrees (twins) by a household level of their own instead of field by
    /// field (see [`Model::fit`]).
    pub household: bool,
    /// How each field is compared ([`model::default_comparisons`];
    /// `[[link.comparison]]` in the config replaces them column by column).
    pub comparisons: Vec<model::Comparison>,
    /// Candidate pairs at least this probable but under `threshold` (and
    /// pairs above it that the same-source rule refused) are listed for
    /// clerical review.
    pub review_threshold: f64,
    /// Decisions of a reviewer (`labels = "labels.csv"`): pairs that are the
    /// same person are linked whatever their weight, pairs that are not are
    /// never put in one person (see [`read_labels`]).
    pub labels: Option<std::path::PathBuf>,
    /// Blocking rules `(name, predicate)`, unioned: a pair of records `a`,
    /// `b` is compared when any predicate holds (SQL over the columns of
    /// [`BLOCKING_COLUMNS`]; `[[link.blocking]]` in the config replaces the
    /// defaults, [`default_blocking`]).
    pub blocking: Vec<(String, String)>,
    /// Random record pairs used to estimate u probabilities.
    pub u_pairs: usize,
    /// Seed of the random pairs (linkage is deterministic for one seed).
    pub seed: u64,
    /// The model is kept between runs ([`Earlier`]) until the patient
    /// records grew or shrank by this share of those it was fitted on; then
    /// it is fitted anew.
    pub refit_growth: f64,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            threshold: 0.9,
            within_source_threshold: Some(0.99),
            household: true,
            comparisons: model::default_comparisons(),
            review_threshold: 0.5,
            labels: None,
            blocking: default_blocking(),
            u_pairs: 1_000_000,
            seed: 1,
            refit_growth: 0.1,
        }
    }
}

/// A blocking rule producing more candidate pairs than this many per record
/// is named in the report's warnings (a key too common to block on).
const EXPLOSIVE_PAIRS_PER_RECORD: u64 = 50;

/// What linkage did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LinkReport {
    pub records: u64,
    pub candidate_pairs: u64,
    /// Candidate pairs per blocking rule (a pair counts for the first rule
    /// that found it).
    pub pairs_by_rule: BTreeMap<String, u64>,
    /// Pairs at or above the threshold.
    pub accepted_pairs: u64,
    /// Candidate pairs weighed by the household level: given names differ;
    /// family name, address or phone and the birth date agree (twins, or one
    /// person's records with a wholly different given name).
    #[serde(default)]
    pub household_pairs: u64,
    /// The share of matches the model learned among those pairs (how much
    /// the household level alone says for a link).
    #[serde(default)]
    pub household_match_share: f64,
    /// Accepted pairs not applied because both clusters already held a
    /// record of the same source and the pair was not probable enough to
    /// merge within a source (`within_source_threshold`).
    pub refused_merges: u64,
    /// Merges of two clusters holding records of one source (within-source
    /// duplicates).
    #[serde(default)]
    pub within_source_merges: u64,
    /// Records without a usable birth date (kept, linked on the rest).
    #[serde(default)]
    pub records_without_birth_date: u64,
    /// Persons none of whose records has a usable birth date: measures
    /// that need an age leave them out.
    #[serde(default)]
    pub persons_without_birth_date: u64,
    /// Records per compared field that have no value for it (a field no
    /// record fills gives no evidence).
    #[serde(default)]
    pub records_missing: BTreeMap<String, u64>,
    /// Blocking rules whose pairs exploded, fields without values, labels
    /// naming records that are not staged.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Reviewer decisions applied: pairs linked because labelled the same
    /// person, merges refused because labelled different persons.
    #[serde(default)]
    pub labelled_links: u64,
    #[serde(default)]
    pub labelled_refusals: u64,
    /// Pairs written to `core/link_review.csv`.
    #[serde(default)]
    pub review_pairs: u64,
    pub persons: u64,
    /// Persons with records at more than one source.
    pub linked_persons: u64,
    /// Persons who kept their id from the previous run's links.
    #[serde(default)]
    pub ids_carried_forward: u64,
    pub em_iterations: usize,
    /// Estimated share of matches among candidate pairs.
    pub prior: f64,
    /// Whether the model was fitted tonight or kept, and whether every
    /// record was blocked or only the new ones.
    #[serde(default)]
    pub mode: LinkMode,
    /// Records blocked tonight (all, or the new ones against all).
    #[serde(default)]
    pub blocked_records: u64,
    /// Records the model was fitted on.
    #[serde(default)]
    pub model_records: u64,
    /// Records of the previous run's links that are gone or now belong to
    /// another person (`None`: there were none). At 0 the core rows of
    /// every earlier fact keep their person: the build may take and append
    /// to the previous run's core tables.
    #[serde(default)]
    pub links_changed: Option<u64>,
}

/// One source patient record's person.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonLink {
    pub source: CompactString,
    pub source_patient_id: CompactString,
    pub person_id: CompactString,
    /// Weight of the link that joined the record to its person (none for a
    /// person's first record).
    pub match_weight: Option<f64>,
    /// Blocking rule that found that link.
    pub rule: Option<CompactString>,
}

/// Record → person assignment.
#[derive(Debug, Clone)]
pub struct Linkage {
    pub report: LinkReport,
    /// One per staged patient record, in (source, id) order.
    pub links: Vec<PersonLink>,
    /// The persons whose records changed: of each earlier record that is
    /// gone or belongs to another person now, its person before and now.
    /// Their core rows are built again; every other person's stay.
    pub relinked: BTreeSet<String>,
}

/// Blocking rules: a pair is compared when any of them holds (keys on
/// standardized values; a missing value matches nothing). Besides the birth
/// date, they block on identifiers, contact details, names (also swapped)
/// and postcode or address, so records without a birth date, or of layouts
/// without one, still meet their matches.
const BLOCKING_RULES: [(&str, &str); 10] = [
    (
        "birth_date+family_initial",
        "a.dob = b.dob AND a.family_initial = b.family_initial",
    ),
    (
        "birth_date+given_initial",
        "a.dob = b.dob AND a.given_initial = b.given_initial",
    ),
    ("ssn", "a.ssn = b.ssn"),
    ("phone", "a.phone = b.phone"),
    ("email", "a.email = b.email"),
    (
        "given+family_soundex+birth_year",
        "a.given = b.given AND a.family_soundex = b.family_soundex AND a.birth_year = b.birth_year",
    ),
    // Same names, any birth date, only where one has none: with birth
    // dates on both sides the rules above find them, and common names
    // would pair up quadratically at scale.
    (
        "given+family_without_birth_date",
        "a.given = b.given AND a.family = b.family AND (a.dob IS NULL OR b.dob IS NULL)",
    ),
    ("names_swapped", "a.given = b.family AND a.family = b.given"),
    (
        "postcode+family_soundex",
        "a.zip = b.zip AND a.family_soundex = b.family_soundex",
    ),
    ("address", "a.address = b.address"),
];

/// Ward's blocking rules, as [`LinkOptions::blocking`] holds them.
pub fn default_blocking() -> Vec<(String, String)> {
    BLOCKING_RULES
        .iter()
        .map(|(n, on)| (n.to_string(), on.to_string()))
        .collect()
}

/// The standardized columns a blocking rule can compare (as `a.<column>`
/// and `b.<column>`).
pub const BLOCKING_COLUMNS: [&str; 12] = [
    "dob",
    "birth_year",
    "given",
    "given_initial",
    "family",
    "family_initial",
    "family_soundex",
    "ssn",
    "phone",
    "email",
    "zip",
    "address",
];

/// At most this many blocking rules (rule numbers are bytes, one kept for
/// labels).
pub const MAX_BLOCKING_RULES: usize = 200;

/// Checks a blocking predicate: an SQL expression whose column references
/// are all `a.<column>` or `b.<column>` of [`BLOCKING_COLUMNS`], naming both
/// records. Returns what is wrong.
pub fn check_blocking_rule(on: &str) -> std::result::Result<(), String> {
    use datafusion::sql::sqlparser::ast::{Expr, visit_expressions};
    use std::ops::ControlFlow;
    let expr = crate::engine::parse_fragment(on, "an SQL expression", |p| p.parse_expr())?;
    let mut sides = BTreeSet::new();
    let visited = visit_expressions(&expr, |e| match e {
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [side, column]
                if matches!(side.value.as_str(), "a" | "b")
                    && BLOCKING_COLUMNS.contains(&column.value.as_str()) =>
            {
                sides.insert(side.value.clone());
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Break(format!(
                "'{e}' is not a.<column> or b.<column> (columns: {})",
                BLOCKING_COLUMNS.join(", ")
            )),
        },
        Expr::Identifier(i) => {
            ControlFlow::Break(format!("'{i}' names no record: write a.{i} or b.{i}"))
        }
        _ => ControlFlow::Continue(()),
    });
    if let ControlFlow::Break(message) = visited {
        return Err(message);
    }
    if sides.len() < 2 {
        return Err("the rule must compare record a with record b".into());
    }
    Ok(())
}

/// The rule of a link a reviewer's label made.
const LABEL_RULE: u8 = u8::MAX;

/// A blocking rule's name, or `label`.
fn rule_name(rules: &[(String, String)], rule: u8) -> &str {
    rules.get(rule as usize).map_or("label", |r| r.0.as_str())
}

/// A reviewer's decisions, as record index pairs `(low, high)`.
#[derive(Debug, Default)]
struct Labels {
    same: Vec<(u32, u32)>,
    different: HashSet<(u32, u32)>,
}

impl Labels {
    /// Whether two clusters (by root) hold records labelled different
    /// persons; `constrained` lists each root's records that have such a
    /// label.
    fn keep_apart(&self, constrained: &HashMap<u32, Vec<u32>>, ra: u32, rb: u32) -> bool {
        let (Some(xs), Some(ys)) = (constrained.get(&ra), constrained.get(&rb)) else {
            return false;
        };
        xs.iter().any(|x| {
            ys.iter()
                .any(|y| self.different.contains(&((*x).min(*y), (*x).max(*y))))
        })
    }
}

/// Reads a labels file: a header, then `source_a,source_patient_id_a,
/// source_b,source_patient_id_b,decision` with decision `match` or
/// `non_match`. Labels naming a record that is not staged are skipped with
/// one warning (records come and go); a malformed line or a pair labelled
/// both ways is a config error naming the line.
fn read_labels(path: &Path, recs: &[Rec], warnings: &mut Vec<String>) -> Result<Labels> {
    let bad = |line: u64, message: String| WardError::Config {
        path: path.to_path_buf(),
        line: Some(line as usize),
        column: None,
        key: None,
        message,
    };
    let mut reader = csv::Reader::from_path(path)
        .map_err(|e| bad(1, format!("cannot read the labels file: {e}")))?;
    let index: HashMap<(&str, &str), u32> = recs
        .iter()
        .enumerate()
        .map(|(i, r)| ((r.source.as_str(), r.source_patient_id.as_str()), i as u32))
        .collect();
    let mut labels = Labels::default();
    let mut seen: HashMap<(u32, u32), bool> = HashMap::new();
    let mut unknown = 0;
    for (n, row) in reader.records().enumerate() {
        let line = n as u64 + 2;
        let row = row.map_err(|e| bad(line, e.to_string()))?;
        if row.len() != 5 {
            return Err(bad(
                line,
                "expected source_a,source_patient_id_a,source_b,source_patient_id_b,decision"
                    .into(),
            ));
        }
        let same = match row[4].trim() {
            "match" => true,
            "non_match" => false,
            _ => return Err(bad(line, "decision must be match or non_match".into())),
        };
        let (Some(&a), Some(&b)) = (
            index.get(&(row[0].trim(), row[1].trim())),
            index.get(&(row[2].trim(), row[3].trim())),
        ) else {
            unknown += 1;
            continue;
        };
        if a == b {
            continue;
        }
        let key = (a.min(b), a.max(b));
        match seen.insert(key, same) {
            Some(before) if before != same => {
                return Err(bad(line, "this pair is also labelled the other way".into()));
            }
            Some(_) => continue,
            None => {}
        }
        if same {
            labels.same.push(key);
        } else {
            labels.different.insert(key);
        }
    }
    if unknown > 0 {
        warnings.push(format!(
            "{unknown} label(s) of {} name records that are not staged: skipped",
            path.display()
        ));
    }
    labels.same.sort_unstable();
    Ok(labels)
}

/// The staged patient records, in (source, id) order, standardized.
fn read_records(warehouse: &Warehouse) -> Result<Vec<Rec>> {
    let recs = records(&Staged::read(warehouse)?);
    tracing::info!(records = recs.len(), "linkage: records standardized");
    Ok(recs)
}

/// The staged patient rows as read, and their (source, id) order.
struct Staged {
    batches: Vec<RecordBatch>,
    rows: Rows,
}

impl Staged {
    /// Reads the staged patients. They are put in order by a sort of their
    /// keys, not of the rows (every column of 1.6M rows copied): the rows
    /// stay where the reader put them.
    fn read(warehouse: &Warehouse) -> Result<Staged> {
        let dir = warehouse.staging_table_dir(crate::schema::Table::Patient);
        let err = |e| WardError::data("reading the staged patients", &dir, e);
        let partitions = crate::engine::block_on(async {
            let ctx = crate::engine::session(SessionConfig::new())?;
            crate::engine::register_staging(&ctx, warehouse).await?;
            ctx.sql(
                "SELECT source, source_patient_id, given_name, family_name, birth_date, \
                 birth_date_partial, sex, race, ethnicity, address_line, state, postal_code, \
                 phone, email, ssn, deceased_date, payer FROM staging_patient",
            )
            .await
            .map_err(err)?
            // Each partition's rows in file order, the partitions in
            // theirs: the same rows come in the same order every time.
            .collect_partitioned()
            .await
            .map_err(err)
        })?;
        let batches: Vec<RecordBatch> = partitions.into_iter().flatten().collect();
        let rows = Rows::of(&batches)?;
        tracing::debug!("linkage: staged patients read");
        Ok(Staged { batches, rows })
    }
}

/// The report's account of the records: how many, and which fields they
/// lack.
fn describe(recs: &[Rec], opts: &LinkOptions) -> LinkReport {
    let mut report = LinkReport {
        records: recs.len() as u64,
        ..LinkReport::default()
    };
    report.records_without_birth_date = recs.iter().filter(|r| r.birth.is_none()).count() as u64;
    for c in &opts.comparisons {
        let name = c.column.name();
        let missing = recs.iter().filter(|r| !r.has(c.column)).count() as u64;
        report.records_missing.insert(name.to_string(), missing);
        if missing == report.records && report.records > 0 {
            report.warnings.push(format!(
                "no record has a usable {name}: it gives no evidence (map it, or check its values)"
            ));
        }
    }
    report
}

/// Candidate pairs per blocking rule (a pair counts for the first rule
/// that found it).
fn pairs_by_rule(pairs: &[(u32, u32, u8)], opts: &LinkOptions) -> BTreeMap<String, u64> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (_, _, rule) in pairs {
        *counts
            .entry(rule_name(&opts.blocking, *rule).to_string())
            .or_default() += 1;
    }
    counts
}

/// Fits the model on the candidate pairs; returns it with each pair's
/// comparison levels (computed once: the model is fitted on them and the
/// pairs are weighed with them).
fn fit(recs: &[Rec], pairs: &[(u32, u32, u8)], opts: &LinkOptions) -> (Model, Vec<model::Levels>) {
    let levels: Vec<model::Levels> = pairs
        .par_iter()
        .map(|&(a, b, _)| model::compare(&opts.comparisons, &recs[a as usize], &recs[b as usize]))
        .collect();
    // EM sessions: every candidate pair that agrees on the birth date, and
    // every one that agrees on the names (whichever rule found it first).
    let session = |agree: &dyn Fn(&Rec, &Rec) -> bool| -> Vec<model::Levels> {
        pairs
            .iter()
            .zip(&levels)
            .filter(|(p, _)| agree(&recs[p.0 as usize], &recs[p.1 as usize]))
            .map(|(_, l)| *l)
            .collect()
    };
    let same_birth = |a: &Rec, b: &Rec| a.birth.is_some() && a.birth == b.birth;
    let same_names = |a: &Rec, b: &Rec| {
        a.given.is_some()
            && a.given == b.given
            && a.family_soundex == b.family_soundex
            && a.birth.map(|d| chrono::Datelike::year(&d))
                == b.birth.map(|d| chrono::Datelike::year(&d))
    };
    let model = Model::fit(
        recs,
        opts,
        &levels,
        &session(&same_birth),
        &session(&same_names),
    );
    tracing::info!(
        prior = model.prior,
        iterations = model.iterations,
        "linkage: model fitted"
    );
    for (f, c) in opts.comparisons.iter().enumerate() {
        tracing::debug!(field = c.column.name(), m = ?model.m[f], u = ?model.u[f], "linkage model");
    }
    (model, levels)
}

/// The files [`link`] writes under `core/`: the links, the persons, the
/// review list and the state a later run links on from ([`state`]).
pub const OUTPUTS: [&str; 6] = [
    "person_link.parquet",
    "person.parquet",
    "link_review.csv",
    state::FILES[0],
    state::FILES[1],
    state::FILES[2],
];

/// What an earlier run's linkage leaves to this one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Earlier<'a> {
    /// Its links: persons keep their ids where their records were already
    /// linked ([`read_person_links`]).
    pub links: &'a [PersonLink],
    /// Its `core/` folder, holding the state [`link`] keeps: the model is
    /// kept from it while it holds for the code and the settings and the
    /// records grew or shrank by less than [`LinkOptions::refit_growth`].
    pub core: Option<&'a Path>,
    /// Fit the model anew even when the kept one would do.
    pub refit: bool,
    /// Take the kept pairs when every kept record is still there unchanged
    /// and block only the new records; otherwise every record is blocked
    /// (a full rebuild).
    pub incremental: bool,
    /// The running code's identity (`runs::Fingerprint::code`): a state is
    /// kept only for the code that wrote it; `None`: nothing is kept.
    pub code: Option<&'a str>,
    /// Its `person.parquet` (checked): when the kept pairs are taken, the
    /// rows of persons whose records did not change are taken from it.
    pub person: Option<&'a Path>,
}

/// How [`link`] went about it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkMode {
    /// The model was fitted tonight; every record was blocked.
    #[default]
    Fitted,
    /// The kept model; every record was blocked again.
    ModelKept,
    /// The kept model and pairs; only the new records were blocked, against
    /// every record.
    Incremental,
}

/// Links the staged patient records and writes `core/person_link.parquet`,
/// `core/person.parquet`, `core/link_review.csv` and the state a later run
/// links on from. Persons keep their ids from `earlier.links` where their
/// records were already linked. With the model and pairs kept in
/// `earlier.core`, the persons are those a linkage of every record with
/// that model finds.
pub fn link(warehouse: &Warehouse, opts: &LinkOptions, earlier: &Earlier) -> Result<Linkage> {
    let key = earlier.code.map(|code| state::key(opts, code));
    // The kept state is read while the records are; they are standardized
    // while they are hashed.
    let (raw, loaded) = rayon::join(
        || Staged::read(warehouse),
        || match (&key, earlier.core) {
            (Some(key), Some(core)) if !earlier.refit => Some(state::load(core, key)),
            _ => None,
        },
    );
    let raw = raw?;
    let (recs, hashes) = rayon::join(|| records(&raw), || state::record_hashes(&raw));
    let hashes = hashes?;
    tracing::info!(records = recs.len(), "linkage: records standardized");
    let mut report = describe(&recs, opts);
    let kept = match loaded {
        Some(Ok(kept)) => kept.filter(|k| {
            let fitted = k.saved.fitted_records as f64;
            let grown = (recs.len() as f64 - fitted).abs() / fitted.max(1.0);
            let keep = grown < opts.refit_growth;
            if !keep {
                tracing::info!(
                    fitted = k.saved.fitted_records,
                    records = recs.len(),
                    "linkage: the records grew past refit_growth since the model was fitted: fitted anew"
                );
            }
            keep
        }),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "the kept linkage state cannot be read: the model is fitted anew");
            report.warnings.push(format!(
                "the kept linkage state cannot be read (the model was fitted anew): {e}"
            ));
            None
        }
        None => None,
    };
    // The records not kept from the earlier linkage (when it was taken).
    let mut not_kept = None;
    // Each record's index among the earlier links, when already known.
    let mut previous_of = None;
    let (model, mut considered, fitted_records, by_rule) = match kept {
        Some(kept) => {
            let model = Model::from_params(&opts.comparisons, kept.saved.model.clone()).map_err(
                |message| {
                    WardError::data(
                        "reading the linkage state",
                        earlier.core.unwrap_or(Path::new("")).join(state::FILES[0]),
                        message,
                    )
                },
            )?;
            let carried = earlier
                .incremental
                .then(|| kept.carry(&recs, &hashes))
                .flatten();
            // The kept pairs and the new records, or every record; each
            // record's earlier link, when the kept records are the links'.
            let (mut considered, new, mut by_rule) = match carried {
                Some((pairs, new, of)) => {
                    if kept.same_records(earlier.links) {
                        previous_of = Some(of);
                    }
                    (pairs, Some(new), kept.saved.pairs_by_rule)
                }
                None => (Vec::new(), None, BTreeMap::new()),
            };
            report.mode = match new {
                Some(_) => LinkMode::Incremental,
                None => LinkMode::ModelKept,
            };
            report.blocked_records = new.as_ref().map_or(recs.len(), Vec::len) as u64;
            let pairs = block(&recs, &opts.blocking, new.as_deref())?;
            for (rule, n) in pairs_by_rule(&pairs, opts) {
                *by_rule.entry(rule).or_default() += n;
            }
            considered.extend(consider(&recs, &pairs, None, &model, opts));
            not_kept = new;
            (model, considered, kept.saved.fitted_records, by_rule)
        }
        None => {
            report.mode = LinkMode::Fitted;
            report.blocked_records = recs.len() as u64;
            let pairs = block(&recs, &opts.blocking, None)?;
            let by_rule = pairs_by_rule(&pairs, opts);
            let (model, levels) = fit(&recs, &pairs, opts);
            let considered = consider(&recs, &pairs, Some(levels), &model, opts);
            (model, considered, recs.len() as u64, by_rule)
        }
    };
    // In one order whichever way they were found: a night that took the
    // kept pairs writes the file a full rebuild writes.
    considered.par_sort_unstable_by_key(|p| (p.1, p.2));
    tracing::info!(
        mode = ?report.mode,
        blocked = report.blocked_records,
        pairs = considered.len(),
        "linkage: pairs scored"
    );
    report.candidate_pairs = by_rule.values().sum();
    report.pairs_by_rule = by_rule;
    for (rule, n) in &report.pairs_by_rule {
        if *n > EXPLOSIVE_PAIRS_PER_RECORD * report.records.max(1) {
            report.warnings.push(format!(
                "blocking rule {rule} found {n} new candidate pairs for {} records: its key is \
                 too common to block on",
                report.records
            ));
        }
    }
    report.model_records = fitted_records;
    report.em_iterations = model.iterations;
    report.household_pairs = model.household_pairs;
    report.household_match_share = model.household_match_share;
    report.prior = model.prior;
    let saved = key.map(|key| state::Saved {
        version: state::VERSION,
        key,
        fitted_records,
        pairs_by_rule: report.pairs_by_rule.clone(),
        model: model.params(),
    });
    let labels = match &opts.labels {
        Some(path) => read_labels(path, &recs, &mut report.warnings)?,
        None => Labels::default(),
    };
    // The state is written while the records are clustered.
    let (kept, (links, relinked, roots, joined_by, mut review)) = rayon::join(
        || {
            saved
                .map(|saved| state::save(warehouse, &saved, &recs, &hashes, &considered))
                .transpose()
        },
        || {
            let (scored, mut review) = split(&considered, opts);
            report.accepted_pairs = scored.len() as u64;
            let (roots, joined_by) =
                cluster(&recs, &scored, &labels, opts, &mut report, &mut review);
            drop(scored);
            tracing::debug!("linkage: clustered");
            let (links, relinked) = person_links(
                &recs,
                &roots,
                &joined_by,
                (earlier.links, previous_of),
                opts,
                &mut report,
            );
            tracing::debug!("linkage: person ids given");
            (links, relinked, roots, joined_by, review)
        },
    );
    if kept?.is_some() {
        tracing::debug!("linkage: state kept");
    }
    drop((hashes, considered));

    // Clerical review: what a reviewer should look at, most probable first,
    // without the pairs already labelled.
    review.retain(|p| {
        let key = (p.1.min(p.2), p.1.max(p.2));
        !labels.different.contains(&key) && labels.same.binary_search(&key).is_err()
    });
    review.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    review.truncate(MAX_REVIEW_PAIRS);
    report.review_pairs = review.len() as u64;
    write_review(warehouse, &recs, &review, &roots, &opts.blocking)?;
    tracing::debug!("linkage: review list written");

    drop((recs, joined_by));
    // The persons whose records changed, when the rest are the earlier
    // run's: only their rows of the person table are computed.
    let changed: Option<(&Path, HashSet<&str>)> =
        earlier.person.zip(not_kept.as_ref()).map(|(path, new)| {
            let persons = new
                .iter()
                .map(|i| links[*i as usize].person_id.as_str())
                .chain(relinked.iter().map(String::as_str))
                .collect();
            (path, persons)
        });
    write_outputs(warehouse, &raw, &links, &roots, changed)?;
    Ok(Linkage {
        report,
        links,
        relinked,
    })
}

/// A pair worth keeping: match weight, the two records, the blocking rule,
/// whether the household level weighed it.
type Considered = (f64, u32, u32, u8, bool);
/// A scored pair: match weight, the two records, the blocking rule.
type ScoredPair = (f64, u32, u32, u8);
/// A pair for clerical review: a scored pair and why it was not linked.
type ReviewPair = (f64, u32, u32, u8, &'static str);

/// The candidate pairs worth keeping: those at least as probable as the
/// review threshold (or the threshold, if lower), weighed by `model`
/// (`levels`: the pairs' comparison levels where already computed).
fn consider(
    recs: &[Rec],
    pairs: &[(u32, u32, u8)],
    levels: Option<Vec<model::Levels>>,
    model: &Model,
    opts: &LinkOptions,
) -> Vec<Considered> {
    let from = state::kept_from(opts);
    let keep = |&(a, b, rule): &(u32, u32, u8), levels: &model::Levels| {
        let w = model.weight(&recs[a as usize], levels);
        (model::probability(w) >= from).then(|| (w, a, b, rule, model.is_household(levels)))
    };
    match levels {
        Some(levels) => pairs
            .par_iter()
            .zip(levels.par_iter())
            .filter_map(|(p, l)| keep(p, l))
            .collect(),
        None => pairs
            .par_iter()
            .filter_map(|p| keep(p, &model.compare(&recs[p.0 as usize], &recs[p.1 as usize])))
            .collect(),
    }
}

/// Splits the kept pairs into those at or above the match threshold
/// (heaviest first) and those a reviewer should see (at or above the
/// review threshold, with the reason they fell short).
fn split(considered: &[Considered], opts: &LinkOptions) -> (Vec<ScoredPair>, Vec<ReviewPair>) {
    let (above, below): (Vec<Considered>, Vec<Considered>) = considered
        .iter()
        .partition(|p| model::probability(p.0) >= opts.threshold);
    let review = below
        .into_iter()
        .map(|(w, a, b, rule, household)| {
            let reason = if household {
                "household level: given names differ, the rest of the family agrees"
            } else {
                "below the threshold"
            };
            (w, a, b, rule, reason)
        })
        .collect();
    let mut scored: Vec<ScoredPair> = above
        .into_iter()
        .map(|(w, a, b, rule, _)| (w, a, b, rule))
        .collect();
    scored.par_sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    (scored, review)
}

/// Union–find over the records: reviewed pairs first, whatever their
/// weight, then the scored pairs heaviest first. Two records of one
/// provider join only on stronger evidence (else the pair goes to review);
/// records a reviewer kept apart stay apart. Returns each record's cluster
/// root and the weight and rule that first joined it.
fn cluster(
    recs: &[Rec],
    scored: &[ScoredPair],
    labels: &Labels,
    opts: &LinkOptions,
    report: &mut LinkReport,
    review: &mut Vec<ReviewPair>,
) -> (Vec<u32>, Vec<Option<(f64, u8)>>) {
    let n = recs.len();
    let mut parent: Vec<u32> = (0..n as u32).collect();
    // Each root knows its sources: a bit set of `words` words per record.
    let source_ids: HashMap<&str, usize> = {
        let names: BTreeSet<&str> = recs.iter().map(|r| r.source.as_str()).collect();
        names.into_iter().enumerate().map(|(i, s)| (s, i)).collect()
    };
    let words = source_ids.len().div_ceil(64).max(1);
    let mut sources = vec![0u64; n * words];
    for (i, r) in recs.iter().enumerate() {
        let s = source_ids[r.source.as_str()];
        sources[i * words + s / 64] |= 1 << (s % 64);
    }
    let of = |root: u32| (root as usize * words)..(root as usize + 1) * words;
    let mut joined_by: Vec<Option<(f64, u8)>> = vec![None; n];
    fn find(parent: &mut [u32], mut x: u32) -> u32 {
        while parent[x as usize] != x {
            parent[x as usize] = parent[parent[x as usize] as usize];
            x = parent[x as usize];
        }
        x
    }
    // Records a reviewer said are different persons: per cluster root, the
    // constrained records it holds.
    let mut constrained: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(a, b) in &labels.different {
        constrained.entry(a).or_default().push(a);
        constrained.entry(b).or_default().push(b);
    }
    let labelled: Vec<ScoredPair> = labels
        .same
        .iter()
        .map(|&(a, b)| (f64::INFINITY, a, b, LABEL_RULE))
        .collect();
    for &(w, a, b, rule) in labelled.iter().chain(scored) {
        let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
        if ra == rb {
            continue;
        }
        if labels.keep_apart(&constrained, ra, rb) {
            report.labelled_refusals += 1;
            continue;
        }
        if rule == LABEL_RULE {
            report.labelled_links += 1;
        } else if sources[of(ra)]
            .iter()
            .zip(&sources[of(rb)])
            .any(|(x, y)| x & y != 0)
        {
            // Two records of one provider: a duplicate registration only on
            // stronger evidence. This also keeps chains of weaker links
            // from joining two people one provider tells apart.
            match opts.within_source_threshold {
                Some(t) if model::probability(w) >= t => report.within_source_merges += 1,
                _ => {
                    report.refused_merges += 1;
                    review.push((w, a, b, rule, "same provider on both sides"));
                    continue;
                }
            }
        }
        let (keep, gone) = if ra < rb { (ra, rb) } else { (rb, ra) };
        parent[gone as usize] = keep;
        for w in 0..words {
            sources[keep as usize * words + w] |= sources[gone as usize * words + w];
        }
        if let Some(moved) = constrained.remove(&gone) {
            constrained.entry(keep).or_default().extend(moved);
        }
        for r in [a, b] {
            joined_by[r as usize].get_or_insert((w, rule));
        }
    }
    let roots = (0..n as u32).map(|i| find(&mut parent, i)).collect();
    (roots, joined_by)
}

/// One link per record with its person id (carried forward from
/// `previous` where the person's records were already linked, else a hash
/// of the cluster's first record), and the person counts of the report;
/// `previous_of`, when known, is each record's index in `previous` (every
/// one of which is matched).
fn person_links(
    recs: &[Rec],
    roots: &[u32],
    joined_by: &[Option<(f64, u8)>],
    (previous, previous_of): (&[PersonLink], Option<Vec<Option<u32>>>),
    opts: &LinkOptions,
    report: &mut LinkReport,
) -> (Vec<PersonLink>, BTreeSet<String>) {
    // Each record's earlier link: known when every earlier record is still
    // there (none gone), else matched by key.
    let (previous_of, gone) = match previous_of {
        Some(of) => (of, Vec::new()),
        None => match_previous(recs, previous),
    };
    let (person_ids, carried) = assign_person_ids(recs, roots, previous, &previous_of);
    report.ids_carried_forward = carried;
    let person = |i: usize| {
        person_ids[roots[i] as usize]
            .as_deref()
            .expect("every cluster has an id")
    };
    // The persons of the earlier records that are gone or moved: before
    // and now.
    let mut relinked = BTreeSet::new();
    if !previous.is_empty() {
        let mut changed = gone.len() as u64;
        relinked.extend(
            gone.iter()
                .map(|j| previous[*j as usize].person_id.to_string()),
        );
        for (i, j) in previous_of.iter().enumerate() {
            let Some(before) = j.map(|j| &previous[j as usize].person_id) else {
                continue;
            };
            if before != person(i) {
                changed += 1;
                relinked.insert(before.to_string());
                relinked.insert(person(i).to_string());
            }
        }
        report.links_changed = Some(changed);
    }
    let mut members = vec![0u32; recs.len()];
    let mut dated = vec![false; recs.len()];
    for (i, r) in recs.iter().enumerate() {
        let root = roots[i] as usize;
        members[root] += 1;
        dated[root] |= r.birth.is_some();
    }
    // A few strings per record: in parallel, in the records' order.
    let links: Vec<PersonLink> = recs
        .par_iter()
        .enumerate()
        .map(|(i, r)| {
            let (w, rule) = match joined_by[i] {
                Some((w, rule)) => (
                    w.is_finite().then_some(w),
                    Some(rule_name(&opts.blocking, rule).into()),
                ),
                None => (None, None),
            };
            PersonLink {
                source: r.source.clone(),
                source_patient_id: r.source_patient_id.clone(),
                person_id: person(i).into(),
                match_weight: w,
                rule,
            }
        })
        .collect();
    report.persons = members.iter().filter(|&&m| m > 0).count() as u64;
    report.persons_without_birth_date = members
        .iter()
        .zip(&dated)
        .filter(|(m, d)| **m > 0 && !**d)
        .count() as u64;
    report.linked_persons = members.iter().filter(|&&m| m > 1).count() as u64;
    (links, relinked)
}

/// At most this many pairs in `core/link_review.csv`, most probable first.
const MAX_REVIEW_PAIRS: usize = 10_000;

/// Writes `core/link_review.csv`: pairs near the threshold or refused by
/// the same-source rule, with the ids of both records (identified data: owner-only, 0600),
/// and whether the linkage put them in one person. Its first five columns
/// are a labels file's: fill `decision` (match / non_match) and give the
/// file as `[link] labels`.
fn write_review(
    warehouse: &Warehouse,
    recs: &[Rec],
    review: &[(f64, u32, u32, u8, &'static str)],
    roots: &[u32],
    rules: &[(String, String)],
) -> Result<()> {
    let dir = warehouse.out().join("core");
    std::fs::create_dir_all(&dir).map_err(|e| WardError::io("cannot create", &dir, e))?;
    let path = dir.join("link_review.csv");
    warehouse.publish(&path, |file| {
        crate::warehouse::owner_only(0o600, &path, |p| file.set_permissions(p))?;
        let mut w = csv::Writer::from_writer(file);
        let io =
            |e: csv::Error| WardError::data("writing the linkage review list", path.clone(), e);
        w.write_record([
            "source_a",
            "source_patient_id_a",
            "source_b",
            "source_patient_id_b",
            "decision",
            "probability",
            "match_weight",
            "rule",
            "reason",
            "linked",
        ])
        .map_err(io)?;
        for &(weight, a, b, rule, reason) in review {
            let (x, y) = (&recs[a as usize], &recs[b as usize]);
            w.write_record([
                x.source.as_str(),
                x.source_patient_id.as_str(),
                y.source.as_str(),
                y.source_patient_id.as_str(),
                "",
                &format!("{:.6}", model::probability(weight)),
                &format!("{weight:.3}"),
                rule_name(rules, rule),
                reason,
                if roots[a as usize] == roots[b as usize] {
                    "yes"
                } else {
                    "no"
                },
            ])
            .map_err(io)?;
        }
        w.flush()
            .map_err(|e| WardError::io("cannot write", &path, e))
    })
}

/// One field's part in a pair's match weight.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FieldWeight {
    /// A compared column, or `household` (the household level).
    pub field: String,
    /// The comparison level (`None`: a value is missing on either side).
    pub level: Option<String>,
    pub m: Option<f64>,
    pub u: Option<f64>,
    /// log2(m / u): the field's contribution to the match weight.
    pub weight: f64,
}

/// Why two records are, or are not, the same person (`ward link
/// --explain`): the match-weight waterfall of the fitted model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Explanation {
    /// log2 prior odds of a match.
    pub prior_weight: f64,
    pub fields: Vec<FieldWeight>,
    pub weight: f64,
    pub probability: f64,
    /// The first blocking rule that makes the pair a candidate (`None`: the
    /// pair is never compared, whatever its weight).
    pub blocked_by: Option<String>,
    /// The pair is weighed by the household level (the `household` entry
    /// of `fields`), not by the fields it covers.
    pub household: bool,
    pub threshold: f64,
}

/// Explains the model's verdict (the one kept in `core/` of the warehouse's
/// output for the code `code`, else one fitted now) on records `a` and `b`, each
/// `(source, source_patient_id)` of the staged patients.
pub fn explain(
    warehouse: &Warehouse,
    opts: &LinkOptions,
    a: (&str, &str),
    b: (&str, &str),
    code: Option<&str>,
) -> Result<Explanation> {
    let recs = read_records(warehouse)?;
    let find = |(source, id): (&str, &str)| {
        recs.iter()
            .position(|r| r.source == source && r.source_patient_id == id)
            .ok_or_else(|| WardError::Usage {
                message: format!("--explain: no staged patient record {source}:{id}"),
            })
    };
    let (i, j) = (find(a)?, find(b)?);
    let (lo, hi) = (i.min(j) as u32, i.max(j) as u32);
    // The kept model, else one fitted now.
    let core = warehouse.out().join("core");
    let kept = match code {
        Some(code) => state::load(&core, &state::key(opts, code))?,
        None => None,
    };
    let model = match kept {
        Some(kept) => {
            Model::from_params(&opts.comparisons, kept.saved.model).map_err(|message| {
                WardError::data(
                    "reading the linkage state",
                    core.join(state::FILES[0]),
                    message,
                )
            })?
        }
        None => fit(&recs, &block(&recs, &opts.blocking, None)?, opts).0,
    };
    let pair = block(&recs, &opts.blocking, Some(&[lo]))?
        .into_iter()
        .find(|p| (p.0, p.1) == (lo, hi));
    let (x, y) = (&recs[i], &recs[j]);
    let model = &model;
    let levels = model.compare(x, y);
    let parts = model.contributions(x, &levels);
    let mut fields: Vec<FieldWeight> = model
        .comparisons
        .iter()
        .enumerate()
        .map(|(f, c)| FieldWeight {
            field: c.column.name().to_string(),
            level: levels[f].map(|k| match (&parts.fields[f], parts.household) {
                (None, Some(_)) => format!("{} (in the household level)", c.level_name(k)),
                _ => c.level_name(k).to_string(),
            }),
            m: parts.fields[f].map(|p| p.0),
            u: parts.fields[f].map(|p| p.1),
            weight: parts.fields[f].map_or(0.0, |p| p.2),
        })
        .collect();
    if let Some((m, u, weight)) = parts.household {
        fields.push(FieldWeight {
            field: "household".into(),
            level: Some(
                "given names differ; family name, address or phone and birth date agree".into(),
            ),
            m: Some(m),
            u: Some(u),
            weight,
        });
    }
    let weight = model.weight(x, &levels);
    Ok(Explanation {
        prior_weight: model.prior_weight(),
        fields,
        weight,
        probability: model::probability(weight),
        household: parts.household.is_some(),
        blocked_by: pair.map(|p| rule_name(&opts.blocking, p.2).to_string()),
        threshold: opts.threshold,
    })
}

/// Person ids of the clusters, by cluster root (`roots[i]`: record `i`'s
/// cluster), and how many clusters kept an id from `previous` (yesterday's
/// links; `previous_of[i]`: record `i`'s link there, [`match_previous`]).
///
/// Ids are carried forward so that a person keeps one id across nights —
/// research ids are derived from it — however their records change: each
/// previous id goes to the cluster holding most of its records (ties: the
/// cluster whose first record comes first), each cluster takes the previous
/// id it holds most records of (ties: the smaller id). When a person is split,
/// the larger part keeps the id; when two are merged, one id survives. A
/// cluster without a previous id gets `P` + 16 hex digits of the SHA-256 of
/// its first record (records are in source, id order), never one already
/// given out.
fn assign_person_ids<'a>(
    recs: &[Rec],
    roots: &[u32],
    previous: &'a [PersonLink],
    previous_of: &[Option<u32>],
) -> (Vec<Option<Cow<'a, str>>>, u64) {
    let n = recs.len();
    // Each cluster's first record.
    let mut first = vec![u32::MAX; n];
    for (i, root) in roots.iter().enumerate() {
        let f = &mut first[*root as usize];
        if *f == u32::MAX {
            *f = i as u32;
        }
    }
    // (cluster, previous id) → records: the votes by cluster (a few each),
    // counted per id within it.
    let mut votes: Vec<(u32, &str)> = previous_of
        .iter()
        .enumerate()
        .filter_map(|(i, j)| j.map(|j| (roots[i], previous[j as usize].person_id.as_str())))
        .collect();
    votes.par_sort_unstable_by_key(|v| v.0);
    let mut candidates: Vec<(u32, &str, usize)> = Vec::with_capacity(votes.len());
    for cluster in votes.chunk_by_mut(|a, b| a.0 == b.0) {
        if cluster.len() > 16 {
            // A large cluster: its ids sorted, not compared pairwise.
            cluster.sort_unstable();
            let runs = cluster.chunk_by(|a, b| a == b);
            candidates.extend(runs.map(|g| (g[0].0, g[0].1, g.len())));
            continue;
        }
        let at = candidates.len();
        for &(c, id) in &*cluster {
            match candidates[at..].iter_mut().find(|x| x.1 == id) {
                Some(x) => x.2 += 1,
                None => candidates.push((c, id, 1)),
            }
        }
    }
    drop(votes);
    candidates.par_sort_unstable_by(|(ca, ia, na), (cb, ib, nb)| {
        nb.cmp(na)
            .then_with(|| first[*ca as usize].cmp(&first[*cb as usize]))
            .then_with(|| ia.cmp(ib))
    });
    let mut ids: Vec<Option<Cow<'a, str>>> = vec![None; n];
    let mut taken: HashSet<&str> = HashSet::with_capacity(candidates.len());
    let mut carried = 0;
    for (cluster, id, _) in candidates {
        let slot = &mut ids[cluster as usize];
        if slot.is_none() && taken.insert(id) {
            *slot = Some(Cow::Borrowed(id));
            carried += 1;
        }
    }
    // The others, in the order of their first records.
    let mut fresh: HashSet<String> = HashSet::new();
    for (i, root) in roots.iter().enumerate() {
        let root = *root as usize;
        if first[root] != i as u32 || ids[root].is_some() {
            continue;
        }
        let mut seed = format!("{}/{}", recs[i].source, recs[i].source_patient_id);
        let id = loop {
            let id = format!("P{}", &hex::encode(Sha256::digest(&seed))[..16]);
            if !taken.contains(id.as_str()) && !fresh.contains(&id) {
                break id;
            }
            seed.push('+');
        };
        fresh.insert(id.clone());
        ids[root] = Some(Cow::Owned(id));
    }
    (ids, carried)
}

/// Each record's link in `previous` (its index there), and the links of
/// records that are gone (see [`match_keys`]).
fn match_previous(recs: &[Rec], previous: &[PersonLink]) -> (Vec<Option<u32>>, Vec<u32>) {
    fn key(l: &PersonLink) -> (&str, &str) {
        (&l.source, &l.source_patient_id)
    }
    let (of, gone, _) = match_keys(recs, previous, key);
    (of, gone)
}

/// Each record's match among `earlier` (by (source, id), `key`: its index
/// there), the indices of `earlier` no record matches, and whether the
/// records' keys are unique. Both lists are in (source, id) order as
/// linkage writes them: they are merged in one pass (else matched by
/// hashing).
pub(crate) fn match_keys<T>(
    recs: &[Rec],
    earlier: &[T],
    key: fn(&T) -> (&str, &str),
) -> (Vec<Option<u32>>, Vec<u32>, bool) {
    fn rec_key(r: &Rec) -> (&str, &str) {
        (&r.source, &r.source_patient_id)
    }
    use std::cmp::Ordering;
    let mut of = vec![None; recs.len()];
    let mut gone = Vec::new();
    // Merged in one pass, each list checked to be in strict order as it is
    // walked (every adjacent pair compared once).
    let merged = (|| {
        let mut i = 0;
        for (j, e) in earlier.iter().enumerate() {
            let k = key(e);
            if j > 0 && key(&earlier[j - 1]) >= k {
                return false;
            }
            let mut found = false;
            while let Some(r) = recs.get(i) {
                match rec_key(r).cmp(&k) {
                    Ordering::Less => {
                        if i > 0 && rec_key(&recs[i - 1]) >= rec_key(r) {
                            return false;
                        }
                        i += 1;
                    }
                    Ordering::Equal => {
                        found = true;
                        break;
                    }
                    Ordering::Greater => break,
                }
            }
            match found {
                true => of[i] = Some(j as u32),
                false => gone.push(j as u32),
            }
        }
        recs[i.saturating_sub(1)..]
            .windows(2)
            .all(|w| rec_key(&w[0]) < rec_key(&w[1]))
    })();
    if merged {
        return (of, gone, true);
    }
    of.fill(None);
    gone.clear();
    let mut index: HashMap<(&str, &str), usize> = HashMap::with_capacity(recs.len());
    let mut unique = true;
    for (i, r) in recs.iter().enumerate() {
        unique &= index.insert(rec_key(r), i).is_none();
    }
    for (j, e) in earlier.iter().enumerate() {
        match index.get(&key(e)) {
            Some(&i) => of[i] = Some(j as u32),
            None => gone.push(j as u32),
        }
    }
    (of, gone, unique)
}

/// Person id by (source, source_patient_id).
fn person_of(links: &[PersonLink]) -> HashMap<(&str, &str), &str> {
    links
        .iter()
        .map(|l| {
            (
                (l.source.as_str(), l.source_patient_id.as_str()),
                l.person_id.as_str(),
            )
        })
        .collect()
}

/// Reads a `person_link.parquet` (an earlier run's links); an absent file is
/// no links.
pub fn read_person_links(path: &Path) -> Result<Vec<PersonLink>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let data_err = |source: BoxError| WardError::data("reading person links", path, source);
    let mut links = Vec::new();
    for b in crate::warehouse::read_parquet(path, "reading person links")? {
        let col = |name: &str| -> Result<StringArray> {
            let array = b
                .column_by_name(name)
                .ok_or_else(|| data_err(format!("no column {name}").into()))?;
            crate::engine::text(array).map_err(|e| data_err(e.into()))
        };
        let (source, spid, person) = (col("source")?, col("source_patient_id")?, col("person_id")?);
        for i in 0..b.num_rows() {
            links.push(PersonLink {
                source: source.value(i).into(),
                source_patient_id: spid.value(i).into(),
                person_id: person.value(i).into(),
                match_weight: None,
                rule: None,
            });
        }
    }
    Ok(links)
}

/// Standardized records from the staged patient rows (in their
/// [`Rows`] order), standardized in parallel and written in place (a record is a few hundred
/// bytes: gathering per-batch vectors moved every one of them again).
fn records(staged: &Staged) -> Vec<Rec> {
    let columns: Vec<StagedColumns> = staged.batches.iter().map(StagedColumns::of).collect();
    (0..staged.rows.len())
        .into_par_iter()
        .map(|i| {
            let (b, r) = staged.rows.at(i);
            columns[b].rec(r)
        })
        .collect()
}

/// The rows of a list of staged patient batches in (source, id) order:
/// record `i` is row [`Rows::at`] of one batch.
struct Rows {
    order: Vec<(u32, u32)>,
}

impl Rows {
    /// The rows of `batches` in (source, source_patient_id) order; rows of
    /// the same key keep their order in `batches`. Rows already in order
    /// (one source's file, as most extracts are) are not sorted.
    fn of(batches: &[RecordBatch]) -> Result<Rows> {
        let keys = batches
            .iter()
            .map(|b| {
                let text = |c: &str| {
                    crate::engine::text(b.column_by_name(c).expect("selected"))
                        .map_err(engine_error)
                };
                Ok((text("source")?, text("source_patient_id")?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<(u32, u32)> = batches
            .iter()
            .enumerate()
            .flat_map(|(b, batch)| (0..batch.num_rows() as u32).map(move |r| (b as u32, r)))
            .collect();
        let key = |&(b, r): &(u32, u32)| {
            let (source, id) = &keys[b as usize];
            (source.value(r as usize), id.value(r as usize))
        };
        if !order.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
            order.par_sort_by(|x, y| key(x).cmp(&key(y)));
        }
        Ok(Rows { order })
    }

    /// How many rows.
    fn len(&self) -> usize {
        self.order.len()
    }

    /// The batch holding row `i` of all (in order), and its row there.
    fn at(&self, i: usize) -> (usize, usize) {
        let (b, r) = self.order[i];
        (b as usize, r as usize)
    }
}

/// The columns of a batch of staged patients that records are made of.
struct StagedColumns {
    source: StringArray,
    spid: StringArray,
    given: StringArray,
    family: StringArray,
    sex: StringArray,
    partial: StringArray,
    address: StringArray,
    zip: StringArray,
    phone: StringArray,
    email: StringArray,
    ssn: StringArray,
    birth: Date32Array,
}

impl StagedColumns {
    fn of(b: &RecordBatch) -> StagedColumns {
        let text = |name: &str| {
            crate::engine::text(b.column_by_name(name).expect("selected")).expect("text columns")
        };
        StagedColumns {
            source: text("source"),
            spid: text("source_patient_id"),
            given: text("given_name"),
            family: text("family_name"),
            sex: text("sex"),
            partial: text("birth_date_partial"),
            address: text("address_line"),
            zip: text("postal_code"),
            phone: text("phone"),
            email: text("email"),
            ssn: text("ssn"),
            birth: b
                .column_by_name("birth_date")
                .expect("selected")
                .as_primitive::<Date32Type>()
                .clone(),
        }
    }

    /// The standardized record of row `i`.
    fn rec(&self, i: usize) -> Rec {
        fn get(a: &StringArray, i: usize) -> Option<&str> {
            (!a.is_null(i)).then(|| a.value(i))
        }
        let family_name = standardize::name(get(&self.family, i));
        let written = standardize::given_as_written(get(&self.given, i));
        let full = written.as_deref().map(standardize::full_given);
        Rec {
            source: self.source.value(i).into(),
            source_patient_id: self.spid.value(i).into(),
            given_written: written.filter(|w| full.as_ref() != Some(w)),
            given: full,
            family_soundex: family_name.as_deref().and_then(standardize::soundex),
            family: family_name,
            birth: (!self.birth.is_null(i))
                .then(|| self.birth.value_as_date(i))
                .flatten(),
            birth_partial: get(&self.partial, i).and_then(|p| {
                let (year, month) = p.split_once('-').unwrap_or((p, ""));
                Some((year.parse().ok()?, month.parse().ok()))
            }),
            sex: get(&self.sex, i)
                .filter(|s| *s != "unknown")
                .map(Into::into),
            zip: standardize::zip(get(&self.zip, i)),
            phone: standardize::phone(get(&self.phone, i)),
            email: standardize::email(get(&self.email, i)),
            ssn: standardize::identifier(get(&self.ssn, i)),
            address: standardize::address(get(&self.address, i)),
        }
    }
}

/// Candidate pairs `(a, b, rule)` with `a < b`, from every blocking rule,
/// computed by DataFusion; with `touching`, only the pairs with at least
/// one of those records (new records blocked against every record).
fn block(
    recs: &[Rec],
    rules: &[(String, String)],
    touching: Option<&[u32]>,
) -> Result<Vec<(u32, u32, u8)>> {
    fn initial(s: &Option<CompactString>) -> Option<&str> {
        s.as_deref().and_then(|v| v.get(..1))
    }
    // The records' values as they are (not copied one by one).
    let str_col = |f: fn(&Rec) -> Option<&str>| -> ArrayRef {
        Arc::new(recs.iter().map(f).collect::<StringArray>())
    };
    let epoch = NaiveDate::default();
    let schema = Arc::new(Schema::new(vec![
        Field::new("rid", DataType::UInt32, false),
        Field::new("dob", DataType::Date32, true),
        Field::new("birth_year", DataType::Utf8, true),
        Field::new("given", DataType::Utf8, true),
        Field::new("given_initial", DataType::Utf8, true),
        Field::new("family_initial", DataType::Utf8, true),
        Field::new("family_soundex", DataType::Utf8, true),
        Field::new("ssn", DataType::Utf8, true),
        Field::new("phone", DataType::Utf8, true),
        Field::new("email", DataType::Utf8, true),
        Field::new("family", DataType::Utf8, true),
        Field::new("zip", DataType::Utf8, true),
        Field::new("address", DataType::Utf8, true),
    ]));
    // The columns side by side, each in one pass over the records.
    type Column<'r> = Box<dyn Fn() -> ArrayRef + Send + Sync + 'r>;
    let columns: Vec<Column> = vec![
        Box::new(|| Arc::new(UInt32Array::from_iter_values(0..recs.len() as u32))),
        Box::new(|| {
            Arc::new(
                recs.iter()
                    .map(|r| r.birth.map(|d| (d - epoch).num_days() as i32))
                    .collect::<Date32Array>(),
            )
        }),
        Box::new(|| {
            Arc::new(
                recs.iter()
                    .map(|r| r.birth_year().map(|y| y.to_compact_string()))
                    .collect::<StringArray>(),
            )
        }),
        Box::new(|| str_col(|r| r.given.as_deref())),
        Box::new(|| str_col(|r| initial(&r.given))),
        Box::new(|| str_col(|r| initial(&r.family))),
        Box::new(|| str_col(|r| r.family_soundex.as_deref())),
        Box::new(|| str_col(|r| r.ssn.as_deref())),
        Box::new(|| str_col(|r| r.phone.as_deref())),
        Box::new(|| str_col(|r| r.email.as_deref())),
        Box::new(|| str_col(|r| r.family.as_deref())),
        Box::new(|| str_col(|r| r.zip.as_deref())),
        Box::new(|| str_col(|r| r.address.as_deref())),
    ];
    let columns: Vec<ArrayRef> = columns.par_iter().map(|column| column()).collect();
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(engine_error)?;
    let new = touching
        .map(|rows| {
            let rows = UInt32Array::from(rows.to_vec());
            let columns = batch
                .columns()
                .iter()
                .map(|c| datafusion::arrow::compute::take(c, &rows, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            RecordBatch::try_new(schema.clone(), columns)
        })
        .transpose()
        .map_err(engine_error)?;
    // Each rule's pairs are streamed into (a << 32 | b, rule) keys, then
    // sorted: a pair found by several rules keeps the first rule.
    let mut keys: Vec<(u64, u8)> = Vec::new();
    crate::engine::block_on(async {
        let ctx = crate::engine::session(SessionConfig::new())?;
        crate::engine::register_batches(
            &ctx,
            "link_rec",
            schema.clone(),
            vec![batch],
            Path::new("blocking"),
        )?;
        // Either side of a pair may be the new record.
        let sides: &[(&str, &str)] = match new {
            Some(new) => {
                crate::engine::register_batches(
                    &ctx,
                    "link_new",
                    schema,
                    vec![new],
                    Path::new("blocking"),
                )?;
                &[("link_new", "link_rec"), ("link_rec", "link_new")]
            }
            None => &[("link_rec", "link_rec")],
        };
        for ((i, (_, on)), (left, right)) in rules
            .iter()
            .enumerate()
            .flat_map(|rule| sides.iter().map(move |side| (rule, side)))
        {
            let sql = format!(
                "SELECT a.rid AS l, b.rid AS r FROM {left} a JOIN {right} b ON {on} WHERE a.rid < b.rid"
            );
            let mut stream = ctx
                .sql(&sql)
                .await
                .map_err(engine_error)?
                .execute_stream()
                .await
                .map_err(engine_error)?;
            while let Some(b) = futures::StreamExt::next(&mut stream).await {
                let b = b.map_err(engine_error)?;
                let (l, r) = (
                    b.column(0)
                        .as_primitive::<datafusion::arrow::datatypes::UInt32Type>(),
                    b.column(1)
                        .as_primitive::<datafusion::arrow::datatypes::UInt32Type>(),
                );
                keys.extend(
                    l.values()
                        .iter()
                        .zip(r.values())
                        .map(|(l, r)| ((u64::from(*l) << 32) | u64::from(*r), i as u8)),
                );
            }
        }
        Ok(())
    })?;
    keys.par_sort_unstable();
    keys.dedup_by_key(|k| k.0);
    Ok(keys
        .into_iter()
        .map(|(k, rule)| ((k >> 32) as u32, k as u32, rule))
        .collect())
}

fn engine_error(e: impl Into<BoxError>) -> WardError {
    WardError::data("linking patient records", std::path::PathBuf::new(), e)
}

fn write_outputs(
    warehouse: &Warehouse,
    raw: &Staged,
    links: &[PersonLink],
    roots: &[u32],
    changed: Option<(&Path, HashSet<&str>)>,
) -> Result<()> {
    let core = warehouse.out().join("core");
    // The links and the person table, each written on its own.
    let (written, person) = rayon::join(
        || {
            let schema = crate::schema::person_link_schema();
            let col = |f: fn(&PersonLink) -> Option<&str>| -> ArrayRef {
                Arc::new(links.iter().map(f).collect::<StringArray>())
            };
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    col(|l| Some(&l.source)),
                    col(|l| Some(&l.source_patient_id)),
                    col(|l| Some(&l.person_id)),
                    Arc::new(
                        links
                            .iter()
                            .map(|l| l.match_weight)
                            .collect::<Float64Array>(),
                    ),
                    col(|l| l.rule.as_deref()),
                ],
            )
            .map_err(engine_error)?;
            warehouse.write_parquet(&core.join("person_link.parquet"), schema, &[batch])?;
            tracing::debug!("linkage: links written");
            Ok::<_, WardError>(())
        },
        || {
            // A person table taken but for some persons says so in its
            // footer (see `delta`).
            let (person, note) = match changed {
                Some((earlier, persons)) => {
                    match merged_persons(raw, links, roots, earlier, &persons) {
                        Ok(Some(merged)) => merged,
                        Ok(None) => (person_table(raw, links, roots, None)?, Vec::new()),
                        Err(e) => {
                            tracing::warn!(error = %e, "the earlier person table cannot be taken: computed whole");
                            (person_table(raw, links, roots, None)?, Vec::new())
                        }
                    }
                }
                None => (person_table(raw, links, roots, None)?, Vec::new()),
            };
            warehouse.write_parquet_noted(
                &core.join("person.parquet"),
                person.schema(),
                &[person],
                note,
            )
        },
    );
    written.and(person)
}

/// The person table as the earlier run's (`earlier`, its person.parquet)
/// without the rows of `persons` (whose records changed), with their rows
/// computed anew, in person id order, and the footer saying so
/// ([`crate::delta::derived_from`]: unless they are too many to name,
/// the persons and which columns of each one's row changed — a stage that
/// reads none of them need not recompute them); `None` when the earlier
/// file is not of this table's shape.
fn merged_persons(
    raw: &Staged,
    links: &[PersonLink],
    roots: &[u32],
    earlier: &Path,
    persons: &HashSet<&str>,
) -> Result<
    Option<(
        RecordBatch,
        Vec<datafusion::parquet::file::metadata::KeyValue>,
    )>,
> {
    let schema = crate::schema::person_schema();
    let before = crate::warehouse::read_parquet(earlier, "reading the earlier persons")?;
    if before
        .iter()
        .any(|b| b.schema().fields() != schema.fields())
    {
        return Ok(None);
    }
    let ordered: Vec<&str> = persons.iter().copied().collect();
    let mut note = crate::delta::derived_from(earlier, ordered.iter().copied());
    // The rows replaced, compared with their new rows when the footer
    // names the persons.
    let named = !note.is_empty();
    let mut parts = Vec::with_capacity(before.len() + 1);
    let mut replaced = Vec::new();
    for b in &before {
        let ids = crate::engine::text(b.column(0)).map_err(engine_error)?;
        let keep: datafusion::arrow::array::BooleanArray = ids
            .iter()
            .map(|id| Some(id.is_some_and(|id| !persons.contains(id))))
            .collect();
        let filter = datafusion::arrow::compute::filter_record_batch;
        parts.push(filter(b, &keep).map_err(engine_error)?);
        if named {
            let gone = datafusion::arrow::compute::not(&keep).map_err(engine_error)?;
            replaced.push(filter(b, &gone).map_err(engine_error)?);
        }
    }
    let fresh = person_table(raw, links, roots, Some(persons))?;
    if named {
        let replaced =
            datafusion::arrow::compute::concat_batches(&schema, &replaced).map_err(engine_error)?;
        let changed = crate::delta::changed_columns(&ordered, &replaced, &fresh)
            .map_err(|e| WardError::data("comparing the persons", earlier, e))?;
        note.push(crate::delta::derived_columns(&changed));
    }
    parts.push(fresh);
    tracing::debug!(
        persons = persons.len(),
        "linkage: the earlier person table taken but for the persons whose records changed"
    );
    Ok(Some((in_person_order(&schema, &parts)?, note)))
}

/// `parts` (the earlier rows kept, then the fresh ones) as one batch in
/// person id order: merged when the kept rows and the fresh ones are each
/// in that order, as written (sorted otherwise).
fn in_person_order(schema: &SchemaRef, parts: &[RecordBatch]) -> Result<RecordBatch> {
    use datafusion::arrow::compute::{concat_batches, interleave, sort_to_indices, take};
    let ids: Vec<StringArray> = parts
        .iter()
        .map(|b| crate::engine::text(b.column(0)).map_err(engine_error))
        .collect::<Result<_>>()?;
    let (fresh, kept) = ids.split_last().expect("the fresh rows are a part");
    let kept = kept
        .iter()
        .enumerate()
        .flat_map(|(b, ids)| ids.iter().enumerate().map(move |(r, id)| (b, r, id)));
    let fresh = fresh
        .iter()
        .enumerate()
        .map(|(r, id)| (parts.len() - 1, r, id));
    // Two runs in order, merged; each checked as it is walked.
    let mut order = Vec::with_capacity(parts.iter().map(RecordBatch::num_rows).sum());
    let (mut kept, mut fresh) = (kept.peekable(), fresh.peekable());
    let mut last: [Option<&str>; 2] = [None, None];
    let mut sorted = true;
    while sorted {
        let from_kept = match (kept.peek(), fresh.peek()) {
            (Some(k), Some(f)) => k.2 <= f.2,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let (b, r, id) = match from_kept {
            true => kept.next(),
            false => fresh.next(),
        }
        .expect("peeked");
        let last = &mut last[usize::from(!from_kept)];
        sorted = id.is_some() && *last < id;
        *last = id;
        order.push((b, r));
    }
    if sorted {
        let columns = (0..schema.fields().len())
            .map(|c| {
                let arrays: Vec<&dyn Array> = parts.iter().map(|b| b.column(c).as_ref()).collect();
                interleave(&arrays, &order)
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(engine_error)?;
        return RecordBatch::try_new(schema.clone(), columns).map_err(engine_error);
    }
    let all = concat_batches(schema, parts).map_err(engine_error)?;
    let order = sort_to_indices(all.column(0), None, None).map_err(engine_error)?;
    let columns = all
        .columns()
        .iter()
        .map(|c| take(c, &order, None))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(engine_error)?;
    RecordBatch::try_new(schema.clone(), columns).map_err(engine_error)
}

/// `core/person`: one row per person (cluster, `roots[i]` for record `i`),
/// in person id order, each field the most frequent of the person's records.
fn person_table(
    raw: &Staged,
    links: &[PersonLink],
    roots: &[u32],
    only: Option<&HashSet<&str>>,
) -> Result<RecordBatch> {
    const TEXT: [&str; 8] = [
        "given_name",
        "family_name",
        "sex",
        "race",
        "ethnicity",
        "state",
        "postal_code",
        "payer",
    ];
    const DATES: [&str; 2] = ["birth_date", "deceased_date"];
    if raw.batches.is_empty() {
        return Ok(RecordBatch::new_empty(crate::schema::person_schema()));
    }
    // Each batch's columns, read where the records are (not copied into
    // one batch: on a night that changed few persons, few are read).
    let text: Vec<[StringArray; 8]> = raw
        .batches
        .iter()
        .map(|b| {
            let columns = TEXT
                .iter()
                .map(|c| {
                    crate::engine::text(b.column_by_name(c).expect("selected"))
                        .map_err(engine_error)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(columns.try_into().expect("eight text columns"))
        })
        .collect::<Result<_>>()?;
    let dates: Vec<[Date32Array; 2]> = raw
        .batches
        .iter()
        .map(|b| {
            DATES.map(|c| {
                b.column_by_name(c)
                    .expect("selected")
                    .as_primitive::<Date32Type>()
                    .clone()
            })
        })
        .collect();
    let staged = &raw.rows;
    // Records grouped by person (counting sort by cluster: record order
    // within a person), the persons in id order.
    let n = links.len();
    let mut start = vec![0u32; n + 1];
    for r in roots {
        start[*r as usize + 1] += 1;
    }
    for i in 0..n {
        start[i + 1] += start[i];
    }
    let mut order = vec![0u32; n];
    let mut next = start.clone();
    for (i, r) in roots.iter().enumerate() {
        order[next[*r as usize] as usize] = i as u32;
        next[*r as usize] += 1;
    }
    drop(next);
    let mut groups: Vec<&[u32]> = (0..n)
        .filter(|r| start[r + 1] > start[*r])
        .map(|r| &order[start[r] as usize..start[r + 1] as usize])
        .filter(|g| only.is_none_or(|only| only.contains(links[g[0] as usize].person_id.as_str())))
        .collect();
    groups.par_sort_unstable_by(|a, b| {
        links[a[0] as usize]
            .person_id
            .cmp(&links[b[0] as usize].person_id)
    });
    /// The most frequent value; ties go to the earliest record.
    fn most_frequent<T: PartialEq + Copy>(
        mut values: impl Iterator<Item = Option<T>>,
        group: usize,
    ) -> Option<T> {
        if group == 1 {
            return values.next().flatten();
        }
        let mut counts: Vec<(T, usize)> = Vec::new();
        for v in values.flatten() {
            match counts.iter_mut().find(|(x, _)| *x == v) {
                Some(c) => c.1 += 1,
                None => counts.push((v, 1)),
            }
        }
        let best = counts.iter().map(|c| c.1).max()?;
        counts.into_iter().find(|c| c.1 == best).map(|c| c.0)
    }
    // Each person's values, in parallel.
    type PersonRow<'a> = ([Option<&'a str>; 8], [Option<i32>; 2], Vec<&'a str>);
    let rows: Vec<PersonRow> = groups
        .par_iter()
        .map(|group| {
            let rows: Vec<(usize, usize)> = group.iter().map(|&i| staged.at(i as usize)).collect();
            let text = std::array::from_fn(|c| {
                let values = rows.iter().map(|&(b, r)| {
                    let a = &text[b][c];
                    (!a.is_null(r)).then(|| a.value(r))
                });
                most_frequent(values, group.len())
            });
            let dates = std::array::from_fn(|c| {
                let values = rows.iter().map(|&(b, r)| {
                    let a = &dates[b][c];
                    (!a.is_null(r)).then(|| a.value(r))
                });
                most_frequent(values, group.len())
            });
            let sources: BTreeSet<&str> = group
                .iter()
                .map(|&i| links[i as usize].source.as_str())
                .collect();
            (text, dates, sources.into_iter().collect())
        })
        .collect();
    let mut ids = StringBuilder::new();
    let mut text_out: Vec<StringBuilder> = TEXT.iter().map(|_| StringBuilder::new()).collect();
    let mut date_out: Vec<Vec<Option<i32>>> = vec![Vec::with_capacity(groups.len()); DATES.len()];
    let mut sources = ListBuilder::new(StringBuilder::new());
    let mut records = Vec::with_capacity(groups.len());
    for (group, (text, dates, from)) in groups.iter().zip(&rows) {
        ids.append_value(&links[group[0] as usize].person_id);
        for (c, v) in text.iter().enumerate() {
            text_out[c].append_option(*v);
        }
        for (c, v) in dates.iter().enumerate() {
            date_out[c].push(*v);
        }
        for s in from {
            sources.values().append_value(s);
        }
        sources.append(true);
        records.push(group.len() as u32);
    }
    let mut text_out = text_out
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut date_out = date_out
        .into_iter()
        .map(|d| Arc::new(Date32Array::from(d)) as ArrayRef);
    let mut next_text = || text_out.next().expect("eight text columns");
    let (given, family, sex, race, ethnicity, state, postal, payer) = (
        next_text(),
        next_text(),
        next_text(),
        next_text(),
        next_text(),
        next_text(),
        next_text(),
        next_text(),
    );
    let (birth, deceased) = (
        date_out.next().expect("two dates"),
        date_out.next().expect("two dates"),
    );
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        given,
        family,
        birth,
        sex,
        race,
        ethnicity,
        state,
        postal,
        deceased,
        payer,
        Arc::new(sources.finish()),
        Arc::new(UInt32Array::from(records)),
    ];
    RecordBatch::try_new(crate::schema::person_schema(), columns).map_err(engine_error)
}

/// Quality of a linkage against ground truth, over every record of the
/// truth file.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Evaluation {
    /// Records of the truth file: all are scored.
    pub records: u64,
    /// Truth records that are not in the linkage (rejected at ingest, or
    /// not loaded): scored as persons of their own.
    pub records_not_linked: u64,
    /// Linked records the truth file does not list: not scored.
    pub records_not_in_truth: u64,
    pub true_pairs: u64,
    pub predicted_pairs: u64,
    pub true_positive_pairs: u64,
    /// `None` when no pair was predicted (precision is undefined then).
    pub precision: Option<f64>,
    /// `None` when the truth has no pair.
    pub recall: Option<f64>,
    pub f1: f64,
    pub true_persons: u64,
    pub predicted_persons: u64,
    /// True persons whose records form exactly one predicted person
    /// (cluster-level accuracy: nothing missing, nothing added).
    pub persons_exact: u64,
}

/// Compares `links` with a truth file (`source,source_patient_id,person_id`
/// per line, with a header; the generator's `truth.csv`): pairwise
/// precision, recall and F1 and exact persons, over every truth record.
pub fn evaluate(links: &[PersonLink], truth: &Path) -> Result<Evaluation> {
    let mut reader = csv::Reader::from_path(truth).map_err(|e| WardError::Config {
        path: truth.to_path_buf(),
        line: None,
        column: None,
        key: None,
        message: format!("cannot read the truth file: {e}"),
    })?;
    let mut truth_rows: Vec<(String, String, String)> = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let row = row.map_err(|e| WardError::Extract {
            path: truth.to_path_buf(),
            line: Some(i as u64 + 2),
            message: e.to_string(),
        })?;
        if row.len() < 3 {
            return Err(WardError::Extract {
                path: truth.to_path_buf(),
                line: Some(i as u64 + 2),
                message: "expected source,source_patient_id,person_id".into(),
            });
        }
        truth_rows.push((row[0].to_string(), row[1].to_string(), row[2].to_string()));
    }
    let predicted = person_of(links);
    let pairs = |n: u64| n * n.saturating_sub(1) / 2;
    let mut by_true: HashMap<&str, u64> = HashMap::new();
    let mut by_pred: HashMap<String, u64> = HashMap::new();
    let mut by_both: HashMap<(&str, String), u64> = HashMap::new();
    let mut not_linked = 0;
    let mut in_truth = HashSet::new();
    for (source, id, t) in &truth_rows {
        in_truth.insert((source.as_str(), id.as_str()));
        let p = match predicted.get(&(source.as_str(), id.as_str())) {
            Some(p) => p.to_string(),
            None => {
                not_linked += 1;
                format!("\0unlinked {source}/{id}")
            }
        };
        *by_true.entry(t).or_default() += 1;
        *by_pred.entry(p.clone()).or_default() += 1;
        *by_both.entry((t, p)).or_default() += 1;
    }
    let true_pairs: u64 = by_true.values().map(|&n| pairs(n)).sum();
    let predicted_pairs: u64 = by_pred.values().map(|&n| pairs(n)).sum();
    let tp: u64 = by_both.values().map(|&n| pairs(n)).sum();
    let persons_exact = by_both
        .iter()
        .filter(|((t, p), n)| by_true[t] == **n && by_pred[p] == **n)
        .count() as u64;
    let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
    let (precision, recall) = (ratio(tp, predicted_pairs), ratio(tp, true_pairs));
    let (p, r) = (precision.unwrap_or(0.0), recall.unwrap_or(0.0));
    Ok(Evaluation {
        records: truth_rows.len() as u64,
        records_not_linked: not_linked,
        records_not_in_truth: links
            .iter()
            .filter(|l| !in_truth.contains(&(l.source.as_str(), l.source_patient_id.as_str())))
            .count() as u64,
        true_pairs,
        predicted_pairs,
        true_positive_pairs: tp,
        precision,
        recall,
        f1: if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        },
        true_persons: by_true.len() as u64,
        predicted_persons: by_pred.len() as u64,
        persons_exact,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn person_rows_kept_and_fresh_come_out_in_id_order_merged_or_sorted() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("n", DataType::UInt32, false),
        ]));
        let part = |ids: &[&str], n: &[u32]| {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(UInt32Array::from(n.to_vec())),
            ];
            RecordBatch::try_new(schema.clone(), columns).unwrap()
        };
        let ordered = |parts: &[RecordBatch]| {
            let all = in_person_order(&schema, parts).unwrap();
            let ids = all.column(0).as_string::<i32>();
            let n = all
                .column(1)
                .as_primitive::<datafusion::arrow::datatypes::UInt32Type>();
            (0..all.num_rows())
                .map(|i| (ids.value(i).to_string(), n.value(i)))
                .collect::<Vec<_>>()
        };
        let want: Vec<(String, u32)> = [("P1", 1), ("P2", 2), ("P3", 3), ("P4", 4), ("P5", 5)]
            .iter()
            .map(|(p, n)| (p.to_string(), *n))
            .collect();
        // Kept rows in two batches, the fresh rows last: merged.
        let merged = [
            part(&["P1", "P3"], &[1, 3]),
            part(&["P5"], &[5]),
            part(&["P2", "P4"], &[2, 4]),
        ];
        assert_eq!(ordered(&merged), want);
        // Kept rows out of order (a file Ward did not write): sorted.
        let unordered = [
            part(&["P3", "P1", "P5"], &[3, 1, 5]),
            part(&["P4", "P2"], &[4, 2]),
        ];
        assert_eq!(ordered(&unordered), want);
    }

    #[test]
    fn staged_rows_are_put_in_source_and_id_order_and_hashed_in_it() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("source", DataType::Utf8, false),
            Field::new("source_patient_id", DataType::Utf8, false),
        ]));
        let batch = |rows: &[(&str, &str)]| {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(rows.iter().map(|r| Some(r.0)).collect::<StringArray>()),
                Arc::new(rows.iter().map(|r| Some(r.1)).collect::<StringArray>()),
            ];
            RecordBatch::try_new(schema.clone(), columns).unwrap()
        };
        let keys = |staged: &Staged| -> Vec<String> {
            (0..staged.rows.len())
                .map(|i| {
                    let (b, r) = staged.rows.at(i);
                    let text = |c| staged.batches[b].column(c).as_string::<i32>().value(r);
                    format!("{}/{}", text(0), text(1))
                })
                .collect()
        };
        let staged = |batches: Vec<RecordBatch>| {
            let rows = Rows::of(&batches).unwrap();
            Staged { batches, rows }
        };
        // In order already (one source's file, then the next's).
        let ordered = staged(vec![batch(&[("a", "1"), ("a", "2")]), batch(&[("b", "1")])]);
        assert_eq!(keys(&ordered), ["a/1", "a/2", "b/1"]);
        // Rows appended out of order, sources read in any order.
        let read = staged(vec![
            batch(&[("b", "2"), ("a", "2")]),
            batch(&[("b", "1"), ("a", "10"), ("a", "1")]),
        ]);
        assert_eq!(keys(&read), ["a/1", "a/10", "a/2", "b/1", "b/2"]);
        // The hashes follow the records, however the rows were read.
        let again = staged(vec![
            batch(&[("a", "1"), ("a", "10"), ("a", "2")]),
            batch(&[("b", "1"), ("b", "2")]),
        ]);
        let hashes = state::record_hashes(&read).unwrap();
        assert_eq!(hashes, state::record_hashes(&again).unwrap());
        assert_eq!(
            hashes.iter().collect::<HashSet<_>>().len(),
            5,
            "one hash per record"
        );
    }

    /// Records `a/1`, `a/2`, ... in (source, id) order, clustered by `roots`;
    /// `previous` as (record index, person id).
    fn ids(keys: &[&str], roots: &[u32], previous: &[(usize, &str)]) -> (Vec<String>, u64) {
        let recs: Vec<Rec> = keys
            .iter()
            .map(|k| {
                let (source, id) = k.split_once('/').unwrap();
                Rec {
                    source: source.into(),
                    source_patient_id: id.into(),
                    ..Rec::default()
                }
            })
            .collect();
        let previous: Vec<PersonLink> = previous
            .iter()
            .map(|(i, p)| PersonLink {
                source: recs[*i].source.clone(),
                source_patient_id: recs[*i].source_patient_id.clone(),
                person_id: (*p).into(),
                match_weight: None,
                rule: None,
            })
            .collect();
        let (previous_of, _) = match_previous(&recs, &previous);
        let (by_root, carried) = assign_person_ids(&recs, roots, &previous, &previous_of);
        (
            roots
                .iter()
                .map(|r| by_root[*r as usize].clone().unwrap().into_owned())
                .collect(),
            carried,
        )
    }

    #[test]
    fn keys_match_as_hashing_would_whether_or_not_in_order() {
        // The reference: a map of the records' keys (the last of equal
        // keys wins), every earlier key looked up.
        fn reference(recs: &[Rec], earlier: &[Rec]) -> (Vec<Option<u32>>, Vec<u32>, bool) {
            let mut index = std::collections::HashMap::new();
            let mut unique = true;
            for (i, r) in recs.iter().enumerate() {
                unique &= index
                    .insert((r.source.clone(), r.source_patient_id.clone()), i)
                    .is_none();
            }
            let (mut of, mut gone) = (vec![None; recs.len()], Vec::new());
            for (j, e) in earlier.iter().enumerate() {
                match index.get(&(e.source.clone(), e.source_patient_id.clone())) {
                    Some(&i) => of[i] = Some(j as u32),
                    None => gone.push(j as u32),
                }
            }
            (of, gone, unique)
        }
        fn key(r: &Rec) -> (&str, &str) {
            (&r.source, &r.source_patient_id)
        }
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for case in 0..400 {
            let (n_recs, n_earlier) = (next(12), next(12));
            let mut list = |len: u64| -> Vec<Rec> {
                let mut v: Vec<Rec> = (0..len)
                    .map(|_| Rec {
                        source: ["a", "b", "c"][next(3) as usize].into(),
                        source_patient_id: next(8).to_string().into(),
                        ..Rec::default()
                    })
                    .collect();
                // Most cases in order (strictly, or with repeats), some not.
                match case % 4 {
                    0 => {}
                    1 => v.sort_by(|x, y| key(x).cmp(&key(y))),
                    _ => {
                        v.sort_by(|x, y| key(x).cmp(&key(y)));
                        v.dedup_by(|x, y| key(x) == key(y));
                    }
                }
                v
            };
            let (recs, earlier) = (list(n_recs), list(n_earlier));
            assert_eq!(
                match_keys(&recs, &earlier, key),
                reference(&recs, &earlier),
                "case {case}"
            );
        }
    }

    #[test]
    fn person_ids_are_carried_forward_through_new_records_splits_and_merges() {
        let keys = ["a/1", "a/2", "b/1", "b/2", "c/1"];
        // First night: three persons, ids from their first records.
        let (first, carried) = ids(&keys[2..], &[0, 1, 2], &[]);
        assert_eq!(carried, 0);
        let fresh = |k: &str| format!("P{}", &hex::encode(Sha256::digest(k))[..16]);
        assert_eq!(first, [fresh("b/1"), fresh("b/2"), fresh("c/1")]);
        // A record of source `a` (sorting first) joins b/1's person, and a
        // new person a/2 appears: b/1's person keeps its id.
        let (second, carried) = ids(
            &keys,
            &[0, 1, 0, 3, 4],
            &[(2, &first[0]), (3, &first[1]), (4, &first[2])],
        );
        assert_eq!(carried, 3);
        assert_eq!(
            second,
            [
                first[0].clone(),
                fresh("a/2"),
                first[0].clone(),
                first[1].clone(),
                first[2].clone()
            ]
        );
        // b/2 and c/1 merge: one id survives (one record each: the smaller
        // id wins).
        let (merged, _) = ids(&keys[2..], &[0, 1, 1], &[(0, "P1"), (1, "P2"), (2, "P3")]);
        assert_eq!(merged, ["P1", "P2", "P2"]);
        // A person is split: the larger part keeps the id, the smaller gets
        // a fresh one that is not the kept id even if its first record is
        // the one the kept id was derived from.
        let kept = fresh("a/1");
        let (split, carried) = ids(
            &keys[..3],
            &[0, 1, 1],
            &[(0, &kept), (1, &kept), (2, &kept)],
        );
        assert_eq!(carried, 1);
        assert_eq!(split[1], kept);
        assert_eq!(split[2], kept);
        assert_ne!(split[0], kept);
        assert!(split[0].starts_with('P') && split[0].len() == 17);
        // A large cluster (its votes counted by sorting) takes the id most
        // of its records had: 12 records of P9, 8 of P1 merged.
        let keys: Vec<String> = (10..30).map(|i| format!("a/{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let previous: Vec<(usize, &str)> = (0..20)
            .map(|i| (i, if i % 5 < 3 { "P9" } else { "P1" }))
            .collect();
        let (large, carried) = ids(&keys, &[0; 20], &previous);
        assert_eq!(carried, 1);
        assert!(large.iter().all(|id| id == "P9"), "{large:?}");
    }

    #[test]
    fn blocking_rules_compare_two_records_on_known_columns() {
        for (_, on) in default_blocking() {
            check_blocking_rule(&on).unwrap_or_else(|e| panic!("{on}: {e}"));
        }
        check_blocking_rule("substr(a.zip, 1, 3) = substr(b.zip, 1, 3) AND a.family = b.family")
            .unwrap();
        for (on, needle) in [
            ("a.zip = b.postcode", "not a.<column>"),
            ("a.zip = c.zip", "not a.<column>"),
            ("zip = b.zip", "names no record"),
            ("a.zip = 'x'", "compare record a with record b"),
            ("a.zip = = b.zip", "not an SQL expression"),
            (
                "a.zip = b.zip) OR (a.dob = b.dob",
                "after an SQL expression",
            ),
        ] {
            let e = check_blocking_rule(on).unwrap_err();
            assert!(e.contains(needle), "{on}: {e}");
        }
    }
}
