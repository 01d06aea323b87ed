//! Single-node chat over real WebSockets, with tungstenite as the client.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

#[test]
fn two_users_three_connections_send_dedupe_and_receipts() {
    let node = Node::start(&[]);
    assert_eq!(node.create_conversation("c1", &["alice", "bob"]), 201);
    assert_eq!(node.create_conversation("c1", &["alice", "bob"]), 200);
    let mut alice = connect(&node, "alice");
    let mut bob1 = connect(&node, "bob");
    let mut bob2 = connect(&node, "bob");

    send_json(
        &mut alice,
        json!({"type":"send","conversation":"c1","client_id":"m1","body":{"text":"hi"}}),
    );
    // The sender gets `sent` and (as a member) the message itself; both of bob's devices get the message.
    let mut got_sent = None;
    let mut got_msg = None;
    for _ in 0..2 {
        let v = next_json(&mut alice);
        match v["type"].as_str().unwrap() {
            "sent" => got_sent = Some(v),
            "message" => got_msg = Some(v),
            t => panic!("unexpected {t}"),
        }
    }
    let sent = got_sent.unwrap();
    assert_eq!(sent["client_id"], "m1");
    assert_eq!(sent["offset"], 1);
    assert_eq!(got_msg.unwrap()["offset"], 1);
    for bob in [&mut bob1, &mut bob2] {
        let m = next_json(bob);
        assert_eq!(m["type"], "message");
        assert_eq!(m["channel"], "conversation:c1");
        assert_eq!(m["from"], "alice");
        assert_eq!(m["offset"], 1);
        assert_eq!(m["body"], json!({"text":"hi"}));
    }

    // A retry with the same client_id: the same `sent`, nothing delivered again.
    send_json(
        &mut alice,
        json!({"type":"send","conversation":"c1","client_id":"m1","body":{"text":"hi"}}),
    );
    let again = next_json(&mut alice);
    assert_eq!(again["type"], "sent");
    assert_eq!(again["offset"], 1);
    send_json(
        &mut alice,
        json!({"type":"send","conversation":"c1","client_id":"m2","body":"second"}),
    );
    for bob in [&mut bob1, &mut bob2] {
        let m = next_json(bob);
        assert_eq!(m["offset"], 2, "bob must not see the retried message twice");
        assert_eq!(m["body"], "second");
    }
    // alice: sent(2) and message(2), in either order.
    let mut types: Vec<String> = (0..2)
        .map(|_| next_json(&mut alice)["type"].as_str().unwrap().to_string())
        .collect();
    types.sort();
    assert_eq!(types, ["message", "sent"]);

    // Receipts: bob acks (delivered) then reads; alice hears both, from bob, never backwards.
    send_json(
        &mut bob1,
        json!({"type":"ack","conversation":"c1","offset":2}),
    );
    let r = next_json(&mut alice);
    assert_eq!(
        (r["type"].as_str(), r["state"].as_str()),
        (Some("receipt"), Some("delivered"))
    );
    assert_eq!(r["by"], "bob");
    assert_eq!(r["offset"], 2);
    send_json(
        &mut bob2,
        json!({"type":"read","conversation":"c1","offset":2}),
    );
    let r = next_json(&mut alice);
    assert_eq!(r["state"], "read");

    // History, newest first.
    send_json(
        &mut bob1,
        json!({"type":"history","conversation":"c1","limit":1}),
    );
    let h = next_json(&mut bob1);
    assert_eq!(h["type"], "history");
    assert_eq!(h["messages"][0]["offset"], 2);
    assert_eq!(h["more"], true);
}

#[test]
fn non_members_cannot_send_or_subscribe() {
    let node = Node::start(&[]);
    node.create_conversation("c1", &["alice", "bob"]);
    let mut eve = connect(&node, "eve");
    send_json(
        &mut eve,
        json!({"type":"send","conversation":"c1","client_id":"x1","body":"let me in"}),
    );
    let e = next_json(&mut eve);
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "not_member");
    assert_eq!(e["ref"], "x1");
    send_json(
        &mut eve,
        json!({"type":"subscribe","channels":["conversation:c1"]}),
    );
    assert_eq!(next_json(&mut eve)["code"], "not_member");
    let ack = next_json(&mut eve);
    assert_eq!(ack["type"], "subscribed");
    assert_eq!(ack["cursor"], json!({}), "nothing was subscribed");
    // A conversation that does not exist looks the same as one you are not in.
    send_json(
        &mut eve,
        json!({"type":"send","conversation":"nope","client_id":"x2","body":1}),
    );
    assert_eq!(next_json(&mut eve)["code"], "not_member");
}

