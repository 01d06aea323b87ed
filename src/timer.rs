//! A hashed timer wheel for one event loop (sans-IO).
//!
//! Every loop keeps heartbeat and handshake deadlines for up to ~100k connections here. The wheel never
//! reads the clock: the caller passes `now` to [`TimerWheel::poll_expired`] and asks
//! [`TimerWheel::next_deadline`] how long it may sleep in `poll()`.
//!
//! # Time model
//!
//! Time is measured in whole ticks since the wheel's origin (the `now` given to [`TimerWheel::new`]).
//! A deadline is rounded *up* to a tick, and a poll at `now` processes every tick up to `now` rounded
//! *down*, so a timer never fires before its deadline (at most one tick late). `current` is the last tick
//! the wheel has processed: every timer with a tick `<= current` has already fired, except the ones that
//! were inserted already overdue, which wait on a separate "due" list for the next poll.
//!
//! # Layout, and why
//!
//! * **Entries live in a [`Slab`]**, linked into intrusive doubly-linked lists by `u32` indices (one list per
//!   slot, plus the due list). Insert and cancel are O(1) (link/unlink at a known index, no search), the
//!   lists need no per-node allocation, and a freed slab slot is reused by the next insert, so once the
//!   slab has grown to the peak number of pending timers, inserting, cancelling and ticking allocate
//!   nothing. `u32` links keep an entry small (the value plus 24 bytes of bookkeeping).
//! * **Keys carry a generation.** Slab indices are reused, so a bare index could cancel someone else's
//!   timer after the original fired. Each insert takes a fresh generation from a wrapping counter; a key
//!   whose generation does not match the entry at its index is stale and `cancel` is a no-op. (An alias
//!   would need the same index to be occupied by exactly the 2^32-th later insert: negligible.)
//! * **An occupancy bitmap** (`Vec<u64>`, one bit per slot) mirrors "this slot's list is non-empty". With
//!   100k timers in, say, 4096 slots most slots are occupied, but with a few timers most are empty; either
//!   way `next_deadline` and the per-poll walk find the next occupied slot with `trailing_zeros`, 64 slots
//!   per instruction, instead of touching every slot head. That makes `next_deadline` cheap enough to call
//!   before every `poll()`.
//! * **Timers more than one revolution ahead** share a slot with nearer ones (slot = tick mod slots). Each
//!   entry stores its absolute tick, so a slot visit fires only the entries whose tick has come. For
//!   `next_deadline` the first occupied slot is only a lower bound in that case; the caller wakes, nothing
//!   fires, and it asks again, which is cheap.
//! * **Big jumps** (the loop was stalled for more than a revolution) visit every occupied slot once rather
//!   than every tick in between; the expired entries are collected with their ticks into a reused scratch
//!   vector and sorted, so the output is still in deadline order.
//!
//! About 360 lines of wheel; the rest of the file is its unit and property tests.

use std::time::{Duration, Instant};

use slab::Slab;

/// "No entry" in the intrusive links.
const NIL: u32 = u32::MAX;

/// Handle to a pending timer, returned by [`TimerWheel::insert`] and used by [`TimerWheel::cancel`].
///
/// Keys are cheap to copy and safe to keep after the timer fired: a stale key never matches again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: u32,
}

/// One pending timer, a node of the list of the slot (or due list) it is in.
struct Entry<T> {
    value: T,
    /// Deadline in ticks since the origin, rounded up.
    tick: u64,
    generation: u32,
    /// Index into `heads` of the list this entry is linked into (`slots` is the due list).
    list: u32,
    prev: u32,
    next: u32,
}

