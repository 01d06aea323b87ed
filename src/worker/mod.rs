//! One event loop: a `mio::Poll` pinned to a core, its own `SO_REUSEPORT` listener, a `Slab` of connections,
//! a timer wheel, and one scratch read buffer shared by all its connections.
//!
//! mio on Linux is edge-triggered: every readable socket is read until `WouldBlock`, except that one
//! connection gets at most [`READS_PER_WAKE`] reads per wake; a connection that still has input is put on the
//! `pending` list and revisited before the next (zero-timeout) poll, so one busy client cannot starve the rest.

pub mod listener;
pub mod per_address;
pub mod pinning;

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;

use crate::auth::Verifier;
use crate::backplane::{BackplaneHandle, ConnRef, Event, LoopCmd};
use crate::config::Config;
use crate::conn::http::Flow;
use crate::conn::{self, Conn, Mode};
use crate::metrics::{LoopMetrics, Metrics, Transport};
use crate::timer::{TimerKey, TimerWheel};
use corelay_proto::ws::CloseCode;

const LISTENER: Token = Token(usize::MAX - 1);
/// The internal admin listener (`--admin-listen`), on loop 0 only.
const ADMIN: Token = Token(usize::MAX - 3);
const WAKER: Token = Token(usize::MAX - 2);
/// Reads per connection per wake before it yields to the others.
pub const READS_PER_WAKE: usize = 16;
/// The scratch buffer every read goes through (one per loop, not per connection).
pub const SCRATCH_BYTES: usize = 64 * 1024;
/// How long a closing WebSocket waits for the peer's close reply before the socket is dropped.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
const TIMER_TICK: Duration = Duration::from_millis(10);
const TIMER_SLOTS: usize = 4096;

/// What every loop shares (read-only or atomic).
#[derive(Clone)]
pub struct Shared {
    pub cfg: Arc<Config>,
    pub verifier: Arc<Verifier>,
    pub api_key: Arc<str>,
    pub metrics: Arc<Metrics>,
    pub backplane: BackplaneHandle,
    /// Set on drain: `/readyz` answers 503.
    pub draining: Arc<AtomicBool>,
    /// The consistent-hash ring for `/api/route` (`--ring-nodes`).
    pub ring: Arc<crate::cluster::ring::Ring>,
    /// Connections per source address (`--max-connections-per-ip`).
    pub per_address: Arc<per_address::PerAddress>,
}

/// A loop's state that connection code may use (everything but the slab and the scratch buffer).
pub struct Ctx {
    pub id: u16,
    pub shared: Shared,
    pub wheel: TimerWheel<(u32, u32)>,
    epoch: Instant,
    pub now: Instant,
    /// Milliseconds since this loop started (timer arithmetic without 16-byte `Instant`s per connection).
    pub now_ms: u64,
    registry: Registry,
    /// Events the backplane queue had no room for that must not be lost (opens and closes); retried.
    deferred: VecDeque<Event>,
}

impl Ctx {
    pub fn metrics(&self) -> &LoopMetrics {
        &self.shared.metrics.loops[self.id as usize]
    }

    /// Sends an event that must arrive (presence); if the queue is full it is retried on the next turn.
    pub fn to_backplane(&mut self, ev: Event) {
        if !self.deferred.is_empty() {
            self.deferred.push_back(ev);
        } else if let Err(ev) = self.shared.backplane.try_send(ev) {
            self.deferred.push_back(ev);
        }
    }

    /// Sets the connection's one timer to fire at `at_ms` (loop ms), replacing any earlier one.
    pub fn schedule(&mut self, conn: &mut Conn, me: ConnRef, at_ms: u64) {
        if let Some(k) = conn.timer.take() {
            self.wheel.cancel(k);
        }
        let at = self.epoch + Duration::from_millis(at_ms);
        conn.timer = Some(self.wheel.insert(at, (me.index, me.generation)));
    }

    fn cancel(&mut self, key: Option<TimerKey>) {
        if let Some(k) = key {
            self.wheel.cancel(k);
        }
    }

    fn tick(&mut self) {
        self.now = Instant::now();
        self.now_ms = self.now.duration_since(self.epoch).as_millis() as u64;
    }
}

