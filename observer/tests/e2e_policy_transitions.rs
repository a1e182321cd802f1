//! Property: while the daemon writes a change to the maps, no state in between lets through a
//! connection that both the old and the new cluster deny. Random clusters go through random
//! single changes (as in `policy_incremental`); the incremental compile's writes go into the
//! real maps one at a time, and after each write every pair of addresses the reference engine
//! denies in both states is tried against the real programs (BPF_PROG_TEST_RUN). After the
//! last write, the kernel's verdicts must be the new cluster's.
use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use observer::{
    cluster::{self, Cluster, PodInfo},
    policy::{
        compile::Allocator,
        incremental::{ordered_writes, Incremental},
        kernel::{self, verdict_of, KernelEngine},
        Engine, EnginePeer, Options, Protocol,
    },
};
use observer_tests::policy_gen::{self as gen, Rng, World};

const PROBES: [(Protocol, u16); 4] = [
    (Protocol::Tcp, 80),
    (Protocol::Udp, 53),
    (Protocol::Tcp, 8080),
    (Protocol::Tcp, 8050),
];

/// The cluster with every pod on the kernel engine's node, both sides of each pair enforced.
fn cluster_of(w: &World) -> Cluster {
    let mut c = Cluster::default();
    for o in w.objects.values() {
        cluster::add_object(&mut c, "gen", o.clone());
    }
    for p in &mut c.pods {
        Arc::make_mut(p).node = kernel::NODE.into();
    }
    c.pods
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    c.policies
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    c
}

/// The pod an address stands for: the last of its pods in (namespace, name) order, as the
/// compiled ipcache has it.
fn peer<'a>(c: &'a Cluster, ip: IpAddr) -> EnginePeer<'a> {
    c.pods
        .iter()
        .rev()
        .find(|p| !p.host_network && p.ips.contains(&ip))
        .map(|p| EnginePeer::Pod(p.as_ref()))
        .unwrap_or(EnginePeer::External(ip))
}

fn addresses(c: &Cluster) -> BTreeSet<IpAddr> {
    c.pods
        .iter()
        .filter(|p: &&Arc<PodInfo>| !p.host_network)
        .flat_map(|p| p.ips.iter().copied())
        .filter(|ip| ip.is_ipv4())
        .collect()
}

fn denied(e: &Engine<'_>, c: &Cluster, s: IpAddr, d: IpAddr, proto: Protocol, port: u16) -> bool {
    e.decide(peer(c, s), peer(c, d), proto, port)
        .verdict
        .as_str()
        == "denied"
}

#[test]
fn no_state_between_two_policies_allows_what_both_deny() {
    observer_tests::ensure_root().unwrap();
    let sequences: u64 = gen::env_or("OBSERVER_PROPERTY_SEQUENCES", 80);
    let steps = 25;
    let seed: u64 = gen::env_or("OBSERVER_PROPERTY_SEED", 0x7a11_5afe);
    let mut r = Rng(seed);
    let mut k = KernelEngine::new().unwrap();
    let (mut states, mut tried, mut final_checked) = (0u64, 0u64, 0u64);
    for s in 0..sequences {
        let opts = Options {
            ipblock_matches_pods: r.chance(30),
            audit_all: false,
            deny_from_node: false,
        };
        let mut w = World::random(&mut r);
        let mut alloc = Allocator::default();
        let mut inc = Incremental::new(kernel::NODE, &opts);
        let mut old = cluster_of(&w);
        inc.update(&old, &[], &mut alloc);
        inc.take_changes();
        k.apply(inc.desired()).unwrap();
        for step in 1..=steps {
            let what = w.change(&mut r);
            let new = cluster_of(&w);
            inc.update(&new, &[], &mut alloc);
            let writes = ordered_writes(&inc.take_changes(), inc.desired());
            let (eo, en) = (
                Engine::new(&old, opts.clone()),
                Engine::new(&new, opts.clone()),
            );
            let ips: Vec<IpAddr> = addresses(&old)
                .union(&addresses(&new))
                .copied()
                .chain(["203.0.113.10".parse().unwrap()])
                .collect();
            // Connections both states deny.
            let mut both = Vec::new();
            for &a in &ips {
                for &b in &ips {
                    for (proto, port) in PROBES {
                        if a != b
                            && denied(&eo, &old, a, b, proto, port)
                            && denied(&en, &new, a, b, proto, port)
                        {
                            both.push((a, b, proto, port));
                        }
                    }
                }
            }
            for (i, wr) in writes.iter().enumerate() {
                k.write(std::slice::from_ref(wr)).unwrap();
                states += 1;
                for &(a, b, proto, port) in &both {
                    let (eg, ing, entry) = k.run(a, true, b, true, proto, port).unwrap();
                    tried += 1;
                    let got = verdict_of(eg, ing, entry.as_ref());
                    assert_eq!(
                        got,
                        "denied",
                        "sequence {s} step {step} ({what}), after write {i} of {} ({wr:?}): \
                         {a} -> {b} {proto}/{port} went through ({got}) though the old and the \
                         new cluster both deny it; writes: {writes:#?}",
                        writes.len()
                    );
                }
            }
            // After the last write: the new cluster's verdicts.
            for &a in &ips {
                for (&b, (proto, port)) in
                    ips.iter().flat_map(|b| PROBES.iter().map(move |p| (b, *p)))
                {
                    if a == b {
                        continue;
                    }
                    let want = en.decide(peer(&new, a), peer(&new, b), proto, port);
                    let (eg, ing, entry) = k.run(a, true, b, true, proto, port).unwrap();
                    let got = verdict_of(eg, ing, entry.as_ref());
                    assert_eq!(
                        got,
                        want.verdict.as_str(),
                        "sequence {s} step {step} ({what}): {a} -> {b} {proto}/{port}: kernel \
                         {got}, reference {} ({})",
                        want.verdict.as_str(),
                        want.reason()
                    );
                    final_checked += 1;
                }
            }
            old = new;
        }
    }
    eprintln!(
        "{sequences} sequences: {states} intermediate map states, {tried} denied-in-both \
         connections tried, {final_checked} final verdicts"
    );
    assert!(tried > 1000, "too few connections tried: {tried}");
}
