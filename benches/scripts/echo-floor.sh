#!/usr/bin/env bash
# Server CPU per echoed message as a ratio to the floor, side by side in one invocation: the floor reference
# (benches/floor: a minimal mio echo, the least work this kernel allows), corelay, and the tuned tokio-tungstenite
# baseline (--read-buffer 4096), all with 2 threads, on ECHO_CONNS WebSockets echoing ECHO_SIZE-byte binary messages,
# closed loop and open loop at ECHO_RATE/s, each quiet and with a noisy neighbour (a one-core CPU hog running from
# before the server starts until after it stops). Server CPU per echo is utime+stime of the server process over the
# window divided by the echoes received in it (the load generator's server_cpu_us_per_msg); a fresh server per
# measurement, interleaved: for run, for condition (quiet, noisy), for mode (closed, open), for server (floor,
# corelay, baseline), so the three servers of one (run, condition, mode) ran back to back and their ratios are
# computed within that run. Target (issue #17): corelay <= 1.05x the floor, and below the baseline, in both conditions.
#
# Usage: benches/scripts/echo-floor.sh                       (~10 min on the 2-core dev VM with the defaults)
#        RUNS=1 ECHO_DUR=2s benches/scripts/echo-floor.sh    (smoke run, ~1.5 min)
# Env: RUNS (default 3), ECHO_DUR (10s; Ns, Nm or plain seconds), ECHO_CONNS (100), ECHO_SIZE (64), ECHO_RATE (20000),
#      OUT (results dir, default target/echo-floor: results.jsonl, summary.md, header.txt, run.log),
#      SKIP_BUILD (1 reuses the release binaries as they are). Loopback only.
set -uo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
ECHO_DUR=${ECHO_DUR:-10s}
ECHO_CONNS=${ECHO_CONNS:-100}
ECHO_SIZE=${ECHO_SIZE:-64}
ECHO_RATE=${ECHO_RATE:-20000}
OUT=${OUT:-target/echo-floor}
SKIP_BUILD=${SKIP_BUILD:-0}
SECRET=bench-secret-0123456789abcdef0123456789
KEY=bench-api-key-0123456789abcdef0123456789
REL=${CARGO_TARGET_DIR:-target}/release
case $ECHO_DUR in
  *m) dur_s=$(( ${ECHO_DUR%m} * 60 )) ;;
  *s) dur_s=${ECHO_DUR%s} ;;
  *) dur_s=$ECHO_DUR ;;
esac
[[ $dur_s =~ ^[0-9]+$ ]] || { echo "echo-floor.sh: ECHO_DUR must be Ns, Nm or seconds (got $ECHO_DUR)" >&2; exit 1; }

mkdir -p "$OUT"; : >"$OUT/results.jsonl"; : >"$OUT/run.log"
work=$(mktemp -d /tmp/echo-floor.XXXXXX); SPID=""; SADDR=""; SCMD=""; HOG=""
log() { echo "$*" | tee -a "$OUT/run.log" >&2; }
stop_server() {
  [[ -z $SPID ]] && return
  kill "$SPID" 2>/dev/null
  for _ in $(seq 30); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null; SPID=""
  sleep 0.3   # let the closing sockets go before the next server
}
stop_hog() { [[ -n $HOG ]] && { kill -9 "$HOG" 2>/dev/null; wait "$HOG" 2>/dev/null; }; HOG=""; }
cleanup() { stop_server; stop_hog; rm -rf "$work"; }
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

if [[ $SKIP_BUILD != 1 ]]; then
  log "build: cargo build --release -p corelay -p corelay-load --bins --example floor --example baseline"
  timeout 1800 cargo build --release -p corelay -p corelay-load --bins --example floor --example baseline \
    >>"$OUT/run.log" 2>&1 || { log "build failed; see $OUT/run.log"; exit 1; }
fi
# A private copy: a rebuild of the working tree during the run cannot swap the binaries.
mkdir -p "$work/bin"
cp "$REL/corelay" "$REL/corelay-load" "$REL/examples/floor" "$REL/examples/baseline" "$work/bin/" || exit 1
BIN=$work/bin

# CPU seconds (utime+stime) a process has used so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || echo null; }

start_server() { # floor|corelay|baseline
  local slog=$work/server.log; : >"$slog"; rm -rf "$work/data"; mkdir -p "$work/data"
  case $1 in
    floor)
      SCMD="floor --listen 127.0.0.1:0 --threads 2"
      "$BIN/floor" --listen 127.0.0.1:0 --threads 2 >"$slog" 2>&1 & ;;
    corelay)
      SCMD="corelay run --listen 127.0.0.1:0 --threads 2 --data-dir DATA --auth-secret $SECRET --api-key $KEY --echo-path /echo --accept-rate 1000000"
      "$BIN/corelay" run --listen 127.0.0.1:0 --threads 2 --data-dir "$work/data" --auth-secret "$SECRET" --api-key "$KEY" \
        --echo-path /echo --accept-rate 1000000 >"$slog" 2>&1 & ;;
    baseline)
      SCMD="baseline --listen 127.0.0.1:0 --mode echo --read-buffer 4096 --threads 2"
      "$BIN/baseline" --listen 127.0.0.1:0 --mode echo --read-buffer 4096 --threads 2 >"$slog" 2>&1 & ;;
  esac
  SPID=$!; SADDR=""
  for _ in $(seq 100); do
    SADDR=$(grep -oE 'listening on [0-9.:]+' "$slog" 2>/dev/null | awk '{print $3}')
    [[ -n $SADDR ]] && break
    kill -0 "$SPID" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n $SADDR ]] || { log "  $1 did not start: $(tail -c 300 "$slog")"; stop_server; return 1; }
  sleep 0.3
}

