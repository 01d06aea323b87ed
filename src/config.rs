//! Configuration: a TOML file, environment variables and flags (one [`Options`] struct for all three), merged
//! into one validated [`Config`]. Precedence: flag > environment > file > default. Every limit has a `DEFAULT_*`
//! constant here.
//!
//! Longer than 600 lines on purpose: it is the one table of settings (about 60, each a documented field of
//! `Options` and of `Config` with its default and its check), which would be harder to read split in parts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "data";
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Long-lived connections a draining node closes per second (all loops together): its clients reconnect
/// to the other nodes at this rate, not all at once.
pub const DEFAULT_DRAIN_RATE: u32 = 1_000;
/// New connections accepted per second (all loops together) before the rest wait in the kernel's backlog.
pub const DEFAULT_ACCEPT_RATE: u32 = 20_000;
/// How long new connections may wait for their turn before they are refused (503 + `Retry-After`).
pub const DEFAULT_ACCEPT_QUEUE: Duration = Duration::from_secs(1);
/// How long a Redis store commit waits for `--redis-min-replicas` replicas before it is refused.
pub const DEFAULT_REDIS_REPLICA_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a drain spreads its closes over, whatever the rate.
pub const DEFAULT_DRAIN_WINDOW: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 64;
pub use corelay_proto::http1::MAX_HEADERS_CEILING;
// The router's bounds (backplane::router reads them from here).
pub const DEFAULT_MAX_CHANNELS_PER_REQUEST: usize = 100;
pub const DEFAULT_MAX_FOLLOWS: usize = 1000;
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 64;
pub const DEFAULT_TOPIC_HISTORY_BYTES: usize = 4 << 20;
pub const DEFAULT_CONVERSATION_WINDOW_BYTES: usize = 64 << 10;
/// Default cap on store requests in flight.
pub const DEFAULT_MAX_PENDING: usize = 10_000;
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 64 * 1024;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_WRITE_QUEUE_BYTES: usize = 1024 * 1024;
pub const DEFAULT_MAX_CONNECTIONS_PER_LOOP: usize = 250_000;
pub const DEFAULT_BACKPLANE_QUEUE: usize = 65_536;
pub const DEFAULT_CLIENT_RATE: u32 = 100;
pub const DEFAULT_STORE_CACHE_BYTES: usize = 64 << 20;
/// Above the 15,000 connections one load-generator process opens from one address in the benchmarks.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 20_000;
pub const DEFAULT_CLIENT_BURST: u32 = 200;
pub const DEFAULT_TOPIC_HISTORY: usize = 1000;
pub const DEFAULT_TOPIC_HISTORY_AGE: Duration = Duration::from_secs(3600);
pub const DEFAULT_SSE_RETRY: Duration = Duration::from_secs(2);
pub const DEFAULT_MAX_POLL_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_POLL_TIMEOUT: Duration = Duration::from_secs(25);
/// Messages shorter than this are sent plain on a permessage-deflate connection (a fresh DEFLATE window per
/// message gains little on a short one, and costs CPU).
pub const DEFAULT_WS_DEFLATE_MIN_BYTES: usize = 128;
/// The largest `ws_deflate_min_bytes` accepted (anything bigger is a typo; `--ws-deflate off` turns it off).
pub const MAX_WS_DEFLATE_MIN_BYTES: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Limits that protect the gateway from peers. All configurable, all with safe defaults.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes of an HTTP request head (request line + headers); past it: 431.
    pub max_header_bytes: usize,
    /// Number of headers in a request; past it: 431.
    pub max_headers: usize,
    /// Bytes of an HTTP request body (`POST /api/*`, `POST /send`); past it: 413. Also the largest chat body.
    pub max_body_bytes: usize,
    /// Largest WebSocket frame payload a client may send; past it: close 1009.
    pub max_frame_bytes: u64,
    /// Largest reassembled WebSocket message; past it: close 1009.
    pub max_message_bytes: usize,
    /// Bytes queued for one connection that the peer has not read yet; past it the connection is cut
    /// (WebSocket 1013) and the client resumes from its cursor.
    pub max_write_queue_bytes: usize,
    /// Connections one loop holds; when full it stops accepting until one closes.
    pub max_connections_per_loop: usize,
    /// Events queued from the loops to the backplane; when full a client request is answered `overloaded`.
    pub backplane_queue: usize,
    /// Requests per second one WebSocket client may send on average (`rate_limited` past it)…
    pub client_rate: u32,
    /// …and at once. A client past its rate is not refused: its input is not read until it is back under.
    pub client_burst: u32,
    /// Channels in one `subscribe`, SSE stream or poll (duplicates dropped first); past it: `too_many_channels`.
    pub max_channels_per_request: usize,
    /// Topics one connection follows at once; past it: `too_many_channels`.
    pub max_follows_per_connection: usize,
    /// Live WebSocket and SSE connections of one user on this node; past it the new one is refused
    /// (WebSocket close 1008, SSE 429).
    pub max_connections_per_user: usize,
    /// Connections from one source address (0 = no cap; not applied behind the PROXY protocol); past it the
    /// connection is closed at accept.
    pub max_connections_per_ip: usize,
    /// HTTP requests (`POST /send`, polls, new SSE streams) per second of one user on one node, on average…
    pub user_rate: u32,
    /// …and at once; past it: 429 with `retry_after_ms`.
    pub user_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_write_queue_bytes: DEFAULT_MAX_WRITE_QUEUE_BYTES,
            max_connections_per_loop: DEFAULT_MAX_CONNECTIONS_PER_LOOP,
            backplane_queue: DEFAULT_BACKPLANE_QUEUE,
            client_rate: DEFAULT_CLIENT_RATE,
            client_burst: DEFAULT_CLIENT_BURST,
            max_channels_per_request: DEFAULT_MAX_CHANNELS_PER_REQUEST,
            max_follows_per_connection: DEFAULT_MAX_FOLLOWS,
            max_connections_per_user: DEFAULT_MAX_CONNECTIONS_PER_USER,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            user_rate: DEFAULT_CLIENT_RATE,
            user_burst: DEFAULT_CLIENT_BURST,
        }
    }
}

