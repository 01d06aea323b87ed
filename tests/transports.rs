//! SSE (read by curl), long and short polling, the publish API, sends from one-way transports, and one cursor
//! model across all of them. Real sockets, the real binary.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

fn body_json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

#[test]
fn sse_replays_from_last_event_id_exactly_then_goes_live() {
    let node = Node::start(&[]);
    for i in 1..=10 {
        assert_eq!(node.publish("scores:m1", json!({"goal": i})), i);
    }
    let t = token("fan");
    let sse = Sse::open(
        &node,
        &format!("/sse?channels=scores:m1&token={t}"),
        Some("scores:m1=3"),
    );
    assert_eq!(sse.status(), 200);
    for want in 4..=10 {
        let e = sse.next_event(Duration::from_secs(5));
        assert_eq!(e.event.as_deref(), Some("message"));
        let m = body_json(&e.data);
        assert_eq!(m["offset"], want, "in order, no gap, no duplicate");
        assert_eq!(m["channel"], "scores:m1");
        assert_eq!(m["body"]["goal"], want);
        let id = e.id.unwrap();
        assert!(id.contains(&format!("scores:m1={want}")), "{id}");
        // The user's own channel gets its entry with its first message (until then a reconnect is
        // flushed the offline queue, as a new stream is).
        assert!(!id.contains("user:fan="), "{id}");
    }
    assert!(
        sse.quiet(Duration::from_millis(300)),
        "nothing beyond the replay"
    );
    node.publish("scores:m1", json!({"goal": 11}));
    let e = sse.next_event(Duration::from_secs(5));
    assert_eq!(body_json(&e.data)["offset"], 11);
    let last_id = e.id.unwrap();
    assert!(last_id.contains("scores:m1=11"));
    drop(sse);

    // Reconnect with the last id seen: only what came after.
    node.publish("scores:m1", json!({"goal": 12}));
    let sse = Sse::open(
        &node,
        &format!("/sse?channels=scores:m1&token={t}"),
        Some(&last_id),
    );
    assert_eq!(sse.status(), 200);
    assert_eq!(
        body_json(&sse.next_event(Duration::from_secs(5)).data)["offset"],
        12
    );
    assert!(sse.quiet(Duration::from_millis(300)));
}

#[test]
fn sse_keepalive_and_conversations_on_the_stream() {
    let node = Node::start(&["--heartbeat-interval", "200ms"]);
    node.create_conversation("c1", &["alice", "bob"]);
    let sse = Sse::open(&node, &format!("/sse?token={}", token("bob")), None);
    assert_eq!(sse.status(), 200);
    assert!(
        sse.comment(Duration::from_secs(3)),
        "a keep-alive comment within the interval"
    );
    // alice sends over POST /send (a one-way client is a full chat client); bob's stream gets it.
    let send =
        json!({"type":"send","conversation":"c1","client_id":"p1","body":"over http"}).to_string();
    let req = format!(
        "POST /send HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{send}",
        token("alice"),
        send.len()
    );
    let (st, text) = http(node.addr, &req);
    assert_eq!(st, 200, "{text}");
    let sent = body_json(&text[text.find("\r\n\r\n").unwrap() + 4..]);
    assert_eq!(
        (sent["type"].as_str(), sent["offset"].as_u64()),
        (Some("sent"), Some(1))
    );
    let e = sse.next_event(Duration::from_secs(5));
    let m = body_json(&e.data);
    assert_eq!(
        (m["from"].as_str(), m["body"].as_str()),
        (Some("alice"), Some("over http"))
    );
    assert!(e.id.unwrap().contains("conversation:c1=1"));
    // The retry is answered the same and not delivered again.
    let (st, text) = http(node.addr, &req);
    assert_eq!(st, 200);
    assert_eq!(
        body_json(&text[text.find("\r\n\r\n").unwrap() + 4..])["offset"],
        1
    );
    assert!(sse.quiet(Duration::from_millis(300)));
    // A non-member cannot send over HTTP either.
    let (st, _) = http(
        node.addr,
        &format!(
            "POST /send HTTP/1.1\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{send}",
            token("eve"),
            send.len()
        ),
    );
    assert_eq!(st, 403);
}

