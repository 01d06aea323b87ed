#!/usr/bin/env bash
# Autobahn|Testsuite "fuzzingclient" (RFC 6455 server conformance, ~500 cases)
# run under Python 3: autobahntestsuite 25.10.1 from PyPI is Python 2 code, so
# this installs it into a private venv and applies patches/*.patch (see README.md).
#
# Usage: run.sh URL OUTDIR [CASES] [EXCLUDE]
#   URL      echo server under test, e.g. ws://127.0.0.1:9001 (loopback only)
#   OUTDIR   report directory (index.json, index.html, one .json/.html per case,
#            plus spec.json and wstest.log written by this script)
#   CASES    comma-separated case filter, default "*"   e.g. "1.*,2.*,9.1.*"
#   EXCLUDE  comma-separated cases to skip, default ""  e.g. "12.*,13.*"
# Env: AUTOBAHN_AGENT    name of the server in the report (default: server)
#      AUTOBAHN_CACHE    where the venv lives (default: ${XDG_CACHE_HOME:-~/.cache}/autobahn-py3)
#      AUTOBAHN_TIMEOUT  seconds for the whole wstest run (default: 3600)
#      AUTOBAHN_ALLOW_NONLOOPBACK=1  allow a host other than 127.0.0.1/localhost/::1
#      PYTHON            interpreter for the venv (default: python3; needs >= 3.11)
#      AUTOBAHN_OPTIONS  JSON object of client protocol options for the spec (default: {}),
#                        e.g. '{"closeHandshakeTimeout": 10}' 
# Output: the non-OK cases, then last line
#   autobahn: N ok, N non-strict, N informational, N failed, N unimplemented
# Exit: 0 all passed (non-strict/informational/unimplemented allowed),
#       1 some case failed or is missing from the report, 2 usage/setup/run error.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] && [ $# -le 4 ] || usage
URL=$1
OUTDIR=$2
CASES=${3:-*}
EXCLUDE=${4:-}
AGENT=${AUTOBAHN_AGENT:-server}
CACHE=${AUTOBAHN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/autobahn-py3}
TIMEOUT=${AUTOBAHN_TIMEOUT:-3600}
PY=${PYTHON:-python3}

case "$URL" in
  ws://*|wss://*) ;;
  *) echo "run.sh: URL must start with ws:// or wss:// (got '$URL')" >&2; exit 2 ;;
esac
HOSTPORT=${URL#*://}; HOSTPORT=${HOSTPORT%%/*}
case "$HOSTPORT" in
  127.*|localhost|localhost:*|\[::1\]|\[::1\]:*) ;;
  *) if [ "${AUTOBAHN_ALLOW_NONLOOPBACK:-0}" != 1 ]; then
       echo "run.sh: refusing non-loopback host '$HOSTPORT' (set AUTOBAHN_ALLOW_NONLOOPBACK=1)" >&2; exit 2
     fi ;;
esac

# ---- venv: created once per (requirements, patches) content, reused after ----
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "run.sh: $PY is older than 3.11 (autobahn 26.x needs >= 3.11)" >&2; exit 2; }
KEY=$(cat "$HERE/requirements.txt" "$HERE"/patches/*.patch | sha256sum | cut -c1-16)
VENV=$CACHE/venv-$KEY
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ ! -f "$VENV/.ready" ]; then
  echo "run.sh: preparing venv $VENV" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
      -r "$HERE/requirements.txt" >&2
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  PKG=$SITE/autobahntestsuite
  find "$PKG" -name __pycache__ -prune -exec rm -rf {} +
  # the wheel ships CRLF and LF files; the patches are made against LF
  "$VENV/bin/python" - "$PKG" <<'PY'
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        if f.endswith(".py"):
            p = os.path.join(root, f)
            b = open(p, "rb").read()
            if b"\r\n" in b:
                open(p, "wb").write(b.replace(b"\r\n", b"\n"))
PY
  for P in "$HERE"/patches/*.patch; do
    if command -v patch >/dev/null 2>&1; then
      patch -d "$SITE" -p1 --batch --forward --quiet < "$P" >&2
    else
      (cd "$SITE" && git apply -p1 "$P") >&2
    fi
  done
  "$VENV/bin/python" -c 'import autobahntestsuite.fuzzing' >&2
  touch "$VENV/.ready"
fi
flock -u 9

# ---- spec ----
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$OUTDIR/index.json"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/autobahn-run.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" - "$OUTDIR" "$URL" "$AGENT" "$CASES" "$EXCLUDE" "${AUTOBAHN_OPTIONS:-{\}}" > "$OUTDIR/spec.json" <<'PY'
import json, sys
outdir, url, agent, cases, exclude, options = sys.argv[1:7]
split = lambda s: [c.strip() for c in s.split(",") if c.strip()]
print(json.dumps({
    "outdir": outdir,
    "servers": [{"agent": agent, "url": url}],
    "cases": split(cases) or ["*"],
    "exclude-cases": split(exclude),
    "exclude-agent-cases": {},
    "options": json.loads(options),
}, indent=2))
PY

# ---- run ----
echo "run.sh: wstest -m fuzzingclient against $URL (cases: $CASES${EXCLUDE:+, excluding $EXCLUDE}); log: $OUTDIR/wstest.log" >&2
set +e
(cd "$WORK" && timeout "$TIMEOUT" "$VENV/bin/python" -c \
  'import sys; sys.argv[0] = "wstest"; from autobahntestsuite.wstest import run; run()' \
  -m fuzzingclient -s "$OUTDIR/spec.json") > "$OUTDIR/wstest.log" 2>&1
RC=$?
set -e
if [ $RC -ne 0 ]; then
  echo "run.sh: wstest exited with status $RC$([ $RC -eq 124 ] && echo " (timeout after ${TIMEOUT}s)"); last lines of $OUTDIR/wstest.log:" >&2
  tail -n 15 "$OUTDIR/wstest.log" >&2
fi
if grep -q "Connection to .* failed" "$OUTDIR/wstest.log"; then
  grep "Connection to .* failed" "$OUTDIR/wstest.log" | head -3 >&2
fi
SELECTED=$(sed -n 's/^Ok, will run \([0-9]*\) test cases.*/\1/p' "$OUTDIR/wstest.log" | head -1)

set +e
"$VENV/bin/python" "$HERE/summarize.py" "$OUTDIR" "$SELECTED"
SRC=$?
set -e
if [ $RC -ne 0 ] && [ $SRC -eq 0 ]; then exit 2; fi
exit $SRC
