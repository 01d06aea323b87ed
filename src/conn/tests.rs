//! The connection driven without a socket: bytes and times in, bytes, effects and backplane events out.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::auth::Verifier;
use crate::backplane::Delivery;
use crate::cluster::ring::Ring;
use crate::config::Config;
use crate::metrics::LoopMetrics;

const SECRET: &str = "test-secret";

/// An environment of plain values: what the connection sends the backplane is kept in `sent`.
struct TestEnv {
    cfg: Config,
    verifier: Verifier,
    metrics: LoopMetrics,
    ring: Ring,
    sent: Vec<Event>,
    /// Refuse offers, as a full backplane queue does.
    full: bool,
}

impl TestEnv {
    fn new() -> Self {
        let cfg = Config {
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(10),
            ..Config::default()
        };
        TestEnv {
            cfg,
            verifier: Verifier::new(SECRET),
            metrics: LoopMetrics::default(),
            ring: Ring::new(Vec::<String>::new(), 1),
            sent: Vec::new(),
            full: false,
        }
    }
}

impl Env for TestEnv {
    fn loop_id(&self) -> LoopId {
        LoopId(3)
    }
    fn cfg(&self) -> &Config {
        &self.cfg
    }
    fn verifier(&self) -> &Verifier {
        &self.verifier
    }
    fn metrics(&self) -> &LoopMetrics {
        &self.metrics
    }
    fn offer(&mut self, ev: Event) -> Result<(), Event> {
        if self.full {
            return Err(ev);
        }
        self.sent.push(ev);
        Ok(())
    }
    fn send(&mut self, ev: Event) {
        self.sent.push(ev);
    }
    fn api_key(&self) -> &str {
        "key"
    }
    fn bus_up(&self) -> bool {
        true
    }
    fn draining(&self) -> bool {
        false
    }
    fn ring(&self) -> &Ring {
        &self.ring
    }
    fn render_metrics(&self) -> String {
        String::new()
    }
}

fn id() -> ConnId {
    ConnId {
        index: 7,
        generation: 2,
    }
}

/// Everything the connection has queued for the socket.
fn take_out(conn: &mut Conn) -> Vec<u8> {
    let mut v = Vec::new();
    conn.out.write_to(&mut v).unwrap();
    v
}

fn token(user: &str) -> String {
    crate::auth::mint(SECRET, user, Duration::from_secs(3600)).unwrap()
}

