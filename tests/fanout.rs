//! A fan-out wider than one loop turn: a loop works through a delivery 512 connections at a time and reads its
//! sockets between chunks (`FANOUT_CHUNK` in `src/worker/mod.rs`). Every follower must still get every message
//! exactly once and in order, with later messages queued behind the fan-out in progress, over the real binary
//! and real sockets.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// More followers than two chunks on each of the two loops (the test nodes run `--threads 2`; the kernel spreads
/// connections over the loops' listeners), and messages published back to back so that the next deliveries
/// arrive while the first is still being written.
#[test]
fn a_fan_out_wider_than_a_chunk_reaches_everyone_once_and_in_order() {
    const FOLLOWERS: usize = 2_400;
    const MESSAGES: u64 = 5;
    let node = Node::start(&[]);
    let mut clients: Vec<Ws> = (0..FOLLOWERS)
        .map(|i| connect(&node, &format!("f{i}")))
        .collect();
    for ws in &mut clients {
        send_json(ws, json!({"type":"subscribe","channels":["topic:wide"]}));
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        let v = next_json(ws);
        assert_eq!(v["type"], "subscribed", "follower {i}: {v}");
    }
    for m in 1..=MESSAGES {
        assert_eq!(node.publish("topic:wide", json!({"m": m})), m);
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        set_timeout(ws, Duration::from_secs(10));
        for m in 1..=MESSAGES {
            let v = next_json(ws);
            assert_eq!(v["type"], "message", "follower {i}: {v}");
            assert_eq!(
                v["offset"], m,
                "follower {i} got {v} where offset {m} was due"
            );
            assert_eq!(v["body"]["m"], m, "follower {i}: {v}");
        }
    }
    // Nothing more (no duplicate): a ping's pong is the next frame each client sees.
    for (i, ws) in clients.iter_mut().enumerate().step_by(97) {
        send_json(ws, json!({"type":"ping","id":"after"}));
        let v = next_json(ws);
        assert_eq!(v["type"], "pong", "follower {i}: {v}");
    }
}
