//! De-identified research tables (`ward::deid`) and the research query
//! session (`ward::query`): no identifier leaks, stable keyed pseudonyms,
//! the age / ZIP / date rules, k-anonymity and suppression, and every
//! escape attempt refused with nothing executed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::sync::Arc;

use crate::common::*;
use chrono::NaiveDate;
use datafusion::arrow::array::{
    Array, ArrayRef, Date32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    new_null_array,
};
use datafusion::arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use ward::deid::{DeidKey, DeidMode, DeidOptions, deid, research_id};
use ward::query::{QueryOptions, query};
use ward::schema::Table;
use ward::{PipelineConfig, WardError};

fn key(tag: &str) -> DeidKey {
    DeidKey::new(format!("test key {tag} 0123456789abcdef").as_bytes()).unwrap()
}

fn opts(key: DeidKey, mode: DeidMode, reference: NaiveDate) -> DeidOptions {
    DeidOptions {
        key,
        mode,
        reference_date: reference,
        k: 11,
        suppress_small_classes: false,
        valuesets: None,
    }
}

fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

/// Every cell of every batch as text (lists and structs included).
fn cells(batches: &[RecordBatch], skip: &[&str]) -> Vec<String> {
    let options = FormatOptions::default();
    let mut out = Vec::new();
    for b in batches {
        for (f, c) in b.schema().fields().iter().zip(b.columns()) {
            if skip.contains(&f.name().as_str()) {
                continue;
            }
            let fmt = ArrayFormatter::try_new(c.as_ref(), &options).unwrap();
            out.extend(
                (0..c.len())
                    .filter(|i| !c.is_null(*i))
                    .map(|i| fmt.value(i).to_string()),
            );
        }
    }
    out
}

/// The identifying values of the staged patient records, and the person
/// ids of the run in `run_dir`.
fn identifiers(wh: &Path, run_dir: &Path) -> BTreeSet<String> {
    let staged = read_dir_batches(&wh.join("staging").join("patient"));
    assert!(rows(&staged) > 0);
    let mut values = BTreeSet::new();
    for column in [
        "source_patient_id",
        "mrn",
        "given_name",
        "family_name",
        "address_line",
        "city",
        "postal_code",
        "phone",
        "email",
        "ssn",
    ] {
        values.extend(strings(&staged, column).into_iter().flatten());
    }
    for b in &staged {
        let births = b
            .column_by_name("birth_date")
            .unwrap()
            .as_any()
            .downcast_ref::<Date32Array>()
            .unwrap();
        for d in births.iter().flatten() {
            let d = NaiveDate::from_num_days_from_ce_opt(d + 719_163).unwrap();
            for f in ["%Y-%m-%d", "%m/%d/%Y", "%d/%m/%Y", "%Y%m%d", "%d.%m.%Y"] {
                values.insert(d.format(f).to_string());
            }
        }
    }
    // Persons' ids too (the research id replaces them).
    let persons = read_parquet(&run_dir.join("core").join("person.parquet"));
    values.extend(strings(&persons, "person_id").into_iter().flatten());
    values.retain(|v| v.trim().len() >= 3);
    values
}

