//! The transport contract: one table of scenarios run over WebSocket, SSE + HTTP, long polling + HTTP and short
//! polling + HTTP with the same assertions, on one node and on two cluster nodes sharing one Redis. A
//! difference between transports fails a test. The sender is always a WebSocket client; the client under test
//! (bob) receives on the transport and does everything else (send, ack, read, history) the way that transport
//! does: frames on a WebSocket, `POST /send` on the one-way transports.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    WebSocket,
    Sse,
    LongPoll,
    ShortPoll,
}

const ALL: [Transport; 4] = [
    Transport::WebSocket,
    Transport::Sse,
    Transport::LongPoll,
    Transport::ShortPoll,
];

/// A chat client on one transport. `seen` is what it received, per channel, for resume and dedupe checks.
struct Client<'a> {
    node: &'a Node,
    user: String,
    t: Transport,
    ws: Option<Ws>,
    sse: Option<Sse>,
    /// Poll cursor text, or the last SSE id.
    cursor: Option<String>,
    /// channel → offsets received, in order.
    seen: BTreeMap<String, Vec<u64>>,
    /// Topics listed on the SSE stream or polls (a WebSocket subscribes to them).
    topics: Vec<String>,
    /// WebSocket frames that arrived while waiting for a request's answer.
    pending: Vec<Value>,
}

