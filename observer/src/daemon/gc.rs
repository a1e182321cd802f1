//! The conntrack sweep: idle connections leave the kernel table with their last record, closed
//! ones once they lingered; NodePort notes nothing took expire.
use super::*;

/// NodePort clients the kernel noted: those a live connection took are marked taken (never
/// linked to another connection, a kubelet probe reusing the port), those no connection took
/// within [`NODEPORT_NOTE_TTL`] are removed.
pub(super) fn sweep_nodeport_notes(shared: &Shared, entries: &[(CtKey, CtEntry)], now_ns: u64) {
    let taken: std::collections::HashSet<observer_common::SvcKey> = entries
        .iter()
        .filter(|(_, e)| e.flags & ct_flags::NODEPORT != 0)
        .map(|(k, e)| {
            let ((_, sport), _) = flows::orient(k, e.flags);
            observer_common::SvcKey {
                addr: [0; 4],
                port: sport,
                proto: k.proto,
                family: k.family,
            }
        })
        .collect();
    let ttl = NODEPORT_NOTE_TTL.as_nanos() as u64;
    let mut dp = shared.dp.lock().unwrap();
    if let Err(e) = dp.sweep_nodeport(|k, l| {
        if taken.contains(k) {
            Some(l.flags | observer_common::nodeport_flags::TAKEN)
        } else if now_ns.saturating_sub(l.noted_ns) > ttl {
            None
        } else {
            Some(l.flags)
        }
    }) {
        warn!("sweeping NodePort notes: {e:#}");
    }
}

/// How long a NodePort client's note waits for its connection: the kernel takes it within
/// microseconds, on the way through this node.
pub(super) const NODEPORT_NOTE_TTL: Duration = Duration::from_secs(2);

pub(super) async fn gc_task(shared: Arc<Shared>) -> Result<()> {
    let mut last_prune = Instant::now();
    let mut first = true;
    loop {
        let prune = last_prune.elapsed() >= PRUNE_INTERVAL;
        if prune {
            last_prune = Instant::now();
        }
        let entries = gc_once(&shared, prune, first)?;
        first = false;
        // Soon when something is waiting for the sweep, at a slow pace otherwise.
        let swept = Instant::now();
        let mut next = swept + sweep_interval(&shared.opts, entries, false);
        loop {
            let now = Instant::now();
            if now >= next {
                break;
            }
            tokio::time::sleep((next - now).min(WATCH_INTERVAL)).await;
            if let Some(wait) = sweep_wanted(&shared) {
                next = next.min(
                    (Instant::now() + wait)
                        .max(swept + sweep_interval(&shared.opts, entries, true)),
                );
            }
        }
    }
}

/// How often the gc task looks at what may want the sweep sooner.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Whether the sweep should run sooner than its slow pace, and within how long: for closes
/// (lost events, closes the close queue left to it; see `CloseQueue::take_sweep_wanted`) and
/// for NodePort notes (which the sweep marks taken or expires).
fn sweep_wanted(shared: &Shared) -> Option<Duration> {
    let closes = shared
        .state
        .lock()
        .unwrap()
        .closing
        .take_sweep_wanted(shared.opts.close_grace);
    // The notes' map is read only when closes do not already want the sweep.
    closes.or_else(|| {
        let notes = shared.dp.lock().unwrap().has_nodeport_notes();
        notes.unwrap_or(true).then_some(Duration::ZERO)
    })
}

/// When nothing waits for it, a sweep every 10 s (at least twice per idle timeout): what it
/// finds then is idle connections. When something does, every second per 65,536
/// connections, at most every 5 s: reading the table costs about 0.3 µs per connection.
fn sweep_interval(opts: &Options, entries: usize, wanted: bool) -> Duration {
    let pace = if wanted {
        let per = entries.div_ceil(65_536).max(1) as u32;
        (Duration::from_secs(1) * per).min(Duration::from_secs(5))
    } else {
        SLOW_SWEEP
    };
    pace.min(opts.other_timeout / 2)
        .max(Duration::from_millis(100))
}

/// The sweep's pace when nothing waits for it.
const SLOW_SWEEP: Duration = Duration::from_secs(10);

/// How often the daemon's own connection state is pruned of connections the kernel no longer
/// has (evicted by its LRU table): a hash of every connection, too much to pay at every sweep
/// at hundreds of thousands of connections for a few stale entries.
const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// How long an open connection may stay idle before it expires.
fn idle_timeout(opts: &Options, k: &CtKey) -> Duration {
    if k.proto == IPPROTO_TCP {
        opts.tcp_timeout
    } else {
        opts.other_timeout
    }
}

/// How long a connection stays in the kernel's table after its last packet.
fn timeout(opts: &Options, k: &CtKey, e: &CtEntry) -> Duration {
    if e.flags & ct_flags::CLOSED != 0 {
        opts.close_grace.max(CLOSED_LINGER)
    } else {
        idle_timeout(opts, k)
    }
}

