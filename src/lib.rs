//! Ward: a population health analytics pipeline.
//!
//! Provider extracts (CSV in each provider's own layout, described by a TOML
//! mapping) are read, mapped to the canonical model ([`schema`]), validated
//! and normalized by [`ingest`], and published as Parquet in the
//! [`warehouse`]. Rows that fail a rule are kept as rejects with file, line,
//! column and rule; read = accepted + rejected for every file. [`link`]
//! links each patient's records across providers into persons and builds
//! the core tables; [`measure`] runs the SQL measures of `queries/` over
//! them with DataFusion; [`report`] writes stratified, suppressed summaries,
//! the HTML report, FHIR MeasureReports and care-gap lists; [`deid`] writes
//! the de-identified research tables that [`query`] serves. [`run`] is the
//! nightly job: all of it under a lock, into a run directory published
//! atomically ([`runs`]).
//!
//! The library never prints, exits or reads the environment; it logs through
//! `tracing`. The `ward` binary is a thin layer over [`run`] and friends.

pub mod cluster;
pub mod config;
pub mod deid;
pub mod delta;
pub mod dq;
mod engine;
pub mod error;
pub mod ingest;
pub mod link;
pub mod mapping;
pub mod measure;
pub mod normalize;
mod optimizer;
pub mod query;
pub mod reads;
pub mod report;
pub mod runs;
pub mod schema;
pub mod serve;
pub mod settings;
pub mod sqlfn;
mod tomlfile;
pub mod valuesets;
pub mod warehouse;

use std::collections::BTreeMap;

pub use config::PipelineConfig;
pub use error::{Result, WardError};
pub use ingest::{IngestOptions, IngestReport};

/// Progress of a long stage (ingest: files), reported by the library and
/// shown by the caller — the binary's terminal bar, or nothing (`&()`). The
/// library takes no terminal type.
pub trait Progress: Sync {
    /// The stage has `total` units of work (it may grow as work is found).
    fn set_total(&self, _total: u64) {}
    /// `n` more units are done.
    fn advance(&self, _n: u64) {}
}

/// Progress shown nowhere.
impl Progress for () {}

/// What `ward run` did: the ingest report, linkage, the core tables built,
/// the measures' results, and the published run.
#[derive(Debug)]
pub struct RunReport {
    pub run_id: String,
    /// `runs/<run_id>/`, now the current run.
    pub run_dir: std::path::PathBuf,
    pub manifest: runs::Manifest,
    pub ingest: IngestReport,
    pub link: link::LinkReport,
    pub core: link::build::BuildReport,
    pub measures: Vec<measure::MeasureResult>,
    /// `reports/<run_id>/` in the run directory, holding the summary.
    pub report_dir: std::path::PathBuf,
    /// Care-gap lists, one per provider (identified data, owner-only).
    pub care_gaps: Vec<std::path::PathBuf>,
    /// FHIR MeasureReports, one per measure (`reports/<run_id>/fhir/`).
    pub measure_reports: Vec<std::path::PathBuf>,
    /// `reports/<run_id>/report.html`, the self-contained dashboard.
    pub report_html: std::path::PathBuf,
    /// The published summary: every measure's cells, small cells suppressed.
    pub summary: Vec<report::Cell>,
    /// The de-identified research tables (`research/` in the run directory).
    pub research: deid::DeidReport,
    /// Every data-quality check on every source (`reports/<run_id>/dq.*`).
    pub dq: Vec<dq::CheckResult>,
}

/// The nightly job. Takes the warehouse lock, runs every stage — ingest,
/// the data-quality gates, linkage and the core tables, the data-quality
/// checks of `queries/checks` (`reports/<run_id>/dq.*`; a failing `fail`
/// check is a gate), every measure of
/// `queries` for `period` (`marts/measure_patient/`), the stratified,
/// suppressed summary, the HTML report with trends over the published
/// runs, a FHIR MeasureReport per measure and the care-gap lists
/// (`reports/<run_id>/`), and the de-identified research tables
/// (`research/`, pseudonyms keyed by `key`, ages at `opts.today`) — into
/// its own directory `runs/<run_id>/`, writes the manifest and publishes the
/// run by pointing `runs/CURRENT` at it, then prunes old runs
/// (`[runs] keep`). See [`runs`] for the layout.
///
/// A stage whose inputs are those of the same stage in the current run
/// (its fingerprint, see [`runs::reuse`], is the same) takes that run's
/// outputs instead of recomputing them, unless `rebuild` is
/// [`runs::Rebuild::Full`]; the manifest names the run they came from.
///
/// A failed gate ([`WardError::GateFailed`]) or stage error leaves the
/// current run as it was; the run's manifest records why it failed. Files
/// that could not be loaded do not stop the run (see
/// [`IngestReport::failures`]).
pub fn run(
    config: &PipelineConfig,
    opts: &IngestOptions,
    queries: &std::path::Path,
    period: measure::Period,
    key: &deid::DeidKey,
    rebuild: runs::Rebuild,
    progress: &dyn Progress,
) -> Result<RunReport> {
    let root = config.warehouse.as_path();
    let lock = runs::Lock::acquire(root, "ward run")?;
    let run_id = runs::new_run_id(root);
    let span = tracing::info_span!("run", run_id = %run_id);
    let _entered = span.enter();
    let run_dir = runs::runs_dir(root).join(&run_id);
    std::fs::create_dir_all(&run_dir).map_err(|e| WardError::io("cannot create", &run_dir, e))?;
    let config_bytes =
        std::fs::read(&config.path).map_err(|e| WardError::io("cannot read", &config.path, e))?;
    let mut manifest = runs::Manifest::start(
        &run_id,
        runs::ConfigInfo {
            path: config.path.clone(),
            sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&config_bytes)),
        },
        runs::PeriodInfo {
            start: period.start.to_string(),
            end: period.end.to_string(),
        },
    );
    if let Some(stale) = &lock.stale {
        tracing::warn!(holder = %stale, "took over the lock of a process that died");
        manifest.warnings.push(format!(
            "took over the lock of a process that died: {stale}"
        ));
    }
    for id in runs::remove_interrupted(root, &run_id)? {
        tracing::warn!(interrupted = %id, "removed the directory of an interrupted run");
        manifest.warnings.push(format!(
            "run {id} had been interrupted; its directory was removed"
        ));
    }
    let previous = Previous::load(root, &mut manifest.warnings)?;
    // A cache: without it, the files taken from the current run are read
    // to be checked.
    if let Err(e) = runs::remember_kept_hashes(root) {
        tracing::warn!(error = %e, "the kept file hashes cannot be read: files taken are hashed");
    }
    let night = Night {
        config,
        opts,
        queries,
        period,
        key,
        rebuild,
        run_dir: &run_dir,
        previous: &previous,
    };
    let outcome = run_stages(&night, progress, &mut manifest);
    manifest.finished = runs::now();
    manifest.peak_memory_bytes = manifest
        .stages
        .iter()
        .filter_map(|s| s.peak_memory_bytes)
        .max();
    let mut report = match outcome {
        Ok(report) => report,
        Err(e) => {
            manifest.error = Some(e.to_string());
            manifest.outputs = runs::list_outputs(&run_dir).unwrap_or_default();
            if let Err(write) = manifest.write(&run_dir) {
                tracing::error!(error = %write, "cannot write the manifest of the failed run");
            }
            return Err(e);
        }
    };
    let _publish = tracing::info_span!("stage", stage = "publish").entered();
    runs::write_history(
        &run_dir,
        previous.history,
        runs::HistoryEntry {
            run_id: run_id.clone(),
            finished: manifest.finished.clone(),
            period: manifest.period.clone(),
            persons: report.link.persons,
            overall: report
                .summary
                .iter()
                .filter(|c| c.dimension == "overall")
                .cloned()
                .collect(),
            dq: dq::DqRate::of(&report.dq),
        },
    )?;
    manifest.status = runs::RunStatus::Complete;
    manifest.outputs = runs::list_outputs(&run_dir)?;
    manifest.write(&run_dir)?;
    runs::sync_tree(&run_dir)?;
    tracing::info!("publishing");
    runs::publish(root, &run_id)?;
    tracing::info!(run_dir = %run_dir.display(), "run published");
    for id in runs::prune(root, config.keep_runs)? {
        tracing::info!(removed = %id, "old run removed ([runs] keep)");
    }
    if let Err(e) = runs::keep_hashes(root, &run_dir, &manifest.outputs) {
        tracing::warn!(error = %e, "the file hashes cannot be kept: the next night hashes again");
    }
    report.manifest = manifest;
    Ok(report)
}

