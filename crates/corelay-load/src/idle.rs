//! `idle`: open N connections (WebSocket, SSE or long-poll), hold them while answering pings, and
//! measure what they cost: the server's resident memory and CPU (summed over all of its processes), the
//! kernel's memory (slab, TCP buffer pages, sockets), and the load generator's own memory.
//!
//! Longer than 600 lines: the scenario, its many-process coordination and its measurements (RSS, CPU and kernel
//! memory sampled around a hold, the optional broadcast) are one measurement; helpers shared with other
//! scenarios live in `net.rs`, `stats.rs` and `workers.rs`.
//!
//! With `--follow TOPIC` every WebSocket subscribes to a topic after its `welcome` and counts as open
//! only once the subscription is answered; `--broadcast` then publishes one message to the topic after
//! the hold (`POST /api/publish`) and measures when each connection had it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use corelay_proto::ws::Opcode;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::http;
use crate::net::{Event, Net, Rng, Transport};
use crate::open::Opener;
use crate::server::{CpuSnap, Servers};
use crate::stats::{self, Report, Tally, procfs, r3};
use crate::ui;
use crate::workers::{self, Cmd, Line, Link, Workers};
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
    /// Server process id(s) for RSS and CPU, summed (repeatable, or comma-separated); without any
    /// (and without --server-children-of) only the client side and the kernel are measured.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Also measure every current child of this process (e.g. the master of `corelay run
    /// --processes N`), looked up again at each sample so that restarted children count.
    #[arg(long, value_name = "PID")]
    pub server_children_of: Option<u32>,
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
    /// RSS and kernel samples (before opening, and after the hold), 200 ms apart; the least used is
    /// reported.
    #[arg(long, default_value_t = 5)]
    pub rss_samples: usize,
    /// (ws) After its `welcome`, every connection subscribes to this topic and counts as open only once
    /// the `subscribed` answer has it. A name without ':' means `topic:NAME`.
    #[arg(long, value_name = "TOPIC")]
    pub follow: Option<String>,
    /// After the hold, publish one message to the --follow topic (POST /api/publish; needs --api and
    /// --api-key) and measure when every connection had it.
    #[arg(long)]
    pub broadcast: bool,
    /// Base URL of the HTTP API for --broadcast, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub api: Option<String>,
    /// API key for --broadcast.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Reconnect a connection (after a backoff from 250 ms doubling to 8 s) at most this many times when
    /// the server asks it to come back later while it opens: close 1013 before it was ready (with
    /// --follow), or HTTP 503.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Stop waiting for the broadcast's deliveries after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub broadcast_timeout: Duration,
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

    /// The channel --follow names.
    fn channel(&self) -> Option<String> {
        self.follow.as_deref().map(channel_name)
    }

    fn servers(&self) -> Servers {
        Servers::new(self.server_pid.clone(), self.server_children_of)
    }
}

/// `NAME` → `topic:NAME`; a name with a kind (`scores:m42`) stays as it is.
fn channel_name(t: &str) -> String {
    if t.contains(':') {
        t.to_string()
    } else {
        format!("topic:{t}")
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
    match work(a, &link) {
        // The RESULT goes out before the sockets are closed: on a saturated machine closing tens of
        // thousands of sockets one by one takes longer than the coordinator waits for RESULTs (at 500k
        // connections over 30 processes every RESULT was lost that way).
        Ok((v, mut net)) => {
            emit_result(&link, Ok(v));
            net.close_all();
        }
        Err(e) => emit_result(&link, Err(e)),
    }
}

/// A connection past its handshake, waiting for `welcome` and then `subscribed`.
struct Wait {
    /// Its connect().
    since: Instant,
    welcomed: bool,
    /// The last `error` frame's code while waiting.
    error: Option<String>,
}

/// What --follow needs per worker.
struct Follow {
    channel: String,
    /// The subscribe message.
    frame: Vec<u8>,
    waiting: HashMap<usize, Wait>,
    limit: Duration,
}

/// Deliveries of one broadcast body (`{"b": B}`) in this worker: a count, the first and last receive
/// times, and each receive time relative to the first (so the coordinator can shift and merge them).
struct Bcast {
    b: u64,
    n: u64,
    first_us: u64,
    last_us: u64,
    rel: Histogram<u64>,
    complete: bool,
    reported_n: u64,
}

/// At most this many distinct broadcast bodies are tracked per worker.
const MAX_BCASTS: usize = 16;

/// Counters at one instant (the coordinator's `go` and `mark`).
#[derive(Clone, Copy)]
struct Snap {
    closed: u64,
    pings: u64,
}

struct State<'a> {
    link: &'a Link,
    follow: Option<Follow>,
    closed: Tally,
    server_errors: Tally,
    unexpected: u64,
    bcasts: Vec<Bcast>,
}

