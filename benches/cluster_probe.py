"""Samples a Ward night while it runs, for benches/cluster.sh.

    cluster_probe.py LOG OUT DRIVER_PID [ROLE=PID ...] [--work-dir DIR ...]

Every 0.5 s until DRIVER_PID exits: the stage the night is in (the last
"stage started" line of its JSON log), the CPU seconds each process used
since the previous sample (charged to that stage), each process's resident
memory, and the bytes under every Ballista job directory of the executors'
work directories (`<work_dir>/<job_id>/…`; a job's shuffle files stay until
the scheduler removes them, 300 s after the job). Writes a JSON summary to
OUT: per stage, CPU seconds and peak resident MB per role, and the peak
bytes on disk of the jobs first seen in the stage (shuffle_mb).
"""

import json
import os
import re
import sys
import time

STAGE = re.compile(r'"stage":"(\w+)"')
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    except (OSError, IndexError):
        return None


def resident_mb(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20
    except (OSError, IndexError):
        return None


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def main():
    args = sys.argv[1:]
    work_dirs = []
    while "--work-dir" in args:
        i = args.index("--work-dir")
        work_dirs.append(args[i + 1])
        del args[i : i + 2]
    log, out, driver = args[0], args[1], int(args[2])
    roles = {"driver": [driver]}
    for spec in args[3:]:
        role, pid = spec.split("=")
        roles.setdefault(role, []).append(int(pid))

    stage = "start"
    stages = {}  # stage -> {"cpu": {role: s}, "rss": {role: MB}, "jobs": set}
    jobs = {}  # job id -> {"stage": first seen in, "bytes": {work dir: peak}}
    last_cpu = {pid: cpu_seconds(pid) or 0.0 for pids in roles.values() for pid in pids}
    offset = 0
    while True:
        alive = os.path.exists(f"/proc/{driver}")
        try:
            with open(log) as f:
                f.seek(offset)
                for line in f:
                    if "stage started" in line:
                        m = STAGE.search(line)
                        if m:
                            stage = m.group(1)
                offset = f.tell()
        except OSError:
            pass
        s = stages.setdefault(stage, {"cpu": {}, "rss": {}, "jobs": []})
        for role, pids in roles.items():
            rss = 0.0
            for pid in pids:
                now = cpu_seconds(pid)
                if now is not None:
                    s["cpu"][role] = s["cpu"].get(role, 0.0) + now - last_cpu[pid]
                    last_cpu[pid] = now
                rss += resident_mb(pid) or 0.0
            s["rss"][role] = max(s["rss"].get(role, 0.0), rss)
        for wd in work_dirs:
            try:
                entries = os.listdir(wd)
            except OSError:
                continue
            for job in entries:
                path = os.path.join(wd, job)
                if not os.path.isdir(path):
                    continue
                seen = jobs.setdefault(job, {"stage": stage, "bytes": {}})
                if seen["stage"] == stage and job not in s["jobs"]:
                    s["jobs"].append(job)
                seen["bytes"][wd] = max(seen["bytes"].get(wd, 0), dir_bytes(path))
        if not alive:
            break
        time.sleep(0.5)
    summary = {}
    for name, s in stages.items():
        summary[name] = {
            "cpu_seconds": {r: round(v, 1) for r, v in s["cpu"].items()},
            "peak_rss_mb": {r: round(v) for r, v in s["rss"].items()},
            "shuffle_mb": round(sum(sum(jobs[j]["bytes"].values()) for j in s["jobs"]) / 2**20, 1),
        }
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
