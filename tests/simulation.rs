//! A seeded, deterministic simulation of corelay: the real routers and the real embedded store (in memory),
//! and for WebSockets the real connection state machines (HTTP upgrade, frame codec, rate limit, heartbeats and
//! close handshake), driven on a virtual clock by simulated clients that behave like the SDK: several devices
//! per user, random sends (retried with the same `client_id` until `sent`), acks and reads, disconnects and
//! reconnects that resume from the device's cursor, clients whose network dies (only the heartbeat notices),
//! slow readers (cut at the write-queue cap, they resume),
//! store requests answered late and in batches, store commits and reads that fail.
//!
//! Each connection is a WebSocket (resuming at connect with `?cursor=` or with `subscribe`), an SSE stream
//! (resuming from `Last-Event-ID`, requests by `POST /send`; its deliveries pass the loop's cursor filter), or
//! long polling (each poll carries the cursor; a held poll ends with the first message past it, or at its
//! timeout); a device picks one on every reconnect. Half the seeds run one node; the others two or three nodes on
//! one store, over a simulated bus that keeps Redis's order per node, interleaves the nodes, and breaks a
//! node's connection (what was in flight is lost; it resubscribes and fills from the store).
//!
//! After every step it checks what a client can observe:
//! - on one connection, a channel's offsets arrive strictly increasing, and with no gap after a resume cursor;
//! - `subscribed` never comes before the replay it acknowledges;
//! - every `sent` for one `(user, conversation, client_id)` names the same offset, and offsets are never reused;
//! - receipts on a sender's `user:` channel never go backwards for one (conversation, member) (on one node; see
//!   the known gap in `docs/RELIABILITY.md` for a cluster);
//! - store requests in flight stay within the configured bound (plus what the one event that passed it queued,
//!   and, in a cluster, the node's bus sync reads);
//! - every live connection has its timer armed, holds no more partial input than a request head, and has
//!   written all it queued.
//!
//! At the end every device reconnects, resumes and the store and bus settle; then every device holds every
//! committed message of each of its conversations exactly once, in offset order; every send its user made was
//! committed exactly once; and no router holds a connection once all are closed.
//!
//! `SIM_SEEDS=N` runs seeds 0..N (default 2,000, about 3 minutes in a debug build; CI runs the default); `SIM_SEED=S` replays one, and a failure
//! prints the seed and the step that broke; `SIM_TRACE=1` prints every client message, reply, item, store
//! request and bus event. Connection timers run on the real timer wheel (`corelay::timer::TimerWheel`) on the
//! virtual clock; with every connection closed at the end, the wheel must be empty (no timer leaks). Not
//! simulated: SSE and polls through the connection state machines (their loop-side filters are modelled), and
//! short polls.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use std::collections::VecDeque;

use corelay::auth::Verifier;
use corelay::backplane::bus::{BusCmd, BusEvent, CONTROL_CHANNEL};
use corelay::backplane::router::{GAP_WAIT_MS, HistoryLimits, Out, Router};
use corelay::backplane::{ApiRequest, ConnRef, Event, LoopCmd};
use corelay::cluster::ring::Ring;
use corelay::config::Config;
use corelay::conn::{Conn, ConnId, Effects, Env, LoopId};
use corelay::metrics::LoopMetrics;
use corelay::store::embedded::Embedded;
use corelay::store::thread::{Completion, Request, answer};
use corelay::store::{
    PushJob, PushRow, Receipts, Store, StoreError, StoredMessage, Write, WriteResult,
};
use corelay::timer::{TimerKey, TimerWheel};
use corelay_proto::msg::parse_client;

/// The virtual clock's start (Unix ms).
const START_MS: u64 = 1_800_000_000_000;

/// The secret the simulated clients' tokens are signed with.
const SECRET: &str = "simulation-secret-of-at-least-32-bytes";

/// What a real connection state machine sees of its loop: settings, the token verifier, counters, and the
/// backplane (events are kept in `sent` and handed to the node's router by the simulation).
struct SimEnv {
    cfg: Config,
    verifier: Verifier,
    metrics: LoopMetrics,
    ring: Ring,
    sent: Vec<Event>,
}

impl Env for SimEnv {
    fn loop_id(&self) -> LoopId {
        LoopId(0)
    }
    fn cfg(&self) -> &Config {
        &self.cfg
    }
    fn verifier(&self) -> &Verifier {
        &self.verifier
    }
    fn metrics(&self) -> &LoopMetrics {
        &self.metrics
    }
    fn offer(&mut self, ev: Event) -> Result<(), Event> {
        self.sent.push(ev);
        Ok(())
    }
    fn send(&mut self, ev: Event) {
        self.sent.push(ev);
    }
    fn api_key(&self) -> &str {
        "simulation-api-key-of-at-least-32-bytes"
    }
    fn bus_up(&self) -> bool {
        true
    }
    fn draining(&self) -> bool {
        false
    }
    fn ring(&self) -> &Ring {
        &self.ring
    }
    fn render_metrics(&self) -> String {
        String::new()
    }
}

/// A WebSocket device's connection as the gateway runs it: the real connection state machine (HTTP upgrade,
/// frame codec, rate limit, heartbeats, close handshake), fed the bytes a client sends, with its one timer.
struct RealWs {
    conn: Conn,
    /// The connection's one timer, in the loop's timer wheel.
    timer: Option<TimerKey>,
    /// Bytes the client sent that the loop has not read yet (it reads only while the connection wants input).
    pending_in: Vec<u8>,
    /// Bytes the connection wrote that the client has not parsed yet (the HTTP head first, then frames).
    to_client: Vec<u8>,
    upgraded: bool,
    /// A client that stopped answering (a dead network): it neither reads nor pongs; heartbeats must end it.
    silent: bool,
    /// A slow reader: until then the client reads nothing, so the connection's queue grows to its cap.
    slow_until: Option<u64>,
}

/// A masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x13, 0xc7, 0x2e];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// SplitMix64: a small, well-mixed generator; the whole run is a function of the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The embedded store, with commits that fail when the simulation says so (before anything is written: a
/// failed commit is one that did not happen, as a lost connection to Redis or a full disk would be).
struct Faulty {
    inner: Embedded,
    fail_next_commit: bool,
    fail_next_read: bool,
}

impl Faulty {
    fn read_fault(&mut self) -> corelay::store::Result<()> {
        if std::mem::take(&mut self.fail_next_read) {
            return Err(StoreError::Unavailable("simulated read outage".into()));
        }
        Ok(())
    }
}

