//! permessage-deflate (RFC 7692), server side: negotiation (`Sec-WebSocket-Extensions` offers → the answer)
//! and the two codecs, each meant to be owned once per event loop, never per connection.
//!
//! corelay always answers `server_no_context_takeover; client_no_context_takeover` (the server may add the
//! client one unasked, §7.1.1.2), so that every message is compressed and decompressed on its own: no LZ77
//! window survives a message, and a connection carries only its negotiated window size (one byte), never a
//! zlib stream. [`Inflater`] and [`Deflater`] are reset per message and shared by every connection of a loop.
//!
//! `server_max_window_bits=N` (9..=15) is honoured by compressing with an N-bit window; N = 8 is declined
//! (that offer is skipped): zlib cannot produce raw DEFLATE with a 256-byte window (it silently uses 9 bits,
//! which could reference 512 bytes back and break the client). `client_max_window_bits` needs nothing from us:
//! the inflater's 15-bit window reads any smaller one, so the answer never limits the client.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::decoder::WsError;
use super::frame::{CloseCode, Opcode};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// What a negotiation settled, all a connection keeps (3 bytes). The client direction is always
/// no-context-takeover; the server direction too unless the operator allowed takeover and the client did not
/// refuse it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The LZ77 window we compress with: 15, or the client's `server_max_window_bits` (9..=15).
    pub server_window_bits: u8,
    /// The client asked for `server_max_window_bits`: the answer must carry it (RFC 7692 §7.1.2.1).
    pub server_window_echo: bool,
    /// The server keeps its compression context from message to message on this connection (a
    /// [`StreamDeflater`] per connection): smaller messages, at the memory and CPU cost of a compressor per
    /// connection and of compressing each delivery for each subscriber.
    pub server_takeover: bool,
}

impl Negotiated {
    /// The value of the answer's `Sec-WebSocket-Extensions` header.
    pub fn response(&self) -> String {
        let mut s = String::from(if self.server_takeover {
            "permessage-deflate; client_no_context_takeover"
        } else {
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        });
        if self.server_window_echo {
            s.push_str("; server_max_window_bits=");
            s.push_str(&self.server_window_bits.to_string());
        }
        s
    }
}

/// Picks the first acceptable `permessage-deflate` offer of a `Sec-WebSocket-Extensions` value (all the
/// request's such headers, joined with commas), in the client's order of preference. An offer with an unknown
/// or repeated parameter, a value where none belongs, a missing or invalid value, or `server_max_window_bits=8`
/// is declined and the next one considered. `None`: answer without the extension. Never panics.
pub fn negotiate(offers: &str) -> Option<Negotiated> {
    negotiate_with(offers, false)
}

/// [`negotiate`], where `allow_takeover` lets the server keep its compression context across messages unless
/// the chosen offer says `server_no_context_takeover`.
pub fn negotiate_with(offers: &str, allow_takeover: bool) -> Option<Negotiated> {
    split_quoted(offers, b',').find_map(|o| accept_offer(o, allow_takeover))
}

/// One offer: `permessage-deflate *( ";" param [ "=" value ] )`.
fn accept_offer(offer: &str, allow_takeover: bool) -> Option<Negotiated> {
    let mut parts = split_quoted(offer, b';');
    if !parts.next()?.trim().eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    // Seen parameters, one bit each: a repeat declines the offer (§7, "MUST decline").
    let mut seen = 0u8;
    let mut server_bits = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (param.trim(), None),
        };
        let (bit, ok) = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => (1, value.is_none()),
            "client_no_context_takeover" => (2, value.is_none()),
            "server_max_window_bits" => {
                // A value is required (§7.1.2.1); 8 is valid but beyond zlib.
                server_bits = value.as_deref().and_then(window_bits);
                (4, server_bits.is_some_and(|b| b >= 9))
            }
            // The value is optional here (§7.1.2.2).
            "client_max_window_bits" => {
                (8, value.as_deref().is_none_or(|v| window_bits(v).is_some()))
            }
            _ => return None,
        };
        if !ok || seen & bit != 0 {
            return None;
        }
        seen |= bit;
    }
    Some(Negotiated {
        server_window_bits: server_bits.unwrap_or(15),
        server_window_echo: server_bits.is_some(),
        server_takeover: allow_takeover && seen & 1 == 0,
    })
}