/// What the current (last published) run left for the next one.
struct Previous {
    /// Its directory.
    dir: Option<std::path::PathBuf>,
    manifest: Option<runs::Manifest>,
    history: Vec<runs::HistoryEntry>,
}

impl Previous {
    /// What the current run left; a part that cannot be read is a warning
    /// (the run goes on without it) rather than a night that cannot run.
    fn load(warehouse: &std::path::Path, warnings: &mut Vec<String>) -> Result<Previous> {
        let mut previous = Previous {
            dir: None,
            manifest: None,
            history: Vec::new(),
        };
        let Some(dir) = runs::current_dir(warehouse)? else {
            return Ok(previous);
        };
        let mut warn = |what: &str, e: WardError| {
            tracing::warn!(error = %e, "the current run's {what} cannot be read; going on without it");
            warnings.push(format!("the current run's {what} cannot be read: {e}"));
        };
        match runs::Manifest::load(&dir) {
            Ok(m) => previous.manifest = Some(m),
            Err(e) => warn("manifest (gates compare with nothing)", e),
        }
        match runs::load_history(Some(&dir)) {
            Ok(h) => previous.history = h,
            Err(e) => warn("history (trends restart)", e),
        }
        previous.dir = Some(dir);
        Ok(previous)
    }

    /// Its record → person links, so that persons keep their ids (1.6M
    /// links hold about 300 MB). Links that cannot be read are none, with
    /// the warning returned.
    fn links(&self) -> (Vec<link::PersonLink>, Option<String>) {
        match &self.dir {
            Some(dir) => read_links(dir),
            None => (Vec::new(), None),
        }
    }

    /// [`Previous::links`] read on a thread of its own, begun now.
    fn links_meanwhile(
        &self,
    ) -> Option<std::thread::JoinHandle<(Vec<link::PersonLink>, Option<String>)>> {
        let dir = self.dir.clone()?;
        std::thread::Builder::new()
            .name("current-links".into())
            .spawn(move || read_links(&dir))
            .ok()
    }

    /// The current run's directory and manifest when tonight's `stage` has
    /// the fingerprint it had there (its outputs can be taken), unless the
    /// night rebuilds everything.
    fn reusable(
        &self,
        night: &Night,
        fingerprints: &BTreeMap<String, String>,
        stage: &str,
    ) -> Option<(&std::path::Path, &runs::Manifest)> {
        let manifest = self.manifest.as_ref()?;
        let tonight = fingerprints.get(stage)?;
        (night.rebuild == runs::Rebuild::Incremental
            && manifest.fingerprints.get(stage) == Some(tonight))
        .then_some((self.dir.as_deref()?, manifest))
    }
}

/// The links of the run in `dir` (see [`Previous::links`]).
fn read_links(dir: &std::path::Path) -> (Vec<link::PersonLink>, Option<String>) {
    match link::read_person_links(&dir.join("core").join("person_link.parquet")) {
        Ok(links) => (links, None),
        Err(e) => {
            tracing::warn!(error = %e, "the current run's person links cannot be read; going on without them");
            let warning = format!(
                "the current run's person links (person ids start afresh) cannot be read: {e}"
            );
            (Vec::new(), Some(warning))
        }
    }
}

/// What one night runs with.
struct Night<'a> {
    config: &'a PipelineConfig,
    opts: &'a IngestOptions,
    queries: &'a std::path::Path,
    period: measure::Period,
    key: &'a deid::DeidKey,
    rebuild: runs::Rebuild,
    run_dir: &'a std::path::Path,
    previous: &'a Previous,
}

/// Tonight's fingerprint of each stage that can be reused (see
/// [`runs::reuse`]): `link` (the staged patient records, `[link]` and its
/// labels), `build` (link and every staged file) and `build.<table>` (link
/// and the files that staged rows of the table), `dq` (build, the sources,
/// the checks and `[dq]`), `measures` (build, the queries and the period)
/// and `deid` (build, `[deid]`, the key's fingerprint, the value sets and
/// the reference day), `deid.facts` (`[deid]` and the key's fingerprint:
/// what a fact table's research rows depend on besides its core rows).
/// Empty (nothing is reused) when the running code cannot be identified.
fn fingerprints(
    night: &Night,
    state: &warehouse::IngestState,
    checks: &[dq::Check],
) -> Result<BTreeMap<String, String>> {
    let Some(code) = runs::Fingerprint::code() else {
        return Ok(BTreeMap::new());
    };
    let config = night.config;
    let link = code
        .clone()
        .part("stage", "link")
        .part("link", &config.link)
        .file("labels", config.link.labels.as_deref())?
        .staged(state, Some(schema::Table::Patient.name()))
        .finish();
    let build = code
        .clone()
        .part("stage", "build")
        .part("link", &link)
        .staged(state, None)
        .finish();
    let after_build = |stage: &str| code.clone().part("stage", stage).part("build", &build);
    let with_checks = |f: runs::Fingerprint| {
        f.part("sources", &config.sources)
            .part("checks", checks)
            .part("dq", &config.dq)
    };
    let dq = with_checks(after_build("dq")).finish();
    // What the checks count with, but the staged rows and the person links:
    // a run with the same keeps the counts a check took of a source whose
    // inputs it reads (`dq.source.<name>.<input>`, and `link` for the
    // person links) are the same.
    let dq_checks = with_checks(code.clone().part("stage", "dq")).finish();
    let dq_sources: Vec<(String, String)> = state
        .sources
        .iter()
        .flat_map(|(source, files)| {
            dq_inputs(&code, source, files.values().flat_map(|f| &f.outputs))
        })
        .collect();
    let measures = after_build("measures")
        .tree("queries", night.queries)?
        .part("period", night.period)
        .finish();
    // What the measures are, whatever the data: a run with the same can
    // keep its results for the persons whose core rows did not change.
    let measure_logic = code
        .clone()
        .part("stage", "measures")
        .tree("queries", night.queries)?
        .part("period", night.period)
        .finish();
    let deid = after_build("deid")
        .part("deid", &config.deid)
        .part("key", night.key.fingerprint())
        .part("reference date", night.opts.today)
        .tree("valuesets", &night.queries.join("valuesets"))?
        .finish();
    // What a fact table's research rows depend on besides its core rows
    // (not the persons, the reference day or the value sets): a core table
    // taken from the current run takes its research table too, when this is
    // the same (see `deid::Earlier`).
    let deid_facts = code
        .clone()
        .part("stage", "deid.facts")
        .part("deid", &config.deid)
        .part("key", night.key.fingerprint())
        .finish();
    // Each core table, from the files that staged its rows.
    let tables: Vec<(String, String)> = link::build::fact_tables()
        .map(|t| {
            let table = code
                .clone()
                .part("stage", "build")
                .part("link", &link)
                .staged(state, Some(t.name()))
                .finish();
            (format!("build.{}", t.name()), table)
        })
        .collect();
    Ok([
        ("link", link),
        ("build", build),
        ("dq", dq),
        ("dq.checks", dq_checks),
        ("measures", measures),
        ("measures.queries", measure_logic),
        ("deid", deid),
        ("deid.facts", deid_facts),
    ]
    .map(|(s, f)| (s.to_string(), f))
    .into_iter()
    .chain(tables)
    .chain(dq_sources)
    .collect())
}

