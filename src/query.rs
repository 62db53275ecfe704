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
use std::time::Duration;

use datafusion::arrow::array::{Array, ArrayRef, RecordBatch};
use datafusion::arrow::compute::{cast, kernels::zip::zip};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::{ParquetReadOptions, SessionConfig};
use datafusion::sql::parser::{DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, Query, SetExpr, Statement, TableFactor, Visit, Visitor, visit_expressions,
};
use datafusion::sql::sqlparser::parser::ParserError;
use futures::StreamExt;

use crate::error::{BoxError, Result, WardError};

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
    /// The query fails when it has not finished after this long (planning,
    /// execution and collecting the result). `None`: no limit.
    pub timeout: Option<Duration>,
    /// The research tables this query may read (by name); the others are
    /// neither accepted by the check nor registered in the session.
    /// `None`: all of them.
    pub tables: Option<Vec<String>>,
}

/// The catalog the research tables are registered in: a table is
/// `observation`, `research.observation` or `ward.research.observation`
/// (the qualified forms are what SQL clients generate from the metadata
/// `ward serve` reports).
pub const CATALOG: &str = "ward";
/// The schema of the research tables in [`CATALOG`].
pub const SCHEMA: &str = "research";

/// `ward query`'s default time limit.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The longest query text Ward parses (1 MiB).
pub const MAX_QUERY_BYTES: usize = 1 << 20;
/// At most this many tokens (words, literals, operators) in a query: a
/// query is planned and evaluated by recursion over its syntax tree, and a
/// chain of thousands of operators would exhaust the stack.
pub const MAX_QUERY_TOKENS: usize = 20_000;
/// At most this many `UNION` / `INTERSECT` / `EXCEPT` in a query.
pub const MAX_SET_OPERATIONS: usize = 256;
/// Nesting of parentheses, subqueries and expressions (the parser's
/// recursion limit).
pub const MAX_QUERY_DEPTH: usize = 64;
/// Stack of the thread that plans a query: room for the deepest tree the
/// limits above allow (reserved, not used, until a query needs it).
const QUERY_STACK_BYTES: usize = 256 << 20;
/// Stack of the engine's workers, which evaluate the planned expressions.
const WORKER_STACK_BYTES: usize = 64 << 20;

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

/// Parses a duration such as `90s`, `10m`, `2h` or `600` (seconds).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 90s, 10m, 2h)"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "m" | "min" => number.saturating_mul(60),
        "h" => number.saturating_mul(3600),
        _ => return Err(format!("`{text}`: unknown unit (use s, m or h)")),
    };
    if seconds == 0 {
        return Err(format!("`{text}`: must be at least one second"));
    }
    Ok(Duration::from_secs(seconds))
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

