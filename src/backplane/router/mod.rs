//! The router: channels (conversations, `user:` channels, topics), offsets, history, subscriptions, presence,
//! chat (sends, dedupe, receipts) and the answers for SSE streams and polls.
//!
//! A state machine without I/O: [`Router::handle`] takes an [`Event`] and the wall-clock time and appends
//! [`Out`]puts; durable work becomes store [`Request`]s ([`Router::take_requests`]) whose [`Completion`]s come
//! back through [`Router::on_completion`]. A chat message is answered `sent` and delivered only once its group
//! commit is durable; deliveries leave in commit order, so offsets arrive in order on every connection.
//!
//! Conversations and `user:` channels are durable (the store keeps every message; memory keeps a recent
//! window for replay and receipts). Topics live in memory with a bounded history (count and age).
//!
//! Who receives a channel's message: for `conversation:` channels every live connection of every member
//! (presence: WebSocket and SSE connections register on open), for `user:X` every live connection of X, and
//! for every channel the connections that follow it explicitly (topic subscribers, held long polls). The two
//! sets never overlap: a connection in presence never follows a conversation or user channel explicitly.

mod push;
pub use push::PushLink;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use indexmap::IndexSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;

use super::bus::{BusCmd, BusEvent, CONTROL_CHANNEL};
use super::sequencer::Sequencer;
use super::{ApiRequest, ConnRef, CursorVec, Delivery, Event, LoopCmd};
use crate::auth::valid_id;
use crate::proto::cursor::{self, Kind};
use crate::proto::msg::{self, ClientMsg};
use crate::proto::ws::{Opcode, encode_frame};
use crate::store::thread::{Completion, Request, Token};
use crate::store::{Appended, NewMessage, ReceiptState, Store, StoredMessage, Write, WriteResult};

pub const MAX_HISTORY_LIMIT: usize = 200;
pub const DEFAULT_HISTORY_LIMIT: usize = 50;
pub const MAX_CLIENT_ID_LEN: usize = 128;
/// Most messages one poll answer or one replay carries; the client continues from the returned cursor.
pub const MAX_REPLAY: usize = 1000;

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// History kept in memory per channel.
#[derive(Clone, Copy, Debug)]
pub struct HistoryLimits {
    /// Messages kept per topic or `user:` channel.
    pub topic_count: usize,
    /// Age after which topic messages are dropped (ms).
    pub topic_age_ms: u64,
    /// Bytes kept per topic or `user:` channel (JSON + WebSocket frame of each message).
    pub topic_bytes: usize,
    /// Messages kept per conversation in memory (the store keeps them all; the window serves receipts and
    /// offsets without a store read).
    pub conversation_count: usize,
    /// Bytes kept per conversation in memory.
    pub conversation_bytes: usize,
}

pub const DEFAULT_TOPIC_HISTORY_BYTES: usize = 4 << 20;
pub const DEFAULT_CONVERSATION_WINDOW_BYTES: usize = 64 << 10;

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            topic_count: 1000,
            topic_age_ms: 3_600_000,
            topic_bytes: DEFAULT_TOPIC_HISTORY_BYTES,
            conversation_count: 1_000,
            conversation_bytes: DEFAULT_CONVERSATION_WINDOW_BYTES,
        }
    }
}

/// What the backplane must do.
#[derive(Debug)]
pub enum Out {
    /// A channel message for these connections (any transport).
    Message {
        to: Vec<ConnRef>,
        delivery: Arc<Delivery>,
    },
    /// A direct WebSocket frame (reply, error, history page) for these connections.
    Frame { to: Vec<ConnRef>, frame: Bytes },
    /// A command for one connection's loop (HTTP answers, stream start, poll hold).
    Loop { conn: ConnRef, cmd: LoopCmd },
}

struct Entry {
    ts: u64,
    from: Option<Arc<str>>,
    delivery: Arc<Delivery>,
}

/// A channel's recent messages, oldest first, and its last offset (the first message gets 1).
#[derive(Default)]
struct Log {
    last_offset: u64,
    entries: VecDeque<Entry>,
    /// Bytes the entries hold (each message's JSON and its WebSocket frame).
    bytes: usize,
}

fn entry_bytes(e: &Entry) -> usize {
    e.delivery.json.len() + e.delivery.ws.len()
}

impl Log {
    /// Appends, then drops the oldest entries past `max` messages or `max_bytes`.
    fn push(&mut self, e: Entry, max: usize, max_bytes: usize) {
        self.bytes += entry_bytes(&e);
        self.entries.push_back(e);
        while self.entries.len() > max || self.bytes > max_bytes {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= entry_bytes(&e);
        }
    }

    fn expire(&mut self, now_ms: u64, max_age_ms: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| now_ms.saturating_sub(e.ts) > max_age_ms)
        {
            self.pop();
        }
    }

    /// The offset a cursor must have seen for a replay to have no gap.
    fn oldest_replayable_cursor(&self) -> u64 {
        self.entries
            .front()
            .map_or(self.last_offset, |e| e.delivery.offset - 1)
    }

    fn after(&self, offset: u64) -> impl Iterator<Item = &Entry> {
        let skip = self
            .entries
            .partition_point(|e| e.delivery.offset <= offset);
        self.entries.iter().skip(skip)
    }
}

struct Conversation {
    members: BTreeSet<Arc<str>>,
    /// The recent window (the store has everything).
    log: Log,
    /// Members added while this node was running → the conversation's last offset (as this node knew it)
    /// when they were added. A poll that meets the conversation for the first time mid-session starts there
    /// (unknown, e.g. after a restart: from the start).
    joined: HashMap<Arc<str>, u64>,
}

/// Where an answer goes: a WebSocket frame, or the HTTP response of a one-way client.
#[derive(Clone, Copy, Debug)]
enum ReplyTo {
    Ws(ConnRef),
    Http(ConnRef),
}

/// Work waiting for the store.
enum Pending {
    Send {
        reply: ReplyTo,
        channel: Arc<str>,
        from: Arc<str>,
        client_id: String,
        ts: u64,
        body: Box<RawValue>,
    },
    Receipt {
        reply: ReplyTo,
        conversation: String,
        user: Arc<str>,
        offset: u64,
        state: ReceiptState,
    },
    /// Receipt notices appended to senders' `user:` channels.
    Notices { items: Vec<(Arc<str>, String, u64)> },
    /// `POST /api/publish` to a durable channel (`user:` always; topics in cluster mode, for global
    /// offsets): answered with the offset the store assigned. `payload` is what was stored.
    Publish {
        conn: ConnRef,
        channel: Arc<str>,
        payload: String,
        ts: u64,
    },
    Answer {
        conn: ConnRef,
        status: u16,
        body: String,
    },
    History {
        reply: ReplyTo,
        conversation: String,
        /// What the client asked for (the read asks one more, to know whether there is more).
        limit: usize,
    },
    /// A page of a connection's offline flush (`user`'s queue).
    Flush { conn: ConnRef, user: String },
    /// Cluster: a gap fill or catch-up read of a channel.
    Fill { channel: Arc<str> },
    /// Cluster: where a newly followed channel ends.
    Sync { channel: Arc<str> },
    /// Cluster: every conversation's members, reread after the bus (re)connects.
    Members,
    /// A `subscribe` with a cursor: what the connection missed on a durable channel, from the store. `from`:
    /// where each channel read starts, so that a jump (offsets the store no longer has) becomes a `reset`.
    Replay {
        conn: ConnRef,
        from: Vec<(String, u64)>,
    },
    /// Cluster: a poll whose replay is read from the store (any node has the whole log).
    Poll {
        conn: ConnRef,
        cursor: CursorVec,
        hold_ms: u64,
        /// Found in memory already (topics of a single node).
        items: Vec<Arc<Delivery>>,
    },
    /// A write whose success is answered with `json` (device registration).
    Done { reply: ReplyTo, json: String },
    /// Claiming due push obligations.
    PushClaim,
    /// Writing back push outcomes (nothing to answer; a failed write leaves the row to be retried after
    /// its lease).
    PushWrite,
    /// The senders of a receipt's range, read from the store.
    Senders {
        conversation: String,
        user: Arc<str>,
        offset: u64,
        steps: Vec<(&'static str, u64)>,
        now_ms: u64,
    },
    /// A poll's first part: the user's offline queue, for the durable channels it had no position on.
    PollFlush {
        conn: ConnRef,
        user: Arc<str>,
        channels: Vec<String>,
        given: BTreeMap<String, u64>,
        fresh: BTreeSet<String>,
        hold_ms: u64,
        first: bool,
    },
    /// Sent after a subscribe's replays (queued last, so it completes after them).
    SubscribeAck { conn: ConnRef, json: String },
}

/// Why a request was refused: an error code, a message, and the HTTP status for one-way transports.
struct Refusal {
    code: &'static str,
    message: String,
    status: u16,
}

fn refuse(code: &'static str, status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
        status,
    }
}

/// Per-connection bounds on what a client can make the router hold.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Channels in one `subscribe` (after duplicates are dropped), or listed on one SSE stream or poll.
    pub max_channels_per_request: usize,
    /// Topics one connection follows at once.
    pub max_follows: usize,
    /// Live WebSocket and SSE connections of one user on this node.
    pub max_connections_per_user: usize,
    /// HTTP requests (`POST /send`, polls, new streams) per second of one user on this node, on average…
    pub user_rate: u32,
    /// …and at once; past it: 429.
    pub user_burst: u32,
}

pub const DEFAULT_MAX_CHANNELS_PER_REQUEST: usize = 100;
pub const DEFAULT_MAX_FOLLOWS: usize = 1000;
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 64;

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_channels_per_request: DEFAULT_MAX_CHANNELS_PER_REQUEST,
            max_follows: DEFAULT_MAX_FOLLOWS,
            max_connections_per_user: DEFAULT_MAX_CONNECTIONS_PER_USER,
            user_rate: crate::config::DEFAULT_CLIENT_RATE,
            user_burst: crate::config::DEFAULT_CLIENT_BURST,
        }
    }
}

pub struct Router {
    max_body_bytes: usize,
    history: HistoryLimits,
    conversations: HashMap<String, Conversation>,
    /// user → conversations it belongs to (for the SSE cursor).
    memberships: HashMap<Arc<str>, BTreeSet<String>>,
    /// Topics and `user:` channels.
    channels: HashMap<Arc<str>, Log>,
    presence: HashMap<Arc<str>, Vec<ConnRef>>,
    /// channel → connections following it explicitly (insertion order; O(1) removal).
    followers: HashMap<Arc<str>, IndexSet<ConnRef>>,
    /// connection → channels it follows explicitly (to clean up), at most `bounds.max_follows` each.
    following: HashMap<ConnRef, HashSet<Arc<str>>>,
    bounds: Bounds,
    /// Per-user buckets for HTTP requests, and the map's size after its last sweep.
    user_buckets: HashMap<Arc<str>, crate::conn::Bucket>,
    user_buckets_swept: usize,
    /// The byte budget of one store read reply: a reply that reached it (or `MAX_REPLAY`) may have more.
    read_bytes: usize,
    /// `subscribe`s refused by a bound (for the metric).
    pub refused_subscriptions: u64,
    /// Store requests to send, and what each one's completion continues.
    requests: Vec<Request>,
    pending: HashMap<Token, Pending>,
    next_token: Token,
    /// Most store requests in flight; past it sends are refused with a retryable `store_busy`.
    max_pending: usize,
    /// Connections whose offline queue is being flushed: live deliveries wait here until it is done.
    flushing: HashMap<ConnRef, Hold>,
    /// Cluster mode (Redis): bus, sequencer, subscriptions, presence.
    cluster: Option<Cluster>,
    /// Mobile push (APNs/FCM) when configured.
    push: Option<PushLink>,
}

