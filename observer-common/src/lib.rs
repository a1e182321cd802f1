//! Types shared by the kernel programs and the userspace daemon.
//!
//! Every type here is `#[repr(C)]` with explicit padding so the layout is the same for the
//! `bpfel-unknown-none` target and the host; `layout` tests pin the sizes.
#![no_std]

/// Bumped whenever a pinned map's key or value layout changes, so a daemon never re-adopts maps
/// written by an incompatible build.
pub const ABI_VERSION: u32 = 2;

pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// Map names, shared so the loader and the programs cannot disagree.
pub mod maps {
    /// IPv4 connections, under a 16-byte key ([`crate::CtKey4`]).
    pub const CONNTRACK4: &str = "OBS_CT4";
    /// IPv6 connections, under the full [`crate::CtKey`].
    pub const CONNTRACK6: &str = "OBS_CT6";
    /// Before the tables were split by family: one table of both under `CtKey`. A daemon that
    /// finds it copies its connections into the two tables, then removes it.
    pub const CONNTRACK_BEFORE_SPLIT: &str = "OBS_CT";
    pub const ENDPOINTS: &str = "OBS_ENDPOINTS";
    pub const IPCACHE: &str = "OBS_IPCACHE";
    pub const ATTACHED: &str = "OBS_ATTACHED";
    pub const EVENTS: &str = "OBS_EVENTS";
    pub const STATS: &str = "OBS_STATS";
    pub const CONFIG: &str = "OBS_CONFIG";
    pub const POLICY: &str = "OBS_POLICY";
    pub const UPLINK: &str = "OBS_UPLINK";
    pub const SERVICES: &str = "OBS_SERVICES";
    pub const SVC_NAT: &str = "OBS_SVC_NAT";
    pub const NODEPORT: &str = "OBS_NODEPORT";
    pub const LOCAL_RANGE: &str = "OBS_LOCAL_RANGE";
    pub const LOCAL_BITS: &str = "OBS_LOCAL_BITS";
    /// The uplinks observer is attached to, by ifindex.
    pub const UPLINKS: &str = "OBS_UPLINKS";
    pub const ALL: [&str; 16] = [
        CONNTRACK4,
        CONNTRACK6,
        ENDPOINTS,
        IPCACHE,
        ATTACHED,
        EVENTS,
        STATS,
        CONFIG,
        POLICY,
        UPLINK,
        SERVICES,
        SVC_NAT,
        NODEPORT,
        LOCAL_RANGE,
        LOCAL_BITS,
        UPLINKS,
    ];
}

/// Program names (the function names in `observer-ebpf`).
pub mod programs {
    pub const FROM_POD: &str = "from_pod";
    pub const TO_POD: &str = "to_pod";
    pub const TC_EMPTY: &str = "tc_empty";
    /// The node's uplink: XDP at the earliest point of ingress, tc on both directions.
    pub const UPLINK_XDP: &str = "uplink_xdp";
    pub const UPLINK_INGRESS: &str = "uplink_ingress";
    pub const UPLINK_INGRESS_POLICY: &str = "uplink_ingress_policy";
    pub const UPLINK_EGRESS: &str = "uplink_egress";
    /// Benchmark baseline: the cost of running any XDP program at all.
    pub const XDP_EMPTY: &str = "xdp_empty";
    /// Benchmark only: `from_pod` on a new connection every run, and its rewrite-only baseline.
    pub const BENCH_NEW_CONN: &str = "bench_new_conn";
    pub const BENCH_REWRITE: &str = "bench_rewrite";
    /// Benchmark only: one `new` event per run without the datapath's work (the event pipeline).
    pub const BENCH_NEW_EVENT: &str = "bench_new_event";
    /// Benchmark only: new connections keeping the destination port, through from_pod / to_pod.
    pub const BENCH_NEW_CONN_OUT: &str = "bench_new_conn_out";
    pub const BENCH_NEW_CONN_IN: &str = "bench_new_conn_in";
    /// The source ports `bench_new_conn_out` and `bench_new_conn_in` cycle through, from 1024:
    /// a pass of this many runs takes each once, in the same order every pass.
    pub const BENCH_SOURCE_PORTS: u32 = 64_000;
}

