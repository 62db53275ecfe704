//! FHIR R4 MeasureReport (type `summary`) per measure, built from the
//! suppressed summary cells: one group per population group of the measure
//! with the five population counts and the measure score, and one
//! stratifier per report dimension and per stratifier the measure defines.
//! Written as `reports/<run_id>/fhir/MeasureReport-<id>.json`.
//!
//! A suppressed count is not published: the population keeps its code,
//! loses `count`, and carries the data-absent-reason extension (`masked`) on
//! the count (`_count`); the stratum's `measureScore` is omitted.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Cell, DIMENSIONS};
use crate::error::Result;
use crate::measure::{Improvement, MeasureResult, Scoring};
use crate::warehouse::Warehouse;

/// Code system of the population codes.
pub const POPULATION_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/measure-population";
/// Code system of `improvementNotation`.
pub const IMPROVEMENT_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/measure-improvement-notation";
/// The data-absent-reason extension marking a suppressed count.
pub const DATA_ABSENT_REASON: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";

/// The measure-population codes of Ward's population columns, with their
/// displays.
const POPULATION_CODES: [(&str, &str, &str); 9] = [
    (
        "initial_population",
        "initial-population",
        "Initial Population",
    ),
    ("denominator", "denominator", "Denominator"),
    (
        "denominator_exclusion",
        "denominator-exclusion",
        "Denominator Exclusion",
    ),
    (
        "denominator_exception",
        "denominator-exception",
        "Denominator Exception",
    ),
    ("numerator", "numerator", "Numerator"),
    (
        "numerator_exclusion",
        "numerator-exclusion",
        "Numerator Exclusion",
    ),
    (
        "measure_population",
        "measure-population",
        "Measure Population",
    ),
    (
        "measure_population_exclusion",
        "measure-population-exclusion",
        "Measure Population Exclusion",
    ),
    (
        "measure_observation",
        "measure-observation",
        "Measure Observation",
    ),
];

/// A MeasureReport resource (the elements Ward fills).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeasureReport {
    pub resource_type: &'static str,
    pub id: String,
    pub status: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub measure: String,
    pub date: String,
    pub period: Period,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reporter: Option<Reference>,
    pub improvement_notation: CodeableConcept,
    pub group: Vec<Group>,
}

/// FHIR `Period` (dates).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Period {
    pub start: String,
    pub end: String,
}

/// FHIR `Reference` by display only.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reference {
    pub display: String,
}

/// FHIR `CodeableConcept`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CodeableConcept {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub coding: Vec<Coding>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// FHIR `Coding`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coding {
    pub system: &'static str,
    pub code: &'static str,
    pub display: &'static str,
}

/// `MeasureReport.group`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Group {
    /// The group's id (`<measure>.<group>`), for a measure with several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub population: Vec<Population>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measure_score: Option<Quantity>,
    /// Empty (and left out: FHIR allows no empty array) when the group
    /// has no one to stratify.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stratifier: Vec<Stratifier>,
}

/// A population count (group or stratum); `count_ext` marks a masked count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Population {
    pub code: CodeableConcept,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(rename = "_count", skip_serializing_if = "Option::is_none")]
    pub count_ext: Option<ElementExtensions>,
}

/// The extensions of a primitive element (`_count`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ElementExtensions {
    pub extension: Vec<Extension>,
}

/// An extension with a `code` value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Extension {
    pub url: &'static str,
    pub value_code: &'static str,
}

/// A measure score: a proportion (0 to 1), a ratio, or a continuous
/// variable's aggregate in its unit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quantity {
    pub value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// `group.stratifier`: one per report dimension.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stratifier {
    pub code: Vec<CodeableConcept>,
    pub stratum: Vec<Stratum>,
}

/// `group.stratifier.stratum`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stratum {
    pub value: CodeableConcept,
    pub population: Vec<Population>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measure_score: Option<Quantity>,
}

fn text(t: &str) -> CodeableConcept {
    CodeableConcept {
        coding: Vec::new(),
        text: Some(t.to_string()),
    }
}

