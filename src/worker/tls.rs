//! TLS on the event loops: rustls' unbuffered (sans-IO) server connection, driven by the loop like the plain
//! socket path.
//!
//! Why the unbuffered API: the buffered `ServerConnection` keeps a 4 KiB receive buffer for the life of the
//! connection (rustls never frees it below one read size), which alone would exceed our idle budget. Here the
//! loop owns the buffers: ciphertext is read into the loop's scratch buffer and processed there; only an
//! incomplete record is copied into `incoming`, and encrypted output waits in `outgoing` only until the socket
//! takes it. An idle TLS connection holds no buffer at all, only rustls' session state (keys, sequence
//! numbers).
//!
//! Output: the connection's plaintext queue (`Conn::out`, capped by `max_write_queue_bytes` as for plain
//! connections) is encrypted in slices of at most [`OUT_BUDGET`] bytes, and only when the previous ciphertext
//! is written, so a slow reader's backlog stays in the capped plaintext queue, not in ours.
//!
//! Before TLS: a PROXY protocol header (`--proxy-protocol`) is read here, in the clear, before the handshake.
//! A plain-text HTTP request on the TLS port gets a `400` in the clear saying so (as nginx does), other
//! non-TLS bytes a close.

use std::io::{self, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Ciphertext queued per connection before the loop waits for the socket to take it.
pub const OUT_BUDGET: usize = 64 * 1024;
/// The most a peer may make us hold of an incomplete record or handshake flight (a TLS record is at most
/// 16 KiB + 2 KiB; rustls accepts handshake messages of up to 64 KiB).
pub const MAX_INCOMING: usize = 64 * 1024 + 18 * 1024;
/// Plaintext gathered into one record (TLS' maximum record payload).
pub const RECORD: usize = 16 * 1024;
/// The TLS record type of a handshake message: the first byte a TLS client sends.
const HANDSHAKE: u8 = 0x16;
const PLAIN_HTTP_REPLY: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n\
Content-Length: 46\r\nConnection: close\r\n\r\nThis port speaks TLS: use https:// or wss://.\n";

/// The certificate, key and rustls configuration new TLS connections use; reloaded on SIGHUP. Connections
/// keep the configuration they started with.
pub struct TlsSetup {
    cert: PathBuf,
    key: PathBuf,
    /// Session tickets: one key rotator for the process, kept across reloads so that a client's ticket stays
    /// good after a certificate change.
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsSetup {
    /// Loads the PEM certificate chain and private key and builds the configuration.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<TlsSetup> {
        let ticketer = rustls::crypto::ring::Ticketer::new().context("creating the ticket keys")?;
        let config = build(cert, key, ticketer.clone())?;
        Ok(TlsSetup {
            cert: cert.to_owned(),
            key: key.to_owned(),
            ticketer,
            current: RwLock::new(config),
        })
    }

    /// Reads the certificate and key again. On error the previous ones stay in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = build(&self.cert, &self.key, self.ticketer.clone())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// The configuration for a connection accepted now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn build(
    cert: &Path,
    key: &Path,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the certificate chain {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the certificate chain {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{}: no certificate", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context(
            "the certificate does not match the private key, or the key type is not supported",
        )?;
    // HTTP/1.1 only for now (WebSocket, SSE and polls all run on it); `h2` would be added here.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumption: stateless tickets (TLS 1.3 and 1.2) so that a reconnect storm skips the signature and
    // key exchange; one ticket per handshake is enough for a client that reconnects one connection at a time.
    config.ticketer = ticketer;
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

/// What feeding ciphertext led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Processed; more may come.
    Continue,
    /// The peer sent `close_notify`: like a FIN.
    PeerClosed,
    /// The connection cannot go on (a TLS error, bytes that are not TLS, a PROXY header error). `outgoing`
    /// may hold a last word (an alert, a plain-text 400): write it, then close.
    Fatal(String),
}

/// One connection's TLS state.
pub struct TlsSession {
    conn: UnbufferedServerConnection,
    /// The connection's buffers, only while bytes wait in them: none at all when idle (8 bytes, not 56).
    bufs: Option<Box<Buffers>>,
    /// A PROXY protocol header is expected before the handshake.
    proxy_pending: bool,
    /// No byte has arrived yet (the first one tells TLS from plain text).
    fresh: bool,
    /// The handshake completed (counted once).
    established: bool,
}

#[derive(Default)]
struct Buffers {
    /// Ciphertext of an incomplete record (or bytes of an incomplete PROXY header).
    incoming: Vec<u8>,
    /// Ciphertext to write, from `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
}

/// The buffers, made when first needed.
fn bufs(b: &mut Option<Box<Buffers>>) -> &mut Buffers {
    b.get_or_insert_with(Box::default)
}

/// Frees the buffers once nothing waits in them.
fn release(b: &mut Option<Box<Buffers>>) {
    if b.as_ref()
        .is_some_and(|x| x.incoming.is_empty() && x.sent == x.outgoing.len())
    {
        *b = None;
    }
}

/// How a completed handshake went, for the metrics.
pub enum Established {
    Full,
    Resumed,
}

impl TlsSession {
    pub fn new(config: Arc<ServerConfig>, proxy: bool) -> Result<Box<TlsSession>, rustls::Error> {
        Ok(Box::new(TlsSession {
            conn: UnbufferedServerConnection::new(config)?,
            bufs: None,
            proxy_pending: proxy,
            fresh: true,
            established: false,
        }))
    }

    /// Whether the handshake is done (application data may flow).
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Feeds ciphertext just read (`data` is the loop's scratch buffer; records are decrypted in place) and
    /// hands each piece of plaintext to `plain`, which returns false to stop (the connection is closing).
    /// `on_established` is called once, when the handshake completes.
    pub fn on_ciphertext(
        &mut self,
        data: &mut [u8],
        plain: &mut dyn FnMut(&[u8]) -> bool,
        on_established: &mut dyn FnMut(Established),
    ) -> Input {
        let waiting = self.bufs.as_ref().map_or(0, |b| b.incoming.len());
        if self.proxy_pending || self.fresh || waiting > 0 {
            // Slow path: bytes before the handshake, or the rest of a record that began in an earlier read.
            if waiting + data.len() > MAX_INCOMING {
                return Input::Fatal("incomplete TLS record over the limit".into());
            }
            bufs(&mut self.bufs).incoming.extend_from_slice(data);
            if let Some(fatal) = self.preamble() {
                return fatal;
            }
            let mut buf = std::mem::take(&mut bufs(&mut self.bufs).incoming);
            let (used, input) = self.process(&mut buf, plain, on_established);
            buf.drain(..used);
            if buf.is_empty() {
                buf = Vec::new();
            }
            bufs(&mut self.bufs).incoming = buf;
            release(&mut self.bufs);
            return input;
        }
        let (used, input) = self.process(data, plain, on_established);
        if used < data.len() {
            if data.len() - used > MAX_INCOMING {
                return Input::Fatal("incomplete TLS record over the limit".into());
            }
            bufs(&mut self.bufs)
                .incoming
                .extend_from_slice(&data[used..]);
        }
        input
    }

    /// The PROXY header and the first byte, read from `incoming` before any TLS. `None`: go on with TLS
    /// (or wait for more bytes: `incoming` is then left for the next read).
    fn preamble(&mut self) -> Option<Input> {
        if self.proxy_pending {
            match corelay_proto::proxy::parse(&bufs(&mut self.bufs).incoming) {
                Ok(None) => return Some(Input::Continue),
                Ok(Some((header, n))) => {
                    if let corelay_proto::proxy::ProxyHeader::Proxied {
                        source,
                        destination,
                    } = header
                    {
                        tracing::debug!(client = %source, via = %destination, "accepted (PROXY protocol, TLS)");
                    }
                    bufs(&mut self.bufs).incoming.drain(..n);
                    self.proxy_pending = false;
                }
                Err(e) => return Some(Input::Fatal(format!("bad PROXY header: {e}"))),
            }
        }
        if self.fresh {
            let &first = self.bufs.as_ref()?.incoming.first()?;
            self.fresh = false;
            if first != HANDSHAKE {
                if first.is_ascii_uppercase() {
                    // An HTTP method: a client that forgot https://.
                    bufs(&mut self.bufs)
                        .outgoing
                        .extend_from_slice(PLAIN_HTTP_REPLY);
                    return Some(Input::Fatal("plain-text HTTP on the TLS port".into()));
                }
                return Some(Input::Fatal("not TLS".into()));
            }
        }
        None
    }

    /// Runs rustls over `buf` until it needs more bytes. Returns how many bytes of `buf` it consumed.
    fn process(
        &mut self,
        buf: &mut [u8],
        plain: &mut dyn FnMut(&[u8]) -> bool,
        on_established: &mut dyn FnMut(Established),
    ) -> (usize, Input) {
        let mut used = 0;
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut buf[used..]);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    used += discard;
                    self.last_words(buf, used);
                    return (used, Input::Fatal(format!("TLS: {e}")));
                }
            };
            match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        match record {
                            Ok(r) => {
                                discard += r.discard;
                                if !plain(r.payload) {
                                    return (used + discard, Input::Continue);
                                }
                            }
                            Err(e) => {
                                used += discard;
                                drop(records);
                                self.last_words(buf, used);
                                return (used, Input::Fatal(format!("TLS: {e}")));
                            }
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut enc) => {
                    if let Err(e) =
                        encode(&mut bufs(&mut self.bufs).outgoing, |out| enc.encode(out))
                    {
                        return (used + discard, Input::Fatal(format!("TLS encode: {e:?}")));
                    }
                }
                ConnectionState::TransmitTlsData(tx) => {
                    // Queued in `outgoing`, written (in order) by the loop's flush.
                    tx.done();
                }
                ConnectionState::WriteTraffic(_) => {
                    used += discard;
                    if !self.established {
                        self.established = true;
                        on_established(match self.conn.handshake_kind() {
                            Some(rustls::HandshakeKind::Resumed) => Established::Resumed,
                            _ => Established::Full,
                        });
                    }
                    // Everything complete is processed; the rest (if any) is a partial record.
                    return (used, Input::Continue);
                }
                ConnectionState::BlockedHandshake => {
                    return (used + discard, Input::Continue);
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return (used + discard, Input::PeerClosed);
                }
                ConnectionState::ReadEarlyData(mut early) => {
                    // 0-RTT is not enabled (`max_early_data_size` is 0); drop anything offered.
                    while let Some(r) = early.next_record() {
                        if let Ok(r) = r {
                            discard += r.discard;
                        }
                    }
                }
                _ => return (used + discard, Input::Continue),
            }
            used += discard;
        }
    }

    /// After an error, rustls may have an alert queued: encode it so that the peer learns why. `buf[used..]`
    /// is what is left of the input (rustls' deframer keeps offsets into it: it must see the same bytes).
    fn last_words(&mut self, buf: &mut [u8], mut used: usize) {
        for _ in 0..4 {
            let status = self.conn.process_tls_records(&mut buf[used..]);
            used += status.discard;
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    if encode(&mut bufs(&mut self.bufs).outgoing, |out| enc.encode(out)).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(tx)) => tx.done(),
                _ => return,
            }
        }
    }

    /// Runs `f` with rustls in its writing state, over the input left from the last read (rustls' deframer
    /// may hold offsets into it, so it must be given, never an empty buffer). Handshake-layer output due
    /// first (a key update) is queued before. `None` when writing is not possible.
    fn with_write_traffic<R>(
        &mut self,
        f: impl FnOnce(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut Vec<u8>,
        ) -> R,
    ) -> Option<R> {
        let mut incoming = self
            .bufs
            .as_mut()
            .map(|b| std::mem::take(&mut b.incoming))
            .unwrap_or_default();
        let mut used = 0;
        let mut result = None;
        for _ in 0..8 {
            let status = self.conn.process_tls_records(&mut incoming[used..]);
            used += status.discard;
            match status.state {
                Ok(ConnectionState::WriteTraffic(mut wt)) => {
                    result = Some(f(&mut wt, &mut bufs(&mut self.bufs).outgoing));
                    break;
                }
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    if encode(&mut bufs(&mut self.bufs).outgoing, |out| enc.encode(out)).is_err() {
                        break;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(tx)) => tx.done(),
                _ => break,
            }
        }
        incoming.drain(..used);
        if !incoming.is_empty() {
            bufs(&mut self.bufs).incoming = incoming;
        }
        release(&mut self.bufs);
        result
    }

    /// Ciphertext waiting for the socket.
    pub fn pending(&self) -> &[u8] {
        self.bufs
            .as_ref()
            .map_or(&[][..], |b| &b.outgoing[b.sent..])
    }

    /// Writes pending ciphertext to `w` until it would block. Returns bytes written.
    pub fn write_to<W: Write>(&mut self, w: &mut W) -> io::Result<usize> {
        let mut total = 0;
        let Some(b) = self.bufs.as_mut() else {
            return Ok(0);
        };
        while b.sent < b.outgoing.len() {
            match w.write(&b.outgoing[b.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    b.sent += n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if b.sent == b.outgoing.len() {
            // Written: an idle connection keeps no buffer.
            b.outgoing = Vec::new();
            b.sent = 0;
        }
        release(&mut self.bufs);
        Ok(total)
    }

    /// Encrypts `data` as application data into `outgoing`. Returns false when encryption is not possible
    /// (the handshake is not done, or the session is closed).
    fn encrypt(&mut self, data: &[u8]) -> bool {
        self.with_write_traffic(|wt, out| encrypt(out, data, |d, o| wt.encrypt(d, o)).is_ok())
            .unwrap_or(false)
    }

    /// Queues a `close_notify` alert (before a half-close or a graceful close).
    pub fn close_notify(&mut self) {
        if self.established {
            self.with_write_traffic(|wt, out| {
                let _ = encrypt(out, &[], |_, o| wt.queue_close_notify(o));
            });
        }
    }

    /// A writer that encrypts what the connection's plaintext queue writes into it (records of up to
    /// [`RECORD`] bytes, gathered from several queued buffers) and would block once [`OUT_BUDGET`] bytes of
    /// ciphertext are waiting. `gather` is the loop's scratch space for small buffers.
    pub fn encryptor<'a>(&'a mut self, gather: &'a mut [u8]) -> Encryptor<'a> {
        Encryptor { tls: self, gather }
    }
}

/// Grows `out` as the encoder asks and appends what it encodes.
fn encode(
    out: &mut Vec<u8>,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), EncodeError> {
    let mut room = 512;
    loop {
        let old = out.len();
        out.resize(old + room, 0);
        match f(&mut out[old..]) {
            Ok(n) => {
                out.truncate(old + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(s)) => {
                out.truncate(old);
                room = s.required_size;
            }
            Err(e) => {
                out.truncate(old);
                return Err(e);
            }
        }
    }
}

/// Grows `out` for `data` plus record overhead and appends the ciphertext.
fn encrypt(
    out: &mut Vec<u8>,
    data: &[u8],
    mut f: impl FnMut(&[u8], &mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), EncryptError> {
    // Per record: 5-byte header, 1-byte content type (TLS 1.3), 16-byte tag; TLS 1.2 adds an 8-byte nonce.
    let mut room = data.len() + 32 * (data.len() / RECORD + 1);
    loop {
        let old = out.len();
        out.resize(old + room, 0);
        match f(data, &mut out[old..]) {
            Ok(n) => {
                out.truncate(old + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(s)) => {
                out.truncate(old);
                room = s.required_size;
            }
            Err(e) => {
                out.truncate(old);
                return Err(e);
            }
        }
    }
}

/// See [`TlsSession::encryptor`].
pub struct Encryptor<'a> {
    tls: &'a mut TlsSession,
    gather: &'a mut [u8],
}

impl Write for Encryptor<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.tls.pending().len() >= OUT_BUDGET {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let Some(first) = bufs.iter().find(|b| !b.is_empty()) else {
            return Ok(0);
        };
        let n = if first.len() >= RECORD {
            // Large: encrypt straight from the queue, a budget's worth at most.
            let n = first.len().min(OUT_BUDGET);
            if !self.tls.encrypt(&first[..n]) {
                return Err(io::ErrorKind::NotConnected.into());
            }
            n
        } else {
            // Small buffers (frames of a few hundred bytes): one record for as many as fit.
            let cap = self.gather.len().min(RECORD);
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(cap - n);
                self.gather[n..n + take].copy_from_slice(&b[..take]);
                n += take;
                if n == cap {
                    break;
                }
            }
            let Self { tls, gather } = self;
            if !tls.encrypt(&gather[..n]) {
                return Err(io::ErrorKind::NotConnected.into());
            }
            n
        };
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes a TLS connection's output: pending ciphertext first, then the plaintext queue, encrypted a budget
/// at a time, until the socket would block or everything is out. Returns ciphertext bytes written.
pub fn write<W: Write>(
    tls: &mut TlsSession,
    socket: &mut W,
    out: &mut crate::conn::WriteQueue,
    gather: &mut [u8],
) -> io::Result<usize> {
    let mut total = 0;
    loop {
        total += tls.write_to(socket)?;
        if !tls.pending().is_empty() || out.is_empty() {
            return Ok(total);
        }
        if !tls.is_established() {
            // Nothing can be sent before the handshake (a deadline's answer to a client that never
            // finished it): drop it; the connection is closing.
            out.clear();
            return Ok(total);
        }
        out.write_to(&mut tls.encryptor(gather))?;
    }
}
