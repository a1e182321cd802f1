//! Exact per-flow counting on a virtual node: real kernel programs, real traffic between network
//! namespaces, compared against independent nftables counters in the client pod and against
//! the arithmetic of what was sent.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use observer::flows::Timestamp;
use observer_tests::{
    bench::wait_until, in_netns, nft, nft_counter, spawn_in_netns, Pod, PodSpec, TestBed, EXT_IP,
    EXT_IP6,
};
use serde_json::Value;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 9090;

/// Serves one request per connection: an 8-byte reply size, then payload until EOF; answers
/// with that many bytes and closes.
fn tcp_server(listener: TcpListener, conns: usize) {
    for _ in 0..conns {
        let (mut s, _) = listener.accept().unwrap();
        let mut hdr = [0u8; 8];
        s.read_exact(&mut hdr).unwrap();
        let reply = u64::from_be_bytes(hdr) as usize;
        let mut sink = Vec::new();
        s.read_to_end(&mut sink).unwrap();
        s.write_all(&vec![7u8; reply]).unwrap();
    }
}

fn tcp_client(src: SocketAddr, dst: SocketAddr, send: usize, reply: usize) -> usize {
    let sock = match src {
        SocketAddr::V4(_) => socket2_like(libc::AF_INET),
        SocketAddr::V6(_) => socket2_like(libc::AF_INET6),
    };
    bind_fd(sock, src);
    let mut s = connect_fd(sock, dst);
    let mut buf = (reply as u64).to_be_bytes().to_vec();
    buf.resize(send, 1);
    s.write_all(&buf).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    got.len()
}

// std has no bind-before-connect for TCP; a fixed source port makes the flow findable.
fn socket2_like(family: i32) -> i32 {
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    let one: i32 = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const _,
            4,
        );
    }
    fd
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, u32) {
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as u32)
}

fn bind_fd(fd: i32, a: SocketAddr) {
    let (ss, len) = sockaddr(a);
    let rc = unsafe { libc::bind(fd, &ss as *const _ as *const libc::sockaddr, len) };
    assert_eq!(rc, 0, "bind {a}: {}", std::io::Error::last_os_error());
}

fn connect_fd(fd: i32, a: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let (ss, len) = sockaddr(a);
    let rc = unsafe { libc::connect(fd, &ss as *const _ as *const libc::sockaddr, len) };
    assert_eq!(rc, 0, "connect {a}: {}", std::io::Error::last_os_error());
    unsafe { TcpStream::from_raw_fd(fd) }
}

fn udp_echo(sock: UdpSocket, datagrams: usize) {
    let mut buf = [0u8; 2048];
    for _ in 0..datagrams {
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        sock.send_to(&buf[..n], from).unwrap();
    }
}

/// Connected to `dst`: an echo from any other address is not taken.
fn udp_client(src: SocketAddr, dst: SocketAddr, count: usize, size: usize) -> usize {
    let s = UdpSocket::bind(src).unwrap();
    s.connect(dst).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut echoed = 0;
    let mut buf = [0u8; 2048];
    for _ in 0..count {
        s.send(&vec![3u8; size]).unwrap();
        let n = s.recv(&mut buf).unwrap();
        assert_eq!(n, size);
        echoed += 1;
    }
    echoed
}

struct Flow {
    name: &'static str,
    proto: &'static str,
    src: IpAddr,
    dst: IpAddr,
    /// TCP/UDP ports; ICMP flows are matched by address and protocol.
    sport: u16,
    dport: u16,
    class: &'static str,
    dst_pod: Option<&'static str>,
    /// Exact (packets, bytes) per direction when the arithmetic is known (UDP, ICMP).
    expect: Option<((u64, u64), (u64, u64))>,
}

fn nft_rules(flows: &[Flow]) -> String {
    let mut counters = String::new();
    let (mut out, mut inn) = (String::new(), String::new());
    for f in flows {
        counters.push_str(&format!(
            "counter {n}_out {{}}\ncounter {n}_in {{}}\n",
            n = f.name
        ));
        let (fam, daddr_o, saddr_i) = match f.dst {
            IpAddr::V4(_) => (
                "ip",
                format!("ip daddr {}", f.dst),
                format!("ip saddr {}", f.dst),
            ),
            IpAddr::V6(_) => (
                "ip6",
                format!("ip6 daddr {}", f.dst),
                format!("ip6 saddr {}", f.dst),
            ),
        };
        let _ = fam;
        let (o, i) = match f.proto {
            "TCP" | "UDP" => {
                let p = f.proto.to_lowercase();
                (
                    format!("{daddr_o} {p} sport {} {p} dport {}", f.sport, f.dport),
                    format!("{saddr_i} {p} sport {} {p} dport {}", f.dport, f.sport),
                )
            }
            "ICMP" => (
                format!("{daddr_o} icmp type echo-request"),
                format!("{saddr_i} icmp type echo-reply"),
            ),
            _ => (
                format!("{daddr_o} icmpv6 type echo-request"),
                format!("{saddr_i} icmpv6 type echo-reply"),
            ),
        };
        out.push_str(&format!("{o} counter name {}_out\n", f.name));
        inn.push_str(&format!("{i} counter name {}_in\n", f.name));
    }
    format!(
        "table inet ref {{\n{counters}chain out {{\ntype filter hook output priority 0; policy accept;\n{out}}}\n\
         chain in {{\ntype filter hook input priority 0; policy accept;\n{inn}}}\n}}\n"
    )
}

fn find<'a>(records: &'a [Value], f: &Flow) -> Option<&'a Value> {
    records.iter().find(|r| {
        r["l4"]["protocol"] == f.proto
            && r["ip"]["src"] == f.src.to_string()
            && r["ip"]["dst"] == f.dst.to_string()
            && (f.proto.starts_with("ICMP")
                || (r["l4"]["src_port"] == f.sport && r["l4"]["dst_port"] == f.dport))
    })
}

