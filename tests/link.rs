//! Linkage and the core tables on the bundled sample: the persons found are
//! exactly the generator's ground truth, ids are deterministic, a fact
//! reported by two providers becomes one core row remembering both, and
//! measures count persons, not provider records.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use ward::link::{self, LinkOptions};
use ward::warehouse::Warehouse;

use common::*;

/// Ingests a copy of the sample and links it.
fn linked_sample(dir: &Path) -> (ward::PipelineConfig, link::Linkage) {
    let config_path = copy_sample(dir);
    run_ingest(&config_path).unwrap();
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let wh = Warehouse::new(&config.warehouse);
    let linkage = link::link(&wh, &config.link, &[]).unwrap();
    link::build::build(&wh).unwrap();
    (config, linkage)
}

/// Groups of (source, source_patient_id) per person id.
fn clusters(
    pairs: impl Iterator<Item = (String, String, String)>,
) -> BTreeSet<BTreeSet<(String, String)>> {
    let mut by: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for (source, id, person) in pairs {
        by.entry(person).or_default().insert((source, id));
    }
    by.into_values().collect()
}

#[test]
fn sample_persons_are_exactly_the_ground_truth() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, linkage) = linked_sample(tmp.path());
    let found = clusters(linkage.links.iter().map(|l| {
        (
            l.source.clone(),
            l.source_patient_id.clone(),
            l.person_id.clone(),
        )
    }));
    let staged: BTreeSet<(String, String)> = linkage
        .links
        .iter()
        .map(|l| (l.source.clone(), l.source_patient_id.clone()))
        .collect();
    let mut reader = csv::Reader::from_path(repo().join("sample_data/truth.csv")).unwrap();
    let truth = clusters(
        reader
            .records()
            .map(|r| {
                let r = r.unwrap();
                (r[0].to_string(), r[1].to_string(), r[2].to_string())
            })
            .filter(|(s, i, _)| staged.contains(&(s.clone(), i.clone()))),
    );
    assert_eq!(found, truth);
    assert!(
        found.iter().any(|c| c.len() == 3),
        "some persons are seen by all three providers"
    );
    assert_eq!(linkage.report.persons as usize, truth.len());
    assert_eq!(linkage.report.records as usize, staged.len());

    let e = link::evaluate(&linkage.links, &repo().join("sample_data/truth.csv")).unwrap();
    assert_eq!((e.precision, e.recall, e.f1), (1.0, 1.0, 1.0));
    assert_eq!(e.predicted_persons, e.true_persons);
}

#[test]
fn linkage_is_deterministic_and_core_tables_are_rebuilt_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, _) = linked_sample(tmp.path());
    let core = config.warehouse.join("core");
    let before = snapshot(&core);
    let wh = Warehouse::new(&config.warehouse);
    link::link(&wh, &config.link, &[]).unwrap();
    link::build::build(&wh).unwrap();
    assert_eq!(before, snapshot(&core));
    // Every staged row of a fact table is in core, or merged into a row
    // that lists its source.
    for table in [
        "encounter",
        "condition",
        "observation",
        "medication",
        "procedure",
    ] {
        let staged = rows(&read_dir_batches(
            &config.warehouse.join("staging").join(table),
        ));
        let core_rows = read_dir_batches(&core.join(table));
        let reports: usize = (0..core_rows.len())
            .map(|i| {
                let b = &core_rows[i];
                (0..b.num_rows())
                    .map(|r| list_len(b, "reported_by", r))
                    .sum::<usize>()
            })
            .sum();
        assert!(rows(&core_rows) <= staged, "{table}");
        assert!(reports <= staged && reports >= rows(&core_rows), "{table}");
        assert!(
            strings(&core_rows, "person_id")
                .iter()
                .all(|p| p.as_deref().is_some_and(|p| p.starts_with('P')))
        );
    }
}

/// The same laboratory result sent to two providers of one person is one
/// core fact that remembers both.
#[test]
fn a_fact_reported_by_two_providers_becomes_one() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let sample = config_path.parent().unwrap();
    // A person seen by both EMR-A providers.
    let truth = fs::read_to_string(sample.join("truth.csv")).unwrap();
    let mut ids: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for line in truth.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        ids.entry(f[2]).or_default().insert(f[0], f[1]);
    }
    let (clinic, endo) = ids
        .values()
        .find_map(|m| Some((*m.get("northside_clinic")?, *m.get("lakeside_endo")?)))
        .expect("a person at both EMR-A providers");
    for (dir, pid) in [("northside_clinic", clinic), ("lakeside_endo", endo)] {
        let path = sample.join(dir).join("results.csv");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str(&format!(
            "SHARED-{dir},{pid},,06/30/2025 08:15,4548-4,Hemoglobin A1c,8.7,%\n"
        ));
        fs::write(&path, text).unwrap();
    }
    run_ingest(&config_path).unwrap();
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let wh = Warehouse::new(&config.warehouse);
    link::link(&wh, &config.link, &[]).unwrap();
    link::build::build(&wh).unwrap();
    let core = read_dir_batches(&config.warehouse.join("core/observation"));
    let ids = strings(&core, "source_observation_id");
    let hits: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, id)| id.as_deref().is_some_and(|i| i.starts_with("SHARED-")))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "one core row for the two reports");
    // The row comes from the first report in source order and lists both.
    assert_eq!(ids[hits[0]].as_deref(), Some("SHARED-lakeside_endo"));
    let mut offset = hits[0];
    let batch = core.iter().find(|b| {
        if offset < b.num_rows() {
            true
        } else {
            offset -= b.num_rows();
            false
        }
    });
    let list = batch.unwrap().column_by_name("reported_by").unwrap();
    let list = datafusion::arrow::array::AsArray::as_list::<i32>(list).value(offset);
    let sources: Vec<&str> = datafusion::arrow::array::AsArray::as_string::<i32>(&list)
        .iter()
        .flatten()
        .collect();
    assert_eq!(sources, ["lakeside_endo", "northside_clinic"]);
}

