//! `ward serve`: the Flight SQL endpoint, through a real client (arrow's
//! Flight SQL client here; the Python ADBC driver in `adbc_client_*`),
//! against the `ward` binary on a random port.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{
    CommandGetDbSchemas, CommandGetImportedKeys, CommandGetPrimaryKeys, CommandGetTables,
    CommandGetXdbcTypeInfo, SqlInfo,
};
use arrow_flight::{FlightInfo, Ticket};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use futures::TryStreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::common::*;
use crate::research::escape_attempts;

/// A `ward serve` process, killed when dropped.
struct Server {
    _child: Process,
    addr: String,
}

/// A copy of the shared sample run (its warehouse and config) with
/// `serve` appended to the config as its `[serve]` section.
struct Site {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
}

impl Site {
    fn new(serve: &str) -> Site {
        let run = sample_run();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        copy_dir(&run.dir, &root);
        let config = root.join("sample_data").join("ward.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("{text}\n[serve]\n{serve}\n")).unwrap();
        Site {
            _dir: dir,
            root,
            config,
        }
    }

    fn warehouse(&self) -> PathBuf {
        self.root.join("wh")
    }

    fn research(&self) -> PathBuf {
        ward::runs::current_dir(&self.warehouse())
            .unwrap()
            .unwrap()
            .join("research")
    }

    fn ward(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend(args);
        ward(&self.root, &all)
    }

    /// Issues a token through `ward serve token add`.
    fn token(&self, name: &str, tables: Option<&str>) -> String {
        let mut args = vec!["serve", "token", "add", name];
        if let Some(t) = tables {
            args.extend(["--tables", t]);
        }
        let out = self.ward(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let token = text(&out.stdout).trim().to_string();
        assert!(token.starts_with("ward_"), "{token}");
        token
    }

    fn start(&self) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ward"))
            .args(["--config", self.config.to_str().unwrap(), "-q", "serve"])
            .args(["--listen", "127.0.0.1:0"])
            .current_dir(&self.root)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("ward serve did not start: {line:?}"))
            .to_string();
        Server {
            _child: Process(child),
            addr,
        }
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.warehouse().join("serve/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

type Client = FlightSqlServiceClient<Channel>;

async fn client(server: &Server, token: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_token(token.to_string());
    client
}

/// Every endpoint of `info`, fetched and collected.
async fn fetch(client: &mut Client, info: FlightInfo) -> Result<Vec<RecordBatch>, FlightError> {
    let mut out = Vec::new();
    for endpoint in info.endpoint {
        let ticket: Ticket = endpoint.ticket.expect("a ticket");
        let batches: Vec<RecordBatch> = client.do_get(ticket).await?.try_collect().await?;
        out.extend(batches);
    }
    Ok(out)
}

async fn sql(client: &mut Client, sql: &str) -> Result<Vec<RecordBatch>, FlightError> {
    let info = client.execute(sql.to_string(), None).await?;
    fetch(client, info).await
}

/// The gRPC status of a failed call: its code and message.
fn status<T: std::fmt::Debug>(result: Result<T, FlightError>) -> (tonic::Code, String) {
    match result {
        Err(FlightError::Tonic(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC error status, got {other:?}"),
    }
}

fn table(batches: &[RecordBatch]) -> String {
    pretty_format_batches(batches).unwrap().to_string()
}

/// `ward query`'s answer to the same SQL, as a table.
fn local(research: &Path, sql: &str, min_cell: Option<u64>) -> String {
    let opts = ward::query::QueryOptions {
        min_cell,
        ..Default::default()
    };
    table(&ward::query::query(research, sql, &opts).unwrap().batches)
}

fn strings_of(batches: &[RecordBatch], column: &str) -> Vec<String> {
    strings(batches, column).into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_researcher_queries_the_research_tables_as_ward_query_does() {
    let site = Site::new("insecure = true\nmin_cell = 11");
    let token = site.token("alice", None);
    let server = site.start();
    let mut c = client(&server, &token).await;
    let research = site.research();

    // Analytical SQL answers as `ward query` does, small counts suppressed
    // by the server's min_cell; qualified names as the metadata gives them.
    for q in [
        "SELECT age_band, count(*) AS n FROM person GROUP BY age_band ORDER BY age_band",
        "SELECT sex, count(*) AS n FROM research.person GROUP BY sex ORDER BY sex",
        "SELECT count(*) AS n FROM ward.research.observation o JOIN person p USING (research_id)",
        "SELECT * FROM person ORDER BY research_id LIMIT 5",
    ] {
        let remote = table(&sql(&mut c, q).await.unwrap());
        assert_eq!(remote, local(&research, q, Some(11)), "{q}");
    }
    let small = "SELECT age_band, count(*) AS n FROM person GROUP BY age_band";
    assert_ne!(
        local(&research, small, None),
        local(&research, small, Some(11))
    );

    // An empty result still carries its schema.
    let none = c
        .execute("SELECT research_id FROM person WHERE false".into(), None)
        .await
        .unwrap();
    let schema = none.clone().try_decode_schema().unwrap();
    assert_eq!(schema.field(0).name(), "research_id");
    // Plain strings on the wire (views would resend their buffers with
    // every slice, and older clients cannot read them).
    assert_eq!(
        schema.field(0).data_type(),
        &datafusion::arrow::datatypes::DataType::Utf8
    );
    assert!(
        fetch(&mut c, none)
            .await
            .unwrap()
            .iter()
            .all(|b| b.num_rows() == 0)
    );

    // A prepared statement (read-only, no parameters) runs like a statement.
    let mut prepared = c
        .prepare("SELECT count(*) AS n FROM observation".into(), None)
        .await
        .unwrap();
    assert_eq!(prepared.dataset_schema().unwrap().field(0).name(), "n");
    let info = prepared.execute().await.unwrap();
    assert_eq!(
        table(&fetch(&mut c, info).await.unwrap()),
        local(&research, "SELECT count(*) AS n FROM observation", Some(11))
    );
    prepared.close().await.unwrap();

    // Metadata: the research tables and nothing else, with their schemas.
    let research_tables: Vec<String> = ward::query::research_tables(&research)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let info = c.get_catalogs().await.unwrap();
    assert_eq!(
        strings_of(&fetch(&mut c, info).await.unwrap(), "catalog_name"),
        ["ward"]
    );
    let info = c
        .get_db_schemas(CommandGetDbSchemas::default())
        .await
        .unwrap();
    assert_eq!(
        strings_of(&fetch(&mut c, info).await.unwrap(), "db_schema_name"),
        ["research"]
    );
    let info = c
        .get_tables(CommandGetTables {
            include_schema: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let tables = fetch(&mut c, info).await.unwrap();
    assert_eq!(strings_of(&tables, "table_name"), research_tables);
    let info = c
        .get_tables(CommandGetTables {
            table_name_filter_pattern: Some("obs%".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        strings_of(&fetch(&mut c, info).await.unwrap(), "table_name"),
        ["observation"]
    );
    let info = c.get_table_types().await.unwrap();
    assert_eq!(
        strings_of(&fetch(&mut c, info).await.unwrap(), "table_type"),
        ["TABLE"]
    );
    let info = c
        .get_sql_info(vec![
            SqlInfo::FlightSqlServerName,
            SqlInfo::FlightSqlServerReadOnly,
        ])
        .await
        .unwrap();
    assert_eq!(fetch(&mut c, info).await.unwrap()[0].num_rows(), 2);
    // JDBC's getTypeInfo and key look-ups: the research tables' types, no keys.
    let info = c
        .get_xdbc_type_info(CommandGetXdbcTypeInfo::default())
        .await
        .unwrap();
    let types = strings_of(&fetch(&mut c, info).await.unwrap(), "type_name");
    for t in ["BIGINT", "VARCHAR", "DATE", "TIMESTAMP"] {
        assert!(types.iter().any(|n| n == t), "{types:?}");
    }
    let info = c
        .get_primary_keys(CommandGetPrimaryKeys {
            table: "person".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows(&fetch(&mut c, info).await.unwrap()), 0);
    let info = c
        .get_imported_keys(CommandGetImportedKeys {
            table: "observation".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows(&fetch(&mut c, info).await.unwrap()), 0);

    // Every request is audited: who, what, which run and tables, how
    // much, how it ended; never a result value.
    let audit = site.audit();
    let run_id = ward::runs::current(&site.warehouse()).unwrap().unwrap();
    let executed: Vec<_> = audit.iter().filter(|a| a["call"] == "execute").collect();
    assert_eq!(executed.len(), 6, "{audit:#?}");
    for a in &audit {
        assert_eq!(a["researcher"], "alice");
        assert_eq!(a["outcome"], "ok", "{a}");
        assert!(a["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    let join = executed
        .iter()
        .find(|a| a["statement"].as_str().unwrap().contains("JOIN"))
        .unwrap();
    assert_eq!(join["tables"], serde_json::json!(["observation", "person"]));
    assert_eq!(join["run"], run_id.as_str());
    assert_eq!(join["rows"], 1);
    assert!(join["bytes"].as_u64().unwrap() > 0);
    assert_eq!(join["statement_sha256"].as_str().unwrap().len(), 64);
    let audit_text = std::fs::read_to_string(site.warehouse().join("serve/audit.jsonl")).unwrap();
    let ids = strings_of(
        &sql(&mut c, "SELECT research_id FROM person LIMIT 5")
            .await
            .unwrap(),
        "research_id",
    );
    for id in ids {
        assert!(!audit_text.contains(&id), "a result value in the audit log");
    }
    for call in [
        "statement",
        "prepare",
        "prepared_statement",
        "catalogs",
        "schemas",
        "tables",
        "table_types",
        "sql_info",
        "type_info",
        "primary_keys",
        "imported_keys",
    ] {
        assert!(audit.iter().any(|a| a["call"] == call), "no {call} audited");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_bad_tokens_and_writes_are_refused_and_the_server_stays_up() {
    let site = Site::new("insecure = true");
    let alice = site.token("alice", None);
    let bob = site.token("bob", Some("observation"));
    let server = site.start();
    let mut a = client(&server, &alice).await;

    // Every escape attempt of `ward query`'s list, as a statement and as
    // a prepared statement: refused with `ward query`'s message.
    let tmp = tempfile::tempdir().unwrap();
    for attempt in escape_attempts(tmp.path(), &site.research()) {
        let (code, message) = status(sql(&mut a, &attempt).await);
        assert_eq!(code, tonic::Code::PermissionDenied, "{attempt}: {message}");
        assert!(
            message.starts_with("query refused: "),
            "{attempt}: {message}"
        );
        let (code, _) = status(a.prepare(attempt.clone(), None).await);
        assert_eq!(code, tonic::Code::PermissionDenied, "{attempt}");
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    // Writes through the Flight SQL update and ingest calls.
    let (code, message) = status(a.execute_update("DELETE FROM person".into(), None).await);
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(message.contains("read-only"), "{message}");
    // Invalid SQL is an error of its own.
    let (code, message) = status(sql(&mut a, "SELECT nope FROM person").await);
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");

    // No token, a wrong one, a truncated one: refused before anything.
    for token in ["", "ward_wrong", &alice[..alice.len() - 2]] {
        let mut c = client(&server, token).await;
        assert_eq!(
            status(sql(&mut c, "SELECT 1").await).0,
            tonic::Code::Unauthenticated
        );
    }
    // HTTP Basic in a handshake: the researcher's name and token.
    let mut h = client(&server, "").await;
    h.clear_token();
    assert!(h.handshake("mallory", &alice).await.is_err());
    h.handshake("alice", &alice).await.unwrap();
    assert_eq!(sql(&mut h, "SELECT 1 AS x").await.unwrap()[0].num_rows(), 1);

    // A token limited to some tables sees and reads only those.
    let mut b = client(&server, &bob).await;
    let info = b.get_tables(CommandGetTables::default()).await.unwrap();
    assert_eq!(
        strings_of(&fetch(&mut b, info).await.unwrap(), "table_name"),
        ["observation"]
    );
    assert!(
        sql(&mut b, "SELECT count(*) FROM observation")
            .await
            .is_ok()
    );
    let (code, message) = status(sql(&mut b, "SELECT count(*) FROM person").await);
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(
        message.contains("not a research table (tables: observation)"),
        "{message}"
    );
    // ... and cannot use a ticket issued to alice (for person).
    let info = a
        .execute("SELECT count(*) FROM person".into(), None)
        .await
        .unwrap();
    let (code, message) = status(fetch(&mut b, info).await);
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(message.contains("another researcher"), "{message}");

    // Revoked: refused from the next request on, without a restart.
    let out = site.ward(&["serve", "token", "revoke", "alice"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        status(sql(&mut a, "SELECT 1").await).0,
        tonic::Code::Unauthenticated
    );
    assert!(
        sql(&mut b, "SELECT 1").await.is_ok(),
        "the server is still up"
    );
    let listed = text(&site.ward(&["serve", "token", "list"]).stdout);
    assert!(listed.contains("alice") && listed.contains("bob") && !listed.contains(&bob));

    let audit = site.audit();
    let outcomes = |o: &str| audit.iter().filter(|a| a["outcome"] == o).count();
    assert!(outcomes("refused") >= 2 * escape_attempts(tmp.path(), &site.research()).len());
    assert_eq!(outcomes("unauthenticated"), 5, "{audit:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_published_and_pruned_while_a_query_streams_does_not_break_it() {
    let site = Site::new("insecure = true\nmax_concurrent = 1\nmax_queued = 0");
    let token = site.token("alice", None);
    let server = site.start();
    let mut c = client(&server, &token).await;
    let wh = site.warehouse();
    let first = ward::runs::current(&wh).unwrap().unwrap();

    // A result of many batches, read slowly: one batch, then the night.
    let rows_wanted = 300_000;
    let big = format!(
        "SELECT p.research_id, n FROM person p CROSS JOIN UNNEST(range({rows_wanted})) AS t(n) \
         LIMIT {rows_wanted}"
    );
    let info = c.execute(big.clone(), None).await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let mut stream = c.do_get(ticket).await.unwrap();
    let mut rows = stream.try_next().await.unwrap().unwrap().num_rows();

    // One slot, none queued: a second query is refused at once as busy.
    let (code, message) = status(sql(&mut client(&server, &token).await, "SELECT 1").await);
    assert_eq!(code, tonic::Code::ResourceExhausted);
    assert!(message.contains("server busy"), "{message}");

    // Two nights publish (copies of the run) and prune to one kept: the
    // run being read stays while it is read.
    let runs = ward::runs::runs_dir(&wh);
    let mut history = ward::runs::load_history(Some(&runs.join(&first))).unwrap();
    // A night: the run `from` copied as `first-night`, then published.
    let mut night = |from: &str, night: &str| {
        let id = format!("{first}-{night}");
        copy_dir(&runs.join(from), &runs.join(&id));
        let mut entry = history.last().unwrap().clone();
        entry.run_id = id.clone();
        ward::runs::write_history(&runs.join(&id), history.clone(), entry.clone()).unwrap();
        history.push(entry);
        ward::runs::publish(&wh, &id).unwrap();
    };
    night(&first, "2");
    night(&first, "3");
    assert_eq!(ward::runs::prune(&wh, 1).unwrap(), Vec::<String>::new());
    assert!(runs.join(&first).exists());

    // The stream reads to its end, whole.
    while let Some(batch) = stream.try_next().await.unwrap() {
        rows += batch.num_rows();
    }
    assert_eq!(rows, rows_wanted);
    // New statements read the new run; the old one is free to prune once
    // its audit line is written (the query thread's last act).
    let n = sql(&mut c, "SELECT count(*) AS n FROM person")
        .await
        .unwrap();
    assert_eq!(n[0].num_rows(), 1);
    let audit = site.audit();
    let execs: Vec<_> = audit.iter().filter(|a| a["call"] == "execute").collect();
    assert_eq!(execs[0]["run"], first.as_str());
    assert_eq!(execs[0]["rows"], rows_wanted);
    assert_eq!(execs.last().unwrap()["run"], format!("{first}-3").as_str());
    assert_eq!(ward::runs::prune(&wh, 1).unwrap(), vec![first.clone()]);

    // A ticket for a pruned run: a clear error asking to run it again.
    let stale = c.execute(big, None).await.unwrap();
    night(&format!("{first}-3"), "4");
    night(&format!("{first}-3"), "5");
    ward::runs::prune(&wh, 1).unwrap();
    let (_, message) = status(fetch(&mut c, stale).await);
    assert!(message.contains("run the statement again"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_unless_insecure_and_serves_with_a_certificate() {
    // Neither TLS nor insecure: refused at start with what to set.
    let site = Site::new("");
    let out = site.ward(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("tls_cert"),
        "{}",
        text(&out.stderr)
    );

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let site = Site::new(&format!(
        "tls_cert = {:?}\ntls_key = {:?}",
        cert_path.display().to_string(),
        key_path.display().to_string()
    ));
    let token = site.token("alice", None);
    let server = site.start();
    let port = server.addr.rsplit(':').next().unwrap();
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(cert.cert.pem()))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = FlightSqlServiceClient::new(channel);
    c.set_token(token.clone());
    assert_eq!(
        sql(&mut c, "SELECT count(*) FROM person").await.unwrap()[0].num_rows(),
        1
    );
    // Plaintext to a TLS server gets nowhere.
    let mut plain = client(&server, &token).await;
    assert!(sql(&mut plain, "SELECT 1").await.is_err());
}

/// The Python ADBC Flight SQL driver, as researchers use it: the script
/// `tests/serve/adbc_client.py` connects with a token, reads query results
/// into pyarrow tables, lists the tables, and checks refusals; it prints
/// what it read, compared here with `ward query`. `.ci/run` installs the
/// driver into `~/.cache/ward-adbc-venv` and names its Python in
/// `WARD_ADBC_PYTHON` (the default), with `WARD_REQUIRE_ADBC`; elsewhere
/// the test is skipped with a message when that venv is missing.
#[test]
fn the_python_adbc_driver_connects_queries_and_is_refused_escapes() {
    let python = std::env::var_os("WARD_ADBC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/ward-adbc-venv/bin/python")
        });
    if !python.exists() {
        assert!(
            std::env::var_os("WARD_REQUIRE_ADBC").is_none(),
            "{} is missing and WARD_REQUIRE_ADBC is set",
            python.display()
        );
        eprintln!(
            "skipped: no ADBC driver at {} (see .ci/run)",
            python.display()
        );
        return;
    }
    let site = Site::new("insecure = true");
    let token = site.token("alice", None);
    let server = site.start();
    let out = Command::new(&python)
        .arg(repo().join("tests/serve/adbc_client.py"))
        .arg(format!("grpc://{}", server.addr))
        .arg(&token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let research = site.research();
    let persons = ward::query::query(
        &research,
        "SELECT count(*) AS n FROM person",
        &Default::default(),
    )
    .unwrap();
    let n = persons.batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(report["persons"], n);
    let mut tables: Vec<String> = ward::query::research_tables(&research)
        .unwrap()
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    tables.sort();
    assert_eq!(report["tables"], serde_json::json!(tables));
    assert_eq!(report["refused"], true);
    assert_eq!(report["bad_token_refused"], true);
}
