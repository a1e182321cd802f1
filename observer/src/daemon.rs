//! `observer daemon`: loads the datapath, follows interfaces and the cluster source, turns
//! kernel events into flow records and serves them.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use observer_common::{ct_flags, Config, CtEntry, CtKey, EventKind, FlowEvent, IPPROTO_TCP};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::{
    bpf::Datapath,
    cluster::{self, Cluster, PodInfo},
    flows::{self, FlowRecord},
    netlink::{self, LinkEvent, LinkMonitor},
    policy::compile::{self, Allocator, Desired, RuleRef},
};

#[derive(Clone, Debug)]
pub enum Source {
    /// No cluster state: flows carry addresses only.
    None,
    /// Kubernetes YAML files or folders, re-read when they change.
    Dir(Vec<PathBuf>),
    /// The Kubernetes API server, watched.
    Kube(crate::k8s::Connection),
}

impl std::str::FromStr for Source {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "none" {
            return Ok(Self::None);
        }
        if let Some(rest) = s.strip_prefix("dir:") {
            let paths: Vec<PathBuf> = rest
                .split(',')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect();
            if paths.is_empty() {
                bail!("--source dir: needs at least one path, e.g. dir:/etc/observer/cluster");
            }
            return Ok(Self::Dir(paths));
        }
        if s == "kube" {
            return Ok(Self::Kube(Default::default()));
        }
        bail!("unknown source {s:?}: expected kube, dir:PATH[,PATH...] or none")
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub node_name: String,
    pub source: Source,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    /// Unix socket of the Hubble-compatible gRPC API (`hubble observe --server unix://...`).
    pub hubble_socket: Option<PathBuf>,
    /// The Hubble API (and `peer.Peer`) over TCP with mutual TLS, for Hubble Relay.
    pub hubble_remote: Option<(std::net::SocketAddr, crate::tls::Files)>,
    /// Cluster name in the peers' TLS server names.
    pub cluster_name: String,
    /// What must survive the daemon's restarts (identity numbering).
    pub state_dir: PathBuf,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Host-side interfaces that are never pod interfaces (the node's uplinks).
    pub uplinks: Vec<String>,
    /// Attach the uplink programs (tc both ways, XDP on ingress) to the uplinks.
    pub uplink_programs: bool,
    /// How tc programs attach; `None`: by kernel version.
    pub attach_mode: Option<crate::bpf::AttachMode>,
    pub model: crate::snat::ModelConfig,
    /// Follow the kernel's conntrack over ctnetlink and give local pods' records `snat`.
    pub snat: bool,
    /// How long a record waits for its ctnetlink entry before an exact lookup.
    pub snat_wait: Duration,
    pub report_interval: Duration,
    pub history: usize,
    pub tcp_timeout: Duration,
    pub other_timeout: Duration,
    pub close_grace: Duration,
    pub source_poll: Duration,
    /// Drop what policy denies (otherwise verdicts are only reported).
    pub enforce: bool,
    pub policy: crate::policy::Options,
    pub flow_log: Option<crate::flowlog::Config>,
    /// Node-wide budget of flow records per second (0: unlimited).
    pub max_records_per_second: u64,
    /// The remote API listener: address and certificate files (mutual TLS).
    pub remote: Option<(std::net::SocketAddr, crate::tls::Files)>,
    /// Per-pod bytes and packets metrics, for at most `pod_metrics_max` local pods.
    pub pod_metrics: bool,
    pub pod_metrics_max: usize,
}

/// Per-connection bookkeeping in userspace.
#[derive(Default)]
struct Conn {
    /// When the kernel reported the close; the record goes out after `close_grace`.
    closed_at: Option<Instant>,
    close_published: bool,
    /// Counters already added to the per-pod traffic metrics.
    counted: [u64; 4],
    /// The connection's SNAT, once joined with the kernel's conntrack entry.
    snat: Option<crate::snat::SnatInfo>,
    /// The Service it was opened to (and, from outside, the client before kube-proxy's
    /// masquerade), once read from the kernel's links.
    service: Option<(flows::ServiceRef, Option<std::net::SocketAddr>)>,
}

#[derive(Default)]
pub struct Metrics {
    /// Connections of local pods by SNAT expectation.
    pub snat_flows: HashMap<crate::snat::Expectation, u64>,
    /// How each connection's SNAT was settled: "event" (ctnetlink event or dump), "lookup"
    /// (exact GET after waiting), "absent" (the kernel had no entry: untranslated).
    pub snat_settled: HashMap<&'static str, u64>,
    pub conntrack_events_total: u64,
    /// ctnetlink overruns (events lost by the kernel): each is followed by a full dump.
    pub conntrack_overruns_total: u64,
    pub conntrack_dumps_total: u64,
    pub conntrack_errors_total: u64,
    /// Lookups that found the connection only the other way round (published without snat).
    pub snat_unknown_total: u64,
    /// (event, traffic class, protocol, verdict) -> records.
    pub records: HashMap<(String, String, String, String), u64>,
    /// (policy, direction, verdict) -> records: the policy that allowed a record, or the one
    /// that isolated the side that dropped it.
    pub policy_verdicts: HashMap<(String, String, String), u64>,
    pub records_rate_limited_total: u64,
    pub flow_log_errors_total: u64,
    pub links_attached_total: u64,
    pub attach_errors_total: u64,
    pub map_sync_errors_total: u64,
    pub source_errors: Vec<String>,
    pub conntrack_expired_total: u64,
    /// Local pods left out of the per-pod metrics by `--pod-metrics-max`.
    pub pod_metrics_overflow_total: u64,
    /// API event to maps written, with `--source kube`.
    pub sync_latency: Histogram,
}

/// A Prometheus histogram with fixed buckets (seconds).
#[derive(Clone, Debug)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        const B: &[f64] = &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        Self {
            bounds: B,
            counts: vec![0; B.len()],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

pub struct State {
    pub cluster: Arc<Cluster>,
    pub by_ip: HashMap<IpAddr, Arc<PodInfo>>,
    conns: HashMap<CtKey, Conn>,
    pub history: VecDeque<Arc<FlowRecord>>,
    pub metrics: Metrics,
    pub last_sync: Option<std::time::SystemTime>,
    pub interfaces: HashMap<u32, String>,
    /// The node's uplinks with programs attached: ifindex -> (name, XDP mode).
    pub uplinks: HashMap<u32, (String, &'static str)>,
    /// Rule id -> the policy rule it stands for.
    pub rules: HashMap<u32, RuleRef>,
    /// (namespace, pod) of local pods -> [egress packets, egress bytes, ingress packets,
    /// ingress bytes] of forwarded traffic.
    pub pod_traffic: HashMap<(String, String), [u64; 4]>,
    /// The network model SNAT expectations are judged against.
    pub model: crate::snat::NetModel,
    /// Kernel conntrack entries of local pods' connections, and records waiting for theirs.
    nat: crate::snat::NatTable<CtKey>,
    /// The kernel conntrack is followed (`--snat` and the ctnetlink socket works).
    snat_live: bool,
    bucket: f64,
    bucket_at: Instant,
}

pub struct Shared {
    pub opts: Options,
    /// The API server watchers, with `--source kube`.
    pub kube: Option<Arc<crate::k8s::Kube>>,
    pub flow_log: Option<Mutex<crate::flowlog::FlowLog>>,
    pub dp: Mutex<Datapath>,
    pub state: Mutex<State>,
    pub tx: broadcast::Sender<Arc<FlowRecord>>,
    pub started: std::time::SystemTime,
    /// What the kernel offers (`features::Features::summary`), for `observer status`.
    pub kernel_features: String,
}

impl State {
    pub fn nat_pending(&self) -> usize {
        self.nat.pending_len()
    }

