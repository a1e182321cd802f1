//! Property: the incremental compile always equals a full compile of the same cluster. Random
//! clusters go through random sequences of single changes (a pod relabelled, added, deleted,
//! moved, re-addressed or put on the host network; a namespace relabelled or audited; a
//! policy added, replaced or deleted; a node's addresses or pod CIDR; a Service); after each,
//! the incremental state is compared with a fresh full compile, and its change log with the
//! difference between the two states it moved between.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use observer::{
    cluster::{self, Cluster},
    policy::{
        compile::{self, Allocator, Desired},
        incremental::{Changes, Incremental},
        Options,
    },
};
use observer_tests::policy_gen::{self as gen, Rng};
use serde_json::{json, Value};

const NODE: &str = "node-a";
const NAMESPACES: u64 = 3;

/// The cluster as objects, keyed by (kind, namespace, name).
struct World {
    objects: BTreeMap<(String, String, String), Value>,
    next: u64,
}

fn key(o: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&o["kind"]),
        s(&o["metadata"]["namespace"]),
        s(&o["metadata"]["name"]),
    )
}

fn node(name: &str, addr: &str, cidr: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"podCIDR": cidr},
        "status": {"addresses": [{"type": "InternalIP", "address": addr}]}})
}

fn service(name: &str, ns: &str, ip: &str, port: u16, node_port: bool) -> Value {
    let mut p = json!({"name": "p", "port": port, "protocol": "TCP"});
    if node_port {
        p["nodePort"] = json!(30000 + port);
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"type": if node_port { "NodePort" } else { "ClusterIP" }, "clusterIP": ip, "clusterIPs": [ip], "ports": [p]}})
}

impl World {
    fn random(r: &mut Rng) -> Self {
        let mut w = World {
            objects: BTreeMap::new(),
            next: 0,
        };
        w.put(node(NODE, "10.224.0.4", "10.244.1.0/24"));
        w.put(node("node-b", "10.224.0.5", "10.244.2.0/24"));
        for n in 0..NAMESPACES {
            w.put(gen::namespace(r, &format!("n{n}")));
        }
        for _ in 0..4 + r.below(5) {
            let p = w.new_pod(r);
            w.put(p);
        }
        for i in 0..r.below(4) {
            let ns = format!("n{}", r.below(NAMESPACES));
            w.put(gen::policy(r, &format!("pol{i}"), &ns));
        }
        w
    }

    fn put(&mut self, o: Value) {
        self.objects.insert(key(&o), o);
    }

    fn of_kind(&self, kind: &str) -> Vec<(String, String, String)> {
        self.objects
            .keys()
            .filter(|k| k.0 == kind)
            .cloned()
            .collect()
    }

    fn ip(&mut self, r: &mut Rng) -> String {
        self.next += 1;
        match r.below(10) {
            // Inside the generator's ipBlock, in and out of its except.
            0 => format!("203.0.113.{}", r.below(256)),
            // Another pod's address, as during an address's reuse.
            1 => format!("10.244.{}.{}", 1 + r.below(2), 10 + r.below(4)),
            _ => format!("10.244.{}.{}", 1 + r.below(2), 10 + self.next % 200),
        }
    }

    fn new_pod(&mut self, r: &mut Rng) -> Value {
        self.next += 1;
        let name = format!("p{}", self.next);
        let ns = format!("n{}", r.below(NAMESPACES));
        let ip = self.ip(r);
        let node = [Some(NODE), Some("node-b"), None][r.below(3) as usize];
        gen::pod(r, &name, &ns, &ip, node)
    }

