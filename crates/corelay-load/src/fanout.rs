//! `fanout`: one channel with N subscribers (users s0..s{N-1}) and a publisher: a conversation (the default;
//! publisher `pub` on a WebSocket), a topic (`--channel topic`, `POST /api/publish`) or an Nchan channel
//! (`--peer nchan`); subscribers over WebSocket or SSE (`--transport`). The
//! publisher sends M chat messages, one at a time (the next once every subscriber has the previous one)
//! or on a fixed `--gap`. For each message the report gives the time until the LAST subscriber had it,
//! and over all deliveries the per-subscriber latency.
//!
//! Timestamps that cross processes are wall-clock µs (see `stats::Clock`): the publisher puts its send
//! time in the message body (`{"seq":m,"t":µs}`), each worker records every delivery's latency and,
//! once all of its subscribers have message m, reports `SAMPLE {"seq":m,"n":…,"first_us":…,"last_us":…}`
//! to the coordinator, which takes the maximum over workers.
//!
//! Subscribers are WebSocket connections, or with `--transport sse` server-sent event streams (corelay's
//! `GET /sse`, which carries the user's conversations; Nchan's `nchan_subscriber eventsource` location) whose
//! events' data go through the same accounting. The publisher is the same either way.
//!
//! Longer than 600 lines: one scenario's worker, coordinator and report, for two servers and two subscriber
//! transports, kept together because they share the message shape and the per-message accounting.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use corelay_proto::ws::Opcode;
use serde_json::{Value, json};

use crate::http;
use crate::net::{Event, Net, Rng, Target, Transport};
use crate::open::Opener;
use crate::stats::{self, Clock, Report, Tally, r3};
use crate::ui;
use crate::workers::{self, Cmd, Line, Link, Workers};
use crate::{Common, check_fd_budget, emit_result, mint};

#[derive(Args, Clone, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Base URL of the HTTP API, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub api: String,
    /// Key for POST /api/conversations.
    #[arg(long)]
    pub api_key: String,
    /// Subscriber connections (users s0..s{N-1}).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Messages the publisher sends.
    #[arg(long, default_value_t = 20)]
    pub messages: usize,
    /// Send on this fixed gap instead of waiting for every subscriber to have the previous message.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub gap: Option<Duration>,
    /// Give up waiting for a message's deliveries after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub msg_timeout: Duration,
    /// Extra bytes of filler in every message body (English text: it compresses like a chat message).
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
    /// Handshakes in flight per process while opening (0: all at once).
    #[arg(long, default_value_t = 1000)]
    pub max_pending: usize,
    /// Subscribers connect here instead of --url (repeatable): worker process i uses the (i mod n)-th, so
    /// with --procs equal to the number of nodes the subscribers spread over a cluster while the publisher
    /// stays on --url (cross-node delivery).
    #[arg(long = "sub-url")]
    pub sub_urls: Vec<String>,
    /// The server under test: corelay (a conversation, a WebSocket publisher), or nchan (subscribers on
    /// --url, an `nchan_subscriber websocket` location; messages POSTed to --pub-url).
    #[arg(long, value_enum, default_value = "corelay")]
    pub peer: Peer,
    /// Nchan's publisher location, e.g. http://127.0.0.1:8081/pub/bench.
    #[arg(long)]
    pub pub_url: Option<String>,
    /// Server process id(s) whose CPU time over the publishing phase is measured (repeatable).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Also measure every current child of this process (the nginx master: its workers).
    #[arg(long, value_name = "PID")]
    pub server_children_of: Option<u32>,
    /// What the subscribers speak: ws (WebSocket), or sse (a server-sent event stream: for corelay `GET
    /// /sse` with a token, on --sub-url or --url, whose path `/ws` becomes `/sse`; for Nchan --url is an
    /// `nchan_subscriber eventsource` location). The publisher is the same either way.
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: SubTransport,
    /// corelay's channel: a conversation (members s0..s{N-1}, every message committed to the store before
    /// it is delivered, published over the publisher's WebSocket), or a topic (`topic:fanout`, followed
    /// by every subscriber, published with `POST /api/publish`; kept in memory on a single node, like an
    /// Nchan channel: the like-for-like comparison with Nchan).
    #[arg(long, value_enum, default_value = "conversation")]
    pub channel: ChannelKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChannelKind {
    Conversation,
    Topic,
}