/// The IPv4 conntrack table.
pub const CT_MAX_ENTRIES: u32 = 262_144;
/// The IPv6 table: a quarter, since every entry of an LRU table is allocated when it is
/// created (12.6 MB here, against 44 MB for IPv4), and AKS's IPv6 is dual-stack beside IPv4.
pub const CT6_MAX_ENTRIES: u32 = 65_536;
pub const ENDPOINTS_MAX_ENTRIES: u32 = 65_536;
pub const IPCACHE_MAX_ENTRIES: u32 = 524_288;
pub const ATTACHED_MAX_ENTRIES: u32 = 65_536;
/// `OBS_ATTACHED`'s value for a pod veth enslaved to a bridge (kubenet's `cbr0`), or recorded
/// by a version that did not tell: its pod is reached through the bridge.
pub const ATTACHED_BRIDGED: u32 = 1;
/// `OBS_ATTACHED`'s value for a routed pod veth (no master): the node routes its pod's
/// address to it, as Azure CNI and other point-to-point plugins do.
pub const ATTACHED_ROUTED: u32 = 2;
pub const UPLINKS_MAX_ENTRIES: u32 = 64;
pub const EVENTS_RING_BYTES: u32 = 16 * 1024 * 1024;
pub const POLICY_MAX_ENTRIES: u32 = 1_048_576;
pub const SERVICES_MAX_ENTRIES: u32 = 65_536;
pub const SVC_NAT_MAX_ENTRIES: u32 = 65_536;
pub const NODEPORT_MAX_ENTRIES: u32 = 65_536;

/// Set on a packet of a Service connection by `from_pod` (its pre-DNAT tuple), so the uplink's
/// tc egress judges the translated packet against the backend kube-proxy chose. Only this
/// bit is ever set; kube-proxy's own (0x4000, 0x8000) and the rest of the mark are left alone.
pub const SVC_MARK: u32 = 0x0040_0000;

/// Set by the uplink's tc ingress on a packet from outside the node to one of its frontends (a
/// NodePort on the node's address, a load-balancer IP), before kube-proxy translates it. The
/// backend's veth then knows the connection came from outside even though kube-proxy
/// masqueraded it to the node (with `--random-fully`, its default, the port changes too): it
/// is judged against the client noted for it, or as an unknown outside client, never as the
/// node. Only this bit is ever set.
pub const NODEPORT_MARK: u32 = 0x0020_0000;

/// Set by the uplink's tc ingress on a UDP packet from a pod of another node for a pod of this
/// node that has no connection yet, its tuple noted (per CPU) as it arrived. The pod's veth,
/// where the stack delivers it, then knows whether the node translated it on the way: a
/// connection whose opener arrived untranslated may skip the stack after (`ct_flags::DIRECT`),
/// one whose opener was translated (a reply of a connection the node DNAT'd, a DNAT observer
/// does not know) may not. Only this bit is ever set; the veth clears it.
pub const UNTRANSLATED_MARK: u32 = 0x0010_0000;

/// Rule id of a connection allowed because it comes from the node itself (kubelet probes).
pub const RULE_NODE: u32 = u32::MAX;

