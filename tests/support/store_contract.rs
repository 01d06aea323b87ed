//! The contract every `Store` implementation passes (the embedded and Redis stores always; Scylla when
//! `SCYLLA_NODES` is set). Each run uses a fresh namespace of channel and user names, so it can share a
//! database. Test code (it panics on every broken promise), so it lives with the tests, not in the library;
//! `tests/store_contract.rs` includes it.

use corelay::store::{
    Appended, NewMessage, PushFor, PushKind, PushRow, ReceiptState, Store, Write, WriteResult,
};

fn msg(channel: &str, from: Option<&str>, cid: Option<&str>, ts: u64, offline: &[&str]) -> Write {
    Write::Append(NewMessage {
        channel: channel.to_string(),
        from: from.map(str::to_string),
        client_id: cid.map(str::to_string),
        ts,
        json: format!("{{\"n\":{ts}}}"),
        offline: offline.iter().map(|s| s.to_string()).collect(),
        push: Vec::new(),
    })
}

fn appended(r: &WriteResult) -> Appended {
    match r {
        WriteResult::Appended(a) => *a,
        other => panic!("expected an append result, got {other:?}"),
    }
}

/// Entries in the long offline queue check: more than one Lua `unpack` takes (about 8,000), so the Redis store
/// is held to it too.
pub const LONG_QUEUE: u64 = 12_000;

