#!/usr/bin/env bash
# Runs every test: unit, property and integration tests (cargo), then the Autobahn RFC 6455 conformance suite
# against the release binary's echo endpoint. Installs what the tests need when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

echo "== cargo test"
cargo test --locked --workspace --lib --bins --tests --benches 2>&1

echo "== autobahn (RFC 6455 cases 1-10, over ws:// and wss://)"
tests/autobahn.sh
