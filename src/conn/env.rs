//! What a connection needs from its surroundings, and what it asks of them.
//!
//! The connection never touches a socket, a timer wheel or a clock. It is handed bytes, the time (`now_ms`,
//! loop milliseconds) and commands, and it answers with bytes (its `WriteQueue`) and [`Effects`]. What it reads
//! (settings, the token verifier, the node's health) and the backplane queue it writes to come through the
//! [`Env`] trait: the event loop implements it over its shared state, a unit test over plain values.

use std::sync::atomic::Ordering::Relaxed;

use crate::auth::Verifier;
use crate::backplane::{ConnRef, Event};
use crate::cluster::ring::Ring;
use crate::config::Config;
use crate::metrics::LoopMetrics;

use super::ConnId;

/// An event loop's number (the `worker` of a `ConnRef`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoopId(pub u16);

impl std::fmt::Display for LoopId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The environment of a connection: read-only settings and state, and the backplane queue.
pub trait Env {
    /// The loop the connection lives on.
    fn loop_id(&self) -> LoopId;
    fn cfg(&self) -> &Config;
    fn verifier(&self) -> &Verifier;
    /// The loop's own counters.
    fn metrics(&self) -> &LoopMetrics;
    /// Offers a client request to the backplane; handed back when its queue is full (the client is then
    /// answered `overloaded`).
    fn offer(&mut self, ev: Event) -> Result<(), Event>;
    /// Sends an event that must arrive (an open, a close, an unfollow): kept and retried while the queue is
    /// full, in order.
    fn send(&mut self, ev: Event);
    /// The internal API's key.
    fn api_key(&self) -> &str;
    /// Whether the Redis bus is up (`/healthz`, `/readyz`).
    fn bus_up(&self) -> bool;
    /// Whether the node is draining (`/readyz`).
    fn draining(&self) -> bool;
    /// The consistent-hash ring of `/api/route`.
    fn ring(&self) -> &Ring;
    /// The text of `/metrics`.
    fn render_metrics(&self) -> String;
}

/// What the loop must do for a connection after handing it something. Its bytes are in `Conn::out`.
#[must_use]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Set the connection's one timer to fire at this loop ms, replacing the one set before.
    pub schedule: Option<u64>,
    /// Close the socket now (what is queued is dropped: nothing worth flushing, or already flushed).
    pub close: bool,
    /// Shut the socket's write side (our WebSocket close frame is out; wait for the peer's).
    pub shutdown_write: bool,
    /// Read the socket again, to `WouldBlock`: input was held (a request being answered, a rate limit) and
    /// whatever arrived meanwhile raised no new edge.
    pub read: bool,
}

/// One call's view of the environment: the `Env`, the time, who the connection is, and the effects so far.
pub(crate) struct Cx<'a> {
    pub env: &'a mut dyn Env,
    pub now_ms: u64,
    pub me: ConnRef,
    pub fx: Effects,
}

impl<'a> Cx<'a> {
    pub fn new(env: &'a mut dyn Env, id: ConnId, now_ms: u64) -> Self {
        let me = id.on(env.loop_id());
        Cx {
            env,
            now_ms,
            me,
            fx: Effects::default(),
        }
    }

    pub fn id(&self) -> u16 {
        self.me.worker
    }

    pub fn cfg(&self) -> &Config {
        self.env.cfg()
    }

    pub fn metrics(&self) -> &LoopMetrics {
        self.env.metrics()
    }

    /// Counts one outgoing WebSocket frame.
    pub fn frame_out(&self) {
        self.metrics().frames_out.fetch_add(1, Relaxed);
    }

    /// Sets the connection's one timer to fire at `at_ms`, replacing any earlier one.
    pub fn schedule(&mut self, at_ms: u64) {
        self.fx.schedule = Some(at_ms);
    }

    /// See [`Env::send`].
    pub fn send(&mut self, ev: Event) {
        self.env.send(ev);
    }

    /// See [`Env::offer`]; counts a refusal.
    pub fn offer(&mut self, ev: Event) -> bool {
        let ok = self.env.offer(ev).is_ok();
        if !ok {
            self.metrics().backplane_full.fetch_add(1, Relaxed);
        }
        ok
    }

    /// A configured duration, in ms from now, saturating.
    pub fn after(&self, d: std::time::Duration) -> u64 {
        self.now_ms
            .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}
