//! Connection-level events on the ring buffer. A failed reserve is counted, never silent.
use observer_common::{stat, CtEntry, CtKey, EventKind, FlowEvent};

use crate::maps::{stat_inc, EVENTS};

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
                _pad: [0; 2],
            };
            slot.write(ev);
            slot.submit(0);
        }
        None => stat_inc(stat::EVENTS_LOST),
    }
}