/// The topic of `--channel topic`.
const TOPIC: &str = "topic:fanout";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SubTransport {
    Ws,
    Sse,
}

impl SubTransport {
    fn name(self) -> &'static str {
        match self {
            SubTransport::Ws => "ws",
            SubTransport::Sse => "sse",
        }
    }
}

/// Worker `index`'s subscriber target: its --sub-url, or --url; for SSE, a corelay WebSocket path (`/ws`)
/// becomes `/sse` and the stream is parsed into events.
fn sub_target(a: &FanoutArgs, index: usize) -> anyhow::Result<Target> {
    let mut c = a.common.clone();
    if let Some(url) = a.sub_urls.get(index % a.sub_urls.len().max(1)) {
        c.url = url.clone();
    }
    if a.transport == SubTransport::Ws {
        return c.target(Transport::Ws);
    }
    let mut t = c.target(Transport::Sse)?;
    t.path = sse_path(&t.path);
    t.sse_events = true;
    Ok(t)
}

/// `/ws` and `/ws?…` → `/sse` and `/sse?…`; any other path stays as it is.
fn sse_path(path: &str) -> String {
    match path.strip_prefix("/ws") {
        Some(rest) if rest.is_empty() || rest.starts_with('?') => format!("/sse{rest}"),
        _ => path.to_string(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    Corelay,
    Nchan,
}

pub fn worker(a: &FanoutArgs, link: Link) {
    let r = work(a, &link);
    emit_result(&link, r);
}

#[derive(Clone, Copy, Default)]
struct Seq {
    n: u64,
    first_us: u64,
    last_us: u64,
    reported: bool,
}

struct Subs<'a> {
    link: &'a Link,
    /// Nchan: no welcome (an open connection is ready) and messages are the published bodies themselves.
    raw: bool,
    /// corelay topic over WebSocket: sent after the `welcome`; the subscriber is ready at `subscribed`.
    subscribe: Option<Vec<u8>>,
    clock: Clock,
    welcomed: Vec<bool>,
    welcomes: u64,
    live_welcomed: u64,
    seqs: Vec<Seq>,
    latency: hdrhistogram::Histogram<u64>,
    deliveries: u64,
    unexpected: u64,
    errors: Tally,
    closed: Tally,
}

impl Subs<'_> {
    fn welcome(&mut self, id: usize) {
        if id >= self.welcomed.len() {
            self.welcomed.resize(id + 1, false);
        }
        if !self.welcomed[id] {
            self.welcomed[id] = true;
            self.welcomes += 1;
            self.live_welcomed += 1;
        }
    }

    fn on_event(&mut self, net: &mut Net, ev: Event<'_>) {
        match ev {
            Event::Open { id, .. } if self.raw => self.welcome(id),
            Event::Message { id, payload, .. } => self.on_payload(net, id, payload, None),
            // An SSE event's data is what a WebSocket message would carry.
            Event::Sse { id, event, data } => self.on_payload(net, id, data, Some(event)),
            Event::Failed {
                id,
                reason,
                opened: true,
            } => {
                self.closed.add(&reason, 1);
                if self.welcomed.get(id).copied().unwrap_or(false) {
                    self.live_welcomed -= 1;
                }
            }
            _ => {}
        }
    }

    /// A WebSocket message, or an SSE event's data (`sse_event`: the event's type).
    fn on_payload(&mut self, net: &mut Net, id: usize, payload: &[u8], sse_event: Option<&[u8]>) {
        let recv_us = self.clock.now_us();
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            self.unexpected += 1;
            return;
        };
        let ty = match (self.raw, sse_event) {
            (true, _) => Some("message"),
            // corelay names an SSE event after its message's type: what an `EventSource` dispatches on.
            (false, Some(e)) => std::str::from_utf8(e).ok(),
            (false, None) => v["type"].as_str(),
        };
        match ty {
            // corelay, topic over WebSocket: follow the topic; ready once it is subscribed.
            Some("welcome") if self.subscribe.is_some() => {
                if let Some(f) = &self.subscribe {
                    net.send(id, Opcode::Text, f);
                }
            }
            Some("subscribed") if self.subscribe.is_some() => self.welcome(id),
            // corelay: a WebSocket's `welcome`, or an SSE stream's first event, `stream` (sent once the
            // stream's channels are subscribed).
            Some("welcome" | "stream") => self.welcome(id),
            Some("message") => {
                // Nchan delivers what was published: the publisher posts corelay's message shape (so both
                // servers carry the same bytes), or a bare body.
                let body = if self.raw && v["body"].is_null() {
                    &v
                } else {
                    &v["body"]
                };
                let (Some(seq), Some(t)) = (body["seq"].as_u64(), body["t"].as_u64()) else {
                    self.unexpected += 1;
                    return;
                };
                let Some(s) = self.seqs.get_mut(seq as usize) else {
                    self.unexpected += 1;
                    return;
                };
                self.deliveries += 1;
                stats::record(
                    &mut self.latency,
                    Duration::from_micros(recv_us.saturating_sub(t)),
                );
                if s.n == 0 {
                    s.first_us = recv_us;
                }
                s.n += 1;
                s.last_us = s.last_us.max(recv_us);
                if !s.reported && s.n >= self.live_welcomed {
                    s.reported = true;
                    self.link.emit(
                        "SAMPLE",
                        &json!({"seq": seq, "n": s.n, "first_us": s.first_us, "last_us": s.last_us}),
                    );
                }
            }
            Some("error") => self.errors.add(v["code"].as_str().unwrap_or("error"), 1),
            _ => self.unexpected += 1,
        }
    }
}

