//! `observer daemon`: loads the datapath, follows interfaces and the cluster source, turns
//! kernel events into flow records and serves them. The flow pipeline, one module per stage:
//! `intake` (kernel events) -> `enrich` (pods, Services, the policies behind a verdict) ->
//! `snat_join` (the kernel's conntrack, for the wire's source) -> `publish` (history, live
//! stream, metrics counts). Around it: `links` (interfaces), `sources` (the cluster view into
//! the maps), `closes` (a TCP close's record after its grace), `gc` (the conntrack sweep),
//! `conns` (per-connection state, pruned by the sweep), `metrics`. This file: options, shared
//! state, `run`.
mod closes;
mod conns;
mod enrich;
mod gc;
mod intake;
mod links;
mod metrics;
mod publish;
mod snat_join;
mod sources;

pub use links::{host_addresses, interface_nets};
pub use metrics::*;
pub use sources::{compile_for_node, ALLOCATOR_FILE};

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use {closes::*, gc::*, intake::*, links::*, snat_join::*, sources::*};

use anyhow::{bail, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use observer_common::{
    config_flags, ct_flags, Config, CtEntry, CtKey, EventKind, FlowEvent, IPPROTO_TCP,
};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::{
    bpf::Datapath,
    cluster::{self, Cluster, PodInfo},
    flows::{self, FlowRecord},
    netlink::{self, LinkEvent, LinkMonitor},
    policy::{
        compile::{self, Allocator, Desired, RuleRef},
        incremental::{self, Hints, Incremental},
    },
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
    pub node_name: std::sync::Arc<str>,
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
    /// Attach the uplink programs (tc both ways, XDP on ingress as `uplink_xdp` says) to the
    /// uplinks.
    pub uplink_programs: bool,
    pub uplink_xdp: crate::bpf::UplinkXdp,
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
    /// Deliver packets between two local pods of connections nothing translates straight
    /// into the destination pod (`config_flags::LOCAL_REDIRECT`).
    pub local_redirect: bool,
    /// Deliver packets between a local pod on a routed veth and a pod of another node, of
    /// connections nothing translates, past the node's stack both ways
    /// (`config_flags::REMOTE_REDIRECT`).
    pub remote_redirect: bool,
    pub policy: crate::policy::Options,
    pub flow_log: Option<crate::flowlog::Config>,
    /// Node-wide budget of flow records per second (0: unlimited).
    pub max_records_per_second: u64,
    /// `Config::drop_events_per_cpu_s`.
    pub drop_events_per_cpu_second: u32,
    /// The remote API listener: address and certificate files (mutual TLS).
    pub remote: Option<(std::net::SocketAddr, crate::tls::Files)>,
    /// Per-pod bytes and packets metrics, for at most `pod_metrics_max` local pods.
    pub pod_metrics: bool,
    pub pod_metrics_max: usize,
}

pub struct State {
    pub cluster: Arc<Cluster>,
    /// Fast hashers here and below: each record looks its ends up, counts and names them.
    pub by_ip: foldhash::HashMap<IpAddr, Arc<PodInfo>>,
    conns: conns::Conns,
    /// TCP closes waiting for `close_grace`, oldest first.
    closing: CloseQueue,
    /// When the last read of the kernel's event ring that emptied it began: every event the
    /// kernel queued before then has been handled.
    ring_read_through: Instant,
    /// Closes in `closing` adopted from the kernel's table at start (see `adopt_closing`).
    adopted: foldhash::HashSet<CtKey>,
    /// The policies isolating a pod (by address) in a direction (true: ingress), as drop
    /// records name them: worked out once per pod and cluster, not per dropped packet.
    isolating: foldhash::HashMap<(IpAddr, bool), enrich::Isolating>,
    /// Closed connections without a close event whose close the sweep published (see
    /// `gc::unsent_close`), by key and first packet, until the sweep removes them.
    late_closes: foldhash::HashSet<(CtKey, u64)>,
    pub history: VecDeque<Arc<FlowRecord>>,
    pub metrics: Metrics,
    pub last_sync: Option<std::time::SystemTime>,
    pub interfaces: HashMap<u32, String>,
    /// The node's uplinks with programs attached: ifindex -> (name, XDP mode).
    pub uplinks: HashMap<u32, (String, &'static str)>,
    /// Rule id -> the policy rule it stands for.
    pub rules: foldhash::HashMap<u32, RuleRef>,
    /// (namespace, pod) of local pods -> [egress packets, egress bytes, ingress packets,
    /// ingress bytes] of forwarded traffic.
    pub pod_traffic: foldhash::HashMap<crate::cluster::Key, [u64; 4]>,
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
    /// Connections in the kernel's table at the last sweep, which reads it anyway: the metrics
    /// report this rather than reading a full table (a quarter of a million entries, 0.1 s of
    /// CPU with the datapath lock held) at every scrape.
    pub conntrack_swept: std::sync::atomic::AtomicUsize,
    /// Of those, IPv6 connections (their own table).
    pub conntrack_swept_v6: std::sync::atomic::AtomicUsize,
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
    let (dp, ring, logger, features) = load_datapath(&opts)?;

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
        state: Mutex::new(State::new(&opts)),
        tx,
        started: std::time::SystemTime::now(),
        kernel_features: features.summary(),
        conntrack_swept: Default::default(),
        conntrack_swept_v6: Default::default(),
    });

    // Cluster state before interfaces, so the first flows are already classified.
    let source = initial_sync(&shared).await;

    let (monitor, links) = LinkMonitor::start().context("subscribing to link events")?;
    adopt_links(&shared, &links);
    // Loading parsed the kernel's BTF three times (features, attach mode, loader) and the
    // object; all of it is freed by now but stays in malloc's heap (about 17 MiB of RSS
    // with no cluster), since a freed multi-MiB buffer raises glibc's trim threshold.
    release_freed_memory();

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(events_task(shared.clone(), ring));
    tasks.spawn(links_task(shared.clone(), monitor));
    tasks.spawn(gc_task(shared.clone()));
    tasks.spawn(closes_task(shared.clone()));
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

/// Hands memory malloc holds but nothing uses back to the system (glibc only).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The kernel programs loaded (or their pins re-adopted) and configured, with the event ring
/// and the kernel log.
fn load_datapath(
    opts: &Options,
) -> Result<(
    Datapath,
    aya::maps::RingBuf<MapData>,
    Option<KernelLogger>,
    crate::features::Features,
)> {
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
    // And whether a routed pod veth was seen: delivery past the stack goes on while the links
    // are attached again.
    let (policy_gen, routed) = dp
        .config()
        .map(|c| (c.policy_gen, c.flags & config_flags::ROUTED_PODS))
        .unwrap_or((0, 0));
    dp.set_config(Config {
        report_interval_ns: opts.report_interval.as_nanos() as u64,
        policy_gen,
        enforce: u32::from(opts.enforce),
        flags: {
            use config_flags::{ALLOW_NODE, LOCAL_REDIRECT, REMOTE_REDIRECT};
            let flag = |on: bool, f: u32| if on { f } else { 0 };
            routed
                | flag(!opts.policy.deny_from_node, ALLOW_NODE)
                | flag(opts.local_redirect, LOCAL_REDIRECT)
                | flag(opts.remote_redirect, REMOTE_REDIRECT)
        },
        drop_events_per_cpu_s: opts.drop_events_per_cpu_second,
    })?;
    let ring = dp.take_events()?;
    let logger = match aya_log::EbpfLogger::init(&mut dp.ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("kernel log forwarding unavailable: {e}");
            None
        }
    };

    Ok((dp, ring, logger, features))
}

