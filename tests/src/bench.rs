//! Helpers shared by the benchmark harnesses in `observer/tests/bench_*.rs`.

/// A numeric setting from the environment (`BENCH_<NAME>`, set by `cargo xtask bench`).
pub fn arg(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sum of the samples whose line starts with `prefix` (a name, or a name and labels) in a
/// Prometheus text exposition.
pub fn metric_sum(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// CPU time (user + system) of a process, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// CPU time a process's threads have run, in nanoseconds (the scheduler's own account, summed
/// over `/proc/PID/task/*/schedstat`): fine enough for intervals of tens of milliseconds,
/// where [`cpu_ticks`] counts in 10 ms steps.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
pub fn pin_thread(tid: u32, cpu: usize) {
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid as i32, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "pinning thread {tid} to CPU {cpu}");
}

/// Waits until `counter` reaches `n`: spinning, so threads released together leave at the same
/// moment, or giving the CPU to other threads when `yielding`. Fails after 10 s: a thread that
/// stopped must not hang the others.
pub fn wait_until(counter: &std::sync::atomic::AtomicU32, n: u32, yielding: bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut polls = 0u32;
    while counter.load(std::sync::atomic::Ordering::SeqCst) < n {
        polls = polls.wrapping_add(1);
        // The clock every 1,024 polls: a read each time would blur the spin's moment.
        assert!(
            polls % 1024 != 0 || std::time::Instant::now() < deadline,
            "another thread stopped short of {n}"
        );
        if yielding {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A CPU cgroup of its own for a process, with the weight a Kubernetes CPU request gives its
/// pod (the kubelet's conversion: `cpu.shares` = millicores * 1024 / 1000 on cgroup v1,
/// `cpu.weight` = 1 + (shares - 2) * 9999 / 262142 on v2), so a benchmark places the daemon as
/// the DaemonSet places it beside pods. Removed on drop, once the process is gone (drop it
/// after the process).
pub struct CpuCgroup {
    dir: std::path::PathBuf,
}

impl CpuCgroup {
    /// Moves `pid` (all its threads) into a new cgroup named `name` with the weight of a
    /// request of `millicores`. None where no CPU controller is mounted.
    pub fn place(name: &str, pid: u32, millicores: u64) -> Option<Self> {
        let shares = (millicores * 1024 / 1000).max(2);
        let (dir, file, value) = if std::path::Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists() {
            ("/sys/fs/cgroup/cpu", "cpu.shares", shares)
        } else if std::fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
        {
            (
                "/sys/fs/cgroup",
                "cpu.weight",
                1 + (shares - 2) * 9999 / 262142,
            )
        } else {
            return None;
        };
        let dir = std::path::Path::new(dir).join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let g = CpuCgroup { dir };
        std::fs::write(g.dir.join(file), value.to_string()).unwrap();
        std::fs::write(g.dir.join("cgroup.procs"), pid.to_string()).unwrap();
        Some(g)
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        // The process is gone by now; an emptied cgroup is removed with rmdir.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("note: could not remove {}", self.dir.display());
    }
}
