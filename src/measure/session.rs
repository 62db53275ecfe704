//! The DataFusion session measures run in: warehouse tables, value sets, the
//! measurement period and helper functions, all registered under fixed names
//! so that measure SQL never names a file or a date.
//!
//! Tables and views a measure can use:
//! - `encounter`, `condition`, `observation`, `medication`, `procedure`,
//!   `service_request`, `device`, `coverage`: the core fact tables when
//!   linkage has run (with `person_id` and `reported_by`), else the staged
//!   rows with `person_id` = `<source>/<source_patient_id>`. `condition`
//!   adds `prevalence_start` and `prevalence_end` (see [`PREVALENCE_END`]).
//! - `patient`: one row per person: `core/person` when linkage has run,
//!   else the staged patient rows with that `person_id`; both have
//!   `sources`, the list of providers that know the person.
//! - `<table>_coding` for every coded table: one row per coding of a fact
//!   (`coding_system`, `coding_code`), to match single codes in any coding;
//!   [`crate::measure::run`] computes those named twice or more once,
//!   sorted by code (see [`Shared`]).
//! - `<table>_vs`: the rows of `<table>_coding` whose coding is in a value
//!   set (column `valueset`, an OID). A fact appears once per matching
//!   coding, so test membership with `EXISTS`/`MIN`/`MAX`, never `COUNT(*)`.
//!   [`crate::measure::run`] computes these once for all its measures
//!   (see [`Shared`]).
//! - `<table>_reason` for every table with `reasons` (why a fact was or
//!   was not done): one row per reason (`reason_system`, `reason_code`);
//!   `<table>_reason_vs` adds `reason_valueset`, an OID the reason is in.
//! - `valueset_code`: the value-set files of `queries/valuesets/`.
//! - `period`: one row, `start_date`, `end_date` (DATE, inclusive) and
//!   `start_ts`, `end_ts` (TIMESTAMP; `end_ts` is the first instant after the
//!   period, so `t >= start_ts AND t < end_ts` is "during day of").
//! - `age_years(birth_date, at_date)`: completed years, as CQL's AgeInYearsAt;
//!   `age_band(age)`: the report's age band of an age.
//! - the views of `queries/lib/*.sql` (common to every measure), then of
//!   `queries/lib/<library>/*.sql` (the measure's versioned shared
//!   criteria, such as hospice care). Within a folder a file loads after
//!   the files its `-- requires: a.sql, b.sql` lines name, else by name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::NaiveDate;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use datafusion::config::{ParquetColumnOptions, TableParquetOptions};
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::datasource::ViewTable;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::{SessionConfig, SessionContext, lit};
use datafusion::sql::parser::DFParser;
use futures::{StreamExt, TryStreamExt};

use crate::error::{BoxError, Result, WardError};
use crate::measure::Period;
use crate::schema::{self, Kind, Table};
use crate::warehouse::Warehouse;

/// The end of a condition's prevalence interval at day precision, following the
/// eCQM `prevalenceInterval()`: an active, recurrent or relapsed condition
/// (or one without a clinical status, as in most CSV extracts) lasts until
/// its abatement or indefinitely; any other lasts until its abatement, and
/// without one its end is unknown (`NULL`), so it overlaps nothing.
const PREVALENCE_END: &str = "\
CASE WHEN clinical_status IS NULL OR clinical_status IN ('active', 'recurrence', 'relapse') \
THEN coalesce(abatement_date, DATE '9999-12-31') ELSE abatement_date END";

