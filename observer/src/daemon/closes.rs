//! Closed connections: a TCP close's record goes out `--close-grace` after the kernel's close
//! event, with the entry's counters then (the last ACK of a FIN exchange comes after the
//! close). The entry itself stays in the kernel's table for the sweep to remove
//! ([`CLOSED_LINGER`]), so late packets of the connection still find it.
use super::*;

/// How long a closed connection's entry stays in the kernel's table after its last packet:
/// retransmitted FINs and the final ACKs still belong to it, not to a new connection that
/// policy would judge again. Cilium keeps closing entries as long.
pub(super) const CLOSED_LINGER: Duration = Duration::from_secs(10);

/// Closes waiting for their grace at most; past that a close is published at once with the
/// event's counters (its final ACK may be missing from them, the record is not).
const CLOSING_MAX: usize = 262_144;

/// A close the kernel reported, waiting for its grace.
pub(super) struct Closing {
    key: CtKey,
    /// The entry as the close event carried it.
    entry: CtEntry,
    at: Instant,
}

/// Queues a close event; in arrival order, so the queue is ordered by deadline.
pub(super) fn close_seen(shared: &Shared, key: CtKey, entry: CtEntry) {
    let mut st = shared.state.lock().unwrap();
    // Adopted from the table at start, and now its event from the ring's backlog: once is
    // enough.
    if !st.adopted.is_empty() && st.adopted.remove(&key) {
        return;
    }
    if st.closing.len() < CLOSING_MAX {
        st.closing.push_back(Closing {
            key,
            entry,
            at: Instant::now(),
        });
        return;
    }
    drop(st);
    publish_close(shared, &key, &entry);
}

/// Publishes closes as their grace ends. A queue rather than the sweep: the sweep read each
/// closed entry at every pass of its linger, about twenty times, and kept daemon state for it.
pub(super) async fn closes_task(shared: Arc<Shared>) -> Result<()> {
    let grace = shared.opts.close_grace;
    if let Err(e) = adopt_closing(&shared) {
        warn!("adopting closes an earlier daemon held: {e:#}");
    }
    loop {
        let (due, next) = {
            let mut st = shared.state.lock().unwrap();
            let n = st
                .closing
                .iter()
                .take_while(|c| c.at.elapsed() >= grace)
                .count();
            let due: Vec<Closing> = st.closing.drain(..n).collect();
            if !st.adopted.is_empty() {
                for c in &due {
                    st.adopted.remove(&c.key);
                }
            }
            let next = st
                .closing
                .front()
                .map(|c| grace.saturating_sub(c.at.elapsed()));
            (due, next)
        };
        if !due.is_empty() {
            publish_due(&shared, due);
        }
        // At most ten passes a second: closes gather into batches under load.
        let wait = next.unwrap_or(grace).max(Duration::from_millis(100));
        tokio::time::sleep(wait).await;
    }
}

/// At start, the closes a daemon before this one (a restart) had queued and not published:
/// those still inside their grace. The kernel's table has them, the earlier daemon's queue is
/// gone. Closes older than that are not adopted: the earlier daemon may have published them.
fn adopt_closing(shared: &Shared) -> Result<()> {
    let now_ns = flows::mono_now_ns();
    let grace = shared.opts.close_grace;
    let mut found = Vec::new();
    shared.dp.lock().unwrap().visit_conntrack(|k, e| {
        let idle = Duration::from_nanos(now_ns.saturating_sub(e.last_seen_ns));
        // Closes whose event never reached the ring are the sweep's (`gc::unsent_close`).
        let sent = ct_flags::CLOSED | ct_flags::CLOSE_SENT;
        let closed = e.flags & (sent | ct_flags::SVC_ALIAS) == sent;
        if closed && idle < grace {
            found.push((*k, *e, idle));
        }
    })?;
    // Oldest first, as the queue is kept.
    found.sort_by_key(|f| std::cmp::Reverse(f.2));
    let now = Instant::now();
    let mut st = shared.state.lock().unwrap();
    // The ring keeps events while no daemon reads it: a close already queued from its backlog
    // is not adopted, and one whose event comes later is not queued twice (`close_seen`).
    let queued: foldhash::HashSet<CtKey> = st.closing.iter().map(|c| c.key).collect();
    for (key, entry, idle) in found {
        if queued.contains(&key) {
            continue;
        }
        let at = now.checked_sub(idle).unwrap_or(now);
        st.closing.push_back(Closing { key, entry, at });
        st.adopted.insert(key);
    }
    Ok(())
}

fn publish_due(shared: &Shared, due: Vec<Closing>) {
    let now: Vec<Option<CtEntry>> = {
        let dp = shared.dp.lock().unwrap();
        match dp.conntrack() {
            Ok(ct) => due.iter().map(|c| ct.get(&c.key, 0).ok()).collect(),
            Err(e) => {
                warn!("reading closed connections: {e:#}");
                vec![None; due.len()]
            }
        }
    };
    for (c, now) in due.iter().zip(now) {
        match now {
            // The same connection, with its counters after the grace.
            Some(e)
                if e.flags & ct_flags::CLOSED != 0 && e.first_seen_ns == c.entry.first_seen_ns =>
            {
                publish_close(shared, &c.key, &e)
            }
            // The tuple was opened again within the grace: the new connection's entry and
            // state replaced this one's, and its counters are not this connection's. Its
            // `new` record stands in for this close, as it did when the sweep published.
            Some(_) => {}
            // Gone (evicted from a full table, or removed): the event's counters are the last.
            None => publish_close(shared, &c.key, &c.entry),
        }
    }
}

pub(super) fn publish_close(shared: &Shared, key: &CtKey, e: &CtEntry) {
    emit(shared, EventKind::Close, key, e);
    // After the record: it accounts the connection's last counters against this state.
    shared.state.lock().unwrap().conns.remove(key);
}
