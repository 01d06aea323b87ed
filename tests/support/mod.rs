//! Test support: start the real `corelay` binary on a free port, mint tokens, talk raw HTTP and raw frames.
//!
//! Longer than 600 lines: every test binary includes this one module, so it holds every way the tests drive
//! real processes (the gateway, `redis-server` with replicas and the relay in front of them, curl for SSE) and
//! the wire (raw HTTP, frames, WebSocket clients); split in parts, each binary would still need most of them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Operator secrets are at least 32 bytes (shorter ones are refused at start).
pub const SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";
pub const API_KEY: &str = "test-api-key-0123456789abcdef0123456789abcdef";

/// A gateway process, killed when dropped.
pub struct Node {
    pub child: Child,
    pub addr: SocketAddr,
    /// The TLS listener, when started with `--tls-listen`.
    pub tls_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Remove the data dir on drop (not when a test restarts a node on it).
    owns_dir: bool,
}

impl Node {
    /// Starts the binary with `--listen 127.0.0.1:0` and the given extra flags; waits for its listening line.
    pub fn start(extra: &[&str]) -> Node {
        let data_dir = fresh_dir();
        let mut n = Node::start_in(&data_dir, extra);
        n.owns_dir = true;
        n
    }

    /// Starts on an existing data dir, which is kept when this node is dropped.
    pub fn start_in(data_dir: &std::path::Path, extra: &[&str]) -> Node {
        Node::spawn(data_dir, extra, None, "127.0.0.1:0")
    }

    /// Starts again on `addr` (the port of a node that was killed) and an existing data dir, kept on drop.
    pub fn start_on(addr: SocketAddr, data_dir: &std::path::Path, extra: &[&str]) -> Node {
        Node::spawn(data_dir, extra, None, &addr.to_string())
    }

    /// Starts with debug logs written to `log` (to check what the gateway logs).
    pub fn start_logged(extra: &[&str], log: &std::path::Path) -> Node {
        let mut n = Node::spawn(&fresh_dir(), extra, Some(log), "127.0.0.1:0");
        n.owns_dir = true;
        n
    }

    fn spawn(
        data_dir: &std::path::Path,
        extra: &[&str],
        log: Option<&std::path::Path>,
        listen: &str,
    ) -> Node {
        let data_dir = data_dir.to_path_buf();
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).expect("log file")),
            None => Stdio::inherit(),
        };
        let level = if log.is_some() {
            "corelay=debug".to_string()
        } else {
            std::env::var("CORELAY_LOG").unwrap_or_else(|_| "warn".into())
        };
        // CORELAY_BIN: run another build of the gateway (benchmarks run the release binary).
        let bin = std::env::var_os("CORELAY_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_corelay")));
        let mut child = Command::new(bin)
            .args(["run", "--listen", listen, "--threads", "2", "--no-pin"])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--auth-secret", SECRET, "--api-key", API_KEY])
            .args(extra)
            .env("CORELAY_LOG", level)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn corelay");
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).expect("read listening line");
        let addr = line
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        let tls_addr = extra.contains(&"--tls-listen").then(|| {
            let mut line = String::new();
            out.read_line(&mut line).expect("read TLS listening line");
            line.split_whitespace()
                .nth(4)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no TLS address in {line:?}"))
        });
        Node {
            child,
            addr,
            tls_addr,
            data_dir,
            owns_dir: false,
        }
    }

    /// SIGKILL, no drain, no flush.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `corelay run --processes n` on a free fixed port (the processes share it), as cluster nodes over
    /// `redis`; returns once every process printed its listening line. `child` is the supervisor.
    pub fn start_processes(n: usize, redis: &str, extra: &[&str]) -> Node {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data_dir = fresh_dir();
        let mut child = Command::new(env!("CARGO_BIN_EXE_corelay"))
            .args([
                "run",
                "--processes",
                &n.to_string(),
                "--threads",
                "1",
                "--no-pin",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--redis", redis])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--auth-secret", SECRET, "--api-key", API_KEY])
            .args(extra)
            .env(
                "CORELAY_LOG",
                std::env::var("CORELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn corelay");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        for _ in 0..n {
            let mut line = String::new();
            out.read_line(&mut line).expect("read listening line");
            assert!(line.contains("listening on"), "{line:?}");
        }
        // Keep reading: a restarted process prints its line again, into an open pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Node {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            tls_addr: None,
            data_dir,
            owns_dir: true,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(within)
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Creates a conversation through the internal API; returns the HTTP status.
    pub fn create_conversation(&self, id: &str, members: &[&str]) -> u16 {
        let body = serde_json::json!({"id": id, "members": members}).to_string();
        let (status, _) = http(
            self.addr,
            &format!(
                "POST /api/conversations HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        status
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// A new, empty temporary directory name.
pub fn fresh_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "corelay-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn token(user: &str) -> String {
    corelay::auth::mint(SECRET, user, Duration::from_secs(3600)).unwrap()
}

/// Sends a raw request and reads the whole response (until the server closes or 5 s pass).
pub fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    (status_of(&text), text)
}

pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

pub type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// Connects a chat client with tungstenite (the reference client) and reads its `welcome`.
pub fn connect(node: &Node, user: &str) -> Ws {
    connect_query(node, user, "")
}

/// The same, with more query parameters (`&cursor=…`).
pub fn connect_query(node: &Node, user: &str, extra: &str) -> Ws {
    let url = format!("{}?token={}{extra}", node.url("/ws"), token(user));
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "corelay.v1".parse().unwrap());
    let (mut ws, resp) = tungstenite::connect(req).expect("websocket connect");
    assert_eq!(
        resp.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "corelay.v1"
    );
    set_timeout(&mut ws, Duration::from_secs(5));
    let w = next_json(&mut ws);
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["user"], user);
    ws
}

pub fn set_timeout(ws: &mut Ws, t: Duration) {
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(t)).unwrap();
    }
}

