//! The cap on connections from one source address (`--max-connections-per-ip`), shared by every loop.
//!
//! A connection is counted under a 32-bit hash of its address (kept in `Conn::addr_key`, four bytes that fit in
//! the struct's padding, instead of the 17-byte address): two addresses that share a hash share a count, which
//! only makes the cap stricter for them. One lock per accept and close, never per message. Behind an L4 balancer
//! with the PROXY protocol every connection comes from the balancer, so the cap is not applied there (the
//! balancer is where per-client limits belong).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;

pub struct PerAddress {
    max: usize,
    counts: Mutex<HashMap<u32, u32>>,
}

/// The key an address is counted under (never 0: 0 means "not counted").
pub fn key(ip: IpAddr) -> u32 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ip.hash(&mut h);
    (h.finish() as u32).max(1)
}

impl PerAddress {
    /// `max` = 0: no cap.
    pub fn new(max: usize) -> Self {
        PerAddress {
            max,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new connection from `ip`; `None` when the address is at its cap (the connection is refused),
    /// `Some(0)` when nothing is counted, else the key to release it with.
    pub fn admit(&self, ip: IpAddr) -> Option<u32> {
        if self.max == 0 {
            return Some(0);
        }
        let k = key(ip);
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(k).or_insert(0);
        if *n as usize >= self.max {
            return None;
        }
        *n += 1;
        Some(k)
    }

    /// A counted connection closed.
    pub fn release(&self, k: u32) {
        if k == 0 {
            return;
        }
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                m.remove(&k);
            }
        }
    }

    /// Addresses with at least one connection (for tests and metrics).
    pub fn addresses(&self) -> usize {
        self.counts.lock().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_address_and_forgets_it_when_its_last_connection_closes() {
        let p = PerAddress::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let k1 = p.admit(a).unwrap();
        let k2 = p.admit(a).unwrap();
        assert!(p.admit(a).is_none(), "third from one address refused");
        assert!(p.admit(b).is_some(), "another address is not affected");
        p.release(k1);
        let k3 = p.admit(a).unwrap();
        p.release(k2);
        p.release(k3);
        assert_eq!(p.addresses(), 1, "only b is left");
        assert_eq!(PerAddress::new(0).admit(a), Some(0), "0 = no cap");
    }
}