/// A connection whose catch-up reads (offline queue, resume from a cursor) are running: live deliveries wait
/// in `held` until the last read is out, and anything a read already delivered is not delivered again.
#[derive(Default)]
struct Hold {
    reads: usize,
    held: Vec<Arc<Delivery>>,
    /// Bytes of JSON in `held`.
    held_bytes: usize,
    sent: std::collections::HashSet<(Arc<str>, u64)>,
}

/// Live messages held for one connection while its catch-up reads run; past either bound the connection is
/// closed with 1013 (it resumes from its cursor) rather than holding more.
pub const MAX_HELD: usize = 10_000;
pub const MAX_HELD_BYTES: usize = 16 << 20;

/// This node's part of a cluster.
struct Cluster {
    node: String,
    seq: Sequencer,
    /// channel → local reasons to receive it (a connected user for its conversations and `user:` channel, a
    /// follower for any channel). Subscribed on the bus while > 0.
    interest: HashMap<Arc<str>, usize>,
    bus: Vec<BusCmd>,
    presence_ttl_ms: u64,
    last_presence_ms: u64,
    /// The bus is connected (for `/readyz`).
    up: bool,
}

/// How long an out-of-order message waits for the gap before the store fills it.
pub const GAP_WAIT_MS: u64 = 50;

/// How many offline messages one reconnect flushes (the rest on the next one, after acks).
pub const MAX_FLUSH: usize = 10_000;
/// Default cap on store requests in flight.
pub const DEFAULT_MAX_PENDING: usize = 10_000;

impl Router {
    pub fn new(max_body_bytes: usize, history: HistoryLimits) -> Self {
        Router {
            max_body_bytes,
            history,
            conversations: HashMap::new(),
            memberships: HashMap::new(),
            channels: HashMap::new(),
            presence: HashMap::new(),
            followers: HashMap::new(),
            bounds: Bounds::default(),
            user_buckets: HashMap::new(),
            user_buckets_swept: 0,
            read_bytes: usize::MAX,
            refused_subscriptions: 0,
            following: HashMap::new(),
            requests: Vec::new(),
            pending: HashMap::new(),
            next_token: 1,
            max_pending: DEFAULT_MAX_PENDING,
            flushing: HashMap::new(),
            cluster: None,
            push: None,
        }
    }

    /// Turns on cluster mode: this node's id and how long its presence entries live without a refresh.
    pub fn enable_cluster(&mut self, node: &str, presence_ttl_ms: u64) {
        self.cluster = Some(Cluster {
            node: node.to_string(),
            seq: Sequencer::default(),
            interest: HashMap::new(),
            bus: Vec::new(),
            presence_ttl_ms,
            last_presence_ms: 0,
            up: false,
        });
    }

    /// Bus commands produced since the last call.
    pub fn take_bus_cmds(&mut self) -> Vec<BusCmd> {
        self.cluster
            .as_mut()
            .map(|c| std::mem::take(&mut c.bus))
            .unwrap_or_default()
    }

