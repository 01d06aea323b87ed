//! `--redis-min-replicas` over real `redis-server` processes (a master and a replica) and real gateways: a
//! write is acknowledged only once the replica has it; while the replica lags, sends are refused as retryable
//! and their retries are acknowledged once, with the first try's offset; and the failover proof, with and
//! without the flag: after the master dies and the replica is promoted, every message acknowledged with the
//! flag is there, and without it the ones acknowledged while the replica lagged are gone.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// A gateway on `redis`; with `replica_timeout`, it waits that long for one replica per write.
fn gateway(redis: &RedisServer, id: &str, replica_timeout: Option<&str>) -> Node {
    let url = redis.url();
    let mut args = vec!["--redis", &url, "--node-id", id];
    if let Some(t) = replica_timeout {
        args.extend(["--redis-min-replicas", "1", "--redis-replica-timeout", t]);
    }
    Node::start(&args)
}

/// Sends a chat message to c1 and returns its answer: `sent` or the `error` about it.
fn send(ws: &mut Ws, client_id: &str, body: &str) -> Value {
    send_json(
        ws,
        json!({"type":"send","conversation":"c1","client_id":client_id,"body":body}),
    );
    loop {
        let v = next_json(ws);
        if (v["type"] == "sent" && v["client_id"] == client_id)
            || (v["type"] == "error" && v["ref"] == client_id)
        {
            return v;
        }
    }
}

/// The next `message` on `ws`, skipping anything else.
fn next_message(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws);
        if v["type"] == "message" {
            return v;
        }
    }
}

/// A raw HTTP request: (status, whole response).
fn post(node: &Node, path: &str, auth: &str, body: &str) -> (u16, String) {
    http(
        node.addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

#[test]
fn with_a_healthy_replica_writes_are_acknowledged_and_delivered() {
    let master = RedisServer::start();
    let replica = RedisServer::replica_of(&master, master.port);
    let node = gateway(&master, "n0", Some("5s"));
    assert_eq!(node.create_conversation("c1", &["alice", "bob"]), 201);
    let mut alice = connect(&node, "alice");
    let mut bob = connect(&node, "bob");
    for i in 1..=5u64 {
        let a = send(&mut alice, &format!("m{i}"), &format!("hello {i}"));
        assert_eq!(
            (a["type"].as_str(), a["offset"].as_u64()),
            (Some("sent"), Some(i)),
            "{a}"
        );
        // Acknowledged means on the replica already: no waiting here.
        let on_replica: Option<u64> = replica.query(&["GET", "offset:conversation:c1"]);
        assert_eq!(on_replica, Some(i));
        let m = next_message(&mut bob);
        assert_eq!(
            (m["offset"].as_u64(), m["body"].as_str()),
            (Some(i), Some(format!("hello {i}").as_str()))
        );
    }
    assert!(node.publish("topic:news", json!("fresh")) >= 1);
    assert_eq!(metric(&node, "corelay_store_replication_timeouts_total"), 0);
}

#[test]
fn while_the_replica_is_stopped_sends_are_refused_and_a_retry_is_acknowledged_once() {
    let master = RedisServer::start();
    let replica = RedisServer::replica_of(&master, master.port);
    let node = gateway(&master, "n0", Some("500ms"));
    assert_eq!(node.create_conversation("c1", &["alice", "bob"]), 201);
    let mut alice = connect(&node, "alice");
    let mut bob = connect(&node, "bob");
    assert_eq!(send(&mut alice, "m1", "first")["offset"], 1);

    replica.signal("STOP");
    let started = Instant::now();
    let refused = send(&mut alice, "m2", "second");
    let took = started.elapsed();
    println!("refused after {took:?}: {refused}");
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "store_unavailable");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("retry with the same client_id"),
        "{refused}"
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Over HTTP: 503 with Retry-After, for a chat send and for a publish.
    let body =
        json!({"type":"send","conversation":"c1","client_id":"h1","body":"over http"}).to_string();
    let (status, text) = post(&node, &format!("/send?token={}", token("alice")), "", &body);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("Retry-After: 1\r\n"), "{text}");
    assert!(text.contains("store_unavailable"), "{text}");
    let publish = json!({"channel":"topic:news","body":"late"}).to_string();
    let auth = format!("Authorization: Bearer {API_KEY}\r\n");
    let (status, text) = post(&node, "/api/publish", &auth, &publish);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("Retry-After: 1\r\n"), "{text}");
    assert!(metric(&node, "corelay_store_replication_timeouts_total") >= 3);

    replica.signal("CONT");
    // The retries: acknowledged once the replica has caught up, with the first try's offset (it is in the
    // master's log: the retry finds its dedupe record).
    let deadline = Instant::now() + Duration::from_secs(10);
    let sent = loop {
        let a = send(&mut alice, "m2", "second");
        if a["type"] == "sent" {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "never acknowledged after the replica resumed: {a}"
        );
    };
    assert_eq!(sent["offset"], 2, "{sent}");
    let (status, text) = post(&node, &format!("/send?token={}", token("alice")), "", &body);
    assert_eq!(status, 200, "{text}");
    assert_eq!(send(&mut alice, "m4", "fourth")["offset"], 4);
    let bodies: Vec<Value> = history(&node, "c1")
        .iter()
        .map(|m| m["body"].clone())
        .collect();
    assert_eq!(
        bodies,
        [
            json!("first"),
            json!("second"),
            json!("over http"),
            json!("fourth")
        ]
    );
    // Bob gets each once, in order: the refused try is in the master's log, and the gateway fills the gap
    // it left from the store.
    let got: Vec<(Value, Value)> = (0..4)
        .map(|_| next_message(&mut bob))
        .map(|m| (m["offset"].clone(), m["body"].clone()))
        .collect();
    assert_eq!(
        got,
        [
            (json!(1), json!("first")),
            (json!(2), json!("second")),
            (json!(3), json!("over http")),
            (json!(4), json!("fourth"))
        ]
    );
}

