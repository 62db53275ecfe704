//! De-identification: the research copy of the core tables (`ward deid`).
//!
//! Reads `core/person.parquet` and `core/<table>/part-*.parquet` and writes
//! `research/person.parquet`, `research/<table>/part-*.parquet` and
//! `research/deid.json` (what was done, with counts that reconcile). The
//! research tree is written aside and renamed into place whole, never seen
//! half-written (`ward run` writes it inside a run directory that is not
//! yet published).
//!
//! Columns are chosen by an allow-list over the canonical column kinds
//! ([`crate::schema::Kind`]): coded content (codes, code systems, units,
//! statuses, numeric values, booleans, encounter class) is kept; identifiers,
//! free text, postal codes and lineage are dropped; dates are reduced to
//! their year ([`DeidMode::SafeHarbor`]) or shifted by a per-person offset
//! ([`DeidMode::DateShift`], a limited data set, not Safe Harbor). A column
//! added to the canonical model later is therefore dropped unless its kind
//! is one of the kept ones.
//!
//! Persons get a research id, the hex HMAC-SHA-256 of their person id under
//! the configured key: stable across runs with one key, unlinkable without
//! it. Ages are computed at a reference date (the caller passes the end of
//! the measurement period) and 90 and over are pooled as 90 with their birth
//! year removed; ZIP codes keep their first three digits, and the three-digit
//! areas of fewer than 20,000 people become `000`.

use std::collections::{BTreeMap, BTreeSet};

// Maps keyed by a million person ids: a fast hash, not SipHash.
use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{Datelike, NaiveDate};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Date32Array, Int32Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt32Array,
};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef, UInt32Type};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, WardError};
use crate::schema::{Kind, Table};
use crate::warehouse::{Warehouse, parquet_files, read_parquet};

/// How dates are de-identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeidMode {
    /// HIPAA Safe Harbor: dates reduced to their year.
    SafeHarbor,
    /// Full dates shifted by one per-person offset (±1..365 days): keeps
    /// intervals within a person. A limited data set, NOT Safe Harbor.
    DateShift,
}

/// The public key of the bundled sample data. Anyone can recompute its
/// pseudonyms: never use it for real data.
pub const DEMO_KEY: &[u8] = b"ward demo key: public, for the bundled sample data only";

/// Keys shorter than this are refused.
pub const MIN_KEY_BYTES: usize = 16;

/// The secret HMAC key. Its bytes are never logged or printed; `Debug`
/// shows the fingerprint only.
#[derive(Clone)]
pub struct DeidKey {
    bytes: Vec<u8>,
    demo: bool,
    /// The HMAC keyed once: each pseudonym clones it, rather than hashing
    /// the key's inner and outer blocks again (half of an HMAC's work on
    /// ids this short).
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for DeidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeidKey")
            .field("fingerprint", &self.fingerprint())
            .field("demo", &self.demo)
            .finish()
    }
}

impl DeidKey {
    /// A key from its bytes (surrounding whitespace, e.g. a file's final
    /// newline, is removed); `None` when shorter than [`MIN_KEY_BYTES`].
    pub fn new(bytes: &[u8]) -> Option<DeidKey> {
        let bytes = bytes.trim_ascii();
        (bytes.len() >= MIN_KEY_BYTES).then(|| DeidKey::of(bytes, false))
    }

    /// The public demo key ([`DEMO_KEY`]).
    pub fn demo() -> DeidKey {
        DeidKey::of(DEMO_KEY, true)
    }

    fn of(bytes: &[u8], demo: bool) -> DeidKey {
        DeidKey {
            bytes: bytes.to_vec(),
            demo,
            keyed: Hmac::<Sha256>::new_from_slice(bytes).expect("HMAC takes any key"),
        }
    }

    /// Whether this is the public demo key (callers must warn loudly).
    pub fn is_demo(&self) -> bool {
        self.demo
    }

    /// First 8 bytes of the key's SHA-256, in hex: tells keys apart in
    /// `deid.json` without revealing them.
    pub fn fingerprint(&self) -> String {
        hex::encode(&Sha256::digest(&self.bytes)[..8])
    }

    fn mac(&self, domain: &[u8], value: &str) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        mac.update(domain);
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// The largest key file read (a key is 32 bytes; 4 KiB allows any encoding).
pub const MAX_KEY_FILE_BYTES: u64 = 4096;

/// How research data is de-identified (`[deid]`); see the module documentation.
#[derive(Debug, Clone)]
pub struct DeidConfig {
    /// The config file, for errors about the key.
    pub config_path: PathBuf,
    /// 1-based line of the `[deid]` key that names the key source, if any.
    pub key_line: Option<usize>,
    /// Where the HMAC key comes from.
    pub key: KeySource,
    /// Safe Harbor (default) or date shifting.
    pub mode: DeidMode,
    /// Minimum equivalence-class size of the k-anonymity report (default 11).
    pub k: u64,
    /// Remove persons in classes smaller than `k` from every research table.
    pub suppress_small_classes: bool,
}

impl Default for DeidConfig {
    /// No key, Safe Harbor, k = 11, no suppression.
    fn default() -> Self {
        DeidConfig {
            config_path: PathBuf::new(),
            key_line: None,
            key: KeySource::None,
            mode: DeidMode::SafeHarbor,
            k: 11,
            suppress_small_classes: false,
        }
    }
}

/// Where the de-identification key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Nothing configured: de-identification is refused.
    None,
    /// A file (absolute path) holding the key.
    File(PathBuf),
    /// An environment variable holding the key.
    Env(String),
    /// The bundled, public demo key (sample data only).
    Demo,
}

/// Finds the configured key: the file of `key_file`, the variable named by
/// `key_env` (looked up with `env`: the library never reads the
/// environment itself), or the demo key. No key, an unreadable file, an
/// unset variable or a key under [`MIN_KEY_BYTES`] bytes is a
/// [`WardError::Config`] naming the config key.
pub fn resolve_key(cfg: &DeidConfig, env: impl Fn(&str) -> Option<String>) -> Result<DeidKey> {
    let err = |key: &str, message: String| WardError::Config {
        path: cfg.config_path.clone(),
        line: cfg.key_line,
        column: None,
        key: Some(key.to_string()),
        message,
    };
    let short =
        format!("the key must be at least {MIN_KEY_BYTES} bytes (32 random bytes recommended)");
    match &cfg.key {
        KeySource::None => Err(err(
            "deid",
            "no de-identification key: set [deid] key_file or key_env (the HMAC key of research ids)"
                .into(),
        )),
        KeySource::File(path) => {
            use std::io::Read;
            let unreadable = |e: std::io::Error| {
                err(
                    "deid.key_file",
                    format!("cannot read the key file {}: {e}", path.display()),
                )
            };
            // A regular file, read up to a bound: `/dev/zero` or a FIFO
            // would otherwise be read forever.
            if !fs::metadata(path).map_err(unreadable)?.is_file() {
                return Err(err(
                    "deid.key_file",
                    format!("{} is not a regular file", path.display()),
                ));
            }
            let mut bytes = Vec::new();
            fs::File::open(path)
                .and_then(|f| f.take(MAX_KEY_FILE_BYTES + 1).read_to_end(&mut bytes))
                .map_err(unreadable)?;
            if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
                return Err(err(
                    "deid.key_file",
                    format!("{} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key", path.display()),
                ));
            }
            DeidKey::new(&bytes).ok_or_else(|| err("deid.key_file", short))
        }
        KeySource::Env(name) => {
            let value = env(name).ok_or_else(|| {
                err(
                    "deid.key_env",
                    format!("the environment variable {name} is not set"),
                )
            })?;
            DeidKey::new(value.as_bytes()).ok_or_else(|| err("deid.key_env", short))
        }
        KeySource::Demo => Ok(DeidKey::demo()),
    }
}

