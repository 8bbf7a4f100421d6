//! TLS for the API, with rustls (ring): the server side from `[tandem] tls_cert` and `tls_key`,
//! the client side (a node asking the others, the CLI) from `tls_ca`. Certificates are checked
//! against the API's IP address, so each node's certificate names its `api` address as a
//! subjectAltName of type IP (RFC 6125 §6.2 for how names are matched; rustls follows it).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::limit::{Guarded, Limits, Slots};

/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes finished but not yet taken by the server; more wait in their tasks.
const READY_QUEUE: usize = 64;

/// The API's TLS: what it serves with and, when a CA is given, how it verifies other nodes.
#[derive(Clone, Debug)]
pub struct ApiTls {
    pub server: Arc<ServerConfig>,
    /// From `tls_ca`; `None` in a single process without one.
    pub client: Option<Arc<ClientConfig>>,
}

impl ApiTls {
    /// Reads `[tandem] tls_cert`, `tls_key` and `tls_ca`.
    ///
    /// # Errors
    /// A file that cannot be read or holds no usable PEM item, or a key that does not fit the
    /// certificate, named with its path.
    pub fn load(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<ApiTls, String> {
        Ok(ApiTls {
            server: server_config(cert, key)?,
            client: ca.map(client_config).transpose()?,
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration from a PEM certificate chain (leaf first) and its private key.
///
/// # Errors
/// As [`ApiTls::load`].
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{} and its key: {e}", cert.display()))?;
    Ok(Arc::new(config))
}

/// A client configuration that trusts only the CA certificates in `ca` (PEM).
///
/// # Errors
/// As [`ApiTls::load`].
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for c in certificates(ca)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca.display()))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Connects to `addr` and verifies its certificate names `addr`'s IP address.
///
/// # Errors
/// The connection or the handshake failed (an untrusted or misnamed certificate included).
pub async fn connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> io::Result<client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    TlsConnector::from(config.clone()).connect(name, tcp).await
}

/// A TLS connection within the API's limits.
pub type TlsConnection = server::TlsStream<Guarded<TcpStream>>;

/// A listener for `axum::serve` whose connections are TLS. Each handshake runs in its own task
/// (bounded by [`HANDSHAKE_TIMEOUT`]), so a slow or silent client never holds up the others;
/// every connection, handshakes included, holds one of the [`Limits`]' slots.
pub struct TlsListener {
    tcp: Slots,
    acceptor: TlsAcceptor,
    ready_tx: mpsc::Sender<(TlsConnection, SocketAddr)>,
    ready: mpsc::Receiver<(TlsConnection, SocketAddr)>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local_addr", &self.tcp.local_addr().ok())
            .finish()
    }
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>, limits: Limits) -> TlsListener {
        let (ready_tx, ready) = mpsc::channel(READY_QUEUE);
        TlsListener {
            tcp: Slots::new(tcp, limits),
            acceptor: TlsAcceptor::from(config),
            ready_tx,
            ready,
        }
    }

    fn handshake(&self, stream: Guarded<TcpStream>, peer: SocketAddr) {
        let (acceptor, ready) = (self.acceptor.clone(), self.ready_tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "API TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                Some(done) = self.ready.recv() => return done,
                (stream, peer) = self.tcp.accept() => self.handshake(stream, peer),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
