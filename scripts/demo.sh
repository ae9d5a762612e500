#!/usr/bin/env bash
# The README's main command: three vllm-sim servers, each with a lora-sidecar, the EPP and a
# real Envoy; sends the seeds' requests through Envoy and shows where each one went.
# --observe: also starts Prometheus (Debian's, project-local) scraping the EPP and the sidecars
# with deploy/observability/rules.yaml, and prints links to graphs of the demo's traffic; it
# keeps running until Ctrl-C (or DEMO_OBSERVE_SECONDS).
set -euo pipefail
cd "$(dirname "$0")/.."
OBSERVE=""
for a in "$@"; do
  case "$a" in
    --observe) OBSERVE=1 ;;
    *) echo "usage: scripts/demo.sh [--observe]" >&2; exit 2 ;;
  esac
done
scripts/install-envoy.sh >/dev/null
[ -n "$OBSERVE" ] && scripts/install-prometheus.sh >/dev/null
cargo build --release --locked --bins 2>&1 | tail -1
BIN=$PWD/target/release
DEMO=$PWD/.demo
rm -rf "$DEMO" && mkdir -p "$DEMO/adapters"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
BASE=meta-llama/Llama-3.1-8B-Instruct

wait_line() { # file prefix -> rest of the first line starting with prefix
  for _ in $(seq 1 300); do
    local v; v=$(sed -n "s/^$2 //p" "$1" | head -1)
    [ -n "$v" ] && { echo "$v"; return; }
    sleep 0.1
  done
  echo "no '$2' in $1; see the logs in $DEMO" >&2; exit 1
}

# Adapter directories as peft writes them.
for a in food-review-1 food-review-2; do
  mkdir -p "$DEMO/adapters/$a"
  echo '{"peft_type":"LORA","r":8,"lora_alpha":16}' > "$DEMO/adapters/$a/adapter_config.json"
  printf 'weights' > "$DEMO/adapters/$a/adapter_model.safetensors"
done

echo "== 1. three model servers (vllm-sim, 8 sequences each, 2 LoRA slots)"
SIMS=()
for i in 1 2 3; do
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=true "$BIN/vllm-sim" --host 127.0.0.1 --port 0 --enable-lora \
    --max-loras 2 --max-num-seqs 8 --time-scale 0.2 --seed "$i" >"$DEMO/sim$i.out" 2>"$DEMO/sim$i.log" &
  pids+=($!)
  SIMS+=("$(wait_line "$DEMO/sim$i.out" VLLM_SIM_LISTENING)")
done
echo "   ${SIMS[*]}"

