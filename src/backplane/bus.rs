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

#[derive(Debug)]
pub enum BusCmd {
    Subscribe(String),
    Unsubscribe(String),
    Publish {
        channel: String,
        payload: String,
    },
    /// Marks users live on this node until `until_ms` (Unix ms), or not live (`until_ms` = 0).
    Presence {
        users: Vec<String>,
        until_ms: u64,
    },
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
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often the subscriber checks for subscription changes while no message arrives.
const POLL: Duration = Duration::from_millis(20);
/// How long the subscriber waits for the answer to a command (SUBSCRIBE, UNSUBSCRIBE, PING) before it calls
/// the connection broken.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts both threads; returns the backplane's handle. The threads end when the handle is dropped.
pub fn spawn(
    url: &str,
    node_id: &str,
    events: EventSender<BusEvent>,
) -> std::io::Result<BusHandle> {
    let client = redis::Client::open(url).map_err(|e| std::io::Error::other(e.to_string()))?;
    let (tx, rx) = mpsc::sync_channel::<BusCmd>(PUBLISH_QUEUE);
    let (sub_tx, sub_rx) = mpsc::channel::<(bool, String)>();
    let base: BTreeSet<String> = [format!("node:{node_id}"), CONTROL_CHANNEL.to_string()].into();
    {
        let client = client.clone();
        let events = events.clone();
        std::thread::Builder::new()
            .name("corelay-bus-sub".into())
            .spawn(move || subscriber(client, base, sub_rx, events))?;
    }
    let node = node_id.to_string();
    std::thread::Builder::new()
        .name("corelay-bus-pub".into())
        .spawn(move || publisher(client, node, rx))?;
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

fn publisher(client: redis::Client, node: String, rx: mpsc::Receiver<BusCmd>) {
    let mut backoff = BACKOFF_MIN;
    let mut conn: Option<redis::Connection> = None;
    while let Ok(cmd) = rx.recv() {
        let mut pipe = redis::pipe();
        match cmd {
            // Sent straight to the subscriber by `BusHandle::send`.
            BusCmd::Subscribe(_) | BusCmd::Unsubscribe(_) => continue,
            BusCmd::Publish { channel, payload } => {
                pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
            }
            BusCmd::Presence { users, until_ms } => {
                for u in users {
                    let key = crate::store::redis::RedisStore::presence_key(&u);
                    if until_ms == 0 {
                        pipe.cmd("HDEL").arg(&key).arg(&node).ignore();
                    } else {
                        pipe.cmd("HSET").arg(&key).arg(&node).arg(until_ms).ignore();
                        pipe.cmd("PEXPIRE")
                            .arg(&key)
                            .arg(until_ms.saturating_sub(crate::clock::unix_ms()) + 60_000)
                            .ignore();
                    }
                }
            }
        }
        // A few tries; a publish lost here is recovered by the receivers' gap fill from the store.
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
        'conn: loop {
            let mut commanding = false;
            loop {
                let change = match changes.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                };
                if !commanding {
                    commanding = true;
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
            if commanding {
                let _ = ps.set_read_timeout(Some(POLL));
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
                        let _ = ps.set_read_timeout(Some(POLL));
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
