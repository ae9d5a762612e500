#!/usr/bin/env bash
# What each scrape costs the model server: prometheus_client (as in vLLM) rendering a real-size
# vLLM registry whole vs with the EPP's name[] filter. Installs prometheus_client into the
# project's .venv (from PyPI). Usage: scripts/bench-metrics-render.sh [page.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q prometheus_client
echo "prometheus_client $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("prometheus_client"))')"
.venv/bin/python scripts/bench-metrics-render.py "${1:-tests/data/vllm-0.32-metrics-sample.txt}"
