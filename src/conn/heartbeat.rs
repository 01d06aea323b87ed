//! The connection's one timer: what it means when it fires, by mode. Request deadlines (PROXY header, request
//! head and body, the backplane's answer, keep-alive idle), WebSocket heartbeats (a ping after
//! `heartbeat_interval` of silence, a close when no byte answers it within `heartbeat_timeout`), SSE
//! keep-alives, token expiry on both, the end of a held poll, the close linger, and a rate limit's resume.

use std::sync::atomic::Ordering::Relaxed;

use super::http::{self, Flow};
use super::{Closing, Conn, Cx, Effects, Env, Mode, until_expiry, ws};
use corelay_proto::http1::HttpError;
use corelay_proto::ws::{CloseCode, Opcode, encode_frame};

impl Conn {
    /// The timer set by the last `Effects::schedule` fired.
    pub fn on_timer(&mut self, env: &mut dyn Env, now_ms: u64) -> Effects {
        let mut cx = Cx::new(env, self.id, now_ms);
        self.timer(&mut cx);
        cx.fx
    }

    fn timer(&mut self, cx: &mut Cx<'_>) {
        let now_ms = cx.now_ms;
        let (worker, index) = (cx.id(), cx.me.index);
        match &mut self.mode {
            Mode::Proxy => {
                tracing::debug!(worker, conn = index, "no PROXY header in time");
                cx.fx.close = true;
            }
            Mode::Http { served: 0 } | Mode::HttpBody { .. } => {
                // Slowloris: the request (head or body) did not arrive in time.
                tracing::debug!(worker, conn = index, "request timeout");
                let e = HttpError::new(408, "request not received in time");
                http::fail(self, cx, e, &[]);
            }
            Mode::HttpAwait { .. } => {
                // The backplane has not answered within the request's deadline (a saturated or stalled
                // node): say so instead of closing without a response.
                tracing::debug!(worker, conn = index, "no answer in time");
                let e = HttpError::new(504, "no answer in time; retry");
                http::fail(self, cx, e, &["Retry-After: 1"]);
            }
            Mode::Http { .. } => cx.fx.close = true,
            Mode::Sse(s) => {
                if s.expires_ms != 0 && now_ms >= s.expires_ms {
                    // The token expired: end the stream with a last event that says why; the client
                    // reconnects with a fresh token and `Last-Event-ID`.
                    let e = corelay_proto::msg::error(
                        "token_expired",
                        "reconnect with a fresh token",
                        None,
                    );
                    let mut v = Vec::with_capacity(e.len() + 24);
                    corelay_proto::sse::encode_body("error", e.as_bytes(), &mut v);
                    v.push(b'\n'); // no `id:`: the client's Last-Event-ID stays where it was
                    self.out.push_vec(v);
                    self.closing = Closing::AfterFlush;
                    return;
                }
                self.out
                    .push(bytes::Bytes::from_static(corelay_proto::sse::KEEPALIVE));
                let at = cx.after(cx.cfg().heartbeat_interval);
                cx.schedule(until_expiry(at, s.expires_ms));
            }
            Mode::PollHeld(_) => {
                http::finish_poll(self, None, cx);
                self.resume_input(cx);
            }
            Mode::WebSocket(ws) => {
                if self.closing != Closing::Open {
                    // The linger after our close frame (or a close reply that never flushed) is over.
                    cx.fx.close = true;
                    return;
                }
                if ws.expires_ms != 0 && now_ms >= ws.expires_ms {
                    ws::start_close(self, CloseCode::TOKEN_EXPIRED, "token expired", cx);
                    return;
                }
                if ws.paused {
                    self.unpause(cx);
                    return;
                }
                let interval = ms(cx.cfg().heartbeat_interval);
                let timeout = ms(cx.cfg().heartbeat_timeout);
                if ws.ping_sent_ms != 0 {
                    if self.last_rx_ms > ws.ping_sent_ms {
                        // Something arrived since the ping: alive.
                        ws.ping_sent_ms = 0;
                        let at = until_expiry(self.last_rx_ms + interval, ws.expires_ms);
                        cx.schedule(at.max(now_ms + 1));
                    } else {
                        tracing::debug!(worker, conn = index, "heartbeat timeout");
                        cx.metrics().heartbeat_timeouts.fetch_add(1, Relaxed);
                        cx.metrics().close(CloseCode::GOING_AWAY.0);
                        // Not a 1006 in the counters: we chose to end it.
                        self.closing = Closing::CloseSent;
                        cx.fx.close = true;
                    }
                } else if now_ms.saturating_sub(self.last_rx_ms) >= interval {
                    let mut v = Vec::with_capacity(2);
                    encode_frame(Opcode::Ping, true, &[], &mut v);
                    self.out.push_vec(v);
                    cx.frame_out();
                    ws.ping_sent_ms = now_ms.max(1);
                    let at = until_expiry(now_ms + timeout, ws.expires_ms);
                    cx.schedule(at.max(now_ms + 1));
                } else {
                    let at = until_expiry(self.last_rx_ms + interval, ws.expires_ms);
                    cx.schedule(at.max(now_ms + 1));
                }
            }
        }
    }

    /// A WebSocket whose rate limit just paused its input gets its (only) timer set to the moment the bucket
    /// has a token again; `unpause` then restores the heartbeat timer.
    pub(super) fn pause_if_limited(&mut self, cx: &mut Cx<'_>) {
        if let Mode::WebSocket(ws) = &self.mode
            && ws.paused
        {
            let at = cx.now_ms + ws.bucket.wait_ms(cx.cfg().limits.client_rate);
            cx.schedule(at);
        }
    }

    /// The resume timer of a rate-limited WebSocket: decode what was held back, then read the socket again.
    fn unpause(&mut self, cx: &mut Cx<'_>) {
        let (interval, timeout) = (
            ms(cx.cfg().heartbeat_interval),
            ms(cx.cfg().heartbeat_timeout),
        );
        let Mode::WebSocket(ws) = &mut self.mode else {
            return;
        };
        ws.paused = false;
        // Back to the heartbeat schedule (a ping may be outstanding).
        let at = if ws.ping_sent_ms != 0 {
            ws.ping_sent_ms + timeout
        } else {
            self.last_rx_ms + interval
        };
        let at = until_expiry(at, ws.expires_ms);
        cx.schedule(at.max(cx.now_ms + 1));
        let mut held = std::mem::take(&mut self.inbuf);
        if !held.is_empty() && ws::on_data(self, &mut held, cx) == Flow::Close {
            cx.fx.close = true;
            return;
        }
        self.pause_if_limited(cx);
        // Edge-triggered: whatever arrived meanwhile raised no new edge, so read until `WouldBlock`.
        cx.fx.read = true;
        self.check_queue(cx);
    }
}

/// A configured duration in ms, saturating.
fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