/// The validated, typed configuration the gateway runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// A second, internal listener for `/api/*` and `/metrics` (edge deployments). When set, the public
    /// listener answers those paths 404 and the admin listener serves nothing else (but `/healthz`, `/readyz`).
    pub admin_listen: Option<SocketAddr>,
    /// A TLS listener (`wss://`, `https://`) beside the plain one, with its PEM certificate chain and key.
    pub tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The demo chat at `/demo/`, with its token endpoint (anyone may become anyone: never in production).
    pub demo: bool,
    pub threads: usize,
    pub data_dir: PathBuf,
    /// Empty = host name + port, decided when the listener is bound.
    pub node_id: String,
    /// HS256 secret for client tokens. Resolved (possibly generated) by [`crate::auth::resolve_secret`].
    pub auth_secret: Option<String>,
    pub api_key: Option<String>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub handshake_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub drain_timeout: Duration,
    /// A drain closes long-lived connections (WebSocket, SSE, held polls) at this rate per second, spread
    /// over at most `drain_window`; then it waits up to `drain_timeout` for the last close handshakes.
    pub drain_rate: u32,
    pub drain_window: Duration,
    /// Accept-side protection: new connections per second (all loops together); a burst of one second's
    /// worth is taken at once. Beyond it connections wait in the kernel backlog; once they have waited
    /// `accept_queue`, the waiting ones are accepted and refused: `503` with `Retry-After` (on the TLS
    /// listener, closed before the handshake: its cost is what the limit protects).
    pub accept_rate: u32,
    pub accept_queue: Duration,
    /// WebSocket echo endpoint (no auth, no chat protocol) for conformance runs and load generators.
    pub echo_path: Option<String>,
    /// Negotiate permessage-deflate (RFC 7692) with WebSocket clients that offer it (no context takeover:
    /// per-loop codecs, nothing per connection).
    pub ws_deflate: bool,
    /// `--ws-deflate takeover`: the server also keeps a compression context per connection (server context
    /// takeover, unless the client refuses it): smaller messages for a compressor per connection (memory in
    /// docs/BENCHMARKS.md) and a compression per delivery instead of one per publish.
    pub ws_deflate_takeover: bool,
    /// Messages shorter than this go out uncompressed on a deflate connection.
    pub ws_deflate_min_bytes: usize,
    /// Messages kept per topic and `user:` channel for resume (SSE, polls, subscribe with a cursor).
    pub topic_history: usize,
    /// Bytes of history kept in memory per topic / `user:` channel.
    pub topic_history_bytes: usize,
    /// Bytes of recent messages kept in memory per conversation (the store has them all).
    pub conversation_window_bytes: usize,
    /// The embedded store's page cache (redb's default is 1 GiB).
    pub store_cache_bytes: usize,
    /// Topic messages older than this are dropped from history.
    pub topic_history_age: Duration,
    /// The `retry:` an SSE stream announces (how soon `EventSource` reconnects).
    pub sse_retry: Duration,
    /// Longest hold a long poll may ask for (`timeout=`); longer asks are clamped.
    pub max_poll_timeout: Duration,
    /// Embedded store durability: `None` = fsync every group commit before `sent` (the default);
    /// `Some(d)` = fsync at most every `d` (faster; a crash can lose up to `d` of acknowledged messages).
    pub fsync_interval: Option<Duration>,
    /// Store requests in flight before sends are refused with a retryable `store_busy`.
    pub max_pending_writes: usize,
    /// Every connection starts with a PROXY protocol v1 or v2 header (behind an L4 balancer that sends one).
    pub proxy_protocol: bool,
    /// Node ids of the consistent-hash ring that `/api/route` and `corelay route` answer from.
    pub ring_nodes: Vec<String>,
    /// Redis URL: cluster mode (shared state, pub/sub bus, presence). Without `--scylla` the message log lives
    /// in Redis too.
    pub redis: Option<String>,
    /// Redis store: a write is acknowledged (`sent`, a receipt, a publish's 2xx) only once this many replicas
    /// have it (`WAIT`); 0 = once the master has it (asynchronous replication: a failover can lose it).
    pub redis_min_replicas: u32,
    /// How long a commit waits for those replicas; past it the commit is refused as retryable.
    pub redis_replica_timeout: Duration,
    /// The node's liveness lease in Redis: refreshed every third of it; when a node dies, its users stop
    /// counting as present (and a restart with its id may take the id over) this long after the last refresh.
    pub presence_ttl: Duration,
    /// Scylla contact points; when set, messages and chat state live in Scylla instead of the embedded store.
    pub scylla: Vec<String>,
    pub scylla_keyspace: String,
    /// The replication map for `CREATE KEYSPACE` (only used when the keyspace does not exist yet).
    pub scylla_replication: Option<String>,
    /// Browser `Origin`s allowed to open client endpoints; empty = any (non-browser clients send none).
    pub allowed_origins: Vec<String>,
    /// Pin each loop to a core: `auto` (the default) pins only when every loop gets a core of its own and no
    /// CPU quota applies (see `worker::pinning`).
    pub pin: Pin,
    pub limits: Limits,
    pub push: PushConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            admin_listen: None,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            demo: false,
            threads: default_threads(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            node_id: default_node_id(),
            auth_secret: None,
            api_key: None,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            drain_rate: DEFAULT_DRAIN_RATE,
            accept_rate: DEFAULT_ACCEPT_RATE,
            accept_queue: DEFAULT_ACCEPT_QUEUE,
            drain_window: DEFAULT_DRAIN_WINDOW,
            echo_path: None,
            ws_deflate: true,
            ws_deflate_takeover: false,
            ws_deflate_min_bytes: DEFAULT_WS_DEFLATE_MIN_BYTES,
            topic_history: DEFAULT_TOPIC_HISTORY,
            topic_history_bytes: DEFAULT_TOPIC_HISTORY_BYTES,
            conversation_window_bytes: DEFAULT_CONVERSATION_WINDOW_BYTES,
            store_cache_bytes: DEFAULT_STORE_CACHE_BYTES,
            topic_history_age: DEFAULT_TOPIC_HISTORY_AGE,
            sse_retry: DEFAULT_SSE_RETRY,
            max_poll_timeout: DEFAULT_MAX_POLL_TIMEOUT,
            allowed_origins: Vec::new(),
            fsync_interval: None,
            max_pending_writes: DEFAULT_MAX_PENDING,
            proxy_protocol: false,
            ring_nodes: Vec::new(),
            redis: None,
            redis_min_replicas: 0,
            redis_replica_timeout: DEFAULT_REDIS_REPLICA_TIMEOUT,
            presence_ttl: Duration::from_secs(10),
            scylla: Vec::new(),
            scylla_keyspace: "corelay".into(),
            scylla_replication: None,
            pin: Pin::Auto,
            limits: Limits::default(),
            push: PushConfig::default(),
        }
    }
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The node id when none is configured: empty here, and host name + listening port once the listener is
/// bound (`Server::start`), so that several nodes on one host never share an id by default.
fn default_node_id() -> String {
    String::new()
}