/// Builds the session for one measurement period over the warehouse's
/// tables, with everything [`install`] adds. With `shared`, the value-set
/// memberships are the tables [`Shared`] holds (written by the first
/// session that uses it) instead of views evaluated by every query.
pub(crate) async fn session(
    warehouse: &Warehouse,
    queries: &Path,
    period: Period,
    library: &str,
    shared: Option<&mut Shared>,
) -> Result<SessionContext> {
    let ctx = crate::engine::session(SessionConfig::new().with_information_schema(true))?;
    crate::engine::register_staging(&ctx, warehouse).await?;
    let core = warehouse.out().join("core");
    let linked = warehouse.reads_core() && core.join("person.parquet").is_file();
    if linked {
        crate::engine::register_parquet(
            &ctx,
            "core_person",
            &core.join("person.parquet"),
            crate::schema::person_schema(),
        )
        .await?;
        for table in Table::ALL.into_iter().filter(|t| *t != Table::Patient) {
            let path = core.join(table.name());
            ctx.register_parquet(
                format!("core_{}", table.name()),
                format!("{}/", path.display()),
                datafusion::prelude::ParquetReadOptions::default(),
            )
            .await
            .map_err(|e| WardError::data("registering table", &path, e))?;
        }
    }
    install_base(&ctx, queries, period, linked).await?;
    if let Some(shared) = shared {
        let base = |table: Table| match linked {
            true => core.join(table.name()),
            false => warehouse.staging_table_dir(table),
        };
        shared.install(&ctx, queries, linked, &base).await?;
    }
    install_lib(&ctx, queries, library).await?;
    Ok(ctx)
}

/// Installs on `ctx`, whose base tables are registered, everything else a
/// measure's SQL sees: the value sets of `queries/valuesets/`, the `period`
/// table, the UDFs, the views of every canonical table, then the views of
/// the common `queries/lib/*.sql` and of the shared criteria of
/// `queries/lib/<library>/` (when that folder exists), which build on them,
/// each folder in file-name order. The base tables are `core_person` and
/// `core_<table>` when `linked` (linkage has run), else `staging_<table>`.
pub async fn install(
    ctx: &SessionContext,
    queries: &Path,
    period: Period,
    library: &str,
    linked: bool,
) -> Result<()> {
    install_base(ctx, queries, period, linked).await?;
    install_lib(ctx, queries, library).await
}

/// The value sets, `period`, the UDFs and the views of every canonical
/// table (see [`install`]).
async fn install_base(
    ctx: &SessionContext,
    queries: &Path,
    period: Period,
    linked: bool,
) -> Result<()> {
    register_valuesets(ctx, &queries.join("valuesets")).await?;

    let view = ViewTable::new(period_view(period)?, None);
    ctx.register_table("period", Arc::new(view))
        .map_err(|e| WardError::data("registering the period view", queries, e))?;
    for f in crate::sqlfn::functions() {
        ctx.register_udf(f);
    }

    for table in Table::ALL {
        for (_, view) in table_views(table, linked) {
            execute(ctx, &view, queries).await?;
        }
    }
    Ok(())
}

/// The views of one canonical table, as (name, `CREATE VIEW` statement):
/// the table itself over `core_<table>` when `linked`, else over
/// `staging_<table>`, then its `_coding`, `_vs`, `_reason` and
/// `_reason_vs` views where it has codings or reasons.
fn table_views(table: Table, linked: bool) -> Vec<(String, String)> {
    let name = table.name();
    let extra = if table == Table::Condition {
        format!(", onset_date AS prevalence_start, {PREVALENCE_END} AS prevalence_end")
    } else {
        String::new()
    };
    let mut views = vec![(
        name.to_string(),
        match (linked, table) {
            (true, Table::Patient) => "CREATE VIEW patient AS SELECT * FROM core_person".into(),
            (true, _) => format!("CREATE VIEW {name} AS SELECT *{extra} FROM core_{name}"),
            (false, Table::Patient) => "CREATE VIEW patient AS SELECT concat(source, '/', source_patient_id) AS person_id, *, \
                 make_array(source) AS sources FROM staging_patient"
                .into(),
            (false, _) => format!(
                "CREATE VIEW {name} AS SELECT concat(source, '/', source_patient_id) AS person_id, *{extra} FROM staging_{name}"
            ),
        },
    )];
    if table.column("codings").is_some() {
        views.push((
            format!("{name}_coding"),
            format!(
                "CREATE VIEW {name}_coding AS \
                 SELECT *, coding_['system'] AS coding_system, coding_['code'] AS coding_code \
                 FROM (SELECT *, unnest(codings) AS coding_ FROM {name})"
            ),
        ));
        views.push((
            format!("{name}_vs"),
            format!(
                "CREATE VIEW {name}_vs AS \
                 SELECT f.*, v.valueset FROM valueset_code v JOIN {name}_coding f \
                 ON v.code_system = f.coding_system AND v.code = f.coding_code"
            ),
        ));
    }
    if table.column("reasons").is_some() {
        views.push((
            format!("{name}_reason"),
            format!(
                "CREATE VIEW {name}_reason AS \
                 SELECT *, split_part(reason_, '|', 1) AS reason_system, \
                   substr(reason_, strpos(reason_, '|') + 1) AS reason_code \
                 FROM (SELECT *, unnest(string_to_array(reasons, ' ')) AS reason_ FROM {name} \
                   WHERE reasons IS NOT NULL)"
            ),
        ));
        views.push((
            format!("{name}_reason_vs"),
            format!(
                "CREATE VIEW {name}_reason_vs AS \
                 SELECT f.*, v.valueset AS reason_valueset FROM valueset_code v \
                 JOIN {name}_reason f \
                 ON v.code_system = f.reason_system AND v.code = f.reason_code"
            ),
        ));
    }
    views
}

