//! Our own connection tracking: one LRU entry per connection under a canonical key, with
//! per-direction counters, TCP flags and timestamps.
use aya_ebpf::EbpfContext;
use aya_log_ebpf::error;
use observer_common::{
    ct_flags, stat, Config, CtEntry, CtKey, EventKind, TrafficClass, AFTER_CLOSE_EVENTS, AF_INET,
    DIR_EGRESS, DIR_INGRESS, DIR_ORIG, DIR_REPLY, IPPROTO_TCP,
};

use crate::{
    classify,
    events::{emit, emit_drop_sampled},
    handoff,
    maps::{stat_inc, CONFIG, CT4, CT6, NEW_ENTRY, UPLINKS},
    parse::{Packet, Plain, Seg},
    policy,
    service::{self, Link},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// Canonical key and whether the packet travels from endpoint `a` to `b`.
#[inline(always)]
pub fn key_of(pkt: &Packet) -> (CtKey, bool) {
    key_of_pair(
        pkt.family, pkt.proto, &pkt.src, pkt.sport, &pkt.dst, pkt.dport,
    )
}

/// Canonical key of a connection from `src`:`sport` to `dst`:`dport`, and whether `src` is
/// endpoint `a`.
#[inline(always)]
pub fn key_of_pair(
    family: u8,
    proto: u8,
    src: &[u32; 4],
    sport: u16,
    dst: &[u32; 4],
    dport: u16,
) -> (CtKey, bool) {
    let src_first = {
        let mut lt = 0i8; // -1: src < dst, 1: src > dst
        let mut i = 0;
        while i < 4 {
            let s = u32::from_be(src[i]);
            let d = u32::from_be(dst[i]);
            if lt == 0 {
                if s < d {
                    lt = -1;
                } else if s > d {
                    lt = 1;
                }
            }
            i += 1;
        }
        if lt == 0 {
            sport <= dport
        } else {
            lt < 0
        }
    };
    let (addr_a, port_a, addr_b, port_b) = if src_first {
        (*src, sport, *dst, dport)
    } else {
        (*dst, dport, *src, sport)
    };
    (
        CtKey {
            addr_a,
            addr_b,
            port_a,
            port_b,
            proto,
            family,
            _pad: [0; 2],
        },
        src_first,
    )
}

/// The connection's entry: IPv4 connections live in `CT4` under their 16-byte key, IPv6 ones
/// in `CT6`.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    if key.family == AF_INET {
        CT4.get_ptr_mut(key.v4())
    } else {
        CT6.get_ptr_mut(key)
    }
}

/// Inserts into the connection's table (`lookup`'s).
#[inline(always)]
pub fn insert(key: &CtKey, e: &CtEntry, flags: u64) -> Result<(), i32> {
    if key.family == AF_INET {
        CT4.insert(key.v4(), e, flags)
    } else {
        CT6.insert(key, e, flags)
    }
}

#[inline(always)]
pub fn add(p: *mut u64, v: u64) {
    // Both directions of a connection may be processed on two CPUs at once.
    // The BPF target has no `AtomicU64`; the intrinsic lowers to BPF_XADD.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        )
    };
}

/// ORs `bits` into the entry's `flags` as one atomic step; returns the flags before it. Both
/// directions of a connection may be processed on two CPUs at once (both ends closing
/// together): a plain read-modify-write lets one CPU's bits overwrite the other's, and a close
/// whose FIN is lost so is never reported. See `CtEntry`'s layout assertions for the word.
#[inline(always)]
fn or_flags(e: &mut CtEntry, bits: u32) -> u32 {
    let word = core::ptr::addr_of_mut!(e.ifindex).cast::<u64>();
    (or_word(word, (bits as u64) << 32) >> 32) as u32
}

/// ANDs `mask` into the entry's `flags` as one atomic step (see [`or_flags`]).
#[inline(always)]
fn and_flags(e: &mut CtEntry, mask: u32) {
    let word = core::ptr::addr_of_mut!(e.ifindex).cast::<u64>();
    // The lower half, `ifindex`, is kept.
    let mask = ((mask as u64) << 32) | 0xffff_ffff;
    unsafe {
        core::intrinsics::atomic_and::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            word, mask,
        )
    };
}