/// The next text message as JSON (skipping pings, which tungstenite answers).
pub fn next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        match ws.read().expect("read frame") {
            tungstenite::Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

pub fn send_json(ws: &mut Ws, v: serde_json::Value) {
    ws.send(tungstenite::Message::text(v.to_string())).unwrap();
}

/// Reads an HTTP response head byte by byte (so nothing after it is consumed).
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A raw TCP connection that completed the upgrade on `path` (for sending frames tungstenite refuses to).
pub fn raw_upgrade(node: &Node, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let text = read_head(&mut s);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    s
}

/// A client frame (masked unless `mask` is None).
pub fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n < 65536 => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// Reads server frames until a close frame; returns its code (None if the connection ended without one).
pub fn read_close_code(s: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        // Parse what we have: server frames are unmasked with 7/16-bit lengths here.
        let mut pos = 0;
        while buf.len() >= pos + 2 {
            let op = buf[pos] & 0x0f;
            let (len, hdr) = match buf[pos + 1] & 0x7f {
                126 if buf.len() >= pos + 4 => {
                    (u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]) as usize, 4)
                }
                126 => break,
                n => (n as usize, 2),
            };
            if buf.len() < pos + hdr + len {
                break;
            }
            if op == 8 {
                let p = &buf[pos + hdr..pos + hdr + len];
                return (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
            }
            pos += hdr + len;
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Waits for `cond` with a deadline.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// One SSE event as curl printed it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// What an SSE stream produced, line by line.
#[derive(Debug)]
pub enum SseItem {
    /// The HTTP status line of the response.
    Status(u16),
    Event(SseEvent),
    /// A comment line (keep-alive).
    Comment,
}

/// An SSE stream read by curl (an independent peer), parsed on a background thread.
pub struct Sse {
    child: Child,
    rx: std::sync::mpsc::Receiver<SseItem>,
}

impl Sse {
    /// `curl -sN -i` on `path` (which carries `token=`), with an optional `Last-Event-ID`.
    pub fn open(node: &Node, path: &str, last_event_id: Option<&str>) -> Sse {
        Sse::open_url(&format!("http://{}{}", node.addr, path), &[], last_event_id)
    }

    /// The same on a full URL, with more curl arguments (`--cacert` for `https://`).
    pub fn open_url(url: &str, curl_args: &[&str], last_event_id: Option<&str>) -> Sse {
        let mut cmd = Command::new("curl");
        cmd.args(["-sN", "-i", "--max-time", "60"]);
        cmd.args(curl_args);
        if let Some(id) = last_event_id {
            cmd.args(["-H", &format!("Last-Event-ID: {id}")]);
        }
        cmd.arg(url);
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl (apt-get install curl)");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cur = SseEvent::default();
            let mut in_head = true;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if in_head {
                    if line.starts_with("HTTP/") {
                        let _ = tx.send(SseItem::Status(status_of(&line)));
                    }
                    if line.trim().is_empty() {
                        in_head = false;
                    }
                    continue;
                }
                if line.is_empty() {
                    if cur != SseEvent::default() {
                        let _ = tx.send(SseItem::Event(std::mem::take(&mut cur)));
                    }
                } else if line.starts_with(':') {
                    let _ = tx.send(SseItem::Comment);
                } else if let Some(v) = line.strip_prefix("id: ") {
                    cur.id = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    cur.event = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    if !cur.data.is_empty() {
                        cur.data.push('\n');
                    }
                    cur.data.push_str(v);
                }
            }
        });
        Sse { child, rx }
    }

    pub fn status(&self) -> u16 {
        match self.rx.recv_timeout(Duration::from_secs(10)) {
            Ok(SseItem::Status(s)) => s,
            other => panic!("expected a status line, got {other:?}"),
        }
    }

    /// The next event (skipping comments), or panics after `within`.
    /// The next event that is not the stream's opening `stream` event (see [`Sse::next_raw_event`]).
    pub fn next_event(&self, within: Duration) -> SseEvent {
        loop {
            let e = self.next_raw_event(within);
            if e.event.as_deref() != Some("stream") {
                return e;
            }
        }
    }

    /// The next event, whatever it is (the first one of a stream is `event: stream` with its id).
    pub fn next_raw_event(&self, within: Duration) -> SseEvent {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(SseItem::Event(e)) => return e,
                Ok(_) => continue,
                Err(e) => panic!("no SSE event within {within:?}: {e}"),
            }
        }
    }

    /// Waits for a keep-alive comment.
    pub fn comment(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Ok(item) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if matches!(item, SseItem::Comment) {
                return true;
            }
        }
        false
    }

    /// Nothing more arrives within `within`.
    pub fn quiet(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(SseItem::Event(_)) => return false,
                Ok(_) => continue,
                Err(_) => return true,
            }
        }
    }
}