    /// Channels this node receives from the bus and has synced (0 on a single node).
    pub fn bus_channels(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.seq.synced())
    }

    /// `subscribe`s (or stream/poll channel lists) refused by a bound.
    pub fn refused_subscriptions(&self) -> u64 {
        self.refused_subscriptions
    }

    /// Gaps skipped with a `reset` because the store could not fill them (cluster mode).
    pub fn sequencer_resets(&self) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.seq.skipped)
    }

    pub fn bus_up(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.up)
    }

    fn interest(&mut self, channel: &str, delta: isize) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let key: Arc<str> = Arc::from(channel);
        let n = cl.interest.entry(key.clone()).or_default();
        let before = *n;
        *n = (*n as isize + delta).max(0) as usize;
        match (before, *n) {
            (0, 1..) => {
                cl.seq.track(key.clone());
                cl.bus.push(BusCmd::Subscribe(key.to_string()));
                // Where the channel ends now, read after the local interest began: everything after it is
                // new to the local followers, and arrives by pub/sub once subscribed or by the fill that the
                // subscription's confirmation triggers.
                let ch = key.to_string();
                self.request(
                    |token| Request::LastOffset { token, channel: ch },
                    Pending::Sync { channel: key },
                );
            }
            (1.., 0) => {
                cl.interest.remove(&key);
                cl.seq.untrack(&key);
                cl.bus.push(BusCmd::Unsubscribe(key.to_string()));
            }
            _ => {}
        }
    }

    /// A user's first connection on this node opened (`up`) or its last one closed.
    fn user_presence(&mut self, user: &Arc<str>, up: bool, now_ms: u64) {
        if self.cluster.is_none() {
            return;
        }
        let delta = if up { 1 } else { -1 };
        let mut chans = vec![format!("user:{user}")];
        chans.extend(
            self.memberships
                .get(user)
                .into_iter()
                .flatten()
                .map(|c| format!("conversation:{c}")),
        );
        for ch in chans {
            self.interest(&ch, delta);
        }
        if let Some(cl) = self.cluster.as_mut() {
            let until_ms = if up { now_ms + cl.presence_ttl_ms } else { 0 };
            cl.bus.push(BusCmd::Presence {
                users: vec![user.to_string()],
                until_ms,
            });
        }
    }

    /// Periodic work: presence refresh, and asking the store for gaps the bus left.
    pub fn tick(&mut self, now_ms: u64) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if now_ms.saturating_sub(cl.last_presence_ms) >= cl.presence_ttl_ms / 3 {
            cl.last_presence_ms = now_ms;
            let users: Vec<String> = self.presence.keys().map(|u| u.to_string()).collect();
            if !users.is_empty() {
                cl.bus.push(BusCmd::Presence {
                    users,
                    until_ms: now_ms + cl.presence_ttl_ms,
                });
            }
        }
        let gaps = cl.seq.gaps(now_ms, GAP_WAIT_MS);
        for (channel, after) in gaps {
            self.fill(channel, after);
        }
    }

    /// Reads a channel from the store after `after` to fill a gap (or catch up after a reconnect).
    fn fill(&mut self, channel: Arc<str>, after: u64) {
        let ch = channel.to_string();
        self.request(
            |token| Request::ReadAfter {
                token,
                channel: ch,
                after,
                limit: MAX_REPLAY,
            },
            Pending::Fill { channel },
        );
    }

    /// A bus event (cluster mode).
    pub fn on_bus(&mut self, ev: BusEvent, now_ms: u64, out: &mut Vec<Out>) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        match ev {
            BusEvent::Up => {
                cl.up = true;
                // Control messages published while we were not subscribed are lost: reread the members.
                self.request(|token| Request::Conversations { token }, Pending::Members);
            }
            BusEvent::Down => cl.up = false,
            BusEvent::Subscribed(channel) => {
                if !cl.seq.is_tracked(&channel) {
                    return;
                }
                // The subscription is active: read what was committed between the sync point (or the last
                // released message, after a reconnect) and now. If the sync has not answered yet, it was read
                // after this point and nothing is missing.
                if let Some(upto) = cl.seq.released_upto(&channel) {
                    self.fill(Arc::from(channel.as_str()), upto);
                }
            }
            BusEvent::Message { channel, payload } if channel == CONTROL_CHANNEL => {
                #[derive(serde::Deserialize)]
                struct Control {
                    n: String,
                    id: String,
                    members: Vec<String>,
                }
                let Ok(c) = serde_json::from_str::<Control>(&payload) else {
                    return;
                };
                if c.n != cl.node {
                    self.set_members(
                        &c.id,
                        c.members.iter().map(|m| Arc::from(m.as_str())).collect(),
                    );
                }
            }
            BusEvent::Message { channel, payload } => {
                #[derive(serde::Deserialize)]
                struct Wire {
                    n: String,
                    o: u64,
                    j: String,
                }
                let Ok(w) = serde_json::from_str::<Wire>(&payload) else {
                    tracing::warn!(%channel, "bus: unreadable message");
                    return;
                };
                if w.n == cl.node {
                    return; // our own publication: already routed
                }
                let d = Delivery::new(Arc::from(channel.as_str()), w.o, w.j);
                let mut released = Vec::new();
                cl.seq.push(d, now_ms, &mut released);
                for d in released {
                    self.route_local_parsed(d, out);
                }
            }
        }
    }

    /// Sets a conversation's members (locally created, loaded, or announced by another node), keeping the
    /// memberships index and the bus interest of locally connected members in step.
    fn set_members(&mut self, id: &str, members: BTreeSet<Arc<str>>) {
        let old = match self.conversations.get_mut(id) {
            Some(c) => std::mem::replace(&mut c.members, members.clone()),
            None => {
                self.conversations.insert(
                    id.to_string(),
                    Conversation {
                        members: members.clone(),
                        log: Log::default(),
                        joined: HashMap::new(),
                    },
                );
                BTreeSet::new()
            }
        };
        let channel = format!("conversation:{id}");
        for m in old.difference(&members) {
            if let Some(set) = self.memberships.get_mut(m) {
                set.remove(id);
            }
            if self.presence.contains_key(m) {
                self.interest(&channel, -1);
            }
        }
        if let Some(c) = self.conversations.get_mut(id) {
            let at = c.log.last_offset;
            for m in members.difference(&old) {
                c.joined.insert(m.clone(), at);
            }
            for m in old.difference(&members) {
                c.joined.remove(m);
            }
        }
        for m in members.difference(&old) {
            self.memberships
                .entry(m.clone())
                .or_default()
                .insert(id.to_string());
            if self.presence.contains_key(m) {
                self.interest(&channel, 1);
            }
        }
    }

    pub fn set_bounds(&mut self, b: Bounds) {
        self.bounds = b;
    }

    /// The byte budget of one store read reply (the store thread cuts replies there).
    pub fn set_read_bytes(&mut self, n: usize) {
        self.read_bytes = n.max(1);
    }

    pub fn set_max_pending(&mut self, n: usize) {
        self.max_pending = n.max(1);
    }

    /// Loads conversations, members and each conversation's recent window from the store (at start, before
    /// the store thread takes it).
    pub fn load(&mut self, store: &mut dyn Store) -> crate::store::Result<()> {
        let (window, window_bytes) = (
            self.history.conversation_count,
            self.history.conversation_bytes,
        );
        for (id, members) in store.conversations()? {
            let channel: Arc<str> = Arc::from(format!("conversation:{id}"));
            let mut log = Log {
                last_offset: store.last_offset(&channel)?,
                ..Log::default()
            };
            // The newest messages that fit the window, read in small pages (large messages never pile up).
            let mut before = None;
            let mut newest_first = Vec::new();
            let mut bytes = 0;
            while newest_first.len() < window && bytes < window_bytes {
                let page = store.history(&channel, before, 16)?;
                let n = page.len();
                for m in page {
                    bytes += 2 * m.json.len();
                    before = Some(m.offset);
                    newest_first.push(m);
                }
                if n < 16 {
                    break;
                }
            }
            for m in newest_first.into_iter().rev() {
                log.push(entry_of(&channel, m), window, window_bytes);
            }
            let members: BTreeSet<Arc<str>> =
                members.iter().map(|m| Arc::from(m.as_str())).collect();
            for m in &members {
                self.memberships
                    .entry(m.clone())
                    .or_default()
                    .insert(id.clone());
            }
            self.conversations.insert(
                id,
                Conversation {
                    members,
                    log,
                    joined: HashMap::new(),
                },
            );
        }
        Ok(())
    }

    /// Store requests produced since the last call.
    pub fn take_requests(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.requests)
    }

    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Whether the store has `max_pending` requests in flight: client reads (history, replays, flushes, polls)
    /// are refused with a retryable `store_busy` like sends, so no client can flood the store thread.
    fn store_busy(&self) -> bool {
        self.pending.len() >= self.max_pending
    }

    fn request(&mut self, make: impl FnOnce(Token) -> Request, then: Pending) {
        let token = self.next_token;
        self.next_token += 1;
        self.requests.push(make(token));
        self.pending.insert(token, then);
    }

    fn commit(&mut self, batch: Vec<Write>, then: Pending) {
        self.request(|token| Request::Commit { token, batch }, then);
    }

    /// Routes a channel message to `to`, holding it for connections whose offline flush is running.
    fn route(&mut self, mut to: Vec<ConnRef>, delivery: Arc<Delivery>, out: &mut Vec<Out>) {
        if !self.flushing.is_empty() {
            let mut overflow = Vec::new();
            to.retain(|c| match self.flushing.get_mut(c) {
                Some(hold) => {
                    hold.held.push(delivery.clone());
                    hold.held_bytes += delivery.json.len();
                    if hold.held.len() > MAX_HELD || hold.held_bytes > MAX_HELD_BYTES {
                        overflow.push(*c);
                    }
                    false
                }
                None => true,
            });
            for c in overflow {
                // Its catch-up is too far behind the live traffic: let it come back with its cursor.
                self.flushing.remove(&c);
                out.push(Out::Loop {
                    conn: c,
                    cmd: LoopCmd::Close {
                        index: c.index,
                        generation: c.generation,
                        code: 1013,
                        reason: "too far behind; resume from your cursor",
                    },
                });
            }
        }
        if !to.is_empty() {
            out.push(Out::Message { to, delivery });
        }
    }

    /// Whether a read reply may have been cut (by count or bytes), so the next page must be read.
    fn cut(&self, msgs: &[StoredMessage], limit: usize) -> bool {
        !msgs.is_empty()
            && (msgs.len() >= limit
                || msgs.iter().map(|m| m.json.len()).sum::<usize>() >= self.read_bytes)
    }

    /// After a catch-up page for `conn`: if it was cut (by `limit` or bytes) and the catch-up still runs, count
    /// one more read and return where the next page starts.
    fn next_page(
        &mut self,
        conn: ConnRef,
        msgs: &[StoredMessage],
        limit: usize,
    ) -> Option<(String, u64)> {
        let last = msgs.last()?;
        if !self.cut(msgs, limit) {
            return None;
        }
        self.flushing.get_mut(&conn)?.reads += 1;
        Some((last.channel.clone(), last.offset))
    }

    /// Reads one page of `channel` after `after` for `conn`'s catch-up; completed by `Pending::Replay`.
    fn replay_page(&mut self, conn: ConnRef, channel: String, after: u64) {
        let from = vec![(channel.clone(), after)];
        self.request(
            |token| Request::ReadAfter {
                token,
                channel,
                after,
                limit: MAX_REPLAY,
            },
            Pending::Replay { conn, from },
        );
    }

    fn add_presence(&mut self, conn: ConnRef, user: &Arc<str>, now_ms: u64) {
        let conns = self.presence.entry(user.clone()).or_default();
        conns.push(conn);
        if conns.len() == 1 {
            self.user_presence(user, true, now_ms);
        }
    }

    /// Connections of a user on this node.
    pub fn connections(&self, user: &str) -> &[ConnRef] {
        self.presence.get(user).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Charges one HTTP request (`POST /send`, a poll, a new stream) to its user's bucket; false (answered 429)
    /// when the user is past `bounds.user_rate`. WebSocket requests are paced on their loop instead.
    fn user_request(
        &mut self,
        conn: ConnRef,
        user: &Arc<str>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) -> bool {
        let (rate, burst) = (self.bounds.user_rate, self.bounds.user_burst);
        if self.user_buckets.len() > 2 * self.user_buckets_swept.max(1024) {
            // Forget users whose bucket is full again (idle): the map holds only recent HTTP users.
            self.user_buckets
                .retain(|_, b| !b.full_at(now_ms, rate, burst));
            self.user_buckets_swept = self.user_buckets.len();
        }
        let b = self
            .user_buckets
            .entry(user.clone())
            .or_insert_with(|| crate::conn::Bucket::full(burst, now_ms));
        if b.take(now_ms, rate, burst) {
            return true;
        }
        self.refused_subscriptions += 1;
        let wait = b.wait_ms(rate);
        let e = serde_json::json!({"type": "error", "code": "rate_limited",
            "message": "too many requests for this user; retry later", "retry_after_ms": wait})
        .to_string();
        http(out, conn, 429, e);
        false
    }

    pub fn handle(&mut self, ev: Event, now_ms: u64, out: &mut Vec<Out>) {
        match ev {
            Event::Send { conn, ref user, .. }
            | Event::Stream { conn, ref user, .. }
            | Event::Poll { conn, ref user, .. }
                if !self.user_request(conn, &user.clone(), now_ms, out) => {}
            Event::Opened { conn, user } => {
                if self.connections(&user).len() >= self.bounds.max_connections_per_user {
                    self.refused_subscriptions += 1;
                    out.push(Out::Loop {
                        conn,
                        cmd: LoopCmd::Close {
                            index: conn.index,
                            generation: conn.generation,
                            code: 1008,
                            reason: "too many connections for this user",
                        },
                    });
                    return;
                }
                if self.store_busy() {
                    // The offline flush cannot be read now: the client retries (1013) rather than missing it.
                    out.push(Out::Loop {
                        conn,
                        cmd: LoopCmd::Close {
                            index: conn.index,
                            generation: conn.generation,
                            code: 1013,
                            reason: "store busy; reconnect and resume",
                        },
                    });
                    return;
                }
                self.add_presence(conn, &user, now_ms);
                self.start_flush(conn, &user);
            }
            Event::Closed { conn, user } => {
                if let Some(user) = user
                    && let Some(conns) = self.presence.get_mut(&user)
                {
                    conns.retain(|c| *c != conn);
                    if conns.is_empty() {
                        self.presence.remove(&user);
                        self.user_presence(&user, false, now_ms);
                    }
                }
                self.flushing.remove(&conn);
                self.unfollow_all(conn);
            }
            Event::Unfollow { conn } => self.unfollow_all(conn),
            Event::Received { conn, user, msg } => self.on_ws(conn, user, msg, now_ms, out),
            Event::Send {
                conn,
                user,
                msg,
                stream: Some(stream),
                expires,
            } => self.stream_op(conn, &user, msg, stream, expires, out),
            Event::Send {
                conn, user, msg, ..
            } => match msg {
                ClientMsg::Send {
                    conversation,
                    client_id,
                    body,
                } => {
                    self.send(
                        ReplyTo::Http(conn),
                        &user,
                        &conversation,
                        &client_id,
                        body,
                        now_ms,
                        out,
                    );
                }
                ClientMsg::Ack {
                    conversation,
                    offset,
                } => {
                    let to = ReplyTo::Http(conn);
                    let r = self.receipt(to, &user, &conversation, offset, ReceiptState::Delivered);
                    if let Err(r) = r {
                        http(out, conn, r.status, msg::error(r.code, &r.message, None));
                    }
                }
                ClientMsg::Read {
                    conversation,
                    offset,
                } => {
                    let to = ReplyTo::Http(conn);
                    if let Err(r) =
                        self.receipt(to, &user, &conversation, offset, ReceiptState::Read)
                    {
                        http(out, conn, r.status, msg::error(r.code, &r.message, None));
                    }
                }
                ClientMsg::History {
                    conversation,
                    before,
                    limit,
                } => self.client_history(
                    ReplyTo::Http(conn),
                    &user,
                    conversation,
                    before,
                    limit,
                    out,
                ),
                ClientMsg::RegisterDevice { platform, token } => {
                    self.device(ReplyTo::Http(conn), &user, true, platform, token, out)
                }
                ClientMsg::UnregisterDevice { platform, token } => {
                    self.device(ReplyTo::Http(conn), &user, false, platform, token, out)
                }
                _ => http(
                    out,
                    conn,
                    400,
                    msg::error(
                        "bad_request",
                        "POST /send takes send, ack, read, history, register_device or unregister_device (subscribe, unsubscribe and refresh name a stream)",
                        None,
                    ),
                ),
            },
            Event::Stream {
                conn,
                user,
                channels,
                cursor,
            } => self.on_stream(conn, user, channels, cursor, now_ms, out),
            Event::Poll {
                conn,
                user,
                channels,
                cursor,
                hold_ms,
            } => self.on_poll(conn, user, channels, cursor, hold_ms, now_ms, out),
            Event::Api { conn, req } => self.on_api(conn, req, now_ms, out),
        }
    }

    /// A `POST /send` operation on one of the user's SSE streams (named by the id of its first event):
    /// `subscribe` / `unsubscribe` topics on it, or `refresh` its token.
    fn stream_op(
        &mut self,
        conn: ConnRef,
        user: &Arc<str>,
        m: ClientMsg,
        stream: ConnRef,
        expires: Option<u64>,
        out: &mut Vec<Out>,
    ) {
        if !self.connections(user).contains(&stream) {
            let e = msg::error(
                "no_stream",
                "no such stream of this user on this node",
                None,
            );
            return http(out, conn, 404, e);
        }
        match m {
            ClientMsg::Subscribe { channels, .. } => {
                let channels = match self.bounded_channels(channels) {
                    Ok(c) => c,
                    Err(r) => {
                        return http(out, conn, r.status, msg::error(r.code, &r.message, None));
                    }
                };
                let mut now_at = serde_json::Map::new();
                for ch in channels {
                    match self.check_access(user, &ch) {
                        Err(r) => {
                            return http(out, conn, r.status, msg::error(r.code, &r.message, None));
                        }
                        Ok(Kind::Topic) => {
                            if !self.follow(stream, Arc::from(ch.as_str())) {
                                self.refused_subscriptions += 1;
                                let e = msg::error(
                                    "too_many_channels",
                                    "this stream follows too many channels",
                                    None,
                                );
                                return http(out, conn, 400, e);
                            }
                        }
                        // Conversations and the user's channel arrive on the stream anyway.
                        Ok(_) => {}
                    }
                    let at = self.last_offset(&ch);
                    now_at.insert(ch, at.into());
                }
                let ok = serde_json::json!({"type": "subscribed", "cursor": now_at}).to_string();
                http(out, conn, 200, ok);
            }
            ClientMsg::Unsubscribe { channels } => {
                for ch in channels {
                    self.unfollow(stream, &ch);
                }
                http(out, conn, 200, r#"{"type":"ok"}"#.to_string());
            }
            ClientMsg::Refresh { .. } => {
                let exp = expires.unwrap_or(0);
                out.push(Out::Loop {
                    conn: stream,
                    cmd: LoopCmd::Refresh {
                        index: stream.index,
                        generation: stream.generation,
                        exp,
                    },
                });
                let ok = serde_json::json!({"type": "refreshed", "expires": exp}).to_string();
                http(out, conn, 200, ok);
            }
            _ => http(
                out,
                conn,
                400,
                msg::error(
                    "bad_request",
                    "a stream takes subscribe, unsubscribe or refresh",
                    None,
                ),
            ),
        }
    }

    // ---- access and history -------------------------------------------------------------------------

    /// May `user` read `channel`?
    fn check_access(&self, user: &str, channel: &str) -> Result<Kind, Refusal> {
        let kind = cursor::kind(channel).map_err(|e| refuse("bad_channel", 400, e.0))?;
        match kind {
            Kind::Conversation => {
                let id = &channel["conversation:".len()..];
                if !self
                    .conversations
                    .get(id)
                    .is_some_and(|c| c.members.contains(user))
                {
                    return Err(refuse("not_member", 403, format!("not a member of {id}")));
                }
            }
            Kind::User if &channel["user:".len()..] != user => {
                return Err(refuse(
                    "forbidden",
                    403,
                    format!("{channel} belongs to another user"),
                ));
            }
            _ => {}
        }
        Ok(kind)
    }

    fn log(&self, channel: &str) -> Option<&Log> {
        match channel.strip_prefix("conversation:") {
            Some(id) => self.conversations.get(id).map(|c| &c.log),
            None => self.channels.get(channel),
        }
    }

    fn last_offset(&self, channel: &str) -> u64 {
        self.log(channel).map_or(0, |l| l.last_offset)
    }

    /// What a client that has seen `after` on `channel` missed: a `reset` when history no longer reaches back
    /// that far, then the messages, at most `budget` of them and until `bytes` of JSON are spent (a poll answer
    /// copies them; the first message always goes). Returns the offset the client is at afterwards.
    fn replay(
        &self,
        channel: &str,
        after: u64,
        budget: &mut usize,
        bytes: &mut usize,
        items: &mut Vec<Arc<Delivery>>,
    ) -> u64 {
        let Some(log) = self.log(channel) else {
            return after;
        };
        let mut at = after.min(log.last_offset);
        let oldest = log.oldest_replayable_cursor();
        if at < oldest {
            // The gap cannot be filled: say so explicitly, then continue from what is kept.
            let json = serde_json::json!({"type": "reset", "channel": channel, "offset": oldest})
                .to_string();
            items.push(Delivery::new(channel.into(), oldest, json));
            at = oldest;
        }
        for e in log.after(at) {
            if *budget == 0 || *bytes == 0 {
                break;
            }
            *budget -= 1;
            *bytes = bytes.saturating_sub(e.delivery.json.len());
            at = e.delivery.offset;
            items.push(e.delivery.clone());
        }
        at
    }

    /// Follows a topic; false when the connection already follows `bounds.max_follows` others.
    fn follow(&mut self, conn: ConnRef, channel: Arc<str>) -> bool {
        let set = self.following.entry(conn).or_default();
        if set.contains(&channel) {
            return true;
        }
        if set.len() >= self.bounds.max_follows {
            return false;
        }
        set.insert(channel.clone());
        self.followers
            .entry(channel.clone())
            .or_default()
            .insert(conn);
        self.interest(&channel, 1);
        true
    }

    fn unfollow(&mut self, conn: ConnRef, channel: &str) {
        if let Some(set) = self.following.get_mut(&conn)
            && set.remove(channel)
        {
            self.interest(channel, -1);
        }
        if let Some(f) = self.followers.get_mut(channel) {
            f.swap_remove(&conn);
            if f.is_empty() {
                self.followers.remove(channel);
            }
        }
    }

    fn followers_of(&self, channel: &str) -> Vec<ConnRef> {
        self.followers
            .get(channel)
            .map(|f| f.iter().copied().collect())
            .unwrap_or_default()
    }

    fn unfollow_all(&mut self, conn: ConnRef) {
        for ch in self.following.remove(&conn).unwrap_or_default() {
            self.interest(&ch, -1);
            if let Some(f) = self.followers.get_mut(&ch) {
                f.swap_remove(&conn);
                if f.is_empty() {
                    self.followers.remove(&ch);
                }
            }
        }
    }

    /// Appends a message to a topic (memory only, bounded history) and routes it.
    fn publish(
        &mut self,
        channel: &str,
        json_of: impl FnOnce(u64) -> String,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) -> u64 {
        let key: Arc<str> = Arc::from(channel);
        let limits = self.history;
        let log = self.channels.entry(key.clone()).or_default();
        log.expire(now_ms, limits.topic_age_ms);
        log.last_offset += 1;
        let offset = log.last_offset;
        let delivery = Delivery::new(key.clone(), offset, json_of(offset));
        log.push(
            Entry {
                ts: now_ms,
                from: None,
                delivery: delivery.clone(),
            },
            limits.topic_count,
            limits.topic_bytes,
        );
        let to = self.followers_of(&key);
        self.route(to, delivery, out);
        offset
    }

    // ---- WebSocket requests ---------------------------------------------------------------------------

    fn on_ws(
        &mut self,
        conn: ConnRef,
        user: Arc<str>,
        m: ClientMsg,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        match m {
            ClientMsg::Send {
                conversation,
                client_id,
                body,
            } => {
                self.send(
                    ReplyTo::Ws(conn),
                    &user,
                    &conversation,
                    &client_id,
                    body,
                    now_ms,
                    out,
                );
            }
            ClientMsg::Ack {
                conversation,
                offset,
            } => {
                if let Err(r) = self.receipt(
                    ReplyTo::Ws(conn),
                    &user,
                    &conversation,
                    offset,
                    ReceiptState::Delivered,
                ) {
                    reply(out, conn, &msg::error(r.code, &r.message, None));
                }
            }
            ClientMsg::Read {
                conversation,
                offset,
            } => {
                if let Err(r) = self.receipt(
                    ReplyTo::Ws(conn),
                    &user,
                    &conversation,
                    offset,
                    ReceiptState::Read,
                ) {
                    reply(out, conn, &msg::error(r.code, &r.message, None));
                }
            }
            ClientMsg::Subscribe { channels, cursor } => {
                let channels = match self.bounded_channels(channels) {
                    Ok(c) => c,
                    Err(r) => return reply(out, conn, &msg::error(r.code, &r.message, None)),
                };
                if !cursor.is_empty() && self.store_busy() {
                    return reply(out, conn, &busy_error());
                }
                let mut items = Vec::new();
                let mut now_at = serde_json::Map::new();
                let mut reads = Vec::new();
                for ch in channels {
                    let kind = match self.check_access(&user, &ch) {
                        Ok(k) => k,
                        Err(r) => {
                            reply(out, conn, &msg::error(r.code, &r.message, None));
                            continue;
                        }
                    };
                    // Conversations and the own `user:` channel arrive on every connection anyway; a cursor
                    // asks for what was missed, read from the store (any node has all of it). Topics are
                    // followed from now, or from the cursor out of the recent history.
                    let at = match (cursor.get(&ch), kind) {
                        // A topic of a single node replays from memory; in a cluster from the shared log.
                        (Some(&after), Kind::Topic) if !self.replays_from_store(&ch) => {
                            let (mut budget, mut unbounded) = (MAX_REPLAY, usize::MAX);
                            self.replay(&ch, after, &mut budget, &mut unbounded, &mut items)
                        }
                        (Some(&after), _) => {
                            reads.push((ch.clone(), after));
                            self.last_offset(&ch).max(after)
                        }
                        (None, _) => self.last_offset(&ch),
                    };
                    if kind == Kind::Topic && !self.follow(conn, Arc::from(ch.as_str())) {
                        self.refused_subscriptions += 1;
                        let m = format!(
                            "{ch}: this connection already follows {} channels",
                            self.bounds.max_follows
                        );
                        reply(out, conn, &msg::error("too_many_channels", &m, None));
                        continue;
                    }
                    now_at.insert(ch, at.into());
                }
                for d in items {
                    out.push(Out::Message {
                        to: vec![conn],
                        delivery: d,
                    });
                }
                // After the replay: the client is live from here, and knows where each channel stands.
                let ack = serde_json::json!({"type": "subscribed", "cursor": now_at}).to_string();
                if reads.is_empty() {
                    reply(out, conn, &ack);
                } else {
                    // Live traffic for this connection waits until the reads are out (no gap, no duplicate);
                    // the ack is queued behind them.
                    self.flushing.entry(conn).or_default().reads += reads.len() + 1;
                    for (channel, after) in reads {
                        self.replay_page(conn, channel, after);
                    }
                    let channel = format!("user:{user}");
                    self.request(
                        |token| Request::LastOffset { token, channel },
                        Pending::SubscribeAck { conn, json: ack },
                    );
                }
            }
            ClientMsg::Unsubscribe { channels } => {
                for ch in channels {
                    self.unfollow(conn, &ch);
                }
            }
            ClientMsg::History {
                conversation,
                before,
                limit,
            } => self.client_history(ReplyTo::Ws(conn), &user, conversation, before, limit, out),
            // Answered on the loop, which owns the connection's token state.
            ClientMsg::Refresh { .. } => {}
            ClientMsg::RegisterDevice { platform, token } => {
                self.device(ReplyTo::Ws(conn), &user, true, platform, token, out)
            }
            ClientMsg::UnregisterDevice { platform, token } => {
                self.device(ReplyTo::Ws(conn), &user, false, platform, token, out)
            }
        }
    }

    /// Reads a page of a conversation from the store; answered in [`Router::on_completion`].
    fn history(
        &mut self,
        reply: ReplyTo,
        conversation: String,
        before: Option<u64>,
        limit: Option<usize>,
    ) {
        let limit = limit
            .unwrap_or(DEFAULT_HISTORY_LIMIT)
            .clamp(1, MAX_HISTORY_LIMIT);
        let channel = format!("conversation:{conversation}");
        // One more than asked, to know whether there is more.
        self.request(
            |token| Request::History {
                token,
                channel,
                before,
                limit: limit + 1,
            },
            Pending::History {
                reply,
                conversation,
                limit,
            },
        );
    }

    /// Where `user` joined a conversation channel (0 when unknown), or None for other channels.
    fn joined_at(&self, channel: &str, user: &str) -> Option<u64> {
        let c = self
            .conversations
            .get(channel.strip_prefix("conversation:")?)?;
        Some(c.joined.get(user).copied().unwrap_or(0))
    }

    /// `register_device` / `unregister_device` from either transport: stored, then answered `ok`.
    fn device(
        &mut self,
        to: ReplyTo,
        user: &Arc<str>,
        register: bool,
        platform: String,
        token: String,
        out: &mut Vec<Out>,
    ) {
        if self.store_busy() {
            return answer(out, to, 503, busy_error());
        }
        let op = if register {
            "register_device"
        } else {
            "unregister_device"
        };
        let json = serde_json::json!({"type": "ok", "op": op, "platform": platform}).to_string();
        let user = user.to_string();
        let write = if register {
            Write::PutDevice {
                user,
                platform,
                token,
            }
        } else {
            Write::DeleteDevice {
                user,
                platform,
                token,
            }
        };
        self.commit(vec![write], Pending::Done { reply: to, json });
    }

    /// A `history` request from either transport: members only, refused while the store is busy.
    fn client_history(
        &mut self,
        to: ReplyTo,
        user: &Arc<str>,
        conversation: String,
        before: Option<u64>,
        limit: Option<usize>,
        out: &mut Vec<Out>,
    ) {
        let member = self
            .conversations
            .get(&conversation)
            .is_some_and(|c| c.members.contains(&**user));
        if !member {
            let m = format!("not a member of {conversation}");
            answer(out, to, 403, msg::error("not_member", &m, None));
        } else if self.store_busy() {
            answer(out, to, 503, busy_error());
        } else {
            self.history(to, conversation, before, limit);
        }
    }

    /// A `send` from either transport: queued for the store, or refused at once with an error answer.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        to: ReplyTo,
        user: &Arc<str>,
        conversation: &str,
        client_id: &str,
        body: Box<RawValue>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        if let Err(r) = self.try_send(to, user, conversation, client_id, body, now_ms) {
            answer(
                out,
                to,
                r.status,
                msg::error(r.code, &r.message, Some(client_id)),
            );
        }
    }

    /// Validates a send and queues its append; `sent` and the deliveries follow the commit.
    fn try_send(
        &mut self,
        reply: ReplyTo,
        user: &Arc<str>,
        conversation: &str,
        client_id: &str,
        body: Box<RawValue>,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID_LEN {
            return Err(refuse(
                "bad_request",
                400,
                "client_id must be 1..=128 bytes",
            ));
        }
        if body.get().len() > self.max_body_bytes {
            return Err(refuse(
                "too_big",
                413,
                "message body is larger than max_body_bytes",
            ));
        }
        if self.pending.len() >= self.max_pending {
            return Err(refuse(
                "store_busy",
                503,
                "the message store is behind; retry with the same client_id",
            ));
        }
        let c = self
            .conversations
            .get(conversation)
            .filter(|c| c.members.contains(&**user))
            .ok_or_else(|| refuse("not_member", 403, format!("not a member of {conversation}")))?;
        // Members with no live connection here get it in their offline queue, in the same transaction.
        let offline: Vec<String> = c
            .members
            .iter()
            .filter(|m| *m != user && !self.presence.contains_key(*m))
            .map(|m| m.to_string())
            .collect();
        let push = self.push_for(c.members.iter(), user, now_ms, body.get());
        self.push_kick(&push, now_ms);
        let channel: Arc<str> = Arc::from(format!("conversation:{conversation}"));
        let write = Write::Append(NewMessage {
            channel: channel.to_string(),
            from: Some(user.to_string()),
            client_id: Some(client_id.to_string()),
            ts: now_ms,
            json: body.get().to_string(),
            offline,
            push,
        });
        self.commit(
            vec![write],
            Pending::Send {
                reply,
                channel,
                from: user.clone(),
                client_id: client_id.to_string(),
                ts: now_ms,
                body,
            },
        );
        Ok(())
    }

    /// Queues a receipt (and, for an ack, the trim of the member's offline queue up to it).
    fn receipt(
        &mut self,
        conn: ReplyTo,
        user: &Arc<str>,
        conversation: &str,
        offset: u64,
        state: ReceiptState,
    ) -> Result<(), Refusal> {
        let c = self
            .conversations
            .get(conversation)
            .filter(|c| c.members.contains(&**user))
            .ok_or_else(|| refuse("not_member", 403, format!("not a member of {conversation}")))?;
        // (In cluster mode this node may not have seen the latest offsets yet; the store keeps states monotonic.)
        if self.cluster.is_none() && offset > c.log.last_offset {
            return Err(refuse(
                "bad_request",
                400,
                "offset is beyond the conversation's last message",
            ));
        }
        if self.pending.len() >= self.max_pending {
            return Err(refuse(
                "store_busy",
                503,
                "the message store is behind; retry",
            ));
        }
        let batch = vec![
            Write::Receipt {
                conversation: conversation.to_string(),
                member: user.to_string(),
                state,
                offset,
            },
            Write::TrimOffline {
                user: user.to_string(),
                channel: format!("conversation:{conversation}"),
                upto: offset,
            },
        ];
        self.commit(
            batch,
            Pending::Receipt {
                reply: conn,
                conversation: conversation.to_string(),
                user: user.clone(),
                offset,
                state,
            },
        );
        Ok(())
    }

    /// Reads the user's offline queue for a connection that just opened; its live traffic waits meanwhile.
    fn start_flush(&mut self, conn: ConnRef, user: &str) {
        self.flushing.entry(conn).or_default().reads += 1;
        self.flush_page(conn, user.to_string(), None);
    }

    /// Reads one page of `user`'s offline queue (after `after` when continuing); completed by `Pending::Flush`.
    fn flush_page(&mut self, conn: ConnRef, user: String, after: Option<(String, u64)>) {
        let next_user = user.clone();
        self.request(
            |token| Request::Offline {
                token,
                user,
                after,
                limit: MAX_FLUSH,
            },
            Pending::Flush {
                conn,
                user: next_user,
            },
        );
    }

    /// Delivers one catch-up read's messages to `conn`; after the last read, releases the held live traffic
    /// that the reads did not already deliver.
    fn catch_up(&mut self, conn: ConnRef, msgs: Vec<Arc<Delivery>>, out: &mut Vec<Out>) {
        let Some(hold) = self.flushing.get_mut(&conn) else {
            return;
        };
        for d in msgs {
            if super::sequencer::is_reset(&d) || hold.sent.insert((d.channel.clone(), d.offset)) {
                out.push(Out::Message {
                    to: vec![conn],
                    delivery: d,
                });
            }
        }
        hold.reads = hold.reads.saturating_sub(1);
        if hold.reads == 0
            && let Some(hold) = self.flushing.remove(&conn)
        {
            for d in hold.held {
                if !hold.sent.contains(&(d.channel.clone(), d.offset)) {
                    out.push(Out::Message {
                        to: vec![conn],
                        delivery: d,
                    });
                }
            }
        }
    }

    // ---- store completions ----------------------------------------------------------------------------

    pub fn on_completion(&mut self, c: Completion, now_ms: u64, out: &mut Vec<Out>) {
        let (token, result) = match c {
            Completion::PushJobs { token, result } => {
                self.pending.remove(&token);
                self.on_push_jobs(result, now_ms);
                return;
            }
            Completion::Committed { token, result } => (token, Ok(result)),
            Completion::Messages { token, result } => (token, Err(result)),
            Completion::Conversations { token, result } => {
                if let (Some(Pending::Members), Ok(all)) = (self.pending.remove(&token), result) {
                    for (id, members) in all {
                        self.set_members(
                            &id,
                            members.iter().map(|m| Arc::from(m.as_str())).collect(),
                        );
                    }
                }
                return;
            }
            Completion::Offset { token, result } => {
                let p = self.pending.remove(&token);
                if let Some(Pending::SubscribeAck { conn, json }) = p {
                    self::reply(out, conn, &json);
                    self.catch_up(conn, Vec::new(), out);
                    return;
                }
                if let Some(Pending::Sync { channel }) = p {
                    let last = result.unwrap_or_else(|e| {
                        tracing::warn!(error = %e, %channel, "last offset read failed");
                        0
                    });
                    let mut released = Vec::new();
                    if let Some(cl) = self.cluster.as_mut() {
                        cl.seq.sync(&channel, last, now_ms, &mut released);
                    }
                    for d in released {
                        self.route_local_parsed(d, out);
                    }
                }
                return;
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        match (p, result) {
            (
                Pending::Send {
                    reply,
                    channel,
                    from,
                    client_id,
                    ts,
                    body,
                },
                Ok(res),
            ) => {
                let conversation = &channel["conversation:".len()..];
                let answer = match res.map(|r| r.first().copied()) {
                    Ok(Some(WriteResult::Appended(Appended::New { offset }))) => {
                        let json = message_json(&channel, offset, Some(&from), ts, &body);
                        let delivery = Delivery::new(channel.clone(), offset, json);
                        self.commit_routed(delivery, Some(from.clone()), ts, now_ms, out);
                        Ok(sent_json(&client_id, conversation, offset, ts))
                    }
                    Ok(Some(WriteResult::Appended(Appended::Duplicate { offset, ts }))) => {
                        // A retry: the same answer; nothing stored or delivered again.
                        Ok(sent_json(&client_id, conversation, offset, ts))
                    }
                    Ok(_) => Err(refuse("internal", 500, "unexpected store answer")),
                    Err(e) => {
                        tracing::debug!(error = %e, "send not stored");
                        Err(refuse(
                            "store_unavailable",
                            503,
                            "message not stored; retry with the same client_id",
                        ))
                    }
                };
                match answer {
                    Ok(j) => self::answer(out, reply, 200, j),
                    Err(r) => {
                        let e = msg::error(r.code, &r.message, Some(&client_id));
                        self::answer(out, reply, r.status, e)
                    }
                }
            }
            (
                Pending::Receipt {
                    reply,
                    conversation,
                    user,
                    offset,
                    state,
                },
                Ok(res),
            ) => match res {
                Ok(r) => {
                    if let ReplyTo::Http(c) = reply {
                        // Over HTTP every request gets an answer; a WebSocket's receipt is silent.
                        let state = match state {
                            ReceiptState::Delivered => "delivered",
                            ReceiptState::Read => "read",
                        };
                        let ok = serde_json::json!({"type": "ok", "conversation": conversation,
                            "state": state, "offset": offset})
                        .to_string();
                        http(out, c, 200, ok);
                    }
                    let Some(WriteResult::Receipt {
                        prev_delivered,
                        prev_read,
                    }) = r.first().copied()
                    else {
                        return;
                    };
                    self.notify_senders(
                        &conversation,
                        &user,
                        offset,
                        state,
                        prev_delivered,
                        prev_read,
                        now_ms,
                    );
                }
                Err(e) => {
                    tracing::debug!(error = %e, "receipt not stored");
                    let err = msg::error("store_unavailable", "receipt not stored; retry", None);
                    self::answer(out, reply, 503, err);
                }
            },
            (Pending::Done { reply, json }, Ok(res)) => match res {
                Ok(_) => self::answer(out, reply, 200, json),
                Err(e) => {
                    tracing::debug!(error = %e, "device not stored");
                    let err = msg::error("store_unavailable", "not stored; retry", None);
                    self::answer(out, reply, 503, err);
                }
            },
            (Pending::Notices { items }, Ok(res)) => {
                let Ok(res) = res else { return };
                for ((channel, json, ts), r) in items.into_iter().zip(res) {
                    if let WriteResult::Appended(Appended::New { offset }) = r {
                        self.deliver_user_channel(channel, offset, &json, ts, out);
                    }
                }
            }
            (
                Pending::Publish {
                    conn,
                    channel,
                    payload,
                    ts,
                },
                Ok(res),
            ) => match res.map(|r| r.first().copied()) {
                Ok(Some(WriteResult::Appended(Appended::New { offset }))) => {
                    let stored = StoredMessage {
                        channel: channel.to_string(),
                        offset,
                        from: None,
                        ts,
                        json: payload,
                    };
                    let d = Delivery::new(channel, offset, render(&stored));
                    self.commit_routed(d, None, ts, now_ms, out);
                    let body = serde_json::json!({"offset": offset}).to_string();
                    http(out, conn, 200, body);
                }
                _ => {
                    let e = msg::error("store_unavailable", "not stored; retry", None);
                    http(out, conn, 503, e);
                }
            },
            (Pending::Answer { conn, status, body }, Ok(res)) => match res {
                Ok(_) => http(out, conn, status, body),
                Err(_) => http(
                    out,
                    conn,
                    503,
                    msg::error("store_unavailable", "not stored; retry", None),
                ),
            },
            (
                Pending::History {
                    reply,
                    conversation,
                    limit,
                },
                Err(res),
            ) => {
                let (status, page) = match res {
                    Ok(msgs) => {
                        // Cut by the byte budget: the page is short, and there is more.
                        let cut = self.cut(&msgs, usize::MAX);
                        (200, history_json(&conversation, &msgs, limit, cut))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "history read failed");
                        (
                            503,
                            msg::error("store_unavailable", "history unavailable; retry", None),
                        )
                    }
                };
                self::answer(out, reply, status, page);
            }
            (
                Pending::Poll {
                    conn,
                    mut cursor,
                    hold_ms,
                    mut items,
                },
                Err(res),
            ) => match res {
                Ok(msgs) => {
                    let from: Vec<(String, u64)> =
                        cursor.iter().map(|(c, o)| (c.to_string(), *o)).collect();
                    for d in with_resets(&from, &msgs) {
                        crate::conn::advance(&mut cursor, &d.channel, d.offset);
                        items.push(d);
                    }
                    self.answer_poll(conn, items, cursor, hold_ms, out);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "poll read failed");
                    http(
                        out,
                        conn,
                        503,
                        msg::error("store_unavailable", "retry the poll", None),
                    );
                }
            },
            (
                Pending::PollFlush {
                    conn,
                    user,
                    channels,
                    mut given,
                    fresh,
                    hold_ms,
                    first,
                },
                Err(res),
            ) => match res {
                Ok(msgs) => {
                    // The flushed messages of the fresh channels; each such channel continues after the last
                    // one delivered (when the page was cut) or from now.
                    let cut = self.cut(&msgs, MAX_REPLAY);
                    let mut items = Vec::new();
                    for m in &msgs {
                        if fresh.contains(&m.channel) {
                            given.insert(m.channel.clone(), m.offset);
                            items.push(Delivery::new(
                                Arc::from(m.channel.as_str()),
                                m.offset,
                                render(m),
                            ));
                        }
                    }
                    // A fresh channel is complete unless the page was cut in or before it: complete ones
                    // continue from now; cut ones after their last flushed message; ones the page did not
                    // reach stay out of the cursor, so the next poll flushes them.
                    let last = msgs.last().map(|m| m.channel.clone());
                    let mut channels = channels;
                    for ch in &fresh {
                        let reached = last.as_ref().is_some_and(|l| ch <= l);
                        if !first
                            && !given.contains_key(ch)
                            && let Some(at) = self.joined_at(ch, &user)
                        {
                            // Mid-session, a conversation the client has not seen yet (joined since its
                            // last poll, or learned late from another node): from where the user joined.
                            given.insert(ch.clone(), at);
                        } else if !cut || (reached && Some(ch) != last.as_ref()) {
                            let now = self.last_offset(ch);
                            let e = given.entry(ch.clone()).or_insert(now);
                            *e = (*e).max(now);
                        } else if !given.contains_key(ch) {
                            channels.retain(|c| c != ch);
                        }
                    }
                    if first {
                        // Everything else starts from now: answer what was missed (maybe nothing) and where
                        // each channel stands.
                        let cur: CursorVec = channels
                            .iter()
                            .map(|c| {
                                let at =
                                    given.get(c).copied().unwrap_or_else(|| self.last_offset(c));
                                (Arc::from(c.as_str()), at)
                            })
                            .collect();
                        http(out, conn, 200, poll_body(&items, &cur));
                    } else {
                        self.poll_read(conn, channels, given, items, hold_ms, out);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "poll offline read failed");
                    http(
                        out,
                        conn,
                        503,
                        msg::error("store_unavailable", "retry the poll", None),
                    );
                }
            },
            (
                Pending::Senders {
                    conversation,
                    user,
                    offset,
                    steps,
                    now_ms,
                },
                Err(res),
            ) => match res {
                Ok(msgs) => {
                    let found: Vec<(u64, Arc<str>)> = msgs
                        .iter()
                        .filter_map(|m| Some((m.offset, Arc::from(m.from.as_deref()?))))
                        .collect();
                    self.emit_receipts(&conversation, &user, offset, &steps, &found, now_ms);
                }
                Err(e) => tracing::debug!(error = %e, %conversation, "receipt senders not read"),
            },
            (Pending::Flush { conn, user }, Err(res)) => {
                let msgs = catch_up_page(res);
                // A page cut by the byte budget: the next one follows before live traffic is released.
                if let Some(last) = self.next_page(conn, &msgs, MAX_FLUSH) {
                    self.flush_page(conn, user, Some(last));
                }
                let ds = msgs
                    .iter()
                    .map(|m| Delivery::new(Arc::from(m.channel.as_str()), m.offset, render(m)))
                    .collect();
                self.catch_up(conn, ds, out);
            }
            (Pending::Replay { conn, from }, Err(res)) => {
                let msgs = catch_up_page(res);
                // A page cut by count or bytes: read the next one before the live traffic is released.
                if let Some((channel, after)) = self.next_page(conn, &msgs, MAX_REPLAY) {
                    self.replay_page(conn, channel, after);
                }
                let ds = with_resets(&from, &msgs);
                self.catch_up(conn, ds, out);
            }
            (Pending::Fill { channel }, Err(res)) => {
                let msgs = res.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, %channel, "gap fill read failed");
                    Vec::new()
                });
                let ds: Vec<Arc<Delivery>> = msgs
                    .iter()
                    .map(|m| Delivery::new(channel.clone(), m.offset, render(m)))
                    .collect();
                let mut released = Vec::new();
                if let Some(cl) = self.cluster.as_mut() {
                    cl.seq.filled(&channel, ds, now_ms, &mut released);
                }
                for d in released {
                    self.route_local_parsed(d, out);
                }
            }
            (Pending::PushWrite, Ok(Err(e))) => {
                // The rows stay as they were; a claimed one is retried when its lease runs out.
                tracing::warn!(error = %e, "writing push outcomes failed");
            }
            (Pending::PushWrite, Ok(Ok(_))) => {}
            _ => tracing::error!("store completion of the wrong kind"),
        }
    }

    /// Tells each sender of a message in (previous state, offset] that `user` moved to `state`: a receipt
    /// appended (durably) to the sender's `user:` channel, queued offline when the sender is not connected.
    #[allow(clippy::too_many_arguments)]
    fn notify_senders(
        &mut self,
        conversation: &str,
        user: &Arc<str>,
        offset: u64,
        state: ReceiptState,
        prev_delivered: u64,
        prev_read: u64,
        now_ms: u64,
    ) {
        let Some(c) = self.conversations.get(conversation) else {
            return;
        };
        // "read" implies "delivered"; each state only moves forward.
        let mut steps: Vec<(&'static str, u64)> = Vec::new();
        if offset > prev_delivered {
            steps.push(("delivered", prev_delivered));
        }
        if state == ReceiptState::Read && offset > prev_read {
            steps.push(("read", prev_read));
        }
        let Some(lowest) = steps.iter().map(|(_, from)| *from).min() else {
            return;
        };
        // The senders of the newly covered range: from this node's recent window when it holds the whole
        // range, else from the store (a node that does not follow the conversation, or an old range).
        if c.log.oldest_replayable_cursor() > lowest || c.log.last_offset < offset {
            let channel = format!("conversation:{conversation}");
            let limit = usize::try_from(offset - lowest)
                .unwrap_or(usize::MAX)
                .min(MAX_FLUSH);
            self.request(
                |token| Request::ReadAfter {
                    token,
                    channel,
                    after: lowest,
                    limit,
                },
                Pending::Senders {
                    conversation: conversation.to_string(),
                    user: user.clone(),
                    offset,
                    steps,
                    now_ms,
                },
            );
            return;
        }
        let found: Vec<(u64, Arc<str>)> = c
            .log
            .after(lowest)
            .take_while(|e| e.delivery.offset <= offset)
            .filter_map(|e| Some((e.delivery.offset, e.from.clone()?)))
            .collect();
        self.emit_receipts(conversation, user, offset, &steps, &found, now_ms);
    }

    /// Appends a `receipt` to the `user:` channel of each sender (other than `user`) of a message in each step's
    /// range (`from`, `offset`]; `found` lists (offset, sender) of the messages in the widest range.
    fn emit_receipts(
        &mut self,
        conversation: &str,
        user: &Arc<str>,
        offset: u64,
        steps: &[(&'static str, u64)],
        found: &[(u64, Arc<str>)],
        now_ms: u64,
    ) {
        let mut writes = Vec::new();
        let mut items = Vec::new();
        for &(state_name, from) in steps {
            let senders: BTreeSet<&Arc<str>> = found
                .iter()
                .filter(|(o, f)| *o > from && *o <= offset && f != user)
                .map(|(_, f)| f)
                .collect();
            for sender in senders {
                let channel = format!("user:{sender}");
                let json = serde_json::json!({
                    "type": "receipt", "conversation": conversation, "offset": offset, "state": state_name,
                    "by": &**user,
                })
                .to_string();
                let offline = if self.presence.contains_key(sender) {
                    vec![]
                } else {
                    vec![sender.to_string()]
                };
                writes.push(Write::Append(NewMessage {
                    channel: channel.clone(),
                    from: None,
                    client_id: None,
                    ts: now_ms,
                    json: json.clone(),
                    offline,
                    push: Vec::new(),
                }));
                items.push((Arc::from(channel.as_str()), json, now_ms));
            }
        }
        if !writes.is_empty() {
            self.commit(writes, Pending::Notices { items });
        }
    }

    /// Routes a stored `user:` channel message to the user's connections and followers, and keeps it in the
    /// recent window.
    fn deliver_user_channel(
        &mut self,
        channel: Arc<str>,
        offset: u64,
        payload: &str,
        ts: u64,
        out: &mut Vec<Out>,
    ) {
        let json = render_user(&channel, offset, payload);
        let delivery = Delivery::new(channel, offset, json);
        self.commit_routed(delivery, None, ts, ts, out);
    }

    /// A message this node committed: in cluster mode it is published to the other nodes and goes through the
    /// sequencer like theirs; on a single node it is routed at once (commit order is offset order).
    fn commit_routed(
        &mut self,
        d: Arc<Delivery>,
        from: Option<Arc<str>>,
        ts: u64,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        let Some(cl) = self.cluster.as_mut() else {
            self.route_local(d, from, ts, out);
            return;
        };
        let payload = serde_json::json!({
            "n": cl.node,
            "o": d.offset,
            "j": std::str::from_utf8(&d.json).unwrap_or("null"),
        })
        .to_string();
        cl.bus.push(BusCmd::Publish {
            channel: d.channel.to_string(),
            payload,
        });
        let mut released = Vec::new();
        cl.seq.push(d, now_ms, &mut released);
        for d in released {
            self.route_local_parsed(d, out);
        }
    }

    /// Routes a message released by the sequencer (its sender and time are read from its JSON).
    fn route_local_parsed(&mut self, d: Arc<Delivery>, out: &mut Vec<Out>) {
        #[derive(serde::Deserialize)]
        struct Meta {
            from: Option<String>,
            #[serde(default)]
            ts: u64,
        }
        let meta = serde_json::from_slice::<Meta>(&d.json).unwrap_or(Meta { from: None, ts: 0 });
        let from = meta.from.map(|f| Arc::from(f.as_str()));
        self.route_local(d, from, meta.ts, out);
    }

    /// Keeps a message in this node's recent window and delivers it to the local connections that get it:
    /// members' (or the user's) connections, and explicit followers.
    fn route_local(
        &mut self,
        d: Arc<Delivery>,
        from: Option<Arc<str>>,
        ts: u64,
        out: &mut Vec<Out>,
    ) {
        // A `reset` from the sequencer goes to the same connections but is not history.
        let reset = super::sequencer::is_reset(&d);
        let entry = Entry {
            ts,
            from,
            delivery: d.clone(),
        };
        let mut to = self.followers_of(&d.channel);
        if let Some(id) = d.channel.strip_prefix("conversation:") {
            let (max, max_bytes) = (
                self.history.conversation_count,
                self.history.conversation_bytes,
            );
            if let Some(c) = self.conversations.get_mut(id) {
                if !reset {
                    c.log.last_offset = c.log.last_offset.max(d.offset);
                    c.log.push(entry, max, max_bytes);
                }
                to.extend(
                    c.members
                        .iter()
                        .filter_map(|m| self.presence.get(m))
                        .flatten()
                        .copied(),
                );
            }
        } else {
            let limits = self.history;
            let log = self.channels.entry(d.channel.clone()).or_default();
            if !reset {
                log.expire(ts, limits.topic_age_ms);
                log.last_offset = log.last_offset.max(d.offset);
                log.push(entry, limits.topic_count, limits.topic_bytes);
            }
            if let Some(user) = d.channel.strip_prefix("user:") {
                to.extend_from_slice(self.connections(user));
            }
        }
        self.route(to, d, out);
    }

    // ---- SSE and polling ------------------------------------------------------------------------------

    /// A request's channel list without duplicates (first occurrence kept), refused past
    /// `bounds.max_channels_per_request`.
    fn bounded_channels(&mut self, channels: Vec<String>) -> Result<Vec<String>, Refusal> {
        let mut seen = HashSet::with_capacity(channels.len());
        let unique: Vec<String> = channels
            .into_iter()
            .filter(|c| seen.insert(c.clone()))
            .collect();
        if unique.len() > self.bounds.max_channels_per_request {
            self.refused_subscriptions += 1;
            return Err(refuse(
                "too_many_channels",
                400,
                format!(
                    "{} channels in one request; at most {}",
                    unique.len(),
                    self.bounds.max_channels_per_request
                ),
            ));
        }
        Ok(unique)
    }

    fn check_all(&self, user: &str, channels: &[String]) -> Result<Vec<Kind>, Refusal> {
        channels
            .iter()
            .map(|c| self.check_access(user, c))
            .collect()
    }

    fn on_stream(
        &mut self,
        conn: ConnRef,
        user: Arc<str>,
        channels: Vec<String>,
        given: BTreeMap<String, u64>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        if self.connections(&user).len() >= self.bounds.max_connections_per_user {
            self.refused_subscriptions += 1;
            let e = msg::error(
                "too_many_connections",
                "too many streams for this user",
                None,
            );
            return http(out, conn, 429, e);
        }
        if self.store_busy() {
            return http(out, conn, 503, busy_error());
        }
        let channels = match self.bounded_channels(channels) {
            Ok(c) => c,
            Err(r) => return http(out, conn, r.status, msg::error(r.code, &r.message, None)),
        };
        if let Err(r) = self.check_all(&user, &channels) {
            http(out, conn, r.status, msg::error(r.code, &r.message, None));
            return;
        }
        // The stream's cursor: the listed channels, the user's conversations and its `user:` channel, each at
        // the client's offset (Last-Event-ID) or, when new, at the current end.
        let mut all: BTreeSet<String> = channels.iter().cloned().collect();
        all.insert(format!("user:{user}"));
        for id in self.memberships.get(&user).into_iter().flatten() {
            all.insert(format!("conversation:{id}"));
        }
        // Entries of the given cursor for channels this user may no longer read are dropped.
        for ch in given.keys() {
            if self.check_access(&user, ch).is_ok() {
                all.insert(ch.clone());
            }
        }
        let mut items = Vec::new();
        let mut reads = Vec::new();
        let mut budget = MAX_REPLAY;
        let mut cur: CursorVec = Vec::with_capacity(all.len());
        for ch in all {
            let at = match given.get(&ch) {
                // Durable channels (and, in a cluster, topics) are read from the store: any cursor, any node.
                Some(&after) if self.replays_from_store(&ch) => {
                    reads.push((ch.clone(), after));
                    after
                }
                Some(&after) => {
                    let mut unbounded = usize::MAX;
                    self.replay(&ch, after, &mut budget, &mut unbounded, &mut items)
                }
                // A durable channel the client has no position on: no cursor entry yet, so the offline flush
                // (what the user missed, older than "now") passes the loop's dedupe, as on a WebSocket; the
                // entry appears with the first message the stream carries.
                None if cursor::kind(&ch) != Ok(Kind::Topic) => continue,
                None => self.last_offset(&ch),
            };
            cur.push((Arc::from(ch.as_str()), at));
        }
        // Hold: the cursor must say what the replay below will have delivered, so the loop can drop nothing;
        // it starts at the given offsets and advances as replayed messages pass through it.
        for (ch, at) in cur.iter_mut() {
            if let Some(&after) = given.get(&**ch) {
                *at = after.min(*at);
            }
        }
        for ch in &channels {
            if cursor::kind(ch) == Ok(Kind::Topic) {
                self.follow(conn, Arc::from(ch.as_str()));
            }
        }
        self.add_presence(conn, &user, now_ms);
        out.push(Out::Loop {
            conn,
            cmd: LoopCmd::StreamStart {
                index: conn.index,
                generation: conn.generation,
                cursor: cur,
            },
        });
        for d in items {
            out.push(Out::Message {
                to: vec![conn],
                delivery: d,
            });
        }
        if !reads.is_empty() {
            // One paged read per channel: a replay longer than one page continues where it stopped.
            self.flushing.entry(conn).or_default().reads += reads.len();
            for (channel, after) in reads {
                self.replay_page(conn, channel, after);
            }
        }
        self.start_flush(conn, &user);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_poll(
        &mut self,
        conn: ConnRef,
        user: Arc<str>,
        channels: Vec<String>,
        given: Option<BTreeMap<String, u64>>,
        hold_ms: u64,
        _now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        let channels = match self.bounded_channels(channels) {
            Ok(c) => c,
            Err(r) => return http(out, conn, r.status, msg::error(r.code, &r.message, None)),
        };
        if let Err(r) = self.check_all(&user, &channels) {
            http(out, conn, r.status, msg::error(r.code, &r.message, None));
            return;
        }
        // As on a stream: the listed channels plus the user's conversations and `user:` channel.
        let mut all: BTreeSet<String> = channels.into_iter().collect();
        all.insert(format!("user:{user}"));
        for id in self.memberships.get(&user).into_iter().flatten() {
            all.insert(format!("conversation:{id}"));
        }
        // No cursor at all: the first poll answers at once (its cursor tells the client where it is).
        let first = given.is_none();
        let given = given.unwrap_or_default();
        // Durable channels the client has no position on start with what the user missed (the offline
        // queue), as a new WebSocket or stream does; the rest of the poll follows once it is read.
        let fresh: BTreeSet<String> = all
            .iter()
            .filter(|c| !given.contains_key(*c) && cursor::kind(c) != Ok(Kind::Topic))
            .cloned()
            .collect();
        if !fresh.is_empty() {
            if self.store_busy() {
                return http(out, conn, 503, busy_error());
            }
            let u = user.to_string();
            // Entries sort by (channel, offset): start at the first fresh channel.
            let after = fresh.iter().next().map(|c| (c.clone(), 0));
            self.request(
                |token| Request::Offline {
                    token,
                    user: u,
                    after,
                    limit: MAX_REPLAY,
                },
                Pending::PollFlush {
                    conn,
                    user: user.clone(),
                    channels: all.into_iter().collect(),
                    given,
                    fresh,
                    hold_ms,
                    first,
                },
            );
            return;
        }
        self.poll_read(
            conn,
            all.into_iter().collect(),
            given,
            Vec::new(),
            hold_ms,
            out,
        );
    }

    /// A poll whose offline part (if any) is done: `given` has a position for every channel that had one or
    /// was flushed; `items` are the flushed messages. Reads what follows each position and answers or holds.
    fn poll_read(
        &mut self,
        conn: ConnRef,
        channels: Vec<String>,
        given: BTreeMap<String, u64>,
        mut items: Vec<Arc<Delivery>>,
        hold_ms: u64,
        out: &mut Vec<Out>,
    ) {
        // Durable channels (and, in a cluster, topics) are read from the store, so any cursor on any node is
        // answered; topics of a single node replay from its memory.
        let mut reads = Vec::new();

        let mut budget = MAX_REPLAY;
        let mut bytes = self.read_bytes;
        let mut cur: CursorVec = Vec::with_capacity(channels.len());
        for ch in &channels {
            let after = given
                .get(ch)
                .copied()
                .unwrap_or_else(|| self.last_offset(ch));
            let at = if self.replays_from_store(ch) {
                reads.push((ch.clone(), after));
                after
            } else {
                self.replay(ch, after, &mut budget, &mut bytes, &mut items)
            };
            cur.push((Arc::from(ch.as_str()), at));
        }
        if reads.is_empty() {
            self.answer_poll(conn, items, cur, hold_ms, out);
            return;
        }
        if self.store_busy() {
            return http(out, conn, 503, busy_error());
        }
        self.request(
            |token| Request::ReadMany {
                token,
                reads,
                limit: MAX_REPLAY,
            },
            Pending::Poll {
                conn,
                cursor: cur,
                hold_ms,
                items,
            },
        );
    }

    /// Whether a channel's history is read from the store (durable channels always; topics in a cluster).
    fn replays_from_store(&self, channel: &str) -> bool {
        self.cluster.is_some() || !matches!(cursor::kind(channel), Ok(Kind::Topic))
    }

    /// Answers a poll with what was found, or holds it (following its channels) until a delivery or `hold_ms`.
    fn answer_poll(
        &mut self,
        conn: ConnRef,
        items: Vec<Arc<Delivery>>,
        cur: CursorVec,
        hold_ms: u64,
        out: &mut Vec<Out>,
    ) {
        if !items.is_empty() {
            http(out, conn, 200, poll_body(&items, &cur));
        } else if hold_ms == 0 {
            http(out, conn, 204, String::new());
        } else {
            for (ch, _) in &cur {
                self.follow(conn, ch.clone());
            }
            out.push(Out::Loop {
                conn,
                cmd: LoopCmd::PollHold {
                    index: conn.index,
                    generation: conn.generation,
                    cursor: cur,
                    hold_ms,
                },
            });
        }
    }

    // ---- internal API ---------------------------------------------------------------------------------

    fn on_api(&mut self, conn: ConnRef, req: ApiRequest, now_ms: u64, out: &mut Vec<Out>) {
        match req {
            ApiRequest::Device {
                register,
                user,
                platform,
                token,
            } => {
                if !valid_id(&user) {
                    let e =
                        msg::error("bad_request", "user must be an id of [A-Za-z0-9_.@-]", None);
                    return http(out, conn, 400, e);
                }
                if let Err(e) = msg::check_device(&platform, &token) {
                    return http(out, conn, 400, msg::error("bad_request", &e, None));
                }
                let user: Arc<str> = Arc::from(user.as_str());
                self.device(ReplyTo::Http(conn), &user, register, platform, token, out);
            }
            ApiRequest::CreateConversation { id, members } => {
                if !valid_id(&id) || members.is_empty() || !members.iter().all(|m| valid_id(m)) {
                    let e =
                        r#"{"error":"id and members must be non-empty ids of [A-Za-z0-9_.@-]"}"#;
                    http(out, conn, 400, e.into());
                    return;
                }
                let members: BTreeSet<Arc<str>> =
                    members.iter().map(|m| Arc::from(m.as_str())).collect();
                let list: Vec<String> = members.iter().map(|m| m.to_string()).collect();
                let body = serde_json::json!({"id": id, "members": &list}).to_string();
                let status = match self.conversations.get(&id) {
                    Some(c) if c.members == members => {
                        http(out, conn, 200, body);
                        return;
                    }
                    Some(_) => 200,
                    None => 201,
                };
                self.set_members(&id, members);
                if let Some(cl) = self.cluster.as_mut() {
                    let payload =
                        serde_json::json!({"n": cl.node, "id": id, "members": &list}).to_string();
                    cl.bus.push(BusCmd::Publish {
                        channel: CONTROL_CHANNEL.to_string(),
                        payload,
                    });
                }
                // Members take effect at once (a send right behind this request is accepted); the answer waits
                // for the commit.
                self.commit(
                    vec![Write::PutConversation { id, members: list }],
                    Pending::Answer { conn, status, body },
                );
            }
            ApiRequest::Publish { channel, body } => {
                let kind = match cursor::kind(&channel) {
                    Ok(Kind::Conversation) => {
                        let e = msg::error(
                            "bad_request",
                            "conversations take sends, not publishes",
                            None,
                        );
                        http(out, conn, 400, e);
                        return;
                    }
                    Ok(k) => k,
                    Err(e) => {
                        http(out, conn, 400, msg::error("bad_channel", &e.0, None));
                        return;
                    }
                };
                if body.get().len() > self.max_body_bytes {
                    http(
                        out,
                        conn,
                        413,
                        msg::error("too_big", "body is larger than max_body_bytes", None),
                    );
                    return;
                }
                // Notices to a user are durable, like receipts. In cluster mode topics go through the store
                // too: their offsets must be unique across nodes (Redis INCR), and the Redis stream keeps the
                // history any node can resume from.
                if kind == Kind::User || self.cluster.is_some() {
                    let (payload, offline) = match channel.strip_prefix("user:") {
                        Some(user) => {
                            let live = self.presence.contains_key(user);
                            let json =
                                serde_json::json!({"type": "notice", "body": &body}).to_string();
                            (json, if live { vec![] } else { vec![user.to_string()] })
                        }
                        None => (body.get().to_string(), vec![]),
                    };
                    let write = Write::Append(NewMessage {
                        channel: channel.clone(),
                        from: None,
                        client_id: None,
                        ts: now_ms,
                        json: payload.clone(),
                        offline,
                        push: Vec::new(),
                    });
                    let pending = Pending::Publish {
                        conn,
                        channel: Arc::from(channel.as_str()),
                        payload,
                        ts: now_ms,
                    };
                    self.commit(vec![write], pending);
                    return;
                }
                let offset = self.publish(
                    &channel,
                    |offset| message_json(&channel, offset, None, now_ms, &body),
                    now_ms,
                    out,
                );
                http(
                    out,
                    conn,
                    200,
                    serde_json::json!({"offset": offset}).to_string(),
                );
            }
            ApiRequest::History {
                conversation,
                before,
                limit,
            } => {
                if self.conversations.contains_key(&conversation) {
                    if self.store_busy() {
                        http(out, conn, 503, busy_error());
                    } else {
                        self.history(ReplyTo::Http(conn), conversation, before, limit);
                    }
                } else {
                    http(
                        out,
                        conn,
                        404,
                        msg::error("not_found", "no such conversation", None),
                    );
                }
            }
        }
    }
}

/// An answer to a WebSocket request (a frame) or to an HTTP one (`status` and the JSON body).
fn busy_error() -> String {
    msg::error(
        "store_busy",
        "the message store is behind; retry in a moment",
        None,
    )
}

fn answer(out: &mut Vec<Out>, to: ReplyTo, status: u16, json: String) {
    match to {
        ReplyTo::Ws(c) => reply(out, c, &json),
        ReplyTo::Http(c) => http(out, c, status, json),
    }
}

fn http(out: &mut Vec<Out>, conn: ConnRef, status: u16, body: String) {
    out.push(Out::Loop {
        conn,
        cmd: LoopCmd::Respond {
            index: conn.index,
            generation: conn.generation,
            status,
            body,
        },
    });
}

fn reply(out: &mut Vec<Out>, conn: ConnRef, json: &str) {
    let mut v = Vec::with_capacity(json.len() + 10);
    encode_frame(Opcode::Text, true, json.as_bytes(), &mut v);
    out.push(Out::Frame {
        to: vec![conn],
        frame: Bytes::from(v),
    });
}

/// `{"messages":[…],"cursor":"…"}`, embedding each message's JSON as it is.
/// A catch-up page's messages (none when the read failed: the client resumes from its cursor later).
fn catch_up_page(res: Result<Vec<StoredMessage>, String>) -> Vec<StoredMessage> {
    res.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "catch-up read failed");
        Vec::new()
    })
}

