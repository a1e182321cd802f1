//! SNAT observation in both AKS network models, on the virtual node with its VNet peer,
//! external host and second node: the record's translated source must be exactly the address
//! and port the server saw, and its expectation what the model says.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use observer_tests::{
    in_netns, nft, spawn_in_netns, Model, PodSpec, TestBed, EXT_IP, NODE_IP, PEER_IP,
};
use serde_json::Value;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

type Seen = Arc<Mutex<Vec<SocketAddr>>>;

/// Echo servers (TCP and UDP on `port`) in a namespace, recording every peer address they see.
struct Servers {
    seen: Seen,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &str, ip: IpAddr, port: u16) -> Self {
        let seen: Seen = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let tcp = in_netns(ns, move || TcpListener::bind((ip, port)))
            .unwrap()
            .unwrap();
        let udp = in_netns(ns, move || UdpSocket::bind((ip, port)))
            .unwrap()
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (s1, st1) = (seen.clone(), stop.clone());
        let t1 = std::thread::spawn(move || {
            while !st1.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut c, peer)) => {
                        s1.lock().unwrap().push(peer);
                        c.set_nonblocking(false).ok();
                        c.set_read_timeout(Some(Duration::from_secs(2))).ok();
                        let mut buf = [0u8; 64];
                        if let Ok(n) = c.read(&mut buf) {
                            let _ = c.write_all(&buf[..n]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let (s2, st2) = (seen.clone(), stop.clone());
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !st2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    s2.lock().unwrap().push(peer);
                    let _ = udp.send_to(&buf[..n], peer);
                }
            }
        });
        Servers {
            seen,
            stop,
            threads: vec![t1, t2],
        }
    }

    fn saw(&self) -> Vec<SocketAddr> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP exchange from namespace `ns`; returns the client's local address.
fn tcp_exchange(ns: &str, dst: SocketAddr) -> SocketAddr {
    spawn_in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("echo");
        s.local_addr().unwrap()
    })
    .join()
    .unwrap()
    .unwrap()
}

/// One UDP exchange (request, echoed reply) from `ns`; returns the client's local address.
fn udp_exchange(ns: &str, dst: SocketAddr) -> SocketAddr {
    spawn_in_netns(ns, move || {
        let u = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // Connected, so the local address names the pod's IP.
        u.connect(dst).unwrap();
        u.send(b"hello").unwrap();
        let mut buf = [0u8; 16];
        u.recv(&mut buf).expect("udp echo");
        u.local_addr().unwrap()
    })
    .join()
    .unwrap()
    .unwrap()
}