/// A connection key with the two endpoints in canonical order: `(addr_a, port_a)` is the smaller
/// of the two `(address, port)` pairs, so both directions of a flow find the same entry with one
/// lookup. Addresses are in network byte order; IPv4 uses `addr[0]` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub addr_a: [u32; 4],
    pub addr_b: [u32; 4],
    /// Host byte order.
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The IPv4 table's key: a [`CtKey`] of family `AF_INET` in 16 bytes, so each lookup hashes
/// and compares 16 bytes, not 40 (the kernel's hash runs over the whole key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey4 {
    pub addr_a: u32,
    pub addr_b: u32,
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    /// The IPv4 table's key (meaningful for `family == AF_INET` only).
    #[inline(always)]
    pub fn v4(&self) -> CtKey4 {
        CtKey4 {
            addr_a: self.addr_a[0],
            addr_b: self.addr_b[0],
            port_a: self.port_a,
            port_b: self.port_b,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

impl CtKey4 {
    #[inline(always)]
    pub fn widen(&self) -> CtKey {
        CtKey {
            addr_a: [self.addr_a, 0, 0, 0],
            addr_b: [self.addr_b, 0, 0, 0],
            port_a: self.port_a,
            port_b: self.port_b,
            proto: self.proto,
            family: AF_INET,
            _pad: [0; 2],
        }
    }
}

/// `CtEntry::flags` bits.
pub mod ct_flags {
    /// The connection was opened by endpoint `a` of the key.
    pub const ORIG_IS_A: u32 = 1 << 0;
    /// The connection closed (RST, or FIN in both directions).
    pub const CLOSED: u32 = 1 << 1;
    pub const FIN_ORIG: u32 = 1 << 2;
    pub const FIN_REPLY: u32 = 1 << 3;
    pub const RST: u32 = 1 << 4;
    /// Egress policy of the source endpoint was evaluated for this connection.
    pub const EGRESS_DONE: u32 = 1 << 5;
    pub const EGRESS_DENIED: u32 = 1 << 6;
    /// Ingress policy of the destination endpoint was evaluated for this connection.
    pub const INGRESS_DONE: u32 = 1 << 7;
    pub const INGRESS_DENIED: u32 = 1 << 8;
    /// Passed only because the policies that would drop it are in audit mode.
    pub const AUDIT: u32 = 1 << 9;
    /// The pre-DNAT tuple of a connection to a Service frontend: no verdict and no records of
    /// its own; its packets are counted on, and judged by, the translated connection.
    pub const SVC_ALIAS: u32 = 1 << 10;
    /// A connection kube-proxy translated from a Service frontend: the connection of record,
    /// counted at the client pod's veth through its alias.
    pub const SERVICE: u32 = 1 << 11;
    /// A connection from outside the node to a NodePort or load-balancer frontend: judged
    /// against the client kube-proxy masqueraded, not the node address it arrives from.
    pub const NODEPORT: u32 = 1 << 12;
    /// The close event is in the ring. A closed connection without it (its event lost to a
    /// full ring) has its close published by the daemon's sweep.
    pub const CLOSE_SENT: u32 = 1 << 13;
    /// On an [`super::EventKind::AfterClose`] event: the connection's last one; the daemon
    /// reads the entry back for packets after it.
    pub const AFTER_CLOSE_LAST: u32 = 1 << 14;
    /// The original direction's FIN was acknowledged by the other end.
    pub const FIN_ACKED_ORIG: u32 = 1 << 15;
    pub const FIN_ACKED_REPLY: u32 = 1 << 16;
    /// [`super::CtEntry::fin_ack`] holds the acknowledgement number of this direction's FIN.
    pub const FIN_AWAITED_ORIG: u32 = 1 << 17;
    pub const FIN_AWAITED_REPLY: u32 = 1 << 18;
    /// The FINs crossed (each sent before the other arrived): `fin_ack` holds only the first's
    /// acknowledgement, so the close is reported at the second FIN, not at its last ACK.
    pub const FINS_CROSSED: u32 = 1 << 19;
    /// The close event was claimed: exactly one packet sends it.
    pub const CLOSE_CLAIMED: u32 = 1 << 20;
    /// On a close event: its counters are final. It came with the ACK of the last FIN (each
    /// end acknowledged the other's), so no packet of the exchange follows; the daemon
    /// publishes it at once. Without it (a RST, crossed FINs) the daemon holds the close for
    /// `--close-grace` for the last ACKs.
    pub const CLOSE_EXACT: u32 = 1 << 21;
    /// With [`AUDIT`]: which side's audited policies would have dropped it, so its records
    /// name them. (An entry from before these bits has only `AUDIT`.)
    pub const EGRESS_AUDIT: u32 = 1 << 22;
    pub const INGRESS_AUDIT: u32 = 1 << 23;
    /// The connection was opened where observer sees packets as their ends address them,
    /// before this node translates anything: by a pod at its veth (`from_pod`), or by a TCP
    /// SYN from another node for a pod's own address at the uplink, or by a UDP packet from
    /// another node that reached its pod's veth as it arrived on the uplink (see
    /// [`crate::UNTRANSLATED_MARK`]). Only such a connection's packets may skip the node's
    /// stack: one first seen behind a translation observer does not know of (a `hostPort`, a
    /// Service not synced yet) needs netfilter to translate its replies back.
    pub const DIRECT: u32 = 1 << 24;
    pub const DENIED: u32 = EGRESS_DENIED | INGRESS_DENIED;
    /// Every audit bit: a verdict taken again clears them all.
    pub const AUDITS: u32 = AUDIT | EGRESS_AUDIT | INGRESS_AUDIT;
}

/// [`EventKind::AfterClose`] events per connection at most: a FIN exchange ends with one ACK
/// (two in a simultaneous close); retransmissions may add a few. A peer that keeps sending on
/// a closed connection costs no more events than this.
pub const AFTER_CLOSE_EVENTS: u8 = 4;

/// Index into the per-direction arrays of [`CtEntry`] and [`FlowEvent`].
pub const DIR_ORIG: usize = 0;
pub const DIR_REPLY: usize = 1;

/// Conntrack value. Counters are updated with atomic adds, the closing and TCP flags with
/// atomic ORs, and verdicts taken again after a policy change with an atomic OR and AND: both
/// directions of a flow can be processed on different CPUs at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub last_report_ns: u64,
    /// Packets and bytes (from the IP header on) per direction, `[orig, reply]`.
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Ifindex of the host-side interface where the first packet was seen.
    pub ifindex: u32,
    /// [`ct_flags`] bits.
    pub flags: u32,
    /// TCP flags seen: bits 0-7 original direction, bits 8-15 reply direction.
    pub tcp_flags: u32,
    /// [`TrafficClass`] as u8.
    pub class: u8,
    /// ICMP/ICMPv6 type and code of the first packet (0 for other protocols): tells an echo
    /// flow, whose ports carry the identifier, from others, whose key carries type and code.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// [`EventKind::AfterClose`] events sent for the connection (at most
    /// [`AFTER_CLOSE_EVENTS`]).
    pub after_close: u8,
    /// Rule ids that allowed the connection (0: none needed or none found).
    pub egress_rule: u32,
    pub ingress_rule: u32,
    /// `Config::policy_gen` when the verdicts were taken; a newer policy re-evaluates them.
    pub policy_gen: u32,
    /// TCP: the acknowledgement number that acknowledges the FIN named by
    /// `ct_flags::FIN_AWAITED_*` (its sequence number, plus its payload, plus one).
    pub fin_ack: u32,
}

// The kernel programs OR (and AND) bits into `flags` and `tcp_flags` as one atomic step,
// through the aligned 8-byte words that hold them: the BPF target has no 32-bit atomic fetch
// before cpu v3.
// `flags` is the upper half of its word (little-endian), whose lower half `ifindex` never
// changes once the entry is made.
const _: () = {
    assert!(core::mem::offset_of!(CtEntry, ifindex) % 8 == 0);
    assert!(core::mem::offset_of!(CtEntry, flags) == core::mem::offset_of!(CtEntry, ifindex) + 4);
    assert!(core::mem::offset_of!(CtEntry, tcp_flags) % 8 == 0);
};

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrafficClass {
    Unknown = 0,
    PodToPodLocal = 1,
    PodToPodRemote = 2,
    PodToWorld = 3,
    WorldToPod = 4,
    NodeToPod = 5,
    PodToNode = 6,
}

impl TrafficClass {
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::PodToPodLocal,
            2 => Self::PodToPodRemote,
            3 => Self::PodToWorld,
            4 => Self::WorldToPod,
            5 => Self::NodeToPod,
            6 => Self::PodToNode,
            _ => Self::Unknown,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::PodToPodLocal => "pod-to-pod-local",
            Self::PodToPodRemote => "pod-to-pod-remote",
            Self::PodToWorld => "pod-to-world",
            Self::WorldToPod => "world-to-pod",
            Self::NodeToPod => "node-to-pod",
            Self::PodToNode => "pod-to-node",
        }
    }
}

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    New = 1,
    Report = 2,
    Close = 3,
    /// The connection was denied by policy (emitted once per connection).
    Drop = 4,
    /// A packet of a TCP connection after its close event (the last ACK of a FIN exchange):
    /// the counters the close record waits for, so the daemon need not read the entry back.
    AfterClose = 5,
    /// A local pod's new IPv4 connection as its opening packet left the node's stack: the
    /// tuple the pod sent and the tuple on the wire (see [`FlowEvent`] for where each is).
    Wire = 6,
}

