#!/usr/bin/env bash
# The LoRA fleet benchmark (docs/lora-fleet.md, docs/benchmarks.md "LoRA fleet"): lora-zipf,
# lora-flash-crowd and lora-shift, each with every placement (every adapter everywhere, a
# static 2-home hash partition, lazy demand-proportional homes, ours in both cold-adapter
# modes), lora-zipf-steady (lora-zipf for 180 s, the first 60 s left out), then lora-zipf
# with three EPP replicas (one deciding, two following). Results under
# target/lora-fleet-bench/ (summary.md per part). ~60 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-envoy.sh >/dev/null
cargo build --release --locked --bin route-bench --bin epp --bin vllm-sim --bin lora-sidecar 2>&1 | tail -1
OUT=$PWD/target/lora-fleet-bench
rm -rf "$OUT"
for w in lora-zipf lora-flash-crowd lora-shift lora-zipf-steady; do
  target/release/route-bench "bench/workloads/$w.yaml" --out "$OUT/$w" "$@"
done
target/release/route-bench bench/workloads/lora-zipf.yaml --policies lora-placed,lora-placed-resolver --epp-replicas 3 \
  --out "$OUT/lora-zipf-x3" "$@"
cat "$OUT"/*/summary.md