/// The views of `queries/lib/*.sql`, then of `queries/lib/<library>/`.
async fn install_lib(ctx: &SessionContext, queries: &Path, library: &str) -> Result<()> {
    let lib = queries.join("lib");
    for dir in [lib.clone(), lib.join(library)] {
        if !dir.is_dir() {
            continue;
        }
        for (file, text) in load_order(&dir)? {
            execute(ctx, &text, &file).await?;
        }
    }
    Ok(())
}

/// Intermediate results computed once per measure run and shared by all
/// its sessions, written to Parquet and read back in place of the views
/// that define them. The files live in a scratch directory under the
/// warehouse's `.tmp/`, removed when this is dropped.
///
/// - Value-set membership: every `<table>_vs` and `<table>_reason_vs` view
///   that the SQL of `queries/` names, one folder per value set (Hive
///   style, `valueset=<oid>/`). A measure reads only the facts of the value
///   sets it names, instead of every reference unnesting every coding of
///   the table and joining it to every value set again.
/// - Codings: every `<table>_coding` view the SQL names in two places or
///   more (one reference reads it once: writing it would cost more),
///   sorted by coding system and code within each file of the table (one
///   output file per input file, so the sort holds one file's rows) in
///   row groups of [`CODING_ROW_GROUP`] rows. A criterion naming its codes
///   (`coding_system = 'loinc' AND coding_code IN (...)`) then reads only
///   the row groups whose statistics can hold them, instead of unnesting
///   every fact of the table at every reference.
pub(crate) struct Shared {
    dir: tempfile::TempDir,
    /// The tables written; `None` until the first session writes them.
    written: Option<Vec<Written>>,
}

/// One table [`Shared`] wrote: the view it replaces, the Hive partition
/// column of its files (`None` for codings), its schema.
struct Written {
    view: String,
    partition: Option<&'static str>,
    schema: SchemaRef,
}

/// Rows per row group of the shared coding tables: small enough that the
/// row groups of one code are few and the others are skipped.
const CODING_ROW_GROUP: usize = 64 * 1024;

impl Shared {
    /// An empty scratch directory under `<warehouse>/.tmp/`.
    pub(crate) fn new(warehouse: &Warehouse) -> Result<Shared> {
        Ok(Shared {
            dir: warehouse.scratch_dir("measures-")?,
            written: None,
        })
    }

