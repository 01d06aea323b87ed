//! HTTP mode: request heads and bodies in, routes, responses out; the WebSocket upgrade, SSE streams and polls.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use serde::Deserialize;

use super::{Conn, Mode, PollState, StreamState, WsState};
use crate::backplane::{ApiRequest, ConnRef, CursorVec, Event};
use crate::metrics::Transport;
use crate::proto::http1::{self, HttpError, Method, RequestHead};
use crate::proto::ws::{Decoder, Limits as WsLimits, Opcode, encode_frame};
use crate::proto::{cursor, msg, sse};
use crate::worker::Ctx;

/// What the loop must do after feeding a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Close now (nothing worth flushing).
    Close,
}

/// Feeds bytes to a connection in an HTTP mode (and, after an upgrade, the rest to the WebSocket decoder).
pub fn on_data(conn: &mut Conn, data: &[u8], cx: &mut Ctx, me: ConnRef) -> Flow {
    if let Mode::Sse(_) = conn.mode {
        // A stream is one-way; whatever the client sends is dropped.
        conn.inbuf = Vec::new();
        return Flow::Continue;
    }
    conn.inbuf.extend_from_slice(data);
    loop {
        match &mut conn.mode {
            Mode::Proxy => match crate::cluster::proxy::parse(&conn.inbuf) {
                Ok(None) => return Flow::Continue,
                Ok(Some((header, n))) => {
                    conn.inbuf.drain(..n);
                    match header {
                        crate::cluster::proxy::ProxyHeader::Proxied {
                            source,
                            destination,
                        } => {
                            tracing::debug!(worker = cx.id, conn = me.index, client = %source, via = %destination, "accepted (PROXY protocol)");
                        }
                        crate::cluster::proxy::ProxyHeader::Local => {
                            tracing::debug!(
                                worker = cx.id,
                                conn = me.index,
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
                    tracing::debug!(worker = cx.id, conn = me.index, error = %e, "bad PROXY header");
                    return Flow::Close;
                }
            },
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
                        route(conn, head, served, cx, me);
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
            Mode::HttpAwait { .. } | Mode::PollHeld(_) | Mode::Sse(_) => {
                // A request pipelined behind one that is still being answered waits in `inbuf` (bounded).
                if conn.inbuf.len()
                    > cx.shared.cfg.limits.max_header_bytes + cx.shared.cfg.limits.max_body_bytes
                {
                    return Flow::Close;
                }
                return Flow::Continue;
            }
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
    refuse(conn, cx, e, extra, false);
}

/// `fail`, for a request whose method is known: a HEAD gets the error's head without its body.
fn refuse(conn: &mut Conn, cx: &Ctx, e: HttpError, extra: &[&str], head_only: bool) {
    let framing = Framing {
        keep_alive: false,
        head_only,
    };
    let mut out = Vec::with_capacity(256);
    encode(
        e.status,
        "application/json",
        extra,
        http1::error_body(e).as_bytes(),
        framing,
        &mut out,
    );
    cx.metrics().response(e.status);
    conn.out.push_vec(out);
    conn.close_after_flush = true;
    conn.inbuf = Vec::new();
    conn.mode = Mode::HttpAwait {
        keep_alive: false,
        served: u32::MAX,
        user: None,
        cors: None,
        expires_s: 0,
    };
}

/// How an answer is framed on the wire.
#[derive(Clone, Copy, Debug)]
struct Framing {
    /// The connection stays open for the next request.
    keep_alive: bool,
    /// A HEAD request: the head a GET would get, `Content-Length` included, and no body (RFC 9110 §9.3.2).
    /// Sending the body anyway would make a keep-alive client read it as the start of the next answer.
    head_only: bool,
}

impl Framing {
    fn of(head: &RequestHead) -> Self {
        Framing {
            keep_alive: head.keep_alive(),
            head_only: head.method() == Method::Head,
        }
    }

    /// An answer the backplane made (HEAD never reaches it, see `route`).
    fn with_body(keep_alive: bool) -> Self {
        Framing {
            keep_alive,
            head_only: false,
        }
    }
}

/// Appends an answer: the whole response, or only its head for HEAD.
fn encode(
    status: u16,
    content_type: &str,
    extra: &[&str],
    body: &[u8],
    framing: Framing,
    out: &mut Vec<u8>,
) {
    let keep_alive = framing.keep_alive;
    if framing.head_only {
        http1::encode_response_head(status, content_type, extra, body.len(), keep_alive, out);
    } else {
        http1::encode_response(status, content_type, extra, body, keep_alive, out);
    }
}

/// Writes a response and returns the connection to reading requests (or closes it after the write).
fn respond(
    conn: &mut Conn,
    cx: &mut Ctx,
    me: ConnRef,
    status: u16,
    content_type: &str,
    body: &[u8],
    framing: Framing,
) {
    let served = match &conn.mode {
        Mode::Http { served } | Mode::HttpBody { served, .. } | Mode::HttpAwait { served, .. } => {
            *served
        }
        Mode::PollHeld(p) => p.served,
        Mode::WebSocket(_) | Mode::Sse(_) | Mode::Proxy => 0,
    };
    let cors = match &conn.mode {
        Mode::HttpAwait { cors, .. } => *cors,
        Mode::PollHeld(p) => p.cors,
        _ => None,
    };
    let lines = cors_lines(cors, cx);
    let extra: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(128 + body.len());
    encode(status, content_type, &extra, body, framing, &mut out);
    cx.metrics().response(status);
    conn.out.push_vec(out);
    conn.mode = Mode::Http {
        served: served.saturating_add(1),
    };
    if framing.keep_alive {
        let at = cx.now_ms + cx.shared.cfg.keepalive_timeout.as_millis() as u64;
        cx.schedule(conn, me, at);
    } else {
        conn.close_after_flush = true;
    }
}

/// CORS for a browser request to a one-way client endpoint: which allowed origin to answer with (the index in
/// `allowed_origins`, or `ANY_ORIGIN` when none are configured); None without an `Origin`. A foreign origin is
/// the 403 of `http1::check_origin`, the check `/ws` makes too. Tokens travel in the query string, so no
/// credentials mode is needed and `*` is safe.
fn cors_of(head: &RequestHead, cx: &Ctx) -> Result<Option<u16>, HttpError> {
    use http1::OriginMatch;
    Ok(
        match http1::check_origin(head.origin.as_deref(), &cx.shared.cfg.allowed_origins)? {
            OriginMatch::Absent => None,
            OriginMatch::AnyAllowed => Some(super::ANY_ORIGIN),
            // An index past what `cors` can name (65,535 origins) answers without CORS headers.
            OriginMatch::Listed(i) => u16::try_from(i).ok().filter(|&i| i != super::ANY_ORIGIN),
        },
    )
}

fn cors_lines(cors: Option<u16>, cx: &Ctx) -> Vec<String> {
    match cors {
        None => Vec::new(),
        Some(super::ANY_ORIGIN) => vec!["Access-Control-Allow-Origin: *".into()],
        Some(i) => match cx.shared.cfg.allowed_origins.get(usize::from(i)) {
            Some(o) => vec![
                format!("Access-Control-Allow-Origin: {o}"),
                "Vary: Origin".into(),
            ],
            None => Vec::new(),
        },
    }
}

/// The CORS preflight of a browser `POST /send` (JSON body, `Authorization` header) and friends.
fn preflight(conn: &mut Conn, head: &RequestHead, cx: &mut Ctx, me: ConnRef) {
    // A preflight without an `Origin` is no preflight: refused like a foreign origin.
    let Ok(Some(cors)) = cors_of(head, cx) else {
        return fail(conn, cx, HttpError::new(403, "origin not allowed"), &[]);
    };
    let mut lines = cors_lines(Some(cors), cx);
    lines.extend([
        "Access-Control-Allow-Methods: GET, POST, OPTIONS".to_string(),
        "Access-Control-Allow-Headers: Authorization, Content-Type, Last-Event-ID".to_string(),
        "Access-Control-Max-Age: 600".to_string(),
    ]);
    let extra: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(256);
    let keep_alive = head.keep_alive();
    http1::encode_response(204, "text/plain", &extra, b"", keep_alive, &mut out);
    cx.metrics().response(204);
    conn.out.push_vec(out);
    if keep_alive {
        let at = cx.now_ms + cx.shared.cfg.keepalive_timeout.as_millis() as u64;
        cx.schedule(conn, me, at);
    } else {
        conn.close_after_flush = true;
    }
}

/// Answers one request head: at once (health, metrics, errors), or by starting a body read, an upgrade, or a
/// hand-over to the backplane. HEAD is answered only where the loop writes the answer itself; a stream, a
/// poll or a history page is answered later by the backplane, with a body, so HEAD gets a 405 there.
fn route(conn: &mut Conn, head: RequestHead, served: u32, cx: &mut Ctx, me: ConnRef) {
    let framing = Framing::of(&head);
    // Every refusal below answers a HEAD without a body.
    let fail = |conn: &mut Conn, cx: &Ctx, e: HttpError, extra: &[&str]| {
        refuse(conn, cx, e, extra, framing.head_only)
    };
    let method = head.method();
    let get = matches!(method, Method::Get | Method::Head);
    let post = method == Method::Post;
    let path = head.path.as_str();
    let is_echo = cx.shared.cfg.echo_path.as_deref() == Some(path);
    let wrong_method = |allow: &'static str| HttpError::new(405, allow);
    if let Err(e) = http1::check_no_body(&head) {
        return fail(conn, cx, e, &[]);
    }
    if cx.shared.cfg.admin_listen.is_some() {
        // Split listeners: the internal API and metrics only on the admin one, clients only on the public one.
        let internal = path.starts_with("/api/") || path == "/metrics";
        let health = path == "/healthz" || path == "/readyz";
        if !health && internal != conn.admin {
            return fail(conn, cx, HttpError::new(404, "not found"), &[]);
        }
    }
    match path {
        "/send" | "/sse" | "/poll" if method == Method::Options => {
            conn.mode = Mode::Http {
                served: served.saturating_add(1),
            };
            preflight(conn, &head, cx, me);
        }
        "/sse" | "/poll" | "/api/history" if method != Method::Get => {
            fail(conn, cx, wrong_method("use GET"), &["Allow: GET"]);
        }
        _ if method == Method::Head && (path == "/ws" || is_echo) => {
            fail(
                conn,
                cx,
                wrong_method("WebSocket upgrade needs GET"),
                &["Allow: GET"],
            );
        }
        "/healthz" | "/readyz" | "/metrics" | "/api/route" if !get => {
            fail(conn, cx, wrong_method("use GET"), &["Allow: GET, HEAD"]);
        }
        "/send" | "/api/conversations" | "/api/publish" if !post => {
            fail(conn, cx, wrong_method("use POST"), &["Allow: POST"]);
        }
        "/api/devices" if !post && method != Method::Delete => {
            fail(
                conn,
                cx,
                wrong_method("use POST or DELETE"),
                &["Allow: POST, DELETE"],
            );
        }
        "/healthz" => {
            let body: &[u8] = if cx.shared.metrics.bus_up.load(Relaxed) {
                b"ok\n"
            } else {
                b"degraded: redis unreachable\n"
            };
            respond(conn, cx, me, 200, "text/plain", body, framing)
        }
        "/readyz" => {
            if cx.shared.draining.load(Relaxed) {
                respond(conn, cx, me, 503, "text/plain", b"draining\n", framing);
            } else if !cx.shared.metrics.bus_up.load(Relaxed) {
                respond(
                    conn,
                    cx,
                    me,
                    503,
                    "text/plain",
                    b"degraded: redis unreachable\n",
                    framing,
                );
            } else {
                respond(conn, cx, me, 200, "text/plain", b"ready\n", framing);
            }
        }
        "/metrics" => {
            let text = cx.shared.metrics.render(cx.shared.backplane.queue_len());
            respond(
                conn,
                cx,
                me,
                200,
                "text/plain; version=0.0.4",
                text.as_bytes(),
                framing,
            );
        }
        "/ws" => upgrade(conn, &head, false, cx, me),
        _ if is_echo => upgrade(conn, &head, true, cx, me),
        "/sse" => stream(conn, &head, cx, me),
        "/poll" => poll(conn, &head, served, cx, me),
        "/send" => {
            if let Err(e) = cors_of(&head, cx) {
                return fail(conn, cx, e, &[]);
            }
            match authenticate(&head, cx, me) {
                Ok(_) => start_body(conn, head, served, cx),
                Err(e) => fail(conn, cx, e, &["WWW-Authenticate: Bearer"]),
            }
        }
        "/api/route" => match check_api_key(&head, cx) {
            Err(e) => fail(conn, cx, e, &["WWW-Authenticate: Bearer"]),
            Ok(()) => match (head.query_param("user"), cx.shared.ring.is_empty()) {
                (None, _) => fail(conn, cx, HttpError::new(400, "user= is required"), &[]),
                (Some(_), true) => fail(
                    conn,
                    cx,
                    HttpError::new(503, "no ring configured (--ring-nodes)"),
                    &[],
                ),
                (Some(user), false) => {
                    let node = cx.shared.ring.node_for(&user).unwrap_or_default();
                    let body = serde_json::json!({"user": user, "node": node}).to_string();
                    respond(
                        conn,
                        cx,
                        me,
                        200,
                        "application/json",
                        body.as_bytes(),
                        framing,
                    );
                }
            },
        },
        "/api/conversations" | "/api/publish" | "/api/history" | "/api/devices" => {
            if let Err(e) = check_api_key(&head, cx) {
                fail(conn, cx, e, &["WWW-Authenticate: Bearer"]);
            } else if get {
                api_history(conn, &head, served, cx, me);
            } else {
                start_body(conn, head, served, cx);
            }
        }
        _ => {
            let body = br#"{"error":"no such endpoint","status":404}"#;
            respond(conn, cx, me, 404, "application/json", body, framing);
        }
    }
}

/// The user of a client request (token in `Authorization: Bearer` or `?token=`).
/// The user of the request's token, and the loop ms at which the token expires.
fn authenticate(head: &RequestHead, cx: &Ctx, me: ConnRef) -> Result<(Arc<str>, u64), HttpError> {
    let verified = match head.bearer_token() {
        None => Err(crate::auth::AuthError::Missing),
        Some(t) => cx.shared.verifier.verify_until(&t),
    };
    verified
        .map(|(user, exp)| (Arc::from(user), crate::auth::expiry_ms(exp, cx.now_ms)))
        .map_err(|e| {
            tracing::debug!(worker = cx.id, conn = me.index, error = %e, "unauthorized");
            HttpError::new(
                401,
                match e {
                    crate::auth::AuthError::Missing => {
                        "missing token (Authorization: Bearer or ?token=)"
                    }
                    crate::auth::AuthError::Expired => "expired token",
                    _ => "invalid token",
                },
            )
        })
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

/// Hands a request to the backplane; the connection waits in `HttpAwait` for its answer.
fn hand_over(
    conn: &mut Conn,
    ev: Event,
    (keep_alive, served, cors): (bool, u32, Option<u16>),
    user: Option<Arc<str>>,
    cx: &mut Ctx,
) {
    if cx.shared.backplane.try_send(ev).is_err() {
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
        keep_alive,
        served,
        user,
        cors,
        expires_s: 0,
    };
}

fn post(conn: &mut Conn, head: &RequestHead, body: &[u8], served: u32, cx: &mut Ctx, me: ConnRef) {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewConversation {
        id: String,
        members: Vec<String>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Publish {
        channel: String,
        body: Box<serde_json::value::RawValue>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Device {
        user: String,
        platform: String,
        token: String,
        /// Accepted for the documented shape; one app (`--apns-topic`) per gateway for now.
        #[allow(dead_code)]
        app: Option<String>,
    }
    let bad = |reason: &'static str| HttpError::new(400, reason);
    let ev = match head.path.as_str() {
        "/api/devices" => match serde_json::from_slice::<Device>(body) {
            Ok(d) => Event::Api {
                conn: me,
                req: ApiRequest::Device {
                    register: head.method() == Method::Post,
                    user: d.user,
                    platform: d.platform,
                    token: d.token,
                },
            },
            Err(_) => {
                return fail(
                    conn,
                    cx,
                    bad(
                        "body must be {\"user\": \"…\", \"platform\": \"apns\"|\"fcm\", \"token\": \"…\"}",
                    ),
                    &[],
                );
            }
        },
        "/api/conversations" => match serde_json::from_slice::<NewConversation>(body) {
            Ok(c) => Event::Api {
                conn: me,
                req: ApiRequest::CreateConversation {
                    id: c.id,
                    members: c.members,
                },
            },
            Err(_) => {
                return fail(
                    conn,
                    cx,
                    bad("body must be {\"id\": \"…\", \"members\": [\"…\"]}"),
                    &[],
                );
            }
        },
        "/api/publish" => match serde_json::from_slice::<Publish>(body) {
            Ok(p) => Event::Api {
                conn: me,
                req: ApiRequest::Publish {
                    channel: p.channel,
                    body: p.body,
                },
            },
            Err(_) => {
                return fail(
                    conn,
                    cx,
                    bad("body must be {\"channel\": \"…\", \"body\": …}"),
                    &[],
                );
            }
        },
        "/send" => {
            let user = match authenticate(head, cx, me) {
                Ok((u, _)) => u,
                Err(e) => return fail(conn, cx, e, &[]),
            };
            let stream = msg::stream_of(body).map(|s| ConnRef::parse_stream_id(&s));
            if let Some(None) = stream {
                return fail(conn, cx, bad("\"stream\" is not a stream id"), &[]);
            }
            match msg::parse_client(body) {
                Ok(msg::ClientMsg::Refresh { token }) => {
                    // Verified here (the loop holds the verifier); the stream's loop gets the new expiry.
                    let Some(Some(stream)) = stream else {
                        return fail(conn, cx, bad("refresh needs the \"stream\" it is for"), &[]);
                    };
                    match cx.shared.verifier.verify_until(&token) {
                        Ok((sub, exp)) if *sub == *user => Event::Send {
                            conn: me,
                            user,
                            msg: msg::ClientMsg::Refresh {
                                token: String::new(),
                            },
                            stream: Some(stream),
                            expires: Some(exp),
                        },
                        Ok(_) => {
                            return fail(
                                conn,
                                cx,
                                HttpError::new(403, "the token is for another user"),
                                &[],
                            );
                        }
                        Err(_) => {
                            return fail(conn, cx, HttpError::new(401, "invalid token"), &[]);
                        }
                    }
                }
                Ok(m) => Event::Send {
                    conn: me,
                    user,
                    msg: m,
                    stream: stream.flatten(),
                    expires: None,
                },
                Err(_) => {
                    return fail(
                        conn,
                        cx,
                        bad(
                            "body must be {\"type\":\"send\",\"conversation\":…,\"client_id\":…,\"body\":…}",
                        ),
                        &[],
                    );
                }
            }
        }
        _ => return fail(conn, cx, HttpError::new(404, "no such endpoint"), &[]),
    };
    // `/send` refused a foreign origin in `route`; the internal API answers one without CORS headers.
    let cors = cors_of(head, cx).unwrap_or(None);
    hand_over(conn, ev, (head.keep_alive(), served, cors), None, cx);
}

fn api_history(conn: &mut Conn, head: &RequestHead, served: u32, cx: &mut Ctx, me: ConnRef) {
    let Some(conversation) = head.query_param("conversation") else {
        return fail(
            conn,
            cx,
            HttpError::new(400, "conversation= is required"),
            &[],
        );
    };
    let num = |name: &str| head.query_param(name).map(|v| v.parse::<u64>());
    // `limit` is clamped by the router; here it only has to fit a usize.
    let (before, limit) = match (num("before"), num("limit")) {
        (Some(Err(_)), _) | (_, Some(Err(_))) => {
            return fail(
                conn,
                cx,
                HttpError::new(400, "before= and limit= must be numbers"),
                &[],
            );
        }
        (b, l) => (
            b.map(|r| r.unwrap_or(0)),
            l.map(|r| usize::try_from(r.unwrap_or(0)).unwrap_or(usize::MAX)),
        ),
    };
    let ev = Event::Api {
        conn: me,
        req: ApiRequest::History {
            conversation,
            before,
            limit,
        },
    };
    let cors = cors_of(head, cx).unwrap_or(None);
    hand_over(conn, ev, (head.keep_alive(), served, cors), None, cx);
}

/// Channels and cursor of an SSE or poll request; errors are 400s with the reason.
fn channels_and_cursor(
    head: &RequestHead,
    cursor_text: Option<String>,
) -> Result<(Vec<String>, Option<std::collections::BTreeMap<String, u64>>), String> {
    let channels = cursor::parse_channels(&head.query_param("channels").unwrap_or_default())
        .map_err(|e| e.0)?;
    let cur = match cursor_text {
        Some(t) => Some(cursor::parse(&t).map_err(|e| format!("bad cursor: {}", e.0))?),
        None => None,
    };
    Ok((channels, cur))
}

fn bad_request_body(conn: &mut Conn, cx: &Ctx, reason: String) {
    let body = serde_json::json!({"error": reason, "status": 400}).to_string();
    let mut out = Vec::with_capacity(128 + body.len());
    http1::encode_response(
        400,
        "application/json",
        &[],
        body.as_bytes(),
        false,
        &mut out,
    );
    cx.metrics().response(400);
    conn.out.push_vec(out);
    conn.close_after_flush = true;
    conn.mode = Mode::HttpAwait {
        keep_alive: false,
        served: u32::MAX,
        user: None,
        cors: None,
        expires_s: 0,
    };
}

fn stream(conn: &mut Conn, head: &RequestHead, cx: &mut Ctx, me: ConnRef) {
    let cors = match cors_of(head, cx) {
        Ok(c) => c,
        Err(e) => return fail(conn, cx, e, &[]),
    };
    let (user, expires_ms) = match authenticate(head, cx, me) {
        Ok(u) => u,
        Err(e) => return fail(conn, cx, e, &["WWW-Authenticate: Bearer"]),
    };
    let resume = head
        .last_event_id
        .clone()
        .or_else(|| head.query_param("last_event_id"));
    let (channels, cur) = match channels_and_cursor(head, resume) {
        Ok(v) => v,
        Err(reason) => return bad_request_body(conn, cx, reason),
    };
    let ev = Event::Stream {
        conn: me,
        user: user.clone(),
        channels,
        cursor: cur.unwrap_or_default(),
    };
    hand_over(conn, ev, (false, 0, cors), Some(user), cx);
    if let Mode::HttpAwait { expires_s, .. } = &mut conn.mode {
        *expires_s = u32::try_from(expires_ms.div_ceil(1000)).unwrap_or(u32::MAX);
    }
}

fn poll(conn: &mut Conn, head: &RequestHead, served: u32, cx: &mut Ctx, me: ConnRef) {
    let cors = match cors_of(head, cx) {
        Ok(c) => c,
        Err(e) => return fail(conn, cx, e, &[]),
    };
    let user = match authenticate(head, cx, me) {
        Ok((u, _)) => u,
        Err(e) => return fail(conn, cx, e, &["WWW-Authenticate: Bearer"]),
    };
    let (channels, cur) = match channels_and_cursor(head, head.query_param("cursor")) {
        Ok(v) => v,
        Err(reason) => return bad_request_body(conn, cx, reason),
    };
    let max = cx.shared.cfg.max_poll_timeout;
    let Some(hold_ms) = poll_hold_ms(head.query_param("timeout").as_deref(), max) else {
        return bad_request_body(conn, cx, "timeout= is whole seconds".into());
    };
    let ev = Event::Poll {
        conn: me,
        user: user.clone(),
        channels,
        cursor: cur,
        hold_ms,
    };
    hand_over(conn, ev, (head.keep_alive(), served, cors), Some(user), cx);
}

/// How long a poll is held, in ms: `timeout=` whole seconds (default `DEFAULT_POLL_TIMEOUT`), capped by `max`.
/// The client's number is multiplied saturating, so a huge one is just the cap, never an overflow; None when
/// it is not a number.
fn poll_hold_ms(timeout: Option<&str>, max: std::time::Duration) -> Option<u64> {
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let asked = match timeout {
        None => ms(crate::config::DEFAULT_POLL_TIMEOUT),
        Some(t) => t.parse::<u64>().ok()?.saturating_mul(1000),
    };
    Some(asked.min(ms(max)))
}

/// The backplane's answer to a request handed over.
pub fn on_response(conn: &mut Conn, status: u16, body: &str, cx: &mut Ctx, me: ConnRef) {
    if conn.close_after_flush {
        return; // already answered (an error, or a 504 when the answer came too late)
    }
    if let Mode::HttpAwait { keep_alive, .. } = conn.mode {
        respond(
            conn,
            cx,
            me,
            status,
            "application/json",
            body.as_bytes(),
            Framing::with_body(keep_alive),
        );
    }
}

/// The backplane accepted an SSE stream.
pub fn on_stream_start(conn: &mut Conn, cursor: CursorVec, cx: &mut Ctx, me: ConnRef) {
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
    let lines = cors_lines(cors, cx);
    let extra: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(256);
    sse::encode_head(cx.shared.cfg.sse_retry.as_millis() as u64, &extra, &mut out);
    cx.metrics().response(200);
    // The first event names the stream, for `POST /send` operations on it (subscribe, refresh).
    let id = serde_json::json!({"type": "stream", "id": me.stream_id()}).to_string();
    sse::encode_body("stream", id.as_bytes(), &mut out);
    out.push(b'\n');
    conn.out.push_vec(out);
    conn.mode = Mode::Sse(Box::new(StreamState {
        user,
        cursor,
        expires_ms,
    }));
    cx.metrics().conn_closed(Transport::Http);
    cx.metrics().conn_opened(Transport::Sse);
    let at = cx.now_ms + cx.shared.cfg.heartbeat_interval.as_millis() as u64;
    cx.schedule(conn, me, super::until_expiry(at, expires_ms));
}

/// The backplane holds a long poll.
pub fn on_poll_hold(conn: &mut Conn, cursor: CursorVec, hold_ms: u64, cx: &mut Ctx, me: ConnRef) {
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
    cx.schedule(conn, me, cx.now_ms + hold_ms);
}

/// A held poll ends: with messages (200) or at its timeout (204). The backplane stops routing to it.
pub fn finish_poll(conn: &mut Conn, body: Option<String>, cx: &mut Ctx, me: ConnRef) {
    let Mode::PollHeld(p) = &conn.mode else {
        return;
    };
    let keep_alive = p.keep_alive;
    cx.metrics().conn_closed(Transport::LongPoll);
    cx.metrics().conn_opened(Transport::Http);
    cx.to_backplane(Event::Unfollow { conn: me });
    let framing = Framing::with_body(keep_alive);
    match body {
        Some(b) => respond(conn, cx, me, 200, "application/json", b.as_bytes(), framing),
        None => respond(conn, cx, me, 204, "application/json", b"", framing),
    }
}

fn upgrade(conn: &mut Conn, head: &RequestHead, echo: bool, cx: &mut Ctx, me: ConnRef) {
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
            return fail(conn, cx, e, extra);
        }
    };
    let (user, expires_ms) = if echo {
        (None, 0)
    } else {
        match authenticate(head, cx, me) {
            Ok((u, exp)) => (Some(u), exp),
            Err(e) => return fail(conn, cx, e, &["WWW-Authenticate: Bearer"]),
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
        bucket: super::Bucket::full(cx.shared.cfg.limits.client_burst, cx.now_ms),
        paused: false,
        expires_ms,
    }));
    // Heartbeats start now; the handshake deadline is replaced.
    let at = cx.now_ms + cx.shared.cfg.heartbeat_interval.as_millis() as u64;
    cx.schedule(conn, me, super::until_expiry(at, expires_ms));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn poll_timeout_saturates_at_the_cap() {
        let max = Duration::from_secs(60);
        assert_eq!(poll_hold_ms(Some("0"), max), Some(0));
        assert_eq!(poll_hold_ms(Some("5"), max), Some(5_000));
        assert_eq!(poll_hold_ms(Some("61"), max), Some(60_000));
        // 18446744073709551615 s × 1000 overflowed (a panic in debug builds, a wrapped hold in release).
        assert_eq!(poll_hold_ms(Some(&u64::MAX.to_string()), max), Some(60_000));
        assert_eq!(poll_hold_ms(Some("18446744073709552"), max), Some(60_000));
        assert_eq!(poll_hold_ms(None, max), Some(25_000));
        assert_eq!(poll_hold_ms(None, Duration::from_secs(10)), Some(10_000));
        assert_eq!(poll_hold_ms(Some("-1"), max), None);
        assert_eq!(poll_hold_ms(Some("18446744073709551616"), max), None);
        assert_eq!(poll_hold_ms(Some("1.5"), max), None);
        assert_eq!(poll_hold_ms(Some(""), max), None);
    }
}
