//! The incremental compile: the same maps as [`compile::compile`], kept up to date from one
//! cluster snapshot to the next by recomputing only what a change touches. A pod's change moves
//! it between identities and its addresses in the ipcache; an identity that appears or goes is
//! tried against the distinct peers of the rules (a selector cache); a namespace's labels
//! against the peers that select namespaces; a policy recomputes its own rules. Only the local
//! endpoints whose policies or rules changed are recompiled, with the same per-endpoint
//! function as the full compile.
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
use crate::cluster::{Cluster, Named, NodeInfo, PodInfo, PodRef, ServiceInfo};

type PodKey = crate::cluster::Key;
type PolicyKey = (u32, PolicyKeyData);

/// A peer as the rules of a policy in a namespace name it: pod selectors are relative to the
/// policy's namespace, the other peers are not, so rules in every namespace share them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SelectorKey {
    peer: PeerSpec,
    namespace: Option<String>,
}

/// The identities one peer stands for, kept once for every rule naming it (as Cilium's
/// selector cache): pod identities, and the identities of the prefixes its ipBlock contains.
#[derive(Debug)]
struct CachedSelector {
    key: SelectorKey,
    groups: BTreeSet<u32>,
    prefixes: BTreeSet<u32>,
    /// Rules naming it, by their policy's namespace.
    users: BTreeMap<String, usize>,
}

/// What a rule's peers stand for: any peer, or its selectors' identities.
#[derive(Default, Debug)]
struct RuleState {
    any: bool,
    selectors: Vec<usize>,
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
    namespace: Arc<str>,
    labels: Arc<BTreeMap<String, String>>,
    ports: Arc<[crate::cluster::ContainerPort]>,
    members: BTreeSet<PodRef>,
}

/// A local endpoint as last compiled.
#[derive(Debug)]
struct Endpoint {
    info: EndpointInfo,
    keys: Vec<PolicyKey>,
}

/// The change log as it is written: an entry's value before each of its changes, in the order
/// of the changes ([`Log::take`] keeps the first per entry). Vectors rather than maps for the
/// same reason as [`Dirty::ipcache`].
#[derive(Default, Debug)]
struct Log {
    endpoints: Vec<(IpAddr, Option<EndpointInfo>)>,
    ipcache: Vec<(IpNet, Option<IpcacheEntry>)>,
    policy: Vec<(PolicyKey, Option<PolicyEntry>)>,
    services: Vec<((IpAddr, u8, u16), Option<u32>)>,
}

impl Log {
    fn take(&mut self) -> Changes {
        fn first_old<K: Ord, V>(mut v: Vec<(K, V)>) -> BTreeMap<K, V> {
            // Stable: of one key's entries, the first holds the value before the update.
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v.dedup_by(|later, first| later.0 == first.0);
            v.into_iter().collect()
        }
        let log = std::mem::take(self);
        Changes {
            endpoints: first_old(log.endpoints),
            ipcache: first_old(log.ipcache),
            policy: first_old(log.policy),
            services: first_old(log.services),
        }
    }
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
    pub pods: Option<BTreeSet<crate::cluster::Key>>,
    pub policies: Option<BTreeSet<crate::cluster::Key>>,
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
    /// Sorted, without duplicates.
    pub ips: Vec<IpAddr>,
    /// Pods that are gone.
    pub gone: Vec<PodKey>,
}

