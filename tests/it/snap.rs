//! Snapshots (insta) of what Ward shows and writes for the bundled sample:
//! the CLI's output, `summary.csv`, MeasureReports and the manifest's shape.
//! Everything that varies between runs or machines (run ids, times,
//! seconds, memory, hashes, the temporary directory) is filtered or
//! redacted, so a snapshot changes only when Ward's output does.
//!
//! The snapshots are `tests/it/snapshots/*.snap`. When one differs the test
//! fails and prints the diff; insta writes the new output beside it as
//! `.snap.new` (never in CI, which fails on a missing snapshot too). To
//! accept an intended change:
//!
//! ```text
//! INSTA_UPDATE=always cargo test --test it snap   # rewrites the .snap files
//! git diff tests/it/snapshots                     # review, then commit
//! ```
//!
//! (`cargo insta review` does the same interactively, where cargo-insta is
//! installed.) Add a filter or redaction here, never an edit by hand of a
//! `.snap`, for a value that varies.

use std::fs;

use crate::common::*;

/// Run ids (`20260131T120000Z`, `-2` when two start in one second).
const RUN_ID: &str = r"\d{8}T\d{6}Z(-\d+)?";
/// RFC 3339 times, as manifests and MeasureReports write them.
const TIME: &str = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})";

/// Filters for text that names the shared sample run's directory, its run
/// id and its times.
fn settings(run: &SampleRun) -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_prepend_module_to_snapshot(false);
    // The temporary directory, as given and as resolved (macOS: /private).
    for dir in [run.dir.clone(), run.dir.canonicalize().unwrap()] {
        s.add_filter(&regex::escape(&dir.to_string_lossy()), "[TMP]");
    }
    s.add_filter(TIME, "[TIME]");
    s.add_filter(RUN_ID, "[RUN_ID]");
    s
}

#[test]
fn snap_run_stdout() {
    let run = sample_run();
    settings(run).bind(|| {
        insta::assert_snapshot!("run_stdout", text(&run.output.stdout));
    });
}

#[test]
fn snap_status_and_runs() {
    let run = sample_run();
    let cfg = run.config.to_str().unwrap();
    let status = ward(&run.dir, &["--config", cfg, "status"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    let runs = ward(&run.dir, &["--config", cfg, "runs"]);
    assert_eq!(runs.status.code(), Some(0), "{}", text(&runs.stderr));
    let mut filters = settings(run);
    filters.bind(|| insta::assert_snapshot!("status", text(&status.stdout)));
    // The run's seconds, in a column as wide as its header "seconds" up to
    // 9999.9 s (so the table keeps its width).
    filters.add_filter(r"┆ \d+\.\d +┆", "┆ [secs]  ┆");
    filters.bind(|| insta::assert_snapshot!("runs", text(&runs.stdout)));
}

#[test]
fn snap_help_and_measures_list() {
    let dir = tempfile::tempdir().unwrap();
    let help = ward(dir.path(), &["--help"]);
    assert_eq!(help.status.code(), Some(0), "{}", text(&help.stderr));
    let list = ward(dir.path(), &["measures", "list"]);
    assert_eq!(list.status.code(), Some(0), "{}", text(&list.stderr));
    insta::with_settings!({ prepend_module_to_snapshot => false }, {
        insta::assert_snapshot!("help", text(&help.stdout));
        insta::assert_snapshot!("measures_list", text(&list.stdout));
    });
}

#[test]
fn snap_summary_csv() {
    let run = sample_run();
    let csv = fs::read_to_string(run.report_dir().join("summary.csv")).unwrap();
    settings(run).bind(|| insta::assert_snapshot!("summary_csv", csv));
}

/// A clinic's care-gap list, in the order it works through it: the
/// measure's priority, then the person, then the record id (a person with
/// two records at one provider used to come out in either order). Only the
/// columns that place a row are kept: the list is identified (names, MRN,
/// birth date, results), and snapshots hold no patient values.
#[test]
fn snap_care_gap_list() {
    let run = sample_run();
    let path = run
        .report_dir()
        .join("phi")
        .join("care_gaps_northside_clinic.csv");
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header = reader.headers().unwrap().clone();
    const KEPT: [&str; 4] = [
        "provider",
        "measure_id",
        "source_patient_id",
        "other_providers",
    ];
    let at: Vec<usize> = KEPT
        .iter()
        .map(|k| header.iter().position(|h| h == *k).unwrap())
        .collect();
    let mut list = KEPT.join(",");
    for row in reader.records() {
        let row = row.unwrap();
        let cells: Vec<&str> = at.iter().map(|&i| &row[i]).collect();
        list.push('\n');
        list.push_str(&cells.join(","));
    }
    settings(run).bind(|| insta::assert_snapshot!("care_gaps_northside_clinic", list));
}

#[test]
fn snap_measure_reports() {
    let run = sample_run();
    let fhir = run.report_dir().join("fhir");
    // A proportion with strata of its own (Stratification 1 and 2) beside
    // the report dimensions, some masked; one whose every count is masked
    // (1 person: suppressed). CMS155, the one measure of several groups,
    // is left out: 13,000 lines.
    for id in ["CMS130", "CMS142"] {
        let path = fhir.join(format!("MeasureReport-{id}.json"));
        let report: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        settings(run).bind(|| {
            insta::assert_json_snapshot!(format!("measure_report_{id}"), report, {
                ".date" => "[date]",
            });
        });
    }
}

#[test]
fn snap_manifest_shape() {
    let run = sample_run();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(run.run_dir().join("manifest.json")).unwrap()).unwrap();
    settings(run).bind(|| {
        insta::assert_json_snapshot!("manifest", manifest, {
            ".run_id" => "[run_id]",
            ".started" => "[time]",
            ".finished" => "[time]",
            ".ward_version" => "[version]",
            ".host" => "[host]",
            ".pid" => "[pid]",
            ".config.sha256" => "[sha256]",
            // Each stage's fingerprint hashes the test executable too.
            ".fingerprints" => insta::dynamic_redaction(|value, _| match value {
                insta::internals::Content::Map(stages) => insta::internals::Content::Map(
                    stages.into_iter().map(|(stage, _)| (stage, "[sha256]".into())).collect(),
                ),
                other => other,
            }),
            ".inputs[].sha256" => "[sha256]",
            // Named by a hash of the file and its rules.
            ".inputs[].outputs[]" => insta::dynamic_redaction(|value, _| match value.as_str() {
                Some(path) => match path.rsplit_once('/') {
                    Some((dir, _)) => format!("{dir}/[batch].parquet").into(),
                    None => value,
                },
                None => value,
            }),
            ".stages[].seconds" => "[seconds]",
            ".stages[].peak_memory_bytes" => "[bytes]",
            ".peak_memory_bytes" => "[bytes]",
            // Files holding the run id or time (reports, history.json)
            // differ by run; Parquet sizes by writer version: the list of
            // outputs is the shape, their contents have tests of their own.
            ".outputs[].sha256" => "[sha256]",
            ".outputs[].bytes" => "[bytes]",
        });
    });
}
