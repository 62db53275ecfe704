//! Helpers shared by the integration tests.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use chrono::NaiveDate;
use datafusion::arrow::array::{Array, AsArray, ListArray, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{ArrowPrimitiveType, DataType, Float64Type, UInt64Type};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sha2::{Digest, Sha256};
use ward::ingest::{IngestOptions, IngestReport, ingest};
use ward::{PipelineConfig, Result};

pub const SAMPLE_TODAY: (i32, u32, u32) = (2026, 1, 31);

/// A child process (a `ward serve`, a cluster role), killed when dropped.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the `ward` binary in `cwd` (the test's `RUST_LOG` removed).
pub fn ward(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ward"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/data/<path>` (public reference data outside the project), or
/// `None` with a message when it is absent — unless
/// `WARD_REQUIRE_SHARED_DATA` is set (`.ci/run` sets it), when a missing
/// folder fails the test instead of letting it pass by skipping.
pub fn shared_data(path: &str) -> Option<PathBuf> {
    let dir = repo().join("../shared/data").join(path);
    if dir.exists() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("WARD_REQUIRE_SHARED_DATA").is_none(),
        "{} is absent and WARD_REQUIRE_SHARED_DATA is set",
        dir.display()
    );
    eprintln!("skipped: {} is absent", dir.display());
    None
}

/// A fresh copy of `sample_data/` (see [`copy_sample`]) ingested once: its
/// directory and config.
pub fn ingested_sample() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    run_ingest(&config).unwrap();
    (dir, config)
}

/// Appends `rows` (lines, each with its line feed) to the file `path`.
pub fn append_lines(path: &Path, rows: &str) {
    let mut text = fs::read_to_string(path).unwrap();
    text.push_str(rows);
    fs::write(path, text).unwrap();
}

/// Copies `sample_data/` into `dir` with the warehouse inside `dir`;
/// returns the config path.
pub fn copy_sample(dir: &Path) -> PathBuf {
    copy_dir(&repo().join("sample_data"), &dir.join("sample_data"));
    let config = dir.join("sample_data").join("ward.toml");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        text.replace("warehouse = \"../warehouse\"", "warehouse = \"../wh\""),
    )
    .unwrap();
    config
}

/// One `ward run` of the bundled sample through the binary, made once per
/// test process and shared (a full run costs about a minute of CI): the
/// tests that only read a sample run's output use it. Never write into
/// its directory (copy it first); it is removed when the tests end.
pub struct SampleRun {
    /// The run's temporary directory: `sample_data/` and the warehouse `wh/`.
    pub dir: PathBuf,
    pub config: PathBuf,
    /// `ward --config <config> run`'s exit status, stdout and stderr.
    pub output: Output,
}

impl SampleRun {
    pub fn warehouse(&self) -> PathBuf {
        self.dir.join("wh")
    }

    /// `wh/runs/<run_id>/` of the published run.
    pub fn run_dir(&self) -> PathBuf {
        ward::runs::current_dir(&self.warehouse())
            .unwrap()
            .expect("the sample run published")
    }

    /// `reports/<run_id>/` of the published run.
    pub fn report_dir(&self) -> PathBuf {
        let run_dir = self.run_dir();
        let id = run_dir.file_name().unwrap().to_owned();
        run_dir.join("reports").join(id)
    }
}

static SAMPLE_RUN: OnceLock<SampleRun> = OnceLock::new();

/// The shared sample run (see [`SampleRun`]), made by the first test that
/// asks; fails every asking test if the run failed (the run is not retried).
pub fn sample_run() -> &'static SampleRun {
    let run = SAMPLE_RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        // Removed at exit: a static is never dropped.
        extern "C" fn remove_sample_run() {
            if let Some(run) = SAMPLE_RUN.get() {
                let _ = fs::remove_dir_all(&run.dir);
            }
        }
        // SAFETY: registers a plain function with no arguments.
        unsafe { libc::atexit(remove_sample_run) };
        let config = copy_sample(&dir);
        let output = Command::new(env!("CARGO_BIN_EXE_ward"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .current_dir(&dir)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        SampleRun {
            dir,
            config,
            output,
        }
    });
    assert_eq!(
        run.output.status.code(),
        Some(0),
        "the shared sample run failed: {}",
        text(&run.output.stderr)
    );
    run
}

pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub fn today() -> NaiveDate {
    NaiveDate::from_ymd_opt(SAMPLE_TODAY.0, SAMPLE_TODAY.1, SAMPLE_TODAY.2).unwrap()
}

pub fn run_ingest(config: &Path) -> Result<IngestReport> {
    let config = PipelineConfig::load(config)?;
    ingest(
        &config.warehouse,
        &config.sources,
        &IngestOptions {
            today: today(),
            dry_run: false,
            ..Default::default()
        },
        &(),
    )
}

/// `ward::run` (every stage) with the sample's day, the bundled queries and
/// the config's measurement period.
pub fn run_all(config: &PipelineConfig) -> ward::RunReport {
    run_with(config, ward::runs::Rebuild::Incremental)
}

/// [`run_all`], recomputing every stage (`ward run --full`) or not.
pub fn run_with(config: &PipelineConfig, rebuild: ward::runs::Rebuild) -> ward::RunReport {
    run_queries(config, &repo().join("queries"), rebuild)
}

/// [`run_with`] the measures and checks of `queries`.
pub fn run_queries(
    config: &PipelineConfig,
    queries: &Path,
    rebuild: ward::runs::Rebuild,
) -> ward::RunReport {
    ward::run(
        config,
        &IngestOptions {
            today: today(),
            dry_run: false,
            ..Default::default()
        },
        queries,
        config.measurement_period.expect("the sample sets a period"),
        &ward::deid::resolve_key(&config.deid, |_| None).expect("the sample uses the demo key"),
        rebuild,
        &(),
    )
    .unwrap()
}

