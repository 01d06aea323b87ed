//! HTTP/1.1 request heads (httparse), the WebSocket upgrade (RFC 6455 §4.2), and response encoding.
//!
//! Sans-IO: `parse_request` looks at bytes and says how many it consumed. Bytes after the head belong to
//! whoever comes next (a request body, or the WebSocket decoder when a client pipelines frames after the
//! upgrade request).
//!
//! Over 600 lines on purpose: the code is ~460 (one parser, one upgrade check, one response encoder, which
//! share `RequestHead`); the rest is their tests, kept beside them.

use super::ws::accept_key;

/// Limits for a request head.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

/// A request the server refuses: the HTTP path's one error type (`conn::http::error`), which the parser and the
/// upgrade check return too.
pub use crate::http_error::{ErrorKind, HttpError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Options,
    Delete,
    Other,
}

/// The parts of a request head the gateway uses. Header values are kept only for the headers it reads.
#[derive(Debug, Default)]
pub struct RequestHead {
    pub method: Option<Method>,
    pub path: String,
    pub query: String,
    /// HTTP/1.x minor version.
    pub minor_version: u8,
    pub host: Option<String>,
    pub upgrade_websocket: bool,
    pub connection_upgrade: bool,
    pub connection_close: bool,
    pub connection_keep_alive: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    pub ws_protocols: Vec<String>,
    /// Every `Sec-WebSocket-Extensions` value, joined with `, ` (offers in the client's order).
    pub ws_extensions: String,
    pub origin: Option<String>,
    pub authorization: Option<String>,
    pub content_length: Option<usize>,
    pub chunked: bool,
    pub last_event_id: Option<String>,
}

impl RequestHead {
    pub fn method(&self) -> Method {
        self.method.unwrap_or(Method::Other)
    }

    /// Keep-alive per RFC 9112 §9.3: default on for 1.1, off for 1.0 unless asked.
    pub fn keep_alive(&self) -> bool {
        if self.minor_version >= 1 {
            !self.connection_close
        } else {
            self.connection_keep_alive
        }
    }

    /// Whether the request announces a body: a `Content-Length` above zero, or any `Transfer-Encoding`.
    pub fn announces_body(&self) -> bool {
        self.chunked || self.content_length.is_some_and(|n| n > 0)
    }

    /// The value of a query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| percent_decode(v))
        })
    }

    /// A bearer token from `Authorization: Bearer …`, else the `token` query parameter.
    pub fn bearer_token(&self) -> Option<String> {
        if let Some(auth) = &self.authorization {
            let mut parts = auth.splitn(2, ' ');
            if parts
                .next()
                .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
            {
                return parts.next().map(|t| t.trim().to_string());
            }
        }
        self.query_param("token")
    }
}

/// Decodes `%XX` and `+` (as space, form style). Invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// httparse needs the header array up front; the parser keeps one of this size on the stack, so
/// `HeadLimits::max_headers` is capped by it.
pub const MAX_HEADERS_CEILING: usize = 256;

