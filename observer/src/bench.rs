//! `observer bench datapath`: the kernel programs' cost per packet through BPF_PROG_TEST_RUN,
//! each case against the empty tc program measured in the same run.
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun, TestRunOptions};
use observer_common::{programs, Config, CtKey, EndpointInfo, IpcacheEntry, RemoteKind};
use serde::Serialize;

use crate::{
    bpf::{Datapath, ScratchPins},
    cluster,
};

#[derive(Serialize, Debug, Clone)]
pub struct Measurement {
    pub bench: &'static str,
    pub case: String,
    pub ns_per_packet: f64,
    pub baseline_ns_per_packet: f64,
    pub ns_above_baseline: f64,
    /// How the number was taken (repeat per syscall, rounds).
    #[serde(skip)]
    pub method: String,
}

const SRC: [u8; 4] = [10, 244, 1, 10];
const DST: [u8; 4] = [203, 0, 113, 10];

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 64-byte Ethernet frame carrying IPv4 and TCP (`tcp_flags`) or UDP.
pub fn packet64(proto: u8, sport: u16, dport: u16, tcp_flags: u8) -> Vec<u8> {
    packet64_to(DST, proto, sport, dport, tcp_flags)
}

/// Like [`packet64`], to `dst`.
pub fn packet64_to(dst: [u8; 4], proto: u8, sport: u16, dport: u16, tcp_flags: u8) -> Vec<u8> {
    packet64_between(SRC, dst, proto, sport, dport, tcp_flags)
}

/// Like [`packet64`], from `src` to `dst`.
pub fn packet64_between(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
) -> Vec<u8> {
    let mut p = vec![0u8; 64];
    p[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    p[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&50u16.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let l4 = &mut p[34..];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        l4[12] = 5 << 4;
        l4[13] = tcp_flags;
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    } else {
        l4[4..6].copy_from_slice(&30u16.to_be_bytes());
    }
    p
}

fn run(dp: &mut Datapath, prog: &str, pkt: &[u8], repeat: u32) -> Result<f64> {
    let r = dp.prog(prog)?.test_run(test_opts(pkt, repeat));
    elapsed_ns(r, prog)
}

fn run_xdp(dp: &mut Datapath, prog: &str, pkt: &[u8], repeat: u32) -> Result<f64> {
    let r = dp.xdp(prog)?.test_run(test_opts(pkt, repeat));
    elapsed_ns(r, prog)
}

fn test_opts(pkt: &[u8], repeat: u32) -> TestRunOptions<'_> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(pkt);
    opts.repeat = repeat;
    opts
}

fn elapsed_ns(
    r: Result<aya::programs::TestRunResult, aya::programs::ProgramError>,
    prog: &str,
) -> Result<f64> {
    let r = r.with_context(|| format!("BPF_PROG_TEST_RUN on {prog}"))?;
    Ok(r.duration.as_nanos() as f64)
}

/// The uplink's XDP program against the empty XDP program: a reply from the world to a local
/// pod (flat model: addressed straight to the pod) on an established connection, and a packet
/// for the node's own address (overlay: SNAT'd replies), which XDP only counts.
pub fn uplink(repeat: u32, rounds: usize) -> Result<Vec<Measurement>> {
    let mut out = Vec::new();
    for (proto, name) in [(6u8, "tcp"), (17u8, "udp")] {
        let flags = if proto == 6 { 0x10 } else { 0 };
        let to_pod = packet64_between(DST, SRC, proto, 80, 40000, flags);
        let to_node = packet64_between(DST, [10, 224, 0, 4], proto, 80, 40000, flags);
        // A SYN (the world opening a connection to the pod): the conntrack path, a hit after
        // the first run.
        let syn = packet64_between(DST, SRC, proto, 41000, 8080, 0x02);
        let mut cases = vec![
            (
                if proto == 6 {
                    "to_pod_established"
                } else {
                    "to_pod_conntrack_hit"
                },
                &to_pod,
            ),
            ("to_node", &to_node),
        ];
        if proto == 6 {
            cases.push(("to_pod_syn_conntrack_hit", &syn));
        }
        for (case, pkt) in cases {
            let (subj, base) = with_datapath(None, |dp| {
                dp.load_xdp(programs::XDP_EMPTY)?;
                dp.load_uplink_programs()?;
                // The pod opened the connection: its first packet went out through from_pod.
                run(
                    dp,
                    programs::FROM_POD,
                    &packet64(proto, 40000, 80, flags),
                    1,
                )?;
                let (mut subj, mut base) = (Vec::new(), Vec::new());
                for _ in 0..rounds {
                    base.push(run_xdp(dp, programs::XDP_EMPTY, pkt, repeat)?);
                    subj.push(run_xdp(dp, programs::UPLINK_XDP, pkt, repeat)?);
                }
                Ok((subj, base))
            })?;
            out.push(named_measurement(
                "uplink",
                format!("uplink_xdp/{name}/{case}"),
                subj,
                base,
                format!("repeat={repeat}, median of {rounds} rounds, against xdp_empty"),
            ));
        }
    }
    Ok(out)
}

