//! The `corelay` binary: flags → `Config` → start the gateway → wait for a signal → drain → exit 0.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

use corelay::auth::{self, SecretSource};
use corelay::config::{self, Config, FileConfig};
use corelay::server::Server;

mod supervise;

#[derive(Parser)]
#[command(
    name = "corelay",
    version,
    about = "Real-time connection gateway (WebSocket, SSE, long/short polling)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run(Box<RunArgs>),
    /// Print a signed client token (JWT HS256, `sub` = user).
    Token(TokenArgs),
    /// Print the node that owns a user on a consistent-hash ring of node ids.
    Route(RouteArgs),
}

#[derive(Args)]
struct RouteArgs {
    /// Node ids (comma-separated), e.g. n0,n1,n2.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// User ids to route (repeatable).
    #[arg(long = "user", required = true)]
    users: Vec<String>,
    /// Virtual nodes per node.
    #[arg(long, default_value_t = corelay::cluster::ring::Ring::DEFAULT_VNODES)]
    vnodes: usize,
}

#[derive(Args, Default)]
struct RunArgs {
    /// TOML config file; flags override environment, environment overrides the file.
    #[arg(long, env = "CORELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<String>,
    /// Serve `/api/*` and `/metrics` only on this internal address (and refuse them on --listen).
    #[arg(long)]
    admin_listen: Option<String>,
    /// Event loops (one per core by default).
    #[arg(long)]
    threads: Option<usize>,
    /// Do not pin loops to cores.
    #[arg(long)]
    no_pin: bool,
    /// Pin loops to cores: auto (only when each loop gets a core and no CPU quota applies), on, off [default: auto].
    #[arg(long)]
    pin: Option<String>,
    /// Where the embedded store and generated secrets live [default: ./data].
    #[arg(long, env = "CORELAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Node id, unique in the cluster [default: host name + '-' + listening port].
    #[arg(long, env = "CORELAY_NODE_ID")]
    node_id: Option<String>,
    /// HS256 secret for client tokens (generated into the data dir when absent).
    #[arg(long, env = "CORELAY_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Option<String>,
    /// Key for the internal `/api/*` calls (`Authorization: Bearer KEY`; generated when absent).
    #[arg(long, env = "CORELAY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Ping after this much silence [default: 30s].
    #[arg(long)]
    heartbeat_interval: Option<String>,
    /// Close when no pong (or any frame) arrives this long after a ping [default: 10s].
    #[arg(long)]
    heartbeat_timeout: Option<String>,
    /// Time to receive a request head (slowloris guard) [default: 10s].
    #[arg(long)]
    handshake_timeout: Option<String>,
    /// Idle keep-alive HTTP connections are closed after this [default: 60s].
    #[arg(long)]
    keepalive_timeout: Option<String>,
    /// How long a drain waits for clients to close [default: 5s].
    #[arg(long)]
    drain_timeout: Option<String>,
    /// Serve a WebSocket echo endpoint at this path (off by default).
    #[arg(long)]
    echo_path: Option<String>,
    /// Messages kept per topic / user channel for resume [default: 1000].
    #[arg(long)]
    topic_history: Option<usize>,
    /// Bytes of history kept in memory per topic [default: 4MiB].
    #[arg(long)]
    topic_history_bytes: Option<String>,
    /// Bytes of recent messages kept in memory per conversation [default: 64KiB].
    #[arg(long)]
    conversation_window_bytes: Option<String>,
    /// The embedded store's page cache [default: 64MiB].
    #[arg(long)]
    store_cache_bytes: Option<String>,
    /// Age limit of topic history [default: 1h].
    #[arg(long)]
    topic_history_age: Option<String>,
    /// The `retry:` SSE streams announce [default: 2s].
    #[arg(long)]
    sse_retry: Option<String>,
    /// Longest long-poll hold a client may ask for [default: 60s].
    #[arg(long)]
    max_poll_timeout: Option<String>,
    /// Store durability: `always` (fsync each group commit before acking) or an interval like `10ms`.
    #[arg(long)]
    fsync: Option<String>,
    /// Store requests in flight before sends get a retryable `store_busy` [default: 10000].
    #[arg(long)]
    max_pending_writes: Option<usize>,
    /// Expect a PROXY protocol (v1 or v2) header on every connection (behind HAProxy `send-proxy-v2`).
    #[arg(long)]
    proxy_protocol: bool,
    /// Node ids of the consistent-hash ring for `/api/route` (comma-separated).
    #[arg(long, value_delimiter = ',')]
    ring_nodes: Vec<String>,
    /// Redis URL (redis://host:6379): cluster mode. Shared state, pub/sub between nodes, presence.
    #[arg(long, env = "CORELAY_REDIS")]
    redis: Option<String>,
    /// How long presence entries live in Redis without a refresh [default: 30s].
    #[arg(long)]
    presence_ttl: Option<String>,
    /// Scylla contact points (host:9042, comma-separated or repeated); stores messages in Scylla.
    #[arg(long, value_delimiter = ',', env = "CORELAY_SCYLLA")]
    scylla: Vec<String>,
    /// Scylla keyspace [default: corelay].
    #[arg(long)]
    scylla_keyspace: Option<String>,
    /// Replication map used when creating the keyspace, e.g. "{'class': 'SimpleStrategy', 'replication_factor': 1}".
    #[arg(long)]
    scylla_replication: Option<String>,
    #[command(flatten)]
    push: config::PushOptions,
    /// Run N gateway processes sharing the listening port (SO_REUSEPORT), as cluster nodes over `--redis`,
    /// supervised by this one (restarted when they die). For hosts where one process's open-file limit
    /// caps the connections it can hold.
    #[arg(long)]
    processes: Option<usize>,
    /// Allowed browser Origin (repeatable; none = any).
    #[arg(long = "allowed-origin")]
    allowed_origins: Vec<String>,
    /// Request head limit [default: 8KiB].
    #[arg(long)]
    max_header_bytes: Option<String>,
    /// Request header count limit [default: 64].
    #[arg(long)]
    max_headers: Option<usize>,
    /// Request body and chat message body limit [default: 64KiB].
    #[arg(long)]
    max_body_bytes: Option<String>,
    /// WebSocket frame payload limit [default: 64KiB].
    #[arg(long)]
    max_frame_bytes: Option<String>,
    /// WebSocket message limit [default: 64KiB].
    #[arg(long)]
    max_message_bytes: Option<String>,
    /// Unsent bytes per connection before it is cut as a slow consumer [default: 1MiB].
    #[arg(long)]
    max_write_queue_bytes: Option<String>,
    /// Connections per loop [default: 250000].
    #[arg(long)]
    max_connections_per_loop: Option<usize>,
    /// Events queued to the backplane [default: 65536].
    #[arg(long)]
    backplane_queue: Option<usize>,
    /// Requests per second one WebSocket client may send on average [default: 100].
    #[arg(long)]
    client_rate: Option<u32>,
    /// Requests one WebSocket client may send at once; past the rate its input waits (TCP backpressure) [default: 200].
    #[arg(long)]
    client_burst: Option<u32>,
    /// Channels in one subscribe, SSE stream or poll [default: 100].
    #[arg(long)]
    max_channels_per_request: Option<usize>,
    /// Topics one connection follows at once [default: 1000].
    #[arg(long)]
    max_follows_per_connection: Option<usize>,
    /// Live WebSocket + SSE connections of one user on this node [default: 64].
    #[arg(long)]
    max_connections_per_user: Option<usize>,
    /// Connections from one source address, 0 = no cap [default: 20000].
    #[arg(long)]
    max_connections_per_ip: Option<usize>,
    /// HTTP requests (POST /send, polls, new SSE streams) per second of one user per node [default: 100].
    #[arg(long)]
    user_rate: Option<u32>,
    /// …and at once; past it 429 [default: 200].
    #[arg(long)]
    user_burst: Option<u32>,
}

