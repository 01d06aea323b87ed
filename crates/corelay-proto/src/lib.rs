//! corelay's wire protocols, sans-IO: bytes in, bytes and events out. No mio, no tokio, no sockets, no
//! clock, no `unsafe`, and no panic on any peer input (each parser has a fuzz target in `tests/fuzz`).
//!
//! - [`http1`]: HTTP/1.1 request heads (httparse), the WebSocket upgrade check, Origin matching, responses.
//! - [`http_error`]: the one HTTP error type; its kind maps to status, header and body in one `match`.
//! - [`ws`]: RFC 6455 frames, the resumable decoder, incremental UTF-8 validation, the accept key, and
//!   permessage-deflate (RFC 7692: negotiation and per-message codecs, flate2 on the pure-Rust zlib-rs).
//! - [`sse`]: Server-Sent Events encoding.
//! - [`cursor`]: channel names, ids and the `channel=offset;…` cursors every transport resumes from.
//! - [`msg`]: the JSON messages clients send and the gateway answers.
//! - [`proxy`]: the PROXY protocol (v1 and v2) that L4 balancers put in front of a connection.
//!
//! Layering: this crate depends on no other corelay crate; the gateway (`corelay`), the load generator
//! (`corelay-load`) and the fuzz targets depend on it. `tests/layering.rs` checks both.
#![forbid(unsafe_code)]

pub mod cursor;
pub mod http1;
pub mod http_error;
pub mod msg;
pub mod proxy;
pub mod sse;
pub mod ws;
