//! `echo`: binary messages over WebSocket connections to an echo endpoint.
//!
//! Closed loop (no `--rate`): every connection sends a message, waits for its echo, sends the next.
//! Open loop (`--rate R`): messages leave on a fixed schedule (message k of a worker is due at
//! start + k/r, round-robin over its connections) whether or not earlier ones were answered, and each
//! latency is measured from the message's *intended* send time, not from when it actually left
//! (coordinated-omission correction): a stalled server or a stalled client shows up as latency of
//! every message that should have been sent during the stall.
//!
//! Payload: seq (u64 LE), intended send time (ns since the worker's base instant, u64 LE), connection
//! id (u32 LE), then filler up to `--size`.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use corelay_proto::ws::Opcode;
use serde_json::{Value, json};

use crate::net::{Event, Net, Transport};
use crate::open::Opener;
use crate::stats::{self, Report, Tally, procfs, r3};
use crate::ui;
use crate::workers::{self, Cmd, Link, Workers};
use crate::{Common, check_fd_budget, emit_result};

/// seq + timestamp + connection id.
pub const HEADER: usize = 20;

#[derive(Args, Clone, Debug)]
pub struct EchoArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections (split over --procs).
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Payload bytes per message (at least 20).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Measurement window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Total messages per second over all connections (open loop); closed loop when absent.
    #[arg(long)]
    pub rate: Option<f64>,
    /// The server's process id, for its CPU time per echoed message.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// After the window, wait this long for outstanding echoes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Handshakes in flight per process while opening (0: all at once).
    #[arg(long, default_value_t = 1000)]
    pub max_pending: usize,
}

pub fn worker(a: &EchoArgs, link: Link) {
    let r = work(a, &link);
    emit_result(&link, r);
}

#[derive(Default, Clone, Copy)]
struct ConnState {
    /// Next sequence number to send.
    next: u64,
    /// Sequence number the next echo should carry.
    expect: u64,
}

struct Run {
    base: Instant,
    end: Instant,
    closed_loop: bool,
    payload: Vec<u8>,
    conns: Vec<ConnState>,
    /// Open connections (ids), for the open loop's round robin.
    ids: Vec<usize>,
    latency: hdrhistogram::Histogram<u64>,
    lag: hdrhistogram::Histogram<u64>,
    sent: u64,
    received: u64,
    in_window: u64,
    mismatched: u64,
    lost: u64,
    closed: Tally,
    backlog_max: usize,
}

impl Run {
    fn send(&mut self, net: &mut Net, id: usize, intended: Instant) -> bool {
        let c = &mut self.conns[id];
        let t = intended.saturating_duration_since(self.base).as_nanos() as u64;
        self.payload[..8].copy_from_slice(&c.next.to_le_bytes());
        self.payload[8..16].copy_from_slice(&t.to_le_bytes());
        self.payload[16..20].copy_from_slice(&(id as u32).to_le_bytes());
        if !net.send(id, Opcode::Binary, &self.payload) {
            return false;
        }
        c.next += 1;
        self.sent += 1;
        self.backlog_max = self.backlog_max.max(net.backlog(id));
        true
    }

    fn on_event(&mut self, net: &mut Net, ev: Event<'_>) {
        match ev {
            Event::Message { id, op, payload } => {
                let now = Instant::now();
                if op != Opcode::Binary || payload.len() < HEADER || id >= self.conns.len() {
                    self.mismatched += 1;
                    return;
                }
                let seq = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                let t = u64::from_le_bytes(payload[8..16].try_into().unwrap_or_default());
                let intended = self.base + Duration::from_nanos(t);
                stats::record(&mut self.latency, now.saturating_duration_since(intended));
                self.received += 1;
                if now <= self.end {
                    self.in_window += 1;
                }
                let c = &mut self.conns[id];
                if seq != c.expect {
                    self.mismatched += 1;
                }
                c.expect = seq + 1;
                if self.closed_loop && now < self.end {
                    self.send(net, id, now);
                }
            }
            Event::Failed {
                id,
                reason,
                opened: true,
            } => {
                self.closed.add(&reason, 1);
                if let Some(c) = self.conns.get(id) {
                    self.lost += c.next.saturating_sub(c.expect);
                }
                self.ids.retain(|&x| x != id);
            }
            _ => {}
        }
    }
}

