//! Apple Push Notification service: the HTTP/2 provider API with token-based (JWT) authentication.
//!
//! References:
//! - ["Sending notification requests to APNs"](https://developer.apple.com/documentation/usernotifications/sending-notification-requests-to-apns):
//!   `POST /3/device/<token>` on `api.push.apple.com` (HTTP/2 only), the `apns-*` headers, and the response
//!   codes and `{"reason": ...}` bodies classified in [`classify`].
//! - ["Establishing a token-based connection to APNs"](https://developer.apple.com/documentation/usernotifications/establishing-a-token-based-connection-to-apns):
//!   the provider token is an ES256 JWT, header `{"alg":"ES256","kid":<key id>}`, claims
//!   `{"iss":<team id>,"iat":<unix seconds>}`, signed with the `.p8` key (PKCS#8 EC P-256). Apple rejects a
//!   token older than one hour (`403 ExpiredProviderToken`) and one refreshed more often than every 20
//!   minutes (`429 TooManyProviderTokenUpdates`), so one token is reused by all requests and re-minted
//!   when it is [`JWT_REFRESH_AFTER`] (50 minutes) old, or at once when Apple says it expired (clock skew,
//!   a suspended process): then the request is retried once with the new token.
//! - ["Generating a remote notification"](https://developer.apple.com/documentation/usernotifications/generating-a-remote-notification)
//!   and ["Pushing background updates to your App"](https://developer.apple.com/documentation/usernotifications/pushing-background-updates-to-your-app):
//!   the `aps` dictionary of an alert, and a background push (`content-available: 1`, push type
//!   `background`, priority 5). Payloads are at most 4096 bytes.
//!
//! A notification carries the conversation and offset in a custom `corelay` dictionary, which the app uses
//! to fetch the messages itself; the message text is included only with `--push-include-body`.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::h2::{H2Client, retry_after};
use super::{Notification, Outcome};

/// Apple's production endpoint (the sandbox one is `https://api.sandbox.push.apple.com`).
pub const DEFAULT_URL: &str = "https://api.push.apple.com";
/// Apple's limit on a notification payload.
pub const MAX_PAYLOAD: usize = 4096;
/// A provider token is re-minted once it is this old (Apple: at most once every 20 minutes, and a token
/// older than 60 minutes is refused).
pub const JWT_REFRESH_AFTER: Duration = Duration::from_secs(50 * 60);

/// How to reach APNs and who we are.
#[derive(Clone, Debug)]
pub struct ApnsConfig {
    /// `https://host[:port]`; [`DEFAULT_URL`] in production.
    pub url: String,
    /// The contents of the `.p8` signing key (PKCS#8 EC P-256 PEM).
    pub key_pem: String,
    /// The key's 10-character id (the JWT `kid`).
    pub key_id: String,
    /// The developer team id (the JWT `iss`).
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// How long APNs stores an undeliverable notification (`apns-expiration` = now + ttl).
    pub ttl: Duration,
    /// Put the message text in the alert (`--push-include-body`); else "New message".
    pub include_body: bool,
}

/// An APNs provider: one HTTP/2 connection, one provider token.
pub struct Apns {
    client: H2Client,
    key: EncodingKey,
    key_id: String,
    team_id: String,
    topic: String,
    ttl: Duration,
    include_body: bool,
    jwt: Mutex<Jwt>,
    refreshes: AtomicU64,
}

#[derive(Clone)]
struct Jwt {
    token: String,
    /// Its `iat` claim.
    iat: u64,
    minted: Instant,
}

/// What a response means: an outcome, or "the provider token expired: mint a new one and retry".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Done(Outcome),
    RefreshToken,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn mint(
    key: &EncodingKey,
    key_id: &str,
    team_id: &str,
) -> Result<Jwt, jsonwebtoken::errors::Error> {
    let mut header = Header::new(Algorithm::ES256);
    header.typ = None;
    header.kid = Some(key_id.to_string());
    let iat = unix_now();
    let claims = json!({ "iss": team_id, "iat": iat });
    let token = jsonwebtoken::encode(&header, &claims, key)?;
    Ok(Jwt {
        token,
        iat,
        minted: Instant::now(),
    })
}

