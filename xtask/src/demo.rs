//! `cargo xtask demo`: a virtual node with a few pods, live traffic and live flows.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use observer_tests::{
    dns, in_netns, spawn_in_netns, Model, PodSpec, Service, TestBed, EXT_IP, EXT_IP6, PEER_IP,
};

const KUBE_DNS: &str = "10.96.0.10";
const API_SVC: &str = "10.96.0.30";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

/// Added to `default_deny_with_dns("shop")`: shop runs under default-deny, as a hardened
/// namespace does, with DNS through the kube-dns Service allowed.
const SAMPLE_POLICY: &str = r#"# Each flow the app needs. The demo's web -> db connections
# are dropped, and their records name the policies. Services are judged against the backend
# they lead to.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: app-egress, namespace: shop}
spec:
  podSelector:
    matchExpressions: [{key: app, operator: In, values: [web, api]}]
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 8080}]
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432}]
  - to: [{podSelector: {matchLabels: {app: payments}}}]
    ports: [{port: 8443}]
  - to: [{ipBlock: {cidr: 0.0.0.0/0}}, {ipBlock: {cidr: "::/0"}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}}
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}
    ports: [{port: 8080}]
---
# Only the api may reach the database.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-allow-api-only, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{protocol: TCP, port: 5432}]
"#;

fn serve_tcp(l: TcpListener, stop: Arc<AtomicBool>) {
    l.set_nonblocking(true).ok();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).ok();
                s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                let mut buf = [0u8; 4096];
                if let Ok(n) = s.read(&mut buf) {
                    let _ = s.write_all(&vec![b'x'; n * 4]);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve_udp(u: UdpSocket, stop: Arc<AtomicBool>) {
    u.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = u.recv_from(&mut buf) {
            let _ = u.send_to(&buf[..n], from);
        }
    }
}

fn tcp_request(dst: SocketAddr, bytes: usize) {
    if let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(1)) {
        s.set_read_timeout(Some(Duration::from_secs(1))).ok();
        let _ = s.write_all(&vec![b'q'; bytes]);
        let mut buf = vec![0u8; bytes * 4];
        let _ = s.read_exact(&mut buf);
    }
}

fn udp_request(dst: SocketAddr) {
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    if let Ok(u) = UdpSocket::bind(bind) {
        u.set_read_timeout(Some(Duration::from_millis(500))).ok();
        let _ = u.send_to(b"query example.internal", dst);
        let mut buf = [0u8; 512];
        let _ = u.recv_from(&mut buf);
    }
}

