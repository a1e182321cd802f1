//! End-to-end tests on an older kernel: Debian's Linux 6.1 cloud kernel (no TCX, so observer
//! attaches with clsact, as on AKS nodes before 6.6) booted by qemu under software emulation,
//! with a root filesystem debootstrapped from Debian's packages and the host's test binaries at
//! the same paths. Everything it builds lives in [`CACHE`], made once and reused: the kernel
//! package unpacked, the root filesystem, and the disk image of each run.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

const CACHE: &str = "/var/cache/observer-vm";
/// The kernel the guest boots: Debian 12's cloud flavour (virtio, NVMe and ext4 built in,
/// BTF on). The metapackage names the current build.
const KERNEL_META: &str = "linux-image-cloud-amd64";
/// What the tests run in the guest: network namespaces, nftables, ping, modules on demand.
const GUEST_PACKAGES: &str = "kmod,iproute2,nftables,iputils-ping,procps";
/// Software emulation is slow: a daemon verifying its programs takes a minute or more.
const READY_SECS: u32 = 600;

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Debian mirror apt uses on this machine, for debootstrap (never named in the project).
fn apt_mirror() -> Result<String> {
    let mut text = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            if e.path()
                .extension()
                .is_some_and(|x| x == "sources" || x == "list")
            {
                text.push('\n');
                text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    for line in text.lines().map(str::trim) {
        let url = line.strip_prefix("URIs:").map(str::trim).or_else(|| {
            line.strip_prefix("deb ")
                .and_then(|l| l.split_whitespace().next())
        });
        if let Some(u) = url.filter(|u| u.ends_with("/debian") || u.ends_with("/debian/")) {
            return Ok(u.to_string());
        }
    }
    bail!("no Debian mirror in /etc/apt/sources.list(.d): the guest's root filesystem needs one")
}

/// The guest kernel and root filesystem, made once.
pub struct Guest {
    kernel: PathBuf,
    rootfs: PathBuf,
    release: String,
}

pub fn prepare() -> Result<Guest> {
    let cache = Path::new(CACHE);
    std::fs::create_dir_all(cache)?;
    let kdir = cache.join("kernel");
    let release_of = |kdir: &Path| -> Option<String> {
        std::fs::read_dir(kdir.join("boot"))
            .ok()?
            .flatten()
            .find_map(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.strip_prefix("vmlinuz-").map(str::to_string)
            })
    };
    if release_of(&kdir).is_none() {
        let deps = run(Command::new("apt-cache").args(["depends", KERNEL_META]))?;
        let pkg = deps
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: "))
            .filter(|p| p.starts_with("linux-image-"))
            .with_context(|| format!("{KERNEL_META} names no kernel package"))?
            .to_string();
        eprintln!("vm: fetching {pkg}");
        run(Command::new("apt-get")
            .args(["download", "-qq", &pkg])
            .current_dir(cache))?;
        let deb = std::fs::read_dir(cache)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&pkg))
            })
            .context("the downloaded kernel package")?;
        let tmp = cache.join("kernel.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        std::fs::rename(&tmp, &kdir)?;
        std::fs::remove_file(deb)?;
    }
    let release = release_of(&kdir).context("no vmlinuz in the kernel package")?;
    let rootfs = cache.join("rootfs");
    let done = rootfs.join(".observer-ready");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&rootfs);
        let mirror = apt_mirror()?;
        eprintln!("vm: building the guest's root filesystem from Debian packages (once)");
        run(Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={GUEST_PACKAGES}")])
            .args(["bookworm"])
            .arg(&rootfs)
            .arg(&mirror)
            .stdout(Stdio::null()))?;
        let modules = rootfs.join("usr/lib/modules");
        std::fs::create_dir_all(&modules)?;
        for base in ["lib/modules", "usr/lib/modules"] {
            let src = kdir.join(base).join(&release);
            if src.exists() {
                run(Command::new("cp").arg("-a").arg(&src).arg(&modules))?;
            }
        }
        run(Command::new("chroot")
            .arg(&rootfs)
            .args(["depmod", &release]))?;
        // The daemon's Kubernetes client wants the system's CA bundle even with a kubeconfig CA.
        let certs = rootfs.join("etc/ssl/certs");
        std::fs::create_dir_all(&certs)?;
        std::fs::copy(
            "/etc/ssl/certs/ca-certificates.crt",
            certs.join("ca-certificates.crt"),
        )
        .context("copying the CA bundle (package ca-certificates)")?;
        std::fs::write(&done, "")?;
    }
    Ok(Guest {
        kernel: kdir.join("boot").join(format!("vmlinuz-{release}")),
        rootfs,
        release,
    })
}

