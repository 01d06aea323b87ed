#!/usr/bin/env bash
# TLS side by side: corelay (rustls) and nginx + Nchan (OpenSSL), same ECDSA P-256 certificate, same cores.
#   1. idle memory: N_IDLE idle WebSockets held with pings answered (both servers ping every 5 s), server RSS
#      growth per connection; wss:// on both (full handshakes), plain ws:// on both for reference, and corelay's
#      chat endpoint over wss:// with one topic subscription per connection (like an Nchan subscriber's channel).
#   2. handshake storm: N_STORM connections at once (TCP connect + TLS handshake + WebSocket upgrade), TLS
#      session resumption off and on, wall time, handshakes/s and the server's CPU seconds.
# corelay and nginx alternate, a fresh server per measurement, RUNS rounds; medians and per-run ratios at the end.
# Usage: benches/scripts/tls.sh [N_IDLE] [N_STORM] [RUNS]     (defaults 15000 10000 3; about 7 minutes on 2 cores)
# Environment: CORELAY_BIN (another gateway binary), THREADS (corelay loops, 2), WORKERS (nginx worker_processes,
# 2), PROCS (load generator processes, 2), HOLD (10s), HEARTBEAT (5s), SERVERS ("corelay nginx"), PARTS
# ("idle storm"), IDLE_KINDS ("wss ws wss-follow"; wss-follow is corelay only), OUT (results directory, default
# a new temporary one; kept), SKIP_BUILD=1.
# Needs nginx and libnginx-mod-nchan (apt-get install -y nginx libnginx-mod-nchan) and openssl; loopback only.
set -euo pipefail
cd "$(dirname "$0")/../.."
N_IDLE=${1:-15000}; N_STORM=${2:-10000}; RUNS=${3:-3}
THREADS=${THREADS:-2}; WORKERS=${WORKERS:-2}; PROCS=${PROCS:-2}; HOLD=${HOLD:-10s}; HEARTBEAT=${HEARTBEAT:-5s}
SERVERS=${SERVERS:-corelay nginx}; PARTS=${PARTS:-idle storm}; IDLE_KINDS=${IDLE_KINDS:-wss ws wss-follow}
NCHAN_SO=${NCHAN_SO:-/usr/lib/nginx/modules/ngx_nchan_module.so}
SECRET=bench-secret-0123456789abcdef0123456789
command -v nginx >/dev/null || { echo "tls.sh: nginx is not installed (apt-get install -y nginx libnginx-mod-nchan)" >&2; exit 1; }
[[ -f $NCHAN_SO ]] || { echo "tls.sh: $NCHAN_SO missing (apt-get install -y libnginx-mod-nchan)" >&2; exit 1; }
if [[ -z ${SKIP_BUILD:-} ]]; then
  timeout 1800 cargo build --release --locked -p corelay -p corelay-load --bins >/dev/null
fi
work=$(mktemp -d /tmp/corelay-tls-bench.XXXXXX)
OUT=${OUT:-$work/out}; mkdir -p "$OUT"
# private copies: a rebuild of the tree during the run cannot swap the binaries
cp "${CORELAY_BIN:-target/release/corelay}" "$work/corelay"; cp target/release/corelay-load "$work/"
L=$work/corelay-load
pid=""
cleanup() {
  [[ -n $pid ]] && { kill "$pid" 2>/dev/null; sleep 0.5; kill -9 "$pid" 2>/dev/null; } || true
  # keep the results, drop the rest
  find "$work" -mindepth 1 -maxdepth 1 ! -path "$OUT" -exec rm -rf {} + 2>/dev/null || true
}
trap cleanup EXIT
"$work/corelay" run --help | grep -q -- --tls-listen || { echo "tls.sh: this corelay has no --tls-listen" >&2; exit 1; }

# 1. the certificate: ECDSA P-256, self-signed, for localhost and 127.0.0.1 (CA:FALSE: rustls refuses a CA
#    certificate as the server's own).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
  -addext "keyUsage=critical,digitalSignature" -addext "extendedKeyUsage=serverAuth" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
overflows() { awk '/^TcpExt:/ { if (!h) { split($0, n); h=1 } else { split($0, v); for (i in n) if (n[i]=="ListenOverflows") print v[i] } }' /proc/net/netstat; }