#[test]
fn per_flow_packets_and_bytes_are_exact() {
    let mut bed = TestBed::overlay("cnt").expect("test bed");
    bed.add_pod(PodSpec {
        namespace: "x",
        name: "a",
        labels: &[("app", "client")],
        ports: &[],
    })
    .unwrap();
    bed.add_pod(PodSpec {
        namespace: "y",
        name: "b",
        labels: &[("app", "server")],
        ports: &[("http", TCP_PORT, "TCP"), ("echo", UDP_PORT, "UDP")],
    })
    .unwrap();
    let daemon = bed
        .start_daemon(OBSERVER.as_ref(), &["--report-interval", "0"])
        .expect("daemon");
    let (a, b) = (bed.pod("a").clone(), bed.pod("b").clone());
    let ext4: IpAddr = EXT_IP.parse().unwrap();
    let ext6: IpAddr = EXT_IP6.parse().unwrap();

    // UDP: 20 + 8 (+20 for IPv6's longer header) + payload per datagram, echoed back.
    let udp4 = |n: u64, size: u64| Some(((n, n * (28 + size)), (n, n * (28 + size))));
    let udp6 = |n: u64, size: u64| Some(((n, n * (48 + size)), (n, n * (48 + size))));
    // ping: 56 bytes of data + 8 ICMP header + IP header, each way.
    let ping4 = Some(((3, 3 * 84), (3, 3 * 84)));
    let ping6 = Some(((3, 3 * 104), (3, 3 * 104)));
    let flows = vec![
        Flow {
            name: "tcp4_pod",
            proto: "TCP",
            src: a.ip4,
            dst: b.ip4,
            sport: 41001,
            dport: TCP_PORT,
            class: "pod-to-pod-local",
            dst_pod: Some("b"),
            expect: None,
        },
        Flow {
            name: "tcp6_pod",
            proto: "TCP",
            src: a.ip6,
            dst: b.ip6,
            sport: 41002,
            dport: TCP_PORT,
            class: "pod-to-pod-local",
            dst_pod: Some("b"),
            expect: None,
        },
        Flow {
            name: "tcp4_ext",
            proto: "TCP",
            src: a.ip4,
            dst: ext4,
            sport: 41003,
            dport: TCP_PORT,
            class: "pod-to-world",
            dst_pod: None,
            expect: None,
        },
        Flow {
            name: "tcp6_ext",
            proto: "TCP",
            src: a.ip6,
            dst: ext6,
            sport: 41004,
            dport: TCP_PORT,
            class: "pod-to-world",
            dst_pod: None,
            expect: None,
        },
        Flow {
            name: "udp4_pod",
            proto: "UDP",
            src: a.ip4,
            dst: b.ip4,
            sport: 42001,
            dport: UDP_PORT,
            class: "pod-to-pod-local",
            dst_pod: Some("b"),
            expect: udp4(10, 200),
        },
        Flow {
            name: "udp6_pod",
            proto: "UDP",
            src: a.ip6,
            dst: b.ip6,
            sport: 42002,
            dport: UDP_PORT,
            class: "pod-to-pod-local",
            dst_pod: Some("b"),
            expect: udp6(10, 200),
        },
        Flow {
            name: "udp4_ext",
            proto: "UDP",
            src: a.ip4,
            dst: ext4,
            sport: 42003,
            dport: UDP_PORT,
            class: "pod-to-world",
            dst_pod: None,
            expect: udp4(7, 500),
        },
        Flow {
            name: "udp6_ext",
            proto: "UDP",
            src: a.ip6,
            dst: ext6,
            sport: 42004,
            dport: UDP_PORT,
            class: "pod-to-world",
            dst_pod: None,
            expect: udp6(7, 500),
        },
        Flow {
            name: "ping4_pod",
            proto: "ICMP",
            src: a.ip4,
            dst: b.ip4,
            sport: 0,
            dport: 0,
            class: "pod-to-pod-local",
            dst_pod: Some("b"),
            expect: ping4,
        },
        Flow {
            name: "ping6_ext",
            proto: "ICMPv6",
            src: a.ip6,
            dst: ext6,
            sport: 0,
            dport: 0,
            class: "pod-to-world",
            dst_pod: None,
            expect: ping6,
        },
    ];
    nft(&a.netns, &nft_rules(&flows)).expect("reference counters");

    // Servers: pod b and the external host, dual-stack.
    let mut servers = Vec::new();
    for ns in [b.netns.clone(), bed.ext_ns.clone()] {
        let is_pod = ns == b.netns;
        let (tcp_conns, udp_dgrams) = if is_pod { (2, 20) } else { (2, 14) };
        let tl = in_netns(&ns, || TcpListener::bind(("::", TCP_PORT)).unwrap()).unwrap();
        let us = in_netns(&ns, || UdpSocket::bind(("::", UDP_PORT)).unwrap()).unwrap();
        servers.push(std::thread::spawn(move || tcp_server(tl, tcp_conns)));
        servers.push(std::thread::spawn(move || udp_echo(us, udp_dgrams)));
    }

    let sizes = [
        (100_000usize, 50_000usize),
        (64_000, 128_000),
        (30_000, 70_000),
        (12_345, 54_321),
    ];
    let mut clients = Vec::new();
    for (i, f) in flows.iter().enumerate().filter(|(_, f)| f.proto == "TCP") {
        let (send, reply) = sizes[i % 4];
        let (src, dst) = (
            SocketAddr::new(f.src, f.sport),
            SocketAddr::new(f.dst, f.dport),
        );
        clients.push(spawn_in_netns(&a.netns, move || {
            assert_eq!(tcp_client(src, dst, send, reply), reply)
        }));
    }
    for c in clients.drain(..) {
        c.join().unwrap().unwrap();
    }
    for f in flows.iter().filter(|f| f.proto == "UDP") {
        let ((n, bytes), _) = f.expect.unwrap();
        let hdr = if f.src.is_ipv4() { 28 } else { 48 };
        let size = (bytes / n - hdr) as usize;
        let (src, dst) = (
            SocketAddr::new(f.src, f.sport),
            SocketAddr::new(f.dst, f.dport),
        );
        in_netns(&a.netns, move || {
            assert_eq!(udp_client(src, dst, n as usize, size), n as usize)
        })
        .unwrap();
    }
    for f in flows.iter().filter(|f| f.proto.starts_with("ICMP")) {
        let dst = f.dst.to_string();
        observer_tests::ns_run(
            &a.netns,
            &["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", &dst],
        )
        .unwrap();
    }
    for s in servers {
        s.join().unwrap();
    }
    // Let TCP finish its FIN/ACK exchange and the daemon publish closes (1 s grace).
    std::thread::sleep(Duration::from_millis(2500));

    let conntrack = daemon.get_lines("/v1/conntrack").unwrap();
    let history = daemon.flows().unwrap();
    let mut failures = Vec::new();
    for f in &flows {
        let reference_out =
            nft_counter(&a.netns, "inet", "ref", &format!("{}_out", f.name)).unwrap();
        let reference_in = nft_counter(&a.netns, "inet", "ref", &format!("{}_in", f.name)).unwrap();
        let Some(r) = find(&conntrack, f) else {
            failures.push(format!("{}: no conntrack record", f.name));
            continue;
        };
        let c = &r["counters"];
        let got_out = (
            c["packets_out"].as_u64().unwrap(),
            c["bytes_out"].as_u64().unwrap(),
        );
        let got_in = (
            c["packets_in"].as_u64().unwrap(),
            c["bytes_in"].as_u64().unwrap(),
        );
        eprintln!(
            "{:<10} observer out {:?} in {:?} | nft out {:?} in {:?}",
            f.name, got_out, got_in, reference_out, reference_in
        );
        if got_out != reference_out || got_in != reference_in {
            failures.push(format!("{}: observer out {got_out:?} in {got_in:?}, nft out {reference_out:?} in {reference_in:?}", f.name));
        }
        if let Some((eo, ei)) = f.expect {
            if got_out != eo || got_in != ei {
                failures.push(format!(
                    "{}: observer out {got_out:?} in {got_in:?}, sent out {eo:?} in {ei:?}",
                    f.name
                ));
            }
        }
        if got_out.0 == 0 || got_in.0 == 0 {
            failures.push(format!("{}: a direction saw no packets", f.name));
        }
        if r["traffic_class"] != f.class {
            failures.push(format!(
                "{}: class {} want {}",
                f.name, r["traffic_class"], f.class
            ));
        }
        if r["source"]["pod"] != "a"
            || r["source"]["namespace"] != "x"
            || r["source"]["labels"]["app"] != "client"
        {
            failures.push(format!("{}: source not enriched: {}", f.name, r["source"]));
        }
        match f.dst_pod {
            Some(p) if r["destination"]["pod"] != p => {
                failures.push(format!("{}: destination {}", f.name, r["destination"]))
            }
            None if !r["destination"]["pod"].is_null() => {
                failures.push(format!("{}: destination {}", f.name, r["destination"]))
            }
            _ => {}
        }
        if r["direction"] != "egress" {
            failures.push(format!("{}: direction {}", f.name, r["direction"]));
        }
        // Every flow was announced when it started.
        if !history
            .iter()
            .any(|h| h["event"] == "new" && find(std::slice::from_ref(h), f).is_some())
        {
            failures.push(format!("{}: no 'new' record", f.name));
        }
        // TCP closes are published with the final counters.
        if f.proto == "TCP" {
            match history
                .iter()
                .find(|h| h["event"] == "close" && find(std::slice::from_ref(h), f).is_some())
            {
                Some(h) if h["counters"] == r["counters"] => {}
                Some(h) => failures.push(format!(
                    "{}: close record counters {} differ from final {}",
                    f.name, h["counters"], r["counters"]
                )),
                None => failures.push(format!("{}: no 'close' record", f.name)),
            }
        }
    }
    let status: Value = serde_json::from_str(&daemon.get("/v1/status").unwrap()).unwrap();
    // IPv6 connections live in a table of their own; the status counts them apart, and both
    // tables make the total.
    let v6_listed = conntrack
        .iter()
        .filter(|r| r["ip"]["src"].as_str().is_some_and(|a| a.contains(':')))
        .count() as u64;
    let (total, v6) = (
        status["conntrack_entries"].as_u64().unwrap(),
        status["conntrack_entries_ipv6"].as_u64().unwrap(),
    );
    if v6_listed == 0 || v6 != v6_listed || total != conntrack.len() as u64 {
        failures.push(format!(
            "status counts {total} connections, {v6} IPv6; the table lists {}, {v6_listed} IPv6",
            conntrack.len()
        ));
    }
    // Between the two pods, IPv4 packets passed at the source's veth go straight
    // into the destination pod (`redirected`), past the node's stack: nearly all of them (one
    // the pod's stack held back, waiting for the neighbour's address, may take the stack's
    // path and be handed over to the destination's veth instead), never more, while the
    // counts above stayed exact.
    let mut local = 0;
    for f in flows
        .iter()
        .filter(|f| f.class == "pod-to-pod-local" && f.dst.is_ipv4())
    {
        if let Some(r) = find(&conntrack, f) {
            let c = &r["counters"];
            local += c["packets_out"].as_u64().unwrap() + c["packets_in"].as_u64().unwrap();
        }
    }
    let redirected = observer_tests::kernel_stat(&status, "redirected");
    let handed = observer_tests::kernel_stat(&status, "handed_over");
    eprintln!("redirected {redirected}, handed over {handed} of {local} local IPv4 packets");
    if redirected + handed > local || redirected * 10 < local * 9 {
        failures.push(format!(
            "{redirected} packets redirected into the destination pod and {handed} handed over \
             between the pods' veths, of {local}"
        ));
    }
    let lost = status["kernel"]
        .as_array()
        .unwrap()
        .iter()
        .find(|kv| kv[0] == "events_lost")
        .unwrap()[1]
        .as_u64()
        .unwrap();
    if lost != 0 {
        failures.push(format!("{lost} events lost"));
    }
    // The close records' last counters (the final ACKs) came with the kernel's after-close
    // events: none was read back from the table.
    let metrics = daemon.get("/metrics").unwrap();
    let read_back = metrics
        .lines()
        .find_map(|l| l.strip_prefix("observer_closes_read_back_total "))
        .map(|v| v.trim().parse::<u64>().unwrap());
    if read_back != Some(0) {
        failures.push(format!("closes read back: {read_back:?}"));
    }
    assert!(
        failures.is_empty(),
        "mismatches:\n{}\ndaemon log:\n{}",
        failures.join("\n"),
        daemon.log_text()
    );
}

