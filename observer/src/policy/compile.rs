//! Compiles the cluster (pods, nodes, policies) into the datapath's maps as seen from one node:
//! ipcache identities, local endpoints with isolation flags, and per-endpoint policy entries
//! carrying rule ids. Identities, endpoint ids and rule ids are stable for the life of the
//! [`Allocator`], so recompiling after a change yields the same numbers and the map writer only
//! writes differences.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use observer_common::{
    ep_flags, identity, policy_flags, EndpointInfo, IpcacheEntry, PolicyEntry, PolicyKeyData,
    RemoteKind, DIR_EGRESS, DIR_INGRESS, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO,
};
use serde::Serialize;

use super::{
    engine::Options,
    model::{PeerSpec, Policy, PortRule, PortSpec, Protocol, Rule},
};
use crate::cluster::{Cluster, NodeInfo, PodInfo};

/// Where a rule id comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize, PartialOrd, Ord)]
pub struct RuleRef {
    pub namespace: std::sync::Arc<str>,
    pub name: std::sync::Arc<str>,
    pub direction: std::sync::Arc<str>,
    pub rule: usize,
}

/// Stable numbering across recompiles.
#[derive(Default, Debug, Clone)]
pub struct Allocator {
    identities: HashMap<String, u32>,
    endpoints: HashMap<(String, String), u32>,
    rules: HashMap<RuleRef, u32>,
}

impl Allocator {
    pub(crate) fn identity(&mut self, key: String) -> u32 {
        let next = identity::FIRST_ALLOCATED + self.identities.len() as u32;
        *self.identities.entry(key).or_insert(next)
    }

    pub fn endpoint(&mut self, ns: &str, name: &str) -> u32 {
        let next = 1 + self.endpoints.len() as u32;
        *self
            .endpoints
            .entry((ns.to_string(), name.to_string()))
            .or_insert(next)
    }

    fn rule(&mut self, r: RuleRef) -> u32 {
        let next = 1 + self.rules.len() as u32;
        *self.rules.entry(r).or_insert(next)
    }

    /// Numbers handed out so far.
    pub fn len(&self) -> usize {
        self.identities.len() + self.endpoints.len() + self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The numbering as JSON, to survive a daemon restart.
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut f = AllocatorFile {
            identities: self
                .identities
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .map(|((ns, n), v)| (ns.clone(), n.clone(), *v))
                .collect(),
            rules: self.rules.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        };
        f.identities.sort_by_key(|e| e.1);
        f.endpoints.sort_by_key(|e| e.2);
        f.rules.sort_by_key(|e| e.1);
        serde_json::to_vec(&f)
    }

    /// Reads [`Allocator::to_json`]; refuses numbering that is not dense, since new numbers are
    /// handed out after the highest.
    pub fn from_json(bytes: &[u8]) -> anyhow::Result<Self> {
        let f: AllocatorFile = serde_json::from_slice(bytes)?;
        let a = Self {
            identities: f.identities.into_iter().collect(),
            endpoints: f
                .endpoints
                .into_iter()
                .map(|(ns, n, v)| ((ns, n), v))
                .collect(),
            rules: f.rules.into_iter().collect(),
        };
        let dense = |mut ids: Vec<u32>, first: u32| {
            ids.sort_unstable();
            ids.iter()
                .enumerate()
                .all(|(i, id)| *id == first + i as u32)
        };
        if !dense(
            a.identities.values().copied().collect(),
            identity::FIRST_ALLOCATED,
        ) || !dense(a.endpoints.values().copied().collect(), 1)
            || !dense(a.rules.values().copied().collect(), 1)
        {
            anyhow::bail!("numbering is not dense");
        }
        Ok(a)
    }

    /// Rule id -> where it comes from.
    pub fn rule_table(&self) -> HashMap<u32, RuleRef> {
        self.rules.iter().map(|(r, id)| (*id, r.clone())).collect()
    }
}

#[derive(Serialize, serde::Deserialize)]
struct AllocatorFile {
    identities: Vec<(String, u32)>,
    endpoints: Vec<(String, String, u32)>,
    rules: Vec<(RuleRef, u32)>,
}