#[derive(Args)]
struct TokenArgs {
    #[arg(long)]
    user: String,
    /// Lifetime, e.g. 1h, 30m [default: 1h].
    #[arg(long, default_value = "1h")]
    ttl: String,
    #[arg(long, env = "CORELAY_AUTH_SECRET", hide_env_values = true)]
    auth_secret: Option<String>,
    /// Read (or create) the secret in this data dir when no secret is given [default: ./data].
    #[arg(long, env = "CORELAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(t)) => token(t),
        Some(Command::Route(r)) => {
            let ring = corelay::cluster::ring::Ring::new(r.nodes, r.vnodes);
            for u in r.users {
                println!("{u} {}", ring.node_for(&u).unwrap_or("-"));
            }
            Ok(())
        }
        Some(Command::Run(r)) => run(*r),
        None => run(cli.run),
    }
}

/// A panic anywhere (an event loop, the backplane, the store thread) ends the process at once with status
/// 70, after the panic is logged: a gateway with one dead loop would keep accepting on the others while the
/// dead loop's users still look present, so their messages would never reach the offline queue. A supervisor
/// restarts the process; clients reconnect and resume from their cursors.
fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        tracing::error!(panic = %info, "a thread panicked; exiting so that a supervisor restarts the node");
        std::process::exit(70);
    }));
}