/// Messages read from the store after the positions in `from`, with a `reset` before any jump in a channel's
/// offsets: what the store no longer has (a topic stream trimmed by `MAXLEN`) is announced, never skipped in
/// silence.
fn with_resets(from: &[(String, u64)], msgs: &[StoredMessage]) -> Vec<Arc<Delivery>> {
    let mut at: HashMap<&str, u64> = from.iter().map(|(c, o)| (c.as_str(), *o)).collect();
    let mut out = Vec::with_capacity(msgs.len());
    for m in msgs {
        let ch: Arc<str> = Arc::from(m.channel.as_str());
        if let Some(pos) = at.get_mut(m.channel.as_str()) {
            if m.offset > pos.saturating_add(1) {
                out.push(super::sequencer::reset(&ch, m.offset - 1));
            }
            *pos = (*pos).max(m.offset);
        }
        out.push(Delivery::new(ch, m.offset, render(m)));
    }
    out
}

pub fn poll_body(items: &[Arc<Delivery>], cur: &CursorVec) -> String {
    let mut s = String::from("{\"messages\":[");
    for (i, d) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(std::str::from_utf8(&d.json).unwrap_or("null"));
    }
    s.push_str("],\"cursor\":");
    let text = cursor::format(cur.iter().map(|(c, o)| (&**c, *o)));
    s.push_str(&serde_json::to_string(&text).unwrap_or_default());
    s.push('}');
    s
}

