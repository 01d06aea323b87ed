#!/usr/bin/env bash
# permessage-deflate on a fan-out, corelay against nginx + Nchan, side by side on this machine: one chat message
# of about 300 bytes of JSON (English text, so it compresses like chat) published 10 times a second to N
# WebSocket subscribers of one channel, with and without permessage-deflate; bytes on the wire per delivery
# (what the subscribers read while the messages flowed, frame headers included), server CPU per delivery
# (utime+stime of the server processes over the publishing phase) and the time to the last delivery.
#
# Usage: benches/scripts/deflate-fanout.sh [RUNS] [SUBSCRIBER COUNTS...]     (default: 3 runs, 5000 15000)
# Env: MESSAGES (default 50), OUT (results dir, default target/deflate-fanout).
# Needs nginx and libnginx-mod-nchan (apt-get install -y nginx libnginx-mod-nchan); loopback only.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}; shift || true
COUNTS=("${@:-5000 15000}"); read -r -a COUNTS <<<"${COUNTS[*]}"
MESSAGES=${MESSAGES:-50}
OUT=${OUT:-target/deflate-fanout}
NCHAN_SO=${NCHAN_SO:-/usr/lib/nginx/modules/ngx_nchan_module.so}
SECRET=bench-secret-0123456789abcdef0123456789
KEY=bench-api-key-0123456789abcdef0123456789
# 170 bytes of filler: the delivered message is then ~330 bytes of JSON (type, channel, offset, from, ts and the
# body); the Nchan publisher posts that same shape, so both servers carry the same bytes.
PAD=${PAD:-170}
command -v nginx >/dev/null || { echo "deflate-fanout.sh: nginx is not installed (apt-get install -y nginx libnginx-mod-nchan)" >&2; exit 1; }
[[ -f $NCHAN_SO ]] || { echo "deflate-fanout.sh: $NCHAN_SO missing (apt-get install -y libnginx-mod-nchan)" >&2; exit 1; }
cargo build --release -p corelay -p corelay-load --bins >&2
mkdir -p "$OUT"; : >"$OUT/results.jsonl"
work=$(mktemp -d); pid=""
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 20000
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# corelay: the fan-out is one conversation with N members, created through /api/conversations, whose member list
# must fit --max-body-bytes (64 KiB by default: about 7,000 members).
start_corelay() {
  local port; port=$(free_port); rm -rf "$work/data"; mkdir -p "$work/data"
  target/release/corelay run --listen "127.0.0.1:$port" --threads 2 --data-dir "$work/data" \
    --auth-secret "$SECRET" --api-key "$KEY" --accept-rate 1000000 --max-body-bytes 1MiB >"$work/corelay.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$work/corelay.log" && break; sleep 0.1; done
  args=(--url "ws://127.0.0.1:$port/ws" --api "http://127.0.0.1:$port" --api-key "$KEY" --token-secret "$SECRET"
        --server-pid "$pid")
}

start_nginx() { # $1: on|off (nchan_deflate_message_for_websocket)
  local p=$work/nginx; rm -rf "$p"; mkdir -p "$p/tmp"
  local port; port=$(free_port)
  cat >"$p/nginx.conf" <<EOF
load_module $NCHAN_SO;
worker_processes 2;
worker_rlimit_nofile 20000;
daemon off;
pid $p/nginx.pid;
error_log $p/error.log warn;
events { worker_connections 19500; }
http {
  access_log off;
  client_body_temp_path $p/tmp; proxy_temp_path $p/tmp; fastcgi_temp_path $p/tmp; uwsgi_temp_path $p/tmp; scgi_temp_path $p/tmp;
  server {
    listen 127.0.0.1:$port reuseport backlog=4096;
    location = /sub/bench { nchan_subscriber websocket; nchan_channel_id bench; }
    location = /pub/bench { nchan_publisher; nchan_channel_id bench; nchan_message_buffer_length 100;
                            nchan_deflate_message_for_websocket $1; }
  }
}
EOF
  nginx -p "$p" -e "$p/error.log" -c "$p/nginx.conf" 2>>"$p/error.log" &
  pid=$!
  for _ in $(seq 100); do [[ $(pgrep -c -P "$pid" || true) -ge 2 ]] && break; sleep 0.1; done
  sleep 0.3
  args=(--peer nchan --url "ws://127.0.0.1:$port/sub/bench" --pub-url "http://127.0.0.1:$port/pub/bench"
        --api "http://127.0.0.1:$port" --api-key unused --server-children-of "$pid")
}

