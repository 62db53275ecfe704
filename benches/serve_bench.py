"""`ward serve` against `ward query` on one warehouse (run by benches/serve.sh).

usage: serve_bench.py URI TOKEN WARD CONFIG

- latency: each query of QUERIES five times through the ADBC Flight SQL
  driver (one connection) and through `ward query` (a process per query,
  CSV to /dev/null); medians.
- streaming: 10M rows of the observation table to this Python client,
  batch by batch (nothing held): rows/s and MB/s of Arrow data.
- concurrency: 16 clients at once, each with its own connection, each
  running the same query five times: queries per second, p50 and p95.

Prints a Markdown report.
"""

import statistics
import subprocess
import sys
import threading
import time

import adbc_driver_flightsql.dbapi as flight_sql
from adbc_driver_flightsql import DatabaseOptions

QUERIES = {
    "persons by age band": "SELECT age_band, count(*) AS n FROM person GROUP BY age_band ORDER BY age_band",
    "observations per sex": "SELECT p.sex, count(*) AS n FROM observation o JOIN person p USING (research_id) GROUP BY p.sex ORDER BY p.sex",
    "persons with diabetes (value set)": (
        "WITH c AS (SELECT research_id, unnest(codings) AS coding FROM condition) "
        "SELECT count(DISTINCT research_id) AS persons FROM c JOIN valueset_code v "
        "ON coding['system'] = v.code_system AND coding['code'] = v.code WHERE v.name = 'Diabetes'"
    ),
}
STREAM_ROWS = 10_000_000
CLIENTS = 16
RUNS = 5


def connect(uri, token):
    return flight_sql.connect(
        uri,
        db_kwargs={DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}"},
        autocommit=True,
    )


def flight_query(conn, sql):
    start = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute(sql)
        cur.fetch_arrow_table()
    return time.perf_counter() - start


def ward_query(ward, config, sql):
    start = time.perf_counter()
    subprocess.run(
        [ward, "--config", config, "-q", "query", "--format", "csv", sql],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main(uri, token, ward, config):
    print("| query | `ward serve` (ADBC) median s | `ward query` (process) median s |")
    print("|---|---:|---:|")
    with connect(uri, token) as conn:
        for name, sql in QUERIES.items():
            flight_query(conn, sql)  # warm the page cache for both
            served = statistics.median(flight_query(conn, sql) for _ in range(RUNS))
            local = statistics.median(ward_query(ward, config, sql) for _ in range(RUNS))
            print(f"| {name} | {served:.3f} | {local:.3f} |")

        start = time.perf_counter()
        rows = nbytes = 0
        with conn.cursor() as cur:
            cur.execute(f"SELECT * FROM observation LIMIT {STREAM_ROWS}")
            reader = cur.fetch_record_batch()
            for batch in reader:
                rows += batch.num_rows
                nbytes += batch.nbytes
        secs = time.perf_counter() - start
        print()
        print(
            f"Streaming: {rows:,} observation rows, {nbytes / 2**20:,.0f} MiB of Arrow data "
            f"in {secs:.1f} s: {rows / secs:,.0f} rows/s, {nbytes / 2**20 / secs:,.1f} MiB/s"
        )

    sql = QUERIES["persons by age band"]
    latencies = []
    lock = threading.Lock()
    errors = []

    def client():
        try:
            with connect(uri, token) as conn:
                mine = [flight_query(conn, sql) for _ in range(RUNS)]
            with lock:
                latencies.extend(mine)
        except Exception as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(str(e))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    print()
    print(
        f"Concurrency: {CLIENTS} clients x {RUNS} runs of \"{sql}\": {len(latencies)} answered "
        f"in {wall:.1f} s ({len(latencies) / wall:.1f} queries/s), "
        f"p50 {statistics.median(latencies):.3f} s, "
        f"p95 {latencies[int(0.95 * (len(latencies) - 1))]:.3f} s; errors: {len(errors)}"
        + (f" (first: {errors[0]})" if errors else "")
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