impl EventKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::New),
            2 => Some(Self::Report),
            3 => Some(Self::Close),
            4 => Some(Self::Drop),
            5 => Some(Self::AfterClose),
            6 => Some(Self::Wire),
            _ => None,
        }
    }
}

/// A connection-level event on the ring buffer.
///
/// A [`EventKind::Wire`] event is not a connection's entry. Its `key` holds the tuple the pod
/// sent, not in canonical order: `addr_a[0]` and `port_a` its source, `addr_b[0]` and `port_b`
/// its destination, as the pod addressed it (a Service's frontend). `packets` holds the wire's
/// source and destination addresses (IPv4, network order, as in a key), `bytes` their ports;
/// `ifindex` is where the packet left, `first_seen_ns` when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: CtKey,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub ifindex: u32,
    pub flags: u32,
    pub tcp_flags: u32,
    /// [`EventKind`] as u8.
    pub kind: u8,
    pub class: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub egress_rule: u32,
    pub ingress_rule: u32,
    pub _pad: u32,
}

/// Key of the endpoints map: an address of a pod on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `EndpointInfo::flags` bits, reserved for policy isolation and audit.
pub mod ep_flags {
    pub const HOST_NETWORK: u32 = 1 << 0;
    /// Some enforced (non-audit) policy isolates the endpoint for ingress / egress.
    pub const INGRESS_ISOLATED: u32 = 1 << 1;
    pub const EGRESS_ISOLATED: u32 = 1 << 2;
    /// Some audited policy isolates it: would-be drops are reported, not enforced.
    pub const INGRESS_AUDIT: u32 = 1 << 3;
    pub const EGRESS_AUDIT: u32 = 1 << 4;
}