    /// Replaces the views of `ctx` (whose base views are installed) by the
    /// shared tables, writing them first if no session has yet. `base`
    /// says where each canonical table's files are, `linked` whether they
    /// are the core tables (see [`table_views`]).
    async fn install(
        &mut self,
        ctx: &SessionContext,
        queries: &Path,
        linked: bool,
        base: &dyn Fn(Table) -> PathBuf,
    ) -> Result<()> {
        if self.written.is_none() {
            let sql = sql_text(queries)?;
            let mut written = Vec::new();
            for table in Table::ALL {
                let name = table.name();
                let view = format!("{name}_coding");
                if table.column("codings").is_some() && sql.matches(&view).count() >= 2 {
                    let started = std::time::Instant::now();
                    let out = self.dir.path().join(&view);
                    if let Some(schema) =
                        write_codings(ctx, table, linked, &base(table), &out).await?
                    {
                        let codings = Written {
                            view,
                            partition: None,
                            schema,
                        };
                        // The memberships below read the written codings.
                        self.register(ctx, &codings)?;
                        let vs = format!("{name}_vs");
                        for (_, statement) in table_views(table, linked)
                            .into_iter()
                            .filter(|(v, _)| *v == vs)
                        {
                            ctx.deregister_table(vs.as_str())
                                .map_err(|e| WardError::data("replacing a view", &out, e))?;
                            execute(ctx, &statement, &out).await?;
                        }
                        written.push(codings);
                        tracing::debug!(
                            table = name,
                            seconds = started.elapsed().as_secs_f64(),
                            "codings written"
                        );
                    }
                }
                let views = [
                    (table.column("codings"), format!("{name}_vs"), "valueset"),
                    (
                        table.column("reasons"),
                        format!("{name}_reason_vs"),
                        "reason_valueset",
                    ),
                ];
                for (_, view, column) in views
                    .into_iter()
                    .filter(|(c, v, _)| c.is_some() && sql.contains(v))
                {
                    let started = std::time::Instant::now();
                    let out = self.dir.path().join(&view);
                    let err = |e: DataFusionError| {
                        WardError::data("computing value-set membership", &out, e)
                    };
                    let df = ctx.table(view.as_str()).await.map_err(err)?;
                    let schema = Arc::new(df.schema().as_arrow().clone());
                    df.write_parquet(
                        &format!("{}/", out.display()),
                        DataFrameWriteOptions::new().with_partition_by(vec![column.to_string()]),
                        Some(scratch_options(table)),
                    )
                    .await
                    .map_err(err)?;
                    written.push(Written {
                        view,
                        partition: Some(column),
                        schema,
                    });
                    tracing::debug!(
                        table = name,
                        seconds = started.elapsed().as_secs_f64(),
                        "memberships written"
                    );
                }
            }
            self.written = Some(written);
        }
        for table in self.written.iter().flatten() {
            self.register(ctx, table)?;
        }
        Ok(())
    }

    /// Registers `table`'s files on `ctx` in place of its view.
    fn register(&self, ctx: &SessionContext, table: &Written) -> Result<()> {
        let Written {
            view,
            partition,
            schema,
        } = table;
        let dir = self.dir.path().join(view);
        let err = |e: DataFusionError| WardError::data("reading a shared table", &dir, e);
        ctx.deregister_table(view.as_str()).map_err(err)?;
        let empty = !dir.exists() || crate::warehouse::parquet_files(&dir)?.is_empty();
        if empty {
            return crate::engine::register_batches(ctx, view, schema.clone(), vec![], &dir);
        }
        let mut options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let mut files = schema.clone();
        if let Some(column) = partition {
            // The files hold every column but the partition column, which
            // their folder names.
            files = Arc::new(crate::engine::schema_without(schema, column));
            let kind = schema
                .field_with_name(column)
                .map_err(|e| err(e.into()))?
                .data_type()
                .clone();
            options = options.with_table_partition_cols(vec![(column.to_string(), kind)]);
        }
        let url = ListingTableUrl::parse(format!("{}/", dir.display())).map_err(err)?;
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(files);
        let table = ListingTable::try_new(config).map_err(err)?;
        ctx.register_table(view.as_str(), Arc::new(table))
            .map_err(err)?;
        Ok(())
    }
}

/// How [`Shared`] writes `table`'s rows: files read back within the run,
/// so the fastest compression (LZ4: a third less time than the default
/// zstd writing the encounter memberships at 1M), and dictionaries only
/// for the columns whose values repeat. Identifiers, line numbers and
/// times are nearly unique per row: a dictionary for them is hashed and
/// then thrown away for every row group (at 1M, writing the observation
/// codings took 4.6-4.9 s without them, 5.1-6.1 s with). Without any
/// dictionary the measures held 1.5 GB more of the repeated strings read
/// back.
fn scratch_options(table: Table) -> TableParquetOptions {
    let mut options = TableParquetOptions::default();
    options.global.compression = Some("lz4_raw".into());
    let unique = table
        .columns()
        .iter()
        .filter(|c| c.nearly_unique() || c.kind == Kind::Timestamp);
    for name in unique.map(|c| c.name) {
        let column = ParquetColumnOptions {
            dictionary_enabled: Some(false),
            ..Default::default()
        };
        options.column_specific_options.insert(name.into(), column);
    }
    options
}

