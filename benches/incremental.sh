#!/usr/bin/env bash
# Incremental nights, by hand (not in CI; after
# `cargo build --release --features synth`):
#   benches/incremental.sh [PATIENTS] [WORK_DIR]
# On a generated population (10 providers, seed 1, bad rate 0.002): a first
# night on an empty warehouse, a night with nothing new, the same with
# `--full`, a night after 1 % new results of one provider (new facts, no
# new patients) delivered as a new file, then as rows appended to its
# results file, then 1 % new records with new patients (appended to its
# patients and results files), each followed by the same night with
# `--full` (the reference for identical outputs). Prints each night's
# wall time, its ratio to the full night, the stages it reused, and
# whether its core, marts and research tables and data-quality counts
# equal the full rebuild's (tables by bytes, else by rows). Stage timings
# come from the manifests.
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-100000}
work=${2:-/tmp/ward-incremental-$patients}
ward=${CARGO_TARGET_DIR:-$PWD/target}/release/ward
if [ ! -f "$work/data/ward.toml" ]; then
    "$ward" -q synth --patients "$patients" --providers 10 --seed 1 --bad-rate 0.002 --out "$work/data"
fi
# The generated config, keeping every night's run for the comparison below
# (its source paths are relative to it, so the copy lives beside it).
config="$work/data/.ward-incremental.toml"
cp "$work/data/ward.toml" "$config"
grep -q '^\[runs\]' "$config" || printf '\n[runs]\nkeep = 20\n' >> "$config"
rm -rf "$work/warehouse"
# The warehouse of the generated config.
warehouse=$(sed -n 's/^warehouse *= *"\(.*\)"/\1/p' "$config")
case "$warehouse" in /*) ;; *) warehouse="$work/data/$warehouse" ;; esac
rm -rf "$warehouse"

night() { # name, args...
    local name=$1; shift
    local start end
    start=$(date +%s.%N)
    "$ward" --config "$config" -q run "$@"
    end=$(date +%s.%N)
    echo "$name $(echo "$end - $start" | bc) $(cat "$warehouse/runs/CURRENT")" >> "$work/nights.txt"
}

rm -f "$work/nights.txt"
night first
night unchanged
night unchanged-full --full

# 1 % of all rows, as new results of the first EMR-A provider: copies of
# its first results with new ids, one minute later; delivered as a new
# file (`file`: the usual nightly extract) or appended to its results file
# (`append`: ingest maps only the appended records); either way the
# observation table is appended to.
deliver() { # file|append
python3 - "$work/data" "$1" <<'PY'
import csv, glob, os, re, sys
data, how = sys.argv[1], sys.argv[2]
total = 0
for path in glob.glob(os.path.join(data, "*", "*")):
    if path.endswith((".csv", ".ndjson")):
        with open(path, "rb") as f:
            total += sum(1 for _ in f) - (0 if path.endswith(".ndjson") else 1)
results = sorted(glob.glob(os.path.join(data, "*", "results.csv")))[0]
want = total // 100
with open(results, newline="") as f:
    reader = csv.reader(f)
    header = next(reader)
    rows = [r for _, r in zip(range(want), reader)]
new = []
for i, cols in enumerate(rows):
    cols[0] = f"{cols[0]}{how[0].upper()}{i}"
    # One (append: two) minutes later where the time is "MM/DD/YYYY HH:MM"
    # (the generator also writes bad values on purpose: those stay as
    # they are).
    m = re.fullmatch(r"(\S+) (\d\d):(\d\d)", cols[3])
    if m:
        later = 1 if how == "file" else 2
        cols[3] = f"{m[1]} {m[2]}:{(int(m[3]) + later) % 60:02d}"
    new.append(cols)
if how == "file":
    target = os.path.join(os.path.dirname(results), "results_new.csv")
    with open(target, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(new)
else:
    target = results
    with open(target, "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(new)
print(f"{len(new)} results to {target} ({how}; {total} rows in all)", file=sys.stderr)
PY
}
deliver file
night facts-file
night facts-file-full --full
deliver append
night facts-append
night facts-append-full --full

# 1 % new records with new patients: a tenth of them patients of the same
# provider (copies of its first patients under new ids, another family
# name, born a year earlier: new persons), the rest their results, appended
# to its patients.csv and results.csv. Linkage runs again.
python3 - "$work/data" <<'PY'
import csv, glob, os, sys
data = sys.argv[1]
total = 0
for path in glob.glob(os.path.join(data, "*", "*")):
    if path.endswith((".csv", ".ndjson")):
        with open(path, "rb") as f:
            total += sum(1 for _ in f) - (0 if path.endswith(".ndjson") else 1)
folder = os.path.dirname(sorted(glob.glob(os.path.join(data, "*", "results.csv")))[0])
want = total // 100
with open(os.path.join(folder, "patients.csv"), newline="") as f:
    reader = csv.reader(f)
    next(reader)
    patients = [r for _, r in zip(range(want // 10), reader)]
new = {}
for p in patients:
    q = list(p)
    q[0] += "N"; q[1] += "N"; q[3] += "ova"
    parts = q[4].split("/")
    if len(parts) == 3 and parts[2].isdigit():
        q[4] = f"{parts[0]}/{parts[1]}/{int(parts[2]) - 1}"
    q[12] = q[13] = q[14] = ""  # phone, e-mail, SSN
    new[p[0]] = q
results = []
with open(os.path.join(folder, "results.csv"), newline="") as f:
    reader = csv.reader(f)
    next(reader)
    for r in reader:
        if r[1] in new and len(results) < want - len(new):
            results.append([r[0] + "N", r[1] + "N", ""] + r[3:])
for name, rows in (("patients.csv", new.values()), ("results.csv", results)):
    with open(os.path.join(folder, name), "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
print(f"{len(new)} patients and {len(results)} of their results to {folder}", file=sys.stderr)
PY
night patients-append
night patients-append-full --full

# DuckDB (benches/.venv, from benches/run.sh) compares tables whose files
# differ by their rows: an appended table splits them into other files.
python=python3
[ -x benches/.venv/bin/python ] && python=benches/.venv/bin/python
"$python" - "$work/nights.txt" "$warehouse/runs" <<'PY'
import collections, hashlib, json, os, sys
nights = [l.split() for l in open(sys.argv[1])]
runs = sys.argv[2]
def manifest(run):
    return json.load(open(os.path.join(runs, run, "manifest.json")))
def tables(run):
    # Derived tables (a table's part-*.parquet files together), each as its
    # files' content hashes; reports are per run and left out.
    out = collections.defaultdict(set)
    for o in manifest(run)["outputs"]:
        path = o["path"]
        if path.split("/")[0] not in ("core", "marts", "research"):
            continue
        table = os.path.dirname(path) if os.path.basename(path).startswith("part-") else path
        out[table].add(o["sha256"])
    return out
def same_rows(run_a, run_b, table):
    try:
        import duckdb
    except ImportError:
        return False
    def scan(run):
        path = os.path.join(runs, run, table)
        return f"read_parquet('{path}/*.parquet')" if os.path.isdir(path) else f"read_parquet('{path}')"
    con = duckdb.connect()
    a, b = scan(run_a), scan(run_b)
    n = con.sql(f"SELECT (SELECT count(*) FROM (FROM {a} EXCEPT ALL FROM {b})) + "
                f"(SELECT count(*) FROM (FROM {b} EXCEPT ALL FROM {a}))").fetchall()[0][0]
    return n == 0
def dq_counts(run):
    # The data-quality counts (kept, added to or counted again by a night).
    results = json.load(open(os.path.join(runs, run, "reports", run, "dq.json")))
    return {(r["check"], r["source"]): (r["violating"], r["checked"]) for r in results}
def compare(run_a, run_b):
    a, b = tables(run_a), tables(run_b)
    split = [t for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t)]
    differ = [t for t in split if not same_rows(run_a, run_b, t)]
    qa, qb = dq_counts(run_a), dq_counts(run_b)
    dq = "" if qa == qb else f"; {sum(qa.get(k) != qb.get(k) for k in set(qa) | set(qb))} dq counts differ"
    if differ:
        return f"{len(differ)} of {len(b)} tables differ: {', '.join(differ)}{dq}"
    if not split:
        return f"yes (bytes){dq}"
    return f"yes (rows; {', '.join(split)} in other files){dq}"
# Each incremental night against the --full night over the same inputs.
print("| night | wall s | × its --full night | stages taken | derived tables and dq counts equal to --full |")
print("|---|---:|---:|---|---|")
ref = {n: f"{n}-full" for n in ("unchanged", "facts-file", "facts-append", "patients-append")}
by = {n[0]: n[2] for n in nights}
secs_of = {n[0]: float(n[1]) for n in nights}
for name, secs, run in nights:
    m = manifest(run)
    taken = [s["stage"] for s in m["stages"] if s.get("reused_from")]
    taken += [f"{s['stage']}.{t}" for s in m["stages"] for t in s.get("reused_tables", [])]
    taken += [f"{s['stage']}.{t} appended" for s in m["stages"] for t in s.get("appended_tables", [])]
    taken += [f"{s['stage']} but for {s['recomputed']['persons']} of {s['recomputed']['of']} persons"
              for s in m["stages"] if s.get("recomputed")]
    taken += [f"{s['stage']} of {len(s['reused_sources'])} sources"
              for s in m["stages"] if s.get("reused_sources")]
    same, ratio = "", ""
    if name in ref:
        same = compare(run, by[ref[name]])
        ratio = f"{float(secs) / secs_of[ref[name]]:.2f}"
    print(f"| {name} | {float(secs):.1f} | {ratio} | {', '.join(taken) or '–'} | {same} |")
print()
for name, _, run in nights:
    m = manifest(run)
    stages = ", ".join(f"{s['stage']} {s['seconds']:.1f}" for s in m["stages"])
    print(f"- {name}: {stages}; peak {m['peak_memory_bytes'] // 2**20} MB")
PY
