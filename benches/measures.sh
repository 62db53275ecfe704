#!/usr/bin/env bash
# Measures only, per measure (run by hand, after `cargo build --release --features synth`):
#   benches/measures.sh N
# synth (10 providers, seed 1), ingest, link, then `ward measure` (every
# measure of queries/measures) timed whole by /usr/bin/time and per measure
# from its "measure finished" log lines; then the same SQL on DuckDB over
# the same core tables (benches/duckdb_measures.py, DuckDB from PyPI in
# benches/.venv), checked to give the same per-person populations as
# Ward's marts. Prints Markdown for RESULTS.md.
set -eu
cd "$(dirname "$0")/.."
repo=$PWD
N=$1; W=${CARGO_TARGET_DIR:-$PWD/target}/release/ward; D=/tmp/mb$N
rm -rf $D; mkdir -p $D
t() { /usr/bin/time -f "%e s wall, %U+%S s CPU, %M KB peak" "$@"; }
cd $D
t $W -q synth --patients $N --providers 10 --seed 1 --out $D/data 2>&1 | tail -1
cd $D/data
echo "== ingest"; t $W -q ingest 2>&1 | tail -1
echo "== link"; t $W -q link 2>&1 | tail -1
echo "== measures"
t $W --log-format json measure > $D/measure.out 2> $D/measure.log
tail -1 $D/measure.log
echo
echo "| measure | subjects | s |"
echo "|---|---:|---:|"
field() { echo "$1" | sed -E "s/.*\"$2\":\"?([^\",}]+).*/\1/"; }
grep '"measure finished"' $D/measure.log | while read -r line; do
    printf '| %s | %s | %.1f |\n' "$(field "$line" measure)" "$(field "$line" subjects)" "$(field "$line" seconds)"
done
echo
echo "== DuckDB, the same SQL on the same core tables"
cd "$repo"
venv=benches/.venv
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/python" -c "import duckdb" 2>/dev/null || "$venv/bin/pip" install --quiet duckdb
t "$venv/bin/python" benches/duckdb_measures.py "$D/warehouse" queries "$D/duckdb" --threads "$(nproc)"
