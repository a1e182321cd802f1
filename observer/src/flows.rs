//! Flow records: what the daemon tells people about each connection, built from kernel events
//! and conntrack entries and enriched with the cluster's names.
use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use observer_common::{ct_flags, CtEntry, CtKey, EventKind, TrafficClass, DIR_ORIG, DIR_REPLY};
use serde::{Deserialize, Serialize};

use crate::{
    cluster::{addr_from, PodInfo},
    policy::compile::RuleRef,
};

/// A record's words (event, verdict, class, protocol, flag names): the daemon's come from a
/// fixed vocabulary and cost no allocation; a record read back from JSON owns its own.
pub type Word = Cow<'static, str>;

/// A point in time, written as RFC 3339 with nanoseconds only when a record is rendered: the
/// daemon makes hundreds of thousands of records per second and most are never printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub SystemTime);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_rfc3339_nanos(self.0).fmt(f)
    }
}

impl Timestamp {
    /// `HH:MM:SS.mmm` (UTC), the time column of one-line output.
    pub fn time_of_day(&self) -> String {
        let s = self.to_string();
        s.get(11..23).unwrap_or(&s).to_string()
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Timestamp {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        humantime::parse_rfc3339(s)
            .map(Timestamp)
            .map_err(|e| anyhow::anyhow!("time {s:?}: {e}"))
    }
}

/// The epoch: a record without a time.
impl Default for Timestamp {
    fn default() -> Self {
        Timestamp(SystemTime::UNIX_EPOCH)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Cow::<str>::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Wall time for the kernel's monotonic timestamps, from one reading of both clocks.
pub struct Clock {
    wall: SystemTime,
    mono_ns: u64,
}

impl Clock {
    pub fn now() -> Self {
        Clock {
            mono_ns: mono_now_ns(),
            wall: SystemTime::now(),
        }
    }

    pub fn wall(&self, mono_ns: u64) -> Timestamp {
        Timestamp(if mono_ns <= self.mono_ns {
            self.wall - Duration::from_nanos(self.mono_ns - mono_ns)
        } else {
            self.wall + Duration::from_nanos(mono_ns - self.mono_ns)
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpInfo {
    pub version: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct L4Info {
    pub protocol: Word,
    pub src_port: u16,
    pub dst_port: u16,
    #[serde(default, skip_serializing_if = "TcpFlags::is_empty")]
    pub tcp_flags: TcpFlags,
    /// ICMP and ICMPv6 only: type and code of the first packet, and the echo identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// The frontend the pod connected to: ClusterIP (or external, load-balancer or node
    /// address) and port.
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyName {
    pub namespace: std::sync::Arc<str>,
    pub name: std::sync::Arc<str>,
    /// The side it isolates: `egress` (the source) or `ingress` (the destination).
    #[serde(default)]
    pub direction: std::sync::Arc<str>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IcmpInfo {
    #[serde(rename = "type")]
    pub icmp_type: u8,
    pub code: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u16>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Peer {
    pub ip: Option<IpAddr>,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<std::sync::Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<std::sync::Arc<str>>,
    /// The pod's own names and label set, shared: a record does not copy them.
    #[serde(default, skip_serializing_if = "no_labels")]
    pub labels: std::sync::Arc<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<std::sync::Arc<str>>,
}

fn no_labels(l: &std::sync::Arc<BTreeMap<String, String>>) -> bool {
    l.is_empty()
}

/// `out`: from the source (the side that opened the connection) to the destination;
/// `in`: the replies. Bytes count from the IP header on.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowRecord {
    pub time: Timestamp,
    pub node: Arc<str>,
    pub event: Word,
    pub verdict: Word,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<Word>,
    /// The policy rules that allowed the connection (egress at the source, ingress at the
    /// destination), when a policy isolates that side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy: Vec<RuleRef>,
    /// For connections denied by policy: the policies that isolate the denying side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolated_by: Vec<PolicyName>,
    /// How many more policies isolate the denying side than `isolated_by` names (it names at
    /// most 16).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub isolated_by_more: u32,
    /// Why a connection passed an isolated side without a policy rule: `from-node` (traffic
    /// from the pod's own node passes ingress isolation, as Kubernetes requires for kubelet
    /// probes; off with `--deny-from-node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_by: Option<Word>,
    /// A connection a pod opened to a Service: the Service and the frontend the pod used. The
    /// record's destination is the backend kube-proxy chose, which policy judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// NodePort and load-balancer connections from outside: the client as it reached the node,
    /// before kube-proxy masqueraded it to the node's address (the record's source). Policy
    /// judged this client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_source: Option<SocketAddr>,
    pub direction: Word,
    pub traffic_class: Word,
    pub ip: IpInfo,
    pub l4: L4Info,
    pub source: Peer,
    pub destination: Peer,
    pub counters: Counters,
    /// Local pods' connections that were not dropped: the source as the pod sent it and as the
    /// wire carried it, and whether the network model predicted the difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat: Option<crate::snat::SnatInfo>,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub interface: u32,
}

pub fn protocol_name(p: u8) -> Word {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => format!("proto-{n}").into(),
    }
}

/// The TCP flags seen on a connection, as the header's bits: named only when a record is
/// rendered (a list of names in JSON, `["SYN", "ACK"]`), so a record holds no list of its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    const NAMES: [&'static str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The names of the flags set, in the header's bit order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        (0..8)
            .filter(move |i| self.0 & (1 << i) != 0)
            .map(|i| Self::NAMES[i])
    }

    pub fn has(self, name: &str) -> bool {
        self.names().any(|n| n == name)
    }

    pub fn join(self, sep: &str) -> String {
        self.names().collect::<Vec<_>>().join(sep)
    }

    /// From names; `None` names one that is not a TCP flag.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        names.into_iter().try_fold(Self(0), |f, n| {
            let i = Self::NAMES.iter().position(|k| *k == n)?;
            Some(Self(f.0 | 1 << i))
        })
    }
}

impl Serialize for TcpFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

impl<'de> Deserialize<'de> for TcpFlags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<Cow<'de, str>>::deserialize(d)?;
        Self::from_names(names.iter().map(|n| &**n))
            .ok_or_else(|| serde::de::Error::custom(format!("unknown TCP flag among {names:?}")))
    }
}

pub fn mono_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// The conntrack key the kernel uses for a packet from `src` to `dst`: the smaller
/// (address, port) pair first, addresses compared as big-endian numbers.
pub fn ct_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> CtKey {
    let (s, d) = (crate::cluster::ip_key(src), crate::cluster::ip_key(dst));
    let sb: Vec<u32> = s.addr.iter().map(|w| u32::from_be(*w)).collect();
    let db: Vec<u32> = d.addr.iter().map(|w| u32::from_be(*w)).collect();
    let src_first = (sb, sport) <= (db, dport);
    let ((a, pa), (b, pb)) = if src_first {
        ((s, sport), (d, dport))
    } else {
        ((d, dport), (s, sport))
    };
    CtKey {
        addr_a: a.addr,
        addr_b: b.addr,
        port_a: pa,
        port_b: pb,
        proto,
        family: s.family,
        _pad: [0; 2],
    }
}

/// The originating and answering sides of a conntrack key.
pub fn orient(key: &CtKey, flags: u32) -> ((IpAddr, u16), (IpAddr, u16)) {
    let a = (addr_from(key.family, &key.addr_a), key.port_a);
    let b = (addr_from(key.family, &key.addr_b), key.port_b);
    if flags & ct_flags::ORIG_IS_A != 0 {
        (a, b)
    } else {
        (b, a)
    }
}

fn peer(ip: IpAddr, port: u16, pod: Option<&PodInfo>) -> Peer {
    Peer {
        ip: Some(ip),
        port,
        namespace: pod.map(|p| p.namespace.clone()),
        pod: pod.map(|p| p.name.clone()),
        labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
        workload: pod.and_then(|p| p.workload.clone()),
    }
}

/// Builds a record from an entry's state. `lookup` resolves an address to its pod.
pub fn record<'a>(
    node: &Arc<str>,
    event: EventKind,
    key: &CtKey,
    e: &CtEntry,
    lookup: impl Fn(IpAddr) -> Option<&'a PodInfo>,
    rules: impl Fn(u32) -> Option<RuleRef>,
) -> FlowRecord {
    let ((sip, sport), (dip, dport)) = orient(key, e.flags);
    let class = TrafficClass::from_u8(e.class);
    let direction = match class {
        TrafficClass::WorldToPod | TrafficClass::NodeToPod => "ingress",
        // A remote pod opened it: the local pod is the destination.
        TrafficClass::PodToPodRemote if !lookup(sip).is_some_and(|p| p.node == *node) => "ingress",
        _ => "egress",
    };
    let tcp = key.proto == observer_common::IPPROTO_TCP;
    let icmp =
        key.proto == observer_common::IPPROTO_ICMP || key.proto == observer_common::IPPROTO_ICMPV6;
    let echo = icmp && matches!(e.icmp_type, 0 | 8 | 128 | 129);
    // ICMP keys carry the echo identifier (or type and code) where ports would be.
    let (sport, dport, icmp_info) = if icmp {
        let id = echo.then_some(sport.max(dport));
        (
            0,
            0,
            Some(IcmpInfo {
                icmp_type: e.icmp_type,
                code: e.icmp_code,
                id,
            }),
        )
    } else {
        (sport, dport, None)
    };
    let flags = (e.tcp_flags & 0xff) as u8 | ((e.tcp_flags >> 8) & 0xff) as u8;
    let clock = Clock::now();
    FlowRecord {
        time: Timestamp(clock.wall),
        node: node.clone(),
        event: match event {
            EventKind::New => "new",
            EventKind::Report => "report",
            // (Never a record: it updates a close's counters.)
            EventKind::Close | EventKind::AfterClose => "close",
            EventKind::Drop => "drop",
            // (Never a record: it settles a new connection's SNAT.)
            EventKind::Wire => "new",
        }
        .into(),
        verdict: if e.flags & ct_flags::DENIED != 0 {
            "dropped"
        } else if e.flags & ct_flags::AUDIT != 0 {
            "audit"
        } else {
            "forwarded"
        }
        .into(),
        drop_reason: (e.flags & ct_flags::DENIED != 0).then_some(Word::Borrowed("policy-denied")),
        policy: [e.egress_rule, e.ingress_rule]
            .into_iter()
            .filter(|r| *r != 0 && *r != observer_common::RULE_NODE)
            .filter_map(&rules)
            .collect(),
        allowed_by: (e.ingress_rule == observer_common::RULE_NODE).then(|| "from-node".into()),
        service: None,
        original_source: None,
        isolated_by: Vec::new(),
        isolated_by_more: 0,
        direction: direction.into(),
        traffic_class: class.as_str().into(),
        ip: IpInfo {
            version: key.family,
            src: sip,
            dst: dip,
        },
        l4: L4Info {
            protocol: protocol_name(key.proto),
            src_port: sport,
            dst_port: dport,
            tcp_flags: TcpFlags(if tcp { flags } else { 0 }),
            icmp: icmp_info,
        },
        source: peer(sip, sport, lookup(sip)),
        destination: peer(dip, dport, lookup(dip)),
        counters: Counters {
            packets_out: e.packets[DIR_ORIG],
            bytes_out: e.bytes[DIR_ORIG],
            packets_in: e.packets[DIR_REPLY],
            bytes_in: e.bytes[DIR_REPLY],
        },
        snat: None,
        first_seen: clock.wall(e.first_seen_ns),
        last_seen: clock.wall(e.last_seen_ns),
        interface: e.ifindex,
    }
}

impl FlowRecord {
    fn endpoint(p: &Peer) -> String {
        let ip = p.ip.map(|i| i.to_string()).unwrap_or_default();
        let addr = match (p.port, ip.contains(':')) {
            (0, _) => ip,
            (port, true) => format!("[{ip}]:{port}"),
            (port, false) => format!("{ip}:{port}"),
        };
        match (&p.namespace, &p.pod) {
            (Some(ns), Some(pod)) => format!("{ns}/{pod} ({addr})"),
            _ => addr,
        }
    }

