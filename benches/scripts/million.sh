#!/usr/bin/env bash
# One million connections on one host (issue #15): for each size N, a private redis-server, the gateway as
# P = ceil(N / PER_PROC) + 1 processes sharing one port (`corelay run --processes P`, cluster nodes over
# that Redis), and `corelay-load idle` from Q = ceil(N / PER_PROC) processes: N authenticated WebSockets
# that each follow one topic, held for two heartbeat rounds (65 s at the default 30 s interval), then one
# broadcast to all of them. Each run's RESULT line (plus this script's own figures under "million") goes
# to target/million/results.jsonl; see docs/LOADGEN.md for the fields.
#
#   benches/scripts/million.sh [--apply] [--no-build] [CONNECTIONS ...]     (default: 100000 500000 1000000)
#
#   --apply     raise the kernel settings this test needs where they are too low (says what changed, and
#               saves the old values to target/million/sysctl-before-*.conf); without it they are only checked
#   --no-build  use target/release/{corelay,corelay-load} as they are
#
# Environment (defaults): PER_PROC=17000 connections per process; GATEWAY_PROCS / LOAD_PROCS override P / Q;
# HOLD=65s; TIMEOUT (seconds for the load generator's --timeout; default 180 + N/1000, hold included);
# CONNECT_TIMEOUT=60s; MAX_PENDING=250 handshakes in flight per load process; RETRIES=5 reconnects per
# connection when the gateway says "come back later" while it opens (close 1013, 503); BROADCAST_TIMEOUT=60s;
# TOPIC=broadcast; READY_TIMEOUT=180 (s, gateway start); STOP_TIMEOUT=60 (s, gateway drain before kill -9);
# MEM_MARGIN_MIB=512 (how close MemAvailable must come back to its value before the run);
# GATEWAY_ARGS (extra `corelay run` flags, e.g. "--heartbeat-interval 2s" for a quick check).
#
# Without `--processes` in `corelay run --help` (older builds) the script starts the P nodes itself under
# one supervising shell, with the same node ids (<id>-p<i>) and data dirs (<dir>/p<i>).
#
# Bounded: every wait has a deadline, the load generator runs under `timeout`, and an EXIT/INT/TERM trap
# stops whatever is still running (TERM, then KILL) and removes the temporary directories.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }
apply=0 build=1 sizes=()
for arg in "$@"; do
    case "$arg" in
    --apply) apply=1 ;;
    --no-build) build=0 ;;
    -h | --help)
        usage
        exit 0
        ;;
    '' | *[!0-9]*)
        echo "million.sh: unknown argument $arg (try --help)" >&2
        exit 2
        ;;
    *) sizes+=("$arg") ;;
    esac
