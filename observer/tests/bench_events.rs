//! `cargo xtask bench events`: the record pipeline of the real daemon at full speed.
//!
//! 1. Kernel to daemon: this process re-adopts the running daemon's pinned maps, its event ring
//!    included, and runs `bench_new_conn` (the `from_pod` code on a new connection per run)
//!    with BPF_PROG_TEST_RUN, so every run puts one `new` event into the ring the daemon reads.
//!    Rate = events the daemon turned into enriched records / wall time until it caught up;
//!    losses are the kernel's `events_lost` counter. Baseline: the rate the kernel produced them.
//!    The daemon's CPU time (utime + stime) gives its cost per 100,000 events.
//!    Events only: the same, produced by `bench_new_event`, which emits each `new` event without
//!    the datapath's work (the entry `bench_new_conn` last built, for a fresh tuple): one CPU
//!    produces events faster than it opens connections, so the daemon's sustained rate beside a
//!    producer shows past what `from_pod` lets one CPU produce (paced: BENCH_EVENTS_ONLY_RATE,
//!    2,000,000 a second by default).
//!    Burst: the same events produced while the daemon is stopped, then the wall time it takes
//!    to drain them once it runs again: its own rate, where the sustained rate above is the
//!    producer's on this two-vCPU machine.
//! 2. Daemon to CLI: `observer flows --last N -o json` to a pipe, over the gRPC flow API on
//!    the unix socket, against the same request read raw by this process (decoded, not
//!    rendered: the daemon's side and the transport alone).
//! 3. Follow mode: `observer flows --follow` while the kernel produces new connections at a
//!    steady rate (100,000/s): every record the daemon published reaches the follower or is
//!    reported to it as lost (`{"lost_records":N}`); nothing is unaccounted.
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

/// The newest `n` flows over the gRPC API, as `observer flows --last n` asks for them (its
/// extension included), decoded and counted: the daemon's side and the transport alone.
async fn raw_flows(socket: &std::path::Path, n: u64) -> u64 {
    use observer::hubble::proto::observer::{
        ext::FlowsRequest, observer_client::ObserverClient, GetFlowsRequest,
    };
    let channel = observer::client::channel(&observer::client::Server::Unix(socket.into()))
        .await
        .unwrap();
    let mut api = ObserverClient::new(channel);
    // The request `observer flows` sends (its field mask, its extension), not rendered.
    let req = GetFlowsRequest {
        number: n,
        field_mask: Some(prost_types::FieldMask {
            paths: observer::hubble::convert::RECORD_FIELDS
                .map(String::from)
                .to_vec(),
        }),
        extensions: Some(prost_types::Any {
            type_url: observer::hubble::FLOWS_REQUEST_TYPE.into(),
            value: prost::Message::encode_to_vec(&FlowsRequest::default()),
        }),
        ..Default::default()
    };
    let mut stream = api.get_flows(req).await.unwrap().into_inner();
    let mut count = 0;
    while let Some(_flow) = stream.message().await.unwrap() {
        count += 1;
    }
    count
}

const NEW_RECORDS: &str = "observer_flow_records_total{event=\"new\"";

