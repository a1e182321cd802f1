//! A node: containerd, kubelet and kube-proxy in the node's namespaces, its CNI config, the
//! images, and the cluster add-ons (DNS; observer deployed from `manifests/` as users do).
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::images::{self, Image};
use super::layout::{Cni, Layout, Node};
use super::proc::spawn;
use observer_tests::cluster::{CLUSTER_CIDR, DNS_NODE, DNS_SVC_IP};

const CONTAINERD_SOCK: &str = "/run/containerd/containerd.sock";

/// Node objects created before the kubelets register, carrying the pod range the VNet routes.
pub fn register(layout: &Layout) -> Result<()> {
    let mut yaml = String::new();
    for n in layout.nodes() {
        yaml += &format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    \
             kubernetes.io/hostname: {name}\n    kubernetes.io/os: linux\nspec:\n  podCIDR: {c}\n  \
             podCIDRs: [{c}]\n",
            name = n.name,
            c = n.pod_cidr
        );
    }
    layout.apply(&yaml)
}

fn cni_config(layout: &Layout, n: &Node) -> String {
    let ipam = format!(
        r#"{{"type":"host-local","ranges":[[{{"subnet":"{}","gateway":"{}"}}]],"routes":[{{"dst":"0.0.0.0/0"}}]}}"#,
        n.pod_cidr, n.pod_gateway
    );
    // No masquerade by the plugin: pod-to-pod traffic across nodes keeps pod addresses (what
    // ip-masq-agent does on AKS), or pod selectors would stop matching.
    let main = match layout.cni {
        Cni::Bridge => format!(
            r#"{{"type":"bridge","bridge":"cbr0","isGateway":true,"hairpinMode":true,"ipMasq":false,"ipam":{ipam}}}"#
        ),
        Cni::Ptp => format!(r#"{{"type":"ptp","ipMasq":false,"ipam":{ipam}}}"#),
    };
    format!(
        r#"{{"cniVersion":"0.4.0","name":"{}","plugins":[{main},{{"type":"portmap","capabilities":{{"portMappings":true}}}}]}}"#,
        if layout.cni == Cni::Bridge {
            "kubenet"
        } else {
            "azure-ptp"
        }
    )
}

fn containerd_config() -> String {
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{CONTAINERD_SOCK}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # This machine withholds CAP_SYS_RESOURCE: runc cannot set negative OOM scores.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
"#,
        pause = images::PAUSE
    )
}

fn kubelet_config(layout: &Layout, n: &Node) -> String {
    let d = layout.node_dir(n);
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This host runs cgroup v1, which kubelet 1.35 refuses unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
containerRuntimeEndpoint: unix://{CONTAINERD_SOCK}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
clusterDomain: cluster.local
clusterDNS: [{DNS_SVC_IP}]
resolvConf: {resolv}
readOnlyPort: 0
failSwapOn: false
protectKernelDefaults: false
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
"#,
        cgroup = n.cgroup,
        ca = layout.pki_dir().join("ca.crt").display(),
        resolv = d.join("resolv.conf").display(),
    )
}

fn kube_proxy_config(layout: &Layout, n: &Node) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kc}
hostnameOverride: {name}
bindAddress: {ip}
mode: {mode}
clusterCIDR: {CLUSTER_CIDR}
# nf_conntrack_max is host-wide: left alone.
conntrack:
  maxPerCore: 0
  min: 0
metricsBindAddress: 127.0.0.1:10249
"#,
        kc = layout.pki_dir().join("kube-proxy.kubeconfig").display(),
        name = n.name,
        ip = n.ip,
        mode = layout.proxy.as_str(),
    )
}

pub fn start(layout: &Layout, n: &Node) -> Result<()> {
    let d = layout.node_dir(n);
    std::fs::write(
        d.join("cni-conf").join("10-observer-test.conflist"),
        cni_config(layout, n),
    )?;
    std::fs::write(d.join("containerd.toml"), containerd_config())?;
    std::fs::write(d.join("kubelet.yaml"), kubelet_config(layout, n))?;
    std::fs::write(d.join("kube-proxy.yaml"), kube_proxy_config(layout, n))?;
    // Pods with dnsPolicy Default get this: no resolver outside the cluster.
    std::fs::write(d.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
    let s = |x: &str| x.to_string();
    spawn(
        layout,
        Some(n),
        "containerd",
        &[
            s("containerd"),
            s("--config"),
            d.join("containerd.toml").display().to_string(),
        ],
    )?;
    super::wait_for(
        &format!("containerd on {}", n.name),
        Duration::from_secs(20),
        || {
            Ok(layout
                .node_out(n, &["ctr", "-a", CONTAINERD_SOCK, "version"])
                .is_ok())
        },
    )?;
    make_cgroup_root(&n.cgroup)?;
    let bin = |b: &str| layout.bin_dir.join(b).display().to_string();
    spawn(
        layout,
        Some(n),
        "kubelet",
        &[
            bin("kubelet"),
            format!("--config={}", d.join("kubelet.yaml").display()),
            format!(
                "--kubeconfig={}",
                layout
                    .pki_dir()
                    .join(format!("kubelet-{}.kubeconfig", n.name))
                    .display()
            ),
            format!("--hostname-override={}", n.name),
            format!("--node-ip={}", n.ip),
            "--v=1".into(),
        ],
    )?;
    spawn(
        layout,
        Some(n),
        "kube-proxy",
        &[
            bin("kube-proxy"),
            format!("--config={}", d.join("kube-proxy.yaml").display()),
        ],
    )?;
    Ok(())
}

/// kubelet's cgroupRoot, in every hierarchy (it checks, it does not create). A new v1 cpuset
/// starts with no CPUs and no memory nodes: given the root's.
fn make_cgroup_root(top: &str) -> Result<()> {
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let d = h.path().join(top);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        if h.file_name() == "cpuset" {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let v = std::fs::read_to_string(h.path().join(f))?;
                std::fs::write(d.join(f), v.trim())
                    .with_context(|| format!("writing {}", d.join(f).display()))?;
            }
        }
    }
    Ok(())
}

