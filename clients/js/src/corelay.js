// corelay client SDK: one connection to a corelay gateway over WebSocket, SSE or long polling, with the same
// semantics on each: resume from a cursor (no gap, no duplicate), an outbox that survives reconnects and
// transport switches (resent with the same client id; the server dedupes), reconnection with bounded
// exponential backoff and full jitter, and liveness checks. No runtime dependencies; browsers and Node >= 20
// (pass `WebSocket` on Node 20, where it is behind --experimental-websocket).
//
// Wire protocol: docs/PROTOCOL.md of the corelay repository.

const DURABLE = /^(conversation|user):/;
const RETRYABLE = new Set(["overloaded", "store_busy", "store_unavailable", "internal_retry"]);
const STATES = ["connecting", "open", "reconnecting", "closed"];

/** A random client id for a send (the server dedupes retries by it). */
function clientId() {
  const c = globalThis.crypto;
  if (c && c.randomUUID) return c.randomUUID();
  let s = "";
  for (let i = 0; i < 32; i++) s += Math.floor(Math.random() * 16).toString(16);
  return s;
}

/** `{channel: offset}` → `channel=offset;…` (the text form of a cursor). */
export function cursorText(cursor, only) {
  return Object.entries(cursor)
    .filter(([ch]) => !only || only(ch))
    .map(([ch, off]) => `${ch}=${off}`)
    .join(";");
}

/** `channel=offset;…` → `{channel: offset}`. */
export function parseCursor(text) {
  const out = {};
  for (const part of (text || "").split(";")) {
    const i = part.lastIndexOf("=");
    const digits = part.slice(i + 1);
    if (i > 0 && /^[0-9]{1,16}$/.test(digits)) out[part.slice(0, i)] = Number(digits);
  }
  return out;
}

/** Full jitter: a random delay in [0, min(max, base * 2^attempt)]. */
export function backoffDelay(attempt, baseMs, maxMs, random = Math.random) {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

class Emitter {
  constructor() {
    this._handlers = new Map();
  }
  /** Listens to `event`; returns a function that stops listening. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    this._handlers.get(event)?.delete(fn);
  }
  emit(event, value) {
    for (const fn of [...(this._handlers.get(event) || [])]) {
      try {
        fn(value);
      } catch (e) {
        // A listener's bug must not break the connection.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

/**
 * Reads a `text/event-stream` body (fetch) and calls `onEvent({event, data, id})`, `onBytes()` per chunk and
 * `onRetry(ms)` for the server's `retry:` hint.
 */
async function readEventStream(body, onEvent, onBytes, onRetry = () => {}) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let ev = { event: "message", data: [], id: undefined };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onBytes();
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.search(/\r?\n/)) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + (buf[nl] === "\r" ? 2 : 1));
      if (line === "") {
        if (ev.data.length) onEvent({ event: ev.event, data: ev.data.join("\n"), id: ev.id });
        ev = { event: "message", data: [], id: undefined };
      } else if (line.startsWith(":")) {
        // comment: the server's heartbeat
      } else {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const v = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "event") ev.event = v;
        else if (field === "data") ev.data.push(v);
        else if (field === "id") ev.id = v;
        else if (field === "retry" && /^[0-9]+$/.test(v)) onRetry(Number(v));
      }
    }
  }
}

/**
 * A connection to a corelay gateway. See index.d.ts for the options and events.
 */
