//! Counters for `/metrics` (Prometheus text format 0.0.4).
//!
//! Each loop writes only its own [`LoopMetrics`] (relaxed atomics on its own cache lines), so counting costs
//! no contention; `/metrics` reads them all.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Transports a connection can be in, for the per-transport gauges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Http = 0,
    WebSocket = 1,
    Echo = 2,
    Sse = 3,
    LongPoll = 4,
}

const TRANSPORTS: [(&str, Transport); 5] = [
    ("http", Transport::Http),
    ("websocket", Transport::WebSocket),
    ("echo", Transport::Echo),
    ("sse", Transport::Sse),
    ("longpoll", Transport::LongPoll),
];

/// Close codes we count individually; everything else lands in "other".
const CLOSE_CODES: [u16; 12] = [
    1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 1013, 4001, 0,
];

#[derive(Default)]
#[repr(align(128))]
pub struct LoopMetrics {
    pub connections: [AtomicI64; 5],
    pub accepted: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub closes: [AtomicU64; CLOSE_CODES.len()],
    pub http_responses: [AtomicU64; 6],
    pub backplane_full: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub heartbeat_timeouts: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Connections closed at accept by the per-address cap.
    pub addr_refused: AtomicU64,
    /// TLS handshakes completed (all), of which resumed (a session ticket or id), and TLS connections that
    /// ended in an error (a failed handshake, a bad record, bytes that were not TLS).
    pub tls_handshakes: AtomicU64,
    pub tls_resumed: AtomicU64,
    pub tls_failures: AtomicU64,
    /// Connections refused by the accept rate (`--accept-rate`, after `--accept-queue`).
    pub accept_refused: AtomicU64,
}

impl LoopMetrics {
    pub fn conn_opened(&self, t: Transport) {
        self.connections[t as usize].fetch_add(1, Relaxed);
    }

    pub fn conn_closed(&self, t: Transport) {
        self.connections[t as usize].fetch_sub(1, Relaxed);
    }

    /// Counts a WebSocket close by the code the server sent or received (1006: the TCP connection just ended).
    pub fn close(&self, code: u16) {
        let i = CLOSE_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(CLOSE_CODES.len() - 1);
        self.closes[i].fetch_add(1, Relaxed);
    }

