//! Output the backplane sends: a channel message in the encoding of the connection's transport (a shared
//! WebSocket frame, plain or permessage-deflate, an SSE event with this stream's cursor as its `id:`, a held poll's answer), a protocol
//! frame, and the write-queue cap (`max_write_queue_bytes`: a slow consumer is cut, told to resume from its
//! cursor).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;

use super::{Closing, Conn, Cx, Effects, Env, Mode, advance, cursor_text, http, ws};
use crate::backplane::Delivery;
use corelay_proto::ws::{CloseCode, Opcode};

impl Conn {
    /// One channel message. A stream or poll that has seen its offset already (a replay overlapping live
    /// traffic) drops it.
    pub fn deliver(&mut self, d: &Arc<Delivery>, env: &mut dyn Env, now_ms: u64) -> Effects {
        let mut cx = Cx::new(env, self.id, now_ms);
        if self.closing != Closing::Open {
            return cx.fx;
        }
        match &mut self.mode {
            Mode::WebSocket(ws) => {
                // A deflate subscriber with the full window gets the publish's one compressed frame (made by
                // the first loop that needs it); one that asked for a smaller window, a short message, or one
                // that does not compress gets the plain frame (RSV1 is per message).
                if ws.deflate & super::deflate::TAKEOVER != 0
                    && d.json.len() >= cx.cfg().ws_deflate_min_bytes
                {
                    // Server context takeover: compressed for this connection, in its own context.
                    let mut v = Vec::new();
                    let bits = super::deflate::window_bits(ws.deflate);
                    if super::deflate::deflate_stream(cx.me, bits, Opcode::Text, &d.json, &mut v) {
                        self.out.push_vec(v);
                    } else {
                        self.out.push(d.ws.clone());
                    }
                    cx.frame_out();
                    self.check_queue(&mut cx);
                    return cx.fx;
                }
                let deflated = if ws.deflate == 15 && d.json.len() >= cx.cfg().ws_deflate_min_bytes
                {
                    d.ws_deflate(|json| {
                        let mut v = Vec::new();
                        super::deflate::deflate_frame(Opcode::Text, json, 15, &mut v).then_some(v)
                    })
                } else {
                    None
                };
                self.out.push(deflated.unwrap_or(&d.ws).clone());
                cx.frame_out();
            }
            Mode::Sse(s) => {
                if !advance(&mut s.cursor, &d.channel, d.offset) {
                    return cx.fx; // already seen
                }
                self.out.push(d.sse().clone());
                let mut tail = Vec::with_capacity(16 + 24 * s.cursor.len());
                corelay_proto::sse::encode_tail(&cursor_text(&s.cursor), &mut tail);
                self.out.push_vec(tail);
            }
            Mode::PollHeld(p) => {
                if !advance(&mut p.cursor, &d.channel, d.offset) {
                    return cx.fx;
                }
                let body = crate::backplane::router::poll_body(std::slice::from_ref(d), &p.cursor);
                http::finish_poll(self, Some(body), &mut cx);
                self.resume_input(&mut cx);
                return cx.fx;
            }
            _ => return cx.fx,
        }
        self.check_queue(&mut cx);
        cx.fx
    }

    /// A frame for this WebSocket alone (an answer, a notice), already encoded.
    pub fn send_frame(&mut self, frame: &Bytes, env: &mut dyn Env, now_ms: u64) -> Effects {
        let mut cx = Cx::new(env, self.id, now_ms);
        if !self.is_websocket() || self.closing != Closing::Open {
            return cx.fx;
        }
        self.out.push(frame.clone());
        cx.frame_out();
        self.check_queue(&mut cx);
        cx.fx
    }

    /// Enforces the write-queue cap after output was queued: past it, what is queued is dropped and the
    /// connection ends (a WebSocket with 1013, so the client resumes from its cursor).
    pub(super) fn check_queue(&mut self, cx: &mut Cx<'_>) {
        if self.out.len() <= cx.cfg().limits.max_write_queue_bytes {
            return;
        }
        tracing::debug!(
            worker = cx.id(),
            conn = cx.me.index,
            queued = self.out.len(),
            "slow consumer cut"
        );
        cx.metrics().slow_consumers.fetch_add(1, Relaxed);
        self.out.clear();
        if self.is_websocket() {
            ws::start_close(
                self,
                CloseCode::TRY_AGAIN,
                "slow consumer: resume from your cursor",
                cx,
            );
        } else {
            self.closing = Closing::AfterFlush;
        }
    }
}
