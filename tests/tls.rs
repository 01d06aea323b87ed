//! TLS on the loops (`--tls-listen`), against independent peers: tungstenite over a rustls client for
//! `wss://`, curl for `https://` SSE and polls. Certificates are made per test with rcgen (ECDSA P-256).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::json;
use support::*;
use tungstenite::Message;

/// A CA and a server certificate it signed, as PEM files in `dir`.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca_der: CertificateDer<'static>,
}

fn make_certs(dir: &Path, tag: &str, expired: bool) -> Certs {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("corelay test CA {tag}"));
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, &ca).unwrap();
    let c = Certs {
        ca: dir.join(format!("ca-{tag}.pem")),
        cert: dir.join(format!("cert-{tag}.pem")),
        key: dir.join(format!("key-{tag}.pem")),
        ca_der: ca.der().clone(),
    };
    std::fs::write(&c.ca, ca.pem()).unwrap();
    std::fs::write(&c.cert, cert.pem()).unwrap();
    std::fs::write(&c.key, key.serialize_pem()).unwrap();
    c
}

fn start_tls(certs: &Certs, extra: &[&str]) -> Node {
    let mut args = vec![
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        certs.cert.to_str().unwrap(),
        "--tls-key",
        certs.key.to_str().unwrap(),
        "--echo-path",
        "/echo",
    ];
    args.extend_from_slice(extra);
    Node::start(&args)
}

fn client_config(
    ca: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection, handshake completed; `preface` is written in the clear first (a PROXY header).
fn tls_connect(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    host: &str,
    preface: &[u8],
) -> std::io::Result<Tls> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.write_all(preface)?;
    let name = ServerName::try_from(host.to_string()).unwrap();
    let mut conn = ClientConnection::new(cfg.clone(), name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(StreamOwned::new(conn, tcp))
}

type Wss = tungstenite::WebSocket<Tls>;

fn wss(addr: SocketAddr, cfg: &Arc<ClientConfig>, path: &str) -> Wss {
    let tls = tls_connect(addr, cfg, "localhost", b"").expect("TLS handshake");
    let url = format!("wss://localhost:{}{path}", addr.port());
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    if path.starts_with("/ws") {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "corelay.v1".parse().unwrap());
    }
    let (ws, resp) = tungstenite::client(req, tls).expect("websocket over TLS");
    assert_eq!(resp.status(), 101);
    ws
}

fn next(ws: &mut Wss) -> serde_json::Value {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            m => panic!("unexpected {m:?}"),
        }
    }
}