#[test]
fn inbound_flows_from_the_node_and_the_world_are_classified_and_counted() {
    let mut bed = TestBed::overlay("inb").expect("test bed");
    bed.add_pod(PodSpec {
        namespace: "y",
        name: "b",
        labels: &[("app", "server")],
        ports: &[],
    })
    .unwrap();
    let daemon = bed
        .start_daemon(OBSERVER.as_ref(), &["--report-interval", "0"])
        .expect("daemon");
    let b = bed.pod("b").clone();
    let node_ns = bed.node_ns.clone();
    let ext_ns = bed.ext_ns.clone();
    observer_tests::ns_run(
        &node_ns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            &b.ip4.to_string(),
        ],
    )
    .unwrap();
    observer_tests::ns_run(
        &ext_ns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            &b.ip4.to_string(),
        ],
    )
    .unwrap();
    observer_tests::ns_run(
        &ext_ns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            &b.ip6.to_string(),
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let ct = daemon.get_lines("/v1/conntrack").unwrap();
    let cases = [
        (
            observer_tests::NODE_IP,
            b.ip4.to_string(),
            "ICMP",
            "node-to-pod",
            3u64,
            84u64,
        ),
        (EXT_IP, b.ip4.to_string(), "ICMP", "world-to-pod", 2, 84),
        (EXT_IP6, b.ip6.to_string(), "ICMPv6", "world-to-pod", 2, 104),
    ];
    for (src, dst, proto, class, n, size) in cases {
        let r = ct
            .iter()
            .find(|r| {
                r["ip"]["src"] == src
                    && r["ip"]["dst"] == dst.as_str()
                    && r["l4"]["protocol"] == proto
            })
            .unwrap_or_else(|| panic!("no {proto} flow {src} -> {dst} in {ct:#?}"));
        assert_eq!(r["traffic_class"], class, "{src} -> {dst}");
        assert_eq!(r["direction"], "ingress", "{src} -> {dst}");
        assert_eq!(r["destination"]["pod"], "b");
        let c = &r["counters"];
        assert_eq!(
            (c["packets_out"].as_u64(), c["bytes_out"].as_u64()),
            (Some(n), Some(n * size)),
            "{src} -> {dst}"
        );
        assert_eq!(
            (c["packets_in"].as_u64(), c["bytes_in"].as_u64()),
            (Some(n), Some(n * size)),
            "{src} -> {dst}"
        );
    }
}