/// Parses one request head. `Ok(None)` while the head is incomplete and still within limits.
pub fn parse_request(
    buf: &[u8],
    limits: &HeadLimits,
) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CEILING];
    let max = limits.max_headers.min(storage.len());
    let mut req = httparse::Request::new(&mut storage[..max]);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_header_bytes {
                return Err(HttpError::of(
                    ErrorKind::HeadTooLarge,
                    "request header too large",
                ));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::of(
                ErrorKind::HeadTooLarge,
                "too many request headers",
            ));
        }
        Err(httparse::Error::Version) => {
            return Err(HttpError::of(
                ErrorKind::VersionNotSupported,
                "only HTTP/1.0 and HTTP/1.1 are served",
            ));
        }
        Err(_) => return Err(HttpError::of(ErrorKind::BadRequest, "malformed request")),
    };
    if consumed > limits.max_header_bytes {
        return Err(HttpError::of(
            ErrorKind::HeadTooLarge,
            "request header too large",
        ));
    }
    let mut head = RequestHead {
        method: Some(match req.method.unwrap_or("") {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "OPTIONS" => Method::Options,
            "DELETE" => Method::Delete,
            _ => Method::Other,
        }),
        minor_version: req.version.unwrap_or(1),
        ..RequestHead::default()
    };
    let target = req.path.unwrap_or("/");
    if !target.starts_with('/') {
        return Err(HttpError::of(
            ErrorKind::BadRequest,
            "request target must be an absolute path",
        ));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    head.path = path.to_string();
    head.query = query.to_string();
    let text = |v: &[u8]| -> Result<String, HttpError> {
        std::str::from_utf8(v)
            .map(|s| s.trim().to_string())
            .map_err(|_| HttpError::of(ErrorKind::BadRequest, "header value is not valid text"))
    };
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            head.host = Some(text(h.value)?);
        } else if name.eq_ignore_ascii_case("upgrade") {
            head.upgrade_websocket |= tokens(h.value).any(|t| t.eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case("upgrade") {
                    head.connection_upgrade = true;
                } else if t.eq_ignore_ascii_case("close") {
                    head.connection_close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    head.connection_keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if head.ws_key.is_some() {
                return Err(HttpError::of(
                    ErrorKind::BadRequest,
                    "duplicate Sec-WebSocket-Key",
                ));
            }
            head.ws_key = Some(text(h.value)?);
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version = Some(text(h.value)?);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            head.ws_protocols
                .extend(tokens(h.value).map(str::to_string));
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            if !head.ws_extensions.is_empty() {
                head.ws_extensions.push_str(", ");
            }
            head.ws_extensions.push_str(&text(h.value)?);
        } else if name.eq_ignore_ascii_case("origin") {
            head.origin = Some(text(h.value)?);
        } else if name.eq_ignore_ascii_case("authorization") {
            head.authorization = Some(text(h.value)?);
        } else if name.eq_ignore_ascii_case("last-event-id") {
            head.last_event_id = Some(text(h.value)?);
        } else if name.eq_ignore_ascii_case("content-length") {
            // RFC 9110 §8.6: `1*DIGIT`. `parse` alone would also take a sign (`+5`), which a proxy in front
            // may frame differently; a number past usize is an error from `parse`, never a wrap.
            let n = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or_else(|| HttpError::of(ErrorKind::BadRequest, "invalid Content-Length"))?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err(HttpError::of(
                    ErrorKind::BadRequest,
                    "conflicting Content-Length headers",
                ));
            }
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = true;
        }
    }
    if head.chunked && head.content_length.is_some() {
        // RFC 9112 §6.1: a request smuggling vector; refuse rather than guess.
        return Err(HttpError::of(
            ErrorKind::BadRequest,
            "both Transfer-Encoding and Content-Length",
        ));
    }
    Ok(Some((head, consumed)))
}

/// Refuses a GET or HEAD that announces a body. Such a body means nothing here (RFC 9110 §9.3.1), and a proxy in
/// front that frames it differently (ignores it, or reads it as the next request) is the classic request
/// smuggling setup: the caller answers 400 and closes, so those bytes are never read as a request.
pub fn check_no_body(head: &RequestHead) -> Result<(), HttpError> {
    let bodyless = matches!(head.method(), Method::Get | Method::Head);
    if bodyless && head.announces_body() {
        return Err(HttpError::of(
            ErrorKind::BadRequest,
            "GET and HEAD requests must not carry a body",
        ));
    }
    Ok(())
}

/// How a request's `Origin` stands against the allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginMatch {
    /// No `Origin` header: not a browser cross-origin request, nothing to check.
    Absent,
    /// No allow-list is configured: any origin is accepted.
    AnyAllowed,
    /// The origin is `allowed_origins[i]` (compared case-insensitively).
    Listed(usize),
}

