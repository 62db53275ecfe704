//! Ingest on real files: the bundled sample, bad input of every kind,
//! idempotence, replacement, and Synthea's CSV export from ../shared/data.

use std::fs;
use std::path::{Path, PathBuf};

use crate::common::*;
use ward::ingest::FileStatus;
use ward::schema::Table;

/// The deliberately bad rows of sample_data/, as its generator listed them.
fn planted() -> Vec<(String, String, u64, String)> {
    let mut rows: Vec<_> = csv::Reader::from_path(repo().join("sample_data/expected_rejects.csv"))
        .unwrap()
        .records()
        .map(|r| {
            let r = r.unwrap();
            (
                r[0].to_string(),
                r[1].to_string(),
                r[2].parse().unwrap(),
                r[3].to_string(),
            )
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn sample_loads_every_provider_and_rejects_exactly_the_planted_rows() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let report = run_ingest(&config).unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    assert_eq!(report.files.len(), 27);
    assert!(report.files.iter().all(|f| f.status == FileStatus::Loaded));

    let wh = dir.path().join("wh");
    let expected = planted();
    assert!(expected.len() > 10);
    assert_eq!(reject_keys(&wh), expected);

    // Reconciliation: per file and against what is on disk.
    for f in &report.files {
        assert_eq!(
            f.rows_read,
            f.rows_accepted + f.rows_rejected,
            "{}/{}",
            f.source,
            f.file
        );
    }
    let accepted: u64 = report.files.iter().map(|f| f.rows_accepted).sum();
    let rejected: u64 = report.files.iter().map(|f| f.rows_rejected).sum();
    let staged: usize = Table::ALL
        .iter()
        .map(|t| rows(&read_dir_batches(&wh.join("staging").join(t.name()))))
        .sum();
    assert_eq!(staged as u64, accepted);
    assert_eq!(
        rows(&read_dir_batches(&wh.join("rejects"))) as u64,
        rejected
    );

    // Every provider has patients and observations in staging.
    for source in ["northside_clinic", "lakeside_endo", "st_marys_hospital"] {
        for table in [Table::Patient, Table::Observation] {
            let d = wh
                .join("staging")
                .join(table.name())
                .join(format!("source={source}"));
            assert!(rows(&read_dir_batches(&d)) > 0, "{source} {}", table.name());
        }
    }
}

#[test]
fn sample_values_are_normalized() {
    let (dir, _) = ingested_sample();
    let obs = read_dir_batches(&dir.path().join("wh/staging/observation"));
    let codes = strings(&obs, "code");
    let units = strings(&obs, "unit");
    let sources = strings(&obs, "source");
    let values = f64s(&obs, "value_num");
    let value_codes = strings(&obs, "value_code");
    let mut ifcc = 0;
    for i in 0..codes.len() {
        match codes[i].as_deref() {
            // The hospital reports HbA1c in mmol/mol; staging holds %.
            Some("59261-8") => {
                ifcc += 1;
                assert_eq!(units[i].as_deref(), Some("%"));
                let v = values[i].unwrap();
                assert!((3.0..=20.0).contains(&v), "{v}");
            }
            Some("4548-4") => assert_eq!(units[i].as_deref(), Some("%")),
            Some("8480-6") | Some("8462-4") => assert_eq!(units[i].as_deref(), Some("mm[Hg]")),
            // The hospital reports glucose in mmol/L; staging holds mg/dL
            // (inpatient lows below 40 included).
            Some("2345-7") => {
                assert_eq!(units[i].as_deref(), Some("mg/dL"));
                let v = values[i].unwrap();
                assert!((25.0..=460.0).contains(&v), "{v}");
            }
            Some("39156-5") => assert_eq!(units[i].as_deref(), Some("kg/m2")),
            Some("8302-2") => assert_eq!(units[i].as_deref(), Some("cm")),
            Some("29463-7") => assert_eq!(units[i].as_deref(), Some("kg")),
            Some("58453-2") => assert_eq!(units[i].as_deref(), Some("ng/mL")),
            // A mammogram is a report without a value.
            Some("24606-6") => assert!(values[i].is_none() && value_codes[i].is_none()),
            // Depression screenings and macular exams: a coded finding.
            Some("73831-0" | "73832-8" | "32451-7") => assert!(value_codes[i].is_some()),
            other => panic!("unexpected code {other:?}"),
        }
        assert!(sources[i].is_some());
    }
    assert!(ifcc > 0);

    let pats = read_dir_batches(&dir.path().join("wh/staging/patient"));
    for s in strings(&pats, "sex") {
        assert!(matches!(s.as_deref(), Some("female" | "male")), "{s:?}");
    }
    for z in strings(&pats, "postal_code").into_iter().flatten() {
        assert_eq!(z.len(), 5, "{z}");
    }
    let race = strings(&pats, "race");
    assert!(
        race.iter()
            .any(|r| r.as_deref() == Some("black_or_african_american"))
    );
    // Hospital diagnoses: ICD-10-CM dotted, and the SNOMED column as a second coding.
    let cond = read_dir_batches(
        &dir.path()
            .join("wh/staging/condition/source=st_marys_hospital"),
    );
    let codes = strings(&cond, "code");
    assert!(codes.iter().any(|c| {
        c.as_deref()
            .is_some_and(|c| c.starts_with("E1") && c.contains('.'))
    }));
    assert!(!codes.iter().any(|c| {
        c.as_deref()
            .is_some_and(|c| c.starts_with('E') && !c.contains('.'))
    }));
    assert_eq!(
        list_len(&cond[0], "codings", 0),
        2,
        "ICD-10-CM and SNOMED CT"
    );
}

#[test]
fn slices_of_any_size_stage_what_whole_files_stage() {
    // Slices of one record: every duplicate row or patient id is found
    // across slices, and every bad-input case is met at a slice's edge.
    let load = |source: fn(&Path) -> PathBuf, slice_records: Option<usize>| {
        let dir = tempfile::tempdir().unwrap();
        let config = ward::PipelineConfig::load(&source(dir.path())).unwrap();
        let opts = ward::IngestOptions {
            today: today(),
            slice_records,
            ..Default::default()
        };
        let report = ward::ingest::ingest(&config.warehouse, &config.sources, &opts, &()).unwrap();
        let root = dir.path().display().to_string();
        let files: Vec<_> = report
            .files
            .iter()
            .map(|f| {
                // Failures name the file, under this test's own folder.
                let detail = f.detail.as_ref().map(|d| d.replace(&root, ""));
                let counts = (f.rows_read, f.rows_accepted, f.rows_rejected);
                (f.file.clone(), f.status, detail, counts)
            })
            .collect();
        let wh = dir.path().join("wh");
        let staged: Vec<_> = Table::ALL
            .iter()
            .map(|t| read_dir_batches(&wh.join("staging").join(t.name())))
            .collect();
        (files, staged, reject_keys(&wh))
    };
    for source in [copy_sample, bad_input_source] {
        let whole = load(source, None);
        let sliced = load(source, Some(1));
        assert_eq!(sliced.0, whole.0);
        assert_eq!(sliced.2, whole.2);
        for (t, (a, b)) in Table::ALL.iter().zip(sliced.1.iter().zip(&whole.1)) {
            let concat = |b: &[datafusion::arrow::array::RecordBatch]| {
                datafusion::arrow::compute::concat_batches(&t.schema(), b).unwrap()
            };
            assert_eq!(concat(a), concat(b), "{}", t.name());
        }
    }
    let sample = load(copy_sample, Some(1));
    assert_eq!(sample.2, planted());
}

#[test]
fn staged_files_keep_statistics_where_queries_filter() {
    use datafusion::parquet::basic::Encoding;
    use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
    let (dir, _) = ingested_sample();
    let staged = dir.path().join("wh/staging/observation");
    let file = fs::read_dir(staged.read_dir().unwrap().next().unwrap().unwrap().path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let reader = SerializedFileReader::new(fs::File::open(&file).unwrap()).unwrap();
    let chunks = reader.metadata().row_group(0).columns().to_vec();
    let chunk = |name: &str| {
        chunks
            .iter()
            .find(|c| c.column_path().string() == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    for name in [
        "code",
        "code_system",
        "unit",
        "effective_time",
        "value_num",
        "value_code",
        // Extracts written patient by patient: a few patients' rows are
        // found by the pages' ranges (persons built again).
        "source_patient_id",
    ] {
        assert!(chunk(name).statistics().is_some(), "{name}");
    }
    for name in ["source_encounter_id", "description"] {
        assert!(chunk(name).statistics().is_none(), "{name}");
    }
    let dictionary = |name| {
        chunk(name)
            .encodings()
            .any(|e| e == Encoding::RLE_DICTIONARY)
    };
    assert!(dictionary("code") && !dictionary("source_line"));
}

fn assert_all_unchanged(report: &ward::IngestReport) {
    assert!(
        report
            .files
            .iter()
            .all(|f| f.status == FileStatus::Unchanged),
        "{:?}",
        report.files
    );
}

#[test]
fn second_run_changes_nothing() {
    let (dir, config) = ingested_sample();
    let before = snapshot(&dir.path().join("wh"));
    let report = run_ingest(&config).unwrap();
    assert_all_unchanged(&report);
    assert_eq!(snapshot(&dir.path().join("wh")), before);
}

#[test]
fn a_state_of_another_ingest_version_reloads_every_file_and_keeps_them() {
    let (dir, config) = ingested_sample();
    let wh = dir.path().join("wh");
    let before = snapshot(&wh);
    let path = wh.join("state/ingest.json");
    let mut state: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    state["version"] = serde_json::json!(ward::warehouse::INGEST_VERSION - 1);
    fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    // Every file is loaded again, into the files of the same names (a
    // batch is named by its content): none may be removed as superseded.
    let report = run_ingest(&config).unwrap();
    assert!(report.files.iter().all(|f| f.status == FileStatus::Loaded));
    // The same staged files (the state says when they were loaded).
    let files = |mut s: std::collections::BTreeMap<PathBuf, String>| {
        s.remove(Path::new("state/ingest.json")).unwrap();
        s
    };
    assert_eq!(files(snapshot(&wh)), files(before));
    let state = ward::warehouse::Warehouse::new(&wh).load_state().unwrap();
    for output in state.all_outputs() {
        assert!(wh.join(&output).is_file(), "{output} is listed, not staged");
    }
}

#[test]
fn a_settled_file_whose_stat_is_the_same_is_not_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    // Files changed within two seconds of being read are always read.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    run_ingest(&config).unwrap();
    let state_path = dir.path().join("wh/state/ingest.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
    let results = &mut state["sources"]["northside_clinic"]["results.csv"];
    assert!(results["stat"]["inode"].is_u64(), "{results}");
    // The state says the file had another content: while its stat is the
    // one recorded, the file is not read, so it counts as unchanged.
    results["sha256"] = "0".repeat(64).into();
    fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    let report = run_ingest(&config).unwrap();
    assert_all_unchanged(&report);
    // Touched, it is read: its content is not the one recorded.
    let path = dir.path().join("sample_data/northside_clinic/results.csv");
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    let report = run_ingest(&config).unwrap();
    let loaded: Vec<&str> = report
        .files
        .iter()
        .filter(|f| f.status == FileStatus::Loaded)
        .map(|f| f.file.as_str())
        .collect();
    assert_eq!(loaded, ["results.csv"]);
}

#[test]
fn records_appended_to_a_file_are_staged_on_their_own() {
    let (dir, config) = ingested_sample();
    let state = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&fs::read(dir.join("wh/state/ingest.json")).unwrap()).unwrap()
    };
    let before = state(dir.path())["sources"]["northside_clinic"]["results.csv"].clone();
    let path = dir.path().join("sample_data/northside_clinic/results.csv");
    let text = fs::read_to_string(&path).unwrap();
    let first = text.lines().nth(1).unwrap().to_string();
    // A new result, and a repeat of the file's first record.
    let new = "AAE000000020N1,AA0000002,AAE000000020,06/03/2025 09:15,4548-4,Hemoglobin A1c,9.1,%";
    fs::write(&path, format!("{text}{new}\n{first}\n")).unwrap();
    let lines = text.lines().count() as u64;

    let report = run_ingest(&config).unwrap();
    let results = report
        .files
        .iter()
        .find(|f| f.source == "northside_clinic" && f.file == "results.csv")
        .unwrap();
    assert_eq!(results.status, FileStatus::Loaded);
    // Only the appended records were read; the repeat is a duplicate.
    assert_eq!(
        (
            results.rows_read,
            results.rows_accepted,
            results.rows_rejected
        ),
        (2, 1, 1)
    );
    let repeat = (
        "northside_clinic".to_string(),
        "results.csv".to_string(),
        lines + 2,
        "duplicate_row".to_string(),
    );
    assert!(reject_keys(&dir.path().join("wh")).contains(&repeat));
    // The earlier staged files stay; the state counts the whole file.
    let after = state(dir.path())["sources"]["northside_clinic"]["results.csv"].clone();
    let outputs = |s: &serde_json::Value| -> Vec<String> {
        s["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap().to_string())
            .collect()
    };
    let (old, new) = (outputs(&before), outputs(&after));
    assert!(
        new.len() > old.len() && new.starts_with(&old),
        "{old:?} {new:?}"
    );
    for o in &new {
        assert!(dir.path().join("wh").join(o).is_file(), "{o}");
    }
    let count = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap();
    assert_eq!(count(&after, "rows_read"), count(&before, "rows_read") + 2);
    assert_eq!(
        count(&after, "rows_accepted"),
        count(&before, "rows_accepted") + 1
    );
    assert_eq!(count(&after, "bytes"), fs::metadata(&path).unwrap().len());

    // An earlier record changed: the file is loaded whole again, into its
    // own batch only.
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replacen(&first, &first.replace(',', ", "), 1)).unwrap();
    let report = run_ingest(&config).unwrap();
    let results = report
        .files
        .iter()
        .find(|f| f.source == "northside_clinic" && f.file == "results.csv")
        .unwrap();
    assert_eq!(results.rows_read, count(&after, "rows_read"));
    let reloaded = state(dir.path())["sources"]["northside_clinic"]["results.csv"].clone();
    assert!(outputs(&reloaded).iter().all(|o| !new.contains(o)));
}

#[test]
fn changed_file_replaces_its_own_batch_only() {
    let (dir, config) = ingested_sample();
    let wh = dir.path().join("wh");
    let before = snapshot(&wh);

    // Correct the fact file with the most planted bad rows: drop those lines.
    let planted = planted();
    let (source, file) = planted
        .iter()
        .filter(|k| !k.1.starts_with("pat"))
        .map(|k| (k.0.clone(), k.1.clone()))
        .max_by_key(|sf| {
            planted
                .iter()
                .filter(|k| (&k.0, &k.1) == (&sf.0, &sf.1))
                .count()
        })
        .unwrap();
    let bad: Vec<u64> = planted
        .iter()
        .filter(|k| (&k.0, &k.1) == (&source, &file))
        .map(|k| k.2)
        .collect();
    let path = dir.path().join("sample_data").join(&source).join(&file);
    let accepted_before = run_ingest(&config)
        .unwrap()
        .files
        .iter()
        .find(|f| f.source == source && f.file == file)
        .unwrap()
        .rows_accepted;
    let text = fs::read(&path).unwrap();
    let kept: Vec<&[u8]> = text
        .split_inclusive(|b| *b == b'\n')
        .enumerate()
        .filter(|(i, _)| !bad.contains(&(*i as u64 + 1)))
        .map(|(_, l)| l)
        .collect();
    fs::write(&path, kept.concat()).unwrap();

    let report = run_ingest(&config).unwrap();
    let loaded: Vec<_> = report
        .files
        .iter()
        .filter(|f| f.status == FileStatus::Loaded)
        .collect();
    assert_eq!(loaded.len(), 1);
    assert_eq!((&loaded[0].source, &loaded[0].file), (&source, &file));
    assert_eq!(
        (loaded[0].rows_read, loaded[0].rows_rejected),
        (accepted_before, 0)
    );
    assert!(
        !reject_keys(&wh)
            .iter()
            .any(|k| (&k.0, &k.1) == (&source, &file))
    );
    let after = snapshot(&wh);
    // Every other batch is byte-for-byte what it was.
    let changed: Vec<_> = before
        .iter()
        .filter(|(p, h)| after.get(*p) != Some(h))
        .map(|(p, _)| p.to_string_lossy().into_owned())
        .collect();
    assert!(
        changed
            .iter()
            .all(|p| p.contains(&format!("source={source}"))
                || p.starts_with(&format!("rejects/{source}/"))
                || p == "state/ingest.json"),
        "{changed:?}"
    );
}

#[test]
fn removed_patient_rechecks_that_sources_facts() {
    let (dir, config) = ingested_sample();
    let patients = dir.path().join("sample_data/lakeside_endo/patients.csv");
    let text = fs::read_to_string(&patients).unwrap();
    let first_id = text
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(&format!("{first_id},")))
        .collect();
    fs::write(&patients, kept.join("\n") + "\n").unwrap();

    let report = run_ingest(&config).unwrap();
    // The endo's patient file and all its fact files are checked again; other sources are not.
    for f in &report.files {
        let expect = if f.source == "lakeside_endo" {
            FileStatus::Loaded
        } else {
            FileStatus::Unchanged
        };
        assert_eq!(f.status, expect, "{}/{}", f.source, f.file);
    }
    let orphans = reject_keys(&dir.path().join("wh"))
        .into_iter()
        .filter(|k| k.0 == "lakeside_endo" && k.3 == "unknown_patient")
        .count();
    assert!(
        orphans >= 2,
        "the removed patient's visits are now rejected: {orphans}"
    );
}

/// Every staged table's rows (sorted), the rejects, and each file's
/// counts in the state.
type Loaded = (
    Vec<(String, Vec<String>)>,
    Vec<(String, String, u64, String)>,
    Vec<(String, serde_json::Value)>,
);

fn loaded(wh: &Path) -> Loaded {
    let mut tables: Vec<(String, Vec<String>)> = fs::read_dir(wh.join("staging"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, sorted_rows(&read_dir_batches(&p)))
        })
        .collect();
    tables.sort();
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(wh.join("state/ingest.json")).unwrap()).unwrap();
    let mut counts = Vec::new();
    for (source, files) in state["sources"].as_object().unwrap() {
        for (file, f) in files.as_object().unwrap() {
            let keep = [
                "rows_read",
                "rows_accepted",
                "rows_rejected",
                "rejects_by_rule",
                "values_flagged",
            ];
            let f: serde_json::Map<_, _> = f
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| keep.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            counts.push((format!("{source}/{file}"), f.into()));
        }
    }
    (tables, reject_keys(wh), counts)
}

