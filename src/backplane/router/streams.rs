//! Streams and polls on top of the parts: a new SSE stream (its cursor over the listed channels, the user's
//! conversations and `user:` channel; replay from Last-Event-ID; then live, registered in presence) and a
//! long poll (the offline queue for channels it has no position on, then what follows each position: answered
//! at once, or held as a follower until a delivery or its timeout).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use super::pending::OnRead;
use super::render::{busy_error, poll_body, with_resets};
use super::{
    ConnRef, CursorVec, Delivery, LoopCmd, MAX_REPLAY, Out, Refusal, Router, http, refuse,
};
use crate::store::StoredMessage;
use crate::store::thread::Request;
use corelay_proto::cursor::{self, Kind};
use corelay_proto::msg;

/// A poll whose replay is read from the store (any node has the whole log).
pub(super) struct PollWait {
    conn: ConnRef,
    cursor: CursorVec,
    hold_ms: u64,
    /// Found in memory already (topics of a single node).
    items: Vec<Arc<Delivery>>,
    /// Cluster: the channels this node follows on the bus while the read runs (released after it).
    interest: Vec<String>,
}

/// A poll's first part: the user's offline queue, for the durable channels it had no position on.
pub(super) struct PollFlushWait {
    conn: ConnRef,
    user: Arc<str>,
    channels: Vec<String>,
    given: BTreeMap<String, u64>,
    fresh: BTreeSet<String>,
    hold_ms: u64,
    first: bool,
}