# Sets pid, plain and tls (host:port) and path.
start_corelay() {
  local log=$work/corelay.log data=$work/data
  rm -rf "$data"; mkdir -p "$data"
  "$work/corelay" run --listen 127.0.0.1:0 --tls-listen 127.0.0.1:0 --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" \
    --threads "$THREADS" --data-dir "$data" --auth-secret "$SECRET" --api-key bench-api-key-0123456789abcdef0123456789 \
    --echo-path /echo --heartbeat-interval "$HEARTBEAT" >"$log" 2>"$log.err" &
  pid=$!
  for _ in $(seq 300); do grep -q 'tls listening' "$log" 2>/dev/null && break; sleep 0.1; done
  tls=$(grep -oE 'tls listening on [0-9.:]+' "$log" | awk '{print $4}' || true)
  plain=$(grep -v 'tls listening' "$log" | grep -oE 'listening on [0-9.:]+' | awk '{print $3}' || true)
  [[ -n $tls && -n $plain ]] || { echo "tls.sh: corelay did not start" >&2; cat "$log" >&2; tail -n 20 "$log.err" >&2; exit 1; }
  path=/echo; measured=(--server-pid "$pid")
}

start_nginx() {
  local p=$work/nginx; rm -rf "$p"; mkdir -p "$p/tmp"
  local tp pp; tp=$(free_port); pp=$(free_port)
  local ping=${HEARTBEAT%s}
  cat >"$p/nginx.conf" <<EOF
load_module $NCHAN_SO;
worker_processes $WORKERS;
worker_rlimit_nofile 20000;
daemon off;
pid $p/nginx.pid;
error_log $p/error.log warn;
events { worker_connections 19500; }
http {
  access_log off;
  client_body_temp_path $p/tmp; proxy_temp_path $p/tmp; fastcgi_temp_path $p/tmp; uwsgi_temp_path $p/tmp; scgi_temp_path $p/tmp;
  server {
    listen 127.0.0.1:$tp ssl reuseport backlog=4096;
    listen 127.0.0.1:$pp reuseport backlog=4096;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location /sub {
      nchan_subscriber websocket;
      nchan_channel_id bench;
      nchan_websocket_ping_interval $ping;
    }
  }
}
EOF
  nginx -p "$p" -e "$p/error.log" -c "$p/nginx.conf" 2>>"$p/error.log" &
  pid=$!
  for _ in $(seq 100); do [[ $(pgrep -c -P "$pid" || true) -ge $WORKERS ]] && break; sleep 0.1; done
  [[ $(pgrep -c -P "$pid" || true) -ge $WORKERS ]] || { echo "tls.sh: nginx did not start" >&2; cat "$p/error.log" >&2; exit 1; }
  sleep 0.3
  tls=127.0.0.1:$tp; plain=127.0.0.1:$pp; path=/sub; measured=(--server-children-of "$pid")
}

stop_server() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; }

