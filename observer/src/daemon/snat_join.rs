//! The SNAT join: local pods' records matched, by their exact tuple, to the kernel's
//! translation of their connection, so records carry both the pod's and the wire's source.
//! The translation is seen in the kernel as the connection's opening packet leaves the node's
//! stack (`EventKind::Wire`, see `observer-ebpf/src/handoff.rs`); a connection without that
//! proof is looked up in the kernel's conntrack over ctnetlink after `--snat-wait`.
use super::*;

impl Shared {
    /// A record with its SNAT, or `None` when it was parked to wait for its (new)
    /// connection's translation; the wait and the lookup happen under one lock, so a proof
    /// arriving in between cannot be missed.
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
                // Settled by the absence of a kernel entry, and a translation came after all
                // (a first SYN dropped on the way, its retransmission translated): it wins.
                let late = c.snat_assumed && kind != EventKind::New;
                match late.then(|| st.nat.take(&t, e.first_seen_ns)).flatten() {
                    Some((k, _)) => settle(&mut st, key, &mut rec, t, k, "late"),
                    None => rec.snat = Some(info),
                }
                return Some(rec);
            }
        }
        match st.nat.take(&t, e.first_seen_ns) {
            Some((k, how)) => {
                settle(&mut st, key, &mut rec, t, k, how);
                Some(rec)
            }
            // A close read while its connection's `new` record still waits (a short
            // connection: both events in one batch of the ring) waits behind it, so it carries
            // the same SNAT and the connection's state goes with it, not before the `new`
            // record's join brings it back for a later connection on the tuple to trip on.
            None if kind == EventKind::Close && st.nat.is_waiting(&t) => {
                st.nat.park(t, pending(rec, key, true));
                None
            }
            None if kind == EventKind::New => {
                st.nat.park(t, pending(rec, key, false));
                None
            }
            None => Some(rec),
        }
    }
}

fn pending(rec: FlowRecord, key: &CtKey, last: bool) -> crate::snat::Pending<CtKey> {
    crate::snat::Pending {
        rec,
        key: *key,
        since: Instant::now(),
        last,
    }
}

/// Translations kept for joining at most (local pods' connections not yet recorded).
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
    let conn = st.conns.at(key);
    conn.snat = Some(info.clone());
    conn.snat_assumed = how == "absent";
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

/// A local pod's new connection as its opening packet left the node's stack (see
/// `FlowEvent` for the fields): both tuples, proven in the kernel. Publishes the records that
/// waited for it.
pub(super) fn wire_seen(shared: &Shared, ev: &FlowEvent) {
    let v4 = |raw: u32| IpAddr::from(std::net::Ipv4Addr::from(raw.to_ne_bytes()));
    let k = &ev.key;
    let t = (
        k.proto,
        v4(k.addr_a[0]),
        k.port_a,
        v4(k.addr_b[0]),
        k.port_b,
    );
    let (src, sport) = (v4(ev.packets[0] as u32), ev.bytes[0] as u16);
    let kernel = crate::snat::Kernel {
        translated: ((src, sport) != (t.1, t.2)).then_some((src, sport)),
        dst: v4(ev.packets[1] as u32),
    };
    // A UDP (or other) flow's first packet may be, in the kernel's eyes, the reply of a flow
    // it saw the other way (a server pod answering after observer's entry expired), translated
    // back to a Service's frontend: a masquerade keeps the port where it can, that does not.
    // Such a record is looked up instead, as one without a proof.
    if t.0 != IPPROTO_TCP && kernel.translated.is_some_and(|(_, p)| p != t.2) {
        return;
    }
    let mut ready = Vec::new();
    {
        let mut st = shared.state.lock().unwrap();
        if !st.snat_live {
            return;
        }
        // Stamped with the packet's time: a record of a later connection on the tuple does
        // not take it (`NatTable::take`).
        let now = Instant::now();
        join(
            &mut st,
            t,
            kernel,
            "wire",
            now,
            ev.first_seen_ns,
            &mut ready,
        );
    }
    publish_waited(shared, ready);
}

