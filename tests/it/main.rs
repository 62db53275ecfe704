//! Ward's integration tests, one binary (each test binary links DataFusion
//! and Polars, which took longer than many of the tests): one module per
//! area, helpers in [`common`].

mod common;

mod cli;
#[cfg(feature = "ballista")]
mod cluster;
mod dq;
mod fhir;
mod html;
mod incremental;
mod ingest;
mod link;
mod measures;
mod ops;
mod report;
mod research;
mod serve;
mod slt;
mod snap;
mod synth;
mod valuesets;
