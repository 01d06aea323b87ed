//! Unit and property tests of permessage-deflate: negotiation table, RFC 7692 §7.2.3 examples, windows,
//! zip bomb, corrupt data, and the decoder's RSV rules with deflate on.

use super::*;
use crate::ws::decode_header;

fn n(bits: u8) -> Option<Negotiated> {
    Some(Negotiated {
        server_window_bits: bits,
        server_window_echo: bits != 15,
        server_takeover: false,
    })
}

const PLAIN: Option<Negotiated> = Some(Negotiated {
    server_window_bits: 15,
    server_window_echo: false,
    server_takeover: false,
});

#[test]
fn negotiation_table() {
    let echo15 = Some(Negotiated {
        server_window_bits: 15,
        server_window_echo: true,
        server_takeover: false,
    });
    let cases: &[(&str, Option<Negotiated>)] = &[
        ("", None),
        ("x-webkit-deflate-frame", None),
        ("permessage-deflate", PLAIN),
        ("PerMessage-Deflate", PLAIN),
        ("  permessage-deflate  ", PLAIN),
        // RFC 7692 §7.1 examples, and what browsers send.
        ("permessage-deflate; client_max_window_bits", PLAIN),
        ("permessage-deflate; client_max_window_bits=10", PLAIN),
        ("permessage-deflate; server_no_context_takeover", PLAIN),
        ("permessage-deflate; client_no_context_takeover", PLAIN),
        ("permessage-deflate; server_max_window_bits=10", n(10)),
        ("permessage-deflate; server_max_window_bits=15", echo15),
        (
            "permessage-deflate;server_max_window_bits=9;client_max_window_bits",
            n(9),
        ),
        ("permessage-deflate; server_max_window_bits=\"12\"", n(12)),
        // Autobahn 13.7: the first offer has bits 9.
        (
            "permessage-deflate; client_no_context_takeover; client_max_window_bits; server_no_context_takeover; server_max_window_bits=9, permessage-deflate",
            n(9),
        ),
        // RFC 7692 §7.1.3 example: the first offer declined (8 is beyond zlib), the second accepted.
        (
            "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10",
            n(10),
        ),
        ("permessage-deflate; server_max_window_bits=8", None),
        // Invalid: decline that offer, take the next.
        ("permessage-deflate; server_max_window_bits", None),
        ("permessage-deflate; server_max_window_bits=16", None),
        ("permessage-deflate; server_max_window_bits=7", None),
        ("permessage-deflate; server_max_window_bits=010", None),
        ("permessage-deflate; server_max_window_bits=1a", None),
        ("permessage-deflate; client_max_window_bits=0", None),
        ("permessage-deflate; client_max_window_bits=", None),
        ("permessage-deflate; server_no_context_takeover=1", None),
        ("permessage-deflate; client_no_context_takeover=\"\"", None),
        ("permessage-deflate; mystery", None),
        (
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            None,
        ),
        (
            "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
            None,
        ),
        ("permessage-deflate; mystery, permessage-deflate", PLAIN),
        (
            "foo, permessage-deflate; server_max_window_bits=11, permessage-deflate",
            n(11),
        ),
        ("foo; x=\"a, permessage-deflate\", bar", None),
        ("foo; x=\"a, permessage-deflate", None),
        ("permessage-deflate; server_max_window_bits=\"1", None),
        (";;;,,,==", None),
        ("permessage-deflate;", None),
    ];
    for (offer, want) in cases {
        assert_eq!(negotiate(offer), *want, "{offer:?}");
        // Our answer is itself an acceptable offer with the same outcome.
        if let Some(n) = want {
            assert_eq!(negotiate(&n.response()), *want, "{offer:?}");
        }
    }
}