    pub fn nat_overflow(&self) -> u64 {
        self.nat.overflow_total
    }

    pub fn snat_live(&self) -> bool {
        self.snat_live
    }
}

impl Shared {
    fn publish(&self, rec: FlowRecord) {
        let rec = Arc::new(rec);
        {
            let mut st = self.state.lock().unwrap();
            // Node-wide record budget: what exceeds it is counted, never silently lost. The
            // kernel's counters are unaffected; only records are shed.
            if self.opts.max_records_per_second > 0 {
                let now = Instant::now();
                let rate = self.opts.max_records_per_second as f64;
                let elapsed = now.duration_since(st.bucket_at).as_secs_f64();
                st.bucket = (st.bucket + elapsed * rate).min(rate);
                st.bucket_at = now;
                if st.bucket < 1.0 {
                    st.metrics.records_rate_limited_total += 1;
                    return;
                }
                st.bucket -= 1.0;
            }
            let k = (
                rec.event.clone(),
                rec.traffic_class.clone(),
                rec.l4.protocol.clone(),
                rec.verdict.clone(),
            );
            *st.metrics.records.entry(k).or_default() += 1;
            for p in &rec.policy {
                *st.metrics
                    .policy_verdicts
                    .entry((
                        format!("{}/{}", p.namespace, p.name),
                        p.direction.clone(),
                        rec.verdict.clone(),
                    ))
                    .or_default() += 1;
            }
            for p in &rec.isolated_by {
                *st.metrics
                    .policy_verdicts
                    .entry((
                        format!("{}/{}", p.namespace, p.name),
                        p.direction.clone(),
                        rec.verdict.clone(),
                    ))
                    .or_default() += 1;
            }
            if st.history.len() >= self.opts.history.max(1) {
                st.history.pop_front();
            }
            st.history.push_back(rec.clone());
        }
        if let Some(log) = &self.flow_log {
            if let Err(e) = log.lock().unwrap().write(&rec) {
                warn!("flow log: {e:#}");
                self.state.lock().unwrap().metrics.flow_log_errors_total += 1;
            }
        }
        let _ = self.tx.send(rec);
    }

