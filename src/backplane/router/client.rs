//! Client requests by transport, on top of the parts: WebSocket messages, `POST /send` from one-way clients
//! (SSE and polling) and the operations on an SSE stream (`subscribe`, `unsubscribe`, `refresh`). Each is
//! validated here and handed to chat, the follows, catch-up or push.

use std::sync::Arc;

use super::render::busy_error;
use super::{ConnRef, LoopCmd, MAX_REPLAY, Out, ReplyTo, Router, http, reply};
use crate::store::ReceiptState;
use corelay_proto::cursor::Kind;
use corelay_proto::msg::{self, ClientMsg};

impl Router {
    /// A `POST /send` that names no stream: a chat operation of a one-way client, answered over HTTP.
    pub(super) fn on_http_send(
        &mut self,
        conn: ConnRef,
        user: Arc<str>,
        m: ClientMsg,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        let to = ReplyTo::Http(conn);
        match m {
            ClientMsg::Send {
                conversation,
                client_id,
                body,
            } => self.send(to, &user, &conversation, &client_id, body, now_ms, out),
            ClientMsg::Ack {
                conversation,
                offset,
            } => {
                let state = ReceiptState::Delivered;
                self.client_receipt(to, &user, &conversation, offset, state, out)
            }
            ClientMsg::Read {
                conversation,
                offset,
            } => self.client_receipt(to, &user, &conversation, offset, ReceiptState::Read, out),
            ClientMsg::History {
                conversation,
                before,
                limit,
            } => self.client_history(to, &user, conversation, before, limit, out),
            ClientMsg::RegisterDevice { platform, token } => {
                self.device(to, &user, true, platform, token, out)
            }
            ClientMsg::UnregisterDevice { platform, token } => {
                self.device(to, &user, false, platform, token, out)
            }
            ClientMsg::Ping { id } => http(out, conn, 200, msg::pong(id.as_deref())),
            _ => http(
                out,
                conn,
                400,
                msg::error(
                    "bad_request",
                    "POST /send takes send, ack, read, history, register_device, unregister_device or ping (subscribe, unsubscribe and refresh name a stream)",
                    None,
                ),
            ),
        }
    }

    /// A `POST /send` operation on one of the user's SSE streams (named by the id of its first event):
    /// `subscribe` / `unsubscribe` topics on it, or `refresh` its token.
    pub(super) fn stream_op(
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
                    match self.members.check_access(user, &ch) {
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
                    let at = self.channels.last_offset(&ch);
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
            ClientMsg::Ping { id } => http(out, conn, 200, msg::pong(id.as_deref())),
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

    pub(super) fn on_ws(
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
                let state = ReceiptState::Delivered;
                self.client_receipt(ReplyTo::Ws(conn), &user, &conversation, offset, state, out)
            }
            ClientMsg::Read {
                conversation,
                offset,
            } => {
                let state = ReceiptState::Read;
                self.client_receipt(ReplyTo::Ws(conn), &user, &conversation, offset, state, out)
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
                    let kind = match self.members.check_access(&user, &ch) {
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
                            self.channels.replay(
                                &ch,
                                after,
                                &mut budget,
                                &mut unbounded,
                                &mut items,
                            )
                        }
                        (Some(&after), _) => {
                            reads.push((ch.clone(), after));
                            self.channels.last_offset(&ch).max(after)
                        }
                        (None, _) => self.channels.last_offset(&ch),
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
                    // the ack goes when the last page of the last read is out, before that traffic.
                    self.holds.add_reads(conn, reads.len());
                    for (channel, after) in reads {
                        self.holds.resumed(conn, &channel, after);
                        self.replay_page(conn, channel, after);
                    }
                    self.holds.ack_after(conn, ack);
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
            // Answered on the loop, which owns the connection's token state (refresh) or is the one to
            // measure (ping).
            ClientMsg::Refresh { .. } | ClientMsg::Ping { .. } => {}
            ClientMsg::RegisterDevice { platform, token } => {
                self.device(ReplyTo::Ws(conn), &user, true, platform, token, out)
            }
            ClientMsg::UnregisterDevice { platform, token } => {
                self.device(ReplyTo::Ws(conn), &user, false, platform, token, out)
            }
        }
    }
}
