// Informs: whether the in-house WebSocket codec (zero-copy decode, u64 unmasking, DFA UTF-8 validator) is fast enough to keep on the hot path, and whether the validator should defer to std::str::from_utf8.
//
// Run: `cargo bench --bench codec`. Each decode iteration unmasks a fresh copy of the frame (the
// copy is made outside the timed section).

use std::hint::black_box;

use corelay_proto::ws::*;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const LIMITS: Limits = Limits {
    max_frame_len: 1 << 20,
    max_message_len: 1 << 20,
};

/// A masked client binary frame carrying `len` bytes.
fn masked_frame(len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
    let mut out = Vec::new();
    encode_frame(Opcode::Binary, true, &payload, &mut out);
    // Turn the server frame into a client one: set the mask bit, insert the key, mask.
    let key = [0x37, 0xFA, 0x21, 0x3D];
    let hdr = out.len() - len;
    out[1] |= 0x80;
    out.splice(hdr..hdr, key);
    apply_mask(&mut out[hdr + 4..], key, 0);
    out
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_decode_masked_binary");
    for (name, len) in [("64B", 64), ("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let frame = masked_frame(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || frame.clone(),
                |buf| {
                    let mut dec = Decoder::new(LIMITS);
                    match dec.decode(buf) {
                        Ok((n, Some(Event::Binary(p)))) => {
                            black_box((n, p.len()));
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn utf8(c: &mut Criterion) {
    let ascii = "The quick brown fox jumps over the lazy dog. ".repeat(1500);
    let mixed = "ascii, ελληνικά, русский, 中文字符, emoji 🎉🚀, ".repeat(700);
    let mut g = c.benchmark_group("ws_utf8_64KiB");
    for (name, text) in [("ascii", &ascii), ("mixed", &mixed)] {
        let bytes = &text.as_bytes()[..text.floor_char_boundary(64 * 1024)];
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("validator/{name}"), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                black_box(v.feed(black_box(bytes)) && v.is_complete())
            })
        });
        g.bench_function(format!("std_from_utf8/{name}"), |b| {
            b.iter(|| black_box(std::str::from_utf8(black_box(bytes)).is_ok()))
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let payload = [0x5Au8; 64];
    let mut out = Vec::with_capacity(128);
    let mut g = c.benchmark_group("ws_encode");
    g.throughput(Throughput::Bytes(64));
    g.bench_function("encode_frame_64B", |b| {
        b.iter(|| {
            out.clear();
            encode_frame(Opcode::Binary, true, black_box(&payload), &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, decode, utf8, encode);
criterion_main!(benches);
