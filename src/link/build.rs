//! The build stage: core fact tables, `core/<table>/part-*.parquet`, each staged
//! row with the `person_id` linkage gave its patient and `reported_by`, the
//! sources that reported it. The same fact reported by several providers
//! (same person, code, time and value) becomes one row; its other columns
//! come from the first report in (source, file, line) order.
//!
//! A table is built in parts, one per bucket of persons, to bound memory:
//! see [`build_in_parts`].

use std::collections::BTreeSet;
use std::path::Path;

use datafusion::arrow::array::RecordBatch;
use datafusion::config::TableParquetOptions;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::{Result, WardError};
use crate::schema::Table;
use crate::warehouse::Warehouse;

/// Columns that identify one fact across providers, per table; tables not
/// listed (encounters, orders, devices, coverage) are each provider's own
/// events and are never merged.
fn fact_key(table: Table) -> Option<&'static [&'static str]> {
    Some(match table {
        Table::Observation => &[
            "code_system",
            "code",
            "effective_time",
            "value_num",
            "unit",
            "value_code",
            "value_text",
        ],
        Table::Condition => &["code_system", "code", "onset_date"],
        Table::Medication => &["code_system", "code", "start_date"],
        Table::Procedure => &["code_system", "code", "performed_time"],
        _ => return None,
    })
}

/// Rows per core table.
pub type BuildReport = Vec<(Table, u64)>;

/// The core fact tables: every canonical table but `patient` (whose core
/// table is `person`, written by linkage).
pub fn fact_tables() -> impl Iterator<Item = Table> {
    Table::ALL.into_iter().filter(|t| *t != Table::Patient)
}

/// Writes every core fact table from staging and `core/person_link`.
pub fn build(warehouse: &Warehouse) -> Result<BuildReport> {
    build_tables(warehouse, &fact_tables().collect::<Vec<_>>())
}

/// Writes the core fact tables `tables` (see [`build`]).
pub fn build_tables(warehouse: &Warehouse, tables: &[Table]) -> Result<BuildReport> {
    build_in_parts(warehouse, tables, ROWS_PER_PART)
}

/// Rows of a staged table per part of its core table: persons are split
/// into buckets so that each part's sort and de-duplication holds at most
/// about this many rows in memory.
pub const ROWS_PER_PART: u64 = 500_000;

/// [`build_tables`] with about `rows_per_part` staged rows per part (at
/// most 256 parts per table): fewer, larger parts are faster and need more
/// memory. The rows published do not depend on it, only how they are
/// split into files.
///
/// Each table is built in two steps: one query joins every staged row to
/// its person and writes it to a scratch folder per bucket of persons;
/// then each bucket is de-duplicated and sorted from its own folder into
/// `part-<bucket>.parquet`. Reading staging once, not once per part, keeps
/// the work linear in the rows.
pub fn build_in_parts(
    warehouse: &Warehouse,
    tables: &[Table],
    rows_per_part: u64,
) -> Result<BuildReport> {
    let core = warehouse.out().join("core");
    crate::engine::block_on(async {
        let ctx = crate::engine::session(SessionConfig::new())?;
        crate::engine::register_staging(&ctx, warehouse).await?;
        register_links(&ctx, &core).await?;
        let mut report = Vec::new();
        for &table in tables {
            let staged = count(
                &ctx,
                &format!("SELECT count(*) FROM staging_{}", table.name()),
                &warehouse.staging_table_dir(table),
            )
            .await?;
            let buckets = staged.div_ceil(rows_per_part.max(1)).clamp(1, 256);
            let dir = core.join(table.name());
            let tmp = warehouse.tmp_path(&dir);
            if tmp.exists() {
                // Left by a run that was killed.
                std::fs::remove_dir_all(&tmp)
                    .map_err(|e| WardError::io("cannot remove", &tmp, e))?;
            }
            let split = warehouse.scratch_dir(&format!("build-{}-", table.name()))?;
            let schema = split_rows(&ctx, table, buckets, split.path()).await?;
            let sql = part_sql(table);
            let mut rows = 0;
            for bucket in 0..buckets {
                let rows_dir = split.path().join(format!("{BUCKET}={bucket}"));
                crate::engine::register_parquet(&ctx, "part_rows", &rows_dir, schema.clone())
                    .await?;
                let out = tmp.join(format!("part-{bucket:05}.parquet"));
                rows += write(&ctx, &sql, &out).await?;
                ctx.deregister_table("part_rows")
                    .map_err(|e| WardError::data("building a core table", &out, e))?;
            }
            drop(split);
            warehouse.publish_dir(&tmp, &dir)?;
            tracing::info!(
                table = table.name(),
                rows,
                parts = buckets,
                "core table built"
            );
            report.push((table, rows));
        }
        Ok(report)
    })
}