/// Fails when any identifying value appears in any research file: as a
/// cell (equal, or contained for values of 6+ characters), or in the raw
/// bytes of the files (printable runs containing a value of 6+ characters
/// that is not plain hex, which could occur by chance in hashes).
/// `run_dir`: the run whose core and research tables are checked.
fn assert_no_leak(wh: &Path, run_dir: &Path) {
    let research = &run_dir.join("research");
    let ids = identifiers(wh, run_dir);
    assert!(ids.len() > 100, "{}", ids.len());
    let long: Vec<&String> = ids.iter().filter(|v| v.len() >= 6).collect();
    let long_text: Vec<&String> = long
        .iter()
        .copied()
        .filter(|v| !v.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    let mut files = 0;
    for path in walkdir(research) {
        files += 1;
        let bytes = fs::read(&path).unwrap();
        let runs: BTreeSet<&[u8]> = bytes
            .split(|b| !(0x20..0x7f).contains(b))
            .filter(|r| r.len() >= 6)
            .collect();
        for run in runs {
            let run = std::str::from_utf8(run).unwrap();
            if let Some(v) = long_text.iter().find(|v| run.contains(v.as_str())) {
                panic!(
                    "{} holds an identifying value ({} bytes)",
                    path.display(),
                    v.len()
                );
            }
        }
        if path.extension().is_some_and(|e| e == "parquet") {
            let batches = read_parquet(&path);
            for b in &batches {
                for f in b.schema().fields() {
                    assert!(
                        !matches!(f.data_type(), DataType::Date32 | DataType::Timestamp(..)),
                        "{}: full dates in {}",
                        path.display(),
                        f.name()
                    );
                }
            }
            // Every table but the value sets (public reference data, whose
            // codes may equal a number in a patient's record) is about
            // persons.
            if path.ends_with("valueset_code.parquet") {
                assert!(
                    batches
                        .iter()
                        .all(|b| b.column_by_name("research_id").is_none())
                );
                continue;
            }
            // Research ids are 64-hex HMACs: checked apart.
            let ids_in = strings(&batches, "research_id");
            assert!(
                ids_in
                    .iter()
                    .flatten()
                    .all(|r| r.len() == 64 && !ids.contains(r))
            );
            let distinct: BTreeSet<String> =
                cells(&batches, &["research_id"]).into_iter().collect();
            for cell in &distinct {
                assert!(
                    !ids.contains(cell),
                    "{}: a cell is an identifying value",
                    path.display()
                );
                if cell.len() >= 6 && cell.bytes().any(|b| !b.is_ascii_digit() && b != b'.') {
                    assert!(
                        !long.iter().any(|v| cell.contains(v.as_str())),
                        "{}: a cell contains an identifying value",
                        path.display()
                    );
                }
            }
        }
    }
    assert!(files >= 10, "{files} research files");
}

/// The compression codecs of every column chunk of the Parquet files under
/// `dir`.
fn compressions(dir: &Path) -> BTreeSet<String> {
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = BTreeSet::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(compressions(&path));
        } else if path.extension().is_some_and(|e| e == "parquet") {
            let footer =
                ParquetRecordBatchReaderBuilder::try_new(fs::File::open(&path).unwrap()).unwrap();
            for group in footer.metadata().row_groups() {
                for column in group.columns() {
                    // The codec, not a level (the footer does not keep it).
                    let codec = format!("{:?}", column.compression());
                    out.insert(codec.split('(').next().unwrap().to_string());
                }
            }
        }
    }
    out
}

fn deid_json(research: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(research.join("deid.json")).unwrap()).unwrap()
}

