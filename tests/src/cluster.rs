//! The real two-node test cluster that `cargo xtask cluster up` builds (xtask/src/cluster):
//! its fixed names and addresses, and the client side the cluster tests use (kubectl in the
//! router's namespace, commands on a node). One cluster per machine, at a fixed place.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// Everything of a running cluster: certificates, per-node directories, logs, PIDs.
pub const STATE_DIR: &str = "/var/lib/observer-cluster";
/// Unpacked Kubernetes binaries and built images, kept across `down`.
pub const CACHE_DIR: &str = "/var/cache/observer-k8s";
/// Network namespaces: `<PREFIX>-router`, `<PREFIX>-node-1`, ...
pub const PREFIX: &str = "obsk";
pub const ROUTER_IP: &str = "10.224.0.1";
pub const VNET_CIDR: &str = "10.224.0.0/16";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const KUBERNETES_SVC_IP: &str = "10.96.0.1";
pub const DNS_SVC_IP: &str = "10.96.0.10";
pub const API_PORT: u16 = 6443;
/// The node that runs the DNS pod, so lookups from the other node cross the VNet.
pub const DNS_NODE: &str = "node-2";

/// How pods attach: the kubenet shape (a `cbr0` bridge per node) or the Azure CNI shape (`ptp`:
/// a veth per pod with a /32 route).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cni {
    Bridge,
    Ptp,
}

/// kube-proxy's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Iptables,
    Nftables,
}

impl Cni {
    pub fn as_str(self) -> &'static str {
        match self {
            Cni::Bridge => "bridge",
            Cni::Ptp => "ptp",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "bridge" | "kubenet" => Cni::Bridge,
            "ptp" | "azure" => Cni::Ptp,
            _ => bail!("unknown CNI shape {s:?} (bridge or ptp)"),
        })
    }
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "iptables" => ProxyMode::Iptables,
            "nftables" => ProxyMode::Nftables,
            _ => bail!("unknown kube-proxy mode {s:?} (iptables or nftables)"),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    /// Kubernetes node name.
    pub name: String,
    pub netns: String,
    /// Address on the VNet (`eth0`).
    pub ip: String,
    pub pod_cidr: String,
    /// The pods' gateway: `cbr0`'s address (bridge) or the node's side of each veth (ptp).
    pub pod_gateway: String,
    /// Top of the node's cgroup tree in every hierarchy (kubelet's cgroupRoot).
    pub cgroup: String,
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub state: PathBuf,
    pub cache: PathBuf,
    /// Where kube-apiserver, kubelet, ... are.
    pub bin_dir: PathBuf,
    pub cni: Cni,
    pub proxy: ProxyMode,
    nodes: Vec<Node>,
}

impl Layout {
    pub fn new(cni: Cni, proxy: ProxyMode, bin_dir: PathBuf) -> Self {
        let nodes = (1..=2u8)
            .map(|i| Node {
                name: format!("node-{i}"),
                netns: format!("{PREFIX}-node-{i}"),
                ip: format!("10.224.0.{}", 3 + i),
                pod_cidr: format!("10.244.{}.0/24", i - 1),
                pod_gateway: format!("10.244.{}.1", i - 1),
                cgroup: format!("{PREFIX}-node-{i}"),
            })
            .collect();
        Layout {
            state: STATE_DIR.into(),
            cache: CACHE_DIR.into(),
            bin_dir,
            cni,
            proxy,
            nodes,
        }
    }

