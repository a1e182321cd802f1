//! `cargo xtask bench compare`: what enforcement costs the pods, against no enforcement and
//! against the rule shapes of the enforcers AKS users run instead, on the same virtual node,
//! with the same pods and the same policies, in the same run.
//!
//! Cluster: namespace `bench`, pod `server` (app=server, TCP 8080) and pod `client`
//! (app=client) on node-1, pod `rclient` (app=client) on node-2. Policies at BENCH_RULES rules
//! (default 1, 100, 1000, 10000): one NetworkPolicy per rule, all selecting the server; the
//! first N-1 allow port 8080 (TCP and UDP) from an ipBlock no pod is in (10.250.x.y/32), the
//! last from `app=client` pods. Every new connection is judged against all N.
//!
//! Enforcers (a virtual node each; the nodes of one rule count live side by side, so the
//! connection and throughput rounds interleave: round by round, every enforcer in turn, the
//! order rotated by one each round so that no enforcer always goes first):
//! - `none`: the baseline.
//! - `observer`: the daemon with the policies as YAML (`--source dir:`).
//! - `npm-iptables`: the shape Azure NPM (iptables mode) writes: an ipset per selector and per
//!   ipBlock (`hash:ip`, `hash:net`), conntrack ESTABLISHED/RELATED accepted first, a chain
//!   per policy jumped to for the pods it selects, which marks what it allows; marked traffic
//!   accepted, the rest to a selected pod dropped.
//! - `nft`: the nftables shape of kube-network-policies / kindnet with its verdict taken in
//!   the kernel: a set of pod IPs per selector and per ipBlock, established and related
//!   accepted by conntrack, the first packet of a connection to an isolated pod checked
//!   against each rule in turn.
//! - `nft-nfqueue`: kube-network-policies as designed: the first packet of each new connection
//!   to the selected pod goes to a userspace verdict program over NFQUEUE (the bench's own,
//!   `observer_tests::nfqueue`, walking the same rules); iptables-nft's NFQUEUE target stands
//!   in for nft's `queue`, which this kernel lacks (`CONFIG_NFT_QUEUE`).
//! - `none-again`: a second node without enforcement, measured as the others are: its ratios
//!   to `none` are the run's own noise floor (what two identical nodes read apart).
//!
//! Measures, per enforcer, rule count and placement (`local`: client and server on node-1;
//! `remote`: from node-2): new TCP connections per second from one client thread pinned to one
//! CPU (connect, 64-byte request, 64-byte response, close), and the latency of each of those
//! connections, p50 and p99; then (BENCH_THROUGHPUT=1, the default) established-flow
//! throughput with iperf3: TCP with 1,500-byte packets (Gbit/s received) and UDP with 64-byte
//! payloads at full speed (datagrams per second received). Median over BENCH_ROUNDS rounds of
//! BENCH_SECONDS each; every measure's ratio to `none` (`vs_none`) and observer's to each peer
//! (`vs_peers`) is the median of the round-by-round ratios (the rounds interleave), printed
//! with the lowest and highest. BENCH_ENFORCERS=none,observer limits the enforcers;
//! BENCH_OBSERVER_ARGS adds daemon flags (to see what a feature costs).
//!
//! Where the daemon runs: as the DaemonSet places it, in a CPU cgroup of its own with the
//! weight of its pod's request (BENCH_DAEMON_CPU_M, millicores, default 100 as in
//! `manifests/daemonset.yaml`), beside the pods' threads in the harness's cgroup, each of which
//! weighs what a pod with a 1-CPU request weighs. BENCH_DAEMON_CPU_M=0 leaves the daemon in the
//! harness's cgroup, an equal of each pod thread (a daemon run by hand on a host). The daemon's
//! CPU (utime + stime) over the connection rounds, per connection of both placements, is in
//! each observer row.
//!
//! The denied flood (BENCH_FLOOD=1, the default): the router puts TCP SYNs on node-1's uplink
//! as fast as one thread pinned to CPU 0 can, each from a new (address, port) of node-2's pod
//! range (the allowed client's address left out), to the server's port: a spoofed flood no
//! policy allows. node-1's uplink receive work runs on a NAPI thread of its own pinned to
//! CPU 1 (GRO on, threaded NAPI), the daemon's threads on CPU 0, so that thread's CPU time is
//! what the node spends judging and dropping. Per enforcer: packets per CPU-second of that
//! thread (the per-core drop rate), per wall-clock second, the share that reached the server (must be
//! under 1% for every enforcer), and for observer the daemon's CPU per million packets (its
//! drop records). `npm-iptables-raw` is NPM's chains hooked in the raw table, before
//! conntrack: not a shipped design, the cheapest place netfilter could drop it.
//!
//! Ignored by `cargo test`: run through xtask (release build, root).
use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use observer_tests::{bench::median, in_netns, ns_run, spawn_in_netns, PodSpec, TestBed};
use serde_json::json;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");
const PORT: u16 = 8080;
const ENFORCERS: [&str; 6] = [
    "none",
    "observer",
    "npm-iptables",
    "nft",
    "nft-nfqueue",
    "none-again",
];

