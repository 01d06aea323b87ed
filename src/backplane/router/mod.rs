//! The router: channels (conversations, `user:` channels, topics), offsets, history, subscriptions, presence,
//! chat (sends, dedupe, receipts) and the answers for SSE streams and polls.
//!
//! A state machine without I/O: [`Router::handle`] takes an [`Event`] and the wall-clock time and appends
//! [`Out`]puts; durable work becomes store [`Request`](crate::store::thread::Request)s
//! ([`Router::take_requests`]) whose [`Completion`](crate::store::thread::Completion)s come back through
//! [`Router::on_completion`]. A chat message is answered `sent` and delivered only once its group commit is
//! durable; deliveries leave in commit order, so offsets arrive in order on every connection.
//!
//! Conversations and `user:` channels are durable (the store keeps every message; memory keeps a recent
//! window for replay and receipts). Topics live in memory with a bounded history (count and age).
//!
//! Who receives a channel's message: for `conversation:` channels every live connection of every member
//! (presence: WebSocket and SSE connections register on open), for `user:X` every live connection of X, and
//! for every channel the connections that follow it explicitly (topic subscribers, held long polls). The two
//! sets never overlap: a connection in presence never follows a conversation or user channel explicitly.
//!
//! # Parts
//!
//! Owned parts, each a field of [`Router`] with one job:
//! - [`channels`]: `Channels`, every channel's recent window and last offset, and replay from a cursor;
//! - [`membership`]: `Membership`, conversation members, join points, user → conversations, access checks;
//! - [`presence`]: `Presence`, each user's live connections and the explicit follows of each connection;
//! - [`catchup`]: `Holds`, connections whose catch-up reads run, with their held live traffic;
//! - [`cluster`]: `ClusterSync`, bus interest, presence announcements, publishing, the sequencer (Redis mode);
//! - [`pending`]: `PendingRequests`, store requests in flight and their typed continuations
//!   ([`Router::on_completion`] dispatches each to the named method of the part it belongs to);
//! - [`push`]: `PushLink`, mobile push obligations and device registration.
//!
//! On top of them, `impl Router` blocks that need the whole router: [`client`] (requests by transport),
//! [`chat`] (sends, receipts, history), [`streams`] (SSE streams and polls), [`api`] (the internal API);
//! [`render`] holds the JSON rendering. This file holds the [`Router`], the [`Out`] plumbing, [`Router::handle`]
//! and local routing.
//!
//! # The life of a message
//!
//! A `send` arrives as an [`Event`] ([`Router::handle`] → `client` → `chat::send`): it is validated against
//! the membership, and its append (with the offline queue of members not present and any push obligations)
//! is registered in `pending` with an `OnCommit::Send` continuation. When the store's completion comes back,
//! `on_completion` hands it to `chat::on_send_stored`, which answers `sent` and passes the delivery to
//! `commit_routed`: on a single node straight to `route_local`; in a cluster it is published on the bus and
//! released by the sequencer in offset order (other nodes' messages arrive by `on_bus` the same way). Then
//! `route_local` keeps it in the channel's window (`channels`), collects the receiving connections (members'
//! connections from `presence`, plus explicit followers) and `route` emits an [`Out::Message`], holding it for
//! any connection whose catch-up is still running (`catchup`).

mod api;
mod catchup;
mod channels;
mod chat;
mod client;
mod cluster;
mod membership;
mod pending;
mod presence;
mod push;
mod remote;
mod render;
mod streams;
#[cfg(test)]
mod tests;

pub use catchup::{MAX_FLUSH, MAX_HELD, MAX_HELD_BYTES};
pub use cluster::GAP_WAIT_MS;
pub use push::PushLink;
pub use render::poll_body;

use crate::config::{
    DEFAULT_CONVERSATION_WINDOW_BYTES, DEFAULT_MAX_CHANNELS_PER_REQUEST,
    DEFAULT_MAX_CONNECTIONS_PER_USER, DEFAULT_MAX_FOLLOWS, DEFAULT_TOPIC_HISTORY_BYTES,
};
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{ApiRequest, ConnRef, CursorVec, Delivery, Event, LoopCmd};
use crate::store::{Store, StoredMessage};
use catchup::Holds;
use channels::Channels;
use cluster::ClusterSync;
use corelay_proto::ws::{Opcode, encode_frame};
use membership::Membership;
use pending::PendingRequests;
use presence::Presence;

pub const MAX_HISTORY_LIMIT: usize = 200;
pub const DEFAULT_HISTORY_LIMIT: usize = 50;
pub const MAX_CLIENT_ID_LEN: usize = 128;
/// Most messages one poll answer or one replay carries; the client continues from the returned cursor.
pub const MAX_REPLAY: usize = 1000;

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

