//! Opening a worker's share of connections: at most `max_pending` handshakes in flight, each bounded by
//! the connect timeout, the whole phase bounded by the run's deadline. Optionally, a connection the
//! server asks to come back later (close 1013 before it was ready, or a 503 answer) is reconnected after
//! a backoff, at most `retries` times, as a real client would.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

use crate::net::{Event, Net, Rng, StartError};
use crate::stats::{self, Tally};
use crate::workers::{Cmd, Link};

pub const FILE_LIMIT: &str = "open-file limit reached; use --procs";
/// Connections started per turn before the loop looks at events again (so that handshake times of
/// the first connections do not include starting all the others).
const FILL_BATCH: usize = 256;

pub struct Opener {
    next: usize,
    end: usize,
    /// 0: no limit (all at once).
    max_pending: usize,
    connect_timeout: Duration,
    pub deadline: Instant,
    pub pending: usize,
    pub open: usize,
    pub failed: Tally,
    pub file_limit: bool,
    pub stopped: bool,
    /// connect() to response head, µs.
    pub handshake: Histogram<u64>,
    /// Two-stage opening (see [`Opener::two_stage`]): connect() to the caller's [`Opener::app_open`].
    pub ready: Histogram<u64>,
    two_stage: bool,
    /// Reconnects allowed per connection for [`retryable`] failures (0: none).
    retries: u32,
    /// With retries: the connection index and attempt of each connection in flight, by engine id.
    in_flight: HashMap<usize, (usize, u32)>,
    /// Reconnects waiting for their time: (due, index, attempt).
    retry_queue: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    /// Reconnects made, by the reason of the failure that caused them.
    pub retried: Tally,
    rng: Rng,
    pub first_start: Option<Instant>,
    pub last_open: Option<Instant>,
    last_progress: Instant,
    last_expire: Instant,
}

impl Opener {
    pub fn new(
        range: std::ops::Range<usize>,
        max_pending: usize,
        connect_timeout: Duration,
        deadline: Instant,
    ) -> Opener {
        Opener {
            next: range.start,
            end: range.end,
            max_pending,
            connect_timeout,
            deadline,
            pending: 0,
            open: 0,
            failed: Tally::default(),
            file_limit: false,
            stopped: false,
            handshake: stats::histogram(),
            ready: stats::histogram(),
            two_stage: false,
            retries: 0,
            in_flight: HashMap::new(),
            retry_queue: BinaryHeap::new(),
            retried: Tally::default(),
            rng: Rng::new(),
            first_start: None,
            last_open: None,
            last_progress: Instant::now(),
            last_expire: Instant::now(),
        }
    }

    /// A connection whose handshake is done still counts as pending (in flight, not open) until the
    /// caller says it is ready ([`Opener::app_open`], e.g. once a subscription is answered) or failed
    /// ([`Opener::app_fail`]).
    pub fn two_stage(mut self) -> Opener {
        self.two_stage = true;
        self
    }

    /// Reconnect a connection at most `n` times when the server asks it to come back later.
    pub fn with_retries(mut self, n: u32) -> Opener {
        self.retries = n;
        self
    }

    /// Two-stage: connection `id`, started at `since` (its connect()), is ready.
    pub fn app_open(&mut self, id: usize, since: Instant) {
        self.in_flight.remove(&id);
        self.pending = self.pending.saturating_sub(1);
        self.open += 1;
        stats::record(&mut self.ready, since.elapsed());
        self.last_open = Some(Instant::now());
    }

    /// Two-stage: connection `id`, past its handshake, failed before it was ready (it is reconnected
    /// later instead if the reason is [`retryable`] and it has retries left).
    pub fn app_fail(&mut self, id: usize, reason: &str) {
        self.pending = self.pending.saturating_sub(1);
        if !self.retry(id, reason) {
            self.failed.add(reason, 1);
        }
    }

    /// Schedules a reconnect of `id` if allowed; false if it is not (the failure stands).
    fn retry(&mut self, id: usize, reason: &str) -> bool {
        let Some((index, attempt)) = self.in_flight.remove(&id) else {
            return false;
        };
        if attempt >= self.retries || !retryable(reason) {
            return false;
        }
        // 250 ms doubling per attempt, at most 8 s, with ±50 % jitter so retries do not come in waves.
        let base = Duration::from_millis(250) * 2u32.saturating_pow(attempt.min(5));
        let base = base.min(Duration::from_secs(8));
        let jitter = 0.5 + (self.rng.next_u64() % 1000) as f64 / 1000.0;
        let due = Instant::now() + base.mul_f64(jitter);
        if due + self.connect_timeout >= self.deadline {
            return false;
        }
        self.retried.add(reason, 1);
        self.retry_queue.push(Reverse((due, index, attempt + 1)));
        true
    }

    /// Every connection of the share has opened or failed.
    pub fn done(&self) -> bool {
        self.next >= self.end && self.pending == 0 && self.retry_queue.is_empty()
    }

    /// A reconnect whose time has come, if the in-flight limit allows one.
    fn due_retry(&mut self) -> Option<(usize, u32)> {
        if self.max_pending != 0 && self.pending >= self.max_pending {
            return None;
        }
        let Reverse((due, _, _)) = self.retry_queue.peek()?;
        if *due > Instant::now() {
            return None;
        }
        let Reverse((_, index, attempt)) = self.retry_queue.pop()?;
        Some((index, attempt))
    }