/// ORs the TCP flags seen into the entry's `tcp_flags` as one atomic step.
#[inline(always)]
fn or_tcp_flags(e: &mut CtEntry, seen: u32) {
    or_word(
        core::ptr::addr_of_mut!(e.tcp_flags).cast::<u64>(),
        seen as u64,
    );
}

#[inline(always)]
fn or_word(p: *mut u64, v: u64) -> u64 {
    unsafe {
        core::intrinsics::atomic_or::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(p, v)
    }
}

/// Where a packet is being processed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Host side of a pod veth, ingress: the source is the local pod (egress policy).
    FromPod,
    /// Host side of a pod veth, egress: the destination is the local pod (ingress policy).
    ToPod,
    /// The uplink's egress, for packets a pod sent to a Service frontend, after the DNAT: the
    /// source is the local pod (egress policy against the remote backend).
    Uplink,
}

/// Which packets a hook adds to the connection's counters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Count {
    All,
    /// Another hook on this node counts the packet (or already did).
    None,
    /// XDP on the uplink: packets it passes are counted at the pod's veth; only those it drops
    /// would otherwise go uncounted.
    Dropped,
}

impl Count {
    #[inline(always)]
    fn applies(self, a: Action) -> bool {
        match self {
            Count::All => true,
            Count::None => false,
            Count::Dropped => a == Action::Drop,
        }
    }
}

/// What to do with the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Action {
    Pass = 0,
    /// Pass, marked `SVC_MARK` (a Service connection's packet before its DNAT).
    PassMarked = 1,
    Drop = 2,
}

impl Action {
    /// Back from a global function's scalar result; anything unknown drops.
    #[inline(always)]
    pub fn from_raw(v: i32) -> Action {
        match v {
            0 => Action::Pass,
            1 => Action::PassMarked,
            _ => Action::Drop,
        }
    }
}

#[inline(always)]
fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

/// Takes the policy verdict this hook owes the connection, if it has not been taken yet:
/// egress of the source pod at `FromPod`, ingress of the destination pod at `ToPod`. Only the
/// original direction is judged; replies of an allowed connection pass.
#[inline(always)]
fn judge(e: &mut CtEntry, key: &CtKey, hook: Hook, from_a: bool, dport: u16) {
    let (done, denied, audit, dir) = match hook {
        Hook::FromPod | Hook::Uplink => (
            ct_flags::EGRESS_DONE,
            ct_flags::EGRESS_DENIED,
            ct_flags::EGRESS_AUDIT,
            DIR_EGRESS,
        ),
        Hook::ToPod => (
            ct_flags::INGRESS_DONE,
            ct_flags::INGRESS_DENIED,
            ct_flags::INGRESS_AUDIT,
            DIR_INGRESS,
        ),
    };
    if e.flags & done != 0 {
        return;
    }
    e.flags |= done;
    // The local pod is the source at FromPod and Uplink, the destination at ToPod.
    let local_is_a = from_a == (hook != Hook::ToPod);
    let (local, remote) = if local_is_a {
        (&key.addr_a, &key.addr_b)
    } else {
        (&key.addr_b, &key.addr_a)
    };
    let Some(ep) = classify::local_endpoint(key.family, local) else {
        return;
    };
    let v = policy::evaluate(ep, dir, key.family, remote, key.proto, dport);
    if v.denied {
        e.flags |= denied;
    }
    if v.audit {
        e.flags |= ct_flags::AUDIT | audit;
    }
    match hook {
        Hook::FromPod | Hook::Uplink => e.egress_rule = v.rule,
        Hook::ToPod => e.ingress_rule = v.rule,
    }
}

/// Ingress of a connection kube-proxy masqueraded to the node on its way from `client` to a
/// NodePort or load-balancer frontend: judged against the client, not the node.
#[inline(always)]
pub fn judge_nodeport(e: &mut CtEntry, key: &CtKey, from_a: bool, dport: u16, client: &[u32; 4]) {
    e.flags &= !(ct_flags::INGRESS_DENIED | ct_flags::AUDITS);
    e.flags |= ct_flags::NODEPORT | ct_flags::EGRESS_DONE | ct_flags::INGRESS_DONE;
    let dst = if from_a { &key.addr_b } else { &key.addr_a };
    let Some(ep) = classify::local_endpoint(key.family, dst) else {
        return;
    };
    let v = policy::evaluate(ep, DIR_INGRESS, key.family, client, key.proto, dport);
    if v.denied {
        e.flags |= ct_flags::INGRESS_DENIED;
    }
    if v.audit {
        e.flags |= ct_flags::AUDIT | ct_flags::INGRESS_AUDIT;
    }
    e.ingress_rule = v.rule;
}