echo "echo-floor.sh: $(date -u '+%F %T') UTC, git $(git rev-parse --short HEAD), $(nproc) CPUs, $(uname -r); $RUNS runs, $ECHO_CONNS connections, $ECHO_SIZE B, $ECHO_DUR windows, open loop at $ECHO_RATE/s; results in $OUT" | tee "$OUT/header.txt"
for run in $(seq "$RUNS"); do
  for cond in quiet noisy; do
    for mode in closed open; do
      for server in floor corelay baseline; do
        hog_cpu=null
        if [[ $cond == noisy ]]; then sh -c 'while :; do :; done' & HOG=$!; sleep 0.2; fi
        line=""
        if start_server "$server"; then
          rate=(); [[ $mode == open ]] && rate=(--rate "$ECHO_RATE")
          line=$(timeout -k 5 $(( dur_s + 90 )) "$BIN/corelay-load" echo --url "ws://$SADDR/echo" --connections "$ECHO_CONNS" \
            --size "$ECHO_SIZE" --duration "$ECHO_DUR" --server-pid "$SPID" --timeout "$(( dur_s + 60 ))s" "${rate[@]}" --quiet \
            2>>"$OUT/run.log" | grep '^RESULT ' | tail -1)
          stop_server
        fi
        hog_pid=${HOG:-null}
        [[ -n $HOG ]] && hog_cpu=$(cpu_s "$HOG")
        stop_hog
        r=${line#RESULT }; [[ $r == \{* ]] || r='{"error":"no RESULT line (server did not start, or the load generator failed)"}'
        python3 - "$OUT/results.jsonl" "$run" "$cond" "$mode" "$server" "$SCMD" "$hog_pid" "$hog_cpu" "$r" <<'PY' | tee -a "$OUT/run.log"
import json, sys
path, run, cond, mode, server, scmd, hog_pid, hog_cpu, raw = sys.argv[1:10]
r = json.loads(raw)
row = {"run": int(run), "condition": cond, "mode": mode, "server": server, "server_cmd": scmd,
       "hog_pid": json.loads(hog_pid), "hog_cpu_s": json.loads(hog_cpu),
       "loadavg": " ".join(open("/proc/loadavg").read().split()[:3]), "result": r}
open(path, "a").write(json.dumps(row) + "\n")
bad = sum(r.get(k) or 0 for k in ("connect_failures", "mismatched", "lost", "closed_during_run"))
print(f"run {run} {cond:5} {mode:6} {server:8}: {r.get('msgs_per_s')} echoes/s, cpu {r.get('server_cpu_us_per_msg')} us/echo,"
      f" p50 {r.get('latency_p50_us')} us p99 {r.get('latency_p99_us')} us, errors {bad}"
      + (f", hog {hog_cpu} CPU s" if hog_pid != "null" else "") + (f" ERROR {r['error']}" if "error" in r else ""))
PY
      done
    done
  done
done

python3 - "$OUT/results.jsonl" "$OUT/header.txt" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(open(sys.argv[2]).read().strip() + "\n")
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
f = lambda x, k=2: "–" if x is None else f"{x:,.{k}f}"
ratio = lambda a, b: None if a is None or not b else a / b
cpu = lambda r: r["result"].get("server_cpu_us_per_msg")
errs = lambda r: sum(r["result"].get(k) or 0 for k in ("connect_failures", "mismatched", "lost", "closed_during_run")) + ("error" in r["result"])
groups = [(m, c) for m in ("closed", "open") for c in ("quiet", "noisy")]
servers = ("floor", "corelay", "baseline")
print("| mode | condition | server | server CPU µs/echo (median) | × floor | echoes/s | latency p50 µs | p99 µs | errors | runs |")
print("|---|---|---|---|---|---|---|---|---|---|")
meds = {}
for m, c in groups:
    for s in servers:
        rs = [r for r in rows if (r["mode"], r["condition"], r["server"]) == (m, c, s)]
        meds[m, c, s] = med([cpu(r) for r in rs])
        print(f"| {m} | {c} | {s} | {f(meds[m, c, s], 3)} | {f(ratio(meds[m, c, s], meds[m, c, 'floor']))} "
              f"| {f(med([r['result'].get('msgs_per_s') for r in rs]), 0)} | {f(med([r['result'].get('latency_p50_us') for r in rs]), 0)} "
              f"| {f(med([r['result'].get('latency_p99_us') for r in rs]), 0)} | {sum(errs(r) for r in rs)} | {len(rs)} |")
print("\nPer-run ratios (server CPU per echo, within one run):\n")
print("| mode | condition | run | floor µs/echo | corelay / floor | baseline / floor |")
print("|---|---|---|---|---|---|")
for m, c in groups:
    for run in sorted({r["run"] for r in rows}):
        v = {r["server"]: cpu(r) for r in rows if (r["mode"], r["condition"], r["run"]) == (m, c, run)}
        print(f"| {m} | {c} | {run} | {f(v.get('floor'), 3)} | {f(ratio(v.get('corelay'), v.get('floor')))} "
              f"| {f(ratio(v.get('baseline'), v.get('floor')))} |")
print("\nTarget (issue #17): corelay ≤ 1.05× the floor and below the baseline (medians):\n")
for m, c in groups:
    fl, co, ba = (meds[m, c, s] for s in servers)
    verdict = "no data" if None in (fl, co, ba) else "met" if co <= 1.05 * fl and co < ba else "NOT met"
    print(f"- {m} loop, {c}: corelay {f(ratio(co, fl))}× floor, baseline {f(ratio(ba, fl))}× floor: {verdict}")
PY