export class Corelay extends Emitter {
  constructor(options) {
    super();
    if (!options || !options.url) throw new TypeError("Corelay: `url` is required");
    if (!options.token && !options.getToken) throw new TypeError("Corelay: `token` or `getToken` is required");
    this.options = {
      transports: ["websocket", "sse", "poll"],
      channels: [],
      backoffBaseMs: 500,
      backoffMaxMs: 30_000,
      connectTimeoutMs: 10_000,
      heartbeatS: 30,
      heartbeatTimeoutS: 10,
      upgradeIntervalMs: 60_000,
      pollTimeoutS: 25,
      storageKey: "corelay",
      ...options,
    };
    this._url = this.options.url.replace(/\/+$/, "");
    this._WebSocket = this.options.WebSocket || globalThis.WebSocket;
    this._fetch = this.options.fetch || globalThis.fetch?.bind(globalThis);
    this._token = this.options.token;
    this._storage = this.options.storage;
    this.state = "connecting";
    this.transport = null;
    /** `{channel: last offset seen}`. */
    this.cursor = { ...(this.options.cursor || {}) };
    this._topics = new Set(this.options.channels);
    /** Sends not yet acknowledged, in order: `{client_id, conversation, body}`. */
    this._outbox = [];
    this._pending = new Map(); // client_id → {resolve, reject}
    this._requests = new Map(); // history requests over WebSocket, by conversation (FIFO)
    this._attempt = 0;
    this._failures = new Map(); // transport → consecutive failures before open
    this._tIndex = 0;
    this._conn = null;
    this._closed = false;
    this._timers = new Set();
    this._load();
    if (typeof globalThis.addEventListener === "function") {
      // The browser knows when the network went away: drop the connection at once (it would otherwise
      // linger, half-dead, until the liveness check) and come back as soon as the network does.
      this._online = () => this._reconnectNow();
      this._offline = () => this._dropForOffline();
      globalThis.addEventListener("online", this._online);
      globalThis.addEventListener("offline", this._offline);
    }
    this._connect();
  }

  // ---- public API ----

  /** Sends `body` to a conversation. Resolves with the server's `sent` (`{offset, ts, …}`) once durable. */
  send(conversation, body) {
    const entry = { client_id: clientId(), conversation, body };
    this._outbox.push(entry);
    this._save();
    const p = new Promise((resolve, reject) => this._pending.set(entry.client_id, { resolve, reject }));
    if (this.state === "open") this._transmit(entry);
    return p;
  }

  /** Follows topics (from now, or from the cursor's position on them). */
  subscribe(channels) {
    for (const c of channels) this._topics.add(c);
    if (this.state === "open") this._conn.subscribe(channels);
  }

  unsubscribe(channels) {
    for (const c of channels) this._topics.delete(c);
    if (this.state === "open") this._conn.request({ type: "unsubscribe", channels });
  }

  /** Marks a conversation delivered up to `offset`. */
  ack(conversation, offset) {
    if (this.state === "open") this._conn.request({ type: "ack", conversation, offset });
  }

  /** Marks a conversation read up to `offset`. */
  read(conversation, offset) {
    if (this.state === "open") this._conn.request({ type: "read", conversation, offset });
  }

  /** A page of history, newest first: `{messages, more}`. */
  history(conversation, { before, limit } = {}) {
    if (this.state !== "open") return Promise.reject(new Error("not connected"));
    const req = { type: "history", conversation };
    if (before !== undefined) req.before = before;
    if (limit !== undefined) req.limit = limit;
    return this._conn.history(req);
  }

  /** Closes for good (no reconnect). Unacknowledged sends stay in the storage adapter, if any. */
  close() {
    this._closed = true;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    if (this._online) globalThis.removeEventListener("online", this._online);
    if (this._offline) globalThis.removeEventListener("offline", this._offline);
    this._conn?.close();
    this._conn = null;
    this._setState("closed");
  }

  /** Sends not yet acknowledged. */
  get outbox() {
    return this._outbox.map((e) => ({ ...e }));
  }

  // ---- connection management ----

  _setState(state) {
    if (!STATES.includes(state)) throw new Error(state);
    this.state = state;
    this.emit("state", { state, transport: this.transport });
  }

  _later(ms, fn) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  async _tokenNow(fresh) {
    if (this.options.getToken && (fresh || !this._token)) this._token = await this.options.getToken();
    return this._token;
  }