/// The file an appending night (run `run_id`) adds to a core table's
/// folder, next to the numbered parts of the build it appends to.
pub fn appended_file(run_id: &str) -> String {
    format!("part-{run_id}.parquet")
}

/// The file a night whose linkage moved records (run `run_id`) adds to a
/// core table's folder with the rows of the persons concerned.
pub fn relinked_file(run_id: &str) -> String {
    format!("part-{run_id}-relinked.parquet")
}

/// How many of the files in the core table folder `dir` appending nights
/// added (those that are not a build's numbered `part-<n>.parquet`).
pub fn appended_files(dir: &Path) -> Result<usize> {
    let numbered = |p: &Path| {
        p.file_stem()
            .and_then(|s| s.to_str()?.strip_prefix("part-"))
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
    };
    Ok(crate::warehouse::parquet_files(dir)?
        .iter()
        .filter(|p| !numbered(p))
        .count())
}

/// Brings a core table taken from the current run (in the warehouse's
/// output, `core/<table>/`, built from the other staged files with the same
/// links for everyone but `relinked`) up to a build of every staged file.
/// A row of the staged files `new` that repeats a fact the table holds
/// (same person, code, time and value) changes nothing when its source
/// already reported the fact and a report of it comes first in (source,
/// file, line) order (the row keeps its columns); otherwise it changes the
/// row, and its person's rows are built again with the `relinked` persons'
/// (taken out of the files that hold them, built from every staged row now
/// linked to them into [`relinked_file`]). The other new rows are
/// appended as one file ([`appended_file`]), de-duplicated among themselves
/// as a build does. Past `max_persons` persons to build again
/// ([`MAX_REBUILT_PERSONS`]) it writes nothing and says so: the table is
/// built whole.
pub fn update_table(
    warehouse: &Warehouse,
    table: Table,
    new: Vec<std::path::PathBuf>,
    relinked: &BTreeSet<String>,
    run_id: &str,
    max_persons: usize,
) -> Result<Update> {
    if relinked.len() > max_persons {
        return Ok(Update::BuildWhole);
    }
    let core = warehouse.out().join("core");
    let dir = core.join(table.name());
    let out = dir.join(appended_file(run_id));
    let err = |e: datafusion::error::DataFusionError| {
        WardError::data("appending to a core table", &out, e)
    };
    crate::engine::block_on(async {
        // Filters applied while decoding: the few persons' rows wanted of
        // whole staged and core files (by the joins' dynamic filters) are
        // found by their key columns before the others are decoded.
        let ctx = crate::engine::session(
            SessionConfig::new().set_bool("datafusion.execution.parquet.pushdown_filters", true),
        )?;
        let mut persons = relinked.clone();
        // The others' new rows, but those that repeat a fact the table
        // holds without changing its row.
        let mut appended = None;
        if !new.is_empty() {
            let staged = warehouse.staging_table_dir(table);
            crate::engine::register_parquet_files(
                &ctx,
                "staged_new",
                &staged,
                new,
                table.schema(),
            )?;
            register_links(&ctx, &core).await?;
            let joined = ctx.sql(&linked_rows("staged_new", "")).await.map_err(err)?;
            ctx.register_table("new_rows", joined.into_view())
                .map_err(err)?;
            let mut rows = "new_rows".to_string();
            if let Some(key) = fact_key(table) {
                ctx.register_parquet(
                    "core_rows",
                    format!("{}/", dir.display()),
                    datafusion::prelude::ParquetReadOptions::default(),
                )
                .await
                .map_err(err)?;
                let same = same_fact(&person_key(key));
                // One pass over the core: each new row, whether it repeats
                // a fact the table holds, and whether the repeat changes
                // the fact's row (its source is not among the row's
                // reporters or comes first in (source, file, line) order:
                // its person is built again). Only rows that match none
                // are appended.
                let columns: Vec<String> = ctx
                    .table("new_rows")
                    .await
                    .map_err(err)?
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| format!("\"{}\"", f.name()))
                    .collect();
                let matched = ctx
                    .sql(&format!(
                        "SELECT j.*, d.person_id IS NOT NULL AS repeat_, \
                           (NOT array_has(d.reported_by, j.source) OR j.source < d.source \
                             OR (j.source = d.source AND (j.source_file < d.source_file \
                               OR (j.source_file = d.source_file \
                                 AND j.source_line < d.source_line)))) AS changes_ \
                         FROM new_rows j LEFT JOIN core_rows d ON {same}"
                    ))
                    .await
                    .map_err(err)?;
                let schema = std::sync::Arc::new(matched.schema().as_arrow().clone());
                let matched = matched.collect().await.map_err(err)?;
                crate::engine::register_batches(&ctx, "matched_rows", schema, matched, &dir)?;
                let changing = crate::engine::collect_about(
                    &ctx,
                    "SELECT DISTINCT person_id FROM matched_rows WHERE repeat_ AND changes_",
                    "finding repeated facts",
                    &dir,
                )
                .await?;
                for b in &changing {
                    let ids = crate::engine::text(b.column(0))
                        .map_err(|e| WardError::data("finding repeated facts", &dir, e))?;
                    persons.extend(ids.iter().flatten().map(str::to_string));
                }
                rows = format!(
                    "(SELECT {} FROM matched_rows WHERE NOT repeat_)",
                    columns.join(", ")
                );
            }
            if persons.len() > max_persons {
                tracing::info!(
                    table = table.name(),
                    persons = persons.len(),
                    "too many persons' rows to build again: built whole"
                );
                return Ok(Update::BuildWhole);
            }
            if !persons.is_empty() {
                rows = format!(
                    "(SELECT * FROM {rows} WHERE person_id NOT IN ({}))",
                    in_list(&persons)
                );
            }
            let rows = ctx
                .sql(&format!("SELECT * FROM {rows}"))
                .await
                .map_err(err)?;
            ctx.register_table("part_rows", rows.into_view())
                .map_err(err)?;
            let tmp = warehouse.tmp_path(&out);
            let rows = write(&ctx, &part_sql(table), &tmp).await?;
            ctx.deregister_table("part_rows").map_err(err)?;
            if rows > 0 {
                warehouse.publish_file(&tmp, &out)?;
                tracing::info!(table = table.name(), rows, "core table appended to");
                appended = Some(rows);
            } else {
                std::fs::remove_file(&tmp).map_err(|e| WardError::io("cannot remove", &tmp, e))?;
            }
        }
        let rebuilt = match persons.is_empty() {
            true => None,
            false => {
                rebuild_persons(&ctx, warehouse, table, &persons, &relinked_file(run_id)).await?
            }
        };
        Ok(match (rebuilt, appended) {
            (None, None) => Update::Unchanged,
            (rebuilt, appended) => {
                let (removed, added) = rebuilt.unwrap_or((0, 0));
                Update::Changed {
                    removed,
                    added: added + appended.unwrap_or(0),
                }
            }
        })
    })
}