/// The populations of a summary cell under the measure's scoring (a
/// continuous variable adds its observation count).
fn populations(cell: Option<&Cell>, scoring: Scoring) -> Vec<Population> {
    let counts = cell.map_or([None; 5], |c| {
        [
            c.initial_population,
            c.denominator,
            c.denominator_exclusion,
            c.denominator_exception,
            c.numerator,
        ]
    });
    let mut slots: Vec<(&str, Option<u64>)> = scoring
        .columns()
        .into_iter()
        .zip(counts)
        .filter_map(|(column, count)| Some((column?, count)))
        .collect();
    if scoring == Scoring::ContinuousVariable {
        let observed = cell.and_then(|c| c.denominator?.checked_sub(c.denominator_exclusion?));
        slots.push((crate::measure::OBSERVATION, observed));
    }
    slots
        .into_iter()
        .map(|(column, count)| {
            let (code, display) = POPULATION_CODES
                .iter()
                .find(|p| p.0 == column)
                .map_or((column, column), |p| (p.1, p.2));
            Population {
                code: CodeableConcept {
                    coding: vec![Coding {
                        system: POPULATION_SYSTEM,
                        code,
                        display,
                    }],
                    text: None,
                },
                count,
                count_ext: count.is_none().then(|| ElementExtensions {
                    extension: vec![Extension {
                        url: DATA_ABSENT_REASON,
                        value_code: "masked",
                    }],
                }),
            }
        })
        .collect()
}

/// A FHIR resource id from a measure id (`[A-Za-z0-9\-.]{1,64}`).
pub fn resource_id(measure: &str) -> String {
    let id: String = measure
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() { "measure".into() } else { id }
}

/// The MeasureReport of one measure from its summary cells (already
/// suppressed; see [`super::suppress`]), dated `date`: `results` are the
/// measure's results, one per group. `measure` is the measure's canonical
/// URL, or `urn:ward:measure:<id>` when it has none.
pub fn measure_report(
    results: &[&MeasureResult],
    cells: &[Cell],
    date: DateTime<Utc>,
) -> MeasureReport {
    let first = results[0];
    let def = &first.def;
    let unit = def.observation.as_ref().and_then(|o| o.unit.clone());
    let score = |c: &Cell| {
        c.rate.map(|value| Quantity {
            value,
            unit: unit.clone(),
        })
    };
    let group = |result: &MeasureResult| {
        let key = result.key();
        let mine: Vec<&Cell> = cells.iter().filter(|c| c.measure == key).collect();
        let overall = mine.iter().copied().find(|c| c.dimension == "overall");
        let dimensions = DIMENSIONS
            .iter()
            .copied()
            .chain(def.stratifiers.iter().map(|s| s.id.as_str()));
        let stratifier = dimensions
            .map(|dim| Stratifier {
                code: vec![text(dim)],
                stratum: mine
                    .iter()
                    .filter(|c| c.dimension == dim)
                    .map(|c| Stratum {
                        value: text(&c.stratum),
                        population: populations(Some(c), def.scoring),
                        measure_score: score(c),
                    })
                    .collect(),
            })
            // FHIR forbids empty arrays: a dimension left out of the summary
            // has no stratifier.
            .filter(|s| !s.stratum.is_empty())
            .collect();
        Group {
            id: result.group.as_ref().map(|_| resource_id(&key)),
            population: populations(overall, def.scoring),
            measure_score: overall.and_then(score),
            stratifier,
        }
    };
    let (code, display) = match def.improvement {
        Improvement::Increase => ("increase", "Increased score indicates improvement"),
        Improvement::Decrease => ("decrease", "Decreased score indicates improvement"),
    };
    MeasureReport {
        resource_type: "MeasureReport",
        id: resource_id(&def.id),
        status: "complete",
        kind: "summary",
        measure: def
            .url
            .clone()
            .unwrap_or_else(|| format!("urn:ward:measure:{}", resource_id(&def.id))),
        date: date.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        period: Period {
            start: first.period.start.format("%Y-%m-%d").to_string(),
            end: first.period.end.format("%Y-%m-%d").to_string(),
        },
        reporter: None,
        improvement_notation: CodeableConcept {
            coding: vec![Coding {
                system: IMPROVEMENT_SYSTEM,
                code,
                display,
            }],
            text: None,
        },
        group: results.iter().map(|r| group(r)).collect(),
    }
}