  async _connect(freshToken = false) {
    if (this._closed) return;
    const kinds = this.options.transports;
    const kind = kinds[Math.min(this._tIndex, kinds.length - 1)];
    this.transport = kind;
    let token;
    try {
      token = await this._tokenNow(freshToken);
    } catch (e) {
      this.emit("error", e);
      return this._scheduleReconnect();
    }
    if (this._closed) return;
    const Kind = { websocket: WsConn, sse: SseConn, poll: PollConn }[kind];
    const conn = new Kind(this, token);
    this._conn = conn;
    conn.start();
  }

  /** Called by a transport once it is usable. */
  _opened(conn) {
    if (conn !== this._conn) return;
    this._attempt = 0;
    this._failures.set(conn.kind, 0);
    this._setState("open");
    for (const e of this._outbox) this._transmit(e);
    if (conn.kind !== this.options.transports[0]) this._scheduleUpgrade();
  }

  /** Called by a transport when it ended. `hint`: {expired, fast, retryAfterMs, opened}. */
  _ended(conn, hint = {}) {
    if (conn !== this._conn || this._closed) return;
    this._conn = null;
    if (!hint.opened) {
      // Could not open on this transport: after two failures in a row, fall back to the next one.
      const n = (this._failures.get(conn.kind) || 0) + 1;
      this._failures.set(conn.kind, n);
      if (n >= 2 && this._tIndex < this.options.transports.length - 1) {
        this._tIndex++;
        this._attempt = 0;
      }
    }
    this._setState("reconnecting");
    this._scheduleReconnect(hint);
  }

  _scheduleReconnect(hint = {}) {
    if (this._closed) return;
    let delay = backoffDelay(this._attempt++, this.options.backoffBaseMs, this.options.backoffMaxMs);
    if (hint.fast) delay = Math.min(delay, 250);
    if (hint.retryAfterMs) delay = Math.max(delay, hint.retryAfterMs + Math.floor(Math.random() * 500));
    this._reconnectTimer = this._later(delay, () => this._connect(!!hint.expired));
  }

  _dropForOffline() {
    if (this._closed || !this._conn) return;
    const conn = this._conn;
    this._conn = null;
    conn.close();
    this._setState("reconnecting");
    this._scheduleReconnect();
  }

  _reconnectNow() {
    if (this._closed || this.state === "open") return;
    if (this._reconnectTimer) {
      clearTimeout(this._reconnectTimer);
      this._timers.delete(this._reconnectTimer);
    }
    this._attempt = 0;
    this._connect();
  }

  /** On a fallback transport: now and then, try WebSocket again; switch once it is open. */
  _scheduleUpgrade() {
    this._later(this.options.upgradeIntervalMs, async () => {
      if (this._closed || this.state !== "open" || this._tIndex === 0) return;
      let token;
      try {
        token = await this._tokenNow(false);
      } catch {
        return this._scheduleUpgrade();
      }
      const probe = new WsConn(this, token, { probe: true });
      probe.onProbe = (ok) => {
        if (!ok || this._closed) return this._scheduleUpgrade();
        const old = this._conn;
        this._tIndex = 0;
        this.transport = "websocket";
        this._conn = probe;
        old?.close();
        this._opened(probe);
      };
      probe.start();
    });
  }

  // ---- what arrives ----

  /** A server object from any transport. */
  _incoming(msg) {
    switch (msg.type) {
      case "message":
      case "reset":
      case "receipt":
      case "notice": {
        const channel = msg.channel;
        const offset = msg.type === "message" || msg.type === "reset" ? msg.offset : msg.channel_offset;
        if (channel !== undefined && offset !== undefined) {
          if (msg.type === "reset") {
            this.cursor[channel] = offset;
            this._save();
            this.emit("reset", msg);
            return;
          }
          const seen = this.cursor[channel];
          if (seen !== undefined && offset <= seen) return; // a repeat (replay overlap, a resend): dropped
          this.cursor[channel] = offset;
          this._save();
        }
        this.emit(msg.type, msg);
        return;
      }
      case "sent":
        this._acknowledged(msg.client_id, msg);
        return;
      case "error":
        if (msg.ref && this._pending.has(msg.ref)) {
          if (RETRYABLE.has(msg.code)) {
            const e = this._outbox.find((x) => x.client_id === msg.ref);
            if (e) this._later(backoffDelay(1, 500, 5000), () => this.state === "open" && this._transmit(e));
          } else {
            this._outbox = this._outbox.filter((x) => x.client_id !== msg.ref);
            this._save();
            const p = this._pending.get(msg.ref);
            this._pending.delete(msg.ref);
            const err = new Error(`${msg.code}: ${msg.message || ""}`);
            err.code = msg.code;
            p.reject(err);
          }
          return;
        }
        this.emit("error", msg);
        return;
      default:
        this.emit("other", msg);
    }
  }

