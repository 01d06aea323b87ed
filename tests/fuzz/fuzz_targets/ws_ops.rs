//! A fuzzer-driven sequence of client operations (fragmented text/binary messages with random
//! masks, pings and pongs interleaved, an optional close) encoded as valid masked client frames,
//! fed to the decoder in fuzzer-chosen pieces: the decoder must give back exactly what was sent.
//! No seeds (any bytes are a valid choice sequence); run with
//! `cargo fuzz run --fuzz-dir tests/fuzz ws_ops tests/fuzz/corpus/ws_ops` (see `docs/FUZZING.md`).
#![no_main]

use corelay_proto::ws::{CloseCode, Decoder, Event, Limits, apply_mask};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_frame_len: 1 << 20,
    max_message_len: 1 << 20,
};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

/// Reads the fuzzer's bytes as choices; zeros once exhausted.
struct Choices<'a>(&'a [u8]);

impl<'a> Choices<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn key(&mut self) -> [u8; 4] {
        [self.u8(), self.u8(), self.u8(), self.u8()]
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn client_frame(b0: u8, payload: &[u8], key: [u8; 4], out: &mut Vec<u8>) {
    out.push(b0);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key, 0);
}

fn control(c: &mut Choices, out: &mut Vec<u8>) -> Ev {
    let ping = c.u8() & 1 == 0;
    let len = usize::from(c.u8() % 126);
    let payload = c.take(len).to_vec();
    client_frame(if ping { 0x89 } else { 0x8A }, &payload, c.key(), out);
    if ping {
        Ev::Ping(payload)
    } else {
        Ev::Pong(payload)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices(data);
    let mut stream = Vec::new();
    let mut want = Vec::new();
    let mut ops = 0;
    while !c.is_empty() && ops < 64 {
        ops += 1;
        match c.u8() % 4 {
            0 | 1 => {
                let text = c.u8() & 1 == 0;
                let len = usize::from(c.u16() % 4096);
                let raw = c.take(len);
                let payload = if text {
                    String::from_utf8_lossy(raw).into_owned().into_bytes()
                } else {
                    raw.to_vec()
                };
                let frags = 1 + usize::from(c.u8() % 5);
                let mut cuts: Vec<usize> = (1..frags)
                    .map(|_| usize::from(c.u16()) % (payload.len() + 1))
                    .collect();
                cuts.sort_unstable();
                cuts.push(payload.len());
                let mut last = 0;
                let mut after = Vec::new();
                for (i, &end) in cuts.iter().enumerate() {
                    let fin = i + 1 == cuts.len();
                    let op = match (i, text) {
                        (0, true) => 0x1,
                        (0, false) => 0x2,
                        _ => 0x0,
                    };
                    client_frame(
                        (u8::from(fin) << 7) | op,
                        &payload[last..end],
                        c.key(),
                        &mut stream,
                    );
                    last = end;
                    if c.u8() % 4 == 0 {
                        let ev = control(&mut c, &mut stream);
                        if fin { after.push(ev) } else { want.push(ev) }
                    }
                }
                want.push(if text {
                    Ev::Text(payload)
                } else {
                    Ev::Binary(payload)
                });
                want.extend(after);
            }
            _ => want.push(control(&mut c, &mut stream)),
        }
    }
    if c.u8() & 1 == 1 {
        const CODES: [u16; 6] = [1000, 1001, 1003, 1011, 3000, 4999];
        let code = CODES[usize::from(c.u8()) % CODES.len()];
        let len = usize::from(c.u8() % 124);
        let reason = String::from_utf8_lossy(c.take(len)).into_owned();
        let reason = reason[..reason.floor_char_boundary(123)].to_owned();
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        client_frame(0x88, &payload, c.key(), &mut stream);
        want.push(Ev::Close(Some(code), reason));
    }

    // Feed in pieces chosen by what is left of the input.
    let mut cuts: Vec<usize> = (0..c.u8() % 16)
        .map(|_| usize::from(c.u16()) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    cuts.push(stream.len());
    let mut dec = Decoder::new(LIMITS);
    let mut got = Vec::new();
    let mut pending = Vec::new();
    let mut last = 0;
    'feed: for &cut in &cuts {
        pending.extend_from_slice(&stream[last..cut]);
        last = cut;
        let mut off = 0;
        loop {
            match dec.decode(&mut pending[off..]) {
                Err(e) => panic!("valid stream rejected: {e}"),
                Ok((0, None)) => break,
                Ok((n, ev)) => {
                    off += n;
                    let closed = matches!(ev, Some(Event::Close { .. }));
                    match ev {
                        None => {}
                        Some(Event::Text(p)) => got.push(Ev::Text(p.to_vec())),
                        Some(Event::Binary(p)) => got.push(Ev::Binary(p.to_vec())),
                        Some(Event::Ping(p)) => got.push(Ev::Ping(p.to_vec())),
                        Some(Event::Pong(p)) => got.push(Ev::Pong(p.to_vec())),
                        Some(Event::Close { code, reason }) => {
                            got.push(Ev::Close(code.map(|c: CloseCode| c.0), reason.to_owned()))
                        }
                        Some(Event::Compressed { .. }) => panic!("deflate is not enabled"),
                    }
                    if closed {
                        break 'feed;
                    }
                }
            }
        }
        assert_eq!(off, pending.len());
        pending.clear();
    }
    assert_eq!(got, want);
    assert!(!dec.is_mid_message());
    assert_eq!(dec.heap_bytes(), 0);
});