fn work(a: &EchoArgs, link: &Link) -> anyhow::Result<Value> {
    anyhow::ensure!(a.size >= HEADER, "--size must be at least {HEADER}");
    let range = workers::share(a.connections, link.index, link.count);
    let mine = range.len();
    let deadline = Instant::now() + a.common.timeout + Duration::from_secs(5);
    let mut net = Net::new(a.common.target(Transport::Ws)?)?;
    let mut op = Opener::new(range, a.max_pending, a.common.connect_timeout, deadline);
    let mut query = |i: usize| a.common.token_query(i).unwrap_or_default();
    let mut ids = Vec::new();
    let mut closed = Tally::default();
    while !op.done() {
        let go = op.step(&mut net, link, &mut query, &mut |_, _, ev| match ev {
            Event::Open { id, .. } => ids.push(id),
            Event::Failed {
                id,
                reason,
                opened: true,
            } => {
                closed.add(&reason, 1);
                ids.retain(|&x| x != id);
            }
            _ => {}
        })?;
        if !go {
            break;
        }
    }
    op.progress(link);
    link.emit(
        "READY",
        &json!({"open": op.open, "failed": op.failed.total()}),
    );
    // Wait for the coordinator's go, answering pings.
    let mut go = false;
    while !op.stopped && Instant::now() < deadline {
        net.poll(Some(Duration::from_millis(5)), &mut |_, ev| {
            if let Event::Failed {
                id,
                reason,
                opened: true,
            } = ev
            {
                closed.add(&reason, 1);
                ids.retain(|&x| x != id);
            }
        })?;
        match link.try_cmd() {
            Some(Cmd::Go) => {
                go = true;
                break;
            }
            Some(Cmd::Stop) => break,
            Some(Cmd::Mark) | None => {}
        }
    }
    let base = Instant::now();
    let mut run = Run {
        base,
        end: base + a.duration,
        closed_loop: a.rate.is_none(),
        payload: vec![b'x'; a.size],
        conns: vec![ConnState::default(); net_ids_max(&ids)],
        ids,
        latency: stats::histogram(),
        lag: stats::histogram(),
        sent: 0,
        received: 0,
        in_window: 0,
        mismatched: 0,
        lost: 0,
        closed,
        backlog_max: 0,
    };
    let my_rate = a
        .rate
        .map(|r| r * mine as f64 / a.connections.max(1) as f64)
        .filter(|r| *r > 0.0);
    let hard_end = run.end + a.grace;
    let mut stopped = !go;
    if go && run.closed_loop {
        for id in run.ids.clone() {
            run.send(&mut net, id, base);
        }
    }
    let mut k: u64 = 0;
    while !stopped {
        let now = Instant::now();
        let mut next_due = None;
        if let Some(rate) = my_rate {
            loop {
                let intended = base + Duration::from_secs_f64(k as f64 / rate);
                if intended >= run.end {
                    break;
                }
                if intended > now {
                    next_due = Some(intended);
                    break;
                }
                if run.ids.is_empty() {
                    break;
                }
                let id = run.ids[(k as usize) % run.ids.len()];
                if run.send(&mut net, id, intended) {
                    stats::record(&mut run.lag, now.saturating_duration_since(intended));
                }
                k += 1;
            }
        }
        let outstanding = run.sent.saturating_sub(run.received + run.lost);
        if now >= run.end && (outstanding == 0 || now >= hard_end) {
            break;
        }
        if now >= deadline || link.try_cmd() == Some(Cmd::Stop) {
            stopped = true;
        }
        let mut h = |n: &mut Net, ev: Event<'_>| run.on_event(n, ev);
        match next_due {
            // Sub-millisecond waits: epoll only sleeps in whole milliseconds, so take what is ready
            // now and sleep the rest in steps of at most 200 µs.
            Some(due) if due.saturating_duration_since(now) < Duration::from_millis(1) => {
                net.poll(Some(Duration::ZERO), &mut h)?;
                let left = due.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    std::thread::sleep(left.min(Duration::from_micros(200)));
                }
            }
            Some(due) => net.poll(
                Some(due.saturating_duration_since(now) - Duration::from_micros(500)),
                &mut h,
            )?,
            None => net.poll(Some(Duration::from_millis(10)), &mut h)?,
        }
    }
    let outstanding = run.sent.saturating_sub(run.received + run.lost);
    let v = json!({
        "open": op.open,
        "failed": op.failed.total(),
        "failures": op.failed.to_json(),
        "sent": run.sent,
        "received": run.received,
        "received_in_window": run.in_window,
        "lost": run.lost + outstanding,
        "mismatched": run.mismatched,
        "closed": run.closed.total(),
        "closed_reasons": run.closed.to_json(),
        "backlog_max_bytes": run.backlog_max,
        "pings_answered": net.stats.pings_answered,
        "latency_us": stats::encode(&run.latency),
        "send_lag_us": stats::encode(&run.lag),
        "window_s": r3(a.duration.as_secs_f64()),
        "started": go,
    });
    net.close_all();
    Ok(v)
}

fn net_ids_max(ids: &[usize]) -> usize {
    ids.iter().max().map_or(0, |m| m + 1)
}

