//! Catch-up: a connection's reads of what it missed (its offline queue when it opens, a resume from a cursor on
//! `subscribe` or a new stream), paged, while its live traffic is held so that nothing arrives out of order,
//! twice, or not at all.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::pending::{OnOffset, OnRead};
use super::render::{render, with_resets};
use super::{ConnRef, Delivery, LoopCmd, MAX_REPLAY, Out, Router, reply};
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
    held: Vec<Arc<Delivery>>,
    /// Bytes of JSON in `held`.
    held_bytes: usize,
    sent: HashSet<(Arc<str>, u64)>,
}

/// The connections whose catch-up is running.
#[derive(Default)]
pub(super) struct Holds {
    conns: HashMap<ConnRef, Hold>,
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

    pub(super) fn forget(&mut self, conn: ConnRef) {
        self.conns.remove(&conn);
    }

    /// Holds `delivery` for the connections of `to` whose catch-up runs (removing them from `to`); returns the
    /// ones now past a bound, whose hold is dropped (they are to be closed).
    fn hold(&mut self, to: &mut Vec<ConnRef>, delivery: &Arc<Delivery>) -> Vec<ConnRef> {
        let mut overflow = Vec::new();
        if self.conns.is_empty() {
            return overflow;
        }
        to.retain(|c| match self.conns.get_mut(c) {
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
        for c in &overflow {
            self.conns.remove(c);
        }
        overflow
    }

    /// Delivers one catch-up read's messages to `conn`; after the last read, releases the held live traffic
    /// that the reads did not already deliver.
    fn deliver(&mut self, conn: ConnRef, msgs: Vec<Arc<Delivery>>, out: &mut Vec<Out>) {
        let Some(hold) = self.conns.get_mut(&conn) else {
            return;
        };
        for d in msgs {
            if super::super::sequencer::is_reset(&d)
                || hold.sent.insert((d.channel.clone(), d.offset))
            {
                out.push(Out::Message {
                    to: vec![conn],
                    delivery: d,
                });
            }
        }
        hold.reads = hold.reads.saturating_sub(1);
        if hold.reads == 0
            && let Some(hold) = self.conns.remove(&conn)
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
}

/// A catch-up page's messages (none when the read failed: the client resumes from its cursor later).
fn catch_up_page(res: Result<Vec<StoredMessage>, String>) -> Vec<StoredMessage> {
    res.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "catch-up read failed");
        Vec::new()
    })
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

    /// A `subscribe`'s acknowledgement, sent once its replays are out (it counts as the catch-up's last read);
    /// completed by `OnOffset::SubscribeAck`.
    pub(super) fn ack_after_replays(&mut self, conn: ConnRef, user: &str, json: String) {
        let channel = format!("user:{user}");
        self.pending.offset(
            |token| Request::LastOffset { token, channel },
            OnOffset::SubscribeAck { conn, json },
        );
    }

    // ---- completions ----------------------------------------------------------------------------------

    /// [`OnRead::Flush`]: a page of a connection's offline queue.
    pub(super) fn on_flush_page(
        &mut self,
        conn: ConnRef,
        user: String,
        result: Result<Vec<StoredMessage>, String>,
        out: &mut Vec<Out>,
    ) {
        let msgs = catch_up_page(result);
        // A page cut by the byte budget: the next one follows before live traffic is released.
        if let Some(last) = self.next_page(conn, &msgs, MAX_FLUSH) {
            self.flush_page(conn, user, Some(last));
        }
        let ds = msgs
            .iter()
            .map(|m| Delivery::new(Arc::from(m.channel.as_str()), m.offset, render(m)))
            .collect();
        self.holds.deliver(conn, ds, out);
    }

    /// [`OnRead::Replay`]: a page of what a connection missed on a channel since its cursor.
    pub(super) fn on_replay_page(
        &mut self,
        conn: ConnRef,
        from: Vec<(String, u64)>,
        result: Result<Vec<StoredMessage>, String>,
        out: &mut Vec<Out>,
    ) {
        let msgs = catch_up_page(result);
        // A page cut by count or bytes: read the next one before the live traffic is released.
        if let Some((channel, after)) = self.next_page(conn, &msgs, MAX_REPLAY) {
            self.replay_page(conn, channel, after);
        }
        let ds = with_resets(&from, &msgs);
        self.holds.deliver(conn, ds, out);
    }

    /// [`OnOffset::SubscribeAck`]: the replays queued before it are out; the ack goes, then the held traffic.
    pub(super) fn on_subscribe_ack(&mut self, conn: ConnRef, json: String, out: &mut Vec<Out>) {
        reply(out, conn, &json);
        self.holds.deliver(conn, Vec::new(), out);
    }
}
