//! Incremental nights: a stage whose inputs did not change takes the
//! current run's outputs, and what such a night publishes is exactly what
//! a full rebuild (`ward run --full`) publishes.

use std::collections::BTreeMap;
use std::fs;

use ward::PipelineConfig;
use ward::runs::Rebuild;

use datafusion::arrow::datatypes::Int64Type;

use ward::link::LinkMode;

use crate::common::{
    append_lines, copy_dir, copy_sample, derived, primitives, read_parquet, repo, run_all,
    run_queries, run_with, snapshot, text, ward,
};

/// The stages of a run that took their outputs from another run.
fn reused(run: &ward::RunReport) -> BTreeMap<String, String> {
    run.manifest
        .stages
        .iter()
        .filter_map(|s| Some((s.stage.clone(), s.reused_from.clone()?)))
        .collect()
}

fn stages(names: &[&str], from: &str) -> BTreeMap<String, String> {
    names
        .iter()
        .map(|s| (s.to_string(), from.to_string()))
        .collect()
}

/// The measures' counts, the summary and the data-quality counts of a run.
fn figures(run: &ward::RunReport) -> (Vec<ward::measure::Counts>, String, Vec<(String, u64, u64)>) {
    (
        run.measures.iter().map(|m| m.counts).collect(),
        format!("{:?}", run.summary),
        run.dq
            .iter()
            .map(|r| (format!("{}/{}", r.source, r.check), r.violating, r.checked))
            .collect(),
    )
}

#[test]
fn an_unchanged_night_takes_every_stage_and_publishes_what_a_full_rebuild_does() {
    let tmp = tempfile::tempdir().unwrap();
    let config = PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    let first = run_all(&config);
    assert!(
        reused(&first).is_empty(),
        "nothing to take on a first night"
    );
    for stage in [
        "link",
        "build",
        "build.observation",
        "dq",
        "measures",
        "deid",
    ] {
        assert!(first.manifest.fingerprints.contains_key(stage), "{stage}");
    }

    let second = run_all(&config);
    assert_eq!(
        reused(&second),
        stages(&["link", "build", "dq", "measures", "deid"], &first.run_id)
    );
    assert_eq!(second.manifest.fingerprints, first.manifest.fingerprints);
    // Taken files are the first run's own, byte for byte.
    let taken = |run: &ward::RunReport| -> Vec<(String, String)> {
        run.manifest
            .outputs
            .iter()
            .filter(|o| !o.path.starts_with("reports/") && o.path != "history.json")
            .map(|o| (o.path.clone(), o.sha256.clone()))
            .collect()
    };
    assert_eq!(taken(&second), taken(&first));
    assert_eq!(figures(&second), figures(&first));
    assert_eq!(second.research.tables, first.research.tables);
    // The reports are the second run's own: judged, dated and named anew.
    assert!(second.report_dir.ends_with(&second.run_id));
    assert!(second.dq.iter().all(|r| r.new_checked == 0));
    // (History is JSON: a rate comes back within a rounding of its last bit.)
    for r in second.dq.iter().filter(|r| r.rate_pct.is_some()) {
        let (baseline, rate) = (r.baseline_pct.unwrap(), r.rate_pct.unwrap());
        assert!(
            (baseline - rate).abs() < 1e-9,
            "{}/{}: the second night's baseline {baseline} is the first night's rate {rate}",
            r.source,
            r.check
        );
    }

    let full = run_with(&config, Rebuild::Full);
    assert!(reused(&full).is_empty(), "--full takes nothing");
    assert_eq!(full.manifest.fingerprints, first.manifest.fingerprints);
    assert_eq!(derived(&full.run_dir), derived(&second.run_dir));
    assert_eq!(figures(&full), figures(&second));
}

