//! Local stand-ins for the push providers (APNs and FCM HTTP v1): real TLS, real HTTP/2, strict checks.
//!
//! The one place where a stand-in is right: Apple's and Google's servers cannot be reached from tests, so
//! these check every request **exactly** as documented (see `src/push/apns.rs` and `src/push/fcm.rs` for
//! the references) and record it, and answer the way the providers do, including their error bodies. A
//! request that breaks the protocol is answered with the provider's error and recorded in
//! [`PushStub::violations`] (tests assert it stays empty).
//!
//! Use from a test file with `#[path = "support/push_stub.rs"] mod push_stub;`. The API is synchronous:
//! the stub runs its own tokio runtime on a background thread, so plain `#[test]` functions can drive it.
//!
//! - TLS: a fresh CA (and a server certificate for `127.0.0.1`/`localhost` signed by it) per stub;
//!   [`PushStub::ca_path`] is a PEM file with the CA, for `--push-ca` / `extra_ca`. ALPN `h2` only.
//! - APNs ([`PushStub::apns`]): `POST /3/device/<token>` with an ES256 provider token verified against the
//!   public key, `kid`, `iss`, `iat` (not in the future, at most 60 minutes old), `apns-topic`,
//!   `apns-push-type` (`alert`/`background`) with a consistent `apns-priority` (10/5), a numeric
//!   `apns-expiration`, an `apns-collapse-id` of at most 64 bytes, and a JSON payload of at most 4096
//!   bytes with a fitting `aps` dictionary.
//! - FCM ([`PushStub::fcm`]): the OAuth token endpoint at `/token` (form fields, RS256 assertion signature
//!   and claims, `aud` = `{url}/token`) issuing random access tokens valid for
//!   [`PushStub::set_token_expires_in`] seconds (3600 by default), and `POST
//!   /v1/projects/<project>/messages:send` (a bearer token it issued and that has not expired, the project,
//!   and the message's shape).
//! - Scripting, in this order: a protocol violation is answered as such; then a token given to
//!   [`PushStub::fail_tokens`] gets its scripted answer; then the [`PushStub::push_response`] queue (one
//!   per push request, FIFO); then 200. [`PushStub::set_down`] closes every connection (in-flight requests
//!   get no answer) and closes new ones right after accept, like a dead backend behind a load balancer;
//!   [`PushStub::goaway`] sends HTTP/2 `GOAWAY` on every open connection (a graceful server restart);
//!   [`PushStub::set_delay`] delays every answer.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