impl Store for Faulty {
    fn commit(&mut self, batch: &[Write]) -> corelay::store::Result<Vec<WriteResult>> {
        if std::mem::take(&mut self.fail_next_commit) {
            return Err(StoreError::Unavailable("simulated outage".into()));
        }
        self.inner.commit(batch)
    }
    fn history(
        &mut self,
        c: &str,
        before: Option<u64>,
        limit: usize,
    ) -> corelay::store::Result<Vec<StoredMessage>> {
        self.inner.history(c, before, limit)
    }
    fn read_after(
        &mut self,
        c: &str,
        after: u64,
        limit: usize,
    ) -> corelay::store::Result<Vec<StoredMessage>> {
        self.read_fault()?;
        self.inner.read_after(c, after, limit)
    }
    fn last_offset(&mut self, c: &str) -> corelay::store::Result<u64> {
        self.inner.last_offset(c)
    }
    fn offline_after(
        &mut self,
        user: &str,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> corelay::store::Result<Vec<StoredMessage>> {
        self.read_fault()?;
        self.inner.offline_after(user, after, limit)
    }
    fn conversations(&mut self) -> corelay::store::Result<Vec<(String, Vec<String>)>> {
        self.inner.conversations()
    }
    fn receipts(&mut self, c: &str) -> corelay::store::Result<Vec<Receipts>> {
        self.inner.receipts(c)
    }
    fn devices(&mut self, user: &str) -> corelay::store::Result<Vec<(String, String)>> {
        self.inner.devices(user)
    }
    fn push_claim(
        &mut self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> corelay::store::Result<Vec<PushJob>> {
        self.inner.push_claim(now_ms, lease_ms, limit)
    }
    fn push_rows(&mut self) -> corelay::store::Result<Vec<PushRow>> {
        self.inner.push_rows()
    }
    fn name(&self) -> &'static str {
        "simulated"
    }
}

/// What one live connection has seen, for the per-connection checks.
#[derive(Default)]
struct ConnView {
    /// Last offset per channel seen on this connection.
    last: BTreeMap<Arc<str>, u64>,
    /// Channels resumed from a cursor: the next offset must be exactly one past the last.
    contiguous: BTreeSet<Arc<str>>,
}

#[derive(Clone)]
struct Pending {
    conversation: String,
    client_id: String,
}

/// One device of a user, as an SDK would run it.
struct Device {
    user: Arc<str>,
    /// The node the device is connected to (a new one, at random, on every connect).
    node: usize,
    conn: Option<ConnRef>,
    /// The transport of the live connection: a WebSocket, or an SSE stream whose requests go by `POST /send`.
    sse: bool,
    /// A WebSocket through the real connection state machine.
    ws: Option<RealWs>,
    /// An SSE stream's cursor as its loop keeps it (a delivery not past it is dropped, as the loop does).
    sse_cursor: Option<corelay_proto::cursor::CursorVec>,
    /// Long polling instead of a stream: the poll in flight, and (once held) its cursor and deadline.
    polling: bool,
    poll: Option<(ConnRef, Option<(corelay_proto::cursor::CursorVec, u64)>)>,
    view: ConnView,
    /// Last offset seen per channel, across connections: what a resume asks from.
    cursor: BTreeMap<String, u64>,
    /// Every conversation offset received over the device's life, to check exactly once at the end.
    got: BTreeMap<String, Vec<u64>>,
    /// Sends not yet answered `sent`, resent in order on every connect.
    outbox: Vec<Pending>,
    /// Receipt positions seen: (conversation, member) -> (delivered, read).
    receipts: BTreeMap<(String, String), (u64, u64)>,
}

/// One gateway node: its router, the requests its store thread has queued (answered in order), and what its
/// bus connection has received and not yet handed over (in the order Redis sent it).
struct NodeSim {
    router: Router,
    queue: VecDeque<Request>,
    bus_in: VecDeque<BusEvent>,
    subs: BTreeSet<String>,
}

struct Sim {
    rng: Rng,
    now: u64,
    step: usize,
    nodes: Vec<NodeSim>,
    /// The node whose outputs are being handled.
    cur: usize,
    /// One store shared by every node (as Redis is in a cluster).
    store: Faulty,
    /// The loops' side of the WebSocket connections.
    env: SimEnv,
    /// The loops' timer wheel (one for all simulated connections), on the virtual clock from `epoch`.
    wheel: TimerWheel<(usize, u32)>,
    epoch: std::time::Instant,
    max_pending: usize,
    read_bytes: usize,
    devices: Vec<Device>,
    /// Members of each conversation.
    conversations: BTreeMap<String, Vec<Arc<str>>>,
    /// (user, conversation, client_id) -> offset named by `sent`.
    sent: BTreeMap<(String, String, String), u64>,
    /// (conversation, offset) -> (user, client_id): an offset names one message.
    offsets: BTreeMap<(String, u64), (String, String)>,
    /// Every send made: (user, conversation, client_id).
    made: BTreeSet<(String, String, String)>,
    next_generation: u32,
    next_client_id: u64,
}

const API: ConnRef = ConnRef {
    worker: 1,
    index: 0,
    generation: 0,
};

impl Sim {
    /// A world from `seed`: a few users in a few conversations, or (`crowd`) hundreds of users and devices in
    /// dozens of conversations.
    fn new(seed: u64, crowd: bool) -> Sim {
        let mut rng = Rng(seed);
        let n_users = if crowd {
            300 + rng.below(200)
        } else {
            2 + rng.below(4)
        };
        let users: Vec<Arc<str>> = (0..n_users).map(|i| Arc::from(format!("u{i}"))).collect();
        let mut devices = Vec::new();
        for u in &users {
            for _ in 0..1 + rng.below(2) {
                devices.push(Device {
                    user: u.clone(),
                    node: 0,
                    conn: None,
                    sse: false,
                    ws: None,
                    sse_cursor: None,
                    polling: false,
                    poll: None,
                    view: ConnView::default(),
                    cursor: BTreeMap::new(),
                    got: BTreeMap::new(),
                    outbox: Vec::new(),
                    receipts: BTreeMap::new(),
                });
            }
        }
        let mut conversations = BTreeMap::new();
        let n_conversations = if crowd { 40 } else { 1 + rng.below(3) };
        for c in 0..n_conversations {
            let mut members: Vec<Arc<str>> = if crowd {
                Vec::new()
            } else {
                users.iter().filter(|_| rng.chance(70)).cloned().collect()
            };
            let want = if crowd { 2 + rng.below(7) as usize } else { 2 };
            while members.len() < want {
                let u = users[rng.below(users.len() as u64) as usize].clone();
                if !members.contains(&u) {
                    members.push(u);
                }
            }
            members.sort();
            conversations.insert(format!("c{c}"), members);
        }
        let max_pending = 4 + rng.below(60) as usize;
        let write_queue = 256 + rng.below(2048) as usize;
        let read_bytes = 64 + rng.below(2048) as usize;
        let limits = HistoryLimits {
            // A small window, so that resumes read from the store as well as from memory.
            conversation_bytes: 128 + rng.below(2048) as usize,
            ..HistoryLimits::default()
        };
        let mut store = Faulty {
            inner: Embedded::in_memory().expect("in-memory store"),
            fail_next_commit: false,
            fail_next_read: false,
        };
        // One node in half the seeds; a cluster of two or three over a simulated bus in the others.
        let n_nodes = if rng.chance(50) {
            1
        } else {
            2 + rng.below(2) as usize
        };
        let mut nodes = Vec::new();
        for i in 0..n_nodes {
            let mut router = Router::new(64 << 10, limits);
            router.set_max_pending(max_pending);
            router.set_read_bytes(read_bytes);
            router.load(&mut store).expect("load");
            let mut subs = BTreeSet::new();
            if n_nodes > 1 {
                router.enable_cluster(&format!("n{i}"), 30_000);
                subs.insert(CONTROL_CHANNEL.to_string());
            }
            let bus_in = if n_nodes > 1 {
                VecDeque::from([BusEvent::Up])
            } else {
                VecDeque::new()
            };
            nodes.push(NodeSim {
                router,
                queue: VecDeque::new(),
                bus_in,
                subs,
            });
        }
        let epoch = std::time::Instant::now();
        let mut sim = Sim {
            rng,
            now: START_MS,
            step: 0,
            nodes,
            cur: 0,
            store,
            wheel: TimerWheel::new(std::time::Duration::from_millis(10), 4096, epoch),
            epoch,
            env: SimEnv {
                cfg: {
                    let mut cfg = Config {
                        // Short heartbeats, so that runs of a few virtual seconds ping and time out.
                        heartbeat_interval: std::time::Duration::from_millis(400),
                        heartbeat_timeout: std::time::Duration::from_millis(300),
                        ..Config::default()
                    };
                    // A small write queue, so that a slow reader is cut within a few messages.
                    cfg.limits.max_write_queue_bytes = write_queue;
                    cfg
                },
                verifier: Verifier::new(SECRET),
                metrics: LoopMetrics::default(),
                ring: Ring::new(Vec::<String>::new(), 1),
                sent: Vec::new(),
            },
            max_pending,
            read_bytes,
            devices,
            conversations,
            sent: BTreeMap::new(),
            offsets: BTreeMap::new(),
            made: BTreeSet::new(),
            next_generation: 1,
            next_client_id: 0,
        };
        let convs: Vec<(String, Vec<Arc<str>>)> = sim
            .conversations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, members) in convs {
            sim.cur = 0;
            sim.event(Event::Api {
                conn: API,
                req: ApiRequest::CreateConversation {
                    id,
                    members: members.iter().map(|m| m.to_string()).collect(),
                },
            });
            sim.settle_backplane();
        }
        sim
    }

