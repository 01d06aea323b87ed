//! Cluster-facing pieces, sans-IO. (The PROXY protocol parser lives in `corelay_proto::proxy`.)
//!
//! - [`ring`]: a consistent-hash ring over node ids, used to route a user (or any key) to the node that owns
//!   it. Adding or removing a node moves only about `1/n` of the keys, and only to or from that node. The
//!   hash is fixed (FNV-1a 64 with a murmur3 finalizer), so every process and every version agrees on owners.
#![forbid(unsafe_code)]

pub mod ring;