/// `dq.source.<source>.<input>`: per check input (see [`dq::inputs`]) the
/// source's files of `outputs`, its staged and rejected Parquet files. A
/// file is named by its batch, which says what was loaded into it (the
/// extract, its mapping, the patients checked against).
fn dq_inputs<'a>(
    code: &runs::Fingerprint,
    source: &str,
    outputs: impl IntoIterator<Item = &'a String>,
) -> Vec<(String, String)> {
    dq::inputs(outputs.into_iter().map(String::as_str))
        .into_iter()
        .map(|(input, files)| {
            let f = code.clone().part("stage", "dq").part("files", files);
            (format!("dq.source.{source}.{input}"), f.finish())
        })
        .collect()
}

/// Per source, how each check input (see [`dq_inputs`], and `person_link`)
/// differs from the run whose fingerprints are `before`, tonight's staged
/// and rejected files being `tonight` (see [`dq::Kept`]).
fn dq_changes(
    code: &runs::Fingerprint,
    state: &warehouse::IngestState,
    fingerprints: &BTreeMap<String, String>,
    before: &BTreeMap<String, String>,
    tonight: &std::collections::BTreeSet<String>,
) -> BTreeMap<String, BTreeMap<String, dq::Change>> {
    // The inputs as they are but for tonight's files.
    let without_tonight: BTreeMap<String, String> = state
        .sources
        .iter()
        .flat_map(|(source, files)| {
            let outputs = files.values().flat_map(|f| &f.outputs);
            dq_inputs(code, source, outputs.filter(|o| !tonight.contains(*o)))
        })
        .collect();
    let keys: std::collections::BTreeSet<&String> =
        fingerprints.keys().chain(before.keys()).collect();
    let mut changes: BTreeMap<String, BTreeMap<String, dq::Change>> = BTreeMap::new();
    for key in keys {
        let Some((source, input)) = key
            .strip_prefix("dq.source.")
            .and_then(|k| k.rsplit_once('.'))
        else {
            continue;
        };
        // Tonight's files count as tonight's rows: an input that holds some
        // only grew when it was, without them, what the kept counts counted
        // (one loaded again into the files it had is not: its rows would be
        // counted twice).
        let holds_tonight = without_tonight.get(key) != fingerprints.get(key);
        let change = match (fingerprints.get(key) == before.get(key), holds_tonight) {
            (true, false) => continue,
            (false, true) if without_tonight.get(key) == before.get(key) => dq::Change::Grew,
            _ => dq::Change::Changed,
        };
        changes
            .entry(source.to_string())
            .or_default()
            .insert(input.to_string(), change);
    }
    // New links change what a check of the links counts of every source.
    if fingerprints.get("link") != before.get("link") {
        for source in state.sources.keys() {
            changes.entry(source.clone()).or_default();
        }
        for inputs in changes.values_mut() {
            inputs.insert("person_link".into(), dq::Change::Changed);
        }
    }
    changes
}

/// Times a stage and measures its peak memory, inside a `stage` span (so
/// every log line of the stage names it).
fn stage<T>(manifest: &mut runs::Manifest, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _span = tracing::info_span!("stage", stage = name).entered();
    runs::reset_peak_memory();
    let start = std::time::Instant::now();
    // What earlier stages still hold (the stage's peak includes it).
    tracing::info!(held_bytes = runs::peak_memory(), "stage started");
    let out = f();
    let seconds = start.elapsed().as_secs_f64();
    let peak_bytes = runs::peak_memory();
    manifest.stages.push(runs::StageInfo {
        stage: name.to_string(),
        seconds,
        peak_memory_bytes: peak_bytes,
        reused_from: None,
        reused_tables: Vec::new(),
        appended_tables: Vec::new(),
        reused_sources: Vec::new(),
        recounts: None,
        recomputed: None,
    });
    tracing::info!(seconds, ok = out.is_ok(), peak_bytes, "stage finished");
    out
}

/// Runs stage `name`, by taking `paths` (relative to the run directory)
/// from `from` — the current run, when the stage's inputs are unchanged —
/// and turning them into the stage's result with `reuse`, else by
/// `compute`. Outputs that cannot be taken (changed since, unreadable) are
/// a warning, and the stage computes them.
fn stage_or_reuse<T>(
    manifest: &mut runs::Manifest,
    name: &str,
    from: Option<(&std::path::Path, &runs::Manifest)>,
    run_dir: &std::path::Path,
    paths: &[String],
    reuse: impl FnOnce(&std::path::Path, &runs::Manifest) -> Result<T>,
    compute: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let (mut reused_from, mut warning) = (None, None);
    let out = stage(manifest, name, || {
        if let Some((dir, earlier)) = from {
            let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
            let taken = runs::adopt(dir, run_dir, &paths, &earlier.outputs)
                .and_then(|files| Ok((files, reuse(dir, earlier)?)));
            match taken {
                Ok((files, out)) => {
                    tracing::info!(from = %earlier.run_id, files, "inputs unchanged: outputs taken from the current run");
                    reused_from = Some(earlier.run_id.clone());
                    return Ok(out);
                }
                Err(e) => {
                    for path in &paths {
                        let path = run_dir.join(path);
                        let _ =
                            std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                    }
                    let message = format!(
                        "stage {name}: the outputs of run {} cannot be taken, so they are computed again: {e}",
                        earlier.run_id
                    );
                    tracing::warn!("{message}");
                    warning = Some(message);
                }
            }
        }
        compute()
    });
    if let Some(stage) = manifest.stages.last_mut() {
        stage.reused_from = reused_from;
    }
    manifest.warnings.extend(warning);
    out
}