/// Nodes without enforcement: the baseline, and its twin for the noise floor.
fn unenforced(enforcer: &str) -> bool {
    enforcer == "none" || enforcer == "none-again"
}

fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|x| x.trim().parse().expect(name))
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// The address no pod has that decoy rule `i` allows.
fn decoy(i: usize) -> String {
    format!("10.250.{}.{}/32", i / 256 % 256, i % 256)
}

/// The NetworkPolicies, as YAML for observer's `--source dir:`.
fn policies_yaml(rules: usize) -> String {
    let mut y = String::new();
    for i in 0..rules {
        let from = if i + 1 == rules {
            "    - podSelector: {matchLabels: {app: client}}\n".to_string()
        } else {
            format!("    - ipBlock: {{cidr: {}}}\n", decoy(i))
        };
        let _ = write!(
            y,
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: rule-{i}, namespace: bench}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n\
             \x20 ingress:\n  - from:\n{from}    ports: [{{port: {PORT}, protocol: TCP}}, {{port: {PORT}, protocol: UDP}}]\n---\n"
        );
    }
    y
}

/// Azure NPM's iptables shape for the same policies: `ipset restore` input, then
/// `iptables-restore` input.
fn npm_rules(rules: usize, server: &str, clients: &[&str]) -> (String, String) {
    npm_rules_in(rules, server, clients, false)
}

/// The same policy chains hooked in the raw table instead (`raw`): judged before conntrack,
/// so only SYNs can be judged (no state there). Not a design any peer ships; the cheapest
/// place netfilter could drop a denied flood with the peer's rules, for the flood measure.
fn npm_rules_in(rules: usize, server: &str, clients: &[&str], raw: bool) -> (String, String) {
    let mut sets = String::new();
    let _ = writeln!(sets, "create azure-npm-app-server hash:ip family inet");
    let _ = writeln!(sets, "add azure-npm-app-server {server}");
    let _ = writeln!(sets, "create azure-npm-app-client hash:ip family inet");
    for c in clients {
        let _ = writeln!(sets, "add azure-npm-app-client {c}");
    }
    let mut ipt = String::from(if raw { "*raw\n" } else { "*filter\n" });
    ipt.push_str(":AZURE-NPM - [0:0]\n:AZURE-NPM-INGRESS - [0:0]\n:AZURE-NPM-ACCEPT - [0:0]\n");
    for i in 0..rules {
        let _ = writeln!(ipt, ":AZURE-NPM-INGRESS-{i} - [0:0]");
    }
    if raw {
        ipt.push_str("-A PREROUTING -p tcp --syn -j AZURE-NPM\n");
    } else {
        ipt.push_str("-A FORWARD -j AZURE-NPM\n");
        ipt.push_str("-A AZURE-NPM -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    }
    ipt.push_str("-A AZURE-NPM -j AZURE-NPM-INGRESS\n");
    for i in 0..rules {
        // NPM jumps to a policy's chain for the pods it selects.
        let _ = writeln!(
            ipt,
            "-A AZURE-NPM-INGRESS -m set --match-set azure-npm-app-server dst -j AZURE-NPM-INGRESS-{i}"
        );
        let src = if i + 1 == rules {
            "azure-npm-app-client".to_string()
        } else {
            let set = format!("azure-npm-ipblock-{i}");
            let _ = writeln!(sets, "create {set} hash:net family inet");
            let _ = writeln!(sets, "add {set} {}", decoy(i));
            set
        };
        // One rule per protocol and port, as NPM writes them.
        for proto in ["tcp", "udp"] {
            let _ = writeln!(
                ipt,
                "-A AZURE-NPM-INGRESS-{i} -p {proto} --dport {PORT} -m set --match-set {src} src -j MARK --set-xmark 0x2000/0xffffffff"
            );
        }
    }
    ipt.push_str("-A AZURE-NPM-INGRESS -m mark --mark 0x2000 -j AZURE-NPM-ACCEPT\n");
    ipt.push_str("-A AZURE-NPM-INGRESS -m set --match-set azure-npm-app-server dst -j DROP\n");
    ipt.push_str("-A AZURE-NPM-ACCEPT -j MARK --set-xmark 0x0/0xffffffff\n");
    ipt.push_str("-A AZURE-NPM-ACCEPT -j ACCEPT\nCOMMIT\n");
    (sets, ipt)
}

/// kube-network-policies' nftables shape, the verdict in the kernel.
fn nft_rules(rules: usize, server: &str, clients: &[&str]) -> String {
    let mut t = String::from("table inet bench-netpol {\n");
    let _ = writeln!(
        t,
        "  set podips-app-server {{ type ipv4_addr; elements = {{ {server} }} }}"
    );
    let _ = writeln!(
        t,
        "  set podips-app-client {{ type ipv4_addr; elements = {{ {} }} }}",
        clients.join(", ")
    );
    for i in 0..rules.saturating_sub(1) {
        let _ = writeln!(
            t,
            "  set ipblock-{i} {{ type ipv4_addr; flags interval; elements = {{ {} }} }}",
            decoy(i)
        );
    }
    t.push_str("  chain forward {\n    type filter hook forward priority filter; policy accept;\n");
    t.push_str("    ct state established,related accept\n");
    t.push_str("    ip daddr @podips-app-server jump ingress-app-server\n  }\n");
    t.push_str("  chain ingress-app-server {\n");
    for i in 0..rules {
        let src = if i + 1 == rules {
            "@podips-app-client".to_string()
        } else {
            format!("@ipblock-{i}")
        };
        let _ = writeln!(
            t,
            "    ip saddr {src} meta l4proto {{ tcp, udp }} th dport {PORT} accept"
        );
    }
    t.push_str("    drop\n  }\n}\n");
    t
}

fn restore(ns: &str, cmd: &[&str], input: &str) {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(cmd);
    let mut child = std::process::Command::new(full[0])
        .args(&full[1..])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (cargo xtask setup installs it)"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{cmd:?} in {ns} failed");
}

/// A server that answers each connection's 64-byte request with 64 bytes and closes first
/// (its side keeps the TIME_WAIT, not the client's ports).
fn serve(ns: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let l = in_netns(ns, move || TcpListener::bind(("0.0.0.0", PORT)).unwrap()).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        // Blocking accept: `stop` is seen at the next connection (see `stop_server`).
        while let Ok((mut s, _)) = l.accept() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            s.set_nodelay(true).unwrap();
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(&buf);
            }
        }
    })
}