pub fn run(a: EchoArgs) -> anyhow::Result<Report> {
    a.common.check()?;
    anyhow::ensure!(
        a.size >= HEADER,
        "--size must be at least {HEADER} (sequence, timestamp, connection id)"
    );
    anyhow::ensure!(a.connections > 0, "--connections must be positive");
    if let Some(r) = a.rate {
        anyhow::ensure!(r > 0.0 && r.is_finite(), "--rate must be positive");
    }
    let quiet = a.common.quiet;
    let target = a.common.target(Transport::Ws)?;
    a.common.token_query(0)?;
    if let Some(pid) = a.server_pid {
        anyhow::ensure!(procfs::alive(pid), "--server-pid {pid}: no such process");
    }
    let procs = a.common.procs;
    check_fd_budget(a.connections.div_ceil(procs), procs, quiet);
    let started = Instant::now();
    let deadline = started + a.common.timeout;
    let clk = procfs::clk_tck();
    let mode = if a.rate.is_some() { "open" } else { "closed" };
    ui::note(
        quiet,
        &format!(
            "echo ({mode} loop): {} connections to {}, {} B messages",
            a.connections, target.addr, a.size
        ),
    );
    let mut w = Workers::start(procs, None, {
        let a = a.clone();
        move |link| worker(&a, link)
    })
    .context("starting workers")?;
    let pb = ui::bar(quiet, a.connections as u64, "connect");
    let ready = ui::await_ready(&mut w, deadline, &pb, &mut || {});
    pb.finish_and_clear();
    let readies = ready.values();
    let open = stats::sum(&readies, "open");
    anyhow::ensure!(
        open > 0,
        "no connection opened ({} failed)",
        stats::sum(&readies, "failed")
    );

    let cpu0 = a.server_pid.and_then(procfs::cpu_ticks);
    let t_go = Instant::now();
    w.send(Cmd::Go);
    let window_end = (t_go + a.duration).min(deadline);
    let pb = ui::timer(quiet, a.duration, "echo");
    while Instant::now() < window_end {
        let left = window_end.saturating_duration_since(Instant::now());
        w.recv(left.min(Duration::from_millis(250)));
        pb.set_position(t_go.elapsed().as_secs());
    }
    let cpu1 = a.server_pid.and_then(procfs::cpu_ticks);
    let window_s = t_go.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let (results, lost_workers) = w.collect(
        (Instant::now() + a.grace + Duration::from_secs(10)).max(deadline),
        |_, _| {},
    );
    w.finish(Duration::from_secs(5));

    let mut latency = stats::histogram();
    let mut lag = stats::histogram();
    let mut failures = Tally::default();
    let mut closed = Tally::default();
    let mut errors = Vec::new();
    for r in &results {
        stats::merge(&mut latency, &r["latency_us"]);
        stats::merge(&mut lag, &r["send_lag_us"]);
        failures.merge(&r["failures"]);
        closed.merge(&r["closed_reasons"]);
        if let Some(e) = r["error"].as_str() {
            errors.push(e.to_string());
        }
    }
    let in_window = stats::sum(&results, "received_in_window");
    let mut m = Report::default();
    m.insert("scenario", json!("echo"));
    m.insert("mode", json!(mode));
    m.insert("url", json!(a.common.url));
    m.insert("connections", json!(a.connections));
    m.insert("procs", json!(procs));
    m.insert("size_bytes", json!(a.size));
    m.insert("duration_s", r3(a.duration.as_secs_f64()));
    m.insert("rate_target", json!(a.rate));
    m.insert("connected", json!(stats::sum(&results, "open")));
    m.insert("connect_failures", json!(failures.total()));
    m.insert("failures", failures.to_json());
    m.insert("sent", json!(stats::sum(&results, "sent")));
    m.insert("received", json!(stats::sum(&results, "received")));
    m.insert("received_in_window", json!(in_window));
    m.insert(
        "msgs_per_s",
        r3(in_window as f64 / a.duration.as_secs_f64()),
    );
    stats::percentiles(&latency, "latency", &mut m);
    if a.rate.is_some() {
        stats::percentiles(&lag, "send_lag", &mut m);
        m.insert(
            "backlog_max_bytes",
            json!(
                results
                    .iter()
                    .filter_map(|r| r["backlog_max_bytes"].as_u64())
                    .max()
            ),
        );
    }
    m.insert("lost", json!(stats::sum(&results, "lost")));
    m.insert("mismatched", json!(stats::sum(&results, "mismatched")));
    m.insert("closed_during_run", json!(closed.total()));
    m.insert("closed_reasons", closed.to_json());
    m.insert("server_pid", json!(a.server_pid));
    let cpu_ms = match (cpu0, cpu1) {
        (Some(c0), Some(c1)) => Some(c1.saturating_sub(c0) as f64 * 1000.0 / clk as f64),
        _ => None,
    };
    m.insert("server_cpu_ms", cpu_ms.map_or(Value::Null, r3));
    m.insert(
        "server_cpu_ms_per_s",
        cpu_ms.map_or(Value::Null, |c| r3(c / window_s)),
    );
    m.insert(
        "server_cpu_us_per_msg",
        match cpu_ms {
            Some(c) if in_window > 0 => r3(c * 1000.0 / in_window as f64),
            _ => Value::Null,
        },
    );
    m.insert("workers_lost", json!(lost_workers));
    if !errors.is_empty() {
        m.insert("worker_errors", json!(errors));
    }
    m.insert("elapsed_s", r3(started.elapsed().as_secs_f64()));
    Ok(m)
}