fn run_stages(
    night: &Night,
    progress: &dyn Progress,
    manifest: &mut runs::Manifest,
) -> Result<RunReport> {
    let Night {
        config,
        opts,
        queries,
        period,
        key,
        run_dir,
        previous,
        ..
    } = *night;
    let warehouse = warehouse::Warehouse::new(&config.warehouse).with_output(run_dir);
    // The measures and checks are read and planned first: a mistake in
    // one is a configuration error before any data is touched.
    let defs = measure::catalog(queries)?;
    let mut checks = dq::catalog(queries)?;
    config
        .dq
        .apply(&mut checks)
        .map_err(|message| tomlfile::file_error(&config.path, message))?;
    dq::validate(&mut checks)?;
    // What linkage needs of the current run, when it runs again on an
    // incremental night, is read and planned while tonight's files are
    // ingested (ingest leaves a core idle): its links, and the columns of
    // the person table the measures read (persons' rows may change in some
    // columns only). A night that takes the links drops them unused.
    let incremental = night.rebuild == runs::Rebuild::Incremental;
    let mut links_meanwhile = incremental.then(|| previous.links_meanwhile()).flatten();
    let mut person_columns = plan_person_columns(night, &defs);
    let ingest = stage(manifest, "ingest", || {
        ingest::ingest(&config.warehouse, &config.sources, opts, progress)
    })?;
    let state = warehouse.load_state()?;
    manifest.inputs = runs::inputs(&state, &ingest, previous.manifest.as_ref());
    manifest.sources = runs::source_tables(&manifest.inputs);
    manifest.warnings.extend(ingest.failures());
    let gates = runs::check_gates(
        &config.gates,
        &config.sources,
        &manifest.sources,
        previous.manifest.as_ref(),
    );
    record_gates(manifest, gates)?;
    let fingerprints = fingerprints(night, &state, &checks)?;
    manifest.fingerprints = fingerprints.clone();
    let reusable = |stage: &str| previous.reusable(night, &fingerprints, stage);

    // The report only: the links are in person_link.parquet, and the later
    // stages read them from there.
    let mut links_warning = None;
    // The persons whose records moved, when linkage ran against earlier links.
    let mut relinked = None;
    let mut state_warning = None;
    let linkage = stage_or_reuse(
        manifest,
        "link",
        reusable("link"),
        run_dir,
        &link::OUTPUTS.map(|f| format!("core/{f}")),
        |dir, earlier| {
            earlier.linkage.clone().ok_or_else(|| WardError::State {
                path: dir.join(runs::MANIFEST),
                message: "it records no linkage".into(),
            })
        },
        || {
            let read = links_meanwhile
                .take()
                .and_then(|reading| reading.join().ok());
            let (previous_links, warning) = read.unwrap_or_else(|| previous.links());
            links_warning = warning;
            tracing::debug!(links = previous_links.len(), "the current run's links read");
            // The kept model and pairs, while they are what their run wrote.
            let core = previous.dir.as_deref().zip(previous.manifest.as_ref()).and_then(|(dir, m)| {
                let files = link::state::FILES.map(|f| format!("core/{f}"));
                match runs::verify(dir, &files.each_ref().map(String::as_str), &m.outputs) {
                    Ok(_) => Some(dir.join("core")),
                    Err(e) => {
                        tracing::warn!(error = %e, "the kept linkage state is not what its run wrote: the model is fitted anew");
                        state_warning = Some(format!(
                            "linkage: the kept model is not what its run wrote, so it was fitted anew: {e}"
                        ));
                        None
                    }
                }
            });
            // Its persons, when they are what it wrote.
            let person = previous
                .dir
                .as_deref()
                .zip(previous.manifest.as_ref())
                .and_then(|(dir, m)| {
                    let path = "core/person.parquet";
                    let listed =
                        runs::verify(dir, &[path], &m.outputs).is_ok_and(|f| !f.is_empty());
                    listed.then(|| dir.join(path))
                });
            let code = runs::Fingerprint::code().map(runs::Fingerprint::finish);
            let earlier = link::Earlier {
                links: &previous_links,
                core: core.as_deref(),
                refit: night.rebuild == runs::Rebuild::Refit,
                incremental: night.rebuild == runs::Rebuild::Incremental,
                code: code.as_deref(),
                person: person.as_deref(),
            };
            let linkage = link::link(&warehouse, &config.link, &earlier)?;
            relinked = linkage.report.links_changed.map(|_| linkage.relinked);
            Ok(linkage.report)
        },
    )?;
    manifest.warnings.extend(links_warning);
    manifest.warnings.extend(state_warning);
    let link_reused = manifest
        .stages
        .last()
        .is_some_and(|s| s.reused_from.is_some());
    manifest.linkage = Some(linkage.clone());
    manifest
        .warnings
        .extend(linkage.warnings.iter().map(|w| format!("linkage: {w}")));
    let relinked = match link_reused {
        true => Some(std::collections::BTreeSet::new()),
        false => relinked,
    };
    let core = build_core(
        night,
        &fingerprints,
        (link_reused, relinked.as_ref()),
        &state,
        &warehouse,
        manifest,
    )?;
    manifest.core = core
        .iter()
        .map(|(t, n)| (t.name().to_string(), *n))
        .chain([("person".to_string(), linkage.persons)])
        .collect();
    let dq = check_quality(
        night,
        &checks,
        &ingest,
        &state,
        &warehouse,
        &fingerprints,
        manifest,
    )?;
    let run_id = manifest.run_id.clone();
    let mut recomputed = None;
    // The persons whose core rows changed since the current run, when the
    // measures were computed for some of them only.
    let mut changed_since = None;
    let measures = stage_or_reuse(
        manifest,
        "measures",
        reusable("measures"),
        run_dir,
        &[MARTS.to_string()],
        |_, _| {
            // Every measure's marts are read back; a measure that cannot be
            // (an empty denominator, whose explanation needs the engine) runs.
            let mut read = Vec::new();
            for def in &defs {
                read.push(measure::read_marts(run_dir, def, period)?);
            }
            let missing: Vec<&measure::MeasureDef> = defs
                .iter()
                .zip(&read)
                .filter(|(_, r)| r.is_none())
                .map(|(d, _)| d)
                .collect();
            let computed = measure::run(&warehouse, queries, &missing, period)?;
            measure::write_marts(&warehouse, &computed)?;
            let mut computed = computed.into_iter();
            let mut results = Vec::new();
            for (def, r) in defs.iter().zip(read) {
                // One result per group, one for a measure without groups.
                let n = def.groups.len().max(1);
                results.extend(r.unwrap_or_else(|| computed.by_ref().take(n).collect()));
            }
            Ok(results)
        },
        || {
            let all: Vec<&measure::MeasureDef> = defs.iter().collect();
            // New facts under the same queries: only the persons they touch.
            let changed = match previous.reusable(night, &fingerprints, "measures.queries") {
                // The marts kept for the others must be the ones their run wrote.
                Some((dir, earlier)) => {
                    match runs::verify(dir, &[MARTS], &earlier.outputs).and_then(|_| {
                        changed_persons(dir, run_dir, &warehouse, || {
                            person_columns.take()?.join().ok().flatten()
                        })
                    }) {
                        Ok(changed) => changed.map(|changed| (dir, &earlier.run_id, changed)),
                        Err(e) => {
                            tracing::warn!(error = %e, "the current run's results cannot be kept: computed for every person");
                            None
                        }
                    }
                }
                None => None,
            };
            let measures = match changed {
                Some((dir, rest_from, changed)) => {
                    recomputed = Some(runs::Recomputed {
                        persons: changed.touched.len() as u64,
                        of: changed.touched.persons,
                        rest_from: rest_from.clone(),
                    });
                    let (measures, unchanged) = measure::run_for_persons(
                        &warehouse,
                        &changed.warehouse,
                        dir,
                        queries,
                        &all,
                        period,
                        &changed.touched,
                    )?;
                    changed_since = Some((changed.all, changed.touched));
                    // The marts verified above, unchanged: taken (written
                    // anew they would be the same bytes).
                    measure::write_marts_but(&warehouse, &measures, &unchanged)?;
                    for key in &unchanged {
                        let rel = measure::mart_path(std::path::Path::new(""), key);
                        runs::take(dir, warehouse.out(), &rel)?;
                    }
                    measures
                }
                None => {
                    let measures = measure::run(&warehouse, queries, &all, period)?;
                    measure::write_marts(&warehouse, &measures)?;
                    measures
                }
            };
            Ok(measures)
        },
    )?;
    // The current run's care-gap lists tonight's may take (see
    // `report::KeptCareGaps`): when the results are that run's (the stage
    // took them), or theirs but for the persons computed again.
    let measures_reused = manifest
        .stages
        .last()
        .is_some_and(|s| s.reused_from.is_some());
    let changed_since = match measures_reused {
        true => Some(Default::default()),
        false => changed_since,
    };
    let core_dir = run_dir.join("core");
    // (A measure that compares persons has every person's results anew.)
    let gaps_person_local = measures
        .iter()
        .all(|r| r.care_gap().is_none() || r.def.person_local);
    let kept_care_gaps = match (
        &changed_since,
        &relinked,
        previous.dir.as_deref(),
        &previous.manifest,
    ) {
        (Some((changed, recomputed)), Some(relinked), Some(dir), Some(earlier))
            if gaps_person_local
                && runs::verify(dir, &["core/person.parquet"], &earlier.outputs)
                    .is_ok_and(|f| !f.is_empty()) =>
        {
            patients_appended(&state, &ingest, &fingerprints, &earlier.fingerprints).map(|grown| {
                let kept = report::KeptCareGaps {
                    run_dir: dir,
                    run_id: &earlier.run_id,
                    core: &core_dir,
                    changed,
                    recomputed,
                    relinked,
                    grown,
                };
                (kept, earlier.outputs.as_slice())
            })
        }
        _ => None,
    };
    if let Some(stage) = manifest.stages.last_mut() {
        stage.recomputed = recomputed;
    }
    manifest.measures = measures.iter().map(runs::MeasureFigures::of).collect();
    let snapshot = manifest.clone();
    let reports = stage(manifest, "report", || {
        let input = ReportInput {
            config,
            queries,
            period,
            manifest: &snapshot,
            history: &previous.history,
            ingest: &ingest,
            linkage: &linkage,
            measures: &measures,
            dq: &dq,
            kept_care_gaps: kept_care_gaps.as_ref().map(|(k, o)| (k, *o)),
        };
        write_reports(&warehouse, &input)
    })?;
    let Reports {
        summary,
        report_dir,
        report_html,
        measure_reports,
        care_gaps,
    } = reports;
    manifest.phi_outputs = care_gaps
        .iter()
        .map(|p| {
            p.strip_prefix(run_dir)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let research_dir = run_dir.join("research");
    let earlier_research = earlier_research(night, &fingerprints);
    let mut research_taken = deid::Taken::default();
    let research = stage_or_reuse(
        manifest,
        "deid",
        reusable("deid"),
        run_dir,
        &["research".to_string()],
        |_, _| deid::read_report(&research_dir),
        || {
            // Ages at the day of the data (no fact is later): someone under 90
            // then was under 90 at every event whose year is published.
            let opts = deid::DeidOptions {
                valuesets: Some(queries.join("valuesets")),
                ..deid::DeidOptions::from_config(&config.deid, key.clone(), opts.today)
            };
            let (report, taken) = deid::deid_taking(
                &run_dir.join("core"),
                &research_dir,
                &opts,
                earlier_research.as_ref(),
            )?;
            research_taken = taken;
            Ok(report)
        },
    )?;
    if research_taken != deid::Taken::default() {
        let stage = manifest.stages.last_mut().expect("the stage just ran");
        stage.reused_from = None;
        stage.reused_tables = research_taken.tables;
        stage.appended_tables = research_taken.appended;
    }
    Ok(RunReport {
        run_id,
        run_dir: run_dir.to_path_buf(),
        manifest: manifest.clone(),
        ingest,
        link: linkage,
        core,
        measures,
        report_dir,
        care_gaps,
        measure_reports,
        report_html,
        summary,
        research,
        dq,
    })
}

/// The current run, whose research files tonight's research copy may take
/// for the core files that are its own (see [`deid::deid_taking`]), when
/// the research rows' other inputs (`deid.facts`) are the same and its
/// research report is readable.
fn earlier_research<'a>(
    night: &'a Night,
    fingerprints: &BTreeMap<String, String>,
) -> Option<deid::Earlier<'a>> {
    let (dir, earlier) = night.previous.reusable(night, fingerprints, "deid.facts")?;
    let report = deid::read_report(&dir.join("research")).ok()?;
    Some(deid::Earlier {
        run_dir: dir,
        outputs: &earlier.outputs,
        report,
    })
}