#[test]
fn grown_patients_stage_only_the_facts_they_resolve() {
    let (dir, config) = ingested_sample();
    let wh = dir.path().join("wh");
    let clinic = dir.path().join("sample_data/northside_clinic");
    let orphans = |wh: &Path| {
        reject_keys(wh)
            .into_iter()
            .filter(|k| k.0 == "northside_clinic" && k.3 == "unknown_patient")
            .count()
    };
    let (before, orphaned) = (snapshot(&wh), orphans(&wh));
    // The patient the clinic's visits and results named, registered at
    // last (and the id of its first patient again, refused), and a new
    // result of a patient it had.
    append_lines(
        &clinic.join("patients.csv"),
        "AA0000261,A109999,Rosalind,Okafor,03/09/1962,F,White,Not Hispanic,12 Birch Rd,Tulsa,OK,74101,918-555-0261,,,Medicare\n\
         AA0000002,A109998,Kasey,Saunders,07/21/1977,F,White,Hispanic,1 Elm St,Buffalo,NY,14276,,,,Commercial\n",
    );
    append_lines(
        &clinic.join("results.csv"),
        "AAE000000020N2,AA0000002,AAE000000020,06/04/2025 09:15,4548-4,Hemoglobin A1c,8.7,%\n",
    );
    let report = run_ingest(&config).unwrap();
    for f in &report.files {
        let loaded = f.source == "northside_clinic";
        assert_eq!(
            f.status == FileStatus::Loaded,
            loaded,
            "{}/{}",
            f.source,
            f.file
        );
    }
    assert!(
        orphans(&wh) + 4 <= orphaned,
        "{} of {orphaned}",
        orphans(&wh)
    );
    // The patients appended were the only ones read: one staged, one
    // refused for an id the file gave before.
    let patients = report
        .files
        .iter()
        .find(|f| f.source == "northside_clinic" && f.file == "patients.csv")
        .unwrap();
    assert_eq!(
        (patients.rows_read, patients.rows_accepted),
        (2, 1),
        "{patients:?}"
    );
    assert_eq!(
        patients.rejects_by_rule.get("duplicate_patient_id"),
        Some(&1)
    );
    // The rows staged before stay as they were; only the rows they did
    // not hold are staged anew.
    let after = snapshot(&wh);
    let staged = |p: &Path| p.starts_with("staging/");
    let kept: Vec<_> = before.iter().filter(|(p, _)| staged(p)).collect();
    assert!(!kept.is_empty());
    for (path, hash) in kept {
        assert_eq!(after.get(path), Some(hash), "{}", path.display());
    }
    // What is staged, rejected and counted is what a load from scratch gives.
    let grown = loaded(&wh);
    fs::remove_dir_all(&wh).unwrap();
    run_ingest(&config).unwrap();
    let fresh = loaded(&wh);
    assert_eq!(grown.0, fresh.0);
    assert_eq!(grown.1, fresh.1);
    assert_eq!(grown.2, fresh.2);
}

