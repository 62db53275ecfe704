//! Measures: SQL files in `queries/measures/` run by DataFusion over the
//! warehouse for a measurement period, one Parquet file of per-person
//! results each under `marts/measure_patient/`.
//!
//! A measure is `<name>.toml` (metadata, [`MeasureDef`]) beside `<name>.sql`.
//! The query sees the tables described in [`session`] and returns one row per
//! person of the initial population with the boolean criteria
//! `initial_population`, `denominator`, `denominator_exclusion`, `numerator`
//! and optionally `denominator_exception`, plus any detail columns. Ward then
//! applies proportion scoring once, here, for every measure: a person is in
//! the denominator only if in the initial population, excluded only if in the
//! denominator, in the numerator only if in the denominator and not excluded,
//! and excepted only if in the denominator, not excluded and not in the
//! numerator. Criteria are NULL-safe (NULL is false). Ratio and
//! continuous-variable measures ([`Scoring`]) return their own populations
//! and get their own rules and score.
//!
//! Three shapes beyond one group of patients, all declared in the TOML:
//! - **population basis** `basis = "encounter"`: the populations count
//!   encounters (hospital measures); the query returns one row per
//!   encounter with its `encounter_id` and `person_id`.
//! - **groups** (`[[group]]`): several population groups of one measure
//!   (CMS155: BMI, nutrition and physical-activity counseling); the query
//!   returns a `group_id` column naming the group, one row per subject per
//!   group, and Ward reports each group as its own result
//!   ([`MeasureResult::key`] `<id>.<group>`).
//! - **stratifiers** (`[[stratifier]]`): columns of the query (boolean or
//!   text) whose values split every group's populations, as the measure
//!   defines them (CMS155's age strata).

pub mod conformance;
mod cte;
mod session;
pub use crate::sqlfn::{age_band, age_years};
pub use session::install;
pub(crate) use session::read_valuesets;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type, Schema, SchemaRef};
use datafusion::prelude::SessionContext;
use serde::Deserialize;

use crate::error::{BoxError, Result, WardError};
use crate::schema::Table;
use crate::tomlfile::load_toml;
use crate::warehouse::Warehouse;

/// An inclusive range of days: the measurement period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start: chrono::NaiveDate,
    pub end: chrono::NaiveDate,
}

/// The population criteria columns, in report order.
pub const POPULATIONS: [&str; 5] = [
    "initial_population",
    "denominator",
    "denominator_exclusion",
    "denominator_exception",
    "numerator",
];

/// Whether a higher or a lower rate is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Improvement {
    Increase,
    Decrease,
}

/// How a measure's populations are scored (FHIR `measure-scoring`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scoring {
    /// numerator / (denominator − exclusions − exceptions); the numerator is
    /// part of the denominator.
    #[default]
    Proportion,
    /// (numerator − numerator exclusions) / (denominator − denominator
    /// exclusions); the numerator is part of the initial population, not
    /// necessarily of the denominator, and the score may exceed 1.
    Ratio,
    /// An aggregate ([`ObservationDef`]) of one observation per subject of
    /// the measure population not excluded from it.
    ContinuousVariable,
}

/// The observation column of a continuous-variable measure's query.
pub const OBSERVATION: &str = "measure_observation";

impl Scoring {
    /// The query's population column in each of the five population slots
    /// ([`POPULATIONS`] order, which [`Counts`] and [`Member::flags`]
    /// follow); `None` where the scoring has no such population. A ratio
    /// keeps its numerator exclusions in the exception slot, a continuous
    /// variable its measure population (and its exclusions) in the
    /// denominator (and exclusion) slot.
    pub fn columns(self) -> [Option<&'static str>; 5] {
        match self {
            Scoring::Proportion => POPULATIONS.map(Some),
            Scoring::Ratio => [
                Some("initial_population"),
                Some("denominator"),
                Some("denominator_exclusion"),
                Some("numerator_exclusion"),
                Some("numerator"),
            ],
            Scoring::ContinuousVariable => [
                Some("initial_population"),
                Some("measure_population"),
                Some("measure_population_exclusion"),
                None,
                None,
            ],
        }
    }

    /// The columns a query must return; the other population columns are
    /// optional (absent: false).
    fn required(self) -> &'static [&'static str] {
        match self {
            Scoring::Proportion => &[
                "initial_population",
                "denominator",
                "denominator_exclusion",
                "numerator",
            ],
            Scoring::Ratio => &["initial_population", "denominator", "numerator"],
            Scoring::ContinuousVariable => {
                &["initial_population", "measure_population", OBSERVATION]
            }
        }
    }
}

/// How a continuous-variable measure aggregates its observations
/// (`[observation]`; FHIR `measure-aggregate-method`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObservationDef {
    pub aggregate: Aggregate,
    /// UCUM unit of the observations (`min`, `h`, `d`), for reports.
    #[serde(default)]
    pub unit: Option<String>,
}

/// An aggregate method of measure observations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    Sum,
    Average,
    Median,
    Minimum,
    Maximum,
    Count,
}

impl Aggregate {
    /// The aggregate of `values` (`None` for no value, but a count of 0).
    pub fn apply(self, values: &[f64]) -> Option<f64> {
        if values.is_empty() {
            return (self == Aggregate::Count).then_some(0.0);
        }
        let n = values.len() as f64;
        Some(match self {
            Aggregate::Sum => values.iter().sum(),
            Aggregate::Average => values.iter().sum::<f64>() / n,
            Aggregate::Median => {
                let mut v = values.to_vec();
                v.sort_by(f64::total_cmp);
                let mid = v.len() / 2;
                if v.len() % 2 == 1 {
                    v[mid]
                } else {
                    (v[mid - 1] + v[mid]) / 2.0
                }
            }
            Aggregate::Minimum => values.iter().copied().fold(f64::INFINITY, f64::min),
            Aggregate::Maximum => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            Aggregate::Count => n,
        })
    }

    /// The FHIR code of the method (and the word reports use).
    pub fn code(self) -> &'static str {
        match self {
            Aggregate::Sum => "sum",
            Aggregate::Average => "average",
            Aggregate::Median => "median",
            Aggregate::Minimum => "minimum",
            Aggregate::Maximum => "maximum",
            Aggregate::Count => "count",
        }
    }
}

/// What a measure's populations count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// Patients (FHIR population basis `boolean`): one row per person.
    #[default]
    Patient,
    /// Encounters: one row per encounter, with its `encounter_id`.
    Encounter,
}

impl Basis {
    /// The column naming a subject of the populations.
    pub fn subject_column(self) -> &'static str {
        match self {
            Basis::Patient => "person_id",
            Basis::Encounter => "encounter_id",
        }
    }

    /// The plural noun for counts (`patients`, `encounters`).
    pub fn noun(self) -> &'static str {
        match self {
            Basis::Patient => "patients",
            Basis::Encounter => "encounters",
        }
    }
}

/// One population group of a measure with several (`[[group]]`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupDef {
    /// The value of the query's `group_id` column for this group's rows; a
    /// slug (letters, digits, `-`, `_`).
    pub id: String,
    pub title: String,
    /// The group's care-gap action (default: the measure's `care_gap`).
    #[serde(default)]
    pub care_gap: Option<String>,
}

/// A stratifier the measure defines (`[[stratifier]]`): a column of the
/// query whose values split the populations of every group.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StratifierDef {
    /// The stratifier's name in reports (the measure's own, e.g.
    /// `Stratification 1`).
    pub id: String,
    /// The query column holding each subject's stratum (boolean or text; a
    /// NULL boolean is `false`, a NULL text `(none)`).
    pub column: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// A measure's metadata (`queries/measures/<name>.toml`).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureDef {
    /// Short id used on the command line and in file names (`CMS122`).
    pub id: String,
    pub title: String,
    /// eCQM identifier and version, when the measure is one.
    #[serde(default)]
    pub cms_id: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    pub steward: String,
    /// `proportion`, `ratio` or `continuous-variable`.
    pub scoring: Scoring,
    /// How a continuous-variable measure aggregates its observations
    /// (required for that scoring, refused for the others).
    #[serde(default)]
    pub observation: Option<ObservationDef>,
    /// `increase`: higher is better; `decrease`: an inverse measure.
    pub improvement: Improvement,
    pub description: String,
    /// Canonical URL of the published measure (matches MeasureReport.measure).
    #[serde(default)]
    pub url: Option<String>,
    /// A detail column whose values are counted among denominator members
    /// after exclusions (e.g. control bands).
    #[serde(default)]
    pub category: Option<String>,
    /// Care gaps: the action a clinic should take for denominator members
    /// who need it (numerator members of an inverse measure, the others
    /// not in the numerator); no care-gap list when absent.
    #[serde(default)]
    pub care_gap: Option<String>,
    /// SQL `ORDER BY` over the measure's columns ranking its care gaps,
    /// most urgent first (default: person id).
    #[serde(default)]
    pub care_gap_priority: Option<String>,
    /// Report an age-standardized rate (direct method, 2000 U.S. standard
    /// population; `report::standard`) beside the crude one, for
    /// prevalence-type measures compared across regions and strata.
    #[serde(default)]
    pub age_standardize: bool,
    /// The versioned shared criteria the measure was written against: a
    /// folder of `queries/lib/` (`qicore-2024`, `qicore-2025`: the QI-Core
    /// library versions of one eCQM package year), whose views load after
    /// the common `queries/lib/*.sql`. Default: [`DEFAULT_LIBRARY`].
    #[serde(default)]
    pub library: Option<String>,
    /// What the populations count (default: patients).
    #[serde(default)]
    pub basis: Basis,
    /// Population groups, when the measure has several.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupDef>,
    /// Stratifiers the measure defines, reported per group.
    #[serde(default, rename = "stratifier")]
    pub stratifiers: Vec<StratifierDef>,
    /// Whether a subject's row depends only on its person's records, as
    /// in CQL's Patient context (default `true`): a night then computes
    /// the measure for the persons whose core rows changed and keeps the
    /// current run's rows for everyone else ([`run_for_persons`]). A
    /// measure that compares persons (a rank, a share of a clinic's
    /// patients) says `person_local = false` and is computed whole.
    #[serde(default = "yes")]
    pub person_local: bool,
    /// The SQL file, beside the metadata.
    #[serde(skip)]
    pub sql: PathBuf,
}

