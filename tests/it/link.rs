//! Linkage and the core tables on the bundled sample: the persons found are
//! exactly the generator's ground truth, ids are deterministic, a fact
//! reported by two providers becomes one core row remembering both, and
//! measures count persons, not provider records.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use datafusion::arrow::array::Array;
use ward::link::{self, LinkOptions};
use ward::warehouse::Warehouse;

use crate::common::*;

/// Ingests a copy of the sample and links it.
fn linked_sample(dir: &Path) -> (ward::PipelineConfig, link::Linkage) {
    let config_path = copy_sample(dir);
    run_ingest(&config_path).unwrap();
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let wh = Warehouse::new(&config.warehouse);
    let linkage = link::link(&wh, &config.link, &link::Earlier::default()).unwrap();
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

/// The sample carries the generator's hard noise (swapped names, initials,
/// missing birth dates, duplicate registrations): Ward never merges two
/// people and finds nearly every true pair (a woman who changed her name
/// and moved, with no identifier in common, stays apart).
#[test]
fn sample_persons_match_the_ground_truth() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, linkage) = linked_sample(tmp.path());
    let found = clusters(linkage.links.iter().map(|l| {
        (
            l.source.to_string(),
            l.source_patient_id.to_string(),
            l.person_id.to_string(),
        )
    }));
    let staged: BTreeSet<(String, String)> = linkage
        .links
        .iter()
        .map(|l| (l.source.to_string(), l.source_patient_id.to_string()))
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
    for cluster in &found {
        assert!(
            truth.iter().any(|t| cluster.is_subset(t)),
            "a false merge: {cluster:?}"
        );
    }
    let exact = found.intersection(&truth).count();
    assert!(
        exact as f64 >= 0.98 * truth.len() as f64,
        "{exact} of {} persons exactly right",
        truth.len()
    );
    assert!(
        found.iter().any(|c| c.len() == 3),
        "some persons are seen by all three providers"
    );
    let pairs = |c: &BTreeSet<(String, String)>| c.len() * (c.len() - 1) / 2;
    assert!(
        truth.iter().any(
            |t| t.iter().map(|(s, _)| s).collect::<BTreeSet<_>>().len() < t.len()
                && found.contains(t)
        ),
        "a duplicate registration within a provider is merged"
    );
    assert_eq!(linkage.report.persons as usize, found.len());
    assert_eq!(linkage.report.records as usize, staged.len());

    // Every truth record is scored: the staged ones as linked; those
    // rejected at ingest count as persons of their own.
    let e = link::evaluate(&linkage.links, &repo().join("sample_data/truth.csv")).unwrap();
    let truth_rows = fs::read_to_string(repo().join("sample_data/truth.csv"))
        .unwrap()
        .lines()
        .count()
        - 1;
    assert_eq!(e.records as usize, truth_rows);
    assert_eq!(e.records_not_linked as usize, truth_rows - staged.len());
    assert_eq!(e.precision, Some(1.0));
    assert_eq!(e.predicted_pairs, e.true_positive_pairs);
    assert_eq!(
        e.predicted_pairs as usize,
        found.iter().map(pairs).sum::<usize>()
    );
    let staged_pairs: usize = truth.iter().map(pairs).sum();
    assert!(e.true_positive_pairs as f64 >= 0.97 * staged_pairs as f64);
}

#[test]
fn linkage_is_deterministic_and_core_tables_are_rebuilt_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, _) = linked_sample(tmp.path());
    let core = config.warehouse.join("core");
    let before = snapshot(&core);
    let wh = Warehouse::new(&config.warehouse);
    link::link(&wh, &config.link, &link::Earlier::default()).unwrap();
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
    link::link(&wh, &config.link, &link::Earlier::default()).unwrap();
    let tables: Vec<_> = link::build::fact_tables().collect();
    // One part, then many: the two reports meet in one part either way.
    for rows_per_part in [link::build::ROWS_PER_PART, 500] {
        link::build::build_in_parts(&wh, &tables, rows_per_part).unwrap();
        let dir = config.warehouse.join("core/observation");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count() > 1,
            rows_per_part == 500,
            "{rows_per_part} rows per part"
        );
        assert_one_shared_fact(&read_dir_batches(&dir));
    }
}

