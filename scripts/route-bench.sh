#!/usr/bin/env bash
# Routing-quality benchmark: every workload in bench/workloads/ (or the files given) against
# round-robin (Envoy alone), random, least-queue and the default EPP profile, each on a fresh
# vllm-sim fleet behind a real Envoy. Results: target/route-bench/ (requests.csv, summary.json,
# summary.csv, summary.md, SVG plots). Takes ~45 minutes for the five workloads on 2 cores.
# Usage: scripts/route-bench.sh [workload.yaml ...] [route-bench flags, e.g. --rates 10,20]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-envoy.sh >/dev/null
cargo build --release --locked --bin route-bench --bin epp --bin vllm-sim --bin lora-sidecar 2>&1 | tail -1
if [ $# -eq 0 ] || [[ "$1" == --* ]]; then
  set -- bench/workloads/multi-lora.yaml bench/workloads/prefix-heavy.yaml \
    bench/workloads/mixed-criticality.yaml bench/workloads/mixed-criticality-priority.yaml \
    bench/workloads/sharegpt.yaml "$@"
fi
exec target/release/route-bench "$@"
