//! Network namespaces (router with the VNet bridge, one per node) and each node's mount
//! namespace with its private /run, sysfs, bpffs and /var/lib directories.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::layout::{Layout, Node};
use observer_tests::cluster::{PREFIX, ROUTER_IP};

fn ip(args: &[&str]) -> Result<()> {
    observer_tests::run(&[&["ip"], args].concat()).map(|_| ())
}

fn ns_sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    observer_tests::ns_run(ns, &["sysctl", "-qw", &format!("{key}={value}")]).map(|_| ())
}

/// The router's port for a node on the VNet bridge.
fn router_port(n: &Node) -> String {
    format!("vn-{}", n.name)
}

pub fn create(layout: &Layout) -> Result<()> {
    let router = layout.router_netns();
    ip(&["netns", "add", &router])?;
    ip(&["-n", &router, "link", "set", "lo", "up"])?;
    ip(&["-n", &router, "link", "add", "vnet0", "type", "bridge"])?;
    ip(&[
        "-n",
        &router,
        "addr",
        "add",
        &format!("{ROUTER_IP}/16"),
        "dev",
        "vnet0",
    ])?;
    ip(&["-n", &router, "link", "set", "vnet0", "up"])?;
    ns_sysctl(&router, "net.ipv4.ip_forward", "1")?;
    for n in layout.nodes() {
        ip(&["netns", "add", &n.netns])?;
        // Made from inside the router's namespace, so the pair never shows in the root one.
        ip(&[
            "-n",
            &router,
            "link",
            "add",
            &router_port(n),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &n.netns,
        ])?;
        ip(&[
            "-n",
            &router,
            "link",
            "set",
            &router_port(n),
            "master",
            "vnet0",
            "up",
        ])?;
        ip(&["-n", &n.netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &n.netns,
            "addr",
            "add",
            &format!("{}/16", n.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &n.netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &n.netns, "route", "add", "default", "via", ROUTER_IP])?;
        // The VNet's user-defined route for the node's pod range (kubenet).
        ip(&["-n", &router, "route", "add", &n.pod_cidr, "via", &n.ip])?;
        ns_sysctl(&n.netns, "net.ipv4.ip_forward", "1")?;
        // kube-proxy's DNAT must see bridged pod-to-pod packets (kubenet's cbr0).
        ns_sysctl(&n.netns, "net.bridge.bridge-nf-call-iptables", "1")?;
        ns_sysctl(&n.netns, "net.bridge.bridge-nf-call-ip6tables", "1")?;
        if layout.cni == super::layout::Cni::Bridge {
            // kubenet's bridge, made up front: the CNI plugin (1.1) racing to create it and
            // set its MAC fails the first sandboxes of a node with EINVAL. Its MAC is set, as
            // kubenet sets it: a bridge without one follows its lowest port's, so deleting
            // the pod that owned it moved the gateway's MAC under every pod of the node, and
            // their traffic through the gateway (other nodes, Services) went to the old MAC
            // until their ARP entries aged out, seconds later.
            let mac = gateway_mac(&n.pod_gateway)?;
            ip(&[
                "-n", &n.netns, "link", "add", "cbr0", "address", &mac, "type", "bridge",
            ])?;
            let gw = format!(
                "{}/{}",
                n.pod_gateway,
                n.pod_cidr.split('/').nth(1).unwrap()
            );
            ip(&["-n", &n.netns, "addr", "add", &gw, "dev", "cbr0"])?;
            ip(&["-n", &n.netns, "link", "set", "cbr0", "up"])?;
        }
        hold_mount_namespace(layout, n)?;
    }
    Ok(())
}

/// Directories of the node bound over the host's paths in its mount namespace: two kubelets
/// and two containerds share hard-coded paths.
fn binds(layout: &Layout, n: &Node) -> Vec<(std::path::PathBuf, &'static str)> {
    let d = layout.node_dir(n);
    vec![
        (d.join("kubelet"), "/var/lib/kubelet"),
        (d.join("containerd"), "/var/lib/containerd"),
        (d.join("cni"), "/var/lib/cni"),
        (d.join("cni-conf"), "/etc/cni/net.d"),
        (d.join("log"), "/var/log"),
        (layout.state.join("dns"), "/var/lib/observer-dns"),
    ]
}

/// Host-wide settings kubelet writes at start: bound over with files of the node's own.
const KERNEL_TUNABLES: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

fn hold_mount_namespace(layout: &Layout, n: &Node) -> Result<()> {
    let d = layout.node_dir(n);
    std::fs::create_dir_all(d.join("tunables"))?;
    std::fs::create_dir_all(layout.state.join("dns"))?;
    let mut script = String::from("set -e\n");
    // A sysfs of the node's network namespace, with the host's cgroup hierarchies kept.
    let cg = d.join("cgroup-hold");
    std::fs::create_dir_all(&cg)?;
    script += &format!(
        "mount --rbind /sys/fs/cgroup {cg}\nmount -t sysfs sysfs /sys\n\
         mount --rbind {cg} /sys/fs/cgroup\numount -l {cg}\n\
         mount -t bpf bpf /sys/fs/bpf\nmount -t tmpfs -o mode=755 tmpfs /run\n",
        cg = cg.display()
    );
    for (src, dst) in binds(layout, n) {
        std::fs::create_dir_all(&src)?;
        std::fs::create_dir_all(dst).with_context(|| format!("creating mount point {dst}"))?;
        script += &format!("mount --bind {} {dst}\n", src.display());
    }
    let machine_id = d.join("machine-id");
    std::fs::write(&machine_id, format!("{}\n", super::pki::random_hex()))?;
    script += &format!("mount --bind {} /etc/machine-id\n", machine_id.display());
    for t in KERNEL_TUNABLES {
        let f = d.join("tunables").join(t.replace('/', "."));
        let v = std::fs::read_to_string(format!("/proc/sys/{t}")).unwrap_or_else(|_| "0\n".into());
        std::fs::write(&f, v)?;
        script += &format!("mount --bind {} /proc/sys/{t}\n", f.display());
    }
    let ready = d.join("holder.ready");
    let _ = std::fs::remove_file(&ready);
    script += &format!(
        "mount --make-rshared /\ntouch {}\nexec sleep infinity\n",
        ready.display()
    );
    let log = std::fs::File::create(layout.log_dir().join(format!("{}-holder.log", n.name)))?;
    // nsenter, unshare and sh each exec the next: the child's PID is the holder's.
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n.netns))
        .args([
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
        ])
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the node's mount namespace holder")?;
    let pid = child.id();
    std::mem::forget(child);
    std::fs::write(d.join("holder.pid"), pid.to_string())?;
    super::wait_for(
        &format!("{}'s mount namespace", n.name),
        Duration::from_secs(10),
        || {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                bail!(
                    "the holder exited: {}",
                    std::fs::read_to_string(
                        layout.log_dir().join(format!("{}-holder.log", n.name))
                    )
                    .unwrap_or_default()
                );
            }
            Ok(ready.exists())
        },
    )
}

/// Deletes the cluster's network namespaces (after its processes are gone).
pub fn destroy(_layout: &Layout) -> Result<()> {
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{PREFIX}-")) {
            ip(&["netns", "del", &name])?;
        }
    }
    Ok(())
}

/// A locally administered unicast MAC for a node's pod gateway, from its address
/// (10.244.1.1 -> 02:00:0a:f4:01:01): fixed, and unique among the nodes.
fn gateway_mac(gateway: &str) -> Result<String> {
    let ip: std::net::Ipv4Addr = gateway
        .parse()
        .with_context(|| format!("pod gateway {gateway:?}"))?;
    let [a, b, c, d] = ip.octets();
    Ok(format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}"))
}
