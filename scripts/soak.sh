#!/usr/bin/env bash
# Soak (bounded): mixed valid and hostile traffic through Envoy in both body modes while model
# servers die and return and the pool file changes; asserts the EPP survives with RSS and
# metric series bounded and every answer valid HTTP. `scripts/soak.sh [SECONDS]` (default 180).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-envoy.sh >/dev/null
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release --locked --bins 2>&1 | tail -1
fi
exec python3 scripts/soak.py "${1:-180}"