/// Writes `<table>_coding` of `ctx` to `out`, one file per Parquet file of
/// the table under `base`, each sorted by coding system and code (see
/// [`Shared`]); its schema, or `None` when the table has no files. Each
/// file is computed by a session of its own, in this process, over that
/// file and the same view definitions.
async fn write_codings(
    ctx: &SessionContext,
    table: Table,
    linked: bool,
    base: &Path,
    out: &Path,
) -> Result<Option<SchemaRef>> {
    let name = table.name();
    let files = crate::warehouse::parquet_files(base)?;
    if files.is_empty() {
        return Ok(None);
    }
    let err = |e: DataFusionError| WardError::data("computing the codings", out, e);
    let source = match linked {
        true => format!("core_{name}"),
        false => format!("staging_{name}"),
    };
    let source_schema = ctx
        .table_provider(source.as_str())
        .await
        .map_err(err)?
        .schema();
    let view = format!("{name}_coding");
    let schema = Arc::new(
        ctx.table(view.as_str())
            .await
            .map_err(err)?
            .schema()
            .as_arrow()
            .clone(),
    );
    let mut options = scratch_options(table);
    options.global.max_row_group_size = CODING_ROW_GROUP;
    // One file per core at a time, each in one partition: a file's sort
    // and write then need no merge.
    let write = |(i, file): (usize, PathBuf)| {
        let (source, source_schema, view, options) =
            (&source, source_schema.clone(), &view, options.clone());
        async move {
            let one = crate::engine::one_partition_session();
            crate::engine::register_parquet(&one, source, &file, source_schema).await?;
            for (defined, statement) in table_views(table, linked) {
                if defined == name || defined == *view {
                    execute(&one, &statement, &file).await?;
                }
            }
            let sql = format!("SELECT * FROM {view} ORDER BY coding_system, coding_code");
            let part = out.join(format!("part-{i:05}.parquet"));
            one.sql(&sql)
                .await
                .map_err(err)?
                .write_parquet(
                    &part.to_string_lossy(),
                    DataFrameWriteOptions::new().with_single_file_output(true),
                    Some(options),
                )
                .await
                .map_err(err)?;
            Ok::<_, WardError>(())
        }
    };
    futures::stream::iter(files.into_iter().enumerate())
        .map(write)
        .buffer_unordered(rayon::current_num_threads().max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(Some(schema))
}

/// The text of every `.sql` file under `dir`, lower-cased.
fn sql_text(dir: &Path) -> Result<String> {
    let mut text = String::new();
    let entries = std::fs::read_dir(dir).map_err(|e| WardError::io("cannot read", dir, e))?;
    for entry in entries {
        let path = entry
            .map_err(|e| WardError::io("cannot read", dir, e))?
            .path();
        if path.is_dir() {
            text.push_str(&sql_text(&path)?);
        } else if path.extension().is_some_and(|x| x == "sql") {
            let sql = std::fs::read_to_string(&path)
                .map_err(|e| WardError::io("cannot read", &path, e))?;
            text.push_str(&sql.to_lowercase());
            text.push('\n');
        }
    }
    Ok(text)
}

/// The `.sql` files of a library folder with their text, in load order:
/// each after the files its `-- requires: a.sql, b.sql` lines name (files
/// of the same folder; those of `queries/lib/` always load before a
/// library's own), otherwise by name. A required file that is missing, or
/// files that require each other, are errors naming the file and line.
fn load_order(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| WardError::io("cannot read", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let mut pending: Vec<(PathBuf, String, Vec<String>)> = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).map_err(|e| WardError::io("cannot read", &file, e))?;
        let mut requires = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let Some(names) = line.trim().strip_prefix("-- requires:") else {
                continue;
            };
            for name in names.split([',', ' ']).filter(|n| !n.is_empty()) {
                if !dir.join(name).is_file() {
                    return Err(WardError::Config {
                        path: file.clone(),
                        line: Some(i + 1),
                        column: None,
                        key: Some("requires".into()),
                        message: format!("{name} is not a file of {}", dir.display()),
                    });
                }
                requires.push(name.to_string());
            }
        }
        pending.push((file, text, requires));
    }
    let mut ordered: Vec<(PathBuf, String)> = Vec::new();
    while !pending.is_empty() {
        let loaded = |name: &String| ordered.iter().any(|(p, _)| p.ends_with(name));
        let Some(next) = pending.iter().position(|(_, _, r)| r.iter().all(loaded)) else {
            let names: Vec<String> = pending
                .iter()
                .map(|(p, ..)| p.display().to_string())
                .collect();
            return Err(WardError::Config {
                path: pending[0].0.clone(),
                line: None,
                column: None,
                key: Some("requires".into()),
                message: format!("these files require each other: {}", names.join(", ")),
            });
        };
        let (file, text, _) = pending.remove(next);
        ordered.push((file, text));
    }
    Ok(ordered)
}

