//! The loop's permessage-deflate codecs (RFC 7692, `corelay_proto::ws::deflate`). One inflater and one
//! deflater per event-loop thread, reset per message and shared by every connection of the loop: a connection
//! keeps only its negotiated window size (`WsState::deflate`), never a zlib stream. Thread-locals rather than
//! fields of the loop because the connection code runs on its loop's thread and reaches the loop only through
//! `Env`; each is created the first time its thread needs it.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::backplane::ConnRef;
use corelay_proto::ws::Opcode;
use corelay_proto::ws::deflate::{Deflater, Inflater, StreamDeflater};

/// zlib level for everything the gateway compresses: 6 (zlib's default) is within a few percent of 9 on JSON
/// and about twice as fast; messages are compressed once per publish, and echo answers once each.
const LEVEL: u32 = 6;

thread_local! {
    static INFLATER: RefCell<Inflater> = RefCell::new(Inflater::new());
    static DEFLATER: RefCell<Deflater> = RefCell::new(Deflater::new(LEVEL));
    /// `--ws-deflate takeover`: the compression context of each connection of this loop that negotiated
    /// server context takeover, made at its first compressed message, dropped when it closes.
    static STREAMS: RefCell<HashMap<(u32, u32), Box<StreamDeflater>>> = RefCell::new(HashMap::new());
}

/// `WsState::deflate`: the window bits (low nibble) and this flag (server context takeover).
pub(crate) const TAKEOVER: u8 = 0x80;

/// The window bits of a connection's `deflate` byte (0: no deflate).
pub(crate) fn window_bits(deflate: u8) -> u8 {
    deflate & 0x0f
}

/// Appends `payload` as one frame compressed in connection `id`'s own context (server context takeover),
/// creating the context at its first message. `false` only if zlib failed (the connection must close).
pub(crate) fn deflate_stream(
    me: ConnRef,
    window_bits: u8,
    opcode: Opcode,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    let ok = STREAMS.with(|s| {
        s.borrow_mut()
            .entry((me.index, me.generation))
            .or_insert_with(|| Box::new(StreamDeflater::new(LEVEL, window_bits)))
            .frame(opcode, payload, out)
    });
    if !ok {
        // zlib failed: that context is done. A fresh one next time is safe (its output refers only to
        // itself, the newest part of the client's window).
        forget(me);
    }
    ok
}

/// Drops a closed connection's compression context.
pub(crate) fn forget(me: ConnRef) {
    STREAMS.with(|s| {
        s.borrow_mut().remove(&(me.index, me.generation));
    });
}

/// Runs `f` with this loop's inflater. `f` must not call `with_inflater` again (it would panic).
pub(crate) fn with_inflater<R>(f: impl FnOnce(&mut Inflater) -> R) -> R {
    INFLATER.with(|i| f(&mut i.borrow_mut()))
}

/// Appends `payload` as one compressed frame (RSV1 set, `window_bits` 9..=15) to `out`; `false` (nothing
/// appended) when compressing would not make it smaller.
pub(crate) fn deflate_frame(
    opcode: Opcode,
    payload: &[u8],
    window_bits: u8,
    out: &mut Vec<u8>,
) -> bool {
    DEFLATER.with(|d| d.borrow_mut().frame(opcode, payload, window_bits, out))
}
