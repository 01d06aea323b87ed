#!/usr/bin/env bash
# Compares this machine with tuning/sysctl-corelay.conf and the open-file limits corelay wants, and says
# what it could not change here. Read-only: it never writes a setting. Always exits 0 (it reports).
#
#   tuning/check.sh
#
# Status: OK (as wanted, or better), LOW (a cap below the profile), HIGH (a per-socket default or a
# timeout above it), DIFF (a flag that differs), N/A (key absent: e.g. conntrack not loaded, which is
# fine), and UNCHANGEABLE (not OK, and this machine will not let it be changed: read-only /proc/sys, or
# apply.sh failed on it).
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
profile="$here/sysctl-corelay.conf"
. "$here/common.sh"
failed_list="$CORELAY_STATE/unchangeable"
[[ -r $failed_list ]] || failed_list=${TMPDIR:-/tmp}/unchangeable

why_unchangeable() { # KEY -> reason, or nothing if it looks changeable
    local key=$1 file=/proc/sys/${1//.//} reason
    reason=$(awk -F'\t' -v k="$key" '$1 == k { print $2 }' "$failed_list" 2>/dev/null | tail -1)
    if [[ -n $reason ]]; then
        echo "$reason"
    elif [[ ! -w $file ]]; then
        echo "not writable here (read-only /proc/sys or not root)"
    fi
}

printf '%-34s %-26s %-26s %s\n' key wanted actual status
printf '%-34s %-26s %-26s %s\n' --- ------ ------ ------
ok=0 bad=0 stuck=0
notes=()
while IFS=$'\t' read -r key want; do
    file=/proc/sys/${key//.//}
    if [[ ! -r $file ]]; then
        printf '%-34s %-26s %-26s %s\n' "$key" "$want" "-" "N/A"
        notes+=("$key: absent on this kernel (for nf_conntrack: not loaded, so nothing to size)")
        continue
    fi
    actual=$(tr -s ' \t' ' ' <"$file")
    status=$(corelay_compare "$(corelay_rule "$key")" "$want" "$actual")
    if [[ $status == OK ]]; then
        ok=$((ok + 1))
    elif reason=$(why_unchangeable "$key") && [[ -n $reason ]]; then
        notes+=("$key: $status and UNCHANGEABLE: $reason")
        status=UNCHANGEABLE
        stuck=$((stuck + 1))
    else
        notes+=("$key: $status (changeable: run tuning/apply.sh)")
        bad=$((bad + 1))
    fi
    printf '%-34s %-26s %-26s %s\n' "$key" "$want" "$actual" "$status"
done < <(corelay_profile "$profile")

# Not in the profile (auto-sized), but a hard wall at 1M connections: one watch per connection.
watches=$(cat /proc/sys/fs/epoll/max_user_watches 2>/dev/null || echo 0)
st=$( ((watches >= 1048576)) && echo OK || echo LOW)
printf '%-34s %-26s %-26s %s\n' fs.epoll.max_user_watches ">= 1048576" "$watches" "$st"
[[ $st == OK ]] || notes+=("fs.epoll.max_user_watches: LOW; set it to 2097152 (auto-sized from RAM)")

# Open files: the per-process wall. Raising the hard cap needs CAP_SYS_RESOURCE (or the runtime).
soft=$(ulimit -Sn) hard=$(ulimit -Hn) want=1048576
num() { [[ $1 == unlimited ]] && echo 99999999999 || echo "$1"; }
if (($(num "$soft") >= want)); then s_st=OK; else s_st=LOW; fi
if (($(num "$hard") >= want)); then
    h_st=OK
elif (ulimit -Hn $(($(num "$hard") + 1))) 2>/dev/null; then
    h_st=LOW
    notes+=("nofile hard: LOW (changeable: ulimit -Hn $want as root, or LimitNOFILE= / limits.conf)")
else
    h_st=UNCHANGEABLE
    notes+=("nofile hard: UNCHANGEABLE: the hard cap $hard cannot be raised in this process tree (no CAP_SYS_RESOURCE; set by the container runtime)")
fi
if [[ $s_st == LOW && $soft != "$hard" ]]; then
    notes+=("nofile soft: LOW; raise to the hard cap: ulimit -Sn $hard (or . tuning/apply.sh)")
fi
printf '%-34s %-26s %-26s %s\n' "ulimit -n (soft)" "$want" "$soft" "$s_st"
printf '%-34s %-26s %-26s %s\n' "ulimit -Hn (hard)" "$want" "$hard" "$h_st"
echo
echo "sysctl: $ok OK, $bad changeable but not as wanted, $stuck unchangeable here"
for n in "${notes[@]}"; do echo "  - $n"; done

# What the limits mean for a test on this machine.
cap=$(($(num "$hard") - 64)) # listeners, epoll, wakers, stdio, logs
if ((cap < 1000000)); then
    per=$((cap * 3 / 4))
    echo
    echo "On this machine one process can hold at most ~$cap sockets (hard cap $hard - 64 reserved fds)."
    echo "  server: a single corelay process tops out near $cap connections here; C1M needs LimitNOFILE=1048576."
    echo "  load generator: plan ~$per connections per process (25% margin): for N connections use"
    echo "    corelay-load idle --connections N --procs \$(( (N + $per - 1) / $per )) ..."
fi
inuse=$(awk '/^TCP:/ { print $3 }' /proc/net/sockstat 2>/dev/null)
mem=$(awk '/^TCP:/ { for (i = 1; i <= NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat 2>/dev/null)
echo "now: TCP sockets in use ${inuse:-?}, TCP buffer memory ${mem:-?} pages (tcp_mem pressure at $(awk '{ print $2 }' /proc/sys/net/ipv4/tcp_mem))"
exit 0
