//! RFC 6455 behaviour over real sockets: close codes, heartbeats, pipelining, drain.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use support::*;

const MASK: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);

#[test]
fn echo_endpoint_is_off_by_default() {
    let node = Node::start(&[]);
    let (st, _) = http(
        node.addr,
        "GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(st, 404);
}

#[test]
fn echo_with_tungstenite_and_frames_pipelined_after_the_upgrade() {
    let node = Node::start(&["--echo-path", "/echo"]);
    let (mut ws, _) = tungstenite::connect(node.url("/echo")).unwrap();
    ws.send(tungstenite::Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("hello"));
    ws.send(tungstenite::Message::binary(vec![1u8, 2, 3]))
        .unwrap();
    assert_eq!(
        ws.read().unwrap(),
        tungstenite::Message::binary(vec![1u8, 2, 3])
    );

    // A client that sends its first frames in the same packet as the upgrade request.
    let mut s = std::net::TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = b"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec();
    req.extend(frame(true, 1, b"early", MASK));
    s.write_all(&req).unwrap();
    let mut buf = vec![0u8; 512];
    let mut got = Vec::new();
    while !got.windows(5).any(|w| w == b"early") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before echo");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"));
}

#[test]
fn oversize_frame_is_closed_with_1009() {
    let node = Node::start(&["--echo-path", "/echo", "--max-frame-bytes", "1KiB"]);
    let mut s = raw_upgrade(&node, "/echo");
    s.write_all(&frame(true, 2, &vec![7u8; 2048], MASK))
        .unwrap();
    assert_eq!(read_close_code(&mut s), Some(1009));
}

#[test]
fn oversize_message_across_fragments_is_closed_with_1009() {
    let node = Node::start(&["--echo-path", "/echo", "--max-message-bytes", "1KiB"]);
    let mut s = raw_upgrade(&node, "/echo");
    s.write_all(&frame(false, 2, &[1u8; 800], MASK)).unwrap();
    s.write_all(&frame(true, 0, &[1u8; 800], MASK)).unwrap();
    assert_eq!(read_close_code(&mut s), Some(1009));
}

#[test]
fn invalid_utf8_is_closed_with_1007_even_mid_frame() {
    let node = Node::start(&["--echo-path", "/echo"]);
    let mut s = raw_upgrade(&node, "/echo");
    s.write_all(&frame(true, 1, b"ok \xff\xfe", MASK)).unwrap();
    assert_eq!(read_close_code(&mut s), Some(1007));

    // Fail fast: a text frame announcing 1000 bytes whose first bytes are already invalid is refused before
    // the rest arrives.
    let mut s = raw_upgrade(&node, "/echo");
    let f = frame(true, 1, &[b'a'; 1000], MASK);
    let mut partial = f[..8 + 6].to_vec(); // header (2+2+4) + 6 payload bytes
    partial[8 + 3] = 0xC0 ^ MASK.unwrap()[3]; // payload byte 3 uses mask byte 3
    s.write_all(&partial).unwrap();
    assert_eq!(read_close_code(&mut s), Some(1007));
}

#[test]
fn unmasked_client_frame_is_closed_with_1002() {
    let node = Node::start(&["--echo-path", "/echo"]);
    let mut s = raw_upgrade(&node, "/echo");
    s.write_all(&frame(true, 1, b"naked", None)).unwrap();
    assert_eq!(read_close_code(&mut s), Some(1002));
}

#[test]
fn garbage_after_upgrade_is_closed_and_others_keep_working() {
    let node = Node::start(&["--echo-path", "/echo"]);
    let (mut good, _) = tungstenite::connect(node.url("/echo")).unwrap();
    let mut bad = raw_upgrade(&node, "/echo");
    bad.write_all(b"\x0f\xff\x00garbage garbage garbage")
        .unwrap();
    assert_eq!(read_close_code(&mut bad), Some(1002));
    good.send(tungstenite::Message::text("still here")).unwrap();
    assert_eq!(
        good.read().unwrap(),
        tungstenite::Message::text("still here")
    );
}

