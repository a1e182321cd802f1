//! `/metrics`: Prometheus text, every family under `observer_`, one function per area.
use std::fmt::Write as _;

use super::Status;
use crate::daemon::{Shared, State};

/// Prometheus text exposition, one metric family at a time.
#[derive(Default)]
struct Prom(String);

impl Prom {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{}}} {value}", labels.join(","));
        }
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// The whole exposition: the kernel's counters and the daemon's, read once.
pub(super) fn render(shared: &Shared) -> String {
    let s = super::status_of(shared, super::Count::Swept);
    let mut p = Prom::default();
    datapath(&mut p, &s);
    {
        let st = shared.state.lock().unwrap();
        records(&mut p, &st);
        daemon(&mut p, &st);
        if shared.opts.pod_metrics {
            pods(&mut p, &st);
        }
        if shared.opts.snat {
            snat(&mut p, &s, &st);
        }
        uplinks(&mut p, &s);
        sync_latency(&mut p, &st);
    }
    kube(&mut p, &s);
    p.0
}

/// The kernel's counters, conntrack fill and attached interfaces.
fn datapath(p: &mut Prom, s: &Status) {
    p.family(
        "observer_datapath_total",
        "counter",
        "Kernel datapath counters by kind (packets seen, and every packet or event not fully accounted).",
    );
    for (k, v) in &s.kernel {
        p.sample("observer_datapath_total", &[("kind", k)], v);
    }
    p.family(
        "observer_conntrack_entries",
        "gauge",
        "Connections in the kernel conntrack tables, one per address family, as of the daemon's last sweep of them (every 1-10 s).",
    );
    let v6 = s.conntrack_entries_ipv6;
    let v4 = s.conntrack_entries.saturating_sub(v6);
    for (family, n) in [("ipv4", v4), ("ipv6", v6)] {
        p.sample("observer_conntrack_entries", &[("family", family)], n);
    }
    p.single(
        "observer_attached_interfaces",
        "gauge",
        "Pod interfaces the programs are attached to.",
        s.interfaces.len(),
    );
}

/// Flow records, by kind and by policy.
fn records(p: &mut Prom, st: &State) {
    p.family(
        "observer_flow_records_total",
        "counter",
        "Flow records produced, by event, traffic class, protocol and verdict.",
    );
    let mut recs: Vec<_> = st.metrics.records.iter().collect();
    recs.sort();
    for ((ev, class, proto, verdict), n) in recs {
        let labels = [
            ("event", &**ev),
            ("traffic_class", class),
            ("protocol", proto),
            ("verdict", verdict),
        ];
        p.sample("observer_flow_records_total", &labels, n);
    }
    p.family(
        "observer_policy_verdicts_total",
        "counter",
        "Flow records by the policy that allowed them or, for drops and audit verdicts, isolated the denying side (direction: ingress or egress).",
    );
    let mut pv: Vec<_> = st.metrics.policy_verdicts.iter().collect();
    pv.sort();
    for ((ns, name, dir, verdict), n) in pv {
        let policy = format!("{ns}/{name}");
        let labels = [
            ("policy", policy.as_str()),
            ("direction", dir),
            ("verdict", verdict),
        ];
        p.sample("observer_policy_verdicts_total", &labels, n);
    }
}