#[test]
fn the_sample_run_publishes_research_tables_without_identifiers() {
    let dir = tempfile::tempdir().unwrap();
    let config = PipelineConfig::load(&copy_sample(dir.path())).unwrap();
    let run = run_all(&config);
    let wh = dir.path().join("wh");
    let research = run.run_dir.join("research");
    assert_eq!(
        run.research.research_dir.canonicalize().unwrap(),
        research.canonicalize().unwrap()
    );
    assert_no_leak(&wh, &run.run_dir);
    // The research tables are handed out, compressed for size; what Ward
    // reads back itself is compressed for speed.
    assert_eq!(
        compressions(&research),
        BTreeSet::from(["ZSTD".to_string()])
    );
    for own in [run.run_dir.join("core"), wh.join("staging")] {
        assert_eq!(
            compressions(&own),
            BTreeSet::from(["LZ4_RAW".to_string()]),
            "{}",
            own.display()
        );
    }

    // deid.json: the demo key, Safe Harbor, counts that reconcile with core.
    let json = deid_json(&research);
    assert_eq!(json["mode"], "safe_harbor");
    assert_eq!(json["safe_harbor"], true);
    assert_eq!(json["demo_key"], true);
    // Ages at the sample's as-of day, the latest day any fact can have.
    assert_eq!(json["reference_date"], "2026-01-31");
    let fingerprint = json["key_fingerprint"].as_str().unwrap();
    assert_eq!(fingerprint, DeidKey::demo().fingerprint());
    let persons = read_parquet(&run.run_dir.join("core").join("person.parquet"));
    for t in json["tables"].as_array().unwrap() {
        let name = t["table"].as_str().unwrap();
        let core = if name == "person" {
            rows(&persons)
        } else if name == "valueset_code" {
            // Not about persons: the value sets the run measured with.
            let files = fs::read_dir(repo().join("queries/valuesets")).unwrap();
            let lines: usize = files
                .map(|f| f.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "csv"))
                .map(|p| csv::Reader::from_path(p).unwrap())
                .map(|mut r| r.records().count())
                .sum();
            assert_eq!(
                rows(&read_parquet(&research.join("valueset_code.parquet"))),
                lines
            );
            continue;
        } else {
            rows(&read_dir_batches(&run.run_dir.join("core").join(name)))
        };
        assert_eq!(t["rows_in"], core as u64, "{name}");
        assert_eq!(
            t["rows_in"].as_u64().unwrap(),
            t["rows_out"].as_u64().unwrap() + t["rows_suppressed"].as_u64().unwrap()
        );
        let out = if name == "person" {
            rows(&read_parquet(&research.join("person.parquet")))
        } else {
            rows(&read_dir_batches(&research.join(name)))
        };
        assert_eq!(t["rows_out"], out as u64, "{name}");
    }
    let k = &json["k_anonymity"];
    let sizes: u64 = k["size_distribution"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(size, n)| size.parse::<u64>().unwrap() * n.as_u64().unwrap())
        .sum();
    assert_eq!(
        sizes,
        rows(&persons) as u64,
        "class sizes add up to the persons"
    );

    // Pseudonyms: stable for one key, different for another.
    let core = run.run_dir.join("core");
    let ids = |key: DeidKey, out: &str| -> BTreeSet<String> {
        let out = dir.path().join(out);
        deid(
            &core,
            &out,
            &opts(key, DeidMode::SafeHarbor, date(2025, 12, 31)),
        )
        .unwrap();
        let mut ids: BTreeSet<String> =
            strings(&read_parquet(&out.join("person.parquet")), "research_id")
                .into_iter()
                .flatten()
                .collect();
        ids.extend(
            strings(&read_dir_batches(&out.join("observation")), "research_id")
                .into_iter()
                .flatten(),
        );
        ids
    };
    let a1 = ids(key("a"), "r1");
    let a2 = ids(key("a"), "r2");
    let b = ids(key("b"), "r3");
    assert_eq!(
        a1.len(),
        rows(&persons),
        "one id per person, facts use the same"
    );
    assert_eq!(a1, a2);
    assert!(a1.is_disjoint(&b));
    assert_ne!(
        deid_json(&dir.path().join("r1"))["key_fingerprint"],
        fingerprint
    );

    // Date shift on the real sample: full dates, still no identifier.
    let shifted = dir.path().join("shifted");
    let r = deid(
        &core,
        &shifted,
        &opts(key("a"), DeidMode::DateShift, date(2025, 12, 31)),
    )
    .unwrap();
    assert!(!r.safe_harbor && r.limited_data_set);
    assert_eq!(deid_json(&shifted)["mode"], "date_shift");
    let dob = read_parquet(&shifted.join("person.parquet"));
    assert!(dob[0].column_by_name("birth_date").is_some());

    // Queries over the published tables.
    research_queries(dir.path(), &research, rows(&persons) as i64);
}

/// Statements that try to leave the research tables (DDL, DML, COPY, SET,
/// files, table functions, a second statement): every one must be refused
/// with nothing run, by `ward query` and by `ward serve` alike. Targets
/// are under `tmp`.
pub fn escape_attempts(tmp: &Path, research: &Path) -> Vec<String> {
    let target = tmp.join("escape");
    let t = target.display();
    vec![
        format!("CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '{t}.csv'"),
        "CREATE EXTERNAL TABLE pw (line VARCHAR) STORED AS CSV LOCATION '/etc/passwd'".into(),
        "CREATE TABLE copy AS SELECT * FROM person".into(),
        "CREATE VIEW v AS SELECT * FROM person".into(),
        "INSERT INTO person SELECT * FROM person".into(),
        "DELETE FROM person".into(),
        "UPDATE person SET age = 1".into(),
        "DROP TABLE person".into(),
        format!("COPY person TO '{t}.parquet'"),
        format!("COPY (SELECT * FROM person) TO '{t}.csv' STORED AS CSV"),
        "SET datafusion.catalog.information_schema = true".into(),
        "SELECT * FROM '/etc/passwd'".into(),
        format!(
            "SELECT * FROM '{}'",
            research.join("person.parquet").display()
        ),
        "SELECT * FROM \"/etc/passwd\"".into(),
        format!(
            "SELECT * FROM read_parquet('{}')",
            research.join("person.parquet").display()
        ),
        "SELECT * FROM read_csv('/etc/passwd')".into(),
        "SELECT * FROM generate_series(1, 3)".into(),
        "SELECT * FROM information_schema.tables".into(),
        "SELECT 1; DROP TABLE person".into(),
        format!("SELECT 1; COPY person TO '{t}.json'"),
        "SELECT count(*) FROM person WHERE research_id IN (SELECT * FROM '/etc/passwd')".into(),
        "WITH x AS (SELECT * FROM '/etc/passwd') SELECT * FROM x".into(),
        "EXPLAIN ANALYZE SELECT * FROM person".into(),
    ]
}