/// A hashed timer wheel; see the module documentation.
pub struct TimerWheel<T> {
    origin: Instant,
    /// Tick length in nanoseconds (non-zero).
    tick_ns: u64,
    /// `slots - 1`; `slots` is a power of two.
    mask: u64,
    /// Last tick processed: every wheel entry has `tick > current`.
    current: u64,
    entries: Slab<Entry<T>>,
    /// List heads: `heads[s]` for slot `s < slots`, and `heads[slots]` for the due list (timers that were
    /// already overdue when inserted; they fire on the next poll whatever its `now`).
    heads: Vec<u32>,
    /// Bit `s` set iff `heads[s] != NIL`, for `s < slots` (the due list is not tracked here).
    occupied: Vec<u64>,
    /// Smallest tick on the due list (a lower bound once some were cancelled); meaningless when it is empty.
    due_min: u64,
    next_generation: u32,
    /// Reused buffer of `(tick, index)` for expired entries that must be sorted before firing.
    scratch: Vec<(u64, u32)>,
}

impl<T> TimerWheel<T> {
    /// `tick`: resolution (e.g. 10 ms); `slots`: rounded up to a power of two, at least 64. `now`: the
    /// wheel's origin.
    ///
    /// # Panics
    /// If `tick` is zero or longer than `u64::MAX` nanoseconds, or `slots` exceeds 2^31.
    pub fn new(tick: Duration, slots: usize, now: Instant) -> Self {
        let tick_ns = u64::try_from(tick.as_nanos()).expect("timer tick too long");
        assert!(tick_ns > 0, "timer tick must be non-zero");
        assert!(slots <= 1 << 31, "too many timer slots");
        let slots = slots.max(64).next_power_of_two();
        TimerWheel {
            origin: now,
            tick_ns,
            mask: slots as u64 - 1,
            current: 0,
            entries: Slab::new(),
            heads: vec![NIL; slots + 1],
            occupied: vec![0; slots / 64],
            due_min: u64::MAX,
            next_generation: 0,
            scratch: Vec::new(),
        }
    }

    /// Deadlines in the past or within the current tick fire on the next `poll_expired`. Deadlines are
    /// rounded UP to a tick (never fire early).
    pub fn insert(&mut self, deadline: Instant, value: T) -> TimerKey {
        let tick = self.tick_ceil(deadline);
        let list = if tick <= self.current {
            // Already due as far as the wheel is concerned: its slot was (or is being) passed.
            if self.heads[self.due_list()] == NIL {
                self.due_min = tick;
            } else {
                self.due_min = self.due_min.min(tick);
            }
            self.due_list()
        } else {
            self.slot_of(tick)
        };
        let generation = self.next_generation;
        self.next_generation = generation.wrapping_add(1);
        let index = self.entries.insert(Entry {
            value,
            tick,
            generation,
            list: list as u32,
            prev: NIL,
            next: NIL,
        });
        let index = u32::try_from(index)
            .ok()
            .filter(|&i| i != NIL)
            .expect("too many timers");
        self.link(list, index);
        TimerKey { index, generation }
    }

