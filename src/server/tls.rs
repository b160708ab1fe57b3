//! Built-in TLS termination (rustls, ring provider) for deployments without a load balancer in
//! front: a listener that hands the web server finished TLS connections, and a certificate
//! that can be replaced while the gateway runs (SIGHUP).
//!
//! Handshakes run in their own tasks with a time limit, so a client that never finishes one
//! does not hold up anybody else's connection.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::cap::{ConnectionCap, Counted};

/// Longest a client may take to complete a TLS handshake (shorter when `server.header_timeout`
/// is).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished handshakes waiting for the web server to take them.
const READY_QUEUE: usize = 256;

/// Why a certificate/key pair was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("cannot read TLS private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("TLS certificate {cert} and key {key} do not form a usable pair: {message}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("TLS certificate {path} is not valid now: {message}")]
    Dates { path: PathBuf, message: String },
    #[error(
        "TLS certificate {path} is not for {host}, the host of server.public_url (it names: {names})"
    )]
    Name {
        path: PathBuf,
        host: String,
        names: String,
    },
}

/// A certificate that runs out within this long is warned about (seconds).
const EXPIRY_WARNING: i64 = 14 * 24 * 3600;

/// What a pair's leaf certificate says of itself: when it is valid and for which names.
#[derive(Debug, Clone)]
struct Leaf {
    not_before: i64,
    not_after: i64,
    /// Its DNS names (lower case) and IP addresses (subject alternative names; the subject's
    /// common name counts for no client).
    dns: Vec<String>,
    ips: Vec<std::net::IpAddr>,
    /// When the chain's other certificates (intermediates) run out or start, with their subjects.
    chain: Vec<(String, i64, i64)>,
}