/// The daemon's own health: shed records, flow log, source, attach and sweep counters.
fn daemon(p: &mut Prom, st: &State) {
    p.single(
        "observer_records_rate_limited_total",
        "counter",
        "Flow records not produced because of the node-wide record budget.",
        st.metrics.records_rate_limited_total,
    );
    p.single(
        "observer_flow_log_errors_total",
        "counter",
        "Records that could not be written to the flow log.",
        st.metrics.flow_log_errors_total,
    );
    p.family(
        "observer_conntrack_capacity",
        "gauge",
        "Size of the kernel conntrack tables, one per address family.",
    );
    for (family, n) in [
        ("ipv4", observer_common::CT_MAX_ENTRIES),
        ("ipv6", observer_common::CT6_MAX_ENTRIES),
    ] {
        p.sample("observer_conntrack_capacity", &[("family", family)], n);
    }
    if let Some(t) = st.last_sync {
        let age = t.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0);
        p.single(
            "observer_source_sync_age_seconds",
            "gauge",
            "Time since the cluster source was last applied to the maps.",
            format!("{age:.3}"),
        );
    }
    p.single(
        "observer_attach_errors_total",
        "counter",
        "Failed attach attempts on pod interfaces.",
        st.metrics.attach_errors_total,
    );
    p.single(
        "observer_conntrack_expired_total",
        "counter",
        "Idle connections removed by the daemon.",
        st.metrics.conntrack_expired_total,
    );
    p.single(
        "observer_closes_read_back_total",
        "counter",
        "TCP closes whose last counters were read back from the kernel's table, not sent by it.",
        st.metrics.closes_read_back_total,
    );
    p.family(
        "observer_closes_total",
        "counter",
        "TCP close records published, by when: with the last FIN's acknowledgement, held for \
         the grace after an early close (RST, crossed FINs), or by the sweep.",
    );
    for (when, n) in crate::daemon::CLOSES_WHEN
        .iter()
        .zip(st.metrics.closes_total)
    {
        p.sample("observer_closes_total", &[("when", when)], n);
    }
    p.single(
        "observer_source_errors",
        "gauge",
        "Objects in the cluster source that could not be used.",
        st.metrics.source_errors.len(),
    );
}

/// Per-pod traffic of this node's pods.
fn pods(p: &mut Prom, st: &State) {
    let mut pods: Vec<_> = st.pod_traffic.iter().collect();
    pods.sort();
    for (i, (name, unit)) in [
        ("observer_pod_packets_total", "Packets"),
        ("observer_pod_bytes_total", "Bytes (from the IP header on)"),
    ]
    .into_iter()
    .enumerate()
    {
        p.family(
            name,
            "counter",
            &format!("{unit} of forwarded traffic of this node's pods, by direction (egress: sent by the pod, ingress: received)."),
        );
        for ((ns, pod), t) in &pods {
            p.sample(
                name,
                &[("namespace", ns), ("pod", pod), ("direction", "egress")],
                t[i],
            );
            p.sample(
                name,
                &[("namespace", ns), ("pod", pod), ("direction", "ingress")],
                t[2 + i],
            );
        }
    }
    p.single(
        "observer_pod_metrics_overflow_total",
        "counter",
        "Traffic of local pods beyond --pod-metrics-max, left out of observer_pod_*.",
        st.metrics.pod_metrics_overflow_total,
    );
}

/// SNAT expectations and how each connection's SNAT was settled.
fn snat(p: &mut Prom, s: &Status, st: &State) {
    p.family(
        "observer_snat_flows_total",
        "counter",
        "Connections opened by this node's pods, by SNAT expectation (expected, none, unexpected, missing).",
    );
    for (e, n) in &s.snat {
        p.sample("observer_snat_flows_total", &[("expectation", e)], n);
    }
    p.family(
        "observer_snat_settled_total",
        "counter",
        "How connections' SNAT was settled: wire (the opening packet seen leaving the node's stack), dump (the kernel's table read at start), lookup (exact lookup after waiting), absent (no kernel entry: untranslated), late (a translation seen after the connection was settled untranslated).",
    );
    for how in ["wire", "dump", "lookup", "absent", "late"] {
        let n = st.metrics.snat_settled.get(how).copied().unwrap_or(0);
        p.sample("observer_snat_settled_total", &[("how", how)], n);
    }
    p.single(
        "observer_snat_pending",
        "gauge",
        "Flow records waiting for their connection's translation.",
        st.nat_pending(),
    );
    p.single(
        "observer_snat_table_overflow_total",
        "counter",
        "Translations not kept for joining because the table was full (their records are settled by a lookup).",
        st.nat_overflow(),
    );
    p.single(
        "observer_snat_unknown_total",
        "counter",
        "Records published without snat because the kernel only knew their connection the other way round.",
        st.metrics.snat_unknown_total,
    );
    p.single(
        "observer_kernel_conntrack_events_total",
        "counter",
        "Kernel conntrack entries read in the dump at start.",
        st.metrics.conntrack_events_total,
    );
    p.single(
        "observer_kernel_conntrack_dumps_total",
        "counter",
        "Dumps of the kernel conntrack table (one, at start).",
        st.metrics.conntrack_dumps_total,
    );
    p.single(
        "observer_kernel_conntrack_errors_total",
        "counter",
        "Failed ctnetlink dumps or lookups (records then go out without snat).",
        st.metrics.conntrack_errors_total,
    );
}