/// A connection upgraded to a WebSocket for `alice` at loop ms `at`; its output is taken.
fn websocket(env: &mut TestEnv, at: u64) -> (Conn, Effects) {
    let (mut conn, fx) = Conn::accept(id(), false, false, env, at);
    assert_eq!(fx.schedule, Some(at + 10_000), "the handshake deadline");
    let req = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: corelay.v1\r\n\r\n",
        token("alice")
    );
    let fx = conn.on_bytes(&mut req.into_bytes(), env, at);
    (conn, fx)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_websocket_upgrade_answers_101_and_welcome_and_opens() {
    let mut env = TestEnv::new();
    let (mut conn, fx) = websocket(&mut env, 1_000);
    let out = text(&take_out(&mut conn));
    assert!(out.starts_with("HTTP/1.1 101 "), "{out}");
    assert!(
        out.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{out}"
    );
    assert!(out.contains(r#""type":"welcome""#), "{out}");
    assert_eq!(
        fx,
        Effects {
            schedule: Some(31_000),
            ..Effects::default()
        },
        "heartbeats start at the upgrade"
    );
    assert!(conn.is_websocket());
    match env.sent.as_slice() {
        [Event::Opened { conn: me, user, .. }] => {
            assert_eq!(&**user, "alice");
            assert_eq!((me.worker, me.index, me.generation), (3, 7, 2));
        }
        other => panic!("expected one Opened, got {}", other.len()),
    }
}

#[test]
fn a_silent_websocket_is_pinged_then_closed_after_the_timeout() {
    let mut env = TestEnv::new();
    let (mut conn, _) = websocket(&mut env, 0);
    take_out(&mut conn);
    // The heartbeat interval passes without a byte: a ping, and the timeout is armed.
    let fx = conn.on_timer(&mut env, 30_000);
    assert_eq!(take_out(&mut conn), [0x89, 0x00], "an empty ping frame");
    assert_eq!(fx.schedule, Some(40_000));
    assert!(!fx.close);
    // Nothing answers within the timeout: closed, counted, and not as a 1006.
    let fx = conn.on_timer(&mut env, 40_000);
    assert!(fx.close);
    assert!(take_out(&mut conn).is_empty());
    assert_eq!(
        env.metrics
            .heartbeat_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    conn.on_closed(&mut env);
    assert!(matches!(env.sent.last(), Some(Event::Closed { .. })));
}

#[test]
fn a_pong_keeps_a_websocket_alive() {
    let mut env = TestEnv::new();
    let (mut conn, _) = websocket(&mut env, 0);
    let _ = conn.on_timer(&mut env, 30_000);
    take_out(&mut conn);
    // A masked, empty pong from the client.
    let fx = conn.on_bytes(&mut [0x8A, 0x80, 1, 2, 3, 4], &mut env, 35_000);
    assert!(!fx.close);
    let fx = conn.on_timer(&mut env, 40_000);
    assert!(!fx.close, "something arrived since the ping");
    assert_eq!(
        fx.schedule,
        Some(65_000),
        "the next ping is due 30 s after it"
    );
    assert!(take_out(&mut conn).is_empty());
}

#[test]
fn the_close_handshake_moves_through_the_close_states() {
    let mut env = TestEnv::new();
    let (mut conn, _) = websocket(&mut env, 0);
    take_out(&mut conn);
    // The backplane ends it: our close frame is queued, then the write side shuts and the linger starts.
    let _ = conn.close_by(1000, "bye", &mut env, 10);
    assert_eq!(conn.closing, Closing::CloseSent);
    assert_eq!(
        take_out(&mut conn),
        [0x88, 0x05, 0x03, 0xE8, b'b', b'y', b'e']
    );
    let fx = conn.on_flushed(20);
    assert!(fx.shutdown_write && !fx.close);
    assert_eq!(fx.schedule, Some(20 + CLOSE_LINGER.as_millis() as u64));
    assert_eq!(conn.closing, Closing::WriteShut);
    // Deliveries stop; a second close says nothing more.
    let d = Delivery::new(Arc::from("conversation:c"), 1, "{}".into());
    let _ = conn.deliver(&d, &mut env, 30);
    let _ = conn.close_by(1001, "again", &mut env, 30);
    assert!(take_out(&mut conn).is_empty());
    // The peer's close reply (masked, code 1000): close once the (empty) queue is flushed.
    let mut reply = vec![0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8];
    let fx = conn.on_bytes(&mut reply, &mut env, 40);
    assert!(!fx.close);
    assert_eq!(conn.closing, Closing::AfterFlush);
    assert!(conn.on_flushed(50).close);
}

#[test]
fn a_full_backplane_answers_overloaded_on_the_websocket() {
    let mut env = TestEnv::new();
    let (mut conn, _) = websocket(&mut env, 0);
    take_out(&mut conn);
    env.full = true;
    let json = br#"{"type":"ack","conversation":"c","offset":1}"#;
    let mut frame = vec![0x81, 0x80 | json.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(json);
    let _ = conn.on_bytes(&mut frame, &mut env, 10);
    let out = take_out(&mut conn);
    assert!(text(&out).contains("overloaded"), "{}", text(&out));
}

#[test]
fn an_sse_delivery_not_past_the_cursor_is_dropped() {
    let mut env = TestEnv::new();
    let (mut conn, _) = Conn::accept(id(), false, false, &mut env, 0);
    let mut cursor = CursorVec::new();
    advance(&mut cursor, &Arc::from("conversation:c"), 5);
    conn.mode = Mode::Sse(Box::new(StreamState {
        user: Arc::from("alice"),
        cursor,
        expires_ms: 0,
    }));
    let old = Delivery::new(Arc::from("conversation:c"), 5, r#"{"n":5}"#.into());
    let _ = conn.deliver(&old, &mut env, 10);
    assert!(take_out(&mut conn).is_empty(), "offset 5 was seen already");
    let new = Delivery::new(Arc::from("conversation:c"), 6, r#"{"n":6}"#.into());
    let _ = conn.deliver(&new, &mut env, 10);
    let out = text(&take_out(&mut conn));
    assert!(out.contains(r#"data: {"n":6}"#), "{out}");
    assert!(out.contains("id: conversation:c=6"), "{out}");
}

#[test]
fn an_sse_stream_ends_with_an_event_when_its_token_expires() {
    let mut env = TestEnv::new();
    let (mut conn, _) = Conn::accept(id(), false, false, &mut env, 0);
    conn.mode = Mode::Sse(Box::new(StreamState {
        user: Arc::from("alice"),
        cursor: CursorVec::new(),
        expires_ms: 50_000,
    }));
    let fx = conn.on_timer(&mut env, 30_000);
    assert_eq!(take_out(&mut conn), corelay_proto::sse::KEEPALIVE);
    assert_eq!(
        fx.schedule,
        Some(50_000),
        "the expiry comes before the next keep-alive"
    );
    let _ = conn.on_timer(&mut env, 50_000);
    assert!(text(&take_out(&mut conn)).contains("token_expired"));
    assert_eq!(conn.closing, Closing::AfterFlush);
}

#[test]
fn bucket_allows_burst_then_rate() {
    let mut b = Bucket::full(3, 0);
    assert!((0..3).all(|_| b.take(0, 10, 3)));
    assert!(!b.take(0, 10, 3), "burst spent");
    assert_eq!(b.wait_ms(10), 100, "the next token comes in 1/rate s");
    assert!(b.take(100, 10, 3), "one token per 100 ms at 10/s");
    assert!(!b.take(100, 10, 3));
    assert!(
        (0..3).all(|_| b.take(10_000, 10, 3)),
        "refills up to the burst, not beyond"
    );
    assert!(!b.take(10_000, 10, 3));
}

/// Idle memory per WebSocket is a headline figure (docs/ARCHITECTURE.md: the boxed `WsState` is 200 B):
/// permessage-deflate added one byte to `WsState` and two flags to its decoder, all inside existing padding.
#[test]
fn websocket_state_stays_small() {
    let (ws, dec) = (
        std::mem::size_of::<WsState>(),
        std::mem::size_of::<Decoder>(),
    );
    assert!(ws <= 200 && dec <= 144, "WsState {ws} B, Decoder {dec} B");
}