/// Connections per second and each connection's latency (µs), from one thread on CPU 0.
fn connect_loop(ns: &str, dst: SocketAddr, secs: f64) -> (f64, Vec<f64>) {
    spawn_in_netns(ns, move || {
        observer_tests::bench::pin_thread(0, 0);
        let mut lat = Vec::new();
        let (req, mut resp) = ([7u8; 64], [0u8; 64]);
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < secs {
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("connecting to {dst}: {e}"));
            s.set_nodelay(true).unwrap();
            s.write_all(&req).unwrap();
            s.read_exact(&mut resp).unwrap();
            // The server closed first: wait for its FIN, then close.
            let _ = s.read(&mut resp);
            drop(s);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        (lat.len() as f64 / t0.elapsed().as_secs_f64(), lat)
    })
    .join()
    .unwrap()
    .unwrap()
}

/// Waits until a TCP socket listens on `port` in `ns`. Not by connecting: `iperf3 -s -1` would
/// take the probe for its one client and the test client would then wait for ever.
fn wait_listening(ns: &str, port: u16) {
    let filter = format!("sport = :{port}");
    observer_tests::cluster::eventually(
        &format!("a listener on {ns} port {port}"),
        Duration::from_secs(10),
        || Ok(!ns_run(ns, &["ss", "-Hltn", &filter])?.trim().is_empty()),
    );
}

/// One iperf3 test from `client_ns` to the server pod's port (the policies allow it): TCP with
/// 1,460-byte segments (1,500-byte packets), or UDP with 64-byte payloads at full speed.
/// Returns bits per second received (TCP) or datagrams per second received (UDP).
fn iperf(server_ns: &str, client_ns: &str, server_ip: &str, udp: bool, secs: f64) -> f64 {
    let port = PORT.to_string();
    let mut server = std::process::Command::new("ip")
        .args([
            "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", &port,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 (cargo xtask setup installs it)");
    wait_listening(server_ns, PORT);
    let t = format!("{secs}");
    let mut args = vec![
        "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-p", &port, "-t", &t, "-J",
    ];
    if udp {
        args.extend(["-u", "-b", "0", "-l", "64"]);
    } else {
        args.extend(["-M", "1460"]);
    }
    let out = std::process::Command::new("ip")
        .args(&args)
        .output()
        .unwrap();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    if udp {
        let sum = &v["end"]["sum"];
        let got = sum["packets"].as_f64().unwrap() - sum["lost_packets"].as_f64().unwrap();
        got / sum["seconds"].as_f64().unwrap()
    } else {
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap()
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Pids of the threaded NAPI kernel threads of interfaces named `eth0` (any namespace).
fn napi_threads() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("napi/eth0-"))
        })
        .collect()
}

/// Received packets of `dev` in `ns`.
fn rx_packets(ns: &str, dev: &str) -> u64 {
    let out = ns_run(ns, &["ip", "-s", "-j", "link", "show", "dev", dev]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
}

/// Node-1's uplink receive work on a kernel thread of its own, pinned to CPU 1, so that
/// thread's CPU time is what the node spends on the flood (other work on the machine does not
/// count). A veth hands packets to a NAPI instance only with GRO on (and a sender without TSO);
/// `threaded` gives that instance its thread. Returns the thread's id.
fn isolate_uplink_rx(bed: &TestBed) -> u32 {
    ns_run(&bed.node_ns, &["ethtool", "-K", "eth0", "gro", "on"]).unwrap();
    ns_run(&bed.router_ns, &["ethtool", "-K", "vn-node1", "tso", "off"]).unwrap();
    let before = napi_threads();
    let threaded = "echo 1 > /sys/class/net/eth0/threaded";
    ns_run(&bed.node_ns, &["sh", "-c", threaded]).unwrap();
    let new: Vec<u32> = napi_threads()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "one NAPI thread for node-1's eth0: {new:?}");
    observer_tests::bench::pin_thread(new[0], 1);
    new[0]
}