    /// What the kernel linked a translated connection to: for a pod's Service connection the
    /// frontend it asked for (keyed by the pod's address and port, checked against the backend
    /// reached); for a NodePort client from outside the frontend and the client (keyed by its
    /// port). Returns (Service id, frontend, client).
    fn service_link(&self, key: &CtKey, e: &CtEntry) -> Option<ServiceLink> {
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

    fn make_record(&self, kind: EventKind, key: &CtKey, e: &CtEntry) -> FlowRecord {
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
        if e.flags & ct_flags::DENIED != 0 {
            rec.isolated_by = isolated_by(&st, &self.opts, &rec, e.flags);
        }
        if linked {
            let s = match st.conns.get(key).and_then(|c| c.service.clone()) {
                Some(s) => Some(s),
                None => {
                    let s = link.and_then(|l| service_ref(&st.cluster, l));
                    if s.is_some() {
                        st.conns.entry(*key).or_default().service = s.clone();
                    }
                    s
                }
            };
            (rec.service, rec.original_source) = s.map_or((None, None), |(s, c)| (Some(s), c));
        }
        if self.opts.pod_metrics && rec.verdict != "dropped" {
            count_pod_traffic(&mut st, &self.opts, key, &rec);
        }
        rec
    }

    /// A record with its SNAT, or `None` when it was parked to wait for the kernel's
    /// conntrack entry of its (new) connection; the wait and the lookup happen under one lock,
    /// so an entry arriving in between cannot be missed.
    fn make_record_snat(&self, kind: EventKind, key: &CtKey, e: &CtEntry) -> Option<FlowRecord> {
        let mut rec = self.make_record(kind, key, e);
        let mut st = self.state.lock().unwrap();
        if !st.snat_live {
            return Some(rec);
        }
        let Some(t) = snat_subject(&st, &self.opts, kind, key, e, rec.service.as_ref()) else {
            return Some(rec);
        };
        if let Some(info) = st.conns.get(key).and_then(|c| c.snat.clone()) {
            rec.snat = Some(info);
            return Some(rec);
        }
        match st.nat.take(&t, e.first_seen_ns) {
            Some(k) => {
                settle(&mut st, key, &mut rec, t, k, "event");
                Some(rec)
            }
            None if kind == EventKind::New => {
                st.nat.park(
                    t,
                    crate::snat::Pending {
                        rec,
                        key: *key,
                        since: Instant::now(),
                    },
                );
                None
            }
            None => Some(rec),
        }
    }

    /// Every conntrack entry with its current counters.
    pub fn conntrack(&self) -> Result<Vec<FlowRecord>> {
        let entries: Vec<(CtKey, CtEntry)> = {
            let dp = self.dp.lock().unwrap();
            let ct = dp.conntrack()?;
            ct.iter().filter_map(|r| r.ok()).collect()
        };
        let st = self.state.lock().unwrap();
        Ok(entries
            .iter()
            .filter(|(_, e)| e.flags & ct_flags::SVC_ALIAS == 0)
            .map(|(k, e)| {
                let kind = if e.flags & ct_flags::CLOSED != 0 {
                    EventKind::Close
                } else {
                    EventKind::Report
                };
                let mut rec = flows::record(
                    &self.opts.node_name,
                    kind,
                    k,
                    e,
                    |ip| st.by_ip.get(&ip).map(|p| &**p),
                    |id| st.rules.get(&id).cloned(),
                );
                if let Some(c) = st.conns.get(k) {
                    rec.snat = c.snat.clone();
                    if let Some((s, client)) = c.service.clone() {
                        (rec.service, rec.original_source) = (Some(s), client);
                    }
                }
                rec
            })
            .collect())
    }
}

/// ctnetlink entries kept for joining at most (local pods' connections not yet recorded).
const NAT_TABLE_MAX: usize = 262_144;
/// How long an entry the kernel destroyed stays joinable.
const NAT_DESTROYED_GRACE: Duration = Duration::from_secs(5);

/// The kernel conntrack tuple of a record that gets an `snat` object: a local pod opened the
/// connection, it was not dropped, and it is something the kernel tracks on its own (ICMP
/// errors are not: they belong to the connection they report on).
fn snat_subject(
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
    if pod.node != opts.node_name || pod.host_network {
        return None;
    }
    // The kernel's entry of a Service connection is keyed by the frontend the pod asked for.
    let (dip, dport) = service.map_or((dip, dport), |s| (s.ip, s.port));
    Some((key.proto, sip, sport, dip, dport))
}

/// What a kernel entry says about the connection of tuple `t`.
fn kernel_of(ev: &crate::ctnetlink::CtEvent) -> crate::snat::Kernel {
    crate::snat::Kernel {
        translated: ev.snat(),
        // A Service's ClusterIP is DNAT'd to its backend: predict against where it went.
        dst: ev.dnat().map(|d| d.0).unwrap_or(ev.orig.dst),
    }
}

/// Gives a record its SNAT and remembers it for the connection's later records.
fn settle(
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
    *st.metrics.snat_flows.entry(info.expectation).or_default() += 1;
    *st.metrics.snat_settled.entry(how).or_default() += 1;
    st.conns.entry(*key).or_default().snat = Some(info.clone());
    rec.snat = Some(info);
}

/// Adds what a connection carried since its last record to the per-pod traffic of its local
/// ends, before the record budget: metrics are never shed.
fn count_pod_traffic(st: &mut State, opts: &Options, key: &CtKey, rec: &FlowRecord) {
    let c = &rec.counters;
    let now = [c.packets_out, c.bytes_out, c.packets_in, c.bytes_in];
    let conn = st.conns.entry(*key).or_default();
    let d: [u64; 4] = std::array::from_fn(|i| now[i].saturating_sub(conn.counted[i]));
    conn.counted = now;
    if d.iter().all(|v| *v == 0) {
        return;
    }
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
        if pod.node != opts.node_name {
            continue;
        }
        let k = (pod.namespace.clone(), pod.name.clone());
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

/// NodePort clients the kernel noted: those a live connection took are marked taken (never
/// linked to another connection, a kubelet probe reusing the port), those no connection took
/// within [`NODEPORT_NOTE_TTL`] are removed.
fn sweep_nodeport_notes(shared: &Shared, entries: &[(CtKey, CtEntry)], now_ns: u64) {
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
const NODEPORT_NOTE_TTL: Duration = Duration::from_secs(2);

/// A kernel link: (Service id, frontend used, client from outside before the masquerade).
type ServiceLink = (u32, (IpAddr, u16), Option<std::net::SocketAddr>);

/// The Service a kernel link names, with the frontend used and the client from outside.
fn service_ref(
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

/// The policies that isolate the side that denied a connection: default-deny drops name them.
fn isolated_by(st: &State, opts: &Options, rec: &FlowRecord, flags: u32) -> Vec<flows::PolicyName> {
    let engine = crate::policy::Engine::new(&st.cluster, opts.policy.clone());
    let mut out = Vec::new();
    let mut add = |ip: Option<IpAddr>, ingress: bool| {
        if let Some(pod) = ip.and_then(|ip| st.by_ip.get(&ip)) {
            for p in engine.isolating(pod, ingress) {
                let n = flows::PolicyName {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    direction: if ingress { "ingress" } else { "egress" }.into(),
                };
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
    };
    if flags & ct_flags::EGRESS_DENIED != 0 {
        add(rec.source.ip, false);
    }
    if flags & ct_flags::INGRESS_DENIED != 0 {
        add(rec.destination.ip, true);
    }
    out
}

/// Every address of this network namespace: interface name, address and prefix length.
fn interface_addresses() -> Vec<(String, IpAddr, u8)> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let has_mask = !ifa.ifa_netmask.is_null();
        let (ip, len) = if fam == libc::AF_INET {
            let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let len = has_mask.then(|| {
                let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                u32::from_be(m.sin_addr.s_addr).leading_ones() as u8
            });
            (
                IpAddr::from(a.sin_addr.s_addr.to_ne_bytes()),
                len.unwrap_or(32),
            )
        } else if fam == libc::AF_INET6 {
            let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            let len = has_mask.then(|| {
                let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                u128::from_be_bytes(m.sin6_addr.s6_addr).leading_ones() as u8
            });
            (IpAddr::from(a.sin6_addr.s6_addr), len.unwrap_or(128))
        } else {
            continue;
        };
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        out.push((name.into_owned(), ip, len));
    }
    unsafe { libc::freeifaddrs(ifap) };
    out
}

fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// Local non-loopback addresses of this network namespace: the node's own IPs.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (_, ip, _) in interface_addresses() {
        if !ip.is_loopback() && !is_link_local(&ip) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The subnets of the addresses on the named interfaces (the uplinks: the VNet).
pub fn interface_nets(names: &[String]) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for (name, ip, len) in interface_addresses() {
        if !names.contains(&name) || is_link_local(&ip) {
            continue;
        }
        if let Ok(n) = ipnet::IpNet::new(ip, len) {
            let n = n.trunc();
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out
}

fn is_pod_interface(link: &netlink::Link, uplinks: &[String]) -> bool {
    link.kind == "veth" && !uplinks.iter().any(|u| u == &link.name)
}

pub async fn run(opts: Options) -> Result<()> {
    // A sync allocates and frees a whole compiled cluster; with one malloc arena per worker
    // thread, freed memory piles up in arenas other threads never reuse.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    // The API server lists run while the kernel verifies the programs.
    let kube = match &opts.source {
        Source::Kube(conn) => {
            let client = conn.client().await.context("--source kube")?;
            let kube = Arc::new(crate::k8s::Kube::default());
            kube.start(client);
            Some(kube)
        }
        _ => None,
    };
    // Named up front: a kernel that lacks what the programs use fails here, not in the
    // verifier.
    let features = crate::features::probe();
    features.check()?;
    info!(features = %features.summary(), "kernel probed");
    let mut dp = Datapath::load(&opts.pin_dir)?;
    if let Some(m) = opts.attach_mode {
        dp.mode = m;
    }
    info!(pin_dir = %opts.pin_dir.display(), mode = ?dp.mode, "kernel programs loaded");
    // A re-adopted config map keeps its generation: connections already judged stay judged.
    let policy_gen = dp.config().map(|c| c.policy_gen).unwrap_or(0);
    dp.set_config(Config {
        report_interval_ns: opts.report_interval.as_nanos() as u64,
        policy_gen,
        enforce: u32::from(opts.enforce),
        flags: if opts.policy.deny_from_node {
            0
        } else {
            observer_common::config_flags::ALLOW_NODE
        },
        _pad: 0,
    })?;
    let ring = dp.take_events()?;
    let logger = match aya_log::EbpfLogger::init(&mut dp.ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("kernel log forwarding unavailable: {e}");
            None
        }
    };

    let (tx, _) = broadcast::channel(4096);
    let flow_log = match &opts.flow_log {
        Some(cfg) => Some(Mutex::new(crate::flowlog::FlowLog::open(cfg.clone())?)),
        None => None,
    };
    let shared = Arc::new(Shared {
        kube,
        flow_log,
        opts: opts.clone(),
        dp: Mutex::new(dp),
        state: Mutex::new(State {
            cluster: Arc::new(Cluster::default()),
            by_ip: HashMap::new(),
            conns: HashMap::new(),
            history: VecDeque::new(),
            metrics: Metrics::default(),
            last_sync: None,
            interfaces: HashMap::new(),
            uplinks: HashMap::new(),
            rules: HashMap::new(),
            pod_traffic: HashMap::new(),
            model: crate::snat::NetModel::resolve(
                &opts.model,
                &Cluster::default(),
                &opts.node_name,
                &interface_nets(&opts.uplinks),
                host_addresses(),
            ),
            nat: crate::snat::NatTable::new(NAT_TABLE_MAX),
            snat_live: opts.snat,
            bucket: opts.max_records_per_second as f64,
            bucket_at: Instant::now(),
        }),
        tx,
        started: std::time::SystemTime::now(),
        kernel_features: features.summary(),
    });

    // Cluster state before interfaces, so the first flows are already classified.
    let mut source = SourceState::load(&opts.state_dir);
    match (&opts.source, &shared.kube) {
        (Source::Kube(_), Some(kube)) => {
            let t0 = Instant::now();
            while !kube.all_synced() && t0.elapsed() < KUBE_INITIAL_WAIT {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if kube_sync(&shared, &mut source, kube) {
                info!(elapsed = ?t0.elapsed(), "initial sync from the API server written");
            } else {
                warn!("API server not synced yet; the maps keep what they enforce until it is");
            }
        }
        _ => reload_source(&shared, &mut source),
    }

    let (monitor, links) = LinkMonitor::start().context("subscribing to link events")?;
    {
        let mut dp = shared.dp.lock().unwrap();
        for l in &links {
            apply_link(&shared, &mut dp, LinkEvent::New(l.clone()));
        }
        // Attachments and entries left by an earlier daemon for interfaces that are gone.
        for pin in dp.prune_link_pins() {
            info!(pin = %pin.display(), "released the attachment of a vanished interface");
        }
        let live: Vec<u32> = dp.attached();
        if let Some(m) = dp.ebpf.map_mut(observer_common::maps::ATTACHED) {
            if let Ok(mut att) = aya::maps::HashMap::<&mut MapData, u32, u32>::try_from(m) {
                let stale: Vec<u32> = att
                    .keys()
                    .filter_map(|k| k.ok())
                    .filter(|k| !live.contains(k))
                    .collect();
                for k in stale {
                    let _ = att.remove(&k);
                }
            }
        }
    }

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(events_task(shared.clone(), ring));
    tasks.spawn(links_task(shared.clone(), monitor));
    tasks.spawn(gc_task(shared.clone()));
    if opts.snat {
        tasks.spawn(conntrack_task(shared.clone()));
    }
    match shared.kube.clone() {
        Some(kube) => tasks.spawn(kube_task(shared.clone(), source, kube)),
        None => tasks.spawn(source_task(shared.clone(), source)),
    };
    if let Some(l) = logger {
        tasks.spawn(log_task(l));
    }
    let api = crate::api::serve(shared.clone()).await?;
    tasks.spawn(api);
    if let Some(path) = opts.hubble_socket.clone() {
        tasks.spawn(crate::hubble::serve(shared.clone(), path).await?);
    }
    if let Some((addr, files)) = opts.hubble_remote.clone() {
        tasks.spawn(crate::hubble::serve_tls(shared.clone(), addr, &files)?);
    }
    info!(socket = %opts.socket.display(), node = %opts.node_name, "observer daemon running");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted; shutting down"),
        _ = term.recv() => info!("terminated; shutting down"),
        Some(r) = tasks.join_next() => {
            match r {
                Ok(Ok(())) => bail!("a daemon task ended unexpectedly"),
                Ok(Err(e)) => return Err(e),
                Err(e) => bail!("a daemon task failed: {e}"),
            }
        }
    }
    tasks.abort_all();
    // Records still waiting for their kernel entry go out without `snat` rather than not at all.
    let waiting = shared.state.lock().unwrap().nat.drain_pending();
    for p in waiting {
        shared.publish(p.rec);
    }
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
}

fn apply_link(shared: &Shared, dp: &mut Datapath, ev: LinkEvent) {
    match ev {
        LinkEvent::New(l) => {
            if shared.opts.uplinks.iter().any(|u| u == &l.name) {
                if shared.opts.uplink_programs && !dp.uplinks().iter().any(|(i, _)| *i == l.index) {
                    attach_uplink(shared, dp, l);
                }
                return;
            }
            if !is_pod_interface(&l, &shared.opts.uplinks) {
                return;
            }
            if dp.attached().contains(&l.index) {
                return;
            }
            match dp.attach(l.index, &l.name) {
                Ok(()) => {
                    info!(ifindex = l.index, ifname = %l.name, "attached to pod interface");
                    let mut st = shared.state.lock().unwrap();
                    st.metrics.links_attached_total += 1;
                    st.interfaces.insert(l.index, l.name);
                }
                Err(e) => {
                    // A veth can vanish between the event and the attach; the next event or
                    // rescan retries.
                    warn!(ifname = %l.name, "attach failed: {e:#}");
                    shared.state.lock().unwrap().metrics.attach_errors_total += 1;
                }
            }
        }
        LinkEvent::Del(index) => {
            if dp.uplinks().iter().any(|(i, _)| *i == index) {
                dp.detach_uplink(index);
                let name = shared.state.lock().unwrap().uplinks.remove(&index);
                info!(ifindex = index, uplink = ?name, "uplink removed");
            }
            if dp.attached().contains(&index) {
                dp.detach(index);
                let name = shared.state.lock().unwrap().interfaces.remove(&index);
                info!(ifindex = index, ifname = ?name, "pod interface removed");
            }
        }
    }
}

fn attach_uplink(shared: &Shared, dp: &mut Datapath, l: netlink::Link) {
    match dp.attach_uplink(l.index, &l.name) {
        Ok(a) => {
            match &a.xdp_error {
                None => {
                    info!(ifindex = l.index, ifname = %l.name, xdp = a.xdp_mode, "attached to uplink")
                }
                Some(e) => warn!(
                    ifname = %l.name,
                    "uplink: tc attached, XDP not ({e}); ingress policy stays at the pod interfaces"
                ),
            }
            let mut st = shared.state.lock().unwrap();
            st.uplinks.insert(l.index, (l.name, a.xdp_mode));
        }
        Err(e) => {
            warn!(ifname = %l.name, "uplink attach failed: {e:#}");
            shared.state.lock().unwrap().metrics.attach_errors_total += 1;
        }
    }
}

async fn links_task(shared: Arc<Shared>, mut monitor: LinkMonitor) -> Result<()> {
    loop {
        match monitor.next_batch().await {
            Ok(events) => {
                let mut dp = shared.dp.lock().unwrap();
                for ev in events {
                    apply_link(&shared, &mut dp, ev);
                }
            }
            Err(e) => {
                // Lost events (ENOBUFS): reconcile against a fresh dump.
                warn!("link monitor: {e}; rescanning");
                let links = netlink::dump_links()?;
                let mut dp = shared.dp.lock().unwrap();
                let present: Vec<u32> = links.iter().map(|l| l.index).collect();
                for idx in dp.attached() {
                    if !present.contains(&idx) {
                        apply_link(&shared, &mut dp, LinkEvent::Del(idx));
                    }
                }
                for l in links {
                    apply_link(&shared, &mut dp, LinkEvent::New(l));
                }
            }
        }
    }
}

/// The kernel wakes the reader only once a batch has built up (see `observer-ebpf/src/events.rs`);
/// a short timer bounds the delay of the events in between.
const EVENT_POLL: Duration = Duration::from_millis(100);

async fn events_task(shared: Arc<Shared>, ring: RingBuf<MapData>) -> Result<()> {
    let mut fd = crate::netlink::readable(ring)?;
    let mut tick = tokio::time::interval(EVENT_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut batch);
                guard.clear_ready();
            }
            _ = tick.tick() => drain(fd.get_mut(), &mut batch),
        }
        for ev in batch {
            handle_event(&shared, ev);
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, batch: &mut Vec<FlowEvent>) {
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<FlowEvent>() {
            batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
    }
}

fn entry_of(ev: &FlowEvent) -> CtEntry {
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
        _pad: 0,
        egress_rule: ev.egress_rule,
        ingress_rule: ev.ingress_rule,
        policy_gen: 0,
        _pad2: 0,
    }
}

fn handle_event(shared: &Shared, ev: FlowEvent) {
    let Some(kind) = EventKind::from_u8(ev.kind) else {
        debug!(kind = ev.kind, "unknown event kind");
        return;
    };
    let e = entry_of(&ev);
    match kind {
        EventKind::New | EventKind::Drop => {
            shared
                .state
                .lock()
                .unwrap()
                .conns
                .insert(ev.key, Conn::default());
            emit(shared, kind, &ev.key, &e);
        }
        EventKind::Report => emit(shared, kind, &ev.key, &e),
        EventKind::Close => {
            // Published after a grace period with the entry's final counters: the last ACK of
            // a FIN exchange comes after the close.
            let mut st = shared.state.lock().unwrap();
            let c = st.conns.entry(ev.key).or_default();
            c.closed_at = Some(Instant::now());
        }
    }
}

/// Publishes a record now, or parks it until the kernel's conntrack entry of its connection
/// shows up (see `conntrack_task`).
fn emit(shared: &Shared, kind: EventKind, key: &CtKey, e: &CtEntry) {
    if let Some(rec) = shared.make_record_snat(kind, key, e) {
        shared.publish(rec);
    }
}

fn tuple_of(t: &crate::ctnetlink::Tuple) -> crate::snat::FlowTuple {
    (t.proto, t.src, t.sport, t.dst, t.dport)
}

/// Feeds kernel conntrack entries (events or a dump) into the join; publishes the records that
/// were waiting for them.
fn apply_conntrack(shared: &Shared, events: &[crate::ctnetlink::CtEvent], how: &'static str) {
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
                CtEventKind::Destroy => st.nat.destroyed(&t, now_ns),
                CtEventKind::New | CtEventKind::Update => {
                    // Only connections local pods opened are joined.
                    let local = st
                        .by_ip
                        .get(&ev.orig.src)
                        .is_some_and(|p| p.node == shared.opts.node_name && !p.host_network);
                    if !local {
                        continue;
                    }
                    // Already joined (a dump repeats live connections).
                    let key = flows::ct_key(t.1, t.2, t.3, t.4, t.0);
                    if st.conns.get(&key).is_some_and(|c| c.snat.is_some()) {
                        continue;
                    }
                    let k = kernel_of(ev);
                    if let Some(waiting) = st.nat.insert(t, k, now) {
                        for mut p in waiting {
                            settle(&mut st, &p.key, &mut p.rec, t, k, how);
                            ready.push(p.rec);
                        }
                    }
                }
            }
        }
        st.nat.gc(NAT_DESTROYED_GRACE, now, now_ns);
    }
    for rec in ready {
        shared.publish(rec);
    }
}

/// Records that waited `snat_wait` without an event: an exact lookup settles them (the
/// kernel has no entry when the connection was never tracked, e.g. no NAT table loaded).
fn settle_overdue(shared: &Shared) {
    let overdue = {
        let mut st = shared.state.lock().unwrap();
        st.nat.overdue(shared.opts.snat_wait, Instant::now())
    };
    if overdue.is_empty() {
        return;
    }
    let mut ready = Vec::with_capacity(overdue.len());
    for (t, mut p) in overdue {
        let orig = crate::ctnetlink::Tuple {
            proto: t.0,
            src: t.1,
            sport: t.2,
            dst: t.3,
            dport: t.4,
        };
        let found = crate::ctnetlink::get(&orig);
        let mut st = shared.state.lock().unwrap();
        match found {
            // A lookup also matches an entry whose reply tuple this is (the pod answered a
            // connection the kernel saw the other way round): only the original counts.
            Ok(Some(ev)) if tuple_of(&ev.orig) == t => {
                settle(&mut st, &p.key, &mut p.rec, t, kernel_of(&ev), "lookup")
            }
            Ok(Some(_)) => st.metrics.snat_unknown_total += 1,
            Ok(None) => {
                let k = crate::snat::Kernel {
                    translated: None,
                    dst: t.3,
                };
                settle(&mut st, &p.key, &mut p.rec, t, k, "absent")
            }
            Err(e) => {
                // Published without `snat` rather than with a guess.
                st.metrics.conntrack_errors_total += 1;
                debug!("conntrack lookup: {e}");
            }
        }
        ready.push(p.rec);
    }
    for rec in ready {
        shared.publish(rec);
    }
}

/// Receive buffer of the ctnetlink socket: room for a burst of about 50k events.
const CONNTRACK_RCVBUF: usize = 16 << 20;

/// Follows the kernel's connection tracking (ctnetlink events, a dump at start and after any
/// overrun) so local pods' records carry their SNAT. If that fails the daemon goes on without
/// it: records lose `snat`, nothing else.
async fn conntrack_task(shared: Arc<Shared>) -> Result<()> {
    if let Err(e) = follow_conntrack(&shared).await {
        warn!("kernel conntrack unavailable, records go without snat: {e:#}");
        let waiting = {
            let mut st = shared.state.lock().unwrap();
            st.snat_live = false;
            st.metrics.conntrack_errors_total += 1;
            st.nat.drain_pending()
        };
        for p in waiting {
            shared.publish(p.rec);
        }
    }
    std::future::pending::<()>().await;
    Ok(())
}

async fn follow_conntrack(shared: &Shared) -> Result<()> {
    let listener = crate::ctnetlink::Listener::open(CONNTRACK_RCVBUF)
        .context("subscribing to conntrack events (ctnetlink)")?;
    let mut l = crate::ctnetlink::AsyncListener::new(listener)?;
    let dump = |shared: &Shared| match crate::ctnetlink::dump() {
        Ok(all) => {
            shared.state.lock().unwrap().metrics.conntrack_dumps_total += 1;
            apply_conntrack(shared, &all, "event");
        }
        Err(e) => {
            shared.state.lock().unwrap().metrics.conntrack_errors_total += 1;
            warn!("conntrack dump: {e}");
        }
    };
    dump(shared);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            r = l.next_batch(&mut batch) => {
                let overrun = r.context("reading conntrack events")?;
                apply_conntrack(shared, &batch, "event");
                batch.clear();
                if overrun {
                    shared.state.lock().unwrap().metrics.conntrack_overruns_total += 1;
                    warn!("conntrack events lost (socket overrun); resyncing with a dump");
                    dump(shared);
                }
            }
            _ = tick.tick() => settle_overdue(shared),
        }
    }
}

