//! Cluster-facing pieces, both sans-IO.
//!
//! - [`ring`]: a consistent-hash ring over node ids, used to route a user (or any key) to the node that owns
//!   it. Adding or removing a node moves only about `1/n` of the keys, and only to or from that node. The
//!   hash is fixed (FNV-1a 64 with a murmur3 finalizer), so every process and every version agrees on owners.
//! - [`proxy`] (re-exported from `corelay-proto`, where the parser lives with the other wire codecs): the PROXY protocol (HAProxy's "The PROXY protocol", versions 1 and 2), so that behind an L4
//!   load balancer the gateway still sees each client's original address. `parse` looks at the first bytes
//!   of a connection and says how many it consumed; the bytes after the header belong to HTTP.
#![forbid(unsafe_code)]

pub use corelay_proto::proxy;
pub mod ring;
