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
//! Enforcers (a fresh virtual node each, torn down after):
//! - `none`: the baseline.
//! - `observer`: the daemon with the policies as YAML (`--source dir:`).
//! - `npm-iptables`: the shape Azure NPM (iptables mode) writes: an ipset per selector and per
//!   ipBlock (`hash:ip`, `hash:net`), conntrack ESTABLISHED/RELATED accepted first, a chain
//!   per policy jumped to for the pods it selects, which marks what it allows; marked traffic
//!   accepted, the rest to a selected pod dropped.
//! - `nft`: the nftables shape of kube-network-policies / kindnet with its verdict taken in
//!   the kernel: a set of pod IPs per selector and per ipBlock, established and related
//!   accepted by conntrack, the first packet of a connection to an isolated pod checked
//!   against each rule in turn. (The NFQUEUE variant, the userspace verdict as designed, is not
//!   measured yet: this kernel lacks `nft queue`, `CONFIG_NFT_QUEUE`; the xtables NFQUEUE
//!   target through iptables-nft is available.)
//!
//! Measures, per enforcer, rule count and placement (`local`: client and server on node-1;
//! `remote`: from node-2): new TCP connections per second from one client thread pinned to one
//! CPU (connect, 64-byte request, 64-byte response, close), and the latency of each of those
//! connections, p50 and p99; then (BENCH_THROUGHPUT=1, the default) established-flow
//! throughput with iperf3: TCP with 1,500-byte packets (Gbit/s received) and UDP with 64-byte
//! payloads at full speed (datagrams per second received). Median over BENCH_ROUNDS rounds of
//! BENCH_SECONDS each. BENCH_ENFORCERS=none,observer limits the enforcers;
//! BENCH_OBSERVER_ARGS adds daemon flags (to see what a feature costs).
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
const ENFORCERS: [&str; 4] = ["none", "observer", "npm-iptables", "nft"];

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
    let mut sets = String::new();
    let _ = writeln!(sets, "create azure-npm-app-server hash:ip family inet");
    let _ = writeln!(sets, "add azure-npm-app-server {server}");
    let _ = writeln!(sets, "create azure-npm-app-client hash:ip family inet");
    for c in clients {
        let _ = writeln!(sets, "add azure-npm-app-client {c}");
    }
    let mut ipt = String::from(
        "*filter\n:AZURE-NPM - [0:0]\n:AZURE-NPM-INGRESS - [0:0]\n:AZURE-NPM-ACCEPT - [0:0]\n",
    );
    for i in 0..rules {
        let _ = writeln!(ipt, ":AZURE-NPM-INGRESS-{i} - [0:0]");
    }
    ipt.push_str("-A FORWARD -j AZURE-NPM\n");
    ipt.push_str("-A AZURE-NPM -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
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
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
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
    std::thread::sleep(Duration::from_millis(200));
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

/// One virtual node with the bench's pods, enforced by `enforcer` at `rules` rules.
fn node(enforcer: &str, rules: usize) -> (TestBed, Option<observer_tests::Daemon>) {
    let mut bed = TestBed::overlay(&format!("cmp{}", &enforcer[..2])).unwrap();
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
    let daemon = match enforcer {
        "none" => None,
        "observer" => {
            std::fs::write(
                bed.cluster_dir().join("policies.yaml"),
                policies_yaml(rules),
            )
            .unwrap();
            // BENCH_OBSERVER_ARGS: daemon flags to find where the cost is (`--no-snat`, ...).
            let extra = std::env::var("BENCH_OBSERVER_ARGS").unwrap_or_default();
            let extra: Vec<&str> = extra.split_whitespace().collect();
            Some(bed.start_daemon(Path::new(OBSERVER), &extra).unwrap())
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
        other => panic!("unknown enforcer {other}"),
    };
    (bed, daemon)
}

/// Every measure of one enforcer at one rule count, a row per placement.
fn measure(
    bed: &TestBed,
    enforcer: &str,
    rules: u64,
    rounds: usize,
    secs: f64,
    throughput: bool,
) -> Vec<serde_json::Value> {
    let placements = [
        ("local", bed.pod("client").netns.clone()),
        ("remote", bed.remote_pod("rclient").netns.clone()),
    ];
    let (server_ns, server_ip) = (&bed.pod("server").netns, bed.pod("server").ip4);
    let dst: SocketAddr = (server_ip, PORT).into();
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(server_ns, stop.clone());
    // Enforced, not just loaded: a pod no rule allows does not get through.
    let denied =
        !observer_tests::tcp_connects(&bed.pod("other").netns, dst, Duration::from_millis(300));
    assert_eq!(denied, enforcer != "none", "{enforcer} at {rules} rules");
    let mut rows = Vec::new();
    for (placement, ns) in &placements {
        // Warm up: the allowed clients get through.
        connect_loop(ns, dst, 0.2);
        let (mut rates, mut p50, mut p99) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (rate, mut lat) = connect_loop(ns, dst, secs);
            rates.push(rate);
            p50.push(percentile(&mut lat, 0.5));
            p99.push(percentile(&mut lat, 0.99));
        }
        rows.push(json!({
            "enforcer": enforcer, "rules": rules, "placement": placement,
            "conn_per_s": median(&mut rates.clone()), "conn_per_s_runs": rates,
            "p50_us": median(&mut p50.clone()), "p99_us": median(&mut p99.clone()),
            "p50_runs": p50, "p99_runs": p99,
        }));
    }
    // Woken by one more connection from an allowed client; iperf3 takes the port next.
    stop.store(true, Ordering::Relaxed);
    observer_tests::tcp_connects(&placements[0].1, dst, Duration::from_secs(1));
    server.join().unwrap();
    if throughput {
        for ((_, ns), row) in placements.iter().zip(&mut rows) {
            let ip = server_ip.to_string();
            let (mut tcp, mut udp) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                tcp.push(iperf(server_ns, ns, &ip, false, secs) / 1e9);
                udp.push(iperf(server_ns, ns, &ip, true, secs));
            }
            row["tcp_gbit_per_s"] = json!(median(&mut tcp.clone()));
            row["udp64_pkt_per_s"] = json!(median(&mut udp.clone()));
            row["tcp_runs"] = json!(tcp);
            row["udp64_runs"] = json!(udp);
        }
    }
    rows
}

