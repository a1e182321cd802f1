//! The incremental compile: the same maps as [`compile::compile`], kept up to date from one
//! cluster snapshot to the next by recomputing only what a change touches. A pod's change moves
//! it between identities and its addresses in the ipcache; an identity that appears or goes is
//! tried against every rule's peers; a namespace's labels against the rules that select
//! namespaces; a policy recomputes its own rules. Only the local endpoints whose policies or
//! rules changed are recompiled, with the same per-endpoint function as the full compile.
//!
//! What changed is kept as the entries' values before the change ([`Changes`]), so that the
//! writer can order its map writes to never allow what both the old and the new state deny.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use observer_common::{EndpointInfo, IpcacheEntry, PolicyEntry, PolicyKeyData, RemoteKind};

use super::{
    compile::{self, Allocator, Desired, PeerIds, View},
    engine::Options,
    model::{PeerSpec, Policy, Protocol, Rule},
};
use crate::cluster::{Cluster, NodeInfo, PodInfo, ServiceInfo};

type PodKey = (String, String);
type PolicyKey = (u32, PolicyKeyData);

/// What a rule's peers stand for: pod identities and the identities of the prefixes its
/// ipBlocks contain.
#[derive(Default, Debug)]
struct RuleState {
    any: bool,
    groups: BTreeSet<u32>,
    prefixes: BTreeSet<u32>,
}

/// A policy and, when its namespace has local pods, its rules' peers: only the policies of
/// local pods' namespaces can give this node's maps an entry. Uncomputed, the rule lists are
/// empty.
#[derive(Debug)]
struct PolicyState {
    policy: Arc<Policy>,
    computed: bool,
    ingress: Vec<RuleState>,
    egress: Vec<RuleState>,
}

/// Pods sharing an identity (namespace, labels, named ports).
#[derive(Debug)]
struct Group {
    namespace: String,
    labels: BTreeMap<String, String>,
    ports: Vec<(String, u16, Protocol)>,
    members: BTreeSet<PodKey>,
}

/// A local endpoint as last compiled.
#[derive(Debug)]
struct Endpoint {
    info: EndpointInfo,
    keys: Vec<PolicyKey>,
}

/// Map entries touched since the writer last took them, with their values before.
#[derive(Default, Debug)]
pub struct Changes {
    pub endpoints: BTreeMap<IpAddr, Option<EndpointInfo>>,
    pub ipcache: BTreeMap<IpNet, Option<IpcacheEntry>>,
    pub policy: BTreeMap<PolicyKey, Option<PolicyEntry>>,
    pub services: BTreeMap<(IpAddr, u8, u16), Option<u32>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
            && self.ipcache.is_empty()
            && self.policy.is_empty()
            && self.services.is_empty()
    }
}

/// Which pods and policies may have changed since the previous update, by (namespace, name);
/// `None`: any of them (the snapshot is compared whole).
#[derive(Clone, Debug, Default)]
pub struct Hints {
    pub pods: Option<BTreeSet<(String, String)>>,
    pub policies: Option<BTreeSet<(String, String)>>,
}

impl Hints {
    /// Nothing known: compare everything.
    pub fn everything() -> Self {
        Self::default()
    }
}

/// What the last update changed outside the maps: for the daemon's pod index and per-pod
/// series.
#[derive(Debug, Default)]
pub struct Touched {
    /// Addresses whose pod may have changed: see [`Incremental::pod_at`].
    pub ips: BTreeSet<IpAddr>,
    /// Pods that are gone.
    pub gone: Vec<(String, String)>,
}

/// What one update found changed, before the derived work.
#[derive(Default)]
struct Dirty {
    /// Namespaces whose local endpoints are recompiled.
    namespaces: BTreeSet<String>,
    endpoints: BTreeSet<PodKey>,
    endpoint_ips: BTreeSet<IpAddr>,
    ipcache: BTreeSet<IpNet>,
    added_groups: BTreeSet<u32>,
    removed_groups: BTreeSet<u32>,
    /// Groups whose members changed (their addresses, for ipBlocks matching pods).
    changed_groups: BTreeSet<u32>,
    /// Namespaces whose labels changed.
    relabelled: BTreeSet<String>,
    /// Namespaces whose number of local pods changed.
    local_ns: BTreeSet<String>,
}

