//! Malformed and evasive packets never get past a deny: a pod that only accepts TCP/80 is sent
//! packets with IP options, fragments (including orphan and tiny first fragments), IPv6
//! extension headers and truncated headers, through the real `to_pod` program.
use observer::{
    cluster::{self, Cluster},
    policy::{kernel::KernelEngine, Options},
};
use observer_common::programs;
use serde_json::json;

const PASS: u32 = u32::MAX; // TC_ACT_UNSPEC (-1)
const SHOT: u32 = 2;

fn cluster() -> Cluster {
    let mut c = Cluster::default();
    for (name, ip, ip6) in [
        ("a", "10.244.1.10", "fd00::a"),
        ("b", "10.244.1.11", "fd00::b"),
    ] {
        cluster::add_object(
            &mut c,
            "t",
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "x", "labels": {"pod": name}},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}, {"ip": ip6}]}}),
        );
    }
    cluster::add_object(
        &mut c,
        "t",
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "b-http-only", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [{"port": 80}]}]}}),
    );
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    c
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ipv4(proto: u8, options: &[u8], id: u16, frag: u16, l4: &[u8]) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let mut h = vec![(0x40 | ihl) as u8, 0];
    h.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0, 10, 244, 1, 10, 10, 244, 1, 11]);
    h.extend_from_slice(options);
    h.extend_from_slice(l4);
    h
}

fn ipv6(next: u8, rest: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(rest.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&"fd00::a".parse::<std::net::Ipv6Addr>().unwrap().octets());
    h.extend_from_slice(&"fd00::b".parse::<std::net::Ipv6Addr>().unwrap().octets());
    h.extend_from_slice(rest);
    h
}

fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    t
}

fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut u = vec![0u8; 8 + payload];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u
}

#[test]
fn evasive_packets_never_pass_a_port_rule() {
    observer_tests::ensure_root().unwrap();
    let mut k = KernelEngine::new().unwrap();
    k.load(&cluster(), &Options::default()).unwrap();
    let mut run = |what: &str, pkt: Vec<u8>, want: u32| {
        let got = k.test_run(programs::TO_POD, &pkt).unwrap();
        assert_eq!(
            got,
            want,
            "{what}: expected {}",
            if want == SHOT { "drop" } else { "pass" }
        );
    };
    // Baselines.
    run(
        "TCP/80",
        eth(0x0800, &ipv4(6, &[], 1, 0, &tcp(40000, 80))),
        PASS,
    );
    run(
        "TCP/22",
        eth(0x0800, &ipv4(6, &[], 2, 0, &tcp(40001, 22))),
        SHOT,
    );
    // IPv4 options in front of the ports.
    let opts = [0x94, 4, 0, 0, 1, 1, 1, 0];
    run(
        "options TCP/22",
        eth(0x0800, &ipv4(6, &opts, 3, 0, &tcp(40002, 22))),
        SHOT,
    );
    run(
        "options TCP/80",
        eth(0x0800, &ipv4(6, &opts, 4, 0, &tcp(40003, 80))),
        PASS,
    );
    // Fragments: a denied first fragment and its follower both drop; an orphan follower drops.
    run(
        "UDP/53 first fragment",
        eth(0x0800, &ipv4(17, &[], 0x77, 0x2000, &udp(5000, 53, 64))),
        SHOT,
    );
    run(
        "UDP/53 later fragment",
        eth(0x0800, &ipv4(17, &[], 0x77, 9, &[0u8; 40])),
        SHOT,
    );
    run(
        "orphan later fragment",
        eth(0x0800, &ipv4(6, &[], 0x99, 9, &tcp(40004, 80))),
        SHOT,
    );
    // Tiny first fragment: ports present, the rest of the TCP header in a later fragment.
    run(
        "tiny first fragment",
        eth(0x0800, &ipv4(6, &[], 0x55, 0x2000, &tcp(40005, 80)[..8])),
        SHOT,
    );
    // Truncated TCP header, not fragmented.
    run(
        "truncated TCP",
        eth(0x0800, &ipv4(6, &[], 5, 0, &tcp(40006, 80)[..10])),
        SHOT,
    );
    // IPv6 extension headers before the ports.
    let mut rest = vec![60, 0, 1, 4, 0, 0, 0, 0, 6, 0, 1, 4, 0, 0, 0, 0];
    rest.extend(tcp(40007, 22));
    run(
        "IPv6 hop-by-hop + dest-opts TCP/22",
        eth(0x86DD, &ipv6(0, &rest)),
        SHOT,
    );
    let mut rest = vec![60, 0, 1, 4, 0, 0, 0, 0, 6, 0, 1, 4, 0, 0, 0, 0];
    rest.extend(tcp(40008, 80));
    run(
        "IPv6 hop-by-hop + dest-opts TCP/80",
        eth(0x86DD, &ipv6(0, &rest)),
        PASS,
    );
    let mut rest = Vec::new();
    for _ in 0..7 {
        rest.extend([60, 0, 1, 4, 0, 0, 0, 0]);
    }
    rest.extend(tcp(40009, 80));
    run(
        "IPv6 seven extension headers",
        eth(0x86DD, &ipv6(60, &rest)),
        SHOT,
    );
    // An orphan IPv6 later fragment.
    let mut rest = vec![6, 0, 0, 9 << 3, 0, 0, 0xab, 0xcd];
    rest.extend(tcp(40010, 80));
    run(
        "IPv6 orphan later fragment",
        eth(0x86DD, &ipv6(44, &rest)),
        SHOT,
    );
    // Non-IP passes (ARP is not policy's business).
    run("ARP", eth(0x0806, &[0u8; 28]), PASS);
}