#[test]
fn redelivered_file_under_a_new_name_is_skipped() {
    let (dir, config) = ingested_sample();
    let d = dir.path().join("sample_data/northside_clinic");
    fs::copy(d.join("visits.csv"), d.join("visits_resent.csv")).unwrap();
    let before = snapshot(&dir.path().join("wh"));
    let report = run_ingest(&config).unwrap();
    let resent = report
        .files
        .iter()
        .find(|f| f.file == "visits_resent.csv")
        .unwrap();
    assert_eq!(resent.status, FileStatus::Duplicate);
    assert_eq!(resent.detail.as_deref(), Some("same content as visits.csv"));
    assert_eq!(snapshot(&dir.path().join("wh")), before);
}

/// Files are published as they are mapped, several at once: the same
/// extract delivered by two sources (same names, same content, so the same
/// batch file names) loads into each source's staging, nothing shared.
#[test]
fn two_sources_with_the_same_files_load_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let data = dir.path().join("sample_data");
    copy_dir(&data.join("northside_clinic"), &data.join("northside_copy"));
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[[sources]]\nname = \"northside_copy\"\nformat = \"csv\"\n\
         path = \"northside_copy/*.csv\"\nmapping = \"mappings/emr_a.toml\"\n",
    );
    fs::write(&config, text).unwrap();
    let report = run_ingest(&config).unwrap();
    let of = |source: &str| {
        let mut files: Vec<_> = report
            .files
            .iter()
            .filter(|f| f.source == source)
            .map(|f| {
                (
                    f.file.clone(),
                    f.status,
                    f.rows_read,
                    f.rows_accepted,
                    f.rows_rejected,
                )
            })
            .collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files
    };
    let original = of("northside_clinic");
    assert!(original.len() > 1 && original.iter().all(|f| f.1 == FileStatus::Loaded));
    assert_eq!(of("northside_copy"), original);
    let wh = dir.path().join("wh");
    let warehouse = ward::warehouse::Warehouse::new(&wh);
    for table in [Table::Patient, Table::Encounter, Table::Observation] {
        let rows_of = |source: &str| rows(&read_dir_batches(&warehouse.staging_dir(table, source)));
        assert!(rows_of("northside_clinic") > 0, "{}", table.name());
        assert_eq!(
            rows_of("northside_copy"),
            rows_of("northside_clinic"),
            "{}",
            table.name()
        );
    }
    assert!(!wh.join(".tmp").exists() || fs::read_dir(wh.join(".tmp")).unwrap().next().is_none());
}

