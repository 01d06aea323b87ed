#!/usr/bin/env bash
# The benchmark report in one command: builds, runs every scenario of docs/BENCHMARKS.md against corelay and the
# tokio-tungstenite baseline (defaults and --read-buffer 4096) side by side, a fresh server per measurement,
# collects the load generator's RESULT lines into $OUT_DIR/results.jsonl and renders the tables and plots
# (benches/scripts/plot.py).
#
#   benches/scripts/report.sh                 # the full report (~25 min on the 2-core dev VM), into docs/plots/
#   QUICK=1 benches/scripts/report.sh         # smoke run, small N and short windows (~3 min), into /tmp/corelay-report-quick/
#
# Environment (defaults in brackets; QUICK=1 changes the sizes, not the structure):
#   RUNS [3]            runs per side-by-side scenario (idle, echo, fanout, connect-storm); medians are taken over them
#   OUT_DIR             [docs/plots, QUICK: /tmp/corelay-report-quick]  results.jsonl, tables.md, *.svg, criterion.json, report-log.txt
#   HB_RUNS [3]         runs of the 65 s heartbeat-CPU hold (corelay only: the baseline sends no pings)
#   CRITERION [1]       0 skips `cargo bench` (QUICK default 0)
#   SKIP_BUILD [0]      1 reuses target/release binaries as they are
#   MAX_SECONDS [3600]  measurements not started before this many seconds are skipped (recorded as skipped)
#   N_IDLE, IDLE_HOLD, IDLE_HB, MEM_POINTS, HB_N, HB_HOLD, HB_INTERVAL, ECHO_CONNS, ECHO_SIZE, ECHO_DUR, ECHO_RATE,
#   SWEEP_RATES, FANOUT_N, FANOUT_MSGS, STORM_N: the scenario sizes (see below)
#
# Every step runs under `timeout`; a failed or timed-out measurement is recorded as a line whose result has an
# "error" field, and the script carries on. Binaries are copied to a private directory first so that a rebuild of the
# working tree by someone else cannot swap them mid-run.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
set -f   # no globbing: the URLs below contain ? and are word-split on purpose

QUICK=${QUICK:-0}
RUNS=${RUNS:-3}
if [[ $QUICK == 1 ]]; then
  OUT_DIR=${OUT_DIR:-/tmp/corelay-report-quick}
  : "${N_IDLE:=2000}" "${IDLE_HOLD:=3s}" "${IDLE_HB:=1s}" "${MEM_POINTS:=500 1000}"
  : "${HB_N:=2000}" "${HB_HOLD:=5s}" "${HB_INTERVAL:=2s}"
  : "${ECHO_DUR:=2s}" "${SWEEP_RATES:=5000 40000}" "${FANOUT_N:=1000}" "${FANOUT_MSGS:=5}" "${STORM_N:=2000}"
  : "${CRITERION:=0}"
else
  OUT_DIR=${OUT_DIR:-docs/plots}
fi
: "${N_IDLE:=15000}"         # idle connections for the per-connection memory figure
: "${IDLE_HOLD:=10s}"        # hold of the memory runs
: "${IDLE_HB:=5s}"           # corelay heartbeat interval in the memory runs: every connection is pinged during the hold
: "${MEM_POINTS:=1000 5000 10000}"   # extra single-run points of the memory curve (N_IDLE comes from the main runs)
: "${HB_N:=15000}" "${HB_HOLD:=65s}" "${HB_INTERVAL:=30s}"   # heartbeat CPU: two ping rounds at the default interval
: "${ECHO_CONNS:=100}" "${ECHO_SIZE:=64}" "${ECHO_DUR:=10s}" "${ECHO_RATE:=20000}"
: "${SWEEP_RATES:=5000 10000 40000}"  # extra single-run open-loop rates of the latency curve (ECHO_RATE comes from the main runs)
: "${FANOUT_N:=15000}" "${FANOUT_MSGS:=20}"
: "${STORM_N:=10000}"
: "${HB_RUNS:=3}" "${CRITERION:=1}" "${SKIP_BUILD:=0}" "${MAX_SECONDS:=3600}"

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
RESULTS=$OUT_DIR/results.jsonl
WORK=$(mktemp -d /tmp/corelay-report.XXXXXX)
BIN=$WORK/bin
LOG=$WORK/report.log
START=$(date +%s)
SPID=""; SADDR=""; SCMD=""; NSTART=0

