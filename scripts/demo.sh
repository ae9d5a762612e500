#!/usr/bin/env bash
# The README's main command: a local fleet of vllm-sim servers with adapters, sample requests, metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bins
BIN=target/release
DEMO=.demo
rm -rf "$DEMO" && mkdir -p "$DEMO/adapters"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Adapter directories as vLLM expects them (peft layout).
for a in food-review-1 food-review-2; do
  mkdir -p "$DEMO/adapters/$a"
  echo '{"peft_type":"LORA","r":8,"lora_alpha":16}' > "$DEMO/adapters/$a/adapter_config.json"
  printf 'weights' > "$DEMO/adapters/$a/adapter_model.safetensors"
done

start_sim() { # name, extra flags...
  local name=$1; shift
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=true "$BIN/vllm-sim" --host 127.0.0.1 --port 0 \
    --enable-lora --max-loras 2 --max-num-seqs 8 "$@" >"$DEMO/$name.out" 2>"$DEMO/$name.log" &
  pids+=($!)
  for _ in $(seq 1 100); do
    addr=$(sed -n 's/^VLLM_SIM_LISTENING //p' "$DEMO/$name.out")
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "vllm-sim $name did not start; see $DEMO/$name.log" >&2; exit 1
}

declare -A SIMS
for i in 1 2 3; do SIMS[sim$i]=$(start_sim "sim$i"); done
echo "fleet: ${SIMS[*]}"

echo "== load food-review-1 on sim1 and sim2 through vLLM's runtime LoRA API"
for s in sim1 sim2; do
  curl -sS -X POST "http://${SIMS[$s]}/v1/load_lora_adapter" -H 'content-type: application/json' \
    -d "{\"lora_name\":\"food-review-1\",\"lora_path\":\"$PWD/$DEMO/adapters/food-review-1\"}"; echo
done
echo "== /v1/models on sim1"
curl -sS "http://${SIMS[sim1]}/v1/models" | python3 -c 'import json,sys; [print("  ", m["id"], "parent=", m["parent"], "root=", m["root"]) for m in json.load(sys.stdin)["data"]]'
echo "== chat completion for the adapter"
curl -sS "http://${SIMS[sim1]}/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"food-review-1","messages":[{"role":"user","content":"Review: the soup was cold."}],"max_tokens":8}'; echo
echo "== streaming chat with usage"
curl -sSN "http://${SIMS[sim2]}/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}'
echo "== an unknown adapter on sim3 (never loaded there)"
curl -sS "http://${SIMS[sim3]}/v1/completions" -H 'content-type: application/json' -d '{"model":"food-review-1","prompt":"x"}'; echo
echo "== routing-relevant metrics of sim1"
curl -sS "http://${SIMS[sim1]}/metrics" | grep -E '^vllm:(num_requests_(running|waiting)|kv_cache_usage_perc|lora_requests_info|prefix_cache_hits_total)'
echo "demo done; logs in $DEMO/"
