//! `connect-storm`: every worker prepares its share (tokens minted up front), then on the
//! coordinator's `go` starts all of its non-blocking connects at once (in batches of 256 between
//! event checks) and measures each handshake from `connect()` to the parsed `101`.
//!
//! Over TLS (`wss://`) the handshake includes the TLS handshake. With `--tls-resume on` each worker first
//! fills its process's session store (full handshakes, not measured, until it holds a ticket per connection
//! of its share), so that the storm is a reconnect storm of clients that all hold a session; the result says
//! how many handshakes the server resumed. With `--server-pid`/`--server-children-of` the server's CPU time
//! from `go` until the last worker reported is measured.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};

use crate::net::{Event, Net, Target, Transport};
use crate::open::Opener;
use crate::server::Servers;
use crate::stats::procfs;
use crate::stats::{self, Clock, Report, Tally, r3};
use crate::ui;
use crate::workers::{self, Cmd, Line, Link, Workers};
use crate::{Common, check_fd_budget, emit_result};

#[derive(Args, Clone, Debug)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open (split over --procs).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Handshakes in flight per process (0: all at once).
    #[arg(long, default_value_t = 0)]
    pub max_pending: usize,
    /// Server process id(s) whose CPU time over the storm is measured, summed (repeatable, or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Also measure every current child of this process (e.g. the nginx master: its workers).
    #[arg(long, value_name = "PID")]
    pub server_children_of: Option<u32>,
}

/// Handshakes in flight while a worker fills its TLS session store: at most this many, and at most an
/// eighth of its share (what is in flight when the store is full is made for nothing).
const PRIME_PENDING: usize = 64;

pub fn worker(a: &StormArgs, link: Link) {
    match work(a, &link) {
        // The connections stay open until the coordinator has read the server's CPU time, so that closing
        // them is not part of it.
        Ok((v, mut net)) => {
            emit_result(&link, Ok(v));
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until && link.try_cmd() != Some(Cmd::Stop) {
                std::thread::sleep(Duration::from_millis(5));
            }
            net.close_all();
        }
        Err(e) => emit_result(&link, Err(e)),
    }
}

/// With `--tls-resume on`: full handshakes (at most one per connection of the share, `PRIME_PENDING` at a
/// time) until the session store holds a ticket for every connection of the share; then they are closed.
/// Returns the connections started for it and the tickets held.
fn prime(
    a: &StormArgs,
    target: &Target,
    link: &Link,
    range: std::ops::Range<usize>,
    queries: &[String],
    limit: Instant,
) -> anyhow::Result<(usize, usize)> {
    let Some(filler) = target.tls.as_ref().and_then(|t| t.filler()) else {
        return Ok((0, 0));
    };
    let pool = filler.pool.clone().expect("a filler has a pool");
    let mut t = target.clone();
    t.tls = Some(filler);
    let net = &mut Net::new(t)?;
    let want = range.len();
    let start = range.start;
    let pending = (want / 8).clamp(1, PRIME_PENDING);
    let mut op = Opener::new(range, pending, a.common.connect_timeout, limit);
    let mut query = |i: usize| queries[i - start].clone();
    while !op.done() && pool.tickets() < want {
        if !op.step(net, link, &mut query, &mut |_, _, _| {})? {
            break;
        }
        // A server that sends no tickets: stop after a few.
        if op.open >= 16 && pool.tickets() == 0 {
            break;
        }
    }
    let made = op.open + op.pending + op.failed.total() as usize;
    net.close_all();
    // Let the closes go out before the storm (bounded).
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until && net.live() > 0 {
        net.poll(Some(Duration::from_millis(10)), &mut |_, _| {})?;
    }
    Ok((made, pool.tickets()))
}

