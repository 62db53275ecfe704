"""The cohort workload (benches/cohort.sql) with Polars' lazy API over Ward's
staging Parquet: the same filters, the same last-result rule (latest time,
lowest value on ties), the same left join and counts.

usage: polars_cohort.py WAREHOUSE [PERIOD_START PERIOD_END_EXCLUSIVE]
"""
import datetime as dt
import sys
import time

import polars as pl

wh = sys.argv[1]
start, end = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("2025-01-01", "2026-01-01")
start, end = dt.datetime.fromisoformat(start), dt.datetime.fromisoformat(end)
keys = ["source", "source_patient_id"]
t = time.perf_counter()
cond = pl.scan_parquet(f"{wh}/staging/condition/*/*.parquet", hive_partitioning=False)
obs = pl.scan_parquet(f"{wh}/staging/observation/*/*.parquet", hive_partitioning=False)
code = pl.col("code")
diabetics = cond.filter(
    ((pl.col("code_system") == "icd10cm")
     & (code.str.starts_with("E10") | code.str.starts_with("E11") | code.str.starts_with("E13")))
    | ((pl.col("code_system") == "snomed") & code.is_in(["44054006", "46635009", "73211009"]))
).select(keys).unique()
last_a1c = (
    obs.filter(code.is_in(["4548-4", "17856-6", "4549-2", "59261-8"])
               & (pl.col("effective_time") >= start) & (pl.col("effective_time") < end))
    .group_by(keys)
    .agg(pl.col("value_num").sort_by(["effective_time", "value_num"], descending=[True, False]).first())
)
result = diabetics.join(last_a1c, on=keys, how="left").select(
    pl.len().alias("diabetics"),
    pl.col("value_num").count().alias("tested"),
    (pl.col("value_num") > 9).sum().alias("above_9"),
    pl.col("value_num").is_null().sum().alias("untested"),
).collect()
print(result)
print(f"query_seconds {time.perf_counter() - t:.3f}")
