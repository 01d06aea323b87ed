//! One event loop: a `mio::Poll` (pinned to a core when `--pin` says so), its own `SO_REUSEPORT` listener, a
//! `Slab` of connections, a timer wheel, and one scratch read buffer shared by all its connections.
//!
//! mio on Linux is edge-triggered: every readable socket is read until `WouldBlock`, except that one
//! connection gets at most [`READS_PER_WAKE`] reads per wake; a connection that still has input is put on the
//! `pending` list and revisited before the next (zero-timeout) poll, so one busy client cannot starve the rest.
//! Likewise a fan-out command is worked through [`FANOUT_CHUNK`] connections per turn.
//!
//! Longer than 600 lines: the loop's whole turn (poll, accept with its rate and per-address limits, commands
//! and fan-out chunks, drains, timers) in one place; the socket I/O is in `sockets.rs`, TLS in `tls.rs`.

pub mod listener;
pub mod per_address;
pub mod pinning;
mod sockets;
pub mod tls;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;

use crate::auth::Verifier;
use crate::backplane::{BackplaneHandle, Event, LoopCmd};
use crate::bucket::Bucket;
use crate::config::Config;
use crate::conn::{Conn, ConnId, LoopId};
use crate::metrics::{LoopMetrics, Metrics};
use crate::timer::{TimerKey, TimerWheel};
use sockets::LoopEnv;

const LISTENER: Token = Token(usize::MAX - 1);
/// The internal admin listener (`--admin-listen`), on loop 0 only.
const ADMIN: Token = Token(usize::MAX - 3);
const WAKER: Token = Token(usize::MAX - 2);
/// The TLS listener (`--tls-listen`), one per loop like the plain one.
const TLS_LISTENER: Token = Token(usize::MAX - 4);
/// Reads per connection per wake before it yields to the others.
pub const READS_PER_WAKE: usize = 16;
/// The scratch buffer every read goes through (one per loop, not per connection).
pub const SCRATCH_BYTES: usize = 64 * 1024;
const TIMER_TICK: Duration = Duration::from_millis(10);
/// At most this many connections get a fan-out's message per turn of the loop. A delivery to all of a loop's
/// 7,500 subscribers is about 60 ms of writes, and the loop read nothing meanwhile: a publisher's next message,
/// a client's request, a pong waited behind it. Between chunks the loop polls its sockets without waiting;
/// later commands wait in the channel until the fan-out is done, so every connection still gets its commands
/// in order.
const FANOUT_CHUNK: usize = 512;
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
    /// Certificate and rustls configuration for the TLS listener (`--tls-listen`); reloaded on SIGHUP.
    pub tls: Option<Arc<tls::TlsSetup>>,
}

/// One slab entry: the loop's side of a connection (its socket, its timer, its registration) beside the
/// connection's own state.
struct Slot {
    socket: TcpStream,
    timer: Option<TimerKey>,
    /// WRITABLE interest is registered (only while output is pending).
    want_write: bool,
    /// The per-address count this connection holds (`per_address`; 0 = none).
    addr_key: u32,
    /// Accepted on the TLS listener: its session is in `Worker::sessions` (kept out of the slot, so that a
    /// plain connection pays nothing for TLS; this flag sits in padding).
    tls: bool,
    conn: Conn,
}

/// What the accept rate says about the next connection.
enum Admit {
    Now,
    Later,
    Refuse,
}

/// One loop's share of `--accept-rate`.
fn accept_share(cfg: &Config) -> u32 {
    (cfg.accept_rate / cfg.threads.max(1) as u32).max(1)
}

/// A drain's pace: `total` long-lived connections closed evenly over `over`.
struct Spread {
    queue: VecDeque<ConnId>,
    total: usize,
    started: Instant,
    over: Duration,
}