#[test]
fn leftovers_of_an_interrupted_run_are_removed() {
    let (dir, config) = ingested_sample();
    let wh = dir.path().join("wh");
    let before = snapshot(&wh);
    let stray = wh.join("staging/patient/source=lakeside_endo/deadbeef.parquet");
    fs::write(&stray, b"half a file").unwrap();
    fs::create_dir_all(wh.join(".tmp")).unwrap();
    fs::write(wh.join(".tmp/123-x.parquet"), b"partial").unwrap();
    let report = run_ingest(&config).unwrap();
    assert_eq!(report.orphans_removed, 1);
    assert!(!stray.exists());
    assert_eq!(snapshot(&wh), before);
}

#[test]
fn staging_is_queryable_with_datafusion() {
    let (dir, _) = ingested_sample();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = datafusion::prelude::SessionContext::new();
        let path = dir.path().join("wh/staging/observation/");
        ctx.register_parquet("observation", path.to_str().unwrap(), Default::default())
            .await
            .unwrap();
        let df = ctx
            .sql("SELECT source, count(*) AS n FROM (SELECT source, unnest(codings) AS coding FROM observation) \
                  WHERE coding['system'] = 'loinc' GROUP BY source ORDER BY source")
            .await
            .unwrap();
        let batches = df.collect().await.unwrap();
        assert_eq!(
            strings(&batches, "source"),
            ["lakeside_endo", "northside_clinic", "st_marys_hospital"].map(|s| Some(s.to_string()))
        );
    });
}

