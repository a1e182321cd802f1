//! `cargo xtask bench events`: the record pipeline of the real daemon at full speed.
//!
//! 1. Kernel to daemon: this process re-adopts the running daemon's pinned maps, its event ring
//!    included, and runs `bench_new_conn` (the `from_pod` code on a new connection per run)
//!    with BPF_PROG_TEST_RUN, so every run puts one `new` event into the ring the daemon reads.
//!    Rate = events the daemon turned into enriched records / wall time until it caught up;
//!    losses are the kernel's `events_lost` counter. Baseline: the rate the kernel produced them.
//!    The daemon's CPU time (utime + stime) gives its cost per 100,000 events.
//! 2. Daemon to CLI: `observer flows --last N -o json > /dev/null` over the unix socket against
//!    the raw `GET /v1/flows?last=N` read by this process (the daemon's side alone).
//!
//! Ignored by `cargo test`: run through xtask (release build, root).
use std::{
    io::{Read, Write},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::programs::TestRun as _;
use observer::bpf::Datapath;
use observer_common::programs;
use observer_tests::{
    bench::{arg, cpu_ticks, median, metric_sum},
    TestBed,
};
use serde_json::json;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

fn get(socket: &std::path::Path, path: &str) -> Vec<u8> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: observer\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    buf
}

struct Guard(std::process::Child, PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[test]
#[ignore = "benchmark: cargo xtask bench events"]
fn record_pipeline_throughput() {
    let events = arg("BENCH_EVENTS", 2_000_000);
    let batch = arg("BENCH_BATCH", 100_000) as u32;
    let render = arg("BENCH_RENDER", 200_000);
    let rounds = arg("BENCH_ROUNDS", 3) as usize;

    let bed = TestBed::overlay("be").unwrap();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/observer-bench-{}", bed.prefix));
    let socket = bed.dir.join("be.sock");
    let log = std::fs::File::create(bed.dir.join("be.log")).unwrap();
    let child = Command::new(OBSERVER)
        .args(["daemon", "--netns", &bed.node_ns, "--node-name", "node-1"])
        .args(["--source", "none", "--max-records-per-second", "0"])
        .args(["--report-interval", "0", "--log", "warn"])
        .args(["--history", &(render + 10_000).to_string()])
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(bed.dir.join("state"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // Killed and its pins removed even when an assertion fails.
    let guard = Guard(child, pin_dir.clone());
    let pid = guard.0.id();
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // `bench_new_conn` numbers connections with a per-CPU sequence: on one CPU every run is a
    // new connection and one event; a thread that migrated would replay the other CPU's
    // numbers, find them in conntrack, and produce fewer events than runs.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
    // The daemon's maps, ring included; this process never reads the ring.
    let mut dp = Datapath::load(&pin_dir).unwrap();
    dp.load_program(programs::BENCH_NEW_CONN).unwrap();
    let pkt = observer::bench::packet64(17, 40000, 53, 0);

    let records_before = metric_sum(
        &String::from_utf8_lossy(&get(&socket, "/metrics")),
        "observer_flow_records_total{",
    );
    let lost = |dp: &Datapath| {
        dp.stats()
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == "events_lost")
            .map(|(_, v)| v)
            .unwrap()
    };
    let lost_before = lost(&dp);
    let cpu_before = cpu_ticks(pid);
    let start = Instant::now();
    let mut produced = 0u64;
    let mut kernel_ns = 0f64;
    while produced < events {
        let mut opts = aya::programs::TestRunOptions::new();
        opts.data_in = Some(&pkt);
        opts.repeat = batch;
        let t = Instant::now();
        dp.prog(programs::BENCH_NEW_CONN)
            .unwrap()
            .test_run(opts)
            .unwrap();
        kernel_ns += t.elapsed().as_nanos() as f64;
        produced += batch as u64;
    }
    let produce_wall = start.elapsed();
    let lost_n = lost(&dp) - lost_before;
    // Wait until the daemon has turned every event that reached the ring into a record.
    let want = produced - lost_n;
    let mut last = (0u64, Instant::now());
    let caught_up = loop {
        let n = metric_sum(
            &String::from_utf8_lossy(&get(&socket, "/metrics")),
            "observer_flow_records_total{",
        ) - records_before;
        if n >= want {
            break start.elapsed();
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(10),
            "daemon stalled at {n} of {want} records"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let cpu_s = (cpu_ticks(pid) - cpu_before) as f64 / 100.0;
    let daemon_rate = want as f64 / caught_up.as_secs_f64();
    let kernel_rate = produced as f64 / produce_wall.as_secs_f64();

    // Daemon to CLI.
    let (mut cli_s, mut raw_s) = (Vec::new(), Vec::new());
    let path = format!("/v1/flows?last={render}");
    let mut rendered_lines = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        let body = get(&socket, &path);
        raw_s.push(t.elapsed().as_secs_f64());
        assert!(body.len() > 1000);
        let t = Instant::now();
        let out = Command::new(OBSERVER)
            .args([
                "flows",
                "--last",
                &render.to_string(),
                "-o",
                "json",
                "--socket",
            ])
            .arg(&socket)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        cli_s.push(t.elapsed().as_secs_f64());
        assert!(out.status.success());
        rendered_lines = out.stdout.iter().filter(|b| **b == b'\n').count();
    }
    drop(dp);
    drop(guard);
    assert_eq!(
        rendered_lines as u64, render,
        "the CLI rendered every record"
    );

    let report = json!({
        "events": produced, "batch": batch,
        "kernel_to_daemon": {
            "daemon_events_per_s": daemon_rate,
            "kernel_produced_per_s": kernel_rate,
            "kernel_ns_per_event": kernel_ns / produced as f64,
            "lost": lost_n, "records": want,
            "daemon_cpu_s_per_100k_events": cpu_s / (want as f64 / 100_000.0),
        },
        "daemon_to_cli": {
            "records": render,
            "cli_flows_per_s": render as f64 / median(&mut cli_s),
            "raw_socket_flows_per_s": render as f64 / median(&mut raw_s),
            "cli_s": cli_s, "raw_s": raw_s,
        },
    });
    println!("{report}");
}
