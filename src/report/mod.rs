//! Report summaries: for every measure, population counts, rate and Wilson
//! 95 % confidence interval, overall and by provider, age band, sex, race,
//! ethnicity, state, 3-digit ZIP and payer, with small-cell suppression; written
//! as CSV, JSON and Parquet under `reports/<run_id>/`. Measures flagged
//! `age_standardize` also get an age-standardized rate ([`standard`]), and
//! every measure a FHIR R4 MeasureReport ([`fhir`]).

pub mod fhir;
pub mod standard;

pub mod html;

use std::collections::{BTreeMap, BTreeSet};

// Maps keyed by a million person ids: a fast hash, not SipHash.
use ahash::AHashMap as HashMap;
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
    let texts = strata_text(strata);
    let by_person = PersonStrata::new(&texts);
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

/// The columns of `measure::strata`'s rows as text: `person_id`, then
/// [`DIMENSIONS`] in order.
fn strata_text(strata: &[RecordBatch]) -> Vec<Vec<StringArray>> {
    strata
        .iter()
        .map(|b| {
            std::iter::once("person_id")
                .chain(DIMENSIONS)
                .map(|name| {
                    crate::engine::text(b.column_by_name(name).expect("selected"))
                        .expect("text columns")
                })
                .collect()
        })
        .collect()
}

/// The persons' strata, each value kept once per dimension (a million
/// persons share a few dozen strata).
struct PersonStrata<'a> {
    /// Per dimension of [`DIMENSIONS`], its values; `unknown` is always one.
    values: Vec<Vec<&'a str>>,
    /// Per dimension, the index of `unknown` in `values`.
    unknown: Vec<u32>,
    /// Per person, in id order: their value of each dimension but the
    /// provider, and the providers that know them. Members visited in id
    /// order are found by walking forward (see [`PersonStrata::find`]).
    persons: Vec<(&'a str, Person)>,
}

struct Person {
    values: [u32; DIMENSIONS.len() - 1],
    providers: Vec<u32>,
}

