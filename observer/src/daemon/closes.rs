//! Closed connections. The kernel sends a TCP close's event with the acknowledgement of its
//! last FIN, its counters final: its record goes out at once. A close after a RST or crossed
//! FINs comes earlier, and its record goes out `--close-grace` after the event, with the
//! connection's counters then: the last ACKs come after it, and the kernel sends their counters
//! in `AfterClose` events. The entry itself stays in the kernel's table [`CLOSED_LINGER`] after
//! its last packet, so late packets of the connection still find it; then the queue removes it
//! ([`Linger`]), without the sweep.
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
    /// The entry as the close event carried it, then the `AfterClose` events.
    entry: CtEntry,
    at: Instant,
    /// The last counters must be read back from the kernel's table: an event of the
    /// connection may be lost (a full ring, a restart) or not sent (past
    /// `AFTER_CLOSE_EVENTS`).
    read_back: bool,
    /// The tuple was opened again within the grace: this close was published then, before
    /// the new connection's state took the key (`reopened`); the queue only drops it.
    reopened: bool,
    /// Another connection may hold the tuple's entry (a `drop` event of it came): the entry is
    /// not this close's to remove when its linger ends; the sweep judges it.
    retaken: bool,
}

/// Closes in the order they came (so by deadline), and the latest of each key.
#[derive(Default)]
pub(super) struct CloseQueue {
    queue: VecDeque<Closing>,
    /// Key -> sequence number of its latest close in `queue`.
    latest: foldhash::HashMap<CtKey, u64>,
    /// Sequence number of `queue[0]`.
    front: u64,
    /// Events the kernel could not put in the ring, as last read.
    events_lost: u64,
    /// When a loss was last seen (`CLOCK_MONOTONIC` ns): a close from before it may have
    /// lost its after-close events and is read back.
    lost_through_ns: u64,
    /// Published closes waiting out their linger.
    linger: Linger,
    /// Events were lost since the sweep last asked: a close among them is the sweep's to
    /// publish, a grace after the loss.
    lost_unswept: bool,
}

/// Published closes whose entries the queue removes from the kernel's table once they lingered
/// [`CLOSED_LINGER`] after their last packet. The sweep would otherwise find them, reading the
/// whole table every second or two for them (most of a busy table is closed connections): the
/// queue knows each one's last packet from its events. A connection whose last packets sent no
/// event (past `AFTER_CLOSE_EVENTS`) is left to the sweep, as is one whose events were lost.
#[derive(Default)]
struct Linger {
    /// (when the linger ends as last known, `CLOCK_MONOTONIC` ns; key), in publishing order:
    /// about deadline order, the closes' graces being equal.
    queue: VecDeque<(u64, CtKey)>,
    /// Key -> (first seen, last packet) of the connection lingering on it.
    by_key: foldhash::HashMap<CtKey, (u64, u64)>,
    /// Closes were left to the sweep since it last ran: it should run soon.
    left_to_sweep: bool,
}

/// Closes lingering at most, about 110 bytes each; past that (over 13,000 closes a second)
/// the sweep removes the rest.
const LINGER_MAX: usize = 131_072;

impl Linger {
    fn push(&mut self, key: CtKey, e: &CtEntry) {
        if e.flags & ct_flags::AFTER_CLOSE_LAST != 0 || self.by_key.len() >= LINGER_MAX {
            self.left_to_sweep = true;
            return;
        }
        self.by_key.insert(key, (e.first_seen_ns, e.last_seen_ns));
        self.queue.push_back((linger_end(e.last_seen_ns), key));
    }

    /// A packet of a published close, seen in its `AfterClose` event: the linger starts over.
    fn after_close(&mut self, key: &CtKey, e: &CtEntry) {
        let Some(l) = self.by_key.get_mut(key) else {
            return;
        };
        if l.0 != e.first_seen_ns {
            return;
        }
        if e.flags & ct_flags::AFTER_CLOSE_LAST != 0 {
            self.by_key.remove(key);
            self.left_to_sweep = true;
        } else {
            l.1 = l.1.max(e.last_seen_ns);
        }
    }

    /// Another connection on the tuple: its entry is not this queue's to remove. Whether a
    /// lingering close was let go.
    fn reopened(&mut self, key: &CtKey, first_seen_ns: u64) -> bool {
        let other = self.by_key.get(key).is_some_and(|l| l.0 != first_seen_ns);
        if other {
            self.by_key.remove(key);
        }
        other
    }

