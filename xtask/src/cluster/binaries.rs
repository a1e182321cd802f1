//! The Kubernetes binaries: `$OBSERVER_K8S_BIN`, else unpacked once from `../shared/k8s/bin/`
//! (xz archives) into the cache.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

pub const NAMES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
];

/// Where the binaries come from when `$OBSERVER_K8S_BIN` is not set.
pub fn shared_dir() -> PathBuf {
    crate::workspace_root().join("../shared/k8s/bin")
}

/// The directory holding the binaries, or None when neither source has them (the cluster
/// tests are then skipped).
pub fn find() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("OBSERVER_K8S_BIN") {
        return Some(dir.into());
    }
    let shared = shared_dir();
    NAMES
        .iter()
        .all(|n| shared.join(format!("{n}.xz")).exists())
        .then(|| Path::new(observer_tests::cluster::CACHE_DIR).join("bin"))
}

/// The binaries' directory, unpacking what is missing or older than its archive.
pub fn ensure() -> Result<PathBuf> {
    let Some(dir) = find() else {
        bail!(
            "no Kubernetes binaries: set OBSERVER_K8S_BIN to a directory holding {} or provide {}",
            NAMES.join(", "),
            shared_dir().display()
        );
    };
    if std::env::var_os("OBSERVER_K8S_BIN").is_none() {
        std::fs::create_dir_all(&dir)?;
        for n in NAMES {
            unpack(&shared_dir().join(format!("{n}.xz")), &dir.join(n))?;
        }
    }
    for n in NAMES {
        if !dir.join(n).exists() {
            bail!("{} is missing ($OBSERVER_K8S_BIN)", dir.join(n).display());
        }
    }
    Ok(dir)
}

fn unpack(xz: &Path, dest: &Path) -> Result<()> {
    let newer = |a: &Path, b: &Path| -> bool {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((m(a), m(b)), (Some(x), Some(y)) if x >= y)
    };
    if dest.exists() && newer(dest, xz) {
        return Ok(());
    }
    eprintln!("cluster: unpacking {}", xz.display());
    let tmp = dest.with_extension("partial");
    let out = std::fs::File::create(&tmp)?;
    let st = Command::new("xz")
        .arg("-dc")
        .arg(xz)
        .stdout(out)
        .status()
        .context("xz (package xz-utils)")?;
    if !st.success() {
        bail!("xz -dc {} failed", xz.display());
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, dest)?;
    Ok(())
}
