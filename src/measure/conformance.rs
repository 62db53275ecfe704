//! Conformance against an eCQM test deck (a MADiE export): one folder per
//! test case holding a FHIR Bundle of the patient's record (or the record's
//! resources as separate files) and the expected individual MeasureReport. Every case is loaded through the normal FHIR
//! ingest into a scratch warehouse (the patient ids keep cases apart), the
//! measure runs once per distinct reporting period, and every population
//! count of every case is compared: of every group (matched by position),
//! and of the `true` stratum of every stratifier the measure defines
//! (matched by position; MADiE's `false` strata are not CQL-evaluated
//! populations — they can count a numerator outside the initial
//! population — so they are not compared). An encounter-based measure
//! counts the case's encounters.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde_json::Value;

use super::{MeasureDef, OBSERVATION, Scoring};
use crate::error::{Result, WardError};
use crate::ingest::{self, FileStatus, IngestOptions};
use crate::ingest::{SourceConfig, SourceFormat};
use crate::measure::Period;
use crate::warehouse::Warehouse;

/// One test case's outcome.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case's name from the deck's README (or its folder name).
    pub name: String,
    pub folder: String,
    pub period: Period,
    /// Expected and computed counts: one scope per group, and per `true`
    /// stratum of each group.
    pub scopes: Vec<Scope>,
    /// Rejected resources of the case's bundle, by rule (they may explain a
    /// failure).
    pub rejects: BTreeMap<String, u64>,
}

/// The compared counts of one group, or of one stratum of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Empty for the only group of a measure without strata; else
    /// `group 2` or `group 1, Stratification 1`.
    pub label: String,
    /// Expected and computed count per population column name.
    pub expected: BTreeMap<String, u64>,
    pub actual: BTreeMap<String, u64>,
}

impl Scope {
    pub fn passed(&self) -> bool {
        self.expected
            .iter()
            .all(|(p, n)| self.actual.get(p).copied().unwrap_or(0) == *n)
    }
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.scopes.iter().all(Scope::passed)
    }
}

/// The deck's outcome.
#[derive(Debug, Clone)]
pub struct Conformance {
    pub measure: String,
    pub cases: Vec<CaseResult>,
}

impl Conformance {
    pub fn failures(&self) -> usize {
        self.cases.iter().filter(|c| !c.passed()).count()
    }
}

struct Case {
    folder: String,
    /// The case's Bundle file, or the folder of its resource files.
    path: PathBuf,
    bundle: Value,
    patient: String,
    period: Period,
    /// Per group (in report order): the populations' expected counts, and
    /// per stratifier (in order) the `true` stratum's, when given.
    expected: Vec<ExpectedGroup>,
    description: Option<String>,
}

struct ExpectedGroup {
    populations: BTreeMap<String, u64>,
    strata: Vec<Option<BTreeMap<String, u64>>>,
}

/// Runs `def` against every case of `deck`, using `scratch` as the
/// warehouse (it is emptied first).
pub fn run(deck: &Path, def: &MeasureDef, queries: &Path, scratch: &Path) -> Result<Conformance> {
    let cases = read_deck(deck, def)?;
    let names = case_names(deck);
    let (warehouse, mut rejects) = load_cases(&cases, scratch)?;
    let periods: BTreeSet<(NaiveDate, NaiveDate)> = cases
        .iter()
        .map(|c| (c.period.start, c.period.end))
        .collect();
    let mut results = Vec::new();
    for (start, end) in periods {
        let period = Period { start, end };
        let outcome = super::run(&warehouse, queries, &[def], period)?;
        let members: Vec<Vec<super::Member>> = outcome.iter().map(|r| r.members()).collect();
        for case in cases.iter().filter(|c| c.period == period) {
            results.push(CaseResult {
                name: names
                    .get(&case.folder)
                    .cloned()
                    .or_else(|| case.description.clone())
                    .unwrap_or_else(|| case.folder.clone()),
                folder: case.folder.clone(),
                period,
                scopes: case_scopes(case, def, &members),
                rejects: rejects.remove(&case.folder).unwrap_or_default(),
            });
        }
    }
    results.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Conformance {
        measure: def.id.clone(),
        cases: results,
    })
}

/// Rejected resources by rule.
type Rejects = BTreeMap<String, u64>;

