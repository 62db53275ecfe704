//! FHIR ingest: bad input on hand-made files, and counts on the shared
//! Synthea exports and the CMS165 test deck checked against an independent
//! count of the same JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::common::*;
use datafusion::arrow::array::AsArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use serde_json::Value;
use ward::ingest::FileStatus;

fn config(dir: &Path, sources: &[(&str, &str, &Path)]) -> PathBuf {
    let mut text = "warehouse = \"wh\"\n[ingest]\nas_of = 2030-01-01\n".to_string();
    for (name, format, path) in sources {
        text.push_str(&format!(
            "[[sources]]\nname = \"{name}\"\nformat = \"{format}\"\npath = \"{}\"\n",
            path.display()
        ));
    }
    let p = dir.join("ward.toml");
    fs::write(&p, text).unwrap();
    p
}

fn ingest_2030(config: &Path) -> ward::IngestReport {
    let config = ward::PipelineConfig::load(config).unwrap();
    let opts = ward::IngestOptions {
        today: chrono::NaiveDate::from_ymd_opt(2030, 1, 1).unwrap(),
        dry_run: false,
        ..Default::default()
    };
    ward::ingest::ingest(&config.warehouse, &config.sources, &opts, &()).unwrap()
}

/// Staged rows per table and distinct (file, line) per table, for a source.
fn staged(wh: &Path, source: &str) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let mut rows_by = BTreeMap::new();
    let mut resources_by = BTreeMap::new();
    for table in ward::schema::Table::ALL {
        let b = read_dir_batches(
            &wh.join("staging")
                .join(table.name())
                .join(format!("source={source}")),
        );
        if rows(&b) == 0 {
            continue;
        }
        let resources: BTreeSet<(Option<String>, u64)> = strings(&b, "source_file")
            .into_iter()
            .zip(u64s(&b, "source_line"))
            .collect();
        rows_by.insert(table.name().to_string(), rows(&b));
        resources_by.insert(table.name().to_string(), resources.len());
    }
    (rows_by, resources_by)
}

/// Resource type → canonical table, as Ward loads them.
fn table_of(resource_type: &str) -> Option<&'static str> {
    Some(match resource_type {
        "Patient" => "patient",
        "Encounter" => "encounter",
        "Condition" => "condition",
        "Observation" => "observation",
        "MedicationRequest" | "MedicationStatement" | "MedicationAdministration" => "medication",
        "Procedure" => "procedure",
        "ServiceRequest" => "service_request",
        "DeviceRequest" | "DeviceUseStatement" => "device",
        "Coverage" => "coverage",
        "Communication" => "communication",
        _ => return None,
    })
}

/// Independent count: resources per table, and rows per table (an
/// Observation is one row plus one per component).
#[derive(Default, Debug)]
struct Count {
    resources: BTreeMap<String, usize>,
    rows: BTreeMap<String, usize>,
    skipped: usize,
}

impl Count {
    fn add(&mut self, r: &Value) {
        let Some(t) = table_of(r["resourceType"].as_str().unwrap()) else {
            self.skipped += 1;
            return;
        };
        *self.resources.entry(t.into()).or_default() += 1;
        let components = r["component"].as_array().map_or(0, Vec::len);
        *self.rows.entry(t.into()).or_default() += 1 + components;
    }
}

/// Resources per table among the rejects of a source (from their raw JSON).
fn rejected_by_table(wh: &Path, source: &str) -> BTreeMap<String, usize> {
    let b = read_dir_batches(&wh.join("rejects").join(source));
    let mut out = BTreeMap::new();
    for raw in strings(&b, "raw").into_iter().flatten() {
        let v: Value = serde_json::from_str(&raw).unwrap();
        *out.entry(
            table_of(v["resourceType"].as_str().unwrap())
                .unwrap()
                .to_string(),
        )
        .or_default() += 1;
    }
    out
}

