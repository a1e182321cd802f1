//! Validated NetworkPolicy model. Every error names the policy and the field.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NetworkPolicy {}/{}: {}: {}",
            self.namespace, self.name, self.field, self.message
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A label selector; the empty selector matches everything.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Selector {
    /// Sorted by key: a vector, since a map costs a whole tree node for one label and a
    /// cluster holds one selector per peer of every policy.
    pub labels: Vec<(String, String)>,
    pub exprs: Vec<(String, Op)>,
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|(k, op)| match op {
                Op::In(vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Op::NotIn(vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Op::Exists => labels.contains_key(k),
                Op::DoesNotExist => !labels.contains_key(k),
            })
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.exprs.is_empty()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for (k, op) in &self.exprs {
            parts.push(match op {
                Op::In(v) => format!("{k} in ({})", v.join(",")),
                Op::NotIn(v) => format!("{k} notin ({})", v.join(",")),
                Op::Exists => k.clone(),
                Op::DoesNotExist => format!("!{k}"),
            });
        }
        f.write_str(&parts.join(","))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerSpec {
    /// Pods of the policy's namespace matching the selector.
    Pods(Selector),
    /// All pods of namespaces matching the selector.
    Namespaces(Selector),
    /// Pods matching `pods` in namespaces matching `namespaces` (one peer, both selectors: AND).
    PodsInNamespaces {
        namespaces: Selector,
        pods: Selector,
    },
    /// Addresses in `cidr` but not in any of `except`.
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// Every port of the protocol.
    Any,
    /// `port` to `end` inclusive (a single port has `end == port`).
    Range(u16, u16),
    /// A container port name, resolved against the destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRule {
    pub protocol: Protocol,
    pub port: PortSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Empty: every peer.
    pub peers: Vec<PeerSpec>,
    /// Empty: every port and protocol.
    pub ports: Vec<PortRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// `None` when the podSelector itself is invalid: the policy then isolates every pod of its
    /// namespace.
    pub pod_selector: Option<Selector>,
    pub ingress_isolates: bool,
    pub egress_isolates: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// Why the policy allows nothing, if it is invalid.
    pub errors: Vec<PolicyError>,
    /// Set by the audit annotation (`observer.dev/audit: "true"`).
    pub audit: bool,
}

pub const AUDIT_ANNOTATION: &str = "observer.dev/audit";

impl Policy {
    pub fn valid(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

struct Ctx<'a> {
    ns: &'a str,
    name: &'a str,
    errors: Vec<PolicyError>,
}

impl Ctx<'_> {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(PolicyError {
            namespace: self.ns.to_string(),
            name: self.name.to_string(),
            field: field.into(),
            message: message.into(),
        });
    }
}

fn selector(cx: &mut Ctx<'_>, field: &str, s: &LabelSelector) -> Option<Selector> {
    let mut out = Selector {
        labels: s
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        exprs: Vec::new(),
    };
    let mut ok = true;
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        let values = e.values.clone().unwrap_or_default();
        let op = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                cx.err(
                    format!("{f}.values"),
                    format!("operator {} needs at least one value", e.operator),
                );
                ok = false;
                continue;
            }
            "In" => Op::In(values),
            "NotIn" => Op::NotIn(values),
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                cx.err(
                    format!("{f}.values"),
                    format!("operator {} takes no values", e.operator),
                );
                ok = false;
                continue;
            }
            "Exists" => Op::Exists,
            "DoesNotExist" => Op::DoesNotExist,
            other => {
                cx.err(
                    format!("{f}.operator"),
                    format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"),
                );
                ok = false;
                continue;
            }
        };
        if e.key.is_empty() {
            cx.err(format!("{f}.key"), "empty key");
            ok = false;
            continue;
        }
        out.exprs.push((e.key.clone(), op));
    }
    out.exprs.shrink_to_fit();
    ok.then_some(out)
}

