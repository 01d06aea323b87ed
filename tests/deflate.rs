//! permessage-deflate (RFC 7692) over real sockets. tungstenite 0.30 has no deflate, so the client here is
//! written by hand: raw upgrade requests with `Sec-WebSocket-Extensions` offers, frames compressed and
//! inflated with flate2 directly (raw DEFLATE, sync flush, the `00 00 ff ff` tail stripped and put back).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::json;
use support::*;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
const OFFER: &str = "permessage-deflate; client_max_window_bits";
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Upgrades on `path` offering `extensions` (none: no header); the socket and the response head.
fn upgrade(node: &Node, path: &str, extensions: Option<&str>, chat: bool) -> (TcpStream, String) {
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(e) = extensions {
        req.push_str(&format!("Sec-WebSocket-Extensions: {e}\r\n"));
    }
    if chat {
        req.push_str("Sec-WebSocket-Protocol: corelay.v1\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}

/// The `Sec-WebSocket-Extensions` value of a response head, if any.
fn extensions(head: &str) -> Option<&str> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim())
    })
}

/// A masked client frame with first byte `b0` (FIN, RSV, opcode as given).
fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = frame(true, 0, payload, Some(MASK));
    f[0] = b0;
    f
}

/// One message body the way a permessage-deflate sender makes it, with a `bits` window.
fn compress(data: &[u8], bits: u8) -> Vec<u8> {
    let mut z = Compress::new_with_window_bits(Compression::default(), false, bits);
    let mut out = Vec::with_capacity(data.len() + 64);
    z.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&TAIL), "sync flush");
    out.truncate(out.len() - 4);
    out
}

/// Inflates a received message body (`bits`: the window the sender announced).
fn inflate(body: &[u8], bits: u8) -> Vec<u8> {
    let mut z = Decompress::new_with_window_bits(false, bits);
    let mut input = body.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(1 << 20);
    z.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    assert_eq!(z.total_in() as usize, input.len(), "all input used");
    out
}

/// Reads one server frame (unmasked): its first byte and payload.
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (h[0], p)
}

fn json_text(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| format!("{{\"i\":{i},\"body\":\"the quick brown fox\"}}"))
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes()
}

#[test]
fn negotiated_echo_roundtrip() {
    let node = Node::start(&["--echo-path", "/echo"]);
    let (mut s, head) = upgrade(&node, "/echo", Some(OFFER), false);
    assert_eq!(extensions(&head), Some(ANSWER), "{head}");

    // A compressed text message comes back compressed (RSV1), and inflates to what was sent.
    let text = json_text(40);
    s.write_all(&client_frame(0xC1, &compress(&text, 15)))
        .unwrap();
    let (b0, body) = read_frame(&mut s);
    assert_eq!(b0, 0xC1, "FIN + RSV1 + text");
    assert!(body.len() < text.len() / 3);
    assert_eq!(inflate(&body, 15), text);

    // Binary, fragmented: RSV1 on the first fragment only.
    let bin: Vec<u8> = (0..3000u32).flat_map(|i| (i % 7).to_le_bytes()).collect();
    let c = compress(&bin, 15);
    let (a, b) = c.split_at(c.len() / 2);
    let mut first = client_frame(0x42, a);
    first.extend(client_frame(0x80, b));
    s.write_all(&first).unwrap();
    let (b0, body) = read_frame(&mut s);
    assert_eq!(b0, 0xC2);
    assert_eq!(inflate(&body, 15), bin);

    // A plain message on the same connection, and a short one: both answered plain.
    s.write_all(&client_frame(0x81, b"hi")).unwrap();
    assert_eq!(read_frame(&mut s), (0x81, b"hi".to_vec()));
    s.write_all(&client_frame(0xC1, &compress(b"short", 15)))
        .unwrap();
    assert_eq!(read_frame(&mut s), (0x81, b"short".to_vec()));

    // RSV1 on a control frame is a protocol error.
    s.write_all(&client_frame(0xC9, b"")).unwrap();
    assert_eq!(read_close_code(&mut s), Some(1002));
}