#[test]
fn bad_fhir_input_gets_rejects_with_line_path_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("nd");
    fs::create_dir_all(&nd).unwrap();
    fs::write(
        nd.join("Patient.ndjson"),
        r#"{"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1960-02-03"}
{"resourceType":"Patient","id":"p2","gender":"female"}
"#,
    )
    .unwrap();
    fs::write(
        nd.join("Observation.ndjson"),
        r#"{"resourceType":"Observation","id":"o1","status":"final","subject":{"reference":"Patient/p1"},"effectiveDateTime":"2025-03-01T10:00:00Z","code":{"coding":[{"system":"http://loinc.org","code":"85354-9"}]},"component":[{"code":{"coding":[{"system":"http://loinc.org","code":"8480-6"}]},"valueQuantity":{"value":128,"unit":"mmHg"}},{"code":{"coding":[{"system":"http://loinc.org","code":"8462-4"}]},"valueQuantity":{"value":82,"unit":"mmHg"}}]}
this is not json
{"resourceType":"Observation","id":"o2","code":{"coding":[{"system":"http://loinc.org","code":"4548-4"}]},"effectiveDateTime":"2025-03-01"}
{"resourceType":"Observation","id":"o3","subject":{"reference":"Patient/nobody"},"code":{"coding":[{"system":"http://loinc.org","code":"4548-4"}]},"effectiveDateTime":"2025-03-01","valueQuantity":{"value":7.1,"unit":"%"}}
{"resourceType":"Observation","id":"o4","subject":{"reference":"Patient/p1"},"code":{"coding":[{"system":"http://loinc.org","code":"4548-4"}]},"effectiveDateTime":"March 2025"}

{"resourceType":"Observation","id":"o5","subject":{"reference":"Patient/p1"},"effectiveDateTime":"2025-03-01","code":{"coding":[{"system":"http://loinc.org","code":"85354-9"}]},"component":[{"code":{"coding":[{"system":"http://loinc.org","code":"8480-6"}]},"valueQuantity":{"value":999,"unit":"mmHg"}}]}
{"resourceType":"Claim","id":"c1"}
"#,
    )
    .unwrap();
    let bundles = dir.path().join("b");
    fs::create_dir_all(&bundles).unwrap();
    fs::write(
        bundles.join("one.json"),
        r#"{"resourceType":"Bundle","type":"transaction","entry":[
 {"fullUrl":"urn:uuid:aaa","resource":{"resourceType":"Patient","gender":"male","birthDate":"1950-01-01"}},
 {"fullUrl":"urn:uuid:bbb","resource":{"resourceType":"Condition","subject":{"reference":"urn:uuid:aaa"},"code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"E11.9"},{"system":"http://snomed.info/sct","code":"44054006"},{"system":"http://example.org/local","code":"DM2"}]},"onsetDateTime":"2020-01-01"}},
 {"fullUrl":"urn:uuid:ccc","resource":{"resourceType":"Condition","subject":{"reference":"urn:uuid:zzz"},"code":{"coding":[{"system":"http://snomed.info/sct","code":"44054006"}]},"onsetDateTime":"2020-01-01"}},
 {"fullUrl":"urn:uuid:ddd","resource":{"resourceType":"MedicationRequest","status":"active","intent":"order","doNotPerform":true,"subject":{"reference":"urn:uuid:aaa"},"medicationReference":{"reference":"urn:uuid:eee"},"authoredOn":"2025-01-02"}},
 {"fullUrl":"urn:uuid:eee","resource":{"resourceType":"Medication","code":{"coding":[{"system":"http://www.nlm.nih.gov/research/umls/rxnorm","code":"860975"}]}}}
]}"#,
    )
    .unwrap();
    fs::write(
        bundles.join("not_a_bundle.json"),
        r#"{"resourceType":"Patient","id":"x"}"#,
    )
    .unwrap();
    let config = config(
        dir.path(),
        &[("nd", "fhir-ndjson", &nd), ("bu", "fhir-bundle", &bundles)],
    );
    let report = ingest_2030(&config);

    let file = |name: &str| report.files.iter().find(|f| f.file == name).unwrap();
    let obs = file("Observation.ndjson");
    assert_eq!(
        (
            obs.rows_read,
            obs.rows_accepted,
            obs.rows_rejected,
            obs.rows_skipped
        ),
        (7, 1, 5, 1)
    );
    let bad = file("not_a_bundle.json");
    assert_eq!(bad.status, FileStatus::Failed);
    assert!(bad.detail.as_deref().unwrap().contains("not a FHIR Bundle"));

    let wh = dir.path().join("wh");
    let b = read_dir_batches(&wh.join("rejects"));
    let got: BTreeSet<(String, u64, String, String)> = strings(&b, "source_file")
        .into_iter()
        .zip(u64s(&b, "line"))
        .zip(strings(&b, "rule"))
        .zip(strings(&b, "column"))
        .map(|(((f, l), r), c)| (f.unwrap(), l, r.unwrap(), c.unwrap_or_default()))
        .collect();
    let expected: BTreeSet<(String, u64, String, String)> = [
        ("Observation.ndjson", 2, "not_json", ""),
        ("Observation.ndjson", 3, "missing_subject", "subject"),
        ("Observation.ndjson", 4, "unknown_patient", "subject"),
        ("Observation.ndjson", 5, "unparseable_date", "effective[x]"),
        (
            "Observation.ndjson",
            7,
            "implausible_value",
            "valueQuantity",
        ),
        ("one.json", 3, "unresolved_reference", "subject"),
    ]
    .into_iter()
    .map(|(f, l, r, c)| (f.to_string(), l, r.to_string(), c.to_string()))
    .collect();
    assert_eq!(got, expected);
    // A Patient without a birth date is kept (flagged), not rejected.
    let patients = file("Patient.ndjson");
    assert_eq!((patients.rows_accepted, patients.rows_rejected), (2, 0));
    assert_eq!(
        patients.values_flagged.get("birthDate: unrecognized_value"),
        None,
        "a missing birth date is not a bad value"
    );

    // Messages name elements and rules, never values (the resource is in `raw`).
    for m in strings(&b, "message").into_iter().flatten() {
        assert!(
            !m.contains("zzz") && !m.contains("nobody") && !m.contains("March"),
            "{m}"
        );
    }
    // The blood-pressure panel: the panel row and one row per component.
    let o = read_dir_batches(&wh.join("staging/observation/source=nd"));
    assert_eq!(
        strings(&o, "code"),
        [
            Some("85354-9".into()),
            Some("8480-6".into()),
            Some("8462-4".into())
        ]
    );
    assert_eq!(strings(&o, "panel_id")[1].as_deref(), Some("o1"));
    assert_eq!(strings(&o, "unit")[1].as_deref(), Some("mm[Hg]"));
    // A Bundle: urn:uuid references resolved, every coding kept, medicationReference resolved.
    let c = read_dir_batches(&wh.join("staging/condition/source=bu"));
    assert_eq!(strings(&c, "source_patient_id"), [Some("aaa".into())]);
    assert_eq!(strings(&c, "code"), [Some("E11.9".into())]);
    assert_eq!(list_len(&c[0], "codings", 0), 3);
    let m = read_dir_batches(&wh.join("staging/medication/source=bu"));
    assert_eq!(strings(&m, "code"), [Some("860975".into())]);
    let dnp = m[0]
        .column_by_name("do_not_perform")
        .unwrap()
        .as_any()
        .downcast_ref::<datafusion::arrow::array::BooleanArray>()
        .unwrap()
        .value(0);
    assert!(dnp);
    assert_eq!(
        obs.skipped_by_type,
        BTreeMap::from([("Claim".to_string(), 1)])
    );
    // Reconciliation for every loaded file.
    for f in report
        .files
        .iter()
        .filter(|f| f.status == FileStatus::Loaded)
    {
        assert_eq!(
            f.rows_read,
            f.rows_accepted + f.rows_rejected + f.rows_skipped,
            "{}",
            f.file
        );
    }
}