/// The verdicts a hook owes, both ends' wherever they are pods of this node: at `FromPod` the
/// destination's ingress too, so the connection's first event already carries its full
/// verdict and a denied packet dies at the source's veth; at `ToPod` the source's egress too,
/// for a connection whose source veth saw it under another tuple (a Service's DNAT).
#[inline(always)]
fn judge_all(e: &mut CtEntry, key: &CtKey, hook: Hook, from_a: bool, dport: u16) {
    // The source's egress first, wherever the hook: a drop names the side a direct
    // connection would have named.
    let (first, then) = match hook {
        Hook::FromPod | Hook::ToPod => (Hook::FromPod, Some(Hook::ToPod)),
        Hook::Uplink => (Hook::Uplink, None),
    };
    judge(e, key, first, from_a, dport);
    if let Some(h) = then {
        if e.flags & ct_flags::DENIED == 0 {
            judge(e, key, h, from_a, dport);
        }
    }
}

/// Whether `judge_all` at `hook` would take no verdict: the source's egress is taken, and at
/// a pod's veth the destination's ingress too unless the egress denied.
#[inline(always)]
fn judged(flags: u32, hook: Hook) -> bool {
    flags & ct_flags::EGRESS_DONE != 0
        && (hook == Hook::Uplink || flags & (ct_flags::DENIED | ct_flags::INGRESS_DONE) != 0)
}

/// Takes the verdicts a connection in the table still owes at `hook`, or takes them all again
/// under a newer policy (a NodePort client's from its note; without one, as an unknown outside
/// client). Judged on a copy in the per-CPU scratch slot, then the verdict bits that changed
/// are applied as atomic steps: the other direction may be counted on another CPU meanwhile,
/// and a plain write of the flags read before its FIN was ORed in would undo that FIN (the
/// close then never seen). Bits gained are ORed in before the ones lost are cleared, so
/// another CPU never sees fewer verdicts than the old and the new state both hold. Returns
/// whether the connection is denied now and was not before; `None` without the scratch slot.
#[inline(always)]
fn rejudge(
    e: &mut CtEntry,
    key: &CtKey,
    hook: Hook,
    from_a: bool,
    pkt: &Packet,
    cfg: &Config,
) -> Option<bool> {
    let c = unsafe { &mut *NEW_ENTRY.get_ptr_mut(0)? };
    *c = *e;
    let old = c.flags;
    if c.policy_gen != cfg.policy_gen && c.flags & ct_flags::NODEPORT != 0 {
        c.policy_gen = cfg.policy_gen;
        let client = service::nodeport_link(pkt).map_or([0; 4], |l| l.client);
        judge_nodeport(c, key, from_a, pkt.dport, &client);
    }
    if c.policy_gen != cfg.policy_gen {
        c.flags &= !(ct_flags::EGRESS_DONE
            | ct_flags::EGRESS_DENIED
            | ct_flags::INGRESS_DONE
            | ct_flags::INGRESS_DENIED
            | ct_flags::AUDITS);
        c.policy_gen = cfg.policy_gen;
    }
    let before = c.flags & ct_flags::DENIED;
    judge_all(c, key, hook, from_a, pkt.dport);
    e.egress_rule = c.egress_rule;
    e.ingress_rule = c.ingress_rule;
    e.policy_gen = c.policy_gen;
    let (gained, lost) = (c.flags & !old, old & !c.flags);
    if gained != 0 {
        or_flags(e, gained);
    }
    if lost != 0 {
        and_flags(e, !lost);
    }
    Some(before == 0 && c.flags & ct_flags::DENIED != 0)
}