/// What [`deid`] does.
#[derive(Debug, Clone)]
pub struct DeidOptions {
    pub key: DeidKey,
    pub mode: DeidMode,
    /// Ages are computed at this day (the end of the measurement period).
    pub reference_date: NaiveDate,
    /// Minimum size of a quasi-identifier class (default 11).
    pub k: u64,
    /// Remove persons of classes under `k` from every research table.
    pub suppress_small_classes: bool,
    /// A value-set directory (`queries/valuesets`) to publish as the
    /// research table `valueset_code`, so that researchers select codes by
    /// value set instead of copying them. `None`: no such table.
    pub valuesets: Option<PathBuf>,
}

impl DeidOptions {
    /// Options from the `[deid]` config, its resolved key and a reference date.
    pub fn from_config(cfg: &DeidConfig, key: DeidKey, reference_date: NaiveDate) -> Self {
        DeidOptions {
            key,
            mode: cfg.mode,
            reference_date,
            k: cfg.k,
            suppress_small_classes: cfg.suppress_small_classes,
            valuesets: None,
        }
    }
}

/// Rows of one research table.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TableCounts {
    pub table: String,
    /// Rows of the core table.
    pub rows_in: u64,
    /// Rows written to the research table.
    pub rows_out: u64,
    /// Rows removed by small-class suppression (`rows_in = rows_out + rows_suppressed`).
    pub rows_suppressed: u64,
    /// Values of kept coded columns (codes, tokens, units, states) that did
    /// not look like a code — longer than 64 characters or with a space —
    /// and were written as NULL: a mapping that put free text in a coded
    /// column does not leak it.
    pub values_withheld: u64,
}

/// The k-anonymity report over [`QUASI_IDENTIFIERS`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KAnonymity {
    pub k: u64,
    pub quasi_identifiers: Vec<String>,
    /// Distinct combinations of the quasi-identifiers.
    pub classes: u64,
    pub classes_below_k: u64,
    /// Smallest class size (0 when there are no persons).
    pub min_class_size: u64,
    /// Class size → number of classes of that size.
    pub size_distribution: BTreeMap<u64, u64>,
    pub persons: u64,
    /// Persons in classes smaller than `k`.
    pub persons_below_k: u64,
    /// Fact rows (all tables but person) of those persons.
    pub records_below_k: u64,
    /// Whether those persons were removed from every research table.
    pub suppressed: bool,
}

/// What [`deid`] wrote; also written as `research/deid.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeidReport {
    pub mode: DeidMode,
    /// Whether the output follows HIPAA Safe Harbor.
    pub safe_harbor: bool,
    /// Whether the output is a limited data set (shifted full dates).
    pub limited_data_set: bool,
    /// Ages are at this day (ISO 8601).
    pub reference_date: String,
    /// See [`DeidKey::fingerprint`].
    pub key_fingerprint: String,
    pub demo_key: bool,
    /// Person first, then the fact tables in canonical order.
    pub tables: Vec<TableCounts>,
    pub k_anonymity: KAnonymity,
    pub ward_version: String,
    /// The research directory written.
    #[serde(skip)]
    pub research_dir: PathBuf,
}

/// The quasi-identifiers of the k-anonymity report (columns of
/// `research/person`); a missing value counts as its own value.
pub const QUASI_IDENTIFIERS: [&str; 5] = ["age_band", "sex", "zip3", "race", "ethnicity"];

/// Ages are pooled from this age on: `age` = 90 means "90 or older".
pub const AGE_CAP: i32 = 90;

/// Three-digit ZIP areas with fewer than 20,000 people (2000 census, as
/// listed by HHS for Safe Harbor): published as `000`.
pub const RESTRICTED_ZIP3: [&str; 17] = [
    "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878",
    "879", "884", "890", "893",
];

/// The research id of a person: hex HMAC-SHA-256 of the person id.
pub fn research_id(key: &DeidKey, person_id: &str) -> String {
    String::from_utf8(research_id_hex(key, person_id).to_vec()).expect("hex is ASCII")
}

/// [`research_id`] as hex digits in place.
fn research_id_hex(key: &DeidKey, person_id: &str) -> [u8; 64] {
    let mut hex = [0; 64];
    hex::encode_to_slice(key.mac(b"ward research id\0", person_id), &mut hex)
        .expect("64 digits for 32 bytes");
    hex
}

/// The person's date shift in days: derived from the key, in -365..=-1 or
/// 1..=365 (never zero).
pub fn date_shift_days(key: &DeidKey, person_id: &str) -> i32 {
    let mac = key.mac(b"ward date shift\0", person_id);
    let n = (u64::from_le_bytes(mac[..8].try_into().expect("8 bytes")) % 730) as i32;
    if n < 365 { n - 365 } else { n - 364 }
}

/// The date shift a person's dates take in `opts.mode`: theirs
/// ([`date_shift_days`]) when dates are shifted, none when they become
/// years (a keyed hash a million times a night is not free).
fn shift_of(opts: &DeidOptions, person_id: &str) -> i32 {
    match opts.mode {
        DeidMode::DateShift => date_shift_days(&opts.key, person_id),
        DeidMode::SafeHarbor => 0,
    }
}

/// Whole years of age at `reference` (`None` when born after it). A 29
/// February birthday is reached on 1 March in common years.
pub fn age_at(birth: NaiveDate, reference: NaiveDate) -> Option<i32> {
    let age = crate::measure::age_years(birth, reference);
    (age >= 0).then_some(age)
}