/// Everything the maps should hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub endpoints: BTreeMap<IpAddr, EndpointInfo>,
    pub ipcache: BTreeMap<IpNet, IpcacheEntry>,
    /// (prefix length, key data) -> entry.
    pub policy: BTreeMap<(u32, PolicyKeyData), PolicyEntry>,
    /// Service frontends (address, IP protocol, port) -> the Service's kernel id.
    pub services: BTreeMap<(IpAddr, u8, u16), u32>,
}

/// Pods share an identity when they share namespace, labels and named container ports: the
/// ports are part of it because a named port in a policy resolves per destination pod, and the
/// datapath only sees the identity. Identities are node-local numbers, so this costs nothing on
/// the wire.
pub(crate) fn pod_identity_key(p: &PodInfo) -> String {
    let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut ports: Vec<String> = p
        .ports
        .iter()
        .filter(|(n, _, _)| !n.is_empty())
        .map(|(n, num, pr)| format!("{n}={num}/{pr}"))
        .collect();
    ports.sort();
    format!(
        "pod:{}:{}:{}",
        p.namespace,
        labels.join(","),
        ports.join(",")
    )
}

pub(crate) fn entry(identity: u32, kind: RemoteKind) -> IpcacheEntry {
    IpcacheEntry {
        identity,
        kind: kind as u8,
        _pad: [0; 3],
    }
}

/// Splits `lo..=hi` into aligned prefixes: (value, prefix bits of the 16-bit port).
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo as u32, hi as u32);
    while lo <= hi {
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

/// Pods sharing one identity (namespace, labels, named ports).
struct Group<'a> {
    labels: &'a BTreeMap<String, String>,
    ports: &'a [(String, u16, Protocol)],
    pods: Vec<&'a PodInfo>,
}

struct Ctx<'a> {
    cluster: &'a Cluster,
    opts: &'a Options,
    /// Identity -> its pods; selectors are evaluated once per identity, not once per pod.
    groups: BTreeMap<u32, Group<'a>>,
    /// Namespace -> identities of its pods.
    by_ns: HashMap<&'a str, Vec<u32>>,
    /// Every ipcache prefix that is not a pod address, with its identity, for ipBlock containment.
    prefixes: Vec<(IpNet, u32)>,
}

impl Ctx<'_> {
    fn ns_labels(&self, ns: &str) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.cluster.namespaces.get(ns).unwrap_or(&EMPTY)
    }

    /// Identities a peer stands for.
    fn peer_identities(&self, policy: &Policy, peer: &PeerSpec) -> BTreeSet<u32> {
        let in_ns = |ns: &str| self.by_ns.get(ns).into_iter().flatten().copied();
        match peer {
            PeerSpec::Pods(sel) => in_ns(&policy.namespace)
                .filter(|id| sel.matches(self.groups[id].labels))
                .collect(),
            PeerSpec::Namespaces(nsel) => self
                .by_ns
                .iter()
                .filter(|(ns, _)| nsel.matches(self.ns_labels(ns)))
                .flat_map(|(_, ids)| ids.iter().copied())
                .collect(),
            PeerSpec::PodsInNamespaces { namespaces, pods } => self
                .by_ns
                .iter()
                .filter(|(ns, _)| namespaces.matches(self.ns_labels(ns)))
                .flat_map(|(_, ids)| ids.iter().copied())
                .filter(|id| pods.matches(self.groups[id].labels))
                .collect(),
            PeerSpec::IpBlock { cidr, except } => {
                let mut ids: BTreeSet<u32> = self
                    .prefixes
                    .iter()
                    .filter(|(n, _)| in_block(cidr, except, n))
                    .map(|(_, id)| *id)
                    .collect();
                if self.opts.ipblock_matches_pods {
                    for (id, g) in &self.groups {
                        let ips = g.pods.iter().flat_map(|p| p.ips.iter());
                        if all_in_block(cidr, except, ips) {
                            ids.insert(*id);
                        }
                    }
                }
                ids
            }
        }
    }
}