fn yes() -> bool {
    true
}

/// The shared criteria of a measure that names none, and of the report
/// strata: `queries/lib/qicore-2025/` when that folder exists.
pub const DEFAULT_LIBRARY: &str = "qicore-2025";

impl MeasureDef {
    /// A measure score as reports show it: a percentage (proportion), a
    /// ratio with three decimals, or the aggregate with its unit
    /// (`median 95.0 min`); `-` when there is none.
    pub fn format_score(&self, score: Option<f64>) -> String {
        let Some(x) = score else {
            return "-".into();
        };
        match (&self.observation, self.scoring) {
            (_, Scoring::Proportion) => format!("{:.1}%", x * 100.0),
            (_, Scoring::Ratio) => format!("{x:.3}"),
            (Some(o), Scoring::ContinuousVariable) => format!(
                "{} {x:.1}{}",
                o.aggregate.code(),
                o.unit
                    .as_deref()
                    .map(|u| format!(" {u}"))
                    .unwrap_or_default()
            ),
            (None, Scoring::ContinuousVariable) => format!("{x:.1}"),
        }
    }

    /// The `queries/lib/` folder this measure's session loads.
    pub fn library(&self) -> &str {
        self.library.as_deref().unwrap_or(DEFAULT_LIBRARY)
    }
}

/// Reads every measure of `queries/measures/`, sorted by id.
pub fn catalog(queries: &Path) -> Result<Vec<MeasureDef>> {
    let dir = queries.join("measures");
    let entries = std::fs::read_dir(&dir).map_err(|e| WardError::io("cannot read", &dir, e))?;
    let mut defs = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| WardError::io("cannot read", &dir, e))?
            .path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let (mut def, _): (MeasureDef, String) = load_toml(&path)?;
        def.sql = path.with_extension("sql");
        if !def.sql.is_file() {
            return Err(config(&path, format!("{} not found", def.sql.display())));
        }
        let gaps = def.care_gap.is_some() || def.groups.iter().any(|g| g.care_gap.is_some());
        if def.scoring != Scoring::Proportion && gaps {
            return Err(config(
                &path,
                "care_gap needs a proportion measure (a gap is a denominator member \
                 outside the numerator)"
                    .into(),
            ));
        }
        if let Some(priority) = &def.care_gap_priority {
            check_order_by(priority)
                .map_err(|m| config(&path, format!("care_gap_priority: {m}")))?;
        }
        if (def.scoring == Scoring::ContinuousVariable) != def.observation.is_some() {
            return Err(config(
                &path,
                "a continuous-variable measure needs an [observation] (aggregate = \
                 \"median\", ...), and only it has one"
                    .into(),
            ));
        }
        if let Some(library) = &def.library {
            let plain = !library.is_empty()
                && !library.starts_with('.')
                && library
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !plain || !queries.join("lib").join(library).is_dir() {
                return Err(config(
                    &path,
                    format!(
                        "library '{library}' is not a folder of {}",
                        queries.join("lib").display()
                    ),
                ));
            }
        }
        let slug = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        for (i, g) in def.groups.iter().enumerate() {
            if !slug(&g.id) || def.groups[..i].iter().any(|o| o.id == g.id) {
                return Err(config(
                    &path,
                    format!(
                        "group id '{}' must be a unique slug (letters, digits, '-', '_')",
                        g.id
                    ),
                ));
            }
        }
        for (i, st) in def.stratifiers.iter().enumerate() {
            let reserved = def.scoring.columns().contains(&Some(st.column.as_str()))
                || [OBSERVATION, "person_id", "encounter_id", "group_id"]
                    .contains(&st.column.as_str());
            if reserved || def.stratifiers[..i].iter().any(|o| o.id == st.id) {
                return Err(config(
                    &path,
                    format!(
                        "stratifier '{}': its id must be unique and its column '{}' \
                         not a population or subject column",
                        st.id, st.column
                    ),
                ));
            }
        }
        if defs.iter().any(|d: &MeasureDef| d.id == def.id) {
            return Err(config(&path, format!("duplicate measure id '{}'", def.id)));
        }
        defs.push(def);
    }
    defs.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(defs)
}

/// Checks that `text` is an SQL `ORDER BY` list and nothing more (it is
/// pasted into the care-gap query): expressions with ASC/DESC and NULLS
/// FIRST/LAST, no subquery, nothing after the list. Returns what is wrong.
fn check_order_by(text: &str) -> std::result::Result<(), String> {
    use datafusion::sql::sqlparser::ast::{Expr, visit_expressions};
    use datafusion::sql::sqlparser::parser::Parser;
    use std::ops::ControlFlow;
    let items = crate::engine::parse_fragment(text, "an ORDER BY list", |p| {
        p.parse_comma_separated(Parser::parse_order_by_expr)
    })
    .map_err(|e| format!("{e}: give only `column [ASC|DESC] [NULLS FIRST|LAST], ...`"))?;
    for item in &items {
        let found = visit_expressions(&item.expr, |e| match e {
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        });
        if found.is_break() {
            return Err("a subquery is not a ranking".into());
        }
    }
    Ok(())
}

fn config(path: &Path, message: String) -> WardError {
    crate::tomlfile::file_error(path, message)
}

/// Picks measures by id (case-insensitive); all when `ids` is empty.
pub fn select<'a>(defs: &'a [MeasureDef], ids: &[String]) -> Result<Vec<&'a MeasureDef>> {
    if ids.is_empty() {
        return Ok(defs.iter().collect());
    }
    ids.iter()
        .map(|id| {
            defs.iter()
                .find(|d| d.id.eq_ignore_ascii_case(id))
                .ok_or_else(|| WardError::Config {
                    path: PathBuf::from("queries/measures"),
                    line: None,
                    column: None,
                    key: Some("--measure".into()),
                    message: format!(
                        "unknown measure '{id}' (known: {})",
                        defs.iter()
                            .map(|d| d.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
        })
        .collect()
}

/// Population counts of one measure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub initial_population: u64,
    pub denominator: u64,
    pub denominator_exclusion: u64,
    pub denominator_exception: u64,
    pub numerator: u64,
}

impl Counts {
    /// The score's denominator: the denominator less exclusions and (of a
    /// proportion) exceptions; of a continuous variable, the measure
    /// population less its exclusions (the subjects observed).
    pub fn performance(&self, scoring: Scoring) -> u64 {
        match scoring {
            Scoring::Proportion => {
                self.denominator - self.denominator_exclusion - self.denominator_exception
            }
            Scoring::Ratio | Scoring::ContinuousVariable => {
                self.denominator - self.denominator_exclusion
            }
        }
    }

    /// The score's numerator: the numerator, less a ratio's numerator
    /// exclusions.
    pub fn performance_numerator(&self, scoring: Scoring) -> u64 {
        match scoring {
            Scoring::Proportion => self.numerator,
            Scoring::Ratio => self.numerator - self.denominator_exception,
            Scoring::ContinuousVariable => 0,
        }
    }

    /// The rate of a proportion or ratio (`None` for a continuous variable,
    /// whose score aggregates observations: [`score`]).
    pub fn rate(&self, scoring: Scoring) -> Option<f64> {
        let d = self.performance(scoring);
        (d > 0 && scoring != Scoring::ContinuousVariable)
            .then(|| self.performance_numerator(scoring) as f64 / d as f64)
    }
}

/// The measure score of a set of subjects: the rate of a proportion or
/// ratio, the aggregate of a continuous variable's observations.
pub fn score(def: &MeasureDef, counts: &Counts, observations: &[f64]) -> Option<f64> {
    match &def.observation {
        Some(o) if def.scoring == Scoring::ContinuousVariable => o.aggregate.apply(observations),
        _ => counts.rate(def.scoring),
    }
}

/// The counts of one stratum of a measure-defined stratifier.
#[derive(Debug, Clone, PartialEq)]
pub struct StratumCounts {
    /// The stratifier's id ([`StratifierDef::id`]).
    pub stratifier: String,
    /// The stratum's value (`true`, `false`, or the text value).
    pub value: String,
    pub counts: Counts,
    /// The stratum's measure score ([`score`]).
    pub score: Option<f64>,
}

/// One subject of a measure's populations: a person, or an encounter with
/// its person.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub subject: String,
    pub person: String,
    /// The populations, in [`POPULATIONS`] order.
    pub flags: [bool; 5],
    /// The subject's stratum of each stratifier the measure defines.
    pub strata: Vec<String>,
    /// A continuous-variable measure's observation of the subject (in the
    /// measure population and not excluded from it).
    pub observation: Option<f64>,
}

/// A [`Member`] borrowed from a result's rows ([`MeasureResult::visit_members`]).
#[derive(Debug, Clone, Copy)]
pub struct MemberRef<'a> {
    pub subject: &'a str,
    pub person: &'a str,
    /// The populations, in [`POPULATIONS`] order.
    pub flags: [bool; 5],
    /// The subject's stratum of each stratifier the measure defines.
    pub strata: &'a [&'a str],
    pub observation: Option<f64>,
}

/// One measure's outcome, or one group's when the measure has several.
#[derive(Debug, Clone)]
pub struct MeasureResult {
    pub def: MeasureDef,
    /// The group these results are of, when the measure has several.
    pub group: Option<GroupDef>,
    pub period: Period,
    pub counts: Counts,
    /// The measure score ([`score`]).
    pub score: Option<f64>,
    /// Counts per stratum of every stratifier the measure defines.
    pub strata: Vec<StratumCounts>,
    /// Counts per value of the measure's category column (denominator
    /// members after exclusions and exceptions), when it has one.
    pub categories: BTreeMap<String, u64>,
    /// The per-person rows (scored), as written to the mart, and their schema.
    pub rows: Vec<RecordBatch>,
    pub schema: SchemaRef,
    /// Why no one is in the denominator, when no one is.
    pub empty: Option<EmptyDenominator>,
}