/// What one update found changed, before the derived work.
#[derive(Default)]
struct Dirty {
    /// Namespaces whose local endpoints are recompiled.
    namespaces: BTreeSet<String>,
    endpoints: BTreeSet<PodKey>,
    endpoint_ips: BTreeSet<IpAddr>,
    /// A vector, sorted before use: a full update names every address, and a tree's nodes,
    /// freed among the ones that stay, would leave the heap in holes malloc cannot return.
    ipcache: Vec<IpNet>,
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
    /// The pods by (namespace, name): a set of the shared pods, looked up by key through
    /// [`Named`], so the index holds no key of its own.
    pods: BTreeSet<PodRef>,
    /// Namespace -> name -> policy with its rules' peers.
    policies: BTreeMap<String, BTreeMap<String, PolicyState>>,
    groups: BTreeMap<u32, Group>,
    by_ns: HashMap<String, BTreeSet<u32>>,
    /// ipcache layers: nodes and the world; pod addresses with their pods; ipBlock networks.
    base: BTreeMap<IpNet, IpcacheEntry>,
    /// A tree, not a hash table: at 250,000 addresses a table's doubling costs twice the
    /// memory for lookups that happen only per changed pod.
    ip_owners: BTreeMap<IpAddr, Owners>,
    cidrs: BTreeSet<IpNet>,
    /// Every ipcache prefix that is not a pod address, with its identity (ipBlock containment).
    nonpod: BTreeMap<IpNet, u32>,
    local: BTreeMap<PodKey, Endpoint>,
    /// The selectors of the computed rules, by index; freed slots are reused.
    selectors: Vec<Option<CachedSelector>>,
    selector_index: HashMap<SelectorKey, usize>,
    free_selectors: Vec<usize>,
    /// Namespace -> computed egress rules towards any peer with named ports: they resolve on
    /// every identity.
    any_named: BTreeMap<String, usize>,
    /// Namespace -> how many local pods it has.
    local_ns: HashMap<String, usize>,
    local_ip_owners: HashMap<IpAddr, Owners>,
    desired: Desired,
    changes: Log,
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
            pods: BTreeSet::new(),
            policies: BTreeMap::new(),
            groups: BTreeMap::new(),
            by_ns: HashMap::new(),
            base: BTreeMap::new(),
            ip_owners: BTreeMap::new(),
            cidrs: BTreeSet::new(),
            nonpod: BTreeMap::new(),
            local: BTreeMap::new(),
            selectors: Vec::new(),
            selector_index: HashMap::new(),
            free_selectors: Vec::new(),
            any_named: BTreeMap::new(),
            local_ns: HashMap::new(),
            local_ip_owners: HashMap::new(),
            desired: Desired::default(),
            changes: Log::default(),
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
        self.changes.take()
    }

    /// What the last update changed outside the maps.
    pub fn touched(&self) -> &Touched {
        &self.touched
    }

    /// The pod an address stands for (the last of its pods in key order), as the ipcache.
    pub fn pod_at(&self, ip: &IpAddr) -> Option<&Arc<PodInfo>> {
        self.ip_owners.get(ip)?.last().map(|(p, _)| &p.0)
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
        let mut forget = Vec::new();
        for ns in std::mem::take(&mut dirty.local_ns) {
            let active = self.local_ns.contains_key(&ns);
            for (name, st) in self.policies.get_mut(&ns).into_iter().flatten() {
                if active && !st.computed {
                    changed_policies
                        .entry((ns.as_str().into(), name.as_str().into()))
                        .or_insert_with(|| Some(st.policy.clone()));
                } else if !active && st.computed {
                    st.computed = false;
                    forget.push((
                        st.policy.clone(),
                        std::mem::take(&mut st.ingress),
                        std::mem::take(&mut st.egress),
                    ));
                }
            }
        }
        for (p, ingress, egress) in forget {
            self.release_rules(&p, &ingress, &egress);
        }
        // Existing rules against the identities and namespaces that changed; changed
        // policies are computed whole below.
        for (ns, name) in changed_policies.keys() {
            if let Some(st) = self.policies.get_mut(&**ns).and_then(|m| m.remove(&**name)) {
                dirty.namespaces.insert(st.policy.namespace.clone());
                self.release_rules(&st.policy, &st.ingress, &st.egress);
            }
        }
        self.update_selectors(&mut dirty);
        if first || !changed_policies.is_empty() {
            let cidrs = compile::ipblock_nets(&cluster.policies);
            dirty
                .ipcache
                .extend(self.cidrs.symmetric_difference(&cidrs));
            self.cidrs = cidrs;
        }
        dirty.ipcache.sort_unstable();
        dirty.ipcache.dedup();
        let nonpod_changed = self.update_ipcache(&dirty.ipcache, alloc);
        if nonpod_changed {
            self.update_prefixes(&mut dirty);
        }
        for ((ns, name), p) in changed_policies {
            if let Some(p) = p {
                let st = self.policy_state(p, self.local_ns.contains_key(&*ns));
                dirty.namespaces.insert(ns.to_string());
                self.policies
                    .entry(ns.to_string())
                    .or_default()
                    .insert(name.to_string(), st);
            }
        }
        self.policies.retain(|_, m| !m.is_empty());
        self.update_endpoints(dirty, alloc);
        self.touched.ips.sort_unstable();
        self.touched.ips.dedup();
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
        let keys: BTreeSet<_> = self
            .desired
            .services
            .keys()
            .chain(new.keys())
            .copied()
            .collect();
        for k in keys {
            let v = new.get(&k).copied();
            set_logged(&mut self.desired.services, &mut self.changes.services, k, v);
        }
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
                out.insert((k.0.into(), k.1.into()), Some((*p).clone()));
            }
        }
        for (ns, m) in &self.policies {
            for name in m.keys() {
                if !seen.contains_key(&(ns.as_str(), name.as_str())) {
                    out.insert((ns.as_str().into(), name.as_str().into()), None);
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
            let old = self.policies.get(&*k.0).and_then(|m| m.get(&*k.1));
            if differs(old.map(|o| &o.policy), new) {
                out.insert(k.clone(), new.cloned());
            }
        }
        out
    }

    /// Pods added, removed or changed, with what they are now, from the whole snapshot.
    fn diff_pods(&self, cluster: &Cluster) -> Vec<(PodKey, Option<Arc<PodInfo>>)> {
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
                (Some(o), None) => {
                    changed.push((o.0.key(), None));
                    old.next();
                }
                (None, Some(p)) => {
                    changed.push((p.key(), Some((*p).clone())));
                    it.next();
                }
                (Some(o), Some(p)) => match o.names().cmp(&(&p.namespace, &p.name)) {
                    std::cmp::Ordering::Less => {
                        changed.push((o.0.key(), None));
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        changed.push((p.key(), Some((*p).clone())));
                        it.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if !same(&o.0, p) {
                            changed.push((p.key(), Some((*p).clone())));
                        }
                        old.next();
                        it.next();
                    }
                },
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
            if differs(self.pods.get(k as &dyn Named).map(|p| &p.0), new) {
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
            if let Some(PodRef(old)) = self.pods.take(&k as &dyn Named) {
                self.remove_pod(&k, &old, dirty);
                self.touched.ips.extend(old.ips.iter().copied());
                if new.is_none() {
                    self.touched.gone.push(k.clone());
                }
            }
            if let Some(p) = new {
                self.touched.ips.extend(p.ips.iter().copied());
                self.add_pod(&k, &p, alloc, dirty);
                self.pods.insert(PodRef(p));
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
        *p.node == *self.node && !p.host_network
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

    fn remove_pod(&mut self, k: &PodKey, p: &Arc<PodInfo>, dirty: &mut Dirty) {
        let r = PodRef(p.clone());
        // A pod with an address has a group, found with its first address.
        let group = p
            .ips
            .first()
            .and_then(|ip| self.ip_owners.get(ip)?.group_of(&r));
        if let Some(id) = group {
            let g = self.groups.get_mut(&id).expect("a pod's group");
            g.members.remove(&r);
            if g.members.is_empty() {
                let g = self.groups.remove(&id).expect("a pod's group");
                if let Some(ids) = self.by_ns.get_mut(&*g.namespace) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.by_ns.remove(&*g.namespace);
                    }
                }
                dirty.removed_groups.insert(id);
            } else {
                dirty.changed_groups.insert(id);
            }
            for ip in &p.ips {
                if let Some(o) = self.ip_owners.get_mut(ip) {
                    o.remove(&r);
                    if o.is_empty() {
                        self.ip_owners.remove(ip);
                    }
                }
                dirty.ipcache.push(IpNet::from(*ip));
            }
        }
        if self.is_local(p) {
            self.count_local(&p.namespace, false, dirty);
            dirty.endpoints.insert(k.clone());
            for ip in &p.ips {
                if let Some(o) = self.local_ip_owners.get_mut(ip) {
                    o.remove(&r);
                    if o.is_empty() {
                        self.local_ip_owners.remove(ip);
                    }
                }
                dirty.endpoint_ips.insert(*ip);
            }
        }
    }

    fn add_pod(&mut self, k: &PodKey, p: &Arc<PodInfo>, alloc: &mut Allocator, dirty: &mut Dirty) {
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
            g.members.insert(PodRef(p.clone()));
            if !dirty.added_groups.contains(&id) {
                dirty.changed_groups.insert(id);
            }
            self.by_ns
                .entry(p.namespace.to_string())
                .or_default()
                .insert(id);
            for ip in &p.ips {
                self.ip_owners
                    .entry(*ip)
                    .or_default()
                    .insert(PodRef(p.clone()), id);
                dirty.ipcache.push(IpNet::from(*ip));
            }
        }
        if self.is_local(p) {
            self.count_local(&p.namespace, true, dirty);
            dirty.endpoints.insert(k.clone());
            for ip in &p.ips {
                self.local_ip_owners
                    .entry(*ip)
                    .or_default()
                    .insert(PodRef(p.clone()), 0);
                dirty.endpoint_ips.insert(*ip);
            }
        }
    }

    fn ns_labels(&self, ns: &str) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.namespaces.get(ns).unwrap_or(&EMPTY)
    }

    /// Whether pod identity `id` is one of the identities selector `key` stands for.
    fn admits(&self, key: &SelectorKey, id: u32) -> bool {
        let Some(g) = self.groups.get(&id) else {
            return false;
        };
        match &key.peer {
            PeerSpec::Pods(sel) => {
                key.namespace.as_deref() == Some(&*g.namespace) && sel.matches(&g.labels)
            }
            PeerSpec::Namespaces(nsel) => nsel.matches(self.ns_labels(&g.namespace)),
            PeerSpec::PodsInNamespaces { namespaces, pods } => {
                namespaces.matches(self.ns_labels(&g.namespace)) && pods.matches(&g.labels)
            }
            PeerSpec::IpBlock { cidr, except } => {
                self.opts.ipblock_matches_pods
                    && compile::all_in_block(
                        cidr,
                        except,
                        g.members.iter().flat_map(|p| p.0.ips.iter()),
                    )
            }
        }
    }

    /// The selectors against the identities that appeared, went or changed members, and the
    /// namespaces whose labels changed; the namespaces of the rules naming a selector that
    /// changed are recompiled.
    fn update_selectors(&mut self, dirty: &mut Dirty) {
        let groups_changed = !dirty.added_groups.is_empty() || !dirty.removed_groups.is_empty();
        if groups_changed {
            // Named ports towards any peer resolve on every identity.
            dirty.namespaces.extend(self.any_named.keys().cloned());
        }
        if !groups_changed
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
        let mut updates: Vec<(usize, u32, bool)> = Vec::new();
        for (i, sel) in self.selectors.iter().enumerate() {
            let Some(sel) = sel else { continue };
            let mut candidates: Vec<u32> = dirty.added_groups.iter().copied().collect();
            match sel.key.peer {
                PeerSpec::Namespaces(_) | PeerSpec::PodsInNamespaces { .. } => {
                    candidates.extend(&relabelled)
                }
                PeerSpec::IpBlock { .. } if self.opts.ipblock_matches_pods => {
                    candidates.extend(&dirty.changed_groups)
                }
                _ => {}
            }
            for id in candidates {
                let now = self.admits(&sel.key, id);
                if now != sel.groups.contains(&id) {
                    updates.push((i, id, now));
                }
            }
            for id in &dirty.removed_groups {
                if sel.groups.contains(id) {
                    updates.push((i, *id, false));
                }
            }
        }
        for (i, id, add) in updates {
            let sel = self.selectors[i].as_mut().expect("a live selector");
            if add {
                sel.groups.insert(id);
            } else {
                sel.groups.remove(&id);
            }
            dirty.namespaces.extend(sel.users.keys().cloned());
        }
    }

    /// The identities of the non-pod prefixes an ipBlock peer contains.
    fn prefixes_of(&self, peer: &PeerSpec) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        if let PeerSpec::IpBlock { cidr, except } = peer {
            for (n, id) in &self.nonpod {
                if compile::in_block(cidr, except, n) {
                    out.insert(*id);
                }
            }
        }
        out
    }

    /// Recomputes the ipBlock selectors' prefixes after the non-pod prefixes changed.
    fn update_prefixes(&mut self, dirty: &mut Dirty) {
        let mut updates = Vec::new();
        for (i, sel) in self.selectors.iter().enumerate() {
            let Some(sel) = sel else { continue };
            if matches!(sel.key.peer, PeerSpec::IpBlock { .. }) {
                let now = self.prefixes_of(&sel.key.peer);
                if now != sel.prefixes {
                    updates.push((i, now));
                }
            }
        }
        for (i, now) in updates {
            let sel = self.selectors[i].as_mut().expect("a live selector");
            sel.prefixes = now;
            dirty.namespaces.extend(sel.users.keys().cloned());
        }
    }

    /// The selector for `peer` in a policy of namespace `ns`, computed if no rule named it yet;
    /// counts one more user.
    fn selector(&mut self, peer: &PeerSpec, ns: &str) -> usize {
        let key = SelectorKey {
            peer: peer.clone(),
            namespace: matches!(peer, PeerSpec::Pods(_)).then(|| ns.to_string()),
        };
        let i = match self.selector_index.get(&key) {
            Some(i) => *i,
            None => {
                let candidates: Vec<u32> = match peer {
                    PeerSpec::Pods(_) => {
                        self.by_ns.get(ns).into_iter().flatten().copied().collect()
                    }
                    PeerSpec::Namespaces(sel)
                    | PeerSpec::PodsInNamespaces {
                        namespaces: sel, ..
                    } => self
                        .by_ns
                        .iter()
                        .filter(|(ns, _)| sel.matches(self.ns_labels(ns)))
                        .flat_map(|(_, ids)| ids.iter().copied())
                        .collect(),
                    PeerSpec::IpBlock { .. } if self.opts.ipblock_matches_pods => {
                        self.groups.keys().copied().collect()
                    }
                    PeerSpec::IpBlock { .. } => Vec::new(),
                };
                let sel = CachedSelector {
                    groups: candidates
                        .into_iter()
                        .filter(|id| self.admits(&key, *id))
                        .collect(),
                    prefixes: self.prefixes_of(peer),
                    users: BTreeMap::new(),
                    key: key.clone(),
                };
                let i = match self.free_selectors.pop() {
                    Some(i) => {
                        self.selectors[i] = Some(sel);
                        i
                    }
                    None => {
                        self.selectors.push(Some(sel));
                        self.selectors.len() - 1
                    }
                };
                self.selector_index.insert(key, i);
                i
            }
        };
        let sel = self.selectors[i].as_mut().expect("a live selector");
        *sel.users.entry(ns.to_string()).or_default() += 1;
        i
    }

    /// Counts one user less for the rules of `p`; a selector no rule names is dropped.
    fn release_rules(&mut self, p: &Policy, ingress: &[RuleState], egress: &[RuleState]) {
        for (rules, states, is_ingress) in [(&p.ingress, ingress, true), (&p.egress, egress, false)]
        {
            for (rule, rs) in rules.iter().zip(states) {
                if rs.any && !is_ingress && has_named(rule) {
                    release_count(&mut self.any_named, &p.namespace);
                }
                for &i in &rs.selectors {
                    let sel = self.selectors[i].as_mut().expect("a live selector");
                    release_count(&mut sel.users, &p.namespace);
                    if sel.users.is_empty() {
                        let sel = self.selectors[i].take().expect("a live selector");
                        self.selector_index.remove(&sel.key);
                        self.free_selectors.push(i);
                    }
                }
            }
        }
    }

    /// A policy with its rules computed, or not at all.
    fn policy_state(&mut self, policy: Arc<Policy>, compute: bool) -> PolicyState {
        let mut st = PolicyState {
            computed: compute,
            ingress: Vec::new(),
            egress: Vec::new(),
            policy,
        };
        if !compute {
            return st;
        }
        let p = st.policy.clone();
        for (rules, is_ingress) in [(&p.ingress, true), (&p.egress, false)] {
            let mut states = Vec::new();
            for rule in rules {
                let rs = if rule.peers.is_empty() {
                    if !is_ingress && has_named(rule) {
                        *self.any_named.entry(p.namespace.clone()).or_default() += 1;
                    }
                    RuleState {
                        any: true,
                        selectors: Vec::new(),
                    }
                } else {
                    RuleState {
                        any: false,
                        selectors: rule
                            .peers
                            .iter()
                            .map(|peer| self.selector(peer, &p.namespace))
                            .collect(),
                    }
                };
                states.push(rs);
            }
            if is_ingress {
                st.ingress = states;
            } else {
                st.egress = states;
            }
        }
        st
    }

    /// Recomputes the ipcache entries at `keys` from the layers: a pod's address (the last pod
    /// of it in key order) over the base, the base over an ipBlock network. Returns whether
    /// the non-pod prefixes changed.
    fn update_ipcache(&mut self, keys: &[IpNet], alloc: &mut Allocator) -> bool {
        let mut nonpod_changed = false;
        for net in keys {
            let pod = (net.prefix_len() == net.max_prefix_len())
                .then(|| self.ip_owners.get(&net.addr()))
                .flatten()
                .and_then(|o| o.last())
                .map(|(p, id)| (&p.0, *id));
            let new = if let Some((p, id)) = pod {
                let kind = if *p.node == *self.node {
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
            set_logged(
                &mut self.desired.ipcache,
                &mut self.changes.ipcache,
                *net,
                new,
            );
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
                    .filter(|k| dirty.namespaces.contains(&*k.0))
                    .cloned(),
            );
        }
        let mut results = Vec::new();
        for k in &todo {
            let Some(pod) = self
                .pods
                .get(k as &dyn Named)
                .map(|p| &p.0)
                .filter(|p| self.is_local(p))
            else {
                results.push((k.clone(), None));
                continue;
            };
            let ep = alloc.endpoint(&pod.namespace, &pod.name);
            let in_ns = self
                .policies
                .get(&*pod.namespace)
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
                    set_logged(
                        &mut self.desired.policy,
                        &mut self.changes.policy,
                        *key,
                        None,
                    );
                }
            }
            if let Some((ep, flags, entries)) = res {
                for (key, v) in entries {
                    set_logged(
                        &mut self.desired.policy,
                        &mut self.changes.policy,
                        key,
                        Some(v),
                    );
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
                .and_then(|(p, _)| Some(self.local.get(&p.0.key())?.info));
            set_logged(
                &mut self.desired.endpoints,
                &mut self.changes.endpoints,
                ip,
                new,
            );
        }
    }
}

