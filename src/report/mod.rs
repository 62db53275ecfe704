//! Report summaries: for every measure, population counts, rate and Wilson
//! 95 % confidence interval, overall and by provider, age band, sex, race,
//! ethnicity, state, 3-digit ZIP and payer, with small-cell suppression; written
//! as CSV, JSON and Parquet under `reports/<run_id>/`. Measures flagged
//! `age_standardize` also get an age-standardized rate ([`standard`]), and
//! every measure a FHIR R4 MeasureReport ([`fhir`]).

pub mod fhir;
pub mod standard;

pub mod html;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt64Array,
};
use serde::Serialize;

use crate::error::{Result, WardError};
use crate::measure::{Counts, MeasureResult, Scoring};
use crate::warehouse::Warehouse;

/// The stratifying dimensions, after `overall`.
pub const DIMENSIONS: [&str; 8] = [
    "provider",
    "age_band",
    "sex",
    "race",
    "ethnicity",
    "state",
    "zip3",
    "payer",
];

/// One row of the summary: a measure in one stratum. Suppressed counts are
/// `None` with `suppressed` set — never zeroed.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Cell {
    pub measure: String,
    pub dimension: String,
    pub stratum: String,
    pub initial_population: Option<u64>,
    pub denominator: Option<u64>,
    pub denominator_exclusion: Option<u64>,
    pub denominator_exception: Option<u64>,
    pub numerator: Option<u64>,
    pub rate: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub suppressed: bool,
    /// Age-standardized rate (direct method, 2000 U.S. standard population;
    /// [`standard`]) for measures flagged `age_standardize`, in every stratum
    /// but the age bands themselves; `None` when not computable or
    /// suppressed.
    pub age_std_rate: Option<f64>,
    /// 95 % interval of `age_std_rate` (normal approximation).
    pub age_std_ci_low: Option<f64>,
    pub age_std_ci_high: Option<f64>,
}

/// The small-cell rule: a count from 1 to `min_cell - 1` is not published
/// (zero is: it reveals no one).
pub fn small_count(n: u64, min_cell: u64) -> bool {
    n > 0 && n < min_cell
}

/// Wilson score interval (95 %) of `x` successes in `n` trials.
pub fn wilson(x: u64, n: u64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let (x, n, z) = (x as f64, n as f64, 1.959_963_984_540_054);
    let p = x / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    // Clamped to the rate too: at 0 % or 100 % rounding would otherwise
    // leave a bound a hair on the wrong side of it.
    Some(((centre - half).clamp(0.0, p), (centre + half).clamp(p, 1.0)))
}

/// Computes every measure's cells from the scored rows and the persons'
/// strata (`measure::strata`), then suppresses small cells.
pub fn summarize(results: &[MeasureResult], strata: &[RecordBatch], min_cell: u64) -> Vec<Cell> {
    use rayon::prelude::*;
    let by_person = person_strata(strata);
    // Each result's cells on its own (in parallel), in the results' order.
    let cells: Vec<Vec<Cell>> = results
        .par_iter()
        .map(|r| {
            let (counts, by_band) = count_strata(r, &by_person);
            measure_cells(r, counts, &by_band, min_cell)
        })
        .collect();
    cells.into_iter().flatten().collect()
}

/// Each person's values of Ward's dimensions (but the provider) and the
/// providers that know them.
type PersonStrata = HashMap<String, (Vec<String>, Vec<String>)>;
/// (dimension, stratum) → counts, and a continuous variable's observations.
type StratumCounts = BTreeMap<(usize, String), (Counts, Vec<f64>)>;
/// (dimension, stratum) → age band → performance denominator and numerator.
type BandCounts = BTreeMap<(usize, String), BTreeMap<String, standard::BandCount>>;

/// The dimension index of the age band (0 is overall).
fn age_dim() -> usize {
    1 + DIMENSIONS
        .iter()
        .position(|d| *d == "age_band")
        .expect("age_band")
}