/// Accounts one packet of `bytes` to its connection (as `count` says: another hook on this node
/// may count it), creating the connection when new, and enforces policy.
#[inline(always)]
pub fn process<C: EbpfContext>(
    ctx: &C,
    pkt: &Packet,
    bytes: u64,
    ifindex: u32,
    hook: Hook,
    count: Count,
    missing: bool,
    class_of_new: impl FnOnce() -> TrafficClass,
) -> Action {
    let (key, from_a) = key_of(pkt);
    // Coarse (jiffies) time is plenty for idle timeouts and reports, at a fraction of the cost.
    let now = crate::clock::now_ns();
    let flags = pkt.tcp_flags;
    let is_tcp = pkt.proto == IPPROTO_TCP;
    let cfg = config();

    // `missing`: the established path's lookup of this tuple just missed; a connection another
    // CPU creates meanwhile is found by the insert below.
    let hit = if missing { None } else { lookup(&key) };
    // A plain pointer, null when no entry is reopened: an `Option`'s unset payload would be
    // refused by the verifier.
    let mut reopen: *mut CtEntry = core::ptr::null_mut();
    if let Some(e) = hit {
        let e = unsafe { &mut *e };
        if e.flags & ct_flags::SVC_ALIAS != 0 {
            return service::through_alias(e, pkt, from_a, bytes, &cfg);
        }
        // A Service connection is counted where its client sends and receives, through its
        // alias; the backend's side sees the same packets again.
        let count = if e.flags & ct_flags::SERVICE != 0 {
            Count::None
        } else {
            count
        };
        // A fresh SYN on a closed connection is the tuple being reused: start over.
        let reopened =
            is_tcp && e.flags & ct_flags::CLOSED != 0 && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if !reopened {
            let orig = from_a == (e.flags & ct_flags::ORIG_IS_A != 0);
            if orig && (e.policy_gen != cfg.policy_gen || !judged(e.flags, hook)) {
                match rejudge(e, &key, hook, from_a, pkt, &cfg) {
                    Some(true) => {
                        emit(EventKind::Drop, &key, e);
                    }
                    Some(false) => {}
                    // Fail closed: no verdict could be taken.
                    None => return Action::Drop,
                }
            }
            let action = verdict(e.flags, cfg.enforce);
            if count.applies(action) {
                update(
                    &key,
                    e,
                    from_a,
                    bytes,
                    now,
                    flags,
                    pkt.seg,
                    is_tcp,
                    cfg.report_interval_ns,
                );
            }
            return action;
        }
        reopen = e as *mut CtEntry;
    }
    let link = match hook {
        Hook::FromPod => {
            if let Some(svc) = service::frontend(pkt) {
                created(hook, false);
                return service::open_alias(&key, pkt, svc, from_a, &cfg);
            }
            Link::None
        }
        Hook::ToPod | Hook::Uplink => service::resolve(pkt),
    };
    let class = class_of_new();
    create(
        ctx, &key, from_a, bytes, now, pkt, ifindex, class, hook, count, &cfg, link, reopen,
    )
}