/// A page `{"type":"history",…}` from store messages read newest first. A history page: the store read asked for `limit + 1` rows, so more than `limit` means there is more; so
/// does a page the store cut at its byte budget (`cut`).
fn history_json(conversation: &str, msgs: &[StoredMessage], limit: usize, cut: bool) -> String {
    let more = msgs.len() > limit || cut;
    let shown = &msgs[..msgs.len().min(limit)];
    let mut s = String::from("{\"type\":\"history\",\"conversation\":");
    s.push_str(&serde_json::to_string(conversation).unwrap_or_default());
    s.push_str(",\"messages\":[");
    for (i, m) in shown.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&render(m));
    }
    s.push_str(if more {
        "],\"more\":true}"
    } else {
        "],\"more\":false}"
    });
    s
}

/// The JSON of a chat or topic message.
fn message_json(
    channel: &str,
    offset: u64,
    from: Option<&str>,
    ts: u64,
    body: &RawValue,
) -> String {
    serde_json::to_string(&msg::Message {
        ty: "message",
        channel,
        offset,
        from,
        ts,
        body,
    })
    .unwrap_or_default()
}

/// A `user:` channel payload (an object) with its channel and offset added.
fn render_user(channel: &str, offset: u64, payload: &str) -> String {
    let trimmed = payload.trim_end();
    match trimmed.strip_suffix('}') {
        Some(head) if head.trim_start().starts_with('{') => {
            let sep = if head.trim_end().ends_with('{') {
                ""
            } else {
                ","
            };
            format!(
                "{head}{sep}\"channel\":{},\"channel_offset\":{offset}}}",
                serde_json::to_string(channel).unwrap_or_default()
            )
        }
        _ => payload.to_string(),
    }
}

/// The delivered JSON of a stored message: chat and topic messages carry their body; `user:` channel entries
/// are whole objects (receipts, notices).
fn render(m: &StoredMessage) -> String {
    if m.channel.starts_with("user:") {
        return render_user(&m.channel, m.offset, &m.json);
    }
    let body = RawValue::from_string(m.json.clone())
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("valid JSON"));
    message_json(&m.channel, m.offset, m.from.as_deref(), m.ts, &body)
}

fn entry_of(channel: &Arc<str>, m: StoredMessage) -> Entry {
    let json = render(&m);
    Entry {
        ts: m.ts,
        from: m.from.map(|f| Arc::from(f.as_str())),
        delivery: Delivery::new(channel.clone(), m.offset, json),
    }
}

fn sent_json(client_id: &str, conversation: &str, offset: u64, ts: u64) -> String {
    serde_json::to_string(&msg::Sent {
        ty: "sent",
        client_id,
        conversation,
        offset,
        ts,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests;
