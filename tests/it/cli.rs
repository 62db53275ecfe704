//! The `ward` binary: exit codes, summary, logs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// The shared sample run (its summary is snapshotted in snap.rs) kept the
/// ingest state; a second run on a copy, over the same files, loads
/// nothing and still succeeds.
#[test]
fn a_second_run_on_the_same_files_loads_nothing_and_succeeds() {
    let first = sample_run();
    assert!(first.warehouse().join("state/ingest.json").is_file());
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&first.dir, dir.path());
    let config = dir.path().join("sample_data/ward.toml");
    let again = ward(dir.path(), &["--config", config.to_str().unwrap(), "run"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    let runs = ward::runs::list(&dir.path().join("wh")).unwrap();
    let second = runs[0].manifest.as_ref().unwrap();
    assert_eq!(runs.len(), 2);
    assert!(
        second
            .inputs
            .iter()
            .all(|f| f.this_run == "unchanged" && !f.new)
    );
}

#[test]
fn ward_toml_in_the_working_directory_is_the_default_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let cwd = config.parent().unwrap();
    let out = ward(cwd, &["-q", "ingest"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).is_empty(), "-q prints no summary");
    assert!(dir.path().join("wh/staging/patient").is_dir());
}

/// Without --config and ./ward.toml the bundled sample is used, and said;
/// a scheduled job's --no-sample refuses it.
#[test]
fn the_bundled_sample_is_never_a_silent_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = ward(dir.path(), &["-q", "validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("using the bundled sample config") && stderr.contains("--no-sample"),
        "{stderr}"
    );
    let out = ward(dir.path(), &["--no-sample", "validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no ./ward.toml"));
    // With a ./ward.toml, nothing is said.
    let config = copy_sample(dir.path());
    let out = ward(config.parent().unwrap(), &["--no-sample", "-q", "validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("bundled sample"));
}

#[test]
fn validate_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let out = ward(
        dir.path(),
        &["--config", config.to_str().unwrap(), "validate"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("nothing written"));
    assert!(text(&out.stdout).contains("rejects by rule:"));
    assert!(!dir.path().join("wh").exists());

    // --examples N: per rule, where its first N rejects are — places the
    // sample's expected rejects list, never values unless asked for.
    let expected: std::collections::BTreeSet<(String, String)> =
        fs::read_to_string(config.parent().unwrap().join("expected_rejects.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[3].to_string(), format!("{}/{}:{}", f[0], f[1], f[2]))
            })
            .collect();
    let rules: std::collections::BTreeSet<&String> = expected.iter().map(|(r, _)| r).collect();
    let validate = |extra: &[&str]| {
        let mut args = vec!["--config", config.to_str().unwrap(), "validate"];
        args.extend_from_slice(extra);
        ward(dir.path(), &args)
    };
    let out = validate(&["--examples", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let listed = &stdout[stdout.find("first 1 reject(s) of each rule").unwrap()..];
    let mut shown = 0;
    let mut rule = String::new();
    for line in listed.lines().skip(1) {
        if let Some(r) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            rule = r.to_string();
        } else if let Some(place) = line.strip_prefix("    ") {
            let place = place.split(" column ").next().unwrap();
            assert!(
                expected.contains(&(rule.clone(), place.to_string())),
                "{line}"
            );
            shown += 1;
        }
    }
    assert_eq!(shown, rules.len(), "{listed}");
    assert!(!stdout.contains(" value "));
    let out = validate(&["--examples", "2", "--show-values"]);
    assert!(text(&out.stderr).contains("PHI"));
    assert!(text(&out.stdout).contains(" value \""));
    assert_eq!(validate(&["--show-values"]).status.code(), Some(2));
    assert!(!dir.path().join("wh").exists());
}

#[test]
fn malformed_config_exits_2_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ward.toml");
    fs::write(&config, "warehouse = \"wh\"\n[[sources]\nname = 1\n").unwrap();
    let out = ward(dir.path(), &["--config", config.to_str().unwrap(), "run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("ward.toml:2:"),
        "{}",
        text(&out.stderr)
    );

    let mapping_error = copy_sample(dir.path());
    let m = dir.path().join("sample_data/mappings/emr_a.toml");
    let bad = fs::read_to_string(&m)
        .unwrap()
        .replace("mrn = \"MRN\"", "mrm = \"MRN\"");
    fs::write(&m, bad).unwrap();
    let out = ward(
        dir.path(),
        &["--config", mapping_error.to_str().unwrap(), "run"],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("emr_a.toml:") && stderr.contains("'mrm'"),
        "{stderr}"
    );
}

#[test]
fn missing_config_or_mapping_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = ward(dir.path(), &["--config", "nope.toml", "run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("nope.toml: cannot read"),
        "{}",
        text(&out.stderr)
    );

    let config = copy_sample(dir.path());
    fs::remove_file(dir.path().join("sample_data/mappings/hospital_b.toml")).unwrap();
    let out = ward(dir.path(), &["--config", config.to_str().unwrap(), "run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("hospital_b.toml: cannot read"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn missing_input_exits_3_and_names_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    fs::remove_dir_all(dir.path().join("sample_data/lakeside_endo")).unwrap();
    let out = ward(dir.path(), &["--config", config.to_str().unwrap(), "run"]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("source 'lakeside_endo': no input file matches"),
        "{stderr}"
    );
    // The other providers were still loaded.
    assert!(
        dir.path()
            .join("wh/staging/patient/source=northside_clinic")
            .is_dir()
    );
}

#[test]
fn json_logs_carry_no_patient_values() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let out = ward(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "-vv",
            "--log-format",
            "json",
            "run",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() > 18, "one line per file at least");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("message").is_some(),
            "{line}"
        );
    }

    // Identifying values of every sample patient: none may appear in any output.
    let mut identifiers = Vec::new();
    for (file, columns) in [
        (
            "northside_clinic/patients.csv",
            &[
                "FirstName",
                "LastName",
                "DOB",
                "SSN",
                "Phone",
                "Email",
                "MRN",
                "Street",
            ][..],
        ),
        (
            "lakeside_endo/patients.csv",
            &[
                "FirstName",
                "LastName",
                "DOB",
                "Phone",
                "Email",
                "MRN",
                "Street",
            ][..],
        ),
        (
            "st_marys_hospital/pat_demo.csv",
            &[
                "PAT_FIRST",
                "PAT_LAST",
                "BIRTH_DT",
                "PHONE_NO",
                "MRN_NO",
                "ADDR1",
            ][..],
        ),
    ] {
        let path = dir.path().join("sample_data").join(file);
        let delimiter = if file.starts_with("st_marys") {
            b'|'
        } else {
            b','
        };
        let bytes = fs::read(&path).unwrap();
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        let mut r = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .from_reader(bytes);
        let header = r.headers().unwrap().clone();
        for rec in r.records() {
            let rec = rec.unwrap();
            for c in columns {
                let i = header.iter().position(|h| h == *c).unwrap();
                if rec[i].len() >= 4 {
                    identifiers.push(rec[i].to_string());
                }
            }
        }
    }
    assert!(identifiers.len() > 200);
    let all = format!("{}{}", text(&out.stdout), stderr);
    for id in &identifiers {
        assert!(
            !all.contains(id.as_str()),
            "a patient value appears in the output"
        );
    }
}

/// `ward --help` is snapshotted in snap.rs.
#[test]
fn an_unknown_command_exits_2() {
    let bad = ward(Path::new("."), &["frobnicate"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn link_evaluates_against_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let cfg = config.to_str().unwrap();
    assert_eq!(
        ward(dir.path(), &["--config", cfg, "-q", "ingest"])
            .status
            .code(),
        Some(0)
    );
    let truth = config.parent().unwrap().join("truth.csv");
    let out = ward(
        dir.path(),
        &[
            "--config",
            cfg,
            "link",
            "--evaluate",
            truth.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // Scored over every truth record; the sample's hard noise leaves a
    // few true pairs apart but never merges two people.
    let truth_text = fs::read_to_string(&truth).unwrap();
    let records = truth_text.lines().count() - 1;
    let persons: std::collections::BTreeSet<&str> = truth_text
        .lines()
        .skip(1)
        .filter_map(|l| l.rsplit(',').next())
        .collect();
    assert!(
        stdout.contains(&format!("over all {records} truth records")),
        "{stdout}"
    );
    assert!(
        stdout.contains("pairs: precision 1.0000, recall 0.9"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("persons: {} true", persons.len())),
        "{stdout}"
    );
    assert!(dir.path().join("wh/core/person_link.parquet").is_file());
    assert!(
        stdout.contains("link: model fitted on these 450 records"),
        "{stdout}"
    );
    // Linked again, the working copy's model and pairs are kept (nothing
    // new to block); --refit fits the model anew.
    let relink = |extra: &[&str]| {
        let out = ward(dir.path(), &[&["--config", cfg, "link"], extra].concat());
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let again = relink(&[]);
    assert!(
        again.contains("link: the model fitted on 450 records and the scored pairs of the last run kept; 0 new records blocked"),
        "{again}"
    );
    assert!(relink(&["--refit"]).contains("link: model fitted on these 450 records"));

    // --explain: the waterfall of two records of one person, levels only.
    let explain = |a: &str, b: &str| {
        ward(
            dir.path(),
            &["--config", cfg, "-q", "link", "--explain", a, b],
        )
    };
    let out = explain("northside_clinic:AA0000002", "st_marys_hospital:AB0000002");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needed in [
        "prior",
        "given_name",
        "birth_date",
        "exact",
        "linked (candidate by blocking rule",
    ] {
        assert!(stdout.contains(needed), "{needed}: {stdout}");
    }
    assert!(
        !stdout.to_lowercase().contains("aisha"),
        "no values: {stdout}"
    );
    assert_eq!(
        explain("northside_clinic:nobody", "st_marys_hospital:AB0000002")
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        explain("no-colon", "st_marys_hospital:AB0000002")
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn measure_commands_report_and_refuse_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let cfg = config.to_str().unwrap();
    // `ward measures list` is snapshotted in snap.rs.
    let unknown = ward(
        dir.path(),
        &["--config", cfg, "measure", "--measure", "CMS999"],
    );
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("unknown measure 'CMS999'"));
    let half = ward(
        dir.path(),
        &["--config", cfg, "measure", "--period-start", "2025-01-01"],
    );
    assert_eq!(half.status.code(), Some(2));
    let backwards = ward(
        dir.path(),
        &[
            "--config",
            cfg,
            "measure",
            "--period-start",
            "2025-12-31",
            "--period-end",
            "2025-01-01",
        ],
    );
    assert_eq!(backwards.status.code(), Some(2));
    assert!(text(&backwards.stderr).contains("starts after it ends"));
    // Nothing linked: measuring staging must be asked for, never a fallback.
    let refused = ward(
        dir.path(),
        &["--config", cfg, "measure", "--measure", "cms165"],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(text(&refused.stderr).contains("--unlinked"));
    let profile = dir.path().join("profile");
    let one = ward(
        dir.path(),
        &[
            "--config",
            cfg,
            "measure",
            "--measure",
            "cms165",
            "--unlinked",
            "--profile",
            profile.to_str().unwrap(),
        ],
    );
    assert_eq!(one.status.code(), Some(0), "{}", text(&one.stderr));
    let stdout = text(&one.stdout);
    assert!(
        stdout.lines().next().unwrap().contains("UNLINKED"),
        "{stdout}"
    );
    assert!(stdout.contains("CMS165"));
    assert!(
        dir.path()
            .join("wh/marts/measure_patient/CMS165.parquet")
            .is_file()
    );
    // The profile: the executed plan with its metrics, the slowest first.
    let profile = fs::read_to_string(profile.join("CMS165.txt")).unwrap();
    assert!(profile.starts_with("CMS165 ("), "{profile}");
    let (top, plan) = profile.split_once("plan with metrics:").unwrap();
    let seconds: Vec<f64> = top
        .lines()
        .skip_while(|l| !l.contains("operator"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(seconds.len() > 3, "{top}");
    assert!(seconds.windows(2).all(|w| w[0] >= w[1]), "{top}");
    assert!(plan.contains("output_rows=") && plan.contains("elapsed_compute="));
    assert!(
        plan.contains("DataSourceExec"),
        "the plan reaches the scans"
    );
}

#[test]
fn conformance_exits_1_on_a_mismatch_and_2_without_cases() {
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("deck/case-1");
    fs::create_dir_all(&case).unwrap();
    // A 50-year-old without any visit is not in CMS165's initial population,
    // but this case says it is.
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:p1", "resource": {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1975-01-01"}},
        {"resource": {"resourceType": "MeasureReport", "status": "complete", "type": "individual",
          "period": {"start": "2025-01-01", "end": "2025-12-31"},
          "group": [{"population": [
            {"code": {"coding": [{"code": "initial-population"}]}, "count": 1},
            {"code": {"coding": [{"code": "numerator"}]}, "count": 0}]}]}}]});
    fs::write(case.join("bundle.json"), bundle.to_string()).unwrap();
    let deck = dir.path().join("deck");
    let out = ward(
        dir.path(),
        &[
            "conformance",
            "--deck",
            deck.to_str().unwrap(),
            "--measure",
            "CMS165",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("FAIL") && stdout.contains("0 of 1 cases pass"),
        "{stdout}"
    );
    // -q still names the failing case.
    let quiet = ward(
        dir.path(),
        &[
            "-q",
            "conformance",
            "--deck",
            deck.to_str().unwrap(),
            "--measure",
            "CMS165",
        ],
    );
    assert_eq!(quiet.status.code(), Some(1));
    assert!(
        text(&quiet.stdout).contains("FAIL case-1: expected 1/"),
        "{}",
        text(&quiet.stdout)
    );
    // Pointed one level above the deck: says where the deck is.
    let above = ward(
        dir.path(),
        &[
            "conformance",
            "--deck",
            dir.path().to_str().unwrap(),
            "--measure",
            "CMS165",
        ],
    );
    assert_eq!(above.status.code(), Some(2));
    assert!(
        text(&above.stderr).contains("one level down") && text(&above.stderr).contains("deck"),
        "{}",
        text(&above.stderr)
    );
    let empty = dir.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let none = ward(
        dir.path(),
        &[
            "conformance",
            "--deck",
            empty.to_str().unwrap(),
            "--measure",
            "CMS165",
        ],
    );
    assert_eq!(none.status.code(), Some(2));
    assert!(text(&none.stderr).contains("no test case found"));
}

#[test]
fn query_writes_every_format_and_refuses_escapes_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let cfg = config.to_str().unwrap();
    let run = ward(dir.path(), &["--config", cfg, "run"]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    assert!(
        text(&run.stderr).contains("PUBLIC DEMO KEY"),
        "loud demo-key warning"
    );

    let sql = "SELECT sex, count(*) AS n FROM person GROUP BY sex ORDER BY sex";
    let q = |args: &[&str]| {
        let mut all = vec!["-q", "--config", cfg, "query"];
        all.extend_from_slice(args);
        ward(dir.path(), &all)
    };
    let csv = q(&[sql, "--format", "csv"]);
    assert_eq!(csv.status.code(), Some(0), "{}", text(&csv.stderr));
    let csv = text(&csv.stdout);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "sex,n");
    let total: u64 = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(1).unwrap().parse::<u64>().unwrap())
        .sum();

    let json = q(&[sql, "--format", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(rows.len(), lines.len() - 1);
    assert_eq!(
        rows.iter().map(|r| r["n"].as_u64().unwrap()).sum::<u64>(),
        total
    );

    let table = q(&[sql]);
    assert!(text(&table.stdout).contains(&format!("{} row(s)", rows.len())));

    let sql_file = dir.path().join("q.sql");
    fs::write(&sql_file, sql).unwrap();
    let parquet = dir.path().join("out.parquet");
    let p = q(&[
        "--file",
        sql_file.to_str().unwrap(),
        "--format",
        "parquet",
        "--out",
        parquet.to_str().unwrap(),
    ]);
    assert_eq!(p.status.code(), Some(0), "{}", text(&p.stderr));
    assert_eq!(rows_of(&read_parquet(&parquet)), rows.len());

    // --out: an existing file only with --force; never inside the
    // warehouse, never through a symlink.
    let again = q(&[sql, "--format", "csv", "--out", parquet.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("--force"));
    let forced = q(&[
        sql,
        "--format",
        "csv",
        "--out",
        parquet.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(forced.status.code(), Some(0), "{}", text(&forced.stderr));
    assert_eq!(text(&fs::read(&parquet).unwrap()), csv);
    let current = dir.path().join("wh/runs/CURRENT");
    let pointer = fs::read(&current).unwrap();
    let link = dir.path().join("link.csv");
    std::os::unix::fs::symlink(&current, &link).unwrap();
    for target in [current.clone(), dir.path().join("wh/research.csv"), link] {
        let out = q(&[
            sql,
            "--format",
            "csv",
            "--out",
            target.to_str().unwrap(),
            "--force",
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", target.display());
    }
    assert_eq!(fs::read(&current).unwrap(), pointer);
    // A file that is not SQL: refused without quoting it.
    let secret = dir.path().join("secret.txt");
    fs::write(&secret, "hunter2:x:0:0\n").unwrap();
    let leak = q(&["--file", secret.to_str().unwrap()]);
    assert_eq!(leak.status.code(), Some(2));
    assert!(
        !text(&leak.stderr).contains("hunter2"),
        "{}",
        text(&leak.stderr)
    );

    // min-cell: a threshold above every count suppresses all of them.
    let suppressed = q(&[sql, "--format", "csv", "--min-cell", "100000"]);
    assert!(
        text(&suppressed.stdout)
            .lines()
            .skip(1)
            .all(|l| l.ends_with(','))
    );

    // Refused: exit 2, a clear message, nothing written.
    let before = snapshot(dir.path());
    let target = dir.path().join("leak.csv");
    for bad in [
        format!("COPY person TO '{}'", target.display()),
        "SELECT * FROM '/etc/passwd'".to_string(),
        "DROP TABLE person".to_string(),
    ] {
        let out = q(&[&bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(
            text(&out.stderr).contains("query refused"),
            "{}",
            text(&out.stderr)
        );
    }
    let no_out = q(&[sql, "--format", "parquet"]);
    assert_eq!(no_out.status.code(), Some(2));
    // A memory limit too small for the query: exit 3 naming the limit; a
    // limit that is not a size: exit 2.
    let starved = q(&[
        "SELECT a.*, b.* FROM observation a CROSS JOIN observation b",
        "--memory-limit",
        "1M",
    ]);
    assert_eq!(starved.status.code(), Some(3), "{}", text(&starved.stderr));
    assert!(
        text(&starved.stderr).contains("limit of 1 MiB"),
        "{}",
        text(&starved.stderr)
    );
    assert_eq!(q(&[sql, "--memory-limit", "4X"]).status.code(), Some(2));
    // Functions whose memory the engine does not track stop the process
    // past twice the limit: exit 3, nothing written.
    let bounded = dir.path().join("bounded.csv");
    for greedy in [
        "SELECT length(repeat('x', 1500000000)) AS n",
        "SELECT count(*) AS n FROM (SELECT unnest(range(1, 1000000000)))",
        "SELECT length(string_agg(repeat(research_id, 100000), ',')) AS n FROM observation",
    ] {
        let out = q(&[
            greedy,
            "--memory-limit",
            "32M",
            "--out",
            bounded.to_str().unwrap(),
            "--format",
            "csv",
        ]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{greedy}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("twice its memory limit of 32 MiB"),
            "{}",
            text(&out.stderr)
        );
        assert!(!bounded.exists());
    }
    assert_eq!(q(&[sql, "--timeout", "0s"]).status.code(), Some(2));
    assert_eq!(before, snapshot(dir.path()));
}

fn rows_of(batches: &[datafusion::arrow::array::RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

/// Every file under `dir` with its modification time and length.
fn tree(dir: &Path) -> Vec<(PathBuf, std::time::SystemTime, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else {
                out.push((path, meta.modified().unwrap(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn measure_after_a_run_reads_the_published_run_and_never_writes_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let cfg = config.to_str().unwrap();
    let run = ward(dir.path(), &["--config", cfg, "-q", "run"]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    let wh = dir.path().join("wh");
    let run_id = fs::read_to_string(wh.join("runs/CURRENT")).unwrap();
    let run_dir = wh.join("runs").join(run_id.trim());
    let published = tree(&wh.join("runs"));

    let out = ward(dir.path(), &["--config", cfg, "measure"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let first = stdout.lines().next().unwrap();
    assert!(
        first.contains(&format!("published run {}", run_id.trim())),
        "{first}"
    );
    assert_eq!(
        snapshot(&wh.join("marts")),
        snapshot(&run_dir.join("marts")),
        "measure reproduces the published marts byte for byte"
    );

    let unlinked = ward(
        dir.path(),
        &["--config", cfg, "measure", "--unlinked", "--out"],
    )
    .status
    .code();
    assert_eq!(unlinked, Some(2), "--out needs a directory");
    let scratch = dir.path().join("unlinked");
    let out = ward(
        dir.path(),
        &[
            "--config",
            cfg,
            "measure",
            "--unlinked",
            "--out",
            scratch.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .lines()
            .next()
            .unwrap()
            .contains("UNLINKED")
    );
    assert_ne!(
        snapshot(&scratch.join("marts")),
        snapshot(&run_dir.join("marts")),
        "unlinked staging counts provider records, not persons"
    );

    let inside = ward(
        dir.path(),
        &[
            "--config",
            cfg,
            "measure",
            "--out",
            run_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(inside.status.code(), Some(2));
    assert!(text(&inside.stderr).contains("never written to"));
    assert_eq!(tree(&wh.join("runs")), published, "runs/ is untouched");
}

#[test]
fn warehouse_files_are_never_world_readable_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" -q --config \"$1\" run")
        .arg(env!("CARGO_BIN_EXE_ward"))
        .arg(&config)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut stack = vec![dir.path().join("wh")];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode & 0o027, 0, "{} is {mode:o}", path.display());
            seen += 1;
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    assert!(seen > 20, "the run wrote its warehouse");
}

#[test]
fn status_is_no_alarm_while_a_complete_run_is_being_published() {
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let wh = dir.path().join("wh");
    let run_dir = ward::runs::runs_dir(&wh).join("20991231T000000Z");
    fs::create_dir_all(&run_dir).unwrap();
    let mut manifest =
        ward::runs::Manifest::start("20991231T000000Z", Default::default(), Default::default());
    manifest.status = ward::runs::RunStatus::Complete;
    manifest.write(&run_dir).unwrap();
    let status = || {
        ward(
            dir.path(),
            &["--config", config.to_str().unwrap(), "status"],
        )
    };
    // The run holds the lock between its manifest and the rename: running.
    let lock = ward::runs::Lock::acquire(&wh, "ward run").unwrap();
    let out = status();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("publishing now"));
    // Nobody holds it: a complete run that never published is an alarm.
    drop(lock);
    assert_eq!(status().status.code(), Some(1));
}

#[test]
fn warehouse_group_is_given_to_every_file_and_inherited() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let config = copy_sample(dir.path());
    let toml = fs::read_to_string(&config).unwrap();
    // Our own group: the one group a test may always give files to.
    let gid = fs::metadata(dir.path()).unwrap().gid();
    fs::write(&config, format!("warehouse_group = \"{gid}\"\n{toml}")).unwrap();
    let cfg = config.to_str().unwrap();
    let out = ward(dir.path(), &["--config", cfg, "-q", "ingest"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut stack = vec![dir.path().join("wh")];
    let mut dirs = 0;
    while let Some(d) = stack.pop() {
        let meta = fs::metadata(&d).unwrap();
        assert_eq!(meta.gid(), gid, "{}", d.display());
        assert_ne!(meta.permissions().mode() & 0o2000, 0, "{}", d.display());
        dirs += 1;
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                assert_eq!(e.metadata().unwrap().gid(), gid);
            }
        }
    }
    assert!(dirs > 5, "staging and rejects were created");

    fs::write(
        &config,
        format!("warehouse_group = \"no-such-group-ward\"\n{toml}"),
    )
    .unwrap();
    let out = ward(dir.path(), &["--config", cfg, "-q", "ingest"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("warehouse_group"),
        "{}",
        text(&out.stderr)
    );
}