#[test]
fn evaluation_counts_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let truth = tmp.path().join("truth.csv");
    fs::write(
        &truth,
        "source,source_patient_id,person_id\na,1,x\nb,1,x\nc,1,x\na,2,y\nb,2,z\n",
    )
    .unwrap();
    let link = |s: &str, i: &str, p: &str| ward::link::PersonLink {
        source: s.into(),
        source_patient_id: i.into(),
        person_id: p.into(),
        match_weight: None,
        rule: None,
    };
    // Predicted: {a1,b1} {c1} {a2,b2}: one true pair of three found, one false pair.
    let links = vec![
        link("a", "1", "P1"),
        link("b", "1", "P1"),
        link("c", "1", "P2"),
        link("a", "2", "P3"),
        link("b", "2", "P3"),
    ];
    let e = ward::link::evaluate(&links, &truth).unwrap();
    assert_eq!(
        (e.true_pairs, e.predicted_pairs, e.true_positive_pairs),
        (3, 2, 1)
    );
    assert_eq!((e.precision, e.recall), (0.5, 1.0 / 3.0));
    assert_eq!((e.true_persons, e.predicted_persons), (3, 3));
    fs::write(&truth, "source,source_patient_id\na,1\n").unwrap();
    let err = ward::link::evaluate(&links, &truth)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truth.csv:2:"), "{err}");
}

#[test]
fn config_threshold_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let text = fs::read_to_string(&config_path).unwrap();
    fs::write(&config_path, format!("{text}\n[link]\nthreshold = 0.3\n")).unwrap();
    let err = ward::PipelineConfig::load(&config_path).unwrap_err();
    assert!(err.is_config_error());
    assert!(err.to_string().contains("link.threshold"), "{err}");
    fs::write(
        &config_path,
        format!("{text}\n[link]\nthreshold = 0.99\nseed = 7\n"),
    )
    .unwrap();
    let c = ward::PipelineConfig::load(&config_path).unwrap();
    assert_eq!(
        c.link,
        LinkOptions {
            threshold: 0.99,
            seed: 7,
            ..LinkOptions::default()
        }
    );
}

/// A person keeps their id (and so their research id) from one published
/// run to the next when the record their id was derived from is withdrawn:
/// ids are carried forward from the previous run's links.
#[test]
fn person_ids_survive_a_withdrawn_first_record() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    // The withdrawn patient's facts become rejects (unknown_patient): more
    // than the default gate allows at this size.
    let text = fs::read_to_string(&config_path).unwrap();
    fs::write(&config_path, text + "\n[gates]\nmax_reject_rate = 0.2\n").unwrap();
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let first = run_all(&config);
    let links = |run: &ward::RunReport| -> BTreeMap<(String, String), String> {
        link::read_person_links(&run.run_dir.join("core/person_link.parquet"))
            .unwrap()
            .into_iter()
            .map(|l| ((l.source, l.source_patient_id), l.person_id))
            .collect()
    };
    let before = links(&first);
    // A person whose first record (sources sort lakeside_endo first) is at
    // lakeside_endo and who is also known to northside_clinic.
    let by_person = clusters(
        before
            .iter()
            .map(|((s, i), p)| (s.clone(), i.clone(), p.clone())),
    );
    let cluster = by_person
        .iter()
        .find(|c| {
            c.first().unwrap().0 == "lakeside_endo"
                && c.iter().any(|(s, _)| s == "northside_clinic")
        })
        .expect("the sample has persons seen by the endocrinologist and the clinic");
    let (_, withdrawn) = cluster.first().unwrap().clone();
    let (_, kept) = cluster
        .iter()
        .find(|(s, _)| s == "northside_clinic")
        .unwrap()
        .clone();
    let patients = tmp.path().join("sample_data/lakeside_endo/patients.csv");
    let text = fs::read_to_string(&patients).unwrap();
    let rest: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(&format!("{withdrawn},")))
        .collect();
    assert_eq!(rest.len() + 1, text.lines().count());
    fs::write(&patients, rest.join("\n") + "\n").unwrap();

    let second = run_all(&config);
    let after = links(&second);
    let key = |s: &str, i: &str| (s.to_string(), i.to_string());
    assert!(!after.contains_key(&key("lakeside_endo", &withdrawn)));
    assert_eq!(
        after[&key("northside_clinic", &kept)],
        before[&key("lakeside_endo", &withdrawn)],
        "the person's id changed when its first record was withdrawn"
    );
    // Every person of the first run who still has a record keeps its id.
    for (record, person) in &after {
        if let Some(old) = before.get(record) {
            assert_eq!(person, old, "{record:?}");
        }
    }
    assert_eq!(second.link.ids_carried_forward, second.link.persons);
    // The research ids follow.
    let research_ids = |run: &ward::RunReport| -> BTreeSet<String> {
        strings(
            &read_parquet(&run.run_dir.join("research/person.parquet")),
            "research_id",
        )
        .into_iter()
        .flatten()
        .collect()
    };
    assert!(research_ids(&second).is_subset(&research_ids(&first)));
}
