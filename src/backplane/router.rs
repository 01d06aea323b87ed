//! The router: channels (conversations, `user:` channels, topics), offsets, history, subscriptions, presence,
//! chat (sends, dedupe, receipts) and the answers for SSE streams and polls.
//!
//! A pure state machine: [`Router::handle`] takes an [`Event`] and the wall-clock time and appends [`Out`]puts;
//! the backplane thread does the I/O. State is in memory here; the durable store replaces the conversation log
//! and dedupe maps behind a `Store` trait without changing this interface.
//!
//! Who receives a channel's message: for `conversation:` channels every live connection of every member
//! (presence: WebSocket and SSE connections register on open), for `user:X` every live connection of X, and
//! for every channel the connections that follow it explicitly (topic subscribers, held long polls). The two
//! sets never overlap: a connection in presence never follows a conversation or user channel explicitly.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{ApiRequest, ConnRef, CursorVec, Delivery, Event, LoopCmd};
use crate::auth::valid_id;
use crate::proto::cursor::{self, Kind};
use crate::proto::msg::{self, ClientMsg};
use crate::proto::ws::{Opcode, encode_frame};

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
    /// Messages kept per conversation (until the durable store keeps them all).
    pub conversation_count: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            topic_count: 1000,
            topic_age_ms: 3_600_000,
            conversation_count: 10_000,
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
}

impl Log {
    fn push(&mut self, e: Entry, max: usize) {
        self.entries.push_back(e);
        while self.entries.len() > max {
            self.entries.pop_front();
        }
    }

    fn expire(&mut self, now_ms: u64, max_age_ms: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| now_ms.saturating_sub(e.ts) > max_age_ms)
        {
            self.entries.pop_front();
        }
    }

    /// The offset a cursor must have seen for a replay to have no gap.
    fn oldest_replayable_cursor(&self) -> u64 {
        self.entries
            .front()
            .map_or(self.last_offset, |e| e.delivery.offset - 1)
    }

    fn after(&self, offset: u64) -> impl Iterator<Item = &Entry> {
        // Offsets are dense and increasing: skip straight to the first one after `offset`.
        let first = self.entries.front().map_or(0, |e| e.delivery.offset);
        let skip = offset.saturating_sub(first.saturating_sub(1)) as usize;
        self.entries.iter().skip(skip)
    }
}

struct Conversation {
    members: BTreeSet<Arc<str>>,
    log: Log,
    /// Per member: highest offset acknowledged as delivered, and as read. Never goes backwards.
    delivered: HashMap<Arc<str>, u64>,
    read: HashMap<Arc<str>, u64>,
}