#[test]
fn synthea_bulk_ndjson_and_bundles_match_an_independent_count() {
    let (Some(bulk), Some(bundles)) = (
        shared_data("synthea_bulk_ndjson"),
        shared_data("synthea_fhir_bundles"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &[
            ("bulk", "fhir-ndjson", &bulk),
            ("bundles", "fhir-bundle", &bundles),
        ],
    );
    let report = ingest_2030(&config);
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    let wh = dir.path().join("wh");

    // Bulk NDJSON: everything loads.
    let mut count = Count::default();
    for f in fs::read_dir(&bulk).unwrap() {
        for line in fs::read_to_string(f.unwrap().path())
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            count.add(&serde_json::from_str(line).unwrap());
        }
    }
    let (rows_by, resources_by) = staged(&wh, "bulk");
    assert_eq!(rows_by, count.rows);
    assert_eq!(resources_by, count.resources);
    let skipped: u64 = report
        .files
        .iter()
        .filter(|f| f.source == "bulk")
        .map(|f| f.rows_skipped)
        .sum();
    assert_eq!(skipped as usize, count.skipped);

    // Bundles: staged + rejected resources = resources in the JSON, per table.
    let mut count = Count::default();
    let mut a1c: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for f in fs::read_dir(&bundles).unwrap() {
        let b: Value = serde_json::from_slice(&fs::read(f.unwrap().path()).unwrap()).unwrap();
        let mut patient = None;
        for e in b["entry"].as_array().unwrap() {
            let r = &e["resource"];
            count.add(r);
            if r["resourceType"] == "Patient" {
                patient = r["id"].as_str().map(str::to_string);
            }
            if r["resourceType"] == "Observation" && r["code"]["coding"][0]["code"] == "4548-4" {
                let v = &r["valueQuantity"]["value"];
                a1c.entry(patient.clone().unwrap()).or_default().push((
                    r["effectiveDateTime"].as_str().unwrap()[..10].to_string(),
                    format!("{:.2}", v.as_f64().unwrap()),
                ));
            }
        }
    }
    let (_, resources_by) = staged(&wh, "bundles");
    let rejected = rejected_by_table(&wh, "bundles");
    for (table, n) in &count.resources {
        let got = resources_by.get(table).unwrap_or(&0) + rejected.get(table).unwrap_or(&0);
        assert_eq!(got, *n, "{table}");
    }
    assert!(resources_by["patient"] >= 90, "{resources_by:?}");

    // Spot check: the longest HbA1c history among patients whose results are
    // all plausible (Synthea also writes HbA1c below 3 %, which Ward rejects).
    let (patient, mut expected) = a1c
        .into_iter()
        .filter(|(_, v)| v.iter().all(|(_, x)| x.parse::<f64>().unwrap() >= 3.0))
        .max_by_key(|(_, v)| v.len())
        .unwrap();
    expected.sort();
    let o = read_dir_batches(&wh.join("staging/observation/source=bundles"));
    let ids = strings(&o, "source_patient_id");
    let codes = strings(&o, "code");
    let values = f64s(&o, "value_num");
    let times: Vec<i64> = o
        .iter()
        .flat_map(|b| {
            let a = b
                .column_by_name("effective_time")
                .unwrap()
                .as_any()
                .downcast_ref::<datafusion::arrow::array::TimestampMicrosecondArray>()
                .unwrap()
                .clone();
            (0..a.len()).map(move |i| a.value(i)).collect::<Vec<_>>()
        })
        .collect();
    let mut got: Vec<(String, String)> = (0..ids.len())
        .filter(|&i| {
            ids[i].as_deref() == Some(patient.as_str()) && codes[i].as_deref() == Some("4548-4")
        })
        .map(|i| {
            let day = chrono::DateTime::from_timestamp_micros(times[i])
                .unwrap()
                .date_naive()
                .to_string();
            (day, format!("{:.2}", values[i].unwrap()))
        })
        .collect();
    got.sort();
    assert!(expected.len() >= 3, "{expected:?}");
    assert_eq!(got, expected);
}

