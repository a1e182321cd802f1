//! The reference semantics engine: pure Rust, no kernel. Decides whether a connection from a
//! source to a destination on (protocol, port) is allowed by the cluster's NetworkPolicies, and
//! says why.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::Serialize;

use super::model::{PeerSpec, Policy, PortSpec, Protocol, Rule};
use crate::cluster::{Cluster, PodInfo};

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Whether ipBlock peers match pod IPs. Upstream leaves it to the implementation; the default
    /// (false) treats ipBlock as the cluster-external addresses it is meant for, as Cilium does:
    /// pods are selected by labels.
    pub ipblock_matches_pods: bool,
    /// Every would-be drop passes and is reported as `audit`.
    pub audit_all: bool,
    /// Judge traffic from a pod's own node by policy like any other source. Off by default:
    /// Kubernetes allows it whatever the isolation (kubelet probes).
    pub deny_from_node: bool,
}

/// One side of a connection.
#[derive(Clone, Copy, Debug)]
pub enum Peer<'a> {
    Pod(&'a PodInfo),
    /// An address that is not a pod of the cluster.
    External(IpAddr),
}

impl Peer<'_> {
    fn pod(&self) -> Option<&PodInfo> {
        match self {
            Peer::Pod(p) => Some(p),
            Peer::External(_) => None,
        }
    }

    fn ip(&self) -> Option<IpAddr> {
        match self {
            Peer::Pod(p) => p.ips.first().copied(),
            Peer::External(ip) => Some(*ip),
        }
    }
}

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Pod(p) => write!(f, "{}/{}", p.namespace, p.name),
            Peer::External(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allowed,
    Denied,
    /// Denied by policy, but every isolating policy is in audit mode: the traffic passes.
    Audit,
}

impl Verdict {
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Audit => "audit",
        }
    }
}

/// The outcome in one direction (egress at the source, ingress at the destination).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Side {
    /// The endpoint is not a pod of the cluster: nothing to enforce there.
    NotApplicable,
    /// No policy selects the pod in this direction.
    NotIsolated,
    /// A pod talking to itself.
    Loopback,
    /// Ingress from the pod's own node: always allowed (kubelet probes) unless
    /// `deny_from_node`.
    FromNode,
    Allowed {
        policy: String,
        rule: usize,
    },
    Denied {
        isolated_by: Vec<String>,
        invalid: Vec<String>,
        audit: bool,
    },
}

impl Side {
    /// Whether traffic gets through in this direction (audited drops do).
    fn passes(&self) -> bool {
        !matches!(self, Side::Denied { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub egress: Side,
    pub ingress: Side,
}

impl Decision {
    /// One line naming the cause, for matrices and flow logs.
    pub fn reason(&self) -> String {
        let side = |dir: &str, s: &Side| {
            match s {
            Side::Allowed { policy, rule } => {
                Some(format!("{dir} allowed by {policy} rule {rule}"))
            }
            Side::Denied {
                isolated_by,
                invalid,
                audit,
            } => {
                let mut r = format!(
                    "{dir} denied: isolated by {} and no rule matches",
                    isolated_by.join(", ")
                );
                if !invalid.is_empty() {
                    r.push_str(&format!(
                        " (invalid, allowing nothing: {})",
                        invalid.join(", ")
                    ));
                }
                if *audit {
                    r.push_str(" [audit]");
                }
                Some(r)
            }
            Side::Loopback => Some("a pod talking to itself is always allowed".into()),
            Side::FromNode => Some(format!(
                "{dir} allowed: traffic from the pod's own node is always allowed (kubelet probes; --deny-from-node to judge it)"
            )),
            _ => None,
        }
        };
        let mut parts: Vec<String> = [side("egress", &self.egress), side("ingress", &self.ingress)]
            .into_iter()
            .flatten()
            .collect();
        if parts.is_empty() {
            parts.push("no policy isolates either side".into());
        }
        parts.dedup();
        parts.join("; ")
    }
}

pub struct Engine<'a> {
    pub cluster: &'a Cluster,
    pub opts: Options,
    empty: BTreeMap<String, String>,
}

enum Dir {
    Ingress,
    Egress,
}

impl<'a> Engine<'a> {
    pub fn new(cluster: &'a Cluster, opts: Options) -> Self {
        Self {
            cluster,
            opts,
            empty: BTreeMap::new(),
        }
    }

    fn ns_labels(&self, ns: &str) -> &BTreeMap<String, String> {
        self.cluster.namespaces.get(ns).unwrap_or(&self.empty)
    }

    /// Policies that select `pod` and isolate it in `dir`, in name order.
    pub fn isolating(&self, pod: &PodInfo, ingress: bool) -> Vec<&'a Policy> {
        let mut v: Vec<&Policy> = self
            .cluster
            .policies
            .iter()
            .map(|p| &**p)
            .filter(|p| *p.namespace == *pod.namespace)
            .filter(|p| {
                if ingress {
                    p.ingress_isolates
                } else {
                    p.egress_isolates
                }
            })
            // An unusable podSelector selects the whole namespace: fail closed.
            .filter(|p| {
                p.pod_selector
                    .as_ref()
                    .is_none_or(|s| s.matches(&pod.labels))
            })
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    fn peer_matches(&self, policy: &Policy, spec: &PeerSpec, remote: &Peer<'_>) -> bool {
        match spec {
            PeerSpec::Pods(sel) => remote
                .pod()
                .is_some_and(|p| *p.namespace == *policy.namespace && sel.matches(&p.labels)),
            PeerSpec::Namespaces(ns) => remote
                .pod()
                .is_some_and(|p| ns.matches(self.ns_labels(&p.namespace))),
            PeerSpec::PodsInNamespaces { namespaces, pods } => remote.pod().is_some_and(|p| {
                namespaces.matches(self.ns_labels(&p.namespace)) && pods.matches(&p.labels)
            }),
            PeerSpec::IpBlock { cidr, except } => {
                if remote.pod().is_some() && !self.opts.ipblock_matches_pods {
                    return false;
                }
                remote
                    .ip()
                    .is_some_and(|ip| cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip)))
            }
        }
    }