/// The persons' strata, from the rows of `measure::strata`.
fn person_strata(strata: &[RecordBatch]) -> PersonStrata {
    // person → (dimension values; providers)
    let mut by_person: HashMap<String, (Vec<String>, Vec<String>)> = HashMap::new();
    for b in strata {
        let col = |name: &str| {
            crate::engine::text(b.column_by_name(name).expect("selected")).expect("text columns")
        };
        let person = col("person_id");
        let provider = col("provider");
        let others: Vec<StringArray> = DIMENSIONS[1..].iter().map(|d| col(d)).collect();
        for i in 0..b.num_rows() {
            let e = by_person
                .entry(person.value(i).to_string())
                .or_insert_with(|| {
                    (
                        others.iter().map(|a| a.value(i).to_string()).collect(),
                        Vec::new(),
                    )
                });
            if !provider.is_null(i) {
                e.1.push(provider.value(i).to_string());
            }
        }
    }
    by_person
}

/// Counts a measure's members per (dimension, stratum): overall, Ward's
/// dimensions (`unknown` for a person without strata), then the measure's
/// own stratifiers; and per age band where the measure is age-standardized.
fn count_strata(r: &MeasureResult, by_person: &PersonStrata) -> (StratumCounts, BandCounts) {
    let age_dim = age_dim();
    // An empty population still has its overall row (of zeros).
    let mut counts: StratumCounts = BTreeMap::from([((0, "all".to_string()), Default::default())]);
    let mut by_band = BandCounts::new();
    for m in r.members() {
        let (person, f) = (&m.person, m.flags);
        let band = by_person
            .get(person)
            .map_or("unknown", |(values, _)| values[age_dim - 2].as_str())
            .to_string();
        let in_performance = f[1] && !f[2] && !f[3];
        let mut add = |dim: usize, stratum: &str| {
            let (c, observations) = counts.entry((dim, stratum.to_string())).or_default();
            c.add(&f);
            observations.extend(m.observation);
            if r.def.age_standardize && in_performance {
                let b = by_band
                    .entry((dim, stratum.to_string()))
                    .or_default()
                    .entry(band.clone())
                    .or_default();
                b.n += 1;
                b.x += u64::from(f[4]);
            }
        };
        add(0, "all");
        // The measure's own stratifiers come after Ward's dimensions.
        for (k, value) in m.strata.iter().enumerate() {
            add(DIMENSIONS.len() + 1 + k, value);
        }
        match by_person.get(person) {
            Some((values, providers)) => {
                for p in providers {
                    add(1, p);
                }
                for (k, v) in values.iter().enumerate() {
                    add(k + 2, v);
                }
            }
            None => {
                for k in 1..=DIMENSIONS.len() {
                    add(k, "unknown");
                }
            }
        }
    }
    (counts, by_band)
}

/// A measure's cells from its counts: rates, Wilson intervals, directly
/// age-standardized rates, dimensions no source records left out, small
/// cells suppressed.
fn measure_cells(
    r: &MeasureResult,
    counts: StratumCounts,
    by_band: &BandCounts,
    min_cell: u64,
) -> Vec<Cell> {
    let age_dim = age_dim();
    let covered = by_band
        .get(&(0, "all".to_string()))
        .map(standard::covered_bands)
        .unwrap_or_default();
    let mut measure_cells: Vec<(usize, Cell)> = counts
        .into_iter()
        .map(|((dim, stratum), (c, observations))| {
            // The Wilson interval is a proportion's.
            let ci = (r.def.scoring == Scoring::Proportion)
                .then(|| wilson(c.numerator, c.performance(r.def.scoring)))
                .flatten();
            let std = if dim == age_dim {
                None
            } else {
                // Withheld when an age band of the stratum is small:
                // the rate would reveal something about a few people.
                let small = |n: u64| small_count(n, min_cell);
                by_band
                    .get(&(dim, stratum.clone()))
                    .filter(|bands| {
                        !bands
                            .values()
                            .any(|b| small(b.n) || small(b.x) || small(b.n - b.x))
                    })
                    .and_then(|b| standard::direct(b, &covered))
            };
            (
                dim,
                Cell {
                    measure: r.key(),
                    dimension: if dim == 0 {
                        "overall".into()
                    } else if dim <= DIMENSIONS.len() {
                        DIMENSIONS[dim - 1].into()
                    } else {
                        r.def.stratifiers[dim - DIMENSIONS.len() - 1].id.clone()
                    },
                    stratum,
                    initial_population: Some(c.initial_population),
                    denominator: Some(c.denominator),
                    denominator_exclusion: Some(c.denominator_exclusion),
                    denominator_exception: Some(c.denominator_exception),
                    numerator: Some(c.numerator),
                    rate: crate::measure::score(&r.def, &c, &observations),
                    ci_low: ci.map(|c| c.0),
                    ci_high: ci.map(|c| c.1),
                    suppressed: false,
                    age_std_rate: std.map(|s| s.rate),
                    age_std_ci_low: std.map(|s| s.ci_low),
                    age_std_ci_high: std.map(|s| s.ci_high),
                },
            )
        })
        .collect();
    // A dimension no source records (every stratum `unknown`, e.g. payer
    // when no extract carries one) says nothing: left out.
    let recorded: BTreeSet<usize> = measure_cells
        .iter()
        .filter(|(_, c)| c.stratum != "unknown")
        .map(|(dim, _)| *dim)
        .collect();
    measure_cells.retain(|(dim, _)| recorded.contains(dim));
    suppress(&mut measure_cells, min_cell);
    measure_cells.into_iter().map(|(_, c)| c).collect()
}