/// This machine's host name (`node1` when it cannot be read).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node1".to_string())
}

/// Whether the event loops are pinned to cores (`--pin`); `worker::pinning` decides what `Auto` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    Auto,
    On,
    Off,
}

impl std::str::FromStr for Pin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Pin::Auto),
            "on" => Ok(Pin::On),
            "off" => Ok(Pin::Off),
            other => Err(format!("pin must be auto, on or off (got {other:?})")),
        }
    }
}

/// Every setting, as flags (with their environment variables) and as keys of the TOML file: one struct, one
/// merge ([`Options::apply`]), so a key means the same in both places. File keys are the flag names with `_`
/// for `-` (`allowed_origins` is the file's name for the repeatable `--allowed-origin`); durations and sizes
/// are strings (`"30s"`, `"64KiB"`). `build_config` applies the file, then the flags: precedence is
/// flag > environment > file > default (clap reads a flag's environment variable when the flag is absent).
#[derive(Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<String>,
    /// Serve `/api/*` and `/metrics` only on this internal address (and refuse them on --listen).
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// Serve the demo chat at /demo/ and let it mint tokens for any user (development only).
    #[arg(long)]
    #[serde(default)]
    pub demo: bool,
    /// Also listen for TLS (`wss://`, `https://`) on this address; needs --tls-cert and --tls-key.
    #[arg(long)]
    pub tls_listen: Option<String>,
    /// PEM certificate chain for --tls-listen (leaf first). Reloaded on SIGHUP.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1) for --tls-cert. Reloaded on SIGHUP.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Event loops (one per core by default).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Do not pin loops to cores.
    #[arg(long)]
    #[serde(skip)]
    pub no_pin: bool,
    /// Pin loops to cores: auto (only when each loop gets a core and no CPU quota applies), on, off [default: auto].
    #[arg(long)]
    pub pin: Option<String>,
    /// Deprecated file spelling of `pin`: `true` = `"on"`, `false` = `"off"`.
    #[arg(skip)]
    pub pin_threads: Option<bool>,
    /// Where the embedded store and generated secrets live [default: ./data].
    #[arg(long, env = "CORELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node id, unique in the cluster [default: host name + '-' + listening port].
    #[arg(long, env = "CORELAY_NODE_ID")]
    pub node_id: Option<String>,
    /// HS256 secret for client tokens (generated into the data dir when absent).
    #[arg(long, env = "CORELAY_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// Key for the internal `/api/*` calls (`Authorization: Bearer KEY`; generated when absent).
    #[arg(long, env = "CORELAY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Ping after this much silence [default: 30s].
    #[arg(long)]
    pub heartbeat_interval: Option<String>,
    /// Close when no pong (or any frame) arrives this long after a ping [default: 10s].
    #[arg(long)]
    pub heartbeat_timeout: Option<String>,
    /// Time to receive a request head (slowloris guard) [default: 10s].
    #[arg(long)]
    pub handshake_timeout: Option<String>,
    /// Idle keep-alive HTTP connections are closed after this [default: 60s].
    #[arg(long)]
    pub keepalive_timeout: Option<String>,
    /// How long a drain waits for clients to close, after its spread [default: 5s].
    #[arg(long)]
    pub drain_timeout: Option<String>,
    /// Long-lived connections closed per second by a drain, all loops together, so that clients reconnect
    /// elsewhere gradually [default: 1000].
    #[arg(long)]
    pub drain_rate: Option<u32>,
    /// The longest a drain spreads its closes over, whatever the rate [default: 30s].
    #[arg(long)]
    pub drain_window: Option<String>,
    /// New connections accepted per second, all loops together; the rest wait in the backlog
    /// [default: 20000].
    #[arg(long)]
    pub accept_rate: Option<u32>,
    /// How long new connections wait beyond --accept-rate before they are refused with 503 + Retry-After
    /// [default: 1s].
    #[arg(long)]
    pub accept_queue: Option<String>,
    /// Serve a WebSocket echo endpoint at this path (off by default).
    #[arg(long)]
    pub echo_path: Option<String>,
    /// permessage-deflate for WebSocket clients that offer it: on, off, or takeover (on, and the server keeps a
    /// compression context per connection: smaller messages, far more memory) [default: on].
    #[arg(long)]
    pub ws_deflate: Option<String>,
    /// Smallest WebSocket message sent compressed on a deflate connection [default: 128].
    #[arg(long)]
    pub ws_deflate_min_bytes: Option<String>,
    /// Messages kept per topic / user channel for resume [default: 1000].
    #[arg(long)]
    pub topic_history: Option<usize>,
    /// Bytes of history kept in memory per topic [default: 4MiB].
    #[arg(long)]
    pub topic_history_bytes: Option<String>,
    /// Bytes of recent messages kept in memory per conversation [default: 64KiB].
    #[arg(long)]
    pub conversation_window_bytes: Option<String>,
    /// The embedded store's page cache [default: 64MiB].
    #[arg(long)]
    pub store_cache_bytes: Option<String>,
    /// Age limit of topic history [default: 1h].
    #[arg(long)]
    pub topic_history_age: Option<String>,
    /// The `retry:` SSE streams announce [default: 2s].
    #[arg(long)]
    pub sse_retry: Option<String>,
    /// Longest long-poll hold a client may ask for [default: 60s].
    #[arg(long)]
    pub max_poll_timeout: Option<String>,
    /// Store durability: `always` (fsync each group commit before acking) or an interval like `10ms`.
    #[arg(long)]
    pub fsync: Option<String>,
    /// Store requests in flight before sends get a retryable `store_busy` [default: 10000].
    #[arg(long)]
    pub max_pending_writes: Option<usize>,
    /// Expect a PROXY protocol (v1 or v2) header on every connection (behind HAProxy `send-proxy-v2`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub proxy_protocol: Option<bool>,
    /// Node ids of the consistent-hash ring for `/api/route` (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub ring_nodes: Option<Vec<String>>,
    /// Redis URL (redis://host:6379): cluster mode. Shared state, pub/sub between nodes, presence.
    #[arg(long, env = "CORELAY_REDIS")]
    pub redis: Option<String>,
    /// Acknowledge a write only once this many Redis replicas have it (WAIT); 0 = once the master has it
    /// [default: 0].
    #[arg(long)]
    pub redis_min_replicas: Option<u32>,
    /// How long a write waits for --redis-min-replicas replicas before it is refused (retryable) [default: 1s].
    #[arg(long)]
    pub redis_replica_timeout: Option<String>,
    /// How long a dead node's users still count as present (the node's lease in Redis) [default: 10s].
    #[arg(long)]
    pub presence_ttl: Option<String>,
    /// Scylla contact points (host:9042, comma-separated or repeated); stores messages in Scylla.
    #[arg(long, value_delimiter = ',', env = "CORELAY_SCYLLA")]
    pub scylla: Option<Vec<String>>,
    /// Scylla keyspace [default: corelay].
    #[arg(long)]
    pub scylla_keyspace: Option<String>,
    /// Replication map used when creating the keyspace, e.g. "{'class': 'SimpleStrategy', 'replication_factor': 1}".
    #[arg(long)]
    pub scylla_replication: Option<String>,
    #[command(flatten)]
    #[serde(default)]
    pub push: PushOptions,
    /// Allowed browser Origin (repeatable; none = any).
    #[arg(long = "allowed-origin")]
    pub allowed_origins: Option<Vec<String>>,
    /// Request head limit [default: 8KiB].
    #[arg(long)]
    pub max_header_bytes: Option<String>,
    /// Request header count limit [default: 64].
    #[arg(long)]
    pub max_headers: Option<usize>,
    /// Request body and chat message body limit [default: 64KiB].
    #[arg(long)]
    pub max_body_bytes: Option<String>,
    /// WebSocket frame payload limit [default: 64KiB].
    #[arg(long)]
    pub max_frame_bytes: Option<String>,
    /// WebSocket message limit [default: 64KiB].
    #[arg(long)]
    pub max_message_bytes: Option<String>,
    /// Unsent bytes per connection before it is cut as a slow consumer [default: 1MiB].
    #[arg(long)]
    pub max_write_queue_bytes: Option<String>,
    /// Connections per loop [default: 250000].
    #[arg(long)]
    pub max_connections_per_loop: Option<usize>,
    /// Events queued to the backplane [default: 65536].
    #[arg(long)]
    pub backplane_queue: Option<usize>,
    /// Requests per second one WebSocket client may send on average [default: 100].
    #[arg(long)]
    pub client_rate: Option<u32>,
    /// Requests one WebSocket client may send at once; past the rate its input waits (TCP backpressure) [default: 200].
    #[arg(long)]
    pub client_burst: Option<u32>,
    /// Channels in one subscribe, SSE stream or poll [default: 100].
    #[arg(long)]
    pub max_channels_per_request: Option<usize>,
    /// Topics one connection follows at once [default: 1000].
    #[arg(long)]
    pub max_follows_per_connection: Option<usize>,
    /// Live WebSocket + SSE connections of one user on this node [default: 64].
    #[arg(long)]
    pub max_connections_per_user: Option<usize>,
    /// Connections from one source address, 0 = no cap [default: 20000].
    #[arg(long)]
    pub max_connections_per_ip: Option<usize>,
    /// HTTP requests (POST /send, polls, new SSE streams) per second of one user per node [default: 100].
    #[arg(long)]
    pub user_rate: Option<u32>,
    /// …and at once; past it 429 [default: 200].
    #[arg(long)]
    pub user_burst: Option<u32>,
}

