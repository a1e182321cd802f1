//! Capabilities: the daemon refuses to start without one it needs, naming it, and runs with
//! exactly `observer::caps::REQUIRED`, the set the DaemonSet grants.
//!
//! Each daemon runs in a throwaway network namespace entered with `nsenter --net` (so bpffs stays
//! the host's, pre-mounted as in the DaemonSet) through `setpriv`, which empties the inheritable
//! and ambient sets, sets no_new_privs and cuts the bounding set: exec'ed as uid 0, the daemon
//! then holds exactly what is left in the bounding set, as in a container started by a runtime.
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use observer::caps::{self, Cap};
use observer_tests::{ensure_root, ns_run, run, unique_prefix};
use serde_json::Value;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// A network namespace (and optionally a pod namespace behind a veth), a scratch directory and
/// a pin directory, all removed on drop with the daemon.
struct Scratch {
    ns: String,
    pod_ns: Option<String>,
    dir: PathBuf,
    pin_dir: PathBuf,
    child: Option<Child>,
}

impl Scratch {
    fn new(tag: &str) -> Self {
        ensure_root().unwrap();
        let prefix = unique_prefix(tag);
        let dir = std::env::temp_dir().join(format!("observer-{prefix}"));
        std::fs::create_dir_all(&dir).unwrap();
        let s = Scratch {
            ns: format!("{prefix}-node"),
            pod_ns: None,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/observer-test-{prefix}")),
            dir,
            child: None,
        };
        run(&["ip", "netns", "add", &s.ns]).unwrap();
        ns_run(&s.ns, &["ip", "link", "set", "lo", "up"]).unwrap();
        s
    }

