// Test support: the real corelay binary on a free port, tokens, the internal API, and an HTTP proxy that can
// refuse WebSocket upgrades (or SSE) the way a hostile middlebox does.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";

export const SECRET = "sdk-test-secret-0123456789abcdef0123456789abcdef";
export const API_KEY = "sdk-test-api-key-0123456789abcdef0123456789abcdef";
const BIN = process.env.CORELAY_BIN || resolve(import.meta.dirname, "../../../target/debug/corelay");

const b64 = (v) => Buffer.from(typeof v === "string" ? v : JSON.stringify(v)).toString("base64url");

/** An HS256 client token for `user`, valid `ttlS` seconds. */
export function token(user, ttlS = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: user, iat: now, exp: now + ttlS })}`;
  return `${head}.${createHmac("sha256", SECRET).update(head).digest("base64url")}`;
}

export class Gateway {
  static async start(extra = []) {
    const g = new Gateway();
    g.dir = mkdtempSync(join(tmpdir(), "corelay-sdk-"));
    g.extra = extra;
    await g._spawn("127.0.0.1:0");
    return g;
  }

  async _spawn(listen) {
    this.child = spawn(
      BIN,
      ["run", "--listen", listen, "--threads", "2", "--no-pin", "--data-dir", this.dir,
        "--auth-secret", SECRET, "--api-key", API_KEY, ...this.extra],
      { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, CORELAY_LOG: process.env.CORELAY_LOG || "warn" } },
    );
    const lines = createInterface({ input: this.child.stdout });
    const addr = await new Promise((ok, fail) => {
      const t = setTimeout(() => fail(new Error("gateway did not start")), 20_000);
      lines.once("line", (l) => {
        clearTimeout(t);
        ok(l.split(/\s+/)[3]);
      });
      this.child.once("exit", (c) => fail(new Error(`gateway exited: ${c}`)));
    });
    lines.on("line", () => {});
    this.addr = addr;
    this.url = `http://${addr}`;
  }

  /** SIGKILL: no drain, no goodbye. */
  async kill() {
    const exited = new Promise((ok) => this.child.once("exit", ok));
    this.child.kill("SIGKILL");
    await exited;
  }

  /** Starts again on the same port and data directory. */
  async restart() {
    await this._spawn(this.addr);
  }

  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }

  async api(method, path, body) {
    const res = await fetch(`${this.url}${path}`, {
      method,
      headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: res.status, body: await res.text() };
  }

  conversation(id, members) {
    return this.api("POST", "/api/conversations", { id, members });
  }
}

/**
 * An HTTP proxy in front of `target` ("host:port"). `refuseUpgrade`: WebSocket upgrades get 403 (a proxy
 * that blocks them); `refuseSse`: `/sse` gets 403 too. Both can be switched while it runs.
 */
export class Proxy {
  static async start(target, { refuseUpgrade = true, refuseSse = false } = {}) {
    const p = new Proxy();
    p.refuseUpgrade = refuseUpgrade;
    p.refuseSse = refuseSse;
    const [host, port] = [target.slice(0, target.lastIndexOf(":")), Number(target.slice(target.lastIndexOf(":") + 1))];
    p.server = http.createServer((req, res) => {
      if (p.refuseSse && req.url.startsWith("/sse")) {
        res.writeHead(403, { "Content-Type": "text/plain" }).end("blocked by proxy\n");
        return;
      }
      const up = http.request({ host, port, method: req.method, path: req.url, headers: req.headers }, (r) => {
        res.writeHead(r.statusCode, r.headers);
        r.pipe(res);
      });
      up.on("error", () => res.destroy());
      req.pipe(up);
      res.on("close", () => up.destroy());
    });
    p.server.on("upgrade", (req, socket, head) => {
      if (p.refuseUpgrade) {
        socket.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      const up = net.connect(port, host, () => {
        let raw = `${req.method} ${req.url} HTTP/1.1\r\n`;
        for (let i = 0; i < req.rawHeaders.length; i += 2) raw += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
        up.write(`${raw}\r\n`);
        up.write(head);
        socket.pipe(up).pipe(socket);
      });
      up.on("error", () => socket.destroy());
      socket.on("error", () => up.destroy());
    });
    await new Promise((ok) => p.server.listen(0, "127.0.0.1", ok));
    p.url = `http://127.0.0.1:${p.server.address().port}`;
    return p;
  }

  stop() {
    this.server.closeAllConnections?.();
    return new Promise((ok) => this.server.close(ok));
  }
}

/** Resolves when `cond()` holds; rejects after `ms`. */
export async function until(cond, ms = 10_000, what = "condition") {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** Collects the `message` events of a client, by channel. */
export function collect(client) {
  const got = [];
  client.on("message", (m) => got.push(m));
  return got;
}
