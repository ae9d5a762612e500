#!/usr/bin/env bash
# Active-active EPP replicas: prefix-heavy @24 and multi-lora @15 with 1, 2 and 3 replicas,
# ROUNDS rounds (default 3), then each configuration's runs and medians (docs/benchmarks.md).
# Needs release binaries (cargo build --release --bins) and scripts/install-envoy.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-target/replica-bench}"
rounds="${ROUNDS:-3}"
mkdir -p "$out"
for i in $(seq 1 "$rounds"); do
  for n in 1 2 3; do
    target/release/route-bench bench/workloads/prefix-heavy.yaml --policies default --rates 24 \
      --epp-replicas "$n" --out "$out/ph-$n-$i" > "$out/ph-$n-$i.log" 2>&1
    target/release/route-bench bench/workloads/multi-lora.yaml --policies default --rates 15 \
      --epp-replicas "$n" --out "$out/ml-$n-$i" > "$out/ml-$n-$i.log" 2>&1
  done
done
python3 - "$out" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
for wl, name in [("ph", "prefix-heavy @24"), ("ml", "multi-lora @15")]:
    base = None
    for n in (1, 2, 3):
        runs = []
        for f in sorted(glob.glob(f"{out}/{wl}-{n}-*/summary.json")):
            r = json.load(open(f))
            runs.append(r[0] if isinstance(r, list) else r)
        if not runs:
            continue
        p90 = [r["ttft_p90"] * 1000 for r in runs]
        med = statistics.median(p90)
        base = base or med
        hit = statistics.median(r["prefix_hit_rate"] * 100 for r in runs)
        tok = statistics.median(r["output_tokens_per_s"] for r in runs)
        print(f"{name} x{n}: p90 runs {[round(x) for x in p90]} median {med:.0f} ms "
              f"({med / base:.2f}x), hit {hit:.1f} %, {tok:.1f} tok/s")
PY
