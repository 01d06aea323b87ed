//! The Redis bus (cluster mode): pub/sub between nodes and the presence registry.
//!
//! Two threads with blocking `redis` connections, so that nothing here can stall the backplane's runtime:
//! - the **publisher** takes [`BusCmd`]s in order: `PUBLISH`es, presence writes, and subscription changes
//!   (which it forwards to the subscriber);
//! - the **subscriber** holds one `SUBSCRIBE` connection: the node's own `node:{id}`, the control channel, and
//!   every channel a local client follows (subscribed on the first local follower, unsubscribed on the last).
//!   It turns messages into [`BusEvent`]s.
//!
//! Either thread reconnects with exponential backoff (50 ms … 2 s) after a lost connection. The subscriber then
//! resubscribes everything and reports [`BusEvent::Up`] followed by `Subscribed` for each channel, and the router
//! re-reads each channel from the store after the last offset it released: what pub/sub lost while Redis was
//! away is delivered from the log, and the sequencer drops what arrives twice.
//!
//! Presence (which users have a live connection on which node) is two things: a hash per user in Redis, node →
//! the instance token of the node's lease (written when a user's first connection opens here and deleted when
//! its last one closes; it counts only while that instance's lease lives, so a dead node's users stop counting
//! within one lease TTL without any per-user refresh), and announcements on [`PRESENCE_CHANNEL`] that feed the
//! other nodes' caches (`router::remote`). The periodic work is one lease refresh per node and one lease check
//! (`MGET`) of the nodes a cache holds, however many users there are.
//!
//! One Redis message per node per channel message: a node publishes once; every node that has local followers
//! receives it once and fans it out to its own connections. Redis Cluster would use sharded pub/sub
//! (`SSUBSCRIBE`/`SPUBLISH`, Redis 7) so that a channel's messages only travel to the shard that owns its slot;
//! the commands here map one to one.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::Sender as EventSender;

/// Publishes and presence writes queued for the publisher thread. While Redis is unreachable the queue fills
/// and further publishes are dropped (and counted): every message is in the store before it is published, and
/// receivers re-read the store after their bus reconnects, so a dropped publish delays nothing that matters.
pub const PUBLISH_QUEUE: usize = 65_536;
/// Bus events queued for the backplane. A full queue blocks the subscriber thread; Redis then drops the
/// subscriber once its output buffer limit is reached, and after reconnecting the node re-reads each channel
/// from the store: memory stays bounded and nothing is lost.
pub const EVENT_QUEUE: usize = 65_536;

/// The backplane's end of the bus threads.
pub struct BusHandle {
    publish: mpsc::SyncSender<BusCmd>,
    subscriptions: mpsc::Sender<(bool, String)>,
}

impl BusHandle {
    /// Queues a command; false when a publish or presence write was dropped because the queue is full.
    /// Subscription changes are never dropped (they go straight to the subscriber, which folds them into its
    /// set even while Redis is down, so they are bounded by the number of channels).
    pub fn send(&self, cmd: BusCmd) -> bool {
        match cmd {
            BusCmd::Subscribe(ch) => {
                let _ = self.subscriptions.send((true, ch));
                true
            }
            BusCmd::Unsubscribe(ch) => {
                let _ = self.subscriptions.send((false, ch));
                true
            }
            other => match self.publish.try_send(other) {
                Ok(()) => true,
                Err(mpsc::TrySendError::Full(_)) => false,
                Err(mpsc::TrySendError::Disconnected(_)) => true,
            },
        }
    }
}

/// Control messages between nodes (conversation membership changes).
pub const CONTROL_CHANNEL: &str = "corelay:control";
/// Presence announcements between nodes (see the module doc and `router::remote`).
pub const PRESENCE_CHANNEL: &str = "corelay:presence";
/// Users per presence announcement when a node announces all of its users (bounded message size).
pub const ANNOUNCE_CHUNK: usize = 5_000;

#[derive(Debug)]
pub enum BusCmd {
    Subscribe(String),
    Unsubscribe(String),
    Publish {
        channel: String,
        payload: String,
    },
    /// Users whose first connection on this node opened (`up`) or whose last one closed (`down`): their
    /// presence entries are written or deleted, then the `announce_*` ones (users in some conversation: the
    /// only ones other nodes cache) are announced.
    Presence {
        up: Vec<String>,
        down: Vec<String>,
        announce_up: Vec<String>,
        announce_down: Vec<String>,
    },
    /// Every local user, announced from scratch (the receivers replace what they knew of this node): after
    /// our bus reconnected (`rewrite`: the entries are written again too, in case Redis lost them, and `ask`:
    /// the other nodes are asked to announce theirs, since we missed their announcements), or because a node
    /// asked.
    PresenceSync {
        users: Vec<String>,
        announce: Vec<String>,
        rewrite: bool,
        ask: bool,
    },
    /// Checks which of these nodes' instances (node id, lease token) no longer hold their lease; answered
    /// with [`BusEvent::NodesGone`].
    CheckNodes(Vec<(String, String)>),
}

