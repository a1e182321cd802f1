//! ctnetlink against the real kernel: a client namespace A, a router R that masquerades towards
//! a server namespace B. The server reports the peer address it saw; the kernel's conntrack
//! entry in R (dump and exact GET) must name exactly that address as the SNAT of the client's
//! original tuple. Needs root (network namespaces, nftables).
use std::{
    collections::BTreeSet,
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use observer::ctnetlink::{self, CtEvent, CtEventKind, Tuple};
use observer_tests::{in_netns, nft, ns_run, run, spawn_in_netns, unique_prefix};

const UDP_PORT: u16 = 7000;
const TCP_PORT: u16 = 7001;
/// Dropped in B: flows that never get a reply, so their entries stay unreplied.
const SINK_PORT: u16 = 7002;
const TCP: u8 = 6;
const UDP: u8 = 17;

fn is_root() -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: ctnetlink end-to-end tests need root (network namespaces, nftables)");
        return false;
    }
    true
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// Namespaces A (client), R (masquerading router), B (server); removed on drop, panics
/// included.
struct Topology {
    a: String,
    r: String,
    b: String,
    created: Vec<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}

impl Topology {
    fn build(tag: &str) -> Result<Self> {
        let prefix = unique_prefix(tag);
        let mut t = Topology {
            a: format!("{prefix}-a"),
            r: format!("{prefix}-r"),
            b: format!("{prefix}-b"),
            created: Vec::new(),
        };
        for ns in [t.a.clone(), t.r.clone(), t.b.clone()] {
            run(&["ip", "netns", "add", &ns])?;
            t.created.push(ns.clone());
            ns_run(&ns, &["ip", "link", "set", "lo", "up"])?;
            // Link-local addresses too: a tentative one stalls neighbour discovery for a second.
            ns_run(
                &ns,
                &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"],
            )?;
        }
        let (a, r, b) = (t.a.as_str(), t.r.as_str(), t.b.as_str());
        run(&[
            "ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "a0", "netns", r,
        ])?;
        run(&[
            "ip", "-n", r, "link", "add", "b0", "type", "veth", "peer", "name", "eth0", "netns", b,
        ])?;
        let cmds: &[(&str, &[&str])] = &[
            (a, &["ip", "addr", "add", "10.1.0.2/24", "dev", "eth0"]),
            (a, &["ip", "addr", "add", "10.1.0.3/24", "dev", "eth0"]),
            (
                a,
                &["ip", "addr", "add", "fd01::2/64", "dev", "eth0", "nodad"],
            ),
            (a, &["ip", "link", "set", "eth0", "up"]),
            (a, &["ip", "route", "add", "default", "via", "10.1.0.1"]),
            (
                a,
                &["ip", "-6", "route", "add", "default", "via", "fd01::1"],
            ),
            (r, &["ip", "addr", "add", "10.1.0.1/24", "dev", "a0"]),
            (
                r,
                &["ip", "addr", "add", "fd01::1/64", "dev", "a0", "nodad"],
            ),
            (r, &["ip", "addr", "add", "10.2.0.1/24", "dev", "b0"]),
            (
                r,
                &["ip", "addr", "add", "fd02::1/64", "dev", "b0", "nodad"],
            ),
            (r, &["ip", "link", "set", "a0", "up"]),
            (r, &["ip", "link", "set", "b0", "up"]),
            (r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
            (r, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]),
            // B gets no route back to A: only a translated source can be answered.
            (b, &["ip", "addr", "add", "10.2.0.2/24", "dev", "eth0"]),
            (
                b,
                &["ip", "addr", "add", "fd02::2/64", "dev", "eth0", "nodad"],
            ),
            (b, &["ip", "link", "set", "eth0", "up"]),
        ];
        for (ns, args) in cmds {
            ns_run(ns, args)?;
        }
        for (ns, dev) in [(a, "eth0"), (r, "a0"), (r, "b0"), (b, "eth0")] {
            wait_operational(ns, dev)?;
        }
        nft(
            r,
            "table inet obct {\n\
               chain post {\n\
                 type nat hook postrouting priority srcnat; policy accept;\n\
                 oifname \"b0\" masquerade\n\
               }\n\
             }\n",
        )?;
        nft(
            b,
            &format!(
                "table inet obct {{\n\
                   chain input {{\n\
                     type filter hook input priority filter; policy accept;\n\
                     udp dport {SINK_PORT} drop\n\
                   }}\n\
                 }}\n"
            ),
        )?;
        Ok(t)
    }