/// A packet of an established connection, settled before the parser's slot and the global
/// functions (a pod veth's tc programs): the same lookup, verdict and update `process` would
/// make, for the connections where `process` would take no other step. `Full` for everything
/// else, which `process` then sees in full: a new connection or a SYN without ACK (on a
/// closed one it reopens the tuple), a Service or NodePort one, an original-direction packet
/// whose verdicts are not all taken, or taken under an older policy. A closed connection's
/// last ACKs and retransmissions are settled here: `process` takes the same steps for them.
/// `count`: whether this hook adds the packet to the connection's counters; `takes`: given
/// whether the connection is `ct_flags::DIRECT`, whether the caller takes it at all (one it
/// does not is left alone, `Special`, uncounted, before any other step). Returns the action,
/// the connection's `TrafficClass` and whether it is `DIRECT`.
#[inline(always)]
pub fn established<F: FnOnce(bool) -> bool>(
    p: &Plain,
    bytes: u64,
    count: bool,
    takes: F,
) -> Established {
    // An opener is nearly always a new connection (a reused tuple is `process`'s case): spare
    // it a lookup that would miss. Its SYN-ACK is a reply like any other.
    if p.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return Established::Full;
    }
    let (key, from_a) = plain_key(p);
    let Some(e) = CT4.get_ptr_mut(key.v4()) else {
        return Established::Missing;
    };
    let e = unsafe { &mut *e };
    let cfg = config();
    let special = ct_flags::SVC_ALIAS | ct_flags::SERVICE | ct_flags::NODEPORT;
    if e.flags & special != 0 || !takes(e.flags & ct_flags::DIRECT != 0) {
        return Established::Special;
    }
    if e.policy_gen != cfg.policy_gen {
        return Established::Full;
    }
    // Left to the full path while `judge_all` owes a verdict (at a pod's veth, `FromPod` and
    // `ToPod` owe the same).
    let orig = from_a == (e.flags & ct_flags::ORIG_IS_A != 0);
    if orig && !judged(e.flags, Hook::FromPod) {
        return Established::Full;
    }
    let action = verdict(e.flags, cfg.enforce);
    if count {
        let now = crate::clock::now_ns();
        let is_tcp = p.proto == IPPROTO_TCP;
        update(
            &key,
            e,
            from_a,
            bytes,
            now,
            p.tcp_flags,
            p.seg,
            is_tcp,
            cfg.report_interval_ns,
        );
    }
    Established::Settled(action, e.class, e.flags & ct_flags::DIRECT != 0)
}

/// For a TCP SYN from the uplink: whether its tuple has no connection, or one that may skip
/// the node's stack (`ct_flags::DIRECT`), or a closed one the SYN opens again.
#[inline(always)]
pub fn direct_or_absent(p: &Plain) -> bool {
    let (key, _) = plain_key(p);
    match CT4.get_ptr_mut(key.v4()) {
        None => true,
        Some(e) => unsafe { (*e).flags & (ct_flags::DIRECT | ct_flags::CLOSED) != 0 },
    }
}

/// The key of a plain IPv4 packet's connection, and whether its source is end `a`.
#[inline(always)]
fn plain_key(p: &Plain) -> (CtKey, bool) {
    key_of_pair(
        AF_INET,
        p.proto,
        &[p.src, 0, 0, 0],
        p.sport,
        &[p.dst, 0, 0, 0],
        p.dport,
    )
}

/// What [`established`] made of a packet.
pub enum Established {
    /// Settled: the action, the connection's `TrafficClass`, and whether it may skip the
    /// node's stack (`ct_flags::DIRECT`).
    Settled(Action, u8, bool),
    /// No connection on the tuple: the full path need not look it up again.
    Missing,
    /// Left to the full path.
    Full,
    /// Left to the full path: a connection netfilter translates (a Service's, a NodePort's),
    /// or one the caller does not take.
    Special,
}

/// Rare (the LRU map makes room by evicting): counted, and logged through aya-log.
#[inline(never)]
fn insert_failed<C: EbpfContext>(ctx: &C, ifindex: u32) {
    stat_inc(stat::CT_INSERT_FAILED);
    error!(ctx, "conntrack insert failed on ifindex {}", ifindex);
}

#[inline(always)]
pub fn verdict(flags: u32, enforce: u32) -> Action {
    if flags & ct_flags::DENIED != 0 {
        if enforce != 0 {
            stat_inc(stat::POLICY_DENIED);
            return Action::Drop;
        }
    } else if flags & ct_flags::AUDIT != 0 {
        stat_inc(stat::AUDIT_PASSED);
    }
    Action::Pass
}

/// `from_pod` opens a connection its pod opened: where the packet leaves the stack, its wire
/// side is reported (`handoff`).
#[inline(always)]
fn created(hook: Hook, first_is_reply: bool) {
    if hook == Hook::FromPod && !first_is_reply {
        if let Some(s) = handoff::slot() {
            s.note_created();
        }
    }
}