/// The same object, or an equal one.
fn same<T: PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
    Arc::ptr_eq(a, b) || **a == **b
}

/// Whether an object was added, removed or changed.
fn differs<T: PartialEq>(old: Option<&Arc<T>>, new: Option<&Arc<T>>) -> bool {
    match (old, new) {
        (Some(o), Some(n)) => !same(o, n),
        (o, n) => o.is_some() != n.is_some(),
    }
}

/// Sets `k` to `new` in `map` and, if that changes it, logs its earlier value in `log`.
fn set_logged<K: Ord + Copy, V: PartialEq + Copy>(
    map: &mut BTreeMap<K, V>,
    log: &mut Vec<(K, Option<V>)>,
    k: K,
    new: Option<V>,
) {
    let old = match new {
        Some(v) => map.insert(k, v),
        None => map.remove(&k),
    };
    if old != new {
        log.push((k, old));
    }
}

/// The element of key `k` in `v`, sorted by key.
fn find<'a, T>(
    v: &'a [Arc<T>],
    k: &PodKey,
    key: impl Fn(&T) -> (&str, &str),
) -> Option<&'a Arc<T>> {
    v.binary_search_by(|x| key(x).cmp(&(&*k.0, &*k.1)))
        .ok()
        .map(|i| &v[i])
}

