// The SDK against the real gateway: chat, resume after a crash, fallback when upgrades are refused, climbing
// back to WebSocket, token refresh, and an outbox persisted across page loads. Exactly once, in order.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Corelay, backoffDelay, cursorText, parseCursor } from "../src/corelay.js";
import { Gateway, Proxy, collect, token, until } from "./gateway.js";

const quick = { backoffBaseMs: 50, backoffMaxMs: 400, connectTimeoutMs: 3000 };

function client(url, user, extra = {}) {
  return new Corelay({ url, token: token(user), ...quick, ...extra });
}

function bodies(got, channel) {
  return got.filter((m) => m.channel === channel).map((m) => m.body);
}

describe("cursor and backoff helpers", () => {
  test("cursor text round-trips", () => {
    const c = { "conversation:c1": 118, "scores:m42": 7 };
    assert.equal(cursorText(c), "conversation:c1=118;scores:m42=7");
    assert.deepEqual(parseCursor(cursorText(c)), c);
    assert.deepEqual(parseCursor("garbage;x=;=3;a:b=5"), { "a:b": 5 });
  });

  test("backoff is full jitter, bounded", () => {
    assert.equal(backoffDelay(0, 100, 1000, () => 0.999999), 99);
    assert.equal(backoffDelay(3, 100, 1000, () => 0.999999), 799);
    assert.equal(backoffDelay(40, 100, 1000, () => 0.999999), 999);
    assert.equal(backoffDelay(5, 100, 1000, () => 0), 0);
  });
});