#[test]
fn takeover_only_when_allowed_and_not_refused() {
    let t = negotiate_with("permessage-deflate", true).unwrap();
    assert!(t.server_takeover);
    assert_eq!(
        t.response(),
        "permessage-deflate; client_no_context_takeover"
    );
    let refused = negotiate_with("permessage-deflate; server_no_context_takeover", true).unwrap();
    assert!(!refused.server_takeover);
    assert_eq!(
        refused.response(),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
    assert!(
        !negotiate_with("permessage-deflate", false)
            .unwrap()
            .server_takeover
    );
    let small = negotiate_with("permessage-deflate; server_max_window_bits=10", true).unwrap();
    assert!(small.server_takeover);
    assert_eq!(
        small.response(),
        "permessage-deflate; client_no_context_takeover; server_max_window_bits=10"
    );
}

#[test]
fn a_stream_deflater_keeps_its_context_and_a_client_window_reads_it() {
    // Three similar chat messages through one connection's context: the later ones refer back to the first
    // and come out smaller; a client inflater that keeps its window (as RFC 7692 clients do when the server
    // takes over) reads them all.
    let msgs: Vec<String> = (0..3)
        .map(|i| format!(r#"{{"type":"message","channel":"conversation:team","offset":{i},"from":"alice","body":"see you at the standup"}}"#))
        .collect();
    let mut z = StreamDeflater::new(6, 15);
    let mut client = Decompress::new(false);
    let mut sizes = Vec::new();
    for m in &msgs {
        let mut frame = Vec::new();
        assert!(z.frame(Opcode::Text, m.as_bytes(), &mut frame));
        let (h, hl) = decode_header(&frame).unwrap().unwrap();
        assert_eq!(h.rsv, 0b100, "RSV1");
        let mut body = frame[hl..].to_vec();
        body.extend_from_slice(&TAIL);
        sizes.push(body.len() - 4);
        let mut out = Vec::with_capacity(1024);
        client
            .decompress_vec(&body, &mut out, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(out, m.as_bytes());
    }
    assert!(sizes[1] < sizes[0] / 2, "context helps: {sizes:?}");
    // The stateless deflater cannot do that.
    let mut fresh = Deflater::new(6);
    let alone = fresh.compress(msgs[1].as_bytes(), 15).unwrap().len();
    assert!(sizes[1] < alone, "{} vs {alone}", sizes[1]);
}

#[test]
fn response_header() {
    assert_eq!(
        PLAIN.unwrap().response(),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
    assert_eq!(
        n(10).unwrap().response(),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"
    );
}

#[test]
fn garbage_never_panics() {
    let bytes: Vec<u8> = (0u8..=255).collect();
    for i in 0..bytes.len() {
        for j in i..bytes.len().min(i + 40) {
            if let Ok(s) = std::str::from_utf8(&bytes[i..j]) {
                let _ = negotiate(s);
            }
        }
    }
    for s in ["\"", "\\", "\"\\", "permessage-deflate; a=\"\\", "é;é=é,é"] {
        let _ = negotiate(s);
    }
}

#[test]
fn rfc7692_hello_example() {
    // §7.2.3.1: "Hello" compressed without context takeover.
    let mut d = Deflater::new(6);
    let mut out = Vec::new();
    assert_eq!(
        d.compress(b"Hello", 15).unwrap(),
        [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]
    );
    // 5 bytes do not get smaller (7 compressed): sent plain.
    assert!(!d.frame(Opcode::Text, b"Hello", 15, &mut out));
    assert!(out.is_empty());
    let mut inf = Inflater::new();
    let got = inf.inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], true, 100);
    assert_eq!(got.unwrap(), b"Hello");
    // §7.2.3.3: the same with a stored (uncompressed) block.
    let got = inf.inflate(
        &[
            0x00, 0x05, 0x00, 0xfa, 0xff, b'H', b'e', b'l', b'l', b'o', 0x00,
        ],
        true,
        100,
    );
    assert_eq!(got.unwrap(), b"Hello");
    // §7.2.3.4: two blocks in one message.
    let got = inf.inflate(
        &[
            0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
        ],
        true,
        100,
    );
    assert_eq!(got.unwrap(), b"Hello");
    // §7.2.3.5: a final block (BFINAL set), then nothing.
    let got = inf.inflate(&[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], true, 100);
    assert_eq!(got.unwrap(), b"Hello");
    // An empty message compressed (§7.2.3.6).
    assert_eq!(inf.inflate(&[0x00], true, 100).unwrap(), b"");
    assert_eq!(inf.inflate(&[], false, 100).unwrap(), b"");
}

#[test]
fn roundtrip_every_window() {
    let text: Vec<u8> = (0..5000)
        .flat_map(|i| format!("{{\"seq\":{i},\"body\":\"hello hello\"}}").into_bytes())
        .collect();
    let mut d = Deflater::new(6);
    let mut inf = Inflater::new();
    for bits in 9..=15 {
        let mut out = Vec::new();
        assert!(d.frame(Opcode::Text, &text, bits, &mut out));
        let (h, hl) = decode_header(&out).unwrap().unwrap();
        assert_eq!((h.fin, h.rsv, h.opcode), (true, 4, 1));
        assert_eq!(h.payload_len as usize, out.len() - hl);
        assert!(out.len() < text.len() / 4, "{bits}: {}", out.len());
        // A decompressor announced the same window reads it (zlib does not police distances).
        let mut z = Decompress::new_with_window_bits(false, bits.max(9));
        let mut payload = out[hl..].to_vec();
        payload.extend_from_slice(&TAIL);
        let mut back = Vec::with_capacity(text.len() + 10);
        z.decompress_vec(&payload, &mut back, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(back, text, "{bits}");
        assert_eq!(
            inf.inflate(&out[hl..], true, text.len()).unwrap(),
            &text[..]
        );
    }
    // The same bytes twice: no context carried over.
    let mut a = Vec::new();
    let mut b = Vec::new();
    d.frame(Opcode::Binary, &text, 15, &mut a);
    d.frame(Opcode::Binary, &text, 15, &mut b);
    assert_eq!(a, b);
}

#[test]
fn zip_bomb_stops_at_the_limit() {
    // 16 MiB of zeros compress to ~16 KiB; the limit is 1 MiB.
    let zeros = vec![0u8; 16 << 20];
    let mut d = Deflater::new(9);
    let mut frame = Vec::new();
    assert!(d.frame(Opcode::Binary, &zeros, 15, &mut frame));
    drop(zeros);
    let hl = decode_header(&frame).unwrap().unwrap().1;
    let mut inf = Inflater::new();
    let err = inf.inflate(&frame[hl..], false, 1 << 20).unwrap_err();
    assert_eq!(err.code, CloseCode::TOO_BIG);
    assert!(
        inf.out.capacity() <= (1 << 20) + 1,
        "{}",
        inf.out.capacity()
    );
    // Exactly at the limit is fine.
    let mut frame = Vec::new();
    assert!(d.frame(Opcode::Binary, &vec![0u8; 1 << 20], 15, &mut frame));
    let hl = decode_header(&frame).unwrap().unwrap().1;
    assert_eq!(
        inf.inflate(&frame[hl..], false, 1 << 20).unwrap().len(),
        1 << 20
    );
    assert_eq!(
        inf.inflate(&frame[hl..], false, (1 << 20) - 1)
            .unwrap_err()
            .code,
        CloseCode::TOO_BIG
    );
    // Retained buffers are bounded.
    let _ = inf.inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], true, 100);
    assert!(inf.heap_bytes() <= RETAIN);
}

#[test]
fn corrupt_data_and_bad_utf8() {
    let mut inf = Inflater::new();
    // BTYPE 11 is reserved.
    assert_eq!(
        inf.inflate(&[0xff, 0xff, 0xff], false, 100)
            .unwrap_err()
            .code,
        CloseCode::INVALID_DATA
    );
    // A stored block whose length check fails.
    assert_eq!(
        inf.inflate(&[0x00, 0x05, 0x00, 0x00, 0x00], false, 100)
            .unwrap_err()
            .code,
        CloseCode::INVALID_DATA
    );
    // Data after a final block.
    assert_eq!(
        inf.inflate(&[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00], true, 100)
            .unwrap_err()
            .code,
        CloseCode::INVALID_DATA
    );
    // Valid DEFLATE, invalid UTF-8: 1007 for text, fine for binary.
    let mut d = Deflater::new(6);
    let bad = [0xC0u8; 300];
    let mut f = Vec::new();
    assert!(d.frame(Opcode::Text, &bad, 15, &mut f));
    let hl = decode_header(&f).unwrap().unwrap().1;
    assert_eq!(
        inf.inflate(&f[hl..], true, 1000).unwrap_err().code,
        CloseCode::INVALID_DATA
    );
    assert_eq!(inf.inflate(&f[hl..], false, 1000).unwrap(), &bad[..]);
    // Still usable afterwards.
    assert_eq!(
        inf.inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], true, 100)
            .unwrap(),
        b"Hello"
    );
}

