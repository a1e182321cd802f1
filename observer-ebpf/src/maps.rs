//! Every map the programs share with userspace. All are pinned by name so a restarted daemon
//! re-adopts them and the kernel keeps counting while it is away.
use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use observer_common::{
    Config, CtEntry, CtKey, CtKey4, EndpointInfo, IpKey, IpcacheEntry, IpcacheKeyData, LocalRange,
    NodePortLink, PolicyEntry, PolicyKeyData, SvcKey, SvcNat, UplinkCounter, ATTACHED_MAX_ENTRIES,
    CT6_MAX_ENTRIES, CT_MAX_ENTRIES, ENDPOINTS_MAX_ENTRIES, EVENTS_RING_BYTES, IPCACHE_MAX_ENTRIES,
    LOCAL_BITS_WORDS, NODEPORT_MAX_ENTRIES, POLICY_MAX_ENTRIES, SERVICES_MAX_ENTRIES,
    SVC_NAT_MAX_ENTRIES, UPLINKS_MAX_ENTRIES,
};

use crate::{
    classify::{self, KindSlot},
    handoff::Handoff,
    parse::{FragKey, FragPorts, Packet},
};

/// IPv4 connections under their 16-byte key; IPv6 ones in `CT6` (`conntrack::lookup` and
/// `insert` choose).
#[map(name = "OBS_CT4")]
pub static CT4: LruHashMap<CtKey4, CtEntry> = LruHashMap::pinned(CT_MAX_ENTRIES, 0);

#[map(name = "OBS_CT6")]
pub static CT6: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CT6_MAX_ENTRIES, 0);

#[map(name = "OBS_ENDPOINTS")]
pub static ENDPOINTS: HashMap<IpKey, EndpointInfo> = HashMap::pinned(ENDPOINTS_MAX_ENTRIES, 0);

// BPF_F_NO_PREALLOC is mandatory for LPM tries.
#[map(name = "OBS_IPCACHE")]
pub static IPCACHE: LpmTrie<IpcacheKeyData, IpcacheEntry> = LpmTrie::pinned(IPCACHE_MAX_ENTRIES, 1);

/// Ifindexes where `from_pod` is attached: a packet that entered through one of them was
/// already counted, so `to_pod` leaves its counters alone. The value says how the node reaches
/// the pod (`ATTACHED_ROUTED`, `ATTACHED_BRIDGED`).
#[map(name = "OBS_ATTACHED")]
pub static ATTACHED: HashMap<u32, u32> = HashMap::pinned(ATTACHED_MAX_ENTRIES, 0);

/// The uplinks observer is attached to (ifindex -> 1): where a pod's packet for another node
/// may be sent straight (`redirect::to_uplink`).
#[map(name = "OBS_UPLINKS")]
pub static UPLINKS: HashMap<u32, u32> = HashMap::pinned(UPLINKS_MAX_ENTRIES, 0);

/// Per endpoint and direction: (remote identity, protocol, port prefix) -> rule.
#[map(name = "OBS_POLICY")]
pub static POLICY: LpmTrie<PolicyKeyData, PolicyEntry> = LpmTrie::pinned(POLICY_MAX_ENTRIES, 1);

#[map(name = "OBS_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

#[map(name = "OBS_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(observer_common::stat::COUNT, 0);

#[map(name = "OBS_UPLINK")]
pub static UPLINK: PerCpuArray<UplinkCounter> =
    PerCpuArray::pinned(observer_common::uplink::ENTRIES, 0);

/// Service frontends (ClusterIPs, external and load-balancer IPs, this node's NodePorts) ->
/// the Service's id.
#[map(name = "OBS_SERVICES")]
pub static SERVICES: HashMap<SvcKey, u32> = HashMap::pinned(SERVICES_MAX_ENTRIES, 0);

