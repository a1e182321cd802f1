//! `cargo xtask bench kube [-- SIZE=10k|250k]`: the daemon against a cluster served by the
//! in-process API server (10k: 10,000 pods, 1,000 policies, 100 on this node; 250k: 250,000
//! pods, 10,000 policies, 1,000 nodes, 250 on this node). Measures start to enforcing, one
//! change to the maps for each kind of change (pod labels, namespace labels, a policy), a burst
//! of pod label changes, and resident memory, each against a baseline taken in the same run.
//! Ignored by `cargo test`: run through xtask (release build, root).
//!
//! Settings (`NAME=VALUE` after `--`, read here as `BENCH_NAME`): `SIZE`, and to override its
//! defaults `PODS`, `POLICIES`, `NODES`, `LOCAL_PODS`, `ROUNDS` (daemon starts), `CHANGES` (per
//! kind), `BURST` (pod label changes back to back).
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use observer::bench::ClusterSpec;
use observer_common::{Config, EndpointInfo, IpKey};
use observer_tests::{kubeapi::FakeApi, TestBed};
use serde_json::{json, Value};

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

/// One HTTP/1.0 GET on the daemon's socket: (status line OK, body).
fn get(socket: &Path, path: &str) -> Option<(bool, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: observer\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let ok = buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200");
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((ok, body))
}

fn ready(socket: &Path) -> bool {
    get(socket, "/readyz").is_some_and(|(ok, _)| ok)
}