    /// Every close whose linger ended by `through_ns`, the time through which the ring's
    /// events were read (an event of a packet or a reopening before it would have been seen).
    fn pop_due(&mut self, through_ns: u64) -> Vec<CtKey> {
        let mut due = Vec::new();
        while let Some(&(end, key)) = self.queue.front() {
            if end > through_ns {
                break;
            }
            self.queue.pop_front();
            let Some(&(_, last)) = self.by_key.get(&key) else {
                continue;
            };
            let now_end = linger_end(last);
            if now_end > end {
                self.queue.push_back((now_end, key));
            } else {
                self.by_key.remove(&key);
                due.push(key);
            }
        }
        due
    }
}

impl CloseQueue {
    /// Whether the sweep is wanted for closes since this was last asked, and within how long:
    /// a grace after a loss (when its closes are due), at once for closes left to it.
    pub(super) fn take_sweep_wanted(&mut self, grace: Duration) -> Option<Duration> {
        let lost = std::mem::take(&mut self.lost_unswept);
        let left = std::mem::take(&mut self.linger.left_to_sweep);
        if lost {
            Some(grace)
        } else {
            left.then_some(Duration::ZERO)
        }
    }
}

fn linger_end(last_seen_ns: u64) -> u64 {
    last_seen_ns.saturating_add(CLOSED_LINGER.as_nanos() as u64)
}

impl CloseQueue {
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    fn push(&mut self, c: Closing) {
        self.latest
            .insert(c.key, self.front + self.queue.len() as u64);
        self.queue.push_back(c);
    }

    fn contains(&self, key: &CtKey) -> bool {
        self.latest.contains_key(key)
    }

    fn latest_mut(&mut self, key: &CtKey) -> Option<&mut Closing> {
        let seq = *self.latest.get(key)?;
        self.queue.get_mut((seq - self.front) as usize)
    }

    /// The closes whose grace ended by `through`.
    fn pop_due(&mut self, grace: Duration, through: Instant) -> Vec<Closing> {
        let n = self
            .queue
            .iter()
            .take_while(|c| c.at + grace <= through)
            .count();
        let due: Vec<Closing> = self.queue.drain(..n).collect();
        for (i, c) in due.iter().enumerate() {
            let seq = self.front + i as u64;
            if self.latest.get(&c.key) == Some(&seq) {
                self.latest.remove(&c.key);
            }
        }
        self.front += n as u64;
        due
    }

    /// When the next close's grace ends.
    fn next_due(&self, grace: Duration) -> Option<Instant> {
        self.queue.front().map(|c| c.at + grace)
    }

    /// The kernel's count of events lost is now `lost` (read at `now_ns`): if it grew, every
    /// close queued or still in the ring may be missing an after-close event.
    fn events_lost(&mut self, lost: u64, now_ns: u64) {
        if lost != self.events_lost {
            self.events_lost = lost;
            self.lost_through_ns = now_ns;
            for c in self.queue.iter_mut() {
                c.read_back = true;
            }
            // An after-close event may be among those lost: the sweep removes these.
            self.linger = Linger::default();
            self.lost_unswept = true;
        }
    }
}

/// A close event. One with its final counters (`CLOSE_EXACT`: it came with the last FIN's
/// acknowledgement) is published at once and lingers; any other is queued, in arrival order,
/// so the queue is ordered by deadline.
pub(super) fn close_seen(shared: &Shared, key: CtKey, entry: CtEntry) {
    let mut st = shared.state.lock().unwrap();
    if entry.flags & ct_flags::CLOSE_EXACT != 0 {
        // The sweep published it already: the acknowledgement came after `--close-grace`.
        if st.late_closes.contains(&(key, entry.first_seen_ns)) {
            return;
        }
        st.closing.linger.push(key, &entry);
        drop(st);
        publish_close(shared, &key, &entry, CLOSE_AT_LAST_ACK);
        return;
    }
    // Adopted from the table at start, and now its event from the ring's backlog: once is
    // enough.
    if !st.adopted.is_empty() && st.adopted.remove(&key) {
        return;
    }
    if st.closing.len() < CLOSING_MAX {
        let read_back = entry.last_seen_ns <= st.closing.lost_through_ns;
        st.closing.push(Closing {
            key,
            entry,
            at: Instant::now(),
            read_back,
            reopened: false,
            retaken: false,
        });
        return;
    }
    // Past the queue's bound: published at once, its entry left to the sweep.
    st.closing.linger.left_to_sweep = true;
    drop(st);
    publish_close(shared, &key, &entry, CLOSE_HELD);
}