/// The compiled state of one node, updated in place.
pub struct Incremental {
    node: String,
    opts: Options,
    host: Vec<IpAddr>,
    nodes: Vec<NodeInfo>,
    services: Vec<ServiceInfo>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    audit_namespaces: BTreeSet<String>,
    pods: BTreeMap<PodKey, Arc<PodInfo>>,
    /// Namespace -> name -> policy with its rules' peers.
    policies: BTreeMap<String, BTreeMap<String, PolicyState>>,
    groups: BTreeMap<u32, Group>,
    pod_group: HashMap<PodKey, u32>,
    by_ns: HashMap<String, BTreeSet<u32>>,
    /// ipcache layers: nodes and the world; pod addresses with their pods; ipBlock networks.
    base: BTreeMap<IpNet, IpcacheEntry>,
    ip_owners: HashMap<IpAddr, BTreeSet<PodKey>>,
    cidrs: BTreeSet<IpNet>,
    /// Every ipcache prefix that is not a pod address, with its identity (ipBlock containment).
    nonpod: BTreeMap<IpNet, u32>,
    local: BTreeMap<PodKey, Endpoint>,
    /// Namespace -> how many local pods it has.
    local_ns: HashMap<String, usize>,
    local_ip_owners: HashMap<IpAddr, BTreeSet<PodKey>>,
    desired: Desired,
    changes: Changes,
    touched: Touched,
    started: bool,
}

impl Incremental {
    pub fn new(node: &str, opts: &Options) -> Self {
        Self {
            node: node.to_string(),
            opts: opts.clone(),
            host: Vec::new(),
            nodes: Vec::new(),
            services: Vec::new(),
            namespaces: BTreeMap::new(),
            audit_namespaces: BTreeSet::new(),
            pods: BTreeMap::new(),
            policies: BTreeMap::new(),
            groups: BTreeMap::new(),
            pod_group: HashMap::new(),
            by_ns: HashMap::new(),
            base: BTreeMap::new(),
            ip_owners: HashMap::new(),
            cidrs: BTreeSet::new(),
            nonpod: BTreeMap::new(),
            local: BTreeMap::new(),
            local_ns: HashMap::new(),
            local_ip_owners: HashMap::new(),
            desired: Desired::default(),
            changes: Changes::default(),
            touched: Touched::default(),
            started: false,
        }
    }

    /// What the maps should hold after the last update.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The entries changed since the last call, with their earlier values.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// What the last update changed outside the maps.
    pub fn touched(&self) -> &Touched {
        &self.touched
    }

    /// The pod an address stands for (the last of its pods in key order), as the ipcache.
    pub fn pod_at(&self, ip: &IpAddr) -> Option<&Arc<PodInfo>> {
        self.pods.get(self.ip_owners.get(ip)?.last()?)
    }

    /// Brings the compiled state to `cluster`, with `host` the node's own addresses (its
    /// interfaces and its Node object, as [`compile::compile`] takes them). Pods and policies
    /// are keyed by namespace and name: a snapshot holding two of one name keeps the last.
    pub fn update(&mut self, cluster: &Cluster, host: &[IpAddr], alloc: &mut Allocator) {
        self.update_with(cluster, &Hints::everything(), host, alloc)
    }

    /// [`Incremental::update`] comparing only the pods and policies `hints` names; with hints,
    /// `cluster.pods` and `cluster.policies` must be in (namespace, name) order without
    /// duplicates, as the watch caches give them.
    pub fn update_with(
        &mut self,
        cluster: &Cluster,
        hints: &Hints,
        host: &[IpAddr],
        alloc: &mut Allocator,
    ) {
        self.touched = Touched::default();
        let mut dirty = Dirty::default();
        let first = !self.started;
        self.started = true;
        self.update_namespaces(cluster, &mut dirty);
        if first || cluster.nodes != self.nodes || host != self.host {
            self.nodes = cluster.nodes.clone();
            self.host = host.to_vec();
            let base = compile::base_ipcache(&self.nodes, &self.node, &self.host, alloc);
            dirty.ipcache.extend(self.base.keys().chain(base.keys()));
            self.base = base;
            self.update_services(cluster);
        } else if cluster.services != self.services {
            self.update_services(cluster);
        }
        let mut changed_policies = match &hints.policies {
            Some(keys) => self.diff_hinted_policies(cluster, keys),
            None => self.diff_policies(cluster),
        };
        let changed_pods = match &hints.pods {
            Some(keys) => self.diff_hinted_pods(cluster, keys),
            None => self.diff_pods(cluster),
        };
        self.update_pods(changed_pods, alloc, &mut dirty);
        // Namespaces that gained their first local pod have their policies computed whole
        // below, with the changed policies; those that lost their last forget them.
        for ns in std::mem::take(&mut dirty.local_ns) {
            let active = self.local_ns.contains_key(&ns);
            for (name, st) in self.policies.get_mut(&ns).into_iter().flatten() {
                if active && !st.computed {
                    changed_policies
                        .entry((ns.clone(), name.clone()))
                        .or_insert_with(|| Some(st.policy.clone()));
                } else if !active && st.computed {
                    st.computed = false;
                    st.ingress = Vec::new();
                    st.egress = Vec::new();
                }
            }
        }
        // Existing rules against the identities and namespaces that changed; changed
        // policies are computed whole below.
        for (ns, name) in changed_policies.keys() {
            if let Some(st) = self.policies.get_mut(ns).and_then(|m| m.remove(name)) {
                dirty.namespaces.insert(st.policy.namespace.clone());
            }
        }
        self.update_rules(&mut dirty);
        let cidrs = if changed_policies.is_empty() && !first {
            self.cidrs.clone()
        } else {
            compile::ipblock_nets(&cluster.policies)
        };
        if cidrs != self.cidrs {
            dirty
                .ipcache
                .extend(self.cidrs.symmetric_difference(&cidrs));
            self.cidrs = cidrs;
        }
        let nonpod_changed = self.update_ipcache(&dirty.ipcache, alloc);
        if nonpod_changed {
            self.update_prefixes(&mut dirty);
        }
        for ((ns, name), p) in changed_policies {
            if let Some(p) = p {
                let st = self.policy_state(p, self.local_ns.contains_key(&ns));
                dirty.namespaces.insert(ns.clone());
                self.policies
                    .entry(ns.clone())
                    .or_default()
                    .insert(name.clone(), st);
            }
        }
        self.policies.retain(|_, m| !m.is_empty());
        self.update_endpoints(dirty, alloc);
    }

