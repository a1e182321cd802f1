//! Clients of the daemon's API: a gRPC channel for the flows (the Hubble-compatible API), and
//! a small HTTP/1.0 client for the rest (status, conntrack), whose response body ends when the
//! daemon closes the connection.
use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{bail, Context as _, Result};

/// Where the daemon's API is.
pub enum Server {
    /// The local unix socket.
    Unix(std::path::PathBuf),
    /// The remote listener (`observer daemon --listen`), mutual TLS.
    Tls {
        addr: String,
        name: rustls::pki_types::ServerName<'static>,
        config: std::sync::Arc<rustls::ClientConfig>,
    },
}

/// A TLS stream whose peer may close without `close_notify` after the body: that is the end of
/// the body, as on the unix socket.
struct Lenient<R>(R);

impl<R: Read> Read for Lenient<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
            r => r,
        }
    }
}

fn connect(server: &Server) -> Result<Box<dyn ReadWrite>> {
    match server {
        Server::Unix(socket) => Ok(Box::new(connect_unix(socket)?)),
        Server::Tls { addr, name, config } => {
            let tcp = std::net::TcpStream::connect(addr.as_str())
                .with_context(|| format!("cannot reach the observer daemon at {addr}"))?;
            let conn = rustls::ClientConnection::new(config.clone(), name.clone())
                .context("TLS client")?;
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            // Complete the handshake here, so a refused certificate is reported as such.
            while tls.conn.is_handshaking() {
                tls.conn
                    .complete_io(&mut tls.sock)
                    .with_context(|| format!("TLS handshake with {addr}"))?;
            }
            Ok(Box::new(Lenient(tls)))
        }
    }
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

impl<R: Write> Write for Lenient<R> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn connect_unix(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "is the daemon running? (`observer daemon`, or --socket for another path)"
            }
            std::io::ErrorKind::PermissionDenied => {
                "the socket is readable by root and its group only"
            }
            _ => "",
        };
        anyhow::anyhow!(
            "cannot reach the observer daemon at {}: {e}. {hint}",
            socket.display()
        )
    })
}

pub fn get(server: &Server, path: &str) -> Result<BufReader<Box<dyn Read + Send>>> {
    let mut s = connect(server)?;
    // A plain message, not the io::Error: a broken pipe here is the daemon closing on us (a
    // refused TLS client certificate), not a closed stdout that `main` may ignore.
    if let Err(e) =
        write!(s, "GET {path} HTTP/1.0\r\nHost: observer\r\n\r\n").and_then(|_| s.flush())
    {
        match server {
            Server::Tls { addr, .. } => bail!(
                "TLS handshake with {addr} refused: {e} (is --tls-cert signed by the daemon's \
                 --tls-client-ca?)"
            ),
            Server::Unix(p) => bail!("sending the request to {}: {e}", p.display()),
        }
    }
    let s: Box<dyn Read + Send> = Box::new(ReadOnly(s));
    let mut r = BufReader::new(s);
    let mut status = String::new();
    if let Err(e) = r.read_line(&mut status) {
        if let Server::Tls { addr, .. } = server {
            // TLS 1.3 reports a refused client certificate on the first read, not in the
            // handshake.
            bail!(
                "TLS handshake with {addr} refused: {e} (is --tls-cert signed by the daemon's \
                 --tls-client-ca, and --tls-ca the CA of the daemon's certificate?)"
            );
        }
        return Err(e).context("reading response");
    }
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    if code != 200 {
        let mut body = String::new();
        let _ = r.read_to_string(&mut body);
        bail!("daemon answered {code}: {}", body.trim());
    }
    Ok(r)
}

struct ReadOnly(Box<dyn ReadWrite>);

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

pub fn get_string(server: &Server, path: &str) -> Result<String> {
    let mut r = get(server, path)?;
    let mut s = String::new();
    r.read_to_string(&mut s)?;
    Ok(s)
}

/// A gRPC channel to the daemon's API (the same socket or `--listen` address as the HTTP
/// endpoints). Connection failures say what to check, as the HTTP client does.
pub async fn channel(server: &Server) -> Result<tonic::transport::Channel> {
    use hyper_util::rt::TokioIo;
    use std::sync::{Arc, Mutex};
    let endpoint = tonic::transport::Endpoint::from_static("http://observer");
    match server {
        Server::Unix(socket) => {
            // Connected here first for the error message; the channel takes this stream.
            let first = connect_unix(socket)?;
            first.set_nonblocking(true)?;
            let first = Arc::new(Mutex::new(Some(tokio::net::UnixStream::from_std(first)?)));
            let socket = socket.clone();
            let connector = tower::service_fn(move |_| {
                let (first, socket) = (first.lock().unwrap().take(), socket.clone());
                async move {
                    let s = match first {
                        Some(s) => s,
                        None => tokio::net::UnixStream::connect(&socket).await?,
                    };
                    Ok::<_, std::io::Error>(TokioIo::new(s))
                }
            });
            Ok(endpoint.connect_with_connector(connector).await?)
        }
        Server::Tls { addr, name, config } => {
            let mut cfg = (**config).clone();
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
            let (to, name) = (addr.clone(), name.clone());
            let connector = tower::service_fn(move |_| {
                let (tls, addr, name) = (tls.clone(), to.clone(), name.clone());
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
                    let s = tls.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(s))
                }
            });
            endpoint
                .connect_with_connector(connector)
                .await
                .map_err(|e| tls_refused(addr, &e))
        }
    }
}

/// What a failed TLS connection most likely means. With TLS 1.3 a refused client
/// certificate shows only on the first read, so requests fail the same way.
pub fn tls_refused(addr: &str, e: &dyn std::error::Error) -> anyhow::Error {
    let mut cause = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        cause = format!("{cause}: {s}");
        source = s.source();
    }
    anyhow::anyhow!(
        "TLS handshake with {addr} refused or failed: {cause} (is --tls-cert signed by the \
         daemon's --tls-client-ca, and --tls-ca the CA of the daemon's certificate?)"
    )
}
