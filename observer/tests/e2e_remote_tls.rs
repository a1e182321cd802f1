//! The remote API: `observer daemon --listen` with mutual TLS, and `observer flows --server`.
//! A client with a certificate from the configured CA reads flows and status; a certificate
//! from another CA, or none, is refused; --listen without a client CA does not start.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use observer_tests::{in_netns, pki::Ca, tcp_connects, TestBed};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");
const LISTEN: &str = "127.0.0.1:9443";

fn cli(node_ns: &str, dir: &Path, client: &str, args: &[&str]) -> (bool, String, String) {
    let p = |f: &str| dir.join(f).display().to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", node_ns, OBSERVER])
        .args(args)
        .args(["--server", LISTEN, "--tls-ca", &p("ca.pem")])
        .args(["--tls-cert", &p(&format!("{client}.pem"))])
        .args(["--tls-key", &p(&format!("{client}.key"))])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn remote_api_needs_a_client_certificate_from_the_configured_ca() {
    let mut bed = TestBed::overlay("tls").unwrap();
    bed.add_app_pods("x", &[("a", "client"), ("b", "server")])
        .unwrap();
    let dir = bed.dir.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let ca1 = Ca::new("observer test CA");
    std::fs::write(dir.join("ca.pem"), ca1.pem()).unwrap();
    ca1.write_leaf(&dir, "daemon", &["127.0.0.1"], false);
    ca1.write_leaf(&dir, "alice", &[], true);
    let rogue = Ca::new("some other CA");
    rogue.write_leaf(&dir, "mallory", &[], true);
    let p = |f: &str| dir.join(f).display().to_string();

    // No client CA: the listener would accept anyone, so the daemon refuses to start.
    let out = Command::new(OBSERVER)
        .args(["daemon", "--source", "none", "--listen", LISTEN])
        .args([
            "--tls-cert",
            &p("daemon.pem"),
            "--tls-key",
            &p("daemon.key"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tls-client-ca"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (cert, key, client_ca) = (p("daemon.pem"), p("daemon.key"), p("ca.pem"));
    let d = bed
        .start_daemon(
            OBSERVER.as_ref(),
            &[
                "--listen",
                LISTEN,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &client_ca,
                "--report-interval",
                "0",
            ],
        )
        .unwrap();
    let (a, b) = (bed.pod("a").clone(), bed.pod("b").clone());
    let l = in_netns(&b.netns, || TcpListener::bind(("0.0.0.0", 8080)).unwrap()).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s)
        }
    });
    assert!(tcp_connects(
        &a.netns,
        SocketAddr::new(b.ip4, 8080),
        Duration::from_secs(2)
    ));
    std::thread::sleep(Duration::from_millis(300));

    let (ok, out, err) = cli(
        &bed.node_ns,
        &dir,
        "alice",
        &["flows", "--last", "20", "-o", "json", "--from-pod", "x/a"],
    );
    assert!(ok, "{err}");
    let recs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        recs.iter()
            .any(|r| r["destination"]["pod"] == "b" && r["destination"]["port"] == 8080),
        "{out}"
    );
    // The same records as on the local socket.
    let local = Command::new(OBSERVER)
        .args([
            "flows",
            "--last",
            "20",
            "-o",
            "json",
            "--from-pod",
            "x/a",
            "--socket",
        ])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&local.stdout), out);
    let (ok, out, err) = cli(&bed.node_ns, &dir, "alice", &["status", "-o", "json"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"node\":\"node-1\""), "{out}");

    // A certificate from another CA is refused in the handshake.
    let (ok, out, err) = cli(&bed.node_ns, &dir, "mallory", &["flows", "--last", "5"]);
    assert!(!ok, "stdout {out:?} stderr {err:?}");
    assert!(err.contains("TLS handshake"), "{err}");

    // No client certificate at all: the handshake fails, nothing is served.
    let ca_pem = std::fs::read(dir.join("ca.pem")).unwrap();
    let refused = in_netns(&bed.node_ns, move || {
        use rustls::pki_types::pem::PemObject;
        use std::io::{Read, Write};
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            "127.0.0.1".try_into().unwrap(),
        )
        .unwrap();
        let mut s = rustls::StreamOwned::new(conn, TcpStream::connect(LISTEN).unwrap());
        s.sock
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let _ = s.write_all(b"GET /v1/status HTTP/1.0\r\nHost: observer\r\n\r\n");
        let mut body = Vec::new();
        let r = s.read_to_end(&mut body);
        r.is_err() || !String::from_utf8_lossy(&body).contains("node-1")
    })
    .unwrap();
    assert!(refused, "served without a client certificate");
}
