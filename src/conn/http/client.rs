//! The client endpoints: the WebSocket upgrade (`/ws`, the echo path), an SSE stream (`/sse`), a long poll
//! (`/poll`) and `POST /send`'s body. Each checks origin and token, reads its query, and hands the request to
//! the backplane (or, for the upgrade, switches the connection to WebSocket at once).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use super::super::Cx;
use super::super::{Bucket, Conn, Mode, WsState, until_expiry};
use super::respond::{self, ms};
use super::{ErrorKind, HttpError, auth, cors, fail, hand_over};
use crate::backplane::{ConnRef, Event};
use crate::metrics::Transport;
use corelay_proto::http1::{self, RequestHead};
use corelay_proto::ws::{Decoder, Limits as WsLimits, Opcode, deflate, encode_frame};
use corelay_proto::{cursor, msg};

fn bad(reason: impl Into<std::borrow::Cow<'static, str>>) -> HttpError {
    HttpError::of(ErrorKind::BadRequest, reason)
}

/// `/ws` (`echo`: the echo path, no token, no subprotocol).
pub fn upgrade(conn: &mut Conn, head: &RequestHead, echo: bool, cx: &mut Cx<'_>) {
    let supported: &[&'static str] = if echo { &[] } else { &[msg::SUBPROTOCOL] };
    let mut up = match http1::validate_upgrade(head, supported, &cx.cfg().allowed_origins) {
        Ok(up) => up,
        Err(e) => {
            tracing::debug!(
                worker = cx.id(),
                conn = cx.me.index,
                status = e.status(),
                reason = %e.reason,
                "upgrade refused"
            );
            return fail(conn, cx, e, &[]);
        }
    };
    let (user, expires_ms) = if echo {
        (None, 0)
    } else {
        match auth::user(head, cx) {
            Ok((u, exp)) => (Some(u), exp),
            Err(e) => return fail(conn, cx, e, &[]),
        }
    };
    // `?cursor=` resumes at connect (the text form, as SSE takes it): replayed before anything else arrives.
    let resume = match head.query_param("cursor").filter(|_| !echo) {
        Some(t) => match cursor::parse(&t) {
            Ok(c) => c,
            Err(e) => return fail(conn, cx, bad(format!("bad cursor: {}", e.0)), &[]),
        },
        None => BTreeMap::new(),
    };
    // permessage-deflate: the first acceptable offer, or none (a bad offer is declined, never refused).
    let deflate = if cx.cfg().ws_deflate && !head.ws_extensions.is_empty() {
        deflate::negotiate_with(&head.ws_extensions, cx.cfg().ws_deflate_takeover)
    } else {
        None
    };
    up.extensions = deflate.map(|d| d.response());
    let mut out = Vec::with_capacity(256);
    http1::encode_upgrade(&up, &mut out);
    if let Some(u) = &user {
        let hb = cx.cfg().heartbeat_interval.as_secs().max(1);
        let timeout = cx.cfg().heartbeat_timeout.as_secs().max(1);
        encode_frame(
            Opcode::Text,
            true,
            msg::welcome(u, &cx.cfg().node_id, hb, timeout).as_bytes(),
            &mut out,
        );
        cx.metrics().frames_out.fetch_add(1, Relaxed);
    }
    respond::queue(conn, cx, 101, out);
    let limits = WsLimits {
        max_frame_len: cx.cfg().limits.max_frame_bytes,
        max_message_len: cx.cfg().limits.max_message_bytes,
    };
    cx.metrics().conn_closed(Transport::Http);
    cx.metrics().conn_opened(if echo {
        Transport::Echo
    } else {
        Transport::WebSocket
    });
    if let Some(u) = &user {
        cx.send(Event::Opened {
            conn: cx.me,
            user: u.clone(),
            cursor: resume,
        });
    }
    let mut decoder = Decoder::new(limits);
    if deflate.is_some() {
        decoder.enable_deflate();
    }
    conn.mode = Mode::WebSocket(Box::new(WsState {
        decoder,
        user,
        ping_sent_ms: 0,
        bucket: Bucket::full(cx.cfg().limits.client_burst, cx.now_ms),
        paused: false,
        deflate: deflate.map_or(0, |d| {
            d.server_window_bits
                | if d.server_takeover {
                    super::super::deflate::TAKEOVER
                } else {
                    0
                }
        }),
        expires_ms,
    }));
    // Heartbeats start now; the handshake deadline is replaced.
    let at = cx.now_ms.saturating_add(ms(cx.cfg().heartbeat_interval));
    cx.schedule(until_expiry(at, expires_ms));
}

/// Channels and cursor of an SSE or poll request; a refusal is a 400 with the reason.
fn channels_and_cursor(
    head: &RequestHead,
    cursor_text: Option<String>,
) -> Result<(Vec<String>, Option<BTreeMap<String, u64>>), HttpError> {
    let channels = cursor::parse_channels(&head.query_param("channels").unwrap_or_default())
        .map_err(|e| bad(e.0))?;
    let cur = match cursor_text {
        Some(t) => Some(cursor::parse(&t).map_err(|e| bad(format!("bad cursor: {}", e.0)))?),
        None => None,
    };
    Ok((channels, cur))
}

/// `GET /sse`: resumes from `Last-Event-ID` (or `?last_event_id=`).
pub fn stream(conn: &mut Conn, head: &RequestHead, cx: &mut Cx<'_>) {
    let cors = match cors::of(head, cx) {
        Ok(c) => c,
        Err(e) => return fail(conn, cx, e, &[]),
    };
    let (user, expires_ms) = match auth::user(head, cx) {
        Ok(u) => u,
        Err(e) => return fail(conn, cx, e, &[]),
    };
    let resume = head
        .last_event_id
        .clone()
        .or_else(|| head.query_param("last_event_id"));
    let (channels, cur) = match channels_and_cursor(head, resume) {
        Ok(v) => v,
        Err(e) => return fail(conn, cx, e, &[]),
    };
    let ev = Event::Stream {
        conn: cx.me,
        user: user.clone(),
        channels,
        cursor: cur.unwrap_or_default(),
    };
    hand_over(conn, ev, (false, 0, cors), Some(user), cx);
    if let Mode::HttpAwait { expires_s, .. } = &mut conn.mode {
        *expires_s = u32::try_from(expires_ms.div_ceil(1000)).unwrap_or(u32::MAX);
    }
}

/// `GET /poll`: held up to `timeout=` seconds for a delivery.
pub fn poll(conn: &mut Conn, head: &RequestHead, served: u32, cx: &mut Cx<'_>) {
    let cors = match cors::of(head, cx) {
        Ok(c) => c,
        Err(e) => return fail(conn, cx, e, &[]),
    };
    let user = match auth::user(head, cx) {
        Ok((u, _)) => u,
        Err(e) => return fail(conn, cx, e, &[]),
    };
    let (channels, cur) = match channels_and_cursor(head, head.query_param("cursor")) {
        Ok(v) => v,
        Err(e) => return fail(conn, cx, e, &[]),
    };
    let max = cx.cfg().max_poll_timeout;
    let Some(hold_ms) = poll_hold_ms(head.query_param("timeout").as_deref(), max) else {
        return fail(conn, cx, bad("timeout= is whole seconds"), &[]);
    };
    let ev = Event::Poll {
        conn: cx.me,
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
    let asked = match timeout {
        None => ms(crate::config::DEFAULT_POLL_TIMEOUT),
        Some(t) => t.parse::<u64>().ok()?.saturating_mul(1000),
    };
    Some(asked.min(ms(max)))
}

/// The body of `POST /send`: a client request (ack, read, history, subscribe, refresh, …) on behalf of the
/// token's user; `"stream"` names the SSE stream it is for. The event for the backplane, or the refusal.
pub fn send(head: &RequestHead, body: &[u8], cx: &Cx<'_>) -> Result<Event, HttpError> {
    let (user, _) = auth::user(head, cx)?;
    let stream = msg::stream_of(body).map(|s| ConnRef::parse_stream_id(&s));
    if let Some(None) = stream {
        return Err(bad("\"stream\" is not a stream id"));
    }
    match msg::parse_client(body) {
        Ok(msg::ClientMsg::Refresh { token }) => {
            // Verified here (the loop holds the verifier); the stream's loop gets the new expiry.
            let Some(Some(stream)) = stream else {
                return Err(bad("refresh needs the \"stream\" it is for"));
            };
            match cx.env.verifier().verify_until(&token) {
                Ok((sub, exp)) if *sub == *user => Ok(Event::Send {
                    conn: cx.me,
                    user,
                    msg: msg::ClientMsg::Refresh {
                        token: String::new(),
                    },
                    stream: Some(stream),
                    expires: Some(exp),
                }),
                Ok(_) => Err(HttpError::of(
                    ErrorKind::Forbidden,
                    "the token is for another user",
                )),
                Err(_) => Err(HttpError::of(ErrorKind::Unauthorized, "invalid token")),
            }
        }
        Ok(m) => Ok(Event::Send {
            conn: cx.me,
            user,
            msg: m,
            stream: stream.flatten(),
            expires: None,
        }),
        Err(_) => Err(bad(
            "body must be {\"type\":\"send\",\"conversation\":…,\"client_id\":…,\"body\":…}",
        )),
    }
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