/// Wire-side counters of the uplinks.
fn uplinks(p: &mut Prom, s: &Status) {
    if !s.uplinks.is_empty() {
        for (name, unit) in [
            ("observer_uplink_packets_total", "Packets"),
            (
                "observer_uplink_bytes_total",
                "Bytes (from the IP header on)",
            ),
        ] {
            p.family(
                name,
                "counter",
                &format!("{unit} on the node's uplinks, by point (xdp, xdp_drop, tc_ingress, tc_egress), node-side address (pod, node, other) and far side (pod, node, world)."),
            );
            for c in &s.uplink_counters {
                let v = if name.contains("packets") {
                    c.packets
                } else {
                    c.bytes
                };
                p.sample(
                    name,
                    &[
                        ("point", &c.point),
                        ("local", &c.local),
                        ("remote", &c.remote),
                    ],
                    v,
                );
            }
        }
    }
}

/// API event to maps written, with `--source kube`.
fn sync_latency(p: &mut Prom, st: &State) {
    let h = &st.metrics.sync_latency;
    if h.count > 0 {
        p.family(
            "observer_kube_sync_latency_seconds",
            "histogram",
            "Policy propagation: from the first API server event a sync takes in to the maps written (any watched kind; Cilium: policy_implementation_delay).",
        );
        for (b, n) in h.bounds.iter().zip(&h.counts) {
            p.sample(
                "observer_kube_sync_latency_seconds_bucket",
                &[("le", &b.to_string())],
                n,
            );
        }
        p.sample(
            "observer_kube_sync_latency_seconds_bucket",
            &[("le", "+Inf")],
            h.count,
        );
        p.sample("observer_kube_sync_latency_seconds_sum", &[], h.sum);
        p.sample("observer_kube_sync_latency_seconds_count", &[], h.count);
    }
}

/// The API server watch, with `--source kube`.
fn kube(p: &mut Prom, s: &Status) {
    if let Some(k) = &s.kube {
        p.single(
            "observer_kube_stale_seconds",
            "gauge",
            "How long some API server watch has been down (0: all up).",
            format!("{:.3}", k.stale_seconds.unwrap_or(0.0)),
        );
        let fams: [(&str, &str, &str, fn(&crate::k8s::ResourceStatus) -> u64); 5] = [
            ("observer_kube_watch_up", "gauge", "1 while the watch of a resource is up.", |r| u64::from(r.connected)),
            ("observer_kube_objects", "gauge", "Objects of a resource known to the daemon.", |r| r.objects as u64),
            ("observer_kube_events_total", "counter", "Watch events received, by resource.", |r| r.events),
            ("observer_kube_lists_total", "counter", "Complete lists of a resource (initial, and relists after 410 Gone or lost watches).", |r| r.lists),
            ("observer_kube_watch_errors_total", "counter", "Watch errors (disconnects, timeouts, API errors), by resource.", |r| r.errors),
        ];
        for (name, kind, help, f) in fams {
            p.family(name, kind, help);
            for r in &k.resources {
                p.sample(name, &[("resource", &r.resource)], f(r));
            }
        }
    }
}
