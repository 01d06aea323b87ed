//! The client side of a server-sent events stream, incrementally: the chunked transfer coding some servers
//! put around the stream (nginx does for Nchan's `eventsource` location) and the event stream itself (WHATWG
//! HTML §9.2.6: lines end at CRLF, LF or a bare CR; `data:` lines are joined with `\n`; a blank line
//! dispatches the event; lines starting with `:` are comments, the servers' heartbeats). Input arrives in
//! whatever pieces the socket gives: an event, a line, a CRLF or a chunk-size line may be split across reads,
//! and one read may hold several events.

/// Largest line, or event data, accepted (the engine's bound on unparsed input).
const MAX_EVENT: usize = 16 << 20;
/// Longest chunk-size line (with extensions) accepted.
const MAX_SIZE_LINE: usize = 1024;

/// The event-stream parser of one connection.
#[derive(Default)]
pub struct Parser {
    /// The start of a line whose end has not arrived.
    line: Vec<u8>,
    /// The last input ended with CR: an LF that starts the next input belongs to it.
    cr: bool,
    /// The event being built: its `event:` type (empty: `message`) and its data, each `data:` line's value
    /// followed by `\n`.
    event: Vec<u8>,
    data: Vec<u8>,
    /// The event has had a `data:` line (the data of `data:` alone is empty).
    has_data: bool,
}

impl Parser {
    /// Parses `input`, calling `emit(event_type, data)` for every event it completes.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        emit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), String> {
        if std::mem::take(&mut self.cr) && input.first() == Some(&b'\n') {
            input = &input[1..];
        }
        while let Some(i) = input.iter().position(|&b| b == b'\n' || b == b'\r') {
            if self.line.is_empty() {
                self.line_done(&input[..i], emit)?;
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&input[..i]);
                self.line_done(&line, emit)?;
                line.clear();
                self.line = line;
            }
            let crlf = input[i] == b'\r' && input.get(i + 1) == Some(&b'\n');
            if input[i] == b'\r' && i + 1 == input.len() {
                self.cr = true;
            }
            input = &input[i + if crlf { 2 } else { 1 }..];
        }
        if self.line.len() + input.len() > MAX_EVENT {
            return Err("SSE line longer than 16 MiB".to_string());
        }
        self.line.extend_from_slice(input);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), String> {
        if line.is_empty() {
            if self.has_data {
                self.data.pop(); // the last line's `\n`
                let ty: &[u8] = if self.event.is_empty() {
                    b"message"
                } else {
                    &self.event
                };
                emit(ty, &self.data);
            }
            self.data.clear();
            self.event.clear();
            self.has_data = false;
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(()); // a comment
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.data.len() + value.len() >= MAX_EVENT {
                    return Err("SSE event data longer than 16 MiB".to_string());
                }
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            _ => {} // id, retry, unknown fields
        }
        Ok(())
    }

    /// Bytes held between reads (a partial line and a partial event).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.line.len() + self.data.len() + self.event.len()
    }
}

/// Where a chunked body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, with this many bytes of it to come.
    Data(usize),
    /// After a chunk's data, at the line break that ends it.
    DataEnd,
    /// The last chunk came: the rest is trailers, discarded.
    Done,
}

/// Undoes `Transfer-Encoding: chunked` incrementally.
pub struct Dechunk(Chunk);

impl Default for Dechunk {
    fn default() -> Dechunk {
        Dechunk(Chunk::Size)
    }
}

impl Dechunk {
    /// Hands the chunk data at the front of `buf` to `out`; returns how many bytes of `buf` it used (the
    /// caller keeps the rest, an incomplete size line or line break, for the next read).
    pub fn feed(
        &mut self,
        buf: &[u8],
        out: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<usize, String> {
        let mut pos = 0;
        while pos < buf.len() {
            match self.0 {
                Chunk::Size => {
                    let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
                        if buf.len() - pos > MAX_SIZE_LINE {
                            return Err("chunk-size line too long".to_string());
                        }
                        break;
                    };
                    let line = &buf[pos..pos + nl];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let hex = line.split(|&b| b == b';').next().unwrap_or(b"");
                    let size = std::str::from_utf8(hex)
                        .ok()
                        .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                        .ok_or_else(|| {
                            format!("bad chunk size {:?}", String::from_utf8_lossy(line))
                        })?;
                    pos += nl + 1;
                    self.0 = if size == 0 {
                        Chunk::Done
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    let n = left.min(buf.len() - pos);
                    out(&buf[pos..pos + n])?;
                    pos += n;
                    self.0 = if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    };
                }
                Chunk::DataEnd => match buf[pos] {
                    b'\r' if pos + 1 == buf.len() => break,
                    b'\r' if buf[pos + 1] == b'\n' => {
                        pos += 2;
                        self.0 = Chunk::Size;
                    }
                    b'\n' => {
                        pos += 1;
                        self.0 = Chunk::Size;
                    }
                    _ => return Err("chunk data longer than its size".to_string()),
                },
                Chunk::Done => pos = buf.len(),
            }
        }
        Ok(pos)
    }
}

/// An SSE response body: the optional chunked coding, then the event stream.
#[derive(Default)]
pub struct Stream {
    dechunk: Option<Dechunk>,
    parser: Parser,
}

impl Stream {
    pub fn new(chunked: bool) -> Stream {
        Stream {
            dechunk: chunked.then(Dechunk::default),
            parser: Parser::default(),
        }
    }

