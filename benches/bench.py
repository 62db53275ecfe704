#!/usr/bin/env python3
"""Ward's benchmark driver (run by benches/run.sh; not part of CI).

Generates a population with `ward synth`, loads it with `ward ingest`, links
it with `ward link` (and Splink on the same staged records, both scored
against the generator's truth), runs every measure of queries/measures with
`ward measure`, and runs the cohort workload with Ward (DataFusion), DuckDB
and Polars on the same staging Parquet, in the same run. Each stage is a separate process measured
with wait4(): wall time, CPU time (user + system) and peak resident memory.
Prints a Markdown table for benches/RESULTS.md and writes results.json.
"""
import argparse
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import time


def measure(name, cmd, log_dir):
    out = log_dir / f"{name}.out"
    with open(out, "wb") as f:
        t = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
    text = out.read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} failed ({' '.join(map(str, cmd))}):\n{text[-3000:]}")
    q = re.search(r"query_seconds ([0-9.]+)", text)
    return {
        "stage": name,
        "wall_s": round(wall, 3),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
        "query_s": float(q.group(1)) if q else None,
        "output": text.strip().splitlines()[-12:],
    }


def size_mb(path):
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file()) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--providers", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default=None, help="scratch directory (default /tmp/ward-bench-N)")
    ap.add_argument("--target", default=os.environ.get("CARGO_TARGET_DIR", "target"))
    args = ap.parse_args()
    repo = pathlib.Path(__file__).resolve().parent.parent
    target = pathlib.Path(args.target)
    if not target.is_absolute():
        target = repo / target
    ward, cohort = target / "release" / "ward", target / "release" / "examples" / "cohort"
    work = pathlib.Path(args.work or f"/tmp/ward-bench-{args.patients}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    data, wh = work / "data", work / "warehouse"
    here = pathlib.Path(__file__).resolve().parent
    py = sys.executable
    rows = [measure("synth", [ward, "-q", "synth", "--patients", args.patients, "--providers", args.providers,
                              "--seed", args.seed, "--out", data], work / "logs")]
    rows.append(measure("ingest (ward ingest)", [ward, "-q", "--config", data / "ward.toml", "ingest"], work / "logs"))
    rows.append(measure("link + core build (ward link)", [ward, "--config", data / "ward.toml", "link",
                                                         "--evaluate", data / "truth.csv"], work / "logs"))
    rows.append(measure("link: Splink (DuckDB)", [py, here / "splink_link.py", wh, data / "truth.csv"], work / "logs"))
    rows.append(measure("measures (ward measure, all)", [ward, "--config", data / "ward.toml", "measure"], work / "logs"))
    rows.append(measure("cohort: ward (DataFusion)", [cohort, wh], work / "logs"))
    rows.append(measure("cohort: DuckDB", [py, here / "duckdb_cohort.py", wh], work / "logs"))
    rows.append(measure("cohort: Polars", [py, here / "polars_cohort.py", wh], work / "logs"))

    commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) // 1024 // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    import duckdb, polars  # noqa: E401 (versions for the record)
    print(f"\n### {time.strftime('%Y-%m-%d')} — {args.patients:,} persons, {args.providers} providers (commit {commit})\n")
    print(f"Machine: {os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}; "
          f"duckdb {duckdb.__version__}, polars {polars.__version__}, python {platform.python_version()}.")
    print(f"Extracts: {size_mb(data):.0f} MB (CSV and FHIR NDJSON); staging: {size_mb(wh / 'staging'):.0f} MB Parquet.\n")
    print("| stage | wall s | CPU s | CPU/wall | peak RSS MB | query s (in-process) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        q = f"{r['query_s']:.3f}" if r["query_s"] is not None else ""
        print(f"| {r['stage']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['cpu_s'] / r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} | {q} |")
    ward_q = rows[5]["query_s"]
    print(f"\nWard/DuckDB query time: {ward_q / rows[6]['query_s']:.2f}; Ward/Polars: {ward_q / rows[7]['query_s']:.2f}")
    for r in rows[2:]:
        print(f"\n{r['stage']} result:\n" + "\n".join(r["output"][-8:]))
    (work / "results.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
