#!/usr/bin/env sh
# Regenerates the bundled sample with Ward's generator. Run from anywhere.
set -eu
cd "$(dirname "$0")/.."
rm -rf sample_data/northside_clinic sample_data/st_marys_hospital sample_data/lakeside_endo
cargo run --release -- synth --patients 300 --providers 3 --seed 42 --bad-rate 0.01 --noise hard --out sample_data
