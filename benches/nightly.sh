#!/usr/bin/env bash
# Nightly operations on a generated population, by hand (not in CI): two
# runs, two runs at once, kill -9 during the measures, status, the run
# after the kill, the run list, and a research query. Prints what to paste
# into benches/RESULTS.md; stage timings and peak memory come from the
# manifests.
#   benches/nightly.sh [PATIENTS] [PROVIDERS] [WORK_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
patients=${1:-100000}
providers=${2:-10}
work=${3:-/tmp/ward-nightly-$patients}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --features synth --bin ward || exit 3
ward="$CARGO_TARGET_DIR/release/ward"
if [ ! -f "$work/data/ward.toml" ]; then
    "$ward" synth --patients "$patients" --providers "$providers" --seed 1 --out "$work/data" || exit 3
fi
rm -rf "$work/warehouse"
config="$work/data/ward.toml"
# Peak memory comes from the manifests: Ward resets the kernel's high-water
# mark at every stage (to measure each), which also resets what
# /usr/bin/time would report.
timed() { /usr/bin/time -f "%e s wall" "$@"; }
echo "== first run";  timed "$ward" --config "$config" -q run; echo "exit $?"
echo "== second run, nothing new"; timed "$ward" --config "$config" -q run; echo "exit $?"
echo "== two runs at once"
("$ward" --config "$config" -q run; echo "first: exit $?") &
sleep 1
"$ward" --config "$config" -q run; echo "second: exit $?"
wait
echo "== kill -9 during the measures"
log="$work/killed.jsonl"
"$ward" --config "$config" --log-format json run 2>"$log" >/dev/null &
pid=$!
until grep -q '"stage":"measures"' "$log" 2>/dev/null; do sleep 0.2; done
kill -9 "$pid"; wait "$pid" 2>/dev/null
"$ward" --config "$config" -q status; echo "status: exit $?"
echo "== the run after the kill"; timed "$ward" --config "$config" -q run; echo "exit $?"
"$ward" --config "$config" -q status; echo "status: exit $?"
"$ward" --config "$config" -q runs
echo "== stages of every run (from their manifests)"
python3 - "$work/warehouse/runs" <<'PY'
import glob, json, os, sys
runs = sorted(glob.glob(os.path.join(sys.argv[1], "2*", "manifest.json")))
for path in runs:
    m = json.load(open(path))
    print(f"{m['run_id']}: peak {m['peak_memory_bytes'] // 2**20} MB, warnings {m['warnings']}")
    for s in m["stages"]:
        print(f"  {s['stage']:9} {s['seconds']:6.2f} s {s['peak_memory_bytes'] // 2**20:6} MB")
PY
echo "== a research query"
"$ward" --config "$config" -q query \
    "SELECT age_band, count(*) AS persons FROM person GROUP BY age_band ORDER BY 1" --min-cell 11