/// The Safe Harbor three-digit ZIP of a US postal code (`12345`,
/// `12345-6789` or `123456789`): its first three digits, or `000` for a
/// restricted area. Anything else (short, foreign, malformed) is `None`.
pub fn zip3(postal_code: &str) -> Option<&str> {
    let p = postal_code.trim().as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let valid = match p.len() {
        5 | 9 => digits(p),
        10 => digits(&p[..5]) && p[5] == b'-' && digits(&p[6..]),
        _ => false,
    };
    if !valid {
        return None;
    }
    // Only ASCII digits get here, so the bytes are the text.
    let z = std::str::from_utf8(&p[..3]).ok()?;
    Some(if RESTRICTED_ZIP3.contains(&z) {
        "000"
    } else {
        z
    })
}

/// Writes the research copy of `core_dir` into `research_dir` (replacing
/// it as a whole) and returns what was done.
pub fn deid(core_dir: &Path, research_dir: &Path, opts: &DeidOptions) -> Result<DeidReport> {
    deid_taking(core_dir, research_dir, opts, None).map(|(report, _)| report)
}

/// Research tables of an earlier run that a new research copy may take
/// instead of computing them again.
pub struct Earlier<'a> {
    /// The earlier run's directory, and the outputs its manifest lists:
    /// each file taken must still have the size and SHA-256 recorded.
    pub run_dir: &'a Path,
    pub outputs: &'a [crate::runs::OutputFile],
    /// Its research report (the taken tables' counts).
    pub report: DeidReport,
}

/// The fact tables [`deid_taking`] took from an earlier run: whole, or
/// with files computed for the core files added since.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub tables: Vec<String>,
    pub appended: Vec<String>,
}

/// [`deid`], taking research files from `earlier`, a run de-identified
/// with the same key, mode and code, for the core files that are that
/// run's own (hard-linked): a fact row's research row depends on nothing
/// else unless small classes are suppressed (whose members change with any
/// person). A table all of whose core files are the earlier run's is taken
/// whole with its counts; one that has those and more (appended to) takes
/// theirs and computes the others, adding their counts. The records of
/// persons below k are counted again, as the classes may have changed. A
/// table that cannot be taken (changed since, unreadable) is computed.
pub fn deid_taking(
    core_dir: &Path,
    research_dir: &Path,
    opts: &DeidOptions,
    earlier: Option<&Earlier>,
) -> Result<(DeidReport, Taken)> {
    let parent = research_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let scratch = Warehouse::for_export(&parent);
    let tmp = scratch.tmp_path(research_dir);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| WardError::io("cannot remove", &tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| WardError::io("cannot create", &tmp, e))?;

    // Persons first: their classes decide what is suppressed.
    let person_path = core_dir.join("person.parquet");
    let persons = read_parquet(&person_path, "reading a core table")?
        .iter()
        .map(|b| PersonColumns::of(b, &person_path))
        .collect::<Result<Vec<_>>>()?;
    let people = person_rows(&persons, opts);
    let classes = class_sizes(&people);
    let small: HashSet<&str> = people
        .iter()
        .filter(|p| classes[&p.class] < opts.k)
        .map(|p| p.person_id)
        .collect();
    let suppress = opts.suppress_small_classes;
    let kept: Vec<&Person> = people
        .iter()
        .filter(|p| !(suppress && small.contains(p.person_id)))
        .collect();
    let ids: HashMap<&str, (&str, i32)> = people
        .iter()
        .map(|p| (p.person_id, (p.research_id(), p.shift)))
        .collect();
    // The person table and the fact tables in parallel (each is its own;
    // a table's parts are again in parallel).
    use rayon::prelude::*;
    let facts: Vec<Table> = Table::ALL
        .into_iter()
        .filter(|t| *t != Table::Patient)
        .collect();
    let (person, done) = rayon::join(
        || {
            let batch = person_batch(&kept, &persons, opts.mode)?;
            scratch.write_parquet(&tmp.join("person.parquet"), batch.schema(), &[batch])
        },
        || {
            facts
                .par_iter()
                .map(|table| {
                    research_table(
                        *table, core_dir, &tmp, &scratch, &ids, &small, opts, earlier,
                    )
                })
                .collect::<Result<Vec<_>>>()
        },
    );
    person?;
    let mut tables = vec![TableCounts {
        table: "person".into(),
        rows_in: people.len() as u64,
        rows_out: kept.len() as u64,
        rows_suppressed: (people.len() - kept.len()) as u64,
        values_withheld: 0,
    }];
    let mut records_below_k = 0;
    let mut taken = Taken::default();
    for (counts, below, how) in done? {
        match how {
            Some(Took::Whole) => taken.tables.push(counts.table.clone()),
            Some(Took::Appended) => taken.appended.push(counts.table.clone()),
            None => {}
        }
        records_below_k += below;
        tables.push(counts);
    }

    if let Some(dir) = &opts.valuesets {
        tables.push(copy_valuesets(dir, &scratch, &tmp)?);
    }

    let mut size_distribution = BTreeMap::new();
    for size in classes.values() {
        *size_distribution.entry(*size).or_insert(0) += 1;
    }
    let report = DeidReport {
        mode: opts.mode,
        safe_harbor: opts.mode == DeidMode::SafeHarbor,
        limited_data_set: opts.mode == DeidMode::DateShift,
        reference_date: opts.reference_date.to_string(),
        key_fingerprint: opts.key.fingerprint(),
        demo_key: opts.key.is_demo(),
        tables,
        k_anonymity: KAnonymity {
            k: opts.k,
            quasi_identifiers: QUASI_IDENTIFIERS.iter().map(|s| s.to_string()).collect(),
            classes: classes.len() as u64,
            classes_below_k: classes.values().filter(|s| **s < opts.k).count() as u64,
            min_class_size: classes.values().copied().min().unwrap_or(0),
            size_distribution,
            persons: people.len() as u64,
            persons_below_k: small.len() as u64,
            records_below_k,
            suppressed: suppress,
        },
        ward_version: env!("CARGO_PKG_VERSION").into(),
        research_dir: research_dir.to_path_buf(),
    };
    let json_path = tmp.join("deid.json");
    let json = serde_json::to_vec_pretty(&report).expect("report serializes");
    scratch.publish(&json_path, |f| {
        f.write_all(&json)
            .map_err(|e| WardError::io("cannot write", &json_path, e))
    })?;
    scratch.publish_dir(&tmp, research_dir)?;
    tracing::info!(
        mode = ?opts.mode,
        persons = report.tables[0].rows_out,
        persons_below_k = report.k_anonymity.persons_below_k,
        suppressed = suppress,
        dir = %research_dir.display(),
        taken = %taken.tables.join(", "),
        appended = %taken.appended.join(", "),
        "research tables published"
    );
    Ok((report, taken))
}