fn metric(node: &Node, name: &str) -> u64 {
    let (_, body) = node.get("/metrics");
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn chat_over_wss_with_tls13_and_tls12_meets_plain_websocket() {
    let dir = fresh_dir();
    let certs = make_certs(&dir, "a", false);
    let node = start_tls(&certs, &[]);
    let tls_addr = node.tls_addr.unwrap();
    assert_eq!(
        node.create_conversation("c1", &["alice", "bob", "carol"]),
        201
    );
    let tls13 = client_config(&certs.ca_der, &[&rustls::version::TLS13]);
    let tls12 = client_config(&certs.ca_der, &[&rustls::version::TLS12]);

    let mut alice = wss(tls_addr, &tls13, &format!("/ws?token={}", token("alice")));
    assert_eq!(next(&mut alice)["type"], "welcome");
    assert_eq!(
        alice.get_ref().conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let mut bob = wss(tls_addr, &tls12, &format!("/ws?token={}", token("bob")));
    assert_eq!(next(&mut bob)["type"], "welcome");
    assert_eq!(
        bob.get_ref().conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(bob.get_ref().conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    // carol on the plain listener: one gateway, two listeners.
    let mut carol = connect(&node, "carol");

    alice
        .send(Message::text(
            json!({"type":"send","conversation":"c1","client_id":"m1","body":"over TLS"})
                .to_string(),
        ))
        .unwrap();
    let m = next(&mut bob);
    assert_eq!(
        (m["type"].as_str(), m["body"].as_str()),
        (Some("message"), Some("over TLS"))
    );
    let m = next_json(&mut carol);
    assert_eq!(
        (m["type"].as_str(), m["from"].as_str()),
        (Some("message"), Some("alice"))
    );
    send_json(
        &mut carol,
        json!({"type":"send","conversation":"c1","client_id":"m2","body":"back in the clear"}),
    );
    loop {
        let m = next(&mut bob);
        if m["type"] == "message" && m["offset"] == 2 {
            assert_eq!(m["body"], "back in the clear");
            break;
        }
    }
    assert!(metric(&node, "corelay_tls_handshakes_total") >= 2);
}

#[test]
fn large_echoes_over_wss_arrive_whole_and_in_order() {
    // Messages far over one TLS record and over the per-connection ciphertext budget (64 KiB): the
    // encryptor must hand them out in slices, in order, while the client reads slowly.
    let dir = fresh_dir();
    let certs = make_certs(&dir, "a", false);
    let node = start_tls(
        &certs,
        &[
            "--max-message-bytes",
            "4MiB",
            "--max-frame-bytes",
            "4MiB",
            "--max-write-queue-bytes",
            "16MiB",
        ],
    );
    let cfg = client_config(&certs.ca_der, &[&rustls::version::TLS13]);
    let mut ws = wss(node.tls_addr.unwrap(), &cfg, "/echo");
    let sizes = [
        1usize,
        125,
        16 * 1024 - 3,
        16 * 1024 + 1,
        200_000,
        3_000_000,
    ];
    for (i, &n) in sizes.iter().enumerate() {
        let payload: Vec<u8> = (0..n).map(|k| (k * 31 + i) as u8).collect();
        ws.send(Message::binary(payload)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300)); // let the server fill its socket buffer
    for (i, &n) in sizes.iter().enumerate() {
        match ws.read().unwrap() {
            Message::Binary(b) => {
                assert_eq!(b.len(), n);
                assert!(
                    b.iter().enumerate().all(|(k, &v)| v == (k * 31 + i) as u8),
                    "message {i} corrupted"
                );
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "done".into(),
    }))
    .unwrap();
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(1000));
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("close: {e}"),
        }
    }
}

fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl (apt-get install curl)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn curl_reads_sse_and_polls_over_https() {
    let dir = fresh_dir();
    let certs = make_certs(&dir, "a", false);
    let node = start_tls(&certs, &[]);
    let port = node.tls_addr.unwrap().port();
    let ca = certs.ca.to_str().unwrap();
    let t = token("dana");
    let sse = Sse::open_url(
        &format!("https://localhost:{port}/sse?channels=scores:m1&token={t}"),
        &["--cacert", ca],
        None,
    );
    assert_eq!(sse.status(), 200);
    let offset = node.publish("scores:m1", json!({"goal": 1}));
    let ev = sse.next_event(Duration::from_secs(5));
    assert!(ev.data.contains("\"goal\":1"), "{ev:?}");
    assert!(ev.id.unwrap().contains(&format!("scores:m1={offset}")));

    // A long poll from the cursor before the message answers at once with it; TLS 1.2 this time.
    let (code, out) = curl(&[
        "--cacert",
        ca,
        "--tls-max",
        "1.2",
        &format!(
            "https://localhost:{port}/poll?channels=scores:m1&cursor=scores:m1=0&timeout=5&token={t}"
        ),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"goal\":1"), "{out}");
    // Keep-alive over TLS: two requests on one connection.
    let (code, out) = curl(&[
        "--cacert",
        ca,
        "-w",
        "%{num_connects} ",
        &format!("https://localhost:{port}/healthz"),
        &format!("https://localhost:{port}/healthz"),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok") && out.contains("1 ") && out.contains("0 "),
        "one connection reused: {out}"
    );
}

#[test]
fn clients_refuse_a_wrong_host_an_expired_certificate_and_an_unknown_ca() {
    let dir = fresh_dir();
    let good = make_certs(&dir, "good", false);
    let expired = make_certs(&dir, "old", true);
    let node = start_tls(&good, &[]);
    let port = node.tls_addr.unwrap().port();
    let ca = good.ca.to_str().unwrap();
    // The right name and CA: accepted.
    let (code, out) = curl(&["--cacert", ca, &format!("https://localhost:{port}/healthz")]);
    assert_eq!((code, out.trim()), (0, "ok"));
    // A name the certificate does not carry: curl refuses (60: peer certificate cannot be authenticated).
    let (code, out) = curl(&[
        "--cacert",
        ca,
        "--resolve",
        &format!("wrong.example:{port}:127.0.0.1"),
        &format!("https://wrong.example:{port}/healthz"),
    ]);
    assert_eq!(code, 60, "{out}");
    // Another CA: refused, by curl and by rustls.
    refused_by_curl_and_rustls(node.tls_addr.unwrap(), &expired, "UnknownIssuer");

    // A gateway serving an expired certificate: clients refuse it.
    let old = start_tls(&expired, &[]);
    refused_by_curl_and_rustls(old.tls_addr.unwrap(), &expired, "expired");
}

/// curl (exit 60: the peer's certificate cannot be authenticated) and a rustls client, both trusting `trust`'s
/// CA, refuse the gateway at `addr`; rustls says `why`.
fn refused_by_curl_and_rustls(addr: SocketAddr, trust: &Certs, why: &str) {
    let (code, out) = curl(&[
        "--cacert",
        trust.ca.to_str().unwrap(),
        &format!("https://localhost:{}/healthz", addr.port()),
    ]);
    assert_eq!(code, 60, "{out}");
    let cfg = client_config(&trust.ca_der, &[&rustls::version::TLS13]);
    let err = tls_connect(addr, &cfg, "localhost", b"").expect_err("refused");
    assert!(err.to_string().contains(why), "{err}");
}

#[test]
fn plain_http_and_garbage_on_the_tls_port_are_closed_cleanly() {
    let dir = fresh_dir();
    let certs = make_certs(&dir, "a", false);
    let node = start_tls(&certs, &[]);
    let tls_addr = node.tls_addr.unwrap();
    // Plain HTTP: a plain-text 400 that says why, then the close.
    let (status, text) = http(tls_addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("This port speaks TLS"), "{text}");
    // Garbage: closed without a word.
    let mut s = TcpStream::connect(tls_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0x00, 0xff, 0x13, 0x37, 0x42, 0x00, 0x01])
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "{buf:?}");
    // A handshake record holding a truncated ClientHello: a TLS alert (content type 21, decode_error), then
    // the close.
    let mut s = TcpStream::connect(tls_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00])
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert_eq!(buf, [21, 3, 3, 0, 2, 2, 50], "a fatal decode_error alert");
    // A client offering only h2: no common protocol (ALPN), refused with an alert.
    let mut roots = RootCertStore::empty();
    roots.add(certs.ca_der.clone()).unwrap();
    let mut h2 =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    let err = tls_connect(tls_addr, &Arc::new(h2), "localhost", b"").expect_err("refused");
    assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");
    // The gateway is fine, and counted the failures.
    let cfg = client_config(&certs.ca_der, &[&rustls::version::TLS13]);
    let mut ws = wss(tls_addr, &cfg, "/echo");
    ws.send(Message::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("still here"));
    assert!(metric(&node, "corelay_tls_failures_total") >= 4);
}