    fn port_matches(rule: &Rule, dst: &Peer<'_>, proto: Protocol, port: u16) -> bool {
        rule.ports.is_empty()
            || rule.ports.iter().any(|pr| {
                pr.protocol == proto
                    && match &pr.port {
                        PortSpec::Any => true,
                        PortSpec::Range(lo, hi) => (*lo..=*hi).contains(&port),
                        // Resolved against the destination pod's container ports, for ingress
                        // and egress alike.
                        PortSpec::Named(name) => dst.pod().is_some_and(|p| {
                            p.ports
                                .iter()
                                .any(|(n, pn, pp)| n == name && *pn == port && *pp == proto)
                        }),
                    }
            })
    }

    fn audited(&self, p: &Policy) -> bool {
        self.opts.audit_all || p.audit || self.cluster.audit_namespaces.contains(&p.namespace)
    }

    /// The outcome in one direction, counting only the policies `include` keeps.
    fn side(
        &self,
        dir: &Dir,
        local: &PodInfo,
        remote: &Peer<'_>,
        dst: &Peer<'_>,
        proto: Protocol,
        port: u16,
        include: impl Fn(&Policy) -> bool,
    ) -> Side {
        let ingress = matches!(dir, Dir::Ingress);
        let isolating: Vec<&Policy> = self
            .isolating(local, ingress)
            .into_iter()
            .filter(|p| include(p))
            .collect();
        if isolating.is_empty() {
            return Side::NotIsolated;
        }
        for p in &isolating {
            let rules = if ingress { &p.ingress } else { &p.egress };
            for (i, r) in rules.iter().enumerate() {
                let peer_ok =
                    r.peers.is_empty() || r.peers.iter().any(|s| self.peer_matches(p, s, remote));
                if peer_ok && Self::port_matches(r, dst, proto, port) {
                    return Side::Allowed {
                        policy: p.id(),
                        rule: i,
                    };
                }
            }
        }
        Side::Denied {
            isolated_by: isolating.iter().map(|p| p.id()).collect(),
            invalid: isolating
                .iter()
                .filter(|p| !p.valid())
                .map(|p| p.id())
                .collect(),
            audit: false,
        }
    }

