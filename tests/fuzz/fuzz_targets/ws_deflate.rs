//! permessage-deflate (RFC 7692): arbitrary bytes as a `Sec-WebSocket-Extensions` value and as a compressed
//! message. Properties: never panics; an accepted offer names a window of 9..=15 bits and its answer is a
//! valid, re-negotiable offer; inflating never returns more than the limit nor holds more than the limit plus
//! one chunk, and whatever it returns compresses and inflates back to itself.
//! Run with `cargo fuzz run --fuzz-dir tests/fuzz ws_deflate tests/fuzz/corpus/ws_deflate` (see `docs/FUZZING.md`).
#![no_main]

use corelay_proto::ws::deflate::{Deflater, Inflater, negotiate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(n) = negotiate(&String::from_utf8_lossy(data)) {
        assert!((9..=15).contains(&n.server_window_bits));
        assert_eq!(negotiate(&n.response()), Some(n));
    }
    let Some((&sel, payload)) = data.split_first() else {
        return;
    };
    let max = usize::from(sel) * 64;
    let text = sel & 1 == 1;
    let mut inf = Inflater::new();
    if let Ok(out) = inf.inflate(payload, text, max) {
        assert!(out.len() <= max);
        assert!(!text || std::str::from_utf8(out).is_ok());
        let out = out.to_vec();
        let body = Deflater::new(6)
            .compress(&out, 9 + sel % 7)
            .expect("compresses")
            .to_vec();
        assert_eq!(inf.inflate(&body, text, max).expect("round trip"), &out[..]);
    }
    assert!(inf.heap_bytes() <= max + 1 + 16 * 1024);
});
