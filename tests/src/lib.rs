//! A virtual Kubernetes cluster made of network namespaces, for tests and the demo: `node-1`
//! (the node under test, where the daemon runs), a second node `node-2`, a host elsewhere in the
//! VNet, a router and an external host, in either AKS network model ([`Model`]).
//!
//! Everything lives in namespaces this module creates, with names unique per test bed, and is
//! removed when the [`TestBed`] is dropped, panics included. Nothing is added to the root
//! namespace's interfaces.
//!
//! Common to both models:
//! - the VNet, 10.224.0.0/16 and fd00:224::/64, is a Linux bridge `vnet` in the router
//!   namespace holding the router's VNet addresses 10.224.0.1 and fd00:224::1. Attached to it
//!   by veth pairs: `eth0` of `node-1` (10.224.0.4, fd00:224::4), of `node-2` (10.224.0.5,
//!   fd00:224::5) and of the VNet peer host (10.224.0.100, fd00:224::100), each with the
//!   router as default gateway;
//! - the router's `wan0`, 203.0.113.1/24 and 2001:db8:113::1/64, leads to the external host
//!   203.0.113.10 / 2001:db8:113::10, which stands for the internet;
//! - a pod is a namespace whose `eth0` holds a /32 and a /128, with default routes via
//!   169.254.1.1 (answered by proxy ARP) and fe80::1 (the host side's link-local address); the
//!   host side `lxcN` sits in its node's namespace with /32 and /128 routes to the pod;
//! - each node forwards, and SNATs pod traffic the model sends out under the node IP with an
//!   nftables table `observer_testbed` (MASQUERADE out of `eth0`).
//!
//! [`Model::Overlay`] (AKS kubenet, Azure CNI Overlay): pod addresses apart from the VNet.
//! - node-1 pods 10.244.1.(10+i) and fd00:10:244:1::(10+i), node-2 pods 10.244.2.(10+i) and
//!   fd00:10:244:2::(10+i); cluster CIDRs 10.244.0.0/16 and fd00:10:244::/56; the Nodes carry
//!   `spec.podCIDRs` 10.244.N.0/24 and fd00:10:244:N::/64;
//! - the nodes route each other's pod CIDRs over the VNet, and the router holds user-defined
//!   routes to both, so the peer's and the external host's packets to a pod IP arrive;
//! - MASQUERADE: source in the cluster CIDR, destination outside it. The peer and the external
//!   host see the node IP, pods on either node see the pod IP.
//!
//! [`Model::Flat`] (Azure CNI): pods take VNet addresses.
//! - node-1 pods 10.224.1.(10+i) and fd00:224::1:(10+i), node-2 pods 10.224.2.(10+i) and
//!   fd00:224::2:(10+i); the Nodes have no pod CIDR;
//! - each node's `eth0` answers ARP for its pods (proxy ARP, via the /32 routes) and neighbour
//!   solicitations (a proxy NDP entry per pod), so the router, the peer and the other node
//!   reach pod IPs on-link, as Azure's SDN delivers them;
//! - MASQUERADE: source in the node's pod range, destination outside the VNet. The peer and
//!   pods on either node see the pod IP, the external host the node IP.
//!
//! [`TestBed::add_wrong_masquerade`] and [`TestBed::remove_masquerade`] break a node's SNAT on
//! purpose; [`TestBed::model_args`] are the daemon flags that describe the model.
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

pub mod bench;
pub mod cluster;
pub mod flood;
pub mod kubeapi;
pub mod nfqueue;
pub mod pki;
pub mod policy_gen;

pub const NODE_NAME: &str = "node-1";
pub const NODE_IP: &str = "10.224.0.4";
pub const NODE_IP6: &str = "fd00:224::4";
pub const EXT_IP: &str = "203.0.113.10";
pub const EXT_IP6: &str = "2001:db8:113::10";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const CLUSTER_CIDR6: &str = "fd00:10:244::/56";
pub const NODE2_NAME: &str = "node-2";
pub const NODE2_IP: &str = "10.224.0.5";
pub const NODE2_IP6: &str = "fd00:224::5";
/// A host in the VNet that is not a node (a VM, a private endpoint).
pub const PEER_IP: &str = "10.224.0.100";
pub const PEER_IP6: &str = "fd00:224::100";
/// The router's address in the VNet, every VNet host's default gateway.
pub const ROUTER_IP: &str = "10.224.0.1";
pub const ROUTER_IP6: &str = "fd00:224::1";
pub const VNET_CIDR: &str = "10.224.0.0/16";
pub const VNET_CIDR6: &str = "fd00:224::/64";

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

/// A kernel counter from `/v1/status` (`kernel`: [name, count] pairs).
pub fn kernel_stat(status: &serde_json::Value, name: &str) -> u64 {
    status["kernel"]
        .as_array()
        .expect("kernel counters in the status")
        .iter()
        .find(|p| p[0] == name)
        .and_then(|p| p[1].as_u64())
        .unwrap_or_else(|| panic!("no kernel counter {name}: {status:#}"))
}

