//! Property: for random clusters, policies and packets, the kernel's verdict (real programs,
//! maps from the compiler, BPF_PROG_TEST_RUN) equals the reference engine's.
use std::net::IpAddr;

use observer::{
    cluster::{self, Cluster},
    policy::{
        kernel::{verdict_of, KernelEngine},
        Engine, EnginePeer, Options, Protocol,
    },
};
use serde_json::{json, Value};

/// xorshift64*: deterministic, seedable, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

const APPS: [&str; 3] = ["web", "api", "db"];
const TIERS: [&str; 2] = ["fe", "be"];

fn selector(r: &mut Rng) -> Value {
    match r.below(5) {
        0 => json!({}),
        1 => json!({"matchLabels": {"app": r.pick(&APPS)}}),
        2 => {
            json!({"matchExpressions": [{"key": "app", "operator": "In", "values": [r.pick(&APPS), r.pick(&APPS)]}]})
        }
        3 => {
            json!({"matchExpressions": [{"key": "tier", "operator": if r.chance(50) { "Exists" } else { "DoesNotExist" }}]})
        }
        _ => {
            json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [r.pick(&APPS)]}]})
        }
    }
}

fn ns_selector(r: &mut Rng) -> Value {
    match r.below(3) {
        0 => json!({}),
        1 => json!({"matchLabels": {"team": if r.chance(50) { "a" } else { "b" }}}),
        _ => {
            json!({"matchExpressions": [{"key": "env", "operator": if r.chance(50) { "Exists" } else { "DoesNotExist" }}]})
        }
    }
}

fn peer(r: &mut Rng) -> Value {
    match r.below(4) {
        0 => json!({"podSelector": selector(r)}),
        1 => json!({"namespaceSelector": ns_selector(r)}),
        2 => json!({"podSelector": selector(r), "namespaceSelector": ns_selector(r)}),
        _ => json!({"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}}),
    }
}

fn port(r: &mut Rng) -> Value {
    match r.below(6) {
        0 => json!({"port": 80}),
        1 => json!({"port": 53, "protocol": "UDP"}),
        2 => json!({"port": "http"}),
        3 => json!({"port": "dns", "protocol": "UDP"}),
        4 => json!({"port": 8000, "endPort": 8100}),
        _ => json!({"protocol": "UDP"}),
    }
}

fn rules(r: &mut Rng, peer_key: &str) -> Value {
    let n = r.below(3);
    let mut v = Vec::new();
    for _ in 0..n {
        let mut rule = serde_json::Map::new();
        if r.chance(70) {
            let peers: Vec<Value> = (0..1 + r.below(2)).map(|_| peer(r)).collect();
            rule.insert(peer_key.into(), json!(peers));
        }
        if r.chance(60) {
            let ports: Vec<Value> = (0..1 + r.below(2)).map(|_| port(r)).collect();
            rule.insert("ports".into(), json!(ports));
        }
        v.push(Value::Object(rule));
    }
    json!(v)
}

fn random_cluster(r: &mut Rng) -> Cluster {
    let mut c = Cluster::default();
    let mut ip = 10u8;
    let n_ns = 2 + r.below(2);
    for n in 0..n_ns {
        let ns = format!("n{n}");
        let mut labels = serde_json::Map::new();
        labels.insert("team".into(), json!(if r.chance(50) { "a" } else { "b" }));
        if r.chance(50) {
            labels.insert("env".into(), json!("prod"));
        }
        cluster::add_object(
            &mut c,
            "gen",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}),
        );
        for p in 0..2 + r.below(3) {
            let mut pl = serde_json::Map::new();
            pl.insert("app".into(), json!(r.pick(&APPS)));
            if r.chance(50) {
                pl.insert("tier".into(), json!(r.pick(&TIERS)));
            }
            let mut ports = Vec::new();
            if r.chance(70) {
                ports.push(
                    json!({"name": "http", "containerPort": if r.chance(70) { 80 } else { 8080 }}),
                );
            }
            if r.chance(50) {
                ports.push(json!({"name": "dns", "containerPort": 53, "protocol": "UDP"}));
            }
            cluster::add_object(
                &mut c,
                "gen",
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("p{p}"), "namespace": ns, "labels": pl},
                    "spec": {"containers": [{"name": "c", "image": "i", "ports": ports}]},
                    "status": {"podIP": format!("10.244.1.{ip}")}
                }),
            );
            ip += 1;
        }
    }
    for i in 0..r.below(4) {
        let mut spec = serde_json::Map::new();
        spec.insert("podSelector".into(), selector(r));
        match r.below(4) {
            0 => {}
            1 => {
                spec.insert("policyTypes".into(), json!(["Ingress"]));
            }
            2 => {
                spec.insert("policyTypes".into(), json!(["Egress"]));
            }
            _ => {
                spec.insert("policyTypes".into(), json!(["Ingress", "Egress"]));
            }
        }
        if r.chance(80) {
            spec.insert("ingress".into(), rules(r, "from"));
        }
        if r.chance(60) {
            spec.insert("egress".into(), rules(r, "to"));
        }
        let mut meta =
            json!({"name": format!("pol{i}"), "namespace": format!("n{}", r.below(n_ns))});
        if r.chance(15) {
            meta["annotations"] = json!({"observer.dev/audit": "true"});
        }
        cluster::add_object(
            &mut c,
            "gen",
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}),
        );
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
    let clusters: u64 = std::env::var("OBSERVER_PROPERTY_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let seed: u64 = std::env::var("OBSERVER_PROPERTY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_0b5e);
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
