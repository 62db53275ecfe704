//! Ward: a population health analytics pipeline.
//!
//! Provider extracts (CSV in each provider's own layout, described by a TOML
//! mapping) are read, mapped to the canonical model ([`schema`]), validated
//! and normalized by [`ingest`], and published as Parquet in the
//! [`warehouse`]. Rows that fail a rule are kept as rejects with file, line,
//! column and rule; read = accepted + rejected for every file.
//!
//! The library never prints, exits or reads the environment; it logs through
//! `tracing`. The `ward` binary is a thin layer over [`run`] and friends.

pub mod config;
pub mod error;
pub mod ingest;
pub mod mapping;
pub mod schema;
pub mod synth;
pub mod valuesets;
pub mod warehouse;

pub use config::PipelineConfig;
pub use error::{Result, WardError};
pub use ingest::{IngestOptions, IngestReport};

/// Runs every stage that exists, in order: today, ingest.
///
/// Returns the report even when some files failed (the rest is published);
/// use [`IngestReport::failures`] to decide whether the run failed.
pub fn run(
    config: &PipelineConfig,
    opts: &IngestOptions,
    progress: &indicatif::ProgressBar,
) -> Result<IngestReport> {
    ingest::ingest(config, opts, progress)
}