fn assert_one_shared_fact(core: &[datafusion::arrow::array::RecordBatch]) {
    let ids = strings(core, "source_observation_id");
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

/// A core table built in many parts holds exactly the rows it holds built
/// in one: splitting by person never separates the reports of a fact, and
/// no staged row is lost or repeated on the way.
#[test]
fn core_tables_hold_the_same_rows_in_one_part_or_many() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, _) = linked_sample(tmp.path());
    let wh = Warehouse::new(&config.warehouse);
    let core = config.warehouse.join("core");
    let tables: Vec<_> = link::build::fact_tables().collect();
    let contents = || -> BTreeMap<&str, Vec<String>> {
        tables
            .iter()
            .map(|t| {
                (
                    t.name(),
                    sorted_rows(&read_dir_batches(&core.join(t.name()))),
                )
            })
            .collect()
    };
    let parts = |t: &str| fs::read_dir(core.join(t)).unwrap().count();
    let one = contents();
    assert_eq!(parts("observation"), 1);
    let staged = rows(&read_dir_batches(
        &config.warehouse.join("staging/observation"),
    ));
    link::build::build_in_parts(&wh, &tables, (staged / 7) as u64).unwrap();
    assert!(parts("observation") >= 7);
    assert!(parts("encounter") > 1);
    assert_eq!(one, contents());
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
    assert_eq!((e.precision, e.recall), (Some(0.5), Some(1.0 / 3.0)));
    assert_eq!((e.true_persons, e.predicted_persons), (3, 3));
    assert_eq!(e.persons_exact, 0);

    // Every truth record counts: one rejected at ingest (c2, absent from
    // the links) is a person of its own; a record without truth is not
    // scored; a person found exactly counts as such.
    fs::write(
        &truth,
        "source,source_patient_id,person_id\na,1,x\nb,1,x\nc,1,x\na,2,y\nb,2,z\nc,2,y\nd,1,w\n",
    )
    .unwrap();
    let mut more = links.clone();
    more.push(link("d", "1", "P4"));
    more.push(link("e", "1", "P5"));
    let e = ward::link::evaluate(&more, &truth).unwrap();
    assert_eq!(
        (e.records, e.records_not_linked, e.records_not_in_truth),
        (7, 1, 1)
    );
    assert_eq!(
        (e.true_pairs, e.predicted_pairs, e.true_positive_pairs),
        (4, 2, 1)
    );
    assert_eq!((e.precision, e.recall), (Some(0.5), Some(0.25)));
    assert_eq!(
        (e.true_persons, e.predicted_persons, e.persons_exact),
        (4, 5, 1)
    );
    // Nothing linked within one source: no predicted pair, no precision —
    // not "precision 1.0".
    let singletons: Vec<_> = ["1", "2"].iter().map(|i| link("a", i, i)).collect();
    fs::write(&truth, "source,source_patient_id,person_id\na,1,x\na,2,x\n").unwrap();
    let e = ward::link::evaluate(&singletons, &truth).unwrap();
    assert_eq!((e.precision, e.recall, e.f1), (None, Some(0.0), 0.0));
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
            within_source_threshold: Some(0.99),
            seed: 7,
            ..LinkOptions::default()
        }
    );
    for (bad, key) in [
        ("labels = \"missing.csv\"", "link.labels"),
        ("review_threshold = 0.95", "link.review_threshold"),
        (
            "within_source_threshold = 0.8",
            "link.within_source_threshold",
        ),
        ("refit_growth = -0.1", "link.refit_growth"),
    ] {
        fs::write(&config_path, format!("{text}\n[link]\n{bad}\n")).unwrap();
        let err = ward::PipelineConfig::load(&config_path).unwrap_err();
        assert!(err.to_string().contains(key), "{bad}: {err}");
    }
    fs::write(
        &config_path,
        format!("{text}\n[link]\nwithin_source = false\nhousehold = false\n"),
    )
    .unwrap();
    let c = ward::PipelineConfig::load(&config_path).unwrap();
    assert_eq!(
        (c.link.within_source_threshold, c.link.household),
        (None, false)
    );

    // Blocking rules in the config replace Ward's, checked when loaded,
    // and name the pairs they find.
    let rules = "[[link.blocking]]\nname = \"phone\"\non = \"a.phone = b.phone\"\n\
                 [[link.blocking]]\nname = \"zip3+family\"\n\
                 on = \"substr(a.zip, 1, 3) = substr(b.zip, 1, 3) AND a.family = b.family\"\n";
    fs::write(&config_path, format!("{text}\n{rules}")).unwrap();
    let c = ward::PipelineConfig::load(&config_path).unwrap();
    assert_eq!(
        c.link
            .blocking
            .iter()
            .map(|r| r.0.as_str())
            .collect::<Vec<_>>(),
        ["phone", "zip3+family"]
    );
    run_ingest(&config_path).unwrap();
    let linkage = link::link(
        &Warehouse::new(&c.warehouse),
        &c.link,
        &link::Earlier::default(),
    )
    .unwrap();
    assert!(
        linkage
            .report
            .pairs_by_rule
            .keys()
            .all(|r| r == "phone" || r == "zip3+family"),
        "{:?}",
        linkage.report.pairs_by_rule
    );
    assert!(linkage.report.candidate_pairs > 0);
    for (bad, key) in [
        (
            "[[link.blocking]]\nname = \"x\"\non = \"a.phone = b.fone\"\n",
            "link.blocking.on",
        ),
        (
            "[[link.blocking]]\nname = \"x\"\non = \"a.phone = b.phone\"\n\
             [[link.blocking]]\nname = \"x\"\non = \"a.zip = b.zip\"\n",
            "link.blocking.name",
        ),
    ] {
        fs::write(&config_path, format!("{text}\n{bad}")).unwrap();
        let err = ward::PipelineConfig::load(&config_path).unwrap_err();
        assert!(err.to_string().contains(key), "{bad}: {err}");
    }

    // Comparisons in the config replace Ward's column by column; empty
    // levels leave a column out; mistakes name the key and the level.
    let comparisons = "[[link.comparison]]\ncolumn = \"zip\"\nlevels = [\"exact\", \"within 10\"]\n\
                       [[link.comparison]]\ncolumn = \"phone\"\nlevels = []\n";
    fs::write(&config_path, format!("{text}\n{comparisons}")).unwrap();
    let c = ward::PipelineConfig::load(&config_path).unwrap();
    let zip = c
        .link
        .comparisons
        .iter()
        .find(|c| c.column.name() == "zip")
        .unwrap();
    assert_eq!(zip.level_name(1), "within 10");
    assert!(
        c.link
            .comparisons
            .iter()
            .all(|c| c.column.name() != "phone")
    );
    assert_eq!(
        c.link.comparisons.len(),
        LinkOptions::default().comparisons.len() - 1
    );
    let linkage = link::link(
        &Warehouse::new(&c.warehouse),
        &c.link,
        &link::Earlier::default(),
    )
    .unwrap();
    assert!(!linkage.report.records_missing.contains_key("phone"));
    assert!(linkage.report.linked_persons > 0);
    for (bad, needle) in [
        (
            "column = \"postcode\"\nlevels = [\"exact\"]",
            "not a compared column",
        ),
        (
            "column = \"birth_date\"\nlevels = [\"prefix 4\"]",
            "not a level of birth_date",
        ),
        (
            "column = \"zip\"\nlevels = [\"exact\"]\nterm_frequency = true\n[[link.comparison]]\ncolumn = \"zip\"\nlevels = [\"exact\"]",
            "declared twice",
        ),
    ] {
        fs::write(
            &config_path,
            format!("{text}\n[[link.comparison]]\n{bad}\n"),
        )
        .unwrap();
        let err = ward::PipelineConfig::load(&config_path).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("link.comparison") && message.contains(needle),
            "{bad}: {message}"
        );
    }
}

