//! SNAT observation: what the node's netfilter did to a pod's connection, and whether the
//! network model predicted it.
//!
//! The pod-side tuple comes from our own conntrack at the pod's veth (before the stack); the
//! wire-side tuple comes from the kernel's conntrack over ctnetlink, whose entries carry both
//! the original and the reply tuple. They are joined on the exact original tuple (protocol,
//! addresses, ports), never by timing: a record waits for its ctnetlink entry, and when none
//! comes an exact GET settles it.
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{cluster::Cluster, flows::FlowRecord};

/// The AKS network model of the node, as configured (`--network-model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelSetting {
    /// Flat when this node's pod IPs are inside the VNet, overlay otherwise.
    Auto,
    /// kubenet, Azure CNI Overlay: pod CIDR apart from the VNet; traffic leaving the cluster is
    /// SNAT'd to the node IP.
    Overlay,
    /// Azure CNI: pods take VNet addresses; no SNAT inside the VNet, SNAT beyond it.
    Flat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    Overlay,
    Flat,
}

impl Model {
    pub fn as_str(self) -> &'static str {
        match self {
            Model::Overlay => "overlay",
            Model::Flat => "flat",
        }
    }
}

/// What the model says about a connection's source, against what happened to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expectation {
    /// SNAT'd, as the model predicts.
    Expected,
    /// Not SNAT'd, and none predicted.
    None,
    /// SNAT'd where the model keeps the pod IP (e.g. inside the VNet in the flat model).
    Unexpected,
    /// The pod IP left where the model predicts SNAT.
    Missing,
}

impl Expectation {
    pub const ALL: [Expectation; 4] = [
        Expectation::Expected,
        Expectation::None,
        Expectation::Unexpected,
        Expectation::Missing,
    ];

    pub fn of(predicted: bool, translated: bool) -> Self {
        match (predicted, translated) {
            (true, true) => Expectation::Expected,
            (false, false) => Expectation::None,
            (false, true) => Expectation::Unexpected,
            (true, false) => Expectation::Missing,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Expectation::Expected => "expected",
            Expectation::None => "none",
            Expectation::Unexpected => "unexpected",
            Expectation::Missing => "missing",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// The `snat` object of a flow record: the pod-side source and the source the wire carried.
/// Without translation both are the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnatInfo {
    pub original_src_ip: IpAddr,
    pub original_src_port: u16,
    pub translated_src_ip: IpAddr,
    pub translated_src_port: u16,
    pub expectation: Expectation,
}

/// The model and the address ranges the prediction needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetModel {
    pub model: Model,
    /// Why this model, when it was detected rather than configured.
    pub detected: Option<String>,
    /// Pod address ranges of the whole cluster: traffic to them keeps the pod IP.
    pub cluster_cidrs: Vec<IpNet>,
    /// The VNet: in the flat model, traffic to it keeps the pod IP.
    pub vnet_cidrs: Vec<IpNet>,
    /// This node's own addresses: traffic to them never leaves the node.
    pub node_addrs: Vec<IpAddr>,
}

/// What the daemon was told about the model.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub setting: ModelSetting,
    /// `--cluster-cidr`; empty: every Node's `spec.podCIDRs`.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--vnet-cidr`; empty: the subnets of the uplinks' addresses.
    pub vnet_cidrs: Vec<IpNet>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            setting: ModelSetting::Auto,
            cluster_cidrs: Vec::new(),
            vnet_cidrs: Vec::new(),
        }
    }
}