/// The uplink's tc programs against the empty tc program, on an established flow between a
/// local pod and a pod of another node (an address of the ipcache): the wire-side count each
/// packet gets on its way in and out; and the ingress policy of an opener where XDP is off.
pub fn uplink_tc(repeat: u32, rounds: usize) -> Result<Vec<Measurement>> {
    const REMOTE_POD: [u8; 4] = [10, 100, 0, 7];
    let mut out = Vec::new();
    for (proto, name) in [(6u8, "tcp"), (17u8, "udp")] {
        let flags = if proto == 6 { 0x10 } else { 0 };
        // Ingress as a veth uplink runs it, without XDP (`uplink_ingress_policy`).
        let mut cases = vec![
            (
                "in_from_remote_pod",
                programs::UPLINK_INGRESS_POLICY,
                packet64_between(REMOTE_POD, SRC, proto, 80, 40000, flags),
            ),
            (
                "out_to_remote_pod",
                programs::UPLINK_EGRESS,
                packet64_between(SRC, REMOTE_POD, proto, 40000, 80, flags),
            ),
        ];
        if proto == 6 {
            // A remote pod opening a connection to the local pod: judged here, a conntrack hit
            // after the first run.
            cases.push((
                "in_syn_conntrack_hit",
                programs::UPLINK_INGRESS_POLICY,
                packet64_between(REMOTE_POD, SRC, proto, 41000, 8080, 0x02),
            ));
        }
        for (case, prog, pkt) in cases {
            let (subj, base) = with_datapath(None, |dp| {
                dp.load_uplink_programs()?;
                let (mut subj, mut base) = (Vec::new(), Vec::new());
                for _ in 0..rounds {
                    base.push(run(dp, programs::TC_EMPTY, &pkt, repeat)?);
                    subj.push(run(dp, prog, &pkt, repeat)?);
                }
                Ok((subj, base))
            })?;
            out.push(named_measurement(
                "uplink",
                format!("uplink_tc/{name}/{case}"),
                subj,
                base,
                format!("repeat={repeat}, median of {rounds} rounds, against tc_empty"),
            ));
        }
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn measurement(case: String, subject: Vec<f64>, baseline: Vec<f64>, method: String) -> Measurement {
    named_measurement("datapath", case, subject, baseline, method)
}

fn named_measurement(
    bench: &'static str,
    case: String,
    subject: Vec<f64>,
    baseline: Vec<f64>,
    method: String,
) -> Measurement {
    let (s, b) = (median(subject), median(baseline));
    Measurement {
        bench,
        case,
        ns_per_packet: s,
        baseline_ns_per_packet: b,
        ns_above_baseline: s - b,
        method,
    }
}

/// Fills the maps the way a node with `identities` remote prefixes would look.
fn populate(dp: &mut Datapath, identities: u32) -> Result<()> {
    dp.insert_endpoint(
        std::net::IpAddr::from(SRC),
        EndpointInfo { id: 1, flags: 0 },
    )?;
    // As the daemon's full write leaves them: the exact range and its bitmap.
    dp.settle_local_range_from_endpoints()?;
    let mut ipc = dp.ipcache_mut()?;
    for i in 0..identities {
        let net: ipnet::IpNet = format!("10.{}.{}.0/24", 100 + (i >> 8) % 100, i & 0xff).parse()?;
        let (plen, data) = cluster::ipcache_key(net);
        let kind = RemoteKind::RemotePod as u8;
        ipc.insert(
            &aya::maps::lpm_trie::Key::new(plen, data),
            IpcacheEntry {
                identity: i,
                kind,
                _pad: [0; 3],
            },
            0,
        )?;
    }
    Ok(())
}

pub fn datapath(repeat: u32, rounds: usize) -> Result<Vec<Measurement>> {
    let mut out = Vec::new();
    for (proto, name) in [(6u8, "tcp"), (17u8, "udp")] {
        let flags = if proto == 6 { 0x10 } else { 0 };
        let pkt = packet64(proto, 40000, 80, flags);

        // Conntrack hit: the first run creates the entry, every later one finds it.
        let (subj, base) = with_datapath(None, |dp| {
            run(dp, programs::FROM_POD, &pkt, 1)?;
            against_empty(dp, rounds, &pkt, repeat, |dp| {
                run(dp, programs::FROM_POD, &pkt, repeat)
            })
        })?;
        out.push(measurement(
            format!("from_pod/{name}/conntrack_hit"),
            subj,
            base,
            format!("repeat={repeat}, median of {rounds} rounds"),
        ));

        // New connection: `bench_new_conn` rewrites the ports from a per-CPU sequence before
        // running the `from_pod` code, so each of the `repeat` runs opens a new connection
        // (miss, classification, insert, `new` event). Fresh maps per round, with room for every
        // connection: the path of a node whose table is not full. Reported against the empty
        // program, so the rewrite's own cost is included.
        let (mut subj, mut base, mut rewrite) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (s, b, r) = with_datapath(Some(repeat + repeat / 4), |dp| {
                let b = run(dp, programs::TC_EMPTY, &pkt, repeat)?;
                let r = run(dp, programs::BENCH_REWRITE, &pkt, repeat)?;
                // The rewrite advanced the sequence; the subject starts on fresh ports anyway.
                let s = run(dp, programs::BENCH_NEW_CONN, &pkt, repeat)?;
                Ok((vec![s], vec![b], r))
            })?;
            subj.extend(s);
            base.extend(b);
            rewrite.push(r);
        }
        let rw = median(rewrite);
        out.push(measurement(
            format!("from_pod/{name}/new_connection"),
            subj,
            base,
            format!("repeat={repeat}, median of {rounds} rounds, table never full; the port rewrite alone costs {rw:.0} ns"),
        ));

        // The same with the production table size: past the first 262,144 runs every insert
        // evicts the least recently used entry, as under a flood of new connections.
        let (subj, base) = with_datapath(None, |dp| {
            against_empty(dp, rounds, &pkt, repeat, |dp| {
                run(dp, programs::BENCH_NEW_CONN, &pkt, repeat)
            })
        })?;
        out.push(measurement(
            format!("from_pod/{name}/new_connection_table_full"),
            subj,
            base,
            format!("repeat={repeat}, median of {rounds} rounds, LRU evicting"),
        ));
        out.push(new_connection_steady(&pkt, name, rounds)?);
    }
    out.push(from_pod_syn_ack(repeat, rounds)?);
    out.push(from_pod_reopened(rounds)?);
    out.extend(to_pod_local(repeat, rounds)?);
    Ok(out)
}

/// Connections a busy node's table holds in [`new_connection_steady`], and how many come and
/// go between two sweeps: 10,000 connections a second, each lingering about 13 s, swept
/// every second.
const STEADY_LIVE: usize = 131_072;
const STEADY_BATCH: u32 = 10_000;

/// `from_pod` opening connections on a node in steady state, in the production table: it
/// holds `STEADY_LIVE` connections, and before each round the oldest `STEADY_BATCH` are
/// removed as the daemon's sweep removes expired ones (in batches, untimed: the sweep's cost
/// is the daemon's). Unlike `new_connection`, whose table only grows and so hands each insert
/// an element never used, each insert here reuses one the sweep freed, as on a node that has
/// run for a while.
fn new_connection_steady(pkt: &[u8], name: &str, rounds: usize) -> Result<Measurement> {
    let (subj, base) = with_datapath(None, |dp| {
        run(dp, programs::BENCH_NEW_CONN, pkt, STEADY_LIVE as u32)?;
        against_empty(dp, rounds, pkt, STEADY_BATCH, |dp| {
            sweep_oldest(dp, STEADY_BATCH as usize)?;
            run(dp, programs::BENCH_NEW_CONN, pkt, STEADY_BATCH)
        })
    })?;
    Ok(measurement(
        format!("from_pod/{name}/new_connection_steady"),
        subj,
        base,
        format!(
            "repeat={STEADY_BATCH}, median of {rounds} rounds, {STEADY_LIVE} connections \
             held, the oldest {STEADY_BATCH} removed before each round"
        ),
    ))
}

/// Removes the `n` oldest connections of the table, as the sweep removes expired ones.
fn sweep_oldest(dp: &mut Datapath, n: usize) -> Result<()> {
    let mut all = dp.conntrack_entries()?;
    all.sort_by_key(|(_, e)| e.first_seen_ns);
    let oldest: Vec<CtKey> = all.iter().take(n).map(|(k, _)| *k).collect();
    let removed = dp.remove_conntrack(&oldest)?;
    anyhow::ensure!(
        removed == oldest.len(),
        "the sweep removed {removed} of {}",
        oldest.len()
    );
    Ok(())
}

/// `from_pod` on a TCP opener whose tuple's closed entry still lingers, as a busy client's
/// reused ports do: it takes the entry over in place. Every round first closes each tuple with
/// a RST (not measured), then reopens each one. Against the empty program, so the port rewrite
/// is included, as in `new_connection`.
fn from_pod_reopened(rounds: usize) -> Result<Measurement> {
    let syn = packet64(6, 40000, 80, 0x02);
    let rst = packet64(6, 40000, 80, 0x04);
    let ports = programs::BENCH_SOURCE_PORTS;
    let (subj, base) = with_datapath(None, |dp| {
        // The port sequence is per CPU.
        let _pinned = PinnedToCpu::new(0)?;
        run(dp, programs::BENCH_NEW_CONN_OUT, &syn, ports)?;
        against_empty(dp, rounds, &syn, ports, |dp| {
            run(dp, programs::BENCH_NEW_CONN_OUT, &rst, ports)?;
            run(dp, programs::BENCH_NEW_CONN_OUT, &syn, ports)
        })
    })?;
    Ok(measurement(
        "from_pod/tcp/reopened_connection".into(),
        subj,
        base,
        format!("repeat={ports} (each source port once), median of {rounds} rounds, each tuple closed by a RST before"),
    ))
}

/// A second pod of the node, the destination of the local cases.
const PEER: [u8; 4] = [10, 244, 1, 11];

/// `from_pod` on a pod's SYN-ACK: the reply of a connection the world opened to the pod (its SYN
/// went through `to_pod`), one per accepted connection, a conntrack hit like any reply.
fn from_pod_syn_ack(repeat: u32, rounds: usize) -> Result<Measurement> {
    let syn = packet64_between(DST, SRC, 6, 41000, 8080, 0x02);
    let syn_ack = packet64_between(SRC, DST, 6, 8080, 41000, 0x12);
    let (subj, base) = with_datapath(None, |dp| {
        run(dp, programs::TO_POD, &syn, 1)?;
        against_empty(dp, rounds, &syn_ack, repeat, |dp| {
            run(dp, programs::FROM_POD, &syn_ack, repeat)
        })
    })?;
    Ok(measurement(
        "from_pod/tcp/syn_ack_reply".into(),
        subj,
        base,
        format!("repeat={repeat}, median of {rounds} rounds"),
    ))
}

/// `to_pod` on a packet between two pods of the node, on an established TCP connection, after
/// `from_pod` settled it at the source's veth (a test run's interface, ifindex 1, marked as a
/// pod veth). `handed_over`: the last `from_pod` run on this CPU was this packet, so `to_pod`
/// passes it on that run's lookup. `looked_up`: the last was another connection's packet, so
/// `to_pod` looks the connection up itself, as every local packet did before the handoff.
fn to_pod_local(repeat: u32, rounds: usize) -> Result<Vec<Measurement>> {
    let pkt = packet64_between(SRC, PEER, 6, 40000, 80, 0x10);
    let other = packet64_between(SRC, PEER, 6, 40001, 80, 0x10);
    let (handed, looked, base) = with_datapath(None, |dp| {
        dp.insert_endpoint(PEER.into(), EndpointInfo { id: 2, flags: 0 })?;
        dp.settle_local_range_from_endpoints()?;
        dp.mark_attached(1, false)?;
        // The handoff is per CPU: every run on one.
        let _pinned = PinnedToCpu::new(0)?;
        // The first packet of each opens its connection (picked up mid-way), the second is
        // settled as established.
        for p in [&other, &other, &pkt, &pkt] {
            run(dp, programs::FROM_POD, p, 1)?;
        }
        let (mut handed, mut looked, mut base) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            base.push(run(dp, programs::TC_EMPTY, &pkt, repeat)?);
            run(dp, programs::FROM_POD, &pkt, 1)?;
            handed.push(run_from(dp, programs::TO_POD, &pkt, repeat, 1)?);
            run(dp, programs::FROM_POD, &other, 1)?;
            looked.push(run_from(dp, programs::TO_POD, &pkt, repeat, 1)?);
        }
        Ok((handed, looked, base))
    })?;
    let method = format!("repeat={repeat}, median of {rounds} rounds, one CPU");
    Ok(vec![
        measurement(
            "to_pod/tcp/local_established_handed_over".into(),
            handed,
            base.clone(),
            method.clone(),
        ),
        measurement(
            "to_pod/tcp/local_established_looked_up".into(),
            looked,
            base,
            method,
        ),
    ])
}