/// A connection's translation into the join (`how` it was learnt, when it was seen): the
/// records that waited for it are settled into `ready`.
fn join(
    st: &mut State,
    t: crate::snat::FlowTuple,
    k: crate::snat::Kernel,
    how: &'static str,
    now: Instant,
    seen_ns: u64,
    ready: &mut Vec<crate::snat::Pending<CtKey>>,
) {
    let Some(mut waiting) = st.nat.insert(t, k, how, now, seen_ns) else {
        return;
    };
    for p in &mut waiting {
        settle_waiting(st, p, t, k, how);
    }
    // Most joins settle one record: its vector moves instead of being copied into another.
    if ready.is_empty() {
        *ready = waiting;
    } else {
        ready.append(&mut waiting);
    }
}

/// Feeds the kernel's conntrack table, dumped at start, into the join: connections opened
/// before the daemon ran keep their translation in their later records.
fn apply_dump(shared: &Shared, entries: &[crate::ctnetlink::CtEvent]) {
    let mut ready = Vec::new();
    {
        let mut st = shared.state.lock().unwrap();
        let now = Instant::now();
        let now_ns = flows::mono_now_ns();
        st.metrics.conntrack_events_total += entries.len() as u64;
        for ev in entries {
            let local = st
                .by_ip
                .get(&ev.orig.src)
                .is_some_and(|p| *p.node == *shared.opts.node_name && !p.host_network);
            if !local {
                continue;
            }
            let t = tuple_of(&ev.orig);
            let key = flows::ct_key(t.1, t.2, t.3, t.4, t.0);
            if st.conns.get(&key).is_some_and(|c| c.snat.is_some()) {
                continue;
            }
            // Records read from the ring while the dump ran may wait for it already.
            join(&mut st, t, kernel_of(ev), "dump", now, now_ns, &mut ready);
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

/// Records without a proof from the kernel's programs (a connection to the node itself, ICMP,
/// IPv6, a packet the stack held back or dropped), once the ring has been read past them or
/// after `--snat-wait`: an exact lookup of the kernel's conntrack settles them (no entry: the
/// connection was not tracked, or is gone, so it left untranslated if it left at all). The
/// kernel confirms its entry before the packet waits for a neighbour's address.
pub(super) fn settle_overdue(shared: &Shared) {
    let overdue = {
        let mut st = shared.state.lock().unwrap();
        let through = st.ring_read_through;
        st.nat
            .overdue(shared.opts.snat_wait, Instant::now(), through)
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

/// How often records past `--snat-wait` are settled by a lookup.
const SETTLE_TICK: Duration = Duration::from_millis(20);

/// How often the join's unclaimed translations are checked for their TTL (a walk of them all).
const NAT_GC_EVERY: Duration = Duration::from_secs(1);

/// Reads the kernel's conntrack table once at start, then settles records that waited too
/// long. A thread of its own: lookups are blocking netlink exchanges. If the first dump fails
/// the daemon goes on without the join: records lose `snat`, nothing else.
pub(super) async fn conntrack_task(shared: Arc<Shared>) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let s = shared.clone();
    // Never joined; it lives as long as the daemon.
    std::thread::Builder::new()
        .name("snat-join".into())
        .spawn(move || {
            let started = crate::ctnetlink::dump().map(|all| {
                s.state.lock().unwrap().metrics.conntrack_dumps_total += 1;
                apply_dump(&s, &all);
            });
            let ok = started.is_ok();
            let _ = tx.send(started);
            if !ok {
                return;
            }
            let mut gc_at = Instant::now();
            loop {
                std::thread::sleep(SETTLE_TICK);
                if s.state.lock().unwrap().nat.pending_len() > 0 {
                    settle_overdue(&s);
                }
                // Proofs no record claimed (a retransmitted SYN's, a connection with no
                // record) are kept for their TTL only.
                if gc_at.elapsed() >= NAT_GC_EVERY {
                    gc_at = Instant::now();
                    s.state.lock().unwrap().nat.gc(gc_at);
                }
            }
        })
        .context("starting the SNAT join's thread")?;
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
