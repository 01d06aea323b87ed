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

/// `event: NAME` and one `data:` line per line of `data` (multi-line safe: a line break inside the payload
/// starts a new `data:` line, which the client joins back with `\n`).
pub fn encode_body(event: &str, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.push(b'\n');
    each_line(data, |line| {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    });
}

/// Calls `f` with each line of `data`, split where `EventSource` splits a stream: at CRLF, LF and a bare CR
/// (WHATWG HTML §9.2.5). Splitting at LF alone would leave a bare CR inside a `data:` line; the browser ends
/// the line there and reads the rest as a field of its own, and that part of the payload is lost. A trailing
/// break gives a last, empty line, so the client's join restores it.
fn each_line(data: &[u8], mut f: impl FnMut(&[u8])) {
    let mut rest = data;
    while let Some(i) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
        f(&rest[..i]);
        let crlf = rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n');
        rest = &rest[i + if crlf { 2 } else { 1 }..];
    }
    f(rest);
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

    /// The `data:` lines of `data`, as they go on the wire.
    fn data_lines(data: &[u8]) -> String {
        let mut v = Vec::new();
        encode_body("m", data, &mut v);
        String::from_utf8(v)
            .unwrap()
            .strip_prefix("event: m\n")
            .unwrap()
            .to_string()
    }

    /// What an `EventSource` makes of `data:` lines: their values joined with `\n` (WHATWG HTML §9.2.6).
    fn browser_reads(wire: &str) -> String {
        let mut lines = Vec::new();
        // The stream's own line splitting: CRLF, LF, or CR.
        let normalised = wire.replace("\r\n", "\n").replace('\r', "\n");
        for line in normalised.lines() {
            lines.push(
                line.strip_prefix("data: ")
                    .expect("every line is a data: line"),
            );
        }
        lines.join("\n")
    }

    #[test]
    fn data_splits_at_cr_lf_and_crlf_like_event_source() {
        for (data, wire) in [
            ("a\rb", "data: a\ndata: b\n"),
            ("a\nb", "data: a\ndata: b\n"),
            ("a\r\nb", "data: a\ndata: b\n"),
            ("a\n\rb", "data: a\ndata: \ndata: b\n"),
            ("a\r\rb", "data: a\ndata: \ndata: b\n"),
            ("a\n", "data: a\ndata: \n"),
            ("a\r", "data: a\ndata: \n"),
            ("a\r\n", "data: a\ndata: \n"),
            ("\r", "data: \ndata: \n"),
            ("", "data: \n"),
            ("{\"t\":\"x\ry\"}", "data: {\"t\":\"x\ndata: y\"}\n"),
        ] {
            let got = data_lines(data.as_bytes());
            assert_eq!(got, wire, "{data:?}");
            assert!(!got.contains('\r'), "no bare CR on the wire for {data:?}");
            // Each break comes back as `\n`: the payload arrives whole (CR and CRLF normalised to LF).
            let joined = data.replace("\r\n", "\n").replace('\r', "\n");
            assert_eq!(browser_reads(&got), joined, "{data:?}");
        }
    }
}
