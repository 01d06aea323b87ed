//! Single-node chat: conversations, members, presence (user → connections), offsets, dedupe, receipts.
//!
//! A pure state machine: [`Chat::handle`] takes an [`Event`] and the wall-clock time, and appends [`Out`]puts
//! (frames to connections, HTTP answers). The backplane thread does the I/O. State is in memory in this
//! version; the durable store replaces the maps behind a `Store` trait without changing this interface.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{ApiRequest, ConnRef, Event};
use crate::auth::valid_id;
use crate::proto::msg::{self, ClientMsg};
use crate::proto::ws::{Opcode, encode_frame};

/// Messages kept per conversation for history, resume and receipts (until the durable store lands).
pub const DEFAULT_LOG_PER_CONVERSATION: usize = 10_000;
pub const MAX_HISTORY_LIMIT: usize = 200;
pub const DEFAULT_HISTORY_LIMIT: usize = 50;
pub const MAX_CLIENT_ID_LEN: usize = 128;

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the backplane must do.
#[derive(Debug)]
pub enum Out {
    /// Write one encoded frame to each of these connections.
    Frame { to: Vec<ConnRef>, frame: Bytes },
    /// Answer an HTTP request.
    Http {
        conn: ConnRef,
        status: u16,
        body: String,
    },
}

struct Stored {
    offset: u64,
    from: Arc<str>,
    ts: u64,
    body: Box<RawValue>,
}

struct Conversation {
    members: BTreeSet<Arc<str>>,
    /// The last offset given out; the first message gets 1.
    last_offset: u64,
    log: VecDeque<Stored>,
    /// Per member: highest offset acknowledged as delivered, and as read. Never goes backwards.
    delivered: HashMap<Arc<str>, u64>,
    read: HashMap<Arc<str>, u64>,
}

#[derive(Clone, Copy)]
struct SentRecord {
    offset: u64,
    ts: u64,
}

pub struct Chat {
    max_body_bytes: usize,
    log_per_conversation: usize,
    conversations: HashMap<String, Conversation>,
    presence: HashMap<Arc<str>, Vec<ConnRef>>,
    dedupe: HashMap<(Arc<str>, String, String), SentRecord>,
}

/// Encodes a JSON text once as a WebSocket text frame, shared by every recipient.
pub fn ws_text(json: &str) -> Bytes {
    let mut v = Vec::with_capacity(json.len() + 10);
    encode_frame(Opcode::Text, true, json.as_bytes(), &mut v);
    Bytes::from(v)
}