/// Reads every Parquet file under `dir` (recursively).
pub fn read_dir_batches(dir: &Path) -> Vec<RecordBatch> {
    ward::warehouse::parquet_files(dir)
        .unwrap()
        .into_iter()
        .flat_map(|p| {
            ParquetRecordBatchReaderBuilder::try_new(fs::File::open(p).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(|b| b.unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

pub fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// Values of a string column over all batches (None for nulls).
pub fn strings(batches: &[RecordBatch], column: &str) -> Vec<Option<String>> {
    batches
        .iter()
        .flat_map(|b| {
            let col = b
                .column_by_name(column)
                .unwrap_or_else(|| panic!("no column {column}"));
            // DataFusion reads strings as Utf8View; Ward writes Utf8.
            let col = cast(col, &DataType::Utf8).unwrap();
            let a = col.as_any().downcast_ref::<StringArray>().unwrap().clone();
            (0..a.len())
                .map(move |i| (!a.is_null(i)).then(|| a.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Reads one Parquet file.
pub fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    ParquetRecordBatchReaderBuilder::try_new(fs::File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// Values of a primitive column over all batches (None for nulls).
pub fn primitives<T: ArrowPrimitiveType>(
    batches: &[RecordBatch],
    column: &str,
) -> Vec<Option<T::Native>> {
    batches
        .iter()
        .flat_map(|b| {
            let a = b
                .column_by_name(column)
                .unwrap()
                .as_primitive::<T>()
                .clone();
            (0..a.len())
                .map(move |i| (!a.is_null(i)).then(|| a.value(i)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Values of a non-null UInt64 column (line numbers).
pub fn u64s(batches: &[RecordBatch], column: &str) -> Vec<u64> {
    primitives::<UInt64Type>(batches, column)
        .into_iter()
        .map(Option::unwrap)
        .collect()
}

/// Values of a Float64 column (None for nulls).
pub fn f64s(batches: &[RecordBatch], column: &str) -> Vec<Option<f64>> {
    primitives::<Float64Type>(batches, column)
}

/// (source, file, line, rule) of every reject in the warehouse, sorted.
pub fn reject_keys(wh: &Path) -> Vec<(String, String, u64, String)> {
    let b = read_dir_batches(&wh.join("rejects"));
    let mut keys: Vec<_> = strings(&b, "source")
        .into_iter()
        .zip(strings(&b, "source_file"))
        .zip(u64s(&b, "line"))
        .zip(strings(&b, "rule"))
        .map(|(((s, f), l), r)| (s.unwrap(), f.unwrap(), l, r.unwrap()))
        .collect();
    keys.sort();
    keys
}

/// A process's output as text (lossy).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Generates a synthetic population into `out` (measurement year 2025;
/// `out/ward.toml` loads it).
pub fn generate(out: &Path, patients: u64, providers: usize, seed: u64, bad_rate: f64) {
    ward_synth::synth(
        &ward_synth::SynthOptions {
            patients,
            providers,
            seed,
            out: out.to_path_buf(),
            bad_rate,
            year: 2025,
            hard_noise: false,
        },
        &|_| {},
    )
    .unwrap();
}

/// A non-null boolean column of every batch, in order.
pub fn bools(batches: &[RecordBatch], column: &str) -> Vec<bool> {
    batches
        .iter()
        .flat_map(|b| {
            let a = b.column_by_name(column).unwrap().as_boolean().clone();
            (0..a.len()).map(move |i| a.value(i)).collect::<Vec<_>>()
        })
        .collect()
}

/// Every file under `dir` (path relative to `dir`) with the SHA-256 of its
/// content.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let mut bytes = fs::read(&p).unwrap();
                if p.ends_with("state/ingest.json") {
                    // What ingest recorded, but the files' stats: a file
                    // that settled since is recorded anew, unchanged.
                    let mut state: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    for files in state["sources"].as_object_mut().unwrap().values_mut() {
                        for file in files.as_object_mut().unwrap().values_mut() {
                            file.as_object_mut().unwrap().remove("stat");
                        }
                    }
                    bytes = serde_json::to_vec(&state).unwrap();
                }
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    hex::encode(Sha256::digest(bytes)),
                );
            }
        }
    }
    out
}

/// Number of items in a list column at one row of a batch.
pub fn list_len(batch: &RecordBatch, column: &str, row: usize) -> usize {
    batch
        .column_by_name(column)
        .unwrap()
        .as_any()
        .downcast_ref::<ListArray>()
        .unwrap()
        .value(row)
        .len()
}

/// Everything a run derived from staging, by table: a table's Parquet
/// files (`part-*.parquet` in its folder, however its rows are split) as
/// their sorted rows (with the column names first), other Parquet files as
/// theirs, other files as text; and the care-gap lists (`phi/<file>`, as
/// text, byte for byte). The other reports are left out: they name the
/// run.
pub fn derived(run_dir: &Path) -> BTreeMap<String, Vec<String>> {
    let mut batches: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for sub in ["core", "marts", "research"] {
        let dir = run_dir.join(sub);
        for entry in walkdir(&dir) {
            let name = entry.file_name().unwrap().to_string_lossy().into_owned();
            let of = match name.starts_with("part-") {
                true => entry.parent().unwrap(),
                false => &entry,
            };
            let rel = of
                .strip_prefix(run_dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if name.ends_with(".parquet") {
                batches.entry(rel).or_default().extend(read_parquet(&entry));
            } else {
                out.insert(rel, vec![fs::read_to_string(&entry).unwrap()]);
            }
        }
    }
    out.extend(batches.into_iter().map(|(rel, b)| (rel, sorted_rows(&b))));
    // The care-gap lists, whatever the run's id.
    let reports = run_dir.join("reports");
    let lists = if reports.is_dir() {
        walkdir(&reports)
    } else {
        Vec::new()
    };
    for entry in lists {
        if entry.parent().is_some_and(|p| p.ends_with("phi")) {
            let name = entry.file_name().unwrap().to_string_lossy();
            out.insert(
                format!("phi/{name}"),
                vec![fs::read_to_string(&entry).unwrap()],
            );
        }
    }
    out
}

/// The column names of `batches` joined by `|`, then every row as text,
/// sorted: equal when two sets of batches hold the same rows in any order.
pub fn sorted_rows(batches: &[RecordBatch]) -> Vec<String> {
    let mut rows: Vec<String> = Vec::new();
    for b in batches {
        let cols: Vec<ArrayFormatter> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default()))
            .collect::<Result<_, _>>()
            .unwrap();
        for i in 0..b.num_rows() {
            let row: Vec<String> = cols.iter().map(|c| c.value(i).to_string()).collect();
            rows.push(row.join("|"));
        }
    }
    rows.sort();
    let names = batches.first().map(|b| {
        b.schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect::<Vec<_>>()
            .join("|")
    });
    names.into_iter().chain(rows).collect()
}

/// Every file under `dir`, recursively.
pub fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walkdir(&path));
        } else {
            out.push(path);
        }
    }
    out
}
