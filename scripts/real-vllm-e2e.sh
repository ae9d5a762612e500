#!/usr/bin/env bash
# Opt-in end to end against a REAL vLLM (CPU build, tiny local model, peft adapters); not in CI.
# Checks the sidecar's rollout story and the wire answers our simulator copies. Needs
# scripts/real-vllm-setup.sh first (~3 min, ~6 GB). Prints PASS/FAIL per step.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] && [ -d .real-vllm/tiny-llama ] || scripts/real-vllm-setup.sh
cargo build --locked --bin lora-sidecar
R=$PWD/.real-vllm
PORT=${PORT:-18123}
BASE=http://127.0.0.1:$PORT
rm -rf "$R/config" && mkdir -p "$R/config"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
fail=0
check() { if [ "$2" = "$3" ]; then echo "PASS $1"; else echo "FAIL $1: got [$2] want [$3]"; fail=1; fi; }

VLLM_ALLOW_RUNTIME_LORA_UPDATING=true VLLM_CPU_KVCACHE_SPACE=1 \
  .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model "$R/tiny-llama" \
  --served-model-name tiny-llama --dtype float32 --enable-lora --max-loras 2 --max-lora-rank 8 \
  --max-model-len 256 --host 127.0.0.1 --port "$PORT" > "$R/vllm.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 180); do curl -sf "$BASE/health" >/dev/null && break; sleep 1; done
curl -sf "$BASE/health" >/dev/null || { echo "vLLM did not start; see $R/vllm.log"; exit 1; }

# Wire answers the simulator must copy.
ans() { curl -s -o /dev/null -w '%{http_code}' -X POST "$BASE/v1/$1" -H 'content-type: application/json' -d "$2"; }
body() { curl -s -X POST "$BASE/v1/$1" -H 'content-type: application/json' -d "$2"; }
check "load ok" "$(body load_lora_adapter "{\"lora_name\":\"probe\",\"lora_path\":\"$R/a1\"}")" "Success: LoRA adapter 'probe' added successfully."
check "load again 400" "$(ans load_lora_adapter "{\"lora_name\":\"probe\",\"lora_path\":\"$R/a1\"}")" "400"
check "missing path 404" "$(ans load_lora_adapter '{"lora_name":"ghost","lora_path":"/no/such"}')" "404"
check "rank too big 500" "$(ans load_lora_adapter "{\"lora_name\":\"big\",\"lora_path\":\"$R/too-big\"}")" "500"
check "unload ok" "$(body unload_lora_adapter '{"lora_name":"probe"}')" "Success: LoRA adapter 'probe' removed successfully."
check "unload unknown 404" "$(ans unload_lora_adapter '{"lora_name":"probe"}')" "404"

write_cfg() { # kubelet-style swap
  local n=$((${n:-0}+1)); n=$n
  local d="$R/config/..$(date +%s%N)"; mkdir -p "$d"; cat > "$d/configmap.yaml"
  ln -sfn "$(basename "$d")" "$R/config/..data_tmp" && mv -T "$R/config/..data_tmp" "$R/config/..data"
  [ -L "$R/config/configmap.yaml" ] || ln -s ..data/configmap.yaml "$R/config/configmap.yaml"
}
# cfg "id:dir id:dir" "id:dir": ensureExist and ensureNotExist lists.
list() {
  if [ -z "$1" ]; then echo "    models: []"; return; fi
  echo "    models:"
  for pair in $1; do echo "    - id: ${pair%%:*}"; echo "      source: $R/${pair#*:}"; done
}
cfg() { printf 'vLLMLoRAConfig:\n  host: 127.0.0.1\n  port: %s\n  ensureExist:\n' "$PORT"; list "$1"; echo "  ensureNotExist:"; list "$2"; }
ids() { curl -s "$BASE/v1/models" | python3 -c 'import json,sys; print(",".join(sorted(m["id"] for m in json.load(sys.stdin)["data"] if m["parent"])))'; }
wait_ids() { for _ in $(seq 1 200); do [ "$(ids)" = "$1" ] && break; sleep 0.05; done; check "$2" "$(ids)" "$1"; }

cfg "a1:a1" "" | write_cfg
target/debug/lora-sidecar --config "$R/config/configmap.yaml" --metrics-host 127.0.0.1 --metrics-port 0 \
  --reconcile-trigger 1s > "$R/sidecar.out" 2> "$R/sidecar.log" &
pids+=($!)
wait_ids "a1" "start with a1"
t0=$(date +%s%N); cfg "a1:a1 a2:a2" "" | write_cfg; wait_ids "a1,a2" "add a2"
echo "  swap -> listed: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
cfg "a2:a2" "a1:a1" | write_cfg; wait_ids "a2" "retire a1"
cfg "a2:a2 big:too-big" "a1:a1" | write_cfg
sleep 2
check "bad adapter does not block others" "$(ids)" "a2"
grep -q 'LoRA rank 16' "$R/sidecar.log" && echo "PASS rank error surfaced in logs" || { echo "FAIL rank error not in logs"; fail=1; }
exit $fail
