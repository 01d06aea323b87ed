//! The client side of the wire: one `mio` Poll per process driving many non-blocking connections.
//!
//! Connections are opened with bind-before-connect (rotating the loopback source address so no single
//! source IP runs out of ephemeral ports), complete an HTTP/1.1 request (a WebSocket upgrade, or a plain
//! GET for SSE and long polling), then deliver events to a handler closure. Reads are edge-triggered and
//! drain the socket until `WouldBlock`; writes go straight to the socket and the rest waits in a per-
//! connection buffer until the next writable edge. Client frames are masked with a fresh key per frame;
//! server pings are answered with masked pongs carrying the same payload, inside the engine.
//!
//! With TLS (`wss://`, see `tls.rs`) each connection also carries a rustls `ClientConnection` (sans-IO): the
//! socket's bytes go through `read_tls`/`process_new_packets` and the plaintext comes out of its reader;
//! what the connection sends goes into its writer and the records out with `write_tls`. The ClientHello is
//! sent once the TCP connect completes; the HTTP request is queued behind the TLS handshake.
//!
//! Longer than 600 lines: the client side of every transport (WebSocket handshake and frames, SSE, polls) on one
//! event loop, with the source-address rotation that lets one host open a million sockets.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine as _;
use corelay_proto::ws::{Opcode, accept_key, apply_mask, decode_header};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::sse;
use crate::tls::Tls;

/// The token of the engine's waker (other threads poke the loop through it).
pub const WAKER: Token = Token(usize::MAX);
/// Largest server frame (and unparsed input) accepted on one connection.
const MAX_INPUT: usize = 16 << 20;
/// Largest response head.
const MAX_HEAD: usize = 16 << 10;
/// Source addresses rotate over 127.0.0.2..=127.0.0.250.
const SOURCE_FIRST: usize = 2;
const SOURCE_COUNT: usize = 249;

const EINPROGRESS: i32 = 115;
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const EADDRNOTAVAIL: i32 = 99;

/// What the connections speak after their request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket upgrade (expects 101 and a correct `Sec-WebSocket-Accept`).
    Ws,
    /// Server-sent events: `GET` answered with 200 and a stream that is read and discarded, or parsed
    /// into [`Event::Sse`] with [`Target::sse_events`].
    Sse,
    /// Long polling: `GET` answered with 200; a complete response is followed by the next request.
    LongPoll,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::LongPoll => "longpoll",
        }
    }
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` for the Host header.
    pub host: String,
    /// Path and query (without the per-connection parameters).
    pub path: String,
    pub transport: Transport,
    pub subprotocol: Option<String>,
    /// Bind each socket to 127.0.0.X:0 first (only when the target is IPv4 loopback).
    pub rotate_source: bool,
    /// The URL's scheme is `wss` or `https`.
    pub secure: bool,
    /// TLS client settings, set by the caller for secure targets (`Common::target`).
    pub tls: Option<Tls>,
    /// Offer permessage-deflate and inflate compressed messages (`--deflate`).
    pub deflate: bool,
    /// SSE: parse the stream (undoing a chunked transfer coding) and report each event as [`Event::Sse`],
    /// instead of discarding it.
    pub sse_events: bool,
}

impl Target {
    /// Parses `ws://host:port/path?query` (also `http://`, and `wss://`/`https://`, which set `secure`: the
    /// caller then sets `tls`).
    pub fn parse(url: &str, transport: Transport, rotate: bool) -> anyhow::Result<Target> {
        let (scheme, rest) = url
            .split_once("://")
            .with_context(|| format!("{url}: expected ws://host:port/path"))?;
        let (default_port, secure) = match scheme {
            "ws" | "http" => (80, false),
            "wss" | "https" => (443, true),
            _ => bail!("{url}: unknown scheme {scheme:?}"),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        anyhow::ensure!(!authority.is_empty(), "{url}: missing host");
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        };
        let addrs: Vec<SocketAddr> = with_port
            .to_socket_addrs()
            .with_context(|| format!("{url}: cannot resolve {with_port}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .with_context(|| format!("{url}: {with_port} resolves to nothing"))?;
        let rotate_source = rotate && matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback());
        Ok(Target {
            addr,
            host: authority.to_string(),
            path,
            transport,
            subprotocol: None,
            rotate_source,
            secure,
            tls: None,
            deflate: false,
            sse_events: false,
        })
    }

    /// The path with `extra` (`k=v&k2=v2`, may be empty) appended to the query.
    pub fn path_with(&self, extra: &str) -> String {
        if extra.is_empty() {
            self.path.clone()
        } else if self.path.contains('?') {
            format!("{}&{extra}", self.path)
        } else {
            format!("{}?{extra}", self.path)
        }
    }
}

