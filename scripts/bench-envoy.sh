#!/usr/bin/env bash
# Load run through a real Envoy: Envoy direct (client sets the destination header) vs Envoy +
# EPP (BUFFERED and FULL_DUPLEX_STREAMED; BUFFERED again with flow control on) vs Envoy + extproc-floor (no routing work, on the
# EPP's serving stack and straight on h2), same upstream fleet, same run. Prints a Markdown table with req/s,
# latency percentiles and ext_proc CPU per request. Needs wrk (apt-get install wrk).
# Usage: scripts/bench-envoy.sh [seconds=10] [connections=16] [body_bytes=110]
# Env: UPSTREAMS (default 4) simulated servers; VARY=1 makes every prompt distinct (fills the
# prefix index); EPP_ARGS adds EPP flags (e.g. "--worker-threads 1"); BIN_DIR uses prebuilt
# binaries (e.g. a profiling build) instead of building target/release; PLAIN=1 serves ext_proc
# without TLS (--secure-serving=false) to show what TLS costs. EPP CPU per request subtracts
# the EPP's idle (scraping) CPU measured first.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}; CONN=${2:-16}; BODY_BYTES=${3:-110}; UPSTREAMS=${UPSTREAMS:-4}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }
scripts/install-envoy.sh >/dev/null
if [ -z "${BIN_DIR:-}" ]; then cargo build --release --locked --bin epp --bin vllm-sim --bin extproc-floor 2>&1 | tail -1; fi
B=${BIN_DIR:-target/release}
W=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT

# Instant servers (time-scale 0): the run measures the gateway, not the model.
"$B/vllm-sim" --host 127.0.0.1 --port 0 --replicas "$UPSTREAMS" --time-scale 0 --default-max-tokens 1 --max-model-len 1000000 --num-gpu-blocks 200000 >"$W/sim.out" 2>"$W/sim.log" &
pids+=($!)
for _ in $(seq 300); do [ "$(grep -c LISTENING "$W/sim.out" || true)" = "$UPSTREAMS" ] && break; sleep 0.1; done
mapfile -t SIMS < <(sed -n 's/^VLLM_SIM_LISTENING //p' "$W/sim.out")
{ echo "pool: {name: bench}"; echo "endpoints:"; for s in "${SIMS[@]}"; do echo "- address: $s"; done; } >"$W/pool.yaml"

"$B/epp" --bind-address 127.0.0.1 --grpc-port 0 --grpc-health-port 0 --metrics-port 0 \
  --pool-file "$W/pool.yaml" --log-filter warn ${PLAIN:+--secure-serving=false} ${EPP_ARGS:-} >"$W/epp.out" 2>"$W/epp.log" &
EPP_PID=$!; pids+=($EPP_PID)
echo "$EPP_PID" > "${EPP_PID_FILE:-/dev/null}"
for _ in $(seq 100); do grep -q EPP_LISTENING "$W/epp.out" && break; sleep 0.1; done
EPP_PORT=$(sed -n 's/.*grpc=127.0.0.1:\([0-9]*\).*/\1/p' "$W/epp.out")

# The same EPP with flow control on (featureGates: [flowControl]), measured below saturation:
# the instant servers make a 16-connection run look like a deep queue to a 1-request
# queueDepthThreshold, so the threshold is raised; what is measured is the admission path's
# cost when nothing has to wait (the common case), not holding.
printf 'featureGates: [flowControl]\nsaturationDetector: {queueDepthThreshold: 1000}\n' >"$W/flow.yaml"
"$B/epp" --bind-address 127.0.0.1 --grpc-port 0 --grpc-health-port 0 --metrics-port 0 \
  --pool-file "$W/pool.yaml" --config-file "$W/flow.yaml" --log-filter warn ${PLAIN:+--secure-serving=false} ${EPP_ARGS:-} >"$W/epp-flow.out" 2>"$W/epp-flow.log" &
FLOW_PID=$!; pids+=($FLOW_PID)
for _ in $(seq 100); do grep -q EPP_LISTENING "$W/epp-flow.out" && break; sleep 0.1; done
FLOW_PORT=$(sed -n 's/.*grpc=127.0.0.1:\([0-9]*\).*/\1/p' "$W/epp-flow.out")

