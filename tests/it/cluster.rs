//! `[engine] kind = "ballista"`: the same nights on a Ballista cluster —
//! a `ward scheduler` and two `ward executor` processes on loopback —
//! publish exactly what the local engine publishes, and a night whose
//! executor dies leaves the published run intact.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET path` on the scheduler's REST API, when it answers.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// A JSON array from the REST API (`/api/executors`, `/api/jobs`).
fn api_list(port: u16, path: &str) -> Vec<serde_json::Value> {
    let body = http_get(port, path).unwrap_or_default();
    // Without chunked decoding: the array is the text between the first
    // '[' and the last ']'.
    let (Some(start), Some(end)) = (body.find('['), body.rfind(']')) else {
        return Vec::new();
    };
    serde_json::from_str(&body[start..=end]).unwrap_or_default()
}

/// A scheduler and `executors` executors of the `ward` binary on loopback,
/// each logging into its own file under `logs`.
struct Cluster {
    port: u16,
    logs: tempfile::TempDir,
    _scheduler: Process,
    executors: Vec<Process>,
}

impl Cluster {
    fn start(executors: usize) -> Cluster {
        let logs = tempfile::tempdir().unwrap();
        let log_dir = logs.path().to_path_buf();
        let port = free_port();
        let spawn = |name: &str, args: &[String]| {
            let log = std::fs::File::create(log_dir.join(format!("{name}.log"))).unwrap();
            Process(
                Command::new(env!("CARGO_BIN_EXE_ward"))
                    .args(args)
                    .env_remove("RUST_LOG")
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            )
        };
        let scheduler = spawn(
            "scheduler",
            &[
                "scheduler".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                // A killed executor is given up on after 20 s.
                "--executor-timeout".into(),
                "20".into(),
            ],
        );
        let mut cluster = Cluster {
            port,
            logs,
            _scheduler: scheduler,
            executors: Vec::new(),
        };
        cluster.wait_for("the scheduler", |c| {
            http_get(c.port, "/api/executors").is_some()
        });
        for n in 0..executors {
            let work = log_dir.join(format!("work-{n}"));
            std::fs::create_dir_all(&work).unwrap();
            let executor = spawn(
                &format!("executor-{n}"),
                &[
                    "executor".into(),
                    "--scheduler".into(),
                    format!("127.0.0.1:{port}"),
                    "--listen".into(),
                    format!("127.0.0.1:{}", free_port()),
                    "--grpc-port".into(),
                    free_port().to_string(),
                    "--slots".into(),
                    "2".into(),
                    "--heartbeat".into(),
                    "3".into(),
                    "--work-dir".into(),
                    work.display().to_string(),
                ],
            );
            cluster.executors.push(executor);
        }
        cluster.wait_for("the executors to register", |c| {
            api_list(c.port, "/api/executors").len() == executors
        });
        cluster
    }