#[test]
fn the_next_day_without_deliveries_takes_every_fact_tables_research_copy() {
    // The research copy is dated (ages at the day of the data), so the
    // next day computes it again: the persons' table, not the facts'.
    let tmp = tempfile::tempdir().unwrap();
    let config = PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    let first = run_all(&config);
    let next_day = |rebuild: Rebuild| {
        let opts = ward::IngestOptions {
            today: crate::common::today().succ_opt().unwrap(),
            ..Default::default()
        };
        let key = ward::deid::resolve_key(&config.deid, |_| None).unwrap();
        let period = config.measurement_period.unwrap();
        ward::run(
            &config,
            &opts,
            &repo().join("queries"),
            period,
            &key,
            rebuild,
            &(),
        )
        .unwrap()
    };
    let second = next_day(Rebuild::Incremental);
    let deid = second.manifest.stages.last().unwrap();
    assert_eq!(deid.stage, "deid");
    assert_eq!(deid.reused_from, None);
    let facts: Vec<&str> = ward::link::build::fact_tables().map(|t| t.name()).collect();
    assert_eq!(deid.reused_tables, facts);
    assert_ne!(
        second.research.reference_date,
        first.research.reference_date
    );
    let full = next_day(Rebuild::Full);
    assert_eq!(derived(&full.run_dir), derived(&second.run_dir));
}

/// Appends to the sample clinic's results one more HbA1c (result id
/// `AAE000000020<id>`) of a patient it already sent, in the period.
fn add_hba1c(dir: &std::path::Path, id: &str) {
    let results = dir.join("sample_data/northside_clinic/results.csv");
    let mut text = fs::read_to_string(&results).unwrap();
    text.push_str(&format!(
        "AAE000000020{id},AA0000002,AAE000000020,05/03/2025 12:50,4548-4,Hemoglobin A1c,9.8,%\n"
    ));
    fs::write(&results, text).unwrap();
}

/// The observations of every person, as a detail of each person's row: a
/// measure that compares persons, so not person-local.
const POPULATION_WIDE: &str = "SELECT person_id, true AS initial_population, true AS denominator, \
     false AS denominator_exclusion, false AS numerator, \
     (SELECT count(*) FROM observation) AS observations FROM patient";