fn research_queries(tmp: &Path, research: &Path, persons: i64) {
    let q = |sql: &str, min: Option<u64>| {
        let opts = QueryOptions {
            min_cell: min,
            ..Default::default()
        };
        query(research, sql, &opts)
    };
    // Analytical SQL: persons by age band add up to all persons.
    let out = q(
        "SELECT age_band, count(*) AS n FROM person GROUP BY age_band ORDER BY age_band",
        None,
    )
    .unwrap();
    let n = primitives::<Int64Type>(&out.batches, "n");
    assert_eq!(n.iter().flatten().sum::<i64>(), persons);
    assert_eq!(out.count_columns, vec!["n".to_string()]);
    let joined = q(
        "WITH hba1c AS (SELECT research_id, max(value_num) v FROM observation \
         WHERE code = '4548-4' GROUP BY research_id) \
         SELECT p.sex, count(*) n FROM hba1c h JOIN person p USING (research_id) GROUP BY p.sex",
        None,
    )
    .unwrap();
    assert!(rows(&joined.batches) >= 1);

    // min-cell: every count 1..10 becomes NULL, the rest is unchanged; a
    // grouping column of small integers (age) is not a count.
    let by_age =
        "SELECT age, count(*) AS n, sum(records) AS records FROM person GROUP BY age ORDER BY age";
    let plain = q(by_age, None).unwrap();
    let suppressed = q(by_age, Some(11)).unwrap();
    assert_eq!(
        primitives::<Int32Type>(&plain.batches, "age"),
        primitives::<Int32Type>(&suppressed.batches, "age")
    );
    let before = primitives::<Int64Type>(&plain.batches, "n");
    let after = primitives::<Int64Type>(&suppressed.batches, "n");
    let mut expected_suppressed = 0;
    for (b, a) in before.iter().zip(&after) {
        if (1..11).contains(&b.unwrap()) {
            assert_eq!(*a, None);
            expected_suppressed += 1;
        } else {
            assert_eq!(a, b);
        }
    }
    assert!(expected_suppressed > 0, "the sample has small age groups");
    assert!(suppressed.suppressed_cells >= expected_suppressed);
    assert_eq!(plain.suppressed_cells, 0);

    // Memory limit: a join whose build side, or a result, is larger than
    // the limit fails with an error that says so; under a generous limit
    // the same query answers as without one.
    let limited = |sql: &str, bytes: usize| {
        let opts = QueryOptions {
            memory_limit: Some(bytes),
            ..Default::default()
        };
        query(research, sql, &opts)
    };
    let join = "SELECT count(*) AS n FROM observation a JOIN observation b USING (research_id)";
    let unlimited = primitives::<Int64Type>(&q(join, None).unwrap().batches, "n");
    let roomy = limited(join, 256 << 20).unwrap();
    assert_eq!(primitives::<Int64Type>(&roomy.batches, "n"), unlimited);
    let everything = "SELECT a.*, b.* FROM observation a CROSS JOIN observation b";
    for (sql, bytes) in [(join, 16 << 10), (everything, 8 << 20)] {
        match limited(sql, bytes) {
            Err(e @ WardError::Data { .. }) => {
                let m = e.to_string();
                assert!(m.contains("more memory than its limit"), "{sql}: {m}");
                assert!(m.contains("--memory-limit"), "{m}");
            }
            other => panic!("{sql} under {bytes} bytes: {other:?}"),
        }
    }

    // Escape attempts: refused, nothing created or changed on disk.
    let before = snapshot(tmp);
    for sql in escape_attempts(tmp, research) {
        match q(&sql, None) {
            Err(e @ WardError::Query { refused: true, .. }) => {
                assert!(e.is_config_error());
                assert!(e.to_string().starts_with("query refused"), "{e}");
            }
            other => panic!("{sql}: not refused: {other:?}"),
        }
    }
    assert_eq!(before, snapshot(tmp), "a refused query changed the disk");

    // A lateral UNNEST is refused with the form that works, which runs.
    let lateral = q(
        "SELECT count(*) FROM observation o, UNNEST(o.codings) AS u(c)",
        None,
    )
    .unwrap_err();
    assert!(
        lateral.to_string().contains("unnest(codings) AS coding"),
        "{lateral}"
    );
    // ... and selects codes by value set (published with the tables).
    let codings = q(
        "WITH c AS (SELECT research_id, unnest(codings) AS coding FROM condition) \
         SELECT count(DISTINCT research_id) AS n FROM c JOIN valueset_code v \
         ON coding['system'] = v.code_system AND coding['code'] = v.code \
         WHERE v.name = 'Diabetes'",
        None,
    )
    .unwrap();
    assert!(primitives::<Int64Type>(&codings.batches, "n")[0].unwrap() > 0);

    // Limits: the largest query allowed runs (its tree planned on a deep
    // stack); a query that never ends fails at its time limit.
    let unions = vec!["SELECT 1 AS x"; ward::query::MAX_SET_OPERATIONS + 1].join(" UNION ALL ");
    assert_eq!(
        rows(&q(&unions, None).unwrap().batches),
        ward::query::MAX_SET_OPERATIONS + 1
    );
    let endless = QueryOptions {
        timeout: Some(std::time::Duration::from_secs(1)),
        ..Default::default()
    };
    let forever = "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) \
                   SELECT count(*) FROM t";
    match query(research, forever, &endless) {
        Err(e @ WardError::Data { .. }) => {
            assert!(e.to_string().contains("time limit of 1s"), "{e}")
        }
        other => panic!("an endless query: {other:?}"),
    }
    // Invalid SQL is a different error, also before anything runs.
    assert!(matches!(
        q("SELECT nope FROM person", None),
        Err(WardError::Query { refused: false, .. })
    ));
}

