//! Rolling deploys without reconnect storms: a draining node closes its long-lived connections gradually
//! (`--drain-rate`, `--drain-window`), and a node flooded with new connections queues them briefly and then
//! refuses them with 503 + `Retry-After` (`--accept-rate`, `--accept-queue`). Real sockets.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn a_drain_spreads_its_closes_at_the_configured_rate() {
    // 120 WebSockets at 80 closes a second: about 1.5 s, instead of all at once.
    let mut node = Node::start(&[
        "--echo-path",
        "/echo",
        "--drain-rate",
        "80",
        "--drain-timeout",
        "3s",
    ]);
    let n = 120;
    let sockets: Vec<TcpStream> = (0..n).map(|_| raw_upgrade(&node, "/echo")).collect();
    let (ready_status, _) = node.get("/readyz");
    assert_eq!(ready_status, 200);
    let started = Instant::now();
    let waiters: Vec<_> = sockets
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                let code = read_close_code(&mut s);
                (code, Instant::now())
            })
        })
        .collect();
    let pid = node.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let closes: Vec<(Option<u16>, Instant)> =
        waiters.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(
        closes.iter().all(|(c, _)| *c == Some(1001)),
        "every client told 1001: {:?}",
        closes.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    let mut at: Vec<Duration> = closes
        .iter()
        .map(|(_, t)| t.duration_since(started))
        .collect();
    at.sort();
    let spread = at[n - 1] - at[0];
    assert!(
        spread >= Duration::from_millis(1100),
        "spread over {spread:?}"
    );
    // The pace: in no 250 ms window more than the rate allows (20), with slack for scheduling (x2).
    let worst = (0..n)
        .map(|i| {
            at[i..]
                .iter()
                .take_while(|t| **t - at[i] < Duration::from_millis(250))
                .count()
        })
        .max()
        .unwrap();
    assert!(worst <= 40, "{worst} closes within 250 ms");
    let status = node
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the drain");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_small_drain_is_not_held_back() {
    // One connection at the default rate (1,000/s): closed at once, not after a window.
    let mut node = Node::start(&["--echo-path", "/echo"]);
    let mut s = raw_upgrade(&node, "/echo");
    let started = Instant::now();
    let client = std::thread::spawn(move || {
        let code = read_close_code(&mut s);
        let at = started.elapsed();
        // The close reply, so that the gateway need not linger for it.
        let _ = s.write_all(&frame(true, 8, &1001u16.to_be_bytes(), Some([1, 2, 3, 4])));
        (code, at)
    });
    let status = node.terminate(Duration::from_secs(10)).expect("exits");
    assert!(status.success());
    let (code, at) = client.join().unwrap();
    assert_eq!(code, Some(1001));
    assert!(at < Duration::from_millis(500), "closed after {at:?}");
}

/// Sends an upgrade request and reads the status line (0 when the connection ended without an answer).
fn upgrade_status(addr: std::net::SocketAddr) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    (status_of(&text), text)
}

#[test]
fn a_connect_flood_is_queued_briefly_then_refused_with_retry_after() {
    // 40 new connections a second with a burst of 40, queued at most 300 ms: a flood of 300 gets about
    // 40 + 40 x (time it lasts) upgrades; the rest a 503 with Retry-After, none left hanging.
    let node = Node::start(&[
        "--echo-path",
        "/echo",
        "--accept-rate",
        "40",
        "--accept-queue",
        "300ms",
    ]);
    let started = Instant::now();
    let flood: Vec<_> = (0..300)
        .map(|_| {
            let addr = node.addr;
            std::thread::spawn(move || upgrade_status(addr))
        })
        .collect();
    let answers: Vec<(u16, String)> = flood.into_iter().map(|h| h.join().unwrap()).collect();
    let elapsed = started.elapsed();
    let ok = answers.iter().filter(|a| a.0 == 101).count();
    let refused: Vec<&(u16, String)> = answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!(
        ok + refused.len(),
        300,
        "every connection answered: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert!(!refused.is_empty(), "the flood was refused in part");
    assert!(
        refused.iter().all(|a| a.1.contains("Retry-After: 1")),
        "{}",
        refused[0].1
    );
    let allowed = 40.0 + 40.0 * elapsed.as_secs_f64();
    assert!(
        ok >= 40 && (ok as f64) <= allowed + 5.0,
        "{ok} upgrades in {elapsed:?}"
    );
    let (_, metrics) = node.get("/metrics");
    let counted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("corelay_accept_refused_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted as usize, refused.len());
    // Health checks still pass during a flood (the balancer must not take the node out for it).
    let (st, _) = node.get("/healthz");
    assert_eq!(st, 200);
}
