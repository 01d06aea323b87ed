//! Cluster sync (Redis mode): this node's bus interest (a channel is subscribed while some local connection has
//! a reason to receive it), its presence announcements, publishing what it commits, and putting the messages
//! of every node in offset order through the sequencer, with the store filling the gaps the bus leaves.

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexMap;

use super::super::bus::{BusCmd, BusEvent, CONTROL_CHANNEL, PRESENCE_CHANNEL};
use super::super::sequencer::Sequencer;
use super::pending::{OnOffset, OnRead};
use super::remote::{Announcement, RemotePresence};
use super::render::render;
use super::{Delivery, MAX_REPLAY, Out, Router};
use crate::store::StoredMessage;
use crate::store::thread::Request;

/// How long an out-of-order message waits for the gap before the store fills it.
pub const GAP_WAIT_MS: u64 = 50;

/// This node's part of a cluster.
pub(super) struct ClusterSync {
    node: String,
    seq: Sequencer,
    /// channel → local reasons to receive it (a connected user for its conversations and `user:` channel, a
    /// follower for any channel). Subscribed on the bus while > 0.
    interest: HashMap<Arc<str>, usize>,
    bus: Vec<BusCmd>,
    presence_ttl_ms: u64,
    /// When the leases of the nodes in `remote` were last checked.
    last_check_ms: u64,
    /// The other nodes' users (see `remote`).
    remote: RemotePresence,
    /// Channels with a fill read in flight → the offset a follow-up read must start after, if another fill
    /// was asked for meanwhile (a bus reconnect while the store is slow). At most one read per channel is in
    /// flight and one more waits, however often the bus breaks: a read issued before a resubscription may
    /// miss what was published until it, so the follow-up is read after the first one returns.
    filling: HashMap<Arc<str>, Option<u64>>,
    /// Presence changes of this turn, user → (now up, announced), the last change of a user winning (a quick
    /// close and reopen must end written, not deleted); written and announced as one command by
    /// `take_bus_cmds`.
    changes: IndexMap<String, (bool, bool)>,
    /// The bus is connected (for `/readyz`).
    up: bool,
}

impl ClusterSync {
    fn new(node: &str, presence_ttl_ms: u64) -> Self {
        ClusterSync {
            node: node.to_string(),
            seq: Sequencer::default(),
            interest: HashMap::new(),
            bus: Vec::new(),
            presence_ttl_ms,
            last_check_ms: 0,
            remote: RemotePresence::default(),
            changes: IndexMap::new(),
            filling: HashMap::new(),
            up: false,
        }
    }

    /// Counts a local reason to receive `channel` (or one fewer). Returns the channel when it just became
    /// interesting: subscribed now, its end must be read from the store (the sync point).
    fn interest(&mut self, channel: &str, delta: isize) -> Option<Arc<str>> {
        let key: Arc<str> = Arc::from(channel);
        let n = self.interest.entry(key.clone()).or_default();
        let before = *n;
        *n = (*n as isize + delta).max(0) as usize;
        match (before, *n) {
            (0, 1..) => {
                self.seq.track(key.clone());
                self.bus.push(BusCmd::Subscribe(key.to_string()));
                Some(key)
            }
            (1.., 0) => {
                self.interest.remove(&key);
                self.seq.untrack(&key);
                self.bus.push(BusCmd::Unsubscribe(key.to_string()));
                None
            }
            _ => None,
        }
    }

    /// Whether `user` is known to be live on another node (the presence cache).
    pub(super) fn live_elsewhere(&self, user: &str) -> bool {
        self.remote.is_live(user)
    }

    /// Announces a conversation's members to the other nodes.
    pub(super) fn announce_members(&mut self, id: &str, members: &[String]) {
        let payload = serde_json::json!({"n": self.node, "id": id, "members": members}).to_string();
        self.bus.push(BusCmd::Publish {
            channel: CONTROL_CHANNEL.to_string(),
            payload,
        });
    }
}