/// Reserved identities; allocated ones start at [`identity::FIRST_ALLOCATED`].
pub mod identity {
    /// In a policy key: any peer.
    pub const ANY: u32 = 0;
    pub const HOST: u32 = 1;
    pub const WORLD: u32 = 2;
    pub const REMOTE_NODE: u32 = 3;
    /// Reserved, no longer given out: an address in another node's pod CIDR whose pod is not
    /// known (yet) takes the identity of its CIDR, one per CIDR.
    pub const UNKNOWN_POD: u32 = 4;
    pub const FIRST_ALLOCATED: u32 = 256;
}

pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

/// Policy LPM key data, most significant first: endpoint id, direction, remote identity,
/// protocol (0 in an entry: any), destination port in network order. Wildcards are shorter
/// prefixes: 72 bits match any protocol and port, 80 any port of the protocol, 80 + n a port
/// prefix. "Any peer" is identity [`identity::ANY`], a second lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PolicyKeyData {
    pub data: [u8; 12],
}

pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
pub const POLICY_PREFIX_FULL: u32 = 96;

impl PolicyKeyData {
    pub const fn new(endpoint: u32, dir: u8, identity: u32, proto: u8, port: u16) -> Self {
        let e = endpoint.to_be_bytes();
        let i = identity.to_be_bytes();
        let p = port.to_be_bytes();
        Self {
            data: [
                e[0], e[1], e[2], e[3], dir, i[0], i[1], i[2], i[3], proto, p[0], p[1],
            ],
        }
    }
}

/// `PolicyEntry::flags` bits.
pub mod policy_flags {
    /// Only audited policies allow this: enforcement ignores it.
    pub const AUDIT_ONLY: u32 = 1 << 0;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyEntry {
    pub rule: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    pub id: u32,
    pub flags: u32,
}

/// Key of the ipcache LPM trie. `data[0]` holds the address family (4 or 6) so one trie serves
/// both families: the prefix length counts those 32 bits too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpcacheKeyData {
    pub data: [u32; 5],
}

/// What an address outside this node's pods is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemoteKind {
    World = 0,
    RemotePod = 1,
    /// An address of this node itself.
    Host = 2,
    RemoteNode = 3,
    /// A pod of this node (its identity for policy; classification uses the endpoints map).
    LocalPod = 4,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpcacheEntry {
    pub identity: u32,
    /// [`RemoteKind`] as u8.
    pub kind: u8,
    pub _pad: [u8; 3],
}

/// Runtime settings the daemon writes into the single-entry config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Emit a report event for a live connection at most this often (0: never).
    pub report_interval_ns: u64,
    /// Bumped by the daemon whenever policy maps change: connections re-evaluate their next
    /// original-direction packet.
    pub policy_gen: u32,
    /// 1: enforce (drop denied traffic); 0: observe only, verdicts are still reported.
    pub enforce: u32,
    /// `config_flags`.
    pub flags: u32,
    /// Drop records the programs emit per CPU and second for packets policy denies (denied
    /// connections are not tracked; 0: no limit); the rest are counted in
    /// `stat::DROP_EVENTS_SUPPRESSED`.
    pub drop_events_per_cpu_s: u32,
}