fn cidr(cx: &mut Ctx<'_>, field: &str, s: &str) -> Option<IpNet> {
    match s.parse::<IpNet>() {
        Ok(n) => Some(n),
        Err(_) => {
            // A bare address is not a CIDR in the API either.
            let hint = if s.parse::<IpAddr>().is_ok() {
                " (add a prefix length, e.g. /32)"
            } else {
                ""
            };
            cx.err(field, format!("{s:?} is not a CIDR{hint}"));
            None
        }
    }
}

fn peer(cx: &mut Ctx<'_>, field: &str, p: &NetworkPolicyPeer) -> Option<PeerSpec> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            cx.err(
                field,
                "ipBlock cannot be combined with podSelector or namespaceSelector in one peer",
            );
            None
        }
        (None, None, Some(ip)) => {
            let net = cidr(cx, &format!("{field}.ipBlock.cidr"), &ip.cidr)?;
            let mut except = Vec::new();
            for (i, e) in ip.except.iter().flatten().enumerate() {
                let f = format!("{field}.ipBlock.except[{i}]");
                let x = cidr(cx, &f, e)?;
                if !net.contains(&x) {
                    cx.err(f, format!("{e} is not inside cidr {}", ip.cidr));
                    return None;
                }
                except.push(x);
            }
            Some(PeerSpec::IpBlock { cidr: net, except })
        }
        (Some(ps), None, None) => Some(PeerSpec::Pods(selector(
            cx,
            &format!("{field}.podSelector"),
            ps,
        )?)),
        (None, Some(ns), None) => Some(PeerSpec::Namespaces(selector(
            cx,
            &format!("{field}.namespaceSelector"),
            ns,
        )?)),
        (Some(ps), Some(ns), None) => Some(PeerSpec::PodsInNamespaces {
            namespaces: selector(cx, &format!("{field}.namespaceSelector"), ns)?,
            pods: selector(cx, &format!("{field}.podSelector"), ps)?,
        }),
        (None, None, None) => {
            cx.err(
                field,
                "a peer needs podSelector, namespaceSelector or ipBlock",
            );
            None
        }
    }
}

fn port(cx: &mut Ctx<'_>, field: &str, p: &NetworkPolicyPort) -> Option<PortRule> {
    let protocol = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => match Protocol::parse(s) {
            Some(pr) => pr,
            None => {
                cx.err(
                    format!("{field}.protocol"),
                    format!("unsupported protocol {s:?} (TCP, UDP, SCTP)"),
                );
                return None;
            }
        },
    };
    let spec = match (&p.port, p.end_port) {
        (None, None) => PortSpec::Any,
        (None, Some(_)) => {
            cx.err(format!("{field}.endPort"), "endPort needs a numeric port");
            return None;
        }
        (Some(IntOrString::Int(n)), end) => {
            if !(1..=65535).contains(n) {
                cx.err(
                    format!("{field}.port"),
                    format!("{n} is not a port (1-65535)"),
                );
                return None;
            }
            let end = end.unwrap_or(*n);
            if end < *n || end > 65535 {
                cx.err(
                    format!("{field}.endPort"),
                    format!("{end} must be between port {n} and 65535"),
                );
                return None;
            }
            PortSpec::Range(*n as u16, end as u16)
        }
        (Some(IntOrString::String(s)), end) => {
            if end.is_some() {
                cx.err(
                    format!("{field}.endPort"),
                    "endPort cannot be used with a named port",
                );
                return None;
            }
            // Numbers written as strings are names in the API: a container port name must
            // contain a letter.
            if s.is_empty() || s.len() > 15 || !s.chars().any(|c| c.is_ascii_alphabetic()) {
                cx.err(
                    format!("{field}.port"),
                    format!("{s:?} is not a valid port name"),
                );
                return None;
            }
            PortSpec::Named(s.clone())
        }
    };
    Some(PortRule {
        protocol,
        port: spec,
    })
}

