//! The stratified summary `ward run` writes: counts that reconcile with the
//! measures, Wilson intervals around the rate, and no published count from
//! 1 to min_cell_size - 1; age-standardized rates for the flagged measures;
//! one FHIR MeasureReport per measure, valid against a typed R4(B) model.

use std::collections::BTreeMap;
use std::fs;

use datafusion::arrow::datatypes::UInt64Type;

use crate::common::*;

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
    let suppressed = bools(&batches, "suppressed");
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
                measure[i].as_deref() == Some(r.key().as_str())
                    && dimension[i].as_deref() == Some("overall")
            })
            .unwrap();
        if !suppressed[i] {
            assert_eq!(
                counts["initial_population"][i],
                Some(r.counts.initial_population)
            );
            assert_eq!(counts["numerator"][i], Some(r.counts.numerator));
            assert_eq!(rate[i], r.score);
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
    // A dimension hides a single stratum only when it has no other with a
    // population: that stratum is the overall, hidden as well.
    let overall_hidden = |m: &str| {
        (0..n).any(|i| {
            measure[i].as_deref() == Some(m)
                && dimension[i].as_deref() == Some("overall")
                && suppressed[i]
        })
    };
    for ((m, dim), k) in &hidden {
        assert!(*k != 1 || overall_hidden(m), "{m} {dim}: {hidden:?}");
    }
    // Payer strata from the clinic layout's insurance column, in categories
    // (labels are published even when counts are not: never free text).
    let payers: std::collections::BTreeSet<&str> = (0..n)
        .filter(|&i| dimension[i].as_deref() == Some("payer"))
        .map(|i| stratum[i].as_deref().unwrap())
        .collect();
    assert!(payers.len() > 2, "{payers:?}");
    let categories = [
        "commercial",
        "medicaid",
        "medicare",
        "military",
        "self-pay",
        "other",
        "unknown",
    ];
    assert!(payers.iter().all(|p| categories.contains(p)), "{payers:?}");

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
    let of_record = |column| -> BTreeMap<(String, String), Option<String>> {
        strings(&patients, "source")
            .into_iter()
            .zip(strings(&patients, "source_patient_id"))
            .zip(strings(&patients, column))
            .map(|((s, i), m)| ((s.unwrap(), i.unwrap()), m))
            .collect()
    };
    let (mrn_of, birth_of) = (of_record("mrn"), of_record("birth_date"));
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
            // The provider's own demographics (its birth date may be missing).
            assert!(!row["given_name"].is_empty());
            assert_eq!(
                birth_of[&key].clone().unwrap_or_default(),
                row["birth_date"],
                "birth date at that provider"
            );
            listed
                .entry(row["measure_id"].clone())
                .or_default()
                .insert(person_of[&key].clone());
        }
    }
    for r in &run.measures {
        let needs: std::collections::BTreeSet<String> = r
            .members()
            .into_iter()
            .filter(|m| {
                let f = m.flags;
                match r.def.improvement {
                    ward::measure::Improvement::Decrease => f[4],
                    ward::measure::Improvement::Increase => f[1] && !f[2] && !f[3] && !f[4],
                }
            })
            .map(|m| m.person)
            .collect();
        let key = r.key();
        match r.care_gap() {
            Some(_) if !needs.is_empty() => {
                assert_eq!(listed.get(&key), Some(&needs), "{key}")
            }
            _ => assert!(!listed.contains_key(&key), "{key}"),
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

    check_age_standardized(&run, &batches, 11);
    check_dimensions(&run, &batches);
    check_measure_reports(&run, &json);
}

/// The persons' report strata of `run`, from its own core tables
/// (runs/<run_id>/ under the warehouse).
fn strata_of(run: &ward::RunReport) -> Vec<datafusion::arrow::array::RecordBatch> {
    ward::measure::strata(
        &ward::warehouse::Warehouse::new(run.run_dir.ancestors().nth(2).unwrap())
            .with_output(&run.run_dir),
        &repo().join("queries"),
        run.measures[0].period,
    )
    .unwrap()
}

/// Every published count of Ward's dimensions, counted here member by
/// member from the persons' strata: a member counts in each provider
/// that knows their person and in their person's value of every other
/// dimension; a member whose person has no strata is `unknown` in all.
fn check_dimensions(run: &ward::RunReport, batches: &[datafusion::arrow::array::RecordBatch]) {
    let dimensions = ward::report::DIMENSIONS;
    let strata_rows = strata_of(run);
    let persons = strings(&strata_rows, "person_id");
    let columns: Vec<Vec<Option<String>>> = dimensions
        .iter()
        .map(|d| strings(&strata_rows, d))
        .collect();
    // Per person: the providers, then the value of each other dimension.
    let mut of_person: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for (i, p) in persons.iter().enumerate() {
        let e = of_person.entry(p.clone().unwrap()).or_insert_with(|| {
            let values = columns[1..]
                .iter()
                .map(|c| c[i].clone().unwrap_or_default());
            (Vec::new(), values.collect())
        });
        e.0.extend(columns[0][i].clone());
    }
    let unknown = (
        vec!["unknown".to_string()],
        vec!["unknown".to_string(); dimensions.len() - 1],
    );
    type Key = (String, String, String);
    let mut expected: BTreeMap<Key, [u64; 5]> = BTreeMap::new();
    for r in &run.measures {
        for m in r.members() {
            let (providers, values) = of_person.get(&m.person).unwrap_or(&unknown);
            let strata = providers
                .iter()
                .map(|v| (dimensions[0], v))
                .chain(dimensions[1..].iter().copied().zip(values));
            for (d, v) in strata {
                let counts = expected
                    .entry((r.key(), d.to_string(), v.clone()))
                    .or_default();
                for (c, f) in counts.iter_mut().zip(m.flags) {
                    *c += u64::from(f);
                }
            }
        }
    }
    let (measure, dimension, stratum) = (
        strings(batches, "measure"),
        strings(batches, "dimension"),
        strings(batches, "stratum"),
    );
    let columns = [
        "initial_population",
        "denominator",
        "denominator_exclusion",
        "denominator_exception",
        "numerator",
    ]
    .map(|c| primitives::<UInt64Type>(batches, c));
    let mut compared = 0;
    for i in 0..rows(batches) {
        let d = dimension[i].clone().unwrap();
        if !dimensions.contains(&d.as_str()) || columns[0][i].is_none() {
            continue;
        }
        let key = (measure[i].clone().unwrap(), d, stratum[i].clone().unwrap());
        let got: Vec<u64> = columns.iter().map(|c| c[i].unwrap()).collect();
        assert_eq!(got, expected[&key], "{key:?}");
        compared += 1;
    }
    assert!(compared >= 20, "{compared} cells compared");
}

/// Age-standardized columns: only for flagged measures, only where the
/// stratum is published, never for the age bands themselves, and the
/// overall value recomputed here from the persons' bands.
fn check_age_standardized(
    run: &ward::RunReport,
    batches: &[datafusion::arrow::array::RecordBatch],
    min_cell: u64,
) {
    let n = rows(batches);
    let measure = strings(batches, "measure");
    let dimension = strings(batches, "dimension");
    let suppressed = bools(batches, "suppressed");
    let (std, lo, hi) = (
        f64s(batches, "age_std_rate"),
        f64s(batches, "age_std_ci_low"),
        f64s(batches, "age_std_ci_high"),
    );
    let flagged: Vec<&str> = run
        .measures
        .iter()
        .filter(|r| r.def.age_standardize)
        .map(|r| r.def.id.as_str())
        .collect();
    assert_eq!(flagged, ["DM-PREV", "DM-UNDX"]);
    for i in 0..n {
        let m = measure[i].as_deref().unwrap();
        if !flagged.contains(&m) || suppressed[i] || dimension[i].as_deref() == Some("age_band") {
            assert!(
                std[i].is_none() && lo[i].is_none() && hi[i].is_none(),
                "row {i}"
            );
        }
        if let (Some(r), Some(l), Some(h)) = (std[i], lo[i], hi[i]) {
            assert!(0.0 <= l && l <= r && r <= h && h <= 1.0, "{l} {r} {h}");
        }
    }
    // Overall DM-PREV, recomputed: age band of each person from the
    // strata, weights of the 2000 standard over the adult bands.
    let prev = run.measures.iter().find(|r| r.def.id == "DM-PREV").unwrap();
    let i = (0..n)
        .find(|&i| {
            measure[i].as_deref() == Some("DM-PREV") && dimension[i].as_deref() == Some("overall")
        })
        .unwrap();
    let strata_rows = strata_of(run);
    let band_of: BTreeMap<String, String> = strings(&strata_rows, "person_id")
        .into_iter()
        .zip(strings(&strata_rows, "age_band"))
        .map(|(p, b)| (p.unwrap(), b.unwrap()))
        .collect();
    let mut per_band: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (person, f) in prev.memberships() {
        if f[1] && !f[2] && !f[3] {
            let e = per_band.entry(band_of[&person].clone()).or_default();
            e.0 += 1.0;
            e.1 += f64::from(u8::from(f[4]));
        }
    }
    assert!(!per_band.contains_key("0-17"), "DM-PREV counts adults only");
    let standard = [
        ("18-44", 108_151.0),
        ("45-64", 60_991.0),
        ("65-74", 18_136.0),
        ("75+", 16_574.0),
    ];
    let covered: Vec<_> = standard
        .iter()
        .filter(|(b, _)| per_band.contains_key(*b))
        .collect();
    let total: f64 = covered.iter().map(|(_, w)| w).sum();
    let expected: f64 = covered
        .iter()
        .map(|(b, w)| w / total * per_band[*b].1 / per_band[*b].0)
        .sum();
    // Published only when no age band holds a small count (n, x or n - x
    // from 1 to min_cell_size - 1).
    let small = |v: f64| v > 0.0 && v < min_cell as f64;
    let any_small = per_band
        .values()
        .any(|(n, x)| small(*n) || small(*x) || small(n - x));
    if suppressed[i] || any_small {
        assert_eq!(std[i], None, "withheld: a band is small");
    } else {
        let got = std[i].expect("overall DM-PREV is standardized");
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    }
}

/// One MeasureReport per measure: valid against the typed FHIR model,
/// counts equal to the summary cells, suppressed counts masked.
fn check_measure_reports(run: &ward::RunReport, summary: &serde_json::Value) {
    use fhir_model::r4b::resources::MeasureReport;
    let mut ids: Vec<&str> = run.measures.iter().map(|r| r.def.id.as_str()).collect();
    ids.dedup();
    assert_eq!(
        run.measure_reports.len(),
        ids.len(),
        "one report per measure"
    );
    let cells = summary.as_array().unwrap();
    let mut masked = 0;
    for (k, r) in run.measures.iter().enumerate() {
        // The result's group among its measure's results.
        let g = run.measures[..k]
            .iter()
            .filter(|o| o.def.id == r.def.id)
            .count();
        let path = run
            .report_dir
            .join("fhir")
            .join(format!("MeasureReport-{}.json", r.def.id));
        assert!(run.measure_reports.contains(&path), "{}", path.display());
        let value: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();

        // The typed model accepts it, and writes back exactly what we
        // wrote: no element it does not know (a misspelt name would be lost).
        let typed: MeasureReport = serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{} is not a valid MeasureReport: {e}", path.display()));
        assert_eq!(serde_json::to_value(&typed).unwrap(), value, "{}", r.def.id);
        assert_eq!(value["status"], "complete");
        assert_eq!(value["type"], "summary");
        assert_eq!(value["period"]["start"], r.period.start.to_string());
        assert_eq!(value["period"]["end"], r.period.end.to_string());
        let measure_url = value["measure"].as_str().unwrap();
        match &r.def.url {
            Some(url) => assert_eq!(measure_url, url),
            None => assert!(measure_url.starts_with("urn:"), "{measure_url}"),
        }
        let notation = &value["improvementNotation"]["coding"][0];
        assert_eq!(
            notation["system"],
            "http://terminology.hl7.org/CodeSystem/measure-improvement-notation"
        );
        assert_eq!(
            notation["code"],
            serde_json::to_value(r.def.improvement).unwrap()
        );

        // Every population, overall and per stratum, equals its summary cell.
        let group = &value["group"][g];
        let cell_of = |dimension: &str, stratum: &str| {
            cells
                .iter()
                .find(|c| {
                    c["measure"] == r.key().as_str()
                        && c["dimension"] == dimension
                        && c["stratum"] == stratum
                })
                .unwrap_or_else(|| panic!("{} {dimension} {stratum}", r.def.id))
        };
        let mut checked = 0;
        let mut check =
            |pops: &serde_json::Value, score: &serde_json::Value, cell: &serde_json::Value| {
                let pops = pops.as_array().unwrap();
                assert_eq!(pops.len(), 5);
                for p in pops {
                    let coding = &p["code"]["coding"][0];
                    assert_eq!(
                        coding["system"],
                        "http://terminology.hl7.org/CodeSystem/measure-population"
                    );
                    let column = coding["code"].as_str().unwrap().replace('-', "_");
                    match p.get("count") {
                        Some(count) => {
                            let count = count.as_u64().unwrap();
                            assert_eq!(Some(count), cell[&column].as_u64(), "{column}");
                            assert!(count == 0 || count >= 11, "{column} = {count} published");
                            assert!(p.get("_count").is_none());
                        }
                        None => {
                            assert!(cell[&column].is_null() && cell["suppressed"] == true);
                            let ext = &p["_count"]["extension"][0];
                            assert_eq!(
                                ext["url"],
                                "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
                            );
                            assert_eq!(ext["valueCode"], "masked");
                            masked += 1;
                        }
                    }
                    checked += 1;
                }
                match cell["rate"].as_f64() {
                    Some(rate) => assert_eq!(score["value"].as_f64(), Some(rate)),
                    None => assert!(score.is_null(), "no score where the rate is not published"),
                }
            };
        check(
            &group["population"],
            &group["measureScore"],
            cell_of("overall", "all"),
        );
        let none = Vec::new();
        let stratifiers = group["stratifier"].as_array().unwrap_or(&none);
        let dims: Vec<&str> = stratifiers
            .iter()
            .map(|s| s["code"][0]["text"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = ward::report::DIMENSIONS
            .into_iter()
            .chain(r.def.stratifiers.iter().map(|s| s.id.as_str()))
            .filter(|d| {
                cells
                    .iter()
                    .any(|c| c["measure"] == r.key().as_str() && c["dimension"] == *d)
            })
            .collect();
        assert_eq!(
            dims, expected,
            "one stratifier per dimension of the summary"
        );
        for s in stratifiers {
            let dim = s["code"][0]["text"].as_str().unwrap();
            for st in s["stratum"].as_array().unwrap() {
                let cell = cell_of(dim, st["value"]["text"].as_str().unwrap());
                check(&st["population"], &st["measureScore"], cell);
            }
        }
        let cells_of_measure = cells
            .iter()
            .filter(|c| c["measure"] == r.key().as_str())
            .count();
        assert_eq!(checked, 5 * cells_of_measure, "every cell is reported");
    }
    // The sample has small strata: some counts are masked somewhere.
    assert!(masked > 0);
}

/// Removing any element FHIR R4 requires of a MeasureReport (or putting a
/// code outside its value set) makes the typed model reject the report, so
/// the validation above would catch it.
#[test]
fn the_typed_model_rejects_reports_missing_required_elements() {
    use fhir_model::r4b::resources::MeasureReport;
    let report = serde_json::json!({
        "resourceType": "MeasureReport",
        "id": "DM-PREV",
        "status": "complete",
        "type": "summary",
        "measure": "urn:ward:measure:DM-PREV",
        "date": "2026-01-31T12:00:00Z",
        "period": {"start": "2025-01-01", "end": "2025-12-31"},
        "improvementNotation": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/measure-improvement-notation",
            "code": "decrease"}]},
        "group": [{
            "population": [{
                "code": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/measure-population",
                    "code": "numerator"}]},
                "_count": {"extension": [{
                    "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                    "valueCode": "masked"}]}
            }],
            "stratifier": [{"code": [{"text": "sex"}], "stratum": [{
                "value": {"text": "female"},
                "population": [{"code": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/measure-population",
                    "code": "denominator"}]}, "count": 120}],
                "measureScore": {"value": 0.25}}]}]
        }]
    });
    let parse = |v: &serde_json::Value| serde_json::from_value::<MeasureReport>(v.clone());
    parse(&report).expect("the complete report is valid");
    let without = |pointer: &str, key: &str| {
        let mut v = report.clone();
        v.pointer_mut(pointer)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .remove(key)
            .unwrap();
        v
    };
    for (pointer, key) in [
        ("", "status"),
        ("", "type"),
        ("", "measure"),
        ("", "period"),
        ("/group/0/population/0/_count/extension/0", "url"),
    ] {
        assert!(
            parse(&without(pointer, key)).is_err(),
            "a report without {pointer}/{key} must be rejected"
        );
    }
    let mut bad = report.clone();
    bad["status"] = "done".into();
    assert!(parse(&bad).is_err(), "status outside its value set");
    let mut bad = report.clone();
    bad["type"] = "summary-report".into();
    assert!(parse(&bad).is_err(), "type outside its value set");
    let mut bad = report.clone();
    bad["group"][0]["population"][0]["count"] = "many".into();
    assert!(parse(&bad).is_err(), "count must be an integer");
    // population.code is 0..1 in R4 (MeasureReport.group.population.code),
    // so its absence is not a structural error; Ward always writes it
    // (checked on the real reports above).
    assert!(parse(&without("/group/0/population/0", "code")).is_ok());
}

