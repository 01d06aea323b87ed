//! Cluster mode over a real `redis-server`: three gateway nodes, chat, topics and receipts across nodes
//! exactly once; a Redis restart (AOF) while traffic flows.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

fn start_nodes(redis: &RedisServer, n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let id = format!("n{i}");
            Node::start(&[
                "--redis",
                &redis.url(),
                "--node-id",
                &id,
                "--presence-ttl",
                "3s",
            ])
        })
        .collect()
}

/// Waits until `node` receives at least `n` channels from the bus.
fn wait_channels(node: &Node, n: u64) {
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            node,
            "corelay_bus_channels"
        ) >= n),
        "node never subscribed to {n} channels (has {})",
        metric(node, "corelay_bus_channels")
    );
}

/// Waits until `node`'s presence cache holds `n` users of other nodes.
fn wait_cached(node: &Node, n: u64, within: Duration) {
    assert!(
        wait_until(within, || metric(node, "corelay_presence_cache_users") == n),
        "the presence cache never held {n} users (holds {})",
        metric(node, "corelay_presence_cache_users")
    );
}

/// The next JSON message that is not one of `skip` types.
fn next_of(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let v = next_json(ws);
        if v["type"] == ty {
            return v;
        }
    }
}

#[test]
fn chat_topics_and_receipts_cross_three_nodes_exactly_once() {
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis, 3);
    assert_eq!(
        nodes[0].create_conversation("c1", &["alice", "bob", "carol"]),
        201
    );
    let mut alice = connect(&nodes[0], "alice");
    let mut bob = connect(&nodes[1], "bob");
    let mut carol = connect(&nodes[2], "carol");
    // Each node follows the user channel and conversation c1 of its user.
    for n in &nodes {
        wait_channels(n, 2);
    }

    send_json(
        &mut alice,
        json!({"type":"send","conversation":"c1","client_id":"a1","body":"from n0"}),
    );
    assert_eq!(next_of(&mut alice, "sent")["offset"], 1);
    for ws in [&mut bob, &mut carol] {
        let m = next_of(ws, "message");
        assert_eq!(
            (m["offset"].as_u64(), m["from"].as_str()),
            (Some(1), Some("alice"))
        );
    }
    // A send from another node continues the same offsets (Redis INCR), and reaches the others once.
    send_json(
        &mut carol,
        json!({"type":"send","conversation":"c1","client_id":"c1","body":"from n2"}),
    );
    assert_eq!(next_of(&mut carol, "sent")["offset"], 2);
    // (alice's own message 1 arrived before her `sent` and was skipped above.)
    let m2 = next_of(&mut alice, "message");
    assert_eq!(
        (m2["offset"].as_u64(), m2["from"].as_str()),
        (Some(2), Some("carol"))
    );
    let b = next_of(&mut bob, "message");
    assert_eq!(
        b["offset"], 2,
        "exactly once, in order: bob's next message is offset 2"
    );

    // Receipts cross nodes: bob (n1) reads up to 2; alice (n0) and carol (n2) each hear about their message.
    send_json(
        &mut bob,
        json!({"type":"read","conversation":"c1","offset":2}),
    );
    let r = next_of(&mut alice, "receipt");
    assert_eq!(
        (r["state"].as_str(), r["by"].as_str()),
        (Some("delivered"), Some("bob"))
    );
    assert_eq!(next_of(&mut alice, "receipt")["state"], "read");
    let r = next_of(&mut carol, "receipt");
    assert_eq!(
        (r["state"].as_str(), r["by"].as_str()),
        (Some("delivered"), Some("bob"))
    );

    // A topic published through one node reaches followers on every node once, with one global offset.
    for ws in [&mut alice, &mut bob, &mut carol] {
        send_json(ws, json!({"type":"subscribe","channels":["scores:final"]}));
        assert_eq!(next_of(ws, "subscribed")["type"], "subscribed");
    }
    for n in &nodes {
        wait_channels(n, 3);
    }
    assert_eq!(nodes[1].publish("scores:final", json!({"home": 1})), 1);
    assert_eq!(nodes[2].publish("scores:final", json!({"home": 2})), 2);
    for ws in [&mut alice, &mut bob, &mut carol] {
        let a = next_of(ws, "message");
        let b = next_of(ws, "message");
        assert_eq!(
            (a["offset"].as_u64(), b["offset"].as_u64()),
            (Some(1), Some(2))
        );
        assert_eq!(b["body"]["home"], 2);
    }
    // And a poll on any node resumes from the same cursor (history in the Redis stream).
    let (st, body) = nodes[0].get(&format!(
        "/poll?channels=scores:final&cursor=scores:final%3D1&timeout=0&token={}",
        token("dave")
    ));
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["messages"][0]["offset"], 2);
}

