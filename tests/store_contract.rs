//! The store contract against every implementation: the embedded store always, Scylla when `SCYLLA_NODES`
//! (comma-separated host:port) names a real cluster. No Scylla server can be installed on the development and
//! CI machines, so there the Scylla run reports that it was skipped.

use corelay::store::contract;
use corelay::store::embedded::{Embedded, Fsync};
use corelay::store::scylla::{Scylla, ScyllaConfig};

#[test]
fn embedded_store_passes_the_contract() {
    let dir = std::env::temp_dir().join(format!("corelay-contract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    contract::run_all(&mut || Box::new(Embedded::open(&dir, Fsync::Always).expect("open")));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn scylla_store_passes_the_contract() {
    let Ok(nodes) = std::env::var("SCYLLA_NODES") else {
        eprintln!(
            "skipped: SCYLLA_NODES not set (no Scylla server on this machine); the Scylla store contract did not run"
        );
        return;
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
    contract::run_all(&mut || Box::new(Scylla::connect(&cfg).expect("connect to Scylla")));
}
