//! The test bed's two AKS network models, checked with plain sockets and no daemon: which
//! source address a server sees for pod traffic towards the internet, the VNet and the other
//! node's pods, over TCP and UDP, IPv4 and IPv6, with replies getting back; and what the
//! misconfiguration knobs change. The daemon's SNAT verdicts are judged against these paths, so
//! they must hold before any test relies on them.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use observer_tests::{
    in_netns, spawn_in_netns, Model, Pod, PodSpec, TestBed, EXT_IP, EXT_IP6, NODE_IP, NODE_IP6,
    PEER_IP, PEER_IP6,
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn any_of(dst: IpAddr) -> IpAddr {
    match dst {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// The source a TCP server in `server_ns` sees for a connection from `client_ns` to `dst`,
/// after a request and its answer made it through both ways.
fn tcp_source(client_ns: &str, server_ns: &str, dst: IpAddr) -> Result<IpAddr, String> {
    let l = in_netns(server_ns, move || TcpListener::bind((any_of(dst), 0)))
        .unwrap()
        .unwrap();
    let target = SocketAddr::new(dst, l.local_addr().unwrap().port());
    let client = spawn_in_netns(client_ns, move || -> io::Result<[u8; 4]> {
        let mut s = TcpStream::connect_timeout(&target, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"ping")?;
        let mut buf = [0; 4];
        s.read_exact(&mut buf)?;
        Ok(buf)
    });
    // Non-blocking so a connection that never arrives fails the check instead of hanging it.
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let seen = loop {
        match l.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut buf = [0; 4];
                s.read_exact(&mut buf)
                    .map_err(|e| format!("server read: {e}"))?;
                s.write_all(b"pong")
                    .map_err(|e| format!("server write: {e}"))?;
                break from.ip();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => {
                let c = client.join().unwrap().unwrap();
                return Err(format!("no connection arrived ({e}); client: {c:?}"));
            }
        }
    };
    match client.join().unwrap().unwrap() {
        Ok(b) if &b == b"pong" => Ok(seen),
        other => Err(format!("server saw {seen}, client got {other:?}")),
    }
}

/// The source a UDP server in `server_ns` sees for a datagram from `client_ns` to `dst`, and
/// whether its answer reached the client.
fn udp_source(client_ns: &str, server_ns: &str, dst: IpAddr) -> Result<(IpAddr, bool), String> {
    let srv = in_netns(server_ns, move || UdpSocket::bind((any_of(dst), 0)))
        .unwrap()
        .unwrap();
    srv.set_read_timeout(Some(TIMEOUT)).unwrap();
    let target = SocketAddr::new(dst, srv.local_addr().unwrap().port());
    let client = spawn_in_netns(client_ns, move || -> io::Result<bool> {
        let s = UdpSocket::bind((any_of(dst), 0))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.send_to(b"ping", target)?;
        let mut buf = [0; 16];
        Ok(matches!(s.recv_from(&mut buf), Ok((4, from)) if from == target))
    });
    let mut buf = [0; 16];
    let seen = match srv.recv_from(&mut buf) {
        Ok((_, from)) => {
            srv.send_to(b"pong", from).unwrap();
            from.ip()
        }
        Err(e) => {
            let c = client.join().unwrap().unwrap();
            return Err(format!("no datagram arrived ({e}); client: {c:?}"));
        }
    };
    let answered = client.join().unwrap().unwrap().map_err(|e| e.to_string())?;
    Ok((seen, answered))
}

/// Both protocols from `client` to `dst` in `server_ns`: the server sees `want`, replies return.
fn expect_source(what: &str, client: &str, server_ns: &str, dst: IpAddr, want: IpAddr) {
    let t = Instant::now();
    let tcp = tcp_source(client, server_ns, dst);
    assert_eq!(tcp, Ok(want), "{what}: TCP to {dst}");
    let udp = udp_source(client, server_ns, dst);
    assert_eq!(udp, Ok((want, true)), "{what}: UDP to {dst}");
    println!("{what}: {dst} sees {want} (TCP, UDP) {:?}", t.elapsed());
}

/// A bed with node-1 pod `a` and node-2 pod `r`.
fn bed(model: Model) -> (TestBed, Pod, Pod) {
    let t = Instant::now();
    let mut bed = TestBed::new("tm", model).unwrap();
    bed.add_app_pods("default", &[("a", "client")]).unwrap();
    bed.add_remote_pod(PodSpec {
        namespace: "default",
        name: "r",
        labels: &[("app", "remote")],
        ports: &[],
    })
    .unwrap();
    println!("{model:?} bed built in {:?}", t.elapsed());
    let (a, r) = (bed.pod("a").clone(), bed.pod("r").clone());
    (bed, a, r)
}

/// The paths every model must get right.
fn check_paths(bed: &TestBed, a: &Pod, r: &Pod) {
    for v6 in [false, true] {
        let pick = |v4: &str, v6s: &str| ip(if v6 { v6s } else { v4 });
        let pod_ip = |p: &Pod| if v6 { p.ip6 } else { p.ip4 };
        let node_ip = pick(NODE_IP, NODE_IP6);
        let peer_sees = match bed.model {
            Model::Overlay => node_ip,
            Model::Flat => pod_ip(a),
        };
        let (ext, peer) = (pick(EXT_IP, EXT_IP6), pick(PEER_IP, PEER_IP6));
        expect_source("pod -> external host", &a.netns, &bed.ext_ns, ext, node_ip);
        expect_source("pod -> VNet peer", &a.netns, &bed.peer_ns, peer, peer_sees);
        expect_source(
            "pod -> node-2 pod",
            &a.netns,
            &r.netns,
            pod_ip(r),
            pod_ip(a),
        );
        expect_source(
            "node-2 pod -> pod",
            &r.netns,
            &a.netns,
            pod_ip(a),
            pod_ip(r),
        );
    }
}

fn cluster_yaml(bed: &TestBed) -> String {
    std::fs::read_to_string(bed.cluster_dir().join("cluster.yaml")).unwrap()
}

#[test]
fn overlay_model() {
    let t = Instant::now();
    let (bed, a, r) = bed(Model::Overlay);
    assert_eq!(a.ip4, ip("10.244.1.10"));
    assert_eq!(a.ip6, ip("fd00:10:244:1::a"));
    assert_eq!(r.ip4, ip("10.244.2.10"));
    assert_eq!(r.ip6, ip("fd00:10:244:2::a"));
    let y = cluster_yaml(&bed);
    assert!(
        y.contains("podCIDRs: [10.244.2.0/24, \"fd00:10:244:2::/64\"]"),
        "{y}"
    );
    assert!(y.contains("nodeName: node-2"), "{y}");
    assert!(bed.model_args().join(" ").contains(
        "--network-model overlay --vnet-cidr 10.224.0.0/16 --vnet-cidr fd00:224::/64 --cluster-cidr 10.244.0.0/16"
    ));
    check_paths(&bed, &a, &r);

    // Missing SNAT: the pod IP leaves node-1. The bed's router routes the pod CIDRs back to
    // the node (user-defined routes), so replies still arrive; on Azure they would not.
    bed.remove_masquerade(&bed.node_ns).unwrap();
    expect_source(
        "no SNAT: pod -> external host",
        &a.netns,
        &bed.ext_ns,
        ip(EXT_IP),
        a.ip4,
    );
    expect_source(
        "no SNAT: pod -> external host",
        &a.netns,
        &bed.ext_ns,
        ip(EXT_IP6),
        a.ip6,
    );
    expect_source(
        "no SNAT: pod -> VNet peer",
        &a.netns,
        &bed.peer_ns,
        ip(PEER_IP),
        a.ip4,
    );
    // node-2 keeps its SNAT.
    expect_source(
        "node-2 pod -> external host",
        &r.netns,
        &bed.ext_ns,
        ip(EXT_IP),
        ip("10.224.0.5"),
    );
    println!("overlay_model: {:?}", t.elapsed());
}

#[test]
fn flat_model() {
    let t = Instant::now();
    let (bed, a, r) = bed(Model::Flat);
    assert_eq!(a.ip4, ip("10.224.1.10"));
    assert_eq!(a.ip6, ip("fd00:224::1:a"));
    assert_eq!(r.ip4, ip("10.224.2.10"));
    assert_eq!(r.ip6, ip("fd00:224::2:a"));
    let y = cluster_yaml(&bed);
    assert!(!y.contains("podCIDR"), "{y}");
    assert!(y.contains("nodeName: node-2"), "{y}");
    assert_eq!(
        bed.model_args().join(" "),
        "--network-model flat --vnet-cidr 10.224.0.0/16 --vnet-cidr fd00:224::/64"
    );
    check_paths(&bed, &a, &r);

    // Unexpected SNAT: node-1 also masquerades towards the peer, inside the VNet.
    bed.add_wrong_masquerade(&bed.node_ns, "10.224.0.100/32")
        .unwrap();
    bed.add_wrong_masquerade(&bed.node_ns, "fd00:224::100/128")
        .unwrap();
    expect_source(
        "wrong SNAT: pod -> VNet peer",
        &a.netns,
        &bed.peer_ns,
        ip(PEER_IP),
        ip(NODE_IP),
    );
    expect_source(
        "wrong SNAT: pod -> VNet peer",
        &a.netns,
        &bed.peer_ns,
        ip(PEER_IP6),
        ip(NODE_IP6),
    );
    // Only the peer: other VNet destinations keep the pod IP.
    expect_source(
        "wrong SNAT: pod -> node-2 pod",
        &a.netns,
        &r.netns,
        r.ip4,
        a.ip4,
    );

    // Missing SNAT: the pod IP, a VNet address, reaches the internet; the router delivers the
    // reply on-link through node-1's proxy ARP / NDP.
    bed.remove_masquerade(&bed.node_ns).unwrap();
    expect_source(
        "no SNAT: pod -> external host",
        &a.netns,
        &bed.ext_ns,
        ip(EXT_IP),
        a.ip4,
    );
    expect_source(
        "no SNAT: pod -> external host",
        &a.netns,
        &bed.ext_ns,
        ip(EXT_IP6),
        a.ip6,
    );
    expect_source(
        "no SNAT: pod -> VNet peer",
        &a.netns,
        &bed.peer_ns,
        ip(PEER_IP),
        a.ip4,
    );
    println!("flat_model: {:?}", t.elapsed());
}