fn work(a: &FanoutArgs, link: &Link) -> anyhow::Result<Value> {
    let raw = a.peer == Peer::Nchan;
    let secret = match a.common.token_secret.as_deref() {
        Some(s) => s,
        None if raw => "",
        None => bail!("--token-secret is required"),
    };
    let range = workers::share(a.subscribers, link.index, link.count);
    let deadline = Instant::now() + a.common.timeout + Duration::from_secs(5);
    let mut net = Net::new(sub_target(a, link.index)?)?;
    let mut op = Opener::new(range, a.max_pending, a.common.connect_timeout, deadline);
    let timeout = a.common.timeout;
    let mut query = |i: usize| {
        if raw {
            return String::new();
        }
        let token = mint(secret, &format!("s{i}"), timeout).unwrap_or_default();
        match (a.channel, a.transport) {
            (ChannelKind::Topic, SubTransport::Sse) => format!("token={token}&channels={TOPIC}"),
            _ => format!("token={token}"),
        }
    };
    let subscribe = (!raw && a.channel == ChannelKind::Topic && a.transport == SubTransport::Ws)
        .then(|| {
            json!({"type": "subscribe", "channels": [TOPIC]})
                .to_string()
                .into_bytes()
        });
    let mut subs = Subs {
        link,
        raw,
        subscribe,
        clock: Clock::new(),
        welcomed: Vec::new(),
        welcomes: 0,
        live_welcomed: 0,
        seqs: vec![Seq::default(); a.messages],
        latency: stats::histogram(),
        deliveries: 0,
        unexpected: 0,
        errors: Tally::default(),
        closed: Tally::default(),
    };
    // Open, and wait for every open connection's welcome.
    loop {
        let closed_before_welcome = subs
            .closed
            .total()
            .saturating_sub(subs.welcomes - subs.live_welcomed);
        let waiting = (op.open as u64).saturating_sub(subs.welcomes + closed_before_welcome);
        if op.done() && waiting == 0 {
            break;
        }
        if !op.step(&mut net, link, &mut query, &mut |n, _, ev| {
            subs.on_event(n, ev)
        })? {
            break;
        }
    }
    op.progress(link);
    link.emit(
        "READY",
        &json!({"open": subs.live_welcomed, "failed": op.failed.total() + (op.open as u64).saturating_sub(subs.welcomes)}),
    );
    let bytes_ready = net.stats.bytes_in;
    let mut stop = op.stopped;
    while !stop && Instant::now() < deadline {
        net.poll(Some(Duration::from_millis(50)), &mut |n, ev| {
            subs.on_event(n, ev)
        })?;
        stop = link.try_cmd() == Some(Cmd::Stop);
    }
    let incomplete: Vec<Value> = subs
        .seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.reported)
        .map(|(i, s)| json!({"seq": i, "n": s.n, "first_us": s.first_us, "last_us": s.last_us}))
        .collect();
    let v = json!({
        "open": subs.welcomes,
        "failed": op.failed.total(),
        "failures": op.failed.to_json(),
        "deliveries": subs.deliveries,
        "unexpected": subs.unexpected,
        "server_errors": subs.errors.to_json(),
        "closed": subs.closed.total(),
        "closed_reasons": subs.closed.to_json(),
        "pings_answered": net.stats.pings_answered,
        "bytes_in_publish": net.stats.bytes_in - bytes_ready,
        "compressed": net.stats.compressed_in,
        "latency_us": stats::encode(&subs.latency),
        "incomplete": incomplete,
    });
    net.close_all();
    Ok(v)
}