impl Options {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Applies the settings that are present over `cfg` (a later layer overrides an earlier one).
    pub fn apply(self, cfg: &mut Config) -> Result<(), ConfigError> {
        if let Some(v) = self.listen {
            cfg.listen = parse_addr("listen", &v)?;
        }
        if let Some(v) = self.admin_listen {
            cfg.admin_listen = Some(parse_addr("admin_listen", &v)?);
        }
        if let Some(v) = self.tls_listen {
            cfg.tls_listen = Some(parse_addr("tls_listen", &v)?);
        }
        if self.tls_cert.is_some() {
            cfg.tls_cert = self.tls_cert;
        }
        cfg.demo |= self.demo;
        if self.tls_key.is_some() {
            cfg.tls_key = self.tls_key;
        }
        set(&mut cfg.threads, self.threads);
        set(&mut cfg.drain_rate, self.drain_rate);
        set(&mut cfg.accept_rate, self.accept_rate);
        set(&mut cfg.data_dir, self.data_dir);
        set(&mut cfg.node_id, self.node_id);
        if self.auth_secret.is_some() {
            cfg.auth_secret = self.auth_secret;
        }
        if self.api_key.is_some() {
            cfg.api_key = self.api_key;
        }
        let durations = [
            (
                "heartbeat_interval",
                self.heartbeat_interval,
                &mut cfg.heartbeat_interval,
            ),
            (
                "heartbeat_timeout",
                self.heartbeat_timeout,
                &mut cfg.heartbeat_timeout,
            ),
            (
                "handshake_timeout",
                self.handshake_timeout,
                &mut cfg.handshake_timeout,
            ),
            (
                "keepalive_timeout",
                self.keepalive_timeout,
                &mut cfg.keepalive_timeout,
            ),
            ("drain_timeout", self.drain_timeout, &mut cfg.drain_timeout),
            ("drain_window", self.drain_window, &mut cfg.drain_window),
            ("accept_queue", self.accept_queue, &mut cfg.accept_queue),
            (
                "topic_history_age",
                self.topic_history_age,
                &mut cfg.topic_history_age,
            ),
            ("sse_retry", self.sse_retry, &mut cfg.sse_retry),
            (
                "redis_replica_timeout",
                self.redis_replica_timeout,
                &mut cfg.redis_replica_timeout,
            ),
            (
                "max_poll_timeout",
                self.max_poll_timeout,
                &mut cfg.max_poll_timeout,
            ),
        ];
        for (key, value, slot) in durations {
            if let Some(v) = value {
                *slot = parse_duration(key, &v)?;
            }
        }
        if self.echo_path.is_some() {
            cfg.echo_path = self.echo_path;
        }
        if let Some(v) = self.ws_deflate {
            (cfg.ws_deflate, cfg.ws_deflate_takeover) = match v.as_str() {
                "on" => (true, false),
                "off" => (false, false),
                "takeover" => (true, true),
                other => {
                    return Err(invalid(
                        "ws_deflate",
                        format!("must be on, off or takeover (got {other:?})"),
                    ));
                }
            };
        }
        set(&mut cfg.allowed_origins, self.allowed_origins);
        set(&mut cfg.topic_history, self.topic_history);
        for (key, value, slot) in [
            (
                "topic_history_bytes",
                self.topic_history_bytes,
                &mut cfg.topic_history_bytes,
            ),
            (
                "conversation_window_bytes",
                self.conversation_window_bytes,
                &mut cfg.conversation_window_bytes,
            ),
            (
                "store_cache_bytes",
                self.store_cache_bytes,
                &mut cfg.store_cache_bytes,
            ),
            (
                "ws_deflate_min_bytes",
                self.ws_deflate_min_bytes,
                &mut cfg.ws_deflate_min_bytes,
            ),
        ] {
            if let Some(v) = value {
                *slot = parse_size_usize(key, &v)?;
            }
        }
        set(&mut cfg.max_pending_writes, self.max_pending_writes);
        set(&mut cfg.scylla, self.scylla);
        if self.redis.is_some() {
            cfg.redis = self.redis;
        }
        set(&mut cfg.redis_min_replicas, self.redis_min_replicas);
        set(&mut cfg.proxy_protocol, self.proxy_protocol);
        set(&mut cfg.ring_nodes, self.ring_nodes);
        if let Some(v) = self.presence_ttl {
            cfg.presence_ttl = parse_duration("presence_ttl", &v)?;
            if cfg.presence_ttl < Duration::from_secs(1) {
                return Err(invalid(
                    "presence_ttl",
                    format!(
                        "{v:?} is too short: the node lease is refreshed every third of it (at least 1s)"
                    ),
                ));
            }
        }
        set(&mut cfg.scylla_keyspace, self.scylla_keyspace);
        if self.scylla_replication.is_some() {
            cfg.scylla_replication = self.scylla_replication;
        }
        if let Some(v) = self.fsync {
            cfg.fsync_interval = parse_fsync(&v)?;
        }
        self.push.apply(&mut cfg.push)?;
        if let Some(on) = self.pin_threads {
            cfg.pin = if on { Pin::On } else { Pin::Off };
        }
        if let Some(v) = self.pin {
            cfg.pin = v.parse().map_err(|e: String| invalid("pin", &e))?;
        }
        if self.no_pin {
            cfg.pin = Pin::Off;
        }
        let l = &mut cfg.limits;
        let sizes = [
            (
                "max_header_bytes",
                self.max_header_bytes,
                &mut l.max_header_bytes,
            ),
            ("max_body_bytes", self.max_body_bytes, &mut l.max_body_bytes),
            (
                "max_message_bytes",
                self.max_message_bytes,
                &mut l.max_message_bytes,
            ),
            (
                "max_write_queue_bytes",
                self.max_write_queue_bytes,
                &mut l.max_write_queue_bytes,
            ),
        ];
        for (key, value, slot) in sizes {
            if let Some(v) = value {
                *slot = parse_size_usize(key, &v)?;
            }
        }
        if let Some(v) = self.max_frame_bytes {
            l.max_frame_bytes = parse_size("max_frame_bytes", &v)?;
        }
        set(&mut l.max_headers, self.max_headers);
        set(
            &mut l.max_connections_per_loop,
            self.max_connections_per_loop,
        );
        set(&mut l.backplane_queue, self.backplane_queue);
        set(&mut l.client_rate, self.client_rate);
        set(&mut l.client_burst, self.client_burst);
        set(
            &mut l.max_channels_per_request,
            self.max_channels_per_request,
        );
        set(
            &mut l.max_follows_per_connection,
            self.max_follows_per_connection,
        );
        set(
            &mut l.max_connections_per_user,
            self.max_connections_per_user,
        );
        set(&mut l.user_rate, self.user_rate);
        set(&mut l.max_connections_per_ip, self.max_connections_per_ip);
        set(&mut l.user_burst, self.user_burst);
        Ok(())
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

impl Config {
    /// Checks the relations between settings; called once after all layers are merged.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.push.validate()?;
        if self.threads == 0 {
            return Err(invalid("threads", "must be at least 1"));
        }
        if self.demo && self.admin_listen.is_some() {
            return Err(invalid(
                "demo",
                "the demo creates its conversations through the public listener: drop admin_listen",
            ));
        }
        if self.accept_rate == 0 {
            return Err(invalid("accept_rate", "must be at least 1 per second"));
        }
        if self.drain_rate == 0 {
            return Err(invalid("drain_rate", "must be at least 1 per second"));
        }
        match (&self.tls_listen, &self.tls_cert, &self.tls_key) {
            (None, None, None) | (Some(_), Some(_), Some(_)) => {}
            (Some(_), _, _) => {
                return Err(invalid("tls_listen", "needs tls_cert and tls_key"));
            }
            (None, _, _) => {
                return Err(invalid("tls_cert", "tls_cert and tls_key need tls_listen"));
            }
        }
        if self.heartbeat_interval < Duration::from_millis(20) {
            return Err(invalid("heartbeat_interval", "must be at least 20ms"));
        }
        if self.heartbeat_timeout < Duration::from_millis(20) {
            return Err(invalid("heartbeat_timeout", "must be at least 20ms"));
        }
        let l = &self.limits;
        if l.max_headers == 0 || l.max_headers > MAX_HEADERS_CEILING {
            return Err(invalid(
                "max_headers",
                format!("must be in 1..={MAX_HEADERS_CEILING}"),
            ));
        }
        if l.max_header_bytes < 256 {
            return Err(invalid("max_header_bytes", "must be at least 256 bytes"));
        }
        if l.max_message_bytes == 0 || l.max_frame_bytes == 0 {
            return Err(invalid(
                "max_message_bytes",
                "frame and message limits must be > 0",
            ));
        }
        if l.max_write_queue_bytes < 4096 {
            return Err(invalid("max_write_queue_bytes", "must be at least 4KiB"));
        }
        if l.user_rate == 0 || l.user_burst == 0 {
            return Err(invalid("user_rate", "user_rate and user_burst must be > 0"));
        }
        if l.client_rate == 0 || l.client_burst == 0 {
            return Err(invalid(
                "client_rate",
                "client_rate and client_burst must be > 0",
            ));
        }
        if l.max_connections_per_loop == 0 || l.backplane_queue == 0 {
            return Err(invalid("max_connections_per_loop", "limits must be > 0"));
        }
        if !self
            .scylla_keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || self.scylla_keyspace.is_empty()
        {
            return Err(invalid("scylla_keyspace", "must be [A-Za-z0-9_]+"));
        }
        if self.ws_deflate_min_bytes > MAX_WS_DEFLATE_MIN_BYTES {
            return Err(invalid("ws_deflate_min_bytes", "must be at most 16MiB"));
        }
        if self.topic_history == 0 {
            return Err(invalid("topic_history", "must be at least 1"));
        }
        if self.redis_min_replicas > 0 {
            if self.redis.is_none() || !self.scylla.is_empty() {
                return Err(invalid(
                    "redis_min_replicas",
                    "applies to the Redis store: needs redis, and no scylla",
                ));
            }
            // `WAIT n 0` blocks until the replicas answer, however long.
            if self.redis_replica_timeout.is_zero() {
                return Err(invalid(
                    "redis_replica_timeout",
                    "must be more than 0 with redis_min_replicas (WAIT 0 would block forever)",
                ));
            }
        }
        if let Some(p) = &self.echo_path
            && (!p.starts_with('/') || p == "/ws")
        {
            return Err(invalid("echo_path", "must start with '/' and not be /ws"));
        }
        Ok(())
    }
}

/// `always` (fsync every commit) or a duration (fsync at most that often).
pub fn parse_fsync(s: &str) -> Result<Option<Duration>, ConfigError> {
    if s.eq_ignore_ascii_case("always") {
        Ok(None)
    } else {
        parse_duration("fsync", s).map(Some)
    }
}

pub fn parse_addr(key: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|e| {
        invalid(
            key,
            format!("{s:?} is not an address like 127.0.0.1:8080 ({e})"),
        )
    })
}

