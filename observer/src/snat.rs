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
    /// Where it came from: `wire` (observer's programs saw the packet leave) or `dump`.
    how: &'static str,
    inserted_at: Instant,
    /// `CLOCK_MONOTONIC` ns when the connection's opening packet left the stack (or the dump
    /// was read). An entry from before a connection's first packet belongs to an earlier
    /// connection on the same tuple: a reused tuple does not inherit an old translation.
    seen_ns: u64,
}

/// The wire-side source of a connection when it differs from the original.
pub type Translation = Option<(IpAddr, u16)>;

/// How long a kernel entry waits for its connection's record before it is dropped: records
/// follow their connection's first packet within a ring poll (100 ms).
pub const UNJOINED_TTL: Duration = Duration::from_secs(30);

/// How long after its record was parked a connection's proof is surely on the ring: the
/// programs emit it in the same pass of the stack as the connection's `new` event,
/// microseconds later (a packet the stack holds back, waiting for a neighbour's address, sends
/// no proof in time: its record is looked up).
pub const PROOF_GRACE: Duration = Duration::from_millis(5);

/// A flow record waiting for the kernel's conntrack entry of its connection.
pub struct Pending<K> {
    pub rec: FlowRecord,
    pub key: K,
    pub since: Instant,
    /// The connection's last record (its close, come while its `new` record waited): the
    /// connection's state goes once it is out.
    pub last: bool,
}

/// Translations of local pods' connections not yet joined to a record, and records waiting
/// for theirs.
pub struct NatTable<K> {
    entries: foldhash::HashMap<FlowTuple, NatEntry>,
    pending: foldhash::HashMap<FlowTuple, Vec<Pending<K>>>,
    pending_count: usize,
    max_entries: usize,
    /// Entries refused because the table was full (a bound, counted).
    pub overflow_total: u64,
}

impl<K> NatTable<K> {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: Default::default(),
            pending: Default::default(),
            pending_count: 0,
            max_entries,
            overflow_total: 0,
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

