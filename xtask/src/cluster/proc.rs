//! The cluster's processes: started detached with their logs in the state directory, and
//! found again for teardown by what they are in (a cluster network namespace, a node's cgroup
//! tree), never by name.
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::layout::{Layout, Node};

/// Starts `args` detached (own session, survives xtask), in `node`'s namespaces when given,
/// else in the router's network namespace. Logs to `logs/<node>-<name>.log`.
pub fn spawn(layout: &Layout, node: Option<&Node>, name: &str, args: &[String]) -> Result<u32> {
    let tag = format!(
        "{}-{name}",
        node.map(|n| n.name.as_str()).unwrap_or("router")
    );
    let log_path = layout.log_dir().join(format!("{tag}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new("nsenter");
    match node {
        Some(n) => cmd.args(["-t", &layout.holder_pid(n)?.to_string(), "-m", "-n", "--"]),
        None => cmd
            .arg(format!("--net=/run/netns/{}", layout.router_netns()))
            .arg("--"),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {tag}: {}", args.join(" ")))?;
    let pid = child.id();
    // Not waited for: it outlives this process. Reaped by init once xtask exits.
    std::mem::forget(child);
    let pids = layout.state.join("pids");
    std::fs::create_dir_all(&pids)?;
    std::fs::write(pids.join(&tag), pid.to_string())?;
    Ok(pid)
}

/// Every component started by `spawn`, and whether it still runs.
pub fn components(layout: &Layout) -> Vec<(String, bool)> {
    let mut v: Vec<(String, bool)> = std::fs::read_dir(layout.state.join("pids"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid = std::fs::read_to_string(e.path()).ok()?;
            let alive = Path::new(&format!("/proc/{}", pid.trim())).exists();
            Some((e.file_name().to_string_lossy().into_owned(), alive))
        })
        .collect();
    v.sort();
    v
}

/// An error naming the first component that died, with the end of its log.
pub fn all_alive(layout: &Layout) -> Result<()> {
    for (name, alive) in components(layout) {
        if !alive {
            let log = std::fs::read_to_string(layout.log_dir().join(format!("{name}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{name} exited; its log ends:\n{}", tail.join("\n"));
        }
    }
    Ok(())
}

/// Network namespaces of the cluster, as (device, inode) of their nsfs files.
fn cluster_netns() -> Vec<(u64, u64)> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{}-", observer_tests::cluster::PREFIX))
        })
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

/// PIDs in a cluster network namespace or under a node's cgroup tree (pods, shims).
fn cluster_pids(layout: &Layout) -> Vec<i32> {
    let netns = cluster_netns();
    let cgroups: Vec<String> = layout
        .nodes()
        .iter()
        .map(|n| format!("/{}", n.cgroup))
        .collect();
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let in_netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| netns.contains(&(m.dev(), m.ino())))
                .unwrap_or(false);
            let in_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .map(|s| {
                    s.lines().any(|l| {
                        let path = l.splitn(3, ':').nth(2).unwrap_or("");
                        cgroups
                            .iter()
                            .any(|c| path == c || path.starts_with(&format!("{c}/")))
                    })
                })
                .unwrap_or(false);
            in_netns || in_cgroup
        })
        .collect()
}

/// Kills every process of the cluster and removes the nodes' cgroup trees.
pub fn kill_cluster(layout: &Layout) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids = cluster_pids(layout);
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("processes of the cluster survive SIGKILL: {pids:?}");
        }
        for pid in pids {
            // SAFETY: plain syscall; the PID was just read as one of the cluster's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in layout.nodes() {
        remove_cgroups(&n.cgroup)?;
    }
    Ok(())
}

/// Removes `/<top>` in every cgroup hierarchy, deepest first (cgroup dirs go with rmdir).
fn remove_cgroups(top: &str) -> Result<()> {
    fn rm(dir: &Path) -> Result<()> {
        for e in std::fs::read_dir(dir)?.flatten() {
            if e.file_type()?.is_dir() {
                rm(&e.path())?;
            }
        }
        // Emptied by kill_cluster; a busy one right after the kill gets a few tries.
        for i in 0..50 {
            match std::fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && i < 49 => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
            }
        }
        Ok(())
    }
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let d = h.path().join(top);
        if d.is_dir() {
            rm(&d)?;
        }
    }
    Ok(())
}