async fn gc_task(shared: Arc<Shared>) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        gc_once(&shared)?;
    }
}

fn gc_once(shared: &Shared) -> Result<()> {
    let now_ns = flows::mono_now_ns();
    let opts = &shared.opts;
    let entries: Vec<(CtKey, CtEntry)> = {
        let dp = shared.dp.lock().unwrap();
        let ct = dp.conntrack()?;
        ct.iter().filter_map(|r| r.ok()).collect()
    };
    sweep_nodeport_notes(shared, &entries, now_ns);
    let mut publish = Vec::new();
    let mut expire = Vec::new();
    {
        let mut st = shared.state.lock().unwrap();
        for (k, e) in &entries {
            let idle = Duration::from_nanos(now_ns.saturating_sub(e.last_seen_ns));
            if e.flags & ct_flags::SVC_ALIAS != 0 {
                // A Service connection's pre-DNAT tuple: its records are the translated
                // connection's. Expired like any connection, published never.
                let timeout = if k.proto == IPPROTO_TCP {
                    opts.tcp_timeout
                } else {
                    opts.other_timeout
                };
                if idle >= timeout {
                    expire.push(*k);
                }
                continue;
            }
            let closed = e.flags & ct_flags::CLOSED != 0;
            let timeout = if closed {
                opts.close_grace.max(Duration::from_secs(10))
            } else if k.proto == IPPROTO_TCP {
                opts.tcp_timeout
            } else {
                opts.other_timeout
            };
            let conn = st.conns.entry(*k).or_default();
            if closed && conn.closed_at.is_none() {
                conn.closed_at = Some(Instant::now());
            }
            let due = conn
                .closed_at
                .is_some_and(|t| t.elapsed() >= opts.close_grace);
            if due && !conn.close_published {
                conn.close_published = true;
                publish.push((*k, *e));
            }
            if idle >= timeout {
                if !conn.close_published {
                    publish.push((*k, *e));
                }
                expire.push(*k);
            }
        }
        let live: std::collections::HashSet<CtKey> = entries.iter().map(|(k, _)| *k).collect();
        st.conns.retain(|k, _| live.contains(k));
        st.metrics.conntrack_expired_total += expire.len() as u64;
    }
    if !expire.is_empty() {
        let mut dp = shared.dp.lock().unwrap();
        let mut ct = dp.conntrack_mut()?;
        for k in &expire {
            let _ = ct.remove(k);
        }
    }
    for (k, e) in publish {
        emit(shared, EventKind::Close, &k, &e);
    }
    // After the close records: they account the connections' last counters.
    if !expire.is_empty() {
        let mut st = shared.state.lock().unwrap();
        for k in &expire {
            st.conns.remove(k);
        }
    }
    Ok(())
}

