//! The tc entry points. Allowed traffic returns `TC_ACT_UNSPEC` (`TCX_NEXT`), so other programs
//! on the hook still decide; traffic denied by policy is dropped with `TC_ACT_SHOT`.
use aya_ebpf::{bindings::__sk_buff, macros::classifier, programs::TcContext};
use observer_common::{
    ct_flags, ep_flags, stat, EventKind, TrafficClass, AF_INET, AF_INET6, NODEPORT_MARK, SVC_MARK,
};

use crate::{
    classify,
    conntrack::{self, established, key_of, process, Action, Count, Established, Hook},
    events::emit,
    handoff,
    maps::{stat_inc, ATTACHED, BENCH_SEQ, CONFIG, NEW_ENTRY},
    parse::{ip_addrs, observer_parse_tc, parsed, plain_ipv4, Packet, PacketCtx},
    redirect,
};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;

#[inline(always)]
fn act(ctx: &TcContext, a: Action) -> i32 {
    match a {
        Action::Pass => TC_ACT_UNSPEC,
        Action::PassMarked => {
            // Only our bit: kube-proxy's masquerade and drop marks live in the same field.
            unsafe { (*ctx.skb.skb).mark |= SVC_MARK };
            TC_ACT_UNSPEC
        }
        Action::Drop => TC_ACT_SHOT,
    }
}

/// A packet that could not be parsed far enough to be judged (truncated L4, a fragment whose
/// first fragment was not seen, too many IPv6 extension headers) is dropped when the local pod
/// is isolated in that direction: it must never slip past a port rule.
#[inline(always)]
fn unparsed(ctx: &TcContext, reason: u32, hook: Hook) -> i32 {
    stat_inc(reason);
    if unparsed_denied(ctx, reason, hook) {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    }
}

/// Whether a packet that could not be parsed (`reason`) must be dropped: the local pod it is
/// for (`ToPod`) or from (`FromPod`) is isolated in that direction. Counted when it is.
#[inline(always)]
pub fn unparsed_denied<C: PacketCtx>(ctx: &C, reason: u32, hook: Hook) -> bool {
    if reason != stat::TRUNCATED && reason != stat::FRAGMENT && reason != stat::IPV6_EXT_LIMIT {
        return false;
    }
    let enforce = match CONFIG.get(0) {
        Some(c) => c.enforce,
        None => 0,
    };
    if enforce == 0 {
        return false;
    }
    let Some((family, src, dst)) = ip_addrs(ctx) else {
        return false;
    };
    if family != AF_INET && family != AF_INET6 {
        return false;
    }
    let (local, isolated) = match hook {
        Hook::FromPod | Hook::Uplink => (&src, ep_flags::EGRESS_ISOLATED),
        Hook::ToPod => (&dst, ep_flags::INGRESS_ISOLATED),
    };
    match classify::endpoint(family, local) {
        Some(ep) if ep.flags & isolated != 0 => {
            stat_inc(stat::UNPARSED_DENIED);
            true
        }
        _ => false,
    }
}

/// Host side of a pod veth, ingress: packets the pod sends.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    observe_from_pod(&ctx)
}

/// Established IPv4 TCP and UDP connections are settled first (`conntrack::established`);
/// `Err`: the full path decides, with `KNOWN_MISSING` set when the tuple has no connection.
/// `mode`: `COUNT`, `HAND_OVER` bits.
#[inline(always)]
fn settle_established(ctx: &TcContext, mode: u64) -> Result<i32, u64> {
    match observer_established_tc(ctx.skb.skb, mode) {
        NOT_SETTLED => Err(0),
        MISSING => Err(KNOWN_MISSING),
        redirect::TC_ACT_REDIRECT => Ok(redirect::TC_ACT_REDIRECT),
        a => Ok(act(ctx, Action::from_raw(a))),
    }
}

const NOT_SETTLED: i32 = -1;
/// Not settled, and no connection on the tuple.
const MISSING: i32 = -2;
/// The full path's conntrack functions: the established path's lookup of the tuple missed, so
/// `process` does not look again.
const KNOWN_MISSING: u64 = 4;
/// The hook adds the packet to the connection's counters.
pub const COUNT: u64 = 1;
/// `from_pod`: a packet it passes is handed over to `to_pod` (see `handoff`).
const HAND_OVER: u64 = 2;

