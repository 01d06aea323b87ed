//! The server-side frame decoder: resumable, sans-IO, zero-copy where it can be.
//!
//! About 510 lines of decoder (permessage-deflate's RSV1 rules included); the rest of the file is its unit and
//! property tests.

use super::frame::{CloseCode, FrameHeader, MAX_HEADER_LEN, Opcode, apply_mask, decode_header};
use super::utf8::Utf8Validator;

/// Size limits, checked before anything is reserved.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest payload of a single frame; a bigger header is refused with 1009.
    pub max_frame_len: u64,
    /// Largest data message (all fragments together); refused with 1009.
    pub max_message_len: usize,
}

/// A protocol failure, mapped to the close code the server must send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {})", .code.0)]
pub struct WsError {
    pub code: CloseCode,
    pub reason: &'static str,
}

impl WsError {
    pub(crate) const fn protocol(reason: &'static str) -> Self {
        Self {
            code: CloseCode::PROTOCOL,
            reason,
        }
    }

    const fn invalid_data(reason: &'static str) -> Self {
        Self {
            code: CloseCode::INVALID_DATA,
            reason,
        }
    }

    const fn too_big(reason: &'static str) -> Self {
        Self {
            code: CloseCode::TOO_BIG,
            reason,
        }
    }
}

/// What the peer sent, one message or control frame at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole text message; its UTF-8 is already validated.
    Text(&'a [u8]),
    /// A whole binary message.
    Binary(&'a [u8]),
    /// A whole data message sent compressed (RSV1 on its first frame; only once
    /// [`Decoder::enable_deflate`] was called): the payload as on the wire, neither inflated nor
    /// UTF-8-checked. The caller inflates it with a [`super::deflate::Inflater`], which bounds the size
    /// and validates a text message.
    Compressed {
        text: bool,
        payload: &'a [u8],
    },
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// `code` is `None` when the close payload was empty; the code is then 1005 by the RFC.
    Close {
        code: Option<CloseCode>,
        reason: &'a str,
    },
}

/// A frame whose header has been read and whose payload is being consumed.
#[derive(Clone, Copy, Debug)]
struct Frame {
    opcode: Opcode,
    fin: bool,
    mask: [u8; 4],
    /// Payload bytes still to come.
    remaining: u64,
    /// Payload bytes consumed so far (for the mask phase).
    done: u64,
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Between frames; a partial header may sit in `hdr`.
    Header,
    Payload(Frame),
    /// A close frame was delivered.
    Closed,
    /// An error was returned; it is returned again for any further call.
    Failed(WsError),
}

/// An event found by `step`, described without borrowing so that `decode` can build it after.
#[derive(Clone, Copy, Debug)]
enum Ready {
    /// A whole frame payload lying in the caller's buffer.
    InBuf {
        opcode: Opcode,
        compressed: bool,
        start: usize,
        end: usize,
    },
    /// A control payload in `ctrl`.
    InCtrl { opcode: Opcode },
    /// A data message in `delivered`.
    Message { text: bool, compressed: bool },
}

/// The server side of one WebSocket connection's incoming byte stream (the peer is a client).
///
/// Owns no heap while idle: a partial header and a partial control payload live in inline arrays;
/// a fragmented (or partially arrived) data message lives in a `Vec` that exists only while the
/// message is in progress, and is released on the `decode` call after the one that delivered it.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    state: State,
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: u8,
    /// A control payload that arrived in pieces (rare: a whole one is handed out from `buf`); heap only then.
    ctrl: Vec<u8>,
    /// The data message in progress (`Some(true)` = text), if any.
    msg_text: Option<bool>,
    /// The message in progress had RSV1 on its first frame (permessage-deflate).
    msg_compressed: bool,
    /// permessage-deflate was negotiated: RSV1 is allowed on a data message's first frame.
    deflate: bool,
    msg_buf: Vec<u8>,
    /// The last delivered message, kept only until the next `decode` call.
    delivered: Vec<u8>,
    utf8: Utf8Validator,
}

