//! Pending store requests and their typed continuations.
//!
//! Every store [`Request`] the router makes is registered here with what its [`Completion`] continues: a
//! [`Pending`] whose kind matches the request (a write batch continues with an [`OnCommit`], a message read
//! with an [`OnRead`], an offset read with an [`OnOffset`]), each variant carrying exactly what its handler
//! needs. [`Router::on_completion`] matches the completion to its continuation and hands both to the named
//! method of the part the work belongs to.

use std::collections::HashMap;
use std::sync::Arc;

use super::api::PublishWait;
use super::chat::{ReceiptWait, SendWait, SendersWait};
use super::streams::{PollFlushWait, PollWait};
use super::{ConnRef, Out, ReplyTo, Router};
use crate::store::thread::{Completion, Request, Token};
use crate::store::{Write, WriteResult};

/// What a store request's completion continues.
pub(super) enum Pending {
    /// A write batch (`Completion::Committed`).
    Commit(OnCommit),
    /// A message read (`Completion::Messages`).
    Read(OnRead),
    /// An offset read (`Completion::Offset`).
    Offset(OnOffset),
    /// Cluster: every conversation's members, reread after the bus (re)connects (`Completion::Conversations`).
    Members,
    /// Claiming due push obligations (`Completion::PushJobs`).
    PushClaim,
}

/// After a write batch.
pub(super) enum OnCommit {
    /// A chat message: answered `sent` and delivered.
    Send(SendWait),
    /// A receipt: answered over HTTP, then the senders are told.
    Receipt(ReceiptWait),
    /// Receipt notices appended to senders' `user:` channels: (channel, JSON, time) of each, in batch order.
    Notices { items: Vec<(Arc<str>, String, u64)> },
    /// `POST /api/publish` to a durable channel: answered with the offset the store assigned.
    Publish(PublishWait),
    /// An internal API write answered with `status` and `body` once stored.
    Answer {
        conn: ConnRef,
        status: u16,
        body: String,
    },
    /// A device registration, answered with `json` once stored.
    Device { reply: ReplyTo, json: String },
    /// Writing back push outcomes (nothing to answer; a failed write leaves the row to be retried after its
    /// lease).
    PushWrite,
}

/// After a message read.
pub(super) enum OnRead {
    /// A client's history page.
    History {
        reply: ReplyTo,
        conversation: String,
        /// What the client asked for (the read asks one more, to know whether there is more).
        limit: usize,
    },
    /// The senders of a receipt's range.
    Senders(SendersWait),
    /// A page of a connection's offline flush (`user`'s queue).
    Flush { conn: ConnRef, user: String },
    /// A `subscribe` or stream with a cursor: what the connection missed on a durable channel. `from`: where
    /// each channel read starts, so that a jump (offsets the store no longer has) becomes a `reset`.
    Replay {
        conn: ConnRef,
        from: Vec<(String, u64)>,
    },
    /// Cluster: a gap fill or catch-up read of a channel.
    Fill { channel: Arc<str> },
    /// A poll's replay, read from the store.
    Poll(PollWait),
    /// A poll's first part: the user's offline queue.
    PollFlush(PollFlushWait),
}

/// After an offset read.
pub(super) enum OnOffset {
    /// Cluster: where a newly followed channel ends.
    Sync { channel: Arc<str> },
}

/// Store requests to send, and what each one's completion continues.
pub(super) struct PendingRequests {
    requests: Vec<Request>,
    waiting: HashMap<Token, Pending>,
    next_token: Token,
    /// Most store requests in flight; past it client requests are refused with a retryable `store_busy`.
    max: usize,
}

impl PendingRequests {
    pub(super) fn new() -> Self {
        PendingRequests {
            requests: Vec::new(),
            waiting: HashMap::new(),
            next_token: 1,
            max: crate::config::DEFAULT_MAX_PENDING,
        }
    }

    pub(super) fn set_max(&mut self, n: usize) {
        self.max = n.max(1);
    }

    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether `max` requests are in flight.
    pub(super) fn full(&self) -> bool {
        self.waiting.len() >= self.max
    }