#[test]
fn cms165_test_deck_bundles_load_without_rejects() {
    let Some(deck) = shared_data("ecqm/CMS165/tests") else {
        return;
    };
    let cases = fs::read_dir(&deck)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &[("cms165", "fhir-bundle", &deck.join("*/CMS165*.json"))],
    );
    let report = ingest_2030(&config);
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    assert_eq!(report.files.len(), cases);
    let rejected: u64 = report.files.iter().map(|f| f.rows_rejected).sum();
    assert_eq!(rejected, 0);
    let (_, resources_by) = staged(&dir.path().join("wh"), "cms165");
    assert_eq!(resources_by["patient"], cases);
    for table in [
        "encounter",
        "condition",
        "observation",
        "medication",
        "procedure",
        "device",
        "service_request",
        "coverage",
    ] {
        assert!(
            resources_by.contains_key(table),
            "{table}: {resources_by:?}"
        );
    }
}

#[test]
fn ward_run_loads_a_config_mixing_csv_and_fhir_providers() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let nd = dir.path().join("fhir_export");
    fs::create_dir_all(&nd).unwrap();
    fs::write(
        nd.join("Patient.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"f1\",\"gender\":\"female\",\"birthDate\":\"1970-05-06\"}\n",
    )
    .unwrap();
    fs::write(
        nd.join("Observation.ndjson"),
        "{\"resourceType\":\"Observation\",\"id\":\"a1\",\"status\":\"final\",\"subject\":{\"reference\":\"Patient/f1\"},\
          \"effectiveDateTime\":\"2025-06-01\",\"code\":{\"coding\":[{\"system\":\"http://loinc.org\",\"code\":\"59261-8\"}]},\
          \"valueQuantity\":{\"value\":64,\"unit\":\"mmol/mol\"}}\n",
    )
    .unwrap();
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[sources]]\nname = \"fhir_lab\"\nformat = \"fhir-ndjson\"\npath = \"{}\"\n",
        nd.display()
    ));
    fs::write(&config, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ward"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("fhir_lab") && stdout.contains("northside_clinic"),
        "{stdout}"
    );
    let o = read_dir_batches(&dir.path().join("wh/staging/observation/source=fhir_lab"));
    assert_eq!(strings(&o, "unit"), [Some("%".to_string())]);
    let v = f64s(&o, "value_num")[0].unwrap();
    assert!((v - 8.0).abs() < 0.01, "64 mmol/mol is 8.0 %: {v}");
    assert!(
        rows(&read_dir_batches(
            &dir.path()
                .join("wh/staging/observation/source=northside_clinic")
        )) > 0
    );
}

