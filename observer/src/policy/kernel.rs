//! The kernel engine: decides a matrix by running the real programs on connection-opening
//! packets through BPF_PROG_TEST_RUN, with maps filled by the compiler. `from_pod` plays the
//! source pod's veth, `to_pod` the destination's, on one conntrack entry, as on a node.
use std::{collections::HashMap, net::IpAddr};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun, TestRunOptions};
use observer_common::{ct_flags, programs, Config, CtEntry};

use super::{
    compile::{self, Allocator, RuleRef},
    engine::Options,
    matrix::{pods_sorted, Cell},
    Protocol,
};
use crate::{
    bpf::{Datapath, ScratchPins},
    cluster::Cluster,
};

const TC_ACT_SHOT: u32 = 2;
/// The node the engine plays: every pod it loads is moved onto it.
pub const NODE: &str = "kernel-engine";

/// Builds an Ethernet frame opening a connection: TCP SYN, a UDP datagram or an SCTP INIT.
pub fn opening_packet(
    src: IpAddr,
    dst: IpAddr,
    proto: Protocol,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut l4 = match proto {
        Protocol::Tcp => {
            let mut t = vec![0u8; 20];
            t[12] = 5 << 4;
            t[13] = 0x02;
            t
        }
        Protocol::Udp => vec![0u8; 8],
        // Common header + an INIT chunk header.
        Protocol::Sctp => {
            let mut s = vec![0u8; 12 + 20];
            s[12] = 1;
            s
        }
    };
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto.number(), 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            p.extend(ip);
        }
        (s, d) => {
            let to6 = |a: IpAddr| match a {
                IpAddr::V6(v) => v,
                IpAddr::V4(v) => v.to_ipv6_mapped(),
            };
            p.extend_from_slice(&0x86DDu16.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[proto.number(), 64]);
            ip.extend_from_slice(&to6(s).octets());
            ip.extend_from_slice(&to6(d).octets());
            p.extend(ip);
        }
    }
    p.extend(l4);
    p
}

/// The real programs with their own maps, reusable across clusters.
pub struct KernelEngine {
    dp: Datapath,
    alloc: Allocator,
    sport: u16,
    // Dropped after `dp` (fields drop in order): the pins outlive the maps' users.
    _pins: ScratchPins,
}

impl KernelEngine {
    pub fn new() -> Result<Self> {
        let pins = ScratchPins::new("kernel-engine");
        let mut dp =
            Datapath::load(pins.path()).context("loading the kernel programs (needs root)")?;
        dp.set_config(Config {
            report_interval_ns: 0,
            policy_gen: 1,
            enforce: 1,
            ..Config::default()
        })?;
        // Nobody reads events here: reserves that fail are counted and change nothing else.
        drop(dp.take_events()?);
        Ok(Self {
            dp,
            alloc: Allocator::default(),
            sport: 20000,
            _pins: pins,
        })
    }

    /// Loads `cluster` with every pod an endpoint of one virtual node, so both sides of each
    /// pair are enforced. Returns the cluster as loaded and the rule table.
    pub fn load(
        &mut self,
        cluster: &Cluster,
        opts: &Options,
    ) -> Result<(Cluster, HashMap<u32, RuleRef>)> {
        let mut local = cluster.clone();
        for p in &mut local.pods {
            std::sync::Arc::make_mut(p).node = NODE.into();
        }
        let want = compile::compile(&local, NODE, &[], opts, &mut self.alloc);
        // Fresh connections only: forget every verdict taken for an earlier cluster.
        self.apply(&want)?;
        Ok((local, self.alloc.rule_table()))
    }

    /// Makes the maps hold `want` (compiled for [`NODE`] elsewhere), reading back what they
    /// hold, and forgets every connection.
    pub fn apply(&mut self, want: &compile::Desired) -> Result<()> {
        self.dp.apply(want)?;
        self.forget_connections()
    }

    /// Performs map writes as the daemon does.
    pub fn write(&mut self, writes: &[super::incremental::MapWrite]) -> Result<()> {
        self.dp.write(writes).map(drop)
    }

    fn forget_connections(&mut self) -> Result<()> {
        let keys: Vec<_> = self
            .dp
            .conntrack_entries()?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        self.dp.remove_conntrack(&keys).map(drop)
    }

