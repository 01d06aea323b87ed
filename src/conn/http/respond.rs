//! The one response writer of the HTTP path. Every answer with a `Content-Length` (errors, answers made here or
//! by the backplane, preflights, the HEAD variant of each) is encoded by `write`, and every response's bytes
//! (those too, the 101 of an upgrade and an SSE stream's head) are counted and queued by `queue`. What happens
//! to the connection after it is `answer` (stays open for the next request, or closes per `Connection`) or
//! `refuse` (closes).

use std::borrow::Cow;

use super::super::Cx;
use super::super::{Closing, Conn, Mode};
use super::HttpError;
use super::cors;
use corelay_proto::http1::{self, Method, RequestHead};

/// How an answer is framed on the wire.
#[derive(Clone, Copy, Debug)]
pub struct Framing {
    /// The connection stays open for the next request.
    pub keep_alive: bool,
    /// A HEAD request: the head a GET would get, `Content-Length` included, and no body (RFC 9110 §9.3.2).
    /// Sending the body anyway would make a keep-alive client read it as the start of the next answer.
    pub head_only: bool,
}

impl Framing {
    pub fn of(head: &RequestHead) -> Self {
        Framing {
            keep_alive: head.keep_alive(),
            head_only: head.method() == Method::Head,
        }
    }

    /// An answer the backplane made (HEAD never reaches it, see `route`).
    pub fn with_body(keep_alive: bool) -> Self {
        Framing {
            keep_alive,
            head_only: false,
        }
    }
}

/// A response with a `Content-Length`.
pub struct Reply<'a> {
    pub status: u16,
    pub content_type: &'a str,
    /// Header lines (`Name: value`, no CRLF) after the CORS ones of the request being answered.
    pub headers: Vec<String>,
    pub body: Cow<'a, [u8]>,
}

impl<'a> Reply<'a> {
    pub fn new(status: u16, content_type: &'a str, body: &'a [u8]) -> Self {
        Reply {
            status,
            content_type,
            headers: Vec::new(),
            body: Cow::Borrowed(body),
        }
    }

    /// An error answered like any other response (the connection stays open).
    pub fn error(e: &HttpError) -> Self {
        Reply {
            status: e.status(),
            content_type: "application/json",
            headers: e.header_lines(),
            body: Cow::Owned(e.body().into_bytes()),
        }
    }
}

/// Counts a response and queues its bytes: the last step of every response this module writes.
pub fn queue(conn: &mut Conn, cx: &Cx<'_>, status: u16, out: Vec<u8>) {
    cx.metrics().response(status);
    conn.out.push_vec(out);
}

/// Encodes and queues a response with a `Content-Length`: the whole of it, or only its head for HEAD. `cors`
/// lines come first, then the reply's own.
fn write(conn: &mut Conn, cx: &Cx<'_>, reply: &Reply<'_>, cors: &[String], framing: Framing) {
    let lines: Vec<&str> = cors
        .iter()
        .chain(&reply.headers)
        .map(String::as_str)
        .collect();
    let mut out = Vec::with_capacity(128 + reply.body.len());
    let (status, ct, body) = (reply.status, reply.content_type, &reply.body[..]);
    if framing.head_only {
        http1::encode_response_head(status, ct, &lines, body.len(), framing.keep_alive, &mut out);
    } else {
        http1::encode_response(status, ct, &lines, body, framing.keep_alive, &mut out);
    }
    queue(conn, cx, status, out);
}

/// Answers the request and returns the connection to reading requests (or closes it after the write). The
/// CORS lines are those the request was accepted with (kept in the mode while the backplane answers).
pub fn answer(conn: &mut Conn, cx: &mut Cx<'_>, reply: Reply<'_>, framing: Framing) {
    let (served, cors) = match &conn.mode {
        Mode::Http { served } | Mode::HttpBody { served, .. } => (*served, None),
        Mode::HttpAwait { served, cors, .. } => (*served, *cors),
        Mode::PollHeld(p) => (p.served, p.cors),
        Mode::WebSocket(_) | Mode::Sse(_) | Mode::Proxy => (0, None),
    };
    write(conn, cx, &reply, &cors::lines(cors, cx), framing);
    conn.mode = Mode::Http {
        served: served.saturating_add(1),
    };
    if framing.keep_alive {
        let at = cx.now_ms.saturating_add(ms(cx.cfg().keepalive_timeout));
        cx.schedule(at);
    } else {
        conn.closing = Closing::AfterFlush;
    }
}

/// Answers an error and closes the connection after the answer is written; `head_only` for a HEAD request.
/// `extra` header lines follow the kind's own.
pub fn refuse(conn: &mut Conn, cx: &Cx<'_>, e: &HttpError, extra: &[&str], head_only: bool) {
    let framing = Framing {
        keep_alive: false,
        head_only,
    };
    let mut reply = Reply::error(e);
    reply.headers.extend(extra.iter().map(|l| l.to_string()));
    write(conn, cx, &reply, &[], framing);
    conn.closing = Closing::AfterFlush;
    conn.inbuf = Vec::new();
    conn.mode = Mode::HttpAwait {
        keep_alive: false,
        served: u32::MAX,
        user: None,
        cors: None,
        expires_s: 0,
    };
}

/// A configured duration in ms, saturating (a `Duration` holds more than a u64 of ms).
pub fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
