//! Server-Sent Events encoding (WHATWG HTML §9.2).
//!
//! An event is split in two: the shared part (`event:` and `data:` lines, encoded once per message and shared
//! by every stream) and the per-stream tail (`id:` = that stream's whole cursor, then the blank line that
//! dispatches the event). Field order inside an event does not matter to `EventSource`.

/// A comment line: keeps proxies and the client's idle timers from closing a quiet stream.
pub const KEEPALIVE: &[u8] = b":\n\n";

/// The response head of a stream. `retry_ms` tells `EventSource` how soon to reconnect.
/// `extra` header lines (without CRLF), e.g. CORS, go after the fixed ones.
pub fn encode_head(retry_ms: u64, extra: &[&str], out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nConnection: keep-alive\r\n",
    );
    for line in extra {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(format!("retry: {retry_ms}\n\n").as_bytes());
}

/// `event: NAME` and one `data:` line per line of `data` (multi-line safe: a newline inside the payload starts
/// a new `data:` line, which the client joins back with `\n`).
pub fn encode_body(event: &str, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.push(b'\n');
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
}

/// `id: CURSOR` and the blank line that ends the event.
pub fn encode_tail(cursor: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(cursor.as_bytes());
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_data() {
        let mut v = Vec::new();
        encode_body("message", b"{\"a\":1}\nsecond\r\nthird", &mut v);
        encode_tail("scores:m42=7", &mut v);
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "event: message\ndata: {\"a\":1}\ndata: second\ndata: third\nid: scores:m42=7\n\n"
        );
    }
}