    /// Runs `f` in R, where the kernel's conntrack entries of the forwarded flows live.
    fn in_r<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.r, f).expect("entering R")
    }
}

/// Until the kernel has processed a link's carrier (operstate UP), its queue discards packets;
/// a first neighbour solicitation lost there costs a one second retransmit.
fn wait_operational(ns: &str, dev: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = ns_run(ns, &["ip", "-o", "link", "show", "dev", dev])?;
        if out.contains("state UP") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{dev} in {ns} not up: {out}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server in B: answers every UDP datagram and TCP connection with the peer address it
/// saw, until `stop`.
struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<Result<()>>>>,
}

impl Server {
    fn start(ns: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = stop.clone();
        let handle = spawn_in_netns(ns, move || serve(&flag, ready_tx));
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("server in B did not start")?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            match h.join() {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) | Ok(Err(e)) => eprintln!("server: {e:#}"),
                Err(_) => eprintln!("server thread panicked"),
            }
        }
    }
}

/// A dual-stack socket reports IPv4 peers as `::ffff:a.b.c.d`.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn serve(stop: &AtomicBool, ready: mpsc::Sender<()>) -> Result<()> {
    let udp = UdpSocket::bind(("::", UDP_PORT))?;
    udp.set_read_timeout(Some(Duration::from_millis(20)))?;
    let tcp = TcpListener::bind(("::", TCP_PORT))?;
    tcp.set_nonblocking(true)?;
    ready.send(())?;
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        match udp.recv_from(&mut buf) {
            Ok((_, peer)) => {
                udp.send_to(canonical(peer).to_string().as_bytes(), peer)?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
        loop {
            match tcp.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false)?;
                    s.write_all(canonical(peer).to_string().as_bytes())?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// A UDP round trip from `local`: (the client's address, the peer address B saw).
fn udp_probe(local: SocketAddr, server: SocketAddr) -> Result<(SocketAddr, SocketAddr)> {
    let s = UdpSocket::bind(local)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.send_to(b"who am i", server)?;
    let mut buf = [0u8; 128];
    let (n, _) = s.recv_from(&mut buf).context("no UDP answer from B")?;
    Ok((s.local_addr()?, std::str::from_utf8(&buf[..n])?.parse()?))
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// `std` cannot bind a TCP socket before connecting; we need a chosen source address and port.
fn tcp_connect_from(local: SocketAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let (ss, len) = sockaddr(local);
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let (ss, len) = sockaddr(dst);
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

fn read_seen(s: &mut TcpStream) -> Result<SocketAddr> {
    let mut text = String::new();
    s.read_to_string(&mut text)
        .context("no TCP answer from B")?;
    Ok(text.parse()?)
}

/// A flow as the client sent it, and its source as the server saw it.
#[derive(Clone, Copy, Debug)]
struct Probe {
    proto: u8,
    client: SocketAddr,
    server: SocketAddr,
    seen: SocketAddr,
}

impl Probe {
    fn orig(&self) -> Tuple {
        Tuple {
            proto: self.proto,
            src: self.client.ip(),
            dst: self.server.ip(),
            sport: self.client.port(),
            dport: self.server.port(),
        }
    }

    /// The entry names exactly this flow and exactly the translation the server observed.
    fn check(&self, ev: &CtEvent, source: &str) {
        assert_eq!(ev.orig, self.orig(), "{source}: original tuple");
        assert_eq!(
            ev.snat(),
            Some((self.seen.ip(), self.seen.port())),
            "{source}: SNAT of {} (server saw {})",
            self.orig(),
            self.seen
        );
        assert_eq!(ev.dnat(), None, "{source}: no DNAT");
        assert_eq!(
            (ev.reply.src, ev.reply.sport, ev.reply.proto),
            (self.server.ip(), self.server.port(), self.proto),
            "{source}: reply tuple comes from the server"
        );
        assert_eq!(ev.zone, 0, "{source}: zone");
    }
}

#[test]
fn masquerade_is_read_exactly_from_dump_and_get() {
    if !is_root() {
        return;
    }
    let t0 = Instant::now();
    let topo = Topology::build("ct").expect("building A-R-B");
    let _server = Server::start(&topo.b).expect("server");
    eprintln!("setup: {:?}", t0.elapsed());

    let t1 = Instant::now();
    let udp4 = sa("10.2.0.2:7000");
    let tcp4 = sa("10.2.0.2:7001");
    let probes: Vec<Probe> = in_netns(&topo.a, move || -> Result<Vec<Probe>> {
        let mut probes = Vec::new();
        // Two clients with the same source port: the second clashes behind the router's one
        // address, so masquerade must pick another port and we must read which.
        let (c1, seen1) = udp_probe(sa("10.1.0.2:0"), udp4)?;
        let (c2, seen2) = udp_probe(SocketAddr::new("10.1.0.3".parse()?, c1.port()), udp4)?;
        for (client, seen) in [(c1, seen1), (c2, seen2)] {
            probes.push(Probe {
                proto: UDP,
                client,
                server: udp4,
                seen,
            });
        }
        let mut s1 = tcp_connect_from(sa("10.1.0.2:0"), tcp4)?;
        let c1 = s1.local_addr()?;
        let mut s2 = tcp_connect_from(SocketAddr::new("10.1.0.3".parse()?, c1.port()), tcp4)?;
        let c2 = s2.local_addr()?;
        for (client, s) in [(c1, &mut s1), (c2, &mut s2)] {
            probes.push(Probe {
                proto: TCP,
                client,
                server: tcp4,
                seen: read_seen(s)?,
            });
        }
        let (client, seen) = udp_probe(sa("[fd01::2]:0"), sa("[fd02::2]:7000"))?;
        probes.push(Probe {
            proto: UDP,
            client,
            server: sa("[fd02::2]:7000"),
            seen,
        });
        let mut s = tcp_connect_from(sa("[fd01::2]:0"), sa("[fd02::2]:7001"))?;
        probes.push(Probe {
            proto: TCP,
            client: s.local_addr()?,
            server: sa("[fd02::2]:7001"),
            seen: read_seen(&mut s)?,
        });
        Ok(probes)
    })
    .expect("entering A")
    .expect("traffic from A to B");
    eprintln!("traffic: {:?}", t1.elapsed());
    for p in &probes {
        eprintln!(
            "{} {} -> {}: server saw {}",
            if p.proto == TCP { "tcp" } else { "udp" },
            p.client,
            p.server,
            p.seen
        );
    }
    // The setup really translated: the router's address, and for the clashing pairs two
    // different ports for one client port.
    for pair in [&probes[0..2], &probes[2..4]] {
        assert_eq!(pair[0].client.port(), pair[1].client.port());
        assert_eq!(pair[0].seen.ip(), "10.2.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(pair[1].seen.ip(), "10.2.0.1".parse::<IpAddr>().unwrap());
        assert_ne!(pair[0].seen.port(), pair[1].seen.port());
    }
    assert_eq!(probes[4].seen.ip(), "fd02::1".parse::<IpAddr>().unwrap());

    // Dump.
    let t3 = Instant::now();
    let table = topo.in_r(ctnetlink::dump).expect("dump");
    eprintln!("dump: {:?} ({} entries)", t3.elapsed(), table.len());
    let mut ids = Vec::new();
    for p in &probes {
        let matching: Vec<_> = table.iter().filter(|e| e.orig == p.orig()).collect();
        assert_eq!(matching.len(), 1, "one dump entry for {}", p.orig());
        p.check(matching[0], "dump");
        assert_eq!(matching[0].kind, CtEventKind::New);
        ids.push(matching[0].id);
    }
    assert!(
        table.iter().any(|e| e.orig.src.is_ipv4()) && table.iter().any(|e| e.orig.src.is_ipv6()),
        "the dump covers both families"
    );

    // Exact GET.
    let t4 = Instant::now();
    for (p, id) in probes.iter().zip(&ids) {
        let orig = p.orig();
        let ev = topo
            .in_r(move || ctnetlink::get(&orig))
            .expect("get")
            .unwrap_or_else(|| panic!("get found no entry for {orig}"));
        p.check(&ev, "get");
        assert_eq!(ev.id, *id, "get and dump agree on the entry id");
    }
    let absent = Tuple {
        sport: 1,
        ..probes[0].orig()
    };
    assert_eq!(
        topo.in_r(move || ctnetlink::get(&absent)).expect("get"),
        None
    );
    let absent6 = Tuple {
        sport: 1,
        ..probes[4].orig()
    };
    assert_eq!(
        topo.in_r(move || ctnetlink::get(&absent6)).expect("get"),
        None
    );
    eprintln!("get: {:?} for {} lookups", t4.elapsed(), probes.len() + 2);

    eprintln!("total: {:?}", t0.elapsed());
}

#[test]
fn dump_sees_every_flow_of_thousands() {
    if !is_root() {
        return;
    }
    const FLOWS: u16 = 3000;
    const FIRST_PORT: u16 = 20000;
    let t0 = Instant::now();
    let topo = Topology::build("cto").expect("building A-R-B");
    eprintln!("setup: {:?}", t0.elapsed());

    let t1 = Instant::now();
    let sink = sa("10.2.0.2:7002");
    in_netns(&topo.a, move || -> Result<()> {
        // Resolve neighbours on both hops first (B refuses the connection, which is a round
        // trip), so no flow's first packet waits in an ARP queue and gets dropped there.
        match TcpStream::connect_timeout(&sa("10.2.0.2:9"), Duration::from_secs(5)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            other => bail!("warm-up connection to B: {other:?}"),
        }
        for port in FIRST_PORT..FIRST_PORT + FLOWS {
            let s = UdpSocket::bind(("10.1.0.2", port))?;
            s.send_to(b"x", sink)?;
        }
        Ok(())
    })
    .expect("entering A")
    .expect("flood");
    eprintln!("{FLOWS} flows sent: {:?}", t1.elapsed());

    let t2 = Instant::now();
    let table = topo.in_r(ctnetlink::dump).expect("dump");
    eprintln!("dump: {:?} ({} entries)", t2.elapsed(), table.len());
    let ports: BTreeSet<u16> = table
        .iter()
        .filter(|e| {
            e.orig.proto == UDP
                && e.orig.src == "10.1.0.2".parse::<IpAddr>().unwrap()
                && e.orig.dst == sink.ip()
                && e.orig.dport == SINK_PORT
        })
        .map(|e| e.orig.sport)
        .collect();
    let flood_entries = table
        .iter()
        .filter(|e| e.orig.proto == UDP && e.orig.dport == SINK_PORT)
        .count();
    assert_eq!(flood_entries, usize::from(FLOWS), "one entry per flow");
    assert_eq!(
        ports,
        (FIRST_PORT..FIRST_PORT + FLOWS).collect::<BTreeSet<_>>(),
        "the dump holds every live flow"
    );

    eprintln!("total: {:?}", t0.elapsed());
}
