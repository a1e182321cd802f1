//! `observer bench datapath`: the kernel programs' cost per packet through BPF_PROG_TEST_RUN,
//! each case against the empty tc program measured in the same run.
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun, TestRunOptions};
use observer_common::{programs, Config, EndpointInfo, IpcacheEntry, RemoteKind};
use serde::Serialize;

use crate::{bpf::Datapath, cluster};

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
    ip[12..16].copy_from_slice(&SRC);
    ip[16..20].copy_from_slice(&DST);
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
    let p = dp.prog(prog)?;
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(pkt);
    opts.repeat = repeat;
    let r = p.test_run(opts).with_context(|| format!("BPF_PROG_TEST_RUN on {prog}"))?;
    Ok(r.duration.as_nanos() as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn measurement(case: String, subject: Vec<f64>, baseline: Vec<f64>, method: String) -> Measurement {
    let (s, b) = (median(subject), median(baseline));
    Measurement {
        bench: "datapath",
        case,
        ns_per_packet: s,
        baseline_ns_per_packet: b,
        ns_above_baseline: s - b,
        method,
    }
}

/// Fills the maps the way a node with `identities` remote prefixes would look.
fn populate(dp: &mut Datapath, identities: u32) -> Result<()> {
    let mut eps = dp.endpoints_mut()?;
    eps.insert(cluster::ip_key(std::net::IpAddr::from(SRC)), EndpointInfo { id: 1, flags: 0 }, 0)?;
    let mut ipc = dp.ipcache_mut()?;
    for i in 0..identities {
        let net: ipnet::IpNet = format!("10.{}.{}.0/24", 100 + (i >> 8) % 100, i & 0xff).parse()?;
        let (plen, data) = cluster::ipcache_key(net);
        let kind = RemoteKind::RemotePod as u8;
        ipc.insert(&aya::maps::lpm_trie::Key::new(plen, data), IpcacheEntry { identity: i, kind, _pad: [0; 3] }, 0)?;
    }
    Ok(())
}

pub fn datapath(repeat: u32, rounds: usize) -> Result<Vec<Measurement>> {
    let mut out = Vec::new();
    for (proto, name) in [(6u8, "tcp"), (17u8, "udp")] {
        let flags = if proto == 6 { 0x10 } else { 0 };
        let pkt = packet64(proto, 40000, 80, flags);

        // Conntrack hit: the first run creates the entry, every later one finds it.
        let (subj, base, _) = with_datapath(None, |dp| {
            run(dp, programs::FROM_POD, &pkt, 1)?;
            let (mut subj, mut base) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                base.push(run(dp, programs::TC_EMPTY, &pkt, repeat)?);
                subj.push(run(dp, programs::FROM_POD, &pkt, repeat)?);
            }
            Ok((subj, base, 0.0))
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
        let (subj, base, _) = with_datapath(None, |dp| {
            let (mut subj, mut base) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                base.push(run(dp, programs::TC_EMPTY, &pkt, repeat)?);
                subj.push(run(dp, programs::BENCH_NEW_CONN, &pkt, repeat)?);
            }
            Ok((subj, base, 0.0))
        })?;
        out.push(measurement(
            format!("from_pod/{name}/new_connection_table_full"),
            subj,
            base,
            format!("repeat={repeat}, median of {rounds} rounds, LRU evicting"),
        ));
    }
    Ok(out)
}

/// Loads the programs on fresh maps (the benchmark's own pin directory, removed afterwards),
/// fills them like a node, drains the event ring as the daemon does, and runs `f`.
fn with_datapath<T>(ct_entries: Option<u32>, f: impl FnOnce(&mut Datapath) -> Result<T>) -> Result<T> {
    let pin = PathBuf::from(format!("/sys/fs/bpf/observer-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin);
    let _guard = scopeguard(pin.clone());
    let mut dp = Datapath::load_sized(&pin, ct_entries)?;
    for p in [programs::TC_EMPTY, programs::BENCH_NEW_CONN, programs::BENCH_REWRITE] {
        dp.load_program(p)?;
    }
    dp.set_config(Config { report_interval_ns: 0, policy_gen: 0, enforce: 1 })?;
    populate(&mut dp, 1000)?;
    let mut ring = dp.take_events()?;
    let stop = Arc::new(AtomicBool::new(false));
    let drainer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                while ring.next().is_some() {}
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };
    let r = f(&mut dp);
    stop.store(true, Ordering::Relaxed);
    let _ = drainer.join();
    let lost = dp.stats()?.into_iter().find(|(k, _)| *k == "events_lost").map(|(_, v)| v).unwrap_or(0);
    if lost > 0 {
        eprintln!("note: {lost} events found the ring buffer full during this case (counted as lost, as in the daemon)");
    }
    r
}

struct PinGuard(PathBuf);
fn scopeguard(p: PathBuf) -> PinGuard {
    PinGuard(p)
}
impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