    /// Parses what `buf` holds, calling `emit(event_type, data)` per event; returns how many bytes it used
    /// (all of them unless the body is chunked and ends inside a size line).
    pub fn feed(
        &mut self,
        buf: &[u8],
        emit: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<usize, String> {
        let parser = &mut self.parser;
        match &mut self.dechunk {
            None => parser.feed(buf, emit).map(|()| buf.len()),
            Some(d) => d.feed(buf, &mut |piece| parser.feed(piece, emit)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events `pieces`, fed one after another, come out as: (type, data).
    fn events(pieces: &[&[u8]]) -> Vec<(String, String)> {
        let mut p = Parser::default();
        let mut got = Vec::new();
        for piece in pieces {
            p.feed(piece, &mut |t, d| {
                got.push((
                    String::from_utf8(t.to_vec()).unwrap(),
                    String::from_utf8(d.to_vec()).unwrap(),
                ))
            })
            .unwrap();
        }
        got
    }

    fn ev(t: &str, d: &str) -> (String, String) {
        (t.to_string(), d.to_string())
    }

    /// Every way of cutting `wire` in two gives the same events as the whole.
    fn same_split_anywhere(wire: &[u8]) -> Vec<(String, String)> {
        let whole = events(&[wire]);
        for i in 0..=wire.len() {
            assert_eq!(events(&[&wire[..i], &wire[i..]]), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(events(&bytes), whole, "a byte at a time");
        whole
    }

    #[test]
    fn corelay_stream() {
        // What corelay writes: retry, the stream event, a heartbeat, a delivery with its cursor.
        let wire = b"retry: 2000\n\nevent: stream\ndata: {\"type\":\"stream\",\"id\":\"s1\"}\n\n:\n\n\
            event: message\ndata: {\"type\":\"message\",\"body\":{\"seq\":0}}\nid: conversation:c=1\n\n";
        assert_eq!(
            same_split_anywhere(wire),
            vec![
                ev("stream", r#"{"type":"stream","id":"s1"}"#),
                ev("message", r#"{"type":"message","body":{"seq":0}}"#),
            ]
        );
    }

    #[test]
    fn several_events_in_one_read_and_multi_line_data() {
        let wire = b"data: a\n\ndata: b\ndata: c\n\nevent: x\ndata\n\ndata:d\n\n";
        assert_eq!(
            same_split_anywhere(wire),
            vec![
                ev("message", "a"),
                ev("message", "b\nc"),
                ev("x", ""),
                ev("message", "d")
            ]
        );
    }

    #[test]
    fn comments_and_blocks_without_data_dispatch_nothing() {
        let wire = b": hi\n\n:\n\nid: 7\nretry: 5\n\nevent: lonely\n\ndata: after\n\n";
        assert_eq!(same_split_anywhere(wire), vec![ev("message", "after")]);
    }

    #[test]
    fn crlf_lf_and_bare_cr_end_lines_alike() {
        let lf = b"event: e\ndata: one\ndata: two\n\n".to_vec();
        let crlf = b"event: e\r\ndata: one\r\ndata: two\r\n\r\n".to_vec();
        let cr = b"event: e\rdata: one\rdata: two\r\r".to_vec();
        let want = vec![ev("e", "one\ntwo")];
        assert_eq!(same_split_anywhere(&lf), want);
        assert_eq!(same_split_anywhere(&crlf), want);
        assert_eq!(same_split_anywhere(&cr), want);
        // A CRLF split across reads is one line break, not a line break and a blank line.
        assert_eq!(
            events(&[b"data: x\r", b"\ndata: y\r", b"\n\r", b"\n"]),
            vec![ev("message", "x\ny")]
        );
    }

    #[test]
    fn an_event_waits_for_its_blank_line() {
        let mut p = Parser::default();
        let mut n = 0;
        p.feed(b"data: {\"seq\":1}\n", &mut |_, _| n += 1).unwrap();
        assert_eq!((n, p.held() > 0), (0, true));
        p.feed(b"\n", &mut |_, d| {
            assert_eq!(d, b"{\"seq\":1}");
            n += 1
        })
        .unwrap();
        assert_eq!((n, p.held()), (1, 0));
    }

    fn dechunked(pieces: &[&[u8]]) -> Vec<(String, String)> {
        let mut s = Stream::new(true);
        let mut got = Vec::new();
        let mut held = Vec::new();
        for piece in pieces {
            held.extend_from_slice(piece);
            let used = s
                .feed(&held, &mut |t, d| {
                    got.push((
                        String::from_utf8(t.to_vec()).unwrap(),
                        String::from_utf8(d.to_vec()).unwrap(),
                    ))
                })
                .unwrap();
            held.drain(..used);
        }
        got
    }

    #[test]
    fn chunked_streams_split_anywhere() {
        // What nginx sends for Nchan: a comment, then each event in its own chunk (one event across two).
        let wire = b"6\r\n: hi\n\n\r\n16\r\nid: 1:0\ndata: {\"a\":1}\n\r\n1;ext=1\r\n\n\r\n\
            1e\r\nid: 2:0\ndata: {\"b\":2}\n\ndata: c\r\n0\r\n\r\n";
        let whole = dechunked(&[wire]);
        assert_eq!(
            whole,
            vec![ev("message", r#"{"a":1}"#), ev("message", r#"{"b":2}"#)]
        );
        for i in 0..=wire.len() {
            assert_eq!(dechunked(&[&wire[..i], &wire[i..]]), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(dechunked(&bytes), whole);
    }

    #[test]
    fn bad_chunking_is_an_error() {
        let mut s = Stream::new(true);
        assert!(s.feed(b"zz\r\n", &mut |_, _| {}).is_err());
        let mut s = Stream::new(true);
        assert!(s.feed(b"2\r\nabc\r\n", &mut |_, _| {}).is_err());
    }
}