/// The lowest and highest IPv4 address among this node's pods (host byte order), so the
/// uplink's XDP program settles a packet for anything else (the node itself, in the overlay
/// models most of its ingress) without an endpoints lookup. Within one /16 (a node's pod CIDR
/// always is) a bitmap, `LOCAL_BITS`, then tells exactly which addresses are pods', without
/// the lookup either. A hint only: the pod's veth judges whatever XDP passes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalRange {
    pub lo: u32,
    pub hi: u32,
    /// 0 (a map nobody wrote yet): no hint, every address is looked up.
    pub valid: u32,
    /// 1: `LOCAL_BITS` holds every pod address of the range (and, but for a moment while one
    /// is added or removed, only those), bit `a - (lo & !0xffff)`; 0: look addresses up.
    pub exact: u32,
}

/// Words of `LOCAL_BITS`: a bit for each address of a /16.
pub const LOCAL_BITS_WORDS: u32 = 1024;

impl LocalRange {
    /// Whether `addr` (host byte order) may be a local pod's.
    #[inline(always)]
    pub fn may_hold(&self, addr: u32) -> bool {
        self.valid == 0 || (addr >= self.lo && addr <= self.hi)
    }

    /// The range widened to hold `addr` (host byte order), not exact.
    pub fn with(self, addr: u32) -> Self {
        Self {
            lo: self.lo.min(addr),
            hi: self.hi.max(addr),
            valid: 1,
            exact: 0,
        }
    }

    /// The word of `LOCAL_BITS` and the bit in it that stand for `addr` (host byte order), if
    /// `addr` is in the /16 of `lo`.
    #[inline(always)]
    pub fn bit(&self, addr: u32) -> Option<(u32, u64)> {
        let off = addr.wrapping_sub(self.lo & !0xffff);
        if off >= LOCAL_BITS_WORDS * 64 {
            return None;
        }
        Some((off / 64, 1u64 << (off % 64)))
    }

    /// Whether the range lies in one /16, so `LOCAL_BITS` can hold it.
    pub fn fits_bits(&self) -> bool {
        self.valid != 0 && self.lo <= self.hi && self.lo >> 16 == self.hi >> 16
    }

    /// Exactly `addrs` (host byte order); with none, a range that holds nothing.
    pub fn of(addrs: impl Iterator<Item = u32>) -> Self {
        addrs.fold(Self::EMPTY, Self::with)
    }

    /// Valid and holding nothing: no pods on this node.
    pub const EMPTY: Self = Self {
        lo: u32::MAX,
        hi: 0,
        valid: 1,
        exact: 0,
    };
}

pub mod config_flags {
    /// Traffic from the node's own addresses to its pods passes ingress isolation (Kubernetes
    /// semantics: kubelet probes).
    pub const ALLOW_NODE: u32 = 1 << 0;
    /// Packets between two pods of the node, of connections nothing translates, go from the
    /// source's veth straight into the destination pod (`bpf_redirect_peer`), past the node's
    /// stack (`--no-local-redirect` clears it).
    pub const LOCAL_REDIRECT: u32 = 1 << 1;
    /// Packets between a pod of the node on a routed veth and a pod of another node, of
    /// connections nothing translates, skip the node's stack both ways: from the pod's veth
    /// to the uplink (`bpf_redirect_neigh`), from the uplink into the pod
    /// (`bpf_redirect_peer`) (`--no-remote-redirect` clears it).
    pub const REMOTE_REDIRECT: u32 = 1 << 2;
    /// Some pod veth observer watches is routed (`ATTACHED_ROUTED`): without one (kubenet's
    /// bridge) no packet can be delivered past the stack, and none pays a FIB lookup to find
    /// that out. Set by the daemon when it attaches the first.
    pub const ROUTED_PODS: u32 = 1 << 3;
}

/// An address, protocol and port: a Service frontend in `OBS_SERVICES`, a Service client in
/// `OBS_SVC_NAT`. Port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SvcKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// A Service connection's client (key: the pod's address and port) and where kube-proxy sent
/// it: the frontend it asked for and, once seen translated, the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcNat {
    pub frontend: [u32; 4],
    pub backend: [u32; 4],
    pub frontend_port: u16,
    pub backend_port: u16,
    /// The Service's id in `OBS_SERVICES` (a hash of namespace/name).
    pub svc_id: u32,
    /// `svc_nat::RESOLVED` once the backend is known.
    pub flags: u32,
    pub _pad: u32,
}