    /// Runs an arbitrary frame through one program; returns the program's return code.
    pub fn test_run(&mut self, prog: &str, pkt: &[u8]) -> Result<u32> {
        let mut o = TestRunOptions::new();
        o.data_in = Some(pkt);
        Ok(self
            .dp
            .prog(prog)?
            .test_run(o)
            .with_context(|| format!("BPF_PROG_TEST_RUN {prog}"))?
            .return_value)
    }

    /// Runs one connection-opening packet: through `from_pod` if the source is a local pod,
    /// then `to_pod` if the destination is. Returns (egress dropped, ingress dropped, entry).
    pub fn run(
        &mut self,
        src: IpAddr,
        src_is_pod: bool,
        dst: IpAddr,
        dst_is_pod: bool,
        proto: Protocol,
        port: u16,
    ) -> Result<(bool, bool, Option<CtEntry>)> {
        self.sport = if self.sport >= 60000 {
            20000
        } else {
            self.sport + 1
        };
        let sport = self.sport;
        let pkt = opening_packet(src, dst, proto, sport, port);
        let egress = src_is_pod && self.test_run(programs::FROM_POD, &pkt)? == TC_ACT_SHOT;
        let ingress =
            !egress && dst_is_pod && self.test_run(programs::TO_POD, &pkt)? == TC_ACT_SHOT;
        let key = crate::flows::ct_key(src, sport, dst, port, proto.number());
        let entry = self.dp.conntrack_get(&key)?;
        // Each run its own connection: a source port that comes round again must not find the
        // verdict an earlier map state gave.
        if entry.is_some() {
            self.dp.remove_conntrack(&[key])?;
        }
        Ok((egress, ingress, entry))
    }
}

/// "allowed", "denied" or "audit" from one run.
pub fn verdict_of(egress: bool, ingress: bool, entry: Option<&CtEntry>) -> &'static str {
    if egress || ingress {
        "denied"
    } else if entry.is_some_and(|e| e.flags & ct_flags::AUDIT != 0) {
        "audit"
    } else {
        "allowed"
    }
}

/// The verdict for every ordered pair of distinct pods on every probe, from the kernel.
pub fn matrix(
    cluster: &Cluster,
    opts: &Options,
    probe_list: &[(Protocol, u16)],
) -> Result<Vec<Cell>> {
    let mut k = KernelEngine::new()?;
    let (local, rules) = k.load(cluster, opts)?;
    let engine = super::Engine::new(&local, opts.clone());
    let pods = pods_sorted(&local);
    let mut out = Vec::new();
    for (proto, port, a, b) in super::matrix::probes(&pods, probe_list) {
        let (proto, port) = (&proto, &port);
        let (Some(src), Some(dst)) = (
            a.ips.first(),
            b.ips.iter().find(|ip| ip.is_ipv4() == a.ips[0].is_ipv4()),
        ) else {
            continue;
        };
        let (egress_shot, ingress_shot, entry) = k.run(*src, true, *dst, true, *proto, *port)?;
        let verdict = verdict_of(egress_shot, ingress_shot, entry.as_ref());
        let name = |r: u32| {
            rules.get(&r).map(|r: &RuleRef| {
                format!("{}/{} {} rule {}", r.namespace, r.name, r.direction, r.rule)
            })
        };
        let mut reason = Vec::new();
        if let Some(e) = entry {
            if let Some(n) = name(e.egress_rule) {
                reason.push(format!("egress allowed by {n}"));
            }
            if let Some(n) = name(e.ingress_rule) {
                reason.push(format!("ingress allowed by {n}"));
            }
        }
        let iso = |pod, ingress| {
            engine
                .isolating(pod, ingress)
                .iter()
                .map(|p| p.id())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if egress_shot {
            reason.push(format!("egress denied: isolated by {}", iso(a, false)));
        }
        if ingress_shot {
            reason.push(format!("ingress denied: isolated by {}", iso(b, true)));
        }
        if reason.is_empty() {
            reason.push(if verdict == "audit" {
                "passed in audit mode".into()
            } else {
                "no policy isolates either side".into()
            });
        }
        out.push(Cell {
            from: format!("{}/{}", a.namespace, a.name),
            to: format!("{}/{}", b.namespace, b.name),
            protocol: proto.to_string(),
            port: *port,
            verdict: verdict.into(),
            reason: reason.join("; "),
        });
    }
    Ok(out)
}
