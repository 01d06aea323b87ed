// Measures the SDK in headless Chromium (the demo page, default SDK options) against the real gateway:
//  1. reconnect-and-resume after a gateway restart, N times: the gateway is SIGKILLed, bob's page sends a
//     message while it is down (it waits in his outbox), the gateway starts again (same port, same data).
//     Measured from the restarted gateway's listening line to (a) alice's page being open again and (b) alice's
//     page showing bob's message.
//  2. fallback when upgrades are refused: a proxy answers every WebSocket upgrade with 403; measured from the
//     page's navigation to its client being open on SSE (two refused upgrades, then the stream).
// Usage: node --experimental-websocket scripts/measure.js [RESTARTS=20] [FALLBACKS=10]
// (CORELAY_BIN selects the gateway binary: use target/release/corelay.)
import puppeteer from "puppeteer-core";

import { Gateway, Proxy, until } from "../test/gateway.js";

const restarts = Number(process.argv[2] || 20);
const fallbacks = Number(process.argv[3] || 10);
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil((p / 100) * xs.length) - 1)];
const fmt = (xs) => `p50 ${pct(xs, 50).toFixed(0)} ms, p99 ${pct(xs, 99).toFixed(0)} ms, max ${Math.max(...xs).toFixed(0)} ms over ${xs.length}`;

const browser = await puppeteer.launch({ executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox"] });
const gw = await Gateway.start(["--demo"]);
const page = async (base, user) => {
  const ctx = await browser.createBrowserContext();
  const p = await ctx.newPage();
  await p.goto(`${base}/demo/?user=${user}&nostore=1`);
  return p;
};
const state = (p) => p.$eval("#conn", (e) => `${e.dataset.state}/${e.dataset.transport}`);
try {
  const alice = await page(gw.url, "alice");
  const bob = await page(gw.url, "bob");
  for (const p of [alice, bob]) {
    await p.waitForSelector('#conn[data-state="open"]');
    await p.click('nav button[data-conversation="alice-bob"]');
  }
  const reopen = [];
  const resume = [];
  for (let i = 0; i < restarts; i++) {
    await gw.kill();
    await until(async () => (await state(bob)).startsWith("reconnecting"), 20_000, "bob notices");
    const text = `while down ${i}`;
    await bob.type("#text", text);
    await bob.keyboard.press("Enter");
    await new Promise((r) => setTimeout(r, 300));
    await gw.restart();
    const t0 = performance.now();
    await until(async () => (await state(alice)).startsWith("open"), 60_000, "alice open");
    reopen.push(performance.now() - t0);
    await until(
      async () => (await alice.$$eval(".msg .body", (els) => els.map((e) => e.textContent))).includes(text),
      60_000,
      "bob's message",
    );
    resume.push(performance.now() - t0);
  }
  console.log(`restart → page open again: ${fmt(reopen)}`);
  console.log(`restart → message sent while down shown: ${fmt(resume)}`);

  const proxy = await Proxy.start(gw.addr, { refuseUpgrade: true });
  const fall = [];
  for (let i = 0; i < fallbacks; i++) {
    const t0 = performance.now();
    const p = await page(proxy.url, "carol");
    await p.waitForSelector('#conn[data-state="open"]', { timeout: 60_000 });
    const s = await state(p);
    if (s !== "open/sse") throw new Error(`expected open/sse, got ${s}`);
    fall.push(performance.now() - t0);
    await p.browserContext().close();
  }
  await proxy.stop();
  console.log(`upgrades refused → page open on SSE: ${fmt(fall)}`);
} finally {
  await browser.close();
  await gw.stop();
}
