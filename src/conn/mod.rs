//! Per-connection state: the socket, its mode (HTTP or WebSocket), its write queue and its timer.
//!
//! An idle connection holds no read buffer: reads go into the loop's scratch buffer, and only bytes that
//! belong to an incomplete HTTP head or body are copied into `inbuf`. The WebSocket decoder keeps partial frame
//! headers and partial messages itself, allocating only while a message is in flight.

pub mod http;
pub mod queue;
pub mod ws;

use std::sync::Arc;

use mio::net::TcpStream;

use crate::backplane::CursorVec;
use crate::timer::TimerKey;
use corelay_proto::http1::RequestHead;
use corelay_proto::ws::Decoder;

pub use queue::WriteQueue;

/// What a connection is doing.
pub enum Mode {
    /// Waiting for the PROXY protocol header (`--proxy-protocol`), before the first request.
    Proxy,
    /// Reading a request head (first request or keep-alive).
    Http {
        served: u32,
    },
    /// Reading the body announced by `head`.
    HttpBody {
        head: Box<RequestHead>,
        served: u32,
    },
    /// A request was handed to the backplane; input is not read until it answers. `user` is set when the
    /// answer may register this connection (stream, poll), so a close meanwhile can undo it.
    HttpAwait {
        keep_alive: bool,
        served: u32,
        user: Option<Arc<str>>,
        /// CORS for the answer: which allowed origin to name (`ANY_ORIGIN` = `*`), if the request had one.
        cors: Option<u16>,
        /// A stream's token expiry in loop seconds (0 = none), until the stream starts.
        expires_s: u32,
    },
    WebSocket(Box<WsState>),
    /// An SSE stream: the cursor is written as each event's `id:`.
    Sse(Box<StreamState>),
    /// A long poll held until a delivery or its timer.
    PollHeld(Box<PollState>),
}

pub struct StreamState {
    pub user: Arc<str>,
    pub cursor: CursorVec,
    /// Loop ms at which the stream's token expires: the stream ends then (the client reconnects with a
    /// fresh token and its cursor).
    pub expires_ms: u64,
}

pub struct PollState {
    pub cursor: CursorVec,
    pub keep_alive: bool,
    pub served: u32,
    pub cors: Option<u16>,
}

/// `cors` value meaning "any origin" (no `--allowed-origin` configured).
pub const ANY_ORIGIN: u16 = u16::MAX;

pub use corelay_proto::cursor::{advance, cursor_text};

pub struct WsState {
    pub decoder: Decoder,
    /// The authenticated user; `None` on the echo endpoint.
    pub user: Option<Arc<str>>,
    /// A ping is out and unanswered since this time (loop ms); 0 when none.
    pub ping_sent_ms: u64,
    /// We sent a close frame: input is drained until the peer closes or the linger timer fires.
    pub close_sent: bool,
    /// Client requests allowed on this connection (chat endpoint only).
    pub bucket: Bucket,
    /// Input is paused by the rate limit: the socket is not read (TCP pushes back on the client) and the
    /// bytes already read but not yet decoded wait in `Conn::inbuf`, until the bucket has a token again.
    pub paused: bool,
    /// Loop ms at which the token expires (0: never, the echo endpoint). The connection is closed with 4001
    /// then, unless a `refresh` with a fresh token of the same user came first.
    pub expires_ms: u64,
}

/// The earlier of a timer deadline and a token expiry (0 = none).
pub fn until_expiry(at_ms: u64, expires_ms: u64) -> u64 {
    if expires_ms == 0 {
        at_ms
    } else {
        at_ms.min(expires_ms)
    }
}

pub use crate::bucket::Bucket;

pub struct Conn {
    pub socket: TcpStream,
    pub generation: u32,
    pub mode: Mode,
    /// Partial HTTP head or body; empty (no heap) otherwise.
    pub inbuf: Vec<u8>,
    pub out: WriteQueue,
    pub timer: Option<TimerKey>,
    /// Last time any byte arrived (loop ms).
    pub last_rx_ms: u64,
    /// WRITABLE interest is registered (only while output is pending).
    pub want_write: bool,
    /// Close the socket once the queue is empty (HTTP `Connection: close`, after a close reply).
    pub close_after_flush: bool,
    /// Our write side is shut down (after a close frame went out).
    pub write_shut: bool,
    /// Accepted on the internal admin listener (`--admin-listen`).
    pub admin: bool,
    /// The per-address count this connection holds (`worker::per_address`; 0 = none).
    pub addr_key: u32,
}

impl Conn {
    pub fn new(
        socket: TcpStream,
        generation: u32,
        now_ms: u64,
        proxy_protocol: bool,
        admin: bool,
    ) -> Self {
        Conn {
            socket,
            generation,
            admin,
            addr_key: 0,
            mode: if proxy_protocol {
                Mode::Proxy
            } else {
                Mode::Http { served: 0 }
            },
            inbuf: Vec::new(),
            out: WriteQueue::default(),
            timer: None,
            last_rx_ms: now_ms,
            want_write: false,
            close_after_flush: false,
            write_shut: false,
        }
    }

    pub fn is_websocket(&self) -> bool {
        matches!(self.mode, Mode::WebSocket(_))
    }

    /// Bytes of heap this connection holds beyond its slab slot (for the memory report).
    pub fn heap_bytes(&self) -> usize {
        let mode = match &self.mode {
            Mode::WebSocket(ws) => std::mem::size_of::<WsState>() + ws.decoder.heap_bytes(),
            Mode::HttpBody { .. } => std::mem::size_of::<RequestHead>(),
            Mode::Sse(s) => std::mem::size_of::<StreamState>() + s.cursor.capacity() * 24,
            Mode::PollHeld(p) => std::mem::size_of::<PollState>() + p.cursor.capacity() * 24,
            _ => 0,
        };
        mode + self.inbuf.capacity() + self.out.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
