//! HTTP hygiene over real sockets: request smuggling (GET/HEAD with a body), HEAD without a body, one Origin
//! check on every browser endpoint, and client numbers that must not overflow.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;
use support::*;

/// A raw connection with a read timeout.
fn raw(node: &Node) -> TcpStream {
    let s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Everything the server sends until it closes. Panics if it keeps the connection open (read timeout).
fn read_to_close(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        // Closed with unread input: still closed, and what came before the reset is in `buf`.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "the connection stayed open ({e}) after {:?}",
            String::from_utf8_lossy(&buf)
        ),
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The value of header `name` in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

const NEXT: &str = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

#[test]
fn get_and_head_with_a_body_get_400_and_the_connection_closes() {
    let node = Node::start(&[]);
    for first in [
        "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        "GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "HEAD /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        // A body that is itself a request: the classic smuggling payload.
        "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 34\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = raw(&node);
        s.write_all(format!("{first}{NEXT}").as_bytes()).unwrap();
        let text = read_to_close(&mut s);
        assert!(
            text.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{first:?} → {text}"
        );
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert_eq!(
            text.matches("HTTP/1.1 ").count(),
            1,
            "nothing after the 400 is answered: {first:?} → {text}"
        );
    }
    // An empty body is no body.
    let mut s = raw(&node);
    s.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(read_to_close(&mut s).starts_with("HTTP/1.1 200 OK\r\n"));
    // The server still serves.
    assert_eq!(node.get("/healthz").0, 200);
}

#[test]
fn head_answers_have_the_get_head_and_no_body() {
    let node = Node::start(&[]);
    for path in ["/metrics", "/healthz", "/readyz", "/nowhere"] {
        // HEAD, then a pipelined GET on the same connection: the bytes after the HEAD's head must be exactly
        // the GET's answer (a body left in between would be read as the start of the next answer).
        let mut s = raw(&node);
        write!(
            s,
            "HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let head = read_head(&mut s);
        let (_, get_body) = node.get(path);
        assert_eq!(
            status_of(&head),
            if path == "/nowhere" { 404 } else { 200 },
            "{head}"
        );
        let len: usize = header(&head, "Content-Length")
            .unwrap_or_else(|| panic!("HEAD {path} has a Content-Length: {head}"))
            .parse()
            .unwrap();
        assert!(len > 0, "HEAD {path} announces GET's body length: {head}");
        if path != "/metrics" {
            assert_eq!(len, get_body.len(), "HEAD {path}: same length as GET");
        }
        let rest = read_to_close(&mut s);
        assert!(
            rest.starts_with("HTTP/1.1 200 OK\r\n"),
            "HEAD {path}: after its head comes the next answer, not a body: {rest:?}"
        );
        assert!(rest.ends_with("\r\n\r\nok\n"), "{rest:?}");
    }

    // A refused HEAD has no body either (it closes the connection).
    for (path, status) in [("/send", 405), ("/sse", 405), ("/poll", 405), ("/ws", 405)] {
        let mut s = raw(&node);
        write!(
            s,
            "HEAD {path}?token={} HTTP/1.1\r\nHost: x\r\n\r\n",
            token("h")
        )
        .unwrap();
        let head = read_head(&mut s);
        assert_eq!(status_of(&head), status, "HEAD {path}: {head}");
        assert!(
            header(&head, "Content-Length").is_some_and(|l| l != "0"),
            "{head}"
        );
        assert_eq!(read_to_close(&mut s), "", "HEAD {path}: no body");
    }
}

/// A request to a browser endpoint from `origin`; the status of the answer.
fn status_from(node: &Node, endpoint: &str, origin: &str) -> u16 {
    let t = token("web");
    let request = match endpoint {
        "/ws" => format!(
            "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ),
        "/sse" => format!(
            "GET /sse?channels=scores:c&token={t} HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\r\n"
        ),
        "/poll" => format!(
            "GET /poll?channels=scores:c&timeout=0&token={t} HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\r\n"
        ),
        "/send" => {
            let body =
                json!({"type":"send","conversation":"c1","client_id":"p1","body":"hi"}).to_string();
            format!(
                "POST /send HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAuthorization: Bearer {t}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        }
        _ => unreachable!(),
    };
    let mut s = raw(node);
    s.write_all(request.as_bytes()).unwrap();
    status_of(&read_head(&mut s))
}

#[test]
fn every_browser_endpoint_refuses_a_foreign_origin() {
    let node = Node::start(&["--allowed-origin", "https://app.example"]);
    assert_eq!(node.create_conversation("c1", &["web", "bob"]), 201);
    for endpoint in ["/ws", "/sse", "/poll", "/send"] {
        assert_eq!(
            status_from(&node, endpoint, "https://evil.example"),
            403,
            "{endpoint} from a foreign origin"
        );
        let ok = status_from(&node, endpoint, "https://app.example");
        assert!(
            matches!(ok, 101 | 200),
            "{endpoint} from the allowed origin: {ok}"
        );
    }
}

#[test]
fn a_huge_poll_timeout_is_capped_and_the_server_keeps_serving() {
    let node = Node::start(&["--max-poll-timeout", "1s"]);
    let t = token("p");
    // On one keep-alive connection: a poll asking for u64::MAX seconds is held for the cap (1 s) and answered
    // 204, and the next request on the connection is served.
    let mut s = raw(&node);
    write!(
        s,
        "GET /poll?channels=dash:cpu&cursor=dash:cpu=0&timeout=18446744073709551615&token={t} HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    let started = std::time::Instant::now();
    let head = read_head(&mut s);
    assert_eq!(status_of(&head), 204, "{head}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "held for the cap, not forever"
    );
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert!(read_to_close(&mut s).starts_with("HTTP/1.1 200 OK\r\n"));

    // A number past u64 is no number of seconds: 400 with the reason.
    let (st, text) = node.get(&format!(
        "/poll?channels=dash:cpu&timeout=18446744073709551616&token={t}"
    ));
    assert_eq!(st, 400, "{text}");
    assert!(text.contains("timeout= is whole seconds"), "{text}");

    // History numbers past u64 are refused too, and a huge limit is fine.
    assert_eq!(node.create_conversation("c1", &["p"]), 201);
    let api = |q: &str| {
        http(
            node.addr,
            &format!(
                "GET /api/history?conversation=c1&{q} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
            ),
        )
        .0
    };
    assert_eq!(api("limit=18446744073709551616"), 400);
    assert_eq!(
        api("limit=18446744073709551615&before=18446744073709551615"),
        200
    );
    assert_eq!(node.get("/healthz").0, 200);
}
