//! Project tasks: `cargo xtask setup | test | demo | bench`.
mod cluster;
mod demo;
mod setup;
mod vm;

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "observer's build, test, demo and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (apt packages, bpf-linker, the eBPF toolchain).
    Setup,
    /// Setup, unit tests, then the privileged end-to-end tests on virtual nodes.
    Test {
        /// Only the unit tests.
        #[arg(long)]
        unit_only: bool,
        /// Run every end-to-end test in a qemu guest on Debian's Linux 6.1 instead of this
        /// machine's kernel (without it, the attach, restart and uplink tests run there after
        /// the suite here).
        #[arg(long, value_parser = ["6.1"])]
        kernel: Option<String>,
        /// With `--kernel`: only these end-to-end targets (e.g. `--e2e e2e_services`), to
        /// rerun a few in the guest without the whole suite.
        #[arg(long = "e2e", requires = "kernel")]
        e2e: Vec<String>,
    },
    /// Run a virtual node with example pods and traffic, and print live flows.
    Demo {
        /// Stop by itself after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// AKS network model of the virtual node: overlay (kubenet, Azure CNI Overlay: pod
        /// CIDR apart from the VNet) or flat (Azure CNI: pods take VNet addresses).
        #[arg(long, default_value = "overlay", value_parser = ["overlay", "flat"])]
        model: String,
    },
    /// A real two-node Kubernetes cluster in network namespaces (docs/cluster.md).
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Benchmarks; results belong in BENCHMARKS.md.
    Bench {
        /// What to measure: `datapath` (tc and XDP programs per packet), `policy`, `kube`,
        /// `events` (record pipeline), `snat` (NAT'd connections correlated per second),
        /// `compare` (observer against no enforcement and the peers' iptables and nftables
        /// rule shapes, real connections between pods).
        what: String,
        /// One JSON object per measurement.
        #[arg(long)]
        json: bool,
        /// Extra arguments for `observer bench <what>`; for kube, events, snat and compare
        /// `NAME=VALUE` settings (e.g. `cargo xtask bench kube -- SIZE=250k`).
        #[arg(last = true)]
        rest: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Build (or keep) the cluster, import the images, deploy DNS and observer.
    Up {
        /// How pods attach: bridge (kubenet's cbr0) or ptp (Azure CNI: per-pod routes).
        #[arg(long, default_value = "bridge", value_parser = ["bridge", "ptp"])]
        cni: String,
        /// kube-proxy's mode.
        #[arg(long, default_value = "iptables", value_parser = ["iptables", "nftables"])]
        proxy_mode: String,
        /// Leave observer out (a bare cluster).
        #[arg(long)]
        no_observer: bool,
    },
    /// Remove every process, namespace, cgroup and file of the cluster.
    Down,
    /// Components, nodes and pods.
    Status,
}

pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("+ cargo {}", args.join(" "));
    let st = Command::new(cargo).args(args).status()?;
    if !st.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn observer_bin() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug").join("observer")
}

/// End-to-end test targets of the `observer` package: `observer/tests/e2e_*.rs`.
fn e2e_targets() -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(workspace_root().join("observer/tests"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("e2e_") && n.ends_with(".rs"))
        .map(|n| n.trim_end_matches(".rs").to_string())
        .collect();
    v.sort();
    Ok(v)
}

