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
use crate::config::{Period, PipelineConfig, SourceConfig, SourceFormat};
use crate::error::{Result, WardError};
use crate::ingest::{self, FileStatus, IngestOptions};
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
    if scratch.exists() {
        fs::remove_dir_all(scratch).map_err(|e| WardError::io("cannot empty", scratch, e))?;
    }
    let input = scratch.join("input");
    fs::create_dir_all(&input).map_err(|e| WardError::io("cannot create", &input, e))?;
    for case in &cases {
        let to = input.join(format!("{}.json", case.folder));
        let text = serde_json::to_vec(&case.bundle).map_err(|e| WardError::Data {
            context: "writing a test case",
            path: case.path.clone(),
            message: e.to_string(),
        })?;
        fs::write(&to, text).map_err(|e| WardError::io("cannot write", &to, e))?;
    }
    let config = PipelineConfig {
        path: scratch.join("conformance.toml"),
        warehouse: scratch.join("warehouse"),
        warehouse_group: None,
        measurement_period: None,
        as_of: None,
        queries: Some(queries.to_path_buf()),
        link: Default::default(),
        min_cell_size: 11,
        keep_runs: 1,
        gates: Default::default(),
        deid: Default::default(),
        sources: vec![SourceConfig {
            name: "deck".into(),
            format: SourceFormat::FhirBundle,
            pattern: input.join("*.json").to_string_lossy().into_owned(),
            mapping: None,
            nightly: false,
        }],
    };
    // Test decks are dated around their measurement period, often in the
    // future: no date is "future" here.
    let opts = IngestOptions {
        today: NaiveDate::from_ymd_opt(9999, 12, 31).expect("valid date"),
        dry_run: false,
        ..Default::default()
    };
    let report = ingest::ingest(&config, &opts, &())?;
    let mut rejects: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for f in &report.files {
        if f.status == FileStatus::Failed {
            return Err(WardError::Data {
                context: "loading a test case",
                path: input.join(&f.file),
                message: f.detail.clone().unwrap_or_default(),
            });
        }
        let folder = f.file.trim_end_matches(".json").to_string();
        rejects.insert(folder, f.rejects_by_rule.clone());
    }

    let warehouse = Warehouse::new(&config.warehouse);
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
            let person = format!("deck/{}", case.patient);
            let count = |group: usize, stratum: Option<usize>| {
                let mut counts = super::Counts::default();
                for m in members.get(group).into_iter().flatten() {
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
            results.push(CaseResult {
                name: names
                    .get(&case.folder)
                    .cloned()
                    .or_else(|| case.description.clone())
                    .unwrap_or_else(|| case.folder.clone()),
                folder: case.folder.clone(),
                period,
                scopes,
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

/// Reads a case folder: the Bundle (or, without one, the resources as
/// separate files, gathered into a collection Bundle) and the expected
/// MeasureReport (inside the Bundle or beside it). `None` when the folder
/// holds no patient record.
fn read_case(folder: &Path, def: &MeasureDef) -> Result<Option<Case>> {
    let bad = |path: &Path, message: String| WardError::Data {
        context: "reading a test case",
        path: path.to_path_buf(),
        message,
    };
    let mut files: Vec<PathBuf> = fs::read_dir(folder)
        .map_err(|e| WardError::io("cannot read", folder, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut bundle = None;
    let mut reports = Vec::new();
    let mut resources = Vec::new();
    for file in files {
        let bytes = fs::read(&file).map_err(|e| WardError::io("cannot read", &file, e))?;
        let json: Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(&file, format!("not JSON: {e}")))?;
        match json["resourceType"].as_str() {
            Some("Bundle") => {
                for e in json["entry"].as_array().into_iter().flatten() {
                    if e["resource"]["resourceType"] == "MeasureReport" {
                        reports.push(e["resource"].clone());
                    }
                }
                if bundle.is_some() {
                    return Err(bad(folder, "more than one Bundle in a case folder".into()));
                }
                bundle = Some((file, json));
            }
            Some("MeasureReport") => reports.push(json),
            Some(_) => resources.push(json),
            None => {}
        }
    }
    let (path, json) = match bundle {
        Some(found) => found,
        None if resources.iter().any(|r| r["resourceType"] == "Patient") => {
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
            let bundle = serde_json::json!({
                "resourceType": "Bundle", "type": "collection", "entry": entry
            });
            (folder.to_path_buf(), bundle)
        }
        None => return Ok(None),
    };
    let report = reports
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
    let groups = report["group"].as_array().cloned().unwrap_or_default();
    let wanted = def.groups.len().max(1);
    if groups.len() != wanted {
        return Err(bad(
            &path,
            format!(
                "the MeasureReport has {} groups; measure {} has {wanted}",
                groups.len(),
                def.id
            ),
        ));
    }
    let populations = |list: &Value| -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for p in list.as_array().into_iter().flatten() {
            let code = p["code"]["coding"][0]["code"].as_str().unwrap_or_default();
            let column = code.replace('-', "_");
            let known = def.scoring.columns().contains(&Some(column.as_str()))
                || (def.scoring == Scoring::ContinuousVariable && column == OBSERVATION);
            if !known {
                return Err(bad(&path, format!("population '{code}' is not supported")));
            }
            out.insert(column, p["count"].as_u64().unwrap_or(0));
        }
        Ok(out)
    };
    let mut expected = Vec::new();
    for group in &groups {
        let mut strata = Vec::new();
        for st in group["stratifier"].as_array().into_iter().flatten() {
            let truth = st["stratum"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["value"]["text"] == "true")
                .map(|s| populations(&s["population"]))
                .transpose()?;
            strata.push(truth);
        }
        if strata.len() > def.stratifiers.len() {
            return Err(bad(
                &path,
                format!(
                    "the MeasureReport has {} stratifiers per group; measure {} defines {}",
                    strata.len(),
                    def.id,
                    def.stratifiers.len()
                ),
            ));
        }
        expected.push(ExpectedGroup {
            populations: populations(&group["population"])?,
            strata,
        });
    }
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
