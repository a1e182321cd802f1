//! Property: for random clusters, policies and packets, the kernel's verdict (real programs,
//! maps from the compiler, BPF_PROG_TEST_RUN) equals the reference engine's.
use std::net::IpAddr;

use observer::{
    cluster::{self, Cluster},
    policy::{
        kernel::{verdict_of, KernelEngine},
        Engine, EnginePeer, Options, Protocol, Side,
    },
};
use observer_common::ct_flags;
use observer_tests::policy_gen::{self as gen, Rng};

fn random_cluster(r: &mut Rng) -> Cluster {
    let mut c = Cluster::default();
    let mut ip = 10u8;
    let n_ns = 2 + r.below(2);
    for n in 0..n_ns {
        let ns = format!("n{n}");
        let mut obj = gen::namespace(r, &ns);
        // Audit namespaces are exercised by the policies' own annotation here.
        obj["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        cluster::add_object(&mut c, "gen", obj);
        for p in 0..2 + r.below(3) {
            let obj = gen::pod(r, &format!("p{p}"), &ns, &format!("10.244.1.{ip}"), None);
            cluster::add_object(&mut c, "gen", obj);
            ip += 1;
        }
    }
    for i in 0..r.below(4) {
        let ns = format!("n{}", r.below(n_ns));
        cluster::add_object(&mut c, "gen", gen::policy(r, &format!("pol{i}"), &ns));
    }
    assert!(
        c.errors.is_empty(),
        "generator produced invalid objects: {:?}",
        c.errors
    );
    c
}

#[test]
fn kernel_verdicts_equal_reference_verdicts_on_random_clusters() {
    observer_tests::ensure_root().unwrap();
    let clusters: u64 = gen::env_or("OBSERVER_PROPERTY_CLUSTERS", 1000);
    let seed: u64 = gen::env_or("OBSERVER_PROPERTY_SEED", 0x5eed_0b5e);
    let mut r = Rng(seed);
    let mut k = KernelEngine::new().unwrap();
    let probes = [
        (Protocol::Tcp, 80),
        (Protocol::Udp, 53),
        (Protocol::Tcp, 8080),
        (Protocol::Tcp, 8050),
        (Protocol::Udp, 5353),
    ];
    let externals: [IpAddr; 2] = [
        "203.0.113.10".parse().unwrap(),
        "203.0.113.200".parse().unwrap(),
    ];
    let (mut checked, mut denied, mut audit) = (0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    for n in 0..clusters {
        let c = random_cluster(&mut r);
        let opts = Options {
            ipblock_matches_pods: false,
            audit_all: false,
            deny_from_node: false,
        };
        let (local, _) = k.load(&c, &opts).unwrap();
        let engine = Engine::new(&local, opts.clone());
        let pods: Vec<_> = local.pods.iter().collect();
        for (proto, port) in probes {
            let mut cases: Vec<(EnginePeer<'_>, EnginePeer<'_>)> = Vec::new();
            for a in &pods {
                for b in &pods {
                    if a.name != b.name || a.namespace != b.namespace {
                        cases.push((EnginePeer::Pod(a), EnginePeer::Pod(b)));
                    }
                }
                for e in externals {
                    cases.push((EnginePeer::Pod(a), EnginePeer::External(e)));
                    cases.push((EnginePeer::External(e), EnginePeer::Pod(a)));
                }
            }
            for (src, dst) in cases {
                let ip = |p: &EnginePeer<'_>| match p {
                    EnginePeer::Pod(p) => (p.ips[0], true),
                    EnginePeer::External(ip) => (*ip, false),
                };
                let ((sip, spod), (dip, dpod)) = (ip(&src), ip(&dst));
                let want = engine.decide(src, dst, proto, port);
                let (eg, ing, entry) = k.run(sip, spod, dip, dpod, proto, port).unwrap();
                let got = verdict_of(eg, ing, entry.as_ref());
                checked += 1;
                denied += u64::from(got == "denied");
                audit += u64::from(got == "audit");
                // An audit verdict names the sides whose audited policies would drop it.
                let audited = |s: &Side| matches!(s, Side::Denied { audit: true, .. });
                let bits = entry.as_ref().map_or(0, |e| e.flags);
                let got_sides = (
                    bits & ct_flags::EGRESS_AUDIT != 0,
                    bits & ct_flags::INGRESS_AUDIT != 0,
                );
                let want_sides = (audited(&want.egress), audited(&want.ingress));
                if got == "audit" && got_sides != want_sides && failures.len() < 20 {
                    failures.push(format!(
                        "cluster {n}: {src} -> {dst} {proto}/{port}: audit sides (egress, \
                         ingress) kernel {got_sides:?}, reference {want_sides:?} ({})",
                        want.reason()
                    ));
                }
                if got != want.verdict.as_str() && failures.is_empty() {
                    eprintln!(
                        "first failing cluster {n}: pods {:#?}\nnamespaces {:?}\npolicies {:#?}",
                        local.pods, local.namespaces, local.policies
                    );
                }
                if got != want.verdict.as_str() && failures.len() < 20 {
                    failures.push(format!("cluster {n}: {src} -> {dst} {proto}/{port}: kernel {got}, reference {} ({})", want.verdict.as_str(), want.reason()));
                }
            }
        }
    }
    eprintln!("{clusters} clusters, {checked} packets: {denied} denied, {audit} audit");
    assert!(
        denied > checked / 20,
        "too few denials for a meaningful comparison: {denied}/{checked}"
    );
    assert!(
        failures.is_empty(),
        "kernel and reference disagree (seed {seed:#x}):\n{}",
        failures.join("\n")
    );
}