/// Whether `n` is inside an ipBlock: in `cidr` and in none of `except`.
pub(crate) fn in_block(cidr: &IpNet, except: &[IpNet], n: &IpNet) -> bool {
    cidr.contains(n) && !except.iter().any(|e| e.contains(n))
}

/// Whether an identity's pods, whose addresses are `ips`, are all inside an ipBlock: an
/// identity stands for all its pods, so it is included only when every one of their addresses
/// of the block's family is inside the block.
pub(crate) fn all_in_block<'a>(
    cidr: &IpNet,
    except: &[IpNet],
    mut ips: impl Iterator<Item = &'a IpAddr>,
) -> bool {
    ips.all(|ip| ip.is_ipv4() != cidr.addr().is_ipv4() || in_block(cidr, except, &IpNet::from(*ip)))
}

/// (prefix length, protocol, port) entries a rule's ports stand for, towards `dst_pods`
/// (named ports resolve on the destination pods). `None`: any protocol and port.
fn port_keys(rule: &Rule, dst_ports: &[(String, u16, Protocol)]) -> Option<Vec<(u32, u8, u16)>> {
    if rule.ports.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for pr in &rule.ports {
        let proto = pr.protocol.number();
        match &pr.port {
            PortSpec::Any => out.push((POLICY_PREFIX_ANY_PORT, proto, 0)),
            PortSpec::Range(lo, hi) => {
                for (v, bits) in port_prefixes(*lo, *hi) {
                    out.push((POLICY_PREFIX_ANY_PORT + bits, proto, v));
                }
            }
            PortSpec::Named(name) => {
                for (n, num, p) in dst_ports {
                    if n == name && *p == pr.protocol {
                        out.push((POLICY_PREFIX_ANY_PORT + 16, proto, *num));
                    }
                }
            }
        }
    }
    Some(out)
}

fn key(ep: u32, dir: u8, ident: u32, plen: u32, proto: u8, port: u16) -> (u32, PolicyKeyData) {
    // Bits past the prefix are zero in the key, as the trie compares only the prefix.
    let mut k = PolicyKeyData::new(ep, dir, ident, proto, port);
    let keep = plen as usize;
    for (i, b) in k.data.iter_mut().enumerate() {
        let bit0 = i * 8;
        if bit0 >= keep {
            *b = 0;
        } else if bit0 + 8 > keep {
            *b &= 0xffu8 << (8 - (keep - bit0));
        }
    }
    (plen, k)
}

/// Where pods reach Services, as kube-proxy translates them: every frontend address on every
/// port, and NodePorts on this node's own addresses (another node's NodePort is translated on
/// that node, after the pod's packet left this one).
pub(crate) fn frontends(
    cluster: &Cluster,
    node: &str,
    host_addrs: &[IpAddr],
) -> BTreeMap<(IpAddr, u8, u16), u32> {
    let mut out = BTreeMap::new();
    let node_addrs: Vec<IpAddr> = cluster
        .nodes
        .iter()
        .filter(|n| n.name == node)
        .flat_map(|n| n.addresses.iter().copied())
        .chain(host_addrs.iter().copied())
        .collect();
    for svc in &cluster.services {
        let id = svc.kernel_id();
        for p in &svc.ports {
            let proto = p.protocol.number();
            for ip in &svc.ips {
                out.insert((*ip, proto, p.port), id);
            }
            if let Some(np) = p.node_port {
                for ip in &node_addrs {
                    out.insert((*ip, proto, np), id);
                }
            }
        }
    }
    out
}