/// A source of one table (patient) with one file per bad-input case.
fn bad_input_source(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    fs::create_dir_all(&data).unwrap();
    let h = "id,dob,sex,name\n";
    let files: [(&str, &[u8]); 13] = [
        ("empty.csv", b""),
        ("header_only.csv", h.as_bytes()),
        ("bom_crlf_quoted.csv", b"\xEF\xBB\xBFid,dob,sex,name\r\nb1,2000-01-01,F,Ann\r\nb2,2000-01-02,M,\"Two\r\nLines\"\r\nb3,2000-01-03,F,Eve\r\n"),
        ("truncated.csv", b"id,dob,sex,name\nt1,2000-01-01,F,Ann\nt2,2000-01-0"),
        ("not_utf8.csv", b"id,dob,sex,name\nu1,2000-01-01,F,Jos\xe9\nu2,2000-01-01,F,Ann\n"),
        ("extra_columns.csv", b"id,dob,sex,name,shoe_size\ne1,2000-01-01,F,Ann,38\n"),
        ("missing_column.csv", b"id,dob,sex\nm1,2000-01-01,F\n"),
        ("too_many_fields.csv", b"id,dob,sex,name\nx1,2000-01-01,F,Ann,surplus\nx2,2000-01-01,F,Ann\n"),
        ("too_few_fields.csv", b"id,dob,sex,name\ny1,2000-01-01\ny2,2000-01-01,F,Ann\n"),
        ("bad_values.csv", b"id,dob,sex,name\nv1,2000-13-01,F,Ann\nv2,2999-01-01,F,Ann\nv3,2000-01-01,Q,Ann\n,2000-01-01,F,Ann\n"),
        ("stray_quote.csv", b"id,dob,sex,name\nq1,2000-01-01,F,Hb\"Ann\nq2,2000-01-01,F,\"Open\nq3,2000-01-01,F,Ann\n"),
        ("duplicate_id.csv", b"id,dob,sex,name\nd1,2000-01-01,F,Ann\nd1,1990-05-05,M,Bob\nd2,2000-01-01,F,Eve\n"),
        ("no_header.csv", b"Jane,1950-01-01,F,123-45-6789\nJohn,1951-01-01,M,987-65-4321\n"),
    ];
    for (name, bytes) in files {
        fs::write(data.join(name), bytes).unwrap();
    }
    fs::write(
        dir.join("m.toml"),
        "[[files]]\nmatch = \"*.csv\"\ntable = \"patient\"\n[files.fields]\nsource_patient_id = \"id\"\nbirth_date = \"dob\"\nsex = \"sex\"\ngiven_name = \"name\"\n",
    )
    .unwrap();
    let config = dir.join("ward.toml");
    fs::write(
        &config,
        "warehouse = \"wh\"\n[[sources]]\nname = \"bad\"\nformat = \"csv\"\npath = \"data\"\nmapping = \"m.toml\"\n\n\
         [[sources]]\nname = \"gone\"\nformat = \"csv\"\npath = \"nowhere/*.csv\"\nmapping = \"m.toml\"\n",
    )
    .unwrap();
    config
}

