//! The push providers (`src/push/apns.rs`, `src/push/fcm.rs`, `src/push/h2.rs`) over real sockets, TLS and
//! HTTP/2 against the local provider stand-ins of `tests/support/push_stub.rs`, which check every request
//! against the documented protocol (`violations()` stays empty) and script the providers' answers.

#[path = "support/push_stub.rs"]
mod push_stub;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use corelay::push::apns::{Apns, ApnsConfig};
use corelay::push::fcm::{Fcm, FcmConfig};
use corelay::push::{Notification, Outcome};
use push_stub::{PushStub, Scripted, es256_key, rsa_key, service_account_json};
use serde_json::json;

const KEY_ID: &str = "ABC123DEFG";
const TEAM: &str = "DEF123GHIJ";
const TOPIC: &str = "com.example.chat";
const PROJECT: &str = "corelay-test";
const EMAIL: &str = "push@corelay-test.iam.gserviceaccount.com";
const APNS_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn alert(conversation: &str, offset: u64, body: Option<&str>) -> Notification {
    Notification::Alert {
        conversation: conversation.into(),
        offset,
        from: "alice".into(),
        count: 1,
        body: body.map(str::to_string),
    }
}

fn clear(conversation: &str, upto: u64) -> Notification {
    Notification::Clear {
        conversation: conversation.into(),
        upto,
    }
}

fn apns_with(stub: &PushStub, private: &str, timeout: Duration) -> Apns {
    let cfg = ApnsConfig {
        url: stub.url(),
        key_pem: private.to_string(),
        key_id: KEY_ID.into(),
        team_id: TEAM.into(),
        topic: TOPIC.into(),
        ttl: Duration::from_secs(3600),
        include_body: true,
    };
    Apns::new(cfg, Some(stub.ca_path()), timeout).unwrap()
}

fn apns_setup() -> (PushStub, Apns) {
    let (private, public) = es256_key();
    let stub = PushStub::apns(&public, KEY_ID, TEAM, TOPIC);
    let apns = apns_with(&stub, &private, Duration::from_secs(5));
    (stub, apns)
}

fn fcm_setup() -> (PushStub, Fcm) {
    let (private, public) = rsa_key();
    let stub = PushStub::fcm(PROJECT, EMAIL, &public);
    let creds = service_account_json(PROJECT, EMAIL, &private, &format!("{}/token", stub.url()));
    let cfg = FcmConfig {
        url: stub.url(),
        credentials_json: creds,
        include_body: true,
    };
    let fcm = Fcm::new(cfg, Some(stub.ca_path()), Duration::from_secs(5)).unwrap();
    (stub, fcm)
}

