//! WebSocket mode: frames in (sans-IO decoder), protocol requests to the backplane, frames out.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::Cx;
use super::http::Flow;
use super::{Bucket, Closing, Conn, Mode, WriteQueue, WsState};
use crate::backplane::Event;
use corelay_proto::msg;
use corelay_proto::ws::{CloseCode, Event as WsEvent, Opcode, WsError, encode_close, encode_frame};

/// Feeds bytes read from the socket. Payloads are unmasked in place in `data` (the loop's scratch buffer).
pub(crate) fn on_data(conn: &mut Conn, data: &mut [u8], cx: &mut Cx<'_>) -> Flow {
    let Conn {
        mode,
        out,
        closing,
        inbuf,
        ..
    } = conn;
    let Mode::WebSocket(ws) = mode else {
        return Flow::Continue;
    };
    if *closing == Closing::AfterFlush {
        return Flow::Continue;
    }
    if closing.close_sent() {
        // We started the close: drop the peer's remaining frames; its close reply ends the connection
        // (the server closes the TCP connection first, RFC 6455 §7.1.1).
        let mut pos = 0;
        loop {
            match ws.decoder.decode(&mut data[pos..]) {
                Ok((_, Some(WsEvent::Close { .. }))) | Err(_) => {
                    // Done; close once our own close frame is out (it may still be queued).
                    *closing = Closing::AfterFlush;
                    return Flow::Continue;
                }
                Ok((0, None)) => return Flow::Continue,
                Ok((n, _)) => pos += n,
            }
        }
    }
    let (rate, burst) = (cx.cfg().limits.client_rate, cx.cfg().limits.client_burst);
    let WsState {
        decoder,
        user,
        bucket,
        paused,
        expires_ms,
        deflate,
        ping_sent_ms,
        ..
    } = &mut **ws;
    let mut pos = 0;
    loop {
        if user.is_some() && pos < data.len() && !bucket.ready(cx.now_ms, rate, burst) {
            // Out of tokens: keep what is not decoded yet and stop reading until the bucket refills. The
            // client is slowed down by TCP, never refused: pipelined sends are all served, in order.
            *inbuf = data[pos..].to_vec();
            *paused = true;
            cx.metrics().rate_limited.fetch_add(1, Relaxed);
            return Flow::Continue;
        }
        let (n, ev) = match decoder.decode(&mut data[pos..]) {
            Ok(r) => r,
            Err(e) => {
                protocol_error(out, closing, e, cx);
                return Flow::Continue;
            }
        };
        pos += n;
        let Some(ev) = ev else {
            if n == 0 {
                return Flow::Continue;
            }
            continue;
        };
        cx.metrics().frames_in.fetch_add(1, Relaxed);
        let mut peer = Peer {
            user,
            bucket,
            expires_ms,
            deflate: *deflate,
            out,
            closing,
        };
        let stop = match ev {
            WsEvent::Text(payload) => peer.message(true, payload, cx),
            WsEvent::Binary(payload) => peer.message(false, payload, cx),
            WsEvent::Compressed { text, payload } => {
                // Inflated with the loop's inflater, within max_message_bytes, UTF-8 checked for text.
                let max = cx.cfg().limits.max_message_bytes;
                super::deflate::with_inflater(|inf| match inf.inflate(payload, text, max) {
                    Ok(msg) => peer.message(text, msg, cx),
                    Err(e) => {
                        protocol_error(peer.out, peer.closing, e, cx);
                        true
                    }
                })
            }
            WsEvent::Ping(payload) => {
                let mut v = Vec::with_capacity(2 + payload.len());
                encode_frame(Opcode::Pong, true, payload, &mut v);
                out.push_vec(v);
                cx.metrics().frames_out.fetch_add(1, Relaxed);
                false
            }
            WsEvent::Pong(_) => {
                *ping_sent_ms = 0;
                false
            }
            WsEvent::Close { code, .. } => {
                // The peer started the close handshake: echo its code, then close the TCP connection
                // (RFC 6455 §7.1.1: the server closes first).
                let mut v = Vec::with_capacity(4);
                match code {
                    Some(c) => encode_close(c, "", &mut v),
                    None => encode_frame(Opcode::Close, true, &[], &mut v),
                }
                out.push_vec(v);
                *closing = Closing::AfterFlush;
                cx.metrics().close(code.map_or(1005, |c| c.0));
                true
            }
        };
        if stop {
            return Flow::Continue;
        }
    }
}

/// A protocol failure: our close frame with its code and reason; the peer's reply (or the linger) ends it.
fn protocol_error(out: &mut WriteQueue, closing: &mut Closing, e: WsError, cx: &Cx<'_>) {
    tracing::debug!(
        worker = cx.id(),
        conn = cx.me.index,
        code = e.code.0,
        reason = e.reason,
        "websocket protocol error"
    );
    let mut v = Vec::with_capacity(2 + e.reason.len() + 2);
    encode_close(e.code, e.reason, &mut v);
    out.push_vec(v);
    *closing = Closing::CloseSent;
    cx.metrics().close(e.code.0);
}