#[test]
fn composite_and_split_columns_map_with_regex_and_concat() {
    // Synthea 2017's ADDRESS holds "street city ST zip"; another layout
    // splits the street into number and name.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(
        data.join("patients.csv"),
        "ID,BIRTHDATE,ADDRESS,NO,STREET\n\
         a1,1950-02-03,\"12 Main St Boston MA 02110\",12,Main St\n\
         a2,1961-07-08,\"9 Elm Rd Apt 2 Worcester MA 01602-1234\",,Elm Rd\n\
         a3,1972-01-01,somewhere abroad,,\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("m.toml"),
        r#"[[files]]
match = "*.csv"
table = "patient"
[files.fields]
source_patient_id = "ID"
birth_date = "BIRTHDATE"
sex = { value = "unknown" }
address_line = { concat = ["NO", "STREET"] }
city = { column = "ADDRESS", regex = '^\d+ .*? (?:St|Rd|Ave)(?: Apt \d+)? (.+) [A-Z]{2} \d{5}', group = 1 }
state = { column = "ADDRESS", regex = ' ([A-Z]{2}) \d{5}(?:-\d{4})?$' }
postal_code = { column = "ADDRESS", regex = '(\d{5}(?:-\d{4})?)$' }
"#,
    )
    .unwrap();
    let config = dir.path().join("ward.toml");
    fs::write(
        &config,
        "warehouse = \"wh\"\n[[sources]]\nname = \"s\"\nformat = \"csv\"\npath = \"data\"\nmapping = \"m.toml\"\n",
    )
    .unwrap();
    let report = run_ingest(&config).unwrap();
    assert_eq!(
        (report.files[0].rows_accepted, report.files[0].rows_rejected),
        (3, 0)
    );
    let pats = read_dir_batches(&dir.path().join("wh/staging/patient/source=s"));
    let col = |c: &str| strings(&pats, c);
    assert_eq!(
        col("address_line"),
        [Some("12 Main St".into()), Some("Elm Rd".into()), None]
    );
    assert_eq!(
        col("city"),
        [Some("Boston".into()), Some("Worcester".into()), None]
    );
    assert_eq!(col("state"), [Some("MA".into()), Some("MA".into()), None]);
    assert_eq!(
        col("postal_code"),
        [Some("02110".into()), Some("01602".into()), None]
    );
}

