//! Per-channel ordering and dedupe for cluster mode.
//!
//! With several nodes appending to one channel, offsets come from Redis `INCR` in commit order, but they reach
//! a node by different paths (its own commits, pub/sub from each other node) and can arrive out of order, twice
//! (a re-read after a reconnect overlaps pub/sub), or not at all (pub/sub is at-most-once). The sequencer
//! releases each channel's messages in offset order exactly once: a message beyond the next expected offset is
//! held; a gap older than the wait is filled from the store (the caller reads after `next - 1`); a message at or
//! below what was released is a duplicate and dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Delivery;

#[derive(Default)]
struct Chan {
    /// The next offset to release; None until the channel's current end is known (`sync`).
    next: Option<u64>,
    held: BTreeMap<u64, Arc<Delivery>>,
    /// When the oldest gap was first seen (ms); a fill was asked for when `asked` is set.
    gap_since: Option<u64>,
    asked: bool,
}

#[derive(Default)]
pub struct Sequencer {
    chans: HashMap<Arc<str>, Chan>,
}

impl Sequencer {
    pub fn is_tracked(&self, channel: &str) -> bool {
        self.chans.contains_key(channel)
    }

    /// Starts tracking a channel; messages are held until [`Sequencer::sync`] says where it ends.
    pub fn track(&mut self, channel: Arc<str>) {
        self.chans.entry(channel).or_default();
    }

    pub fn untrack(&mut self, channel: &str) {
        self.chans.remove(channel);
    }

    /// The channel's last committed offset when tracking began (from the store). Held messages after it are
    /// released in order.
    pub fn sync(&mut self, channel: &str, last: u64, now_ms: u64, out: &mut Vec<Arc<Delivery>>) {
        let Some(c) = self.chans.get_mut(channel) else {
            return;
        };
        if c.next.is_none() {
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
        c.held.insert(d.offset, d);
        Self::release(c, now_ms, out);
    }

    fn release(c: &mut Chan, now_ms: u64, out: &mut Vec<Arc<Delivery>>) {
        let Some(mut next) = c.next else { return };
        while let Some(d) = c.held.remove(&next) {
            out.push(d);
            next += 1;
        }
        // Drop anything below `next` that a re-read delivered twice.
        c.held = c.held.split_off(&next);
        c.next = Some(next);
        if c.held.is_empty() {
            c.gap_since = None;
            c.asked = false;
        } else if c.gap_since.is_none() {
            c.gap_since = Some(now_ms);
        }
    }

    /// Channels whose gap is older than `wait_ms` and not yet asked for: (channel, read after this offset).
    pub fn gaps(&mut self, now_ms: u64, wait_ms: u64) -> Vec<(Arc<str>, u64)> {
        let mut v = Vec::new();
        for (ch, c) in self.chans.iter_mut() {
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
        for d in msgs {
            self.push(d, now_ms, out);
        }
        if let Some(c) = self.chans.get_mut(channel) {
            c.asked = false;
            if !c.held.is_empty() {
                c.gap_since = Some(now_ms);
            }
        }
    }

    /// The offset after which a catch-up read must start (after a reconnect), if tracked and synced.
    pub fn released_upto(&self, channel: &str) -> Option<u64> {
        self.chans.get(channel).and_then(|c| c.next).map(|n| n - 1)
    }

    /// Channels tracked and synced (live on the bus).
    pub fn synced(&self) -> usize {
        self.chans.values().filter(|c| c.next.is_some()).count()
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