/// A dimension no extract records is left out rather than published as one
/// `unknown` stratum: without the clinic layout's insurance column, no
/// source has a payer. And with nothing suppressed (min_cell_size = 1) the
/// overall age-standardized rate is published and equals a recomputation.
#[test]
fn a_dimension_no_source_records_is_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let config_text = fs::read_to_string(&config_path).unwrap();
    fs::write(
        &config_path,
        config_text + "\n[report]\nmin_cell_size = 1\n",
    )
    .unwrap();
    let mapping = tmp.path().join("sample_data/mappings/emr_a.toml");
    let text = fs::read_to_string(&mapping).unwrap();
    assert!(text.contains("payer = \"Insurance\"\n"));
    fs::write(&mapping, text.replace("payer = \"Insurance\"\n", "")).unwrap();
    let run = run_all(&ward::PipelineConfig::load(&config_path).unwrap());
    let dims: std::collections::BTreeSet<&str> =
        run.summary.iter().map(|c| c.dimension.as_str()).collect();
    assert!(!dims.contains("payer"), "{dims:?}");
    assert!(dims.contains("zip3") && dims.contains("provider"));
    let batches = read_parquet(&run.report_dir.join("summary.parquet"));
    check_age_standardized(&run, &batches, 1);
    let prev = run
        .summary
        .iter()
        .find(|c| c.measure == "DM-PREV" && c.dimension == "overall")
        .unwrap();
    assert!(prev.age_std_rate.is_some());
}
