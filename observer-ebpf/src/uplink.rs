//! The node's uplink. XDP on ingress counts every frame at the earliest point and judges
//! ingress policy for packets addressed straight to a local pod (the flat model, routed
//! cross-node pod traffic) with the same conntrack and policy maps as the pod veths, so a
//! denied packet dies before the stack allocates anything for it. tc on both directions counts
//! the wire-side traffic after (ingress) and before (egress) the stack, NAT included. tc
//! ingress also delivers a packet from a pod of another node straight into a pod on a routed
//! veth, its ingress verdict taken there as `to_pod` would take it (`deliver`, `redirect`).
use aya_ebpf::{
    bindings::{__sk_buff, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use observer_common::{
    stat, uplink, RemoteKind, UplinkCounter, AF_INET, IPPROTO_TCP, IPPROTO_UDP, NODEPORT_MARK,
    SVC_MARK,
};

use crate::{
    classify,
    conntrack::{direct_or_absent, established, process, Action, Count, Established, Hook},
    datapath::{tc_conn, unparsed_denied, COUNT},
    handoff,
    maps::{stat_inc, UPLINK},
    parse::{ip_addrs, observer_parse_tc, parse, parsed, plain_ipv4, Packet, PacketCtx, Plain},
    redirect, service,
};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
fn add(idx: u32, bytes: u64) {
    if let Some(c) = UPLINK.get_ptr_mut(idx) {
        // Per-CPU slot: no other writer.
        let c: &mut UplinkCounter = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
    }
}

/// What the node-side address of a wire packet is.
#[inline(always)]
fn local_kind(family: u8, addr: &[u32; 4]) -> u32 {
    if classify::local_pod(family, addr) {
        return uplink::LOCAL_POD;
    }
    if classify::cached_kind(family, addr) == RemoteKind::Host as u32 {
        uplink::LOCAL_NODE
    } else {
        uplink::LOCAL_OTHER
    }
}

/// What the far side of a wire packet is.
#[inline(always)]
fn remote_kind(family: u8, addr: &[u32; 4]) -> u32 {
    let k = classify::cached_kind(family, addr);
    if k == RemoteKind::RemotePod as u32 || k == RemoteKind::LocalPod as u32 {
        uplink::REMOTE_POD
    } else if k == RemoteKind::RemoteNode as u32 || k == RemoteKind::Host as u32 {
        uplink::REMOTE_NODE
    } else {
        uplink::REMOTE_WORLD
    }
}

/// Counts a packet of an uplink tc hook; `ingress`: the node side is the destination.
/// Returns what the node side is (`uplink::LOCAL_*`; `LOCAL_OTHER` when not IP).
#[inline(always)]
fn count_tc<C: PacketCtx>(ctx: &C, point: u32, ingress: bool) -> u32 {
    let Some((family, src, dst)) = ip_addrs(ctx) else {
        return uplink::LOCAL_OTHER;
    };
    let (near, far) = if ingress { (&dst, &src) } else { (&src, &dst) };
    let l3 = if PacketCtx::len(ctx) >= 14 {
        PacketCtx::len(ctx) - 14
    } else {
        0
    };
    let local = local_kind(family, near);
    add(
        uplink::index(point, local, remote_kind(family, far)),
        l3 as u64,
    );
    local
}

/// `count_tc` in a frame of its own: its map keys and lookups must not sit on the stack of a
/// program that goes on to call the conntrack functions (Linux 6.1 refuses a call chain over
/// 512 bytes of stack in all).
#[inline(never)]
fn count_tc_skb(skb: *mut __sk_buff, point: u32, ingress: bool) -> u32 {
    if skb.is_null() {
        return uplink::LOCAL_OTHER;
    }
    count_tc(&TcContext::new(skb), point, ingress)
}

/// Ingress next to an XDP program that judges the local pods' openers (`uplink_xdp`).
#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    if count_tc_skb(skb, uplink::TC_IN, true) != uplink::LOCAL_POD {
        // In a frame of its own, as everything here: `deliver` calls the conntrack functions.
        note_opener_skb(skb);
        return TC_ACT_UNSPEC;
    }
    deliver(skb).unwrap_or(TC_ACT_UNSPEC)
}

