// The demo chat (`corelay run --demo`, served at /demo/): a small page on the client SDK. Pick a user, pick a
// conversation, chat; ticks show sent (✓), delivered to every other member (✓✓) and read by them (blue ✓✓).
import { Corelay } from "./corelay.js";

const params = new URLSearchParams(location.search);
const user = params.get("user");
const app = document.getElementById("app");
const USERS = ["alice", "bob", "carol", "dave"];

const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const k of kids) e.append(k);
  return e;
};

if (!user) pick();
else start(user);

function pick() {
  app.replaceChildren(
    el(
      "div",
      { class: "pick" },
      el("h2", {}, "Who are you?"),
      ...USERS.map((u) => el("button", { onclick: () => (location.search = `?user=${u}`), "data-user": u }, u)),
      el("p", {}, "Open a second window as someone else to chat with yourself."),
    ),
  );
}

async function token() {
  const res = await fetch(`token?user=${encodeURIComponent(user)}`);
  if (!res.ok) throw new Error(`token: ${res.status}`);
  return res.json();
}

async function start(me) {
  document.getElementById("me").textContent = `as ${me}`;
  const first = await token();
  const convs = new Map(
    first.conversations.map((c) => [
      c.id,
      { ...c, messages: new Map(), pending: [], delivered: {}, read: {}, unread: 0, more: true, loaded: false },
    ]),
  );
  let active = first.conversations[0]?.id;
  const transports = params.get("transports")?.split(",");
  const chat = new Corelay({
    url: location.origin,
    getToken: async () => (await token()).token,
    storage: params.get("nostore") ? undefined : localStorage,
    storageKey: `corelay-demo-${me}`,
    ...(transports ? { transports } : {}),
    ...(params.get("upgrade_ms") ? { upgradeIntervalMs: Number(params.get("upgrade_ms")) } : {}),
    ...(params.get("heartbeat_s") ? { heartbeatS: Number(params.get("heartbeat_s")), heartbeatTimeoutS: Number(params.get("heartbeat_s")) } : {}),
    backoffMaxMs: 5000,
  });
  window.__chat = chat;
  // Sends queued by an earlier page load (the SDK resends them): show them as pending.
  for (const e of chat.outbox) convs.get(e.conversation)?.pending.push({ client_id: e.client_id, body: e.body });

  const nav = el("nav");
  const list = el("div", { id: "messages" });
  const input = el("input", { placeholder: "Message", autocomplete: "off", id: "text" });
  const form = el("form", { id: "compose" }, input, el("button", { type: "submit" }, "Send"));
  app.replaceChildren(nav, el("section", {}, list, form));

  const conn = document.getElementById("conn");
  chat.on("state", ({ state, transport }) => {
    conn.dataset.state = state;
    conn.dataset.transport = transport || "";
    document.getElementById("conn-text").textContent = `${state}${transport ? ` · ${transport}` : ""}`;
  });

  chat.on("message", (m) => {
    const id = m.channel.startsWith("conversation:") ? m.channel.slice(13) : null;
    const c = id && convs.get(id);
    if (!c) return;
    c.messages.set(m.offset, m);
    if (m.from === me) {
      c.pending = c.pending.filter((p) => !(p.offset === m.offset));
    } else {
      chat.ack(id, m.offset);
      if (id === active && document.visibilityState === "visible") chat.read(id, m.offset);
      else c.unread++;
    }
    render();
  });

  chat.on("receipt", (r) => {
    const c = convs.get(r.conversation);
    if (!c) return;
    const table = r.state === "read" ? c.read : c.delivered;
    table[r.by] = Math.max(table[r.by] || 0, r.offset);
    if (r.state === "read") c.delivered[r.by] = Math.max(c.delivered[r.by] || 0, r.offset);
    render();
  });

  chat.on("reset", () => {
    for (const c of convs.values()) c.loaded = false;
    loadOlder(active);
  });

  form.onsubmit = (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || !active) return;
    input.value = "";
    const c = convs.get(active);
    const p = { body: text, client_id: null };
    c.pending.push(p);
    render();
    const conversation = active;
    chat.send(conversation, text).then(
      (sent) => {
        p.offset = sent.offset;
        if (!c.messages.has(sent.offset)) {
          c.messages.set(sent.offset, { type: "message", from: me, offset: sent.offset, ts: sent.ts, body: text });
        }
        c.pending = c.pending.filter((x) => x !== p);
        render();
      },
      (err) => {
        p.error = err.code || String(err);
        render();
      },
    );
  };

  list.onscroll = () => {
    if (list.scrollTop === 0) loadOlder(active);
  };
  document.addEventListener("visibilitychange", () => markRead(active));

  async function loadOlder(id) {
    const c = convs.get(id);
    if (!c || !c.more || c.loading || chat.state !== "open") return;
    c.loading = true;
    try {
      const offsets = [...c.messages.keys()];
      const before = offsets.length ? Math.min(...offsets) : undefined;
      const page = await chat.history(id, { before, limit: 30 });
      for (const m of page.messages) c.messages.set(m.offset, { ...m, channel: `conversation:${id}` });
      c.more = page.more;
      c.loaded = true;
      const h = list.scrollHeight;
      render();
      if (before !== undefined) list.scrollTop = list.scrollHeight - h;
    } catch {
      // not connected: try again on the next scroll or open
    } finally {
      c.loading = false;
    }
  }

  function markRead(id) {
    const c = convs.get(id);
    if (!c || document.visibilityState !== "visible") return;
    const theirs = [...c.messages.values()].filter((m) => m.from !== me);
    if (theirs.length) chat.read(id, Math.max(...theirs.map((m) => m.offset)));
    c.unread = 0;
  }

  function select(id) {
    active = id;
    if (!convs.get(id).loaded) loadOlder(id);
    markRead(id);
    render(true);
  }

  function stateOf(c, offset) {
    const others = c.members.filter((m) => m !== me);
    if (others.length && others.every((m) => (c.read[m] || 0) >= offset)) return "read";
    if (others.length && others.every((m) => (c.delivered[m] || 0) >= offset)) return "delivered";
    return "sent";
  }

  function render(scroll) {
    nav.replaceChildren(
      ...[...convs.values()].map((c) =>
        el(
          "button",
          { class: c.id === active ? "active" : "", onclick: () => select(c.id), "data-conversation": c.id },
          `# ${c.id}`,
          ...(c.unread && c.id !== active ? [el("span", { class: "unread" }, String(c.unread))] : []),
          el("span", { class: "members" }, c.members.join(", ")),
        ),
      ),
    );
    const c = convs.get(active);
    if (!c) return;
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    const rows = [...c.messages.values()].sort((a, b) => a.offset - b.offset);
    const items = [];
    if (c.more && c.loaded) items.push(el("div", { id: "older" }, "scroll up for older messages"));
    for (const m of rows) {
      const mine = m.from === me;
      const state = mine ? stateOf(c, m.offset) : "received";
      const time = new Date(m.ts || Date.now()).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      items.push(
        el(
          "div",
          { class: `msg${mine ? " mine" : ""}`, "data-offset": String(m.offset), "data-state": state, "data-from": m.from || "" },
          el("div", { class: "from" }, m.from || ""),
          el("div", { class: "body" }, typeof m.body === "string" ? m.body : JSON.stringify(m.body)),
          el("div", { class: "meta" }, time, ...(mine ? [el("span", { class: "ticks" }, state === "sent" ? "✓" : "✓✓")] : [])),
        ),
      );
    }
    for (const p of c.pending) {
      items.push(
        el(
          "div",
          { class: "msg mine", "data-state": p.error ? "failed" : "pending" },
          el("div", { class: "body" }, typeof p.body === "string" ? p.body : JSON.stringify(p.body)),
          el("div", { class: "meta" }, p.error ? `not sent: ${p.error}` : "sending…"),
        ),
      );
    }
    list.replaceChildren(...items);
    if (scroll || atBottom) list.scrollTop = list.scrollHeight;
  }

  select(active);
}