    /// Enforcement counts only policies not in audit mode; audit mode reports what the audited
    /// policies would have dropped. So an audited policy never changes what passes: neither its
    /// isolation nor its allow rules.
    fn direction(
        &self,
        dir: Dir,
        local: &PodInfo,
        remote: &Peer<'_>,
        dst: &Peer<'_>,
        proto: Protocol,
        port: u16,
    ) -> Side {
        let enforced = self.side(&dir, local, remote, dst, proto, port, |p| !self.audited(p));
        if !enforced.passes() {
            return enforced;
        }
        match self.side(&dir, local, remote, dst, proto, port, |_| true) {
            Side::Denied {
                isolated_by,
                invalid,
                ..
            } => Side::Denied {
                isolated_by,
                invalid,
                audit: true,
            },
            all => match enforced {
                Side::Allowed { .. } => enforced,
                _ => all,
            },
        }
    }

    /// Whether `peer` is an address of `pod`'s node (hostNetwork pods carry those too).
    fn is_node_of(&self, peer: &Peer<'_>, pod: &PodInfo) -> bool {
        let ip = match peer {
            Peer::External(ip) => *ip,
            Peer::Pod(p) if p.host_network && p.node == pod.node => return true,
            Peer::Pod(_) => return false,
        };
        self.cluster
            .nodes
            .iter()
            .any(|n| *n.name == *pod.node && n.addresses.contains(&ip))
    }

    pub fn decide(&self, src: Peer<'_>, dst: Peer<'_>, proto: Protocol, port: u16) -> Decision {
        if let (Peer::Pod(a), Peer::Pod(b)) = (&src, &dst) {
            if a.namespace == b.namespace && a.name == b.name {
                return Decision {
                    verdict: Verdict::Allowed,
                    egress: Side::Loopback,
                    ingress: Side::Loopback,
                };
            }
        }
        let egress = match src.pod() {
            Some(s) => self.direction(Dir::Egress, s, &dst, &dst, proto, port),
            None => Side::NotApplicable,
        };
        let ingress = match dst.pod() {
            Some(d) if !self.opts.deny_from_node && self.is_node_of(&src, d) => Side::FromNode,
            Some(d) => self.direction(Dir::Ingress, d, &src, &dst, proto, port),
            None => Side::NotApplicable,
        };
        let enforced_deny = |s: &Side| matches!(s, Side::Denied { audit: false, .. });
        let verdict = if enforced_deny(&egress) || enforced_deny(&ingress) {
            Verdict::Denied
        } else if egress.passes() && ingress.passes() {
            Verdict::Allowed
        } else {
            Verdict::Audit
        };
        Decision {
            verdict,
            egress,
            ingress,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster;

    fn cluster_with(policies: &str) -> Cluster {
        let mut c = Cluster::default();
        let base = r#"
- {apiVersion: v1, kind: Namespace, metadata: {name: x, labels: {ns: x}}}
- {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: x, labels: {pod: a}}, spec: {containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]}, status: {podIP: 10.0.0.1}}
- {apiVersion: v1, kind: Pod, metadata: {name: b, namespace: x, labels: {pod: b}}, spec: {containers: [{name: c, image: i}]}, status: {podIP: 10.0.0.2}}
- {apiVersion: v1, kind: Pod, metadata: {name: c, namespace: x, labels: {pod: c}}, spec: {containers: [{name: c, image: i}]}, status: {podIP: 10.0.0.3}}
"#;
        for src in [base, policies] {
            let v: Vec<serde_json::Value> = serde_norway::from_str(src).unwrap();
            for o in v {
                cluster::add_object(&mut c, "test", o);
            }
        }
        c
    }

    fn pod<'a>(c: &'a Cluster, name: &str) -> Peer<'a> {
        Peer::Pod(c.pods.iter().find(|p| &*p.name == name).unwrap())
    }

    #[test]
    fn invalid_policy_names_its_field_and_fails_closed_without_hiding_valid_allows() {
        let c = cluster_with(
            r#"
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: broken, namespace: x}
  spec:
    podSelector: {matchLabels: {pod: a}}
    ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: Within, values: [c]}]}}]}]
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: from-b, namespace: x}
  spec:
    podSelector: {matchLabels: {pod: a}}
    ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
