//! RFC 6455 §5.2 frame headers, masking, and the server-side (unmasked) frame encoder.

use super::decoder::WsError;

/// The longest frame header: 2 bytes, an 8-byte extended length, a 4-byte masking key.
pub const MAX_HEADER_LEN: usize = 14;

/// The opcodes RFC 6455 defines. Any other value is a protocol error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    /// The opcode for the low 4 bits of a header's first byte; `None` for reserved values.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0x0 => Some(Self::Continuation),
            0x1 => Some(Self::Text),
            0x2 => Some(Self::Binary),
            0x8 => Some(Self::Close),
            0x9 => Some(Self::Ping),
            0xA => Some(Self::Pong),
            _ => None,
        }
    }

    /// The 4-bit wire value.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// Close, Ping and Pong.
    pub const fn is_control(self) -> bool {
        self as u8 & 0x8 != 0
    }
}

/// A close status code (RFC 6455 §7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: Self = Self(1000);
    pub const GOING_AWAY: Self = Self(1001);
    pub const PROTOCOL: Self = Self(1002);
    pub const UNSUPPORTED: Self = Self(1003);
    /// Never on the wire: "the close frame had no status code".
    pub const NO_STATUS: Self = Self(1005);
    /// Never on the wire: "the connection dropped without a close frame".
    pub const ABNORMAL: Self = Self(1006);
    pub const INVALID_DATA: Self = Self(1007);
    pub const POLICY: Self = Self(1008);
    pub const TOO_BIG: Self = Self(1009);
    pub const INTERNAL: Self = Self(1011);
    pub const TRY_AGAIN: Self = Self(1013);
    /// corelay: the connection's token expired and no `refresh` came first (application range, RFC 6455 §7.4.2).
    pub const TOKEN_EXPIRED: Self = Self(4001);

    /// Whether a peer may send this code in a close frame: 1000-1003, 1007-1014 (defined or
    /// IANA-registered) and 3000-4999 (libraries, applications). Everything else (0-999, 1004-1006,
    /// 1015, 1016-2999, 5000+) is a protocol error.
    pub const fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// A parsed frame header, as on the wire (no policy applied: see the decoder for that).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1..RSV3 as the low 3 bits.
    pub rsv: u8,
    /// The raw 4-bit opcode (may be a reserved value).
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

/// Parses a frame header from the start of `buf`. Consumes nothing until the header is complete:
/// `Ok(None)` means "need more bytes" (never more than [`MAX_HEADER_LEN`] in all), `Ok(Some((header,
/// header_len)))` gives the header and how many bytes it took. Non-minimal length encodings are
/// accepted; a 64-bit length with its most significant bit set is a protocol error (1002).
pub fn decode_header(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, WsError> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    let (payload_len, rest, mut len) = match b1 & 0x7F {
        126 => match rest.split_first_chunk::<2>() {
            Some((l, rest)) => (u64::from(u16::from_be_bytes(*l)), rest, 4),
            None => return Ok(None),
        },
        127 => match rest.split_first_chunk::<8>() {
            Some((l, rest)) => {
                let l = u64::from_be_bytes(*l);
                if l >> 63 != 0 {
                    return Err(WsError::protocol("64-bit payload length with MSB set"));
                }
                (l, rest, 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), rest, 2),
    };
    let mask = if b1 & 0x80 != 0 {
        match rest.first_chunk::<4>() {
            Some(k) => {
                len += 4;
                Some(*k)
            }
            None => return Ok(None),
        }
    } else {
        None
    };
    let header = FrameHeader {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0F,
        mask,
        payload_len,
    };
    Ok(Some((header, len)))
}

/// XORs `buf` with the masking `key` (RFC 6455 §5.3). `offset` is the position of `buf[0]` within
/// the frame payload, so a payload can be unmasked in pieces as it arrives. Masking is its own
/// inverse.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    // Rotate the key so that k[0] applies to buf[0].
    let k = [
        key[offset & 3],
        key[(offset + 1) & 3],
        key[(offset + 2) & 3],
        key[(offset + 3) & 3],
    ];
    let wide = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let (words, tail) = buf.as_chunks_mut::<8>();
    for w in words {
        *w = (u64::from_ne_bytes(*w) ^ wide).to_ne_bytes();
    }
    // Every word is 8 bytes, so the tail starts at a multiple of 4 and k[0] applies again.
    for (b, m) in tail.iter_mut().zip(k.iter().cycle()) {
        *b ^= m;
    }
}