/// The allow-list walk over one query: every table a FROM item names is a
/// research table or a CTE of the query; no SELECT ... INTO, table
/// functions, UNNEST of a FROM item's column or other FROM items.
struct Check<'a> {
    /// The research tables.
    tables: &'a [String],
    /// The CTE names seen so far.
    ctes: Vec<String>,
    /// The research tables read.
    read: Vec<String>,
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
                    return ControlFlow::Break(format!("table functions are not allowed ({name})"));
                }
                let parts: Option<Vec<_>> = name.0.iter().map(|p| p.as_ident()).collect();
                let plain = |i: &&datafusion::sql::sqlparser::ast::Ident| {
                    i.quote_style.is_none_or(|q| q == '"')
                };
                let known = match parts.as_deref() {
                    // A CTE of the query or a research table.
                    Some([table]) if plain(table) => Some(normalize(table))
                        .filter(|n| self.tables.contains(n) || self.ctes.contains(n)),
                    // research.table, ward.research.table.
                    Some(qualified @ ([_, _] | [_, _, _])) if qualified.iter().all(plain) => {
                        let names: Vec<String> = qualified.iter().map(|i| normalize(i)).collect();
                        let prefix_ok = match names.as_slice() {
                            [schema, _] => schema == SCHEMA,
                            [catalog, schema, _] => catalog == CATALOG && schema == SCHEMA,
                            _ => false,
                        };
                        names
                            .last()
                            .cloned()
                            .filter(|n| prefix_ok && self.tables.contains(n))
                    }
                    _ => None,
                };
                if let Some(table) = &known
                    && self.tables.contains(table)
                    && !(matches!(parts.as_deref(), Some([_])) && self.ctes.contains(table))
                    && !self.read.contains(table)
                {
                    self.read.push(table.clone());
                }
                if known.is_none() {
                    return ControlFlow::Break(format!(
                        "{name} is not a research table (tables: {})",
                        self.tables.join(", ")
                    ));
                }
                ControlFlow::Continue(())
            }
            // DataFusion 55 plans an UNNEST of another FROM item's
            // column (`FROM condition c, UNNEST(c.codings)`) but cannot
            // run it: refuse it with the form that works.
            TableFactor::UNNEST { array_exprs, .. }
                if array_exprs.iter().any(|e| {
                    visit_expressions(e, |x| match x {
                        SqlExpr::Identifier(_) | SqlExpr::CompoundIdentifier(_) => {
                            ControlFlow::Break(())
                        }
                        _ => ControlFlow::Continue(()),
                    })
                    .is_break()
                }) =>
            {
                ControlFlow::Break(
                    "UNNEST of a column in FROM is not supported; unnest in the \
                     select list instead: WITH c AS (SELECT research_id, \
                     unnest(codings) AS coding FROM condition) SELECT ... \
                     coding['system'], coding['code'] FROM c"
                        .into(),
                )
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

/// Checks that `sql` is one read-only query over `tables` (layer 1 of the
/// module documentation); returns the tables it reads, sorted.
pub fn check(sql: &str, tables: &[String]) -> Result<Vec<String>> {
    check_size(sql)?;
    let statements = DFParserBuilder::new(sql)
        .with_recursion_limit(MAX_QUERY_DEPTH)
        .build()
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| match e {
            DataFusionError::SQL(e, _) if matches!(*e, ParserError::RecursionLimitExceeded) => {
                refused(format!(
                    "the query is nested more than {MAX_QUERY_DEPTH} levels deep \
                     (subqueries, parentheses, expressions); use CTEs (WITH) instead"
                ))
            }
            e => WardError::Query {
                refused: false,
                message: e.to_string(),
            },
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
    let mut check = Check {
        tables,
        ctes: Vec::new(),
        read: Vec::new(),
    };
    match query.visit(&mut check) {
        ControlFlow::Break(message) => Err(refused(message)),
        ControlFlow::Continue(()) => {
            check.read.sort();
            Ok(check.read)
        }
    }
}

/// Refuses a query larger than the limits above, before it is parsed.
fn check_size(sql: &str) -> Result<()> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::keywords::Keyword;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    if sql.len() > MAX_QUERY_BYTES {
        return Err(refused(format!(
            "the query is longer than {} KiB",
            MAX_QUERY_BYTES >> 10
        )));
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| WardError::Query {
            refused: false,
            message: e.to_string(),
        })?;
    let mut count = 0;
    let mut set_operations = 0;
    for token in &tokens {
        match token {
            Token::Whitespace(_) => continue,
            Token::Word(w)
                if matches!(
                    w.keyword,
                    Keyword::UNION | Keyword::INTERSECT | Keyword::EXCEPT
                ) =>
            {
                set_operations += 1
            }
            _ => {}
        }
        count += 1;
    }
    if count > MAX_QUERY_TOKENS {
        return Err(refused(format!(
            "the query has {count} tokens; at most {MAX_QUERY_TOKENS} are allowed \
             (use IN lists or a join instead of long chains of conditions)"
        )));
    }
    if set_operations > MAX_SET_OPERATIONS {
        return Err(refused(format!(
            "the query has {set_operations} UNION/INTERSECT/EXCEPT; at most \
             {MAX_SET_OPERATIONS} are allowed"
        )));
    }
    Ok(())
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
/// documentation). The result is held in memory and counts against the
/// query's memory limit.
///
/// The query is planned on a thread of its own with a large stack, and runs
/// at most `opts.timeout`; a panic inside the engine is reported as an
/// error, never propagated.
pub fn query(research_dir: &Path, sql: &str, opts: &QueryOptions) -> Result<QueryOutput> {
    let mut batches = Vec::new();
    let ran = on_query_thread(research_dir, sql, opts, Sink::Collect(&mut batches))?;
    Ok(QueryOutput {
        schema: ran.schema,
        batches,
        count_columns: ran.count_columns,
        suppressed_cells: ran.suppressed_cells,
    })
}

/// One step of a result that [`query_each`] hands on.
#[derive(Debug)]
pub enum QueryEvent {
    /// First, once: the result's schema (count columns nullable when small
    /// counts are suppressed) and the columns treated as counts.
    Schema {
        schema: SchemaRef,
        count_columns: Vec<String>,
    },
    /// Rows, as the engine produces them, small counts already suppressed.
    Batch(RecordBatch),
}

/// [`query`] with the same checks and limits, handing the result on batch
/// by batch instead of holding it (`ward serve` streams it to a client):
/// `each` receives the schema, then every batch; when it returns `false`
/// the query stops there (nothing is executed when that is the schema's
/// answer: planning only). Returns how many count cells were suppressed.
pub fn query_each(
    research_dir: &Path,
    sql: &str,
    opts: &QueryOptions,
    each: &mut (dyn FnMut(QueryEvent) -> bool + Send),
) -> Result<u64> {
    on_query_thread(research_dir, sql, opts, Sink::Each(each)).map(|r| r.suppressed_cells)
}

/// The schema `sql`'s result would have (as [`query_each`] gives it),
/// after the same checks, without executing it.
pub fn result_schema(research_dir: &Path, sql: &str, opts: &QueryOptions) -> Result<SchemaRef> {
    let mut planned = None;
    query_each(research_dir, sql, opts, &mut |event| {
        if let QueryEvent::Schema { schema, .. } = event {
            planned = Some(schema);
        }
        false
    })?;
    Ok(planned.expect("query_each hands on the schema first"))
}

/// Where a query's batches go.
enum Sink<'a> {
    /// Held, counted against the query's memory pool.
    Collect(&'a mut Vec<RecordBatch>),
    /// Handed on; `false` stops the query.
    Each(&'a mut (dyn FnMut(QueryEvent) -> bool + Send)),
}

/// What a query produced besides its batches.
struct Ran {
    schema: SchemaRef,
    count_columns: Vec<String>,
    suppressed_cells: u64,
}

/// The research tables `opts` allows, checked against `sql`, then the query
/// run on a thread of its own (see [`query`]).
fn on_query_thread(
    research_dir: &Path,
    sql: &str,
    opts: &QueryOptions,
    mut sink: Sink<'_>,
) -> Result<Ran> {
    let tables: Vec<(String, PathBuf)> = research_tables(research_dir)?
        .into_iter()
        .filter(|(name, _)| {
            opts.tables
                .as_ref()
                .is_none_or(|allowed| allowed.contains(name))
        })
        .collect();
    let names: Vec<String> = tables.iter().map(|(n, _)| n.clone()).collect();
    check(sql, &names)?;
    let failed =
        |source: BoxError| WardError::data("running a research query", research_dir, source);
    std::thread::scope(|scope| {
        let run = std::thread::Builder::new()
            .name("ward-query".into())
            .stack_size(QUERY_STACK_BYTES)
            .spawn_scoped(scope, || {
                crate::engine::block_on_with_stack(WORKER_STACK_BYTES, async {
                    let work = run(research_dir, &tables, sql, opts, &mut sink);
                    match opts.timeout {
                        Some(limit) => {
                            tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                                Err(failed(
                                    format!(
                                        "the query did not finish within its time limit of {} \
                                     (filter, aggregate or add LIMIT, or raise --timeout)",
                                        format_duration(limit)
                                    )
                                    .into(),
                                ))
                            })
                        }
                        None => work.await,
                    }
                })
            })
            .map_err(|e| WardError::io("cannot start a query thread", research_dir, e))?;
        run.join().unwrap_or_else(|_| {
            Err(failed(
                "the query engine failed on this query (internal error)".into(),
            ))
        })
    })
}

/// `90s`, `10m`, `2h`: a duration as [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    match d.as_secs() {
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

async fn run(
    research_dir: &Path,
    tables: &[(String, PathBuf)],
    sql: &str,
    opts: &QueryOptions,
    sink: &mut Sink<'_>,
) -> Result<Ran> {
    let mut config = SessionConfig::new()
        .with_information_schema(false)
        .with_default_catalog_and_schema(CATALOG, SCHEMA);
    // Strings as plain Utf8, not the views DataFusion reads Parquet into: a
    // batch of views holds (and Arrow IPC would send) the whole data
    // buffers it points into, so streamed slices of it cost quadratic
    // bytes; and clients on older Arrow versions (JDBC) cannot read views.
    config
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = false;
    let ctx = match opts.memory_limit {
        Some(bytes) => crate::engine::limited_session(config, bytes)?,
        None => crate::engine::local_session(config),
    };
    for (name, path) in tables {
        let location = if path.is_dir() {
            format!("{}/", path.display())
        } else {
            path.display().to_string()
        };
        ctx.register_parquet(name, &location, ParquetReadOptions::default())
            .await
            .map_err(|e| WardError::data("registering a research table", path.clone(), e))?;
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
    let planned: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let count_idx: Vec<usize> = (0..planned.fields().len())
        .filter(|i| planned.field(*i).data_type().is_integer() && is_count(&plan, *i))
        .collect();
    let count_columns: Vec<String> = count_idx
        .iter()
        .map(|i| planned.field(*i).name().clone())
        .collect();
    let schema = match opts.min_cell {
        Some(_) => nullable(&planned, &count_idx),
        None => planned,
    };
    let mut ran = Ran {
        schema: schema.clone(),
        count_columns: count_columns.clone(),
        suppressed_cells: 0,
    };
    if let Sink::Each(each) = sink
        && !each(QueryEvent::Schema {
            schema,
            count_columns,
        })
    {
        return Ok(ran);
    }
    let run_err = |e: DataFusionError| WardError::Data {
        context: "running a research query",
        path: research_dir.to_path_buf(),
        source: match (e.find_root(), opts.memory_limit) {
            (DataFusionError::ResourcesExhausted(_), Some(limit)) => format!(
                "the query needs more memory than its limit of {} MiB \
                 (aggregate, filter or add LIMIT, or raise --memory-limit): {e}",
                limit >> 20
            )
            .into(),
            _ => e.into(),
        },
    };
    // A held result counts against the same pool as the operators, so a
    // huge result fails instead of growing.
    let held = MemoryConsumer::new("ward query result").register(&ctx.runtime_env().memory_pool);
    let mut stream = df.execute_stream().await.map_err(run_err)?;
    while let Some(batch) = stream.next().await {
        let mut batch = batch.map_err(run_err)?;
        if let Some(min) = opts.min_cell {
            let suppressed;
            (batch, suppressed) = suppress(&batch, &ran.schema, &count_idx, min)?;
            ran.suppressed_cells += suppressed;
        }
        match sink {
            Sink::Collect(batches) => {
                held.try_grow(batch.get_array_memory_size())
                    .map_err(run_err)?;
                batches.push(batch);
            }
            Sink::Each(each) => {
                if !each(QueryEvent::Batch(batch)) {
                    break;
                }
            }
        }
    }
    if ran.suppressed_cells > 0 {
        tracing::info!(
            cells = ran.suppressed_cells,
            min_cell = opts.min_cell,
            "small counts suppressed"
        );
    }
    Ok(ran)
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

/// `schema` with its count columns nullable: suppressed counts are NULL.
fn nullable(schema: &SchemaRef, columns: &[usize]) -> SchemaRef {
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let nullable = f.is_nullable() || columns.contains(&i);
            Arc::new(f.as_ref().clone().with_nullable(nullable))
        })
        .collect();
    Arc::new(datafusion::arrow::datatypes::Schema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    ))
}