#[test]
fn bad_requests_get_error_codes() {
    let node = Node::start(&["--max-body-bytes", "1KiB"]);
    node.create_conversation("c1", &["alice"]);
    let mut a = connect(&node, "alice");
    a.send(tungstenite::Message::text("{not json")).unwrap();
    assert_eq!(next_json(&mut a)["code"], "bad_json");
    send_json(&mut a, json!({"type":"dance"}));
    assert_eq!(next_json(&mut a)["code"], "unknown_type");
    send_json(
        &mut a,
        json!({"type":"send","conversation":"c1","client_id":"k"}),
    );
    assert_eq!(next_json(&mut a)["code"], "bad_request");
    send_json(
        &mut a,
        json!({"type":"send","conversation":"c1","client_id":"big","body":"x".repeat(2000)}),
    );
    let e = next_json(&mut a);
    assert_eq!(e["code"], "too_big");
    assert_eq!(e["ref"], "big");
    // The connection still works.
    send_json(
        &mut a,
        json!({"type":"send","conversation":"c1","client_id":"ok","body":1}),
    );
    let v = next_json(&mut a);
    assert!(v["type"] == "sent" || v["type"] == "message");
}

#[test]
fn a_thousand_connections_each_get_the_message() {
    const N: usize = 1000;
    let node = Node::start(&[]);
    let users: Vec<String> = (0..N).map(|i| format!("u{i}")).collect();
    let mut members: Vec<&str> = users.iter().map(String::as_str).collect();
    members.push("sender");
    assert_eq!(node.create_conversation("big", &members), 201);
    let mut clients: Vec<Ws> = users.iter().map(|u| connect(&node, u)).collect();
    let mut sender = connect(&node, "sender");
    send_json(
        &mut sender,
        json!({"type":"send","conversation":"big","client_id":"b1","body":"to all"}),
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let m = next_json(c);
        assert_eq!(m["body"], "to all", "client {i}");
        assert_eq!(m["offset"], 1);
    }
    // Exactly once: the next thing each sees is the second message.
    send_json(
        &mut sender,
        json!({"type":"send","conversation":"big","client_id":"b2","body":"again"}),
    );
    for c in clients.iter_mut() {
        set_timeout(c, Duration::from_secs(10));
        assert_eq!(next_json(c)["offset"], 2);
    }
}

#[test]
fn tokens_are_required_and_checked() {
    let node = Node::start(&[]);
    let up = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let (st, body) = http(
        node.addr,
        &format!("GET /ws HTTP/1.1\r\nHost: t\r\n{up}\r\n"),
    );
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("missing token"));
    let forged = corelay::auth::mint("wrong-secret", "alice", Duration::from_secs(60)).unwrap();
    let (st, _) = http(
        node.addr,
        &format!("GET /ws?token={forged} HTTP/1.1\r\nHost: t\r\n{up}\r\n"),
    );
    assert_eq!(st, 401);
    let (st, _) = http(
        node.addr,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n{up}\r\n",
            token("alice")
        ),
    );
    assert_eq!(st, 101);
    // The internal API wants its key.
    let (st, _) = http(
        node.addr,
        "POST /api/conversations HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert_eq!(st, 401);
}