  _acknowledged(id, sent) {
    this._outbox = this._outbox.filter((x) => x.client_id !== id);
    this._save();
    const p = this._pending.get(id);
    if (p) {
      this._pending.delete(id);
      p.resolve(sent);
    }
  }

  _transmit(entry) {
    this._conn?.sendMessage(entry);
  }

  // ---- persistence ----

  _load() {
    if (!this._storage) return;
    try {
      const raw = this._storage.getItem(this.options.storageKey);
      if (!raw) return;
      const saved = JSON.parse(raw);
      for (const [ch, off] of Object.entries(saved.cursor || {})) {
        if (this.cursor[ch] === undefined || this.cursor[ch] < off) this.cursor[ch] = off;
      }
      for (const e of saved.outbox || []) {
        this._outbox.push(e);
        // A send from an earlier session: nobody awaits it, but it is still resent until acknowledged.
      }
    } catch {
      // unreadable storage: start fresh
    }
  }

  _save() {
    if (!this._storage) return;
    try {
      this._storage.setItem(
        this.options.storageKey,
        JSON.stringify({ cursor: this.cursor, outbox: this._outbox }),
      );
    } catch {
      // full or unavailable storage: the session goes on in memory
    }
  }
}

// ---- transports ----

class WsConn {
  constructor(client, token, { probe = false } = {}) {
    this.kind = "websocket";
    this.client = client;
    this.token = token;
    this.probe = probe;
    this.opened = false;
    this.histories = [];
    this.onProbe = null;
  }

  start() {
    const c = this.client;
    const base = c._url.replace(/^http/, "ws");
    const durable = cursorText(c.cursor, (ch) => DURABLE.test(ch));
    let url = `${base}/ws?token=${encodeURIComponent(this.token)}`;
    if (durable) url += `&cursor=${encodeURIComponent(durable)}`;
    let ws;
    try {
      ws = new c._WebSocket(url, "corelay.v1");
    } catch (e) {
      return this._end({});
    }
    this.ws = ws;
    this.openTimer = setTimeout(() => this._fail(), c.options.connectTimeoutMs);
    ws.onmessage = (ev) => this._frame(ev.data);
    ws.onclose = (ev) => this._closed(ev.code, ev.reason);
    ws.onerror = () => {};
  }