/// `30s`, `500ms`, `1h`, `2m 30s` (humantime).
/// A size that indexes memory: refused (not truncated) where `usize` is narrower than the value.
fn parse_size_usize(key: &'static str, s: &str) -> Result<usize, ConfigError> {
    usize::try_from(parse_size(key, s)?).map_err(|_| invalid(key, format!("{s:?} is too large")))
}

pub fn parse_duration(key: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| invalid(key, format!("{s:?}: {e}")))
}

/// `65536`, `64KiB`, `64K`, `16MiB`, `1GiB` (binary units; `KB`/`MB` mean the same, as operators expect).
pub fn parse_size(key: &'static str, s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| invalid(key, format!("{s:?} is not a size like 64KiB")))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(invalid(
                key,
                format!("unknown size unit {other:?} in {s:?}"),
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| invalid(key, format!("{s:?} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("k", "65536").unwrap(), 65536);
        assert_eq!(parse_size("k", "64KiB").unwrap(), 65536);
        assert_eq!(parse_size("k", "16M").unwrap(), 16 << 20);
        assert!(parse_size("k", "12 parsecs").is_err());
        assert!(parse_size("k", "").is_err());
        assert_eq!(
            parse_duration("d", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("d", "30s").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("d", "soon").is_err());
    }

    #[test]
    fn file_layer_applies_and_rejects_unknown_keys() {
        let f: Options = toml::from_str(
            "listen = \"127.0.0.1:9000\"\nheartbeat_interval = \"5s\"\nmax_frame_bytes = \"1MiB\"\n",
        )
        .unwrap();
        let mut cfg = Config::default();
        f.apply(&mut cfg).unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(cfg.limits.max_frame_bytes, 1 << 20);
        assert!(toml::from_str::<Options>("listne = \"x\"").is_err());
    }

    #[test]
    fn ws_deflate_settings() {
        let cfg = Config::default();
        assert!(cfg.ws_deflate);
        assert_eq!(cfg.ws_deflate_min_bytes, DEFAULT_WS_DEFLATE_MIN_BYTES);
        let mut cfg = Config::default();
        let f: Options =
            toml::from_str("ws_deflate = \"off\"\nws_deflate_min_bytes = \"1KiB\"\n").unwrap();
        f.apply(&mut cfg).unwrap();
        assert!(!cfg.ws_deflate);
        assert_eq!(cfg.ws_deflate_min_bytes, 1024);
        cfg.validate().unwrap();
        let f: Options = toml::from_str("ws_deflate = \"maybe\"").unwrap();
        assert!(f.apply(&mut Config::default()).is_err());
        let f: Options = toml::from_str("ws_deflate_min_bytes = \"17MiB\"").unwrap();
        let mut cfg = Config::default();
        f.apply(&mut cfg).unwrap();
        assert!(cfg.validate().is_err());
        let f: Options = toml::from_str("ws_deflate = \"takeover\"\n").unwrap();
        let mut cfg = Config::default();
        f.apply(&mut cfg).unwrap();
        assert!(cfg.ws_deflate && cfg.ws_deflate_takeover);
    }

    /// Flags and file keys go through one struct and one `apply`: the same settings given either way give the
    /// same `Config`, and a flag overrides the file.
    #[test]
    fn a_setting_means_the_same_as_a_flag_and_as_a_file_key() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            options: Options,
        }
        let file = r#"
            listen = "127.0.0.1:9001"
            heartbeat_interval = "7s"
            max_frame_bytes = "1MiB"
            max_body_bytes = "32KiB"
            proxy_protocol = true
            allowed_origins = ["https://a.example", "https://b.example"]
            ring_nodes = ["n0", "n1"]
            pin = "off"
            client_rate = 7
            [push]
            push_delay = "3s"
            push_include_body = true
        "#;
        let flags = [
            "corelay",
            "--listen=127.0.0.1:9001",
            "--heartbeat-interval=7s",
            "--max-frame-bytes=1MiB",
            "--max-body-bytes=32KiB",
            "--proxy-protocol",
            "--allowed-origin=https://a.example",
            "--allowed-origin=https://b.example",
            "--ring-nodes=n0,n1",
            "--no-pin",
            "--client-rate=7",
            "--push-delay=3s",
            "--push-include-body",
        ];
        let mut from_file = Config::default();
        toml::from_str::<Options>(file)
            .unwrap()
            .apply(&mut from_file)
            .unwrap();
        let mut from_flags = Config::default();
        Flags::try_parse_from(flags)
            .unwrap()
            .options
            .apply(&mut from_flags)
            .unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{from_flags:?}"));
        assert_ne!(format!("{from_file:?}"), format!("{:?}", Config::default()));
        assert!(from_file.proxy_protocol);
        assert_eq!(from_file.limits.max_body_bytes, 32 << 10);

        // A flag over the file wins; what the flags leave out keeps the file's value.
        let mut layered = from_file;
        Flags::try_parse_from(["corelay", "--heartbeat-interval=9s"])
            .unwrap()
            .options
            .apply(&mut layered)
            .unwrap();
        assert_eq!(layered.heartbeat_interval, Duration::from_secs(9));
        assert_eq!(layered.listen.port(), 9001);
    }

    #[test]
    fn redis_replica_settings_parse_and_are_checked() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            options: Options,
        }
        let cfg = Config::default();
        assert_eq!(cfg.redis_min_replicas, 0, "off by default");
        assert_eq!(cfg.redis_replica_timeout, Duration::from_secs(1));
        cfg.validate().unwrap();

        let mut from_file = Config::default();
        toml::from_str::<Options>(
            "redis = \"redis://r:6379\"\nredis_min_replicas = 1\nredis_replica_timeout = \"500ms\"\n",
        )
        .unwrap()
        .apply(&mut from_file)
        .unwrap();
        let mut from_flags = Config::default();
        Flags::try_parse_from([
            "corelay",
            "--redis=redis://r:6379",
            "--redis-min-replicas=1",
            "--redis-replica-timeout=500ms",
        ])
        .unwrap()
        .options
        .apply(&mut from_flags)
        .unwrap();
        for cfg in [&from_file, &from_flags] {
            assert_eq!(cfg.redis_min_replicas, 1);
            assert_eq!(cfg.redis_replica_timeout, Duration::from_millis(500));
            cfg.validate().unwrap();
        }

        let refused = |toml: &str| {
            let mut cfg = Config::default();
            toml::from_str::<Options>(toml)
                .unwrap()
                .apply(&mut cfg)
                .and_then(|()| cfg.validate())
                .unwrap_err()
                .to_string()
        };
        // WAIT with a timeout of 0 blocks forever.
        let e = refused(
            "redis = \"redis://r\"\nredis_min_replicas = 2\nredis_replica_timeout = \"0s\"\n",
        );
        assert!(e.starts_with("redis_replica_timeout:"), "{e}");
        // Without replicas to wait for, a zero timeout is never used.
        let cfg = Config {
            redis_replica_timeout: Duration::ZERO,
            ..Config::default()
        };
        cfg.validate().unwrap();
        // Only the Redis store waits for replicas.
        let e = refused("redis_min_replicas = 1\n");
        assert!(e.starts_with("redis_min_replicas:"), "{e}");
        let e = refused("redis = \"redis://r\"\nscylla = [\"s:9042\"]\nredis_min_replicas = 1\n");
        assert!(e.starts_with("redis_min_replicas:"), "{e}");
        assert!(
            refused("redis_replica_timeout = \"soon\"\n").starts_with("redis_replica_timeout:")
        );
        assert!(toml::from_str::<Options>("redis_min_replicas = -1\n").is_err());
    }

    #[test]
    fn validation_catches_nonsense() {
        let mut cfg = Config::default();
        assert!(cfg.validate().is_ok());
        cfg.limits.max_headers = 0;
        assert!(cfg.validate().is_err());
    }
}

