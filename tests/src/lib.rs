//! A virtual Kubernetes node made of network namespaces, for tests and the demo.
//!
//! Everything lives in namespaces this module creates, with names unique per test bed, and is
//! removed when the [`TestBed`] is dropped, panics included. Nothing is added to the root
//! namespace's interfaces.
//!
//! Overlay-model address plan (AKS kubenet / Azure CNI Overlay):
//! - node `node-1`: uplink `eth0` 10.224.0.4/16, fd00:224::4/64 (the "VNet"), pod CIDR
//!   10.244.1.0/24 and fd00:10:244:1::/64, pods routed per /32 and /128 through host-side
//!   veths (`lxc*`), MASQUERADE for pod traffic leaving the cluster CIDRs;
//! - router: 10.224.0.1/16 on the VNet side, 203.0.113.1/24 and 2001:db8:113::1/64 towards the
//!   external host 203.0.113.10 / 2001:db8:113::10.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

pub mod kubeapi;

pub const NODE_NAME: &str = "node-1";
pub const NODE_IP: &str = "10.224.0.4";
pub const NODE_IP6: &str = "fd00:224::4";
pub const EXT_IP: &str = "203.0.113.10";
pub const EXT_IP6: &str = "2001:db8:113::10";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const CLUSTER_CIDR6: &str = "fd00:10:244::/56";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short prefix for this process and call, e.g. `ob4821-3`.
pub fn unique_prefix(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("ob{}{}-{}", tag, std::process::id() % 100_000, n)
}

/// Runs a command, failing with its stderr.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside a namespace.
pub fn ns_run(ns: &str, args: &[&str]) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    run(&v)
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it creates live there.
/// Whether a TCP connection from namespace `ns` to `dst` is established within `timeout`.
pub fn tcp_connects(ns: &str, dst: std::net::SocketAddr, timeout: Duration) -> bool {
    spawn_in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&dst, timeout).is_ok()
    })
    .join()
    .expect("connect thread")
    .expect("entering the namespace")
}

pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    spawn_in_netns(ns, f)
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns {ns} panicked"))?
}

/// Spawns `f` on a thread inside `ns` without waiting for it.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || -> Result<T> {
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // Only this thread moves; the namespace is released when the thread ends.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(f())
    })
}

/// A pod of the virtual node.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Container ports: (name, port, protocol).
    pub ports: Vec<(String, u16, String)>,
    pub netns: String,
    /// Host-side interface in the node namespace.
    pub host_if: String,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
}

pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub ports: &'a [(&'a str, u16, &'a str)],
}