/// A connection from outside to a frontend on this node (NodePort, load-balancer IP), keyed by
/// the client's port (the address part of the key is zero): kube-proxy masquerades the client
/// to the node, keeping the port when it can, before the backend's veth sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodePortLink {
    pub client: [u32; 4],
    pub frontend: [u32; 4],
    pub client_port: u16,
    pub frontend_port: u16,
    pub svc_id: u32,
    /// `nodeport_flags`.
    pub flags: u32,
    /// When the client's packet was noted (coarse monotonic clock). The daemon removes notes
    /// older than a few seconds that no connection took, and marks `TAKEN` those a connection
    /// did, so neither is ever taken for a new connection (a kubelet probe reusing the port);
    /// the kernel links a note within microseconds of noting it.
    pub noted_ns: u64,
}

pub mod nodeport_flags {
    /// A connection took this note: it stays for that connection's verdicts only.
    pub const TAKEN: u32 = 1 << 0;
}

pub mod svc_nat {
    pub const RESOLVED: u32 = 1 << 0;
}

/// Wire-side counters of the node's uplink, a per-CPU array of [`UplinkCounter`] indexed by
/// [`uplink::index`]: where the packet was seen, what the node-side address is (a local pod's
/// IP on the wire: flat model or routed pod traffic; the node's own: host traffic and SNAT'd pod
/// traffic) and what the far side is. XDP tells only local pods from the rest (`other`).
pub mod uplink {
    pub const XDP_IN: u32 = 0;
    /// Dropped by XDP: ingress policy of a local pod.
    pub const XDP_DROP: u32 = 1;
    pub const TC_IN: u32 = 2;
    pub const TC_OUT: u32 = 3;
    /// Dropped by tc ingress: ingress policy of a local pod, where no XDP program judges it.
    pub const TC_DROP: u32 = 4;
    pub const POINTS: u32 = 5;
    pub const POINT_NAMES: [&str; POINTS as usize] =
        ["xdp", "xdp_drop", "tc_ingress", "tc_egress", "tc_drop"];

    pub const LOCAL_POD: u32 = 0;
    pub const LOCAL_NODE: u32 = 1;
    pub const LOCAL_OTHER: u32 = 2;
    pub const LOCAL_NAMES: [&str; 3] = ["pod", "node", "other"];

    pub const REMOTE_POD: u32 = 0;
    pub const REMOTE_NODE: u32 = 1;
    pub const REMOTE_WORLD: u32 = 2;
    /// XDP does not classify the far side: an ipcache (LPM) lookup costs more than the whole
    /// XDP budget. tc does.
    pub const REMOTE_ANY: u32 = 3;
    pub const REMOTE_NAMES: [&str; 4] = ["pod", "node", "world", "any"];
    pub const LOCALS: u32 = 3;
    pub const REMOTES: u32 = 4;

    pub const ENTRIES: u32 = POINTS * LOCALS * REMOTES;