    /// Store requests produced since the last call.
    pub(super) fn take_requests(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.requests)
    }

    fn request(&mut self, make: impl FnOnce(Token) -> Request, then: Pending) {
        let token = self.next_token;
        self.next_token += 1;
        self.requests.push(make(token));
        self.waiting.insert(token, then);
    }

    pub(super) fn commit(&mut self, batch: Vec<Write>, then: OnCommit) {
        self.request(
            |token| Request::Commit { token, batch },
            Pending::Commit(then),
        );
    }

    /// A read answered with messages (`ReadAfter`, `ReadMany`, `History`, `Offline`).
    pub(super) fn read(&mut self, make: impl FnOnce(Token) -> Request, then: OnRead) {
        self.request(make, Pending::Read(then));
    }

    /// A read answered with an offset (`LastOffset`).
    pub(super) fn offset(&mut self, make: impl FnOnce(Token) -> Request, then: OnOffset) {
        self.request(make, Pending::Offset(then));
    }

    pub(super) fn members(&mut self) {
        self.request(|token| Request::Conversations { token }, Pending::Members);
    }

    pub(super) fn push_claim(&mut self, make: impl FnOnce(Token) -> Request) {
        self.request(make, Pending::PushClaim);
    }

    fn take(&mut self, token: Token) -> Option<Pending> {
        self.waiting.remove(&token)
    }
}

fn wrong_kind() {
    tracing::error!("store completion of the wrong kind");
}

impl Router {
    /// A store completion: continued by what its request registered.
    pub fn on_completion(&mut self, c: Completion, now_ms: u64, out: &mut Vec<Out>) {
        match c {
            Completion::Committed { token, result } => match self.pending.take(token) {
                Some(Pending::Commit(next)) => self.after_commit(next, result, now_ms, out),
                Some(_) => wrong_kind(),
                None => {}
            },
            Completion::Messages { token, result } => match self.pending.take(token) {
                Some(Pending::Read(next)) => self.after_read(next, result, now_ms, out),
                Some(_) => wrong_kind(),
                None => {}
            },
            Completion::Offset { token, result } => {
                if let Some(Pending::Offset(OnOffset::Sync { channel })) = self.pending.take(token)
                {
                    self.on_synced(channel, result, now_ms, out)
                }
            }
            Completion::Conversations { token, result } => {
                if let (Some(Pending::Members), Ok(all)) = (self.pending.take(token), result) {
                    self.on_members_read(all);
                }
            }
            Completion::PushJobs { token, result } => {
                self.pending.take(token);
                self.on_push_jobs(result, now_ms);
            }
        }
    }

    fn after_commit(
        &mut self,
        next: OnCommit,
        result: Result<Vec<WriteResult>, crate::store::StoreError>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        match next {
            OnCommit::Send(s) => self.on_send_stored(s, result, now_ms, out),
            OnCommit::Receipt(r) => self.on_receipt_stored(r, result, now_ms, out),
            OnCommit::Notices { items } => self.on_notices_stored(items, result, out),
            OnCommit::Publish(p) => self.on_published(p, result, now_ms, out),
            OnCommit::Answer { conn, status, body } => {
                self.on_api_write_stored(conn, status, body, result, out)
            }
            OnCommit::Device { reply, json } => self.on_device_stored(reply, json, result, out),
            OnCommit::PushWrite => self.on_push_written(result),
        }
    }

    fn after_read(
        &mut self,
        next: OnRead,
        result: Result<Vec<crate::store::StoredMessage>, crate::store::StoreError>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        match next {
            OnRead::History {
                reply,
                conversation,
                limit,
            } => self.on_history_read(reply, &conversation, limit, result, out),
            OnRead::Senders(s) => self.on_senders_read(s, result),
            OnRead::Flush { conn, user } => self.on_flush_page(conn, user, result, out),
            OnRead::Replay { conn, from } => self.on_replay_page(conn, from, result, out),
            OnRead::Fill { channel } => self.on_filled(channel, result, now_ms, out),
            OnRead::Poll(p) => self.on_poll_read(p, result, out),
            OnRead::PollFlush(p) => self.on_poll_flush_read(p, result, out),
        }
    }
}
