#!/usr/bin/env bash
# Idle connection cost: for each transport, start a fresh gateway, hold N idle connections with heartbeats on,
# and print the load generator's RESULT line (server RSS delta per connection, server CPU while idle).
# Usage: benches/scripts/idle-memory.sh [N] [PROCS] [HOLD]   (defaults 10000 2 10s)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10000}; PROCS=${2:-2}; HOLD=${3:-10s}
cargo build --release --locked --bin corelay --bin corelay-load >/dev/null
for transport in ws sse longpoll; do
  data=$(mktemp -d); log=$(mktemp)
  ./target/release/corelay run --listen 127.0.0.1:0 --data-dir "$data" --auth-secret bench --api-key bench \
    --echo-path /echo >"$log" 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$log" && break; sleep 0.1; done
  addr=$(grep -oE 'listening on [0-9.:]+' "$log" | awk '{print $3}')
  case $transport in
    ws) url="ws://$addr/echo"; extra=() ;;
    sse) url="http://$addr/sse?channels=bench:idle"; extra=(--token-secret bench) ;;
    longpoll) url="http://$addr/poll?channels=bench:idle&cursor=bench:idle%3D0&timeout=60"; extra=(--token-secret bench) ;;
  esac
  ./target/release/corelay-load idle --quiet --transport "$transport" --url "$url" --connections "$N" \
    --procs "$PROCS" --server-pid "$pid" --hold "$HOLD" "${extra[@]}" | grep '^RESULT'
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$data" "$log"
done
