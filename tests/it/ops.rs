//! Nightly operations through the real binary: kill -9 at every stage and
//! during publication, two runs at once, data-quality gates, `ward runs`
//! and `ward status`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use crate::common::*;
use ward::PipelineConfig;

fn ward(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ward"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn spawn_run(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ward"))
        .arg("--config")
        .arg(config)
        .args(["--log-format", "json", "run"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn current(warehouse: &Path) -> Option<String> {
    ward::runs::current(warehouse).unwrap()
}

/// The invariant readers rely on: the current run, if any, is complete —
/// its manifest lists every output and every file has the listed hash.
fn assert_current_is_whole(warehouse: &Path) -> Option<String> {
    let id = current(warehouse)?;
    let dir = ward::runs::runs_dir(warehouse).join(&id);
    let manifest = ward::runs::Manifest::load(&dir).unwrap();
    assert_eq!(manifest.status, ward::runs::RunStatus::Complete);
    assert!(!manifest.outputs.is_empty());
    assert_eq!(
        ward::runs::list_outputs(&dir).unwrap(),
        manifest.outputs,
        "run {id}: files on disk differ from its manifest"
    );
    Some(id)
}

fn summary(warehouse: &Path, id: &str) -> String {
    let dir = ward::runs::runs_dir(warehouse)
        .join(id)
        .join("reports")
        .join(id);
    fs::read_to_string(dir.join("summary.csv")).unwrap()
}

/// Starts `ward run` and kills it with SIGKILL as soon as a JSON log line
/// contains `marker`; returns whether the marker was seen before the run
/// ended on its own.
fn kill_at(config: &Path, marker: &str) -> bool {
    let mut child = spawn_run(config);
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = false;
    for line in stderr.lines() {
        if line.unwrap().contains(marker) {
            seen = true;
            child.kill().unwrap(); // SIGKILL
            break;
        }
    }
    child.wait().unwrap();
    seen
}

/// Rewrites a delivery with only its first `n` lines.
fn keep_lines(path: &Path, n: usize) {
    let text = fs::read_to_string(path).unwrap();
    let kept: Vec<&str> = text.lines().take(n).collect();
    fs::write(path, kept.join("\n") + "\n").unwrap();
}

#[test]
fn killing_a_run_anywhere_leaves_the_published_run_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let config = copy_sample(tmp.path());
    let warehouse = tmp.path().join("wh");

    // Killed during its very first ingest: nothing is published, and the
    // next run completes from scratch.
    assert!(kill_at(&config, r#""stage":"ingest""#));
    assert_eq!(current(&warehouse), None);

    let first = ward(&config, &["run"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let published = assert_current_is_whole(&warehouse).unwrap();
    let baseline = summary(&warehouse, &published);
    let before = snapshot(&ward::runs::runs_dir(&warehouse).join(&published));

    // A corrected delivery (the last 20 visits withdrawn), so the next
    // runs have ingest work to be killed in.
    let visits = tmp.path().join("sample_data/northside_clinic/visits.csv");
    let lines = fs::read_to_string(&visits).unwrap().lines().count();
    keep_lines(&visits, lines - 20);

    // Whether the run killed right at its publishing step got to publish:
    // the kill races the rename, and either outcome is whole.
    let mut killed_run_published = false;
    for marker in [
        r#""stage":"ingest""#,
        r#""stage":"link""#,
        r#""stage":"build""#,
        r#""stage":"measures""#,
        r#""stage":"report""#,
        r#""stage":"deid""#,
        r#""message":"publishing""#,
    ] {
        assert!(kill_at(&config, marker), "the run never reached {marker}");
        let now = assert_current_is_whole(&warehouse);
        if marker.contains("publishing") {
            // Killed around the one atomic step: either run, but whole.
            assert!(now.is_some());
            killed_run_published = now.as_deref() != Some(published.as_str());
        } else {
            assert_eq!(
                now.as_deref(),
                Some(published.as_str()),
                "killed at {marker}"
            );
            assert_eq!(
                snapshot(&ward::runs::runs_dir(&warehouse).join(&published)),
                before,
                "the published run changed when a run was killed at {marker}"
            );
        }
        let status = ward(&config, &["status"]);
        assert!(text(&status.stdout).contains("current run: "));
    }

    // The next run completes, removes what the killed runs left, and
    // computes what an uninterrupted run computes on the same inputs.
    let next = ward(&config, &["run"]);
    assert!(next.status.success(), "{}", text(&next.stderr));
    let last = assert_current_is_whole(&warehouse).unwrap();
    assert_ne!(last, published);
    for entry in fs::read_dir(ward::runs::runs_dir(&warehouse)).unwrap() {
        let p = entry.unwrap().path();
        if p.ends_with(".readers") {
            // Readers' leases (`ward serve`): a lock file per run at most.
            continue;
        } else if p.is_dir() {
            assert!(p.join("manifest.json").exists(), "orphan {}", p.display());
        } else {
            let name = p.file_name().unwrap().to_string_lossy();
            assert!(
                [ward::runs::CURRENT, ward::runs::HASHES].contains(&name.as_ref()),
                "stray {}",
                p.display()
            );
        }
    }
    let tmp_files = fs::read_dir(warehouse.join(".tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(tmp_files, 0, "partial files left under .tmp/");

    let fresh = tempfile::tempdir().unwrap();
    fs::create_dir_all(fresh.path().join("sample_data")).unwrap();
    copy_dir(
        &tmp.path().join("sample_data"),
        &fresh.path().join("sample_data"),
    );
    let fresh_config = fresh.path().join("sample_data/ward.toml");
    assert!(ward(&fresh_config, &["run"]).status.success());
    let fresh_id = current(&fresh.path().join("wh")).unwrap();
    assert_eq!(
        summary(&warehouse, &last),
        summary(&fresh.path().join("wh"), &fresh_id),
        "a run after interruptions differs from an uninterrupted one"
    );
    let manifest =
        ward::runs::Manifest::load(&ward::runs::runs_dir(&warehouse).join(&last)).unwrap();
    let delivered = manifest
        .inputs
        .iter()
        .find(|f| f.source == "northside_clinic" && f.file == "visits.csv")
        .unwrap();
    // New since the last published run — unless the killed run published it.
    assert_eq!(
        delivered.new, !killed_run_published,
        "the corrected file is a new delivery unless the killed run published it"
    );
    // The first run's results, on the first delivery, are still on record.
    assert_eq!(summary(&warehouse, &published), baseline);
}

#[test]
fn two_runs_at_once_exactly_one_proceeds() {
    let tmp = tempfile::tempdir().unwrap();
    let config = copy_sample(tmp.path());
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_ward"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outputs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let codes: Vec<Option<i32>> = outputs.iter().map(|o| o.status.code()).collect();
    assert!(
        codes.contains(&Some(0)) && codes.contains(&Some(4)),
        "expected one success and one 'locked' (4): {codes:?}"
    );
    let refused = outputs.iter().find(|o| o.status.code() == Some(4)).unwrap();
    let err = text(&refused.stderr);
    assert!(err.contains("locked by pid "), "{err}");
    assert!(err.contains("ward run"), "{err}");
    // One run directory, published.
    let listing = ward::runs::list(&tmp.path().join("wh")).unwrap();
    assert_eq!(listing.len(), 1);
    assert_eq!(listing[0].status(), "current");
}

#[test]
fn a_source_with_too_many_rejects_fails_the_gate_and_publishes_nothing_new() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pop");
    let synth = |bad_rate: f64, out: &Path| generate(out, 150, 2, 5, bad_rate);
    synth(0.0, &out);
    let config = out.join("ward.toml");
    let warehouse = PipelineConfig::load(&config).unwrap().warehouse;
    let ok = ward(&config, &["run"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let published = current(&warehouse).unwrap();

    // The same providers re-deliver with a fifth of their rows broken.
    let bad = tmp.path().join("bad");
    synth(0.2, &bad);
    let manifest =
        ward::runs::Manifest::load(&ward::runs::runs_dir(&warehouse).join(&published)).unwrap();
    let source = manifest.sources[0].source.clone();
    copy_dir(&bad.join(&source), &out.join(&source));
    let failed = ward(&config, &["run"]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed.stderr));
    let err = text(&failed.stderr);
    assert!(err.contains("data-quality gate failed"), "{err}");
    assert!(err.contains(&format!("source '{source}'")), "{err}");
    assert_eq!(current(&warehouse).as_deref(), Some(published.as_str()));

    let runs = ward::runs::list(&warehouse).unwrap();
    assert_eq!(runs[0].status(), "failed");
    let m = runs[0].manifest.as_ref().unwrap();
    assert!(m.error.as_deref().unwrap().contains(&source));
    assert!(m.gates.iter().any(|g| g.gate == "reject_rate"
        && g.source == source
        && g.outcome == ward::runs::GateOutcome::Fail));
    let status = ward(&config, &["status"]);
    assert_eq!(status.status.code(), Some(1));
    let said = text(&status.stdout);
    assert!(
        said.contains(&format!("current run: {published}")),
        "{said}"
    );
    assert!(
        said.contains("failed") && said.contains("gate reject_rate"),
        "{said}"
    );
    let listed = ward(&config, &["runs"]);
    assert!(listed.status.success());
    assert!(text(&listed.stdout).contains("failed"));
}

#[test]
fn a_nightly_source_that_delivers_nothing_fails_and_a_drop_in_rows_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let config = copy_sample(tmp.path());
    let warehouse = tmp.path().join("wh");
    let text_ = fs::read_to_string(&config).unwrap();
    // Northside delivers every night; the sample's hospital rejects ~1.7 %.
    fs::write(
        &config,
        text_.replace(
            "name = \"northside_clinic\"",
            "name = \"northside_clinic\"\nnightly = true",
        ) + "\n[gates]\nwarn_reject_rate = 0.02\nmax_row_drop = 0.1\n",
    )
    .unwrap();
    let first = ward(&config, &["run"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    // Same files again: nothing new from the nightly source.
    let again = ward(&config, &["run"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("northside_clinic' is expected nightly"));

    // A delivery with half the visits, results and assessments: more than
    // a 10 % drop of the source's rows.
    for file in ["visits.csv", "results.csv", "assessments.csv"] {
        let path = tmp.path().join("sample_data/northside_clinic").join(file);
        let lines = fs::read_to_string(&path).unwrap().lines().count();
        keep_lines(&path, lines / 2);
    }
    let dropped = ward(&config, &["run"]);
    assert_eq!(dropped.status.code(), Some(1));
    let err = text(&dropped.stderr);
    assert!(
        err.contains("source 'northside_clinic'") && err.contains("drop of"),
        "{err}"
    );
    // Both failed runs are on record; the first run is still current.
    let runs = ward::runs::list(&warehouse).unwrap();
    assert_eq!(
        runs.iter().map(|r| r.status()).collect::<Vec<_>>(),
        ["failed", "failed", "current"]
    );
}

#[test]
fn old_runs_are_pruned_and_the_history_keeps_every_published_run() {
    let tmp = tempfile::tempdir().unwrap();
    let config_path = copy_sample(tmp.path());
    let text_ = fs::read_to_string(&config_path).unwrap();
    fs::write(&config_path, text_ + "\n[runs]\nkeep = 2\n").unwrap();
    let config = PipelineConfig::load(&config_path).unwrap();
    // The first report has no trend yet; the third draws the two before it
    // (even once the first run's directory is pruned).
    let html = |r: &ward::RunReport| fs::read_to_string(&r.report_html).unwrap();
    let first = run_all(&config);
    assert!(html(&first).contains("first run on record"));
    let runs = [first, run_all(&config), run_all(&config)];
    let ids: Vec<String> = runs.iter().map(|r| r.run_id.clone()).collect();
    assert!(!html(&runs[2]).contains("first run on record"));
    assert!(html(&runs[2]).contains(&ids[0]) && html(&runs[2]).contains(&ids[1]));
    let listing = ward::runs::list(&config.warehouse).unwrap();
    assert_eq!(
        listing.iter().map(|r| r.run_id.clone()).collect::<Vec<_>>(),
        [ids[2].clone(), ids[1].clone()]
    );
    // A run writes nothing outside its directory but the shared ingest tree.
    let mut top: Vec<String> = fs::read_dir(&config.warehouse)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(
        top,
        [".tmp", "rejects", "runs", "staging", "state", "ward.lock"]
    );
    let current_dir = ward::runs::current_dir(&config.warehouse).unwrap();
    let history = ward::runs::load_history(current_dir.as_deref()).unwrap();
    assert_eq!(
        history.iter().map(|h| h.run_id.clone()).collect::<Vec<_>>(),
        ids
    );
    // The manifest reconciles with the ingest report and lists the PHI.
    let m = &listing[0].manifest.as_ref().unwrap();
    let read: u64 = m.sources.iter().map(|t| t.rows_read).sum();
    let accepted: u64 = m.sources.iter().map(|t| t.rows_accepted).sum();
    let rejected: u64 = m.sources.iter().map(|t| t.rows_rejected).sum();
    assert_eq!(read, accepted + rejected);
    assert!(
        m.inputs
            .iter()
            .all(|f| f.sha256.as_ref().is_some_and(|h| h.len() == 64))
    );
    assert_eq!(m.phi_outputs.len(), 3);
    for phi in &m.phi_outputs {
        assert!(
            m.outputs.iter().any(|o| &o.path == phi),
            "{phi} not among outputs"
        );
    }
    assert_eq!(
        m.stages
            .iter()
            .map(|s| s.stage.as_str())
            .collect::<Vec<_>>(),
        [
            "ingest", "link", "build", "dq", "measures", "report", "deid"
        ]
    );
}

#[test]
fn json_logs_name_the_run_and_stage_on_every_line_of_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let config = copy_sample(tmp.path());
    let out = ward(&config, &["--log-format", "json", "run"]);
    assert!(out.status.success());
    let id = current(&tmp.path().join("wh")).unwrap();
    let lines: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let in_run: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("run_id").is_some()).collect();
    assert!(in_run.len() > 10);
    // Every line but the binary's own before the run starts (configuration,
    // the demo-key warning) belongs to the run.
    let outside: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("run_id").is_none()).collect();
    assert!(
        outside.iter().all(|l| l["message"] == "configuration"
            || l["message"]
                .as_str()
                .unwrap()
                .starts_with("DE-IDENTIFYING WITH THE PUBLIC DEMO KEY")),
        "{outside:#?}"
    );
    assert!(in_run.iter().all(|l| l["run_id"] == id.as_str()));
    let stages: std::collections::BTreeSet<&str> =
        in_run.iter().filter_map(|l| l["stage"].as_str()).collect();
    for s in [
        "ingest", "link", "build", "measures", "report", "deid", "publish",
    ] {
        assert!(stages.contains(s), "no line for stage {s}");
    }
    // Lines logged by worker threads carry the stage too.
    assert!(
        lines
            .iter()
            .filter(|l| l["message"] == "mapped")
            .all(|l| l["stage"] == "ingest")
    );
}
