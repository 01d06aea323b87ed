//! Arbitrary bytes into the PROXY protocol parser (v1 and v2).
//! Properties: never panics; a complete header never claims more bytes than it was given; every strict
//! prefix of a complete header needs more bytes (`Ok(None)`), and every longer prefix gives the same header;
//! errors are final (a prefix that fails makes the whole input fail the same way); the encoders' output for
//! the parsed addresses parses back to the same header.
//! Seeds: `tests/fuzz/seeds/proxy_parse/`; run with
//! `cargo fuzz run --fuzz-dir tests/fuzz proxy_parse tests/fuzz/corpus/proxy_parse tests/fuzz/seeds/proxy_parse`
//! (the first directory receives new inputs: keep it the git-ignored corpus; see `docs/FUZZING.md`).
#![no_main]

use corelay_proto::proxy::{ProxyHeader, encode_v1, encode_v2, parse};
use libfuzzer_sys::fuzz_target;

/// Prefixes checked one by one; past this, only the few around the header's end (parse is O(header)).
const PREFIXES: usize = 256;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    match &whole {
        Ok(Some((header, n))) => {
            let n = *n;
            assert!(n > 0 && n <= data.len());
            for k in (0..n.min(PREFIXES)).chain(n.saturating_sub(2)..n) {
                assert_eq!(
                    parse(&data[..k]),
                    Ok(None),
                    "prefix {k} of a {n}-byte header"
                );
            }
            assert_eq!(parse(&data[..n]), whole);
            if let ProxyHeader::Proxied {
                source,
                destination,
            } = header
            {
                // Same-family addresses only come out of a parse, so the encoders round-trip them.
                for bytes in [
                    encode_v1(*source, *destination),
                    encode_v2(*source, *destination),
                ] {
                    assert_eq!(parse(&bytes), Ok(Some((header.clone(), bytes.len()))));
                }
            }
        }
        Ok(None) => {
            for k in 0..data.len().min(PREFIXES) {
                assert_eq!(
                    parse(&data[..k]),
                    Ok(None),
                    "prefix {k} of an incomplete header"
                );
            }
        }
        Err(_) => {
            for k in 0..data.len().min(PREFIXES) {
                match parse(&data[..k]) {
                    Ok(None) => {}
                    Err(e) => assert_eq!(Err(e), whole, "prefix {k} failed differently"),
                    Ok(Some(_)) => panic!("prefix {k} parsed but the whole input failed"),
                }
            }
        }
    }
});
