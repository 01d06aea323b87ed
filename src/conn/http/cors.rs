//! Origin and CORS for the browser-facing endpoints. The allow-list comparison itself is
//! `http1::check_origin`, the one every endpoint uses (`validate_upgrade` calls it for `/ws`); here is what a
//! match means for the answer: which `Access-Control-*` lines it carries, and the preflight.

use super::super::Cx;
use super::super::{ANY_ORIGIN, Conn};
use super::respond::{self, Framing, Reply};
use super::{ErrorKind, HttpError};
use corelay_proto::http1::{self, OriginMatch, RequestHead};

/// CORS for a browser request to a one-way client endpoint: which allowed origin to answer with (the index in
/// `allowed_origins`, or `ANY_ORIGIN` when none are configured); None without an `Origin`. A foreign origin is
/// the 403 of `http1::check_origin`, the check `/ws` makes too. Tokens travel in the query string, so no
/// credentials mode is needed and `*` is safe.
pub fn of(head: &RequestHead, cx: &Cx<'_>) -> Result<Option<u16>, HttpError> {
    Ok(
        match http1::check_origin(head.origin.as_deref(), &cx.cfg().allowed_origins)? {
            OriginMatch::Absent => None,
            OriginMatch::AnyAllowed => Some(ANY_ORIGIN),
            // An index past what `cors` can name (65,535 origins) answers without CORS headers.
            OriginMatch::Listed(i) => u16::try_from(i).ok().filter(|&i| i != ANY_ORIGIN),
        },
    )
}

/// The `Access-Control-Allow-Origin` (and `Vary`) lines of an answer to a request accepted with `cors`.
pub fn lines(cors: Option<u16>, cx: &Cx<'_>) -> Vec<String> {
    match cors {
        None => Vec::new(),
        Some(ANY_ORIGIN) => vec!["Access-Control-Allow-Origin: *".into()],
        Some(i) => match cx.cfg().allowed_origins.get(usize::from(i)) {
            Some(o) => vec![
                format!("Access-Control-Allow-Origin: {o}"),
                "Vary: Origin".into(),
            ],
            None => Vec::new(),
        },
    }
}

/// The CORS preflight of a browser `POST /send` (JSON body, `Authorization` header) and friends.
pub fn preflight(conn: &mut Conn, head: &RequestHead, cx: &mut Cx<'_>) {
    // A preflight without an `Origin` is no preflight: refused like a foreign origin.
    let Ok(Some(cors)) = of(head, cx) else {
        let e = HttpError::of(ErrorKind::Forbidden, "origin not allowed");
        return respond::refuse(conn, cx, &e, &[], false);
    };
    let mut reply = Reply::new(204, "text/plain", b"");
    reply.headers = lines(Some(cors), cx);
    reply.headers.extend([
        "Access-Control-Allow-Methods: GET, POST, OPTIONS".to_string(),
        "Access-Control-Allow-Headers: Authorization, Content-Type, Last-Event-ID".to_string(),
        "Access-Control-Max-Age: 600".to_string(),
    ]);
    respond::answer(conn, cx, reply, Framing::of(head));
}