impl Spread {
    /// How many should be closed by `now`.
    fn due(&self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.started);
        if self.over.is_zero() || elapsed >= self.over {
            return self.total;
        }
        // At least one per turn from the start, so that a small drain is not held back by rounding.
        let share = elapsed.as_secs_f64() / self.over.as_secs_f64();
        ((self.total as f64 * share).ceil() as usize).clamp(1, self.total)
    }
}

pub struct Worker {
    id: LoopId,
    shared: Shared,
    poll: Poll,
    registry: Registry,
    listener: TcpListener,
    tls_listener: Option<TcpListener>,
    admin: Option<TcpListener>,
    accepting: bool,
    conns: Slab<Slot>,
    scratch: Vec<u8>,
    /// TLS connections' plaintext: decrypted records handed to a connection, queued frames gathered into a
    /// record. One per loop, allocated when the loop has a TLS listener.
    plain: Vec<u8>,
    /// The TLS sessions of this loop's TLS connections, by slot index (8 bytes per slot on a loop that has
    /// TLS connections; a map would cost about twice that).
    sessions: Vec<Option<Box<tls::TlsSession>>>,
    cmds: Receiver<LoopCmd>,
    next_generation: u32,
    pending: Vec<usize>,
    wheel: TimerWheel<ConnId>,
    expired: Vec<ConnId>,
    epoch: Instant,
    now: Instant,
    /// Milliseconds since this loop started (timer arithmetic without 16-byte `Instant`s per connection).
    now_ms: u64,
    /// Events the backplane queue had no room for that must not be lost (opens and closes); retried.
    deferred: VecDeque<Event>,
    /// Set when draining: the moment the loop stops waiting for clients.
    drain_deadline: Option<Instant>,
    /// A drain's long-lived connections still to close, and its pace.
    spread: Option<Spread>,
    /// Accepting failed for lack of file descriptors, or waits for the accept rate; try again at this time.
    accept_retry: Option<Instant>,
    /// The accept rate's tokens (`--accept-rate`, this loop's share).
    accept_bucket: Bucket,
    /// Since when new connections have been waiting for the accept rate (None: not throttled).
    throttled_since: Option<Instant>,
    /// A fan-out command being worked through, [`FANOUT_CHUNK`] connections per turn.
    backlog: Option<Backlog>,
}

/// A fan-out command partly done: the connections from `next` on still get `what`.
struct Backlog {
    conns: Vec<(u32, u32)>,
    next: usize,
    what: Fanout,
}

enum Fanout {
    Message(Arc<crate::backplane::Delivery>),
    Frame(bytes::Bytes),
}

/// The connection environment over the loop's fields (a macro, so the borrow stays field by field).
macro_rules! env {
    ($w:ident) => {
        LoopEnv {
            id: $w.id,
            shared: &$w.shared,
            deferred: &mut $w.deferred,
        }
    };
}
use env;