    /// Removes a pending timer; None if it already fired, was cancelled, or the key is stale.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        match self.entries.get(key.index as usize) {
            Some(e) if e.generation == key.generation => {}
            _ => return None,
        }
        self.unlink(key.index);
        Some(self.entries.remove(key.index as usize).value)
    }

    /// The tick-rounded deadline of a pending timer; None if the key is not pending.
    pub fn deadline(&self, key: TimerKey) -> Option<Instant> {
        match self.entries.get(key.index as usize) {
            Some(e) if e.generation == key.generation => Some(self.instant_of(e.tick)),
            _ => None,
        }
    }

    /// Advances the wheel to `now` and appends every value whose deadline <= now (tick-rounded) to `out`,
    /// in deadline-tick order (ties in any order). Correct when `now` jumps far ahead (e.g. several
    /// revolutions): then it walks at most one revolution of slots, not every tick in between.
    pub fn poll_expired(&mut self, now: Instant, out: &mut Vec<T>) {
        let now_tick = self.tick_floor(now);
        let slots = self.heads.len() - 1;
        let jump = now_tick > self.current && now_tick - self.current >= slots as u64;

        // Phase 1: entries that cannot be fired slot by slot in tick order go through `scratch`: the due
        // list (arbitrary ticks, all <= current) and, after a jump of a revolution or more, every expired
        // entry of the wheel (a slot then holds expired entries of several revolutions).
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let due = self.due_list();
        while self.heads[due] != NIL {
            let index = self.heads[due];
            self.unlink(index);
            scratch.push((self.entries[index as usize].tick, index));
        }
        if jump {
            for word in 0..self.occupied.len() {
                let mut bits = self.occupied[word];
                while bits != 0 {
                    let slot = word * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    self.collect_expired(slot, now_tick, &mut scratch);
                }
            }
        }
        scratch.sort_unstable_by_key(|&(tick, _)| tick);
        out.extend(
            scratch
                .drain(..)
                .map(|(_, index)| self.entries.remove(index as usize).value),
        );
        self.scratch = scratch;

        // Phase 2: a step of less than a revolution visits the occupied slots of ticks
        // current+1 ..= now_tick in order; each holds at most one tick's worth of expired entries.
        if !jump && now_tick > self.current {
            let mut tick = self.current + 1;
            while let Some(dist) = self.next_occupied(self.slot_of(tick), now_tick - tick) {
                tick += dist;
                let slot = self.slot_of(tick);
                let mut index = self.heads[slot];
                while index != NIL {
                    let entry = &self.entries[index as usize];
                    let next = entry.next;
                    if entry.tick == tick {
                        self.unlink(index);
                        out.push(self.entries.remove(index as usize).value);
                    }
                    index = next;
                }
                if tick == now_tick {
                    break;
                }
                tick += 1;
            }
        }
        self.current = self.current.max(now_tick);
    }

    /// The earliest instant at which `poll_expired` might return something; None when empty. Never later
    /// than the true earliest deadline; equal to it when the first occupied slot holds a timer due within
    /// the current revolution (always the case when every timer is less than one revolution ahead).
    /// Overdue timers report their (past) deadline: wake at once.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.entries.is_empty() {
            return None;
        }
        if self.heads[self.due_list()] != NIL {
            return Some(self.instant_of(self.due_min));
        }
        // Every wheel entry has a tick > current; the entries of the slot at distance `d` from the cursor
        // have ticks current + d + k * slots, so the first occupied slot gives a lower bound.
        let start = self.current.wrapping_add(1);
        let max = self.mask; // distances 0 ..= slots-1 cover every slot
        let dist = self
            .next_occupied(self.slot_of(start), max)
            .expect("non-empty wheel has an occupied slot");
        Some(self.instant_of(start + dist))
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    // ---- internals ----

    fn due_list(&self) -> usize {
        self.heads.len() - 1
    }

    fn slot_of(&self, tick: u64) -> usize {
        (tick & self.mask) as usize
    }

    /// Deadline rounded up to a whole tick since the origin (0 for instants before the origin).
    fn tick_ceil(&self, t: Instant) -> u64 {
        let ns = t.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(ns.div_ceil(u128::from(self.tick_ns))).unwrap_or(u64::MAX)
    }

    /// `now` rounded down to a whole tick since the origin.
    fn tick_floor(&self, t: Instant) -> u64 {
        let ns = t.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(ns / u128::from(self.tick_ns)).unwrap_or(u64::MAX)
    }

    fn instant_of(&self, tick: u64) -> Instant {
        let ns = u128::from(tick) * u128::from(self.tick_ns);
        let secs = u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX);
        let dur = Duration::new(secs, (ns % 1_000_000_000) as u32);
        self.origin
            .checked_add(dur)
            .expect("timer deadline beyond the range of Instant")
    }

    /// Distance `d <= max` from `slot` (wrapping) to the first occupied slot, if any.
    fn next_occupied(&self, slot: usize, max: u64) -> Option<u64> {
        let words = self.occupied.len();
        let mut word = slot / 64;
        // Ignore the bits below `slot` in its own word on the first visit.
        let mut bits = self.occupied[word] & (!0u64 << (slot % 64));
        let mut base = (word * 64) as u64; // slot number of bit 0 of `bits`, unwrapped
        // `words + 1` visits: the starting word is seen again, in full, after wrapping.
        for _ in 0..=words {
            if bits != 0 {
                let dist = base + u64::from(bits.trailing_zeros()) - slot as u64;
                return (dist <= max).then_some(dist);
            }
            base += 64;
            if base - slot as u64 > max {
                return None;
            }
            word = (word + 1) % words;
            bits = self.occupied[word];
        }
        None
    }

    /// Moves every entry of `slot` with `tick <= now_tick` from the slot to `scratch`.
    fn collect_expired(&mut self, slot: usize, now_tick: u64, scratch: &mut Vec<(u64, u32)>) {
        let mut index = self.heads[slot];
        while index != NIL {
            let entry = &self.entries[index as usize];
            let (next, tick) = (entry.next, entry.tick);
            if tick <= now_tick {
                self.unlink(index);
                scratch.push((tick, index));
            }
            index = next;
        }
    }

    /// Pushes `index` at the head of list `list`.
    fn link(&mut self, list: usize, index: u32) {
        let old = self.heads[list];
        if old != NIL {
            self.entries[old as usize].prev = index;
        }
        let entry = &mut self.entries[index as usize];
        entry.prev = NIL;
        entry.next = old;
        self.heads[list] = index;
        if list < self.due_list() {
            self.occupied[list / 64] |= 1 << (list % 64);
        }
    }

    /// Takes `index` out of its list (it stays in the slab).
    fn unlink(&mut self, index: u32) {
        let entry = &self.entries[index as usize];
        let (list, prev, next) = (entry.list as usize, entry.prev, entry.next);
        if prev == NIL {
            self.heads[list] = next;
            if next == NIL && list < self.due_list() {
                self.occupied[list / 64] &= !(1 << (list % 64));
            }
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const MS: Duration = Duration::from_millis(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn wheel(slots: usize) -> (TimerWheel<u64>, Instant) {
        let origin = Instant::now();
        (TimerWheel::new(MS * 10, slots, origin), origin)
    }

    fn poll(w: &mut TimerWheel<u64>, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        w.poll_expired(now, &mut out);
        out
    }

    #[test]
    fn slots_round_up_to_power_of_two_at_least_64() {
        let o = Instant::now();
        assert_eq!(TimerWheel::<()>::new(MS, 1, o).heads.len() - 1, 64);
        assert_eq!(TimerWheel::<()>::new(MS, 100, o).heads.len() - 1, 128);
        assert_eq!(TimerWheel::<()>::new(MS, 4096, o).heads.len() - 1, 4096);
    }

    #[test]
    fn fires_at_or_after_deadline_never_before() {
        let (mut w, o) = wheel(64);
        let k = w.insert(o + MS * 25, 1);
        assert_eq!(w.deadline(k), Some(o + MS * 30), "rounded up to a tick");
        assert!(poll(&mut w, o + MS * 20).is_empty());
        assert!(
            poll(&mut w, o + MS * 25).is_empty(),
            "deadline itself is inside tick 3"
        );
        assert!(poll(&mut w, o + MS * 30 - Duration::from_nanos(1)).is_empty());
        assert_eq!(poll(&mut w, o + MS * 30), vec![1]);
        assert!(w.is_empty());
        assert_eq!(w.deadline(k), None);
        assert!(poll(&mut w, o + MS * 1000).is_empty());
    }

    #[test]
    fn past_and_current_tick_deadlines_fire_on_next_poll() {
        let (mut w, o) = wheel(64);
        // Bring the wheel to tick 5, then insert deadlines at and before it, and one before the origin.
        assert!(poll(&mut w, o + MS * 55).is_empty());
        w.insert(o + MS * 50, 1);
        w.insert(o + MS * 12, 2);
        w.insert(o.checked_sub(MS * 100).unwrap_or(o), 3);
        w.insert(o + MS * 51, 4); // tick 6: not yet
        assert!(w.next_deadline().unwrap() <= o + MS * 10);
        // Same `now` again: the overdue ones fire, in tick order.
        assert_eq!(poll(&mut w, o + MS * 55), vec![3, 2, 1]);
        assert_eq!(w.next_deadline(), Some(o + MS * 60));
        assert_eq!(poll(&mut w, o + MS * 60), vec![4]);
    }

    #[test]
    fn fires_in_deadline_order_within_a_step() {
        let (mut w, o) = wheel(64);
        for i in (1..=20u64).rev() {
            w.insert(o + ms(10 * i), i);
        }
        w.insert(o + MS * 100, 100); // tie with 10
        let out = poll(&mut w, o + MS * 200);
        let ticks: Vec<u64> = out.iter().map(|&v| if v == 100 { 10 } else { v }).collect();
        assert!(ticks.windows(2).all(|p| p[0] <= p[1]), "{out:?}");
        assert_eq!(out.len(), 21);
    }

    #[test]
    fn cancel_before_firing() {
        let (mut w, o) = wheel(64);
        let a = w.insert(o + MS * 30, 1);
        let b = w.insert(o + MS * 30, 2);
        assert_eq!(w.len(), 2);
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(w.cancel(a), None, "second cancel is a no-op");
        assert_eq!(w.len(), 1);
        assert_eq!(poll(&mut w, o + MS * 40), vec![2]);
        assert_eq!(w.cancel(b), None);
    }

    #[test]
    fn cancel_after_firing_returns_none() {
        let (mut w, o) = wheel(64);
        let k = w.insert(o + MS * 10, 7);
        assert_eq!(poll(&mut w, o + MS * 10), vec![7]);
        assert_eq!(w.cancel(k), None);
        assert!(w.is_empty());
    }

    #[test]
    fn stale_key_after_slot_reuse_is_a_no_op() {
        let (mut w, o) = wheel(64);
        let old = w.insert(o + MS * 10, 1);
        assert_eq!(poll(&mut w, o + MS * 10), vec![1]);
        let new = w.insert(o + MS * 50, 2);
        assert_eq!(old.index, new.index, "slab slot reused");
        assert_ne!(old, new);
        assert_eq!(w.cancel(old), None);
        assert_eq!(w.deadline(old), None);
        assert_eq!(w.len(), 1);
        assert_eq!(poll(&mut w, o + MS * 50), vec![2]);
    }

    #[test]
    fn beyond_one_revolution_fires_on_time_not_a_revolution_early() {
        let (mut w, o) = wheel(64);
        // Tick 64*3 + 5 = 197 shares slot 5 with tick 5 (and 69, 133).
        w.insert(o + MS * 10 * 197, 1);
        w.insert(o + MS * 10 * 5, 2);
        for t in 1..197u64 {
            let out = poll(&mut w, o + ms(10 * t));
            if t == 5 {
                assert_eq!(out, vec![2]);
            } else {
                assert!(out.is_empty(), "fired at tick {t}");
            }
            assert!(w.next_deadline().unwrap() <= o + MS * 10 * 197);
        }
        assert_eq!(poll(&mut w, o + MS * 10 * 197), vec![1]);
        assert!(w.is_empty());
    }

    #[test]
    fn large_time_jump_fires_everything_due_in_order() {
        let (mut w, o) = wheel(64);
        // Ticks spread over ~10 revolutions, inserted in scrambled order.
        let ticks: Vec<u64> = (0..200).map(|i| 1 + (i * 37) % 640).collect();
        for &t in &ticks {
            w.insert(o + ms(10 * t), t);
        }
        w.insert(o + MS * 10 * 10_000, 99_999);
        // Jump to tick 400 (> 6 revolutions): everything <= 400 fires, in order; the rest stays.
        let out = poll(&mut w, o + MS * 10 * 400 + MS * 5);
        let mut want: Vec<u64> = ticks.iter().copied().filter(|&t| t <= 400).collect();
        want.sort_unstable();
        assert_eq!(out, want);
        assert_eq!(w.len(), 201 - want.len());
        // A huge jump (thousands of revolutions) then fires the rest, still in order.
        let out = poll(&mut w, o + Duration::from_secs(3600));
        let mut rest: Vec<u64> = ticks.iter().copied().filter(|&t| t > 400).collect();
        rest.sort_unstable();
        rest.push(99_999);
        assert_eq!(out, rest);
        assert!(w.is_empty());
        // And the wheel keeps working after the jump.
        w.insert(o + Duration::from_secs(3600) + MS * 15, 5);
        assert!(poll(&mut w, o + Duration::from_secs(3600) + MS * 19).is_empty());
        assert_eq!(
            poll(&mut w, o + Duration::from_secs(3600) + MS * 20),
            vec![5]
        );
    }

    #[test]
    fn next_deadline_is_exact_within_a_revolution_and_a_lower_bound_beyond() {
        let (mut w, o) = wheel(64);
        assert_eq!(w.next_deadline(), None);
        // Tick 250 lives in slot 58, past every nearer timer below.
        let far = w.insert(o + MS * 10 * 250, 1);
        let lb = w.next_deadline().unwrap();
        assert!(lb <= o + MS * 10 * 250);
        assert!(lb > o, "a lower bound, but not a useless one");
        let k = w.insert(o + MS * 333, 2);
        assert_eq!(w.next_deadline(), Some(o + MS * 340));
        w.insert(o + MS * 10 * 63, 3);
        assert_eq!(w.next_deadline(), Some(o + MS * 340));
        assert_eq!(w.cancel(k), Some(2));
        assert_eq!(w.cancel(far), Some(1));
        assert_eq!(w.next_deadline(), Some(o + MS * 630));
        // After the cursor moved, distances wrap around the end of the bitmap.
        assert!(poll(&mut w, o + MS * 10 * 60).is_empty());
        w.insert(o + MS * 10 * 70, 4); // slot 6, behind the cursor
        assert_eq!(w.next_deadline(), Some(o + MS * 630));
        assert_eq!(poll(&mut w, o + MS * 10 * 63), vec![3]);
        assert_eq!(w.next_deadline(), Some(o + MS * 700));
        assert_eq!(poll(&mut w, o + MS * 10 * 70), vec![4]);
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn no_allocation_growth_after_warm_up() {
        let (mut w, o) = wheel(1024);
        let mut keys = Vec::with_capacity(1000);
        let mut out = Vec::with_capacity(1000);
        let mut now = o;
        let mut cycle = |w: &mut TimerWheel<u64>, i: u64| {
            keys.clear();
            for j in 0..1000u64 {
                keys.push(w.insert(now + ms(j * 3), j));
            }
            for k in keys.iter().step_by(2) {
                w.cancel(*k);
            }
            now += ms(10 * (i % 7));
            out.clear();
            w.poll_expired(now, &mut out);
            // Big jump now and then, to exercise the sort buffer.
            if i % 100 == 99 {
                now += Duration::from_secs(60);
            }
            out.clear();
            w.poll_expired(now, &mut out);
            for k in &keys {
                w.cancel(*k);
            }
            assert!(w.is_empty());
        };
        for i in 0..100 {
            cycle(&mut w, i);
        }
        let caps = (
            w.entries.capacity(),
            w.scratch.capacity(),
            w.heads.capacity(),
            w.occupied.capacity(),
        );
        for i in 100..10_100 {
            cycle(&mut w, i);
        }
        let after = (
            w.entries.capacity(),
            w.scratch.capacity(),
            w.heads.capacity(),
            w.occupied.capacity(),
        );
        assert_eq!(caps, after);
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Delay in ticks from the wheel's current tick, and how far before that tick boundary (in ns).
        Insert(u64, u64),
        /// Picks one of the keys handed out so far (fired, cancelled or pending).
        Cancel(usize),
        /// Advance by this many ticks, plus a fraction of a tick (in ns).
        Advance(u64, u64),
    }

    const SLOTS: u64 = 64;
    const TICK_NS: u64 = 1_000_000;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3 * SLOTS, 0..TICK_NS).prop_map(|(d, s)| Op::Insert(d, s)),
            2 => any::<usize>().prop_map(Op::Cancel),
            2 => (0..2 * SLOTS, 0..TICK_NS).prop_map(|(d, f)| Op::Advance(d, f)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn matches_btreemap_model(ops in prop::collection::vec(op(), 1..200)) {
            let origin = Instant::now();
            let at = |ns: u64| origin + Duration::from_nanos(ns);
            let mut w = TimerWheel::new(Duration::from_nanos(TICK_NS), SLOTS as usize, origin);
            let mut model: BTreeMap<(u64, u64), u64> = BTreeMap::new();
            let mut keys: Vec<(TimerKey, u64, u64)> = Vec::new();
            let mut now_tick = 0u64;
            let mut seq = 0u64;
            for op in ops {
                match op {
                    Op::Insert(delay, before) => {
                        let tick = now_tick + delay;
                        // Any instant in (tick - 1, tick] ticks rounds up to `tick`.
                        let ns = (tick * TICK_NS).saturating_sub(before);
                        let key = w.insert(at(ns), seq);
                        prop_assert_eq!(w.deadline(key), Some(at(tick * TICK_NS)));
                        model.insert((tick, seq), seq);
                        keys.push((key, tick, seq));
                        seq += 1;
                    }
                    Op::Cancel(i) => {
                        if !keys.is_empty() {
                            let (key, tick, s) = keys[i % keys.len()];
                            prop_assert_eq!(w.cancel(key), model.remove(&(tick, s)));
                        }
                    }
                    Op::Advance(ticks, frac) => {
                        now_tick += ticks;
                        let mut out = Vec::new();
                        w.poll_expired(at(now_tick * TICK_NS + frac), &mut out);
                        let rest = model.split_off(&(now_tick + 1, 0));
                        let want: Vec<(u64, u64)> = std::mem::replace(&mut model, rest).into_keys().collect();
                        // Same set, and the wheel's order is by tick.
                        let tick_of = |v: &u64| want.iter().find(|(_, s)| s == v).map(|&(t, _)| t);
                        let got_ticks: Vec<Option<u64>> = out.iter().map(tick_of).collect();
                        prop_assert!(got_ticks.iter().all(Option::is_some), "fired too much: {:?}", out);
                        prop_assert!(got_ticks.windows(2).all(|p| p[0] <= p[1]), "order: {:?}", got_ticks);
                        let mut got = out.clone();
                        got.sort_unstable();
                        let mut want_vals: Vec<u64> = want.iter().map(|&(_, s)| s).collect();
                        want_vals.sort_unstable();
                        prop_assert_eq!(got, want_vals);
                    }
                }
                prop_assert_eq!(w.len(), model.len());
                match model.keys().next() {
                    None => prop_assert_eq!(w.next_deadline(), None),
                    Some(&(first, _)) => {
                        let nd = w.next_deadline().unwrap();
                        prop_assert!(nd <= at(first * TICK_NS));
                        // Exact when every pending timer is within one revolution of the cursor and none
                        // is overdue.
                        let last = model.keys().next_back().unwrap().0;
                        if first > w.current && last <= w.current + SLOTS {
                            prop_assert_eq!(nd, at(first * TICK_NS));
                        }
                    }
                }
            }
        }
    }
}