pub struct Worker {
    poll: Poll,
    listener: TcpListener,
    admin: Option<TcpListener>,
    accepting: bool,
    conns: Slab<Conn>,
    scratch: Vec<u8>,
    cmds: Receiver<LoopCmd>,
    next_generation: u32,
    pending: Vec<usize>,
    expired: Vec<(u32, u32)>,
    /// Set when draining: the moment the loop stops waiting for clients.
    drain_deadline: Option<Instant>,
    /// Accepting failed for lack of file descriptors; try again at this time.
    accept_retry: Option<Instant>,
    cx: Ctx,
}

impl Worker {
    /// Builds a loop around its listener. Returns the waker the backplane uses to wake it.
    pub fn new(
        id: u16,
        listener: std::net::TcpListener,
        admin: Option<std::net::TcpListener>,
        cmds: Receiver<LoopCmd>,
        shared: Shared,
    ) -> io::Result<(Self, Arc<Waker>)> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let admin = match admin {
            Some(l) => {
                let mut l = TcpListener::from_std(l);
                poll.registry()
                    .register(&mut l, ADMIN, Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let now = Instant::now();
        let cx = Ctx {
            id,
            shared,
            wheel: TimerWheel::new(TIMER_TICK, TIMER_SLOTS, now),
            epoch: now,
            now,
            now_ms: 0,
            registry: poll.registry().try_clone()?,
            deferred: VecDeque::new(),
        };
        Ok((
            Worker {
                poll,
                listener,
                admin,
                accepting: true,
                conns: Slab::new(),
                scratch: vec![0; SCRATCH_BYTES],
                cmds,
                next_generation: 1,
                pending: Vec::new(),
                expired: Vec::new(),
                drain_deadline: None,
                accept_retry: None,
                cx,
            },
            waker,
        ))
    }

    /// Runs until drained after a `Shutdown` command.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(worker = self.cx.id, error = %e, "poll failed");
                return;
            }
            self.cx.tick();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    ADMIN => self.accept_admin(),
                    WAKER => self.commands(),
                    Token(i) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.readable(i, ev.is_read_closed() || ev.is_error());
                        }
                        if ev.is_writable() {
                            self.flush(i);
                        }
                    }
                }
            }
            // The waker may have been eaten by a full batch; commands are cheap to check.
            if !self.cmds.is_empty() {
                self.commands();
            }
            for i in std::mem::take(&mut self.pending) {
                self.readable(i, true);
            }
            self.timers();
            self.retry_deferred();
            if self.accept_retry.is_some_and(|t| t <= self.cx.now) {
                self.accept_retry = None;
                self.accept();
            }
            if let Some(deadline) = self.drain_deadline
                && (self.conns.is_empty() || self.cx.now >= deadline)
            {
                tracing::debug!(worker = self.cx.id, left = self.conns.len(), "loop drained");
                return;
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.pending.is_empty() || !self.cx.deferred.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut t = self
            .cx
            .wheel
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        for extra in [self.accept_retry, self.drain_deadline]
            .into_iter()
            .flatten()
        {
            let d = extra.saturating_duration_since(now);
            t = Some(t.map_or(d, |t| t.min(d)));
        }
        t
    }

    fn me(&self, index: usize) -> ConnRef {
        ConnRef {
            worker: self.cx.id,
            index: index as u32,
            generation: self.conns[index].generation,
        }
    }

    /// Internal connections (`/api/*`, `/metrics`): few, from the operator's network; past the loop's
    /// connection limit they are dropped at once rather than queued.
    fn accept_admin(&mut self) {
        loop {
            let Some(l) = self.admin.as_ref() else {
                return;
            };
            match l.accept() {
                Ok((socket, _)) => {
                    if self.conns.len() >= self.cx.shared.cfg.limits.max_connections_per_loop {
                        continue; // dropped: closed
                    }
                    let _ = self.adopt(socket, true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn accept(&mut self) {
        while self.accepting {
            if self.conns.len() >= self.cx.shared.cfg.limits.max_connections_per_loop {
                // Full: leave the rest in the kernel backlog until a connection closes.
                let _ = self.cx.registry.deregister(&mut self.listener);
                self.accepting = false;
                tracing::warn!(
                    worker = self.cx.id,
                    "connection limit reached; accepting paused"
                );
                return;
            }
            match self.listener.accept() {
                Ok((socket, peer)) => {
                    #[cfg(debug_assertions)]
                    if std::env::var_os("CORELAY_FAILPOINT_LOOP_PANIC").is_some() {
                        // Debug builds only: the fault suite's way to make a loop die.
                        panic!("failpoint: loop {} panics on accept", self.cx.id);
                    }
                    let key = if self.cx.shared.cfg.proxy_protocol {
                        0
                    } else {
                        tracing::debug!(worker = self.cx.id, client = %peer, "accepted");
                        match self.cx.shared.per_address.admit(peer.ip()) {
                            Some(k) => k,
                            None => {
                                // Dropped at once (closed): the address holds its share already.
                                tracing::debug!(worker = self.cx.id, client = %peer, "per-address cap");
                                self.cx.metrics().addr_refused.fetch_add(1, Relaxed);
                                continue;
                            }
                        }
                    };
                    match self.adopt(socket, false) {
                        Some(i) => self.conns[i].addr_key = key,
                        None => self.cx.shared.per_address.release(key),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning on a readable listener.
                    tracing::warn!(worker = self.cx.id, error = %e, "accept failed; retrying in 100ms");
                    self.accept_retry = Some(self.cx.now + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    /// Puts an accepted socket in the slab with its handshake deadline; its slot, or None when it could not
    /// be registered (it is closed).
    fn adopt(&mut self, mut socket: mio::net::TcpStream, admin: bool) -> Option<usize> {
        let _ = socket.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let index = entry.key();
        if let Err(e) = self
            .cx
            .registry
            .register(&mut socket, Token(index), Interest::READABLE)
        {
            tracing::warn!(worker = self.cx.id, error = %e, "register failed");
            return None;
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let proxied = self.cx.shared.cfg.proxy_protocol && !admin;
        let conn = entry.insert(Conn::new(
            socket,
            generation,
            self.cx.now_ms,
            proxied,
            admin,
        ));
        let me = ConnRef {
            worker: self.cx.id,
            index: index as u32,
            generation,
        };
        let at = self.cx.now_ms + self.cx.shared.cfg.handshake_timeout.as_millis() as u64;
        self.cx.schedule(conn, me, at);
        let m = self.cx.metrics();
        m.accepted.fetch_add(1, Relaxed);
        m.conn_opened(Transport::Http);
        // Edge-triggered: bytes may already be waiting (client sent its request at once).
        self.pending.push(index);
        Some(index)
    }

    /// Reads and processes input. `drain`: read until `WouldBlock` (the peer may have half-closed, or this
    /// is a revisit); otherwise a short read ends the turn, saving the read() that would return `WouldBlock`
    /// (epoll reports a new edge for anything that arrives after our read).
    fn readable(&mut self, i: usize, drain: bool) {
        let mut reads = 0;
        loop {
            let Some(conn) = self.conns.get_mut(i) else {
                return;
            };
            if matches!(conn.mode, Mode::HttpAwait { .. }) && !conn.close_after_flush {
                // Not reading while the backplane answers; `Respond` re-queues this connection.
                break;
            }
            if let Mode::WebSocket(ws) = &conn.mode
                && ws.paused
            {
                // Rate limited: the socket stays unread until the resume timer (see `pause`).
                break;
            }
            if reads == READS_PER_WAKE {
                self.pending.push(i);
                break;
            }
            reads += 1;
            match conn.socket.read(&mut self.scratch) {
                Ok(0) => {
                    self.close(i);
                    return;
                }
                Ok(n) => {
                    self.cx.metrics().bytes_in.fetch_add(n as u64, Relaxed);
                    conn.last_rx_ms = self.cx.now_ms;
                    let me = ConnRef {
                        worker: self.cx.id,
                        index: i as u32,
                        generation: conn.generation,
                    };
                    let flow = if conn.is_websocket() && conn.inbuf.is_empty() {
                        conn::ws::on_data(conn, &mut self.scratch[..n], &mut self.cx, me)
                    } else {
                        conn::http::on_data(conn, &self.scratch[..n], &mut self.cx, me)
                    };
                    if flow == Flow::Close {
                        self.close(i);
                        return;
                    }
                    self.pause_if_limited(i);
                    if self.conns[i].out.len() > self.cx.shared.cfg.limits.max_write_queue_bytes {
                        self.slow_consumer(i);
                    }
                    if n < self.scratch.len() && !drain {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(worker = self.cx.id, conn = i, error = %e, "read failed");
                    self.close(i);
                    return;
                }
            }
        }
        self.flush(i);
    }

    /// Writes what is queued; manages WRITABLE interest; finishes closes.
    fn flush(&mut self, i: usize) {
        let Some(conn) = self.conns.get_mut(i) else {
            return;
        };
        if !conn.out.is_empty() {
            match conn.out.write_to(&mut conn.socket) {
                Ok(n) => {
                    self.cx.metrics().bytes_out.fetch_add(n as u64, Relaxed);
                }
                Err(e) => {
                    tracing::debug!(worker = self.cx.id, conn = i, error = %e, "write failed");
                    self.close(i);
                    return;
                }
            }
        }
        let conn = &mut self.conns[i];
        if !conn.out.is_empty() {
            if !conn.want_write {
                conn.want_write = true;
                let _ = self.cx.registry.reregister(
                    &mut conn.socket,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                );
            }
            return;
        }
        if conn.want_write {
            conn.want_write = false;
            let _ = self
                .cx
                .registry
                .reregister(&mut conn.socket, Token(i), Interest::READABLE);
        }
        if conn.close_after_flush {
            self.close(i);
            return;
        }
        if let Mode::WebSocket(ws) = &conn.mode
            && conn::ws::closing(ws)
            && !conn.write_shut
        {
            // Our close frame is out: half-close and wait (bounded) for the peer's close reply and FIN.
            conn.write_shut = true;
            let _ = conn.socket.shutdown(Shutdown::Write);
            let me = ConnRef {
                worker: self.cx.id,
                index: i as u32,
                generation: conn.generation,
            };
            let at = self.cx.now_ms + CLOSE_LINGER.as_millis() as u64;
            self.cx.schedule(conn, me, at);
        }
    }

    fn slow_consumer(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        tracing::debug!(
            worker = self.cx.id,
            conn = i,
            queued = conn.out.len(),
            "slow consumer cut"
        );
        self.cx.metrics().slow_consumers.fetch_add(1, Relaxed);
        conn.out.clear();
        if conn.is_websocket() {
            conn::ws::start_close(
                conn,
                CloseCode::TRY_AGAIN,
                "slow consumer: resume from your cursor",
                &self.cx,
            );
        } else {
            conn.close_after_flush = true;
        }
    }

    fn close(&mut self, i: usize) {
        if !self.conns.contains(i) {
            return;
        }
        let mut conn = self.conns.remove(i);
        self.cx.shared.per_address.release(conn.addr_key);
        self.cx.cancel(conn.timer.take());
        let _ = self.cx.registry.deregister(&mut conn.socket);
        let me = ConnRef {
            worker: self.cx.id,
            index: i as u32,
            generation: conn.generation,
        };
        let (transport, closed_user, registered) = match &conn.mode {
            Mode::WebSocket(ws) => {
                if !conn::ws::closing(ws) && !conn.close_after_flush {
                    // The TCP connection ended without a close handshake.
                    self.cx.metrics().close(1006);
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
            self.cx.to_backplane(Event::Closed {
                conn: me,
                user: closed_user,
            });
        }
        self.cx.metrics().conn_closed(transport);
        if !self.accepting && self.drain_deadline.is_none() {
            self.accepting = true;
            if self
                .cx
                .registry
                .register(&mut self.listener, LISTENER, Interest::READABLE)
                .is_ok()
            {
                self.accept();
            }
        }
    }

    fn commands(&mut self) {
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                LoopCmd::Deliver { conns, delivery } => {
                    for (index, generation) in conns {
                        self.deliver(index as usize, generation, &delivery);
                    }
                }
                LoopCmd::Frame { conns, frame } => {
                    for (index, generation) in conns {
                        let i = index as usize;
                        let Some(conn) = self.conns.get_mut(i) else {
                            continue;
                        };
                        if conn.generation != generation {
                            continue;
                        }
                        let Mode::WebSocket(ws) = &conn.mode else {
                            continue;
                        };
                        if conn::ws::closing(ws) || conn.close_after_flush {
                            continue;
                        }
                        conn.out.push(frame.clone());
                        self.cx.metrics().frames_out.fetch_add(1, Relaxed);
                        self.after_push(i);
                    }
                }
                LoopCmd::Respond {
                    index,
                    generation,
                    status,
                    body,
                } => {
                    let i = index as usize;
                    let Some(me) = self.live(i, generation) else {
                        continue;
                    };
                    conn::http::on_response(&mut self.conns[i], status, &body, &mut self.cx, me);
                    self.resume_input(i);
                }
                LoopCmd::Refresh {
                    index,
                    generation,
                    exp,
                } => {
                    let i = index as usize;
                    let Some(me) = self.live(i, generation) else {
                        continue;
                    };
                    let now_ms = self.cx.now_ms;
                    let at = now_ms + self.cx.shared.cfg.heartbeat_interval.as_millis() as u64;
                    let conn = &mut self.conns[i];
                    if let Mode::Sse(s) = &mut conn.mode {
                        s.expires_ms = crate::auth::expiry_ms(exp, now_ms);
                        let at = conn::until_expiry(at, s.expires_ms);
                        self.cx.schedule(conn, me, at);
                    }
                }
                LoopCmd::Close {
                    index,
                    generation,
                    code,
                    reason,
                } => {
                    let i = index as usize;
                    if self.live(i, generation).is_none() {
                        continue;
                    }
                    let conn = &mut self.conns[i];
                    if conn.is_websocket() {
                        conn::ws::start_close(conn, CloseCode(code), reason, &self.cx);
                    } else {
                        conn.close_after_flush = true;
                    }
                    self.flush(i);
                }
                LoopCmd::StreamStart {
                    index,
                    generation,
                    cursor,
                } => {
                    let i = index as usize;
                    let Some(me) = self.live(i, generation) else {
                        continue;
                    };
                    conn::http::on_stream_start(&mut self.conns[i], cursor, &mut self.cx, me);
                    self.flush(i);
                }
                LoopCmd::PollHold {
                    index,
                    generation,
                    cursor,
                    hold_ms,
                } => {
                    let i = index as usize;
                    let Some(me) = self.live(i, generation) else {
                        continue;
                    };
                    conn::http::on_poll_hold(&mut self.conns[i], cursor, hold_ms, &mut self.cx, me);
                }
                LoopCmd::Shutdown => self.drain(),
            }
        }
    }

    /// The connection at `i` if it is still the one the command was meant for.
    fn live(&self, i: usize, generation: u32) -> Option<ConnRef> {
        let c = self.conns.get(i)?;
        (c.generation == generation).then_some(ConnRef {
            worker: self.cx.id,
            index: i as u32,
            generation,
        })
    }

    /// After an answer: write it, then read what the client sent meanwhile (pipelined requests are parsed from
    /// `inbuf` now; unread socket data on the next turn).
    fn resume_input(&mut self, i: usize) {
        self.flush(i);
        if !self.conns.contains(i) {
            return;
        }
        self.pending.push(i);
        if !self.conns[i].inbuf.is_empty() && matches!(self.conns[i].mode, Mode::Http { .. }) {
            let me = self.me(i);
            if conn::http::on_data(&mut self.conns[i], &[], &mut self.cx, me) == Flow::Close {
                self.close(i);
            }
        }
    }

    /// Enforces the write-queue cap after output was queued, then writes.
    fn after_push(&mut self, i: usize) {
        if self.conns[i].out.len() > self.cx.shared.cfg.limits.max_write_queue_bytes {
            self.slow_consumer(i);
        }
        self.flush(i);
    }

    /// One channel message to one connection, in its transport's encoding.
    fn deliver(&mut self, i: usize, generation: u32, d: &Arc<crate::backplane::Delivery>) {
        let Some(me) = self.live(i, generation) else {
            return;
        };
        let conn = &mut self.conns[i];
        if conn.close_after_flush {
            return;
        }
        match &mut conn.mode {
            Mode::WebSocket(ws) if !conn::ws::closing(ws) => {
                conn.out.push(d.ws.clone());
                self.cx.metrics().frames_out.fetch_add(1, Relaxed);
            }
            Mode::Sse(s) => {
                if !conn::advance(&mut s.cursor, &d.channel, d.offset) {
                    return; // already seen (a replay overlapping live traffic)
                }
                conn.out.push(d.sse().clone());
                let mut tail = Vec::with_capacity(16 + 24 * s.cursor.len());
                corelay_proto::sse::encode_tail(&conn::cursor_text(&s.cursor), &mut tail);
                conn.out.push_vec(tail);
            }
            Mode::PollHeld(p) => {
                if !conn::advance(&mut p.cursor, &d.channel, d.offset) {
                    return;
                }
                let body = crate::backplane::router::poll_body(std::slice::from_ref(d), &p.cursor);
                conn::http::finish_poll(conn, Some(body), &mut self.cx, me);
                self.resume_input(i);
                return;
            }
            _ => return,
        }
        self.after_push(i);
    }

    fn drain(&mut self) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(self.cx.now + self.cx.shared.cfg.drain_timeout);
        if self.accepting {
            let _ = self.cx.registry.deregister(&mut self.listener);
            self.accepting = false;
        }
        let ids: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for i in ids {
            let conn = &mut self.conns[i];
            match &conn.mode {
                Mode::WebSocket(_) => conn::ws::start_close(
                    conn,
                    CloseCode::GOING_AWAY,
                    "server shutting down",
                    &self.cx,
                ),
                Mode::HttpAwait { .. }
                | Mode::HttpBody { .. }
                | Mode::Sse(_)
                | Mode::PollHeld(_) => conn.close_after_flush = true,
                Mode::Proxy => {
                    self.close(i);
                    continue;
                }
                Mode::Http { .. } if conn.out.is_empty() => {
                    self.close(i);
                    continue;
                }
                Mode::Http { .. } => conn.close_after_flush = true,
            }
            self.flush(i);
        }
    }

    fn timers(&mut self) {
        self.cx.wheel.poll_expired(self.cx.now, &mut self.expired);
        let mut expired = std::mem::take(&mut self.expired);
        for (index, generation) in expired.drain(..) {
            let i = index as usize;
            match self.conns.get_mut(i) {
                Some(c) if c.generation == generation => c.timer = None,
                _ => continue,
            }
            self.on_timer(i);
        }
        self.expired = expired;
    }

    fn on_timer(&mut self, i: usize) {
        let me = self.me(i);
        let now_ms = self.cx.now_ms;
        let cfg = self.cx.shared.cfg.clone();
        let conn = &mut self.conns[i];
        match &mut conn.mode {
            Mode::Proxy => {
                tracing::debug!(worker = self.cx.id, conn = i, "no PROXY header in time");
                self.close(i);
            }
            Mode::Http { served: 0 } | Mode::HttpBody { .. } => {
                // Slowloris: the request (head or body) did not arrive in time.
                tracing::debug!(worker = self.cx.id, conn = i, "request timeout");
                conn::http::fail(
                    conn,
                    &self.cx,
                    corelay_proto::http1::HttpError::new(408, "request not received in time"),
                    &[],
                );
                self.flush(i);
            }
            Mode::HttpAwait { .. } => {
                // The backplane has not answered within the request's deadline (a saturated or stalled
                // node): say so instead of closing without a response.
                tracing::debug!(worker = self.cx.id, conn = i, "no answer in time");
                conn::http::fail(
                    conn,
                    &self.cx,
                    corelay_proto::http1::HttpError::new(504, "no answer in time; retry"),
                    &["Retry-After: 1"],
                );
                self.flush(i);
            }
            Mode::Http { .. } => self.close(i),
            Mode::Sse(s) => {
                if s.expires_ms != 0 && now_ms >= s.expires_ms {
                    // The token expired: end the stream with a last event that says why; the client
                    // reconnects with a fresh token and `Last-Event-ID`.
                    let e = corelay_proto::msg::error(
                        "token_expired",
                        "reconnect with a fresh token",
                        None,
                    );
                    let mut v = Vec::with_capacity(e.len() + 24);
                    corelay_proto::sse::encode_body("error", e.as_bytes(), &mut v);
                    v.push(b'\n'); // no `id:`: the client's Last-Event-ID stays where it was
                    conn.out.push_vec(v);
                    conn.close_after_flush = true;
                    self.flush(i);
                    return;
                }
                conn.out
                    .push(bytes::Bytes::from_static(corelay_proto::sse::KEEPALIVE));
                let at = now_ms + cfg.heartbeat_interval.as_millis() as u64;
                let at = conn::until_expiry(at, s.expires_ms);
                self.cx.schedule(conn, me, at);
                self.flush(i);
            }
            Mode::PollHeld(_) => {
                conn::http::finish_poll(conn, None, &mut self.cx, me);
                self.resume_input(i);
            }
            Mode::WebSocket(ws) => {
                if conn::ws::closing(ws) || conn.close_after_flush {
                    self.close(i);
                    return;
                }
                if ws.expires_ms != 0 && now_ms >= ws.expires_ms {
                    conn::ws::start_close(
                        conn,
                        CloseCode::TOKEN_EXPIRED,
                        "token expired",
                        &self.cx,
                    );
                    self.flush(i);
                    return;
                }
                if ws.paused {
                    self.unpause(i);
                    return;
                }
                let interval = cfg.heartbeat_interval.as_millis() as u64;
                let timeout = cfg.heartbeat_timeout.as_millis() as u64;
                if ws.ping_sent_ms != 0 {
                    if conn.last_rx_ms > ws.ping_sent_ms {
                        // Something arrived since the ping: alive.
                        ws.ping_sent_ms = 0;
                        let at = conn::until_expiry(conn.last_rx_ms + interval, ws.expires_ms);
                        self.cx.schedule(conn, me, at.max(now_ms + 1));
                    } else {
                        tracing::debug!(worker = self.cx.id, conn = i, "heartbeat timeout");
                        self.cx.metrics().heartbeat_timeouts.fetch_add(1, Relaxed);
                        self.cx.metrics().close(CloseCode::GOING_AWAY.0);
                        if let Mode::WebSocket(ws) = &mut self.conns[i].mode {
                            ws.close_sent = true; // not a 1006 in the counters: we chose to end it
                        }
                        self.close(i);
                    }
                } else if now_ms.saturating_sub(conn.last_rx_ms) >= interval {
                    let mut v = Vec::with_capacity(2);
                    corelay_proto::ws::encode_frame(
                        corelay_proto::ws::Opcode::Ping,
                        true,
                        &[],
                        &mut v,
                    );
                    conn.out.push_vec(v);
                    self.cx.metrics().frames_out.fetch_add(1, Relaxed);
                    ws.ping_sent_ms = now_ms.max(1);
                    let at = conn::until_expiry(now_ms + timeout, ws.expires_ms);
                    self.cx.schedule(conn, me, at.max(now_ms + 1));
                    self.flush(i);
                } else {
                    let at = conn::until_expiry(conn.last_rx_ms + interval, ws.expires_ms);
                    self.cx.schedule(conn, me, at.max(now_ms + 1));
                }
            }
        }
    }

    /// A WebSocket whose rate limit just paused its input gets its (only) timer set to the moment the bucket
    /// has a token again; [`Worker::unpause`] then restores the heartbeat timer.
    fn pause_if_limited(&mut self, i: usize) {
        let me = self.me(i);
        let rate = self.cx.shared.cfg.limits.client_rate;
        let conn = &mut self.conns[i];
        if let Mode::WebSocket(ws) = &conn.mode
            && ws.paused
        {
            let at = self.cx.now_ms + ws.bucket.wait_ms(rate);
            self.cx.schedule(conn, me, at);
        }
    }

    /// The resume timer of a rate-limited WebSocket: decode what was held back, then read the socket again.
    fn unpause(&mut self, i: usize) {
        let me = self.me(i);
        let cfg = self.cx.shared.cfg.clone();
        let conn = &mut self.conns[i];
        let Mode::WebSocket(ws) = &mut conn.mode else {
            return;
        };
        ws.paused = false;
        // Back to the heartbeat schedule (a ping may be outstanding).
        let at = if ws.ping_sent_ms != 0 {
            ws.ping_sent_ms + cfg.heartbeat_timeout.as_millis() as u64
        } else {
            conn.last_rx_ms + cfg.heartbeat_interval.as_millis() as u64
        };
        let at = conn::until_expiry(at, ws.expires_ms);
        self.cx.schedule(conn, me, at.max(self.cx.now_ms + 1));
        let mut held = std::mem::take(&mut conn.inbuf);
        if !held.is_empty() && conn::ws::on_data(conn, &mut held, &mut self.cx, me) == Flow::Close {
            self.close(i);
            return;
        }
        self.pause_if_limited(i);
        // Edge-triggered: whatever arrived meanwhile raised no new edge, so read until `WouldBlock`.
        self.pending.push(i);
        self.after_push(i);
    }

    fn retry_deferred(&mut self) {
        while let Some(ev) = self.cx.deferred.pop_front() {
            if let Err(ev) = self.cx.shared.backplane.try_send(ev) {
                self.cx.deferred.push_front(ev);
                break;
            }
        }
    }
}