    pub const fn index(point: u32, local: u32, remote: u32) -> u32 {
        (point * LOCALS + local) * REMOTES + remote
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UplinkCounter {
    pub packets: u64,
    /// From the IP header on, like every byte count here.
    pub bytes: u64,
}

/// Indexes of the per-CPU stats array. Every packet the programs could not fully account for,
/// and every event they could not deliver, lands in one of these.
pub mod stat {
    pub const PACKETS: u32 = 0;
    pub const EVENTS_LOST: u32 = 1;
    pub const CT_INSERT_FAILED: u32 = 2;
    pub const TRUNCATED: u32 = 3;
    pub const NON_IP: u32 = 4;
    pub const FRAGMENT: u32 = 5;
    pub const UNKNOWN_L4: u32 = 6;
    pub const IPV6_EXT_LIMIT: u32 = 7;
    /// IPv6 neighbour discovery (ICMPv6 133-137): counted here, not tracked as flows.
    pub const ICMPV6_ND: u32 = 8;
    /// Packets dropped by policy.
    pub const POLICY_DENIED: u32 = 9;
    /// Packets dropped because they could not be parsed for an isolated endpoint (fail closed).
    pub const UNPARSED_DENIED: u32 = 10;
    /// Packets that passed only because the policies denying them are audited.
    pub const AUDIT_PASSED: u32 = 11;
    /// Drop records not emitted for packets dropped by policy over
    /// `Config::drop_events_per_cpu_s` (the packets are in `POLICY_DENIED`).
    pub const DROP_EVENTS_SUPPRESSED: u32 = 12;
    /// Packets between two pods of the node that the destination's veth passed on the
    /// source veth's conntrack lookup and verdict, without its own (counted once, in
    /// `PACKETS`, at the source).
    pub const HANDED_OVER: u32 = 13;
    /// Packets between two pods of the node delivered from the source's veth straight into
    /// the destination pod, past the node's stack (`config_flags::LOCAL_REDIRECT`).
    pub const REDIRECTED: u32 = 14;
    /// Packets from a pod of the node to a pod of another node sent from the pod's veth
    /// straight to the uplink (`config_flags::REMOTE_REDIRECT`).
    pub const REDIRECTED_TO_UPLINK: u32 = 15;
    /// Packets from a pod of another node delivered from the uplink straight into the pod
    /// (`config_flags::REMOTE_REDIRECT`); counted in `PACKETS` there.
    pub const REDIRECTED_FROM_UPLINK: u32 = 16;
    pub const COUNT: u32 = 17;
    pub const NAMES: [&str; COUNT as usize] = [
        "packets",
        "events_lost",
        "ct_insert_failed",
        "truncated",
        "non_ip",
        "fragment",
        "unknown_l4",
        "ipv6_ext_limit",
        "icmpv6_nd",
        "policy_denied",
        "unparsed_denied",
        "audit_passed",
        "drop_events_suppressed",
        "handed_over",
        "redirected",
        "redirected_to_uplink",
        "redirected_from_uplink",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and made only of integers with explicit padding.
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtKey4 {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for IpcacheKeyData {}
    unsafe impl aya::Pod for IpcacheEntry {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for PolicyKeyData {}
    unsafe impl aya::Pod for PolicyEntry {}
    unsafe impl aya::Pod for UplinkCounter {}
    unsafe impl aya::Pod for SvcKey {}
    unsafe impl aya::Pod for SvcNat {}
    unsafe impl aya::Pod for NodePortLink {}
    unsafe impl aya::Pod for LocalRange {}
}

#[cfg(test)]
mod layout {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes_are_fixed() {
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtKey4>(), 16);
        assert_eq!(size_of::<CtEntry>(), 88);
        assert_eq!(size_of::<FlowEvent>(), 120);
        assert_eq!(size_of::<PolicyKeyData>(), 12);
        assert_eq!(size_of::<Config>(), 24);
        assert_eq!(size_of::<SvcKey>(), 20);
        assert_eq!(size_of::<SvcNat>(), 48);
        assert_eq!(size_of::<NodePortLink>(), 56);
        assert_eq!(size_of::<IpKey>(), 20);
        assert_eq!(size_of::<IpcacheKeyData>(), 20);
        assert_eq!(size_of::<IpcacheEntry>(), 8);
        assert_eq!(size_of::<LocalRange>(), 16);
    }

    #[test]
    fn local_range_holds_what_it_was_given() {
        let unknown = LocalRange::default();
        assert!(unknown.may_hold(0) && unknown.may_hold(u32::MAX));
        assert!(!LocalRange::EMPTY.may_hold(0) && !LocalRange::EMPTY.may_hold(1));
        let r = LocalRange::of([0x0af4_010a, 0x0af4_0103, 0x0af4_0120].into_iter());
        assert_eq!((r.lo, r.hi, r.valid), (0x0af4_0103, 0x0af4_0120, 1));
        assert!(r.may_hold(0x0af4_0110));
        assert!(!r.may_hold(0x0af4_0102) && !r.may_hold(0x0af4_0121));
        assert!(r.with(0x0a00_0001).may_hold(0x0a00_0001));
        // The bitmap covers the /16 of `lo`: 10.244.0.0 - 10.244.255.255 here.
        assert!(r.fits_bits() && !r.with(0x0af5_0001).fits_bits());
        assert_eq!(r.bit(0x0af4_0103), Some((4, 1 << 3)));
        assert_eq!(r.bit(0x0af4_ffff), Some((1023, 1 << 63)));
        assert_eq!(r.bit(0x0af5_0000), None);
        assert_eq!(r.bit(0x0af3_ffff), None);
        assert!(!LocalRange::EMPTY.fits_bits() && !LocalRange::default().fits_bits());
    }
}