/// What the data holds that a measure with an empty denominator looked
/// for, so an analyst can tell a population without the condition from
/// codes the measure does not recognise (unmapped visit types, a local
/// code system). Unsuppressed counts: publish them through suppression.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmptyDenominator {
    /// Value sets the measure's SQL names (by OID).
    pub valuesets: usize,
    /// Per coded table: persons with a fact, at any date, coded in one of
    /// those value sets; tables without such facts are left out.
    pub persons_by_table: Vec<(String, u64)>,
    /// Encounters that start in the measurement period.
    pub encounters_in_period: u64,
    /// Their most frequent codings (`system code`), at most five, none of
    /// which is in the measure's value sets.
    pub unmatched_encounter_codes: Vec<String>,
}

impl MeasureResult {
    /// The result's name in reports and file names: the measure id, and
    /// `<id>.<group>` for a group of a measure with several.
    pub fn key(&self) -> String {
        match &self.group {
            Some(g) => format!("{}.{}", self.def.id, g.id),
            None => self.def.id.clone(),
        }
    }

    /// The result's title: the measure's, with the group's.
    pub fn title(&self) -> String {
        match &self.group {
            Some(g) => format!("{} — {}", self.def.title, g.title),
            None => self.def.title.clone(),
        }
    }

    /// The care-gap action of this result (the group's, else the measure's).
    pub fn care_gap(&self) -> Option<&str> {
        self.group
            .as_ref()
            .and_then(|g| g.care_gap.as_deref())
            .or(self.def.care_gap.as_deref())
    }

    /// Every subject with its person, scored populations and strata.
    pub fn members(&self) -> Vec<Member> {
        let mut out = Vec::new();
        self.visit_members(|m| {
            out.push(Member {
                subject: m.subject.to_string(),
                person: m.person.to_string(),
                flags: m.flags,
                strata: m.strata.iter().map(|s| s.to_string()).collect(),
                observation: m.observation,
            })
        });
        out
    }

    /// Hands `f` every subject, borrowed from the rows: what [`members`]
    /// holds, without a string allocated per subject (counting a million
    /// members into strata is then a matter of lookups).
    ///
    /// [`members`]: MeasureResult::members
    pub fn visit_members(&self, mut f: impl FnMut(MemberRef<'_>)) {
        for b in &self.rows {
            let text = |name: &str| {
                b.column_by_name(name)
                    .expect("scored rows")
                    .as_string::<i32>()
            };
            let subjects = text(self.def.basis.subject_column());
            let persons = text("person_id");
            let flags: Vec<Option<&BooleanArray>> = self
                .def
                .scoring
                .columns()
                .iter()
                .map(|p| p.map(|p| b.column_by_name(p).expect("scored rows").as_boolean()))
                .collect();
            let observations = b
                .column_by_name(OBSERVATION)
                .map(|c| c.as_primitive::<Float64Type>());
            let strata: Vec<(ArrayRef, &str)> = self
                .def
                .stratifiers
                .iter()
                .map(|st| {
                    let c = b.column_by_name(&st.column).expect("checked when run");
                    let none = if c.data_type() == &DataType::Boolean {
                        "false"
                    } else {
                        "(none)"
                    };
                    let text = datafusion::arrow::compute::cast(c, &DataType::Utf8)
                        .expect("any column casts to text");
                    (text, none)
                })
                .collect();
            let strata: Vec<(&StringArray, &str)> = strata
                .iter()
                .map(|(a, none)| (a.as_string::<i32>(), *none))
                .collect();
            let mut values: Vec<&str> = Vec::with_capacity(strata.len());
            for i in 0..b.num_rows() {
                let mut scored = [false; 5];
                for (k, col) in flags.iter().enumerate() {
                    scored[k] = col.is_some_and(|c| c.value(i));
                }
                values.clear();
                values.extend(
                    strata
                        .iter()
                        .map(|(a, none)| if a.is_null(i) { *none } else { a.value(i) }),
                );
                f(MemberRef {
                    subject: subjects.value(i),
                    person: persons.value(i),
                    flags: scored,
                    strata: &values,
                    observation: observations.and_then(|o| o.is_valid(i).then(|| o.value(i))),
                });
            }
        }
    }

    /// Subject ids and their scored populations, for tests and the harness.
    pub fn memberships(&self) -> BTreeMap<String, [bool; 5]> {
        self.members()
            .into_iter()
            .map(|m| (m.subject, m.flags))
            .collect()
    }
}

impl Counts {
    /// Adds one subject's populations.
    pub fn add(&mut self, f: &[bool; 5]) {
        self.initial_population += u64::from(f[0]);
        self.denominator += u64::from(f[1]);
        self.denominator_exclusion += u64::from(f[2]);
        self.denominator_exception += u64::from(f[3]);
        self.numerator += u64::from(f[4]);
    }
}

/// Runs measures for a period (nothing is written; see [`write_marts`]): one
/// result per measure, or per group of a measure with several.
pub fn run(
    warehouse: &Warehouse,
    queries: &Path,
    defs: &[&MeasureDef],
    period: Period,
) -> Result<Vec<MeasureResult>> {
    run_profiled(warehouse, queries, defs, period, None)
}

/// [`run`], and with `profile` a directory: writes `<profile>/<id>.txt` per
/// measure, its executed plan with every operator's metrics (rows, time,
/// memory; DataFusion's `EXPLAIN ANALYZE`, from the run itself, not a
/// second one), the operators that took longest first. On a cluster the
/// plan is the driver's view: one distributed step without the executors'
/// metrics.
pub fn run_profiled(
    warehouse: &Warehouse,
    queries: &Path,
    defs: &[&MeasureDef],
    period: Period,
    profile: Option<&Path>,
) -> Result<Vec<MeasureResult>> {
    run_measures(warehouse, queries, defs, period, profile, Population::Whole)
}

/// Whom a run of the measures is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Population {
    /// Everyone: one measure at a time (each holds its own joins and
    /// sorts), an empty denominator explained.
    Whole,
    /// The few persons of a restricted core ([`run_for_persons`]), whose
    /// results are merged and counted again: planning is most of each
    /// measure's time, so as many run at once as there are cores, and an
    /// empty denominator (most are, for a handful of persons) is not
    /// explained.
    Few,
}

fn run_measures(
    warehouse: &Warehouse,
    queries: &Path,
    defs: &[&MeasureDef],
    period: Period,
    profile: Option<&Path>,
    population: Population,
) -> Result<Vec<MeasureResult>> {
    use futures::{StreamExt, TryStreamExt};
    if let Some(dir) = profile {
        std::fs::create_dir_all(dir).map_err(|e| WardError::io("cannot create", dir, e))?;
    }
    crate::engine::block_on(async {
        // One session per library version, in the order measures need them.
        // Their value-set memberships are computed once, for all of them.
        let mut shared = session::Shared::new(warehouse)?;
        let mut sessions: Vec<(&str, SessionContext)> = Vec::new();
        let mut runs = Vec::new();
        for def in defs {
            let i = match sessions.iter().position(|(l, _)| *l == def.library()) {
                Some(i) => i,
                None => {
                    let ctx = session::session(
                        warehouse,
                        queries,
                        period,
                        def.library(),
                        Some(&mut shared),
                    )
                    .await?;
                    sessions.push((def.library(), ctx));
                    sessions.len() - 1
                }
            };
            let (ctx, def) = (sessions[i].1.clone(), (*def).clone());
            let profile = profile.map(Path::to_path_buf);
            runs.push(async move {
                let started = std::time::Instant::now();
                let id = def.id.clone();
                let explain = population == Population::Whole;
                let one =
                    async move { run_one(&ctx, &def, period, profile.as_deref(), explain).await };
                let done = match population {
                    Population::Whole => one.await,
                    // On a worker of its own, beside the others.
                    Population::Few => tokio::spawn(one)
                        .await
                        .map_err(|e| WardError::data("running measures", queries, e))?,
                }?;
                tracing::info!(
                    measure = %id,
                    subjects = done.iter().map(|r| r.counts.initial_population).sum::<u64>(),
                    seconds = started.elapsed().as_secs_f64(),
                    "measure finished"
                );
                Ok::<_, WardError>(done)
            });
        }
        let at_once = match population {
            Population::Whole => 1,
            Population::Few => rayon::current_num_threads().max(1),
        };
        let done: Vec<Vec<MeasureResult>> = futures::stream::iter(runs)
            .buffered(at_once)
            .try_collect()
            .await?;
        Ok(done.into_iter().flatten().collect())
    })
}

/// The `person_strata` view (queries/lib/strata.sql) for a period: one row
/// per person and provider with the report strata.
pub fn strata(warehouse: &Warehouse, queries: &Path, period: Period) -> Result<Vec<RecordBatch>> {
    crate::engine::block_on(async {
        let ctx = session::session(warehouse, queries, period, DEFAULT_LIBRARY, None).await?;
        crate::engine::collect_about(
            &ctx,
            "SELECT person_id, provider, age_band, sex, race, ethnicity, state, zip3, payer \
             FROM person_strata",
            "computing the report strata",
            &queries.join("lib").join("strata.sql"),
        )
        .await
    })
}