impl NetModel {
    /// Settles the model from the configuration, the cluster's Nodes and pods, and the
    /// addresses of this network namespace (`uplink_nets`: the subnets on the uplinks).
    pub fn resolve(
        cfg: &ModelConfig,
        cluster: &Cluster,
        node: &str,
        uplink_nets: &[IpNet],
        node_addrs: Vec<IpAddr>,
    ) -> Self {
        let cluster_cidrs = if cfg.cluster_cidrs.is_empty() {
            let mut v: Vec<IpNet> = cluster
                .nodes
                .iter()
                .flat_map(|n| n.pod_cidrs.iter().copied())
                .collect();
            v.sort();
            v.dedup();
            v
        } else {
            cfg.cluster_cidrs.clone()
        };
        let vnet_cidrs = if cfg.vnet_cidrs.is_empty() {
            uplink_nets.iter().map(|n| n.trunc()).collect()
        } else {
            cfg.vnet_cidrs.clone()
        };
        let (model, detected) = match cfg.setting {
            ModelSetting::Overlay => (Model::Overlay, None),
            ModelSetting::Flat => (Model::Flat, None),
            ModelSetting::Auto => {
                let local_ips: Vec<IpAddr> = cluster
                    .pods
                    .iter()
                    .filter(|p| &*p.node == node && !p.host_network)
                    .flat_map(|p| p.ips.iter().copied())
                    .collect();
                let in_vnet = |ip: &IpAddr| vnet_cidrs.iter().any(|n| n.contains(ip));
                match local_ips.iter().find(|ip| in_vnet(ip)) {
                    Some(ip) => (Model::Flat, Some(format!("pod IP {ip} is inside the VNet"))),
                    None if local_ips.is_empty() => (
                        Model::Overlay,
                        Some("no local pods yet; assuming overlay".into()),
                    ),
                    None => (Model::Overlay, Some("pod IPs are outside the VNet".into())),
                }
            }
        };
        NetModel {
            model,
            detected,
            cluster_cidrs,
            vnet_cidrs,
            node_addrs,
        }
    }

    /// Whether the model predicts SNAT for a local pod's connection to `dst`. `dst_is_pod`:
    /// the destination is a known pod (pod-to-pod traffic keeps its source in both models).
    pub fn predicts_snat(&self, dst: IpAddr, dst_is_pod: bool) -> bool {
        if dst_is_pod || self.node_addrs.contains(&dst) || dst.is_loopback() {
            return false;
        }
        if self.cluster_cidrs.iter().any(|n| n.contains(&dst)) {
            return false;
        }
        match self.model {
            Model::Overlay => true,
            Model::Flat => !self.vnet_cidrs.iter().any(|n| n.contains(&dst)),
        }
    }
}

/// The original tuple of a connection as the kernel's conntrack keys it: protocol, source
/// address and port, destination address and port (ICMP echo: the identifier as source port).
pub type FlowTuple = (u8, IpAddr, u16, IpAddr, u16);

/// What the kernel's entry says about a connection: the wire-side source when it was
/// translated, and the destination after any DNAT (a Service's ClusterIP becomes its backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub translated: Translation,
    pub dst: IpAddr,
}

struct NatEntry {
    kernel: Kernel,
    inserted_at: Instant,
    /// `CLOCK_MONOTONIC` ns when the daemon read the kernel's entry. The kernel creates its
    /// entry after observer's program saw the connection's first packet (the pod's veth comes
    /// before the host's netfilter), so an entry read before a connection's first packet
    /// belongs to an earlier connection on the same tuple, and a reused tuple does not inherit
    /// an old translation. (The kernel's destroy events used to say so; they were half of
    /// the reader's messages.)
    read_ns: u64,
}

/// The wire-side source of a connection when it differs from the original.
pub type Translation = Option<(IpAddr, u16)>;

/// How long a kernel entry waits for its connection's record before it is dropped: records
/// follow their connection's first packet within a ring poll (100 ms).
pub const UNJOINED_TTL: Duration = Duration::from_secs(30);

/// A flow record waiting for the kernel's conntrack entry of its connection.
pub struct Pending<K> {
    pub rec: FlowRecord,
    pub key: K,
    pub since: Instant,
    /// The connection's last record (its close, come while its `new` record waited): the
    /// connection's state goes once it is out.
    pub last: bool,
    /// `CLOCK_MONOTONIC` ns from which the absence of a kernel entry settles the record as
    /// untranslated (see [`NatTable::read_through`]); `None`: only an entry or a lookup does.
    pub untranslated_from: Option<u64>,
}

/// ctnetlink entries of local pods' connections not yet joined to a record, and records
/// waiting for theirs.
pub struct NatTable<K> {
    entries: foldhash::HashMap<FlowTuple, NatEntry>,
    pending: foldhash::HashMap<FlowTuple, Vec<Pending<K>>>,
    pending_count: usize,
    max_entries: usize,
    /// Entries refused because the table was full (a bound, counted).
    pub overflow_total: u64,
    absence: Absence,
}

/// When the absence of a connection's kernel entry says it was not translated.
#[derive(Clone, Copy, Default)]
struct Absence {
    /// Every kernel entry created before this time (`CLOCK_MONOTONIC` ns) has been read.
    read_through_ns: u64,
    /// A record whose `untranslated_from` is at or before this is not settled by absence: an
    /// entry of its time may have been refused (table full), lost (an overrun without a
    /// dump) or filtered out (before the reader's filter covered its source).
    distrust_from_ns: u64,
    /// How long after a connection's first packet its entry is surely queued to the reader.
    margin_ns: u64,
}