/// The ipcache without pods and ipBlocks: the world, nodes (this one as the host) and other
/// nodes' pod CIDRs.
pub(crate) fn base_ipcache(
    nodes: &[NodeInfo],
    node: &str,
    host_addrs: &[IpAddr],
    alloc: &mut Allocator,
) -> BTreeMap<IpNet, IpcacheEntry> {
    let mut m = BTreeMap::new();
    m.insert(
        "0.0.0.0/0".parse().unwrap(),
        entry(identity::WORLD, RemoteKind::World),
    );
    m.insert(
        "::/0".parse().unwrap(),
        entry(identity::WORLD, RemoteKind::World),
    );
    for n in nodes {
        let local = n.name == node;
        for a in &n.addresses {
            let kind = if local {
                RemoteKind::Host
            } else {
                RemoteKind::RemoteNode
            };
            m.insert(
                IpNet::from(*a),
                entry(alloc.identity(format!("node:{a}")), kind),
            );
        }
        if !local {
            // Each CIDR its own identity: an ipBlock holding one node's pod CIDR must not
            // take in the unknown addresses of every other node's.
            for c in &n.pod_cidrs {
                let c = c.trunc();
                m.insert(
                    c,
                    entry(
                        alloc.identity(format!("podcidr:{c}")),
                        RemoteKind::RemotePod,
                    ),
                );
            }
        }
    }
    for a in host_addrs {
        m.insert(
            IpNet::from(*a),
            entry(alloc.identity(format!("node:{a}")), RemoteKind::Host),
        );
    }
    m
}

