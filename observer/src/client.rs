//! A small HTTP/1.0 client for the daemon's unix socket: the response body ends when the
//! daemon closes the connection, which also suits follow mode.
use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{bail, Context as _, Result};

pub fn get(socket: &Path, path: &str) -> Result<BufReader<UnixStream>> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
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
    })?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: observer\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).context("reading response")?;
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

pub fn get_string(socket: &Path, path: &str) -> Result<String> {
    let mut r = get(socket, path)?;
    let mut s = String::new();
    r.read_to_string(&mut s)?;
    Ok(s)
}