/// A person keeps their id (and so their research id) from one published
/// run to the next when the record their id was derived from is withdrawn:
/// ids are carried forward from the previous run's links.
#[test]
fn person_ids_survive_a_withdrawn_first_record() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    // The withdrawn patient's facts become rejects (unknown_patient): more
    // than the default gate and data-quality check allow at this size.
    // A label of a record that is not staged: a linkage warning the run's
    // manifest (and report.html) lists.
    let text = fs::read_to_string(&config_path).unwrap();
    fs::write(
        config_path.parent().unwrap().join("labels.csv"),
        "source_a,source_patient_id_a,source_b,source_patient_id_b,decision\n\
         northside_clinic,gone,northside_clinic,AA0000002,match\n",
    )
    .unwrap();
    fs::write(
        &config_path,
        text + "\n[gates]\nmax_reject_rate = 0.2\n[link]\nlabels = \"labels.csv\"\n\
                [dq.checks.facts_patient_unknown]\nthreshold_pct = 20\n",
    )
    .unwrap();
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let first = run_all(&config);
    assert!(
        first
            .manifest
            .warnings
            .iter()
            .any(|w| w.starts_with("linkage: 1 label(s)")),
        "{:?}",
        first.manifest.warnings
    );
    let links = |run: &ward::RunReport| -> BTreeMap<(String, String), String> {
        link::read_person_links(&run.run_dir.join("core/person_link.parquet"))
            .unwrap()
            .into_iter()
            .map(|l| {
                (
                    (l.source.to_string(), l.source_patient_id.to_string()),
                    l.person_id.to_string(),
                )
            })
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

/// Hand-made cases of each kind of noise, added to the sample: a birth
/// date the hospital garbled, given and family names swapped, a
/// within-provider duplicate registration with a 7-digit identifier, and
/// twins (one also at the hospital) kept apart. `--explain`'s waterfall adds
/// up to the weight the linkage used.
#[test]
fn noisy_cases_link_on_the_evidence_they_have() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let data = tmp.path().join("sample_data");
    let append = |file: &str, rows: &str| append_lines(&data.join(file), rows);
    append(
        "northside_clinic/patients.csv",
        "ZZ0000901,Z901,Quentin,Abernathy-Vold,03/14/1962,M,White,Not Hispanic,77 Quarry Rd,Tulsa,OK,74103,918-555-0901,q.av@example.org,,Medicare\n\
         ZZ0000902,Z902,Marisol,Okonkwo-Lind,05/06/1980,F,White,Not Hispanic,12 Birch Ave,Reno,NV,89501,775-555-0902,,,Medicaid\n\
         ZZ0000903,Z903,Thaddeus,Villanueva-Ross,11/23/1955,M,White,Not Hispanic,5 Cedar Ct,Boise,ID,83702,208-555-0903,,5162373,Medicare\n\
         ZZ0000904,Z904,Thadeus,Villanueva-Ross,11/23/1955,M,White,Not Hispanic,5 Cedar Ct,Boise,ID,83702,208-555-0903,,5162373,Medicare\n\
         ZZ0000905,Z905,Rosalind,Featherstonehaugh,09/09/1999,F,White,Not Hispanic,3 Elm St,Provo,UT,84601,801-555-0905,,,Commercial\n\
         ZZ0000906,Z906,Evangeline,Featherstonehaugh,09/09/1999,F,White,Not Hispanic,3 Elm St,Provo,UT,84601,801-555-0905,,,Commercial\n",
    );
    append(
        "st_marys_hospital/pat_demo.csv",
        "ZB0000901|Y901|QUENTIN|ABERNATHY-VOLD|19621399|1|2106-3|2186-5|77 QUARRY RD|TULSA|OK|74103|9185550901\r\n\
         ZB0000902|Y902|OKONKWO-LIND|MARISOL|19800506|2|2106-3|2186-5|12 BIRCH AVE|RENO|NV|89501|7755550902\r\n\
         ZB0000905|Y905|ROSALIND|FEATHERSTONEHAUGH|19990909|2|2106-3|2186-5|3 ELM ST|PROVO|UT|84601|8015550905\r\n",
    );
    let report = run_ingest(&config_path).unwrap();
    let demo = report
        .files
        .iter()
        .find(|f| f.file == "pat_demo.csv")
        .unwrap();
    assert!(
        demo.values_flagged.get("BIRTH_DT: unrecognized_value") >= Some(&1),
        "the garbled birth date is counted: {:?}",
        demo.values_flagged
    );
    // ... and the patient staged without one.
    let staged = read_dir_batches(
        &tmp.path()
            .join("wh/staging/patient/source=st_marys_hospital"),
    );
    let ids = strings(&staged, "source_patient_id");
    let row = ids
        .iter()
        .position(|i| i.as_deref() == Some("ZB0000901"))
        .unwrap();
    let mut births = Vec::new();
    for b in &staged {
        let c = b.column_by_name("birth_date").unwrap();
        births.extend((0..c.len()).map(|i| c.is_null(i)));
    }
    assert!(births[row], "kept without a birth date");
    let partial = strings(&staged, "birth_date_partial");
    assert_eq!(
        partial[row].as_deref(),
        Some("1962"),
        "19621399: the year is kept for linkage, the month 13 is not"
    );
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let wh = Warehouse::new(&config.warehouse);
    let linkage = link::link(&wh, &config.link, &link::Earlier::default()).unwrap();
    let person = |source: &str, id: &str| {
        linkage
            .links
            .iter()
            .find(|l| l.source == source && l.source_patient_id == id)
            .unwrap_or_else(|| panic!("{source}:{id} was not staged"))
            .person_id
            .clone()
    };
    let (n, s) = ("northside_clinic", "st_marys_hospital");
    assert_eq!(
        person(n, "ZZ0000901"),
        person(s, "ZB0000901"),
        "no birth date"
    );
    assert_eq!(
        person(n, "ZZ0000902"),
        person(s, "ZB0000902"),
        "swapped names"
    );
    assert_eq!(
        person(n, "ZZ0000903"),
        person(n, "ZZ0000904"),
        "duplicate registration"
    );
    assert_eq!(
        person(n, "ZZ0000905"),
        person(s, "ZB0000905"),
        "a twin at two providers"
    );
    assert_ne!(person(n, "ZZ0000905"), person(n, "ZZ0000906"), "twins");
    assert!(linkage.report.within_source_merges >= 1);
    assert!(linkage.report.records_without_birth_date >= 1);
    assert!(linkage.report.records_missing["identifier"] < linkage.report.records);

    // The explanation's parts add up to the weight, and say why.
    let e = link::explain(&wh, &config.link, (n, "ZZ0000902"), (s, "ZB0000902"), None).unwrap();
    let sum: f64 = e.prior_weight + e.fields.iter().map(|f| f.weight).sum::<f64>();
    assert!((sum - e.weight).abs() < 1e-9);
    assert!(e.probability >= e.threshold && !e.household && e.blocked_by.is_some());
    let level = |field: &str| {
        e.fields
            .iter()
            .find(|f| f.field == field)
            .unwrap()
            .level
            .clone()
    };
    assert_eq!(level("given_name").as_deref(), Some("swapped"));
    assert_eq!(level("family_name"), None);
    // The garbled birth date is compared on the year it still shows.
    let garbled =
        link::explain(&wh, &config.link, (n, "ZZ0000901"), (s, "ZB0000901"), None).unwrap();
    let birth = garbled
        .fields
        .iter()
        .find(|f| f.field == "birth_date")
        .unwrap();
    assert!(birth.level.is_some() && birth.weight > 0.0, "{birth:?}");
    let twins = link::explain(&wh, &config.link, (n, "ZZ0000905"), (n, "ZZ0000906"), None).unwrap();
    assert!(
        twins.household && twins.probability < twins.threshold,
        "{twins:#?}"
    );
    let household = twins
        .fields
        .iter()
        .find(|f| f.field == "household")
        .unwrap();
    assert!(household.m.is_some() && household.u.is_some());
    assert!(link::explain(&wh, &config.link, (n, "nobody"), (s, "ZB0000902"), None).is_err());

    // Clerical review (owner-only), with the columns of a labels file; a
    // reviewer's labels are honoured by the next link.
    let review = tmp.path().join("wh/core/link_review.csv");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&review).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let listed = fs::read_to_string(&review).unwrap();
    assert!(
        listed.starts_with("source_a,source_patient_id_a,source_b,source_patient_id_b,decision,")
    );
    assert_eq!(
        linkage.report.review_pairs as usize,
        listed.lines().count() - 1
    );
    // With every candidate pair listed, the twins are, with the level that
    // kept them apart.
    let mut everything = config.link.clone();
    everything.review_threshold = 0.0;
    link::link(&wh, &everything, &link::Earlier::default()).unwrap();
    let listed = fs::read_to_string(&review).unwrap();
    assert!(
        listed.lines().any(|l| l.contains("ZZ0000905")
            && l.contains("ZZ0000906")
            && l.contains("household level")
            && l.ends_with(",no")),
        "{listed}"
    );
    let labels = tmp.path().join("labels.csv");
    fs::write(
        &labels,
        format!(
            "source_a,source_patient_id_a,source_b,source_patient_id_b,decision\n\
             {n},ZZ0000905,{n},ZZ0000906,match\n\
             {n},ZZ0000902,{s},ZB0000902,non_match\n\
             {n},gone,{s},ZB0000902,match\n"
        ),
    )
    .unwrap();
    let mut reviewed = config.link.clone();
    reviewed.labels = Some(labels.clone());
    let again = link::link(&wh, &reviewed, &link::Earlier::default()).unwrap();
    let person = |source: &str, id: &str| {
        again
            .links
            .iter()
            .find(|l| l.source == source && l.source_patient_id == id)
            .unwrap()
            .person_id
            .clone()
    };
    assert_eq!(person(n, "ZZ0000905"), person(n, "ZZ0000906"));
    assert_ne!(person(n, "ZZ0000902"), person(s, "ZB0000902"));
    assert_eq!(again.report.labelled_links, 1);
    assert!(again.report.labelled_refusals >= 1);
    assert!(
        again
            .report
            .warnings
            .iter()
            .any(|w| w.contains("1 label(s)"))
    );
    let rule = |id: &str| {
        again
            .links
            .iter()
            .filter(|l| l.source == n && (l.source_patient_id == id))
            .map(|l| l.rule.clone())
            .next()
            .flatten()
    };
    assert!(
        [rule("ZZ0000905"), rule("ZZ0000906")].contains(&Some("label".into())),
        "the labelled link is named"
    );
    // Contradictory labels: an error naming the line.
    fs::write(
        &labels,
        format!(
            "source_a,source_patient_id_a,source_b,source_patient_id_b,decision\n\
             {n},ZZ0000905,{n},ZZ0000906,match\n\
             {n},ZZ0000906,{n},ZZ0000905,non_match\n"
        ),
    )
    .unwrap();
    let err = link::link(&wh, &reviewed, &link::Earlier::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("labels.csv:3"), "{err}");
}

