//! The trust promise over the real binary: nothing acknowledged is lost, nothing is delivered twice, and a
//! client doing what the protocol asks (resending its outbox at once) is slowed down, never refused.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// Sends `n` messages back to back (no waiting between them) and reads answers until `n` `sent` arrived.
/// Panics on any error answer or close. Returns the offsets in client-id order.
fn send_all_at_once(ws: &mut Ws, conversation: &str, prefix: &str, n: usize) -> Vec<u64> {
    for i in 0..n {
        let cid = format!("{prefix}{i}");
        ws.write(tungstenite::Message::text(
            json!({"type":"send","conversation":conversation,"client_id":cid,"body":{"cid":cid}})
                .to_string(),
        ))
        .unwrap();
    }
    ws.flush().unwrap();
    let mut offsets = vec![0u64; n];
    let mut got = 0;
    while got < n {
        let v = match ws.read() {
            Ok(tungstenite::Message::Text(t)) => serde_json::from_str::<Value>(&t).unwrap(),
            Ok(tungstenite::Message::Ping(_)) | Ok(tungstenite::Message::Pong(_)) => continue,
            other => panic!("after {got} sent answers: {other:?}"),
        };
        match v["type"].as_str() {
            Some("sent") => {
                let cid = v["client_id"].as_str().unwrap();
                let i: usize = cid[prefix.len()..].parse().unwrap();
                assert_eq!(offsets[i], 0, "two `sent` answers for {cid}");
                offsets[i] = v["offset"].as_u64().unwrap();
                got += 1;
            }
            Some("message") | Some("receipt") => {}
            _ => panic!("after {got} sent answers, an unexpected answer: {v}"),
        }
    }
    offsets
}

#[test]
fn a_client_resending_1000_messages_at_once_gets_1000_sent_in_order_and_stays_connected() {
    // Default limits (100 requests/s, burst 200): the last 800 are slowed down by TCP, not refused.
    let node = Node::start(&[]);
    node.create_conversation("outbox", &["alice", "bob"]);
    let mut alice = connect(&node, "alice");
    set_timeout(&mut alice, Duration::from_secs(30));
    let started = Instant::now();
    let offsets = send_all_at_once(&mut alice, "outbox", "m", 1000);
    let took = started.elapsed();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "offsets follow the order of the sends"
    );
    // The connection is still open and usable.
    send_json(
        &mut alice,
        json!({"type":"send","conversation":"outbox","client_id":"after","body":"still here"}),
    );
    loop {
        let v = next_json(&mut alice);
        if v["type"] == "sent" {
            assert_eq!(v["client_id"], "after");
            break;
        }
    }
    let h = history(&node, "outbox");
    assert_eq!(h.len(), 1001, "each send stored exactly once");
    let distinct: HashSet<String> = h.iter().map(|m| m["body"].to_string()).collect();
    assert_eq!(distinct.len(), 1001);
    // 800 beyond the burst at 100/s: about 8 s. The limiter did slow it down (it is a limiter).
    assert!(
        took >= Duration::from_secs(6),
        "the rate limit was not applied: {took:?}"
    );
    let metrics = node.get("/metrics").1;
    assert!(
        metrics.contains("corelay_rate_limited_total"),
        "pauses are counted"
    );
}

