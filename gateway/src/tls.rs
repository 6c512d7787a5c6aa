//! TLS for the gateway's listener: a certificate chain and key from PEM files, reloaded when the
//! files change, HTTP/2 or HTTP/1.1 chosen by ALPN.
//!
//! [`TlsAcceptor::new`] loads the pair once (a bad pair at start is an error) and watches the two
//! files: every [`RELOAD_EVERY`] it compares their modification time, size and inode with those it
//! loaded, and on a change loads the new pair. A new pair that does not load (half-written, a key
//! that does not match its certificate) is logged and the one in use is kept; the next change is
//! tried again. Connections already open keep the certificate they were made with.
//!
//! The handshake runs in each connection's own task (see `server.rs`) with a time limit, so a
//! client that opens a connection and sends nothing holds no more than that connection.

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tracing::{info, warn};

/// How often the certificate and key files are checked for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// What the TLS listener serves.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the first certificate.
    pub key: PathBuf,
    /// A client must finish its handshake within this time.
    pub handshake_timeout: Duration,
    /// How often the files are checked for a change.
    pub reload_every: Duration,
}

/// A certificate and key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a PEM certificate chain: {why}")]
    Certificates { path: PathBuf, why: String },
    #[error("{path}: not a PEM private key (PKCS#8, PKCS#1 or SEC1): {why}")]
    Key { path: PathBuf, why: String },
    #[error("certificate {cert} and key {key} are not a usable pair: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS settings: {0}")]
    Settings(#[source] rustls::Error),
}

/// The crypto provider the workspace already uses (through `hyper-rustls` and `reqwest`), named
/// explicitly so that nothing depends on a process-wide default being installed.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads and checks a certificate chain and its key.
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read =
        |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source });
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificates { path: cert.into(), why: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::Certificates { path: cert.into(), why: "no CERTIFICATE section".into() });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::Key { path: key.into(), why: e.to_string() })?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(|source| TlsError::Pair {
        cert: cert.into(),
        key: key.into(),
        source,
    })
}

/// The pair in use, swapped whole on reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Modification time, size and inode: a file replaced by rename or rewritten in place changes one.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(p: &Path) -> Stamp {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Wraps accepted connections in TLS; cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor").field("handshake_timeout", &self.handshake_timeout).finish()
    }
}

impl TlsAcceptor {
    /// Loads the pair and starts watching its files (a task that ends once every clone of the
    /// acceptor is dropped). Must be called within a tokio runtime.
    pub fn new(settings: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
        let seen = (stamp(&settings.cert), stamp(&settings.key));
        let current = Arc::new(Current(RwLock::new(Arc::new(load(&settings.cert, &settings.key)?))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Settings)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio::spawn(watch(Arc::downgrade(&current), settings.clone(), seen));
        Ok(TlsAcceptor {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: settings.handshake_timeout,
        })
    }

    /// The server side of the handshake on `stream`, within the handshake timeout.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(stream)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {:?}", self.handshake_timeout),
            )),
        }
    }
}

/// Reloads the pair whenever either file changes, until the acceptor is gone.
async fn watch(current: Weak<Current>, settings: TlsSettings, mut seen: (Stamp, Stamp)) {
    loop {
        tokio::time::sleep(settings.reload_every).await;
        let Some(current) = current.upgrade() else { return };
        let now = (stamp(&settings.cert), stamp(&settings.key));
        if now == seen {
            continue;
        }
        seen = now;
        let (cert, key) = (settings.cert.clone(), settings.key.clone());
        match tokio::task::spawn_blocking(move || load(&cert, &key)).await {
            Ok(Ok(pair)) => {
                *current.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
                info!(cert = %settings.cert.display(), key = %settings.key.display(), "TLS certificate reloaded");
            }
            Ok(Err(e)) => {
                warn!(error = %e, "TLS certificate changed but not reloaded; keeping the one in use")
            }
            Err(e) => warn!(error = %e, "TLS certificate reload failed; keeping the one in use"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let e = load(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("reading") && e.contains("cert.pem"), "{e}");
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem either").unwrap();
        let e = load(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("cert.pem") && e.contains("no CERTIFICATE"), "{e}");
    }
}