"#,
        );
        assert_eq!(c.errors.len(), 1);
        assert!(
            c.errors[0].contains("x/broken")
                && c.errors[0]
                    .contains("spec.ingress[0].from[0].podSelector.matchExpressions[0].operator"),
            "{}",
            c.errors[0]
        );
        let e = Engine::new(&c, Options::default());
        // The broken rule would have allowed c; it allows nothing.
        let d = e.decide(pod(&c, "c"), pod(&c, "a"), Protocol::Tcp, 8080);
        assert_eq!(d.verdict, Verdict::Denied);
        assert!(d.reason().contains("invalid"), "{}", d.reason());
        assert_eq!(
            e.decide(pod(&c, "b"), pod(&c, "a"), Protocol::Tcp, 8080)
                .verdict,
            Verdict::Allowed
        );
    }

    #[test]
    fn policy_types_default_like_the_api_server() {
        // No policyTypes, ingress rules and `egress: []`: the API server defaults to Ingress
        // only, so a's egress stays open while its ingress admits only b.
        let c = cluster_with(
            r#"
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: empty-egress, namespace: x}
  spec:
    podSelector: {matchLabels: {pod: a}}
    ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
    egress: []
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: empty-types, namespace: x}
  spec:
    podSelector: {matchLabels: {pod: c}}
    policyTypes: []
    egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]
"#,
        );
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let e = Engine::new(&c, Options::default());
        let v = |s, d| e.decide(pod(&c, s), pod(&c, d), Protocol::Tcp, 80).verdict;
        assert_eq!(
            v("a", "b"),
            Verdict::Allowed,
            "egress: [] must not isolate egress"
        );
        assert_eq!(v("b", "a"), Verdict::Allowed);
        assert_eq!(v("c", "a"), Verdict::Denied, "ingress of a is isolated");
        // `policyTypes: []` defaults too: Ingress, and Egress because egress has a rule.
        assert_eq!(v("c", "b"), Verdict::Allowed);
        assert_eq!(v("c", "a"), Verdict::Denied);
        assert_eq!(v("b", "c"), Verdict::Denied, "ingress of c is isolated");
    }

    #[test]
    fn the_pods_own_node_passes_ingress_isolation_unless_denied() {
        let mut c = cluster_with(
            r#"
- {apiVersion: v1, kind: Node, metadata: {name: n1}, status: {addresses: [{type: InternalIP, address: 10.9.0.4}]}}
- {apiVersion: v1, kind: Node, metadata: {name: n2}, status: {addresses: [{type: InternalIP, address: 10.9.0.5}]}}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: deny, namespace: x}
  spec: {podSelector: {}}
"#,
        );
        c.pods = c
            .pods
            .iter()
            .map(|p| {
                let mut p = (**p).clone();
                p.node = "n1".into();
                std::sync::Arc::new(p)
            })
            .collect();
        let own: IpAddr = "10.9.0.4".parse().unwrap();
        let other: IpAddr = "10.9.0.5".parse().unwrap();
        let e = Engine::new(&c, Options::default());
        let d = e.decide(Peer::External(own), pod(&c, "a"), Protocol::Tcp, 8080);
        assert_eq!(d.verdict, Verdict::Allowed);
        assert!(d.reason().contains("own node"), "{}", d.reason());
        let d = e.decide(Peer::External(other), pod(&c, "a"), Protocol::Tcp, 8080);
        assert_eq!(
            d.verdict,
            Verdict::Denied,
            "another node is not the pod's node"
        );
        let hardened = Options {
            deny_from_node: true,
            ..Options::default()
        };
        let e = Engine::new(&c, hardened);
        let d = e.decide(Peer::External(own), pod(&c, "a"), Protocol::Tcp, 8080);
        assert_eq!(d.verdict, Verdict::Denied);
    }

    #[test]
    fn unusable_pod_selector_isolates_the_whole_namespace() {
        let c = cluster_with(
            r#"
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: bad-selector, namespace: x}
  spec:
    podSelector: {matchExpressions: [{key: pod, operator: In}]}
    ingress: [{}]
"#,
        );
        assert!(
            c.errors[0].contains("spec.podSelector.matchExpressions[0].values"),
            "{:?}",
            c.errors
        );
        let e = Engine::new(&c, Options::default());
        for (s, d) in [("a", "b"), ("b", "c"), ("c", "a")] {
            assert_eq!(
                e.decide(pod(&c, s), pod(&c, d), Protocol::Tcp, 80).verdict,
                Verdict::Denied,
                "{s}->{d}"
            );
        }
    }

    #[test]
    fn port_errors_name_the_field() {
        let c = cluster_with(
            r#"
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: ports, namespace: x}
  spec:
    podSelector: {}
    ingress:
    - ports: [{endPort: 90}, {port: http, endPort: 90}, {port: 90, endPort: 80}, {port: 80, protocol: ICMP}]
"#,
        );
        let fields: Vec<&str> = c
            .errors
            .iter()
            .map(|e| e.split(": ").nth(2).unwrap_or(""))
            .collect();
        assert_eq!(
            fields,
            [
                "spec.ingress[0].ports[0].endPort",
                "spec.ingress[0].ports[1].endPort",
                "spec.ingress[0].ports[2].endPort",
                "spec.ingress[0].ports[3].protocol"
            ],
            "{:?}",
            c.errors
        );
    }

    #[test]
    fn named_ports_resolve_on_the_destination_pod() {
        let c = cluster_with(
            r#"
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: http-only, namespace: x}
  spec:
    podSelector: {}
    ingress: [{ports: [{port: http}]}]
"#,
        );
        let e = Engine::new(&c, Options::default());
        assert_eq!(
            e.decide(pod(&c, "b"), pod(&c, "a"), Protocol::Tcp, 8080)
                .verdict,
            Verdict::Allowed
        );
        assert_eq!(
            e.decide(pod(&c, "b"), pod(&c, "a"), Protocol::Tcp, 8081)
                .verdict,
            Verdict::Denied
        );
        // c declares no port named http.
        assert_eq!(
            e.decide(pod(&c, "b"), pod(&c, "c"), Protocol::Tcp, 8080)
                .verdict,
            Verdict::Denied
        );
        assert_eq!(
            e.decide(pod(&c, "b"), pod(&c, "a"), Protocol::Udp, 8080)
                .verdict,
            Verdict::Denied
        );
    }

    #[test]
    fn audit_reports_would_be_drops_and_never_changes_what_passes() {
        let c = cluster_with(
            r#"
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: audited, namespace: x, annotations: {observer.dev/audit: "true"}}
  spec:
    podSelector: {matchLabels: {pod: a}}
    ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: enforced, namespace: x}
  spec:
    podSelector: {matchLabels: {pod: c}}
    ingress: []
