//! The SNAT join: the kernel's conntrack over ctnetlink, matched to local pods' records by
//! their exact tuple, so records carry both the pod's and the wire's source.
use super::*;

impl Shared {
    /// A record with its SNAT, or `None` when it was parked to wait for the kernel's
    /// conntrack entry of its (new) connection; the wait and the lookup happen under one lock,
    /// so an entry arriving in between cannot be missed.
    pub(super) fn make_record_snat(
        &self,
        kind: EventKind,
        key: &CtKey,
        e: &CtEntry,
    ) -> Option<FlowRecord> {
        let mut rec = self.make_record(kind, key, e);
        let mut st = self.state.lock().unwrap();
        if !st.snat_live {
            return Some(rec);
        }
        let Some(t) = snat_subject(&st, &self.opts, kind, key, e, rec.service.as_ref()) else {
            return Some(rec);
        };
        if let Some(c) = st.conns.get(key) {
            if let Some(info) = c.snat.clone() {
                // Settled by absence, and the kernel's entry came after all: it wins.
                let late = c.snat_assumed && kind != EventKind::New;
                match late.then(|| st.nat.take(&t, e.first_seen_ns)).flatten() {
                    Some(k) => settle(&mut st, key, &mut rec, t, k, "late"),
                    None => rec.snat = Some(info),
                }
                return Some(rec);
            }
        }
        match st.nat.take(&t, e.first_seen_ns) {
            Some(k) => {
                settle(&mut st, key, &mut rec, t, k, "event");
                Some(rec)
            }
            // A close read while its connection's `new` record still waits (a short
            // connection: both events in one batch of the ring) waits behind it, so it carries
            // the same SNAT and the connection's state goes with it, not before the `new`
            // record's join brings it back for a later connection on the tuple to trip on.
            None if kind == EventKind::Close && st.nat.is_waiting(&t) => {
                st.nat.park(t, pending(rec, key, true, None));
                None
            }
            None if kind == EventKind::New => {
                let from = opened_by_syn(key, e).then(|| st.nat.absence_from(e.first_seen_ns));
                if from.is_some_and(|f| st.nat.absence_settles(f)) {
                    let k = untranslated(&rec, t);
                    settle(&mut st, key, &mut rec, t, k, "untranslated");
                    return Some(rec);
                }
                st.nat.park(t, pending(rec, key, false, from));
                None
            }
            None => Some(rec),
        }
    }
}

fn pending(
    rec: FlowRecord,
    key: &CtKey,
    last: bool,
    untranslated_from: Option<u64>,
) -> crate::snat::Pending<CtKey> {
    crate::snat::Pending {
        rec,
        key: *key,
        since: Instant::now(),
        last,
        untranslated_from,
    }
}

/// How long after a connection's first packet its kernel entry is surely queued to the
/// reader, if the kernel made one. The kernel confirms the entry, and queues its event, while
/// it handles that packet, microseconds after observer's program at the pod's veth saw it;
/// the packet's time is the programs' coarse clock, up to two ticks behind (`clock.rs`): the
/// coarse clock's resolution is the tick. 2 ms more for the rest.
pub(super) fn entry_queued_within_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let tick = if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } == 0 {
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    } else {
        // HZ=100, the coarsest there is.
        10_000_000
    };
    2 * tick + 2_000_000
}

/// What the events intake needs of the ctnetlink reader to settle a record as untranslated
/// at once, not after the reader's next pass: that the reader's socket holds nothing and no
/// read of it was under way. `reads` is odd while the reader reads and applies a batch.
pub(super) struct ReaderGate {
    reads: std::sync::atomic::AtomicU64,
    /// The reader's socket (it lives as long as the daemon).
    fd: std::os::fd::RawFd,
}