  _frame(data) {
    let msg;
    try {
      msg = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch {
      return;
    }
    this.lastRx = Date.now();
    if (msg.type === "welcome") {
      clearTimeout(this.openTimer);
      this.opened = true;
      this.heartbeatS = msg.heartbeat_s || this.client.options.heartbeatS;
      this.timeoutS = msg.heartbeat_timeout_s || this.client.options.heartbeatTimeoutS;
      this._liveness();
      const topics = [...this.client._topics];
      if (topics.length) this.subscribe(topics);
      if (this.probe) this.onProbe?.(true);
      else this.client._opened(this);
      return;
    }
    if (msg.type === "pong") return;
    if (msg.type === "history" && this.histories.length) {
      const i = this.histories.findIndex((h) => h.conversation === msg.conversation);
      if (i >= 0) {
        const [h] = this.histories.splice(i, 1);
        h.resolve(msg);
        return;
      }
    }
    if (this.probe && !this.client._conn) return;
    if (this.client._conn === this) this.client._incoming(msg);
  }

  /** Application-level ping: browsers hide WebSocket pings, so a dead connection is noticed this way. */
  _liveness() {
    const every = this.heartbeatS * 1000;
    const timeout = this.timeoutS * 1000;
    this.pingTimer = setInterval(() => {
      if (Date.now() - this.lastRx > every + timeout) return this._fail();
      if (Date.now() - this.lastRx >= every) this.request({ type: "ping" });
    }, Math.max(100, Math.min(every, timeout) / 2));
  }

  subscribe(channels) {
    const cursor = {};
    for (const ch of channels) if (this.client.cursor[ch] !== undefined) cursor[ch] = this.client.cursor[ch];
    this.request({ type: "subscribe", channels, cursor });
  }

  request(obj) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(obj));
  }

  sendMessage(e) {
    this.request({ type: "send", conversation: e.conversation, client_id: e.client_id, body: e.body });
  }

  history(req) {
    return new Promise((resolve, reject) => {
      this.histories.push({ conversation: req.conversation, resolve, reject });
      this.request(req);
    });
  }

  _fail() {
    // Silent or never opened: drop the socket (it may be dead without knowing it) and move on.
    try {
      this.ws?.close(4000, "client: no answer");
    } catch {
      // already closing
    }
    this._closed(1006, "timeout");
  }

  _closed(code) {
    if (this.done) return;
    this.done = true;
    clearTimeout(this.openTimer);
    clearInterval(this.pingTimer);
    for (const h of this.histories) h.reject(new Error("connection closed"));
    this.histories = [];
    if (this.probe && !this.opened) return this.onProbe?.(false);
    const hint = { opened: this.opened };
    if (code === 4001) hint.expired = true;
    if (code === 1001 || code === 1013) hint.fast = code === 1013;
    if (code === 1001) hint.retryAfterMs = 0;
    this.client._ended(this, hint);
  }

  _end(hint) {
    this.done = true;
    this.client._ended(this, hint);
  }

  close() {
    this.done = true;
    clearTimeout(this.openTimer);
    clearInterval(this.pingTimer);
    try {
      this.ws?.close(1000, "client closed");
    } catch {
      // ignore
    }
  }
}