#[test]
fn an_offline_user_gets_messages_from_any_node_and_presence_ages_out() {
    let redis = RedisServer::start();
    let mut nodes = start_nodes(&redis, 2);
    nodes[0].create_conversation("c9", &["ann", "ben"]);
    let mut ann = connect(&nodes[0], "ann");
    let mut ben = connect(&nodes[1], "ben");
    wait_channels(&nodes[0], 2);
    wait_channels(&nodes[1], 2);
    send_json(
        &mut ann,
        json!({"type":"send","conversation":"c9","client_id":"x1","body":1}),
    );
    assert_eq!(next_of(&mut ben, "message")["offset"], 1);
    // ben acknowledges it, as a chat client does (so a copy queued while its presence was being registered is
    // trimmed, not redelivered).
    send_json(
        &mut ben,
        json!({"type":"ack","conversation":"c9","offset":1}),
    );
    // The ack is committed (with the trim) when ann hears the receipt.
    assert_eq!(next_of(&mut ann, "receipt")["by"], "ben");
    // Node 0 knows ben is live on node 1 from node 1's announcement (its presence cache).
    wait_cached(&nodes[0], 1, Duration::from_secs(5));
    // ben's node dies without a goodbye: its lease expires (3 s TTL), node 0's lease check drops ben from its
    // cache, and the append script no longer counts ben's entry: sends queue offline for ben.
    nodes[1].kill9();
    drop(ben);
    wait_cached(&nodes[0], 0, Duration::from_secs(10));
    for i in 2..=6 {
        send_json(
            &mut ann,
            json!({"type":"send","conversation":"c9","client_id":format!("x{i}"),"body":i}),
        );
        next_of(&mut ann, "sent");
    }
    // ben reconnects on the surviving node: the queued messages arrive, in order, once.
    let mut ben = connect(&nodes[0], "ben");
    for want in 2..=6u64 {
        assert_eq!(next_of(&mut ben, "message")["offset"], want);
    }
}

