//! Benchmark helper: runs `benches/cohort.sql` with DataFusion over a Ward
//! warehouse's staging tables and prints the result and the query time.
//!
//! `cargo run --release --example cohort -- WAREHOUSE [PERIOD_START PERIOD_END_EXCLUSIVE]`

use std::time::Instant;

use datafusion::prelude::{ParquetReadOptions, SessionContext};

#[tokio::main]
async fn main() -> datafusion::error::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let warehouse = args
        .get(1)
        .expect("usage: cohort WAREHOUSE [START END_EXCLUSIVE]");
    let start = args.get(2).map_or("2025-01-01", String::as_str);
    let end = args.get(3).map_or("2026-01-01", String::as_str);
    let sql = include_str!("../benches/cohort.sql")
        .replace("{period_start}", start)
        .replace("{period_end_exclusive}", end);
    let t = Instant::now();
    let ctx = SessionContext::new();
    for table in ["condition", "observation"] {
        let dir = format!("{warehouse}/staging/{table}/");
        ctx.register_parquet(table, &dir, ParquetReadOptions::default())
            .await?;
    }
    let batches = ctx.sql(&sql).await?.collect().await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        datafusion::arrow::util::pretty::pretty_format_batches(&batches)?
    );
    println!("query_seconds {secs:.3}");
    Ok(())
}
