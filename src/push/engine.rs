//! The push thread: its own tokio runtime, so TLS, JWT signing and provider latency never touch the event
//! loops or the backplane's routing.
//!
//! The backplane claims due obligations from the store and sends them here as [`PushJob`]s on a bounded
//! queue (the router never holds more than `--push-queue` unanswered, so the queue never refuses). Each job
//! becomes one request per device of the user, at most `--push-concurrency` in flight per provider; the
//! job's [`Done`] goes back to the backplane, which writes the outcome to the store: done, retry at a later
//! due time, or dropped, plus the removal of dead tokens. Nothing here is durable: if this node dies, the
//! claim's lease runs out and any node pushes the obligation again.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::sync::mpsc;

use super::apns::{Apns, ApnsConfig};
use super::fcm::{Fcm, FcmConfig};
use super::{Notification, Outcome, Platform};
use crate::config::PushConfig;
use crate::metrics::Metrics;
use crate::store::{PushJob, PushKind, PushRow};

/// What became of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobResult {
    /// At least one device's provider accepted it: the obligation is fulfilled.
    Sent,
    /// Nothing accepted, something retryable: try again at `due_ms`.
    Retry { due_ms: u64 },
    /// Nothing to try again (no device, every token dead, permanent errors).
    Drop { reason: String },
}

/// A finished job, for the backplane to write back.
#[derive(Clone, Debug)]
pub struct Done {
    pub row: PushRow,
    pub result: JobResult,
    /// (platform, token) pairs the provider called dead: removed from the registry.
    pub gone: Vec<(String, String)>,
}

/// The backplane's end of the push thread.
pub struct PushHandle {
    pub jobs: mpsc::Sender<PushJob>,
    pub done: mpsc::UnboundedReceiver<Done>,
    pub thread: std::thread::JoinHandle<()>,
}

/// The providers one node talks to (a platform with no credentials configured is `None`).
pub struct Providers {
    pub apns: Option<Apns>,
    pub fcm: Option<Fcm>,
}

impl Providers {
    /// Builds the configured providers (reads the key files). Must run inside a tokio runtime.
    pub fn from_config(cfg: &PushConfig) -> anyhow::Result<Providers> {
        use anyhow::Context;
        let ca = cfg.ca.as_deref();
        let apns = match &cfg.apns_key {
            Some(path) => {
                let key_pem = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --apns-key {}", path.display()))?;
                Some(Apns::new(
                    ApnsConfig {
                        url: cfg.apns_url.clone(),
                        key_pem,
                        key_id: cfg.apns_key_id.clone(),
                        team_id: cfg.apns_team_id.clone(),
                        topic: cfg.apns_topic.clone(),
                        ttl: cfg.ttl,
                        include_body: cfg.include_body,
                    },
                    ca,
                    cfg.timeout,
                )?)
            }
            None => None,
        };
        let fcm = match &cfg.fcm_credentials {
            Some(path) => {
                let credentials_json = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --fcm-credentials {}", path.display()))?;
                Some(Fcm::new(
                    FcmConfig {
                        url: cfg.fcm_url.clone(),
                        credentials_json,
                        include_body: cfg.include_body,
                    },
                    ca,
                    cfg.timeout,
                )?)
            }
            None => None,
        };
        Ok(Providers { apns, fcm })
    }
}

/// Starts the push thread. Fails (before anything runs) when a key or credentials file is unusable.
pub fn start(cfg: &PushConfig, metrics: Arc<Metrics>) -> anyhow::Result<PushHandle> {
    let (jobs_tx, mut jobs_rx) = mpsc::channel::<PushJob>(cfg.queue);
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let providers = {
        let _guard = rt.enter();
        Arc::new(Providers::from_config(cfg)?)
    };
    let cfg = cfg.clone();
    let thread = std::thread::Builder::new()
        .name("corelay-push".into())
        .spawn(move || {
            rt.block_on(async move {
                let limits = [
                    Arc::new(Semaphore::new(cfg.concurrency)),
                    Arc::new(Semaphore::new(cfg.concurrency)),
                ];
                while let Some(job) = jobs_rx.recv().await {
                    let providers = providers.clone();
                    let limits = limits.clone();
                    let metrics = metrics.clone();
                    let done_tx = done_tx.clone();
                    let cfg = cfg.clone();
                    tokio::spawn(async move {
                        let done = run_job(job, &providers, &limits, &metrics, &cfg).await;
                        // The backplane gone means shutdown: the obligation stays in the store.
                        let _ = done_tx.send(done);
                    });
                }
            });
        })?;
    Ok(PushHandle {
        jobs: jobs_tx,
        done: done_rx,
        thread,
    })
}

