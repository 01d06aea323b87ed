//! Wiring: listeners, loops, the backplane thread, and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;

use anyhow::Context;

use crate::auth::Verifier;
use crate::backplane::router::{HistoryLimits, Router};
use crate::backplane::{self, LoopCmd, LoopHandle};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::embedded::{Embedded, Fsync};
use crate::store::redis::{RedisConfig, RedisStore};
use crate::store::scylla::{Scylla, ScyllaConfig};
use crate::worker::{Shared, Worker, listener};

/// Commands queued per loop before the backplane waits for room.
const LOOP_QUEUE: usize = 16_384;

/// Opens the configured message store.
fn open_store(cfg: &Config, metrics: &Metrics) -> anyhow::Result<Box<dyn Store>> {
    if !cfg.scylla.is_empty() {
        let mut sc = ScyllaConfig::new(cfg.scylla.clone(), cfg.scylla_keyspace.clone());
        if let Some(r) = &cfg.scylla_replication {
            sc.replication = r.clone();
        }
        let store = Scylla::connect(&sc)
            .with_context(|| format!("connecting to Scylla at {:?}", cfg.scylla))?;
        tracing::info!(nodes = ?cfg.scylla, keyspace = %cfg.scylla_keyspace, "message store: scylla");
        return Ok(Box::new(store));
    }
    if let Some(url) = &cfg.redis {
        let store = RedisStore::connect(RedisConfig {
            min_replicas: cfg.redis_min_replicas,
            replica_timeout: cfg.redis_replica_timeout,
            ..RedisConfig::new(url.clone(), cfg.topic_history)
        })
        .with_context(|| format!("connecting to Redis at {url}"))?
        .count_replication_timeouts_in(metrics.store_replication_timeouts.clone());
        tracing::info!(%url, min_replicas = cfg.redis_min_replicas, "message store: redis");
        return Ok(Box::new(store));
    }
    let fsync = match cfg.fsync_interval {
        None => Fsync::Always,
        Some(d) => Fsync::Interval(d),
    };
    let store = Embedded::open_with_cache(&cfg.data_dir, fsync, cfg.store_cache_bytes)
        .with_context(|| format!("opening the embedded store in {}", cfg.data_dir.display()))?;
    Ok(Box::new(store))
}

/// A running gateway.
pub struct Server {
    pub local_addr: SocketAddr,
    /// The TLS listener's address (`--tls-listen`).
    pub tls_addr: Option<SocketAddr>,
    tls: Option<Arc<crate::worker::tls::TlsSetup>>,
    loops: Vec<LoopHandle>,
    workers: Vec<JoinHandle<()>>,
    backplane: Option<JoinHandle<()>>,
    draining: Arc<AtomicBool>,
    /// The node-id lease in cluster mode, released after the drain.
    lease: Option<crate::backplane::lease::Lease>,
}