/// `rounds` rounds of the empty program on `pkt` (`repeat` runs), each followed by `subject`
/// (which may do unmeasured work before the test run it returns): (subject, baseline) ns.
fn against_empty(
    dp: &mut Datapath,
    rounds: usize,
    pkt: &[u8],
    repeat: u32,
    mut subject: impl FnMut(&mut Datapath) -> Result<f64>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut subj, mut base) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        base.push(run(dp, programs::TC_EMPTY, pkt, repeat)?);
        subj.push(subject(dp)?);
    }
    Ok((subj, base))
}

/// A tc test run of a packet that entered the node through `ingress_ifindex`.
fn run_from(
    dp: &mut Datapath,
    prog: &str,
    pkt: &[u8],
    repeat: u32,
    ingress_ifindex: u32,
) -> Result<f64> {
    // `struct __sk_buff` up to `ingress_ifindex` (the tenth u32 of the UAPI layout); the
    // kernel zero-fills the rest.
    let mut ctx = [0u8; 40];
    ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut opts = test_opts(pkt, repeat);
    opts.ctx_in = Some(&ctx);
    elapsed_ns(dp.prog(prog)?.test_run(opts), prog)
}

/// The calling thread on one CPU until dropped (test runs run on the caller's CPU).
struct PinnedToCpu(libc::cpu_set_t);

