// The demo chat in headless Chromium (Debian's chromium, driven by puppeteer-core) against the real gateway,
// under faults: a gateway killed and restarted, WebSocket and then SSE refused by HAProxy, a page offline for
// 20 s, a cluster node dying, and a gateway frozen with SIGSTOP (the liveness check). Every message arrives
// once, in order.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import puppeteer from "puppeteer-core";

import { Gateway, until } from "./gateway.js";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
let browser;

before(async () => {
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
});

after(async () => {
  await browser?.close();
});

async function freePort() {
  const s = net.createServer();
  await new Promise((ok) => s.listen(0, "127.0.0.1", ok));
  const port = s.address().port;
  await new Promise((ok) => s.close(ok));
  return port;
}

/** Resolves once something listens on 127.0.0.1:`port`. */
function listening(port, what) {
  return until(
    () =>
      new Promise((ok) => {
        const c = net.connect(port, "127.0.0.1", () => {
          c.destroy();
          ok(true);
        });
        c.on("error", () => ok(false));
      }),
    10_000,
    what,
  );
}

/** After a short settle, every page shows `want` once, in order (nothing late, nothing twice). */
async function settledOnce(pages, want) {
  await new Promise((r) => setTimeout(r, 500));
  for (const p of pages) assertExactlyOnceInOrder(await shown(p), want);
}

/** A page of the demo as `user`, in conversation `conv`, once connected. */
async function openChat(base, user, conv, query = "") {
  const context = await browser.createBrowserContext(); // its own localStorage
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${user}] page error: ${e.message}`));
  await page.goto(`${base}/demo/?user=${user}${query}`);
  await page.waitForSelector('#conn[data-state="open"]', { timeout: 30_000 });
  await page.click(`nav button[data-conversation="${conv}"]`);
  return page;
}

async function send(page, text) {
  await page.type("#text", text);
  await page.keyboard.press("Enter");
}

/** The texts of the messages shown (sent ones, by offset order), and their offsets. */
function shown(page) {
  return page.$$eval(".msg[data-offset]", (els) =>
    els.map((e) => ({ offset: Number(e.dataset.offset), body: e.querySelector(".body").textContent, state: e.dataset.state })),
  );
}

async function waitShown(page, n, ms = 20_000) {
  await until(async () => (await shown(page)).length >= n, ms, `${n} messages on the page`);
  return shown(page);
}

function transportOf(page) {
  return page.$eval("#conn", (e) => `${e.dataset.state}/${e.dataset.transport}`);
}

function assertExactlyOnceInOrder(rows, want) {
  assert.deepEqual(
    rows.map((r) => r.body),
    want,
  );
  const offsets = rows.map((r) => r.offset);
  assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b));
  assert.equal(new Set(offsets).size, offsets.length, "no offset twice");
}

class HaProxy {
  static async start(backends, { denyUpgrade = false, denySse = false, backup = false } = {}) {
    const h = new HaProxy();
    h.dir = mkdtempSync(join(tmpdir(), "corelay-haproxy-"));
    h.port = await freePort();
    const rules = [];
    if (denyUpgrade) rules.push("  http-request deny deny_status 403 if { req.hdr(upgrade) -i websocket }");
    if (denySse) rules.push("  http-request deny deny_status 403 if { path_beg /sse }");
    const servers = backends
      .map((b, i) => `  server n${i} ${b} check inter 500ms fall 1 rise 1${backup && i > 0 ? " backup" : ""}`)
      .join("\n");
    const cfg = `global
  maxconn 2000
defaults
  mode http
  timeout connect 2s
  timeout client 120s
  timeout server 120s
  timeout tunnel 120s
  option http-server-close
frontend web
  bind 127.0.0.1:${h.port}
${rules.join("\n")}
  default_backend gw
backend gw
  option httpchk GET /healthz