impl Server {
    /// Binds and starts every loop and the backplane. `cfg.auth_secret` and `api_key` must be resolved.
    pub fn start(mut cfg: Config) -> anyhow::Result<Server> {
        cfg.validate()?;
        let listeners = listener::bind_all(cfg.listen, cfg.threads)
            .with_context(|| format!("binding {}", cfg.listen))?;
        let local_addr = listeners[0].local_addr()?;
        let (tls, mut tls_listeners, tls_addr) =
            match (&cfg.tls_listen, &cfg.tls_cert, &cfg.tls_key) {
                (Some(addr), Some(cert), Some(key)) => {
                    let setup = crate::worker::tls::TlsSetup::load(cert, key)?;
                    let ls = listener::bind_all(*addr, cfg.threads)
                        .with_context(|| format!("binding the TLS listener {addr}"))?;
                    let a = ls[0].local_addr()?;
                    tracing::info!(addr = %a, cert = %cert.display(), "TLS listener");
                    (
                        Some(Arc::new(setup)),
                        ls.into_iter().map(Some).collect(),
                        Some(a),
                    )
                }
                _ => (None, Vec::new(), None),
            };
        let mut admin = match cfg.admin_listen {
            Some(a) => {
                let l = listener::bind_all(a, 1)
                    .with_context(|| format!("binding the admin listener {a}"))?
                    .remove(0);
                tracing::info!(addr = %l.local_addr()?, "admin listener: /api/* and /metrics");
                Some(l)
            }
            None => None,
        };
        if cfg.node_id.is_empty() {
            // Unique per process on one host: several nodes on one machine differ by port.
            cfg.node_id = format!("{}-{}", crate::config::host_name(), local_addr.port());
        }
        // Cluster mode: refuse to run beside a live node with the same id.
        let lease = match &cfg.redis {
            Some(url) => Some(crate::backplane::lease::acquire(
                url,
                &cfg.node_id,
                cfg.presence_ttl,
            )?),
            None => None,
        };
        let metrics = Arc::new(Metrics::new(cfg.threads));
        let mut store = open_store(&cfg, &metrics)?;
        let secret = cfg
            .auth_secret
            .clone()
            .context("auth secret not resolved")?;
        let api_key: Arc<str> = cfg.api_key.clone().context("API key not resolved")?.into();
        let cfg = Arc::new(cfg);
        let (bp, bp_rx, notify) = backplane::channel(cfg.limits.backplane_queue);
        let draining = Arc::new(AtomicBool::new(false));
        let shared = Shared {
            cfg: cfg.clone(),
            verifier: Arc::new(if cfg.demo {
                Verifier::with_minting(&secret)
            } else {
                Verifier::new(&secret)
            }),
            api_key,
            metrics: metrics.clone(),
            backplane: bp,
            draining: draining.clone(),
            per_address: Arc::new(crate::worker::per_address::PerAddress::new(
                cfg.limits.max_connections_per_ip,
            )),
            ring: Arc::new(crate::cluster::ring::Ring::new(
                cfg.ring_nodes.clone(),
                crate::cluster::ring::Ring::DEFAULT_VNODES,
            )),
            tls: tls.clone(),
        };
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let host = crate::worker::pinning::host();
        let (pin, why) = crate::worker::pinning::decide(cfg.pin, &host, cfg.threads);
        tracing::info!(pinned = pin, reason = %why, "event loop pinning");
        let mut loops = Vec::new();
        let mut workers = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::bounded(LOOP_QUEUE);
            let admin = if i == 0 { admin.take() } else { None };
            let tls_l = tls_listeners.get_mut(i).and_then(Option::take);
            let (worker, waker) = Worker::new(i as u16, l, tls_l, admin, rx, shared.clone())?;
            loops.push(LoopHandle { tx, waker });
            let core = (pin && !cores.is_empty()).then(|| cores[i % cores.len()]);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("corelay-loop-{i}"))
                    .spawn(move || {
                        if let Some(c) = core {
                            core_affinity::set_for_current(c);
                        }
                        worker.run();
                    })?,
            );
        }
        drop(shared);
        let router = Router::new(
            cfg.limits.max_body_bytes,
            HistoryLimits {
                topic_count: cfg.topic_history,
                topic_age_ms: cfg.topic_history_age.as_millis() as u64,
                topic_bytes: cfg.topic_history_bytes,
                conversation_bytes: cfg.conversation_window_bytes,
                ..HistoryLimits::default()
            },
        );
        let mut router = router;
        router.set_max_pending(cfg.max_pending_writes);
        // One read reply (a replay page, a poll answer, a history page) fills at most a quarter of a
        // connection's write queue, so it is never cut as a slow consumer for one page.
        let read_bytes = (cfg.limits.max_write_queue_bytes / 4).max(1);
        router.set_read_bytes(read_bytes);
        router.set_bounds(crate::backplane::router::Bounds {
            max_channels_per_request: cfg.limits.max_channels_per_request,
            max_follows: cfg.limits.max_follows_per_connection,
            max_connections_per_user: cfg.limits.max_connections_per_user,
            user_rate: cfg.limits.user_rate,
            user_burst: cfg.limits.user_burst,
        });
        router
            .load(&mut *store)
            .context("loading state from the store")?;
        let bus = match &cfg.redis {
            Some(url) => {
                router.enable_cluster(&cfg.node_id, cfg.presence_ttl.as_millis() as u64);
                let (ev_tx, ev_rx) = tokio::sync::mpsc::channel(crate::backplane::bus::EVENT_QUEUE);
                let token = lease.as_ref().map_or("", |l| l.token());
                let tx = crate::backplane::bus::spawn(url, &cfg.node_id, token, ev_tx)?;
                tracing::info!(node = %cfg.node_id, "cluster mode: redis bus");
                Some((tx, ev_rx))
            }
            None => None,
        };
        let push = if cfg.push.enabled() {
            let h = crate::push::engine::start(&cfg.push, metrics.clone())
                .context("starting mobile push")?;
            router.enable_push(crate::backplane::router::PushLink::new(
                h.jobs,
                &cfg.push,
                metrics.clone(),
            ));
            tracing::info!(
                apns = cfg.push.apns_key.is_some(),
                fcm = cfg.push.fcm_credentials.is_some(),
                delay = ?cfg.push.delay,
                "mobile push on"
            );
            Some(h.done)
        } else {
            None
        };
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        let (store_tx, store_thread) =
            crate::store::thread::spawn(store, done_tx, metrics.clone(), read_bytes)?;
        let bp_loops = loops.clone();
        let backplane = std::thread::Builder::new()
            .name("corelay-backplane".into())
            .spawn(move || {
                let links = backplane::Links {
                    store: store_tx,
                    done: done_rx,
                    bus,
                    push,
                };
                backplane::run(router, bp_rx, notify, bp_loops, metrics, links);
                // The store thread ends once the backplane dropped its sender; wait so the last commit is on disk.
                let _ = store_thread.join();
            })?;
        Ok(Server {
            local_addr,
            tls_addr,
            tls,
            loops,
            workers,
            backplane: Some(backplane),
            draining,
            lease,
        })
    }

    /// Reads the TLS certificate and key again (SIGHUP). Connections already open keep their session; new
    /// ones get the new certificate. On error the old certificate stays in use.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        match &self.tls {
            Some(t) => t.reload(),
            None => Ok(()),
        }
    }

    /// Starts a graceful drain: `/readyz` turns 503, loops stop accepting and close clients with 1001.
    pub fn shutdown(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for l in &self.loops {
            let _ = l.tx.send(LoopCmd::Shutdown);
            let _ = l.waker.wake();
        }
    }

    /// Waits for the loops to drain, then for the backplane to finish.
    pub fn join(mut self) {
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.loops.clear();
        if let Some(b) = self.backplane.take() {
            let _ = b.join();
        }
        drop(self.lease.take());
    }
}