/// Hardening: what unseen FHIR broke — a byte-order mark, the Hispanic
/// ethnicity code in the race extension, a patient id twice, a current
/// long prescription whose computed end lies in the future, an absurd
/// supply and a code with a non-ASCII first letter.
/// The QI-Core elements eCQMs test: the US Core sex extension over gender,
/// not-done reasons, a body site, an administration's time of day, a
/// Communication; resources without a subject in a bundle of one patient
/// are that patient's, in a bundle of two they are rejected.
#[test]
fn qicore_elements_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("bundles");
    fs::create_dir_all(&b).unwrap();
    let sct = "http://snomed.info/sct";
    let bundle = |resources: Vec<Value>| {
        let entry: Vec<Value> = resources
            .into_iter()
            .map(|r| serde_json::json!({ "resource": r }))
            .collect();
        serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": entry})
            .to_string()
    };
    let subject = serde_json::json!({"reference": "Patient/p1"});
    fs::write(
        b.join("one.json"),
        bundle(vec![
            serde_json::json!({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-01-01",
                "extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-sex", "valueCode": "248153007"}]}),
            serde_json::json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
                "class": {"code": "OBS"}, "period": {"start": "2026-03-01T10:00:00Z"}}),
            serde_json::json!({"resourceType": "Observation", "id": "o1", "status": "cancelled", "subject": subject,
                "code": {"coding": [{"system": "http://loinc.org", "code": "73832-8"}]},
                "issued": "2026-03-01T10:00:00Z",
                "extension": [{"url": "http://hl7.org/fhir/us/qicore/StructureDefinition/qicore-notDoneReason",
                    "valueCodeableConcept": {"coding": [{"system": sct, "code": "183932001"}]}}]}),
            serde_json::json!({"resourceType": "Condition", "id": "c1", "subject": subject,
                "code": {"coding": [{"system": sct, "code": "429009003"}]}, "onsetDateTime": "2020-01-01",
                "bodySite": [{"coding": [{"system": sct, "code": "24028007"}]}]}),
            serde_json::json!({"resourceType": "MedicationAdministration", "id": "m1", "status": "completed",
                "subject": subject, "effectiveDateTime": "2026-03-01T11:30:00Z",
                "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "311041"}]}}),
            serde_json::json!({"resourceType": "Communication", "id": "k1", "status": "completed", "subject": subject,
                "category": [{"coding": [{"system": sct, "code": "428341000124108"}]}],
                "sent": "2026-03-02T09:00:00Z", "statusReason": {"coding": [{"system": sct, "code": "105480006"}]}}),
        ]),
    )
    .unwrap();
    fs::write(
        b.join("two.json"),
        bundle(vec![
            serde_json::json!({"resourceType": "Patient", "id": "p2", "gender": "male", "birthDate": "1960-01-01"}),
            serde_json::json!({"resourceType": "Patient", "id": "p3", "gender": "male", "birthDate": "1960-01-01"}),
            serde_json::json!({"resourceType": "Encounter", "id": "e2", "status": "finished",
                "class": {"code": "AMB"}, "period": {"start": "2026-03-01T10:00:00Z"}}),
        ]),
    )
    .unwrap();
    let report = ingest_2030(&config(dir.path(), &[("b", "fhir-bundle", &b)]));
    let two = report.files.iter().find(|f| f.file == "two.json").unwrap();
    assert_eq!(
        two.rejects_by_rule,
        BTreeMap::from([("missing_subject".to_string(), 1)])
    );
    let wh = dir.path().join("wh");
    let staged = |t: &str| read_dir_batches(&wh.join("staging").join(t).join("source=b"));
    let p = staged("patient");
    let sex: BTreeMap<_, _> = strings(&p, "source_patient_id")
        .into_iter()
        .zip(strings(&p, "sex"))
        .collect();
    assert_eq!(
        sex[&Some("p1".into())].as_deref(),
        Some("male"),
        "the extension wins"
    );
    let e = staged("encounter");
    assert_eq!(strings(&e, "source_patient_id"), [Some("p1".into())]);
    assert_eq!(strings(&e, "encounter_class"), [Some("other".into())]);
    let o = staged("observation");
    assert_eq!(strings(&o, "reasons"), [Some("snomed|183932001".into())]);
    let c = staged("condition");
    assert_eq!(strings(&c, "body_sites"), [Some("snomed|24028007".into())]);
    let m = staged("medication");
    let time = cast(m[0].column_by_name("start_time").unwrap(), &DataType::Utf8);
    assert_eq!(
        time.unwrap().as_string::<i32>().value(0),
        "2026-03-01T11:30:00"
    );
    let k = staged("communication");
    assert_eq!(
        (strings(&k, "code"), strings(&k, "reasons")),
        (
            vec![Some("428341000124108".into())],
            vec![Some("snomed|105480006".into())]
        )
    );
}