impl Worker {
    /// Builds a loop around its listener. Returns the waker the backplane uses to wake it.
    pub fn new(
        id: u16,
        listener: std::net::TcpListener,
        tls_listener: Option<std::net::TcpListener>,
        admin: Option<std::net::TcpListener>,
        cmds: Receiver<LoopCmd>,
        shared: Shared,
    ) -> io::Result<(Self, Arc<Waker>)> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let tls_listener = match tls_listener {
            Some(l) => {
                let mut l = TcpListener::from_std(l);
                poll.registry()
                    .register(&mut l, TLS_LISTENER, Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
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
        let share = accept_share(&shared.cfg);
        Ok((
            Worker {
                id: LoopId(id),
                shared,
                registry: poll.registry().try_clone()?,
                poll,
                listener,
                plain: if tls_listener.is_some() {
                    vec![0; tls::RECORD]
                } else {
                    Vec::new()
                },
                tls_listener,
                sessions: Vec::new(),
                admin,
                accepting: true,
                conns: Slab::new(),
                scratch: vec![0; SCRATCH_BYTES],
                cmds,
                next_generation: 1,
                pending: Vec::new(),
                wheel: TimerWheel::new(TIMER_TICK, TIMER_SLOTS, now),
                expired: Vec::new(),
                epoch: now,
                now,
                now_ms: 0,
                deferred: VecDeque::new(),
                drain_deadline: None,
                spread: None,
                accept_retry: None,
                accept_bucket: Bucket::full(share, 0),
                throttled_since: None,
                backlog: None,
            },
            waker,
        ))
    }

    fn metrics(&self) -> &LoopMetrics {
        &self.shared.metrics.loops[self.id.0 as usize]
    }

    fn tick(&mut self) {
        self.now = Instant::now();
        self.now_ms = self.now.duration_since(self.epoch).as_millis() as u64;
    }

    /// Runs until drained after a `Shutdown` command.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(worker = self.id.0, error = %e, "poll failed");
                return;
            }
            self.tick();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(false),
                    TLS_LISTENER => self.accept(true),
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
            if self.backlog.is_some() || !self.cmds.is_empty() {
                self.commands();
            }
            for i in std::mem::take(&mut self.pending) {
                self.readable(i, true);
            }
            self.timers();
            self.retry_deferred();
            if self.accept_retry.is_some_and(|t| t <= self.now) {
                self.accept_retry = None;
                self.accept(false);
                self.accept(true);
            }
            self.drain_step();
            if let Some(deadline) = self.drain_deadline
                && (self.conns.is_empty() || self.now >= deadline)
            {
                tracing::debug!(worker = self.id.0, left = self.conns.len(), "loop drained");
                return;
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.pending.is_empty() || !self.deferred.is_empty() || self.backlog.is_some() {
            return Some(Duration::ZERO);
        }
        if self.spread.is_some() {
            return Some(TIMER_TICK);
        }
        let now = Instant::now();
        let mut t = self
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

    /// Internal connections (`/api/*`, `/metrics`): few, from the operator's network; past the loop's
    /// connection limit they are dropped at once rather than queued.
    fn accept_admin(&mut self) {
        loop {
            let Some(l) = self.admin.as_ref() else {
                return;
            };
            match l.accept() {
                Ok((socket, _)) => {
                    if self.conns.len() >= self.shared.cfg.limits.max_connections_per_loop {
                        continue; // dropped: closed
                    }
                    let _ = self.adopt(socket, true, 0, None, false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    /// Stops accepting on both listeners (the loop is full, or draining).
    fn pause_accepting(&mut self) {
        let _ = self.registry.deregister(&mut self.listener);
        if let Some(l) = self.tls_listener.as_mut() {
            let _ = self.registry.deregister(l);
        }
        self.accepting = false;
    }

    /// Accepts again after a connection closed under the limit.
    fn resume_accepting(&mut self) {
        self.accepting = true;
        let plain = self
            .registry
            .register(&mut self.listener, LISTENER, Interest::READABLE)
            .is_ok();
        let tls = match self.tls_listener.as_mut() {
            Some(l) => self
                .registry
                .register(l, TLS_LISTENER, Interest::READABLE)
                .is_ok(),
            None => false,
        };
        if plain {
            self.accept(false);
        }
        if tls {
            self.accept(true);
        }
    }

    /// The accept rate (`--accept-rate`, this loop's share, a second's worth at once): a token, or wait (the
    /// connection stays in the kernel backlog; `accept_retry` comes back for it), or, once the backlog has
    /// not been empty for `--accept-queue` (`throttled_since`, cleared when an accept finds it empty), refuse
    /// what waits in it.
    fn admit(&mut self) -> Admit {
        let cfg = &self.shared.cfg;
        let rate = accept_share(cfg);
        // Only looked at here: the token is spent once a connection is really taken (`accept` may find the
        // backlog empty, and a token spent on that was a connection refused later).
        if self.accept_bucket.ready(self.now_ms, rate, rate) {
            return Admit::Now;
        }
        let since = *self.throttled_since.get_or_insert(self.now);
        let waited = self.now.saturating_duration_since(since);
        if waited >= cfg.accept_queue {
            return Admit::Refuse;
        }
        let next = Duration::from_millis(self.accept_bucket.wait_ms(rate));
        let at = self.now + next.min(cfg.accept_queue - waited);
        self.accept_retry = Some(self.accept_retry.map_or(at, |t| t.min(at)));
        Admit::Later
    }

    /// Accepts what waits on the plain listener, or on the TLS one.
    fn accept(&mut self, tls: bool) {
        if tls && self.tls_listener.is_none() {
            return;
        }
        while self.accepting {
            if self.conns.len() >= self.shared.cfg.limits.max_connections_per_loop {
                // Full: leave the rest in the kernel backlog until a connection closes.
                self.pause_accepting();
                tracing::warn!(
                    worker = self.id.0,
                    "connection limit reached; accepting paused"
                );
                return;
            }
            let refuse = match self.admit() {
                Admit::Now => false,
                Admit::Later => return,
                Admit::Refuse => true,
            };
            let listener = match (tls, self.tls_listener.as_ref()) {
                (true, Some(l)) => l,
                _ => &self.listener,
            };
            match listener.accept() {
                Ok((socket, peer)) if refuse => {
                    self.metrics().accept_refused.fetch_add(1, Relaxed);
                    if tls {
                        // Closed before the handshake: its cost is what the limit saves.
                        tracing::debug!(worker = self.id.0, client = %peer, "accept rate: closed");
                        drop(socket);
                    } else {
                        // Its first request is answered 503 + Retry-After.
                        self.adopt(socket, false, 0, None, true);
                    }
                }
                Ok((socket, peer)) => {
                    self.accept_bucket.spend();
                    #[cfg(debug_assertions)]
                    if std::env::var_os("CORELAY_FAILPOINT_LOOP_PANIC").is_some() {
                        // Debug builds only: the fault suite's way to make a loop die.
                        panic!("failpoint: loop {} panics on accept", self.id);
                    }
                    let key = if self.shared.cfg.proxy_protocol {
                        0
                    } else {
                        tracing::debug!(worker = self.id.0, client = %peer, "accepted");
                        match self.shared.per_address.admit(peer.ip()) {
                            Some(k) => k,
                            None => {
                                // Dropped at once (closed): the address holds its share already.
                                tracing::debug!(worker = self.id.0, client = %peer, "per-address cap");
                                self.metrics().addr_refused.fetch_add(1, Relaxed);
                                continue;
                            }
                        }
                    };
                    let session = match (tls, self.shared.tls.as_ref()) {
                        (true, Some(setup)) => {
                            match tls::TlsSession::new(
                                setup.config(),
                                self.shared.cfg.proxy_protocol,
                            ) {
                                Ok(s) => Some(s),
                                Err(e) => {
                                    tracing::warn!(worker = self.id.0, error = %e, "TLS session");
                                    self.shared.per_address.release(key);
                                    continue;
                                }
                            }
                        }
                        _ => None,
                    };
                    if !self.adopt(socket, false, key, session, false) {
                        self.shared.per_address.release(key);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The backlog is empty: nobody waits for the accept rate.
                    self.throttled_since = None;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning on a readable listener.
                    tracing::warn!(worker = self.id.0, error = %e, "accept failed; retrying in 100ms");
                    self.accept_retry = Some(self.now + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    /// Puts an accepted socket in the slab with its handshake deadline; false when it could not be
    /// registered (it is closed).
    fn adopt(
        &mut self,
        mut socket: TcpStream,
        admin: bool,
        addr_key: u32,
        tls: Option<Box<tls::TlsSession>>,
        refused: bool,
    ) -> bool {
        let _ = socket.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let index = entry.key();
        if let Err(e) = self
            .registry
            .register(&mut socket, Token(index), Interest::READABLE)
        {
            tracing::warn!(worker = self.id.0, error = %e, "register failed");
            return false;
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        // Behind TLS the PROXY header is read by the TLS session, before the handshake.
        let proxied = self.shared.cfg.proxy_protocol && !admin && tls.is_none();
        let is_tls = tls.is_some();
        if let Some(session) = tls {
            if self.sessions.len() <= index {
                self.sessions.resize_with(index + 1, || None);
            }
            self.sessions[index] = Some(session);
        }
        let id = ConnId {
            index: index as u32,
            generation,
        };
        let (mut conn, fx) = Conn::accept(id, proxied, admin, &mut env!(self), self.now_ms);
        conn.refused = refused;
        entry.insert(Slot {
            socket,
            timer: None,
            want_write: false,
            addr_key,
            tls: is_tls,
            conn,
        });
        if let Some(at) = fx.schedule {
            self.schedule(index, at);
        }
        // Edge-triggered: bytes may already be waiting (client sent its request at once).
        self.pending.push(index);
        true
    }

    fn commands(&mut self) {
        if !self.fan_out() {
            return;
        }
        while let Ok(cmd) = self.cmds.try_recv() {
            let now = self.now_ms;
            match cmd {
                LoopCmd::Deliver { conns, delivery } => {
                    if !self.start_fan_out(conns, Fanout::Message(delivery)) {
                        return;
                    }
                }
                LoopCmd::Frame { conns, frame } => {
                    if !self.start_fan_out(conns, Fanout::Frame(frame)) {
                        return;
                    }
                }
                LoopCmd::Respond {
                    index,
                    generation,
                    status,
                    body,
                } => {
                    if let Some(i) = self.live(index, generation) {
                        let fx =
                            self.conns[i]
                                .conn
                                .on_response(status, &body, &mut env!(self), now);
                        self.apply(i, fx);
                    }
                }
                LoopCmd::Refresh {
                    index,
                    generation,
                    exp,
                } => {
                    if let Some(i) = self.live(index, generation) {
                        let fx = self.conns[i].conn.on_refresh(exp, &mut env!(self), now);
                        self.apply(i, fx);
                    }
                }
                LoopCmd::Close {
                    index,
                    generation,
                    code,
                    reason,
                } => {
                    if let Some(i) = self.live(index, generation) {
                        let fx = self.conns[i]
                            .conn
                            .close_by(code, reason, &mut env!(self), now);
                        self.apply(i, fx);
                    }
                }
                LoopCmd::StreamStart {
                    index,
                    generation,
                    cursor,
                } => {
                    if let Some(i) = self.live(index, generation) {
                        let fx = self.conns[i]
                            .conn
                            .on_stream_start(cursor, &mut env!(self), now);
                        self.apply(i, fx);
                    }
                }
                LoopCmd::PollHold {
                    index,
                    generation,
                    cursor,
                    hold_ms,
                } => {
                    if let Some(i) = self.live(index, generation) {
                        let fx =
                            self.conns[i]
                                .conn
                                .on_poll_hold(cursor, hold_ms, &mut env!(self), now);
                        self.apply(i, fx);
                    }
                }
                LoopCmd::Shutdown => self.drain(),
            }
        }
    }

    /// Starts a fan-out command (none is in progress when a command is taken) and does its first chunk. True
    /// when it is done.
    fn start_fan_out(&mut self, conns: Vec<(u32, u32)>, what: Fanout) -> bool {
        self.backlog = Some(Backlog {
            conns,
            next: 0,
            what,
        });
        self.fan_out()
    }

    /// Works through the fan-out in progress, at most [`FANOUT_CHUNK`] connections. True when there is none
    /// left (the next command may be taken).
    fn fan_out(&mut self) -> bool {
        let Some(mut b) = self.backlog.take() else {
            return true;
        };
        let now = self.now_ms;
        let end = (b.next + FANOUT_CHUNK).min(b.conns.len());
        for &(index, generation) in &b.conns[b.next..end] {
            if let Some(i) = self.live(index, generation) {
                let fx = match &b.what {
                    Fanout::Message(d) => self.conns[i].conn.deliver(d, &mut env!(self), now),
                    Fanout::Frame(f) => self.conns[i].conn.send_frame(f, &mut env!(self), now),
                };
                self.apply(i, fx);
            }
        }
        b.next = end;
        if b.next < b.conns.len() {
            self.backlog = Some(b);
            return false;
        }
        true
    }

    /// The slot of a command's connection, if it is still the one the command was meant for.
    fn live(&self, index: u32, generation: u32) -> Option<usize> {
        let i = index as usize;
        let s = self.conns.get(i)?;
        (s.conn.id.generation == generation).then_some(i)
    }

    /// Starts a drain: no more accepts; short-lived connections (HTTP requests) end now; long-lived ones
    /// (WebSocket, SSE, held polls) are closed at `drain_rate` (this loop's share), over at most
    /// `drain_window`, so that their clients reconnect to other nodes gradually instead of all at once.
    fn drain(&mut self) {
        if self.drain_deadline.is_some() {
            return;
        }
        if self.accepting {
            self.pause_accepting();
        }
        let cfg = &self.shared.cfg;
        let mut long = Vec::new();
        let mut short = Vec::new();
        for (i, s) in self.conns.iter() {
            if s.conn.is_long_lived() {
                long.push(s.conn.id);
            } else {
                short.push(i);
            }
        }
        let rate = (cfg.drain_rate as f64 / cfg.threads as f64).max(0.001);
        let over = Duration::from_secs_f64(long.len() as f64 / rate).min(cfg.drain_window);
        self.drain_deadline = Some(self.now + over + cfg.drain_timeout);
        tracing::info!(
            worker = self.id.0,
            connections = long.len(),
            over_ms = over.as_millis() as u64,
            "draining: closing long-lived connections gradually"
        );
        self.spread = Some(Spread {
            total: long.len(),
            queue: long.into(),
            started: self.now,
            over,
        });
        let now = self.now_ms;
        for i in short {
            let fx = self.conns[i].conn.drain(&mut env!(self), now);
            self.apply(i, fx);
        }
        self.drain_step();
    }

    /// Closes the drain's next connections, as many as its pace allows by now.
    fn drain_step(&mut self) {
        let Some(spread) = self.spread.as_mut() else {
            return;
        };
        let due = spread.due(self.now);
        let mut batch = Vec::new();
        while spread.total - spread.queue.len() < due {
            match spread.queue.pop_front() {
                Some(id) => batch.push(id),
                None => break,
            }
        }
        if spread.queue.is_empty() {
            self.spread = None;
        }
        let now = self.now_ms;
        for id in batch {
            if let Some(i) = self.live(id.index, id.generation) {
                let fx = self.conns[i].conn.drain(&mut env!(self), now);
                self.apply(i, fx);
            }
        }
    }

    fn timers(&mut self) {
        self.wheel.poll_expired(self.now, &mut self.expired);
        let mut expired = std::mem::take(&mut self.expired);
        for id in expired.drain(..) {
            let i = id.index as usize;
            match self.conns.get_mut(i) {
                Some(s) if s.conn.id == id => s.timer = None,
                _ => continue,
            }
            let now = self.now_ms;
            let fx = self.conns[i].conn.on_timer(&mut env!(self), now);
            self.apply(i, fx);
        }
        self.expired = expired;
    }

    fn retry_deferred(&mut self) {
        while let Some(ev) = self.deferred.pop_front() {
            if let Err(ev) = self.shared.backplane.try_send(ev) {
                self.deferred.push_front(ev);
                break;
            }
        }
    }
}
