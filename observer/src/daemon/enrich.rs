//! Enrichment: a kernel event becomes a flow record with pods, Services, the policies behind
//! its verdict, and per-pod traffic.
use super::*;

impl Shared {
    /// What the kernel linked a translated connection to: for a pod's Service connection the
    /// frontend it asked for (keyed by the pod's address and port, checked against the backend
    /// reached); for a NodePort client from outside the frontend and the client (keyed by its
    /// port). Returns (Service id, frontend, client).
    pub(super) fn service_link(&self, key: &CtKey, e: &CtEntry) -> Option<ServiceLink> {
        let ((src, sport), (dst, dport)) = flows::orient(key, e.flags);
        let dp = self.dp.lock().unwrap();
        let k = |addr: [u32; 4]| observer_common::SvcKey {
            addr,
            port: sport,
            proto: key.proto,
            family: key.family,
        };
        let ip = |a: &[u32; 4]| crate::cluster::addr_from(key.family, a);
        if e.flags & ct_flags::SERVICE != 0 {
            let nat = dp.svc_nat(&k(crate::cluster::ip_key(src).addr))?;
            let backend = crate::cluster::ip_key(dst);
            return (nat.backend == backend.addr && nat.backend_port == dport)
                .then(|| (nat.svc_id, (ip(&nat.frontend), nat.frontend_port), None));
        }
        let l = dp.nodeport_link(&k([0; 4]))?;
        let client = std::net::SocketAddr::new(ip(&l.client), l.client_port);
        Some((l.svc_id, (ip(&l.frontend), l.frontend_port), Some(client)))
    }
}

impl Shared {
    pub(super) fn make_record(&self, kind: EventKind, key: &CtKey, e: &CtEntry) -> FlowRecord {
        // Read once per connection; the kernel's link is not taken under the state lock.
        let linked = e.flags & (ct_flags::SERVICE | ct_flags::NODEPORT) != 0;
        let known = linked
            && (self.state.lock().unwrap().conns.get(key)).is_some_and(|c| c.service.is_some());
        let link = if linked && !known {
            self.service_link(key, e)
        } else {
            None
        };
        let mut st = self.state.lock().unwrap();
        let mut rec = flows::record(
            &self.opts.node_name,
            kind,
            key,
            e,
            |ip| st.by_ip.get(&ip).map(|p| &**p),
            |id| st.rules.get(&id).cloned(),
        );
        if e.flags & (ct_flags::DENIED | ct_flags::AUDITS) != 0 {
            (rec.isolated_by, rec.isolated_by_more) =
                isolated_by(&mut st, &self.opts, &rec, e.flags);
        }
        if linked {
            let s = match st.conns.get(key).and_then(|c| c.service.clone()) {
                Some(s) => Some(s),
                None => {
                    let s = link.and_then(|l| service_ref(&st.cluster, l));
                    if s.is_some() {
                        st.conns.at(key).service = s.clone();
                    }
                    s
                }
            };
            (rec.service, rec.original_source) = s.map_or((None, None), |(s, c)| (Some(s), c));
        }
        // A connection's traffic is counted at its reports and its close, not at its first
        // packet: only connections that live past a report interval then need state.
        if self.opts.pod_metrics && rec.verdict != "dropped" && kind != EventKind::New {
            count_pod_traffic(&mut st, &self.opts, key, &rec);
        }
        rec
    }
}

