//! `idle`: open N connections (WebSocket, SSE or long-poll), hold them while answering pings, and
//! measure the server's resident memory per connection and its CPU use while they sit idle.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::net::{Event, Net, Transport};
use crate::open::Opener;
use crate::stats::{self, Report, Tally, procfs, r3};
use crate::ui;
use crate::workers::{self, Cmd, Link, Workers};
use crate::{Common, check_fd_budget, emit_result};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TransportArg {
    Ws,
    Sse,
    Longpoll,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Transport {
        match t {
            TransportArg::Ws => Transport::Ws,
            TransportArg::Sse => Transport::Sse,
            TransportArg::Longpoll => Transport::LongPoll,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// The server's process id (for RSS and CPU); without it only the client side is measured.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// How long to hold the connections once all are open.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// ws: WebSocket upgrade; sse: GET /sse stream; longpoll: GET /poll requests held open.
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: TransportArg,
    /// `channels=` for sse/longpoll when the URL has none.
    #[arg(long, default_value = "load")]
    pub channels: String,
    /// `timeout=` (seconds) for longpoll when the URL has none.
    #[arg(long, default_value_t = 60)]
    pub poll_timeout: u64,
    /// Handshakes in flight per process while opening (0: all at once).
    #[arg(long, default_value_t = 1000)]
    pub max_pending: usize,
    /// RSS samples after the hold, 200 ms apart; the minimum is reported.
    #[arg(long, default_value_t = 5)]
    pub rss_samples: usize,
}

impl IdleArgs {
    fn base_query(&self) -> String {
        let mut q = Vec::new();
        let t: Transport = self.transport.into();
        if t != Transport::Ws && !self.common.url.contains("channels=") {
            q.push(format!("channels={}", self.channels));
        }
        if t == Transport::LongPoll && !self.common.url.contains("timeout=") {
            q.push(format!("timeout={}", self.poll_timeout));
        }
        q.join("&")
    }
}

fn join_query(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}&{b}"),
    }
}

pub fn worker(a: &IdleArgs, link: Link) {
    let r = work(a, &link);
    emit_result(&link, r);
}

fn work(a: &IdleArgs, link: &Link) -> anyhow::Result<Value> {
    let range = workers::share(a.connections, link.index, link.count);
    let deadline = Instant::now() + a.common.timeout + Duration::from_secs(5);
    let mut net = Net::new(a.common.target(a.transport.into())?)?;
    let mut op = Opener::new(range, a.max_pending, a.common.connect_timeout, deadline);
    let base = a.base_query();
    let mut query = |i: usize| join_query(&base, &a.common.token_query(i).unwrap_or_default());
    let mut closed = Tally::default();
    // A refused long poll (non-200 answer) is a failure to connect; anything else after opening is a
    // close.
    let mut on_closed = |op: &mut Opener, ev: &Event<'_>| {
        if let Event::Failed {
            reason,
            opened: true,
            ..
        } = ev
        {
            if reason.starts_with("http ") {
                op.reject(reason);
            } else {
                closed.add(reason, 1);
            }
        }
    };
    while !op.done() {
        if !op.step(&mut net, link, &mut query, &mut |_, op, ev| {
            on_closed(op, &ev)
        })? {
            break;
        }
    }
    op.progress(link);
    link.emit(
        "READY",
        &json!({"open": op.open, "failed": op.failed.total()}),
    );
    let hold_start = Instant::now();
    let mut stop = op.stopped;
    while !stop && Instant::now() < deadline {
        net.poll(Some(Duration::from_millis(100)), &mut |_, ev| {
            on_closed(&mut op, &ev)
        })?;
        stop = link.try_cmd() == Some(Cmd::Stop);
    }
    let held_s = hold_start.elapsed().as_secs_f64();
    let v = json!({
        "open": op.open,
        "failed": op.failed.total(),
        "failures": op.failed.to_json(),
        "closed": closed.total(),
        "closed_reasons": closed.to_json(),
        "still_open": net.live(),
        "pings_answered": net.stats.pings_answered,
        "longpoll_responses": net.stats.responses,
        "bytes_in": net.stats.bytes_in,
        "handshake_us": stats::encode(&op.handshake),
        "held_s": r3(held_s),
    });
    net.close_all();
    Ok(v)
}