impl Chat {
    pub fn new(max_body_bytes: usize) -> Self {
        Chat {
            max_body_bytes,
            log_per_conversation: DEFAULT_LOG_PER_CONVERSATION,
            conversations: HashMap::new(),
            presence: HashMap::new(),
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
                if let Some(conns) = self.presence.get_mut(&user) {
                    conns.retain(|c| *c != conn);
                    if conns.is_empty() {
                        self.presence.remove(&user);
                    }
                }
            }
            Event::Received { conn, user, msg } => self.on_client(conn, user, msg, now_ms, out),
            Event::Api { conn, req } => self.on_api(conn, req, out),
        }
    }

    fn reply(out: &mut Vec<Out>, conn: ConnRef, json: &str) {
        out.push(Out::Frame {
            to: vec![conn],
            frame: ws_text(json),
        });
    }

    fn error(out: &mut Vec<Out>, conn: ConnRef, code: &str, message: &str, r: Option<&str>) {
        Self::reply(out, conn, &msg::error(code, message, r));
    }

    fn member_conversation(&mut self, id: &str, user: &str) -> Option<&mut Conversation> {
        self.conversations
            .get_mut(id)
            .filter(|c| c.members.contains(user))
    }

    fn on_client(
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
            } => self.on_send(conn, user, conversation, client_id, body, now_ms, out),
            ClientMsg::Ack {
                conversation,
                offset,
            } => self.on_receipt(conn, user, &conversation, offset, false, out),
            ClientMsg::Read {
                conversation,
                offset,
            } => self.on_receipt(conn, user, &conversation, offset, true, out),
            ClientMsg::Subscribe { channels, cursor } => {
                for ch in channels {
                    let Some(id) = ch.strip_prefix("conversation:") else {
                        Self::error(
                            out,
                            conn,
                            "unknown_channel",
                            &format!("channel {ch:?} is not served by this node"),
                            None,
                        );
                        continue;
                    };
                    let Some(c) = self.member_conversation(id, &user) else {
                        Self::error(
                            out,
                            conn,
                            "not_member",
                            &format!("not a member of {id}"),
                            None,
                        );
                        continue;
                    };
                    // Conversations are delivered without subscribing; a cursor asks for a replay.
                    if let Some(&after) = cursor.get(&ch) {
                        for s in c.log.iter().filter(|s| s.offset > after) {
                            Self::reply(out, conn, &message_json(&ch, s));
                        }
                    }
                }
            }
            ClientMsg::Unsubscribe { .. } => {}
            ClientMsg::History {
                conversation,
                before,
                limit,
            } => {
                let Some(c) = self.member_conversation(&conversation, &user) else {
                    Self::error(
                        out,
                        conn,
                        "not_member",
                        &format!("not a member of {conversation}"),
                        None,
                    );
                    return;
                };
                let limit = limit
                    .unwrap_or(DEFAULT_HISTORY_LIMIT)
                    .clamp(1, MAX_HISTORY_LIMIT);
                let before = before.unwrap_or(u64::MAX);
                let channel = format!("conversation:{conversation}");
                let mut page = c.log.iter().rev().filter(|s| s.offset < before);
                let msgs: Vec<serde_json::Value> = page
                    .by_ref()
                    .take(limit)
                    .map(|s| serde_json::from_str(&message_json(&channel, s)).unwrap_or_default())
                    .collect();
                let more = page.next().is_some();
                let json = serde_json::json!({"type": "history", "conversation": conversation, "messages": msgs, "more": more});
                Self::reply(out, conn, &json.to_string());
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_send(
        &mut self,
        conn: ConnRef,
        user: Arc<str>,
        conversation: String,
        client_id: String,
        body: Box<RawValue>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        let cid = Some(client_id.as_str());
        if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID_LEN {
            Self::error(
                out,
                conn,
                "bad_request",
                "client_id must be 1..=128 bytes",
                None,
            );
            return;
        }
        if body.get().len() > self.max_body_bytes {
            Self::error(
                out,
                conn,
                "too_big",
                "message body is larger than max_body_bytes",
                cid,
            );
            return;
        }
        let max_log = self.log_per_conversation;
        let Some(c) = self
            .conversations
            .get_mut(&conversation)
            .filter(|c| c.members.contains(&*user))
        else {
            Self::error(
                out,
                conn,
                "not_member",
                &format!("not a member of {conversation}"),
                cid,
            );
            return;
        };
        let key = (user.clone(), conversation.clone(), client_id.clone());
        if let Some(rec) = self.dedupe.get(&key) {
            // A retry: same answer, nothing stored or delivered again.
            Self::reply(
                out,
                conn,
                &sent_json(&client_id, &conversation, rec.offset, rec.ts),
            );
            return;
        }
        c.last_offset += 1;
        let stored = Stored {
            offset: c.last_offset,
            from: user.clone(),
            ts: now_ms,
            body,
        };
        let channel = format!("conversation:{conversation}");
        let frame = ws_text(&message_json(&channel, &stored));
        let rec = SentRecord {
            offset: stored.offset,
            ts: now_ms,
        };
        c.log.push_back(stored);
        if c.log.len() > max_log {
            c.log.pop_front();
        }
        let to: Vec<ConnRef> = c
            .members
            .iter()
            .filter_map(|m| self.presence.get(m))
            .flatten()
            .copied()
            .collect();
        self.dedupe.insert(key, rec);
        Self::reply(
            out,
            conn,
            &sent_json(&client_id, &conversation, rec.offset, rec.ts),
        );
        if !to.is_empty() {
            out.push(Out::Frame { to, frame });
        }
    }

    fn on_receipt(
        &mut self,
        conn: ConnRef,
        user: Arc<str>,
        conversation: &str,
        offset: u64,
        read: bool,
        out: &mut Vec<Out>,
    ) {
        let Some(c) = self
            .conversations
            .get_mut(conversation)
            .filter(|c| c.members.contains(&*user))
        else {
            Self::error(
                out,
                conn,
                "not_member",
                &format!("not a member of {conversation}"),
                None,
            );
            return;
        };
        if offset > c.last_offset {
            Self::error(
                out,
                conn,
                "bad_request",
                "offset is beyond the conversation's last message",
                None,
            );
            return;
        }
        // "read" implies "delivered"; each state only moves forward.
        let mut states: Vec<(&'static str, u64)> = Vec::with_capacity(2);
        for (state, map) in [("delivered", &mut c.delivered), ("read", &mut c.read)] {
            if state == "read" && !read {
                continue;
            }
            let prev = map.entry(user.clone()).or_insert(0);
            if offset > *prev {
                states.push((state, *prev));
                *prev = offset;
            }
        }
        for (state, prev) in states {
            // Tell each sender of a message in (prev, offset], other than the reader, once.
            let senders: BTreeSet<&Arc<str>> = c
                .log
                .iter()
                .filter(|s| s.offset > prev && s.offset <= offset && s.from != user)
                .map(|s| &s.from)
                .collect();
            for sender in senders {
                let Some(conns) = self.presence.get(sender) else {
                    continue;
                };
                let json = serde_json::to_string(&msg::Receipt {
                    ty: "receipt",
                    conversation,
                    offset,
                    state,
                    by: &user,
                })
                .unwrap_or_default();
                out.push(Out::Frame {
                    to: conns.clone(),
                    frame: ws_text(&json),
                });
            }
        }
    }

    fn on_api(&mut self, conn: ConnRef, req: ApiRequest, out: &mut Vec<Out>) {
        match req {
            ApiRequest::CreateConversation { id, members } => {
                if !valid_id(&id) || members.is_empty() || !members.iter().all(|m| valid_id(m)) {
                    out.push(Out::Http {
                        conn,
                        status: 400,
                        body:
                            r#"{"error":"id and members must be non-empty ids of [A-Za-z0-9_.@-]"}"#
                                .into(),
                    });
                    return;
                }
                let members: BTreeSet<Arc<str>> =
                    members.iter().map(|m| Arc::from(m.as_str())).collect();
                let body = serde_json::json!({"id": id, "members": members.iter().map(|m| &**m).collect::<Vec<_>>()});
                let status = match self.conversations.get_mut(&id) {
                    Some(c) if c.members == members => 200,
                    Some(c) => {
                        c.members = members;
                        200
                    }
                    None => {
                        self.conversations.insert(
                            id,
                            Conversation {
                                members,
                                last_offset: 0,
                                log: VecDeque::new(),
                                delivered: HashMap::new(),
                                read: HashMap::new(),
                            },
                        );
                        201
                    }
                };
                out.push(Out::Http {
                    conn,
                    status,
                    body: body.to_string(),
                });
            }
        }
    }
}

fn message_json(channel: &str, s: &Stored) -> String {
    serde_json::to_string(&msg::Message {
        ty: "message",
        channel,
        offset: s.offset,
        from: Some(&s.from),
        ts: s.ts,
        body: &s.body,
    })
    .unwrap_or_default()
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

    fn frames_to(out: &[Out], conn: ConnRef) -> Vec<serde_json::Value> {
        out.iter()
            .filter_map(|o| match o {
                Out::Frame { to, frame } if to.contains(&conn) => {
                    // Server frames are unmasked; skip the 2- or 4-byte header.
                    let skip = if frame[1] == 126 { 4 } else { 2 };
                    Some(serde_json::from_slice(&frame[skip..]).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    fn setup() -> (Chat, Vec<Out>) {
        let mut chat = Chat::new(1024);
        let mut out = Vec::new();
        chat.handle(
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
        assert!(matches!(out[0], Out::Http { status: 201, .. }));
        out.clear();
        for (conn, user) in [
            (c(0, 1), "alice"),
            (c(1, 2), "bob"),
            (c(0, 3), "bob"),
            (c(1, 4), "eve"),
        ] {
            chat.handle(
                Event::Opened {
                    conn,
                    user: user.into(),
                },
                1,
                &mut out,
            );
        }
        (chat, out)
    }

    fn send(chat: &mut Chat, conn: ConnRef, user: &str, conv: &str, cid: &str, out: &mut Vec<Out>) {
        let m = msg::parse_client(
            format!(r#"{{"type":"send","conversation":"{conv}","client_id":"{cid}","body":"hi"}}"#)
                .as_bytes(),
        )
        .unwrap();
        chat.handle(
            Event::Received {
                conn,
                user: user.into(),
                msg: m,
            },
            5,
            out,
        );
    }

    #[test]
    fn send_reaches_every_member_connection_once_and_dedupes() {
        let (mut chat, mut out) = setup();
        send(&mut chat, c(0, 1), "alice", "c1", "k1", &mut out);
        let sent = frames_to(&out, c(0, 1));
        assert_eq!(sent[0]["type"], "sent");
        assert_eq!(sent[0]["offset"], 1);
        for bob in [c(1, 2), c(0, 3)] {
            let got = frames_to(&out, bob);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0]["from"], "alice");
            assert_eq!(got[0]["channel"], "conversation:c1");
        }
        assert!(frames_to(&out, c(1, 4)).is_empty(), "eve is not a member");
        out.clear();
        send(&mut chat, c(0, 1), "alice", "c1", "k1", &mut out);
        assert_eq!(out.len(), 1, "a retry is answered, not delivered");
        assert_eq!(frames_to(&out, c(0, 1))[0]["offset"], 1);
    }

    #[test]
    fn non_member_is_refused() {
        let (mut chat, mut out) = setup();
        send(&mut chat, c(1, 4), "eve", "c1", "x", &mut out);
        let e = frames_to(&out, c(1, 4));
        assert_eq!(e[0]["code"], "not_member");
        assert_eq!(e[0]["ref"], "x");
    }

    #[test]
    fn receipts_go_to_the_sender_and_never_backwards() {
        let (mut chat, mut out) = setup();
        send(&mut chat, c(0, 1), "alice", "c1", "k1", &mut out);
        send(&mut chat, c(0, 1), "alice", "c1", "k2", &mut out);
        out.clear();
        let ack = msg::parse_client(br#"{"type":"read","conversation":"c1","offset":2}"#).unwrap();
        chat.handle(
            Event::Received {
                conn: c(1, 2),
                user: "bob".into(),
                msg: ack,
            },
            6,
            &mut out,
        );
        let r = frames_to(&out, c(0, 1));
        let states: Vec<_> = r
            .iter()
            .map(|v| v["state"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(states, ["delivered", "read"]);
        assert_eq!(r[0]["by"], "bob");
        out.clear();
        let old = msg::parse_client(br#"{"type":"ack","conversation":"c1","offset":1}"#).unwrap();
        chat.handle(
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
}