#[test]
#[ignore = "benchmark: cargo xtask bench compare"]
fn enforcers_side_by_side() {
    let rule_counts = env_list("BENCH_RULES", &[1, 100, 1000, 10000]);
    let rounds = observer_tests::bench::arg("BENCH_ROUNDS", 3) as usize;
    let secs = observer_tests::bench::arg("BENCH_SECONDS", 2) as f64;
    let throughput = observer_tests::bench::arg("BENCH_THROUGHPUT", 1) == 1;
    let only: Vec<String> = std::env::var("BENCH_ENFORCERS")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_else(|_| ENFORCERS.iter().map(|s| s.to_string()).collect());
    let mut table = Vec::new();
    for &rules in &rule_counts {
        for enforcer in ENFORCERS.iter().filter(|e| only.iter().any(|o| o == *e)) {
            let (bed, _daemon) = node(enforcer, rules as usize);
            for row in measure(&bed, enforcer, rules, rounds, secs, throughput) {
                println!("{row}");
                table.push(row);
            }
        }
    }
    // Ratios to the baseline of the same rule count and placement.
    println!("\n| rules | placement | enforcer | conn/s | vs none | p50 µs | p99 µs | TCP Gbit/s | UDP 64 B pkt/s |");
    println!("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &table {
        let base = table.iter().find(|b| {
            b["enforcer"] == "none" && b["rules"] == r["rules"] && b["placement"] == r["placement"]
        });
        let ratio = base
            .map(|b| r["conn_per_s"].as_f64().unwrap() / b["conn_per_s"].as_f64().unwrap())
            .map_or("-".to_string(), |x| format!("{x:.2}"));
        let opt = |k: &str, digits: usize| {
            r[k].as_f64()
                .map_or("-".to_string(), |x| format!("{x:.digits$}"))
        };
        println!(
            "| {} | {} | {} | {:.0} | {} | {:.0} | {:.0} | {} | {} |",
            r["rules"],
            r["placement"].as_str().unwrap(),
            r["enforcer"].as_str().unwrap(),
            r["conn_per_s"].as_f64().unwrap(),
            ratio,
            r["p50_us"].as_f64().unwrap(),
            r["p99_us"].as_f64().unwrap(),
            opt("tcp_gbit_per_s", 2),
            opt("udp64_pkt_per_s", 0),
        );
    }
}
