//! Sans-IO codecs: bytes in, bytes and events out. No mio, no sockets, no clock.
#![forbid(unsafe_code)]

pub mod cursor;
pub mod http1;
pub mod msg;
pub mod sse;
pub mod ws;