/// Mobile push (APNs / FCM; see `docs/PUSH.md`). Off unless an APNs key or FCM credentials are given.
#[derive(Clone, Debug)]
pub struct PushConfig {
    /// An online member who has not acked a message within this delay is pushed anyway (escalation).
    pub delay: Duration,
    pub apns_key: Option<PathBuf>,
    pub apns_key_id: String,
    pub apns_team_id: String,
    pub apns_topic: String,
    pub apns_url: String,
    pub fcm_credentials: Option<PathBuf>,
    pub fcm_url: String,
    /// An extra trusted CA (PEM) for the provider connections (staging, tests).
    pub ca: Option<PathBuf>,
    /// Put the message body's text in the notification (default: only who wrote, in which conversation).
    pub include_body: bool,
    /// Requests in flight per provider.
    pub concurrency: usize,
    /// Claimed obligations held by the push thread (queued or in flight); the rest stay in the store.
    pub queue: usize,
    /// How long a claimed obligation is reserved for the node that claimed it (then any node retries it).
    pub lease: Duration,
    /// One provider request, connection included.
    pub timeout: Duration,
    /// `apns-expiration`: how long the provider keeps trying an offline device.
    pub ttl: Duration,
    /// Ceiling of the exponential backoff between retries of one obligation.
    pub max_backoff: Duration,
}

