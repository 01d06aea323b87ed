//! The token bucket behind every rate limit (per WebSocket on the loops, per user in the router).

/// A token bucket: `rate` requests per second on average, `burst` at once. 16 bytes, no allocation.
///
/// It never refuses a request: a client that runs out of tokens is slowed down (its input is not read until
/// [`Bucket::wait_ms`] has passed), so requests pipelined beyond the rate are all served, in order, just later.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f32,
    last_ms: u64,
}

impl Bucket {
    pub fn full(burst: u32, now_ms: u64) -> Self {
        Bucket {
            tokens: burst as f32,
            last_ms: now_ms,
        }
    }

    /// Refills for the time passed; true when a request may be served now.
    pub fn ready(&mut self, now_ms: u64, rate: u32, burst: u32) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f32 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed * rate as f32).min(burst as f32);
        self.tokens >= 1.0
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now_ms: u64, rate: u32, burst: u32) -> bool {
        if self.ready(now_ms, rate, burst) {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Spends one token after [`Bucket::ready`] said yes.
    pub fn spend(&mut self) {
        self.tokens -= 1.0;
    }

    /// Whether the bucket has refilled to its burst by `now_ms` (an idle user's bucket can be forgotten).
    pub fn full_at(&self, now_ms: u64, rate: u32, burst: u32) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f32 / 1000.0;
        self.tokens + elapsed * rate as f32 >= burst as f32
    }

    /// Milliseconds until the next token (at least 1).
    pub fn wait_ms(&self, rate: u32) -> u64 {
        let missing = (1.0 - self.tokens).max(0.0);
        ((missing * 1000.0 / rate.max(1) as f32).ceil() as u64).max(1)
    }
}