#[derive(Clone, Copy)]
struct SentRecord {
    offset: u64,
    ts: u64,
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

pub struct Router {
    max_body_bytes: usize,
    history: HistoryLimits,
    conversations: HashMap<String, Conversation>,
    /// user → conversations it belongs to (for the SSE cursor).
    memberships: HashMap<Arc<str>, BTreeSet<String>>,
    /// Topics and `user:` channels.
    channels: HashMap<Arc<str>, Log>,
    presence: HashMap<Arc<str>, Vec<ConnRef>>,
    /// channel → connections following it explicitly.
    followers: HashMap<Arc<str>, Vec<ConnRef>>,
    /// connection → channels it follows explicitly (to clean up).
    following: HashMap<ConnRef, Vec<Arc<str>>>,
    dedupe: HashMap<(Arc<str>, String, String), SentRecord>,
}

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
            following: HashMap::new(),
            dedupe: HashMap::new(),
        }
    }

    /// Connections of a user on this node.
    pub fn connections(&self, user: &str) -> &[ConnRef] {
        self.presence.get(user).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn handle(&mut self, ev: Event, now_ms: u64, out: &mut Vec<Out>) {
        match ev {
            Event::Opened { conn, user } => self.presence.entry(user).or_default().push(conn),
            Event::Closed { conn, user } => {
                if let Some(user) = user
                    && let Some(conns) = self.presence.get_mut(&user)
                {
                    conns.retain(|c| *c != conn);
                    if conns.is_empty() {
                        self.presence.remove(&user);
                    }
                }
                self.unfollow_all(conn);
            }
            Event::Unfollow { conn } => self.unfollow_all(conn),
            Event::Received { conn, user, msg } => self.on_ws(conn, user, msg, now_ms, out),
            Event::Send { conn, user, msg } => {
                let (status, body) = match msg {
                    ClientMsg::Send {
                        conversation,
                        client_id,
                        body,
                    } => match self.send(&user, &conversation, &client_id, body, now_ms, out) {
                        Ok(sent) => (200, sent),
                        Err(r) => (r.status, msg::error(r.code, &r.message, Some(&client_id))),
                    },
                    _ => (
                        400,
                        msg::error("bad_request", "POST /send takes a send request", None),
                    ),
                };
                http(out, conn, status, body);
            }
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
    /// that far, then the messages, at most `budget` of them. Returns the offset the client is at afterwards.
    fn replay(
        &self,
        channel: &str,
        after: u64,
        budget: &mut usize,
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
            if *budget == 0 {
                break;
            }
            *budget -= 1;
            at = e.delivery.offset;
            items.push(e.delivery.clone());
        }
        at
    }

    fn follow(&mut self, conn: ConnRef, channel: Arc<str>) {
        let list = self.following.entry(conn).or_default();
        if list.contains(&channel) {
            return;
        }
        list.push(channel.clone());
        self.followers.entry(channel).or_default().push(conn);
    }

    fn unfollow(&mut self, conn: ConnRef, channel: &str) {
        if let Some(list) = self.following.get_mut(&conn) {
            list.retain(|c| &**c != channel);
        }
        if let Some(f) = self.followers.get_mut(channel) {
            f.retain(|c| *c != conn);
            if f.is_empty() {
                self.followers.remove(channel);
            }
        }
    }

    fn unfollow_all(&mut self, conn: ConnRef) {
        for ch in self.following.remove(&conn).unwrap_or_default() {
            if let Some(f) = self.followers.get_mut(&ch) {
                f.retain(|c| *c != conn);
                if f.is_empty() {
                    self.followers.remove(&ch);
                }
            }
        }
    }

    /// Appends a message to a topic or `user:` channel and routes it.
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
        );
        let mut to: Vec<ConnRef> = self.followers.get(&key).cloned().unwrap_or_default();
        if let Some(user) = channel.strip_prefix("user:") {
            to.extend_from_slice(self.connections(user));
        }
        if !to.is_empty() {
            out.push(Out::Message { to, delivery });
        }
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
                let json = match self.send(&user, &conversation, &client_id, body, now_ms, out) {
                    Ok(sent) => sent,
                    Err(r) => msg::error(r.code, &r.message, Some(&client_id)),
                };
                reply(out, conn, &json);
            }
            ClientMsg::Ack {
                conversation,
                offset,
            } => {
                if let Err(r) = self.receipt(&user, &conversation, offset, false, now_ms, out) {
                    reply(out, conn, &msg::error(r.code, &r.message, None));
                }
            }
            ClientMsg::Read {
                conversation,
                offset,
            } => {
                if let Err(r) = self.receipt(&user, &conversation, offset, true, now_ms, out) {
                    reply(out, conn, &msg::error(r.code, &r.message, None));
                }
            }
            ClientMsg::Subscribe { channels, cursor } => {
                let mut items = Vec::new();
                let mut now_at = serde_json::Map::new();
                for ch in channels {
                    let kind = match self.check_access(&user, &ch) {
                        Ok(k) => k,
                        Err(r) => {
                            reply(out, conn, &msg::error(r.code, &r.message, None));
                            continue;
                        }
                    };
                    // Conversations and the own `user:` channel arrive on every connection anyway; a cursor
                    // asks for what was missed. Topics are followed from now (or from the cursor).
                    let at = match cursor.get(&ch) {
                        Some(&after) => {
                            let mut budget = MAX_REPLAY;
                            self.replay(&ch, after, &mut budget, &mut items)
                        }
                        None => self.last_offset(&ch),
                    };
                    if kind == Kind::Topic {
                        self.follow(conn, Arc::from(ch.as_str()));
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
                let ack = serde_json::json!({"type": "subscribed", "cursor": now_at});
                reply(out, conn, &ack.to_string());
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
            } => {
                let json = match self.history_page(&user, &conversation, before, limit) {
                    Ok(page) => page,
                    Err(r) => msg::error(r.code, &r.message, None),
                };
                reply(out, conn, &json);
            }
        }
    }

    /// A page of a conversation, newest first, as `{"type":"history",…}`.
    fn history_page(
        &self,
        user: &str,
        conversation: &str,
        before: Option<u64>,
        limit: Option<usize>,
    ) -> Result<String, Refusal> {
        let c = self
            .conversations
            .get(conversation)
            .filter(|c| c.members.contains(user))
            .ok_or_else(|| refuse("not_member", 403, format!("not a member of {conversation}")))?;
        Ok(history_json(c, conversation, before, limit))
    }

    fn send(
        &mut self,
        user: &Arc<str>,
        conversation: &str,
        client_id: &str,
        body: Box<RawValue>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) -> Result<String, Refusal> {
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
        let max_log = self.history.conversation_count;
        let c = self
            .conversations
            .get_mut(conversation)
            .filter(|c| c.members.contains(&**user))
            .ok_or_else(|| refuse("not_member", 403, format!("not a member of {conversation}")))?;
        let key = (
            user.clone(),
            conversation.to_string(),
            client_id.to_string(),
        );
        if let Some(rec) = self.dedupe.get(&key) {
            // A retry: the same answer; nothing stored or delivered again.
            return Ok(sent_json(client_id, conversation, rec.offset, rec.ts));
        }
        c.log.last_offset += 1;
        let offset = c.log.last_offset;
        let channel: Arc<str> = Arc::from(format!("conversation:{conversation}"));
        let json = serde_json::to_string(&msg::Message {
            ty: "message",
            channel: &channel,
            offset,
            from: Some(user),
            ts: now_ms,
            body: &body,
        })
        .unwrap_or_default();
        let delivery = Delivery::new(channel.clone(), offset, json);
        c.log.push(
            Entry {
                ts: now_ms,
                from: Some(user.clone()),
                delivery: delivery.clone(),
            },
            max_log,
        );
        let mut to: Vec<ConnRef> = c
            .members
            .iter()
            .filter_map(|m| self.presence.get(m))
            .flatten()
            .copied()
            .collect();
        to.extend(self.followers.get(&channel).into_iter().flatten().copied());
        self.dedupe.insert(key, SentRecord { offset, ts: now_ms });
        if !to.is_empty() {
            out.push(Out::Message { to, delivery });
        }
        Ok(sent_json(client_id, conversation, offset, now_ms))
    }

    fn receipt(
        &mut self,
        user: &Arc<str>,
        conversation: &str,
        offset: u64,
        read: bool,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) -> Result<(), Refusal> {
        let c = self
            .conversations
            .get_mut(conversation)
            .filter(|c| c.members.contains(&**user))
            .ok_or_else(|| refuse("not_member", 403, format!("not a member of {conversation}")))?;
        if offset > c.log.last_offset {
            return Err(refuse(
                "bad_request",
                400,
                "offset is beyond the conversation's last message",
            ));
        }
        // "read" implies "delivered"; each state only moves forward.
        let mut notices: Vec<(Arc<str>, &'static str)> = Vec::new();
        for (state, map) in [("delivered", &mut c.delivered), ("read", &mut c.read)] {
            if state == "read" && !read {
                continue;
            }
            let prev = map.entry(user.clone()).or_insert(0);
            if offset <= *prev {
                continue;
            }
            let from = *prev;
            *prev = offset;
            // Each sender of a message in (from, offset], other than the reader, hears it once.
            let senders: BTreeSet<&Arc<str>> = c
                .log
                .after(from)
                .take_while(|e| e.delivery.offset <= offset)
                .filter_map(|e| e.from.as_ref())
                .filter(|f| *f != user)
                .collect();
            notices.extend(senders.into_iter().map(|s| (s.clone(), state)));
        }
        for (sender, state) in notices {
            let channel = format!("user:{sender}");
            self.publish(
                &channel,
                |channel_offset| {
                    serde_json::json!({
                        "type": "receipt", "conversation": conversation, "offset": offset, "state": state,
                        "by": &**user, "channel": &channel, "channel_offset": channel_offset,
                    })
                    .to_string()
                },
                now_ms,
                out,
            );
        }
        Ok(())
    }

    // ---- SSE and polling ------------------------------------------------------------------------------

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
        _now_ms: u64,
        out: &mut Vec<Out>,
    ) {
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
        let mut budget = MAX_REPLAY;
        let mut cur: CursorVec = Vec::with_capacity(all.len());
        for ch in all {
            let at = match given.get(&ch) {
                Some(&after) => self.replay(&ch, after, &mut budget, &mut items),
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
        self.presence.entry(user).or_default().push(conn);
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
        if channels.is_empty() {
            http(
                out,
                conn,
                400,
                msg::error("bad_request", "channels= is required", None),
            );
            return;
        }
        if let Err(r) = self.check_all(&user, &channels) {
            http(out, conn, r.status, msg::error(r.code, &r.message, None));
            return;
        }
        let Some(given) = given else {
            // No cursor: start from now.
            let cur: Vec<(&str, u64)> = channels
                .iter()
                .map(|c| (c.as_str(), self.last_offset(c)))
                .collect();
            let body =
                serde_json::json!({"messages": [], "cursor": cursor::format(cur)}).to_string();
            http(out, conn, 200, body);
            return;
        };
        let mut items = Vec::new();
        let mut budget = MAX_REPLAY;
        let mut cur: CursorVec = Vec::with_capacity(channels.len());
        for ch in &channels {
            let after = given
                .get(ch)
                .copied()
                .unwrap_or_else(|| self.last_offset(ch));
            let at = self.replay(ch, after, &mut budget, &mut items);
            cur.push((Arc::from(ch.as_str()), at));
        }
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
            ApiRequest::CreateConversation { id, members } => {
                if !valid_id(&id) || members.is_empty() || !members.iter().all(|m| valid_id(m)) {
                    let e =
                        r#"{"error":"id and members must be non-empty ids of [A-Za-z0-9_.@-]"}"#;
                    http(out, conn, 400, e.into());
                    return;
                }
                let members: BTreeSet<Arc<str>> =
                    members.iter().map(|m| Arc::from(m.as_str())).collect();
                let body = serde_json::json!({"id": id, "members": members.iter().map(|m| &**m).collect::<Vec<_>>()});
                let (status, old) = match self.conversations.get_mut(&id) {
                    Some(c) if c.members == members => (200, None),
                    Some(c) => (
                        200,
                        Some(std::mem::replace(&mut c.members, members.clone())),
                    ),
                    None => {
                        self.conversations.insert(
                            id.clone(),
                            Conversation {
                                members: members.clone(),
                                log: Log::default(),
                                delivered: HashMap::new(),
                                read: HashMap::new(),
                            },
                        );
                        (201, None)
                    }
                };
                for m in old.iter().flatten() {
                    if let Some(set) = self.memberships.get_mut(m) {
                        set.remove(&id);
                    }
                }
                for m in &members {
                    self.memberships
                        .entry(m.clone())
                        .or_default()
                        .insert(id.clone());
                }
                http(out, conn, status, body.to_string());
            }
            ApiRequest::Publish { channel, body } => {
                match cursor::kind(&channel) {
                    Ok(Kind::Topic) | Ok(Kind::User) => {}
                    Ok(Kind::Conversation) => {
                        let e = msg::error(
                            "bad_request",
                            "conversations take sends, not publishes",
                            None,
                        );
                        http(out, conn, 400, e);
                        return;
                    }
                    Err(e) => {
                        http(out, conn, 400, msg::error("bad_channel", &e.0, None));
                        return;
                    }
                }
                if body.get().len() > self.max_body_bytes {
                    http(
                        out,
                        conn,
                        413,
                        msg::error("too_big", "body is larger than max_body_bytes", None),
                    );
                    return;
                }
                let offset = self.publish(
                    &channel,
                    |offset| {
                        serde_json::to_string(&msg::Message {
                            ty: "message",
                            channel: &channel,
                            offset,
                            from: None,
                            ts: now_ms,
                            body: &body,
                        })
                        .unwrap_or_default()
                    },
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
            } => match self.conversations.get(&conversation) {
                Some(c) => http(
                    out,
                    conn,
                    200,
                    history_json(c, &conversation, before, limit),
                ),
                None => http(
                    out,
                    conn,
                    404,
                    msg::error("not_found", "no such conversation", None),
                ),
            },
        }
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

fn history_json(
    c: &Conversation,
    conversation: &str,
    before: Option<u64>,
    limit: Option<usize>,
) -> String {
    let limit = limit
        .unwrap_or(DEFAULT_HISTORY_LIMIT)
        .clamp(1, MAX_HISTORY_LIMIT);
    let before = before.unwrap_or(u64::MAX);
    let mut page = c
        .log
        .entries
        .iter()
        .rev()
        .filter(|e| e.delivery.offset < before);
    let mut s = String::from("{\"type\":\"history\",\"conversation\":");
    s.push_str(&serde_json::to_string(conversation).unwrap_or_default());
    s.push_str(",\"messages\":[");
    for (i, e) in page.by_ref().take(limit).enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(std::str::from_utf8(&e.delivery.json).unwrap_or("null"));
    }
    let more = page.next().is_some();
    s.push_str(if more {
        "],\"more\":true}"
    } else {
        "],\"more\":false}"
    });
    s
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
mod tests {
    use super::*;

    fn c(w: u16, i: u32) -> ConnRef {
        ConnRef {
            worker: w,
            index: i,
            generation: 1,
        }
    }

    /// Every JSON message a connection gets from these outputs.
    fn to_conn(out: &[Out], conn: ConnRef) -> Vec<serde_json::Value> {
        out.iter()
            .filter_map(|o| match o {
                Out::Message { to, delivery } if to.contains(&conn) => {
                    Some(serde_json::from_slice(&delivery.json).unwrap())
                }
                Out::Frame { to, frame } if to.contains(&conn) => {
                    let skip = if frame[1] == 126 { 4 } else { 2 };
                    Some(serde_json::from_slice(&frame[skip..]).unwrap())
                }
                Out::Loop {
                    conn: c,
                    cmd: LoopCmd::Respond { body, .. },
                } if *c == conn && !body.is_empty() => Some(serde_json::from_str(body).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn status(out: &[Out], conn: ConnRef) -> Option<u16> {
        out.iter().find_map(|o| match o {
            Out::Loop {
                conn: c,
                cmd: LoopCmd::Respond { status, .. },
            } if *c == conn => Some(*status),
            _ => None,
        })
    }

    fn setup() -> (Router, Vec<Out>) {
        let mut r = Router::new(1024, HistoryLimits::default());
        let mut out = Vec::new();
        r.handle(
            Event::Api {
                conn: c(0, 99),
                req: ApiRequest::CreateConversation {
                    id: "c1".into(),
                    members: vec!["alice".into(), "bob".into()],
                },
            },
            1,
            &mut out,
        );
        assert_eq!(status(&out, c(0, 99)), Some(201));
        out.clear();
        for (conn, user) in [
            (c(0, 1), "alice"),
            (c(1, 2), "bob"),
            (c(0, 3), "bob"),
            (c(1, 4), "eve"),
        ] {
            r.handle(
                Event::Opened {
                    conn,
                    user: user.into(),
                },
                1,
                &mut out,
            );
        }
        (r, out)
    }

    fn send(r: &mut Router, conn: ConnRef, user: &str, conv: &str, cid: &str, out: &mut Vec<Out>) {
        let m = msg::parse_client(
            format!(r#"{{"type":"send","conversation":"{conv}","client_id":"{cid}","body":"hi"}}"#)
                .as_bytes(),
        )
        .unwrap();
        r.handle(
            Event::Received {
                conn,
                user: user.into(),
                msg: m,
            },
            5,
            out,
        );
    }

    fn publish(r: &mut Router, channel: &str, body: &str, out: &mut Vec<Out>) {
        let body = RawValue::from_string(body.into()).unwrap();
        r.handle(
            Event::Api {
                conn: c(0, 98),
                req: ApiRequest::Publish {
                    channel: channel.into(),
                    body,
                },
            },
            10,
            out,
        );
    }

    #[test]
    fn send_reaches_every_member_connection_once_and_dedupes() {
        let (mut r, mut out) = setup();
        send(&mut r, c(0, 1), "alice", "c1", "k1", &mut out);
        let alice = to_conn(&out, c(0, 1));
        assert_eq!(alice.len(), 2, "message + sent");
        assert!(
            alice
                .iter()
                .any(|v| v["type"] == "sent" && v["offset"] == 1)
        );
        for bob in [c(1, 2), c(0, 3)] {
            let got = to_conn(&out, bob);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0]["from"], "alice");
        }
        assert!(to_conn(&out, c(1, 4)).is_empty(), "eve is not a member");
        out.clear();
        send(&mut r, c(0, 1), "alice", "c1", "k1", &mut out);
        assert_eq!(out.len(), 1, "a retry is answered, not delivered");
        assert_eq!(to_conn(&out, c(0, 1))[0]["offset"], 1);
    }

    #[test]
    fn non_member_is_refused() {
        let (mut r, mut out) = setup();
        send(&mut r, c(1, 4), "eve", "c1", "x", &mut out);
        let e = to_conn(&out, c(1, 4));
        assert_eq!(e[0]["code"], "not_member");
        assert_eq!(e[0]["ref"], "x");
    }

    #[test]
    fn receipts_go_to_the_senders_user_channel_and_never_backwards() {
        let (mut r, mut out) = setup();
        send(&mut r, c(0, 1), "alice", "c1", "k1", &mut out);
        send(&mut r, c(0, 1), "alice", "c1", "k2", &mut out);
        out.clear();
        let read = msg::parse_client(br#"{"type":"read","conversation":"c1","offset":2}"#).unwrap();
        r.handle(
            Event::Received {
                conn: c(1, 2),
                user: "bob".into(),
                msg: read,
            },
            6,
            &mut out,
        );
        let got = to_conn(&out, c(0, 1));
        let states: Vec<_> = got
            .iter()
            .map(|v| v["state"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(states, ["delivered", "read"]);
        assert_eq!(got[0]["by"], "bob");
        assert_eq!(got[0]["channel"], "user:alice");
        assert_eq!(got[1]["channel_offset"], 2);
        out.clear();
        let old = msg::parse_client(br#"{"type":"ack","conversation":"c1","offset":1}"#).unwrap();
        r.handle(
            Event::Received {
                conn: c(1, 2),
                user: "bob".into(),
                msg: old,
            },
            7,
            &mut out,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn poll_from_now_then_from_cursor_then_held() {
        let (mut r, mut out) = setup();
        let p = c(1, 50);
        let poll = |cursor: Option<&str>, hold_ms| Event::Poll {
            conn: p,
            user: "zed".into(),
            channels: vec!["scores:m42".into()],
            cursor: cursor.map(|t| cursor::parse(t).unwrap()),
            hold_ms,
        };
        publish(&mut r, "scores:m42", "1", &mut out);
        out.clear();
        r.handle(poll(None, 25_000), 11, &mut out);
        assert_eq!(to_conn(&out, p)[0]["cursor"], "scores:m42=1");
        out.clear();
        r.handle(poll(Some("scores:m42=1"), 0), 11, &mut out);
        assert_eq!(status(&out, p), Some(204));
        out.clear();
        r.handle(poll(Some("scores:m42=1"), 25_000), 11, &mut out);
        assert!(matches!(
            out[0],
            Out::Loop {
                cmd: LoopCmd::PollHold { .. },
                ..
            }
        ));
        out.clear();
        publish(&mut r, "scores:m42", "2", &mut out);
        let got = to_conn(&out, p);
        assert_eq!(
            got[0]["offset"], 2,
            "the held poll is routed the new message"
        );
        out.clear();
        r.handle(poll(Some("scores:m42=0"), 0), 12, &mut out);
        let v = &to_conn(&out, p)[0];
        assert_eq!(v["messages"].as_array().unwrap().len(), 2);
        assert_eq!(v["cursor"], "scores:m42=2");
    }

    #[test]
    fn old_cursor_gets_a_reset_not_a_gap() {
        let mut r = Router::new(
            1024,
            HistoryLimits {
                topic_count: 3,
                ..HistoryLimits::default()
            },
        );
        let mut out = Vec::new();
        for i in 0..10 {
            publish(&mut r, "dash:cpu", &i.to_string(), &mut out);
        }
        out.clear();
        let p = c(0, 7);
        r.handle(
            Event::Poll {
                conn: p,
                user: "u".into(),
                channels: vec!["dash:cpu".into()],
                cursor: Some(cursor::parse("dash:cpu=2").unwrap()),
                hold_ms: 0,
            },
            20,
            &mut out,
        );
        let v = &to_conn(&out, p)[0];
        let msgs = v["messages"].as_array().unwrap();
        assert_eq!(msgs[0]["type"], "reset");
        assert_eq!(msgs[0]["offset"], 7);
        let offsets: Vec<_> = msgs[1..]
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, [8, 9, 10]);
        assert_eq!(v["cursor"], "dash:cpu=10");
    }

    #[test]
    fn stream_access_rules() {
        let (mut r, mut out) = setup();
        let s = c(0, 60);
        let stream = |user: &str, ch: &str| Event::Stream {
            conn: s,
            user: user.into(),
            channels: vec![ch.into()],
            cursor: BTreeMap::new(),
        };
        r.handle(stream("eve", "conversation:c1"), 1, &mut out);
        assert_eq!(status(&out, s), Some(403));
        out.clear();
        r.handle(stream("eve", "user:alice"), 1, &mut out);
        assert_eq!(status(&out, s), Some(403));
        out.clear();
        r.handle(stream("bob", "scores:m1"), 1, &mut out);
        match &out[0] {
            Out::Loop {
                cmd: LoopCmd::StreamStart { cursor, .. },
                ..
            } => {
                let names: Vec<&str> = cursor.iter().map(|(c, _)| &**c).collect();
                assert_eq!(names, ["conversation:c1", "scores:m1", "user:bob"]);
            }
            other => panic!("{other:?}"),
        }
    }
}
