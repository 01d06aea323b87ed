//! The loop's side of a connection: reading its socket into the connection, writing its queue to the socket,
//! carrying out the effects it answers with (its timer, a close, a half-close, another read), and closing.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use mio::{Interest, Token};

use super::tls::{self, Established, Input};
use super::{READS_PER_WAKE, Shared, Worker, env};
use crate::auth::Verifier;
use crate::backplane::Event;
use crate::cluster::ring::Ring;
use crate::config::Config;
use crate::conn::{Effects, Env, LoopId};
use crate::metrics::LoopMetrics;

/// A connection's environment on a loop: the shared state, and the loop's list of events to retry.
pub(super) struct LoopEnv<'a> {
    pub id: LoopId,
    pub shared: &'a Shared,
    pub deferred: &'a mut VecDeque<Event>,
}

impl Env for LoopEnv<'_> {
    fn loop_id(&self) -> LoopId {
        self.id
    }

    fn cfg(&self) -> &Config {
        &self.shared.cfg
    }

    fn verifier(&self) -> &Verifier {
        &self.shared.verifier
    }

    fn metrics(&self) -> &LoopMetrics {
        &self.shared.metrics.loops[self.id.0 as usize]
    }

    fn offer(&mut self, ev: Event) -> Result<(), Event> {
        self.shared.backplane.try_send(ev)
    }

    fn send(&mut self, ev: Event) {
        if !self.deferred.is_empty() {
            self.deferred.push_back(ev);
        } else if let Err(ev) = self.shared.backplane.try_send(ev) {
            self.deferred.push_back(ev);
        }
    }

    fn api_key(&self) -> &str {
        &self.shared.api_key
    }

    fn bus_up(&self) -> bool {
        self.shared.metrics.bus_up.load(Relaxed)
    }

    fn draining(&self) -> bool {
        self.shared.draining.load(Relaxed)
    }

    fn ring(&self) -> &Ring {
        &self.shared.ring
    }

    fn render_metrics(&self) -> String {
        self.shared
            .metrics
            .render(self.shared.backplane.queue_len())
    }
}

/// What one read of a socket gave.
enum ReadOutcome {
    Bytes(usize),
    /// Nothing more to read now (would block, paused, or the wake's budget is spent).
    Stop,
    /// The connection is gone (closed by the peer, an error, or already).
    Closed,
}

impl Worker {
    /// Sets the connection's one timer to fire at `at_ms` (loop ms), replacing any earlier one.
    pub(super) fn schedule(&mut self, i: usize, at_ms: u64) {
        let slot = &mut self.conns[i];
        if let Some(k) = slot.timer.take() {
            self.wheel.cancel(k);
        }
        let at = self.epoch + Duration::from_millis(at_ms);
        slot.timer = Some(self.wheel.insert(at, slot.conn.id));
    }

    /// Carries out what a connection asked for, then writes what it queued.
    pub(super) fn apply(&mut self, i: usize, fx: Effects) {
        if let Some(at) = fx.schedule {
            self.schedule(i, at);
        }
        if fx.close {
            self.close(i);
            return;
        }
        if fx.read {
            self.pending.push(i);
        }
        self.flush(i);
    }

    /// Reads and processes input. `drain`: read until `WouldBlock` (the peer may have half-closed, or this
    /// is a revisit); otherwise a short read ends the turn, saving the read() that would return `WouldBlock`
    /// (epoll reports a new edge for anything that arrives after our read).
    pub(super) fn readable(&mut self, i: usize, drain: bool) {
        let tls = self.conns.get(i).is_some_and(|s| s.tls);
        let mut reads = 0;
        loop {
            let n = match self.read_once(i, &mut reads) {
                ReadOutcome::Bytes(n) => n,
                ReadOutcome::Stop => break,
                ReadOutcome::Closed => return,
            };
            let open = if tls {
                self.on_ciphertext(i, n)
            } else {
                self.on_plaintext(i, n)
            };
            if !open {
                return;
            }
            if n < self.scratch.len() && !drain {
                break;
            }
        }
        self.flush(i);
    }