/// `8`..=`15`, decimal, no leading zero (RFC 7692 §7.1.2.1).
fn window_bits(v: &str) -> Option<u8> {
    match v.as_bytes() {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// A token or a quoted-string (RFC 7230 §3.2.6) as its content; `None` for an unterminated quote.
fn unquote(v: &str) -> Option<String> {
    let Some(inner) = v.strip_prefix('"') else {
        return Some(v.to_owned());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Splits at `sep` outside quoted strings (a quoted value may hold a comma or a semicolon).
fn split_quoted(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, b) in s.bytes().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                _ if b == sep && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// The tail a sender strips from each compressed message (an empty stored block, RFC 7692 §7.2.1) and the
/// receiver appends back before inflating (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// How much output buffer the inflater adds at a time (bounded by the message limit).
const INFLATE_CHUNK: usize = 16 * 1024;

/// An inflater output buffer bigger than this is not kept between messages.
const RETAIN: usize = 256 * 1024;

/// Decompresses whole messages, one at a time, each with a fresh window (client_no_context_takeover). One per
/// event loop: about 40 KiB (zlib state and its 32 KiB window) plus the output buffer.
pub struct Inflater {
    z: Decompress,
    out: Vec<u8>,
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflater {
    pub fn new() -> Self {
        Self {
            z: Decompress::new(false),
            out: Vec::new(),
        }
    }

    /// Inflates one message's payload (RSV1 set, tail stripped by the sender). The output never grows past
    /// `max` bytes: one more and it stops with 1009, so a zip bomb costs at most `max` bytes and the CPU to
    /// produce them. Corrupt DEFLATE data is 1007, and so is invalid UTF-8 in a text message.
    pub fn inflate(&mut self, payload: &[u8], text: bool, max: usize) -> Result<&[u8], WsError> {
        if self.out.capacity() > RETAIN {
            self.out = Vec::new();
        }
        self.out.clear();
        self.z.reset(false);
        for (i, input) in [payload, &TAIL[..]].into_iter().enumerate() {
            let mut pos = 0;
            loop {
                if self.out.len() == self.out.capacity() {
                    if self.out.len() > max {
                        return Err(too_big());
                    }
                    // Capacity never exceeds max + 1: one byte past the limit proves the message too big.
                    let room =
                        (max + 1 - self.out.len()).min(self.out.capacity().max(INFLATE_CHUNK));
                    self.out.reserve_exact(room);
                }
                let (in0, out0) = (self.z.total_in(), self.z.total_out());
                let status = self
                    .z
                    .decompress_vec(&input[pos..], &mut self.out, FlushDecompress::None)
                    .map_err(|_| corrupt())?;
                pos += (self.z.total_in() - in0) as usize;
                if self.out.len() > max {
                    return Err(too_big());
                }
                if status == Status::StreamEnd {
                    // A final block (BFINAL) ends the message: bytes after it are an error, our tail is not.
                    if i == 0 && pos < input.len() {
                        return Err(corrupt());
                    }
                    return self.finish(text);
                }
                let room = self.out.len() < self.out.capacity();
                if pos == input.len() && room {
                    break; // everything this input gives is out
                }
                let progress = self.z.total_in() != in0 || self.z.total_out() != out0;
                if !progress && room {
                    return Err(corrupt());
                }
            }
        }
        self.finish(text)
    }

    fn finish(&self, text: bool) -> Result<&[u8], WsError> {
        if text && std::str::from_utf8(&self.out).is_err() {
            return Err(WsError {
                code: CloseCode::INVALID_DATA,
                reason: "invalid UTF-8 in text message",
            });
        }
        Ok(&self.out)
    }

    /// Heap bytes held between messages (the output buffer).
    pub fn heap_bytes(&self) -> usize {
        self.out.capacity()
    }
}

const fn corrupt() -> WsError {
    WsError {
        code: CloseCode::INVALID_DATA,
        reason: "invalid permessage-deflate data",
    }
}

const fn too_big() -> WsError {
    WsError {
        code: CloseCode::TOO_BIG,
        reason: "message too big (inflated)",
    }
}

/// Compresses whole messages into frames with RSV1 set, each with a fresh window (server_no_context_takeover).
/// One per event loop; a compressor per window size is made the first time a client asks for it (zlib-rs:
/// about 270 KiB at 15 bits, less below).
pub struct Deflater {
    level: Compression,
    /// Index: window bits - 9.
    z: [Option<Box<Compress>>; 7],
    scratch: Vec<u8>,
}

impl Deflater {
    /// `level`: 1 (fastest) to 9 (smallest).
    pub fn new(level: u32) -> Self {
        Self {
            level: Compression::new(level.clamp(1, 9)),
            z: Default::default(),
            scratch: Vec::new(),
        }
    }

    /// Appends one final frame with `payload` compressed (RSV1 set) to `out`, using a window of
    /// `window_bits` (9..=15). Returns `false` and appends nothing when compressing would not make the frame
    /// smaller (the caller sends it plain: RSV1 is per message).
    pub fn frame(
        &mut self,
        opcode: Opcode,
        payload: &[u8],
        window_bits: u8,
        out: &mut Vec<u8>,
    ) -> bool {
        match self.compress(payload, window_bits) {
            Some(body) if body.len() < payload.len() => {
                super::frame::encode_frame_rsv1(opcode, body, out);
                true
            }
            _ => false,
        }
    }

    /// `payload` as one permessage-deflate message body: a fresh window of `window_bits` (9..=15), a sync
    /// flush, the tail stripped. `None` if zlib fails (never seen; the caller sends the message plain).
    pub fn compress(&mut self, payload: &[u8], window_bits: u8) -> Option<&[u8]> {
        let bits = window_bits.clamp(9, 15);
        let level = self.level;
        let z = self.z[usize::from(bits - 9)]
            .get_or_insert_with(|| Box::new(Compress::new_with_window_bits(level, false, bits)));
        z.reset();
        if self.scratch.capacity() > RETAIN {
            self.scratch = Vec::new();
        }
        let buf = &mut self.scratch;
        buf.clear();
        buf.reserve(payload.len() / 2 + 64);
        let mut pos = 0;
        loop {
            let in0 = z.total_in();
            z.compress_vec(&payload[pos..], buf, FlushCompress::Sync)
                .ok()?;
            pos += (z.total_in() - in0) as usize;
            if pos == payload.len() && buf.len() < buf.capacity() {
                break;
            }
            buf.reserve(buf.capacity().max(64));
        }
        // A sync flush ends with the empty stored block the receiver appends back (§7.2.1).
        buf.strip_suffix(&TAIL)
    }
}

/// Compresses the messages of ONE connection with a context that survives from message to message (server
/// context takeover): later messages may refer back to earlier ones, which is what makes short, similar chat
/// messages small. Every message this connection receives compressed must go through it, in order: a message
/// compressed elsewhere would put bytes in the client's window that this compressor does not know about. Costs
/// a zlib stream per connection (measured in docs/BENCHMARKS.md).
pub struct StreamDeflater {
    z: Compress,
    scratch: Vec<u8>,
}

impl StreamDeflater {
    /// `level` 1..=9; `window_bits` 9..=15.
    pub fn new(level: u32, window_bits: u8) -> Self {
        Self {
            z: Compress::new_with_window_bits(
                Compression::new(level.clamp(1, 9)),
                false,
                window_bits.clamp(9, 15),
            ),
            scratch: Vec::new(),
        }
    }

    /// Appends one final frame with `payload` compressed in this connection's context (RSV1 set) to `out`.
    /// Always compressed, even when that is not smaller: the context has seen the message, so the client must
    /// see it in its window too. `false` (nothing appended) only if zlib fails: the context is then unusable and
    /// the caller must close the connection.
    pub fn frame(&mut self, opcode: Opcode, payload: &[u8], out: &mut Vec<u8>) -> bool {
        if self.scratch.capacity() > RETAIN {
            self.scratch = Vec::new();
        }
        let buf = &mut self.scratch;
        buf.clear();
        buf.reserve(payload.len() / 2 + 64);
        let mut pos = 0;
        loop {
            let in0 = self.z.total_in();
            if self
                .z
                .compress_vec(&payload[pos..], buf, FlushCompress::Sync)
                .is_err()
            {
                return false;
            }
            pos += (self.z.total_in() - in0) as usize;
            if pos == payload.len() && buf.len() < buf.capacity() {
                break;
            }
            buf.reserve(buf.capacity().max(64));
        }
        match buf.strip_suffix(&TAIL) {
            Some(body) => {
                super::frame::encode_frame_rsv1(opcode, body, out);
                // An idle connection keeps the zlib stream, not a message's worth of output.
                if self.scratch.capacity() > 4096 {
                    self.scratch = Vec::new();
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests;