/// The parts of a WebSocket connection that a data message uses (the decoder, which lends the message, apart).
struct Peer<'a> {
    user: &'a Option<Arc<str>>,
    bucket: &'a mut Bucket,
    expires_ms: &'a mut u64,
    deflate: u8,
    out: &'a mut WriteQueue,
    closing: &'a mut Closing,
}

impl Peer<'_> {
    /// One whole data message (inflated if it came compressed). `true`: stop reading (the connection closes).
    fn message(&mut self, text: bool, payload: &[u8], cx: &mut Cx<'_>) -> bool {
        let (rate, burst) = (cx.cfg().limits.client_rate, cx.cfg().limits.client_burst);
        let Some(user) = self.user else {
            let op = if text { Opcode::Text } else { Opcode::Binary };
            echo(self.out, op, payload, self.deflate, cx);
            return false;
        };
        if !text {
            let mut v = Vec::new();
            encode_close(
                CloseCode::UNSUPPORTED,
                "corelay.v1 uses text frames",
                &mut v,
            );
            self.out.push_vec(v);
            *self.closing = Closing::CloseSent;
            cx.metrics().close(CloseCode::UNSUPPORTED.0);
            return true;
        }
        match msg::parse_client(payload) {
            Ok(msg::ClientMsg::Ping { id }) => {
                // Answered here, at once: the client measures the connection, not the backplane.
                self.bucket.take(cx.now_ms, rate, burst);
                push_json(self.out, &msg::pong(id.as_deref()), self.deflate, cx);
            }
            Ok(msg::ClientMsg::Refresh { token }) => {
                self.bucket.take(cx.now_ms, rate, burst);
                let answer = match cx.env.verifier().verify_until(&token) {
                    Ok((sub, exp)) if *sub == **user => {
                        *self.expires_ms = crate::auth::expiry_ms(exp, cx.now_ms);
                        serde_json::json!({"type": "refreshed", "expires": exp}).to_string()
                    }
                    Ok(_) => msg::error("forbidden", "the token is for another user", None),
                    Err(e) => msg::error("bad_token", &e.to_string(), None),
                };
                push_json(self.out, &answer, self.deflate, cx);
            }
            Ok(m) => {
                // `ready` was true before this frame; the token is taken when a request is whole.
                self.bucket.take(cx.now_ms, rate, burst);
                let ev = Event::Received {
                    conn: cx.me,
                    user: user.clone(),
                    msg: m,
                };
                if !cx.offer(ev) {
                    push_json(
                        self.out,
                        &msg::error("overloaded", "server busy, retry", None),
                        self.deflate,
                        cx,
                    );
                }
            }
            Err((e, cid)) => push_json(
                self.out,
                &msg::error(e.code(), &e.message(), cid.as_deref()),
                self.deflate,
                cx,
            ),
        }
        false
    }
}

/// One frame for this connection: compressed when it negotiated permessage-deflate (`deflate` = its window
/// bits) and the payload is at least `ws_deflate_min_bytes` and gets smaller, plain otherwise (RSV1 is per
/// message, RFC 7692 §6).
fn echo(out: &mut WriteQueue, op: Opcode, payload: &[u8], deflate: u8, cx: &Cx<'_>) {
    use super::deflate::{TAKEOVER, deflate_frame, deflate_stream, window_bits};
    let mut v = Vec::new();
    let bits = window_bits(deflate);
    let compressed = bits != 0
        && payload.len() >= cx.cfg().ws_deflate_min_bytes
        && if deflate & TAKEOVER != 0 {
            deflate_stream(cx.me, bits, op, payload, &mut v)
        } else {
            deflate_frame(op, payload, bits, &mut v)
        };
    if !compressed {
        encode_frame(op, true, payload, &mut v);
    }
    out.push_vec(v);
    cx.metrics().frames_out.fetch_add(1, Relaxed);
}

fn push_json(out: &mut WriteQueue, json: &str, deflate: u8, cx: &Cx<'_>) {
    echo(out, Opcode::Text, json.as_bytes(), deflate, cx);
}

/// Starts a server-side close: queue a close frame; the loop shuts the write side once it is flushed and
/// waits (linger) for the peer to close. Only an open WebSocket: one closing already says nothing more.
pub(crate) fn start_close(conn: &mut Conn, code: CloseCode, reason: &str, cx: &Cx<'_>) {
    if conn.is_websocket() && conn.closing == Closing::Open {
        let mut v = Vec::with_capacity(4 + reason.len());
        encode_close(code, reason, &mut v);
        conn.out.push_vec(v);
        conn.closing = Closing::CloseSent;
        cx.metrics().close(code.0);
    }
}