/// Care gaps of the measures that define them, one row per provider record
/// of each person who needs action (see [`MeasureDef::care_gap`]), most
/// urgent first per provider, handed to `each` batch by batch (rows of
/// one provider in that order). With `only`, only of the providers it
/// names given the ranked gaps' `person_id` column (those whose lists are
/// written anew: see `report::KeptCareGaps`), which are returned.
/// Identified data: name, birth date, MRN.
pub fn care_gaps(
    warehouse: &Warehouse,
    queries: &Path,
    results: &[MeasureResult],
    only: Option<ProvidersOf<'_>>,
    mut each: impl FnMut(RecordBatch) -> Result<()>,
) -> Result<Option<std::collections::BTreeSet<String>>> {
    let Some(first) = results.first() else {
        return Ok(None);
    };
    crate::engine::block_on(async {
        let ctx = session::session(warehouse, queries, first.period, DEFAULT_LIBRARY, None).await?;
        let link = warehouse.out().join("core").join("person_link.parquet");
        crate::engine::register_parquet(
            &ctx,
            "person_link",
            &link,
            crate::schema::person_link_schema(),
        )
        .await?;
        // One branch per measure: its members who need action, ranked;
        // then one join of all of them to the providers' patient records.
        let mut branches = Vec::new();
        for (n, r) in results.iter().enumerate() {
            let (Some(action), true) = (r.care_gap(), !r.rows.is_empty()) else {
                continue;
            };
            let mart = format!("gap_{n}");
            crate::engine::register_batches(
                &ctx,
                &mart,
                r.schema.clone(),
                r.rows.clone(),
                &r.def.sql,
            )?;
            let gap = match r.def.improvement {
                Improvement::Decrease => "m.numerator",
                Improvement::Increase => {
                    "m.denominator AND NOT m.denominator_exclusion AND NOT m.denominator_exception AND NOT m.numerator"
                }
            };
            let details: Vec<String> = r
                .schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .filter(|n| {
                    !POPULATIONS.contains(n)
                        && ![
                            "measure_id",
                            "period_start",
                            "period_end",
                            "person_id",
                            "group_id",
                        ]
                        .contains(n)
                })
                .map(|n| format!("'{n}=' || coalesce(CAST(m.\"{n}\" AS VARCHAR), '')"))
                .collect();
            let details = if details.is_empty() {
                "''".to_string()
            } else {
                details.join(" || '; ' || ")
            };
            let priority = r.def.care_gap_priority.as_deref().unwrap_or("person_id");
            branches.push(format!(
                "SELECT {n} AS measure_n, '{key}' AS measure_id, '{action}' AS action, \
                   {details} AS details, m.person_id, \
                   row_number() OVER (ORDER BY {priority}, person_id) AS rank_ \
                 FROM {mart} m WHERE {gap}",
                action = action.replace('\'', "''"),
                key = r.key().replace('\'', "''"),
            ));
        }
        if branches.is_empty() {
            return Ok(None);
        }
        let queries_dir = queries.join("measures");
        let one = |batches: Vec<RecordBatch>| -> Result<RecordBatch> {
            let schema = batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| Arc::new(Schema::empty()));
            datafusion::arrow::compute::concat_batches(&schema, &batches)
                .map_err(|e| WardError::data("care gaps", &queries_dir, e))
        };
        // The gaps, most urgent first per measure; then the provider records
        // of the persons with a gap, each person's by provider and record.
        // Joined here, gap by gap, rather than in one query: the query
        // would hold and sort a million wide rows to give the same order.
        // The persons with a gap come first, so that the joins after carry
        // only their links (at 1M, a third of the 1.65M).
        let gaps = one(crate::engine::collect_about(
            &ctx,
            &format!(
                "SELECT measure_n, measure_id, action, details, person_id \
                     FROM ({}) ORDER BY measure_n, rank_",
                branches.join(" UNION ALL ")
            ),
            "care gaps",
            &queries_dir,
        )
        .await?)?;
        tracing::debug!(gaps = gaps.num_rows(), "care gaps ranked");
        if gaps.num_rows() == 0 {
            return Ok(None);
        }
        let only = match only {
            Some(only) => {
                let persons = crate::engine::text(gaps.column(4))
                    .map_err(|e| WardError::data("care gaps", &queries_dir, e))?;
                Some(only(&persons)?)
            }
            None => None,
        };
        if only.as_ref().is_some_and(|only| only.is_empty()) {
            return Ok(only);
        }
        crate::engine::register_batches(
            &ctx,
            "care_gap",
            gaps.schema(),
            vec![gaps.clone()],
            &queries_dir,
        )?;
        let providers = match &only {
            Some(only) => {
                // Named on both sides: the staged patients of the other
                // providers (partitions by source) are not read.
                let names = crate::engine::sql_text_list(only.iter().map(String::as_str));
                format!("WHERE l.source IN ({names}) AND pt.source IN ({names})")
            }
            None => String::new(),
        };
        let records = one(crate::engine::collect_about(
            &ctx,
            &format!(
                "SELECT l.person_id, l.source AS provider, pt.source_patient_id, pt.mrn, \
                   pt.given_name, pt.family_name, pt.birth_date, \
                   array_to_string(array_remove(p.sources, l.source), ';') AS other_providers \
                 FROM (SELECT DISTINCT person_id FROM care_gap) g \
                 JOIN person_link l ON l.person_id = g.person_id \
                 JOIN staging_patient pt \
                   ON pt.source = l.source AND pt.source_patient_id = l.source_patient_id \
                 JOIN patient p ON p.person_id = l.person_id \
                 {providers} \
                 ORDER BY l.person_id, provider, pt.source_patient_id"
            ),
            "care gaps",
            &queries_dir,
        )
        .await?)?;
        tracing::debug!(
            records = records.num_rows(),
            "care-gap patient records read"
        );
        join_care_gaps(&gaps, &records, &queries_dir, &mut each)?;
        Ok(only)
    })
}

/// The providers whose care-gap lists are written, given the persons with
/// a gap (see [`care_gaps`]).
pub type ProvidersOf<'a> = &'a dyn Fn(&StringArray) -> Result<std::collections::BTreeSet<String>>;

/// Rows of care gaps per output batch (a gap has a row per provider record):
/// enough for each provider's share to be written in one piece.
const CARE_GAP_BATCH: usize = 65_536;

