//! `cargo xtask bench snat`: new NAT'd connections per second the daemon correlates, none lost.
//!
//! An overlay virtual node (MASQUERADE for pod traffic leaving the cluster) runs the real
//! daemon. A pod opens BENCH_CONNS new UDP connections to the external host (a new destination
//! port each: one kernel conntrack entry and one MASQUERADE translation each), paced at
//! BENCH_RATE per second. Result: connections whose record got its `snat` (expectation
//! `expected`) divided by the time until the last one was settled, against the rate the
//! kernel created them (the baseline, same run); lost = connections never settled; how each
//! was settled (seen leaving the stack, or looked up). Daemon CPU per 10,000 connections.
//!
//! Ignored by `cargo test`: run through xtask (release build, root).
use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use observer_tests::{
    bench::{arg, cpu_ticks, median, metric_sum as metric},
    nft, spawn_in_netns, TestBed, EXT_IP,
};
use serde_json::json;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// Sends one datagram per new connection from `sockets` fresh sockets, `conns` in all, at
/// `rate` per second; returns the sending time.
fn blast(ns: &str, conns: u64, rate: u64, first_port: u16) -> Duration {
    spawn_in_netns(ns, move || {
        let socks: Vec<UdpSocket> = (0..conns.div_ceil(40_000))
            .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
            .collect();
        let t0 = Instant::now();
        for i in 0..conns {
            let s = &socks[(i / 40_000) as usize];
            let port = first_port as u64 + i % 40_000;
            let dst: SocketAddr = format!("{EXT_IP}:{port}").parse().unwrap();
            s.send_to(b"x", dst).unwrap();
            // Paced in 1 ms steps.
            if i % (rate / 1000).max(1) == 0 {
                let due = Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(w) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(w);
                }
            }
        }
        t0.elapsed()
    })
    .join()
    .unwrap()
    .unwrap()
}

#[test]
#[ignore = "benchmark: cargo xtask bench snat"]
fn snat_correlation_rate() {
    let conns = arg("BENCH_CONNS", 60_000);
    let rate = arg("BENCH_RATE", 25_000);
    let rounds = arg("BENCH_ROUNDS", 3) as usize;

    let mut bed = TestBed::overlay("bs").unwrap();
    bed.add_app_pods("bench", &[("client", "client")]).unwrap();
    // The external host drops the datagrams quietly (no ICMP errors back).
    nft(
        &bed.ext_ns,
        "table inet bench {\n chain in {\n  type filter hook input priority 0;\n  udp dport 10000-60000 drop\n }\n}\n",
    )
    .unwrap();
    let history = (conns + 1000).to_string();
    let daemon = bed
        .start_daemon(
            Path::new(OBSERVER),
            &[
                "--max-records-per-second",
                "0",
                "--report-interval",
                "0",
                "--log",
                "warn",
                "--history",
                &history,
                "--network-model",
                "overlay",
            ],
        )
        .unwrap();
    let client = bed.pod("client").netns.clone();

    let (mut rates, mut kernel_rates, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    let mut runs = Vec::new();
    for round in 0..rounds {
        let m0 = daemon.get("/metrics").unwrap();
        let expected0 = metric(&m0, "observer_snat_flows_total{expectation=\"expected\"}");
        let settled0 = metric(&m0, "observer_snat_settled_total{");
        let cpu0 = cpu_ticks(daemon.pid);
        let start = Instant::now();
        let sent = blast(&client, conns, rate, 10_000 + (round as u16 % 2) * 5);
        let mut last = (0u64, Instant::now());
        let done = loop {
            let m = daemon.get("/metrics").unwrap();
            let n = metric(&m, "observer_snat_settled_total{") - settled0;
            if n >= conns {
                break start.elapsed();
            }
            if n != last.0 {
                last = (n, Instant::now());
            }
            if last.1.elapsed() > Duration::from_secs(10) {
                break start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let m = daemon.get("/metrics").unwrap();
        let expected =
            metric(&m, "observer_snat_flows_total{expectation=\"expected\"}") - expected0;
        let settled = metric(&m, "observer_snat_settled_total{") - settled0;
        let by = |how: &str| {
            metric(&m, &format!("observer_snat_settled_total{{how=\"{how}\"}}"))
                - metric(
                    &m0,
                    &format!("observer_snat_settled_total{{how=\"{how}\"}}"),
                )
        };
        let cpu_s = (cpu_ticks(daemon.pid) - cpu0) as f64 / 100.0;
        let r = expected as f64 / done.as_secs_f64();
        let k = conns as f64 / sent.as_secs_f64();
        rates.push(r);
        kernel_rates.push(k);
        cpu.push(cpu_s / (conns as f64 / 10_000.0));
        runs.push(json!({
            "round": round, "connections": conns, "settled": settled,
            "expected": expected, "lost": conns.saturating_sub(expected),
            "by_wire": by("wire"), "by_lookup": by("lookup"), "absent": by("absent"),
            "correlated_per_s": r, "kernel_created_per_s": k,
            "daemon_cpu_s_per_10k": cpu_s / (conns as f64 / 10_000.0),
        }));
        // Let the kernel's unreplied UDP entries of this round age out of the way.
        std::thread::sleep(Duration::from_secs(1));
    }
    let report = json!({
        "connections_per_round": conns, "offered_rate": rate, "rounds": runs,
        "median_correlated_per_s": median(&mut rates),
        "median_kernel_created_per_s": median(&mut kernel_rates),
        "median_daemon_cpu_s_per_10k": median(&mut cpu),
    });
    println!("{report}");
    for r in &report["rounds"].as_array().unwrap().clone() {
        assert_eq!(r["lost"], 0, "connections without their SNAT: {report:#}");
    }
    bed.stop_daemon(&daemon);
}