/// `dropped` denied packets between the status reads `s0` and `s1` took no conntrack entries
/// (fewer than 100 more), and each is accounted within 5 s: a drop record (`records()` counts
/// those since `s0`), suppressed by the drop-record budget, or an event lost.
pub fn assert_drops_untracked(
    s0: &serde_json::Value,
    s1: &serde_json::Value,
    dropped: u64,
    records: impl Fn() -> u64,
) {
    let delta = |k: &str| kernel_stat(s1, k) - kernel_stat(s0, k);
    let (suppressed, lost) = (delta("drop_events_suppressed"), delta("events_lost"));
    let grown = s1["conntrack_entries"].as_u64().unwrap() as i64
        - s0["conntrack_entries"].as_u64().unwrap() as i64;
    assert!(
        grown < 100,
        "{dropped} dropped openers took {grown} conntrack entries"
    );
    let t0 = std::time::Instant::now();
    loop {
        let r = records();
        if r + suppressed + lost == dropped {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{dropped} dropped: {r} records, {suppressed} suppressed, {lost} lost"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a TCP connection from namespace `ns` to `dst` is established within `timeout`.
pub fn tcp_connects(ns: &str, dst: std::net::SocketAddr, timeout: Duration) -> bool {
    spawn_in_netns(ns, move || {
        std::net::TcpStream::connect_timeout(&dst, timeout).is_ok()
    })
    .join()
    .expect("connect thread")
    .expect("entering the namespace")
}

/// Accepts TCP connections on `port` (both families) inside `ns` and closes them, until `stop`.
pub fn accept_tcp(
    ns: &str,
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let l = in_netns(ns, move || {
        std::net::TcpListener::bind(("::", port)).unwrap()
    })
    .unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => drop(s),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

/// The usual start of a hardened namespace: default-deny both ways, then DNS to the cluster's
/// kube-dns pods allowed (NetworkPolicy YAML).
pub fn default_deny_with_dns(namespace: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: default-deny, namespace: {namespace}}}\n\
         spec:\n  podSelector: {{}}\n  policyTypes: [Ingress, Egress]\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-dns, namespace: {namespace}}}\n\
         spec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n\
         \x20   - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: kube-system}}}}\n\
         \x20     podSelector: {{matchLabels: {{k8s-app: kube-dns}}}}\n\
         \x20   ports: [{{port: 53, protocol: UDP}}]\n---\n"
    )
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it creates live there.
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

/// A pod of the virtual cluster.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Container ports: (name, port, protocol).
    pub ports: Vec<(String, u16, String)>,
    pub netns: String,
    /// Kubernetes node: [`NODE_NAME`] or [`NODE2_NAME`].
    pub node: String,
    /// Host-side interface in its node's namespace.
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

/// The AKS network model a test bed is built in (address plans: module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// kubenet, Azure CNI Overlay: pod CIDRs apart from the VNet, SNAT when leaving them.
    Overlay,
    /// Azure CNI: pods take VNet addresses, SNAT only beyond the VNet.
    Flat,
}

impl Model {
    /// The value of the daemon's `--network-model`.
    pub fn as_str(self) -> &'static str {
        match self {
            Model::Overlay => "overlay",
            Model::Flat => "flat",
        }
    }
}

/// The virtual cluster: node-1, node-2, the VNet peer, the router and the external host.
pub struct TestBed {
    pub prefix: String,
    pub model: Model,
    /// kubenet's shape ([`TestBed::kubenet`]): pods on a `cbr0` bridge instead of routed veths.
    pub bridge: bool,
    /// node-1, the node under test.
    pub node_ns: String,
    pub node2_ns: String,
    /// The VNet peer host ([`PEER_IP`]).
    pub peer_ns: String,
    /// The router; the VNet bridge lives here.
    pub router_ns: String,
    pub ext_ns: String,
    /// node-1's pods.
    pub pods: Vec<Pod>,
    /// node-2's pods ([`TestBed::add_remote_pod`]).
    pub remote_pods: Vec<Pod>,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    children: Vec<Child>,
    pin_dirs: Vec<PathBuf>,
    /// Extra labels per Kubernetes namespace, written into the cluster YAML.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Services, programmed on both nodes as kube-proxy programs them ([`TestBed::add_service`]).
    pub services: Vec<Service>,
    /// hostNetwork pods on node-1: (namespace, name, labels). They carry the node's addresses
    /// and run in its namespace.
    pub host_network_pods: Vec<(String, String, BTreeMap<String, String>)>,
}

/// A ClusterIP Service of the virtual cluster, one port, backed by pods.
#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub target_port: u16,
    /// "TCP", "UDP" or "SCTP".
    pub protocol: String,
    /// Backend pod names.
    pub backends: Vec<String>,
    /// Also reached on every node's addresses at this port (`type: NodePort`,
    /// `externalTrafficPolicy: Cluster`: kube-proxy masquerades such traffic to the node).
    pub node_port: Option<u16>,
}