    fn wait_for(&self, what: &str, ready: impl Fn(&Cluster) -> bool) {
        let start = Instant::now();
        while !ready(self) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The `[engine]` section that runs on this cluster.
    fn engine(&self) -> String {
        format!(
            "\n[engine]\nkind = \"ballista\"\nscheduler = \"df://127.0.0.1:{}\"\npartitions = 4\n",
            self.port
        )
    }

    /// The jobs the scheduler ran, by status.
    fn jobs(&self) -> Vec<(String, String)> {
        api_list(self.port, "/api/jobs")
            .iter()
            .map(|j| {
                (
                    j["job_id"].as_str().unwrap_or_default().to_string(),
                    j["status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// Every role's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.logs.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                out.push_str(&format!("--- {}\n", path.display()));
                for line in tail.into_iter().rev() {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// Appends `section` to the config at `config`.
fn append(config: &Path, section: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(config, format!("{text}{section}")).unwrap();
}

/// `ward run` with `config`; panics with its output (and the cluster's
/// logs) unless it published.
fn run(config: &Path, cluster: Option<&Cluster>) -> PathBuf {
    let dir = config.parent().unwrap();
    let config_arg = config.to_str().unwrap();
    let out = ward(
        dir,
        &["--config", config_arg, "--log-format", "json", "run"],
    );
    assert!(
        out.status.success(),
        "ward run failed: {}\n{}",
        text(&out.stderr),
        cluster.map(Cluster::logs).unwrap_or_default()
    );
    // Every stage's lines name it, also where a Ballista client polled
    // inside the stage's span on its own threads.
    let finished: Vec<serde_json::Value> = text(&out.stderr)
        .lines()
        .filter(|l| l.contains("stage finished"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(finished.len() >= 6);
    assert!(
        finished.iter().all(|l| l["stage"].is_string()),
        "{finished:#?}"
    );
    let config = ward::PipelineConfig::load(config).unwrap();
    ward::runs::current_dir(&config.warehouse).unwrap().unwrap()
}

/// Runs the site of `config` (copied to a second directory) on the local
/// engine and on `cluster`, and asserts both published the same core
/// tables, marts (measures, summary) and research tables.
fn same_on_both(config: &Path, cluster: &Cluster) {
    let copy = tempfile::tempdir().unwrap();
    let root = config.parent().unwrap().parent().unwrap();
    copy_dir(root, copy.path());
    let remote_config = copy.path().join(config.strip_prefix(root).unwrap());
    append(&remote_config, &cluster.engine());

    let local_dir = run(config, None);
    let jobs_before = cluster.jobs().len();
    let remote_dir = run(&remote_config, Some(cluster));
    let jobs = cluster.jobs();
    assert!(
        jobs.len() > jobs_before + 10,
        "the night's SQL ran on the cluster: {} jobs",
        jobs.len() - jobs_before
    );
    assert!(
        jobs.iter().all(|(_, status)| status == "Completed"),
        "{jobs:?}"
    );
    let (local, remote) = (derived(&local_dir), derived(&remote_dir));
    assert_eq!(
        local.keys().collect::<Vec<_>>(),
        remote.keys().collect::<Vec<_>>()
    );
    let with_rows = local.values().filter(|rows| rows.len() > 1).count();
    assert!(with_rows > 20, "only {with_rows} files have rows");
    for (file, rows) in &local {
        assert!(remote[file] == *rows, "{file} differs on the cluster");
    }
    // The summary (in the reports, which are named after the run).
    let summary = |run: &Path| {
        let id = run.file_name().unwrap();
        std::fs::read_to_string(run.join("reports").join(id).join("summary.csv")).unwrap()
    };
    assert_eq!(summary(&local_dir), summary(&remote_dir));
    // The scratch tables of the night are gone.
    let scratch = ward::PipelineConfig::load(&remote_config)
        .unwrap()
        .warehouse
        .join(".tmp/engine");
    assert!(
        !scratch.exists() || std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "{} is not empty",
        scratch.display()
    );
}

#[test]
fn the_sample_and_a_generated_population_publish_the_same_on_a_cluster() {
    let cluster = Cluster::start(2);
    let sample = tempfile::tempdir().unwrap();
    same_on_both(&copy_sample(sample.path()), &cluster);

    let generated = tempfile::tempdir().unwrap();
    let site = generated.path().join("site");
    generate(&site, 2_000, 3, 7, 0.02);
    same_on_both(&site.join("ward.toml"), &cluster);
}

#[test]
fn a_night_whose_executor_dies_fails_cleanly_or_recovers_and_the_published_run_stays() {
    let mut cluster = Cluster::start(2);
    let tmp = tempfile::tempdir().unwrap();
    let site = tmp.path().join("site");
    generate(&site, 3_000, 3, 11, 0.02);
    let config = site.join("ward.toml");
    append(&config, &cluster.engine());
    let published = run(&config, Some(&cluster));
    let warehouse = ward::PipelineConfig::load(&config).unwrap().warehouse;
    let before = snapshot(&published);

    // A full night (nothing reused), killed of one executor as soon as
    // its measures stage starts.
    let mut night = Command::new(env!("CARGO_BIN_EXE_ward"))
        .args(["--config", config.to_str().unwrap(), "run", "--full"])
        .current_dir(&site)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut killed = false;
    for line in BufReader::new(night.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if !killed && line.contains("measures") {
            drop(cluster.executors.remove(0));
            killed = true;
        }
        log.push_str(&line);
        log.push('\n');
    }
    let status = night.wait().unwrap();
    assert!(killed, "the night never reached its measures:\n{log}");
    let current = ward::runs::current_dir(&warehouse).unwrap().unwrap();
    eprintln!(
        "the night whose executor was killed {}",
        if status.success() {
            "recovered"
        } else {
            "failed"
        }
    );
    if status.success() {
        // Ballista ran the lost tasks again on the other executor.
        assert_ne!(current, published);
        assert_eq!(derived(&current), derived(&published), "{log}");
    } else {
        // The night failed and said so; the published run is untouched.
        assert_eq!(current, published, "{log}");
        assert_eq!(snapshot(&published), before);
        assert!(log.contains("error"), "{log}");
    }
    // Either way the cluster goes on: a night on the one executor left.
    let again = run(&config, Some(&cluster));
    assert_eq!(derived(&again), derived(&published));
}

#[test]
fn a_night_whose_scheduler_is_down_stops_before_reading_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let config = copy_sample(tmp.path());
    append(
        &config,
        &format!(
            "\n[engine]\nkind = \"ballista\"\nscheduler = \"df://127.0.0.1:{}\"\n",
            free_port()
        ),
    );
    let out = ward(tmp.path(), &["--config", config.to_str().unwrap(), "run"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot reach the Ballista scheduler"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !tmp.path().join("wh/staging").exists(),
        "nothing was ingested"
    );
}
