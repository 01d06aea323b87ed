//! A small pooled HTTP/2 client over rustls, for the push providers (APNs, FCM).
//!
//! Both providers speak HTTP/2 only (APNs requires it; FCM HTTP v1 accepts it) and both ask clients to keep
//! a connection open and multiplex requests on it rather than open one per notification: Apple, in
//! ["Sending notification requests to APNs"](https://developer.apple.com/documentation/usernotifications/sending-notification-requests-to-apns),
//! "keep your connections with APNs open across multiple notifications; don't repeatedly open and close
//! connections". So an [`H2Client`] holds **one** HTTP/2 connection per origin:
//!
//! - connected lazily on the first request (TCP, TLS with ALPN `h2` only, HTTP/2 handshake), by one caller
//!   while concurrent callers wait for it (single-flight);
//! - shared by concurrent requests, which clone its `SendRequest` handle; `h2` queues a request until the
//!   server's `SETTINGS_MAX_CONCURRENT_STREAMS` allows another stream;
//! - replaced when it is closed or broken: its driver task ended (server closed it, `GOAWAY` then idle, I/O
//!   error), or a request saw a connection-level error. A request that failed before it could be sent
//!   (the connection was found dead), that the server refused unprocessed (`GOAWAY` below its stream id,
//!   `REFUSED_STREAM`) or that failed on a *reused* connection with a connection-level error (a server that
//!   went away while we were idle) is retried once on a fresh connection. The last case can in rare cases
//!   deliver a notification twice; both providers collapse a resend by the collapse id, so that is
//!   harmless, while not retrying would turn every idle-connection close into an engine backoff.
//!
//! Every request is bounded by the client's timeout (connect included), and a response body is read fully
//! but at most [`MAX_BODY`] bytes (the providers answer with small JSON documents).
//!
//! TLS is rustls with the *ring* provider (no C toolchain beyond a compiler; aws-lc-rs needs cmake), trust
//! = the Mozilla roots from `webpki-roots` plus, optionally, the certificates of a PEM file (`--push-ca`:
//! staging proxies, and the local provider stubs in the tests).
//!
//! The client needs a tokio runtime with `rt`, `time` and `net` (the push thread runs a current-thread
//! one); the connection's driver is a task spawned on the runtime of the request that connected.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The most response body bytes a request reads; more is an error (provider answers are small JSON).
pub const MAX_BODY: usize = 64 * 1024;

/// One HTTP/2 origin (`https://host[:port]`) with a shared, lazily (re)connected connection. Cheap to
/// clone: clones share the connection.
#[derive(Clone)]
pub struct H2Client {
    inner: Arc<Inner>,
}

/// A response, its body read fully.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

struct Inner {
    /// `host[:port]` as given: the `:authority` of every request.
    authority: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    timeout: Duration,
    /// The current connection; the lock is held while connecting, so concurrent callers wait for one
    /// connect instead of racing several.
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// Connections established so far (ids, and a count for tests and logs).
    connects: AtomicU64,
}

struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    /// Drives the connection; finished once the connection is closed.
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(c) = self.conn.get_mut().take() {
            c.driver.abort();
        }
    }
}

impl fmt::Debug for H2Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Client")
            .field("authority", &self.inner.authority)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// `https://host[:port]` (an optional trailing `/`, nothing else) → (authority, host, port).
pub(crate) fn parse_base_url(base_url: &str) -> anyhow::Result<(String, String, u16)> {
    let Some(rest) = base_url.strip_prefix("https://") else {
        bail!("push URL {base_url:?}: must be https://host[:port]");
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        bail!("push URL {base_url:?}: must be https://host[:port] (no path, query or user info)");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            bail!("push URL {base_url:?}: unterminated IPv6 address");
        };
        let port =
            match after {
                "" => None,
                p => Some(p.strip_prefix(':').with_context(|| {
                    format!("push URL {base_url:?}: junk after the IPv6 address")
                })?),
            };
        (h.to_string(), port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        bail!("push URL {base_url:?}: empty host");
    }
    let port = match port {
        None => 443,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => bail!("push URL {base_url:?}: bad port {p:?}"),
        },
    };
    Ok((authority.to_string(), host, port))
}