#[test]
fn a_generated_population_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen");
    generate(&out, 2000, 3, 8, 0.002);
    let path = out.join("ward.toml");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("../warehouse", "../wh");
    fs::write(&path, text).unwrap();
    let config = PipelineConfig::load(&path).unwrap();
    let run = run_all(&config);
    assert!(
        run.research.tables[0].rows_out > 1500,
        "{:?}",
        run.research.tables
    );
    assert_no_leak(&dir.path().join("wh"), &run.run_dir);
}

// --- hand-built core tables -------------------------------------------------

struct P {
    id: &'static str,
    birth: Option<NaiveDate>,
    sex: &'static str,
    zip: Option<&'static str>,
    died: Option<NaiveDate>,
}

/// Writes `core/person.parquet` and `core/observation/part-00000.parquet`
/// (one observation per (person, day)).
fn write_core(core: &Path, persons: &[P], obs: &[(&str, NaiveDate)]) {
    let wh = ward::warehouse::Warehouse::new(core.parent().unwrap());
    let schema = ward::schema::person_schema();
    let n = persons.len();
    let text = |f: &dyn Fn(&P) -> Option<String>| -> ArrayRef {
        Arc::new(persons.iter().map(f).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "person_id" => text(&|p| Some(p.id.to_string())),
            "given_name" => text(&|_| Some("Zebulon".into())),
            "sex" => text(&|p| Some(p.sex.to_string())),
            "race" => text(&|_| Some("white".into())),
            "postal_code" => text(&|p| p.zip.map(str::to_string)),
            "birth_date" => Arc::new(
                persons
                    .iter()
                    .map(|p| p.birth.map(days))
                    .collect::<Date32Array>(),
            ) as ArrayRef,
            "deceased_date" => Arc::new(
                persons
                    .iter()
                    .map(|p| p.died.map(days))
                    .collect::<Date32Array>(),
            ) as ArrayRef,
            "sources" => {
                let mut b = datafusion::arrow::array::ListBuilder::new(
                    datafusion::arrow::array::StringBuilder::new(),
                );
                for _ in 0..n {
                    b.values().append_value("clinic");
                    b.append(true);
                }
                Arc::new(b.finish())
            }
            "records" => Arc::new(datafusion::arrow::array::UInt32Array::from(vec![1; n])),
            _ => new_null_array(f.data_type(), n),
        })
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    wh.write_parquet(&core.join("person.parquet"), schema, &[batch])
        .unwrap();

    let mut fields = vec![Field::new("person_id", DataType::Utf8, true)];
    fields.extend(
        Table::Observation
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true)),
    );
    fields.push(Field::new(
        "reported_by",
        DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        true,
    ));
    let schema = Arc::new(Schema::new(fields));
    let m = obs.len();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "person_id" => {
                Arc::new(obs.iter().map(|o| Some(o.0)).collect::<StringArray>()) as ArrayRef
            }
            "code_system" => Arc::new(StringArray::from(vec!["loinc"; m])),
            "code" => Arc::new(StringArray::from(vec!["4548-4"; m])),
            "value_text" => Arc::new(StringArray::from(vec!["Zebulon says hi"; m])),
            "effective_time" => Arc::new(
                obs.iter()
                    .map(|o| Some(days(o.1) as i64 * 86_400_000_000 + 3_600_000_000))
                    .collect::<TimestampMicrosecondArray>(),
            ),
            _ => new_null_array(f.data_type(), m),
        })
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    wh.write_parquet(
        &core.join("observation").join("part-00000.parquet"),
        schema,
        &[batch],
    )
    .unwrap();
}