    /// Starts connections up to the in-flight limit; `query(i)` gives connection `i`'s extra query.
    pub fn fill(&mut self, net: &mut Net, query: &mut dyn FnMut(usize) -> String) {
        let mut batch = 0;
        while batch < FILL_BATCH {
            let (i, attempt) = match self.due_retry() {
                Some(r) => r,
                None if self.can_start() => {
                    self.next += 1;
                    (self.next - 1, 0)
                }
                None => break,
            };
            batch += 1;
            let q = query(i);
            self.first_start.get_or_insert_with(Instant::now);
            match net.connect(&q, i) {
                Ok(id) => {
                    self.pending += 1;
                    if self.retries > 0 {
                        self.in_flight.insert(id, (i, attempt));
                    }
                }
                Err(StartError::FileLimit) => {
                    let left = (self.end - self.next) as u64 + 1 + self.retry_queue.len() as u64;
                    self.retry_queue.clear();
                    eprintln!(
                        "corelay-load: {FILE_LIMIT} ({} sockets open in this process, {left} connections not attempted)",
                        net.live()
                    );
                    self.failed.add(FILE_LIMIT, left);
                    self.file_limit = true;
                    self.next = self.end;
                }
                Err(StartError::Other(reason)) => self.failed.add(&reason, 1),
            }
        }
    }

    /// More connections are waiting to be started and the in-flight limit allows one.
    fn can_start(&self) -> bool {
        self.next < self.end && (self.max_pending == 0 || self.pending < self.max_pending)
    }

    /// A connection counted as open was refused after all (a long poll answered with an error status).
    pub fn reject(&mut self, reason: &str) {
        self.open = self.open.saturating_sub(1);
        self.failed.add(reason, 1);
    }

    /// Accounts an event (connections that fail after opening are the caller's business).
    pub fn on_event(&mut self, ev: &Event<'_>) {
        match ev {
            Event::Open { id, handshake } => {
                stats::record(&mut self.handshake, *handshake);
                if !self.two_stage {
                    self.in_flight.remove(id);
                    self.pending = self.pending.saturating_sub(1);
                    self.open += 1;
                    self.last_open = Some(Instant::now());
                }
            }
            Event::Failed {
                id,
                reason,
                opened: false,
            } => {
                self.pending = self.pending.saturating_sub(1);
                if !self.retry(*id, reason) {
                    self.failed.add(reason, 1);
                }
            }
            _ => {}
        }
    }

    /// One turn of the opening phase: start connections, wait up to 20 ms for events, expire slow
    /// handshakes, report progress. False when the deadline passed or the coordinator said stop.
    pub fn step<F>(
        &mut self,
        net: &mut Net,
        link: &Link,
        query: &mut dyn FnMut(usize) -> String,
        h: &mut F,
    ) -> anyhow::Result<bool>
    where
        F: FnMut(&mut Net, &mut Opener, Event<'_>),
    {
        self.fill(net, query);
        let now = Instant::now();
        if now >= self.deadline {
            return Ok(false);
        }
        if link.try_cmd() == Some(Cmd::Stop) {
            self.stopped = true;
            return Ok(false);
        }
        let wait = if self.can_start() {
            Duration::ZERO
        } else {
            Duration::from_millis(20).min(self.deadline - now)
        };
        net.poll(Some(wait), &mut |n, ev| {
            self.on_event(&ev);
            h(n, self, ev);
        })?;
        if self.last_expire.elapsed() >= Duration::from_millis(200) {
            self.last_expire = Instant::now();
            let limit = self.connect_timeout;
            net.expire(limit, &mut |n, ev| {
                self.on_event(&ev);
                h(n, self, ev);
            });
        }
        if self.last_progress.elapsed() >= Duration::from_millis(250) {
            self.last_progress = Instant::now();
            self.progress(link);
        }
        Ok(true)
    }

    /// Connections waiting for a reconnect.
    pub fn retrying(&self) -> usize {
        self.retry_queue.len()
    }

    pub fn progress(&self, link: &Link) {
        link.emit(
            "PROGRESS",
            &json!({"open": self.open, "failed": self.failed.total(), "retrying": self.retrying()}),
        );
    }
}

/// Failures where the server asks the client to come back later: close 1013 (try again: store busy,
/// slow consumer) and HTTP 503 (overloaded).
pub fn retryable(reason: &str) -> bool {
    reason == "closed by server (1013)" || reason == "http 503"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_and_backed_off() {
        let far = Instant::now() + Duration::from_secs(600);
        let mut op = Opener::new(0..1, 10, Duration::from_secs(1), far)
            .two_stage()
            .with_retries(2);
        // As if connection 0 had been started as engine id 7.
        op.next = 1;
        op.in_flight.insert(7, (0, 0));
        op.pending = 1;
        op.app_fail(7, "closed by server (1013)");
        assert_eq!((op.pending, op.retrying(), op.failed.total()), (0, 1, 0));
        assert!(!op.done());
        let Reverse((due, index, attempt)) = *op.retry_queue.peek().unwrap();
        assert_eq!((index, attempt), (0, 1));
        assert!(due > Instant::now() + Duration::from_millis(100));
        // Second attempt: retried again; third: the failure stands.
        op.retry_queue.clear();
        op.in_flight.insert(8, (0, 1));
        op.pending = 1;
        op.app_fail(8, "closed by server (1013)");
        assert_eq!(op.retrying(), 1);
        op.retry_queue.clear();
        op.in_flight.insert(9, (0, 2));
        op.pending = 1;
        op.app_fail(9, "closed by server (1013)");
        assert_eq!((op.retrying(), op.failed.total()), (0, 1));
        assert_eq!(op.retried.total(), 2);
        // Not retryable.
        op.in_flight.insert(10, (0, 0));
        op.pending = 1;
        op.app_fail(10, "closed by server (1008)");
        assert_eq!((op.retrying(), op.failed.total()), (0, 2));
        assert!(op.done());
    }
}