/// How [`research_table`] made a research table of an earlier run's files.
enum Took {
    /// Taken whole.
    Whole,
    /// Taken, with files computed for the core files added since.
    Appended,
}

/// The research table of the core table `table` of `core_dir`, into
/// `tmp`: taken from `earlier` where it can be (see [`deid_taking`]),
/// else computed. Its counts, its records of persons below k, and how it
/// was taken.
#[allow(clippy::too_many_arguments)]
fn research_table(
    table: Table,
    core_dir: &Path,
    tmp: &Path,
    scratch: &Warehouse,
    ids: &HashMap<&str, (&str, i32)>,
    small: &HashSet<&str>,
    opts: &DeidOptions,
    earlier: Option<&Earlier>,
) -> Result<(TableCounts, u64, Option<Took>)> {
    let (core, out) = (core_dir.join(table.name()), tmp.join(table.name()));
    let files = parquet_files(&core)?;
    // The earlier run's research files, and the core files added and
    // gone since (a file written anew is both).
    let (mut added, mut gone) = (Vec::new(), Vec::new());
    let mut took = None;
    if let Some(e) = earlier.filter(|_| !opts.suppress_small_classes) {
        let before = parquet_files(&e.run_dir.join("core").join(table.name()))?;
        let (removed, new) = crate::delta::file_diff(&before, &files);
        if !before.is_empty() {
            match take_table(e, table, &out) {
                Ok(counts) => (took, added, gone) = (counts, new, removed),
                Err(e) => {
                    tracing::warn!(
                        table = table.name(),
                        "research table not taken, computed again: {e}"
                    );
                    let _ = fs::remove_dir_all(&out);
                }
            }
        }
    }
    let Some(mut counts) = took else {
        let (counts, below) = deid_files(table, &files, &out, scratch, ids, small, opts)?;
        return Ok((counts, below, None));
    };
    if added.is_empty() && gone.is_empty() {
        return Ok((counts, records_of(&files, small)?, Some(Took::Whole)));
    }
    // A file written as a gone one without some persons' rows (build's
    // relinked persons) keeps its research file without their rows; a file
    // derived otherwise counts as gone and added.
    let (derived, mut added, mut gone) = crate::delta::pair_derived(added, gone)?;
    let mut without = Vec::new();
    for d in derived {
        let persons: BTreeSet<String> = d.persons.iter().cloned().collect();
        match crate::warehouse::groups_holding(&d.file, "person_id", &persons)?.is_empty() {
            true => without.push((d, persons)),
            false => {
                added.push(d.file);
                gone.push(d.from);
            }
        }
    }
    // A gone file's research rows go with it (of the same name), and so
    // do its counts.
    use rayon::prelude::*;
    let schema = table_schema(table, opts.mode);
    let less_without = without
        .par_iter()
        .map(|(d, persons)| research_without(table, d, persons, &out, scratch, &schema, ids, opts))
        .collect::<Result<Vec<_>>>()?;
    let less = gone
        .par_iter()
        .map(|part| {
            let mut less = TableCounts::default();
            deid_part(table, part, &schema, ids, small, opts, &mut less)?;
            let research = out.join(part.file_name().unwrap_or_default());
            fs::remove_file(&research).map_err(|e| WardError::io("cannot remove", &research, e))?;
            Ok(less)
        })
        .collect::<Result<Vec<_>>>()?;
    for less in less.into_iter().chain(less_without) {
        counts.rows_in = counts.rows_in.saturating_sub(less.rows_in);
        counts.rows_out = counts.rows_out.saturating_sub(less.rows_out);
        counts.values_withheld = counts.values_withheld.saturating_sub(less.values_withheld);
    }
    let (more, more_below) = deid_files(table, &added, &out, scratch, ids, small, opts)?;
    counts.rows_in += more.rows_in;
    counts.rows_out += more.rows_out;
    counts.values_withheld += more.values_withheld;
    // The added files' records below k were counted as they were read.
    let kept: Vec<PathBuf> = files.into_iter().filter(|f| !added.contains(f)).collect();
    let below = records_of(&kept, small)? + more_below;
    Ok((counts, below, Some(Took::Appended)))
}

/// Writes the research file (in `out`, taken) of the core file `d.from`
/// anew for `d.file`, which was written as it without the rows of
/// `persons`: without their research rows (only the row groups holding
/// them are rewritten). Returns the counts of the rows removed.
#[allow(clippy::too_many_arguments)]
fn research_without(
    table: Table,
    d: &crate::delta::Derived,
    persons: &BTreeSet<String>,
    out: &Path,
    scratch: &Warehouse,
    schema: &SchemaRef,
    ids: &HashMap<&str, (&str, i32)>,
    opts: &DeidOptions,
) -> Result<TableCounts> {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let err = |e: crate::error::BoxError| WardError::data("reading a core table", &d.from, e);
    let mut less = TableCounts::default();
    let groups = crate::warehouse::groups_holding(&d.from, "person_id", persons)?;
    if groups.is_empty() {
        return Ok(less);
    }
    // Their rows as they were de-identified, for their counts.
    let file = fs::File::open(&d.from).map_err(|e| WardError::io("cannot open", &d.from, e))?;
    let rows = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|r| r.with_row_groups(groups.into_iter().collect()).build())
        .map_err(|e| err(e.into()))?;
    for b in rows {
        let b = b.map_err(|e| err(e.into()))?;
        let pid = as_text(column(&b, "person_id", &d.from)?, "person_id", &d.from)?;
        let theirs: BooleanArray = pid
            .iter()
            .map(|p| Some(p.is_some_and(|p| persons.contains(p))))
            .collect();
        let b = filter_record_batch(&b, &theirs).map_err(|e| err(e.into()))?;
        less.rows_in += b.num_rows() as u64;
        less.rows_out += b.num_rows() as u64;
        deid_batch(
            table,
            &b,
            &d.from,
            schema,
            ids,
            opts,
            &mut less.values_withheld,
        )?;
    }
    let research = out.join(d.file.file_name().unwrap_or_default());
    let theirs: BTreeSet<String> = persons
        .iter()
        .map(|p| match ids.get(p.as_str()) {
            Some((r, _)) => r.to_string(),
            None => research_id(&opts.key, p),
        })
        .collect();
    let groups = crate::warehouse::groups_holding(&research, "research_id", &theirs)?;
    let keep = |b: &RecordBatch| -> std::result::Result<BooleanArray, crate::error::BoxError> {
        let ids = b
            .column_by_name("research_id")
            .ok_or("no research_id column")?;
        let ids = crate::engine::text(ids)?;
        Ok(ids
            .iter()
            .map(|r| Some(!r.is_some_and(|r| theirs.contains(r))))
            .collect())
    };
    let removed = scratch.filter_row_groups(&research, &groups, keep, Vec::new())?;
    if removed != less.rows_out {
        return Err(WardError::data(
            "removing persons' research rows",
            &research,
            format!(
                "{removed} rows removed where its core file had {} of those persons",
                less.rows_out
            ),
        ));
    }
    Ok(less)
}