#[test]
fn a_client_past_its_rate_is_served_later_never_refused() {
    // 5/s with a burst of 5: 15 requests at once are all answered, the last ten paced by the limit
    // (the flood and outbox cases are in tests/trust.rs).
    let node = Node::start(&["--client-rate", "5", "--client-burst", "5"]);
    node.create_conversation("c1", &["alice"]);
    let mut a = connect(&node, "alice");
    let started = std::time::Instant::now();
    for _ in 0..15 {
        send_json(&mut a, json!({"type":"history","conversation":"c1"}));
    }
    for i in 0..15 {
        let v = next_json(&mut a);
        assert_eq!(v["type"], "history", "answer {i}: {v}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "ten beyond the burst at 5/s take about 2 s: {:?}",
        started.elapsed()
    );
}

/// A client that resumes at connect (`/ws?cursor=`) while its offline queue also holds some of what it missed
/// gets every missed message once, in offset order, then `subscribed`, then live traffic. (Found by the seeded
/// simulation: the offline flush used to overtake the replay, so offsets arrived out of order.)
#[test]
fn a_resume_at_connect_gets_what_it_missed_once_in_order() {
    let node = Node::start(&[]);
    assert_eq!(node.create_conversation("r1", &["alice", "bob"]), 201);
    let mut alice = connect(&node, "alice");
    let send = |ws: &mut Ws, cid: &str| {
        send_json(
            ws,
            json!({"type": "send", "conversation": "r1", "client_id": cid, "body": cid}),
        );
        loop {
            let v = next_json(ws);
            if v["type"] == "sent" {
                return v["offset"].as_u64().unwrap();
            }
        }
    };
    // Bob online for 1..=3 (not queued offline), offline for 4..=6 (queued).
    let mut bob = connect(&node, "bob");
    for i in 1..=3 {
        assert_eq!(send(&mut alice, &format!("m{i}")), i);
    }
    for i in 1..=3 {
        assert_eq!(next_json(&mut bob)["offset"], i);
    }
    drop(bob);
    let websockets = || {
        let (_, m) = node.get("/metrics");
        m.lines()
            .filter(|l| l.starts_with("corelay_connections{") && l.contains("\"websocket\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert!(wait_until(Duration::from_secs(5), || websockets() == 1));
    for i in 4..=6 {
        assert_eq!(send(&mut alice, &format!("m{i}")), i);
    }
    // Another device of bob's saw only offset 1.
    let mut bob = connect_query(
        &node,
        "bob",
        &format!("&cursor={}", enc("conversation:r1=1")),
    );
    let mut got = Vec::new();
    loop {
        let v = next_json(&mut bob);
        match v["type"].as_str() {
            Some("message") => got.push(v["offset"].as_u64().unwrap()),
            Some("subscribed") => break,
            other => panic!("unexpected {other:?}: {v}"),
        }
    }
    assert_eq!(
        got,
        vec![2, 3, 4, 5, 6],
        "each missed message once, in order"
    );
    assert_eq!(send(&mut alice, "m7"), 7);
    assert_eq!(next_json(&mut bob)["offset"], 7);
    // A cursor that does not parse is refused before the upgrade.
    let mut s = std::net::TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let path = format!("/ws?token={}&cursor=nonsense", token("bob"));
    std::io::Write::write_all(
        &mut s,
        format!(
            "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: corelay.v1\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

/// An SSE stream resuming from far behind (a replay of several pages) for a user whose offline queue holds the
/// later messages but not a few in between (they went live to another device): every message arrives, once,
/// in order. (Found by the seeded simulation: the flush's newer messages moved the stream's cursor past the
/// next replay page, so the loop dropped that page's messages: they were lost to the stream.)
#[test]
fn an_sse_resume_over_several_pages_loses_nothing_the_flush_skipped() {
    let node = Node::start(&["--client-rate", "100000", "--client-burst", "100000"]);
    assert_eq!(node.create_conversation("s1", &["alice", "bob"]), 201);
    let mut alice = connect(&node, "alice");
    let mut send_all = |range: std::ops::RangeInclusive<u64>| {
        for i in range.clone() {
            send_json(
                &mut alice,
                json!({"type": "send", "conversation": "s1", "client_id": format!("m{i}"), "body": i}),
            );
        }
        let mut last = 0;
        while last < *range.end() {
            let v = next_json(&mut alice);
            if v["type"] == "sent" {
                last = v["offset"].as_u64().unwrap();
            }
        }
    };
    // 1..=1000 while bob is away (queued), 1001..=1010 while one of his devices is online (not queued),
    // 1011..=1100 away again (queued). A replay page holds at most 1,000 messages.
    send_all(1..=1000);
    let mut phone = connect(&node, "bob");
    send_all(1001..=1010);
    let mut seen = 0;
    while seen < 1010 {
        let v = next_json(&mut phone);
        if v["type"] == "message" {
            seen = v["offset"].as_u64().unwrap();
        }
    }
    drop(phone);
    let websockets = || {
        let (_, m) = node.get("/metrics");
        m.lines()
            .filter(|l| l.starts_with("corelay_connections{") && l.contains("\"websocket\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert!(wait_until(Duration::from_secs(5), || websockets() == 1));
    send_all(1011..=1100);
    // Bob's laptop resumes from the start over SSE.
    let path = format!("/sse?token={}", token("bob"));
    let sse = Sse::open(&node, &path, Some("conversation:s1=0"));
    assert_eq!(sse.status(), 200);
    let mut got = Vec::new();
    while got.len() < 1100 {
        let e = sse.next_event(Duration::from_secs(10));
        if e.event.as_deref() == Some("message") {
            let v: serde_json::Value = serde_json::from_str(&e.data).unwrap();
            got.push(v["offset"].as_u64().unwrap());
        }
        if got.last() == Some(&1100) {
            break;
        }
    }
    let want: Vec<u64> = (1..=1100).collect();
    let missing: Vec<u64> = want.iter().filter(|o| !got.contains(o)).copied().collect();
    assert!(missing.is_empty(), "lost to the stream: {missing:?}");
    assert_eq!(got, want, "each once, in order");
}

#[test]
fn application_level_ping_is_answered_on_every_transport() {
    let node = Node::start(&["--heartbeat-interval", "7s", "--heartbeat-timeout", "3s"]);
    // The welcome announces the liveness contract the SDK checks against.
    let url = format!("{}?token={}", node.url("/ws"), token("pat"));
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "corelay.v1".parse().unwrap());
    let (mut ws, _) = tungstenite::connect(req).unwrap();
    set_timeout(&mut ws, Duration::from_secs(5));
    let w = next_json(&mut ws);
    assert_eq!(
        (w["heartbeat_s"].as_u64(), w["heartbeat_timeout_s"].as_u64()),
        (Some(7), Some(3))
    );
    send_json(&mut ws, json!({"type":"ping","id":"p1"}));
    assert_eq!(next_json(&mut ws), json!({"type":"pong","id":"p1"}));
    send_json(&mut ws, json!({"type":"ping"}));
    assert_eq!(next_json(&mut ws), json!({"type":"pong"}));
    // Over POST /send (a client on SSE or polls).
    let body = r#"{"type":"ping","id":"p2"}"#;
    let (status, text) = http(
        node.addr,
        &format!(
            "POST /send?token={} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            token("pat"),
            body.len()
        ),
    );
    assert_eq!(status, 200, "{text}");
    let answer: serde_json::Value =
        serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(answer, json!({"type":"pong","id":"p2"}));
}