impl ReaderGate {
    fn reading(&self) {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// `Some(now)` when every entry the kernel queued before now has been applied to the
    /// join; `None` when that cannot be told (events queued, a read under way).
    fn quiet_now(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let before = self.reads.load(Ordering::Acquire);
        if before % 2 == 1 {
            return None;
        }
        let now = flows::mono_now_ns();
        let mut p = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        if unsafe { libc::poll(&mut p, 1, 0) } != 0 {
            return None;
        }
        (self.reads.load(Ordering::Acquire) == before).then_some(now)
    }
}

/// Before a batch of the ring's records: lets those whose connection's kernel entry would
/// have been read by now settle as untranslated without waiting for the reader's next pass.
pub(super) fn catch_up_with_reader(shared: &Shared) {
    let Some(now) = shared.conntrack_gate.get().and_then(|g| g.quiet_now()) else {
        return;
    };
    shared.state.lock().unwrap().nat.set_read_through(now);
}

/// Whether a `new` record may be settled as untranslated when no kernel entry was read in
/// time (`NatTable::absence_settles`): a TCP connection opened by its SYN, whose first packet
/// made the kernel's entry (a SYN on a closed tuple replaces the old entry). Not so other
/// protocols, nor TCP picked up mid-way: the kernel may hold an older entry of the tuple, made
/// before observer's, that no event announces; those wait for the event or the lookup after
/// `--snat-wait`. The reader's socket filter drops untranslated TCP entries ([`set_filter`]):
/// for most connections of a cluster no event is built into a message, queued, or read.
fn opened_by_syn(key: &CtKey, e: &CtEntry) -> bool {
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    key.proto == IPPROTO_TCP && e.tcp_flags & (SYN | ACK) == SYN
}

/// What the kernel's entry would have said of a connection it did not translate: where the
/// record says it went (a Service's backend, not the frontend of the tuple).
fn untranslated(rec: &FlowRecord, t: crate::snat::FlowTuple) -> crate::snat::Kernel {
    crate::snat::Kernel {
        translated: None,
        dst: rec.destination.ip.unwrap_or(t.3),
    }
}

/// ctnetlink entries kept for joining at most (local pods' connections not yet recorded).
pub(super) const NAT_TABLE_MAX: usize = 262_144;

/// The kernel conntrack tuple of a record that gets an `snat` object: a local pod opened the
/// connection, it was not dropped, and it is something the kernel tracks on its own (ICMP
/// errors are not: they belong to the connection they report on).
pub(super) fn snat_subject(
    st: &State,
    opts: &Options,
    kind: EventKind,
    key: &CtKey,
    e: &CtEntry,
    service: Option<&flows::ServiceRef>,
) -> Option<crate::snat::FlowTuple> {
    if kind == EventKind::Drop || e.flags & ct_flags::DENIED != 0 {
        return None;
    }
    let icmp =
        key.proto == observer_common::IPPROTO_ICMP || key.proto == observer_common::IPPROTO_ICMPV6;
    if icmp && !matches!(e.icmp_type, 0 | 8 | 128 | 129) {
        return None;
    }
    let ((sip, sport), (dip, dport)) = flows::orient(key, e.flags);
    let pod = st.by_ip.get(&sip)?;
    if *pod.node != *opts.node_name || pod.host_network {
        return None;
    }
    // The kernel's entry of a Service connection is keyed by the frontend the pod asked for.
    let (dip, dport) = service.map_or((dip, dport), |s| (s.ip, s.port));
    Some((key.proto, sip, sport, dip, dport))
}

/// What a kernel entry says about the connection of tuple `t`.
pub(super) fn kernel_of(ev: &crate::ctnetlink::CtEvent) -> crate::snat::Kernel {
    crate::snat::Kernel {
        translated: ev.snat(),
        // A Service's ClusterIP is DNAT'd to its backend: predict against where it went.
        dst: ev.dnat().map(|d| d.0).unwrap_or(ev.orig.dst),
    }
}

/// Gives a record its SNAT and remembers it for the connection's later records.
pub(super) fn settle(
    st: &mut State,
    key: &CtKey,
    rec: &mut FlowRecord,
    t: crate::snat::FlowTuple,
    k: crate::snat::Kernel,
    how: &'static str,
) {
    let translated = k.translated;
    let dst_is_pod = st.by_ip.contains_key(&k.dst);
    let info = crate::snat::info(
        &st.model,
        (t.1, rec.source.port),
        k.dst,
        dst_is_pod,
        translated,
    );
    // ICMP records show no ports; the translated "port" is the echo identifier.
    let info = crate::snat::SnatInfo {
        original_src_port: rec.source.port,
        translated_src_port: match translated {
            Some((_, p)) if rec.source.port != 0 => p,
            _ => rec.source.port,
        },
        ..info
    };
    // A late entry corrects the connection's SNAT; the connection was counted once already.
    if how != "late" {
        *st.metrics.snat_flows.entry(info.expectation).or_default() += 1;
    }
    *st.metrics.snat_settled.entry(how).or_default() += 1;
    let conn = st.conns.entry(*key).or_default();
    conn.snat = Some(info.clone());
    conn.snat_assumed = how == "untranslated";
    rec.snat = Some(info);
}

/// [`settle`] for a record that waited: a close that waited behind its connection's `new`
/// record takes what that one settled (counted once per connection).
fn settle_waiting(
    st: &mut State,
    p: &mut crate::snat::Pending<CtKey>,
    t: crate::snat::FlowTuple,
    k: crate::snat::Kernel,
    how: &'static str,
) {
    match st.conns.get(&p.key).and_then(|c| c.snat.clone()) {
        Some(info) if p.last => p.rec.snat = Some(info),
        _ => settle(st, &p.key, &mut p.rec, t, k, how),
    }
}

pub(super) fn tuple_of(t: &crate::ctnetlink::Tuple) -> crate::snat::FlowTuple {
    (t.proto, t.src, t.sport, t.dst, t.dport)
}

/// Feeds kernel conntrack entries (events, or a `dump`) into the join; publishes the records
/// that were waiting for them.
pub(super) fn apply_conntrack(shared: &Shared, events: &[crate::ctnetlink::CtEvent], dump: bool) {
    use crate::ctnetlink::CtEventKind;
    let mut ready = Vec::new();
    {
        let mut st = shared.state.lock().unwrap();
        let now = Instant::now();
        let now_ns = flows::mono_now_ns();
        st.metrics.conntrack_events_total += events.len() as u64;
        for ev in events {
            let t = tuple_of(&ev.orig);
            match ev.kind {
                // Not subscribed to (see `NatTable::take` for how a reused tuple is told).
                CtEventKind::Destroy => {}
                CtEventKind::New | CtEventKind::Update => {
                    // Only connections local pods opened are joined.
                    let local = st
                        .by_ip
                        .get(&ev.orig.src)
                        .is_some_and(|p| *p.node == *shared.opts.node_name && !p.host_network);
                    // An event of TCP (the filter keeps translated TCP only) is kept even
                    // so: its pod may be in the cluster view only by the time its record is
                    // joined, which would take the absence of its entry for no translation.
                    if !local && (dump || t.0 != IPPROTO_TCP) {
                        continue;
                    }
                    // Already joined: a dump repeats live connections. Not so an event, a new
                    // kernel entry: an earlier connection on its tuple may still hold its state
                    // (its close waits for its grace), and skipping would leave this one's
                    // record to a lookup.
                    let key = flows::ct_key(t.1, t.2, t.3, t.4, t.0);
                    if dump && st.conns.get(&key).is_some_and(|c| c.snat.is_some()) {
                        continue;
                    }
                    let k = kernel_of(ev);
                    if let Some(waiting) = st.nat.insert(t, k, now, now_ns) {
                        for mut p in waiting {
                            settle_waiting(&mut st, &mut p, t, k, "event");
                            ready.push(p);
                        }
                    }
                }
            }
        }
        st.nat.gc(now);
    }
    publish_waited(shared, ready);
}

/// Every entry the kernel made before `ns` has been read: the records that would have had
/// theirs by then are untranslated ([`opened_by_syn`]).
fn read_through(shared: &Shared, ns: u64) {
    let mut ready = Vec::new();
    {
        let mut st = shared.state.lock().unwrap();
        st.nat.set_read_through(ns);
        for (t, waiting) in st.nat.untranslated() {
            for mut p in waiting {
                let k = untranslated(&p.rec, t);
                settle_waiting(&mut st, &mut p, t, k, "untranslated");
                ready.push(p);
            }
        }
    }
    publish_waited(shared, ready);
}

/// Publishes records that waited for their join, in the order they came; a connection's last
/// one takes its state along.
pub(super) fn publish_waited(shared: &Shared, ready: Vec<crate::snat::Pending<CtKey>>) {
    for p in ready {
        shared.publish(p.rec);
        if p.last {
            shared.state.lock().unwrap().conns.remove(&p.key);
        }
    }
}

/// Records that waited `snat_wait` without an event: an exact lookup settles them (the
/// kernel has no entry when the connection was never tracked, e.g. no NAT table loaded).
pub(super) fn settle_overdue(shared: &Shared) {
    let overdue = {
        let mut st = shared.state.lock().unwrap();
        st.nat.overdue(shared.opts.snat_wait, Instant::now())
    };
    if overdue.is_empty() {
        return;
    }
    let mut ready = Vec::with_capacity(overdue.len());
    // One lookup per tuple, for all of its records.
    for (t, waiting) in overdue {
        let orig = crate::ctnetlink::Tuple {
            proto: t.0,
            src: t.1,
            sport: t.2,
            dst: t.3,
            dport: t.4,
        };
        let found = crate::ctnetlink::get(&orig);
        let mut st = shared.state.lock().unwrap();
        for mut p in waiting {
            match &found {
                // A lookup also matches an entry whose reply tuple this is (the pod answered a
                // connection the kernel saw the other way round): only the original counts.
                Ok(Some(ev)) if tuple_of(&ev.orig) == t => {
                    settle_waiting(&mut st, &mut p, t, kernel_of(ev), "lookup")
                }
                Ok(Some(_)) => st.metrics.snat_unknown_total += 1,
                Ok(None) => {
                    let k = crate::snat::Kernel {
                        translated: None,
                        dst: t.3,
                    };
                    settle_waiting(&mut st, &mut p, t, k, "absent")
                }
                Err(e) => {
                    // Published without `snat` rather than with a guess.
                    st.metrics.conntrack_errors_total += 1;
                    debug!("conntrack lookup: {e}");
                }
            }
            ready.push(p);
        }
    }
    publish_waited(shared, ready);
}

/// Has the kernel keep only the events the join uses: of translated TCP connections (an
/// untranslated one is settled by the entry's absence, see [`opened_by_syn`]) and of this
/// node's pods' IPv4 sources (and IPv6 ones), set again when the span of their addresses
/// changed. A pod new to the span may have its first connections' events dropped until this
/// runs (within `SETTLE_TICK`): its records then settle by a lookup, or as untranslated. If
/// the filter cannot be set every event is read, as before.
fn set_filter(
    shared: &Shared,
    l: &crate::ctnetlink::Listener,
    applied: &mut Option<crate::ctnetlink::Filter>,
) {
    let span = shared
        .local_v4_span
        .load(std::sync::atomic::Ordering::Relaxed);
    let f = crate::ctnetlink::Filter {
        v4_sources: (span != 0)
            .then(|| ((span >> 32) as u32).into())
            .map(|lo| (lo, (span as u32).into())),
        tcp_translated_only: true,
    };
    if *applied == Some(f) {
        return;
    }
    // Events of sources the filter before this one dropped and this one keeps (a pod new to
    // the span) are gone: their connections' records wait for a lookup.
    if applied.is_some() {
        let now = flows::mono_now_ns();
        shared.state.lock().unwrap().nat.distrust_absence(now);
    }
    *applied = Some(f);
    if let Err(e) = l.set_filter(&f) {
        warn!("filtering conntrack events: {e}; reading them all");
    }
}

/// Receive buffer of the ctnetlink socket: room for a burst of about 50k events.
pub(super) const CONNTRACK_RCVBUF: usize = 16 << 20;

/// How long conntrack events gather before a read: at most 100 wake-ups a second, far inside
/// `--snat-wait`; the socket holds ~50k events (one per new connection: destroys are not
/// subscribed to), 250k new connections a second for 200 ms.
const CONNTRACK_GATHER: Duration = Duration::from_millis(10);

/// Follows the kernel's connection tracking (ctnetlink events, a dump at start and after any
/// overrun) so local pods' records carry their SNAT. If that fails the daemon goes on without
/// it: records lose `snat`, nothing else.
pub(super) async fn conntrack_task(shared: Arc<Shared>) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let s = shared.clone();
    // A thread of its own, not a task: see `follow_conntrack`. Never joined; it lives as long
    // as the daemon.
    std::thread::Builder::new()
        .name("conntrack".into())
        .spawn(move || {
            let _ = tx.send(follow_conntrack(&s));
        })
        .context("starting the conntrack thread")?;
    if let Ok(Err(e)) = rx.await {
        warn!("kernel conntrack unavailable, records go without snat: {e:#}");
        let waiting = {
            let mut st = shared.state.lock().unwrap();
            st.snat_live = false;
            st.metrics.conntrack_errors_total += 1;
            st.nat.drain_pending()
        };
        publish_waited(&shared, waiting);
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// How often records past `--snat-wait` are settled by a lookup.
const SETTLE_TICK: Duration = Duration::from_millis(20);

/// The ctnetlink reader. Asleep in `poll`, the first event after a quiet spell wakes it; it then
/// sleeps [`CONNTRACK_GATHER`] before reading, and asleep in that pause nothing wakes it. A task
/// on the runtime could not pause so: the runtime's epoll is woken by every event on a socket
/// it watches (one per connection), and those wake-ups cost the daemon more CPU than reading.
fn follow_conntrack(shared: &Shared) -> Result<()> {
    let mut l = crate::ctnetlink::Listener::open(CONNTRACK_RCVBUF, crate::ctnetlink::Events::New)
        .context("subscribing to conntrack events (ctnetlink)")?;
    // Whether the dump read the whole table: if not, entries lost before it say nothing by
    // their absence.
    let dump = |shared: &Shared| match crate::ctnetlink::dump() {
        Ok(all) => {
            shared.state.lock().unwrap().metrics.conntrack_dumps_total += 1;
            apply_conntrack(shared, &all, true);
            true
        }
        Err(e) => {
            let mut st = shared.state.lock().unwrap();
            st.metrics.conntrack_errors_total += 1;
            st.nat.distrust_absence(flows::mono_now_ns());
            warn!("conntrack dump: {e}");
            false
        }
    };
    let gate = Arc::new(ReaderGate {
        // Odd: the dump below is a read under way.
        reads: 1.into(),
        fd: std::os::fd::AsRawFd::as_raw_fd(&l),
    });
    let _ = shared.conntrack_gate.set(gate.clone());
    let mut filter = None;
    set_filter(shared, &l, &mut filter);
    let started = flows::mono_now_ns();
    if dump(shared) {
        read_through(shared, started);
    }
    gate.reading();
    let mut batch = Vec::new();
    let mut settled = Instant::now();
    loop {
        set_filter(shared, &l, &mut filter);
        let wait = SETTLE_TICK.saturating_sub(settled.elapsed());
        let quiet_from = flows::mono_now_ns();
        if l.wait(wait).context("waiting for conntrack events")? {
            std::thread::sleep(CONNTRACK_GATHER);
            gate.reading();
            let from = flows::mono_now_ns();
            let read = l
                .read_batch(&mut batch)
                .context("reading conntrack events")?;
            apply_conntrack(shared, &batch, false);
            batch.clear();
            let mut through = read.emptied;
            if read.overrun {
                shared
                    .state
                    .lock()
                    .unwrap()
                    .metrics
                    .conntrack_overruns_total += 1;
                warn!("conntrack events lost (socket overrun); resyncing with a dump");
                // The dump began after `from`.
                through = dump(shared);
            }
            if through {
                read_through(shared, from);
            }
            gate.reading();
        } else {
            read_through(shared, quiet_from);
        }
        if settled.elapsed() >= SETTLE_TICK {
            settled = Instant::now();
            settle_overdue(shared);
        }
    }
}