impl Leaf {
    fn read(path: &Path, der: &[u8]) -> Result<Self, TlsError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Cert {
            path: path.to_path_buf(),
            message: format!("the first certificate cannot be read: {e}"),
        })?;
        let (mut dns, mut ips) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns.push(d.to_ascii_lowercase()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                            ips.push(std::net::IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                            ips.push(std::net::IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(Self {
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            dns,
            ips,
            chain: Vec::new(),
        })
    }

    /// Notes the validity of the chain's other certificates (an unreadable one is left to the
    /// TLS library and the clients).
    fn with_chain(mut self, rest: &[CertificateDer<'_>]) -> Self {
        for der in rest {
            if let Ok((_, c)) = x509_parser::parse_x509_certificate(der) {
                self.chain.push((
                    c.subject().to_string(),
                    c.validity().not_before.timestamp(),
                    c.validity().not_after.timestamp(),
                ));
            }
        }
        self
    }

    /// Warnings for `now`: the certificate runs out within 14 days; a certificate of its chain
    /// has run out or is not valid yet (clients that cannot build another path refuse the
    /// chain; an expired cross-signature some chains carry on purpose is harmless to the others,
    /// so it is said, not refused).
    fn warnings(&self, path: &Path, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        if self.not_after.saturating_sub(now) < EXPIRY_WARNING {
            out.push(format!(
                "TLS certificate {} expires at {}: renew it",
                path.display(),
                crate::clock::rfc3339(self.not_after)
            ));
        }
        for (subject, not_before, not_after) in &self.chain {
            if now > *not_after {
                out.push(format!(
                    "TLS certificate {}: the chain's certificate \"{subject}\" expired at {}",
                    path.display(),
                    crate::clock::rfc3339(*not_after)
                ));
            } else if now < *not_before {
                out.push(format!(
                    "TLS certificate {}: the chain's certificate \"{subject}\" is valid only from {}",
                    path.display(),
                    crate::clock::rfc3339(*not_before)
                ));
            }
        }
        out
    }

    /// Refuses a certificate that has run out or is not valid yet at `now`.
    fn check_dates(&self, path: &Path, now: i64) -> Result<(), TlsError> {
        let message = if now > self.not_after {
            format!("it expired at {}", crate::clock::rfc3339(self.not_after))
        } else if now < self.not_before {
            format!(
                "it is valid only from {}",
                crate::clock::rfc3339(self.not_before)
            )
        } else {
            return Ok(());
        };
        Err(TlsError::Dates {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Whether a client asking for `host` accepts this certificate's names (a wildcard stands
    /// for one whole left-most label).
    fn covers(&self, host: &url::Host<&str>) -> bool {
        match host {
            url::Host::Domain(d) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                self.dns.iter().any(|n| match n.strip_prefix("*.") {
                    Some(parent) => d
                        .split_once('.')
                        .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                    None => *n == d,
                })
            }
            url::Host::Ipv4(ip) => self.ips.contains(&std::net::IpAddr::V4(*ip)),
            url::Host::Ipv6(ip) => self.ips.contains(&std::net::IpAddr::V6(*ip)),
        }
    }

    /// The name check against `public`'s host: the error a pair for another host is.
    fn check_name(&self, path: &Path, public: &url::Url) -> Result<(), TlsError> {
        let Some(host) = public.host() else {
            return Ok(());
        };
        if self.covers(&host) {
            return Ok(());
        }
        let mut names: Vec<String> = self.dns.clone();
        names.extend(self.ips.iter().map(ToString::to_string));
        Err(TlsError::Name {
            path: path.to_path_buf(),
            host: host.to_string(),
            names: if names.is_empty() {
                "no DNS name or address".into()
            } else {
                names.join(", ")
            },
        })
    }
}

impl From<TlsError> for io::Error {
    fn from(e: TlsError) -> Self {
        io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
    }
}

/// The certificate in use and where it is read from.
#[derive(Clone)]
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    /// The public URL whose host the certificate must name.
    public: url::Url,
    current: Arc<RwLock<(TlsAcceptor, Leaf)>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the pair at `cert` / `key` for a gateway at `public`; fails when either is missing
    /// or malformed, when they do not belong together, or when the certificate has run out or
    /// is not valid yet at `now` (Unix seconds). Also returns what is worth a warning: a
    /// certificate for other names than `public`'s host, or one that runs out within 14 days.
    pub fn load(
        cert: &Path,
        key: &Path,
        public: &url::Url,
        now: i64,
    ) -> Result<(Self, Vec<String>), TlsError> {
        let (acceptor, leaf) = acceptor(cert, key)?;
        leaf.check_dates(cert, now)?;
        let mut warnings = Vec::new();
        if let Err(e) = leaf.check_name(cert, public) {
            warnings.push(format!("{e}: browsers will refuse it"));
        }
        warnings.extend(leaf.warnings(cert, now));
        let tls = Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            public: public.clone(),
            current: Arc::new(RwLock::new((acceptor, leaf))),
        };
        Ok((tls, warnings))
    }

    /// The certificate in use at `now`, for a check while the gateway runs, between reloads:
    /// an error once it has run out (or is not valid yet), else what is worth a warning (it runs
    /// out within 14 days, a certificate of its chain has run out).
    pub fn check(&self, now: i64) -> Result<Vec<String>, TlsError> {
        let Ok(current) = self.current.read() else {
            return Ok(Vec::new());
        };
        let leaf = &current.1;
        leaf.check_dates(&self.cert, now)?;
        Ok(leaf.warnings(&self.cert, now))
    }

    /// Reads the pair again from the same paths. New connections use it; connections already
    /// open keep theirs. A pair that does not load, has run out or is not valid yet at `now`, or
    /// no longer names the public URL's host where the current one does, is refused and the
    /// current one stays in use. Returns what is worth a warning (see [`Tls::load`]).
    pub fn reload(&self, now: i64) -> Result<Vec<String>, TlsError> {
        let (fresh, leaf) = acceptor(&self.cert, &self.key)?;
        leaf.check_dates(&self.cert, now)?;
        let mut warnings = Vec::new();
        if let Err(e) = leaf.check_name(&self.cert, &self.public) {
            // A renewal that loses the host is refused; a deployment that ran with another name
            // all along (warned about at start) renews as before.
            let covered = self
                .current
                .read()
                .is_ok_and(|c| c.1.check_name(&self.cert, &self.public).is_ok());
            if covered {
                return Err(e);
            }
            warnings.push(format!("{e}: browsers will refuse it"));
        }
        warnings.extend(leaf.warnings(&self.cert, now));
        if let Ok(mut current) = self.current.write() {
            *current = (fresh, leaf);
        }
        Ok(warnings)
    }

    fn acceptor(&self) -> Option<TlsAcceptor> {
        self.current.read().ok().map(|a| a.0.clone())
    }

    /// Wraps `tcp`: the returned listener yields connections whose handshake has completed.
    /// With `cap`, a connection whose client address holds the most connections it allows is
    /// closed as soon as it is accepted, before its handshake.
    pub fn listener(
        &self,
        tcp: TcpListener,
        header_timeout: Duration,
        cap: Option<Arc<ConnectionCap>>,
    ) -> io::Result<TlsListener> {
        let handshake_timeout = HANDSHAKE_TIMEOUT.min(header_timeout);
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        let tls = self.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        super::conn::accept_failed(&e).await;
                        continue;
                    }
                };
                let admitted = match &cap {
                    None => None,
                    Some(cap) => match cap.admit(peer.ip()) {
                        Some(admitted) => admitted,
                        None => continue,
                    },
                };
                let Some(acceptor) = tls.acceptor() else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY");
                    }
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((Counted::new(s, admitted), peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready: rx,
            local,
            accepting,
        })
    }
}

