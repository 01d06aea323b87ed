//! The TLS client side (`wss://`, `--tls`): one rustls `ClientConfig` per process (ring provider), shared by
//! every connection of that process, so that with `--tls-resume on` the connections share one session store.
//! rustls' `ClientConnection` is sans-IO; `net.rs` drives it on the same mio loop as plain sockets.
//!
//! Session resumption for a connect storm: rustls' own `ClientSessionMemoryCache` keeps at most 8 TLS 1.3
//! tickets per server and each is used once (RFC 8446 §C.4), so of thousands of connections started at once
//! only the first 8 could resume. [`TicketPool`] keeps up to [`POOL`] tickets per server instead, and the
//! storm fills it before it starts (one ticket per connection of the process, from the tickets the server
//! sends after each full handshake): a reconnect storm, every client holding a ticket from its previous
//! session. The storm reports how many connections the server actually resumed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rustls::client::{
    ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::{ClientConfig, NamedGroup, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

/// TLS 1.3 tickets kept per server by [`TicketPool`]: a process's whole share of a storm (at most ~15,000
/// connections per process here; a ticket is a few hundred bytes).
const POOL: usize = 16384;

/// What every TLS connection of one process uses.
#[derive(Clone, Debug)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
    /// The session store shared by the process's connections (`--tls-resume on`).
    pub pool: Option<Arc<TicketPool>>,
}

impl Tls {
    /// The same client, except that its connections offer no session and put the tickets they get into
    /// [`Tls::pool`]: for filling it.
    pub fn filler(&self) -> Option<Tls> {
        let pool = self.pool.clone()?;
        let mut config = (*self.config).clone();
        config.resumption = Resumption::store(Arc::new(Filler(pool.clone())));
        Some(Tls {
            config: Arc::new(config),
            name: self.name.clone(),
            pool: Some(pool),
        })
    }
}

impl Tls {
    /// A client trusting the certificates in `ca_pem` (a PEM file: a CA, or the server's self-signed
    /// certificate; there are no default roots). `resume`: offer sessions from earlier connections.
    pub fn new(ca_pem: Option<&str>, server_name: &str, resume: bool) -> anyhow::Result<Tls> {
        let mut roots = RootCertStore::empty();
        if let Some(path) = ca_pem {
            let mut n = 0;
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("--tls-ca {path}: cannot read"))?
            {
                let cert = cert.with_context(|| format!("--tls-ca {path}: bad PEM"))?;
                roots
                    .add(cert)
                    .with_context(|| format!("--tls-ca {path}: not a usable certificate"))?;
                n += 1;
            }
            anyhow::ensure!(n > 0, "--tls-ca {path}: no certificate in the file");
        } else {
            anyhow::bail!("TLS needs --tls-ca FILE (the CA or self-signed certificate to trust)");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let pool = resume.then(|| Arc::new(TicketPool::default()));
        config.resumption = match &pool {
            Some(p) => Resumption::store(p.clone()),
            None => Resumption::disabled(),
        };
        let name = ServerName::try_from(server_name.to_string())
            .with_context(|| format!("{server_name:?} is not a valid TLS server name"))?;
        Ok(Tls {
            config: Arc::new(config),
            name,
            pool,
        })
    }

    pub fn connection(&self) -> Result<rustls::ClientConnection, rustls::Error> {
        rustls::ClientConnection::new(self.config.clone(), self.name.clone())
    }
}

/// The host part of an authority (`host:port`, `[v6]:port`, `host`): the default TLS server name.
pub fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

#[derive(Default)]
struct ServerData {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    tls13: VecDeque<Tls13ClientSessionValue>,
}

/// A client session store for storms: up to [`POOL`] TLS 1.3 tickets per server, each used once, oldest
/// first (see the module doc).
#[derive(Default)]
pub struct TicketPool {
    servers: Mutex<HashMap<ServerName<'static>, ServerData>>,
}

impl std::fmt::Debug for TicketPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketPool")
    }
}

impl TicketPool {
    /// TLS 1.3 tickets held for all servers.
    pub fn tickets(&self) -> usize {
        let m = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        m.values().map(|d| d.tls13.len()).sum()
    }

    fn with<R>(&self, name: &ServerName<'_>, f: impl FnOnce(&mut ServerData) -> R) -> R {
        let mut m = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let key = name.to_owned();
        f(m.entry(key).or_default())
    }
}

impl ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.with(&name, |d| d.kx_hint = Some(group));
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.with(name, |d| d.kx_hint)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.with(&name, |d| d.tls12 = Some(value));
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.with(name, |d| d.tls12.clone())
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.with(name, |d| d.tls12 = None);
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.with(&name, |d| {
            if d.tls13.len() >= POOL {
                d.tls13.pop_front();
            }
            d.tls13.push_back(value);
        });
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.with(name, |d| d.tls13.pop_front())
    }
}

/// Stores into a [`TicketPool`], offers nothing.
#[derive(Debug)]
struct Filler(Arc<TicketPool>);

impl ClientSessionStore for Filler {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.0.set_kx_hint(name, group);
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.0.kx_hint(name)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.0.set_tls12_session(name, value);
    }

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.0.insert_tls13_ticket(name, value);
    }

    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_authorities() {
        assert_eq!(host_of("127.0.0.1:8443"), "127.0.0.1");
        assert_eq!(host_of("localhost"), "localhost");
        assert_eq!(host_of("[::1]:443"), "::1");
        assert_eq!(host_of("example.com:443"), "example.com");
    }
}