/// The networks of valid policies' ipBlock peers (cidr and except), which get identities of
/// their own.
pub(crate) fn ipblock_nets(policies: &[std::sync::Arc<Policy>]) -> BTreeSet<IpNet> {
    policies
        .iter()
        .filter(|p| p.valid())
        .flat_map(|p| p.ingress.iter().chain(&p.egress))
        .flat_map(|r| &r.peers)
        .flat_map(|peer| match peer {
            PeerSpec::IpBlock { cidr, except } => std::iter::once(cidr)
                .chain(except)
                .map(|n| n.trunc())
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

pub(crate) fn cidr_entry(net: IpNet, alloc: &mut Allocator) -> IpcacheEntry {
    entry(alloc.identity(format!("cidr:{net}")), RemoteKind::World)
}

/// A pod's own address: not a prefix an ipBlock can contain by identity.
pub(crate) fn is_pod_address(net: &IpNet, e: &IpcacheEntry) -> bool {
    (e.kind == RemoteKind::RemotePod as u8 || e.kind == RemoteKind::LocalPod as u8)
        && net.prefix_len() == net.max_prefix_len()
}

/// Compiles the maps' contents for node `node` whose own addresses are `host_addrs`.
pub fn compile(
    cluster: &Cluster,
    node: &str,
    host_addrs: &[IpAddr],
    opts: &Options,
    alloc: &mut Allocator,
) -> Desired {
    let mut d = Desired {
        ipcache: base_ipcache(&cluster.nodes, node, host_addrs, alloc),
        ..Default::default()
    };
    d.services = frontends(cluster, node, host_addrs);
    let mut groups: BTreeMap<u32, Group<'_>> = BTreeMap::new();
    let mut by_ns: HashMap<&str, Vec<u32>> = HashMap::new();
    for p in cluster
        .pods
        .iter()
        .filter(|p| !p.host_network && !p.ips.is_empty())
    {
        let id = alloc.identity(pod_identity_key(p));
        groups
            .entry(id)
            .or_insert_with(|| {
                by_ns.entry(&*p.namespace).or_default().push(id);
                Group {
                    labels: &p.labels,
                    ports: &p.ports,
                    pods: Vec::new(),
                }
            })
            .pods
            .push(p);
        let local = &*p.node == node;
        for ip in &p.ips {
            let kind = if local {
                RemoteKind::LocalPod
            } else {
                RemoteKind::RemotePod
            };
            d.ipcache.insert(IpNet::from(*ip), entry(id, kind));
        }
    }
    // Every ipBlock prefix gets an identity of its own, without displacing pods or nodes.
    for net in ipblock_nets(&cluster.policies) {
        if !d.ipcache.contains_key(&net) {
            d.ipcache.insert(net, cidr_entry(net, alloc));
        }
    }
    let cx = Ctx {
        cluster,
        opts,
        groups,
        by_ns,
        prefixes: d
            .ipcache
            .iter()
            .filter(|(n, e)| !is_pod_address(n, e))
            .map(|(n, e)| (*n, e.identity))
            .collect(),
    };

    let mut sorted: Vec<&Policy> = cluster.policies.iter().map(|p| &**p).collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    // What a rule's peers stand for does not depend on the local pod: computed once per rule,
    // before the endpoints, for the rules of the policies that select a local pod.
    let local: Vec<&PodInfo> = cluster
        .pods
        .iter()
        .filter(|p| &*p.node == node && !p.host_network)
        .map(|p| p.as_ref())
        .collect();
    let mut peers: HashMap<RuleKey, Option<BTreeSet<u32>>> = HashMap::new();
    for pod in &local {
        for pol in sorted.iter().filter(|p| *p.namespace == *pod.namespace) {
            for ingress in [true, false] {
                if !selects(pol, pod, ingress) {
                    continue;
                }
                let rules = if ingress { &pol.ingress } else { &pol.egress };
                for (i, rule) in rules.iter().enumerate() {
                    peers
                        .entry((std::ptr::from_ref(*pol) as usize, ingress, i))
                        .or_insert_with(|| {
                            (!rule.peers.is_empty()).then(|| {
                                rule.peers
                                    .iter()
                                    .flat_map(|peer| cx.peer_identities(pol, peer))
                                    .collect()
                            })
                        });
                }
            }
        }
    }
    let view = FullView {
        cx: &cx,
        peers,
        audit_all: opts.audit_all,
    };
    for pod in local {
        let ep = alloc.endpoint(&pod.namespace, &pod.name);
        let in_ns = sorted
            .iter()
            .copied()
            .filter(|p| *p.namespace == *pod.namespace);
        let (flags, entries) = endpoint_policy(pod, ep, in_ns, &view, alloc);
        d.policy.extend(entries);
        for ip in &pod.ips {
            d.endpoints.insert(*ip, EndpointInfo { id: ep, flags });
        }
    }
    d
}

/// A rule of the full compile: (the policy's address in the cluster, ingress, index among the
/// direction's rules); addresses, not names, so that two policies of one name stay apart.
type RuleKey = (usize, bool, usize);

/// The identities a rule's peers stand for: any peer, or the union of the sets.
pub(crate) struct PeerIds<'a> {
    pub any: bool,
    pub sets: Vec<&'a BTreeSet<u32>>,
}

impl PeerIds<'_> {
    fn contains(&self, id: &u32) -> bool {
        self.any || self.sets.iter().any(|s| s.contains(id))
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.sets.iter().flat_map(|s| s.iter().copied())
    }
}

/// What the per-endpoint compile reads about the rest of the cluster: the full compile and
/// the incremental one answer it from their own indexes.
pub(crate) trait View {
    /// What rule `index` of `pol` in the direction stands for.
    fn peers(&self, pol: &Policy, ingress: bool, index: usize) -> PeerIds<'_>;
    /// Pod identities among `peers` with their named ports, for named ports on egress.
    fn named_targets(&self, peers: &PeerIds<'_>) -> Vec<(u32, &[(String, u16, Protocol)])>;
    /// Whether `pol` only audits.
    fn audited(&self, pol: &Policy) -> bool;
}

struct FullView<'a, 'c> {
    cx: &'a Ctx<'c>,
    peers: HashMap<RuleKey, Option<BTreeSet<u32>>>,
    audit_all: bool,
}

impl View for FullView<'_, '_> {
    fn peers(&self, pol: &Policy, ingress: bool, index: usize) -> PeerIds<'_> {
        match self
            .peers
            .get(&(std::ptr::from_ref(pol) as usize, ingress, index))
        {
            Some(Some(ids)) => PeerIds {
                any: false,
                sets: vec![ids],
            },
            _ => PeerIds {
                any: true,
                sets: Vec::new(),
            },
        }
    }

    fn named_targets(&self, peers: &PeerIds<'_>) -> Vec<(u32, &[(String, u16, Protocol)])> {
        self.cx
            .groups
            .iter()
            .filter(|(id, _)| peers.contains(id))
            .map(|(id, g)| (*id, g.ports))
            .collect()
    }

    fn audited(&self, pol: &Policy) -> bool {
        self.audit_all || pol.audit || self.cx.cluster.audit_namespaces.contains(&pol.namespace)
    }
}

/// Whether `pol` isolates `pod` in the direction.
pub(crate) fn selects(pol: &Policy, pod: &PodInfo, ingress: bool) -> bool {
    *pol.namespace == *pod.namespace
        && (if ingress {
            pol.ingress_isolates
        } else {
            pol.egress_isolates
        })
        && pol
            .pod_selector
            .as_ref()
            .is_none_or(|s| s.matches(&pod.labels))
}

/// One local endpoint's isolation flags and policy entries, from the policies of its namespace
/// in (namespace, name) order: where two rules give the same key, the enforced entry wins over
/// an audit-only one, else the first.
pub(crate) fn endpoint_policy<'p>(
    pod: &PodInfo,
    ep: u32,
    policies: impl Iterator<Item = &'p Policy> + Clone,
    view: &impl View,
    alloc: &mut Allocator,
) -> (u32, BTreeMap<(u32, PolicyKeyData), PolicyEntry>) {
    let mut flags = 0;
    let mut entries: BTreeMap<(u32, PolicyKeyData), PolicyEntry> = BTreeMap::new();
    for (dir, dir_name) in [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")] {
        let ingress = dir == DIR_INGRESS;
        for pol in policies.clone() {
            if !selects(pol, pod, ingress) {
                continue;
            }
            let audited = view.audited(pol);
            flags |= match (ingress, audited) {
                (true, false) => ep_flags::INGRESS_ISOLATED,
                (true, true) => ep_flags::INGRESS_AUDIT,
                (false, false) => ep_flags::EGRESS_ISOLATED,
                (false, true) => ep_flags::EGRESS_AUDIT,
            };
            let rules = if ingress { &pol.ingress } else { &pol.egress };
            for (i, rule) in rules.iter().enumerate() {
                let id = alloc.rule(RuleRef {
                    namespace: pol.namespace.as_str().into(),
                    name: pol.name.as_str().into(),
                    direction: dir_name.into(),
                    rule: i,
                });
                let value = PolicyEntry {
                    rule: id,
                    flags: if audited { policy_flags::AUDIT_ONLY } else { 0 },
                };
                let peers = view.peers(pol, ingress, i);
                rule_entries(rule, ep, dir, &peers, &pod.ports, view, value, &mut entries);
            }
        }
    }
    shadow_audit(&mut entries);
    (flags, entries)
}