echo "== 2. a lora-sidecar per server, each watching its ConfigMap-style directory"
SIDECARS=()
for i in 1 2 3; do
  port=${SIMS[$((i-1))]##*:}
  mkdir -p "$DEMO/config$i/..v1"
  {
    echo "vLLMLoRAConfig:"
    echo "  name: demo-$i"
    echo "  host: 127.0.0.1"
    echo "  port: $port"
    echo "  defaultBaseModel: $BASE"
    echo "  ensureExist:"
    echo "    models:"
    echo "    - id: food-review-1"
    echo "      source: $DEMO/adapters/food-review-1"
    if [ "$i" != 3 ]; then
      echo "    - id: food-review-2"
      echo "      source: $DEMO/adapters/food-review-2"
    fi
  } > "$DEMO/config$i/..v1/configmap.yaml"
  ln -s ..v1 "$DEMO/config$i/..data"
  ln -s ..data/configmap.yaml "$DEMO/config$i/configmap.yaml"
  "$BIN/lora-sidecar" --config "$DEMO/config$i/configmap.yaml" --metrics-host 127.0.0.1 --metrics-port 0 \
    >"$DEMO/sidecar$i.out" 2>"$DEMO/sidecar$i.log" &
  pids+=($!)
  status=$(wait_line "$DEMO/sidecar$i.out" LORA_SIDECAR_LISTENING)
  SIDECARS+=("$status")
  for _ in $(seq 1 100); do curl -sf "http://$status/readyz" >/dev/null && break; sleep 0.1; done
  echo "   sidecar $i ready: $(curl -s "http://$status/readyz")"
done

echo "== 3. the EPP (standalone pool file) and Envoy in front"
cat > "$DEMO/pool.yaml" <<EOF
pool: {name: vllm-llama3-8b-instruct}
endpoints:
$(for s in "${SIMS[@]}"; do echo "- address: $s"; done)
models:
- modelName: food-review
  criticality: Standard
  targetModels:
  - {name: food-review-1, weight: 90}
  - {name: food-review-2, weight: 10}
- modelName: batch-summaries
  criticality: Sheddable
  targetModels:
  - {name: $BASE}
EOF
"$BIN/epp" --bind-address 127.0.0.1 --grpc-port 0 --grpc-health-port 0 --metrics-port 0 \
  --pool-name vllm-llama3-8b-instruct --pool-file "$DEMO/pool.yaml" >"$DEMO/epp.out" 2>"$DEMO/epp.log" &
pids+=($!)
EPP=$(wait_line "$DEMO/epp.out" EPP_LISTENING)
EPP_GRPC=$(echo "$EPP" | sed -n 's/.*grpc=127.0.0.1:\([0-9]*\).*/\1/p')
EPP_METRICS=$(echo "$EPP" | sed -n 's/.*metrics=\([^ ]*\).*/\1/p')
sed -e "s/\${LISTEN_PORT}/0/; s/\${EPP_PORT}/$EPP_GRPC/; s/\${BODY_MODE}/BUFFERED/; s/\${TRAILER_MODE}/SKIP/; s/\${FAILURE_MODE_ALLOW}/false/" \
  deploy/envoy/envoy-epp.yaml.tmpl > "$DEMO/envoy.yaml"
.venv/bin/envoy -c "$DEMO/envoy.yaml" --use-dynamic-base-id --concurrency 1 -l warning \
  --admin-address-path "$DEMO/envoy.admin" >"$DEMO/envoy.log" 2>&1 &
pids+=($!)
GW=""
for _ in $(seq 1 100); do
  if [ -s "$DEMO/envoy.admin" ]; then
    GW=$(curl -s "http://$(cat "$DEMO/envoy.admin")/listeners?format=json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["listener_statuses"][0]["local_address"]["socket_address"]["port_value"])' 2>/dev/null || true)
    [ -n "$GW" ] && break
  fi
  sleep 0.1
done
[ -n "$GW" ] || { echo "Envoy did not start; see $DEMO/envoy.log" >&2; exit 1; }
GW=http://127.0.0.1:$GW
for _ in $(seq 1 100); do
  curl -s "http://$EPP_METRICS/metrics" | grep -q 'inference_pool_ready_pods{name="vllm-llama3-8b-instruct"} 3' && break
  sleep 0.1
done
echo "   EPP $EPP, gateway $GW"

if [ -n "$OBSERVE" ]; then
  echo "== Prometheus (scraping the EPP and the sidecars every second, with deploy/observability/rules.yaml)"
  PROM_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cp deploy/observability/rules.yaml "$DEMO/rules.yaml"
  {
    echo "global: {scrape_interval: 1s, evaluation_interval: 1s}"
    echo "rule_files: [rules.yaml]"
    echo "scrape_configs:"
    echo "- job_name: inferlane-epp"
    echo "  static_configs: [{targets: ['$EPP_METRICS']}]"
    echo "- job_name: lora-sidecar"
    echo "  static_configs: [{targets: [$(printf "'%s'," "${SIDECARS[@]}" | sed 's/,$//')]}]"
  } > "$DEMO/prometheus.yaml"
  .prometheus/usr/bin/prometheus --config.file "$DEMO/prometheus.yaml" --storage.tsdb.path "$DEMO/prometheus-data" \
    --web.listen-address "127.0.0.1:$PROM_PORT" --web.local-assets "$PWD/.prometheus/usr/share/prometheus/web/" \
    --web.console.templates "$PWD/.prometheus/etc/prometheus/consoles" \
    --web.console.libraries "$PWD/.prometheus/etc/prometheus/console_libraries" >"$DEMO/prometheus.log" 2>&1 &
  pids+=($!)
  PROM=http://127.0.0.1:$PROM_PORT
  for _ in $(seq 1 100); do curl -sf "$PROM/-/ready" >/dev/null && break; sleep 0.1; done
  # Two scrapes before the traffic, so every counter starts from a sample.
  sleep 2
  echo "   $PROM"
fi

stats() { # prints per-server requests by model
  for i in 1 2 3; do
    printf '   server %s (%s): ' "$i" "${SIMS[$((i-1))]}"
    curl -s "http://${SIMS[$((i-1))]}/sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests_by_model"])'
  done
}

echo "== 4. the base model, 12 requests through the gateway"
for n in $(seq 1 12); do
  curl -s -o /dev/null -w '%{http_code} ' "$GW/v1/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"$BASE\",\"prompt\":\"Tell me about request $n\",\"max_tokens\":4}"
done; echo; stats