/// Runs whitespace-separated commands (no argument contains a space) in a namespace. A bed
/// takes some sixty of them, so the two kinds it uses most skip `ip netns exec`: `ip` enters
/// the namespace itself (`ip -n`), and `sysctl -qw` becomes a write under /proc/sys from a
/// thread inside the namespace (which /proc/sys/net follows).
fn ns_cmds(ns: &str, cmds: &[&str]) -> Result<()> {
    for c in cmds {
        let args: Vec<&str> = c.split_whitespace().collect();
        match args.as_slice() {
            ["ip", rest @ ..] => {
                let mut v = vec!["ip", "-n", ns];
                v.extend_from_slice(rest);
                run(&v)?;
            }
            ["sysctl", "-qw", setting] => {
                let (key, value) = setting.split_once('=').context("sysctl key=value")?;
                let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                let value = value.to_string();
                in_netns(ns, move || {
                    std::fs::write(&path, value)
                        .with_context(|| format!("writing {}", path.display()))
                })??;
            }
            _ => {
                ns_run(ns, &args)?;
            }
        }
    }
    Ok(())
}

impl TestBed {
    /// The overlay model (kubenet, Azure CNI Overlay) with no pods yet.
    pub fn overlay(tag: &str) -> Result<Self> {
        Self::new(tag, Model::Overlay)
    }

    /// The flat model (Azure CNI) with no pods yet.
    pub fn flat(tag: &str) -> Result<Self> {
        Self::new(tag, Model::Flat)
    }

    /// The overlay model in kubenet's shape: each node's pods on a Linux bridge `cbr0` whose
    /// address (the pod CIDR's first) is their gateway, same-node pod traffic bridged, and
    /// `br_netfilter` on so kube-proxy's rules see bridged packets.
    pub fn kubenet(tag: &str) -> Result<Self> {
        Self::build_new(tag, Model::Overlay, true)
    }

    /// Builds both nodes, the VNet, its peer host, the router and the external host.
    pub fn new(tag: &str, model: Model) -> Result<Self> {
        Self::build_new(tag, model, false)
    }

    fn build_new(tag: &str, model: Model, bridge: bool) -> Result<Self> {
        ensure_root()?;
        let prefix = unique_prefix(tag);
        let dir = std::env::temp_dir().join(format!("observer-{prefix}"));
        std::fs::create_dir_all(dir.join("cluster"))?;
        let mut bed = TestBed {
            model,
            bridge,
            node_ns: format!("{prefix}-node"),
            node2_ns: format!("{prefix}-node2"),
            peer_ns: format!("{prefix}-peer"),
            router_ns: format!("{prefix}-rtr"),
            ext_ns: format!("{prefix}-ext"),
            prefix,
            pods: Vec::new(),
            remote_pods: Vec::new(),
            dir,
            namespaces: Vec::new(),
            children: Vec::new(),
            pin_dirs: Vec::new(),
            namespace_labels: BTreeMap::new(),
            services: Vec::new(),
            host_network_pods: Vec::new(),
        };
        bed.build().context("building the virtual cluster")?;
        bed.write_cluster()?;
        Ok(bed)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        run(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_string());
        // No duplicate address detection on the interfaces to come: while their link-local
        // addresses are tentative (about a second), first IPv6 packets get lost in neighbour
        // discovery and TCP waits a retransmission timeout.
        ns_cmds(
            name,
            &[
                "sysctl -qw net.ipv6.conf.all.accept_dad=0",
                "sysctl -qw net.ipv6.conf.default.accept_dad=0",
                "ip link set lo up",
            ],
        )?;
        Ok(())
    }

    /// 1 for node-1's namespace, 2 for node-2's.
    fn node_number(&self, node_ns: &str) -> Result<u8> {
        if node_ns == self.node_ns {
            Ok(1)
        } else if node_ns == self.node2_ns {
            Ok(2)
        } else {
            bail!("{node_ns} is not a node of test bed {}", self.prefix)
        }
    }

    /// The address ranges node `node` (1 or 2) gives its pods, IPv4 then IPv6: its pod CIDRs
    /// in the overlay model, its slice of the VNet in the flat model.
    pub fn pod_cidrs(&self, node: u8) -> [String; 2] {
        match self.model {
            Model::Overlay => [
                format!("10.244.{node}.0/24"),
                format!("fd00:10:244:{node}::/64"),
            ],
            Model::Flat => [
                format!("10.224.{node}.0/24"),
                format!("fd00:224::{node}:0/112"),
            ],
        }
    }