#[test]
fn silent_client_is_closed_after_interval_plus_timeout() {
    let node = Node::start(&[
        "--echo-path",
        "/echo",
        "--heartbeat-interval",
        "300ms",
        "--heartbeat-timeout",
        "300ms",
    ]);
    // A client that reads but never answers pings.
    let mut s = raw_upgrade(&node, "/echo");
    let start = Instant::now();
    let mut saw_ping = false;
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => saw_ping |= buf[..n].contains(&0x89),
        }
    }
    let took = start.elapsed();
    assert!(saw_ping, "server must ping a silent client");
    assert!(
        took >= Duration::from_millis(550),
        "closed too early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "closed too late: {took:?}"
    );

    // A client that answers (tungstenite replies to pings while reading) stays open through several rounds.
    let (mut ws, _) = tungstenite::connect(node.url("/echo")).unwrap();
    set_timeout(&mut ws, Duration::from_millis(100));
    let until = Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    while Instant::now() < until {
        match ws.read() {
            Ok(tungstenite::Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("a live client was closed: {e}"),
        }
        let _ = ws.flush();
    }
    assert!(pings >= 2, "expected pings, got {pings}");
    ws.send(tungstenite::Message::text("alive")).unwrap();
    set_timeout(&mut ws, Duration::from_secs(5));
    loop {
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => {
                assert_eq!(t.as_str(), "alive");
                break;
            }
            _ => continue,
        }
    }
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_zero() {
    let mut node = Node::start(&["--echo-path", "/echo", "--drain-timeout", "3s"]);
    let mut a = raw_upgrade(&node, "/echo");
    let (mut b, _) = tungstenite::connect(node.url("/echo")).unwrap();
    let status_thread = {
        let pid = node.child.id();
        std::thread::spawn(move || {
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .unwrap()
        })
    };
    assert_eq!(read_close_code(&mut a), Some(1001));
    match b.read() {
        Ok(tungstenite::Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let _ = b.flush();
    drop(a);
    status_thread.join().unwrap();
    let st = node
        .wait_exit(Duration::from_secs(5))
        .expect("process exits");
    assert!(st.success(), "exit status {st:?}");
}

#[test]
fn bad_http_gets_the_right_status() {
    let node = Node::start(&["--max-header-bytes", "1KiB", "--handshake-timeout", "300ms"]);
    let cases: Vec<(String, u16)> = vec![
        ("BLAH\x01 / HTTP/1.1\r\n\r\n".into(), 400),
        (format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(2000)), 431),
        ("GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n".into(), 404),
        ("POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n".into(), 405),
        ("GET /ws HTTP/1.1\r\nHost: t\r\n\r\n".into(), 426),
        (
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".into(),
            400,
        ),
        (
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n".into(),
            426,
        ),
        (
            format!(
                "POST /api/conversations HTTP/1.1\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 999999999\r\n\r\n"
            ),
            413,
        ),
    ];
    for (req, want) in cases {
        let (got, text) = http(node.addr, &req);
        assert_eq!(got, want, "request {req:?} answered {text:?}");
        if want >= 400 {
            assert!(text.contains("\"error\""), "a reason in the body: {text}");
        }
    }
    // Slowloris: half a request head, then silence → 408 after the handshake timeout.
    let start = Instant::now();
    let (st, _) = http(node.addr, "GET /healthz HTTP/1.1\r\nHost: sl");
    assert_eq!(st, 408);
    assert!(start.elapsed() < Duration::from_secs(3));
    // The server still serves.
    assert_eq!(
        http(
            node.addr,
            "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        .0,
        200
    );
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let node = Node::start(&[]);
    let mut s = std::net::TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Three pipelined requests, the last one closing.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /readyz HTTP/1.1\r\nHost: t\r\n\r\nGET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 3, "{all}");
    assert!(all.contains("ready\n"));
    assert!(all.contains("corelay_connections{loop=\"0\",transport=\"http\"}"));
}

#[test]
fn metrics_count_connections_and_closes() {
    let node = Node::start(&["--echo-path", "/echo"]);
    let _a = raw_upgrade(&node, "/echo");
    let mut b = raw_upgrade(&node, "/echo");
    b.write_all(&frame(true, 1, b"naked", None)).unwrap();
    assert_eq!(read_close_code(&mut b), Some(1002));
    // Sum of the samples whose line contains every needle.
    let metric = |needles: &[&str]| -> i64 {
        let (_, text) = http(
            node.addr,
            "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        text.lines()
            .filter(|l| !l.starts_with('#') && needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
            .sum()
    };
    // `a` is open; `b` was closed by the server with 1002 after one frame in.
    assert!(wait_until(Duration::from_secs(3), || metric(&[
        "corelay_connections{",
        "transport=\"echo\""
    ]) == 1));
    assert_eq!(metric(&["corelay_ws_closes_total{code=\"1002\"}"]), 1);
    assert!(
        metric(&["corelay_accepted_total"]) >= 3,
        "two upgrades and the /metrics requests"
    );
}

/// Autobahn 9.3.x over our own socket: a 4 MiB message in 4 KiB fragments, each its own write, is echoed as
/// one frame, and the close that follows is answered (not left unread behind the big write).
#[test]
fn close_after_a_large_fragmented_echo_is_answered() {
    let node = Node::start(&[
        "--echo-path",
        "/echo",
        "--max-message-bytes",
        "16MiB",
        "--max-write-queue-bytes",
        "64MiB",
    ]);
    for _ in 0..3 {
        let mut s = raw_upgrade(&node, "/echo");
        const TOTAL: usize = 4 << 20;
        const FRAG: usize = 4096;
        let chunk = vec![b'*'; FRAG];
        for k in 0..TOTAL / FRAG {
            let op = if k == 0 { 1 } else { 0 };
            s.write_all(&frame(k == TOTAL / FRAG - 1, op, &chunk, MASK))
                .unwrap();
        }
        let mut head = [0u8; 10];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[0], 0x81, "one final text frame");
        assert_eq!(head[1], 127);
        let len = u64::from_be_bytes(head[2..10].try_into().unwrap()) as usize;
        assert_eq!(len, TOTAL);
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        assert!(payload.iter().all(|&b| b == b'*'));
        s.write_all(&frame(true, 8, &1000u16.to_be_bytes(), MASK))
            .unwrap();
        assert_eq!(read_close_code(&mut s), Some(1000));
    }
}