#[test]
fn a_slow_handshake_is_cut_at_the_handshake_deadline() {
    let dir = fresh_dir();
    let certs = make_certs(&dir, "a", false);
    let node = start_tls(&certs, &["--handshake-timeout", "1s"]);
    // Slowloris: the first bytes of a ClientHello, then nothing.
    let mut s = TcpStream::connect(node.tls_addr.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // A TCP connection that sends nothing at all is cut too.
    let mut s = TcpStream::connect(node.tls_addr.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
}

#[test]
fn sessions_resume_with_tickets() {
    let dir = fresh_dir();
    let certs = make_certs(&dir, "a", false);
    let node = start_tls(&certs, &[]);
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // One client config = one session cache: the second connection resumes.
        let cfg = client_config(&certs.ca_der, &[version]);
        let mut first = tls_connect(node.tls_addr.unwrap(), &cfg, "localhost", b"").unwrap();
        assert_eq!(
            first.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        // TLS 1.3 tickets arrive after the handshake: read them with a request.
        first
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = first.read_to_string(&mut text);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let mut second = tls_connect(node.tls_addr.unwrap(), &cfg, "localhost", b"").unwrap();
        assert_eq!(
            second.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{version:?}"
        );
        // A request before the drop, so that the gateway has read the client's Finished (a close with
        // unread tickets in the client's socket is a reset that can overtake it).
        second
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = second.read_to_string(&mut text);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    assert_eq!(metric(&node, "corelay_tls_resumed_total"), 2);
}

#[test]
fn proxy_protocol_in_front_of_tls() {
    let dir = fresh_dir();
    let certs = make_certs(&dir, "a", false);
    let node = start_tls(&certs, &["--proxy-protocol"]);
    let cfg = client_config(&certs.ca_der, &[&rustls::version::TLS13]);
    let mut tls = tls_connect(
        node.tls_addr.unwrap(),
        &cfg,
        "localhost",
        b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n",
    )
    .expect("TLS after the PROXY header");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = tls.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // Without the header the connection is refused.
    let err = tls_connect(node.tls_addr.unwrap(), &cfg, "localhost", b"").err();
    assert!(err.is_some(), "a TLS hello is not a PROXY header");
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let dir = fresh_dir();
    let first = make_certs(&dir, "one", false);
    let second = make_certs(&dir, "two", false);
    // The gateway reads the files it was started with: copy the first pair there.
    let cert = dir.join("live-cert.pem");
    let key = dir.join("live-key.pem");
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let live = Certs {
        ca: first.ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
        ca_der: first.ca_der.clone(),
    };
    let node = start_tls(&live, &[]);
    let tls_addr = node.tls_addr.unwrap();
    let old_cfg = client_config(&first.ca_der, &[&rustls::version::TLS13]);
    let new_cfg = client_config(&second.ca_der, &[&rustls::version::TLS13]);

    // Connections open, and under load, while the certificate changes: a thread echoes on ten of them
    // without pause through the reloads.
    let mut open: Vec<Wss> = (0..20).map(|_| wss(tls_addr, &old_cfg, "/echo")).collect();
    let busy: Vec<Wss> = open.drain(..10).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut busy = busy;
            let mut echoed = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, ws) in busy.iter_mut().enumerate() {
                    let text = format!("load {i} {echoed}");
                    ws.send(Message::text(text.clone()))
                        .expect("send under reload");
                    assert_eq!(ws.read().expect("echo under reload"), Message::text(text));
                    echoed += 1;
                }
            }
            echoed
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    std::fs::copy(&second.cert, &cert).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    let pid = node.child.id().to_string();
    for _ in 0..3 {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let reloaded = wait_until(Duration::from_secs(5), || {
        tls_connect(tls_addr, &new_cfg, "localhost", b"").is_ok()
    });
    assert!(reloaded, "new connections get the new certificate");
    // A client without a session to resume (tickets outlive a reload) no longer trusts the gateway.
    let fresh_old = client_config(&first.ca_der, &[&rustls::version::TLS13]);
    assert!(tls_connect(tls_addr, &fresh_old, "localhost", b"").is_err());
    for (i, ws) in open.iter_mut().enumerate() {
        let text = format!("still open {i}");
        ws.send(Message::text(text.clone())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(text));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let echoed = load.join().expect("no connection dropped under reload");
    assert!(echoed > 100, "load ran: {echoed}");
    // A broken file: the reload fails, the running certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    let fresh_new = client_config(&second.ca_der, &[&rustls::version::TLS13]);
    assert!(tls_connect(tls_addr, &fresh_new, "localhost", b"").is_ok());
}