/// Each gap of `gaps` (measure_n, measure_id, action, details, person_id)
/// with each of its person's provider records (`records`: person_id,
/// provider, source_patient_id, mrn, given_name, family_name, birth_date,
/// other_providers; a person's rows together), in the gaps' order, handed
/// to `each` in batches.
fn join_care_gaps(
    gaps: &RecordBatch,
    records: &RecordBatch,
    queries_dir: &Path,
    each: &mut impl FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    use datafusion::arrow::array::UInt32Array;
    use datafusion::arrow::compute::take;
    use datafusion::arrow::datatypes::Field;
    let err = |e| WardError::data("care gaps", queries_dir, e);
    let persons = crate::engine::text(records.column(0)).map_err(err)?;
    let mut of_person: ahash::AHashMap<&str, std::ops::Range<u32>> = ahash::AHashMap::new();
    for (i, p) in persons.iter().enumerate() {
        if let Some(p) = p {
            let i = i as u32;
            of_person
                .entry(p)
                .and_modify(|r| r.end = i + 1)
                .or_insert(i..i + 1);
        }
    }
    let gap_persons = crate::engine::text(gaps.column(4)).map_err(err)?;
    // The output's columns: (from the gaps?, column) in the file's order.
    const COLUMNS: [(bool, usize, &str); 10] = [
        (false, 1, "provider"),
        (true, 1, "measure_id"),
        (false, 2, "source_patient_id"),
        (false, 3, "mrn"),
        (false, 4, "given_name"),
        (false, 5, "family_name"),
        (false, 6, "birth_date"),
        (true, 2, "action"),
        (true, 3, "details"),
        (false, 7, "other_providers"),
    ];
    let schema = Arc::new(Schema::new(
        COLUMNS
            .iter()
            .map(|&(gap, c, name)| {
                let from = if gap { gaps } else { records };
                Field::new(name, from.column(c).data_type().clone(), true)
            })
            .collect::<Vec<_>>(),
    ));
    let (mut at_gap, mut at_record) = (Vec::new(), Vec::new());
    let mut emit = |at_gap: &mut Vec<u32>, at_record: &mut Vec<u32>| {
        let (g, r) = (
            UInt32Array::from(std::mem::take(at_gap)),
            UInt32Array::from(std::mem::take(at_record)),
        );
        let columns = COLUMNS
            .iter()
            .map(|&(gap, c, _)| {
                let (from, at) = if gap { (gaps, &g) } else { (records, &r) };
                take(from.column(c), at, None)
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(err)?;
        each(RecordBatch::try_new(schema.clone(), columns).map_err(err)?)
    };
    for (g, person) in gap_persons.iter().enumerate() {
        for r in person
            .and_then(|p| of_person.get(p))
            .cloned()
            .unwrap_or(0..0)
        {
            at_gap.push(g as u32);
            at_record.push(r);
        }
        if at_gap.len() >= CARE_GAP_BATCH {
            emit(&mut at_gap, &mut at_record)?;
        }
    }
    if !at_gap.is_empty() {
        emit(&mut at_gap, &mut at_record)?;
    }
    Ok(())
}

/// Writes each result to `marts/measure_patient/<key>.parquet` (atomically,
/// replacing the previous run's file) and returns the paths. The rows are
/// written in slices of [`MART_BATCH`], whatever batches they came in, so
/// that equal rows make equal files (a mart merged by [`run_for_persons`]
/// is byte for byte the one a whole run writes).
pub fn write_marts(warehouse: &Warehouse, results: &[MeasureResult]) -> Result<Vec<PathBuf>> {
    write_marts_but(warehouse, results, &Default::default())
}

/// [`write_marts`] but for the results whose key `but` holds (marts taken
/// as they are: see [`run_for_persons`]).
pub fn write_marts_but(
    warehouse: &Warehouse,
    results: &[MeasureResult],
    but: &std::collections::BTreeSet<String>,
) -> Result<Vec<PathBuf>> {
    use rayon::prelude::*;
    results
        .par_iter()
        .filter(|r| !but.contains(&r.key()))
        .map(|r| {
            let path = mart_path(warehouse.out(), &r.key());
            let all = datafusion::arrow::compute::concat_batches(&r.schema, &r.rows)
                .map_err(|e| WardError::data("writing a measure mart", &path, e))?;
            warehouse.write_parquet(&path, r.schema.clone(), &slices(&all))?;
            Ok(path)
        })
        .collect()
}

/// Said when a kept mart cannot be read for a merge.
const MART_UNREADABLE: &str =
    "a mart of the current run cannot be read: its measure is computed whole";

/// Rows per batch of a mart, written ([`write_marts`]) and read back.
const MART_BATCH: usize = 8192;

/// `batch` in slices of [`MART_BATCH`] rows (views, not copies).
fn slices(batch: &RecordBatch) -> Vec<RecordBatch> {
    (0..batch.num_rows())
        .step_by(MART_BATCH)
        .map(|at| batch.slice(at, MART_BATCH.min(batch.num_rows() - at)))
        .collect()
}

/// The results of `defs` on tonight's `warehouse`, computed only for the
/// persons `touched` holds and taken from the marts of the run in
/// `previous` (same queries, same period) for everyone else: what [`run`]
/// gives when every measure is person-local. The touched persons' rows
/// come from `restricted`, tonight's warehouse with its core restricted to
/// them ([`crate::delta::restrict`]). A measure that is not person-local,
/// whose mart `previous` lacks or wrote with other columns, or whose
/// merged denominators are all empty (the explanation needs the whole
/// data), is run on `warehouse` whole. Also returns the keys of the results
/// that are their previous marts' rows unchanged: those files can be taken
/// as they are (see [`write_marts`]).
pub fn run_for_persons(
    warehouse: &Warehouse,
    restricted: &Warehouse,
    previous: &Path,
    queries: &Path,
    defs: &[&MeasureDef],
    period: Period,
    touched: &crate::delta::Touched,
) -> Result<(Vec<MeasureResult>, std::collections::BTreeSet<String>)> {
    // No one changed (new facts that duplicate known ones): nothing to run.
    let local: Vec<&MeasureDef> = match touched.is_empty() {
        true => Vec::new(),
        false => defs.iter().copied().filter(|d| d.person_local).collect(),
    };
    let mut computed =
        run_measures(restricted, queries, &local, period, None, Population::Few)?.into_iter();
    // Each measure's computed results (one per group), then the measures
    // merged with their marts in parallel (reading, sorting and counting a
    // mart of a million rows is a measure's own work).
    let computed: Vec<Vec<MeasureResult>> = defs
        .iter()
        .map(|def| match def.person_local && !touched.is_empty() {
            true => computed.by_ref().take(def.groups.len().max(1)).collect(),
            false => Vec::new(),
        })
        .collect();
    use rayon::prelude::*;
    // Each merged result, and whether it is its mart unchanged.
    type Merged = Vec<(MeasureResult, bool)>;
    let merged: Vec<Option<Merged>> = defs
        .par_iter()
        .zip(computed)
        .map(|(def, computed)| {
            if !def.person_local {
                return Ok(None);
            }
            if touched.is_empty() {
                let read = read_marts(previous, def, period).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "{MART_UNREADABLE}");
                    None
                });
                return Ok(read.map(|rs| rs.into_iter().map(|r| (r, true)).collect()));
            }
            let n = def.groups.len().max(1);
            let mut results = Vec::new();
            for r in computed {
                results.extend(merge(r, previous, touched)?);
            }
            let merged_all =
                results.len() == n && results.iter().any(|(r, _)| r.counts.denominator > 0);
            Ok(merged_all.then_some(results))
        })
        .collect::<Result<_>>()?;
    let rest: Vec<&MeasureDef> = defs
        .iter()
        .zip(&merged)
        .filter(|(_, m)| m.is_none())
        .map(|(d, _)| *d)
        .collect();
    if !rest.is_empty() {
        tracing::info!(
            measures = %rest.iter().map(|d| d.id.as_str()).collect::<Vec<_>>().join(", "),
            "computed for every person (not person-local, or their results cannot be merged)"
        );
    }
    let mut rest = run(warehouse, queries, &rest, period)?.into_iter();
    let (mut out, mut unchanged) = (Vec::new(), std::collections::BTreeSet::new());
    for (def, m) in defs.iter().zip(merged) {
        let n = def.groups.len().max(1);
        match m {
            Some(merged) => {
                for (r, same) in merged {
                    if same {
                        unchanged.insert(r.key());
                    }
                    out.push(r);
                }
            }
            None => out.extend(rest.by_ref().take(n)),
        }
    }
    Ok((out, unchanged))
}

/// The columns of the person table (`patient`, over `core_person`) that
/// the queries of `defs` read, as DataFusion plans them: views inlined,
/// only the columns a query uses scanned (its filters' included). `None`
/// when that cannot be told: a query that does not plan as one statement
/// (it runs as written, see [`cte`]), or no linked core. Planning reads no
/// rows.
pub fn person_columns_read(
    warehouse: &Warehouse,
    queries: &Path,
    defs: &[&MeasureDef],
    period: Period,
) -> Option<std::collections::BTreeSet<String>> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::logical_expr::LogicalPlan;
    let read = crate::engine::block_on(async {
        let mut sessions: Vec<(&str, SessionContext)> = Vec::new();
        let mut columns = std::collections::BTreeSet::new();
        for def in defs {
            let i = match sessions.iter().position(|(l, _)| *l == def.library()) {
                Some(i) => i,
                None => {
                    let ctx =
                        session::session(warehouse, queries, period, def.library(), None).await?;
                    // One optimizer pass: what a plan scans is all that
                    // is asked.
                    let mut state = ctx.state();
                    state.config_mut().options_mut().optimizer.max_passes = 1;
                    sessions.push((def.library(), SessionContext::new_with_state(state)));
                    sessions.len() - 1
                }
            };
            let err = |source: BoxError| WardError::data("planning a measure", &def.sql, source);
            let sql = std::fs::read_to_string(&def.sql)
                .map_err(|e| WardError::io("cannot read", &def.sql, e))?;
            let plan = sessions[i]
                .1
                .sql(&sql)
                .await
                .and_then(|df| df.into_optimized_plan())
                .map_err(|e| err(e.into()))?;
            plan.apply_with_subqueries(|node| {
                if let LogicalPlan::TableScan(scan) = node
                    && scan.table_name.table() == "core_person"
                {
                    columns.extend(
                        scan.projected_schema
                            .fields()
                            .iter()
                            .map(|f| f.name().clone()),
                    );
                    for filter in &scan.filters {
                        columns.extend(filter.column_refs().into_iter().map(|c| c.name.clone()));
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .map_err(|e| err(e.into()))?;
        }
        Ok::<_, WardError>(columns)
    });
    match read {
        Ok(columns) if warehouse.reads_core() => Some(columns),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(error = %e, "the person columns the measures read cannot be told: every column counts");
            None
        }
    }
}

/// `r` (the touched persons' rows) merged with the rows of the previous
/// mart of its key whose persons are not touched, in the order of a whole
/// run (by subject), and counted, with whether it is that mart's rows
/// unchanged (no touched person's row before or now); `None` when that
/// mart is missing or has other columns.
fn merge(
    r: MeasureResult,
    previous: &Path,
    touched: &crate::delta::Touched,
) -> Result<Option<(MeasureResult, bool)>> {
    use datafusion::arrow::compute::filter_record_batch;
    let path = mart_path(previous, &r.key());
    let (schema, old) = match read_mart(&path) {
        Ok(Some(mart)) => mart,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::warn!(error = %e, "{MART_UNREADABLE}");
            return Ok(None);
        }
    };
    if schema.fields() != r.schema.fields() {
        return Ok(None);
    }
    let err = |source: BoxError| WardError::data("merging a measure mart", &path, source);
    let mut rows = Vec::with_capacity(old.len());
    let mut dropped = false;
    for b in old {
        let drop = touched.mask(&b).map_err(err)?;
        match drop.true_count() {
            0 => rows.push(b),
            _ => {
                dropped = true;
                let keep = datafusion::arrow::compute::not(&drop).map_err(|e| err(e.into()))?;
                rows.push(filter_record_batch(&b, &keep).map_err(|e| err(e.into()))?);
            }
        }
    }
    // No row of the touched persons before or now: the mart as it was.
    let unchanged = !dropped && r.rows.iter().all(|b| b.num_rows() == 0);
    let rows = match unchanged {
        true => rows,
        false => {
            let column = r.def.basis.subject_column();
            merged_by_subject(&r.schema, column, &r.rows, rows).map_err(err)?
        }
    };
    let result = MeasureResult {
        rows,
        counts: Counts::default(),
        empty: None,
        ..r
    };
    Ok(Some((tally(result).map_err(|m| err(m.into()))?, unchanged)))
}

/// The kept rows of a mart (`kept`, in a whole run's order: by the subject
/// `column`, ascending, nulls last) with the computed rows `fresh`, in that
/// order and in slices of [`MART_BATCH`]: merged, or sorted when the kept
/// rows are not in order.
fn merged_by_subject(
    schema: &SchemaRef,
    column: &str,
    fresh: &[RecordBatch],
    kept: Vec<RecordBatch>,
) -> std::result::Result<Vec<RecordBatch>, BoxError> {
    use datafusion::arrow::compute::{
        SortOptions, concat_batches, interleave_record_batch, sort_to_indices, take_record_batch,
    };
    // Rows sorted by subject as a whole run orders them.
    let sorted = |batches: &[&RecordBatch]| -> std::result::Result<RecordBatch, BoxError> {
        let all = concat_batches(schema, batches.iter().copied())?;
        let options = SortOptions {
            descending: false,
            nulls_first: false,
        };
        let subjects = all.column_by_name(column).ok_or("no subject column")?;
        let order = sort_to_indices(subjects, Some(options), None)?;
        Ok(take_record_batch(&all, &order)?)
    };
    let fresh = sorted(&fresh.iter().collect::<Vec<_>>())?;
    let mut inputs: Vec<&RecordBatch> = kept.iter().collect();
    inputs.push(&fresh);
    let subjects: Vec<&StringArray> = inputs
        .iter()
        .map(|b| {
            b.column_by_name(column)
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or("the subject column is not text")
        })
        .collect::<std::result::Result<_, _>>()?;
    let subject = |(b, i): (usize, usize)| subjects[b].is_valid(i).then(|| subjects[b].value(i));
    // Ascending, nulls last.
    let before = |a: Option<&str>, b: Option<&str>| match (a, b) {
        (Some(a), Some(b)) => a <= b,
        (a, b) => b.is_none() || a.is_some(),
    };
    let fresh_at = inputs.len() - 1;
    let mut kept_rows = kept
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| (0..batch.num_rows()).map(move |i| (b, i)))
        .peekable();
    let mut fresh_rows = (0..fresh.num_rows()).map(|i| (fresh_at, i)).peekable();
    let mut order = Vec::with_capacity(inputs.iter().map(|b| b.num_rows()).sum());
    let mut last_kept = None;
    loop {
        let at = match (kept_rows.peek(), fresh_rows.peek()) {
            (Some(&k), Some(&f)) if before(subject(k), subject(f)) => kept_rows.next(),
            (Some(_), Some(_)) | (None, Some(_)) => fresh_rows.next(),
            (Some(_), None) => kept_rows.next(),
            (None, None) => break,
        }
        .expect("peeked");
        if at.0 != fresh_at {
            if last_kept.is_some_and(|last| !before(subject(last), subject(at))) {
                // Not a whole run's order: sorted instead.
                return Ok(slices(&sorted(&inputs)?));
            }
            last_kept = Some(at);
        }
        order.push(at);
    }
    // Taken slice by slice: each batch owns its buffers (a slice of one
    // large batch would count the whole batch's memory wherever it goes).
    Ok(order
        .chunks(MART_BATCH)
        .map(|at| interleave_record_batch(&inputs, at))
        .collect::<std::result::Result<_, _>>()?)
}