    fn update_namespaces(&mut self, cluster: &Cluster, dirty: &mut Dirty) {
        if cluster.namespaces != self.namespaces {
            let names: BTreeSet<&String> = self
                .namespaces
                .keys()
                .chain(cluster.namespaces.keys())
                .collect();
            for ns in names {
                if self.namespaces.get(ns) != cluster.namespaces.get(ns) {
                    dirty.relabelled.insert(ns.clone());
                }
            }
            self.namespaces = cluster.namespaces.clone();
        }
        if cluster.audit_namespaces != self.audit_namespaces {
            dirty.namespaces.extend(
                self.audit_namespaces
                    .symmetric_difference(&cluster.audit_namespaces)
                    .cloned(),
            );
            self.audit_namespaces = cluster.audit_namespaces.clone();
        }
    }

    fn update_services(&mut self, cluster: &Cluster) {
        self.services = cluster.services.clone();
        let new = compile::frontends(cluster, &self.node, &self.host);
        let old = std::mem::take(&mut self.desired.services);
        for (k, v) in &old {
            if new.get(k) != Some(v) {
                self.changes.services.entry(*k).or_insert(Some(*v));
            }
        }
        for k in new.keys().filter(|k| !old.contains_key(k)) {
            self.changes.services.entry(*k).or_insert(None);
        }
        self.desired.services = new;
    }

    /// Policies added, removed or changed, by (namespace, name), with what they are now.
    fn diff_policies(&self, cluster: &Cluster) -> BTreeMap<PodKey, Option<Arc<Policy>>> {
        let mut out = BTreeMap::new();
        let mut seen: HashMap<(&str, &str), &Arc<Policy>> = HashMap::new();
        for p in &cluster.policies {
            seen.insert((&p.namespace, &p.name), p);
        }
        for (k, p) in &seen {
            let old = self.policies.get(k.0).and_then(|m| m.get(k.1));
            if old.is_none_or(|o| !same(&o.policy, p)) {
                out.insert((k.0.to_string(), k.1.to_string()), Some((*p).clone()));
            }
        }
        for (ns, m) in &self.policies {
            for name in m.keys() {
                if !seen.contains_key(&(ns.as_str(), name.as_str())) {
                    out.insert((ns.clone(), name.clone()), None);
                }
            }
        }
        out
    }

    /// [`Incremental::diff_policies`] for the named policies only.
    fn diff_hinted_policies(
        &self,
        cluster: &Cluster,
        keys: &BTreeSet<PodKey>,
    ) -> BTreeMap<PodKey, Option<Arc<Policy>>> {
        let mut out = BTreeMap::new();
        for k in keys {
            let new = find(&cluster.policies, k, |p| (&p.namespace, &p.name));
            let old = self.policies.get(&k.0).and_then(|m| m.get(&k.1));
            let same = match (old, new) {
                (Some(o), Some(n)) => same(&o.policy, n),
                (None, None) => true,
                _ => false,
            };
            if !same {
                out.insert(k.clone(), new.cloned());
            }
        }
        out
    }