/// What [`update_table`] did to a core table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// Nothing: it holds what a build would.
    Unchanged,
    /// Rows removed (of persons built again) and added.
    Changed { removed: u64, added: u64 },
    /// Nothing, but too many persons' rows change: build it whole.
    BuildWhole,
}

/// Past this many persons whose rows change, a core table is built whole:
/// their rows are in every file, and the query naming them all costs more
/// than a build.
pub const MAX_REBUILT_PERSONS: usize = 50_000;

/// Builds again, in the core table `table` of the warehouse's output (the
/// current run's files, taken), the rows of `persons`: their rows leave
/// the files that hold them (each such file is written anew without them;
/// the others stay as they are), and every staged row now linked to one of
/// them (read from the staging of the sources that have a record of them)
/// is built into the new file `file`, de-duplicated among themselves as a
/// build does. Returns the rows removed and added, `None` when the table
/// holds no row of them and gains none.
async fn rebuild_persons(
    ctx: &SessionContext,
    warehouse: &Warehouse,
    table: Table,
    persons: &BTreeSet<String>,
    file: &str,
) -> Result<Option<(u64, u64)>> {
    let core = warehouse.out().join("core");
    let dir = core.join(table.name());
    let mut removed = 0;
    for path in crate::warehouse::parquet_files(&dir)? {
        let groups = crate::warehouse::groups_holding(&path, "person_id", persons)?;
        if !groups.is_empty() {
            removed += without_persons(warehouse, &path, persons, &groups)?;
        }
    }
    let out = dir.join(file);
    let err = |e: datafusion::error::DataFusionError| {
        WardError::data("building persons' core rows again", &out, e)
    };
    if !ctx.table_exist("person_link").map_err(err)? {
        register_links(ctx, &core).await?;
    }
    ctx.sql(&format!(
        "CREATE VIEW relinked_links AS SELECT * FROM person_link WHERE person_id IN ({})",
        in_list(persons)
    ))
    .await
    .map_err(err)?;
    // Their records: the sources whose staged files are read, and the ids
    // their rows are found by. Named in the query, not only joined: a
    // literal list lets the Parquet reader skip the pages (by their
    // statistics) that hold none of them.
    let records = crate::engine::collect_about(
        ctx,
        "SELECT DISTINCT source, source_patient_id FROM relinked_links",
        "finding persons' records",
        &dir,
    )
    .await?;
    let mut sources = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for b in &records {
        let text = |i| {
            crate::engine::text(b.column(i))
                .map_err(|e| WardError::data("finding persons' records", &dir, e))
        };
        let (source, id) = (text(0)?, text(1)?);
        sources.extend(source.iter().flatten().map(str::to_string));
        ids.extend(id.iter().flatten().map(str::to_string));
    }
    let mut files = Vec::new();
    for source in &sources {
        files.extend(crate::warehouse::parquet_files(
            &warehouse.staging_dir(table, source),
        )?);
    }
    let staged = warehouse.staging_table_dir(table);
    crate::engine::register_parquet_files(ctx, "staged_relinked", &staged, files, table.schema())?;
    let named = match ids.len() {
        1..=MAX_NAMED_RECORDS => format!("WHERE f.source_patient_id IN ({})", in_list(&ids)),
        _ => String::new(),
    };
    let sql = format!(
        "SELECT l.person_id, f.* FROM staged_relinked f JOIN relinked_links l \
         ON l.source = f.source AND l.source_patient_id = f.source_patient_id {named}"
    );
    let joined = ctx.sql(&sql).await.map_err(err)?;
    ctx.register_table("part_rows", joined.into_view())
        .map_err(err)?;
    let tmp = warehouse.tmp_path(&out);
    let added = write(ctx, &part_sql(table), &tmp).await?;
    ctx.deregister_table("part_rows").map_err(err)?;
    match added {
        0 => std::fs::remove_file(&tmp).map_err(|e| WardError::io("cannot remove", &tmp, e))?,
        _ => warehouse.publish_file(&tmp, &out)?,
    }
    tracing::info!(
        table = table.name(),
        persons = persons.len(),
        removed,
        added,
        "core rows of persons built again"
    );
    Ok((removed > 0 || added > 0).then_some((removed, added)))
}