/// Ingress where no XDP program judges (a veth, a NIC without driver-mode XDP): what
/// `uplink_xdp` decides, decided here. Generic XDP would run at this same point, before the
/// stack's netfilter and conntrack, after building an XDP buffer over every socket buffer and
/// copying those without its headroom: most of the uplink's cost on a veth (BENCHMARKS.md).
/// Each step is a function of its own, so that only the conntrack call's frames add up along
/// the call chain (Linux 6.1 refuses more than 512 bytes of stack in all).
#[classifier]
pub fn uplink_ingress_policy(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    let kind = count_in_skb(skb);
    if kind == NOT_POD {
        note_opener_skb(skb);
        return TC_ACT_UNSPEC;
    }
    if let Some(verdict) = deliver(skb) {
        return verdict;
    }
    if kind == POD {
        return TC_ACT_UNSPEC;
    }
    let reason = observer_parse_tc(skb);
    if reason != 0 {
        return unparsed_skb(skb, reason);
    }
    match Action::from_raw(observer_uplink_ingress_conn(skb)) {
        Action::Drop => tc_drop(&ctx),
        _ => TC_ACT_UNSPEC,
    }
}

/// A packet from a pod of another node for a pod of this node on a routed veth: the pod's
/// ingress verdict taken here, as `to_pod` would take it (the same lookups, counters and
/// events), and the packet delivered straight into the pod (`redirect`). `None`: the stack
/// delivers it to `to_pod`, untouched and uncounted here. Each step is a global function of
/// its own, as at the pod's veth.
#[inline(always)]
fn deliver(skb: *mut __sk_buff) -> Option<i32> {
    let settled = observer_uplink_settle(skb);
    if settled == NOT_DELIVERED {
        return None;
    }
    if settled < FULL_TO {
        return Some(settled as i32);
    }
    if observer_parse_tc(skb) != 0 {
        return None;
    }
    Some(observer_uplink_deliver_conn(
        skb,
        (settled - FULL_TO) as u64,
    ))
}

const NOT_DELIVERED: i64 = -100;
/// Left to the full path, then delivered to the veth `FULL_TO + ifindex`.
const FULL_TO: i64 = 1 << 32;

/// The plain IPv4 packet from a pod of another node, if delivery across nodes is on.
#[inline(always)]
fn from_remote_pod(ctx: &TcContext) -> Option<Plain> {
    if !redirect::remote_enabled() {
        return None;
    }
    let p = plain_ipv4(ctx)?;
    let kind = classify::cached_kind(AF_INET, &[p.src, 0, 0, 0]);
    (kind == RemoteKind::RemotePod as u32).then_some(p)
}

/// The routed pod veth `p` is delivered to past the stack, if there is one
/// (`redirect::uplink_target`).
#[inline(always)]
fn target(ctx: &TcContext, p: &Plain) -> Option<u32> {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    redirect::uplink_target(ctx, ifindex, p.src, p.dst)
}

/// `deliver`'s established path: a packet of a connection whose verdicts are taken is
/// counted and delivered (or dropped) here. The route is looked up only for a connection that
/// may skip the stack: a Service's (the pod is its client: this is a backend's reply, which
/// netfilter translates back) and any other not `DIRECT` are left to the stack at the cost of
/// the lookup of their connection alone.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn observer_uplink_settle(skb: *mut __sk_buff) -> i64 {
    if skb.is_null() {
        return NOT_DELIVERED;
    }
    let ctx = TcContext::new(skb);
    let Some(p) = from_remote_pod(&ctx) else {
        return NOT_DELIVERED;
    };
    // A SYN is not looked up by `established`; one for a tuple whose connection was opened
    // behind a translation is not delivered either.
    if opens(p.proto, p.tcp_flags) {
        if !direct_or_absent(&p) {
            return NOT_DELIVERED;
        }
        return target(&ctx, &p).map_or(NOT_DELIVERED, |out| FULL_TO + out as i64);
    }
    let bytes = (PacketCtx::len(&ctx) - 14) as u64;
    let mut out = 0;
    let takes = |direct| {
        direct
            && target(&ctx, &p).is_some_and(|o| {
                out = o;
                true
            })
    };
    match established(&p, bytes, true, takes) {
        Established::Settled(action, _, _) => {
            stat_inc(stat::PACKETS);
            if action == Action::Drop {
                return delivery_dropped(&ctx) as i64;
            }
            // No hop left: the stack drops it too, before `to_pod`.
            redirect::into_pod(&ctx, out).unwrap_or(TC_ACT_UNSPEC) as i64
        }
        Established::Full => FULL_TO + out as i64,
        // A packet without a connection that is not a SYN may be the reply of one the node
        // translated (a Service observer does not know yet): netfilter's to handle. A UDP
        // packet's connection may skip the stack after it if the stack leaves it untranslated.
        Established::Missing => {
            if p.proto == IPPROTO_UDP {
                redirect::note_arrival(&ctx, &p);
            }
            NOT_DELIVERED
        }
        Established::Special => NOT_DELIVERED,
    }
}