impl<'a> Client<'a> {
    /// Opens bob's transport; `resume` is the cursor (WS: channel → offset; SSE: Last-Event-ID; polls: cursor).
    fn open(node: &'a Node, user: &str, t: Transport, resume: Option<&Client>) -> Client<'a> {
        let mut c = Client {
            node,
            user: user.into(),
            t,
            ws: None,
            sse: None,
            cursor: resume.and_then(|r| r.cursor.clone()),
            seen: resume.map(|r| r.seen.clone()).unwrap_or_default(),
            pending: Vec::new(),
            topics: resume.map(|r| r.topics.clone()).unwrap_or_default(),
        };
        match t {
            Transport::WebSocket => {
                let mut ws = connect(node, user);
                if let Some(r) = resume {
                    let cur: BTreeMap<&str, u64> = r
                        .seen
                        .iter()
                        .map(|(ch, offs)| (ch.as_str(), *offs.last().unwrap()))
                        .collect();
                    let chans: Vec<&str> = cur.keys().copied().collect();
                    send_json(
                        &mut ws,
                        json!({"type":"subscribe","channels":chans,"cursor":cur}),
                    );
                }
                c.ws = Some(ws);
            }
            Transport::Sse => {
                let sse = Sse::open(
                    node,
                    &format!("/sse?token={}{}", token(user), c.channels_param()),
                    c.cursor.as_deref(),
                );
                assert_eq!(sse.status(), 200);
                c.sse = Some(sse);
            }
            // A poll client's first poll (no cursor) tells it where it stands, after what it missed.
            Transport::LongPoll | Transport::ShortPoll if resume.is_none() => {
                c.pending = c.next_batch();
            }
            Transport::LongPoll | Transport::ShortPoll => {}
        }
        c
    }

    fn channels_param(&self) -> String {
        if self.topics.is_empty() {
            String::new()
        } else {
            format!("&channels={}", self.topics.join(","))
        }
    }

    /// Receives until `want` messages of `ty` arrived; what else arrives is kept for a later call (and is only
    /// then checked and counted in `seen`). Panics after 20 s.
    fn recv(&mut self, ty: &str, want: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        let mut later = Vec::new();
        while got.len() < want {
            assert!(
                Instant::now() < deadline,
                "{:?}: {} of {want} {ty} after 20 s: {got:?} (kept for later: {later:?}; cursor {:?})",
                self.t,
                got.len(),
                self.cursor
            );
            for v in self.next_batch() {
                if v["type"] != ty || got.len() == want {
                    later.push(v);
                    continue;
                }
                if let (Some(ch), Some(off)) = (v["channel"].as_str(), v["offset"].as_u64())
                    && v["type"] != "reset"
                {
                    let offs = self.seen.entry(ch.to_string()).or_default();
                    assert!(
                        offs.last().is_none_or(|l| off > *l),
                        "{:?}: {ch} offset {off} after {offs:?}: duplicate or out of order",
                        self.t
                    );
                    offs.push(off);
                }
                got.push(v);
            }
        }
        later.append(&mut self.pending);
        self.pending = later;
        got
    }

    /// Whatever the transport delivers next (possibly nothing).
    fn next_batch(&mut self) -> Vec<Value> {
        if !self.pending.is_empty() {
            return std::mem::take(&mut self.pending);
        }
        match self.t {
            Transport::WebSocket => {
                let ws = self.ws.as_mut().unwrap();
                set_timeout(ws, Duration::from_millis(500));
                match ws.read() {
                    Ok(tungstenite::Message::Text(t)) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        assert_ne!(v["type"], "error", "{v}");
                        vec![v]
                    }
                    _ => vec![],
                }
            }
            Transport::Sse => {
                let sse = self.sse.as_ref().unwrap();
                let e = sse.next_event(Duration::from_secs(10));
                if let Some(id) = e.id {
                    self.cursor = Some(id);
                }
                vec![serde_json::from_str(&e.data).unwrap()]
            }
            Transport::LongPoll | Transport::ShortPoll => {
                let timeout = if self.t == Transport::LongPoll { 2 } else { 0 };
                let cursor = self
                    .cursor
                    .as_ref()
                    .map(|c| format!("&cursor={}", enc(c)))
                    .unwrap_or_default();
                let (st, body) = self.node.get(&format!(
                    "/poll?token={}&timeout={timeout}{cursor}{}",
                    token(&self.user),
                    self.channels_param()
                ));
                match st {
                    200 => {
                        let v: Value = serde_json::from_str(&body).unwrap();
                        self.cursor = Some(v["cursor"].as_str().unwrap().to_string());
                        v["messages"].as_array().unwrap().clone()
                    }
                    204 => {
                        if timeout == 0 {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        vec![]
                    }
                    other => panic!("{:?}: poll {other}: {body}", self.t),
                }
            }
        }
    }

    /// A client request the transport's way: a frame (answered on the socket) or `POST /send`.
    fn request(&mut self, req: Value, answer: &str) -> Value {
        match self.t {
            Transport::WebSocket => {
                let ws = self.ws.as_mut().unwrap();
                send_json(ws, req);
                if answer.is_empty() {
                    return Value::Null; // ack/read are silent on a WebSocket
                }
                set_timeout(ws, Duration::from_secs(5));
                loop {
                    let v = next_json(ws);
                    if v["type"] == answer {
                        return v;
                    }
                    assert_ne!(v["type"], "error", "{v}");
                    self.pending.push(v);
                }
            }
            _ => {
                let b = req.to_string();
                let (st, text) = http(
                    self.node.addr,
                    &format!(
                        "POST /send HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                        token(&self.user),
                        b.len()
                    ),
                );
                assert_eq!(st, 200, "{text}");
                serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap()
            }
        }
    }
}

/// One node, or two cluster nodes on one Redis (the sender on the first, bob on the second).
struct Setup {
    nodes: Vec<Node>,
    _redis: Option<RedisServer>,
}

impl Setup {
    fn new(cluster: bool) -> Setup {
        if !cluster {
            return Setup {
                nodes: vec![Node::start(&["--topic-history", "10"])],
                _redis: None,
            };
        }
        let redis = RedisServer::start();
        let nodes = ["ka", "kb"]
            .iter()
            .map(|id| {
                Node::start(&[
                    "--redis",
                    &redis.url(),
                    "--node-id",
                    id,
                    "--topic-history",
                    "10",
                ])
            })
            .collect();
        Setup {
            nodes,
            _redis: Some(redis),
        }
    }
    fn sender(&self) -> &Node {
        &self.nodes[0]
    }
    fn receiver(&self) -> &Node {
        self.nodes.last().unwrap()
    }
}

fn alice_send(alice: &mut Ws, conversation: &str, cid: &str) -> u64 {
    send_json(
        alice,
        json!({"type":"send","conversation":conversation,"client_id":cid,"body":cid}),
    );
    loop {
        let v = next_json(alice);
        if v["type"] == "sent" && v["client_id"] == cid {
            return v["offset"].as_u64().unwrap();
        }
    }
}

/// Offline flush, then live delivery, receipts (delivered and read reach the sender), dedupe of a retried send,
/// history, and resume from the cursor after a disconnect — one transport, one setup.
fn contract(t: Transport, cluster: bool) {
    let s = Setup::new(cluster);
    assert_eq!(s.sender().create_conversation("k", &["alice", "bob"]), 201);
    let mut alice = connect(s.sender(), "alice");
    eprintln!("{t:?} cluster={cluster}: step 1");
    // 1. Offline flush: bob has never connected.
    for i in 1..=3 {
        assert_eq!(alice_send(&mut alice, "k", &format!("off{i}")), i);
    }
    let mut bob = Client::open(s.receiver(), "bob", t, None);
    let flushed = bob.recv("message", 3);
    let offs: Vec<u64> = flushed
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offs, [1, 2, 3], "{t:?}: offline flush in order");
    eprintln!("{t:?} cluster={cluster}: step 2");
    // 2. Live delivery.
    std::thread::sleep(Duration::from_millis(300)); // presence reaches the cluster
    assert_eq!(alice_send(&mut alice, "k", "live"), 4);
    let live = bob.recv("message", 1);
    assert_eq!(
        (live[0]["offset"].as_u64(), live[0]["from"].as_str()),
        (Some(4), Some("alice"))
    );
    eprintln!("{t:?} cluster={cluster}: step 3");
    // 3. Receipts: bob acks and reads; alice hears both.
    bob.request(
        json!({"type":"ack","conversation":"k","offset":4}),
        if t == Transport::WebSocket { "" } else { "ok" },
    );
    bob.request(
        json!({"type":"read","conversation":"k","offset":4}),
        if t == Transport::WebSocket { "" } else { "ok" },
    );
    let mut states = Vec::new();
    while states.len() < 2 {
        let v = next_json(&mut alice);
        if v["type"] == "receipt" && v["offset"] == 4 {
            states.push(v["state"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(states, ["delivered", "read"], "{t:?}");
    eprintln!("{t:?} cluster={cluster}: step 4");
    // 4. Dedupe: bob sends, retries with the same client id: one message, one offset.
    let a = bob.request(
        json!({"type":"send","conversation":"k","client_id":"b1","body":"hi"}),
        "sent",
    );
    let b = bob.request(
        json!({"type":"send","conversation":"k","client_id":"b1","body":"hi"}),
        "sent",
    );
    assert_eq!(
        (a["offset"].as_u64(), b["offset"].as_u64()),
        (Some(5), Some(5)),
        "{t:?}"
    );
    // Bob's own message reaches his transport once.
    let own = bob.recv("message", 1);
    assert_eq!(own[0]["offset"], 5);
    eprintln!("{t:?} cluster={cluster}: step 5");
    // 5. History.
    let h = bob.request(
        json!({"type":"history","conversation":"k","limit":2}),
        "history",
    );
    let hoffs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(hoffs, [5, 4], "{t:?}: newest first");
    assert_eq!(h["more"], true);
    eprintln!("{t:?} cluster={cluster}: step 6");
    // 6. Resume from the cursor after a disconnect: what was sent meanwhile arrives once, in order.
    let seen_before = bob.seen.clone();
    let cursor_holder = Client {
        node: s.receiver(),
        user: "bob".into(),
        t,
        ws: None,
        sse: None,
        cursor: bob.cursor.clone(),
        seen: seen_before,
        pending: Vec::new(),
        topics: Vec::new(),
    };
    drop(bob);
    std::thread::sleep(Duration::from_millis(300));
    for i in 6..=8 {
        assert_eq!(alice_send(&mut alice, "k", &format!("gap{i}")), i);
    }
    let mut bob = Client::open(s.receiver(), "bob", t, Some(&cursor_holder));
    let missed = bob.recv("message", 3);
    let offs: Vec<u64> = missed
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offs, [6, 7, 8], "{t:?}: resume without gap or duplicate");
    assert_eq!(
        bob.seen["conversation:k"],
        (1..=8).collect::<Vec<u64>>(),
        "{t:?}: every message once, in order, across the reconnect"
    );
}

#[test]
fn contract_single_node_websocket() {
    contract(Transport::WebSocket, false);
}

#[test]
fn contract_single_node_sse() {
    contract(Transport::Sse, false);
}

#[test]
fn contract_single_node_long_poll() {
    contract(Transport::LongPoll, false);
}

#[test]
fn contract_single_node_short_poll() {
    contract(Transport::ShortPoll, false);
}

#[test]
fn contract_cluster_every_transport() {
    for t in ALL {
        contract(t, true);
    }
}

/// Multi-device (the transport beside a WebSocket of the same user: each gets every message once), a `reset`
/// for a cursor older than a topic's history, and token expiry.
fn contract_more(t: Transport, cluster: bool) {
    let s = Setup::new(cluster);
    assert_eq!(s.sender().create_conversation("m", &["alice", "bob"]), 201);
    let mut alice = connect(s.sender(), "alice");
    // Multi-device.
    let mut phone = Client::open(s.receiver(), "bob", Transport::WebSocket, None);
    let mut other = Client::open(s.receiver(), "bob", t, None);
    std::thread::sleep(Duration::from_millis(300));
    for i in 1..=3 {
        assert_eq!(alice_send(&mut alice, "m", &format!("md{i}")), i);
    }
    for c in [&mut phone, &mut other] {
        let got = c.recv("message", 3);
        let offs: Vec<u64> = got.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
        assert_eq!(
            offs,
            [1, 2, 3],
            "{:?}: every device gets each message once",
            c.t
        );
    }
    drop(other);
    // A cursor older than the topic's history: `reset`, then what is kept, in order.
    for i in 1..=300 {
        s.sender().publish("news:r", json!({ "i": i }));
    }
    let old = Client {
        node: s.receiver(),
        user: "bob".into(),
        t,
        ws: None,
        sse: None,
        cursor: Some("news:r=1".into()),
        seen: [("news:r".to_string(), vec![1])].into(),
        pending: Vec::new(),
        topics: vec!["news:r".into()],
    };
    let mut late = Client::open(s.receiver(), "bob", t, Some(&old));
    let reset = late.recv("reset", 1);
    let to = reset[0]["offset"].as_u64().unwrap();
    assert!(to > 1 && to < 300, "{t:?}: {reset:?}");
    // (The client's cursor names only the topic: the user's conversation may come along from where they
    // joined; only the topic's messages are counted here, every channel is checked for order and duplicates.)
    let mut rest = Vec::new();
    while rest.len() < (300 - to) as usize {
        rest.extend(
            late.recv("message", 1)
                .into_iter()
                .filter(|m| m["channel"] == "news:r"),
        );
    }
    assert_eq!(
        rest[0]["offset"].as_u64(),
        Some(to + 1),
        "{t:?}: right after the reset"
    );
    assert_eq!(rest.last().unwrap()["offset"], 300);
    drop(late);
    // Token expiry: a 2 s token ends the transport's session.
    let short = corelay::auth::mint(SECRET, "bob", Duration::from_secs(2)).unwrap();
    match t {
        Transport::WebSocket => {
            let url = format!("{}?token={short}", s.receiver().url("/ws"));
            let mut req = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", "corelay.v1".parse().unwrap());
            let (mut ws, _) = tungstenite::connect(req).unwrap();
            set_timeout(&mut ws, Duration::from_secs(6));
            let code = loop {
                match ws.read() {
                    Ok(tungstenite::Message::Close(f)) => break f.map(|f| u16::from(f.code)),
                    Ok(_) => continue,
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(code, Some(4001));
        }
        Transport::Sse => {
            let sse = Sse::open(s.receiver(), &format!("/sse?token={short}"), None);
            let deadline = Instant::now() + Duration::from_secs(6);
            loop {
                let e = sse.next_event(deadline.saturating_duration_since(Instant::now()));
                if e.event.as_deref() == Some("error") {
                    assert!(e.data.contains("token_expired"));
                    break;
                }
            }
        }
        Transport::LongPoll | Transport::ShortPoll => {
            std::thread::sleep(Duration::from_millis(3100));
            let (st, _) = s.receiver().get(&format!("/poll?token={short}&timeout=0"));
            assert_eq!(st, 401, "an expired token is refused");
        }
    }
}

#[test]
fn contract_more_single_node_every_transport() {
    for t in ALL {
        contract_more(t, false);
    }
}

#[test]
fn contract_more_cluster_every_transport() {
    for t in ALL {
        contract_more(t, true);
    }
}