#[test]
fn a_flooding_client_is_slowed_down_while_another_client_is_served() {
    let node = Node::start(&["--client-rate", "50", "--client-burst", "10"]);
    node.create_conversation("flood", &["mallory", "bob"]);
    node.create_conversation("calm", &["alice", "bob"]);
    // Mallory writes 2,000 sends as fast as TCP lets her, from her own thread.
    let mut mallory = connect(&node, "mallory");
    let flooder = std::thread::spawn(move || {
        for i in 0..2000 {
            let f = json!({"type":"send","conversation":"flood","client_id":format!("f{i}"),"body":"x"});
            if mallory
                .write(tungstenite::Message::text(f.to_string()))
                .is_err()
            {
                return;
            }
        }
        let _ = mallory.flush();
        // Hold the connection open (unread answers pile up in the kernel; that is her problem).
        std::thread::sleep(Duration::from_secs(3));
    });
    std::thread::sleep(Duration::from_millis(300));
    // Alice is not affected: her sends are answered at once, every time.
    let mut alice = connect(&node, "alice");
    for i in 0..5 {
        let started = Instant::now();
        send_json(
            &mut alice,
            json!({"type":"send","conversation":"calm","client_id":format!("a{i}"),"body":"hi"}),
        );
        loop {
            let v = next_json(&mut alice);
            if v["type"] == "sent" {
                break;
            }
            assert_ne!(v["type"], "error", "{v}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "alice waited {:?} behind mallory",
            started.elapsed()
        );
    }
    flooder.join().unwrap();
    // Mallory's flood was taken at her rate: far from all 2,000 within ~4 s at 50/s.
    let stored = history(&node, "flood").len();
    assert!(
        (10..=10 + 50 * 6).contains(&stored),
        "flood stored {stored}"
    );
}

#[test]
fn interval_fsync_makes_a_burst_durable_within_the_interval_without_a_later_commit() {
    let dir = fresh_dir();
    let flags = ["--fsync", "200ms"];
    let mut node = Node::start_in(&dir, &flags);
    node.create_conversation("quiet", &["alice", "bob"]);
    let mut alice = connect(&node, "alice");
    let offsets = send_all_at_once(&mut alice, "quiet", "q", 50);
    assert_eq!(offsets.len(), 50);
    // Silence: no later commit will come to carry the fsync. The timer must.
    std::thread::sleep(Duration::from_millis(1200));
    node.kill9();
    let node = Node::start_in(&dir, &flags);
    let h = history(&node, "quiet");
    let cids: Vec<&str> = h
        .iter()
        .map(|m| m["body"]["cid"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..50).map(|i| format!("q{i}")).collect();
    assert_eq!(
        cids, want,
        "acknowledged messages older than the interval survive kill -9"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts the binary with `args` and returns (exit status, stderr) if it exits within `within`.
fn run_expecting_exit(
    args: &[&str],
    env: &[(&str, &str)],
    within: Duration,
    poke: impl FnOnce(&mut std::process::Child),
) -> (Option<std::process::ExitStatus>, String) {
    let dir = fresh_dir();
    let err = dir.with_extension("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_corelay"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "2",
            "--no-pin",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--auth-secret", SECRET, "--api-key", API_KEY])
        .args(args)
        .envs(env.iter().copied())
        .env("CORELAY_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    poke(&mut child);
    let deadline = Instant::now() + within;
    let mut status = None;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&err);
    (status, text)
}

#[test]
fn three_nodes_started_with_only_redis_and_distinct_ports_deliver_across_nodes() {
    let redis = RedisServer::start();
    let nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&["--redis", &redis.url(), "--presence-ttl", "3s"]))
        .collect();
    assert_eq!(
        nodes[0].create_conversation("c3", &["alice", "bob", "carol"]),
        201
    );
    let mut alice = connect(&nodes[0], "alice");
    let mut bob = connect(&nodes[1], "bob");
    let mut carol = connect(&nodes[2], "carol");
    // Distinct default ids (host name + port), announced in `welcome`'s node.
    std::thread::sleep(Duration::from_millis(500));
    send_json(
        &mut alice,
        json!({"type":"send","conversation":"c3","client_id":"x1","body":"hello"}),
    );
    for ws in [&mut bob, &mut carol] {
        loop {
            let v = next_json(ws);
            assert_ne!(v["type"], "error", "{v}");
            if v["type"] == "message" {
                assert_eq!(
                    (v["offset"].as_u64(), v["from"].as_str()),
                    (Some(1), Some("alice"))
                );
                break;
            }
        }
    }
}

#[test]
fn a_second_live_node_with_the_same_id_refuses_to_start_and_a_dead_ones_id_is_taken_over() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut first = Node::start(&["--redis", &url, "--node-id", "twin"]);
    let (status, err) = run_expecting_exit(
        &["--redis", &url, "--node-id", "twin"],
        &[],
        Duration::from_secs(20),
        |_| {},
    );
    let status = status.expect("the second node must exit, not run beside the first");
    assert!(!status.success(), "exit status {status:?}");
    assert!(
        err.contains("\"twin\" is already held by a live node"),
        "clear error: {err}"
    );
    // The first node is unaffected.
    assert_eq!(first.create_conversation("still", &["a", "b"]), 201);
    // kill -9: its lease expires within one TTL and a restarted node takes the id over.
    first.kill9();
    let started = Instant::now();
    let again = Node::start(&["--redis", &url, "--node-id", "twin"]);
    assert!(
        started.elapsed() < Duration::from_secs(16),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(again.create_conversation("again", &["a", "b"]), 201);
}

#[cfg(debug_assertions)]
#[test]
fn a_panicking_loop_ends_the_process_at_once_with_a_non_zero_status() {
    let (status, err) = run_expecting_exit(
        &[],
        &[("CORELAY_FAILPOINT_LOOP_PANIC", "1")],
        Duration::from_secs(10),
        |child| {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let addr = line.split_whitespace().nth(3).unwrap().to_string();
            let _ = std::net::TcpStream::connect(addr);
        },
    );
    let status = status.expect("the process must exit after a loop panicked");
    assert_eq!(status.code(), Some(70), "{err}");
    assert!(
        err.contains("exiting so that a supervisor restarts"),
        "{err}"
    );
}

/// One command to a Redis server over its own connection.
fn redis_cmd(redis: &RedisServer, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut c).unwrap()
}

#[test]
fn a_cluster_topic_poll_behind_a_trimmed_stream_answers_reset_not_a_silent_skip() {
    let redis = RedisServer::start();
    let node = Node::start(&["--redis", &redis.url(), "--topic-history", "10"]);
    for i in 0..400 {
        node.publish("scores:trim", json!({"i": i}));
    }
    // The stream keeps about the last 10 (MAXLEN ~ trims whole stream nodes): offset 2 is long gone.
    let (st, body) = node.get(&format!(
        "/poll?channels=scores:trim&cursor=scores:trim%3D1&timeout=0&token={}",
        token("dave")
    ));
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let first = &v["messages"][0];
    assert_eq!(first["type"], "reset", "{body}");
    let to = first["offset"].as_u64().unwrap();
    assert!(to > 1 && to < 400, "{first}");
    assert_eq!(
        v["messages"][1]["offset"].as_u64(),
        Some(to + 1),
        "then the rest, in order"
    );
}

#[test]
fn a_node_cut_off_from_the_bus_while_a_topic_was_trimmed_resets_and_keeps_flowing() {
    let redis = RedisServer::start();
    let flags = |id: &'static str| {
        vec![
            "--redis".to_string(),
            redis.url(),
            "--node-id".into(),
            id.into(),
            "--topic-history".into(),
            "10".into(),
        ]
    };
    let a_flags = flags("cut-a");
    let b_flags = flags("cut-b");
    let a = Node::start(&a_flags.iter().map(String::as_str).collect::<Vec<_>>());
    let b = Node::start(&b_flags.iter().map(String::as_str).collect::<Vec<_>>());
    let mut viewer = connect(&b, "viewer");
    send_json(
        &mut viewer,
        json!({"type":"subscribe","channels":["scores:cut"]}),
    );
    loop {
        if next_json(&mut viewer)["type"] == "subscribed" {
            break;
        }
    }
    assert!(wait_until(Duration::from_secs(10), || b
        .get("/metrics")
        .1
        .contains("corelay_bus_channels 3")
        || b.get("/metrics").1.contains("corelay_bus_channels 2")));
    assert_eq!(a.publish("scores:cut", json!({"i": 0})), 1);
    assert_eq!(next_json(&mut viewer)["offset"], 1);
    // Cut B off: Redis drops a pub/sub client whose output buffer passes 1 KiB, and B is stopped so it cannot
    // read. Meanwhile the stream is trimmed far past what B has seen.
    redis_cmd(
        &redis,
        &[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 1024 1024 1",
        ],
    );
    let pid = b.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    for i in 1..400 {
        a.publish("scores:cut", json!({"i": i, "pad": "x".repeat(64)}));
    }
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    redis_cmd(
        &redis,
        &[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 32mb 8mb 60",
        ],
    );
    // B reconnects, fills from the store, finds the gap gone from the stream: a reset, then what is kept.
    set_timeout(&mut viewer, Duration::from_secs(20));
    let mut saw_reset = None;
    let mut last = 1;
    while last < 400 {
        let v = next_json(&mut viewer);
        match v["type"].as_str() {
            Some("reset") => saw_reset = v["offset"].as_u64(),
            Some("message") => {
                let o = v["offset"].as_u64().unwrap();
                assert!(o > last, "in order, once: {o} after {last}");
                if o != last + 1 {
                    assert_eq!(saw_reset, Some(o - 1), "a jump only right after a reset");
                }
                last = o;
            }
            _ => {}
        }
    }
    assert!(saw_reset.is_some(), "the gap was announced");
    // The channel is not stalled: the next publish arrives at once.
    assert_eq!(a.publish("scores:cut", json!({"i": 400})), 401);
    loop {
        let v = next_json(&mut viewer);
        if v["type"] == "message" {
            assert_eq!(v["offset"], 401);
            break;
        }
    }
    let m = b.get("/metrics").1;
    assert!(
        m.lines()
            .any(|l| l.starts_with("corelay_sequencer_resets_total ") && !l.ends_with(" 0")),
        "counted"
    );
}

/// Resident memory of a process in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The next answer that is not a `message`.
fn next_answer(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws);
        if v["type"] != "message" {
            return v;
        }
    }
}

