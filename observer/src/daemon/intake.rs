//! Kernel event intake: the ring buffer of connection events, drained in batches and turned
//! into records (the first stage of the flow pipeline).
use super::*;

/// The kernel wakes the reader only once a batch has built up (see `observer-ebpf/src/events.rs`);
/// a short timer bounds the delay of the events in between.
pub(super) const EVENT_POLL: Duration = Duration::from_millis(100);

/// Events read from the ring before they are handled: a backlog of a whole ring (130,000
/// events) is handled a slice at a time in one reused buffer, not gathered into a fresh 16 MB
/// one whose pages fault in on every drain.
const EVENT_BATCH: usize = 4096;

/// Events handled between yields of the CPU: a batch of a 64 KiB wake-up is about 600 events,
/// over a millisecond of work, and the scheduler lets a thread run that long before a pod's
/// thread that woke on its CPU gets it (EEVDF's run to parity); a yield every ~25-40 µs lets
/// it in. With nothing else to run, a yield returns at once. Every 64 events, a pod's p99
/// latency paid about 4 points more; every 8, the daemon a tenth more CPU (BENCHMARKS.md).
const YIELD_EVERY: usize = 16;

pub(super) async fn events_task(shared: Arc<Shared>, ring: RingBuf<MapData>) -> Result<()> {
    let mut fd = crate::netlink::readable(ring)?;
    let mut tick = tokio::time::interval(EVENT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(EVENT_BATCH);
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                // Cleared before the read: the kernel wakes the reader once per CPU until it
                // reads something, and a wake-up during the read must not be lost.
                guard.clear_ready();
                drain(&shared, guard.get_inner_mut(), &mut batch);
            }
            _ = tick.tick() => drain(&shared, fd.get_mut(), &mut batch),
        }
    }
}

/// Reads and handles what the ring holds, [`EVENT_BATCH`] events at a time.
fn drain(shared: &Shared, ring: &mut RingBuf<MapData>, batch: &mut Vec<FlowEvent>) {
    let began = Instant::now();
    loop {
        while batch.len() < EVENT_BATCH {
            let Some(item) = ring.next() else { break };
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        let more = batch.len() == EVENT_BATCH;
        for (i, ev) in batch.drain(..).enumerate() {
            handle_event(shared, ev);
            if i % YIELD_EVERY == YIELD_EVERY - 1 {
                std::thread::yield_now();
            }
        }
        if !more {
            shared.state.lock().unwrap().ring_read_through = began;
            return;
        }
    }
}

pub(super) fn entry_of(ev: &FlowEvent) -> CtEntry {
    CtEntry {
        first_seen_ns: ev.first_seen_ns,
        last_seen_ns: ev.last_seen_ns,
        last_report_ns: ev.last_seen_ns,
        packets: ev.packets,
        bytes: ev.bytes,
        ifindex: ev.ifindex,
        flags: ev.flags,
        tcp_flags: ev.tcp_flags,
        class: ev.class,
        icmp_type: ev.icmp_type,
        icmp_code: ev.icmp_code,
        after_close: 0,
        egress_rule: ev.egress_rule,
        ingress_rule: ev.ingress_rule,
        policy_gen: 0,
        fin_ack: 0,
    }
}

pub(super) fn handle_event(shared: &Shared, ev: FlowEvent) {
    let Some(kind) = EventKind::from_u8(ev.kind) else {
        debug!(kind = ev.kind, "unknown event kind");
        return;
    };
    let e = entry_of(&ev);
    match kind {
        EventKind::New => {
            // A reused tuple starts over. A new one gets no state here: most connections
            // never need any (see `count_pod_traffic`), and a map entry per connection made
            // the map's growth most of the daemon's work at hundreds of thousands per second.
            let earlier = {
                let mut st = shared.state.lock().unwrap();
                let earlier = reopened(&mut st, &ev.key, ev.first_seen_ns);
                if earlier.is_none() {
                    st.conns.restart(&ev.key);
                }
                earlier
            };
            // A held close of the tuple's last connection goes out first, with that
            // connection's state, which its publishing then removes.
            if let Some(close) = earlier {
                publish_close(shared, &ev.key, &close, CLOSE_HELD);
            }
            emit(shared, kind, &ev.key, &e);
        }
        // Not a new connection's entry: a denied SYN leaves a closed connection on the tuple
        // in place, and a policy change denying a live one keeps its state.
        EventKind::Drop => {
            dropped_on(&mut shared.state.lock().unwrap(), &ev.key, ev.first_seen_ns);
            emit(shared, kind, &ev.key, &e)
        }
        EventKind::Report => emit(shared, kind, &ev.key, &e),
        EventKind::Close => close_seen(shared, ev.key, e),
        EventKind::AfterClose => after_close_seen(shared, &ev.key, &e),
        EventKind::Wire => wire_seen(shared, &ev),
    }
}

/// Publishes a record now, or parks it until the kernel's conntrack entry of its connection
/// translation is known (see `snat_join`).
pub(super) fn emit(shared: &Shared, kind: EventKind, key: &CtKey, e: &CtEntry) {
    if let Some(rec) = shared.make_record_snat(kind, key, e) {
        shared.publish(rec);
    }
}
