#!/usr/bin/env bash
# Incremental nights, by hand (not in CI; after
# `cargo build --release --features synth`):
#   benches/incremental.sh [PATIENTS] [WORK_DIR]
# On a generated population (10 providers, seed 1, bad rate 0.002): a first
# night on an empty warehouse, a night with nothing new, the same with
# `--full`, a night after 1 % new results appended to one provider (new
# facts, no new patients), and that night again with `--full` (the
# reference for identical outputs). Prints each night's wall time, its
# ratio to the full night, the stages it reused, and whether its core,
# marts and research tables equal the full rebuild's. Stage timings come
# from the manifests.
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-100000}
work=${2:-/tmp/ward-incremental-$patients}
ward=${CARGO_TARGET_DIR:-$PWD/target}/release/ward
if [ ! -f "$work/data/ward.toml" ]; then
    "$ward" -q synth --patients "$patients" --providers 10 --seed 1 --bad-rate 0.002 --out "$work/data"
fi
config="$work/data/ward.toml"
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
# its first results with new ids, one minute later.
python3 - "$work/data" <<'PY'
import csv, glob, os, re, sys
data = sys.argv[1]
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
    cols[0] = f"{cols[0]}N{i}"
    # One minute later where the time is "MM/DD/YYYY HH:MM" (the generator
    # also writes bad values on purpose: those stay as they are).
    m = re.fullmatch(r"(\S+) (\d\d):(\d\d)", cols[3])
    if m:
        cols[3] = f"{m[1]} {m[2]}:{(int(m[3]) + 1) % 60:02d}"
    new.append(cols)
with open(results, "a", newline="") as f:
    csv.writer(f, lineterminator="\n").writerows(new)
print(f"appended {len(new)} results to {results} ({total} rows in all)", file=sys.stderr)
PY
night facts
night facts-full --full

python3 - "$work/nights.txt" "$warehouse/runs" <<'PY'
import hashlib, json, os, sys
nights = [l.split() for l in open(sys.argv[1])]
runs = sys.argv[2]
def manifest(run):
    return json.load(open(os.path.join(runs, run, "manifest.json")))
def tables(run):
    # Derived tables by content hash (taken or recomputed files are the same
    # bytes when deterministic); reports are per run and left out.
    return {o["path"]: o["sha256"] for o in manifest(run)["outputs"]
            if o["path"].split("/")[0] in ("core", "marts", "research")}
# Each incremental night against the --full night over the same inputs.
print("| night | wall s | × its --full night | stages taken | derived tables equal to --full |")
print("|---|---:|---:|---|---|")
ref = {"unchanged": "unchanged-full", "facts": "facts-full"}
by = {n[0]: n[2] for n in nights}
secs_of = {n[0]: float(n[1]) for n in nights}
for name, secs, run in nights:
    m = manifest(run)
    taken = [s["stage"] for s in m["stages"] if s.get("reused_from")]
    taken += [f"{s['stage']}.{t}" for s in m["stages"] for t in s.get("reused_tables", [])]
    taken += [f"{s['stage']} but for {s['recomputed']['persons']} of {s['recomputed']['of']} persons"
              for s in m["stages"] if s.get("recomputed")]
    taken += [f"{s['stage']} of {len(s['reused_sources'])} sources"
              for s in m["stages"] if s.get("reused_sources")]
    same, ratio = "", ""
    if name in ref:
        a, b = tables(run), tables(by[ref[name]])
        same = "yes (bytes)" if a == b else f"{sum(a.get(k) != v for k, v in b.items())} of {len(b)} files differ in bytes"
        ratio = f"{float(secs) / secs_of[ref[name]]:.2f}"
    print(f"| {name} | {float(secs):.1f} | {ratio} | {', '.join(taken) or '–'} | {same} |")
print()
for name, _, run in nights:
    m = manifest(run)
    stages = ", ".join(f"{s['stage']} {s['seconds']:.1f}" for s in m["stages"])
    print(f"- {name}: {stages}; peak {m['peak_memory_bytes'] // 2**20} MB")
PY
