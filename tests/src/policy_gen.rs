//! Random NetworkPolicy clusters as Kubernetes objects, for the property tests: selectors,
//! peers and ports drawn from small sets so that random policies often select random pods.
use std::collections::BTreeMap;

use serde_json::{json, Value};

/// xorshift64*: deterministic, seedable, no dependencies.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

pub const APPS: [&str; 3] = ["web", "api", "db"];
pub const TIERS: [&str; 2] = ["fe", "be"];

pub fn selector(r: &mut Rng) -> Value {
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

pub fn ns_selector(r: &mut Rng) -> Value {
    match r.below(3) {
        0 => json!({}),
        1 => json!({"matchLabels": {"team": if r.chance(50) { "a" } else { "b" }}}),
        _ => {
            json!({"matchExpressions": [{"key": "env", "operator": if r.chance(50) { "Exists" } else { "DoesNotExist" }}]})
        }
    }
}

pub fn peer(r: &mut Rng) -> Value {
    match r.below(4) {
        0 => json!({"podSelector": selector(r)}),
        1 => json!({"namespaceSelector": ns_selector(r)}),
        2 => json!({"podSelector": selector(r), "namespaceSelector": ns_selector(r)}),
        _ => json!({"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}}),
    }
}

pub fn port(r: &mut Rng) -> Value {
    match r.below(6) {
        0 => json!({"port": 80}),
        1 => json!({"port": 53, "protocol": "UDP"}),
        2 => json!({"port": "http"}),
        3 => json!({"port": "dns", "protocol": "UDP"}),
        4 => json!({"port": 8000, "endPort": 8100}),
        _ => json!({"protocol": "UDP"}),
    }
}

pub fn rules(r: &mut Rng, peer_key: &str) -> Value {
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

/// The number in environment variable `name` (a property test's size or seed), else `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A random policy `name` in namespace `ns` (one of `n_ns` namespaces `n0`, `n1`, ...).
pub fn policy(r: &mut Rng, name: &str, ns: &str) -> Value {
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
    let mut meta = json!({"name": name, "namespace": ns});
    if r.chance(15) {
        meta["annotations"] = json!({"observer.dev/audit": "true"});
    }
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec})
}

/// A random namespace `name`.
pub fn namespace(r: &mut Rng, name: &str) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert("team".into(), json!(if r.chance(50) { "a" } else { "b" }));
    if r.chance(50) {
        labels.insert("env".into(), json!("prod"));
    }
    let mut ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
    if r.chance(10) {
        ns["metadata"]["annotations"] = json!({"observer.dev/audit": "true"});
    }
    ns
}

/// A random pod `name` in `ns` with address `ip`, on `node` if given.
pub fn pod(r: &mut Rng, name: &str, ns: &str, ip: &str, node: Option<&str>) -> Value {
    let mut pl = serde_json::Map::new();
    pl.insert("app".into(), json!(r.pick(&APPS)));
    if r.chance(50) {
        pl.insert("tier".into(), json!(r.pick(&TIERS)));
    }
    let mut ports = Vec::new();
    if r.chance(70) {
        ports.push(json!({"name": "http", "containerPort": if r.chance(70) { 80 } else { 8080 }}));
    }
    if r.chance(50) {
        ports.push(json!({"name": "dns", "containerPort": 53, "protocol": "UDP"}));
    }
    let mut spec = json!({"containers": [{"name": "c", "image": "i", "ports": ports}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": pl},
        "spec": spec,
        "status": {"phase": "Running", "podIP": ip}
    })
}

/// The local node of [`World`].
pub const NODE: &str = "node-a";
pub const NAMESPACES: u64 = 3;

/// A random cluster as objects, keyed by (kind, namespace, name), that random single changes
/// move along: two nodes (`node-a` local), three namespaces, a few pods and policies.
pub struct World {
    pub objects: BTreeMap<(String, String, String), Value>,
    next: u64,
}

pub fn key(o: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&o["kind"]),
        s(&o["metadata"]["namespace"]),
        s(&o["metadata"]["name"]),
    )
}

pub fn node(name: &str, addr: &str, cidr: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"podCIDR": cidr},
        "status": {"addresses": [{"type": "InternalIP", "address": addr}]}})
}

pub fn service(name: &str, ns: &str, ip: &str, port: u16, node_port: bool) -> Value {
    let mut p = json!({"name": "p", "port": port, "protocol": "TCP"});
    if node_port {
        p["nodePort"] = json!(30000 + port);
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"type": if node_port { "NodePort" } else { "ClusterIP" }, "clusterIP": ip, "clusterIPs": [ip], "ports": [p]}})
}

impl World {
    pub fn random(r: &mut Rng) -> Self {
        let mut w = World {
            objects: BTreeMap::new(),
            next: 0,
        };
        w.put(node(NODE, "10.224.0.4", "10.244.1.0/24"));
        w.put(node("node-b", "10.224.0.5", "10.244.2.0/24"));
        for n in 0..NAMESPACES {
            w.put(namespace(r, &format!("n{n}")));
        }
        for _ in 0..4 + r.below(5) {
            let p = w.new_pod(r);
            w.put(p);
        }
        for i in 0..r.below(4) {
            let ns = format!("n{}", r.below(NAMESPACES));
            w.put(policy(r, &format!("pol{i}"), &ns));
        }
        w
    }

    pub fn put(&mut self, o: Value) {
        self.objects.insert(key(&o), o);
    }

    pub fn of_kind(&self, kind: &str) -> Vec<(String, String, String)> {
        self.objects
            .keys()
            .filter(|k| k.0 == kind)
            .cloned()
            .collect()
    }

    pub fn ip(&mut self, r: &mut Rng) -> String {
        self.next += 1;
        match r.below(10) {
            // Inside the generator's ipBlock, in and out of its except.
            0 => format!("203.0.113.{}", r.below(256)),
            // Another pod's address, as during an address's reuse.
            1 => format!("10.244.{}.{}", 1 + r.below(2), 10 + r.below(4)),
            _ => format!("10.244.{}.{}", 1 + r.below(2), 10 + self.next % 200),
        }
    }

    pub fn new_pod(&mut self, r: &mut Rng) -> Value {
        self.next += 1;
        let name = format!("p{}", self.next);
        let ns = format!("n{}", r.below(NAMESPACES));
        let ip = self.ip(r);
        let node = [Some(NODE), Some("node-b"), None][r.below(3) as usize];
        pod(r, &name, &ns, &ip, node)
    }

    /// One random change; returns what it was.
    pub fn change(&mut self, r: &mut Rng) -> String {
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
                self.put(pod(r, &k.2, &k.1, &ip, node.as_deref()));
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
                self.put(namespace(r, &ns));
                format!("relabel namespace {ns}")
            }
            6 | 7 => {
                let ns = format!("n{}", r.below(NAMESPACES));
                let name = format!("pol{}", r.below(5));
                self.put(policy(r, &name, &ns));
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
}