/// The entries one rule gives endpoint `ep` (whose own container ports are `own_ports`).
#[allow(clippy::too_many_arguments)]
fn rule_entries(
    rule: &Rule,
    ep: u32,
    dir: u8,
    peers: &PeerIds<'_>,
    own_ports: &[(String, u16, Protocol)],
    view: &impl View,
    value: PolicyEntry,
    entries: &mut BTreeMap<(u32, PolicyKeyData), PolicyEntry>,
) {
    let mut emit = |ident: u32, r: &Rule, dst_ports: &[(String, u16, Protocol)]| {
        let keys = match port_keys(r, dst_ports) {
            None => vec![key(ep, dir, ident, POLICY_PREFIX_ANY_PROTO, 0, 0)],
            Some(v) => v
                .into_iter()
                .map(|(plen, proto, port)| key(ep, dir, ident, plen, proto, port))
                .collect(),
        };
        for k in keys {
            match entries.get(&k) {
                // Keep the enforced entry over an audit-only one, else the first.
                Some(old)
                    if old.flags & policy_flags::AUDIT_ONLY == 0
                        || value.flags & policy_flags::AUDIT_ONLY != 0 => {}
                _ => {
                    entries.insert(k, value);
                }
            }
        }
    };
    // Numbered ports apply to the rule's peers as they are; a named port on egress resolves on
    // each destination pod, so it needs the pods' identities even for "any peer".
    let (named, numbered): (Vec<PortRule>, Vec<PortRule>) = rule
        .ports
        .iter()
        .cloned()
        .partition(|p| matches!(p.port, PortSpec::Named(_)));
    if rule.ports.is_empty() || !numbered.is_empty() {
        let numbered = Rule {
            peers: Vec::new(),
            ports: numbered,
        };
        let r = if rule.ports.is_empty() {
            rule
        } else {
            &numbered
        };
        if peers.any {
            emit(identity::ANY, r, &[]);
        } else {
            peers.ids().for_each(|id| emit(id, r, &[]));
        }
    }
    if named.is_empty() {
        return;
    }
    let named_only = Rule {
        peers: Vec::new(),
        ports: named,
    };
    if dir == DIR_INGRESS {
        // Resolved on this pod, the destination.
        if peers.any {
            emit(identity::ANY, &named_only, own_ports);
        } else {
            peers.ids().for_each(|id| emit(id, &named_only, own_ports));
        }
    } else {
        // One (identity, ports) per distinct destination: pods sharing an identity share
        // their named ports.
        for (id, ports) in view.named_targets(peers) {
            emit(id, &named_only, ports);
        }
    }
}

