//! Local delivery: a packet from one pod of the node to another, of a connection policy allows
//! and nothing translates, goes from the source's veth straight into the destination pod's
//! network namespace (`bpf_redirect_peer`), past the node's routing, netfilter and the
//! destination veth's transmit. The route is the kernel's own: a FIB lookup as the node would
//! forward the packet, taken only when it leads to a pod veth observer watches (`ATTACHED`),
//! so a pod whose address moved to another veth, a bridge (kubenet's cbr0) or anything else
//! keeps the stack's path. Both ends' verdicts are taken at the source's veth, so the
//! destination's `to_pod`, which the packet no longer passes, owes it nothing.
//!
//! Only packets of a connection that never needs netfilter: not a Service's (kube-proxy DNATs
//! it and translates its replies back), not one the node masqueraded. The node's conntrack
//! never sees such a connection, from its first packet to its last, so none of its entries is
//! left half-seen.
use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_peer},
    programs::TcContext,
    EbpfContext,
};
use observer_common::{config_flags, stat};

use crate::maps::{stat_inc, ATTACHED, CONFIG, FIB};

/// The kernel's AF_INET (observer's own family numbers are 4 and 6).
const KERNEL_AF_INET: u8 = 2;

/// What a tc program returns for a packet it redirected.
pub const TC_ACT_REDIRECT: i32 = 7;

/// Whether local delivery is on (`--no-local-redirect` turns it off).
#[inline(always)]
pub fn enabled() -> bool {
    CONFIG
        .get(0)
        .is_some_and(|c| c.flags & config_flags::LOCAL_REDIRECT != 0)
}

/// Redirects an IPv4 packet for `dst` (network byte order) that entered the node on `ifindex`
/// into the pod behind the veth the node would forward it to, if that is a pod veth observer
/// watches. Returns `TC_ACT_REDIRECT`, or `None`: the stack delivers it.
#[inline(always)]
pub fn to_local_pod(ctx: &TcContext, ifindex: u32, src: u32, dst: u32) -> Option<i32> {
    if !enabled() {
        return None;
    }
    let p = unsafe { &mut *FIB.get_ptr_mut(0)? };
    *p = unsafe { core::mem::zeroed::<bpf_fib_lookup>() };
    p.family = KERNEL_AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    // An input lookup, as if forwarding from `ifindex` (its forwarding setting applies); no
    // length: the egress device's MTU is checked against the packet itself.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            p as *mut bpf_fib_lookup,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    // Without a neighbour entry the lookup still names the device; the MACs it would give are
    // not needed: the peer's stack takes the packet as its own.
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    let out = p.ifindex;
    if out == ifindex || unsafe { ATTACHED.get(&out) }.is_none() {
        return None;
    }
    if unsafe { bpf_redirect_peer(out, 0) } as i32 != TC_ACT_REDIRECT {
        return None;
    }
    stat_inc(stat::REDIRECTED);
    Some(TC_ACT_REDIRECT)
}