    /// Pods added, removed or changed, with what they are now, from the whole snapshot.
    fn diff_pods(&self, cluster: &Cluster) -> Vec<(PodKey, Option<Arc<PodInfo>>)> {
        let key = |p: &PodInfo| (p.namespace.clone(), p.name.clone());
        let sorted = cluster
            .pods
            .windows(2)
            .all(|w| (&w[0].namespace, &w[0].name) < (&w[1].namespace, &w[1].name));
        let mut new: Vec<&Arc<PodInfo>> = cluster.pods.iter().collect();
        if !sorted {
            new.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            // The last of a name wins.
            new.reverse();
            new.dedup_by(|a, b| (&a.namespace, &a.name) == (&b.namespace, &b.name));
            new.reverse();
        }
        let mut changed: Vec<(PodKey, Option<Arc<PodInfo>>)> = Vec::new();
        let mut old = self.pods.iter().peekable();
        let mut it = new.into_iter().peekable();
        loop {
            match (old.peek(), it.peek()) {
                (None, None) => break,
                (Some((k, _)), None) => {
                    changed.push(((*k).clone(), None));
                    old.next();
                }
                (None, Some(p)) => {
                    changed.push((key(p), Some((*p).clone())));
                    it.next();
                }
                (Some((k, o)), Some(p)) => {
                    match (k.0.as_str(), k.1.as_str()).cmp(&(&p.namespace, &p.name)) {
                        std::cmp::Ordering::Less => {
                            changed.push(((*k).clone(), None));
                            old.next();
                        }
                        std::cmp::Ordering::Greater => {
                            changed.push((key(p), Some((*p).clone())));
                            it.next();
                        }
                        std::cmp::Ordering::Equal => {
                            if !same(o, p) {
                                changed.push((key(p), Some((*p).clone())));
                            }
                            old.next();
                            it.next();
                        }
                    }
                }
            }
        }
        changed
    }

    /// [`Incremental::diff_pods`] for the named pods only.
    fn diff_hinted_pods(
        &self,
        cluster: &Cluster,
        keys: &BTreeSet<PodKey>,
    ) -> Vec<(PodKey, Option<Arc<PodInfo>>)> {
        let mut changed = Vec::new();
        for k in keys {
            let new = find(&cluster.pods, k, |p| (&p.namespace, &p.name));
            let same = match (self.pods.get(k), new) {
                (Some(o), Some(n)) => same(o, n),
                (None, None) => true,
                _ => false,
            };
            if !same {
                changed.push((k.clone(), new.cloned()));
            }
        }
        changed
    }

    /// Moves the changed pods between identities, addresses and endpoints.
    fn update_pods(
        &mut self,
        changed: Vec<(PodKey, Option<Arc<PodInfo>>)>,
        alloc: &mut Allocator,
        dirty: &mut Dirty,
    ) {
        for (k, new) in changed {
            if let Some(old) = self.pods.remove(&k) {
                self.remove_pod(&k, &old, dirty);
                self.touched.ips.extend(old.ips.iter().copied());
                if new.is_none() {
                    self.touched.gone.push(k.clone());
                }
            }
            if let Some(p) = new {
                self.touched.ips.extend(p.ips.iter().copied());
                self.add_pod(&k, &p, alloc, dirty);
                self.pods.insert(k, p);
            }
        }
        // An identity that lost and regained its pods in one update was neither added nor
        // removed for the rules.
        let back: Vec<u32> = dirty
            .added_groups
            .intersection(&dirty.removed_groups)
            .copied()
            .collect();
        for id in back {
            dirty.added_groups.remove(&id);
            dirty.removed_groups.remove(&id);
            dirty.changed_groups.insert(id);
        }
    }

    fn is_local(&self, p: &PodInfo) -> bool {
        p.node == self.node && !p.host_network
    }

    fn count_local(&mut self, ns: &str, up: bool, dirty: &mut Dirty) {
        let n = self.local_ns.entry(ns.to_string()).or_default();
        if up {
            *n += 1;
        } else {
            *n -= 1;
        }
        if *n == 0 {
            self.local_ns.remove(ns);
        }
        dirty.local_ns.insert(ns.to_string());
    }