impl Absence {
    fn settles(&self, from: u64) -> bool {
        from <= self.read_through_ns && from > self.distrust_from_ns
    }
}

impl<K> NatTable<K> {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: Default::default(),
            pending: Default::default(),
            pending_count: 0,
            max_entries,
            overflow_total: 0,
            absence: Absence::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn pending_len(&self) -> usize {
        self.pending_count
    }

    /// A new (or dumped) conntrack entry, read at `now` (`now_ns` monotonic). Returns the
    /// records that were waiting for it.
    pub fn insert(
        &mut self,
        t: FlowTuple,
        kernel: Kernel,
        now: Instant,
        now_ns: u64,
    ) -> Option<Vec<Pending<K>>> {
        if let Some(waiting) = self.pending.remove(&t) {
            self.pending_count -= waiting.len();
            return Some(waiting);
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&t) {
            self.overflow_total += 1;
            self.distrust_absence(now_ns);
            return None;
        }
        self.entries.insert(
            t,
            NatEntry {
                kernel,
                inserted_at: now,
                read_ns: now_ns,
            },
        );
        None
    }

    /// Joins a record's tuple with its entry: `Some` when the kernel's entry of this
    /// connection (first seen at `first_seen_ns`) is known (consumed: the connection keeps the
    /// result), `None` when it is not (yet).
    pub fn take(&mut self, t: &FlowTuple, first_seen_ns: u64) -> Option<Kernel> {
        let e = self.entries.remove(t)?;
        // Otherwise an earlier connection on the same tuple.
        (e.read_ns >= first_seen_ns).then_some(e.kernel)
    }

    /// Whether records of `t` wait for its entry.
    pub fn is_waiting(&self, t: &FlowTuple) -> bool {
        self.pending.contains_key(t)
    }

    pub fn park(&mut self, t: FlowTuple, p: Pending<K>) {
        self.pending_count += 1;
        self.pending.entry(t).or_default().push(p);
    }

    /// Every waiting record, e.g. at shutdown.
    pub fn drain_pending(&mut self) -> Vec<Pending<K>> {
        self.pending_count = 0;
        self.pending.drain().flat_map(|(_, v)| v).collect()
    }

    /// Records that waited longer than `wait`, with the others of their tuple (a `new` and a
    /// close waiting behind it), in the order they came.
    pub fn overdue(&mut self, wait: Duration, now: Instant) -> Vec<(FlowTuple, Vec<Pending<K>>)> {
        self.take_due(|v| {
            if v.iter().any(|p| now.duration_since(p.since) >= wait) {
                v.len()
            } else {
                0
            }
        })
    }