fn token(t: TokenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        auth::valid_id(&t.user),
        "--user must be 1..=128 chars of [A-Za-z0-9_.@-]"
    );
    let ttl = config::parse_duration("ttl", &t.ttl)?;
    let dir = t
        .data_dir
        .unwrap_or_else(|| config::DEFAULT_DATA_DIR.into());
    let (secret, _) = auth::resolve_secret(t.auth_secret.as_deref(), &dir, auth::SECRET_FILE)?;
    println!("{}", auth::mint(&secret, &t.user, ttl)?);
    Ok(())
}

fn build_config(r: RunArgs) -> anyhow::Result<Config> {
    let mut cfg = Config::default();
    if let Some(path) = &r.config {
        FileConfig::load(path)?.apply(&mut cfg)?;
    }
    if let Some(v) = r.listen {
        cfg.listen = config::parse_addr("listen", &v)?;
    }
    if let Some(v) = r.admin_listen {
        cfg.admin_listen = Some(config::parse_addr("admin_listen", &v)?);
    }
    if let Some(v) = r.threads {
        cfg.threads = v;
    }
    if let Some(v) = r.pin {
        cfg.pin = v
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--pin: {e}"))?;
    }
    if r.no_pin {
        cfg.pin = corelay::worker::pinning::Pin::Off;
    }
    if let Some(v) = r.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = r.node_id {
        cfg.node_id = v;
    }
    if r.auth_secret.is_some() {
        cfg.auth_secret = r.auth_secret;
    }
    if r.api_key.is_some() {
        cfg.api_key = r.api_key;
    }
    for (key, value, slot) in [
        (
            "heartbeat_interval",
            r.heartbeat_interval,
            &mut cfg.heartbeat_interval,
        ),
        (
            "heartbeat_timeout",
            r.heartbeat_timeout,
            &mut cfg.heartbeat_timeout,
        ),
        (
            "handshake_timeout",
            r.handshake_timeout,
            &mut cfg.handshake_timeout,
        ),
        (
            "keepalive_timeout",
            r.keepalive_timeout,
            &mut cfg.keepalive_timeout,
        ),
        ("drain_timeout", r.drain_timeout, &mut cfg.drain_timeout),
        (
            "topic_history_age",
            r.topic_history_age,
            &mut cfg.topic_history_age,
        ),
        ("sse_retry", r.sse_retry, &mut cfg.sse_retry),
        (
            "max_poll_timeout",
            r.max_poll_timeout,
            &mut cfg.max_poll_timeout,
        ),
    ] {
        if let Some(v) = value {
            *slot = config::parse_duration(key, &v)?;
        }
    }
    if r.echo_path.is_some() {
        cfg.echo_path = r.echo_path;
    }
    if let Some(v) = r.fsync {
        cfg.fsync_interval = config::parse_fsync(&v)?;
    }
    if let Some(v) = r.max_pending_writes {
        cfg.max_pending_writes = v;
    }
    if r.redis.is_some() {
        cfg.redis = r.redis;
    }
    if r.proxy_protocol {
        cfg.proxy_protocol = true;
    }
    if !r.ring_nodes.is_empty() {
        cfg.ring_nodes = r.ring_nodes;
    }
    if let Some(v) = r.presence_ttl {
        cfg.presence_ttl = config::parse_duration("presence_ttl", &v)?;
    }
    r.push.apply(&mut cfg.push)?;
    if !r.scylla.is_empty() {
        cfg.scylla = r.scylla;
    }
    if let Some(v) = r.scylla_keyspace {
        cfg.scylla_keyspace = v;
    }
    if r.scylla_replication.is_some() {
        cfg.scylla_replication = r.scylla_replication;
    }
    if let Some(v) = r.topic_history {
        cfg.topic_history = v;
    }
    for (key, value, slot) in [
        (
            "topic_history_bytes",
            r.topic_history_bytes,
            &mut cfg.topic_history_bytes,
        ),
        (
            "conversation_window_bytes",
            r.conversation_window_bytes,
            &mut cfg.conversation_window_bytes,
        ),
        (
            "store_cache_bytes",
            r.store_cache_bytes,
            &mut cfg.store_cache_bytes,
        ),
    ] {
        if let Some(v) = value {
            *slot = config::parse_size(key, &v)? as usize;
        }
    }
    if !r.allowed_origins.is_empty() {
        cfg.allowed_origins = r.allowed_origins;
    }
    let l = &mut cfg.limits;
    for (key, value, slot) in [
        (
            "max_header_bytes",
            r.max_header_bytes,
            &mut l.max_header_bytes,
        ),
        ("max_body_bytes", r.max_body_bytes, &mut l.max_body_bytes),
        (
            "max_message_bytes",
            r.max_message_bytes,
            &mut l.max_message_bytes,
        ),
        (
            "max_write_queue_bytes",
            r.max_write_queue_bytes,
            &mut l.max_write_queue_bytes,
        ),
    ] {
        if let Some(v) = value {
            *slot = config::parse_size(key, &v)? as usize;
        }
    }
    if let Some(v) = r.max_frame_bytes {
        l.max_frame_bytes = config::parse_size("max_frame_bytes", &v)?;
    }
    if let Some(v) = r.max_headers {
        l.max_headers = v;
    }
    if let Some(v) = r.max_connections_per_loop {
        l.max_connections_per_loop = v;
    }
    if let Some(v) = r.backplane_queue {
        l.backplane_queue = v;
    }
    if let Some(v) = r.client_rate {
        l.client_rate = v;
    }
    if let Some(v) = r.client_burst {
        l.client_burst = v;
    }
    if let Some(v) = r.max_channels_per_request {
        l.max_channels_per_request = v;
    }
    if let Some(v) = r.max_follows_per_connection {
        l.max_follows_per_connection = v;
    }
    if let Some(v) = r.max_connections_per_user {
        l.max_connections_per_user = v;
    }
    if let Some(v) = r.max_connections_per_ip {
        l.max_connections_per_ip = v;
    }
    if let Some(v) = r.user_rate {
        l.user_rate = v;
    }
    if let Some(v) = r.user_burst {
        l.user_burst = v;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn run(r: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CORELAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let processes = r.processes.unwrap_or(1);
    let mut cfg = build_config(r)?;
    let (secret, src) =
        auth::resolve_secret(cfg.auth_secret.as_deref(), &cfg.data_dir, auth::SECRET_FILE)
            .context("resolving the auth secret")?;
    match src {
        SecretSource::Given => {}
        SecretSource::Loaded(p) | SecretSource::Generated(p) => tracing::info!(
            path = %p.display(),
            "auth secret from the data dir; mint a client token with: corelay token --user alice --data-dir {}",
            cfg.data_dir.display()
        ),
    }
    cfg.auth_secret = Some(secret);
    let (key, src) =
        auth::resolve_secret(cfg.api_key.as_deref(), &cfg.data_dir, auth::API_KEY_FILE)
            .context("resolving the API key")?;
    if let SecretSource::Loaded(p) | SecretSource::Generated(p) = src {
        tracing::info!(path = %p.display(), "API key for /api/* (Authorization: Bearer KEY) is in this file");
    }
    cfg.api_key = Some(key.clone());

    if processes > 1 {
        anyhow::ensure!(
            cfg.redis.is_some(),
            "--processes needs --redis: the processes are cluster nodes sharing state through it"
        );
        anyhow::ensure!(
            cfg.listen.port() != 0,
            "--processes needs a fixed --listen port (the processes share it)"
        );
        anyhow::ensure!(
            cfg.admin_listen.is_none(),
            "--processes and --admin-listen do not go together (each process would need its own admin port)"
        );
        let secret = cfg.auth_secret.clone().unwrap_or_default();
        let node_id = if cfg.node_id.is_empty() {
            format!("{}-{}", config::host_name(), cfg.listen.port())
        } else {
            cfg.node_id.clone()
        };
        return supervise::run(
            processes,
            &node_id,
            &cfg.data_dir,
            &secret,
            &key,
            cfg.drain_timeout,
        );
    }

    exit_on_panic();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let threads = cfg.threads;
    let server = Server::start(cfg)?;
    // The line tests and scripts wait for; stdout, flushed.
    println!(
        "corelay listening on {} ({threads} loops)",
        server.local_addr
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "draining");
        server.shutdown();
    }
    // A second signal during the drain exits at once.
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            std::process::exit(1);
        }
    });
    let started = std::time::Instant::now();
    server.join();
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "stopped");
    Ok(())
}