#[test]
fn new_facts_keep_the_linkage_and_rebuild_the_rest_as_a_full_rebuild_would() {
    let tmp = tempfile::tempdir().unwrap();
    let config = PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    let queries = tmp.path().join("queries");
    copy_dir(&repo().join("queries"), &queries);
    fs::write(queries.join("measures/wide.sql"), POPULATION_WIDE).unwrap();
    fs::write(
        queries.join("measures/wide.toml"),
        "id = \"WIDE\"\ntitle = \"Population-wide\"\nsteward = \"test\"\n\
         scoring = \"proportion\"\nimprovement = \"increase\"\n\
         description = \"Compares persons.\"\nperson_local = false\n",
    )
    .unwrap();
    let run_all = |config: &PipelineConfig| run_queries(config, &queries, Rebuild::Incremental);
    let run_with = |config: &PipelineConfig, r: Rebuild| run_queries(config, &queries, r);
    let first = run_all(&config);
    add_hba1c(tmp.path(), "R99");

    let second = run_all(&config);
    assert_eq!(reused(&second), stages(&["link"], &first.run_id));
    // The results file grew by one record: ingest staged only it, so the
    // observations are appended to and the other tables taken.
    let results = second
        .ingest
        .files
        .iter()
        .find(|f| f.source == "northside_clinic" && f.file == "results.csv")
        .unwrap();
    assert_eq!((results.rows_read, results.rows_accepted), (1, 1));
    let build = &second.manifest.stages[2];
    assert_eq!(build.stage, "build");
    let mut tables: Vec<&str> = ward::link::build::fact_tables().map(|t| t.name()).collect();
    tables.retain(|t| *t != "observation");
    assert_eq!(build.reused_tables, tables);
    assert_eq!(build.appended_tables, ["observation"]);
    // Their research tables are taken too (the full rebuild below checks
    // them against what it computes).
    let deid = second.manifest.stages.last().unwrap();
    assert_eq!(deid.stage, "deid");
    assert_eq!(deid.reused_tables, tables);
    assert_eq!(
        second.research.tables,
        first
            .research
            .tables
            .iter()
            .map(|t| {
                let mut t = t.clone();
                if t.table == "observation" {
                    t.rows_in += 1;
                    t.rows_out += 1;
                }
                t
            })
            .collect::<Vec<_>>()
    );
    let fp = |run: &ward::RunReport, stage: &str| run.manifest.fingerprints[stage].clone();
    assert_eq!(fp(&second, "link"), fp(&first, "link"));
    assert_eq!(fp(&second, "deid.facts"), fp(&first, "deid.facts"));
    for stage in ["build", "dq", "measures", "deid"] {
        assert_ne!(fp(&second, stage), fp(&first, stage), "{stage}");
    }
    assert_eq!(
        second.manifest.core["observation"],
        first.manifest.core["observation"] + 1
    );
    // The data-quality counts of the sources that sent nothing are kept.
    let dq = &second.manifest.stages[3];
    assert_eq!(dq.stage, "dq");
    let mut others: Vec<String> = config
        .sources
        .iter()
        .map(|s| s.name.clone())
        .filter(|s| s != "northside_clinic")
        .collect();
    others.sort();
    assert!(!others.is_empty());
    assert_eq!(dq.reused_sources, others);
    // Tonight's rows are the appended record, not the whole file.
    let tonight = |check: &str| {
        let r = second
            .dq
            .iter()
            .find(|r| r.check == check && r.source == "northside_clinic")
            .unwrap();
        (r.new_checked, r.checked)
    };
    let (new, all) = tonight("hba1c_converted");
    assert_eq!(new, 1);
    assert!(all > 1);
    assert_eq!(tonight("observation_code_invalid").0, 1);
    // The measures are computed for the one person with a new fact; the
    // others keep the first night's rows, but for the measure that is not
    // person-local: every person's row of it counts the new observation.
    let measures = &second.manifest.stages[4];
    assert_eq!(measures.stage, "measures");
    assert_eq!(
        measures.recomputed,
        Some(ward::runs::Recomputed {
            persons: 1,
            of: first.manifest.core["person"],
            rest_from: first.run_id.clone(),
        })
    );
    let observations = |run: &ward::RunReport| {
        let mart = run.run_dir.join("marts/measure_patient/WIDE.parquet");
        let counts = primitives::<Int64Type>(&read_parquet(&mart), "observations");
        assert!(!counts.is_empty());
        counts
    };
    let before = first.manifest.core["observation"] as i64;
    assert!(observations(&first).iter().all(|c| *c == Some(before)));
    assert!(observations(&second).iter().all(|c| *c == Some(before + 1)));
    // The care-gap lists of the providers the person has no record at are
    // the first night's files (the full rebuild below checks every list).
    let taken = taken_files(&first.care_gaps, &second.care_gaps);
    assert!(!taken.contains(&"care_gaps_northside_clinic.csv".to_string()));
    // So are the marts the person has no row in (the full rebuild below
    // compares every mart); not the one computed for everyone.
    let marts = |run: &ward::RunReport| -> Vec<std::path::PathBuf> {
        let dir = fs::read_dir(run.run_dir.join("marts/measure_patient")).unwrap();
        dir.map(|e| e.unwrap().path()).collect()
    };
    let taken = taken_files(&marts(&first), &marts(&second));
    assert!(!taken.contains(&"WIDE.parquet".to_string()));

    let full = run_with(&config, Rebuild::Full);
    assert!(full.manifest.stages.iter().all(|s| s.recomputed.is_none()));
    assert!(
        full.manifest
            .stages
            .iter()
            .all(|s| s.reused_tables.is_empty())
    );
    let json = |run: &ward::RunReport| serde_json::to_value(&run.research).unwrap();
    assert_eq!(json(&full), json(&second));
    assert_eq!(derived(&full.run_dir), derived(&second.run_dir));
    assert_eq!(figures(&full), figures(&second));
    // A fact the core already holds, reported again later in the same
    // file (another id, the same result): its row does not change, so
    // every core table is taken and nothing is computed.
    add_hba1c(tmp.path(), "R98");
    let third = run_all(&config);
    assert_eq!(
        third.manifest.stages[2].reused_from.as_deref(),
        Some(full.run_id.as_str())
    );
    assert_eq!(
        third.manifest.stages[4]
            .recomputed
            .as_ref()
            .map(|r| r.persons),
        Some(0)
    );
    assert_eq!(derived(&third.run_dir), derived(&full.run_dir));
    // A mart merged from two nights is the file a full night writes.
    for m in &second.measures {
        let mart = format!("marts/measure_patient/{}.parquet", m.key());
        let sha = |run: &ward::RunReport| {
            run.manifest
                .outputs
                .iter()
                .find(|o| o.path == mart)
                .map(|o| o.sha256.clone())
        };
        assert!(sha(&second).is_some(), "{mart}");
        assert_eq!(sha(&second), sha(&full), "{mart}");
    }
}