#[test]
fn unseen_fhir_shapes_are_loaded_flagged_or_rejected_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("nd");
    fs::create_dir_all(&nd).unwrap();
    let race = r#""extension":[{"url":"http://hl7.org/fhir/us/core/StructureDefinition/us-core-race","extension":[{"url":"ombCategory","valueCoding":{"system":"urn:oid:2.16.840.1.113883.6.238","code":"2135-2"}}]}]"#;
    fs::write(
        nd.join("Patient.ndjson"),
        format!(
            "\u{feff}{{\"resourceType\":\"Patient\",\"id\":\"p1\",\"gender\":\"female\",\"birthDate\":\"1960-02-03\",{race}}}\n\
             {{\"resourceType\":\"Patient\",\"id\":\"p1\",\"gender\":\"male\",\"birthDate\":\"1970-01-01\"}}\n\
             {{\"resourceType\":\"Patient\",\"id\":\"p2\",\"gender\":\"female\",\"birthDate\":\"1961-01-01\"}}\n"
        ),
    )
    .unwrap();
    fs::write(
        nd.join("MedicationRequest.ndjson"),
        r#"{"resourceType":"MedicationRequest","id":"m1","status":"active","intent":"order","subject":{"reference":"Patient/p1"},"medicationCodeableConcept":{"coding":[{"system":"http://www.nlm.nih.gov/research/umls/rxnorm","code":"860975"}]},"authoredOn":"2025-12-25","dispenseRequest":{"numberOfRepeatsAllowed":12,"expectedSupplyDuration":{"value":30,"code":"d"}}}
{"resourceType":"MedicationRequest","id":"m2","status":"active","intent":"order","subject":{"reference":"Patient/p2"},"medicationCodeableConcept":{"coding":[{"system":"http://www.nlm.nih.gov/research/umls/rxnorm","code":"860975"}]},"authoredOn":"2025-12-25","dispenseRequest":{"expectedSupplyDuration":{"value":1e18,"code":"d"}}}
"#,
    )
    .unwrap();
    fs::write(
        nd.join("Condition.ndjson"),
        "{\"resourceType\":\"Condition\",\"id\":\"c1\",\"subject\":{\"reference\":\"Patient/p1\"},\"code\":{\"coding\":[{\"system\":\"http://hl7.org/fhir/sid/icd-10-cm\",\"code\":\"\u{415}11.9\"}]},\"onsetDateTime\":\"2020-01-01\"}\n",
    )
    .unwrap();
    let config =
        ward::PipelineConfig::load(&config(dir.path(), &[("nd", "fhir-ndjson", &nd)])).unwrap();
    let opts = ward::IngestOptions {
        today: chrono::NaiveDate::from_ymd_opt(2026, 1, 10).unwrap(),
        dry_run: false,
        ..Default::default()
    };
    let report = ward::ingest::ingest(&config.warehouse, &config.sources, &opts, &()).unwrap();
    let file = |name: &str| report.files.iter().find(|f| f.file == name).unwrap();
    let patients = file("Patient.ndjson");
    assert_eq!((patients.rows_accepted, patients.rows_rejected), (2, 1));
    assert_eq!(
        patients.rejects_by_rule,
        BTreeMap::from([("duplicate_patient_id".to_string(), 1)])
    );
    assert_eq!(
        patients.values_flagged.values().sum::<u64>(),
        1,
        "{:?}",
        patients.values_flagged
    );
    let wh = dir.path().join("wh");
    let p = read_dir_batches(&wh.join("staging/patient/source=nd"));
    assert_eq!(
        strings(&p, "source_patient_id"),
        [Some("p1".into()), Some("p2".into())]
    );
    assert_eq!(strings(&p, "race")[0].as_deref(), Some("unknown"));
    assert_eq!(
        strings(&p, "sex")[0].as_deref(),
        Some("female"),
        "the first p1 wins"
    );
    // Both prescriptions load: a planned end after as_of is no future date.
    let meds = file("MedicationRequest.ndjson");
    assert_eq!(
        (meds.rows_accepted, meds.rows_rejected),
        (2, 0),
        "{:?}",
        meds.rejects_by_rule
    );
    let conditions = file("Condition.ndjson");
    assert_eq!(
        conditions.rejects_by_rule,
        BTreeMap::from([("malformed_code".to_string(), 1)])
    );
}
