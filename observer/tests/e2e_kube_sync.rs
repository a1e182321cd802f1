//! `--source kube` against an in-process API server speaking the real list/watch protocol,
//! through kube-rs's real client: the pinned maps must equal what the compiler makes of the
//! API server's objects after every change, through 410 Gone, dropped watches and an outage,
//! and real connections must get the verdicts those objects say.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use observer::{
    bpf::diff_pinned,
    cluster::{add_object, Cluster},
    daemon::{compile_for_node, host_addresses, ALLOCATOR_FILE},
    policy::compile::Allocator,
};
use observer_tests::{
    in_netns, kubeapi::FakeApi, tcp_connects, Daemon, Pod, PodSpec, TestBed, NODE_IP, NODE_NAME,
};
use serde_json::{json, Value};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// The test's own record of what the API server holds, to compute the expected maps.
#[derive(Default)]
struct World {
    objects: BTreeMap<(String, String, String), Value>,
}

impl World {
    fn apply(&mut self, api: &FakeApi, obj: Value) {
        let key = (
            obj["kind"].as_str().unwrap().to_string(),
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            obj["metadata"]["name"].as_str().unwrap().to_string(),
        );
        api.apply(obj.clone());
        self.objects.insert(key, obj);
    }

    fn delete(&mut self, api: &FakeApi, kind: &str, ns: Option<&str>, name: &str) {
        assert!(api.delete(kind, ns, name));
        self.objects
            .remove(&(kind.into(), ns.unwrap_or("").into(), name.into()));
    }

    /// What the cluster means for the datapath: finished pods hold no address any more.
    fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for o in self.objects.values() {
            let phase = o["status"]["phase"].as_str().unwrap_or("");
            if o["kind"] == "Pod" && (phase == "Succeeded" || phase == "Failed") {
                continue;
            }
            add_object(&mut c, "test", o.clone());
        }
        c
    }
}

fn pod_json(p: &Pod, extra_labels: &[(&str, &str)]) -> Value {
    let mut labels: serde_json::Map<String, Value> = p
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    for (k, v) in extra_labels {
        labels.insert(k.to_string(), json!(v));
    }
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|(n, port, proto)| json!({"name": n, "containerPort": port, "protocol": proto}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.name, "namespace": p.namespace, "labels": labels},
        "spec": {"nodeName": NODE_NAME, "containers": [{"name": "main", "image": "example", "ports": ports}]},
        "status": {"phase": "Running", "podIP": p.ip4.to_string(),
                   "podIPs": [{"ip": p.ip4.to_string()}, {"ip": p.ip6.to_string()}]}
    })
}

fn base_objects(bed: &TestBed) -> Vec<Value> {
    let mut v = vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "x", "labels": {"kubernetes.io/metadata.name": "x"}}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME},
               "spec": {"podCIDR": "10.244.1.0/24"},
               "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-2"},
               "spec": {"podCIDR": "10.244.2.0/24"},
               "status": {"addresses": [{"type": "InternalIP", "address": "10.224.0.5"}]}}),
        // db accepts TCP 8080 from app=web only.
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "db-from-web", "namespace": "x"},
               "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                     "ports": [{"port": "http"}]}]}}),
    ];
    for p in &bed.pods {
        v.push(pod_json(p, &[]));
    }
    v
}

/// Waits until the pinned maps hold exactly what the compiler makes of `world`, with the
/// daemon's own identity numbering.
fn wait_maps(bed: &TestBed, d: &Daemon, world: &World, what: &str) {
    let host = in_netns(&bed.node_ns, host_addresses).unwrap();
    let cluster = world.cluster();
    let t0 = Instant::now();
    let mut last = Vec::new();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(bytes) = std::fs::read(bed.dir.join("state").join(ALLOCATOR_FILE)) {
            let mut alloc = Allocator::from_json(&bytes).unwrap();
            let want =
                compile_for_node(&cluster, NODE_NAME, &host, &Default::default(), &mut alloc);
            last = diff_pinned(&d.pin_dir, &want).unwrap();
            if last.is_empty() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{what}: the maps never matched the API server's objects; differences:\n{}\nlog:\n{}",
        last.join("\n"),
        d.log_text()
    );
}

fn connects(ns: &str, dst: SocketAddr) -> bool {
    tcp_connects(ns, dst, Duration::from_millis(500))
}

