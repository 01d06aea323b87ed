#!/usr/bin/env bash
# Autobahn|Testsuite fuzzingclient, cases 1.* to 10.* (12.*/13.* are permessage-deflate, which corelay does
# not negotiate), against the release binary's echo endpoint: over ws:// and again over wss:// (the TLS
# listener, a fresh ECDSA P-256 certificate). Fails on any FAILED case.
# Usage: tests/autobahn.sh [OUTDIR]   (reports in OUTDIR and OUTDIR-tls, default target/autobahn)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/autobahn}
# The suite's installer lives in the repository (tools/autobahn: a private venv from PyPI, Python 3 patches).
tool=tools/autobahn/run.sh
cargo build --locked --release --bin corelay
data=$(mktemp -d)
log=$(mktemp)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$data/key.pem" -out "$data/cert.pem" 2>/dev/null
./target/release/corelay run --listen 127.0.0.1:0 --threads 2 --no-pin --data-dir "$data" \
  --tls-listen 127.0.0.1:0 --tls-cert "$data/cert.pem" --tls-key "$data/key.pem" \
  --echo-path /echo --max-frame-bytes 16MiB --max-message-bytes 16MiB --max-write-queue-bytes 64MiB \
  >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$data" "$log"' EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$log" && break
  sleep 0.1
done
for _ in $(seq 100); do
  grep -q "tls listening on" "$log" && break
  sleep 0.1
done
addr=$(grep -oE '^corelay listening on [0-9.:]+' "$log" | awk '{print $4}')
tls_addr=$(grep -oE 'tls listening on [0-9.:]+' "$log" | awk '{print $4}')
[ -n "$addr" ] && [ -n "$tls_addr" ] || { cat "$log"; echo "autobahn: server did not start" >&2; exit 2; }
rm -rf "$out" "$out-tls"
# The client's close-handshake timeout is raised from Autobahn's 1 s to 10 s: on a loaded 2-core CI box the
# Python client can sit out its own 1 s timer before reading the close reply already in its socket (9.3.x
# failed once that way, UNCLEAN with the reply unread). A server that never answers a close still fails,
# after 10 s; tests/ws.rs measures our close reply after a 4 MiB fragmented echo directly.
AUTOBAHN_OPTIONS='{"closeHandshakeTimeout": 10}' bash "$tool" "ws://$addr/echo" "$out" "*" "12.*,13.*"
echo "autobahn over TLS (wss://)"
AUTOBAHN_OPTIONS='{"closeHandshakeTimeout": 10}' bash "$tool" "wss://$tls_addr/echo" "$out-tls" "*" "12.*,13.*"
kill -0 $pid || { echo "autobahn: the server died during the run" >&2; exit 1; }