fn flows(socket: &Path, extra: &[&str]) -> Vec<Value> {
    let out = Command::new(OBSERVER)
        .args(["flows", "--socket"])
        .arg(socket)
        .args(["-o", "json", "--last", "10000"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "observer flows: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `new` record of the connection from `client` to `dst` with its `snat`, waiting for it.
fn snat_record(socket: &Path, proto: &str, client: SocketAddr, dst: SocketAddr) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let recs = flows(socket, &["--snat", "--protocol", proto, "--type", "new"]);
        if let Some(r) = recs.iter().find(|r| {
            r["source"]["ip"] == client.ip().to_string()
                && r["source"]["port"] == client.port()
                && r["destination"]["ip"] == dst.ip().to_string()
                && r["destination"]["port"] == dst.port()
        }) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {proto} record with snat for {client} -> {dst}; records with snat: {recs:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks one connection: the record's pod side is the client's own address, its translated
/// side exactly the peer the server saw, and the expectation.
fn check(rec: &Value, client: SocketAddr, server_saw: SocketAddr, expectation: &str) {
    let n = &rec["snat"];
    assert_eq!(n["original_src_ip"], client.ip().to_string(), "{rec:#}");
    assert_eq!(n["original_src_port"], client.port(), "{rec:#}");
    assert_eq!(
        n["translated_src_ip"],
        server_saw.ip().to_string(),
        "{rec:#}"
    );
    assert_eq!(n["translated_src_port"], server_saw.port(), "{rec:#}");
    assert_eq!(n["expectation"], expectation, "{rec:#}");
}

fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

struct Node {
    bed: TestBed,
    daemon: observer_tests::Daemon,
}

fn node(tag: &str, model: Model) -> Node {
    node_with(tag, model, &[])
}

fn node_with(tag: &str, model: Model, extra: &[&str]) -> Node {
    let mut bed = TestBed::new(tag, model).unwrap();
    bed.add_app_pods("shop", &[("web", "web")]).unwrap();
    bed.add_remote_pod(PodSpec {
        namespace: "shop",
        name: "backend",
        labels: &[("app", "backend")],
        ports: &[],
    })
    .unwrap();
    let args = bed.model_args();
    let mut args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    args.extend_from_slice(extra);
    let daemon = bed.start_daemon(Path::new(OBSERVER), &args).unwrap();
    // The tests count how each connection's translation was settled: none of theirs may be in
    // the kernel's table the daemon reads once at start (its own thread, after readiness).
    observer_tests::cluster::eventually(
        "the daemon's start-up conntrack read",
        Duration::from_secs(10),
        || {
            Ok(metric(
                &daemon.get("/metrics")?,
                "observer_kernel_conntrack_dumps_total",
            ) >= 1)
        },
    );
    Node { bed, daemon }
}

/// Pod egress to the external host, the VNet peer and a pod on the other node, TCP and UDP:
/// every record's translation is what the server saw, and the expectation follows the model.
fn both_protocols_to_every_destination(model: Model) {
    let n = node(
        if model == Model::Overlay {
            "sno"
        } else {
            "snf"
        },
        model,
    );
    let bed = &n.bed;
    let web = bed.pod("web").clone();
    let backend = bed.remote_pod("backend").clone();
    let ext = Servers::start(&bed.ext_ns, EXT_IP.parse().unwrap(), 8080);
    let peer = Servers::start(&bed.peer_ns, PEER_IP.parse().unwrap(), 8080);
    let remote = Servers::start(&backend.netns, backend.ip4, 8080);
    let node_ip: IpAddr = NODE_IP.parse().unwrap();

    let cases: [(&Servers, SocketAddr, &str); 3] = [
        (&ext, format!("{EXT_IP}:8080").parse().unwrap(), "expected"),
        (
            &peer,
            format!("{PEER_IP}:8080").parse().unwrap(),
            if model == Model::Overlay {
                "expected"
            } else {
                "none"
            },
        ),
        (&remote, SocketAddr::new(backend.ip4, 8080), "none"),
    ];
    for (servers, dst, expectation) in cases {
        for proto in ["TCP", "UDP"] {
            let before = servers.saw().len();
            let client = if proto == "TCP" {
                tcp_exchange(&web.netns, dst)
            } else {
                udp_exchange(&web.netns, dst)
            };
            let saw = servers.saw()[before];
            // The test bed does what the model says.
            if expectation == "expected" {
                assert_eq!(saw.ip(), node_ip, "{proto} to {dst}");
            } else {
                assert_eq!(saw, client, "{proto} to {dst}");
            }
            let rec = snat_record(&n.daemon.socket, proto, client, dst);
            check(&rec, client, saw, expectation);
            assert_eq!(rec["direction"], "egress");
        }
    }

    // A Service: the ClusterIP is DNAT'd to the pod on node-2 and, as with kube-proxy, not
    // masqueraded. Judged against where the connection went, nothing was due.
    let rules = format!(
        "table ip svc {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n  \
         ip daddr 10.0.0.10 tcp dport 80 dnat to {}:8080\n }}\n}}\n",
        backend.ip4
    );
    nft(&bed.node_ns, &rules).unwrap();
    let svc: SocketAddr = "10.0.0.10:80".parse().unwrap();
    let before = remote.saw().len();
    let client = tcp_exchange(&web.netns, svc);
    assert_eq!(remote.saw()[before], client, "the backend sees the pod IP");
    let rec = snat_record(&n.daemon.socket, "TCP", client, svc);
    check(&rec, client, client, "none");

    // Replies are attributed to the pod: the connection's close record (published with the
    // last ACK, the exchange being over) counts them.
    let client = tcp_exchange(&web.netns, format!("{EXT_IP}:8080").parse().unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ct = n.daemon.flows().unwrap();
        let e = ct.iter().find(|r| {
            r["event"] == "close"
                && r["source"]["port"] == client.port()
                && r["source"]["ip"] == client.ip().to_string()
        });
        let done =
            |e: &&Value| e["counters"]["packets_in"].as_u64() >= Some(2) && !e["snat"].is_null();
        if let Some(e) = e.filter(done) {
            assert_eq!(e["snat"]["expectation"], "expected", "{e:#}");
            assert_eq!(e["source"]["pod"], "web");
            break;
        }
        assert!(Instant::now() < deadline, "no replies counted: {e:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Nothing unexpected or missing in a correctly configured node; the metrics agree.
    assert!(flows(&n.daemon.socket, &["--snat", "unexpected"]).is_empty());
    assert!(flows(&n.daemon.socket, &["--snat", "missing"]).is_empty());
    let m = n.daemon.get("/metrics").unwrap();
    let expected = if model == Model::Overlay { 5 } else { 3 };
    assert!(
        metric(&m, "observer_snat_flows_total{expectation=\"expected\"}") >= expected,
        "{m}"
    );
    assert_eq!(
        metric(&m, "observer_snat_flows_total{expectation=\"unexpected\"}"),
        0
    );
    // Every connection's translation (or its absence) was seen as its opening packet left
    // the node: nothing waited for a lookup.
    assert!(
        metric(&m, "observer_snat_settled_total{how=\"wire\"}") >= 8,
        "{m}"
    );
    for how in ["lookup", "absent"] {
        let name = format!("observer_snat_settled_total{{how=\"{how}\"}}");
        assert_eq!(metric(&m, &name), 0, "{m}");
    }
    let status = n.daemon.get("/v1/status").unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    let want = if model == Model::Overlay {
        "overlay"
    } else {
        "flat"
    };
    assert_eq!(status["network"]["model"], want, "{status:#}");
}

#[test]
fn overlay_model_snat() {
    both_protocols_to_every_destination(Model::Overlay);
}

#[test]
fn flat_model_snat() {
    both_protocols_to_every_destination(Model::Flat);
}

/// A MASQUERADE rule that also catches the VNet peer in the flat model: the peer sees the node
/// IP, and the record says `unexpected` with exactly that translation.
#[test]
fn wrong_masquerade_is_unexpected() {
    let n = node("snw", Model::Flat);
    let bed = &n.bed;
    let web = bed.pod("web").clone();
    bed.add_wrong_masquerade(&bed.node_ns, &format!("{PEER_IP}/32"))
        .unwrap();
    let peer = Servers::start(&bed.peer_ns, PEER_IP.parse().unwrap(), 8080);
    let dst: SocketAddr = format!("{PEER_IP}:8080").parse().unwrap();
    for proto in ["TCP", "UDP"] {
        let before = peer.saw().len();
        let client = if proto == "TCP" {
            tcp_exchange(&web.netns, dst)
        } else {
            udp_exchange(&web.netns, dst)
        };
        let saw = peer.saw()[before];
        assert_eq!(saw.ip(), NODE_IP.parse::<IpAddr>().unwrap());
        let rec = snat_record(&n.daemon.socket, proto, client, dst);
        check(&rec, client, saw, "unexpected");
    }
    let unexpected = flows(&n.daemon.socket, &["--snat", "unexpected"]);
    assert!(
        unexpected.len() >= 2
            && unexpected
                .iter()
                .all(|r| r["snat"]["expectation"] == "unexpected"),
        "{unexpected:#?}"
    );
    // The compact line says it too.
    let out = Command::new(OBSERVER)
        .args(["flows", "--socket"])
        .arg(&n.daemon.socket)
        .args(["--snat", "unexpected", "--last", "1"])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.contains(&format!("SNAT {NODE_IP}:")) && line.contains("(unexpected)"),
        "{line}"
    );
}

/// Without the MASQUERADE rule the overlay pod IP leaves the node: `missing`.
#[test]
fn missing_masquerade_is_missing() {
    let n = node("snm", Model::Overlay);
    let bed = &n.bed;
    let web = bed.pod("web").clone();
    bed.remove_masquerade(&bed.node_ns).unwrap();
    let ext = Servers::start(&bed.ext_ns, EXT_IP.parse().unwrap(), 8080);
    let dst: SocketAddr = format!("{EXT_IP}:8080").parse().unwrap();
    let client = udp_exchange(&web.netns, dst);
    let saw = ext.saw()[0];
    assert_eq!(saw, client, "the external host sees the pod IP");
    let rec = snat_record(&n.daemon.socket, "UDP", client, dst);
    check(&rec, client, saw, "missing");
}

/// Short connections, one after another from the same source port (closed with a RST, so the
/// port is free at once), each in the kernel's conntrack a new entry on the same tuple that
/// replaces the last one: every record of each carries the translation the server saw (never
/// an earlier connection's entry), the join counts each connection once, and no record needed
/// the fallback lookup. A short grace, so each close is out before the tuple is reused (a
/// close whose tuple was reopened within its grace is not published: the new connection's
/// record stands in for it).
#[test]
fn short_connections_on_a_reused_tuple_keep_their_snat() {
    const CONNS: usize = 10;
    let n = node_with("snr", Model::Overlay, &["--close-grace", "100ms"]);
    let bed = &n.bed;
    let web = bed.pod("web").clone();
    let ext = Servers::start(&bed.ext_ns, EXT_IP.parse().unwrap(), 8080);
    let dst: SocketAddr = format!("{EXT_IP}:8080").parse().unwrap();
    let metrics = || n.daemon.get("/metrics").unwrap();
    let before = metric(
        &metrics(),
        "observer_snat_flows_total{expectation=\"expected\"}",
    );
    let web_ip = web.ip4;
    let clients: Vec<SocketAddr> = spawn_in_netns(&web.netns, move || {
        let mut port = 0;
        (0..CONNS)
            .map(|_| {
                use socket2::{Domain, Socket, Type};
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                s.set_reuse_address(true).unwrap();
                s.bind(&SocketAddr::new(web_ip, port).into()).unwrap();
                s.connect_timeout(&dst.into(), Duration::from_secs(2))
                    .unwrap();
                let mut s: TcpStream = s.into();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s.write_all(b"hello").unwrap();
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).unwrap();
                let local = s.local_addr().unwrap();
                port = local.port();
                // A RST: no TIME_WAIT, the next connection reuses the tuple.
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(s);
                // Apart by more than the ring's poll (100 ms), the grace and the close
                // queue's pass (100 ms each).
                std::thread::sleep(Duration::from_millis(400));
                local
            })
            .collect()
    })
    .join()
    .unwrap()
    .unwrap();
    assert!(clients.iter().all(|c| *c == clients[0]), "{clients:?}");
    let saw = ext.saw();
    assert_eq!(saw.len(), CONNS, "{saw:?}");

    // Each connection's `new` and `close`, in order; the server saw each translation.
    let deadline = Instant::now() + Duration::from_secs(5);
    let recs = loop {
        let recs: Vec<Value> = flows(&n.daemon.socket, &["--protocol", "TCP"])
            .into_iter()
            .filter(|r| {
                r["source"]["port"] == clients[0].port()
                    && r["destination"]["ip"] == EXT_IP
                    && (r["event"] == "new" || r["event"] == "close")
            })
            .collect();
        if recs.len() >= 2 * CONNS || Instant::now() > deadline {
            break recs;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(recs.len(), 2 * CONNS, "{recs:#?}");
    for (i, pair) in recs.chunks(2).enumerate() {
        assert_eq!(
            (&pair[0]["event"], &pair[1]["event"]),
            (&Value::from("new"), &Value::from("close")),
            "{recs:#?}"
        );
        for r in pair {
            check(r, clients[0], saw[i], "expected");
        }
    }
    let m = metrics();
    assert_eq!(
        metric(&m, "observer_snat_flows_total{expectation=\"expected\"}") - before,
        CONNS as u64,
        "{m}"
    );
    assert_eq!(
        metric(&m, "observer_snat_settled_total{how=\"lookup\"}"),
        0,
        "{m}"
    );
}

/// A first SYN that a firewall on the node drops after observer's program saw it: it never
/// leaves the node, and after `--snat-wait` the kernel has no entry for it, so the `new` record
/// goes out untranslated (`absent`). The retransmission a second later leaves translated. The
/// connection's `close` record carries the translation the server saw, and the correction is
/// counted.
#[test]
fn a_translation_read_late_reaches_the_close_record() {
    const PORT: u16 = 8091;
    let n = node_with("snl", Model::Overlay, &["--close-grace", "100ms"]);
    let bed = &n.bed;
    let web = bed.pod("web").clone();
    let ext = Servers::start(&bed.ext_ns, EXT_IP.parse().unwrap(), PORT);
    // The first SYN to PORT only: `numgen inc` counts the packets this rule sees.
    nft(
        &bed.node_ns,
        &format!(
            "table ip late {{\n chain first_syn {{\n  \
             type filter hook forward priority filter; policy accept;\n  \
             tcp dport {PORT} tcp flags syn numgen inc mod 1000 == 0 drop\n }}\n}}\n"
        ),
    )
    .unwrap();
    let dst: SocketAddr = format!("{EXT_IP}:{PORT}").parse().unwrap();
    let t0 = Instant::now();
    let client = tcp_exchange(&web.netns, dst);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "the first SYN was not dropped: connected in {:?}",
        t0.elapsed()
    );
    let saw = ext.saw()[0];
    assert_eq!(saw.ip(), NODE_IP.parse::<IpAddr>().unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    let close = loop {
        let recs = flows(&n.daemon.socket, &["--protocol", "TCP", "--type", "close"]);
        if let Some(r) = recs
            .iter()
            .find(|r| r["source"]["port"] == client.port() && r["destination"]["ip"] == EXT_IP)
        {
            break r.clone();
        }
        assert!(Instant::now() < deadline, "no close record: {recs:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    check(&close, client, saw, "expected");
    let m = n.daemon.get("/metrics").unwrap();
    for how in ["absent", "late"] {
        let name = format!("observer_snat_settled_total{{how=\"{how}\"}}");
        assert_eq!(metric(&m, &name), 1, "{m}");
    }
}

/// Between two pods of the node, on the node's stack (`--no-local-redirect`; by default such
/// packets skip it, see `e2e_counting`): each connection's opening packet is seen leaving the
/// stack at the other pod's veth, untranslated, so no connection is looked up; except a first
/// packet the node held back while it resolved the pod's address (the neighbour entry
/// flushed): it left in another pass of the stack, and the kernel's entry, made before the
/// packet waited, settles it by an exact lookup, as soon as the ring was read past it (long
/// before a `--snat-wait` of 10 s).
#[test]
fn local_connections_are_seen_leaving_and_a_held_packet_is_looked_up() {
    let mut bed = TestBed::new("snp", Model::Overlay).unwrap();
    bed.add_app_pods("shop", &[("web", "web"), ("api", "api")])
        .unwrap();
    let args = bed.model_args();
    let mut args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    args.extend_from_slice(&["--snat-wait", "10s", "--no-local-redirect"]);
    let daemon = bed.start_daemon(Path::new(OBSERVER), &args).unwrap();
    let (web, api) = (bed.pod("web").clone(), bed.pod("api").clone());
    let servers = Servers::start(&api.netns, api.ip4, 8080);
    let dst = SocketAddr::new(api.ip4, 8080);
    let settled = |how: &str| {
        let m = daemon.get("/metrics").unwrap();
        metric(&m, &format!("observer_snat_settled_total{{how=\"{how}\"}}"))
    };

    observer_tests::ns_run(&bed.node_ns, &["ip", "neigh", "flush", "dev", &api.host_if]).unwrap();
    let t0 = Instant::now();
    let held = tcp_exchange(&web.netns, dst);
    let rec = snat_record(&daemon.socket, "TCP", held, dst);
    check(&rec, held, servers.saw()[0], "none");
    assert_eq!((settled("lookup"), settled("wire")), (1, 0));
    // The ring's next read (its poll is 100 ms), not the wait.
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(("TCP", tcp_exchange(&web.netns, dst)));
        clients.push(("UDP", udp_exchange(&web.netns, dst)));
    }
    for (proto, client) in clients {
        let rec = snat_record(&daemon.socket, proto, client, dst);
        check(&rec, client, client, "none");
    }
    assert_eq!(settled("wire"), 10);
    assert_eq!((settled("lookup"), settled("absent")), (1, 0));
}
