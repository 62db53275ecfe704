//! Criterion micro-benchmarks of ingest's hot path on one generated EMR-A
//! results file: the structural pass + Polars text read, and the row mapping
//! (cast, normalize, validate, build Arrow).
//!
//! `cargo bench --bench ingest`

use std::hint::black_box;
use std::path::Path;

use chrono::NaiveDate;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use indicatif::ProgressBar;
use ward::ingest::csv;
use ward::ingest::rows::{RowContext, map_rows};
use ward::mapping::CsvMapping;
use ward::synth::{SynthOptions, synth};

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen");
    synth(
        &SynthOptions {
            patients: 40_000,
            providers: 1,
            seed: 1,
            out: out.clone(),
            bad_rate: 0.0,
            year: 2025,
        },
        &ProgressBar::hidden(),
    )
    .unwrap();
    let path = out.join("northside_clinic/results.csv");
    let bytes = std::fs::read(&path).unwrap();
    let mapping = CsvMapping::load(&out.join("mappings/emr_a.toml")).unwrap();
    let entry = mapping.entry_for("results.csv").unwrap();
    let ctx = RowContext {
        path: Path::new("results.csv"),
        source: "bench",
        file: "results.csv",
        today: NaiveDate::from_ymd_opt(2026, 1, 31).unwrap(),
        patients: None,
    };

    let mut g = c.benchmark_group("ingest_results_csv");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.sample_size(10);
    g.bench_function("read (structural pass + Polars)", |b| {
        b.iter(|| csv::read(&path, black_box(&bytes), &mapping).unwrap())
    });
    let text = csv::read(&path, &bytes, &mapping).unwrap();
    g.bench_function("map rows (cast, normalize, validate, Arrow)", |b| {
        b.iter(|| map_rows(black_box(&text), entry, &ctx).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