impl<'a> PersonStrata<'a> {
    fn new(texts: &'a [Vec<StringArray>]) -> PersonStrata<'a> {
        let mut ids: Vec<HashMap<&'a str, u32>> = vec![HashMap::new(); DIMENSIONS.len()];
        let mut values: Vec<Vec<&'a str>> = vec![Vec::new(); DIMENSIONS.len()];
        let mut intern = |d: usize, v: &'a str| -> u32 {
            *ids[d].entry(v).or_insert_with(|| {
                values[d].push(v);
                (values[d].len() - 1) as u32
            })
        };
        let unknown: Vec<u32> = (0..DIMENSIONS.len())
            .map(|d| intern(d, "unknown"))
            .collect();
        use rayon::prelude::*;
        // The strata rows by person (each person's in their order).
        let mut rows: Vec<(&'a str, u32, u32)> = texts
            .iter()
            .enumerate()
            .flat_map(|(b, columns)| {
                let person = &columns[0];
                (0..person.len()).map(move |i| (person.value(i), b as u32, i as u32))
            })
            .collect();
        rows.par_sort_unstable();
        let mut persons: Vec<(&'a str, Person)> = Vec::new();
        for group in rows.chunk_by(|a, b| a.0 == b.0) {
            let (id, b, i) = group[0];
            let columns = &texts[b as usize];
            let mut values = [0; DIMENSIONS.len() - 1];
            for (d, v) in values.iter_mut().enumerate() {
                *v = intern(d + 1, columns[d + 2].value(i as usize));
            }
            let providers = group
                .iter()
                .map(|&(_, b, i)| (&texts[b as usize][1], i as usize))
                .filter(|(provider, i)| !provider.is_null(*i))
                .map(|(provider, i)| intern(0, provider.value(i)))
                .collect();
            persons.push((id, Person { values, providers }));
        }
        PersonStrata {
            values,
            unknown,
            persons,
        }
    }

    /// The person `id`; `at` is where the last one found was (start at 0):
    /// when persons are looked up in id order, the next is a few steps on.
    fn find(&self, id: &str, at: &mut usize) -> Option<&Person> {
        for k in *at..(*at + 8).min(self.persons.len()) {
            let (p, person) = &self.persons[k];
            match (*p).cmp(id) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => {
                    *at = k + 1;
                    return Some(person);
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        let k = self.persons.binary_search_by(|(p, _)| (*p).cmp(id)).ok()?;
        *at = k + 1;
        Some(&self.persons[k].1)
    }
}

/// One stratum's tally: counts, observations, and performance counts per
/// age band (for age-standardized measures).
#[derive(Default, Clone)]
struct Tally {
    counts: Counts,
    observations: Vec<f64>,
    bands: BTreeMap<u32, standard::BandCount>,
}

impl Tally {
    fn add(&mut self, flags: &[bool; 5], observation: Option<f64>, band: Option<u32>) {
        self.counts.add(flags);
        self.observations.extend(observation);
        if let Some(band) = band {
            let b = self.bands.entry(band).or_default();
            b.n += 1;
            b.x += u64::from(flags[4]);
        }
    }
}

/// Counts a measure's members per (dimension, stratum): overall, Ward's
/// dimensions (`unknown` for a person without strata), then the measure's
/// own stratifiers; and per age band where the measure is age-standardized.
fn count_strata(r: &MeasureResult, ps: &PersonStrata) -> (StratumCounts, BandCounts) {
    let age = age_dim() - 1;
    let mut overall = Tally::default();
    // Ward's dimensions by value index; the measure's stratifiers by value.
    let mut ward: Vec<Vec<Option<Tally>>> = ps.values.iter().map(|v| vec![None; v.len()]).collect();
    let mut own: Vec<BTreeMap<String, Tally>> = vec![BTreeMap::new(); r.def.stratifiers.len()];
    let mut at = 0;
    r.visit_members(|m| {
        let person = ps.find(m.person, &mut at);
        let in_performance = m.flags[1] && !m.flags[2] && !m.flags[3];
        let band = (r.def.age_standardize && in_performance)
            .then(|| person.map_or(ps.unknown[age], |p| p.values[age - 1]));
        let add = |t: &mut Tally| t.add(&m.flags, m.observation, band);
        add(&mut overall);
        for (values, value) in own.iter_mut().zip(m.strata) {
            add(crate::measure::value_entry(values, value));
        }
        let mut at = |d: usize, v: u32| add(ward[d][v as usize].get_or_insert_with(Tally::default));
        match person {
            Some(p) => {
                for v in &p.providers {
                    at(0, *v);
                }
                for (d, v) in p.values.iter().enumerate() {
                    at(d + 1, *v);
                }
            }
            None => {
                for (d, v) in ps.unknown.iter().enumerate() {
                    at(d, *v);
                }
            }
        }
    });
    // Keyed by (dimension, stratum) as the cells are: overall is 0, Ward's
    // dimensions follow, then the measure's own stratifiers.
    let ward = ward.into_iter().enumerate().flat_map(|(d, values)| {
        values
            .into_iter()
            .enumerate()
            .filter_map(move |(v, t)| Some(((d + 1, ps.values[d][v].to_string()), t?)))
    });
    let own = own.into_iter().enumerate().flat_map(|(k, values)| {
        values
            .into_iter()
            .map(move |(v, t)| ((DIMENSIONS.len() + 1 + k, v), t))
    });
    let (mut counts, mut by_band) = (StratumCounts::new(), BandCounts::new());
    for (key, t) in std::iter::once(((0, "all".to_string()), overall))
        .chain(ward)
        .chain(own)
    {
        if !t.bands.is_empty() {
            let bands = t
                .bands
                .iter()
                .map(|(b, c)| (ps.values[age][*b as usize].to_string(), *c))
                .collect();
            by_band.insert(key.clone(), bands);
        }
        counts.insert(key, (t.counts, t.observations));
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

/// Care-gap lists being written (`measure::care_gaps`): one CSV per provider
/// under `reports/<run_id>/phi/`, readable by the owner only (they identify
/// patients). Rows are appended batch by batch, in the order given, to
/// files under the warehouse's `.tmp/`; [`CareGapFiles::finish`] publishes
/// them. A provider without care gaps gets no file.
pub struct CareGapFiles<'a> {
    warehouse: &'a Warehouse,
    dir: PathBuf,
    /// Per provider (as its cells are written): the file's path, and where
    /// it is written meanwhile.
    files: BTreeMap<String, (PathBuf, PathBuf, std::fs::File)>,
}

impl<'a> CareGapFiles<'a> {
    /// Creates the run's `phi/` directory (owner only).
    pub fn new(warehouse: &'a Warehouse, run_id: &str) -> Result<Self> {
        let dir = report_dir(warehouse, run_id).join("phi");
        std::fs::create_dir_all(&dir).map_err(|e| WardError::io("cannot create", &dir, e))?;
        crate::warehouse::owner_only(0o700, &dir, |p| std::fs::set_permissions(&dir, p))?;
        Ok(CareGapFiles {
            warehouse,
            dir,
            files: BTreeMap::new(),
        })
    }

    /// Appends `batch`'s rows to their providers' files (the first column is
    /// the provider; the columns' names are each file's header). The
    /// providers' rows are written in parallel.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        use rayon::prelude::*;
        use std::io::Write;
        let texts: Vec<StringArray> = batch
            .columns()
            .iter()
            .map(|c| {
                crate::engine::text(c)
                    .map_err(|e| WardError::data("writing care gaps", self.dir.clone(), e))
            })
            .collect::<Result<_>>()?;
        let Some(provider) = texts.first() else {
            return Ok(());
        };
        // The rows of each provider (a few providers, a million rows:
        // grouped by the value as it is, named once per provider).
        let mut by_value: HashMap<&str, Vec<usize>> = HashMap::new();
        for i in 0..provider.len() {
            let name = if provider.is_null(i) {
                ""
            } else {
                provider.value(i)
            };
            by_value.entry(name).or_default().push(i);
        }
        let mut rows: BTreeMap<std::borrow::Cow<str>, Vec<usize>> = BTreeMap::new();
        for (name, at) in by_value {
            let of = rows.entry(spreadsheet_safe(name)).or_default();
            // Two values one name (`=x` and `'=x`): rows in batch order.
            let merged = !of.is_empty();
            of.extend(at);
            if merged {
                of.sort_unstable();
            }
        }
        for name in rows.keys() {
            if !self.files.contains_key(name.as_ref()) {
                let file = self.open(name, batch)?;
                self.files.insert(name.to_string(), file);
            }
        }
        let texts = &texts;
        self.files
            .iter_mut()
            .filter_map(|(name, file)| Some((rows.get(name.as_str())?, file)))
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(rows, (path, _, file))| {
                let bad = |e: csv::Error| WardError::data("writing care gaps", path.clone(), e);
                // Sized for the rows (about 300 bytes each at 1M), not
                // grown by copying.
                let mut csv = csv::Writer::from_writer(Vec::with_capacity(rows.len() * 320));
                for &i in rows {
                    for a in texts {
                        let cell = if a.is_null(i) { "" } else { a.value(i) };
                        csv.write_field(spreadsheet_safe(cell).as_bytes())
                            .map_err(bad)?;
                    }
                    csv.write_record(None::<&[u8]>).map_err(bad)?;
                }
                let bytes = csv
                    .into_inner()
                    .map_err(|e| WardError::data("writing care gaps", path.clone(), e))?;
                file.write_all(&bytes)
                    .map_err(|e| WardError::io("cannot write", path.as_path(), e))
            })
            .collect()
    }

    /// A provider's file, created under `.tmp/` (owner only) with its header.
    fn open(
        &self,
        provider: &str,
        batch: &RecordBatch,
    ) -> Result<(PathBuf, PathBuf, std::fs::File)> {
        use std::io::Write;
        let path = self.dir.join(care_gap_file(provider));
        let tmp = self.warehouse.tmp_path(&path);
        let mut file =
            std::fs::File::create(&tmp).map_err(|e| WardError::io("cannot create", &tmp, e))?;
        crate::warehouse::owner_only(0o600, &path, |p| file.set_permissions(p))?;
        let mut csv = csv::Writer::from_writer(Vec::new());
        let schema = batch.schema();
        let bad = |e: csv::Error| WardError::data("writing care gaps", path.clone(), e);
        csv.write_record(schema.fields().iter().map(|f| f.name()))
            .map_err(bad)?;
        let header = csv
            .into_inner()
            .map_err(|e| WardError::data("writing care gaps", path.clone(), e))?;
        file.write_all(&header)
            .map_err(|e| WardError::io("cannot write", &tmp, e))?;
        Ok((path, tmp, file))
    }

    /// The `phi/` directory the lists are published in.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Publishes every file written; returns their paths.
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        use rayon::prelude::*;
        let warehouse = self.warehouse;
        self.files
            .into_values()
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(path, tmp, file)| {
                drop(file);
                warehouse.publish_file(&tmp, &path)?;
                Ok(path)
            })
            .collect()
    }
}

/// The current run's care-gap lists, of which tonight takes those no
/// change reaches. A provider's list is, for each person with a gap and a
/// record there, their gaps (most urgent first), their records there and
/// their other providers: it is the same when no such person's results
/// changed, no record there was added or moved to another person, and no
/// such person gained or lost a provider. Only valid when the measures'
/// queries and period are the same as that run's, every person's results
/// but those of `recomputed` are that run's, and every provider's staged
/// patient records are that run's, or those and records appended
/// (`grown`: the providers with appended records), and its person table
/// is what it wrote.
pub struct KeptCareGaps<'a> {
    /// The current run's directory and id.
    pub run_dir: &'a Path,
    pub run_id: &'a str,
    /// Tonight's core.
    pub core: &'a Path,
    /// The persons whose core rows differ from that run's (see
    /// [`crate::delta::touched`]).
    pub changed: &'a crate::delta::Touched,
    /// Of them, those whose results were computed again.
    pub recomputed: &'a crate::delta::Touched,
    /// Of them, those some of whose records linkage moved to or from
    /// another person.
    pub relinked: &'a BTreeSet<String>,
    /// The providers with staged patient records appended since that run.
    pub grown: BTreeSet<String>,
}