impl State<'_> {
    /// Connections open (ready) and not closed since.
    fn live_ready(&self, op: &Opener) -> u64 {
        (op.open as u64).saturating_sub(self.closed.total())
    }

    fn on_event(&mut self, net: &mut Net, op: &mut Opener, ev: Event<'_>) {
        match ev {
            Event::Open { id, handshake } => {
                if let Some(f) = &mut self.follow {
                    let since = Instant::now()
                        .checked_sub(handshake)
                        .unwrap_or_else(Instant::now);
                    f.waiting.insert(
                        id,
                        Wait {
                            since,
                            welcomed: false,
                            error: None,
                        },
                    );
                }
            }
            Event::Message { id, payload, .. } if self.follow.is_some() => {
                self.on_message(net, op, id, payload);
            }
            Event::Failed {
                id,
                reason,
                opened: true,
            } => {
                if let Some(f) = &mut self.follow
                    && f.waiting.remove(&id).is_some()
                {
                    op.app_fail(id, &reason);
                } else if reason.starts_with("http ") {
                    // A refused long poll (non-200 answer) is a failure to connect.
                    op.reject(&reason);
                } else {
                    self.closed.add(&reason, 1);
                    self.check_complete(op);
                }
            }
            _ => {}
        }
    }

    fn on_message(&mut self, net: &mut Net, op: &mut Opener, id: usize, payload: &[u8]) {
        let recv_us = stats::wall_us();
        let Some(f) = &mut self.follow else { return };
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            self.unexpected += 1;
            return;
        };
        let kind = v["type"].as_str().unwrap_or("");
        if kind == "message" {
            if v["channel"].as_str() == Some(f.channel.as_str())
                && let Some(b) = v["body"]["b"].as_u64()
            {
                self.record(b, recv_us, op);
            } else {
                self.unexpected += 1;
            }
            return;
        }
        if let Some(w) = f.waiting.get_mut(&id) {
            match kind {
                "welcome" if !w.welcomed => {
                    w.welcomed = true;
                    net.send(id, Opcode::Text, &f.frame);
                }
                "subscribed" => {
                    let w = f.waiting.remove(&id).expect("present");
                    if v["cursor"].get(&f.channel).is_some() {
                        op.app_open(id, w.since);
                    } else {
                        net.close(id);
                        let why = w.error.unwrap_or_else(|| "not in the cursor".into());
                        op.app_fail(id, &format!("subscribe refused: {why}"));
                    }
                }
                "error" => w.error = Some(v["code"].as_str().unwrap_or("error").to_string()),
                _ => self.unexpected += 1,
            }
            return;
        }
        match kind {
            "error" => self
                .server_errors
                .add(v["code"].as_str().unwrap_or("error"), 1),
            _ => self.unexpected += 1,
        }
    }

    fn record(&mut self, b: u64, recv_us: u64, op: &Opener) {
        let i = match self.bcasts.iter().position(|x| x.b == b) {
            Some(i) => i,
            None if self.bcasts.len() < MAX_BCASTS => {
                self.bcasts.push(Bcast {
                    b,
                    n: 0,
                    first_us: recv_us,
                    last_us: recv_us,
                    rel: stats::histogram(),
                    complete: false,
                    reported_n: 0,
                });
                self.bcasts.len() - 1
            }
            None => {
                self.unexpected += 1;
                return;
            }
        };
        let x = &mut self.bcasts[i];
        x.n += 1;
        x.last_us = x.last_us.max(recv_us);
        x.rel
            .saturating_record(recv_us.saturating_sub(x.first_us).max(1));
        self.check_complete(op);
    }

    /// A broadcast that every live connection of this worker has is reported at once.
    fn check_complete(&mut self, op: &Opener) {
        let live = self.live_ready(op);
        for x in &mut self.bcasts {
            if !x.complete && x.n >= live {
                x.complete = true;
                x.reported_n = x.n;
                self.link.emit(
                    "SAMPLE",
                    &json!({"b": x.b, "n": x.n, "last_us": x.last_us, "complete": true}),
                );
            }
        }
    }

    /// Progress of broadcasts still arriving (called every 500 ms).
    fn report_progress(&mut self) {
        for x in &mut self.bcasts {
            if !x.complete && x.n != x.reported_n {
                x.reported_n = x.n;
                self.link.emit(
                    "SAMPLE",
                    &json!({"b": x.b, "n": x.n, "last_us": x.last_us, "complete": false}),
                );
            }
        }
    }

    /// Fails connections that were not ready within the connect timeout after their connect().
    fn expire(&mut self, net: &mut Net, op: &mut Opener) {
        let Some(f) = &mut self.follow else { return };
        let now = Instant::now();
        let late: Vec<usize> = f
            .waiting
            .iter()
            .filter(|(_, w)| now.duration_since(w.since) > f.limit)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            if let Some(w) = f.waiting.remove(&id) {
                net.close(id);
                op.app_fail(
                    id,
                    if w.welcomed {
                        "subscribe timeout"
                    } else {
                        "welcome timeout"
                    },
                );
            }
        }
    }
}