/// Small-cell suppression. A cell is suppressed whole when any of its
/// counts — or the people in the performance denominator outside the
/// numerator, which subtraction would reveal — is between 1 and
/// `min_cell - 1`. Complementary suppression: a dimension with exactly one
/// suppressed stratum also suppresses its next smallest stratum, so that
/// the suppressed cell cannot be recovered from the overall total. A
/// suppressed cell publishes no age-standardized rate either.
pub fn suppress(cells: &mut [(usize, Cell)], min_cell: u64) {
    let small = |n: u64| small_count(n, min_cell);
    let risky = |c: &Cell| {
        let (ip, den, ex, exc, num) = (
            c.initial_population.unwrap_or(0),
            c.denominator.unwrap_or(0),
            c.denominator_exclusion.unwrap_or(0),
            c.denominator_exception.unwrap_or(0),
            c.numerator.unwrap_or(0),
        );
        // (Saturating: a ratio's numerator is not part of its denominator.)
        let rest = den.saturating_sub(ex + exc + num);
        [ip, den, ex, exc, num, rest, ip.saturating_sub(den)]
            .into_iter()
            .any(small)
    };
    for (_, c) in cells.iter_mut() {
        c.suppressed = risky(c);
    }
    let dims: Vec<usize> = {
        let mut d: Vec<usize> = cells.iter().map(|(d, _)| *d).filter(|d| *d > 0).collect();
        d.dedup();
        d
    };
    for dim in dims {
        let in_dim: Vec<usize> = (0..cells.len()).filter(|&i| cells[i].0 == dim).collect();
        if in_dim.iter().filter(|&&i| cells[i].1.suppressed).count() == 1
            && let Some(&next) = in_dim
                .iter()
                .filter(|&&i| {
                    !cells[i].1.suppressed && cells[i].1.initial_population.unwrap_or(0) > 0
                })
                .min_by_key(|&&i| (cells[i].1.initial_population, cells[i].1.stratum.clone()))
        {
            cells[next].1.suppressed = true;
        }
    }
    for (_, c) in cells.iter_mut() {
        if c.suppressed {
            c.initial_population = None;
            c.denominator = None;
            c.denominator_exclusion = None;
            c.denominator_exception = None;
            c.numerator = None;
            c.rate = None;
            c.ci_low = None;
            c.ci_high = None;
            c.age_std_rate = None;
            c.age_std_ci_low = None;
            c.age_std_ci_high = None;
        }
    }
}

/// `reports/<run_id>/` under the warehouse's output directory: where a
/// run's summary, report.html, MeasureReports (`fhir/`) and care gaps
/// (`phi/`) go.
pub fn report_dir(warehouse: &Warehouse, run_id: &str) -> PathBuf {
    warehouse.out().join("reports").join(run_id)
}