impl Decoder {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::Header,
            hdr: [0; MAX_HEADER_LEN],
            hdr_len: 0,
            ctrl: Vec::new(),
            msg_text: None,
            msg_compressed: false,
            deflate: false,
            msg_buf: Vec::new(),
            delivered: Vec::new(),
            utf8: Utf8Validator::new(),
        }
    }

    /// permessage-deflate was negotiated (RFC 7692): RSV1 on the first frame of a data message marks it
    /// compressed, delivered as [`Event::Compressed`]. RSV1 on a control or continuation frame, and RSV2 or
    /// RSV3 anywhere, stay protocol errors.
    pub fn enable_deflate(&mut self) {
        self.deflate = true;
    }

    /// Feeds bytes. Returns how many bytes of `buf` were consumed and at most one event; call again
    /// on `buf[consumed..]` until it returns `(0, None)`. Payloads are unmasked in place in `buf`.
    /// Everything consumed without producing an event is remembered, so `(n, None)` normally has
    /// `n == buf.len()`. An unfragmented data frame or a control frame whose whole payload is in
    /// `buf` is returned as a slice of `buf`, uncopied.
    ///
    /// After an `Err` or an [`Event::Close`] the caller stops feeding: a later call returns the
    /// same error, or (after a close) an error for any non-empty input.
    pub fn decode<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> Result<(usize, Option<Event<'a>>), WsError> {
        // A control payload delivered by the previous call is released (one still arriving is kept).
        if self.ctrl.capacity() != 0
            && !matches!(&self.state, State::Payload(f) if f.opcode.is_control())
        {
            self.ctrl = Vec::new();
        }
        if self.delivered.capacity() != 0 {
            self.delivered = Vec::new();
        }
        match self.step(buf) {
            Ok((n, None)) => Ok((n, None)),
            Ok((n, Some(ready))) => {
                let this: &'a Self = self;
                let buf: &'a [u8] = buf;
                Ok((n, Some(this.event(ready, buf))))
            }
            Err(e) => {
                self.fail(e);
                Err(e)
            }
        }
    }

    /// `true` while a fragmented message or a partial frame (header or payload) is in progress.
    pub fn is_mid_message(&self) -> bool {
        self.msg_text.is_some() || self.hdr_len != 0 || matches!(self.state, State::Payload(_))
    }

    /// Heap bytes this decoder holds right now (0 when idle).
    pub fn heap_bytes(&self) -> usize {
        self.msg_buf.capacity() + self.delivered.capacity() + self.ctrl.capacity()
    }

    /// After an error nothing more is decoded: every buffer goes (a partial control payload too).
    fn fail(&mut self, e: WsError) {
        self.state = State::Failed(e);
        self.msg_text = None;
        self.msg_compressed = false;
        self.msg_buf = Vec::new();
        self.ctrl = Vec::new();
        self.delivered = Vec::new();
        self.hdr_len = 0;
    }

    fn event<'a>(&'a self, ready: Ready, buf: &'a [u8]) -> Event<'a> {
        match ready {
            Ready::InBuf {
                opcode,
                compressed: true,
                start,
                end,
            } => Event::Compressed {
                text: opcode == Opcode::Text,
                payload: &buf[start..end],
            },
            Ready::InBuf {
                opcode, start, end, ..
            } => make_event(opcode, &buf[start..end]),
            Ready::InCtrl { opcode } => make_event(opcode, &self.ctrl),
            Ready::Message {
                text,
                compressed: true,
            } => Event::Compressed {
                text,
                payload: &self.delivered,
            },
            Ready::Message { text: true, .. } => Event::Text(&self.delivered),
            Ready::Message { text: false, .. } => Event::Binary(&self.delivered),
        }
    }

    /// Checks what the first header byte says, as soon as it arrives.
    fn check_first_byte(&self, b0: u8) -> Result<Opcode, WsError> {
        if b0 & 0x30 != 0 || (b0 & 0x40 != 0 && !self.deflate) {
            return Err(WsError::protocol("reserved bits set"));
        }
        let Some(opcode) = Opcode::from_u8(b0 & 0x0F) else {
            return Err(WsError::protocol("unknown opcode"));
        };
        if b0 & 0x40 != 0 {
            // RFC 7692 §6: RSV1 marks a compressed message on its first frame only.
            if opcode.is_control() {
                return Err(WsError::protocol("RSV1 set on a control frame"));
            }
            if opcode == Opcode::Continuation {
                return Err(WsError::protocol("RSV1 set on a continuation frame"));
            }
        }
        let fin = b0 & 0x80 != 0;
        match opcode {
            Opcode::Close | Opcode::Ping | Opcode::Pong if !fin => {
                Err(WsError::protocol("fragmented control frame"))
            }
            Opcode::Continuation if self.msg_text.is_none() => Err(WsError::protocol(
                "continuation without a message in progress",
            )),
            Opcode::Text | Opcode::Binary if self.msg_text.is_some() => {
                Err(WsError::protocol("new message inside a fragmented message"))
            }
            _ => Ok(opcode),
        }
    }

    /// Checks what the second header byte says, as soon as it arrives.
    fn check_second_byte(opcode: Opcode, b1: u8) -> Result<(), WsError> {
        if b1 & 0x80 == 0 {
            return Err(WsError::protocol("unmasked client frame"));
        }
        if opcode.is_control() && b1 & 0x7F > 125 {
            return Err(WsError::protocol("control frame payload over 125 bytes"));
        }
        Ok(())
    }

    /// Fails fast on an incomplete header whose first bytes are already wrong.
    fn check_partial_header(&self, partial: &[u8]) -> Result<(), WsError> {
        if let Some(&b0) = partial.first() {
            let opcode = self.check_first_byte(b0)?;
            if let Some(&b1) = partial.get(1) {
                Self::check_second_byte(opcode, b1)?;
            }
        }
        Ok(())
    }

    /// Applies the server-side rules to a complete header.
    fn start_frame(&self, h: &FrameHeader) -> Result<Frame, WsError> {
        let b0 = (u8::from(h.fin) << 7) | (h.rsv << 4) | h.opcode;
        let opcode = self.check_first_byte(b0)?;
        let Some(mask) = h.mask else {
            return Err(WsError::protocol("unmasked client frame"));
        };
        if opcode.is_control() && h.payload_len > 125 {
            return Err(WsError::protocol("control frame payload over 125 bytes"));
        }
        if h.payload_len > self.limits.max_frame_len {
            return Err(WsError::too_big("frame too big"));
        }
        if !opcode.is_control() {
            let total = (self.msg_buf.len() as u64).saturating_add(h.payload_len);
            if total > self.limits.max_message_len as u64 {
                return Err(WsError::too_big("message too big"));
            }
        }
        Ok(Frame {
            opcode,
            fin: h.fin,
            mask,
            remaining: h.payload_len,
            done: 0,
        })
    }

    /// Consumes as much of `buf` as it can; stops after the first event.
    fn step(&mut self, buf: &mut [u8]) -> Result<(usize, Option<Ready>), WsError> {
        let mut pos = 0;
        loop {
            match self.state {
                State::Failed(e) => return Err(e),
                State::Closed if buf.is_empty() => return Ok((0, None)),
                State::Closed => return Err(WsError::protocol("data after close frame")),
                State::Header => {
                    if pos == buf.len() {
                        return Ok((pos, None));
                    }
                    let (header, used) = if self.hdr_len == 0 {
                        match decode_header(&buf[pos..])? {
                            Some(found) => found,
                            None => {
                                // An incomplete header is always shorter than MAX_HEADER_LEN.
                                let rest = &buf[pos..];
                                self.check_partial_header(rest)?;
                                self.hdr[..rest.len()].copy_from_slice(rest);
                                self.hdr_len = rest.len() as u8;
                                return Ok((buf.len(), None));
                            }
                        }
                    } else {
                        let have = usize::from(self.hdr_len);
                        let take = (MAX_HEADER_LEN - have).min(buf.len() - pos);
                        let mut joined = self.hdr;
                        joined[have..have + take].copy_from_slice(&buf[pos..pos + take]);
                        match decode_header(&joined[..have + take])? {
                            Some((header, n)) => {
                                self.hdr_len = 0;
                                (header, n - have)
                            }
                            None => {
                                self.check_partial_header(&joined[..have + take])?;
                                self.hdr = joined;
                                self.hdr_len = (have + take) as u8;
                                return Ok((pos + take, None));
                            }
                        }
                    };
                    pos += used;
                    let frame = self.start_frame(&header)?;
                    let control = frame.opcode.is_control();
                    // Only a data message's first frame can have RSV1 here (start_frame checked).
                    let compressed = header.rsv & 0x4 != 0;

                    // Zero-copy: a whole control frame, or a whole unfragmented data message,
                    // already in `buf` is handed out as a slice of `buf`.
                    let avail = (buf.len() - pos) as u64;
                    if frame.remaining <= avail
                        && (control || frame.fin && frame.opcode != Opcode::Continuation)
                    {
                        let start = pos;
                        let end = pos + frame.remaining as usize;
                        let payload = &mut buf[start..end];
                        apply_mask(payload, frame.mask, 0);
                        match frame.opcode {
                            Opcode::Text
                                if !compressed && std::str::from_utf8(payload).is_err() =>
                            {
                                return Err(WsError::invalid_data("invalid UTF-8 in text message"));
                            }
                            Opcode::Close => {
                                check_close(payload)?;
                                self.state = State::Closed;
                            }
                            _ => {}
                        }
                        return Ok((
                            end,
                            Some(Ready::InBuf {
                                opcode: frame.opcode,
                                compressed,
                                start,
                                end,
                            }),
                        ));
                    }

                    if control {
                        self.ctrl.clear();
                    } else if frame.opcode != Opcode::Continuation {
                        self.msg_text = Some(frame.opcode == Opcode::Text);
                        self.msg_compressed = compressed;
                        self.utf8.reset();
                    }
                    self.state = State::Payload(frame);
                }
                State::Payload(mut frame) => {
                    let n = frame.remaining.min((buf.len() - pos) as u64) as usize;
                    let chunk = &mut buf[pos..pos + n];
                    apply_mask(chunk, frame.mask, (frame.done & 3) as usize);
                    if frame.opcode.is_control() {
                        // At most 125 bytes in all: checked on the header.
                        self.ctrl.extend_from_slice(chunk);
                    } else {
                        // A compressed message's UTF-8 is checked once inflated.
                        if self.msg_text == Some(true)
                            && !self.msg_compressed
                            && !self.utf8.feed(chunk)
                        {
                            return Err(WsError::invalid_data("invalid UTF-8 in text message"));
                        }
                        self.msg_buf.extend_from_slice(chunk);
                    }
                    pos += n;
                    frame.remaining -= n as u64;
                    frame.done += n as u64;
                    if frame.remaining != 0 {
                        self.state = State::Payload(frame);
                        return Ok((pos, None));
                    }

                    self.state = State::Header;
                    if frame.opcode.is_control() {
                        if frame.opcode == Opcode::Close {
                            check_close(&self.ctrl)?;
                            self.state = State::Closed;
                        }
                        return Ok((
                            pos,
                            Some(Ready::InCtrl {
                                opcode: frame.opcode,
                            }),
                        ));
                    }
                    if frame.fin {
                        let text = self.msg_text == Some(true);
                        let compressed = self.msg_compressed;
                        if text && !compressed && !self.utf8.is_complete() {
                            return Err(WsError::invalid_data("text message ends mid-character"));
                        }
                        self.msg_text = None;
                        self.msg_compressed = false;
                        self.delivered = std::mem::take(&mut self.msg_buf);
                        return Ok((pos, Some(Ready::Message { text, compressed })));
                    }
                    // A non-final fragment: on to the next header.
                }
            }
        }
    }
}

