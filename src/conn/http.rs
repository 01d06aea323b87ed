//! HTTP mode: request heads and bodies in, routes, responses out; the WebSocket upgrade.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use serde::Deserialize;

use super::{Conn, Mode, WsState};
use crate::backplane::{ApiRequest, ConnRef, Event};
use crate::metrics::Transport;
use crate::proto::http1::{self, HttpError, Method, RequestHead};
use crate::proto::msg;
use crate::proto::ws::{Decoder, Limits as WsLimits, Opcode, encode_frame};
use crate::worker::Ctx;

/// What the loop must do after feeding a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Close now (nothing worth flushing).
    Close,
}

/// Feeds bytes to a connection in HTTP mode (and, after an upgrade, the rest to the WebSocket decoder).
pub fn on_data(conn: &mut Conn, data: &[u8], cx: &mut Ctx, me: ConnRef) -> Flow {
    conn.inbuf.extend_from_slice(data);
    loop {
        match &mut conn.mode {
            Mode::Http { served } => {
                let served = *served;
                let limits = http1::HeadLimits {
                    max_header_bytes: cx.shared.cfg.limits.max_header_bytes,
                    max_headers: cx.shared.cfg.limits.max_headers,
                };
                match http1::parse_request(&conn.inbuf, &limits) {
                    Ok(None) => return Flow::Continue,
                    Err(e) => {
                        tracing::debug!(
                            worker = cx.id,
                            conn = me.index,
                            status = e.status,
                            reason = e.reason,
                            "bad request"
                        );
                        fail(conn, cx, e, &[]);
                        return Flow::Continue;
                    }
                    Ok(Some((head, n))) => {
                        conn.inbuf.drain(..n);
                        if let Flow::Close = route(conn, head, served, cx, me) {
                            return Flow::Close;
                        }
                    }
                }
            }
            Mode::HttpBody { head, served } => {
                let need = head.content_length.unwrap_or(0);
                if conn.inbuf.len() < need {
                    return Flow::Continue;
                }
                let served = *served;
                let head = std::mem::take(head);
                let body: Vec<u8> = conn.inbuf.drain(..need).collect();
                conn.mode = Mode::Http { served };
                post(conn, &head, &body, served, cx, me);
            }
            Mode::HttpAwait { .. } => return Flow::Continue,
            Mode::WebSocket(_) => {
                let mut rest = std::mem::take(&mut conn.inbuf);
                return super::ws::on_data(conn, &mut rest, cx, me);
            }
        }
        if conn.close_after_flush {
            return Flow::Continue;
        }
        if conn.inbuf.is_empty() {
            // Keep-alive and idle: give the buffer back.
            conn.inbuf = Vec::new();
            return Flow::Continue;
        }
    }
}

/// Answers an error and closes after the answer is written.
pub fn fail(conn: &mut Conn, cx: &Ctx, e: HttpError, extra: &[&str]) {
    let mut out = Vec::with_capacity(256);
    http1::encode_error(e, extra, false, &mut out);
    cx.metrics().response(e.status);
    conn.out.push_vec(out);
    conn.close_after_flush = true;
    conn.inbuf = Vec::new();
    conn.mode = Mode::HttpAwait {
        keep_alive: false,
        served: u32::MAX,
    };
}

fn respond(
    conn: &mut Conn,
    cx: &Ctx,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) {
    let mut out = Vec::with_capacity(128 + body.len());
    http1::encode_response(status, content_type, &[], body, keep_alive, &mut out);
    cx.metrics().response(status);
    conn.out.push_vec(out);
    if !keep_alive {
        conn.close_after_flush = true;
    }
}