/** POST /send: a request from a one-way transport. Resolves with the answer object. */
async function postSend(client, token, obj) {
  const res = await client._fetch(`${client._url}/send?token=${encodeURIComponent(token)}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(obj),
  });
  const text = await res.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = { type: "error", code: `http_${res.status}`, message: text };
  }
  if (!res.ok && body.type !== "error") {
    body = { type: "error", code: body.error || `http_${res.status}`, message: body.error, status: res.status };
  }
  return { status: res.status, body, retryAfter: Number(res.headers.get("retry-after")) || 0 };
}

class HttpConn {
  constructor(client, token) {
    this.client = client;
    this.token = token;
    this.opened = false;
    this.abort = new AbortController();
    this.done = false;
  }

  async sendMessage(e) {
    const obj = { type: "send", conversation: e.conversation, client_id: e.client_id, body: e.body };
    try {
      const { body } = await postSend(this.client, this.token, obj);
      if (body.type === "sent") this.client._acknowledged(e.client_id, body);
      else if (body.type === "error") this.client._incoming({ ...body, ref: body.ref || e.client_id });
    } catch {
      // The connection is failing; the outbox resends when it is back.
    }
  }

  request(obj) {
    postSend(this.client, this.token, obj).catch(() => {});
  }

  async history(req) {
    const { body } = await postSend(this.client, this.token, req);
    if (body.type !== "history") throw new Error(body.code || "history failed");
    return body;
  }

  _end(hint) {
    if (this.done) return;
    this.done = true;
    this.client._ended(this, { opened: this.opened, ...hint });
  }

  close() {
    this.done = true;
    clearTimeout(this.silenceTimer);
    this.abort.abort();
  }
}

class SseConn extends HttpConn {
  constructor(client, token) {
    super(client, token);
    this.kind = "sse";
    this.stream = null;
  }

  async start() {
    const c = this.client;
    let url = `${c._url}/sse?token=${encodeURIComponent(this.token)}`;
    const topics = [...c._topics];
    if (topics.length) url += `&channels=${encodeURIComponent(topics.join(","))}`;
    const cur = cursorText(c.cursor);
    if (cur) url += `&last_event_id=${encodeURIComponent(cur)}`;
    const silence = () => {
      clearTimeout(this.silenceTimer);
      const ms = (c.options.heartbeatS + c.options.heartbeatTimeoutS) * 1000;
      this.silenceTimer = setTimeout(() => {
        this.abort.abort();
        this._end({});
      }, ms);
    };
    try {
      silence();
      const res = await c._fetch(url, { signal: this.abort.signal, headers: { Accept: "text/event-stream" } });
      if (res.status !== 200) {
        clearTimeout(this.silenceTimer);
        const retryAfterMs = (Number(res.headers.get("retry-after")) || 0) * 1000;
        return this._end({ expired: res.status === 401, retryAfterMs });
      }
      await readEventStream(
        res.body,
        (ev) => this._event(ev),
        () => silence(),
        (ms) => {
          this.retryMs = ms;
        },
      );
      // The stream ended: reconnect no sooner than the server's `retry:` hint (as EventSource would).
      this._end({ retryAfterMs: this.retryMs || 0 });
    } catch {
      this._end({});
    } finally {
      clearTimeout(this.silenceTimer);
    }
  }

  _event(ev) {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (ev.event === "stream") {
      this.stream = msg.id;
      this.opened = true;
      this.client._opened(this);
      return;
    }
    if (msg.type === "error" && msg.code === "token_expired") {
      this.abort.abort();
      return this._end({ expired: true });
    }
    if (this.client._conn === this) this.client._incoming(msg);
  }

  subscribe(channels) {
    if (this.stream) this.request({ type: "subscribe", stream: this.stream, channels });
  }

  request(obj) {
    if (obj.type === "unsubscribe") obj = { ...obj, stream: this.stream };
    super.request(obj);
  }
}

class PollConn extends HttpConn {
  constructor(client, token) {
    super(client, token);
    this.kind = "poll";
  }

  async start() {
    const c = this.client;
    let first = true;
    while (!this.done) {
      let url = `${c._url}/poll?token=${encodeURIComponent(this.token)}&timeout=${first ? 0 : c.options.pollTimeoutS}`;
      const topics = [...c._topics];
      if (topics.length) url += `&channels=${encodeURIComponent(topics.join(","))}`;
      const cur = this.serverCursor || cursorText(c.cursor);
      if (cur) url += `&cursor=${encodeURIComponent(cur)}`;
      const timer = setTimeout(() => this.abort.abort(), (c.options.pollTimeoutS + c.options.heartbeatTimeoutS) * 1000);
      let res;
      try {
        res = await c._fetch(url, { signal: this.abort.signal });
      } catch {
        clearTimeout(timer);
        return this._end({});
      }
      clearTimeout(timer);
      if (res.status === 200) {
        let body;
        try {
          body = await res.json();
        } catch {
          return this._end({});
        }
        if (!this.opened) {
          this.opened = true;
          c._opened(this);
        }
        this.serverCursor = body.cursor;
        for (const m of body.messages || []) if (c._conn === this) c._incoming(m);
      } else if (res.status === 204) {
        if (!this.opened) {
          this.opened = true;
          c._opened(this);
        }
      } else {
        const retryAfterMs = (Number(res.headers.get("retry-after")) || 0) * 1000;
        return this._end({ expired: res.status === 401, retryAfterMs });
      }
      first = false;
    }
  }

  subscribe() {
    // Topics are named on every poll: the next one carries them.
    this.serverCursor = null;
  }
}

export default Corelay;