#[test]
fn bad_input_gets_a_reject_or_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = bad_input_source(dir.path());
    let report = run_ingest(&config).unwrap();
    let file = |name: &str| {
        report
            .files
            .iter()
            .find(|f| f.file == name)
            .unwrap_or_else(|| panic!("{name}"))
    };

    // The glob that matches nothing fails its source, named.
    assert_eq!(report.source_failures.len(), 1);
    assert!(report.source_failures[0].message.contains("'gone'"));
    assert!(report.source_failures[0].message.contains("nowhere/*.csv"));

    let empty = file("empty.csv");
    assert_eq!(empty.status, FileStatus::Failed);
    assert!(
        empty
            .detail
            .as_deref()
            .unwrap()
            .contains("empty.csv: file is empty"),
        "{:?}",
        empty.detail
    );
    let missing = file("missing_column.csv");
    assert_eq!(missing.status, FileStatus::Failed);
    let detail = missing.detail.as_deref().unwrap();
    assert!(
        detail.contains("missing_column.csv:1") && detail.contains("'name'"),
        "{detail}"
    );

    assert_eq!(
        (
            file("header_only.csv").status,
            file("header_only.csv").rows_read
        ),
        (FileStatus::Loaded, 0)
    );
    assert_eq!(
        (
            file("extra_columns.csv").rows_accepted,
            file("extra_columns.csv").rows_rejected
        ),
        (1, 0)
    );
    assert_eq!(
        (
            file("bom_crlf_quoted.csv").rows_accepted,
            file("bom_crlf_quoted.csv").rows_rejected
        ),
        (3, 0)
    );

    let wh = dir.path().join("wh");
    let keys: Vec<(String, u64, String)> = reject_keys(&wh)
        .into_iter()
        .map(|k| (k.1, k.2, k.3))
        .collect();
    let expect = [
        ("bad_values.csv", 5, "required"),
        ("duplicate_id.csv", 3, "duplicate_patient_id"),
        ("not_utf8.csv", 2, "invalid_utf8"),
        ("stray_quote.csv", 3, "malformed_record"),
        ("too_few_fields.csv", 2, "wrong_field_count"),
        ("too_many_fields.csv", 2, "wrong_field_count"),
        ("truncated.csv", 3, "truncated_record"),
    ]
    .map(|(f, l, r)| (f.to_string(), l, r.to_string()));
    assert_eq!(keys, expect);
    // Birth dates that cannot be used (month 13, the year 2999) and a sex
    // code Ward does not know keep their patients, flagged.
    let values = file("bad_values.csv");
    assert_eq!((values.rows_accepted, values.rows_rejected), (3, 1));
    assert_eq!(
        values.values_flagged,
        [
            ("dob: unrecognized_value".to_string(), 2),
            ("sex: unrecognized_value".to_string(), 1)
        ]
        .into_iter()
        .collect()
    );

    // Line numbers of accepted rows survive BOM, CRLF and a quoted newline.
    let pats = read_dir_batches(&wh.join("staging/patient/source=bad"));
    let ids = strings(&pats, "source_patient_id");
    let lines = u64s(&pats, "source_line");
    let line_of = |id: &str| lines[ids.iter().position(|i| i.as_deref() == Some(id)).unwrap()];
    assert_eq!((line_of("b1"), line_of("b2"), line_of("b3")), (2, 3, 5));
    let names = strings(&pats, "given_name");
    assert!(names.contains(&Some("Two\r\nLines".to_string())));
    // A stray quote costs its own record only; a duplicate id keeps the first.
    assert_eq!((line_of("q1"), line_of("q3")), (2, 4));
    assert_eq!(line_of("d1"), 2);
    assert_eq!(ids.iter().filter(|i| i.as_deref() == Some("d1")).count(), 1);
    // A sex Ward cannot read is kept as unknown and counted, not a reject.
    let sex = strings(&pats, "sex");
    assert_eq!(
        sex[ids.iter().position(|i| i.as_deref() == Some("v3")).unwrap()].as_deref(),
        Some("unknown")
    );
    // A file without a header: the error names the file, never its values.
    let headless = file("no_header.csv");
    assert_eq!(headless.status, FileStatus::Failed);
    let detail = headless.detail.as_deref().unwrap();
    assert!(detail.contains("no_header.csv:1"), "{detail}");
    for value in ["Jane", "1950", "6789"] {
        assert!(!detail.contains(value), "{detail}");
    }

    // Nothing lost: every data record is accepted or rejected.
    for f in report
        .files
        .iter()
        .filter(|f| f.status == FileStatus::Loaded)
    {
        assert_eq!(f.rows_read, f.rows_accepted + f.rows_rejected, "{}", f.file);
    }
    assert_eq!(
        report.failures().len(),
        4,
        "gone source, empty file, missing column, no header"
    );
}