/// Whether a provider token of this age must be replaced before use.
pub fn jwt_needs_refresh(age: Duration) -> bool {
    age >= JWT_REFRESH_AFTER
}

impl Apns {
    /// Checks the configuration and the key (by signing a first token); connects on the first send.
    pub fn new(
        cfg: ApnsConfig,
        extra_ca: Option<&Path>,
        timeout: Duration,
    ) -> anyhow::Result<Apns> {
        if cfg.key_id.trim().is_empty() {
            bail!("APNs: the key id is empty");
        }
        if cfg.team_id.trim().is_empty() {
            bail!("APNs: the team id is empty");
        }
        if cfg.topic.trim().is_empty() {
            bail!("APNs: the topic (the app's bundle id) is empty");
        }
        let key = EncodingKey::from_ec_pem(cfg.key_pem.as_bytes()).map_err(|e| {
            anyhow::anyhow!("APNs: the signing key is not a PKCS#8 EC P-256 PEM (.p8) key: {e}")
        })?;
        let first = mint(&key, &cfg.key_id, &cfg.team_id).map_err(|e| {
            anyhow::anyhow!("APNs: cannot sign with the key (it must be an EC P-256 .p8 key): {e}")
        })?;
        let client = H2Client::new(&cfg.url, extra_ca, timeout).context("APNs")?;
        Ok(Apns {
            client,
            key,
            key_id: cfg.key_id,
            team_id: cfg.team_id,
            topic: cfg.topic,
            ttl: cfg.ttl,
            include_body: cfg.include_body,
            jwt: Mutex::new(first),
            refreshes: AtomicU64::new(0),
        })
    }

    /// Provider tokens minted after the first one.
    pub fn jwt_refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// The HTTP/2 client (connection counts for logs and tests).
    pub fn client(&self) -> &H2Client {
        &self.client
    }

    /// The token to use: the current one, re-minted if it is too old, or if it is `rejected` (the one a
    /// request was just refused with; a token another request already replaced is not replaced again).
    fn token(&self, rejected: Option<&str>) -> Result<Jwt, String> {
        let mut cur = self.jwt.lock().unwrap_or_else(|p| p.into_inner());
        let stale = jwt_needs_refresh(cur.minted.elapsed());
        if stale || rejected.is_some_and(|r| r == cur.token) {
            let fresh = mint(&self.key, &self.key_id, &self.team_id)
                .map_err(|e| format!("signing the APNs provider token: {e}"))?;
            *cur = fresh;
            self.refreshes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(cur.clone())
    }

    /// Sends one notification to one device; never panics, every failure is an [`Outcome`].
    pub async fn send(&self, device_token: &str, n: &Notification) -> Outcome {
        // Real tokens are hex; anything that is not even a safe path segment cannot be one.
        if device_token.is_empty()
            || device_token.len() > 400
            || !device_token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            return Outcome::TokenGone("BadDeviceToken (not a device token)".into());
        }
        let body = match payload(n, self.include_body) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(e),
        };
        let path = format!("/3/device/{device_token}");
        let (push_type, priority) = match n {
            Notification::Alert { .. } => ("alert", "10"),
            Notification::Clear { .. } => ("background", "5"),
        };
        let expiration = unix_now().saturating_add(self.ttl.as_secs()).to_string();
        let collapse = n.collapse_id();