fn route(conn: &mut Conn, head: RequestHead, served: u32, cx: &mut Ctx, me: ConnRef) -> Flow {
    let keep_alive = head.keep_alive();
    let method = head.method();
    let get = matches!(method, Method::Get | Method::Head);
    let next = Mode::Http { served: served + 1 };
    let path = head.path.as_str();
    let is_echo = cx.shared.cfg.echo_path.as_deref() == Some(path);
    match path {
        "/healthz" | "/readyz" | "/metrics" if !get => {
            fail(
                conn,
                cx,
                HttpError::new(405, "use GET"),
                &["Allow: GET, HEAD"],
            );
        }
        "/healthz" => {
            conn.mode = next;
            respond(conn, cx, 200, "text/plain", b"ok\n", keep_alive);
        }
        "/readyz" => {
            conn.mode = next;
            if cx.shared.draining.load(Relaxed) {
                respond(conn, cx, 503, "text/plain", b"draining\n", keep_alive);
            } else {
                respond(conn, cx, 200, "text/plain", b"ready\n", keep_alive);
            }
        }
        "/metrics" => {
            conn.mode = next;
            let text = cx.shared.metrics.render(cx.shared.backplane.queue_len());
            respond(
                conn,
                cx,
                200,
                "text/plain; version=0.0.4",
                text.as_bytes(),
                keep_alive,
            );
        }
        "/ws" => return upgrade(conn, &head, false, cx, me),
        _ if is_echo => return upgrade(conn, &head, true, cx, me),
        "/api/conversations" => {
            if method != Method::Post {
                fail(conn, cx, HttpError::new(405, "use POST"), &["Allow: POST"]);
            } else if let Err(e) = check_api_key(&head, cx) {
                fail(conn, cx, e, &["WWW-Authenticate: Bearer"]);
            } else {
                start_body(conn, head, served, cx);
            }
        }
        _ => {
            conn.mode = next;
            let mut out = Vec::new();
            http1::encode_error(
                HttpError::new(404, "no such endpoint"),
                &[],
                keep_alive,
                &mut out,
            );
            cx.metrics().response(404);
            conn.out.push_vec(out);
            if !keep_alive {
                conn.close_after_flush = true;
            }
        }
    }
    Flow::Continue
}

fn check_api_key(head: &RequestHead, cx: &Ctx) -> Result<(), HttpError> {
    let given = head
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .ok_or(HttpError::new(
            401,
            "missing API key (Authorization: Bearer KEY)",
        ))?;
    if crate::auth::key_matches(&cx.shared.api_key, given.trim()) {
        Ok(())
    } else {
        Err(HttpError::new(401, "invalid API key"))
    }
}

fn start_body(conn: &mut Conn, head: RequestHead, served: u32, cx: &Ctx) {
    if head.chunked {
        fail(
            conn,
            cx,
            HttpError::new(
                501,
                "chunked request bodies are not supported; send Content-Length",
            ),
            &[],
        );
        return;
    }
    match head.content_length {
        None => fail(
            conn,
            cx,
            HttpError::new(411, "Content-Length required"),
            &[],
        ),
        Some(n) if n > cx.shared.cfg.limits.max_body_bytes => fail(
            conn,
            cx,
            HttpError::new(413, "request body larger than max_body_bytes"),
            &[],
        ),
        Some(_) => {
            conn.mode = Mode::HttpBody {
                head: Box::new(head),
                served,
            }
        }
    }
}

fn post(conn: &mut Conn, head: &RequestHead, body: &[u8], served: u32, cx: &mut Ctx, me: ConnRef) {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewConversation {
        id: String,
        members: Vec<String>,
    }
    let req = match head.path.as_str() {
        "/api/conversations" => match serde_json::from_slice::<NewConversation>(body) {
            Ok(c) => ApiRequest::CreateConversation {
                id: c.id,
                members: c.members,
            },
            Err(_) => {
                fail(
                    conn,
                    cx,
                    HttpError::new(400, "body must be {\"id\": \"…\", \"members\": [\"…\"]}"),
                    &[],
                );
                return;
            }
        },
        _ => {
            fail(conn, cx, HttpError::new(404, "no such endpoint"), &[]);
            return;
        }
    };
    if cx
        .shared
        .backplane
        .try_send(Event::Api { conn: me, req })
        .is_err()
    {
        cx.metrics().backplane_full.fetch_add(1, Relaxed);
        fail(
            conn,
            cx,
            HttpError::new(503, "overloaded, retry later"),
            &["Retry-After: 1"],
        );
        return;
    }
    conn.mode = Mode::HttpAwait {
        keep_alive: head.keep_alive(),
        served,
    };
}

