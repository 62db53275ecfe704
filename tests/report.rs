//! The stratified summary `ward run` writes: counts that reconcile with the
//! measures, Wilson intervals around the rate, and no published count from
//! 1 to min_cell_size - 1.

mod common;

use std::collections::BTreeMap;
use std::fs;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::UInt64Type;

use common::*;

#[test]
fn run_writes_a_suppressed_stratified_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let run = run_all(&config);
    let dir = &run.report_dir;
    let batches = read_parquet(&dir.join("summary.parquet"));
    let n = rows(&batches);
    assert!(n > 6 * 8, "every measure, overall and by seven dimensions");

    let measure = strings(&batches, "measure");
    let dimension = strings(&batches, "dimension");
    let stratum = strings(&batches, "stratum");
    let counts: BTreeMap<&str, Vec<Option<u64>>> = [
        "initial_population",
        "denominator",
        "denominator_exclusion",
        "denominator_exception",
        "numerator",
    ]
    .into_iter()
    .map(|c| (c, primitives::<UInt64Type>(&batches, c)))
    .collect();
    let suppressed: Vec<bool> = batches
        .iter()
        .flat_map(|b| {
            let a = b.column_by_name("suppressed").unwrap().as_boolean().clone();
            (0..a.len()).map(move |i| a.value(i)).collect::<Vec<_>>()
        })
        .collect();
    let (rate, lo, hi) = (
        f64s(&batches, "rate"),
        f64s(&batches, "ci_low"),
        f64s(&batches, "ci_high"),
    );

    // No published count between 1 and 10; suppressed cells are marked and empty.
    for (column, values) in &counts {
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(v) => assert!(*v == 0 || *v >= 11, "{column} = {v} published"),
                None => assert!(suppressed[i], "{column} is empty but not marked"),
            }
        }
    }
    assert!(suppressed.iter().any(|s| *s), "the sample has small strata");
    assert!(suppressed.iter().any(|s| !*s));

    // Overall rows reconcile with the measures.
    for r in &run.measures {
        let i = (0..n)
            .find(|&i| {
                measure[i].as_deref() == Some(&r.def.id)
                    && dimension[i].as_deref() == Some("overall")
            })
            .unwrap();
        if !suppressed[i] {
            assert_eq!(
                counts["initial_population"][i],
                Some(r.counts.initial_population)
            );
            assert_eq!(counts["numerator"][i], Some(r.counts.numerator));
            assert_eq!(rate[i], r.counts.rate());
        }
    }
    // Intervals surround the rate; a dimension never hides exactly one stratum.
    let mut hidden: BTreeMap<(String, String), usize> = BTreeMap::new();
    for i in 0..n {
        if let (Some(r), Some(l), Some(h)) = (rate[i], lo[i], hi[i]) {
            assert!(0.0 <= l && l <= r && r <= h && h <= 1.0, "{l} {r} {h}");
        }
        if suppressed[i] && dimension[i].as_deref() != Some("overall") {
            *hidden
                .entry((measure[i].clone().unwrap(), dimension[i].clone().unwrap()))
                .or_default() += 1;
        }
        assert!(stratum[i].is_some());
    }
    assert!(hidden.values().all(|&k| k != 1), "{hidden:?}");

    // Care gaps: owner-only files, one per provider; every listed person
    // needs action, and every person who needs action is listed.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("phi")), 0o700);
        for f in &run.care_gaps {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
    }
    assert_eq!(run.care_gaps.len(), 3, "one list per provider");
    let link = read_parquet(&run.run_dir.join("core/person_link.parquet"));
    let person_of: BTreeMap<(String, String), String> = strings(&link, "source")
        .into_iter()
        .zip(strings(&link, "source_patient_id"))
        .zip(strings(&link, "person_id"))
        .map(|((s, i), p)| ((s.unwrap(), i.unwrap()), p.unwrap()))
        .collect();
    let patients = read_dir_batches(&config.warehouse.join("staging/patient"));
    let mrn_of: BTreeMap<(String, String), Option<String>> = strings(&patients, "source")
        .into_iter()
        .zip(strings(&patients, "source_patient_id"))
        .zip(strings(&patients, "mrn"))
        .map(|((s, i), m)| ((s.unwrap(), i.unwrap()), m))
        .collect();
    let mut listed: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for f in &run.care_gaps {
        let mut reader = csv::Reader::from_path(f).unwrap();
        for row in reader.deserialize::<BTreeMap<String, String>>() {
            let row = row.unwrap();
            let key = (row["provider"].clone(), row["source_patient_id"].clone());
            assert_eq!(
                mrn_of[&key].clone().unwrap_or_default(),
                row["mrn"],
                "MRN at that provider"
            );
            assert!(!row["given_name"].is_empty() && !row["birth_date"].is_empty());
            listed
                .entry(row["measure_id"].clone())
                .or_default()
                .insert(person_of[&key].clone());
        }
    }
    for r in &run.measures {
        let needs: std::collections::BTreeSet<String> = r
            .memberships()
            .into_iter()
            .filter(|(_, f)| match r.def.improvement {
                ward::measure::Improvement::Decrease => f[4],
                ward::measure::Improvement::Increase => f[1] && !f[2] && !f[3] && !f[4],
            })
            .map(|(p, _)| p)
            .collect();
        match r.def.care_gap {
            Some(_) => assert_eq!(listed.get(&r.def.id), Some(&needs), "{}", r.def.id),
            None => assert!(!listed.contains_key(&r.def.id)),
        }
    }

    // The same cells as CSV and JSON.
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), n);
    let csv_rows = csv::Reader::from_path(dir.join("summary.csv"))
        .unwrap()
        .records()
        .count();
    assert_eq!(csv_rows, n);
}
