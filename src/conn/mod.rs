//! A connection as a state machine without I/O: it is fed bytes, the time and the backplane's commands, and
//! answers with bytes (its write queue) and [`Effects`] for the loop (set my timer, close me, half-close, read
//! again). The loop owns the socket and the timer wheel; what the connection needs from its surroundings comes
//! through [`Env`]. The handlers: `http` (requests), `ws` (frames), `heartbeat` (timers: heartbeats, token
//! expiry, request deadlines), `deliver` (a channel message in each transport's encoding).
//!
//! An idle connection holds no read buffer: reads go into the loop's scratch buffer, and only bytes that
//! belong to an incomplete HTTP head or body are copied into `inbuf`. The WebSocket decoder keeps partial frame
//! headers and partial messages itself, allocating only while a message is in flight.

mod deflate;
mod deliver;
mod env;
mod heartbeat;
pub mod http;
pub mod queue;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::backplane::{ConnRef, CursorVec, Event};
use crate::metrics::Transport;
use corelay_proto::http1::RequestHead;
use corelay_proto::ws::{CloseCode, Decoder};

pub(crate) use env::Cx;
pub use env::{Effects, Env, LoopId};
use http::Flow;
pub use queue::WriteQueue;

/// How long a closing WebSocket waits for the peer's close reply before the socket is dropped.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

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
    /// Client requests allowed on this connection (chat endpoint only).
    pub bucket: Bucket,
    /// Input is paused by the rate limit: the socket is not read (TCP pushes back on the client) and the
    /// bytes already read but not yet decoded wait in `Conn::inbuf`, until the bucket has a token again.
    pub paused: bool,
    /// permessage-deflate: 0 when not negotiated, else the window (9..=15 bits) our messages are compressed
    /// with. No context takeover either way, so this byte is all the connection keeps (see `deflate`).
    pub deflate: u8,
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

/// How far a connection is in ending: one state instead of flags spread over the connection and its
/// WebSocket state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// Not ending.
    Open,
    /// Our WebSocket close frame is queued: the peer's frames are drained until its close reply; once ours
    /// is written the write side is shut (`WriteShut`).
    CloseSent,
    /// Our close frame is out and the write side shut: waiting, at most `CLOSE_LINGER`, for the peer's close
    /// reply and FIN.
    WriteShut,
    /// Close the socket once the queue is empty (an HTTP answer with `Connection: close`, a refusal, our reply
    /// to the peer's close, the end of a stream).
    AfterFlush,
}

impl Closing {
    /// A WebSocket close frame of ours is out or queued (and the peer's reply has not arrived).
    pub fn close_sent(self) -> bool {
        matches!(self, Closing::CloseSent | Closing::WriteShut)
    }
}

/// A connection's place in its loop's slab: the slot and the generation that tells its occupants apart (a
/// command for a closed connection misses the slot's next occupant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub index: u32,
    pub generation: u32,
}

impl ConnId {
    /// The connection's name outside its loop.
    pub fn on(self, l: LoopId) -> ConnRef {
        ConnRef {
            worker: l.0,
            index: self.index,
            generation: self.generation,
        }
    }
}

/// One connection's protocol state and output: no socket (the loop owns it, beside this in its slab), no
/// timer key (the loop keeps it; the connection asks for its timer with `Effects::schedule`).
pub struct Conn {
    pub id: ConnId,
    pub mode: Mode,
    /// Partial HTTP head or body; empty (no heap) otherwise.
    pub inbuf: Vec<u8>,
    pub out: WriteQueue,
    /// Last time any byte arrived (loop ms).
    pub last_rx_ms: u64,
    /// How far the connection is in ending.
    pub closing: Closing,
    /// Accepted on the internal admin listener (`--admin-listen`).
    pub admin: bool,
    /// Accepted only to be refused: new connections arrived faster than `accept_rate` for longer than
    /// `accept_queue`. Its first request (but a health check) is answered 503 with `Retry-After`.
    pub refused: bool,
}