/// xorshift64*: masking keys and handshake nonces (not cryptographic; they need not be).
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let seed = getrandom::u64().unwrap_or_else(|_| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0x9E37_79B9, |d| d.as_nanos() as u64)
        });
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Encodes one masked client frame (RFC 6455 §5.2/§5.3), FIN set.
pub fn encode_masked(op: Opcode, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.push(0x80 | op.as_u8());
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}

/// Why a connection could not even be started.
#[derive(Debug)]
pub enum StartError {
    /// EMFILE/ENFILE: the process (or system) open-file limit.
    FileLimit,
    Other(String),
}

/// Something that happened on a connection.
pub enum Event<'a> {
    /// The response head arrived and was accepted (101 for WebSocket, 200 for SSE); for long polling,
    /// the first request has been written.
    Open { id: usize, handshake: Duration },
    /// A complete data message from the server (text or binary, reassembled).
    Message {
        id: usize,
        op: Opcode,
        payload: &'a [u8],
    },
    /// SSE with [`Target::sse_events`]: a complete event, its type (`message` when it named none) and its
    /// data (`data:` lines joined with `\n`).
    Sse {
        id: usize,
        event: &'a [u8],
        data: &'a [u8],
    },
    /// Long polling: a complete response arrived and the next request has been sent.
    Response,
    /// The connection is gone (`opened`: whether it had completed its handshake).
    Failed {
        id: usize,
        reason: String,
        opened: bool,
    },
    /// Another thread called the waker.
    Woken,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Handshake,
    Open,
}

enum Body {
    /// SSE, or a response whose length is unknown: read and discard until the server closes.
    Stream,
    /// SSE with [`Target::sse_events`]: parsed into events.
    Events(Box<sse::Stream>),
    Length(usize),
    Chunked,
}

struct Conn {
    sock: TcpStream,
    /// The TLS session (boxed: a few hundred bytes of state, plus its buffers).
    tls: Option<Box<rustls::ClientConnection>>,
    phase: Phase,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    started: Instant,
    /// The expected `Sec-WebSocket-Accept` (until the handshake is done).
    accept: Option<String>,
    /// The request: sent once connected; kept for the next long-poll request.
    request: Vec<u8>,
    /// A fragmented message being reassembled: its opcode, whether it is compressed (RSV1), its bytes.
    frag: Option<(Opcode, bool, Vec<u8>)>,
    body: Body,
    opened: bool,
}

/// Totals over all connections of one engine.
#[derive(Default, Clone, Copy)]
pub struct NetStats {
    pub pings_answered: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub responses: u64,
    /// TLS connections that completed a full handshake, and those the server resumed.
    pub tls_full: u64,
    pub tls_resumed: u64,
    /// Messages that arrived compressed (RSV1, permessage-deflate) and were inflated.
    pub compressed_in: u64,
}

/// The engine. Connection ids are never reused within one engine (the slot stays `None`).
pub struct Net {
    poll: Poll,
    events: Option<Events>,
    conns: Vec<Option<Conn>>,
    live: usize,
    pub target: Target,
    rng: Rng,
    ready: Vec<(usize, bool, bool, bool)>,
    deferred: Vec<(usize, String)>,
    scratch: Vec<u8>,
    pub stats: NetStats,
    /// Emptied read and write buffers keep their allocation up to this many bytes (see [`Net::lean`]).
    keep: usize,
    /// One inflater for the engine (no context takeover: reset per message).
    inflater: Option<corelay_proto::ws::deflate::Inflater>,
}

