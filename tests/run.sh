#!/usr/bin/env bash
# Runs every test: unit, property and integration tests (cargo), the JavaScript SDK and the demo in headless
# Chromium (node --test), then the Autobahn RFC 6455 + RFC 7692 conformance suite against the release binary's
# echo endpoint over ws:// and wss://. Installs what the tests need when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

echo "== cargo test"
cargo test --locked --workspace --lib --bins --tests --benches 2>&1

echo "== JS client SDK and the demo in headless Chromium (node --test, against the debug binary cargo just built)"
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
[ "$node_major" -ge 20 ] || { echo "the JS SDK tests need Node.js >= 20 (found: $(node --version 2>&1))" >&2; exit 1; }
# puppeteer-core (the browser tests' driver; it downloads no browser: Debian's chromium is used) from the lock file.
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && node --experimental-websocket --test test/)

echo "== autobahn (RFC 6455 cases 1-10 and RFC 7692 cases 12-13, over ws:// and wss:// at once: about 10 min on 2 cores)"
tests/autobahn.sh