#[test]
fn server_max_window_bits_is_honoured() {
    let node = Node::start(&["--echo-path", "/echo"]);
    let (mut s, head) = upgrade(
        &node,
        "/echo",
        Some("permessage-deflate; server_max_window_bits=9; client_max_window_bits=10"),
        false,
    );
    assert_eq!(
        extensions(&head),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"
        )
    );
    // 700 pseudo-random letters, 20 times: a 15-bit window refers 700 bytes back, a 9-bit one cannot.
    let mut x = 12345u32;
    let block: Vec<u8> = (0..700)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            b'a' + (x >> 16) as u8 % 26
        })
        .collect();
    let text = block.repeat(20);
    // zlib does not police distances on inflate (any within the history it holds pass), so the window is
    // checked on the bytes: the server's output is what zlib makes with a 9-bit window at level 6 (the
    // gateway's level), which differs from the 15-bit one on this data.
    assert_ne!(compress(&text, 9), compress(&text, 15));
    s.write_all(&client_frame(0xC1, &compress(&text, 10)))
        .unwrap();
    let (b0, body) = read_frame(&mut s);
    assert_eq!(b0, 0xC1);
    assert_eq!(body, compress(&text, 9));
    assert_eq!(inflate(&body, 9), text);
}

#[test]
fn bad_offers_are_declined_and_rsv1_stays_an_error() {
    let node = Node::start(&["--echo-path", "/echo"]);
    for offer in [
        "permessage-deflate; mystery",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; server_max_window_bits=8",
        "permessage-deflate; client_max_window_bits=99",
        "x-webkit-deflate-frame",
        ";;\"",
    ] {
        let (mut s, head) = upgrade(&node, "/echo", Some(offer), false);
        assert_eq!(extensions(&head), None, "{offer}: {head}");
        // Not negotiated: a compressed frame is a protocol error, as before.
        s.write_all(&client_frame(0xC1, &compress(b"Hello", 15)))
            .unwrap();
        assert_eq!(read_close_code(&mut s), Some(1002), "{offer}");
    }
    // A bad first offer, a good second one: the second is taken.
    let (_, head) = upgrade(
        &node,
        "/echo",
        Some("permessage-deflate; mystery, permessage-deflate"),
        false,
    );
    assert_eq!(extensions(&head), Some(ANSWER));

    // Turned off: never negotiated.
    let off = Node::start(&["--echo-path", "/echo", "--ws-deflate", "off"]);
    let (_, head) = upgrade(&off, "/echo", Some(OFFER), false);
    assert_eq!(extensions(&head), None, "{head}");
}

#[test]
fn chat_delivery_is_compressed_once_and_shared() {
    let node = Node::start(&[]);
    let ch = "scores:deflate";
    let mut socks = Vec::new();
    // Enough clients that both loops (--threads 2) have some.
    for i in 0..4 {
        let path = format!("/ws?token={}", token(&format!("fan{i}")));
        let (mut s, head) = upgrade(&node, &path, Some(OFFER), true);
        assert_eq!(extensions(&head), Some(ANSWER));
        let (b0, welcome) = read_frame(&mut s);
        assert_eq!(b0 & 0x70, 0, "the welcome goes plain");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&welcome).unwrap()["type"],
            "welcome"
        );
        let sub = json!({"type":"subscribe","channels":[ch]}).to_string();
        s.write_all(&client_frame(0x81, sub.as_bytes())).unwrap();
        let (b0, ans) = read_frame(&mut s);
        let ans = if b0 & 0x40 != 0 {
            inflate(&ans, 15)
        } else {
            ans
        };
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&ans).unwrap()["type"],
            "subscribed"
        );
        socks.push(s);
    }
    let mut plain = connect(&node, "plainfan");
    send_json(&mut plain, json!({"type":"subscribe","channels":[ch]}));
    assert_eq!(next_json(&mut plain)["type"], "subscribed");

    let body = json!({"text": "a goal! ".repeat(40), "minute": 90});
    node.publish(ch, body.clone());
    let frames: Vec<(u8, Vec<u8>)> = socks.iter_mut().map(read_frame).collect();
    for f in &frames {
        assert_eq!(f.0, 0xC1, "compressed text frame");
        assert_eq!(f, &frames[0], "byte-identical for every subscriber");
    }
    let m: serde_json::Value = serde_json::from_slice(&inflate(&frames[0].1, 15)).unwrap();
    assert_eq!(m["channel"], ch);
    assert_eq!(m["body"], body);
    // The client without deflate gets the same message plain.
    let p = next_json(&mut plain);
    assert_eq!(p, m);

    // A message under ws_deflate_min_bytes goes plain to deflate subscribers.
    node.publish(ch, json!(1));
    for s in &mut socks {
        let (b0, p) = read_frame(s);
        assert_eq!(b0, 0x81);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&p).unwrap()["body"],
            1
        );
    }
}

