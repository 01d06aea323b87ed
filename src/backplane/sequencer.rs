//! Per-channel ordering and dedupe for cluster mode.
//!
//! With several nodes appending to one channel, offsets come from Redis `INCR` in commit order, but they reach
//! a node by different paths (its own commits, pub/sub from each other node) and can arrive out of order, twice
//! (a re-read after a reconnect overlaps pub/sub), or not at all (pub/sub is at-most-once). The sequencer
//! releases each channel's messages in offset order exactly once: a message beyond the next expected offset is
//! held; a gap older than the wait is filled from the store (the caller reads after `next - 1`); a message at or
//! below what was released is a duplicate and dropped.
//!
//! A gap the store cannot fill (a topic stream trimmed by `MAXLEN ~` while this node was cut off from the bus,
//! so the missing offsets exist nowhere any more) is skipped with an explicit `reset` item, as a cursor older
//! than the history gets one: the fill came back starting after the gap, or [`MAX_FILL_ATTEMPTS`] fills came
//! back empty. What a channel holds is bounded in count and bytes ([`Limits`]); past either bound the gap is
//! skipped the same way, so a channel can neither stall for good nor grow without limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Delivery;

/// Fills that come back without closing the gap before it is skipped.
pub const MAX_FILL_ATTEMPTS: u32 = 3;

/// Bounds on what one channel holds while it waits for a gap.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_held: usize,
    pub max_held_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_held: 10_000,
            max_held_bytes: 16 << 20,
        }
    }
}

#[derive(Default)]
struct Chan {
    /// The next offset to release; None until the channel's current end is known (`sync`).
    next: Option<u64>,
    held: BTreeMap<u64, Arc<Delivery>>,
    /// Bytes of JSON held.
    held_bytes: usize,
    /// When the oldest gap was first seen (ms); a fill was asked for when `asked` is set.
    gap_since: Option<u64>,
    asked: bool,
    /// Fills that came back empty while the gap stayed open.
    attempts: u32,
}

#[derive(Default)]
pub struct Sequencer {
    chans: HashMap<Arc<str>, Chan>,
    /// Channels holding messages (the only ones that can have a gap), so that [`Sequencer::gaps`], called on
    /// every tick, costs the channels with a gap rather than every channel this node follows (one `user:`
    /// channel per connected user: tens of thousands).
    holding: std::collections::HashSet<Arc<str>>,
    /// Channels whose end is known ([`Sequencer::synced`], read for a metric on every backplane turn).
    synced: usize,
    limits: Limits,
    /// Gaps skipped with a `reset` (for the metric).
    pub skipped: u64,
}