/// The names of the files of `now` that are the same files as `then`'s of
/// that name (hard-linked: one inode), checked to be some but not all, the
/// names being the same in both.
fn taken_files(then: &[std::path::PathBuf], now: &[std::path::PathBuf]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let inodes = |paths: &[std::path::PathBuf]| -> BTreeMap<String, u64> {
        paths
            .iter()
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, fs::metadata(p).unwrap().ino())
            })
            .collect()
    };
    let (then, now) = (inodes(then), inodes(now));
    assert_eq!(
        then.keys().collect::<Vec<_>>(),
        now.keys().collect::<Vec<_>>()
    );
    let taken: Vec<String> = now
        .iter()
        .filter(|(name, ino)| then.get(*name) == Some(ino))
        .map(|(name, _)| name.clone())
        .collect();
    assert!(
        !taken.is_empty() && taken.len() < now.len(),
        "{taken:?} of {now:?}"
    );
    taken
}

/// Delivers to the sample clinic a new results file `name` with one HbA1c
/// (result id `id`) of a patient it already sent, at `time`.
fn deliver_hba1c(dir: &std::path::Path, name: &str, id: &str, time: &str) {
    fs::write(
        dir.join("sample_data/northside_clinic").join(name),
        format!(
            "ResultID,PatientID,VisitID,ResultDate,LOINC,TestName,Result,Units\n\
             {id},AA0000002,AAE000000020,{time},4548-4,Hemoglobin A1c,9.1,%\n"
        ),
    )
    .unwrap();
}

