//! Mobile push end to end: the gateway (real sockets, real store) against local APNs and FCM stand-ins that
//! check the documented requests exactly (`support/push_stub.rs`). Each scenario of `docs/PUSH.md`.

#[path = "support/push_stub.rs"]
mod push_stub;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use push_stub::{PushStub, Scripted};
use serde_json::{Value, json};
use support::*;

const KEY_ID: &str = "ABC123DEFG";
const TEAM: &str = "TEAM123456";
const TOPIC: &str = "com.example.chat";

/// An APNs stand-in and the gateway flags that point at it (the key file lives in `dir`).
fn apns(dir: &Path) -> (PushStub, Vec<String>) {
    let (private, public) = push_stub::es256_key();
    std::fs::create_dir_all(dir).unwrap();
    let key = dir.join("AuthKey.p8");
    std::fs::write(&key, private).unwrap();
    let stub = PushStub::apns(&public, KEY_ID, TEAM, TOPIC);
    let flags = vec![
        "--apns-key".into(),
        key.display().to_string(),
        "--apns-key-id".into(),
        KEY_ID.into(),
        "--apns-team-id".into(),
        TEAM.into(),
        "--apns-topic".into(),
        TOPIC.into(),
        "--apns-url".into(),
        stub.url(),
        "--push-ca".into(),
        stub.ca_path().display().to_string(),
    ];
    (stub, flags)
}

fn fcm(dir: &Path) -> (PushStub, Vec<String>) {
    let (private, public) = push_stub::rsa_key();
    std::fs::create_dir_all(dir).unwrap();
    let email = "gateway@demo-project.iam.gserviceaccount.com";
    let stub = PushStub::fcm("demo-project", email, &public);
    let creds = dir.join("service-account.json");
    std::fs::write(
        &creds,
        push_stub::service_account_json(
            "demo-project",
            email,
            &private,
            &format!("{}/token", stub.url()),
        ),
    )
    .unwrap();
    let flags = vec![
        "--fcm-credentials".into(),
        creds.display().to_string(),
        "--fcm-url".into(),
        stub.url(),
        "--push-ca".into(),
        stub.ca_path().display().to_string(),
    ];
    (stub, flags)
}

fn start(dir: &Path, flags: &[String], extra: &[&str]) -> Node {
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    Node::start_in(dir, &all)
}

/// `POST /send` as `user`: (status, JSON answer).
fn post_send(node: &Node, user: &str, body: Value) -> (u16, Value) {
    let body = body.to_string();
    let (st, resp) = http(
        node.addr,
        &format!(
            "POST /send HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            token(user),
            body.len()
        ),
    );
    let json = resp
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (st, json)
}

fn send(node: &Node, from: &str, conv: &str, cid: &str, text: &str) -> u64 {
    let (st, v) = post_send(
        node,
        from,
        json!({"type":"send","conversation":conv,"client_id":cid,"body":{"text":text}}),
    );
    assert_eq!(st, 200, "{v}");
    v["offset"].as_u64().unwrap()
}

