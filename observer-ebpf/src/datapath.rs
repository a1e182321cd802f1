//! The tc entry points. Observation never changes a packet's fate: every path returns
//! `TC_ACT_UNSPEC` (`TCX_NEXT`), so other programs on the hook still run.
use aya_ebpf::{macros::classifier, programs::TcContext};
use aya_log_ebpf::error;
use observer_common::stat;

use crate::{
    classify,
    conntrack::account,
    maps::{stat_inc, ATTACHED, BENCH_SEQ},
    parse::parse,
};

const TC_ACT_UNSPEC: i32 = -1;

/// Host side of a pod veth, ingress: packets the pod sends.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    observe_from_pod(&ctx)
}

#[inline(always)]
fn observe_from_pod(ctx: &TcContext) -> i32 {
    stat_inc(stat::PACKETS);
    match parse(ctx) {
        Ok(pkt) => {
            let bytes = (ctx.len() - pkt.l3_off) as u64;
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            if !account(&pkt, bytes, ifindex, || classify::from_pod(pkt.family, &pkt.dst)) {
                error!(ctx, "conntrack insert failed on ifindex {}", ifindex);
            }
        }
        Err(reason) => stat_inc(reason),
    }
    TC_ACT_UNSPEC
}

/// Host side of a pod veth, egress: packets delivered to the pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    // Forwarded from another observed pod: `from_pod` already counted it there.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if iif != 0 && unsafe { ATTACHED.get(&iif) }.is_some() {
        return TC_ACT_UNSPEC;
    }
    stat_inc(stat::PACKETS);
    match parse(&ctx) {
        Ok(pkt) => {
            let bytes = (ctx.len() - pkt.l3_off) as u64;
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            if !account(&pkt, bytes, ifindex, || classify::to_pod(pkt.family, &pkt.src)) {
                error!(&ctx, "conntrack insert failed on ifindex {}", ifindex);
            }
        }
        Err(reason) => stat_inc(reason),
    }
    TC_ACT_UNSPEC
}

/// Baseline for benchmarks: the cost of running any tc program at all.
#[classifier]
pub fn tc_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Benchmark support: rewrites the ports of an untagged IPv4 frame with a per-CPU counter, so a
/// repeated BPF_PROG_TEST_RUN presents a new connection on every run. Never attached.
#[inline(always)]
fn next_ports(ctx: &TcContext) -> bool {
    let Some(n) = BENCH_SEQ.get_ptr_mut(0) else {
        return false;
    };
    let seq = unsafe {
        *n += 1;
        *n
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

/// Benchmark baseline for `bench_new_conn`: the port rewrite alone.
#[classifier]
pub fn bench_rewrite(ctx: TcContext) -> i32 {
    next_ports(&ctx);
    TC_ACT_UNSPEC
}