pub const DEFAULT_PUSH_DELAY: Duration = Duration::from_secs(10);
pub const DEFAULT_APNS_URL: &str = "https://api.push.apple.com";
pub const DEFAULT_FCM_URL: &str = "https://fcm.googleapis.com";

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            delay: DEFAULT_PUSH_DELAY,
            apns_key: None,
            apns_key_id: String::new(),
            apns_team_id: String::new(),
            apns_topic: String::new(),
            apns_url: DEFAULT_APNS_URL.into(),
            fcm_credentials: None,
            fcm_url: DEFAULT_FCM_URL.into(),
            ca: None,
            include_body: false,
            concurrency: 64,
            queue: 1024,
            lease: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(24 * 3600),
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl PushConfig {
    pub fn enabled(&self) -> bool {
        self.apns_key.is_some() || self.fcm_credentials.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.apns_key.is_some() {
            for (key, v) in [
                ("apns_key_id", &self.apns_key_id),
                ("apns_team_id", &self.apns_team_id),
                ("apns_topic", &self.apns_topic),
            ] {
                if v.is_empty() {
                    return Err(invalid(key, "required with apns_key"));
                }
            }
        }
        if self.concurrency == 0 || self.queue == 0 {
            return Err(invalid(
                "push_queue",
                "push_concurrency and push_queue must be at least 1",
            ));
        }
        if self.lease <= self.timeout {
            return Err(invalid(
                "push_lease",
                "must be longer than push_timeout (a claim must outlive its request)",
            ));
        }
        Ok(())
    }
}