impl Net {
    pub fn new(target: Target) -> io::Result<Net> {
        Ok(Net {
            poll: Poll::new()?,
            events: Some(Events::with_capacity(4096)),
            conns: Vec::new(),
            live: 0,
            target,
            rng: Rng::new(),
            ready: Vec::new(),
            deferred: Vec::new(),
            scratch: vec![0; 64 << 10],
            stats: NetStats::default(),
            keep: 256 << 10,
            inflater: None,
        })
    }

    /// Room for `n` more connections without regrowing the table.
    pub fn reserve(&mut self, n: usize) {
        self.conns.reserve_exact(n);
    }

    /// Lean mode, for many mostly idle connections: a connection's read and write buffers are freed
    /// as soon as they are empty (a reallocation per message instead of a few hundred bytes kept per
    /// connection).
    pub fn lean(&mut self) {
        self.keep = 0;
    }

    /// A waker other threads can use to interrupt [`Net::poll`] (it reports [`Event::Woken`]).
    pub fn waker(&self) -> io::Result<Arc<Waker>> {
        Ok(Arc::new(Waker::new(self.poll.registry(), WAKER)?))
    }

    /// Connections not yet failed or closed.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Unsent bytes queued on a connection.
    pub fn backlog(&self, id: usize) -> usize {
        match self.conns.get(id) {
            Some(Some(c)) => c.wbuf.len() - c.wpos,
            _ => 0,
        }
    }