/// The one Origin check for every browser-facing endpoint (`/ws`, `/sse`, `/poll`, `POST /send` and their
/// preflights), so none of them can drift from the others. `allowed_origins` empty = any origin.
pub fn check_origin(
    origin: Option<&str>,
    allowed_origins: &[String],
) -> Result<OriginMatch, HttpError> {
    let Some(origin) = origin else {
        return Ok(OriginMatch::Absent);
    };
    if allowed_origins.is_empty() {
        return Ok(OriginMatch::AnyAllowed);
    }
    allowed_origins
        .iter()
        .position(|o| o.eq_ignore_ascii_case(origin))
        .map(OriginMatch::Listed)
        .ok_or_else(|| HttpError::of(ErrorKind::Forbidden, "origin not allowed"))
}

/// Comma-separated header tokens, trimmed, non-empty.
fn tokens(v: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(v)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// What a valid upgrade request yields.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub accept: String,
    pub protocol: Option<&'static str>,
    /// The `Sec-WebSocket-Extensions` answer (the caller negotiates it; none from `validate_upgrade`).
    pub extensions: Option<String>,
}

/// Validates a WebSocket opening handshake (RFC 6455 §4.2.1) and picks the subprotocol among `supported`.
/// `allowed_origins` empty = any origin.
pub fn validate_upgrade(
    head: &RequestHead,
    supported: &[&'static str],
    allowed_origins: &[String],
) -> Result<Upgrade, HttpError> {
    if head.method() != Method::Get {
        return Err(HttpError::of(
            ErrorKind::MethodNotAllowed { allow: "GET" },
            "WebSocket upgrade needs GET",
        ));
    }
    if head.minor_version < 1 {
        return Err(HttpError::of(
            ErrorKind::BadRequest,
            "WebSocket upgrade needs HTTP/1.1",
        ));
    }
    if !head.upgrade_websocket {
        return Err(HttpError::of(
            ErrorKind::UpgradeRequired,
            "this endpoint needs a WebSocket upgrade",
        ));
    }
    if !head.connection_upgrade {
        return Err(HttpError::of(
            ErrorKind::BadRequest,
            "Connection header must include Upgrade",
        ));
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(HttpError::of(
            ErrorKind::WebSocketVersion,
            "Sec-WebSocket-Version must be 13",
        ));
    }
    let key = head
        .ws_key
        .as_deref()
        .ok_or_else(|| HttpError::of(ErrorKind::BadRequest, "missing Sec-WebSocket-Key"))?;
    if !valid_ws_key(key) {
        return Err(HttpError::of(
            ErrorKind::BadRequest,
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    check_origin(head.origin.as_deref(), allowed_origins)?;
    let protocol = head
        .ws_protocols
        .iter()
        .find_map(|p| supported.iter().copied().find(|s| s == p));
    Ok(Upgrade {
        accept: accept_key(key),
        protocol,
        extensions: None,
    })
}

fn valid_ws_key(key: &str) -> bool {
    use base64::Engine;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|raw| raw.len() == 16)
}

pub fn status_text(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Appends a complete response. `extra` lines must be `Name: value` without CRLF.
pub fn encode_response(
    status: u16,
    content_type: &str,
    extra: &[&str],
    body: &[u8],
    keep_alive: bool,
    out: &mut Vec<u8>,
) {
    encode_response_head(status, content_type, extra, body.len(), keep_alive, out);
    out.extend_from_slice(body);
}

/// Appends the head of a response whose body is `content_length` bytes, without the body: on its own, the
/// answer to a HEAD request (RFC 9110 §9.3.2: the head a GET would get, `Content-Length` included).
pub fn encode_response_head(
    status: u16,
    content_type: &str,
    extra: &[&str],
    content_length: usize,
    keep_alive: bool,
    out: &mut Vec<u8>,
) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Length: {content_length}\r\n",
        status_text(status),
    );
    if content_length != 0 || status == 200 {
        let _ = write!(out, "Content-Type: {content_type}\r\n");
    }
    for line in extra {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if keep_alive {
        b"\r\n".as_slice()
    } else {
        b"Connection: close\r\n\r\n".as_slice()
    });
}

/// The `101 Switching Protocols` answer.
pub fn encode_upgrade(upgrade: &Upgrade, out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(upgrade.accept.as_bytes());
    if let Some(p) = upgrade.protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    if let Some(e) = &upgrade.extensions {
        out.extend_from_slice(b"\r\nSec-WebSocket-Extensions: ");
        out.extend_from_slice(e.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_header_bytes: 1024,
        max_headers: 8,
    };

    const UPGRADE: &[u8] = b"GET /ws?token=abc%20d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, corelay.v1\r\n\r\n";

    #[test]
    fn rfc6455_upgrade() {
        let (head, n) = parse_request(UPGRADE, &LIMITS).unwrap().unwrap();
        assert_eq!(n, UPGRADE.len());
        assert_eq!(head.path, "/ws");
        assert_eq!(head.query_param("token").as_deref(), Some("abc d"));
        let up = validate_upgrade(&head, &["corelay.v1"], &[]).unwrap();
        // RFC 6455 §1.3 example.
        assert_eq!(up.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(up.protocol, Some("corelay.v1"));
        let mut out = Vec::new();
        encode_upgrade(&up, &mut out);
        assert!(out.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
    }

    #[test]
    fn extension_offers_are_joined_and_answered() {
        let req = b"GET /echo HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\nsec-websocket-extensions: permessage-deflate\r\n\r\n";
        let (head, _) = parse_request(req, &LIMITS).unwrap().unwrap();
        assert_eq!(
            head.ws_extensions,
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        );
        let (up_head, _) = parse_request(UPGRADE, &LIMITS).unwrap().unwrap();
        assert_eq!(up_head.ws_extensions, "");
        let mut up = validate_upgrade(&up_head, &[], &[]).unwrap();
        assert_eq!(up.extensions, None);
        up.extensions = Some("permessage-deflate; server_no_context_takeover".into());
        let mut out = Vec::new();
        encode_upgrade(&up, &mut out);
        assert!(out.ends_with(
            b"\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n"
        ));
    }

    #[test]
    fn pipelined_bytes_are_not_consumed() {
        let mut buf = UPGRADE.to_vec();
        buf.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4]);
        let (_, n) = parse_request(&buf, &LIMITS).unwrap().unwrap();
        assert_eq!(n, UPGRADE.len());
    }

    #[test]
    fn partial_and_limits() {
        assert!(parse_request(&UPGRADE[..30], &LIMITS).unwrap().is_none());
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert_eq!(
            parse_request(big.as_bytes(), &LIMITS).unwrap_err().status(),
            431
        );
        let many: String = (0..20).map(|i| format!("H{i}: v\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse_request(req.as_bytes(), &LIMITS).unwrap_err().status(),
            431
        );
        assert_eq!(
            parse_request(b"GARBAGE\x01\r\n\r\n", &LIMITS)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", &LIMITS)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            parse_request(
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                &LIMITS
            )
            .unwrap_err()
            .status(),
            400
        );
    }

    #[test]
    fn a_content_length_is_digits_and_fits_a_usize() {
        let req = |n: &str| format!("POST /send HTTP/1.1\r\nContent-Length: {n}\r\n\r\n");
        let max = usize::MAX.to_string();
        let (head, _) = parse_request(req(&max).as_bytes(), &LIMITS)
            .unwrap()
            .unwrap();
        assert_eq!(head.content_length, Some(usize::MAX));
        // Past usize::MAX (on 64-bit): refused, never wrapped or truncated to a small length. A sign is no digit.
        for n in [
            "18446744073709551616",
            "99999999999999999999999999",
            "-1",
            "+5",
            "",
        ] {
            let e = parse_request(req(n).as_bytes(), &LIMITS).unwrap_err();
            assert_eq!(
                (e.status(), &*e.reason),
                (400, "invalid Content-Length"),
                "{n:?}"
            );
        }
    }

    #[test]
    fn bad_upgrades() {
        let check = |req: &str| {
            let (head, _) = parse_request(req.as_bytes(), &LIMITS).unwrap().unwrap();
            validate_upgrade(&head, &["corelay.v1"], &["https://ok.example".into()])
                .unwrap_err()
                .status()
        };
        let base = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
        let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        assert_eq!(check("GET /ws HTTP/1.1\r\n\r\n"), 426);
        assert_eq!(check(&format!("POST /ws HTTP/1.1\r\n{base}{key}\r\n")), 405);
        assert_eq!(check(&format!("GET /ws HTTP/1.1\r\n{base}\r\n")), 400);
        assert_eq!(
            check(&format!(
                "GET /ws HTTP/1.1\r\n{base}Sec-WebSocket-Key: short\r\n\r\n"
            )),
            400
        );
        assert_eq!(
            check(&format!(
                "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n{key}\r\n"
            )),
            426
        );
        assert_eq!(
            check(&format!(
                "GET /ws HTTP/1.1\r\n{base}{key}Origin: https://evil.example\r\n\r\n"
            )),
            403
        );
    }

    #[test]
    fn get_and_head_with_a_body_are_refused() {
        let check = |r: &[u8]| {
            let (head, _) = parse_request(r, &LIMITS).unwrap().unwrap();
            check_no_body(&head).map_err(|e| e.status())
        };
        assert_eq!(
            check(b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            check(b"HEAD /metrics HTTP/1.1\r\nContent-Length: 1\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            check(b"GET /sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(400)
        );
        // Any Transfer-Encoding, not only chunked: we do not decode any of them.
        assert_eq!(
            check(b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            check(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Ok(())
        );
        assert_eq!(check(b"HEAD / HTTP/1.1\r\n\r\n"), Ok(()));
        assert_eq!(
            check(b"POST /send HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Ok(())
        );
    }

    #[test]
    fn one_origin_check() {
        let list = ["https://app.example".to_string()];
        assert_eq!(check_origin(None, &list), Ok(OriginMatch::Absent));
        assert_eq!(
            check_origin(Some("https://evil.example"), &[]),
            Ok(OriginMatch::AnyAllowed)
        );
        assert_eq!(
            check_origin(Some("HTTPS://App.Example"), &list),
            Ok(OriginMatch::Listed(0))
        );
        assert_eq!(
            check_origin(Some("https://evil.example"), &list).map_err(|e| e.status()),
            Err(403)
        );
    }

    #[test]
    fn a_head_answer_is_the_get_head_without_the_body() {
        let mut get = Vec::new();
        encode_response(200, "text/plain", &["X: y"], b"ok\n", true, &mut get);
        let mut head = Vec::new();
        encode_response_head(200, "text/plain", &["X: y"], 3, true, &mut head);
        assert_eq!(&get[..get.len() - 3], &head[..]);
        assert!(head.ends_with(b"\r\n\r\n"));
        assert!(
            String::from_utf8(head)
                .unwrap()
                .contains("Content-Length: 3\r\n")
        );
    }

    #[test]
    fn keep_alive_rules() {
        let p = |r: &[u8]| parse_request(r, &LIMITS).unwrap().unwrap().0;
        assert!(p(b"GET / HTTP/1.1\r\n\r\n").keep_alive());
        assert!(!p(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive());
        assert!(!p(b"GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(p(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Db%2"), "a=b%2");
        assert_eq!(percent_decode("%zz+x"), "%zz x");
        assert_eq!(percent_decode("%"), "%");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = parse_request(&data, &LIMITS);
        }

        #[test]
        fn any_prefix_is_partial_or_the_same(split in 0usize..UPGRADE.len()) {
            match parse_request(&UPGRADE[..split], &LIMITS) {
                Ok(None) => {}
                other => proptest::prop_assert!(false, "prefix {} gave {:?}", split, other.map(|o| o.map(|(_, n)| n))),
            }
        }
    }
}
