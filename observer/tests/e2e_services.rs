//! Real-cluster semantics on the virtual node: Services programmed as kube-proxy programs them
//! (nftables DNAT in PREROUTING and OUTPUT, hairpin masquerade), a DNS server behind the
//! kube-dns Service on the other node, a namespace under default-deny with the usual allow-DNS
//! and allow-db rules, and connections from the node itself (kubelet probes).
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use observer_tests::{
    accept_tcp, default_deny_with_dns, dns, kernel_stat, tcp_connects, PodSpec, Service, TestBed,
};
use serde_json::Value;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");
const T: Duration = Duration::from_millis(800);

/// Added to `observer_tests::default_deny_with_dns("shop")`.
const POLICIES: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-to-db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-outside, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 203.0.113.0/24}}]
    ports: [{port: 8080}]
"#;

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Records matching `f`, waiting up to 5 s for at least one.
fn records(d: &observer_tests::Daemon, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    let t = Instant::now();
    loop {
        let v: Vec<Value> = d.flows().unwrap().into_iter().filter(&f).collect();
        if !v.is_empty() || t.elapsed() > Duration::from_secs(5) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Cluster {
    bed: TestBed,
    stop: Arc<AtomicBool>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// shop/web and shop/db, shop/other on node-1; shop/db2 and kube-system/coredns on node-2;
/// Services db (local backend), db-remote (node-2), other, kube-dns.
fn cluster(tag: &str, kubenet: bool) -> Cluster {
    let mut bed = if kubenet {
        TestBed::kubenet(tag).unwrap()
    } else {
        TestBed::overlay(tag).unwrap()
    };
    let port = [("http", 8080u16, "TCP")];
    for (ns, name, labels) in [
        ("shop", "web", ("app", "web")),
        ("shop", "db", ("app", "db")),
        ("shop", "other", ("app", "other")),
    ] {
        bed.add_pod(PodSpec {
            namespace: ns,
            name,
            labels: &[labels],
            ports: &port,
        })
        .unwrap();
    }
    bed.add_remote_pod(PodSpec {
        namespace: "shop",
        name: "db2",
        labels: &[("app", "db")],
        ports: &port,
    })
    .unwrap();
    bed.add_remote_pod(PodSpec {
        namespace: "kube-system",
        name: "coredns",
        labels: &[("k8s-app", "kube-dns")],
        ports: &[("dns", 53, "UDP")],
    })
    .unwrap();
    // (namespace, name, ClusterIP, port, target port, protocol, backend, NodePort)
    #[rustfmt::skip]
    let services: [(&str, &str, &str, u16, u16, &str, &str, Option<u16>); 7] = [
        ("shop", "db", "10.96.0.20", 80, 8080, "TCP", "db", None),
        ("shop", "db-remote", "10.96.0.21", 80, 8080, "TCP", "db2", None),
        ("shop", "other", "10.96.0.22", 80, 8080, "TCP", "other", None),
        ("kube-system", "kube-dns", "10.96.0.10", 53, 53, "UDP", "coredns", None),
        ("shop", "db-np", "10.96.0.23", 80, 8080, "TCP", "db", Some(30080)),
        ("shop", "other-np", "10.96.0.24", 80, 8080, "TCP", "other", Some(30081)),
        ("shop", "db6", "fd00:96::20", 80, 8080, "TCP", "db", None),
    ];
    for (ns, name, ip, port, tp, proto, backend, node_port) in services {
        bed.add_service(Service {
            namespace: ns.into(),
            name: name.into(),
            cluster_ip: ip.parse().unwrap(),
            port,
            target_port: tp,
            protocol: proto.into(),
            backends: vec![backend.into()],
            node_port,
        })
        .unwrap();
    }
    if kubenet {
        let ports = observer_tests::ns_run(
            &bed.node_ns,
            &["ip", "-o", "link", "show", "master", "cbr0"],
        )
        .unwrap();
        for p in ["web", "db", "other"] {
            assert!(
                ports.contains(&bed.pod(p).host_if),
                "{p} is not a cbr0 port: {ports}"
            );
        }
    }
    let policies = default_deny_with_dns("shop") + POLICIES;
    std::fs::write(bed.cluster_dir().join("policies.yaml"), policies).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    for p in ["db", "other", "db2"] {
        accept_tcp(&bed.pod(p).netns.clone(), 8080, stop.clone());
    }
    let names = HashMap::from([(
        "db.shop.svc.cluster.local".to_string(),
        Ipv4Addr::new(10, 96, 0, 20),
    )]);
    dns::serve(&bed.pod("coredns").netns.clone(), names, stop.clone());
    Cluster { bed, stop }
}

fn web(c: &Cluster) -> String {
    c.bed.pod("web").netns.clone()
}

#[test]
fn services_and_dns_under_default_deny_are_judged_against_their_backends() {
    services_and_dns(cluster("svc", false));
}

/// A Service connection is tracked under its pre-DNAT tuple too (its alias). The alias leaves
/// the table with its connection, a linger after the close, not after the 6 h TCP idle
/// timeout: a node opening many short Service connections would otherwise fill its table with
/// the aliases of closed ones.
#[test]
fn a_closed_service_connection_leaves_no_alias_behind() {
    let mut c = cluster("svcgone", false);
    // A 2 s sweep (half the idle timeout of UDP): the test need not wait for the 10 s one.
    let d = c
        .bed
        .start_daemon(OBSERVER.as_ref(), &["--other-timeout", "4s"])
        .unwrap();
    let web = web(&c);
    let entries = || d.status()["conntrack_entries"].as_u64().unwrap();
    let before = entries();
    // The client closes first: the server's side of the exchange comes back to it.
    assert!(tcp_connects(&web, sa("10.96.0.20", 80), T));
    let closed = Instant::now();
    let grown = entries();
    assert!(
        grown >= before + 2,
        "alias and connection: {before} -> {grown}"
    );
    loop {
        let now = entries();
        if now <= before {
            break;
        }
        assert!(
            closed.elapsed() < Duration::from_secs(16),
            "{now} entries {:?} after the close, {before} before it",
            closed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(closed.elapsed() >= Duration::from_millis(9_500));
    let new = records(&d, |r| r["event"] == "new" && r["service"]["name"] == "db");
    assert_eq!(new.len(), 1, "{new:?}");
}

/// The same on kubenet's bridge: same-node pod traffic is bridged, br_netfilter hands it to
/// kube-proxy's rules.
#[test]
fn services_and_dns_on_the_kubenet_bridge() {
    services_and_dns(cluster("svcbr", true));
}

fn services_and_dns(mut c: Cluster) {
    let d = c
        .bed
        .start_daemon(OBSERVER.as_ref(), &["--report-interval", "1s"])
        .unwrap();
    let web = web(&c);

    // DNS through the kube-dns Service, backend on the other node: every lookup answered
    // (replies of the translated connection must not be taken for new connections).
    let dns_svc = sa("10.96.0.10", 53);
    let answered = (0..30)
        .filter(|_| dns::resolve(&web, dns_svc, "db.shop.svc.cluster.local", T).is_some())
        .count();
    assert_eq!(
        answered, 30,
        "DNS lookups answered through the kube-dns Service"
    );

    // db's Service, backend on this node, and db-remote's, backend on node-2: allowed.
    assert!(
        tcp_connects(&web, sa("10.96.0.20", 80), T),
        "web -> db Service (local backend)"
    );
    assert!(
        tcp_connects(&web, sa("10.96.0.21", 80), T),
        "web -> db-remote Service (node-2)"
    );
    // A Service never opens what policy denies its backend: web may not reach app=other.
    // IPv6: the same Service semantics on an IPv6 ClusterIP.
    assert!(
        tcp_connects(&web, sa("fd00:96::20", 80), T),
        "web -> db6 Service (IPv6)"
    );
    assert!(
        !tcp_connects(&web, sa("10.96.0.22", 80), T),
        "web -> other Service must be denied"
    );
    // Directly, the same verdicts.
    let db_ip = c.bed.pod("db").ip4;
    assert!(tcp_connects(&web, SocketAddr::new(db_ip, 8080), T));
    // other -> db's Service: db's ingress admits only web (and other's egress is default-deny).
    let other = c.bed.pod("other").netns.clone();
    assert!(
        !tcp_connects(&other, sa("10.96.0.20", 80), T),
        "other -> db Service must be denied"
    );

    // One connection, one set of records: the backend as destination, the Service named, no
    // record towards the ClusterIP.
    let to_vip = |r: &Value| {
        r["ip"]["dst"]
            .as_str()
            .is_some_and(|d| d.starts_with("10.96.0."))
    };
    let all = d.flows().unwrap();
    assert!(
        !all.iter().any(to_vip),
        "no record may name a ClusterIP as destination: {:?}",
        all.iter().filter(|r| to_vip(r)).collect::<Vec<_>>()
    );
    let db_new = records(&d, |r| {
        r["event"] == "new" && r["service"]["name"] == "db" && r["source"]["pod"] == "web"
    });
    assert_eq!(db_new.len(), 1, "{db_new:?}");
    let r = &db_new[0];
    assert_eq!(r["ip"]["dst"], db_ip.to_string());
    assert_eq!(r["l4"]["dst_port"], 8080);
    assert_eq!(r["service"]["namespace"], "shop");
    assert_eq!(r["service"]["ip"], "10.96.0.20");
    assert_eq!(r["service"]["port"], 80);
    assert_eq!(r["verdict"], "forwarded");
    // Joined with the kernel's entry of the same connection (keyed by the frontend): no SNAT.
    assert_eq!(r["snat"]["expectation"], "none", "{r}");
    assert_eq!(
        r["snat"]["translated_src_ip"],
        c.bed.pod("web").ip4.to_string()
    );
    // Its close too, with both directions counted, published once, within a few seconds of
    // the FINs, from the close queue like any connection's.
    let t = Instant::now();
    let close = loop {
        let closes = d
            .flows()
            .unwrap()
            .into_iter()
            .filter(|c| {
                c["event"] == "close"
                    && c["service"]["name"] == "db"
                    && c["l4"]["src_port"] == r["l4"]["src_port"]
            })
            .collect::<Vec<_>>();
        if let Some(c) = closes.first() {
            assert_eq!(closes.len(), 1, "{closes:#?}");
            break c.clone();
        }
        if t.elapsed() > Duration::from_secs(5) {
            // What the daemon did say of the connection's port, and of its losses.
            let port = &r["l4"]["src_port"];
            let of_port = d
                .flows()
                .unwrap()
                .into_iter()
                .filter(|c| c["l4"]["src_port"] == *port || c["l4"]["dst_port"] == *port);
            let metrics = d.get("/metrics").unwrap_or_default();
            let counts = metrics.lines().filter(|l| {
                !l.starts_with('#')
                    && ["event", "close", "conntrack"]
                        .iter()
                        .any(|w| l.contains(w))
            });
            panic!(
                "no close record for {r}\nits port's records: {:#?}\ncounts:\n{}\nlog:\n{}",
                of_port.collect::<Vec<_>>(),
                counts.collect::<Vec<_>>().join("\n"),
                d.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(close["ip"]["dst"], db_ip.to_string(), "{close}");
    assert!(
        close["counters"]["packets_in"].as_u64() >= Some(2),
        "{close}"
    );
    let v6 = records(&d, |r| r["event"] == "new" && r["service"]["name"] == "db6");
    assert_eq!(v6.len(), 1, "{v6:?}");
    assert_eq!(v6[0]["ip"]["dst"], c.bed.pod("db").ip6.to_string());
    assert_eq!(v6[0]["service"]["ip"], "fd00:96::20");
    let remote = records(&d, |r| {
        r["event"] == "new" && r["service"]["name"] == "db-remote"
    });
    assert_eq!(remote.len(), 1, "{remote:?}");
    assert_eq!(remote[0]["ip"]["dst"], c.bed.pod("db2").ip4.to_string());
    let dns_recs = records(&d, |r| {
        r["service"]["name"] == "kube-dns" && r["verdict"] == "forwarded"
    });
    assert!(!dns_recs.is_empty());
    assert!(dns_recs
        .iter()
        .all(|r| r["l4"]["protocol"] == "UDP"
            && r["ip"]["dst"] == c.bed.pod("coredns").ip4.to_string()));
    let denied = records(&d, |r| {
        r["verdict"] == "dropped" && r["service"]["name"] == "other"
    });
    assert!(!denied.is_empty(), "the denied Service connection is named");
    assert_eq!(denied[0]["ip"]["dst"], c.bed.pod("other").ip4.to_string());
    assert!(
        denied[0]["isolated_by"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "default-deny" && p["direction"] == "egress"),
        "{denied:?}"
    );
    denied_connections_take_no_entries(&c, &d);
    // `observer flows --service` selects a Service's connections, whichever backend.
    let out = std::process::Command::new(OBSERVER)
        .args(["flows", "--to-service", "shop/db", "-o", "json", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        !lines.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lines.iter().all(|r| r["service"]["name"] == "db"),
        "{lines:?}"
    );

    // Counters: a completed handshake counts both ways on the connection of record. One held
    // open: a closed connection leaves the table 10 s after its last packet, which a slow
    // kernel (the 6.1 guest, emulated) reaches before this point.
    let held = connect_from(&web, sa("10.96.0.20", 80), 40_777).expect("web -> db, held");
    let t = Instant::now();
    loop {
        let ct = d.get_lines("/v1/conntrack").unwrap();
        let seen = ct.iter().any(|e| {
            e["ip"]["dst"] == db_ip.to_string()
                && e["counters"]["packets_out"].as_u64() >= Some(2)
                && e["counters"]["packets_in"].as_u64() >= Some(1)
        });
        if seen {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{ct:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(held);
    // A live Service connection is reported like any other, every `--report-interval`, on
    // its next packet: its client's packets are counted through the alias with the same
    // per-packet update (and events) as every connection. Two datagrams from one socket to
    // the kube-dns Service, more than the interval apart.
    let sock = observer_tests::in_netns(&web, || std::net::UdpSocket::bind("0.0.0.0:40778"))
        .unwrap()
        .unwrap();
    sock.send_to(b"not a query", dns_svc).unwrap();
    std::thread::sleep(Duration::from_millis(1_300));
    sock.send_to(b"not a query", dns_svc).unwrap();
    let t = Instant::now();
    let report = loop {
        let r = records(&d, |r| {
            r["event"] == "report"
                && r["l4"]["src_port"] == 40_778
                && r["service"]["name"] == "kube-dns"
        });
        if let Some(r) = r.first() {
            break r.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no report of the Service connection"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        report["ip"]["dst"],
        c.bed.pod("coredns").ip4.to_string(),
        "{report}"
    );
    assert_eq!(report["counters"]["packets_out"], 2, "{report}");
    // No drop metric without a direction, and every SNAT join found the kernel's entry.
    let metrics = d.get("/metrics").unwrap();
    assert!(
        !metrics.lines().any(
            |l| l.starts_with("observer_snat_settled_total{how=\"absent\"}") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains("direction=\"\""),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("policy_verdicts"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    c.bed.stop_daemon(&d);
}

/// A denied connection is dropped at the pod's veth without a conntrack entry: a pod spraying
/// denied openers must not fill the table the node's live connections share. Each dropped
/// packet is a record (sampled under a flood, the rest counted), and a denied Service
/// connection's retransmitted opener is judged again behind the DNAT, its Service named.
fn denied_connections_take_no_entries(c: &Cluster, d: &observer_tests::Daemon) {
    let other = c.bed.pod("other");
    let other_ip = other.ip4.to_string();
    // The SYN and its retransmission one second later.
    assert!(!tcp_connects(
        &other.netns,
        sa("10.96.0.20", 80),
        Duration::from_millis(2500)
    ));
    let by_port = |recs: &[Value]| {
        let mut m: HashMap<u64, Vec<Value>> = HashMap::new();
        for r in recs {
            m.entry(r["l4"]["src_port"].as_u64().unwrap())
                .or_default()
                .push(r.clone());
        }
        m
    };
    let t = Instant::now();
    let retried = loop {
        let drops = records(d, |r| {
            r["event"] == "drop" && r["source"]["ip"] == other_ip && r["service"]["name"] == "db"
        });
        if let Some(v) = by_port(&drops).into_values().find(|v| v.len() >= 2) {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{drops:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for r in &retried {
        assert_eq!(r["verdict"], "dropped", "{r}");
        assert_eq!(r["ip"]["dst"], c.bed.pod("db").ip4.to_string(), "{r}");
        assert_eq!(r["service"]["ip"], "10.96.0.20", "{r}");
        assert_eq!(
            r["counters"]["packets_out"], 1,
            "one record per dropped packet: {r}"
        );
    }

    // A spray of denied UDP openers to 3,000 ports.
    let s0 = d.status();
    let sprayed = || {
        let flows = d.flows().unwrap();
        flows
            .iter()
            .filter(|r| {
                r["event"] == "drop"
                    && r["source"]["ip"] == other_ip
                    && r["l4"]["protocol"] == "UDP"
                    && (20_000..23_000).contains(&r["l4"]["dst_port"].as_u64().unwrap_or(0))
            })
            .count() as u64
    };
    let db = c.bed.pod("db").ip4;
    observer_tests::spawn_in_netns(&other.netns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for port in 20_000..23_000u16 {
            let _ = sock.send_to(b"x", SocketAddr::new(db, port));
        }
    })
    .join()
    .unwrap()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let s1 = d.status();
    let denied = kernel_stat(&s1, "policy_denied") - kernel_stat(&s0, "policy_denied");
    assert_eq!(denied, 3000, "{s1:#}");
    observer_tests::assert_drops_untracked(&s0, &s1, denied, sprayed);
}

#[test]
fn the_node_reaches_its_pods_under_default_deny_and_hairpin_works() {
    node_and_hairpin(cluster("svcnode", false));
}

#[test]
fn the_node_and_hairpin_on_the_kubenet_bridge() {
    node_and_hairpin(cluster("svcnodebr", true));
}

fn node_and_hairpin(mut c: Cluster) {
    // A hostNetwork pod labelled like web: it is the node for policy, never selected as web.
    c.bed.host_network_pods.push((
        "shop".into(),
        "agent".into(),
        [("app".to_string(), "web".to_string())].into(),
    ));
    c.bed.write_cluster().unwrap();
    let d = c.bed.start_daemon(OBSERVER.as_ref(), &[]).unwrap();
    let node = c.bed.node_ns.clone();
    let db = SocketAddr::new(c.bed.pod("db").ip4, 8080);
    let other = SocketAddr::new(c.bed.pod("other").ip4, 8080);
    // kubelet probes come from the node: allowed whatever the ingress isolation.
    assert!(tcp_connects(&node, db, T), "node -> db (probe)");
    assert!(tcp_connects(&node, other, T), "node -> other (probe)");
    // The node through a Service (kube-proxy's OUTPUT DNAT).
    assert!(
        tcp_connects(&node, sa("10.96.0.22", 80), T),
        "node -> other Service"
    );
    let recs = records(&d, |r| {
        r["event"] == "new"
            && r["traffic_class"] == "node-to-pod"
            && r["ip"]["dst"] == db.ip().to_string()
    });
    assert!(!recs.is_empty());
    assert_eq!(recs[0]["verdict"], "forwarded");
    assert_eq!(recs[0]["allowed_by"], "from-node", "{recs:?}");
    // A pod reaching itself through its own Service (hairpin, masqueraded by kube-proxy).
    let other_ns = c.bed.pod("other").netns.clone();
    assert!(
        tcp_connects(&other_ns, sa("10.96.0.22", 80), T),
        "other -> itself via its Service"
    );
    // Remote pods are not the node: db2 on node-2 may not reach other.
    let db2 = c.bed.pod("db2").netns.clone();
    assert!(
        !tcp_connects(&db2, other, T),
        "node-2's pod -> other must be denied"
    );

    // Hardened: --deny-from-node judges the node like any source.
    c.bed.stop_daemon(&d);
    let d = c
        .bed
        .start_daemon(OBSERVER.as_ref(), &["--deny-from-node"])
        .unwrap();
    assert!(
        !tcp_connects(&node, other, T),
        "node -> other with --deny-from-node"
    );
    // db admits app=web, and the hostNetwork pod carries that label: still the node, denied.
    assert!(
        !tcp_connects(&node, db, T),
        "a hostNetwork pod labelled app=web is not selected by podSelector app=web"
    );
    c.bed.stop_daemon(&d);
}

/// NodePort traffic from outside arrives masqueraded to the node by kube-proxy: it is judged
/// against the client that reached the node, never passed as "from the node".
#[test]
fn nodeports_from_outside_are_judged_against_the_client() {
    nodeports(cluster("svcnp", false));
}

#[test]
fn nodeports_on_the_kubenet_bridge() {
    nodeports(cluster("svcnpbr", true));
}

fn nodeports(mut c: Cluster) {
    let d = c.bed.start_daemon(OBSERVER.as_ref(), &[]).unwrap();
    let (ext, peer) = (c.bed.ext_ns.clone(), c.bed.peer_ns.clone());
    let node = observer_tests::NODE_IP;
    // db admits 203.0.113.0/24 on 8080; other admits nobody; the VNet peer is not admitted.
    assert!(
        tcp_connects(&ext, sa(node, 30080), T),
        "external host -> db NodePort"
    );
    assert!(
        !tcp_connects(&ext, sa(node, 30081), T),
        "external host -> other NodePort must be denied"
    );
    assert!(
        !tcp_connects(&peer, sa(node, 30080), T),
        "VNet peer -> db NodePort must be denied"
    );
    // The node itself still reaches its pods (probes).
    let other = SocketAddr::new(c.bed.pod("other").ip4, 8080);
    assert!(tcp_connects(&c.bed.node_ns.clone(), other, T));

    let ok = records(&d, |r| {
        r["event"] == "new" && r["service"]["name"] == "db-np"
    });
    assert_eq!(ok.len(), 1, "{ok:?}");
    let r = &ok[0];
    assert_eq!(r["verdict"], "forwarded");
    assert_eq!(r["ip"]["dst"], c.bed.pod("db").ip4.to_string());
    assert_eq!(r["service"]["ip"], node);
    assert_eq!(r["service"]["port"], 30080);
    assert_eq!(r["traffic_class"], "world-to-pod");
    let from = |r: &Value, ip: &str| {
        r["original_source"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("{ip}:")))
    };
    assert!(from(r, observer_tests::EXT_IP), "{r}");
    assert!(
        r["policy"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "db-from-outside"),
        "{r}"
    );
    let denied = records(&d, |r| {
        r["verdict"] == "dropped" && r["service"]["name"] == "other-np"
    });
    assert!(!denied.is_empty());
    assert!(from(&denied[0], observer_tests::EXT_IP), "{denied:?}");
    assert!(denied[0]["allowed_by"].is_null());
    let peer_denied = records(&d, |r| {
        r["verdict"] == "dropped" && from(r, observer_tests::PEER_IP)
    });
    assert!(!peer_denied.is_empty());

    // A kubelet probe that happens to use the source port of a live NodePort connection is
    // still the node: the note of that client is taken and never linked again.
    let held = connect_from(&ext, sa(node, 30080), 40123).expect("NodePort from port 40123");
    std::thread::sleep(Duration::from_millis(1200));
    let probe = connect_from(&c.bed.node_ns.clone(), other, 40123);
    assert!(
        probe.is_some(),
        "a probe reusing a NodePort client's port must pass"
    );
    drop(held);
    c.bed.stop_daemon(&d);
}

/// A TCP connection from `ns` to `dst` with source port `port`, kept open by the caller.
fn connect_from(ns: &str, dst: SocketAddr, port: u16) -> Option<std::net::TcpStream> {
    observer_tests::in_netns(ns, move || {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
        s.set_reuse_address(true).ok()?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
            .ok()?;
        s.connect_timeout(&dst.into(), T).ok()?;
        Some(s.into())
    })
    .ok()
    .flatten()
}
