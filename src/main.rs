//! The `corelay` binary: flags → `Config` → start the gateway → wait for a signal → drain → exit 0.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

use corelay::auth::{self, SecretSource};
use corelay::config::{self, Config, Options};
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
    /// Run N gateway processes sharing the listening port (SO_REUSEPORT), as cluster nodes over `--redis`,
    /// supervised by this one (restarted when they die). For hosts where one process's open-file limit
    /// caps the connections it can hold.
    #[arg(long)]
    processes: Option<usize>,
    #[command(flatten)]
    options: Options,
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
        Options::load(path)?.apply(&mut cfg)?;
    }
    r.options.apply(&mut cfg)?;
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
        signal_hook::consts::SIGHUP,
    ])?;
    let threads = cfg.threads;
    let demo = cfg.demo.then(|| cfg.api_key.clone()).flatten();
    let server = Server::start(cfg)?;
    if let Some(key) = demo {
        seed_demo(server.local_addr, &key)?;
        tracing::warn!(
            "--demo: the chat is at http://{}/demo/ and /demo/token mints tokens for anyone: development only",
            server.local_addr
        );
    }
    // The line tests and scripts wait for; stdout, flushed.
    println!(
        "corelay listening on {} ({threads} loops)",
        server.local_addr
    );
    if let Some(a) = server.tls_addr {
        println!("corelay tls listening on {a}");
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    for sig in signals.forever() {
        if sig == signal_hook::consts::SIGHUP {
            // Reload: the TLS certificate and key (the one thing read again without a restart).
            match server.reload_tls() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "SIGHUP: TLS reload failed; the previous certificate stays")
                }
            }
            continue;
        }
        tracing::info!(signal = sig, "draining");
        server.shutdown();
        break;
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

/// Creates the demo's conversations through the gateway's own internal API (as an operator would).
fn seed_demo(addr: std::net::SocketAddr, api_key: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    for (id, members) in corelay::conn::http::demo::CONVERSATIONS {
        let body = serde_json::json!({"id": id, "members": members}).to_string();
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        write!(
            s,
            "POST /api/conversations HTTP/1.1\r\nHost: demo\r\nAuthorization: Bearer {api_key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        anyhow::ensure!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 201"),
            "creating the demo conversation {id}: {}",
            answer.lines().next().unwrap_or("no answer")
        );
    }
    Ok(())
}