/// Links `earlier`'s research files of `table` into `out`; its counts, or
/// `None` when the earlier report has none for it.
fn take_table(earlier: &Earlier, table: Table, out: &Path) -> Result<Option<TableCounts>> {
    let Some(counts) = earlier
        .report
        .tables
        .iter()
        .find(|c| c.table == table.name() && c.rows_suppressed == 0)
    else {
        return Ok(None);
    };
    let dir = format!("research/{}", table.name());
    let files = crate::runs::verify(earlier.run_dir, &[&dir], earlier.outputs)?;
    if files.is_empty() {
        return Ok(None);
    }
    fs::create_dir_all(out).map_err(|e| WardError::io("cannot create", out, e))?;
    for f in files {
        let dest = out.join(&f.path[dir.len() + 1..]);
        crate::runs::link_or_copy(&earlier.run_dir.join(&f.path), &dest)?;
    }
    Ok(Some(counts.clone()))
}

/// Rows of the core files `files` whose person is in `small`.
fn records_of(files: &[PathBuf], small: &HashSet<&str>) -> Result<u64> {
    use datafusion::parquet::arrow::ProjectionMask;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use rayon::prelude::*;
    let counts = files
        .par_iter()
        .map(|part| {
            let err = |e: crate::error::BoxError| WardError::data("reading a core table", part, e);
            let file = fs::File::open(part).map_err(|e| WardError::io("cannot open", part, e))?;
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(e.into()))?;
            let mask = ProjectionMask::columns(builder.parquet_schema(), ["person_id"]);
            let mut n = 0;
            for b in builder
                .with_projection(mask)
                .build()
                .map_err(|e| err(e.into()))?
            {
                let b = b.map_err(|e| err(e.into()))?;
                let pid = as_text(column(&b, "person_id", part)?, "person_id", part)?;
                n += pid.iter().flatten().filter(|p| small.contains(p)).count() as u64;
            }
            Ok(n)
        })
        .collect::<Result<Vec<u64>>>()?;
    Ok(counts.into_iter().sum())
}

/// The report of the research tables in `research_dir`
/// (`research/deid.json`, as [`deid`] wrote it).
pub fn read_report(research_dir: &Path) -> Result<DeidReport> {
    let path = research_dir.join("deid.json");
    let text = std::fs::read(&path).map_err(|e| WardError::io("cannot read", &path, e))?;
    let mut report: DeidReport = serde_json::from_slice(&text).map_err(|e| WardError::State {
        path: path.clone(),
        message: e.to_string(),
    })?;
    report.research_dir = research_dir.to_path_buf();
    Ok(report)
}

/// Publishes the value sets beside the research tables, as they are (they
/// are not about persons), so researchers can select by value set.
fn copy_valuesets(dir: &Path, scratch: &Warehouse, tmp: &Path) -> Result<TableCounts> {
    let batches = crate::measure::read_valuesets(dir)?;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    scratch.write_parquet(
        &tmp.join("valueset_code.parquet"),
        crate::schema::valueset_code_schema(),
        &batches,
    )?;
    Ok(TableCounts {
        table: "valueset_code".into(),
        rows_in: rows as u64,
        rows_out: rows as u64,
        rows_suppressed: 0,
        values_withheld: 0,
    })
}

/// One person's research attributes, borrowing its text from the person
/// table's columns ([`PersonColumns`]): a million persons, so no string
/// of their own.
struct Person<'a> {
    /// Its row: (batch, row) of the person table.
    at: (usize, usize),
    person_id: &'a str,
    research_id: [u8; 64],
    /// Its date shift ([`shift_of`]).
    shift: i32,
    state: Option<&'a str>,
    age: Option<i32>,
    /// Days since the epoch; `None` for 90 and over.
    birth_date: Option<i32>,
    deceased_date: Option<i32>,
    records: Option<u32>,
    /// The quasi-identifier values, at [`AGE_BAND`], [`SEX`], [`ZIP3`],
    /// [`RACE`] and [`ETHNICITY`].
    class: [Option<&'a str>; 5],
}

/// Where each quasi-identifier is in [`Person::class`].
const AGE_BAND: usize = 0;
const SEX: usize = 1;
const ZIP3: usize = 2;
const RACE: usize = 3;
const ETHNICITY: usize = 4;

impl Person<'_> {
    fn research_id(&self) -> &str {
        std::str::from_utf8(&self.research_id).expect("hex is ASCII")
    }
}

/// A batch of the person table, its columns as the types [`Person`] reads.
struct PersonColumns {
    id: StringArray,
    sex: StringArray,
    race: StringArray,
    ethnicity: StringArray,
    state: StringArray,
    postal_code: StringArray,
    birth: Date32Array,
    deceased: Date32Array,
    sources: ArrayRef,
    records: UInt32Array,
}

impl PersonColumns {
    fn of(b: &RecordBatch, path: &Path) -> Result<PersonColumns> {
        let t = |name: &str| as_text(column(b, name, path)?, name, path);
        let typed = |name: &str, to: &DataType| typed(column(b, name, path)?, to, name, path);
        Ok(PersonColumns {
            id: t("person_id")?,
            sex: t("sex")?,
            race: t("race")?,
            ethnicity: t("ethnicity")?,
            state: t("state")?,
            postal_code: t("postal_code")?,
            birth: typed("birth_date", &DataType::Date32)?
                .as_primitive::<Date32Type>()
                .clone(),
            deceased: typed("deceased_date", &DataType::Date32)?
                .as_primitive::<Date32Type>()
                .clone(),
            sources: typed("sources", &text_list_type())?,
            records: typed("records", &DataType::UInt32)?
                .as_primitive::<UInt32Type>()
                .clone(),
        })
    }
}

fn column<'a>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| WardError::data("reading a core table", path, format!("no column '{name}'")))
}

fn as_text(a: &ArrayRef, name: &str, path: &Path) -> Result<StringArray> {
    crate::engine::text(a).map_err(|e| {
        WardError::data(
            "reading a core table",
            path,
            format!("column '{name}': {e}"),
        )
    })
}

fn typed(a: &ArrayRef, to: &DataType, name: &str, path: &Path) -> Result<ArrayRef> {
    cast(a, to).map_err(|e| {
        WardError::data(
            "reading a core table",
            path,
            format!("column '{name}': {e}"),
        )
    })
}

fn opt(a: &StringArray, i: usize) -> Option<&str> {
    (!a.is_null(i)).then(|| a.value(i))
}