/// A client pod `a`, a server pod `b` and a daemon without reports, with `extra` arguments.
fn client_and_server(tag: &str, extra: &[&str]) -> (TestBed, observer_tests::Daemon, Pod, Pod) {
    let mut bed = TestBed::client_and_server(tag, TCP_PORT).expect("test bed");
    let mut args = vec!["--report-interval", "0"];
    args.extend_from_slice(extra);
    let daemon = bed.start_daemon(OBSERVER.as_ref(), &args).expect("daemon");
    let (a, b) = (bed.pod("a").clone(), bed.pod("b").clone());
    (bed, daemon, a, b)
}

/// A client pod `a`, a server pod `b` listening on `TCP_PORT`, and a daemon without reports.
fn served(tag: &str) -> (TestBed, observer_tests::Daemon, Pod, Pod, TcpListener) {
    let (bed, daemon, a, b) = client_and_server(tag, &[]);
    let dst = SocketAddr::new(b.ip4, TCP_PORT);
    let listener = in_netns(&b.netns, move || TcpListener::bind(dst))
        .unwrap()
        .unwrap();
    (bed, daemon, a, b, listener)
}

/// One connection from `src` in pod `a` to the server listening on `dst`: `send` bytes up,
/// `reply` back, then both ends close.
fn exchange(
    a: &Pod,
    listener: TcpListener,
    src: SocketAddr,
    dst: SocketAddr,
    send: usize,
    reply: usize,
) {
    let server = std::thread::spawn(move || tcp_server(listener, 1));
    let got = spawn_in_netns(&a.netns, move || tcp_client(src, dst, send, reply))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(got, reply);
    server.join().unwrap();
}

/// A closed connection's entry stays in the kernel's table for its linger (10 s after its last
/// packet: a retransmitted FIN or a late ACK is still its own, not a new connection to judge),
/// then leaves it. The close queue removes it when the linger ends, from its events; the sweep,
/// which reads the whole table, only every 10 s when nothing waits for it, would take up to
/// 10 s more.
#[test]
fn a_closed_connection_leaves_the_table_when_its_linger_ends() {
    let (_bed, daemon, a, b, listener) = served("lng");
    let (src, dst) = (
        SocketAddr::new(a.ip4, 41_900),
        SocketAddr::new(b.ip4, TCP_PORT),
    );
    exchange(&a, listener, src, dst, 100, 100);
    let closed = std::time::Instant::now();

    let in_table = || -> Option<Value> {
        daemon
            .get("/v1/conntrack")
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| {
                r["source"]["port"] == src.port() && r["destination"]["ip"] == b.ip4.to_string()
            })
    };
    let entry = in_table().expect("the closed connection in the kernel's table");
    assert_eq!(entry["event"], "close", "{entry:#}");
    let gone = loop {
        let at = closed.elapsed();
        if in_table().is_none() {
            break at;
        }
        assert!(
            at < Duration::from_secs(25),
            "still in the table {at:?} after its close\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        gone >= Duration::from_millis(9_500),
        "left the table {gone:?} after its close, before its linger ended"
    );
    // The queue's pass, at most a second apart when idle, and room for a loaded machine; a
    // sweep (every 10 s from the daemon's start) would take it at 18-20 s.
    assert!(
        gone <= Duration::from_millis(14_000),
        "left the table {gone:?} after its close: not when its linger ended"
    );
}