    /// One random change; returns what it was.
    fn change(&mut self, r: &mut Rng) -> String {
        let pods = self.of_kind("Pod");
        let pick = |r: &mut Rng, v: &[(String, String, String)]| {
            (!v.is_empty()).then(|| v[r.below(v.len() as u64) as usize].clone())
        };
        match r.below(12) {
            0 | 1 => {
                let Some(k) = pick(r, &pods) else {
                    return "nothing".into();
                };
                let old = self.objects[&k].clone();
                let node = old["spec"]["nodeName"].as_str().map(str::to_string);
                let ip = old["status"]["podIP"]
                    .as_str()
                    .unwrap_or("10.244.1.99")
                    .to_string();
                self.put(gen::pod(r, &k.2, &k.1, &ip, node.as_deref()));
                format!("relabel pod {}/{}", k.1, k.2)
            }
            2 => {
                let p = self.new_pod(r);
                let k = key(&p);
                self.put(p);
                format!("add pod {}/{}", k.1, k.2)
            }
            3 => {
                let Some(k) = pick(r, &pods) else {
                    return "nothing".into();
                };
                self.objects.remove(&k);
                format!("delete pod {}/{}", k.1, k.2)
            }
            4 => {
                let Some(k) = pick(r, &pods) else {
                    return "nothing".into();
                };
                let ip = self.ip(r);
                let o = self.objects.get_mut(&k).unwrap();
                match r.below(4) {
                    0 => o["spec"]["nodeName"] = json!(if r.chance(50) { NODE } else { "node-b" }),
                    1 => o["status"]["podIP"] = json!(ip),
                    2 => {
                        let on = o["spec"]["hostNetwork"].as_bool().unwrap_or(false);
                        o["spec"]["hostNetwork"] = json!(!on);
                    }
                    _ => {
                        o["status"].as_object_mut().unwrap().remove("podIP");
                    }
                }
                format!("move, re-address or re-network pod {}/{}", k.1, k.2)
            }
            5 => {
                let ns = format!("n{}", r.below(NAMESPACES));
                self.put(gen::namespace(r, &ns));
                format!("relabel namespace {ns}")
            }
            6 | 7 => {
                let ns = format!("n{}", r.below(NAMESPACES));
                let name = format!("pol{}", r.below(5));
                self.put(gen::policy(r, &name, &ns));
                format!("add or replace policy {ns}/{name}")
            }
            8 => {
                let Some(k) = pick(r, &self.of_kind("NetworkPolicy")) else {
                    return "nothing".into();
                };
                self.objects.remove(&k);
                format!("delete policy {}/{}", k.1, k.2)
            }
            9 => {
                let addr = ["10.224.0.5", "203.0.113.7", "203.0.113.140"][r.below(3) as usize];
                let cidr = ["10.244.2.0/24", "203.0.113.0/28"][r.below(2) as usize];
                if r.chance(70) {
                    self.put(node("node-b", addr, cidr));
                } else {
                    self.put(node(NODE, addr, "10.244.1.0/24"));
                }
                format!("node address {addr}, pod CIDR {cidr}")
            }
            10 => {
                let name = format!("s{}", r.below(3));
                if r.chance(30) {
                    self.objects
                        .remove(&("Service".into(), "n0".into(), name.clone()));
                } else {
                    let ip = format!("10.96.0.{}", 10 + r.below(3));
                    self.put(service(
                        &name,
                        "n0",
                        &ip,
                        80 + r.below(2) as u16,
                        r.chance(50),
                    ));
                }
                format!("service {name}")
            }
            _ => {
                let Some(k) = pick(r, &self.of_kind("NetworkPolicy")) else {
                    return "nothing".into();
                };
                let o = self.objects.get_mut(&k).unwrap();
                let audited = o["metadata"]["annotations"]["observer.dev/audit"] == "true";
                o["metadata"]["annotations"] =
                    json!({"observer.dev/audit": if audited { "false" } else { "true" }});
                format!("toggle audit of policy {}/{}", k.1, k.2)
            }
        }
    }

    /// The cluster as the watch caches give it: pods and policies in (namespace, name) order.
    fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for o in self.objects.values() {
            cluster::add_object(&mut c, "gen", o.clone());
        }
        c.pods
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        c.policies
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        c
    }
}

fn host(c: &Cluster) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = vec!["10.224.0.1".parse().unwrap()];
    for n in c.nodes.iter().filter(|n| n.name == NODE) {
        addrs.extend(n.addresses.iter().copied());
    }
    addrs
}