    /// Moves what node `n` produced to the store queue and onto the bus.
    fn collect(&mut self, n: usize) {
        let reqs = self.nodes[n].router.take_requests();
        if trace() {
            for r in &reqs {
                let what = format!("{r:?}");
                eprintln!(
                    "step {} node {n} queued: {}",
                    self.step,
                    &what[..what.len().min(90)]
                );
            }
        }
        self.nodes[n].queue.extend(reqs);
        for cmd in self.nodes[n].router.take_bus_cmds() {
            match cmd {
                BusCmd::Subscribe(ch) => {
                    // Redis confirms a subscription in order with the messages that follow it.
                    self.nodes[n].subs.insert(ch.clone());
                    self.nodes[n].bus_in.push_back(BusEvent::Subscribed(ch));
                }
                BusCmd::Unsubscribe(ch) => {
                    self.nodes[n].subs.remove(&ch);
                }
                BusCmd::Publish { channel, payload } => {
                    for m in &mut self.nodes {
                        if m.subs.contains(&channel) {
                            m.bus_in.push_back(BusEvent::Message {
                                channel: channel.clone(),
                                payload: payload.clone(),
                            });
                        }
                    }
                }
                // Presence entries live in Redis for the append's own check; the shared store here queues every
                // member the sending node passes (absent from it and from its presence cache). The
                // announcements that feed the other nodes' caches travel like any publication, so a cache
                // that believed a user live when it was not would lose that user a message here.
                BusCmd::Presence {
                    announce_up,
                    announce_down,
                    ..
                } => {
                    self.announce(n, "up", &announce_up);
                    self.announce(n, "down", &announce_down);
                }
                BusCmd::PresenceSync { announce, ask, .. } => {
                    self.announce(n, "reset", &announce);
                    if ask {
                        self.announce(n, "ask", &[]);
                    }
                }
                // No node dies here: every lease holds.
                BusCmd::CheckNodes(_) => {}
            }
        }
    }

    /// Node `n` publishes a presence announcement (`bus::announcement`; its id is its lease token here).
    fn announce(&mut self, n: usize, kind: &str, users: &[String]) {
        if users.is_empty() && kind != "reset" && kind != "ask" {
            return;
        }
        let id = format!("n{n}");
        let payload = corelay::backplane::bus::announcement(&id, &id, kind, users);
        for (i, m) in self.nodes.iter_mut().enumerate() {
            if i != n {
                m.bus_in.push_back(BusEvent::Message {
                    channel: corelay::backplane::bus::PRESENCE_CHANNEL.to_string(),
                    payload: payload.clone(),
                });
            }
        }
    }

    /// Hands up to `k` events from the bus to their nodes, a random node at a time.
    fn deliver_bus(&mut self, k: usize) {
        for _ in 0..k {
            let Some(n) = self.pick_node(|n| !n.bus_in.is_empty()) else {
                return;
            };
            let ev = self.nodes[n].bus_in.pop_front().expect("ready");
            if trace() {
                let what = match &ev {
                    BusEvent::Message { channel, payload } => {
                        format!("message {channel} {}", &payload[..payload.len().min(40)])
                    }
                    other => format!("{other:?}"),
                };
                eprintln!("step {} node {n} bus: {what}", self.step);
            }
            self.cur = n;
            let mut out = Vec::new();
            self.nodes[n].router.on_bus(ev, self.now, &mut out);
            self.absorb(out);
            self.collect(n);
        }
    }

    /// Node `n`'s bus connection breaks and comes back: what was in flight to it is lost; it resubscribes.
    fn break_bus(&mut self, n: usize) {
        if self.nodes.len() < 2 {
            return;
        }
        if trace() {
            eprintln!("step {} node {n}: bus connection lost", self.step);
        }
        self.nodes[n].bus_in.clear();
        self.cur = n;
        let mut out = Vec::new();
        self.nodes[n]
            .router
            .on_bus(BusEvent::Down, self.now, &mut out);
        self.absorb(out);
        self.collect(n);
        let subs: Vec<String> = self.nodes[n].subs.iter().cloned().collect();
        self.nodes[n].bus_in.push_back(BusEvent::Up);
        for ch in subs {
            self.nodes[n].bus_in.push_back(BusEvent::Subscribed(ch));
        }
    }

    /// Each node's periodic work (presence refresh, asking the store for gaps).
    fn tick(&mut self) {
        for n in 0..self.nodes.len() {
            self.nodes[n].router.tick(self.now);
            self.collect(n);
        }
    }

    /// Store, bus and timers until nothing is in flight anywhere.
    fn settle_backplane(&mut self) {
        for _ in 0..10_000 {
            self.drain_store();
            self.deliver_bus(usize::MAX);
            self.now += GAP_WAIT_MS + 1;
            self.tick();
            if self
                .nodes
                .iter()
                .all(|n| n.queue.is_empty() && n.bus_in.is_empty())
            {
                return;
            }
        }
        self.fail("the backplane never settles".into());
    }

    fn fail(&self, what: String) -> ! {
        panic!("step {}: {what}", self.step)
    }

    /// An event for the current node (`cur`).
    fn event(&mut self, ev: Event) {
        let n = self.cur;
        let mut out = Vec::new();
        self.nodes[n].router.handle(ev, self.now, &mut out);
        self.absorb(out);
        self.cur = n;
        self.collect(n);
    }

    fn client(&mut self, d: usize, json: &str) {
        if trace() {
            eprintln!("step {} device {d} sends {json}", self.step);
        }
        let Some(conn) = self.devices[d].conn else {
            return;
        };
        self.cur = self.devices[d].node;
        let msg = parse_client(json.as_bytes())
            .unwrap_or_else(|e| self.fail(format!("bad client message {json}: {e:?}")));
        let user = self.devices[d].user.clone();
        if self.devices[d].sse {
            // `POST /send` on a connection of its own.
            self.next_generation += 1;
            let http = ConnRef {
                worker: 2,
                index: d as u32,
                generation: self.next_generation,
            };
            self.event(Event::Send {
                conn: http,
                user,
                msg,
                stream: None,
                expires: None,
            });
        } else if self.devices[d].ws.is_some() {
            drop(msg);
            let frame = client_frame(1, json.as_bytes());
            self.client_sends(d, frame);
        } else {
            self.event(Event::Received { conn, user, msg });
        }
    }