/// The overlay-model virtual node, its router and external host.
pub struct TestBed {
    pub prefix: String,
    pub node_ns: String,
    pub router_ns: String,
    pub ext_ns: String,
    pub pods: Vec<Pod>,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    children: Vec<Child>,
    pin_dirs: Vec<PathBuf>,
    /// Extra labels per Kubernetes namespace, written into the cluster YAML.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl TestBed {
    /// Builds the node, router and external host with no pods yet.
    pub fn overlay(tag: &str) -> Result<Self> {
        ensure_root()?;
        let prefix = unique_prefix(tag);
        let dir = std::env::temp_dir().join(format!("observer-{prefix}"));
        std::fs::create_dir_all(dir.join("cluster"))?;
        let mut bed = TestBed {
            node_ns: format!("{prefix}-node"),
            router_ns: format!("{prefix}-rtr"),
            ext_ns: format!("{prefix}-ext"),
            prefix,
            pods: Vec::new(),
            dir,
            namespaces: Vec::new(),
            children: Vec::new(),
            pin_dirs: Vec::new(),
            namespace_labels: BTreeMap::new(),
        };
        bed.build().context("building the virtual node")?;
        bed.write_cluster()?;
        Ok(bed)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        run(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ns_run(name, &["ip", "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let (node, rtr, ext) = (
            self.node_ns.clone(),
            self.router_ns.clone(),
            self.ext_ns.clone(),
        );
        for ns in [&node, &rtr, &ext] {
            self.add_ns(ns)?;
        }
        // VNet link: node eth0 <-> router vnet0.
        run(&[
            "ip", "-n", &node, "link", "add", "eth0", "type", "veth", "peer", "name", "vnet0",
            "netns", &rtr,
        ])?;
        // WAN link: router wan0 <-> external host eth0.
        run(&[
            "ip", "-n", &rtr, "link", "add", "wan0", "type", "veth", "peer", "name", "eth0",
            "netns", &ext,
        ])?;
        let cmds: Vec<(&str, Vec<&str>)> = vec![
            (
                &node,
                vec!["ip", "addr", "add", "10.224.0.4/16", "dev", "eth0"],
            ),
            (
                &node,
                vec![
                    "ip",
                    "addr",
                    "add",
                    "fd00:224::4/64",
                    "dev",
                    "eth0",
                    "nodad",
                ],
            ),
            (&node, vec!["ip", "link", "set", "eth0", "up"]),
            (
                &node,
                vec!["ip", "route", "add", "default", "via", "10.224.0.1"],
            ),
            (
                &node,
                vec!["ip", "-6", "route", "add", "default", "via", "fd00:224::1"],
            ),
            (
                &rtr,
                vec!["ip", "addr", "add", "10.224.0.1/16", "dev", "vnet0"],
            ),
            (
                &rtr,
                vec![
                    "ip",
                    "addr",
                    "add",
                    "fd00:224::1/64",
                    "dev",
                    "vnet0",
                    "nodad",
                ],
            ),
            (
                &rtr,
                vec!["ip", "addr", "add", "203.0.113.1/24", "dev", "wan0"],
            ),
            (
                &rtr,
                vec![
                    "ip",
                    "addr",
                    "add",
                    "2001:db8:113::1/64",
                    "dev",
                    "wan0",
                    "nodad",
                ],
            ),
            (&rtr, vec!["ip", "link", "set", "vnet0", "up"]),
            (&rtr, vec!["ip", "link", "set", "wan0", "up"]),
            // kubenet-style user-defined routes: the VNet routes each node's pod CIDR to it.
            (
                &rtr,
                vec!["ip", "route", "add", "10.244.1.0/24", "via", "10.224.0.4"],
            ),
            (
                &rtr,
                vec![
                    "ip",
                    "-6",
                    "route",
                    "add",
                    "fd00:10:244:1::/64",
                    "via",
                    "fd00:224::4",
                ],
            ),
            (
                &ext,
                vec!["ip", "addr", "add", "203.0.113.10/24", "dev", "eth0"],
            ),
            (
                &ext,
                vec![
                    "ip",
                    "addr",
                    "add",
                    "2001:db8:113::10/64",
                    "dev",
                    "eth0",
                    "nodad",
                ],
            ),
            (&ext, vec!["ip", "link", "set", "eth0", "up"]),
            (
                &ext,
                vec!["ip", "route", "add", "default", "via", "203.0.113.1"],
            ),
            (
                &ext,
                vec![
                    "ip",
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    "2001:db8:113::1",
                ],
            ),
        ];
        for (ns, c) in cmds {
            ns_run(ns, &c)?;
        }
        for ns in [&node, &rtr] {
            ns_run(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            ns_run(ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        }
        // Overlay model: pod traffic leaving the cluster CIDRs is SNAT'd to the node IP.
        let rules = format!(
            "table ip observer_testbed {{\n  chain post {{\n    type nat hook postrouting priority srcnat;\n    \
             ip saddr {CLUSTER_CIDR} ip daddr != {CLUSTER_CIDR} oifname \"eth0\" masquerade\n  }}\n}}\n\
             table ip6 observer_testbed {{\n  chain post {{\n    type nat hook postrouting priority srcnat;\n    \
             ip6 saddr {CLUSTER_CIDR6} ip6 daddr != {CLUSTER_CIDR6} oifname \"eth0\" masquerade\n  }}\n}}\n"
        );
        nft(&node, &rules)?;
        Ok(())
    }

    /// Adds a pod: its namespace, a veth pair, addresses and routes. Returns its index.
    /// Pods in `namespace` with one label each, `app=<app>`, and no container ports.
    pub fn add_app_pods(&mut self, namespace: &str, pods: &[(&str, &str)]) -> Result<()> {
        for (name, app) in pods {
            self.add_pod(PodSpec {
                namespace,
                name,
                labels: &[("app", app)],
                ports: &[],
            })?;
        }
        Ok(())
    }

    pub fn add_pod(&mut self, spec: PodSpec<'_>) -> Result<usize> {
        let idx = self.pods.len();
        let netns = format!("{}-p{idx}", self.prefix);
        self.add_ns(&netns)?;
        let host_if = format!("lxc{idx}");
        let host = idx as u8 + 10;
        let ip4: IpAddr = format!("10.244.1.{host}").parse()?;
        let ip6: IpAddr = format!("fd00:10:244:1::{host:x}").parse()?;
        let node = self.node_ns.clone();
        run(&[
            "ip", "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ])?;
        let (s4, s6) = (format!("{ip4}/32"), format!("{ip6}/128"));
        let (r4, r6) = (ip4.to_string(), ip6.to_string());
        let proxy_arp = format!("net.ipv4.conf.{host_if}.proxy_arp=1");
        // Proxy ARP answers after up to 0.8 s by default; pods should not wait on the node.
        let proxy_delay = format!("net.ipv4.neigh.{host_if}.proxy_delay=0");
        let cmds: Vec<(&str, Vec<&str>)> = vec![
            (&netns, vec!["ip", "addr", "add", &s4, "dev", "eth0"]),
            (
                &netns,
                vec!["ip", "addr", "add", &s6, "dev", "eth0", "nodad"],
            ),
            (&netns, vec!["ip", "link", "set", "eth0", "up"]),
            (
                &netns,
                vec![
                    "ip",
                    "route",
                    "add",
                    "169.254.1.1",
                    "dev",
                    "eth0",
                    "scope",
                    "link",
                ],
            ),
            (
                &netns,
                vec![
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    "169.254.1.1",
                    "dev",
                    "eth0",
                ],
            ),
            (
                &netns,
                vec![
                    "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
                ],
            ),
            (
                &node,
                vec!["ip", "addr", "add", "fe80::1/64", "dev", &host_if, "nodad"],
            ),
            (&node, vec!["ip", "link", "set", &host_if, "up"]),
            (&node, vec!["sysctl", "-qw", &proxy_arp]),
            (&node, vec!["sysctl", "-qw", &proxy_delay]),
            (&node, vec!["ip", "route", "add", &r4, "dev", &host_if]),
            (
                &node,
                vec!["ip", "-6", "route", "add", &r6, "dev", &host_if],
            ),
        ];
        for (ns, c) in cmds {
            ns_run(ns, &c)?;
        }
        self.pods.push(Pod {
            namespace: spec.namespace.into(),
            name: spec.name.into(),
            labels: spec
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: spec
                .ports
                .iter()
                .map(|(n, p, pr)| (n.to_string(), *p, pr.to_string()))
                .collect(),
            netns,
            host_if,
            ip4,
            ip6,
        });
        self.write_cluster()?;
        Ok(idx)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Folder of Kubernetes YAML describing the node and its pods (`--source dir:`).
    pub fn cluster_dir(&self) -> PathBuf {
        self.dir.join("cluster")
    }

    /// Rewrites the cluster YAML from the pods added so far.
    pub fn write_cluster(&self) -> Result<()> {
        let mut y = String::new();
        let mut namespaces: Vec<&str> = self.pods.iter().map(|p| p.namespace.as_str()).collect();
        namespaces.sort();
        namespaces.dedup();
        for ns in namespaces {
            let _ = write!(y, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    kubernetes.io/metadata.name: {ns}\n");
            for (k, v) in self.namespace_labels.get(ns).into_iter().flatten() {
                let _ = writeln!(y, "    {k}: \"{v}\"");
            }
            y.push_str("---\n");
        }
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\nspec:\n  podCIDR: 10.244.1.0/24\n  podCIDRs: [10.244.1.0/24, \"fd00:10:244:1::/64\"]\nstatus:\n  addresses:\n  - {{type: InternalIP, address: {NODE_IP}}}\n  - {{type: InternalIP, address: \"{NODE_IP6}\"}}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata:\n  name: node-2\nspec:\n  podCIDR: 10.244.2.0/24\n  podCIDRs: [10.244.2.0/24, \"fd00:10:244:2::/64\"]\nstatus:\n  addresses:\n  - {{type: InternalIP, address: 10.224.0.5}}\n---\n"
        );
        for p in &self.pods {
            let _ = write!(
                y,
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels:\n",
                p.name, p.namespace
            );
            if p.labels.is_empty() {
                y.truncate(y.len() - "  labels:\n".len());
            }
            for (k, v) in &p.labels {
                let _ = writeln!(y, "    {k}: \"{v}\"");
            }
            let _ = write!(y, "spec:\n  nodeName: {NODE_NAME}\n  containers:\n  - name: main\n    image: example\n");
            if !p.ports.is_empty() {
                y.push_str("    ports:\n");
                for (n, port, proto) in &p.ports {
                    let _ = writeln!(
                        y,
                        "    - {{name: {n}, containerPort: {port}, protocol: {proto}}}"
                    );
                }
            }
            let _ = write!(
                y,
                "status:\n  phase: Running\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: \"{}\"\n---\n",
                p.ip4, p.ip4, p.ip6
            );
        }
        let path = self.cluster_dir().join("cluster.yaml");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, y)?;
        std::fs::rename(tmp, path)?;
        Ok(())
    }

    /// Starts `observer daemon` inside the node namespace. The process is killed on drop.
    pub fn start_daemon(&mut self, observer_bin: &Path, extra: &[&str]) -> Result<Daemon> {
        let socket = self.dir.join("observer.sock");
        self.start_daemon_at(observer_bin, &socket, extra)
    }

    /// Like [`TestBed::start_daemon`], with the API socket at `socket`.
    pub fn start_daemon_at(
        &mut self,
        observer_bin: &Path,
        socket: &Path,
        extra: &[&str],
    ) -> Result<Daemon> {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/observer-test-{}", self.prefix));
        let socket = socket.to_path_buf();
        let log = self.dir.join("daemon.log");
        let logf = std::fs::File::create(&log)?;
        let mut cmd = Command::new(observer_bin);
        cmd.args(["daemon", "--netns", &self.node_ns, "--node-name", NODE_NAME]);
        if !extra.contains(&"--source") {
            cmd.arg("--source")
                .arg(format!("dir:{}", self.cluster_dir().display()));
        }
        // Per test bed, and kept across restarts of its daemon like /run/observer on a node.
        cmd.arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--socket")
            .arg(&socket)
            .args(["--uplink", "eth0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let child = cmd.spawn().context("starting observer daemon")?;
        let pid = child.id();
        self.children.push(child);
        self.pin_dirs.push(pin_dir.clone());
        let d = Daemon {
            pid,
            socket,
            log,
            pin_dir,
        };
        d.wait_ready(Duration::from_secs(20), self.pods.len())?;
        Ok(d)
    }

    /// Stops a daemon started by [`TestBed::start_daemon`] (SIGTERM, then SIGKILL).
    pub fn stop_daemon(&mut self, d: &Daemon) {
        if let Some(pos) = self.children.iter().position(|c| c.id() == d.pid) {
            let mut c = self.children.remove(pos);
            stop_child(&mut c);
        }
    }

    /// Spawns a long-running command inside a namespace, killed on drop.
    pub fn spawn(&mut self, ns: &str, args: &[&str]) -> Result<u32> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", args.join(" ")))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }
}

fn stop_child(c: &mut Child) {
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for TestBed {
    fn drop(&mut self) {
        for c in &mut self.children {
            stop_child(c);
        }
        // Deleting the namespaces removes every veth, address, route and program in them.
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        for p in &self.pin_dirs {
            let _ = std::fs::remove_dir_all(p);
        }
        if std::env::var_os("OBSERVER_KEEP_TESTBED_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running daemon of a test bed.
pub struct Daemon {
    pub pid: u32,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub pin_dir: PathBuf,
}

impl Daemon {
    /// Waits until the API answers and `pods` interfaces are attached.
    pub fn wait_ready(&self, timeout: Duration, pods: usize) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = self.get("/v1/status") {
                let v: serde_json::Value = serde_json::from_str(&s)?;
                let attached = v["interfaces"].as_array().map(|a| a.len()).unwrap_or(0);
                if attached >= pods && v["last_sync"].is_string() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "daemon not ready after {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the daemon's unix socket; returns the body.
    pub fn get(&self, path: &str) -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket)?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: observer\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let (head, body) = buf.split_once("\r\n\r\n").context("malformed response")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            bail!("GET {path}: {head}");
        }
        Ok(body.to_string())
    }

    /// JSON lines of a GET.
    pub fn get_lines(&self, path: &str) -> Result<Vec<serde_json::Value>> {
        self.get(path)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).context("parsing JSON line"))
            .collect()
    }
}

pub fn ensure_root() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the virtual node needs root (network namespaces, eBPF)");
    }
    Ok(())
}

/// Loads an nftables ruleset into a namespace.
pub fn nft(ns: &str, rules: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (cargo xtask setup installs nftables)")?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Packets and bytes an nftables named counter saw.
pub fn nft_counter(ns: &str, family: &str, table: &str, name: &str) -> Result<(u64, u64)> {
    let out = ns_run(ns, &["nft", "-j", "list", "counter", family, table, name])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    for item in v["nftables"].as_array().into_iter().flatten() {
        if let Some(c) = item.get("counter") {
            return Ok((
                c["packets"].as_u64().unwrap_or(0),
                c["bytes"].as_u64().unwrap_or(0),
            ));
        }
    }
    bail!("counter {family} {table} {name} not found in {ns}")
}
