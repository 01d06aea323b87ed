#!/usr/bin/env bash
# Fan-out, corelay against nginx + Nchan, side by side on this machine: one chat message of about 330 bytes of
# JSON published 10 times a second to N subscribers of one channel, WebSocket and SSE subscribers, on a quiet
# machine and with a noisy neighbour (a one-core CPU hog started before the server and stopped after the
# measurement). Per message the time until the LAST subscriber had it (last delivery), per delivery the latency
# from the publisher's send, and the server CPU per delivery (utime+stime of the server processes over the
# publishing phase). Runs are interleaved (run, subscribers, condition, transport, then corelay and Nchan back to
# back), each on a fresh server, so drift on the machine hits both servers alike; the summary gives medians over
# runs and the corelay/Nchan ratios computed within each run.
#
# Two corelay variants: corelay-topic (subscribers follow `topic:fanout`, each message is `POST /api/publish`ed;
# a topic is kept in memory on a single node, as an Nchan channel is: the like-for-like comparison) and
# corelay-conv (a conversation of N members: every message is committed to the embedded store, fsynced, before
# it is delivered, and published over the publisher's WebSocket). Every publisher runs an open loop: a message
# leaves every 100 ms whether or not the server has answered the previous one (the load generator POSTs on a
# thread of its own), so a server slow to answer a publish cannot lower the load it is offered.
#
# Usage: benches/scripts/fanout-nchan.sh [RUNS] [SUBSCRIBER COUNTS...]     (default: 3 runs, 5000 15000)
# Env: MESSAGES (default 50), OUT (results dir, default target/fanout-nchan), NOISY (conditions, default
# "quiet noisy"), TRANSPORTS (default "ws sse"), SERVERS (default "corelay-topic corelay-conv nchan"),
# SKIP_BUILD (set: use the release binaries as they are).
# Needs nginx and libnginx-mod-nchan (apt-get install -y nginx libnginx-mod-nchan); loopback only.
# Plot: python3 benches/scripts/fanout-plot.py $OUT/results.jsonl $OUT/fanout.svg (done at the end).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}; shift || true
COUNTS=("${@:-5000 15000}"); read -r -a COUNTS <<<"${COUNTS[*]}"
MESSAGES=${MESSAGES:-50}
OUT=${OUT:-target/fanout-nchan}
read -r -a CONDITIONS <<<"${NOISY:-quiet noisy}"
read -r -a TRANSPORTS <<<"${TRANSPORTS:-ws sse}"
read -r -a SERVERS <<<"${SERVERS:-corelay-topic corelay-conv nchan}"
NCHAN_SO=${NCHAN_SO:-/usr/lib/nginx/modules/ngx_nchan_module.so}
SECRET=bench-secret-0123456789abcdef0123456789
KEY=bench-api-key-0123456789abcdef0123456789
# 170 bytes of filler: the delivered message is then ~330 bytes of JSON (type, channel, offset, from, ts and the
# body); the Nchan publisher posts that same shape, so both servers carry the same bytes.
PAD=${PAD:-170}
for c in "${CONDITIONS[@]}"; do [[ $c == quiet || $c == noisy ]] || { echo "fanout-nchan.sh: NOISY: $c is not quiet or noisy" >&2; exit 2; }; done
for t in "${TRANSPORTS[@]}"; do [[ $t == ws || $t == sse ]] || { echo "fanout-nchan.sh: TRANSPORTS: $t is not ws or sse" >&2; exit 2; }; done
for s in "${SERVERS[@]}"; do [[ $s == corelay-topic || $s == corelay-conv || $s == nchan ]] || { echo "fanout-nchan.sh: SERVERS: $s is not corelay-topic, corelay-conv or nchan" >&2; exit 2; }; done
command -v nginx >/dev/null || { echo "fanout-nchan.sh: nginx is not installed (apt-get install -y nginx libnginx-mod-nchan)" >&2; exit 1; }
[[ -f $NCHAN_SO ]] || { echo "fanout-nchan.sh: $NCHAN_SO missing (apt-get install -y libnginx-mod-nchan)" >&2; exit 1; }
[[ -n ${SKIP_BUILD:-} ]] || cargo build --release -p corelay -p corelay-load --bins >&2
mkdir -p "$OUT"; : >"$OUT/results.jsonl"
work=$(mktemp -d); pid=""; hog=""
cleanup() {
  [[ -n $pid ]] && kill "$pid" 2>/dev/null; [[ -n $hog ]] && kill "$hog" 2>/dev/null
  wait 2>/dev/null || true; rm -rf "$work"
}
trap cleanup EXIT
ulimit -n 20000
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# corelay-conv: the fan-out is one conversation with N members, created through /api/conversations, whose member
# list must fit --max-body-bytes (64 KiB by default: about 7,000 members). SSE subscribers open GET /sse on the
# same port (corelay-load turns the /ws path into /sse); the stream carries each member's conversations.
# corelay-topic: WebSocket subscribers send `subscribe`, SSE ones open GET /sse?channels=topic:fanout.
start_corelay() { # $1: topic|conversation
  local port; port=$(free_port); rm -rf "$work/data"; mkdir -p "$work/data"
  target/release/corelay run --listen "127.0.0.1:$port" --threads 2 --data-dir "$work/data" \
    --auth-secret "$SECRET" --api-key "$KEY" --accept-rate 1000000 --max-body-bytes 1MiB >"$work/corelay.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$work/corelay.log" && break; sleep 0.1; done
  args=(--url "ws://127.0.0.1:$port/ws" --api "http://127.0.0.1:$port" --api-key "$KEY" --token-secret "$SECRET"
        --server-pid "$pid" --channel "$1")
}