    /// The running cluster, or an error saying it is not up.
    pub fn load() -> Result<Self> {
        let env = std::fs::read_to_string(Path::new(STATE_DIR).join("up"))
            .context("no test cluster is up (cargo xtask cluster up)")?;
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
                .with_context(|| format!("{STATE_DIR}/up lacks {k}"))
        };
        Ok(Layout::new(
            Cni::parse(&get("cni")?)?,
            ProxyMode::parse(&get("proxy")?)?,
            get("bin_dir")?.into(),
        ))
    }

    /// Records that the cluster is complete, with its shape (read back by `load`).
    pub fn mark_up(&self) -> Result<()> {
        std::fs::write(
            self.state.join("up"),
            format!(
                "cni={}\nproxy={}\nbin_dir={}\n",
                self.cni.as_str(),
                self.proxy.as_str(),
                self.bin_dir.display()
            ),
        )?;
        Ok(())
    }

    /// Marked up, and every node's namespace holder still alive.
    pub fn is_up(&self) -> Result<bool> {
        if !self.state.join("up").exists() {
            return Ok(false);
        }
        Ok(self.nodes.iter().all(|n| self.holder_pid(n).is_ok()))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The control plane's node.
    pub fn control_plane(&self) -> &Node {
        &self.nodes[0]
    }

    pub fn router_netns(&self) -> String {
        format!("{PREFIX}-router")
    }

    pub fn api_server(&self) -> String {
        format!("https://{}:{API_PORT}", self.control_plane().ip)
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.state.join("pki")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.pki_dir().join("admin.kubeconfig")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.state.join("logs")
    }

    /// A node's private directories (bound over /var/lib/kubelet etc. in its mount namespace).
    pub fn node_dir(&self, n: &Node) -> PathBuf {
        self.state.join(&n.name)
    }

    /// The process that holds a node's mount namespace; everything of the node joins it.
    pub fn holder_pid(&self, n: &Node) -> Result<u32> {
        let f = self.node_dir(n).join("holder.pid");
        let pid: u32 = std::fs::read_to_string(&f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .parse()?;
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("{}'s namespace holder (pid {pid}) is gone", n.name);
        }
        Ok(pid)
    }

    /// kubectl, closest to the server's version that the machine has.
    pub fn kubectl_bin() -> &'static str {
        const NEWER: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33";
        if Path::new(NEWER).exists() {
            NEWER
        } else {
            "kubectl"
        }
    }

    /// kubectl as cluster admin, run in the router's namespace (the API server is reachable
    /// only from the cluster's namespaces).
    pub fn kubectl_cmd(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.router_netns()))
            .arg("--")
            .arg(Self::kubectl_bin())
            .arg("--kubeconfig")
            .arg(self.kubeconfig());
        c
    }

    pub fn kubectl_hint(&self) -> String {
        format!(
            "nsenter --net=/run/netns/{} {} --kubeconfig {}",
            self.router_netns(),
            Self::kubectl_bin(),
            self.kubeconfig().display()
        )
    }

    /// kubectl's stdout; its stderr in the error when it fails.
    pub fn kubectl_out(&self, args: &[&str]) -> Result<String> {
        output(
            self.kubectl_cmd().args(args),
            &format!("kubectl {}", args.join(" ")),
        )
    }

    /// kubectl with `stdin` piped in (`apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        let what = format!("kubectl {}", args.join(" "));
        let mut child = self
            .kubectl_cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| what.clone())?;
        child.stdin.take().unwrap().write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml).map(|_| ())
    }

    /// A command in a node's network and mount namespaces (its containerd, its bpffs).
    pub fn node_cmd(&self, n: &Node, args: &[&str]) -> Result<Command> {
        let pid = self.holder_pid(n)?;
        let mut c = Command::new("nsenter");
        c.args(["-t", &pid.to_string(), "-m", "-n", "--"])
            .args(args);
        Ok(c)
    }

    pub fn node_out(&self, n: &Node, args: &[&str]) -> Result<String> {
        output(
            &mut self.node_cmd(n, args)?,
            &format!("on {}: {}", n.name, args.join(" ")),
        )
    }

    /// A command in the router's namespace: a client outside the cluster, on the VNet.
    pub fn router_out(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.router_netns()))
            .arg("--")
            .args(args);
        output(&mut c, &format!("on the router: {}", args.join(" ")))
    }

    /// `kubectl exec` into a pod, stdout on success.
    pub fn exec(&self, namespace: &str, pod: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["-n", namespace, "exec", pod, "--"];
        args.extend_from_slice(cmd);
        self.kubectl_out(&args)
    }

    /// Waits until `kubectl wait` says the condition holds.
    pub fn wait(&self, args: &[&str], timeout: Duration) -> Result<()> {
        let t = format!("--timeout={}s", timeout.as_secs());
        let mut a = vec!["wait"];
        a.extend_from_slice(args);
        a.push(&t);
        self.kubectl_out(&a).map(|_| ())
    }
}

