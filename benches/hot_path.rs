// The per-event costs on corelay's hot path, one group per design decision.
//
// Run: `cargo bench --bench hot_path` (quick look: `-- --warm-up-time 1 --measurement-time 2`).
// The WebSocket decoder/unmasking and whole-buffer UTF-8 validation are in `benches/codec.rs`;
// nothing here repeats them.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corelay::backplane::Delivery;
use corelay::timer::TimerWheel;
use corelay_proto::http1::{HeadLimits, parse_request, validate_upgrade};
use corelay_proto::ws::Utf8Validator;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

/// A browser's upgrade request, as Chrome sends it through a typical app (665 bytes).
const UPGRADE: &[u8] = b"GET /ws?token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTQyIn0.c2ln HTTP/1.1\r\n\
Host: rt.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://app.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Cookie: session=3f9a1c0e7b5d4e2f8a6b; theme=dark; _ga=GA1.1.123456789.1700000000\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
Sec-WebSocket-Protocol: corelay.v1\r\n\
\r\n";

fn http1(c: &mut Criterion) {
    // Informs: whether parsing the upgrade head on the loop thread (httparse + owned header copies) is
    // cheap enough next to accept()+SHA-1, or whether connection storms need a zero-copy head.
    let limits = HeadLimits {
        max_header_bytes: 8192,
        max_headers: 64,
    };
    let mut g = c.benchmark_group("http1");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_upgrade", |b| {
        b.iter(|| {
            let (head, n) = parse_request(black_box(UPGRADE), &limits).unwrap().unwrap();
            let up = validate_upgrade(&head, &["corelay.v1"], &[]).unwrap();
            black_box((n, up))
        })
    });
    g.finish();
}

const TICK: Duration = Duration::from_millis(10); // as the event loop configures it
const SLOTS: usize = 4096;
const TIMERS: u64 = 100_000;
const SPAN: Duration = Duration::from_secs(30);

/// A wheel holding `TIMERS` deadlines spread over `SPAN` after `origin`, in a scrambled order (connections
/// do not arrive sorted by deadline).
fn full_wheel(origin: Instant) -> TimerWheel<u64> {
    let mut w = TimerWheel::new(TICK, SLOTS, origin);
    let step = SPAN / TIMERS as u32;
    for i in 0..TIMERS {
        let k = (i * 7919) % TIMERS; // 7919 is prime, coprime to TIMERS: a permutation
        w.insert(origin + step * (k as u32 + 1), i);
    }
    w
}

fn timer(c: &mut Criterion) {
    // Informs: whether a hashed wheel (O(1) insert/cancel, per-tick slot walk) keeps heartbeats and
    // handshake deadlines for ~100k connections per loop off the profile, versus a heap or per-connection
    // timerfd; and whether a 10 ms tick / 4096 slots is a sound configuration.
    let mut g = c.benchmark_group("timer");
    g.throughput(Throughput::Elements(1));

    // Steady state: a connection arms a deadline and cancels it (handshake done, pong arrived).
    g.bench_function("insert_cancel_100k", |b| {
        let origin = Instant::now();
        let mut w = full_wheel(origin);
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let at = origin + Duration::from_millis(1 + (i * 37) % 30_000);
            let key = w.insert(at, i);
            black_box(w.cancel(black_box(key)))
        });
        assert_eq!(w.len(), TIMERS as usize);
    });

    // One tick of the loop's timer pass over a full wheel (~33 expiries per tick), without re-arming.
    // The wheel drains after 30 s of ticks; it is rebuilt outside the timed section.
    g.bench_function("poll_one_tick_100k", |b| {
        let origin = Instant::now();
        let ticks = (SPAN.as_millis() / TICK.as_millis()) as u32;
        let mut w = full_wheel(origin);
        let mut t = 0u32;
        let mut out = Vec::with_capacity(1024);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if t == ticks {
                    w = full_wheel(origin);
                    t = 0;
                }
                t += 1;
                out.clear();
                let start = Instant::now();
                w.poll_expired(origin + TICK * t, &mut out);
                total += start.elapsed();
                black_box(out.len());
            }
            total
        });
    });

    // The heartbeat pattern, per tick: 100k connections with a 30 s interval. Each tick the loop asks
    // next_deadline() (before poll()), polls, and re-arms every connection that expired for +30 s. The
    // wheel stays at 100k timers indefinitely.
    g.bench_function("heartbeat_tick_100k", |b| {
        let origin = Instant::now();
        let mut w = full_wheel(origin);
        let mut now = origin;
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            black_box(w.next_deadline());
            now += TICK;
            out.clear();
            w.poll_expired(now, &mut out);
            for &conn in &out {
                w.insert(now + SPAN, conn);
            }
            black_box(out.len())
        });
        assert_eq!(w.len(), TIMERS as usize);
    });
    g.finish();
}

/// A ~200-byte chat message as the router encodes it.
fn message_json() -> String {
    let head = r#"{"type":"message","channel":"room:lobby","offset":123456,"from":"user-4242","ts":1718000000000,"body":""#;
    let json = format!("{head}{}\"}}", "x".repeat(200 - head.len() - 2));
    assert_eq!(json.len(), 200);
    json
}

fn fanout(c: &mut Criterion) {
    // Informs: encoding each message once per transport (shared `Arc<Delivery>`, `Bytes` frames) rather
    // than once per recipient: the one-off encode must be small, and the per-recipient cost a refcount.
    let channel: Arc<str> = Arc::from("room:lobby");
    let json = message_json();
    let mut g = c.benchmark_group("fanout/encode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ws_frame_200B", |b| {
        b.iter_batched(
            || json.clone(),
            |json| Delivery::new(channel.clone(), 123_456, json),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("sse_body_200B", |b| {
        b.iter_batched(
            || Delivery::new(channel.clone(), 123_456, json.clone()),
            |d| {
                black_box(d.sse().len());
                d
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // Informs: the per-recipient cost of fan-out to one hot channel (15,000 subscribers on a loop): one
    // `Bytes` clone (an atomic increment) pushed to each connection's queue.
    let d = Delivery::new(channel, 123_456, json);
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(15_000));
    let mut queue: Vec<Bytes> = Vec::with_capacity(15_000);
    g.bench_function("clone_15000", |b| {
        b.iter(|| {
            queue.clear(); // drops the previous round's clones (a decrement each), as writes complete
            for _ in 0..15_000 {
                queue.push(d.ws.clone());
            }
            black_box(queue.len())
        })
    });
    g.finish();
}

fn utf8(c: &mut Criterion) {
    // Informs: whether validating text incrementally as reads arrive (state carried across pieces cut
    // mid-character) costs more than std's one-shot validation of the whole message; i.e. whether the
    // decoder can validate per read instead of buffering a message first. (Whole-buffer validator vs std
    // is in benches/codec.rs.)
    let mixed = "ascii, ελληνικά, русский, 中文字符, emoji 🎉🚀, ".repeat(700);
    let text = &mixed.as_bytes()[..mixed.floor_char_boundary(64 * 1024)];
    let mut g = c.benchmark_group("utf8");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("std_from_utf8/64KiB_mixed", |b| {
        b.iter(|| black_box(std::str::from_utf8(black_box(text)).is_ok()))
    });
    // 1448: a TCP segment's payload (MSS with timestamps), an odd size that cuts characters.
    for piece in [1448, 16 * 1024] {
        g.bench_function(format!("validator_pieces_{piece}B/64KiB_mixed"), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                let ok = black_box(text).chunks(piece).all(|p| v.feed(p));
                black_box(ok && v.is_complete())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, http1, timer, fanout, utf8);
criterion_main!(benches);