impl State {
    fn new(opts: &Options) -> State {
        State {
            cluster: Arc::new(Cluster::default()),
            by_ip: Default::default(),
            conns: Default::default(),
            closing: CloseQueue::default(),
            ring_read_through: Instant::now(),
            adopted: Default::default(),
            isolating: Default::default(),
            late_closes: Default::default(),
            history: VecDeque::new(),
            metrics: Metrics::default(),
            last_sync: None,
            interfaces: HashMap::new(),
            uplinks: HashMap::new(),
            rules: Default::default(),
            pod_traffic: Default::default(),
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
        }
    }
}

/// The cluster source read and written to the maps once (from the API server, what it has
/// listed within `KUBE_INITIAL_WAIT`).
async fn initial_sync(shared: &Arc<Shared>) -> SourceState {
    let mut source = SourceState::load(&shared.opts.state_dir);
    match (&shared.opts.source, &shared.kube) {
        (Source::Kube(_), Some(kube)) => {
            let t0 = Instant::now();
            while !kube.all_synced() && t0.elapsed() < KUBE_INITIAL_WAIT {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if kube_sync(shared, &mut source, kube) {
                info!(elapsed = ?t0.elapsed(), "initial sync from the API server written");
            } else {
                warn!("API server not synced yet; the maps keep what they enforce until it is");
            }
        }
        _ => reload_source(shared, &mut source),
    }
    source
}

/// Every interface attached as it is now; what an earlier daemon left for interfaces that are
/// gone released.
fn adopt_links(shared: &Arc<Shared>, links: &[crate::netlink::Link]) {
    let mut dp = shared.dp.lock().unwrap();
    for l in links {
        apply_link(shared, &mut dp, LinkEvent::New(l.clone()));
    }
    // Attachments and entries left by an earlier daemon for interfaces that are gone.
    for pin in dp.prune_link_pins() {
        info!(pin = %pin.display(), "released the attachment of a vanished interface");
    }
    let live: Vec<u32> = dp.attached();
    retain_ifindexes(&mut dp, observer_common::maps::ATTACHED, &live);
    let uplinks: Vec<u32> = dp.uplinks().into_iter().map(|(i, _)| i).collect();
    retain_ifindexes(&mut dp, observer_common::maps::UPLINKS, &uplinks);
}

/// Removes the entries of an ifindex-keyed map other than `live`.
fn retain_ifindexes(dp: &mut Datapath, map: &str, live: &[u32]) {
    if let Some(m) = dp.ebpf.map_mut(map) {
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

async fn log_task(logger: KernelLogger) -> Result<()> {
    let mut fd = crate::netlink::readable(logger)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
