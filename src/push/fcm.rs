//! Firebase Cloud Messaging, HTTP v1 API, authenticated with a service account (OAuth 2.0 JWT bearer).
//!
//! References:
//! - ["Send a message using FCM HTTP v1 API"](https://firebase.google.com/docs/cloud-messaging/send-message)
//!   and the [`projects.messages.send` reference](https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send):
//!   `POST /v1/projects/{project_id}/messages:send` with `{"message": {...}}` and `Authorization: Bearer
//!   <access token>`.
//! - ["Authorize send requests"](https://firebase.google.com/docs/cloud-messaging/auth-server) and Google's
//!   ["Using OAuth 2.0 for Server to Server Applications"](https://developers.google.com/identity/protocols/oauth2/service-account#httprest):
//!   the access token comes from the service account's `token_uri`, in exchange for an RS256 JWT
//!   assertion `{"iss": client_email, "scope": ".../firebase.messaging", "aud": token_uri, "iat", "exp"}`
//!   posted as `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<jwt>`. The answer's
//!   token is cached until shortly before it expires ([`token_refresh_after`]) and shared by all sends; one
//!   exchange at a time (concurrent sends wait for it, and share its failure). A send answered `401
//!   UNAUTHENTICATED` drops the cached token and is retried once with a new one. The token endpoint may be
//!   on another host than FCM (it is, in production): each origin has its own [`H2Client`].
//! - [`ErrorCode`](https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode) and
//!   ["Best practices for FCM registration token management"](https://firebase.google.com/docs/cloud-messaging/manage-tokens):
//!   `404 UNREGISTERED` and `400 INVALID_ARGUMENT` about the token mean the token is dead; `429
//!   QUOTA_EXCEEDED`, `500 INTERNAL`, `503 UNAVAILABLE` are retried (honouring `Retry-After`). See
//!   [`classify`].
//!
//! Data message values must be strings in FCM, so offsets and counts are sent as decimal strings. A
//! read-elsewhere update is a data-only message (`"type": "read"`, normal priority) that the app handles
//! silently.
//!
//! About 500 lines of client; the rest of the file is its unit tests.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::{Value, json};

use super::apns::{fit, generic_text};
use super::h2::{H2Client, parse_base_url, retry_after};
use super::{Notification, Outcome};

/// Google's production endpoint.
pub const DEFAULT_URL: &str = "https://fcm.googleapis.com";
/// The OAuth 2.0 scope for sending.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// FCM's limit on a message (notification and data together); we bound the whole request body by it.
pub const MAX_PAYLOAD: usize = 4096;
/// An access token is replaced this long before it expires (or at half its life if that is shorter).
pub const TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);
/// The lifetime asked for a JWT assertion (Google's maximum).
const ASSERTION_LIFETIME: u64 = 3600;

/// How to reach FCM and who we are.
#[derive(Clone, Debug)]
pub struct FcmConfig {
    /// `https://host[:port]`; [`DEFAULT_URL`] in production.
    pub url: String,
    /// The service-account JSON file's contents (`project_id`, `private_key`, `client_email`, `token_uri`).
    pub credentials_json: String,
    /// Put the message text in the notification (`--push-include-body`); else "New message".
    pub include_body: bool,
}

#[derive(Deserialize)]
struct ServiceAccount {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: String,
    private_key: String,
    client_email: String,
    token_uri: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
    token_type: String,
}

struct AccessToken {
    value: String,
    refresh_at: Instant,
}

/// The cached access token, and how the last exchange failed.
#[derive(Default)]
struct TokenSlot {
    current: Option<AccessToken>,
    /// (the number of the finished exchange, the outcome it gave): shared with the sends that were already
    /// waiting when it finished, so that a failing token endpoint costs one request per wave of sends, not
    /// one per send in a row.
    failure: Option<(u64, Outcome)>,
}

/// An FCM provider: a connection to FCM, one to the token endpoint (the same one if it is on the same
/// origin), one cached access token.
pub struct Fcm {
    client: H2Client,
    token_client: H2Client,
    token_uri: String,
    token_path: String,
    send_path: String,
    client_email: String,
    key: EncodingKey,
    include_body: bool,
    token: tokio::sync::Mutex<TokenSlot>,
    exchanges: AtomicU64,
    /// Exchanges finished (numbers failures, see [`TokenSlot::failure`]).
    finished: AtomicU64,
}