fn retry_after(o: &Outcome) -> Option<Duration> {
    match o {
        Outcome::Retry { after, .. } => *after,
        other => panic!("expected Retry, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------- APNs

#[test]
fn apns_alert_is_accepted_with_every_header_and_the_jwt_checked() {
    let (stub, apns) = apns_setup();
    let rt = rt();
    let n = alert("conv-1", 42, Some("hello"));
    assert_eq!(rt.block_on(apns.send(APNS_TOKEN, &n)), Outcome::Sent);
    assert_eq!(stub.violations(), Vec::<String>::new());

    let sent = stub.sent();
    assert_eq!(sent.len(), 1);
    let r = &sent[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, format!("/3/device/{APNS_TOKEN}"));
    assert_eq!(r.device_token.as_deref(), Some(APNS_TOKEN));
    assert_eq!(r.header("apns-topic"), Some(TOPIC));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(r.header("apns-collapse-id"), Some("conv-1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let exp: u64 = r.header("apns-expiration").unwrap().parse().unwrap();
    assert!(
        exp.abs_diff(unix_now() + 3600) <= 5,
        "apns-expiration {exp}"
    );
    assert!(r.header("authorization").unwrap().starts_with("bearer "));
    let iat = r.jwt_iat.expect("verified JWT");
    assert!(unix_now() - iat <= 5, "iat {iat}");
    assert_eq!(
        r.json,
        json!({
            "aps": {"alert": {"title": "alice", "body": "hello"}, "thread-id": "conv-1", "sound": "default"},
            "corelay": {"conversation": "conv-1", "offset": 42, "count": 1}
        })
    );
    assert_eq!(apns.jwt_refreshes(), 0);
}

#[test]
fn apns_background_push_for_a_read_elsewhere() {
    let (stub, apns) = apns_setup();
    let rt = rt();
    assert_eq!(
        rt.block_on(apns.send(APNS_TOKEN, &clear("conv-1", 17))),
        Outcome::Sent
    );
    assert_eq!(stub.violations(), Vec::<String>::new());
    let r = &stub.sent()[0];
    assert_eq!(r.header("apns-push-type"), Some("background"));
    assert_eq!(r.header("apns-priority"), Some("5"));
    assert_eq!(r.header("apns-collapse-id"), Some("conv-1"));
    assert_eq!(
        r.json,
        json!({"aps": {"content-available": 1}, "corelay": {"conversation": "conv-1", "read_upto": 17}})
    );
}

#[test]
fn apns_dead_tokens_are_token_gone_and_other_4xx_failed() {
    let (stub, apns) = apns_setup();
    let rt = rt();
    stub.fail_tokens(
        &["dead"],
        410,
        r#"{"reason":"Unregistered","timestamp":1700000000000}"#,
    );
    assert_eq!(
        rt.block_on(apns.send("dead", &alert("c", 1, None))),
        Outcome::TokenGone("Unregistered".into())
    );
    // Every request for that token, not only the first.
    assert_eq!(
        rt.block_on(apns.send("dead", &clear("c", 1))),
        Outcome::TokenGone("Unregistered".into())
    );

    stub.push_response(Scripted::apns(400, "BadDeviceToken"));
    assert_eq!(
        rt.block_on(apns.send("bad", &alert("c", 1, None))),
        Outcome::TokenGone("BadDeviceToken".into())
    );
    stub.push_response(Scripted::apns(400, "DeviceTokenNotForTopic"));
    assert_eq!(
        rt.block_on(apns.send("other-app", &alert("c", 1, None))),
        Outcome::TokenGone("DeviceTokenNotForTopic".into())
    );
    stub.push_response(Scripted::apns(413, "PayloadTooLarge"));
    assert_eq!(
        rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None))),
        Outcome::Failed("413 PayloadTooLarge".into())
    );

    // A "token" that cannot be a path segment never reaches the wire.
    assert!(matches!(
        rt.block_on(apns.send("../3/x", &alert("c", 1, None))),
        Outcome::TokenGone(_)
    ));
    assert_eq!(stub.requests().len(), 5);
    assert_eq!(stub.violations(), Vec::<String>::new());
    // The one connection survived all of it.
    assert_eq!(stub.connections(), 1);
}

#[test]
fn apns_expired_provider_token_is_reminted_and_the_request_retried_once() {
    let (stub, apns) = apns_setup();
    let rt = rt();
    stub.push_response(Scripted::apns(403, "ExpiredProviderToken"));
    assert_eq!(
        rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None))),
        Outcome::Sent
    );
    let reqs = stub.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].status, 403);
    assert_eq!(reqs[1].status, 200);
    assert_ne!(
        reqs[0].bearer(),
        reqs[1].bearer(),
        "the retry must carry a new JWT"
    );
    assert_eq!(apns.jwt_refreshes(), 1);

    // The new token is kept for later requests.
    assert_eq!(
        rt.block_on(apns.send(APNS_TOKEN, &alert("c", 2, None))),
        Outcome::Sent
    );
    assert_eq!(stub.requests()[2].bearer(), reqs[1].bearer());
    assert_eq!(apns.jwt_refreshes(), 1);

    // Refused again with the fresh token: retry later, no loop.
    stub.push_response(Scripted::apns(403, "ExpiredProviderToken"));
    stub.push_response(Scripted::apns(403, "ExpiredProviderToken"));
    assert!(matches!(
        rt.block_on(apns.send(APNS_TOKEN, &alert("c", 3, None))),
        Outcome::Retry { after: None, .. }
    ));
    assert_eq!(stub.requests().len(), 5);
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn apns_throttling_and_server_errors_are_retried() {
    let (stub, apns) = apns_setup();
    let rt = rt();
    stub.push_response(Scripted::apns(429, "TooManyRequests").header("retry-after", "3"));
    let o = rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None)));
    assert_eq!(
        o,
        Outcome::Retry {
            after: Some(Duration::from_secs(3)),
            reason: "429 TooManyRequests".into()
        }
    );

    stub.push_response(Scripted::apns(500, "InternalServerError"));
    let o = rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None)));
    assert_eq!(
        o,
        Outcome::Retry {
            after: None,
            reason: "500 InternalServerError".into()
        }
    );

    stub.push_response(Scripted::apns(503, "ServiceUnavailable").header("retry-after", "10"));
    assert_eq!(
        retry_after(&rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None)))),
        Some(Duration::from_secs(10))
    );
    assert_eq!(
        rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None))),
        Outcome::Sent
    );
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn apns_outage_is_retry_then_recovery_on_a_fresh_connection() {
    let (stub, apns) = apns_setup();
    let rt = rt();
    assert_eq!(
        rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None))),
        Outcome::Sent
    );
    assert_eq!(stub.connections(), 1);

    stub.set_down(true);
    for i in 0..3 {
        let o = rt.block_on(apns.send(APNS_TOKEN, &alert("c", 2 + i, None)));
        assert!(matches!(o, Outcome::Retry { after: None, .. }), "{o:?}");
    }
    stub.set_down(false);
    assert_eq!(
        rt.block_on(apns.send(APNS_TOKEN, &alert("c", 9, None))),
        Outcome::Sent
    );
    assert_eq!(stub.connections(), 2);
    let sent = stub.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!((sent[0].connection, sent[1].connection), (1, 2));
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn apns_goaway_moves_to_a_new_connection() {
    let (stub, apns) = apns_setup();
    let rt = rt();
    assert_eq!(
        rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None))),
        Outcome::Sent
    );
    stub.goaway();
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..3 {
        assert_eq!(
            rt.block_on(apns.send(APNS_TOKEN, &alert("c", 2 + i, None))),
            Outcome::Sent
        );
    }
    assert_eq!(stub.connections(), 2);
    assert_eq!(stub.sent().len(), 4);
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn apns_concurrent_sends_share_one_connection() {
    let (stub, apns) = apns_setup();
    let rt = rt();
    stub.set_delay(Duration::from_millis(100));
    let started = Instant::now();
    let outcomes = rt.block_on(futures_util::future::join_all((0..50u64).map(|i| {
        let apns = &apns;
        async move {
            apns.send(APNS_TOKEN, &alert(&format!("c{i}"), i, None))
                .await
        }
    })));
    assert!(outcomes.iter().all(|o| *o == Outcome::Sent), "{outcomes:?}");
    // Multiplexed: 50 requests of 100 ms each in well under 50 × 100 ms.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stub.connections(), 1);
    assert_eq!(apns.client().connects(), 1);
    assert_eq!(stub.sent().len(), 50);
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn apns_timeout_is_retry() {
    let (private, public) = es256_key();
    let stub = PushStub::apns(&public, KEY_ID, TEAM, TOPIC);
    let apns = apns_with(&stub, &private, Duration::from_millis(500));
    let rt = rt();
    stub.set_delay(Duration::from_secs(3));
    let started = Instant::now();
    let o = rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None)));
    assert!(matches!(o, Outcome::Retry { after: None, .. }), "{o:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn apns_stub_refuses_a_token_signed_by_another_key_or_for_another_topic() {
    // The stand-in really checks: a wrong key is Apple's 403 InvalidProviderToken (a permanent failure).
    let (_, public) = es256_key();
    let (other_private, _) = es256_key();
    let stub = PushStub::apns(&public, KEY_ID, TEAM, TOPIC);
    let apns = apns_with(&stub, &other_private, Duration::from_secs(5));
    let rt = rt();
    assert_eq!(
        rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None))),
        Outcome::Failed("403 InvalidProviderToken".into())
    );
    assert_eq!(stub.violations().len(), 1);

    let (private, public) = es256_key();
    let stub = PushStub::apns(&public, KEY_ID, TEAM, "com.example.other");
    let apns = apns_with(&stub, &private, Duration::from_secs(5));
    assert_eq!(
        rt.block_on(apns.send(APNS_TOKEN, &alert("c", 1, None))),
        Outcome::Failed("400 BadTopic".into())
    );
    assert_eq!(stub.violations().len(), 1);
}