fn work(a: &IdleArgs, link: &Link) -> anyhow::Result<(Value, Net)> {
    let me = std::process::id();
    let rss_start = procfs::rss_kib(me);
    let range = workers::share(a.connections, link.index, link.count);
    let deadline = Instant::now() + a.common.timeout + Duration::from_secs(5);
    let mut target = a.common.target(a.transport.into())?;
    let channel = a.channel();
    if channel.is_some() {
        target.subprotocol = Some("corelay.v1".into());
    }
    let mut net = Net::new(target)?;
    net.lean();
    net.reserve(range.len());
    let mut op = Opener::new(range, a.max_pending, a.common.connect_timeout, deadline)
        .with_retries(a.retries);
    if channel.is_some() {
        op = op.two_stage();
    }
    let base = a.base_query();
    let mut query = |i: usize| join_query(&base, &a.common.token_query(i).unwrap_or_default());
    let mut st = State {
        link,
        follow: channel.map(|channel| Follow {
            frame: json!({"type": "subscribe", "channels": [channel]})
                .to_string()
                .into_bytes(),
            channel,
            waiting: HashMap::new(),
            limit: a.common.connect_timeout,
        }),
        closed: Tally::default(),
        server_errors: Tally::default(),
        unexpected: 0,
        bcasts: Vec::new(),
    };
    let mut last_expire = Instant::now();
    while !op.done() {
        if !op.step(&mut net, link, &mut query, &mut |n, op, ev| {
            st.on_event(n, op, ev)
        })? {
            break;
        }
        if last_expire.elapsed() >= Duration::from_millis(200) {
            last_expire = Instant::now();
            st.expire(&mut net, &mut op);
        }
    }
    op.progress(link);
    // What opening allocated and freed (requests, tokens, response heads) goes back to the system, so
    // that the RSS reported is what the held connections keep.
    if let Some(f) = &mut st.follow {
        f.waiting.shrink_to_fit();
    }
    trim_heap();
    link.emit(
        "READY",
        &json!({"open": op.open, "failed": op.failed.total()}),
    );
    let hold_start = Instant::now();
    let mut stop = op.stopped;
    let (mut at_go, mut at_mark) = (None, None);
    let mut last_sample = Instant::now();
    while !stop && Instant::now() < deadline {
        net.poll(Some(Duration::from_millis(100)), &mut |n, ev| {
            st.on_event(n, &mut op, ev)
        })?;
        loop {
            let snap = Snap {
                closed: st.closed.total(),
                pings: net.stats.pings_answered,
            };
            match link.try_cmd() {
                None => break,
                Some(Cmd::Go) => at_go = Some(snap),
                Some(Cmd::Mark) => at_mark = Some(snap),
                Some(Cmd::Stop) => {
                    stop = true;
                    break;
                }
            }
        }
        if last_sample.elapsed() >= Duration::from_millis(500) {
            last_sample = Instant::now();
            st.report_progress();
            st.expire(&mut net, &mut op);
        }
    }
    let held_s = hold_start.elapsed().as_secs_f64();
    let broadcasts: Vec<Value> = st
        .bcasts
        .iter()
        .map(|x| {
            json!({"b": x.b, "n": x.n, "first_us": x.first_us, "last_us": x.last_us,
                   "rel_us": stats::encode(&x.rel)})
        })
        .collect();
    let v = json!({
        "open": op.open,
        "failed": op.failed.total(),
        "failures": op.failed.to_json(),
        "retried": op.retried.to_json(),
        "closed": st.closed.total(),
        "closed_reasons": st.closed.to_json(),
        "closed_at_go": at_go.map(|s| s.closed),
        "closed_at_mark": at_mark.map(|s| s.closed),
        "pings_at_go": at_go.map(|s| s.pings),
        "pings_at_mark": at_mark.map(|s| s.pings),
        "still_open": net.live(),
        "pings_answered": net.stats.pings_answered,
        "longpoll_responses": net.stats.responses,
        "bytes_in": net.stats.bytes_in,
        "tls_full": net.stats.tls_full,
        "tls_resumed": net.stats.tls_resumed,
        "handshake_us": stats::encode(&op.handshake),
        "ready_us": stats::encode(&op.ready),
        "server_errors": st.server_errors.to_json(),
        "unexpected": st.unexpected,
        "broadcasts": broadcasts,
        "rss_start_kib": rss_start,
        "rss_kib": procfs::rss_kib(me),
        "held_s": r3(held_s),
    });
    Ok((v, net))
}