/// `batch` with counts 1..min-1 in the count columns replaced by NULL, in
/// `schema` (see [`nullable`]); and how many were replaced.
fn suppress(
    batch: &RecordBatch,
    schema: &SchemaRef,
    columns: &[usize],
    min: u64,
) -> Result<(RecordBatch, u64)> {
    let err = |e: datafusion::arrow::error::ArrowError| {
        WardError::data("suppressing small counts", PathBuf::new(), e)
    };
    let mut suppressed = 0;
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    for &i in columns {
        let col = &cols[i];
        // Negative sums are not counts of people: kept. Counts above
        // i64::MAX cannot be small.
        let as_f = cast(col, &DataType::Float64).map_err(err)?;
        let v = as_f
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Float64Array>()
            .expect("cast");
        let small: datafusion::arrow::array::BooleanArray = v
            .iter()
            .map(|x| Some(x.is_some_and(|x| x >= 1.0 && x < min as f64)))
            .collect();
        suppressed += small.true_count() as u64;
        let nulls = datafusion::arrow::array::new_null_array(col.data_type(), col.len());
        cols[i] = zip(&small, &nulls, col).map_err(err)?;
    }
    let batch = RecordBatch::try_new(schema.clone(), cols).map_err(err)?;
    Ok((batch, suppressed))
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
    let err = |source: BoxError| WardError::data("writing query output", PathBuf::new(), source);
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
                    .map_err(|e| err(e.into()))?;
                for row in 0..b.num_rows() {
                    table.add_row(formatters.iter().map(|f| f.value(row).to_string()));
                }
            }
            writeln!(w, "{table}").map_err(|e| err(e.into()))?;
            let rows: usize = out.batches.iter().map(RecordBatch::num_rows).sum();
            writeln!(w, "{rows} row(s)").map_err(|e| err(e.into()))?;
        }
        OutputFormat::Csv => {
            let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut w);
            if out.batches.is_empty() {
                let empty = RecordBatch::new_empty(out.schema.clone());
                writer.write(&empty).map_err(|e| err(e.into()))?;
            }
            for b in &out.batches {
                writer.write(b).map_err(|e| err(e.into()))?;
            }
        }
        OutputFormat::Json => {
            let mut writer = datafusion::arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, datafusion::arrow::json::writer::JsonArray>(&mut w);
            for b in &out.batches {
                writer.write(b).map_err(|e| err(e.into()))?;
            }
            writer.finish().map_err(|e| err(e.into()))?;
            writeln!(w).map_err(|e| err(e.into()))?;
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
                .map_err(|e| err(e.into()))?;
            for b in &out.batches {
                writer.write(b).map_err(|e| err(e.into()))?;
            }
            writer.close().map_err(|e| err(e.into()))?;
        }
    }
    w.flush().map_err(|e| err(e.into()))
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
            "SELECT * FROM UNNEST([1, 2]) AS t(x)",
            "WITH c AS (SELECT research_id, unnest(codings) AS coding FROM observation) \
             SELECT coding['code'] FROM c",
            // Qualified as `ward serve`'s metadata reports them.
            "SELECT count(*) FROM research.person",
            "SELECT count(*) FROM ward.research.person p JOIN \"research\".observation USING (research_id)",
        ] {
            check(sql, &tables()).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let read = |sql: &str| check(sql, &tables()).unwrap();
        assert_eq!(
            read("WITH person AS (SELECT 1) SELECT * FROM person, research.observation"),
            ["observation"]
        );
        assert_eq!(
            read(
                "SELECT * FROM Observation o JOIN person USING (research_id) JOIN observation p USING (research_id)"
            ),
            ["observation", "person"]
        );
        assert!(read("SELECT 1").is_empty());
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
            "SELECT * FROM public.person",
            "SELECT * FROM ward.public.person",
            "SELECT * FROM other.research.person",
            "SELECT * FROM research.nosuchtable",
            "SELECT * FROM ward.research.person.x",
            "WITH t AS (SELECT 1) SELECT * FROM research.t",
            "SELECT * FROM person p WHERE p.research_id IN (SELECT x FROM '/etc/passwd')",
            "SELECT * INTO copied FROM person",
            "SELECT o.research_id FROM observation o, UNNEST(o.codings) AS u(c)",
            "SELECT 1 FROM observation CROSS JOIN UNNEST(codings)",
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

    #[test]
    fn durations_parse_and_print_back() {
        for (text, secs) in [
            ("90s", 90),
            ("600", 600),
            ("10m", 600),
            ("2h", 7200),
            ("3min", 180),
        ] {
            let d = parse_duration(text).unwrap();
            assert_eq!(d.as_secs(), secs, "{text}");
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(DEFAULT_TIMEOUT), "10m");
        for bad in ["", "s", "0", "0s", "-5s", "1.5m", "10d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn oversized_queries_are_refused_before_parsing() {
        let unions = |n: usize| vec!["SELECT 1 AS x FROM person"; n].join(" UNION ALL ");
        assert!(check(&unions(MAX_SET_OPERATIONS + 1), &tables()).is_ok());
        let too_many = check(&unions(MAX_SET_OPERATIONS + 2), &tables()).unwrap_err();
        assert!(
            too_many.to_string().contains("UNION/INTERSECT/EXCEPT"),
            "{too_many}"
        );
        let chain = format!(
            "SELECT {} FROM person",
            vec!["1"; MAX_QUERY_TOKENS].join("+")
        );
        let long = check(&chain, &tables()).unwrap_err();
        assert!(long.to_string().contains("tokens"), "{long}");
        let nested = format!(
            "SELECT * FROM {}person{}",
            "(SELECT * FROM ".repeat(MAX_QUERY_DEPTH),
            ") t".repeat(MAX_QUERY_DEPTH)
        );
        let deep = check(&nested, &tables()).unwrap_err();
        assert!(deep.to_string().contains("nested more than"), "{deep}");
        let huge = format!("SELECT '{}'", "x".repeat(MAX_QUERY_BYTES));
        assert!(
            check(&huge, &tables())
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
        for e in [too_many, long, deep] {
            assert!(matches!(e, WardError::Query { refused: true, .. }), "{e:?}");
        }
    }
}