/// A `reset` item for `channel`: the client continues after `offset` (what was between is gone).
pub fn reset(channel: &Arc<str>, offset: u64) -> Arc<Delivery> {
    let json = format!(r#"{{"type":"reset","channel":"{channel}","offset":{offset}}}"#);
    Delivery::new(channel.clone(), offset, json)
}

/// Whether a released item is a `reset` rather than a message.
pub fn is_reset(d: &Delivery) -> bool {
    d.json.starts_with(br#"{"type":"reset""#)
}

impl Sequencer {
    pub fn with_limits(limits: Limits) -> Self {
        Sequencer {
            limits,
            ..Sequencer::default()
        }
    }

    pub fn is_tracked(&self, channel: &str) -> bool {
        self.chans.contains_key(channel)
    }

    /// Starts tracking a channel; messages are held until [`Sequencer::sync`] says where it ends.
    pub fn track(&mut self, channel: Arc<str>) {
        self.chans.entry(channel).or_default();
    }

    pub fn untrack(&mut self, channel: &str) {
        if let Some(c) = self.chans.remove(channel)
            && c.next.is_some()
        {
            self.synced -= 1;
        }
        self.holding.remove(channel);
    }

    /// Keeps [`Sequencer::holding`] in step with a channel's held messages.
    fn mark(&mut self, channel: &str) {
        match self.chans.get_key_value(channel) {
            Some((k, c)) if !c.held.is_empty() => {
                if !self.holding.contains(channel) {
                    self.holding.insert(k.clone());
                }
            }
            _ => {
                self.holding.remove(channel);
            }
        }
    }

    /// The channel's last committed offset when tracking began (from the store). Held messages after it are
    /// released in order.
    pub fn sync(&mut self, channel: &str, last: u64, now_ms: u64, out: &mut Vec<Arc<Delivery>>) {
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        if c.next.is_none() {
            self.synced += 1;
            // Anything held that is already covered by `last` was committed before we looked: still new to the
            // local clients that made us track the channel only if it came after they connected, which we cannot
            // tell; release from the first held one when it is older, so nothing is lost.
            let first_held = c.held.keys().next().copied();
            c.next = Some(match first_held {
                Some(h) if h <= last => h,
                _ => last + 1,
            });
        }
        Self::release(c, now_ms, out);
        self.mark(channel);
    }

    /// Feeds a message (a local commit, a pub/sub message, or a store re-read).
    pub fn push(&mut self, d: Arc<Delivery>, now_ms: u64, out: &mut Vec<Arc<Delivery>>) {
        let Some(c) = self.chans.get_mut(&*d.channel) else {
            // Not tracked here (nobody local follows it): pass through.
            out.push(d);
            return;
        };
        if c.next.is_some_and(|n| d.offset < n) {
            return; // already released
        }
        let len = d.json.len();
        let channel = d.channel.clone();
        if let Some(old) = c.held.insert(d.offset, d) {
            c.held_bytes -= old.json.len();
        }
        c.held_bytes += len;
        Self::release(c, now_ms, out);
        if c.next.is_some()
            && (c.held.len() > self.limits.max_held || c.held_bytes > self.limits.max_held_bytes)
        {
            // Waiting longer would grow without bound: skip the gap.
            self.skipped += 1;
            Self::skip_gap(&channel, c, now_ms, out);
        }
        self.mark(&channel);
    }

    /// Gives up on the gap before the first held message: a `reset` to just before it, then release.
    fn skip_gap(channel: &Arc<str>, c: &mut Chan, now_ms: u64, out: &mut Vec<Arc<Delivery>>) {
        let Some(&first) = c.held.keys().next() else {
            return;
        };
        tracing::warn!(%channel, from = ?c.next, to = first - 1, "sequencer: gap the store cannot fill; reset");
        out.push(reset(channel, first - 1));
        c.next = Some(first);
        c.attempts = 0;
        c.asked = false;
        c.gap_since = None;
        Self::release(c, now_ms, out);
    }

    fn release(c: &mut Chan, now_ms: u64, out: &mut Vec<Arc<Delivery>>) {
        let Some(mut next) = c.next else { return };
        while let Some(d) = c.held.remove(&next) {
            c.held_bytes -= d.json.len();
            out.push(d);
            next += 1;
        }
        // Drop anything below `next` that a re-read delivered twice.
        let stale = c.held.split_off(&next);
        for d in c.held.values() {
            c.held_bytes -= d.json.len();
        }
        c.held = stale;
        c.next = Some(next);
        if c.held.is_empty() {
            c.gap_since = None;
            c.asked = false;
            c.attempts = 0;
        } else if c.gap_since.is_none() {
            c.gap_since = Some(now_ms);
        }
    }

    /// Channels whose gap is older than `wait_ms` and not yet asked for: (channel, read after this offset).
    pub fn gaps(&mut self, now_ms: u64, wait_ms: u64) -> Vec<(Arc<str>, u64)> {
        let mut v = Vec::new();
        for ch in &self.holding {
            let Some(c) = self.chans.get_mut(ch) else {
                continue;
            };
            if let (Some(since), Some(next), false) = (c.gap_since, c.next, c.asked)
                && now_ms.saturating_sub(since) >= wait_ms
            {
                c.asked = true;
                v.push((ch.clone(), next - 1));
            }
        }
        v
    }

    /// A fill (or re-read after a reconnect) came back: feed it, and allow asking again if a gap remains.
    pub fn filled(
        &mut self,
        channel: &str,
        msgs: Vec<Arc<Delivery>>,
        now_ms: u64,
        out: &mut Vec<Arc<Delivery>>,
    ) {
        let wanted = self.chans.get(channel).and_then(|c| c.next);
        let store_first = msgs.first().map(|d| d.offset);
        for d in msgs {
            self.push(d, now_ms, out);
        }
        let Some(key) = self.chans.get_key_value(channel).map(|(k, _)| k.clone()) else {
            return;
        };
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        c.asked = false;
        if c.held.is_empty() || c.next != wanted {
            return; // closed, or moved on: a later gap starts its own count
        }
        // The gap is still open at `wanted`. The store answered from after it: those offsets are gone.
        let gone = store_first.is_some_and(|f| wanted.is_some_and(|w| f > w));
        c.attempts += u32::from(store_first.is_none());
        if gone || c.attempts >= MAX_FILL_ATTEMPTS {
            self.skipped += 1;
            Self::skip_gap(&key, c, now_ms, out);
        } else {
            c.gap_since = Some(now_ms);
        }
        self.mark(&key);
    }

    /// The offset after which a catch-up read must start (after a reconnect), if tracked and synced.
    pub fn released_upto(&self, channel: &str) -> Option<u64> {
        self.chans.get(channel).and_then(|c| c.next).map(|n| n - 1)
    }

    /// Channels tracked and synced (live on the bus).
    /// Whether some channel holds messages waiting for a gap (then the backplane ticks often, to ask the
    /// store for the gap after [`crate::backplane::router::GAP_WAIT_MS`]).
    pub fn holding_any(&self) -> bool {
        !self.holding.is_empty()
    }

    pub fn synced(&self) -> usize {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(ch: &str, off: u64) -> Arc<Delivery> {
        Delivery::new(Arc::from(ch), off, format!("{{\"o\":{off}}}"))
    }

    fn offs(v: &[Arc<Delivery>]) -> Vec<u64> {
        v.iter().map(|d| d.offset).collect()
    }

    /// The per-tick scans are kept as counts and a set of holding channels; they must agree with a full
    /// scan through sync, untrack, gaps and fills.
    #[test]
    fn synced_count_and_gap_set_agree_with_the_channels() {
        let mut s = Sequencer::default();
        let mut out = Vec::new();
        for ch in ["a:1", "a:2", "a:3"] {
            s.track(Arc::from(ch));
        }
        s.sync("a:1", 5, 0, &mut out);
        s.sync("a:2", 0, 0, &mut out);
        s.sync("a:2", 0, 0, &mut out);
        assert_eq!(s.synced(), 2);
        s.untrack("a:2");
        assert_eq!(s.synced(), 1);
        s.untrack("a:3");
        assert_eq!(s.synced(), 1);
        // A gap on a:1 (7 before 6): found after the wait, once.
        s.push(d("a:1", 7), 10, &mut out);
        assert!(s.gaps(20, 100).is_empty(), "not waited long enough");
        assert_eq!(s.gaps(200, 100), [(Arc::from("a:1"), 5)]);
        assert!(s.gaps(400, 100).is_empty(), "asked already");
        s.filled("a:1", vec![d("a:1", 6), d("a:1", 7)], 500, &mut out);
        assert_eq!(offs(&out), [6, 7]);
        assert!(s.holding.is_empty());
        assert!(s.gaps(10_000, 100).is_empty());
        s.push(d("a:1", 9), 600, &mut out);
        s.untrack("a:1");
        assert!(s.holding.is_empty() && s.synced() == 0);
    }

    #[test]
    fn in_order_once_despite_reordering_and_duplicates() {
        let mut s = Sequencer::default();
        let mut out = Vec::new();
        s.track(Arc::from("c"));
        s.push(d("c", 6), 0, &mut out);
        assert!(out.is_empty(), "held until synced");
        s.sync("c", 4, 0, &mut out);
        assert!(out.is_empty(), "5 is missing");
        s.push(d("c", 5), 1, &mut out);
        assert_eq!(offs(&out), [5, 6]);
        s.push(d("c", 6), 2, &mut out);
        s.push(d("c", 4), 2, &mut out);
        assert_eq!(offs(&out), [5, 6], "duplicates and old ones dropped");
        s.push(d("x", 1), 2, &mut out);
        assert_eq!(offs(&out), [5, 6, 1], "untracked channels pass through");
    }

    #[test]
    fn a_gap_is_filled_from_the_store_after_the_wait() {
        let mut s = Sequencer::default();
        let mut out = Vec::new();
        s.track(Arc::from("c"));
        s.sync("c", 0, 0, &mut out);
        s.push(d("c", 1), 0, &mut out);
        s.push(d("c", 3), 10, &mut out);
        assert_eq!(offs(&out), [1]);
        assert!(s.gaps(40, 50).is_empty(), "not yet");
        let g = s.gaps(70, 50);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].1, 1, "read after 1");
        assert!(s.gaps(200, 50).is_empty(), "asked once");
        s.filled("c", vec![d("c", 2), d("c", 3)], 210, &mut out);
        assert_eq!(offs(&out), [1, 2, 3]);
    }

    #[test]
    fn a_gap_the_store_cannot_fill_is_skipped_with_a_reset() {
        let mut s = Sequencer::default();
        let mut out = Vec::new();
        s.track(Arc::from("t"));
        s.sync("t", 10, 0, &mut out);
        // 11..=19 were trimmed from the stream while this node was cut off; 20 and 21 arrive on the bus.
        s.push(d("t", 20), 0, &mut out);
        s.push(d("t", 21), 0, &mut out);
        assert!(out.is_empty());
        let g = s.gaps(100, 50);
        assert_eq!(g[0].1, 10);
        // The store answers from 15 on: 11..=14 are gone for good.
        s.filled("t", vec![d("t", 15), d("t", 16)], 110, &mut out);
        assert_eq!(offs(&out), [14, 15, 16], "a reset to 14, then the rest");
        assert!(is_reset(&out[0]));
        assert_eq!(
            std::str::from_utf8(&out[0].json).unwrap(),
            r#"{"type":"reset","channel":"t","offset":14}"#
        );
        assert_eq!(s.skipped, 1);
        // 17..=19 still missing: a fill that comes back empty three times gives up on them too.
        for i in 0..MAX_FILL_ATTEMPTS {
            assert_eq!(s.gaps(200 + 100 * u64::from(i), 50).len(), 1);
            s.filled("t", vec![], 210 + 100 * u64::from(i), &mut out);
        }
        assert_eq!(offs(&out), [14, 15, 16, 19, 20, 21]);
        assert!(is_reset(&out[3]));
        s.push(d("t", 22), 600, &mut out);
        assert_eq!(*offs(&out).last().unwrap(), 22, "flows again");
    }

    #[test]
    fn what_a_channel_holds_is_bounded_in_count_and_bytes() {
        let mut s = Sequencer::with_limits(Limits {
            max_held: 5,
            max_held_bytes: 1 << 20,
        });
        let mut out = Vec::new();
        s.track(Arc::from("t"));
        s.sync("t", 0, 0, &mut out);
        for off in 2..=6 {
            s.push(d("t", off), 0, &mut out);
        }
        assert!(out.is_empty(), "5 held, within the bound");
        s.push(d("t", 7), 0, &mut out);
        assert_eq!(offs(&out), [1, 2, 3, 4, 5, 6, 7], "reset to 1, then 2..=7");
        let mut s = Sequencer::with_limits(Limits {
            max_held: 1000,
            max_held_bytes: 21,
        });
        let mut out = Vec::new();
        s.track(Arc::from("t"));
        s.sync("t", 0, 0, &mut out);
        s.push(d("t", 3), 0, &mut out); // {"o":3} = 7 bytes; three fit in 21
        s.push(d("t", 4), 0, &mut out);
        s.push(d("t", 5), 0, &mut out);
        assert!(out.is_empty());
        s.push(d("t", 6), 0, &mut out);
        assert_eq!(offs(&out), [2, 3, 4, 5, 6], "past 21 bytes held: skipped");
    }

    proptest::proptest! {
        #[test]
        fn any_arrival_order_with_duplicates_releases_each_once_in_order(
            perm in proptest::sample::subsequence((1u64..=40).collect::<Vec<_>>(), 40).prop_shuffle(),
            dups in proptest::collection::vec(1u64..=40, 0..20),
        ) {
            let mut s = Sequencer::default();
            let mut out = Vec::new();
            s.track(Arc::from("c"));
            s.sync("c", 0, 0, &mut out);
            for (i, off) in perm.iter().chain(dups.iter()).enumerate() {
                s.push(d("c", *off), i as u64, &mut out);
            }
            prop_assert_eq!(offs(&out), (1..=40).collect::<Vec<_>>());
        }
    }
}