/// The denied flood: SYNs to the server's port from every address of node-2's pod range but
/// the allowed client's, each from a new source port, put on node-1's uplink by the router.
/// Per round: packets node-1 received per CPU-second of its receive thread `rx_thread`, per
/// wall-clock second, the share that reached the server, and the daemon's CPU per
/// million packets (its records of the drops; pinned to CPU 0 with the sender).
fn flood_measure(
    bed: &TestBed,
    rx_thread: u32,
    daemon: Option<u32>,
    raw_variant: bool,
    rounds: usize,
    secs: f64,
) -> serde_json::Value {
    if let Some(pid) = daemon {
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let tid: u32 = t.unwrap().file_name().to_str().unwrap().parse().unwrap();
            observer_tests::bench::pin_thread(tid, 0);
        }
    }
    let server = bed.pod("server");
    let allowed = bed.remote_pod("rclient").ip4;
    let net: std::net::Ipv4Addr = bed.pod_cidrs(2)[0]
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let sources = (2..255u8)
        .map(|h| {
            let o = net.octets();
            std::net::Ipv4Addr::new(o[0], o[1], o[2], h)
        })
        .filter(|a| std::net::IpAddr::V4(*a) != allowed)
        .collect();
    let dst = match server.ip4 {
        std::net::IpAddr::V4(a) => std::net::SocketAddrV4::new(a, PORT),
        other => panic!("server address {other} is not IPv4"),
    };
    let spec = observer_tests::flood::onto_node1(bed, sources, dst, 0).unwrap();
    let run = |secs: f64| {
        let stop = Arc::new(AtomicBool::new(false));
        let (rx0, del0, busy0) = (
            rx_packets(&bed.node_ns, "eth0"),
            rx_packets(&server.netns, "eth0"),
            observer_tests::bench::cpu_ticks(rx_thread),
        );
        let d0 = daemon.map(observer_tests::bench::cpu_ticks);
        let t0 = Instant::now();
        let sender = observer_tests::flood::start(spec.clone(), stop.clone());
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let sent = sender.join().unwrap().unwrap().unwrap();
        // What is still queued is received in the next few ms.
        std::thread::sleep(Duration::from_millis(50));
        let wall = t0.elapsed().as_secs_f64();
        let rx = rx_packets(&bed.node_ns, "eth0") - rx0;
        let delivered = rx_packets(&server.netns, "eth0") - del0;
        let busy = (observer_tests::bench::cpu_ticks(rx_thread) - busy0) as f64 / 100.0;
        let daemon_s = daemon
            .zip(d0)
            .map(|(p, d0)| (observer_tests::bench::cpu_ticks(p) - d0) as f64 / 100.0);
        (sent, rx, delivered, busy, wall, daemon_s)
    };
    run(0.5);
    let (mut per_core, mut pps, mut delivered, mut daemon_per_m) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (sent, rx, del, busy, wall, daemon_s) = run(secs);
        assert!(
            rx > 0 && busy > 0.0,
            "flood: sent {sent}, node-1 received {rx}"
        );
        per_core.push(rx as f64 / busy);
        pps.push(rx as f64 / wall);
        delivered.push(del as f64 / rx as f64);
        if let Some(d) = daemon_s {
            daemon_per_m.push(d / rx as f64 * 1e6);
        }
    }
    let variant = if raw_variant { "raw" } else { "as designed" };
    json!({
        "flood_variant": variant,
        "flood_per_core_s": median(&mut per_core.clone()), "flood_per_core_runs": per_core,
        "flood_per_s": median(&mut pps.clone()), "flood_per_s_runs": pps,
        "flood_delivered_share": median(&mut delivered.clone()),
        "flood_daemon_cpu_s_per_million": (!daemon_per_m.is_empty())
            .then(|| median(&mut daemon_per_m.clone())),
    })
}

/// The NFQUEUE verdict program of the `nft-nfqueue` enforcer, stopped when dropped.
struct VerdictProgram {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<anyhow::Result<u64>>>>,
}