/// Past this many records of the persons built again, their staged rows
/// are found by the join alone (a longer literal list costs more to plan
/// than the pages it skips).
const MAX_NAMED_RECORDS: usize = 10_000;

/// `values` as SQL string literals, comma-separated.
fn in_list(values: &BTreeSet<String>) -> String {
    crate::engine::sql_text_list(values.iter().map(String::as_str))
}

/// Writes the core file `path` anew without the rows of `persons`, which
/// only its row groups `groups` hold (see [`Warehouse::filter_row_groups`]:
/// the others are copied undecoded); returns the rows removed.
fn without_persons(
    warehouse: &Warehouse,
    path: &Path,
    persons: &BTreeSet<String>,
    groups: &BTreeSet<usize>,
) -> Result<u64> {
    use datafusion::arrow::array::{Array, BooleanArray};
    // Said in its footer, for `delta::touched`: only their rows changed.
    let note = crate::delta::derived_from(path, persons.iter().map(String::as_str));
    let keep = |b: &RecordBatch| -> std::result::Result<BooleanArray, crate::error::BoxError> {
        let ids = b.column_by_name("person_id").ok_or("no person_id column")?;
        let ids = crate::engine::text(ids)?;
        Ok((0..ids.len())
            .map(|i| Some(ids.is_null(i) || !persons.contains(ids.value(i))))
            .collect())
    };
    warehouse.filter_row_groups(path, groups, keep, note)
}