    /// The cluster-wide pod CIDRs: overlay only; flat pods are VNet addresses.
    pub fn cluster_cidrs(&self) -> Vec<&'static str> {
        match self.model {
            Model::Overlay => vec![CLUSTER_CIDR, CLUSTER_CIDR6],
            Model::Flat => Vec::new(),
        }
    }

    /// Daemon flags describing this bed's model, for callers to pass to `start_daemon`.
    pub fn model_args(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--network-model".into(),
            self.model.as_str().into(),
            "--vnet-cidr".into(),
            VNET_CIDR.into(),
            "--vnet-cidr".into(),
            VNET_CIDR6.into(),
        ];
        for c in self.cluster_cidrs() {
            v.extend(["--cluster-cidr".into(), c.into()]);
        }
        v
    }

    fn build(&mut self) -> Result<()> {
        let (node, node2, peer, rtr, ext) = (
            self.node_ns.clone(),
            self.node2_ns.clone(),
            self.peer_ns.clone(),
            self.router_ns.clone(),
            self.ext_ns.clone(),
        );
        for ns in [&node, &node2, &peer, &rtr, &ext] {
            self.add_ns(ns)?;
        }
        // The VNet: one broadcast domain like Azure's, so hosts and nodes reach each other
        // (and, in the flat model, pod IPs) on-link. Snooping off: proxied pod addresses have
        // no listener for their solicited-node groups, their solicitations must be flooded.
        ns_cmds(
            &rtr,
            &[
                "ip link add vnet type bridge forward_delay 0 mcast_snooping 0",
                "ip addr add 10.224.0.1/16 dev vnet",
                "ip addr add fd00:224::1/64 dev vnet nodad",
                "ip link set vnet up",
            ],
        )?;
        for (ns, port, ip4, ip6) in [
            (&node, "vn-node1", NODE_IP, NODE_IP6),
            (&node2, "vn-node2", NODE2_IP, NODE2_IP6),
            (&peer, "vn-peer", PEER_IP, PEER_IP6),
        ] {
            run(&[
                "ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                "netns", &rtr,
            ])?;
            ns_cmds(&rtr, &[&format!("ip link set {port} master vnet up")])?;
            ns_cmds(
                ns,
                &[
                    &format!("ip addr add {ip4}/16 dev eth0"),
                    &format!("ip addr add {ip6}/64 dev eth0 nodad"),
                    "ip link set eth0 up",
                    "ip route add default via 10.224.0.1",
                    "ip -6 route add default via fd00:224::1",
                ],
            )?;
        }
        // WAN link: router wan0 <-> external host eth0.
        run(&[
            "ip", "-n", &rtr, "link", "add", "wan0", "type", "veth", "peer", "name", "eth0",
            "netns", &ext,
        ])?;
        ns_cmds(
            &rtr,
            &[
                "ip addr add 203.0.113.1/24 dev wan0",
                "ip addr add 2001:db8:113::1/64 dev wan0 nodad",
                "ip link set wan0 up",
            ],
        )?;
        ns_cmds(
            &ext,
            &[
                "ip addr add 203.0.113.10/24 dev eth0",
                "ip addr add 2001:db8:113::10/64 dev eth0 nodad",
                "ip link set eth0 up",
                "ip route add default via 203.0.113.1",
                "ip -6 route add default via 2001:db8:113::1",
            ],
        )?;
        for ns in [&node, &node2, &rtr] {
            ns_cmds(
                ns,
                &[
                    "sysctl -qw net.ipv4.ip_forward=1",
                    "sysctl -qw net.ipv6.conf.all.forwarding=1",
                ],
            )?;
        }
        match self.model {
            Model::Overlay => {
                // kubenet-style user-defined routes: the VNet routes each node's pod CIDR to it,
                // and the nodes reach each other's pods directly.
                ns_cmds(
                    &rtr,
                    &[
                        "ip route add 10.244.1.0/24 via 10.224.0.4",
                        "ip route add 10.244.2.0/24 via 10.224.0.5",
                        "ip -6 route add fd00:10:244:1::/64 via fd00:224::4",
                        "ip -6 route add fd00:10:244:2::/64 via fd00:224::5",
                    ],
                )?;
                ns_cmds(
                    &node,
                    &[
                        "ip route add 10.244.2.0/24 via 10.224.0.5",
                        "ip -6 route add fd00:10:244:2::/64 via fd00:224::5",
                    ],
                )?;
                ns_cmds(
                    &node2,
                    &[
                        "ip route add 10.244.1.0/24 via 10.224.0.4",
                        "ip -6 route add fd00:10:244:1::/64 via fd00:224::4",
                    ],
                )?;
            }
            Model::Flat => {
                // Pod IPs are VNet addresses behind the node: the node's eth0 answers ARP and
                // NDP for them (proxy ARP works from the /32 routes, proxy NDP needs an entry per
                // pod, added with the pod), and answers at once rather than after up to 0.8 s.
                for ns in [&node, &node2] {
                    ns_cmds(
                        ns,
                        &[
                            "sysctl -qw net.ipv4.conf.eth0.proxy_arp=1",
                            "sysctl -qw net.ipv4.neigh.eth0.proxy_delay=0",
                            "sysctl -qw net.ipv6.conf.all.proxy_ndp=1",
                            "sysctl -qw net.ipv6.neigh.eth0.proxy_delay=0",
                        ],
                    )?;
                }
            }
        }
        for ns in [&node, &node2] {
            nft(ns, &self.masquerade_rules(self.node_number(ns)?))?;
        }
        if self.bridge {
            for (ns, n) in [(&node, 1u8), (&node2, 2)] {
                ns_cmds(
                    ns,
                    &[
                        "ip link add cbr0 type bridge forward_delay 0 mcast_snooping 0",
                        &format!("ip addr add 10.244.{n}.1/24 dev cbr0"),
                        &format!("ip addr add fd00:10:244:{n}::1/64 dev cbr0 nodad"),
                        "ip link set cbr0 up",
                        "sysctl -qw net.bridge.bridge-nf-call-iptables=1",
                        "sysctl -qw net.bridge.bridge-nf-call-ip6tables=1",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// The SNAT the model puts on node `node`.
    fn masquerade_rules(&self, node: u8) -> String {
        let (src4, src6, keep4, keep6) = match self.model {
            // Leaving the cluster CIDRs: towards the VNet and beyond.
            Model::Overlay => (
                CLUSTER_CIDR.to_string(),
                CLUSTER_CIDR6.to_string(),
                CLUSTER_CIDR,
                CLUSTER_CIDR6,
            ),
            // Leaving the VNet only; the node's own traffic already has its address.
            Model::Flat => {
                let [p4, p6] = self.pod_cidrs(node);
                (p4, p6, VNET_CIDR, VNET_CIDR6)
            }
        };
        format!(
            "table ip observer_testbed {{\n  chain post {{\n    type nat hook postrouting priority srcnat;\n    \
             ip saddr {src4} ip daddr != {keep4} oifname \"eth0\" masquerade\n  }}\n}}\n\
             table ip6 observer_testbed {{\n  chain post {{\n    type nat hook postrouting priority srcnat;\n    \
             ip6 saddr {src6} ip6 daddr != {keep6} oifname \"eth0\" masquerade\n  }}\n}}\n"
        )
    }

    /// Misconfiguration: also MASQUERADE `node_ns`'s pod traffic towards `dst_cidr` (IPv4 or
    /// IPv6), where the model keeps the pod IP (e.g. the VNet peer in the flat model).
    pub fn add_wrong_masquerade(&self, node_ns: &str, dst_cidr: &str) -> Result<()> {
        let [p4, p6] = self.pod_cidrs(self.node_number(node_ns)?);
        let (family, src) = if dst_cidr.contains(':') {
            ("ip6", p6)
        } else {
            ("ip", p4)
        };
        // Inserted first: the model's rule never matches these destinations anyway, but a
        // wrong rule should win wherever both could.
        nft(
            node_ns,
            &format!(
                "insert rule {family} observer_testbed post {family} saddr {src} {family} daddr {dst_cidr} oifname \"eth0\" masquerade\n"
            ),
        )
    }

    /// Misconfiguration: drop every MASQUERADE rule of `node_ns` (the model's and wrong ones),
    /// so pod IPs leave un-translated ("missing SNAT"). The tables stay, so
    /// [`TestBed::add_wrong_masquerade`] still works afterwards.
    pub fn remove_masquerade(&self, node_ns: &str) -> Result<()> {
        self.node_number(node_ns)?;
        nft(
            node_ns,
            "flush chain ip observer_testbed post\nflush chain ip6 observer_testbed post\n",
        )
    }

    /// Pods in `namespace` on node-1 with one label each, `app=<app>`, and no container ports.
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

    /// Adds a pod on node-1: its namespace, a veth pair, addresses and routes. Returns its
    /// index in [`TestBed::pods`].
    pub fn add_pod(&mut self, spec: PodSpec<'_>) -> Result<usize> {
        let idx = self.pods.len();
        let pod = self.make_pod(1, idx, spec)?;
        self.pods.push(pod);
        self.write_cluster()?;
        Ok(idx)
    }

    /// An overlay bed with two pods of namespace `x` on node-1, labelled `pod=<name>`: `a`, a
    /// client, and `b`, serving TCP `port`.
    pub fn client_and_server(tag: &str, port: u16) -> Result<Self> {
        let mut bed = Self::overlay(tag)?;
        let serving = [("serve", port, "TCP")];
        for (name, ports) in [("a", &[][..]), ("b", &serving[..])] {
            bed.add_pod(PodSpec {
                namespace: "x",
                name,
                labels: &[("pod", name)],
                ports,
            })?;
        }
        Ok(bed)
    }

    /// Adds a pod on node-2 like [`TestBed::add_pod`]. Returns its index in
    /// [`TestBed::remote_pods`].
    pub fn add_remote_pod(&mut self, spec: PodSpec<'_>) -> Result<usize> {
        let idx = self.remote_pods.len();
        let pod = self.make_pod(2, idx, spec)?;
        self.remote_pods.push(pod);
        self.write_cluster()?;
        Ok(idx)
    }

    fn make_pod(&mut self, node: u8, idx: usize, spec: PodSpec<'_>) -> Result<Pod> {
        let (netns, node_ns, node_name) = match node {
            1 => (
                format!("{}-p{idx}", self.prefix),
                self.node_ns.clone(),
                NODE_NAME,
            ),
            _ => (
                format!("{}-r{idx}", self.prefix),
                self.node2_ns.clone(),
                NODE2_NAME,
            ),
        };
        self.add_ns(&netns)?;
        let host_if = format!("lxc{idx}");
        let host = u8::try_from(idx + 10).context("too many pods on one node")?;
        let (ip4, ip6): (IpAddr, IpAddr) = match self.model {
            Model::Overlay => (
                format!("10.244.{node}.{host}").parse()?,
                format!("fd00:10:244:{node}::{host:x}").parse()?,
            ),
            Model::Flat => (
                format!("10.224.{node}.{host}").parse()?,
                format!("fd00:224::{node}:{host:x}").parse()?,
            ),
        };
        run(&[
            "ip", "-n", &node_ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ])?;
        if self.bridge {
            // kubenet: a bridge port; the pod is on-link with its node's other pods.
            ns_cmds(
                &netns,
                &[
                    &format!("ip addr add {ip4}/24 dev eth0"),
                    &format!("ip addr add {ip6}/64 dev eth0 nodad"),
                    "ip link set eth0 up",
                    &format!("ip route add default via 10.244.{node}.1"),
                    &format!("ip -6 route add default via fd00:10:244:{node}::1"),
                ],
            )?;
            ns_cmds(
                &node_ns,
                &[
                    &format!("ip link set {host_if} master cbr0"),
                    &format!("ip link set {host_if} type bridge_slave hairpin on"),
                    &format!("ip link set {host_if} up"),
                ],
            )?;
        } else {
            self.routed_pod(&netns, &node_ns, &host_if, ip4, ip6)?;
        }
        Ok(Pod {
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
            node: node_name.into(),
            host_if,
            ip4,
            ip6,
        })
    }

    /// Adds a Service with the ClusterIP `cluster_ip` and programs it on both nodes as
    /// kube-proxy does: nftables DNAT of the ClusterIP and port to one of the backends (chosen
    /// at random per connection) in PREROUTING (pod traffic) and OUTPUT (the node's own), and a
    /// masquerade for hairpin (a backend reaching itself through its Service). Writes the
    /// Service and its EndpointSlice into the cluster YAML.
    pub fn add_service(&mut self, svc: Service) -> Result<()> {
        let backends: Vec<IpAddr> = svc
            .backends
            .iter()
            .map(|b| self.pod(b))
            .map(|p| {
                if svc.cluster_ip.is_ipv4() {
                    p.ip4
                } else {
                    p.ip6
                }
            })
            .collect();
        let (fam, l4) = (
            if svc.cluster_ip.is_ipv4() {
                "ip"
            } else {
                "ip6"
            },
            svc.protocol.to_lowercase(),
        );
        let idx = self.services.len();
        let map: Vec<String> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{i} : {b}"))
            .collect();
        let target = if backends.len() == 1 {
            format!("{}", backends[0])
        } else {
            format!(
                "numgen random mod {} map {{ {} }}",
                backends.len(),
                map.join(", ")
            )
        };
        // nft writes an IPv6 address with a port in brackets.
        let dest = match backends.as_slice() {
            [b @ IpAddr::V6(_)] => format!("[{b}]:{}", svc.target_port),
            _ => format!("{target} : {}", svc.target_port),
        };
        let dnat = format!(
            "{fam} daddr {} {l4} dport {} dnat to {dest};",
            svc.cluster_ip, svc.port
        );
        let mut rules = format!(
            "table {fam} kube_proxy_{idx} {{\n\
             \x20 chain pre {{ type nat hook prerouting priority dstnat; {dnat} }}\n\
             \x20 chain out {{ type nat hook output priority -100; {dnat} }}\n\
             \x20 chain post {{ type nat hook postrouting priority srcnat;"
        );
        for b in &backends {
            let _ = write!(rules, " {fam} saddr {b} {fam} daddr {b} masquerade;");
        }
        if let Some(np) = svc.node_port {
            // As kube-proxy's KUBE-NODEPORTS and KUBE-MARK-MASQ: DNAT on any local address,
            // then masquerade what carries its 0x4000 mark, to a random port as kube-proxy's
            // `MASQUERADE --random-fully` does (its default): the client's port is not kept.
            rules.push_str(" meta mark & 0x4000 == 0x4000 masquerade fully-random;");
            let _ = write!(
                rules,
                " }}\n  chain nodeports {{ type nat hook prerouting priority dstnat + 1; \
                 fib daddr type local {l4} dport {np} meta mark set meta mark | 0x4000 \
                 dnat to {dest};",
            );
        }
        rules.push_str(" }\n}\n");
        for ns in [self.node_ns.clone(), self.node2_ns.clone()] {
            nft(&ns, &rules)?;
        }
        self.services.push(svc);
        self.write_cluster()
    }

    /// Routed veths (the Azure CNI and CNI Overlay shape): a /32 per pod behind proxy ARP.
    fn routed_pod(
        &self,
        netns: &str,
        node_ns: &str,
        host_if: &str,
        ip4: IpAddr,
        ip6: IpAddr,
    ) -> Result<()> {
        ns_cmds(
            netns,
            &[
                &format!("ip addr add {ip4}/32 dev eth0"),
                &format!("ip addr add {ip6}/128 dev eth0 nodad"),
                "ip link set eth0 up",
                "ip route add 169.254.1.1 dev eth0 scope link",
                "ip route add default via 169.254.1.1 dev eth0",
                "ip -6 route add default via fe80::1 dev eth0",
            ],
        )?;
        ns_cmds(
            node_ns,
            &[
                &format!("ip addr add fe80::1/64 dev {host_if} nodad"),
                &format!("ip link set {host_if} up"),
                &format!("sysctl -qw net.ipv4.conf.{host_if}.proxy_arp=1"),
                // Proxy ARP answers after up to 0.8 s by default; pods should not wait on the
                // node.
                &format!("sysctl -qw net.ipv4.neigh.{host_if}.proxy_delay=0"),
                &format!("ip route add {ip4} dev {host_if}"),
                &format!("ip -6 route add {ip6} dev {host_if}"),
            ],
        )?;
        if self.model == Model::Flat {
            // Unlike proxy ARP, proxy NDP answers only for addresses listed one by one.
            ns_cmds(node_ns, &[&format!("ip -6 neigh add proxy {ip6} dev eth0")])?;
        }
        Ok(())
    }

    /// The pod named `name` on either node.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .chain(&self.remote_pods)
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The node-2 pod named `name`.
    pub fn remote_pod(&self, name: &str) -> &Pod {
        self.remote_pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} on {NODE2_NAME}"))
    }

    /// Folder of Kubernetes YAML describing the nodes and their pods (`--source dir:`).
    pub fn cluster_dir(&self) -> PathBuf {
        self.dir.join("cluster")
    }

    /// Rewrites the cluster YAML from the pods added so far.
    pub fn write_cluster(&self) -> Result<()> {
        let all_pods = || self.pods.iter().chain(&self.remote_pods);
        let mut y = String::new();
        let mut namespaces: Vec<&str> = all_pods().map(|p| p.namespace.as_str()).collect();
        namespaces.sort();
        namespaces.dedup();
        for ns in namespaces {
            let _ = write!(y, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    kubernetes.io/metadata.name: {ns}\n");
            for (k, v) in self.namespace_labels.get(ns).into_iter().flatten() {
                let _ = writeln!(y, "    {k}: \"{v}\"");
            }
            y.push_str("---\n");
        }
        for (n, name, ip4, ip6) in [
            (1u8, NODE_NAME, NODE_IP, NODE_IP6),
            (2, NODE2_NAME, NODE2_IP, NODE2_IP6),
        ] {
            let _ = write!(y, "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n");
            // Azure CNI (flat) allocates pod IPs from the VNet subnet: no podCIDR on the Node.
            if self.model == Model::Overlay {
                let [c4, c6] = self.pod_cidrs(n);
                let _ = write!(y, "spec:\n  podCIDR: {c4}\n  podCIDRs: [{c4}, \"{c6}\"]\n");
            }
            let _ = write!(
                y,
                "status:\n  addresses:\n  - {{type: InternalIP, address: {ip4}}}\n  - {{type: InternalIP, address: \"{ip6}\"}}\n---\n"
            );
        }
        for p in all_pods() {
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
            let _ = write!(
                y,
                "spec:\n  nodeName: {}\n  containers:\n  - name: main\n    image: example\n",
                p.node
            );
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
        for (ns, name, labels) in &self.host_network_pods {
            let _ = write!(y, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n");
            for (k, v) in labels {
                let _ = writeln!(y, "    {k}: \"{v}\"");
            }
            let _ = write!(
                y,
                "spec:\n  nodeName: {NODE_NAME}\n  hostNetwork: true\n  containers:\n  - {{name: main, image: example}}\n\
                 status:\n  phase: Running\n  podIP: {NODE_IP}\n  podIPs: [{{ip: {NODE_IP}}}, {{ip: \"{NODE_IP6}\"}}]\n---\n"
            );
        }
        for svc in &self.services {
            let _ = write!(
                y,
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {n}\n  namespace: {ns}\nspec:\n  type: {ty}\n  clusterIP: \"{ip}\"\n  clusterIPs: [\"{ip}\"]\n  ports:\n  - {{port: {p}, targetPort: {tp}, protocol: {pr}{np}}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {n}-1\n  namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {n}\naddressType: {at}\nports:\n- {{port: {tp}, protocol: {pr}}}\nendpoints:\n",
                n = svc.name,
                ns = svc.namespace,
                ip = svc.cluster_ip,
                p = svc.port,
                tp = svc.target_port,
                pr = svc.protocol,
                at = if svc.cluster_ip.is_ipv4() { "IPv4" } else { "IPv6" },
                ty = if svc.node_port.is_some() { "NodePort" } else { "ClusterIP" },
                np = svc.node_port.map(|n| format!(", nodePort: {n}")).unwrap_or_default(),
            );
            for b in &svc.backends {
                let p = self.pod(b);
                let ip = if svc.cluster_ip.is_ipv4() {
                    p.ip4
                } else {
                    p.ip6
                };
                let _ = writeln!(
                    y,
                    "- {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}"
                );
            }
            y.push_str("---\n");
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
            bin: observer_bin.to_path_buf(),
            socket,
            log,
            pin_dir,
        };
        d.wait_ready(ready_timeout(), self.pods.len())?;
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
    /// The `observer` binary it runs, for the CLI.
    pub bin: PathBuf,
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
    /// `/v1/status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/v1/status").expect("GET /v1/status")).expect("status JSON")
    }

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

    /// The whole flow history, as `observer flows -o json` prints it (the gRPC flow API).
    pub fn flows(&self) -> Result<Vec<serde_json::Value>> {
        let out = Command::new(&self.bin)
            .args(["flows", "-o", "json", "--socket"])
            .arg(&self.socket)
            .output()
            .context("running observer flows")?;
        if !out.status.success() {
            bail!("observer flows: {}", String::from_utf8_lossy(&out.stderr));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).context("parsing JSON line"))
            .collect()
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

/// Root, on a machine prepared as a node is: bpffs mounted on /sys/fs/bpf (systemd does it on
/// AKS and kind nodes; `cargo xtask setup` does it here). Every privileged test starts here, so
/// none depends on an earlier one, or a daemon with CAP_SYS_ADMIN, having mounted it.
/// How long a daemon may take to load, verify and attach: 20 s, or
/// `OBSERVER_TEST_READY_SECS` (a guest kernel under software emulation verifies slowly).
pub fn ready_timeout() -> Duration {
    std::env::var("OBSERVER_TEST_READY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(20), Duration::from_secs)
}

/// How much longer a handshake may take than on real hardware: 3 in the qemu guest under
/// software emulation (`OBSERVER_TEST_SLOW`, set by `xtask::vm`), where a vCPU busy in the
/// verifier (a daemon loading its programs takes tens of seconds there) can hold a SYN back
/// past a second; 1 elsewhere. The clsact restart tests also run on this machine's kernel
/// with the strict timeout.
pub fn slow_factor() -> u32 {
    if std::env::var_os("OBSERVER_TEST_SLOW").is_some() {
        3
    } else {
        1
    }
}

pub fn ensure_root() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the virtual node needs root (network namespaces, eBPF)");
    }
    mount_bpffs()
}

/// Mounts bpffs on /sys/fs/bpf unless it is mounted already.
pub fn mount_bpffs() -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if is_bpffs(root) {
        return Ok(());
    }
    std::fs::create_dir_all(root).ok();
    eprintln!("mounting bpffs on /sys/fs/bpf");
    let st = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("running mount")?;
    if !st.success() && !is_bpffs(root) {
        bail!("mounting bpffs on /sys/fs/bpf failed");
    }
    Ok(())
}

fn is_bpffs(p: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
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

/// A small real DNS: A-record queries over UDP, as a pod's resolver sends them.
pub mod dns {
    use std::{
        collections::HashMap,
        net::{Ipv4Addr, SocketAddr, UdpSocket},
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc,
        },
        time::Duration,
    };

    /// The query name of a DNS message (labels from offset 12), lower-cased.
    fn qname(msg: &[u8]) -> Option<(String, usize)> {
        let mut i = 12;
        let mut labels = Vec::new();
        loop {
            let n = *msg.get(i)? as usize;
            i += 1;
            if n == 0 {
                break;
            }
            labels.push(String::from_utf8_lossy(msg.get(i..i + n)?).to_lowercase());
            i += n;
        }
        Some((labels.join("."), i))
    }

    /// Answers A queries for `names` on UDP port 53 of `ns` until `stop`; NXDOMAIN otherwise.
    pub fn serve(
        ns: &str,
        names: HashMap<String, Ipv4Addr>,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let sock = super::in_netns(ns, || UdpSocket::bind(("::", 53)).unwrap()).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let q = &buf[..n];
                let Some((name, end)) = qname(q) else {
                    continue;
                };
                let question = &q[12..end + 4];
                let mut r = Vec::with_capacity(64);
                r.extend_from_slice(&q[..2]); // id
                let hit = names.get(&name);
                r.extend_from_slice(&[0x81, if hit.is_some() { 0x80 } else { 0x83 }]);
                r.extend_from_slice(&[0, 1, 0, u8::from(hit.is_some()), 0, 0, 0, 0]);
                r.extend_from_slice(question);
                if let Some(ip) = hit {
                    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
                    r.extend_from_slice(&ip.octets());
                }
                let _ = sock.send_to(&r, from);
            }
        })
    }

    /// Resolves `name` (an A record) through `server` from inside `ns`, as a stub resolver:
    /// one query, one answer within `timeout`.
    pub fn resolve(
        ns: &str,
        server: SocketAddr,
        name: &str,
        timeout: Duration,
    ) -> Option<Ipv4Addr> {
        let name = name.to_string();
        super::in_netns(ns, move || {
            let sock = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
            sock.set_read_timeout(Some(timeout)).ok()?;
            let id: u16 = rand_id();
            let mut q = Vec::with_capacity(64);
            q.extend_from_slice(&id.to_be_bytes());
            q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
            for l in name.split('.') {
                q.push(l.len() as u8);
                q.extend_from_slice(l.as_bytes());
            }
            q.extend_from_slice(&[0, 0, 1, 0, 1]);
            sock.send_to(&q, server).ok()?;
            let mut buf = [0u8; 512];
            let (n, _) = sock.recv_from(&mut buf).ok()?;
            let r = &buf[..n];
            if n < 12 || r[..2] != id.to_be_bytes() || r[3] & 0x0f != 0 || r[7] == 0 {
                return None;
            }
            let a = r.get(n - 4..n)?;
            Some(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
        })
        .ok()
        .flatten()
    }

    fn rand_id() -> u16 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (t.subsec_nanos() ^ std::process::id()) as u16
    }
}