#[test]
fn a_subscribe_bomb_is_refused_by_bounds_and_costs_bounded_memory() {
    let node = Node::start(&["--client-rate", "100000", "--client-burst", "100000"]);
    let mut bomber = connect(&node, "bomber");
    // Duplicates are dropped: one channel, once.
    send_json(
        &mut bomber,
        json!({"type":"subscribe","channels":["t:a","t:a","t:a"]}),
    );
    let v = next_answer(&mut bomber);
    assert_eq!(v["type"], "subscribed");
    assert_eq!(v["cursor"].as_object().unwrap().len(), 1, "{v}");
    // 5,000 channels in one request: refused whole.
    let many: Vec<String> = (0..5000).map(|i| format!("t:{i}")).collect();
    send_json(&mut bomber, json!({"type":"subscribe","channels":many}));
    let v = next_answer(&mut bomber);
    assert_eq!(v["code"], "too_many_channels", "{v}");
    let before = rss_kib(node.child.id());
    // 30 requests of 100 distinct topics: the connection follows at most 1,000.
    let mut refused = 0;
    for r in 0..30 {
        let chans: Vec<String> = (0..100).map(|i| format!("bomb:{r}-{i}")).collect();
        send_json(&mut bomber, json!({"type":"subscribe","channels":chans}));
        loop {
            let v = next_answer(&mut bomber);
            match v["type"].as_str() {
                Some("subscribed") => break,
                Some("error") => {
                    assert_eq!(v["code"], "too_many_channels");
                    refused += 1;
                }
                _ => panic!("{v}"),
            }
        }
    }
    assert_eq!(
        refused,
        30 * 100 - (1000 - 1),
        "all beyond 1,000 follows refused"
    );
    let grown = rss_kib(node.child.id()).saturating_sub(before);
    assert!(grown < 16 * 1024, "RSS grew {grown} KiB for one bomber");
    // Everyone else is served as usual.
    node.create_conversation("ok", &["alice", "bob"]);
    let mut alice = connect(&node, "alice");
    send_json(
        &mut alice,
        json!({"type":"send","conversation":"ok","client_id":"1","body":"hi"}),
    );
    assert_eq!(next_answer(&mut alice)["type"], "sent");
    let m = node.get("/metrics").1;
    assert!(
        m.lines()
            .any(|l| l.starts_with("corelay_bounds_refused_total ") && !l.ends_with(" 0")),
        "{m}"
    );
}

