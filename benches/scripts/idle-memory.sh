#!/usr/bin/env bash
# Idle connection cost: for each transport, start a fresh gateway, hold N idle connections with heartbeats on,
# and print the load generator's RESULT line (server RSS delta per connection, server CPU while idle).
# Usage: benches/scripts/idle-memory.sh [N] [PROCS] [HOLD]   (defaults 10000 2 10s)
# Environment: HEARTBEAT (corelay --heartbeat-interval, default 5s: shorter than HOLD so every connection is pinged
# during the hold), THREADS (event loops, default 2), TRANSPORTS (default "ws sse longpoll"), CORELAY_BIN (another
# gateway binary to measure, e.g. an older build, side by side).
# The full side-by-side report with the baselines is benches/scripts/report.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10000}; PROCS=${2:-2}; HOLD=${3:-10s}
HEARTBEAT=${HEARTBEAT:-5s}; THREADS=${THREADS:-2}; TRANSPORTS=${TRANSPORTS:-ws sse longpoll}
timeout 900 cargo build --release --locked -p corelay -p corelay-load --bins >/dev/null
# private copies: a rebuild of the tree during the run cannot swap the binaries
bin=$(mktemp -d); cp "${CORELAY_BIN:-target/release/corelay}" "$bin/corelay"; cp target/release/corelay-load "$bin/"
pid=""; data=""; log=""
cleanup() { [[ -n $pid ]] && kill -9 "$pid" 2>/dev/null; rm -rf "$bin" "$data" "$log"; }
trap cleanup EXIT
for transport in $TRANSPORTS; do
  data=$(mktemp -d); log=$(mktemp)
  "$bin/corelay" run --listen 127.0.0.1:0 --threads "$THREADS" --data-dir "$data" --auth-secret bench-secret-0123456789abcdef0123456789 \
    --api-key bench-api-key-0123456789abcdef0123456789 --echo-path /echo --accept-rate 1000000 --heartbeat-interval "$HEARTBEAT" >"$log" 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$log" && break; sleep 0.1; done
  addr=$(grep -oE 'listening on [0-9.:]+' "$log" | awk '{print $3}' || true)
  [[ -n $addr ]] || { echo "corelay did not start" >&2; exit 1; }
  case $transport in
    ws) url="ws://$addr/echo"; extra=() ;;
    sse) url="http://$addr/sse?channels=bench:idle"; extra=(--token-secret bench-secret-0123456789abcdef0123456789) ;;
    longpoll) url="http://$addr/poll?channels=bench:idle&cursor=bench:idle%3D0&timeout=60"; extra=(--token-secret bench-secret-0123456789abcdef0123456789) ;;
  esac
  timeout -k 5 300 "$bin/corelay-load" idle --quiet --transport "$transport" --url "$url" --connections "$N" \
    --procs "$PROCS" --server-pid "$pid" --hold "$HOLD" --timeout 280s "${extra[@]}" | grep '^RESULT' || true
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  rm -rf "$data" "$log"; data=""; log=""
done
