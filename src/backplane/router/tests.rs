//! The router's unit tests: a real embedded store, its requests executed synchronously after each event.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use super::*;
use crate::store::embedded::{Embedded, Fsync};
use crate::store::thread::{Completion, Request};
use corelay_proto::cursor;
use corelay_proto::msg;

/// The router with a real embedded store, its requests executed synchronously after each event.
struct Harness {
    r: Router,
    store: Embedded,
    dir: std::path::PathBuf,
}

static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Harness {
    fn new(max_body: usize, limits: HistoryLimits) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "corelay-router-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Embedded::open(&dir, Fsync::Always).unwrap();
        Harness {
            r: Router::new(max_body, limits),
            store,
            dir,
        }
    }

    fn handle(&mut self, ev: Event, now_ms: u64, out: &mut Vec<Out>) {
        self.r.handle(ev, now_ms, out);
        self.pump(now_ms, out);
    }

    fn pump(&mut self, now_ms: u64, out: &mut Vec<Out>) {
        loop {
            let reqs = self.r.take_requests();
            if reqs.is_empty() {
                return;
            }
            for req in reqs {
                let c = match req {
                    Request::Commit { token, batch } => Completion::Committed {
                        token,
                        result: self.store.commit(&batch),
                    },
                    read => crate::store::thread::answer(&mut self.store, read, self.r.read_bytes),
                };
                self.r.on_completion(c, now_ms, out);
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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

fn setup() -> (Harness, Vec<Out>) {
    let mut r = Harness::new(1024, HistoryLimits::default());
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
                cursor: Default::default(),
            },
            1,
            &mut out,
        );
    }
    (r, out)
}

fn send(r: &mut Harness, conn: ConnRef, user: &str, conv: &str, cid: &str, out: &mut Vec<Out>) {
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

fn publish(r: &mut Harness, channel: &str, body: &str, out: &mut Vec<Out>) {
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
fn client_reads_count_against_the_pending_bound() {
    let (mut r, mut out) = setup();
    r.r.set_max_pending(2);
    let history = |r: &mut Harness, conn, user: &str, out: &mut Vec<Out>| {
        let m = msg::parse_client(br#"{"type":"history","conversation":"c1"}"#).unwrap();
        // Not pumped: the read stays in flight.
        r.r.handle(
            Event::Received {
                conn,
                user: user.into(),
                msg: m,
            },
            5,
            out,
        );
    };
    history(&mut r, c(0, 1), "alice", &mut out);
    history(&mut r, c(0, 1), "alice", &mut out);
    assert!(to_conn(&out, c(0, 1)).is_empty(), "two reads in flight");
    history(&mut r, c(1, 2), "bob", &mut out);
    assert_eq!(to_conn(&out, c(1, 2))[0]["code"], "store_busy");
    // A poll that must read the store, and a new connection whose offline flush must be read: refused
    // (503, and close 1013 so the client comes back for its flush), never queued without bound.
    r.r.handle(
        Event::Poll {
            conn: c(1, 70),
            user: "bob".into(),
            channels: vec!["conversation:c1".into()],
            cursor: Some([("conversation:c1".to_string(), 0)].into()),
            hold_ms: 0,
        },
        6,
        &mut out,
    );
    assert_eq!(status(&out, c(1, 70)), Some(503));
    r.r.handle(
        Event::Opened {
            conn: c(0, 71),
            user: "alice".into(),
            cursor: Default::default(),
        },
        7,
        &mut out,
    );
    assert!(out.iter().any(|o| matches!(
        o,
        Out::Loop {
            conn,
            cmd: LoopCmd::Close { code: 1013, .. }
        } if *conn == c(0, 71)
    )));
    // Once the reads complete, clients are served again.
    r.pump(8, &mut out);
    out.clear();
    history(&mut r, c(1, 2), "bob", &mut out);
    r.pump(9, &mut out);
    assert_eq!(to_conn(&out, c(1, 2))[0]["type"], "history");
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
fn a_poll_answer_is_cut_at_the_read_byte_budget_and_its_cursor_says_where() {
    let (mut r, mut out) = setup();
    r.r.set_read_bytes(250);
    let big = format!("\"{}\"", "x".repeat(100));
    for _ in 0..5 {
        publish(&mut r, "scores:big", &big, &mut out);
    }
    out.clear();
    let p = c(1, 51);
    let poll = |cursor: &str| Event::Poll {
        conn: p,
        user: "zed".into(),
        channels: vec!["scores:big".into()],
        cursor: Some(cursor::parse(cursor).unwrap()),
        hold_ms: 0,
    };
    r.handle(poll("scores:big=0"), 11, &mut out);
    let v = &to_conn(&out, p)[0];
    let n = v["messages"].as_array().unwrap().len();
    assert!((1..5).contains(&n), "cut by bytes: {n} of 5");
    assert_eq!(
        v["cursor"],
        format!("scores:big={n};user:zed=0"),
        "the cursor stops at the cut"
    );
    // Continuing from that cursor gets the rest, nothing twice.
    let mut seen = n;
    while seen < 5 {
        out.clear();
        r.handle(poll(&format!("scores:big={seen}")), 12, &mut out);
        let v = &to_conn(&out, p)[0];
        let first = v["messages"][0]["offset"].as_u64().unwrap();
        assert_eq!(first, seen as u64 + 1);
        seen += v["messages"].as_array().unwrap().len();
    }
    assert_eq!(seen, 5);
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
    assert_eq!(to_conn(&out, p)[0]["cursor"], "scores:m42=1;user:zed=0");
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
    assert_eq!(v["cursor"], "scores:m42=2;user:zed=0");
}

#[test]
fn old_cursor_gets_a_reset_not_a_gap() {
    let mut r = Harness::new(
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
    assert_eq!(v["cursor"], "dash:cpu=10;user:u=0");
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
            // The user's durable channels get an entry with their first message (so the offline flush,
            // older than "now", is not dropped); the listed topic starts from now.
            let names: Vec<&str> = cursor.iter().map(|(c, _)| &**c).collect();
            assert_eq!(names, ["scores:m1"]);
        }
        other => panic!("{other:?}"),
    }
}