/// Synthea's CSV export (../shared/data/synthea_csv_2022): every patient,
/// encounter, condition, observation, medication and procedure loads; the
/// only rejects are exact duplicate rows, each identical to an accepted one.
#[test]
fn synthea_csv_export_loads_completely() {
    let Some(shared) = shared_data("synthea_csv_2022") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ward.toml");
    fs::write(
        &config,
        format!(
            "warehouse = \"wh\"\n[[sources]]\nname = \"synthea\"\nformat = \"csv\"\npath = \"{}/*.csv\"\nmapping = \"{}\"\n",
            shared.display(),
            repo().join("sample_data/mappings/synthea_csv.toml").display()
        ),
    )
    .unwrap();
    let report = run_ingest(&config).unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    let loaded: Vec<_> = report
        .files
        .iter()
        .filter(|f| f.status == FileStatus::Loaded)
        .collect();
    assert_eq!(loaded.len(), 6);
    assert_eq!(
        report
            .files
            .iter()
            .filter(|f| f.status == FileStatus::Unmapped)
            .count(),
        11
    );

    for f in &loaded {
        // Independent count of the file's records.
        let records = csv::Reader::from_path(shared.join(&f.file))
            .unwrap()
            .records()
            .count() as u64;
        assert_eq!(f.rows_read, records, "{}", f.file);
        assert_eq!(f.rows_read, f.rows_accepted + f.rows_rejected, "{}", f.file);
        assert!(
            f.rejects_by_rule.keys().all(|r| r == "duplicate_row"),
            "{}: {:?}",
            f.file,
            f.rejects_by_rule
        );
        if matches!(
            f.file.as_str(),
            "patients.csv" | "encounters.csv" | "conditions.csv" | "medications.csv"
        ) {
            assert_eq!(f.rows_rejected, 0, "{}", f.file);
        }
    }
    let wh = dir.path().join("wh");
    let pats = read_dir_batches(&wh.join("staging/patient"));
    assert_eq!(rows(&pats), 59);
    let mut ids = strings(&pats, "source_patient_id");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 59);

    // Each duplicate names an earlier line of its file, and that line was accepted.
    let rejects = read_dir_batches(&wh.join("rejects"));
    let messages = strings(&rejects, "message");
    let files = strings(&rejects, "source_file");
    let staged_lines = |table: &str| -> std::collections::HashSet<u64> {
        u64s(
            &read_dir_batches(&wh.join("staging").join(table)),
            "source_line",
        )
        .into_iter()
        .collect()
    };
    let (procedures, observations) = (staged_lines("procedure"), staged_lines("observation"));
    for (m, f) in messages.iter().zip(&files) {
        let first: u64 = m
            .as_deref()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let lines = if f.as_deref() == Some("procedures.csv") {
            &procedures
        } else {
            &observations
        };
        assert!(lines.contains(&first), "{f:?} line {first}");
    }
}
