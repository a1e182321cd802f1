//! Interfaces come and go while the daemon runs; the daemon itself restarts. Counting must
//! follow both.
use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use observer_tests::{in_netns, ns_run, PodSpec, TestBed};
use serde_json::Value;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

fn attached(d: &observer_tests::Daemon) -> Vec<String> {
    let s: Value = serde_json::from_str(&d.get("/v1/status").unwrap()).unwrap();
    s["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[1].as_str().unwrap().to_string())
        .collect()
}

fn flow<'a>(records: &'a [Value], proto: &str, src: &str, dst: &str) -> Option<&'a Value> {
    records
        .iter()
        .find(|r| r["l4"]["protocol"] == proto && r["ip"]["src"] == src && r["ip"]["dst"] == dst)
}

#[test]
fn a_pod_created_after_start_is_attached_counted_and_released() {
    let mut bed = TestBed::overlay("lnk").unwrap();
    bed.add_pod(PodSpec {
        namespace: "x",
        name: "a",
        labels: &[],
        ports: &[],
    })
    .unwrap();
    let daemon = bed.start_daemon(OBSERVER.as_ref(), &[]).unwrap();
    assert_eq!(attached(&daemon), vec!["lxc0"]);

    // The bare veth first, to time the attach from the kernel's announcement.
    let t0 = Instant::now();
    ns_run(
        &bed.node_ns,
        &[
            "ip", "link", "add", "lxcprobe", "type", "veth", "peer", "name", "probe0",
        ],
    )
    .unwrap();
    let created = t0.elapsed();
    let mut latency = None;
    while t0.elapsed() < Duration::from_secs(5) {
        if attached(&daemon).iter().any(|n| n == "lxcprobe") {
            latency = Some(t0.elapsed().saturating_sub(created));
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let latency = latency.expect("new veth never attached");
    eprintln!("attach latency after `ip link add` returned: {latency:?}");
    ns_run(&bed.node_ns, &["ip", "link", "del", "lxcprobe"]).unwrap();
    let t1 = Instant::now();
    while attached(&daemon).iter().any(|n| n == "lxcprobe") {
        assert!(
            t1.elapsed() < Duration::from_secs(5),
            "deleted veth still listed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // A real pod: its first packets are counted, exactly.
    bed.add_pod(PodSpec {
        namespace: "x",
        name: "late",
        labels: &[],
        ports: &[],
    })
    .unwrap();
    let late = bed.pod("late").clone();
    // The dir source re-reads its folder about once a second, as a watch would deliver the pod.
    let t2 = Instant::now();
    loop {
        let s: Value = serde_json::from_str(&daemon.get("/v1/status").unwrap()).unwrap();
        // The kernel was probed, and the attach mode follows what it offers (TCX on >= 6.6,
        // clsact before: this test also runs in the Linux 6.1 guest).
        let features = s["kernel_features"].as_str().unwrap();
        assert!(features.starts_with("11/11 required present"), "{features}");
        let tcx = s["attach_mode"] == "tcx";
        assert_eq!(
            features.ends_with("TCX yes"),
            tcx,
            "{features} vs {}",
            s["attach_mode"]
        );
        if s["pods"] == 2 {
            break;
        }
        assert!(
            t2.elapsed() < Duration::from_secs(10),
            "new pod never read from the source"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = bed.pod("a").clone();
    ns_run(
        &late.netns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "4",
            "-i",
            "0.2",
            "-W",
            "2",
            &a.ip4.to_string(),
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let ct = daemon.get_lines("/v1/conntrack").unwrap();
    let r = flow(&ct, "ICMP", &late.ip4.to_string(), &a.ip4.to_string())
        .expect("late pod's ping tracked");
    assert_eq!(r["counters"]["packets_out"], 4);
    assert_eq!(r["counters"]["packets_in"], 4);
    assert_eq!(
        r["source"]["pod"], "late",
        "pod YAML picked up by the dir source: {}",
        r["source"]
    );
}

fn udp_round(ns: &str, src: SocketAddr, dst: SocketAddr, n: usize) {
    in_netns(ns, move || {
        let s = UdpSocket::bind(src).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 256];
        for _ in 0..n {
            s.send_to(&[1u8; 100], dst).unwrap();
            s.recv_from(&mut buf).unwrap();
        }
    })
    .unwrap();
}

/// Two pods of a node, `b` echoing 10 UDP datagrams on `port` (one connection from `a`), and a
/// daemon that saw the first 4 of them and was killed (SIGKILL: no chance to clean up).
struct KilledMidway {
    bed: TestBed,
    first: observer_tests::Daemon,
    a: observer_tests::Pod,
    b: observer_tests::Pod,
    src: SocketAddr,
    dst: SocketAddr,
    server: std::thread::JoinHandle<()>,
}

fn killed_midway(tag: &str, port: u16) -> KilledMidway {
    let mut bed = TestBed::overlay(tag).unwrap();
    bed.add_app_pods("x", &[("a", "a"), ("b", "b")]).unwrap();
    let (a, b) = (bed.pod("a").clone(), bed.pod("b").clone());
    let echo = in_netns(&b.netns, move || UdpSocket::bind(("::", port)).unwrap()).unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        for _ in 0..10 {
            let (n, from) = echo.recv_from(&mut buf).unwrap();
            echo.send_to(&buf[..n], from).unwrap();
        }
    });
    let src = SocketAddr::new(a.ip4, 43000 + port % 1000);
    let dst = SocketAddr::new(b.ip4, port);
    let first = bed.start_daemon(OBSERVER.as_ref(), &[]).unwrap();
    udp_round(&a.netns, src, dst, 4);
    unsafe { libc::kill(first.pid as i32, libc::SIGKILL) };
    bed.stop_daemon(&first);
    KilledMidway {
        bed,
        first,
        a,
        b,
        src,
        dst,
        server,
    }
}

impl KilledMidway {
    /// The last 6 datagrams under `second`; the connection's entry as it lists it.
    fn finish(self, second: &observer_tests::Daemon) -> Value {
        udp_round(&self.a.netns, self.src, self.dst, 6);
        self.server.join().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let ct = second.get_lines("/v1/conntrack").unwrap();
        flow(&ct, "UDP", &self.a.ip4.to_string(), &self.b.ip4.to_string())
            .expect("the connection is in the table")
            .clone()
    }
}

#[test]
fn a_restarted_daemon_readopts_pinned_maps_and_counters_continue() {
    let mut k = killed_midway("rst", 7007);
    assert!(
        k.first.pin_dir.join("OBS_CT4").exists(),
        "conntrack map pinned"
    );
    let second = k.bed.start_daemon(OBSERVER.as_ref(), &[]).unwrap();
    assert!(
        second.log_text().contains("re-adopting pinned maps"),
        "{}",
        second.log_text()
    );
    let r = k.finish(&second);
    // 4 before and 6 after the restart, one entry: 20 + 8 + 100 bytes each.
    assert_eq!(r["counters"]["packets_out"], 10);
    assert_eq!(r["counters"]["packets_in"], 10);
    assert_eq!(r["counters"]["bytes_out"], 10 * 128);
}

/// An upgrade from the version with one conntrack table for both families (`OBS_CT`, 40-byte
/// keys): the new daemon copies its connections into the tables by family and removes it, so
/// an open connection keeps its entry, its verdicts and its counters.
#[test]
fn an_upgrade_across_the_conntrack_split_keeps_open_connections() {
    use aya::maps::{HashMap, Map, MapData};
    use observer_common::{CtEntry, CtKey, CtKey4};
    let mut k = killed_midway("ctsplit", 7008);

    // What the old version leaves pinned: one table of both families under the full key, and
    // none of the new ones.
    let pins = &k.first.pin_dir;
    let held: Vec<(CtKey4, CtEntry)> = {
        let t = MapData::from_pin(pins.join("OBS_CT4")).unwrap();
        let t: HashMap<MapData, CtKey4, CtEntry> = HashMap::try_from(Map::LruHashMap(t)).unwrap();
        t.iter().map(|r| r.unwrap()).collect()
    };
    assert!(!held.is_empty(), "the connection is in the table");
    old_table(&pins.join("OBS_CT"));
    let mut old: HashMap<MapData, CtKey, CtEntry> = HashMap::try_from(Map::LruHashMap(
        MapData::from_pin(pins.join("OBS_CT")).unwrap(),
    ))
    .unwrap();
    for (k, e) in &held {
        old.insert(k.widen(), e, 0).unwrap();
    }
    drop(old);
    std::fs::remove_file(pins.join("OBS_CT4")).unwrap();
    std::fs::remove_file(pins.join("OBS_CT6")).unwrap();

    let second = k.bed.start_daemon(OBSERVER.as_ref(), &[]).unwrap();
    let log = second.log_text();
    assert!(
        log.contains("conntrack table of an earlier version") && log.contains("copied="),
        "{log}"
    );
    assert!(!second.pin_dir.join("OBS_CT").exists(), "old table removed");
    let r = k.finish(&second);
    // 4 before the upgrade and 6 after, one entry: carried over, not picked up again.
    assert_eq!(r["counters"]["packets_out"], 10);
    assert_eq!(r["counters"]["packets_in"], 10);
}

/// Pins at `path` an empty conntrack table of the layout before the split (an LRU hash map of
/// 40-byte keys and 88-byte entries), as that version's daemon created it.
fn old_table(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    let mut attr = [0u8; 128];
    for (at, v) in [(0, BPF_MAP_TYPE_LRU_HASH), (4, 40), (8, 88), (12, 4096)] {
        attr[at..at + 4].copy_from_slice(&u32::to_ne_bytes(v));
    }
    attr[28..34].copy_from_slice(b"OBS_CT");
    let bpf = |cmd: libc::c_long, attr: &mut [u8; 128]| unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len())
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr);
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(name.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    let r = bpf(BPF_OBJ_PIN, &mut attr);
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    unsafe { libc::close(fd as i32) };
}

/// Another tool's tc filter on `ifname`'s clsact ingress: observer's `tc_empty` program at a
/// priority of its own (this kernel has no other classifier built in). The filter outlives the
/// loader, as a tool's would.
fn foreign_filter(ns: &str, ifname: &str, tag: &str) {
    use aya::programs::tc::{NlOptions, TcAttachOptions, TcAttachType};
    let (ifname, pins) = (
        ifname.to_string(),
        std::path::PathBuf::from(format!("/sys/fs/bpf/observer-test-{tag}-foreign")),
    );
    in_netns(ns, move || {
        let mut dp = observer::bpf::Datapath::load(&pins).unwrap();
        dp.load_program(observer_common::programs::TC_EMPTY)
            .unwrap();
        let prog = dp.prog(observer_common::programs::TC_EMPTY).unwrap();
        let id = prog
            .attach_with_options(
                &ifname,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: 7,
                    handle: 7.into(),
                    ..Default::default()
                }),
            )
            .unwrap();
        // Dropping the link would delete the filter.
        std::mem::forget(prog.take_link(id).unwrap());
        drop(dp);
        std::fs::remove_dir_all(&pins).unwrap();
    })
    .unwrap();
}

/// What `tc` lists on an interface: its clsact qdisc (if any) and the filters on both hooks.
fn tc_state(ns: &str, ifname: &str) -> (bool, String) {
    let qdiscs = ns_run(ns, &["tc", "qdisc", "show", "dev", ifname]).unwrap();
    let mut filters = String::new();
    for hook in ["ingress", "egress"] {
        filters += &ns_run(ns, &["tc", "filter", "show", "dev", ifname, hook]).unwrap();
    }
    (qdiscs.contains("clsact"), filters)
}

/// On clsact (kernels before 6.6; `--attach-mode clsact` here), uninstall removes exactly what
/// observer added: its filters everywhere and the clsact qdiscs it created, but neither a qdisc
/// that was there before it nor one another tool has put a filter on since.
#[test]
fn uninstall_on_clsact_removes_only_what_observer_added() {
    let mut bed = TestBed::overlay("unc").unwrap();
    bed.add_app_pods("x", &[("a", "a"), ("b", "b"), ("c", "c")])
        .unwrap();
    let ns = bed.node_ns.clone();
    let [a, b, c] = ["a", "b", "c"].map(|p| bed.pod(p).host_if.clone());
    // a: another tool's qdisc, empty, there before observer.
    ns_run(&ns, &["tc", "qdisc", "add", "dev", &a, "clsact"]).unwrap();
    let daemon = bed
        .start_daemon(OBSERVER.as_ref(), &["--attach-mode", "clsact"])
        .unwrap();
    for i in [&a, &b, &c] {
        let (qdisc, filters) = tc_state(&ns, i);
        assert!(
            qdisc && filters.contains("from_pod") && filters.contains("to_pod"),
            "{i}: {filters}"
        );
    }
    // b: observer created its qdisc, then another tool put a filter on it.
    foreign_filter(&ns, &b, "unc");
    bed.stop_daemon(&daemon);

    // nsenter, not `ip netns exec`: that remounts /sys, hiding the bpffs with the pins.
    let netns = format!("--net=/run/netns/{ns}");
    let out = observer_tests::run(&[
        "nsenter",
        &netns,
        OBSERVER,
        "uninstall",
        "--pin-dir",
        daemon.pin_dir.to_str().unwrap(),
    ])
    .unwrap();
    eprintln!("{out}");
    let (qa, fa) = tc_state(&ns, &a);
    assert!(
        qa,
        "the qdisc that was there before observer was removed:\n{out}"
    );
    assert!(fa.trim().is_empty(), "{a} still has filters: {fa}");
    let (qb, fb) = tc_state(&ns, &b);
    assert!(
        qb,
        "the qdisc another tool's filter is on was removed:\n{out}"
    );
    assert!(
        fb.contains("tc_empty") && !fb.contains("from_pod") && !fb.contains("to_pod"),
        "{b}: only the other tool's filter should be left: {fb}"
    );
    assert!(
        out.contains(&format!(
            "kept clsact qdisc on {b}: 1 filter(s) of another tool"
        )),
        "{out}"
    );
    let (qc, fc) = tc_state(&ns, &c);
    assert!(
        !qc && fc.trim().is_empty(),
        "{c}: observer's qdisc left behind: {fc}"
    );
    assert!(
        out.contains(&format!("removed clsact qdisc on {c}")),
        "{out}"
    );
    // Nothing of observer's anywhere else on the node (the uplink too).
    for l in ns_run(&ns, &["ip", "-o", "link", "show"]).unwrap().lines() {
        let name = l
            .split(':')
            .nth(1)
            .unwrap()
            .trim()
            .split('@')
            .next()
            .unwrap()
            .to_string();
        if name == a || name == b {
            continue;
        }
        let (q, f) = tc_state(&ns, &name);
        assert!(!q, "{name} keeps a clsact qdisc after uninstall: {f}");
    }
    assert!(
        !daemon.pin_dir.exists(),
        "pins left in {}",
        daemon.pin_dir.display()
    );
}