#[test]
fn zip_bomb_is_closed_with_1009_and_others_are_unaffected() {
    let node = Node::start(&["--echo-path", "/echo", "--max-message-bytes", "64KiB"]);
    let (mut other, _) = upgrade(&node, "/echo", Some(OFFER), false);
    let text = json_text(100);
    let echo = |s: &mut TcpStream| {
        s.write_all(&client_frame(0xC1, &compress(&text, 15)))
            .unwrap();
        let (b0, body) = read_frame(s);
        assert_eq!(b0, 0xC1);
        assert_eq!(inflate(&body, 15), text);
    };
    echo(&mut other);

    // 32 MiB of zeros compress to ~32 KiB: within the frame limit, 512 times the message limit once inflated.
    let bomb = compress(&vec![0u8; 32 << 20], 15);
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let (mut s, _) = upgrade(&node, "/echo", Some(OFFER), false);
    s.write_all(&client_frame(0xC2, &bomb)).unwrap();
    assert_eq!(read_close_code(&mut s), Some(1009));

    // Corrupt DEFLATE data (BTYPE 11) and invalid UTF-8 inside a compressed text message: 1007.
    let (mut s, _) = upgrade(&node, "/echo", Some(OFFER), false);
    s.write_all(&client_frame(0xC1, &[0xff, 0xff, 0xff]))
        .unwrap();
    assert_eq!(read_close_code(&mut s), Some(1007));
    let (mut s, _) = upgrade(&node, "/echo", Some(OFFER), false);
    s.write_all(&client_frame(0xC1, &compress(&[0xC0; 200], 15)))
        .unwrap();
    assert_eq!(read_close_code(&mut s), Some(1007));

    // The other client never noticed.
    echo(&mut other);
    echo(&mut other);
}

#[test]
fn takeover_mode_keeps_a_context_per_connection_and_a_client_window_reads_it() {
    // --ws-deflate takeover: a client that does not refuse it gets an answer without
    // server_no_context_takeover, and every compressed message after the first may refer back to earlier
    // ones; a client that keeps its window (one Decompress for the connection) reads them all, and similar
    // messages come out much smaller than alone. A client that refuses takeover keeps the shared frames.
    let node = Node::start(&["--ws-deflate", "takeover"]);
    let ch = "scores:takeover";
    let path = format!("/ws?token={}", token("keeper"));
    let (mut s, head) = upgrade(&node, &path, Some("permessage-deflate"), true);
    assert_eq!(
        extensions(&head),
        Some("permessage-deflate; client_no_context_takeover")
    );
    let path = format!("/ws?token={}", token("refuser"));
    let (mut r, head) = upgrade(
        &node,
        &path,
        Some("permessage-deflate; server_no_context_takeover"),
        true,
    );
    assert_eq!(extensions(&head), Some(ANSWER));
    let mut window = Decompress::new(false);
    let mut read_in_window = |s: &mut TcpStream| -> (u8, Vec<u8>) {
        let (b0, body) = read_frame(s);
        if b0 & 0x40 == 0 {
            return (b0, body);
        }
        let mut input = body.clone();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(1 << 16);
        window
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        (b0, out)
    };
    let sub = json!({"type":"subscribe","channels":[ch]}).to_string();
    for sock in [&mut s, &mut r] {
        let (_, welcome) = read_frame(sock);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&welcome).unwrap()["type"],
            "welcome"
        );
        sock.write_all(&client_frame(0x81, sub.as_bytes())).unwrap();
    }
    let (_, ans) = read_in_window(&mut s);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&ans).unwrap()["type"],
        "subscribed"
    );
    let (b0, ans) = read_frame(&mut r);
    let ans = if b0 & 0x40 != 0 {
        inflate(&ans, 15)
    } else {
        ans
    };
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&ans).unwrap()["type"],
        "subscribed"
    );
    let mut kept = Vec::new();
    let mut alone = Vec::new();
    for i in 0..5 {
        let body = json!({"text": format!("standup moved to 10:{i}0, same room, bring the release notes"), "minute": i});
        node.publish(ch, body.clone());
        let (b0, raw) = read_frame(&mut s);
        assert_eq!(b0, 0xC1, "compressed");
        kept.push(raw.len());
        let mut input = raw.clone();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(1 << 16);
        window
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        let m: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(m["body"], body);
        let (b0, shared) = read_frame(&mut r);
        assert_eq!(b0, 0xC1);
        alone.push(shared.len());
        let m2: serde_json::Value = serde_json::from_slice(&inflate(&shared, 15)).unwrap();
        assert_eq!(m2["body"], body);
    }
    // After the first, the connection's own context makes each message much smaller than on its own.
    for i in 1..5 {
        assert!(
            kept[i] * 2 < alone[i],
            "with context {kept:?}, without {alone:?}"
        );
    }
}