/// Ingests every case's Bundle into a scratch warehouse under `scratch`
/// (emptied first); returns the warehouse and each case's rejects by rule,
/// per case folder. A file that fails to load fails the run.
fn load_cases(cases: &[Case], scratch: &Path) -> Result<(Warehouse, BTreeMap<String, Rejects>)> {
    if scratch.exists() {
        fs::remove_dir_all(scratch).map_err(|e| WardError::io("cannot empty", scratch, e))?;
    }
    let input = scratch.join("input");
    fs::create_dir_all(&input).map_err(|e| WardError::io("cannot create", &input, e))?;
    for case in cases {
        let to = input.join(format!("{}.json", case.folder));
        let text = serde_json::to_vec(&case.bundle)
            .map_err(|e| WardError::data("writing a test case", case.path.clone(), e))?;
        fs::write(&to, text).map_err(|e| WardError::io("cannot write", &to, e))?;
    }
    let warehouse = scratch.join("warehouse");
    let source = SourceConfig {
        name: "deck".into(),
        format: SourceFormat::FhirBundle,
        pattern: input.join("*.json").to_string_lossy().into_owned(),
        mapping: None,
        nightly: false,
    };
    // Test decks are dated around their measurement period, often in the
    // future: no date is "future" here.
    let opts = IngestOptions {
        today: NaiveDate::from_ymd_opt(9999, 12, 31).expect("valid date"),
        dry_run: false,
        ..Default::default()
    };
    let report = ingest::ingest(&warehouse, std::slice::from_ref(&source), &opts, &())?;
    let mut rejects: BTreeMap<String, Rejects> = BTreeMap::new();
    for f in &report.files {
        if f.status == FileStatus::Failed {
            return Err(WardError::data(
                "loading a test case",
                input.join(&f.file),
                f.detail.clone().unwrap_or_default(),
            ));
        }
        let folder = f.file.trim_end_matches(".json").to_string();
        rejects.insert(folder, f.rejects_by_rule.clone());
    }
    Ok((Warehouse::new(&warehouse), rejects))
}

/// The case's expected and computed counts: per group, and per `true`
/// stratum the case gives of a stratifier the measure defines.
fn case_scopes(case: &Case, def: &MeasureDef, members: &[Vec<super::Member>]) -> Vec<Scope> {
    let person = format!("deck/{}", case.patient);
    let count = |group: usize, stratum: Option<usize>| {
        computed_counts(
            def,
            members.get(group).map_or(&[], Vec::as_slice),
            &person,
            stratum,
        )
    };
    let plain = case.expected.len() == 1 && case.expected[0].strata.is_empty();
    let mut scopes = Vec::new();
    for (g, expected) in case.expected.iter().enumerate() {
        let group = if plain {
            String::new()
        } else {
            format!("group {}", g + 1)
        };
        scopes.push(Scope {
            label: group.clone(),
            expected: expected.populations.clone(),
            actual: count(g, None),
        });
        for (k, stratum) in expected.strata.iter().enumerate() {
            let (Some(stratum), Some(st)) = (stratum, def.stratifiers.get(k)) else {
                continue;
            };
            scopes.push(Scope {
                label: format!("{group}, {}", st.id),
                expected: stratum.clone(),
                actual: count(g, Some(k)),
            });
        }
    }
    scopes
}

/// The population counts of `person` among a group's `members` (only those
/// in the `true` stratum of stratifier `stratum`, if given), per population
/// column of the measure's scoring.
fn computed_counts(
    def: &MeasureDef,
    members: &[super::Member],
    person: &str,
    stratum: Option<usize>,
) -> BTreeMap<String, u64> {
    let mut counts = super::Counts::default();
    for m in members {
        if m.person == person && stratum.is_none_or(|k| m.strata[k] == "true") {
            counts.add(&m.flags);
        }
    }
    let values = [
        counts.initial_population,
        counts.denominator,
        counts.denominator_exclusion,
        counts.denominator_exception,
        counts.numerator,
    ];
    let mut out: BTreeMap<String, u64> = def
        .scoring
        .columns()
        .into_iter()
        .zip(values)
        .filter_map(|(p, n)| Some((p?.to_string(), n)))
        .collect();
    if def.scoring == Scoring::ContinuousVariable {
        out.insert(OBSERVATION.into(), counts.performance(def.scoring));
    }
    out
}