impl Drop for VerdictProgram {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// kube-network-policies as designed: established and related accepted by conntrack, the
/// first packet of every other connection to the selected pod queued to a userspace verdict
/// program that walks the policy rules (`observer_tests::nfqueue`). iptables-nft's NFQUEUE
/// target stands in for nft's `queue` statement, which this kernel lacks (`CONFIG_NFT_QUEUE`);
/// both hand the packet to the same nfnetlink_queue. No bypass: nothing passes unjudged.
fn nfqueue_rules(server: &str) -> String {
    format!(
        "*filter\n:KNP-FORWARD - [0:0]\n-A FORWARD -j KNP-FORWARD\n\
         -A KNP-FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n\
         -A KNP-FORWARD -d {server}/32 -j NFQUEUE --queue-num 100\nCOMMIT\n"
    )
}

fn verdict_rules(rules: usize, clients: &[&str]) -> Vec<observer_tests::nfqueue::Rule> {
    (0..rules)
        .map(|i| {
            let sources = if i + 1 == rules {
                clients.iter().map(|c| c.parse().unwrap()).collect()
            } else {
                let d = decoy(i);
                [d.trim_end_matches("/32").parse().unwrap()].into()
            };
            observer_tests::nfqueue::Rule {
                sources,
                port: PORT,
            }
        })
        .collect()
}

/// A virtual node with the bench's pods and its enforcer.
struct Node {
    enforcer: &'static str,
    // Stopped before the bed goes (fields drop in order).
    daemon: Option<observer_tests::Daemon>,
    _verdict: Option<VerdictProgram>,
    bed: TestBed,
    /// The daemon's CPU cgroup, removed once the bed stopped the daemon.
    cgroup: Option<observer_tests::bench::CpuCgroup>,
}

impl Node {
    fn server_addr(&self) -> SocketAddr {
        (self.bed.pod("server").ip4, PORT).into()
    }
}

/// One virtual node with the bench's pods, enforced by `enforcer` at `rules` rules.
fn node(enforcer: &'static str, rules: usize) -> Node {
    let tag = ENFORCERS.iter().position(|e| *e == enforcer).unwrap();
    let mut bed = TestBed::overlay(&format!("cmp{tag}")).unwrap();
    let spec = |name, labels| PodSpec {
        namespace: "bench",
        name,
        labels,
        ports: &[],
    };
    bed.add_pod(PodSpec {
        ports: &[("http", PORT, "TCP")],
        ..spec("server", &[("app", "server")])
    })
    .unwrap();
    bed.add_pod(spec("client", &[("app", "client")])).unwrap();
    bed.add_remote_pod(spec("rclient", &[("app", "client")]))
        .unwrap();
    bed.add_pod(spec("other", &[("app", "other")])).unwrap();
    // Connection churn from one client: every port, and TIME_WAIT ports reused.
    for ns in [&bed.pod("client").netns, &bed.remote_pod("rclient").netns] {
        ns_run(
            ns,
            &["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"],
        )
        .unwrap();
        ns_run(ns, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]).unwrap();
    }
    let server = bed.pod("server").ip4.to_string();
    let clients = [
        bed.pod("client").ip4.to_string(),
        bed.remote_pod("rclient").ip4.to_string(),
    ];
    let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
    let node_ns = bed.node_ns.clone();
    let mut verdict = None;
    let mut cgroup = None;
    let daemon = match enforcer {
        e if unenforced(e) => None,
        "observer" => {
            std::fs::write(
                bed.cluster_dir().join("policies.yaml"),
                policies_yaml(rules),
            )
            .unwrap();
            // BENCH_OBSERVER_ARGS: daemon flags to find where the cost is (`--no-snat`, ...).
            let extra = std::env::var("BENCH_OBSERVER_ARGS").unwrap_or_default();
            let extra: Vec<&str> = extra.split_whitespace().collect();
            let daemon = bed.start_daemon(Path::new(OBSERVER), &extra).unwrap();
            let request = daemon_request();
            if request > 0 {
                let name = format!("observer-bench-{}", daemon.pid);
                cgroup = observer_tests::bench::CpuCgroup::place(&name, daemon.pid, request);
                if cgroup.is_none() {
                    eprintln!("note: no CPU cgroup controller: the daemon runs beside the pods as their equal");
                }
            }
            Some(daemon)
        }
        "npm-iptables" => {
            let (sets, ipt) = npm_rules(rules, &server, &clients);
            restore(&node_ns, &["ipset", "restore"], &sets);
            restore(&node_ns, &["iptables-restore", "--noflush"], &ipt);
            None
        }
        "nft" => {
            observer_tests::nft(&node_ns, &nft_rules(rules, &server, &clients)).unwrap();
            None
        }
        "nft-nfqueue" => {
            let stop = Arc::new(AtomicBool::new(false));
            let thread = observer_tests::nfqueue::start(
                &node_ns,
                100,
                verdict_rules(rules, &clients),
                stop.clone(),
            );
            verdict = Some(VerdictProgram {
                stop,
                thread: Some(thread),
            });
            // `start` returns once the queue is bound: the rule that queues to it comes after.
            restore(
                &node_ns,
                &["iptables-restore", "--noflush"],
                &nfqueue_rules(&server),
            );
            None
        }
        other => panic!("unknown enforcer {other}"),
    };
    Node {
        enforcer,
        daemon,
        cgroup,
        _verdict: verdict,
        bed,
    }
}

/// The daemon pod's CPU request the bench places it with, in millicores (0: no cgroup).
fn daemon_request() -> u64 {
    observer_tests::bench::arg("BENCH_DAEMON_CPU_M", 100)
}

