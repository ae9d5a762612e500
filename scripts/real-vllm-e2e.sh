#!/usr/bin/env bash
# Opt-in end to end against a REAL vLLM (CPU build, tiny local model, peft adapters); not in CI.
# Checks the sidecar's rollout story and the wire answers our simulator copies. Needs
# scripts/real-vllm-setup.sh first (~3 min, ~6 GB). Prints PASS/FAIL per step.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-vllm/bin/python ] && [ -d .real-vllm/tiny-llama ] || scripts/real-vllm-setup.sh
cargo build --locked --bin lora-sidecar --bin epp
scripts/install-envoy.sh >/dev/null
R=$PWD/.real-vllm
PORT=${PORT:-18123}
BASE=http://127.0.0.1:$PORT
rm -rf "$R/config" && mkdir -p "$R/config"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
fail=0
check() { if [ "$2" = "$3" ]; then echo "PASS $1"; else echo "FAIL $1: got [$2] want [$3]"; fail=1; fi; }

# start_vllm PORT LOG [ARGS...]: a tiny-Llama vLLM with runtime LoRA updates, up within 3 minutes.
start_vllm() {
  local port=$1 log=$2; shift 2
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=true VLLM_CPU_KVCACHE_SPACE=1 \
    .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model "$R/tiny-llama" \
    --served-model-name tiny-llama --dtype float32 --enable-lora --max-loras 2 --max-lora-rank 8 \
    --max-model-len 256 --host 127.0.0.1 --port "$port" "$@" > "$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 180); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && return; sleep 1; done
  echo "vLLM did not start; see $log"; exit 1
}
start_vllm "$PORT" "$R/vllm.log"

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

# LoRA fleet placement on real vLLM (docs/lora-fleet.md): a1 and a2 in the catalogue, nothing
# pinned. The EPP places both on the one server (one home each, no demand) and the sidecar
# loads them; demand does not change a one-server pool's homes, so the moves are driven by the
# ConfigMap: a2 moves to ensureNotExist (unloaded), comes back (loaded before it is routed).
kill "${pids[-1]}" 2>/dev/null || true
cat_cfg() { printf 'vLLMLoRAConfig:\n  host: 127.0.0.1\n  port: %s\n  onDemand:\n    models:\n' "$PORT"
  for pair in $1; do printf '    - id: %s\n      source: %s\n' "${pair%%:*}" "$R/${pair#*:}"; done
  printf '  ensureNotExist:\n'; list "${2:-}"; }