/// Service clients: pod address and port -> frontend asked for and backend reached.
#[map(name = "OBS_SVC_NAT")]
pub static SVC_NAT: LruHashMap<SvcKey, SvcNat> = LruHashMap::pinned(SVC_NAT_MAX_ENTRIES, 0);

/// Clients from outside on frontends of this node, by client port.
#[map(name = "OBS_NODEPORT")]
pub static NODEPORT: LruHashMap<SvcKey, NodePortLink> = LruHashMap::pinned(NODEPORT_MAX_ENTRIES, 0);

#[map(name = "OBS_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// The span of this node's IPv4 pod addresses (see `LocalRange`): an array lookup, which the
/// JIT inlines, before the endpoints hash lookup, which it cannot.
#[map(name = "OBS_LOCAL_RANGE")]
pub static LOCAL_RANGE: Array<LocalRange> = Array::pinned(1, 0);

/// Which addresses of the local range are pods' (see `LocalRange::exact`): another inlined
/// array read in place of the endpoints lookup.
#[map(name = "OBS_LOCAL_BITS")]
pub static LOCAL_BITS: Array<u64> = Array::pinned(LOCAL_BITS_WORDS, 0);

/// Ports of IPv4/IPv6 first fragments, so later fragments (which carry no L4 header) are
/// accounted to their flow.
#[map(name = "OBS_FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::with_max_entries(8192, 0);

#[inline(always)]
pub fn stat_inc(idx: u32) {
    if let Some(p) = STATS.get_ptr_mut(idx) {
        // Per-CPU slot: no other writer.
        unsafe { *p += 1 };
    }
}

/// Scratch space for a new connection's entry while its verdict is taken (see
/// `conntrack::create`): not pinned, nothing outlives one program run.
#[map(name = "OBS_NEW_ENTRY")]
pub static NEW_ENTRY: PerCpuArray<CtEntry> = PerCpuArray::with_max_entries(1, 0);

/// The packet a tc program parsed, handed from the parser to the connection functions (see
/// `parse::observer_parse_tc`): not pinned, nothing outlives one program run.
#[map(name = "OBS_PACKET")]
pub static PACKET: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, the drop records of untracked connections emitted in the current one-second
/// window: [window start ns, records] (see `events::emit_drop_sampled`).
#[map(name = "OBS_DROP_BUDGET")]
pub static DROP_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, [jiffies, coarse monotonic ns] of the last reading (see `clock::now_ns`).
#[map(name = "OBS_CLOCK")]
pub static CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, the packet `from_pod` settled last, for `to_pod` to pass without a second lookup
/// (see `handoff`): not pinned, nothing outlives the packet that wrote it.
#[map(name = "OBS_HANDOFF")]
pub static HANDOFF: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, the ring's consumer position when this CPU last woke the reader (see
/// `events::emit`): one wake-up per CPU until the reader has read something.
#[map(name = "OBS_WOKE_AT")]
pub static WOKE_AT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, the ipcache's answer for recently seen IPv4 addresses (see
/// `classify::cached_kind`): not pinned, a cache.
#[map(name = "OBS_KIND_CACHE")]
pub static KIND_CACHE: PerCpuArray<KindSlot> =
    PerCpuArray::with_max_entries(classify::KIND_CACHE_SLOTS, 0);

/// Per CPU, the FIB lookup's parameters and answer (see `redirect::to_local_pod`): not
/// pinned, nothing outlives one program run; off the 512-byte stack.
#[map(name = "OBS_FIB")]
pub static FIB: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, the tuple of the UDP packet the uplink last marked `UNTRANSLATED_MARK`: source,
/// destination, ports (see `redirect::note_arrival`). Read where the stack delivers that
/// packet, within the same softirq on the same CPU; not pinned.
#[map(name = "OBS_ARRIVED")]
pub static ARRIVED: PerCpuArray<[u32; 3]> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU sequence for the benchmark programs (see `datapath::bench_new_conn`).
#[map(name = "OBS_BENCH_SEQ")]
pub static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
