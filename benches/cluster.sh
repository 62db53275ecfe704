#!/usr/bin/env bash
# The local engine against a Ballista cluster on this machine, by hand (not
# in CI; after `cargo build --release --features ballista,synth`):
#   benches/cluster.sh [PATIENTS] [WORK_DIR]
# On a generated population (10 providers, seed 1): a full night in
# process, then the same night on `ward scheduler` + two `ward executor`
# processes (one task slot each: the machine's two cores) on loopback, each
# into its own warehouse. Every stage is sampled (benches/cluster_probe.py):
# CPU seconds of the driver, the scheduler and the executors, their peak
# resident memory, the Ballista jobs and the bytes of shuffle files they
# wrote. Then the two runs' core, marts and research tables are compared
# (as multisets of rows, DuckDB's EXCEPT ALL both ways) and summary.csv
# byte for byte. Prints the Markdown for benches/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
patients=${1:-100000}
work=${2:-/tmp/ward-cluster-$patients}
ward=${CARGO_TARGET_DIR:-$PWD/target}/release/ward
venv=benches/.venv
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/python" -c "import duckdb" 2>/dev/null || "$venv/bin/pip" install --quiet duckdb
py="$venv/bin/python"
if [ ! -f "$work/data/ward.toml" ]; then
    "$ward" -q synth --patients "$patients" --providers 10 --seed 1 --out "$work/data"
fi
port=50150  # scheduler; executors on the next four ports
for engine in local cluster; do
    rm -rf "${work:?}/$engine"
    sed "s|^warehouse = .*|warehouse = \"$work/$engine\"|" "$work/data/ward.toml" > "$work/data/$engine.toml"
done
printf '\n[engine]\nkind = "ballista"\nscheduler = "df://127.0.0.1:%s"\n' "$port" >> "$work/data/cluster.toml"

pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap stop EXIT

night() { # engine, probe roles...
    local engine=$1; shift
    local log="$work/$engine.jsonl" start end
    start=$(date +%s.%N)
    "$ward" --config "$work/data/$engine.toml" --log-format json run 2>"$log" >/dev/null &
    local driver=$!
    "$py" benches/cluster_probe.py "$log" "$work/$engine-probe.json" "$driver" "$@" &
    local probe=$!
    local status=0
    wait "$driver" || status=$?
    wait "$probe"
    end=$(date +%s.%N)
    echo "$engine night: exit $status, $(echo "$end - $start" | bc) s wall"
    [ "$status" = 0 ] || { tail -5 "$log"; exit 1; }
}

night local

rm -rf "$work/exec1" "$work/exec2"
"$ward" -q scheduler --listen "127.0.0.1:$port" 2>"$work/scheduler.log" &
scheduler=$!; pids+=("$scheduler")
sleep 1
roles=("scheduler=$scheduler")
for i in 1 2; do
    mkdir -p "$work/exec$i"
    "$ward" -q executor --scheduler "127.0.0.1:$port" --listen "127.0.0.1:$((port + 2 * i - 1))" \
        --grpc-port "$((port + 2 * i))" --slots 1 --work-dir "$work/exec$i" 2>"$work/exec$i.log" &
    pids+=("$!"); roles+=("executor=$!")