    /// Starts a non-blocking connect; `extra_query` is appended to the target's query, `tag` (the
    /// caller's global connection index) picks the source address.
    pub fn connect(&mut self, extra_query: &str, tag: usize) -> Result<usize, StartError> {
        let addr = self.target.addr;
        let tls = match &self.target.tls {
            Some(t) => Some(Box::new(
                t.connection()
                    .map_err(|e| StartError::Other(format!("tls: {e}")))?,
            )),
            None => None,
        };
        let sock = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )
        .map_err(start_error)?;
        sock.set_tcp_nodelay(true).map_err(start_error)?;
        if self.target.rotate_source {
            let x = (SOURCE_FIRST + tag % SOURCE_COUNT) as u8;
            let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, x)), 0);
            sock.bind(&src.into()).map_err(start_error)?;
        }
        match sock.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(EINPROGRESS) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(start_error(e)),
        }
        let std_stream: std::net::TcpStream = sock.into();
        let mut stream = TcpStream::from_std(std_stream);
        let id = self.conns.len();
        self.poll
            .registry()
            .register(
                &mut stream,
                Token(id),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(start_error)?;
        let (request, accept) = self.request(extra_query);
        self.conns.push(Some(Conn {
            sock: stream,
            tls,
            phase: Phase::Connecting,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            started: Instant::now(),
            accept,
            request,
            frag: None,
            body: Body::Stream,
            opened: false,
        }));
        self.live += 1;
        Ok(id)
    }

    fn request(&mut self, extra_query: &str) -> (Vec<u8>, Option<String>) {
        let t = &self.target;
        let path = t.path_with(extra_query);
        let mut r = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", t.host);
        let accept = if t.transport == Transport::Ws {
            let mut nonce = [0u8; 16];
            nonce[..8].copy_from_slice(&self.rng.next_u64().to_ne_bytes());
            nonce[8..].copy_from_slice(&self.rng.next_u64().to_ne_bytes());
            let key = base64::engine::general_purpose::STANDARD.encode(nonce);
            r.push_str(
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
            );
            r.push_str(&format!("Sec-WebSocket-Key: {key}\r\n"));
            if let Some(p) = &t.subprotocol {
                r.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
            }
            if t.deflate {
                r.push_str(
                    "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; server_no_context_takeover\r\n",
                );
            }
            Some(accept_key(&key))
        } else {
            if t.transport == Transport::Sse {
                r.push_str("Accept: text/event-stream\r\n");
            }
            None
        };
        r.push_str("\r\n");
        (r.into_bytes(), accept)
    }

    /// Queues a masked frame and writes what the socket takes now. Returns false if the connection is
    /// gone. Write errors are reported as [`Event::Failed`] on the next [`Net::poll`].
    pub fn send(&mut self, id: usize, op: Opcode, payload: &[u8]) -> bool {
        let mask = (self.rng.next_u64() as u32).to_ne_bytes();
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return false;
        };
        encode_masked(op, payload, mask, &mut c.wbuf);
        if c.phase != Phase::Connecting
            && let Err(e) = flush(c, &mut self.stats, self.keep)
        {
            self.deferred.push((id, io_reason(&e)));
        }
        true
    }

    /// Closes a connection without an event (a close frame is attempted for open WebSockets).
    pub fn close(&mut self, id: usize) {
        if let Some(slot) = self.conns.get_mut(id)
            && let Some(mut c) = slot.take()
        {
            if c.phase == Phase::Open && self.target.transport == Transport::Ws {
                let mask = (self.rng.next_u64() as u32).to_ne_bytes();
                encode_masked(Opcode::Close, &1000u16.to_be_bytes(), mask, &mut c.wbuf);
                let _ = flush(&mut c, &mut self.stats, self.keep);
            }
            let _ = self.poll.registry().deregister(&mut c.sock);
            self.live -= 1;
        }
    }

    /// Closes every connection.
    pub fn close_all(&mut self) {
        for id in 0..self.conns.len() {
            self.close(id);
        }
    }

    /// Fails connections still connecting or handshaking after `limit`.
    pub fn expire<F>(&mut self, limit: Duration, h: &mut F)
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        let now = Instant::now();
        for id in 0..self.conns.len() {
            if let Some(c) = &self.conns[id]
                && !c.opened
                && now.duration_since(c.started) > limit
            {
                let reason = if c.phase == Phase::Connecting {
                    "connect timeout"
                } else {
                    "handshake timeout"
                };
                self.fail(id, reason.to_string(), h);
            }
        }
    }

    /// Waits up to `timeout` for readiness and handles it, calling `h` for every event.
    pub fn poll<F>(&mut self, timeout: Option<Duration>, h: &mut F) -> io::Result<()>
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        self.report_deferred(h);
        let mut events = self
            .events
            .take()
            .unwrap_or_else(|| Events::with_capacity(4096));
        let r = self.poll.poll(&mut events, timeout);
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        for ev in events.iter() {
            ready.push((
                ev.token().0,
                ev.is_readable() || ev.is_read_closed(),
                ev.is_writable(),
                ev.is_error(),
            ));
        }
        self.events = Some(events);
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                self.ready = ready;
                return Err(e);
            }
            Ok(()) => {}
        }
        for &(id, readable, writable, error) in &ready {
            if id == WAKER.0 {
                h(self, Event::Woken);
            } else {
                self.service(id, readable, writable, error, h);
            }
        }
        self.ready = ready;
        self.report_deferred(h);
        Ok(())
    }

    fn report_deferred<F>(&mut self, h: &mut F)
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        while let Some((id, reason)) = self.deferred.pop() {
            self.fail(id, reason, h);
        }
    }

    fn fail<F>(&mut self, id: usize, reason: String, h: &mut F)
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        let Some(slot) = self.conns.get_mut(id) else {
            return;
        };
        let Some(mut c) = slot.take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.sock);
        self.live -= 1;
        let opened = c.opened;
        drop(c);
        h(self, Event::Failed { id, reason, opened });
    }

    fn service<F>(&mut self, id: usize, readable: bool, writable: bool, error: bool, h: &mut F)
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return;
        };
        let mut writable = writable;
        let mut poll_sent = None;
        if c.phase == Phase::Connecting {
            match c.sock.take_error() {
                Ok(Some(e)) | Err(e) => return self.fail(id, connect_reason(&e), h),
                Ok(None) => {}
            }
            match c.sock.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    if error {
                        return self.fail(id, "connect: error".into(), h);
                    }
                    return; // not yet
                }
                Err(e) => return self.fail(id, connect_reason(&e), h),
            }
            c.phase = Phase::Handshake;
            let req = if self.target.transport == Transport::LongPoll {
                c.request.clone()
            } else {
                std::mem::take(&mut c.request)
            };
            // The request goes before anything queued meanwhile.
            c.wbuf.splice(0..0, req);
            writable = true;
            if self.target.transport == Transport::LongPoll {
                // A long poll is "open" once its request is out: the answer may take the whole poll
                // timeout. A non-200 answer later fails it with `opened: true`.
                c.opened = true;
                poll_sent = Some(c.started.elapsed());
            }
        }
        if writable && let Err(e) = flush(c, &mut self.stats, self.keep) {
            return self.fail(id, io_reason(&e), h);
        }
        if let Some(handshake) = poll_sent {
            h(self, Event::Open { id, handshake });
            if !c_is_live(self, id) {
                return;
            }
        }
        if readable || error {
            self.read(id, h);
        }
    }

    fn read<F>(&mut self, id: usize, h: &mut F)
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        let mut eof = false;
        let mut err = None;
        {
            let Some(Some(c)) = self.conns.get_mut(id) else {
                return;
            };
            if let Some(tls) = c.tls.as_deref_mut() {
                read_tls(
                    tls,
                    &mut c.sock,
                    &mut c.rbuf,
                    &mut self.scratch,
                    &mut self.stats,
                    &mut eof,
                    &mut err,
                );
                // The handshake's answers (the client Finished) and the request queued behind it.
                if err.is_none()
                    && let Err(e) = flush(c, &mut self.stats, self.keep)
                {
                    err = Some(io_reason(&e));
                }
            } else {
                loop {
                    match c.sock.read(&mut self.scratch) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => {
                            self.stats.bytes_in += n as u64;
                            c.rbuf.extend_from_slice(&self.scratch[..n]);
                            if c.rbuf.len() > MAX_INPUT {
                                err = Some("more than 16 MiB of unparsed input".to_string());
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            err = Some(io_reason(&e));
                            break;
                        }
                    }
                }
            }
        }
        if err.is_none() {
            self.process(id, h);
        }
        if let Some(Some(c)) = self.conns.get(id) {
            if let Some(e) = err {
                self.fail(id, e, h);
            } else if eof {
                let reason = match c.phase {
                    Phase::Open => "closed by server",
                    _ => "closed by server before the response",
                };
                self.fail(id, reason.into(), h);
            }
        }
    }

    fn process<F>(&mut self, id: usize, h: &mut F)
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        loop {
            let Some(Some(c)) = self.conns.get_mut(id) else {
                return;
            };
            if c.phase == Phase::Handshake {
                let Some(end) = find(&c.rbuf, b"\r\n\r\n") else {
                    if c.rbuf.len() > MAX_HEAD {
                        return self.fail(id, "response head too large".into(), h);
                    }
                    return;
                };
                let head = match parse_head(&c.rbuf[..end]) {
                    Ok(head) => head,
                    Err(e) => return self.fail(id, e, h),
                };
                c.rbuf.drain(..end + 4);
                let transport = self.target.transport;
                let sse_events = self.target.sse_events;
                if transport == Transport::Ws {
                    if head.status != 101 {
                        return self.fail(id, format!("http {}", head.status), h);
                    }
                    if head.accept.as_deref() != c.accept.as_deref() {
                        return self.fail(id, "bad Sec-WebSocket-Accept".into(), h);
                    }
                    c.accept = None;
                } else {
                    if head.status != 200 {
                        return self.fail(id, format!("http {}", head.status), h);
                    }
                    c.body = match (transport, head.content_length, head.chunked) {
                        (Transport::LongPoll, Some(n), _) => Body::Length(n),
                        (Transport::LongPoll, None, true) => Body::Chunked,
                        (Transport::Sse, _, chunked) if sse_events => {
                            Body::Events(Box::new(sse::Stream::new(chunked)))
                        }
                        _ => Body::Stream,
                    };
                }
                c.phase = Phase::Open;
                if let Some(tls) = &c.tls
                    && !c.opened
                {
                    if tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        self.stats.tls_resumed += 1;
                    } else {
                        self.stats.tls_full += 1;
                    }
                }
                let first = !c.opened;
                c.opened = true;
                let handshake = c.started.elapsed();
                if first {
                    h(self, Event::Open { id, handshake });
                }
                continue;
            }
            return if self.target.transport == Transport::Ws {
                self.frames(id, h)
            } else {
                self.body(id, h)
            };
        }
    }

    /// SSE and long polling after the head: discard the stream (or parse its events); a complete long-poll
    /// response is followed by the next request on the same connection.
    fn body<F>(&mut self, id: usize, h: &mut F)
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return;
        };
        if matches!(c.body, Body::Events(_)) {
            return self.events(id, h);
        }
        let complete = match &mut c.body {
            Body::Events(_) => false,
            Body::Stream => {
                c.rbuf.clear();
                if c.rbuf.capacity() > self.keep {
                    c.rbuf = Vec::new();
                }
                false
            }
            Body::Length(left) => {
                let n = (*left).min(c.rbuf.len());
                c.rbuf.drain(..n);
                *left -= n;
                *left == 0
            }
            Body::Chunked => {
                let done =
                    find(&c.rbuf, b"0\r\n\r\n").is_some_and(|i| i == 0 || c.rbuf[i - 1] == b'\n');
                if done {
                    c.rbuf.clear();
                } else if c.rbuf.len() > 8 {
                    // Keep only a tail long enough to spot the terminator across reads.
                    let keep = c.rbuf.len() - 8;
                    c.rbuf.drain(..keep);
                }
                done
            }
        };
        if !complete {
            return;
        }
        self.stats.responses += 1;
        c.phase = Phase::Handshake;
        c.started = Instant::now();
        c.wbuf.extend_from_slice(&c.request);
        if let Err(e) = flush(c, &mut self.stats, self.keep) {
            return self.fail(id, io_reason(&e), h);
        }
        h(self, Event::Response);
        if !c_is_live(self, id) {
            return;
        }
        // More input may already be here (the next response).
        self.process(id, h);
    }

    /// An SSE stream's events: the parser and the input are taken out of the connection while the handler
    /// runs, and put back unless the handler closed it.
    fn events<F>(&mut self, id: usize, h: &mut F)
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return;
        };
        let Body::Events(mut stream) = std::mem::replace(&mut c.body, Body::Stream) else {
            return;
        };
        let mut buf = std::mem::take(&mut c.rbuf);
        let r = stream.feed(&buf, &mut |event, data| {
            if c_is_live(self, id) {
                h(self, Event::Sse { id, event, data });
            }
        });
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return;
        };
        match r {
            Ok(used) => {
                buf.drain(..used);
                if buf.is_empty() && buf.capacity() > self.keep {
                    buf = Vec::new();
                }
                c.rbuf = buf;
                c.body = Body::Events(stream);
            }
            Err(e) => self.fail(id, e, h),
        }
    }

    fn frames<F>(&mut self, id: usize, h: &mut F)
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return;
        };
        let mut buf = std::mem::take(&mut c.rbuf);
        let mut pos = 0;
        let mut failure = None;
        loop {
            let (head, hl) = match decode_header(&buf[pos..]) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    failure = Some(format!("bad frame from server: {e:?}"));
                    break;
                }
            };
            let len = usize::try_from(head.payload_len).unwrap_or(usize::MAX);
            if len > MAX_INPUT {
                failure = Some("server frame larger than 16 MiB".to_string());
                break;
            }
            if buf.len() - pos < hl + len {
                break;
            }
            let (start, end) = (pos + hl, pos + hl + len);
            pos = end;
            if let Some(k) = head.mask {
                apply_mask(&mut buf[start..end], k, 0);
            }
            let Some(op) = Opcode::from_u8(head.opcode) else {
                failure = Some(format!("reserved opcode {}", head.opcode));
                break;
            };
            match op {
                Opcode::Ping => {
                    self.stats.pings_answered += 1;
                    self.send(id, Opcode::Pong, &buf[start..end]);
                }
                Opcode::Pong => {}
                Opcode::Close => {
                    let code = buf
                        .get(start..start + 2)
                        .map_or(1005, |b| u16::from_be_bytes([b[0], b[1]]));
                    let reply = if code == 1005 {
                        Vec::new()
                    } else {
                        code.to_be_bytes().to_vec()
                    };
                    self.send(id, Opcode::Close, &reply);
                    failure = Some(format!("closed by server ({code})"));
                    break;
                }
                Opcode::Text | Opcode::Binary if head.fin => {
                    if let Err(e) = self.deliver(id, op, head.rsv & 0b100 != 0, &buf[start..end], h)
                    {
                        failure = Some(e);
                        break;
                    }
                    if !c_is_live(self, id) {
                        return;
                    }
                }
                Opcode::Text | Opcode::Binary => {
                    if let Some(Some(c)) = self.conns.get_mut(id) {
                        c.frag = Some((op, head.rsv & 0b100 != 0, buf[start..end].to_vec()));
                    }
                }
                Opcode::Continuation => {
                    let Some(Some(c)) = self.conns.get_mut(id) else {
                        return;
                    };
                    let Some((fop, compressed, mut data)) = c.frag.take() else {
                        failure = Some("continuation without a start".to_string());
                        break;
                    };
                    data.extend_from_slice(&buf[start..end]);
                    if data.len() > MAX_INPUT {
                        failure = Some("server message larger than 16 MiB".to_string());
                        break;
                    }
                    if head.fin {
                        if let Err(e) = self.deliver(id, fop, compressed, &data, h) {
                            failure = Some(e);
                            break;
                        }
                        if !c_is_live(self, id) {
                            return;
                        }
                    } else {
                        c.frag = Some((fop, compressed, data));
                    }
                }
            }
        }
        if let Some(Some(c)) = self.conns.get_mut(id) {
            buf.drain(..pos);
            if buf.is_empty() && buf.capacity() > self.keep {
                buf = Vec::new();
            }
            c.rbuf = buf;
        }
        if let Some(reason) = failure {
            self.fail(id, reason, h);
        }
    }
}

