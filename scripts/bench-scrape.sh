#!/usr/bin/env bash
# EPP scrape cost: a 100-replica vllm-sim fleet, the EPP scraping it with no traffic; prints the
# EPP's user and system CPU (cores) over SECS. Usage: scripts/bench-scrape.sh [EPP_BIN] [SECS] [epp args...]
set -euo pipefail
cd "$(dirname "$0")/.."
EPP=${1:-target/release/epp}; SECS=${2:-12}; shift 2 || true
SIM=${SIM:-target/release/vllm-sim}
W=$(mktemp -d)
"$SIM" --host 127.0.0.1 --port 0 --replicas 100 --log-filter warn > "$W/sim.out" 2>/dev/null &
SP=$!; EP=
trap 'kill $SP $EP 2>/dev/null; rm -rf "$W"' EXIT
for _ in $(seq 300); do [ "$(grep -c LISTENING "$W/sim.out" || true)" = 100 ] && break; sleep 0.1; done
{ echo "endpoints:"; sed -n 's/^VLLM_SIM_LISTENING /- address: /p' "$W/sim.out"; } > "$W/pool.yaml"
"$EPP" --bind-address 127.0.0.1 --grpc-port 0 --grpc-health-port 0 --metrics-port 0 \
  --pool-file "$W/pool.yaml" --log-filter warn "$@" > "$W/epp.out" 2> "$W/epp.log" &
EP=$!
for _ in $(seq 100); do grep -q EPP_LISTENING "$W/epp.out" && break; sleep 0.1; done
sleep 2 # let every endpoint's first scrape and connection happen before measuring
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$EP/stat)
sleep "$SECS"
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$EP/stat)
tck=$(getconf CLK_TCK)
python3 -c "print(f'EPP scrape CPU, 100 endpoints: user {($u1-$u0)/$tck/$SECS:.3f} sys {($s1-$s0)/$tck/$SECS:.3f} total {($u1-$u0+$s1-$s0)/$tck/$SECS:.3f} cores')"
echo "scrape failures logged: $(grep -c 'scrape failed' "$W/epp.log" || true)"