/// The notification a row asks for.
pub fn notification(row: &PushRow) -> Notification {
    match row.kind {
        PushKind::Alert => Notification::Alert {
            conversation: row.conversation.clone(),
            offset: row.upto,
            from: row.from.clone(),
            count: row.count.max(1),
            body: row.preview.clone(),
        },
        PushKind::Clear => Notification::Clear {
            conversation: row.conversation.clone(),
            upto: row.upto,
        },
    }
}

/// Sends one job to every device of its user, concurrently, and folds the outcomes.
async fn run_job(
    job: PushJob,
    providers: &Providers,
    limits: &[Arc<Semaphore>; 2],
    metrics: &Metrics,
    cfg: &PushConfig,
) -> Done {
    let n = notification(&job.row);
    let sends = job.devices.iter().map(|(platform, token)| {
        let n = &n;
        async move {
            let outcome = match Platform::parse(platform) {
                Some(p) => send_one(p, token, n, providers, limits, metrics).await,
                None => Outcome::Failed(format!("unknown platform {platform:?}")),
            };
            ((platform.clone(), token.clone()), outcome)
        }
    });
    let outcomes = futures_util::future::join_all(sends).await;
    let (result, gone) = fold(&job.row, outcomes, cfg, crate::clock::unix_ms());
    Done {
        row: job.row,
        result,
        gone,
    }
}

async fn send_one(
    p: Platform,
    token: &str,
    n: &Notification,
    providers: &Providers,
    limits: &[Arc<Semaphore>; 2],
    metrics: &Metrics,
) -> Outcome {
    let i = match p {
        Platform::Apns => 0,
        Platform::Fcm => 1,
    };
    let configured = match p {
        Platform::Apns => providers.apns.is_some(),
        Platform::Fcm => providers.fcm.is_some(),
    };
    if !configured {
        return Outcome::Failed(format!("{} is not configured on this node", p.as_str()));
    }
    let Ok(_permit) = limits[i].acquire().await else {
        return Outcome::Retry {
            after: None,
            reason: "shutting down".into(),
        };
    };
    let t0 = Instant::now();
    let outcome = match (p, &providers.apns, &providers.fcm) {
        (Platform::Apns, Some(a), _) => a.send(token, n).await,
        (Platform::Fcm, _, Some(f)) => f.send(token, n).await,
        _ => unreachable!("checked above"),
    };
    let m = &metrics.push;
    m.latency_us_sum[i].fetch_add(t0.elapsed().as_micros() as u64, Relaxed);
    m.latency_count[i].fetch_add(1, Relaxed);
    match &outcome {
        Outcome::Sent => m.sent[i].fetch_add(1, Relaxed),
        _ => m.failed[i].fetch_add(1, Relaxed),
    };
    if !matches!(outcome, Outcome::Sent) {
        tracing::debug!(provider = p.as_str(), ?outcome, "push not accepted");
    }
    outcome
}

/// One obligation's result from its devices' outcomes: any accepted → sent (the user has been told; the
/// other devices are not retried, so no device is told twice); else any retryable → retry after the
/// provider's `Retry-After` or the backoff, whichever is later; else dropped.
pub fn fold(
    row: &PushRow,
    outcomes: Vec<((String, String), Outcome)>,
    cfg: &PushConfig,
    now_ms: u64,
) -> (JobResult, Vec<(String, String)>) {
    let mut gone = Vec::new();
    let mut sent = false;
    let mut retry_after: Option<Option<Duration>> = None;
    let mut reasons = Vec::new();
    for (device, o) in outcomes {
        match o {
            Outcome::Sent => sent = true,
            Outcome::TokenGone(r) => {
                reasons.push(format!("token gone: {r}"));
                gone.push(device);
            }
            Outcome::Retry { after, reason } => {
                reasons.push(reason);
                let prev = retry_after.flatten();
                retry_after = Some(match (prev, after) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                });
            }
            Outcome::Failed(r) => reasons.push(r),
        }
    }
    let result = if sent {
        JobResult::Sent
    } else if let Some(after) = retry_after {
        let wait = backoff(row.attempts, cfg.max_backoff).max(after.unwrap_or_default());
        JobResult::Retry {
            due_ms: now_ms + wait.as_millis() as u64,
        }
    } else if reasons.is_empty() {
        JobResult::Drop {
            reason: "no device registered".into(),
        }
    } else {
        JobResult::Drop {
            reason: reasons.join("; "),
        }
    };
    (result, gone)
}

