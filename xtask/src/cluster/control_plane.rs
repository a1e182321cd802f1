//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler on node 1.
use std::time::Duration;

use anyhow::Result;

use super::layout::Layout;
use super::proc::spawn;
use observer_tests::cluster::{CLUSTER_CIDR, SERVICE_CIDR};

pub fn start(layout: &Layout) -> Result<()> {
    let cp = layout.control_plane();
    let pki = layout.pki_dir();
    let p = |f: &str| pki.join(f).display().to_string();
    let bin = |b: &str| layout.bin_dir.join(b).display().to_string();
    let etcd_dir = layout.node_dir(cp).join("etcd");
    spawn(
        layout,
        Some(cp),
        "etcd",
        &[
            "etcd".into(),
            format!("--data-dir={}", etcd_dir.display()),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=default=http://127.0.0.1:2380".into(),
            // Test data: no fsync per write.
            "--unsafe-no-fsync".into(),
        ],
    )?;
    spawn(
        layout,
        Some(cp),
        "kube-apiserver",
        &[
            bin("kube-apiserver"),
            "--etcd-servers=http://127.0.0.1:2379".into(),
            format!("--advertise-address={}", cp.ip),
            "--secure-port=6443".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=Node,RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!(
                "--kubelet-client-certificate={}",
                p("apiserver-kubelet-client.crt")
            ),
            format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ],
    )?;
    super::wait_for("the API server", Duration::from_secs(60), || {
        Ok(layout.kubectl_out(&["get", "--raw", "/readyz"])?.trim() == "ok")
    })?;
    spawn(
        layout,
        Some(cp),
        "kube-controller-manager",
        &[
            bin("kube-controller-manager"),
            format!("--kubeconfig={}", p("controller-manager.kubeconfig")),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--use-service-account-credentials=true".into(),
            format!("--cluster-cidr={CLUSTER_CIDR}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            // Pod ranges are fixed per node (the VNet routes point at them): set on the Node
            // objects before kubelets register, not allocated.
            "--allocate-node-cidrs=false".into(),
            "--configure-cloud-routes=false".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
        ],
    )?;
    spawn(
        layout,
        Some(cp),
        "kube-scheduler",
        &[
            bin("kube-scheduler"),
            format!("--kubeconfig={}", p("scheduler.kubeconfig")),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
        ],
    )?;
    Ok(())
}