/// Test binaries of the `observer` package: `cargo test --no-run` for `targets`, with the
/// executables cargo reports.
pub fn build_tests(targets: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json",
        "-p",
        "observer",
    ]);
    for t in targets {
        cmd.args(["--test", t]);
    }
    let out = run(&mut cmd)?;
    let mut v = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if targets.iter().any(|t| t == name) {
            v.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if v.len() != targets.len() {
        bail!(
            "cargo reported {} of {} test binaries",
            v.len(),
            targets.len()
        );
    }
    Ok(v)
}

/// Runs the test binaries in the guest, one after the other, and fails unless each passed.
pub fn run_tests(guest: &Guest, tests: &[(String, PathBuf)], observer: &Path) -> Result<()> {
    let mut files: Vec<&Path> = tests.iter().map(|(_, p)| p.as_path()).collect();
    files.push(observer);
    let copied: Vec<PathBuf> = files
        .iter()
        .map(|f| guest.rootfs.join(f.strip_prefix("/").unwrap_or(f)))
        .collect();
    for (src, dst) in files.iter().zip(&copied) {
        std::fs::create_dir_all(dst.parent().unwrap())?;
        std::fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    }
    // Data the tests read from the source tree at run time (the upstream policy cases), at the
    // same path; they find it as `observer/../tests/policy`, so `observer/` must exist too.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?;
    let data = workspace.join("tests/policy");
    let data_copy = guest.rootfs.join(data.strip_prefix("/").unwrap_or(&data));
    let package_dir = guest
        .rootfs
        .join(workspace.join("observer").strip_prefix("/")?);
    std::fs::create_dir_all(data_copy.parent().unwrap())?;
    std::fs::create_dir_all(&package_dir)?;
    let _ = std::fs::remove_dir_all(&data_copy);
    run(Command::new("cp").arg("-a").arg(&data).arg(&data_copy))?;
    let result = boot(guest, tests);
    // The cache keeps the distribution, not this build's binaries or data.
    for c in &copied {
        let _ = std::fs::remove_file(c);
    }
    let _ = std::fs::remove_dir_all(&data_copy);
    let _ = std::fs::remove_dir(&package_dir);
    result
}

fn boot(guest: &Guest, tests: &[(String, PathBuf)]) -> Result<()> {
    // /tmp stays the image's own: the binaries may live under it (a clone in /tmp).
    // br_netfilter: kubenet nodes have it loaded (kube-proxy needs it); the kubenet test bed
    // sets its sysctls. This kernel has it as a module, the host's may have it built in.
    let mut init = String::from(
        "#!/bin/sh\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmpfs /run; mkdir -p /run/netns\n\
         ip link set lo up\n\
         modprobe br_netfilter\n\
         echo \"observer-vm: kernel $(uname -r)\"\n",
    );
    for (name, exe) in tests {
        let _ = writeln!(
            init,
            "OBSERVER_TEST_SLOW=1 OBSERVER_TEST_READY_SECS={READY_SECS} {} --test-threads 1 --color never 2>&1\n\
             echo \"observer-vm: {name} exit $?\"",
            exe.display()
        );
    }
    init.push_str("sync; echo o > /proc/sysrq-trigger; sleep 10\n");
    let init_path = guest.rootfs.join("sbin/observer-vm-init");
    std::fs::write(&init_path, init)?;
    run(Command::new("chmod").arg("+x").arg(&init_path))?;
    let image = Path::new(CACHE).join("root.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&guest.rootfs)
        .arg(&image)
        .arg("4G"))?;
    eprintln!(
        "vm: booting Linux {} under qemu (software emulation) for {}",
        guest.release,
        tests
            .iter()
            .map(|t| t.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let out = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-cpu", "max", "-m", "3072", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-accel", "tcg"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .args([
            "-append",
            "root=/dev/nvme0n1 rw console=ttyS0 init=/sbin/observer-vm-init panic=-1 quiet",
        ])
        .arg("-drive")
        .arg(format!("file={},if=none,format=raw,id=d", image.display()))
        .args(["-device", "nvme,drive=d,serial=observer"])
        .stdin(Stdio::null())
        .output()
        .context("running qemu-system-x86_64 (cargo xtask setup installs qemu-system-x86)")?;
    let _ = std::fs::remove_file(&image);
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let mut failed = Vec::new();
    for (name, _) in tests {
        let mark = format!("observer-vm: {name} exit ");
        match console
            .lines()
            .find_map(|l| l.split_once(&mark).map(|(_, rc)| rc.trim()))
        {
            Some("0") => {}
            Some(rc) => failed.push(format!("{name} (exit {rc})")),
            None => failed.push(format!("{name} (no result)")),
        }
    }
    // The test harness's own lines, as cargo prints them on the host.
    for l in console.lines() {
        if l.starts_with("test ") || l.starts_with("observer-vm:") || l.contains("panicked") {
            println!("[linux {}] {l}", guest.release);
        }
    }
    if !failed.is_empty() {
        eprintln!("{console}");
        bail!("on Linux {}: {}", guest.release, failed.join(", "));
    }
    Ok(())
}
