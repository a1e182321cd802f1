//! Delivery past the node's stack, for connections between pods that nothing translates.
//!
//! - Local: a packet from one pod of the node to another goes from the source's veth straight
//!   into the destination pod's network namespace (`bpf_redirect_peer`). Both ends' verdicts
//!   are taken at the source's veth, so the destination's `to_pod`, which the packet no longer
//!   passes, owes it nothing.
//! - Across nodes: a packet from a pod of the node to a pod of another node goes from the
//!   pod's veth straight to the uplink's transmit (`to_uplink`), where `uplink_egress` still
//!   sees it; a packet from a pod of another node goes from the uplink's tc ingress straight
//!   into the pod (`uplink_target`, `into_pod`), after the pod's ingress verdict was taken
//!   there (`uplink::deliver`). Both directions or neither: only for a pod on a routed veth
//!   (`ATTACHED_ROUTED`), whose replies the uplink delivers the same way, so that the node's
//!   conntrack sees none of the connection's packets rather than half of them (kube-proxy's
//!   rules drop what its conntrack calls invalid).
//!
//! The route is the kernel's own: a FIB lookup as the node would forward the packet, taken only
//! when it leads to a pod veth or uplink observer watches, so a pod whose address moved to
//! another veth, a bridge (kubenet's cbr0) or anything else keeps the stack's path. The packet
//! loses a hop of its TTL, as forwarding would take; one with none left keeps the stack's path
//! (the stack answers it).
//!
//! Only packets of a connection that never needs netfilter: not a Service's (kube-proxy DNATs
//! it and translates its replies back), not one the node masquerades (only traffic between
//! pods, which the node never masquerades). The node's conntrack never sees such a connection,
//! from its first packet to its last, so none of its entries is left half-seen. One exception:
//! UDP from a pod of another node, whose first packet takes the stack, the only way to learn
//! that the node does not translate it (`note_arrival`); netfilter calls no UDP packet invalid
//! for the ones it no longer sees.
use aya_ebpf::{
    bindings::{
        __sk_buff, bpf_fib_lookup, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{
        bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh,
        bpf_redirect_peer,
    },
    programs::TcContext,
    EbpfContext,
};
use observer_common::{
    config_flags, stat, AF_INET, ATTACHED_ROUTED, IPPROTO_UDP, UNTRANSLATED_MARK,
};

use crate::{
    maps::{stat_inc, ARRIVED, ATTACHED, CONFIG, FIB, UPLINKS},
    parse::{Packet, Plain},
};

/// The kernel's AF_INET (observer's own family numbers are 4 and 6).
const KERNEL_AF_INET: u8 = 2;

/// What a tc program returns for a packet it redirected.
pub const TC_ACT_REDIRECT: i32 = 7;

/// IPv4 header offsets in an untagged frame: TTL (with the protocol after it), checksum.
const IP_TTL_OFF: usize = 22;
const IP_CSUM_OFF: usize = 24;

/// Whether `flag` is on and some pod veth is routed (`config_flags::ROUTED_PODS`).
#[inline(always)]
fn on(flag: u32) -> bool {
    let both = flag | config_flags::ROUTED_PODS;
    CONFIG.get(0).is_some_and(|c| c.flags & both == both)
}

/// Whether local delivery is on (`--no-local-redirect` turns it off).
#[inline(always)]
pub fn enabled() -> bool {
    on(config_flags::LOCAL_REDIRECT)
}

/// Whether delivery across nodes is on (`--no-remote-redirect` turns it off).
#[inline(always)]
pub fn remote_enabled() -> bool {
    on(config_flags::REMOTE_REDIRECT)
}

/// The node's FIB route for an IPv4 packet from `src` to `dst` (network byte order) that
/// entered on `ifindex`: an input lookup, as forwarding from `ifindex` would take (its
/// forwarding setting applies). No length is given: on success the kernel checks the packet
/// itself against the egress device's MTU, segmentation offload included. Returns the
/// lookup's result code and its answer (this CPU's scratch).
#[inline(always)]
fn route(
    ctx: &TcContext,
    ifindex: u32,
    src: u32,
    dst: u32,
) -> Option<(u32, &'static mut bpf_fib_lookup)> {
    let p = unsafe { &mut *FIB.get_ptr_mut(0)? };
    *p = unsafe { core::mem::zeroed::<bpf_fib_lookup>() };
    p.family = KERNEL_AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            p as *mut bpf_fib_lookup,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    Some((rc, p))
}

/// The pod veth the node routes `dst` to from `ifindex`, if observer watches it and it is not
/// `ifindex` itself. Without a neighbour entry the lookup still names the device; the MACs it
/// would give are not needed: the pod's stack takes the packet as its own.
#[inline(always)]
fn pod_veth(ctx: &TcContext, ifindex: u32, src: u32, dst: u32) -> Option<(u32, u32)> {
    let (rc, p) = route(ctx, ifindex, src, dst)?;
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    let out = p.ifindex;
    if out == ifindex {
        return None;
    }
    let kind = unsafe { ATTACHED.get(&out) }?;
    Some((out, *kind))
}

/// Takes the hop forwarding would: the TTL down by one, the header checksum mended. False
/// when the packet has no hop left (or its header cannot be read): the stack answers it.
#[inline(always)]
fn hop(ctx: &TcContext) -> bool {
    // TTL and protocol, as they lie in the packet.
    let Ok(raw) = ctx.load::<u16>(IP_TTL_OFF) else {
        return false;
    };
    let word = u16::from_be(raw);
    if word >> 8 <= 1 {
        return false;
    }
    let new = (word - 0x100).to_be();
    ctx.store(IP_TTL_OFF, &new, 0).is_ok()
        && ctx
            .l3_csum_replace(IP_CSUM_OFF, raw as u64, new as u64, 2)
            .is_ok()
}

/// Redirects an IPv4 packet for `dst` (network byte order) that entered the node on `ifindex`
/// into the pod behind the veth the node would forward it to, if that is a pod veth observer
/// watches. Returns `TC_ACT_REDIRECT`, or `None`: the stack delivers it.
#[inline(always)]
pub fn to_local_pod(ctx: &TcContext, ifindex: u32, src: u32, dst: u32) -> Option<i32> {
    if !enabled() {
        return None;
    }
    let (out, _) = pod_veth(ctx, ifindex, src, dst)?;
    if !hop(ctx) {
        return None;
    }
    into(out, stat::REDIRECTED)
}

/// The pod veth a packet that entered on the uplink `ifindex` goes to when delivered past the
/// stack: a routed pod veth observer watches (`None`: the stack delivers it). The caller has
/// checked `remote_enabled`.
#[inline(always)]
pub fn uplink_target(ctx: &TcContext, ifindex: u32, src: u32, dst: u32) -> Option<u32> {
    match pod_veth(ctx, ifindex, src, dst)? {
        (out, kind) if kind == ATTACHED_ROUTED => Some(out),
        _ => None,
    }
}

/// Delivers a packet from the uplink into the pod behind `out` (`uplink_target`).
#[inline(always)]
pub fn into_pod(ctx: &TcContext, out: u32) -> Option<i32> {
    if !hop(ctx) {
        return None;
    }
    into(out, stat::REDIRECTED_FROM_UPLINK)
}

#[inline(always)]
fn into(out: u32, counter: u32) -> Option<i32> {
    if unsafe { bpf_redirect_peer(out, 0) } as i32 != TC_ACT_REDIRECT {
        return None;
    }
    stat_inc(counter);
    Some(TC_ACT_REDIRECT)
}

/// Sends an IPv4 packet for `dst`, from the pod behind the veth `ifindex`, straight to the
/// uplink the node would forward it through, with the next hop's MACs. Only from a routed pod
/// veth (the uplink delivers the replies past the stack too), and only a packet that fits the
/// uplink's MTU (otherwise the stack fragments it or answers). When the node does not know the
/// next hop's MAC yet, the kernel's neighbour code resolves it for the packet
/// (`bpf_redirect_neigh`), as forwarding would: even a connection's first packet skips the
/// stack. Returns `TC_ACT_REDIRECT`, or `None`: the stack forwards it.
#[inline(always)]
pub fn to_uplink(ctx: &TcContext, ifindex: u32, src: u32, dst: u32) -> Option<i32> {
    if !remote_enabled() || unsafe { ATTACHED.get(&ifindex) } != Some(&ATTACHED_ROUTED) {
        return None;
    }
    let (rc, p) = route(ctx, ifindex, src, dst)?;
    let out = p.ifindex;
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
        || unsafe { UPLINKS.get(&out) }.is_none()
    {
        return None;
    }
    let redirected = if rc == BPF_FIB_LKUP_RET_SUCCESS {
        // The lookup checked the MTU; it gives the MACs.
        let (dmac, smac) = (p.dmac, p.smac);
        hop(ctx)
            && ctx.store(0, &dmac, 0).is_ok()
            && ctx.store(6, &smac, 0).is_ok()
            && unsafe { bpf_redirect(out, 0) } as i32 == TC_ACT_REDIRECT
    } else {
        // The lookup names the next hop (the gateway, or `dst` on the link) but checks no MTU
        // without a neighbour.
        let mut mtu = 0u32;
        if p.family != KERNEL_AF_INET
            || unsafe { bpf_check_mtu(ctx.as_ptr(), out, &mut mtu, 0, 0) } != 0
        {
            return None;
        }
        let mut nh = bpf_redir_neigh {
            nh_family: KERNEL_AF_INET as u32,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                ipv4_nh: unsafe { p.__bindgen_anon_4.ipv4_dst },
            },
        };
        hop(ctx)
            && unsafe {
                bpf_redirect_neigh(
                    out,
                    &mut nh,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            } as i32
                == TC_ACT_REDIRECT
    };
    if !redirected {
        return None;
    }
    stat_inc(stat::REDIRECTED_TO_UPLINK);
    Some(TC_ACT_REDIRECT)
}

/// A UDP packet from a pod of another node for a pod of this node, with no connection yet: the
/// stack delivers it, which may translate it (the reply of a connection the node DNAT'd, a DNAT
/// observer does not know). Its tuple as it arrived is noted on this CPU and the packet marked,
/// for the pod's veth to compare (`arrived_untranslated`).
#[inline(always)]
pub fn note_arrival(ctx: &TcContext, p: &Plain) {
    if let Some(slot) = ARRIVED.get_ptr_mut(0) {
        unsafe {
            *slot = [p.src, p.dst, ports(p.sport, p.dport)];
            (*ctx.skb.skb).mark |= UNTRANSLATED_MARK;
        }
    }
}

/// At a pod's veth: whether the packet is a UDP packet the uplink marked (`note_arrival`) and
/// reaches the veth as it arrived there, untranslated. Clears the mark and the note.
#[inline(always)]
pub fn arrived_untranslated(skb: *mut __sk_buff, pkt: &Packet) -> bool {
    let mark = unsafe { (*skb).mark };
    if mark & UNTRANSLATED_MARK == 0 {
        return false;
    }
    unsafe { (*skb).mark = mark & !UNTRANSLATED_MARK };
    let Some(slot) = ARRIVED.get_ptr_mut(0) else {
        return false;
    };
    let noted = unsafe { core::mem::replace(&mut *slot, [0; 3]) };
    pkt.family == AF_INET
        && pkt.proto == IPPROTO_UDP
        && noted == [pkt.src[0], pkt.dst[0], ports(pkt.sport, pkt.dport)]
}

#[inline(always)]
fn ports(sport: u16, dport: u16) -> u32 {
    (sport as u32) << 16 | dport as u32
}
