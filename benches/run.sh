#!/usr/bin/env bash
# Ward benchmarks, run by hand (not in CI). Builds release binaries, installs
# DuckDB, Polars and Splink into a virtualenv, then runs benches/bench.py.
#   benches/run.sh [--patients N] [--providers K] [--seed S] [--work DIR]
# Paste the Markdown it prints into benches/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --features synth --bins --examples
venv=benches/.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
fi
"$venv/bin/python" -c "import duckdb, polars, splink, numpy" 2>/dev/null \
    || "$venv/bin/pip" install --quiet duckdb polars splink numpy
exec "$venv/bin/python" benches/bench.py --target "$CARGO_TARGET_DIR" "$@"
