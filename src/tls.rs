//! TLS on the public listener (`server.tls`): rustls through Pingora's acceptor, with
//! the certificate and key read from PEM files — in Kubernetes a mounted Secret.
//!
//! The pair is read at start (a pair that does not load stops `kvgate serve`) and again
//! whenever either file changes, or on SIGHUP. A new pair that loads and whose key matches
//! its certificate is used for every handshake from then on; one that does not is logged and
//! counted (`kvgate_tls_certificate_reloads_total{result="failed"}`), and the old pair stays.
//! The certificate is picked per handshake ([`CertStore`] is the rustls resolver), so
//! connections already open keep the session they negotiated: nothing is dropped.
//!
//! The handshake itself runs in [`LimitedListener`](crate::proxy::LimitedListener), after
//! the connection has taken its slot and under its header deadline: the connection limit
//! and the slowloris deadline cover handshakes too. ALPN offers HTTP/1.1 only, the one
//! protocol the listener limits follow.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{version, ClientHello, CryptoProvider, ResolvesServerCert, ServerConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use xxhash_rust::xxh3::Xxh3;

use crate::config::TlsFiles;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls: cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("server.tls: {path} holds no PEM {what}")]
    Missing { what: &'static str, path: String },
    #[error("server.tls: no rustls crypto provider is installed")]
    NoCryptoProvider,
    #[error("server.tls: certificate {cert} and key {key} do not make a usable pair: {source}")]
    Pair {
        cert: String,
        key: String,
        source: pingora::tls::RusTlsError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the TLS handshake did not complete in time")]
    TimedOut,
    #[error("TLS handshake failed: {0}")]
    Failed(Box<pingora::Error>),
    #[error("the accepted connection is not a TCP stream")]
    NotTcp,
}

/// The TLS side of the public listener: the acceptor and the certificate it serves.
pub struct ListenerTls {
    acceptor: Acceptor,
    certs: Arc<CertStore>,
}

impl ListenerTls {
    /// Loads the pair named in the config; fails when it does not load.
    pub fn new(files: &TlsFiles) -> Result<Self, TlsError> {
        pingora::tls::install_default_crypto_provider();
        let provider = CryptoProvider::get_default()
            .cloned()
            .ok_or(TlsError::NoCryptoProvider)?;
        let certs = Arc::new(CertStore::load(files.clone(), provider)?);
        let mut config =
            ServerConfig::builder_with_protocol_versions(&[&version::TLS12, &version::TLS13])
                .with_no_client_auth()
                .with_cert_resolver(Arc::clone(&certs) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: Acceptor::from_server_config(Arc::new(config)),
            certs,
        })
    }

    /// The service that reloads the pair when its files change.
    pub fn reloader(&self, metrics: Arc<Metrics>) -> CertReloader {
        CertReloader {
            certs: Arc::clone(&self.certs),
            metrics,
        }
    }

    /// Runs the server side of the handshake on an accepted connection, for at most `within`.
    pub async fn handshake(
        &self,
        stream: Stream,
        within: Duration,
    ) -> Result<Stream, HandshakeError> {
        // Pingora's plain TCP listener hands over its own stream type, boxed.
        let tcp = stream
            .into_any()
            .downcast::<TcpStream>()
            .map_err(|_| HandshakeError::NotTcp)?;
        match tokio::time::timeout(within, self.acceptor.tls_handshake(*tcp)).await {
            Ok(Ok(tls)) => Ok(Box::new(tls)),
            Ok(Err(e)) => Err(HandshakeError::Failed(e)),
            Err(_) => Err(HandshakeError::TimedOut),
        }
    }
}

/// The certificate and key in use, swapped whole when the files change.
pub struct CertStore {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// Hash of both files' bytes when last loaded, to tell real changes from noise.
    loaded: Mutex<u64>,
}

impl CertStore {
    fn load(files: TlsFiles, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let (fingerprint, key) = read_pair(&files, &provider)?;
        Ok(Self {
            files,
            provider,
            current: ArcSwap::from_pointee(key),
            loaded: Mutex::new(fingerprint),
        })
    }

    /// Re-reads the files; `None` when their bytes are the ones in use.
    fn reload(&self) -> Option<Result<(), TlsError>> {
        let fingerprint = fingerprint(&self.files).ok()?;
        if *self.loaded.lock() == fingerprint {
            return None;
        }
        Some(
            read_pair(&self.files, &self.provider).map(|(fingerprint, key)| {
                self.current.store(Arc::new(key));
                *self.loaded.lock() = fingerprint;
            }),
        )
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: display(path),
        source,
    })
}

fn fingerprint(files: &TlsFiles) -> Result<u64, TlsError> {
    let mut hash = Xxh3::new();
    hash.update(&read("certificate", &files.cert_file)?);
    hash.update(&read("key", &files.key_file)?);
    Ok(hash.digest())
}

/// Reads and checks the pair: the chain and the key parse, and the key is the first
/// certificate's.
fn read_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<(u64, CertifiedKey), TlsError> {
    let fingerprint = fingerprint(files)?;
    let (cert, key) = (display(&files.cert_file), display(&files.key_file));
    let (chain, private) = match pingora::tls::load_certs_and_key_files(&cert, &key) {
        Ok(Some(pair)) => pair,
        Ok(None) | Err(_) => {
            // Both files were just read, so what is missing is a PEM item in one of them.
            let has_cert = pingora::tls::load_pem_file_ca(&cert).is_ok_and(|c| !c.is_empty());
            return Err(if has_cert {
                TlsError::Missing {
                    what: "private key",
                    path: key,
                }
            } else {
                TlsError::Missing {
                    what: "certificate",
                    path: cert,
                }
            });
        }
    };
    let certified = CertifiedKey::from_der(chain, private, provider)
        .map_err(|source| TlsError::Pair { cert, key, source })?;
    Ok((fingerprint, certified))
}

/// Reloads the certificate and key when their files change or on SIGHUP.
pub struct CertReloader {
    certs: Arc<CertStore>,
    metrics: Arc<Metrics>,
}

impl CertReloader {
    fn reload(&self) {
        match self.certs.reload() {
            None => {}
            Some(Ok(())) => {
                self.metrics.tls_certificate_reload(true);
                tracing::info!(cert = %self.certs.files.cert_file.display(), "TLS certificate reloaded; new handshakes use it");
            }
            Some(Err(error)) => {
                self.metrics.tls_certificate_reload(false);
                tracing::error!(%error, "TLS certificate reload refused; the previous certificate stays in use");
            }
        }
    }
}

#[async_trait]
impl BackgroundService for CertReloader {
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let (tx, mut changes) = mpsc::channel(1);
        let files = &self.certs.files;
        // One watch per file (each ignores the other's name), kept alive with the loop.
        let mut watchers = Vec::new();
        for path in [&files.cert_file, &files.key_file] {
            match crate::reload::watch_dir(path, tx.clone()) {
                Ok(watcher) => watchers.push(watcher),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot watch the TLS files; reload on SIGHUP only")
                }
            }
        }
        drop(tx);
        let mut hangups = signal(SignalKind::hangup()).ok();
        ready.notify_ready();
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
                Some(()) = async { hangups.as_mut()?.recv().await } => self.reload(),
                Some(()) = changes.recv() => {
                    crate::reload::settle(&mut changes).await;
                    self.reload();
                }
            }
        }
    }
}
