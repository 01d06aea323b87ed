//! Durable chat over the real binary: offline delivery with receipts, and `kill -9` crash safety.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

#[test]
fn offline_recipient_gets_all_100_in_order_then_receipts_reach_the_sender() {
    let node = Node::start(&[]);
    node.create_conversation("c1", &["alice", "bob"]);
    let mut alice = connect(&node, "alice");
    for i in 1..=100 {
        send_json(
            &mut alice,
            json!({"type":"send","conversation":"c1","client_id":format!("m{i}"),"body":i}),
        );
    }
    // alice sees 100 `sent` (and her own 100 messages).
    let mut sent = 0;
    while sent < 100 {
        if next_json(&mut alice)["type"] == "sent" {
            sent += 1;
        }
    }
    // bob connects: the offline queue comes first, in order, exactly once.
    let mut bob = connect(&node, "bob");
    for want in 1..=100u64 {
        let m = next_json(&mut bob);
        assert_eq!(
            (m["offset"].as_u64(), m["body"].as_u64()),
            (Some(want), Some(want))
        );
    }
    send_json(
        &mut bob,
        json!({"type":"ack","conversation":"c1","offset":100}),
    );
    send_json(
        &mut bob,
        json!({"type":"read","conversation":"c1","offset":60}),
    );
    let mut states = Vec::new();
    while states.len() < 2 {
        let v = next_json(&mut alice);
        if v["type"] == "receipt" {
            assert_eq!(v["by"], "bob");
            states.push((
                v["state"].as_str().unwrap().to_string(),
                v["offset"].as_u64().unwrap(),
            ));
        }
    }
    assert_eq!(
        states,
        [("delivered".to_string(), 100), ("read".to_string(), 60)]
    );
    // Acked messages are not delivered again on the next connection.
    drop(bob);
    let mut bob = connect(&node, "bob");
    set_timeout(&mut bob, Duration::from_millis(500));
    match bob.read() {
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("nothing should be redelivered after the ack, got {other:?}"),
    }

    // A sender who was offline finds its receipts on reconnect (its `user:` channel offline queue).
    drop(alice);
    std::thread::sleep(Duration::from_millis(200));
    send_json(
        &mut bob,
        json!({"type":"read","conversation":"c1","offset":100}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut alice = connect(&node, "alice");
    let r = next_json(&mut alice);
    assert_eq!(
        (
            r["type"].as_str(),
            r["state"].as_str(),
            r["offset"].as_u64()
        ),
        (Some("receipt"), Some("read"), Some(100))
    );
    assert_eq!(r["channel"], "user:alice");
}

#[test]
fn kill_9_loses_no_acknowledged_message_and_retries_never_duplicate() {
    const TOTAL: usize = 5000;
    const WINDOW: usize = 200;
    let dir = fresh_dir();
    let fast = ["--client-rate", "100000", "--client-burst", "100000"];
    let mut node = Node::start_in(&dir, &fast);
    node.create_conversation("crash", &["alice", "bob"]);
    let mut alice = connect(&node, "alice");
    // Kill at a pseudo-random moment 100–700 ms into the run.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let kill_after = Duration::from_millis(100 + seed % 600);
    let pid = node.child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(kill_after);
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    });

    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut next = 0;
    let mut in_flight = 0;
    let started = Instant::now();
    'run: while acked.len() < TOTAL {
        while in_flight < WINDOW && next < TOTAL {
            let cid = format!("m{next}");
            let frame =
                json!({"type":"send","conversation":"crash","client_id":cid,"body":{"cid":cid}});
            if alice
                .send(tungstenite::Message::text(frame.to_string()))
                .is_err()
            {
                break 'run;
            }
            next += 1;
            in_flight += 1;
        }
        match alice.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "sent" {
                    acked.insert(
                        v["client_id"].as_str().unwrap().to_string(),
                        v["offset"].as_u64().unwrap(),
                    );
                    in_flight -= 1;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    killer.join().unwrap();
    node.kill9();
    let sent_before_kill = next;
    eprintln!(
        "crash test: killed after {:?}; {} sends written, {} acknowledged",
        started.elapsed(),
        sent_before_kill,
        acked.len()
    );

    // Restart on the same data dir.
    let node = Node::start_in(&dir, &fast);
    let stored = history(&node, "crash");
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &stored {
        *count
            .entry(m["body"]["cid"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let lost: Vec<&String> = acked.keys().filter(|c| !count.contains_key(*c)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    for (cid, offset) in &acked {
        let m = stored
            .iter()
            .find(|m| m["body"]["cid"] == cid.as_str())
            .unwrap();
        assert_eq!(
            m["offset"].as_u64(),
            Some(*offset),
            "{cid} keeps its acknowledged offset"
        );
    }
    assert!(
        count.values().all(|&n| n == 1),
        "no duplicates after the crash"
    );

    // Retry everything that was not acknowledged, with the same client ids: stored once, never twice.
    let mut alice = connect(&node, "alice");
    let unacked: Vec<String> = (0..sent_before_kill)
        .map(|i| format!("m{i}"))
        .filter(|c| !acked.contains_key(c))
        .collect();
    for chunk in unacked.chunks(WINDOW) {
        for cid in chunk {
            send_json(
                &mut alice,
                json!({"type":"send","conversation":"crash","client_id":cid,"body":{"cid":cid}}),
            );
        }
        let mut got = 0;
        while got < chunk.len() {
            if next_json(&mut alice)["type"] == "sent" {
                got += 1;
            }
        }
    }
    // Retrying an acknowledged one answers its original offset.
    if let Some((cid, offset)) = acked.iter().next() {
        send_json(
            &mut alice,
            json!({"type":"send","conversation":"crash","client_id":cid,"body":{"cid":cid}}),
        );
        loop {
            let v = next_json(&mut alice);
            if v["type"] == "sent" {
                assert_eq!(v["offset"].as_u64(), Some(*offset));
                break;
            }
        }
    }
    let stored = history(&node, "crash");
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &stored {
        *count
            .entry(m["body"]["cid"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        count.len(),
        sent_before_kill,
        "every send written is stored after the retries"
    );
    assert!(count.values().all(|&n| n == 1), "retries never duplicate");

    // The recipient, offline all along, gets every stored message exactly once, in order.
    let mut bob = connect(&node, "bob");
    set_timeout(&mut bob, Duration::from_secs(10));
    let mut last = 0;
    for _ in 0..stored.len() {
        let m = next_json(&mut bob);
        let off = m["offset"].as_u64().unwrap();
        assert!(off > last, "in order, no duplicate: {off} after {last}");
        last = off;
    }
    eprintln!(
        "crash test figures: acked={} found={} duplicates=0 lost=0 retried={} delivered_to_bob={}",
        acked.len(),
        acked.len() - lost.len(),
        unacked.len(),
        stored.len()
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn polls_and_sse_resume_durable_channels_from_the_store_after_a_restart() {
    const N: u64 = 1050; // more than the 1,000 recent messages a node loads into memory at start
    let dir = fresh_dir();
    let fast = ["--client-rate", "100000", "--client-burst", "100000"];
    let mut node = Node::start_in(&dir, &fast);
    node.create_conversation("long", &["alice", "bob"]);
    let mut alice = connect(&node, "alice");
    let mut sent = 0;
    let mut next = 0;
    while sent < N {
        while next < N && next - sent < 200 {
            next += 1;
            send_json(
                &mut alice,
                json!({"type":"send","conversation":"long","client_id":format!("l{next}"),"body":next}),
            );
        }
        if next_json(&mut alice)["type"] == "sent" {
            sent += 1;
        }
    }
    drop(alice);
    assert!(
        node.terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    let node = Node::start_in(&dir, &fast);
    let t = token("bob");
    // From the very beginning: answered from the store (no `reset`), 1,000 at a time.
    let (st, body) = node.get(&format!(
        "/poll?channels=conversation:long&cursor=conversation:long%3D0&timeout=0&token={t}"
    ));
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1000);
    assert_eq!(msgs[0]["type"], "message", "no reset: {}", msgs[0]);
    assert_eq!(
        (msgs[0]["offset"].as_u64(), msgs[999]["offset"].as_u64()),
        (Some(1), Some(1000))
    );
    assert_eq!(v["cursor"], "conversation:long=1000;user:bob=0");
    // SSE from a Last-Event-ID near the end.
    let sse = Sse::open(
        &node,
        &format!("/sse?channels=conversation:long&token={t}"),
        Some("conversation:long=1047"),
    );
    assert_eq!(sse.status(), 200);
    for want in 1048..=N {
        let e = sse.next_event(Duration::from_secs(5));
        assert_eq!(
            serde_json::from_str::<Value>(&e.data).unwrap()["offset"],
            want
        );
    }
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