/// What a response means: an outcome, or "the access token was refused: get a new one and retry".
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

/// When a token valid for `lifetime` is replaced: [`TOKEN_MARGIN`] before it expires, or at half its life
/// when that is sooner (short-lived tokens).
pub fn token_refresh_after(lifetime: Duration) -> Duration {
    lifetime - TOKEN_MARGIN.min(lifetime / 2)
}

/// `https://host[:port]/path` → (`https://host[:port]`, `/path`).
fn split_uri(uri: &str) -> anyhow::Result<(String, String)> {
    let Some(rest) = uri.strip_prefix("https://") else {
        bail!("token_uri {uri:?} must be an https URL");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok((format!("https://{authority}"), path.to_string()))
}

impl Fcm {
    /// Parses the service account and checks its key (by signing an assertion); connects on the first
    /// send.
    pub fn new(cfg: FcmConfig, extra_ca: Option<&Path>, timeout: Duration) -> anyhow::Result<Fcm> {
        let sa: ServiceAccount = serde_json::from_str(&cfg.credentials_json)
            .context("FCM: the credentials are not a service-account JSON file")?;
        if let Some(kind) = &sa.kind
            && kind != "service_account"
        {
            bail!("FCM: the credentials are of type {kind:?}, not \"service_account\"");
        }
        if sa.project_id.is_empty()
            || !sa
                .project_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        {
            bail!("FCM: bad project_id {:?} in the credentials", sa.project_id);
        }
        if sa.client_email.is_empty() {
            bail!("FCM: empty client_email in the credentials");
        }
        let key = EncodingKey::from_rsa_pem(sa.private_key.as_bytes()).map_err(|e| {
            anyhow::anyhow!("FCM: private_key in the credentials is not an RSA PEM key: {e}")
        })?;
        let (token_origin, token_path) = split_uri(&sa.token_uri).context("FCM credentials")?;
        let client = H2Client::new(&cfg.url, extra_ca, timeout).context("FCM")?;
        let same_origin = match (parse_base_url(&cfg.url), parse_base_url(&token_origin)) {
            (Ok(a), Ok(b)) => (a.1.to_ascii_lowercase(), a.2) == (b.1.to_ascii_lowercase(), b.2),
            _ => false,
        };
        let token_client = if same_origin {
            client.clone()
        } else {
            H2Client::new(&token_origin, extra_ca, timeout).context("FCM token_uri")?
        };
        let fcm = Fcm {
            client,
            token_client,
            token_uri: sa.token_uri,
            token_path,
            send_path: format!("/v1/projects/{}/messages:send", sa.project_id),
            client_email: sa.client_email,
            key,
            include_body: cfg.include_body,
            token: tokio::sync::Mutex::new(TokenSlot::default()),
            exchanges: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        };
        fcm.assertion().map_err(|e| {
            anyhow::anyhow!("FCM: cannot sign with private_key (it must be an RSA key): {e}")
        })?;
        Ok(fcm)
    }

    /// Access-token exchanges made so far.
    pub fn token_exchanges(&self) -> u64 {
        self.exchanges.load(Ordering::SeqCst)
    }

    /// The HTTP/2 client to FCM (connection counts for logs and tests).
    pub fn client(&self) -> &H2Client {
        &self.client
    }

    fn assertion(&self) -> Result<String, jsonwebtoken::errors::Error> {
        let now = unix_now();
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        });
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
    }

    /// The cached access token, or a new one if there is none, it is due for refresh, or it is `rejected`
    /// (a token another send already replaced is not replaced again). `Err` is the outcome of the send.
    async fn access_token(&self, rejected: Option<&str>) -> Result<String, Outcome> {
        let finished_before = self.finished.load(Ordering::SeqCst);
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.current.as_ref()
            && Instant::now() < t.refresh_at
            && rejected != Some(t.value.as_str())
        {
            return Ok(t.value.clone());
        }
        if let Some((n, outcome)) = &slot.failure
            && *n > finished_before
        {
            // An exchange failed while this send waited for it: same answer.
            return Err(outcome.clone());
        }
        slot.current = None;
        self.exchanges.fetch_add(1, Ordering::SeqCst);
        let result = self.exchange().await;
        let n = self.finished.fetch_add(1, Ordering::SeqCst) + 1;
        match result {
            Ok(t) => {
                let value = t.value.clone();
                slot.current = Some(t);
                slot.failure = None;
                Ok(value)
            }
            Err(o) => {
                slot.failure = Some((n, o.clone()));
                Err(o)
            }
        }
    }

    /// One exchange of a fresh assertion for an access token at `token_uri`.
    async fn exchange(&self) -> Result<AccessToken, Outcome> {
        let started = Instant::now();
        let assertion = self
            .assertion()
            .map_err(|e| Outcome::Failed(format!("FCM: signing the token assertion: {e}")))?;
        // A JWT is base64url and dots: nothing in it needs form-encoding.
        let body = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let headers = [
            (
                "content-type",
                "application/x-www-form-urlencoded".to_string(),
            ),
            ("accept", "application/json".to_string()),
        ];
        let resp = self
            .token_client
            .request(
                http::Method::POST,
                &self.token_path,
                &headers,
                body.into_bytes(),
            )
            .await
            .map_err(|e| Outcome::Retry {
                after: None,
                reason: format!("FCM token exchange: {e}"),
            })?;
        match resp.status {
            200 => {}
            429 | 500..=599 => {
                return Err(Outcome::Retry {
                    after: retry_after(&resp.headers),
                    reason: format!("FCM token exchange: HTTP {}", resp.status),
                });
            }
            s => {
                // Google: {"error": "invalid_grant", "error_description": "..."}.
                let v: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
                let err = v.get("error").and_then(Value::as_str).unwrap_or("");
                let desc = v
                    .get("error_description")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                return Err(Outcome::Failed(format!(
                    "FCM token exchange: HTTP {s} {err} {desc}"
                )));
            }
        }
        let answer: TokenAnswer =
            serde_json::from_slice(&resp.body).map_err(|e| Outcome::Retry {
                after: None,
                reason: format!("FCM token exchange: bad answer: {e}"),
            })?;
        if !answer.token_type.eq_ignore_ascii_case("bearer")
            || answer.access_token.is_empty()
            || answer.expires_in == 0
        {
            return Err(Outcome::Failed(format!(
                "FCM token exchange: unusable token (type {:?}, expires_in {})",
                answer.token_type, answer.expires_in
            )));
        }
        // Capped at a day: the answer is not ours to trust with Instant arithmetic.
        let lifetime = Duration::from_secs(answer.expires_in.min(86_400));
        Ok(AccessToken {
            value: answer.access_token,
            refresh_at: started + token_refresh_after(lifetime),
        })
    }

    /// Sends one notification to one device; never panics, every failure is an [`Outcome`].
    pub async fn send(&self, device_token: &str, n: &Notification) -> Outcome {
        if device_token.is_empty() {
            return Outcome::TokenGone("empty registration token".into());
        }
        let body = match message(device_token, n, self.include_body) {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(e),
        };
        let mut rejected: Option<String> = None;
        loop {
            let token = match self.access_token(rejected.as_deref()).await {
                Ok(t) => t,
                Err(o) => return o,
            };
            let headers = [
                ("authorization", format!("Bearer {token}")),
                (
                    "content-type",
                    "application/json; charset=UTF-8".to_string(),
                ),
            ];
            let resp = match self
                .client
                .request(http::Method::POST, &self.send_path, &headers, body.clone())
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
                    tracing::info!("FCM: access token refused, getting a new one");
                    rejected = Some(token);
                }
                Verdict::RefreshToken => {
                    return Outcome::Failed(
                        "401 UNAUTHENTICATED (again, with a fresh access token)".into(),
                    );
                }
            }
        }
    }
}