/// A packet of a closed connection (the last ACK): its counters for the queued close.
pub(super) fn after_close_seen(shared: &Shared, key: &CtKey, e: &CtEntry) {
    let mut st = shared.state.lock().unwrap();
    let Some(c) = st.closing.latest_mut(key) else {
        // Published already (past its grace, or read back), or adopted.
        st.closing.linger.after_close(key, e);
        return;
    };
    if c.entry.first_seen_ns != e.first_seen_ns {
        return;
    }
    // Two CPUs may count packets of the connection at once: their events need not come in
    // the order of the counts. The flags (the verdict: a policy change may have denied the
    // last ACK) are the most counted event's.
    if e.packets.iter().sum::<u64>() >= c.entry.packets.iter().sum::<u64>() {
        c.entry.flags = e.flags & !ct_flags::AFTER_CLOSE_LAST;
    }
    for d in 0..2 {
        c.entry.packets[d] = c.entry.packets[d].max(e.packets[d]);
        c.entry.bytes[d] = c.entry.bytes[d].max(e.bytes[d]);
    }
    c.entry.last_seen_ns = c.entry.last_seen_ns.max(e.last_seen_ns);
    c.entry.tcp_flags |= e.tcp_flags;
    if e.flags & ct_flags::AFTER_CLOSE_LAST != 0 {
        c.read_back = true;
    }
}

/// A `new` event for `key`, of the connection first seen at `first_seen_ns`: a close waiting for
/// its grace that is not this connection's belongs to an earlier one on the tuple. It is
/// returned, to be published before the new connection's state takes the key: its counters
/// are final, since the tuple's next connection has begun.
pub(super) fn reopened(st: &mut State, key: &CtKey, first_seen_ns: u64) -> Option<CtEntry> {
    let mut earlier = None;
    if let Some(c) = st.closing.latest_mut(key) {
        if c.entry.first_seen_ns != first_seen_ns && !c.reopened {
            c.reopened = true;
            earlier = Some(c.entry);
        }
    }
    st.closing.linger.reopened(key, first_seen_ns);
    earlier
}

/// A `drop` event for `key`, of the connection first seen at `first_seen_ns`: a denied
/// connection that took the tuple's entry (`--no-enforce` keeps denied connections) or a
/// denied packet that left the closed one in place. Either way the entry is no longer the
/// lingering close's to remove by key: the sweep, which reads each entry, takes it.
pub(super) fn dropped_on(st: &mut State, key: &CtKey, first_seen_ns: u64) {
    let mut let_go = st.closing.linger.reopened(key, first_seen_ns);
    if let Some(c) = st.closing.latest_mut(key) {
        if c.entry.first_seen_ns != first_seen_ns && !c.retaken {
            c.retaken = true;
            let_go = true;
        }
    }
    if let_go {
        st.closing.linger.left_to_sweep = true;
    }
}

