//! Chat on top of the parts: sends (validated, appended with the offline queue and push obligations in one
//! transaction, answered `sent` and delivered once durable), receipts (stored, then told to each sender on its
//! `user:` channel) and history pages. The same for both transports: a [`ReplyTo`] says where answers go.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::pending::{OnCommit, OnRead};
use super::render::{busy_error, history_json, message_json, render_user, sent_json};
use super::{
    DEFAULT_HISTORY_LIMIT, Delivery, MAX_CLIENT_ID_LEN, MAX_FLUSH, MAX_HISTORY_LIMIT, Out, Refusal,
    ReplyTo, Router, answer, http, refuse,
};
use crate::store::thread::Request;
use crate::store::{Appended, NewMessage, ReceiptState, StoredMessage, Write, WriteResult};
use corelay_proto::msg;

/// A send waiting for its commit.
pub(super) struct SendWait {
    reply: ReplyTo,
    channel: Arc<str>,
    from: Arc<str>,
    client_id: String,
    ts: u64,
    body: Box<RawValue>,
}

/// A receipt waiting for its commit.
pub(super) struct ReceiptWait {
    reply: ReplyTo,
    conversation: String,
    user: Arc<str>,
    offset: u64,
    state: ReceiptState,
}

/// A receipt whose range's senders are read from the store.
pub(super) struct SendersWait {
    conversation: String,
    user: Arc<str>,
    offset: u64,
    steps: Vec<(&'static str, u64)>,
    now_ms: u64,
}

impl Router {
    /// Reads a page of a conversation from the store; answered by [`Router::on_history_read`].
    pub(super) fn history(
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
        self.pending.read(
            |token| Request::History {
                token,
                channel,
                before,
                limit: limit + 1,
            },
            OnRead::History {
                reply,
                conversation,
                limit,
            },
        );
    }

