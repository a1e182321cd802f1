//! Random NetworkPolicy clusters as Kubernetes objects, for the property tests: selectors,
//! peers and ports drawn from small sets so that random policies often select random pods.
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