/// FCM's OAuth scope for sending.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// A scripted answer.
#[derive(Clone, Debug)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Scripted {
    pub fn new(status: u16, body: impl Into<String>) -> Scripted {
        Scripted {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// An APNs error: `{"reason": reason}` (410 also carries Apple's `timestamp`).
    pub fn apns(status: u16, reason: &str) -> Scripted {
        let body = if status == 410 {
            json!({ "reason": reason, "timestamp": unix_now() * 1000 })
        } else {
            json!({ "reason": reason })
        };
        Scripted::new(status, body.to_string())
    }

    /// An FCM (Google API) error: `{"error": {"code", "message", "status", "details": [{errorCode}]}}`.
    pub fn fcm(status: u16, api_status: &str, error_code: &str, message: &str) -> Scripted {
        let body = json!({ "error": {
            "code": status,
            "message": message,
            "status": api_status,
            "details": [{
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": error_code,
            }],
        }});
        Scripted::new(status, body.to_string())
    }

    pub fn header(mut self, name: &str, value: &str) -> Scripted {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// One request the stub received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The body as JSON (`Null` if it was not JSON).
    pub json: Value,
    /// APNs: from the path; FCM: `message.token`.
    pub device_token: Option<String>,
    /// APNs: the provider token's `iat`, when it verified.
    pub jwt_iat: Option<u64>,
    /// The status it was answered with.
    pub status: u16,
    /// Which TLS connection it came on (1, 2, ... in accept order).
    pub connection: usize,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The bearer token of the `authorization` header (APNs: the JWT; FCM: the access token).
    pub fn bearer(&self) -> Option<&str> {
        let a = self.header("authorization")?;
        a.strip_prefix("bearer ")
            .or_else(|| a.strip_prefix("Bearer "))
    }
}

enum Provider {
    Apns {
        key: DecodingKey,
        key_id: String,
        team_id: String,
        topic: String,
    },
    Fcm {
        key: DecodingKey,
        project_id: String,
        client_email: String,
    },
}

struct State {
    requests: Vec<Recorded>,
    violations: Vec<String>,
    scripted: VecDeque<Scripted>,
    token_scripted: VecDeque<Scripted>,
    failing: HashMap<String, Scripted>,
    /// FCM access tokens issued → when they expire.
    issued: HashMap<String, Instant>,
    token_requests: usize,
    expires_in: u64,
    delay: Duration,
    next_id: u64,
}

struct Shared {
    provider: Provider,
    url: String,
    state: Mutex<State>,
    connections: AtomicUsize,
    down: AtomicBool,
    down_tx: tokio::sync::watch::Sender<bool>,
    goaway_tx: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running provider stand-in; stops (and removes its files) when dropped.
pub struct PushStub {
    shared: Arc<Shared>,
    url: String,
    dir: PathBuf,
    ca_path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("OS randomness");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fresh ES256 (P-256) key pair: (private key as PKCS#8 PEM, i.e. Apple's `.p8` format; public key as
/// SPKI PEM).
pub fn es256_key() -> (String, String) {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let sk = p256::SecretKey::random(&mut rand_core::OsRng);
    let private = sk
        .to_pkcs8_pem(LineEnding::LF)
        .expect("encode P-256 key")
        .to_string();
    let public = sk
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("encode P-256 public key");
    (private, public)
}

/// An RSA 2048 key pair (private PKCS#8 PEM, as in a service-account file; public SPKI PEM), generated
/// once per test binary (RSA key generation is slow in debug builds).
pub fn rsa_key() -> (String, String) {
    static KEY: OnceLock<(String, String)> = OnceLock::new();
    KEY.get_or_init(|| {
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let sk = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("RSA keygen");
        let private = sk
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encode RSA key")
            .to_string();
        let public = rsa::RsaPublicKey::from(&sk)
            .to_public_key_pem(LineEnding::LF)
            .expect("encode RSA public key");
        (private, public)
    })
    .clone()
}

/// A service-account JSON file's contents, as the Firebase console hands them out.
pub fn service_account_json(
    project: &str,
    email: &str,
    private_pem: &str,
    token_uri: &str,
) -> String {
    json!({
        "type": "service_account",
        "project_id": project,
        "private_key_id": "0123456789abcdef",
        "private_key": private_pem,
        "client_email": email,
        "client_id": "100000000000000000000",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    })
    .to_string()
}

impl PushStub {
    /// An APNs stand-in accepting provider tokens signed by the key whose public half is
    /// `public_key_pem`, with this key id and team id, for this topic.
    pub fn apns(public_key_pem: &str, key_id: &str, team_id: &str, topic: &str) -> PushStub {
        let key = DecodingKey::from_ec_pem(public_key_pem.as_bytes()).expect("EC public key PEM");
        PushStub::start(|_| Provider::Apns {
            key,
            key_id: key_id.to_string(),
            team_id: team_id.to_string(),
            topic: topic.to_string(),
        })
    }

    /// An FCM stand-in (messages and, at `/token`, the OAuth token endpoint) for this project, accepting
    /// assertions from `client_email` signed by the key whose public half is `public_key_pem`.
    pub fn fcm(project_id: &str, client_email: &str, public_key_pem: &str) -> PushStub {
        let key = DecodingKey::from_rsa_pem(public_key_pem.as_bytes()).expect("RSA public key PEM");
        PushStub::start(|_| Provider::Fcm {
            key,
            project_id: project_id.to_string(),
            client_email: client_email.to_string(),
        })
    }

    fn start(provider: impl FnOnce(&str) -> Provider) -> PushStub {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "corelay-push-stub-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("stub dir");

        // A CA, and a server certificate for 127.0.0.1/localhost signed by it.
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "corelay push stub CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA cert");
        let server_key = rcgen::KeyPair::generate().expect("server key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "127.0.0.1");
        let server_cert = params.signed_by(&server_key, &ca).expect("server cert");
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).expect("write CA");

        let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(
            rustls_pki_types::PrivatePkcs8KeyDer::from(server_key.serialize_der()),
        );
        let provider_tls = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider_tls)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![server_cert.der().clone()], key_der)
            .expect("server TLS config");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind stub");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let url = format!("https://127.0.0.1:{port}");

        let (down_tx, _) = tokio::sync::watch::channel(false);
        let (goaway_tx, _) = tokio::sync::watch::channel(0u64);
        let shared = Arc::new(Shared {
            provider: provider(&url),
            url: url.clone(),
            state: Mutex::new(State {
                requests: Vec::new(),
                violations: Vec::new(),
                scripted: VecDeque::new(),
                token_scripted: VecDeque::new(),
                failing: HashMap::new(),
                issued: HashMap::new(),
                token_requests: 0,
                expires_in: 3600,
                delay: Duration::ZERO,
                next_id: 0,
            }),
            connections: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            down_tx,
            goaway_tx,
        });

        let (shutdown, mut shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("push-stub".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("stub runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("stub listener");
                    loop {
                        tokio::select! {
                            _ = &mut shutdown_rx => break,
                            acc = listener.accept() => {
                                let Ok((tcp, _)) = acc else { continue };
                                if sh.down.load(Ordering::SeqCst) {
                                    drop(tcp);
                                    continue;
                                }
                                tokio::spawn(serve_connection(sh.clone(), acceptor.clone(), tcp));
                            }
                        }
                    }
                });
                // Dropping the runtime cancels every connection task.
            })
            .expect("stub thread");

        PushStub {
            shared,
            url,
            dir,
            ca_path,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A PEM file with the stub's CA certificate (pass as the extra CA).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// Queues an answer for the next push request (FIFO, before the default 200).
    pub fn push_response(&self, r: Scripted) {
        self.shared.state().scripted.push_back(r);
    }

    /// FCM: queues an answer for the next token request (FIFO, before a normal token grant).
    pub fn push_token_response(&self, r: Scripted) {
        self.shared.state().token_scripted.push_back(r);
    }

    /// Answers every push to these device tokens with `status` and the JSON `body` (e.g. `410`,
    /// `{"reason":"Unregistered"}`).
    pub fn fail_tokens(&self, tokens: &[&str], status: u16, body: &str) {
        let mut st = self.shared.state();
        for t in tokens {
            st.failing
                .insert(t.to_string(), Scripted::new(status, body));
        }
    }

    /// Stops failing these tokens.
    pub fn heal_tokens(&self, tokens: &[&str]) {
        let mut st = self.shared.state();
        for t in tokens {
            st.failing.remove(*t);
        }
    }

    /// While down, open connections are closed (in-flight requests get no answer) and new ones are
    /// closed right after accept.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        self.shared.down_tx.send_replace(down);
    }

    /// Sends HTTP/2 `GOAWAY` on every open connection (they finish their streams, then close).
    pub fn goaway(&self) {
        self.shared.goaway_tx.send_modify(|g| *g += 1);
    }

    /// Delays every answer by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.shared.state().delay = d;
    }

    /// FCM: the lifetime (`expires_in`) of access tokens issued from now on.
    pub fn set_token_expires_in(&self, secs: u64) {
        self.shared.state().expires_in = secs;
    }

    /// Every push request received (not the FCM token requests), in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.state().requests.clone()
    }

    /// The push requests accepted (answered 200).
    pub fn sent(&self) -> Vec<Recorded> {
        self.shared
            .state()
            .requests
            .iter()
            .filter(|r| r.status == 200)
            .cloned()
            .collect()
    }

    /// Protocol violations seen (empty when the client followed the documented protocol).
    pub fn violations(&self) -> Vec<String> {
        self.shared.state().violations.clone()
    }

    /// FCM: requests to the token endpoint.
    pub fn token_requests(&self) -> usize {
        self.shared.state().token_requests
    }

    /// TLS connections accepted (and not closed at once for being down).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` pushes were accepted; false on timeout.
    pub fn wait_sent(&self, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.sent().len() >= n {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PushStub {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn serve_connection(
    sh: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        let mut st = sh.state();
        st.violations.push("connection without ALPN h2".into());
        return;
    }
    let conn_no = sh.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let Ok(mut conn) = h2::server::handshake(tls).await else {
        return;
    };
    let mut down_rx = sh.down_tx.subscribe();
    let mut goaway_rx = sh.goaway_tx.subscribe();
    goaway_rx.mark_unchanged();
    let mut going_away = false;
    loop {
        tokio::select! {
            r = conn.accept() => match r {
                Some(Ok((req, respond))) => {
                    tokio::spawn(handle(sh.clone(), conn_no, req, respond));
                }
                _ => break,
            },
            _ = down_rx.wait_for(|d| *d) => break, // dropped: the socket closes under in-flight requests
            r = goaway_rx.changed(), if !going_away => {
                if r.is_ok() {
                    going_away = true;
                    conn.graceful_shutdown();
                }
            }
        }
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl From<Scripted> for Reply {
    fn from(s: Scripted) -> Reply {
        Reply {
            status: s.status,
            headers: s.headers,
            body: s.body,
        }
    }
}

async fn handle(
    sh: Arc<Shared>,
    conn_no: usize,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let (parts, mut body) = req.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let delay = sh.state().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if sh.down.load(Ordering::SeqCst) {
        return; // the connection is being torn down: no answer (the stream is reset, then the socket closes)
    }
    let method = parts.method.as_str().to_string();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let reply = match &sh.provider {
        Provider::Apns { .. } => apns(&sh, conn_no, &method, &path, headers, &data),
        Provider::Fcm { .. } if path == "/token" => fcm_token(&sh, &method, &headers, &data),
        Provider::Fcm { .. } => fcm_send(&sh, conn_no, &method, &path, headers, &data),
    };
    let mut resp = http::Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        resp = resp.header(k.as_str(), v.as_str());
    }
    let has_body = !reply.body.is_empty();
    if has_body {
        resp = resp.header("content-type", "application/json");
    }
    let Ok(resp) = resp.body(()) else { return };
    let Ok(mut stream) = respond.send_response(resp, !has_body) else {
        return;
    };
    if has_body {
        let _ = stream.send_data(Bytes::from(reply.body.into_bytes()), true);
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The scripted answer for a push to `token`, if any (failing tokens first, then the queue).
fn scripted(st: &mut State, token: Option<&str>) -> Option<Reply> {
    if let Some(t) = token
        && let Some(s) = st.failing.get(t)
    {
        return Some(s.clone().into());
    }
    st.scripted.pop_front().map(Reply::from)
}

// ---------------------------------------------------------------------------------------------- APNs

type Violation = (u16, &'static str, String);

fn apns_check(
    sh: &Shared,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    jwt_iat: &mut Option<u64>,
) -> Result<(), Violation> {
    let Provider::Apns {
        key,
        key_id,
        team_id,
        topic,
    } = &sh.provider
    else {
        unreachable!("APNs handler on an FCM stub")
    };
    if method != "POST" {
        return Err((405, "MethodNotAllowed", format!("method {method}")));
    }
    match path.strip_prefix("/3/device/") {
        Some(t) if !t.is_empty() && !t.contains(['/', '?']) => {}
        _ => return Err((404, "BadPath", format!("path {path}"))),
    }
    // Provider token.
    let Some(auth) = header(headers, "authorization") else {
        return Err((
            403,
            "MissingProviderToken",
            "no authorization header".into(),
        ));
    };
    let Some(jwt) = auth.strip_prefix("bearer ") else {
        return Err((
            403,
            "InvalidProviderToken",
            format!("authorization is not 'bearer <jwt>': {auth}"),
        ));
    };
    let h = jsonwebtoken::decode_header(jwt)
        .map_err(|e| (403, "InvalidProviderToken", format!("JWT header: {e}")))?;
    if h.alg != Algorithm::ES256 || h.kid.as_deref() != Some(key_id.as_str()) {
        return Err((
            403,
            "InvalidProviderToken",
            format!("JWT alg {:?} kid {:?}", h.alg, h.kid),
        ));
    }
    let mut v = Validation::new(Algorithm::ES256);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_aud = false;
    let data = jsonwebtoken::decode::<Value>(jwt, key, &v).map_err(|e| {
        (
            403,
            "InvalidProviderToken",
            format!("JWT signature/claims: {e}"),
        )
    })?;
    let claims = data.claims;
    if claims["iss"].as_str() != Some(team_id.as_str()) {
        return Err((
            403,
            "InvalidProviderToken",
            format!("iss {}", claims["iss"]),
        ));
    }
    let Some(iat) = claims["iat"].as_u64() else {
        return Err((
            403,
            "InvalidProviderToken",
            format!("iat {}", claims["iat"]),
        ));
    };
    *jwt_iat = Some(iat);
    let now = unix_now();
    if iat > now + 1 {
        return Err((
            403,
            "InvalidProviderToken",
            format!("iat {iat} is in the future (now {now})"),
        ));
    }
    if now.saturating_sub(iat) > 3600 {
        return Err((
            403,
            "ExpiredProviderToken",
            format!("iat {iat} is over an hour old"),
        ));
    }
    // Headers.
    match header(headers, "apns-topic") {
        None => return Err((400, "MissingTopic", "no apns-topic".into())),
        Some(t) if t != topic => return Err((400, "BadTopic", format!("apns-topic {t}"))),
        Some(_) => {}
    }
    let push_type = header(headers, "apns-push-type").unwrap_or("");
    let want_priority = match push_type {
        "alert" => "10",
        "background" => "5",
        other => return Err((400, "InvalidPushType", format!("apns-push-type {other:?}"))),
    };
    if header(headers, "apns-priority") != Some(want_priority) {
        return Err((
            400,
            "BadPriority",
            format!(
                "apns-priority {:?} for {push_type}",
                header(headers, "apns-priority")
            ),
        ));
    }
    match header(headers, "apns-expiration") {
        Some(e) if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) => {}
        e => return Err((400, "BadExpirationDate", format!("apns-expiration {e:?}"))),
    }
    if let Some(c) = header(headers, "apns-collapse-id")
        && c.len() > 64
    {
        return Err((
            400,
            "BadCollapseId",
            format!("apns-collapse-id of {} bytes", c.len()),
        ));
    }
    // Payload.
    if body.is_empty() {
        return Err((400, "PayloadEmpty", "empty body".into()));
    }
    if body.len() > 4096 {
        return Err((413, "PayloadTooLarge", format!("{} bytes", body.len())));
    }
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return Err((400, "BadPayload", "body is not JSON".into()));
    };
    let Some(aps) = json.get("aps").and_then(Value::as_object) else {
        return Err((400, "BadPayload", "no aps dictionary".into()));
    };
    if push_type == "background" {
        if aps.get("content-available").and_then(Value::as_u64) != Some(1)
            || aps.contains_key("alert")
            || aps.contains_key("sound")
            || aps.contains_key("badge")
        {
            return Err((
                400,
                "BadPayload",
                format!("background push with aps {}", json["aps"]),
            ));
        }
    } else {
        let alert = aps.get("alert").and_then(Value::as_object);
        let ok = alert.is_some_and(|a| {
            a.get("title").is_some_and(Value::is_string)
                && a.get("body").is_some_and(Value::is_string)
        });
        if !ok {
            return Err((
                400,
                "BadPayload",
                format!("alert push with aps {}", json["aps"]),
            ));
        }
    }
    Ok(())
}

fn apns(
    sh: &Shared,
    conn_no: usize,
    method: &str,
    path: &str,
    headers: Vec<(String, String)>,
    body: &[u8],
) -> Reply {
    let mut jwt_iat = None;
    let check = apns_check(sh, method, path, &headers, body, &mut jwt_iat);
    let device_token = path.strip_prefix("/3/device/").map(str::to_string);
    let mut st = sh.state();
    let reply = match check {
        Err((status, reason, detail)) => {
            st.violations
                .push(format!("APNs {status} {reason}: {detail}"));
            Scripted::apns(status, reason).into()
        }
        Ok(()) => scripted(&mut st, device_token.as_deref()).unwrap_or_else(|| {
            st.next_id += 1;
            Reply {
                status: 200,
                headers: vec![(
                    "apns-id".into(),
                    format!("00000000-0000-0000-0000-{:012X}", st.next_id),
                )],
                body: String::new(),
            }
        }),
    };
    st.requests.push(Recorded {
        at: Instant::now(),
        method: method.to_string(),
        path: path.to_string(),
        headers,
        json: serde_json::from_slice(body).unwrap_or(Value::Null),
        device_token,
        jwt_iat,
        status: reply.status,
        connection: conn_no,
    });
    reply
}

// ----------------------------------------------------------------------------------------------- FCM

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn fcm_token_check(
    sh: &Shared,
    method: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), String> {
    let Provider::Fcm {
        key, client_email, ..
    } = &sh.provider
    else {
        unreachable!("FCM handler on an APNs stub")
    };
    if method != "POST" {
        return Err(format!("token endpoint: method {method}"));
    }
    let ct = header(headers, "content-type").unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(format!("token endpoint: content-type {ct:?}"));
    }
    let form =
        std::str::from_utf8(body).map_err(|_| "token endpoint: body not UTF-8".to_string())?;
    let mut fields = HashMap::new();
    for pair in form.split('&') {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("token endpoint: bad form pair {pair:?}"))?;
        let k = percent_decode(k).ok_or("token endpoint: bad form encoding")?;
        let v = percent_decode(v).ok_or("token endpoint: bad form encoding")?;
        if fields.insert(k.clone(), v).is_some() {
            return Err(format!("token endpoint: duplicate form field {k}"));
        }
    }
    if fields.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return Err(format!(
            "token endpoint: grant_type {:?}",
            fields.get("grant_type")
        ));
    }
    let assertion = fields
        .get("assertion")
        .ok_or("token endpoint: no assertion")?;
    let h = jsonwebtoken::decode_header(assertion).map_err(|e| format!("assertion header: {e}"))?;
    if h.alg != Algorithm::RS256 {
        return Err(format!("assertion alg {:?}", h.alg));
    }
    let mut v = Validation::new(Algorithm::RS256);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_aud = false;
    let claims = jsonwebtoken::decode::<Value>(assertion, key, &v)
        .map_err(|e| format!("assertion signature/claims: {e}"))?
        .claims;
    if claims["iss"].as_str() != Some(client_email.as_str()) {
        return Err(format!("assertion iss {}", claims["iss"]));
    }
    let scopes = claims["scope"].as_str().unwrap_or("");
    if !scopes.split(' ').any(|s| s == FCM_SCOPE) {
        return Err(format!("assertion scope {scopes:?}"));
    }
    let aud = format!("{}/token", sh.url);
    if claims["aud"].as_str() != Some(aud.as_str()) {
        return Err(format!("assertion aud {} (want {aud})", claims["aud"]));
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err(format!(
            "assertion iat {} exp {}",
            claims["iat"], claims["exp"]
        ));
    };
    let now = unix_now();
    if iat > now + 1
        || now.saturating_sub(iat) > 3600
        || exp <= now
        || exp <= iat
        || exp - iat > 3600
    {
        return Err(format!("assertion iat {iat} exp {exp} (now {now})"));
    }
    Ok(())
}

fn fcm_token(sh: &Shared, method: &str, headers: &[(String, String)], body: &[u8]) -> Reply {
    let check = fcm_token_check(sh, method, headers, body);
    let mut st = sh.state();
    st.token_requests += 1;
    if let Err(e) = check {
        st.violations.push(format!("FCM token: {e}"));
        let body = json!({ "error": "invalid_grant", "error_description": e }).to_string();
        return Reply {
            status: 400,
            headers: Vec::new(),
            body,
        };
    }
    if let Some(s) = st.token_scripted.pop_front() {
        return s.into();
    }
    let token = format!("ya29.stub-{}", random_hex(24));
    let expires_in = st.expires_in;
    st.issued.insert(
        token.clone(),
        Instant::now() + Duration::from_secs(expires_in),
    );
    let body = json!({ "access_token": token, "expires_in": expires_in, "token_type": "Bearer" })
        .to_string();
    Reply {
        status: 200,
        headers: Vec::new(),
        body,
    }
}

fn fcm_error(status: u16, api_status: &str, message: &str) -> Reply {
    let body = json!({ "error": { "code": status, "message": message, "status": api_status } })
        .to_string();
    Reply {
        status,
        headers: Vec::new(),
        body,
    }
}

fn fcm_send_check(
    sh: &Shared,
    st: &State,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    json: &Value,
) -> Result<(), Reply> {
    let Provider::Fcm { project_id, .. } = &sh.provider else {
        unreachable!("FCM handler on an APNs stub")
    };
    let invalid = |m: String| fcm_error(400, "INVALID_ARGUMENT", &m);
    if method != "POST" {
        return Err(fcm_error(
            405,
            "METHOD_NOT_ALLOWED",
            &format!("method {method}"),
        ));
    }
    let want = format!("/v1/projects/{project_id}/messages:send");
    if path != want {
        return Err(fcm_error(
            404,
            "NOT_FOUND",
            &format!("path {path} (want {want})"),
        ));
    }
    let bearer = header(headers, "authorization").and_then(|a| a.strip_prefix("Bearer "));
    match bearer.and_then(|b| st.issued.get(b)) {
        Some(exp) if Instant::now() < *exp => {}
        Some(_) => return Err(fcm_error(401, "UNAUTHENTICATED", "access token expired")),
        None => {
            return Err(fcm_error(
                401,
                "UNAUTHENTICATED",
                "unknown or missing access token",
            ));
        }
    }
    let ct = header(headers, "content-type").unwrap_or("");
    if !ct.starts_with("application/json") {
        return Err(invalid(format!("content-type {ct:?}")));
    }
    let Some(m) = json.get("message").and_then(Value::as_object) else {
        return Err(invalid("no message object".into()));
    };
    if m.get("token")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(invalid("message.token missing".into()));
    }
    if m.contains_key("topic") || m.contains_key("condition") {
        return Err(invalid("more than one target".into()));
    }
    let data = m.get("data");
    if let Some(d) = data {
        let Some(d) = d.as_object() else {
            return Err(invalid("message.data is not an object".into()));
        };
        if let Some((k, v)) = d.iter().find(|(_, v)| !v.is_string()) {
            return Err(invalid(format!("message.data.{k} is not a string: {v}")));
        }
    }
    let android = m.get("android").and_then(Value::as_object);
    let collapse_key = android
        .and_then(|a| a.get("collapse_key"))
        .and_then(Value::as_str);
    if collapse_key.is_none_or(str::is_empty) {
        return Err(invalid("android.collapse_key missing".into()));
    }
    let priority = android
        .and_then(|a| a.get("priority"))
        .and_then(Value::as_str);
    match m.get("notification") {
        Some(n) => {
            let ok = n.get("title").is_some_and(Value::is_string)
                && n.get("body").is_some_and(Value::is_string);
            if !ok {
                return Err(invalid(format!("message.notification {n}")));
            }
            if priority != Some("high") {
                return Err(invalid(format!("alert with android.priority {priority:?}")));
            }
        }
        None => {
            let d = data.cloned().unwrap_or(Value::Null);
            if d["type"] != "read" || !d["conversation"].is_string() || !d["read_upto"].is_string()
            {
                return Err(invalid(format!("data-only message with data {d}")));
            }
            if priority != Some("normal") {
                return Err(invalid(format!(
                    "data-only message with android.priority {priority:?}"
                )));
            }
        }
    }
    Ok(())
}

fn fcm_send(
    sh: &Shared,
    conn_no: usize,
    method: &str,
    path: &str,
    headers: Vec<(String, String)>,
    body: &[u8],
) -> Reply {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let device_token = json["message"]["token"].as_str().map(str::to_string);
    let mut st = sh.state();
    let reply = match fcm_send_check(sh, &st, method, path, &headers, &json) {
        Err(r) => {
            st.violations.push(format!("FCM {}: {}", r.status, r.body));
            r
        }
        Ok(()) => scripted(&mut st, device_token.as_deref()).unwrap_or_else(|| {
            st.next_id += 1;
            let Provider::Fcm { project_id, .. } = &sh.provider else {
                unreachable!()
            };
            let body =
                json!({ "name": format!("projects/{project_id}/messages/0:{}", st.next_id) });
            Reply {
                status: 200,
                headers: Vec::new(),
                body: body.to_string(),
            }
        }),
    };
    st.requests.push(Recorded {
        at: Instant::now(),
        method: method.to_string(),
        path: path.to_string(),
        headers,
        json,
        device_token,
        jwt_iat: None,
        status: reply.status,
        connection: conn_no,
    });
    reply
}