/// POST {api}/api/conversations (blocking; one request).
fn create_conversation(api: &str, key: &str, id: &str, members: &[String]) -> anyhow::Result<u16> {
    let body = json!({"id": id, "members": members});
    let (status, text) = http::post_json(api, key, "/api/conversations", &body)?;
    if !(200..300).contains(&status) {
        bail!("POST /api/conversations: {status} {}", text.trim());
    }
    Ok(status)
}

/// The publisher connection, in the coordinator.
#[derive(Default)]
struct Publisher {
    welcomed: bool,
    failed: Option<String>,
    acks: u64,
    errors: Tally,
    /// HTTP publishes (Nchan, corelay topics) run on threads of their own, so that a server slow to
    /// answer a POST cannot hold the next message back: the schedule is the same open loop as the
    /// WebSocket publisher's. Each thread sends its answer here.
    posts: Option<std::sync::mpsc::Receiver<Result<(u16, String), String>>>,
    posts_tx: Option<std::sync::mpsc::Sender<Result<(u16, String), String>>>,
    posts_out: u64,
}

impl Publisher {
    /// POSTs `body` to `url` (`path` appended, `key` as the bearer) on a thread of its own.
    fn post(&mut self, url: &str, key: &str, path: &'static str, body: Value) {
        if self.posts_tx.is_none() {
            let (tx, rx) = std::sync::mpsc::channel();
            self.posts_tx = Some(tx);
            self.posts = Some(rx);
        }
        let Some(tx) = self.posts_tx.clone() else {
            return;
        };
        let (url, key) = (url.to_string(), key.to_string());
        self.posts_out += 1;
        std::thread::spawn(move || {
            let r = http::post_json(&url, &key, path, &body).map_err(|e| format!("{e:#}"));
            let _ = tx.send(r);
        });
    }

    /// Takes in the answers of finished POSTs.
    fn collect_posts(&mut self) {
        let Some(rx) = &self.posts else { return };
        while let Ok(r) = rx.try_recv() {
            self.posts_out -= 1;
            match r {
                Ok((status, _)) if (200..300).contains(&status) => self.acks += 1,
                Ok((status, text)) => self.errors.add(&format!("{status}: {}", text.trim()), 1),
                Err(e) => self.errors.add(&e, 1),
            }
        }
    }

