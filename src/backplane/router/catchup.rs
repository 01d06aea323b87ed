//! Catch-up: a connection's reads of what it missed (its offline queue when it opens, a resume from a cursor on
//! `subscribe` or a new stream), paged, while its live traffic is held so that nothing arrives out of order,
//! twice, or not at all.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::pending::OnRead;
use super::render::{render, with_resets};
use super::{ConnRef, Delivery, LoopCmd, MAX_REPLAY, Out, Router};
use crate::store::StoredMessage;
use crate::store::thread::Request;

/// Live messages held for one connection while its catch-up reads run; past either bound the connection is
/// closed with 1013 (it resumes from its cursor) rather than holding more.
pub const MAX_HELD: usize = 10_000;
pub const MAX_HELD_BYTES: usize = 16 << 20;

/// How many offline messages one reconnect flushes (the rest on the next one, after acks).
pub const MAX_FLUSH: usize = 10_000;

/// A connection whose catch-up reads (offline queue, resume from a cursor) are running: live deliveries wait
/// in `held` until the last read is out, and anything a read already delivered is not delivered again.
#[derive(Default)]
struct Hold {
    reads: usize,
    /// Live messages per channel, in the order they came (a channel's offsets ascend). Per channel so that a
    /// catch-up item can first let out the held ones older than it: offsets leave in order per channel.
    held: HashMap<Arc<str>, VecDeque<Arc<Delivery>>>,
    /// Messages and bytes of JSON in `held`.
    held_count: usize,
    held_bytes: usize,
    sent: HashSet<(Arc<str>, u64)>,
    /// Channels resumed from a cursor in this catch-up, and the offset the client has: their replay delivers
    /// them in order, so the offline flush leaves them out (a flush item ahead of the replay would arrive
    /// before older offsets), and nothing at or below that offset is delivered (in a cluster the live stream
    /// can still be behind the client's cursor).
    resumed: HashMap<Arc<str>, u64>,
    /// `subscribed` answers, sent once every read of the catch-up is out (a replay can take several pages).
    acks: Vec<String>,
}

/// The connections whose catch-up is running.
#[derive(Default)]
pub(super) struct Holds {
    conns: HashMap<ConnRef, Hold>,
    /// Cluster mode: the live stream of a channel (the sequencer) can be behind what a connection's catch-up
    /// read from the store. After the catch-up, each channel's highest offset it delivered is a floor: live
    /// messages at or below it are not delivered to that connection again. An entry goes when the live
    /// stream passes it, or with the connection.
    floors: HashMap<ConnRef, HashMap<Arc<str>, u64>>,
    /// Whether live traffic can lag behind the store (cluster mode), so that floors are kept.
    pub(super) live_can_lag: bool,
}

impl Holds {
    /// `n` more catch-up reads for `conn` (its live traffic is held from now until they are out).
    pub(super) fn add_reads(&mut self, conn: ConnRef, n: usize) {
        self.conns.entry(conn).or_default().reads += n;
    }

    /// One more read for a catch-up that still runs; false when it does not (the connection closed).
    fn another_read(&mut self, conn: ConnRef) -> bool {
        match self.conns.get_mut(&conn) {
            Some(h) => {
                h.reads += 1;
                true
            }
            None => false,
        }
    }

    /// `channel` is replayed from a cursor in `conn`'s running catch-up: the offline flush skips it from now on.
    pub(super) fn resumed(&mut self, conn: ConnRef, channel: &str, after: u64) {
        if let Some(h) = self.conns.get_mut(&conn) {
            let at = h.resumed.entry(Arc::from(channel)).or_default();
            *at = (*at).max(after);
        }
    }

    /// `json` goes to `conn` when its catch-up is complete, before the live traffic held meanwhile.
    pub(super) fn ack_after(&mut self, conn: ConnRef, json: String) {
        if let Some(h) = self.conns.get_mut(&conn) {
            h.acks.push(json);
        }
    }

