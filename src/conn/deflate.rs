//! The loop's permessage-deflate codecs (RFC 7692, `corelay_proto::ws::deflate`). One inflater and one
//! deflater per event-loop thread, reset per message and shared by every connection of the loop: a connection
//! keeps only its negotiated window size (`WsState::deflate`), never a zlib stream. Thread-locals rather than
//! fields of the loop because the connection code runs on its loop's thread and reaches the loop only through
//! `Env`; each is created the first time its thread needs it.

use std::cell::RefCell;

use corelay_proto::ws::Opcode;
use corelay_proto::ws::deflate::{Deflater, Inflater};

/// zlib level for everything the gateway compresses: 6 (zlib's default) is within a few percent of 9 on JSON
/// and about twice as fast; messages are compressed once per publish, and echo answers once each.
const LEVEL: u32 = 6;

thread_local! {
    static INFLATER: RefCell<Inflater> = RefCell::new(Inflater::new());
    static DEFLATER: RefCell<Deflater> = RefCell::new(Deflater::new(LEVEL));
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