fn work(a: &StormArgs, link: &Link) -> anyhow::Result<(Value, Net)> {
    let range = workers::share(a.connections, link.index, link.count);
    let start = range.start;
    let queries: Vec<String> = range
        .clone()
        .map(|i| a.common.token_query(i))
        .collect::<anyhow::Result<_>>()?;
    let target = a.common.target(Transport::Ws)?;
    let limit = Instant::now() + a.common.timeout + Duration::from_secs(5);
    let (primed, tickets) = prime(a, &target, link, range.clone(), &queries, limit)?;
    let mut net = Net::new(target)?;
    let clock = Clock::new();
    link.emit("READY", &json!({"open": 0, "failed": 0}));
    let mut go = false;
    while Instant::now() < limit {
        match link.try_cmd() {
            Some(Cmd::Go) => {
                go = true;
                break;
            }
            Some(Cmd::Stop) => break,
            Some(Cmd::Mark) | None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    if !go {
        return Ok((json!({"open": 0, "failed": 0, "started": false}), net));
    }
    let mut op = Opener::new(range, a.max_pending, a.common.connect_timeout, limit);
    let mut closed = Tally::default();
    let mut query = |i: usize| queries[i - start].clone();
    while !op.done() {
        let more = op.step(&mut net, link, &mut query, &mut |_, _, ev| {
            if let Event::Failed {
                reason,
                opened: true,
                ..
            } = ev
            {
                closed.add(&reason, 1);
            }
        })?;
        if !more {
            break;
        }
    }
    op.progress(link);
    let v = json!({
        "open": op.open,
        "failed": op.failed.total(),
        "failures": op.failed.to_json(),
        "closed": closed.total(),
        "closed_reasons": closed.to_json(),
        "handshake_us": stats::encode(&op.handshake),
        "first_connect_us": op.first_start.map(|t| clock.us(t)),
        "last_open_us": op.last_open.map(|t| clock.us(t)),
        "started": true,
        "tls_primed": primed,
        "tls_tickets": tickets,
        "tls_full": net.stats.tls_full,
        "tls_resumed": net.stats.tls_resumed,
    });
    Ok((v, net))
}

pub fn run(a: StormArgs) -> anyhow::Result<Report> {
    a.common.check()?;
    let quiet = a.common.quiet;
    let target = a.common.target(Transport::Ws)?;
    a.common.token_query(0)?;
    let servers = Servers::new(a.server_pid.clone(), a.server_children_of);
    servers.check()?;
    let clk = procfs::clk_tck();
    let procs = a.common.procs;
    check_fd_budget(a.connections.div_ceil(procs), procs, quiet);
    let started = Instant::now();
    let deadline = started + a.common.timeout;
    ui::note(
        quiet,
        &format!(
            "connect-storm: {} connections to {} from {procs} process(es)",
            a.connections, target.addr
        ),
    );
    let mut w = Workers::start(procs, None, {
        let a = a.clone();
        move |link| worker(&a, link)
    })
    .context("starting workers")?;
    let pb = ui::bar(quiet, procs as u64, "prepare");
    let ready = ui::await_ready(&mut w, deadline, &pb, &mut || {});
    pb.finish_and_clear();
    anyhow::ensure!(
        ready.ready.iter().any(Option::is_some),
        "no worker got ready"
    );
    let cpu0 = servers.any().then(|| servers.cpu());
    w.send(Cmd::Go);
    let pb = ui::bar(quiet, a.connections as u64, "storm");
    let mut progress = vec![(0u64, 0u64); w.count];
    let (results, lost_workers) = w.collect(deadline + Duration::from_secs(10), |i, l| {
        if let Line::Progress(v) = l {
            progress[i] = (
                v["open"].as_u64().unwrap_or(0),
                v["failed"].as_u64().unwrap_or(0),
            );
            let open: u64 = progress.iter().map(|p| p.0).sum();
            let failed: u64 = progress.iter().map(|p| p.1).sum();
            pb.set_position(open + failed);
            pb.set_message(format!("open {open}, failed {failed}"));
        }
    });
    let server_cpu_s = cpu0.map(|c0| c0.ticks_until(&servers.cpu()) as f64 / clk as f64);
    w.finish(Duration::from_secs(10));
    pb.finish_and_clear();

    let mut hs = stats::histogram();
    let mut failures = Tally::default();
    let mut closed = Tally::default();
    let mut errors = Vec::new();
    for r in &results {
        stats::merge(&mut hs, &r["handshake_us"]);
        failures.merge(&r["failures"]);
        closed.merge(&r["closed_reasons"]);
        if let Some(e) = r["error"].as_str() {
            errors.push(e.to_string());
        }
    }
    let open = stats::sum(&results, "open");
    let first = results
        .iter()
        .filter_map(|r| r["first_connect_us"].as_u64())
        .min();
    let last = results
        .iter()
        .filter_map(|r| r["last_open_us"].as_u64())
        .max();
    let span_s = match (first, last) {
        (Some(f), Some(l)) if l > f => Some((l - f) as f64 / 1e6),
        _ => None,
    };
    let mut m = Report::default();
    m.insert("scenario", json!("connect-storm"));
    m.insert("url", json!(a.common.url));
    m.insert("connections", json!(a.connections));
    m.insert("procs", json!(procs));
    m.insert("max_pending", json!(a.max_pending));
    m.insert("tls", json!(target.tls.is_some()));
    m.insert(
        "tls_resume",
        json!(target.tls.as_ref().map(|t| t.pool.is_some())),
    );
    m.insert("connected", json!(open));
    m.insert("failed", json!(failures.total()));
    m.insert("failures", failures.to_json());
    m.insert("span_s", span_s.map_or(Value::Null, r3));
    m.insert(
        "handshakes_per_s",
        span_s.map_or(Value::Null, |s| r3(open as f64 / s)),
    );
    stats::percentiles(&hs, "handshake", &mut m);
    if target.tls.is_some() {
        m.insert("tls_full", json!(stats::sum(&results, "tls_full")));
        m.insert("tls_resumed", json!(stats::sum(&results, "tls_resumed")));
        m.insert("tls_primed", json!(stats::sum(&results, "tls_primed")));
        m.insert("tls_tickets", json!(stats::sum(&results, "tls_tickets")));
    }
    m.insert("server_cpu_s", server_cpu_s.map_or(Value::Null, r3));
    m.insert(
        "server_cpu_us_per_conn",
        match server_cpu_s {
            Some(c) if open > 0 => r3(c * 1e6 / open as f64),
            _ => Value::Null,
        },
    );
    m.insert("closed_during_run", json!(closed.total()));
    m.insert("closed_reasons", closed.to_json());
    m.insert("workers_lost", json!(lost_workers));
    if !errors.is_empty() {
        m.insert("worker_errors", json!(errors));
    }
    m.insert("elapsed_s", r3(started.elapsed().as_secs_f64()));
    Ok(m)
}