/// Imports the image archives into the node's containerd (as a registry pull would).
pub fn import_images(layout: &Layout, n: &Node, imgs: &[Image]) -> Result<()> {
    for img in imgs {
        let archive = img.archive.display().to_string();
        layout
            .node_out(
                n,
                &[
                    "ctr",
                    "-a",
                    CONTAINERD_SOCK,
                    "-n",
                    "k8s.io",
                    "images",
                    "import",
                    &archive,
                ],
            )
            .with_context(|| format!("importing {} on {}", img.name, n.name))?;
    }
    Ok(())
}

/// The cluster's DNS: dnsmasq behind the kube-dns Service answering `cluster.local` names from
/// a hosts directory that a loop in the router's namespace keeps in sync with Services.
pub fn deploy_dns(layout: &Layout) -> Result<()> {
    layout.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  replicas: 1
  selector:
    matchLabels: {{k8s-app: kube-dns}}
  template:
    metadata:
      labels: {{k8s-app: kube-dns}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {DNS_NODE}}}
      containers:
        - name: dnsmasq
          image: {tools}
          command: [dnsmasq, --keep-in-foreground, --no-resolv, --no-hosts, --hostsdir=/hosts,
                    --local=/cluster.local/, --user=root, --log-facility=-, --port=53]
          ports:
            - {{name: dns, containerPort: 53, protocol: UDP}}
            - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
          readinessProbe:
            tcpSocket: {{port: 53}}
            periodSeconds: 2
          volumeMounts:
            - {{name: hosts, mountPath: /hosts, readOnly: true}}
      volumes:
        - name: hosts
          hostPath: {{path: /var/lib/observer-dns, type: Directory}}
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  clusterIP: {DNS_SVC_IP}
  selector: {{k8s-app: kube-dns}}
  ports:
    - {{name: dns, port: 53, protocol: UDP}}
    - {{name: dns-tcp, port: 53, protocol: TCP}}
"#,
        tools = images::TOOLS
    ))?;
    start_dns_sync(layout)?;
    layout
        .wait(
            &[
                "-n",
                "kube-system",
                "--for=condition=Available",
                "deployment/kube-dns",
            ],
            Duration::from_secs(90),
        )
        .context("the DNS pod")
}

/// `NAME.NAMESPACE.svc.cluster.local` for every Service with a ClusterIP, rewritten every
/// second (dot-files are ignored by dnsmasq, so the write is atomic for it).
fn start_dns_sync(layout: &Layout) -> Result<()> {
    if super::proc::components(layout)
        .iter()
        .any(|(n, alive)| n == "router-dns-sync" && *alive)
    {
        return Ok(());
    }
    let dir = layout.state.join("dns");
    let jsonpath = r#"{range .items[?(@.spec.clusterIP!="None")]}{.spec.clusterIP} {.metadata.name}.{.metadata.namespace}.svc.cluster.local{"\n"}{end}"#;
    let script = format!(
        "while :; do {kubectl} --kubeconfig {kc} get services -A -o 'jsonpath={jsonpath}' \
         > {dir}/.services.tmp && {{ cmp -s {dir}/.services.tmp {dir}/services || \
         mv {dir}/.services.tmp {dir}/services; }}; sleep 1; done",
        kubectl = Layout::kubectl_bin(),
        kc = layout.kubeconfig().display(),
        dir = dir.display(),
    );
    spawn(
        layout,
        None,
        "dns-sync",
        &["sh".into(), "-c".into(), script],
    )?;
    Ok(())
}

/// `kubectl apply -k manifests/`, unmodified, and the DaemonSet Ready on every node. A
/// DaemonSet already there is restarted so it runs the freshly imported image.
pub fn deploy_observer(layout: &Layout) -> Result<()> {
    let existed = layout
        .kubectl_out(&["-n", "observer", "get", "ds", "observer"])
        .is_ok();
    let manifests = crate::workspace_root().join("manifests");
    layout.kubectl_out(&["apply", "-k", &manifests.display().to_string()])?;
    if existed {
        layout.kubectl_out(&["-n", "observer", "rollout", "restart", "ds/observer"])?;
    }
    let out = layout.kubectl_out(&[
        "-n",
        "observer",
        "rollout",
        "status",
        "ds/observer",
        "--timeout=180s",
    ]);
    if let Err(e) = out {
        let pods = layout
            .kubectl_out(&["-n", "observer", "get", "pods", "-o", "wide"])
            .unwrap_or_default();
        bail!("observer's DaemonSet did not become Ready: {e:#}\n{pods}");
    }
    Ok(())
}