stop_server() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; }

echo "deflate-fanout.sh: $(date -u '+%F %T') UTC, git $(git rev-parse --short HEAD), $(nginx -v 2>&1), nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo '?'), $(nproc) CPUs; $MESSAGES messages at 10/s; results in $OUT" | tee "$OUT/header.txt"
for run in $(seq "$RUNS"); do
  for n in "${COUNTS[@]}"; do
    procs=$(( (n + 7499) / 7500 ))
    for server in corelay nchan; do
      for deflate in off on; do
        if [[ $server == corelay ]]; then start_corelay; else start_nginx "$deflate"; fi
        flag=(); [[ $deflate == on ]] && flag=(--deflate)
        line=$(target/release/corelay-load fanout "${args[@]}" "${flag[@]}" --subscribers "$n" --procs "$procs" \
          --messages "$MESSAGES" --gap 100ms --pad "$PAD" --timeout 120s --quiet 2>>"$OUT/stderr.log" | grep '^RESULT' || true)
        stop_server
        r=${line#RESULT }; [[ $r == \{* ]] || r='{"error":"no RESULT"}'
        printf '{"server":"%s","subscribers":%s,"deflate":"%s","run":%s,"loadavg":"%s","result":%s}\n' \
          "$server" "$n" "$deflate" "$run" "$(cut -d' ' -f1-3 /proc/loadavg)" "$r" >>"$OUT/results.jsonl"
        python3 - "$server" "$n" "$deflate" "$run" "$r" <<'PY'
import json, sys
s, n, d, run, r = sys.argv[1:6]
r = json.loads(r)
print(f"run {run} {s:8} N={n:>6} deflate={d:3}: delivered {r.get('deliveries')}/{r.get('deliveries_expected')}"
      f" compressed {r.get('compressed_deliveries')} wire {r.get('wire_bytes_per_delivery')} B/delivery"
      f" cpu {r.get('server_cpu_us_per_delivery')} us/delivery last p50 {r.get('last_delivery_p50_us')} us"
      f" p99 {r.get('last_delivery_p99_us')} us")
PY
      done
    done
  done
done
python3 - "$OUT/results.jsonl" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
keys = sorted({(r["subscribers"], r["server"], r["deflate"]) for r in rows})
print("| subscribers | server | deflate | wire B/delivery | server CPU µs/delivery | last delivery p50 ms | p99 ms | delivered | runs |")
print("|---|---|---|---|---|---|---|---|---|")
for n, s, d in keys:
    rs = [r["result"] for r in rows if (r["subscribers"], r["server"], r["deflate"]) == (n, s, d)]
    w = med([r.get("wire_bytes_per_delivery") for r in rs])
    c = med([r.get("server_cpu_us_per_delivery") for r in rs])
    p50 = med([r.get("last_delivery_p50_us") for r in rs])
    p99 = med([r.get("last_delivery_p99_us") for r in rs])
    got = sum(r.get("deliveries") or 0 for r in rs); exp = sum(r.get("deliveries_expected") or 0 for r in rs)
    f = lambda x, k=1: "–" if x is None else f"{x:,.{k}f}"
    print(f"| {n:,} | {s} | {d} | {f(w)} | {f(c, 2)} | {f(p50 and p50/1000)} | {f(p99 and p99/1000)} | {got:,}/{exp:,} | {len(rs)} |")
PY