impl PinnedToCpu {
    fn new(cpu: usize) -> Result<Self> {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_getaffinity(0, size, &mut old) != 0
                || libc::sched_setaffinity(0, size, &one) != 0
            {
                anyhow::bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
            }
        }
        Ok(Self(old))
    }
}

impl Drop for PinnedToCpu {
    fn drop(&mut self) {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        unsafe { libc::sched_setaffinity(0, size, &self.0) };
    }
}

/// Loads the programs on fresh maps (the benchmark's own pin directory, removed afterwards),
/// fills them like a node, drains the event ring as the daemon does, and runs `f`.
fn with_datapath<T>(
    ct_entries: Option<u32>,
    f: impl FnOnce(&mut Datapath) -> Result<T>,
) -> Result<T> {
    let pins = ScratchPins::new("bench");
    let mut dp = Datapath::load_sized(pins.path(), ct_entries)?;
    for p in [
        programs::TC_EMPTY,
        programs::BENCH_NEW_CONN,
        programs::BENCH_NEW_CONN_OUT,
        programs::BENCH_REWRITE,
    ] {
        dp.load_program(p)?;
    }
    dp.set_config(Config {
        report_interval_ns: 0,
        policy_gen: 0,
        enforce: 1,
        ..Config::default()
    })?;
    populate(&mut dp, 1000)?;
    let drainer = Drainer::start(&mut dp)?;
    let r = f(&mut dp);
    drainer.stop();
    let lost = dp
        .stats()?
        .into_iter()
        .find(|(k, _)| *k == "events_lost")
        .map(|(_, v)| v)
        .unwrap_or(0);
    if lost > 0 {
        eprintln!("note: {lost} events found the ring buffer full during this case (counted as lost, as in the daemon)");
    }
    r
}