fn person_rows<'a>(columns: &'a [PersonColumns], opts: &DeidOptions) -> Vec<Person<'a>> {
    let mut out = Vec::new();
    for (k, c) in columns.iter().enumerate() {
        // Two HMACs per person: the rows in parallel, in order.
        use rayon::prelude::*;
        let person = |i: usize| {
            let person_id = c.id.value(i);
            let date = |a: &Date32Array| (!a.is_null(i)).then(|| a.value_as_date(i)).flatten();
            let (born, died) = (date(&c.birth), date(&c.deceased));
            // The deceased are as old as they were when they died.
            let at = died.map_or(opts.reference_date, |d| d.min(opts.reference_date));
            let age = born.and_then(|d| age_at(d, at)).map(|a| a.min(AGE_CAP));
            // A birth year that says "90 or over today" is withheld, even
            // for someone who died younger (Safe Harbor: dates indicative
            // of such an age).
            let pooled = born
                .and_then(|d| age_at(d, opts.reference_date))
                .is_some_and(|a| a >= AGE_CAP);
            Person {
                at: (k, i),
                person_id,
                research_id: research_id_hex(&opts.key, person_id),
                shift: shift_of(opts, person_id),
                state: opt(&c.state, i),
                age,
                birth_date: (!c.birth.is_null(i) && !pooled).then(|| c.birth.value(i)),
                deceased_date: (!c.deceased.is_null(i)).then(|| c.deceased.value(i)),
                records: (!c.records.is_null(i)).then(|| c.records.value(i)),
                // In the order of AGE_BAND, SEX, ZIP3, RACE, ETHNICITY.
                class: [
                    age.map(crate::measure::age_band),
                    opt(&c.sex, i),
                    opt(&c.postal_code, i).and_then(zip3),
                    opt(&c.race, i),
                    opt(&c.ethnicity, i),
                ],
            }
        };
        out.par_extend((0..c.id.len()).into_par_iter().map(person));
    }
    out
}

fn class_sizes<'a>(people: &[Person<'a>]) -> HashMap<[Option<&'a str>; 5], u64> {
    let mut sizes = HashMap::new();
    for p in people {
        *sizes.entry(p.class).or_insert(0) += 1;
    }
    sizes
}

fn text_list_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

fn year_of_days(days: i32) -> i32 {
    (NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch") + chrono::Duration::days(days as i64))
        .year()
}

fn person_batch(
    people: &[&Person],
    columns: &[PersonColumns],
    mode: DeidMode,
) -> Result<RecordBatch> {
    let err = |e: datafusion::arrow::error::ArrowError| {
        WardError::data(
            "building research/person",
            PathBuf::from("person.parquet"),
            e,
        )
    };
    let text = |f: for<'p> fn(&'p Person<'p>) -> Option<&'p str>| -> ArrayRef {
        Arc::new(people.iter().map(|p| f(p)).collect::<StringArray>())
    };
    let date = |f: fn(&Person) -> Option<i32>| -> ArrayRef {
        match mode {
            DeidMode::SafeHarbor => Arc::new(
                people
                    .iter()
                    .map(|p| f(p).map(year_of_days))
                    .collect::<Int32Array>(),
            ),
            DeidMode::DateShift => Arc::new(
                people
                    .iter()
                    .map(|p| f(p).map(|d| d + p.shift))
                    .collect::<Date32Array>(),
            ),
        }
    };
    let sources: Vec<&dyn Array> = columns.iter().map(|c| c.sources.as_ref()).collect();
    let at: Vec<(usize, usize)> = people.iter().map(|p| p.at).collect();
    let columns: Vec<ArrayRef> = vec![
        text(|p| Some(p.research_id())),
        text(|p| p.class[SEX]),
        text(|p| p.class[RACE]),
        text(|p| p.class[ETHNICITY]),
        Arc::new(people.iter().map(|p| p.age).collect::<Int32Array>()),
        text(|p| p.class[AGE_BAND]),
        date(|p| p.birth_date),
        text(|p| p.state),
        text(|p| p.class[ZIP3]),
        date(|p| p.deceased_date),
        if sources.is_empty() {
            datafusion::arrow::array::new_empty_array(&text_list_type())
        } else {
            datafusion::arrow::compute::interleave(&sources, &at).map_err(err)?
        },
        Arc::new(people.iter().map(|p| p.records).collect::<UInt32Array>()),
    ];
    RecordBatch::try_new(
        crate::schema::research_person_schema(mode == DeidMode::DateShift),
        columns,
    )
    .map_err(err)
}

/// What happens to a fact column.
enum Action {
    Keep,
    Date,
    Timestamp,
}

/// Coded columns of kind [`Kind::Id`] that are kept: values of a code
/// system, not identifiers.
const CODED_IDS: [&str; 2] = ["value_code", "payer_type_code"];

fn action(name: &str, kind: Kind) -> Option<Action> {
    match kind {
        Kind::Sex
        | Kind::EncounterClass
        | Kind::Race
        | Kind::Ethnicity
        | Kind::State
        | Kind::CodeSystem
        | Kind::Code
        | Kind::Unit
        | Kind::Token
        | Kind::Codings
        | Kind::Bool
        | Kind::Float => Some(Action::Keep),
        Kind::Id if CODED_IDS.contains(&name) => Some(Action::Keep),
        Kind::Date => Some(Action::Date),
        Kind::Timestamp => Some(Action::Timestamp),
        // Identifiers, free text, postal codes, lineage.
        Kind::Id | Kind::Text | Kind::PostalCode | Kind::Line => None,
    }
}

/// Kept kinds whose values ingest does not restrict to a vocabulary.
fn unchecked_text(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Token | Kind::Unit | Kind::State | Kind::Code | Kind::CodeSystem | Kind::Id
    )
}

/// `a` (Utf8) with every value that does not look like a code — over 64
/// characters, or holding whitespace — replaced by NULL; and how many were.
fn code_shaped(a: &ArrayRef) -> (ArrayRef, u64) {
    let Some(text) = a.as_any().downcast_ref::<StringArray>() else {
        return (a.clone(), 0);
    };
    let mut nulled = 0;
    let out: StringArray = text
        .iter()
        .map(|v| {
            v.filter(|v| {
                let ok = v.len() <= 64 && !v.chars().any(char::is_whitespace);
                nulled += u64::from(!ok);
                ok
            })
        })
        .collect();
    (Arc::new(out), nulled)
}

