#!/usr/bin/env bash
# Applies tuning/sysctl-corelay.conf key by key (like `sysctl -p`, but one failure does not hide the
# others, and a cap already above the profile is never lowered), saves the previous values first, raises
# the soft open-file limit to the hard cap, and with --install also makes it permanent (limits.d and
# sysctl.d). It reports what it could not change and exits 0: in a container much of this is read-only.
#
#   tuning/apply.sh [--install] [--dry-run]
#   . tuning/apply.sh         # sourced: the soft nofile raise also applies to YOUR shell
#
# Restore the previous values with: sysctl -p <the backup file it prints>.

_corelay_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$_corelay_here/common.sh"
mkdir -p "$CORELAY_STATE" 2>/dev/null || CORELAY_STATE=${TMPDIR:-/tmp}

_corelay_apply() (
    set -u
    profile="$_corelay_here/sysctl-corelay.conf"
    install=0 dry=0
    for arg in "$@"; do
        case "$arg" in
        --install) install=1 ;;
        --dry-run) dry=1 ;;
        -h | --help)
            sed -n '2,10p' "$_corelay_here/apply.sh" | sed 's/^# \{0,1\}//'
            return 3
            ;;
        *)
            echo "apply.sh: unknown argument $arg (try --help)" >&2
            return 2
            ;;
        esac
    done
    backup="$CORELAY_STATE/sysctl-before-$(date +%Y%m%d-%H%M%S).conf"
    failed="$CORELAY_STATE/unchangeable" # read by check.sh
    ((dry)) || : >"$failed"

    echo "== sysctl profile: $profile$( ((dry)) && echo ' (dry run)')"
    n_set=0 n_same=0 n_fail=0
    while IFS=$'\t' read -r key want; do
        file=/proc/sys/${key//.//}
        if [[ ! -e $file ]]; then
            echo "  skip   $key: not present on this kernel (module not loaded?)"
            ((dry)) || printf '%s\tabsent (module not loaded or not in this kernel)\n' "$key" >>"$failed"
            continue
        fi
        cur=$(tr -s ' \t' ' ' <"$file")
        rule=$(corelay_rule "$key")
        if [[ $(corelay_compare "$rule" "$want" "$cur") == OK ]]; then
            [[ $cur == "$want" ]] && echo "  same   $key = $cur" || echo "  keep   $key = $cur (wanted $want; already enough)"
            n_same=$((n_same + 1))
            continue
        fi
        target=$(corelay_target "$rule" "$want" "$cur")
        if ((dry)); then
            echo "  would  $key: $cur -> $target"
            continue
        fi
        echo "$key = $cur" >>"$backup"
        # What `sysctl -w` does, with the kernel's own error kept for the report.
        if err=$( { printf '%s\n' "$target" >"$file"; } 2>&1); then
            got=$(tr -s ' \t' ' ' <"$file")
            if [[ $got == "$target" ]]; then
                echo "  set    $key: $cur -> $target"
                n_set=$((n_set + 1))
                continue
            fi
            why="clamped by the kernel to $got"
        else
            case "$err" in
            *Read-only*) why="read-only (/proc/sys mounted read-only: set it on the host or through the container runtime)" ;;
            *ermission* | *"not permitted"*) why="permission denied (needs root with CAP_SYS_ADMIN/CAP_NET_ADMIN in this namespace)" ;;
            *"Invalid argument"*) why="rejected by the kernel (invalid argument)" ;;
            *) why=${err##*: } ;;
            esac
        fi
        echo "  FAIL   cannot set $key: $why"
        printf '%s\t%s\n' "$key" "$why" >>"$failed"
        n_fail=$((n_fail + 1))
    done < <(corelay_profile "$profile")
    echo "  -> $n_set set, $n_same already as wanted, $n_fail could not be set"
    if ((n_set > 0)); then
        echo "  previous values saved: restore with  sysctl -p $backup"
    else
        rm -f "$backup"
    fi

    if ((install)); then
        echo "== install"
        for pair in "$_corelay_here/limits.conf:/etc/security/limits.d/90-corelay.conf" \
            "$profile:/etc/sysctl.d/60-corelay.conf"; do
            src=${pair%%:*} dst=${pair#*:}
            if ((dry)); then
                echo "  would  install $dst"
            elif install -D -m 0644 "$src" "$dst" 2>/dev/null; then
                echo "  installed $dst"
            else
                echo "  FAIL   cannot install $dst (read-only /etc or not root)"
            fi
        done
        echo "  limits.d applies to NEW PAM logins; a systemd service takes LimitNOFILE= from its unit"
    fi
)

_corelay_apply "$@"
_corelay_rc=$?
if ((_corelay_rc == 0)); then
    # Runs in the calling shell when sourced, so the raise sticks there.
    echo "== open files (RLIMIT_NOFILE)"
    _corelay_hard=$(ulimit -Hn)
    echo "  before: soft $(ulimit -Sn), hard $_corelay_hard"
    if [[ $_corelay_hard != unlimited ]] && ((_corelay_hard < 1048576)); then
        if (ulimit -Hn 1048576) 2>/dev/null && ulimit -Hn 1048576 2>/dev/null; then
            _corelay_hard=1048576
            echo "  raised hard to 1048576"
        else
            echo "  UNCHANGEABLE: the hard cap $_corelay_hard cannot be raised here (needs CAP_SYS_RESOURCE;" \
                "in a container the runtime sets it, e.g. --ulimit nofile=1048576:1048576)"
            echo "  => one process can hold at most ~$((_corelay_hard - 64)) sockets: split load over processes"
        fi
    fi
    if [[ $(ulimit -Sn) != "$_corelay_hard" ]]; then
        ulimit -Sn "$_corelay_hard" 2>/dev/null && echo "  raised soft to $_corelay_hard" ||
            echo "  FAIL   cannot raise soft to $_corelay_hard"
    fi
    echo "  after:  soft $(ulimit -Sn), hard $(ulimit -Hn)"
    if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
        echo "  (that is apply.sh's own limit and its children's; for your shell: ulimit -Sn \$(ulimit -Hn)," \
            "or source it: . tuning/apply.sh)"
    fi
fi
((_corelay_rc == 3)) && _corelay_rc=0 # --help
unset _corelay_hard _corelay_here
unset -f _corelay_apply corelay_rule corelay_compare corelay_target corelay_profile
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    exit "$_corelay_rc"
else
    return "$_corelay_rc"
fi
