//! Opening a worker's share of connections: at most `max_pending` handshakes in flight, each bounded by
//! the connect timeout, the whole phase bounded by the run's deadline.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

use crate::net::{Event, Net, StartError};
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
            first_start: None,
            last_open: None,
            last_progress: Instant::now(),
            last_expire: Instant::now(),
        }
    }

    /// Every connection of the share has opened or failed.
    pub fn done(&self) -> bool {
        self.next >= self.end && self.pending == 0
    }

    /// Starts connections up to the in-flight limit; `query(i)` gives connection `i`'s extra query.
    pub fn fill(&mut self, net: &mut Net, query: &mut dyn FnMut(usize) -> String) {
        let mut batch = 0;
        while self.can_start() && batch < FILL_BATCH {
            batch += 1;
            let i = self.next;
            let q = query(i);
            self.first_start.get_or_insert_with(Instant::now);
            self.next += 1;
            match net.connect(&q, i) {
                Ok(_) => self.pending += 1,
                Err(StartError::FileLimit) => {
                    let left = (self.end - i) as u64;
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
            Event::Open { handshake, .. } => {
                self.pending = self.pending.saturating_sub(1);
                self.open += 1;
                stats::record(&mut self.handshake, *handshake);
                self.last_open = Some(Instant::now());
            }
            Event::Failed {
                reason,
                opened: false,
                ..
            } => {
                self.pending = self.pending.saturating_sub(1);
                self.failed.add(reason, 1);
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

    pub fn progress(&self, link: &Link) {
        link.emit(
            "PROGRESS",
            &json!({"open": self.open, "failed": self.failed.total()}),
        );
    }
}