/// Whether a connection `pkt` opens at `hook` on `ifindex` is `ct_flags::DIRECT`: its first
/// packet an opener (a TCP SYN, any other protocol's first packet) seen before this node
/// translates anything (at a pod's veth as the pod sent it, or from the uplink, for a pod's
/// own address, before the stack's DNAT; from the uplink through the stack, untranslated). A
/// connection picked up mid-way is not: its opener may have been translated.
#[inline(always)]
fn direct_opener(pkt: &Packet, hook: Hook, ifindex: u32) -> bool {
    let opener = if pkt.proto == IPPROTO_TCP {
        pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    } else {
        true
    };
    opener
        && match hook {
            Hook::FromPod => true,
            // A UDP packet from the uplink: seen there as here (`UNTRANSLATED_MARK`).
            Hook::ToPod if pkt.proto != IPPROTO_TCP => pkt.untranslated != 0,
            Hook::ToPod => unsafe { UPLINKS.get(&ifindex) }.is_some(),
            Hook::Uplink => false,
        }
}

/// Opens the connection `pkt` starts: judges it and, unless it is dropped, enters it in the
/// table (`reopen`: the lingering closed entry of its tuple to take over, or null).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn create<C: EbpfContext>(
    ctx: &C,
    key: &CtKey,
    from_a: bool,
    bytes: u64,
    now: u64,
    pkt: &Packet,
    ifindex: u32,
    class: TrafficClass,
    hook: Hook,
    count: Count,
    cfg: &Config,
    link: Link,
    reopen: *mut CtEntry,
) -> Action {
    let flags = pkt.tcp_flags;
    let is_tcp = pkt.proto == IPPROTO_TCP;
    // A SYN-ACK as the first packet seen means its receiver opened the connection.
    let first_is_reply = is_tcp && flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK);
    let orig_is_a = from_a != first_is_reply;
    let dir = if first_is_reply { DIR_REPLY } else { DIR_ORIG };
    // Built in a per-CPU scratch slot, not on the stack: every hook inlines this, and 88 bytes
    // more of its 512-byte frame leave no room for the calls it makes.
    let Some(e) = NEW_ENTRY.get_ptr_mut(0) else {
        return Action::Drop;
    };
    let e = unsafe { &mut *e };
    *e = CtEntry {
        first_seen_ns: now,
        last_seen_ns: now,
        last_report_ns: now,
        packets: [0; 2],
        bytes: [0; 2],
        ifindex,
        flags: if orig_is_a { ct_flags::ORIG_IS_A } else { 0 },
        tcp_flags: (flags as u32) << (dir * 8),
        class: class as u8,
        icmp_type: pkt.icmp_type,
        icmp_code: pkt.icmp_code,
        after_close: 0,
        egress_rule: 0,
        ingress_rule: 0,
        policy_gen: cfg.policy_gen,
        fin_ack: 0,
    };
    if is_tcp && flags & TCP_RST != 0 {
        e.flags |= ct_flags::RST;
    }
    match link {
        // A pod talking to itself is always allowed.
        Link::Hairpin => {
            e.flags |= ct_flags::EGRESS_DONE | ct_flags::INGRESS_DONE;
        }
        Link::Service => e.flags |= ct_flags::SERVICE,
        Link::NodePort(client) => {
            e.class = classify::to_pod(key.family, &client) as u8;
            judge_nodeport(e, key, from_a, pkt.dport, &client);
        }
        Link::Outside => {
            e.class = TrafficClass::WorldToPod as u8;
            judge_nodeport(e, key, from_a, pkt.dport, &[0; 4]);
        }
        Link::None => {
            if direct_opener(pkt, hook, ifindex) {
                e.flags |= ct_flags::DIRECT;
            }
        }
    }
    // A connection picked up from its reply side is judged when its next original packet
    // comes by; replies pass.
    if !first_is_reply {
        judge_all(e, key, hook, from_a, pkt.dport);
    }
    // Whether this packet is counted depends on its verdict (XDP counts only its drops); the
    // stats are bumped once, by the `verdict` calls below. A Service connection's first
    // packet passed its client's veth before the link existed: it is counted here.
    let denied = e.flags & ct_flags::DENIED != 0 && cfg.enforce != 0;
    let counted = match count {
        _ if link == Link::Service => true,
        Count::All => true,
        Count::None => false,
        Count::Dropped => denied,
    };
    if counted {
        e.packets[dir] = 1;
        e.bytes[dir] = bytes;
    }
    if denied {
        // A connection judged denied is dropped without tracking it, at every hook: a pod
        // spraying denied openers, or a denied flood, would otherwise fill the shared table
        // and evict the node's live connections (whose next packets would then be judged as
        // new). Each dropped packet is its own record (as Hubble shows each drop), sampled
        // under a flood; every packet is counted in `policy_denied`.
        if link == Link::Service {
            service::unresolve(pkt);
        }
        emit_drop_sampled(key, e, cfg.drop_events_per_cpu_s, now);
        return verdict(e.flags, cfg.enforce);
    }
    // A tuple reused while its closed entry lingers takes that entry over where it is: an
    // insert would pop a free element off the LRU's lists and push the old one back, a third of
    // a new connection's time in traffic, where busy clients reuse their ports within the
    // linger. Inserted after all if the daemon removed the entry meanwhile. A new tuple must
    // not overwrite a connection another CPU created first.
    let placed = !reopen.is_null() && {
        unsafe { *reopen = *e };
        lookup(key).is_some()
    };
    if !placed && insert(key, e, BPF_NOEXIST).is_err() {
        let Some(existing) = lookup(key) else {
            insert_failed(ctx, ifindex);
            return verdict(e.flags, cfg.enforce);
        };
        let existing = unsafe { &mut *existing };
        if existing.flags & ct_flags::CLOSED == 0 {
            // Another CPU created it first: count the packet there.
            let action = verdict(existing.flags | (e.flags & ct_flags::DENIED), cfg.enforce);
            if count.applies(action) {
                update(
                    key,
                    existing,
                    from_a,
                    bytes,
                    now,
                    flags,
                    pkt.seg,
                    is_tcp,
                    cfg.report_interval_ns,
                );
            }
            return action;
        }
        // A reused tuple whose entry closed after this packet's lookup: replaced too.
        if insert(key, e, BPF_ANY).is_err() {
            insert_failed(ctx, ifindex);
            // Fail closed: the verdict taken above still applies.
            return verdict(e.flags, cfg.enforce);
        }
    }
    let kind = if e.flags & ct_flags::DENIED != 0 {
        EventKind::Drop
    } else {
        EventKind::New
    };
    created(hook, first_is_reply);
    emit(kind, key, e);
    verdict(e.flags, cfg.enforce)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn update(
    key: &CtKey,
    e: &mut CtEntry,
    from_a: bool,
    bytes: u64,
    now: u64,
    flags: u8,
    seg: Seg,
    is_tcp: bool,
    interval: u64,
) {
    let orig_is_a = e.flags & ct_flags::ORIG_IS_A != 0;
    let dir = if from_a == orig_is_a {
        DIR_ORIG
    } else {
        DIR_REPLY
    };
    add(&mut e.packets[dir] as *mut u64, 1);
    add(&mut e.bytes[dir] as *mut u64, bytes);
    e.last_seen_ns = now;
    if is_tcp {
        let seen = (flags as u32) << (dir * 8);
        if e.tcp_flags & seen != seen {
            or_tcp_flags(e, seen);
        }
        // An established connection's packet passes two tests here: no FIN or RST, no FIN
        // awaiting its acknowledgement.
        let awaited = ct_flags::FIN_AWAITED_ORIG | ct_flags::FIN_AWAITED_REPLY;
        if (flags & (TCP_FIN | TCP_RST) != 0 || e.flags & awaited != 0)
            && e.flags & ct_flags::CLOSE_CLAIMED == 0
            && tcp_close(key, e, dir, flags, seg)
        {
            return;
        }
        if e.flags & ct_flags::CLOSE_SENT != 0 {
            after_close(key, e);
            return;
        }
    }
    if interval != 0 && now - e.last_report_ns >= interval {
        e.last_report_ns = now;
        emit(EventKind::Report, key, e);
    }
}