log() { printf '[%4ds] %s\n' $(( $(date +%s) - START )) "$*" | tee -a "$LOG" >&2; }

cleanup() {
  if [[ -n $SPID ]]; then kill -9 "$SPID" 2>/dev/null; fi
  rm -rf "$WORK/data"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# --- build ------------------------------------------------------------------------------------------------------
if [[ $SKIP_BUILD != 1 ]]; then
  ok=0
  for attempt in 1 2 3; do
    log "build (attempt $attempt): cargo build --release -p corelay -p corelay-load --bins --example baseline"
    if timeout 900 cargo build --release -p corelay -p corelay-load --bins --example baseline >>"$LOG" 2>&1; then ok=1; break; fi
    log "build failed (someone may be mid-edit); retrying in 60 s"; sleep 60
  done
  [[ $ok == 1 ]] || { log "build failed 3 times; see $LOG"; exit 1; }
fi
mkdir -p "$BIN"
cp target/release/corelay target/release/corelay-load target/release/examples/baseline "$BIN/" || exit 1
log "binaries copied to $BIN"

# --- results file -----------------------------------------------------------------------------------------------
[[ -f $RESULTS ]] && cp "$RESULTS" "$WORK/results.jsonl.prev"   # the previous run, kept until /tmp is cleaned
: >"$RESULTS"
python3 - "$RESULTS" "$QUICK" "$RUNS" <<'EOF'
import json, os, platform, subprocess, sys, time
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception as e: return str(e)
meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git": sh("git rev-parse --short HEAD"),
        "git_dirty_files": len(sh("git status --porcelain").splitlines()), "kernel": platform.release(),
        "nproc": os.cpu_count(), "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
        "mem_total_kib": int(sh("awk '/MemTotal/ {print $2}' /proc/meminfo") or 0), "nofile": sh("ulimit -n"),
        "somaxconn": sh("cat /proc/sys/net/core/somaxconn"), "loadavg": sh("cat /proc/loadavg"),
        "quick": sys.argv[2] == "1", "runs": int(sys.argv[3])}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"server": "meta", "scenario": "meta", "run": 0, "result": meta}) + "\n")
EOF

# The kernel's count of connections dropped because a listen queue was full (all sockets, host-wide on this netns).
listen_overflows() { awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ListenOverflows") c = i; h = 1 } else print $c }' /proc/net/netstat 2>/dev/null; }

# Append one line: record SERVER SCENARIO RUN LOADCMD RESULT_JSON [LISTEN_OVERFLOWS_DURING_RUN]
record() {
  python3 - "$RESULTS" "$1" "$2" "$3" "$SCMD" "$4" "$5" "${6:-}" <<'EOF'
import json, sys
path, server, scenario, run, scmd, cmd, raw, lo = sys.argv[1:9]
try:
    result = json.loads(raw)
except Exception:
    result = {"error": "no RESULT line: " + raw[-300:]}
load = open("/proc/loadavg").read().split()[:3]
line = {"server": server, "scenario": scenario, "run": int(run), "server_cmd": scmd, "cmd": cmd,
        "loadavg": " ".join(load), "result": result}
if lo:
    line["listen_overflows"] = int(lo)
with open(path, "a") as f:
    f.write(json.dumps(line) + "\n")
EOF
}

# --- servers ----------------------------------------------------------------------------------------------------
# start_server corelay [extra corelay flags] | start_server baseline-default|baseline-tuned echo|broadcast
start_server() {
  local kind=$1; shift
  NSTART=$((NSTART + 1))
  local slog=$WORK/server.$NSTART.log   # a new file each time: never parse the previous server's address
  rm -rf "$WORK/data"; mkdir -p "$WORK/data"; : >"$slog"
  case $kind in
    corelay)
      SCMD="corelay run --listen 127.0.0.1:0 --threads 2 --data-dir DATA --auth-secret bench-secret-0123456789abcdef0123456789 --api-key bench-api-key-0123456789abcdef0123456789 --echo-path /echo --accept-rate 1000000 $*"
      "$BIN/corelay" run --listen 127.0.0.1:0 --threads 2 --data-dir "$WORK/data" --auth-secret bench-secret-0123456789abcdef0123456789 --api-key bench-api-key-0123456789abcdef0123456789 \
        --echo-path /echo --accept-rate 1000000 "$@" >"$slog" 2>&1 &
      ;;
    baseline-default)
      SCMD="baseline --listen 127.0.0.1:0 --mode $1"
      "$BIN/baseline" --listen 127.0.0.1:0 --mode "$1" >"$slog" 2>&1 &
      ;;
    baseline-tuned)
      SCMD="baseline --listen 127.0.0.1:0 --mode $1 --read-buffer 4096"
      "$BIN/baseline" --listen 127.0.0.1:0 --mode "$1" --read-buffer 4096 >"$slog" 2>&1 &
      ;;
  esac
  SPID=$!
  SADDR=""
  for _ in $(seq 100); do
    SADDR=$(grep -oE 'listening on [0-9.:]+' "$slog" 2>/dev/null | awk '{print $3}')
    [[ -n $SADDR ]] && break
    kill -0 "$SPID" 2>/dev/null || break
    sleep 0.1
  done
  if [[ -z $SADDR ]]; then
    log "server $kind did not start: $(tail -c 300 "$slog")"
    stop_server; return 1
  fi
  sleep 0.3   # let RSS settle after startup (the idle scenario samples it before connecting)
}

