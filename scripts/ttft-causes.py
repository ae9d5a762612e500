#!/usr/bin/env python3
"""Where slow requests' time to first token went, from a route-bench run's simulator logs.

Run route-bench with `--sim-log-filter warn,vllm_sim::ttft=debug`; vllm-sim then logs each
request's first token with its parts (its own adapter's load, other requests' adapter reads
and the load API's holding the engine, waiting for a LoRA slot, other queueing). This sums them per run:

    python3 scripts/ttft-causes.py OUT_DIR [--warmup 10] [--over 300]

A request over `--over` ms is put down to its largest part. Times count from each log's
first arrival (the run's first request, within a few milliseconds).
"""
import argparse
import glob
import os
import re
import signal
import sys

FIELD = re.compile(r'(\w+)=("[^"]*"|\S+)')
CAUSES = [
    ("own_load", "its own adapter's read"),
    ("other_reads", "other requests' adapter reads"),
    ("api_loads", "loads through the load API (sidecars)"),
    ("slot", "waiting for a LoRA slot"),
    ("queue", "queue (full batch or step under way)"),
]


def parse(path):
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            if "vllm_sim::ttft" not in line:
                continue
            kv = {k: v.strip('"') for k, v in FIELD.findall(line.split("vllm_sim::ttft", 1)[1])}
            try:
                out.append({k: (kv[k] if k == "found" else float(kv[k]))
                            for k in ("arrival", "ttft", "found", "own_load", "other_reads", "api_loads", "slot", "queue")})
            except (KeyError, ValueError):
                continue
    return out


def report(path, rows, warmup, over):
    if not rows:
        print(f"{path}: no first-token events (run with --sim-log-filter warn,vllm_sim::ttft=debug)")
        return
    t0 = min(r["arrival"] for r in rows)
    rows = [r for r in rows if r["arrival"] - t0 >= warmup]
    n = len(rows)
    if n == 0:
        print(f"{path}: nothing after the warm-up")
        return
    slow = [r for r in rows if r["ttft"] * 1000 > over]
    reads = sum(1 for r in rows if r["found"] == "disk")
    print(f"{path}: {n} requests after {warmup:g} s; {reads} read their adapter from disk "
          f"({100 * reads / n:.1f} %); {len(slow)} over {over:g} ms ({100 * len(slow) / n:.1f} %), by their largest part:")
    counts = {k: 0 for k, _ in CAUSES}
    counts["compute"] = 0
    for r in slow:
        k, v = max(((k, r[k]) for k, _ in CAUSES), key=lambda kv: kv[1])
        counts[k if v > 0 else "compute"] += 1
    for k, label in CAUSES + [("compute", "its own step (prefill)")]:
        c = counts[k]
        print(f"  {label:40s} {c:5d}  {100 * c / n:5.1f} % of requests")


def main():
    # Piped into head: stop quietly.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="route-bench --out directory (or one vllm-sim.log)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds left out at the start")
    ap.add_argument("--over", type=float, default=300.0, help="a slow request's TTFT, ms")
    a = ap.parse_args()
    logs = [a.out] if os.path.isfile(a.out) else sorted(glob.glob(os.path.join(a.out, "**", "vllm-sim.log"), recursive=True))
    if not logs:
        sys.exit(f"no vllm-sim.log under {a.out}")
    for p in logs:
        report(p, parse(p), a.warmup, a.over)


if __name__ == "__main__":
    main()