/// Returns free heap memory to the system (glibc keeps it otherwise).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `n` kernel readings 200 ms apart, the least used kept.
fn kernel_samples(n: usize) -> Option<procfs::Kernel> {
    let mut v = Vec::new();
    for k in 0..n.max(1) {
        if k > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        v.extend(procfs::kernel());
    }
    procfs::least_used(&v)
}

/// What the coordinator learned from the broadcast.
#[derive(Default)]
struct Broadcast {
    b: u64,
    publish_us: u64,
    publish_ms: Option<f64>,
    offset: Option<u64>,
    error: Option<String>,
    expected: u64,
    cpu: Option<f64>,
    tcp_mem_pages_max: Option<u64>,
}

/// Publishes `{"b": B}` to the topic and waits (at most --broadcast-timeout) until every worker that has
/// connections reported that all of them have it.
fn broadcast(
    a: &IdleArgs,
    w: &mut Workers,
    expect: &[bool],
    expected: u64,
    deadline: Instant,
    servers: &Servers,
    clk: u64,
) -> Broadcast {
    let quiet = a.common.quiet;
    let channel = a.channel().unwrap_or_default();
    let mut r = Broadcast {
        b: Rng::new().next_u64() >> 11, // exact in a JSON double
        expected,
        ..Broadcast::default()
    };
    let body = json!({"channel": channel, "body": {"b": r.b}});
    let cpu0 = servers.any().then(|| servers.cpu());
    let mut tcp_max = procfs::kernel().map(|k| k.tcp_mem_pages);
    r.publish_us = stats::wall_us();
    let res = http::post_json(
        a.api.as_deref().unwrap_or_default(),
        a.api_key.as_deref().unwrap_or_default(),
        "/api/publish",
        &body,
    );
    r.publish_ms = Some(stats::wall_us().saturating_sub(r.publish_us) as f64 / 1000.0);
    match res {
        Ok((status, text)) if (200..300).contains(&status) => {
            r.offset = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["offset"].as_u64());
        }
        Ok((status, text)) => {
            r.error = Some(format!("POST /api/publish: {status} {}", text.trim()))
        }
        Err(e) => r.error = Some(format!("{e:#}")),
    }
    if r.error.is_none() {
        ui::note(
            quiet,
            &format!(
                "idle: published {{\"b\":{}}} to {channel}; waiting for {expected} deliveries",
                r.b
            ),
        );
        let pb = ui::bar(quiet, expected, "broadcast");
        let mut got: Vec<(u64, bool)> = vec![(0, false); w.count];
        let until = (Instant::now() + a.broadcast_timeout).min(deadline);
        let mut last_kernel = Instant::now();
        let (plain, mut last_line, t0) = (ui::plain(), Instant::now(), Instant::now());
        while Instant::now() < until && !got.iter().zip(expect).all(|(g, e)| !e || g.1) {
            if let Some((i, Line::Sample(v))) = w.recv(Duration::from_millis(50))
                && v["b"].as_u64() == Some(r.b)
            {
                got[i] = (
                    v["n"].as_u64().unwrap_or(0),
                    v["complete"].as_bool().unwrap_or(false),
                );
                pb.set_position(got.iter().map(|g| g.0).sum());
            }
            if plain && last_line.elapsed() >= ui::PLAIN_EVERY {
                last_line = Instant::now();
                eprintln!(
                    "corelay-load: broadcast [{:.0}s] {} of {expected} delivered",
                    t0.elapsed().as_secs_f64(),
                    got.iter().map(|g| g.0).sum::<u64>()
                );
            }
            if last_kernel.elapsed() >= Duration::from_millis(100) {
                last_kernel = Instant::now();
                if let Some(k) = procfs::kernel() {
                    tcp_max = Some(tcp_max.unwrap_or(0).max(k.tcp_mem_pages));
                }
            }
        }
        pb.finish_and_clear();
    }
    if let Some(c0) = cpu0 {
        r.cpu = Some(c0.ticks_until(&servers.cpu()) as f64 / clk as f64);
    }
    r.tcp_mem_pages_max = tcp_max;
    r
}

