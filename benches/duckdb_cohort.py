"""The cohort workload (benches/cohort.sql) on DuckDB over Ward's staging Parquet.

usage: duckdb_cohort.py WAREHOUSE [PERIOD_START PERIOD_END_EXCLUSIVE]
"""
import pathlib
import sys
import time

import duckdb

wh = sys.argv[1]
start, end = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("2025-01-01", "2026-01-01")
sql = (pathlib.Path(__file__).with_name("cohort.sql").read_text()
       .replace("{period_start}", start).replace("{period_end_exclusive}", end))
t = time.perf_counter()
con = duckdb.connect()
for table in ("condition", "observation"):
    con.execute(f"CREATE VIEW {table} AS SELECT * FROM "
                f"read_parquet('{wh}/staging/{table}/*/*.parquet', hive_partitioning = false)")
print(con.sql(sql))
print(f"query_seconds {time.perf_counter() - t:.3f}")