fn wait_ready(r: &Run, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    while !ready(&r.socket) {
        assert!(t0.elapsed() < timeout, "daemon not ready after {timeout:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    t0.elapsed()
}

fn status(r: &Run) -> Value {
    let (_, body) = get(&r.socket, "/v1/status").expect("daemon status");
    serde_json::from_str(&body).expect("status JSON")
}

/// Syncs the daemon has counted (`observer_kube_sync_latency_seconds_count`): one per sync that
/// took in API events, counted after its map writes.
fn syncs(r: &Run) -> u64 {
    status(r)["kube"]["propagation"]["syncs"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits until the daemon has finished the syncs of everything applied so far: `n` syncs
/// counted, then a little more for the memory it hands back after each.
fn wait_syncs(r: &Run, n: u64, timeout: Duration) {
    let t0 = Instant::now();
    while syncs(r) < n {
        assert!(
            t0.elapsed() < timeout,
            "daemon still syncing after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(20));
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

fn has_endpoint(pin_dir: &Path, ip: IpAddr) -> bool {
    let md = MapData::from_pin(pin_dir.join(observer_common::maps::ENDPOINTS)).unwrap();
    let m: BpfHashMap<MapData, IpKey, EndpointInfo> =
        BpfHashMap::try_from(Map::HashMap(md)).unwrap();
    m.get(&observer::cluster::ip_key(ip), 0).is_ok()
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

/// Changes of one kind, one at a time.
#[derive(Default)]
struct Series {
    ms: Vec<f64>,
    /// Changes whose sync wrote nothing to the maps (not in `ms`).
    no_write: usize,
}

impl Series {
    fn report(&mut self) -> Value {
        if self.ms.is_empty() {
            return json!({"n": 0, "no_write": self.no_write});
        }
        let v = &mut self.ms;
        json!({"n": v.len(), "p50": pct(v, 0.5), "p90": pct(v, 0.9), "p99": pct(v, 0.99),
            "max": pct(v, 1.0), "no_write": self.no_write})
    }
}

/// Applies one change and times it from the API server's apply to the policy generation bump
/// in the pinned config map, which the daemon makes after the sync's last map write (polled
/// every 0.2 ms). A sync counted without a bump wrote nothing. Returns once the daemon is idle
/// again, so each change is measured alone.
fn one_change(api: &FakeApi, r: &Run, obj: Value, timeout: Duration, out: &mut Series) {
    let synced = syncs(r);
    let before = policy_gen(&r.pin_dir);
    let t0 = Instant::now();
    api.apply(obj);
    let mut next_check = Duration::from_millis(250);
    loop {
        if policy_gen(&r.pin_dir) != before {
            out.ms.push(t0.elapsed().as_secs_f64() * 1e3);
            break;
        }
        // Rarely (each look takes the daemon's locks): has the sync ended without a write?
        if t0.elapsed() > next_check {
            if syncs(r) > synced && policy_gen(&r.pin_dir) == before {
                out.no_write += 1;
                break;
            }
            next_check += Duration::from_millis(250);
        }
        assert!(t0.elapsed() < timeout, "a change never reached the maps");
        // Poll, don't spin: on a 2-vCPU machine a spinning reader slows the daemon down.
        std::thread::sleep(Duration::from_micros(200));
    }
    wait_syncs(r, synced + 1, timeout);
}

#[test]
#[ignore = "benchmark: cargo xtask bench kube"]
fn kube_sync_at_scale() {
    let size = std::env::var("BENCH_SIZE").unwrap_or_else(|_| "10k".into());
    let base = ClusterSpec::size(&size).unwrap_or_else(|| {
        panic!("SIZE={size}: 10k or 250k (PODS=, POLICIES=, NODES=, LOCAL_PODS= adjust it)")
    });
    let (pods, policies) = (
        arg("BENCH_PODS", base.pods),
        arg("BENCH_POLICIES", base.policies),
    );
    let mut spec = if base.is_classic() {
        ClusterSpec::classic(pods, policies)
    } else {
        ClusterSpec {
            pods,
            policies,
            ..base
        }
    };
    spec.nodes = arg("BENCH_NODES", spec.nodes);
    spec.local_pods = arg("BENCH_LOCAL_PODS", spec.local_pods);
    let big = spec.pods > 50_000;
    let rounds = arg("BENCH_ROUNDS", if big { 3 } else { 5 });
    let changes = arg("BENCH_CHANGES", if big { 50 } else { 200 });
    let burst = arg("BENCH_BURST", 1_000);
    let json_out = std::env::var_os("BENCH_JSON").is_some();
    // Listing takes longer with the cluster's size, and so does a sync that recompiles it all.
    let k = spec.pods as u64 / 1_000;
    let ready_timeout = Duration::from_secs(60 + 2 * k);
    let change_timeout = Duration::from_secs(10 + k);
    let local = spec.local_pods.min(spec.pods);
    assert!(
        local > 0 && local < spec.pods,
        "{spec:?}: needs local and remote pods"
    );

    let bed = TestBed::overlay("bk").unwrap();
    let api = FakeApi::start_in_netns(&bed.node_ns).unwrap();
    let t0 = Instant::now();
    let objects = observer::bench::cluster_objects_for(&spec);
    for o in &objects {
        api.apply(o.clone());
    }
    let load_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "{spec:?}: {} objects generated and served in {load_s:.1} s",
        objects.len()
    );
    let by_name: HashMap<(&str, &str), &Value> = objects
        .iter()
        .map(|o| {
            (
                (
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap(),
                ),
                o,
            )
        })
        .collect();
    let obj = |kind: &str, name: &str| (*by_name.get(&(kind, name)).unwrap()).clone();
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
        start_kube.push(wait_ready(&r, ready_timeout).as_secs_f64() * 1e3);
        eprintln!("start {i}: {:.0} ms", start_kube[i]);
    }

    let r = start(&bed, "prop", &kube_args);
    wait_ready(&r, ready_timeout);
    // The initial lists' sync is counted too; wait for it to finish.
    wait_syncs(&r, 1, ready_timeout);
    let (rss_synced, hwm_synced) = rss_kib(r.child.id());

    // (a) Pod labels: one pod at a time, local (the first `local` pods) and remote alternately,
    // a new value of a label no policy selects on, so the pod takes a new identity.
    // Change `i`: a local pod for even `i`, else a remote one `stride` apart, labelled `rev`.
    let relabelled = |i: usize, stride: usize, rev: String| {
        let idx = if i % 2 == 0 {
            i % local
        } else {
            local + (i * stride) % (spec.pods - local)
        };
        let mut pod = obj("Pod", &format!("p{idx}"));
        pod["metadata"]["labels"]["rev"] = json!(rev);
        pod
    };
    let mut pod_lat = Series::default();
    for i in 0..changes {
        let pod = relabelled(i, 37, format!("r{i}"));
        one_change(&api, &r, pod, change_timeout, &mut pod_lat);
    }
    eprintln!("pod label changes done");

    // (b) Namespace labels: `team`, which the policies' namespaceSelectors match on, moved to
    // the next value; alternately a namespace with local pods and one without (when there is
    // one). Its pods change identity and the policies of both teams change peers.
    let namespaces = objects.iter().filter(|o| o["kind"] == "Namespace").count();
    let local_ns: BTreeSet<usize> = (0..local).map(|i| i % namespaces).collect();
    let remote_ns: Vec<usize> = (0..namespaces).filter(|n| !local_ns.contains(n)).collect();
    let local_ns: Vec<usize> = local_ns.into_iter().collect();
    let mut ns_lat = Series::default();
    let mut teams: HashMap<usize, usize> = HashMap::new();
    for i in 0..changes {
        let n = if i % 2 == 1 && !remote_ns.is_empty() {
            remote_ns[(i * 7) % remote_ns.len()]
        } else {
            local_ns[(i * 7) % local_ns.len()]
        };
        let team = teams.entry(n).or_insert(n % 10);
        *team = (*team + 1) % 10;
        let mut ns = obj("Namespace", &format!("ns{n}"));
        ns["metadata"]["labels"]["team"] = json!(format!("t{team}"));
        one_change(&api, &r, ns, change_timeout, &mut ns_lat);
    }
    eprintln!("namespace label changes done");

    // (c) Policies: one that selects local pods (a policy selecting none has nothing to write
    // on this node), alternately a new ingress port and its ingress namespaceSelector moved
    // to the next team (other peer namespaces).
    let local_apps: BTreeSet<(String, String)> = (0..local)
        .map(|i| {
            let p = obj("Pod", &format!("p{i}"));
            (
                p["metadata"]["namespace"].as_str().unwrap().to_string(),
                p["metadata"]["labels"]["app"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let local_pols: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .filter(|o| {
            local_apps.contains(&(
                o["metadata"]["namespace"].as_str().unwrap().to_string(),
                o["spec"]["podSelector"]["matchLabels"]["app"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            ))
        })
        .collect();
    assert!(!local_pols.is_empty(), "no policy selects a local pod");
    let mut pol_lat = Series::default();
    let mut current: HashMap<usize, Value> = HashMap::new();
    for i in 0..changes {
        let j = (i * 13) % local_pols.len();
        let pol = current.entry(j).or_insert_with(|| local_pols[j].clone());
        let ingress = &mut pol["spec"]["ingress"][0];
        if i % 2 == 0 {
            ingress["ports"][1]["port"] = json!(10_000 + i);
        } else {
            let team = &mut ingress["from"][1]["namespaceSelector"]["matchLabels"]["team"];
            let t: usize = team.as_str().unwrap()[1..].parse().unwrap();
            *team = json!(format!("t{}", (t + 1) % 10));
        }
        one_change(&api, &r, pol.clone(), change_timeout, &mut pol_lat);
    }
    eprintln!("policy changes done");

    // A burst of pod label changes back to back (a rollout), local and remote alternately,
    // then one new local pod, the sentinel. Pod events reach the daemon in order on one watch
    // and each sync takes every change gathered before it, so the sentinel's endpoint in the maps means
    // every change before it is there too. Timed from the first apply to that endpoint.
    let synced = syncs(&r);
    let spare: IpAddr = spec.spare_local_ip().parse().unwrap();
    let mut batch: Vec<Value> = (0..burst)
        .map(|i| relabelled(i, 101, format!("b{i}")))
        .collect();
    let mut sentinel = obj("Pod", "p0");
    sentinel["metadata"]["name"] = json!("bench-sentinel");
    sentinel["status"]["podIP"] = json!(spare.to_string());
    batch.push(sentinel);
    assert!(!has_endpoint(&r.pin_dir, spare));
    let t0 = Instant::now();
    for p in batch {
        api.apply(p);
    }
    let applied_ms = t0.elapsed().as_secs_f64() * 1e3;
    while !has_endpoint(&r.pin_dir, spare) {
        assert!(
            t0.elapsed() < change_timeout * 10,
            "the burst never reached the maps"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
    let burst_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Idle again: no change pending, the last sync counted.
    let mut burst_syncs = syncs(&r) - synced;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let n = syncs(&r) - synced;
        if n == burst_syncs {
            break;
        }
        burst_syncs = n;
    }
    eprintln!("burst done");
    let (rss, hwm) = rss_kib(r.child.id());
    let daemon_status = status(&r);
    let status_line = Command::new(OBSERVER)
        .arg("status")
        .arg("--socket")
        .arg(&r.socket)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.contains("policy propagation"))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    drop(r);

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

    let prop = &daemon_status["kube"]["propagation"];
    let report = json!({
        "size": size, "pods": spec.pods, "policies": spec.policies, "nodes": spec.nodes,
        "local_pods": local, "rounds": rounds, "changes": changes, "burst": burst,
        "api_server_load_s": load_s,
        "start_to_enforcing_ms": {"kube_median": median(&mut start_kube), "no_source_median": median(&mut start_none),
            "kube_runs": start_kube, "no_source_runs": start_none},
        "label_change_to_maps_ms": pod_lat.report(),
        "namespace_label_change_to_maps_ms": ns_lat.report(),
        "policy_change_to_maps_ms": pol_lat.report(),
        "burst_to_maps_ms": {"changes": burst, "total": burst_ms, "applied_in": applied_ms, "syncs": burst_syncs},
        "baseline_full_compile_ms": median(&mut compile_ms),
        "rss_kib": {"no_source": rss_none, "after_sync": rss_synced, "peak_after_sync": hwm_synced,
            "after_changes": rss, "peak": hwm},
        "daemon_propagation": {"syncs": prop["syncs"],
            "p50_ms": prop["p50_seconds"].as_f64().map(|v| v * 1e3),
            "p99_ms": prop["p99_seconds"].as_f64().map(|v| v * 1e3)},
    });
    if json_out {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
        println!("observer status: {status_line}");
    }
}