# The floors (in-run baselines): the same message pattern with no routing work, on the EPP's
# serving stack (tonic) and straight on the h2 crate.
FLOOR_ENDPOINTS=$(IFS=,; echo "${SIMS[*]}")
start_floor() { # stack -> sets FLOOR_PID, FLOOR_PORT
  "$B/extproc-floor" --stack "$1" --endpoints "$FLOOR_ENDPOINTS" ${PLAIN:+--secure-serving=false} \
    --log-filter warn >"$W/floor-$1.out" 2>"$W/floor-$1.log" &
  FLOOR_PID=$!; pids+=($FLOOR_PID)
  for _ in $(seq 100); do grep -q FLOOR_LISTENING "$W/floor-$1.out" && break; sleep 0.1; done
  FLOOR_PORT=$(sed -n 's/.*grpc=127.0.0.1:\([0-9]*\).*/\1/p' "$W/floor-$1.out")
}
start_floor tonic; TONIC_PID=$FLOOR_PID; TONIC_PORT=$FLOOR_PORT
start_floor h2; H2_PID=$FLOOR_PID; H2_PORT=$FLOOR_PORT

start_envoy() { # name template body_mode trailer_mode [ext_proc port] -> sets PORT
  local n=$1
  sed -e "s/\${LISTEN_PORT}/0/; s/\${EPP_PORT}/${5:-$EPP_PORT}/; s/\${BODY_MODE}/$3/; s/\${TRAILER_MODE}/$4/; s/\${FAILURE_MODE_ALLOW}/false/" \
    "deploy/envoy/$2" >"$W/$n.yaml"
  # PLAIN=1: the EPP serves plain-text gRPC (--secure-serving=false), so drop Envoy's TLS block.
  [ -n "${PLAIN:-}" ] && python3 - "$W/$n.yaml" <<'PY'
import re, sys
p = sys.argv[1]; s = open(p).read()
s = re.sub(r"\n    # The EPP serves TLS.*?alpn_protocols: \[\"h2\"\]", "", s, flags=re.S)
open(p, "w").write(s)
PY
  .venv/bin/envoy -c "$W/$n.yaml" --use-dynamic-base-id --concurrency 1 -l error \
    --admin-address-path "$W/$n.admin" >"$W/$n.log" 2>&1 &
  pids+=($!); echo $! >"$W/$n.pid"
  for _ in $(seq 100); do
    if [ -s "$W/$n.admin" ]; then
      port=$(curl -s "http://$(cat "$W/$n.admin")/listeners?format=json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["listener_statuses"][0]["local_address"]["socket_address"]["port_value"])' 2>/dev/null || true)
      [ -n "$port" ] && { PORT=$port; return; }
    fi
    sleep 0.1
  done
  echo "envoy $n did not start" >&2; exit 1
}
start_envoy direct envoy-direct.yaml.tmpl BUFFERED SKIP; DIRECT=$PORT
start_envoy buffered envoy-epp.yaml.tmpl BUFFERED SKIP; BUF=$PORT
start_envoy duplex envoy-epp.yaml.tmpl FULL_DUPLEX_STREAMED SEND; DUPLEX=$PORT
start_envoy tonic-buffered envoy-epp.yaml.tmpl BUFFERED SKIP "$TONIC_PORT"; TONIC_BUF=$PORT
start_envoy tonic-duplex envoy-epp.yaml.tmpl FULL_DUPLEX_STREAMED SEND "$TONIC_PORT"; TONIC_DUPLEX=$PORT
start_envoy h2-buffered envoy-epp.yaml.tmpl BUFFERED SKIP "$H2_PORT"; H2_BUF=$PORT
start_envoy h2-duplex envoy-epp.yaml.tmpl FULL_DUPLEX_STREAMED SEND "$H2_PORT"; H2_DUPLEX=$PORT
start_envoy flow-buffered envoy-epp.yaml.tmpl BUFFERED SKIP "$FLOW_PORT"; FLOW_BUF=$PORT

# A chat body of about BODY_BYTES bytes; the direct run rotates the destination header itself.
python3 - "$BODY_BYTES" >"$W/body.json" <<'PY'
import json, sys
n = int(sys.argv[1])
b = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": ""}], "max_tokens": 1}
pad = max(0, n - len(json.dumps(b)))
b["messages"][0]["content"] = ("hello world " * (pad // 12 + 1))[:pad]
print(json.dumps(b), end="")
PY
cat >"$W/post.lua" <<LUA
local f = io.open("$W/body.json"); local body = f:read("*a"); f:close()
local sims = { $(printf '"%s",' "${SIMS[@]}") }
local i = 0
request = function()
  i = i + 1
  local h = { ["content-type"] = "application/json" }
  if os.getenv("DIRECT") then h["x-gateway-destination-endpoint"] = sims[(i % #sims) + 1] end
  if os.getenv("VARY") then
    return wrk.format("POST", "/v1/chat/completions", h, string.gsub(body, '"content": "', '"content": "' .. i .. math.random(1000000) .. ' ', 1))
  end
  return wrk.format("POST", "/v1/chat/completions", h, body)
end
LUA

ticks() { awk '{print $14+$15}' "/proc/${1:-$EPP_PID}/stat"; }
sys_ticks() { awk '{print $15}' "/proc/$1/stat"; }
# The EPP's own cost while idle: scraping every endpoint every 50 ms.
sleep 1
i0=$(ticks); f0=$(ticks "$FLOW_PID"); sleep "$DUR"; i1=$(ticks); f1=$(ticks "$FLOW_PID")
IDLE_TPS=$(python3 -c "print(($i1-$i0)/$DUR)")
FLOW_IDLE_TPS=$(python3 -c "print(($f1-$f0)/$DUR)")
run() { # label port direct? envoy-name [ext_proc pid] [its idle ticks/s]
  local epid; epid=$(cat "$W/$4.pid")
  local xpid=${5:-$EPP_PID} idle=${6:-$IDLE_TPS}
  local t0; t0=$(ticks "$xpid"); local e0; e0=$(ticks "$epid"); local s0; s0=$(sys_ticks "$xpid")
  local out; out=$(DIRECT=$3 wrk -t1 -c"$CONN" -d"${DUR}s" --latency -s "$W/post.lua" "http://127.0.0.1:$2" 2>&1)
  local t1; t1=$(ticks "$xpid"); local e1; e1=$(ticks "$epid"); local s1; s1=$(sys_ticks "$xpid")
  local rps; rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  local reqs; reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  local p50; p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  local p99; p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  local non2xx; non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  local cpu_us="-" sys_us="-"
  [ -z "$3" ] && { cpu_us=$(python3 -c "print(round(max(0, ($t1-$t0) - $idle*$DUR)*10000/max(1,$reqs),1))"); sys_us=$(python3 -c "print(round(($s1-$s0)*10000/max(1,$reqs),1))"); }
  local envoy_us; envoy_us=$(python3 -c "print(round(($e1-$e0)*10000/max(1,$reqs),1))")
  echo "| $1 | $rps | $p50 | $p99 | ${non2xx:-0} | $envoy_us | $cpu_us | $sys_us |"
  echo "$rps" >"$W/$1.rps"; echo "$cpu_us" >"$W/$1.cpu"
}
echo "Envoy 1.40, ${CONN} connections, ${DUR} s each, ${BODY_BYTES}-byte chat bodies${VARY:+ (distinct prompts)}, ${UPSTREAMS} upstreams (vllm-sim --time-scale 0)"
echo "EPP idle (scraping ${UPSTREAMS} endpoints every 50 ms): $(python3 -c "print(round($IDLE_TPS/100, 3))") cores"
echo
echo "| setup | req/s | p50 | p99 | non-2xx | Envoy CPU us/req | ext_proc CPU us/req | of which kernel |"
echo "|---|---|---|---|---|---|---|---|"
run envoy-direct "$DIRECT" 1 direct
run envoy+epp-buffered "$BUF" "" buffered
run envoy+epp-flow-control-buffered "$FLOW_BUF" "" flow-buffered "$FLOW_PID" "$FLOW_IDLE_TPS"
run envoy+epp-full-duplex "$DUPLEX" "" duplex
run envoy+floor-tonic-buffered "$TONIC_BUF" "" tonic-buffered "$TONIC_PID" 0
run envoy+floor-tonic-full-duplex "$TONIC_DUPLEX" "" tonic-duplex "$TONIC_PID" 0
run envoy+floor-h2-buffered "$H2_BUF" "" h2-buffered "$H2_PID" 0
run envoy+floor-h2-full-duplex "$H2_DUPLEX" "" h2-duplex "$H2_PID" 0
echo
echo "EPP resident memory after the runs: $(awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$EPP_PID/status"), peak $(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' "/proc/$EPP_PID/status")"
python3 - "$W" <<'PY'
import sys
w = sys.argv[1]
d = float(open(f"{w}/envoy-direct.rps").read())
for m in ["envoy+epp-buffered", "envoy+epp-full-duplex"]:
    r = float(open(f"{w}/{m}.rps").read())
    print(f"\n{m}: {100*r/d:.0f}% of Envoy direct (target >= 45%)", end="")
print()
for mode in ["buffered", "full-duplex"]:
    cpu = lambda name: float(open(f"{w}/envoy+{name}-{mode}.cpu").read())
    e, f, h = cpu("epp"), cpu("floor-tonic"), cpu("floor-h2")
    print(f"{mode}: EPP {e} us/req = tonic floor {f} + routing work {e - f:.1f}; h2 floor {h}")
fc = float(open(f"{w}/envoy+epp-flow-control-buffered.cpu").read())
eb = float(open(f"{w}/envoy+epp-buffered.cpu").read())
print(f"flow control on (below saturation), buffered: EPP {fc} us/req vs {eb} off = {fc - eb:+.1f} us (target within 5)")
PY