    /// Takes, of each tuple, the first `due(records)` records waiting for its entry.
    fn take_due(
        &mut self,
        due: impl Fn(&[Pending<K>]) -> usize,
    ) -> Vec<(FlowTuple, Vec<Pending<K>>)> {
        let due: Vec<(FlowTuple, usize)> = self
            .pending
            .iter()
            .map(|(t, v)| (*t, due(v)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for (t, n) in due {
            let Some(v) = self.pending.get_mut(&t) else {
                continue;
            };
            let taken: Vec<Pending<K>> = if n >= v.len() {
                self.pending.remove(&t).unwrap_or_default()
            } else {
                v.drain(..n).collect()
            };
            self.pending_count -= taken.len();
            out.push((t, taken));
        }
        out
    }

    /// The reader has read every entry the kernel created before `ns`: the socket was found
    /// empty after that time, without an overrun since (or with one, and a dump after it).
    pub fn set_read_through(&mut self, ns: u64) {
        let a = &mut self.absence;
        a.read_through_ns = a.read_through_ns.max(ns);
    }

    pub fn read_through(&self) -> u64 {
        self.absence.read_through_ns
    }

    /// How long after a connection's first packet its kernel entry is surely queued.
    pub fn set_absence_margin(&mut self, ns: u64) {
        self.absence.margin_ns = ns;
    }

    /// `untranslated_from` of a connection first seen at `first_seen_ns`.
    pub fn absence_from(&self, first_seen_ns: u64) -> u64 {
        first_seen_ns + self.absence.margin_ns
    }

    /// Entries of connections first seen before `ns` may be missing without saying anything
    /// (refused, lost, filtered out): their records wait for a lookup instead.
    pub fn distrust_absence(&mut self, ns: u64) {
        let from = self.absence_from(ns);
        let a = &mut self.absence;
        a.distrust_from_ns = a.distrust_from_ns.max(from);
    }

    /// Whether a record with this `untranslated_from` is untranslated, no entry having come.
    pub fn absence_settles(&self, from: u64) -> bool {
        self.absence.settles(from)
    }

    /// Records whose connection would have had its entry read by now if the kernel had made
    /// one (see [`Pending::untranslated_from`]), with the closes waiting behind them. A later
    /// connection's record on the tuple waits on for its own time.
    pub fn untranslated(&mut self) -> Vec<(FlowTuple, Vec<Pending<K>>)> {
        let absence = self.absence;
        self.take_due(|v| {
            // Not a close alone: it follows its `new` record.
            if v.first().is_none_or(|p| p.last) {
                return 0;
            }
            v.iter()
                .take_while(|p| p.last || p.untranslated_from.is_some_and(|f| absence.settles(f)))
                .count()
        })
    }

    /// Drops entries no record claimed within [`UNJOINED_TTL`].
    pub fn gc(&mut self, now: Instant) {
        self.entries
            .retain(|_, e| now.duration_since(e.inserted_at) < UNJOINED_TTL);
    }
}

/// The `snat` object for a local pod's connection whose wire-side source is `translated`
/// (`None`: left untranslated).
pub fn info(
    model: &NetModel,
    orig: (IpAddr, u16),
    dst: IpAddr,
    dst_is_pod: bool,
    translated: Option<(IpAddr, u16)>,
) -> SnatInfo {
    let predicted = model.predicts_snat(dst, dst_is_pod);
    let (tip, tport) = translated.unwrap_or(orig);
    SnatInfo {
        original_src_ip: orig.0,
        original_src_port: orig.1,
        translated_src_ip: tip,
        translated_src_port: tport,
        expectation: Expectation::of(predicted, translated.is_some()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn model(m: Model) -> NetModel {
        NetModel {
            model: m,
            detected: None,
            cluster_cidrs: vec![net("10.244.0.0/16")],
            vnet_cidrs: vec![net("10.224.0.0/16")],
            node_addrs: vec!["10.224.0.4".parse().unwrap()],
        }
    }

    #[test]
    fn predictions_follow_the_model() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let o = model(Model::Overlay);
        let f = model(Model::Flat);
        // External host: SNAT in both.
        assert!(o.predicts_snat(ip("203.0.113.10"), false));
        assert!(f.predicts_snat(ip("203.0.113.10"), false));
        // VNet peer: SNAT only in overlay.
        assert!(o.predicts_snat(ip("10.224.0.100"), false));
        assert!(!f.predicts_snat(ip("10.224.0.100"), false));
        // Pods (by CIDR or known) and the node itself: never.
        assert!(!o.predicts_snat(ip("10.244.2.10"), false));
        assert!(!f.predicts_snat(ip("10.224.2.10"), true));
        assert!(!o.predicts_snat(ip("10.224.0.4"), false));
    }

    #[test]
    fn expectation_table() {
        assert_eq!(Expectation::of(true, true), Expectation::Expected);
        assert_eq!(Expectation::of(false, false), Expectation::None);
        assert_eq!(Expectation::of(false, true), Expectation::Unexpected);
        assert_eq!(Expectation::of(true, false), Expectation::Missing);
        for e in Expectation::ALL {
            assert_eq!(Expectation::parse(e.as_str()), Some(e));
        }
    }

    #[test]
    fn auto_detects_flat_from_pod_ips() {
        let mut c = Cluster::default();
        c.pods.push(std::sync::Arc::new(crate::cluster::PodInfo {
            namespace: "a".into(),
            name: "p".into(),
            node: "n1".into(),
            ips: vec!["10.224.1.10".parse().unwrap()].into(),
            labels: Default::default(),
            workload: None,
            host_network: false,
            ports: vec![].into(),
        }));
        let cfg = ModelConfig::default();
        let m = NetModel::resolve(&cfg, &c, "n1", &[net("10.224.0.4/16")], vec![]);
        assert_eq!(m.model, Model::Flat);
        assert_eq!(m.vnet_cidrs, vec![net("10.224.0.0/16")]);
        let m = NetModel::resolve(&cfg, &c, "n2", &[net("10.224.0.4/16")], vec![]);
        assert_eq!(m.model, Model::Overlay);
    }

    fn new_record() -> crate::flows::FlowRecord {
        crate::flows::record(
            &"n".into(),
            observer_common::EventKind::New,
            &Default::default(),
            &Default::default(),
            |_| None,
            |_| None,
        )
    }

    #[test]
    fn join_waits_for_the_entry_either_way_round() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t: FlowTuple = (6, ip("10.244.1.10"), 40000, ip("203.0.113.10"), 80);
        let now = Instant::now();
        let k = |tr| Kernel {
            translated: tr,
            dst: ip("203.0.113.10"),
        };
        let mut table: NatTable<u32> = NatTable::new(10);
        // Entry first, record second.
        let nat = k(Some((ip("10.224.0.4"), 40000)));
        assert!(table.insert(t, nat, now, 10).is_none());
        assert_eq!(table.take(&t, 5), Some(nat));
        assert_eq!(table.take(&t, 5), None);
        // Record first: it waits, and the entry hands it back.
        table.park(
            t,
            Pending {
                rec: new_record(),
                key: 7,
                since: now,
                last: false,
                untranslated_from: None,
            },
        );
        assert_eq!(table.pending_len(), 1);
        let waiting = table.insert(t, nat, now, 10).expect("the parked record");
        assert_eq!(waiting[0].key, 7);
        assert_eq!((table.pending_len(), table.len()), (0, 0));
        // An entry read before a connection's first packet is an earlier connection's: not
        // handed to this one, and gone.
        table.insert(t, nat, now, 100);
        assert_eq!(table.take(&t, 200), None);
        assert!(table.is_empty());
        // Read after it (the reader gathers for a while): this connection's.
        table.insert(t, nat, now, 100);
        assert_eq!(table.take(&t, 50), Some(nat));
        // A reused tuple's new entry replaces the old one.
        table.insert(t, k(None), now, 100);
        table.insert(t, nat, now, 300);
        assert_eq!(table.take(&t, 200), Some(nat));
        // Bounded.
        let mut small: NatTable<u32> = NatTable::new(1);
        small.insert(t, k(None), now, 0);
        small.insert((17, t.1, 1, t.3, 2), k(None), now, 0);
        assert_eq!(small.overflow_total, 1);
        assert_eq!(small.len(), 1);
        // Unclaimed entries go after their TTL.
        small.gc(now);
        assert_eq!(small.len(), 1);
        small.gc(now + UNJOINED_TTL);
        assert!(small.is_empty());
    }

    #[test]
    fn absence_settles_only_once_read_through() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t: FlowTuple = (6, ip("10.244.1.10"), 40000, ip("10.244.2.10"), 80);
        let u: FlowTuple = (17, ip("10.244.1.10"), 40001, ip("10.244.2.10"), 53);
        let p = |key, from| Pending {
            rec: new_record(),
            key,
            since: Instant::now(),
            last: false,
            untranslated_from: from,
        };
        let close = |key| Pending {
            last: true,
            ..p(key, None)
        };
        let mut table: NatTable<u32> = NatTable::new(10);
        table.park(t, p(1, Some(1_000)));
        table.park(t, close(2));
        // A later connection on the tuple, with a later time of its own.
        table.park(t, p(4, Some(2_000)));
        table.park(u, p(3, None));
        table.set_read_through(999);
        assert!(table.untranslated().is_empty());
        table.set_read_through(1_000);
        let due = table.untranslated();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, t);
        // The close waiting behind its `new` record goes with it, the later connection not.
        assert_eq!(due[0].1.iter().map(|p| p.key).collect::<Vec<_>>(), [1, 2]);
        // A record without a start (UDP: the kernel may hold an older entry) waits on.
        assert_eq!(table.pending_len(), 2);
        assert!(table.untranslated().is_empty());
        // Never moves back.
        table.set_read_through(5);
        assert_eq!(table.read_through(), 1_000);
        // An entry refused (table full) read at 1,500: absence says nothing up to then (with
        // the margin), so the later connection waits for its lookup.
        table.set_absence_margin(600);
        table.distrust_absence(1_500);
        table.set_read_through(3_000);
        assert!(table.untranslated().is_empty());
        assert!(!table.absence_settles(2_000));
        assert!(table.absence_settles(2_200));
        assert_eq!(table.pending_len(), 2);
    }
}