impl Conn {
    /// A connection just accepted; its first timer is the handshake deadline.
    pub fn accept(
        id: ConnId,
        proxy_protocol: bool,
        admin: bool,
        env: &mut dyn Env,
        now_ms: u64,
    ) -> (Self, Effects) {
        let conn = Conn {
            id,
            admin,
            mode: if proxy_protocol {
                Mode::Proxy
            } else {
                Mode::Http { served: 0 }
            },
            inbuf: Vec::new(),
            out: WriteQueue::default(),
            last_rx_ms: now_ms,
            closing: Closing::Open,
            refused: false,
        };
        let mut cx = Cx::new(env, id, now_ms);
        let at = cx.after(cx.cfg().handshake_timeout);
        cx.schedule(at);
        let m = cx.metrics();
        m.accepted.fetch_add(1, Relaxed);
        m.conn_opened(Transport::Http);
        (conn, cx.fx)
    }

    /// A connection that stays open (WebSocket, SSE stream, held poll): a drain spreads these closes.
    pub fn is_long_lived(&self) -> bool {
        matches!(
            self.mode,
            Mode::WebSocket(_) | Mode::Sse(_) | Mode::PollHeld(_)
        )
    }

    pub fn is_websocket(&self) -> bool {
        matches!(self.mode, Mode::WebSocket(_))
    }

    /// Whether the loop should read the socket: not while a request is with the backplane (its answer
    /// resumes input) nor while a WebSocket's rate limit holds it.
    pub fn wants_input(&self) -> bool {
        match &self.mode {
            Mode::HttpAwait { .. } => self.closing == Closing::AfterFlush,
            Mode::WebSocket(ws) => !ws.paused,
            _ => true,
        }
    }

    /// Bytes read from the socket. WebSocket payloads are unmasked in place in `data` (the loop's scratch
    /// buffer).
    pub fn on_bytes(&mut self, data: &mut [u8], env: &mut dyn Env, now_ms: u64) -> Effects {
        let mut cx = Cx::new(env, self.id, now_ms);
        self.last_rx_ms = now_ms;
        let flow = if self.is_websocket() && self.inbuf.is_empty() {
            ws::on_data(self, data, &mut cx)
        } else {
            http::on_data(self, data, &mut cx)
        };
        if flow == Flow::Close {
            cx.fx.close = true;
            return cx.fx;
        }
        self.pause_if_limited(&mut cx);
        self.check_queue(&mut cx);
        cx.fx
    }

    /// The queue is empty (all written): finish a close, or half-close after our close frame.
    pub fn on_flushed(&mut self, now_ms: u64) -> Effects {
        let mut fx = Effects::default();
        match self.closing {
            Closing::AfterFlush => fx.close = true,
            Closing::CloseSent => {
                // Our close frame is out: half-close and wait (bounded) for the peer's close reply and FIN.
                self.closing = Closing::WriteShut;
                fx.shutdown_write = true;
                fx.schedule = Some(now_ms + CLOSE_LINGER.as_millis() as u64);
            }
            Closing::Open | Closing::WriteShut => {}
        }
        fx
    }

    /// The socket is gone (closed by either side, or dropped by the loop): tells the backplane if it knows
    /// this connection, and counts it.
    pub fn on_closed(&mut self, env: &mut dyn Env) {
        let me = self.id.on(env.loop_id());
        let (transport, closed_user, registered) = match &self.mode {
            Mode::WebSocket(ws) => {
                if self.closing == Closing::Open {
                    // The TCP connection ended without a close handshake.
                    env.metrics().close(1006);
                }
                if ws.deflate & deflate::TAKEOVER != 0 {
                    deflate::forget(me);
                }
                let t = if ws.user.is_some() {
                    Transport::WebSocket
                } else {
                    Transport::Echo
                };
                (t, ws.user.clone(), ws.user.is_some())
            }
            Mode::Sse(s) => (Transport::Sse, Some(s.user.clone()), true),
            Mode::PollHeld(_) => (Transport::LongPoll, None, true),
            // A stream or poll the backplane may be registering right now.
            Mode::HttpAwait { user, .. } => (Transport::Http, user.clone(), user.is_some()),
            _ => (Transport::Http, None, false),
        };
        if registered {
            env.send(Event::Closed {
                conn: me,
                user: closed_user,
            });
        }
        env.metrics().conn_closed(transport);
    }

