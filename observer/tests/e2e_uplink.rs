//! The uplink programs: tc ingress (or XDP, where it is attached) judges the ingress policy of
//! packets addressed straight to local pods (flat model, routed cross-node pod traffic) and drops
//! denied ones before the stack; tc counts the wire side in both directions; the attachments
//! survive a daemon restart.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use observer_tests::{flood, in_netns, tcp_connects, Model, PodSpec, TestBed, EXT_IP};
use serde_json::Value;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

const POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: api}}
    ports:
    - {protocol: TCP, port: 8080}
"#;

/// Packets of an uplink counter (point, local, remote) from `observer status`.
fn uplink(s: &Value, point: &str, local: &str, remote: &str) -> u64 {
    s["uplink_counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["point"] == point && c["local"] == local && c["remote"] == remote)
        .map(|c| c["packets"].as_u64().unwrap())
        .unwrap_or(0)
}

fn serve(ns: &str, addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let l = in_netns(ns, move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).ok();
                    c.set_read_timeout(Some(Duration::from_secs(1))).ok();
                    let mut b = [0u8; 16];
                    if let Ok(n) = c.read(&mut b) {
                        let _ = c.write_all(&b[..n]);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

fn wait_policy(d: &observer_tests::Daemon) {
    let t0 = Instant::now();
    while d.status()["policies"].as_array().unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "policy not loaded");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A flat-model node with `web` isolated to `api` on port 8080, and `api` and `intruder` on
/// node-2, reaching web across the VNet with their pod IPs.
struct Flat {
    bed: TestBed,
    args: Vec<String>,
    dst: SocketAddr,
    api: String,
    intruder: String,
    stop: Arc<AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Flat {
    fn new(tag: &str) -> Flat {
        let mut bed = TestBed::new(tag, Model::Flat).unwrap();
        bed.add_pod(PodSpec {
            namespace: "shop",
            name: "web",
            labels: &[("app", "web")],
            ports: &[("http", 8080, "TCP")],
        })
        .unwrap();
        for (name, app) in [("api", "api"), ("intruder", "intruder")] {
            bed.add_remote_pod(PodSpec {
                namespace: "shop",
                name,
                labels: &[("app", app)],
                ports: &[],
            })
            .unwrap();
        }
        std::fs::write(bed.cluster_dir().join("policy.yaml"), POLICY).unwrap();
        let web = bed.pod("web").clone();
        let stop = Arc::new(AtomicBool::new(false));
        let server = serve(&web.netns, SocketAddr::new(web.ip4, 8080), stop.clone());
        Flat {
            args: bed.model_args(),
            dst: SocketAddr::new(web.ip4, 8080),
            api: bed.remote_pod("api").netns.clone(),
            intruder: bed.remote_pod("intruder").netns.clone(),
            bed,
            stop,
            server: Some(server),
        }
    }

    fn start(&mut self, extra: &[&str]) -> observer_tests::Daemon {
        let mut args: Vec<&str> = self.args.iter().map(|s| s.as_str()).collect();
        args.extend(extra);
        let daemon = self.bed.start_daemon(Path::new(OBSERVER), &args).unwrap();
        wait_policy(&daemon);
        daemon
    }

    fn api_connects(&self) -> bool {
        tcp_connects(&self.api, self.dst, Duration::from_secs(2))
    }

    fn intruder_connects(&self) -> bool {
        tcp_connects(&self.intruder, self.dst, Duration::from_millis(1500))
    }

    /// Whether the node's uplink has an XDP program, as `ip link` shows it.
    fn uplink_has_xdp(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.bed.node_ns, "link", "show", "eth0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    }

    /// The denied intruder's openers die at `point` on the uplink (`xdp_drop`, `tc_drop`) and
    /// the allowed api's connect; the drop record names the policy and the uplink. Returns
    /// the uplink's ifindex.
    fn judged_at(&self, daemon: &observer_tests::Daemon, point: &str) -> u64 {
        let s = daemon.status();
        let ifindex = s["uplinks"][0]["ifindex"].as_u64().unwrap();
        assert!(self.api_connects());
        let before = daemon.status();
        assert!(!self.intruder_connects());
        let after = daemon.status();
        let drops = uplink(&after, point, "pod", "any") - uplink(&before, point, "pod", "any");
        assert!(drops >= 1, "{point}: {after:#}");
        // Wire-side tc counters saw the allowed connection both ways, pod IP to pod IP.
        assert!(uplink(&after, "tc_ingress", "pod", "pod") > 0, "{after:#}");
        assert!(uplink(&after, "tc_egress", "pod", "pod") > 0, "{after:#}");
        let t0 = Instant::now();
        let drop = loop {
            if let Some(first) = intruder_drops(daemon).into_iter().next() {
                break first;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "no drop record");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(drop["destination"]["pod"], "web", "{drop:#}");
        assert_eq!(drop["isolated_by"][0]["name"], "web-from-api", "{drop:#}");
        assert_eq!(drop["interface"], ifindex, "judged on the uplink: {drop:#}");
        assert!(drop["counters"]["packets_out"].as_u64().unwrap() >= 1);
        assert!(
            drop.get("snat").is_none(),
            "a dropped connection never left"
        );
        ifindex
    }
}

impl Drop for Flat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}

/// On a veth uplink (kind's nodes, the virtual node) XDP stays off by default: generic XDP
/// would run where tc ingress runs, at a cost. tc ingress drops the denied openers instead,
/// before netfilter and the kernel's conntrack, through a restart and under a flood.
#[test]
fn tc_drops_denied_cross_node_openers_before_the_stack() {
    let mut f = Flat::new("upx");
    let daemon = f.start(&[]);
    let s = daemon.status();
    let up = &s["uplinks"][0];
    assert_eq!(up["name"], "eth0", "{s:#}");
    assert_eq!(
        up["xdp"], "off",
        "no XDP on a veth uplink by default: {s:#}"
    );
    assert_eq!(up["ingress_policy"], "tc", "{s:#}");
    assert!(!f.uplink_has_xdp());
    f.judged_at(&daemon, "tc_drop");
    assert_eq!(uplink(&daemon.status(), "xdp", "pod", "any"), 0);

    // Restart: the tc link is taken over in place and keeps dropping.
    f.bed.stop_daemon(&daemon);
    assert!(!tcp_connects(
        &f.intruder,
        f.dst,
        Duration::from_millis(500)
    ));
    let daemon = f.start(&[]);
    let b = uplink(&daemon.status(), "tc_drop", "pod", "any");
    assert!(!f.intruder_connects());
    assert!(uplink(&daemon.status(), "tc_drop", "pod", "any") > b);
    assert!(f.api_connects());

    // A flood of denied openers (spoofed ports from the intruder's address): tc keeps no
    // conntrack entry for them, samples their records under --drop-events-per-cpu-second,
    // and accounts every packet: records + suppressed + lost == dropped.
    f.bed.stop_daemon(&daemon);
    let daemon = f.start(&["--drop-events-per-cpu-second", "5"]);
    let records = || intruder_drops(&daemon).len() as u64;
    let (s0, r0) = (daemon.status(), records());
    let intruder = f.bed.remote_pod("intruder").clone();
    let IpAddr::V4(src) = intruder.ip4 else {
        panic!("intruder has no IPv4 address")
    };
    let IpAddr::V4(web4) = f.dst.ip() else {
        panic!("web has no IPv4 address")
    };
    let spec = flood::onto_node1(&f.bed, vec![src], SocketAddrV4::new(web4, 8080), 0).unwrap();
    let stop_flood = Arc::new(AtomicBool::new(false));
    let sender = flood::start(spec, stop_flood.clone());
    std::thread::sleep(Duration::from_millis(200));
    stop_flood.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let s1 = daemon.status();
    let dropped = uplink(&s1, "tc_drop", "pod", "any") - uplink(&s0, "tc_drop", "pod", "any");
    assert!(dropped >= 1000, "sent {sent}, tc dropped {dropped}: {s1:#}");
    let suppressed = observer_tests::kernel_stat(&s1, "drop_events_suppressed")
        - observer_tests::kernel_stat(&s0, "drop_events_suppressed");
    assert!(suppressed > 0, "{s1:#}");
    observer_tests::assert_drops_untracked(&s0, &s1, dropped, || records() - r0);
    assert!(f.api_connects());
}

/// XDP judges the openers where it is asked for (`--uplink-xdp native`: driver mode, as on a
/// NIC that has it), and keeps doing so through a restart; turned off, tc takes over on the
/// next start and the XDP link goes.
#[test]
fn xdp_judges_when_asked_and_tc_takes_over_without_it() {
    let mut f = Flat::new("upq");
    let daemon = f.start(&["--uplink-xdp", "native"]);
    let s = daemon.status();
    assert_eq!(s["uplinks"][0]["xdp"], "native", "{s:#}");
    assert_eq!(s["uplinks"][0]["ingress_policy"], "xdp", "{s:#}");
    let ifindex = f.judged_at(&daemon, "xdp_drop");
    let pin = daemon
        .pin_dir
        .join(format!("links/{ifindex}-uplink-xdp-native"));
    assert!(pin.exists());
    assert!(f.uplink_has_xdp());
    let s = daemon.status();
    // XDP took the allowed connection's packets for the pod's (the local range's bitmap),
    // every one that tc then saw arrive for it; tc judged none.
    let tc_in: u64 = ["pod", "node", "world"]
        .iter()
        .map(|r| uplink(&s, "tc_ingress", "pod", r))
        .sum();
    assert!(uplink(&s, "xdp", "pod", "any") >= tc_in, "{s:#}");
    assert_eq!(uplink(&s, "tc_drop", "pod", "any"), 0, "{s:#}");

    // Restart: the XDP link is taken over in place.
    f.bed.stop_daemon(&daemon);
    let daemon = f.start(&["--uplink-xdp", "native"]);
    let b = uplink(&daemon.status(), "xdp_drop", "pod", "any");
    assert!(!f.intruder_connects());
    assert!(uplink(&daemon.status(), "xdp_drop", "pod", "any") > b);

    // Back to the default: tc judges, XDP is gone from the uplink and from the pins.
    f.bed.stop_daemon(&daemon);
    let daemon = f.start(&[]);
    let s = daemon.status();
    assert_eq!(s["uplinks"][0]["xdp"], "off", "{s:#}");
    assert!(!pin.exists());
    assert!(!f.uplink_has_xdp(), "XDP left on the uplink");
    f.judged_at(&daemon, "tc_drop");
}

/// The drop records of the intruder's connections the daemon holds.
fn intruder_drops(daemon: &observer_tests::Daemon) -> Vec<Value> {
    let out = Command::new(OBSERVER)
        .args(["flows", "--socket"])
        .arg(&daemon.socket)
        .args([
            "--verdict",
            "dropped",
            "--from-pod",
            "shop/intruder",
            "--last",
            "100000",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Overlay: pod egress to the world leaves with the node's address (tc egress `node`/`world`);
/// `--no-uplink-programs` leaves the uplink alone.
#[test]
fn tc_counts_the_wire_side_and_can_be_turned_off() {
    let mut bed = TestBed::new("upt", Model::Overlay).unwrap();
    bed.add_app_pods("shop", &[("web", "web")]).unwrap();
    let args = bed.model_args();
    let mut args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let daemon = bed.start_daemon(Path::new(OBSERVER), &args).unwrap();
    let web = bed.pod("web").clone();
    let ext: SocketAddr = format!("{EXT_IP}:9").parse().unwrap();
    let before = daemon.status();
    // Nothing listens on the external host: the SYN goes out, a RST comes back.
    let _ = in_netns(&web.netns, move || {
        TcpStream::connect_timeout(&ext, Duration::from_secs(1))
    });
    let after = daemon.status();
    let out = uplink(&after, "tc_egress", "node", "world")
        - uplink(&before, "tc_egress", "node", "world");
    let back = uplink(&after, "tc_ingress", "node", "world")
        - uplink(&before, "tc_ingress", "node", "world");
    assert!(out >= 1 && back >= 1, "{after:#}");
    assert_eq!(
        uplink(&after, "tc_egress", "pod", "world"),
        0,
        "no pod IP leaves an overlay node: {after:#}"
    );
    bed.stop_daemon(&daemon);

    args.push("--no-uplink-programs");
    let mut bed = TestBed::new("upn", Model::Overlay).unwrap();
    bed.add_app_pods("shop", &[("web", "web")]).unwrap();
    let daemon = bed.start_daemon(Path::new(OBSERVER), &args).unwrap();
    let s = daemon.status();
    assert!(s["uplinks"].as_array().unwrap().is_empty(), "{s:#}");
    // No uplink link pins (on clsact kernels there may be no link pins at all).
    let links = daemon.pin_dir.join("links").read_dir();
    assert!(!links
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("uplink")));
}

/// The uplink's tc programs sort each wire packet by its far end through the ipcache, and a
/// pod's new connection takes its class from it; both keep the ipcache's IPv4 answers per CPU.
/// A change to the cluster's addresses must show from the next packet on, not when the cached
/// answer happens to be replaced.
#[test]
fn wire_counts_and_classes_follow_changes_to_the_cluster_addresses() {
    use aya::programs::{TestRun, TestRunOptions};
    use observer::bpf::{Datapath, ScratchPins};
    use observer_common::{programs, uplink, EndpointInfo, IpcacheEntry, RemoteKind, TrafficClass};

    observer_tests::ensure_root().unwrap();
    let pins = ScratchPins::new("test-uplink-kinds");
    let mut dp = Datapath::load(pins.path()).expect("load programs");
    dp.load_uplink_programs().unwrap();
    let (pod, far) = ([10, 244, 1, 10], [10, 100, 0, 7]);
    dp.insert_endpoint(IpAddr::from(pod), EndpointInfo { id: 1, flags: 0 })
        .unwrap();
    dp.settle_local_range_from_endpoints().unwrap();
    let pkt = observer::bench::packet64_between(far, pod, 17, 53, 40000, 0);
    let send = |dp: &mut Datapath, n: u32| {
        let mut o = TestRunOptions::new();
        o.data_in = Some(&pkt);
        o.repeat = n;
        let r = dp
            .prog(programs::UPLINK_INGRESS)
            .unwrap()
            .test_run(o)
            .unwrap();
        assert_eq!(r.return_value as i32, -1, "the uplink's tc only counts");
    };
    let count = |dp: &Datapath, remote: u32| {
        dp.uplink_counters().unwrap()
            [uplink::index(uplink::TC_IN, uplink::LOCAL_POD, remote) as usize]
            .packets
    };
    let far_net: ipnet::IpNet = "10.100.0.0/24".parse().unwrap();
    let key = || {
        let (plen, data) = observer::cluster::ipcache_key(far_net);
        aya::maps::lpm_trie::Key::new(plen, data)
    };

    // A new connection from the pod to `far` on source port `sport`: its class.
    let class_of_new = |dp: &mut Datapath, sport: u16| {
        let pkt = observer::bench::packet64_between(pod, far, 17, sport, 53, 0);
        let mut o = TestRunOptions::new();
        o.data_in = Some(&pkt);
        dp.prog(programs::FROM_POD).unwrap().test_run(o).unwrap();
        let entries = dp.conntrack_entries().unwrap();
        let (_, e) = entries
            .iter()
            .find(|(k, _)| k.port_a == sport || k.port_b == sport)
            .expect("the connection's entry");
        TrafficClass::from_u8(e.class)
    };

    send(&mut dp, 3);
    assert_eq!(count(&dp, uplink::REMOTE_WORLD), 3);
    assert_eq!(count(&dp, uplink::REMOTE_POD), 0);
    assert_eq!(class_of_new(&mut dp, 41000), TrafficClass::PodToWorld);

    // The address becomes a pod of another node, as the daemon writes it: the map, then the
    // generation.
    dp.ipcache_mut()
        .unwrap()
        .insert(
            &key(),
            IpcacheEntry {
                identity: 7,
                kind: RemoteKind::RemotePod as u8,
                _pad: [0; 3],
            },
            0,
        )
        .unwrap();
    dp.bump_policy_gen().unwrap();
    send(&mut dp, 2);
    assert_eq!(count(&dp, uplink::REMOTE_POD), 2);
    assert_eq!(count(&dp, uplink::REMOTE_WORLD), 3);
    assert_eq!(class_of_new(&mut dp, 41001), TrafficClass::PodToPodRemote);

    // And stops being one.
    dp.ipcache_mut().unwrap().remove(&key()).unwrap();
    dp.bump_policy_gen().unwrap();
    send(&mut dp, 4);
    assert_eq!(count(&dp, uplink::REMOTE_WORLD), 7);
    assert_eq!(count(&dp, uplink::REMOTE_POD), 2);
    assert_eq!(class_of_new(&mut dp, 41002), TrafficClass::PodToWorld);
}