/// The cluster end-to-end tests (`observer/tests/cluster_*.rs`) on a real two-node cluster,
/// brought up for them and torn down after, whatever the outcome. First kubenet's shape
/// (bridge, kube-proxy in iptables mode): the tests that share the cluster, then the DaemonSet
/// restart, then the uninstall. Then Azure CNI's shape (a routed veth per pod, where packets
/// between pods skip the nodes' stacks) with kube-proxy in nftables mode: the shared tests.
/// The README's `cargo xtask demo`, run as a user runs it, for a few seconds in each network
/// model: it shows live records of each kind it is there to show, no SNAT against its model,
/// stops by itself and leaves no namespace behind.
fn demo_runs() -> Result<()> {
    for model in ["overlay", "flat"] {
        let cmd = format!("cargo xtask demo --model {model} --duration 15");
        eprintln!("+ {cmd}");
        let child = Command::new(std::env::current_exe()?)
            .args(["demo", "--model", model, "--duration", "15"])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let out = child.wait_with_output()?;
        let shown = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("`{cmd}` failed ({}):\n{shown}", out.status);
        }
        for (what, mark) in [
            ("an allowed connection with its policy", " FORWARDED by "),
            ("a denied connection with its policy", " DROPPED by "),
            ("a connection through a Service", " via service "),
            ("a connection SNAT'd as the model predicts", " (expected) "),
        ] {
            if !shown.lines().any(|l| l.contains(mark)) {
                bail!("`{cmd}` showed no record of {what} ({mark:?}):\n{shown}");
            }
        }
        if let Some(l) = shown
            .lines()
            .find(|l| l.contains(" (unexpected) ") || l.contains(" (missing) "))
        {
            bail!("`{cmd}` showed an SNAT against its own model:\n{l}");
        }
        // Its virtual node's names start `obdemo{pid}-` (`observer_tests::unique_prefix`).
        let left = Command::new("ip").args(["netns", "list"]).output()?;
        let prefix = format!("obdemo{}-", pid % 100_000);
        if let Some(ns) = String::from_utf8_lossy(&left.stdout)
            .lines()
            .find(|l| l.starts_with(&prefix))
        {
            bail!("`{cmd}` left its namespace {ns} behind");
        }
    }
    Ok(())
}

fn cluster_e2e() -> Result<()> {
    if cluster::binaries::find().is_none() {
        eprintln!();
        eprintln!("==================================================================");
        eprintln!("SKIPPED: no Kubernetes binaries (set OBSERVER_K8S_BIN)");
        eprintln!("  the cluster end-to-end tests need kube-apiserver, kubelet, ... in");
        eprintln!(
            "  $OBSERVER_K8S_BIN or {}",
            cluster::binaries::shared_dir().display()
        );
        eprintln!("==================================================================");
        eprintln!();
        return Ok(());
    }
    setup::cluster()?;
    on_cluster(cluster::Cni::Bridge, cluster::ProxyMode::Iptables, || {
        shared_cluster_tests()?;
        // Each of these changes the DaemonSet: one at a time.
        cargo(&["test", "-p", "observer", "--test", "cluster_restart"])?;
        cargo(&["test", "-p", "observer", "--test", "cluster_hubble"])?;
        cargo(&["test", "-p", "observer", "--test", "cluster_uninstall"])
    })?;
    on_cluster(
        cluster::Cni::Ptp,
        cluster::ProxyMode::Nftables,
        shared_cluster_tests,
    )
}

/// The cluster tests that share one cluster, each in namespaces of its own.
fn shared_cluster_tests() -> Result<()> {
    let mut args = vec!["test", "-p", "observer"];
    for t in ["cluster_deploy", "cluster_policy", "cluster_services"] {
        args.extend(["--test", t]);
    }
    cargo(&args)
}

/// Runs `tests` on a cluster of this shape, observer deployed, and takes it down after; on a
/// failure the logs are kept in `target/cluster-logs`.
fn on_cluster(
    cni: cluster::Cni,
    proxy: cluster::ProxyMode,
    tests: impl FnOnce() -> Result<()>,
) -> Result<()> {
    eprintln!(
        "cluster: --cni {} --proxy-mode {}",
        cni.as_str(),
        proxy.as_str()
    );
    let result = cluster::up(&cluster::UpOptions {
        cni,
        proxy,
        observer: true,
    })
    .and_then(|_| tests());
    if result.is_err() {
        cluster::save_logs(&workspace_root().join("target/cluster-logs"));
    }
    cluster::down()?;
    result
}