/// Reads the event ring on a thread while a benchmark runs, as the daemon would.
struct Drainer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Drainer {
    fn start(dp: &mut Datapath) -> Result<Self> {
        let mut ring = dp.take_events()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                while ring.next().is_some() {}
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        Ok(Self { stop, handle })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}

// ---- policy ------------------------------------------------------------------------------------

use crate::{
    cluster::{add_object, Cluster},
    policy::{compile, Options},
};
use serde_json::json;

/// A cluster with two local pods (src 10.244.1.10, dst 10.244.1.11) and 1,000 remote pods of
/// distinct labels (1,000 identities). src's egress and dst's ingress each carry `rules` rules:
/// rule j admits remote identity j % 1000 on port 1000 + j / 1000, and one more admits the other
/// local pod on TCP 80, the port the benchmark connects to.
pub fn policy_cluster(rules: usize) -> Cluster {
    let mut c = Cluster::default();
    add_object(
        &mut c,
        "bench",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench", "labels": {"team": "bench"}}}),
    );
    for (name, ip) in [("src", "10.244.1.10"), ("dst", "10.244.1.11")] {
        add_object(
            &mut c,
            "bench",
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "bench", "labels": {"role": name}},
            "spec": {"nodeName": "bench-node", "containers": [{"name": "c", "image": "i"}]},
            "status": {"podIP": ip}}),
        );
    }
    for i in 0..1000u32 {
        add_object(
            &mut c,
            "bench",
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("r{i}"), "namespace": "bench", "labels": {"id": i.to_string()}},
            "spec": {"nodeName": "other", "containers": [{"name": "c", "image": "i"}]},
            "status": {"podIP": format!("10.245.{}.{}", i / 250, 1 + i % 250)}}),
        );
    }
    for (dir, key, selector, other) in [
        ("Egress", "to", "src", "dst"),
        ("Ingress", "from", "dst", "src"),
    ] {
        let mut rs = vec![
            json!({key: [{"podSelector": {"matchLabels": {"role": other}}}, {"podSelector": {"matchLabels": {"id": "0"}}}], "ports": [{"port": 80}]}),
        ];
        for j in 1..rules {
            rs.push(json!({key: [{"podSelector": {"matchLabels": {"id": (j % 1000).to_string()}}}], "ports": [{"port": 1000 + j / 1000}]}));
        }
        let field = if dir == "Egress" { "egress" } else { "ingress" };
        add_object(
            &mut c,
            "bench",
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("{selector}-{field}"), "namespace": "bench"},
            "spec": {"podSelector": {"matchLabels": {"role": selector}}, "policyTypes": [dir], field: rs}}),
        );
    }
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    c
}

/// New connections through `from_pod` (src -> dst on this node: src's egress and dst's ingress
/// policy, both judged where the packet leaves src) and `to_pod` (remote pod r0 -> dst: dst's
/// ingress policy) with 1, 100 and 10,000 rules over 1,000 identities.
pub fn policy(repeat: u32, rounds: usize) -> Result<Vec<Measurement>> {
    let mut out = Vec::new();
    let repeat = repeat.min(60_000); // distinct source ports available per round
    let pkt = packet64_to([10, 244, 1, 11], 6, 40000, 80, 0x02);
    let inbound = packet64_between([10, 245, 0, 1], [10, 244, 1, 11], 6, 40000, 80, 0x02);
    for rules in [1usize, 100, 10_000] {
        let c = policy_cluster(rules);
        let (mut out_s, mut in_s, mut base) = (Vec::new(), Vec::new(), Vec::new());
        let mut entries = 0;
        for _ in 0..rounds {
            let (o, i, b, n) = with_policy_datapath(&c, |dp| {
                let b = run(dp, programs::TC_EMPTY, &pkt, repeat)?;
                let o = run(dp, programs::BENCH_NEW_CONN_OUT, &pkt, repeat)?;
                let i = run(dp, programs::BENCH_NEW_CONN_IN, &inbound, repeat)?;
                Ok((o, i, b))
            })?;
            out_s.push(o);
            in_s.push(i);
            base.push(b);
            entries = n;
        }
        let method = format!("repeat={repeat} new connections, median of {rounds} rounds, {entries} policy entries, 1,000 identities");
        out.push(named_measurement(
            "policy",
            format!("from_pod/egress+ingress/{rules}_rules"),
            out_s,
            base.clone(),
            method.clone(),
        ));
        out.push(named_measurement(
            "policy",
            format!("to_pod/ingress/{rules}_rules"),
            in_s,
            base,
            method,
        ));
    }
    Ok(out)
}

