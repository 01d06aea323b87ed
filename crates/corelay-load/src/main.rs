//! `corelay-load`: a load generator for corelay. One `mio` Poll per process drives thousands of
//! non-blocking client connections; `--procs P` spreads them over P child processes. Every scenario
//! prints progress on stderr and ends with one `RESULT {json}` line on stdout. See `docs/LOADGEN.md`.

mod echo;
mod fanout;
mod http;
mod idle;
mod net;
mod open;
mod server;
mod sse;
mod stats;
mod storm;
mod tls;
mod ui;
mod workers;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::net::{Target, Transport};
use crate::workers::Link;

#[derive(Parser)]
#[command(
    name = "corelay-load",
    version,
    about = "Load generator for corelay: idle connections, echo latency, chat fan-out, connect storms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Internal: this process is worker `i` of a `--procs` run.
    #[arg(long, global = true, hide = true)]
    child_index: Option<usize>,
    /// Internal: how many workers the run has.
    #[arg(long, global = true, hide = true)]
    child_count: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Hold N idle connections and measure the server's memory per connection and idle CPU.
    Idle(idle::IdleArgs),
    /// Echo messages over WebSocket connections (closed loop, or open loop with --rate) and measure latency.
    Echo(echo::EchoArgs),
    /// One publisher, N chat subscribers in one conversation: time until the last subscriber has each message.
    Fanout(fanout::FanoutArgs),
    /// Open N WebSocket connections at once and measure the handshake rate.
    ConnectStorm(storm::StormArgs),
}

/// Flags every scenario has.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Endpoint, e.g. ws://127.0.0.1:8080/echo (http:// for --transport sse/longpoll).
    #[arg(long)]
    pub url: String,
    /// Worker processes; the connections are split evenly between them.
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Bound on the whole run.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// A connection that has not completed its handshake after this long fails.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// No progress output on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Mint a JWT per connection with this secret and pass it as ?token= (user = prefix + index).
    #[arg(long)]
    pub token_secret: Option<String>,
    /// User id prefix for minted tokens.
    #[arg(long, default_value = "u")]
    pub user_prefix: String,
    /// Do not bind sockets to rotating 127.0.0.2..=250 source addresses before connecting.
    #[arg(long)]
    pub no_source_rotation: bool,
    /// TLS even for a ws:// or http:// URL (wss:// and https:// always use TLS).
    #[arg(long)]
    pub tls: bool,
    /// PEM file with the certificate(s) to trust: the CA, or the server's self-signed certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<String>,
    /// TLS server name (SNI and certificate check); default: the URL's host.
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// on: the connections of a process share a session store and resume earlier sessions (connect-storm
    /// fills it before it starts); off: every connection makes a full handshake.
    #[arg(long, value_enum, default_value = "on")]
    pub tls_resume: OnOff,
    /// Offer permessage-deflate (RFC 7692, no context takeover) on WebSocket connections, and inflate the
    /// compressed messages received.
    #[arg(long)]
    pub deflate: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl Common {
    pub fn target(&self, transport: Transport) -> anyhow::Result<Target> {
        let mut t = Target::parse(&self.url, transport, !self.no_source_rotation)?;
        if t.secure || self.tls {
            let name = self
                .tls_server_name
                .clone()
                .unwrap_or_else(|| tls::host_of(&t.host).to_string());
            t.tls = Some(tls::Tls::new(
                self.tls_ca.as_deref(),
                &name,
                self.tls_resume == OnOff::On,
            )?);
            t.secure = true;
        }
        t.deflate = self.deflate && transport == Transport::Ws;
        if transport == Transport::Ws && (t.path == "/ws" || t.path.starts_with("/ws?")) {
            t.subprotocol = Some("corelay.v1".into());
        }
        Ok(t)
    }

    /// `token=JWT` for connection `i` (empty without --token-secret).
    pub fn token_query(&self, i: usize) -> anyhow::Result<String> {
        match &self.token_secret {
            None => Ok(String::new()),
            Some(secret) => Ok(format!(
                "token={}",
                mint(secret, &format!("{}{i}", self.user_prefix), self.timeout)?
            )),
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.procs >= 1, "--procs must be at least 1");
        anyhow::ensure!(!self.timeout.is_zero(), "--timeout must be positive");
        Ok(())
    }
}

/// An HS256 token for `user` as the gateway's `--auth-secret` expects it (`sub`, `iat`, `exp`), valid for the
/// run and an hour more. Minted here, not with the gateway's code, so that the load generator does not build
/// the gateway; `tests::the_gateway_accepts_minted_tokens` checks the two agree.
pub fn mint(secret: &str, user: &str, run_timeout: Duration) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        iat: u64,
        exp: u64,
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let ttl = run_timeout + Duration::from_secs(3600);
    let claims = Claims {
        sub: user,
        iat: now,
        exp: now + ttl.as_secs(),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .with_context(|| format!("minting a token for {user}"))
}

/// Runs a worker body and emits its `RESULT` (or `{"error": …}`).
pub fn emit_result(link: &Link, r: anyhow::Result<Value>) {
    let v = r.unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    link.emit("RESULT", &v);
}

/// Warns when one process would need more sockets than its open-file limit allows.
pub fn check_fd_budget(per_process: usize, procs: usize, quiet: bool) {
    if let Some(limit) = stats::procfs::nofile_limit() {
        let need = per_process as u64 + 64;
        if need > limit {
            let suggest = (per_process * procs).div_ceil(limit.saturating_sub(64).max(1) as usize);
            eprintln!(
                "corelay-load: warning: {per_process} connections per process but the open-file limit is {limit}; \
                 expect 'open-file limit reached' failures (use --procs {suggest} or more)"
            );
        } else if !quiet && need > limit * 9 / 10 {
            eprintln!(
                "corelay-load: note: {per_process} connections per process is close to the open-file limit {limit}"
            );
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(index) = cli.child_index {
        let link = Link::child(index, cli.child_count.unwrap_or(1));
        match cli.command {
            Command::Idle(a) => idle::worker(&a, link),
            Command::Echo(a) => echo::worker(&a, link),
            Command::Fanout(a) => fanout::worker(&a, link),
            Command::ConnectStorm(a) => storm::worker(&a, link),
        }
        return ExitCode::SUCCESS;
    }
    ui::set_quiet(match &cli.command {
        Command::Idle(a) => a.common.quiet,
        Command::Echo(a) => a.common.quiet,
        Command::Fanout(a) => a.common.quiet,
        Command::ConnectStorm(a) => a.common.quiet,
    });
    let (scenario, r) = match cli.command {
        Command::Idle(a) => ("idle", idle::run(a)),
        Command::Echo(a) => ("echo", echo::run(a)),
        Command::Fanout(a) => ("fanout", fanout::run(a)),
        Command::ConnectStorm(a) => ("connect-storm", storm::run(a)),
    };
    match r {
        Ok(v) => {
            println!("RESULT {v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("corelay-load: {e:#}");
            let mut r = stats::Report::default();
            r.insert("scenario", json!(scenario));
            r.insert("error", json!(format!("{e:#}")));
            println!("RESULT {r}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_accepts_minted_tokens() {
        let secret = "a-load-test-secret-of-at-least-32-bytes";
        let token = mint(secret, "load-user-7", Duration::from_secs(60)).unwrap();
        let verifier = corelay::auth::Verifier::new(secret);
        assert_eq!(verifier.verify(&token).unwrap(), "load-user-7");
        assert!(
            corelay::auth::Verifier::new("another-secret-of-at-least-32-bytes!!")
                .verify(&token)
                .is_err()
        );
    }
}