/// Registers the linkage's `core/person_link.parquet` under `core` as
/// `person_link`.
async fn register_links(ctx: &SessionContext, core: &Path) -> Result<()> {
    crate::engine::register_parquet(
        ctx,
        "person_link",
        &core.join("person_link.parquet"),
        crate::schema::person_link_schema(),
    )
    .await
}

/// The rows of the staged table `staged` that linkage gave a person, each
/// with its `person_id` first and the columns `extra` (`, <expr> AS <name>`) last.
fn linked_rows(staged: &str, extra: &str) -> String {
    format!(
        "SELECT l.person_id, f.*{extra} FROM {staged} f JOIN person_link l \
         ON l.source = f.source AND l.source_patient_id = f.source_patient_id"
    )
}

async fn count(ctx: &SessionContext, sql: &str, dir: &std::path::Path) -> Result<u64> {
    let batches = crate::engine::collect_about(ctx, sql, "counting staged rows", dir).await?;
    Ok(batches
        .first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
        })
        .map_or(0, |a| a.value(0).max(0) as u64))
}

/// The scratch column (and folder name) of a staged row's bucket.
const BUCKET: &str = "ward_bucket";

/// Writes every staged row of `table` that linkage gave a person, with its
/// `person_id`, to `dir/ward_bucket=<n>/` for its bucket of persons (by
/// the last two characters of the person id, a hash); returns the schema
/// of those rows.
async fn split_rows(
    ctx: &SessionContext,
    table: Table,
    buckets: u64,
    dir: &Path,
) -> Result<datafusion::arrow::datatypes::SchemaRef> {
    let err = |e: datafusion::error::DataFusionError| {
        WardError::data("joining staged rows to persons", dir, e)
    };
    let sql = linked_rows(
        &format!("staging_{}", table.name()),
        &format!(
            ", (ascii(substr(l.person_id, 16, 1)) * 256 + ascii(substr(l.person_id, 17, 1))) % {buckets} AS {BUCKET}"
        ),
    );
    let df = ctx.sql(&sql).await.map_err(err)?;
    let schema = std::sync::Arc::new(crate::engine::schema_without(
        df.schema().as_arrow(),
        BUCKET,
    ));
    // Read back once per part: fast compression is enough. One writer per
    // bucket is open at once (up to 256): small row groups bound their
    // buffers.
    let mut options = TableParquetOptions::default();
    options.global.compression = Some("zstd(1)".into());
    options.global.max_row_group_bytes =
        Some(datafusion::config::MaxRowGroupBytes::try_new(8 << 20).map_err(err)?);
    df.write_parquet(
        &format!("{}/", dir.display()),
        DataFrameWriteOptions::new().with_partition_by(vec![BUCKET.into()]),
        Some(options),
    )
    .await
    .map_err(err)?;
    Ok(schema)
}

/// Output order: deterministic, so that a re-run writes identical files.
const ORDER: &str = "person_id, source, source_file, source_line";