impl H2Client {
    /// A client for `base_url` (`https://host[:port]`, anything else is refused), trusting the webpki roots
    /// and the certificates in the PEM file `extra_ca`; every request is bounded by `timeout`. Does not
    /// connect: the first request does.
    pub fn new(
        base_url: &str,
        extra_ca: Option<&Path>,
        timeout: Duration,
    ) -> anyhow::Result<H2Client> {
        let (authority, host, port) = parse_base_url(base_url)?;
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| anyhow::anyhow!("push URL {base_url:?}: bad host name: {e}"))?;

        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = extra_ca {
            let mut n = 0;
            for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading CA file {}", path.display()))?
            {
                let cert = cert.with_context(|| format!("parsing CA file {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("CA file {}: unusable certificate", path.display()))?;
                n += 1;
            }
            if n == 0 {
                bail!("CA file {}: no certificates in it", path.display());
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];

        Ok(H2Client {
            inner: Arc::new(Inner {
                authority,
                host,
                port,
                server_name,
                connector: TlsConnector::from(Arc::new(config)),
                timeout,
                conn: tokio::sync::Mutex::new(None),
                connects: AtomicU64::new(0),
            }),
        })
    }

    /// `host[:port]` of this client's origin.
    pub fn authority(&self) -> &str {
        &self.inner.authority
    }

    /// How many connections this client has established (1 while the first one lives).
    pub fn connects(&self) -> u64 {
        self.inner.connects.load(Ordering::Relaxed)
    }

    /// Sends one request on the shared connection (connecting if needed) and reads the whole response,
    /// within the client's timeout. `Err` is a transport failure (connect, TLS, HTTP/2, timeout, body over
    /// [`MAX_BODY`]), never an HTTP status.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Response, String> {
        if !path_and_query.starts_with('/') {
            return Err(format!(
                "request path {path_and_query:?} must start with '/'"
            ));
        }
        let uri: http::Uri = format!("https://{}{}", self.inner.authority, path_and_query)
            .parse()
            .map_err(|e| format!("bad request path {path_and_query:?}: {e}"))?;
        let mut map = HeaderMap::with_capacity(headers.len() + 1);
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("bad header name {name:?}: {e}"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| format!("bad value for header {name}: {e}"))?;
            map.append(name, value);
        }
        if !body.is_empty() {
            map.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let req = Req {
            method,
            uri,
            headers: map,
            body: Bytes::from(body),
        };
        match tokio::time::timeout(self.inner.timeout, self.request_inner(&req)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{}: no response within {:?}",
                self.inner.authority, self.inner.timeout
            )),
        }
    }

    async fn request_inner(&self, req: &Req) -> Result<Response, String> {
        let mut retried = false;
        loop {
            let (id, fresh, send) = self.connection().await?;
            match exchange(send, req).await {
                Ok(r) => return Ok(r),
                Err(f) => {
                    if f.conn_broken {
                        self.invalidate(id).await;
                    }
                    let retry = f.unprocessed || (f.conn_broken && !fresh);
                    if retry && !retried {
                        retried = true;
                        tracing::debug!(authority = %self.inner.authority, error = %f.msg,
                            "push: request failed on a dead connection, retrying on a fresh one");
                        continue;
                    }
                    return Err(format!("{}: {}", self.inner.authority, f.msg));
                }
            }
        }
    }

    /// The live connection (id, whether this call made it, a handle), connecting if there is none.
    async fn connection(&self) -> Result<(u64, bool, SendRequest<Bytes>), String> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.driver.is_finished() {
                return Ok((c.id, false, c.send.clone()));
            }
            tracing::debug!(authority = %self.inner.authority, "push: connection closed, reconnecting");
        }
        *slot = None;
        let c = self.connect().await?;
        let out = (c.id, true, c.send.clone());
        *slot = Some(c);
        Ok(out)
    }

    async fn connect(&self) -> Result<Conn, String> {
        let inner = &self.inner;
        let what = &inner.authority;
        let tcp = TcpStream::connect((inner.host.as_str(), inner.port))
            .await
            .map_err(|e| format!("{what}: connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = inner
            .connector
            .connect(inner.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("{what}: TLS: {e}"))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(format!("{what}: server did not negotiate HTTP/2 (ALPN h2)"));
        }
        let (send, connection) = h2::client::Builder::new()
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| format!("{what}: HTTP/2 handshake: {e}"))?;
        let id = inner.connects.fetch_add(1, Ordering::Relaxed) + 1;
        let authority = inner.authority.clone();
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%authority, error = %e, "push: HTTP/2 connection ended");
            }
        });
        tracing::debug!(authority = %inner.authority, id, "push: HTTP/2 connection established");
        Ok(Conn { id, send, driver })
    }

    /// Forgets connection `id` if it is still the current one (a newer one is kept).
    async fn invalidate(&self, id: u64) {
        let mut slot = self.inner.conn.lock().await;
        if slot.as_ref().is_some_and(|c| c.id == id)
            && let Some(c) = slot.take()
        {
            c.driver.abort();
        }
    }
}

