//! SQL tested as SQL: every `tests/slt/**/*.slt` file runs in a fresh
//! measure session ([`ward::measure::install`]) over empty in-memory core
//! tables that the file fills with `INSERT`; conventions in
//! `tests/slt/README.md`. `WARD_SLT=<part of a path>` runs only the
//! matching files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::NaiveDate;
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, UInt64Type};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::functions_nested::expr_fn::make_array;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::{SessionConfig, SessionContext, lit};
use sqllogictest::{DB, DBOutput, DefaultColumnType, Runner};
use ward::measure::Period;
use ward::schema::Table;

use crate::common::repo;

/// The measurement period of every file.
fn period() -> Period {
    let day = |s| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
    Period {
        start: day("2025-01-01"),
        end: day("2025-12-31"),
    }
}

/// Files directly in `tests/slt/` load the common views only: no such library.
const NO_LIBRARY: &str = "none";

/// A session with empty `core_*` tables (canonical schemas, the core
/// tables' `person_id` and `reported_by`), then everything `install` adds.
async fn session(library: &str) -> ward::Result<SessionContext> {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_information_schema(true));
    // Lineage columns the views never test get defaults, so fixtures name
    // only what matters.
    let defaults = |schema: &Schema| -> HashMap<String, Expr> {
        let all = [
            ("source", lit("slt")),
            ("source_file", lit("fixture.csv")),
            ("source_line", lit(0u64)),
            ("source_patient_id", lit("slt")),
            ("reported_by", make_array(vec![lit("slt")])),
            ("sources", make_array(vec![lit("slt")])),
            ("records", lit(1u32)),
        ];
        all.into_iter()
            .filter(|(c, _)| schema.field_with_name(c).is_ok())
            .map(|(c, e)| (c.to_string(), e))
            .collect()
    };
    let mut tables = vec![("core_person".to_string(), ward::schema::person_schema())];
    let coding = |n| Arc::new(Field::new(n, DataType::Utf8, true));
    let coding = Fields::from(vec![coding("system"), coding("code")]);
    let codings = DataType::List(Arc::new(Field::new("item", DataType::Struct(coding), true)));
    for table in Table::ALL.into_iter().filter(|t| *t != Table::Patient) {
        let text_list = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
        let mut fields = vec![Arc::new(Field::new("person_id", DataType::Utf8, false))];
        fields.extend(
            table
                .schema()
                .fields()
                .iter()
                .map(|f| match f.name().as_str() {
                    // SQL's struct literals have nullable fields, and Arrow cannot
                    // cast them to the canonical non-null `system` and `code`.
                    "codings" => Arc::new(Field::new("codings", codings.clone(), true)),
                    _ => f.clone(),
                }),
        );
        fields.push(Arc::new(Field::new("reported_by", text_list, true)));
        let schema = Arc::new(Schema::new(fields));
        tables.push((format!("core_{}", table.name()), schema));
    }
    for (name, schema) in tables {
        let table = MemTable::try_new(schema.clone(), vec![vec![]])
            .unwrap()
            .with_column_defaults(defaults(&schema));
        ctx.register_table(name, Arc::new(table)).unwrap();
    }
    let queries = repo().join("queries");
    ward::measure::install(&ctx, &queries, period(), library, true).await?;
    // Each measure of this library as the view `measure_<file name>`.
    for def in ward::measure::catalog(&queries)? {
        if def.library() == library {
            let stem = def.sql.file_stem().unwrap().to_string_lossy();
            let sql = std::fs::read_to_string(&def.sql).unwrap();
            let df = ctx.sql(&sql).await.expect("measure SQL plans");
            ctx.register_table(format!("measure_{stem}"), df.into_view())
                .unwrap();
        }
    }
    Ok(ctx)
}

/// A session as sqllogictest's database; queries run on `rt`.
struct Ward {
    ctx: SessionContext,
    rt: tokio::runtime::Handle,
}

impl DB for Ward {
    type Error = DataFusionError;
    type ColumnType = DefaultColumnType;

    fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DataFusionError> {
        self.rt.block_on(async {
            let df = self.ctx.sql(sql).await?;
            let dml = matches!(df.logical_plan(), LogicalPlan::Dml(_));
            let schema = df.schema().as_arrow().clone();
            let batches = df.collect().await?;
            if dml {
                let count = batches
                    .iter()
                    .map(|b| b.column(0).as_primitive::<UInt64Type>().value(0))
                    .sum();
                return Ok(DBOutput::StatementComplete(count));
            }
            let types = schema
                .fields()
                .iter()
                .map(|f| match f.data_type() {
                    t if t.is_integer() => DefaultColumnType::Integer,
                    t if t.is_floating() || t.is_numeric() => DefaultColumnType::FloatingPoint,
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                        DefaultColumnType::Text
                    }
                    _ => DefaultColumnType::Any,
                })
                .collect();
            let mut rows = Vec::new();
            for batch in &batches {
                rows.extend(format_rows(batch)?);
            }
            Ok(DBOutput::Rows { types, rows })
        })
    }
}

/// Each cell as Arrow displays it; NULL as `NULL`, the empty string as
/// `(empty)` (sqllogictest trims cells).
fn format_rows(batch: &RecordBatch) -> Result<Vec<Vec<String>>, DataFusionError> {
    let options = FormatOptions::default().with_null("NULL");
    let formatters = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((0..batch.num_rows())
        .map(|row| {
            formatters
                .iter()
                .map(|f| match f.value(row).to_string() {
                    s if s.is_empty() => "(empty)".to_string(),
                    s => s,
                })
                .collect()
        })
        .collect())
}

fn slt_files(dir: &Path) -> Vec<PathBuf> {
    let pattern = format!("{}/**/*.slt", dir.display());
    let mut files: Vec<PathBuf> = glob::glob(&pattern).unwrap().map(Result::unwrap).collect();
    files.sort();
    files
}

#[test]
fn slt() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = repo().join("tests/slt");
    let only = std::env::var("WARD_SLT").ok();
    let mut failures = Vec::new();
    let mut ran = 0;
    for file in slt_files(&dir) {
        let name = file.strip_prefix(repo()).unwrap().display().to_string();
        if only.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        // tests/slt/<library>/x.slt, or tests/slt/x.slt
        let library = match file.parent().unwrap().strip_prefix(&dir).unwrap() {
            sub if sub.as_os_str().is_empty() => NO_LIBRARY.to_string(),
            sub => sub.display().to_string(),
        };
        ran += 1;
        let ctx = match rt.block_on(session(&library)) {
            Ok(ctx) => ctx,
            Err(e) => {
                failures.push(format!("{name}: session: {e}"));
                continue;
            }
        };
        let rt = rt.handle().clone();
        let mut runner = Runner::new(move || {
            let db = Ward {
                ctx: ctx.clone(),
                rt: rt.clone(),
            };
            std::future::ready(Ok::<_, DataFusionError>(db))
        });
        match runner.run_file(&file) {
            Ok(()) => eprintln!("ok {name}"),
            Err(e) => failures.push(format!("{name}: {}", e.display(false))),
        }
    }
    assert!(ran > 0, "no .slt file matches WARD_SLT={only:?}");
    assert!(
        failures.is_empty(),
        "{} of {ran} .slt files failed:\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}
