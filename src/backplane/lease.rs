//! The node-id lease (cluster mode): at most one live process per node id.
//!
//! Everything a node owns in Redis is keyed by its id (`node:{id}` pub/sub, presence entries), so two live
//! processes with one id silently steal each other's traffic. At start a node takes `corelay:lease:{id}` with
//! `SET … NX PX ttl` and a random instance token, and a thread refreshes it every `ttl / 3`. A second process
//! with the same id finds the key held: it watches it for up to one TTL — a dead holder's lease expires and is
//! taken over (so a restart after `kill -9` waits at most one TTL), a live holder refreshes it — and then
//! refuses to start with an error that names the id. If a running node finds its lease taken by another
//! instance (its refreshes failed for longer than a TTL while Redis was unreachable and someone else started
//! with its id), it exits non-zero: two live nodes with one id must not go on.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Refreshes the lease only if it is still ours (1 = refreshed, 0 = someone else's, -1 = gone).
const REFRESH: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if v then return 0 end
return -1
";

/// Deletes the lease only if it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

pub fn key(node_id: &str) -> String {
    crate::store::redis::RedisStore::lease_key(node_id)
}

/// A held lease; released (if still ours) when dropped.
pub struct Lease {
    client: redis::Client,
    key: String,
    token: String,
    stop: std::sync::mpsc::Sender<()>,
}

impl Lease {
    /// This instance's random token: what the lease key holds while this process lives. Presence entries
    /// carry it, so that a user counts as present only while the instance that wrote the entry lives.
    pub fn token(&self) -> &str {
        &self.token
    }
}

/// Takes the lease of `node_id`, waiting up to one TTL for a dead holder's lease to expire.
pub fn acquire(url: &str, node_id: &str, ttl: Duration) -> anyhow::Result<Lease> {
    let client = redis::Client::open(url).context("redis URL")?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .with_context(|| {
            format!("connecting to Redis at {url} to take the lease of node id {node_id:?}")
        })?;
    let key = key(node_id);
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("random lease token: {e}"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let ttl_ms = ttl.as_millis() as u64;
    let deadline = Instant::now() + ttl + ttl / 2;
    let mut last_pttl: Option<i64> = None;
    loop {
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query(&mut conn)
            .context("taking the node lease")?;
        if set.is_some() {
            break;
        }
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn)?;
        // A refresh puts the TTL back up: the holder is alive.
        let refreshed = last_pttl.is_some_and(|prev| pttl > prev + 50);
        if refreshed || Instant::now() >= deadline {
            bail!(
                "node id {node_id:?} is already held by a live node (its lease in Redis, key {key}, is \
                 being refreshed); give every node a distinct --node-id (the default is host name + port)"
            );
        }
        if last_pttl.is_none() {
            tracing::warn!(
                node = node_id,
                lease_ms = pttl,
                "node id lease held; waiting to see whether its holder is alive"
            );
        }
        last_pttl = Some(pttl);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    {
        let client = client.clone();
        let key = key.clone();
        let token = token.clone();
        let node = node_id.to_string();
        std::thread::Builder::new()
            .name("corelay-lease".into())
            .spawn(move || refresher(client, key, token, node, ttl, stopped))?;
    }
    tracing::info!(node = node_id, "node id lease taken");
    Ok(Lease {
        client,
        key,
        token,
        stop,
    })
}

fn refresher(
    client: redis::Client,
    key: String,
    token: String,
    node: String,
    ttl: Duration,
    stopped: std::sync::mpsc::Receiver<()>,
) {
    let script = redis::Script::new(REFRESH);
    let ttl_ms = ttl.as_millis() as u64;
    let mut conn: Option<redis::Connection> = None;
    loop {
        match stopped.recv_timeout(ttl / 3) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if conn.is_none() {
            conn = client
                .get_connection_with_timeout(Duration::from_secs(2))
                .ok();
        }
        let Some(c) = conn.as_mut() else {
            tracing::warn!(node = %node, "node lease: Redis unreachable; retrying");
            continue;
        };
        match script.key(&key).arg(&token).arg(ttl_ms).invoke::<i64>(c) {
            Ok(1) => {}
            Ok(-1) => {
                // Redis lost the key (restart without persistence): take it again.
                let _: redis::RedisResult<Option<String>> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query(c);
            }
            Ok(_) => {
                tracing::error!(node = %node, "another live process holds this node id; exiting");
                std::process::exit(3);
            }
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "node lease refresh failed; retrying");
                conn = None;
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Ok(mut c) = self
            .client
            .get_connection_with_timeout(Duration::from_secs(1))
        {
            let _: redis::RedisResult<i64> = redis::Script::new(RELEASE)
                .key(&self.key)
                .arg(&self.token)
                .invoke(&mut c);
        }
    }
}