/// Writes `reports/<run_id>/fhir/MeasureReport-<id>.json` for every
/// measure; returns the files written.
pub fn write(
    warehouse: &Warehouse,
    run_id: &str,
    results: &[MeasureResult],
    cells: &[Cell],
    date: DateTime<Utc>,
) -> Result<Vec<PathBuf>> {
    let dir = super::report_dir(warehouse, run_id).join("fhir");
    // The results of one measure (one per group) are consecutive.
    results
        .chunk_by(|a, b| a.def.id == b.def.id)
        .map(|group| {
            let group: Vec<&MeasureResult> = group.iter().collect();
            let report = measure_report(&group, cells, date);
            let path = dir.join(format!("MeasureReport-{}.json", report.id));
            let json = serde_json::to_vec_pretty(&report).expect("reports serialize");
            warehouse.publish_bytes(&path, &json)?;
            Ok(path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn cell(dimension: &str, stratum: &str, count: Option<u64>) -> Cell {
        Cell {
            measure: "DM-PREV".into(),
            dimension: dimension.into(),
            stratum: stratum.into(),
            initial_population: count,
            denominator: count,
            denominator_exclusion: count.map(|_| 0),
            denominator_exception: count.map(|_| 0),
            numerator: count.map(|c| c / 2),
            rate: count.map(|_| 0.5),
            ci_low: None,
            ci_high: None,
            suppressed: count.is_none(),
            age_std_rate: None,
            age_std_ci_low: None,
            age_std_ci_high: None,
        }
    }

    #[test]
    fn suppressed_counts_are_masked_and_unscored() {
        let def: crate::measure::MeasureDef = toml::from_str(
            "id = \"DM-PREV\"\ntitle = \"t\"\nsteward = \"s\"\nscoring = \"proportion\"\n\
             improvement = \"decrease\"\ndescription = \"d\"\nage_standardize = true",
        )
        .unwrap();
        let period = crate::measure::Period {
            start: chrono::NaiveDate::from_ymd_opt(2025, 1, 1).unwrap(),
            end: chrono::NaiveDate::from_ymd_opt(2025, 12, 31).unwrap(),
        };
        let result = MeasureResult {
            def,
            group: None,
            period,
            counts: Default::default(),
            score: None,
            strata: Vec::new(),
            categories: Default::default(),
            rows: Vec::new(),
            schema: Arc::new(datafusion::arrow::datatypes::Schema::empty()),
            empty: None,
        };
        let cells = [
            cell("overall", "all", Some(40)),
            cell("sex", "female", Some(30)),
            cell("sex", "male", None),
        ];
        let date = DateTime::parse_from_rfc3339("2026-01-31T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let report = measure_report(&[&result], &cells, date);
        assert_eq!(report.measure, "urn:ward:measure:DM-PREV");
        assert_eq!(report.date, "2026-01-31T12:00:00Z");
        assert_eq!(report.improvement_notation.coding[0].code, "decrease");
        let group = &report.group[0];
        assert_eq!(group.population[4].count, Some(20));
        assert_eq!(
            group.measure_score,
            Some(Quantity {
                value: 0.5,
                unit: None
            })
        );
        // Only dimensions with strata have a stratifier (no empty arrays).
        assert_eq!(group.stratifier.len(), 1);
        let sex = &group.stratifier[0];
        assert_eq!(sex.code[0].text.as_deref(), Some("sex"));
        let male = &sex.stratum[1];
        assert_eq!(male.value.text.as_deref(), Some("male"));
        assert!(male.measure_score.is_none());
        for p in &male.population {
            assert_eq!(p.count, None);
            let ext = &p.count_ext.as_ref().unwrap().extension[0];
            assert_eq!((ext.url, ext.value_code), (DATA_ABSENT_REASON, "masked"));
        }
        assert!(
            sex.stratum[0]
                .population
                .iter()
                .all(|p| p.count_ext.is_none())
        );
        let json = serde_json::to_value(&report).unwrap();
        let stratifiers = json["group"][0]["stratifier"].as_array().unwrap();
        assert!(
            stratifiers
                .iter()
                .all(|s| !s["stratum"].as_array().unwrap().is_empty()),
            "FHIR allows no empty array"
        );
        assert!(json.get("reporter").is_none());
    }
}