    fn on_event(&mut self, ev: Event<'_>) {
        match ev {
            Event::Message { payload, .. } => {
                let Ok(v) = serde_json::from_slice::<Value>(payload) else {
                    return;
                };
                match v["type"].as_str() {
                    Some("welcome") => self.welcomed = true,
                    Some("sent") => self.acks += 1,
                    Some("error") => {
                        let code = v["code"].as_str().unwrap_or("error");
                        let msg = v["message"].as_str().unwrap_or("");
                        self.errors.add(&format!("{code}: {msg}"), 1);
                    }
                    _ => {}
                }
            }
            Event::Failed { reason, .. } => self.failed = Some(reason),
            _ => {}
        }
    }
}

/// Per message: when it was sent and what each worker reported.
struct Track {
    send_us: Vec<Option<u64>>,
    /// [seq][worker] = (n, first_us, last_us)
    got: Vec<Vec<Option<(u64, u64, u64)>>>,
    expect: Vec<bool>,
}

impl Track {
    fn complete(&self, m: usize) -> bool {
        self.got[m]
            .iter()
            .zip(&self.expect)
            .all(|(g, e)| !e || g.is_some())
    }

    fn on_line(&mut self, i: usize, l: Line) {
        if let Line::Sample(v) = l
            && let Some(seq) = v["seq"].as_u64()
            && let Some(row) = self.got.get_mut(seq as usize)
        {
            row[i] = Some((
                v["n"].as_u64().unwrap_or(0),
                v["first_us"].as_u64().unwrap_or(0),
                v["last_us"].as_u64().unwrap_or(0),
            ));
        }
    }
}

/// Polls the publisher and takes in worker lines for up to `wait`.
fn pump(
    net: &mut Net,
    pubr: &mut Publisher,
    w: &mut Workers,
    track: &mut Track,
    wait: Duration,
) -> anyhow::Result<()> {
    net.poll(Some(wait), &mut |_, ev| pubr.on_event(ev))?;
    pubr.collect_posts();
    while let Some((i, l)) = w.try_recv() {
        track.on_line(i, l);
    }
    Ok(())
}

