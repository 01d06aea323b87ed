#!/usr/bin/env bash
# Cross-node delivery latency and Redis cost per delivered message.
#  1. single node, embedded store          (fanout: publisher and subscribers on one node)
#  2. single node, Redis store and bus     (cluster mode with one node)
#  3. three nodes on one Redis             (publisher on n0, subscribers spread over n0, n1, n2)
# Each: S subscribers in one conversation, M messages sent every GAP (a fixed rate), latency from the send
# timestamp in the body to each subscriber's receipt (p50/p99 of all deliveries; last-delivery p50/p99).
# Then, for a 1,000-member conversation over three nodes, Redis commands and pub/sub messages per chat message.
# Usage: benches/scripts/cluster-latency.sh [S=300] [M=200] [GAP=10ms]
set -euo pipefail
cd "$(dirname "$0")/../.."
S=${1:-300}; M=${2:-200}; GAP=${3:-10ms}
cargo build --release --locked -p corelay -p corelay-load --bins >/dev/null
BIN=$(mktemp -d); cp target/release/corelay target/release/corelay-load "$BIN/"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work" "$BIN"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_redis() {
  rport=$(free_port); mkdir -p "$work/redis-$rport"
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync everysec \
    --dir "$work/redis-$rport" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
}
start_node() { # name extra-args... ; sets $addr
  local name=$1; shift
  local log="$work/$name.log"
  "$BIN/corelay" run --listen 127.0.0.1:0 --threads 1 --no-pin --data-dir "$work/$name" --auth-secret bench-secret-0123456789abcdef0123456789 \
    --api-key bench-api-key-0123456789abcdef0123456789 --node-id "$name" --max-body-bytes 1MiB --client-rate 100000 --client-burst 100000 "$@" >"$log" 2>"$work/$name.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$log" && break; sleep 0.1; done
  addr=$(grep -oE 'listening on [0-9.:]+' "$log" | awk '{print $3}')
}
fanout() { # label pub-addr [sub-addrs...]
  local label=$1 pub=$2; shift 2
  local subs=() procs=1
  for a in "$@"; do subs+=(--sub-url "ws://$a/ws"); done
  [ $# -gt 0 ] && procs=$#
  "$BIN/corelay-load" fanout --quiet --url "ws://$pub/ws" --api "http://$pub" --api-key bench-api-key-0123456789abcdef0123456789 --token-secret bench-secret-0123456789abcdef0123456789 \
    --subscribers "$S" --messages "$M" --gap "$GAP" --procs "$procs" "${subs[@]}" \
    | grep '^RESULT' | sed "s/^RESULT /RESULT {\"label\":\"$label\",\"r\":/; s/\$/}/"
}

start_node single; fanout "single node, embedded store" "$addr"
start_redis
start_node solo --redis "redis://127.0.0.1:$rport"; fanout "single node, redis" "$addr"
start_node n0 --redis "redis://127.0.0.1:$rport"; a0=$addr
start_node n1 --redis "redis://127.0.0.1:$rport"; a1=$addr
start_node n2 --redis "redis://127.0.0.1:$rport"; a2=$addr
fanout "three nodes, redis, subscribers spread" "$a0" "$a0" "$a1" "$a2"

# Redis cost of one chat message to a 1,000-member conversation spread over three nodes.
redis-cli -p "$rport" config resetstat >/dev/null
S=1000 M=50 fanout "three nodes, 1000 members (redis cost run)" "$a0" "$a0" "$a1" "$a2" >/dev/null || true
redis-cli -p "$rport" info commandstats | grep -E 'cmdstat_(evalsha|publish|xadd|incr|hset|xrange|get)' | tr -d '\r' \
  | sed 's/^/REDIS /'
redis-cli -p "$rport" info stats | grep -E 'total_commands_processed|pubsub' | tr -d '\r' | sed 's/^/REDIS /'