    /// One read of the socket into the scratch buffer, within the wake's budget of [`READS_PER_WAKE`].
    fn read_once(&mut self, i: usize, reads: &mut usize) -> ReadOutcome {
        loop {
            let Some(slot) = self.conns.get_mut(i) else {
                return ReadOutcome::Closed;
            };
            if !slot.conn.wants_input() {
                // Not reading while the backplane answers (`Respond` re-queues this connection) or while
                // rate limited (the resume timer does).
                return ReadOutcome::Stop;
            }
            if *reads == READS_PER_WAKE {
                self.pending.push(i);
                return ReadOutcome::Stop;
            }
            *reads += 1;
            match slot.socket.read(&mut self.scratch) {
                Ok(0) => {
                    self.close(i);
                    return ReadOutcome::Closed;
                }
                Ok(n) => {
                    self.shared.metrics.loops[self.id.0 as usize]
                        .bytes_in
                        .fetch_add(n as u64, Relaxed);
                    return ReadOutcome::Bytes(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Stop,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(worker = self.id.0, conn = i, error = %e, "read failed");
                    self.close(i);
                    return ReadOutcome::Closed;
                }
            }
        }
    }

    /// `n` bytes of a plain connection, read into the scratch buffer. False when the connection closed.
    fn on_plaintext(&mut self, i: usize, n: usize) -> bool {
        let now = self.now_ms;
        let fx = self.conns[i]
            .conn
            .on_bytes(&mut self.scratch[..n], &mut env!(self), now);
        if let Some(at) = fx.schedule {
            self.schedule(i, at);
        }
        if fx.close {
            self.close(i);
            return false;
        }
        true
    }

    /// `n` bytes of ciphertext of a TLS connection, in the scratch buffer: rustls decrypts them, and each
    /// record's plaintext goes to the connection. False when the connection closed.
    fn on_ciphertext(&mut self, i: usize, n: usize) -> bool {
        let metrics = &self.shared.metrics.loops[self.id.0 as usize];
        let now = self.now_ms;
        let mut schedule = None;
        let mut close = false;
        let conn = &mut self.conns[i].conn;
        let Some(session) = self.sessions.get_mut(i).and_then(|s| s.as_deref_mut()) else {
            // A TLS slot always has its session; without one the connection cannot go on.
            self.close(i);
            return false;
        };
        let plain = &mut self.plain;
        let mut env = env!(self);
        let input = session.on_ciphertext(
            &mut self.scratch[..n],
            &mut |p: &[u8]| {
                // A record is at most `plain.len()` bytes; `chunks` only guards the copy.
                for piece in p.chunks(plain.len()) {
                    let buf = &mut plain[..piece.len()];
                    buf.copy_from_slice(piece);
                    let fx = conn.on_bytes(buf, &mut env, now);
                    if fx.schedule.is_some() {
                        schedule = fx.schedule;
                    }
                    if fx.close {
                        close = true;
                        return false;
                    }
                }
                true
            },
            &mut |how| {
                metrics.tls_handshakes.fetch_add(1, Relaxed);
                if let Established::Resumed = how {
                    metrics.tls_resumed.fetch_add(1, Relaxed);
                }
            },
        );
        if let Some(at) = schedule {
            self.schedule(i, at);
        }
        if close {
            self.close(i);
            return false;
        }
        match input {
            Input::Continue => {}
            Input::PeerClosed => {
                self.close(i);
                return false;
            }
            Input::Fatal(why) => {
                tracing::debug!(worker = self.id.0, conn = i, reason = %why, "TLS connection failed");
                self.metrics().tls_failures.fetch_add(1, Relaxed);
                // Its last word (an alert, a plain-text 400), if the socket takes it now.
                if let Some(t) = self.sessions.get_mut(i).and_then(|s| s.as_deref_mut()) {
                    let _ = t.write_to(&mut self.conns[i].socket);
                }
                self.close(i);
                return false;
            }
        }
        true
    }

    /// Writes what is queued; manages WRITABLE interest; once the queue is empty, lets the connection say
    /// what follows (a close, a half-close).
    pub(super) fn flush(&mut self, i: usize) {
        let Some(slot) = self.conns.get_mut(i) else {
            return;
        };
        let session = if slot.tls {
            self.sessions.get_mut(i).and_then(|s| s.as_deref_mut())
        } else {
            None
        };
        let written = match session {
            None if slot.conn.out.is_empty() => Ok(0),
            None => slot.conn.out.write_to(&mut slot.socket),
            Some(t) => tls::write(t, &mut slot.socket, &mut slot.conn.out, &mut self.plain),
        };
        match written {
            Ok(n) => {
                self.shared.metrics.loops[self.id.0 as usize]
                    .bytes_out
                    .fetch_add(n as u64, Relaxed);
            }
            Err(e) => {
                tracing::debug!(worker = self.id.0, conn = i, error = %e, "write failed");
                self.close(i);
                return;
            }
        }
        let slot = &mut self.conns[i];
        let session = if slot.tls {
            self.sessions.get_mut(i).and_then(|s| s.as_deref_mut())
        } else {
            None
        };
        if !slot.conn.out.is_empty() || session.as_ref().is_some_and(|t| !t.pending().is_empty()) {
            if !slot.want_write {
                slot.want_write = true;
                let _ = self.registry.reregister(
                    &mut slot.socket,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                );
            }
            return;
        }
        if slot.want_write {
            slot.want_write = false;
            let _ = self
                .registry
                .reregister(&mut slot.socket, Token(i), Interest::READABLE);
        }
        let fx = slot.conn.on_flushed(self.now_ms);
        if (fx.shutdown_write || fx.close)
            && let Some(t) = session
        {
            // A graceful end: tell the TLS peer (best effort: one small record on an empty socket buffer).
            t.close_notify();
            let _ = t.write_to(&mut slot.socket);
        }
        if fx.shutdown_write {
            let _ = slot.socket.shutdown(Shutdown::Write);
        }
        if let Some(at) = fx.schedule {
            self.schedule(i, at);
        }
        if fx.close {
            self.close(i);
        }
    }

    pub(super) fn close(&mut self, i: usize) {
        if !self.conns.contains(i) {
            return;
        }
        let mut slot = self.conns.remove(i);
        if slot.tls
            && let Some(s) = self.sessions.get_mut(i)
        {
            *s = None;
        }
        self.shared.per_address.release(slot.addr_key);
        if let Some(k) = slot.timer.take() {
            self.wheel.cancel(k);
        }
        let _ = self.registry.deregister(&mut slot.socket);
        slot.conn.on_closed(&mut env!(self));
        if !self.accepting && self.drain_deadline.is_none() {
            self.resume_accepting();
        }
    }
}