impl Drop for Sse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// `POST /api/publish`; returns the offset.
    pub fn publish(&self, channel: &str, body: serde_json::Value) -> u64 {
        let req = serde_json::json!({"channel": channel, "body": body}).to_string();
        let (status, text) = http(
            self.addr,
            &format!(
                "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{req}",
                req.len()
            ),
        );
        assert_eq!(status, 200, "{text}");
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        serde_json::from_str::<serde_json::Value>(body).unwrap()["offset"]
            .as_u64()
            .unwrap()
    }

    /// `GET path` with `Connection: close`: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let (status, text) = http(
            self.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        );
        let body = text
            .find("\r\n\r\n")
            .map(|i| text[i + 4..].to_string())
            .unwrap_or_default();
        (status, body)
    }
}

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real `redis-server` on a free port, with AOF (fsync always) in a temp dir; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    /// More `redis-server` arguments, kept across restarts.
    args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// With more `redis-server` arguments.
    pub fn start_with(args: &[&str]) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = fresh_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = RedisServer {
            child: None,
            port,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A replica of `master`, replicating from `port` (the master's, or a relay's in front of it), once it
    /// acknowledges a write to the master promptly.
    pub fn replica_of(master: &RedisServer, port: u16) -> RedisServer {
        let port = port.to_string();
        let r = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
        // Loaded the master's snapshot. A write before that is acknowledged at once (it is in the snapshot),
        // while the stream of later ones may start only at the replica's next periodic ACK (up to 1 s): the
        // probe writes after this point, so its acknowledgement means the stream flows.
        assert!(
            wait_until(Duration::from_secs(20), || r
                .query::<String>(&["INFO", "replication"])
                .contains("master_link_status:up")),
            "the replica never loaded its master's snapshot"
        );
        let mut c = redis::Client::open(master.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to redis-server");
        assert!(
            wait_until(Duration::from_secs(20), || {
                let (_, acked): ((), i64) = redis::pipe()
                    .cmd("SET")
                    .arg("test:replica-probe")
                    .arg(1)
                    .cmd("WAIT")
                    .arg(1)
                    .arg(200)
                    .query(&mut c)
                    .unwrap();
                acked >= 1
            }),
            "the replica never synced with its master"
        );
        r
    }

    /// One command over a fresh connection (`query::<String>(&["INFO", "replication"])`).
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut c = redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to redis-server");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c).expect("redis command")
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the server process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// (Re)starts the server on the same port and data dir (the AOF is replayed).
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            // A replica syncs at once, not after the default 5 s wait for others.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(&self.args)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 16];
                s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
            }),
            "redis-server did not start"
        );
    }

    /// SIGKILL (no shutdown save; the AOF written so far is what survives).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP relay on a free port in front of a Redis master: a replica started with `--replicaof` this port