/// Where an answer goes: a WebSocket frame, or the HTTP response of a one-way client.
#[derive(Clone, Copy, Debug)]
enum ReplyTo {
    Ws(ConnRef),
    Http(ConnRef),
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
    bounds: Bounds,
    /// Every channel's recent window and last offset.
    channels: Channels,
    /// Conversation members.
    members: Membership,
    /// Live connections per user, and explicit follows.
    presence: Presence,
    /// Connections whose catch-up reads run.
    holds: Holds,
    /// Store requests to send, and what each one's completion continues.
    pending: PendingRequests,
    /// Per-user buckets for HTTP requests, and the map's size after its last sweep.
    user_buckets: HashMap<Arc<str>, crate::bucket::Bucket>,
    user_buckets_swept: usize,
    /// The byte budget of one store read reply: a reply that reached it (or `MAX_REPLAY`) may have more.
    read_bytes: usize,
    /// `subscribe`s refused by a bound (for the metric).
    pub refused_subscriptions: u64,
    /// Cluster mode (Redis): bus, sequencer, subscriptions, presence.
    cluster: Option<ClusterSync>,
    /// Mobile push (APNs/FCM) when configured.
    push: Option<PushLink>,
    /// Per (conversation, member): the highest `delivered` and `read` offsets told to senders so far. Receipt
    /// chains (store the receipt, read the senders, append the notices) overlap, so a later chain's notice
    /// can be committed first; a notice never says less than one already sent. One entry per member that
    /// sent a receipt (bounded by the memberships).
    notified: HashMap<(Arc<str>, Arc<str>), [u64; 2]>,
}

impl Router {
    pub fn new(max_body_bytes: usize, history: HistoryLimits) -> Self {
        Router {
            max_body_bytes,
            bounds: Bounds::default(),
            channels: Channels::new(history),
            members: Membership::default(),
            presence: Presence::default(),
            holds: Holds::default(),
            pending: PendingRequests::new(),
            user_buckets: HashMap::new(),
            user_buckets_swept: 0,
            read_bytes: usize::MAX,
            refused_subscriptions: 0,
            cluster: None,
            notified: HashMap::new(),
            push: None,
        }
    }

    /// `subscribe`s (or stream/poll channel lists) refused by a bound.
    pub fn refused_subscriptions(&self) -> u64 {
        self.refused_subscriptions
    }

    pub fn set_bounds(&mut self, b: Bounds) {
        self.bounds = b;
    }

    /// The byte budget of one store read reply (the store thread cuts replies there).
    pub fn set_read_bytes(&mut self, n: usize) {
        self.read_bytes = n.max(1);
    }

    pub fn set_max_pending(&mut self, n: usize) {
        self.pending.set_max(n);
    }

    /// Loads conversations, members and each conversation's recent window from the store (at start, before
    /// the store thread takes it).
    pub fn load(&mut self, store: &mut dyn Store) -> crate::store::Result<()> {
        for (id, members) in store.conversations()? {
            self.channels.load_conversation(store, &id)?;
            let members = members.iter().map(|m| Arc::from(m.as_str())).collect();
            self.members.load(id, members);
        }
        Ok(())
    }

    /// Store requests produced since the last call.
    pub fn take_requests(&mut self) -> Vec<crate::store::thread::Request> {
        self.pending.take_requests()
    }

    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Whether the store has `max_pending` requests in flight: client reads (history, replays, flushes, polls)
    /// are refused with a retryable `store_busy` like sends, so no client can flood the store thread.
    fn store_busy(&self) -> bool {
        self.pending.full()
    }

    /// Whether a read reply may have been cut (by count or bytes), so the next page must be read.
    fn cut(&self, msgs: &[StoredMessage], limit: usize) -> bool {
        !msgs.is_empty()
            && (msgs.len() >= limit
                || msgs.iter().map(|m| m.json.len()).sum::<usize>() >= self.read_bytes)
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
            .or_insert_with(|| crate::bucket::Bucket::full(burst, now_ms));
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
            Event::Opened { conn, user, cursor } => {
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
                self.add_presence(conn, &user);
                self.start_flush(conn, &user);
                if !cursor.is_empty() {
                    // A resume at connect: the same catch-up as a `subscribe` with this cursor, started
                    // before the flush can deliver anything, so the flush leaves these channels to it.
                    let channels = cursor.keys().cloned().collect();
                    let msg = corelay_proto::msg::ClientMsg::Subscribe { channels, cursor };
                    self.on_ws(conn, user, msg, now_ms, out);
                }
            }
            Event::Closed { conn, user } => {
                if let Some(user) = user
                    && self.presence.remove(conn, &user)
                {
                    self.user_presence(&user, false);
                }
                self.holds.forget(conn);
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
            } => self.on_http_send(conn, user, msg, now_ms, out),
            Event::Stream {
                conn,
                user,
                channels,
                cursor,
            } => self.on_stream(conn, user, channels, cursor, out),
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

    /// Routes a message released by the sequencer (its sender and time are read from its JSON).
    pub(super) fn route_local_parsed(&mut self, d: Arc<Delivery>, out: &mut Vec<Out>) {
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
    pub(super) fn route_local(
        &mut self,
        d: Arc<Delivery>,
        from: Option<Arc<str>>,
        ts: u64,
        out: &mut Vec<Out>,
    ) {
        // A `reset` from the sequencer goes to the same connections but is not history.
        let reset = super::sequencer::is_reset(&d);
        self.channels.record(&d, from, ts, reset);
        let mut to = self.presence.followers_of(&d.channel);
        if let Some(id) = d.channel.strip_prefix("conversation:") {
            if let Some(members) = self.members.members(id) {
                for m in members {
                    to.extend_from_slice(self.presence.connections(m));
                }
            }
        } else if let Some(user) = d.channel.strip_prefix("user:") {
            to.extend_from_slice(self.presence.connections(user));
        }
        self.route(to, d, out);
    }
}

/// An answer to a WebSocket request (a frame) or to an HTTP one (`status` and the JSON body).
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