#[test]
fn a_new_file_of_facts_is_appended_and_publishes_what_a_full_rebuild_does() {
    let tmp = tempfile::tempdir().unwrap();
    let config = PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    let first = run_all(&config);
    deliver_hba1c(tmp.path(), "results_2.csv", "N1", "06/03/2025 09:15");

    let second = run_all(&config);
    assert_eq!(reused(&second), stages(&["link"], &first.run_id));
    let others: Vec<&str> = ward::link::build::fact_tables()
        .map(|t| t.name())
        .filter(|t| *t != "observation")
        .collect();
    // The observations keep the first night's files and gain one.
    let build = &second.manifest.stages[2];
    assert_eq!(build.stage, "build");
    assert_eq!(build.reused_tables, others);
    assert_eq!(build.appended_tables, ["observation"]);
    let appended = ward::link::build::appended_file(&second.run_id);
    let files = |run: &ward::RunReport, dir: &str| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(run.run_dir.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let mut expected = files(&first, "core/observation");
    expected.push(appended.clone());
    assert_eq!(files(&second, "core/observation"), expected);
    assert_eq!(files(&second, "research/observation"), expected);
    assert_eq!(
        second.manifest.core["observation"],
        first.manifest.core["observation"] + 1
    );
    // Research files of the first night's core files are taken; the new
    // one's are computed.
    let deid = second.manifest.stages.last().unwrap();
    assert_eq!(deid.stage, "deid");
    assert_eq!(deid.reused_tables, others);
    assert_eq!(deid.appended_tables, ["observation"]);
    // One person has a new fact.
    assert_eq!(
        second.manifest.stages[4]
            .recomputed
            .as_ref()
            .map(|r| r.persons),
        Some(1)
    );

    let full = run_with(&config, Rebuild::Full);
    assert!(
        full.manifest
            .stages
            .iter()
            .all(|s| s.appended_tables.is_empty())
    );
    assert!(!files(&full, "core/observation").contains(&appended));
    let json = |run: &ward::RunReport| serde_json::to_value(&run.research).unwrap();
    assert_eq!(json(&full), json(&second));
    assert_eq!(derived(&full.run_dir), derived(&second.run_dir));
    assert_eq!(figures(&full), figures(&second));

    // A file repeating a fact the core holds (another id, the same
    // result) that comes first in (source, file, line) order: the fact's
    // row takes its columns, so that person's observations are built
    // again, into what a full rebuild holds.
    deliver_hba1c(tmp.path(), "results-0.csv", "N2", "06/03/2025 09:15");
    let third = run_all(&config);
    let build = &third.manifest.stages[2];
    assert_eq!(build.reused_tables, others);
    assert_eq!(build.appended_tables, ["observation"]);
    let relinked = ward::link::build::relinked_file(&third.run_id);
    assert!(files(&third, "core/observation").contains(&relinked));
    let full = run_with(&config, Rebuild::Full);
    assert_eq!(derived(&third.run_dir), derived(&full.run_dir));
    assert_ne!(derived(&third.run_dir), derived(&second.run_dir));
    // Reported once more, last: nothing changes, every table is taken.
    deliver_hba1c(tmp.path(), "results_4.csv", "N3", "06/03/2025 09:15");
    let fourth = run_all(&config);
    assert_eq!(
        fourth.manifest.stages[2].reused_from.as_deref(),
        Some(full.run_id.as_str())
    );
    assert_eq!(derived(&fourth.run_dir), derived(&full.run_dir));
}

#[test]
fn an_output_changed_since_its_run_is_computed_again_not_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let config = PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    let first = run_all(&config);
    let person = first.run_dir.join("core/person.parquet");
    let mut bytes = fs::read(&person).unwrap();
    bytes.push(0);
    fs::write(&person, bytes).unwrap();

    let second = run_all(&config);
    let warning = second
        .manifest
        .warnings
        .iter()
        .find(|w| w.starts_with("stage link: the outputs of run"))
        .expect("a warning names the stage and the file");
    assert!(
        warning.contains("person.parquet")
            && warning.contains("differs from what its run's manifest recorded"),
        "{warning}"
    );
    // Linkage is computed again; it gives every record its person again,
    // so the core tables are taken, and what reads them is unchanged.
    assert_eq!(
        reused(&second),
        stages(&["build", "dq", "measures", "deid"], &first.run_id)
    );
    let linkage = second.manifest.linkage.as_ref().unwrap();
    assert_eq!(
        (linkage.mode, linkage.links_changed),
        (LinkMode::Incremental, Some(0))
    );
    let full = run_with(&config, Rebuild::Full);
    assert_eq!(derived(&full.run_dir), derived(&second.run_dir));
}

#[test]
fn a_care_gap_list_changed_since_its_run_has_every_list_written_anew() {
    let tmp = tempfile::tempdir().unwrap();
    let config = PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    let first = run_all(&config);
    let list = first
        .care_gaps
        .first()
        .expect("the sample has care gaps")
        .clone();
    let original = fs::read_to_string(&list).unwrap();
    fs::remove_file(&list).unwrap();
    fs::write(&list, format!("{original}edited\n")).unwrap();

    // Nothing else changed: every other stage is taken, and the lists are
    // written, as a full rebuild writes them.
    let second = run_all(&config);
    assert_eq!(
        reused(&second),
        stages(&["link", "build", "dq", "measures", "deid"], &first.run_id)
    );
    let name = list.file_name().unwrap();
    let again = second
        .care_gaps
        .iter()
        .find(|p| p.file_name() == Some(name))
        .unwrap();
    assert_eq!(fs::read_to_string(again).unwrap(), original);
    let full = run_with(&config, Rebuild::Full);
    assert_eq!(derived(&full.run_dir), derived(&second.run_dir));
}