${servers}
`;
    writeFileSync(join(h.dir, "haproxy.cfg"), cfg);
    h.child = spawn("haproxy", ["-f", join(h.dir, "haproxy.cfg"), "-db"], { stdio: ["ignore", "ignore", "inherit"] });
    await listening(h.port, "haproxy");
    h.url = `http://127.0.0.1:${h.port}`;
    return h;
  }

  async stop() {
    const done = new Promise((ok) => this.child.once("exit", ok));
    this.child.kill("SIGKILL");
    await done;
    rmSync(this.dir, { recursive: true, force: true });
  }
}

describe("the demo in Chromium", () => {
  test("two pages chat: messages once and in order, ticks go sent → delivered → read", async () => {
    const gw = await Gateway.start(["--demo"]);
    try {
      const alice = await openChat(gw.url, "alice", "alice-bob");
      const bob = await openChat(gw.url, "bob", "alice-bob");
      assert.equal(await transportOf(alice), "open/websocket");
      for (let i = 0; i < 5; i++) await send(alice, `hello ${i}`);
      const rows = await waitShown(bob, 5);
      assertExactlyOnceInOrder(rows, [0, 1, 2, 3, 4].map((i) => `hello ${i}`));
      // Bob's page is showing the conversation: alice's ticks turn to read.
      await until(async () => (await shown(alice)).every((r) => r.state === "read"), 10_000, "read ticks");
      await send(bob, "hi alice");
      await waitShown(alice, 6);
      await alice.browserContext().close();
      await bob.browserContext().close();
    } finally {
      await gw.stop();
    }
  });

  test("the gateway is killed and restarted: pages reconnect and resume, 0 lost, 0 duplicated", async () => {
    const gw = await Gateway.start(["--demo"]);
    try {
      const alice = await openChat(gw.url, "alice", "alice-bob", "&heartbeat_s=2");
      const bob = await openChat(gw.url, "bob", "alice-bob", "&heartbeat_s=2");
      for (let i = 0; i < 3; i++) await send(alice, `before ${i}`);
      await waitShown(bob, 3);
      await gw.kill();
      await until(async () => (await transportOf(alice)).startsWith("reconnecting"), 15_000, "alice notices");
      for (let i = 0; i < 4; i++) await send(alice, `while down ${i}`);
      await gw.restart();
      const want = [0, 1, 2].map((i) => `before ${i}`).concat([0, 1, 2, 3].map((i) => `while down ${i}`));
      assertExactlyOnceInOrder(await waitShown(bob, 7, 30_000), want);
      await settledOnce([bob, alice], want);
      await alice.browserContext().close();
      await bob.browserContext().close();
    } finally {
      await gw.stop();
    }
  });

  test("HAProxy refuses WebSocket upgrades, then SSE too: the pages carry on over SSE, then long polling", async () => {
    const gw = await Gateway.start(["--demo"]);
    let ha = await HaProxy.start([gw.addr], { denyUpgrade: true });
    try {
      const alice = await openChat(ha.url, "alice", "alice-bob");
      const bob = await openChat(ha.url, "bob", "alice-bob");
      assert.equal(await transportOf(alice), "open/sse");
      assert.equal(await transportOf(bob), "open/sse");
      for (let i = 0; i < 3; i++) await send(alice, `sse ${i}`);
      await send(bob, "sse back");
      await waitShown(alice, 4);
      assertExactlyOnceInOrder(await waitShown(bob, 4), ["sse 0", "sse 1", "sse 2", "sse back"]);
      await alice.browserContext().close();
      await bob.browserContext().close();
      await ha.stop();

      ha = await HaProxy.start([gw.addr], { denyUpgrade: true, denySse: true });
      const carol = await openChat(ha.url, "carol", "carol-dave");
      const dave = await openChat(ha.url, "dave", "carol-dave");
      assert.equal(await transportOf(carol), "open/poll");
      for (let i = 0; i < 3; i++) await send(carol, `poll ${i}`);
      await send(dave, "poll back");
      await waitShown(carol, 4);
      assertExactlyOnceInOrder(await waitShown(dave, 4), ["poll 0", "poll 1", "poll 2", "poll back"]);
      await carol.browserContext().close();
      await dave.browserContext().close();
    } finally {
      await ha.stop();
      await gw.stop();
    }
  });

  test("a page offline for 20 s while the other sends 50 messages gets all 50, once, in order", async () => {
    const gw = await Gateway.start(["--demo"]);
    try {
      const alice = await openChat(gw.url, "alice", "alice-bob");
      const bob = await openChat(gw.url, "bob", "alice-bob", "&heartbeat_s=2");
      await bob.setOfflineMode(true);
      const started = Date.now();
      for (let i = 0; i < 50; i++) await send(alice, `offline ${i}`);
      // The page lost its connection (the browser cut it, or the liveness check found it dead).
      await until(async () => (await transportOf(bob)).startsWith("reconnecting"), 15_000, "bob offline");
      await until(async () => (await shown(alice)).length === 50, 20_000, "alice's 50 sent");
      await new Promise((r) => setTimeout(r, Math.max(0, 20_000 - (Date.now() - started))));
      await bob.setOfflineMode(false);
      const want = [...Array(50).keys()].map((i) => `offline ${i}`);
      assertExactlyOnceInOrder(await waitShown(bob, 50, 30_000), want);
      await settledOnce([bob], want);
      await alice.browserContext().close();
      await bob.browserContext().close();
    } finally {
      await gw.stop();
    }
  });

  test("a node of a two-node cluster dies: the pages resume on the other", async () => {
    const redisPort = await freePort();
    const redis = spawn("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
      stdio: "ignore",
    });
    await listening(redisPort, "redis");
    const url = `redis://127.0.0.1:${redisPort}`;
    const a = await Gateway.start(["--demo", "--redis", url]);
    const b = await Gateway.start(["--demo", "--redis", url]);
    const ha = await HaProxy.start([a.addr, b.addr], { backup: true });
    try {
      const alice = await openChat(ha.url, "alice", "alice-bob", "&heartbeat_s=2");
      const bob = await openChat(ha.url, "bob", "alice-bob", "&heartbeat_s=2");
      for (let i = 0; i < 3; i++) await send(alice, `on a ${i}`);
      await waitShown(bob, 3);
      await a.kill();
      await until(async () => (await transportOf(bob)).startsWith("reconnecting"), 15_000, "bob notices");
      for (let i = 0; i < 3; i++) await send(alice, `on b ${i}`);
      const want = [0, 1, 2].map((i) => `on a ${i}`).concat([0, 1, 2].map((i) => `on b ${i}`));
      assertExactlyOnceInOrder(await waitShown(bob, 6, 30_000), want);
      await settledOnce([bob, alice], want);
      await alice.browserContext().close();
      await bob.browserContext().close();
    } finally {
      await ha.stop();
      await a.stop();
      await b.stop();
      redis.kill("SIGKILL");
    }
  });

  test("a gateway frozen with SIGSTOP is noticed within the heartbeat interval + timeout", async () => {
    const gw = await Gateway.start(["--demo", "--heartbeat-interval", "2s", "--heartbeat-timeout", "2s"]);
    try {
      const alice = await openChat(gw.url, "alice", "alice-bob");
      const since = Date.now();
      gw.child.kill("SIGSTOP");
      await until(async () => (await transportOf(alice)).startsWith("reconnecting"), 10_000, "alice notices");
      const noticed = Date.now() - since;
      assert.ok(noticed <= 2000 + 2000 + 1500, `noticed after ${noticed} ms`);
      gw.child.kill("SIGCONT");
      await alice.waitForSelector('#conn[data-state="open"]', { timeout: 30_000 });
      await alice.browserContext().close();
    } finally {
      gw.child.kill("SIGCONT");
      await gw.stop();
    }
  });
});