/// Validates a close payload: empty, or a code valid on the wire and a UTF-8 reason.
fn check_close(payload: &[u8]) -> Result<(), WsError> {
    match payload {
        [] => Ok(()),
        [_] => Err(WsError::protocol("close payload of 1 byte")),
        [hi, lo, reason @ ..] => {
            if !CloseCode(u16::from_be_bytes([*hi, *lo])).is_valid_on_wire() {
                return Err(WsError::protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(WsError::invalid_data("close reason is not UTF-8"));
            }
            Ok(())
        }
    }
}

/// Builds the event for a complete, already validated payload.
fn make_event(opcode: Opcode, payload: &[u8]) -> Event<'_> {
    match opcode {
        Opcode::Text | Opcode::Continuation => Event::Text(payload),
        Opcode::Binary => Event::Binary(payload),
        Opcode::Ping => Event::Ping(payload),
        Opcode::Pong => Event::Pong(payload),
        Opcode::Close => match payload {
            [hi, lo, reason @ ..] => Event::Close {
                code: Some(CloseCode(u16::from_be_bytes([*hi, *lo]))),
                // Validated by check_close; the fallback is never taken.
                reason: std::str::from_utf8(reason).unwrap_or(""),
            },
            _ => Event::Close {
                code: None,
                reason: "",
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::{encode_close, encode_frame};
    use proptest::prelude::*;

    const BIG: Limits = Limits {
        max_frame_len: 1 << 24,
        max_message_len: 1 << 24,
    };

    #[test]
    fn an_error_releases_a_partial_control_payload() {
        // Found by the ws_decode fuzz target: a close frame whose payload arrives in pieces and then turns
        // out invalid (close code 999) left its partial payload on the heap after the error.
        let mut d = Decoder::new(BIG);
        let mask = [1u8, 2, 3, 4];
        let payload = [0x03u8, 0xE7, b'a', b'b'];
        let mut frame = vec![0x88, 0x80 | 4];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        let (head, tail) = frame.split_at_mut(8);
        let (n, ev) = d.decode(head).unwrap();
        assert!(ev.is_none() && n == 8);
        assert!(d.heap_bytes() > 0, "the partial payload is buffered");
        assert!(d.decode(tail).is_err());
        assert_eq!(d.heap_bytes(), 0, "released on error");
    }

    /// An owned copy of an event, for comparisons.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Ev {
        Text(Vec<u8>),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>, String),
    }

    impl From<Event<'_>> for Ev {
        fn from(e: Event<'_>) -> Self {
            match e {
                Event::Text(p) => Ev::Text(p.to_vec()),
                Event::Binary(p) => Ev::Binary(p.to_vec()),
                Event::Ping(p) => Ev::Ping(p.to_vec()),
                Event::Pong(p) => Ev::Pong(p.to_vec()),
                Event::Close { code, reason } => Ev::Close(code.map(|c| c.0), reason.to_owned()),
                Event::Compressed { .. } => unreachable!("deflate is not enabled in these tests"),
            }
        }
    }

    /// The client side of a frame: raw first-byte fields, always masked with `key`.
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

    fn frame(op: Opcode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        client_frame(
            (u8::from(fin) << 7) | op.as_u8(),
            payload,
            [0x37, 0xFA, 0x21, 0x3D],
            &mut out,
        );
        out
    }

    /// Feeds `stream` cut at `cuts` the way a caller does (unconsumed bytes re-fed with the next
    /// read appended); stops at the first error or close.
    fn feed(dec: &mut Decoder, stream: &[u8], cuts: &[usize]) -> (Vec<Ev>, Option<WsError>) {
        let mut pending = Vec::new();
        let mut events = Vec::new();
        let mut last = 0;
        for cut in cuts.iter().copied().chain([stream.len()]) {
            pending.extend_from_slice(&stream[last..cut]);
            last = cut;
            let mut off = 0;
            loop {
                match dec.decode(&mut pending[off..]) {
                    Err(e) => return (events, Some(e)),
                    Ok((0, None)) => break,
                    Ok((n, ev)) => {
                        off += n;
                        if let Some(ev) = ev {
                            let ev = Ev::from(ev);
                            let closed = matches!(ev, Ev::Close(..));
                            events.push(ev);
                            if closed {
                                return (events, None);
                            }
                        }
                    }
                }
            }
            assert_eq!(
                off,
                pending.len(),
                "the decoder buffers what it cannot use yet"
            );
            pending.clear();
        }
        (events, None)
    }

    fn decode_whole(stream: &[u8]) -> (Vec<Ev>, Option<WsError>) {
        feed(&mut Decoder::new(BIG), stream, &[])
    }

    fn decode_bytewise(stream: &[u8]) -> (Vec<Ev>, Option<WsError>) {
        let cuts: Vec<usize> = (1..stream.len()).collect();
        feed(&mut Decoder::new(BIG), stream, &cuts)
    }

    /// The close code of the first error, decoding whole and byte by byte (which must agree).
    fn error_code(stream: &[u8]) -> Option<u16> {
        let whole = decode_whole(stream).1.map(|e| e.code.0);
        let bytewise = decode_bytewise(stream).1.map(|e| e.code.0);
        assert_eq!(whole, bytewise, "whole vs byte-by-byte");
        whole
    }

    #[test]
    fn rfc6455_section_5_7_examples() {
        let hello = b"Hello".to_vec();
        let bin256: Vec<u8> = (0..256).map(|i| i as u8).collect();
        let bin64k: Vec<u8> = (0..65536).map(|i| (i * 7) as u8).collect();
        let cat = |parts: &[Vec<u8>]| parts.concat();

        let mut big256 = vec![0x82, 0xFE, 0x01, 0x00, 1, 2, 3, 4];
        big256.extend(
            bin256
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
        );
        let mut big64k = vec![0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4];
        big64k.extend(
            bin64k
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
        );

        type Row = (&'static str, Vec<u8>, Result<Vec<Ev>, u16>);
        let table: Vec<Row> = vec![
            (
                "unmasked text (server frame: a client error)",
                vec![0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f],
                Err(1002),
            ),
            (
                "masked text",
                vec![
                    0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
                ],
                Ok(vec![Ev::Text(hello.clone())]),
            ),
            (
                "unmasked fragmented",
                vec![0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f],
                Err(1002),
            ),
            (
                "masked fragmented Hel+lo",
                cat(&[
                    frame(Opcode::Text, false, b"Hel"),
                    frame(Opcode::Continuation, true, b"lo"),
                ]),
                Ok(vec![Ev::Text(hello.clone())]),
            ),
            (
                "unmasked ping",
                vec![0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f],
                Err(1002),
            ),
            (
                "masked ping",
                vec![
                    0x89, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
                ],
                Ok(vec![Ev::Ping(hello.clone())]),
            ),
            (
                "masked pong",
                vec![
                    0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
                ],
                Ok(vec![Ev::Pong(hello.clone())]),
            ),
            (
                "256 B binary, 16-bit length",
                big256,
                Ok(vec![Ev::Binary(bin256)]),
            ),
            (
                "64 KiB binary, 64-bit length",
                big64k,
                Ok(vec![Ev::Binary(bin64k)]),
            ),
        ];
        for (name, stream, want) in table {
            let whole = decode_whole(&stream);
            let got = match whole.1 {
                Some(e) => Err(e.code.0),
                None => Ok(whole.0),
            };
            assert_eq!(got, want, "{name}");
            let bytewise = decode_bytewise(&stream);
            assert_eq!(
                bytewise.1.map(|e| e.code.0),
                got.as_ref().err().copied(),
                "{name} bytewise"
            );
            if let Ok(events) = &got {
                assert_eq!(&bytewise.0, events, "{name} bytewise");
            }
        }
    }

    #[test]
    fn unmasked_client_frame_is_1002() {
        let mut out = Vec::new();
        encode_frame(Opcode::Binary, true, b"x", &mut out);
        assert_eq!(error_code(&out), Some(1002));
        let e = decode_whole(&out).1.unwrap();
        assert_eq!(e.reason, "unmasked client frame");
    }

    #[test]
    fn reserved_bits_are_1002() {
        for rsv in [0x40, 0x20, 0x10] {
            let mut f = frame(Opcode::Text, true, b"x");
            f[0] |= rsv;
            assert_eq!(error_code(&f), Some(1002));
        }
    }

    #[test]
    fn unknown_opcodes_are_1002() {
        for op in (3..=7).chain(0xB..=0xF) {
            let mut f = Vec::new();
            client_frame(0x80 | op, b"", [1, 2, 3, 4], &mut f);
            assert_eq!(error_code(&f), Some(1002), "opcode {op:#x}");
        }
    }

    #[test]
    fn control_frame_over_125_is_1002() {
        assert_eq!(error_code(&frame(Opcode::Ping, true, &[0; 125])), None);
        for op in [Opcode::Ping, Opcode::Pong, Opcode::Close] {
            assert_eq!(error_code(&frame(op, true, &[0; 126])), Some(1002));
        }
    }

    #[test]
    fn fragmented_control_frame_is_1002() {
        for op in [Opcode::Ping, Opcode::Pong, Opcode::Close] {
            assert_eq!(error_code(&frame(op, false, b"")), Some(1002));
        }
    }

    #[test]
    fn continuation_without_message_is_1002() {
        assert_eq!(
            error_code(&frame(Opcode::Continuation, true, b"lo")),
            Some(1002)
        );
        // Also right after a completed message.
        let s = [
            frame(Opcode::Text, true, b"a"),
            frame(Opcode::Continuation, false, b"b"),
        ]
        .concat();
        assert_eq!(error_code(&s), Some(1002));
    }

    #[test]
    fn new_message_inside_fragmented_message_is_1002() {
        for op in [Opcode::Text, Opcode::Binary] {
            let s = [frame(Opcode::Binary, false, b"a"), frame(op, true, b"b")].concat();
            assert_eq!(error_code(&s), Some(1002));
        }
    }

    #[test]
    fn control_frames_interleave_with_fragments() {
        let s = [
            frame(Opcode::Text, false, b"Hel"),
            frame(Opcode::Ping, true, b"p1"),
            frame(Opcode::Continuation, false, b""),
            frame(Opcode::Pong, true, b""),
            frame(Opcode::Continuation, true, b"lo"),
        ]
        .concat();
        let want = vec![
            Ev::Ping(b"p1".to_vec()),
            Ev::Pong(vec![]),
            Ev::Text(b"Hello".to_vec()),
        ];
        assert_eq!(decode_whole(&s), (want.clone(), None));
        assert_eq!(decode_bytewise(&s), (want, None));

        let mut dec = Decoder::new(BIG);
        let mut buf = [
            frame(Opcode::Text, false, b"Hel"),
            frame(Opcode::Ping, true, b"p1"),
        ]
        .concat();
        let (n, ev) = dec.decode(&mut buf).unwrap();
        assert_eq!(ev, Some(Event::Ping(b"p1")));
        assert_eq!(n, buf.len());
        assert!(dec.is_mid_message());
    }

    #[test]
    fn frame_over_limit_is_1009_from_the_header() {
        let limits = Limits {
            max_frame_len: 1000,
            max_message_len: 1 << 20,
        };
        let mut dec = Decoder::new(limits);
        // Only the header of a 1001-byte frame: refused before any payload arrives.
        let mut hdr = vec![0x82, 0xFE, 0x03, 0xE9, 1, 2, 3, 4];
        let e = dec.decode(&mut hdr).unwrap_err();
        assert_eq!(e.code, CloseCode::TOO_BIG);
        assert_eq!(dec.heap_bytes(), 0);
        // 2^62 bytes claimed: same.
        let mut dec = Decoder::new(limits);
        let mut hdr = vec![0x82, 0xFF, 0x40, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(dec.decode(&mut hdr).unwrap_err().code, CloseCode::TOO_BIG);
        assert_eq!(dec.heap_bytes(), 0);
        // At the limit: fine.
        let mut dec = Decoder::new(limits);
        let (events, err) = feed(&mut dec, &frame(Opcode::Binary, true, &[5; 1000]), &[]);
        assert_eq!((events.len(), err), (1, None));
    }

    #[test]
    fn message_over_limit_is_1009_before_growing() {
        let limits = Limits {
            max_frame_len: 100,
            max_message_len: 150,
        };
        let s = [
            frame(Opcode::Binary, false, &[1; 100]),
            frame(Opcode::Continuation, false, &[2; 50]),
            frame(Opcode::Continuation, true, &[3; 1]),
        ]
        .concat();
        let mut dec = Decoder::new(limits);
        let (events, err) = feed(&mut dec, &s, &[]);
        assert!(events.is_empty());
        assert_eq!(err.map(|e| e.code), Some(CloseCode::TOO_BIG));
        assert_eq!(dec.heap_bytes(), 0, "released on error");
        // One unfragmented frame over the message limit (but within the frame limit).
        let limits = Limits {
            max_frame_len: 100,
            max_message_len: 10,
        };
        let mut dec = Decoder::new(limits);
        let (_, err) = feed(&mut dec, &frame(Opcode::Text, true, b"hello world"), &[]);
        assert_eq!(err.map(|e| e.code), Some(CloseCode::TOO_BIG));
    }

    #[test]
    fn invalid_utf8_text_is_1007() {
        assert_eq!(
            error_code(&frame(Opcode::Text, true, &[b'a', 0xFF])),
            Some(1007)
        );
        let s = [
            frame(Opcode::Text, false, b"ok"),
            frame(Opcode::Continuation, true, &[0xC0, 0x80]),
        ]
        .concat();
        assert_eq!(error_code(&s), Some(1007));
        // Binary is not checked.
        assert_eq!(error_code(&frame(Opcode::Binary, true, &[0xFF])), None);
    }

    #[test]
    fn close_frames() {
        let close = |payload: &[u8]| frame(Opcode::Close, true, payload);
        assert_eq!(
            decode_whole(&close(b"")),
            (vec![Ev::Close(None, String::new())], None)
        );
        assert_eq!(
            decode_bytewise(&close(&[0x03, 0xE8, b'b', b'y', b'e'])),
            (vec![Ev::Close(Some(1000), "bye".into())], None)
        );
        assert_eq!(error_code(&close(&[0x03])), Some(1002), "1-byte payload");
        for code in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000,
        ] {
            assert_eq!(
                error_code(&close(&code.to_be_bytes())),
                Some(1002),
                "code {code}"
            );
        }
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 4999,
        ] {
            assert_eq!(
                decode_whole(&close(&code.to_be_bytes())),
                (vec![Ev::Close(Some(code), String::new())], None)
            );
        }
        assert_eq!(
            error_code(&close(&[0x03, 0xE8, 0xFF])),
            Some(1007),
            "reason not UTF-8"
        );
        // What encode_close writes (a server frame) decodes once masked.
        let mut out = Vec::new();
        encode_close(CloseCode::GOING_AWAY, "later", &mut out);
        assert_eq!(
            decode_whole(&close(&out[2..])),
            (vec![Ev::Close(Some(1001), "later".into())], None)
        );
    }

    #[test]
    fn nothing_after_close_or_error() {
        let mut dec = Decoder::new(BIG);
        let mut buf = [
            frame(Opcode::Close, true, b""),
            frame(Opcode::Ping, true, b""),
        ]
        .concat();
        let (n, ev) = dec.decode(&mut buf).unwrap();
        assert_eq!(
            (n, ev),
            (
                6,
                Some(Event::Close {
                    code: None,
                    reason: ""
                })
            )
        );
        assert_eq!(dec.decode(&mut []).unwrap(), (0, None));
        assert_eq!(
            dec.decode(&mut buf[6..]).unwrap_err().code,
            CloseCode::PROTOCOL
        );

        let mut dec = Decoder::new(BIG);
        let first = dec.decode(&mut [0x81, 0x05]).unwrap_err();
        assert_eq!(dec.decode(&mut buf).unwrap_err(), first);
        assert_eq!(dec.decode(&mut []).unwrap_err(), first);
    }

    #[test]
    fn bad_header_fails_on_its_first_bytes() {
        // RSV bit in the first byte: no need to wait for the rest.
        let mut dec = Decoder::new(BIG);
        assert_eq!(
            dec.decode(&mut [0xC1]).unwrap_err().code,
            CloseCode::PROTOCOL
        );
        // Unmasked bit in the second byte of a 64-bit-length header.
        let mut dec = Decoder::new(BIG);
        assert_eq!(dec.decode(&mut [0x82]).unwrap(), (1, None));
        assert_eq!(
            dec.decode(&mut [0x7F]).unwrap_err().reason,
            "unmasked client frame"
        );
        // 64-bit length with the MSB set.
        assert_eq!(
            error_code(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]),
            Some(1002)
        );
    }

    #[test]
    fn utf8_table() {
        type Row<'a> = (&'a str, &'a [&'a [u8]], Option<u16>);
        let cases: &[Row] = &[
            ("multi-byte", &["κόσμε €𝄞".as_bytes()], None),
            ("overlong C0 80", &[&[0xC0, 0x80]], Some(1007)),
            ("overlong E0 80 80", &[&[0xE0, 0x80, 0x80]], Some(1007)),
            ("surrogate ED A0 80", &[&[0xED, 0xA0, 0x80]], Some(1007)),
            ("above U+10FFFF", &[&[0xF4, 0x90, 0x80, 0x80]], Some(1007)),
            (
                "truncated at end of final frame",
                &[&[b'a', 0xE2, 0x82]],
                Some(1007),
            ),
            (
                "truncated at end of final fragment",
                &[b"ab", &[0xE2, 0x82]],
                Some(1007),
            ),
            (
                "split across fragments",
                &[&[b'a', 0xE2], &[0x82], &[0xAC, b'!']],
                None,
            ),
            ("4-byte split 1+3", &[&[0xF0], &[0x9D, 0x84, 0x9E]], None),
            (
                "empty fragments around a split",
                &[&[], &[0xC3], &[], &[0xA9], &[]],
                None,
            ),
        ];
        for (name, fragments, want) in cases {
            let mut s = Vec::new();
            for (i, f) in fragments.iter().enumerate() {
                let op = if i == 0 {
                    Opcode::Text
                } else {
                    Opcode::Continuation
                };
                s.extend(frame(op, i + 1 == fragments.len(), f));
            }
            assert_eq!(error_code(&s), *want, "{name}");
            if want.is_none() {
                assert_eq!(
                    decode_whole(&s).0,
                    vec![Ev::Text(fragments.concat())],
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn invalid_utf8_fails_before_the_frame_completes() {
        let payload = [b'a', b'b', b'c', 0xFF, b'd', b'e'];
        let mut stream = vec![0x81, 0x80 | 20, 9, 8, 7, 6];
        stream.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [9, 8, 7, 6][i % 4]),
        );
        let mut dec = Decoder::new(BIG);
        let e = dec.decode(&mut stream).unwrap_err();
        assert_eq!(e.code, CloseCode::INVALID_DATA);
        // Same when the bad byte arrives on its own after the header.
        let mut dec = Decoder::new(BIG);
        assert_eq!(dec.decode(&mut stream[..9].to_vec()).unwrap().0, 9);
        assert!(dec.is_mid_message());
        let mut bad = vec![0xFF ^ 6];
        assert_eq!(
            dec.decode(&mut bad).unwrap_err().code,
            CloseCode::INVALID_DATA
        );
    }

    #[test]
    fn heap_is_released_after_a_message() {
        let mut dec = Decoder::new(BIG);
        // Whole unfragmented frame: zero-copy, never allocates.
        let mut one = frame(Opcode::Binary, true, &[7; 1000]);
        let len = one.len();
        let (n, ev) = dec.decode(&mut one).unwrap();
        assert_eq!(n, len);
        assert!(matches!(ev, Some(Event::Binary(p)) if p == [7; 1000]));
        assert_eq!(dec.heap_bytes(), 0);

        // Fragmented: buffered while in progress, released afterwards.
        let s = [
            frame(Opcode::Text, false, b"abc"),
            frame(Opcode::Continuation, true, b"def"),
        ]
        .concat();
        let mut first = s[..9].to_vec();
        assert_eq!(dec.decode(&mut first).unwrap(), (9, None));
        assert!(dec.heap_bytes() > 0);
        assert!(dec.is_mid_message());
        let (events, err) = feed(&mut dec, &s[9..], &[]);
        assert_eq!((events, err), (vec![Ev::Text(b"abcdef".to_vec())], None));
        assert_eq!(dec.heap_bytes(), 0);
        assert!(!dec.is_mid_message());

        // A frame that arrives in pieces is buffered too, and released too.
        let s = frame(Opcode::Binary, true, &[1; 300]);
        let (events, _) = feed(&mut dec, &s, &[5, 100, 200]);
        assert_eq!(events, vec![Ev::Binary(vec![1; 300])]);
        assert_eq!(dec.heap_bytes(), 0);
    }

    #[test]
    fn zero_copy_returns_a_slice_of_the_input() {
        let mut dec = Decoder::new(BIG);
        let mut buf = frame(Opcode::Text, true, b"Hello");
        let range = buf.as_ptr_range();
        let (_, ev) = dec.decode(&mut buf).unwrap();
        let Some(Event::Text(p)) = ev else {
            panic!("{ev:?}")
        };
        assert!(range.contains(&p.as_ptr()));
    }

    /// Writes the ws_decode fuzz seeds: `cargo test --lib proto::ws -- --ignored write_fuzz_seeds`.
    /// The target reads byte 0 as the split point and the rest as the stream.
    #[test]
    #[ignore]
    fn write_fuzz_seeds() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/seeds/ws_decode");
        std::fs::create_dir_all(dir).unwrap();
        let mut close = Vec::new();
        encode_close(CloseCode::NORMAL, "bye", &mut close);
        let seeds: [(&str, Vec<u8>); 6] = [
            ("masked_hello", frame(Opcode::Text, true, b"Hello")),
            (
                "fragmented",
                [
                    frame(Opcode::Text, false, b"Hel"),
                    frame(Opcode::Ping, true, b"p"),
                    frame(Opcode::Continuation, true, b"lo"),
                ]
                .concat(),
            ),
            ("ping", frame(Opcode::Ping, true, b"Hello")),
            ("close", frame(Opcode::Close, true, &close[2..])),
            ("binary_256", frame(Opcode::Binary, true, &[0xA5; 256])),
            (
                "utf8_split",
                [
                    frame(Opcode::Text, false, &[0xE2, 0x82]),
                    frame(Opcode::Continuation, true, &[0xAC]),
                ]
                .concat(),
            ),
        ];
        for (name, stream) in seeds {
            let split = (stream.len() / 2) as u8;
            std::fs::write(format!("{dir}/{name}"), [&[split][..], &stream].concat()).unwrap();
        }
    }

    #[derive(Clone, Debug)]
    struct Case {
        /// (message, fragment cut points, control frame to send after each fragment)
        messages: Vec<(Ev, Vec<usize>, Vec<Option<Ev>>)>,
        close: Option<(u16, String)>,
        key_seed: u32,
    }

    fn control_strategy() -> impl Strategy<Value = Option<Ev>> {
        let payload = || proptest::collection::vec(any::<u8>(), 0..=125);
        prop_oneof![
            3 => Just(None),
            1 => payload().prop_map(|p| Some(Ev::Ping(p))),
            1 => payload().prop_map(|p| Some(Ev::Pong(p))),
        ]
    }

    fn message_strategy() -> impl Strategy<Value = (Ev, Vec<usize>, Vec<Option<Ev>>)> {
        let msg = prop_oneof![
            "\\PC{0,80}".prop_map(|s| Ev::Text(s.into_bytes())),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Ev::Binary),
        ];
        (
            msg,
            proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
        )
            .prop_flat_map(|(msg, cuts)| {
                let len = match &msg {
                    Ev::Text(p) | Ev::Binary(p) => p.len(),
                    _ => 0,
                };
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
                cuts.sort_unstable();
                let frames = cuts.len() + 1;
                (
                    Just(msg),
                    Just(cuts),
                    proptest::collection::vec(control_strategy(), frames),
                )
            })
    }

    fn case_strategy() -> impl Strategy<Value = Case> {
        (
            proptest::collection::vec(message_strategy(), 0..5),
            proptest::option::of((
                prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999],
                "\\PC{0,20}",
            )),
            any::<u32>(),
        )
            .prop_map(|(messages, close, key_seed)| Case {
                messages,
                close,
                key_seed,
            })
    }

    /// Encodes a case as a client would, and lists the events the server must see.
    fn encode_case(case: &Case) -> (Vec<u8>, Vec<Ev>) {
        let mut rng = case.key_seed;
        let mut key = move || {
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            rng.to_be_bytes()
        };
        let mut out = Vec::new();
        let mut want = Vec::new();
        let control = |ev: &Ev, key: [u8; 4], out: &mut Vec<u8>| match ev {
            Ev::Ping(p) => client_frame(0x89, p, key, out),
            Ev::Pong(p) => client_frame(0x8A, p, key, out),
            _ => unreachable!(),
        };
        for (msg, cuts, controls) in &case.messages {
            let (first_op, payload) = match msg {
                Ev::Text(p) => (Opcode::Text, p),
                Ev::Binary(p) => (Opcode::Binary, p),
                _ => unreachable!(),
            };
            let mut last = 0;
            let bounds: Vec<usize> = cuts.iter().copied().chain([payload.len()]).collect();
            let mut after = Vec::new();
            for (i, (&end, ctl)) in bounds.iter().zip(controls).enumerate() {
                let op = if i == 0 {
                    first_op
                } else {
                    Opcode::Continuation
                };
                let fin = i + 1 == bounds.len();
                client_frame(
                    (u8::from(fin) << 7) | op.as_u8(),
                    &payload[last..end],
                    key(),
                    &mut out,
                );
                last = end;
                if let Some(ctl) = ctl {
                    control(ctl, key(), &mut out);
                    if fin {
                        after.push(ctl.clone())
                    } else {
                        want.push(ctl.clone())
                    }
                }
            }
            want.push(msg.clone());
            want.extend(after);
        }
        if let Some((code, reason)) = &case.close {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(reason.as_bytes());
            client_frame(0x88, &payload, key(), &mut out);
            want.push(Ev::Close(Some(*code), reason.clone()));
        }
        (out, want)
    }

    fn sorted_cuts(cuts: &[prop::sample::Index], len: usize) -> Vec<usize> {
        let mut v: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
        v.sort_unstable();
        v
    }

    proptest! {
        #[test]
        fn round_trip(case in case_strategy()) {
            let (stream, want) = encode_case(&case);
            let mut dec = Decoder::new(BIG);
            let (events, err) = feed(&mut dec, &stream, &[]);
            prop_assert_eq!(err, None);
            prop_assert_eq!(events, want);
            prop_assert_eq!(dec.heap_bytes(), 0);
        }

        #[test]
        fn any_split_gives_the_same_events(
            case in case_strategy(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let (stream, want) = encode_case(&case);
            let cuts = sorted_cuts(&cuts, stream.len());
            let mut dec = Decoder::new(BIG);
            let (events, err) = feed(&mut dec, &stream, &cuts);
            prop_assert_eq!(err, None);
            prop_assert_eq!(&events, &want);
            prop_assert!(!dec.is_mid_message());
            // (A close frame that arrived in pieces stays buffered: the connection is ending.)
            if case.close.is_none() {
                prop_assert_eq!(dec.heap_bytes(), 0);
            }
            prop_assert_eq!(decode_bytewise(&stream), (want, None));
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            tiny in any::<bool>(),
        ) {
            let limits = if tiny { Limits { max_frame_len: 8, max_message_len: 12 } } else { BIG };
            let cuts = sorted_cuts(&cuts, bytes.len());
            let _ = feed(&mut Decoder::new(limits), &bytes, &cuts);
            // Mostly masked-looking headers get further into the decoder.
            let mut masked = bytes.clone();
            for b in masked.iter_mut().skip(1).step_by(3) { *b |= 0x80; }
            let _ = feed(&mut Decoder::new(limits), &masked, &cuts);
        }

        #[test]
        fn corrupted_streams_never_panic_and_split_agrees(
            case in case_strategy(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let (mut stream, _) = encode_case(&case);
            if !stream.is_empty() {
                for (at, x) in &flips {
                    let i = at.index(stream.len());
                    stream[i] ^= x;
                }
            }
            let cuts = sorted_cuts(&cuts, stream.len());
            let whole = feed(&mut Decoder::new(BIG), &stream, &[]);
            let split = feed(&mut Decoder::new(BIG), &stream, &cuts);
            // Splitting can only make a failure come earlier (fail fast), never change events
            // that were delivered, nor its close code when both fail at the same place.
            prop_assert!(whole.0.starts_with(&split.0) || split.0.starts_with(&whole.0));
            if split.1.is_none() {
                prop_assert_eq!(&whole, &split);
            }
        }
    }
}
