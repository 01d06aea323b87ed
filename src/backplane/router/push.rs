//! The router's side of mobile push: which members a message obliges, claiming due obligations from the
//! store for the push thread, and writing back what became of them. The model is in `docs/PUSH.md`; the
//! durable state (rows, claims, leases) is the store's (`store::PushRow`). Also device registration
//! (`register_device` / `unregister_device`), from either transport or the internal API.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::pending::OnCommit;
use super::render::busy_error;
use super::{Out, ReplyTo, Router, answer};
use crate::metrics::Metrics;
use crate::push::engine::{Done, JobResult};
use crate::store::thread::Request;
use crate::store::{PushFor, PushJob, PushKind, Write, WriteResult};
use corelay_proto::msg;

/// How often the store is asked for due obligations (when the push thread has room).
pub const CLAIM_INTERVAL_MS: u64 = 100;
/// Bytes of message text in a notification with `--push-include-body` (APNs allows 4 KiB in all).
pub const PREVIEW_BYTES: usize = 256;

/// The router's link to the push thread.
pub struct PushLink {
    jobs: tokio::sync::mpsc::Sender<PushJob>,
    delay_ms: u64,
    lease_ms: u64,
    include_body: bool,
    /// Most obligations handed to the push thread and not answered yet (its queue's capacity).
    cap: usize,
    in_flight: usize,
    claiming: bool,
    last_claim_ms: u64,
    metrics: Arc<Metrics>,
}

impl PushLink {
    pub fn new(
        jobs: tokio::sync::mpsc::Sender<PushJob>,
        cfg: &crate::config::PushConfig,
        metrics: Arc<Metrics>,
    ) -> PushLink {
        PushLink {
            jobs,
            delay_ms: cfg.delay.as_millis() as u64,
            lease_ms: cfg.lease.as_millis() as u64,
            include_body: cfg.include_body,
            cap: cfg.queue,
            in_flight: 0,
            claiming: false,
            last_claim_ms: 0,
            metrics,
        }
    }
}