        let mut rejected: Option<Jwt> = None;
        loop {
            let jwt = match self.token(rejected.as_ref().map(|j| j.token.as_str())) {
                Ok(t) => t,
                Err(e) => return Outcome::Failed(e),
            };
            let headers = [
                ("authorization", format!("bearer {}", jwt.token)),
                ("apns-topic", self.topic.clone()),
                ("apns-push-type", push_type.to_string()),
                ("apns-priority", priority.to_string()),
                ("apns-expiration", expiration.clone()),
                ("apns-collapse-id", collapse.clone()),
                ("content-type", "application/json".to_string()),
            ];
            let resp = match self
                .client
                .request(http::Method::POST, &path, &headers, body.clone())
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    return Outcome::Retry {
                        after: None,
                        reason: e,
                    };
                }
            };
            match classify(resp.status, retry_after(&resp.headers), &resp.body) {
                Verdict::Done(o) => return o,
                Verdict::RefreshToken if rejected.is_none() => {
                    tracing::info!("APNs: provider token expired, minting a new one");
                    // ES256 signing here is deterministic (RFC 6979): a token minted in the same second
                    // as the refused one would be the very same token. Wait for the next second.
                    let next = Duration::from_secs(jwt.iat + 1);
                    if let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH)
                        && next > now
                    {
                        tokio::time::sleep(next - now).await;
                    }
                    rejected = Some(jwt);
                }
                Verdict::RefreshToken => {
                    return Outcome::Retry {
                        after: None,
                        reason: "403 ExpiredProviderToken (again, with a fresh token)".into(),
                    };
                }
            }
        }
    }
}

/// Apple's `reason` from a response body, or a short description of a body without one.
fn reason(status: u16, body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v.get("reason").and_then(Value::as_str) {
            Some(r) => r.to_string(),
            None => format!("HTTP {status}"),
        },
        Err(_) => format!("HTTP {status}"),
    }
}

/// What an APNs response means (see the response table in "Sending notification requests to APNs").
pub fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Verdict {
    let r = reason(status, body);
    let outcome = match status {
        200 => Outcome::Sent,
        // "The device token is no longer active for the topic" (Unregistered, ExpiredToken).
        410 => Outcome::TokenGone(r),
        400 if r == "BadDeviceToken" || r == "DeviceTokenNotForTopic" => Outcome::TokenGone(r),
        403 if r == "ExpiredProviderToken" => return Verdict::RefreshToken,
        429 | 500..=599 => Outcome::Retry {
            after: retry_after,
            reason: format!("{status} {r}"),
        },
        _ => Outcome::Failed(format!("{status} {r}")),
    };
    Verdict::Done(outcome)
}

/// The alert text when the message body is not shown.
pub(crate) fn generic_text(count: u32) -> String {
    if count > 1 {
        format!("{count} new messages")
    } else {
        "New message".to_string()
    }
}

/// `s` cut to at most `max` bytes, on a char boundary, with an ellipsis when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Builds a JSON document with `build(title, text)`, shortening the longer of `title` and `text` (on a char
/// boundary, with an ellipsis), and then the other one if that is not enough, so that it fits in `max`
/// bytes. `Err` when even empty texts do not fit.
pub(crate) fn fit(
    max: usize,
    title: &str,
    text: &str,
    build: impl Fn(&str, &str) -> Value,
) -> Result<Vec<u8>, String> {
    let encode = |t: &str, x: &str| serde_json::to_vec(&build(t, x)).unwrap_or_default();
    let out = encode(title, text);
    if out.len() <= max {
        return Ok(out);
    }
    let cut = |s: &str, keep: usize| {
        if keep == 0 {
            String::new()
        } else {
            truncate(s, keep)
        }
    };
    // The longest cut of `field` for which `fits` holds (a binary search: JSON escaping makes the encoded
    // size of a cut hard to predict), or `None` when not even the empty string fits.
    let longest = |field: &str, fits: &dyn Fn(&str) -> bool| -> Option<String> {
        if !fits("") {
            return None;
        }
        let (mut lo, mut hi) = (0, field.len()); // cut(lo) fits; the answer is in lo..=hi
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(&cut(field, mid)) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Some(cut(field, lo))
    };
    let fits = |t: &str, x: &str| encode(t, x).len() <= max;
    // A huge sender name should not erase a short text, nor the reverse: cut the longer one first.
    if text.len() >= title.len() {
        if let Some(x) = longest(text, &|x| fits(title, x)) {
            return Ok(encode(title, &x));
        }
        if let Some(t) = longest(title, &|t| fits(t, "")) {
            return Ok(encode(&t, ""));
        }
    } else {
        if let Some(t) = longest(title, &|t| fits(t, text)) {
            return Ok(encode(&t, text));
        }
        if let Some(x) = longest(text, &|x| fits("", x)) {
            return Ok(encode("", &x));
        }
    }
    Err(format!("payload over {max} bytes even without text"))
}