/// `deliver`'s full path: `to_pod`'s conntrack and verdicts for the packet
/// `observer_parse_tc` parsed, then the delivery to the veth `out`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn observer_uplink_deliver_conn(skb: *mut __sk_buff, out: u64) -> i32 {
    if skb.is_null() {
        return TC_ACT_SHOT;
    }
    stat_inc(stat::PACKETS);
    let ctx = TcContext::new(skb);
    if Action::from_raw(tc_conn(skb, COUNT, Hook::ToPod)) == Action::Drop {
        return delivery_dropped(&ctx);
    }
    redirect::into_pod(&ctx, out as u32).unwrap_or(TC_ACT_UNSPEC)
}

/// A packet `deliver` took over (counted in `PACKETS`) and policy drops: on the uplink's
/// counters as `tc_drop` would count it.
#[inline(always)]
fn delivery_dropped(ctx: &TcContext) -> i32 {
    add(
        uplink::index(uplink::TC_DROP, uplink::LOCAL_POD, uplink::REMOTE_ANY),
        PacketCtx::len(ctx).saturating_sub(14) as u64,
    );
    TC_ACT_SHOT
}

#[inline(never)]
fn note_opener_skb(skb: *mut __sk_buff) {
    if !skb.is_null() {
        note_opener(&TcContext::new(skb));
    }
}

const NOT_POD: u32 = 0;
const POD: u32 = 1;
const POD_OPENER: u32 = 2;

/// Counts an ingress packet; for a local pod, also whether it may open a connection (see
/// `observe_uplink_xdp`), from the fixed headers where they settle it.
#[inline(never)]
fn count_in_skb(skb: *mut __sk_buff) -> u32 {
    if skb.is_null() {
        return NOT_POD;
    }
    let ctx = TcContext::new(skb);
    if count_tc(&ctx, uplink::TC_IN, true) != uplink::LOCAL_POD {
        return NOT_POD;
    }
    match plain_ipv4(&ctx) {
        Some(p) if !opens(p.proto, p.tcp_flags) => POD,
        _ => POD_OPENER,
    }
}