/// The close of a TCP connection, from a packet in direction `dir`: its RST, its FINs, and
/// the acknowledgements of the FINs. The close event goes out with the packet that
/// acknowledges the last FIN, so its counters are final (`CLOSE_EXACT`); after a RST, or
/// FINs that crossed, with the packet that closed it. Returns whether this packet sent it.
///
/// Both ends' packets may be processed on two CPUs at once: every step is an atomic OR, and
/// the decision is taken from the flags the packet's last OR returned. Whichever CPU made the
/// last of the ORs that decide a close sees all of them, so a close is never left unclaimed;
/// `CLOSE_CLAIMED` lets only one CPU send it.
#[inline(always)]
fn tcp_close(key: &CtKey, e: &mut CtEntry, dir: usize, flags: u8, seg: Seg) -> bool {
    let (fin, awaited, other_awaited, other_acked) = if dir == DIR_ORIG {
        (
            ct_flags::FIN_ORIG,
            ct_flags::FIN_AWAITED_ORIG,
            ct_flags::FIN_AWAITED_REPLY,
            ct_flags::FIN_ACKED_REPLY,
        )
    } else {
        (
            ct_flags::FIN_REPLY,
            ct_flags::FIN_AWAITED_REPLY,
            ct_flags::FIN_AWAITED_ORIG,
            ct_flags::FIN_ACKED_ORIG,
        )
    };
    // The flags as this packet's last OR left them; 0: no OR, nothing decided.
    let mut f = 0;
    // The other end's FIN, acknowledged.
    let waiting = other_awaited | other_acked | ct_flags::FINS_CROSSED;
    if flags & TCP_ACK != 0 && e.flags & waiting == other_awaited && seg.ack == e.fin_ack {
        f = or_flags(e, other_acked) | other_acked;
    }
    let mut closing = 0;
    if flags & TCP_RST != 0 {
        closing |= ct_flags::RST;
    }
    if flags & TCP_FIN != 0 {
        closing |= fin;
    }
    if closing != 0 {
        let old = or_flags(e, closing);
        f = old | closing;
        if old & fin == 0 && closing & fin != 0 {
            // This end's first FIN: `fin_ack` takes its acknowledgement, unless it holds the
            // other end's, still unacknowledged (the FINs crossed).
            let held = or_flags(e, awaited);
            f = held | awaited;
            if held & (other_awaited | other_acked) == other_awaited {
                f = or_flags(e, ct_flags::FINS_CROSSED) | ct_flags::FINS_CROSSED;
            } else {
                e.fin_ack = seg.fin_ack;
            }
        }
    }
    if !closed(f) {
        return false;
    }
    if f & ct_flags::CLOSED == 0 {
        or_flags(e, ct_flags::CLOSED);
    }
    let both_acked = ct_flags::FIN_ACKED_ORIG | ct_flags::FIN_ACKED_REPLY;
    if f & (ct_flags::RST | ct_flags::FINS_CROSSED) != 0 {
        claim_close(key, e, false)
    } else if f & both_acked == both_acked {
        claim_close(key, e, true)
    } else {
        // The last FIN's acknowledgement is still to come.
        false
    }
}