struct Req {
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
}

struct Failure {
    msg: String,
    /// The connection is unusable for further requests.
    conn_broken: bool,
    /// The server certainly did not process the request (never sent, refused, above the GOAWAY id).
    unprocessed: bool,
}

fn h2_failure(stage: &str, e: h2::Error, sent: bool) -> Failure {
    let refused = e.reason() == Some(h2::Reason::REFUSED_STREAM);
    Failure {
        msg: format!("{stage}: {e}"),
        conn_broken: !e.is_reset() || e.is_go_away(),
        unprocessed: !sent || e.is_go_away() || refused,
    }
}

async fn exchange(send: SendRequest<Bytes>, req: &Req) -> Result<Response, Failure> {
    let mut send = send
        .ready()
        .await
        .map_err(|e| h2_failure("connection", e, false))?;
    let mut request = http::Request::new(());
    *request.method_mut() = req.method.clone();
    *request.uri_mut() = req.uri.clone();
    *request.headers_mut() = req.headers.clone();
    let end = req.body.is_empty();
    let (response, mut stream) = send
        .send_request(request, end)
        .map_err(|e| h2_failure("send", e, false))?;
    if !end {
        stream
            .send_data(req.body.clone(), true)
            .map_err(|e| h2_failure("send body", e, true))?;
    }
    let response = response
        .await
        .map_err(|e| h2_failure("response", e, true))?;
    let (parts, mut body) = response.into_parts();
    let mut buf = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| h2_failure("response body", e, true))?;
        // Give the window back, or a large body stalls the stream (and the connection's window).
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > MAX_BODY {
            return Err(Failure {
                msg: format!("response body over {MAX_BODY} bytes"),
                conn_broken: false,
                unprocessed: false,
            });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Response {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: buf,
    })
}

/// A `Retry-After` header in delta-seconds form (the form providers use), capped at a day. The HTTP-date
/// form is ignored (the engine's backoff decides then).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: u64 = v.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(86_400)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let ok = |u: &str| parse_base_url(u).unwrap();
        assert_eq!(
            ok("https://api.push.apple.com"),
            (
                "api.push.apple.com".into(),
                "api.push.apple.com".into(),
                443
            )
        );
        assert_eq!(
            ok("https://127.0.0.1:8443/"),
            ("127.0.0.1:8443".into(), "127.0.0.1".into(), 8443)
        );
        assert_eq!(
            ok("https://[::1]:9000"),
            ("[::1]:9000".into(), "::1".into(), 9000)
        );
        assert_eq!(ok("https://[::1]"), ("[::1]".into(), "::1".into(), 443));
        for bad in [
            "http://api.push.apple.com",
            "api.push.apple.com",
            "https://",
            "https://host/path",
            "https://host?x=1",
            "https://user@host",
            "https://host:0",
            "https://host:99999",
            "https://host:abc",
            "https://[::1",
            "https://[::1]x",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn client_construction() {
        assert!(H2Client::new("https://api.push.apple.com", None, Duration::from_secs(5)).is_ok());
        assert!(H2Client::new("https://127.0.0.1:1", None, Duration::from_secs(5)).is_ok());
        let err = H2Client::new("ftp://x", None, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("https://host[:port]"), "{err}");
        let missing = Path::new("/nonexistent/corelay-ca.pem");
        assert!(H2Client::new("https://x", Some(missing), Duration::from_secs(5)).is_err());
    }

    #[test]
    fn retry_after_header() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_static("99999999"),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn connect_failure_is_an_error_not_a_panic() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Port 1 on localhost: refused.
        let c = H2Client::new("https://127.0.0.1:1", None, Duration::from_secs(2)).unwrap();
        let r = rt.block_on(c.request(
            Method::POST,
            "/x",
            &[("content-type", "a/b".into())],
            vec![1],
        ));
        assert!(r.is_err());
        let r = rt.block_on(c.request(Method::GET, "no-slash", &[], vec![]));
        assert!(r.unwrap_err().contains("must start with"));
        let r = rt.block_on(c.request(Method::GET, "/", &[("bad header", "x".into())], vec![]));
        assert!(r.unwrap_err().contains("bad header name"));
    }
}