/// The text a notification may show: a JSON string body, or the `text` field of an object body; cut at
/// [`PREVIEW_BYTES`] on a character boundary.
pub fn preview(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let text = match &v {
        serde_json::Value::String(s) => s.as_str(),
        serde_json::Value::Object(o) => o.get("text")?.as_str()?,
        _ => return None,
    };
    let mut end = text.len().min(PREVIEW_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(text[..end].to_string())
}

impl Router {
    pub fn enable_push(&mut self, link: PushLink) {
        self.push = Some(link);
    }

    /// The obligations a new conversation message creates: one per member but the sender; due now for a
    /// member with no live connection, after `--push-delay` for one who has (escalation unless acked): here,
    /// or elsewhere as the presence cache knows; the store checks the others' presence itself.
    pub(super) fn push_for<'a>(
        &self,
        members: impl Iterator<Item = &'a Arc<str>>,
        sender: &str,
        now_ms: u64,
        body: &str,
    ) -> Vec<PushFor> {
        let Some(p) = &self.push else {
            return Vec::new();
        };
        let preview = if p.include_body { preview(body) } else { None };
        members
            .filter(|m| &***m != sender)
            .map(|m| {
                let online_due_ms = now_ms + p.delay_ms;
                PushFor {
                    user: m.to_string(),
                    due_ms: if self.presence.is_online(m) || self.live_elsewhere(m) {
                        online_due_ms
                    } else {
                        now_ms
                    },
                    online_due_ms,
                    preview: preview.clone(),
                }
            })
            .collect()
    }

    /// An obligation due now was just queued for commit: claim on this turn instead of at the next poll.
    /// (The claim request follows the commit to the store thread, which commits before it reads.)
    pub(super) fn push_kick(&mut self, due: &[PushFor], now_ms: u64) {
        if let Some(p) = &mut self.push
            && due.iter().any(|d| d.due_ms <= now_ms)
        {
            p.last_claim_ms = 0;
        }
    }

    /// Asks the store for due obligations when the push thread has room and no claim is out.
    pub fn push_tick(&mut self, now_ms: u64) {
        let Some(p) = &mut self.push else {
            return;
        };
        if p.claiming
            || p.in_flight >= p.cap
            || now_ms.saturating_sub(p.last_claim_ms) < CLAIM_INTERVAL_MS
        {
            return;
        }
        p.claiming = true;
        p.last_claim_ms = now_ms;
        let (lease_ms, limit) = (p.lease_ms, p.cap - p.in_flight);
        self.pending.push_claim(|token| Request::PushClaim {
            token,
            now_ms,
            lease_ms,
            limit,
        });
    }

    pub fn push_enabled(&self) -> bool {
        self.push.is_some()
    }

    /// Claimed obligations: to the push thread (a user with no device: dropped at once).
    pub(super) fn on_push_jobs(
        &mut self,
        result: Result<Vec<PushJob>, crate::store::StoreError>,
        now_ms: u64,
    ) {
        let Some(p) = &mut self.push else {
            return;
        };
        p.claiming = false;
        let jobs = match result {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "claiming push obligations failed; retrying");
                return;
            }
        };
        let mut writes = Vec::new();
        for job in jobs {
            let r = &job.row;
            if job.devices.is_empty() {
                p.metrics.push.dropped.fetch_add(1, Relaxed);
                writes.push(Write::PushDrop {
                    kind: r.kind,
                    user: r.user.clone(),
                    conversation: r.conversation.clone(),
                    upto: r.upto,
                });
                continue;
            }
            match p.jobs.try_send(job) {
                Ok(()) => p.in_flight += 1,
                Err(e) => {
                    // Cannot happen while claims stay within `cap`; if it does, the row waits in the store.
                    let r = e.into_inner().row;
                    tracing::warn!(user = %r.user, "push queue full; obligation retried later");
                    writes.push(Write::PushRetry {
                        kind: r.kind,
                        user: r.user,
                        conversation: r.conversation,
                        due_ms: now_ms + 1000,
                    });
                }
            }
        }
        p.metrics.push.in_flight.store(p.in_flight as u64, Relaxed);
        if !writes.is_empty() {
            self.pending.commit(writes, OnCommit::PushWrite);
        }
    }

    /// What became of a job: written back to the store (done / retry / drop, dead tokens removed).
    pub fn on_push_done(&mut self, done: Done) {
        let Some(p) = &mut self.push else {
            return;
        };
        p.in_flight = p.in_flight.saturating_sub(1);
        let m = &p.metrics.push;
        m.in_flight.store(p.in_flight as u64, Relaxed);
        let r = done.row;
        let mut writes = Vec::with_capacity(1 + done.gone.len());
        for (platform, token) in done.gone {
            m.tokens_removed.fetch_add(1, Relaxed);
            tracing::info!(user = %r.user, %platform, "device token removed: the provider says it is dead");
            writes.push(Write::DeleteDevice {
                user: r.user.clone(),
                platform,
                token,
            });
        }
        writes.push(match done.result {
            JobResult::Sent => {
                match r.kind {
                    PushKind::Alert => {
                        m.collapsed
                            .fetch_add(u64::from(r.count.saturating_sub(1)), Relaxed);
                        if self.presence.is_online(r.user.as_str()) {
                            m.escalated.fetch_add(1, Relaxed);
                        }
                    }
                    PushKind::Clear => {
                        m.cleared.fetch_add(1, Relaxed);
                    }
                }
                Write::PushDone {
                    kind: r.kind,
                    user: r.user,
                    conversation: r.conversation,
                    upto: r.upto,
                    count: r.count,
                }
            }
            JobResult::Retry { due_ms } => {
                m.retried.fetch_add(1, Relaxed);
                Write::PushRetry {
                    kind: r.kind,
                    user: r.user,
                    conversation: r.conversation,
                    due_ms,
                }
            }
            JobResult::Drop { reason } => {
                m.dropped.fetch_add(1, Relaxed);
                tracing::info!(user = %r.user, conversation = %r.conversation, %reason, "push obligation dropped");
                Write::PushDrop {
                    kind: r.kind,
                    user: r.user,
                    conversation: r.conversation,
                    upto: r.upto,
                }
            }
        });
        self.pending.commit(writes, OnCommit::PushWrite);
    }

    /// `register_device` / `unregister_device` from either transport: stored, then answered `ok`.
    pub(super) fn device(
        &mut self,
        to: ReplyTo,
        user: &Arc<str>,
        register: bool,
        platform: String,
        token: String,
        out: &mut Vec<Out>,
    ) {
        if self.store_busy() {
            return answer(out, to, 503, busy_error());
        }
        let op = if register {
            "register_device"
        } else {
            "unregister_device"
        };
        let json = serde_json::json!({"type": "ok", "op": op, "platform": platform}).to_string();
        let user = user.to_string();
        let write = if register {
            Write::PutDevice {
                user,
                platform,
                token,
            }
        } else {
            Write::DeleteDevice {
                user,
                platform,
                token,
            }
        };
        self.pending
            .commit(vec![write], OnCommit::Device { reply: to, json });
    }

    /// [`OnCommit::Device`]: answered `ok` once stored, or 503.
    pub(super) fn on_device_stored(
        &mut self,
        reply: ReplyTo,
        json: String,
        result: Result<Vec<WriteResult>, crate::store::StoreError>,
        out: &mut Vec<Out>,
    ) {
        match result {
            Ok(_) => answer(out, reply, 200, json),
            Err(e) => {
                tracing::debug!(error = %e, "device not stored");
                let err = msg::error("store_unavailable", "not stored; retry", None);
                answer(out, reply, 503, err);
            }
        }
    }

    /// [`OnCommit::PushWrite`]: nothing to answer.
    pub(super) fn on_push_written(
        &mut self,
        result: Result<Vec<WriteResult>, crate::store::StoreError>,
    ) {
        if let Err(e) = result {
            // The rows stay as they were; a claimed one is retried when its lease runs out.
            tracing::warn!(error = %e, "writing push outcomes failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::preview;

    #[test]
    fn preview_takes_text_and_cuts_on_a_char_boundary() {
        assert_eq!(preview(r#""hi""#).as_deref(), Some("hi"));
        assert_eq!(preview(r#"{"text":"yo","x":1}"#).as_deref(), Some("yo"));
        assert_eq!(preview(r#"{"img":"a.png"}"#), None);
        assert_eq!(preview("42"), None);
        let long = format!("\"{}\"", "é".repeat(200));
        let p = preview(&long).unwrap();
        assert!(p.len() <= super::PREVIEW_BYTES && p.chars().all(|c| c == 'é'));
    }
}