fn with_policy_datapath(
    c: &Cluster,
    f: impl FnOnce(&mut Datapath) -> Result<(f64, f64, f64)>,
) -> Result<(f64, f64, f64, usize)> {
    let pins = ScratchPins::new("bench-policy");
    let mut dp = Datapath::load(pins.path())?;
    for p in [
        programs::TC_EMPTY,
        programs::BENCH_NEW_CONN_OUT,
        programs::BENCH_NEW_CONN_IN,
    ] {
        dp.load_program(p)?;
    }
    dp.set_config(Config {
        report_interval_ns: 0,
        policy_gen: 1,
        enforce: 1,
        ..Config::default()
    })?;
    let want = compile::compile(
        c,
        "bench-node",
        &[],
        &Options::default(),
        &mut compile::Allocator::default(),
    );
    let entries = want.policy.len();
    dp.apply(&want)?;
    let drainer = Drainer::start(&mut dp)?;
    let r = f(&mut dp);
    drainer.stop();
    let denied = dp
        .stats()?
        .into_iter()
        .find(|(k, _)| *k == "policy_denied")
        .map(|(_, v)| v)
        .unwrap_or(0);
    anyhow::ensure!(
        denied == 0,
        "{denied} benchmark packets were denied: the measured path must be the allowed one"
    );
    let (a, b, c) = r?;
    Ok((a, b, c, entries))
}

/// A cluster of `pods` pods in `pods / 100` namespaces and `policies` policies; node `node-0`
/// hosts 100 of the pods.
pub fn compile_cluster(pods: usize, policies: usize) -> Cluster {
    let mut c = Cluster::default();
    // Without Node objects, as the compile figures in BENCHMARKS.md were measured.
    for obj in cluster_objects(pods, policies) {
        if obj["kind"] == "Node" {
            continue;
        }
        add_object(&mut c, "bench", obj);
    }
    assert!(c.errors.is_empty(), "{:?}", c.errors.first());
    c
}

/// The shape of a benchmark cluster: `cargo xtask bench kube -- SIZE=10k|250k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    pub pods: usize,
    pub policies: usize,
    /// Nodes, `node-0` (the node under test) included.
    pub nodes: usize,
    /// Pods on `node-0`: pods `p0` to `p{local_pods - 1}`.
    pub local_pods: usize,
}

impl ClusterSpec {
    /// The shape [`cluster_objects`] has always built: 100 pods per node, 100 of them on
    /// `node-0`. Kept exactly (addresses included) so runs compare across BENCHMARKS.md.
    pub fn classic(pods: usize, policies: usize) -> Self {
        Self {
            pods,
            policies,
            nodes: pods.div_ceil(100).max(1),
            local_pods: pods.min(100),
        }
    }

    /// `10k` (the classic 10,000 pods, 1,000 policies) or `250k` (250,000 pods, 10,000
    /// policies, 1,000 nodes of 250 pods each).
    pub fn size(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "10k" => Some(Self::classic(10_000, 1_000)),
            "250k" => Some(Self {
                pods: 250_000,
                policies: 10_000,
                nodes: 1_000,
                local_pods: 250,
            }),
            _ => None,
        }
    }

    pub fn is_classic(&self) -> bool {
        *self == Self::classic(self.pods, self.policies)
    }

    fn namespaces(&self) -> usize {
        (self.pods / 100).max(1)
    }

    /// Pods per node other than `node-0` (per-node layout).
    fn per_node(&self) -> usize {
        (self.pods - self.local_pods).div_ceil(self.nodes.saturating_sub(1).max(1))
    }

    /// Host bits of a node's pod CIDR (per-node layout): at least a /24, room for the largest
    /// node's pods plus network, broadcast and one spare address on `node-0`.
    fn host_bits(&self) -> u32 {
        let need = self.per_node().max(self.local_pods + 1) + 2;
        need.next_power_of_two().trailing_zeros().max(8)
    }

    /// First address of node `n`'s pod CIDR (per-node layout): consecutive blocks from
    /// 10.100.0.0, below the test bed's 10.224.0.0/16 VNet.
    fn node_base(&self, n: usize) -> u32 {
        let base = u32::from(std::net::Ipv4Addr::new(10, 100, 0, 0));
        base + ((n as u32) << self.host_bits())
    }

    /// Node `n`'s pod CIDR.
    pub fn pod_cidr(&self, n: usize) -> String {
        if self.is_classic() {
            return format!("10.{}.{}.0/24", 200 + n / 256, n % 256);
        }
        format!(
            "{}/{}",
            std::net::Ipv4Addr::from(self.node_base(n)),
            32 - self.host_bits()
        )
    }

    /// An address in `node-0`'s pod CIDR that no pod of the cluster holds: for a pod the
    /// benchmark adds.
    pub fn spare_local_ip(&self) -> String {
        if self.is_classic() {
            return "10.200.0.254".into();
        }
        let last = self.node_base(0) + (1u32 << self.host_bits()) - 2;
        std::net::Ipv4Addr::from(last).to_string()
    }

    /// Pod `i`'s node and IPv4 address.
    fn place(&self, i: usize) -> (usize, String) {
        if self.is_classic() {
            let node = if i < 100 { 0 } else { 1 + i / 100 };
            let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
            return (node, ip);
        }
        let (node, slot) = if i < self.local_pods {
            (0, i)
        } else {
            let r = i - self.local_pods;
            (1 + r / self.per_node(), r % self.per_node())
        };
        let ip = std::net::Ipv4Addr::from(self.node_base(node) + 1 + slot as u32);
        (node, ip.to_string())
    }
}