/// Writes `summary.csv`, `summary.json` and `summary.parquet` under
/// [`report_dir`]; returns the directory.
pub fn write(warehouse: &Warehouse, run_id: &str, cells: &[Cell]) -> Result<PathBuf> {
    let dir = report_dir(warehouse, run_id);
    let text = |f: fn(&Cell) -> &str| -> ArrayRef {
        Arc::new(cells.iter().map(|c| Some(f(c))).collect::<StringArray>())
    };
    let count = |f: fn(&Cell) -> Option<u64>| -> ArrayRef {
        Arc::new(cells.iter().map(f).collect::<UInt64Array>())
    };
    let float = |f: fn(&Cell) -> Option<f64>| -> ArrayRef {
        Arc::new(cells.iter().map(f).collect::<Float64Array>())
    };
    let batch = RecordBatch::try_new(
        crate::schema::summary_schema(),
        vec![
            text(|c| &c.measure),
            text(|c| &c.dimension),
            text(|c| &c.stratum),
            count(|c| c.initial_population),
            count(|c| c.denominator),
            count(|c| c.denominator_exclusion),
            count(|c| c.denominator_exception),
            count(|c| c.numerator),
            float(|c| c.rate),
            float(|c| c.ci_low),
            float(|c| c.ci_high),
            Arc::new(
                cells
                    .iter()
                    .map(|c| Some(c.suppressed))
                    .collect::<BooleanArray>(),
            ),
            float(|c| c.age_std_rate),
            float(|c| c.age_std_ci_low),
            float(|c| c.age_std_ci_high),
        ],
    )
    .map_err(|e| WardError::data("building the summary", dir.clone(), e))?;
    warehouse.write_parquet(
        &dir.join("summary.parquet"),
        crate::schema::summary_schema(),
        &[batch],
    )?;
    let json = serde_json::to_vec_pretty(cells).expect("cells serialize");
    warehouse.publish_bytes(&dir.join("summary.json"), &json)?;
    let mut csv = csv::Writer::from_writer(Vec::new());
    for c in cells {
        csv.serialize(c)
            .map_err(|e| WardError::data("writing the summary", dir.join("summary.csv"), e))?;
    }
    let bytes = csv
        .into_inner()
        .map_err(|e| WardError::data("writing the summary", dir.join("summary.csv"), e))?;
    warehouse.publish_bytes(&dir.join("summary.csv"), &bytes)?;
    Ok(dir)
}

/// Writes care gaps (`measure::care_gaps`) as one CSV per provider under
/// `reports/<run_id>/phi/`, readable by the owner only: they identify
/// patients. Returns the files written.
pub fn write_care_gaps(
    warehouse: &Warehouse,
    run_id: &str,
    gaps: &[RecordBatch],
) -> Result<Vec<PathBuf>> {
    let dir = report_dir(warehouse, run_id).join("phi");
    std::fs::create_dir_all(&dir).map_err(|e| WardError::io("cannot create", &dir, e))?;
    crate::warehouse::owner_only(0o700, &dir, |p| std::fs::set_permissions(&dir, p))?;
    let mut by_provider: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    let mut header: Vec<String> = Vec::new();
    for b in gaps {
        header = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let columns: Vec<StringArray> = b
            .columns()
            .iter()
            .map(|c| {
                crate::engine::text(c)
                    .map_err(|e| WardError::data("writing care gaps", dir.clone(), e))
            })
            .collect::<Result<_>>()?;
        for i in 0..b.num_rows() {
            let row: Vec<String> = columns
                .iter()
                .map(|a| {
                    if a.is_null(i) {
                        String::new()
                    } else {
                        spreadsheet_safe(a.value(i)).into_owned()
                    }
                })
                .collect();
            by_provider.entry(row[0].clone()).or_default().push(row);
        }
    }
    let mut written = Vec::new();
    for (provider, rows) in by_provider {
        let path = dir.join(format!("care_gaps_{provider}.csv"));
        let mut csv = csv::Writer::from_writer(Vec::new());
        let bad = |e: csv::Error| WardError::data("writing care gaps", path.clone(), e);
        csv.write_record(&header).map_err(bad)?;
        for row in rows {
            csv.write_record(&row).map_err(bad)?;
        }
        let bytes = csv
            .into_inner()
            .map_err(|e| WardError::data("writing care gaps", path.clone(), e))?;
        warehouse.publish(&path, |file| {
            crate::warehouse::owner_only(0o600, &path, |p| file.set_permissions(p))?;
            write_all(file, &bytes, &path)
        })?;
        written.push(path);
    }
    Ok(written)
}