    fn is_resumed(&self, conn: ConnRef, channel: &str) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|h| h.resumed.contains_key(channel))
    }

    fn is_holding(&self, conn: ConnRef) -> bool {
        self.conns.contains_key(&conn)
    }

    pub(super) fn forget(&mut self, conn: ConnRef) {
        self.conns.remove(&conn);
        self.floors.remove(&conn);
    }

    /// Holds `delivery` for the connections of `to` whose catch-up runs (removing them from `to`); returns the
    /// ones now past a bound, whose hold is dropped (they are to be closed).
    fn hold(&mut self, to: &mut Vec<ConnRef>, delivery: &Arc<Delivery>) -> Vec<ConnRef> {
        let mut overflow = Vec::new();
        if !self.floors.is_empty() {
            let floors = &mut self.floors;
            to.retain(|c| {
                let Some(f) = floors.get_mut(c) else {
                    return true;
                };
                let Some(&floor) = f.get(&delivery.channel) else {
                    return true;
                };
                if delivery.offset > floor {
                    // The live stream has caught up with what the catch-up delivered.
                    f.remove(&delivery.channel);
                    if f.is_empty() {
                        floors.remove(c);
                    }
                    true
                } else {
                    super::super::sequencer::is_reset(delivery)
                }
            });
        }
        if self.conns.is_empty() {
            return overflow;
        }
        to.retain(|c| match self.conns.get_mut(c) {
            Some(hold) => {
                hold.held
                    .entry(delivery.channel.clone())
                    .or_default()
                    .push_back(delivery.clone());
                hold.held_count += 1;
                hold.held_bytes += delivery.json.len();
                if hold.held_count > MAX_HELD || hold.held_bytes > MAX_HELD_BYTES {
                    overflow.push(*c);
                }
                false
            }
            None => true,
        });
        for c in &overflow {
            self.conns.remove(c);
        }
        overflow
    }

    /// Delivers one catch-up read's messages to `conn`, each after the held live messages of its channel that
    /// are older than it (a live message committed before an item the read found must not arrive after it);
    /// after the last read, releases the rest of the held traffic that the reads did not already deliver.
    fn deliver(&mut self, conn: ConnRef, msgs: Vec<Arc<Delivery>>, out: &mut Vec<Out>) {
        let Some(hold) = self.conns.get_mut(&conn) else {
            return;
        };
        for d in msgs {
            if let Some(q) = hold.held.get_mut(&d.channel) {
                let has = hold.resumed.get(&d.channel).copied().unwrap_or(0);
                while q.front().is_some_and(|h| h.offset < d.offset) {
                    if let Some(h) = q.pop_front() {
                        hold.held_count -= 1;
                        hold.held_bytes -= h.json.len();
                        if h.offset > has || super::super::sequencer::is_reset(&h) {
                            send_once(&mut hold.sent, conn, h, out);
                        }
                    }
                }
            }
            send_once(&mut hold.sent, conn, d, out);
        }
        hold.reads = hold.reads.saturating_sub(1);
        if hold.reads == 0
            && let Some(mut hold) = self.conns.remove(&conn)
        {
            for json in std::mem::take(&mut hold.acks) {
                super::reply(out, conn, &json);
            }
            for (ch, q) in std::mem::take(&mut hold.held) {
                let has = hold.resumed.get(&ch).copied().unwrap_or(0);
                for d in q {
                    if d.offset > has || super::super::sequencer::is_reset(&d) {
                        send_once(&mut hold.sent, conn, d, out);
                    }
                }
            }
            if self.live_can_lag {
                let mut floor: HashMap<Arc<str>, u64> = hold.resumed;
                for (ch, o) in hold.sent {
                    let f = floor.entry(ch).or_default();
                    *f = (*f).max(o);
                }
                floor.retain(|_, f| *f > 0);
                if !floor.is_empty() {
                    self.floors.insert(conn, floor);
                }
            }
        }
    }
}

/// Sends `d` to `conn` unless this catch-up already delivered its offset (resets always go).
fn send_once(
    sent: &mut HashSet<(Arc<str>, u64)>,
    conn: ConnRef,
    d: Arc<Delivery>,
    out: &mut Vec<Out>,
) {
    if super::super::sequencer::is_reset(&d) || sent.insert((d.channel.clone(), d.offset)) {
        out.push(Out::Message {
            to: vec![conn],
            delivery: d,
        });
    }
}

