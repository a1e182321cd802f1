//! The time connections are stamped with: CLOCK_MONOTONIC at tick resolution, as
//! `bpf_ktime_get_coarse_ns` gives it, read through a per-CPU cache keyed by the jiffies
//! counter. Coarse time only moves when a tick moves jiffies, so within a tick the cached value
//! is what the helper would return; `bpf_jiffies64` is inlined by the verifier, the helper is a
//! call of about 10 ns on every packet.
use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::CLOCK;

#[inline(always)]
pub fn now_ns() -> u64 {
    let j = unsafe { bpf_jiffies64() };
    let Some(c) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // Per-CPU slot: no other writer.
    let c = unsafe { &mut *c };
    // The slot starts at 0, which jiffies never is (they start at 2^32 - 300 s of ticks).
    if c[0] == j {
        return c[1];
    }
    // A tick moves jiffies an instant before it moves the coarse time: read in that instant,
    // the slot keeps the last tick's time for this one, never a time that goes back.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    c[0] = j;
    c[1] = now;
    now
}