    fn remove_pod(&mut self, k: &PodKey, p: &PodInfo, dirty: &mut Dirty) {
        if let Some(id) = self.pod_group.remove(k) {
            let g = self.groups.get_mut(&id).expect("a pod's group");
            g.members.remove(k);
            if g.members.is_empty() {
                let g = self.groups.remove(&id).expect("a pod's group");
                if let Some(ids) = self.by_ns.get_mut(&g.namespace) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.by_ns.remove(&g.namespace);
                    }
                }
                dirty.removed_groups.insert(id);
            } else {
                dirty.changed_groups.insert(id);
            }
            for ip in &p.ips {
                if let Some(o) = self.ip_owners.get_mut(ip) {
                    o.remove(k);
                    if o.is_empty() {
                        self.ip_owners.remove(ip);
                    }
                }
                dirty.ipcache.insert(IpNet::from(*ip));
            }
        }
        if self.is_local(p) {
            self.count_local(&p.namespace, false, dirty);
            dirty.endpoints.insert(k.clone());
            for ip in &p.ips {
                if let Some(o) = self.local_ip_owners.get_mut(ip) {
                    o.remove(k);
                    if o.is_empty() {
                        self.local_ip_owners.remove(ip);
                    }
                }
                dirty.endpoint_ips.insert(*ip);
            }
        }
    }

    fn add_pod(&mut self, k: &PodKey, p: &PodInfo, alloc: &mut Allocator, dirty: &mut Dirty) {
        if !p.host_network && !p.ips.is_empty() {
            let id = alloc.identity(compile::pod_identity_key(p));
            let g = self.groups.entry(id).or_insert_with(|| {
                dirty.added_groups.insert(id);
                Group {
                    namespace: p.namespace.clone(),
                    labels: p.labels.clone(),
                    ports: p.ports.clone(),
                    members: BTreeSet::new(),
                }
            });
            g.members.insert(k.clone());
            if !dirty.added_groups.contains(&id) {
                dirty.changed_groups.insert(id);
            }
            self.by_ns
                .entry(p.namespace.clone())
                .or_default()
                .insert(id);
            self.pod_group.insert(k.clone(), id);
            for ip in &p.ips {
                self.ip_owners.entry(*ip).or_default().insert(k.clone());
                dirty.ipcache.insert(IpNet::from(*ip));
            }
        }
        if self.is_local(p) {
            self.count_local(&p.namespace, true, dirty);
            dirty.endpoints.insert(k.clone());
            for ip in &p.ips {
                self.local_ip_owners
                    .entry(*ip)
                    .or_default()
                    .insert(k.clone());
                dirty.endpoint_ips.insert(*ip);
            }
        }
    }

    fn ns_labels(&self, ns: &str) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.namespaces.get(ns).unwrap_or(&EMPTY)
    }

    /// Whether pod identity `id` is one of the peers of a rule of `pol`.
    fn admits(&self, pol: &Policy, rule: &Rule, id: u32) -> bool {
        let Some(g) = self.groups.get(&id) else {
            return false;
        };
        rule.peers.iter().any(|peer| match peer {
            PeerSpec::Pods(sel) => g.namespace == pol.namespace && sel.matches(&g.labels),
            PeerSpec::Namespaces(nsel) => nsel.matches(self.ns_labels(&g.namespace)),
            PeerSpec::PodsInNamespaces { namespaces, pods } => {
                namespaces.matches(self.ns_labels(&g.namespace)) && pods.matches(&g.labels)
            }
            PeerSpec::IpBlock { cidr, except } => {
                // An identity stands for all its pods: it is included only when every one of
                // their addresses of the block's family is inside the block.
                self.opts.ipblock_matches_pods
                    && g.members
                        .iter()
                        .filter_map(|k| self.pods.get(k))
                        .flat_map(|p| p.ips.iter())
                        .filter(|ip| ip.is_ipv4() == cidr.addr().is_ipv4())
                        .all(|ip| {
                            let n = IpNet::from(*ip);
                            cidr.contains(&n) && !except.iter().any(|e| e.contains(&n))
                        })
            }
        })
    }

    /// The existing rules against the identities that appeared, went or changed members, and
    /// the namespaces whose labels changed.
    fn update_rules(&mut self, dirty: &mut Dirty) {
        if dirty.added_groups.is_empty()
            && dirty.removed_groups.is_empty()
            && dirty.relabelled.is_empty()
            && (dirty.changed_groups.is_empty() || !self.opts.ipblock_matches_pods)
        {
            return;
        }
        let relabelled: Vec<u32> = dirty
            .relabelled
            .iter()
            .flat_map(|ns| self.by_ns.get(ns).into_iter().flatten().copied())
            .collect();
        let groups_changed = !dirty.added_groups.is_empty() || !dirty.removed_groups.is_empty();
        let mut updates: Vec<(String, String, bool, usize, u32, bool)> = Vec::new();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for (ns, m) in &self.policies {
            for (name, st) in m {
                let p = &st.policy;
                for (ingress, rules, states) in [
                    (true, &p.ingress, &st.ingress),
                    (false, &p.egress, &st.egress),
                ] {
                    for (i, (rule, rs)) in rules.iter().zip(states).enumerate() {
                        if rs.any {
                            // Named ports towards any peer resolve on every identity.
                            if groups_changed && !ingress && has_named(rule) {
                                touched.insert(ns.clone());
                            }
                            continue;
                        }
                        let by_ns = rule.peers.iter().any(|p| {
                            matches!(
                                p,
                                PeerSpec::Namespaces(_) | PeerSpec::PodsInNamespaces { .. }
                            )
                        });
                        let by_ip = self.opts.ipblock_matches_pods
                            && rule
                                .peers
                                .iter()
                                .any(|p| matches!(p, PeerSpec::IpBlock { .. }));
                        let mut candidates: Vec<u32> = dirty.added_groups.iter().copied().collect();
                        if by_ns {
                            candidates.extend(&relabelled);
                        }
                        if by_ip {
                            candidates.extend(&dirty.changed_groups);
                        }
                        for id in candidates {
                            let now = self.admits(p, rule, id);
                            if now != rs.groups.contains(&id) {
                                updates.push((ns.clone(), name.clone(), ingress, i, id, now));
                            }
                        }
                        for id in &dirty.removed_groups {
                            if rs.groups.contains(id) {
                                updates.push((ns.clone(), name.clone(), ingress, i, *id, false));
                            }
                        }
                    }
                }
            }
        }
        for (ns, name, ingress, i, id, add) in updates {
            let st = self
                .policies
                .get_mut(&ns)
                .and_then(|m| m.get_mut(&name))
                .expect("a rule's policy");
            let rs = if ingress {
                &mut st.ingress[i]
            } else {
                &mut st.egress[i]
            };
            if add {
                rs.groups.insert(id);
            } else {
                rs.groups.remove(&id);
            }
            touched.insert(ns);
        }
        dirty.namespaces.extend(touched);
    }

    /// The identities of the non-pod prefixes an ipBlock peer contains.
    fn prefixes_of(&self, rule: &Rule) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for peer in &rule.peers {
            if let PeerSpec::IpBlock { cidr, except } = peer {
                for (n, id) in &self.nonpod {
                    if cidr.contains(n) && !except.iter().any(|e| e.contains(n)) {
                        out.insert(*id);
                    }
                }
            }
        }
        out
    }

    /// Recomputes the ipBlock rules' prefixes after the non-pod prefixes changed.
    fn update_prefixes(&mut self, dirty: &mut Dirty) {
        let mut updates = Vec::new();
        for (ns, m) in &self.policies {
            for (name, st) in m {
                let p = &st.policy;
                for (ingress, rules, states) in [
                    (true, &p.ingress, &st.ingress),
                    (false, &p.egress, &st.egress),
                ] {
                    for (i, (rule, rs)) in rules.iter().zip(states).enumerate() {
                        if rs.any
                            || !rule
                                .peers
                                .iter()
                                .any(|p| matches!(p, PeerSpec::IpBlock { .. }))
                        {
                            continue;
                        }
                        let now = self.prefixes_of(rule);
                        if now != rs.prefixes {
                            updates.push((ns.clone(), name.clone(), ingress, i, now));
                        }
                    }
                }
            }
        }
        for (ns, name, ingress, i, now) in updates {
            let st = self
                .policies
                .get_mut(&ns)
                .and_then(|m| m.get_mut(&name))
                .expect("a rule's policy");
            let rs = if ingress {
                &mut st.ingress[i]
            } else {
                &mut st.egress[i]
            };
            rs.prefixes = now;
            dirty.namespaces.insert(ns);
        }
    }

    /// A policy with its rules computed whole, or not at all.
    fn policy_state(&self, policy: Arc<Policy>, compute: bool) -> PolicyState {
        if !compute {
            return PolicyState {
                policy,
                computed: false,
                ingress: Vec::new(),
                egress: Vec::new(),
            };
        }
        let rules = |rules: &[Rule]| -> Vec<RuleState> {
            rules
                .iter()
                .map(|rule| {
                    if rule.peers.is_empty() {
                        return RuleState {
                            any: true,
                            ..Default::default()
                        };
                    }
                    let mut groups = BTreeSet::new();
                    for peer in &rule.peers {
                        let one = Rule {
                            peers: vec![peer.clone()],
                            ports: Vec::new(),
                        };
                        let candidates: Box<dyn Iterator<Item = u32>> = match peer {
                            PeerSpec::Pods(_) => Box::new(
                                self.by_ns
                                    .get(&policy.namespace)
                                    .into_iter()
                                    .flatten()
                                    .copied(),
                            ),
                            PeerSpec::Namespaces(sel)
                            | PeerSpec::PodsInNamespaces {
                                namespaces: sel, ..
                            } => Box::new(
                                self.by_ns
                                    .iter()
                                    .filter(|(ns, _)| sel.matches(self.ns_labels(ns)))
                                    .flat_map(|(_, ids)| ids.iter().copied()),
                            ),
                            PeerSpec::IpBlock { .. } if self.opts.ipblock_matches_pods => {
                                Box::new(self.groups.keys().copied())
                            }
                            PeerSpec::IpBlock { .. } => Box::new(std::iter::empty()),
                        };
                        groups.extend(candidates.filter(|id| self.admits(&policy, &one, *id)));
                    }
                    RuleState {
                        any: false,
                        groups,
                        prefixes: self.prefixes_of(rule),
                    }
                })
                .collect()
        };
        PolicyState {
            computed: true,
            ingress: rules(&policy.ingress),
            egress: rules(&policy.egress),
            policy,
        }
    }

    /// Recomputes the ipcache entries at `keys` from the layers: a pod's address (the last pod
    /// of it in key order) over the base, the base over an ipBlock network. Returns whether
    /// the non-pod prefixes changed.
    fn update_ipcache(&mut self, keys: &BTreeSet<IpNet>, alloc: &mut Allocator) -> bool {
        let mut nonpod_changed = false;
        for net in keys {
            let pod = (net.prefix_len() == net.max_prefix_len())
                .then(|| self.ip_owners.get(&net.addr()))
                .flatten()
                .and_then(|o| o.last())
                .and_then(|k| Some((self.pods.get(k)?, *self.pod_group.get(k)?)));
            let new = if let Some((p, id)) = pod {
                let kind = if p.node == self.node {
                    RemoteKind::LocalPod
                } else {
                    RemoteKind::RemotePod
                };
                Some(compile::entry(id, kind))
            } else if let Some(e) = self.base.get(net) {
                Some(*e)
            } else if self.cidrs.contains(net) {
                Some(compile::cidr_entry(*net, alloc))
            } else {
                None
            };
            let old = match new {
                Some(e) => self.desired.ipcache.insert(*net, e),
                None => self.desired.ipcache.remove(net),
            };
            if old != new {
                self.changes.ipcache.entry(*net).or_insert(old);
            }
            let np = new
                .filter(|e| !compile::is_pod_address(net, e))
                .map(|e| e.identity);
            let was = match np {
                Some(id) => self.nonpod.insert(*net, id),
                None => self.nonpod.remove(net),
            };
            nonpod_changed |= was != np;
        }
        nonpod_changed
    }

    /// Recompiles the dirty local endpoints and their addresses in the endpoints map.
    fn update_endpoints(&mut self, mut dirty: Dirty, alloc: &mut Allocator) {
        let mut todo = std::mem::take(&mut dirty.endpoints);
        if !dirty.namespaces.is_empty() {
            todo.extend(
                self.local
                    .keys()
                    .filter(|k| dirty.namespaces.contains(&k.0))
                    .cloned(),
            );
        }
        let mut results = Vec::new();
        for k in &todo {
            let Some(pod) = self.pods.get(k).filter(|p| self.is_local(p)) else {
                results.push((k.clone(), None));
                continue;
            };
            let ep = alloc.endpoint(&pod.namespace, &pod.name);
            let in_ns = self
                .policies
                .get(&pod.namespace)
                .into_iter()
                .flat_map(|m| m.values().map(|s| &*s.policy));
            let (flags, entries) = compile::endpoint_policy(pod, ep, in_ns, &*self, alloc);
            dirty.endpoint_ips.extend(pod.ips.iter().copied());
            results.push((k.clone(), Some((ep, flags, entries))));
        }
        for (k, res) in results {
            let old_keys = self.local.remove(&k).map(|e| e.keys).unwrap_or_default();
            let new_keys: Vec<PolicyKey> = match &res {
                Some((_, _, entries)) => entries.keys().copied().collect(),
                None => Vec::new(),
            };
            for key in &old_keys {
                if res.as_ref().is_none_or(|(_, _, e)| !e.contains_key(key)) {
                    if let Some(old) = self.desired.policy.remove(key) {
                        self.changes.policy.entry(*key).or_insert(Some(old));
                    }
                }
            }
            if let Some((ep, flags, entries)) = res {
                for (key, v) in entries {
                    let old = self.desired.policy.insert(key, v);
                    if old != Some(v) {
                        self.changes.policy.entry(key).or_insert(old);
                    }
                }
                self.local.insert(
                    k,
                    Endpoint {
                        info: EndpointInfo { id: ep, flags },
                        keys: new_keys,
                    },
                );
            }
        }
        for ip in dirty.endpoint_ips {
            let new = self
                .local_ip_owners
                .get(&ip)
                .and_then(|o| o.last())
                .and_then(|k| Some(self.local.get(k)?.info));
            let old = match new {
                Some(e) => self.desired.endpoints.insert(ip, e),
                None => self.desired.endpoints.remove(&ip),
            };
            if old != new {
                self.changes.endpoints.entry(ip).or_insert(old);
            }
        }
    }
}

