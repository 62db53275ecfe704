//! The build stage: core fact tables, `core/<table>.parquet`, each staged
//! row with the `person_id` linkage gave its patient and `reported_by`, the
//! sources that reported it. The same fact reported by several providers
//! (same person, code, time and value) becomes one row; its other columns
//! come from the first report in (source, file, line) order.

use std::path::Path;

use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::SessionContext;

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

/// Writes every core fact table from staging and `core/person_link`.
pub fn build(warehouse: &Warehouse) -> Result<BuildReport> {
    let core = warehouse.root().join("core");
    crate::engine::block_on(async {
        let ctx = SessionContext::new();
        crate::engine::register_staging(&ctx, warehouse).await?;
        crate::engine::register_parquet(
            &ctx,
            "person_link",
            &core.join("person_link.parquet"),
            super::person_link_schema(),
        )
        .await?;
        let mut report = Vec::new();
        for table in Table::ALL.into_iter().filter(|t| *t != Table::Patient) {
            let sql = build_sql(table);
            let path = core.join(format!("{}.parquet", table.name()));
            let rows = write(&ctx, warehouse, &sql, &path).await?;
            report.push((table, rows));
        }
        Ok(report)
    })
}

/// Output order: deterministic, so that a re-run writes identical files.
const ORDER: &str = "person_id, source, source_file, source_line";

fn build_sql(table: Table) -> String {
    let name = table.name();
    let joined = format!(
        "SELECT l.person_id, f.* FROM staging_{name} f JOIN person_link l \
         ON l.source = f.source AND l.source_patient_id = f.source_patient_id"
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
            let group: Vec<String> = std::iter::once("person_id")
                .chain(key.iter().copied())
                .map(|c| format!("\"{c}\""))
                .collect();
            let order = "ORDER BY source, source_file, source_line";
            let select: Vec<String> = columns
                .iter()
                .map(|c| {
                    if key.contains(c) {
                        format!("\"{c}\"")
                    } else {
                        format!("first_value(\"{c}\" {order}) AS \"{c}\"")
                    }
                })
                .collect();
            format!(
                "SELECT person_id, {}, array_sort(array_agg(DISTINCT source)) AS reported_by \
                 FROM ({joined}) j GROUP BY {} ORDER BY {ORDER}",
                select.join(", "),
                group.join(", ")
            )
        }
    }
}

/// Runs `sql` into one Parquet file written aside and renamed into `path`.
async fn write(ctx: &SessionContext, warehouse: &Warehouse, sql: &str, path: &Path) -> Result<u64> {
    let err = |e: datafusion::error::DataFusionError| WardError::Data {
        context: "building a core table",
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let tmp = warehouse.tmp_path(path);
    let df = ctx.sql(sql).await.map_err(err)?;
    let written = df
        .write_parquet(
            &tmp.display().to_string(),
            DataFrameWriteOptions::new().with_single_file_output(true),
            None,
        )
        .await
        .map_err(err)?;
    warehouse.publish_file(&tmp, path)?;
    let rows = written
        .first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::UInt64Array>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0);
    Ok(rows)
}
