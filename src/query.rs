//! `ward query`: read-only SQL over the research tables, and nothing else.
//!
//! A query is checked before anything runs, in two independent layers:
//!
//! 1. Ward parses it and accepts exactly one statement, a `SELECT` (or
//!    `WITH ... SELECT`, `VALUES`, set operations) whose every `FROM` item is
//!    a research table, a CTE of the query, a subquery, a join of those or
//!    `UNNEST`. Anything else — DDL (`CREATE [EXTERNAL] TABLE`, `CREATE
//!    TABLE AS`, `DROP`, views), DML (`INSERT`, `UPDATE`, `DELETE`), `COPY
//!    ... TO`, `SET`, `EXPLAIN`, `PREPARE`, a second statement, a quoted
//!    path or URL used as a table (`SELECT * FROM '/etc/passwd'`), a table
//!    function (`read_parquet('...')`, `generate_series(...)`) — is refused
//!    with [`WardError::Query`] (`refused: true`).
//! 2. DataFusion plans it with [`SQLOptions`] that disallow DDL, DML and
//!    statements, in a session where only the research tables are
//!    registered, URL tables are off (DataFusion's default) and the
//!    information schema is off.
//!
//! `min_cell` suppression: a result column is a *count* when it is an
//! integer column whose value is, through aliases, sorts, limits, filters and
//! plain column projections, the output of a `COUNT` or `SUM` aggregate of
//! the query's outermost aggregation. Values from 1 to `min_cell - 1` in
//! count columns become NULL; 0 and larger values are kept. Arithmetic on a
//! count (`count(*) + 0`) is not traced: the option helps a researcher
//! prepare outputs for publication; it is not a security boundary (the
//! research tables are row-level data).

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, RecordBatch};
use datafusion::arrow::compute::{cast, kernels::zip::zip};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::{ParquetReadOptions, SessionConfig};
use datafusion::sql::parser::{DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{Query, SetExpr, Statement, TableFactor, Visit, Visitor};
use futures::StreamExt;

use crate::error::{Result, WardError};

/// Options of [`query`].
#[derive(Debug, Clone, Default)]
pub struct QueryOptions {
    /// Counts from 1 to `min_cell - 1` in count columns become NULL (see
    /// the module documentation).
    pub min_cell: Option<u64>,
    /// At most this many bytes for the query's operators and its result
    /// together; more fails the query with an error instead of exhausting
    /// the host's memory (see [`default_memory_limit`]). `None`: no limit.
    pub memory_limit: Option<usize>,
}

/// Half of the machine's physical memory (`/proc/meminfo`), or 4 GiB where
/// that cannot be read: `ward query`'s default memory limit.
pub fn default_memory_limit() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024 / 2)
        })
        .unwrap_or(4 << 30)
}

/// Parses a size such as `512M`, `4G`, `1.5GiB` or `1000000` (bytes);
/// units are binary (K = 1024).
pub fn parse_size(text: &str) -> std::result::Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 512M, 4G)"))?;
    let unit = unit.trim().to_ascii_uppercase();
    let shift = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("`{text}`: unknown unit (use K, M, G or T)")),
    };
    let bytes = number * (1u64 << shift) as f64;
    if bytes < 1.0 || !bytes.is_finite() || bytes > usize::MAX as f64 {
        return Err(format!("`{text}`: out of range"));
    }
    Ok(bytes as usize)
}

/// A query's result.
#[derive(Debug, Clone)]
pub struct QueryOutput {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// The columns treated as counts for `min_cell`.
    pub count_columns: Vec<String>,
    /// How many count cells were replaced by NULL.
    pub suppressed_cells: u64,
}