// ----------------------------------------------------------------------------------------------- FCM

#[test]
fn fcm_alerts_share_one_cached_access_token() {
    let (stub, fcm) = fcm_setup();
    let rt = rt();
    assert_eq!(
        rt.block_on(fcm.send("fcm-tok-1", &alert("conv-1", 42, Some("hi")))),
        Outcome::Sent
    );
    let outcomes = rt.block_on(futures_util::future::join_all((0..20u64).map(|i| {
        let fcm = &fcm;
        async move {
            fcm.send(&format!("fcm-tok-{i}"), &alert("conv-2", i, None))
                .await
        }
    })));
    assert!(outcomes.iter().all(|o| *o == Outcome::Sent), "{outcomes:?}");
    assert_eq!(stub.violations(), Vec::<String>::new());
    assert_eq!(stub.token_requests(), 1);
    assert_eq!(fcm.token_exchanges(), 1);
    // The token endpoint is on the same origin here: one connection for everything.
    assert_eq!(stub.connections(), 1);

    let sent = stub.sent();
    assert_eq!(sent.len(), 21);
    let bearer = sent[0].bearer().unwrap().to_string();
    assert!(sent.iter().all(|r| r.bearer() == Some(bearer.as_str())));
    let r = &sent[0];
    assert_eq!(r.path, format!("/v1/projects/{PROJECT}/messages:send"));
    assert_eq!(r.device_token.as_deref(), Some("fcm-tok-1"));
    assert_eq!(
        r.json,
        json!({"message": {
            "token": "fcm-tok-1",
            "notification": {"title": "alice", "body": "hi"},
            "data": {"conversation": "conv-1", "offset": "42", "count": "1"},
            "android": {"collapse_key": "conv-1", "priority": "high"}
        }})
    );
}