    /// The source, and what the wire carried instead when SNAT happened or was due.
    pub fn source_with_snat(&self) -> String {
        let src = Self::endpoint(&self.source);
        if let Some(client) = self.original_source {
            return format!("{client} masqueraded to {src}");
        }
        match &self.snat {
            Some(n) if n.expectation != crate::snat::Expectation::None => {
                let wire = match (n.translated_src_ip, n.translated_src_port) {
                    (ip, 0) => ip.to_string(),
                    (IpAddr::V6(ip), port) => format!("[{ip}]:{port}"),
                    (IpAddr::V4(ip), port) => format!("{ip}:{port}"),
                };
                format!("{src} SNAT {wire} ({})", n.expectation.as_str())
            }
            _ => src,
        }
    }

    /// One readable line, `hubble observe` style.
    pub fn compact(&self) -> String {
        let c = &self.counters;
        let cause = if !self.isolated_by.is_empty() {
            let mut names: Vec<String> = self
                .isolated_by
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            if self.isolated_by_more > 0 {
                names.push(format!("+{} more", self.isolated_by_more));
            }
            format!(" by {}", names.join(","))
        } else if !self.policy.is_empty() || self.allowed_by.is_some() {
            let names: Vec<String> = self
                .policy
                .iter()
                .map(|r| format!("{}/{}[{} {}]", r.namespace, r.name, r.direction, r.rule))
                .chain(self.allowed_by.as_deref().map(str::to_string))
                .collect();
            format!(" by {}", names.join(","))
        } else {
            String::new()
        };
        let dst = match &self.service {
            Some(s) => format!(
                "{} via service {}/{} {}",
                Self::endpoint(&self.destination),
                s.namespace,
                s.name,
                SocketAddr::new(s.ip, s.port)
            ),
            None => Self::endpoint(&self.destination),
        };
        format!(
            "{} {:<6} {} -> {} {} {} {}{} {} out {}p/{}B in {}p/{}B",
            self.time.time_of_day(),
            self.event,
            self.source_with_snat(),
            dst,
            self.l4.protocol,
            self.traffic_class,
            self.verdict.to_uppercase(),
            cause,
            match &self.l4.icmp {
                Some(i) => format!(
                    "type {} code {}{}",
                    i.icmp_type,
                    i.code,
                    i.id.map(|id| format!(" id {id}")).unwrap_or_default()
                ),
                None => self.l4.tcp_flags.join(","),
            },
            c.packets_out,
            c.bytes_out,
            c.packets_in,
            c.bytes_in,
        )
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ip_key;

    #[test]
    fn tcp_flags_are_a_list_of_names_in_json() {
        let f = TcpFlags(0x02 | 0x10 | 0x01);
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(json, r#"["FIN","SYN","ACK"]"#);
        assert_eq!(serde_json::from_str::<TcpFlags>(&json).unwrap(), f);
        assert_eq!(f.join(","), "FIN,SYN,ACK");
        assert!(f.has("ACK") && !f.has("RST"));
        let bad = serde_json::from_str::<TcpFlags>(r#"["SYN","NOPE"]"#).unwrap_err();
        assert!(bad.to_string().contains("NOPE"), "{bad}");
        // Left out of a record that has none.
        let l4 = L4Info {
            protocol: "UDP".into(),
            src_port: 1,
            dst_port: 2,
            tcp_flags: TcpFlags::default(),
            icmp: None,
        };
        assert!(!serde_json::to_string(&l4).unwrap().contains("tcp_flags"));
    }

    #[test]
    fn record_orients_by_originator_and_names_pods() {
        let a = ip_key("10.244.1.10".parse().unwrap());
        let b = ip_key("203.0.113.10".parse().unwrap());
        let key = CtKey {
            addr_a: a.addr,
            addr_b: b.addr,
            port_a: 40000,
            port_b: 80,
            proto: 6,
            family: 4,
            _pad: [0; 2],
        };
        let e = CtEntry {
            packets: [3, 2],
            bytes: [180, 120],
            tcp_flags: 0x02 | (0x12 << 8),
            flags: 0, // b opened it
            class: TrafficClass::WorldToPod as u8,
            ..Default::default()
        };
        let pod = PodInfo {
            namespace: "x".into(),
            name: "a".into(),
            node: "n1".into(),
            ips: vec!["10.244.1.10".parse().unwrap()].into(),
            labels: Default::default(),
            workload: None,
            host_network: false,
            ports: vec![].into(),
        };
        let r = record(
            &"n1".into(),
            EventKind::New,
            &key,
            &e,
            |ip| (ip == pod.ips[0]).then_some(&pod),
            |_| None,
        );
        assert_eq!(r.source.ip, Some("203.0.113.10".parse().unwrap()));
        assert_eq!(r.source.port, 80);
        assert_eq!(r.destination.pod.as_deref(), Some("a"));
        assert_eq!(r.direction, "ingress");
        assert_eq!(
            r.counters,
            Counters {
                packets_out: 3,
                bytes_out: 180,
                packets_in: 2,
                bytes_in: 120
            }
        );
        assert_eq!(r.l4.tcp_flags.names().collect::<Vec<_>>(), ["SYN", "ACK"]);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"traffic_class\":\"world-to-pod\""));
    }
}