    /// A `history` request from either transport: members only, refused while the store is busy.
    pub(super) fn client_history(
        &mut self,
        to: ReplyTo,
        user: &Arc<str>,
        conversation: String,
        before: Option<u64>,
        limit: Option<usize>,
        out: &mut Vec<Out>,
    ) {
        if !self.members.is_member(&conversation, user) {
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
    pub(super) fn send(
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
        if self.pending.full() {
            return Err(refuse(
                "store_busy",
                503,
                "the message store is behind; retry with the same client_id",
            ));
        }
        let members = self
            .members
            .members(conversation)
            .filter(|m| m.contains(&**user))
            .ok_or_else(|| refuse("not_member", 403, format!("not a member of {conversation}")))?;
        // Members with no live connection here and none known elsewhere (the presence cache) are checked in
        // Redis by the append (a single node: none is elsewhere) and queued offline if absent, in the same
        // transaction.
        let offline: Vec<String> = members
            .iter()
            .filter(|m| *m != user && !self.presence.is_online(m) && !self.live_elsewhere(m))
            .map(|m| m.to_string())
            .collect();
        let push = self.push_for(members.iter(), user, now_ms, body.get());
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
        self.pending.commit(
            vec![write],
            OnCommit::Send(SendWait {
                reply,
                channel,
                from: user.clone(),
                client_id: client_id.to_string(),
                ts: now_ms,
                body,
            }),
        );
        Ok(())
    }

    /// An `ack` or `read` from either transport: queued, or refused at once with an error answer (a WebSocket
    /// frame, or the HTTP response).
    pub(super) fn client_receipt(
        &mut self,
        to: ReplyTo,
        user: &Arc<str>,
        conversation: &str,
        offset: u64,
        state: ReceiptState,
        out: &mut Vec<Out>,
    ) {
        if let Err(r) = self.receipt(to, user, conversation, offset, state) {
            answer(out, to, r.status, msg::error(r.code, &r.message, None));
        }
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
        let log_end = self
            .channels
            .conversation(conversation)
            .map_or(0, |l| l.last_offset);
        if !self.members.is_member(conversation, user) {
            return Err(refuse(
                "not_member",
                403,
                format!("not a member of {conversation}"),
            ));
        }
        // (In cluster mode this node may not have seen the latest offsets yet; the store keeps states monotonic.)
        if self.cluster.is_none() && offset > log_end {
            return Err(refuse(
                "bad_request",
                400,
                "offset is beyond the conversation's last message",
            ));
        }
        if self.pending.full() {
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
        self.pending.commit(
            batch,
            OnCommit::Receipt(ReceiptWait {
                reply: conn,
                conversation: conversation.to_string(),
                user: user.clone(),
                offset,
                state,
            }),
        );
        Ok(())
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
        if !self.members.exists(conversation) {
            return;
        }
        let Some(log) = self.channels.conversation(conversation) else {
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
        if log.oldest_replayable_cursor() > lowest || log.last_offset < offset {
            let channel = format!("conversation:{conversation}");
            let limit = usize::try_from(offset - lowest)
                .unwrap_or(usize::MAX)
                .min(MAX_FLUSH);
            self.pending.read(
                |token| Request::ReadAfter {
                    token,
                    channel,
                    after: lowest,
                    limit,
                },
                OnRead::Senders(SendersWait {
                    conversation: conversation.to_string(),
                    user: user.clone(),
                    offset,
                    steps,
                    now_ms,
                }),
            );
            return;
        }
        let found: Vec<(u64, Arc<str>)> = log
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
        let told = self
            .notified
            .entry((Arc::from(conversation), user.clone()))
            .or_default();
        for &(state_name, from) in steps {
            // The state the store holds is at least what an overlapping chain already announced.
            let slot = &mut told[usize::from(state_name == "read")];
            let shown = offset.max(*slot);
            *slot = shown;
            let senders: BTreeSet<&Arc<str>> = found
                .iter()
                .filter(|(o, f)| *o > from && *o <= offset && f != user)
                .map(|(_, f)| f)
                .collect();
            for sender in senders {
                let channel = format!("user:{sender}");
                let json = serde_json::json!({
                    "type": "receipt", "conversation": conversation, "offset": shown, "state": state_name,
                    "by": &**user,
                })
                .to_string();
                let offline = if self.presence.is_online(sender)
                    || self
                        .cluster
                        .as_ref()
                        .is_some_and(|c| c.live_elsewhere(sender))
                {
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
            self.pending.commit(writes, OnCommit::Notices { items });
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

    // ---- completions ----------------------------------------------------------------------------------

    /// [`OnCommit::Send`]: stored (answered `sent`, delivered in commit order), a retry (the same answer, nothing
    /// delivered again), or not stored.
    pub(super) fn on_send_stored(
        &mut self,
        s: SendWait,
        result: Result<Vec<WriteResult>, crate::store::StoreError>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        let SendWait {
            reply,
            channel,
            from,
            client_id,
            ts,
            body,
        } = s;
        let conversation = &channel["conversation:".len()..];
        let answered = match result.map(|r| r.first().copied()) {
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
                let (status, code) = e.status();
                Err(refuse(
                    code,
                    status,
                    "message not stored; retry with the same client_id",
                ))
            }
        };
        match answered {
            Ok(j) => answer(out, reply, 200, j),
            Err(r) => {
                let e = msg::error(r.code, &r.message, Some(&client_id));
                answer(out, reply, r.status, e)
            }
        }
    }

    /// [`OnCommit::Receipt`]: answered over HTTP (a WebSocket's receipt is silent), then the senders are told.
    pub(super) fn on_receipt_stored(
        &mut self,
        r: ReceiptWait,
        result: Result<Vec<WriteResult>, crate::store::StoreError>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        let res = match result {
            Ok(res) => res,
            Err(e) => {
                tracing::debug!(error = %e, "receipt not stored");
                let (status, code) = e.status();
                let err = msg::error(code, "receipt not stored; retry", None);
                return answer(out, r.reply, status, err);
            }
        };
        if let ReplyTo::Http(c) = r.reply {
            // Over HTTP every request gets an answer; a WebSocket's receipt is silent.
            let state = match r.state {
                ReceiptState::Delivered => "delivered",
                ReceiptState::Read => "read",
            };
            let ok = serde_json::json!({"type": "ok", "conversation": r.conversation,
                "state": state, "offset": r.offset})
            .to_string();
            http(out, c, 200, ok);
        }
        let Some(WriteResult::Receipt {
            prev_delivered,
            prev_read,
        }) = res.first().copied()
        else {
            return;
        };
        self.notify_senders(
            &r.conversation,
            &r.user,
            r.offset,
            r.state,
            prev_delivered,
            prev_read,
            now_ms,
        );
    }

    /// [`OnCommit::Notices`]: each notice the store appended is routed on its `user:` channel.
    pub(super) fn on_notices_stored(
        &mut self,
        items: Vec<(Arc<str>, String, u64)>,
        result: Result<Vec<WriteResult>, crate::store::StoreError>,
        out: &mut Vec<Out>,
    ) {
        let Ok(res) = result else { return };
        for ((channel, json, ts), r) in items.into_iter().zip(res) {
            if let WriteResult::Appended(Appended::New { offset }) = r {
                self.deliver_user_channel(channel, offset, &json, ts, out);
            }
        }
    }

    /// [`OnRead::Senders`]: the senders of a receipt's range, read from the store.
    pub(super) fn on_senders_read(
        &mut self,
        s: SendersWait,
        result: Result<Vec<StoredMessage>, crate::store::StoreError>,
    ) {
        match result {
            Ok(msgs) => {
                let found: Vec<(u64, Arc<str>)> = msgs
                    .iter()
                    .filter_map(|m| Some((m.offset, Arc::from(m.from.as_deref()?))))
                    .collect();
                self.emit_receipts(
                    &s.conversation,
                    &s.user,
                    s.offset,
                    &s.steps,
                    &found,
                    s.now_ms,
                );
            }
            Err(e) => {
                let conversation = &s.conversation;
                tracing::debug!(error = %e, %conversation, "receipt senders not read");
            }
        }
    }

    /// [`OnRead::History`]: a history page, or 503.
    pub(super) fn on_history_read(
        &mut self,
        reply: ReplyTo,
        conversation: &str,
        limit: usize,
        result: Result<Vec<StoredMessage>, crate::store::StoreError>,
        out: &mut Vec<Out>,
    ) {
        let (status, page) = match result {
            Ok(msgs) => {
                // Cut by the byte budget: the page is short, and there is more.
                let cut = self.cut(&msgs, usize::MAX);
                (200, history_json(conversation, &msgs, limit, cut))
            }
            Err(e) => {
                tracing::debug!(error = %e, "history read failed");
                let (status, code) = e.status();
                (status, msg::error(code, "history unavailable; retry", None))
            }
        };
        answer(out, reply, status, page);
    }
}