impl KeptCareGaps<'_> {
    /// The providers whose lists are written tonight (given `gap_persons`,
    /// the persons with a gap tonight; with the same results, they had one
    /// then): those with appended patient records, and the providers, then
    /// and now, of each person whose results were computed again, and of
    /// each person with a gap whose records moved or whose providers
    /// changed.
    pub fn providers_to_write(&self, gap_persons: &StringArray) -> Result<BTreeSet<String>> {
        let gap: std::collections::HashSet<&str> = gap_persons
            .iter()
            .flatten()
            .filter(|p| self.changed.contains(p))
            .collect();
        let mut write = self.grown.clone();
        if gap.is_empty() && self.recomputed.is_empty() {
            return Ok(write);
        }
        let of_interest = |p: &str| self.recomputed.contains(p) || gap.contains(p);
        let person = "person.parquet";
        let now = providers_of(&self.core.join(person), &of_interest)?;
        let then = providers_of(&self.run_dir.join("core").join(person), &of_interest)?;
        let none = BTreeSet::new();
        for person in now.keys().chain(then.keys()) {
            let (now, then) = (
                now.get(person).unwrap_or(&none),
                then.get(person).unwrap_or(&none),
            );
            if now != then
                || self.recomputed.contains(person)
                || self.relinked.contains(person.as_str())
            {
                write.extend(now.iter().chain(then).cloned());
            }
        }
        Ok(write)
    }

    /// Of that run's outputs (`outputs`: paths in its directory), its lists
    /// of the providers not in `written`.
    pub fn lists_to_take<'o>(
        &self,
        written: &BTreeSet<String>,
        outputs: impl IntoIterator<Item = &'o str>,
    ) -> Vec<&'o str> {
        let written: BTreeSet<String> = written.iter().map(|p| care_gap_file(p)).collect();
        let dir = format!("reports/{}/phi/", self.run_id);
        outputs
            .into_iter()
            .filter(|p| {
                p.strip_prefix(dir.as_str())
                    .is_some_and(|name| name.starts_with("care_gaps_") && !written.contains(name))
            })
            .collect()
    }
}

