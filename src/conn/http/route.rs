//! Path → handler: which endpoint a request head is for, whether its method fits, and who answers it. The
//! small endpoints the loop answers itself (health, readiness, metrics, `/api/route`) are here too; a body is
//! dispatched by `body` once it has arrived.

use super::super::Cx;
use super::super::{Conn, Mode};
use super::respond::{self, Framing, Reply};
use super::{ErrorKind, HttpError, api, auth, client, cors, demo, fail, hand_over};
use crate::backplane::Event;
use corelay_proto::http1::{self, Method, RequestHead};

fn wrong_method(allow: &'static str, reason: &'static str) -> HttpError {
    HttpError::of(ErrorKind::MethodNotAllowed { allow }, reason)
}

/// Answers one request head: at once (health, metrics, errors), or by starting a body read, an upgrade, or a
/// hand-over to the backplane. HEAD is answered only where the loop writes the answer itself; a stream, a
/// poll or a history page is answered later by the backplane, with a body, so HEAD gets a 405 there.
pub fn head(conn: &mut Conn, head: RequestHead, served: u32, cx: &mut Cx<'_>) {
    let framing = Framing::of(&head);
    // Every refusal below answers a HEAD without a body.
    let refuse = |conn: &mut Conn, cx: &Cx<'_>, e: HttpError| {
        respond::refuse(conn, cx, &e, &[], framing.head_only)
    };
    let method = head.method();
    let get = matches!(method, Method::Get | Method::Head);
    let post = method == Method::Post;
    let path = head.path.as_str();
    let is_echo = cx.cfg().echo_path.as_deref() == Some(path);
    if let Err(e) = http1::check_no_body(&head) {
        return refuse(conn, cx, e);
    }
    if cx.cfg().admin_listen.is_some() {
        // Split listeners: the internal API and metrics only on the admin one, clients only on the public one.
        let internal = path.starts_with("/api/") || path == "/metrics";
        let health = path == "/healthz" || path == "/readyz";
        if !health && internal != conn.admin {
            return refuse(conn, cx, HttpError::of(ErrorKind::NotFound, "not found"));
        }
    }
    if conn.refused && path != "/healthz" && path != "/readyz" {
        return refuse(
            conn,
            cx,
            HttpError::of(
                ErrorKind::Overloaded,
                "too many new connections; retry later",
            ),
        );
    }
    match path {
        "/send" | "/sse" | "/poll" if method == Method::Options => {
            cors::preflight(conn, &head, cx);
        }
        "/sse" | "/poll" | "/api/history" if method != Method::Get => {
            refuse(conn, cx, wrong_method("GET", "use GET"));
        }
        _ if method == Method::Head && (path == "/ws" || is_echo) => {
            refuse(conn, cx, wrong_method("GET", "WebSocket upgrade needs GET"));
        }
        "/healthz" | "/readyz" | "/metrics" | "/api/route" if !get => {
            refuse(conn, cx, wrong_method("GET, HEAD", "use GET"));
        }
        "/send" | "/api/conversations" | "/api/publish" if !post => {
            refuse(conn, cx, wrong_method("POST", "use POST"));
        }
        "/api/devices" if !post && method != Method::Delete => {
            refuse(conn, cx, wrong_method("POST, DELETE", "use POST or DELETE"));
        }
        "/healthz" => {
            let body: &[u8] = if cx.env.bus_up() {
                b"ok\n"
            } else {
                b"degraded: redis unreachable\n"
            };
            let reply = Reply::new(200, "text/plain", body);
            respond::answer(conn, cx, reply, framing);
        }
        "/readyz" => {
            let (status, body): (u16, &[u8]) = if cx.env.draining() {
                (503, b"draining\n")
            } else if !cx.env.bus_up() {
                (503, b"degraded: redis unreachable\n")
            } else {
                (200, b"ready\n")
            };
            let reply = Reply::new(status, "text/plain", body);
            respond::answer(conn, cx, reply, framing);
        }
        "/metrics" => {
            let text = cx.env.render_metrics();
            let reply = Reply::new(200, "text/plain; version=0.0.4", text.as_bytes());
            respond::answer(conn, cx, reply, framing);
        }
        "/ws" => client::upgrade(conn, &head, false, cx),
        _ if is_echo => client::upgrade(conn, &head, true, cx),
        "/sse" => client::stream(conn, &head, cx),
        "/poll" => client::poll(conn, &head, served, cx),
        "/send" => {
            let checked = cors::of(&head, cx).and_then(|_| auth::user(&head, cx));
            match checked {
                Ok(_) => start_body(conn, head, served, cx),
                Err(e) => refuse(conn, cx, e),
            }
        }
        "/api/route" => match auth::api_key(&head, cx) {
            Err(e) => refuse(conn, cx, e),
            Ok(()) => match (head.query_param("user"), cx.env.ring().is_empty()) {
                (None, _) => refuse(
                    conn,
                    cx,
                    HttpError::of(ErrorKind::BadRequest, "user= is required"),
                ),
                (Some(_), true) => refuse(
                    conn,
                    cx,
                    HttpError::of(ErrorKind::Unavailable, "no ring configured (--ring-nodes)"),
                ),
                (Some(user), false) => {
                    let node = cx.env.ring().node_for(&user).unwrap_or_default();
                    let body = serde_json::json!({"user": user, "node": node}).to_string();
                    let reply = Reply::new(200, "application/json", body.as_bytes());
                    respond::answer(conn, cx, reply, framing);
                }
            },
        },
        "/api/conversations" | "/api/publish" | "/api/history" | "/api/devices" => {
            if let Err(e) = auth::api_key(&head, cx) {
                refuse(conn, cx, e);
            } else if get {
                // `/api/history` (GET only, see above).
                match api::history(&head) {
                    Ok(req) => {
                        let cors = cors::of(&head, cx).unwrap_or(None);
                        let ev = Event::Api { conn: cx.me, req };
                        hand_over(conn, ev, (head.keep_alive(), served, cors), None, cx);
                    }
                    Err(e) => refuse(conn, cx, e),
                }
            } else {
                start_body(conn, head, served, cx);
            }
        }
        _ if cx.cfg().demo
            && get
            && path.starts_with("/demo")
            && demo::serve(conn, &head, framing, cx) => {}
        _ => {
            // An unknown path keeps the connection: the client may have more to ask.
            let e = HttpError::of(ErrorKind::NotFound, "no such endpoint");
            respond::answer(conn, cx, Reply::error(&e), framing);
        }
    }
}