/// Runs every statement of `sql` (views of a library file), failing with the
/// file's name.
async fn execute(ctx: &SessionContext, sql: &str, file: &Path) -> Result<()> {
    let err = |source: BoxError| WardError::data("running SQL", file, source);
    let statements = DFParser::parse_sql(sql).map_err(|e| err(e.into()))?;
    for statement in statements {
        let plan = ctx
            .state()
            .statement_to_plan(statement)
            .await
            .map_err(|e| err(e.into()))?;
        ctx.execute_logical_plan(plan)
            .await
            .map_err(|e| err(e.into()))?
            .collect()
            .await
            .map_err(|e| err(e.into()))?;
    }
    Ok(())
}

/// The one-row `period` view: literals, so that a join with it becomes
/// filters on the facts' own columns (see
/// [`crate::optimizer::InlineConstantRow`]) and carries no data to a cluster.
fn period_view(period: Period) -> Result<LogicalPlan> {
    let day = |d: NaiveDate| (d - NaiveDate::default()).num_days() as i32;
    let micros = |d: NaiveDate| i64::from(day(d)) * 86_400_000_000;
    let after = period.end.succ_opt().unwrap_or(period.end);
    let columns = [
        ("start_date", ScalarValue::Date32(Some(day(period.start)))),
        ("end_date", ScalarValue::Date32(Some(day(period.end)))),
        (
            "start_ts",
            ScalarValue::TimestampMicrosecond(Some(micros(period.start)), None),
        ),
        (
            "end_ts",
            ScalarValue::TimestampMicrosecond(Some(micros(after)), None),
        ),
    ];
    LogicalPlanBuilder::empty(true)
        .project(columns.map(|(name, value)| lit(value).alias(name)))
        .and_then(|b| b.build())
        .map_err(|e| WardError::data("building the period view", PathBuf::new(), e))
}

/// Registers the rows of the value-set files of `dir` (`*.csv`) as
/// `valueset_code`, held in memory: a few thousand rows, read once per
/// session instead of once per query, and with an exact row count, so
/// that the planner builds its hash joins on a value set's few codes and
/// probes them with the facts, not the other way round (CMS122 built a
/// 0.9 GB table of 3.5M observations to probe it with five HbA1c codes).
pub(crate) async fn register_valuesets(ctx: &SessionContext, dir: &Path) -> Result<()> {
    let batches = valueset_batches(dir).await?;
    crate::engine::register_batches(
        ctx,
        "valueset_code",
        schema::valueset_code_schema(),
        batches,
        dir,
    )
}

/// Every row of the value-set files of `dir`, sorted by value set, code
/// system and code.
pub(crate) fn read_valuesets(dir: &Path) -> Result<Vec<RecordBatch>> {
    crate::engine::block_on(valueset_batches(dir))
}