/// Sends the close event unless another packet did. `exact`: the last FIN was acknowledged.
#[inline(always)]
fn claim_close(key: &CtKey, e: &mut CtEntry, exact: bool) -> bool {
    if or_flags(e, ct_flags::CLOSE_CLAIMED) & ct_flags::CLOSE_CLAIMED != 0 {
        return false;
    }
    if exact {
        or_flags(e, ct_flags::CLOSE_EXACT);
    }
    if emit(EventKind::Close, key, e) {
        or_flags(e, ct_flags::CLOSE_SENT);
    }
    true
}

/// RST, or FIN in both directions.
#[inline(always)]
fn closed(flags: u32) -> bool {
    let both_fin = ct_flags::FIN_ORIG | ct_flags::FIN_REPLY;
    flags & ct_flags::RST != 0 || flags & both_fin == both_fin
}

/// A packet of a connection whose close event went out (the last ACK of its FIN exchange,
/// retransmissions): the daemon holds the close record for its grace and takes the last
/// counters from these events instead of reading the entry back, up to
/// [`AFTER_CLOSE_EVENTS`]; the last one says so, and the daemon reads the entry for any packet
/// after it.
#[inline(always)]
fn after_close(key: &CtKey, e: &mut CtEntry) {
    if e.after_close >= AFTER_CLOSE_EVENTS {
        return;
    }
    e.after_close += 1;
    if e.after_close == AFTER_CLOSE_EVENTS {
        or_flags(e, ct_flags::AFTER_CLOSE_LAST);
    }
    emit(EventKind::AfterClose, key, e);
}
