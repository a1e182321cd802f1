//! `cargo xtask cluster up|down|status`: a real two-node Kubernetes cluster inside network
//! namespaces, for the cluster end-to-end tests and for trying observer as its users run it.
//!
//! Shape (docs/cluster.md): a router namespace holds the "VNet" bridge; each node is a network
//! namespace with uplink `eth0` plus a mount namespace of its own (held by a sleeping process)
//! where its containerd, kubelet and kube-proxy run, with their own /run, bpffs, /var/lib paths
//! and a cgroup tree of their own. The control plane runs on node 1. Nothing is added to the
//! root network namespace; `down` removes every process, namespace, cgroup and file.
pub mod binaries;
pub mod control_plane;
pub mod images;
pub mod layout;
pub mod node;
pub mod pki;
pub mod proc;
pub mod topology;

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

pub use layout::{Cni, Layout, ProxyMode};

/// Options of `cargo xtask cluster up`.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub cni: Cni,
    pub proxy: ProxyMode,
    /// Deploy observer from `manifests/` once the nodes are Ready.
    pub observer: bool,
}

/// Brings the cluster up, idempotently: a cluster already up with the same shape is kept
/// (its observer image refreshed), anything half-made is torn down first.
pub fn up(opts: &UpOptions) -> Result<Layout> {
    let started = Instant::now();
    let layout = Layout::new(opts.cni, opts.proxy, binaries::ensure()?);
    if layout.is_up()? {
        eprintln!("cluster: already up ({})", layout.state.display());
    } else {
        // A previous run that died half-way leaves pieces; never build on top of them.
        down_quiet(&layout)?;
        create(&layout).inspect_err(|_| {
            eprintln!(
                "cluster: bring-up failed; logs are in {}",
                layout.log_dir().display()
            );
        })?;
    }
    let imgs = images::build_all(&layout.cache.join("images"), &crate::observer_bin())?;
    for n in layout.nodes() {
        node::import_images(&layout, n, &imgs)?;
    }
    node::deploy_dns(&layout)?;
    if opts.observer {
        node::deploy_observer(&layout)?;
    }
    eprintln!(
        "cluster: up in {:.1}s; kubectl: {}",
        started.elapsed().as_secs_f64(),
        layout.kubectl_hint()
    );
    Ok(layout)
}

fn create(layout: &Layout) -> Result<()> {
    std::fs::create_dir_all(layout.log_dir())?;
    pki::create(layout)?;
    topology::create(layout)?;
    control_plane::start(layout)?;
    node::register(layout)?;
    for n in layout.nodes() {
        node::start(layout, n)?;
    }
    wait_for("both nodes Ready", Duration::from_secs(90), || {
        proc::all_alive(layout)?;
        let out = layout.kubectl_out(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status} {end}",
        ])?;
        Ok(layout
            .nodes()
            .iter()
            .all(|n| out.contains(&format!("{}=True", n.name))))
    })?;
    layout.mark_up()?;
    Ok(())
}

/// Tears everything down: processes, namespaces, cgroups, state (the binary and image cache
/// stays).
pub fn down() -> Result<()> {
    let layout = Layout::new(Cni::Bridge, ProxyMode::Iptables, Default::default());
    down_quiet(&layout)?;
    eprintln!("cluster: down");
    Ok(())
}

fn down_quiet(layout: &Layout) -> Result<()> {
    proc::kill_cluster(layout)?;
    topology::destroy(layout)?;
    if layout.state.exists() {
        std::fs::remove_dir_all(&layout.state)
            .with_context(|| format!("removing {}", layout.state.display()))?;
    }
    Ok(())
}

/// Keeps the components' logs (and the cluster's last state) where `down` will not remove
/// them: for a failed test run.
pub fn save_logs(dest: &std::path::Path) {
    let layout = Layout::new(Cni::Bridge, ProxyMode::Iptables, Default::default());
    let _ = std::fs::remove_dir_all(dest);
    let _ = std::fs::create_dir_all(dest);
    if let Ok(out) = layout.kubectl_out(&[
        "get",
        "nodes,pods,services,networkpolicies",
        "-A",
        "-o",
        "wide",
    ]) {
        let _ = std::fs::write(dest.join("cluster.txt"), out);
    }
    // The pods' own logs: observer's above all.
    for ns in ["observer", "kube-system"] {
        let pods = layout
            .kubectl_out(&[
                "-n",
                ns,
                "get",
                "pods",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ])
            .unwrap_or_default();
        for pod in pods.split_whitespace() {
            if let Ok(log) = layout.kubectl_out(&["-n", ns, "logs", pod]) {
                let _ = std::fs::write(dest.join(format!("pod-{ns}-{pod}.log")), log);
            }
        }
    }
    for e in std::fs::read_dir(layout.log_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::copy(e.path(), dest.join(e.file_name()));
    }
    eprintln!("cluster: logs kept in {}", dest.display());
}

/// What runs, per node, and the cluster's own view of it.
pub fn status() -> Result<()> {
    let layout = Layout::new(Cni::Bridge, ProxyMode::Iptables, Default::default());
    if !layout.is_up()? {
        println!("cluster: down");
        return Ok(());
    }
    let layout = Layout::load()?;
    println!(
        "cluster: up ({}); kubectl: {}",
        layout.state.display(),
        layout.kubectl_hint()
    );
    for (name, alive) in proc::components(&layout) {
        println!(
            "  {name:<28} {}",
            if alive { "running" } else { "NOT RUNNING" }
        );
    }
    let out = layout.kubectl_out(&["get", "nodes,pods", "-A", "-o", "wide"])?;
    println!("{out}");
    Ok(())
}

/// Polls `f` every 250 ms until it says yes; the error names what was awaited.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if Instant::now() > deadline {
            match last {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
