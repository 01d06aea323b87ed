//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! A byte-indexed DFA in the spirit of Björn Höhrmann's decoder, built at compile time from the
//! well-formed byte sequences of Unicode Table 3-7, carries sequences across pieces; between
//! sequences the bulk of each piece goes to `std::str::from_utf8`, which is faster and agrees on
//! validity (overlongs, surrogates, > U+10FFFF are all invalid). Each piece is judged as soon as it
//! is fed, so a caller that feeds bytes as they arrive fails fast.

/// Between sequences: the only state in which a message may end.
const ACCEPT: u8 = 0;
/// Sticky: the input so far is not a prefix of any valid UTF-8 text.
const REJECT: u8 = 1;
/// One continuation byte left, any of 80..=BF.
const C1: u8 = 2;
/// Two left, the first in A0..=BF (after E0: no overlongs).
const C2_E0: u8 = 3;
/// Two left, the first in 80..=BF.
const C2: u8 = 4;
/// Two left, the first in 80..=9F (after ED: no surrogates).
const C2_ED: u8 = 5;
/// Three left, the first in 90..=BF (after F0: no overlongs).
const C3_F0: u8 = 6;
/// Three left, the first in 80..=BF.
const C3: u8 = 7;
/// Three left, the first in 80..=8F (after F4: nothing above U+10FFFF).
const C3_F4: u8 = 8;

/// `TABLE[state][byte]` is the next state. 16 rows (rows 9.. are all REJECT) so that indexing with
/// `state & 15` needs no bounds check.
static TABLE: [[u8; 256]; 16] = build_table();

const fn build_table() -> [[u8; 256]; 16] {
    let mut t = [[REJECT; 256]; 16];
    let mut b = 0;
    while b < 256 {
        let x = b as u8;
        t[ACCEPT as usize][b] = match x {
            0x00..=0x7F => ACCEPT,
            0xC2..=0xDF => C1,
            0xE0 => C2_E0,
            0xE1..=0xEC | 0xEE..=0xEF => C2,
            0xED => C2_ED,
            0xF0 => C3_F0,
            0xF1..=0xF3 => C3,
            0xF4 => C3_F4,
            _ => REJECT,
        };
        let cont = matches!(x, 0x80..=0xBF);
        if cont {
            t[C1 as usize][b] = ACCEPT;
            t[C2 as usize][b] = C1;
            t[C3 as usize][b] = C2;
        }
        if matches!(x, 0xA0..=0xBF) {
            t[C2_E0 as usize][b] = C1;
        }
        if matches!(x, 0x80..=0x9F) {
            t[C2_ED as usize][b] = C1;
        }
        if matches!(x, 0x90..=0xBF) {
            t[C3_F0 as usize][b] = C2;
        }
        if matches!(x, 0x80..=0x8F) {
            t[C3_F4 as usize][b] = C2;
        }
        b += 1;
    }
    t
}

/// Incremental UTF-8 validator: feed the bytes of one message in any number of pieces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utf8Validator {
    state: u8,
}

impl Default for Utf8Validator {
    fn default() -> Self {
        Self::new()
    }
}

impl Utf8Validator {
    /// A validator at the start of a text.
    pub const fn new() -> Self {
        Self { state: ACCEPT }
    }