impl Net {
    /// Hands a whole message to the handler, inflated first when it came compressed.
    fn deliver<F>(
        &mut self,
        id: usize,
        op: Opcode,
        compressed: bool,
        payload: &[u8],
        h: &mut F,
    ) -> Result<(), String>
    where
        F: FnMut(&mut Net, Event<'_>),
    {
        if !compressed {
            h(self, Event::Message { id, op, payload });
            return Ok(());
        }
        if !self.target.deflate {
            return Err("compressed message without permessage-deflate".to_string());
        }
        let mut inf = self.inflater.take().unwrap_or_default();
        let r = match inf.inflate(payload, op == Opcode::Text, MAX_INPUT) {
            Ok(plain) => {
                self.stats.compressed_in += 1;
                h(
                    self,
                    Event::Message {
                        id,
                        op,
                        payload: plain,
                    },
                );
                Ok(())
            }
            Err(e) => Err(format!("bad compressed message: {e:?}")),
        };
        self.inflater = Some(inf);
        r
    }
}

fn c_is_live(net: &Net, id: usize) -> bool {
    matches!(net.conns.get(id), Some(Some(_)))
}

/// Reads TLS records until the socket has no more, decrypting them into `rbuf` (the caller then flushes what
/// the session has to send).
fn read_tls(
    tls: &mut rustls::ClientConnection,
    sock: &mut TcpStream,
    rbuf: &mut Vec<u8>,
    scratch: &mut [u8],
    stats: &mut NetStats,
    eof: &mut bool,
    err: &mut Option<String>,
) {
    loop {
        match tls.read_tls(sock) {
            Ok(0) => {
                *eof = true;
                return;
            }
            Ok(n) => stats.bytes_in += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                *err = Some(io_reason(&e));
                return;
            }
        }
        if let Err(e) = tls.process_new_packets() {
            // Send the alert if the socket takes it.
            let _ = tls.write_tls(sock);
            *err = Some(format!("tls: {e}"));
            return;
        }
        loop {
            match tls.reader().read(scratch) {
                Ok(0) => {
                    *eof = true; // close_notify
                    return;
                }
                Ok(n) => {
                    rbuf.extend_from_slice(&scratch[..n]);
                    if rbuf.len() > MAX_INPUT {
                        *err = Some("more than 16 MiB of unparsed input".to_string());
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    *err = Some(io_reason(&e));
                    return;
                }
            }
        }
    }
}

/// Writes what the socket takes (through the TLS session if there is one); an emptied buffer keeps its
/// allocation up to `keep` bytes.
fn flush(c: &mut Conn, stats: &mut NetStats, keep: usize) -> io::Result<()> {
    if let Some(tls) = c.tls.as_deref_mut() {
        // Plaintext into the session (held there until the handshake is done), records out, until the
        // socket is full or everything is out.
        'out: loop {
            while c.wpos < c.wbuf.len() {
                match tls.writer().write(&c.wbuf[c.wpos..])? {
                    0 => break, // the session's buffer is full
                    n => c.wpos += n,
                }
            }
            if !tls.wants_write() {
                break;
            }
            while tls.wants_write() {
                match tls.write_tls(&mut c.sock) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => stats.bytes_out += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 'out,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if c.wpos == c.wbuf.len() {
                break;
            }
        }
    }
    while c.tls.is_none() && c.wpos < c.wbuf.len() {
        match c.sock.write(&c.wbuf[c.wpos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                c.wpos += n;
                stats.bytes_out += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if c.wpos == c.wbuf.len() {
        c.wbuf.clear();
        c.wpos = 0;
        if c.wbuf.capacity() > keep {
            c.wbuf = Vec::new();
        }
    } else if c.wpos > (64 << 10) && c.wpos * 2 > c.wbuf.len() {
        c.wbuf.drain(..c.wpos);
        c.wpos = 0;
    }
    Ok(())
}

fn start_error(e: io::Error) -> StartError {
    match e.raw_os_error() {
        Some(EMFILE | ENFILE) => StartError::FileLimit,
        Some(EADDRNOTAVAIL) => StartError::Other("no free source port (EADDRNOTAVAIL)".into()),
        _ => StartError::Other(format!("connect: {}", e.kind())),
    }
}

fn connect_reason(e: &io::Error) -> String {
    format!("connect: {}", e.kind())
}

fn io_reason(e: &io::Error) -> String {
    format!("io: {}", e.kind())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

struct Head {
    status: u16,
    accept: Option<String>,
    content_length: Option<usize>,
    chunked: bool,
}

fn parse_head(raw: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| "malformed status line".to_string())?;
    let mut head = Head {
        status,
        accept: None,
        content_length: None,
        chunked: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("sec-websocket-accept") {
            head.accept = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_messages_are_inflated_and_counted() {
        let mut t = Target::parse("ws://127.0.0.1:9/ws", Transport::Ws, false).unwrap();
        t.deflate = true;
        let mut net = Net::new(t).unwrap();
        let text = br#"{"type":"message","channel":"conversation:c1","offset":1,"body":"hello hello hello"}"#;
        let mut z = corelay_proto::ws::deflate::Deflater::new(6);
        let compressed = z.compress(text, 15).unwrap().to_vec();
        assert!(compressed.len() < text.len());
        let mut got = Vec::new();
        net.deliver(0, Opcode::Text, true, &compressed, &mut |_, ev| {
            if let Event::Message { payload, .. } = ev {
                got = payload.to_vec();
            }
        })
        .unwrap();
        assert_eq!(got, text);
        assert_eq!(net.stats.compressed_in, 1);
        // Without --deflate a compressed message is an error, not garbage passed on.
        net.target.deflate = false;
        assert!(
            net.deliver(0, Opcode::Text, true, &compressed, &mut |_, _| {})
                .is_err()
        );
    }

    #[test]
    fn masked_frames_decode() {
        for n in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mut out = Vec::new();
            encode_masked(Opcode::Binary, &payload, [1, 2, 3, 4], &mut out);
            let (h, hl) = decode_header(&out).unwrap().unwrap();
            assert!(h.fin);
            assert_eq!(h.opcode, Opcode::Binary.as_u8());
            assert_eq!(h.payload_len, n as u64);
            assert_eq!(h.mask, Some([1, 2, 3, 4]));
            let mut body = out[hl..].to_vec();
            apply_mask(&mut body, [1, 2, 3, 4], 0);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn parses_urls_and_heads() {
        let t = Target::parse("ws://127.0.0.1:8080/echo", Transport::Ws, true).unwrap();
        assert_eq!(t.addr.port(), 8080);
        assert_eq!(t.path, "/echo");
        assert!(t.rotate_source);
        assert_eq!(t.path_with("token=x"), "/echo?token=x");
        let t = Target::parse("http://127.0.0.1:9/sse?channels=a", Transport::Sse, true).unwrap();
        assert_eq!(t.path_with("token=x"), "/sse?channels=a&token=x");
        let h =
            parse_head(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: abc").unwrap();
        assert_eq!((h.status, h.accept.as_deref()), (101, Some("abc")));
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12").unwrap();
        assert_eq!((h.status, h.content_length), (200, Some(12)));
    }
}