/// The research tables of `research_dir`: `<name>.parquet` files and
/// `<name>/` directories of Parquet parts, by name.
pub fn research_tables(research_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !research_dir.is_dir() {
        return Err(WardError::State {
            path: research_dir.to_path_buf(),
            message: "no research tables: run `ward deid` or `ward run` first".into(),
        });
    }
    let mut out = Vec::new();
    let entries = std::fs::read_dir(research_dir)
        .map_err(|e| WardError::io("cannot list", research_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| WardError::io("cannot list", research_dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let table = if path.is_dir() {
            Some(name)
        } else {
            name.strip_suffix(".parquet").map(str::to_string)
        };
        if let Some(t) = table
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        {
            out.push((t, path));
        }
    }
    out.sort();
    Ok(out)
}

fn refused(message: String) -> WardError {
    WardError::Query {
        refused: true,
        message,
    }
}

/// Checks that `sql` is one read-only query over `tables` (layer 1 of the
/// module documentation).
pub fn check(sql: &str, tables: &[String]) -> Result<()> {
    let statements = DFParserBuilder::new(sql)
        .build()
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| WardError::Query {
            refused: false,
            message: e.to_string(),
        })?;
    if statements.len() != 1 {
        return Err(refused(format!(
            "exactly one statement is allowed, found {}",
            statements.len()
        )));
    }
    let statement = match &statements[0] {
        DFStatement::Statement(s) => s.as_ref(),
        DFStatement::CreateExternalTable(_) => {
            return Err(refused("CREATE EXTERNAL TABLE is not allowed".into()));
        }
        DFStatement::CopyTo(_) => return Err(refused("COPY is not allowed".into())),
        DFStatement::Explain(_) => return Err(refused("EXPLAIN is not allowed".into())),
        DFStatement::Reset(_) => return Err(refused("RESET is not allowed".into())),
    };
    let Statement::Query(query) = statement else {
        let kind = statement.to_string();
        let kind: String = kind
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        return Err(refused(format!(
            "only SELECT queries are allowed (not {kind} ...)"
        )));
    };
    struct Check<'a> {
        tables: &'a [String],
        ctes: Vec<String>,
    }
    impl Visitor for Check<'_> {
        type Break = String;
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<String> {
            if let SetExpr::Select(select) = q.body.as_ref()
                && select.into.is_some()
            {
                return ControlFlow::Break("SELECT ... INTO is not allowed".into());
            }
            if let Some(with) = &q.with {
                self.ctes
                    .extend(with.cte_tables.iter().map(|c| normalize(&c.alias.name)));
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, f: &TableFactor) -> ControlFlow<String> {
            match f {
                TableFactor::Table { name, args, .. } => {
                    if args.is_some() {
                        return ControlFlow::Break(format!(
                            "table functions are not allowed ({name})"
                        ));
                    }
                    let ident = match name.0.as_slice() {
                        [part] => part.as_ident(),
                        _ => None,
                    };
                    let known = ident.map(normalize).filter(|n| {
                        ident.is_some_and(|i| i.quote_style.is_none_or(|q| q == '"'))
                            && (self.tables.contains(n) || self.ctes.contains(n))
                    });
                    if known.is_none() {
                        return ControlFlow::Break(format!(
                            "{name} is not a research table (tables: {})",
                            self.tables.join(", ")
                        ));
                    }
                    ControlFlow::Continue(())
                }
                TableFactor::Derived { .. }
                | TableFactor::NestedJoin { .. }
                | TableFactor::UNNEST { .. } => ControlFlow::Continue(()),
                other => ControlFlow::Break(format!(
                    "this FROM item is not allowed: {}",
                    other.to_string().chars().take(60).collect::<String>()
                )),
            }
        }
    }
    let mut check = Check {
        tables,
        ctes: Vec::new(),
    };
    match query.visit(&mut check) {
        ControlFlow::Break(message) => Err(refused(message)),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// An identifier as DataFusion resolves it: lowercased unless double-quoted.
fn normalize(i: &datafusion::sql::sqlparser::ast::Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

/// Runs one read-only query over the research tables of `research_dir`;
/// refuses anything else without executing it (see the module
/// documentation).
pub fn query(research_dir: &Path, sql: &str, opts: &QueryOptions) -> Result<QueryOutput> {
    let tables = research_tables(research_dir)?;
    let names: Vec<String> = tables.iter().map(|(n, _)| n.clone()).collect();
    check(sql, &names)?;
    crate::engine::block_on(async {
        let config = SessionConfig::new().with_information_schema(false);
        let ctx = match opts.memory_limit {
            Some(bytes) => crate::engine::limited_session(config, bytes)?,
            None => crate::engine::session(config),
        };
        for (name, path) in &tables {
            let location = if path.is_dir() {
                format!("{}/", path.display())
            } else {
                path.display().to_string()
            };
            ctx.register_parquet(name, &location, ParquetReadOptions::default())
                .await
                .map_err(|e| WardError::Data {
                    context: "registering a research table",
                    path: path.clone(),
                    message: e.to_string(),
                })?;
        }
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let df = ctx
            .sql_with_options(sql, options)
            .await
            .map_err(|e| WardError::Query {
                refused: false,
                message: e.to_string(),
            })?;
        let plan = df.logical_plan().clone();
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let run_err = |e: DataFusionError| WardError::Data {
            context: "running a research query",
            path: research_dir.to_path_buf(),
            message: match (e.find_root(), opts.memory_limit) {
                (DataFusionError::ResourcesExhausted(_), Some(limit)) => format!(
                    "the query needs more memory than its limit of {} MiB \
                     (aggregate, filter or add LIMIT, or raise --memory-limit): {e}",
                    limit >> 20
                ),
                _ => e.to_string(),
            },
        };
        // The result is held in memory too: it counts against the same pool
        // as the operators, so a huge result fails instead of growing.
        let result =
            MemoryConsumer::new("ward query result").register(&ctx.runtime_env().memory_pool);
        let mut stream = df.execute_stream().await.map_err(run_err)?;
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(run_err)?;
            result
                .try_grow(batch.get_array_memory_size())
                .map_err(run_err)?;
            batches.push(batch);
        }
        let count_idx: Vec<usize> = (0..schema.fields().len())
            .filter(|i| schema.field(*i).data_type().is_integer() && is_count(&plan, *i))
            .collect();
        let mut output = QueryOutput {
            count_columns: count_idx
                .iter()
                .map(|i| schema.field(*i).name().clone())
                .collect(),
            schema,
            batches,
            suppressed_cells: 0,
        };
        if let Some(min) = opts.min_cell {
            suppress(&mut output, &count_idx, min)?;
        }
        Ok(output)
    })
}

/// Whether output column `i` of `plan` is a COUNT or SUM aggregate.
fn is_count(plan: &LogicalPlan, i: usize) -> bool {
    match plan {
        LogicalPlan::Projection(p) => match p.expr.get(i).map(strip) {
            Some(Expr::Column(c)) => p
                .input
                .schema()
                .index_of_column(c)
                .is_ok_and(|j| is_count(&p.input, j)),
            _ => false,
        },
        LogicalPlan::Sort(s) => is_count(&s.input, i),
        LogicalPlan::Limit(l) => is_count(&l.input, i),
        LogicalPlan::Filter(f) => is_count(&f.input, i),
        LogicalPlan::SubqueryAlias(a) => is_count(&a.input, i),
        LogicalPlan::Aggregate(a) => {
            let groups = a.group_expr_len().unwrap_or(usize::MAX);
            i >= groups
                && matches!(
                    a.aggr_expr.get(i - groups).map(strip),
                    Some(Expr::AggregateFunction(f))
                        if matches!(f.func.name().to_lowercase().as_str(), "count" | "sum")
                )
        }
        _ => false,
    }
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip(&a.expr),
        other => other,
    }
}

/// Replaces counts 1..min-1 in the count columns by NULL.
fn suppress(out: &mut QueryOutput, columns: &[usize], min: u64) -> Result<()> {
    let err = |e: datafusion::arrow::error::ArrowError| WardError::Data {
        context: "suppressing small counts",
        path: PathBuf::new(),
        message: e.to_string(),
    };
    // Suppressed counts are NULL: count columns become nullable.
    let fields: Vec<_> = out
        .schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let f = f.as_ref().clone();
            Arc::new(if columns.contains(&i) {
                f.with_nullable(true)
            } else {
                f
            })
        })
        .collect();
    out.schema = Arc::new(datafusion::arrow::datatypes::Schema::new_with_metadata(
        fields,
        out.schema.metadata().clone(),
    ));
    for batch in &mut out.batches {
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        for &i in columns {
            let col = &cols[i];
            // Negative sums are not counts of people: kept. Counts above
            // i64::MAX cannot be small.
            let as_i = cast(col, &DataType::Float64).map_err(err)?;
            let v = as_i
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Float64Array>()
                .expect("cast");
            let small: datafusion::arrow::array::BooleanArray = v
                .iter()
                .map(|x| Some(x.is_some_and(|x| x >= 1.0 && x < min as f64)))
                .collect();
            out.suppressed_cells += small.true_count() as u64;
            let nulls = datafusion::arrow::array::new_null_array(col.data_type(), col.len());
            cols[i] = zip(&small, &nulls, col).map_err(err)?;
        }
        *batch = RecordBatch::try_new(out.schema.clone(), cols).map_err(err)?;
    }
    if out.suppressed_cells > 0 {
        tracing::info!(
            cells = out.suppressed_cells,
            min_cell = min,
            "small counts suppressed"
        );
    }
    Ok(())
}