/// Bytes of a server (unmasked) frame header for a payload of `len` bytes.
pub fn server_header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

fn push_header(opcode: Opcode, fin: bool, len: usize, out: &mut Vec<u8>) {
    push_header_b0((u8::from(fin) << 7) | opcode.as_u8(), len, out);
}

fn push_header_b0(b0: u8, len: usize, out: &mut Vec<u8>) {
    match len {
        0..=125 => out.extend_from_slice(&[b0, len as u8]),
        126..=0xFFFF => {
            out.extend_from_slice(&[b0, 126]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&[b0, 127]);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Appends one server frame (never masked) with `payload` to `out`. The caller keeps control
/// frames within the rules (payload <= 125 bytes, `fin` set).
///
/// Into an empty `out` it allocates exactly the frame's length: `Bytes::from` that `Vec` then takes the
/// buffer as it is, where spare capacity would cost it a second allocation (its shared header).
pub fn encode_frame(opcode: Opcode, fin: bool, payload: &[u8], out: &mut Vec<u8>) {
    let len = server_header_len(payload.len()) + payload.len();
    if out.is_empty() {
        out.reserve_exact(len);
    } else {
        out.reserve(len); // appending frames: keep the amortized growth
    }
    push_header(opcode, fin, payload.len(), out);
    out.extend_from_slice(payload);
}

/// Appends one final server frame with RSV1 set: `payload` is a permessage-deflate message (RFC 7692 §6),
/// already compressed.
pub fn encode_frame_rsv1(opcode: Opcode, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(10 + payload.len());
    push_header_b0(0x80 | 0x40 | opcode.as_u8(), payload.len(), out);
    out.extend_from_slice(payload);
}

/// Appends a close frame carrying `code` and `reason`, the reason cut at a char boundary so that
/// the payload stays within 125 bytes. A code that must not appear on the wire (1005, 1006, 1015,
/// anything outside [`CloseCode::is_valid_on_wire`]) gives a close frame with an empty payload.
pub fn encode_close(code: CloseCode, reason: &str, out: &mut Vec<u8>) {
    if !code.is_valid_on_wire() {
        push_header(Opcode::Close, true, 0, out);
        return;
    }
    let reason = reason.get(..reason.floor_char_boundary(123)).unwrap_or("");
    push_header(Opcode::Close, true, 2 + reason.len(), out);
    out.extend_from_slice(&code.0.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_lengths() {
        // 7-bit, 16-bit, 64-bit, masked and not.
        type Row<'a> = (&'a [u8], Option<(FrameHeader, usize)>);
        let cases: &[Row] = &[
            (&[], None),
            (&[0x81], None),
            (
                &[0x81, 0x05],
                Some((
                    FrameHeader {
                        fin: true,
                        rsv: 0,
                        opcode: 1,
                        mask: None,
                        payload_len: 5,
                    },
                    2,
                )),
            ),
            (&[0x82, 0x7E, 0x01], None),
            (
                &[0x82, 0x7E, 0x01, 0x00],
                Some((
                    FrameHeader {
                        fin: true,
                        rsv: 0,
                        opcode: 2,
                        mask: None,
                        payload_len: 256,
                    },
                    4,
                )),
            ),
            (&[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0], None),
            (
                &[0x02, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4],
                Some((
                    FrameHeader {
                        fin: false,
                        rsv: 0,
                        opcode: 2,
                        mask: Some([1, 2, 3, 4]),
                        payload_len: 65536,
                    },
                    14,
                )),
            ),
            (&[0xF3, 0x80, 9, 9, 9], None),
            (
                &[0xF3, 0x80, 9, 9, 9, 9],
                Some((
                    FrameHeader {
                        fin: true,
                        rsv: 7,
                        opcode: 3,
                        mask: Some([9; 4]),
                        payload_len: 0,
                    },
                    6,
                )),
            ),
            // Non-minimal encodings are accepted.
            (
                &[0x82, 0x7E, 0x00, 0x05],
                Some((
                    FrameHeader {
                        fin: true,
                        rsv: 0,
                        opcode: 2,
                        mask: None,
                        payload_len: 5,
                    },
                    4,
                )),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode_header(bytes).ok(), Some(*want), "{bytes:02X?}");
        }
    }

    #[test]
    fn header_rejects_64bit_msb() {
        let err = decode_header(&[0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(err.code, CloseCode::PROTOCOL);
    }

    #[test]
    fn encode_lengths() {
        for (len, hdr) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let payload = vec![7u8; len];
            let mut out = Vec::new();
            encode_frame(Opcode::Binary, true, &payload, &mut out);
            assert_eq!(out.len(), hdr + len);
            let (h, n) = decode_header(&out).unwrap().unwrap();
            assert_eq!(
                (h.fin, h.opcode, h.mask, h.payload_len, n),
                (true, 2, None, len as u64, hdr)
            );
        }
        let mut out = Vec::new();
        encode_frame(Opcode::Text, false, b"Hel", &mut out);
        assert_eq!(out, [0x01, 0x03, b'H', b'e', b'l']);
    }

    #[test]
    fn close_encoding() {
        let mut out = Vec::new();
        encode_close(CloseCode::NORMAL, "bye", &mut out);
        assert_eq!(out, [0x88, 0x05, 0x03, 0xE8, b'b', b'y', b'e']);

        // 200 bytes of 2-byte chars: cut to 122 bytes (61 chars), not 123 (mid-char).
        let long = "é".repeat(100);
        out.clear();
        encode_close(CloseCode::POLICY, &long, &mut out);
        assert_eq!(out[1] as usize, 2 + 122);
        assert!(std::str::from_utf8(&out[4..]).is_ok());

        out.clear();
        encode_close(CloseCode::NO_STATUS, "ignored", &mut out);
        assert_eq!(out, [0x88, 0x00]);
    }

    #[test]
    fn close_code_validity() {
        for c in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            assert!(CloseCode(c).is_valid_on_wire(), "{c}");
        }
        for c in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode(c).is_valid_on_wire(), "{c}");
        }
    }

    #[test]
    fn opcodes() {
        for v in 0..=255u8 {
            match Opcode::from_u8(v) {
                Some(op) => assert_eq!(op.as_u8(), v),
                None => assert!(matches!(v, 3..=7 | 0xB..=0xFF)),
            }
        }
        assert!(Opcode::Ping.is_control() && !Opcode::Continuation.is_control());
    }

    proptest! {
        #[test]
        fn mask_resumes_at_any_offset(
            data in proptest::collection::vec(any::<u8>(), 0..80),
            key in any::<[u8; 4]>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let naive: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            let mut whole = data.clone();
            apply_mask(&mut whole, key, 0);
            prop_assert_eq!(&whole, &naive);
            let cut = cut.index(data.len() + 1);
            let mut pieces = data.clone();
            let (a, b) = pieces.split_at_mut(cut);
            apply_mask(a, key, 0);
            apply_mask(b, key, cut);
            prop_assert_eq!(&pieces, &naive);
        }
    }

    /// Exactly the frame's bytes: `Bytes::from` keeps such a `Vec` without a second allocation.
    #[test]
    fn a_frame_into_an_empty_vec_has_no_spare_capacity() {
        for n in [0, 64, 125, 126, 1000, 65_535, 65_536] {
            let mut out = Vec::new();
            encode_frame(Opcode::Binary, true, &vec![7; n], &mut out);
            assert_eq!(out.len(), server_header_len(n) + n);
            assert_eq!(out.capacity(), out.len(), "payload {n}");
        }
    }
}