/// The request body of a notification.
pub fn message(
    device_token: &str,
    n: &Notification,
    include_body: bool,
) -> Result<Vec<u8>, String> {
    let collapse = n.collapse_id();
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
                json!({ "message": {
                    "token": device_token,
                    "notification": { "title": title, "body": text },
                    "data": {
                        "conversation": conversation,
                        "offset": offset.to_string(),
                        "count": count.to_string(),
                    },
                    "android": { "collapse_key": collapse, "priority": "high" },
                }})
            })
        }
        Notification::Clear { conversation, upto } => {
            let v = json!({ "message": {
                "token": device_token,
                "data": { "type": "read", "conversation": conversation, "read_upto": upto.to_string() },
                "android": { "priority": "normal", "collapse_key": collapse },
            }});
            let out = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
            if out.len() > MAX_PAYLOAD {
                return Err(format!("message over {MAX_PAYLOAD} bytes"));
            }
            Ok(out)
        }
    }
}

/// The parts of a Google API error body (`{"error": {"code", "message", "status", "details": [...]}}`)
/// that matter here.
struct ApiError {
    status: String,
    message: String,
    /// `details[].errorCode` (the `FcmError` detail).
    codes: Vec<String>,
    /// `details[].fieldViolations[].field` (the `BadRequest` detail).
    fields: Vec<String>,
}

