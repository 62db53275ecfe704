#!/usr/bin/env bash
# `ward serve` against `ward query`, by hand (not in CI; after
# `cargo build --release --features synth`):
#   benches/serve.sh [WORK_DIR]
# WORK_DIR holds a generated population with a published run, as
# benches/incremental.sh or benches/measures.sh leave it (data/ward.toml);
# default /tmp/ward-incremental-1000000. Starts `ward serve` on a free port
# of 127.0.0.1 (plaintext: loopback only), issues a token, and runs
# benches/serve_bench.py with the ADBC Flight SQL driver (installed into
# benches/.venv from tests/serve/requirements.txt): query latency against
# `ward query`, streaming throughput, 16 concurrent clients.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/ward-incremental-1000000}
ward=${CARGO_TARGET_DIR:-$PWD/target}/release/ward
[ -f "$work/data/ward.toml" ] || { echo "no $work/data/ward.toml: run benches/incremental.sh first" >&2; exit 2; }

python=benches/.venv/bin/python
[ -x "$python" ] || python3 -m venv benches/.venv
"$python" -c "import adbc_driver_flightsql.dbapi, pyarrow" 2>/dev/null \
    || benches/.venv/bin/pip install -q -r tests/serve/requirements.txt

# The population's config with a [serve] section; tokens and audit log
# beside it, not in the warehouse.
config="$work/data/ward-serve.toml"
rm -rf "$work/serve"
mkdir -p "$work/serve"
{ cat "$work/data/ward.toml"; printf '\n[serve]\ninsecure = true\ntokens = "%s"\naudit_log = "%s"\nmax_queued = 32\n' \
    "$work/serve/tokens.json" "$work/serve/audit.jsonl"; } > "$config"
token=$("$ward" --config "$config" -q serve token add bench)

out="$work/serve/server.out"
"$ward" --config "$config" -q serve --listen 127.0.0.1:0 > "$out" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "listening on" "$out" 2>/dev/null && break; sleep 0.2; done
addr=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$out")
[ -n "$addr" ] || { echo "ward serve did not start" >&2; exit 3; }

"$python" benches/serve_bench.py "grpc://$addr" "$token" "$ward" "$config"
echo
echo "audit lines: $(wc -l < "$work/serve/audit.jsonl")"