    /// Bytes from device `d`'s client to its connection; read by the loop while the connection wants input.
    fn client_sends(&mut self, d: usize, bytes: Vec<u8>) {
        let Some(ws) = self.devices[d].ws.as_mut() else {
            return;
        };
        if ws.silent {
            return; // lost on the dead network
        }
        ws.pending_in.extend_from_slice(&bytes);
        self.pump(d);
    }

    /// The loop's turn for device `d`'s connection: read what it wants, apply effects, and let the client
    /// read what was written.
    fn pump(&mut self, d: usize) {
        for _ in 0..100 {
            let now = self.now;
            let Some(ws) = self.devices[d].ws.as_mut() else {
                return;
            };
            let mut fx = Effects::default();
            if ws.conn.wants_input() && !ws.pending_in.is_empty() {
                let mut data = std::mem::take(&mut ws.pending_in);
                fx = ws.conn.on_bytes(&mut data, &mut self.env, now);
            }
            let more = self.apply(d, fx);
            self.forward_env_events(d);
            self.client_reads(d);
            if !more {
                return;
            }
        }
    }

    /// Applies a connection's effects as the loop does; true when the loop should read again.
    fn apply(&mut self, d: usize, fx: Effects) -> bool {
        let now = self.now;
        let Some(ws) = self.devices[d].ws.as_mut() else {
            return false;
        };
        if let Some(at) = fx.schedule {
            let key = ws.timer.take();
            let deadline = self.epoch + std::time::Duration::from_millis(at - START_MS);
            let gen_ = ws.conn.id.generation;
            if let Some(k) = key {
                self.wheel.cancel(k);
            }
            let k = self.wheel.insert(deadline, (d, gen_));
            if let Some(ws) = self.devices[d].ws.as_mut() {
                ws.timer = Some(k);
            }
        }
        let Some(ws) = self.devices[d].ws.as_mut() else {
            return false;
        };
        if fx.close {
            // The loop closes the socket: the connection tells the backplane.
            let _ = ws;
            let mut ws = self.take_ws(d).expect("ws");
            ws.conn.on_closed(&mut self.env);
            self.devices[d].conn = None;
            self.forward_env_events(d);
            if trace() {
                eprintln!(
                    "step {} device {d}: the gateway closed the connection",
                    self.step
                );
            }
            return false;
        }
        if ws.slow_until.is_some_and(|t| t > now) {
            // The client's window is full: nothing is written until it reads again.
            return fx.read && !ws.pending_in.is_empty();
        }
        ws.slow_until = None;
        // Everything queued is written at once here (the client reads as fast as it is written).
        let mut out = Vec::new();
        ws.conn.out.write_to(&mut out).expect("write queue");
        ws.to_client.extend_from_slice(&out);
        let fx2 = ws.conn.on_flushed(now);
        if fx2 != Effects::default() {
            return self.apply(d, fx2) || fx.read;
        }
        fx.read && !ws.pending_in.is_empty()
    }

    /// Hands the events a connection produced to its node's router.
    fn forward_env_events(&mut self, d: usize) {
        let events = std::mem::take(&mut self.env.sent);
        for ev in events {
            self.cur = self.devices[d].node;
            self.event(ev);
        }
    }