/// The generator's hard noise (swapped names, initials, missing birth
/// dates, spelled-out suffixes, duplicate registrations within a provider)
/// links nearly perfectly, and every record is scored.
#[test]
fn hard_noise_population_links_with_high_precision_and_recall() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen");
    ward_synth::synth(
        &ward_synth::SynthOptions {
            patients: 3000,
            providers: 3,
            seed: 11,
            out: out.clone(),
            bad_rate: 0.0,
            year: 2025,
            hard_noise: true,
        },
        &|_| {},
    )
    .unwrap();
    let config_path = out.join("ward.toml");
    let text = fs::read_to_string(&config_path)
        .unwrap()
        .replace("../warehouse", "../wh");
    fs::write(&config_path, text).unwrap();
    run_ingest(&config_path).unwrap();
    let config = ward::PipelineConfig::load(&config_path).unwrap();
    let wh = Warehouse::new(&config.warehouse);
    let linkage = link::link(&wh, &config.link, &link::Earlier::default()).unwrap();
    assert!(
        linkage.report.within_source_merges > 10,
        "{:?}",
        linkage.report
    );
    assert!(
        linkage.report.records_without_birth_date > 10,
        "{:?}",
        linkage.report
    );
    let e = link::evaluate(&linkage.links, &out.join("truth.csv")).unwrap();
    assert_eq!(e.records_not_linked, 0);
    assert!(e.precision.unwrap() > 0.99, "{e:?}");
    assert!(e.recall.unwrap() > 0.97, "{e:?}");
}
