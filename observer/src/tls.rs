//! The remote API: the daemon's full API over TCP with mutual TLS. Only clients holding a
//! certificate signed by the configured client CA get in; there is no plaintext or
//! anonymous variant, because flows name pods, addresses and policies.
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tracing::debug;

/// Certificate files of one side.
#[derive(Clone, Debug)]
pub struct Files {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// The CA that signed the other side's certificate.
    pub ca: std::path::PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let v: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    anyhow::ensure!(!v.is_empty(), "{}: no certificate in it", path.display());
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("{}: no PEM private key in it", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore> {
    let mut r = RootCertStore::empty();
    for c in certs(path)? {
        r.add(c)
            .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
    }
    Ok(r)
}

pub fn server_config(f: &Files) -> Result<Arc<ServerConfig>> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&f.ca)?), provider())
        .build()
        .context("client CA")?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&f.cert)?, key(&f.key)?)
        .context("server certificate and key")?;
    // gRPC (the flows) needs HTTP/2; the other endpoints are plain HTTP/1.1 too.
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

pub fn client_config(f: &Files) -> Result<Arc<ClientConfig>> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&f.ca)?)
        .with_client_auth_cert(certs(&f.cert)?, key(&f.key)?)
        .context("client certificate and key")?;
    Ok(Arc::new(cfg))
}

/// A TCP listener that hands axum only connections whose TLS handshake, client certificate
/// included, succeeded.
pub struct Listener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl Listener {
    pub async fn bind(addr: SocketAddr, cfg: Arc<ServerConfig>) -> Result<Self> {
        Ok(Self {
            tcp: TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the TLS listener {addr}"))?,
            acceptor: TlsAcceptor::from(cfg),
        })
    }
}

/// A handshake that takes longer is dropped: a stalled client cannot hold the listener.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

impl axum::serve::Listener for Listener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (s, peer) = match self.tcp.accept().await {
                Ok(x) => x,
                Err(e) => {
                    debug!("TLS listener accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(s)).await {
                Ok(Ok(tls)) => return (tls, peer),
                Ok(Err(e)) => debug!(%peer, "TLS handshake refused: {e}"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// The server name to check the daemon's certificate against: the host of `host:port`.
pub fn server_name(addr: &str, name: Option<&str>) -> Result<ServerName<'static>> {
    let host = match name {
        Some(n) => n.to_string(),
        None => addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .with_context(|| format!("--server {addr:?}: expected HOST:PORT"))?,
    };
    ServerName::try_from(host.clone()).with_context(|| format!("{host:?} is not a server name"))
}