/// The persons whose core rows changed since a run, and tonight's
/// warehouse with its core restricted to them.
struct Changed {
    /// Where the stage reads them.
    touched: delta::Touched,
    /// Every person whose core rows changed.
    all: delta::Touched,
    warehouse: warehouse::Warehouse,
    /// Where the restricted core is; removed when dropped.
    _scratch: tempfile::TempDir,
}

/// The columns of the person table the person-local measures read
/// ([`measure::person_columns_read`]), planned on a thread of its own while
/// the night goes on (planning every measure takes a while, and reads no rows),
/// over the current run's core: its tables have tonight's columns.
/// Planned for an incremental night only, where the measures stage may ask
/// ([`changed_persons`]).
fn plan_person_columns(
    night: &Night,
    defs: &[measure::MeasureDef],
) -> Option<std::thread::JoinHandle<Option<std::collections::BTreeSet<String>>>> {
    if night.rebuild != runs::Rebuild::Incremental {
        return None;
    }
    let current = night.previous.dir.as_ref()?;
    let warehouse = warehouse::Warehouse::new(&night.config.warehouse).with_output(current);
    let local: Vec<measure::MeasureDef> = defs.iter().filter(|d| d.person_local).cloned().collect();
    let (queries, period) = (night.queries.to_path_buf(), night.period);
    let planning = move || {
        let local: Vec<&measure::MeasureDef> = local.iter().collect();
        measure::person_columns_read(&warehouse, &queries, &local, period)
    };
    std::thread::Builder::new()
        .name("person-columns".into())
        .spawn(planning)
        .ok()
}