/// The benchmark cluster as Kubernetes objects: `pods / 100` namespaces and as many nodes
/// (`node-0` holds the first 100 pods), `pods` pods with 20 app labels and two tiers, and
/// `policies` NetworkPolicies mixing pod, namespace and ipBlock peers with named ports.
///
/// This classic layout does not put pods inside their node's pod CIDR (pods from
/// 10.100.0.0/16 on, node CIDRs from 10.200.0.0/24), leaves `node-1` empty and puts the last
/// 100 pods on a node without a Node object; it stays as it is because the compile and sync
/// figures in BENCHMARKS.md were measured on it. [`cluster_objects_for`] with any other
/// shape packs each node's pods into its pod CIDR.
pub fn cluster_objects(pods: usize, policies: usize) -> Vec<serde_json::Value> {
    cluster_objects_for(&ClusterSpec::classic(pods, policies))
}

/// The benchmark cluster of shape `spec`. For the classic shape, what [`cluster_objects`]
/// builds. Otherwise pods `p0..p{local_pods}` are on `node-0` and the others fill
/// `node-1..node-{nodes - 1}` in order, each node's pod CIDR holding its pods' addresses
/// (consecutive blocks of at least a /24 from 10.100.0.0). Pod labels, namespaces
/// (`pods / 100`, pod `i` in `ns{i % namespaces}`) and policies are the same in both.
pub fn cluster_objects_for(spec: &ClusterSpec) -> Vec<serde_json::Value> {
    assert!(
        spec.local_pods <= spec.pods && (spec.nodes > 1 || spec.local_pods == spec.pods),
        "{spec:?}: pods beyond node-0's need other nodes"
    );
    if !spec.is_classic() {
        assert!(
            spec.node_base(spec.nodes) <= u32::from(std::net::Ipv4Addr::new(10, 224, 0, 0)),
            "{spec:?}: the pod CIDRs would reach the test bed's VNet"
        );
    }
    let mut out = Vec::new();
    let namespaces = spec.namespaces();
    for n in 0..namespaces {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns{n}"), "labels": {"team": format!("t{}", n % 10)}}}));
    }
    for n in 0..spec.nodes {
        // node-0 is the test bed's node (10.224.0.4); unique up to 64,000 nodes.
        out.push(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{n}")},
            "spec": {"podCIDR": spec.pod_cidr(n)},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("10.224.{}.{}", n / 250, 4 + n % 250)}]}}));
    }
    for i in 0..spec.pods {
        let ns = i % namespaces;
        let (node, ip) = spec.place(i);
        out.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "namespace": format!("ns{ns}"),
                "labels": {"app": format!("app{}", i % 20), "tier": if i % 2 == 0 { "fe" } else { "be" }}},
            "spec": {"nodeName": format!("node-{node}"),
                "containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip}}));
    }
    for j in 0..spec.policies {
        let ns = j % namespaces;
        out.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("pol{j}"), "namespace": format!("ns{ns}")},
            "spec": {
                "podSelector": {"matchLabels": {"app": format!("app{}", j % 20)}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "fe"}}},
                                      {"namespaceSelector": {"matchLabels": {"team": format!("t{}", j % 10)}}}],
                             "ports": [{"port": "http"}, {"port": 443}]}],
                "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": format!("app{}", (j + 1) % 20)}}}],
                            "ports": [{"port": 8080}]},
                           {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]}}));
    }
    out
}

