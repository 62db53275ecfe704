//! Shared DataFusion plumbing: a runtime to block on, the staging tables,
//! and collecting a query with errors that say what failed.

use std::future::Future;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::{Result, WardError};
use crate::optimizer::InlineConstantRow;
use crate::schema::Table;
use crate::warehouse::{Warehouse, parquet_files};

/// Runs a future on a multi-threaded runtime sized like rayon's pool.
pub(crate) fn block_on<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    block_on_with_stack(2 << 20, future)
}

/// [`block_on`] with `stack` bytes of stack per worker thread.
pub(crate) fn block_on_with_stack<T>(
    stack: usize,
    future: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(rayon::current_num_threads().max(1))
        .thread_stack_size(stack)
        .enable_all()
        .build()
        .map_err(|e| WardError::io("cannot start the query runtime", "tokio", e))?
        .block_on(future)
}

/// A session of the SQL stages: on the active cluster when there is one
/// (see [`crate::cluster`]), else a [`local_session`].
pub(crate) fn session(config: SessionConfig) -> Result<SessionContext> {
    let config = tuned(config);
    crate::cluster::remote_session(&config)
        .unwrap_or_else(|| Ok(with_rules(SessionContext::new_with_config(config))))
}

/// `ctx` with Ward's optimizer rule ([`InlineConstantRow`]).
fn with_rules(ctx: SessionContext) -> SessionContext {
    ctx.add_optimizer_rule(Arc::new(InlineConstantRow));
    ctx
}

/// A session in this process with as many partitions as rayon threads.
///
/// No memory pool limit: DataFusion 55's spilling repartition panics under
/// one ("partition not used yet", apache/datafusion#17334 and follow-ups).
/// Memory is bounded instead by building core tables in buckets of persons.
pub(crate) fn local_session(config: SessionConfig) -> SessionContext {
    with_rules(SessionContext::new_with_config(tuned(config)))
}

/// A [`local_session`] in one partition: for work that runs several
/// such sessions side by side, one per core.
pub(crate) fn one_partition_session() -> SessionContext {
    with_rules(SessionContext::new_with_config(
        tuned(SessionConfig::new()).with_target_partitions(1),
    ))
}

/// A [`session`] whose operators together may hold at most `bytes` of the
/// memory DataFusion tracks (hash tables, join build sides, sort buffers)
/// and never spill to disk: a query that needs more fails with DataFusion's
/// "Resources exhausted" error, naming the largest consumers. Spilling is
/// off because under a limit DataFusion 55's spilling repartition can panic
/// or hang (apache/datafusion#17334, #24883); without a disk manager it
/// returns the error instead.
pub(crate) fn limited_session(config: SessionConfig, bytes: usize) -> Result<SessionContext> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(bytes, 1.0)
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(|e| WardError::data("starting the query engine", std::path::PathBuf::new(), e))?;
    Ok(with_rules(SessionContext::new_with_config_rt(
        tuned(config),
        runtime,
    )))
}

fn tuned(config: SessionConfig) -> SessionConfig {
    let mut config = config.with_target_partitions(rayon::current_num_threads().max(1));
    // The parallel single-file Parquet writer buffers encoded row groups
    // for the whole file; write serially instead.
    config
        .options_mut()
        .execution
        .parquet
        .allow_single_file_parallelism = false;
    config.options_mut().execution.parquet.compression = Some("lz4_raw".into());
    config
}

/// Parses a fragment of SQL from a config or measure file with `parse` and
/// refuses anything after it (the fragment is pasted into a query): what
/// is wrong, naming the fragment as `what`.
pub(crate) fn parse_fragment<T>(
    text: &str,
    what: &str,
    parse: impl FnOnce(
        &mut datafusion::sql::sqlparser::parser::Parser,
    ) -> std::result::Result<T, datafusion::sql::sqlparser::parser::ParserError>,
) -> std::result::Result<T, String> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    use datafusion::sql::sqlparser::tokenizer::Token;
    let mut parser = Parser::new(&GenericDialect {})
        .try_with_sql(text)
        .map_err(|e| format!("not {what}: {e}"))?;
    let parsed = parse(&mut parser).map_err(|e| format!("not {what}: {e}"))?;
    let next = parser.peek_token();
    if next.token != Token::EOF {
        return Err(format!("'{next}' after {what}"));
    }
    Ok(parsed)
}

/// Registers every canonical table's staging directory as
/// `staging_<table>` (an empty table when nothing is staged).
pub(crate) async fn register_staging(ctx: &SessionContext, warehouse: &Warehouse) -> Result<()> {
    for table in Table::ALL {
        let dir = warehouse.staging_table_dir(table);
        register_parquet(
            ctx,
            &format!("staging_{}", table.name()),
            &dir,
            table.schema(),
        )
        .await?;
    }
    Ok(())
}