async fn valueset_batches(dir: &Path) -> Result<Vec<RecordBatch>> {
    if !dir.is_dir() {
        return Err(WardError::Config {
            path: dir.to_path_buf(),
            line: None,
            column: None,
            key: None,
            message: "value-set directory not found (queries/valuesets)".into(),
        });
    }
    let ctx = crate::engine::local_session(SessionConfig::new());
    let csv = ListingOptions::new(Arc::new(CsvFormat::default().with_has_header(true)))
        .with_file_extension(".csv");
    ctx.register_listing_table(
        "valueset_code",
        format!("{}/", dir.display()),
        csv,
        Some(schema::valueset_code_schema()),
        None,
    )
    .await
    .map_err(|e| WardError::data("registering value sets", dir, e))?;
    let sql = "SELECT * FROM valueset_code ORDER BY valueset, code_system, code";
    crate::engine::collect_about(&ctx, sql, "reading value sets", dir).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn library(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn names(order: &[(PathBuf, String)]) -> Vec<String> {
        let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
        order.iter().map(|(p, _)| name(p)).collect()
    }

    #[test]
    fn library_files_load_after_what_they_require_else_by_name() {
        let dir = library(&[
            (
                "a.sql",
                "-- requires: c.sql\nCREATE VIEW a AS SELECT * FROM c;",
            ),
            ("b.sql", "CREATE VIEW b AS SELECT 1;"),
            (
                "c.sql",
                "-- requires: b.sql\nCREATE VIEW c AS SELECT * FROM b;",
            ),
            ("notes.txt", "not SQL"),
        ]);
        let order = load_order(dir.path()).unwrap();
        assert_eq!(names(&order), ["b.sql", "c.sql", "a.sql"]);
    }

    #[test]
    fn a_missing_or_circular_requirement_names_the_file() {
        let dir = library(&[("a.sql", "-- views\n-- requires: gone.sql\nSELECT 1;")]);
        match load_order(dir.path()).unwrap_err() {
            WardError::Config { path, line, .. } => {
                assert!(path.ends_with("a.sql"));
                assert_eq!(line, Some(2));
            }
            e => panic!("{e}"),
        }
        let dir = library(&[
            ("a.sql", "-- requires: b.sql"),
            ("b.sql", "-- requires: a.sql"),
        ]);
        let e = load_order(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("require each other") && e.contains("a.sql"),
            "{e}"
        );
    }

    /// A value-set join builds its hash table on the value set's few codes
    /// and probes it with the facts (the value sets are held in memory
    /// with an exact row count); on the CSV files, whose size the planner
    /// did not know, it built on the facts.
    #[test]
    fn value_set_joins_build_on_the_codes() {
        use datafusion::arrow::array::{ArrayRef, StringArray};
        use datafusion::physical_plan::ExecutionPlan;
        use datafusion::physical_plan::joins::HashJoinExec;

        let valuesets = library(&[(
            "1.2.3.csv",
            "valueset,name,version,code_system,code,display\n\
             1.2.3,Test,1,loinc,1-1,\n1.2.3,Test,1,loinc,2-2,\n",
        )]);
        let facts = tempfile::tempdir().unwrap();
        let file = facts.path().join("fact.parquet");
        let n = 100_000;
        let column = |f: &dyn Fn(usize) -> String| -> ArrayRef {
            Arc::new(StringArray::from_iter_values((0..n).map(f)))
        };
        let batch = RecordBatch::try_from_iter([
            ("person_id", column(&|i| format!("p{i}"))),
            ("coding_system", column(&|_| "loinc".into())),
            ("coding_code", column(&|i| format!("{}-{}", i % 50, i % 50))),
        ])
        .unwrap();
        let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&file).unwrap(),
            batch.schema(),
            None,
        )
        .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();

        fn build_sides(plan: &Arc<dyn ExecutionPlan>, out: &mut Vec<SchemaRef>) {
            if let Some(join) = plan.downcast_ref::<HashJoinExec>() {
                out.push(join.left().schema());
            }
            for child in plan.children() {
                build_sides(child, out);
            }
        }
        let builds = crate::engine::block_on(async {
            let ctx = crate::engine::local_session(SessionConfig::new());
            register_valuesets(&ctx, valuesets.path()).await?;
            ctx.register_parquet("fact", file.to_str().unwrap(), Default::default())
                .await
                .unwrap();
            let sql = "SELECT f.person_id FROM fact f \
                       JOIN valueset_code v ON v.valueset = '1.2.3' \
                       AND v.code_system = f.coding_system AND v.code = f.coding_code";
            let plan = ctx
                .sql(sql)
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap();
            let mut builds = Vec::new();
            build_sides(&plan, &mut builds);
            Ok::<_, WardError>(builds)
        })
        .unwrap();
        assert_eq!(builds.len(), 1, "one hash join");
        assert!(
            builds[0].field_with_name("code").is_ok(),
            "built on {:?}",
            builds[0]
        );
    }
}