fn has_named(rule: &Rule) -> bool {
    rule.ports
        .iter()
        .any(|p| matches!(p.port, super::model::PortSpec::Named(_)))
}

/// The pods holding one address, in key order, with their identities. Almost always one,
/// kept inline: a vector would cost an allocation per address (a set, a tree node).
#[derive(Debug, Default)]
enum Owners {
    #[default]
    None,
    One((PodRef, u32)),
    Many(Vec<(PodRef, u32)>),
}

impl Owners {
    fn as_slice(&self) -> &[(PodRef, u32)] {
        match self {
            Owners::None => &[],
            Owners::One(o) => std::slice::from_ref(o),
            Owners::Many(v) => v,
        }
    }

    fn find(&self, p: &PodRef) -> Result<usize, usize> {
        self.as_slice().binary_search_by(|(o, _)| o.cmp(p))
    }

    fn insert(&mut self, p: PodRef, id: u32) {
        let at = self.find(&p);
        match (std::mem::take(self), at) {
            (Owners::None, _) => *self = Owners::One((p, id)),
            (Owners::One(_), Ok(_)) => *self = Owners::One((p, id)),
            (Owners::One(o), Err(i)) => {
                let mut v = vec![o];
                v.insert(i, (p, id));
                *self = Owners::Many(v);
            }
            (Owners::Many(mut v), Ok(i)) => {
                v[i] = (p, id);
                *self = Owners::Many(v);
            }
            (Owners::Many(mut v), Err(i)) => {
                v.insert(i, (p, id));
                *self = Owners::Many(v);
            }
        }
    }