    /// A pod: `lxc0` on the node side (10.99.0.1), `eth0` (10.99.0.2) in its own namespace.
    fn add_pod(&mut self) {
        let pod = format!("{}-pod", self.ns);
        run(&["ip", "netns", "add", &pod]).unwrap();
        self.pod_ns = Some(pod.clone());
        run(&[
            "ip", "-n", &self.ns, "link", "add", "lxc0", "type", "veth", "peer", "name", "eth0",
            "netns", &pod,
        ])
        .unwrap();
        run(&[
            "ip",
            "-n",
            &self.ns,
            "addr",
            "add",
            "10.99.0.1/24",
            "dev",
            "lxc0",
        ])
        .unwrap();
        run(&["ip", "-n", &self.ns, "link", "set", "lxc0", "up"]).unwrap();
        run(&[
            "ip",
            "-n",
            &pod,
            "addr",
            "add",
            "10.99.0.2/24",
            "dev",
            "eth0",
        ])
        .unwrap();
        run(&["ip", "-n", &pod, "link", "set", "eth0", "up"]).unwrap();
        run(&["ip", "-n", &pod, "link", "set", "lo", "up"]).unwrap();
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("observer.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// `observer daemon` in the namespace with the bounding set cut by `bounding`
    /// (`setpriv --bounding-set` syntax) and `extra` daemon arguments.
    fn spawn(&mut self, bounding: &str, extra: &[&str]) -> u32 {
        let log = std::fs::File::create(self.log()).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args([
                "--",
                "setpriv",
                "--no-new-privs",
                "--inh-caps=-all",
                "--ambient-caps=-all",
            ])
            .arg(format!("--bounding-set={bounding}"))
            .args(["--", OBSERVER, "daemon", "--source", "none"])
            .args(["--node-name", "n1", "--uplink", "eth0"])
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("running nsenter and setpriv (util-linux)");
        let pid = child.id();
        self.child = Some(child);
        pid
    }

    /// Waits for the daemon to exit; returns its exit code and how long it ran.
    fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, Duration) {
        let t0 = Instant::now();
        let c = self.child.as_mut().expect("a daemon was started");
        while t0.elapsed() < timeout {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return (st.code(), t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "daemon still running after {timeout:?}; log:\n{}",
            self.log_text()
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn daemon(&self, pid: u32) -> observer_tests::Daemon {
        observer_tests::Daemon {
            pid,
            bin: OBSERVER.into(),
            socket: self.socket(),
            log: self.log(),
            pin_dir: self.pin_dir.clone(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.kill();
        // Deleting the namespaces removes the veths and detaches the programs.
        for ns in self.pod_ns.iter().chain([&self.ns]) {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `setpriv --bounding-set` keeping exactly `caps`.
fn only(caps: &[Cap]) -> String {
    let mut s = String::from("-all");
    for c in caps {
        s.push_str(",+");
        s.push_str(&c.k8s_name().to_lowercase());
    }
    s
}

fn mask(caps: &[Cap]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1 << c.number)
}

#[test]
fn without_cap_bpf_the_daemon_exits_at_once_naming_it() {
    let mut s = Scratch::new("capbpf");
    // CAP_SYS_ADMIN would stand in for CAP_BPF (the kernel's pre-5.8 catch-all): drop both.
    s.spawn("-bpf,-sys_admin", &[]);
    let (code, ran) = s.wait_exit(Duration::from_secs(10));
    let log = s.log_text();
    assert_ne!(code, Some(0), "{log}");
    assert!(code.is_some(), "killed by a signal: {log}");
    assert!(ran < Duration::from_secs(5), "took {ran:?}: {log}");
    assert!(
        log.contains(&format!("missing capability CAP_BPF ({})", caps::BPF.why)),
        "{log}"
    );
    assert!(log.contains("the DaemonSet in manifests/ does"), "{log}");
    // Nothing else is missing, and nothing was loaded or pinned before the check.
    assert!(
        !log.contains("CAP_NET_ADMIN") && !log.contains("CAP_PERFMON"),
        "{log}"
    );
    assert!(!s.pin_dir.exists(), "pins created before the check");
    assert!(!s.socket().exists(), "socket bound before the check");
}

#[test]
fn each_required_capability_is_named_when_missing() {
    for c in caps::REQUIRED {
        let mut s = Scratch::new("capeach");
        let keep: Vec<Cap> = caps::REQUIRED
            .iter()
            .filter(|k| k.number != c.number)
            .copied()
            .collect();
        s.spawn(&only(&keep), &[]);
        let (code, _) = s.wait_exit(Duration::from_secs(10));
        let log = s.log_text();
        assert_eq!(code, Some(1), "{log}");
        assert!(
            log.contains(&format!("missing capability {} ({})", c.name, c.why)),
            "{log}"
        );
        assert!(!s.pin_dir.exists());
    }
}

#[test]
fn netns_also_needs_cap_sys_admin() {
    let mut s = Scratch::new("capns");
    let ns = s.ns.clone();
    s.spawn(&only(caps::REQUIRED), &["--netns", &ns]);
    let (code, _) = s.wait_exit(Duration::from_secs(10));
    let log = s.log_text();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "missing capability CAP_SYS_ADMIN ({})",
            caps::SYS_ADMIN.why
        )),
        "{log}"
    );
}

#[test]
fn exactly_the_required_set_loads_attaches_counts_and_restarts() {
    let mut s = Scratch::new("capok");
    s.add_pod();
    let pid = s.spawn(&only(caps::REQUIRED), &[]);
    let d = s.daemon(pid);
    d.wait_ready(observer_tests::ready_timeout(), 1).unwrap();

    // The process holds REQUIRED and nothing else (nsenter and setpriv exec in place).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(
        caps::parse_cap_eff(&status).unwrap(),
        mask(caps::REQUIRED),
        "{status}"
    );

    let attached = |d: &observer_tests::Daemon| -> Vec<String> {
        let v: Value = serde_json::from_str(&d.get("/v1/status").unwrap()).unwrap();
        v["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i[1].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(attached(&d), vec!["lxc0"]);

    // The programs run and their events reach the daemon.
    let pod = s.pod_ns.clone().unwrap();
    ns_run(
        &pod,
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.99.0.1"],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let recs = d.flows().unwrap();
        if recs
            .iter()
            .any(|r| r["ip"]["src"] == "10.99.0.2" && r["ip"]["dst"] == "10.99.0.1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no flow record for the ping: {recs:?}\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A restart with the same set re-adopts the pins and takes over the attachments.
    s.kill();
    let _ = std::fs::remove_file(s.socket());
    let pid = s.spawn(&only(caps::REQUIRED), &[]);
    let d = s.daemon(pid);
    d.wait_ready(observer_tests::ready_timeout(), 1).unwrap();
    assert_eq!(attached(&d), vec!["lxc0"]);
    assert!(
        s.log_text().contains("re-adopting pinned maps"),
        "{}",
        s.log_text()
    );
}

/// A fresh machine has no bpffs mounted until something prepares it as a node. The required-set
/// test above, re-run in a private mount namespace whose /sys/fs/bpf is unmounted first, must
/// pass: the test harness prepares the node (as systemd does on AKS), never a daemon that holds
/// CAP_SYS_ADMIN, and nothing relies on an earlier test having mounted it.
#[test]
fn the_required_set_works_on_a_fresh_node_without_bpffs() {
    if std::env::var_os("OBSERVER_TEST_FRESH_MOUNTS").is_some() {
        return; // Already inside the fresh mount namespace: the named test does the work.
    }
    ensure_root().unwrap();
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "mount --make-rprivate / && umount -R /sys/fs/bpf 2>/dev/null; \
         if mountpoint -q /sys/fs/bpf; then echo 'bpffs still mounted'; exit 3; fi; \
         exec {} --exact exactly_the_required_set_loads_attaches_counts_and_restarts --test-threads 1",
        exe.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .env("OBSERVER_TEST_FRESH_MOUNTS", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("1 passed"),
        "the inner test did not run: {text}"
    );
}
