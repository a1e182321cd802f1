//! `cargo xtask setup`: everything a fresh machine lacks, installed idempotently (and bpffs
//! mounted, as on a node). A machine that
//! has it all finishes in well under a second: every step checks before it acts.
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
/// Build and test tools. `llvm-22-dev` (and the compression libraries it links) for bpf-linker;
/// the rest for the virtual node test bed.
const APT_ALWAYS: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iputils-ping",
    "iperf3",
    "nftables",
    // The guest on Debian's Linux 6.1 (`xtask::vm`): emulator, root filesystem, disk image.
    "qemu-system-x86",
    "debootstrap",
    "e2fsprogs",
    "ca-certificates",
];
/// The two-node Kubernetes cluster (`xtask::cluster`): runtime, CNI plugins, etcd, the rules
/// kube-proxy writes, certificates, the images' contents. Installed only where the cluster
/// runs (`cluster up`, and `test` when Kubernetes binaries are there).
const APT_CLUSTER: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "etcd-server",
    "iptables",
    "conntrack",
    "openssl",
    "xz-utils",
    "busybox-static",
    "dnsmasq-base",
    "gcc",
    "libc6-dev",
    // What the uninstall test checks on each node (`bpftool net show`).
    "bpftool",
];
/// Debian's Rust with matching std source: the eBPF toolchain when rustup's nightly lacks
/// `rust-src` (it cannot be downloaded here).
const APT_EBPF_TOOLCHAIN: &[&str] = &["rustc-web", "cargo-web", "rust-web-src"];

pub fn cluster() -> Result<()> {
    apt_install(APT_CLUSTER)
}

/// The peers' rule tools for `bench compare` (Azure NPM's iptables and ipset shape), and
/// ethtool for its denied flood (GRO on the receiving veth gives it a NAPI thread to time).
const APT_COMPARE: &[&str] = &["iptables", "ipset", "ethtool"];

pub fn compare() -> Result<()> {
    apt_install(APT_COMPARE)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false)
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!("missing packages {missing:?}: run `cargo xtask setup` as root");
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let st = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .context("apt-get update")?;
    if !st.success() {
        bail!("apt-get update failed");
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !st.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

/// Prepares the machine as a node is prepared: bpffs on /sys/fs/bpf, which systemd mounts on
/// AKS and kind nodes and a fresh machine lacks. Root only (the unit tests need no bpffs).
fn mount_bpffs() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    observer_tests::mount_bpffs()
}

pub fn run() -> Result<()> {
    mount_bpffs()?;
    apt_install(APT_ALWAYS)?;
    if nightly_has_rust_src() {
        eprintln!("setup: eBPF toolchain: rustup nightly with rust-src");
    } else {
        apt_install(APT_EBPF_TOOLCHAIN)?;
        if !std::path::Path::new("/usr/lib/rustlib/src/rust/library/core").exists() {
            bail!(
                "rust-web-src is installed but /usr/lib/rustlib/src/rust/library/core is missing"
            );
        }
    }
    if !bpf_linker_ok() {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
        );
        let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        let st = Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .status()
            .context("cargo install bpf-linker")?;
        if !st.success() || !bpf_linker_ok() {
            bail!("installing bpf-linker {BPF_LINKER_VERSION} failed");
        }
    }
    Ok(())
}