/// The same object, or an equal one.
fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

/// The element of key `k` in `v`, sorted by key.
fn find<'a, T>(
    v: &'a [Arc<T>],
    k: &PodKey,
    key: impl Fn(&T) -> (&String, &String),
) -> Option<&'a Arc<T>> {
    v.binary_search_by(|x| key(x).cmp(&(&k.0, &k.1)))
        .ok()
        .map(|i| &v[i])
}

fn has_named(rule: &Rule) -> bool {
    rule.ports
        .iter()
        .any(|p| matches!(p.port, super::model::PortSpec::Named(_)))
}

static NO_IDS: BTreeSet<u32> = BTreeSet::new();

impl View for Incremental {
    fn peers(&self, pol: &Policy, ingress: bool, index: usize) -> PeerIds<'_> {
        let rs = self
            .policies
            .get(&pol.namespace)
            .and_then(|m| m.get(&pol.name))
            .and_then(|st| {
                if ingress {
                    st.ingress.get(index)
                } else {
                    st.egress.get(index)
                }
            });
        debug_assert!(rs.is_some(), "{}: rule not computed", pol.id());
        match rs {
            Some(rs) if rs.any => PeerIds {
                any: true,
                sets: [&NO_IDS, &NO_IDS],
            },
            Some(rs) => PeerIds {
                any: false,
                sets: [&rs.groups, &rs.prefixes],
            },
            // Never for a local pod's namespace; should it happen, the rule allows nothing.
            None => PeerIds {
                any: false,
                sets: [&NO_IDS, &NO_IDS],
            },
        }
    }

    fn named_targets(&self, peers: &PeerIds<'_>) -> Vec<(u32, &[(String, u16, Protocol)])> {
        if peers.any {
            self.groups
                .iter()
                .map(|(id, g)| (*id, g.ports.as_slice()))
                .collect()
        } else {
            peers.sets[0]
                .iter()
                .filter_map(|id| Some((*id, self.groups.get(id)?.ports.as_slice())))
                .collect()
        }
    }

    fn audited(&self, pol: &Policy) -> bool {
        self.opts.audit_all || pol.audit || self.audit_namespaces.contains(&pol.namespace)
    }
}

