//! The L4/L7 edge with a real `haproxy` (from Debian): three nodes behind it with PROXY protocol v2, hashing
//! on the user id. Same user → same node; the node logs the real client address; removing a node remaps
//! only that node's users. Also the PROXY protocol on its own, and the ring answers.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

struct Haproxy {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts haproxy with the configuration of `tuning/haproxy.cfg`, on loopback ports.
fn haproxy(nodes: &[&Node]) -> Haproxy {
    let port = free_port();
    let dir = fresh_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let servers: String = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("    server n{i} {}\n", n.addr))
        .collect();
    let cfg = format!(
        "global\n    maxconn 4096\ndefaults\n    mode http\n    option http-server-close\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    timeout tunnel 1h\nfrontend edge\n    bind 127.0.0.1:{port}\n    default_backend corelay\nbackend corelay\n    balance url_param user\n    hash-type consistent\n    option httpchk GET /readyz\n    http-check expect status 200\n    default-server send-proxy-v2 check-send-proxy check inter 100ms fall 2 rise 1\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()
        .expect("haproxy (apt-get install haproxy)");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).is_ok()
    }));
    Haproxy { child, port, dir }
}

/// Connects `user` through the balancer; returns the node it landed on and the client's local port.
fn land(port: u16, user: &str) -> (String, u16) {
    try_land(port, user).expect("connect through haproxy")
}

/// As `land`, or None while the balancer has no healthy server for the user (503).
fn try_land(port: u16, user: &str) -> Option<(String, u16)> {
    let url = format!("ws://127.0.0.1:{port}/ws?user={user}&token={}", token(user));
    let (mut ws, _) = tungstenite::connect(url).ok()?;
    let local = match ws.get_ref() {
        tungstenite::stream::MaybeTlsStream::Plain(s) => s.local_addr().unwrap().port(),
        _ => unreachable!(),
    };
    set_timeout(&mut ws, Duration::from_secs(5));
    let w = next_json(&mut ws);
    assert_eq!(w["type"], "welcome");
    Some((w["node"].as_str()?.to_string(), local))
}

#[test]
fn haproxy_routes_users_consistently_with_proxy_protocol_v2() {
    let logs: Vec<_> = (0..3)
        .map(|i| fresh_dir().with_extension(format!("n{i}.log")))
        .collect();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            Node::start_logged(
                &["--proxy-protocol", "--node-id", &format!("n{i}")],
                &logs[i],
            )
        })
        .collect();
    let hp = haproxy(&nodes.iter().collect::<Vec<_>>());
    // Wait until every node passes its health check (haproxy sends PROXY headers on checks too).
    let users: Vec<String> = (0..40).map(|i| format!("user{i}")).collect();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let seen: Option<std::collections::HashSet<String>> = users
                .iter()
                .map(|u| try_land(hp.port, u).map(|l| l.0))
                .collect();
            seen.is_some_and(|s| s.len() == 3)
        }),
        "users spread over all three nodes"
    );

    let first: HashMap<&str, String> = users
        .iter()
        .map(|u| (u.as_str(), land(hp.port, u).0))
        .collect();
    for u in &users {
        assert_eq!(
            land(hp.port, u).0,
            first[u.as_str()],
            "{u} lands on the same node every time"
        );
    }

    // The node logs the client's real address (the balancer's PROXY header), not the balancer's.
    let (node, client_port) = land(hp.port, "user0");
    let idx: usize = node[1..].parse().unwrap();
    let needle = format!("client=127.0.0.1:{client_port}");
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(
            &logs[idx]
        )
        .unwrap_or_default()
        .contains(&needle)),
        "node {node} logged {needle}"
    );

    // Remove n2: only n2's users move.
    nodes[2].kill9();
    assert!(wait_until(Duration::from_secs(10), || users
        .iter()
        .all(|u| try_land(hp.port, u).is_some_and(|l| l.0 != "n2"))));
    for u in &users {
        let now = land(hp.port, u).0;
        if first[u.as_str()] != "n2" {
            assert_eq!(
                now,
                first[u.as_str()],
                "{u} was not on the removed node and must not move"
            );
        }
    }
    for l in &logs {
        let _ = std::fs::remove_file(l);
    }
}

#[test]
fn proxy_protocol_v1_and_v2_give_the_client_address_and_bad_headers_are_refused() {
    let log = fresh_dir().with_extension("proxy.log");
    let node = Node::start_logged(&["--proxy-protocol", "--ring-nodes", "n0,n1,n2"], &log);
    let src: std::net::SocketAddr = "203.0.113.7:41234".parse().unwrap();
    let dst: std::net::SocketAddr = "198.51.100.1:443".parse().unwrap();
    for header in [
        corelay_proto::proxy::encode_v1(src, dst),
        corelay_proto::proxy::encode_v2(src, dst),
    ] {
        let mut s = std::net::TcpStream::connect(node.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = header;
        req.extend_from_slice(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
        s.write_all(&req).unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("client=203.0.113.7:41234")
            .count()
            == 2
    }));
    // A connection without the header is closed without an answer.
    let (status, text) = http(
        node.addr,
        "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((status, text.as_str()), (0, ""));
    // The ring, over HTTP and on the command line, agrees.
    let mut ring_req = corelay_proto::proxy::encode_v1(src, dst);
    ring_req.extend_from_slice(
        format!("GET /api/route?user=alice HTTP/1.1\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let mut s = std::net::TcpStream::connect(node.addr).unwrap();
    s.write_all(&ring_req).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    let body: serde_json::Value =
        serde_json::from_str(&out[out.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    let cli = Command::new(env!("CARGO_BIN_EXE_corelay"))
        .args(["route", "--nodes", "n0,n1,n2", "--user", "alice"])
        .output()
        .unwrap();
    let line = String::from_utf8(cli.stdout).unwrap();
    assert_eq!(
        line.trim(),
        format!("alice {}", body["node"].as_str().unwrap())
    );
    let _ = std::fs::remove_file(&log);
}
