#!/usr/bin/env bash
# Ingest against DuckDB (run by hand, after `cargo build --release`):
#   benches/ingest_duckdb.sh DATA_DIR [ROUNDS]
# DATA_DIR holds a Ward config (ward.toml; `ward synth` writes one with its
# extracts). Each round runs `ward ingest` into a new, empty warehouse and
# benches/duckdb_ingest.py (the same extracts to Parquet by DuckDB's COPY,
# with the mapping's columns, types and date formats; see its docstring
# for what it leaves out), interleaved, each timed by /usr/bin/time.
set -eu
cd "$(dirname "$0")/.."
repo=$PWD
data=$(cd "$1" && pwd); rounds=${2:-2}
W=${CARGO_TARGET_DIR:-$PWD/target}/release/ward
venv=benches/.venv
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/python" -c "import duckdb" 2>/dev/null || "$venv/bin/pip" install --quiet duckdb
scratch=$(mktemp -d)
# Source paths are relative to the config, so the copy lives beside it.
config=$data/.ward-ingest-bench.toml
trap 'rm -rf "$scratch" "$config"' EXIT
sed "s|^warehouse = .*|warehouse = \"$scratch/warehouse\"|" "$data/ward.toml" > "$config"
t() { /usr/bin/time -f "%e s wall, %U+%S s CPU, %M KB peak" "$@"; }
for round in $(seq "$rounds"); do
    rm -rf "$scratch/warehouse"
    echo "== round $round: ward ingest"
    t "$W" --config "$config" -q ingest 2>&1 | tail -1
    echo "== round $round: DuckDB"
    t "$repo/$venv/bin/python" "$repo/benches/duckdb_ingest.py" "$data/ward.toml" "$scratch/duckdb" \
        --threads "$(nproc)" 2>&1 | tail -2
done