/// One map write of a sync: the entry's new value, or its removal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapWrite {
    Endpoint(IpAddr, Option<EndpointInfo>),
    Ipcache(IpNet, Option<IpcacheEntry>),
    Policy(PolicyKey, Option<PolicyEntry>),
    Service((IpAddr, u8, u16), Option<u32>),
}

/// The writes that move the maps from the state `changes` started from to `want`, ordered so
/// that no state in between allows a connection that both the old and the new state deny:
/// first what tightens (entries that go, new endpoints, endpoints isolated in either state),
/// then the ipcache and Services, then what loosens (entries that come, the endpoints' final
/// flags, endpoints that go).
/// Between the phases an endpoint's allows are those of both states and its isolation that
/// of either, so each side of a connection passes only what both states let through.
pub fn ordered_writes(changes: &Changes, want: &Desired) -> Vec<MapWrite> {
    let mut first = Vec::new();
    let mut middle = Vec::new();
    let mut last = Vec::new();
    for (k, old) in &changes.policy {
        let new = want.policy.get(k).copied();
        match (old, new) {
            (Some(_), None) => first.push(MapWrite::Policy(*k, None)),
            (o, Some(n)) if *o != Some(n) => last.push(MapWrite::Policy(*k, Some(n))),
            _ => {}
        }
    }
    for (ip, old) in &changes.endpoints {
        let new = want.endpoints.get(ip).copied();
        if *old == new {
            continue;
        }
        if let (None, Some(n)) = (old, new) {
            // A new endpoint is isolated before it gets an address in the ipcache or its
            // allows: until then it passes nothing that its policies do not.
            first.push(MapWrite::Endpoint(*ip, Some(n)));
            continue;
        }
        if let (Some(o), Some(n)) = (old, new) {
            let both = EndpointInfo {
                id: n.id,
                flags: o.flags | n.flags,
            };
            if both != *o && both != n {
                first.push(MapWrite::Endpoint(*ip, Some(both)));
            }
            if both == n {
                first.push(MapWrite::Endpoint(*ip, Some(n)));
                continue;
            }
        }
        last.push(MapWrite::Endpoint(*ip, new));
    }
    for (net, old) in &changes.ipcache {
        let new = want.ipcache.get(net).copied();
        if *old != new {
            middle.push(MapWrite::Ipcache(*net, new));
        }
    }
    for (k, old) in &changes.services {
        let new = want.services.get(k).copied();
        if *old != new {
            middle.push(MapWrite::Service(*k, new));
        }
    }
    first.extend(middle);
    first.extend(last);
    first
}