    pub fn response(&self, status: u16) {
        let class = (status / 100) as usize;
        self.http_responses[class.min(5)].fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

pub struct Metrics {
    pub loops: Vec<LoopMetrics>,
    /// Commands the backplane could not hand to a loop at once (it waited for room).
    pub backplane_stalls: AtomicU64,
    /// Events waiting for the backplane, sampled by the backplane thread.
    pub backplane_queue_depth: AtomicU64,
    pub messages_routed: AtomicU64,
    /// Cluster mode: the Redis bus is connected (always true on a single node).
    pub bus_up: std::sync::atomic::AtomicBool,
    /// Cluster mode: channels received from the bus and synced.
    pub bus_channels: AtomicU64,
    /// Users of other nodes in this node's presence cache.
    pub presence_cache_users: AtomicU64,
    /// Cluster mode: gaps the store could not fill (or that outgrew the hold bounds), skipped with a `reset`.
    pub sequencer_resets: AtomicU64,
    /// Cluster mode: publishes dropped because the bus queue was full (Redis unreachable for long).
    pub bus_dropped: AtomicU64,
    /// Subscriptions and connections refused by a per-request, per-connection or per-user bound.
    pub subscriptions_refused: AtomicU64,
    /// Store commits and reads that failed (backend errors: disk, Redis, Scylla).
    pub store_errors: AtomicU64,
    /// Redis store commits refused because fewer than `--redis-min-replicas` replicas acknowledged them within
    /// `--redis-replica-timeout` (shared with the store, which counts them).
    pub store_replication_timeouts: std::sync::Arc<AtomicU64>,
    pub push: PushMetrics,
}

/// Mobile push (see `docs/PUSH.md`). Per provider where it says so: index 0 = APNs, 1 = FCM.
#[derive(Default)]
pub struct PushMetrics {
    /// Provider requests accepted (200), by provider.
    pub sent: [AtomicU64; 2],
    /// Provider requests that failed (any non-200 or no answer), by provider.
    pub failed: [AtomicU64; 2],
    /// Messages folded into another message's alert (a burst of n messages counts n - 1).
    pub collapsed: AtomicU64,
    /// Alerts sent to a member who was online but had not acked within `--push-delay`.
    pub escalated: AtomicU64,
    /// Background (clear) pushes sent after a read on another device.
    pub cleared: AtomicU64,
    /// Obligations put back for a later retry (provider outage, 429, 5xx).
    pub retried: AtomicU64,
    /// Obligations given up (no device, permanent provider error).
    pub dropped: AtomicU64,
    /// Device tokens removed because the provider said they are dead.
    pub tokens_removed: AtomicU64,
    /// Provider request latency: sum in microseconds and count, by provider.
    pub latency_us_sum: [AtomicU64; 2],
    pub latency_count: [AtomicU64; 2],
    /// Obligations claimed and not yet answered (queued or in flight in the push thread).
    pub in_flight: AtomicU64,
}

impl Metrics {
    pub fn new(loops: usize) -> Self {
        Metrics {
            loops: (0..loops).map(|_| LoopMetrics::default()).collect(),
            backplane_stalls: AtomicU64::new(0),
            backplane_queue_depth: AtomicU64::new(0),
            messages_routed: AtomicU64::new(0),
            bus_up: std::sync::atomic::AtomicBool::new(true),
            bus_channels: AtomicU64::new(0),
            presence_cache_users: AtomicU64::new(0),
            sequencer_resets: AtomicU64::new(0),
            bus_dropped: AtomicU64::new(0),
            subscriptions_refused: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            store_replication_timeouts: Default::default(),
            push: PushMetrics::default(),
        }
    }

    /// Renders the Prometheus text exposition.
    pub fn render(&self, backplane_queue_len: usize) -> String {
        let mut s = String::with_capacity(4096);
        s.push_str("# HELP corelay_connections Open connections by transport and loop.\n# TYPE corelay_connections gauge\n");
        for (i, l) in self.loops.iter().enumerate() {
            for (name, t) in TRANSPORTS {
                let _ = writeln!(
                    s,
                    "corelay_connections{{loop=\"{i}\",transport=\"{name}\"}} {}",
                    l.connections[t as usize].load(Relaxed)
                );
            }
        }
        let counters: [(&str, &str, fn(&LoopMetrics) -> &AtomicU64); 14] = [
            (
                "corelay_accept_refused_total",
                "New connections refused (503 + Retry-After, or closed before TLS) by the accept rate.",
                |l| &l.accept_refused,
            ),
            (
                "corelay_tls_handshakes_total",
                "TLS handshakes completed.",
                |l| &l.tls_handshakes,
            ),
            (
                "corelay_tls_resumed_total",
                "TLS handshakes that resumed a session (ticket or session id).",
                |l| &l.tls_resumed,
            ),
            (
                "corelay_tls_failures_total",
                "TLS connections ended by an error (handshake failure, bad record, not TLS).",
                |l| &l.tls_failures,
            ),
            (
                "corelay_rate_limited_total",
                "Times a WebSocket's input was paused by its rate limit (nothing is refused).",
                |l| &l.rate_limited,
            ),
            (
                "corelay_addr_refused_total",
                "Connections closed at accept by the per-address cap.",
                |l| &l.addr_refused,
            ),
            ("corelay_accepted_total", "TCP connections accepted.", |l| {
                &l.accepted
            }),
            (
                "corelay_frames_in_total",
                "WebSocket frames received.",
                |l| &l.frames_in,
            ),
            ("corelay_frames_out_total", "WebSocket frames sent.", |l| {
                &l.frames_out
            }),
            ("corelay_bytes_in_total", "Bytes read from clients.", |l| {
                &l.bytes_in
            }),
            (
                "corelay_bytes_out_total",
                "Bytes written to clients.",
                |l| &l.bytes_out,
            ),
            (
                "corelay_backplane_full_total",
                "Client requests refused because the backplane queue was full.",
                |l| &l.backplane_full,
            ),
            (
                "corelay_slow_consumer_closes_total",
                "Connections cut because their write queue passed its cap.",
                |l| &l.slow_consumers,
            ),
            (
                "corelay_heartbeat_timeouts_total",
                "Connections closed for not answering pings.",
                |l| &l.heartbeat_timeouts,
            ),
        ];
        for (name, help, f) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for (i, l) in self.loops.iter().enumerate() {
                let _ = writeln!(s, "{name}{{loop=\"{i}\"}} {}", f(l).load(Relaxed));
            }
        }
        s.push_str("# HELP corelay_ws_closes_total WebSocket closes by code (0 = other).\n# TYPE corelay_ws_closes_total counter\n");
        for (ci, code) in CLOSE_CODES.iter().enumerate() {
            let total: u64 = self.loops.iter().map(|l| l.closes[ci].load(Relaxed)).sum();
            let _ = writeln!(s, "corelay_ws_closes_total{{code=\"{code}\"}} {total}");
        }
        s.push_str("# HELP corelay_http_responses_total HTTP responses by status class.\n# TYPE corelay_http_responses_total counter\n");
        for class in 1..6 {
            let total: u64 = self
                .loops
                .iter()
                .map(|l| l.http_responses[class].load(Relaxed))
                .sum();
            let _ = writeln!(
                s,
                "corelay_http_responses_total{{class=\"{class}xx\"}} {total}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP corelay_backplane_queue_depth Events waiting for the backplane.\n# TYPE corelay_backplane_queue_depth gauge\ncorelay_backplane_queue_depth {backplane_queue_len}"
        );
        let _ = writeln!(
            s,
            "# HELP corelay_backplane_stalls_total Times the backplane waited for room in a loop's queue (dropped commands: none, it waits).\n# TYPE corelay_backplane_stalls_total counter\ncorelay_backplane_stalls_total {}",
            self.backplane_stalls.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP corelay_bus_up Whether the Redis bus is connected (1 on a single node).\n# TYPE corelay_bus_up gauge\ncorelay_bus_up {}",
            u8::from(self.bus_up.load(Relaxed))
        );
        let _ = writeln!(
            s,
            "# HELP corelay_store_errors_total Store commits and reads that failed.\n# TYPE corelay_store_errors_total counter\ncorelay_store_errors_total {}",
            self.store_errors.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP corelay_store_replication_timeouts_total Redis store commits refused because too few replicas acknowledged them in time (--redis-min-replicas).\n# TYPE corelay_store_replication_timeouts_total counter\ncorelay_store_replication_timeouts_total {}",
            self.store_replication_timeouts.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP corelay_bus_channels Channels this node receives from the Redis bus (synced).\n# TYPE corelay_bus_channels gauge\ncorelay_bus_channels {}",
            self.bus_channels.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP corelay_presence_cache_users Users of other nodes this node knows to be live (cluster presence cache).\n# TYPE corelay_presence_cache_users gauge\ncorelay_presence_cache_users {}",
            self.presence_cache_users.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP corelay_bounds_refused_total Subscriptions, channel lists and connections refused by a configured bound.\n# TYPE corelay_bounds_refused_total counter\ncorelay_bounds_refused_total {}",
            self.subscriptions_refused.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP corelay_bus_dropped_total Publishes and presence writes dropped because the bus queue was full (receivers re-read the store).\n# TYPE corelay_bus_dropped_total counter\ncorelay_bus_dropped_total {}",
            self.bus_dropped.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP corelay_sequencer_resets_total Gaps in a channel that could not be filled from the store and were skipped with a reset.\n# TYPE corelay_sequencer_resets_total counter\ncorelay_sequencer_resets_total {}",
            self.sequencer_resets.load(Relaxed)
        );
        self.push.render(&mut s);
        let _ = writeln!(
            s,
            "# HELP corelay_messages_routed_total Messages the backplane routed.\n# TYPE corelay_messages_routed_total counter\ncorelay_messages_routed_total {}",
            self.messages_routed.load(Relaxed)
        );
        s
    }
}

impl PushMetrics {
    fn render(&self, s: &mut String) {
        for (name, help, v) in [
            ("sent", "Provider requests accepted.", &self.sent),
            (
                "failed",
                "Provider requests not accepted (error status, timeout, connection failure).",
                &self.failed,
            ),
            (
                "latency_us_sum",
                "Provider request latency, sum in microseconds.",
                &self.latency_us_sum,
            ),
            (
                "latency_count",
                "Provider requests timed.",
                &self.latency_count,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP corelay_push_{name} {help}\n# TYPE corelay_push_{name} counter"
            );
            for (i, p) in ["apns", "fcm"].iter().enumerate() {
                let _ = writeln!(
                    s,
                    "corelay_push_{name}{{provider=\"{p}\"}} {}",
                    v[i].load(Relaxed)
                );
            }
        }
        for (name, help, v) in [
            (
                "collapsed_total",
                "Messages folded into another message's notification.",
                &self.collapsed,
            ),
            (
                "escalated_total",
                "Alerts to online members who did not ack within the push delay.",
                &self.escalated,
            ),
            (
                "cleared_total",
                "Background pushes after a read on another device.",
                &self.cleared,
            ),
            (
                "retried_total",
                "Obligations put back for a later retry.",
                &self.retried,
            ),
            (
                "dropped_total",
                "Obligations given up (no device, permanent provider error).",
                &self.dropped,
            ),
            (
                "tokens_removed_total",
                "Device tokens removed because the provider said they are dead.",
                &self.tokens_removed,
            ),
        ] {
            let _ = writeln!(
                s,
                "# HELP corelay_push_{name} {help}\n# TYPE corelay_push_{name} counter\ncorelay_push_{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP corelay_push_in_flight Obligations claimed and not answered yet.\n# TYPE corelay_push_in_flight gauge\ncorelay_push_in_flight {}",
            self.in_flight.load(Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts() {
        let m = Metrics::new(2);
        m.loops[1].conn_opened(Transport::WebSocket);
        m.loops[0].close(1009);
        m.loops[1].close(4000);
        let text = m.render(3);
        assert!(text.contains("corelay_connections{loop=\"1\",transport=\"websocket\"} 1"));
        assert!(text.contains("corelay_ws_closes_total{code=\"1009\"} 1"));
        assert!(text.contains("corelay_ws_closes_total{code=\"0\"} 1"));
        assert!(text.contains("corelay_backplane_queue_depth 3"));
    }
}
