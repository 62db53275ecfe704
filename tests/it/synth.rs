//! `ward synth`: determinism, ground truth, and exactly the planted rejects.

use std::collections::BTreeSet;
use std::fs;

use crate::common::*;
use ward_synth::{SynthOptions, synth};

fn options(out: &std::path::Path, seed: u64) -> SynthOptions {
    SynthOptions {
        patients: 3000,
        providers: 4,
        seed,
        out: out.to_path_buf(),
        bad_rate: 0.01,
        year: 2025,
        hard_noise: false,
    }
}

fn read_csv(path: &std::path::Path) -> Vec<Vec<String>> {
    csv::Reader::from_path(path)
        .unwrap()
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

#[test]
fn same_seed_same_files_other_seed_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    synth(&options(&a, 5), &|_| {}).unwrap();
    synth(&options(&b, 5), &|_| {}).unwrap();
    synth(&options(&c, 6), &|_| {}).unwrap();
    assert_eq!(snapshot(&a), snapshot(&b));
    assert_ne!(snapshot(&a), snapshot(&c));
}

#[test]
fn ingest_rejects_exactly_the_planted_rows_and_truth_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen");
    let report = synth(&options(&out, 11), &|_| {}).unwrap();
    assert!(report.expected_rejects > 50, "{report:?}");
    assert!(
        report.source_patients > report.persons,
        "persons appear at several providers"
    );

    let config = out.join("ward.toml");
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("../warehouse", "../wh");
    fs::write(&config, text).unwrap();
    let ingest = run_ingest(&config).unwrap();
    assert!(ingest.failures().is_empty(), "{:?}", ingest.failures());

    let expected: Vec<(String, String, u64, String)> = read_csv(&out.join("expected_rejects.csv"))
        .into_iter()
        .map(|r| {
            (
                r[0].clone(),
                r[1].clone(),
                r[2].parse().unwrap(),
                r[3].clone(),
            )
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(expected.len() as u64, report.expected_rejects);
    let got = reject_keys(&dir.path().join("wh"));
    assert_eq!(got, expected);
    // Bad rows are planted in the care files too (screenings, referrals,
    // the problem list, the administration record), not only the classic ones.
    let files: BTreeSet<&str> = expected.iter().map(|k| k.1.as_str()).collect();
    for file in [
        "assessments.csv",
        "referrals.csv",
        "problem_list.csv",
        "mar.csv",
    ] {
        assert!(files.contains(file), "no planted reject in {file}");
    }
    let rules: BTreeSet<&str> = expected.iter().map(|k| k.3.as_str()).collect();
    for rule in [
        "duplicate_row",
        "wrong_field_count",
        "unknown_patient",
        "malformed_code",
        "future_date",
        "before_birth",
        "implausible_value",
        "required",
        "unparseable_date",
    ] {
        assert!(rules.contains(rule), "no planted {rule}");
    }

    // Every staged patient is in the truth; every truth record is staged or a planted reject.
    let truth: BTreeSet<(String, String)> = read_csv(&out.join("truth.csv"))
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    assert_eq!(truth.len() as u64, report.source_patients);
    let pats = read_dir_batches(&dir.path().join("wh/staging/patient"));
    let staged: BTreeSet<(String, String)> = strings(&pats, "source")
        .into_iter()
        .zip(strings(&pats, "source_patient_id"))
        .map(|(s, i)| (s.unwrap(), i.unwrap()))
        .collect();
    assert!(staged.is_subset(&truth));
    let patient_rejects = expected
        .iter()
        .filter(|k| ["patients.csv", "pat_demo.csv", "Patient.ndjson"].contains(&k.1.as_str()))
        .filter(|k| k.3 != "duplicate_row")
        .count();
    assert_eq!(staged.len() + patient_rejects, truth.len());
    let persons: BTreeSet<String> = read_csv(&out.join("truth.csv"))
        .into_iter()
        .map(|r| r[2].clone())
        .collect();
    assert_eq!(persons.len() as u64, report.persons);
}

/// The generator writes glucose in mmol/L with the factor ingest converts
/// it back with: a drift would shift every converted value.
#[test]
fn glucose_factor_matches_ingest() {
    assert_eq!(
        ward_synth::GLUCOSE_MG_PER_MMOL,
        ward::normalize::GLUCOSE_MG_PER_MMOL
    );
}