/// Publishes closes as their grace ends and the ring has been read past it (an after-close
/// event may wait there). A queue rather than the sweep: the sweep read each closed entry at
/// every pass of its linger, about twenty times, and kept daemon state for it.
pub(super) async fn closes_task(shared: Arc<Shared>) -> Result<()> {
    let grace = shared.opts.close_grace;
    if let Err(e) = adopt_closing(&shared) {
        warn!("adopting closes an earlier daemon held: {e:#}");
    }
    loop {
        // Lost events first: a close is published only up to when they were read.
        let (checked, checked_ns) = (Instant::now(), flows::mono_now_ns());
        let lost = shared.dp.lock().unwrap().events_lost().unwrap_or(u64::MAX);
        let (due, next, lingered) = {
            let mut st = shared.state.lock().unwrap();
            st.closing.events_lost(lost, checked_ns);
            let through = st.ring_read_through.min(checked);
            let due = st.closing.pop_due(grace, through);
            // Into the linger under the same hold of the state: an after-close event read
            // from now on finds them there.
            for c in due.iter().filter(|c| !c.reopened && !c.retaken) {
                st.closing.linger.push(c.key, &c.entry);
            }
            if !st.adopted.is_empty() {
                for c in &due {
                    st.adopted.remove(&c.key);
                }
            }
            let through_ns = checked_ns.saturating_sub((checked - through).as_nanos() as u64);
            let lingered = st.closing.linger.pop_due(through_ns);
            (due, st.closing.next_due(grace), lingered)
        };
        if !due.is_empty() {
            publish_due(&shared, due);
        }
        remove_lingered(&shared, &lingered);
        // At most ten passes a second: closes gather into batches under load.
        let wait = next
            .map_or(grace, |t| t.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(100));
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
        // An exact close was published with its event (`close_seen`).
        let sent = ct_flags::CLOSED | ct_flags::CLOSE_SENT;
        let closed = e.flags & (sent | ct_flags::SVC_ALIAS | ct_flags::CLOSE_EXACT) == sent;
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
    for (key, entry, idle) in found {
        if st.closing.contains(&key) {
            continue;
        }
        let at = now.checked_sub(idle).unwrap_or(now);
        // Its after-close events went to the daemon before this one.
        st.closing.push(Closing {
            key,
            entry,
            at,
            read_back: true,
            reopened: false,
            retaken: false,
        });
        st.adopted.insert(key);
    }
    Ok(())
}

/// Removes the closed entries whose linger ended before the ring was last read through.
fn remove_lingered(shared: &Shared, due: &[CtKey]) {
    if due.is_empty() {
        return;
    }
    let removed = shared.dp.lock().unwrap().remove_conntrack(due);
    match removed {
        Ok(n) => shared.state.lock().unwrap().metrics.conntrack_expired_total += n as u64,
        Err(e) => warn!("removing closed connections: {e:#}"),
    }
}

fn publish_due(shared: &Shared, due: Vec<Closing>) {
    let (read_back, from_events): (Vec<Closing>, Vec<Closing>) = due
        .into_iter()
        .filter(|c| !c.reopened)
        .partition(|c| c.read_back);
    for c in &from_events {
        publish_close(shared, &c.key, &c.entry, CLOSE_HELD);
    }
    if read_back.is_empty() {
        return;
    }
    shared.state.lock().unwrap().metrics.closes_read_back_total += read_back.len() as u64;
    let now: Vec<Option<CtEntry>> = {
        let dp = shared.dp.lock().unwrap();
        read_back
            .iter()
            .map(|c| {
                dp.conntrack_get(&c.key).unwrap_or_else(|e| {
                    warn!("reading a closed connection: {e:#}");
                    None
                })
            })
            .collect()
    };
    for (c, now) in read_back.iter().zip(now) {
        match now {
            // The same connection, with its counters after the grace.
            Some(e)
                if e.flags & ct_flags::CLOSED != 0 && e.first_seen_ns == c.entry.first_seen_ns =>
            {
                publish_close(shared, &c.key, &e, CLOSE_HELD);
                // Its last packet as read (past the after-close events, to the sweep).
                shared
                    .state
                    .lock()
                    .unwrap()
                    .closing
                    .linger
                    .after_close(&c.key, &e);
            }
            // The tuple was opened again within the grace, and its `new` event was lost: as
            // `reopened`.
            Some(e) => {
                let mut st = shared.state.lock().unwrap();
                st.closing.linger.reopened(&c.key, e.first_seen_ns);
            }
            // Gone (evicted from a full table, or removed): the events' counters are the last.
            None => publish_close(shared, &c.key, &c.entry, CLOSE_HELD),
        }
    }
}

/// `when`: how it came to be published, an index of [`CLOSES_WHEN`].
pub(super) fn publish_close(shared: &Shared, key: &CtKey, e: &CtEntry, when: usize) {
    emit(shared, EventKind::Close, key, e);
    // After the record: it accounts the connection's last counters against this state.
    let mut st = shared.state.lock().unwrap();
    st.conns.remove(key);
    st.metrics.closes_total[when] += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn closed(port: u16, first: u64, last: u64) -> (CtKey, CtEntry) {
        let key = CtKey {
            port_a: port,
            ..CtKey::default()
        };
        let e = CtEntry {
            first_seen_ns: first,
            last_seen_ns: last,
            flags: ct_flags::CLOSED | ct_flags::CLOSE_SENT,
            ..CtEntry::default()
        };
        (key, e)
    }

    #[test]
    fn a_close_is_removed_when_its_linger_ends_after_its_last_packet() {
        let mut l = Linger::default();
        let (k1, e1) = closed(1, S, 2 * S);
        let (k2, mut e2) = closed(2, S, 2 * S);
        l.push(k1, &e1);
        l.push(k2, &e2);
        assert!(l.pop_due(11 * S).is_empty());
        // A late ACK of the second, at 5 s: its linger starts over.
        e2.last_seen_ns = 5 * S;
        l.after_close(&k2, &e2);
        assert_eq!(l.pop_due(12 * S), vec![k1]);
        assert!(l.pop_due(14 * S).is_empty());
        assert_eq!(l.pop_due(15 * S), vec![k2]);
        assert!(!l.left_to_sweep);
    }

    #[test]
    fn a_reopened_tuple_or_unannounced_packets_are_left_to_the_sweep() {
        let mut l = Linger::default();
        let (k1, e1) = closed(1, S, 2 * S);
        let (k2, mut e2) = closed(2, S, 2 * S);
        l.push(k1, &e1);
        l.push(k2, &e2);
        // Another connection on the first tuple (its `new` or, kept though denied, its `drop`
        // event): not this queue's entry any more. The same connection's is.
        assert!(!l.reopened(&k1, S));
        assert!(l.reopened(&k1, 3 * S));
        // The second's packets go on past its last after-close event.
        e2.flags |= ct_flags::AFTER_CLOSE_LAST;
        l.after_close(&k2, &e2);
        assert!(l.pop_due(30 * S).is_empty());
        assert!(l.left_to_sweep);
    }
}