/// A masked client frame with raw first byte `b0`.
fn client(b0: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![b0];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
    out
}

/// Decodes `stream` whole, then byte by byte; both must agree. The first event or error.
fn decode(deflate: bool, stream: &[u8]) -> Result<(bool, bool, Vec<u8>), u16> {
    let run = |cuts: bool| {
        let mut d = crate::ws::Decoder::new(crate::ws::Limits {
            max_frame_len: 1 << 20,
            max_message_len: 1 << 20,
        });
        if deflate {
            d.enable_deflate();
        }
        let mut pending = Vec::new();
        let step = if cuts { 1 } else { stream.len().max(1) };
        for piece in stream.chunks(step) {
            pending.extend_from_slice(piece);
            let mut off = 0;
            loop {
                match d.decode(&mut pending[off..]) {
                    Err(e) => return Err(e.code.0),
                    Ok((0, None)) => break,
                    Ok((n, None)) => off += n,
                    Ok((_, Some(crate::ws::Event::Compressed { text, payload }))) => {
                        return Ok((true, text, payload.to_vec()));
                    }
                    Ok((_, Some(crate::ws::Event::Text(p)))) => {
                        return Ok((false, true, p.to_vec()));
                    }
                    Ok((_, Some(crate::ws::Event::Binary(p)))) => {
                        return Ok((false, false, p.to_vec()));
                    }
                    Ok((_, Some(_))) => return Err(0),
                }
            }
            pending.clear();
        }
        Err(1)
    };
    let whole = run(false);
    assert_eq!(whole, run(true), "whole vs byte by byte");
    whole
}

