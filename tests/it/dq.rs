//! The data-quality scorecard: every shipped check fails on a hand-made bad
//! extract and passes on the sample; drift; a failing check fails the night.

use std::fs;
use std::path::{Path, PathBuf};

use ward::dq::{CheckResult, Severity, Status};

use crate::common::{
    append_lines, copy_dir, copy_sample, repo, run_all, run_with, sample_run, text, ward,
};

/// The `dq.json` of the run directory `run_dir`.
fn results_of(run_dir: &Path) -> Vec<CheckResult> {
    let id = run_dir.file_name().unwrap();
    ward::dq::read(&run_dir.join("reports").join(id).join("dq.json")).unwrap()
}

/// Asserts that two runs' checks counted the same rows, naming the
/// (check, source) pairs that differ.
fn assert_same_counts(run: &ward::RunReport, reference: &ward::RunReport) {
    let counts =
        |run: &ward::RunReport| -> std::collections::BTreeMap<(String, String), (u64, u64)> {
            run.dq
                .iter()
                .map(|r| {
                    (
                        (r.check.clone(), r.source.clone()),
                        (r.violating, r.checked),
                    )
                })
                .collect()
        };
    let (a, b) = (counts(run), counts(reference));
    let differ: Vec<_> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k, a.get(k), b.get(k)))
        .collect();
    assert!(differ.is_empty(), "counts differ: {differ:?}");
}

/// The only run directory of the warehouse `wh`.
fn only_run(wh: &Path) -> PathBuf {
    let runs: Vec<PathBuf> = fs::read_dir(wh.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs.into_iter().next().unwrap()
}

#[test]
fn every_check_fails_on_the_bad_extract_and_passes_on_the_sample() {
    let checks = ward::dq::catalog(&repo().join("queries")).unwrap();
    assert!(checks.len() >= 40, "{} checks shipped", checks.len());

    // The bad extract (tests/fixtures/dq_bad): gates on rejects are off, so
    // that the checks decide the night.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("tests/fixtures/dq_bad"), tmp.path());
    fs::write(
        tmp.path().join("ward.toml"),
        r#"warehouse = "wh"
measurement_period = { start = 2025-01-01, end = 2025-12-31 }
[ingest]
as_of = 2026-01-31
[gates]
max_reject_rate = 1.0
warn_reject_rate = 1.0
[deid]
demo_key = true
[[sources]]
name = "bad"
format = "csv"
path = "csv/*.csv"
mapping = "mapping.toml"
[[sources]]
name = "bad_fhir"
format = "fhir-ndjson"
path = "fhir/*.ndjson"
"#,
    )
    .unwrap();
    let out = ward(tmp.path(), &["--config", "ward.toml", "run"]);
    let stderr = text(&out.stderr);
    // Fail-severity checks fail the night: exit 1, nothing published, the
    // failing source and check named.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        ward::runs::current_dir(&tmp.path().join("wh"))
            .unwrap()
            .is_none()
    );
    for check in checks.iter().filter(|c| c.severity == Severity::Fail) {
        assert!(
            stderr.contains(&format!("source 'bad': data-quality check '{}'", check.id)),
            "{}: {stderr}",
            check.id
        );
    }
    // The failed run keeps its results for the steward.
    let bad = results_of(&only_run(&tmp.path().join("wh")));
    for check in &checks {
        let on_bad: Vec<&CheckResult> = bad.iter().filter(|r| r.check == check.id).collect();
        assert_eq!(on_bad.len(), 2, "{}: one result per source", check.id);
        // A check whose threshold cannot be exceeded only watches for drift:
        // it must still count the planted rows.
        let caught = on_bad.iter().any(|r| {
            if check.threshold_pct >= 100.0 {
                r.violating > 0
            } else {
                !matches!(r.status, Status::Pass | Status::NoData)
            }
        });
        assert!(caught, "{} passes on the bad extract: {on_bad:?}", check.id);
    }

    // A FHIR record refused for its code counts under its resource's table.
    let fhir = bad
        .iter()
        .find(|r| r.check == "condition_code_invalid" && r.source == "bad_fhir")
        .unwrap();
    assert_eq!((fhir.violating, fhir.checked), (1, 2));
    let rejects = crate::common::read_dir_batches(&tmp.path().join("wh/rejects/bad_fhir"));
    let tables = crate::common::strings(&rejects, "table");
    let rules = crate::common::strings(&rejects, "rule");
    let by_rule: std::collections::BTreeMap<_, _> = rules.into_iter().zip(tables).collect();
    assert_eq!(
        by_rule[&Some("missing_subject".to_string())].as_deref(),
        Some("observation"),
        "a refused resource is recorded under its resource's table"
    );

    // The sample: nothing fails or warns; an info check may note.
    let sample = results_of(&sample_run().run_dir());
    assert_eq!(sample.len(), checks.len() * 3);
    for r in &sample {
        let ok = match r.status {
            Status::Pass | Status::NoData => true,
            Status::Info => r.severity == Severity::Info,
            Status::Warn | Status::Fail => false,
        };
        assert!(ok, "{} on {}: {:?}", r.check, r.source, r.status);
        assert!(r.violating <= r.checked);
        // A first night loads every file: tonight's rows are all the rows.
        assert_eq!(
            (r.new_violating, r.new_checked),
            (r.violating, r.checked),
            "{} on {}",
            r.check,
            r.source
        );
    }
    assert!(
        sample.iter().filter(|r| r.checked > 0).count() > sample.len() / 2,
        "most checks have rows to check on the sample"
    );
}