fn cpu_s(a: &Option<CpuSnap>, b: &Option<CpuSnap>, clk: u64) -> Option<f64> {
    Some(a.as_ref()?.ticks_until(b.as_ref()?) as f64 / clk as f64)
}

fn opt_r3(x: Option<f64>) -> Value {
    x.map_or(Value::Null, r3)
}

pub fn run(a: IdleArgs) -> anyhow::Result<Report> {
    a.common.check()?;
    let quiet = a.common.quiet;
    let transport: Transport = a.transport.into();
    let target = a.common.target(transport)?;
    a.common.token_query(0)?;
    let servers = a.servers();
    servers.check()?;
    let channel = a.channel();
    if let Some(c) = &channel {
        anyhow::ensure!(transport == Transport::Ws, "--follow needs --transport ws");
        corelay_proto::cursor::kind(c).map_err(|e| anyhow::anyhow!("--follow: {}", e.0))?;
    }
    if a.broadcast {
        anyhow::ensure!(channel.is_some(), "--broadcast needs --follow TOPIC");
        anyhow::ensure!(
            a.api.is_some() && a.api_key.is_some(),
            "--broadcast needs --api URL and --api-key KEY"
        );
    }
    let procs = a.common.procs;
    check_fd_budget(a.connections.div_ceil(procs), procs, quiet);
    if a.hold >= a.common.timeout {
        eprintln!(
            "corelay-load: warning: --hold {} is not shorter than --timeout {}: the hold will be cut",
            humantime::format_duration(a.hold),
            humantime::format_duration(a.common.timeout)
        );
    }
    let started = Instant::now();
    let deadline = started + a.common.timeout;
    let clk = procfs::clk_tck();
    let measured = servers.any();
    let kernel_before = kernel_samples(a.rss_samples);
    let rss_before = servers.rss_kib();
    let cpu_start = measured.then(|| servers.cpu());
    ui::note(
        quiet,
        &format!(
            "idle: opening {} {} connections to {}{} from {procs} process(es)",
            a.connections,
            transport.name(),
            target.addr,
            channel
                .as_deref()
                .map(|c| format!(" following {c}"))
                .unwrap_or_default(),
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
    let cpu_ready = measured.then(|| servers.cpu());
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

    // The hold: server CPU over it, then the RSS and the kernel's figures.
    w.send(Cmd::Go);
    let cpu0 = measured.then(|| servers.cpu());
    let hold_start = Instant::now();
    let hold_end = (hold_start + a.hold).min(deadline);
    let pb = ui::timer(quiet, a.hold, "hold");
    while Instant::now() < hold_end {
        let left = hold_end.saturating_duration_since(Instant::now());
        w.recv(left.min(Duration::from_millis(250)));
        pb.set_position(hold_start.elapsed().as_secs());
    }
    let cpu1 = measured.then(|| servers.cpu());
    let held_s = hold_start.elapsed().as_secs_f64();
    w.send(Cmd::Mark);
    pb.finish_and_clear();
    let mut samples = Vec::new();
    let mut kernel_after = Vec::new();
    let mut server_procs = 0;
    for k in 0..a.rss_samples.max(1) {
        if k > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Some((rss, n)) = servers.rss_kib() {
            samples.push(rss);
            server_procs = server_procs.max(n);
        }
        kernel_after.extend(procfs::kernel());
    }
    let rss_after = samples.iter().copied().min();
    let kernel_after = procfs::least_used(&kernel_after);
    let server_pids = servers.pids();

    let expect: Vec<bool> = ready
        .ready
        .iter()
        .map(|r| {
            r.as_ref()
                .is_some_and(|v| v["open"].as_u64().unwrap_or(0) > 0)
        })
        .collect();
    let mut bc = a
        .broadcast
        .then(|| broadcast(&a, &mut w, &expect, opened, deadline, &servers, clk));

    w.send(Cmd::Stop);
    // Workers answer within seconds on a quiet machine; a saturated one (a million connections on two
    // cores) needs longer: a minute, within the run's deadline.
    let (results, lost) = w.collect(
        (Instant::now() + Duration::from_secs(60))
            .min(deadline.max(Instant::now() + Duration::from_secs(15))),
        |_, _| {},
    );
    let children = w.count > 1;
    w.finish(Duration::from_secs(5));

    let mut failures = Tally::default();
    let mut retried = Tally::default();
    let mut closed_reasons = Tally::default();
    let mut server_errors = Tally::default();
    let mut hs = stats::histogram();
    let mut ready_h = stats::histogram();
    let mut errors = Vec::new();
    let (mut closed_hold, mut pings_hold, mut marked) = (0u64, 0u64, 0usize);
    let (mut client_rss, mut client_rss_start) = (0u64, 0u64);
    for r in &results {
        failures.merge(&r["failures"]);
        retried.merge(&r["retried"]);
        closed_reasons.merge(&r["closed_reasons"]);
        server_errors.merge(&r["server_errors"]);
        stats::merge(&mut hs, &r["handshake_us"]);
        stats::merge(&mut ready_h, &r["ready_us"]);
        if let Some(e) = r["error"].as_str() {
            errors.push(e.to_string());
        }
        if let (Some(c0), Some(c1), Some(p0), Some(p1)) = (
            r["closed_at_go"].as_u64(),
            r["closed_at_mark"].as_u64(),
            r["pings_at_go"].as_u64(),
            r["pings_at_mark"].as_u64(),
        ) {
            closed_hold += c1.saturating_sub(c0);
            pings_hold += p1.saturating_sub(p0);
            marked += 1;
        }
        client_rss += r["rss_kib"].as_u64().unwrap_or(0);
        client_rss_start += r["rss_start_kib"].as_u64().unwrap_or(0);
    }
    // With one worker it is a thread of this process: its reading is this process's RSS.
    let client_rss_workers = client_rss;
    if children {
        client_rss += procfs::rss_kib(std::process::id()).unwrap_or(0);
    }
    let connected = stats::sum(&results, "open");
    let closed = stats::sum(&results, "closed");
    let held = connected.saturating_sub(closed);
    let per_conn = |kib: Option<i64>| -> Value {
        match kib {
            Some(k) if held > 0 => r3(k as f64 * 1024.0 / held as f64),
            _ => Value::Null,
        }
    };
    let mut m = Report::default();
    m.insert("scenario", json!("idle"));
    m.insert("transport", json!(transport.name()));
    m.insert("tls", json!(target.tls.is_some()));
    m.insert("url", json!(a.common.url));
    m.insert("connections", json!(a.connections));
    m.insert("procs", json!(procs));
    m.insert("hold_s", r3(a.hold.as_secs_f64()));
    m.insert("follow", json!(channel));
    m.insert("broadcast", json!(a.broadcast));
    m.insert("connected", json!(connected));
    m.insert("connect_failures", json!(failures.total()));
    m.insert("failures", failures.to_json());
    m.insert("retries", json!(retried.total()));
    m.insert("retry_reasons", retried.to_json());
    m.insert("connect_s", r3(ready.elapsed.as_secs_f64()));
    if target.tls.is_some() {
        m.insert("tls_full", json!(stats::sum(&results, "tls_full")));
        m.insert("tls_resumed", json!(stats::sum(&results, "tls_resumed")));
    }
    stats::percentiles(&hs, "handshake", &mut m);
    if channel.is_some() {
        stats::percentiles(&ready_h, "ready", &mut m);
    }
    m.insert("closed_during_run", json!(closed));
    m.insert("closed_reasons", closed_reasons.to_json());
    m.insert(
        "closed_during_hold",
        if marked > 0 {
            json!(closed_hold)
        } else {
            Value::Null
        },
    );
    m.insert("held_connections", json!(held));
    m.insert(
        "pings_answered",
        json!(stats::sum(&results, "pings_answered")),
    );
    m.insert(
        "pings_during_hold",
        if marked > 0 {
            json!(pings_hold)
        } else {
            Value::Null
        },
    );
    if transport == Transport::LongPoll {
        m.insert(
            "longpoll_responses",
            json!(stats::sum(&results, "longpoll_responses")),
        );
    }
    if channel.is_some() {
        m.insert("server_errors", server_errors.to_json());
        m.insert(
            "unexpected_frames",
            json!(stats::sum(&results, "unexpected")),
        );
    }

    // The server.
    m.insert(
        "server_pid",
        json!((a.server_pid.len() == 1 && a.server_children_of.is_none()).then(|| a.server_pid[0])),
    );
    m.insert("server_children_of", json!(a.server_children_of));
    m.insert(
        "server_processes",
        if measured {
            json!(server_procs)
        } else {
            Value::Null
        },
    );
    m.insert("server_processes_before", json!(rss_before.map(|r| r.1)));
    m.insert(
        "server_pids",
        if measured {
            json!(server_pids)
        } else {
            Value::Null
        },
    );
    let rss_before = rss_before.map(|r| r.0);
    m.insert("rss_before_kib", json!(rss_before));
    m.insert("rss_after_kib", json!(rss_after));
    m.insert("rss_after_samples_kib", json!(samples));
    m.insert(
        "bytes_per_conn",
        per_conn(match (rss_before, rss_after) {
            (Some(b), Some(a)) => Some(a as i64 - b as i64),
            _ => None,
        }),
    );
    let hold_cpu_s = cpu_s(&cpu0, &cpu1, clk);
    m.insert(
        "server_cpu_ms_per_s",
        opt_r3(
            hold_cpu_s
                .filter(|_| held_s > 0.0)
                .map(|c| c * 1000.0 / held_s),
        ),
    );
    m.insert(
        "hold_cpu_pct",
        opt_r3(
            hold_cpu_s
                .filter(|_| held_s > 0.0)
                .map(|c| c / held_s * 100.0),
        ),
    );
    m.insert("hold_cpu_s", opt_r3(hold_cpu_s));
    m.insert("connect_cpu_s", opt_r3(cpu_s(&cpu_start, &cpu_ready, clk)));
    m.insert("held_s", r3(held_s));

    // The kernel (the whole machine: both ends of every loopback connection).
    let kd = |f: fn(&procfs::Kernel) -> u64| -> Option<i64> {
        Some(f(kernel_after.as_ref()?) as i64 - f(kernel_before.as_ref()?) as i64)
    };
    let kb = |f: fn(&procfs::Kernel) -> u64| json!(kernel_before.as_ref().map(f));
    let ka = |f: fn(&procfs::Kernel) -> u64| json!(kernel_after.as_ref().map(f));
    m.insert("slab_before_kib", kb(|k| k.slab_kib));
    m.insert("slab_after_kib", ka(|k| k.slab_kib));
    m.insert("slab_delta_kib", json!(kd(|k| k.slab_kib)));
    m.insert("kernel_slab_per_conn_bytes", per_conn(kd(|k| k.slab_kib)));
    m.insert("sunreclaim_delta_kib", json!(kd(|k| k.sunreclaim_kib)));
    m.insert(
        "kernel_sunreclaim_per_conn_bytes",
        per_conn(kd(|k| k.sunreclaim_kib)),
    );
    m.insert("mem_available_before_kib", kb(|k| k.mem_available_kib));
    m.insert("mem_available_after_kib", ka(|k| k.mem_available_kib));
    let used = kd(|k| k.mem_available_kib).map(|d| -d);
    m.insert("mem_used_delta_kib", json!(used));
    m.insert("mem_used_per_conn_bytes", per_conn(used));
    m.insert("tcp_mem_pages_before", kb(|k| k.tcp_mem_pages));
    m.insert("tcp_mem_pages_after", ka(|k| k.tcp_mem_pages));
    m.insert("tcp_mem_pages_delta", json!(kd(|k| k.tcp_mem_pages)));
    m.insert("tcp_inuse_delta", json!(kd(|k| k.tcp_inuse)));
    m.insert("sockets_used_before", kb(|k| k.sockets_used));
    m.insert("sockets_used_after", ka(|k| k.sockets_used));
    m.insert("sockets_used_delta", json!(kd(|k| k.sockets_used)));

    // The load generator itself.
    m.insert(
        "client_rss_kib",
        if client_rss > 0 {
            json!(client_rss)
        } else {
            Value::Null
        },
    );
    // Growth of the workers only: the coordinator holds no connection.
    m.insert(
        "client_bytes_per_conn",
        per_conn(
            (client_rss_workers > 0).then_some(client_rss_workers as i64 - client_rss_start as i64),
        ),
    );

    if let Some(bc) = &mut bc {
        // Connections closed meanwhile cannot have it.
        bc.expected = held;
        insert_broadcast(&mut m, bc, &results);
    }
    m.insert("workers_lost", json!(lost));
    if !errors.is_empty() {
        m.insert("worker_errors", json!(errors));
    }
    m.insert("elapsed_s", r3(started.elapsed().as_secs_f64()));
    Ok(m)
}

/// The broadcast figures from the workers' RESULTs.
fn insert_broadcast(m: &mut Report, bc: &Broadcast, results: &[Value]) {
    let mut delivered = 0u64;
    let mut first_us: Option<u64> = None;
    let mut last_us: Option<u64> = None;
    let mut h = stats::histogram();
    for r in results {
        for x in r["broadcasts"].as_array().into_iter().flatten() {
            if x["b"].as_u64() != Some(bc.b) {
                continue;
            }
            delivered += x["n"].as_u64().unwrap_or(0);
            let f = x["first_us"].as_u64().unwrap_or(bc.publish_us);
            first_us = Some(first_us.map_or(f, |v| v.min(f)));
            let l = x["last_us"].as_u64().unwrap_or(f);
            last_us = Some(last_us.map_or(l, |v| v.max(l)));
            // Each worker's times are relative to its own first delivery: shift them to the publish.
            let shift = f.saturating_sub(bc.publish_us);
            for pair in x["rel_us"].as_array().into_iter().flatten() {
                if let (Some(v), Some(c)) = (pair[0].as_u64(), pair[1].as_u64()) {
                    let _ = h.record_n((v + shift).clamp(1, h.high()), c);
                }
            }
        }
    }
    let ms = |us: Option<u64>| us.map(|u| u.saturating_sub(bc.publish_us) as f64 / 1000.0);
    let q = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0);
    let last_ms = ms(last_us);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    m.insert("broadcast_b", json!(bc.b));
    m.insert("broadcast_offset", json!(bc.offset));
    m.insert("broadcast_publish_ms", opt_r3(bc.publish_ms));
    m.insert("broadcast_expected", json!(bc.expected));
    m.insert("broadcast_delivered", json!(delivered));
    m.insert(
        "broadcast_missing",
        json!(bc.expected.saturating_sub(delivered)),
    );
    m.insert("broadcast_first_ms", opt_r3(ms(first_us)));
    m.insert("broadcast_p50_ms", opt_r3(q(0.5)));
    m.insert("broadcast_p99_ms", opt_r3(q(0.99)));
    m.insert("broadcast_last_ms", opt_r3(last_ms));
    m.insert("cores", json!(cores));
    m.insert(
        "deliveries_per_s_per_core",
        opt_r3(
            last_ms
                .filter(|&l| l > 0.0 && delivered > 0)
                .map(|l| delivered as f64 / (l / 1000.0) / cores as f64),
        ),
    );
    m.insert("broadcast_server_cpu_s", opt_r3(bc.cpu));
    m.insert("broadcast_tcp_mem_pages_max", json!(bc.tcp_mem_pages_max));
    m.insert("broadcast_error", json!(bc.error));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert_eq!(channel_name("broadcast"), "topic:broadcast");
        assert_eq!(channel_name("scores:m42"), "scores:m42");
    }

    #[test]
    fn broadcast_figures_merge_shifted() {
        let mut h1 = stats::histogram();
        h1.record(1).unwrap(); // first delivery of worker 1
        h1.record(4000).unwrap();
        let mut h2 = stats::histogram();
        h2.record(1).unwrap();
        let results = vec![
            json!({"broadcasts": [{"b": 7, "n": 2, "first_us": 1_000_000, "last_us": 1_004_000, "rel_us": stats::encode(&h1)}]}),
            json!({"broadcasts": [{"b": 7, "n": 1, "first_us": 1_010_000, "last_us": 1_010_000, "rel_us": stats::encode(&h2)},
                                  {"b": 8, "n": 5, "first_us": 1, "last_us": 2, "rel_us": []}]}),
        ];
        let bc = Broadcast {
            b: 7,
            publish_us: 998_000,
            expected: 3,
            ..Broadcast::default()
        };
        let mut m = Report::default();
        insert_broadcast(&mut m, &bc, &results);
        let v: Value = serde_json::from_str(&m.to_string()).unwrap();
        assert_eq!(v["broadcast_delivered"], 3);
        assert_eq!(v["broadcast_missing"], 0);
        assert_eq!(v["broadcast_first_ms"], 2.0);
        assert_eq!(v["broadcast_last_ms"], 12.0);
        // Deliveries at 2 ms, 6 ms and 12 ms after the publish.
        let p50 = v["broadcast_p50_ms"].as_f64().unwrap();
        assert!((5.9..6.1).contains(&p50), "{p50}");
    }
}