#[test]
fn a_redis_restart_while_traffic_flows_loses_nothing_acknowledged() {
    let mut redis = RedisServer::start();
    let nodes = start_nodes(&redis, 2);
    nodes[0].create_conversation("r1", &["rose", "rick"]);
    let mut rose = connect(&nodes[0], "rose");
    let mut rick = connect(&nodes[1], "rick");
    wait_channels(&nodes[0], 2);
    wait_channels(&nodes[1], 2);
    let mut acked = Vec::new();
    let mut restarted = false;
    for i in 1..=60 {
        if i == 20 {
            redis.kill();
        }
        if i == 30 {
            redis.restart();
            restarted = true;
        }
        send_json(
            &mut rose,
            json!({"type":"send","conversation":"r1","client_id":format!("r{i}"),"body":i}),
        );
        let v = loop {
            let v = next_json(&mut rose);
            if v["type"] == "sent" || v["type"] == "error" {
                break v;
            }
        };
        if v["type"] == "sent" {
            acked.push(v["offset"].as_u64().unwrap());
        } else {
            // Retry the same client id until the store is back.
            assert!(
                matches!(v["code"].as_str(), Some("store_unavailable" | "store_busy")),
                "{v}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(restarted);
    assert!(acked.len() >= 40, "acked {}", acked.len());
    // Offsets kept growing across the restart (AOF).
    assert!(acked.windows(2).all(|w| w[1] > w[0]), "{acked:?}");
    // The health turned degraded and came back; the failed commits were counted.
    assert!(wait_until(Duration::from_secs(10), || nodes[1]
        .get("/readyz")
        .0
        == 200));
    assert!(metric(&nodes[0], "corelay_store_errors_total") > 0);
    // rick receives every acknowledged message (pub/sub or the catch-up read after the reconnect), once each.
    set_timeout(&mut rick, Duration::from_secs(10));
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let m = next_of(&mut rick, "message");
        got.push(m["offset"].as_u64().unwrap());
    }
    assert_eq!(got, acked, "every acked message, in order, exactly once");
}

#[test]
fn a_killed_nodes_user_resumes_on_another_node_with_every_acked_message_once() {
    let redis = RedisServer::start();
    let mut nodes = start_nodes(&redis, 2);
    nodes[0].create_conversation("k1", &["sam", "tom"]);
    let mut sam = connect(&nodes[0], "sam");
    let mut tom = connect(&nodes[1], "tom");
    wait_channels(&nodes[0], 2);
    wait_channels(&nodes[1], 2);
    let mut acked = Vec::new();
    let mut seen = Vec::new();
    for i in 1..=40 {
        send_json(
            &mut sam,
            json!({"type":"send","conversation":"k1","client_id":format!("k{i}"),"body":i}),
        );
        acked.push(next_of(&mut sam, "sent")["offset"].as_u64().unwrap());
        if i <= 15 {
            // tom reads live on n1 until its node dies, acknowledging as a chat client does (acks trim its
            // offline queue: a message queued while its presence was being registered is not redelivered).
            let off = next_of(&mut tom, "message")["offset"].as_u64().unwrap();
            send_json(
                &mut tom,
                json!({"type":"ack","conversation":"k1","offset":off}),
            );
            seen.push(off);
        }
        if i == 15 {
            nodes[1].kill9();
        }
    }
    // tom reconnects to the surviving node and resumes from the last offset it saw.
    let last = *seen.last().unwrap();
    let mut tom = connect(&nodes[0], "tom");
    send_json(
        &mut tom,
        json!({"type":"subscribe","channels":["conversation:k1"],"cursor":{"conversation:k1": last}}),
    );
    loop {
        let v = next_json(&mut tom);
        match v["type"].as_str() {
            Some("message") => seen.push(v["offset"].as_u64().unwrap()),
            Some("subscribed") => break,
            _ => {}
        }
    }
    // Traffic goes on after the resume.
    send_json(
        &mut sam,
        json!({"type":"send","conversation":"k1","client_id":"after","body":0}),
    );
    acked.push(next_of(&mut sam, "sent")["offset"].as_u64().unwrap());
    seen.push(next_of(&mut tom, "message")["offset"].as_u64().unwrap());
    assert_eq!(
        seen, acked,
        "every acknowledged message exactly once, in order"
    );
}

#[test]
fn any_node_resumes_any_cursor_from_the_shared_log() {
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis, 3);
    // Nobody follows the topic anywhere while it is published.
    for i in 1..=3 {
        assert_eq!(nodes[0].publish("news:late", json!({"n": i})), i);
    }
    let t = token("reader");
    let (st, body) = nodes[2].get(&format!(
        "/poll?channels=news:late&cursor=news:late%3D1&timeout=0&token={t}"
    ));
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let offs: Vec<u64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offs, [2, 3]);
    assert_eq!(v["cursor"], "news:late=3;user:reader=0");
    let sse = Sse::open(
        &nodes[1],
        &format!("/sse?channels=news:late&token={t}"),
        Some("news:late=0"),
    );
    assert_eq!(sse.status(), 200);
    for want in 1..=3 {
        let e = sse.next_event(Duration::from_secs(5));
        assert_eq!(
            serde_json::from_str::<Value>(&e.data).unwrap()["offset"],
            want
        );
    }
    // A held poll on a third node is answered by a publish through the first.
    let addr = nodes[2].addr;
    let path = format!("/poll?channels=news:late&cursor=news:late%3D3&timeout=10&token={t}");
    let waiter = std::thread::spawn(move || {
        http(
            addr,
            &format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n"),
        )
    });
    wait_channels(&nodes[2], 1);
    nodes[0].publish("news:late", json!({"n": 4}));
    let (st, text) = waiter.join().unwrap();
    assert_eq!(st, 200, "{text}");
    assert!(text.contains("\"offset\":4"), "{text}");
}