pub fn run(a: IdleArgs) -> anyhow::Result<Report> {
    a.common.check()?;
    let quiet = a.common.quiet;
    let transport: Transport = a.transport.into();
    let target = a.common.target(transport)?;
    a.common.token_query(0)?;
    if let Some(pid) = a.server_pid {
        anyhow::ensure!(procfs::alive(pid), "--server-pid {pid}: no such process");
    }
    let procs = a.common.procs;
    check_fd_budget(a.connections.div_ceil(procs), procs, quiet);
    let started = Instant::now();
    let deadline = started + a.common.timeout;
    let clk = procfs::clk_tck();
    let rss_before = a.server_pid.and_then(procfs::rss_kib);
    ui::note(
        quiet,
        &format!(
            "idle: opening {} {} connections to {} from {procs} process(es)",
            a.connections,
            transport.name(),
            target.addr
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
    let opened = stats::sum(&readies, "open");
    ui::note(
        quiet,
        &format!(
            "idle: {opened} open, {} failed after {:.2}s; holding {}",
            stats::sum(&readies, "failed"),
            ready.elapsed.as_secs_f64(),
            humantime::format_duration(a.hold)
        ),
    );

    // The hold: server CPU over it, then the RSS.
    let cpu0 = a.server_pid.and_then(procfs::cpu_ticks);
    let hold_start = Instant::now();
    let hold_end = (hold_start + a.hold).min(deadline);
    let pb = ui::timer(quiet, a.hold, "hold");
    while Instant::now() < hold_end {
        let left = hold_end.saturating_duration_since(Instant::now());
        w.recv(left.min(Duration::from_millis(250)));
        pb.set_position(hold_start.elapsed().as_secs());
    }
    let cpu1 = a.server_pid.and_then(procfs::cpu_ticks);
    let held_s = hold_start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let mut samples = Vec::new();
    if let Some(pid) = a.server_pid {
        for k in 0..a.rss_samples.max(1) {
            if k > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            samples.extend(procfs::rss_kib(pid));
        }
    }
    let rss_after = samples.iter().copied().min();

    w.send(Cmd::Stop);
    let (results, lost) = w.collect(Instant::now() + Duration::from_secs(15), |_, _| {});
    w.finish(Duration::from_secs(5));

    let mut failures = Tally::default();
    let mut closed_reasons = Tally::default();
    let mut hs = stats::histogram();
    let mut errors = Vec::new();
    for r in &results {
        failures.merge(&r["failures"]);
        closed_reasons.merge(&r["closed_reasons"]);
        stats::merge(&mut hs, &r["handshake_us"]);
        if let Some(e) = r["error"].as_str() {
            errors.push(e.to_string());
        }
    }
    let connected = stats::sum(&results, "open");
    let closed = stats::sum(&results, "closed");
    let held = connected.saturating_sub(closed);
    let mut m = Report::default();
    m.insert("scenario", json!("idle"));
    m.insert("transport", json!(transport.name()));
    m.insert("url", json!(a.common.url));
    m.insert("connections", json!(a.connections));
    m.insert("procs", json!(procs));
    m.insert("hold_s", r3(a.hold.as_secs_f64()));
    m.insert("connected", json!(connected));
    m.insert("connect_failures", json!(failures.total()));
    m.insert("failures", failures.to_json());
    m.insert("connect_s", r3(ready.elapsed.as_secs_f64()));
    stats::percentiles(&hs, "handshake", &mut m);
    m.insert("closed_during_run", json!(closed));
    m.insert("closed_reasons", closed_reasons.to_json());
    m.insert("held_connections", json!(held));
    m.insert(
        "pings_answered",
        json!(stats::sum(&results, "pings_answered")),
    );
    if transport == Transport::LongPoll {
        m.insert(
            "longpoll_responses",
            json!(stats::sum(&results, "longpoll_responses")),
        );
    }
    m.insert("server_pid", json!(a.server_pid));
    m.insert("rss_before_kib", json!(rss_before));
    m.insert("rss_after_kib", json!(rss_after));
    m.insert("rss_after_samples_kib", json!(samples));
    let bytes_per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if held > 0 => r3((a as f64 - b as f64) * 1024.0 / held as f64),
        _ => Value::Null,
    };
    m.insert("bytes_per_conn", bytes_per_conn);
    let cpu = match (cpu0, cpu1) {
        (Some(c0), Some(c1)) if held_s > 0.0 => {
            r3((c1.saturating_sub(c0)) as f64 * 1000.0 / clk as f64 / held_s)
        }
        _ => Value::Null,
    };
    m.insert("server_cpu_ms_per_s", cpu);
    m.insert("held_s", r3(held_s));
    m.insert("workers_lost", json!(lost));
    if !errors.is_empty() {
        m.insert("worker_errors", json!(errors));
    }
    m.insert("elapsed_s", r3(started.elapsed().as_secs_f64()));
    Ok(m)
}
