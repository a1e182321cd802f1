//! Connection-level events on the ring buffer. A failed reserve is counted, never silent.
use observer_common::{stat, CtEntry, CtKey, EventKind, FlowEvent, AF_INET};

use crate::maps::{stat_inc, DROP_BUDGET, EVENTS, WOKE_AT};

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_CONS_POS: u64 = 2;
/// About 600 events.
const WAKEUP_BYTES: u64 = 64 * 1024;

#[inline(always)]
pub fn emit(kind: EventKind, key: &CtKey, e: &CtEntry) -> bool {
    match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut slot) => {
            // Field by field into the ring: a `FlowEvent` built first would be one more copy,
            // and ~120 bytes of a stack frame that has 512 in all.
            let ev = slot.as_mut_ptr();
            unsafe {
                (*ev).key = *key;
                (*ev).first_seen_ns = e.first_seen_ns;
                (*ev).last_seen_ns = e.last_seen_ns;
                (*ev).packets = e.packets;
                (*ev).bytes = e.bytes;
                (*ev).ifindex = e.ifindex;
                (*ev).flags = e.flags;
                (*ev).tcp_flags = e.tcp_flags;
                (*ev).kind = kind as u8;
                (*ev).class = e.class;
                (*ev).icmp_type = e.icmp_type;
                (*ev).icmp_code = e.icmp_code;
                (*ev).egress_rule = e.egress_rule;
                (*ev).ingress_rule = e.ingress_rule;
                (*ev)._pad = 0;
            }
            slot.submit(wakeup());
            true
        }
        None => {
            stat_inc(stat::EVENTS_LOST);
            false
        }
    }
}

/// Reports a new connection's opening packet as it left the stack (`handoff`): `sent`
/// (protocol, source, port, destination, port) as the pod sent it, `wire` (source, port,
/// destination, port) as it left on `ifindex`. IPv4, addresses in network order.
#[inline(always)]
pub fn emit_wire(sent: (u8, u32, u16, u32, u16), wire: (u32, u16, u32, u16), ifindex: u32) {
    let Some(mut slot) = EVENTS.reserve::<FlowEvent>(0) else {
        stat_inc(stat::EVENTS_LOST);
        return;
    };
    let now = crate::clock::now_ns();
    let ev = slot.as_mut_ptr();
    unsafe {
        (*ev).key = CtKey {
            addr_a: [sent.1, 0, 0, 0],
            addr_b: [sent.3, 0, 0, 0],
            port_a: sent.2,
            port_b: sent.4,
            proto: sent.0,
            family: AF_INET,
            _pad: [0; 2],
        };
        (*ev).first_seen_ns = now;
        (*ev).last_seen_ns = now;
        (*ev).packets = [wire.0 as u64, wire.2 as u64];
        (*ev).bytes = [wire.1 as u64, wire.3 as u64];
        (*ev).ifindex = ifindex;
        (*ev).flags = 0;
        (*ev).tcp_flags = 0;
        (*ev).kind = EventKind::Wire as u8;
        (*ev).class = 0;
        (*ev).icmp_type = 0;
        (*ev).icmp_code = 0;
        (*ev).egress_rule = 0;
        (*ev).ingress_rule = 0;
        (*ev)._pad = 0;
    }
    slot.submit(wakeup());
}

/// Waking the reader costs an irq_work (a self-interrupt, an exit of a virtual machine) and a
/// wake-up; the daemon also polls on a short timer, so it is woken only once a batch worth
/// reading has built up, and then once per CPU until it has read something: a reader that is
/// slow to get a CPU is already woken, and every event after the threshold woke it again.
#[inline(always)]
fn wakeup() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) < WAKEUP_BYTES {
        return BPF_RB_NO_WAKEUP;
    }
    // Stored plus one: the zeroed slot means "never woke", not "woke at position 0".
    let cons = EVENTS.query(BPF_RB_CONS_POS) + 1;
    match WOKE_AT.get_ptr_mut(0) {
        // Per-CPU slot: no other writer.
        Some(w) if unsafe { *w } == cons => BPF_RB_NO_WAKEUP,
        Some(w) => {
            unsafe { *w = cons };
            BPF_RB_FORCE_WAKEUP
        }
        None => BPF_RB_FORCE_WAKEUP,
    }
}

/// A drop record for a packet dropped without a conntrack entry, at most `per_s` per CPU and
/// second (0: no limit): a flood must not cost the daemon a record per packet. What is not
/// emitted is counted.
#[inline(always)]
pub fn emit_drop_sampled(key: &CtKey, e: &CtEntry, per_s: u32, now: u64) {
    if per_s != 0 {
        let Some(b) = DROP_BUDGET.get_ptr_mut(0) else {
            return;
        };
        // Per-CPU slot: no other writer.
        let b = unsafe { &mut *b };
        if now.wrapping_sub(b[0]) >= 1_000_000_000 {
            b[0] = now;
            b[1] = 0;
        }
        if b[1] >= per_s as u64 {
            stat_inc(stat::DROP_EVENTS_SUPPRESSED);
            return;
        }
        b[1] += 1;
    }
    emit(EventKind::Drop, key, e);
}
