//! The kernel parser on crafted packets, run through BPF_PROG_TEST_RUN in the real kernel:
//! VLAN tags, IPv4 options and fragments, IPv6 extension headers and fragments, SCTP, ICMP,
//! truncated and non-IP frames. Each case checks what lands in conntrack and the stats.
use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions};
use observer::{
    bpf::{Datapath, ScratchPins},
    cluster::addr_from,
};
use observer_common::{programs, CtEntry, CtKey};

struct Bpf {
    dp: Datapath,
    _pins: ScratchPins,
}

fn load(tag: &str) -> Bpf {
    observer_tests::ensure_root().unwrap();
    let pins = ScratchPins::new(&format!("test-parser-{tag}"));
    let dp = Datapath::load(pins.path()).expect("load programs");
    Bpf { dp, _pins: pins }
}

impl Bpf {
    fn run(&mut self, pkt: &[u8]) {
        let p = self.dp.prog(programs::FROM_POD).unwrap();
        let mut o = TestRunOptions::new();
        o.data_in = Some(pkt);
        let r = p.test_run(o).unwrap();
        // TC_ACT_UNSPEC: observation never changes a packet's fate.
        assert_eq!(r.return_value as i32, -1);
    }

    fn flows(&self) -> Vec<(CtKey, CtEntry)> {
        self.dp.conntrack_entries().unwrap()
    }

    fn stat(&self, name: &str) -> u64 {
        self.dp
            .stats()
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == name)
            .unwrap()
            .1
    }

    fn only_flow(&self) -> (CtKey, CtEntry) {
        let f = self.flows();
        assert_eq!(f.len(), 1, "flows: {f:?}");
        f[0]
    }
}

fn ports(k: &CtKey) -> (u16, u16) {
    (k.port_a.min(k.port_b), k.port_a.max(k.port_b))
}

fn addrs(k: &CtKey) -> Vec<IpAddr> {
    let mut v = vec![
        addr_from(k.family, &k.addr_a),
        addr_from(k.family, &k.addr_b),
    ];
    v.sort();
    v
}

// ---- packet builders -------------------------------------------------------------------------

const MAC: [u8; 12] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];

fn eth(ethertype: u16, vlans: &[(u16, u16)], payload: &[u8]) -> Vec<u8> {
    let mut p = MAC.to_vec();
    for (tpid, vid) in vlans {
        p.extend_from_slice(&tpid.to_be_bytes());
        p.extend_from_slice(&vid.to_be_bytes());
    }
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ipv4(
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    options: &[u8],
    id: u16,
    frag: u16,
    l4: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + l4.len();
    let mut h = vec![(0x40 | ihl) as u8, 0];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(options);
    h.extend_from_slice(l4);
    h
}

fn ipv6(nexthdr: u8, src: &str, dst: &str, rest: &[u8]) -> Vec<u8> {
    let s: std::net::Ipv6Addr = src.parse().unwrap();
    let d: std::net::Ipv6Addr = dst.parse().unwrap();
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(rest.len() as u16).to_be_bytes());
    h.extend_from_slice(&[nexthdr, 64]);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(rest);
    h
}

