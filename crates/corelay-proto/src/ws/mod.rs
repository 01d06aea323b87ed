//! RFC 6455 WebSocket codec, server side: frame headers and masking, a resumable zero-copy frame
//! decoder enforcing the protocol's rules, incremental UTF-8 validation, the handshake's
//! accept key, and permessage-deflate (RFC 7692: negotiation, per-message codecs). Sans-IO: no sockets, no clock, and no panics on any peer input.

mod decoder;
pub mod deflate;
mod frame;
mod handshake;
mod utf8;

pub use decoder::{Decoder, Event, Limits, WsError};
pub use frame::{
    CloseCode, FrameHeader, MAX_HEADER_LEN, Opcode, apply_mask, decode_header, encode_close,
    encode_frame, encode_frame_rsv1, server_header_len,
};
pub use handshake::accept_key;
pub use utf8::Utf8Validator;
