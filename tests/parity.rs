//! Every transport is a whole chat client: a first SSE stream or poll gets the offline queue as a WebSocket
//! does, polls carry the user's channels without listing them, and the one-way transports ack, read, page
//! history, subscribe and refresh over `POST /send` (real sockets: curl for SSE, raw HTTP for the rest).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// `POST /send` as `user` with a JSON body: (status, body JSON).
fn post_send(node: &Node, user: &str, body: Value) -> (u16, Value) {
    let b = body.to_string();
    let (st, text) = http(
        node.addr,
        &format!(
            "POST /send HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            token(user),
            b.len()
        ),
    );
    let json = text
        .find("\r\n\r\n")
        .and_then(|i| serde_json::from_str(&text[i + 4..]).ok())
        .unwrap_or(Value::Null);
    (st, json)
}

/// Alice sends `n` messages to `conversation` over a WebSocket and waits for each `sent`.
fn alice_sends(node: &Node, conversation: &str, n: usize) -> Ws {
    let mut alice = connect(node, "alice");
    for i in 0..n {
        send_json(
            &mut alice,
            json!({"type":"send","conversation":conversation,"client_id":format!("a{i}"),"body":format!("m{i}")}),
        );
        loop {
            let v = next_json(&mut alice);
            if v["type"] == "sent" {
                break;
            }
        }
    }
    alice
}

fn poll(node: &Node, user: &str, query: &str) -> (u16, Value) {
    let (st, body) = node.get(&format!("/poll?token={}&{query}", token(user)));
    (st, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[test]
fn a_first_sse_stream_starts_with_the_offline_queue_in_order_then_live() {
    let node = Node::start(&[]);
    node.create_conversation("c9", &["alice", "bob"]);
    let mut alice = alice_sends(&node, "c9", 3);
    // Bob has never connected; his first connection is an SSE stream without Last-Event-ID.
    let sse = Sse::open(&node, &format!("/sse?token={}", token("bob")), None);
    assert_eq!(sse.status(), 200);
    let first = sse.next_raw_event(Duration::from_secs(5));
    assert_eq!(first.event.as_deref(), Some("stream"), "{first:?}");
    let id: Value = serde_json::from_str(&first.data).unwrap();
    assert!(id["id"].as_str().is_some());
    for want in 1..=3u64 {
        let ev = sse.next_event(Duration::from_secs(5));
        let m: Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(
            (m["channel"].as_str(), m["offset"].as_u64()),
            (Some("conversation:c9"), Some(want)),
            "{m}"
        );
    }
    send_json(
        &mut alice,
        json!({"type":"send","conversation":"c9","client_id":"live","body":"live"}),
    );
    let ev = sse.next_event(Duration::from_secs(5));
    let m: Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(m["offset"], 4, "then live, once");
    assert!(ev.id.unwrap().contains("conversation:c9=4"));
}

#[test]
fn a_first_poll_without_channels_or_cursor_gets_what_the_user_missed_and_an_ack_ends_it() {
    let node = Node::start(&[]);
    node.create_conversation("c7", &["alice", "carol"]);
    let _alice = alice_sends(&node, "c7", 2);
    let (st, v) = poll(&node, "carol", "timeout=0");
    assert_eq!(st, 200, "{v}");
    let offsets: Vec<u64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [1, 2], "{v}");
    let cursor = v["cursor"].as_str().unwrap().to_string();
    assert!(
        cursor.contains("conversation:c7=2") && cursor.contains("user:carol"),
        "{cursor}"
    );
    // Continuing from the cursor: nothing new.
    let (st, _) = poll(
        &node,
        "carol",
        &format!("cursor={}&timeout=0", enc(&cursor)),
    );
    assert_eq!(st, 204);
    // Without the ack a new poll client of carol's gets the flush again; after it, never again.
    let (_, again) = poll(&node, "carol", "timeout=0");
    assert_eq!(again["messages"].as_array().unwrap().len(), 2);
    let (st, ok) = post_send(
        &node,
        "carol",
        json!({"type":"ack","conversation":"c7","offset":2}),
    );
    assert_eq!((st, ok["type"].as_str()), (200, Some("ok")), "{ok}");
    let (st, v) = poll(&node, "carol", "timeout=0");
    assert_eq!(st, 200);
    assert!(v["messages"].as_array().unwrap().is_empty(), "{v}");
}

#[test]
fn one_way_clients_ack_read_and_page_history_over_post_send() {
    let node = Node::start(&[]);
    node.create_conversation("c5", &["alice", "dave"]);
    let mut alice = alice_sends(&node, "c5", 3);
    let (st, v) = post_send(
        &node,
        "dave",
        json!({"type":"ack","conversation":"c5","offset":2}),
    );
    assert_eq!(st, 200, "{v}");
    let (st, v) = post_send(
        &node,
        "dave",
        json!({"type":"read","conversation":"c5","offset":3}),
    );
    assert_eq!((st, v["state"].as_str()), (200, Some("read")), "{v}");
    // The sender hears about both, on her WebSocket.
    let mut states = Vec::new();
    while states.len() < 3 {
        let r = next_json(&mut alice);
        if r["type"] == "receipt" {
            states.push((
                r["state"].as_str().unwrap().to_string(),
                r["offset"].as_u64().unwrap(),
            ));
        }
    }
    assert!(states.contains(&("delivered".into(), 2)), "{states:?}");
    assert!(states.contains(&("read".into(), 3)), "{states:?}");
    let (st, h) = post_send(
        &node,
        "dave",
        json!({"type":"history","conversation":"c5","limit":2}),
    );
    assert_eq!(st, 200, "{h}");
    assert_eq!(h["messages"].as_array().unwrap().len(), 2);
    assert_eq!(h["more"], true);
    let (st, _) = post_send(&node, "eve", json!({"type":"history","conversation":"c5"}));
    assert_eq!(st, 403, "not a member");
}

#[test]
fn an_sse_stream_subscribes_and_refreshes_by_its_stream_id() {
    let node = Node::start(&[]);
    let short = corelay::auth::mint(SECRET, "erin", Duration::from_secs(2)).unwrap();
    let sse = Sse::open(&node, &format!("/sse?token={short}"), None);
    assert_eq!(sse.status(), 200);
    let first = sse.next_raw_event(Duration::from_secs(5));
    let id = serde_json::from_str::<Value>(&first.data).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Another user cannot touch erin's stream.
    let (st, _) = post_send(
        &node,
        "mallory",
        json!({"type":"subscribe","stream":id,"channels":["scores:x"]}),
    );
    assert_eq!(st, 404);
    let (st, v) = post_send(
        &node,
        "erin",
        json!({"type":"subscribe","stream":id,"channels":["scores:x"]}),
    );
    assert_eq!((st, v["type"].as_str()), (200, Some("subscribed")), "{v}");
    node.publish("scores:x", json!({"goal": 1}));
    let ev = sse.next_event(Duration::from_secs(5));
    assert!(ev.data.contains("\"goal\":1"), "{ev:?}");
    // Refresh before the 2 s token lapses: the stream outlives it.
    let (st, v) = post_send(
        &node,
        "erin",
        json!({"type":"refresh","stream":id,"token":token("erin")}),
    );
    assert_eq!((st, v["type"].as_str()), (200, Some("refreshed")), "{v}");
    std::thread::sleep(Duration::from_millis(3200));
    let (st, _) = post_send(
        &node,
        "erin",
        json!({"type":"unsubscribe","stream":id,"channels":["scores:x"]}),
    );
    assert_eq!(st, 200);
    node.publish("scores:x", json!({"goal": 2}));
    node.publish("scores:y", json!({"other": 1}));
    assert!(sse.quiet(Duration::from_millis(600)), "unsubscribed");
    // Still open past the first token's expiry: a new subscription is served on it.
    let (st, _) = post_send(
        &node,
        "erin",
        json!({"type":"subscribe","stream":id,"channels":["scores:z"]}),
    );
    assert_eq!(st, 200);
    node.publish("scores:z", json!({"late": 1}));
    let ev = sse.next_event(Duration::from_secs(5));
    assert!(ev.data.contains("\"late\":1"), "{ev:?}");
}

#[test]
fn a_conversation_joined_mid_session_arrives_on_polls_and_streams_from_the_join() {
    let node = Node::start(&[]);
    // Frank polls (first poll: where he stands) and streams, before he is in any conversation.
    let (st, first) = poll(&node, "frank", "timeout=0");
    assert_eq!(st, 200);
    let cursor = first["cursor"].as_str().unwrap().to_string();
    assert!(!cursor.contains("conversation:"), "{cursor}");
    let sse = Sse::open(&node, &format!("/sse?token={}", token("frank")), None);
    assert_eq!(sse.status(), 200);
    // Then he is added to a conversation, and a message is sent in it.
    node.create_conversation("late", &["alice", "frank"]);
    let _alice = alice_sends(&node, "late", 1);
    // The poll that continues his session gets it (from where he joined), once.
    let (st, v) = poll(
        &node,
        "frank",
        &format!("cursor={}&timeout=0", enc(&cursor)),
    );
    assert_eq!(st, 200, "{v}");
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "{v}");
    assert_eq!(msgs[0]["channel"], "conversation:late");
    let next = v["cursor"].as_str().unwrap().to_string();
    assert!(next.contains("conversation:late=1"), "{next}");
    let (st, _) = poll(&node, "frank", &format!("cursor={}&timeout=0", enc(&next)));
    assert_eq!(st, 204, "nothing twice");
    // The stream gets it live.
    let ev = sse.next_event(Duration::from_secs(5));
    let m: Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(
        (m["channel"].as_str(), m["offset"].as_u64()),
        (Some("conversation:late"), Some(1))
    );
}

