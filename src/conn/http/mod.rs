//! HTTP mode: the request state machine. Bytes in → a PROXY header, request heads and bodies (framing,
//! keep-alive, pipelining) → `route`; the backplane's answers back out (a response, an SSE stream's start, a
//! held poll and its end).
//!
//! The parts: `route` (path → handler), `client` (the client endpoints: upgrade, SSE, poll, `POST /send`),
//! `api` (parsing internal API requests), `auth` (token, API key), `cors` (origin and CORS), `respond` (the
//! one response writer), `error` (re-exported from `corelay_proto::http_error`: the one error type; every refusal is an `HttpError`).

mod api;
mod auth;
mod client;
mod cors;
pub mod demo;
pub use corelay_proto::http_error as error;
mod respond;
mod route;

use std::sync::Arc;

use super::Cx;
use super::{Closing, Conn, Mode, PollState, StreamState};
use crate::backplane::{CursorVec, Event};
use crate::metrics::Transport;
use corelay_proto::{http1, sse};
pub use error::{ErrorKind, HttpError};
use respond::{Framing, Reply, ms};

/// What the loop must do after feeding a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Close now (nothing worth flushing).
    Close,
}

/// Feeds bytes to a connection in an HTTP mode (and, after an upgrade, the rest to the WebSocket decoder).
pub(crate) fn on_data(conn: &mut Conn, data: &[u8], cx: &mut Cx<'_>) -> Flow {
    if let Mode::Sse(_) = conn.mode {
        // A stream is one-way; whatever the client sends is dropped.
        conn.inbuf = Vec::new();
        return Flow::Continue;
    }
    conn.inbuf.extend_from_slice(data);
    loop {
        match &mut conn.mode {
            Mode::Proxy => match corelay_proto::proxy::parse(&conn.inbuf) {
                Ok(None) => return Flow::Continue,
                Ok(Some((header, n))) => {
                    conn.inbuf.drain(..n);
                    match header {
                        corelay_proto::proxy::ProxyHeader::Proxied {
                            source,
                            destination,
                        } => {
                            tracing::debug!(worker = cx.id(), conn = cx.me.index, client = %source, via = %destination, "accepted (PROXY protocol)");
                        }
                        corelay_proto::proxy::ProxyHeader::Local => {
                            tracing::debug!(
                                worker = cx.id(),
                                conn = cx.me.index,
                                "accepted (PROXY LOCAL: balancer health check)"
                            );
                        }
                    }
                    conn.mode = Mode::Http { served: 0 };
                    if conn.inbuf.is_empty() {
                        conn.inbuf = Vec::new();
                        return Flow::Continue;
                    }
                }
                Err(e) => {
                    tracing::debug!(worker = cx.id(), conn = cx.me.index, error = %e, "bad PROXY header");
                    return Flow::Close;
                }
            },
            Mode::Http { served } => {
                let served = *served;
                let limits = http1::HeadLimits {
                    max_header_bytes: cx.cfg().limits.max_header_bytes,
                    max_headers: cx.cfg().limits.max_headers,
                };
                match http1::parse_request(&conn.inbuf, &limits) {
                    Ok(None) => return Flow::Continue,
                    Err(e) => {
                        tracing::debug!(
                            worker = cx.id(),
                            conn = cx.me.index,
                            status = e.status(),
                            reason = %e.reason,
                            "bad request"
                        );
                        fail(conn, cx, e, &[]);
                        return Flow::Continue;
                    }
                    Ok(Some((head, n))) => {
                        conn.inbuf.drain(..n);
                        route::head(conn, head, served, cx);
                    }
                }
            }
            Mode::HttpBody { head, served } => {
                // `start_body` admitted only a length within `max_body_bytes`.
                let need = head.content_length.unwrap_or(0);
                if conn.inbuf.len() < need {
                    return Flow::Continue;
                }
                let served = *served;
                let head = std::mem::take(head);
                let body: Vec<u8> = conn.inbuf.drain(..need).collect();
                conn.mode = Mode::Http { served };
                route::body(conn, &head, &body, served, cx);
            }
            Mode::HttpAwait { .. } | Mode::PollHeld(_) | Mode::Sse(_) => {
                // A request pipelined behind one that is still being answered waits in `inbuf` (bounded).
                let limits = &cx.cfg().limits;
                if conn.inbuf.len()
                    > limits
                        .max_header_bytes
                        .saturating_add(limits.max_body_bytes)
                {
                    return Flow::Close;
                }
                return Flow::Continue;
            }
            Mode::WebSocket(_) => {
                let mut rest = std::mem::take(&mut conn.inbuf);
                return super::ws::on_data(conn, &mut rest, cx);
            }
        }
        if conn.closing != Closing::Open {
            return Flow::Continue;
        }
        if conn.inbuf.is_empty() {
            // Keep-alive and idle: give the buffer back.
            conn.inbuf = Vec::new();
            return Flow::Continue;
        }
    }
}