/// Applies a change log to the state it started from; fails if a recorded earlier value is
/// not what that state held.
fn replay(before: &Desired, changes: &Changes, after: &Desired) -> Result<Desired, String> {
    fn step<K: Ord + Copy + std::fmt::Debug, V: PartialEq + Copy + std::fmt::Debug>(
        map: &mut BTreeMap<K, V>,
        log: &BTreeMap<K, Option<V>>,
        want: &BTreeMap<K, V>,
        what: &str,
    ) -> Result<(), String> {
        for (k, old) in log {
            if map.get(k) != old.as_ref() {
                return Err(format!(
                    "{what} {k:?}: log says it held {old:?}, it held {:?}",
                    map.get(k)
                ));
            }
            match want.get(k) {
                Some(v) => map.insert(*k, *v),
                None => map.remove(k),
            };
        }
        Ok(())
    }
    let mut d = Desired {
        endpoints: before.endpoints.clone(),
        ipcache: before.ipcache.clone(),
        policy: before.policy.clone(),
        services: before.services.clone(),
    };
    step(
        &mut d.endpoints,
        &changes.endpoints,
        &after.endpoints,
        "endpoint",
    )?;
    step(&mut d.ipcache, &changes.ipcache, &after.ipcache, "ipcache")?;
    step(&mut d.policy, &changes.policy, &after.policy, "policy")?;
    step(
        &mut d.services,
        &changes.services,
        &after.services,
        "service",
    )?;
    Ok(d)
}

fn differences(a: &Desired, b: &Desired) -> String {
    fn diff<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
        what: &str,
        a: &BTreeMap<K, V>,
        b: &BTreeMap<K, V>,
    ) -> Vec<String> {
        let keys: BTreeSet<&K> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| a.get(k) != b.get(k))
            .take(5)
            .map(|k| {
                format!(
                    "{what} {k:?}: incremental {:?}, full {:?}",
                    a.get(k),
                    b.get(k)
                )
            })
            .collect()
    }
    [
        diff("endpoint", &a.endpoints, &b.endpoints),
        diff("ipcache", &a.ipcache, &b.ipcache),
        diff("policy", &a.policy, &b.policy),
        diff("service", &a.services, &b.services),
    ]
    .concat()
    .join("\n")
}

#[test]
fn incremental_compile_equals_full_compile_after_every_change() {
    let sequences: u64 = std::env::var("OBSERVER_PROPERTY_SEQUENCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let steps = 40;
    let seed: u64 = std::env::var("OBSERVER_PROPERTY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x1ac7_e5ed);
    let mut r = Rng(seed);
    let (mut checked, mut nonempty) = (0u64, 0u64);
    for s in 0..sequences {
        let opts = Options {
            ipblock_matches_pods: r.chance(30),
            audit_all: r.chance(10),
            deny_from_node: false,
        };
        let mut w = World::random(&mut r);
        let mut alloc = Allocator::default();
        let mut inc = Incremental::new(NODE, &opts);
        let mut before = Desired::default();
        let mut history = vec!["initial cluster".to_string()];
        for step in 0..=steps {
            if step > 0 {
                history.push(w.change(&mut r));
            }
            let c = w.cluster();
            let addrs = host(&c);
            inc.update(&c, &addrs, &mut alloc);
            let changes = inc.take_changes();
            let full = compile::compile(&c, NODE, &addrs, &opts, &mut alloc.clone());
            let ctx = || {
                format!(
                    "sequence {s} step {step} (seed {seed:#x}, {opts:?}); changes so far:\n  {}",
                    history.join("\n  ")
                )
            };
            assert!(
                inc.desired() == &full,
                "{}\n{}",
                differences(inc.desired(), &full),
                ctx()
            );
            let replayed = replay(&before, &changes, &full)
                .unwrap_or_else(|e| panic!("change log: {e}\n{}", ctx()));
            assert!(
                replayed == full,
                "the change log misses entries:\n{}\n{}",
                differences(&replayed, &full),
                ctx()
            );
            checked += 1;
            nonempty += u64::from(!changes.is_empty());
            before = full;
        }
    }
    eprintln!("{checked} states compared, {nonempty} with map changes");
    assert!(
        nonempty > checked / 3,
        "too few changes reached the maps: {nonempty}/{checked}"
    );
}