    /// The backplane's answer to a request handed over.
    pub fn on_response(
        &mut self,
        status: u16,
        body: &str,
        env: &mut dyn Env,
        now_ms: u64,
    ) -> Effects {
        let mut cx = Cx::new(env, self.id, now_ms);
        http::on_response(self, status, body, &mut cx);
        self.resume_input(&mut cx);
        cx.fx
    }

    /// The backplane accepted an SSE stream.
    pub fn on_stream_start(
        &mut self,
        cursor: CursorVec,
        env: &mut dyn Env,
        now_ms: u64,
    ) -> Effects {
        let mut cx = Cx::new(env, self.id, now_ms);
        http::on_stream_start(self, cursor, &mut cx);
        cx.fx
    }

    /// The backplane holds a long poll.
    pub fn on_poll_hold(
        &mut self,
        cursor: CursorVec,
        hold_ms: u64,
        env: &mut dyn Env,
        now_ms: u64,
    ) -> Effects {
        let mut cx = Cx::new(env, self.id, now_ms);
        http::on_poll_hold(self, cursor, hold_ms, &mut cx);
        cx.fx
    }

    /// A stream's token was refreshed (`POST /send` refresh): it now ends at `exp` (Unix seconds).
    pub fn on_refresh(&mut self, exp: u64, env: &mut dyn Env, now_ms: u64) -> Effects {
        let mut cx = Cx::new(env, self.id, now_ms);
        let at = cx.after(cx.cfg().heartbeat_interval);
        if let Mode::Sse(s) = &mut self.mode {
            s.expires_ms = crate::auth::expiry_ms(exp, now_ms);
            cx.schedule(until_expiry(at, s.expires_ms));
        }
        cx.fx
    }

    /// The backplane ends this connection (a WebSocket with `code` and `reason`).
    pub fn close_by(&mut self, code: u16, reason: &str, env: &mut dyn Env, now_ms: u64) -> Effects {
        let cx = Cx::new(env, self.id, now_ms);
        if self.is_websocket() {
            ws::start_close(self, CloseCode(code), reason, &cx);
        } else {
            self.closing = Closing::AfterFlush;
        }
        cx.fx
    }

    /// The node drains: WebSockets get a going-away close, everything else ends after what is queued (a
    /// connection between requests at once).
    pub fn drain(&mut self, env: &mut dyn Env, now_ms: u64) -> Effects {
        let mut cx = Cx::new(env, self.id, now_ms);
        match &self.mode {
            Mode::WebSocket(_) => ws::start_close(
                self,
                CloseCode::GOING_AWAY,
                "server draining: reconnect",
                &cx,
            ),
            Mode::HttpAwait { .. } | Mode::HttpBody { .. } | Mode::Sse(_) | Mode::PollHeld(_) => {
                self.closing = Closing::AfterFlush
            }
            Mode::Proxy => cx.fx.close = true,
            Mode::Http { .. } if self.out.is_empty() => cx.fx.close = true,
            Mode::Http { .. } => self.closing = Closing::AfterFlush,
        }
        cx.fx
    }

    /// After an HTTP answer: parse what the client pipelined meanwhile (`inbuf`), and have the loop read the
    /// socket again.
    fn resume_input(&mut self, cx: &mut Cx<'_>) {
        cx.fx.read = true;
        if self.closing == Closing::Open
            && !self.inbuf.is_empty()
            && matches!(self.mode, Mode::Http { .. })
            && http::on_data(self, &[], cx) == Flow::Close
        {
            cx.fx.close = true;
        }
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
mod tests;