/// A mart's schema and rows, `None` when there is no file.
fn read_mart(path: &Path) -> Result<Option<(SchemaRef, Vec<RecordBatch>)>> {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    if !path.is_file() {
        return Ok(None);
    }
    let err = |source: BoxError| WardError::data("reading a measure mart", path, source);
    let file = std::fs::File::open(path).map_err(|e| WardError::io("cannot open", path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| err(e.into()))?
        .with_batch_size(MART_BATCH);
    let schema = reader.schema().clone();
    let rows = reader
        .build()
        .map_err(|e| err(e.into()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| err(e.into()))?;
    Ok(Some((schema, rows)))
}

/// The mart of a result: `marts/measure_patient/<key>.parquet` under `out`.
pub fn mart_path(out: &Path, key: &str) -> PathBuf {
    out.join("marts")
        .join("measure_patient")
        .join(format!("{key}.parquet"))
}

/// `def`'s results as a run under `out` wrote them to its marts
/// ([`write_marts`]), counted again: what [`run`] gives on the same core
/// tables, queries and period. `None` when a group's mart is missing, or
/// when every denominator is empty (explaining an empty denominator takes
/// the engine: run the measure instead).
pub fn read_marts(
    out: &Path,
    def: &MeasureDef,
    period: Period,
) -> Result<Option<Vec<MeasureResult>>> {
    let groups: Vec<Option<&GroupDef>> = if def.groups.is_empty() {
        vec![None]
    } else {
        def.groups.iter().map(Some).collect()
    };
    let mut results = Vec::new();
    for group in groups {
        let key = group.map_or(def.id.clone(), |g| format!("{}.{}", def.id, g.id));
        let path = mart_path(out, &key);
        let Some((schema, rows)) = read_mart(&path)? else {
            return Ok(None);
        };
        let err = |source: BoxError| WardError::data("reading a measure mart", &path, source);
        let result = MeasureResult {
            def: def.clone(),
            group: group.cloned(),
            period,
            counts: Counts::default(),
            score: None,
            strata: Vec::new(),
            categories: BTreeMap::new(),
            rows,
            schema,
            empty: None,
        };
        results.push(tally(result).map_err(|m| err(m.into()))?);
    }
    Ok((!results.iter().all(|r| r.counts.denominator == 0)).then_some(results))
}

/// Runs one measure; with `explain`, a measure whose every denominator is
/// empty says why ([`MeasureResult::empty`]).
async fn run_one(
    ctx: &SessionContext,
    def: &MeasureDef,
    period: Period,
    profile: Option<&Path>,
    explain: bool,
) -> Result<Vec<MeasureResult>> {
    let err = |source: BoxError| WardError::data("running measure", def.sql.clone(), source);
    let sql =
        std::fs::read_to_string(&def.sql).map_err(|e| WardError::io("cannot read", &def.sql, e))?;
    let view = table_name(&format!("measure_raw_{}", def.id));
    let planned = cte::plan(ctx, &sql, &view)
        .await
        .map_err(|e| err(e.into()))?;
    let raw = planned.query;
    let schema = raw.schema().as_arrow().clone();
    check_columns(def, &schema).map_err(|m| err(m.into()))?;
    ctx.register_table(view.as_str(), raw.into_view())
        .map_err(|e| err(e.into()))?;
    let df = ctx
        .sql(&scoring_sql(def, &schema, &view, period))
        .await
        .map_err(|e| err(e.into()))?;
    let schema = plain_schema(df.schema().as_arrow());
    let task = Arc::new(df.task_ctx());
    let plan = df.create_physical_plan().await.map_err(|e| err(e.into()))?;
    let rows = datafusion::physical_plan::collect(plan.clone(), task)
        .await
        .map_err(|e| err(e.into()))?;
    for table in &planned.tables {
        ctx.deregister_table(table.as_str())
            .map_err(|e| err(e.into()))?;
    }
    if let Some(dir) = profile {
        let path = dir.join(format!("{}.txt", def.id));
        std::fs::write(&path, profile_text(def, plan.as_ref()))
            .map_err(|e| WardError::io("cannot write", &path, e))?;
    }
    let rows: Vec<RecordBatch> = rows
        .into_iter()
        .filter(|b| b.num_rows() > 0)
        .map(|b| plain_strings(&b, &schema))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(e.into()))?;

    // One result per group (one for a measure without groups).
    let groups: Vec<Option<&GroupDef>> = if def.groups.is_empty() {
        vec![None]
    } else {
        def.groups.iter().map(Some).collect()
    };
    let grouped = split_by_group(def, rows).map_err(|m| err(m.into()))?;
    let mut results = Vec::new();
    for (group, rows) in groups.into_iter().zip(grouped) {
        let result = MeasureResult {
            def: def.clone(),
            group: group.cloned(),
            period,
            counts: Counts::default(),
            score: None,
            strata: Vec::new(),
            categories: BTreeMap::new(),
            rows,
            schema: schema.clone(),
            empty: None,
        };
        results.push(tally(result).map_err(|m| err(m.into()))?);
    }
    if explain && results.iter().all(|r| r.counts.denominator == 0) {
        let empty = empty_denominator(ctx, &sql)
            .await
            .map_err(|e| err(format!("explaining the empty denominator: {e}").into()))?;
        for r in &mut results {
            r.empty = Some(empty.clone());
        }
    }
    Ok(results)
}

/// `name` as a session table name that reads the same in SQL and in the
/// catalog: lower-case letters, digits and `_` only.
fn table_name(name: &str) -> String {
    name.chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c.to_ascii_lowercase(),
            false => '_',
        })
        .collect()
}

/// A measure's executed plan with its metrics, after a table of the
/// operators that took the most compute time.
fn profile_text(def: &MeasureDef, plan: &dyn datafusion::physical_plan::ExecutionPlan) -> String {
    use datafusion::physical_plan::display::DisplayableExecutionPlan;
    fn walk(
        plan: &dyn datafusion::physical_plan::ExecutionPlan,
        depth: usize,
        out: &mut Vec<(usize, usize, usize, String)>,
    ) {
        let metrics = plan.metrics().map(|m| m.aggregate_by_name());
        let line = DisplayableExecutionPlan::new(plan).one_line().to_string();
        out.push((
            metrics
                .as_ref()
                .and_then(|m| m.elapsed_compute())
                .unwrap_or(0),
            metrics.as_ref().and_then(|m| m.output_rows()).unwrap_or(0),
            depth,
            line.chars().take(160).collect::<String>().trim_end().into(),
        ));
        for child in plan.children() {
            walk(child.as_ref(), depth + 1, out);
        }
    }
    let mut operators = Vec::new();
    walk(plan, 0, &mut operators);
    let total: usize = operators.iter().map(|o| o.0).sum();
    operators.sort_by_key(|o| std::cmp::Reverse(o.0));
    let mut text = format!(
        "{} ({}): compute time summed over operators and partitions {:.3} s\n\n\
         operators taking most compute time (depth = level in the plan below):\n\
         {:>10}  {:>6}  {:>12}  {:>5}  operator\n",
        def.id,
        def.sql.display(),
        total as f64 / 1e9,
        "seconds",
        "share",
        "rows out",
        "depth"
    );
    for (nanos, rows, depth, line) in operators.iter().take(15) {
        text.push_str(&format!(
            "{:>10.3}  {:>5.1}%  {rows:>12}  {depth:>5}  {line}\n",
            *nanos as f64 / 1e9,
            100.0 * *nanos as f64 / total.max(1) as f64,
        ));
    }
    text.push_str("\nplan with metrics:\n");
    text.push_str(
        &DisplayableExecutionPlan::with_metrics(plan)
            .indent(true)
            .to_string(),
    );
    text
}