/// Adds what a connection carried since its last record to the per-pod traffic of its local
/// ends, before the record budget: metrics are never shed.
pub(super) fn count_pod_traffic(st: &mut State, opts: &Options, key: &CtKey, rec: &FlowRecord) {
    let c = &rec.counters;
    let now = [c.packets_out, c.bytes_out, c.packets_in, c.bytes_in];
    let counted = st.conns.get(key).map_or([0; 4], |c| c.counted);
    let d: [u64; 4] = std::array::from_fn(|i| now[i].saturating_sub(counted[i]));
    if d.iter().all(|v| *v == 0) {
        return;
    }
    st.conns.at(key).counted = now;
    // [egress packets, egress bytes, ingress packets, ingress bytes] of each local end: the
    // source sends `out` and receives `in`, the destination the reverse.
    let ends = [
        (rec.source.ip, d),
        (rec.destination.ip, [d[2], d[3], d[0], d[1]]),
    ];
    for (ip, add) in ends {
        let Some(pod) = ip.and_then(|ip| st.by_ip.get(&ip)) else {
            continue;
        };
        if *pod.node != *opts.node_name {
            continue;
        }
        let k = pod.key();
        if !st.pod_traffic.contains_key(&k) && st.pod_traffic.len() >= opts.pod_metrics_max {
            st.metrics.pod_metrics_overflow_total += 1;
            continue;
        }
        let t = st.pod_traffic.entry(k).or_default();
        for (t, a) in t.iter_mut().zip(add) {
            *t += a;
        }
    }
}

/// A kernel link: (Service id, frontend used, client from outside before the masquerade).
pub(super) type ServiceLink = (u32, (IpAddr, u16), Option<std::net::SocketAddr>);

/// The Service a kernel link names, with the frontend used and the client from outside.
pub(super) fn service_ref(
    cluster: &crate::cluster::Cluster,
    (id, (ip, port), client): ServiceLink,
) -> Option<(flows::ServiceRef, Option<std::net::SocketAddr>)> {
    let svc = cluster.services.iter().find(|s| s.kernel_id() == id)?;
    let s = flows::ServiceRef {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        ip,
        port,
    };
    Some((s, client))
}

/// Drop records name at most this many of the policies isolating the denying side, in
/// namespace/name order; `isolated_by_more` counts the rest. A namespace may hold thousands
/// of policies selecting one pod, and every dropped packet is a record: naming them all made
/// each record megabytes and its metrics thousands of series updates.
pub const ISOLATED_BY_MAX: usize = 16;

/// The policies isolating one side of a dropped connection, as records name them.
pub(super) struct Isolating {
    names: Vec<flows::PolicyName>,
    more: u32,
}

/// The policies that isolate the side(s) that denied a connection (cached per pod and
/// direction until the cluster changes).
pub(super) fn isolated_by(
    st: &mut State,
    opts: &Options,
    rec: &FlowRecord,
    flags: u32,
) -> (Vec<flows::PolicyName>, u32) {
    let mut out = Vec::new();
    let mut more = 0;
    let mut add = |ip: Option<IpAddr>, ingress: bool| {
        let Some(ip) = ip else { return };
        let Some(pod) = st.by_ip.get(&ip) else { return };
        let i = st.isolating.entry((ip, ingress)).or_insert_with(|| {
            let engine = crate::policy::Engine::new(&st.cluster, opts.policy.clone());
            let all = engine.isolating(pod, ingress);
            Isolating {
                more: all.len().saturating_sub(ISOLATED_BY_MAX) as u32,
                names: all
                    .into_iter()
                    .take(ISOLATED_BY_MAX)
                    .map(|p| flows::PolicyName {
                        namespace: p.namespace.as_str().into(),
                        name: p.name.as_str().into(),
                        direction: if ingress { "ingress" } else { "egress" }.into(),
                    })
                    .collect(),
            }
        });
        out.extend(i.names.iter().cloned());
        more += i.more;
    };
    // A drop names the sides that dropped it; an audit verdict, the sides whose audited
    // policies would have (those isolate it alone: an enforced one would have dropped it).
    let (egress, ingress) = if flags & ct_flags::DENIED != 0 {
        (ct_flags::EGRESS_DENIED, ct_flags::INGRESS_DENIED)
    } else {
        (ct_flags::EGRESS_AUDIT, ct_flags::INGRESS_AUDIT)
    };
    if flags & egress != 0 {
        add(rec.source.ip, false);
    }
    if flags & ingress != 0 {
        add(rec.destination.ip, true);
    }
    (out, more)
}