/// `SUBSCRIBE` calls Redis has served so far (from `INFO commandstats`, read with a raw RESP request).
fn subscribe_calls(redis: &RedisServer) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while !buf.ends_with(b"\r\n\r\n")
        && !String::from_utf8_lossy(&buf).contains("cmdstat_subscribe")
    {
        let n = s.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 4 && String::from_utf8_lossy(&buf).matches("\r\n").count() > 40 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("cmdstat_subscribe:calls="))
        .and_then(|v| v.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// A quiet subscriber connection stays up: its liveness ping (every 5 s of quiet) is answered in
/// subscribed mode with `["pong", ""]`, which once read as an error, so every 5 s the node dropped the
/// connection and resubscribed (and re-read) every channel its users follow.
#[test]
fn a_quiet_bus_connection_is_kept_and_nothing_is_resubscribed() {
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis, 1);
    let _alice = connect(&nodes[0], "alice");
    let _bob = connect(&nodes[0], "bob");
    wait_channels(&nodes[0], 2);
    std::thread::sleep(Duration::from_secs(1));
    let before = subscribe_calls(&redis);
    assert!(
        before >= 2,
        "the users' channels were subscribed ({before})"
    );
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        subscribe_calls(&redis),
        before,
        "nothing was resubscribed over 12 s of quiet (two liveness pings)"
    );
}

/// Redis commands executed since the last `CONFIG RESETSTAT` (`INFO commandstats`, commands run inside
/// scripts included), and the microseconds Redis spent in scripts (their inner commands included).
fn redis_calls(redis: &RedisServer) -> (u64, u64) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .unwrap();
    let value = |line: &str, name: &str| -> Option<u64> {
        line.split(name).nth(1)?.split(',').next()?.parse().ok()
    };
    if std::env::var_os("SHOW_STATS").is_some() {
        eprintln!("{info}");
    }
    let calls = info.lines().filter_map(|l| value(l, "calls=")).sum();
    let script_usec = info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:"))
        .filter_map(|l| value(l, "usec="))
        .sum();
    (calls, script_usec)
}

/// Issue #14's presence cache: a message to a 1,000-member conversation whose members are all connected,
/// spread over three nodes, costs a few Redis commands, not one presence read per member of the other nodes
/// (~670 before the cache). Prints the figure quoted in docs/BENCHMARKS.md.
#[test]
fn a_message_to_a_thousand_connected_members_over_three_nodes_costs_redis_the_same_as_to_two() {
    const MEMBERS: usize = 1000;
    const MESSAGES: u64 = 20;
    let redis = RedisServer::start();
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(&["--redis", &redis.url(), "--node-id", &format!("m{i}")]))
        .collect();
    let users: Vec<String> = (0..MEMBERS).map(|i| format!("u{i}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    assert_eq!(nodes[0].create_conversation("big", &names), 201);
    // Every member connected, a third on each node.
    let mut conns: Vec<Ws> = users
        .iter()
        .enumerate()
        .map(|(i, u)| connect(&nodes[i % 3], u))
        .collect();
    for (k, n) in nodes.iter().enumerate() {
        // Each node caches the members connected to the other two.
        let elsewhere = (0..MEMBERS).filter(|i| i % 3 != k).count() as u64;
        wait_cached(n, elsewhere, Duration::from_secs(20));
    }
    let client = redis::Client::open(redis.url()).unwrap();
    let mut rc = client.get_connection().unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut rc)
        .unwrap();
    for i in 1..=MESSAGES {
        send_json(
            &mut conns[0],
            json!({"type":"send","conversation":"big","client_id":format!("b{i}"),"body":i}),
        );
        assert_eq!(next_of(&mut conns[0], "sent")["offset"], i);
    }
    // One member on each node received all of them.
    for c in conns.iter_mut().skip(1).take(3) {
        let mut last = 0;
        while last < MESSAGES {
            last = next_of(c, "message")["offset"].as_u64().unwrap();
        }
    }
    let (calls, usec) = redis_calls(&redis);
    let per_message = calls as f64 / MESSAGES as f64;
    println!(
        "redis commands per message to {MEMBERS} connected members over 3 nodes: {per_message:.1} \
         ({:.4} per delivery); the append script's Redis time per message: {:.0} µs",
        per_message / (MEMBERS - 1) as f64,
        usec as f64 / MESSAGES as f64
    );
    // The append's own commands (dedupe, INCR, XADD, the dedupe record), the publish, and the background
    // (lease refreshes and checks): nothing per member.
    assert!(
        per_message < 20.0,
        "{per_message} Redis commands per message: presence is being read per member"
    );
}