#[derive(Debug)]
pub enum BusEvent {
    Message {
        channel: String,
        payload: String,
    },
    /// A (re)subscription is active: catch up on this channel from the store.
    Subscribed(String),
    Up,
    Down,
    /// Node instances (id, token) whose lease is gone or held by another instance: dead.
    NodesGone(Vec<(String, String)>),
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often the subscriber checks for subscription changes while no message arrives.
const POLL: Duration = Duration::from_millis(20);
/// The same once no subscription has changed for [`QUIET_AFTER`]: an idle node's subscriber wakes 10 times a
/// second instead of 50 (with 60 processes on one host, the 20 ms poll alone cost ~15 % of a core). The first
/// subscription after a quiet spell waits at most this long; what is published meanwhile comes from the fill
/// that its confirmation triggers, so it costs latency, never a message.
const POLL_QUIET: Duration = Duration::from_millis(100);
/// Subscription changes made before the subscriber reads the messages that are waiting.
const CHANGES_PER_TURN: usize = 64;
/// The wait for messages between two such turns while more changes are queued.
const BACKLOG_POLL: Duration = Duration::from_millis(1);
const QUIET_AFTER: Duration = Duration::from_secs(2);
/// How long the subscriber waits for the answer to a command (SUBSCRIBE, UNSUBSCRIBE, PING) before it calls
/// the connection broken.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts both threads; returns the backplane's handle. The threads end when the handle is dropped.
pub fn spawn(
    url: &str,
    node_id: &str,
    token: &str,
    events: EventSender<BusEvent>,
) -> std::io::Result<BusHandle> {
    let client = redis::Client::open(url).map_err(|e| std::io::Error::other(e.to_string()))?;
    let (tx, rx) = mpsc::sync_channel::<BusCmd>(PUBLISH_QUEUE);
    let (sub_tx, sub_rx) = mpsc::channel::<(bool, String)>();
    let base: BTreeSet<String> = [
        format!("node:{node_id}"),
        CONTROL_CHANNEL.to_string(),
        PRESENCE_CHANNEL.to_string(),
    ]
    .into();
    {
        let client = client.clone();
        let events = events.clone();
        std::thread::Builder::new()
            .name("corelay-bus-sub".into())
            .spawn(move || subscriber(client, base, sub_rx, events))?;
    }
    let me = Me {
        node: node_id.to_string(),
        token: token.to_string(),
    };
    std::thread::Builder::new()
        .name("corelay-bus-pub".into())
        .spawn(move || publisher(client, me, rx, events))?;
    Ok(BusHandle {
        publish: tx,
        subscriptions: sub_tx,
    })
}

fn connect(client: &redis::Client, backoff: &mut Duration) -> redis::Connection {
    loop {
        match client.get_connection_with_timeout(Duration::from_secs(2)) {
            Ok(c) => {
                *backoff = BACKOFF_MIN;
                return c;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "redis bus: connect failed");
                std::thread::sleep(*backoff);
                *backoff = (*backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// This node instance: its id and its lease token.
struct Me {
    node: String,
    token: String,
}

/// A presence announcement on [`PRESENCE_CHANNEL`]: `k` is `up`, `down`, `reset` (the first part of a full
/// announcement: forget what you knew of this node) or `ask` (announce yourselves).
pub fn announcement(node: &str, token: &str, kind: &str, users: &[String]) -> String {
    serde_json::json!({"n": node, "t": token, "k": kind, "u": users}).to_string()
}

/// Adds the commands of one [`BusCmd`] to `pipe` (none for those the publisher does not write).
fn pipeline(me: &Me, cmd: &BusCmd, pipe: &mut redis::Pipeline) {
    let hset = |pipe: &mut redis::Pipeline, u: &str| {
        pipe.cmd("HSET")
            .arg(crate::store::redis::RedisStore::presence_key(u))
            .arg(&me.node)
            .arg(&me.token)
            .ignore();
    };
    let announce = |pipe: &mut redis::Pipeline, kind: &str, users: &[String]| {
        pipe.cmd("PUBLISH")
            .arg(PRESENCE_CHANNEL)
            .arg(announcement(&me.node, &me.token, kind, users))
            .ignore();
    };
    match cmd {
        BusCmd::Subscribe(_) | BusCmd::Unsubscribe(_) | BusCmd::CheckNodes(_) => {}
        BusCmd::Publish { channel, payload } => {
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        BusCmd::Presence {
            up,
            down,
            announce_up,
            announce_down,
        } => {
            for u in up {
                hset(pipe, u);
            }
            for u in down {
                pipe.cmd("HDEL")
                    .arg(crate::store::redis::RedisStore::presence_key(u))
                    .arg(&me.node)
                    .ignore();
            }
            for chunk in announce_up.chunks(ANNOUNCE_CHUNK) {
                announce(pipe, "up", chunk);
            }
            for chunk in announce_down.chunks(ANNOUNCE_CHUNK) {
                announce(pipe, "down", chunk);
            }
        }
        BusCmd::PresenceSync {
            users,
            announce: to_announce,
            rewrite,
            ask,
        } => {
            if *rewrite {
                for u in users {
                    hset(pipe, u);
                }
            }
            let mut chunks = to_announce.chunks(ANNOUNCE_CHUNK);
            announce(pipe, "reset", chunks.next().unwrap_or(&[]));
            for chunk in chunks {
                announce(pipe, "up", chunk);
            }
            if *ask {
                announce(pipe, "ask", &[]);
            }
        }
    }
}

fn publisher(
    client: redis::Client,
    me: Me,
    rx: mpsc::Receiver<BusCmd>,
    events: EventSender<BusEvent>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut conn: Option<redis::Connection> = None;
    while let Ok(cmd) = rx.recv() {
        if let BusCmd::CheckNodes(nodes) = cmd {
            if nodes.is_empty() {
                continue;
            }
            let mut cmd = redis::cmd("MGET");
            for (node, _) in &nodes {
                cmd.arg(crate::backplane::lease::key(node));
            }
            let c = conn.get_or_insert_with(|| connect(&client, &mut backoff));
            match cmd.query::<Vec<Option<String>>>(c) {
                Ok(held) => {
                    let gone: Vec<(String, String)> = nodes
                        .into_iter()
                        .zip(held)
                        .filter(|((_, token), h)| h.as_deref() != Some(token.as_str()))
                        .map(|(n, _)| n)
                        .collect();
                    if !gone.is_empty() && events.blocking_send(BusEvent::NodesGone(gone)).is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    // Checked again at the next period; a cache entry lives at most that much longer.
                    tracing::warn!(error = %e, "redis bus: node lease check failed");
                    conn = None;
                }
            }
            continue;
        }
        let mut pipe = redis::pipe();
        pipeline(&me, &cmd, &mut pipe);
        if matches!(cmd, BusCmd::Subscribe(_) | BusCmd::Unsubscribe(_)) {
            // Sent straight to the subscriber by `BusHandle::send`.
            continue;
        }
        // A few tries; a publish lost here is recovered by the receivers' gap fill from the store, and a lost
        // presence write by the full announcement that follows the bus's reconnection.
        for attempt in 0..3 {
            let c = conn.get_or_insert_with(|| connect(&client, &mut backoff));
            match pipe.query::<()>(c) {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "redis bus: write failed");
                    conn = None;
                }
            }
        }
    }
}

fn subscriber(
    client: redis::Client,
    base: BTreeSet<String>,
    changes: mpsc::Receiver<(bool, String)>,
    events: EventSender<BusEvent>,
) {
    let mut wanted: BTreeSet<String> = base.clone();
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        // While Redis is unreachable, fold subscription changes into the set (bounded by the channel count).
        let mut conn = loop {
            loop {
                match changes.try_recv() {
                    Ok((true, ch)) => {
                        wanted.insert(ch);
                    }
                    Ok((false, ch)) => {
                        if !base.contains(&ch) {
                            wanted.remove(&ch);
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            match client.get_connection_with_timeout(Duration::from_secs(2)) {
                Ok(c) => {
                    backoff = BACKOFF_MIN;
                    break c;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "redis bus: connect failed");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        };
        let mut ps = conn.as_pubsub();
        // Commands (SUBSCRIBE, PING) wait for their answer up to COMMAND_TIMEOUT; only the wait for messages
        // uses the short POLL. A 20 ms bound on a SUBSCRIBE's answer broke the connection whenever Redis was
        // busy for 20 ms, and every break resubscribed (and re-read) every channel: a storm at tens of
        // thousands of channels.
        let _ = ps.set_read_timeout(Some(COMMAND_TIMEOUT));
        let ok = wanted.iter().all(|ch| ps.subscribe(ch).is_ok());
        let _ = ps.set_read_timeout(Some(POLL));
        if !ok {
            std::thread::sleep(backoff);
            continue;
        }
        if events.blocking_send(BusEvent::Up).is_err() {
            return;
        }
        if !first {
            for ch in &wanted {
                let _ = events.blocking_send(BusEvent::Subscribed(ch.clone()));
            }
        }
        first = false;
        let mut last_ok = Instant::now();
        let mut last_change = Instant::now();
        let mut poll = POLL;
        'conn: loop {
            let mut commanding = false;
            // At most CHANGES_PER_TURN subscription changes (one round trip each), then the messages: a node
            // that has just accepted thousands of connections subscribes their channels for a while, and a
            // message on a channel already subscribed (a broadcast) must not wait behind that queue (at
            // 1,000,000 connections over 60 processes it waited minutes).
            let mut made = 0;
            while made < CHANGES_PER_TURN {
                let change = match changes.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                };
                made += 1;
                if !commanding {
                    commanding = true;
                    last_change = Instant::now();
                    let _ = ps.set_read_timeout(Some(COMMAND_TIMEOUT));
                }
                match change {
                    (true, ch) => {
                        if wanted.insert(ch.clone())
                            && let Err(e) = ps.subscribe(&ch)
                        {
                            tracing::warn!(error = %e, channel = %ch, "redis bus: subscribe failed");
                            break 'conn;
                        }
                        let _ = events.blocking_send(BusEvent::Subscribed(ch));
                    }
                    (false, ch) => {
                        if !base.contains(&ch)
                            && wanted.remove(&ch)
                            && let Err(e) = ps.unsubscribe(&ch)
                        {
                            tracing::warn!(error = %e, channel = %ch, "redis bus: unsubscribe failed");
                            break 'conn;
                        }
                    }
                }
            }
            let want = if made == CHANGES_PER_TURN {
                // More changes wait: only take what has already arrived.
                BACKLOG_POLL
            } else if last_change.elapsed() < QUIET_AFTER {
                POLL
            } else {
                POLL_QUIET
            };
            if commanding || want != poll {
                poll = want;
                let _ = ps.set_read_timeout(Some(poll));
            }
            match ps.get_message() {
                Ok(msg) => {
                    last_ok = Instant::now();
                    let payload: String = msg.get_payload().unwrap_or_default();
                    let ev = BusEvent::Message {
                        channel: msg.get_channel_name().to_string(),
                        payload,
                    };
                    if events.blocking_send(ev).is_err() {
                        return;
                    }
                }
                Err(e) if e.is_timeout() => {
                    // Quiet: check the connection now and then.
                    if last_ok.elapsed() > Duration::from_secs(5) {
                        let _ = ps.set_read_timeout(Some(COMMAND_TIMEOUT));
                        // In subscribed mode (RESP2) PING answers `["pong", ""]`, not `+PONG`: read it as
                        // any value. (Reading a string failed every time, so every 5 s of quiet dropped the
                        // connection and resubscribed and re-read every channel.)
                        if let Err(e) = ps.ping::<redis::Value>() {
                            tracing::warn!(error = %e, "redis bus: subscriber ping failed");
                            break 'conn;
                        }
                        let _ = ps.set_read_timeout(Some(poll));
                        last_ok = Instant::now();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "redis bus: subscriber connection lost");
                    break 'conn;
                }
            }
        }
        drop(ps);
        let _ = events.blocking_send(BusEvent::Down);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_publish_queue_drops_publishes_but_never_subscription_changes() {
        let (tx, rx) = mpsc::sync_channel(2);
        let (sub_tx, sub_rx) = mpsc::channel();
        let h = BusHandle {
            publish: tx,
            subscriptions: sub_tx,
        };
        let publish = || BusCmd::Publish {
            channel: "t".into(),
            payload: "{}".into(),
        };
        assert!(h.send(publish()));
        assert!(h.send(publish()));
        assert!(!h.send(publish()), "full: dropped and reported");
        for i in 0..10_000 {
            assert!(h.send(BusCmd::Subscribe(format!("c{i}"))));
        }
        assert_eq!(
            rx.try_iter().count(),
            2,
            "the queue never held more than its bound"
        );
        assert_eq!(sub_rx.try_iter().count(), 10_000);
    }
}
