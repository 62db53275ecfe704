//! Ward: a population health analytics pipeline.
//!
//! Provider extracts (CSV in each provider's own layout, described by a TOML
//! mapping) are read, mapped to the canonical model ([`schema`]), validated
//! and normalized by [`ingest`], and published as Parquet in the
//! [`warehouse`]. Rows that fail a rule are kept as rejects with file, line,
//! column and rule; read = accepted + rejected for every file. [`measure`]
//! runs the SQL measures of `queries/` over the warehouse with DataFusion.
//!
//! The library never prints, exits or reads the environment; it logs through
//! `tracing`. The `ward` binary is a thin layer over [`run`] and friends.

pub mod config;
pub mod deid;
mod engine;
pub mod error;
pub mod ingest;
pub mod link;
pub mod mapping;
pub mod measure;
pub mod query;
pub mod report;
pub mod schema;
pub mod synth;
pub mod valuesets;
pub mod warehouse;

pub use config::PipelineConfig;
pub use error::{Result, WardError};
pub use ingest::{IngestOptions, IngestReport};

/// What `ward run` did: the ingest report, linkage, the core tables built
/// and the measures' results.
#[derive(Debug)]
pub struct RunReport {
    pub ingest: IngestReport,
    pub link: link::LinkReport,
    pub core: link::build::BuildReport,
    pub measures: Vec<measure::MeasureResult>,
    /// `reports/<run_id>/`, holding the stratified summary.
    pub report_dir: std::path::PathBuf,
    /// Care-gap lists, one per provider (identified data, owner-only).
    pub care_gaps: Vec<std::path::PathBuf>,
    /// The de-identified research tables (`research/`).
    pub research: deid::DeidReport,
}

/// Runs every stage that exists, in order: ingest, linkage and the core
/// tables, every measure of `queries` for `period` (written to
/// `marts/measure_patient/`), and the stratified, suppressed summary
/// (`reports/<run_id>/`), then the de-identified research tables
/// (`research/`, with `key` and ages at the end of `period`).
///
/// Returns the report even when some files failed (the rest is published
/// and measured); use [`IngestReport::failures`] to decide whether the run
/// failed.
pub fn run(
    config: &PipelineConfig,
    opts: &IngestOptions,
    queries: &std::path::Path,
    period: config::Period,
    key: &deid::DeidKey,
    progress: &indicatif::ProgressBar,
) -> Result<RunReport> {
    let ingest = ingest::ingest(config, opts, progress)?;
    let defs = measure::catalog(queries)?;
    let warehouse = warehouse::Warehouse::new(&config.warehouse);
    let linkage = link::link(&warehouse, &config.link)?;
    let core = link::build::build(&warehouse)?;
    let all: Vec<&measure::MeasureDef> = defs.iter().collect();
    let measures = measure::run(&warehouse, queries, &all, period)?;
    measure::write_marts(&warehouse, &measures)?;
    let strata = measure::strata(&warehouse, queries, period)?;
    let cells = report::summarize(&measures, &strata, config.min_cell_size);
    let run_id = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let report_dir = report::write(&warehouse, &run_id, &cells)?;
    let gaps = measure::care_gaps(&warehouse, queries, &measures)?;
    let care_gaps = report::write_care_gaps(&warehouse, &run_id, &gaps)?;
    let deid_opts = deid::DeidOptions::from_config(&config.deid, key.clone(), period.end);
    let research = deid::deid(
        &warehouse.root().join("core"),
        &warehouse.root().join("research"),
        &deid_opts,
    )?;
    Ok(RunReport {
        ingest,
        link: linkage.report,
        core,
        measures,
        report_dir,
        care_gaps,
        research,
    })
}