fn days(d: NaiveDate) -> i32 {
    (d - date(1970, 1, 1)).num_days() as i32
}

/// research id → row of research/person, as (age, age_band, birth_year, zip3).
type PersonRow = (Option<i32>, Option<String>, Option<i32>, Option<String>);
fn research_persons(research: &Path) -> BTreeMap<String, PersonRow> {
    let b = read_parquet(&research.join("person.parquet"));
    let ids = strings(&b, "research_id");
    let ages = primitives::<Int32Type>(&b, "age");
    let bands = strings(&b, "age_band");
    let years = if b[0].column_by_name("birth_year").is_some() {
        primitives::<Int32Type>(&b, "birth_year")
    } else {
        vec![None; ids.len()]
    };
    let zips = strings(&b, "zip3");
    ids.into_iter()
        .zip(ages)
        .zip(bands)
        .zip(years)
        .zip(zips)
        .map(|((((id, a), band), y), z)| (id.unwrap(), (a, band, y, z)))
        .collect()
}

#[test]
fn age_zip_and_date_rules_on_edge_cases() {
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core");
    let persons = [
        P {
            id: "P89",
            birth: Some(date(1936, 1, 1)),
            sex: "female",
            zip: Some("02139"),
            died: None,
        },
        P {
            id: "P90",
            birth: Some(date(1935, 12, 31)),
            sex: "female",
            zip: Some("03601"),
            died: None,
        },
        P {
            id: "P95",
            birth: Some(date(1930, 6, 1)),
            sex: "male",
            zip: Some("02139-4307"),
            died: None,
        },
        P {
            id: "PLEAP",
            birth: Some(date(2000, 2, 29)),
            sex: "male",
            zip: Some("021"),
            died: None,
        },
        P {
            id: "PNOZIP",
            birth: None,
            sex: "unknown",
            zip: None,
            died: None,
        },
        P {
            id: "P9",
            birth: Some(date(1990, 5, 5)),
            sex: "male",
            zip: Some("890124444"),
            died: None,
        },
        // Died at 60 in 1943: as old as at death, birth year withheld
        // (it says "over 89" today).
        P {
            id: "PDEAD",
            birth: Some(date(1883, 3, 1)),
            sex: "female",
            zip: Some("02139"),
            died: Some(date(1943, 6, 1)),
        },
        // Died at 70 this year.
        P {
            id: "PDIED",
            birth: Some(date(1955, 1, 1)),
            sex: "male",
            zip: Some("02139"),
            died: Some(date(2025, 6, 1)),
        },
    ];
    let obs = [
        ("P89", date(2025, 3, 1)),
        ("P89", date(2025, 3, 11)),
        ("P95", date(2025, 3, 1)),
        ("P95", date(2025, 3, 11)),
    ];
    write_core(&core, &persons, &obs);
    let k = key("edge");
    let sh = dir.path().join("sh");
    deid(
        &core,
        &sh,
        &opts(k.clone(), DeidMode::SafeHarbor, date(2025, 12, 31)),
    )
    .unwrap();
    let rows = research_persons(&sh);
    let get = |id: &str| rows[&research_id(&k, id)].clone();
    assert_eq!(
        get("P89"),
        (Some(89), Some("75+".into()), Some(1936), Some("021".into()))
    );
    // 90 on the reference day: pooled, birth year removed; restricted ZIP.
    assert_eq!(
        get("P90"),
        (Some(90), Some("75+".into()), None, Some("000".into()))
    );
    assert_eq!(
        get("P95"),
        (Some(90), Some("75+".into()), None, Some("021".into()))
    );
    assert_eq!(
        get("PLEAP"),
        (Some(25), Some("18-44".into()), Some(2000), None)
    );
    assert_eq!(get("PNOZIP"), (None, None, None, None));
    assert_eq!(
        get("PDEAD"),
        (Some(60), Some("45-64".into()), None, Some("021".into()))
    );
    assert_eq!(
        get("PDIED"),
        (
            Some(70),
            Some("65-74".into()),
            Some(1955),
            Some("021".into())
        )
    );
    assert_eq!(
        get("P9").3.as_deref(),
        Some("000"),
        "ZIP+4 without dash, restricted 890"
    );
    // Safe Harbor: years only; free text and the person's name are gone.
    let o = read_dir_batches(&sh.join("observation"));
    assert_eq!(
        primitives::<Int32Type>(&o, "effective_time_year"),
        vec![Some(2025); 4]
    );
    assert!(cells(&o, &[]).iter().all(|c| !c.contains("Zebulon")));
    assert!(o[0].column_by_name("value_text").is_none());

    // 29 February at a common year's 28 February / 1 March.
    for (reference, age) in [(date(2025, 2, 28), 24), (date(2025, 3, 1), 25)] {
        let out = dir.path().join(format!("leap{age}"));
        deid(
            &core,
            &out,
            &opts(k.clone(), DeidMode::SafeHarbor, reference),
        )
        .unwrap();
        assert_eq!(
            research_persons(&out)[&research_id(&k, "PLEAP")].0,
            Some(age)
        );
    }

    // Date shift: intervals kept within a person, offsets differ between persons.
    let ds = dir.path().join("ds");
    deid(
        &core,
        &ds,
        &opts(k.clone(), DeidMode::DateShift, date(2025, 12, 31)),
    )
    .unwrap();
    let o = read_dir_batches(&ds.join("observation"));
    let ids = strings(&o, "research_id");
    let times = o[0]
        .column_by_name("effective_time")
        .unwrap()
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .unwrap()
        .clone();
    let mut by_person: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        by_person
            .entry(id.clone().unwrap())
            .or_default()
            .push(times.value(i));
    }
    const DAY: i64 = 86_400_000_000;
    let original = days(date(2025, 3, 1)) as i64 * DAY + 3_600_000_000;
    let mut offsets = BTreeSet::new();
    for t in by_person.values() {
        let (lo, hi) = (t.iter().min().unwrap(), t.iter().max().unwrap());
        assert_eq!(hi - lo, 10 * DAY, "interval kept");
        let shift = lo - original;
        assert!(shift != 0 && shift % DAY == 0 && shift.abs() <= 365 * DAY);
        offsets.insert(shift);
    }
    assert_eq!(offsets.len(), 2, "each person has their own offset");
    // Birth dates shift with the same offset; the 90+ have none.
    let p = read_parquet(&ds.join("person.parquet"));
    let births = p[0]
        .column_by_name("birth_date")
        .unwrap()
        .as_any()
        .downcast_ref::<Date32Array>()
        .unwrap()
        .clone();
    let pids = strings(&p, "research_id");
    for (i, id) in pids.iter().enumerate() {
        let id = id.as_deref().unwrap();
        if id == research_id(&k, "P89") {
            let shift = ward::deid::date_shift_days(&k, "P89");
            assert_eq!(births.value(i), days(date(1936, 1, 1)) + shift);
        }
        if id == research_id(&k, "P90") {
            assert!(births.is_null(i));
        }
    }
}

