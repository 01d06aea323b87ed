//! The baseline peer for the benchmarks: a WebSocket server written the way a Rust user writes one first
//! (tokio multi-thread runtime, an accept loop, `tokio_tungstenite`, one task per connection), so that
//! corelay's numbers are compared with something real, not with a straw man.
//!
//! ```text
//! cargo run --release --example baseline -- --listen 127.0.0.1:0 --mode echo|broadcast \
//!     [--read-buffer 4096] [--threads N]
//! ```
//!
//! * `echo`: every text/binary message is sent back (pings are answered by tungstenite itself).
//! * `broadcast`: every text message received from any client goes to every connected client.
//! * `--read-buffer N`: "the tuned baseline". tungstenite allocates its read buffer eagerly, 128 KiB by
//!   default, which is most of the ~135 KiB an idle default connection costs; the write buffer grows on
//!   demand and needs no setting.
//!
//! Any path is served; no auth, no subprotocol. Prints `baseline listening on ADDR (N threads)` like
//! corelay prints `corelay listening on ADDR (N loops)`, so the same scripts parse both.

use std::io::Write;

use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Echo,
    Broadcast,
}

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    #[arg(long, value_enum, default_value = "echo")]
    mode: Mode,
    /// tungstenite's read buffer per connection (default 128 KiB).
    #[arg(long)]
    read_buffer: Option<usize>,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(serve(args, threads))
}

async fn serve(args: Args, threads: usize) -> std::io::Result<()> {
    let listener = TcpListener::bind(&args.listen).await?;
    println!(
        "baseline listening on {} ({threads} threads)",
        listener.local_addr()?
    );
    std::io::stdout().flush()?;
    let config = args
        .read_buffer
        .map(|n| WebSocketConfig::default().read_buffer_size(n));
    let (hub, _) = broadcast::channel::<Utf8Bytes>(1024);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            // EMFILE and friends: keep serving the connections we have.
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let (mode, hub) = (args.mode, hub.clone());
        // Resets and protocol errors are routine under load: not worth a log line each.
        tokio::spawn(async move { handle(stream, config, mode, hub).await.ok() });
    }
}

async fn handle(
    stream: TcpStream,
    config: Option<WebSocketConfig>,
    mode: Mode,
    hub: broadcast::Sender<Utf8Bytes>,
) -> tokio_tungstenite::tungstenite::Result<()> {
    // corelay sets TCP_NODELAY too; without it small echoes can wait on delayed ACKs.
    stream.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_async_with_config(stream, config).await?;
    match mode {
        Mode::Echo => {
            // Pings and closes need nothing here: tungstenite queues the pong or the close reply and
            // flushes it on the next poll; after a close the stream ends.
            while let Some(msg) = ws.next().await {
                let msg = msg?;
                if msg.is_text() || msg.is_binary() {
                    ws.send(msg).await?;
                }
            }
        }
        Mode::Broadcast => {
            let mut rx = hub.subscribe();
            loop {
                tokio::select! {
                    msg = ws.next() => match msg.transpose()? {
                        Some(Message::Text(text)) => { let _ = hub.send(text); }
                        Some(_) => {} // pongs and close replies go out on the next poll
                        None => break,
                    },
                    out = rx.recv() => match out {
                        Ok(text) => ws.send(Message::Text(text)).await?,
                        // A slow client misses messages rather than holding everyone back.
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
        }
    }
    Ok(())
}