/// Schema of `research/<table>` in `mode`: `research_id`, the kept
/// columns in canonical order (dates as `<name>_year` in Safe Harbor mode),
/// `reported_by`.
pub fn table_schema(table: Table, mode: DeidMode) -> SchemaRef {
    let mut fields = vec![Field::new("research_id", DataType::Utf8, false)];
    for c in table.columns() {
        match (action(c.name, c.kind), mode) {
            (None, _) => {}
            (Some(Action::Keep), _) | (Some(_), DeidMode::DateShift) => {
                fields.push(Field::new(c.name, c.kind.data_type(), true))
            }
            (Some(_), DeidMode::SafeHarbor) => fields.push(Field::new(
                format!("{}_year", c.name),
                DataType::Int32,
                true,
            )),
        }
    }
    fields.push(Field::new("reported_by", text_list_type(), true));
    Arc::new(Schema::new(fields))
}

/// De-identifies the core files `parts` of one fact table, each into the
/// research file of the same name in `out` (an empty table gets one empty
/// file); returns their counts and the rows of persons in small classes.
fn deid_files(
    table: Table,
    parts: &[PathBuf],
    out: &Path,
    scratch: &Warehouse,
    ids: &HashMap<&str, (&str, i32)>,
    small: &HashSet<&str>,
    opts: &DeidOptions,
) -> Result<(TableCounts, u64)> {
    let schema = table_schema(table, opts.mode);
    if parts.is_empty() && !out.exists() {
        // The table exists (empty) so that queries can name it.
        scratch.write_parquet(&out.join("part-00000.parquet"), schema.clone(), &[])?;
    }
    let zero = || TableCounts {
        table: table.name().into(),
        ..TableCounts::default()
    };
    // The parts in parallel (each part's rows are its own); the counts add up.
    use rayon::prelude::*;
    let done: Vec<(TableCounts, u64)> = parts
        .par_iter()
        .map(|part| {
            let mut counts = zero();
            let (batches, below) = deid_part(table, part, &schema, ids, small, opts, &mut counts)?;
            // Row groups like the core's, so that a core file rewritten
            // without some persons' rows rewrites few of them here too.
            let path = out.join(part.file_name().unwrap_or_default());
            scratch.write_person_sorted(
                &path,
                schema.clone(),
                &batches,
                crate::link::build::CORE_ROW_GROUP,
            )?;
            Ok((counts, below))
        })
        .collect::<Result<_>>()?;
    let (mut counts, mut below) = (zero(), 0);
    for (part, part_below) in done {
        counts.rows_in += part.rows_in;
        counts.rows_out += part.rows_out;
        counts.rows_suppressed += part.rows_suppressed;
        counts.values_withheld += part.values_withheld;
        below += part_below;
    }
    debug_assert_eq!(counts.rows_in, counts.rows_out + counts.rows_suppressed);
    Ok((counts, below))
}

/// De-identifies one part of a core table, counting into `counts`: its
/// research batches and its records of persons below k.
fn deid_part(
    table: Table,
    part: &Path,
    schema: &SchemaRef,
    ids: &HashMap<&str, (&str, i32)>,
    small: &HashSet<&str>,
    opts: &DeidOptions,
    counts: &mut TableCounts,
) -> Result<(Vec<RecordBatch>, u64)> {
    let mut below = 0;
    let mut batches = Vec::new();
    for b in read_parquet(part, "reading a core table")? {
        counts.rows_in += b.num_rows() as u64;
        let pid = as_text(column(&b, "person_id", part)?, "person_id", part)?;
        let is_small: BooleanArray = (0..b.num_rows())
            .map(|i| Some(small.contains(pid.value(i))))
            .collect();
        let n_small = is_small.true_count() as u64;
        below += n_small;
        let b = if opts.suppress_small_classes && n_small > 0 {
            counts.rows_suppressed += n_small;
            let keep = datafusion::arrow::compute::not(&is_small).expect("same length");
            filter_record_batch(&b, &keep)
                .map_err(|e| WardError::data("suppressing small classes", part, e))?
        } else {
            b
        };
        batches.push(deid_batch(
            table,
            &b,
            part,
            schema,
            ids,
            opts,
            &mut counts.values_withheld,
        )?);
    }
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    counts.rows_out += rows as u64;
    Ok((batches, below))
}

