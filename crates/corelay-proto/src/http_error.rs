//! The one error type of the HTTP path: what was refused (`ErrorKind`) and why (`reason`, for the body and the
//! log). `ErrorKind::parts` is the one `match` that turns a kind into its status and the header that goes with
//! it; `HttpError::body` the one JSON shape, `{"error": reason, "status": code}`. Every refusal (request heads
//! the parser rejects, failed upgrades, auth, CORS, bad bodies and queries, timeouts) is one of these, written
//! by the gateway's `conn::http::respond::refuse` (or `respond::answer` where the connection stays open).

use std::borrow::Cow;
use std::fmt;

/// What kind of refusal: decides the status and any header the status needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: a malformed head, or a query or body the endpoint does not take.
    BadRequest,
    /// 401 with `WWW-Authenticate: Bearer` (RFC 9110 §15.5.2: a 401 names its scheme).
    Unauthorized,
    /// 403: a foreign `Origin`, or a token for another user.
    Forbidden,
    /// 404.
    NotFound,
    /// 405 with `Allow: {allow}`.
    MethodNotAllowed { allow: &'static str },
    /// 408: the request did not arrive in time.
    RequestTimeout,
    /// 411: a body without `Content-Length`.
    LengthRequired,
    /// 413: a body over `max_body_bytes`.
    BodyTooLarge,
    /// 426 with `Upgrade: websocket`: the endpoint only speaks WebSocket.
    UpgradeRequired,
    /// 426 with `Sec-WebSocket-Version: 13`: a WebSocket version we do not speak.
    WebSocketVersion,
    /// 431: the request head is over the limits.
    HeadTooLarge,
    /// 500: a status this type has no kind for (see `HttpError::new`).
    Internal,
    /// 501: chunked request bodies.
    NotImplemented,
    /// 503 with `Retry-After: 1`: the backplane queue is full.
    Overloaded,
    /// 503: a feature that is not configured.
    Unavailable,
    /// 504: the backplane did not answer in time. No `Retry-After` here: the worker's timer, which is the
    /// one to refuse this way, adds its own.
    GatewayTimeout,
    /// 505: not HTTP/1.0 or 1.1.
    VersionNotSupported,
}

impl ErrorKind {
    /// Every kind once (with a representative `allow`), for the status lookup of `HttpError::new`.
    const ALL: [ErrorKind; 17] = [
        ErrorKind::BadRequest,
        ErrorKind::Unauthorized,
        ErrorKind::Forbidden,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed { allow: "GET" },
        ErrorKind::RequestTimeout,
        ErrorKind::LengthRequired,
        ErrorKind::BodyTooLarge,
        ErrorKind::UpgradeRequired,
        ErrorKind::WebSocketVersion,
        ErrorKind::HeadTooLarge,
        ErrorKind::Internal,
        ErrorKind::NotImplemented,
        ErrorKind::Overloaded,
        ErrorKind::Unavailable,
        ErrorKind::GatewayTimeout,
        ErrorKind::VersionNotSupported,
    ];

    /// The status, and the header (name, value) the answer carries with it.
    pub fn parts(self) -> (u16, Option<(&'static str, &'static str)>) {
        match self {
            ErrorKind::BadRequest => (400, None),
            ErrorKind::Unauthorized => (401, Some(("WWW-Authenticate", "Bearer"))),
            ErrorKind::Forbidden => (403, None),
            ErrorKind::NotFound => (404, None),
            ErrorKind::MethodNotAllowed { allow } => (405, Some(("Allow", allow))),
            ErrorKind::RequestTimeout => (408, None),
            ErrorKind::LengthRequired => (411, None),
            ErrorKind::BodyTooLarge => (413, None),
            ErrorKind::UpgradeRequired => (426, Some(("Upgrade", "websocket"))),
            ErrorKind::WebSocketVersion => (426, Some(("Sec-WebSocket-Version", "13"))),
            ErrorKind::HeadTooLarge => (431, None),
            ErrorKind::Internal => (500, None),
            ErrorKind::NotImplemented => (501, None),
            ErrorKind::Overloaded => (503, Some(("Retry-After", "1"))),
            ErrorKind::Unavailable => (503, None),
            ErrorKind::GatewayTimeout => (504, None),
            ErrorKind::VersionNotSupported => (505, None),
        }
    }

    pub fn status(self) -> u16 {
        self.parts().0
    }
}

/// A request the server refuses: its kind, and a reason for the body and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    pub kind: ErrorKind,
    pub reason: Cow<'static, str>,
}

impl HttpError {
    pub fn of(kind: ErrorKind, reason: impl Into<Cow<'static, str>>) -> Self {
        HttpError {
            kind,
            reason: reason.into(),
        }
    }

    /// By status, for a caller that names one rather than a kind (the worker's timers: 408, 504). The first
    /// kind with that status; a status no kind has is a 500.
    pub fn new(status: u16, reason: &'static str) -> Self {
        let kind = ErrorKind::ALL
            .into_iter()
            .find(|k| k.status() == status)
            .unwrap_or(ErrorKind::Internal);
        HttpError::of(kind, reason)
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The header lines of the answer (`Name: value`, no CRLF): the kind's own, if any.
    pub fn header_lines(&self) -> Vec<String> {
        self.kind
            .parts()
            .1
            .map(|(name, value)| format!("{name}: {value}"))
            .into_iter()
            .collect()
    }

    /// The JSON body of the answer.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.reason, "status": self.status() }).to_string()
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status(), self.reason)
    }
}

impl std::error::Error for HttpError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_status_and_header() {
        let e = HttpError::of(
            ErrorKind::MethodNotAllowed { allow: "GET, HEAD" },
            "use GET",
        );
        assert_eq!(e.status(), 405);
        assert_eq!(e.header_lines(), ["Allow: GET, HEAD"]);
        assert_eq!(e.body(), r#"{"error":"use GET","status":405}"#);
        assert_eq!(e.to_string(), "405 use GET");
        let e = HttpError::of(ErrorKind::Unauthorized, "invalid token");
        assert_eq!(e.header_lines(), ["WWW-Authenticate: Bearer"]);
        assert_eq!(
            HttpError::of(ErrorKind::Overloaded, "x").header_lines(),
            ["Retry-After: 1"]
        );
        assert!(
            HttpError::of(ErrorKind::BadRequest, "x")
                .header_lines()
                .is_empty()
        );
        // Reasons made at run time (a cursor's error) are escaped like any other.
        let e = HttpError::of(ErrorKind::BadRequest, format!("bad cursor: {:?}", "a\"b"));
        assert_eq!(
            e.body(),
            r#"{"error":"bad cursor: \"a\\\"b\"","status":400}"#
        );
    }

    #[test]
    fn by_status_finds_the_kind() {
        assert_eq!(HttpError::new(408, "late").kind, ErrorKind::RequestTimeout);
        assert_eq!(HttpError::new(504, "late").kind, ErrorKind::GatewayTimeout);
        assert_eq!(HttpError::new(418, "teapot").status(), 500);
        for k in ErrorKind::ALL {
            assert_eq!(HttpError::new(k.status(), "x").status(), k.status());
        }
    }
}
