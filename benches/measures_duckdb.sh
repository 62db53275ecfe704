#!/usr/bin/env bash
# The measure stage against DuckDB on a warehouse that has a published run
# (run by hand, after `cargo build --release`):
#   benches/measures_duckdb.sh CONFIG [ROUNDS]
# CONFIG is the warehouse's Ward config (say the population
# benches/incremental.sh leaves). Each round runs `ward measure` on the
# published run (marts to a scratch folder, the run untouched) and
# benches/duckdb_measures.py (the same SQL of queries/ on DuckDB over the
# same core tables), interleaved, each timed by /usr/bin/time; then checks
# that Ward's per-person results of the round equal DuckDB's (and DuckDB
# checks its own against the run's marts).
set -eu
cd "$(dirname "$0")/.."
repo=$PWD
config=$(cd "$(dirname "$1")" && pwd)/$(basename "$1"); rounds=${2:-2}
W=${CARGO_TARGET_DIR:-$PWD/target}/release/ward
venv=benches/.venv
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/python" -c "import duckdb, pyarrow" 2>/dev/null || "$venv/bin/pip" install --quiet duckdb pyarrow
warehouse=$(sed -n 's/^warehouse *= *"\(.*\)"/\1/p' "$config")
case "$warehouse" in /*) ;; *) warehouse="$(dirname "$config")/$warehouse" ;; esac
run="$warehouse/runs/$(cat "$warehouse/runs/CURRENT")"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
t() { /usr/bin/time -f "%e s wall, %U+%S s CPU, %M KB peak" "$@"; }
for round in $(seq "$rounds"); do
    rm -rf "$scratch/ward" "$scratch/duckdb"
    echo "== round $round: ward measure"
    t "$W" --config "$config" -q measure --out "$scratch/ward" 2>&1 | tail -1
    echo "== round $round: DuckDB"
    t "$venv/bin/python" benches/duckdb_measures.py "$run" queries "$scratch/duckdb" \
        --threads "$(nproc)" > "$scratch/duckdb.log" 2>&1 || { cat "$scratch/duckdb.log"; exit 1; }
    grep -E "^total wall|differ" "$scratch/duckdb.log" || true
    tail -1 "$scratch/duckdb.log"
    "$venv/bin/python" - "$scratch/ward/marts/measure_patient" "$scratch/duckdb/measure_patient" <<'PY'
import pathlib, sys
import pyarrow.compute as pc
import pyarrow.parquet as pq
ward, duck = map(pathlib.Path, sys.argv[1:])
populations = ["initial_population", "denominator", "denominator_exclusion",
               "denominator_exception", "numerator"]
differ = []
for f in sorted(ward.glob("*.parquet")):
    a, b = pq.read_table(f), pq.read_table(duck / f.name)
    cols = [c for c in ["person_id", "subject_id", "group_id"] + populations
            if c in a.column_names and c in b.column_names]
    keys = [(c, "ascending") for c in cols]
    if not a.select(cols).sort_by(keys).equals(b.select(cols).sort_by(keys)):
        differ.append(f.stem)
print(f"ward = duckdb per person: {'yes' if not differ else 'NO: ' + ', '.join(differ)}")
sys.exit(1 if differ else 0)
PY
done