/// The providers (`sources`) of each person of the person table at `path`
/// that `of_interest` selects.
fn providers_of(
    path: &Path,
    of_interest: &dyn Fn(&str) -> bool,
) -> Result<HashMap<String, BTreeSet<String>>> {
    use datafusion::arrow::array::AsArray;
    use datafusion::parquet::arrow::ProjectionMask;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let err = |e: crate::error::BoxError| {
        WardError::data("reading the changed persons' providers", path, e)
    };
    let file = std::fs::File::open(path).map_err(|e| WardError::io("cannot open", path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(e.into()))?;
    let roots = ["person_id", "sources"].map(|name| builder.schema().index_of(name));
    let [Ok(person), Ok(sources)] = roots else {
        return Err(err("it has no person_id or sources column".into()));
    };
    let mask = ProjectionMask::roots(builder.parquet_schema(), [person, sources]);
    let mut providers = HashMap::new();
    for batch in builder
        .with_projection(mask)
        .build()
        .map_err(|e| err(e.into()))?
    {
        let batch = batch.map_err(|e| err(e.into()))?;
        let persons = crate::engine::text(batch.column(0)).map_err(|e| err(e.into()))?;
        let sources = batch
            .column(1)
            .as_list_opt::<i32>()
            .ok_or_else(|| err("sources is not a list".into()))?;
        for i in 0..batch.num_rows() {
            if persons.is_valid(i) && of_interest(persons.value(i)) {
                let of = crate::engine::text(&sources.value(i)).map_err(|e| err(e.into()))?;
                let of = of.iter().flatten().map(str::to_string).collect();
                providers.insert(persons.value(i).to_string(), of);
            }
        }
    }
    Ok(providers)
}

/// The file name of a provider's care-gap list.
fn care_gap_file(provider: &str) -> String {
    format!("care_gaps_{}.csv", spreadsheet_safe(provider))
}

/// A cell that a spreadsheet would run as a formula (it starts with `=`,
/// `+`, `-`, `@`, a tab or a carriage return, and is not a number) gets a
/// leading `'`, as OWASP recommends for CSV injection: care-gap lists are
/// opened in spreadsheets, and their cells come from provider data.
#[inline]
pub fn spreadsheet_safe(cell: &str) -> std::borrow::Cow<'_, str> {
    // Its first byte decides (every risky start is ASCII): millions of
    // cells a night.
    let risky = matches!(
        cell.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    );
    if risky && cell.trim().parse::<f64>().is_err() {
        std::borrow::Cow::Owned(format!("'{cell}"))
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persons_are_found_in_order_out_of_order_or_not_at_all() {
        // p1 at two providers, p2 and p4 at one.
        let column = |v: &[&str]| StringArray::from(v.to_vec());
        let strata = |persons: &[&str], providers: &[&str]| {
            let mut columns = vec![column(persons), column(providers)];
            let sexes: Vec<&str> = persons.iter().map(|p| &p[1..]).collect();
            columns.extend((1..DIMENSIONS.len()).map(|_| column(&sexes)));
            vec![columns]
        };
        // Rows out of id order, as the strata query gives them.
        let texts = strata(&["p4", "p1", "p2", "p1"], &["y", "x", "x", "y"]);
        let ps = PersonStrata::new(&texts);
        let value = |p: Option<&Person>| p.map(|p| ps.values[1][p.values[0] as usize]);
        let mut at = 0;
        assert_eq!(value(ps.find("p1", &mut at)), Some("1"));
        let providers = &ps.find("p1", &mut 0).unwrap().providers;
        let names: Vec<&str> = providers
            .iter()
            .map(|v| ps.values[0][*v as usize])
            .collect();
        assert_eq!(names, ["x", "y"]);
        assert_eq!(value(ps.find("p3", &mut at)), None);
        assert_eq!(value(ps.find("p4", &mut at)), Some("4"));
        assert_eq!(value(ps.find("p2", &mut at)), Some("2"));
        assert_eq!(value(ps.find("p0", &mut at)), None);
        assert_eq!(value(ps.find("p5", &mut at)), None);
    }

    /// Each provider's rows go to its file in the order given, batch after
    /// batch; two provider values that make one safe name share its file.
    #[test]
    fn care_gap_rows_reach_their_providers_file_in_order() {
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let dir = tempfile::tempdir().unwrap();
        let wh = Warehouse::new(dir.path());
        let schema = std::sync::Arc::new(Schema::new(vec![
            Field::new("provider", DataType::Utf8, true),
            Field::new("row", DataType::Utf8, true),
        ]));
        let batch = |rows: &[(&str, &str)]| {
            let (providers, values): (Vec<&str>, Vec<&str>) = rows.iter().copied().unzip();
            let column = |v: Vec<&str>| -> datafusion::arrow::array::ArrayRef {
                Arc::new(StringArray::from(v))
            };
            RecordBatch::try_new(schema.clone(), vec![column(providers), column(values)]).unwrap()
        };
        let mut files = CareGapFiles::new(&wh, "r1").unwrap();
        files
            .write(&batch(&[
                ("=x", "1"),
                ("a", "2"),
                ("'=x", "3"),
                ("=x", "4"),
            ]))
            .unwrap();
        files.write(&batch(&[("a", "5"), ("'=x", "6")])).unwrap();
        let written = files.finish().unwrap();
        assert_eq!(written.len(), 2);
        let read = |name: &str| {
            let path = report_dir(&wh, "r1").join("phi").join(name);
            std::fs::read_to_string(path).unwrap()
        };
        assert_eq!(read("care_gaps_a.csv"), "provider,row\na,2\na,5\n");
        assert_eq!(
            read("care_gaps_'=x.csv"),
            "provider,row\n'=x,1\n'=x,3\n'=x,4\n'=x,6\n"
        );
    }

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