/// A global function of its own, like the parser and conntrack: its stack frame is gone by the
/// time the full path's calls need theirs (the 512 bytes are shared along a call chain).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn observer_established_tc(skb: *mut __sk_buff, mode: u64) -> i32 {
    if skb.is_null() {
        return NOT_SETTLED;
    }
    // Every `from_pod` run voids what this CPU handed over before, unless it hands over anew.
    let mut slot = if mode & HAND_OVER != 0 {
        handoff::slot()
    } else {
        None
    };
    if let Some(s) = slot.as_deref_mut() {
        s.clear();
    }
    let ctx = TcContext::new(skb);
    let Some(p) = plain_ipv4(&ctx) else {
        return NOT_SETTLED;
    };
    let bytes = (PacketCtx::len(&ctx) - 14) as u64;
    match established(&p, bytes, mode & COUNT != 0, |_| true) {
        Established::Settled(a, class, direct) => {
            // (`established` settles no Service connection: the full path has those.)
            if let Some(s) = slot {
                if a == Action::Pass {
                    let ifindex = unsafe { (*skb).ifindex };
                    if class == TrafficClass::PodToPodLocal as u8 {
                        if direct {
                            if let Some(r) = redirect::to_local_pod(&ctx, ifindex, p.src, p.dst) {
                                return r;
                            }
                        }
                        s.hand_over(ifindex, &p);
                    } else if direct && class == TrafficClass::PodToPodRemote as u8 {
                        if let Some(r) = redirect::to_uplink(&ctx, ifindex, p.src, p.dst) {
                            return r;
                        }
                    }
                }
            }
            a as i32
        }
        Established::Missing => MISSING,
        Established::Full | Established::Special => NOT_SETTLED,
    }
}

#[inline(always)]
fn observe_from_pod(ctx: &TcContext) -> i32 {
    stat_inc(stat::PACKETS);
    let missing = match settle_established(ctx, COUNT | HAND_OVER) {
        Ok(verdict) => return verdict,
        Err(missing) => missing,
    };
    let reason = observer_parse_tc(ctx.skb.skb);
    if reason != 0 {
        return unparsed(ctx, reason, Hook::FromPod);
    }
    let action = Action::from_raw(observer_from_pod_conn(ctx.skb.skb, COUNT | missing));
    if action == Action::Pass
        && observer_from_pod_redirect(ctx.skb.skb) == redirect::TC_ACT_REDIRECT
    {
        return redirect::TC_ACT_REDIRECT;
    }
    act(ctx, action)
}

/// Conntrack and verdicts at `hook` for the packet `observer_parse_tc` parsed; `mode`: `COUNT`
/// (this hook adds it to the connection's counters), `KNOWN_MISSING`. Behind a global function
/// per hook (below), verified once, apart from the parser: inlined after it, every path
/// through the parser multiplied the paths through conntrack, past the 1M-instruction budget
/// of Linux 6.1.
#[inline(always)]
pub fn tc_conn(skb: *mut __sk_buff, mode: u64, hook: Hook) -> i32 {
    // Fail closed on what cannot happen (the verifier wants the checks).
    if skb.is_null() {
        return Action::Drop as i32;
    }
    let Some(pkt) = parsed() else {
        return Action::Drop as i32;
    };
    let ctx = TcContext::new(skb);
    let bytes = (PacketCtx::len(&ctx) - pkt.l3_off as u32) as u64;
    let ifindex = unsafe { (*skb).ifindex };
    if hook == Hook::ToPod {
        pkt.outside = (unsafe { (*skb).mark } & NODEPORT_MARK != 0) as u8;
        pkt.untranslated = redirect::arrived_untranslated(skb, pkt) as u8;
    }
    let missing = mode & KNOWN_MISSING != 0;
    let count = if mode & COUNT != 0 {
        Count::All
    } else {
        Count::None
    };
    let pkt = &*pkt;
    let action = process(
        &ctx,
        pkt,
        bytes,
        ifindex,
        hook,
        count,
        missing,
        || match hook {
            Hook::ToPod => classify::to_pod(pkt.family, &pkt.src),
            Hook::FromPod | Hook::Uplink => classify::from_pod(pkt.family, &pkt.dst),
        },
    );
    // Wherever it goes: only a local pod's `to_pod` can take it over. A packet to a Service's
    // frontend is not taken over (the DNAT changes its tuple), but its wire side may be wanted.
    let passed = matches!(action, Action::Pass | Action::PassMarked);
    if hook == Hook::FromPod && passed && pkt.family == AF_INET {
        if let Some(s) = handoff::slot() {
            s.hand_over_parsed(&ctx, ifindex, pkt, action == Action::Pass);
        }
    }
    action as i32
}