/// The persons whose core rows changed since the run in `previous` (see
/// [`delta::touched`]) where the stage reads them (`person_columns`: the
/// columns of the person table it reads, asked only when some person's
/// person row alone changed; `None`: every column), with the core
/// restricted to them; `None` when the cores cannot be compared or too
/// many persons changed ([`RECOMPUTE_SHARE`]), so the stage computes for
/// everyone.
fn changed_persons(
    previous: &std::path::Path,
    run_dir: &std::path::Path,
    warehouse: &warehouse::Warehouse,
    person_columns: impl FnOnce() -> Option<std::collections::BTreeSet<String>>,
) -> Result<Option<Changed>> {
    let started = std::time::Instant::now();
    let core = run_dir.join("core");
    let Some(all) = delta::touched(&previous.join("core"), &core)? else {
        tracing::info!("the cores cannot be compared: computed for every person");
        return Ok(None);
    };
    let changed = all.len();
    let touched = match all.has_person_only_changes() {
        true => person_columns().map(|columns| all.seen_by(&columns)),
        false => None,
    }
    .unwrap_or_else(|| all.clone());
    tracing::info!(
        changed,
        touched = touched.len(),
        persons = touched.persons,
        seconds = started.elapsed().as_secs_f64(),
        "persons whose core rows changed (touched: where the stage reads them)"
    );
    if touched.len() as f64 > RECOMPUTE_SHARE * touched.persons as f64 {
        return Ok(None);
    }
    let scratch = warehouse.scratch_dir("touched-")?;
    if !touched.is_empty() {
        delta::restrict(&core, &touched, &scratch.path().join("core"))?;
    }
    Ok(Some(Changed {
        touched,
        all,
        warehouse: warehouse.with_output(scratch.path()),
        _scratch: scratch,
    }))
}

/// Where a run's per-person measure results are.
const MARTS: &str = "marts/measure_patient";

/// Above this share of persons changed, a stage computes for everyone:
/// restricting the core and merging results would cost more than it saves.
const RECOMPUTE_SHARE: f64 = 0.5;

/// The build stage: each core table whose staged files (and linkage) are
/// those of the current run is taken from it; one whose staged files are
/// the current run's and more is taken and appended to (see
/// [`appendable`]); the others are built. The linkage is the current run's
/// when the link stage was reused; when it linked again against the
/// current run's links, `relinked` names the persons whose records moved:
/// their rows are built again in each table taken
/// ([`link::build::update_table`]), every other person's stay. The
/// stage counts as reused when every table was taken as it was.
fn build_core(
    night: &Night,
    fingerprints: &BTreeMap<String, String>,
    (link_reused, relinked): (bool, Option<&std::collections::BTreeSet<String>>),
    state: &warehouse::IngestState,
    warehouse: &warehouse::Warehouse,
    manifest: &mut runs::Manifest,
) -> Result<link::build::BuildReport> {
    let from = match (link_reused, relinked) {
        (true, _) => night.previous.reusable(night, fingerprints, "link"),
        (false, Some(_)) if night.rebuild == runs::Rebuild::Incremental => night
            .previous
            .dir
            .as_deref()
            .zip(night.previous.manifest.as_ref()),
        _ => None,
    };
    let no_one = std::collections::BTreeSet::new();
    let relinked = relinked.unwrap_or(&no_one);
    let (mut taken, mut appended, mut warnings) = (Vec::new(), Vec::new(), Vec::new());
    let run_id = manifest.run_id.clone();
    let report = stage(manifest, "build", || {
        // What becomes of each table: built, or taken (as it was, or
        // updated: appended to, its relinked persons' rows built again),
        // or built after a warning. The tables in parallel: each update
        // is its own files and queries.
        enum Outcome {
            Build,
            Taken { rows: u64, same: bool },
            Warned(String),
        }
        let outcome = |table: schema::Table| -> Result<Outcome> {
            let key = format!("build.{}", table.name());
            let same = from
                .and_then(|_| night.previous.reusable(night, fingerprints, &key))
                .is_some();
            let Some((dir, m, rows)) =
                from.and_then(|(dir, m)| Some((dir, m, *m.core.get(table.name())?)))
            else {
                return Ok(Outcome::Build);
            };
            let new = match same {
                true => None,
                false => match appendable(table, m, state, warehouse, &dir.join("core"), rows)? {
                    Some(new) => Some(new),
                    None => return Ok(Outcome::Build),
                },
            };
            let path = format!("core/{}", table.name());
            let new = new.filter(|files| !files.is_empty());
            let mut same = same || new.is_none();
            let added = runs::adopt(dir, night.run_dir, &[&path], &m.outputs).and_then(|_| {
                if new.is_none() && relinked.is_empty() {
                    return Ok(Some(rows));
                }
                let new = new.unwrap_or_default();
                use link::build::Update;
                Ok(
                    match link::build::update_table(
                        warehouse,
                        table,
                        new,
                        relinked,
                        &run_id,
                        link::build::MAX_REBUILT_PERSONS,
                    )? {
                        Update::Unchanged => {
                            same = true;
                            Some(rows)
                        }
                        Update::Changed { removed, added } => {
                            same = false;
                            Some(rows.saturating_sub(removed) + added)
                        }
                        Update::BuildWhole => None,
                    },
                )
            });
            Ok(match added {
                Ok(None) => {
                    let _ = std::fs::remove_dir_all(night.run_dir.join(&path));
                    Outcome::Build
                }
                Ok(Some(rows)) => Outcome::Taken { rows, same },
                Err(e) => {
                    let _ = std::fs::remove_dir_all(night.run_dir.join(&path));
                    Outcome::Warned(format!(
                        "stage build: core table {} of run {} cannot be taken, so it is built again: {e}",
                        table.name(),
                        m.run_id
                    ))
                }
            })
        };
        use rayon::prelude::*;
        let tables: Vec<schema::Table> = link::build::fact_tables().collect();
        let outcomes = tables
            .par_iter()
            .map(|t| outcome(*t))
            .collect::<Result<Vec<_>>>()?;
        let (mut report, mut build) = (Vec::new(), Vec::new());
        for (table, outcome) in tables.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Build => build.push(table),
                Outcome::Taken { rows, same } => {
                    match same {
                        true => taken.push(table.name().to_string()),
                        false => appended.push(table.name().to_string()),
                    }
                    report.push((table, rows));
                }
                Outcome::Warned(w) => {
                    warnings.push(w);
                    build.push(table);
                }
            }
        }
        if !taken.is_empty() {
            tracing::info!(tables = %taken.join(", "), "staged rows unchanged: core tables taken from the current run");
        }
        report.extend(link::build::build_tables(warehouse, &build)?);
        report.sort_by_key(|(t, _)| *t);
        Ok(report)
    })?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    manifest.warnings.extend(warnings);
    let stage = manifest.stages.last_mut().expect("the stage just ran");
    if taken.len() == link::build::fact_tables().count() {
        stage.reused_from = from.map(|(_, m)| m.run_id.clone());
    } else {
        stage.reused_tables = taken;
        stage.appended_tables = appended;
    }
    Ok(report)
}

/// A core table may take the current run's files only while they stay few:
/// past this many appended files, the table is built again.
const MAX_APPENDED: usize = 8;

/// Nor when the new staged rows are more than this share of the table's.
const APPEND_SHARE: f64 = 0.25;