/// The core rows of one bucket, from its staged rows `part_rows`.
fn part_sql(table: Table) -> String {
    let list = table
        .columns()
        .iter()
        .map(|c| format!("j.\"{}\"", c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let Some(key) = fact_key(table) else {
        return format!(
            "SELECT j.person_id, {list}, make_array(j.source) AS reported_by FROM part_rows j \
             ORDER BY {ORDER}"
        );
    };
    let key = person_key(key);
    let group = key.join(", ");
    let qualified = key
        .iter()
        .map(|c| format!("j.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let same = same_fact(&key);
    // Facts reported more than once (`d`, found by hashing, usually few)
    // keep the columns of their first report in (source, file, line)
    // order and list every source; the rest pass through. A window over
    // every row instead costs about as much as the join and write. `d` is
    // the left side of both joins: DataFusion builds its hash table from
    // the left.
    format!(
        "WITH d AS ( \
           SELECT {group}, array_sort(array_distinct(array_agg(source))) AS reported_by \
           FROM part_rows GROUP BY {group} HAVING count(*) > 1) \
         SELECT j.person_id, {list}, make_array(j.source) AS reported_by \
         FROM d RIGHT ANTI JOIN part_rows j ON {same} \
         UNION ALL \
         SELECT j.person_id, {list}, j.reported_by FROM ( \
           SELECT j.*, d.reported_by, \
             row_number() OVER (PARTITION BY {qualified} ORDER BY j.source, j.source_file, j.source_line) AS first_ \
           FROM d JOIN part_rows j ON {same}) j \
         WHERE j.first_ = 1 \
         ORDER BY {ORDER}"
    )
}

/// The quoted columns of a fact's identity: its person, then `key`.
fn person_key(key: &[&str]) -> Vec<String> {
    std::iter::once("person_id")
        .chain(key.iter().copied())
        .map(|c| format!("\"{c}\""))
        .collect()
}

/// The join condition "row `j` is the same fact as row `d`" over `key`
/// (see [`person_key`]): nulls equal, as in a GROUP BY.
fn same_fact(key: &[String]) -> String {
    key.iter()
        .map(|c| format!("(j.{c} IS NOT DISTINCT FROM d.{c})"))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Rows per row group of a core file. A night that moves a few persons'
/// records rewrites only the row groups holding their rows (the others
/// are copied undecoded: [`Warehouse::filter_row_groups`]), and a core
/// file is sorted by person, so a group is a narrow range of persons.
pub const CORE_ROW_GROUP: usize = 64 * 1024;

/// Runs `sql` into the Parquet file `path` (row groups of
/// [`CORE_ROW_GROUP`] rows).
async fn write(ctx: &SessionContext, sql: &str, path: &Path) -> Result<u64> {
    let err =
        |e: datafusion::error::DataFusionError| WardError::data("building a core table", path, e);
    let df = ctx.sql(sql).await.map_err(err)?;
    let mut options = ctx.state().default_table_options().parquet;
    options.global.max_row_group_size = CORE_ROW_GROUP;
    let names = df.schema().fields().iter().map(|f| f.name().as_str());
    for name in crate::schema::without_dictionary(names, true) {
        let column = datafusion::config::ParquetColumnOptions {
            dictionary_enabled: Some(false),
            ..Default::default()
        };
        options.column_specific_options.insert(name.into(), column);
    }
    let written = df
        .write_parquet(
            &path.display().to_string(),
            DataFrameWriteOptions::new().with_single_file_output(true),
            Some(options),
        )
        .await
        .map_err(err)?;
    Ok(written
        .first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::UInt64Array>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_files_are_those_a_build_does_not_number() {
        let tmp = tempfile::tempdir().unwrap();
        for f in [
            "part-00000.parquet",
            "part-00001.parquet",
            &appended_file("20261205T010513Z"),
            &appended_file("20261206T010513Z"),
            "notes.txt",
        ] {
            std::fs::write(tmp.path().join(f), b"").unwrap();
        }
        assert_eq!(appended_files(tmp.path()).unwrap(), 2);
        assert_eq!(appended_files(&tmp.path().join("absent")).unwrap(), 0);
    }
}