start_nginx() { # $1: ws|sse (which subscriber location the subscribers use)
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
    location = /sse/bench { nchan_subscriber eventsource; nchan_channel_id bench; }
    location = /pub/bench { nchan_publisher; nchan_channel_id bench; nchan_message_buffer_length 100; }
  }
}
EOF
  nginx -p "$p" -e "$p/error.log" -c "$p/nginx.conf" 2>>"$p/error.log" &
  pid=$!
  for _ in $(seq 100); do [[ $(pgrep -c -P "$pid" || true) -ge 2 ]] && break; sleep 0.1; done
  sleep 0.3
  local sub="ws://127.0.0.1:$port/sub/bench"; [[ $1 == sse ]] && sub="http://127.0.0.1:$port/sse/bench"
  # --channel topic: the posted message names `topic:fanout`, so it has corelay-topic's bytes.
  args=(--peer nchan --url "$sub" --pub-url "http://127.0.0.1:$port/pub/bench" --channel topic
        --api "http://127.0.0.1:$port" --api-key unused --server-children-of "$pid")
}

stop_server() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; }
# The noisy neighbour: one core kept busy for the whole measurement, server start included.
start_hog() { sh -c 'while :; do :; done' & hog=$!; }
stop_hog() { [[ -n $hog ]] || return 0; kill "$hog" 2>/dev/null || true; wait "$hog" 2>/dev/null || true; hog=""; }