fn register(node: &Node, user: &str, platform: &str, tok: &str) {
    let body = json!({"user": user, "platform": platform, "token": tok}).to_string();
    let (st, resp) = http(
        node.addr,
        &format!(
            "POST /api/devices HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(st, 200, "{resp}");
}

/// (device token, push type, JSON) of every accepted push.
fn sent(stub: &PushStub) -> Vec<(String, String, Value)> {
    stub.sent()
        .into_iter()
        .map(|r| {
            (
                r.device_token.clone().unwrap_or_default(),
                r.header("apns-push-type").unwrap_or("").to_string(),
                r.json.clone(),
            )
        })
        .collect()
}

fn settle() {
    std::thread::sleep(Duration::from_millis(600));
}

/// A fresh data dir (with the key files beside the store), removed when the test ends. Declared before the
/// node, so the node is dropped (killed) first.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir() -> TempDir {
    let d = fresh_dir();
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

#[test]
fn offline_member_gets_one_alert_per_collapsed_burst_and_the_sender_none() {
    let d = dir();
    let (stub, flags) = apns(&d.join("keys"));
    // A long escalation delay: only "offline" can explain a push here.
    let node = start(&d, &flags, &["--push-delay", "60s"]);
    assert_eq!(node.create_conversation("c1", &["alice", "bob"]), 201);
    register(&node, "bob", "apns", "bob-phone");
    register(&node, "alice", "apns", "alice-phone");
    // A burst while the first push is not out yet collapses; whatever the timing, every message is covered
    // by exactly one alert per (push), the last one says "up to the last offset", and nothing goes to alice.
    let mut last = 0;
    for i in 0..5 {
        last = send(&node, "alice", "c1", &format!("m{i}"), "secret text");
    }
    assert!(wait_until(Duration::from_secs(10), || {
        stub.sent()
            .iter()
            .any(|r| r.json["corelay"]["offset"] == json!(last))
    }));
    settle();
    let got = sent(&stub);
    assert!(
        got.iter()
            .all(|(t, ty, _)| t == "bob-phone" && ty == "alert"),
        "{got:?}"
    );
    let counts: u64 = got
        .iter()
        .map(|(_, _, j)| j["corelay"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        counts, 5,
        "each message counted in exactly one alert: {got:?}"
    );
    assert!(got.len() < 5, "a burst collapses: {got:?}");
    let (_, _, j) = got.last().unwrap();
    assert_eq!(j["aps"]["alert"]["title"], "alice");
    assert_eq!(j["aps"]["thread-id"], "c1");
    assert!(
        !j.to_string().contains("secret text"),
        "no body without --push-include-body: {j}"
    );
    let r = stub.sent().pop().unwrap();
    assert_eq!(r.header("apns-collapse-id"), Some("c1"));
    assert_eq!(stub.violations(), Vec::<String>::new());
    assert_eq!(
        metric(&node, "corelay_push_sent{provider=\"apns\"}"),
        got.len() as u64
    );
}

#[test]
fn online_member_who_acks_gets_none_and_one_who_does_not_gets_one_after_the_delay() {
    let d = dir();
    let (stub, flags) = apns(&d.join("keys"));
    let node = start(&d, &flags, &["--push-delay", "1500ms"]);
    assert_eq!(
        node.create_conversation("c1", &["alice", "bob", "carol"]),
        201
    );
    register(&node, "bob", "apns", "bob-phone");
    register(&node, "carol", "apns", "carol-phone");
    let mut bob = connect(&node, "bob");
    let mut carol = connect(&node, "carol");
    let offset = send(&node, "alice", "c1", "m1", "hi");
    // Bob acks on his connection; carol reads the frame but never acks.
    let m = next_json(&mut bob);
    assert_eq!(m["offset"], offset);
    send_json(
        &mut bob,
        json!({"type":"ack","conversation":"c1","offset":offset}),
    );
    // (A WebSocket ack has no answer.)
    assert_eq!(next_json(&mut carol)["offset"], offset);
    // Nothing before the delay.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(stub.requests().len(), 0, "{:?}", sent(&stub));
    assert!(stub.wait_sent(1, Duration::from_secs(10)));
    settle();
    let got = sent(&stub);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "carol-phone");
    assert_eq!(metric(&node, "corelay_push_escalated_total"), 1);
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn read_on_one_device_sends_a_background_push_to_the_others() {
    let d = dir();
    let (stub, flags) = apns(&d.join("keys"));
    let node = start(&d, &flags, &["--push-delay", "60s"]);
    assert_eq!(node.create_conversation("c1", &["alice", "bob"]), 201);
    register(&node, "bob", "apns", "bob-phone");
    register(&node, "bob", "apns", "bob-tablet");
    let offset = send(&node, "alice", "c1", "m1", "hi");
    assert!(
        stub.wait_sent(2, Duration::from_secs(10)),
        "{:?}",
        sent(&stub)
    );
    // Bob opens the app on one device and reads.
    let (st, v) = post_send(
        &node,
        "bob",
        json!({"type":"read","conversation":"c1","offset":offset}),
    );
    assert_eq!(st, 200, "{v}");
    assert!(
        stub.wait_sent(4, Duration::from_secs(10)),
        "{:?}",
        sent(&stub)
    );
    settle();
    let got = sent(&stub);
    assert_eq!(got.len(), 4, "{got:?}");
    let background: Vec<_> = got.iter().filter(|(_, ty, _)| ty == "background").collect();
    assert_eq!(background.len(), 2, "{got:?}");
    for (_, _, j) in background {
        assert_eq!(j["aps"]["content-available"], 1);
        assert!(j["aps"].get("alert").is_none());
        assert_eq!(j["corelay"]["read_upto"], offset);
    }
    let r = stub
        .sent()
        .into_iter()
        .find(|r| r.header("apns-push-type") == Some("background"))
        .unwrap();
    assert_eq!(r.header("apns-priority"), Some("5"));
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn dead_tokens_are_removed_and_never_used_again() {
    let d = dir();
    let (stub, flags) = apns(&d.join("keys"));
    let node = start(&d, &flags, &["--push-delay", "60s"]);
    assert_eq!(node.create_conversation("c1", &["alice", "bob"]), 201);
    register(&node, "bob", "apns", "old-phone");
    register(&node, "bob", "apns", "new-phone");
    stub.fail_tokens(
        &["old-phone"],
        410,
        r#"{"reason":"Unregistered","timestamp":1700000000000}"#,
    );
    send(&node, "alice", "c1", "m1", "hi");
    assert!(stub.wait_sent(1, Duration::from_secs(10)));
    settle();
    assert!(wait_until(Duration::from_secs(5), || metric(
        &node,
        "corelay_push_tokens_removed_total"
    ) == 1));
    send(&node, "alice", "c1", "m2", "again");
    assert!(stub.wait_sent(2, Duration::from_secs(10)));
    settle();
    let to_old = stub
        .requests()
        .iter()
        .filter(|r| r.device_token.as_deref() == Some("old-phone"))
        .count();
    assert_eq!(to_old, 1, "the dead token was tried once, then removed");
    assert!(sent(&stub).iter().all(|(t, _, _)| t == "new-phone"));
}

#[test]
fn rate_limited_push_is_retried_after_retry_after() {
    let d = dir();
    let (stub, flags) = apns(&d.join("keys"));
    let node = start(&d, &flags, &["--push-delay", "60s"]);
    assert_eq!(node.create_conversation("c1", &["alice", "bob"]), 201);
    register(&node, "bob", "apns", "bob-phone");
    stub.push_response(Scripted::apns(429, "TooManyRequests").header("retry-after", "2"));
    send(&node, "alice", "c1", "m1", "hi");
    assert!(stub.wait_sent(1, Duration::from_secs(15)));
    let reqs = stub.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].status, 429);
    let waited = reqs[1].at - reqs[0].at;
    assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");
    assert_eq!(metric(&node, "corelay_push_retried_total"), 1);
}

/// The provider is down for 30 s with 100 obligations due: the push thread never holds more than
/// `--push-queue` of them (the rest wait in the store), and once the provider is back each is pushed once.
#[test]
fn provider_outage_then_recovery_pushes_every_obligation_once() {
    let d = dir();
    let (stub, flags) = apns(&d.join("keys"));
    let node = start(
        &d,
        &flags,
        &[
            "--push-delay",
            "60s",
            "--push-max-backoff",
            "2s",
            "--push-timeout",
            "1s",
            "--push-queue",
            "16",
        ],
    );
    let users: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    for u in &users {
        let conv = format!("c-{u}");
        assert_eq!(node.create_conversation(&conv, &["alice", u]), 201);
        register(&node, u, "apns", &format!("phone-{u}"));
    }
    stub.set_down(true);
    for u in &users {
        send(&node, "alice", &format!("c-{u}"), "m1", "hi");
    }
    let end = std::time::Instant::now() + Duration::from_secs(30);
    let mut most = 0;
    while std::time::Instant::now() < end {
        most = most.max(metric(&node, "corelay_push_in_flight"));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(most <= 16, "the push thread held {most} obligations");
    assert_eq!(stub.sent().len(), 0);
    assert!(metric(&node, "corelay_push_retried_total") >= 100);
    stub.set_down(false);
    assert!(
        stub.wait_sent(users.len(), Duration::from_secs(30)),
        "{} of {}",
        stub.sent().len(),
        users.len()
    );
    settle();
    let mut tokens: Vec<String> = sent(&stub).into_iter().map(|(t, _, _)| t).collect();
    tokens.sort();
    let mut want: Vec<String> = users.iter().map(|u| format!("phone-{u}")).collect();
    want.sort();
    assert_eq!(tokens, want, "each obligation pushed exactly once");
}

#[test]
fn pending_obligations_survive_kill_9_and_are_pushed_once_after_restart() {
    let d = dir();
    let (stub, flags) = apns(&d.join("keys"));
    // Everyone is offline, but the provider is down: obligations wait in the store.
    stub.set_down(true);
    // A short lease: a claim in flight at the kill is retried 3 s later, not 60 s.
    let fast = [
        "--push-delay",
        "60s",
        "--push-lease",
        "3s",
        "--push-timeout",
        "1s",
    ];
    let mut node = start(&d, &flags, &fast);
    for u in ["bob", "carol", "dan"] {
        assert_eq!(
            node.create_conversation(&format!("c-{u}"), &["alice", u]),
            201
        );
        register(&node, u, "apns", &format!("phone-{u}"));
        send(&node, "alice", &format!("c-{u}"), "m1", "hi");
    }
    std::thread::sleep(Duration::from_millis(1500));
    node.kill9();
    drop(node);
    stub.set_down(false);
    // The restarted node retries them (after their backoff; a claim's lease does not outlive the retry).
    let _node = start(&d, &flags, &fast);
    assert!(
        stub.wait_sent(3, Duration::from_secs(20)),
        "{:?}",
        sent(&stub)
    );
    settle();
    let mut tokens: Vec<String> = sent(&stub).into_iter().map(|(t, _, _)| t).collect();
    tokens.sort();
    assert_eq!(tokens, ["phone-bob", "phone-carol", "phone-dan"]);
}

#[test]
fn fcm_offline_member_gets_a_notification_with_one_token_exchange() {
    let d = dir();
    let (stub, flags) = fcm(&d.join("keys"));
    let node = start(&d, &flags, &["--push-delay", "60s"]);
    assert_eq!(node.create_conversation("c1", &["alice", "bob"]), 201);
    register(&node, "bob", "fcm", "bob-android");
    stub.fail_tokens(
        &["gone-android"],
        404,
        r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#,
    );
    register(&node, "bob", "fcm", "gone-android");
    send(&node, "alice", "c1", "m1", "hi");
    assert!(stub.wait_sent(1, Duration::from_secs(10)));
    send(&node, "alice", "c1", "m2", "hi");
    assert!(stub.wait_sent(2, Duration::from_secs(10)));
    settle();
    let got = stub.sent();
    assert_eq!(got.len(), 2, "{got:?}");
    let m = &got[0].json["message"];
    assert_eq!(m["token"], "bob-android");
    assert_eq!(m["android"]["collapse_key"], "c1");
    assert_eq!(m["notification"]["title"], "alice");
    assert_eq!(stub.token_requests(), 1, "the access token is cached");
    let to_gone = stub
        .requests()
        .iter()
        .filter(|r| r.device_token.as_deref() == Some("gone-android"))
        .count();
    assert_eq!(to_gone, 1, "UNREGISTERED removes the token");
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn device_api_checks_its_input() {
    let node = Node::start(&[]);
    let req = |method: &str, body: &str| {
        http(
            node.addr,
            &format!(
                "{method} /api/devices HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .0
    };
    assert_eq!(
        req("POST", r#"{"user":"bob","platform":"apns","token":"t1"}"#),
        200
    );
    assert_eq!(
        req("DELETE", r#"{"user":"bob","platform":"apns","token":"t1"}"#),
        200
    );
    assert_eq!(
        req("POST", r#"{"user":"bob","platform":"pager","token":"t1"}"#),
        400
    );
    assert_eq!(
        req("POST", r#"{"user":"bo b","platform":"fcm","token":"t1"}"#),
        400
    );
    assert_eq!(
        req("POST", r#"{"user":"bob","platform":"fcm","token":""}"#),
        400
    );
    assert_eq!(req("POST", r#"{"user":"bob"}"#), 400);
    assert_eq!(req("PUT", r#"{}"#), 405);
    let (st, _) = http(
        node.addr,
        "POST /api/devices HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert_eq!(st, 401, "API key required");
}

/// Two nodes on one Redis, both pushing: every obligation is claimed by exactly one of them, even with
/// messages sent to both nodes at once and the provider slow (claims overlap in time).
#[test]
fn two_nodes_on_one_redis_push_each_obligation_once() {
    let redis = RedisServer::start();
    let d = dir();
    let (stub, flags) = apns(&d.join("keys"));
    stub.set_delay(Duration::from_millis(200));
    let url = redis.url();
    let nodes: Vec<Node> = (0..2)
        .map(|i| {
            let id = format!("n{i}");
            let mut extra: Vec<&str> = flags.iter().map(String::as_str).collect();
            extra.extend_from_slice(&["--redis", &url, "--node-id", &id, "--push-delay", "60s"]);
            Node::start(&extra)
        })
        .collect();
    let users: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    for u in &users {
        assert_eq!(
            nodes[0].create_conversation(&format!("c-{u}"), &["alice", u]),
            201
        );
        register(&nodes[0], u, "apns", &format!("phone-{u}"));
    }
    // Alice sends through both nodes; the second learns the conversations over the control channel, so a
    // send may be refused (`not_member`) until then and is retried with the same client_id.
    for (i, u) in users.iter().enumerate() {
        let conv = format!("c-{u}");
        let body = json!({"type":"send","conversation":conv,"client_id":"m1","body":{"text":"hi"}});
        assert!(
            wait_until(Duration::from_secs(10), || post_send(
                &nodes[i % 2],
                "alice",
                body.clone()
            )
            .0 == 200),
            "send to {conv} never accepted"
        );
    }
    assert!(
        stub.wait_sent(users.len(), Duration::from_secs(20)),
        "{} of {}",
        stub.sent().len(),
        users.len()
    );
    std::thread::sleep(Duration::from_secs(1));
    let mut tokens: Vec<String> = sent(&stub).into_iter().map(|(t, _, _)| t).collect();
    tokens.sort();
    let mut want: Vec<String> = users.iter().map(|u| format!("phone-{u}")).collect();
    want.sort();
    assert_eq!(
        tokens, want,
        "each obligation pushed by exactly one node, once"
    );
    let per_node: Vec<u64> = nodes
        .iter()
        .map(|n| metric(n, "corelay_push_sent{provider=\"apns\"}"))
        .collect();
    assert_eq!(
        per_node.iter().sum::<u64>(),
        users.len() as u64,
        "{per_node:?}"
    );
}

/// The figures in `docs/BENCHMARKS.md` (not a pass/fail test): how many pushes per second one node sustains
/// against the local APNs stand-in, and the delay from commit (the `sent` answer) to the provider request for
/// an offline member. Run with the release gateway:
/// `cargo build --release && CORELAY_BIN=target/release/corelay cargo test --release --test push -- --ignored --nocapture push_figures`
#[test]
#[ignore = "benchmark: prints figures"]
fn push_figures() {
    let d = dir();
    let (stub, flags) = apns(&d.join("keys"));
    // One sender sends for everyone: lift its per-user HTTP rate limit.
    let node = start(
        &d,
        &flags,
        &[
            "--push-delay",
            "60s",
            "--user-rate",
            "1000000",
            "--user-burst",
            "1000000",
        ],
    );
    // Latency: one message at a time to an offline member with one device.
    let users: Vec<String> = (0..200).map(|i| format!("l{i}")).collect();
    for u in &users {
        assert_eq!(
            node.create_conversation(&format!("c-{u}"), &["alice", u]),
            201
        );
        register(&node, u, "apns", &format!("phone-{u}"));
    }
    let mut lat = Vec::new();
    for u in &users {
        let before = stub.sent().len();
        send(&node, "alice", &format!("c-{u}"), "m1", "hi");
        let committed = std::time::Instant::now();
        assert!(stub.wait_sent(before + 1, Duration::from_secs(10)));
        let at = stub.sent()[before].at;
        lat.push(at.saturating_duration_since(committed));
        std::thread::sleep(Duration::from_millis(20));
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "commit→provider request, offline member: p50 {:?}, p99 {:?}, max {:?} (n = {})",
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1],
        lat.len()
    );
    // Throughput: 2,000 members in 2,000 conversations, one message each, sent by 4 threads.
    let n = 2000;
    let many: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    for u in &many {
        assert_eq!(
            node.create_conversation(&format!("c-{u}"), &["alice", u]),
            201
        );
        register(&node, u, "apns", &format!("phone-{u}"));
    }
    let base = stub.sent().len();
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        for chunk in many.chunks(n / 4) {
            let node = &node;
            s.spawn(move || {
                for u in chunk {
                    send(node, "alice", &format!("c-{u}"), "m1", "hi");
                }
            });
        }
    });
    let sends = t0.elapsed();
    assert!(stub.wait_sent(base + n, Duration::from_secs(120)));
    let all = t0.elapsed();
    let sent = stub.sent();
    let first = sent[base].at;
    let last = sent[sent.len() - 1].at;
    println!(
        "throughput: {n} messages sent in {sends:?} ({:.0}/s); {n} pushes done {all:?} after the first send; \
         provider requests {:.0}/s between the first and the last push",
        n as f64 / sends.as_secs_f64(),
        (n - 1) as f64 / (last - first).as_secs_f64()
    );
    assert_eq!(stub.violations(), Vec::<String>::new());
}