impl Router {
    /// Turns on cluster mode: this node's id and its lease TTL (how long a dead node's users stay present).
    pub fn enable_cluster(&mut self, node: &str, presence_ttl_ms: u64) {
        self.cluster = Some(ClusterSync::new(node, presence_ttl_ms));
        self.holds.live_can_lag = true;
    }

    /// Bus commands produced since the last call.
    pub fn take_bus_cmds(&mut self) -> Vec<BusCmd> {
        let Some(c) = self.cluster.as_mut() else {
            return Vec::new();
        };
        if !c.changes.is_empty() {
            let (mut up, mut down, mut announce_up, mut announce_down) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (user, (is_up, announce)) in c.changes.drain(..) {
                if announce {
                    if is_up {
                        announce_up.push(user.clone());
                    } else {
                        announce_down.push(user.clone());
                    }
                }
                if is_up {
                    up.push(user)
                } else {
                    down.push(user)
                }
            }
            c.bus.push(BusCmd::Presence {
                up,
                down,
                announce_up,
                announce_down,
            });
        }
        std::mem::take(&mut c.bus)
    }

    /// Whether `user` is known to be live on another node (the presence cache; false on a single node).
    pub(super) fn live_elsewhere(&self, user: &str) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.live_elsewhere(user))
    }

    /// Users of other nodes in the presence cache.
    pub fn remote_presence(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.remote.len())
    }

    /// Announces every local user in some conversation from scratch ([`BusCmd::PresenceSync`]): `rewrite`
    /// writes every local user's presence entry again, `ask` asks the other nodes to announce theirs.
    fn announce_all(&mut self, rewrite: bool, ask: bool) {
        let users: Vec<String> = self.presence.users().map(|u| u.to_string()).collect();
        let announce = users
            .iter()
            .filter(|u| self.members.of(u).next().is_some())
            .cloned()
            .collect();
        if let Some(cl) = self.cluster.as_mut() {
            cl.bus.push(BusCmd::PresenceSync {
                users,
                announce,
                rewrite,
                ask,
            });
        }
    }

    /// Whether the backplane must tick often (every 25 ms): a gap is waiting to be filled, or push claims
    /// poll. Otherwise its idle wake-ups (every 500 ms) are enough for the lease checks (every third of
    /// `--presence-ttl`, at least 333 ms), and an idle process stays asleep: 60 processes on one host each
    /// waking 40 times a second cost ~20 % of a core.
    pub fn needs_fast_tick(&self) -> bool {
        self.push_enabled() || self.cluster.as_ref().is_some_and(|c| c.seq.holding_any())
    }

    /// Channels this node receives from the bus and has synced (0 on a single node).
    pub fn bus_channels(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.seq.synced())
    }

    /// Gaps skipped with a `reset` because the store could not fill them (cluster mode).
    pub fn sequencer_resets(&self) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.seq.skipped)
    }

    pub fn bus_up(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.up)
    }

    /// One more (or one fewer) local reason to receive `channel`; a channel that becomes interesting is synced.
    pub(super) fn interest(&mut self, channel: &str, delta: isize) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if let Some(channel) = cl.interest(channel, delta) {
            // Where the channel ends now, read after the local interest began: everything after it is new to
            // the local followers, and arrives by pub/sub once subscribed or by the fill that the
            // subscription's confirmation triggers.
            let ch = channel.to_string();
            self.pending.offset(
                |token| Request::LastOffset { token, channel: ch },
                OnOffset::Sync { channel },
            );
        }
    }

    /// A user's first connection on this node opened (`up`) or its last one closed.
    pub(super) fn user_presence(&mut self, user: &Arc<str>, up: bool) {
        if self.cluster.is_none() {
            return;
        }
        let delta = if up { 1 } else { -1 };
        let mut chans = vec![format!("user:{user}")];
        chans.extend(self.members.of(user).map(|c| format!("conversation:{c}")));
        for ch in chans {
            self.interest(&ch, delta);
        }
        let announce = self.members.of(user).next().is_some();
        if let Some(cl) = self.cluster.as_mut() {
            cl.changes.insert(user.to_string(), (up, announce));
        }
    }

    /// Announces a locally present user to the other nodes' presence caches (again: the caches take it as a
    /// set).
    pub(super) fn announce_present(&mut self, user: &Arc<str>) {
        if let Some(cl) = self.cluster.as_mut() {
            cl.changes.insert(user.to_string(), (true, true));
        }
    }

    /// Periodic work: checking the leases of the nodes whose users are cached, and asking the store for gaps
    /// the bus left. (Presence itself needs no refresh: it lives as long as the node's lease.)
    pub fn tick(&mut self, now_ms: u64) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if now_ms.saturating_sub(cl.last_check_ms) >= cl.presence_ttl_ms / 3 {
            cl.last_check_ms = now_ms;
            let nodes = cl.remote.instances();
            if !nodes.is_empty() {
                cl.bus.push(BusCmd::CheckNodes(nodes));
            }
        }
        let gaps = cl.seq.gaps(now_ms, GAP_WAIT_MS);
        for (channel, after) in gaps {
            self.fill(channel, after);
        }
    }

    /// Reads a channel from the store after `after` to fill a gap (or catch up after a reconnect).
    fn fill(&mut self, channel: Arc<str>, after: u64) {
        if let Some(cl) = self.cluster.as_mut() {
            if let Some(again) = cl.filling.get_mut(&channel) {
                *again = Some(again.map_or(after, |a| a.min(after)));
                return;
            }
            cl.filling.insert(channel.clone(), None);
        }
        let ch = channel.to_string();
        self.pending.read(
            |token| Request::ReadAfter {
                token,
                channel: ch,
                after,
                limit: MAX_REPLAY,
            },
            OnRead::Fill { channel },
        );
    }

    /// A bus event (cluster mode).
    pub fn on_bus(&mut self, ev: BusEvent, now_ms: u64, out: &mut Vec<Out>) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        match ev {
            BusEvent::Up => {
                cl.up = true;
                // Control messages published while we were not subscribed are lost: reread the members.
                self.pending.members();
                // So are presence announcements: start the cache over, have every node announce its users
                // again, and announce (and rewrite, in case Redis lost them) ours.
                cl.remote.clear();
                self.announce_all(true, true);
            }
            BusEvent::Down => cl.up = false,
            BusEvent::NodesGone(gone) => {
                for (node, token) in gone {
                    tracing::info!(%node, "presence: node gone (lease lost); forgetting its users");
                    cl.remote.forget(&node, &token);
                }
            }
            BusEvent::Message { channel, payload } if channel == PRESENCE_CHANNEL => {
                let Ok(a) = serde_json::from_str::<Announcement>(&payload) else {
                    tracing::warn!("bus: unreadable presence announcement");
                    return;
                };
                if a.node == cl.node {
                    return;
                }
                if a.kind == "ask" {
                    self.announce_all(false, false);
                    return;
                }
                // Kept whatever this node knows of the user's conversations: the announcing node filtered by
                // its own knowledge, and a membership may reach us after the announcement.
                cl.remote.apply(&a);
            }
            BusEvent::Subscribed(channel) => {
                if !cl.seq.is_tracked(&channel) {
                    return;
                }
                // The subscription is active: read what was committed between the sync point (or the last
                // released message, after a reconnect) and now. If the sync has not answered yet, it was read
                // after this point and nothing is missing.
                if let Some(upto) = cl.seq.released_upto(&channel) {
                    self.fill(Arc::from(channel.as_str()), upto);
                }
            }
            BusEvent::Message { channel, payload } if channel == CONTROL_CHANNEL => {
                #[derive(serde::Deserialize)]
                struct Control {
                    n: String,
                    id: String,
                    members: Vec<String>,
                }
                let Ok(c) = serde_json::from_str::<Control>(&payload) else {
                    return;
                };
                if c.n != cl.node {
                    self.set_members(
                        &c.id,
                        c.members.iter().map(|m| Arc::from(m.as_str())).collect(),
                    );
                }
            }
            BusEvent::Message { channel, payload } => {
                #[derive(serde::Deserialize)]
                struct Wire {
                    n: String,
                    o: u64,
                    j: String,
                }
                let Ok(w) = serde_json::from_str::<Wire>(&payload) else {
                    tracing::warn!(%channel, "bus: unreadable message");
                    return;
                };
                if w.n == cl.node {
                    return; // our own publication: already routed
                }
                let d = Delivery::new(Arc::from(channel.as_str()), w.o, w.j);
                let mut released = Vec::new();
                cl.seq.push(d, now_ms, &mut released);
                for d in released {
                    self.route_local_parsed(d, out);
                }
            }
        }
    }

    /// A message this node committed: in cluster mode it is published to the other nodes and goes through the
    /// sequencer like theirs; on a single node it is routed at once (commit order is offset order).
    pub(super) fn commit_routed(
        &mut self,
        d: Arc<Delivery>,
        from: Option<Arc<str>>,
        ts: u64,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        let Some(cl) = self.cluster.as_mut() else {
            self.route_local(d, from, ts, out);
            return;
        };
        let payload = serde_json::json!({
            "n": cl.node,
            "o": d.offset,
            "j": std::str::from_utf8(&d.json).unwrap_or("null"),
        })
        .to_string();
        cl.bus.push(BusCmd::Publish {
            channel: d.channel.to_string(),
            payload,
        });
        let mut released = Vec::new();
        cl.seq.push(d, now_ms, &mut released);
        for d in released {
            self.route_local_parsed(d, out);
        }
    }

    // ---- completions ----------------------------------------------------------------------------------

    /// [`OnOffset::Sync`]: where a newly followed channel ended; the sequencer releases from there.
    pub(super) fn on_synced(
        &mut self,
        channel: Arc<str>,
        result: Result<u64, crate::store::StoreError>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        let last = result.unwrap_or_else(|e| {
            tracing::warn!(error = %e, %channel, "last offset read failed");
            0
        });
        let mut released = Vec::new();
        if let Some(cl) = self.cluster.as_mut() {
            cl.seq.sync(&channel, last, now_ms, &mut released);
        }
        for d in released {
            self.route_local_parsed(d, out);
        }
    }

    /// [`OnRead::Fill`]: a gap fill or catch-up read of a channel, handed to the sequencer.
    pub(super) fn on_filled(
        &mut self,
        channel: Arc<str>,
        result: Result<Vec<StoredMessage>, crate::store::StoreError>,
        now_ms: u64,
        out: &mut Vec<Out>,
    ) {
        let msgs = result.unwrap_or_else(|e| {
            tracing::warn!(error = %e, %channel, "gap fill read failed");
            Vec::new()
        });
        let ds: Vec<Arc<Delivery>> = msgs
            .iter()
            .map(|m| Delivery::new(channel.clone(), m.offset, render(m)))
            .collect();
        let mut released = Vec::new();
        let mut again = None;
        if let Some(cl) = self.cluster.as_mut() {
            cl.seq.filled(&channel, ds, now_ms, &mut released);
            again = cl.filling.remove(&channel).flatten();
        }
        for d in released {
            self.route_local_parsed(d, out);
        }
        if let Some(after) = again {
            self.fill(channel, after);
        }
    }

    /// `Pending::Members`: every conversation's members, reread after the bus (re)connected.
    pub(super) fn on_members_read(&mut self, all: Vec<(String, Vec<String>)>) {
        for (id, members) in all {
            self.set_members(&id, members.iter().map(|m| Arc::from(m.as_str())).collect());
        }
    }
}