stop_server() {
  [[ -z $SPID ]] && return
  kill "$SPID" 2>/dev/null
  for _ in $(seq 30); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SPID" 2>/dev/null
  wait "$SPID" 2>/dev/null
  SPID=""
  sleep 0.5   # let the closing sockets go before the next server
}

over_budget() { (( $(date +%s) - START > MAX_SECONDS )); }

# measure SERVER SCENARIO RUN OUTER_TIMEOUT_S [corelay-load args...]   (server already started; "{PID}" and
# "{ADDR}" in the arguments are replaced)
measure() {
  local server=$1 scenario=$2 run=$3 tmo=$4; shift 4
  local args=() a
  for a in "$@"; do a=${a//\{PID\}/$SPID}; a=${a//\{ADDR\}/$SADDR}; args+=("$a"); done
  local cmd="corelay-load ${args[*]}"
  log "$server $scenario run $run: $cmd"
  local out lo0 lo1
  lo0=$(listen_overflows)
  out=$(timeout -k 5 "$tmo" "$BIN/corelay-load" "${args[@]}" --quiet 2>>"$LOG")
  local rc=$?
  lo1=$(listen_overflows)
  local line
  line=$(grep '^RESULT ' <<<"$out" | tail -1); line=${line#RESULT }
  [[ -z $line ]] && line="{\"error\":\"corelay-load exited $rc without a RESULT line\"}"
  record "$server" "$scenario" "$run" "$cmd" "$line" "$(( ${lo1:-0} - ${lo0:-0} ))"
  log "  -> $(cut -c1-220 <<<"$line")"
}

# one_server SERVERKIND SCENARIO RUN TIMEOUT START_ARGS(string) -- LOADGEN ARGS
one() {
  local kind=$1 scenario=$2 run=$3 tmo=$4 sargs=$5; shift 5
  if over_budget; then
    SCMD=""; record "$kind" "$scenario" "$run" "" '{"error":"skipped: MAX_SECONDS reached"}'; return
  fi
  # shellcheck disable=SC2086
  if start_server "$kind" $sargs; then
    measure "$kind" "$scenario" "$run" "$tmo" "$@"
    stop_server
  else
    record "$kind" "$scenario" "$run" "" '{"error":"server did not start"}'
  fi
}

procs_for() { if (( $1 > 14000 )); then echo 2; else echo 1; fi; }

# --- 1. idle memory at N_IDLE: corelay ws/sse/longpoll, baseline default and tuned (ws) --------------------------
P=$(procs_for "$N_IDLE")
idle_args() { # N TRANSPORT
  local n=$1 p; p=$(procs_for "$1")
  case $2 in
    ws) echo "idle --url ws://{ADDR}/echo --connections $n --procs $p --server-pid {PID} --hold $IDLE_HOLD --timeout 90s" ;;
    sse) echo "idle --transport sse --url http://{ADDR}/sse?channels=bench:idle --token-secret bench-secret-0123456789abcdef0123456789 --connections $n --procs $p --server-pid {PID} --hold $IDLE_HOLD --timeout 90s" ;;
    longpoll) echo "idle --transport longpoll --url http://{ADDR}/poll?channels=bench:idle&cursor=bench:idle%3D0&timeout=60 --token-secret bench-secret-0123456789abcdef0123456789 --connections $n --procs $p --server-pid {PID} --hold $IDLE_HOLD --timeout 90s" ;;
  esac
}
for run in $(seq "$RUNS"); do
  # shellcheck disable=SC2046
  {
    one corelay idle_ws "$run" 120 "--heartbeat-interval $IDLE_HB" $(idle_args "$N_IDLE" ws)
    one baseline-default idle_ws "$run" 120 echo $(idle_args "$N_IDLE" ws)
    one baseline-tuned idle_ws "$run" 120 echo $(idle_args "$N_IDLE" ws)
    one corelay idle_sse "$run" 120 "--heartbeat-interval $IDLE_HB" $(idle_args "$N_IDLE" sse)
    one corelay idle_longpoll "$run" 120 "--heartbeat-interval $IDLE_HB" $(idle_args "$N_IDLE" longpoll)
  }