/// The JSON payload of a notification.
pub fn payload(n: &Notification, include_body: bool) -> Result<Vec<u8>, String> {
    match n {
        Notification::Alert {
            conversation,
            offset,
            from,
            count,
            body,
        } => {
            let text = match body {
                Some(b) if include_body => b.clone(),
                _ => generic_text(*count),
            };
            fit(MAX_PAYLOAD, from, &text, |title, text| {
                json!({
                    "aps": {
                        "alert": { "title": title, "body": text },
                        "thread-id": conversation,
                        "sound": "default",
                    },
                    "corelay": { "conversation": conversation, "offset": offset, "count": count },
                })
            })
        }
        Notification::Clear { conversation, upto } => {
            let v = json!({
                "aps": { "content-available": 1 },
                "corelay": { "conversation": conversation, "read_upto": upto },
            });
            let out = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
            if out.len() > MAX_PAYLOAD {
                return Err(format!("payload over {MAX_PAYLOAD} bytes"));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(body: Option<&str>, count: u32) -> Notification {
        Notification::Alert {
            conversation: "c1".into(),
            offset: 42,
            from: "alice".into(),
            count,
            body: body.map(str::to_string),
        }
    }

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn alert_payload() {
        let v = parse(&payload(&alert(Some("hi there"), 1), true).unwrap());
        assert_eq!(
            v,
            json!({
                "aps": {"alert": {"title": "alice", "body": "hi there"}, "thread-id": "c1", "sound": "default"},
                "corelay": {"conversation": "c1", "offset": 42, "count": 1}
            })
        );
        // Without --push-include-body the text never leaves the gateway.
        let v = parse(&payload(&alert(Some("secret"), 1), false).unwrap());
        assert_eq!(v["aps"]["alert"]["body"], "New message");
        let v = parse(&payload(&alert(Some("secret"), 3), false).unwrap());
        assert_eq!(v["aps"]["alert"]["body"], "3 new messages");
        let v = parse(&payload(&alert(None, 2), true).unwrap());
        assert_eq!(v["aps"]["alert"]["body"], "2 new messages");
    }

    #[test]
    fn clear_payload() {
        let n = Notification::Clear {
            conversation: "c1".into(),
            upto: 7,
        };
        let v = parse(&payload(&n, true).unwrap());
        assert_eq!(
            v,
            json!({"aps": {"content-available": 1}, "corelay": {"conversation": "c1", "read_upto": 7}})
        );
    }

    #[test]
    fn long_bodies_are_cut_on_a_char_boundary() {
        for unit in ["a", "é", "😀", "\"", "\u{1}"] {
            let long = unit.repeat(5000);
            let out = payload(&alert(Some(&long), 1), true).unwrap();
            assert!(out.len() <= MAX_PAYLOAD, "{unit}: {}", out.len());
            let v = parse(&out);
            let body = v["aps"]["alert"]["body"].as_str().unwrap();
            assert!(body.ends_with('…'), "{unit}");
            // As long as fits: within one encoded character (at most 6 bytes, "\u0001") of the limit.
            assert!(
                out.len() > MAX_PAYLOAD - 6,
                "{unit}: cut too much ({})",
                out.len()
            );
        }
        // A huge sender name is cut too.
        let n = Notification::Alert {
            conversation: "c".into(),
            offset: 1,
            from: "ß".repeat(5000),
            count: 1,
            body: None,
        };
        let out = payload(&n, true).unwrap();
        assert!(out.len() <= MAX_PAYLOAD);
        assert_eq!(parse(&out)["aps"]["alert"]["body"], "New message");
        // A conversation id that alone is too large cannot be sent.
        let n = Notification::Alert {
            conversation: "c".repeat(5000),
            offset: 1,
            from: "a".into(),
            count: 1,
            body: None,
        };
        assert!(payload(&n, true).is_err());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("hello", 10), "hello");
        assert_eq!(truncate("hello world", 8), "hello…");
        let t = truncate("ééééé", 6);
        assert!(t.len() <= 6 && t.ends_with('…'), "{t}");
    }

    #[test]
    fn responses() {
        let b = |r: &str| format!(r#"{{"reason":"{r}"}}"#).into_bytes();
        assert_eq!(classify(200, None, b""), Verdict::Done(Outcome::Sent));
        assert_eq!(
            classify(
                410,
                None,
                br#"{"reason":"Unregistered","timestamp":1700000000000}"#
            ),
            Verdict::Done(Outcome::TokenGone("Unregistered".into()))
        );
        assert_eq!(
            classify(410, None, &b("ExpiredToken")),
            Verdict::Done(Outcome::TokenGone("ExpiredToken".into()))
        );
        assert_eq!(
            classify(400, None, &b("BadDeviceToken")),
            Verdict::Done(Outcome::TokenGone("BadDeviceToken".into()))
        );
        assert_eq!(
            classify(400, None, &b("DeviceTokenNotForTopic")),
            Verdict::Done(Outcome::TokenGone("DeviceTokenNotForTopic".into()))
        );
        assert_eq!(
            classify(400, None, &b("BadTopic")),
            Verdict::Done(Outcome::Failed("400 BadTopic".into()))
        );
        assert_eq!(
            classify(403, None, &b("ExpiredProviderToken")),
            Verdict::RefreshToken
        );
        assert_eq!(
            classify(403, None, &b("InvalidProviderToken")),
            Verdict::Done(Outcome::Failed("403 InvalidProviderToken".into()))
        );
        assert_eq!(
            classify(413, None, &b("PayloadTooLarge")),
            Verdict::Done(Outcome::Failed("413 PayloadTooLarge".into()))
        );
        assert_eq!(
            classify(429, Some(Duration::from_secs(3)), &b("TooManyRequests")),
            Verdict::Done(Outcome::Retry {
                after: Some(Duration::from_secs(3)),
                reason: "429 TooManyRequests".into()
            })
        );
        assert_eq!(
            classify(500, None, &b("InternalServerError")),
            Verdict::Done(Outcome::Retry {
                after: None,
                reason: "500 InternalServerError".into()
            })
        );
        assert_eq!(
            classify(503, None, b"<html>oops</html>"),
            Verdict::Done(Outcome::Retry {
                after: None,
                reason: "503 HTTP 503".into()
            })
        );
        assert_eq!(
            classify(404, None, b""),
            Verdict::Done(Outcome::Failed("404 HTTP 404".into()))
        );
    }

    #[test]
    fn refresh_age() {
        assert!(!jwt_needs_refresh(Duration::from_secs(0)));
        assert!(!jwt_needs_refresh(Duration::from_secs(49 * 60)));
        assert!(jwt_needs_refresh(Duration::from_secs(50 * 60)));
        // Apple refuses more than one refresh every 20 minutes, and tokens over 60 minutes old.
        const { assert!(JWT_REFRESH_AFTER.as_secs() > 20 * 60 && JWT_REFRESH_AFTER.as_secs() < 60 * 60) };
    }

    #[test]
    fn bad_keys_are_refused_clearly() {
        let cfg = |key: &str| ApnsConfig {
            url: DEFAULT_URL.into(),
            key_pem: key.into(),
            key_id: "ABC123DEFG".into(),
            team_id: "TEAM123456".into(),
            topic: "com.example.app".into(),
            ttl: Duration::from_secs(3600),
            include_body: false,
        };
        let err = Apns::new(cfg("not a key"), None, Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(err.to_string().contains(".p8"), "{err}");
        let mut c = cfg("x");
        c.topic = String::new();
        assert!(Apns::new(c, None, Duration::from_secs(5)).is_err());
    }
}