fn deid_batch(
    table: Table,
    b: &RecordBatch,
    path: &Path,
    schema: &SchemaRef,
    ids: &HashMap<&str, (&str, i32)>,
    opts: &DeidOptions,
    withheld: &mut u64,
) -> Result<RecordBatch> {
    let pid = as_text(column(b, "person_id", path)?, "person_id", path)?;
    // Facts of a person missing from core/person (should not happen) still
    // get a keyed id and offset, computed directly.
    let person: Vec<(String, i32)> = (0..b.num_rows())
        .map(|i| {
            let p = pid.value(i);
            match ids.get(p) {
                Some((r, s)) => (r.to_string(), *s),
                None => (research_id(&opts.key, p), shift_of(opts, p)),
            }
        })
        .collect();
    let mut columns: Vec<ArrayRef> = vec![Arc::new(
        person
            .iter()
            .map(|(r, _)| Some(r.as_str()))
            .collect::<StringArray>(),
    )];
    for c in table.columns() {
        let Some(action) = action(c.name, c.kind) else {
            continue;
        };
        let a = typed(column(b, c.name, path)?, &c.kind.data_type(), c.name, path)?;
        columns.push(match (action, opts.mode) {
            (Action::Keep, _) if unchecked_text(c.kind) => {
                let (kept, nulled) = code_shaped(&a);
                *withheld += nulled;
                kept
            }
            (Action::Keep, _) => a,
            (Action::Date, mode) => {
                let d = a.as_any().downcast_ref::<Date32Array>().expect("cast");
                match mode {
                    DeidMode::SafeHarbor => Arc::new(
                        d.iter()
                            .map(|v| v.map(year_of_days))
                            .collect::<Int32Array>(),
                    ),
                    DeidMode::DateShift => Arc::new(
                        d.iter()
                            .zip(&person)
                            .map(|(v, (_, s))| v.map(|v| v + s))
                            .collect::<Date32Array>(),
                    ),
                }
            }
            (Action::Timestamp, mode) => {
                let t = a
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .expect("cast");
                const DAY: i64 = 86_400_000_000;
                match mode {
                    DeidMode::SafeHarbor => Arc::new(
                        t.iter()
                            .map(|v| v.map(|v| year_of_days(v.div_euclid(DAY) as i32)))
                            .collect::<Int32Array>(),
                    ),
                    DeidMode::DateShift => Arc::new(
                        t.iter()
                            .zip(&person)
                            .map(|(v, (_, s))| v.map(|v| v + *s as i64 * DAY))
                            .collect::<TimestampMicrosecondArray>(),
                    ),
                }
            }
        });
    }
    columns.push(typed(
        column(b, "reported_by", path)?,
        &text_list_type(),
        "reported_by",
        path,
    )?);
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| WardError::data("building a research table", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Research ids and date shifts are RFC 2104 HMAC-SHA-256 of the person
    /// id (after a domain label), computed here by hand: however the key is
    /// prepared, the pseudonyms of a key never change.
    #[test]
    fn pseudonyms_are_the_hmac_of_the_person_id() {
        fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
            let mut block = [0u8; 64];
            block[..key.len()].copy_from_slice(key);
            let pad = |x: u8| block.iter().map(move |b| b ^ x);
            let inner =
                Sha256::digest(pad(0x36).chain(message.iter().copied()).collect::<Vec<_>>());
            Sha256::digest(pad(0x5c).chain(inner).collect::<Vec<_>>()).into()
        }
        let bytes = b"a research key of 32 bytes......";
        let key = DeidKey::new(bytes).unwrap();
        for id in ["P1", "P0123456789abcdef", "Pé"] {
            let label = |l: &[u8]| [l, id.as_bytes()].concat();
            assert_eq!(
                research_id(&key, id),
                hex::encode(hmac(bytes, &label(b"ward research id\0")))
            );
            let mac = hmac(bytes, &label(b"ward date shift\0"));
            let n = (u64::from_le_bytes(mac[..8].try_into().unwrap()) % 730) as i32;
            assert_eq!(
                date_shift_days(&key, id),
                if n < 365 { n - 365 } else { n - 364 }
            );
        }
    }

    #[test]
    fn coded_columns_keep_only_code_shaped_values() {
        let a: ArrayRef = Arc::new(StringArray::from(vec![
            Some("E11.9"),
            Some("mm[Hg]"),
            None,
            Some("called John at home"),
            Some(&*"x".repeat(65)),
        ]));
        let (kept, nulled) = code_shaped(&a);
        let kept = kept.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(nulled, 2);
        assert_eq!(
            kept.iter().collect::<Vec<_>>(),
            [Some("E11.9"), Some("mm[Hg]"), None, None, None]
        );
        assert!(unchecked_text(Kind::Unit) && !unchecked_text(Kind::Sex));
    }

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn ages_at_the_reference_date() {
        let r = d(2025, 12, 31);
        assert_eq!(age_at(d(1936, 1, 1), r), Some(89));
        assert_eq!(age_at(d(1935, 12, 31), r), Some(90), "birthday on the day");
        assert_eq!(age_at(d(1936, 1, 1), d(2025, 12, 31)), Some(89));
        // 29 February: one year older on 1 March in a common year.
        assert_eq!(age_at(d(2000, 2, 29), d(2025, 2, 28)), Some(24));
        assert_eq!(age_at(d(2000, 2, 29), d(2025, 3, 1)), Some(25));
        assert_eq!(age_at(d(2000, 2, 29), d(2024, 2, 29)), Some(24));
        assert_eq!(age_at(d(2026, 1, 1), r), None);
    }

    #[test]
    fn zip_codes_keep_three_digits_and_restricted_areas_become_000() {
        assert_eq!(zip3("02139"), Some("021"));
        assert_eq!(zip3("02139-4307"), Some("021"));
        assert_eq!(zip3("021394307"), Some("021"));
        for z in RESTRICTED_ZIP3 {
            assert_eq!(zip3(&format!("{z}42")), Some("000"), "{z}");
        }
        assert_eq!(zip3("03600-1234"), Some("000"));
        for bad in ["", "021", "2139", "02139-43", "K1A 0B1", "0213a"] {
            assert_eq!(zip3(bad), None, "{bad}");
        }
    }

    #[test]
    fn pseudonyms_and_shifts_depend_on_the_key_only() {
        let a = DeidKey::new(b"0123456789abcdef-a").unwrap();
        let b = DeidKey::new(b"0123456789abcdef-b").unwrap();
        assert_eq!(research_id(&a, "P1"), research_id(&a, "P1"));
        assert_ne!(research_id(&a, "P1"), research_id(&b, "P1"));
        assert_ne!(research_id(&a, "P1"), research_id(&a, "P2"));
        assert_eq!(research_id(&a, "P1").len(), 64);
        let shifts: Vec<i32> = (0..2000)
            .map(|i| date_shift_days(&a, &format!("P{i}")))
            .collect();
        assert!(shifts.iter().all(|s| *s != 0 && (-365..=365).contains(s)));
        assert!(shifts.iter().any(|s| *s < -300) && shifts.iter().any(|s| *s > 300));
        assert!(DeidKey::new(b"short").is_none());
        assert!(
            !format!("{a:?}").contains("0123456789"),
            "Debug hides the key"
        );
    }

    #[test]
    fn identifiers_and_free_text_are_never_kept() {
        for table in Table::ALL.into_iter().filter(|t| *t != Table::Patient) {
            let schema = table_schema(table, DeidMode::SafeHarbor);
            for f in schema.fields() {
                let name = f.name().as_str();
                assert!(
                    !name.starts_with("source") && name != "description" && name != "value_text",
                    "{table:?}.{name}"
                );
            }
        }
        let person = crate::schema::research_person_schema(false);
        assert!(person.field_with_name("birth_year").is_ok());
        assert!(person.field_with_name("postal_code").is_err());
    }

    #[test]
    fn missing_key_is_a_config_error_naming_the_key() {
        let mut cfg = DeidConfig {
            config_path: "ward.toml".into(),
            key_line: Some(7),
            key: KeySource::None,
            mode: DeidMode::SafeHarbor,
            k: 11,
            suppress_small_classes: false,
        };
        let e = resolve_key(&cfg, |_| None).unwrap_err();
        assert!(
            e.is_config_error() && e.to_string().contains("key_file"),
            "{e}"
        );
        cfg.key = KeySource::Env("WARD_KEY".into());
        let e = resolve_key(&cfg, |_| None).unwrap_err();
        assert!(e.to_string().contains("WARD_KEY"), "{e}");
        assert!(e.to_string().contains("deid.key_env"), "{e}");
        let k = resolve_key(&cfg, |n| (n == "WARD_KEY").then(|| "x".repeat(32))).unwrap();
        assert!(!k.is_demo());
        cfg.key = KeySource::Demo;
        assert!(resolve_key(&cfg, |_| None).unwrap().is_demo());
        // A key file must be a regular file of bounded size: `/dev/zero`
        // is refused at once instead of being read forever.
        cfg.key = KeySource::File("/dev/zero".into());
        let e = resolve_key(&cfg, |_| None).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.key");
        fs::write(&big, vec![b'k'; 5000]).unwrap();
        cfg.key = KeySource::File(big);
        let e = resolve_key(&cfg, |_| None).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        let good = dir.path().join("good.key");
        fs::write(&good, [7u8; 32]).unwrap();
        cfg.key = KeySource::File(good);
        assert!(!resolve_key(&cfg, |_| None).unwrap().is_demo());
    }
}
