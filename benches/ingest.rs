//! Criterion micro-benchmarks of ingest's hot paths: on one generated EMR-A
//! results file, the structural pass (with exact-duplicate detection) and the row mapping
//! (cast, normalize, validate, build Arrow); and FHIR NDJSON parsing +
//! flattening + mapping on the Observations of the shared Synthea bundles
//! (skipped with a message when ../shared/data is absent).
//!
//! `cargo bench --bench ingest` (set RAYON_NUM_THREADS=1 for per-core figures)

use std::hint::black_box;
use std::path::Path;

use chrono::NaiveDate;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ward::ingest::csv;
use ward::ingest::fhir::{self, PatientCheck};
use ward::ingest::rows::{RowContext, map_rows};
use ward::mapping::CsvMapping;
use ward_synth::{SynthOptions, synth};

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
            hard_noise: false,
        },
        &|_| {},
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
    g.bench_function("read (structural pass, exact duplicates)", |b| {
        b.iter(|| csv::read(&path, black_box(&bytes), &mapping).unwrap())
    });
    let text = csv::read(&path, &bytes, &mapping).unwrap();
    g.bench_function("map rows (cast, normalize, validate, Arrow)", |b| {
        b.iter(|| map_rows(black_box(&text), entry, &ctx, &mut Default::default()).unwrap())
    });
    g.finish();
}

/// The Observations of the shared Synthea bundles as one NDJSON file, with
/// subjects as `Patient/<id>` (as in a bulk export).
fn synthea_observations_ndjson() -> Option<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea_fhir_bundles");
    let mut out = Vec::new();
    for f in std::fs::read_dir(dir).ok()? {
        let b: serde_json::Value =
            serde_json::from_slice(&std::fs::read(f.ok()?.path()).ok()?).ok()?;
        for e in b["entry"].as_array()? {
            let mut r = e["resource"].clone();
            if r["resourceType"] == "Observation" {
                r["subject"] = serde_json::json!({"reference": "Patient/p"});
                out.extend_from_slice(r.to_string().as_bytes());
                out.push(b'\n');
            }
        }
    }
    Some(out)
}

fn bench_fhir(c: &mut Criterion) {
    let Some(bytes) = synthea_observations_ndjson() else {
        eprintln!("fhir benchmark skipped: ../shared/data/synthea_fhir_bundles is absent");
        return;
    };
    let ctx = RowContext {
        path: Path::new("Observation.ndjson"),
        source: "bench",
        file: "Observation.ndjson",
        today: NaiveDate::from_ymd_opt(2030, 1, 1).unwrap(),
        patients: None,
    };
    let mut g = c.benchmark_group("ingest_fhir_ndjson");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.sample_size(10);
    g.bench_function("Observation.ndjson: parse, flatten, map", |b| {
        b.iter(|| {
            let mut sink = |_, batch| {
                black_box(batch);
                Ok(())
            };
            fhir::load_ndjson(
                ctx.path,
                black_box(&bytes[..]),
                &ctx,
                PatientCheck::Off,
                &mut sink,
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench, bench_fhir);
criterion_main!(benches);
