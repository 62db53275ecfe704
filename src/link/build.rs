//! The build stage: core fact tables, `core/<table>/part-*.parquet`, each staged
//! row with the `person_id` linkage gave its patient and `reported_by`, the
//! sources that reported it. The same fact reported by several providers
//! (same person, code, time and value) becomes one row; its other columns
//! come from the first report in (source, file, line) order.

use std::path::Path;

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
    let core = warehouse.out().join("core");
    crate::engine::block_on(async {
        let ctx = crate::engine::session(SessionConfig::new())?;
        crate::engine::register_staging(&ctx, warehouse).await?;
        crate::engine::register_parquet(
            &ctx,
            "person_link",
            &core.join("person_link.parquet"),
            crate::schema::person_link_schema(),
        )
        .await?;
        let mut report = Vec::new();
        for &table in tables {
            let staged = count(
                &ctx,
                &format!("SELECT count(*) FROM staging_{}", table.name()),
                &warehouse.staging_table_dir(table),
            )
            .await?;
            let buckets = staged.div_ceil(ROWS_PER_PART).clamp(1, 256);
            let dir = core.join(table.name());
            let tmp = warehouse.tmp_path(&dir);
            if tmp.exists() {
                // Left by a run that was killed.
                std::fs::remove_dir_all(&tmp)
                    .map_err(|e| WardError::io("cannot remove", &tmp, e))?;
            }
            let mut rows = 0;
            for bucket in 0..buckets {
                let sql = build_sql(table, buckets, bucket);
                rows += write(&ctx, &sql, &tmp.join(format!("part-{bucket:05}.parquet"))).await?;
            }
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

/// Rows of a staged table per part of its core table: persons are split
/// into buckets so that each part's join, sort and de-duplication holds at
/// most about this many rows in memory.
const ROWS_PER_PART: u64 = 500_000;

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

/// Output order: deterministic, so that a re-run writes identical files.
const ORDER: &str = "person_id, source, source_file, source_line";

/// The rows of one bucket of persons (by the last two characters of the
/// person id, a hash) of a core table.
fn build_sql(table: Table, buckets: u64, bucket: u64) -> String {
    let name = table.name();
    let joined = format!(
        "SELECT l.person_id, f.* FROM staging_{name} f JOIN person_link l \
         ON l.source = f.source AND l.source_patient_id = f.source_patient_id \
         WHERE (ascii(substr(l.person_id, 16, 1)) * 256 + ascii(substr(l.person_id, 17, 1))) % {buckets} = {bucket}"
    );
    let columns: Vec<&str> = table.columns().iter().map(|c| c.name).collect();
    match fact_key(table) {
        None => {
            let list = columns
                .iter()
                .map(|c| format!("j.\"{c}\""))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "SELECT j.person_id, {list}, make_array(j.source) AS reported_by FROM ({joined}) j \
                 ORDER BY {ORDER}"
            )
        }
        Some(key) => {
            let partition: Vec<String> = std::iter::once("person_id")
                .chain(key.iter().copied())
                .map(|c| format!("\"{c}\""))
                .collect();
            let partition = partition.join(", ");
            let list = columns
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", ");
            // The first report of each fact (in source, file, line order)
            // keeps its columns; every report adds its source.
            format!(
                "SELECT person_id, {list}, reported_by FROM ( \
                   SELECT j.*, \
                     row_number() OVER (PARTITION BY {partition} ORDER BY source, source_file, source_line) AS first_, \
                     array_sort(array_distinct(array_agg(source) OVER (PARTITION BY {partition}))) AS reported_by \
                   FROM ({joined}) j) \
                 WHERE first_ = 1 ORDER BY {ORDER}"
            )
        }
    }
}

/// Runs `sql` into the Parquet file `path`.
async fn write(ctx: &SessionContext, sql: &str, path: &Path) -> Result<u64> {
    let err =
        |e: datafusion::error::DataFusionError| WardError::data("building a core table", path, e);
    let df = ctx.sql(sql).await.map_err(err)?;
    let written = df
        .write_parquet(
            &path.display().to_string(),
            DataFrameWriteOptions::new().with_single_file_output(true),
            None,
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