/// After the full path at `from_pod` passed the packet it parsed: delivers it past the node's
/// stack if its connection is one between two pods that nothing translates (`redirect`):
/// straight into a pod of the node, or to the uplink toward a pod of another node. Its own
/// global function: the full path's call chain has no stack left for it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn observer_from_pod_redirect(skb: *mut __sk_buff) -> i32 {
    if skb.is_null() {
        return 0;
    }
    let Some(pkt) = parsed() else {
        return 0;
    };
    // Off (`--no-local-redirect`, `--no-remote-redirect`): no second lookup of the connection.
    let (local, remote) = (redirect::enabled(), redirect::remote_enabled());
    if pkt.family != AF_INET || !(local || remote) {
        return 0;
    }
    let class = direct_class(pkt);
    let ctx = TcContext::new(skb);
    let ifindex = unsafe { (*skb).ifindex };
    if local && class == TrafficClass::PodToPodLocal as u8 {
        if let Some(r) = redirect::to_local_pod(&ctx, ifindex, pkt.src[0], pkt.dst[0]) {
            // Nothing translates it on the way: the wire side is the pod's own.
            handoff::prove_wire(skb);
            return r;
        }
    } else if remote && class == TrafficClass::PodToPodRemote as u8 {
        // Only what the uplink delivers past the stack the other way (`plain_ipv4`): the
        // node's conntrack sees both directions of a connection or neither. The wire side is
        // proven where it leaves, at `uplink_egress`, as on the stack's path.
        if plain_ipv4(&ctx).is_some() {
            if let Some(r) = redirect::to_uplink(&ctx, ifindex, pkt.src[0], pkt.dst[0]) {
                return r;
            }
        }
    }
    0
}