/// A closed connection whose close event is not in the ring: the acknowledgement of its last
/// FIN never came (the kernel sends the event with it), the event was lost to a full ring, or
/// a daemon before this one counted Service connections without events. The sweep publishes
/// its close once its grace has passed, with the entry's counters.
fn unsent_close(e: &CtEntry) -> bool {
    e.flags & (ct_flags::CLOSED | ct_flags::CLOSE_SENT | ct_flags::SVC_ALIAS) == ct_flags::CLOSED
}

/// One sweep; returns how many connections the kernel has. An open connection that is not
/// idle costs nothing but its read from the kernel. `first`: the daemon's first sweep, which
/// takes the unsent closes already past their grace as published by the daemon before it (a
/// restart), as the close queue's adoption does.
pub(super) fn gc_once(shared: &Shared, prune: bool, first: bool) -> Result<usize> {
    let now_ns = flows::mono_now_ns();
    let opts = &shared.opts;
    // Only what the sweep acts on is copied out of the kernel's table: connections past their
    // timeout, NodePort connections (their notes). The rest, nearly all of a busy table, is
    // counted and left.
    let (mut total, mut v6, mut entries) = (0usize, 0usize, Vec::new());
    // Pruning: the read's mark, and the keys it finds.
    let mut pruning = prune.then(|| {
        let read = shared.state.lock().unwrap().conns.begin_read();
        (read, foldhash::HashSet::<CtKey>::default())
    });
    shared.dp.lock().unwrap().visit_conntrack(|k, e| {
        total += 1;
        v6 += (k.family != observer_common::AF_INET) as usize;
        if let Some((_, live)) = pruning.as_mut() {
            live.insert(*k);
        }
        let idle = Duration::from_nanos(now_ns.saturating_sub(e.last_seen_ns));
        if e.flags & ct_flags::NODEPORT != 0
            || idle >= timeout(opts, k, e)
            || (unsent_close(e) && idle >= opts.close_grace)
        {
            entries.push((*k, *e));
        }
    })?;
    shared
        .conntrack_swept
        .store(total, std::sync::atomic::Ordering::Relaxed);
    shared
        .conntrack_swept_v6
        .store(v6, std::sync::atomic::Ordering::Relaxed);
    sweep_nodeport_notes(shared, &entries, now_ns);
    let mut publish = Vec::new();
    let mut late_closes = Vec::new();
    let mut expire = Vec::new();
    {
        let mut st = shared.state.lock().unwrap();
        for (k, e) in &entries {
            let idle = Duration::from_nanos(now_ns.saturating_sub(e.last_seen_ns));
            if e.flags & ct_flags::SVC_ALIAS != 0 {
                // A Service connection's pre-DNAT tuple: its records are the translated
                // connection's. Expired like any connection (closed with it: the kernel marks
                // it so), published never.
                if idle >= timeout(opts, k, e) {
                    expire.push(*k);
                }
                continue;
            }
            // (A NodePort entry is here whatever its age.)
            let late =
                (unsent_close(e) && idle >= opts.close_grace).then_some((*k, e.first_seen_ns));
            if let Some(l) = late.filter(|l| !st.late_closes.contains(l)) {
                if !first {
                    late_closes.push((*k, *e));
                }
                st.late_closes.insert(l);
            }
            if idle < timeout(opts, k, e) {
                continue;
            }
            // A closed connection's record went out at its close (see `closes`), or above; an
            // idle one gets its last record now.
            if e.flags & ct_flags::CLOSED == 0 {
                publish.push((*k, *e));
            }
            if let Some(l) = late {
                st.late_closes.remove(&l);
            }
            expire.push(*k);
        }
        if let Some((read, live)) = pruning {
            st.conns.prune(read, |k| live.contains(k));
            // Only the sweep adds these, from what its read found.
            st.late_closes.retain(|(k, _)| live.contains(k));
        }
        st.metrics.conntrack_expired_total += expire.len() as u64;
    }
    if !expire.is_empty() {
        // What is not removed is found again by the next sweep.
        if let Err(e) = shared.dp.lock().unwrap().remove_conntrack(&expire) {
            warn!("removing expired connections: {e:#}");
        }
    }
    for (k, e) in publish {
        emit(shared, EventKind::Close, &k, &e);
    }
    for (k, e) in late_closes {
        super::closes::publish_close(shared, &k, &e, CLOSE_BY_SWEEP);
    }
    // After the close records: they account the connections' last counters.
    if !expire.is_empty() {
        let mut st = shared.state.lock().unwrap();
        for k in &expire {
            st.conns.remove(k);
        }
    }
    Ok(total)
}