/// Answers an error and closes after the answer is written. `extra` header lines follow the kind's own (the
/// worker's timers answer 408 and 504 through here).
pub(crate) fn fail(conn: &mut Conn, cx: &Cx<'_>, e: HttpError, extra: &[&str]) {
    respond::refuse(conn, cx, &e, extra, false);
}

/// Hands a request to the backplane; the connection waits in `HttpAwait` for its answer.
fn hand_over(
    conn: &mut Conn,
    ev: Event,
    (keep_alive, served, cors): (bool, u32, Option<u16>),
    user: Option<Arc<str>>,
    cx: &mut Cx<'_>,
) {
    if !cx.offer(ev) {
        let e = HttpError::of(ErrorKind::Overloaded, "overloaded, retry later");
        return fail(conn, cx, e, &[]);
    }
    conn.mode = Mode::HttpAwait {
        keep_alive,
        served,
        user,
        cors,
        expires_s: 0,
    };
}

/// The backplane's answer to a request handed over.
pub(crate) fn on_response(conn: &mut Conn, status: u16, body: &str, cx: &mut Cx<'_>) {
    if conn.closing != Closing::Open {
        return; // already answered (an error, or a 504 when the answer came too late)
    }
    if let Mode::HttpAwait { keep_alive, .. } = conn.mode {
        let mut reply = Reply::new(status, "application/json", body.as_bytes());
        if status == 503 {
            // The backplane's 503s are all retryable (store unavailable or busy, not replicated in time,
            // overloaded): say when, as the accept queue's 503 does.
            reply.headers.push("Retry-After: 1".to_string());
        }
        respond::answer(conn, cx, reply, Framing::with_body(keep_alive));
    }
}

/// The backplane accepted an SSE stream.
pub(crate) fn on_stream_start(conn: &mut Conn, cursor: CursorVec, cx: &mut Cx<'_>) {
    let Mode::HttpAwait {
        user: Some(user),
        cors,
        expires_s,
        ..
    } = &conn.mode
    else {
        return;
    };
    let (user, cors, expires_ms) = (user.clone(), *cors, u64::from(*expires_s) * 1000);
    let lines = cors::lines(cors, cx);
    let extra: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(256);
    sse::encode_head(ms(cx.cfg().sse_retry), &extra, &mut out);
    // The first event names the stream, for `POST /send` operations on it (subscribe, refresh).
    let id = serde_json::json!({"type": "stream", "id": cx.me.stream_id()}).to_string();
    sse::encode_body("stream", id.as_bytes(), &mut out);
    out.push(b'\n');
    respond::queue(conn, cx, 200, out);
    conn.mode = Mode::Sse(Box::new(StreamState {
        user,
        cursor,
        expires_ms,
    }));
    cx.metrics().conn_closed(Transport::Http);
    cx.metrics().conn_opened(Transport::Sse);
    let at = cx.after(cx.cfg().heartbeat_interval);
    cx.schedule(super::until_expiry(at, expires_ms));
}

/// The backplane holds a long poll.
pub(crate) fn on_poll_hold(conn: &mut Conn, cursor: CursorVec, hold_ms: u64, cx: &mut Cx<'_>) {
    let Mode::HttpAwait {
        keep_alive,
        served,
        cors,
        ..
    } = conn.mode
    else {
        return;
    };
    conn.mode = Mode::PollHeld(Box::new(PollState {
        cursor,
        keep_alive,
        served,
        cors,
    }));
    cx.metrics().conn_closed(Transport::Http);
    cx.metrics().conn_opened(Transport::LongPoll);
    let at = cx.now_ms.saturating_add(hold_ms);
    cx.schedule(at);
}

/// A held poll ends: with messages (200) or at its timeout (204). The backplane stops routing to it.
pub(crate) fn finish_poll(conn: &mut Conn, body: Option<String>, cx: &mut Cx<'_>) {
    let Mode::PollHeld(p) = &conn.mode else {
        return;
    };
    let keep_alive = p.keep_alive;
    cx.metrics().conn_closed(Transport::LongPoll);
    cx.metrics().conn_opened(Transport::Http);
    cx.send(Event::Unfollow { conn: cx.me });
    let reply = match &body {
        Some(b) => Reply::new(200, "application/json", b.as_bytes()),
        None => Reply::new(204, "application/json", b""),
    };
    respond::answer(conn, cx, reply, Framing::with_body(keep_alive));
}