/// replicates through it. [`Relay::hold`] stops the stream both ways (the master sees a replica that does not
/// acknowledge, as when it is stopped); [`Relay::cut`] then drops what was held, as when the master's host dies
/// with the stream still unsent. (A `SIGSTOP`ped replica cannot show that loss: its kernel has already taken
/// the stream, and the replica reads it when it resumes, even after the master is gone.)
pub struct Relay {
    pub port: u16,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Per copier: (still running, stopped at `held`), and every socket, for `cut`.
    copiers:
        std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<[std::sync::atomic::AtomicBool; 2]>>>>,
    sockets: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(master_port: u16) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let relay = Relay {
            port: listener.local_addr().unwrap().port(),
            held: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            copiers: Arc::new(Mutex::new(Vec::new())),
            sockets: Arc::new(Mutex::new(Vec::new())),
        };
        let (held, stop, copiers, sockets) = (
            relay.held.clone(),
            relay.stop.clone(),
            relay.copiers.clone(),
            relay.sockets.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(master) = TcpStream::connect(("127.0.0.1", master_port)) else {
                    continue;
                };
                let mut all = sockets.lock().unwrap();
                for (from, to) in [(&client, &master), (&master, &client)] {
                    let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    from.set_read_timeout(Some(Duration::from_millis(5)))
                        .unwrap();
                    all.push(from.try_clone().unwrap());
                    let state = Arc::new([AtomicBool::new(true), AtomicBool::new(false)]);
                    copiers.lock().unwrap().push(state.clone());
                    let (held, stop) = (held.clone(), stop.clone());
                    std::thread::spawn(move || {
                        copy(from, to, &held, &stop, &state);
                        state[0].store(false, SeqCst);
                    });
                }
            }
        });
        fn copy(
            mut from: TcpStream,
            mut to: TcpStream,
            held: &AtomicBool,
            stop: &AtomicBool,
            state: &[AtomicBool; 2],
        ) {
            let mut buf = vec![0u8; 64 << 10];
            while !stop.load(SeqCst) {
                if held.load(SeqCst) {
                    state[1].store(true, SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                state[1].store(false, SeqCst);
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Both);
        }
        relay
    }

    /// Stops the stream both ways; returns once nothing more passes.
    pub fn hold(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.held.store(true, SeqCst);
        assert!(
            wait_until(Duration::from_secs(5), || self
                .copiers
                .lock()
                .unwrap()
                .iter()
                .all(|s| !s[0].load(SeqCst) || s[1].load(SeqCst))),
            "the relay did not stop"
        );
    }

    /// Lets the stream through again.
    pub fn release(&self) {
        self.held.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes every connection and stops accepting: what was held is gone.
    pub fn cut(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/<pid>/status`); None once the process is gone.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Samples a process's RSS on its own thread until stopped; `stop` returns the peak seen, in KiB.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(kib) = vm_rss_kib(pid) {
                    peak = peak.max(kib);
                }
                std::thread::sleep(every);
            }
            peak
        });
        RssSampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops sampling; the peak RSS in KiB.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Every message of a conversation through `/api/history` (paged, 200 a page), oldest first.
pub fn history(node: &Node, conversation: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/api/history?conversation={conversation}&limit=200&before={b}"),
            None => format!("/api/history?conversation={conversation}&limit=200"),
        };
        let (st, text) = http(
            node.addr,
            &format!(
                "GET {path} HTTP/1.1\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(st, 200, "{text}");
        let v: serde_json::Value =
            serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        let msgs = v["messages"].as_array().unwrap().clone();
        if let Some(last) = msgs.last() {
            before = last["offset"].as_u64();
        }
        out.extend(msgs);
        if v["more"] != true {
            out.reverse();
            return out;
        }
    }
}

/// The sum of a metric's samples (all labels) in `/metrics`.
pub fn metric(node: &Node, name: &str) -> u64 {
    let (_, m) = node.get("/metrics");
    m.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