/// What one failover did to the acknowledged messages.
#[derive(Debug)]
struct Failover {
    acked: usize,
    present: usize,
    lost: usize,
    refused: usize,
}

/// Master + replica (through a relay); `K` messages acknowledged and on the replica; the replication stream
/// held; `F` more sends; the master killed (`SIGKILL`) and what the relay held dropped; the replica promoted
/// (`REPLICAOF NO ONE`) and a fresh gateway started on it: which acknowledged messages does it have?
fn failover(min_replicas: bool) -> Failover {
    const K: u64 = 20;
    const F: u64 = 5;
    let mut master = RedisServer::start();
    let relay = Relay::start(master.port);
    let replica = RedisServer::replica_of(&master, relay.port);
    let timeout = min_replicas.then_some("500ms");
    let mut node = gateway(&master, "before", timeout);
    assert_eq!(node.create_conversation("c1", &["alice", "bob"]), 201);
    let mut alice = connect(&node, "alice");
    let mut acked: Vec<(u64, String)> = Vec::new();
    for i in 1..=K {
        let body = format!("m{i}");
        let a = send(&mut alice, &body, &body);
        assert_eq!(a["type"], "sent", "{a}");
        acked.push((a["offset"].as_u64().unwrap(), body));
    }
    // The replica has all K (whether or not the gateway waited for it).
    assert!(
        wait_until(Duration::from_secs(10), || replica
            .query::<Option<u64>>(&["GET", "offset:conversation:c1"])
            == Some(K)),
        "the replica never caught up"
    );
    relay.hold();
    let mut refused = 0;
    for i in K + 1..=K + F {
        let body = format!("m{i}");
        let a = send(&mut alice, &body, &body);
        match a["type"].as_str() {
            Some("sent") => acked.push((a["offset"].as_u64().unwrap(), body)),
            _ => {
                assert_eq!(a["code"], "store_unavailable", "{a}");
                refused += 1;
            }
        }
    }
    if min_replicas {
        assert_eq!(refused, F as usize, "acknowledged without the replica");
    } else {
        assert_eq!(refused, 0, "refused without --redis-min-replicas");
    }
    // The master's host dies: the master and the stream it had not delivered.
    master.kill();
    relay.cut();
    node.kill9();
    let promoted: String = replica.query(&["REPLICAOF", "NO", "ONE"]);
    assert_eq!(promoted, "OK");
    let after = gateway(&replica, "after", timeout);
    let history = history(&after, "c1");
    let present = acked
        .iter()
        .filter(|(offset, body)| {
            history
                .iter()
                .any(|m| m["offset"].as_u64() == Some(*offset) && m["body"] == body.as_str())
        })
        .count();
    Failover {
        acked: acked.len(),
        present,
        lost: acked.len() - present,
        refused,
    }
}

#[test]
fn a_failover_loses_no_acknowledged_message_with_min_replicas_and_some_without() {
    let with = failover(true);
    println!(
        "--redis-min-replicas 1: acked {}, present after failover {}, lost {} (refused while the replica lagged: {})",
        with.acked, with.present, with.lost, with.refused
    );
    let without = failover(false);
    println!(
        "--redis-min-replicas 0: acked {}, present after failover {}, lost {} (refused while the replica lagged: {})",
        without.acked, without.present, without.lost, without.refused
    );
    assert_eq!(with.lost, 0, "{with:?}");
    assert_eq!(with.acked, 20, "{with:?}");
    assert!(without.lost > 0, "{without:?}");
    assert_eq!((without.acked, without.lost), (25, 5), "{without:?}");
}
