//! corelay: a real-time connection gateway.
//!
//! See `docs/ARCHITECTURE.md` for the shape: pinned per-core `mio` loops ([`worker`]) own the sockets and
//! the per-connection state ([`conn`]); the sans-IO codecs live in the `corelay-proto` crate; heartbeats and
//! handshake deadlines run on a hashed [`timer`] wheel per loop; one tokio thread ([`backplane`]) owns routing,
//! presence and chat.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod auth;
pub mod backplane;
pub mod bucket;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod metrics;
pub mod push;
pub mod server;
pub mod store;
pub mod timer;
pub mod worker;