"#,
        );
        let e = Engine::new(&c, Options::default());
        assert_eq!(
            e.decide(pod(&c, "b"), pod(&c, "a"), Protocol::Tcp, 80)
                .verdict,
            Verdict::Allowed
        );
        assert_eq!(
            e.decide(pod(&c, "c"), pod(&c, "a"), Protocol::Tcp, 80)
                .verdict,
            Verdict::Audit
        );
        // The enforced deny stays a deny.
        assert_eq!(
            e.decide(pod(&c, "a"), pod(&c, "c"), Protocol::Tcp, 80)
                .verdict,
            Verdict::Denied
        );
        // Global audit turns it into audit too.
        let all = Engine::new(
            &c,
            Options {
                audit_all: true,
                ..Default::default()
            },
        );
        assert_eq!(
            all.decide(pod(&c, "a"), pod(&c, "c"), Protocol::Tcp, 80)
                .verdict,
            Verdict::Audit
        );
    }

    #[test]
    fn loopback_and_external_peers() {
        let c = cluster_with(
            r#"
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: egress-cidr, namespace: x}
  spec:
    podSelector: {matchLabels: {pod: a}}
    policyTypes: [Ingress, Egress]
    egress: [{to: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}]}]
"#,
        );
        let e = Engine::new(&c, Options::default());
        assert_eq!(
            e.decide(pod(&c, "a"), pod(&c, "a"), Protocol::Tcp, 80)
                .verdict,
            Verdict::Allowed
        );
        let ext = |s: &str| Peer::External(s.parse().unwrap());
        assert_eq!(
            e.decide(pod(&c, "a"), ext("192.0.2.10"), Protocol::Tcp, 443)
                .verdict,
            Verdict::Allowed
        );
        assert_eq!(
            e.decide(pod(&c, "a"), ext("192.0.2.200"), Protocol::Tcp, 443)
                .verdict,
            Verdict::Denied
        );
        assert_eq!(
            e.decide(ext("192.0.2.10"), pod(&c, "a"), Protocol::Tcp, 80)
                .verdict,
            Verdict::Denied
        );
    }
}
