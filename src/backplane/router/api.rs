//! The internal API on top of the parts (`/api/…`, trusted callers): device registration on a user's behalf,
//! creating a conversation or changing its members, publishing to a topic or a user's channel, and reading a
//! conversation's history.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::pending::OnCommit;
use super::render::{busy_error, render};
use super::{ApiRequest, ConnRef, Out, ReplyTo, Router, http};
use crate::auth::valid_id;
use crate::store::{Appended, NewMessage, StoredMessage, Write, WriteResult};
use corelay_proto::cursor::{self, Kind};
use corelay_proto::msg;

/// `POST /api/publish` to a durable channel (`user:` always; topics in cluster mode, for global offsets),
/// waiting for its commit: answered with the offset the store assigned. `payload` is what was stored.
pub(super) struct PublishWait {
    conn: ConnRef,
    channel: Arc<str>,
    payload: String,
    ts: u64,
}

impl Router {
    pub(super) fn on_api(
        &mut self,
        conn: ConnRef,
        req: ApiRequest,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
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
                let status = match self.members.members(&id) {
                    Some(m) if *m == members => {
                        http(out, conn, 200, body);
                        return;
                    }
                    Some(_) => 200,
                    None => 201,
                };
                self.set_members(&id, members);
                if let Some(cl) = self.cluster.as_mut() {
                    cl.announce_members(&id, &list);
                }
                // Members take effect at once (a send right behind this request is accepted); the answer waits
                // for the commit.
                self.pending.commit(
                    vec![Write::PutConversation { id, members: list }],
                    OnCommit::Answer { conn, status, body },
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
                            let live = self.presence.is_online(user);
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
                    let then = OnCommit::Publish(PublishWait {
                        conn,
                        channel: Arc::from(channel.as_str()),
                        payload,
                        ts: now_ms,
                    });
                    self.pending.commit(vec![write], then);
                    return;
                }
                let offset = self.publish_topic(&channel, &body, now_ms, out);
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
                if self.members.exists(&conversation) {
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

    /// Appends a message to a topic (memory only, bounded history) and routes it to its followers.
    fn publish_topic(
        &mut self,
        channel: &str,
        body: &serde_json::value::RawValue,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) -> u64 {
        let delivery = self.channels.append_topic(channel, body, now_ms);
        let offset = delivery.offset;
        let to = self.presence.followers_of(channel);
        self.route(to, delivery, out);
        offset
    }

    // ---- completions ----------------------------------------------------------------------------------

    /// [`OnCommit::Publish`]: stored, delivered, answered with its offset; or 503.
    pub(super) fn on_published(
        &mut self,
        p: PublishWait,
        result: Result<Vec<WriteResult>, crate::store::StoreError>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        let PublishWait {
            conn,
            channel,
            payload,
            ts,
        } = p;
        match result.map(|r| r.first().copied()) {
            Ok(Some(WriteResult::Appended(Appended::New { offset }))) => {
                let stored = StoredMessage {
                    channel: channel.to_string(),
                    offset,
                    from: None,
                    ts,
                    json: payload,
                };
                let d = super::Delivery::new(channel, offset, render(&stored));
                self.commit_routed(d, None, ts, now_ms, out);
                let body = serde_json::json!({"offset": offset}).to_string();
                http(out, conn, 200, body);
            }
            _ => {
                let e = msg::error("store_unavailable", "not stored; retry", None);
                http(out, conn, 503, e);
            }
        }
    }

    /// [`OnCommit::Answer`]: the prepared answer once stored, or 503.
    pub(super) fn on_api_write_stored(
        &mut self,
        conn: ConnRef,
        status: u16,
        body: String,
        result: Result<Vec<WriteResult>, crate::store::StoreError>,
        out: &mut Vec<Out>,
    ) {
        match result {
            Ok(_) => http(out, conn, status, body),
            Err(e) => {
                let (status, code) = e.status();
                http(
                    out,
                    conn,
                    status,
                    msg::error(code, "not stored; retry", None),
                )
            }
        }
    }
}