/// A cell that a spreadsheet would run as a formula (it starts with `=`,
/// `+`, `-`, `@`, a tab or a carriage return, and is not a number) gets a
/// leading `'`, as OWASP recommends for CSV injection: care-gap lists are
/// opened in spreadsheets, and their cells come from provider data.
pub fn spreadsheet_safe(cell: &str) -> std::borrow::Cow<'_, str> {
    let risky = cell.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if risky && cell.trim().parse::<f64>().is_err() {
        std::borrow::Cow::Owned(format!("'{cell}"))
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

fn write_all(file: &mut std::fs::File, bytes: &[u8], path: &Path) -> Result<()> {
    use std::io::Write;
    file.write_all(bytes)
        .map_err(|e| WardError::io("cannot write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_are_neutralized_numbers_are_not() {
        for (cell, out) in [
            ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
            ("+1+1", "'+1+1"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\t=1", "'\t=1"),
            ("\r=1", "'\r=1"),
            ("-7.5", "-7.5"),
            ("+12", "+12"),
            ("Smith", "Smith"),
            ("2025-01-01", "2025-01-01"),
            ("", ""),
        ] {
            assert_eq!(spreadsheet_safe(cell), out, "{cell:?}");
        }
    }

    #[test]
    fn wilson_matches_published_values() {
        // Newcombe (1998), table I: 81/263 → 0.2553–0.3662.
        let (lo, hi) = wilson(81, 263).unwrap();
        assert!(
            (lo - 0.2553).abs() < 5e-4 && (hi - 0.3662).abs() < 5e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(0, 10).unwrap();
        assert!(lo == 0.0 && (hi - 0.2775).abs() < 5e-4, "{hi}");
        assert_eq!(wilson(3, 0), None);
        for n in 1..2_000 {
            assert_eq!(wilson(0, n).unwrap().0, 0.0, "0 of {n}");
            assert_eq!(wilson(n, n).unwrap().1, 1.0, "{n} of {n}");
        }
    }

    fn cell(stratum: &str, den: u64, num: u64) -> Cell {
        Cell {
            measure: "M".into(),
            dimension: "sex".into(),
            stratum: stratum.into(),
            initial_population: Some(den),
            denominator: Some(den),
            denominator_exclusion: Some(0),
            denominator_exception: Some(0),
            numerator: Some(num),
            rate: None,
            ci_low: None,
            ci_high: None,
            suppressed: false,
            age_std_rate: Some(0.5),
            age_std_ci_low: Some(0.4),
            age_std_ci_high: Some(0.6),
        }
    }

    #[test]
    fn small_cells_and_their_complement_are_suppressed() {
        let mut cells = vec![
            (0, cell("all", 120, 60)),
            (1, cell("female", 100, 50)),
            (1, cell("male", 15, 5)),
            (1, cell("other", 5, 5)),
            (1, cell("unknown", 0, 0)),
        ];
        suppress(&mut cells, 11);
        let flags: Vec<bool> = cells.iter().map(|c| c.1.suppressed).collect();
        // other: small; male: its numerator is small; female stays.
        assert_eq!(flags, [false, false, true, true, false]);
        assert!(cells[2].1.numerator.is_none() && cells[2].1.rate.is_none());
        assert!(cells[2].1.age_std_rate.is_none() && cells[2].1.age_std_ci_high.is_none());
        assert_eq!(
            cells[1].1.age_std_rate,
            Some(0.5),
            "published stratum keeps it"
        );

        // One small stratum drags the next smallest with it.
        let mut cells = vec![
            (0, cell("all", 140, 70)),
            (1, cell("a", 100, 50)),
            (1, cell("b", 35, 17)),
            (1, cell("c", 5, 3)),
        ];
        suppress(&mut cells, 11);
        let flags: Vec<bool> = cells.iter().map(|c| c.1.suppressed).collect();
        assert_eq!(flags, [false, false, true, true]);
        // Complement within a cell: 20 in the denominator, 12 in the numerator
        // and 8 outside it — suppressed.
        let mut cells = vec![(1, cell("x", 20, 12))];
        suppress(&mut cells, 11);
        assert!(cells[0].1.suppressed);
    }
}