/// The push settings as both flags and the `[push]` table of the config file: one struct, one merge
/// ([`PushOptions::apply`]), so a key means the same in both places. Keys are the flag names with `_`.
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PushOptions {
    /// Escalation delay: an online member who has not acked within it is pushed [default: 10s].
    #[arg(long)]
    pub push_delay: Option<String>,
    /// APNs provider key (.p8, PKCS#8 EC P-256): enables APNs.
    #[arg(long)]
    pub apns_key: Option<PathBuf>,
    /// APNs key id (the JWT `kid`).
    #[arg(long)]
    pub apns_key_id: Option<String>,
    /// Apple developer team id (the JWT `iss`).
    #[arg(long)]
    pub apns_team_id: Option<String>,
    /// The app's bundle id (`apns-topic`).
    #[arg(long)]
    pub apns_topic: Option<String>,
    /// APNs base URL [default: https://api.push.apple.com].
    #[arg(long)]
    pub apns_url: Option<String>,
    /// FCM service-account JSON: enables FCM (HTTP v1).
    #[arg(long)]
    pub fcm_credentials: Option<PathBuf>,
    /// FCM base URL [default: https://fcm.googleapis.com].
    #[arg(long)]
    pub fcm_url: Option<String>,
    /// Extra trusted CA (PEM) for provider connections.
    #[arg(long)]
    pub push_ca: Option<PathBuf>,
    /// Put the message text in notifications (default: sender and conversation only).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub push_include_body: Option<bool>,
    /// Provider requests in flight per provider [default: 64].
    #[arg(long)]
    pub push_concurrency: Option<usize>,
    /// Obligations held by the push thread at once [default: 1024].
    #[arg(long)]
    pub push_queue: Option<usize>,
    /// How long a claimed obligation is reserved for this node [default: 60s].
    #[arg(long)]
    pub push_lease: Option<String>,
    /// Timeout of one provider request [default: 10s].
    #[arg(long)]
    pub push_timeout: Option<String>,
    /// How long providers keep trying an offline device (`apns-expiration`) [default: 24h].
    #[arg(long)]
    pub push_ttl: Option<String>,
    /// Longest backoff between retries of one obligation [default: 5m].
    #[arg(long)]
    pub push_max_backoff: Option<String>,
}

impl PushOptions {
    /// Applies the settings that are present (a later layer overrides an earlier one).
    pub fn apply(self, p: &mut PushConfig) -> Result<(), ConfigError> {
        for (key, value, slot) in [
            ("push_delay", self.push_delay, &mut p.delay),
            ("push_lease", self.push_lease, &mut p.lease),
            ("push_timeout", self.push_timeout, &mut p.timeout),
            ("push_ttl", self.push_ttl, &mut p.ttl),
            (
                "push_max_backoff",
                self.push_max_backoff,
                &mut p.max_backoff,
            ),
        ] {
            if let Some(v) = value {
                *slot = parse_duration(key, &v)?;
            }
        }
        if self.apns_key.is_some() {
            p.apns_key = self.apns_key;
        }
        set(&mut p.apns_key_id, self.apns_key_id);
        set(&mut p.apns_team_id, self.apns_team_id);
        set(&mut p.apns_topic, self.apns_topic);
        set(&mut p.apns_url, self.apns_url);
        if self.fcm_credentials.is_some() {
            p.fcm_credentials = self.fcm_credentials;
        }
        set(&mut p.fcm_url, self.fcm_url);
        if self.push_ca.is_some() {
            p.ca = self.push_ca;
        }
        set(&mut p.include_body, self.push_include_body);
        set(&mut p.concurrency, self.push_concurrency);
        set(&mut p.queue, self.push_queue);
        Ok(())
    }
}