/// Registers the Parquet files under `path` (a directory, searched
/// recursively, or one file) as `name` with `schema`; an empty table when
/// there are none.
pub(crate) async fn register_parquet(
    ctx: &SessionContext,
    name: &str,
    path: &std::path::Path,
    schema: datafusion::arrow::datatypes::SchemaRef,
) -> Result<()> {
    let files = if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        parquet_files(path)?
    };
    register_parquet_files(ctx, name, path, files, schema)
}

/// Registers the Parquet files `files` as one table `name` (schema
/// `schema`; no file: an empty table); errors name `path`, its place.
pub(crate) fn register_parquet_files(
    ctx: &SessionContext,
    name: &str,
    path: &std::path::Path,
    files: Vec<std::path::PathBuf>,
    schema: datafusion::arrow::datatypes::SchemaRef,
) -> Result<()> {
    let err =
        |e: datafusion::error::DataFusionError| WardError::data("registering a table", path, e);
    if files.is_empty() {
        return register_batches(ctx, name, schema, vec![], path);
    }
    // The files found, not the directory: a listing of a directory whose
    // files sit in subdirectories that are not `key=value` partitions
    // (`rejects/<source>/`) reads nothing, without an error.
    let urls = files
        .iter()
        .map(|f| ListingTableUrl::parse(f.to_string_lossy()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(err)?;
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    let table = ListingTable::try_new(config).map_err(err)?;
    ctx.register_table(name, Arc::new(table)).map_err(err)?;
    Ok(())
}

/// Registers `batches` (schema `schema`) as table `name`: in memory, or
/// on a cluster a Parquet file in its scratch directory that the executors
/// read (plans do not carry data). Errors name `path`, what the table is
/// about.
pub(crate) fn register_batches(
    ctx: &SessionContext,
    name: &str,
    schema: datafusion::arrow::datatypes::SchemaRef,
    batches: Vec<RecordBatch>,
    path: &std::path::Path,
) -> Result<()> {
    let err =
        |e: datafusion::error::DataFusionError| WardError::data("registering a table", path, e);
    let table: Arc<dyn datafusion::catalog::TableProvider> =
        match crate::cluster::scratch_file(name)? {
            None => Arc::new(MemTable::try_new(schema, vec![batches]).map_err(err)?),
            Some(file) => {
                crate::cluster::write_scratch(&file, schema.clone(), &batches)?;
                let url = ListingTableUrl::parse(file.to_string_lossy()).map_err(err)?;
                let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                    .with_file_extension(".parquet");
                let config = ListingTableConfig::new(url)
                    .with_listing_options(options)
                    .with_schema(schema);
                Arc::new(ListingTable::try_new(config).map_err(err)?)
            }
        };
    ctx.register_table(name, table).map_err(err)?;
    Ok(())
}

/// `schema` without its field `name`: the files of a table written with
/// `name` as its Hive partition column (the column is in the folder names).
pub(crate) fn schema_without(
    schema: &datafusion::arrow::datatypes::Schema,
    name: &str,
) -> datafusion::arrow::datatypes::Schema {
    datafusion::arrow::datatypes::Schema::new(
        schema
            .fields()
            .iter()
            .filter(|f| f.name() != name)
            .cloned()
            .collect::<Vec<_>>(),
    )
}

/// Any column as text (`Utf8`), e.g. DataFusion's Utf8View strings or dates.
pub(crate) fn text(
    column: &datafusion::arrow::array::ArrayRef,
) -> std::result::Result<datafusion::arrow::array::StringArray, datafusion::arrow::error::ArrowError>
{
    use datafusion::arrow::array::AsArray;
    let utf8 =
        datafusion::arrow::compute::cast(column, &datafusion::arrow::datatypes::DataType::Utf8)?;
    Ok(utf8.as_string::<i32>().clone())
}

/// `values` as SQL string literals, comma-separated (for an `IN` list).
pub(crate) fn sql_text_list<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    values
        .into_iter()
        .map(|v| format!("'{}'", v.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `sql` and collects its batches; errors say what was being done
/// (`context`) and with which file or directory (the SQL file, the tables
/// read).
pub(crate) async fn collect_about(
    ctx: &SessionContext,
    sql: &str,
    context: &'static str,
    path: &std::path::Path,
) -> Result<Vec<RecordBatch>> {
    let err = |e: datafusion::error::DataFusionError| WardError::data(context, path, e);
    ctx.sql(sql)
        .await
        .map_err(err)?
        .collect()
        .await
        .map_err(err)
}