fn output(c: &mut Command, what: &str) -> Result<String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` until it is true; the panic names what was awaited and the last error.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f() {
            Ok(true) => return,
            Ok(false) => last.clear(),
            Err(e) => last = format!(": {e:#}"),
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}{last}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The tools image (busybox with sh, nc, httpd, wget, nslookup; dnsmasq): built by
/// `cargo xtask cluster up`, never pulled.
pub const TOOLS_IMAGE: &str = "localhost/observer-tools:1";

/// The running cluster for a test, or None after printing why the test does nothing (the
/// cluster tests run from `cargo xtask test`, which brings the cluster up first).
pub fn cluster_or_skip() -> Option<Layout> {
    match Layout::load() {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("SKIPPED: {e:#}");
            None
        }
    }
}

/// A namespace of one test, deleted (with everything in it) on drop, even after a panic.
pub struct TestNs {
    pub layout: Layout,
    pub name: String,
}

/// A pod the test made: where it runs and its address.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub node: String,
}

impl TestNs {
    /// `tag` plus a unique suffix; `labels` on the namespace (for namespaceSelectors).
    pub fn new(layout: &Layout, tag: &str, labels: &[(&str, &str)]) -> Result<Self> {
        let name = format!("{tag}-{}", std::process::id() % 100_000);
        let mut yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
        if !labels.is_empty() {
            yaml += "  labels:\n";
            for (k, v) in labels {
                yaml += &format!("    {k}: \"{v}\"\n");
            }
        }
        layout.apply(&yaml)?;
        // The default service account is what pods need to be admitted.
        let ns = TestNs {
            layout: layout.clone(),
            name,
        };
        let n = ns.name.clone();
        eventually(
            &format!("namespace {n}'s default service account"),
            Duration::from_secs(30),
            || {
                Ok(ns
                    .layout
                    .kubectl_out(&["-n", &n, "get", "serviceaccount", "default"])
                    .is_ok())
            },
        );
        Ok(ns)
    }

    /// Applies YAML whose objects name no namespace, into this one.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.layout
            .kubectl_stdin(&["-n", &self.name, "apply", "-f", "-"], yaml)
            .map(|_| ())
    }

    pub fn delete(&self, kind_name: &str) -> Result<()> {
        self.layout
            .kubectl_out(&["-n", &self.name, "delete", kind_name, "--wait=false"])
            .map(|_| ())
    }

    /// A pod of the tools image on `node`, running `command` (sh -c), with `labels`; waits
    /// until it is Ready (or Running, without a readiness probe) and returns its address.
    pub fn pod(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        node: &str,
        command: &str,
    ) -> Result<PodRef> {
        self.pod_with(name, labels, node, command, "")
    }

    /// Like `pod`, with extra container fields (probes, ports) as YAML indented for the
    /// container (8 spaces).
    pub fn pod_with(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        node: &str,
        command: &str,
        container_extra: &str,
    ) -> Result<PodRef> {
        let mut l = String::new();
        for (k, v) in labels {
            l += &format!("    {k}: \"{v}\"\n");
        }
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n{l}    test-pod: \"{name}\"\n\
             spec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 0\n  containers:\n\
             \x20     - name: main\n        image: {TOOLS_IMAGE}\n        command: [sh, -c, {cmd:?}]\n{container_extra}",
            cmd = command
        );
        self.apply(&yaml)?;
        self.wait_ready(name)
    }

    /// An HTTP server (busybox httpd) answering `name` on `port`.
    pub fn server(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        node: &str,
        port: u16,
    ) -> Result<PodRef> {
        self.pod(
            name,
            labels,
            node,
            &format!(
                "mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p {port} -h /www"
            ),
        )
    }

    /// A pod that only sleeps: the client side of a test.
    pub fn client(&self, name: &str, labels: &[(&str, &str)], node: &str) -> Result<PodRef> {
        self.pod(name, labels, node, "exec sleep 100000")
    }

    pub fn wait_ready(&self, name: &str) -> Result<PodRef> {
        self.layout.wait(
            &[
                "-n",
                &self.name,
                "--for=condition=Ready",
                &format!("pod/{name}"),
            ],
            Duration::from_secs(90),
        )?;
        let out = self.layout.kubectl_out(&[
            "-n",
            &self.name,
            "get",
            "pod",
            name,
            "-o",
            "jsonpath={.status.podIP} {.spec.nodeName}",
        ])?;
        let mut it = out.split_whitespace();
        Ok(PodRef {
            namespace: self.name.clone(),
            name: name.to_string(),
            ip: it.next().context("no pod IP")?.to_string(),
            node: it.next().context("no node")?.to_string(),
        })
    }

    /// Labels a pod (overwriting), as `kubectl label` does.
    pub fn label(&self, pod: &str, kv: &str) -> Result<()> {
        self.layout
            .kubectl_out(&["-n", &self.name, "label", "pod", pod, kv, "--overwrite"])
            .map(|_| ())
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = self
            .layout
            .kubectl_out(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// Whether `from` gets an HTTP answer from `url` within `secs` (busybox wget; its own `-T`
/// crashes, so `timeout`). Returns the body's first line when it does.
pub fn http_get(layout: &Layout, from: &PodRef, url: &str, secs: u32) -> Option<String> {
    layout
        .exec(
            &from.namespace,
            &from.name,
            &["timeout", &secs.to_string(), "wget", "-q", "-O", "-", url],
        )
        .ok()
        .map(|s| s.lines().next().unwrap_or("").to_string())
}

/// Whether a TCP connection from `from` to `host:port` opens within `secs`.
pub fn tcp_opens(layout: &Layout, from: &PodRef, host: &str, port: u16, secs: u32) -> bool {
    layout
        .exec(
            &from.namespace,
            &from.name,
            &[
                "sh",
                "-c",
                &format!("timeout {secs} nc {host} {port} </dev/null"),
            ],
        )
        .is_ok()
}

/// The address `name` resolves to from `from` (busybox nslookup, over UDP to the kube-dns
/// Service), or None. `name` fully qualified (`web.shop.svc.cluster.local`): busybox's
/// nslookup ignores the search list (its wget and ping use it).
pub fn resolve(layout: &Layout, from: &PodRef, name: &str, secs: u32) -> Option<String> {
    let out = layout
        .exec(
            &from.namespace,
            &from.name,
            &["timeout", &secs.to_string(), "nslookup", name],
        )
        .ok()?;
    // busybox prints the server first, then "Name: ..." and "Address: ..." of the answer.
    let answer = out.split("Name:").nth(1)?;
    answer
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Address:")
                .map(|a| a.trim().to_string())
        })
        .or_else(|| answer.lines().nth(1).map(|l| l.trim().to_string()))
}

/// `observer flows` inside the observer pod on `node`, as JSON lines.
pub fn observer_flows(
    layout: &Layout,
    node: &str,
    args: &[&str],
) -> Result<Vec<serde_json::Value>> {
    let pod = observer_pod(layout, node)?;
    let mut a = vec![
        "-n", "observer", "exec", &pod, "--", "observer", "flows", "-o", "json",
    ];
    a.extend_from_slice(args);
    let out = layout.kubectl_out(&a)?;
    Ok(out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// `observer status` inside the observer pod on `node`.
pub fn observer_status(layout: &Layout, node: &str) -> Result<String> {
    let pod = observer_pod(layout, node)?;
    layout.kubectl_out(&["-n", "observer", "exec", &pod, "--", "observer", "status"])
}

/// IDs of the BPF links observer pinned in `node`'s bpffs (pod veths' TCX links, the
/// uplink's): empty when nothing is pinned.
pub fn pinned_links(layout: &Layout, node: &Node) -> Vec<u64> {
    let dir = "/sys/fs/bpf/observer/links";
    let list = layout
        .node_out(node, &["sh", "-c", &format!("ls {dir} 2>/dev/null; true")])
        .unwrap_or_default();
    list.split_whitespace()
        .filter_map(|f| {
            let pin = format!("{dir}/{f}");
            let out = layout
                .node_out(node, &["bpftool", "-j", "link", "show", "pinned", &pin])
                .ok()?;
            serde_json::from_str::<serde_json::Value>(&out).ok()?["id"].as_u64()
        })
        .collect()
}

/// The observer pod running on `node`.
pub fn observer_pod(layout: &Layout, node: &str) -> Result<String> {
    let out = layout.kubectl_out(&[
        "-n",
        "observer",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=observer",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("no observer pod on {node}"))
}