echo "== 5. food-review: 100 requests split 90/10 between food-review-1 and food-review-2 (food-review-2 is not on server 3)"
for n in $(seq 1 100); do
  curl -s -o /dev/null "$GW/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"food-review\",\"messages\":[{\"role\":\"user\",\"content\":\"Review $n: the soup was cold\"}],\"max_tokens\":2}"
  # Observed: paced over ~10 s, so the graphs show the split growing, not one step.
  [ -n "$OBSERVE" ] && sleep 0.1
done
stats
echo "   a response names the adapter that served it (as vLLM and upstream; --restore-model-name gives the client's name):"
curl -s "$GW/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"food-review","messages":[{"role":"user","content":"Is the pasta good?"}],"max_tokens":6}' | python3 -c 'import json,sys; r=json.load(sys.stdin); print("   model:", r["model"], "| reply:", r["choices"][0]["message"]["content"])'

echo "== 6. streaming (SSE) through the gateway, usage included"
curl -sN "$GW/v1/chat/completions" -H 'content-type: application/json' \
  -d "{\"model\":\"$BASE\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":3,\"stream\":true,\"stream_options\":{\"include_usage\":true}}" | sed 's/^/   /'

echo "== 7. bad requests get a 4xx with a message (bad JSON, no model, a model nobody serves)"
curl -s -w '  (%{http_code})\n' "$GW/v1/completions" -d '{not json' | sed 's/^/   /'
curl -s -w '  (%{http_code})\n' "$GW/v1/completions" -d '{"prompt":"no model"}' | sed 's/^/   /'
curl -s -w '  (%{http_code})\n' "$GW/v1/completions" -d '{"model":"nobody-serves-this","prompt":"x"}' | sed 's/^/   /'

echo "== 8. saturate the pool, then send sheddable (batch-summaries) and critical work"
fill=()
for s in "${SIMS[@]}"; do
  for _ in $(seq 1 16); do
    curl -s -o /dev/null "http://$s/v1/completions" -d "{\"model\":\"$BASE\",\"prompt\":\"fill\",\"max_tokens\":1000}" &
    fill+=($!)
  done
done
# Wait until every server reports a queue above the EPP's threshold (5).
for s in "${SIMS[@]}"; do
  for _ in $(seq 1 100); do
    q=$(curl -s "http://$s/metrics" | awk '/^vllm:num_requests_waiting\{/ {print int($2)}')
    [ "${q:-0}" -ge 6 ] && break
    sleep 0.05
  done
done
sleep 0.1 # one scrape interval, so the EPP has seen it
echo "   sheddable: $(curl -s -w ' (%{http_code})' "$GW/v1/completions" -d '{"model":"batch-summaries","prompt":"summarize","max_tokens":2}')"
echo "   critical:  $(curl -s -o /dev/null -w '%{http_code}' "$GW/v1/completions" -d "{\"model\":\"$BASE\",\"prompt\":\"urgent\",\"max_tokens\":2}") (queued behind the load, still served)"
wait "${fill[@]}" 2>/dev/null || true

echo "== 9. EPP metrics (excerpt)"
curl -s "http://$EPP_METRICS/metrics" | grep -E '^inference_(objective_request_total|objective_request_error_total|pool_ready_pods|extension_picks_total)' | sed 's/^/   /'
echo "demo done; logs in .demo/"

if [ -n "$OBSERVE" ]; then
  sleep 2 # the last scrape
  link() { python3 -c 'import sys, urllib.parse; print(sys.argv[1] + "/graph?" + urllib.parse.urlencode({"g0.expr": sys.argv[2], "g0.tab": "0", "g0.range_input": "1m", "g0.stacked": "0"}))' "$PROM" "$1"; }
  echo "== Graphs of the demo's traffic (Prometheus at $PROM)"
  echo "   food-review split per target model (90/10):"
  echo "     $(link 'sum by (target_model_name) (inference_objective_request_total{model_name="food-review"})')"
  echo "   picks per model server:"
  echo "     $(link 'sum by (endpoint) (inference_extension_picks_total)')"
  echo "   errors by code (the 429s of step 8, the 400/404s of step 7):"
  echo "     $(link 'sum by (error_code) (inference_objective_request_error_total)')"
  echo "   adapters loaded per sidecar:"
  echo "     $(link 'sum by (instance) (lora_syncer_adapter_status)')"
  echo "   alerts: $PROM/alerts   rules: $PROM/rules   Grafana: import deploy/observability/grafana-dashboard.json"
  if [ -n "${DEMO_OBSERVE_SECONDS:-}" ]; then
    sleep "$DEMO_OBSERVE_SECONDS"
  else
    echo "   (Ctrl-C stops the demo and Prometheus)"
    while true; do sleep 3600; done
  fi
fi