cat_cfg "a1:a1 a2:a2" | write_cfg
printf 'pool: {name: real}\nendpoints:\n- address: 127.0.0.1:%s\n' "$PORT" > "$R/pool.yaml"
# start_chain NAME POOL CATALOGUE SERVER_PORT [EPP FLAGS...]: an EPP placing CATALOGUE's
# adapters on POOL, the sidecar of the server on SERVER_PORT asking it, and an Envoy in front;
# sets EPP_GRPC, EPP_METRICS and GW (the gateway's port).
start_chain() {
  local name=$1 pool=$2 cat=$3 port=$4; shift 4
  target/debug/epp --bind-address 127.0.0.1 --grpc-port 0 --grpc-health-port 0 --metrics-port 0 \
    --pool-name "$name" --pool-file "$pool" --lora-catalog "$cat" --lora-placement-interval 500ms "$@" \
    > "$R/epp-$name.out" 2> "$R/epp-$name.log" &
  pids+=($!)
  for _ in $(seq 1 100); do grep -q EPP_LISTENING "$R/epp-$name.out" && break; sleep 0.1; done
  local epp; epp=$(grep EPP_LISTENING "$R/epp-$name.out")
  EPP_GRPC=$(echo "$epp" | sed -n 's/.*grpc=127.0.0.1:\([0-9]*\).*/\1/p')
  EPP_METRICS=$(echo "$epp" | sed -n 's/.*metrics=\([^ ]*\).*/\1/p')
  # shellcheck disable=SC2086 # SIDECAR_EXTRA: extra sidecar flags, split on spaces
  target/debug/lora-sidecar --config "$cat" --metrics-host 127.0.0.1 --metrics-port 0 \
    --reconcile-trigger 1s --placement-url "http://$EPP_METRICS/lora/v1/placement" \
    --placement-server "127.0.0.1:$port" --placement-interval 500ms ${SIDECAR_EXTRA:-} > "$R/sidecar-$name.out" 2> "$R/sidecar-$name.log" &
  pids+=($!)
  sed -e "s/\${LISTEN_PORT}/0/; s/\${EPP_PORT}/$EPP_GRPC/; s/\${BODY_MODE}/BUFFERED/; s/\${TRAILER_MODE}/SKIP/; s/\${FAILURE_MODE_ALLOW}/false/" \
    deploy/envoy/envoy-epp.yaml.tmpl > "$R/envoy-$name.yaml"
  rm -f "$R/envoy-$name.admin"
  .venv/bin/envoy -c "$R/envoy-$name.yaml" --use-dynamic-base-id --concurrency 1 -l warning \
    --admin-address-path "$R/envoy-$name.admin" > "$R/envoy-$name.log" 2>&1 &
  pids+=($!)
  GW=""
  for _ in $(seq 1 100); do
    [ -s "$R/envoy-$name.admin" ] && GW=$(curl -s "http://$(cat "$R/envoy-$name.admin")/listeners?format=json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["listener_statuses"][0]["local_address"]["socket_address"]["port_value"])' 2>/dev/null || true)
    [ -n "$GW" ] && break; sleep 0.1
  done
}
start_chain real "$R/pool.yaml" "$R/config/configmap.yaml" "$PORT"
# Catalogue adapters are served under versioned names (<id>@<tag>, docs/lora-fleet.md).
plain() { ids | sed -E 's/@[0-9a-f]{8}//g'; }
wait_ids() { for _ in $(seq 1 200); do [ "$(plain)" = "$1" ] && break; sleep 0.05; done; check "$2" "$(plain)" "$1"; }
# The EPP routes to a home once a model list it read after placing there lists the adapter.
wait_serving() { for _ in $(seq 1 100); do curl -s "http://$EPP_METRICS/metrics" | grep -q "inferlane_epp_lora_adapter_homes{adapter_name=\"$1\",state=\"serving\"} 1" && return; sleep 0.1; done; }
wait_ids "a1,a2" "placement: both catalogue adapters loaded"
wait_serving a1; wait_serving a2
failed=0
send() { for m in "$@"; do c=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GW/v1/completions" \
  -H 'content-type: application/json' -d "{\"model\":\"$m\",\"prompt\":\"hi\",\"max_tokens\":2}"); [ "$c" = 200 ] || failed=$((failed+1)); done; }
for _ in $(seq 1 10); do send a1 a2; done
cat_cfg "a1:a1 a2:a2" "a2:a2" | write_cfg; wait_ids "a1" "placement: a2 to ensureNotExist, unloaded"
for _ in $(seq 1 10); do send a1; done
cat_cfg "a1:a1 a2:a2" | write_cfg; wait_ids "a1,a2" "placement: a2 back, loaded"
wait_serving a2
for _ in $(seq 1 10); do send a1 a2; done
# A new source for a2 is a new version: loaded beside the old, switched to, the old unloaded;
# requests for a2 keep going throughout.
old=$(ids | tr ',' '\n' | grep '^a2@' || true)
cp -r "$R/a2" "$R/a2v2"
( for _ in $(seq 1 60); do curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$GW/v1/completions" \
    -H 'content-type: application/json' -d '{"model":"a2","prompt":"hi","max_tokens":2}'; sleep 0.1; done ) > "$R/swap.codes" &
swapper=$!
cat_cfg "a1:a1 a2:a2v2" | write_cfg
new=""
for _ in $(seq 1 300); do
  new=$(ids | tr ',' '\n' | grep '^a2@' || true)
  [ -n "$new" ] && [ "$new" != "$old" ] && [ "$(echo "$new" | wc -l)" = 1 ] && break; sleep 0.1
done
wait "$swapper"
check "placement: a2's new source served under a new name, the old one unloaded" \
  "$( [ -n "$new" ] && [ "$new" != "$old" ] && [ "$(echo "$new" | wc -l)" = 1 ] && echo yes)" "yes"
check "placement: no failed request through the version swap" "$(grep -vc '^200$' "$R/swap.codes")" "0"
check "placement: no failed request through the gateway" "$failed" "0"
check "placement: /v1/models through the gateway lists both" \
  "$(curl -s "http://127.0.0.1:$GW/v1/models" | python3 -c 'import json,sys; print(",".join(sorted(m["id"] for m in json.load(sys.stdin)["data"] if m["parent"])))')" "a1,a2"

# Demand moves an adapter between two real vLLM servers: a second server joins the pool; load
# on a1 spreads it there (its sidecar loads it before any request goes there), and once the
# load stops a1 shrinks back to one home: the other drains, then unloads it. No failed request.
PORT2=$((PORT + 1))
start_vllm "$PORT2" "$R/vllm2.log"
sed "s/port: $PORT\$/port: $PORT2/" "$R/config/configmap.yaml" > "$R/sidecar3.yaml"
target/debug/lora-sidecar --config "$R/sidecar3.yaml" --metrics-host 127.0.0.1 --metrics-port 0 \
  --reconcile-trigger 1s --placement-url "http://$EPP_METRICS/lora/v1/placement" \
  --placement-server "127.0.0.1:$PORT2" --placement-interval 500ms > "$R/sidecar3.out" 2> "$R/sidecar3.log" &
pids+=($!)
printf 'pool: {name: real}\nendpoints:\n- address: 127.0.0.1:%s\n- address: 127.0.0.1:%s\n' "$PORT" "$PORT2" > "$R/pool.yaml"
homes_a1() { n=0; for b in "$BASE" "http://127.0.0.1:$PORT2"; do
  curl -s "$b/v1/models" | grep -q '"id":"a1@' && n=$((n + 1)); done; echo $n; }
( for _ in $(seq 1 400); do [ -e "$R/stop" ] && break; curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$GW/v1/completions" \
    -H 'content-type: application/json' -d '{"model":"a1","prompt":"hi","max_tokens":2}'; done ) > "$R/demand.codes" &
loader=$!
for _ in $(seq 1 600); do [ "$(homes_a1)" = 2 ] && break; sleep 0.1; done
check "placement: demand on a1 loads it on the second server" "$(homes_a1)" "2"
touch "$R/stop"; wait "$loader"; rm -f "$R/stop"
for _ in $(seq 1 900); do [ "$(homes_a1)" = 1 ] && break; sleep 0.1; done
check "placement: demand gone, a1 drained and unloaded back to one home" "$(homes_a1)" "1"
check "placement: no failed request while a1 spread and shrank" "$(grep -vc '^200$' "$R/demand.codes")" "0"
echo "  a1 requests while spreading: $(wc -l < "$R/demand.codes")"

# Cold adapters through vLLM's LoRA resolver (--lora-cold-adapters resolver, docs/lora-fleet.md):
# a server with the filesystem resolver and three cache entries; placement caches r1-r3 there
# (sidecar loads, versioned names) and leaves r4 without a home. A request for r4 through the
# gateway is read by the resolver under its plain id; the EPP unloads that copy once done
# (placement may meanwhile give r4 a home: its demand now beats an idle adapter's), and the
# server keeps three placed adapters, all versioned. The resolver matches the adapter's
# base_model_name_or_path against --model, so the folder holds copies naming it.
rm -rf "$R/resolver" && mkdir -p "$R/resolver"
for a in r1 r2 r3 r4; do cp -r "$R/a1" "$R/resolver/$a"; done
python3 - "$R" <<'PY'
import glob, json, sys
for p in glob.glob(sys.argv[1] + "/resolver/*/adapter_config.json"):
    c = json.load(open(p)); c["base_model_name_or_path"] = sys.argv[1] + "/tiny-llama"; json.dump(c, open(p, "w"))
PY
PORT3=$((PORT + 2))
export VLLM_PLUGINS=lora_filesystem_resolver VLLM_LORA_RESOLVER_CACHE_DIR="$R/resolver"
start_vllm "$PORT3" "$R/vllm3.log" --max-cpu-loras 3
unset VLLM_PLUGINS VLLM_LORA_RESOLVER_CACHE_DIR
BASE3=http://127.0.0.1:$PORT3
{ printf 'vLLMLoRAConfig:\n  host: 127.0.0.1\n  port: %s\n  onDemand:\n    models:\n' "$PORT3"
  for a in r1 r2 r3 r4; do printf '    - id: %s\n      source: %s\n' "$a" "$R/resolver/$a"; done; } > "$R/resolver.yaml"
printf 'pool: {name: real3}\nendpoints:\n- address: 127.0.0.1:%s\n' "$PORT3" > "$R/pool3.yaml"
start_chain real3 "$R/pool3.yaml" "$R/resolver.yaml" "$PORT3" --lora-max-cpu-loras 3 --lora-cold-adapters resolver
# ids_at URL: the adapters a server lists; plain_at: without version tags.
ids_at() { curl -s "$1/v1/models" | python3 -c 'import json,sys; print(",".join(sorted(m["id"] for m in json.load(sys.stdin)["data"] if m["parent"])))'; }
plain_at() { ids_at "$1" | sed -E 's/@[0-9a-f]{8}//g'; }
# r4_thrice: the status codes of three requests for r4 through the gateway.
r4_thrice() { local c=""; for _ in 1 2 3; do c="$c$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GW/v1/completions" \
  -H 'content-type: application/json' -d '{"model":"r4","prompt":"hi","max_tokens":2}')"; done; echo "$c"; }
ids3() { ids_at "$BASE3"; }
plain3() { plain_at "$BASE3"; }
for _ in $(seq 1 300); do [ "$(plain3)" = "r1,r2,r3" ] && break; sleep 0.1; done
check "resolver: r1-r3 placed in the cache, r4 without a home" "$(plain3)" "r1,r2,r3"
check "resolver: requests for r4 served through its resolver" "$(r4_thrice)" "200200200"
unloads() { curl -s "http://$EPP_METRICS/metrics" | sed -n 's/^inferlane_epp_lora_on_demand_unloads_total \([0-9]*\).*/\1/p'; }
# Placed adapters carry a version tag (<id>@<tag>); the copy is the plain id.
copies3() { ids3 | tr ',' '\n' | grep -vc '@' || true; }
placed3() { ids3 | tr ',' '\n' | grep -c '@' || true; }
for _ in $(seq 1 200); do [ "$(unloads)" -ge 1 ] 2>/dev/null && [ "$(copies3)" = 0 ] && [ "$(placed3)" = 3 ] && break; sleep 0.1; done
check "resolver: the EPP unloaded r4's copy once done" "$( [ "$(unloads)" -ge 1 ] 2>/dev/null && [ "$(copies3)" = 0 ] && echo yes)" "yes"
check "resolver: the server keeps three placed adapters" "$(placed3)" "3"

# Versioned copies (--lora-copy-names versioned): this server's resolver folder holds only
# the links its sidecar makes (--lora-resolver-dir), one per catalogue adapter's served name
# (<id>@<tag> -> its source). r4, without a home, is read through its link under that name
# (no folder r4 exists: a request under the plain id could not be resolved), and the EPP
# unloads the copy once done.
rm -rf "$R/links" && mkdir -p "$R/links"
PORT4=$((PORT + 3))
export VLLM_PLUGINS=lora_filesystem_resolver VLLM_LORA_RESOLVER_CACHE_DIR="$R/links"
start_vllm "$PORT4" "$R/vllm4.log" --max-cpu-loras 3
unset VLLM_PLUGINS VLLM_LORA_RESOLVER_CACHE_DIR
BASE4=http://127.0.0.1:$PORT4
sed "s/port: $PORT3\$/port: $PORT4/" "$R/resolver.yaml" > "$R/versioned.yaml"
printf 'pool: {name: real4}\nendpoints:\n- address: 127.0.0.1:%s\n' "$PORT4" > "$R/pool4.yaml"
SIDECAR_EXTRA="--lora-resolver-dir $R/links" start_chain real4 "$R/pool4.yaml" "$R/versioned.yaml" "$PORT4" \
  --lora-max-cpu-loras 3 --lora-cold-adapters resolver --lora-copy-names versioned
links4() { find "$R/links" -maxdepth 1 -type l -name '*@*' -printf '%f\n' | sed -E 's/@[0-9a-f]{8}$//' | sort | paste -sd, -; }
for _ in $(seq 1 100); do [ "$(links4)" = "r1,r2,r3,r4" ] && break; sleep 0.1; done
check "versioned: the sidecar linked every catalogue adapter's served name" "$(links4)" "r1,r2,r3,r4"
# Its report (POST /lora/v1/links): the table shows the server lacking nothing.
lacks4() { curl -s "http://$EPP_METRICS/lora/v1/placement" | python3 -c 'import json,sys; t=json.load(sys.stdin); print(json.dumps([p.get("copy_names") for p in t["servers"].values()]))'; }
for _ in $(seq 1 100); do [ "$(lacks4)" = "[{}]" ] && break; sleep 0.1; done
check "versioned: the sidecar reported its links; the table shows nothing missing" "$(lacks4)" "[{}]"
ids4() { ids_at "$BASE4"; }
plain4() { plain_at "$BASE4"; }
for _ in $(seq 1 300); do [ "$(plain4)" = "r1,r2,r3" ] && break; sleep 0.1; done
check "versioned: r1-r3 placed in the cache, r4 without a home" "$(plain4)" "r1,r2,r3"
check "versioned: requests for r4 served through its resolver's link" "$(r4_thrice)" "200200200"
grep -q "r4@" "$R/vllm4.log" && echo "PASS versioned: vLLM resolved r4 under its served name" || { echo "FAIL versioned: no r4@ in $R/vllm4.log"; fail=1; }
# Copies and homes share names now: what the server lists must be the table's homes (r4 may
# have gained one from its demand, and an idle adapter drained to make room).
homes4() { curl -s "http://$EPP_METRICS/lora/v1/placement" | python3 -c 'import json,sys; t=json.load(sys.stdin); print(",".join(sorted(t["served"][i] for p in t["servers"].values() for i in p["homes"])))'; }
for _ in $(seq 1 300); do [ "$(unloads)" -ge 1 ] 2>/dev/null && [ "$(ids4)" = "$(homes4)" ] && break; sleep 0.1; done
check "versioned: the EPP unloaded r4's copy once done; the server lists its homes only" "$( [ "$(unloads)" -ge 1 ] 2>/dev/null && [ "$(ids4)" = "$(homes4)" ] && echo yes)" "yes"
exit $fail