#[test]
fn long_poll_returns_early_on_publish_and_204_at_timeout() {
    let node = Node::start(&[]);
    let t = token("p");
    let (st, body) = node.get(&format!("/poll?channels=dash:cpu&timeout=0&token={t}"));
    assert_eq!(st, 200, "no cursor: start from now");
    let cur = body_json(&body)["cursor"].as_str().unwrap().to_string();
    assert_eq!(
        cur, "dash:cpu=0;user:p=0",
        "the user's own channel comes along"
    );

    let addr = node.addr;
    let path = format!(
        "/poll?channels=dash:cpu&cursor={}&timeout=10&token={t}",
        enc(&cur)
    );
    let start = Instant::now();
    let waiter = std::thread::spawn(move || {
        http(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    node.publish("dash:cpu", json!(0.93));
    let (st, text) = waiter.join().unwrap();
    let took = start.elapsed();
    assert_eq!(st, 200, "{text}");
    assert!(took < Duration::from_secs(5), "returned early: {took:?}");
    let v = body_json(&text[text.find("\r\n\r\n").unwrap() + 4..]);
    assert_eq!(v["messages"][0]["body"], 0.93);
    assert_eq!(v["cursor"], "dash:cpu=1;user:p=0");

    let start = Instant::now();
    let (st, _) = node.get(&format!(
        "/poll?channels=dash:cpu&cursor=dash:cpu=1&timeout=1&token={t}"
    ));
    assert_eq!(st, 204);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[test]
fn short_poll_answers_at_once_from_history() {
    let node = Node::start(&[]);
    let t = token("p");
    for i in 0..3 {
        node.publish("scores:m9", json!(i));
    }
    let (st, body) = node.get(&format!(
        "/poll?channels=scores:m9&cursor=scores:m9=1&timeout=0&token={t}"
    ));
    assert_eq!(st, 200);
    let v = body_json(&body);
    let offsets: Vec<u64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 3]);
    assert_eq!(v["cursor"], "scores:m9=3;user:p=0");
    let (st, _) = node.get(&format!(
        "/poll?channels=scores:m9&cursor=scores:m9=3&timeout=0&token={t}"
    ));
    assert_eq!(st, 204);
}

#[test]
fn bad_cursors_and_channels_get_400_with_a_reason() {
    let node = Node::start(&[]);
    node.create_conversation("c1", &["alice"]);
    let t = token("bob");
    for (path, want, reason) in [
        (
            format!("/poll?channels=nocolon&token={t}"),
            400,
            "unknown channel kind",
        ),
        (
            format!("/poll?channels=scores:a&cursor=%25%25%25garbage&token={t}"),
            400,
            "bad cursor",
        ),
        (
            format!("/poll?channels=scores:a&cursor=scores:a%3Dx&token={t}"),
            400,
            "not a number",
        ),
        (
            format!("/poll?channels=scores:a&timeout=soon&token={t}"),
            400,
            "timeout",
        ),
        (
            format!("/poll?channels=conversation:c1&token={t}"),
            403,
            "not a member",
        ),
        (
            format!("/poll?channels=user:alice&token={t}"),
            403,
            "another user",
        ),
        (
            format!("/sse?channels=bad%20name:x&token={t}"),
            400,
            "names are",
        ),
        ("/poll?channels=scores:a".to_string(), 401, "missing token"),
    ] {
        let (st, body) = node.get(&path);
        assert_eq!(st, want, "{path}: {body}");
        assert!(body.contains(reason), "{path}: {body}");
    }
    let sse = Sse::open(
        &node,
        &format!("/sse?channels=scores:a&token={t}"),
        Some("scores:a=;;==="),
    );
    assert_eq!(sse.status(), 400);
}

#[test]
fn a_client_switches_ws_to_sse_to_poll_with_exact_delivery() {
    let node = Node::start(&[]);
    let ch = "scores:final";
    let mut ws = connect(&node, "roamer");
    send_json(&mut ws, json!({"type":"subscribe","channels":[ch]}));
    assert_eq!(next_json(&mut ws)["type"], "subscribed");
    for i in 1..=10 {
        node.publish(ch, json!(i));
    }
    let mut cursor = BTreeMap::new();
    for want in 1..=10u64 {
        let m = next_json(&mut ws);
        assert_eq!(m["offset"], want);
        cursor.insert(m["channel"].as_str().unwrap().to_string(), want);
    }
    drop(ws);
    for i in 11..=15 {
        node.publish(ch, json!(i));
    }
    // SSE from the WebSocket cursor.
    let text = cursor
        .iter()
        .map(|(c, o)| format!("{c}={o}"))
        .collect::<Vec<_>>()
        .join(";");
    let sse = Sse::open(
        &node,
        &format!("/sse?channels={ch}&token={}", token("roamer")),
        Some(&text),
    );
    assert_eq!(sse.status(), 200);
    let mut last_id = String::new();
    for want in 11..=15 {
        let e = sse.next_event(Duration::from_secs(5));
        assert_eq!(body_json(&e.data)["offset"], want);
        last_id = e.id.unwrap();
    }
    assert!(sse.quiet(Duration::from_millis(300)));
    drop(sse);
    for i in 16..=18 {
        node.publish(ch, json!(i));
    }
    // A poll from the last SSE id (the same cursor text).
    let (st, body) = node.get(&format!(
        "/poll?channels={ch}&cursor={}&timeout=0&token={}",
        enc(&last_id),
        token("roamer")
    ));
    assert_eq!(st, 200, "{body}");
    let v = body_json(&body);
    let got: Vec<u64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["channel"] == ch)
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [16, 17, 18]);
    // And back to WebSocket with the poll's cursor: nothing is missing, nothing repeats.
    node.publish(ch, json!(19));
    let poll_cursor = v["cursor"].as_str().unwrap();
    let off: u64 = poll_cursor
        .split(';')
        .find_map(|p| p.strip_prefix(&format!("{ch}="))?.parse().ok())
        .unwrap();
    let mut ws = connect(&node, "roamer");
    send_json(
        &mut ws,
        json!({"type":"subscribe","channels":[ch],"cursor":{ch: off}}),
    );
    assert_eq!(next_json(&mut ws)["offset"], 19);
    assert_eq!(next_json(&mut ws)["type"], "subscribed");
}

