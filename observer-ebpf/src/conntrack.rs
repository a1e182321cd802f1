//! Our own connection tracking: one LRU entry per connection under a canonical key, with
//! per-direction counters, TCP flags and timestamps.
use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use observer_common::{
    ct_flags, stat, CtEntry, CtKey, EventKind, TrafficClass, DIR_ORIG, DIR_REPLY, IPPROTO_TCP,
};

use crate::{
    events::emit,
    maps::{stat_inc, CONFIG, CT},
    parse::Packet,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const BPF_NOEXIST: u64 = 1;

/// Canonical key and whether the packet travels from endpoint `a` to `b`.
#[inline(always)]
pub fn key_of(pkt: &Packet) -> (CtKey, bool) {
    let src_first = {
        let mut lt = 0i8; // -1: src < dst, 1: src > dst
        let mut i = 0;
        while i < 4 {
            let s = u32::from_be(pkt.src[i]);
            let d = u32::from_be(pkt.dst[i]);
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
            pkt.sport <= pkt.dport
        } else {
            lt < 0
        }
    };
    let (addr_a, port_a, addr_b, port_b) = if src_first {
        (pkt.src, pkt.sport, pkt.dst, pkt.dport)
    } else {
        (pkt.dst, pkt.dport, pkt.src, pkt.sport)
    };
    (
        CtKey {
            addr_a,
            addr_b,
            port_a,
            port_b,
            proto: pkt.proto,
            family: pkt.family,
            _pad: [0; 2],
        },
        src_first,
    )
}

#[inline(always)]
fn add(p: *mut u64, v: u64) {
    // Both directions of a connection may be processed on two CPUs at once.
    // The BPF target has no `AtomicU64`; the intrinsic lowers to BPF_XADD.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        )
    };
}

#[inline(always)]
fn report_interval() -> u64 {
    match CONFIG.get(0) {
        Some(c) => c.report_interval_ns,
        None => 0,
    }
}

/// Accounts one packet of `bytes` to its connection, creating it with `class` when new.
#[inline(always)]
/// Returns false when a new connection could not be recorded (counted in the stats).
pub fn account(
    pkt: &Packet,
    bytes: u64,
    ifindex: u32,
    class_of_new: impl FnOnce() -> TrafficClass,
) -> bool {
    let (key, from_a) = key_of(pkt);
    // Coarse (jiffies) time is plenty for idle timeouts and reports, at a fraction of the cost.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let flags = pkt.tcp_flags;
    let is_tcp = pkt.proto == IPPROTO_TCP;

    if let Some(e) = CT.get_ptr_mut(&key) {
        let e = unsafe { &mut *e };
        // A fresh SYN on a closed connection is the tuple being reused: start over.
        let reopened = is_tcp
            && e.flags & ct_flags::CLOSED != 0
            && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if !reopened {
            update(&key, e, from_a, bytes, now, flags, is_tcp);
            return true;
        }
    }
    let class = class_of_new();
    create(&key, from_a, bytes, now, flags, is_tcp, ifindex, class, pkt.icmp_type, pkt.icmp_code)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn create(
    key: &CtKey,
    from_a: bool,
    bytes: u64,
    now: u64,
    flags: u8,
    is_tcp: bool,
    ifindex: u32,
    class: TrafficClass,
    icmp_type: u8,
    icmp_code: u8,
) -> bool {
    // A SYN-ACK as the first packet seen means its receiver opened the connection.
    let first_is_reply = is_tcp && flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK);
    let orig_is_a = from_a != first_is_reply;
    let dir = if first_is_reply { DIR_REPLY } else { DIR_ORIG };
    let mut e = CtEntry {
        first_seen_ns: now,
        last_seen_ns: now,
        last_report_ns: now,
        packets: [0; 2],
        bytes: [0; 2],
        ifindex,
        flags: if orig_is_a { ct_flags::ORIG_IS_A } else { 0 },
        tcp_flags: (flags as u32) << (dir * 8),
        class: class as u8,
        icmp_type,
        icmp_code,
        _pad: 0,
    };
    e.packets[dir] = 1;
    e.bytes[dir] = bytes;
    if is_tcp && flags & TCP_RST != 0 {
        e.flags |= ct_flags::RST;
    }
    match CT.insert(key, &e, BPF_NOEXIST) {
        Ok(()) => {
            emit(EventKind::New, key, &e);
            true
        }
        Err(_) => match CT.get_ptr_mut(key) {
            // Another CPU created it first: count the packet there.
            Some(existing) => {
                let existing = unsafe { &mut *existing };
                if existing.flags & ct_flags::CLOSED != 0 {
                    // Reopened tuple: replace the closed entry.
                    if CT.insert(key, &e, 0).is_ok() {
                        emit(EventKind::New, key, &e);
                        return true;
                    }
                    stat_inc(stat::CT_INSERT_FAILED);
                    false
                } else {
                    update(key, existing, from_a, bytes, now, flags, is_tcp);
                    true
                }
            }
            None => {
                stat_inc(stat::CT_INSERT_FAILED);
                false
            }
        },
    }
}

#[inline(always)]
fn update(key: &CtKey, e: &mut CtEntry, from_a: bool, bytes: u64, now: u64, flags: u8, is_tcp: bool) {
    let orig_is_a = e.flags & ct_flags::ORIG_IS_A != 0;
    let dir = if from_a == orig_is_a { DIR_ORIG } else { DIR_REPLY };
    add(&mut e.packets[dir] as *mut u64, 1);
    add(&mut e.bytes[dir] as *mut u64, bytes);
    e.last_seen_ns = now;
    if is_tcp {
        let seen = (flags as u32) << (dir * 8);
        if e.tcp_flags & seen != seen {
            e.tcp_flags |= seen;
        }
        let mut closing = 0;
        if flags & TCP_RST != 0 {
            closing |= ct_flags::RST;
        }
        if flags & TCP_FIN != 0 {
            closing |= if dir == DIR_ORIG { ct_flags::FIN_ORIG } else { ct_flags::FIN_REPLY };
        }
        if closing != 0 && e.flags & ct_flags::CLOSED == 0 {
            e.flags |= closing;
            let both_fin = ct_flags::FIN_ORIG | ct_flags::FIN_REPLY;
            if e.flags & ct_flags::RST != 0 || e.flags & both_fin == both_fin {
                e.flags |= ct_flags::CLOSED;
                emit(EventKind::Close, key, e);
                return;
            }
        }
    }
    let interval = report_interval();
    if interval != 0 && now - e.last_report_ns >= interval {
        e.last_report_ns = now;
        emit(EventKind::Report, key, e);
    }
}