type Fingerprint = (Vec<(PathBuf, std::time::SystemTime, u64)>, Vec<IpAddr>);

/// What the source task carries from one sync to the next.
#[derive(Default)]
struct SourceState {
    alloc: Allocator,
    /// What this process last wrote to the maps.
    applied: Option<Desired>,
    /// The source's files and the node's addresses when `applied` was written.
    seen: Option<Fingerprint>,
    /// The node's addresses when `applied` was written.
    host: Vec<IpAddr>,
    /// Where the numbering is saved; its size when last saved.
    state_file: Option<PathBuf>,
    saved_len: usize,
}

/// The identity numbering in the state directory.
pub const ALLOCATOR_FILE: &str = "allocator.json";

impl SourceState {
    /// Picks up the numbering an earlier daemon saved, so the maps it left keep their meaning
    /// and a restart writes only what changed in the cluster.
    fn load(state_dir: &std::path::Path) -> Self {
        let path = state_dir.join(ALLOCATOR_FILE);
        let alloc = match std::fs::read(&path) {
            Ok(bytes) => match Allocator::from_json(&bytes) {
                Ok(a) => {
                    info!(path = %path.display(), "re-using the identity numbering of the previous run");
                    a
                }
                Err(e) => {
                    warn!(path = %path.display(), "ignoring saved identity numbering: {e:#}");
                    Allocator::default()
                }
            },
            Err(_) => Allocator::default(),
        };
        Self {
            saved_len: alloc.len(),
            alloc,
            state_file: Some(path),
            ..Default::default()
        }
    }