/// An audit-only entry inside an enforced one's prefix (same endpoint, direction and identity)
/// would hide the enforced allow from the longest-prefix lookup: it takes the enforced value.
fn shadow_audit(entries: &mut BTreeMap<(u32, PolicyKeyData), PolicyEntry>) {
    let enforced: Vec<((u32, PolicyKeyData), PolicyEntry)> = entries
        .iter()
        .filter(|(_, v)| v.flags & policy_flags::AUDIT_ONLY == 0)
        .map(|(k, v)| (*k, *v))
        .collect();
    for ((plen, k), v) in entries.iter_mut() {
        if v.flags & policy_flags::AUDIT_ONLY == 0 {
            continue;
        }
        let covering = enforced
            .iter()
            .filter(|((eplen, ek), _)| *eplen < *plen && covers(*eplen, ek, k))
            .max_by_key(|((eplen, _), _)| *eplen);
        if let Some((_, ev)) = covering {
            *v = *ev;
        }
    }
}

fn covers(plen: u32, outer: &PolicyKeyData, inner: &PolicyKeyData) -> bool {
    (0..plen as usize).all(|bit| {
        let (i, m) = (bit / 8, 0x80u8 >> (bit % 8));
        outer.data[i] & m == inner.data[i] & m
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_numbering_survives_a_round_trip_and_keeps_counting() {
        let mut a = Allocator::default();
        let i1 = a.identity("pod:x:app=a:".into());
        let i2 = a.identity("pod:x:app=b:".into());
        let e = a.endpoint("x", "a");
        let r = a.rule(RuleRef {
            namespace: "x".into(),
            name: "p".into(),
            direction: "ingress".into(),
            rule: 0,
        });
        let mut b = Allocator::from_json(&a.to_json().unwrap()).unwrap();
        assert_eq!(b.identity("pod:x:app=b:".into()), i2);
        assert_eq!(b.identity("pod:x:app=a:".into()), i1);
        assert_eq!(b.endpoint("x", "a"), e);
        assert_eq!(&*b.rule_table()[&r].name, "p");
        assert_eq!(
            b.identity("pod:x:app=c:".into()),
            i2 + 1,
            "new numbers after the highest"
        );
        // A file with a hole would hand out a number twice: refused.
        let bad = br#"{"identities":[["a",256],["b",300]],"endpoints":[],"rules":[]}"#;
        assert!(Allocator::from_json(bad).is_err());
    }

    #[test]
    fn port_ranges_become_exact_prefix_covers() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(80, 81), vec![(80, 15)]);
        assert_eq!(port_prefixes(1, 65535).len(), 16);
        for (lo, hi) in [
            (80u16, 81u16),
            (1000, 2000),
            (32768, 65535),
            (5, 5),
            (1, 65535),
            (8080, 8443),
        ] {
            let mut covered = Vec::new();
            for (v, bits) in port_prefixes(lo, hi) {
                let size = 1u32 << (16 - bits);
                assert_eq!(v as u32 % size, 0, "aligned");
                covered.extend((v as u32..v as u32 + size).map(|p| p as u16));
            }
            assert_eq!(covered, (lo..=hi).collect::<Vec<_>>(), "{lo}-{hi}");
        }
    }
}
