//! The internal API (`/api/*`, API key), typed, over hyper's pooled HTTP/1.1 client.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client as HyperClient, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::HistoryPage;
use crate::cursor::enc;

/// A refused or failed API call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The gateway answered with an error status and its JSON reason (`{"error","status"}`).
    #[error("HTTP {status}: {code}")]
    Status {
        status: u16,
        /// The `error` of the answer (the reason), or the body when it was not the JSON error object.
        code: String,
        /// `Retry-After` (503: overloaded, or the store is busy).
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused or reset, or the request could not be written.
    #[error("transport: {0}")]
    Transport(String),
    /// An answer that does not parse.
    #[error("unexpected answer: {0}")]
    Decode(String),
    #[error("bad URL: {0}")]
    Url(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl ApiError {
    /// The HTTP status, when the gateway answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Worth retrying later: 503, 429, or no answer at all.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Status { status, .. } => matches!(status, 429 | 503),
            ApiError::Transport(_) | ApiError::Timeout(_) => true,
            _ => false,
        }
    }
}

/// What `create_conversation` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// 201: the conversation is new.
    New,
    /// 200: it existed (its members are replaced when they differ).
    Existed,
}

/// The internal API of a gateway (`Authorization: Bearer API_KEY`). Cheap to clone; connections are pooled.
#[derive(Clone)]
pub struct Api {
    base: String,
    key: String,
    http: HyperClient<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// `base_url`: `http://host:port` (`ws://` is taken as `http://`). Needs a tokio runtime when called.
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Api {
        let base = base_url.into();
        let base = base.trim_end_matches('/');
        let base = match base.strip_prefix("ws://") {
            Some(rest) => format!("http://{rest}"),
            None => base.to_string(),
        };
        Api {
            base,
            key: api_key.into(),
            http: HyperClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
            timeout: Duration::from_secs(10),
        }
    }

    /// Bound on each call (10 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Api {
        self.timeout = timeout;
        self
    }

    /// `POST /api/conversations`: creates a conversation, or replaces the members of an existing one.
    pub async fn create_conversation<S: AsRef<str>>(
        &self,
        id: &str,
        members: &[S],
    ) -> Result<Created, ApiError> {
        let members: Vec<&str> = members.iter().map(AsRef::as_ref).collect();
        let (status, _) = self
            .call(
                Method::POST,
                "/api/conversations",
                Some(json!({"id": id, "members": members})),
            )
            .await?;
        Ok(if status == StatusCode::CREATED {
            Created::New
        } else {
            Created::Existed
        })
    }

    /// `POST /api/publish` to a topic or a `user:` channel; the message's offset.
    pub async fn publish(&self, channel: &str, body: impl Into<Value>) -> Result<u64, ApiError> {
        let (_, answer) = self
            .call(
                Method::POST,
                "/api/publish",
                Some(json!({"channel": channel, "body": body.into()})),
            )
            .await?;
        answer["offset"]
            .as_u64()
            .ok_or_else(|| ApiError::Decode(format!("no offset in {answer}")))
    }

    /// `GET /api/history`: a page, newest first (`before` exclusive, `limit` 1–200, 50 by default).
    pub async fn history(
        &self,
        conversation: &str,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, ApiError> {
        let mut path = format!("/api/history?conversation={}", enc(conversation));
        if let Some(b) = before {
            path.push_str(&format!("&before={b}"));
        }
        if let Some(l) = limit {
            path.push_str(&format!("&limit={l}"));
        }
        let (_, answer) = self.call(Method::GET, &path, None).await?;
        serde_json::from_value(answer).map_err(|e| ApiError::Decode(e.to_string()))
    }

    /// `POST /api/devices`: registers a push device (`apns` or `fcm`) for `user`; `app` is the APNs topic
    /// when it is not the gateway's default (see docs/PUSH.md).
    pub async fn register_device(
        &self,
        user: &str,
        platform: &str,
        token: &str,
        app: Option<&str>,
    ) -> Result<(), ApiError> {
        let mut body = json!({"user": user, "platform": platform, "token": token});
        if let Some(app) = app {
            body["app"] = app.into();
        }
        self.call(Method::POST, "/api/devices", Some(body)).await?;
        Ok(())
    }

    /// `DELETE /api/devices`: forgets a push device.
    pub async fn unregister_device(
        &self,
        user: &str,
        platform: &str,
        token: &str,
    ) -> Result<(), ApiError> {
        let body = json!({"user": user, "platform": platform, "token": token});
        self.call(Method::DELETE, "/api/devices", Some(body))
            .await?;
        Ok(())
    }

    /// `GET /api/route`: the node that owns `user` on the ring.
    pub async fn route(&self, user: &str) -> Result<String, ApiError> {
        let (_, answer) = self
            .call(Method::GET, &format!("/api/route?user={}", enc(user)), None)
            .await?;
        answer["node"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ApiError::Decode(format!("no node in {answer}")))
    }

    /// One call: the status (2xx) and the JSON answer, or the typed error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ApiError> {
        let uri: http::Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e: http::uri::InvalidUri| ApiError::Url(e.to_string()))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key));
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| ApiError::Url(e.to_string()))?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| ApiError::Transport(e.to_string()))?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse().ok())
                .map(Duration::from_secs);
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ApiError::Transport(e.to_string()))?
                .to_bytes();
            Ok::<_, ApiError>((status, retry_after, bytes))
        };
        let (status, retry_after, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ApiError::Timeout(self.timeout))??;
        let parsed = serde_json::from_slice::<Value>(&bytes);
        if !status.is_success() {
            let code = match &parsed {
                Ok(v) if v["error"].is_string() => v["error"].as_str().unwrap_or("").to_string(),
                _ => String::from_utf8_lossy(&bytes).trim().to_string(),
            };
            return Err(ApiError::Status {
                status: status.as_u16(),
                code,
                retry_after,
            });
        }
        let answer = parsed.map_err(|e| ApiError::Decode(e.to_string()))?;
        Ok((status, answer))
    }
}