    fn remove(&mut self, p: &PodRef) {
        let Ok(i) = self.find(p) else { return };
        *self = match std::mem::take(self) {
            Owners::Many(mut v) => {
                v.remove(i);
                match v.len() {
                    1 => Owners::One(v.pop().unwrap()),
                    _ => Owners::Many(v),
                }
            }
            _ => Owners::None,
        };
    }

    fn group_of(&self, p: &PodRef) -> Option<u32> {
        let i = self.find(p).ok()?;
        Some(self.as_slice()[i].1)
    }

    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// The pod the address stands for: the last in key order, as a full compile has it.
    fn last(&self) -> Option<&(PodRef, u32)> {
        self.as_slice().last()
    }
}

/// One user less of a count by namespace.
fn release_count(m: &mut BTreeMap<String, usize>, ns: &str) {
    if let Some(n) = m.get_mut(ns) {
        *n -= 1;
        if *n == 0 {
            m.remove(ns);
        }
    }
}

impl View for Incremental {
    fn peers(&self, pol: &Policy, ingress: bool, index: usize) -> PeerIds<'_> {
        let sets = |rs: &RuleState| -> Vec<&BTreeSet<u32>> {
            rs.selectors
                .iter()
                .filter_map(|i| self.selectors[*i].as_ref())
                .flat_map(|s| [&s.groups, &s.prefixes])
                .collect()
        };
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
                sets: Vec::new(),
            },
            Some(rs) => PeerIds {
                any: false,
                sets: sets(rs),
            },
            // Never for a local pod's namespace; should it happen, the rule allows nothing.
            None => PeerIds {
                any: false,
                sets: Vec::new(),
            },
        }
    }

    fn named_targets(&self, peers: &PeerIds<'_>) -> Vec<(u32, &[(String, u16, Protocol)])> {
        if peers.any {
            self.groups.iter().map(|(id, g)| (*id, &*g.ports)).collect()
        } else {
            let ids: BTreeSet<u32> = peers.ids().collect();
            ids.into_iter()
                .filter_map(|id| Some((id, &*self.groups.get(&id)?.ports)))
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