    /// Validates the next piece of the text. Returns `false` as soon as the text so far cannot be
    /// valid UTF-8, whatever follows; once `false`, every later call returns `false` until
    /// [`reset`](Self::reset). A sequence cut at the end of `bytes` is fine: it continues in the
    /// next call.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        // Finish a sequence carried over from the previous piece, one byte at a time.
        let mut s = self.state;
        let mut i = 0;
        while s != ACCEPT {
            if s == REJECT {
                self.state = REJECT;
                return false;
            }
            let Some(&b) = bytes.get(i) else {
                self.state = s;
                return true;
            };
            s = TABLE[(s & 15) as usize][b as usize];
            i += 1;
        }
        // Between sequences: the bulk goes to std's validator (word-at-a-time ASCII skipping and
        // all; 2-4x the byte-wise DFA on the `codec` bench), which has the same notion of
        // validity. Only a sequence cut at the end comes back to the DFA.
        let rest = &bytes[i..];
        self.state = match std::str::from_utf8(rest) {
            Ok(_) => ACCEPT,
            Err(e) if e.error_len().is_some() => REJECT,
            Err(e) => rest[e.valid_up_to()..]
                .iter()
                .fold(ACCEPT, |s, &b| TABLE[(s & 15) as usize][b as usize]),
        };
        self.state != REJECT
    }

    /// `true` when the bytes fed so far end between sequences (not mid-character) and are valid:
    /// the text may end here.
    pub const fn is_complete(&self) -> bool {
        self.state == ACCEPT
    }

    /// Back to the start of a new text.
    pub fn reset(&mut self) {
        self.state = ACCEPT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn whole(bytes: &[u8]) -> bool {
        let mut v = Utf8Validator::new();
        let ok = v.feed(bytes) && v.is_complete();
        assert_eq!(bytewise(bytes), ok, "whole vs byte-by-byte: {bytes:02X?}");
        ok
    }

    /// Byte by byte, every byte after a lead byte goes through the DFA.
    fn bytewise(bytes: &[u8]) -> bool {
        let mut v = Utf8Validator::new();
        bytes.iter().all(|b| v.feed(std::slice::from_ref(b))) && v.is_complete()
    }

    #[test]
    fn dfa_agrees_with_std_on_short_sequences() {
        const EDGES: [u8; 10] = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF];
        for lead in 0..=255u8 {
            for b2 in 0..=255u8 {
                let two = [lead, b2];
                assert_eq!(
                    bytewise(&two),
                    std::str::from_utf8(&two).is_ok(),
                    "{two:02X?}"
                );
                for b3 in EDGES {
                    let three = [lead, b2, b3];
                    assert_eq!(
                        bytewise(&three),
                        std::str::from_utf8(&three).is_ok(),
                        "{three:02X?}"
                    );
                    if lead >= 0xF0 {
                        for b4 in EDGES {
                            let four = [lead, b2, b3, b4];
                            let std_ok = std::str::from_utf8(&four).is_ok();
                            assert_eq!(bytewise(&four), std_ok, "{four:02X?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn table() {
        let cases: &[(&[u8], bool)] = &[
            (b"", true),
            (b"hello, world", true),
            ("κόσμε".as_bytes(), true),
            ("€ and 𝄞 and \u{10FFFF}".as_bytes(), true),
            (&[0xC2, 0x80], true),
            (&[0xED, 0x9F, 0xBF], true), // U+D7FF, last before surrogates
            (&[0xEE, 0x80, 0x80], true), // U+E000, first after
            (&[0xC0, 0x80], false),      // overlong NUL
            (&[0xC1, 0xBF], false),      // overlong
            (&[0xE0, 0x80, 0x80], false),
            (&[0xE0, 0x9F, 0xBF], false),
            (&[0xF0, 0x8F, 0xBF, 0xBF], false),
            (&[0xED, 0xA0, 0x80], false),       // U+D800
            (&[0xED, 0xBF, 0xBF], false),       // U+DFFF
            (&[0xF4, 0x90, 0x80, 0x80], false), // U+110000
            (&[0xF5, 0x80, 0x80, 0x80], false),
            (&[0xFF], false),
            (&[0x80], false),
            (&[0xCE, 0xBA, 0xE1], false), // truncated: not complete
            (&[0xF0, 0x9D], false),
        ];
        for (bytes, ok) in cases {
            assert_eq!(whole(bytes), *ok, "{bytes:02X?}");
            assert_eq!(
                std::str::from_utf8(bytes).is_ok(),
                *ok,
                "table itself: {bytes:02X?}"
            );
        }
    }

    #[test]
    fn fails_at_first_impossible_byte() {
        let mut v = Utf8Validator::new();
        assert!(v.feed(b"abc"));
        assert!(v.feed(&[0xED]));
        assert!(!v.is_complete());
        assert!(!v.feed(&[0xA0])); // surrogate known at the second byte
        assert!(!v.feed(b"ok")); // sticky
        v.reset();
        assert!(v.feed(b"ok") && v.is_complete());
    }

    #[test]
    fn multibyte_at_every_alignment() {
        for n in 0..40 {
            let mut s = "a".repeat(n);
            s.push('é');
            s.push_str(&"b".repeat(n));
            assert!(whole(s.as_bytes()));
            let mut bad = s.into_bytes();
            bad.insert(n, 0xFF);
            assert!(!whole(&bad));
        }
    }

    proptest! {
        #[test]
        fn agrees_with_std_under_any_split(
            bytes in prop_oneof![
                any::<String>().prop_map(String::into_bytes),
                proptest::collection::vec(any::<u8>(), 0..64),
                proptest::collection::vec(prop_oneof![Just(0x41u8), 0x80u8..=0xFF], 0..64),
            ],
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
        ) {
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut v = Utf8Validator::new();
            let mut ok = true;
            let mut last = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                ok &= v.feed(&bytes[last..p]);
                last = p;
            }
            prop_assert_eq!(ok && v.is_complete(), std::str::from_utf8(&bytes).is_ok());
            // A prefix is accepted by feed exactly when std reports no error before the end.
            let std_prefix_ok = match std::str::from_utf8(&bytes) {
                Ok(_) => true,
                Err(e) => e.error_len().is_none(),
            };
            prop_assert_eq!(ok, std_prefix_ok);
        }
    }
}