done

# --- 2. memory curve: single runs at MEM_POINTS ------------------------------------------------------------------
for n in $MEM_POINTS; do
  # shellcheck disable=SC2046
  {
    one corelay idle_ws 1 120 "--heartbeat-interval $IDLE_HB" $(idle_args "$n" ws)
    one baseline-default idle_ws 1 120 echo $(idle_args "$n" ws)
    one baseline-tuned idle_ws 1 120 echo $(idle_args "$n" ws)
    one corelay idle_sse 1 120 "--heartbeat-interval $IDLE_HB" $(idle_args "$n" sse)
    one corelay idle_longpoll 1 120 "--heartbeat-interval $IDLE_HB" $(idle_args "$n" longpoll)
  }
done

# --- 3. echo: closed loop and open loop at ECHO_RATE ------------------------------------------------------------
ECHO="echo --url ws://{ADDR}/echo --connections $ECHO_CONNS --size $ECHO_SIZE --duration $ECHO_DUR --server-pid {PID} --timeout 60s"
for run in $(seq "$RUNS"); do
  for s in corelay baseline-default baseline-tuned; do
    # shellcheck disable=SC2086
    if [[ $s == corelay ]]; then one $s echo_closed "$run" 90 "" $ECHO; else one $s echo_closed "$run" 90 echo $ECHO; fi
  done
  for s in corelay baseline-default baseline-tuned; do
    # shellcheck disable=SC2086
    if [[ $s == corelay ]]; then one $s echo_open "$run" 90 "" $ECHO --rate "$ECHO_RATE"; else one $s echo_open "$run" 90 echo $ECHO --rate "$ECHO_RATE"; fi
  done
done
# latency curve: single runs at the other rates, corelay and the tuned baseline
for rate in $SWEEP_RATES; do
  # shellcheck disable=SC2086
  {
    one corelay echo_open 1 90 "" $ECHO --rate "$rate"
    one baseline-tuned echo_open 1 90 echo $ECHO --rate "$rate"
  }
done

# --- 4. fan-out to FANOUT_N subscribers (corelay); the baseline's broadcast mode has no /api to create the
#        conversation the load generator needs: one attempt is recorded to show it, then it is skipped --------------
FP=$(procs_for "$FANOUT_N")
FAN="fanout --url ws://{ADDR}/ws --api http://{ADDR} --api-key bench-api-key-0123456789abcdef0123456789 --token-secret bench-secret-0123456789abcdef0123456789 --subscribers $FANOUT_N --messages $FANOUT_MSGS --procs $FP --timeout 90s"
for run in $(seq "$RUNS"); do
  # shellcheck disable=SC2086
  one corelay fanout "$run" 120 "--max-body-bytes 1MiB" $FAN
done
# shellcheck disable=SC2086
one baseline-tuned fanout 1 60 broadcast fanout --url ws://{ADDR}/ws --api http://{ADDR} --api-key bench-api-key-0123456789abcdef0123456789 --token-secret bench-secret-0123456789abcdef0123456789 \
  --subscribers 100 --messages 2 --timeout 30s

