//! The Rust client (`crates/corelay-client`) against the real gateway over real sockets: chat, a gateway
//! SIGKILL and restart with sends queued, an expiring token, and the typed internal API.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use corelay_client::{Api, Client, ClientOptions, Created, Error, Event, Events, Message, State};
use serde_json::json;
use support::*;

const WITHIN: Duration = Duration::from_secs(10);

fn base(node: &Node) -> String {
    format!("http://{}", node.addr)
}

/// Quick reconnects, as in the JS SDK's tests.
fn quick(mut o: ClientOptions) -> ClientOptions {
    o = o.backoff(Duration::from_millis(50), Duration::from_millis(400));
    o.connect_timeout = Duration::from_secs(3);
    o
}

fn client(node: &Node, user: &str) -> (Client, Events) {
    Client::connect(quick(ClientOptions::new(base(node), token(user))))
}

/// `fut`, or a panic naming `what` after `within`.
async fn bounded<T>(within: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(within, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The first event `pick` accepts (others are skipped), within `WITHIN`.
async fn next_where<T>(
    events: &mut Events,
    what: &str,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    bounded(WITHIN, what, async {
        loop {
            let ev = events.recv().await.expect("the client's events ended");
            if let Some(t) = pick(ev) {
                return t;
            }
        }
    })
    .await
}

async fn next_message(events: &mut Events) -> Message {
    next_where(events, "a message", |e| match e {
        Event::Message(m) => Some(m),
        _ => None,
    })
    .await
}

async fn opened(c: &Client) {
    bounded(WITHIN, "the connection to open", c.opened())
        .await
        .expect("open");
}

async fn reached(c: &Client, s: State) {
    bounded(
        WITHIN,
        &format!("state {s:?}"),
        c.states().wait_for(|x| *x == s),
    )
    .await
    .expect("state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_chat_send_resolves_with_the_offset_and_the_other_receives_once() {
    let node = Node::start(&[]);
    let api = Api::new(base(&node), API_KEY);
    assert_eq!(
        api.create_conversation("c1", &["alice", "bob"])
            .await
            .unwrap(),
        Created::New
    );
    let (alice, _alice_events) = client(&node, "alice");
    let (bob, mut bob_events) = client(&node, "bob");
    opened(&alice).await;
    opened(&bob).await;

    let sent = bounded(WITHIN, "sent", alice.send("c1", json!({"text": "hi"})))
        .await
        .unwrap();
    assert_eq!((sent.conversation.as_str(), sent.offset), ("c1", 1));
    let m = next_message(&mut bob_events).await;
    assert_eq!(m.channel, "conversation:c1");
    assert_eq!(m.offset, 1);
    assert_eq!(m.from.as_deref(), Some("alice"));
    assert_eq!(m.body, json!({"text": "hi"}));
    assert_eq!(bob.cursor().get("conversation:c1"), Some(&1));

    // Once: the next message Bob sees is the next send, not a repeat.
    let second = bounded(WITHIN, "sent", alice.send("c1", "again"))
        .await
        .unwrap();
    assert_eq!(second.offset, 2);
    let m = next_message(&mut bob_events).await;
    assert_eq!((m.offset, m.body), (2, json!("again")));
    assert!(alice.outbox().is_empty());

    // History over the connection, newest first.
    let page = bounded(WITHIN, "history", bob.history("c1", None, Some(10)))
        .await
        .unwrap();
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
    assert_eq!((offsets, page.more), (vec![2, 1], false));

    // A new client resuming from a cursor gets what is after it, and nothing before.
    let cursor = [("conversation:c1".to_string(), 1)].into_iter().collect();
    let (bob2, mut bob2_events) = Client::connect(quick(
        ClientOptions::new(base(&node), token("bob")).cursor(cursor),
    ));
    let m = next_message(&mut bob2_events).await;
    assert_eq!((m.offset, m.body), (2, json!("again")));
    assert_eq!(bob2.cursor().get("conversation:c1"), Some(&2));
    bob2.close();

    // A refused send fails its future and leaves the outbox.
    let refused = bounded(WITHIN, "refusal", alice.send("not-mine", "x")).await;
    assert!(
        matches!(&refused, Err(Error::Refused { code, .. }) if code == "not_member"),
        "{refused:?}"
    );
    assert!(alice.outbox().is_empty());

    alice.close();
    reached(&alice, State::Closed).await;
    assert_eq!(alice.send("c1", "late").await, Err(Error::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_queued_across_a_gateway_kill_arrive_once_in_order_after_the_restart() {
    let dir = fresh_dir();
    let mut node = Node::start_in(&dir, &[]);
    let addr = node.addr;
    let api = Api::new(base(&node), API_KEY);
    api.create_conversation("crash", &["carol", "dave"])
        .await
        .unwrap();
    let (carol, _carol_events) = client(&node, "carol");
    let (dave, mut dave_events) = client(&node, "dave");
    opened(&carol).await;
    opened(&dave).await;
    for i in 0..5 {
        let s = bounded(WITHIN, "sent", carol.send("crash", format!("before {i}")))
            .await
            .unwrap();
        assert_eq!(s.offset, i + 1);
    }
    for i in 0..5 {
        assert_eq!(next_message(&mut dave_events).await.offset, i + 1);
    }

    node.kill9();
    reached(&carol, State::Reconnecting).await;
    reached(&dave, State::Reconnecting).await;
    assert_eq!(
        carol.history("crash", None, None).await,
        Err(Error::NotConnected)
    );
    // Ten sends while the gateway is down: queued in the outbox, in order.
    let sender = carol.clone();
    let during = tokio::spawn(async move {
        let sends = (0..10).map(|i| sender.send("crash", format!("during {i}")));
        futures_util::future::join_all(sends).await
    });
    bounded(WITHIN, "ten sends in the outbox", async {
        while carol.outbox().len() < 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let queued: Vec<String> = carol
        .outbox()
        .iter()
        .map(|e| e.body.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        queued,
        (0..10).map(|i| format!("during {i}")).collect::<Vec<_>>()
    );

    // Same port, same data dir.
    let node = Node::start_on(addr, &dir, &[]);
    let sents = bounded(Duration::from_secs(20), "the queued sends", during)
        .await
        .unwrap();
    let offsets: Vec<u64> = sents.into_iter().map(|s| s.unwrap().offset).collect();
    assert_eq!(offsets, (6..=15).collect::<Vec<u64>>());
    assert!(carol.outbox().is_empty());

    for i in 0..10u64 {
        let m = next_message(&mut dave_events).await;
        assert_eq!((m.offset, m.body), (6 + i, json!(format!("during {i}"))));
    }
    // Exactly once: the next thing Dave sees is a new message, not a repeat.
    let last = bounded(WITHIN, "sent", carol.send("crash", "after"))
        .await
        .unwrap();
    assert_eq!(last.offset, 16);
    let m = next_message(&mut dave_events).await;
    assert_eq!((m.offset, m.body), (16, json!("after")));
    // And the store holds each once.
    let stored: Vec<u64> = history(&node, "crash")
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(stored, (1..=16).collect::<Vec<u64>>());

    carol.close();
    dave.close();
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_replaced_from_the_token_source_and_the_connection_resumes() {
    let node = Node::start(&[]);
    let api = Api::new(base(&node), API_KEY);
    api.create_conversation("exp", &["erin", "frank"])
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    // The first token lives 2 s; later ones an hour.
    let source = move || {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let ttl = Duration::from_secs(if n == 0 { 2 } else { 3600 });
            Ok::<_, std::convert::Infallible>(corelay::auth::mint(SECRET, "erin", ttl).unwrap())
        }
    };
    let (erin, mut erin_events) =
        Client::connect(quick(ClientOptions::with_token_source(base(&node), source)));
    let (frank, _frank_events) = client(&node, "frank");
    opened(&erin).await;
    opened(&frank).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    bounded(WITHIN, "sent", frank.send("exp", "one"))
        .await
        .unwrap();
    assert_eq!(next_message(&mut erin_events).await.offset, 1);

    // The gateway closes with 4001 when the token expires; the client asks for a fresh one and reopens.
    next_where(&mut erin_events, "the expiry", |e| {
        (e == Event::State(State::Reconnecting)).then_some(())
    })
    .await;
    next_where(&mut erin_events, "the reopening", |e| {
        (e == Event::State(State::Open)).then_some(())
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one fresh token");

    // Resumed from the cursor: the next message is the next one, and sending works.
    bounded(WITHIN, "sent", frank.send("exp", "two"))
        .await
        .unwrap();
    let m = next_message(&mut erin_events).await;
    assert_eq!((m.offset, m.body), (2, json!("two")));
    let mine = bounded(WITHIN, "sent", erin.send("exp", "three"))
        .await
        .unwrap();
    assert_eq!(mine.offset, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    erin.close();
    frank.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_api_creates_publishes_and_pages_history() {
    let node = Node::start(&[]);
    let api = Api::new(base(&node), API_KEY);
    assert_eq!(
        api.create_conversation("api1", &["gus", "hal"])
            .await
            .unwrap(),
        Created::New
    );
    assert_eq!(
        api.create_conversation("api1", &["gus", "hal"])
            .await
            .unwrap(),
        Created::Existed
    );

    // Typed errors: status and reason.
    let e = Api::new(base(&node), "wrong-key")
        .publish("scores:m1", json!(1))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e:?}");
    let e = api
        .publish("conversation:api1", json!(1))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e:?}");
    assert!(
        matches!(&e, corelay_client::ApiError::Status { code, .. } if !code.is_empty()),
        "{e:?}"
    );

    // Publish to a topic a client follows, and to the user's own channel.
    let (gus, mut events) = Client::connect(quick(
        ClientOptions::new(base(&node), token("gus")).channels(["scores:m1"]),
    ));
    next_where(&mut events, "subscribed", |e| {
        matches!(e, Event::Subscribed(_)).then_some(())
    })
    .await;
    let offset = api
        .publish("scores:m1", json!({"home": 2, "away": 1}))
        .await
        .unwrap();
    let m = next_message(&mut events).await;
    assert_eq!(
        (m.channel.as_str(), m.offset, m.body),
        ("scores:m1", offset, json!({"home": 2, "away": 1}))
    );
    // A topic resumes through `subscribe` with the cursor: a client that saw the first publish gets the next.
    let next = api.publish("scores:m1", json!({"home": 3})).await.unwrap();
    let cursor = [("scores:m1".to_string(), offset)].into_iter().collect();
    let (late, mut late_events) = Client::connect(quick(
        ClientOptions::new(base(&node), token("hal"))
            .channels(["scores:m1"])
            .cursor(cursor),
    ));
    let m = next_message(&mut late_events).await;
    assert_eq!((m.offset, m.body), (next, json!({"home": 3})));
    late.close();
    assert_eq!(next_message(&mut events).await.offset, next);
    api.publish("user:gus", json!({"hello": "gus"}))
        .await
        .unwrap();
    let notice = next_where(&mut events, "a notice", |e| match e {
        Event::Notice(n) => Some(n),
        _ => None,
    })
    .await;
    assert_eq!(notice.body, json!({"hello": "gus"}));
    assert_eq!(notice.channel, "user:gus");

    // Push devices.
    api.register_device("gus", "apns", "0a1b2c", None)
        .await
        .unwrap();
    api.unregister_device("gus", "apns", "0a1b2c")
        .await
        .unwrap();
    let e = api
        .register_device("gus", "pager", "0a1b2c", None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e:?}");

    // History pages through the API.
    for i in 1..=3 {
        let s = bounded(WITHIN, "sent", gus.send("api1", format!("m{i}")))
            .await
            .unwrap();
        assert_eq!(s.offset, i);
    }
    let page = api.history("api1", None, Some(2)).await.unwrap();
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
    assert_eq!((offsets, page.more), (vec![3, 2], true));
    assert_eq!(page.messages[0].body, json!("m3"));
    let page = api.history("api1", Some(2), Some(2)).await.unwrap();
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
    assert_eq!((offsets, page.more), (vec![1], false));
    gus.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_gateway_is_noticed_by_the_liveness_check_and_the_client_comes_back() {
    // Heartbeat 1 s + timeout 1 s: the welcome announces them, and the client holds the gateway to them.
    let node = Node::start(&["--heartbeat-interval", "1s", "--heartbeat-timeout", "1s"]);
    let api = Api::new(base(&node), API_KEY);
    api.create_conversation("live", &["ivy", "jon"])
        .await
        .unwrap();
    let (ivy, mut ivy_events) = client(&node, "ivy");
    let (jon, _jon_events) = client(&node, "jon");
    opened(&ivy).await;
    opened(&jon).await;

    // SIGSTOP: the sockets stay open, nothing arrives; only the liveness check can tell.
    let pid = node.child.id().to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
    };
    signal("-STOP");
    let stopped = std::time::Instant::now();
    reached(&ivy, State::Reconnecting).await;
    let noticed = stopped.elapsed();
    signal("-CONT");
    assert!(
        noticed >= Duration::from_millis(900) && noticed < Duration::from_secs(5),
        "noticed after {noticed:?}"
    );
    opened(&ivy).await;
    opened(&jon).await;
    bounded(WITHIN, "sent", jon.send("live", "still here"))
        .await
        .unwrap();
    let m = next_message(&mut ivy_events).await;
    assert_eq!(m.body, json!("still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_refused_as_store_busy_are_retried_until_each_is_stored_once() {
    let node = Node::start(&["--max-pending-writes", "1"]);
    let api = Api::new(base(&node), API_KEY);
    api.create_conversation("busy", &["kim"]).await.unwrap();
    let (kim, _events) = client(&node, "kim");
    opened(&kim).await;
    const N: usize = 100;
    let sends = (0..N).map(|i| kim.send("busy", json!(i)));
    let sents = bounded(
        Duration::from_secs(30),
        "every send",
        futures_util::future::join_all(sends),
    )
    .await;
    let mut offsets: Vec<u64> = sents.into_iter().map(|s| s.unwrap().offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=N as u64).collect::<Vec<_>>());
    let mut stored: Vec<u64> = history(&node, "busy")
        .iter()
        .map(|m| m["body"].as_u64().unwrap())
        .collect();
    stored.sort_unstable();
    assert_eq!(stored, (0..N as u64).collect::<Vec<_>>(), "each once");
    assert!(kim.outbox().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_keeps_the_connection_open_past_the_old_expiry() {
    let node = Node::start(&[]);
    let short = corelay::auth::mint(SECRET, "lou", Duration::from_secs(2)).unwrap();
    let (lou, mut events) = Client::connect(quick(ClientOptions::new(base(&node), short)));
    opened(&lou).await;
    lou.refresh(&token("lou"));
    next_where(&mut events, "refreshed", |e| match e {
        Event::Other(v) if v["type"] == "refreshed" => Some(()),
        _ => None,
    })
    .await;
    // Past the first token's expiry (whole seconds, so at most 2 s from now), the connection is the same.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lou.state(), State::Open);
    while let Ok(e) = events.try_recv() {
        assert_ne!(e, Event::State(State::Reconnecting), "no reconnect");
    }
    lou.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_handed_to_a_new_client_is_delivered_once() {
    let dir = fresh_dir();
    let mut node = Node::start_in(&dir, &[]);
    let addr = node.addr;
    let api = Api::new(base(&node), API_KEY);
    api.create_conversation("hand", &["mia", "ned"])
        .await
        .unwrap();
    let (mia, _mia_events) = client(&node, "mia");
    opened(&mia).await;
    let first = bounded(WITHIN, "sent", mia.send("hand", "first"))
        .await
        .unwrap();

    // The gateway goes away; a send is queued; the process "exits" (close) with it unanswered.
    node.kill9();
    reached(&mia, State::Reconnecting).await;
    let queued = {
        let mia = mia.clone();
        tokio::spawn(async move { mia.send("hand", "second").await })
    };
    bounded(WITHIN, "the queued send", async {
        while mia.outbox().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    mia.close();
    assert_eq!(queued.await.unwrap(), Err(Error::Closed));
    let mut saved = mia.outbox();
    assert_eq!(saved.len(), 1);
    // Plus the first send again, as if its `sent` had been lost: the gateway knows its client id.
    saved.insert(
        0,
        corelay_client::OutboxEntry {
            client_id: first.client_id.clone(),
            conversation: "hand".into(),
            body: json!("first"),
        },
    );

    let node = Node::start_on(addr, &dir, &[]);
    let (ned, mut ned_events) = client(&node, "ned");
    let mut options = quick(ClientOptions::new(base(&node), token("mia")));
    options.outbox = saved;
    let (mia2, _mia2_events) = Client::connect(options);
    bounded(WITHIN, "the handed outbox to drain", async {
        while !mia2.outbox().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let m = next_message(&mut ned_events).await;
    assert_eq!((m.offset, m.body), (1, json!("first")));
    let m = next_message(&mut ned_events).await;
    assert_eq!((m.offset, m.body), (2, json!("second")));
    let last = bounded(WITHIN, "sent", mia2.send("hand", "third"))
        .await
        .unwrap();
    assert_eq!(last.offset, 3, "the resent first send was not stored again");
    let m = next_message(&mut ned_events).await;
    assert_eq!((m.offset, m.body), (3, json!("third")));
    mia2.close();
    ned.close();
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