/// Case folder → name, from the deck's `README.txt`: lines
/// `Case # 12 - <folder> = <name>` or `<folder> = <name>`.
fn case_names(deck: &Path) -> BTreeMap<String, String> {
    let text = fs::read_to_string(deck.join("README.txt")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = match l.strip_prefix("Case #") {
                Some(rest) => rest.split_once(" - ")?.1,
                None => l,
            };
            let (id, name) = rest.split_once(" = ")?;
            let id = id.trim();
            (!id.is_empty() && !id.contains(' ')).then(|| (id.to_string(), name.trim().to_string()))
        })
        .collect()
}

fn read_deck(deck: &Path, def: &MeasureDef) -> Result<Vec<Case>> {
    let entries = fs::read_dir(deck).map_err(|e| WardError::io("cannot read", deck, e))?;
    let mut folders: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    let mut cases = Vec::new();
    // Folders that hold folders: decks, when pointed one level too high.
    let mut decks = Vec::new();
    for folder in folders {
        let nested = fs::read_dir(&folder)
            .map_err(|e| WardError::io("cannot read", &folder, e))?
            .filter_map(|e| e.ok())
            .any(|e| e.path().is_dir());
        if nested {
            decks.push(folder);
        } else if let Some(case) = read_case(&folder, def)? {
            cases.push(case);
        }
    }
    if cases.is_empty() && !decks.is_empty() {
        let names: Vec<String> = decks.iter().map(|d| d.display().to_string()).collect();
        return Err(WardError::Config {
            path: deck.to_path_buf(),
            line: None,
            column: None,
            key: Some("--deck".into()),
            message: format!(
                "no test case here, but folders of folders: is the deck one level down? \
                 point --deck at one of: {}",
                names.join(", ")
            ),
        });
    }
    if cases.is_empty() {
        return Err(WardError::Config {
            path: deck.to_path_buf(),
            line: None,
            column: None,
            key: Some("--deck".into()),
            message: "no test case found (expected one folder per case holding a Bundle, \
                      or the resource files, with the expected MeasureReport)"
                .into(),
        });
    }
    Ok(cases)
}

/// An error in a test case's files.
fn bad(path: &Path, message: String) -> WardError {
    WardError::data("reading a test case", path, message)
}