/// The staged files of `table` that the current run (manifest `m`, core
/// tables in `core`, `rows` rows in this one) did not build from, when
/// its table may be appended to with their rows: every staged file it was
/// built from is still staged (none changed or went), and the new ones are
/// few enough ([`MAX_APPENDED`], [`APPEND_SHARE`]); none when there are
/// none (the table is taken as it is). `None` otherwise, and for a
/// manifest that does not record its staged files.
fn appendable(
    table: schema::Table,
    m: &runs::Manifest,
    state: &warehouse::IngestState,
    warehouse: &warehouse::Warehouse,
    core: &std::path::Path,
    rows: u64,
) -> Result<Option<Vec<std::path::PathBuf>>> {
    let prefix = format!("staging/{}/", table.name());
    let mut before = std::collections::BTreeSet::new();
    // Inputs that were not staged (failed, unmapped) have no sha256.
    for input in m.inputs.iter().filter(|i| i.sha256.is_some()) {
        let Some(outputs) = &input.outputs else {
            return Ok(None);
        };
        before.extend(outputs.iter().filter(|f| f.starts_with(&prefix)));
    }
    let now: std::collections::BTreeSet<&String> = state
        .sources
        .values()
        .flat_map(|files| files.values())
        .flat_map(|f| &f.outputs)
        .filter(|f| f.starts_with(&prefix))
        .collect();
    if !before.is_subset(&now) {
        return Ok(None);
    }
    if before.len() == now.len() {
        // The same staged files (with the same links): the same table.
        return Ok(Some(Vec::new()));
    }
    if link::build::appended_files(&core.join(table.name()))? >= MAX_APPENDED {
        tracing::info!(
            table = table.name(),
            "{MAX_APPENDED} nights appended to the core table: built again"
        );
        return Ok(None);
    }
    let new: Vec<std::path::PathBuf> = now
        .difference(&before)
        .map(|f| warehouse.root().join(f))
        .collect();
    let mut staged = 0;
    for f in &new {
        staged += warehouse::parquet_rows(f)?;
    }
    Ok((staged as f64 <= APPEND_SHARE * rows as f64).then_some(new))
}

/// The data-quality stage: every check on every source, over everything
/// staged and over tonight's rows, written to `reports/<run_id>/dq.*`
/// before anything can fail the night; drift becomes warnings and failing
/// `fail` checks gates.
fn check_quality(
    night: &Night,
    checks: &[dq::Check],
    ingest: &IngestReport,
    state: &warehouse::IngestState,
    warehouse: &warehouse::Warehouse,
    fingerprints: &BTreeMap<String, String>,
    manifest: &mut runs::Manifest,
) -> Result<Vec<dq::CheckResult>> {
    let from = night.previous.reusable(night, fingerprints, "dq");
    let (config, previous) = (night.config, night.previous);
    let run_id = manifest.run_id.clone();
    let earlier: Vec<Vec<dq::DqRate>> = previous.history.iter().map(|h| h.dq.clone()).collect();
    let tonight = tonight_files(state, ingest);
    // With nothing loaded tonight and the same staging, links and checks,
    // the counts are the current run's: only the judgement is redone.
    let from = from.filter(|_| tonight == dq::Tonight::Staged(Default::default()));
    let report_dir = report::report_dir(warehouse, &run_id);
    let (mut reused_sources, mut recounts) = (Vec::new(), None);
    let dq = stage_or_reuse(
        manifest,
        "dq",
        from,
        night.run_dir,
        &[],
        |dir, earlier_run| {
            let counted = dq::read(
                &report::report_dir(&warehouse.with_output(dir), &earlier_run.run_id)
                    .join("dq.json"),
            )?;
            let results = dq::reevaluate(&config.sources, checks, &counted, &earlier, &config.dq);
            dq::write(warehouse, &report_dir, &results)?;
            Ok(results)
        },
        || {
            // Same checks and links: the current run's counts are kept
            // where what a check reads of a source did not change.
            let kept = match (
                &tonight,
                previous.reusable(night, fingerprints, "dq.checks"),
                runs::Fingerprint::code(),
            ) {
                (dq::Tonight::Staged(new), Some((dir, earlier_run)), Some(code)) => {
                    let path = report::report_dir(&warehouse.with_output(dir), &earlier_run.run_id)
                        .join("dq.json");
                    let changes =
                        dq_changes(&code, state, fingerprints, &earlier_run.fingerprints, new);
                    for (source, inputs) in &changes {
                        tracing::debug!(source, ?inputs, "data-quality inputs changed");
                    }
                    match dq::read(&path) {
                        Ok(results) => Some((results, changes)),
                        Err(e) => {
                            tracing::warn!(error = %e, "the current run's counts cannot be read: every source is counted");
                            None
                        }
                    }
                }
                _ => None,
            };
            let kept = kept
                .as_ref()
                .map(|(results, changes)| dq::Kept { results, changes });
            let results = dq::evaluate(
                warehouse,
                &config.sources,
                checks,
                &earlier,
                &tonight,
                &config.dq,
                kept,
            )?;
            if let Some(kept) = kept {
                recounts = Some(kept.recounts(checks));
                reused_sources = state
                    .sources
                    .keys()
                    .filter(|s| !kept.changes.contains_key(*s))
                    .cloned()
                    .collect();
            }
            dq::write(warehouse, &report_dir, &results)?;
            Ok(results)
        },
    )?;
    if let Some(stage) = manifest.stages.last_mut() {
        stage.reused_sources = reused_sources;
        stage.recounts = recounts;
    }
    for r in dq.iter().filter(|r| r.drift) {
        let message = format!(
            "source '{}': data-quality check '{}' drifted from {:.2} % to {:.2} %{} (tolerance {} points)",
            r.source,
            r.check,
            r.baseline_pct.unwrap_or_default(),
            r.rate_pct.unwrap_or_default(),
            r.new_rate_pct
                .map(|n| format!(", {n:.2} % of tonight's {} rows", r.new_checked))
                .unwrap_or_default(),
            r.drift_tolerance_pct
        );
        tracing::warn!(source = %r.source, check = %r.check, "{message}");
        manifest.warnings.push(message);
    }
    record_gates(manifest, runs::dq_gates(&dq))?;
    Ok(dq)
}

/// The staged and rejected files this run wrote (see [`dq::Tonight`]).
fn tonight_files(state: &warehouse::IngestState, ingest: &IngestReport) -> dq::Tonight {
    let loaded: std::collections::BTreeSet<(&str, &str)> = ingest
        .files
        .iter()
        .filter(|f| f.status == ingest::FileStatus::Loaded)
        .map(|f| (f.source.as_str(), f.file.as_str()))
        .collect();
    let staged = || {
        state.sources.iter().flat_map(|(s, files)| {
            files
                .iter()
                .map(move |(name, file)| ((s.as_str(), name.as_str()), file))
        })
    };
    match staged().all(|(f, _)| loaded.contains(&f)) {
        true => dq::Tonight::Everything,
        false => dq::Tonight::Staged(
            staged()
                .filter(|(f, _)| loaded.contains(f))
                .flat_map(|(_, f)| f.latest_outputs().map(str::to_string))
                .collect(),
        ),
    }
}

