#!/usr/bin/env bash
# Autobahn|Testsuite fuzzingclient, cases 1.* to 10.* (12.*/13.* are permessage-deflate, which corelay does
# not negotiate), against the release binary's echo endpoint. Fails on any FAILED case.
# Usage: tests/autobahn.sh [OUTDIR]   (report in OUTDIR, default target/autobahn)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/autobahn}
tool=../shared/tools/autobahn/run.sh
if [ ! -x "$tool" ] && [ ! -f "$tool" ]; then
  echo "autobahn: $tool not found (it ships in the workplace's shared/ folder beside the repo)" >&2
  exit 2
fi
cargo build --locked --release --bin corelay
data=$(mktemp -d)
log=$(mktemp)
./target/release/corelay run --listen 127.0.0.1:0 --threads 2 --no-pin --data-dir "$data" \
  --echo-path /echo --max-frame-bytes 16MiB --max-message-bytes 16MiB --max-write-queue-bytes 64MiB \
  >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$data" "$log"' EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$log" && break
  sleep 0.1
done
addr=$(grep -oE 'listening on [0-9.:]+' "$log" | awk '{print $3}')
[ -n "$addr" ] || { cat "$log"; echo "autobahn: server did not start" >&2; exit 2; }
rm -rf "$out"
bash "$tool" "ws://$addr/echo" "$out" "*" "12.*,13.*"
kill -0 $pid || { echo "autobahn: the server died during the run" >&2; exit 1; }
