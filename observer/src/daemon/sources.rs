//! Cluster sources (`dir:` YAML, the Kubernetes API): the cluster view compiled for this node
//! and written to the maps.
use super::*;

pub(super) type Fingerprint = (Vec<(PathBuf, std::time::SystemTime, u64)>, Vec<IpAddr>);

/// What the source task carries from one sync to the next.
#[derive(Default)]
pub(super) struct SourceState {
    alloc: Allocator,
    /// The compiled cluster, updated in place from one sync to the next.
    compiled: Option<Incremental>,
    /// The maps hold what `compiled` says: later syncs write only its changes. False until
    /// the first sync and after a failed write, when the maps are read back and rewritten.
    in_sync: bool,
    /// Numbers handed out when the rule table was last published.
    rules_len: usize,
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
    pub(super) fn load(state_dir: &std::path::Path) -> Self {
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

    pub(super) fn save(&mut self) {
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
pub(super) fn reload_source(shared: &Shared, src: &mut SourceState) {
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
    if apply_cluster(shared, src, cluster, host, &Hints::everything(), None) {
        src.seen = now;
    }
}

/// The addresses of node `node`: those of its interfaces (`host`) and of its Node object.
fn node_addresses(cluster: &Cluster, node: &str, host: &[IpAddr]) -> Vec<IpAddr> {
    let mut addrs = host.to_vec();
    for n in &cluster.nodes {
        if n.name == node {
            addrs.extend(n.addresses.iter().copied());
        }
    }
    addrs
}

/// What the maps of node `node` must hold, compiled whole.
pub fn compile_for_node(
    cluster: &Cluster,
    node: &str,
    host: &[IpAddr],
    opts: &crate::policy::Options,
    alloc: &mut Allocator,
) -> Desired {
    compile::compile(
        cluster,
        node,
        &node_addresses(cluster, node, host),
        opts,
        alloc,
    )
}

/// Brings the compiled cluster to `cluster` and writes what changed to the maps (all of it,
/// against what they hold, the first time and after a failure), then what the enricher reads.
/// `since`: when the oldest change in `cluster` arrived. On a failed write what is enforced
/// stays as it is and `false` asks the caller to try again.
pub(super) fn apply_cluster(
    shared: &Shared,
    src: &mut SourceState,
    cluster: Cluster,
    host: Vec<IpAddr>,
    hints: &Hints,
    since: Option<Instant>,
) -> bool {
    let t0 = Instant::now();
    let node = &shared.opts.node_name;
    let compiled = src
        .compiled
        .get_or_insert_with(|| Incremental::new(node, &shared.opts.policy));
    compiled.update_with(
        &cluster,
        hints,
        &node_addresses(&cluster, node, &host),
        &mut src.alloc,
    );
    let changes = compiled.take_changes();
    debug!(compile = ?t0.elapsed(), "compiled");
    let written = write_maps(shared, src, &changes);
    if written {
        if let Some(t) = since {
            let mut st = shared.state.lock().unwrap();
            st.metrics.sync_latency.observe(t.elapsed());
        }
    }
    src.host = host;
    src.save();
    for err in &cluster.errors {
        warn!("cluster source: {err}");
    }
    publish_cluster(shared, src, cluster);
    if written {
        shared.state.lock().unwrap().last_sync = Some(std::time::SystemTime::now());
    }
    written
}

/// Writes `changes` to the maps in a safe order, or everything the compiled state holds when
/// the maps are not known to hold the rest of it.
fn write_maps(shared: &Shared, src: &mut SourceState, changes: &incremental::Changes) -> bool {
    if src.in_sync && changes.is_empty() {
        return true;
    }
    let want = src.compiled.as_ref().expect("compiled").desired();
    let mut dp = shared.dp.lock().unwrap();
    let res = if src.in_sync {
        dp.write(&incremental::ordered_writes(changes, want))
    } else {
        dp.apply(want)
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
            src.in_sync = true;
            true
        }
        Err(e) => {
            warn!("map sync: {e:#}");
            src.in_sync = false;
            shared.state.lock().unwrap().metrics.map_sync_errors_total += 1;
            false
        }
    }
}

/// What the enricher and the API read: the pod index follows the pods that changed, and
/// series of pods that are gone go with them (cardinality follows the node's pods).
fn publish_cluster(shared: &Shared, src: &mut SourceState, cluster: Cluster) {
    let compiled = src.compiled.as_ref().expect("compiled");
    let mut st = shared.state.lock().unwrap();
    let touched = compiled.touched();
    for ip in &touched.ips {
        match compiled.pod_at(ip) {
            Some(p) => st.by_ip.insert(*ip, p.clone()),
            None => st.by_ip.remove(ip),
        };
    }
    for k in &touched.gone {
        st.pod_traffic.remove(k);
    }
    if src.alloc.len() != src.rules_len {
        st.rules = src.alloc.rule_table().into_iter().collect();
        src.rules_len = src.alloc.len();
    }
    st.metrics.source_errors = cluster.errors.clone();
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
    st.isolating.clear();
}

pub(super) async fn source_task(shared: Arc<Shared>, mut source: SourceState) -> Result<()> {
    let mut tick = tokio::time::interval(shared.opts.source_poll);
    tick.tick().await;
    loop {
        tick.tick().await;
        reload_source(&shared, &mut source);
    }
}

/// How long a burst of API events (a rollout touches many pods at once) is gathered before the
/// maps are written: bounds the added latency of a single change.
pub(super) const KUBE_DEBOUNCE: Duration = Duration::from_millis(5);

/// How long a starting daemon waits for the first complete lists before attaching to
/// interfaces; the maps pinned by an earlier run keep enforcing meanwhile.
pub(super) const KUBE_INITIAL_WAIT: Duration = Duration::from_secs(5);

pub(super) fn kube_sync(shared: &Shared, src: &mut SourceState, kube: &crate::k8s::Kube) -> bool {
    if !kube.all_synced() {
        kube.take_pending();
        return false;
    }
    let since = kube.take_pending();
    let t0 = Instant::now();
    let (cluster, hints) = {
        let mut c = kube.caches.lock().unwrap();
        (c.cluster(), c.take_changed())
    };
    let t_cluster = t0.elapsed();
    let ok = apply_cluster(shared, src, cluster, host_addresses(), &hints, since);
    debug!(cluster = ?t_cluster, total = ?t0.elapsed(), waited = ?since.map(|t| t.elapsed()), "kube sync");
    if ok {
        // Give the previous cluster's memory back to the system, not just to malloc.
        release_freed_memory();
    }
    ok
}

pub(super) async fn kube_task(
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
                    if kube.all_synced() && kube.stale_since().is_none() && src.in_sync {
                        shared.state.lock().unwrap().last_sync = Some(std::time::SystemTime::now());
                    }
                    continue;
                }
            }
        }
        retry = !kube_sync(&shared, &mut src, &kube) && kube.all_synced();
    }
}