fn api_error(body: &[u8]) -> ApiError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let details = e["details"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    ApiError {
        status: s(&e["status"]),
        message: s(&e["message"]),
        codes: details
            .iter()
            .filter_map(|d| d["errorCode"].as_str())
            .map(str::to_string)
            .collect(),
        fields: details
            .iter()
            .filter_map(|d| d["fieldViolations"].as_array())
            .flatten()
            .filter_map(|f| f["field"].as_str())
            .map(str::to_string)
            .collect(),
    }
}

/// What an FCM response means (see [`ErrorCode`](https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode)).
pub fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Verdict {
    if status == 200 {
        return Verdict::Done(Outcome::Sent);
    }
    let e = api_error(body);
    let has = |code: &str| e.status == code || e.codes.iter().any(|c| c == code);
    let label = {
        let code = e
            .codes
            .first()
            .map(String::as_str)
            .filter(|c| !c.is_empty());
        let code = code.or((!e.status.is_empty()).then_some(e.status.as_str()));
        match (code, e.message.is_empty()) {
            (Some(c), false) => format!("{status} {c}: {}", e.message),
            (Some(c), true) => format!("{status} {c}"),
            (None, false) => format!("{status} {}", e.message),
            (None, true) => format!("HTTP {status}"),
        }
    };
    let outcome = match status {
        404 if has("UNREGISTERED") => Outcome::TokenGone(label),
        400 if has("INVALID_ARGUMENT")
            && (e.fields.iter().any(|f| f == "message.token")
                || e.message
                    .to_ascii_lowercase()
                    .contains("registration token")) =>
        {
            Outcome::TokenGone(label)
        }
        401 => return Verdict::RefreshToken,
        429 | 500..=599 => Outcome::Retry {
            after: retry_after,
            reason: label,
        },
        _ => Outcome::Failed(label),
    };
    Verdict::Done(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn alert_message() {
        let n = Notification::Alert {
            conversation: "c1".into(),
            offset: 42,
            from: "alice".into(),
            count: 2,
            body: Some("hi".into()),
        };
        let v = parse(&message("tok", &n, true).unwrap());
        assert_eq!(
            v,
            json!({"message": {
                "token": "tok",
                "notification": {"title": "alice", "body": "hi"},
                "data": {"conversation": "c1", "offset": "42", "count": "2"},
                "android": {"collapse_key": "c1", "priority": "high"}
            }})
        );
        let v = parse(&message("tok", &n, false).unwrap());
        assert_eq!(v["message"]["notification"]["body"], "2 new messages");
        let long = Notification::Alert {
            conversation: "c1".into(),
            offset: 1,
            from: "a".into(),
            count: 1,
            body: Some("ü".repeat(4000)),
        };
        let out = message("tok", &long, true).unwrap();
        assert!(out.len() <= MAX_PAYLOAD);
        assert!(
            parse(&out)["message"]["notification"]["body"]
                .as_str()
                .unwrap()
                .ends_with('…')
        );
    }

    #[test]
    fn clear_message_is_data_only() {
        let n = Notification::Clear {
            conversation: "c1".into(),
            upto: 9,
        };
        let v = parse(&message("tok", &n, true).unwrap());
        assert_eq!(
            v,
            json!({"message": {
                "token": "tok",
                "data": {"type": "read", "conversation": "c1", "read_upto": "9"},
                "android": {"priority": "normal", "collapse_key": "c1"}
            }})
        );
    }

    #[test]
    fn responses() {
        let unregistered = br#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND",
            "details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert!(
            matches!(classify(404, None, unregistered), Verdict::Done(Outcome::TokenGone(r)) if r.contains("UNREGISTERED"))
        );
        let plain_404 = br#"{"error":{"code":404,"message":"Not found","status":"NOT_FOUND"}}"#;
        assert!(matches!(
            classify(404, None, plain_404),
            Verdict::Done(Outcome::Failed(_))
        ));

        let bad_token = br#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token",
            "status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
        assert!(matches!(
            classify(400, None, bad_token),
            Verdict::Done(Outcome::TokenGone(_))
        ));
        let field = br#"{"error":{"code":400,"message":"Invalid value","status":"INVALID_ARGUMENT",
            "details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]}]}}"#;
        assert!(matches!(
            classify(400, None, field),
            Verdict::Done(Outcome::TokenGone(_))
        ));
        let other = br#"{"error":{"code":400,"message":"Invalid value at 'message.data[0].value'","status":"INVALID_ARGUMENT",
            "details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.data[0].value"}]}]}}"#;
        assert!(matches!(
            classify(400, None, other),
            Verdict::Done(Outcome::Failed(_))
        ));

        let quota =
            br#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED",
            "details":[{"errorCode":"QUOTA_EXCEEDED"}]}}"#;
        assert_eq!(
            classify(429, Some(Duration::from_secs(7)), quota),
            Verdict::Done(Outcome::Retry {
                after: Some(Duration::from_secs(7)),
                reason: "429 QUOTA_EXCEEDED: Quota exceeded".into()
            })
        );
        assert!(matches!(
            classify(503, None, b""),
            Verdict::Done(Outcome::Retry { after: None, .. })
        ));
        assert!(matches!(
            classify(500, None, b"{}"),
            Verdict::Done(Outcome::Retry { .. })
        ));
        assert_eq!(classify(401, None, b"{}"), Verdict::RefreshToken);
        assert!(matches!(
            classify(403, None, br#"{"error":{"status":"PERMISSION_DENIED"}}"#),
            Verdict::Done(Outcome::Failed(_))
        ));
        assert_eq!(
            classify(200, None, br#"{"name":"projects/p/messages/1"}"#),
            Verdict::Done(Outcome::Sent)
        );
    }

    #[test]
    fn token_cache_margin() {
        let m = |s| token_refresh_after(Duration::from_secs(s));
        assert_eq!(m(3600), Duration::from_secs(3300));
        assert_eq!(m(600), Duration::from_secs(300));
        assert_eq!(m(120), Duration::from_secs(60));
        assert_eq!(m(2), Duration::from_secs(1));
        assert_eq!(m(0), Duration::ZERO);
    }

    #[test]
    fn token_uri_split() {
        assert_eq!(
            split_uri("https://oauth2.googleapis.com/token").unwrap(),
            ("https://oauth2.googleapis.com".into(), "/token".into())
        );
        assert_eq!(
            split_uri("https://127.0.0.1:9/").unwrap(),
            ("https://127.0.0.1:9".into(), "/".into())
        );
        assert!(split_uri("http://x/token").is_err());
    }

    #[test]
    fn bad_credentials_are_refused_clearly() {
        let cfg = |json: &str| FcmConfig {
            url: DEFAULT_URL.into(),
            credentials_json: json.into(),
            include_body: false,
        };
        let t = Duration::from_secs(5);
        let err = Fcm::new(cfg("{}"), None, t).err().unwrap();
        assert!(format!("{err:#}").contains("project_id"), "{err:#}");
        let err = Fcm::new(
            cfg(r#"{"type":"service_account","project_id":"p","private_key":"nope","client_email":"a@b","token_uri":"https://oauth2.googleapis.com/token"}"#),
            None,
            t,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("RSA"), "{err}");
        let err = Fcm::new(
            cfg(r#"{"type":"authorized_user","project_id":"p","private_key":"","client_email":"a@b","token_uri":"https://x/token"}"#),
            None,
            t,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("service_account"), "{err}");
        let err = Fcm::new(
            cfg(r#"{"project_id":"p/../x","private_key":"","client_email":"a@b","token_uri":"https://x/token"}"#),
            None,
            t,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("project_id"), "{err}");
    }
}
