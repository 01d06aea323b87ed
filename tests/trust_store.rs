//! What users trust the store with, over a real `redis-server`: a long offline queue survives an ack (only the
//! acked entries go, the rest stay in order, and the commit reports what it did).

mod support;

use corelay::store::redis::{RedisConfig, RedisStore};
use corelay::store::{NewMessage, Store, Write, WriteResult};

/// Entries in the offline queue: more than Lua's `unpack` can take at once (about 8,000).
const QUEUED: u64 = 12_000;

fn store(redis: &support::RedisServer) -> RedisStore {
    RedisStore::connect(RedisConfig {
        url: redis.url(),
        dedupe_ttl: std::time::Duration::from_secs(3600),
        topic_maxlen: 1000,
        min_replicas: 0,
        replica_timeout: std::time::Duration::from_secs(1),
    })
    .expect("connect to redis-server")
}

fn append(channel: &str, n: u64, offline: &str) -> Write {
    Write::Append(NewMessage {
        channel: channel.to_string(),
        from: Some("alice".into()),
        client_id: Some(format!("k{n}")),
        ts: n,
        json: format!("{{\"n\":{n}}}"),
        offline: vec![offline.to_string()],
        push: Vec::new(),
    })
}

/// The raw queue, in list order.
fn raw_queue(redis: &support::RedisServer, user: &str) -> Vec<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    redis::cmd("LRANGE")
        .arg(format!("user:{user}:offline_messages"))
        .arg(0)
        .arg(-1)
        .query(&mut c)
        .unwrap()
}

/// Queues `QUEUED` messages for bob, `pick(i)` choosing the channel of the i-th; returns the queue as written.
fn fill(s: &mut RedisStore, pick: impl Fn(u64) -> &'static str) -> Vec<String> {
    let writes: Vec<Write> = (0..QUEUED).map(|i| append(pick(i), i, "bob")).collect();
    let mut expected = Vec::new();
    for chunk in writes.chunks(2000) {
        for (w, r) in chunk.iter().zip(s.commit(chunk).expect("append")) {
            let (Write::Append(m), WriteResult::Appended(corelay::store::Appended::New { offset })) =
                (w, &r)
            else {
                panic!("expected a new append, got {r:?}");
            };
            expected.push(format!("{}\t{offset}", m.channel));
        }
    }
    expected
}

fn acked(entry: &str, channel: &str, upto: u64) -> bool {
    let (ch, off) = entry.split_once('\t').unwrap();
    ch == channel && off.parse::<u64>().unwrap() <= upto
}

#[test]
fn acking_part_of_a_long_offline_queue_keeps_the_rest_in_order() {
    let redis = support::RedisServer::start();
    let mut s = store(&redis);
    // Two conversations interleaved, so the acked entries are spread through the whole list.
    let queue = fill(&mut s, |i| {
        if i % 3 == 0 {
            "conversation:c2"
        } else {
            "conversation:c1"
        }
    });
    assert_eq!(raw_queue(&redis, "bob"), queue);

    // c1 holds 8,000 entries, c2 4,000: the 10,000 that stay are more than one `unpack` can push back.
    let upto = 2000;
    let r = s.commit(&[Write::TrimOffline {
        user: "bob".into(),
        channel: "conversation:c1".into(),
        upto,
    }]);
    assert_eq!(
        r.expect("the trim commits"),
        [WriteResult::Done],
        "the ack is reported as applied"
    );
    let expected: Vec<String> = queue
        .iter()
        .filter(|e| !acked(e, "conversation:c1", upto))
        .cloned()
        .collect();
    assert_eq!(expected.len(), QUEUED as usize - 2000);
    let left = raw_queue(&redis, "bob");
    assert_eq!(
        left.len(),
        expected.len(),
        "exactly the unacked entries stay"
    );
    assert_eq!(left, expected, "in their original order");

    // The store reads the same queue back: every unacked entry, by channel then offset.
    let mut want: Vec<(String, u64)> = expected
        .iter()
        .map(|e| {
            let (c, o) = e.split_once('\t').unwrap();
            (c.to_string(), o.parse().unwrap())
        })
        .collect();
    want.sort();
    let got: Vec<(String, u64)> = s
        .offline("bob", 100_000)
        .unwrap()
        .into_iter()
        .map(|m| (m.channel, m.offset))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn acking_the_head_of_a_long_offline_queue_and_then_all_of_it() {
    const HEAD: usize = 3000;
    let redis = support::RedisServer::start();
    let mut s = store(&redis);
    // c1's entries first, then c2's: an ack of c1 removes a prefix and keeps 9,000.
    let queue = fill(&mut s, |i| {
        if i < HEAD as u64 {
            "conversation:c1"
        } else {
            "conversation:c2"
        }
    });
    let trim = |channel: &str, upto| Write::TrimOffline {
        user: "bob".into(),
        channel: channel.into(),
        upto,
    };
    assert_eq!(
        s.commit(&[trim("conversation:c1", QUEUED)]).unwrap(),
        [WriteResult::Done]
    );
    assert_eq!(raw_queue(&redis, "bob"), queue[HEAD..]);
    // An ack with nothing left to remove changes nothing.
    assert_eq!(
        s.commit(&[trim("conversation:c1", QUEUED)]).unwrap(),
        [WriteResult::Done]
    );
    assert_eq!(raw_queue(&redis, "bob"), queue[HEAD..]);
    s.commit(&[trim("conversation:c2", QUEUED)]).unwrap();
    assert!(raw_queue(&redis, "bob").is_empty());
    assert!(s.offline("bob", 100).unwrap().is_empty());
}
