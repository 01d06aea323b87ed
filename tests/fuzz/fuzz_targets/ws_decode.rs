//! Arbitrary bytes into the WebSocket decoder, split in two at a fuzzer-chosen point.
//! Input: byte 0 picks the split (mod len + 1), the rest is the stream.
//! Properties: never panics; never consumes more than it was given and buffers what it cannot use yet;
//! text events are UTF-8 and data events within the message limit, control payloads at most 125 bytes;
//! close codes are valid on the wire; an error releases every heap buffer (`heap_bytes() == 0`);
//! splitting the stream may only make a failure come earlier, and the events before it agree.
//! Regression input: `tests/fuzz/regressions/ws_decode/` (see `docs/FUZZING.md`).
//! Seeds: `tests/fuzz/seeds/ws_decode/`; run with
//! `cargo fuzz run --fuzz-dir tests/fuzz ws_decode tests/fuzz/corpus/ws_decode tests/fuzz/seeds/ws_decode`
//! (the first directory receives new inputs: keep it the git-ignored corpus; see `docs/FUZZING.md`).
#![no_main]

use corelay_proto::ws::{CloseCode, Decoder, Event, Limits, WsError};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_frame_len: 1 << 16,
    max_message_len: 1 << 16,
};

#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<CloseCode>, String),
}

/// Feeds the pieces the way the connection does: unconsumed bytes are kept and the next read is
/// appended. Stops at the first error or close.
fn run(pieces: &[&[u8]]) -> (Vec<Ev>, Option<WsError>) {
    let mut dec = Decoder::new(LIMITS);
    let mut pending = Vec::new();
    let mut events = Vec::new();
    for piece in pieces {
        pending.extend_from_slice(piece);
        let mut off = 0;
        loop {
            let avail = pending.len() - off;
            match dec.decode(&mut pending[off..]) {
                Err(e) => {
                    assert_eq!(dec.heap_bytes(), 0, "heap released on error");
                    return (events, Some(e));
                }
                Ok((0, None)) => break,
                Ok((n, ev)) => {
                    assert!(n <= avail, "consumed more than given");
                    off += n;
                    let ev = match ev {
                        None => continue,
                        Some(Event::Text(t)) => {
                            assert!(std::str::from_utf8(t).is_ok(), "text event not UTF-8");
                            assert!(t.len() <= LIMITS.max_message_len);
                            Ev::Text(t.to_vec())
                        }
                        Some(Event::Binary(b)) => {
                            assert!(b.len() <= LIMITS.max_message_len);
                            Ev::Binary(b.to_vec())
                        }
                        Some(Event::Ping(p)) => {
                            assert!(p.len() <= 125);
                            Ev::Ping(p.to_vec())
                        }
                        Some(Event::Pong(p)) => {
                            assert!(p.len() <= 125);
                            Ev::Pong(p.to_vec())
                        }
                        Some(Event::Close { code, reason }) => {
                            assert!(code.is_none_or(CloseCode::is_valid_on_wire));
                            assert!(code.is_some() || reason.is_empty());
                            events.push(Ev::Close(code, reason.to_owned()));
                            return (events, None);
                        }
                        Some(Event::Compressed { .. }) => panic!("deflate is not enabled"),
                    };
                    events.push(ev);
                }
            }
        }
        assert_eq!(
            off,
            pending.len(),
            "the decoder buffers what it cannot use yet"
        );
        pending.clear();
    }
    (events, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let cut = usize::from(split) % (stream.len() + 1);
    let (head, tail) = stream.split_at(cut);
    let split = run(&[head, tail]);
    let whole = run(&[stream]);
    // Splitting may only make a failure come earlier (fail fast); the events before it agree.
    assert!(whole.0.starts_with(&split.0) || split.0.starts_with(&whole.0));
    if split.1.is_none() {
        assert_eq!(whole, split);
    }
});