    fn save(&mut self) {
        let Some(path) = &self.state_file else {
            return;
        };
        if self.alloc.len() == self.saved_len && path.exists() {
            return;
        }
        let res = (|| -> Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, self.alloc.to_json()?)?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        })();
        match res {
            Ok(()) => self.saved_len = self.alloc.len(),
            Err(e) => warn!(path = %path.display(), "saving identity numbering: {e:#}"),
        }
    }
}

/// Re-reads a `dir:` source (or none) when its files or the node's addresses changed.
fn reload_source(shared: &Shared, src: &mut SourceState) {
    let files = match &shared.opts.source {
        Source::Dir(paths) => cluster::fingerprint(paths),
        _ => Ok(Vec::new()),
    };
    let now: Option<Fingerprint> = files.ok().map(|f| (f, host_addresses()));
    if now.is_some() && now == src.seen {
        shared.state.lock().unwrap().last_sync = Some(std::time::SystemTime::now());
        return;
    }
    let cluster = match &shared.opts.source {
        Source::Dir(paths) => match cluster::load_dir(paths) {
            Ok(c) => c,
            Err(e) => {
                // Keep what is enforced; report and retry at the next poll.
                warn!("reading cluster source: {e:#}");
                shared.state.lock().unwrap().metrics.source_errors = vec![format!("{e:#}")];
                return;
            }
        },
        _ => Cluster::default(),
    };
    let host = now
        .as_ref()
        .map(|(_, h)| h.clone())
        .unwrap_or_else(host_addresses);
    if apply_cluster(shared, src, cluster, host) {
        src.seen = now;
    }
}