/// The end-to-end tests `targets` in a guest on Debian's Linux 6.1.
fn on_old_kernel(targets: &[String]) -> Result<()> {
    let guest = vm::prepare()?;
    let tests = vm::build_tests(targets)?;
    vm::run_tests(&guest, &tests, &observer_bin())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    std::env::set_current_dir(workspace_root())?;
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test {
            unit_only,
            kernel,
            e2e,
        } => {
            setup::run()?;
            cargo(&[
                "test",
                "-p",
                "observer-common",
                "-p",
                "observer-tests",
                "-p",
                "xtask",
                "-p",
                "observer",
                "--lib",
                "--bins",
            ])?;
            // Unprivileged integration tests: NetworkPolicy truth tables through the reference
            // engine, the incremental compile against the full one, the matrix from an API
            // server (loopback), the deployment manifests.
            let mut unprivileged = vec!["test", "-p", "observer"];
            for t in [
                "policy_cases",
                "policy_incremental",
                "kube_matrix",
                "manifests",
            ] {
                unprivileged.extend(["--test", t]);
            }
            cargo(&unprivileged)?;
            if unit_only {
                return Ok(());
            }
            if unsafe { libc::geteuid() } != 0 {
                bail!("the end-to-end tests need root (network namespaces and eBPF); rerun as root or pass --unit-only");
            }
            let mut targets = e2e_targets()?;
            if kernel.is_some() {
                if !e2e.is_empty() {
                    if let Some(t) = e2e.iter().find(|t| !targets.contains(t)) {
                        bail!("--e2e {t}: no such target (observer/tests/{t}.rs)");
                    }
                    targets = e2e;
                }
                return on_old_kernel(&targets);
            }
            let mut args = vec!["test", "-p", "observer"];
            for t in &targets {
                args.push("--test");
                args.push(t);
            }
            cargo(&args)?;
            demo_runs()?;
            cluster_e2e()?;
            // What older kernels do differently is how programs attach (clsact, no TCX) and
            // what their verifier accepts: the attach, restart and uplink tests there too, and
            // Services (the path through a connection's alias, with its events).
            let old: Vec<String> = ["e2e_lifecycle", "e2e_restart", "e2e_uplink", "e2e_services"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            on_old_kernel(&old)
        }
        Cmd::Cluster { cmd } => match cmd {
            ClusterCmd::Up {
                cni,
                proxy_mode,
                no_observer,
            } => {
                setup::run()?;
                setup::cluster()?;
                cargo(&["build", "-p", "observer"])?;
                cluster::up(&cluster::UpOptions {
                    cni: cluster::Cni::parse(&cni)?,
                    proxy: cluster::ProxyMode::parse(&proxy_mode)?,
                    observer: !no_observer,
                })
                .map(|_| ())
            }
            ClusterCmd::Down => cluster::down(),
            ClusterCmd::Status => cluster::status(),
        },
        Cmd::Demo { duration, model } => {
            setup::run()?;
            cargo(&["build", "-p", "observer"])?;
            let model = if model == "flat" {
                observer_tests::Model::Flat
            } else {
                observer_tests::Model::Overlay
            };
            demo::run(duration, model)
        }
        Cmd::Bench { what, json, rest }
            if ["kube", "events", "snat", "compare"].contains(&what.as_str()) =>
        {
            setup::run()?;
            if what == "compare" {
                setup::compare()?;
            }
            // Harnesses around the real daemon (observer/tests/bench_<what>.rs).
            let harness = format!("bench_{what}");
            let mut cmd = Command::new("cargo");
            cmd.args([
                "test",
                "--release",
                "-p",
                "observer",
                "--test",
                &harness,
                "--",
            ])
            .args(["--ignored", "--nocapture", "--test-threads", "1"]);
            if json {
                cmd.env("BENCH_JSON", "1");
            }
            for kv in &rest {
                let (k, v) = kv.split_once('=').context(
                    "bench kube|events|snat|compare take NAME=VALUE settings, e.g. ROUNDS=5 or (kube) SIZE=250k",
                )?;
                cmd.env(format!("BENCH_{}", k.to_uppercase()), v);
            }
            if !cmd.status()?.success() {
                bail!("bench {what} failed");
            }
            Ok(())
        }
        Cmd::Bench { what, json, rest } => {
            setup::run()?;
            // Optimized userspace: compile and sync timings mean nothing in a debug build.
            cargo(&["build", "--release", "-p", "observer"])?;
            let mut cmd = Command::new(
                observer_bin()
                    .parent()
                    .unwrap()
                    .parent()
                    .unwrap()
                    .join("release")
                    .join("observer"),
            );
            cmd.args(["bench", &what]);
            if json {
                cmd.arg("--json");
            }
            cmd.args(&rest);
            if !cmd.status()?.success() {
                bail!("observer bench {what} failed");
            }
            Ok(())
        }
    }
}
