//! The tc entry points. Observation never changes a packet's fate: every path returns
//! `TC_ACT_UNSPEC` (`TCX_NEXT`), so other programs on the hook still run.
use aya_ebpf::{macros::classifier, programs::TcContext};
use aya_log_ebpf::error;
use observer_common::stat;

use crate::{
    classify,
    conntrack::account,
    maps::{stat_inc, ATTACHED},
    parse::parse,
};

const TC_ACT_UNSPEC: i32 = -1;

/// Host side of a pod veth, ingress: packets the pod sends.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    stat_inc(stat::PACKETS);
    match parse(&ctx) {
        Ok(pkt) => {
            let bytes = (ctx.len() - pkt.l3_off) as u64;
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            if !account(&pkt, bytes, ifindex, || classify::from_pod(pkt.family, &pkt.dst)) {
                error!(&ctx, "conntrack insert failed on ifindex {}", ifindex);
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