done
until [ "$(curl -s "http://127.0.0.1:$port/api/executors" | grep -o '"id"' | wc -l)" = 2 ]; do sleep 0.5; done
night cluster "${roles[@]}" --work-dir "$work/exec1" --work-dir "$work/exec2"
curl -s "http://127.0.0.1:$port/api/jobs" > "$work/jobs.json"

"$py" - "$work" <<'PY'
import duckdb, filecmp, json, os, re, sys
from datetime import datetime, timezone
work = sys.argv[1]
jobs = json.load(open(os.path.join(work, "jobs.json")))
runs = {}
for engine in ("local", "cluster"):
    root = os.path.join(work, engine, "runs")
    runs[engine] = os.path.join(root, open(os.path.join(root, "CURRENT")).read().strip())
# Same outputs.
differ, compared = [], 0
con = duckdb.connect()
for sub in ("core", "marts", "research"):
    for dirpath, _, files in os.walk(os.path.join(runs["local"], sub)):
        for name in sorted(files):
            a = os.path.join(dirpath, name)
            b = os.path.join(runs["cluster"], os.path.relpath(a, runs["local"]))
            compared += 1
            if not os.path.exists(b):
                differ.append(f"{os.path.relpath(a, runs['local'])} (missing)")
            elif name.endswith(".parquet"):
                q = "SELECT count(*) FROM (SELECT * FROM read_parquet(?) EXCEPT ALL SELECT * FROM read_parquet(?))"
                extra = con.execute(q, [a, b]).fetchone()[0] + con.execute(q, [b, a]).fetchone()[0]
                if extra:
                    differ.append(f"{os.path.relpath(a, runs['local'])} ({extra} rows)")
            elif not filecmp.cmp(a, b, shallow=False):
                differ.append(os.path.relpath(a, runs["local"]))
summary = [os.path.join(runs[e], "reports", os.path.basename(runs[e]), "summary.csv") for e in runs]
same_summary = filecmp.cmp(*summary, shallow=False)
print(f"outputs: {compared} files of core/marts/research compared, "
      f"{'all identical' if not differ else 'DIFFERENT: ' + ', '.join(differ)}; "
      f"summary.csv {'identical' if same_summary else 'DIFFERENT'}")
states = {}
for j in jobs:
    states[j["status"]] = states.get(j["status"], 0) + 1
print(f"Ballista jobs: {len(jobs)} ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})")

# Per stage: Ballista jobs by the Ward stage they started in (from the
# "stage started" lines of the cluster night's log).
starts = []
for line in open(os.path.join(work, "cluster.jsonl")):
    if "stage started" in line:
        at = datetime.strptime(json.loads(line)["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        starts.append((at.timestamp() * 1000, re.search(r'"stage":"(\w+)"', line).group(1)))
per_stage = {}
for j in jobs:
    stage = next((s for at, s in reversed(starts) if at <= j["start_time"] + 1), "start")
    d = per_stage.setdefault(stage, [0, 0, 0.0])
    d[0] += 1; d[1] += j["num_stages"]; d[2] += max(j["end_time"] - j["start_time"], 0) / 1000
m = {e: json.load(open(os.path.join(runs[e], "manifest.json"))) for e in runs}
p = {e: json.load(open(os.path.join(work, f"{e}-probe.json"))) for e in runs}
lk = m["local"]["linkage"]
print(f"persons {lk['persons']}, linkage records {lk['records']}, candidate pairs {lk['candidate_pairs']}, "
      f"facts {sum(v for k, v in m['local']['core'].items() if k != 'person')}")
print()
print("| stage | local s | cluster s | cluster/local | local CPU s | driver CPU s | executors CPU s | scheduler CPU s "
      "| jobs | job stages | job s | shuffle MB | local peak MB | driver peak MB | executors peak RSS MB |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
cl = {s["stage"]: s for s in m["cluster"]["stages"]}
tot = [0.0, 0.0]
for s in m["local"]["stages"]:
    name, c = s["stage"], cl[s["stage"]]
    pl, pc = p["local"].get(name, {}), p["cluster"].get(name, {})
    js = per_stage.get(name, [0, 0, 0.0])
    tot[0] += s["seconds"]; tot[1] += c["seconds"]
    cpu = lambda probe, role: probe.get("cpu_seconds", {}).get(role, 0.0)
    print(f"| {name} | {s['seconds']:.1f} | {c['seconds']:.1f} | {c['seconds'] / s['seconds']:.2f} "
          f"| {cpu(pl, 'driver'):.0f} | {cpu(pc, 'driver'):.0f} | {cpu(pc, 'executor'):.0f} | {cpu(pc, 'scheduler'):.0f} "
          f"| {js[0]} | {js[1]} | {js[2]:.1f} | {pc.get('shuffle_mb', 0):.0f} "
          f"| {s['peak_memory_bytes'] // 2**20} | {c['peak_memory_bytes'] // 2**20} "
          f"| {pc.get('peak_rss_mb', {}).get('executor', 0)} |")
print(f"| **stages** | **{tot[0]:.1f}** | **{tot[1]:.1f}** | **{tot[1] / tot[0]:.2f}** | | | | | | | | | | | |")
PY