/// What the maps of node `node` must hold: its own addresses are those of its interfaces
/// (`host`) and of its Node object.
pub fn compile_for_node(
    cluster: &Cluster,
    node: &str,
    host: &[IpAddr],
    opts: &crate::policy::Options,
    alloc: &mut Allocator,
) -> Desired {
    let mut addrs = host.to_vec();
    for n in &cluster.nodes {
        if n.name == node {
            addrs.extend(n.addresses.iter().copied());
        }
    }
    compile::compile(cluster, node, &addrs, opts, alloc)
}

/// Compiles `cluster` for this node and writes the differences to the maps. On failure what is
/// enforced stays as it is and `false` asks the caller to try again.
fn apply_cluster(
    shared: &Shared,
    src: &mut SourceState,
    cluster: Cluster,
    host: Vec<IpAddr>,
) -> bool {
    let t0 = Instant::now();
    let want = compile_for_node(
        &cluster,
        &shared.opts.node_name,
        &host,
        &shared.opts.policy,
        &mut src.alloc,
    );
    debug!(compile = ?t0.elapsed(), "compiled");
    if src.applied.as_ref() != Some(&want) {
        let mut dp = shared.dp.lock().unwrap();
        // Diff against what this process wrote last; read the maps back only the first time.
        let res = match src.applied.as_ref() {
            Some(old) => dp.apply_diff(old, &want),
            None => dp.apply(&want),
        };
        match res {
            Ok((w, r)) => {
                if w + r > 0 {
                    // Connections take their verdicts again on their next packet.
                    if let Err(e) = dp.bump_policy_gen() {
                        warn!("policy generation: {e:#}");
                    }
                }
                info!(
                    written = w,
                    removed = r,
                    endpoints = want.endpoints.len(),
                    prefixes = want.ipcache.len(),
                    "datapath maps synced"
                );
                src.applied = Some(want);
            }
            Err(e) => {
                warn!("map sync: {e:#}");
                shared.state.lock().unwrap().metrics.map_sync_errors_total += 1;
                return false;
            }
        }
    }
    src.host = host;
    src.save();
    for err in &cluster.errors {
        warn!("cluster source: {err}");
    }
    let by_ip: HashMap<IpAddr, Arc<PodInfo>> = cluster
        .pod_by_ip()
        .into_iter()
        .map(|(ip, p)| (ip, p.clone()))
        .collect();
    let mut st = shared.state.lock().unwrap();
    // Series of pods that are gone go with them: cardinality follows the node's pods.
    {
        let present: std::collections::HashSet<(&str, &str)> = cluster
            .pods
            .iter()
            .map(|p| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        st.pod_traffic
            .retain(|(ns, name), _| present.contains(&(ns.as_str(), name.as_str())));
    }
    st.rules = src.alloc.rule_table();
    st.metrics.source_errors = cluster.errors.clone();
    st.by_ip = by_ip;
    let model = crate::snat::NetModel::resolve(
        &shared.opts.model,
        &cluster,
        &shared.opts.node_name,
        &interface_nets(&shared.opts.uplinks),
        src.host.clone(),
    );
    if model.model != st.model.model || model.detected != st.model.detected {
        info!(model = model.model.as_str(), why = ?model.detected, vnet = ?model.vnet_cidrs, "network model");
    }
    st.model = model;
    st.cluster = Arc::new(cluster);
    st.last_sync = Some(std::time::SystemTime::now());
    true
}

async fn source_task(shared: Arc<Shared>, mut source: SourceState) -> Result<()> {
    let mut tick = tokio::time::interval(shared.opts.source_poll);
    tick.tick().await;
    loop {
        tick.tick().await;
        reload_source(&shared, &mut source);
    }
}

/// How long a burst of API events (a rollout touches many pods at once) is gathered before the
/// maps are written: bounds the added latency of a single change.
const KUBE_DEBOUNCE: Duration = Duration::from_millis(5);

/// How long a starting daemon waits for the first complete lists before attaching to
/// interfaces; the maps pinned by an earlier run keep enforcing meanwhile.
const KUBE_INITIAL_WAIT: Duration = Duration::from_secs(5);

fn kube_sync(shared: &Shared, src: &mut SourceState, kube: &crate::k8s::Kube) -> bool {
    if !kube.all_synced() {
        kube.take_pending();
        return false;
    }
    let since = kube.take_pending();
    let t0 = Instant::now();
    let cluster = kube.caches.lock().unwrap().cluster();
    let t_cluster = t0.elapsed();
    let ok = apply_cluster(shared, src, cluster, host_addresses());
    debug!(cluster = ?t_cluster, total = ?t0.elapsed(), waited = ?since.map(|t| t.elapsed()), "kube sync");
    if ok {
        if let Some(t) = since {
            shared
                .state
                .lock()
                .unwrap()
                .metrics
                .sync_latency
                .observe(t.elapsed());
        }
        // Give the previous cluster's memory back to the system, not just to malloc.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            libc::malloc_trim(0);
        }
    }
    ok
}

async fn kube_task(
    shared: Arc<Shared>,
    mut src: SourceState,
    kube: Arc<crate::k8s::Kube>,
) -> Result<()> {
    let mut tick = tokio::time::interval(shared.opts.source_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = false;
    loop {
        tokio::select! {
            _ = kube.changed() => {
                tokio::time::sleep(KUBE_DEBOUNCE).await;
            }
            _ = tick.tick() => {
                // The node's own addresses come from its interfaces as well as its Node object.
                if !retry && host_addresses() == src.host {
                    if kube.all_synced() && kube.stale_since().is_none() && src.applied.is_some() {
                        shared.state.lock().unwrap().last_sync = Some(std::time::SystemTime::now());
                    }
                    continue;
                }
            }
        }
        retry = !kube_sync(&shared, &mut src, &kube) && kube.all_synced();
    }
}

async fn log_task(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Result<()> {
    let mut fd = crate::netlink::readable(logger)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
