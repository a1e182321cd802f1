//! `cargo xtask bench kube`: the daemon against a 10,000-pod, 1,000-policy cluster served by
//! the in-process API server. Measures start to enforcing, resident memory, and one pod label
//! change from the API event to the maps updated, against baselines taken in the same run.
//! Ignored by `cargo test`: run through xtask (release build, root).
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use observer_common::Config;
use observer_tests::{kubeapi::FakeApi, TestBed};
use serde_json::json;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

struct Run {
    child: Child,
    pin_dir: PathBuf,
    socket: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn start(bed: &TestBed, tag: &str, source: &[&str]) -> Run {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/observer-bench-{}-{tag}", bed.prefix));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let socket = bed.dir.join(format!("{tag}.sock"));
    let state = bed.dir.join(format!("{tag}-state"));
    let _ = std::fs::remove_dir_all(&state);
    let log = std::fs::File::create(bed.dir.join(format!("{tag}.log"))).unwrap();
    let child = Command::new(OBSERVER)
        .args(["daemon", "--netns", &bed.node_ns, "--node-name", "node-0"])
        .args(source)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .args([
            "--log",
            &std::env::var("BENCH_LOG").unwrap_or("warn".into()),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Run {
        child,
        pin_dir,
        socket,
    }
}

fn ready(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = write!(s, "GET /readyz HTTP/1.0\r\nHost: observer\r\n\r\n");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
}

fn wait_ready(r: &Run, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    while !ready(&r.socket) {
        assert!(t0.elapsed() < timeout, "daemon not ready after {timeout:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    t0.elapsed()
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn policy_gen(pin_dir: &Path) -> u32 {
    let md = MapData::from_pin(pin_dir.join(observer_common::maps::CONFIG)).unwrap();
    let arr: Array<MapData, Config> = Array::try_from(Map::Array(md)).unwrap();
    arr.get(&0, 0).unwrap().policy_gen
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn arg(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "benchmark: cargo xtask bench kube"]
fn kube_sync_at_scale() {
    let pods = arg("BENCH_PODS", 10_000);
    let policies = arg("BENCH_POLICIES", 1_000);
    let rounds = arg("BENCH_ROUNDS", 5);
    let changes = arg("BENCH_CHANGES", 200);
    let json_out = std::env::var_os("BENCH_JSON").is_some();

    let bed = TestBed::overlay("bk").unwrap();
    let api = FakeApi::start_in_netns(&bed.node_ns).unwrap();
    let objects = observer::bench::cluster_objects(pods, policies);
    for o in &objects {
        api.apply(o.clone());
    }
    let kubeconfig = bed.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let kube_args = [
        "--source",
        "kube",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];

    // Start to enforcing: process start to /readyz (maps written from the complete lists),
    // against the same daemon with no cluster source (program load and attach only).
    let (mut start_kube, mut start_none) = (Vec::new(), Vec::new());
    let mut rss_none = 0;
    for i in 0..rounds {
        let r = start(&bed, &format!("none{i}"), &["--source", "none"]);
        start_none.push(wait_ready(&r, Duration::from_secs(30)).as_secs_f64() * 1e3);
        rss_none = rss_kib(r.child.id()).0;
        drop(r);
        let r = start(&bed, &format!("kube{i}"), &kube_args);
        start_kube.push(wait_ready(&r, Duration::from_secs(60)).as_secs_f64() * 1e3);
    }

    // Propagation: one label change at a time, API apply to the policy generation bump (the
    // daemon bumps it after the last map write of a sync).
    let r = start(&bed, "prop", &kube_args);
    wait_ready(&r, Duration::from_secs(60));
    let (rss_synced, _) = rss_kib(r.child.id());
    let mut lat = Vec::new();
    for i in 0..changes {
        // Local pods (the first 100) and remote ones, alternately.
        let idx = if i % 2 == 0 {
            i % 100
        } else {
            100 + (i * 37) % (pods - 100)
        };
        let mut pod = objects
            .iter()
            .find(|o| o["kind"] == "Pod" && o["metadata"]["name"] == format!("p{idx}"))
            .unwrap()
            .clone();
        pod["metadata"]["labels"]["rev"] = json!(format!("r{i}"));
        let before = policy_gen(&r.pin_dir);
        let t0 = Instant::now();
        api.apply(pod);
        loop {
            if policy_gen(&r.pin_dir) != before {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "change {i} never reached the maps"
            );
            // Poll, don't spin: on a 2-vCPU machine a spinning reader slows the daemon down.
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
        // Let the debounce window of the previous change close.
        std::thread::sleep(Duration::from_millis(20));
    }
    let (rss, hwm) = rss_kib(r.child.id());

    // Baseline: the full recompile of the same cluster in this process, the floor of a sync
    // that recompiles everything.
    let mut cluster = observer::cluster::Cluster::default();
    for o in &objects {
        observer::cluster::add_object(&mut cluster, "bench", o.clone());
    }
    let mut compile_ms = Vec::new();
    let mut alloc = observer::policy::compile::Allocator::default();
    for _ in 0..rounds.max(3) {
        let t0 = Instant::now();
        let d = observer::policy::compile::compile(
            &cluster,
            "node-0",
            &[],
            &Default::default(),
            &mut alloc,
        );
        compile_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        assert!(!d.policy.is_empty());
    }

    let report = json!({
        "pods": pods, "policies": policies, "rounds": rounds, "changes": changes,
        "start_to_enforcing_ms": {"kube_median": median(&mut start_kube), "no_source_median": median(&mut start_none),
            "kube_runs": start_kube, "no_source_runs": start_none},
        "label_change_to_maps_ms": {"p50": pct(&mut lat, 0.5), "p90": pct(&mut lat, 0.9), "p99": pct(&mut lat, 0.99), "max": pct(&mut lat, 1.0)},
        "baseline_full_compile_ms": median(&mut compile_ms),
        "rss_kib": {"no_source": rss_none, "after_sync": rss_synced, "after_changes": rss, "peak": hwm},
    });
    if json_out {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    }
}