/// Full compile of 1,000 policies over 10,000 pods, and one pod label change to maps updated.
pub fn compile_bench(rounds: usize) -> Result<Vec<Measurement>> {
    let c = compile_cluster(10_000, 1_000);
    let opts = Options::default();
    let mut full = Vec::new();
    let mut desired = None;
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        let d = compile::compile(&c, "node-0", &[], &opts, &mut compile::Allocator::default());
        full.push(t.elapsed().as_secs_f64() * 1e9);
        desired = Some(d);
    }
    let d = desired.context("no rounds")?;
    let entries = d.policy.len();
    // Wall-clock operations have no baseline program: reported against zero.
    let mut out = vec![named_measurement(
        "policy",
        "compile/1000_policies_10000_pods".into(),
        full,
        vec![0.0],
        format!("full compile for node-0 (100 local pods), {entries} policy entries, median of {rounds}"),
    )];

    // One label change through the daemon's path: the incremental compile told which pod
    // changed, its writes in their safe order.
    let pins = ScratchPins::new("bench-compile");
    let mut dp = Datapath::load(pins.path())?;
    let mut alloc = compile::Allocator::default();
    let mut inc = crate::policy::incremental::Incremental::new("node-0", &opts);
    inc.update(&c, &[], &mut alloc);
    inc.take_changes();
    dp.apply(inc.desired())?;
    // In (namespace, name) order, as the watch caches hand it over with hints.
    let mut changed = c.clone();
    changed
        .pods
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    changed
        .policies
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut times = Vec::new();
    for r in 0..rounds.max(3) {
        // A local pod moves to another app: its own isolation and its peers' entries change.
        let pod = changed
            .pods
            .iter_mut()
            .find(|p| &*p.name == "p7")
            .context("pod p7")?;
        std::sync::Arc::make_mut(&mut std::sync::Arc::make_mut(pod).labels)
            .insert("app".into(), format!("app{}", (r + 8) % 20));
        let hints = crate::policy::incremental::Hints {
            pods: Some([(pod.namespace.clone(), pod.name.clone())].into()),
            policies: Some(Default::default()),
        };
        let t = std::time::Instant::now();
        inc.update_with(&changed, &hints, &[], &mut alloc);
        let writes = crate::policy::incremental::ordered_writes(&inc.take_changes(), inc.desired());
        let (w, rm) = dp.write(&writes)?;
        times.push(t.elapsed().as_secs_f64() * 1e9);
        anyhow::ensure!(w + rm > 0, "the label change wrote nothing");
    }
    out.push(named_measurement(
        "policy",
        "label_change_to_maps_updated".into(),
        times,
        vec![0.0],
        format!(
            "incremental compile of the changed pod + ordered map writes, median of {}",
            rounds.max(3)
        ),
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_250k_shape_packs_pods_into_their_node_cidrs() {
        let spec = ClusterSpec::size("250k").unwrap();
        assert!(!spec.is_classic());
        assert_eq!(spec.pod_cidr(0), "10.100.0.0/24");
        assert_eq!(spec.pod_cidr(999), "10.103.231.0/24");
        let mut seen = std::collections::HashSet::new();
        let mut per_node = vec![0usize; spec.nodes];
        for i in 0..spec.pods {
            let (node, ip) = spec.place(i);
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert!(seen.insert(ip), "pod {i}: {ip} twice");
            let cidr: ipnet::IpNet = spec.pod_cidr(node).parse().unwrap();
            assert!(cidr.contains(&ip), "pod {i}: {ip} outside {cidr}");
            assert_eq!(node == 0, i < spec.local_pods);
            per_node[node] += 1;
        }
        assert!(per_node.iter().all(|n| *n == 250), "{per_node:?}");
        let spare: std::net::IpAddr = spec.spare_local_ip().parse().unwrap();
        assert!(!seen.contains(&spare));
        assert!(spec
            .pod_cidr(0)
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&spare));
    }

    #[test]
    fn a_small_per_node_shape_has_every_object() {
        let spec = ClusterSpec {
            pods: 2_000,
            policies: 40,
            nodes: 4,
            local_pods: 500,
        };
        let objs = cluster_objects_for(&spec);
        let count = |k: &str| objs.iter().filter(|o| o["kind"] == k).count();
        assert_eq!(
            (
                count("Namespace"),
                count("Node"),
                count("Pod"),
                count("NetworkPolicy")
            ),
            (20, 4, 2_000, 40)
        );
        // 500 pods per node: a /23 each.
        assert_eq!(spec.pod_cidr(1), "10.100.2.0/23");
        let local = objs
            .iter()
            .filter(|o| o["kind"] == "Pod" && o["spec"]["nodeName"] == "node-0")
            .count();
        assert_eq!(local, 500);
        let mut c = Cluster::default();
        for o in objs {
            add_object(&mut c, "bench", o);
        }
        assert!(c.errors.is_empty(), "{:?}", c.errors.first());
    }

    /// FNV-1a over the objects as JSON text.
    fn fingerprint(objs: &[serde_json::Value]) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for o in objs {
            for b in o.to_string().bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
        }
        h
    }

    /// The compile figures of BENCHMARKS.md are compared across runs: the classic cluster must
    /// stay byte for byte what it was when they were first measured (checked against the
    /// generator as it was before `ClusterSpec`).
    #[test]
    fn the_classic_shape_is_unchanged() {
        let objs = cluster_objects(10_000, 1_000);
        assert_eq!(fingerprint(&objs), 2_325_152_987_664_726_867);
    }
}
