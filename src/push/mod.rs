//! Mobile push (APNs and FCM over HTTP/2), driven by receipts. See `docs/PUSH.md`.
//!
//! - [`engine`]: the push thread. The router claims due obligations from the store and hands them over as
//!   [`Job`]s on a bounded queue; the thread sends them and answers with [`Done`]s, which the router turns
//!   into store writes (done, retry later, token removed).
//! - [`apns`], [`fcm`]: the two providers, each behind [`h2`] (pooled HTTP/2 over rustls).
//!
//! The providers never touch the store and the store never waits on a provider: an outage only moves
//! obligations' due times forward in durable state.

pub mod apns;
pub mod engine;
pub mod fcm;
pub mod h2;

use std::time::Duration;

/// A device's push platform, as stored in the device registry (`"apns"` / `"fcm"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Platform {
    Apns,
    Fcm,
}

impl Platform {
    pub fn parse(s: &str) -> Option<Platform> {
        match s {
            "apns" => Some(Platform::Apns),
            "fcm" => Some(Platform::Fcm),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Fcm => "fcm",
        }
    }
}

/// What one request to a provider says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notification {
    /// A visible alert: `count` messages up to `offset` in `conversation`, the last one from `from`.
    /// `body` is the message body's text only with `--push-include-body`.
    Alert {
        conversation: String,
        offset: u64,
        from: String,
        count: u32,
        body: Option<String>,
    },
    /// A background (silent) push: the user read `conversation` up to `upto` on another device, so the
    /// app can clear the alert.
    Clear { conversation: String, upto: u64 },
}

impl Notification {
    /// The collapse key (APNs `apns-collapse-id`, at most 64 bytes; FCM `android.collapse_key`): one per
    /// conversation, so a newer alert replaces an older one on the device, and a resent one is not doubled.
    pub fn collapse_id(&self) -> String {
        let c = match self {
            Notification::Alert { conversation, .. } | Notification::Clear { conversation, .. } => {
                conversation
            }
        };
        if c.len() <= 64 {
            c.clone()
        } else {
            // Long ids: a stable 64-hex-digit digest (SHA-1 is plenty for a collapse key; not a secret).
            use sha1::Digest;
            let d = sha1::Sha1::digest(c.as_bytes());
            d.iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}

/// How one request to a provider ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the provider (APNs 200, FCM 200).
    Sent,
    /// The token is dead (APNs 410 `Unregistered`, 400 `BadDeviceToken`; FCM 404 `UNREGISTERED`, 400
    /// `INVALID_ARGUMENT` about the token): remove it from the registry and never use it again.
    TokenGone(String),
    /// Try again later (429, 5xx, connection failures, timeouts); `after` when the provider said
    /// (`Retry-After`), else the engine's backoff decides.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// A permanent failure for this request that is not about the token (bad topic, bad credentials,
    /// payload too large): counted and logged, the obligation is dropped.
    Failed(String),
}