/// Exponential backoff with jitter: 1 s, 2 s, 4 s, … by attempt, capped at `max`, each scaled by a random
/// factor in [0.5, 1] so that obligations that failed together do not retry together.
pub fn backoff(attempts: u32, max: Duration) -> Duration {
    let base = Duration::from_secs(1)
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(max);
    let mut b = [0u8; 2];
    let r = match getrandom::fill(&mut b) {
        Ok(()) => u16::from_le_bytes(b) as f64 / u16::MAX as f64,
        Err(_) => 1.0,
    };
    base.mul_f64(0.5 + 0.5 * r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(attempts: u32) -> PushRow {
        PushRow {
            kind: PushKind::Alert,
            user: "bob".into(),
            conversation: "c1".into(),
            upto: 3,
            from: "alice".into(),
            count: 2,
            due_ms: 0,
            attempts,
            preview: None,
        }
    }

    fn dev(t: &str) -> (String, String) {
        ("apns".to_string(), t.to_string())
    }

    #[test]
    fn any_accepted_device_fulfils_the_obligation_and_dead_tokens_are_reported() {
        let cfg = PushConfig::default();
        let (r, gone) = fold(
            &row(1),
            vec![
                (dev("a"), Outcome::Sent),
                (dev("b"), Outcome::TokenGone("Unregistered".into())),
                (
                    dev("c"),
                    Outcome::Retry {
                        after: None,
                        reason: "503".into(),
                    },
                ),
            ],
            &cfg,
            1000,
        );
        assert_eq!(r, JobResult::Sent);
        assert_eq!(gone, [dev("b")]);
    }

    #[test]
    fn retry_waits_for_the_later_of_retry_after_and_backoff() {
        let cfg = PushConfig::default();
        let (r, _) = fold(
            &row(1),
            vec![(
                dev("a"),
                Outcome::Retry {
                    after: Some(Duration::from_secs(30)),
                    reason: "429".into(),
                },
            )],
            &cfg,
            1000,
        );
        assert_eq!(r, JobResult::Retry { due_ms: 31_000 });
        let (r, _) = fold(
            &row(1),
            vec![(
                dev("a"),
                Outcome::Retry {
                    after: None,
                    reason: "503".into(),
                },
            )],
            &cfg,
            1000,
        );
        let JobResult::Retry { due_ms } = r else {
            panic!("{r:?}")
        };
        assert!((1500..=2000).contains(&due_ms), "{due_ms}");
    }

    #[test]
    fn nothing_to_retry_is_dropped() {
        let cfg = PushConfig::default();
        let (r, gone) = fold(
            &row(1),
            vec![(dev("a"), Outcome::TokenGone("BadDeviceToken".into()))],
            &cfg,
            0,
        );
        assert!(matches!(r, JobResult::Drop { .. }));
        assert_eq!(gone, [dev("a")]);
        let (r, _) = fold(&row(1), vec![], &cfg, 0);
        assert_eq!(
            r,
            JobResult::Drop {
                reason: "no device registered".into()
            }
        );
    }

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        let max = Duration::from_secs(300);
        for (attempts, base) in [
            (1u32, 1u64),
            (2, 2),
            (5, 16),
            (9, 256),
            (10, 300),
            (40, 300),
        ] {
            let b = backoff(attempts, max);
            assert!(
                b >= Duration::from_millis(base * 500) && b <= Duration::from_secs(base),
                "attempt {attempts}: {b:?}"
            );
        }
    }
}
