//! The cluster's certificates (openssl), service account key, component tokens and
//! kubeconfigs. Components authenticate with static tokens mapped to the users and groups the
//! API server's bootstrap RBAC already binds (system:kube-controller-manager, system:node:NAME
//! for the Node authorizer, system:kube-proxy, ...), so RBAC stays on and observer's ClusterRole
//! is what it gets, no more.
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use super::layout::Layout;
use observer_tests::cluster::KUBERNETES_SVC_IP;

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("openssl (package openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A key and a certificate signed by the cluster CA.
fn signed(dir: &Path, name: &str, subject: &str, sans: Option<&str>) -> Result<()> {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    let mut req = vec![
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", &key,
    ];
    req.extend(["-subj", subject, "-out", &csr]);
    let ext;
    if let Some(s) = sans {
        ext = format!("subjectAltName={s}");
        req.extend(["-addext", &ext]);
    }
    openssl(dir, &req)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "365",
            "-copy_extensions",
            "copy",
            "-out",
            &crt,
        ],
    )
}

/// 128 random bits as hex: a bearer token, a machine-id.
pub fn random_hex() -> String {
    let mut b = [0u8; 16];
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Component name -> (user, groups) in the token file; a kubeconfig per component.
fn identities(layout: &Layout) -> Vec<(String, String, String)> {
    let mut v = vec![
        ("admin".into(), "admin".into(), "system:masters".into()),
        (
            "controller-manager".into(),
            "system:kube-controller-manager".into(),
            String::new(),
        ),
        (
            "scheduler".into(),
            "system:kube-scheduler".into(),
            String::new(),
        ),
        (
            "kube-proxy".into(),
            "system:kube-proxy".into(),
            String::new(),
        ),
    ];
    for n in layout.nodes() {
        v.push((
            format!("kubelet-{}", n.name),
            format!("system:node:{}", n.name),
            "system:nodes".into(),
        ));
    }
    v
}

pub fn create(layout: &Layout) -> Result<()> {
    let dir = layout.pki_dir();
    std::fs::create_dir_all(&dir)?;
    openssl(&dir, &["genrsa", "-out", "ca.key", "2048"])?;
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=observer-test-cluster-ca",
            "-days",
            "365",
            "-out",
            "ca.crt",
        ],
    )?;
    let cp = layout.control_plane();
    let sans = format!(
        "IP:{},IP:{KUBERNETES_SVC_IP},IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,\
         DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local",
        cp.ip
    );
    signed(&dir, "apiserver", "/CN=kube-apiserver", Some(&sans))?;
    // The API server's client certificate towards kubelets (exec, logs).
    signed(
        &dir,
        "apiserver-kubelet-client",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        None,
    )?;
    openssl(&dir, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    let mut tokens = String::new();
    for (component, user, groups) in identities(layout) {
        let t = random_hex();
        tokens += &format!("{t},{user},{user},\"{groups}\"\n");
        std::fs::write(
            dir.join(format!("{component}.kubeconfig")),
            kubeconfig(layout, &t),
        )?;
    }
    std::fs::write(dir.join("tokens.csv"), tokens)?;
    Ok(())
}

fn kubeconfig(layout: &Layout, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: observer-test\n  cluster:\n    \
         server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\n\
         contexts:\n- name: observer-test\n  context:\n    cluster: observer-test\n    user: u\n\
         current-context: observer-test\n",
        layout.api_server(),
        layout.pki_dir().join("ca.crt").display()
    )
}