/// The columns a measure's query must return (its populations, the subject,
/// `group_id` with groups, every stratifier), and stratifiers that can be
/// shown as text.
fn check_columns(def: &MeasureDef, schema: &Schema) -> std::result::Result<(), String> {
    let subject = def.basis.subject_column();
    let mut required: Vec<&str> = def
        .scoring
        .required()
        .iter()
        .copied()
        .chain(["person_id", subject])
        .collect();
    if !def.groups.is_empty() {
        required.push("group_id");
    }
    required.extend(def.stratifiers.iter().map(|s| s.column.as_str()));
    for column in required {
        if schema.field_with_name(column).is_err() {
            return Err(format!("the query returns no column '{column}'"));
        }
    }
    // A stratum is a value shown as text: a list or a struct is not one.
    for st in &def.stratifiers {
        let field = schema.field_with_name(&st.column).expect("checked above");
        if !datafusion::arrow::compute::can_cast_types(field.data_type(), &DataType::Utf8) {
            return Err(format!(
                "stratifier column '{}' is of type {}: a stratum must be a boolean or a text",
                st.column,
                field.data_type()
            ));
        }
    }
    Ok(())
}

/// The SQL that scores a measure query's rows (registered as `view`, with
/// `schema`): each population slot's criterion made NULL-safe, the
/// scoring's population rules applied, ids as text, the other columns as
/// returned, ordered by group and subject. The period is written as two
/// literals: a cross join with the one-row `period` table made DataFusion
/// emit one batch per scored row (2.9 s of CMS2's 26 s at 1M persons).
fn scoring_sql(def: &MeasureDef, schema: &Schema, view: &str, period: Period) -> String {
    let subject = def.basis.subject_column();
    // Each population slot's criterion, NULL-safe; an optional population
    // the query does not return is false.
    let columns = def.scoring.columns();
    let flag: Vec<String> = columns
        .iter()
        .map(|c| match c {
            Some(c) if schema.field_with_name(c).is_ok() => {
                format!("coalesce(CAST(\"{c}\" AS BOOLEAN), false)")
            }
            _ => "false".into(),
        })
        .collect();
    // The scoring's population rules, one expression per slot (over the
    // criteria c0..c4), and the observation of a continuous variable.
    let rules: [&str; 5] = match def.scoring {
        Scoring::Proportion => [
            "c0",
            "c1",
            "c1 AND c2",
            "c1 AND NOT c2 AND NOT c4 AND c3",
            "c1 AND NOT c2 AND c4",
        ],
        Scoring::Ratio => ["c0", "c1", "c1 AND c2", "c4 AND c3", "c4"],
        Scoring::ContinuousVariable => ["c0", "c1", "c1 AND c2", "false", "false"],
    };
    let scored_columns: String = columns
        .iter()
        .zip(rules)
        .filter_map(|(c, rule)| c.map(|c| format!(", {rule} AS \"{c}\"")))
        .collect();
    let (observation_in, observation_out) = if def.scoring == Scoring::ContinuousVariable {
        (
            format!(", CAST(\"{OBSERVATION}\" AS DOUBLE) AS obs"),
            format!(", CASE WHEN c1 AND NOT c2 THEN obs END AS \"{OBSERVATION}\""),
        )
    } else {
        (String::new(), String::new())
    };
    // Ids as text; the other columns as the query returns them.
    let ids = ["person_id", "encounter_id", "group_id"];
    let returned: Vec<&str> = ids
        .into_iter()
        .filter(|c| schema.field_with_name(c).is_ok())
        .collect();
    let id_columns: Vec<String> = returned
        .iter()
        .map(|c| format!("CAST(\"{c}\" AS VARCHAR) AS \"{c}\""))
        .collect();
    let details: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .filter(|n| !ids.contains(n) && !columns.contains(&Some(n)) && *n != OBSERVATION)
        .map(|n| format!(", \"{n}\""))
        .collect();
    let key: Vec<&str> = ["group_id", subject]
        .into_iter()
        .filter(|c| returned.contains(c))
        .collect();
    format!(
        "WITH c AS (SELECT {id_columns}, {c0} AS c0, {c1} AS c1, {c2} AS c2, {c3} AS c3, \
           {c4} AS c4{observation_in}{details} FROM {view} WHERE {c0}) \
         SELECT '{id}' AS measure_id, DATE '{start}' AS period_start, DATE '{end}' AS period_end, \
           {ids_out}{scored_columns}{observation_out}{details} \
         FROM c ORDER BY {order}",
        start = period.start,
        end = period.end,
        id_columns = id_columns.join(", "),
        c0 = flag[0],
        c1 = flag[1],
        c2 = flag[2],
        c3 = flag[3],
        c4 = flag[4],
        details = details.concat(),
        id = def.id.replace('\'', "''"),
        ids_out = returned
            .iter()
            .map(|c| format!("c.\"{c}\""))
            .collect::<Vec<_>>()
            .join(", "),
        order = key
            .iter()
            .map(|c| format!("c.\"{c}\""))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// The scored rows of each group of the measure, in its order (all in the
/// first for a measure without groups); a `group_id` the measure does not
/// declare is an error.
fn split_by_group(
    def: &MeasureDef,
    rows: Vec<RecordBatch>,
) -> std::result::Result<Vec<Vec<RecordBatch>>, String> {
    let mut grouped: Vec<Vec<RecordBatch>> = vec![Vec::new(); def.groups.len().max(1)];
    for b in rows {
        let Some(column) = b.column_by_name("group_id") else {
            grouped[0].push(b);
            continue;
        };
        let values = column.as_string::<i32>();
        if let Some(i) = (0..b.num_rows())
            .find(|&i| values.is_null(i) || !def.groups.iter().any(|g| g.id == values.value(i)))
        {
            return Err(format!(
                "group_id '{}' is not a group of the measure (known: {})",
                if values.is_null(i) {
                    "NULL"
                } else {
                    values.value(i)
                },
                def.groups
                    .iter()
                    .map(|g| g.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for (k, g) in def.groups.iter().enumerate() {
            let mask: datafusion::arrow::array::BooleanArray = values
                .iter()
                .map(|v| Some(v == Some(g.id.as_str())))
                .collect();
            let part = datafusion::arrow::compute::filter_record_batch(&b, &mask)
                .map_err(|e| e.to_string())?;
            if part.num_rows() > 0 {
                grouped[k].push(part);
            }
        }
    }
    Ok(grouped)
}

/// Counts a group's members (one row per subject, or an error), its score,
/// strata and categories.
fn tally(mut result: MeasureResult) -> std::result::Result<MeasureResult, String> {
    let def = &result.def;
    let subjects: usize = result.rows.iter().map(RecordBatch::num_rows).sum();
    let columns: Vec<&StringArray> = result
        .rows
        .iter()
        .map(|b| {
            b.column_by_name(def.basis.subject_column())
                .expect("scored rows")
                .as_string::<i32>()
        })
        .collect();
    let values = || {
        columns
            .iter()
            .flat_map(|c| (0..c.len()).map(|i| c.value(i)))
    };
    // In strict order (as marts are written), they are distinct; else
    // counted.
    let mut last = None;
    let ordered = values().all(|v| last.replace(v).is_none_or(|last| last < v));
    let distinct = match ordered {
        true => subjects,
        false => values().collect::<std::collections::HashSet<_>>().len(),
    };
    if distinct != subjects {
        return Err(format!(
            "the query returns {} rows for {} {}{}: one row per subject is required",
            subjects,
            distinct,
            def.basis.noun(),
            result
                .group
                .as_ref()
                .map_or(String::new(), |g| format!(" of group '{}'", g.id)),
        ));
    }
    let mut counts = Counts::default();
    let mut observations = Vec::new();
    // Per stratifier, per value: counts and observations.
    let mut by_value: Vec<BTreeMap<String, (Counts, Vec<f64>)>> =
        vec![BTreeMap::new(); def.stratifiers.len()];
    result.visit_members(|m| {
        counts.add(&m.flags);
        observations.extend(m.observation);
        for (values, value) in by_value.iter_mut().zip(m.strata) {
            let (c, obs) = value_entry(values, value);
            c.add(&m.flags);
            obs.extend(m.observation);
        }
    });
    let strata = def
        .stratifiers
        .iter()
        .zip(by_value)
        .flat_map(|(st, values)| {
            values
                .into_iter()
                .map(|(value, (counts, observations))| StratumCounts {
                    stratifier: st.id.clone(),
                    value,
                    score: score(def, &counts, &observations),
                    counts,
                })
        })
        .collect();
    let total = score(def, &counts, &observations);
    let categories = match &def.category {
        Some(column) => categories(&result.rows, column)?,
        None => BTreeMap::new(),
    };
    result.counts = counts;
    result.score = total;
    result.strata = strata;
    result.categories = categories;
    Ok(result)
}

/// The entry of `map` for the text `key`, inserted (default) when absent:
/// the key is copied only the first time it is seen, not per lookup.
pub(crate) fn value_entry<'m, V: Default>(
    map: &'m mut BTreeMap<String, V>,
    key: &str,
) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("just inserted")
}

/// The value-set OIDs a text names: quoted dotted numbers with at least
/// four parts (`'2.16.840.1.113883.3.464.1003.101.12.1001'` in SQL, also in
/// comments — harmless: an OID named is an OID looked for — or
/// `Utf8("…")` in a plan's display).
fn valueset_oids(text: &str) -> Vec<String> {
    static OID: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"['"]([0-9]+(?:\.[0-9]+){3,})['"]"#).expect("valid regex")
    });
    let mut out: Vec<String> = OID.captures_iter(text).map(|c| c[1].to_string()).collect();
    out.sort();
    out.dedup();
    out
}

async fn empty_denominator(
    ctx: &SessionContext,
    sql: &str,
) -> std::result::Result<EmptyDenominator, datafusion::error::DataFusionError> {
    // The measure's SQL and the shared views it reads, whose value sets
    // show only in the plan (views expanded).
    let plan = ctx.sql(sql).await?.into_optimized_plan()?;
    let oids = valueset_oids(&format!("{sql}\n{}", plan.display_indent()));
    let mut out = EmptyDenominator {
        valuesets: oids.len(),
        ..Default::default()
    };
    let list = if oids.is_empty() {
        "NULL".to_string()
    } else {
        oids.iter()
            .map(|o| format!("'{o}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let counts = |sql: String| async move {
        let batches = ctx.sql(&sql).await?.collect().await?;
        let mut rows = Vec::new();
        for b in &batches {
            let label = crate::engine::text(b.column(0))?;
            let n = b.column(1).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                rows.push((label.value(i).to_string(), n.value(i) as u64));
            }
        }
        Ok::<_, datafusion::error::DataFusionError>(rows)
    };
    let per_table: Vec<String> = Table::ALL
        .into_iter()
        .filter(|t| t.column("codings").is_some())
        .map(|t| {
            format!(
                "SELECT '{0}' AS t, count(DISTINCT person_id) AS n FROM {0}_vs \
                 WHERE valueset IN ({list})",
                t.name()
            )
        })
        .collect();
    out.persons_by_table = counts(per_table.join(" UNION ALL "))
        .await?
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    out.persons_by_table.sort();
    let in_period = "e.start_time >= p.start_ts AND e.start_time < p.end_ts";
    out.encounters_in_period = counts(format!(
        "SELECT 'all', count(*) FROM encounter e CROSS JOIN period p WHERE {in_period}"
    ))
    .await?
    .first()
    .map_or(0, |r| r.1);
    out.unmatched_encounter_codes = counts(format!(
        "SELECT concat(e.coding_system, ' ', e.coding_code) AS c, count(*) AS n \
         FROM encounter_coding e CROSS JOIN period p \
         WHERE {in_period} AND NOT EXISTS (SELECT 1 FROM valueset_code v \
           WHERE v.valueset IN ({list}) AND v.code_system = e.coding_system \
             AND v.code = e.coding_code) \
         GROUP BY 1 ORDER BY n DESC, c LIMIT 5"
    ))
    .await?
    .into_iter()
    .map(|(code, _)| code)
    .collect();
    Ok(out)
}

/// Counts the values of `column` among scored rows in the denominator and
/// neither excluded nor excepted (NULL counts as `(none)`).
fn categories(
    rows: &[RecordBatch],
    column: &str,
) -> std::result::Result<BTreeMap<String, u64>, String> {
    let mut out = BTreeMap::new();
    for b in rows {
        let values = b
            .column_by_name(column)
            .ok_or_else(|| format!("category column '{column}' is not returned by the query"))?;
        let values = crate::engine::text(values).map_err(|e| e.to_string())?;
        let flag = |name: &str| b.column_by_name(name).expect("scored").as_boolean().clone();
        let (den, ex, exc) = (
            flag("denominator"),
            flag("denominator_exclusion"),
            flag("denominator_exception"),
        );
        for i in 0..b.num_rows() {
            if den.value(i) && !ex.value(i) && !exc.value(i) {
                let v = if values.is_null(i) {
                    "(none)".to_string()
                } else {
                    values.value(i).to_string()
                };
                *out.entry(v).or_default() += 1;
            }
        }
    }
    Ok(out)
}

/// DataFusion hands strings out as Utf8View; marts store plain Utf8 so
/// every Parquet reader understands them.
fn plain_schema(schema: &datafusion::arrow::datatypes::Schema) -> SchemaRef {
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8View | DataType::LargeUtf8 => {
                Arc::new(f.as_ref().clone().with_data_type(DataType::Utf8))
            }
            _ => f.clone(),
        })
        .collect();
    Arc::new(datafusion::arrow::datatypes::Schema::new(fields))
}

fn plain_strings(b: &RecordBatch, schema: &SchemaRef) -> datafusion::error::Result<RecordBatch> {
    let columns = b
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| datafusion::arrow::compute::cast(c, f.data_type()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_column(values: &[Option<&str>]) -> ArrayRef {
        Arc::new(values.iter().copied().collect::<StringArray>())
    }

    fn batch(columns: &[(&str, &[Option<&str>])]) -> RecordBatch {
        RecordBatch::try_from_iter(
            columns
                .iter()
                .map(|(name, values)| (name.to_string(), text_column(values))),
        )
        .unwrap()
    }

    #[test]
    fn mart_rows_kept_and_computed_come_out_in_subject_order_merged_or_sorted() {
        let rows = |out: Vec<RecordBatch>| -> Vec<(Option<String>, String)> {
            out.iter()
                .flat_map(|b| {
                    let (s, v) = (
                        crate::engine::text(b.column(0)).unwrap(),
                        crate::engine::text(b.column(1)).unwrap(),
                    );
                    (0..b.num_rows())
                        .map(|i| {
                            let s = s.is_valid(i).then(|| s.value(i).to_string());
                            (s, v.value(i).to_string())
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let schema = Arc::new(Schema::new(vec![
            datafusion::arrow::datatypes::Field::new("subject", DataType::Utf8, true),
            datafusion::arrow::datatypes::Field::new("v", DataType::Utf8, true),
        ]));
        let part = |subjects: &[Option<&str>], values: &[Option<&str>]| {
            RecordBatch::try_new(
                schema.clone(),
                vec![text_column(subjects), text_column(values)],
            )
            .unwrap()
        };
        let want = vec![
            (Some("a".to_string()), "1".to_string()),
            (Some("b".to_string()), "2".to_string()),
            (Some("c".to_string()), "3".to_string()),
            (Some("d".to_string()), "4".to_string()),
            (None, "5".to_string()),
        ];
        // Kept in order over two batches, the computed rows in any order.
        let kept = vec![
            part(&[Some("a"), Some("c")], &[Some("1"), Some("3")]),
            part(&[None], &[Some("5")]),
        ];
        let fresh = [part(&[Some("d"), Some("b")], &[Some("4"), Some("2")])];
        let merged = merged_by_subject(&schema, "subject", &fresh, kept).unwrap();
        assert_eq!(rows(merged), want);
        // Kept out of order (not a file Ward wrote): sorted.
        let kept = vec![part(
            &[Some("c"), None, Some("a")],
            &[Some("3"), Some("5"), Some("1")],
        )];
        let sorted = merged_by_subject(&schema, "subject", &fresh, kept).unwrap();
        assert_eq!(rows(sorted), want);
    }

    #[test]
    fn care_gaps_follow_the_gaps_order_with_each_persons_records() {
        // Two measures' gaps, most urgent first; p2 has two records at
        // one provider and one at another, p3 none (no row), p1 one.
        let gaps = batch(&[
            ("measure_n", &[Some("0"), Some("0"), Some("1"), Some("1")]),
            ("measure_id", &[Some("A"), Some("A"), Some("B"), Some("B")]),
            (
                "action",
                &[Some("do a"), Some("do a"), Some("do b"), Some("do b")],
            ),
            ("details", &[Some("d1"), Some("d2"), Some("d3"), Some("d4")]),
            (
                "person_id",
                &[Some("p2"), Some("p3"), Some("p1"), Some("p2")],
            ),
        ]);
        let records = batch(&[
            (
                "person_id",
                &[Some("p1"), Some("p2"), Some("p2"), Some("p2")],
            ),
            ("provider", &[Some("x"), Some("x"), Some("x"), Some("y")]),
            (
                "source_patient_id",
                &[Some("1"), Some("2"), Some("3"), Some("9")],
            ),
            ("mrn", &[None, None, None, None]),
            ("given_name", &[None, None, None, None]),
            ("family_name", &[None, None, None, None]),
            ("birth_date", &[None, None, None, None]),
            (
                "other_providers",
                &[Some(""), Some("y"), Some("y"), Some("x")],
            ),
        ]);
        let mut out = Vec::new();
        join_care_gaps(&gaps, &records, Path::new("q"), &mut |b| {
            out.push(b);
            Ok(())
        })
        .unwrap();
        let rows: Vec<String> = out
            .iter()
            .flat_map(|b| {
                let col = |n: &str| crate::engine::text(b.column_by_name(n).unwrap()).unwrap();
                let (provider, measure, record, details) = (
                    col("provider"),
                    col("measure_id"),
                    col("source_patient_id"),
                    col("details"),
                );
                (0..b.num_rows())
                    .map(|i| {
                        format!(
                            "{} {} {} {}",
                            provider.value(i),
                            measure.value(i),
                            record.value(i),
                            details.value(i)
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            rows,
            [
                "x A 2 d1", "x A 3 d1", "y A 9 d1", "x B 1 d3", "x B 2 d4", "x B 3 d4", "y B 9 d4"
            ]
        );
        let names: Vec<String> = out[0]
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            names,
            [
                "provider",
                "measure_id",
                "source_patient_id",
                "mrn",
                "given_name",
                "family_name",
                "birth_date",
                "action",
                "details",
                "other_providers"
            ]
        );
    }

    #[test]
    fn care_gap_priority_is_an_order_by_list_and_nothing_more() {
        for ok in [
            "person_id",
            "last_result_pct DESC NULLS FIRST, person_id",
            "coalesce(days_since, 9999) DESC, person_id ASC",
        ] {
            check_order_by(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, needle) in [
            ("person_id) m; DROP TABLE x; --", "after an ORDER BY list"),
            ("person_id LIMIT 1", "after an ORDER BY list"),
            ("(SELECT max(x) FROM t)", "subquery"),
            ("", "not an ORDER BY list"),
        ] {
            let e = check_order_by(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn value_set_oids_are_the_quoted_dotted_numbers_of_the_sql() {
        let sql = "SELECT 1 FROM condition_vs WHERE valueset IN \
                   ('2.16.840.1.113883.3.464.1003.103.12.1001', -- the patient's\n \
                   '2.16.840.1.113883.3.464.1003.103.12.1001', '1.2.3', 'x.1.2.3', '9.8.7.6') \
                   AND value_num > 9.0 AND code = '4548-4'";
        assert_eq!(
            valueset_oids(sql),
            ["2.16.840.1.113883.3.464.1003.103.12.1001", "9.8.7.6"]
        );
        let plan = r#"Filter: condition_vs.valueset = Utf8("2.16.840.1.113883.3.464.1003.1165")"#;
        assert_eq!(valueset_oids(plan), ["2.16.840.1.113883.3.464.1003.1165"]);
    }
}