#[test]
fn dq_outputs_hold_counts_and_the_cli_prints_the_scorecard() {
    let run = sample_run();
    let report = run.report_dir();
    let results = results_of(&run.run_dir());
    let csv = fs::read_to_string(report.join("dq.csv")).unwrap();
    assert_eq!(csv.lines().count(), results.len() + 1);
    assert!(csv.starts_with("check,category,subcategory,table,column,source,severity,"));
    let parquet = crate::common::read_parquet(&report.join("dq.parquet"));
    assert_eq!(crate::common::rows(&parquet), results.len());
    assert_eq!(
        crate::common::u64s(&parquet, "violating"),
        results.iter().map(|r| r.violating).collect::<Vec<_>>()
    );
    // Counts only: no patient identifier or name of the sample appears.
    let patients =
        fs::read_to_string(repo().join("sample_data/northside_clinic/patients.csv")).unwrap();
    let json = fs::read_to_string(report.join("dq.json")).unwrap();
    for line in patients.lines().skip(1).take(20) {
        let id = line.split(',').next().unwrap();
        assert!(
            !json.contains(id) && !csv.contains(id),
            "{id} in dq outputs"
        );
    }

    let out = ward(&run.dir, &["--config", run.config.to_str().unwrap(), "dq"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for source in ["northside_clinic", "st_marys_hospital", "lakeside_endo"] {
        assert!(stdout.contains(source), "{stdout}");
    }
    assert!(stdout.contains("conformance") && stdout.contains("pass"));
    let out = ward(
        &run.dir,
        &["--config", run.config.to_str().unwrap(), "dq", "--json"],
    );
    let printed: Vec<CheckResult> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, results);

    // Before any run: a clear error, exit 3.
    let tmp = tempfile::tempdir().unwrap();
    let config = copy_sample(tmp.path());
    let out = ward(tmp.path(), &["--config", config.to_str().unwrap(), "dq"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("no run has been published yet"));
}

/// Rewrites the HbA1c results of an EMR-A results file in IFCC units
/// (mmol/mol), as a provider switching its lab's unit would.
fn switch_hba1c_to_ifcc(path: &Path) -> usize {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .unwrap();
    let header = reader.headers().unwrap().clone();
    let at = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (code, value, unit) = (at("LOINC"), at("Result"), at("Units"));
    let mut writer = csv::WriterBuilder::new()
        .flexible(true)
        .from_writer(Vec::new());
    writer.write_record(&header).unwrap();
    let mut switched = 0;
    for record in reader.records() {
        let mut fields: Vec<String> = record.unwrap().iter().map(str::to_string).collect();
        if fields[code] == "4548-4"
            && let Ok(pct) = fields[value].parse::<f64>()
        {
            fields[value] = format!("{:.0}", (pct - 2.152) / 0.09148);
            fields[unit] = "mmol/mol".into();
            switched += 1;
        }
        writer.write_record(&fields).unwrap();
    }
    fs::write(path, writer.into_inner().unwrap()).unwrap();
    switched
}

#[test]
fn a_switched_hba1c_unit_is_drift_the_next_night() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let first = run_all(&config);
    let before = first
        .dq
        .iter()
        .find(|r| r.check == "hba1c_converted" && r.source == "northside_clinic")
        .unwrap();
    assert_eq!(before.rate_pct, Some(0.0));
    assert!(!before.drift && before.baseline_pct.is_none());

    let results = tmp.path().join("sample_data/northside_clinic/results.csv");
    assert!(switch_hba1c_to_ifcc(&results) > 10);
    let second = run_all(&config);
    let after = second
        .dq
        .iter()
        .find(|r| r.check == "hba1c_converted" && r.source == "northside_clinic")
        .unwrap();
    // Every HbA1c is converted now; the results file was loaded again, so
    // its rows are tonight's, and no other source delivered anything.
    assert_eq!(after.rate_pct, Some(100.0));
    assert_eq!(after.new_rate_pct, Some(100.0));
    assert_eq!(after.new_checked, after.checked);
    assert!(
        second
            .dq
            .iter()
            .filter(|r| r.source != "northside_clinic")
            .all(|r| r.new_checked == 0 && r.new_rate_pct.is_none())
    );
    assert_eq!(after.baseline_pct, Some(0.0));
    assert!(after.drift);
    assert_eq!(after.status, Status::Pass, "drift, not a threshold breach");
    assert!(
        second.manifest.warnings.iter().any(|w| w.contains(
            "source 'northside_clinic': data-quality check 'hba1c_converted' drifted from 0.00 % to 100.00 %, 100.00 % of tonight's"
        )),
        "{:?}",
        second.manifest.warnings
    );
    // Nothing else moved: the other sources and checks have no drift.
    let drifted: Vec<(&str, &str)> = second
        .dq
        .iter()
        .filter(|r| r.drift)
        .map(|r| (r.check.as_str(), r.source.as_str()))
        .collect();
    assert_eq!(drifted, [("hba1c_converted", "northside_clinic")]);
    // The report shows the alert with the rate's trend over both nights.
    let html = fs::read_to_string(&second.report_html).unwrap();
    assert!(html.contains("Drift alerts"));
    assert!(html.contains("hba1c_converted over 2 runs: 0.00%, 100.00%"));
    // The history carries the rates forward.
    let history = ward::runs::load_history(Some(&second.run_dir)).unwrap();
    assert_eq!(history.len(), 2);
    assert!(history.iter().all(|h| !h.dq.is_empty()));
    // The file was replaced, not grown: the checks that read its rows counted
    // the clinic again, the others kept its counts, and together they are
    // what counting everything gives.
    let full = run_with(&config, ward::runs::Rebuild::Full);
    assert_same_counts(&second, &full);
}

#[test]
fn new_patients_count_again_only_what_reads_them_and_the_links() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let first = run_all(&config);
    // A new patient of the clinic (linkage runs again) and one of the
    // hospital whom the clinic knows, registered a second time there.
    let data = tmp.path().join("sample_data");
    let append = |file: &str, rows: &str| append_lines(&data.join(file), rows);
    append(
        "northside_clinic/patients.csv",
        "ZZ0000911,Z911,Oriana,Velasquez-Holt,02/17/1971,F,White,Not Hispanic,9 Pine Rd,Mesa,AZ,85201,480-555-0911,,,Medicare\n",
    );
    let clinic = fs::read_to_string(data.join("northside_clinic/patients.csv")).unwrap();
    let twice = clinic
        .lines()
        .nth(1)
        .unwrap()
        .replacen("AA0000002", "AA0000992", 1);
    append("northside_clinic/patients.csv", &format!("{twice}\n"));
    let second = run_all(&config);
    let dq = &second.manifest.stages[3];
    assert_eq!(dq.stage, "dq");
    assert!(dq.reused_from.is_none());
    let link = |run: &ward::RunReport| run.manifest.fingerprints["link"].clone();
    assert_ne!(link(&second), link(&first), "the links changed");
    // The checks' own fingerprint does not depend on the links: the counts
    // of what does not read them are kept.
    let checks = |run: &ward::RunReport| run.manifest.fingerprints["dq.checks"].clone();
    assert_eq!(checks(&second), checks(&first));
    let full = run_with(&config, ward::runs::Rebuild::Full);
    assert_same_counts(&second, &full);
    // The registration twice shows in the links' check.
    let twice = |run: &ward::RunReport| {
        let r = run
            .dq
            .iter()
            .find(|r| r.check == "patients_registered_twice" && r.source == "northside_clinic")
            .unwrap();
        r.violating
    };
    assert!(twice(&second) >= 2, "{}", twice(&second));
}

#[test]
fn a_file_loaded_again_as_it_was_published_is_not_counted_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    run_all(&config);
    // A failed night: the clinic's diagnoses gain 2,000 broken records,
    // over its reject gate; ingest keeps them staged, nothing is published.
    let clinic = tmp.path().join("sample_data/northside_clinic");
    let problems = clinic.join("problems.csv");
    let published = fs::read(&problems).unwrap();
    let mut broken = published.clone();
    broken.extend("x\n".repeat(2000).bytes());
    fs::write(&problems, &broken).unwrap();
    let config_arg = config_path.to_str().unwrap();
    let out = ward(tmp.path(), &["--config", config_arg, "run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // The next night the file is as it was published, loaded again into
    // the files the published counts counted, and the results grew.
    fs::write(&problems, &published).unwrap();
    append_lines(
        &clinic.join("results.csv"),
        "AAE000000020R97,AA0000002,AAE000000020,05/03/2025 12:50,4548-4,Hemoglobin A1c,9.8,%\n",
    );
    let night = run_all(&config);
    let full = run_with(&config, ward::runs::Rebuild::Full);
    assert_same_counts(&night, &full);
}