/// `observer flows --follow --type new -o json` while `total` new connections are produced at
/// `rate` per second. Returns what the follower received and was told it lost, against the
/// records the daemon published in that time.
fn follow_under_load(
    socket: &std::path::Path,
    dp: &mut Datapath,
    rate: u64,
    total: u64,
) -> serde_json::Value {
    let mut follower = Command::new(OBSERVER)
        .args([
            "flows", "--follow", "--type", "new", "-o", "json", "--socket",
        ])
        .arg(socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let (mut n, mut lost) = (0u64, 0u64);
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.unwrap();
                match line.strip_prefix("{\"lost_records\":") {
                    Some(rest) => lost += rest.trim_end_matches('}').parse::<u64>().unwrap(),
                    None => n += 1,
                }
                received.store(n + lost, std::sync::atomic::Ordering::Relaxed);
            }
            (n, lost)
        })
    };
    let published = || {
        metric_sum(
            &String::from_utf8_lossy(&get(socket, "/metrics")),
            NEW_RECORDS,
        )
    };
    let pkt = observer::bench::packet64(17, 41000, 53, 0);
    // Subscribed once it has a record: a marker connection at each poll until one arrives, the
    // pipeline left to settle, then the count starts. A follow asks for no history, so what is
    // published before it subscribes never reaches it.
    observer_tests::cluster::eventually(
        "the follower's first record",
        Duration::from_secs(10),
        || {
            new_conns(dp, &pkt, 1);
            Ok(received.load(std::sync::atomic::Ordering::Relaxed) > 0)
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let (before, marker) = (
        published(),
        received.load(std::sync::atomic::Ordering::Relaxed),
    );
    let batch = (rate / 10).max(1) as u32;
    let start = Instant::now();
    let mut produced = 0u64;
    while produced < total {
        // Paced in 100 ms slots.
        let slot = start + Duration::from_millis(100 * produced / batch as u64);
        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        new_conns(dp, &pkt, batch);
        produced += batch as u64;
    }
    let produce_s = start.elapsed().as_secs_f64();
    // Until the follower has accounted for everything published, or stopped moving.
    let mut last = (0, Instant::now());
    loop {
        let want = published() - before;
        let got = received.load(std::sync::atomic::Ordering::Relaxed) - marker;
        if got >= want && last.1.elapsed() > Duration::from_millis(500) {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        }
        if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let published_n = published() - before;
    let _ = follower.kill();
    let _ = follower.wait();
    let (flows, lost) = reader.join().unwrap();
    // The markers were records: the first lines the follower read.
    let flows = flows - marker;
    assert_eq!(
        flows + lost,
        published_n,
        "every published record reached the follower or was reported lost to it"
    );
    json!({
        "rate_asked_per_s": rate, "produced": produced,
        "produced_per_s": produced as f64 / produce_s,
        "published": published_n, "received": flows, "reported_lost": lost,
        "unaccounted": published_n as i64 - (flows + lost) as i64,
    })
}

/// `n` runs of `bench_new_conn` on `pkt`: `n` new connections, one `new` event each.
fn new_conns(dp: &mut Datapath, pkt: &[u8], n: u32) {
    run(dp, programs::BENCH_NEW_CONN, pkt, n)
}

/// `n` runs of `prog` on `pkt`.
fn run(dp: &mut Datapath, prog: &str, pkt: &[u8], n: u32) {
    let mut opts = aya::programs::TestRunOptions::new();
    opts.data_in = Some(pkt);
    opts.repeat = n;
    dp.prog(prog).unwrap().test_run(opts).unwrap();
}

/// Kernel to daemon, sustained: `prog` (one `new` event per run) runs in batches of `batch`
/// beside the daemon until `events` were produced, as fast as it can or paced to `rate` a
/// second. The daemon's rate: the records it published over the wall time until it published
/// the last one; its CPU per 100,000 of them.
fn sustained(
    socket: &std::path::Path,
    dp: &mut Datapath,
    pid: u32,
    prog: &str,
    events: u64,
    batch: u32,
    rate: Option<u64>,
) -> serde_json::Value {
    let pkt = observer::bench::packet64(17, 40000, 53, 0);
    let records_before = records(socket);
    let lost_before = events_lost(dp);
    let cpu_before = cpu_ticks(pid);
    let start = Instant::now();
    let mut produced = 0u64;
    let mut kernel_ns = 0f64;
    while produced < events {
        if let Some(rate) = rate {
            let slot = start + Duration::from_secs_f64(produced as f64 / rate as f64);
            if let Some(wait) = slot.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let t = Instant::now();
        run(dp, prog, &pkt, batch);
        kernel_ns += t.elapsed().as_nanos() as f64;
        produced += batch as u64;
    }
    let produce_wall = start.elapsed();
    let lost_n = events_lost(dp) - lost_before;
    // Wait until the daemon has turned every event that reached the ring into a record.
    let want = produced - lost_n;
    let mut last = (0u64, Instant::now());
    let caught_up = loop {
        let n = records(socket) - records_before;
        if n >= want {
            break start.elapsed();
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(10),
            "daemon stalled at {n} of {want} records ({prog})"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let cpu_s = (cpu_ticks(pid) - cpu_before) as f64 / 100.0;
    json!({
        "producer": prog, "rate_asked_per_s": rate,
        "daemon_events_per_s": want as f64 / caught_up.as_secs_f64(),
        "kernel_produced_per_s": produced as f64 / produce_wall.as_secs_f64(),
        "kernel_ns_per_event": kernel_ns / produced as f64,
        "produced": produced, "lost": lost_n, "records": want,
        "daemon_cpu_s_per_100k_events": cpu_s / (want as f64 / 100_000.0),
    })
}

/// Events the kernel could not put into the ring (`events_lost`).
fn events_lost(dp: &Datapath) -> u64 {
    dp.stats()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == "events_lost")
        .map(|(_, v)| v)
        .unwrap()
}

/// Records the daemon published (`observer_flow_records_total`).
fn records(socket: &std::path::Path) -> u64 {
    metric_sum(
        &String::from_utf8_lossy(&get(socket, "/metrics")),
        "observer_flow_records_total{",
    )
}

/// The ring's consumer and producer positions, read through read-only mappings of the
/// daemon's pinned ring: how far the daemon has read, without asking it (a metrics scrape
/// every millisecond took the daemon's state lock and CPU in the middle of what it measures).
struct RingPositions {
    consumer: *const u64,
    producer: *const u64,
}

impl RingPositions {
    fn map(ring: &impl std::os::fd::AsRawFd) -> RingPositions {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let at = |offset: usize| {
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    ring.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mapping the event ring's positions");
            p as *const u64
        };
        RingPositions {
            consumer: at(0),
            producer: at(page),
        }
    }

    /// Whether the reader has taken everything the kernel put in.
    fn drained(&self) -> bool {
        unsafe { self.consumer.read_volatile() >= self.producer.read_volatile() }
    }
}

/// The daemon's own rate, apart from the producer's: with the daemon stopped (SIGSTOP) the
/// kernel fills the ring with `n` new connections' events; from SIGCONT, the wall time until
/// the daemon has read, enriched and published every one. The producer shares this machine's
/// two vCPUs with the daemon in the sustained case; here it is done before the daemon runs.
/// Until the daemon has read the ring, progress is watched on the ring's positions; then the
/// metrics are scraped every millisecond until every record is counted as published.
fn burst_drain(
    socket: &std::path::Path,
    dp: &mut Datapath,
    ring: &RingPositions,
    pid: u32,
    n: u32,
) -> serde_json::Value {
    let before = records(socket);
    let lost_before = events_lost(dp);
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let pkt = observer::bench::packet64(17, 40000, 53, 0);
    new_conns(dp, &pkt, n);
    let lost_n = events_lost(dp) - lost_before;
    let want = n as u64 - lost_n;
    let cpu0 = observer_tests::bench::cpu_ns(pid);
    let t0 = Instant::now();
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGCONT) }, 0);
    while !ring.drained() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "daemon never read the ring after a burst"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    loop {
        let got = records(socket) - before;
        if got >= want {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "daemon stalled at {got} of {want} records after a burst"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (observer_tests::bench::cpu_ns(pid) - cpu0) as f64 / 1e9;
    json!({
        "events": n, "lost": lost_n, "records": want, "wall_s": wall,
        "daemon_events_per_s": want as f64 / wall,
        "daemon_cpu_s_per_100k_events": cpu / (want as f64 / 100_000.0),
    })
}

#[test]
#[ignore = "benchmark: cargo xtask bench events"]
fn record_pipeline_throughput() {
    let events = arg("BENCH_EVENTS", 2_000_000);
    let batch = arg("BENCH_BATCH", 100_000) as u32;
    let render = arg("BENCH_RENDER", 200_000);
    let rounds = arg("BENCH_ROUNDS", 3) as usize;
    let follow_rate = arg("BENCH_FOLLOW_RATE", 100_000);
    let follow_events = arg("BENCH_FOLLOW_EVENTS", 1_000_000);
    // 128 bytes a `new` event takes in the ring: 100,000 fill 12.8 of its 16 MiB.
    let burst = arg("BENCH_BURST", 100_000) as u32;
    let events_only_rate = arg("BENCH_EVENTS_ONLY_RATE", 2_000_000);

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
    observer_tests::bench::pin_thread(0, 0);
    // The daemon's maps, ring included; this process never reads the ring.
    let mut dp = Datapath::load(&pin_dir).unwrap();
    dp.load_program(programs::BENCH_NEW_CONN).unwrap();
    dp.load_program(programs::BENCH_NEW_EVENT).unwrap();

    let datapath = sustained(
        &socket,
        &mut dp,
        pid,
        programs::BENCH_NEW_CONN,
        events,
        batch,
        None,
    );
    // After `bench_new_conn` ran on this CPU: its last entry is the template of these events.
    // Paced in slots of 10,000 events: unpaced, one CPU fills the ring faster than any reader.
    let events_only = sustained(
        &socket,
        &mut dp,
        pid,
        programs::BENCH_NEW_EVENT,
        events,
        10_000,
        Some(events_only_rate),
    );

    let ring = dp.take_events().unwrap();
    let positions = RingPositions::map(&ring);
    let burst_rounds: Vec<_> = (0..rounds)
        .map(|_| burst_drain(&socket, &mut dp, &positions, pid, burst))
        .collect();
    let mut burst_rates: Vec<f64> = burst_rounds
        .iter()
        .map(|r| r["daemon_events_per_s"].as_f64().unwrap())
        .collect();
    let mut burst_cpu: Vec<f64> = burst_rounds
        .iter()
        .map(|r| r["daemon_cpu_s_per_100k_events"].as_f64().unwrap())
        .collect();

    // Daemon to CLI: the CLI against the same request read raw (decoded, not rendered) here.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut cli_s, mut raw_s) = (Vec::new(), Vec::new());
    let mut rendered_lines = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        let n = rt.block_on(raw_flows(&socket, render));
        raw_s.push(t.elapsed().as_secs_f64());
        assert_eq!(n, render);
        let t = Instant::now();
        let out = Command::new(OBSERVER)
            .args(["flows", "--last", &render.to_string(), "-o", "json"])
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        cli_s.push(t.elapsed().as_secs_f64());
        assert!(out.status.success());
        rendered_lines = out.stdout.iter().filter(|b| **b == b'\n').count();
    }
    assert_eq!(
        rendered_lines as u64, render,
        "the CLI rendered every record"
    );

    // Follow mode: a follower while the kernel produces at a steady rate. Every record the
    // daemon published meanwhile reaches it, or is reported to it as lost.
    let follow = follow_under_load(&socket, &mut dp, follow_rate, follow_events);
    drop(dp);
    drop(guard);

    let report = json!({
        "events": events, "batch": batch,
        "kernel_to_daemon": datapath,
        "kernel_to_daemon_events_only": events_only,
        "burst": {
            "events": burst,
            "daemon_events_per_s": median(&mut burst_rates),
            "daemon_cpu_s_per_100k_events": median(&mut burst_cpu),
            "rounds": burst_rounds,
        },
        "daemon_to_cli": {
            "records": render,
            "cli_flows_per_s": render as f64 / median(&mut cli_s),
            "raw_socket_flows_per_s": render as f64 / median(&mut raw_s),
            "cli_s": cli_s, "raw_s": raw_s,
        },
        "follow": follow,
    });
    println!("{report}");
}