impl Router {
    /// A request's channel list without duplicates (first occurrence kept), refused past
    /// `bounds.max_channels_per_request`.
    pub(super) fn bounded_channels(
        &mut self,
        channels: Vec<String>,
    ) -> Result<Vec<String>, Refusal> {
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

    pub(super) fn check_all(&self, user: &str, channels: &[String]) -> Result<Vec<Kind>, Refusal> {
        channels
            .iter()
            .map(|c| self.members.check_access(user, c))
            .collect()
    }

    pub(super) fn on_stream(
        &mut self,
        conn: ConnRef,
        user: Arc<str>,
        channels: Vec<String>,
        given: BTreeMap<String, u64>,
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
        for id in self.members.of(&user) {
            all.insert(format!("conversation:{id}"));
        }
        // Entries of the given cursor for channels this user may no longer read are dropped.
        for ch in given.keys() {
            if self.members.check_access(&user, ch).is_ok() {
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
                    self.channels
                        .replay(&ch, after, &mut budget, &mut unbounded, &mut items)
                }
                // A durable channel the client has no position on: no cursor entry yet, so the offline flush
                // (what the user missed, older than "now") passes the loop's dedupe, as on a WebSocket; the
                // entry appears with the first message the stream carries.
                None if cursor::kind(&ch) != Ok(Kind::Topic) => continue,
                None => self.channels.last_offset(&ch),
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
        self.add_presence(conn, &user);
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
            self.holds.add_reads(conn, reads.len());
            for (channel, after) in reads {
                // The flush below leaves these channels to their replay: a queued message ahead of a later
                // replay page would move the stream's cursor past it, and the loop would drop that page.
                self.holds.resumed(conn, &channel, after);
                self.replay_page(conn, channel, after);
            }
        }
        self.start_flush(conn, &user);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_poll(
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
        for id in self.members.of(&user) {
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
            self.pending.read(
                |token| Request::Offline {
                    token,
                    user: u,
                    after,
                    limit: MAX_REPLAY,
                },
                OnRead::PollFlush(PollFlushWait {
                    conn,
                    user: user.clone(),
                    channels: all.into_iter().collect(),
                    given,
                    fresh,
                    hold_ms,
                    first,
                }),
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
    pub(super) fn poll_read(
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
                .unwrap_or_else(|| self.channels.last_offset(ch));
            let at = if self.replays_from_store(ch) {
                reads.push((ch.clone(), after));
                after
            } else {
                self.channels
                    .replay(ch, after, &mut budget, &mut bytes, &mut items)
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
        // Cluster: follow the channels on the bus from before the read, so that this node's sync point for
        // them is read no later than the poll's own read. A channel first followed after the read (when the
        // poll is held) would sync past messages other nodes committed in between, and the poll, whose cursor
        // moves past them with the next message, would never get them.
        let interest: Vec<String> = if self.cluster.is_some() {
            reads.iter().map(|(c, _)| c.clone()).collect()
        } else {
            Vec::new()
        };
        for ch in &interest {
            self.interest(ch, 1);
        }
        self.pending.read(
            |token| Request::ReadMany {
                token,
                reads,
                limit: MAX_REPLAY,
            },
            OnRead::Poll(PollWait {
                conn,
                cursor: cur,
                hold_ms,
                items,
                interest,
            }),
        );
    }

    /// Whether a channel's history is read from the store (durable channels always; topics in a cluster).
    pub(super) fn replays_from_store(&self, channel: &str) -> bool {
        self.cluster.is_some() || !matches!(cursor::kind(channel), Ok(Kind::Topic))
    }

    /// Answers a poll with what was found, or holds it (following its channels) until a delivery or `hold_ms`.
    pub(super) fn answer_poll(
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

    // ---- completions ----------------------------------------------------------------------------------

    /// [`OnRead::Poll`]: the poll's replay from the store, answered (or held) with what memory found before it.
    pub(super) fn on_poll_read(
        &mut self,
        p: PollWait,
        result: Result<Vec<StoredMessage>, crate::store::StoreError>,
        out: &mut Vec<Out>,
    ) {
        let PollWait {
            conn,
            mut cursor,
            hold_ms,
            mut items,
            interest,
        } = p;
        match result {
            Ok(msgs) => {
                let from: Vec<(String, u64)> =
                    cursor.iter().map(|(c, o)| (c.to_string(), *o)).collect();
                for d in with_resets(&from, &msgs) {
                    corelay_proto::cursor::advance(&mut cursor, &d.channel, d.offset);
                    items.push(d);
                }
                self.answer_poll(conn, items, cursor, hold_ms, out);
            }
            Err(e) => {
                tracing::debug!(error = %e, "poll read failed");
                let (status, code) = e.status();
                http(out, conn, status, msg::error(code, "retry the poll", None));
            }
        }
        // A held poll follows its channels now; the read's own interest ends.
        for ch in &interest {
            self.interest(ch, -1);
        }
    }

    /// [`OnRead::PollFlush`]: the user's offline queue for the poll's fresh channels; the first poll is answered
    /// with it, a later one continues with its reads.
    pub(super) fn on_poll_flush_read(
        &mut self,
        p: PollFlushWait,
        result: Result<Vec<StoredMessage>, crate::store::StoreError>,
        out: &mut Vec<Out>,
    ) {
        let PollFlushWait {
            conn,
            user,
            mut channels,
            mut given,
            fresh,
            hold_ms,
            first,
        } = p;
        let msgs = match result {
            Ok(msgs) => msgs,
            Err(e) => {
                tracing::debug!(error = %e, "poll offline read failed");
                return http(
                    out,
                    conn,
                    503,
                    msg::error("store_unavailable", "retry the poll", None),
                );
            }
        };
        // The flushed messages of the fresh channels; each such channel continues after the last one delivered
        // (when the page was cut) or from now.
        let cut = self.cut(&msgs, MAX_REPLAY);
        let mut items = Vec::new();
        for m in &msgs {
            if fresh.contains(&m.channel) {
                given.insert(m.channel.clone(), m.offset);
                items.push(Delivery::new(
                    Arc::from(m.channel.as_str()),
                    m.offset,
                    super::render::render(m),
                ));
            }
        }
        // A fresh channel is complete unless the page was cut in or before it: complete ones continue from now;
        // cut ones after their last flushed message; ones the page did not reach stay out of the cursor, so the
        // next poll flushes them.
        let last = msgs.last().map(|m| m.channel.clone());
        for ch in &fresh {
            let reached = last.as_ref().is_some_and(|l| ch <= l);
            if !first
                && !given.contains_key(ch)
                && let Some(at) = self.members.joined_at(ch, &user)
            {
                // Mid-session, a conversation the client has not seen yet (joined since its last poll, or
                // learned late from another node): from where the user joined.
                given.insert(ch.clone(), at);
            } else if !cut || (reached && Some(ch) != last.as_ref()) {
                let now = self.channels.last_offset(ch);
                let e = given.entry(ch.clone()).or_insert(now);
                *e = (*e).max(now);
            } else if !given.contains_key(ch) {
                channels.retain(|c| c != ch);
            }
        }
        if first {
            // Everything else starts from now: answer what was missed (maybe nothing) and where each channel
            // stands.
            let cur: CursorVec = channels
                .iter()
                .map(|c| {
                    let at = given
                        .get(c)
                        .copied()
                        .unwrap_or_else(|| self.channels.last_offset(c));
                    (Arc::from(c.as_str()), at)
                })
                .collect();
            http(out, conn, 200, poll_body(&items, &cur));
        } else {
            self.poll_read(conn, channels, given, items, hold_ms, out);
        }
    }
}
