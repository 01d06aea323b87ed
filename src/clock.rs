//! Wall-clock time in Unix milliseconds: what messages are stamped with and what the store's due times use.
//! The event loops keep their own monotonic clock (`timer`); the router takes `now_ms` as an argument so that
//! tests and the simulation run it on a virtual clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