/// When every source's staged patient records are those of the run whose
/// fingerprints are `before`, or those and records appended since (none
/// changed or removed), the sources with records appended.
fn patients_appended(
    state: &warehouse::IngestState,
    ingest: &IngestReport,
    fingerprints: &BTreeMap<String, String>,
    before: &BTreeMap<String, String>,
) -> Option<std::collections::BTreeSet<String>> {
    let (dq::Tonight::Staged(new), Some(code)) =
        (tonight_files(state, ingest), runs::Fingerprint::code())
    else {
        return None;
    };
    let mut grown = std::collections::BTreeSet::new();
    for (source, inputs) in dq_changes(&code, state, fingerprints, before, &new) {
        match inputs.get("staging_patient") {
            Some(dq::Change::Changed) => return None,
            Some(dq::Change::Grew) => {
                grown.insert(source);
            }
            None => {}
        }
    }
    Some(grown)
}

/// Records `gates` in the manifest, logs them and adds a warning for each
/// that warns; fails the run when any fails (naming every failure).
fn record_gates(manifest: &mut runs::Manifest, gates: Vec<runs::GateResult>) -> Result<()> {
    let mut failed = Vec::new();
    for gate in &gates {
        match gate.outcome {
            runs::GateOutcome::Pass => {}
            runs::GateOutcome::Warn => {
                tracing::warn!(gate = %gate.gate, source = %gate.source, "{}", gate.message);
                manifest.warnings.push(gate.message.clone());
            }
            runs::GateOutcome::Fail => {
                tracing::error!(gate = %gate.gate, source = %gate.source, "{}", gate.message);
                failed.push(gate.message.clone());
            }
        }
    }
    manifest.gates.extend(gates);
    if !failed.is_empty() {
        return Err(WardError::GateFailed {
            run_id: manifest.run_id.clone(),
            failures: failed,
        });
    }
    Ok(())
}

/// What the report stage reads.
struct ReportInput<'a> {
    config: &'a PipelineConfig,
    queries: &'a std::path::Path,
    period: measure::Period,
    /// The run's manifest so far (its id, host, start, warnings).
    manifest: &'a runs::Manifest,
    history: &'a [runs::HistoryEntry],
    ingest: &'a IngestReport,
    linkage: &'a link::LinkReport,
    measures: &'a [measure::MeasureResult],
    dq: &'a [dq::CheckResult],
    /// The current run's care-gap lists tonight's may take, and its
    /// manifest's outputs.
    kept_care_gaps: Option<(&'a report::KeptCareGaps<'a>, &'a [runs::OutputFile])>,
}

/// What the report stage wrote.
struct Reports {
    summary: Vec<report::Cell>,
    report_dir: std::path::PathBuf,
    report_html: std::path::PathBuf,
    measure_reports: Vec<std::path::PathBuf>,
    care_gaps: Vec<std::path::PathBuf>,
}

/// The report stage: the stratified summary, report.html, the FHIR
/// MeasureReports and the care-gap lists.
fn write_reports(warehouse: &warehouse::Warehouse, input: &ReportInput) -> Result<Reports> {
    let ReportInput {
        config,
        queries,
        period,
        manifest,
        measures,
        ..
    } = *input;
    let run_id = manifest.run_id.as_str();
    let trend = runs::trend(input.history);
    let dq_trend = runs::dq_trend(input.history);
    let quality = report::html::SourceQuality::from_ingest(input.ingest);
    let metadata = vec![
        ("config".to_string(), config.path.display().to_string()),
        ("config SHA-256".to_string(), manifest.config.sha256.clone()),
        ("host".to_string(), manifest.host.clone()),
        ("started".to_string(), manifest.started.clone()),
        (
            "persons (linked)".to_string(),
            input.linkage.persons.to_string(),
        ),
        (
            "persons without a usable birth date (left out of age-based measures)".to_string(),
            input.linkage.persons_without_birth_date.to_string(),
        ),
        ("warnings".to_string(), manifest.warnings.len().to_string()),
    ];
    // Each part's time, for an on-call engineer asking where a slow
    // report stage went (`-v`).
    fn timed<T>(part: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = std::time::Instant::now();
        let out = f();
        tracing::debug!(
            part,
            seconds = started.elapsed().as_secs_f64(),
            "report part done"
        );
        out
    }
    // The care-gap lists need nothing of the rest: written meanwhile.
    let (summary, care_gaps) = rayon::join(
        || -> Result<_> {
            let strata = timed("strata", || measure::strata(warehouse, queries, period))?;
            let cells = timed("summary", || {
                Ok(report::summarize(measures, &strata, config.min_cell_size))
            })?;
            let report_dir = timed("summary files", || report::write(warehouse, run_id, &cells))?;
            let html = report::html::HtmlInput {
                trend: &trend,
                metadata: &metadata,
                warnings: &manifest.warnings,
                dq: input.dq,
                dq_trend: &dq_trend,
                ..report::html::HtmlInput::new(
                    run_id,
                    period,
                    config.min_cell_size,
                    measures,
                    &cells,
                    &quality,
                )
            };
            let report_html = timed("report.html", || report::html::write(&report_dir, &html))?;
            let measure_reports = timed("MeasureReports", || {
                report::fhir::write(warehouse, run_id, measures, &cells, chrono::Utc::now())
            })?;
            Ok((cells, report_dir, report_html, measure_reports))
        },
        || {
            timed("care gaps", || {
                let mut files = report::CareGapFiles::new(warehouse, run_id)?;
                // Every list of the current run checked first (once: the
                // ones taken are among them): one changed since it was
                // written has every list written anew.
                let kept = input.kept_care_gaps.and_then(|(kept, outputs)| {
                    let lists = format!("reports/{}/phi", kept.run_id);
                    match runs::verify(kept.run_dir, &[&lists], outputs) {
                        Ok(verified) => Some((kept, verified)),
                        Err(e) => {
                            tracing::warn!(error = %e, "the current run's care-gap lists are not what it wrote: every list is written");
                            None
                        }
                    }
                });
                let select = kept
                    .as_ref()
                    .map(|(k, _)| move |persons: &_| k.providers_to_write(persons));
                let only = select.as_ref().map(|f| f as measure::ProvidersOf);
                let only = measure::care_gaps(warehouse, queries, measures, only, |batch| {
                    files.write(&batch)
                })?;
                let phi = files.dir().to_path_buf();
                let mut written = files.finish()?;
                if let (Some((kept, verified)), Some(only)) = (kept, only) {
                    let paths = verified.iter().map(|o| o.path.as_str());
                    let lists = kept.lists_to_take(&only, paths);
                    let mut taken = Vec::new();
                    for output in verified.iter().filter(|o| lists.contains(&o.path.as_str())) {
                        let name = output.path.rsplit('/').next().unwrap_or_default();
                        let path = phi.join(name);
                        runs::link_or_copy(&kept.run_dir.join(&output.path), &path)?;
                        taken.push(path);
                    }
                    tracing::debug!(
                        written = written.len(),
                        taken = taken.len(),
                        "care-gap lists of providers without changed persons taken from the current run"
                    );
                    written.extend(taken);
                }
                Ok(written)
            })
        },
    );
    let (cells, report_dir, report_html, measure_reports) = summary?;
    let care_gaps = care_gaps?;
    Ok(Reports {
        summary: cells,
        report_dir,
        report_html,
        measure_reports,
        care_gaps,
    })
}