#[test]
fn connections_per_user_are_capped_on_websocket_and_sse() {
    let node = Node::start(&["--max-connections-per-user", "2"]);
    let _a = connect(&node, "greedy");
    let _b = connect(&node, "greedy");
    std::thread::sleep(Duration::from_millis(200));
    let mut c = connect(&node, "greedy");
    match c.read() {
        Ok(tungstenite::Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 1008);
            assert!(f.reason.contains("too many connections"), "{}", f.reason);
        }
        other => panic!("expected a 1008 close, got {other:?}"),
    }
    let sse = Sse::open(&node, &format!("/sse?token={}", token("greedy")), None);
    assert_eq!(sse.status(), 429);
    // Another user is not affected.
    let _d = connect(&node, "modest");
}

#[test]
fn an_admin_listener_keeps_the_internal_api_and_metrics_off_the_public_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin_addr = format!("127.0.0.1:{port}");
    let node = Node::start(&["--admin-listen", &admin_addr]);
    let admin: std::net::SocketAddr = admin_addr.parse().unwrap();
    let get = |addr, path: &str| {
        http(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"),
        )
        .0
    };
    assert_eq!(get(node.addr, "/metrics"), 404, "metrics are internal");
    assert_eq!(get(admin, "/metrics"), 200);
    assert_eq!(
        node.create_conversation("pub", &["a", "b"]),
        404,
        "the API is internal"
    );
    let body = json!({"id": "adm", "members": ["a", "b"]}).to_string();
    let (st, _) = http(
        admin,
        &format!(
            "POST /api/conversations HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(st, 201);
    for addr in [node.addr, admin] {
        assert_eq!(get(addr, "/healthz"), 200, "health on both");
    }
    assert_eq!(
        get(
            admin,
            &format!("/poll?channels=user:a&token={}", token("a"))
        ),
        404,
        "client endpoints are public only"
    );
    // Clients work on the public port as before.
    let mut a = connect(&node, "a");
    send_json(
        &mut a,
        json!({"type":"send","conversation":"adm","client_id":"1","body":"x"}),
    );
    assert_eq!(next_answer(&mut a)["type"], "sent");
}

#[test]
fn an_expired_token_ends_the_connection_unless_it_was_refreshed() {
    let node = Node::start(&[]);
    let short = |user: &str| corelay::auth::mint(SECRET, user, Duration::from_secs(2)).unwrap();
    let open = |user: &str| {
        let url = format!("{}?token={}", node.url("/ws"), short(user));
        let mut req = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "corelay.v1".parse().unwrap());
        let (mut ws, _) = tungstenite::connect(req).unwrap();
        set_timeout(&mut ws, Duration::from_secs(6));
        assert_eq!(next_json(&mut ws)["type"], "welcome");
        ws
    };
    let started = Instant::now();
    let mut lapsing = open("lapsing");
    let mut renewing = open("renewing");
    let sse = Sse::open(&node, &format!("/sse?token={}", short("streamer")), None);
    assert_eq!(sse.status(), 200);
    // A fresh token for the right user keeps the connection; one for another user is refused.
    send_json(
        &mut renewing,
        json!({"type":"refresh","token": token("someone-else")}),
    );
    assert_eq!(next_json(&mut renewing)["code"], "forbidden");
    send_json(
        &mut renewing,
        json!({"type":"refresh","token": token("renewing")}),
    );
    let r = next_json(&mut renewing);
    assert_eq!(r["type"], "refreshed", "{r}");
    // The other one is closed with 4001 when its token expires (2 s, whole seconds).
    match lapsing.read() {
        Ok(tungstenite::Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 4001, "{f:?}");
        }
        other => panic!("expected close 4001, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // The stream ends with a `token_expired` event.
    let ev = sse.next_event(Duration::from_secs(4));
    assert_eq!(ev.event.as_deref(), Some("error"), "{ev:?}");
    assert!(ev.data.contains("token_expired"), "{ev:?}");
    // The refreshed connection is still served after its first token's expiry.
    std::thread::sleep(Duration::from_millis(500));
    send_json(
        &mut renewing,
        json!({"type":"subscribe","channels":["t:still"]}),
    );
    assert_eq!(next_json(&mut renewing)["type"], "subscribed");
}

#[test]
fn http_requests_are_limited_per_user_across_connections() {
    let node = Node::start(&["--user-rate", "5", "--user-burst", "5"]);
    let poll = |user: &str| {
        node.get(&format!(
            "/poll?channels=user:{user}&cursor=user:{user}%3D0&timeout=0&token={}",
            token(user)
        ))
    };
    // Each poll on a new connection: the limit is the user's, not the connection's.
    let answers: Vec<u16> = (0..8).map(|_| poll("hasty").0).collect();
    assert!(answers[..5].iter().all(|s| *s == 204), "{answers:?}");
    let (st, body) = poll("hasty");
    assert_eq!(st, 429, "{answers:?} then {st}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "rate_limited");
    assert!(v["retry_after_ms"].as_u64().unwrap() <= 200, "{v}");
    assert_eq!(poll("patient").0, 204, "another user is not affected");
    std::thread::sleep(Duration::from_millis(450));
    assert_eq!(poll("hasty").0, 204, "served again after the wait");
}

#[test]
fn connections_per_source_address_are_capped() {
    use std::io::Read;
    let node = Node::start(&["--max-connections-per-ip", "3"]);
    let from = |ip: &str| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(
            &format!("{ip}:0")
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        s.connect(&node.addr.into()).unwrap();
        let s: std::net::TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    };
    let held: Vec<_> = (0..3).map(|_| from("127.0.0.1")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = from("127.0.0.1");
    let mut buf = [0u8; 16];
    assert!(
        matches!(fourth.read(&mut buf), Ok(0) | Err(_)),
        "the fourth from one address is closed at accept"
    );
    // Another address is not affected, and a closed connection frees its place.
    let (st, _) = {
        use std::io::Write;
        let mut other = from("127.0.0.2");
        other
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = other.read_to_string(&mut text);
        (status_of(&text), text)
    };
    assert_eq!(st, 200);
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let mut again = from("127.0.0.1");
    use std::io::Write;
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = again.read_to_string(&mut text);
    assert_eq!(status_of(&text), 200, "{text}");
    let m = node.get("/metrics").1;
    assert!(
        m.lines()
            .any(|l| l.starts_with("corelay_addr_refused_total") && !l.ends_with(" 0")),
        "counted"
    );
}