#[test]
fn devices_are_registered_and_unregistered_over_post_send_and_websocket() {
    let dir = fresh_dir();
    let mut node = Node::start_in(&dir, &[]);
    let (st, v) = post_send(
        &node,
        "gina",
        json!({"type":"register_device","platform":"apns","token":"a1b2c3"}),
    );
    assert_eq!(
        (st, v["op"].as_str()),
        (200, Some("register_device")),
        "{v}"
    );
    let (st, _) = post_send(
        &node,
        "gina",
        json!({"type":"register_device","platform":"pager","token":"x"}),
    );
    assert_eq!(st, 400, "unknown platform");
    let mut ws = connect(&node, "gina");
    send_json(
        &mut ws,
        json!({"type":"register_device","platform":"fcm","token":"f-9"}),
    );
    assert_eq!(next_json(&mut ws)["op"], "register_device");
    send_json(
        &mut ws,
        json!({"type":"unregister_device","platform":"apns","token":"a1b2c3"}),
    );
    assert_eq!(next_json(&mut ws)["op"], "unregister_device");
    drop(ws);
    node.kill9();
    // What the store holds, read with the store itself.
    let mut store =
        corelay::store::embedded::Embedded::open(&dir, corelay::store::embedded::Fsync::Always)
            .unwrap();
    let devs = corelay::store::Store::devices(&mut store, "gina").unwrap();
    assert_eq!(devs, [("fcm".to_string(), "f-9".to_string())]);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
