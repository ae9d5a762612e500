#!/usr/bin/env bash
# Memory rows (docs/benchmarks.md, "Holding at scale"): the loads that exhausted the EPP's memory,
# rerun through the shipped Envoy config with the budget the manifest's limit gives.
# `scripts/memory-rows.sh [ROW ...]`; LIMIT_MB / BUDGET override the manifest's limit / the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-envoy.sh >/dev/null
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release --locked --bins --example idle_streams 2>&1 | tail -1
fi
ulimit -n "$(ulimit -Hn)"
exec python3 scripts/memory-rows.py "$@"