#[test]
fn decoder_rsv_rules() {
    let hello = [0xf2u8, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    // Not negotiated: RSV1 is still 1002.
    assert_eq!(decode(false, &client(0xC1, &hello)), Err(1002));
    // Negotiated: a compressed text message, UTF-8 unchecked (these bytes are not UTF-8).
    assert_eq!(
        decode(true, &client(0xC1, &hello)),
        Ok((true, true, hello.to_vec()))
    );
    assert_eq!(
        decode(true, &client(0xC2, &hello)),
        Ok((true, false, hello.to_vec()))
    );
    // Fragmented: RSV1 on the first frame only.
    let mut s = client(0x41, &hello[..3]);
    s.extend(client(0x80, &hello[3..]));
    assert_eq!(decode(true, &s), Ok((true, true, hello.to_vec())));
    let mut s = client(0x41, &hello[..3]);
    s.extend(client(0xC0, &hello[3..]));
    assert_eq!(decode(true, &s), Err(1002), "RSV1 on a continuation frame");
    // Control frames never carry RSV1; RSV2 and RSV3 stay errors.
    for b0 in [0xC9u8, 0xCA, 0xC8, 0xA1, 0x91, 0xE1] {
        assert_eq!(decode(true, &client(b0, b"")), Err(1002), "{b0:02X}");
    }
    // A plain message still has its UTF-8 checked.
    assert_eq!(decode(true, &client(0x81, &[0xC0, 0x80])), Err(1007));
    assert_eq!(
        decode(true, &client(0x81, b"hi")),
        Ok((false, true, b"hi".to_vec()))
    );
    // A compressed message after a plain one, and a plain one after a compressed one.
    let mut s = client(0x01, b"ab");
    s.extend(client(0x80, b"c"));
    assert_eq!(decode(true, &s), Ok((false, true, b"abc".to_vec())));
}

proptest::proptest! {
    #[test]
    fn inflate_never_panics_nor_passes_the_limit(
        data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        max in 0usize..2000,
    ) {
        let mut inf = Inflater::new();
        if let Ok(out) = inf.inflate(&data, false, max) {
            proptest::prop_assert!(out.len() <= max);
        }
        proptest::prop_assert!(inf.heap_bytes() <= max + 1 + INFLATE_CHUNK);
    }

    #[test]
    fn compress_then_inflate_round_trips(
        data in proptest::collection::vec(0u8..4, 0..3000),
        bits in 9u8..=15,
    ) {
        let mut d = Deflater::new(6);
        let body = d.compress(&data, bits).unwrap().to_vec();
        let mut inf = Inflater::new();
        proptest::prop_assert_eq!(inf.inflate(&body, false, data.len()).unwrap(), &data[..]);
    }
}