/// Output formats of [`write_output`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A text table for the terminal.
    Table,
    /// CSV with a header line (list columns are not supported).
    Csv,
    /// A JSON array of objects, nulls explicit.
    Json,
    /// One zstd Parquet file.
    Parquet,
}

/// Writes a result in `format` to `w`.
pub fn write_output<W: Write + Send>(
    out: &QueryOutput,
    format: OutputFormat,
    mut w: W,
) -> Result<()> {
    let err = |message: String| WardError::Data {
        context: "writing query output",
        path: PathBuf::new(),
        message,
    };
    match format {
        OutputFormat::Table => {
            use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
                .set_header(out.schema.fields().iter().map(|f| f.name().clone()));
            let options = FormatOptions::default().with_null("NULL");
            for b in &out.batches {
                let formatters = b
                    .columns()
                    .iter()
                    .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| err(e.to_string()))?;
                for row in 0..b.num_rows() {
                    table.add_row(formatters.iter().map(|f| f.value(row).to_string()));
                }
            }
            writeln!(w, "{table}").map_err(|e| err(e.to_string()))?;
            let rows: usize = out.batches.iter().map(RecordBatch::num_rows).sum();
            writeln!(w, "{rows} row(s)").map_err(|e| err(e.to_string()))?;
        }
        OutputFormat::Csv => {
            let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut w);
            if out.batches.is_empty() {
                let empty = RecordBatch::new_empty(out.schema.clone());
                writer.write(&empty).map_err(|e| err(e.to_string()))?;
            }
            for b in &out.batches {
                writer.write(b).map_err(|e| err(e.to_string()))?;
            }
        }
        OutputFormat::Json => {
            let mut writer = datafusion::arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, datafusion::arrow::json::writer::JsonArray>(&mut w);
            for b in &out.batches {
                writer.write(b).map_err(|e| err(e.to_string()))?;
            }
            writer.finish().map_err(|e| err(e.to_string()))?;
            writeln!(w).map_err(|e| err(e.to_string()))?;
        }
        OutputFormat::Parquet => {
            use datafusion::parquet::arrow::ArrowWriter;
            use datafusion::parquet::basic::{Compression, ZstdLevel};
            use datafusion::parquet::file::properties::WriterProperties;
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(
                    ZstdLevel::try_new(3).expect("valid zstd level"),
                ))
                .build();
            let mut writer = ArrowWriter::try_new(&mut w, out.schema.clone(), Some(props))
                .map_err(|e| err(e.to_string()))?;
            for b in &out.batches {
                writer.write(b).map_err(|e| err(e.to_string()))?;
            }
            writer.close().map_err(|e| err(e.to_string()))?;
        }
    }
    w.flush().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Vec<String> {
        vec!["person".into(), "observation".into()]
    }

    #[test]
    fn selects_over_research_tables_pass() {
        for sql in [
            "SELECT count(*) FROM person",
            "select age_band, count(*) n from PERSON group by age_band",
            "WITH t AS (SELECT * FROM person) SELECT * FROM t JOIN observation o USING (research_id)",
            "SELECT * FROM (SELECT 1) x",
            "SELECT 1",
        ] {
            check(sql, &tables()).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }

    #[test]
    fn everything_else_is_refused() {
        for sql in [
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
            "CREATE TABLE x AS SELECT * FROM person",
            "CREATE VIEW v AS SELECT * FROM person",
            "INSERT INTO person VALUES ('a')",
            "DROP TABLE person",
            "COPY person TO '/tmp/x.csv'",
            "COPY (SELECT * FROM person) TO '/tmp/x.parquet'",
            "SET datafusion.execution.batch_size = 1",
            "SELECT * FROM '/etc/passwd'",
            "SELECT * FROM 'file:///etc/passwd'",
            "SELECT * FROM read_parquet('/tmp/x.parquet')",
            "SELECT * FROM generate_series(1, 3)",
            "SELECT 1; DROP TABLE person",
            "SELECT 1; SELECT 2",
            "EXPLAIN SELECT 1",
            "SELECT * FROM datafusion.public.person",
            "SELECT * FROM person p WHERE p.research_id IN (SELECT x FROM '/etc/passwd')",
            "SELECT * INTO copied FROM person",
            "",
        ] {
            match check(sql, &tables()) {
                Err(WardError::Query { refused: true, .. }) => {}
                other => panic!("{sql}: {other:?}"),
            }
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4gib"), Ok(4 << 30));
        assert_eq!(parse_size("1.5GB"), Ok(3 << 29));
        assert_eq!(parse_size(" 2 T "), Ok(2 << 40));
        for bad in ["", "G", "4X", "-1G", "0", "0.1", "1..2M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(default_memory_limit() > 0);
    }
}
