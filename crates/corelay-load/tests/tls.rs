//! The TLS client against a real TLS server: a small rustls WebSocket server in this test (a self-signed
//! ECDSA P-256 certificate from rcgen, stateless session tickets) and the `corelay-load` binary driving it
//! with `connect-storm` (resumption on and off) and `idle` (pings over TLS answered).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use corelay_proto::ws::accept_key;
use rustls::{HandshakeKind, ServerConfig, ServerConnection, StreamOwned};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    resumed: AtomicUsize,
    /// Masked pongs carrying the ping's payload.
    pongs: AtomicUsize,
}

struct Server {
    addr: SocketAddr,
    ca: PathBuf,
    counts: Arc<Counts>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn server() -> Server {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "corelay-load-tls-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("cert.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(ck.cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der())),
        )
        .unwrap();
    config.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { continue };
            let (config, c) = (config.clone(), c.clone());
            std::thread::spawn(move || serve(sock, config, &c));
        }
    });
    Server {
        addr,
        ca,
        counts,
        _dir: TempDir(dir),
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// One connection: TLS, the WebSocket upgrade, a ping, then every frame read until the client goes.
fn serve(sock: TcpStream, config: Arc<ServerConfig>, c: &Counts) {
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    c.accepted.fetch_add(1, Ordering::Relaxed);
    let conn = ServerConnection::new(config).unwrap();
    let mut tls = BufReader::new(StreamOwned::new(conn, sock));
    let mut key = None;
    loop {
        let mut line = String::new();
        if tls.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("sec-websocket-key")
        {
            key = Some(value.trim().to_string());
        }
    }
    let s = tls.get_mut();
    if s.conn.handshake_kind() == Some(HandshakeKind::Resumed) {
        c.resumed.fetch_add(1, Ordering::Relaxed);
    }
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key.unwrap_or_default())
    );
    s.write_all(answer.as_bytes()).unwrap();
    s.write_all(&[0x89, 4, b'p', b'i', b'n', b'g']).unwrap();
    s.flush().unwrap();
    // Client frames: 2-byte header (short payloads), 4-byte mask, payload.
    loop {
        let mut head = [0u8; 6];
        if tls.read_exact(&mut head).is_err() {
            return;
        }
        let len = (head[1] & 0x7F) as usize;
        let mut payload = vec![0u8; len];
        if tls.read_exact(&mut payload).is_err() {
            return;
        }
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= head[2 + i % 4];
        }
        if head[0] == 0x8A && head[1] & 0x80 != 0 && payload == b"ping" {
            c.pongs.fetch_add(1, Ordering::Relaxed);
        }
        if head[0] & 0x0F == 0x8 {
            return;
        }
    }
}

fn load(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_corelay-load"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "no RESULT; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

#[test]
fn connect_storm_over_tls_with_and_without_resumption() {
    let s = server();
    let url = format!("wss://localhost:{}/echo", s.addr.port());
    let ca = s.ca.to_str().unwrap();
    let common = [
        "connect-storm",
        "--quiet",
        "--url",
        &url,
        "--tls-ca",
        ca,
        "--connections",
        "40",
        "--timeout",
        "60s",
        "--no-source-rotation",
    ];

    let off = load(&[&common[..], &["--tls-resume", "off"]].concat());
    assert_eq!(off["connected"], 40, "{off}");
    assert_eq!(off["tls"], true);
    assert_eq!(off["tls_full"], 40, "{off}");
    assert_eq!(off["tls_resumed"], 0, "{off}");
    assert_eq!(off["tls_primed"], 0, "{off}");
    assert_eq!(s.counts.resumed.load(Ordering::Relaxed), 0);

    let accepted = s.counts.accepted.load(Ordering::Relaxed);
    let on = load(&[&common[..], &["--tls-resume", "on"]].concat());
    assert_eq!(on["connected"], 40, "{on}");
    assert_eq!(on["tls_resumed"], 40, "{on}");
    assert_eq!(on["tls_full"], 0, "{on}");
    // The store was filled first: two tickets per full handshake, so about half as many handshakes.
    let primed = on["tls_primed"].as_u64().unwrap();
    assert!((20..40).contains(&primed), "{on}");
    assert!(on["tls_tickets"].as_u64().unwrap() >= 40, "{on}");
    assert_eq!(
        s.counts.accepted.load(Ordering::Relaxed) - accepted,
        40 + primed as usize
    );
    assert_eq!(s.counts.resumed.load(Ordering::Relaxed), 40);
}

#[test]
fn idle_over_tls_answers_pings_and_checks_the_certificate() {
    let s = server();
    let url = format!("wss://127.0.0.1:{}/echo", s.addr.port());
    let ca = s.ca.to_str().unwrap();
    let v = load(&[
        "idle",
        "--quiet",
        "--url",
        &url,
        "--tls-ca",
        ca,
        "--tls-server-name",
        "localhost",
        "--connections",
        "5",
        "--hold",
        "1s",
        "--rss-samples",
        "1",
        "--timeout",
        "30s",
    ]);
    assert_eq!(v["connected"], 5, "{v}");
    assert_eq!(v["held_connections"], 5, "{v}");
    assert_eq!(v["pings_answered"], 5, "{v}");
    assert_eq!(v["tls_full"], 5, "{v}");
    for _ in 0..100 {
        if s.counts.pongs.load(Ordering::Relaxed) == 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.counts.pongs.load(Ordering::Relaxed), 5);

    // The certificate is for "localhost", not for 127.0.0.1: refused.
    let v = load(&[
        "idle",
        "--quiet",
        "--url",
        &url,
        "--tls-ca",
        ca,
        "--connections",
        "2",
        "--hold",
        "100ms",
        "--rss-samples",
        "1",
        "--timeout",
        "30s",
    ]);
    assert_eq!(v["connected"], 0, "{v}");
    let reasons = v["failures"].to_string();
    assert!(reasons.contains("tls: invalid peer certificate"), "{v}");
}