#[test]
fn fcm_short_lived_token_is_exchanged_again_at_half_its_life() {
    let (stub, fcm) = fcm_setup();
    let rt = rt();
    stub.set_token_expires_in(2);
    assert_eq!(
        rt.block_on(fcm.send("t", &alert("c", 1, None))),
        Outcome::Sent
    );
    assert_eq!(
        rt.block_on(fcm.send("t", &alert("c", 2, None))),
        Outcome::Sent
    );
    assert_eq!(stub.token_requests(), 1);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        rt.block_on(fcm.send("t", &alert("c", 3, None))),
        Outcome::Sent
    );
    assert_eq!(stub.token_requests(), 2);
    assert_eq!(fcm.token_exchanges(), 2);
    let sent = stub.sent();
    assert_eq!(sent[0].bearer(), sent[1].bearer());
    assert_ne!(sent[1].bearer(), sent[2].bearer());
    // The stub flags any use of an expired token.
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn fcm_unregistered_and_invalid_tokens_are_token_gone() {
    let (stub, fcm) = fcm_setup();
    let rt = rt();
    let unregistered = Scripted::fcm(
        404,
        "NOT_FOUND",
        "UNREGISTERED",
        "Requested entity was not found.",
    );
    stub.fail_tokens(&["gone"], 404, &unregistered.body);
    assert!(
        matches!(rt.block_on(fcm.send("gone", &alert("c", 1, None))), Outcome::TokenGone(r) if r.contains("UNREGISTERED"))
    );

    stub.push_response(Scripted::fcm(
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
    ));
    assert!(matches!(
        rt.block_on(fcm.send("garbage", &alert("c", 1, None))),
        Outcome::TokenGone(_)
    ));

    stub.push_response(Scripted::fcm(
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "Invalid value at 'message.data'",
    ));
    assert!(matches!(
        rt.block_on(fcm.send("ok", &alert("c", 1, None))),
        Outcome::Failed(_)
    ));
    stub.push_response(Scripted::fcm(
        403,
        "PERMISSION_DENIED",
        "SENDER_ID_MISMATCH",
        "mismatch",
    ));
    assert!(matches!(
        rt.block_on(fcm.send("ok", &alert("c", 1, None))),
        Outcome::Failed(_)
    ));
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn fcm_quota_and_unavailable_are_retried_with_retry_after() {
    let (stub, fcm) = fcm_setup();
    let rt = rt();
    stub.push_response(
        Scripted::fcm(
            429,
            "RESOURCE_EXHAUSTED",
            "QUOTA_EXCEEDED",
            "Quota exceeded",
        )
        .header("retry-after", "3"),
    );
    assert_eq!(
        retry_after(&rt.block_on(fcm.send("t", &alert("c", 1, None)))),
        Some(Duration::from_secs(3))
    );
    stub.push_response(Scripted::fcm(
        503,
        "UNAVAILABLE",
        "UNAVAILABLE",
        "The service is currently unavailable.",
    ));
    assert_eq!(
        retry_after(&rt.block_on(fcm.send("t", &alert("c", 1, None)))),
        None
    );
    stub.push_response(Scripted::fcm(500, "INTERNAL", "INTERNAL", "Internal error"));
    assert_eq!(
        retry_after(&rt.block_on(fcm.send("t", &alert("c", 1, None)))),
        None
    );
    assert_eq!(
        rt.block_on(fcm.send("t", &alert("c", 1, None))),
        Outcome::Sent
    );
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn fcm_clear_is_a_data_only_message() {
    let (stub, fcm) = fcm_setup();
    let rt = rt();
    assert_eq!(
        rt.block_on(fcm.send("t", &clear("conv-1", 17))),
        Outcome::Sent
    );
    assert_eq!(stub.violations(), Vec::<String>::new());
    assert_eq!(
        stub.sent()[0].json,
        json!({"message": {
            "token": "t",
            "data": {"type": "read", "conversation": "conv-1", "read_upto": "17"},
            "android": {"priority": "normal", "collapse_key": "conv-1"}
        }})
    );
}

#[test]
fn fcm_unauthenticated_drops_the_token_and_retries_once() {
    let (stub, fcm) = fcm_setup();
    let rt = rt();
    assert_eq!(
        rt.block_on(fcm.send("t", &alert("c", 1, None))),
        Outcome::Sent
    );
    stub.push_response(Scripted::fcm(
        401,
        "UNAUTHENTICATED",
        "THIRD_PARTY_AUTH_ERROR",
        "bad credentials",
    ));
    assert_eq!(
        rt.block_on(fcm.send("t", &alert("c", 2, None))),
        Outcome::Sent
    );
    assert_eq!(stub.token_requests(), 2);
    let reqs = stub.requests();
    assert_eq!(reqs.len(), 3);
    assert_ne!(reqs[1].bearer(), reqs[2].bearer());

    stub.push_response(Scripted::fcm(
        401,
        "UNAUTHENTICATED",
        "UNAUTHENTICATED",
        "no",
    ));
    stub.push_response(Scripted::fcm(
        401,
        "UNAUTHENTICATED",
        "UNAUTHENTICATED",
        "no",
    ));
    assert!(matches!(
        rt.block_on(fcm.send("t", &alert("c", 3, None))),
        Outcome::Failed(_)
    ));
    assert_eq!(stub.token_requests(), 3);
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn fcm_token_endpoint_failures() {
    let (stub, fcm) = fcm_setup();
    let rt = rt();
    stub.push_token_response(Scripted::new(
        400,
        r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
    ));
    let o = rt.block_on(fcm.send("t", &alert("c", 1, None)));
    assert!(
        matches!(&o, Outcome::Failed(r) if r.contains("invalid_grant")),
        "{o:?}"
    );
    stub.push_token_response(Scripted::new(503, "").header("retry-after", "4"));
    assert_eq!(
        retry_after(&rt.block_on(fcm.send("t", &alert("c", 1, None)))),
        Some(Duration::from_secs(4))
    );
    // Nothing reached the messages endpoint, and a good exchange then works.
    assert!(stub.requests().is_empty());
    assert_eq!(
        rt.block_on(fcm.send("t", &alert("c", 1, None))),
        Outcome::Sent
    );
    assert_eq!(stub.token_requests(), 3);
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn fcm_outage_is_retry_then_recovery() {
    let (stub, fcm) = fcm_setup();
    let rt = rt();
    assert_eq!(
        rt.block_on(fcm.send("t", &alert("c", 1, None))),
        Outcome::Sent
    );
    stub.set_down(true);
    assert!(matches!(
        rt.block_on(fcm.send("t", &alert("c", 2, None))),
        Outcome::Retry { after: None, .. }
    ));
    stub.set_down(false);
    assert_eq!(
        rt.block_on(fcm.send("t", &alert("c", 3, None))),
        Outcome::Sent
    );
    assert_eq!(stub.connections(), 2);
    // The access token survived the outage.
    assert_eq!(stub.token_requests(), 1);
    assert_eq!(stub.violations(), Vec::<String>::new());
}

#[test]
fn fcm_concurrent_sends_share_one_failed_exchange() {
    let (stub, fcm) = fcm_setup();
    let rt = rt();
    stub.set_delay(Duration::from_millis(100));
    stub.push_token_response(Scripted::new(503, "").header("retry-after", "2"));
    let outcomes = rt.block_on(futures_util::future::join_all((0..10u64).map(|i| {
        let fcm = &fcm;
        async move { fcm.send("t", &alert("c", i, None)).await }
    })));
    assert!(
        outcomes
            .iter()
            .all(|o| retry_after(o) == Some(Duration::from_secs(2))),
        "{outcomes:?}"
    );
    assert_eq!(stub.token_requests(), 1, "one exchange for the whole wave");
    // A later send tries again.
    assert_eq!(
        rt.block_on(fcm.send("t", &alert("c", 99, None))),
        Outcome::Sent
    );
    assert_eq!(stub.token_requests(), 2);
    assert_eq!(stub.violations(), Vec::<String>::new());
}