#[test]
fn a_mart_changed_since_its_run_is_not_kept_for_anyone() {
    let tmp = tempfile::tempdir().unwrap();
    let config = PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    let first = run_all(&config);
    // A mart edited after its run (a row dropped), then a new fact.
    let mart = first.run_dir.join("marts/measure_patient/DM-PREV.parquet");
    let batches = read_parquet(&mart);
    let edited = batches[0].slice(1, batches[0].num_rows() - 1);
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(
        fs::File::create(&mart).unwrap(),
        edited.schema(),
        None,
    )
    .unwrap();
    w.write(&edited).unwrap();
    w.close().unwrap();
    add_hba1c(tmp.path(), "R99");

    let second = run_all(&config);
    let measures = &second.manifest.stages[4];
    assert_eq!(measures.stage, "measures");
    assert_eq!(measures.recomputed, None, "computed for every person");
    let full = run_with(&config, Rebuild::Full);
    assert_eq!(derived(&full.run_dir), derived(&second.run_dir));
}

#[test]
fn the_cli_says_what_it_took_and_full_takes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let config = copy_sample(tmp.path());
    let run = |args: &[&str]| {
        let out = ward(
            tmp.path(),
            &[&["--config", config.to_str().unwrap()], args].concat(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let first = run(&["run"]);
    assert!(!first.contains("inputs unchanged"), "{first}");
    let second = run(&["run"]);
    assert!(
        second.contains("inputs unchanged since run")
            && second.contains("link, build, dq, measures"),
        "{second}"
    );
    let full = run(&["run", "--full"]);
    assert!(!full.contains("inputs unchanged"), "{full}");
    // New facts of one clinic: what was computed for whom.
    add_hba1c(tmp.path(), "R99");
    let facts = run(&["run"]);
    assert!(
        facts.contains("measures: computed for the 1 of ")
            && facts.contains(
                "dq: counts kept from the previous run for the sources whose files did not change: lakeside_endo, st_marys_hospital"
            ),
        "{facts}"
    );
    // Per check and source: the clinic's checks of its results either add
    // tonight's row or count again; everything else is kept.
    let line = facts
        .lines()
        .find_map(|l| l.strip_prefix("dq: of the previous run's counts (per check and source), "))
        .unwrap_or_else(|| panic!("{facts}"));
    let numbers: Vec<u64> = line
        .split(", ")
        .map(|part| part.split(' ').next().unwrap().parse().unwrap())
        .collect();
    let checks = ward::dq::catalog(&repo().join("queries")).unwrap().len() as u64;
    assert_eq!(numbers.iter().sum::<u64>(), 3 * checks, "{line}");
    assert!(numbers.iter().all(|n| *n > 0), "{line}");
    assert!(numbers[0] > 2 * checks, "{line}");
}

/// The published linkage of a run: links, persons, review list and kept
/// state, each as sorted rows or text.
fn linkage_files(run: &ward::RunReport) -> BTreeMap<String, Vec<String>> {
    derived(&run.run_dir)
        .into_iter()
        .filter(|(path, _)| path.starts_with("core/") && !path[5..].contains('/'))
        .collect()
}

#[test]
fn new_patients_are_linked_with_the_kept_model_as_a_full_rebuild_would() {
    let tmp = tempfile::tempdir().unwrap();
    let config = PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    let first = run_all(&config);
    let mode = |run: &ward::RunReport| {
        let l = run.manifest.linkage.as_ref().unwrap();
        (l.mode, l.blocked_records, l.model_records)
    };
    let records = first.manifest.linkage.as_ref().unwrap().records;
    assert_eq!(mode(&first), (LinkMode::Fitted, records, records));
    assert!(linkage_files(&first).contains_key("core/link_state.json"));

    // A new person at the clinic, and a clinic patient seen for the first
    // time at the endocrinologist's: one joins a person the first night
    // found, through pairs only tonight's blocking can find.
    let data = tmp.path().join("sample_data");
    let clinic = fs::read_to_string(data.join("northside_clinic/patients.csv")).unwrap();
    let known = clinic.lines().nth(1).unwrap();
    let known_id = known.split(',').next().unwrap().to_string();
    append_lines(
        &data.join("northside_clinic/patients.csv"),
        "ZZ0000911,Z911,Oriana,Velasquez-Holt,02/17/1971,F,White,Not Hispanic,9 Pine Rd,Mesa,AZ,85201,480-555-0911,,,Medicare\n",
    );
    append_lines(
        &data.join("lakeside_endo/patients.csv"),
        &format!("{}\n", known.replacen(&known_id, "AC0000991", 1)),
    );
    // The new patient's first result.
    append_lines(
        &data.join("northside_clinic/results.csv"),
        "ZZE000000911R1,ZZ0000911,,06/04/2025 09:15,4548-4,Hemoglobin A1c,8.7,%\n",
    );
    let second = run_all(&config);
    assert_eq!(mode(&second), (LinkMode::Incremental, 2, records));
    // Every earlier record kept its person: the core tables are the first
    // night's, the observations appended to.
    let linkage = second.manifest.linkage.as_ref().unwrap();
    assert_eq!(linkage.links_changed, Some(0));
    let build = &second.manifest.stages[2];
    assert_eq!(build.stage, "build");
    assert_eq!(build.appended_tables, ["observation"]);
    assert_eq!(
        build.reused_tables.len(),
        ward::link::build::fact_tables().count() - 1
    );
    assert_eq!(
        second.manifest.core["observation"],
        first.manifest.core["observation"] + 1
    );
    let person = |run: &ward::RunReport, source: &str, id: &str| {
        ward::link::read_person_links(&run.run_dir.join("core/person_link.parquet"))
            .unwrap()
            .into_iter()
            .find(|l| l.source == source && l.source_patient_id == id)
            .unwrap()
            .person_id
    };
    assert_eq!(
        person(&second, "lakeside_endo", "AC0000991"),
        person(&first, "northside_clinic", &known_id),
        "the new record joins the person its clinic record is"
    );
    // A full rebuild blocks every record again with the kept model: the
    // same pairs, persons, review list and state.
    let full = run_with(&config, Rebuild::Full);
    assert_eq!(mode(&full), (LinkMode::ModelKept, records + 2, records));
    assert_eq!(linkage_files(&full), linkage_files(&second));
    // (Ids carried forward count against each run's previous one.)
    let report = |run: &ward::RunReport| {
        let mut l = run.manifest.linkage.clone().unwrap();
        (l.mode, l.blocked_records, l.ids_carried_forward) = (LinkMode::Fitted, 0, 0);
        serde_json::to_value(l).unwrap()
    };
    assert_eq!(report(&full), report(&second));
    assert_eq!(derived(&full.run_dir), derived(&second.run_dir));
    // The measures are computed for the new person alone: the person the
    // endocrinologist's record joined changed only in columns no measure
    // reads (its record count and providers), and keeps its results.
    let recomputed = second.manifest.stages[4].recomputed.as_ref().unwrap();
    assert_eq!(recomputed.persons, 1, "{recomputed:?}");
    // Two sources grew and the links changed: the checks of the links
    // count every source once, the grown sources' other checks again.
    assert_eq!(figures(&full), figures(&second));

    // A changed record takes its pairs with it: every record is blocked
    // again, still with the kept model.
    let changed = clinic.lines().nth(2).unwrap();
    let moved = changed.replacen("Maple Ln", "Cedar Ct", 1);
    assert_ne!(moved, changed);
    fs::write(
        data.join("northside_clinic/patients.csv"),
        fs::read_to_string(data.join("northside_clinic/patients.csv"))
            .unwrap()
            .replacen(changed, &moved, 1),
    )
    .unwrap();
    let third = run_all(&config);
    assert_eq!(mode(&third), (LinkMode::ModelKept, records + 2, records));
    // `--refit`, or records grown past refit_growth, fit the model anew.
    let refit = run_with(&config, Rebuild::Refit);
    assert_eq!(mode(&refit), (LinkMode::Fitted, records + 2, records + 2));
    let mut eager = config.clone();
    eager.link.refit_growth = 0.0;
    append_lines(
        &data.join("northside_clinic/patients.csv"),
        "ZZ0000912,Z912,Ansel,Brightwater,11/02/1988,M,White,Not Hispanic,4 Elm Rd,Mesa,AZ,85201,480-555-0912,,,Medicare\n",
    );
    let grown = run_all(&eager);
    assert_eq!(mode(&grown), (LinkMode::Fitted, records + 3, records + 3));
    // A kept model that is not what its run wrote is not used: the next
    // linkage fits anew and the manifest says why.
    let state = grown.run_dir.join("core/link_state.json");
    let mut bytes = fs::read(&state).unwrap();
    bytes.push(b' ');
    fs::remove_file(&state).unwrap();
    fs::write(&state, bytes).unwrap();
    append_lines(
        &data.join("northside_clinic/patients.csv"),
        "ZZ0000913,Z913,Imelda,Quarrington,05/06/1979,F,White,Not Hispanic,7 Ash Rd,Mesa,AZ,85201,480-555-0913,,,Medicare\n",
    );
    let after = run_all(&config);
    assert_eq!(mode(&after), (LinkMode::Fitted, records + 4, records + 4));
    assert!(
        after.manifest.warnings.iter().any(|w| w
            .starts_with("linkage: the kept model is not what its run wrote")
            && w.contains("link_state.json")),
        "{:?}",
        after.manifest.warnings
    );
}

#[test]
fn persons_a_reviewer_joins_have_their_core_rows_built_again_and_no_one_else() {
    let tmp = tempfile::tempdir().unwrap();
    let config = PipelineConfig::load(&copy_sample(tmp.path())).unwrap();
    run_all(&config);
    // A reviewer says two of the clinic's patients are one person.
    let labels = tmp.path().join("labels.csv");
    fs::write(
        &labels,
        "source_a,source_patient_id_a,source_b,source_patient_id_b,decision\n\
         northside_clinic,AA0000002,northside_clinic,AA0000003,match\n",
    )
    .unwrap();
    let mut reviewed = config.clone();
    reviewed.link.labels = Some(labels);
    let second = run_all(&reviewed);
    let linkage = second.manifest.linkage.as_ref().unwrap();
    assert_eq!(
        (linkage.mode, linkage.blocked_records),
        (LinkMode::Incremental, 0)
    );
    // The records of one of the two persons moved to the other.
    assert!(linkage.links_changed.is_some_and(|n| n >= 1), "{linkage:?}");
    // No core table is built whole: the two persons' rows are built again
    // in the tables that hold them, the others are taken.
    let build = &second.manifest.stages[2];
    assert_eq!(build.stage, "build");
    assert!(!build.appended_tables.is_empty());
    assert!(build.appended_tables.iter().any(|t| t == "observation"));
    assert_eq!(
        build.appended_tables.len() + build.reused_tables.len(),
        ward::link::build::fact_tables().count()
    );
    // The measures are computed for the persons whose rows changed.
    let measures = &second.manifest.stages[4];
    let recomputed = measures.recomputed.as_ref().unwrap();
    assert!((1..=2).contains(&recomputed.persons), "{recomputed:?}");
    // So are their research rows: the research files of the core files
    // written anew, the others are taken.
    let deid = second.manifest.stages.last().unwrap();
    assert_eq!(deid.stage, "deid");
    assert_eq!(deid.appended_tables, build.appended_tables);
    let full = run_with(&reviewed, Rebuild::Full);
    assert_eq!(derived(&full.run_dir), derived(&second.run_dir));
    assert_eq!(figures(&full), figures(&second));
    let research = |run: &ward::RunReport| serde_json::to_value(&run.research).unwrap();
    assert_eq!(research(&full), research(&second));
    // Past the most persons to build again, a table is left to be built
    // whole, untouched.
    let core = second.run_dir.join("core/observation");
    let before = snapshot(&core);
    let warehouse =
        ward::warehouse::Warehouse::new(&reviewed.warehouse).with_output(&second.run_dir);
    let persons: std::collections::BTreeSet<String> =
        ward::link::read_person_links(&second.run_dir.join("core/person_link.parquet"))
            .unwrap()
            .into_iter()
            .take(1)
            .map(|l| l.person_id.to_string())
            .collect();
    let update = ward::link::build::update_table(
        &warehouse,
        ward::schema::Table::Observation,
        Vec::new(),
        &persons,
        "later",
        0,
    )
    .unwrap();
    assert_eq!(update, ward::link::build::Update::BuildWhole);
    assert_eq!(snapshot(&core), before);
}
