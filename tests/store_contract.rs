//! The store contract against every implementation: the embedded store always, Scylla when `SCYLLA_NODES`
//! (comma-separated host:port) names a real cluster. No Scylla server can be installed on the development and
//! CI machines, so there the Scylla run reports that it was skipped.

#[path = "support/store_contract.rs"]
mod contract;
mod support;

use corelay::store::embedded::{Embedded, Fsync};
use corelay::store::redis::{RedisConfig, RedisStore};
use corelay::store::scylla::{Scylla, ScyllaConfig};

#[test]
fn embedded_store_passes_the_contract() {
    let dir = std::env::temp_dir().join(format!("corelay-contract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    contract::run_all(&mut || Box::new(Embedded::open(&dir, Fsync::Always).expect("open")));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn embedded_store_with_interval_fsync_passes_the_contract() {
    let dir = std::env::temp_dir().join(format!("corelay-contract-iv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    contract::run_all(&mut || {
        Box::new(
            Embedded::open(&dir, Fsync::Interval(std::time::Duration::from_millis(50)))
                .expect("open"),
        )
    });
    std::fs::remove_dir_all(&dir).ok();
}

/// The Scylla cluster named by `SCYLLA_NODES`, or None (and the test says it was skipped).
fn scylla_config(what: &str) -> Option<ScyllaConfig> {
    let Ok(nodes) = std::env::var("SCYLLA_NODES") else {
        eprintln!(
            "skipped: SCYLLA_NODES not set (no Scylla server on this machine); {what} did not run"
        );
        return None;
    };
    let nodes: Vec<String> = nodes
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut cfg = ScyllaConfig::new(
        nodes,
        std::env::var("SCYLLA_KEYSPACE").unwrap_or_else(|_| "corelay_test".into()),
    );
    cfg.replication = std::env::var("SCYLLA_REPLICATION")
        .unwrap_or_else(|_| "{'class': 'SimpleStrategy', 'replication_factor': 1}".into());
    Some(cfg)
}

#[test]
fn scylla_store_passes_the_contract() {
    let Some(cfg) = scylla_config("the Scylla store contract") else {
        return;
    };
    contract::run_all(&mut || Box::new(Scylla::connect(&cfg).expect("connect to Scylla")));
}

#[test]
fn two_scylla_stores_append_to_one_conversation_at_once() {
    let Some(cfg) = scylla_config("the two-writer Scylla check") else {
        return;
    };
    let open = || Box::new(Scylla::connect(&cfg).expect("connect to Scylla"));
    contract::concurrent_appends(open(), open(), 200);
}

#[test]
fn two_redis_stores_append_to_one_conversation_at_once() {
    let redis = support::RedisServer::start();
    let cfg = RedisConfig {
        url: redis.url(),
        dedupe_ttl: std::time::Duration::from_secs(3600),
        topic_maxlen: 1000,
        min_replicas: 0,
        replica_timeout: std::time::Duration::from_secs(1),
    };
    let open = || Box::new(RedisStore::connect(cfg.clone()).expect("connect to redis-server"));
    contract::concurrent_appends(open(), open(), 500);
}

#[test]
fn redis_store_passes_the_contract() {
    let redis = support::RedisServer::start();
    let cfg = RedisConfig {
        url: redis.url(),
        dedupe_ttl: std::time::Duration::from_secs(3600),
        topic_maxlen: 1000,
        min_replicas: 0,
        replica_timeout: std::time::Duration::from_secs(1),
    };
    contract::run_all(&mut || {
        Box::new(RedisStore::connect(cfg.clone()).expect("connect to redis-server"))
    });
}

#[test]
fn redis_store_survives_a_redis_restart_with_aof() {
    use corelay::store::{NewMessage, Store, Write};
    let mut redis = support::RedisServer::start();
    let cfg = RedisConfig {
        url: redis.url(),
        dedupe_ttl: std::time::Duration::from_secs(3600),
        topic_maxlen: 1000,
        min_replicas: 0,
        replica_timeout: std::time::Duration::from_secs(1),
    };
    let mut s = RedisStore::connect(cfg).unwrap();
    let msg = |cid: &str| {
        Write::Append(NewMessage {
            channel: "conversation:r1".into(),
            from: Some("alice".into()),
            client_id: Some(cid.into()),
            ts: 1,
            json: "1".into(),
            offline: vec![],
            push: Vec::new(),
        })
    };
    s.commit(&[msg("a"), msg("b")]).unwrap();
    redis.kill();
    assert!(
        s.commit(&[msg("c")]).is_err(),
        "a commit while Redis is down fails (the client retries)"
    );
    redis.restart();
    // The same store reconnects by itself, reloads its scripts, and offsets keep growing.
    let r = s.commit(&[msg("c"), msg("a")]).unwrap();
    assert_eq!(
        r,
        [
            corelay::store::WriteResult::Appended(corelay::store::Appended::New { offset: 3 }),
            corelay::store::WriteResult::Appended(corelay::store::Appended::Duplicate {
                offset: 1,
                ts: 1
            }),
        ]
    );
    assert_eq!(s.last_offset("conversation:r1").unwrap(), 3);
}