/// The class of the packet's connection if it is one that may skip the node's stack
/// (`ct_flags::DIRECT`: opened where nothing was translated yet) and nothing translates: not a
/// Service's (kube-proxy's DNAT, and its replies translated back). `TrafficClass::Unknown`
/// otherwise.
#[inline(always)]
fn direct_class(pkt: &Packet) -> u8 {
    let (key, _) = key_of(pkt);
    let Some(e) = conntrack::lookup(&key) else {
        return TrafficClass::Unknown as u8;
    };
    let e = unsafe { &*e };
    let special = ct_flags::SVC_ALIAS | ct_flags::SERVICE | ct_flags::NODEPORT;
    if e.flags & (special | ct_flags::DIRECT) != ct_flags::DIRECT {
        return TrafficClass::Unknown as u8;
    }
    e.class
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn observer_from_pod_conn(skb: *mut __sk_buff, mode: u64) -> i32 {
    tc_conn(skb, mode, Hook::FromPod)
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn observer_to_pod_conn(skb: *mut __sk_buff, mode: u64) -> i32 {
    tc_conn(skb, mode, Hook::ToPod)
}

/// Host side of a pod veth, egress: packets delivered to the pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    observe_to_pod(&ctx)
}

#[inline(always)]
fn observe_to_pod(ctx: &TcContext) -> i32 {
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if iif != 0 && handoff::taken_over(ctx, iif) {
        // Unchanged: the wire side of a local pod's connection to another.
        handoff::prove_wire(ctx.skb.skb);
        stat_inc(stat::HANDED_OVER);
        return TC_ACT_UNSPEC;
    }
    // Forwarded from another observed pod: `from_pod` already counted it there, but the
    // destination's ingress policy is judged here.
    let count = !(iif != 0 && unsafe { ATTACHED.get(&iif) }.is_some());
    if count {
        stat_inc(stat::PACKETS);
    }
    let missing = match settle_established(ctx, count as u64 * COUNT) {
        Ok(verdict) => return verdict,
        Err(missing) => missing,
    };
    let reason = observer_parse_tc(ctx.skb.skb);
    if reason != 0 {
        return unparsed(ctx, reason, Hook::ToPod);
    }
    let verdict = act(
        ctx,
        Action::from_raw(observer_to_pod_conn(ctx.skb.skb, count as u64 | missing)),
    );
    // After the verdict: a Service connection's `new` event is emitted by the call above.
    if verdict != TC_ACT_SHOT {
        handoff::prove_wire(ctx.skb.skb);
    }
    verdict
}

/// Baseline for benchmarks: the cost of running any tc program at all.
#[classifier]
pub fn tc_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Benchmark support: rewrites the ports of an untagged IPv4 frame with a per-CPU counter, so a
/// repeated BPF_PROG_TEST_RUN presents a new connection on every run. Never attached.
#[inline(always)]
fn next_seq() -> Option<u32> {
    let n = BENCH_SEQ.get_ptr_mut(0)?;
    // Per-CPU slot: no other writer.
    unsafe {
        *n += 1;
        Some(*n)
    }
}

#[inline(always)]
fn next_ports(ctx: &TcContext) -> bool {
    let Some(seq) = next_seq() else {
        return false;
    };
    let p = ctx.data() + 34;
    if p + 4 > ctx.data_end() {
        return false;
    }
    unsafe { core::ptr::write_unaligned(p as *mut u32, seq) };
    true
}

/// Benchmark: the new-connection path of `from_pod`, one new connection per run.
#[classifier]
pub fn bench_new_conn(ctx: TcContext) -> i32 {
    if !next_ports(&ctx) {
        return TC_ACT_UNSPEC;
    }
    observe_from_pod(&ctx)
}

/// Benchmark support: the next of `BENCH_SOURCE_PORTS` source ports from 1024 per run, keeping
/// the destination port, so policy rules on that port keep matching.
#[inline(always)]
fn next_sport(ctx: &TcContext) -> bool {
    let Some(seq) = next_seq() else {
        return false;
    };
    let port = (1024 + seq % observer_common::programs::BENCH_SOURCE_PORTS) as u16;
    let p = ctx.data() + 34;
    if p + 2 > ctx.data_end() {
        return false;
    }
    unsafe { core::ptr::write_unaligned(p as *mut u16, port.to_be()) };
    true
}

/// Benchmark: `from_pod` (egress policy) on a new connection per run, destination port kept.
#[classifier]
pub fn bench_new_conn_out(ctx: TcContext) -> i32 {
    if !next_sport(&ctx) {
        return TC_ACT_UNSPEC;
    }
    observe_from_pod(&ctx)
}

/// Benchmark: `to_pod` (ingress policy) on a new connection per run, destination port kept.
#[classifier]
pub fn bench_new_conn_in(ctx: TcContext) -> i32 {
    if !next_sport(&ctx) {
        return TC_ACT_UNSPEC;
    }
    observe_to_pod(&ctx)
}

/// Benchmark: the event pipeline apart from the datapath's work. Each run emits the `new` event
/// of a fresh tuple carrying the entry `from_pod` built for the last connection it opened on
/// this CPU (run `bench_new_conn` on the CPU first), so the ring and the daemon can be driven
/// faster than a new connection's conntrack work lets one CPU. Never attached.
#[classifier]
pub fn bench_new_event(ctx: TcContext) -> i32 {
    if !next_ports(&ctx) || observer_parse_tc(ctx.skb.skb) != 0 {
        return TC_ACT_UNSPEC;
    }
    let (Some(pkt), Some(e)) = (parsed(), NEW_ENTRY.get_ptr_mut(0)) else {
        return TC_ACT_UNSPEC;
    };
    let (key, _) = key_of(pkt);
    // Per-CPU slot: no other writer.
    let e = unsafe { &mut *e };
    e.first_seen_ns = crate::clock::now_ns();
    e.last_seen_ns = e.first_seen_ns;
    emit(EventKind::New, &key, e);
    TC_ACT_UNSPEC
}

/// Benchmark baseline for `bench_new_conn`: the port rewrite alone.
#[classifier]
pub fn bench_rewrite(ctx: TcContext) -> i32 {
    next_ports(&ctx);
    TC_ACT_UNSPEC
}