pub fn run(a: FanoutArgs) -> anyhow::Result<Report> {
    a.common.check()?;
    let quiet = a.common.quiet;
    let nchan = a.peer == Peer::Nchan;
    let secret = match (&a.common.token_secret, nchan) {
        (Some(s), _) => s.clone(),
        (None, true) => String::new(),
        (None, false) => {
            bail!("--token-secret is required (subscribers and the publisher need tokens)")
        }
    };
    anyhow::ensure!(
        !nchan || a.pub_url.is_some(),
        "--peer nchan needs --pub-url"
    );
    anyhow::ensure!(a.subscribers > 0, "--subscribers must be positive");
    let servers = crate::server::Servers::new(a.server_pid.clone(), a.server_children_of);
    servers.check()?;
    let procs = a.common.procs;
    check_fd_budget(a.subscribers.div_ceil(procs), procs, quiet);
    let started = Instant::now();
    let deadline = started + a.common.timeout;
    let conv = format!("fanout-{:016x}", Rng::new().next_u64());
    let mut members: Vec<String> = (0..a.subscribers).map(|i| format!("s{i}")).collect();
    members.push("pub".into());
    // A topic needs no setup: subscribers follow it, and it exists once followed.
    let topic = !nchan && a.channel == ChannelKind::Topic;
    let status = if nchan || topic {
        0
    } else {
        create_conversation(&a.api, &a.api_key, &conv, &members)?
    };
    ui::note(
        quiet,
        &format!(
            "fanout: conversation {conv} created ({status}); connecting {} subscribers",
            a.subscribers
        ),
    );

    let mut net = Net::new(a.common.target(Transport::Ws)?)?;
    let waker = net.waker()?;
    let mut w = Workers::start(procs, Some(waker), {
        let a = a.clone();
        move |link| worker(&a, link)
    })
    .context("starting workers")?;
    let mut pubr = Publisher::default();
    let pub_id = if nchan || topic {
        pubr.welcomed = true;
        usize::MAX
    } else {
        let pub_query = format!("token={}", mint(&secret, "pub", a.common.timeout)?);
        match net.connect(&pub_query, a.subscribers) {
            Ok(id) => id,
            Err(e) => bail!("publisher connection: {e:?}"),
        }
    };
    let pb = ui::bar(quiet, a.subscribers as u64, "connect");
    let ready = ui::await_ready(&mut w, deadline, &pb, &mut || {
        let _ = net.poll(Some(Duration::ZERO), &mut |_, ev| pubr.on_event(ev));
    });
    pb.finish_and_clear();
    let t_pub = Instant::now();
    while !pubr.welcomed && pubr.failed.is_none() && t_pub.elapsed() < a.common.connect_timeout {
        net.poll(Some(Duration::from_millis(20)), &mut |_, ev| {
            pubr.on_event(ev)
        })?;
    }
    if let Some(f) = &pubr.failed {
        bail!("publisher connection failed: {f}");
    }
    anyhow::ensure!(pubr.welcomed, "publisher got no welcome");
    let expect: Vec<bool> = ready
        .ready
        .iter()
        .map(|r| {
            r.as_ref()
                .is_some_and(|v| v["open"].as_u64().unwrap_or(0) > 0)
        })
        .collect();
    let subs_open: u64 = stats::sum(&ready.values(), "open");
    anyhow::ensure!(subs_open > 0, "no subscriber connected");
    ui::note(
        quiet,
        &format!(
            "fanout: {subs_open} subscribers ready after {:.2}s; publishing {} messages",
            ready.elapsed.as_secs_f64(),
            a.messages
        ),
    );

    let clock = Clock::new();
    let mut track = Track {
        send_us: vec![None; a.messages],
        got: vec![vec![None; w.count]; a.messages],
        expect,
    };
    // Filler that compresses like chat text (a run of one letter would compress to almost nothing and
    // flatter permessage-deflate).
    const TEXT: &str = "Running ten minutes late, the train stopped at Sydenham again. Can you start the \
        standup without me? Notes from yesterday are in the doc; Priya has the deploy checklist and the \
        rollback plan if the canary looks off. Coffee after? ";
    let pad: String = TEXT.chars().cycle().take(a.pad).collect();
    let mut timeouts = 0u64;
    let cpu0 = servers.cpu();
    let t0 = Instant::now();
    let pb = ui::bar(quiet, a.messages as u64, "publish");
    for m in 0..a.messages {
        if let Some(gap) = a.gap {
            let due = t0 + gap * m as u32;
            while Instant::now() < due && Instant::now() < deadline {
                let wait = due.saturating_duration_since(Instant::now());
                pump(&mut net, &mut pubr, &mut w, &mut track, wait)?;
            }
        }
        if Instant::now() >= deadline || pubr.failed.is_some() {
            break;
        }
        let send_us = clock.now_us();
        let mut body = json!({"seq": m, "t": send_us});
        if !pad.is_empty() {
            body["pad"] = json!(pad);
        }
        if let (true, Some(url)) = (nchan, &a.pub_url) {
            // The message as corelay would deliver it, so that both servers carry the same bytes.
            let channel = match a.channel {
                ChannelKind::Conversation => format!("conversation:{conv}"),
                ChannelKind::Topic => TOPIC.to_string(),
            };
            let msg = json!({
                "type": "message",
                "channel": channel,
                "offset": m + 1,
                "from": "pub",
                "ts": send_us / 1000,
                "body": body,
            });
            pubr.post(url, "", "", msg);
        } else if topic {
            pubr.post(
                &a.api,
                &a.api_key,
                "/api/publish",
                json!({"channel": TOPIC, "body": body}),
            );
        } else {
            let frame = json!({
                "type": "send",
                "conversation": conv,
                "client_id": format!("{conv}-{m}"),
                "body": body,
            })
            .to_string();
            net.send(pub_id, Opcode::Text, frame.as_bytes());
        }
        track.send_us[m] = Some(send_us);
        if a.gap.is_none() {
            let until = (Instant::now() + a.msg_timeout).min(deadline);
            while !track.complete(m) && Instant::now() < until && pubr.failed.is_none() {
                let wait = until.saturating_duration_since(Instant::now());
                pump(
                    &mut net,
                    &mut pubr,
                    &mut w,
                    &mut track,
                    wait.min(Duration::from_millis(100)),
                )?;
            }
            if !track.complete(m) {
                timeouts += 1;
            }
        }
        pb.set_position(m as u64 + 1);
    }
    // Wait for the stragglers.
    let until = (Instant::now() + a.msg_timeout).min(deadline);
    while (0..a.messages).any(|m| track.send_us[m].is_some() && !track.complete(m))
        && Instant::now() < until
        && pubr.failed.is_none()
    {
        let wait = until.saturating_duration_since(Instant::now());
        pump(
            &mut net,
            &mut pubr,
            &mut w,
            &mut track,
            wait.min(Duration::from_millis(100)),
        )?;
    }
    // And for the answers to HTTP publishes still out (their deliveries may all be in already).
    while pubr.posts_out > 0 && Instant::now() < until {
        pump(
            &mut net,
            &mut pubr,
            &mut w,
            &mut track,
            Duration::from_millis(20),
        )?;
    }
    pb.finish_and_clear();
    let cpu1 = servers.cpu();
    for _ in 0..5 {
        pump(
            &mut net,
            &mut pubr,
            &mut w,
            &mut track,
            Duration::from_millis(10),
        )?;
    }
    w.send(Cmd::Stop);
    let (results, lost_workers) = w.collect(Instant::now() + Duration::from_secs(15), |i, l| {
        track.on_line(i, l)
    });
    w.finish(Duration::from_secs(5));
    net.close_all();

    let mut latency = stats::histogram();
    let mut last = stats::histogram();
    let mut first = stats::histogram();
    let mut failures = Tally::default();
    let mut closed = Tally::default();
    let mut server_errors = Tally::default();
    let mut errors = Vec::new();
    for r in &results {
        stats::merge(&mut latency, &r["latency_us"]);
        failures.merge(&r["failures"]);
        closed.merge(&r["closed_reasons"]);
        server_errors.merge(&r["server_errors"]);
        if let Some(e) = r["error"].as_str() {
            errors.push(e.to_string());
        }
    }
    let mut sent = 0u64;
    let mut complete = 0u64;
    let mut first_send = None;
    let mut last_delivery = 0u64;
    for m in 0..a.messages {
        let Some(s) = track.send_us[m] else { continue };
        sent += 1;
        first_send.get_or_insert(s);
        let reports: Vec<_> = track.got[m].iter().flatten().collect();
        if let Some(l) = reports.iter().map(|r| r.2).max() {
            last_delivery = last_delivery.max(l);
        }
        if track.complete(m) {
            complete += 1;
            let l = reports.iter().map(|r| r.2).max().unwrap_or(s);
            let f = reports.iter().map(|r| r.1).min().unwrap_or(s);
            stats::record(&mut last, Duration::from_micros(l.saturating_sub(s)));
            stats::record(&mut first, Duration::from_micros(f.saturating_sub(s)));
        }
    }
    // Incomplete messages' deliveries still count towards the last-delivery instant.
    for r in &results {
        for inc in r["incomplete"].as_array().into_iter().flatten() {
            last_delivery = last_delivery.max(inc["last_us"].as_u64().unwrap_or(0));
        }
    }
    let deliveries = stats::sum(&results, "deliveries");
    let bytes_in = stats::sum(&results, "bytes_in_publish");
    let compressed = stats::sum(&results, "compressed");
    let tick_ms = 1000.0 / crate::stats::procfs::clk_tck() as f64;
    let server_cpu_ms = (!cpu0.is_empty()).then(|| cpu0.ticks_until(&cpu1) as f64 * tick_ms);
    let span_s = first_send.map_or(0.0, |f| last_delivery.saturating_sub(f) as f64 / 1e6);

    let mut m = Report::default();
    m.insert("scenario", json!("fanout"));
    m.insert("url", json!(a.common.url));
    m.insert("conversation", json!(conv));
    m.insert("subscribers", json!(a.subscribers));
    m.insert("procs", json!(procs));
    m.insert("messages", json!(a.messages));
    m.insert(
        "pacing",
        json!(match a.gap {
            Some(g) => format!("gap {}", humantime::format_duration(g)),
            None => "lock-step".to_string(),
        }),
    );
    m.insert("subscribers_connected", json!(subs_open));
    m.insert("connect_failures", json!(failures.total()));
    m.insert("failures", failures.to_json());
    m.insert("connect_s", r3(ready.elapsed.as_secs_f64()));
    m.insert("sent", json!(sent));
    m.insert("publisher_acks", json!(pubr.acks));
    m.insert("publisher_errors", pubr.errors.to_json());
    m.insert("messages_complete", json!(complete));
    m.insert("message_timeouts", json!(timeouts));
    m.insert("deliveries", json!(deliveries));
    m.insert("deliveries_expected", json!(subs_open * sent));
    m.insert(
        "deliveries_per_s",
        if span_s > 0.0 {
            r3(deliveries as f64 / span_s)
        } else {
            Value::Null
        },
    );
    m.insert("span_s", r3(span_s));
    m.insert("peer", json!(format!("{:?}", a.peer).to_lowercase()));
    m.insert("transport", json!(a.transport.name()));
    m.insert(
        "channel",
        json!(match a.channel {
            ChannelKind::Conversation => "conversation",
            ChannelKind::Topic => "topic",
        }),
    );
    m.insert("deflate", json!(a.common.deflate));
    m.insert("compressed_deliveries", json!(compressed));
    m.insert("bytes_in_publishing", json!(bytes_in));
    m.insert(
        "wire_bytes_per_delivery",
        if deliveries > 0 {
            r3(bytes_in as f64 / deliveries as f64)
        } else {
            Value::Null
        },
    );
    m.insert("server_cpu_ms", server_cpu_ms.map_or(Value::Null, r3));
    m.insert(
        "server_cpu_us_per_delivery",
        match server_cpu_ms {
            Some(ms) if deliveries > 0 => r3(ms * 1000.0 / deliveries as f64),
            _ => Value::Null,
        },
    );
    stats::percentiles(&last, "last_delivery", &mut m);
    m.insert("last_delivery_p90_us", p90(&last));
    stats::percentiles(&first, "first_delivery", &mut m);
    stats::percentiles(&latency, "delivery", &mut m);
    m.insert("delivery_p90_us", p90(&latency));
    m.insert("closed_during_run", json!(closed.total()));
    m.insert("closed_reasons", closed.to_json());
    m.insert("subscriber_server_errors", server_errors.to_json());
    m.insert(
        "unexpected_frames",
        json!(stats::sum(&results, "unexpected")),
    );
    m.insert("workers_lost", json!(lost_workers));
    if !errors.is_empty() {
        m.insert("worker_errors", json!(errors));
    }
    m.insert("elapsed_s", r3(started.elapsed().as_secs_f64()));
    Ok(m)
}

fn p90(h: &hdrhistogram::Histogram<u64>) -> Value {
    if h.is_empty() {
        Value::Null
    } else {
        json!(h.value_at_quantile(0.9))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_paths() {
        assert_eq!(sse_path("/ws"), "/sse");
        assert_eq!(sse_path("/ws?x=1"), "/sse?x=1");
        assert_eq!(sse_path("/wsx"), "/wsx");
        assert_eq!(sse_path("/sse/bench"), "/sse/bench");
    }
}
