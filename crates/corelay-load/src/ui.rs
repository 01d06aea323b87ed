//! Coordinator-side progress (indicatif on stderr, hidden with --quiet or when stderr is no terminal)
//! and the common "wait until every worker is ready" phase.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::workers::{Line, Workers};

/// A bar of `len` steps.
pub fn bar(quiet: bool, len: u64, prefix: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
    ) {
        pb.set_style(style);
    }
    pb.set_prefix(prefix.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// A bar counting seconds of a timed phase.
pub fn timer(quiet: bool, d: Duration, prefix: &str) -> ProgressBar {
    let pb = bar(quiet, d.as_secs().max(1), prefix);
    if !quiet
        && let Ok(style) = ProgressStyle::with_template(
            "{spinner} {prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len}s {msg}",
        )
    {
        pb.set_style(style);
    }
    pb
}

static QUIET: AtomicBool = AtomicBool::new(false);

/// Records --quiet for [`plain`].
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Progress as plain lines (every 10 s): stderr is not a terminal (no bar is drawn) and not --quiet.
pub fn plain() -> bool {
    !QUIET.load(Ordering::Relaxed) && !std::io::stderr().is_terminal()
}

/// Every 10 s of plain progress.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub fn note(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("corelay-load: {msg}");
    }
}

/// What the opening phase ended with.
pub struct Ready {
    /// READY objects, one per worker that sent one.
    pub ready: Vec<Option<Value>>,
    pub elapsed: Duration,
}

impl Ready {
    pub fn values(&self) -> Vec<Value> {
        self.ready.iter().flatten().cloned().collect()
    }
}

/// Waits until every worker has sent READY (or ended), showing the summed PROGRESS on `pb`; `tick`
/// runs between waits (at most every 50 ms).
pub fn await_ready(
    w: &mut Workers,
    deadline: Instant,
    pb: &ProgressBar,
    tick: &mut dyn FnMut(),
) -> Ready {
    let start = Instant::now();
    let plain = plain();
    let mut last_line = Instant::now();
    let mut ready: Vec<Option<Value>> = vec![None; w.count];
    let mut progress: Vec<(u64, u64, u64)> = vec![(0, 0, 0); w.count];
    let of = |v: &Value| {
        (
            v["open"].as_u64().unwrap_or(0),
            v["failed"].as_u64().unwrap_or(0),
            v["retrying"].as_u64().unwrap_or(0),
        )
    };
    while (0..w.count).any(|i| ready[i].is_none() && !w.finished(i)) && Instant::now() < deadline {
        tick();
        if plain && last_line.elapsed() >= PLAIN_EVERY {
            last_line = Instant::now();
            let n = ready.iter().filter(|r| r.is_some()).count();
            eprintln!(
                "corelay-load: connect [{:.0}s] {}; {n}/{} workers ready",
                start.elapsed().as_secs_f64(),
                pb.message(),
                w.count
            );
        }
        let Some((i, line)) = w.recv(Duration::from_millis(50)) else {
            continue;
        };
        match line {
            Line::Ready(v) => {
                progress[i] = of(&v);
                ready[i] = Some(v);
            }
            Line::Progress(v) => progress[i] = of(&v),
            Line::Result(_) | Line::Exit | Line::Sample(_) => {}
        }
        let open: u64 = progress.iter().map(|p| p.0).sum();
        let failed: u64 = progress.iter().map(|p| p.1).sum();
        let retrying: u64 = progress.iter().map(|p| p.2).sum();
        pb.set_position(open + failed);
        pb.set_message(if retrying > 0 {
            format!("open {open}, failed {failed}, retrying {retrying}")
        } else {
            format!("open {open}, failed {failed}")
        });
    }
    Ready {
        ready,
        elapsed: start.elapsed(),
    }
}