/// Reads a case folder: the Bundle (or, without one, the resources as
/// separate files, gathered into a collection Bundle) and the expected
/// MeasureReport (inside the Bundle or beside it). `None` when the folder
/// holds no patient record.
fn read_case(folder: &Path, def: &MeasureDef) -> Result<Option<Case>> {
    let files = read_case_files(folder)?;
    let (path, json) = match files.bundle {
        Some(found) => found,
        None if files
            .resources
            .iter()
            .any(|r| r["resourceType"] == "Patient") =>
        {
            (
                folder.to_path_buf(),
                collection_bundle(folder, files.resources)?,
            )
        }
        None => return Ok(None),
    };
    let report = files
        .reports
        .into_iter()
        .next()
        .ok_or_else(|| bad(folder, "no expected MeasureReport".into()))?;
    let patient = json["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["resource"]["resourceType"] == "Patient")
        .and_then(|e| e["resource"]["id"].as_str())
        .ok_or_else(|| bad(&path, "the Bundle has no Patient with an id".into()))?
        .to_string();
    let date = |key: &str| {
        report["period"][key]
            .as_str()
            .and_then(|s| s.get(..10))
            .and_then(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
            .ok_or_else(|| bad(&path, format!("MeasureReport.period.{key} is not a date")))
    };
    let period = Period {
        start: date("start")?,
        end: date("end")?,
    };
    let expected = expected_groups(&report, def, &path)?;
    let description = report["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            e["url"]
                .as_str()
                .is_some_and(|u| u.ends_with("cqfm-testCaseDescription"))
        })
        .and_then(|e| e["valueMarkdown"].as_str())
        .map(str::to_string);
    Ok(Some(Case {
        folder: folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        path,
        bundle: json,
        patient,
        period,
        expected,
        description,
    }))
}

/// The JSON files of a case folder, sorted by what they hold.
struct CaseFiles {
    /// The Bundle file and its content (at most one per folder).
    bundle: Option<(PathBuf, Value)>,
    /// MeasureReports: inside the Bundle, or files of their own.
    reports: Vec<Value>,
    /// Any other resources, each a file of its own.
    resources: Vec<Value>,
}

/// Reads every `.json` file of a case folder, in name order.
fn read_case_files(folder: &Path) -> Result<CaseFiles> {
    let mut files: Vec<PathBuf> = fs::read_dir(folder)
        .map_err(|e| WardError::io("cannot read", folder, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = CaseFiles {
        bundle: None,
        reports: Vec::new(),
        resources: Vec::new(),
    };
    for file in files {
        let bytes = fs::read(&file).map_err(|e| WardError::io("cannot read", &file, e))?;
        let json: Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(&file, format!("not JSON: {e}")))?;
        match json["resourceType"].as_str() {
            Some("Bundle") => {
                for e in json["entry"].as_array().into_iter().flatten() {
                    if e["resource"]["resourceType"] == "MeasureReport" {
                        out.reports.push(e["resource"].clone());
                    }
                }
                if out.bundle.is_some() {
                    return Err(bad(folder, "more than one Bundle in a case folder".into()));
                }
                out.bundle = Some((file, json));
            }
            Some("MeasureReport") => out.reports.push(json),
            Some(_) => out.resources.push(json),
            None => {}
        }
    }
    Ok(out)
}

/// A case's separate resource files as one collection Bundle; refused with
/// more than one Patient.
fn collection_bundle(folder: &Path, resources: Vec<Value>) -> Result<Value> {
    let patients = resources
        .iter()
        .filter(|r| r["resourceType"] == "Patient")
        .count();
    if patients > 1 {
        return Err(bad(
            folder,
            format!("{patients} Patient resources in one case folder"),
        ));
    }
    let entry: Vec<Value> = resources
        .into_iter()
        .map(|r| serde_json::json!({ "resource": r }))
        .collect();
    Ok(serde_json::json!({
        "resourceType": "Bundle", "type": "collection", "entry": entry
    }))
}

/// The expected counts of the MeasureReport `report` (of the case file
/// `path`): per group, the populations and the `true` stratum of each
/// stratifier. The groups must be the measure's, the stratifiers at most
/// the measure's.
fn expected_groups(report: &Value, def: &MeasureDef, path: &Path) -> Result<Vec<ExpectedGroup>> {
    let groups = report["group"].as_array().cloned().unwrap_or_default();
    let wanted = def.groups.len().max(1);
    if groups.len() != wanted {
        return Err(bad(
            path,
            format!(
                "the MeasureReport has {} groups; measure {} has {wanted}",
                groups.len(),
                def.id
            ),
        ));
    }
    let mut expected = Vec::new();
    for group in &groups {
        let mut strata = Vec::new();
        for st in group["stratifier"].as_array().into_iter().flatten() {
            let truth = st["stratum"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["value"]["text"] == "true")
                .map(|s| expected_populations(&s["population"], def, path))
                .transpose()?;
            strata.push(truth);
        }
        if strata.len() > def.stratifiers.len() {
            return Err(bad(
                path,
                format!(
                    "the MeasureReport has {} stratifiers per group; measure {} defines {}",
                    strata.len(),
                    def.id,
                    def.stratifiers.len()
                ),
            ));
        }
        expected.push(ExpectedGroup {
            populations: expected_populations(&group["population"], def, path)?,
            strata,
        });
    }
    Ok(expected)
}

/// A MeasureReport population list as counts per population column; a
/// population the measure's scoring does not have is refused.
fn expected_populations(
    list: &Value,
    def: &MeasureDef,
    path: &Path,
) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for p in list.as_array().into_iter().flatten() {
        let code = p["code"]["coding"][0]["code"].as_str().unwrap_or_default();
        let column = code.replace('-', "_");
        let known = def.scoring.columns().contains(&Some(column.as_str()))
            || (def.scoring == Scoring::ContinuousVariable && column == OBSERVATION);
        if !known {
            return Err(bad(path, format!("population '{code}' is not supported")));
        }
        out.insert(column, p["count"].as_u64().unwrap_or(0));
    }
    Ok(out)
}