impl Router {
    /// Routes a channel message to `to`, holding it for connections whose catch-up is running.
    pub(super) fn route(
        &mut self,
        mut to: Vec<ConnRef>,
        delivery: Arc<Delivery>,
        out: &mut Vec<Out>,
    ) {
        for c in self.holds.hold(&mut to, &delivery) {
            // Its catch-up is too far behind the live traffic: let it come back with its cursor.
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
        if !to.is_empty() {
            out.push(Out::Message { to, delivery });
        }
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
        if !self.cut(msgs, limit) || !self.holds.another_read(conn) {
            return None;
        }
        Some((last.channel.clone(), last.offset))
    }

    /// Reads the user's offline queue for a connection that just opened; its live traffic waits meanwhile.
    pub(super) fn start_flush(&mut self, conn: ConnRef, user: &str) {
        self.holds.add_reads(conn, 1);
        self.flush_page(conn, user.to_string(), None);
    }

    /// Reads one page of `user`'s offline queue (after `after` when continuing); completed by `OnRead::Flush`.
    fn flush_page(&mut self, conn: ConnRef, user: String, after: Option<(String, u64)>) {
        let next_user = user.clone();
        self.pending.read(
            |token| Request::Offline {
                token,
                user,
                after,
                limit: MAX_FLUSH,
            },
            OnRead::Flush {
                conn,
                user: next_user,
            },
        );
    }

    /// Reads one page of `channel` after `after` for `conn`'s catch-up; completed by `OnRead::Replay`.
    pub(super) fn replay_page(&mut self, conn: ConnRef, channel: String, after: u64) {
        let from = vec![(channel.clone(), after)];
        self.pending.read(
            |token| Request::ReadAfter {
                token,
                channel,
                after,
                limit: MAX_REPLAY,
            },
            OnRead::Replay { conn, from },
        );
    }

    /// A catch-up page's messages; None when the read failed. Then the catch-up cannot go on without a gap
    /// (the held live traffic is newer than what was not read), so the connection is closed with 1013 and
    /// resumes from its cursor, which has not moved past what it missed.
    fn catch_up_page(
        &mut self,
        conn: ConnRef,
        result: Result<Vec<StoredMessage>, crate::store::StoreError>,
        out: &mut Vec<Out>,
    ) -> Option<Vec<StoredMessage>> {
        match result {
            Ok(msgs) => Some(msgs),
            Err(e) => {
                tracing::debug!(error = %e, "catch-up read failed; closing so that the client resumes");
                if self.holds.is_holding(conn) {
                    self.holds.forget(conn);
                    out.push(Out::Loop {
                        conn,
                        cmd: LoopCmd::Close {
                            index: conn.index,
                            generation: conn.generation,
                            code: 1013,
                            reason: "store unavailable; reconnect and resume",
                        },
                    });
                }
                None
            }
        }
    }

    // ---- completions ----------------------------------------------------------------------------------

    /// [`OnRead::Flush`]: a page of a connection's offline queue.
    pub(super) fn on_flush_page(
        &mut self,
        conn: ConnRef,
        user: String,
        result: Result<Vec<StoredMessage>, crate::store::StoreError>,
        out: &mut Vec<Out>,
    ) {
        let Some(msgs) = self.catch_up_page(conn, result, out) else {
            return;
        };
        // A page cut by the byte budget: the next one follows before live traffic is released.
        if let Some(last) = self.next_page(conn, &msgs, MAX_FLUSH) {
            self.flush_page(conn, user, Some(last));
        }
        let ds = msgs
            .iter()
            .filter(|m| !self.holds.is_resumed(conn, &m.channel))
            .map(|m| Delivery::new(Arc::from(m.channel.as_str()), m.offset, render(m)))
            .collect();
        self.holds.deliver(conn, ds, out);
    }

    /// [`OnRead::Replay`]: a page of what a connection missed on a channel since its cursor.
    pub(super) fn on_replay_page(
        &mut self,
        conn: ConnRef,
        from: Vec<(String, u64)>,
        result: Result<Vec<StoredMessage>, crate::store::StoreError>,
        out: &mut Vec<Out>,
    ) {
        let Some(msgs) = self.catch_up_page(conn, result, out) else {
            return;
        };
        // A page cut by count or bytes: read the next one before the live traffic is released.
        if let Some((channel, after)) = self.next_page(conn, &msgs, MAX_REPLAY) {
            self.replay_page(conn, channel, after);
        }
        let ds = with_resets(&from, &msgs);
        self.holds.deliver(conn, ds, out);
    }
}