#[test]
fn k_anonymity_counts_and_suppression_remove_exactly_the_small_classes() {
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core");
    let b = Some(date(1980, 6, 1));
    let persons = [
        // Class A (3): 45-64, female, 021.
        P {
            id: "A1",
            birth: b,
            sex: "female",
            zip: Some("02139"),
            died: None,
        },
        P {
            id: "A2",
            birth: b,
            sex: "female",
            zip: Some("02140"),
            died: None,
        },
        P {
            id: "A3",
            birth: Some(date(1976, 1, 1)),
            sex: "female",
            zip: Some("02111"),
            died: None,
        },
        // Class B (2): 45-64, male, 021.
        P {
            id: "B1",
            birth: b,
            sex: "male",
            zip: Some("02139"),
            died: None,
        },
        P {
            id: "B2",
            birth: b,
            sex: "male",
            zip: Some("02139"),
            died: None,
        },
        // Class C (1): 45-64, female, 100.
        P {
            id: "C1",
            birth: b,
            sex: "female",
            zip: Some("10001"),
            died: None,
        },
    ];
    let d = date(2025, 5, 5);
    let obs = [
        ("A1", d),
        ("A2", d),
        ("B1", d),
        ("B1", d),
        ("B2", d),
        ("C1", d),
        ("C1", d),
    ];
    write_core(&core, &persons, &obs);
    let k = key("k");
    let mut o = opts(k.clone(), DeidMode::SafeHarbor, date(2025, 12, 31));
    o.k = 3;
    let report = deid(&core, &dir.path().join("r"), &o).unwrap();
    let ka = &report.k_anonymity;
    assert_eq!(
        (ka.classes, ka.classes_below_k, ka.min_class_size),
        (3, 2, 1)
    );
    assert_eq!(
        ka.size_distribution,
        BTreeMap::from([(1, 1), (2, 1), (3, 1)])
    );
    assert_eq!(
        (ka.persons, ka.persons_below_k, ka.records_below_k),
        (6, 3, 5)
    );
    assert!(!ka.suppressed);
    assert_eq!(
        research_persons(&dir.path().join("r")).len(),
        6,
        "nothing removed"
    );

    o.suppress_small_classes = true;
    let out = dir.path().join("s");
    let report = deid(&core, &out, &o).unwrap();
    let expected: BTreeSet<String> = ["A1", "A2", "A3"]
        .iter()
        .map(|p| research_id(&k, p))
        .collect();
    let kept: BTreeSet<String> = research_persons(&out).into_keys().collect();
    assert_eq!(kept, expected);
    let facts: BTreeSet<String> =
        strings(&read_dir_batches(&out.join("observation")), "research_id")
            .into_iter()
            .flatten()
            .collect();
    assert!(facts.is_subset(&expected) && facts.len() == 2);
    let t = |name: &str| {
        report
            .tables
            .iter()
            .find(|t| t.table == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        (
            t("person").rows_in,
            t("person").rows_out,
            t("person").rows_suppressed
        ),
        (6, 3, 3)
    );
    assert_eq!(
        (
            t("observation").rows_in,
            t("observation").rows_out,
            t("observation").rows_suppressed
        ),
        (7, 2, 5)
    );
    assert!(report.k_anonymity.suppressed);
    let json = deid_json(&out);
    assert_eq!(json["k_anonymity"]["persons_below_k"], 3);
    assert_eq!(json["tables"][0]["rows_suppressed"], 3);
}

#[test]
fn missing_key_is_a_config_error_and_the_sample_uses_the_demo_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_sample(dir.path());
    let config = PipelineConfig::load(&path).unwrap();
    assert!(
        ward::deid::resolve_key(&config.deid, |_| None)
            .unwrap()
            .is_demo()
    );

    let text = fs::read_to_string(&path).unwrap();
    let no_key = text.replace("demo_key = true", "k = 5");
    fs::write(&path, &no_key).unwrap();
    let config = PipelineConfig::load(&path).unwrap();
    let e = ward::deid::resolve_key(&config.deid, |_| None).unwrap_err();
    assert!(
        e.is_config_error() && e.to_string().contains("key_file"),
        "{e}"
    );

    let key_file = dir.path().join("sample_data").join("deid.key");
    fs::write(&key_file, "a-secret-key-of-32-bytes-or-more!\n").unwrap();
    fs::write(
        &path,
        text.replace("demo_key = true", "key_file = \"deid.key\""),
    )
    .unwrap();
    let config = PipelineConfig::load(&path).unwrap();
    let from_file = ward::deid::resolve_key(&config.deid, |_| None).unwrap();
    assert!(!from_file.is_demo());

    fs::write(
        &path,
        text.replace("demo_key = true", "key_env = \"WARD_TEST_KEY\""),
    )
    .unwrap();
    let config = PipelineConfig::load(&path).unwrap();
    let from_env = ward::deid::resolve_key(&config.deid, |n| {
        (n == "WARD_TEST_KEY").then(|| "a-secret-key-of-32-bytes-or-more!".into())
    })
    .unwrap();
    assert_eq!(
        from_env.fingerprint(),
        from_file.fingerprint(),
        "same key, same fingerprint"
    );

    // Two key sources, an unknown mode, k < 2: located config errors.
    for (bad, key) in [
        ("demo_key = true\nkey_env = \"X\"", "only one"),
        ("demo_key = true\nmode = \"scramble\"", "unknown variant"),
        ("demo_key = true\nk = 1", "at least 2"),
    ] {
        fs::write(&path, text.replace("demo_key = true", bad)).unwrap();
        match PipelineConfig::load(&path).unwrap_err() {
            WardError::Config {
                line: Some(_),
                message,
                ..
            } => assert!(message.contains(key), "{bad}: {message}"),
            other => panic!("{bad}: {other}"),
        }
    }
}