/// A packet for a pod that could not be parsed: as `uplink_xdp` treats it.
#[inline(never)]
fn unparsed_skb(skb: *mut __sk_buff, reason: u32) -> i32 {
    if skb.is_null() {
        return TC_ACT_UNSPEC;
    }
    let ctx = TcContext::new(skb);
    if reason != stat::FRAGMENT && unparsed_denied(&ctx, reason, Hook::ToPod) {
        stat_inc(reason);
        return tc_drop(&ctx);
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn tc_drop(ctx: &TcContext) -> i32 {
    count_drop(
        uplink::TC_DROP,
        PacketCtx::len(ctx).saturating_sub(14) as u64,
    );
    TC_ACT_SHOT
}

/// A packet for a local pod dropped on the uplink (at `point`): it never reaches the veth,
/// where packets are counted.
#[inline(always)]
fn count_drop(point: u32, bytes: u64) {
    stat_inc(stat::PACKETS);
    add(
        uplink::index(point, uplink::LOCAL_POD, uplink::REMOTE_ANY),
        bytes,
    );
}

/// The ingress policy of a TCP opener for a local pod, as `uplink_xdp` judges it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn observer_uplink_ingress_conn(skb: *mut __sk_buff) -> i32 {
    if skb.is_null() {
        return Action::Drop as i32;
    }
    let Some(pkt) = parsed() else {
        return Action::Drop as i32;
    };
    if !opens(pkt.proto, pkt.tcp_flags) {
        return Action::Pass as i32;
    }
    let ctx = TcContext::new(skb);
    let bytes = (PacketCtx::len(&ctx) - pkt.l3_off as u32) as u64;
    judge_opener(&ctx, pkt, bytes, unsafe { (*skb).ifindex }) as i32
}

/// The ingress policy of a connection opener for a local pod, before the stack: the same
/// conntrack and policy maps as the pod's veth; only a packet it drops is counted here.
#[inline(always)]
fn judge_opener<C: EbpfContext>(ctx: &C, pkt: &Packet, bytes: u64, ifindex: u32) -> Action {
    process(
        ctx,
        pkt,
        bytes,
        ifindex,
        Hook::ToPod,
        Count::Dropped,
        false,
        || classify::to_pod(pkt.family, &pkt.src),
    )
}

/// Only a TCP SYN surely opens a connection (see `observe_uplink_xdp`).
#[inline(always)]
fn opens(proto: u8, tcp_flags: u8) -> bool {
    proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A packet for the node (not one of its pods) that may open a connection to a NodePort or
/// load-balancer frontend: its client is noted before kube-proxy masquerades it away.
/// Established TCP pays only the parse.
#[inline(always)]
fn note_opener(ctx: &TcContext) {
    if observer_parse_tc(ctx.skb.skb) != 0 {
        return;
    }
    let Some(pkt) = parsed() else {
        return;
    };
    if pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    if service::note_nodeport(pkt) {
        unsafe { (*ctx.skb.skb).mark |= NODEPORT_MARK };
    }
}

#[classifier]
pub fn uplink_egress(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    count_tc_skb(skb, uplink::TC_OUT, false);
    // A pod's packet to a Service frontend, now translated to a backend on another node: its
    // egress verdict is taken here, against that backend. Nothing else pays for a lookup.
    let mark = unsafe { (*skb).mark };
    if mark & SVC_MARK != 0 {
        unsafe { (*skb).mark = mark & !SVC_MARK };
        if observer_parse_tc(skb) == 0
            && Action::from_raw(observer_uplink_egress_conn(skb, 0)) == Action::Drop
        {
            return TC_ACT_SHOT;
        }
    }
    // After the verdict: a Service connection's `new` event is emitted by the call above.
    handoff::prove_wire(skb);
    TC_ACT_UNSPEC
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn observer_uplink_egress_conn(skb: *mut __sk_buff, count: u64) -> i32 {
    tc_conn(skb, count, Hook::Uplink)
}

#[xdp]
pub fn uplink_xdp(ctx: XdpContext) -> u32 {
    observe_uplink_xdp(&ctx)
}

/// A packet that cannot open a connection: XDP counts it and leaves it to the stack.
#[inline(always)]
fn pass_counted(ctx: &XdpContext, local: u32) -> u32 {
    let len = PacketCtx::len(ctx);
    add(
        uplink::index(uplink::XDP_IN, local, uplink::REMOTE_ANY),
        len.saturating_sub(14) as u64,
    );
    xdp_action::XDP_PASS
}

/// Kept to hash lookups only (endpoints, conntrack): the budget is tens of nanoseconds.
#[inline(always)]
fn observe_uplink_xdp(ctx: &XdpContext) -> u32 {
    // Most of an overlay node's ingress is for the node itself: settle it from the IP header.
    if let Some((family, _, dst)) = ip_addrs(ctx) {
        if !classify::local_pod(family, &dst) {
            return pass_counted(ctx, uplink::LOCAL_OTHER);
        }
        // For a pod, a packet that cannot open a connection (see below) from the fixed headers.
        if let Some(p) = plain_ipv4(ctx) {
            if !opens(p.proto, p.tcp_flags) {
                return pass_counted(ctx, uplink::LOCAL_POD);
            }
        }
    }
    let pkt = match parse(ctx) {
        Ok(p) => p,
        Err(reason) => {
            // Unparsable traffic for an isolated pod is dropped here too; the rest goes on to
            // the stack, which counts it at the pod's veth if it gets there. A fragment whose
            // first fragment is not here yet may be reordered on the wire: the stack
            // reassembles it before the pod's veth, where it is judged whole.
            if reason != stat::FRAGMENT && unparsed_denied(ctx, reason, Hook::ToPod) {
                stat_inc(reason);
                stat_inc(stat::PACKETS);
                return xdp_action::XDP_DROP;
            }
            return xdp_action::XDP_PASS;
        }
    };
    let bytes = (PacketCtx::len(ctx) - pkt.l3_off as u32) as u64;
    add(
        uplink::index(uplink::XDP_IN, uplink::LOCAL_POD, uplink::REMOTE_ANY),
        bytes,
    );
    // Only a TCP SYN is surely a connection opener. Anything else may be the reply of a
    // connection the kernel translated (a Service's backend answering before the kernel
    // reverses the DNAT, SNAT), which XDP cannot attribute: the pod's veth judges it, with
    // the same policy, once the kernel has reversed the translation.
    if !opens(pkt.proto, pkt.tcp_flags) {
        return xdp_action::XDP_PASS;
    }
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    match judge_opener(ctx, &pkt, bytes, ifindex) {
        Action::Pass | Action::PassMarked => xdp_action::XDP_PASS,
        Action::Drop => {
            count_drop(uplink::XDP_DROP, bytes);
            xdp_action::XDP_DROP
        }
    }
}

/// Baseline for the XDP benchmark.
#[xdp]
pub fn xdp_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