/// Runs every contract check. `make` opens the store; it is called twice (the second time after the first
/// store was dropped) to check that data survives a reopen.
pub fn run_all(make: &mut dyn FnMut() -> Box<dyn Store>) {
    let ns = format!(
        "t{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() % 1_000_000_000)
            .unwrap_or(0)
    );
    let conv = format!("conversation:{ns}c1");
    let user_ch = format!("user:{ns}alice");
    let (alice, bob) = (format!("{ns}alice"), format!("{ns}bob"));
    let mut s = make();

    // Group commit: many appends in one call, offsets dense and in order; a retry in the same batch dedupes.
    let batch: Vec<Write> = (1..=5)
        .map(|i| {
            msg(
                &conv,
                Some(&alice),
                Some(&format!("k{i}")),
                100 + i,
                &[&bob],
            )
        })
        .chain([msg(&conv, Some(&alice), Some("k3"), 999, &[&bob])])
        .collect();
    let r = s.commit(&batch).expect("commit");
    assert_eq!(r.len(), 6);
    for (i, res) in r.iter().take(5).enumerate() {
        assert_eq!(
            appended(res),
            Appended::New {
                offset: i as u64 + 1
            }
        );
    }
    assert_eq!(
        appended(&r[5]),
        Appended::Duplicate { offset: 3, ts: 103 },
        "dedupe within a batch"
    );
    // ...and across batches; the same client id from another user is a different message.
    let r = s
        .commit(&[
            msg(&conv, Some(&alice), Some("k1"), 1, &[]),
            msg(&conv, Some(&bob), Some("k1"), 106, &[]),
        ])
        .unwrap();
    assert_eq!(appended(&r[0]), Appended::Duplicate { offset: 1, ts: 101 });
    assert_eq!(appended(&r[1]), Appended::New { offset: 6 });
    assert_eq!(s.last_offset(&conv).unwrap(), 6);
    assert_eq!(s.last_offset("conversation:never").unwrap(), 0);

    // Messages without a dedupe key (receipts on user channels) always append.
    let r = s
        .commit(&[
            msg(&user_ch, None, None, 7, &[]),
            msg(&user_ch, None, None, 8, &[]),
        ])
        .unwrap();
    assert_eq!(appended(&r[1]), Appended::New { offset: 2 });

    // History: newest first, paged with `before`.
    let page = s.history(&conv, None, 4).unwrap();
    assert_eq!(
        page.iter().map(|m| m.offset).collect::<Vec<_>>(),
        [6, 5, 4, 3]
    );
    assert_eq!(page[1].from.as_deref(), Some(alice.as_str()));
    assert_eq!(page[1].json, "{\"n\":105}");
    let page = s.history(&conv, Some(3), 10).unwrap();
    assert_eq!(page.iter().map(|m| m.offset).collect::<Vec<_>>(), [2, 1]);
    assert!(s.history(&conv, Some(1), 10).unwrap().is_empty());

    // Resume: after an offset, oldest first.
    let after = s.read_after(&conv, 4, 10).unwrap();
    assert_eq!(after.iter().map(|m| m.offset).collect::<Vec<_>>(), [5, 6]);
    assert_eq!(s.read_after(&conv, 0, 2).unwrap().len(), 2);
    assert!(s.read_after(&conv, 6, 10).unwrap().is_empty());

    // Offline queue: bob got 1..=5 queued in the append transactions; read in order, trim on ack.
    let q = s.offline(&bob, 100).unwrap();
    assert_eq!(
        q.iter().map(|m| m.offset).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert!(q.iter().all(|m| m.channel == conv));
    s.commit(&[Write::TrimOffline {
        user: bob.clone(),
        channel: conv.clone(),
        upto: 3,
    }])
    .unwrap();
    assert_eq!(
        s.offline(&bob, 100)
            .unwrap()
            .iter()
            .map(|m| m.offset)
            .collect::<Vec<_>>(),
        [4, 5]
    );
    assert!(s.offline(&alice, 100).unwrap().is_empty());

    // Receipts: sent → delivered → read, never backwards; read implies delivered.
    let rc = |state, offset| Write::Receipt {
        conversation: conv.clone(),
        member: bob.clone(),
        state,
        offset,
    };
    let r = s
        .commit(&[
            rc(ReceiptState::Delivered, 4),
            rc(ReceiptState::Read, 2),
            rc(ReceiptState::Delivered, 3),
        ])
        .unwrap();
    assert_eq!(
        r[0],
        WriteResult::Receipt {
            prev_delivered: 0,
            prev_read: 0
        }
    );
    assert_eq!(
        r[1],
        WriteResult::Receipt {
            prev_delivered: 4,
            prev_read: 0
        }
    );
    assert_eq!(
        r[2],
        WriteResult::Receipt {
            prev_delivered: 4,
            prev_read: 2
        },
        "no step back"
    );
    s.commit(&[rc(ReceiptState::Read, 6)]).unwrap();
    let rs = s.receipts(&conv).unwrap();
    assert_eq!(rs.len(), 1);
    assert_eq!(
        (rs[0].member.as_str(), rs[0].delivered, rs[0].read),
        (bob.as_str(), 6, 6)
    );

    // Conversations and members, devices.
    let id = format!("{ns}c1");
    s.commit(&[Write::PutConversation {
        id: id.clone(),
        members: vec![alice.clone(), bob.clone()],
    }])
    .unwrap();
    s.commit(&[
        Write::PutDevice {
            user: alice.clone(),
            platform: "apns".into(),
            token: "tok1".into(),
        },
        Write::PutDevice {
            user: alice.clone(),
            platform: "fcm".into(),
            token: "tok2".into(),
        },
    ])
    .unwrap();
    let mut devs = s.devices(&alice).unwrap();
    devs.sort();
    assert_eq!(
        devs,
        [
            ("apns".to_string(), "tok1".to_string()),
            ("fcm".to_string(), "tok2".to_string())
        ]
    );
    // A device is forgotten (twice is harmless).
    for _ in 0..2 {
        s.commit(&[Write::DeleteDevice {
            user: alice.clone(),
            platform: "fcm".into(),
            token: "tok2".into(),
        }])
        .unwrap();
    }
    assert_eq!(
        s.devices(&alice).unwrap(),
        [("apns".to_string(), "tok1".to_string())]
    );

    // Everything survives closing and reopening.
    drop(s);
    let mut s = make();
    assert_eq!(s.last_offset(&conv).unwrap(), 6);
    let convs = s.conversations().unwrap();
    let c = convs
        .iter()
        .find(|(i, _)| *i == id)
        .expect("conversation kept");
    assert_eq!(c.1, [alice.clone(), bob.clone()]);
    assert_eq!(s.offline(&bob, 100).unwrap().len(), 2);
    let r = s
        .commit(&[msg(&conv, Some(&alice), Some("k2"), 1, &[])])
        .unwrap();
    assert_eq!(
        appended(&r[0]),
        Appended::Duplicate { offset: 2, ts: 102 },
        "dedupe survives a reopen"
    );
    let r = s
        .commit(&[msg(&conv, Some(&alice), Some("k7"), 107, &[])])
        .unwrap();
    assert_eq!(
        appended(&r[0]),
        Appended::New { offset: 7 },
        "offsets continue after a reopen"
    );

    long_offline_queue(&mut *s, &ns);
    removed_member_loses_offline_entries(&mut *s, &ns);
    push_obligations(&mut *s, &ns);
    device_tokens_move(&mut *s, &ns);
    drop(s);
    let mut s = make();
    let rows = ns_rows(&mut *s, &ns);
    assert_eq!(
        rows.iter()
            .map(|r| (r.kind, r.user.as_str(), r.upto))
            .collect::<Vec<_>>(),
        [(PushKind::Alert, format!("{ns}dan").as_str(), 5)],
        "push rows survive a reopen"
    );
    let carol = format!("{ns}carol");
    assert_eq!(
        s.offline(&carol, 10)
            .unwrap()
            .iter()
            .map(|m| (m.channel.as_str(), m.offset))
            .collect::<Vec<_>>(),
        [(format!("conversation:{ns}r2").as_str(), 1)],
        "a removal's dropped entries stay dropped after a reopen"
    );
}

/// A conversation message with push obligations: (user, due_ms).
fn pushed(channel: &str, from: &str, cid: &str, push: &[(&str, u64)]) -> Write {
    Write::Append(NewMessage {
        channel: channel.to_string(),
        from: Some(from.to_string()),
        client_id: Some(cid.to_string()),
        ts: 1,
        json: "{}".into(),
        offline: Vec::new(),
        push: push
            .iter()
            .map(|(u, d)| PushFor {
                user: u.to_string(),
                due_ms: *d,
                online_due_ms: *d,
                preview: None,
            })
            .collect(),
    })
}

/// This namespace's push rows, sorted (the store may hold other runs' rows).
fn ns_rows(s: &mut dyn Store, ns: &str) -> Vec<PushRow> {
    let mut v: Vec<PushRow> = s
        .push_rows()
        .unwrap()
        .into_iter()
        .filter(|r| r.user.starts_with(ns))
        .collect();
    v.sort_by(|a, b| (a.kind, &a.user).cmp(&(b.kind, &b.user)));
    v
}

/// Claims at `now` and keeps this namespace's jobs: (kind, user, upto, count, attempts, devices).
fn claim(s: &mut dyn Store, ns: &str, now: u64) -> Vec<(PushKind, String, u64, u32, u32, usize)> {
    let mut v: Vec<_> = s
        .push_claim(now, 10_000, 10_000)
        .unwrap()
        .into_iter()
        .filter(|j| j.row.user.starts_with(ns))
        .map(|j| {
            (
                j.row.kind,
                j.row.user,
                j.row.upto,
                j.row.count,
                j.row.attempts,
                j.devices.len(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Push obligations: created with the message, collapsed per (member, conversation), claimed once per lease,
/// fulfilled by an ack on any device, left with the rest when newer messages came during a push, retried at
/// a later due time, dropped; a read of an alerted conversation creates the background (clear) push.
fn push_obligations(s: &mut dyn Store, ns: &str) {
    let conv_id = format!("{ns}p1");
    let conv = format!("conversation:{conv_id}");
    let (alice, bob, carol) = (
        format!("{ns}alice"),
        format!("{ns}bob"),
        format!("{ns}carol"),
    );
    // Times far in the future of any other run's rows would be claimed by them too; these are small.
    s.commit(&[Write::PutDevice {
        user: bob.clone(),
        platform: "apns".into(),
        token: format!("{ns}bobphone"),
    }])
    .unwrap();
    s.commit(&[pushed(&conv, &alice, "m1", &[(&bob, 1000), (&carol, 5000)])])
        .unwrap();
    let r = s
        .commit(&[
            pushed(&conv, &alice, "m2", &[(&bob, 2000), (&carol, 6000)]),
            // A retried send changes nothing.
            pushed(&conv, &alice, "m1", &[(&bob, 0), (&carol, 0)]),
        ])
        .unwrap();
    assert_eq!(appended(&r[1]), Appended::Duplicate { offset: 1, ts: 1 });
    let rows = ns_rows(s, ns);
    assert_eq!(
        rows.iter()
            .map(|r| (r.user.as_str(), r.upto, r.count, r.due_ms, r.from.as_str()))
            .collect::<Vec<_>>(),
        [
            (bob.as_str(), 2, 2, 1000, alice.as_str()),
            (carol.as_str(), 2, 2, 5000, alice.as_str())
        ],
        "one row per member, collapsed, the earliest due time kept"
    );
    // Only what is due is claimed, once per lease, with the user's devices.
    assert_eq!(
        claim(s, ns, 1500),
        [(PushKind::Alert, bob.clone(), 2, 2, 1, 1)]
    );
    assert_eq!(claim(s, ns, 1500), [], "leased");
    // Carol acks on one of her devices: a partial ack keeps the row, a full one fulfils it.
    for (offset, left) in [(1, 2), (2, 1)] {
        s.commit(&[Write::Receipt {
            conversation: conv_id.clone(),
            member: carol.clone(),
            state: ReceiptState::Delivered,
            offset,
        }])
        .unwrap();
        assert_eq!(ns_rows(s, ns).len(), left);
    }
    // Bob's push went out up to 2.
    s.commit(&[Write::PushDone {
        kind: PushKind::Alert,
        user: bob.clone(),
        conversation: conv_id.clone(),
        upto: 2,
        count: 2,
    }])
    .unwrap();
    assert_eq!(ns_rows(s, ns), []);
    // A message while the next push is out stays due after it.
    s.commit(&[pushed(&conv, &alice, "m3", &[(&bob, 0)])])
        .unwrap();
    assert_eq!(
        claim(s, ns, 100),
        [(PushKind::Alert, bob.clone(), 3, 1, 1, 1)]
    );
    s.commit(&[pushed(&conv, &alice, "m4", &[(&bob, 50)])])
        .unwrap();
    s.commit(&[Write::PushDone {
        kind: PushKind::Alert,
        user: bob.clone(),
        conversation: conv_id.clone(),
        upto: 3,
        count: 1,
    }])
    .unwrap();
    assert_eq!(
        claim(s, ns, 100),
        [(PushKind::Alert, bob.clone(), 4, 1, 1, 1)],
        "the rest is due at once, attempts start over"
    );
    // A retry later, then dropped.
    s.commit(&[Write::PushRetry {
        kind: PushKind::Alert,
        user: bob.clone(),
        conversation: conv_id.clone(),
        due_ms: 90_000,
    }])
    .unwrap();
    assert_eq!(claim(s, ns, 50_000), []);
    assert_eq!(
        claim(s, ns, 90_000),
        [(PushKind::Alert, bob.clone(), 4, 1, 2, 1)]
    );
    s.commit(&[Write::PushDrop {
        kind: PushKind::Alert,
        user: bob.clone(),
        conversation: conv_id.clone(),
        upto: 4,
    }])
    .unwrap();
    assert_eq!(ns_rows(s, ns), []);
    // Bob reads on one device: the conversation was alerted (up to 3), so the others get a clear push.
    // Carol was never alerted: her read creates nothing.
    for who in [&bob, &carol] {
        s.commit(&[Write::Receipt {
            conversation: conv_id.clone(),
            member: who.clone(),
            state: ReceiptState::Read,
            offset: 4,
        }])
        .unwrap();
    }
    assert_eq!(
        claim(s, ns, 100_000),
        [(PushKind::Clear, bob.clone(), 4, 1, 1, 1)]
    );
    s.commit(&[Write::PushDone {
        kind: PushKind::Clear,
        user: bob.clone(),
        conversation: conv_id.clone(),
        upto: 4,
        count: 1,
    }])
    .unwrap();
    // Read again (nothing new) and nothing is queued; the alert mark was cleared by the read.
    s.commit(&[Write::Receipt {
        conversation: conv_id.clone(),
        member: bob.clone(),
        state: ReceiptState::Read,
        offset: 4,
    }])
    .unwrap();
    assert_eq!(ns_rows(s, ns), []);
    // One row left for the reopen check.
    s.commit(&[pushed(&conv, &alice, "m5", &[(&format!("{ns}dan"), 7)])])
        .unwrap();
    let rows = ns_rows(s, ns);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].upto, 5, "offsets are the conversation's");
    // Bob reads on another device while an alert is out: when the alert is done, the clear follows.
    s.commit(&[pushed(&conv, &alice, "m6", &[(&bob, 0)])])
        .unwrap();
    assert_eq!(
        claim(s, ns, 3),
        [(PushKind::Alert, bob.clone(), 6, 1, 1, 1)]
    );
    s.commit(&[Write::Receipt {
        conversation: conv_id.clone(),
        member: bob.clone(),
        state: ReceiptState::Read,
        offset: 6,
    }])
    .unwrap();
    s.commit(&[Write::PushDone {
        kind: PushKind::Alert,
        user: bob.clone(),
        conversation: conv_id.clone(),
        upto: 6,
        count: 1,
    }])
    .unwrap();
    assert_eq!(
        claim(s, ns, 3),
        [(PushKind::Clear, bob.clone(), 6, 1, 1, 1)]
    );
    s.commit(&[Write::PushDone {
        kind: PushKind::Clear,
        user: bob.clone(),
        conversation: conv_id.clone(),
        upto: 6,
        count: 1,
    }])
    .unwrap();
    assert_eq!(ns_rows(s, ns).len(), 1, "only dan's row is left");
}

/// A token belongs to one user: registering it for another moves it.
fn device_tokens_move(s: &mut dyn Store, ns: &str) {
    let (erin, fay) = (format!("{ns}erin"), format!("{ns}fay"));
    for u in [&erin, &fay] {
        s.commit(&[Write::PutDevice {
            user: u.clone(),
            platform: "fcm".into(),
            token: format!("{ns}shared"),
        }])
        .unwrap();
    }
    assert_eq!(s.devices(&erin).unwrap(), []);
    assert_eq!(
        s.devices(&fay).unwrap(),
        [("fcm".to_string(), format!("{ns}shared"))]
    );
}

/// (channel, offset) of each message, in order.
fn keys(q: &[corelay::store::StoredMessage]) -> Vec<(String, u64)> {
    q.iter().map(|m| (m.channel.clone(), m.offset)).collect()
}

/// A user with a [`LONG_QUEUE`]-entry offline queue over two conversations acks part of one: the commit
/// succeeds and exactly the unacked entries stay.
fn long_offline_queue(s: &mut dyn Store, ns: &str) {
    let dave = format!("{ns}dave");
    let (c1, c2) = (
        format!("conversation:{ns}q1"),
        format!("conversation:{ns}q2"),
    );
    let writes: Vec<Write> = (0..LONG_QUEUE)
        .map(|i| {
            let ch = if i % 3 == 0 { &c2 } else { &c1 };
            msg(ch, None, None, i, &[&dave])
        })
        .collect();
    let mut queued = Vec::new();
    let mut json = std::collections::HashMap::new();
    for chunk in writes.chunks(2000) {
        for (w, r) in chunk.iter().zip(s.commit(chunk).expect("queue")) {
            let (Write::Append(m), Appended::New { offset }) = (w, appended(&r)) else {
                panic!("expected a new append, got {r:?}");
            };
            queued.push((m.channel.clone(), offset));
            json.insert((m.channel.clone(), offset), m.json.clone());
        }
    }
    queued.sort();
    assert_eq!(keys(&s.offline(&dave, 100_000).unwrap()), queued);

    // c1 holds 8,000 entries, c2 4,000: the ack of c1 up to 2,000 leaves 10,000.
    let r = s.commit(&[Write::TrimOffline {
        user: dave.clone(),
        channel: c1.clone(),
        upto: 2000,
    }]);
    assert_eq!(
        r.expect("the ack commits"),
        [WriteResult::Done],
        "the ack is reported as applied"
    );
    let left: Vec<(String, u64)> = queued
        .into_iter()
        .filter(|(ch, o)| *ch != c1 || *o > 2000)
        .collect();
    assert_eq!(left.len(), LONG_QUEUE as usize - 2000);
    let q = s.offline(&dave, 100_000).unwrap();
    assert_eq!(q.len(), left.len(), "exactly the unacked entries stay");
    assert_eq!(keys(&q), left, "by channel, then offset");
    assert!(
        q.iter()
            .all(|m| json[&(m.channel.clone(), m.offset)] == m.json),
        "each entry is its own message"
    );
    // A bounded read gets the first ones in (channel, offset) order, and pages continue exactly after them:
    // a flush read page by page sees every entry once, in order.
    let some = keys(&s.offline(&dave, 3).unwrap());
    assert_eq!(some, left[..3]);
    let mut paged: Vec<(String, u64)> = Vec::new();
    loop {
        let after = paged.last().map(|(c, o)| (c.as_str(), *o));
        let page = keys(&s.offline_after(&dave, after, 1500).unwrap());
        if page.is_empty() {
            break;
        }
        paged.extend(page);
    }
    assert_eq!(paged, left, "pages cover the queue once, in order");

    // Acking the rest empties the queue.
    s.commit(&[
        Write::TrimOffline {
            user: dave.clone(),
            channel: c1,
            upto: LONG_QUEUE,
        },
        Write::TrimOffline {
            user: dave.clone(),
            channel: c2,
            upto: LONG_QUEUE,
        },
    ])
    .unwrap();
    assert!(s.offline(&dave, 100).unwrap().is_empty());
}

/// A member removed from a conversation loses its offline entries there (they could never be acked), and
/// keeps those of other conversations.
fn removed_member_loses_offline_entries(s: &mut dyn Store, ns: &str) {
    let (alice, carol) = (format!("{ns}alice"), format!("{ns}carol"));
    let (r1, r2) = (format!("{ns}r1"), format!("{ns}r2"));
    let (ch1, ch2) = (format!("conversation:{r1}"), format!("conversation:{r2}"));
    let put = |id: &str, members: &[&str]| Write::PutConversation {
        id: id.to_string(),
        members: members.iter().map(|m| m.to_string()).collect(),
    };
    s.commit(&[put(&r1, &[&alice, &carol]), put(&r2, &[&alice, &carol])])
        .unwrap();
    s.commit(&[
        msg(&ch1, Some(&alice), Some("a"), 1, &[&carol]),
        msg(&ch2, Some(&alice), Some("b"), 2, &[&carol]),
        msg(&ch1, Some(&alice), Some("c"), 3, &[&carol]),
    ])
    .unwrap();
    assert_eq!(
        keys(&s.offline(&carol, 10).unwrap()),
        [(ch1.clone(), 1), (ch1.clone(), 2), (ch2.clone(), 1)]
    );

    s.commit(&[put(&r1, &[&alice])]).unwrap();
    assert_eq!(
        keys(&s.offline(&carol, 10).unwrap()),
        [(ch2.clone(), 1)],
        "the removed member's entries of that conversation are gone, the others kept"
    );
    // An append queued for her by a node that had not yet heard of the removal is not handed out either, and
    // does not take the place of her other entries.
    s.commit(&[msg(&ch1, Some(&alice), Some("d"), 4, &[&carol])])
        .unwrap();
    assert_eq!(keys(&s.offline(&carol, 1).unwrap()), [(ch2.clone(), 1)]);
    assert!(s.offline(&alice, 10).unwrap().is_empty());
    assert_eq!(
        s.last_offset(&ch1).unwrap(),
        3,
        "the messages themselves stay"
    );
}

/// Two stores on one database append to one conversation at once: every message gets its own offset, offsets
/// stay dense (1..=2n), and each offset holds the message it was reported for. For stores several gateway
/// nodes share (Redis, Scylla).
pub fn concurrent_appends(a: Box<dyn Store>, b: Box<dyn Store>, n: u64) {
    let ns = format!(
        "t{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() % 1_000_000_000)
            .unwrap_or(0)
    );
    let conv = format!("conversation:{ns}race");
    let run = |mut s: Box<dyn Store>, who: &'static str| {
        let (conv, ns) = (conv.clone(), ns.clone());
        std::thread::spawn(move || {
            let mut got = Vec::new();
            for i in 0..n {
                // Small batches, so the two writers interleave.
                let from = format!("{ns}{who}");
                let w = msg(&conv, Some(&from), Some(&format!("{who}{i}")), i, &[]);
                let Write::Append(m) = &w else { unreachable!() };
                let json = m.json.clone();
                let r = s.commit(&[w]).expect("append");
                match appended(&r[0]) {
                    Appended::New { offset } => got.push((offset, from, json)),
                    other => panic!("{who}: a new message was taken for a retry: {other:?}"),
                }
            }
            (s, got)
        })
    };
    let (ta, tb) = (run(a, "a"), run(b, "b"));
    let (mut s, mut got) = ta.join().expect("writer a");
    got.extend(tb.join().expect("writer b").1);
    got.sort();
    let offsets: Vec<u64> = got.iter().map(|(o, _, _)| *o).collect();
    assert_eq!(
        offsets,
        (1..=2 * n).collect::<Vec<_>>(),
        "each message its own offset, dense"
    );
    assert_eq!(s.last_offset(&conv).unwrap(), 2 * n);
    let log = s.read_after(&conv, 0, 4 * n as usize).unwrap();
    assert_eq!(log.len(), 2 * n as usize, "no message overwritten");
    for (m, (offset, from, json)) in log.iter().zip(&got) {
        assert_eq!(
            (m.offset, m.from.as_deref(), m.json.as_str()),
            (*offset, Some(from.as_str()), json.as_str())
        );
    }
}