fn rules(
    cx: &mut Ctx<'_>,
    dir: &str,
    peer_field: &str,
    items: impl Iterator<
        Item = (
            Option<Vec<NetworkPolicyPeer>>,
            Option<Vec<NetworkPolicyPort>>,
        ),
    >,
) -> Vec<Rule> {
    let mut out = Vec::new();
    for (i, (peers, ports)) in items.enumerate() {
        let mut rule = Rule {
            peers: Vec::new(),
            ports: Vec::new(),
        };
        let mut ok = true;
        for (j, p) in peers.iter().flatten().enumerate() {
            match peer(cx, &format!("spec.{dir}[{i}].{peer_field}[{j}]"), p) {
                Some(p) => rule.peers.push(p),
                None => ok = false,
            }
        }
        for (j, p) in ports.iter().flatten().enumerate() {
            match port(cx, &format!("spec.{dir}[{i}].ports[{j}]"), p) {
                Some(p) => rule.ports.push(p),
                None => ok = false,
            }
        }
        if ok {
            out.push(rule);
        }
    }
    out
}

/// The rules without spare capacity: a cluster keeps every policy it enforces.
fn shrunk(mut rules: Vec<Rule>) -> Vec<Rule> {
    for r in &mut rules {
        r.peers.shrink_to_fit();
        r.ports.shrink_to_fit();
    }
    rules.shrink_to_fit();
    rules
}

/// Validates a NetworkPolicy. Always returns a policy; an invalid one has `errors` and no rules.
pub fn compile(np: &NetworkPolicy) -> Policy {
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = np.metadata.name.clone().unwrap_or_default();
    let mut cx = Ctx {
        ns: &namespace,
        name: &name,
        errors: Vec::new(),
    };
    if name.is_empty() {
        cx.err("metadata.name", "missing");
    }
    let audit = np
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(AUDIT_ANNOTATION))
        .is_some_and(|v| v == "true");
    let spec = np.spec.clone().unwrap_or_default();
    let pod_selector = match &spec.pod_selector {
        None => Some(Selector::default()),
        Some(s) => selector(&mut cx, "spec.podSelector", s),
    };
    let mut types = Vec::new();
    for (i, t) in spec.policy_types.iter().flatten().enumerate() {
        match t.as_str() {
            "Ingress" | "Egress" => types.push(t.clone()),
            other => cx.err(
                format!("spec.policyTypes[{i}]"),
                format!("unknown policy type {other:?} (Ingress, Egress)"),
            ),
        }
    }
    // The API server's defaulting, so files on disk read like what it serves: with no (or an
    // empty) `policyTypes`, Ingress always, Egress only when `spec.egress` has a rule
    // (`egress: []` does not isolate egress).
    let defaulted = spec.policy_types.as_ref().is_none_or(|t| t.is_empty());
    let (ingress_isolates, egress_isolates) = if defaulted {
        (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))
    } else {
        (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        )
    };
    let ingress = rules(
        &mut cx,
        "ingress",
        "from",
        spec.ingress
            .iter()
            .flatten()
            .map(|r| (r.from.clone(), r.ports.clone())),
    );
    let egress = rules(
        &mut cx,
        "egress",
        "to",
        spec.egress
            .iter()
            .flatten()
            .map(|r| (r.to.clone(), r.ports.clone())),
    );
    let errors = cx.errors;
    let valid = errors.is_empty();
    Policy {
        namespace: namespace.clone(),
        name: name.clone(),
        pod_selector,
        // An invalid policy that fails to parse its types still isolates in both directions.
        ingress_isolates: ingress_isolates || (!valid && types.is_empty() && !defaulted),
        egress_isolates: egress_isolates || (!valid && types.is_empty() && !defaulted),
        ingress: if valid { shrunk(ingress) } else { Vec::new() },
        egress: if valid { shrunk(egress) } else { Vec::new() },
        errors,
        audit,
    }
}