/// The two client placements of a bed: `local` (node-1) and `remote` (node-2).
fn placements(bed: &TestBed) -> [(&'static str, String); 2] {
    [
        ("local", bed.pod("client").netns.clone()),
        ("remote", bed.remote_pod("rclient").netns.clone()),
    ]
}

/// The nodes' order in round `round`: rotated by one each round, so that whatever the first
/// (or last) place of a round brings falls on every enforcer in turn, not always on `none`.
fn in_turn(round: usize, nodes: usize) -> impl Iterator<Item = usize> {
    (0..nodes).map(move |k| (k + round) % nodes)
}

/// New connections through every node of one rule count, a row per enforcer and placement.
/// Round by round, each node in turn: whatever the machine does meanwhile (the namespaces of
/// earlier beds torn down in the background, other load) falls on every enforcer alike, and
/// the ratios to `none` compare rounds taken side by side.
fn connections(nodes: &[Node], rules: u64, settings: &Settings) -> Vec<serde_json::Value> {
    let mut servers = Vec::new();
    for n in nodes {
        let dst = n.server_addr();
        let stop = Arc::new(AtomicBool::new(false));
        servers.push((serve(&n.bed.pod("server").netns, stop.clone()), stop));
        // Enforced, not just loaded: a pod no rule allows does not get through.
        let denied = !observer_tests::tcp_connects(
            &n.bed.pod("other").netns,
            dst,
            Duration::from_millis(300),
        );
        assert_eq!(
            denied,
            !unenforced(n.enforcer),
            "{} at {rules} rules",
            n.enforcer
        );
        // Warm up: the allowed clients get through.
        for (_, ns) in placements(&n.bed) {
            connect_loop(&ns, dst, 0.2);
        }
    }
    // Per node and placement: rates, p50s, p99s.
    let mut runs = vec![[(); 2].map(|_| (Vec::new(), Vec::new(), Vec::new())); nodes.len()];
    // The daemon's CPU over the rounds (its start and warm-up left out).
    let ticks = |n: &Node| {
        n.daemon
            .as_ref()
            .map(|d| observer_tests::bench::cpu_ticks(d.pid))
    };
    let ticks0: Vec<_> = nodes.iter().map(ticks).collect();
    for round in 0..settings.rounds {
        for pi in 0..2 {
            for i in in_turn(round, nodes.len()) {
                let (n, run) = (&nodes[i], &mut runs[i]);
                let ns = &placements(&n.bed)[pi].1;
                let (rate, mut lat) = connect_loop(ns, n.server_addr(), settings.secs);
                run[pi].0.push(rate);
                run[pi].1.push(percentile(&mut lat, 0.5));
                run[pi].2.push(percentile(&mut lat, 0.99));
            }
        }
    }
    let ticks1: Vec<_> = nodes.iter().map(ticks).collect();
    for (n, (server, stop)) in nodes.iter().zip(servers) {
        // Woken by one more connection from an allowed client.
        stop.store(true, Ordering::Relaxed);
        observer_tests::tcp_connects(
            &placements(&n.bed)[0].1,
            n.server_addr(),
            Duration::from_secs(1),
        );
        server.join().unwrap();
    }
    let mut rows = Vec::new();
    for (i, (n, run)) in nodes.iter().zip(runs).enumerate() {
        // Daemon CPU µs per connection of both placements' rounds.
        let conns: f64 = run.iter().flat_map(|r| &r.0).sum::<f64>() * settings.secs;
        let daemon_us = ticks0[i]
            .zip(ticks1[i])
            .map(|(a, b)| (b - a) as f64 * 10_000.0 / conns);
        for ((placement, _), (rates, p50, p99)) in placements(&n.bed).into_iter().zip(run) {
            rows.push(json!({
                "enforcer": n.enforcer, "rules": rules, "placement": placement,
                "conn_per_s": median(&mut rates.clone()), "conn_per_s_runs": rates,
                "p50_us": median(&mut p50.clone()), "p99_us": median(&mut p99.clone()),
                "p50_runs": p50, "p99_runs": p99,
                // The request the daemon was placed with; null: beside the pods as their equal.
                "daemon_cpu_request_m": n.cgroup.as_ref().map(|_| daemon_request()),
                "daemon_cpu_us_per_conn": daemon_us,
            }));
        }
    }
    rows
}

/// Established-flow throughput through every node of one rule count, into each node's
/// `rows` (local, remote). Interleaved as the connection rounds are: round by round, each
/// placement, each node in turn, so the ratios to `none` compare measures taken side by side.
fn throughput(nodes: &[Node], settings: &Settings, rows: &mut [serde_json::Value]) {
    // Per node and placement: TCP Gbit/s, UDP datagrams/s.
    let mut runs = vec![[(); 2].map(|_| (Vec::new(), Vec::new())); nodes.len()];
    for round in 0..settings.rounds {
        for pi in 0..2 {
            for i in in_turn(round, nodes.len()) {
                let (n, run) = (&nodes[i], &mut runs[i]);
                let server = n.bed.pod("server");
                let (ns, ip) = (&placements(&n.bed)[pi].1, server.ip4.to_string());
                run[pi]
                    .0
                    .push(iperf(&server.netns, ns, &ip, false, settings.secs) / 1e9);
                run[pi]
                    .1
                    .push(iperf(&server.netns, ns, &ip, true, settings.secs));
            }
        }
    }
    for (run, rows) in runs.into_iter().zip(rows.chunks_mut(2)) {
        for ((tcp, udp), row) in run.into_iter().zip(rows) {
            row["tcp_gbit_per_s"] = json!(median(&mut tcp.clone()));
            row["udp64_pkt_per_s"] = json!(median(&mut udp.clone()));
            row["tcp_runs"] = json!(tcp);
            row["udp64_runs"] = json!(udp);
        }
    }
}

/// The denied flood against one enforcer (it loads the whole machine): its rows.
fn flood(
    bed: &TestBed,
    enforcer: &str,
    daemon: Option<u32>,
    rules: u64,
    settings: &Settings,
) -> Vec<serde_json::Value> {
    let (rounds, secs) = (settings.rounds, settings.secs);
    // Without an enforcer nothing is dropped: the pod answers each SYN, so there is no drop
    // rate to compare. The queued variant's drop rate would be its queue's overflow (the
    // kernel drops what the program has no room for), not a judgement: not measured.
    if unenforced(enforcer) || enforcer == "nft-nfqueue" {
        return Vec::new();
    }
    let mut variants = vec![(enforcer.to_string(), false)];
    if enforcer == "npm-iptables" {
        variants.push(("npm-iptables-raw".to_string(), true));
    }
    let server_ip = bed.pod("server").ip4;
    let rx_thread = isolate_uplink_rx(bed);
    let mut flood_rows = Vec::new();
    for (name, raw) in variants {
        if raw {
            // The same chains, moved before conntrack.
            ns_run(
                &bed.node_ns,
                &["iptables", "-D", "FORWARD", "-j", "AZURE-NPM"],
            )
            .unwrap();
            let clients = [
                bed.pod("client").ip4.to_string(),
                bed.remote_pod("rclient").ip4.to_string(),
            ];
            let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
            let (_, ipt) = npm_rules_in(rules as usize, &server_ip.to_string(), &clients, true);
            restore(&bed.node_ns, &["iptables-restore", "--noflush"], &ipt);
        }
        let mut row = flood_measure(bed, rx_thread, daemon, raw, rounds, secs);
        row["enforcer"] = json!(name);
        row["rules"] = json!(rules);
        row["placement"] = json!("flood");
        assert!(
            row["flood_delivered_share"].as_f64().unwrap() < 0.01,
            "{name} let the denied flood through: {row}"
        );
        flood_rows.push(row);
    }
    flood_rows
}

/// The numbers of a JSON array (none when it is not one).
fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .map(|v| v.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default()
}

/// `a[i] / b[i]` round by round (the rounds of `a` and `b` were taken side by side).
fn paired_ratios(a: &serde_json::Value, b: &serde_json::Value) -> Vec<f64> {
    floats(a)
        .iter()
        .zip(floats(b))
        .map(|(x, y)| x / y)
        .collect()
}

/// The measures compared round by round: (name, runs key; for latency lower is better).
const COMPARED: [(&str, &str); 5] = [
    ("conn", "conn_per_s_runs"),
    ("p50", "p50_runs"),
    ("p99", "p99_runs"),
    ("tcp", "tcp_runs"),
    ("udp64", "udp64_runs"),
];

/// Adds to each row of `rules` its ratios to `none` (`vs_none`) and, to observer's rows, to
/// each peer (`vs_peers`): per measure the median of the round-by-round ratios and the rounds'.
fn add_ratios(table: &mut [serde_json::Value], rules: u64) {
    let rows: Vec<serde_json::Value> = table
        .iter()
        .filter(|r| r["rules"] == rules && r["placement"] != "flood")
        .cloned()
        .collect();
    let against = |r: &serde_json::Value, other: &serde_json::Value| {
        let mut m = serde_json::Map::new();
        for (name, key) in COMPARED {
            let runs = paired_ratios(&r[key], &other[key]);
            if !runs.is_empty() {
                m.insert(
                    name.into(),
                    json!({ "median": median(&mut runs.clone()), "runs": runs }),
                );
            }
        }
        serde_json::Value::Object(m)
    };
    for r in table
        .iter_mut()
        .filter(|r| r["rules"] == rules && r["placement"] != "flood")
    {
        let placement = r["placement"].clone();
        let same = |e: &str| {
            rows.iter()
                .find(|b| b["enforcer"] == e && b["placement"] == placement)
        };
        if let Some(base) = same("none") {
            r["vs_none"] = against(r, base);
        }
        if r["enforcer"] == "observer" {
            let mut peers = serde_json::Map::new();
            for peer in ENFORCERS
                .iter()
                .filter(|e| !unenforced(e) && **e != "observer")
            {
                if let Some(p) = same(peer) {
                    peers.insert(peer.to_string(), against(r, p));
                }
            }
            r["vs_peers"] = serde_json::Value::Object(peers);
        }
    }
}

/// "median (lowest-highest)" of a ratio `add_ratios` recorded, or "-".
fn ratio_cell(ratios: &serde_json::Value) -> String {
    let runs = floats(&ratios["runs"]);
    match ratios["median"].as_f64() {
        Some(m) => {
            let lo = runs.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = runs.iter().cloned().fold(0.0, f64::max);
            if format!("{lo:.2}") == format!("{hi:.2}") {
                format!("{m:.2}")
            } else {
                format!("{m:.2} ({lo:.2}-{hi:.2})")
            }
        }
        None => "-".to_string(),
    }
}

struct Settings {
    rounds: usize,
    secs: f64,
    throughput: bool,
    flood: bool,
}

#[test]
#[ignore = "benchmark: cargo xtask bench compare"]
fn enforcers_side_by_side() {
    let rule_counts = env_list("BENCH_RULES", &[1, 100, 1000, 10000]);
    let settings = Settings {
        rounds: observer_tests::bench::arg("BENCH_ROUNDS", 3) as usize,
        secs: observer_tests::bench::arg("BENCH_SECONDS", 2) as f64,
        throughput: observer_tests::bench::arg("BENCH_THROUGHPUT", 1) == 1,
        flood: observer_tests::bench::arg("BENCH_FLOOD", 1) == 1,
    };
    let only: Vec<String> = std::env::var("BENCH_ENFORCERS")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_else(|_| ENFORCERS.iter().map(|s| s.to_string()).collect());
    let mut table = Vec::new();
    for &rules in &rule_counts {
        // Every enforcer's node at once, for connection rounds taken side by side.
        let nodes: Vec<Node> = ENFORCERS
            .iter()
            .filter(|e| only.iter().any(|o| o == *e))
            .map(|e| node(e, rules as usize))
            .collect();
        let mut rows = connections(&nodes, rules, &settings);
        if settings.throughput {
            throughput(&nodes, &settings, &mut rows);
        }
        table.extend(rows);
        if settings.flood {
            for n in &nodes {
                let pid = n.daemon.as_ref().map(|d| d.pid);
                table.extend(flood(&n.bed, n.enforcer, pid, rules, &settings));
            }
        }
        add_ratios(&mut table, rules);
        for row in table.iter().filter(|r| r["rules"] == rules) {
            println!("{row}");
        }
    }
    // Ratios to the baseline of the same rule count and placement.
    match table
        .iter()
        .find_map(|r| r["daemon_cpu_request_m"].as_u64())
    {
        Some(m) => {
            println!("\nobserver's daemon: in a CPU cgroup with the weight of a {m}m request")
        }
        None => println!("\nobserver's daemon: beside the pods' threads, as their equal"),
    }
    // Ratios: the median of the round-by-round ratios (the rounds were taken side by side),
    // the lowest and highest in brackets.
    println!("| rules | placement | enforcer | conn/s | vs none | p50 µs | p99 µs | p99 vs none | daemon CPU µs/conn | TCP Gbit/s | vs none | UDP 64 B pkt/s | vs none |");
    println!("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in table.iter().filter(|r| r["placement"] != "flood") {
        let opt = |k: &str, digits: usize| {
            r[k].as_f64()
                .map_or("-".to_string(), |x| format!("{x:.digits$}"))
        };
        let vs = |m: &str| ratio_cell(&r["vs_none"][m]);
        println!(
            "| {} | {} | {} | {:.0} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
            r["rules"],
            r["placement"].as_str().unwrap(),
            r["enforcer"].as_str().unwrap(),
            r["conn_per_s"].as_f64().unwrap(),
            vs("conn"),
            r["p50_us"].as_f64().unwrap(),
            r["p99_us"].as_f64().unwrap(),
            vs("p99"),
            opt("daemon_cpu_us_per_conn", 1),
            opt("tcp_gbit_per_s", 2),
            vs("tcp"),
            opt("udp64_pkt_per_s", 0),
            vs("udp64"),
        );
    }
    println!("\nobserver against each peer (observer / peer; above 1 is observer ahead, except latency):");
    println!("| rules | placement | peer | conn/s | p50 | p99 | TCP | UDP 64 B |");
    println!("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for r in table
        .iter()
        .filter(|r| r["enforcer"] == "observer" && r["placement"] != "flood")
    {
        for (peer, v) in r["vs_peers"].as_object().into_iter().flatten() {
            println!(
                "| {} | {} | {peer} | {} | {} | {} | {} | {} |",
                r["rules"],
                r["placement"].as_str().unwrap(),
                ratio_cell(&v["conn"]),
                ratio_cell(&v["p50"]),
                ratio_cell(&v["p99"]),
                ratio_cell(&v["tcp"]),
                ratio_cell(&v["udp64"]),
            );
        }
    }
    println!("\n| rules | enforcer | denied flood: packets per CPU-second | per second | reached the pod | daemon CPU s per 1M |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for r in table.iter().filter(|r| r["placement"] == "flood") {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.4} | {} |",
            r["rules"],
            r["enforcer"].as_str().unwrap(),
            r["flood_per_core_s"].as_f64().unwrap(),
            r["flood_per_s"].as_f64().unwrap(),
            r["flood_delivered_share"].as_f64().unwrap(),
            r["flood_daemon_cpu_s_per_million"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.2}")),
        );
    }
}