# record SERVER SCENARIO RUN EXTRA_JSON RESULT_LINE
record() {
  local r=${5#RESULT }
  [[ -n $r && $r == \{* ]] || r='{"error":"no RESULT"}'
  printf '{"server":"%s","scenario":"%s","run":%s,%s"loadavg":"%s","result":%s}\n' \
    "$1" "$2" "$3" "$4" "$(cut -d' ' -f1-3 /proc/loadavg)" "$r" | tee -a "$OUT/results.jsonl" | cut -c1-240
}

echo "tls.sh: $(date -u '+%F %T') UTC, git $(git rev-parse --short HEAD), $(nginx -v 2>&1), nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo '?'), $(openssl version), $(nproc) CPUs; results in $OUT" | tee "$OUT/header.txt"
for run in $(seq "$RUNS"); do
  if [[ " $PARTS " == *" idle "* ]]; then
    for server in $SERVERS; do
      for kind in $IDLE_KINDS; do
        [[ $kind == wss-follow && $server != corelay ]] && continue
        "start_$server"
        url="ws://$plain$path"; args=()
        [[ $kind == wss* ]] && { url="wss://$tls$path"; args=(--tls-ca "$work/cert.pem" --tls-server-name localhost --tls-resume off); }
        # corelay's chat endpoint: a token per connection, each subscribes to topic:bench and counts once subscribed
        [[ $kind == wss-follow ]] && { url="wss://$tls/ws"; args+=(--token-secret "$SECRET" --follow bench); }
        line=$(timeout -k 5 300 "$L" idle --quiet --url "$url" "${args[@]}" --connections "$N_IDLE" \
          --procs "$PROCS" "${measured[@]}" --hold "$HOLD" --timeout 240s | grep '^RESULT' || true)
        record "$server" "idle-$kind" "$run" "" "$line"
        stop_server
      done
    done
  fi
  if [[ " $PARTS " == *" storm "* ]]; then
    for server in $SERVERS; do
      for resume in off on; do
        "start_$server"
        o0=$(overflows)
        line=$(timeout -k 5 300 "$L" connect-storm --quiet --url "wss://$tls$path" --tls-ca "$work/cert.pem" \
          --tls-server-name localhost --tls-resume "$resume" --connections "$N_STORM" --procs "$PROCS" "${measured[@]}" \
          --timeout 240s | grep '^RESULT' || true)
        o1=$(overflows)
        record "$server" "storm-resume-$resume" "$run" "\"listen_overflows\":$((o1 - o0))," "$line"
        stop_server
      done
    done
  fi
done

python3 - "$OUT/results.jsonl" <<'EOF' | tee "$OUT/tables.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def get(server, scen, key):
    return [r["result"].get(key) for r in sorted((r for r in rows if r["server"] == server and r["scenario"] == scen), key=lambda r: r["run"])]
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def f(x, d=0):
    return "n/a" if x is None else f"{x:,.{d}f}"
def runs(xs, d=0):
    return ", ".join(f(x, d) for x in xs)
servers = [s for s in ["corelay", "nginx"] if any(r["server"] == s for r in rows)]
idle = any(r["scenario"].startswith("idle-") for r in rows)
storm = any(r["scenario"].startswith("storm-") for r in rows)
if idle:
    print("### Idle WebSockets: server RSS growth per connection\n")
    print("| server | scheme | runs | held (median) | **bytes / conn** (median) | per run | pings answered (median) |")
    print("|---|---|---|---|---|---|---|")
for s in servers:
    for scheme in ["wss", "ws", "wss-follow"]:
        b = get(s, "idle-" + scheme, "bytes_per_conn")
        if not b: continue
        print(f"| {s} | {scheme} | {len(b)} | {f(med(get(s, 'idle-' + scheme, 'held_connections')))} | **{f(med(b))} B** | {runs(b)} | {f(med(get(s, 'idle-' + scheme, 'pings_answered')))} |")
c, n = get("corelay", "idle-wss", "bytes_per_conn"), get("nginx", "idle-wss", "bytes_per_conn")
if c and n and len(c) == len(n):
    ratios = [x / y if x and y else None for x, y in zip(n, c)]
    print(f"\n* nginx ÷ corelay, wss bytes per connection: **{f(med(n) / med(c), 2)}x** (runs {runs(ratios, 2)})")
if storm:
    print("\n### TLS handshake storm\n")
    print("| server | resumption | runs | connected | resumed | **handshakes/s** (median) | per run | span s | p50 ms | p99 ms | **server CPU s** (median) | per run | server CPU µs/conn | listen overflows |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for s in servers:
    for res in ["off", "on"]:
        sc = "storm-resume-" + res
        hs = get(s, sc, "handshakes_per_s")
        if not hs: continue
        cpu = get(s, sc, "server_cpu_s")
        ov = [r.get("listen_overflows") for r in sorted((r for r in rows if r["server"] == s and r["scenario"] == sc), key=lambda r: r["run"])]
        p50 = med(get(s, sc, "handshake_p50_us")); p99 = med(get(s, sc, "handshake_p99_us"))
        print(f"| {s} | {res} | {len(hs)} | {f(med(get(s, sc, 'connected')))} | {f(med(get(s, sc, 'tls_resumed')))} | **{f(med(hs))}** | {runs(hs)} | {f(med(get(s, sc, 'span_s')), 3)} "
              f"| {f(p50 and p50 / 1000, 1)} | {f(p99 and p99 / 1000, 1)} | **{f(med(cpu), 2)}** | {runs(cpu, 2)} | {f(med(get(s, sc, 'server_cpu_us_per_conn')))} | {runs(ov)} |")
for res in ["off", "on"]:
    sc = "storm-resume-" + res
    c, n = get("corelay", sc, "handshakes_per_s"), get("nginx", sc, "handshakes_per_s")
    if c and n and len(c) == len(n):
        ratios = [x / y if x and y else None for x, y in zip(c, n)]
        print(f"* resumption {res}: corelay ÷ nginx handshakes/s **{f(med(c) / med(n), 2)}x** (runs {runs(ratios, 2)})", end="")
        cc, nc = get("corelay", sc, "server_cpu_s"), get("nginx", sc, "server_cpu_s")
        if med(cc) and med(nc):
            cr = [y / x if x and y else None for x, y in zip(cc, nc)]
            print(f"; nginx ÷ corelay server CPU **{f(med(nc) / med(cc), 2)}x** (runs {runs(cr, 2)})")
        else:
            print()
EOF
