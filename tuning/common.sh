# Shared by apply.sh and check.sh (sourced, not run): how each key of sysctl-corelay.conf is judged.
#
# Rules: ge = a cap, more is fine; le = less is fine; eq = must match; range = the actual port range must
# contain the wanted one; buf = (tcp_rmem/tcp_wmem) min as is, default <= wanted (idle memory), max >= wanted.

corelay_rule() {
    case "$1" in
    net.ipv4.tcp_fin_timeout) echo le ;;
    net.ipv4.tcp_syncookies | net.ipv4.tcp_tw_reuse) echo eq ;;
    net.ipv4.ip_local_port_range) echo range ;;
    net.ipv4.tcp_rmem | net.ipv4.tcp_wmem) echo buf ;;
    *) echo ge ;;
    esac
}

# corelay_compare RULE "WANTED" "ACTUAL" -> OK | LOW | HIGH | DIFF
corelay_compare() {
    local r=$1 i
    local -a w=($2) a=($3)
    case "$r" in
    eq) [[ "${w[*]}" == "${a[*]}" ]] && echo OK || echo DIFF ;;
    range) ((a[0] <= w[0] && a[1] >= w[1])) && echo OK || echo LOW ;;
    le) ((a[0] <= w[0])) && echo OK || echo HIGH ;;
    buf) if ((a[1] > w[1])); then echo HIGH; elif ((a[2] < w[2])); then echo LOW; else echo OK; fi ;;
    ge)
        for i in "${!w[@]}"; do
            ((${a[i]:-0} >= w[i])) || {
                echo LOW
                return
            }
        done
        echo OK
        ;;
    esac
}

# corelay_target RULE "WANTED" "ACTUAL" -> the value to write: the wanted one, except that a cap ("ge")
# already above the profile is never lowered (element by element).
corelay_target() {
    local r=$1 i
    local -a w=($2) a=($3) out=()
    if [[ $r != ge ]]; then
        echo "$2"
        return
    fi
    for i in "${!w[@]}"; do
        out+=($((${a[i]:-0} > w[i] ? a[i] : w[i])))
    done
    echo "${out[*]}"
}

# corelay_profile FILE: prints "key<TAB>value" for each setting (comments and blank lines skipped,
# whitespace inside values squeezed to one space).
corelay_profile() {
    local line
    while IFS= read -r line; do
        line=${line%%#*}
        [[ $line =~ ^[[:space:]]*([a-z0-9_.-]+)[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]] || continue
        printf '%s\t%s\n' "${BASH_REMATCH[1]}" "$(echo "${BASH_REMATCH[2]}" | tr -s ' \t' ' ')"
    done <"$1"
}

# Where apply.sh keeps backups and the list of keys it could not set (read by check.sh).
CORELAY_STATE=${CORELAY_TUNING_STATE:-/var/tmp/corelay-tuning}
