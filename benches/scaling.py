"""Extrapolates benches/cluster.sh's measurements to a larger population.

    python3 benches/scaling.py [--target PERSONS] WORK_DIR...

Each WORK_DIR is one benches/cluster.sh run (a population size). For every
measured cost — wall and CPU seconds per stage in process, CPU seconds of
the driver and of the executors on the cluster, shuffle bytes, the
driver's peak memory per stage, candidate pairs per blocking rule — prints
the local exponent b of cost ~ persons^b between each pair of consecutive
sizes and the cost at the target, from the largest size with the last
exponent, but never below 1 for time, bytes and memory (fixed costs —
start-up, one Ballista job per query — flatten the small sizes' exponents;
at scale every row is read): a sub-linear figure would be a guess that the
night gets cheaper per person. Pair counts keep their exponent (a blocking
key with a bounded domain pairs up quadratically). Paste into
benches/RESULTS.md; the scaling plan in ARCHITECTURE.md is written from it.
"""

import argparse
import json
import math
import os


def exponent(p, q):
    """b of y = a * x^b through two points (x, y); None without a cost."""
    (x0, y0), (x1, y1) = p, q
    if y0 <= 0 or y1 <= 0 or x0 == x1:
        return None
    return math.log(y1 / y0) / math.log(x1 / x0)


def current(work, engine):
    runs = os.path.join(work, engine, "runs")
    run = open(os.path.join(runs, "CURRENT")).read().strip()
    return json.load(open(os.path.join(runs, run, "manifest.json")))


def human(v, unit=""):
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}{suffix}{unit}"
    return f"{v:.0f}{unit}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=100e6)
    ap.add_argument("work", nargs="+")
    args = ap.parse_args()
    sizes = []  # (persons, {metric: value})
    for work in args.work:
        local, cluster = current(work, "local"), current(work, "cluster")
        probe = {e: json.load(open(os.path.join(work, f"{e}-probe.json"))) for e in ("local", "cluster")}
        persons = local["linkage"]["persons"]
        metrics = {}
        for s in local["stages"]:
            metrics[("wall local s", s["stage"])] = s["seconds"]
            metrics[("peak local MB", s["stage"])] = s["peak_memory_bytes"] / 2**20
        for s in cluster["stages"]:
            metrics[("wall cluster s", s["stage"])] = s["seconds"]
            metrics[("peak driver MB", s["stage"])] = s["peak_memory_bytes"] / 2**20
        probe = {e: {k: v for k, v in p.items() if k != "start"} for e, p in probe.items()}
        for stage, p in probe["local"].items():
            metrics[("CPU local s", stage)] = p["cpu_seconds"].get("driver", 0.0)
        for stage, p in probe["cluster"].items():
            metrics[("CPU driver s", stage)] = p["cpu_seconds"].get("driver", 0.0)
            metrics[("CPU executors s", stage)] = p["cpu_seconds"].get("executor", 0.0)
            metrics[("shuffle MB", stage)] = p.get("shuffle_mb", 0.0)
        for rule, n in local["linkage"]["pairs_by_rule"].items():
            metrics[("pairs", rule)] = n
        metrics[("pairs", "all rules")] = local["linkage"]["candidate_pairs"]
        metrics[("records", "linkage")] = local["linkage"]["records"]
        metrics[("facts", "core")] = sum(v for k, v in local["core"].items() if k != "person")
        sizes.append((persons, metrics))
    sizes.sort(key=lambda s: s[0])
    shown = ", ".join(human(p) for p, _ in sizes)
    print(f"Measured at {shown} persons; extrapolated to {human(args.target)}.\n")
    steps = [f"b {human(p)}→{human(q)}" for (p, _), (q, _) in zip(sizes, sizes[1:])]
    print(f"| metric | stage / rule | {' | '.join(human(p) for p, _ in sizes)} | {' | '.join(steps)} "
          f"| at {human(args.target)} |")
    print(f"|---|---|{'---|' * (2 * len(sizes))}")
    for key in sorted({k for _, m in sizes for k in m}):
        points = [(p, m.get(key, 0.0)) for p, m in sizes]
        bs = [exponent(a, b) for a, b in zip(points, points[1:])]
        last = bs[-1] if bs else None
        top_p, top_y = points[-1]
        if last is None or top_y <= 0:
            at = "–"
        else:
            b = last if key[0] in ("pairs", "records", "facts") else max(last, 1.0)
            at = human(top_y * (args.target / top_p) ** b)
        values = " | ".join(human(v) for _, v in points)
        shown_bs = " | ".join("–" if b is None else f"{b:.2f}" for b in bs)
        print(f"| {key[0]} | {key[1]} | {values} | {shown_bs} | {at} |")


if __name__ == "__main__":
    main()