done
((${#sizes[@]})) || sizes=(100000 500000 1000000)

PER_PROC=${PER_PROC:-17000}
HOLD=${HOLD:-65s}
CONNECT_TIMEOUT=${CONNECT_TIMEOUT:-60s}
MAX_PENDING=${MAX_PENDING:-250}
RETRIES=${RETRIES:-5}
BROADCAST_TIMEOUT=${BROADCAST_TIMEOUT:-60s}
TOPIC=${TOPIC:-broadcast}
READY_TIMEOUT=${READY_TIMEOUT:-180}
STOP_TIMEOUT=${STOP_TIMEOUT:-60}
MEM_MARGIN_MIB=${MEM_MARGIN_MIB:-512}
GATEWAY_ARGS=${GATEWAY_ARGS:-}
SYSCTL_ROOT=${SYSCTL_ROOT:-/proc/sys} # tests point this at a copy
out=$root/target/million
results=$out/results.jsonl
mkdir -p "$out"

log() { printf '[million %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
max_n=0
for n in "${sizes[@]}"; do ((n > max_n)) && max_n=$n; done

# --- processes this script started; the trap stops them ----------------------------------------------
work="" bin="" redis_pid="" master_pid="" load_pid="" gw_kids=()
meminfo() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
children_of() { ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true; }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
stop_gateway() { # TERM the master, wait for it and its children, kill -9 what is left
    [[ -n $master_pid ]] || return 0
    local kids
    mapfile -t kids < <(children_of "$master_pid")
    gw_kids+=("${kids[@]}")
    kill -TERM "$master_pid" 2>/dev/null || true
    local end=$((SECONDS + STOP_TIMEOUT)) p left
    while ((SECONDS < end)); do
        left=0
        alive "$master_pid" && left=1
        for p in "${gw_kids[@]}"; do alive "$p" && left=1; done
        ((left)) || break
        sleep 0.5
    done
    for p in "$master_pid" "${gw_kids[@]}"; do
        if alive "$p"; then
            log "gateway process $p still running after ${STOP_TIMEOUT}s: kill -9"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    wait "$master_pid" 2>/dev/null || true
    master_pid="" gw_kids=()
}
stop_redis() {
    alive "$redis_pid" || return 0
    kill -TERM "$redis_pid" 2>/dev/null || true
    local end=$((SECONDS + 10))
    while alive "$redis_pid" && ((SECONDS < end)); do sleep 0.2; done
    alive "$redis_pid" && kill -KILL "$redis_pid" 2>/dev/null
    wait "$redis_pid" 2>/dev/null || true
    redis_pid=""
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if alive "$load_pid"; then
        kill -TERM "$load_pid" 2>/dev/null || true
        sleep 2
        alive "$load_pid" && kill -KILL "$load_pid" 2>/dev/null
    fi
    stop_gateway
    stop_redis
    [[ -n $work && -d $work ]] && rm -rf "$work"
    [[ -n $bin && -d $bin ]] && rm -rf "$bin"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- binaries ---------------------------------------------------------------------------------------------
if ((build)); then
    log "building target/release/corelay and corelay-load"
    cargo build --offline --release -p corelay -p corelay-load --bins >&2
fi
[[ -x target/release/corelay && -x target/release/corelay-load ]] ||
    die "missing target/release/corelay or corelay-load (build them, or drop --no-build)"
# Private copies: a rebuild of the tree during the run cannot swap the binaries under restarted children.
bin=$(mktemp -d "${TMPDIR:-/tmp}/million-bin.XXXXXX")
cp target/release/corelay target/release/corelay-load "$bin/"
gw_bin=$bin/corelay
load_bin=$bin/corelay-load
if "$gw_bin" run --help 2>/dev/null | grep -q -- '--processes'; then
    has_processes=1
else
    has_processes=0
    log "note: this corelay has no 'run --processes'; the script supervises the P nodes itself"
fi

# --- kernel settings --------------------------------------------------------------------------------------
. "$root/tuning/common.sh" # corelay_compare / corelay_target
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
log "kernel settings (tuning/check.sh, the profile for a dedicated 1M host):"
"$root/tuning/check.sh" >&2 || true

# What THIS test needs for N = max_n on one host: both ends of every connection are here (2N sockets, 2N
# epoll watches of one user, N conntrack entries if conntrack is loaded, 2N sockets' TCP memory).
need_rows=() changed=() not_ok=0
backup=$out/sysctl-before-$(date +%Y%m%d-%H%M%S).conf
sysctl_need() { # KEY RULE WANTED WHY
    local key=$1 rule=$2 want=$3 why=$4 file=$SYSCTL_ROOT/${1//.//} cur status target
    if [[ ! -r $file ]]; then
        need_rows+=("$(printf '%-32s %-26s %-26s %s' "$key" "$want" - "N/A ($why)")")
        return
    fi
    cur=$(tr -s ' \t' ' ' <"$file")
    if [[ $rule == ports ]]; then # "lo hi": at least WANTED ports
        local -a r=($cur)
        ((r[1] - r[0] + 1 >= want)) && status=OK || status=LOW
        target="10000 65535"
    else
        status=$(corelay_compare "$rule" "$want" "$cur")
        target=$(corelay_target "$rule" "$want" "$cur")
    fi
    if [[ $status != OK ]] && ((apply)); then
        echo "$key = $cur" >>"$backup"
        if { printf '%s\n' "$target" >"$file"; } 2>/dev/null && [[ $(tr -s ' \t' ' ' <"$file") == "$target" ]]; then
            changed+=("$key: $cur -> $target")
            cur=$target status="OK (set)"
        else
            status="$status (could not set)"
        fi
    fi
    [[ $status == OK* ]] || not_ok=$((not_ok + 1))
    need_rows+=("$(printf '%-32s %-26s %-26s %s' "$key" "$want" "$cur" "$status ($why)")")
}
# TCP memory (pages): idle sockets hold almost none (0 to 0.22 pages per connection measured at 2,000 and
# 20,000); a broadcast queues one small skb (~1 KiB truesize) per receiving socket until it is read, N/4
# pages. min = N/4, pressure = N/2, max = N.
pages=$(((max_n + 3) / 4))
sysctl_need fs.file-max ge $((2 * max_n + 200000)) "2 sockets per connection + margin"
[[ $(ulimit -Hn) == unlimited ]] ||
    sysctl_need fs.nr_open ge "$(ulimit -Hn)" "the per-process cap is the hard nofile, $(ulimit -Hn)"
sysctl_need fs.epoll.max_user_watches ge $((2 * max_n + 100000)) "one watch per socket, both ends, one user"
sysctl_need net.ipv4.ip_local_port_range ports $((max_n / 249 * 3 / 2 + 1000)) "ports per source IP (249 rotated)"
# Handshakes in flight per gateway listener (one per process): MAX_PENDING x Q spread over P, x4 for an
# uneven SO_REUSEPORT hash and a busy process.
max_p=${GATEWAY_PROCS:-$(((max_n + PER_PROC - 1) / PER_PROC + 1))}
max_q=${LOAD_PROCS:-$(((max_n + PER_PROC - 1) / PER_PROC))}
backlog=$((4 * MAX_PENDING * max_q / max_p))
((backlog >= 1024)) || backlog=1024
sysctl_need net.core.somaxconn ge "$backlog" "accept queue per listener"
sysctl_need net.ipv4.tcp_max_syn_backlog ge "$backlog" "SYN queue per listener"
sysctl_need net.ipv4.tcp_mem ge "$pages $((pages * 2)) $((pages * 4))" "pages: idle sockets + one broadcast"
sysctl_need net.netfilter.nf_conntrack_max ge $((max_n + max_n / 5 + 10000)) "one entry per connection if loopback is tracked"
printf '%-32s %-26s %-26s %s\n' "key (for N=$max_n)" wanted actual status >&2
for r in "${need_rows[@]}"; do echo "$r" >&2; done
if ((${#changed[@]})); then
    log "changed (restore with: sysctl -p $backup):"
    for c in "${changed[@]}"; do echo "  $c" >&2; done
fi
((not_ok == 0)) || log "WARNING: $not_ok setting(s) below what N=$max_n needs$( ((apply)) || echo '; rerun with --apply to raise them')"
hard=$(ulimit -Hn)
[[ $hard == unlimited ]] || ((hard > PER_PROC + 500)) ||
    die "hard open-file limit $hard is too small for PER_PROC=$PER_PROC connections per process"
avail=$(meminfo MemAvailable)
# ~13 KiB per connection, measured at 20,000: gateway RSS ~2.2 KB + kernel slab ~10.2 KB (both sockets,
# files, inodes, epoll watches) + load generator ~0.4 KB.
need_kib=$((max_n * 13))
log "memory: MemAvailable $((avail / 1024)) MiB; N=$max_n needs roughly $((need_kib / 1024)) MiB (13 KiB per connection)"
((avail > need_kib)) || log "WARNING: probably not enough memory for N=$max_n"

# --- one size -----------------------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
secret() { head -c 48 /dev/urandom | base64 | tr -d '/+=\n' | head -c 48; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

start_gateway() { # P GPORT RPORT DIR AUTH KEY -> master_pid
    local p=$1 gport=$2 rport=$3 dir=$4 auth=$5 key=$6
    # --presence-ttl is the node lease (refreshed every third of it); presence costs nothing per user since the
    # lease design, so 5m only spares 60 processes a refresh every 3 s (the BENCHMARKS runs used it).
    local -a common=(--redis "redis://127.0.0.1:$rport" --listen "127.0.0.1:$gport" --threads 1 --no-pin
        --auth-secret "$auth" --api-key "$key" --presence-ttl 5m)
    # The connect storm is the measurement: no accept-rate throttle (builds that have one).
    if "$gw_bin" run --help 2>/dev/null | grep -q -- '--accept-rate'; then
        common+=(--accept-rate 1000000)
    fi
    # shellcheck disable=SC2206
    local -a extra=($GATEWAY_ARGS)
    if ((has_processes)); then
        "$gw_bin" run --processes "$p" "${common[@]}" --node-id million --data-dir "$dir" "${extra[@]}" \
            >"$work/gateway.log" 2>&1 &
        master_pid=$!
    else
        (
            kids=()
            trap 'kill -TERM "${kids[@]}" 2>/dev/null; wait' TERM
            for ((i = 0; i < p; i++)); do
                "$gw_bin" run "${common[@]}" --node-id "million-p$i" --data-dir "$dir/p$i" "${extra[@]}" &
                kids+=($!)
            done
            wait
        ) >"$work/gateway.log" 2>&1 &
        master_pid=$!
    fi
}

wait_ready() { # P GPORT: P children, then /readyz 200 on 2P fresh connections in a row
    local p=$1 gport=$2 end=$((SECONDS + READY_TIMEOUT)) ok=0 code kids
    while ((SECONDS < end)); do
        alive "$master_pid" || return 1
        kids=$(children_of "$master_pid" | wc -l)
        if ((kids >= p)); then
            code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$gport/readyz" || true)
            if [[ $code == 200 ]]; then
                ok=$((ok + 1))
                ((ok >= 2 * p)) && return 0
                continue
            fi
            ok=0
        fi
        sleep 0.3
    done
    return 1
}

run_one() {
    local n=$1
    local p=${GATEWAY_PROCS:-$(((n + PER_PROC - 1) / PER_PROC + 1))}
    local q=${LOAD_PROCS:-$(((n + PER_PROC - 1) / PER_PROC))}
    local timeout_s=${TIMEOUT:-$((180 + n / 1000))}
    work=$(mktemp -d "${TMPDIR:-/tmp}/million.XXXXXX")
    local mem0 gport rport auth key
    mem0=$(meminfo MemAvailable)
    rport=$(free_port)
    gport=$(free_port)
    auth=$(secret)
    key=$(secret)
    log "N=$n: gateway P=$p processes on 127.0.0.1:$gport, load generator Q=$q processes, timeout ${timeout_s}s"

    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
        --maxclients 10000 >"$work/redis.log" 2>&1 &
    redis_pid=$!
    local end=$((SECONDS + 20))
    until redis-cli -p "$rport" ping >/dev/null 2>&1; do
        ((SECONDS < end)) && alive "$redis_pid" || die "redis-server did not start: $(tail -3 "$work/redis.log")"
        sleep 0.1
    done

    local t0=$SECONDS
    start_gateway "$p" "$gport" "$rport" "$work/data" "$auth" "$key"
    wait_ready "$p" "$gport" || die "gateway not ready within ${READY_TIMEOUT}s: $(tail -5 "$work/gateway.log")"
    local ready_s=$((SECONDS - t0))
    mapfile -t gw_kids < <(children_of "$master_pid")
    log "gateway ready after ${ready_s}s: master $master_pid, ${#gw_kids[@]} children"

    local redis_t0 rc=0
    redis_t0=$(ticks "$redis_pid")
    timeout -k 15 $((timeout_s + 90)) "$load_bin" idle --url "ws://127.0.0.1:$gport/ws" --token-secret "$auth" \
        --procs "$q" --connections "$n" --max-pending "$MAX_PENDING" --retries "$RETRIES" --follow "$TOPIC" --hold "$HOLD" \
        --broadcast --api "http://127.0.0.1:$gport" --api-key "$key" --broadcast-timeout "$BROADCAST_TIMEOUT" \
        --server-children-of "$master_pid" --timeout "${timeout_s}s" --connect-timeout "$CONNECT_TIMEOUT" \
        >"$work/load.out" 2> >(tee "$work/load.err" >&2) &
    load_pid=$!
    wait "$load_pid" || rc=$?
    load_pid=""
    local redis_cpu_s redis_rss_kib
    redis_cpu_s=$(awk -v a="$redis_t0" -v b="$(ticks "$redis_pid")" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (b - a) / hz }')
    redis_rss_kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$redis_pid/status" 2>/dev/null || echo null)
    local result
    result=$(grep '^RESULT ' "$work/load.out" | tail -1 | cut -d' ' -f2-)
    [[ -n $result ]] || result="{\"scenario\":\"idle\",\"error\":\"no RESULT line (exit status $rc)\"}"

    log "N=$n: stopping the gateway and redis"
    local t_stop=$SECONDS
    stop_gateway
    local stop_s=$((SECONDS - t_stop))
    stop_redis
    cp "$work/gateway.log" "$out/gateway-$n.log" 2>/dev/null || true
    rm -rf "$work"
    work=""

    # Memory back? (TIME_WAIT sockets and freed slabs take a moment.)
    local mem1 margin=$((MEM_MARGIN_MIB * 1024)) returned=false end2=$((SECONDS + 60))
    while :; do
        mem1=$(meminfo MemAvailable)
        ((mem0 - mem1 <= margin)) && returned=true && break
        ((SECONDS < end2)) || break
        sleep 2
    done
    local tcp_inuse tw
    tcp_inuse=$(awk '/^TCP:/ { print $3 }' /proc/net/sockstat)
    tw=$(awk '/^TCP:/ { for (i = 1; i <= NF; i++) if ($i == "tw") print $(i + 1) }' /proc/net/sockstat)
    local extra
    extra=$(jq -nc --argjson n "$n" --argjson p "$p" --argjson q "$q" --argjson ready "$ready_s" \
        --argjson stop "$stop_s" --argjson m0 "$mem0" --argjson m1 "$mem1" --argjson ret "$returned" \
        --argjson margin "$margin" --argjson rc "$rc" --argjson rcpu "$redis_cpu_s" \
        --argjson rrss "${redis_rss_kib:-null}" --argjson inuse "${tcp_inuse:-null}" --argjson tw "${tw:-null}" \
        --argjson sup "$((1 - has_processes))" --arg hold "$HOLD" \
        '{connections: $n, gateway_processes: $p, load_processes: $q, gateway_ready_s: $ready,
          gateway_stop_s: $stop, load_exit: $rc, hold: $hold, self_supervised: ($sup == 1),
          redis_cpu_s: $rcpu, redis_rss_kib: $rrss,
          mem_available_start_kib: $m0, mem_available_end_kib: $m1,
          mem_not_returned_kib: ($m0 - $m1), mem_margin_kib: $margin, mem_returned: $ret,
          tcp_inuse_after: $inuse, tcp_tw_after: $tw}')
    echo "$result" | jq -c --argjson m "$extra" '. + {million: $m}' >>"$results"
    echo "$result" | jq -c --argjson m "$extra" '. + {million: $m}' |
        jq -r '"N=\(.million.connections): connected \(.connected) of \(.connections), closed_during_hold \(.closed_during_hold), " +
            "hold_cpu_pct \(.hold_cpu_pct), server \(.bytes_per_conn) B/conn over \(.server_processes) processes, " +
            "kernel slab \(.kernel_slab_per_conn_bytes) B/conn, client \(.client_bytes_per_conn) B/conn, " +
            "broadcast \(.broadcast_delivered)/\(.broadcast_expected) last \(.broadcast_last_ms) ms p50 \(.broadcast_p50_ms) ms, " +
            "\(.deliveries_per_s_per_core) deliveries/s/core; memory returned: \(.million.mem_returned) " +
            "(\(.million.mem_not_returned_kib) KiB short)" + (if .error then "; ERROR \(.error)" else "" end)' >&2
    ((rc == 0)) || log "N=$n: the load generator exited with status $rc"
}

for n in "${sizes[@]}"; do
    run_one "$n"
done
log "results: $results"