fn wait_connects(ns: &str, dst: SocketAddr, want: bool, what: &str) {
    let t0 = Instant::now();
    while connects(ns, dst) != want {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: connection from {ns} to {dst} should {}",
            if want { "succeed" } else { "be dropped" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pod_spec<'a>(
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
    ports: &'a [(&'a str, u16, &'a str)],
) -> PodSpec<'a> {
    PodSpec {
        namespace: "x",
        name,
        labels,
        ports,
    }
}

#[test]
fn the_maps_follow_the_api_server_through_watch_errors_and_outages() {
    let mut bed = TestBed::overlay("ks").unwrap();
    bed.add_pod(pod_spec("web", &[("app", "web")], &[]))
        .unwrap();
    bed.add_pod(pod_spec("db", &[("app", "db")], &[("http", 8080, "TCP")]))
        .unwrap();
    bed.add_pod(pod_spec("other", &[("app", "other")], &[]))
        .unwrap();
    let (web, db, other) = (
        bed.pod("web").clone(),
        bed.pod("db").clone(),
        bed.pod("other").clone(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let server = observer_tests::accept_tcp(&db.netns, 8080, stop.clone());
    let db_addr = SocketAddr::new(db.ip4, 8080);

    let api = FakeApi::start_in_netns(&bed.node_ns).unwrap();
    let mut world = World::default();
    for o in base_objects(&bed) {
        world.apply(&api, o);
    }
    let kubeconfig = bed.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let d = bed
        .start_daemon(
            OBSERVER.as_ref(),
            &[
                "--source",
                "kube",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
            ],
        )
        .unwrap();
    wait_maps(&bed, &d, &world, "initial list");
    let s = d.status();
    assert_eq!(s["kube"]["synced"], true, "{s}");
    assert_eq!(s["pods"], 3, "{s}");
    assert_eq!(s["policies"], json!(["x/db-from-web"]), "{s}");
    // The verdicts the objects say, on real connections.
    wait_connects(
        &web.netns,
        db_addr,
        true,
        "web -> db allowed by x/db-from-web",
    );
    wait_connects(&other.netns, db_addr, false, "other -> db: db is isolated");

    // A label change reaches the maps, and the connection.
    world.apply(&api, pod_json(&other, &[("app", "web")]));
    wait_maps(&bed, &d, &world, "label change");
    wait_connects(&other.netns, db_addr, true, "other relabelled app=web");

    // Pods that must not become endpoints: no IP yet, finished (its IP may belong to someone
    // else now), host network.
    world.apply(
        &api,
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pending", "namespace": "x", "labels": {"app": "web"}},
        "spec": {"nodeName": NODE_NAME, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Pending"}}),
    );
    world.apply(&api, json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "finished", "namespace": "x", "labels": {"app": "web"}},
        "spec": {"nodeName": NODE_NAME, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Succeeded", "podIP": "10.244.1.250", "podIPs": [{"ip": "10.244.1.250"}]}}));
    world.apply(&api, json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hostnet", "namespace": "x", "labels": {"app": "web"}},
        "spec": {"nodeName": NODE_NAME, "hostNetwork": true, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": NODE_IP, "podIPs": [{"ip": NODE_IP}]}}));
    // The maps do not change for them, so wait for the daemon's view: the finished pod is
    // gone, the host-network pod is no endpoint, the pending one is (without an address yet).
    let t0 = Instant::now();
    loop {
        let s = d.status();
        if s["pods"] == 5 && s["local_endpoints"] == 4 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_maps(&bed, &d, &world, "pending, finished and host-network pods");

    // 410 Gone: the watch relists without flushing, and what changed meanwhile lands.
    let lists_before: u64 = d.status()["kube"]["resources"][0]["lists"]
        .as_u64()
        .unwrap();
    api.expire_history();
    world.apply(&api, pod_json(&other, &[("app", "other")]));
    wait_maps(&bed, &d, &world, "after 410 Gone");
    wait_connects(&other.netns, db_addr, false, "other back to app=other");
    let t0 = Instant::now();
    while d.status()["kube"]["resources"][0]["lists"]
        .as_u64()
        .unwrap()
        <= lists_before
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "pods never relisted after 410"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Dropped connections: the watch resumes and misses nothing.
    api.drop_watches();
    world.apply(
        &api,
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "db-from-other", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "other"}}}]}]}}),
    );
    wait_maps(&bed, &d, &world, "after dropped watches");
    wait_connects(&other.netns, db_addr, true, "x/db-from-other admits other");

    // Outage: the last known state stays enforced, status says how stale it is, and the
    // daemon catches up when the API server returns.
    api.set_unavailable(true);
    let t0 = Instant::now();
    loop {
        let s = d.status();
        if s["kube"]["stale_since"].is_string() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "outage never shown: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = std::process::Command::new(OBSERVER)
        .args(["status", "--socket", d.socket.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("STALE since"), "{text}");
    wait_maps(&bed, &d, &world, "during the outage");
    assert!(
        connects(&other.netns, db_addr),
        "allowed traffic keeps flowing in the outage"
    );
    assert!(
        connects(&web.netns, db_addr),
        "allowed traffic keeps flowing in the outage"
    );
    // Changed while the daemon cannot see.
    world.delete(&api, "NetworkPolicy", Some("x"), "db-from-other");
    assert!(
        connects(&other.netns, db_addr),
        "no change seen, none applied"
    );
    api.set_unavailable(false);
    wait_maps(&bed, &d, &world, "after the outage");
    wait_connects(
        &other.netns,
        db_addr,
        false,
        "db-from-other deleted during the outage",
    );
    let t0 = Instant::now();
    while !d.status()["kube"]["stale_since"].is_null() {
        assert!(t0.elapsed() < Duration::from_secs(15), "never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Deleting the pods' objects removes their endpoints.
    world.delete(&api, "Pod", Some("x"), "other");
    wait_maps(&bed, &d, &world, "pod deleted");

    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    let metrics = d.get("/metrics").unwrap();
    for m in [
        "observer_kube_watch_up{resource=\"pods\"} 1",
        "observer_kube_sync_latency_seconds_count",
        "observer_kube_lists_total{resource=\"pods\"}",
    ] {
        assert!(metrics.contains(m), "{m} missing from:\n{metrics}");
    }
}
