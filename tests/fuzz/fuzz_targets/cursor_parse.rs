//! Arbitrary text (the input when it is UTF-8) into the cursor parser and formatter
//! (`corelay_proto::cursor::{parse, format}`), the channel-list parser and the channel classifier.
//! Properties:
//! - never panics;
//! - a channel `kind` accepts is within the documented limits (at most `MAX_CHANNEL_LEN` bytes;
//!   `prefix:name` with every ':'-separated part a non-empty id of [A-Za-z0-9_.@-]; so never `=`, `;`,
//!   `,` or whitespace), and `conversation:`/`user:` ids contain no ':';
//! - an accepted cursor holds at most `MAX_CHANNELS` channels, each one `kind` accepts; every channel and
//!   offset in it comes from the input: the input's entries (split at ';', trimmed, empty ones skipped) are
//!   all `channel=offset`, the cursor holds exactly their channels, each at the offset of its last entry;
//! - a refused cursor has a malformed entry or more than `MAX_CHANNELS` distinct channels (so a cursor of
//!   well-formed entries naming at most `MAX_CHANNELS` channels is never refused);
//! - round trip: `parse(format(parse(x))) == parse(x)` when `parse(x)` succeeds, and `format` of that is
//!   the same text again (the formatted form is canonical);
//! - an accepted channel list (`?channels=`) holds at most `MAX_CHANNELS` channels, each one `kind`
//!   accepts, exactly the input's trimmed non-empty ','-separated pieces, and joined with ',' it parses
//!   back to itself.
//!
//! Seeds: `tests/fuzz/seeds/cursor_parse/`; run with
//! `cargo fuzz run --fuzz-dir tests/fuzz cursor_parse tests/fuzz/corpus/cursor_parse tests/fuzz/seeds/cursor_parse`
//! (the first directory receives new inputs: keep it the git-ignored corpus; see `docs/FUZZING.md`).
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use corelay_proto::cursor::{
    Kind, MAX_CHANNEL_LEN, MAX_CHANNELS, format, kind, parse, parse_channels,
};
use libfuzzer_sys::fuzz_target;

/// Longest id part (`auth::MAX_USER_LEN`).
const MAX_ID_LEN: usize = 128;

fn id_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

/// `kind` accepts only names of the documented shape; returns whether it accepted.
fn check_channel(ch: &str) -> bool {
    let Ok(k) = kind(ch) else {
        return false;
    };
    assert!(ch.len() <= MAX_CHANNEL_LEN, "{ch:?} too long");
    let (prefix, name) = ch.split_once(':').expect("a kind has a prefix");
    assert!(id_ok(prefix) && name.split(':').all(id_ok), "{ch:?}");
    match k {
        Kind::Conversation => assert!(prefix == "conversation" && !name.contains(':'), "{ch:?}"),
        Kind::User => assert!(prefix == "user" && !name.contains(':'), "{ch:?}"),
        Kind::Topic => assert!(prefix != "conversation" && prefix != "user", "{ch:?}"),
    }
    true
}

fn text(cursor: &BTreeMap<String, u64>) -> String {
    format(cursor.iter().map(|(c, o)| (c.as_str(), *o)))
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    check_channel(input);

    // The input's entries, as the cursor syntax reads them.
    let entries: Vec<&str> = input
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let split: Vec<Option<(&str, Option<u64>)>> = entries
        .iter()
        .map(|e| e.rsplit_once('=').map(|(c, o)| (c, o.parse().ok())))
        .collect();
    let mut well_formed = true;
    for (c, o) in split.iter().flatten() {
        // Every channel-shaped piece of the input goes through the classifier's checks.
        well_formed &= check_channel(c) && o.is_some();
    }
    well_formed &= split.iter().all(Option::is_some);

    match parse(input) {
        Ok(cursor) => {
            assert!(cursor.len() <= MAX_CHANNELS, "{} channels", cursor.len());
            assert!(well_formed, "a malformed entry was accepted");
            let mut want: BTreeMap<&str, u64> = BTreeMap::new();
            for (c, o) in split.iter().flatten() {
                want.insert(c, o.unwrap());
            }
            let got: BTreeMap<&str, u64> = cursor.iter().map(|(c, o)| (c.as_str(), *o)).collect();
            assert_eq!(
                got, want,
                "the cursor is the input's entries, the last one per channel"
            );
            for c in cursor.keys() {
                assert!(!c.contains(['=', ';', ',']) && !c.contains(char::is_whitespace));
            }

            let t = text(&cursor);
            assert!(!t.contains(char::is_whitespace));
            assert_eq!(t.is_empty(), cursor.is_empty());
            let back = parse(&t).unwrap_or_else(|e| panic!("formatted cursor {t:?} refused: {e}"));
            assert_eq!(back, cursor, "round trip through {t:?}");
            assert_eq!(text(&back), t, "canonical text");
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "an error says why");
            if well_formed {
                let distinct: BTreeSet<&str> = split.iter().flatten().map(|(c, _)| *c).collect();
                assert!(
                    distinct.len() > MAX_CHANNELS,
                    "well-formed cursor of {} channels refused: {e}",
                    distinct.len()
                );
            }
        }
    }

    let pieces: Vec<&str> = input
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    match parse_channels(input) {
        Ok(chans) => {
            assert!(chans.len() <= MAX_CHANNELS, "{} channels", chans.len());
            assert_eq!(chans, pieces);
            for c in &chans {
                assert!(check_channel(c), "{c:?} accepted in a list but not alone");
            }
            assert_eq!(parse_channels(&chans.join(",")), Ok(chans));
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "an error says why");
            if pieces.len() <= MAX_CHANNELS {
                assert!(
                    !pieces.iter().all(|c| kind(c).is_ok()),
                    "well-formed list refused: {e}"
                );
            }
        }
    }
});