/// Starts reading the body a request head announced, within `max_body_bytes`.
fn start_body(conn: &mut Conn, head: RequestHead, served: u32, cx: &Cx<'_>) {
    if head.chunked {
        let e = HttpError::of(
            ErrorKind::NotImplemented,
            "chunked request bodies are not supported; send Content-Length",
        );
        return fail(conn, cx, e, &[]);
    }
    match head.content_length {
        None => fail(
            conn,
            cx,
            HttpError::of(ErrorKind::LengthRequired, "Content-Length required"),
            &[],
        ),
        Some(n) if n > cx.cfg().limits.max_body_bytes => fail(
            conn,
            cx,
            HttpError::of(
                ErrorKind::BodyTooLarge,
                "request body larger than max_body_bytes",
            ),
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

/// Dispatches a request body that has arrived whole: `POST /send`, or the internal API.
pub fn body(conn: &mut Conn, head: &RequestHead, body: &[u8], served: u32, cx: &mut Cx<'_>) {
    let path = head.path.as_str();
    let ev = match path {
        "/send" => client::send(head, body, cx),
        _ => match api::body(path, head.method(), body) {
            Some(req) => req.map(|req| Event::Api { conn: cx.me, req }),
            None => Err(HttpError::of(ErrorKind::NotFound, "no such endpoint")),
        },
    };
    match ev {
        Ok(ev) => {
            // `/send` refused a foreign origin in `head`; the internal API answers one without CORS headers.
            let cors = cors::of(head, cx).unwrap_or(None);
            hand_over(conn, ev, (head.keep_alive(), served, cors), None, cx);
        }
        Err(e) => fail(conn, cx, e, &[]),
    }
}