# --- 5. connect storm -------------------------------------------------------------------------------------------
SP=$(procs_for "$STORM_N"); (( STORM_N > 5000 )) && SP=2
STORM="connect-storm --url ws://{ADDR}/echo --connections $STORM_N --procs $SP --timeout 60s"
for run in $(seq "$RUNS"); do
  # shellcheck disable=SC2086
  {
    one corelay connect_storm "$run" 90 "" $STORM
    one baseline-default connect_storm "$run" 90 echo $STORM
    one baseline-tuned connect_storm "$run" 90 echo $STORM
  }
done

# --- 6. heartbeat CPU: HB_N idle WebSockets, HB_INTERVAL heartbeats, held HB_HOLD (corelay only) ----------------
HP=$(procs_for "$HB_N")
for run in $(seq "$HB_RUNS"); do
  # shellcheck disable=SC2086
  one corelay heartbeat "$run" 200 "--heartbeat-interval $HB_INTERVAL" \
    idle --url ws://{ADDR}/echo --connections "$HB_N" --procs "$HP" --server-pid {PID} --hold "$HB_HOLD" --timeout 180s
done

# --- 7. criterion micro benches (one run) -----------------------------------------------------------------------
if [[ $CRITERION == 1 ]] && ! over_budget; then
  stamp=$WORK/criterion.stamp; touch "$stamp"; sleep 1
  cb="cargo bench --bench codec --bench hot_path --bench store -- --warm-up-time 1 --measurement-time 2"
  ok=0
  for attempt in 1 2 3; do
    log "criterion (attempt $attempt): $cb"
    # shellcheck disable=SC2086
    if timeout 1500 $cb >>"$LOG" 2>&1; then ok=1; break; fi
    log "cargo bench failed; retrying in 60 s"; sleep 60
  done
  python3 - "$ROOT/target/criterion" "$stamp" "$OUT_DIR/criterion.json" "$cb" "$ok" <<'EOF'
import json, os, sys
root, stamp, out, cmd, ok = sys.argv[1:6]
since = os.path.getmtime(stamp)
rows = []
for d, _, files in os.walk(root):
    if os.path.basename(d) != "new" or "estimates.json" not in files:
        continue
    est = os.path.join(d, "estimates.json")
    if os.path.getmtime(est) < since:
        continue  # stale: not produced by this run
    b = json.load(open(os.path.join(d, "benchmark.json")))
    e = json.load(open(est))
    rows.append({"id": b["full_id"], "median_ns": e["median"]["point_estimate"],
                 "median_lo_ns": e["median"]["confidence_interval"]["lower_bound"],
                 "median_hi_ns": e["median"]["confidence_interval"]["upper_bound"],
                 "mean_ns": e["mean"]["point_estimate"], "throughput": b.get("throughput")})
rows.sort(key=lambda r: r["id"])
json.dump({"cmd": cmd, "ok": ok == "1", "benches": rows}, open(out, "w"), indent=1)
print(f"criterion: {len(rows)} benchmarks -> {out}", file=sys.stderr)
EOF
fi

# --- tables and plots -------------------------------------------------------------------------------------------
cp "$LOG" "$OUT_DIR/report-log.txt"   # (*.log is git-ignored)
python3 benches/scripts/plot.py --results "$RESULTS" --out-dir "$OUT_DIR" --tables "$OUT_DIR/tables.md"
# The generated tables replace the block between the markers at the end of docs/BENCHMARKS.md, so the report's
# figures always come from the latest run (the prose above them quotes the run it was written from).
python3 - "$OUT_DIR/tables.md" docs/BENCHMARKS.md <<'PY'
import sys
tables, doc = open(sys.argv[1]).read(), open(sys.argv[2]).read()
begin, end = "<!-- generated:begin -->", "<!-- generated:end -->"
if begin in doc and end in doc:
    head, rest = doc.split(begin, 1)
    tail = rest.split(end, 1)[1]
    open(sys.argv[2], "w").write(head + begin + "\n" + tables.strip() + "\n" + end + tail)
PY
log "done in $(( $(date +%s) - START )) s: $RESULTS, $OUT_DIR/tables.md, $OUT_DIR/memory.svg, $OUT_DIR/latency.svg"