#[test]
fn publish_to_5000_subscribers_reaches_each_exactly_once() {
    const N: usize = 5000;
    let node = Node::start(&[]);
    let ch = "live:big";
    let mut clients: Vec<Ws> = (0..N)
        .map(|i| {
            let mut ws = connect(&node, &format!("s{i}"));
            send_json(&mut ws, json!({"type":"subscribe","channels":[ch]}));
            ws
        })
        .collect();
    for c in clients.iter_mut() {
        assert_eq!(next_json(c)["type"], "subscribed");
    }
    let (_, metrics) = node.get("/metrics");
    let per_loop: Vec<i64> = metrics
        .lines()
        .filter(|l| l.starts_with("corelay_connections{") && l.contains("transport=\"websocket\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        per_loop.iter().all(|&n| n > 0),
        "subscribers on every loop: {per_loop:?}"
    );
    assert_eq!(per_loop.iter().sum::<i64>(), N as i64);
    node.publish(ch, json!("one"));
    node.publish(ch, json!("two"));
    for c in clients.iter_mut() {
        assert_eq!(next_json(c)["offset"], 1);
        assert_eq!(next_json(c)["offset"], 2, "exactly once, in order");
    }
}

#[test]
fn a_slow_consumer_is_cut_while_others_keep_receiving() {
    let node = Node::start(&["--max-write-queue-bytes", "256KiB"]);
    let ch = "firehose:x";
    // The slow one: a tiny receive buffer, and it never reads after subscribing.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&node.addr.into()).unwrap();
    let stream: std::net::TcpStream = sock.into();
    let url = format!("{}?token={}", node.url("/ws"), token("slow"));
    let (mut slow, _) = tungstenite::client(url, stream).unwrap();
    assert_eq!(next_json_plain(&mut slow)["type"], "welcome");
    slow.send(tungstenite::Message::text(
        json!({"type":"subscribe","channels":[ch]}).to_string(),
    ))
    .unwrap();
    assert_eq!(next_json_plain(&mut slow)["type"], "subscribed");
    let mut fast = connect(&node, "fast");
    send_json(&mut fast, json!({"type":"subscribe","channels":[ch]}));
    assert_eq!(next_json(&mut fast)["type"], "subscribed");

    let chunk = "x".repeat(32 * 1024);
    let total = 300u64; // ~9.6 MiB: more than the slow client's kernel buffers plus the 256 KiB cap
    let reader = std::thread::spawn(move || {
        let mut n = 0;
        while n < total {
            let m = next_json(&mut fast);
            n += 1;
            assert_eq!(m["offset"], n, "the fast client misses nothing");
        }
        n
    });
    for _ in 0..total {
        node.publish(ch, json!(chunk));
    }
    assert_eq!(reader.join().unwrap(), total);
    let cut = |node: &Node| {
        let (_, m) = node.get("/metrics");
        m.lines()
            .filter(|l| l.starts_with("corelay_slow_consumer_closes_total"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
    };
    assert!(
        wait_until(Duration::from_secs(5), || cut(&node) == 1),
        "the slow client was cut"
    );
    // The slow client, reading at last, finds the stream ends with 1013 (resume from your cursor).
    set_timeout_plain(&mut slow, Duration::from_secs(5));
    let mut code = None;
    while let Ok(m) = slow.read() {
        if let tungstenite::Message::Close(Some(f)) = m {
            code = Some(u16::from(f.code));
            break;
        }
    }
    assert!(code.is_none() || code == Some(1013), "{code:?}");
}

fn next_json_plain(ws: &mut tungstenite::WebSocket<std::net::TcpStream>) -> Value {
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    loop {
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            _ => continue,
        }
    }
}

fn set_timeout_plain(ws: &mut tungstenite::WebSocket<std::net::TcpStream>, t: Duration) {
    ws.get_mut().set_read_timeout(Some(t)).unwrap();
}

#[test]
fn browsers_get_cors_on_one_way_endpoints() {
    use std::io::Write;
    // Any origin (no --allowed-origin): `*`.
    let node = Node::start(&[]);
    let t = token("web");
    let (st, text) = http(
        node.addr,
        &format!(
            "GET /poll?channels=scores:c&timeout=0&token={t} HTTP/1.1\r\nOrigin: https://app.example\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(st, 200);
    assert!(
        text.contains("Access-Control-Allow-Origin: *\r\n"),
        "{text}"
    );
    let (st, text) = http(
        node.addr,
        "OPTIONS /send HTTP/1.1\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(st, 204, "{text}");
    assert!(
        text.contains("Access-Control-Allow-Methods: GET, POST, OPTIONS"),
        "{text}"
    );
    assert!(
        text.contains("Access-Control-Allow-Headers: Authorization, Content-Type"),
        "{text}"
    );

    // An allow-list: the allowed origin is named (and Vary: Origin); another one is refused.
    let node = Node::start(&["--allowed-origin", "https://app.example"]);
    let mut s = std::net::TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /sse?channels=scores:c&token={t} HTTP/1.1\r\nOrigin: https://app.example\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Type: text/event-stream"));
    assert!(
        head.contains("Access-Control-Allow-Origin: https://app.example\r\nVary: Origin"),
        "{head}"
    );
    let (st, _) = http(
        node.addr,
        &format!(
            "GET /sse?channels=scores:c&token={t} HTTP/1.1\r\nOrigin: https://evil.example\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(st, 403);
    let (st, _) = http(
        node.addr,
        "OPTIONS /send HTTP/1.1\r\nOrigin: https://evil.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(st, 403);
}