describe("against a gateway", () => {
  let gw;
  before(async () => {
    gw = await Gateway.start();
  });
  after(async () => {
    await gw.stop();
  });

  test("two users chat over WebSocket: sent resolves with the offset, delivered once", async () => {
    assert.equal((await gw.conversation("ws1", ["alice", "bob"])).status, 201);
    const alice = client(gw.url, "alice");
    const bob = client(gw.url, "bob");
    const got = collect(bob);
    try {
      await until(() => alice.state === "open" && bob.state === "open", 10_000, "open");
      assert.equal(alice.transport, "websocket");
      const sent = await alice.send("ws1", { text: "hi" });
      assert.equal(sent.offset, 1);
      await until(() => got.length === 1, 5000, "bob's message");
      assert.deepEqual(got[0].body, { text: "hi" });
      assert.equal(got[0].from, "alice");
      assert.equal(bob.cursor["conversation:ws1"], 1);
      const page = await bob.history("ws1", { limit: 10 });
      assert.equal(page.messages.length, 1);
    } finally {
      alice.close();
      bob.close();
    }
  });

  test("a gateway crash: sends queue in the outbox, and after the restart everything arrives once, in order", async () => {
    await gw.conversation("crash", ["carol", "dave"]);
    const carol = client(gw.url, "carol");
    const dave = client(gw.url, "dave");
    const got = collect(dave);
    try {
      await until(() => carol.state === "open" && dave.state === "open");
      for (let i = 0; i < 5; i++) await carol.send("crash", `before ${i}`);
      await until(() => got.length === 5, 5000, "first five");
      await gw.kill();
      await until(() => carol.state === "reconnecting" && dave.state === "reconnecting", 5000, "noticed");
      const during = [];
      for (let i = 0; i < 10; i++) during.push(carol.send("crash", `during ${i}`));
      assert.equal(carol.outbox.length, 10);
      await gw.restart();
      const sents = await Promise.all(during);
      assert.deepEqual(
        sents.map((s) => s.offset),
        [6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
      );
      await until(() => got.length >= 15, 10_000, "all fifteen");
      await new Promise((r) => setTimeout(r, 300));
      const want = [...Array(5).keys()].map((i) => `before ${i}`).concat([...Array(10).keys()].map((i) => `during ${i}`));
      assert.deepEqual(bodies(got, "conversation:crash"), want);
      assert.equal(carol.outbox.length, 0);
    } finally {
      carol.close();
      dave.close();
    }
  });

  test("WebSocket upgrades refused by a proxy: the client carries on over SSE, then over long polling", async () => {
    await gw.conversation("fallback", ["erin", "frank"]);
    const proxy = await Proxy.start(gw.addr, { refuseUpgrade: true });
    const erin = client(proxy.url, "erin", { upgradeIntervalMs: 3_600_000 });
    const frank = client(gw.url, "frank");
    const got = collect(erin);
    try {
      await until(() => erin.state === "open", 15_000, "erin open");
      assert.equal(erin.transport, "sse");
      await until(() => frank.state === "open");
      for (let i = 0; i < 3; i++) await frank.send("fallback", `to sse ${i}`);
      const mine = await erin.send("fallback", "from sse");
      assert.equal(mine.offset, 4);
      await until(() => got.length === 4, 5000, "over SSE");
      erin.close();

      // SSE refused too: long polling, from the cursor where SSE stopped.
      proxy.refuseSse = true;
      const erin2 = new Corelay({ url: proxy.url, token: token("erin"), ...quick, cursor: erin.cursor, upgradeIntervalMs: 3_600_000 });
      const got2 = collect(erin2);
      try {
        await until(() => erin2.state === "open", 20_000, "erin on polls");
        assert.equal(erin2.transport, "poll");
        for (let i = 0; i < 3; i++) await frank.send("fallback", `to poll ${i}`);
        await erin2.send("fallback", "from poll");
        await until(() => got2.length === 4, 10_000, "over polls");
        assert.deepEqual(bodies(got2, "conversation:fallback"), ["to poll 0", "to poll 1", "to poll 2", "from poll"]);
      } finally {
        erin2.close();
      }
    } finally {
      frank.close();
      await proxy.stop();
    }
  });

  test("climbs back to WebSocket when upgrades work again, with no gap and no duplicate", async () => {
    await gw.conversation("climb", ["gina", "hank"]);
    const proxy = await Proxy.start(gw.addr, { refuseUpgrade: true });
    const gina = client(proxy.url, "gina", { upgradeIntervalMs: 500 });
    const hank = client(gw.url, "hank");
    const got = collect(gina);
    const transports = [];
    gina.on("state", (s) => transports.push(`${s.state}/${s.transport}`));
    try {
      await until(() => gina.state === "open" && hank.state === "open", 15_000, "open");
      assert.equal(gina.transport, "sse");
      let n = 0;
      const sender = (async () => {
        while (n < 40) {
          await hank.send("climb", `m${n}`);
          n++;
          if (n === 10) proxy.refuseUpgrade = false;
          await new Promise((r) => setTimeout(r, 25));
        }
      })();
      await sender;
      await until(() => gina.transport === "websocket", 10_000, "back on WebSocket");
      await until(() => got.length === 40, 10_000, "all forty");
      await new Promise((r) => setTimeout(r, 300));
      assert.deepEqual(bodies(got, "conversation:climb"), [...Array(40).keys()].map((i) => `m${i}`));
      assert.ok(transports.includes("open/websocket"), transports.join(","));
    } finally {
      gina.close();
      hank.close();
      await proxy.stop();
    }
  });

  test("an expired token: the client asks getToken for a fresh one and resumes", async () => {
    await gw.conversation("tok", ["ivy", "jack"]);
    let issued = 0;
    const ivy = new Corelay({
      url: gw.url,
      ...quick,
      getToken: () => {
        issued++;
        return token("ivy", issued === 1 ? 2 : 3600);
      },
    });
    const jack = client(gw.url, "jack");
    const got = collect(ivy);
    try {
      await until(() => ivy.state === "open" && jack.state === "open");
      await jack.send("tok", "one");
      await until(() => got.length === 1);
      // The first token lives 2 s: the gateway closes with 4001, the client fetches another.
      await until(() => issued === 2, 8000, "a second token");
      await until(() => ivy.state === "open", 5000, "reopened");
      await jack.send("tok", "two");
      await until(() => got.length === 2, 5000, "after refresh");
      assert.deepEqual(bodies(got, "conversation:tok"), ["one", "two"]);
    } finally {
      ivy.close();
      jack.close();
    }
  });

  test("an outbox persisted in storage is sent by the next page load, once", async () => {
    await gw.conversation("store", ["kim", "lee"]);
    const mem = new Map();
    const storage = { getItem: (k) => mem.get(k) ?? null, setItem: (k, v) => mem.set(k, v) };
    const lee = client(gw.url, "lee");
    const got = collect(lee);
    try {
      await until(() => lee.state === "open");
      // A page that queues sends while the gateway cannot be reached, then is closed.
      const page1 = new Corelay({ url: "http://127.0.0.1:9", token: token("kim"), ...quick, storage, transports: ["websocket"] });
      page1.send("store", "queued 1").catch(() => {});
      page1.send("store", "queued 2").catch(() => {});
      page1.close();
      assert.equal(JSON.parse(mem.get("corelay")).outbox.length, 2);
      // The next page load, same storage: sends them, and the server stores each once.
      const page2 = new Corelay({ url: gw.url, token: token("kim"), ...quick, storage });
      try {
        await until(() => page2.outbox.length === 0, 10_000, "outbox sent");
        await until(() => got.length === 2, 5000, "delivered");
        assert.deepEqual(bodies(got, "conversation:store"), ["queued 1", "queued 2"]);
        assert.equal(JSON.parse(mem.get("corelay")).outbox.length, 0);
      } finally {
        page2.close();
      }
    } finally {
      lee.close();
    }
  });
});
