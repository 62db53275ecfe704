#!/usr/bin/env bash
# Linkage only, Ward against Splink on the same staged records (run by hand):
#   benches/link.sh N     (after `cargo build --release --features synth` and benches/run.sh's venv)
# synth (default hard noise, 10 providers, seed 1), ingest, `ward link
# --evaluate` and benches/splink_link.py, each timed by /usr/bin/time.
set -eu
cd "$(dirname "$0")/.."
N=$1; W=${CARGO_TARGET_DIR:-$PWD/target}/release/ward; D=/tmp/lb$N; PY=$PWD/benches/.venv/bin/python
HERE=$PWD
rm -rf $D; mkdir -p $D
t() { /usr/bin/time -f "%e s wall, %U+%S s CPU, %M KB peak" "$@"; }
cd $D
t $W -q synth --patients $N --providers 10 --seed 1 --out $D/data 2>&1 | tail -1
cd $D/data
echo "== ingest"; t $W -q ingest 2>&1 | tail -1
echo "== ward link"; t $W link --evaluate truth.csv 2>&1 | grep -v INFO | tail -5
echo "== splink"; t $PY $HERE/benches/splink_link.py $D/warehouse $D/data/truth.csv 2>&1 | grep -v "not fully trained\|^Comparison\|^    " | tail -4