/// A TCP close is reported with the acknowledgement of its last FIN, its counters final: not
/// held for `--close-grace` (a minute here) for the last ACK to be counted. Over IPv4 (the
/// established path's header read) and IPv6 (the parser's), with a reply whose last data
/// segment may carry the server's FIN; the counters are checked against nftables' in the
/// client pod.
#[test]
fn a_close_is_reported_with_its_last_ack() {
    let (_bed, daemon, a, b) = client_and_server("ack", &["--close-grace", "60s"]);
    let flows: Vec<Flow> = [
        (a.ip4, b.ip4, 41_950, "ack4"),
        (a.ip6, b.ip6, 41_951, "ack6"),
    ]
    .into_iter()
    .map(|(src, dst, sport, name)| Flow {
        name,
        proto: "TCP",
        src,
        dst,
        sport,
        dport: TCP_PORT,
        class: "pod-to-pod-local",
        dst_pod: Some("b"),
        expect: None,
    })
    .collect();
    nft(&a.netns, &nft_rules(&flows)).expect("reference counters");
    for f in &flows {
        let dst = SocketAddr::new(f.dst, TCP_PORT);
        let listener = in_netns(&b.netns, move || TcpListener::bind(dst))
            .unwrap()
            .unwrap();
        exchange(
            &a,
            listener,
            SocketAddr::new(f.src, f.sport),
            dst,
            3000,
            20_000,
        );
    }
    let closed = std::time::Instant::now();
    for f in &flows {
        let close = loop {
            let history = daemon.flows().unwrap();
            if let Some(h) = history
                .iter()
                .find(|h| h["event"] == "close" && find(std::slice::from_ref(h), f).is_some())
            {
                break h.clone();
            }
            assert!(
                closed.elapsed() < Duration::from_secs(10),
                "{}: no close record {:?} after the close (grace 60 s)\n{}",
                f.name,
                closed.elapsed(),
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let c = &close["counters"];
        let got = [
            c["packets_out"].as_u64().unwrap(),
            c["bytes_out"].as_u64().unwrap(),
            c["packets_in"].as_u64().unwrap(),
            c["bytes_in"].as_u64().unwrap(),
        ];
        let (o, i) = (
            nft_counter(&a.netns, "inet", "ref", &format!("{}_out", f.name)).unwrap(),
            nft_counter(&a.netns, "inet", "ref", &format!("{}_in", f.name)).unwrap(),
        );
        assert_eq!(
            got,
            [o.0, o.1, i.0, i.1],
            "{}: close record {close:#}",
            f.name
        );
        let table = daemon.get_lines("/v1/conntrack").unwrap();
        let entry = find(&table, f).expect("the closed connection in the kernel's table");
        assert_eq!(entry["counters"], close["counters"], "{}", f.name);
    }
    let m = daemon.get("/metrics").unwrap();
    for (when, n) in [("last_ack", 2), ("held", 0), ("sweep", 0)] {
        let line = format!("observer_closes_total{{when=\"{when}\"}} {n}");
        assert!(m.lines().any(|l| l == line), "{line}\n{m}");
    }
}

/// Packets between two pods of the node go from the source's veth straight into the
/// destination pod: the node's netfilter never sees them (an nftables counter on its forward
/// hook stays at 0), and the destination's veth hands nothing over. With `--no-local-redirect`
/// they take the node's stack (the counter counts every packet) and are handed over between
/// the veths instead. Either way the close record counts every packet of the exchange.
#[test]
fn local_packets_skip_the_node_stack_unless_told_not_to() {
    for (tag, extra) in [("lrd", None), ("lrs", Some("--no-local-redirect"))] {
        let (bed, daemon, a, b) = client_and_server(tag, extra.as_slice());
        let (src, dst) = (
            SocketAddr::new(a.ip4, 41_970),
            SocketAddr::new(b.ip4, TCP_PORT),
        );
        let listener = in_netns(&b.netns, move || TcpListener::bind(dst))
            .unwrap()
            .unwrap();
        nft(
            &bed.node_ns,
            &format!(
                "table ip fwdprobe {{\n counter between {{}}\n chain probe {{\n  \
                 type filter hook forward priority filter; policy accept;\n  \
                 ip saddr {a} ip daddr {b} counter name between\n  \
                 ip saddr {b} ip daddr {a} counter name between\n }}\n}}\n",
                a = a.ip4,
                b = b.ip4
            ),
        )
        .unwrap();
        exchange(&a, listener, src, dst, 2000, 30_000);
        let (forwarded, _) = nft_counter(&bed.node_ns, "ip", "fwdprobe", "between").unwrap();
        let status: Value = serde_json::from_str(&daemon.get("/v1/status").unwrap()).unwrap();
        let redirected = observer_tests::kernel_stat(&status, "redirected");
        let handed = observer_tests::kernel_stat(&status, "handed_over");
        let close = wait_for_close(&daemon, tag, src.port());
        let c = &close["counters"];
        let packets = c["packets_out"].as_u64().unwrap() + c["packets_in"].as_u64().unwrap();
        let bytes_in = c["bytes_in"].as_u64().unwrap();
        assert!(bytes_in > 30_000, "{tag}: {close:#}");
        assert_eq!(close["snat"]["expectation"], "none", "{tag}: {close:#}");
        if extra.is_none() {
            // Settled by the kernel's proof of its first packet, untranslated since it never
            // passed the node's stack, not by a lookup in the node's conntrack.
            let m = daemon.get("/metrics").unwrap();
            let wire = "observer_snat_settled_total{how=\"wire\"} 1";
            assert!(m.lines().any(|l| l == wire), "{tag}: {m}");
        }
        if extra.is_none() {
            assert_eq!(forwarded, 0, "{tag}: forwarded by the node");
            assert!(
                redirected >= packets && handed == 0,
                "{tag}: redirected {redirected}, handed over {handed}, {packets} packets"
            );
        } else {
            assert_eq!(forwarded, packets, "{tag}: forwarded by the node");
            assert!(
                redirected == 0 && handed * 10 >= packets * 9,
                "{tag}: redirected {redirected}, handed over {handed}, {packets} packets"
            );
        }
    }
}

/// A close the kernel cannot follow to its last ACK (a RST here) is held for `--close-grace`
/// (a minute here). When the client opens its tuple again meanwhile, the held close is
/// published then, before the new connection's state takes the key, with the first
/// connection's counters (nftables' in the client pod, read between the two): not lost, and
/// not mixed with the second's.
#[test]
fn a_held_close_is_published_when_its_tuple_is_reused() {
    let (_bed, daemon, a, b) = client_and_server("reu", &["--close-grace", "60s"]);
    let flow = Flow {
        name: "reu",
        proto: "TCP",
        src: a.ip4,
        dst: b.ip4,
        sport: 41_960,
        dport: TCP_PORT,
        class: "pod-to-pod-local",
        dst_pod: Some("b"),
        expect: None,
    };
    nft(&a.netns, &nft_rules(std::slice::from_ref(&flow))).expect("reference counters");
    let (src, dst) = (
        SocketAddr::new(flow.src, flow.sport),
        SocketAddr::new(flow.dst, TCP_PORT),
    );
    let listener = in_netns(&b.netns, move || TcpListener::bind(dst))
        .unwrap()
        .unwrap();
    // The first connection: 1,000 bytes up, 500 back, then the client's RST.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.read_exact(&mut [0u8; 1000]).unwrap();
        s.write_all(&[7u8; 500]).unwrap();
        let _ = s.read(&mut [0u8; 1]);
        listener
    });
    spawn_in_netns(&a.netns, move || {
        let fd = socket2_like(libc::AF_INET);
        bind_fd(fd, src);
        let mut s = connect_fd(fd, dst);
        s.write_all(&[1u8; 1000]).unwrap();
        s.read_exact(&mut [0u8; 500]).unwrap();
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const _ as *const _,
                std::mem::size_of::<libc::linger>() as u32,
            )
        };
        assert_eq!(rc, 0);
    })
    .join()
    .unwrap()
    .unwrap();
    let listener = server.join().unwrap();
    let counter = |dir: &str| nft_counter(&a.netns, "inet", "ref", &format!("reu_{dir}")).unwrap();
    let (o, i) = (counter("out"), counter("in"));

    // The second connection on the same tuple, a whole exchange.
    exchange(&a, listener, src, dst, 100, 100);
    let reused = std::time::Instant::now();
    let closes = loop {
        let records = daemon.flows().unwrap();
        let of = |event: &str| -> Vec<Value> {
            records
                .iter()
                .filter(|r| r["event"] == event && find(std::slice::from_ref(r), &flow).is_some())
                .cloned()
                .collect()
        };
        let (new, closes) = (of("new"), of("close"));
        if closes.len() >= 2 {
            assert_eq!(new.len(), 2, "{records:#?}");
            // Each close is its own connection's: its first packet's time. Each record
            // converts the kernel's time to wall-clock time when it is built, from its own
            // reading of both clocks, so the times are compared with a margin.
            let first_seen = |v: &Value| -> std::time::SystemTime {
                v["first_seen"]
                    .as_str()
                    .unwrap()
                    .parse::<Timestamp>()
                    .unwrap()
                    .0
            };
            for (n, c) in new.iter().zip(&closes) {
                let (n, c) = (first_seen(n), first_seen(c));
                let apart = n.duration_since(c).unwrap_or_else(|e| e.duration());
                assert!(apart < Duration::from_micros(100), "{records:#?}");
            }
            assert!(first_seen(&new[0]) < first_seen(&new[1]), "{records:#?}");
            break closes;
        }
        assert!(
            reused.elapsed() < Duration::from_secs(10),
            "{} close records {:?} after the tuple was reused (grace 60 s): {records:#?}\n{}",
            closes.len(),
            reused.elapsed(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let c = &closes[0]["counters"];
    let got = [
        c["packets_out"].as_u64().unwrap(),
        c["bytes_out"].as_u64().unwrap(),
        c["packets_in"].as_u64().unwrap(),
        c["bytes_in"].as_u64().unwrap(),
    ];
    assert_eq!(got, [o.0, o.1, i.0, i.1], "{:#}", closes[0]);
    assert!(
        closes[0]["l4"]["tcp_flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "RST")),
        "{:#}",
        closes[0]
    );
    let m = daemon.get("/metrics").unwrap();
    for (when, n) in [("last_ack", 1), ("held", 1), ("sweep", 0)] {
        let line = format!("observer_closes_total{{when=\"{when}\"}} {n}");
        assert!(m.lines().any(|l| l == line), "{line}\n{m}");
    }
}

/// Both ends of a connection closing at the same moment: their FINs are counted on two CPUs at
/// once, and each connection still gets its one close record.
#[test]
fn simultaneous_closes_are_each_reported_once() {
    const CONNS: usize = 3000;
    let (_bed, daemon, a, b, listener) = served("simc");
    let dst = SocketAddr::new(b.ip4, TCP_PORT);
    // A spin rendezvous per connection: both ends shut down within a few hundred nanoseconds.
    let gate = Arc::new(AtomicU32::new(0));
    let g = gate.clone();
    let server = std::thread::spawn(move || {
        for i in 0..CONNS as u32 {
            let (s, _) = listener.accept().unwrap();
            g.fetch_add(1, Ordering::SeqCst);
            wait_until(&g, 2 * (i + 1), false);
            close_together(&s);
        }
    });
    let g = gate.clone();
    let ports: Vec<u16> = spawn_in_netns(&a.netns, move || {
        (0..CONNS as u32)
            .map(|i| {
                let s = TcpStream::connect(dst).unwrap();
                let port = s.local_addr().unwrap().port();
                wait_until(&g, 2 * i + 1, false);
                g.fetch_add(1, Ordering::SeqCst);
                close_together(&s);
                port
            })
            .collect()
    })
    .join()
    .unwrap()
    .unwrap();
    server.join().unwrap();
    // Each connection's close record, a grace (1 s) after its close; a port used twice has two.
    let dst_ip = b.ip4.to_string();
    let t = std::time::Instant::now();
    loop {
        let closes = daemon
            .flows()
            .unwrap()
            .into_iter()
            .filter(|r| r["event"] == "close" && r["destination"]["ip"] == dst_ip.as_str());
        let mut per_port = std::collections::HashMap::<u64, i64>::new();
        for r in closes {
            *per_port
                .entry(r["source"]["port"].as_u64().unwrap())
                .or_default() += 1;
        }
        for p in &ports {
            *per_port.entry(*p as u64).or_default() -= 1;
        }
        let wrong: Vec<(u64, i64)> = per_port.into_iter().filter(|(_, n)| *n != 0).collect();
        if wrong.is_empty() {
            break;
        }
        // Published a grace after each close on this machine; in the Linux 6.1 guest (a debug
        // build under software emulation, each poll of the whole history competing with the
        // daemon) the last ones came more than 10 s after the last connection.
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} of {CONNS} connections without exactly one close record (port, records \
             more or fewer): {:?}\n{}",
            wrong.len(),
            &wrong[..wrong.len().min(20)],
            {
                // Every record of the first two such ports, either way round.
                let of: Vec<u64> = wrong.iter().take(2).map(|w| w.0).collect();
                let records: Vec<Value> = daemon
                    .flows()
                    .unwrap()
                    .into_iter()
                    .filter(|r| {
                        of.contains(&r["source"]["port"].as_u64().unwrap_or(0))
                            || of.contains(&r["destination"]["port"].as_u64().unwrap_or(0))
                    })
                    .collect();
                format!("{records:#?}\n{}", daemon.get("/metrics").unwrap())
            }
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Sends this end's FIN, then waits for the other end's.
fn close_together(s: &TcpStream) {
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let eof = (&*s).read(&mut [0u8; 1]);
    assert!(matches!(eof, Ok(0)), "the other end's FIN: {eof:?}");
}

/// Packets between a pod of the node and a pod of another node skip the node's stack both
/// ways: from the pod's veth to the uplink, and from the uplink into the pod. An nftables
/// counter on the node's forward hook stays at 0 for a connection the local pod opens and for
/// one the remote pod opens, and the close records count every packet. A connection the node
/// translated (a DNAT of an address in the pod CIDR to the local pod, which observer does not
/// know of, as a Service it has not synced yet) keeps the stack's path, or its replies would
/// leave untranslated. With
/// `--no-remote-redirect`, and on kubenet's bridge (whose pods the uplink could not deliver
/// past the stack), every packet takes the stack.
#[test]
fn remote_packets_skip_the_node_stack_both_ways_unless_told_not_to() {
    for (tag, kubenet, extra) in [
        ("rrd", false, None),
        ("rrs", false, Some("--no-remote-redirect")),
        ("rrk", true, None),
    ] {
        let mut bed = pods_on_two_nodes(tag, kubenet, &[("serve", TCP_PORT, "TCP")]);
        let daemon = start_reporting(&mut bed, extra);
        let (a, r) = (bed.pod("a").clone(), bed.remote_pod("r").clone());
        // Inside the cluster CIDR, so node-2 does not masquerade its pod's packets to it.
        let vip: IpAddr = "10.244.1.250".parse().unwrap();
        const VIP_PORT: u16 = 18_080;
        let dnat = format!(
            "ip daddr {vip} tcp dport {VIP_PORT} dnat to {}:{TCP_PORT}",
            a.ip4
        );
        forward_probe(&bed, "tcp", "41990, 41991", 41_992, &dnat);
        let listen = |p: &Pod| {
            let at = SocketAddr::new(p.ip4, TCP_PORT);
            in_netns(&p.netns, move || TcpListener::bind(at))
                .unwrap()
                .unwrap()
        };
        let (la, lr) = (listen(&a), listen(&r));
        let server_a = std::thread::spawn(move || tcp_server(la, 2));
        let server_r = std::thread::spawn(move || tcp_server(lr, 1));
        let cases = [
            (
                &a,
                SocketAddr::new(a.ip4, 41_990),
                SocketAddr::new(r.ip4, TCP_PORT),
            ),
            (
                &r,
                SocketAddr::new(r.ip4, 41_991),
                SocketAddr::new(a.ip4, TCP_PORT),
            ),
            (
                &r,
                SocketAddr::new(r.ip4, 41_992),
                SocketAddr::new(vip, VIP_PORT),
            ),
        ];
        for (client, src, dst) in cases {
            let got = spawn_in_netns(&client.netns, move || tcp_client(src, dst, 2000, 30_000))
                .join()
                .unwrap()
                .unwrap();
            assert_eq!(got, 30_000, "{tag}: {src} -> {dst}");
        }
        server_a.join().unwrap();
        server_r.join().unwrap();
        let (direct, _) = nft_counter(&bed.node_ns, "ip", "fwdprobe", "direct").unwrap();
        let (translated, _) = nft_counter(&bed.node_ns, "ip", "fwdprobe", "translated").unwrap();
        // The close records of the two direct connections, each with the 30 KB reply.
        let mut packets = 0;
        for port in [41_990, 41_991] {
            let close = wait_for_close(&daemon, tag, port);
            let c = &close["counters"];
            assert!(c["bytes_in"].as_u64().unwrap() > 30_000, "{tag}: {close:#}");
            packets += c["packets_out"].as_u64().unwrap() + c["packets_in"].as_u64().unwrap();
        }
        let status: Value = serde_json::from_str(&daemon.get("/v1/status").unwrap()).unwrap();
        let to = observer_tests::kernel_stat(&status, "redirected_to_uplink");
        let from = observer_tests::kernel_stat(&status, "redirected_from_uplink");
        eprintln!(
            "{tag}: forwarded {direct} of {packets} direct packets, {translated} translated; \
             redirected to the uplink {to}, from it {from}"
        );
        assert!(
            translated > 0,
            "{tag}: the translated connection left the stack"
        );
        if extra.is_none() && !kubenet {
            // Every packet, the first included (the next hop's MAC resolved for it): the
            // node's conntrack sees neither connection, not even by halves.
            assert_eq!(direct, 0, "{tag}: forwarded by the node");
            assert_eq!(to + from, packets, "{tag}: redirected {to} + {from}");
        } else {
            assert_eq!(direct, packets, "{tag}: forwarded by the node");
            assert_eq!((to, from), (0, 0), "{tag}: redirected");
        }
    }
}

/// UDP opened by a pod of another node: its first packet takes the node's stack (the only way
/// to learn that nothing translates it), every packet after it, both ways, skips the stack. A
/// UDP flow the node translates (a DNAT observer does not know, of another port of the pod's
/// own address) keeps the stack's path: its replies are translated back.
#[test]
fn udp_from_another_node_skips_the_stack_after_its_first_packet_unless_translated() {
    let tag = "rru";
    let mut bed = pods_on_two_nodes(tag, false, &[("serve", UDP_PORT, "UDP")]);
    let daemon = start_reporting(&mut bed, None);
    let (a, r) = (bed.pod("a").clone(), bed.remote_pod("r").clone());
    // Another port of the pod's address: the uplink sees a packet for a local pod.
    const DNAT_PORT: u16 = 19_090;
    let dnat = format!(
        "ip daddr {0} udp dport {DNAT_PORT} dnat to {0}:{UDP_PORT}",
        a.ip4
    );
    forward_probe(&bed, "udp", "41993", 41_994, &dnat);
    const EXCHANGES: usize = 32;
    let at = SocketAddr::new(a.ip4, UDP_PORT);
    let echo = in_netns(&a.netns, move || UdpSocket::bind(at))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || udp_echo(echo, 2 * EXCHANGES));
    for (sport, dst) in [(41_993, at), (41_994, SocketAddr::new(a.ip4, DNAT_PORT))] {
        let src = SocketAddr::new(r.ip4, sport);
        // A connected socket: an echo from any address but the one it sent to is not taken.
        let got = spawn_in_netns(&r.netns, move || udp_client(src, dst, EXCHANGES, 64))
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(got, EXCHANGES, "{src} -> {dst}");
    }
    server.join().unwrap();
    let (direct, _) = nft_counter(&bed.node_ns, "ip", "fwdprobe", "direct").unwrap();
    let (translated, _) = nft_counter(&bed.node_ns, "ip", "fwdprobe", "translated").unwrap();
    let status: Value = serde_json::from_str(&daemon.get("/v1/status").unwrap()).unwrap();
    let to = observer_tests::kernel_stat(&status, "redirected_to_uplink");
    let from = observer_tests::kernel_stat(&status, "redirected_from_uplink");
    eprintln!(
        "{tag}: forwarded {direct} direct packets, {translated} translated; redirected to the \
         uplink {to}, from it {from}"
    );
    assert_eq!(
        direct, 1,
        "{tag}: the direct flow's packets forwarded by the node"
    );
    assert_eq!(
        translated,
        2 * EXCHANGES as u64,
        "{tag}: the translated flow's packets forwarded by the node"
    );
    assert_eq!(
        (to, from),
        (EXCHANGES as u64, EXCHANGES as u64 - 1),
        "{tag}: redirected"
    );
}

/// A test bed (the overlay, or kubenet's bridge) with pod `a` on node-1 and pod `r` on node-2,
/// each serving `serving`.
fn pods_on_two_nodes(tag: &str, kubenet: bool, serving: &[(&str, u16, &str)]) -> TestBed {
    let mut bed = if kubenet {
        TestBed::kubenet(tag)
    } else {
        TestBed::overlay(tag)
    }
    .expect("test bed");
    for (name, remote) in [("a", false), ("r", true)] {
        let spec = PodSpec {
            namespace: "x",
            name,
            labels: &[("pod", name)],
            ports: serving,
        };
        if remote {
            bed.add_remote_pod(spec).unwrap();
        } else {
            bed.add_pod(spec).unwrap();
        }
    }
    bed
}

/// observer on `bed`, reporting without delay, with `extra`'s flag.
fn start_reporting(bed: &mut TestBed, extra: Option<&str>) -> observer_tests::Daemon {
    let model = bed.model_args();
    let mut args: Vec<&str> = model.iter().map(|s| s.as_str()).collect();
    args.extend(["--report-interval", "0"]);
    args.extend(extra);
    bed.start_daemon(OBSERVER.as_ref(), &args).expect("daemon")
}

/// The node's forward hook, counted by nftables: counter `direct` for the packets of the
/// client ports `direct` (an nft set's elements), counter `translated` for those of client
/// port `translated`; and `dnat`, a prerouting DNAT rule observer is not told of.
fn forward_probe(bed: &TestBed, proto: &str, direct: &str, translated: u16, dnat: &str) {
    nft(
        &bed.node_ns,
        &format!(
            "table ip fwdprobe {{\n counter direct {{}}\n counter translated {{}}\n \
             chain probe {{\n  type filter hook forward priority filter; policy accept;\n  \
             {proto} sport {{ {direct} }} counter name direct\n  \
             {proto} dport {{ {direct} }} counter name direct\n  \
             {proto} sport {translated} counter name translated\n  \
             {proto} dport {translated} counter name translated\n }}\n}}\n\
             table ip unsynced {{\n chain pre {{\n  \
             type nat hook prerouting priority dstnat;\n  {dnat}\n }}\n}}\n"
        ),
    )
    .unwrap();
}

/// The close record of the connection from client port `port`, within 10 s.
fn wait_for_close(daemon: &observer_tests::Daemon, tag: &str, port: u16) -> Value {
    let t = std::time::Instant::now();
    loop {
        let close = daemon
            .flows()
            .unwrap()
            .into_iter()
            .find(|r| r["event"] == "close" && r["source"]["port"] == port);
        if let Some(c) = close {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{tag}: no close record for port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
