//! Connection-level events on the ring buffer. A failed reserve is counted, never silent.
use observer_common::{stat, CtEntry, CtKey, EventKind, FlowEvent};

use crate::maps::{stat_inc, EVENTS};

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// About 600 events.
const WAKEUP_BYTES: u64 = 64 * 1024;

#[inline(always)]
pub fn emit(kind: EventKind, key: &CtKey, e: &CtEntry) {
    match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut slot) => {
            let ev = FlowEvent {
                key: *key,
                first_seen_ns: e.first_seen_ns,
                last_seen_ns: e.last_seen_ns,
                packets: e.packets,
                bytes: e.bytes,
                ifindex: e.ifindex,
                flags: e.flags,
                tcp_flags: e.tcp_flags,
                kind: kind as u8,
                class: e.class,
                icmp_type: e.icmp_type,
                icmp_code: e.icmp_code,
                egress_rule: e.egress_rule,
                ingress_rule: e.ingress_rule,
                _pad: 0,
            };
            slot.write(ev);
            // Waking the reader costs an irq_work per event; the daemon also polls on a short
            // timer, so wake it only once a batch worth reading has built up.
            let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            slot.submit(flags);
        }
        None => stat_inc(stat::EVENTS_LOST),
    }
}