/// A generic 8-byte IPv6 extension header (hop-by-hop, routing, destination options).
fn ext(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

fn tcp(sport: u16, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
    let mut t = vec![0u8; 20 + payload];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut u = vec![0u8; 8 + payload];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    u
}

const A: [u8; 4] = [10, 244, 1, 10];
const B: [u8; 4] = [10, 244, 1, 11];
const A6: &str = "fd00:10:244:1::a";
const B6: &str = "fd00:10:244:1::b";

// ---- cases -----------------------------------------------------------------------------------

#[test]
fn vlan_tagged_ipv4_udp_counts_from_the_ip_header() {
    let mut b = load("vlan");
    let ip = ipv4(17, A, B, &[], 1, 0, &udp(5000, 53, 30));
    let pkt = eth(0x0800, &[(0x8100, 42)], &ip);
    b.run(&pkt);
    let (k, e) = b.only_flow();
    assert_eq!((k.proto, ports(&k)), (17, (53, 5000)));
    assert_eq!(e.packets, [1, 0]);
    assert_eq!(
        e.bytes[0],
        ip.len() as u64,
        "bytes start at the IP header, after the tag"
    );
}

#[test]
fn qinq_ipv6_tcp_and_reply_share_one_entry() {
    let mut b = load("qinq");
    let out = ipv6(6, A6, B6, &tcp(40000, 443, 0x02, 0));
    let back = ipv6(6, B6, A6, &tcp(443, 40000, 0x12, 0));
    b.run(&eth(0x86DD, &[(0x88A8, 7), (0x8100, 42)], &out));
    b.run(&eth(0x86DD, &[(0x88A8, 7), (0x8100, 42)], &back));
    let (k, e) = b.only_flow();
    assert_eq!((k.proto, ports(&k)), (6, (443, 40000)));
    assert_eq!(
        e.packets,
        [1, 1],
        "SYN counted as original, SYN-ACK as reply"
    );
    assert_eq!(e.tcp_flags & 0xff, 0x02);
    assert_eq!((e.tcp_flags >> 8) & 0xff, 0x12);
}

#[test]
fn ipv4_options_are_skipped_to_reach_the_ports() {
    let mut b = load("opts");
    let options = [0x94, 0x04, 0, 0, 0x01, 0x01, 0x01, 0x00]; // router alert, NOPs, EOL
    b.run(&eth(
        0x0800,
        &[],
        &ipv4(6, A, B, &options, 1, 0, &tcp(41000, 8080, 0x02, 0)),
    ));
    let (k, _) = b.only_flow();
    assert_eq!(ports(&k), (8080, 41000));
}

#[test]
fn ipv4_later_fragments_join_their_flow_and_orphans_are_counted() {
    let mut b = load("frag4");
    // First fragment: MF set, offset 0, carries the UDP header.
    b.run(&eth(
        0x0800,
        &[],
        &ipv4(17, A, B, &[], 0x77, 0x2000, &udp(5000, 53, 64)),
    ));
    // Later fragment: offset 9 (72 bytes), no L4 header; its first bytes look like other ports.
    b.run(&eth(
        0x0800,
        &[],
        &ipv4(17, A, B, &[], 0x77, 9, &udp(1111, 2222, 20)),
    ));
    let (k, e) = b.only_flow();
    assert_eq!(ports(&k), (53, 5000));
    assert_eq!(e.packets, [2, 0]);
    // A later fragment whose first fragment was never seen cannot be attributed: counted.
    b.run(&eth(
        0x0800,
        &[],
        &ipv4(17, A, B, &[], 0x99, 9, &udp(1, 2, 20)),
    ));
    assert_eq!(b.flows().len(), 1);
    assert_eq!(b.stat("fragment"), 1);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut b = load("ext6");
    // hop-by-hop -> routing -> destination options -> TCP
    let mut rest = ext(43);
    rest.extend(ext(60));
    rest.extend(ext(6));
    rest.extend(tcp(40001, 80, 0x02, 0));
    b.run(&eth(0x86DD, &[], &ipv6(0, A6, B6, &rest)));
    let (k, _) = b.only_flow();
    assert_eq!((k.proto, ports(&k)), (6, (80, 40001)));
    assert_eq!(
        addrs(&k),
        vec![A6.parse::<IpAddr>().unwrap(), B6.parse().unwrap()]
    );
}

#[test]
fn ipv6_fragments_join_their_flow() {
    let mut b = load("frag6");
    let frag_hdr = |offset_words: u16, more: bool| {
        let mut f = vec![17, 0];
        f.extend_from_slice(&((offset_words << 3) | more as u16).to_be_bytes());
        f.extend_from_slice(&0xabcdu32.to_be_bytes());
        f
    };
    let mut first = frag_hdr(0, true);
    first.extend(udp(6000, 5353, 64));
    let mut later = frag_hdr(9, false);
    later.extend(vec![0u8; 24]);
    b.run(&eth(0x86DD, &[], &ipv6(44, A6, B6, &first)));
    b.run(&eth(0x86DD, &[], &ipv6(44, A6, B6, &later)));
    let (k, e) = b.only_flow();
    assert_eq!((k.proto, ports(&k)), (17, (5353, 6000)));
    assert_eq!(e.packets, [2, 0]);
}

#[test]
fn too_many_ipv6_extension_headers_are_counted_not_guessed() {
    let mut b = load("extlimit");
    let mut rest = Vec::new();
    for _ in 0..7 {
        rest.extend(ext(60));
    }
    rest.extend(tcp(1, 2, 0x02, 0));
    b.run(&eth(0x86DD, &[], &ipv6(60, A6, B6, &rest)));
    assert!(b.flows().is_empty());
    assert_eq!(b.stat("ipv6_ext_limit"), 1);
}

#[test]
fn sctp_ports_are_parsed() {
    let mut b = load("sctp");
    let mut sctp = vec![0u8; 12 + 16];
    sctp[0..2].copy_from_slice(&3868u16.to_be_bytes());
    sctp[2..4].copy_from_slice(&38412u16.to_be_bytes());
    b.run(&eth(0x0800, &[], &ipv4(132, A, B, &[], 1, 0, &sctp)));
    let (k, _) = b.only_flow();
    assert_eq!((k.proto, ports(&k)), (132, (3868, 38412)));
}

#[test]
fn icmp_echo_request_and_reply_pair_by_identifier() {
    let mut b = load("icmp");
    let echo = |ty: u8| {
        let mut i = vec![ty, 0, 0, 0, 0x12, 0x34, 0, 1];
        i.extend(vec![0u8; 56]);
        i
    };
    b.run(&eth(0x0800, &[], &ipv4(1, A, B, &[], 1, 0, &echo(8))));
    b.run(&eth(0x0800, &[], &ipv4(1, B, A, &[], 2, 0, &echo(0))));
    let (k, e) = b.only_flow();
    assert_eq!(e.packets, [1, 1]);
    assert_eq!(e.icmp_type, 8);
    let rec = observer::flows::record(
        &"n".into(),
        observer_common::EventKind::New,
        &k,
        &e,
        |_| None,
        |_| None,
    );
    assert_eq!(rec.l4.icmp.unwrap().id, Some(0x1234));
}

#[test]
fn truncated_non_ip_and_neighbour_discovery_are_counted_not_tracked() {
    let mut b = load("trunc");
    // IPv4 says TCP but the TCP header is cut short.
    let mut ip = ipv4(6, A, B, &[], 1, 0, &tcp(1, 2, 0x02, 0));
    ip.truncate(20 + 10);
    b.run(&eth(0x0800, &[], &ip));
    // ARP.
    b.run(&eth(0x0806, &[], &[0u8; 28]));
    // ICMPv6 neighbour solicitation.
    b.run(&eth(
        0x86DD,
        &[],
        &ipv6(58, A6, "ff02::1:ff00:b", &[135, 0, 0, 0, 0, 0, 0, 0]),
    ));
    assert!(b.flows().is_empty());
    assert_eq!(b.stat("truncated"), 1);
    assert_eq!(b.stat("non_ip"), 1);
    assert_eq!(b.stat("icmpv6_nd"), 1);
    assert_eq!(b.stat("packets"), 3);
}