    /// The client parses what its connection wrote: the upgrade's head, then frames (answering pings and
    /// closes as a client library does).
    fn client_reads(&mut self, d: usize) {
        loop {
            let Some(ws) = self.devices[d].ws.as_mut() else {
                return;
            };
            if ws.silent {
                ws.to_client.clear();
                return;
            }
            if !ws.upgraded {
                let Some(end) = ws.to_client.windows(4).position(|w| w == b"\r\n\r\n") else {
                    return;
                };
                let head = String::from_utf8_lossy(&ws.to_client[..end]).into_owned();
                ws.to_client.drain(..end + 4);
                if !head.starts_with("HTTP/1.1 101") {
                    self.fail(format!("device {d}: the upgrade was refused: {head}"));
                }
                ws.upgraded = true;
                continue;
            }
            let (h, n) = match corelay_proto::ws::decode_header(&ws.to_client) {
                Ok(Some(x)) => x,
                Ok(None) => return,
                Err(e) => self.fail(format!("device {d}: bad frame from the gateway: {e:?}")),
            };
            let len = n + h.payload_len as usize;
            if ws.to_client.len() < len {
                return;
            }
            let payload: Vec<u8> = ws.to_client[n..len].to_vec();
            ws.to_client.drain(..len);
            match h.opcode {
                1 => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&payload).expect("frame json");
                    self.on_frame_json(d, &v);
                }
                9 => self.client_sends(d, client_frame(10, &payload)),
                8 => {
                    if trace() {
                        let why = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
                        eprintln!(
                            "step {} device {d}: the gateway sent close: {why}",
                            self.step
                        );
                    }
                    // The gateway's close: the client answers it and the connection ends.
                    self.client_sends(d, client_frame(8, &payload));
                    if let Some(mut ws) = self.take_ws(d) {
                        ws.conn.on_closed(&mut self.env);
                        self.devices[d].conn = None;
                        self.forward_env_events(d);
                    }
                    return;
                }
                _ => {}
            }
        }
    }

    /// A text frame on a WebSocket: a channel item (it names its channel) or a reply.
    fn on_frame_json(&mut self, d: usize, v: &serde_json::Value) {
        let item = matches!(
            v["type"].as_str(),
            Some("message" | "receipt" | "notice" | "reset")
        ) && v.get("channel").is_some();
        if item {
            let channel: Arc<str> = Arc::from(v["channel"].as_str().unwrap_or_default());
            let offset = v["channel_offset"]
                .as_u64()
                .or(v["offset"].as_u64())
                .unwrap_or_default();
            self.on_item(d, &channel, offset, v);
        } else {
            self.on_reply(d, v);
        }
    }

    /// Fires the connections' timers that are due (heartbeats, deadlines), from the loop's timer wheel.
    fn fire_timers(&mut self) {
        let now_at = self.epoch + std::time::Duration::from_millis(self.now - START_MS);
        let mut due = Vec::new();
        self.wheel.poll_expired(now_at, &mut due);
        for (d, generation) in due {
            let now = self.now;
            let Some(ws) = self.devices[d].ws.as_mut() else {
                continue;
            };
            if ws.conn.id.generation != generation {
                continue; // a stale key of a closed connection would have been cancelled
            }
            ws.timer = None;
            let fx = ws.conn.on_timer(&mut self.env, now);
            if trace() {
                eprintln!("step {} device {d}: timer at {now}: {fx:?}", self.step);
            }
            self.apply(d, fx);
            self.forward_env_events(d);
            self.client_reads(d);
        }
    }

    /// Takes device `d`'s connection away (it closed), cancelling its timer as the loop does.
    fn take_ws(&mut self, d: usize) -> Option<RealWs> {
        let ws = self.devices[d].ws.take()?;
        if let Some(k) = ws.timer {
            self.wheel.cancel(k);
        }
        Some(ws)
    }

    /// A random node among those `has` says have work; None when none has.
    fn pick_node(&mut self, has: impl Fn(&NodeSim) -> bool) -> Option<usize> {
        let ready: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| has(&self.nodes[n]))
            .collect();
        if ready.is_empty() {
            return None;
        }
        Some(ready[self.rng.below(ready.len() as u64) as usize])
    }

    /// Answers up to `k` queued store requests: each from a random node's queue, oldest first there (each node
    /// has its own store thread; they interleave at the shared store).
    fn answer_store(&mut self, k: usize) {
        for _ in 0..k {
            let Some(n) = self.pick_node(|n| !n.queue.is_empty()) else {
                return;
            };
            let req = self.nodes[n].queue.pop_front().expect("ready");
            if trace() {
                let what = format!("{req:?}");
                eprintln!(
                    "step {} node {n} store: {}",
                    self.step,
                    &what[..what.len().min(90)]
                );
            }
            let tok = format!("{req:?}");
            let c = match req {
                Request::Commit { token, batch } => Completion::Committed {
                    token,
                    result: self.store.commit(&batch),
                },
                read => answer(&mut self.store, read, self.read_bytes),
            };
            self.cur = n;
            let mut out = Vec::new();
            self.nodes[n].router.on_completion(c, self.now, &mut out);
            if trace() {
                for o in &out {
                    if let Out::Message { to, delivery } = o {
                        eprintln!(
                            "   completion {} -> {}@{} to {:?}",
                            &tok[..tok.len().min(40)],
                            delivery.channel,
                            delivery.offset,
                            to.iter().map(|c| c.generation).collect::<Vec<_>>()
                        );
                    }
                }
            }
            self.absorb(out);
            self.collect(n);
        }
    }

    fn drain_store(&mut self) {
        let mut rounds = 0;
        while self.nodes.iter().any(|n| !n.queue.is_empty()) {
            self.answer_store(usize::MAX);
            rounds += 1;
            if rounds > 10_000 {
                self.fail("the store queue never drains".into());
            }
        }
    }

    /// The device whose poll in flight is `conn`.
    fn poll_of(&self, conn: ConnRef) -> Option<usize> {
        self.devices
            .iter()
            .position(|d| d.poll.as_ref().is_some_and(|(c, _)| *c == conn))
    }

    /// A polling device's next step: a new poll when none is in flight, or the end of a held one that timed out.
    fn poll_step(&mut self, d: usize) {
        if !self.devices[d].polling || self.devices[d].conn.is_none() {
            return;
        }
        self.cur = self.devices[d].node;
        match self.devices[d].poll.clone() {
            Some((c, Some((_, until)))) if self.now >= until => {
                // The loop answers 204 at the hold's end and stops following.
                self.devices[d].poll = None;
                self.event(Event::Unfollow { conn: c });
            }
            Some(_) => {}
            None => {
                self.next_generation += 1;
                let conn = ConnRef {
                    worker: 3,
                    index: d as u32,
                    generation: self.next_generation,
                };
                let cursor = self.resume_cursor(d);
                self.devices[d].poll = Some((conn, None));
                let user = self.devices[d].user.clone();
                let hold_ms = 200 + self.rng.below(2000);
                self.event(Event::Poll {
                    conn,
                    user,
                    channels: Vec::new(),
                    cursor: Some(cursor),
                    hold_ms,
                });
            }
        }
    }

    /// A polling device polls until its poll is held: it has caught up with everything committed.
    fn poll_until_held(&mut self, d: usize) {
        for _ in 0..1000 {
            if !self.devices[d].polling || matches!(self.devices[d].poll, Some((_, Some(_)))) {
                return;
            }
            self.poll_step(d);
            self.settle_backplane();
            self.now += 1;
        }
        self.fail(format!("device {d} never caught up by polling"));
    }

    /// Where the device resumes each of its conversations from (0: from the start), and its `user:` channel
    /// once it has seen one of its items (before that the offline queue brings them).
    fn resume_cursor(&self, d: usize) -> BTreeMap<String, u64> {
        let dev = &self.devices[d];
        let mut cursor: BTreeMap<String, u64> = self
            .conversations
            .iter()
            .filter(|(_, m)| m.contains(&dev.user))
            .map(|(c, _)| {
                let ch = format!("conversation:{c}");
                let at = *dev.cursor.get(&ch).unwrap_or(&0);
                (ch, at)
            })
            .collect();
        let own = format!("user:{}", dev.user);
        if let Some(&at) = dev.cursor.get(&own) {
            cursor.insert(own, at);
        }
        cursor
    }

    fn device_of(&self, conn: ConnRef) -> Option<usize> {
        self.devices.iter().position(|d| d.conn == Some(conn))
    }

    fn absorb(&mut self, out: Vec<Out>) {
        for o in out {
            match o {
                Out::Message { to, delivery } => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&delivery.json).expect("delivery json");
                    for c in to {
                        if let Some(d) = self.poll_of(c) {
                            // A held poll: the loop answers it with this message if it is past the cursor.
                            let Some((_, Some((cur, _)))) = self.devices[d].poll.as_mut() else {
                                continue;
                            };
                            if !corelay_proto::cursor::advance(
                                cur,
                                &delivery.channel,
                                delivery.offset,
                            ) {
                                continue;
                            }
                            self.devices[d].poll = None;
                            self.event(Event::Unfollow { conn: c });
                            self.on_item(d, &delivery.channel, delivery.offset, &v);
                            continue;
                        }
                        if let Some(d) = self.device_of(c)
                            && self.devices[d].ws.is_some()
                        {
                            let now = self.now;
                            let ws = self.devices[d].ws.as_mut().expect("ws");
                            let fx = ws.conn.deliver(&delivery, &mut self.env, now);
                            self.apply(d, fx);
                            self.forward_env_events(d);
                            self.client_reads(d);
                            continue;
                        }
                        if let Some(d) = self.device_of(c) {
                            if let Some(cur) = self.devices[d].sse_cursor.as_mut()
                                && !corelay_proto::cursor::advance(
                                    cur,
                                    &delivery.channel,
                                    delivery.offset,
                                )
                            {
                                continue; // the loop drops what the stream's cursor already has
                            }
                            self.on_item(d, &delivery.channel, delivery.offset, &v);
                        }
                    }
                }
                Out::Frame { to, frame } => {
                    let (h, n) = corelay_proto::ws::decode_header(&frame)
                        .expect("frame")
                        .expect("whole frame");
                    assert_eq!(h.opcode, 1, "text frame");
                    let v: serde_json::Value =
                        serde_json::from_slice(&frame[n..]).expect("frame json");
                    for c in to {
                        if let Some(d) = self.device_of(c) {
                            if self.devices[d].ws.is_some() {
                                let now = self.now;
                                let ws = self.devices[d].ws.as_mut().expect("ws");
                                let fx = ws.conn.send_frame(&frame, &mut self.env, now);
                                self.apply(d, fx);
                                self.forward_env_events(d);
                                self.client_reads(d);
                            } else {
                                self.on_reply(d, &v);
                            }
                        }
                    }
                }
                Out::Loop { conn, cmd } => match cmd {
                    LoopCmd::Close { code, reason, .. } => {
                        if trace() {
                            eprintln!("step {} {conn:?} closed {code} {reason}", self.step);
                        }
                        if let Some(d) = self.device_of(conn) {
                            if self.devices[d].ws.is_some() {
                                // The connection sends its close frame; the client answers and it ends.
                                let now = self.now;
                                let ws = self.devices[d].ws.as_mut().expect("ws");
                                let fx = ws.conn.close_by(code, reason, &mut self.env, now);
                                self.apply(d, fx);
                                self.forward_env_events(d);
                                self.client_reads(d);
                            } else {
                                self.disconnect(d);
                            }
                        }
                    }
                    LoopCmd::Respond { status, body, .. } => {
                        if trace() {
                            eprintln!("step {} {conn:?} answered {status} {body}", self.step);
                        }
                        if conn == API {
                            if !(200..300).contains(&status) {
                                self.fail(format!("API answered {status} {body}"));
                            }
                        } else if let Some(d) = self.poll_of(conn) {
                            self.devices[d].poll = None;
                            if status == 200 {
                                let v: serde_json::Value =
                                    serde_json::from_str(&body).expect("poll json");
                                for m in v["messages"].as_array().cloned().unwrap_or_default() {
                                    let channel: Arc<str> =
                                        Arc::from(m["channel"].as_str().expect("channel"));
                                    let offset = m["channel_offset"]
                                        .as_u64()
                                        .or(m["offset"].as_u64())
                                        .expect("offset");
                                    self.on_item(d, &channel, offset, &m);
                                }
                            }
                        } else if conn.worker == 2 {
                            // A `POST /send` answer: the same JSON a WebSocket gets.
                            let d = conn.index as usize;
                            if self.devices[d].conn.is_some() {
                                let v: serde_json::Value =
                                    serde_json::from_str(&body).expect("answer json");
                                self.on_reply(d, &v);
                            }
                        } else if let Some(d) = self.device_of(conn) {
                            // A stream refused before it started (busy, too many): come back later.
                            let _ = (status, body);
                            self.devices[d].conn = None;
                        }
                    }
                    LoopCmd::PollHold {
                        cursor, hold_ms, ..
                    } => {
                        if let Some(d) = self.poll_of(conn) {
                            let until = self.now + hold_ms;
                            self.devices[d].poll = Some((conn, Some((cursor, until))));
                        }
                    }
                    LoopCmd::StreamStart { cursor, .. } => {
                        if let Some(d) = self.device_of(conn) {
                            self.devices[d].sse_cursor = Some(cursor);
                        }
                    }
                    other => self.fail(format!("unexpected loop command {other:?}")),
                },
            }
        }
    }

    /// A channel item (message, receipt, notice) arrives on device `d`'s connection.
    fn on_item(&mut self, d: usize, channel: &Arc<str>, offset: u64, v: &serde_json::Value) {
        if trace() {
            eprintln!("step {} device {d} item {channel}@{offset} {v}", self.step);
        }
        let step = self.step;
        let dev = &mut self.devices[d];
        let prev = dev.view.last.get(channel).copied();
        if let Some(p) = prev {
            if offset <= p {
                panic!(
                    "step {step}: {} got {channel}@{offset} after @{p} on one connection (duplicate or reordered)",
                    dev.user
                );
            }
            if dev.view.contiguous.contains(channel) && offset != p + 1 {
                panic!(
                    "step {step}: {} resumed {channel} and got @{offset} after @{p}: a gap",
                    dev.user
                );
            }
        }
        dev.view.last.insert(channel.clone(), offset);
        let seen = dev.cursor.entry(channel.to_string()).or_insert(0);
        // An offline-queue entry not acked yet comes again on the next connection (at least once until
        // acked); the SDK drops what it has seen by offset. Conversations are resumed from the cursor, so they
        // must never come twice; `user:` items are deduped here as a client would.
        let again = offset <= *seen;
        *seen = (*seen).max(offset);
        if let Some(conv) = channel.strip_prefix("conversation:") {
            dev.got.entry(conv.to_string()).or_default().push(offset);
            let from = v["from"].as_str().unwrap_or_default().to_string();
            let cid = v["body"]["cid"].as_str().unwrap_or_default().to_string();
            match self.offsets.get(&(conv.to_string(), offset)) {
                Some((u, c)) if *u != from || *c != cid => self.fail(format!(
                    "{conv}@{offset} is ({from}, {cid}) here and ({u}, {c}) before"
                )),
                Some(_) => {}
                None => {
                    self.offsets.insert((conv.to_string(), offset), (from, cid));
                }
            }
        } else if v["type"] == "receipt" && !again {
            let conv = v["conversation"].as_str().unwrap_or_default().to_string();
            let by = v["by"].as_str().unwrap_or_default().to_string();
            let at = v["offset"].as_u64().unwrap_or_default();
            let step = self.step;
            // Known gap (docs/RELIABILITY.md): in a cluster, two nodes handling one member's receipts at once
            // each order their own notices only; the client keeps the highest. Checked on one node.
            let strict = self.nodes.len() == 1;
            let dev = &mut self.devices[d];
            let r = dev.receipts.entry((conv.clone(), by.clone())).or_default();
            match v["state"].as_str() {
                Some("delivered") if !strict => r.0 = r.0.max(at),
                Some("read") if !strict => {
                    r.1 = r.1.max(at);
                    r.0 = r.0.max(at);
                }
                Some("delivered") => {
                    if at < r.0 {
                        panic!(
                            "step {step}: receipt for {conv} by {by} went back: delivered {at} after {}",
                            r.0
                        );
                    }
                    r.0 = at;
                }
                Some("read") => {
                    if at < r.1 {
                        panic!(
                            "step {step}: receipt for {conv} by {by} went back: read {at} after {}",
                            r.1
                        );
                    }
                    r.1 = at;
                    r.0 = r.0.max(at);
                }
                other => panic!("step {step}: receipt state {other:?}"),
            }
        }
    }

    /// A direct reply (`sent`, `subscribed`, `error`, …) on device `d`'s connection.
    fn on_reply(&mut self, d: usize, v: &serde_json::Value) {
        if trace() {
            eprintln!("step {} device {d} reply {v}", self.step);
        }
        match v["type"].as_str() {
            Some("sent") => {
                let user = self.devices[d].user.to_string();
                let conv = v["conversation"].as_str().unwrap_or_default().to_string();
                let cid = v["client_id"].as_str().unwrap_or_default().to_string();
                let offset = v["offset"].as_u64().unwrap_or_default();
                match self.sent.get(&(user.clone(), conv.clone(), cid.clone())) {
                    Some(&o) if o != offset => self.fail(format!(
                        "{user}'s {cid} in {conv} was sent at {o} and again at {offset}"
                    )),
                    _ => {}
                }
                match self.offsets.get(&(conv.clone(), offset)) {
                    Some((u, c)) if *u != user || *c != cid => self.fail(format!(
                        "{conv}@{offset} acknowledged to ({user}, {cid}) but holds ({u}, {c})"
                    )),
                    _ => {}
                }
                self.offsets
                    .insert((conv.clone(), offset), (user.clone(), cid.clone()));
                self.sent.insert((user, conv, cid.clone()), offset);
                self.devices[d].outbox.retain(|p| p.client_id != cid);
            }
            Some("error") => match v["code"].as_str() {
                // Retryable: the send stays in the outbox. A refused resume (no `ref`) leaves the connection
                // without its replay, so the client reconnects and resumes again, as the SDK does.
                Some("store_busy" | "store_unavailable" | "overloaded" | "rate_limited") => {
                    if v.get("ref").is_none() {
                        self.disconnect(d);
                    }
                }
                other => self.fail(format!("unexpected error {other:?}: {v}")),
            },
            Some("subscribed") => {
                // `subscribed` comes after the replay: the connection has each channel up to where it says.
                for (ch, at) in v["cursor"].as_object().cloned().unwrap_or_default() {
                    let at = at.as_u64().unwrap_or(0);
                    let has = self.devices[d]
                        .view
                        .last
                        .get(ch.as_str())
                        .copied()
                        .unwrap_or(0);
                    if ch.starts_with("conversation:") && has < at {
                        self.fail(format!(
                            "device {d}: `subscribed` says {ch} is at {at} before the replay got past {has}"
                        ));
                    }
                }
            }
            Some("welcome" | "history" | "ok") => {}
            other => self.fail(format!("unexpected reply {other:?}: {v}")),
        }
    }

    fn connect(&mut self, d: usize) {
        if self.devices[d].conn.is_some() {
            return;
        }
        let conn = ConnRef {
            worker: 0,
            index: d as u32,
            generation: self.next_generation,
        };
        self.next_generation += 1;
        let user = self.devices[d].user.clone();
        let node = self.rng.below(self.nodes.len() as u64) as usize;
        self.devices[d].node = node;
        self.cur = node;
        if trace() {
            eprintln!(
                "step {} device {d} connects as {} to node {node}",
                self.step, conn.generation
            );
        }
        self.devices[d].conn = Some(conn);
        self.devices[d].view = ConnView::default();
        // Resume every conversation of the user from the device's cursor (0: from the start), and its `user:`
        // channel once it has seen it, either at connect (`/ws?cursor=`) or with a `subscribe` right after it.
        let cursor = self.resume_cursor(d);
        let channels: Vec<String> = cursor.keys().cloned().collect();
        for (c, &o) in &cursor {
            let c: Arc<str> = Arc::from(c.as_str());
            self.devices[d].view.contiguous.insert(c.clone());
            self.devices[d].view.last.insert(c, o);
        }
        let how = self.rng.below(4);
        if trace() {
            let t = [
                "websocket + subscribe",
                "websocket ?cursor=",
                "sse",
                "long polling",
            ][how as usize];
            eprintln!("step {} device {d} transport {t}", self.step);
        }
        self.devices[d].sse = how >= 2;
        self.devices[d].polling = how == 3;
        self.devices[d].sse_cursor = None;
        self.devices[d].poll = None;
        if how == 3 {
            // Polls carry the cursor each time; nothing is registered for the device between them.
            self.poll_step(d);
        } else if how == 2 {
            // An SSE stream resuming from `Last-Event-ID`.
            self.event(Event::Stream {
                conn,
                user: user.clone(),
                channels: Vec::new(),
                cursor,
            });
        } else {
            // A WebSocket through the real connection state machine: the client's upgrade request, with the
            // cursor in the URL (how 1) or a `subscribe` right after the welcome (how 0).
            let (c, fx) = Conn::accept(
                ConnId {
                    index: conn.index,
                    generation: conn.generation,
                },
                false,
                false,
                &mut self.env,
                self.now,
            );
            self.devices[d].ws = Some(RealWs {
                conn: c,
                timer: None,
                pending_in: Vec::new(),
                to_client: Vec::new(),
                upgraded: false,
                silent: false,
                slow_until: None,
            });
            self.apply(d, fx);
            let token = corelay::auth::mint(SECRET, &user, std::time::Duration::from_secs(86_400))
                .expect("token");
            let query = if how == 1 {
                let text =
                    corelay_proto::cursor::format(cursor.iter().map(|(c, o)| (c.as_str(), *o)));
                let enc: String = text
                    .bytes()
                    .map(|b| match b {
                        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                            (b as char).to_string()
                        }
                        _ => format!("%{b:02X}"),
                    })
                    .collect();
                format!("&cursor={enc}")
            } else {
                String::new()
            };
            let req = format!(
                "GET /ws?token={token}{query} HTTP/1.1\r\nHost: sim\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: corelay.v1\r\n\r\n"
            );
            self.client_sends(d, req.into_bytes());
            if how == 0 && self.devices[d].conn.is_some() {
                let json = serde_json::json!({"type": "subscribe", "channels": channels, "cursor": cursor});
                self.client(d, &json.to_string());
            }
        }
        let outbox = self.devices[d].outbox.clone();
        for p in outbox {
            self.send_json(d, &p);
        }
    }

    fn disconnect(&mut self, d: usize) {
        let Some(conn) = self.devices[d].conn.take() else {
            return;
        };
        self.cur = self.devices[d].node;
        if trace() {
            eprintln!("step {} device {d} disconnects", self.step);
        }
        if let Some(mut ws) = self.take_ws(d) {
            // The client's socket is gone: the loop sees the close and the connection tells the backplane.
            let _ = conn;
            ws.conn.on_closed(&mut self.env);
            self.forward_env_events(d);
            return;
        }
        if self.devices[d].polling {
            self.devices[d].polling = false;
            if let Some((c, held)) = self.devices[d].poll.take() {
                // A poll in flight is abandoned; a held one stops being followed.
                if held.is_some() {
                    self.event(Event::Unfollow { conn: c });
                } else {
                    self.event(Event::Closed {
                        conn: c,
                        user: None,
                    });
                }
            }
            return;
        }
        let user = self.devices[d].user.clone();
        self.event(Event::Closed {
            conn,
            user: Some(user),
        });
    }

    fn send_json(&mut self, d: usize, p: &Pending) {
        let json = serde_json::json!({
            "type": "send", "conversation": p.conversation, "client_id": p.client_id,
            "body": {"cid": p.client_id},
        });
        self.client(d, &json.to_string());
    }

    fn random_step(&mut self) {
        self.step += 1;
        self.now += self.rng.below(40);
        let d = self.rng.below(self.devices.len() as u64) as usize;
        match self.rng.below(100) {
            0..=14 => self.connect(d),
            15..=21 => self.disconnect(d),
            22..=51 => {
                let user = self.devices[d].user.clone();
                let mine: Vec<String> = self
                    .conversations
                    .iter()
                    .filter(|(_, m)| m.contains(&user))
                    .map(|(c, _)| c.clone())
                    .collect();
                if mine.is_empty() || self.devices[d].conn.is_none() {
                    return;
                }
                let conversation = mine[self.rng.below(mine.len() as u64) as usize].clone();
                self.next_client_id += 1;
                let p = Pending {
                    conversation: conversation.clone(),
                    client_id: format!("m{}", self.next_client_id),
                };
                self.made
                    .insert((user.to_string(), conversation, p.client_id.clone()));
                self.devices[d].outbox.push(p.clone());
                self.send_json(d, &p);
            }
            52..=61 => {
                // Ack or read what this connection has seen of one conversation.
                let seen: Vec<(String, u64)> = self.devices[d]
                    .view
                    .last
                    .iter()
                    .filter_map(|(c, &o)| {
                        c.strip_prefix("conversation:")
                            .filter(|_| o > 0)
                            .map(|c| (c.to_string(), o))
                    })
                    .collect();
                if seen.is_empty() {
                    return;
                }
                let (conv, o) = seen[self.rng.below(seen.len() as u64) as usize].clone();
                let ty = if self.rng.chance(50) { "ack" } else { "read" };
                let json = serde_json::json!({"type": ty, "conversation": conv, "offset": o});
                self.client(d, &json.to_string());
            }
            64..=66 => {
                // A retry of the oldest unanswered send (a client timer firing).
                if let Some(p) = self.devices[d].outbox.first().cloned() {
                    self.send_json(d, &p);
                }
            }
            62..=63 => self.poll_step(d),
            72..=79 => {
                let k = self.rng.below(6) as usize;
                self.deliver_bus(k);
            }
            80 => {
                let n = self.rng.below(self.nodes.len() as u64) as usize;
                self.break_bus(n);
            }
            81 => {
                // The client's network dies without a FIN: only the heartbeat can notice.
                if let Some(ws) = self.devices[d].ws.as_mut() {
                    ws.silent = true;
                }
            }
            82..=86 => {
                // A slow reader: it stops reading for a while; past the write-queue cap the gateway cuts it
                // (1013) and it resumes from its cursor.
                let until = self.now + 200 + self.rng.below(3_000);
                if let Some(ws) = self.devices[d].ws.as_mut() {
                    ws.slow_until = Some(until);
                    if trace() {
                        eprintln!("step {} device {d}: reads nothing until {until}", self.step);
                    }
                }
            }
            67..=69 => self.store.fail_next_commit = true,
            70..=71 => self.store.fail_next_read = true,
            _ => {
                let n = self.rng.below(4) as usize;
                self.answer_store(n);
            }
        }
        self.tick();
        self.fire_timers();
        // Slow readers whose pause is over read what was queued.
        for i in 0..self.devices.len() {
            let over = self.devices[i]
                .ws
                .as_ref()
                .and_then(|w| w.slow_until)
                .is_some_and(|t| t <= self.now);
            if over {
                let fx = Effects::default();
                self.apply(i, fx);
                self.client_reads(i);
            }
        }
        // Every live connection has its timer armed (a heartbeat or a deadline: one that loses it would never
        // notice a dead peer), holds no partial input beyond a request head, and has written everything.
        for (i, dev) in self.devices.iter().enumerate() {
            if let Some(ws) = &dev.ws {
                if ws.timer.is_none_or(|k| self.wheel.deadline(k).is_none()) {
                    self.fail(format!("device {i}: a live connection without a timer"));
                }
                if ws.conn.inbuf.len() > self.env.cfg.limits.max_header_bytes {
                    self.fail(format!(
                        "device {i}: {} bytes of partial input",
                        ws.conn.inbuf.len()
                    ));
                }
                let slow = ws.slow_until.is_some_and(|t| t > self.now);
                if !slow && !ws.conn.out.is_empty() {
                    self.fail(format!("device {i}: output left unwritten"));
                }
                // What a slow reader costs is bounded by the cap (plus the one item that passed it).
                let cap = self.env.cfg.limits.max_write_queue_bytes + 4096;
                if ws.conn.out.len() > cap {
                    self.fail(format!(
                        "device {i}: {} bytes queued past the cap",
                        ws.conn.out.len()
                    ));
                }
            }
        }
        // The bound is checked before an event's requests are queued, so one event (a resume with a cursor:
        // one read per channel, the flush and the ack) may pass it by its own requests, never more.
        // In a cluster, a node also reads to sync and fill the channels it follows on the bus (never refused:
        // that would lose messages); those are bounded by the channels it follows, not by the client bound.
        let one_event = self.conversations.len() + 3;
        for (i, n) in self.nodes.iter().enumerate() {
            let pending = n.router.pending_requests();
            let sync = 2 * n.subs.len();
            if pending > self.max_pending + one_event + sync {
                self.fail(format!(
                    "node {i}: {pending} store requests in flight past the bound {} (+{one_event} for one \
                     event, +{sync} for bus sync)",
                    self.max_pending
                ));
            }
        }
    }

    /// Reconnects every device until every send is answered and the store is idle, then checks the end state.
    fn settle_and_check(&mut self) {
        self.store.fail_next_commit = false;
        self.store.fail_next_read = false;
        for round in 0..50 {
            self.now += 5_000;
            self.settle_backplane();
            // One device at a time (clients back off with jitter): a crowd reconnecting at once can spend the
            // whole store budget on resumes, round after round.
            for d in 0..self.devices.len() {
                self.disconnect(d);
                // A resume refused as busy (the client is closed, or told `store_busy`) is tried again.
                for _ in 0..20 {
                    self.connect(d);
                    self.settle_backplane();
                    if self.devices[d].conn.is_some() {
                        break;
                    }
                    self.now += 1_000;
                }
                self.poll_until_held(d);
                // The SDK's retry timer: sends refused as `store_busy` behind the resume go again.
                for p in self.devices[d].outbox.clone() {
                    self.send_json(d, &p);
                }
                self.settle_backplane();
            }
            if self
                .devices
                .iter()
                .all(|d| d.outbox.is_empty() && d.conn.is_some())
            {
                break;
            }
            if round == 49 {
                self.fail("sends still unanswered after 50 reconnect rounds".into());
            }
        }
        // Polling devices poll until a poll is held again: then they have everything committed.
        for d in 0..self.devices.len() {
            self.poll_until_held(d);
        }
        // Everything sent was committed exactly once.
        for (user, conv, cid) in &self.made {
            let holders: Vec<u64> = self
                .offsets
                .iter()
                .filter(|((c, _), (u, i))| c == conv && u == user && i == cid)
                .map(|((_, o), _)| *o)
                .collect();
            if holders.len() != 1 {
                self.fail(format!(
                    "{user}'s {cid} in {conv} is stored at offsets {holders:?}"
                ));
            }
        }
        // Every device of every member holds every offset of its conversations once, in order.
        for (conv, members) in &self.conversations {
            let last = self
                .offsets
                .keys()
                .filter(|(c, _)| c == conv)
                .map(|(_, o)| *o)
                .max()
                .unwrap_or(0);
            for (i, dev) in self.devices.iter().enumerate() {
                if !members.contains(&dev.user) {
                    continue;
                }
                let got = dev.got.get(conv).cloned().unwrap_or_default();
                let want: Vec<u64> = (1..=last).collect();
                if got != want {
                    self.fail(format!(
                        "device {i} ({}) holds {conv} offsets {got:?}, want 1..={last}",
                        dev.user
                    ));
                }
            }
        }
        for d in 0..self.devices.len() {
            self.disconnect(d);
        }
        self.settle_backplane();
        if !self.wheel.is_empty() {
            self.fail(format!(
                "{} timers left in the wheel with every connection closed",
                self.wheel.len()
            ));
        }
        for dev in &self.devices {
            if self
                .nodes
                .iter()
                .any(|n| !n.router.connections(&dev.user).is_empty())
            {
                self.fail(format!(
                    "the router still holds connections of {}",
                    dev.user
                ));
            }
        }
    }
}