/// Builds an acceptor from the pair on disk, with what its leaf certificate says.
fn acceptor(cert: &Path, key: &Path) -> Result<(TlsAcceptor, Leaf), TlsError> {
    let cert_err = |message: String| TlsError::Cert {
        path: cert.to_path_buf(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    let Some(first) = chain.first() else {
        return Err(cert_err("no PEM certificate in the file".into()));
    };
    let leaf = Leaf::read(cert, first)?.with_chain(&chain[1..]);
    // The error names the file and the problem, never key material.
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        message: e.to_string(),
    })?;
    let pair_err = |message: String| TlsError::Pair {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        message,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pair_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| pair_err(e.to_string()))?;
    // The web server speaks HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), leaf))
}

/// Connections that completed their TLS handshake, for `axum::serve`.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(Counted<TlsStream<TcpStream>>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // Stops accepting (and closes the socket) when the server lets go of the listener.
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Counted<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task is gone (only when the listener is being dropped).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::Leaf;

    fn leaf(dns: &[&str], ips: &[&str]) -> Leaf {
        Leaf {
            not_before: 0,
            not_after: 100,
            dns: dns.iter().map(|d| d.to_string()).collect(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            chain: Vec::new(),
        }
    }

    fn covers(l: &Leaf, url: &str) -> bool {
        let url = url::Url::parse(url).unwrap();
        l.covers(&url.host().unwrap())
    }

    /// Names as clients match them: exact (any case, a trailing dot), a wildcard for one
    /// left-most label only, addresses only by an address entry.
    #[test]
    fn names_are_matched_as_clients_match_them() {
        let l = leaf(
            &["console.example.com", "*.esp.example"],
            &["10.0.0.1", "::1"],
        );
        assert!(covers(&l, "https://CONSOLE.example.com/"));
        assert!(covers(&l, "https://console.example.com./"));
        assert!(covers(&l, "https://eu.esp.example/"));
        assert!(!covers(&l, "https://esp.example/"));
        assert!(!covers(&l, "https://a.eu.esp.example/"));
        assert!(!covers(&l, "https://example.com/"));
        assert!(covers(&l, "https://10.0.0.1/"));
        assert!(covers(&l, "https://[::1]/"));
        assert!(!covers(&l, "https://10.0.0.2/"));
    }

    /// Warned about: a certificate running out within 14 days, a chain certificate that has run
    /// out or is not valid yet; not a certificate with months to go and a sound chain.
    #[test]
    fn an_ending_certificate_or_an_expired_intermediate_is_warned_about() {
        let p = std::path::Path::new("c.pem");
        let day = 86_400;
        let mut l = leaf(&[], &[]);
        l.not_after = 100 * day;
        l.chain = vec![("CN=int".into(), 0, 200 * day)];
        assert!(l.warnings(p, day).is_empty());
        assert_eq!(l.warnings(p, 90 * day).len(), 1, "ten days left");
        l.chain.push(("CN=old".into(), 0, day));
        let w = l.warnings(p, 2 * day);
        assert!(
            w.len() == 1 && w[0].contains("\"CN=old\" expired at"),
            "{w:?}"
        );
        l.chain = vec![("CN=new".into(), 5 * day, 200 * day)];
        assert!(l.warnings(p, 2 * day)[0].contains("valid only from"));
    }

    #[test]
    fn dates_outside_the_validity_are_refused() {
        let l = leaf(&[], &[]);
        let p = std::path::Path::new("c.pem");
        assert!(l.check_dates(p, 50).is_ok());
        assert!(l
            .check_dates(p, 101)
            .unwrap_err()
            .to_string()
            .contains("expired"));
        assert!(l
            .check_dates(p, -1)
            .unwrap_err()
            .to_string()
            .contains("valid only from"));
    }
}