/// The backplane's answer to a request handed over with [`Event::Api`].
pub fn on_response(conn: &mut Conn, status: u16, body: &str, cx: &Ctx) {
    if let Mode::HttpAwait { keep_alive, served } = conn.mode {
        conn.mode = Mode::Http { served: served + 1 };
        respond(
            conn,
            cx,
            status,
            "application/json",
            body.as_bytes(),
            keep_alive,
        );
    }
}

fn upgrade(conn: &mut Conn, head: &RequestHead, echo: bool, cx: &mut Ctx, me: ConnRef) -> Flow {
    let supported: &[&'static str] = if echo { &[] } else { &[msg::SUBPROTOCOL] };
    let up = match http1::validate_upgrade(head, supported, &cx.shared.cfg.allowed_origins) {
        Ok(up) => up,
        Err(e) => {
            tracing::debug!(
                worker = cx.id,
                conn = me.index,
                status = e.status,
                reason = e.reason,
                "upgrade refused"
            );
            let extra: &[&str] = match (e.status, e.reason) {
                (426, r) if r.contains("Version") => &["Sec-WebSocket-Version: 13"],
                (426, _) => &["Upgrade: websocket"],
                (405, _) => &["Allow: GET"],
                _ => &[],
            };
            fail(conn, cx, e, extra);
            return Flow::Continue;
        }
    };
    let user: Option<Arc<str>> = if echo {
        None
    } else {
        let verified = match head.bearer_token() {
            None => Err(crate::auth::AuthError::Missing),
            Some(t) => cx.shared.verifier.verify(&t),
        };
        match verified {
            Ok(u) => Some(Arc::from(u)),
            Err(e) => {
                tracing::debug!(worker = cx.id, conn = me.index, error = %e, "unauthorized");
                let reason = match e {
                    crate::auth::AuthError::Missing => {
                        "missing token (Authorization: Bearer or ?token=)"
                    }
                    crate::auth::AuthError::Expired => "expired token",
                    _ => "invalid token",
                };
                fail(
                    conn,
                    cx,
                    HttpError::new(401, reason),
                    &["WWW-Authenticate: Bearer"],
                );
                return Flow::Continue;
            }
        }
    };
    let mut out = Vec::with_capacity(256);
    http1::encode_upgrade(&up, &mut out);
    cx.metrics().response(101);
    if let Some(u) = &user {
        let hb = cx.shared.cfg.heartbeat_interval.as_secs().max(1);
        encode_frame(
            Opcode::Text,
            true,
            msg::welcome(u, &cx.shared.cfg.node_id, hb).as_bytes(),
            &mut out,
        );
        cx.metrics().frames_out.fetch_add(1, Relaxed);
    }
    conn.out.push_vec(out);
    let limits = WsLimits {
        max_frame_len: cx.shared.cfg.limits.max_frame_bytes,
        max_message_len: cx.shared.cfg.limits.max_message_bytes,
    };
    cx.metrics().conn_closed(Transport::Http);
    cx.metrics().conn_opened(if echo {
        Transport::Echo
    } else {
        Transport::WebSocket
    });
    if let Some(u) = &user {
        cx.to_backplane(Event::Opened {
            conn: me,
            user: u.clone(),
        });
    }
    conn.mode = Mode::WebSocket(Box::new(WsState {
        decoder: Decoder::new(limits),
        user,
        ping_sent_ms: 0,
        close_sent: false,
    }));
    // Heartbeats start now; the handshake deadline is replaced.
    let at = cx.now_ms + cx.shared.cfg.heartbeat_interval.as_millis() as u64;
    cx.schedule(conn, me, at);
    Flow::Continue
}