pub fn run(duration: Option<u64>, model: Model) -> Result<()> {
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut bed = TestBed::new("demo", model).context("building the virtual node")?;
    let pods = [
        ("shop", "web", "web", vec![]),
        ("shop", "api", "api", vec![("http", 8080u16, "TCP")]),
        ("shop", "db", "db", vec![("postgres", 5432u16, "TCP")]),
        ("monitoring", "prometheus", "prometheus", vec![]),
    ];
    for (ns, name, app, ports) in &pods {
        bed.add_pod(PodSpec {
            namespace: ns,
            name,
            labels: &[("app", app)],
            ports,
        })?;
    }
    // A pod on the second node, reached across the VNet.
    bed.add_remote_pod(PodSpec {
        namespace: "shop",
        name: "payments",
        labels: &[("app", "payments")],
        ports: &[("http", 8443, "TCP")],
    })?;
    bed.add_remote_pod(PodSpec {
        namespace: "kube-system",
        name: "coredns",
        labels: &[("k8s-app", "kube-dns")],
        ports: &[("dns", 53, "UDP")],
    })?;
    // Services as kube-proxy programs them: the cluster DNS and the api.
    for (ns, name, ip, port, target, proto, backend) in [
        (
            "kube-system",
            "kube-dns",
            KUBE_DNS,
            53,
            53,
            "UDP",
            "coredns",
        ),
        ("shop", "api", API_SVC, 80, 8080, "TCP", "api"),
    ] {
        bed.add_service(Service {
            namespace: ns.into(),
            name: name.into(),
            cluster_ip: ip.parse()?,
            port,
            target_port: target,
            protocol: proto.into(),
            backends: vec![backend.into()],
            node_port: None,
        })?;
    }
    std::fs::write(
        bed.cluster_dir().join("policy.yaml"),
        observer_tests::default_deny_with_dns("shop") + SAMPLE_POLICY,
    )?;

    // The default socket (and so the Hubble one, /run/observer/hubble.sock), so `observer
    // flows -f` and `hubble observe` work from another shell as is; a private one if another
    // daemon already serves it.
    let default_sock = PathBuf::from("/run/observer/observer.sock");
    let socket = if std::os::unix::net::UnixStream::connect(&default_sock).is_ok() {
        PathBuf::from(format!("/run/observer/demo-{}.sock", std::process::id()))
    } else {
        default_sock
    };
    let bin = crate::observer_bin();
    let mut args = vec!["--report-interval".to_string(), "5s".to_string()];
    args.extend(bed.model_args());
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let daemon = bed.start_daemon_at(&bin, &socket, &args)?;
    println!(
        "virtual node {} is up ({} model): pods shop/web, shop/api, shop/db, monitoring/prometheus; \
         shop/payments and kube-system/coredns on node-2; Services kube-system/kube-dns {KUBE_DNS} \
         and shop/api {API_SVC}; shop under default-deny with allow-dns; VNet peer {PEER_IP}; \
         external host {EXT_IP}",
        bed.node_ns,
        model.as_str()
    );
    println!(
        "from another shell: {} flows -f --socket {}",
        bin.display(),
        socket.display()
    );
    println!(
        "                    {} status --socket {}",
        bin.display(),
        socket.display()
    );
    println!(
        "                    {} flows --snat -o json --socket {}",
        bin.display(),
        socket.display()
    );
    println!(
        "                    curl --unix-socket {} http://observer/metrics",
        socket.display()
    );
    println!(
        "                    hubble observe --server unix://{} --verdict DROPPED -o json",
        hubble_socket(&socket).display()
    );
    println!("---- live flows (Ctrl-C to stop) ----");

    let mut tail = Command::new(&bin)
        .args(["flows", "--follow", "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .spawn()
        .context("starting flow tail")?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let (web, api, db, prom) = (
        bed.pod("web").clone(),
        bed.pod("api").clone(),
        bed.pod("db").clone(),
        bed.pod("prometheus").clone(),
    );
    let payments = bed.remote_pod("payments").clone();
    for (ns, port) in [
        (api.netns.clone(), 8080u16),
        (db.netns.clone(), 5432),
        (bed.ext_ns.clone(), 80),
        (bed.peer_ns.clone(), 80),
        (payments.netns.clone(), 8443),
    ] {
        let l = in_netns(&ns, move || TcpListener::bind(("::", port)))??;
        let st = stop.clone();
        threads.push(std::thread::spawn(move || serve_tcp(l, st)));
    }
    let u = in_netns(&bed.ext_ns, || UdpSocket::bind(("::", 53)))??;
    let st = stop.clone();
    threads.push(std::thread::spawn(move || serve_udp(u, st)));
    let names = std::collections::HashMap::from([(
        "api.shop.svc.cluster.local".to_string(),
        API_SVC.parse()?,
    )]);
    threads.push(dns::serve(
        &bed.pod("coredns").netns.clone(),
        names,
        stop.clone(),
    ));
    let kube_dns: SocketAddr = format!("{KUBE_DNS}:53").parse()?;

    let ext4: SocketAddr = format!("{EXT_IP}:80").parse()?;
    let ext6: SocketAddr = format!("[{EXT_IP6}]:80").parse()?;
    let dns: SocketAddr = format!("{EXT_IP}:53").parse()?;
    let vm: SocketAddr = format!("{PEER_IP}:80").parse()?;
    let pay = SocketAddr::new(payments.ip4, 8443);
    let started = Instant::now();
    let mut round = 0u64;
    while !STOP.load(Ordering::SeqCst)
        && duration.is_none_or(|d| started.elapsed() < Duration::from_secs(d))
    {
        let api4 = SocketAddr::new(api.ip4, 8080);
        let api6 = SocketAddr::new(api.ip6, 8080);
        let db4 = SocketAddr::new(db.ip4, 5432);
        let web_ns = web.netns.clone();
        let mut jobs = vec![
            // Resolve the api's Service name through kube-dns, then call it.
            std::thread::spawn(move || {
                let name = "api.shop.svc.cluster.local";
                if let Some(ip) = dns::resolve(&web_ns, kube_dns, name, Duration::from_secs(1)) {
                    let svc = SocketAddr::new(ip.into(), 80);
                    let _ = in_netns(&web_ns, move || tcp_request(svc, 200));
                }
                Ok(())
            }),
            spawn_in_netns(&web.netns, move || tcp_request(api4, 300)),
            spawn_in_netns(&api.netns, move || tcp_request(db4, 120)),
            // Denied by shop/db-allow-api-only.
            spawn_in_netns(&web.netns, move || tcp_request(db4, 64)),
            spawn_in_netns(&web.netns, move || udp_request(dns)),
            spawn_in_netns(&prom.netns, move || tcp_request(api6, 80)),
            // A VM in the VNet: SNAT'd in the overlay model, not in the flat one.
            spawn_in_netns(&api.netns, move || tcp_request(vm, 100)),
            // Cross-node pod traffic keeps the pod IP in both models.
            spawn_in_netns(&api.netns, move || tcp_request(pay, 150)),
        ];
        if round % 2 == 0 {
            jobs.push(spawn_in_netns(&web.netns, move || tcp_request(ext4, 500)));
        } else {
            jobs.push(spawn_in_netns(&api.netns, move || tcp_request(ext6, 200)));
        }
        for j in jobs {
            let _ = j.join();
        }
        if round % 3 == 0 {
            let _ = observer_tests::ns_run(
                &web.netns,
                &["ping", "-n", "-q", "-c", "1", "-W", "1", EXT_IP],
            );
        }
        round += 1;
        let pause = Instant::now();
        while pause.elapsed() < Duration::from_millis(1500) && !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    // Let the last closes through, then stop the tail and tear the node down.
    std::thread::sleep(Duration::from_millis(1200));
    unsafe { libc::kill(tail.id() as i32, libc::SIGTERM) };
    let _ = tail.wait();
    println!(
        "---- stopping: {} rounds of traffic; tearing down {} ----",
        round, bed.prefix
    );
    bed.stop_daemon(&daemon);
    drop(bed);
    Ok(())
}

/// Where the daemon puts its Hubble socket by default beside `socket` (the rule of
/// `observer::hubble::default_socket`, which xtask does not link).
fn hubble_socket(socket: &Path) -> PathBuf {
    match socket.file_stem().and_then(|s| s.to_str()) {
        Some("observer") | None => socket.with_file_name("hubble.sock"),
        Some(stem) => socket.with_file_name(format!("{stem}-hubble.sock")),
    }
}