echo "fanout-nchan.sh: $(date -u '+%F %T') UTC, git $(git rev-parse --short HEAD), $(nginx -v 2>&1), nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo '?'), $(nproc) CPUs; $MESSAGES messages at 10/s, $RUNS runs, subscribers ${COUNTS[*]}, conditions ${CONDITIONS[*]}, transports ${TRANSPORTS[*]}; results in $OUT" | tee "$OUT/header.txt"
for run in $(seq "$RUNS"); do
  for n in "${COUNTS[@]}"; do
    procs=$(( (n + 7499) / 7500 ))
    for cond in "${CONDITIONS[@]}"; do
      for transport in "${TRANSPORTS[@]}"; do
        for server in "${SERVERS[@]}"; do
          [[ $cond == noisy ]] && start_hog
          case $server in
            corelay-topic) start_corelay topic ;;
            corelay-conv) start_corelay conversation ;;
            nchan) start_nginx "$transport" ;;
          esac
          line=$(target/release/corelay-load fanout "${args[@]}" --transport "$transport" --subscribers "$n" \
            --procs "$procs" --messages "$MESSAGES" --gap 100ms --pad "$PAD" --timeout 120s --quiet \
            2>>"$OUT/stderr.log" | grep '^RESULT' || true)
          load=$(cut -d' ' -f1-3 /proc/loadavg)
          stop_server
          stop_hog
          r=${line#RESULT }; [[ $r == \{* ]] || r='{"error":"no RESULT"}'
          printf '{"server":"%s","transport":"%s","condition":"%s","subscribers":%s,"run":%s,"loadavg":"%s","result":%s}\n' \
            "$server" "$transport" "$cond" "$n" "$run" "$load" "$r" >>"$OUT/results.jsonl"
          python3 - "$server" "$transport" "$cond" "$n" "$run" "$r" <<'PY'
import json, sys
s, t, c, n, run, r = sys.argv[1:7]
r = json.loads(r)
ms = lambda k: "–" if r.get(k) is None else f"{r[k] / 1000:.1f}"
print(f"run {run} {s:13} {t:3} {c:5} N={n:>6}: delivered {r.get('deliveries')}/{r.get('deliveries_expected')}"
      f" last p50 {ms('last_delivery_p50_us')} p99 {ms('last_delivery_p99_us')} ms,"
      f" delivery p50 {ms('delivery_p50_us')} p99 {ms('delivery_p99_us')} ms,"
      f" cpu {r.get('server_cpu_us_per_delivery')} us/delivery" + (f" ERROR {r['error']}" if "error" in r else ""))
PY
        done
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
f = lambda x, k=1: "–" if x is None else f"{x:,.{k}f}"
ms = lambda x: None if x is None else x / 1000
order = {"quiet": 0, "noisy": 1, "ws": 0, "sse": 1}
key = lambda r: (r["subscribers"], order.get(r["condition"], 9), r["condition"], order.get(r["transport"], 9), r["transport"])
print("Medians over runs (last delivery: per message, the time until the last subscriber had it; delivery: every"
      " subscriber's latency).\n")
print("| subscribers | condition | transport | server | last p50 ms | last p99 ms | delivery p50 ms | delivery p99 ms"
      " | server CPU µs/delivery | delivered | runs |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
servers = [s for s in ("corelay-topic", "corelay-conv", "corelay", "nchan") if any(r["server"] == s for r in rows)]
for k in sorted({key(r) for r in rows}):
    for s in servers:
        rs = [r["result"] for r in rows if key(r) == k and r["server"] == s]
        if not rs:
            continue
        m = lambda name: med([r.get(name) for r in rs])
        got = sum(r.get("deliveries") or 0 for r in rs); exp = sum(r.get("deliveries_expected") or 0 for r in rs)
        errs = sum("error" in r for r in rs)
        print(f"| {k[0]:,} | {k[2]} | {k[4]} | {s} | {f(ms(m('last_delivery_p50_us')))} | {f(ms(m('last_delivery_p99_us')))}"
              f" | {f(ms(m('delivery_p50_us')))} | {f(ms(m('delivery_p99_us')))} | {f(m('server_cpu_us_per_delivery'), 2)}"
              f" | {got:,}/{exp:,} | {len(rs)}{f' ({errs} failed)' if errs else ''} |")
print("\ncorelay / Nchan, each ratio within one run (below 1: corelay lower), then their median.\n")
print("| subscribers | condition | transport | corelay | last p50 per run | median | last p99 per run | median | CPU/delivery per run | median |")
print("|---|---|---|---|---|---|---|---|---|---|")
by = {(key(r), r["run"], r["server"]): r["result"] for r in rows}
for k in sorted({key(r) for r in rows}):
    runs = sorted({r["run"] for r in rows if key(r) == k})
    for s in servers:
        if s == "nchan":
            continue
        cells = []
        for name in ("last_delivery_p50_us", "last_delivery_p99_us", "server_cpu_us_per_delivery"):
            rat = []
            for run in runs:
                c, n = by.get((k, run, s), {}).get(name), by.get((k, run, "nchan"), {}).get(name)
                rat.append(c / n if c is not None and n else None)
            cells.append(" ".join("–" if x is None else f"{x:.2f}" for x in rat) or "–")
            cells.append(f(med(rat), 2))
        print(f"| {k[0]:,} | {k[2]} | {k[4]} | {s} | " + " | ".join(cells) + " |")
PY
python3 benches/scripts/fanout-plot.py "$OUT/results.jsonl" "$OUT/fanout.svg"