    /// A connection's translation (`how`: `wire` or `dump`), seen at `seen_ns` (monotonic).
    /// Returns the records that were waiting for it.
    pub fn insert(
        &mut self,
        t: FlowTuple,
        kernel: Kernel,
        how: &'static str,
        now: Instant,
        seen_ns: u64,
    ) -> Option<Vec<Pending<K>>> {
        if let Some(waiting) = self.pending.remove(&t) {
            self.pending_count -= waiting.len();
            return Some(waiting);
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(&t) {
            self.overflow_total += 1;
            return None;
        }
        self.entries.insert(
            t,
            NatEntry {
                kernel,
                how,
                inserted_at: now,
                seen_ns,
            },
        );
        None
    }

    /// Joins a record's tuple with its translation: `Some` (with where it came from) when the
    /// translation of this connection (first seen at `first_seen_ns`) is known (consumed: the
    /// connection keeps the result), `None` when it is not (yet).
    pub fn take(&mut self, t: &FlowTuple, first_seen_ns: u64) -> Option<(Kernel, &'static str)> {
        let e = self.entries.remove(t)?;
        // Otherwise an earlier connection on the same tuple.
        (e.seen_ns >= first_seen_ns).then_some((e.kernel, e.how))
    }

    /// Whether records of `t` wait for its entry.
    pub fn is_waiting(&self, t: &FlowTuple) -> bool {
        self.pending.contains_key(t)
    }

    pub fn park(&mut self, t: FlowTuple, p: Pending<K>) {
        self.pending_count += 1;
        // Nearly always the tuple's only record: room for one (a record is large, and a
        // vector's first growth makes room for four).
        self.pending
            .entry(t)
            .or_insert_with(|| Vec::with_capacity(1))
            .push(p);
    }

    /// Every waiting record, e.g. at shutdown.
    pub fn drain_pending(&mut self) -> Vec<Pending<K>> {
        self.pending_count = 0;
        self.pending.drain().flat_map(|(_, v)| v).collect()
    }

    /// Records whose translation will not be seen leaving, with the others of their tuple (a
    /// `new` and a close waiting behind it), in the order they came: those parked at least
    /// [`PROOF_GRACE`] before `read_through` (the start of a read that emptied the ring: a
    /// proof, emitted in the same pass of the stack as the connection's first event, would
    /// have been read by then), and any that waited `wait`.
    pub fn overdue(
        &mut self,
        wait: Duration,
        now: Instant,
        read_through: Instant,
    ) -> Vec<(FlowTuple, Vec<Pending<K>>)> {
        self.take_due(|v| {
            let due = |p: &Pending<K>| {
                now.duration_since(p.since) >= wait || p.since + PROOF_GRACE <= read_through
            };
            if v.iter().any(due) {
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
        assert!(table.insert(t, nat, "wire", now, 10).is_none());
        assert_eq!(table.take(&t, 5), Some((nat, "wire")));
        assert_eq!(table.take(&t, 5), None);
        // Record first: it waits, and the entry hands it back.
        table.park(
            t,
            Pending {
                rec: new_record(),
                key: 7,
                since: now,
                last: false,
            },
        );
        assert_eq!(table.pending_len(), 1);
        let waiting = table
            .insert(t, nat, "wire", now, 10)
            .expect("the parked record");
        assert_eq!(waiting[0].key, 7);
        assert_eq!((table.pending_len(), table.len()), (0, 0));
        // An entry seen before a connection's first packet is an earlier connection's: not
        // handed to this one, and gone.
        table.insert(t, nat, "wire", now, 100);
        assert_eq!(table.take(&t, 200), None);
        assert!(table.is_empty());
        // Seen after it: this connection's.
        table.insert(t, nat, "dump", now, 100);
        assert_eq!(table.take(&t, 50), Some((nat, "dump")));
        // A reused tuple's new entry replaces the old one.
        table.insert(t, k(None), "wire", now, 100);
        table.insert(t, nat, "wire", now, 300);
        assert_eq!(table.take(&t, 200), Some((nat, "wire")));
        // Bounded.
        let mut small: NatTable<u32> = NatTable::new(1);
        small.insert(t, k(None), "wire", now, 0);
        small.insert((17, t.1, 1, t.3, 2), k(None), "wire", now, 0);
        assert_eq!(small.overflow_total, 1);
        assert_eq!(small.len(), 1);
        // Unclaimed entries go after their TTL.
        small.gc(now);
        assert_eq!(small.len(), 1);
        small.gc(now + UNJOINED_TTL);
        assert!(small.is_empty());
    }

    #[test]
    fn overdue_records_go_with_their_tuple_in_order() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t: FlowTuple = (6, ip("10.244.1.10"), 40000, ip("10.244.2.10"), 80);
        let u: FlowTuple = (17, ip("10.244.1.10"), 40001, ip("10.244.2.10"), 53);
        let now = Instant::now();
        let p = |key, since, last| Pending {
            rec: new_record(),
            key,
            since,
            last,
        };
        let mut table: NatTable<u32> = NatTable::new(10);
        let wait = Duration::from_millis(250);
        table.park(t, p(1, now, false));
        // A close that came while its `new` record waited.
        table.park(t, p(2, now + Duration::from_millis(200), true));
        table.park(u, p(3, now + Duration::from_millis(100), false));
        assert!(table
            .overdue(wait, now + Duration::from_millis(249), now)
            .is_empty());
        let due = table.overdue(wait, now + wait, now);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, t);
        assert_eq!(due[0].1.iter().map(|p| p.key).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(table.pending_len(), 1);
        // A read of the ring that began well after a record was parked: its proof is not
        // coming.
        let later = now + Duration::from_millis(100);
        assert!(table
            .overdue(wait, later, later + PROOF_GRACE - Duration::from_millis(1))
            .is_empty());
        assert_eq!(table.overdue(wait, later, later + PROOF_GRACE).len(), 1);
        assert_eq!(table.pending_len(), 0);
        // A proof that comes after the lookup settled its records waits for nobody.
        assert!(table
            .insert(
                t,
                Kernel {
                    translated: None,
                    dst: t.3
                },
                "wire",
                now,
                0
            )
            .is_none());
        assert_eq!(table.len(), 1);
    }
}