/// `SIM_TRACE=1`: print every client message, reply and item (with `SIM_SEED`, to read one failing run).
fn trace() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SIM_TRACE").is_some())
}

fn run_seed(seed: u64, crowd: bool) {
    let mut sim = Sim::new(seed, crowd);
    let steps = if crowd {
        4_000
    } else {
        150 + sim.rng.below(250)
    };
    for _ in 0..steps {
        sim.random_step();
    }
    sim.settle_and_check();
    if trace() {
        let m = &sim.env.metrics;
        eprintln!(
            "seed {seed}: slow consumers cut {}",
            m.slow_consumers.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
}

/// Runs one seed; a failure names the seed and how to replay it.
fn run_reporting(seed: u64, crowd: bool, replay_var: &str) {
    if let Err(e) = std::panic::catch_unwind(|| run_seed(seed, crowd)) {
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!(
            "seed {seed} failed: {why}\nreplay: {replay_var}={seed} cargo test --test simulation"
        );
    }
}

#[test]
fn seeded_simulation_keeps_every_promise() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2000);
            (0..n).collect()
        }
    };
    let total = seeds.len();
    for seed in seeds {
        run_reporting(seed, false, "SIM_SEED");
    }
    eprintln!("simulation: {total} seeds passed");
}

/// The same promises with a crowd: 300 to 500 users with one or two devices each (450 to 1,000 clients) in 40
/// conversations of 2 to 8 members, 4,000 steps. `SIM_CROWDS=N` runs N crowds (default 5; their seeds start at
/// 1,000,000); `SIM_CROWD=S` replays one.
#[test]
fn seeded_simulation_of_a_crowd_keeps_every_promise() {
    let seeds: Vec<u64> = match std::env::var("SIM_CROWD") {
        Ok(s) => vec![s.parse().expect("SIM_CROWD is a number")],
        Err(_) => {
            let n: u64 = std::env::var("SIM_CROWDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(5);
            (1_000_000..1_000_000 + n).collect()
        }
    };
    for seed in seeds {
        run_reporting(seed, true, "SIM_CROWD");
    }
}
