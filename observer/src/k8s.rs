//! Live cluster state from the Kubernetes API server: one watcher per resource kind, objects
//! converted on arrival into the small records the compiler needs, and a debounced sync that
//! writes only the differences to the maps.

/// One resource the daemon watches: RBAC must grant exactly these, with [`VERBS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watched {
    /// API group ("" for the core group).
    pub group: &'static str,
    pub version: &'static str,
    /// Plural resource name as RBAC spells it.
    pub resource: &'static str,
    pub kind: &'static str,
}

/// What the daemon reads from the API server, all cluster-wide: every pod (remote identities
/// need their labels), namespaces (namespaceSelector and the audit annotation), nodes (node
/// addresses and pod CIDRs), NetworkPolicies, and Services with their EndpointSlices (policy
/// judges a Service connection against its backend; records name the Service).
pub const WATCHED: &[Watched] = &[
    Watched {
        group: "",
        version: "v1",
        resource: "pods",
        kind: "Pod",
    },
    Watched {
        group: "",
        version: "v1",
        resource: "namespaces",
        kind: "Namespace",
    },
    Watched {
        group: "",
        version: "v1",
        resource: "nodes",
        kind: "Node",
    },
    Watched {
        group: "networking.k8s.io",
        version: "v1",
        resource: "networkpolicies",
        kind: "NetworkPolicy",
    },
    Watched {
        group: "",
        version: "v1",
        resource: "services",
        kind: "Service",
    },
    Watched {
        group: "discovery.k8s.io",
        version: "v1",
        resource: "endpointslices",
        kind: "EndpointSlice",
    },
];

/// Verbs the daemon uses on each watched resource: `list` and `watch` by the watchers, `get` by
/// `observer policy matrix --kubeconfig` style one-shot reads.
pub const VERBS: &[&str] = &["get", "list", "watch"];

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use kube::{
    api::{Api, ListParams, WatchEvent, WatchParams},
    runtime::watcher,
    Client, Resource,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    cluster::{self, Cluster, EndpointSliceInfo, Named, NodeInfo, PodInfo, PodRef, ServiceInfo},
    policy::{incremental::Hints, model, Policy},
    trimmed::{EndpointSlice, Node, Pod, Service},
};

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// `None`: in-cluster credentials, then `$KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
}

impl Connection {
    pub async fn client(&self) -> Result<Client> {
        let config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                let opts = kube::config::KubeConfigOptions {
                    context: self.context.clone(),
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?
            }
            None if self.context.is_some() => {
                let opts = kube::config::KubeConfigOptions {
                    context: self.context.clone(),
                    ..Default::default()
                };
                kube::Config::from_kubeconfig(&opts)
                    .await
                    .context("loading kubeconfig")?
            }
            None => kube::Config::infer()
                .await
                .context("no in-cluster credentials and no usable kubeconfig")?,
        };
        Client::try_from(config).context("building the Kubernetes client")
    }
}

/// Namespace facts the compiler needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsInfo {
    pub labels: BTreeMap<String, String>,
    pub audit: bool,
}

/// (namespace or "" for cluster-scoped objects, name).
pub type ObjKey = crate::cluster::Key;

/// One kind's converted objects. Raw API objects are never kept: a 10,000-pod cluster would
/// cost hundreds of megabytes as `Pod`s and a few as [`PodInfo`]s.
#[derive(Debug)]
pub struct KindCache<V, S = BTreeMap<ObjKey, V>> {
    /// In key order: a sync takes them sorted without sorting.
    items: S,
    /// Objects that could not be converted, with the reason naming object and field.
    errors: HashMap<ObjKey, String>,
    /// A relist in progress: replaces `items` atomically when complete, so a relist never
    /// flushes what is enforced.
    relist: Option<(S, HashMap<ObjKey, String>)>,
    _v: std::marker::PhantomData<V>,
}

impl<V, S: Default> Default for KindCache<V, S> {
    fn default() -> Self {
        Self {
            items: S::default(),
            errors: HashMap::new(),
            relist: None,
            _v: std::marker::PhantomData,
        }
    }
}

impl<V: 'static, S: Store<V>> KindCache<V, S> {
    pub fn len(&self) -> usize {
        self.items.count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a kind's cache keeps its objects, in key order.
pub trait Store<V: 'static>: Default {
    fn get(&self, k: &ObjKey) -> Option<&V>;
    /// Adds or replaces the object of key `k` (and the stored key with it).
    fn put(&mut self, k: ObjKey, v: V);
    fn take(&mut self, k: &ObjKey);
    fn count(&self) -> usize;
    fn all(&self) -> impl Iterator<Item = &V>;
}

impl<V: 'static> Store<V> for BTreeMap<ObjKey, V> {
    fn get(&self, k: &ObjKey) -> Option<&V> {
        BTreeMap::get(self, k)
    }
    fn put(&mut self, k: ObjKey, v: V) {
        // Not `insert` alone: it would keep the old key.
        self.remove(&k);
        self.insert(k, v);
    }
    fn take(&mut self, k: &ObjKey) {
        self.remove(k);
    }
    fn count(&self) -> usize {
        self.len()
    }
    fn all(&self) -> impl Iterator<Item = &V> {
        self.values()
    }
}

/// The pods: a set of the shared pods, ordered by their own (namespace, name), so the cache
/// holds no key per pod (at 250,000 pods a map's keys and larger tree nodes cost about 15 MiB).
#[derive(Debug, Default)]
pub struct PodStore(BTreeSet<PodRef>);

impl Store<Arc<PodInfo>> for PodStore {
    fn get(&self, k: &ObjKey) -> Option<&Arc<PodInfo>> {
        self.0.get(k as &dyn Named).map(|p| &p.0)
    }
    fn put(&mut self, _: ObjKey, v: Arc<PodInfo>) {
        self.0.replace(PodRef(v));
    }
    fn take(&mut self, k: &ObjKey) {
        self.0.remove(k as &dyn Named);
    }
    fn count(&self) -> usize {
        self.0.len()
    }
    fn all(&self) -> impl Iterator<Item = &Arc<PodInfo>> {
        self.0.iter().map(|p| &p.0)
    }
}

/// Everything the watchers have seen.
#[derive(Default, Debug)]
pub struct Caches {
    pub pods: KindCache<Arc<PodInfo>, PodStore>,
    pub namespaces: KindCache<NsInfo>,
    pub nodes: KindCache<NodeInfo>,
    pub policies: KindCache<Arc<Policy>>,
    pub services: KindCache<ServiceInfo>,
    pub endpoint_slices: KindCache<EndpointSliceInfo>,
    /// The pods and policies changed since the last sync took them (everything at first and
    /// after a relist), so that the compiler compares only those.
    changed: Hints,
}

impl Caches {
    /// What changed since the last call: hands the compiler the keys to compare.
    pub fn take_changed(&mut self) -> Hints {
        std::mem::replace(
            &mut self.changed,
            Hints {
                pods: Some(BTreeSet::new()),
                policies: Some(BTreeSet::new()),
            },
        )
    }

    /// The cluster as the compiler takes it, in a stable order.
    pub fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for ((_, name), ns) in &self.namespaces.items {
            c.namespaces.insert(name.to_string(), ns.labels.clone());
            if ns.audit {
                c.audit_namespaces.insert(name.to_string());
            }
        }
        c.pods = self.pods.items.all().cloned().collect();
        c.nodes = self.nodes.items.values().cloned().collect();
        for p in self.policies.items.values() {
            for e in &p.errors {
                c.errors.push(format!("NetworkPolicy {}: {e}", p.id()));
            }
            c.policies.push(p.clone());
        }
        c.services = self.services.items.values().cloned().collect();
        c.endpoint_slices = self.endpoint_slices.items.values().cloned().collect();
        let mut errors: Vec<String> = [
            &self.pods.errors,
            &self.namespaces.errors,
            &self.nodes.errors,
            &self.policies.errors,
            &self.services.errors,
            &self.endpoint_slices.errors,
        ]
        .iter()
        .flat_map(|m| m.values().cloned())
        .collect();
        errors.sort();
        c.errors.extend(errors);
        c
    }
}

/// A watched kind: how its objects become cache entries.
pub trait Watch:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    type Info: Clone + Send + 'static;
    const KIND: &'static str;
    /// Index into [`WATCHED`] and the status table.
    const INDEX: usize;
    /// `Ok(None)`: the object exists but plays no part (a finished pod).
    fn info(&self) -> Result<Option<Self::Info>>;
    type Store: Store<Self::Info>;
    fn cache(c: &mut Caches) -> &mut KindCache<Self::Info, Self::Store>;
    /// Where the kind's changed keys are gathered for the compiler, if it is one it takes
    /// by key.
    fn changed(_: &mut Hints) -> Option<&mut Option<BTreeSet<ObjKey>>> {
        None
    }
    /// The converted object with what it can share with others shared.
    fn share(info: Self::Info, _: &Mutex<crate::cluster::Interner>) -> Self::Info {
        info
    }
}

impl Watch for Pod {
    type Info = Arc<PodInfo>;
    const KIND: &'static str = "Pod";
    const INDEX: usize = 0;
    fn info(&self) -> Result<Option<Arc<PodInfo>>> {
        // A finished pod's IP goes back to the pool and may already belong to a new pod.
        let phase = self.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return Ok(None);
        }
        cluster::pod_info(self).map(|p| Some(Arc::new(p)))
    }
    type Store = PodStore;
    fn cache(c: &mut Caches) -> &mut KindCache<Arc<PodInfo>, PodStore> {
        &mut c.pods
    }
    fn changed(h: &mut Hints) -> Option<&mut Option<BTreeSet<ObjKey>>> {
        Some(&mut h.pods)
    }
    fn share(info: Arc<PodInfo>, interner: &Mutex<crate::cluster::Interner>) -> Arc<PodInfo> {
        Arc::new(interner.lock().unwrap().pod(Arc::unwrap_or_clone(info)))
    }
}

impl Watch for Namespace {
    type Info = NsInfo;
    const KIND: &'static str = "Namespace";
    const INDEX: usize = 1;
    fn info(&self) -> Result<Option<NsInfo>> {
        let audit = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(model::AUDIT_ANNOTATION))
            .is_some_and(|v| v == "true");
        Ok(Some(NsInfo {
            labels: self.metadata.labels.clone().unwrap_or_default(),
            audit,
        }))
    }
    type Store = BTreeMap<ObjKey, NsInfo>;
    fn cache(c: &mut Caches) -> &mut KindCache<NsInfo> {
        &mut c.namespaces
    }
}

impl Watch for Node {
    type Info = NodeInfo;
    const KIND: &'static str = "Node";
    const INDEX: usize = 2;
    fn info(&self) -> Result<Option<NodeInfo>> {
        cluster::node_info(self).map(Some)
    }
    type Store = BTreeMap<ObjKey, NodeInfo>;
    fn cache(c: &mut Caches) -> &mut KindCache<NodeInfo> {
        &mut c.nodes
    }
}

impl Watch for NetworkPolicy {
    type Info = Arc<Policy>;
    const KIND: &'static str = "NetworkPolicy";
    const INDEX: usize = 3;
    fn info(&self) -> Result<Option<Arc<Policy>>> {
        // Invalid policies are kept: they isolate and allow nothing (fail closed).
        Ok(Some(Arc::new(model::compile(self))))
    }
    type Store = BTreeMap<ObjKey, Arc<Policy>>;
    fn cache(c: &mut Caches) -> &mut KindCache<Arc<Policy>> {
        &mut c.policies
    }
    fn changed(h: &mut Hints) -> Option<&mut Option<BTreeSet<ObjKey>>> {
        Some(&mut h.policies)
    }
}

impl Watch for Service {
    type Info = ServiceInfo;
    const KIND: &'static str = "Service";
    const INDEX: usize = 4;
    fn info(&self) -> Result<Option<ServiceInfo>> {
        cluster::service_info(self).map(Some)
    }
    type Store = BTreeMap<ObjKey, ServiceInfo>;
    fn cache(c: &mut Caches) -> &mut KindCache<ServiceInfo> {
        &mut c.services
    }
}

impl Watch for EndpointSlice {
    type Info = EndpointSliceInfo;
    const KIND: &'static str = "EndpointSlice";
    const INDEX: usize = 5;
    fn info(&self) -> Result<Option<EndpointSliceInfo>> {
        cluster::endpoint_slice_info(self).map(Some)
    }
    type Store = BTreeMap<ObjKey, EndpointSliceInfo>;
    fn cache(c: &mut Caches) -> &mut KindCache<EndpointSliceInfo> {
        &mut c.endpoint_slices
    }
}

fn key_of<K: Resource>(obj: &K) -> ObjKey {
    (
        obj.meta().namespace.as_deref().unwrap_or_default().into(),
        obj.meta().name.as_deref().unwrap_or_default().into(),
    )
}

fn describe(kind: &str, key: &ObjKey) -> String {
    if key.0.is_empty() {
        format!("{kind} {}", key.1)
    } else {
        format!("{kind} {}/{}", key.0, key.1)
    }
}

/// Health of one watched kind, for `observer status` and metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ResourceStatus {
    pub resource: String,
    /// The first complete list has arrived.
    pub synced: bool,
    /// The watch is up: its last outcome was an event, not an error.
    pub connected: bool,
    pub objects: usize,
    pub events: u64,
    /// Complete lists received (the first one, then one after every 410 Gone or reconnect that
    /// could not resume).
    pub lists: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    /// Since when the watch is down (RFC 3339); filled from `down_since` by [`Kube::status`].
    pub disconnected_since: Option<String>,
    #[serde(skip)]
    down_since: Option<SystemTime>,
}

/// Shared between the watchers and the sync loop.
pub struct Kube {
    pub caches: Mutex<Caches>,
    /// One copy of what pods repeat (labels, names, ports), for all the pods converted.
    interner: Mutex<crate::cluster::Interner>,
    status: Mutex<Vec<ResourceStatus>>,
    changed: Notify,
    /// When the oldest change not yet written to the maps arrived.
    pending_since: Mutex<Option<Instant>>,
}

impl Default for Kube {
    fn default() -> Self {
        Self {
            caches: Mutex::new(Caches::default()),
            interner: Mutex::default(),
            status: Mutex::new(
                WATCHED
                    .iter()
                    .map(|w| ResourceStatus {
                        resource: w.resource.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            changed: Notify::new(),
            pending_since: Mutex::new(None),
        }
    }
}

impl Kube {
    /// Starts one watcher per kind on the runtime; they run until the process ends.
    pub fn start(self: &Arc<Self>, client: Client) {
        tokio::spawn(run_watch::<Pod>(self.clone(), Api::all(client.clone())));
        tokio::spawn(run_watch::<Namespace>(
            self.clone(),
            Api::all(client.clone()),
        ));
        tokio::spawn(run_watch::<Node>(self.clone(), Api::all(client.clone())));
        tokio::spawn(run_watch::<NetworkPolicy>(
            self.clone(),
            Api::all(client.clone()),
        ));
        tokio::spawn(run_watch::<Service>(self.clone(), Api::all(client.clone())));
        tokio::spawn(run_watch::<EndpointSlice>(self.clone(), Api::all(client)));
    }

    /// Every kind has been listed completely at least once: before that, the cluster is partial
    /// and compiling it could loosen what the pinned maps enforce.
    pub fn all_synced(&self) -> bool {
        self.status.lock().unwrap().iter().all(|s| s.synced)
    }

    pub fn status(&self) -> Vec<ResourceStatus> {
        let mut v = self.status.lock().unwrap().clone();
        for s in &mut v {
            s.disconnected_since = s.down_since.map(crate::flows::rfc3339);
        }
        v
    }

    /// Since when some watch is down, if any is.
    pub fn stale_since(&self) -> Option<SystemTime> {
        self.status
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| s.down_since)
            .min()
    }

    /// Waits for a change; returns when the oldest unwritten change arrived.
    pub async fn changed(&self) -> Instant {
        loop {
            let notified = self.changed.notified();
            if let Some(t) = *self.pending_since.lock().unwrap() {
                return t;
            }
            notified.await;
        }
    }

    /// Takes the pending changes: call right before reading the caches for a sync.
    pub fn take_pending(&self) -> Option<Instant> {
        self.pending_since.lock().unwrap().take()
    }

    fn mark_changed(&self) {
        let mut p = self.pending_since.lock().unwrap();
        if p.is_none() {
            *p = Some(Instant::now());
        }
        drop(p);
        self.changed.notify_one();
    }

    fn on_event<K: Watch>(&self, ev: watcher::Event<K>) {
        let mut changed = false;
        {
            let mut caches = self.caches.lock().unwrap();
            match &ev {
                watcher::Event::Apply(obj) | watcher::Event::Delete(obj) => {
                    if let Some(Some(keys)) = K::changed(&mut caches.changed) {
                        keys.insert(key_of(obj));
                    }
                }
                // A relist may have changed anything.
                watcher::Event::InitDone => {
                    if let Some(keys) = K::changed(&mut caches.changed) {
                        *keys = None;
                    }
                }
                _ => {}
            }
            let cache = K::cache(&mut caches);
            match ev {
                watcher::Event::Init => {
                    cache.relist = Some((Default::default(), HashMap::new()));
                }
                watcher::Event::InitApply(obj) => {
                    let key = key_of(&obj);
                    let (items, errors) = cache
                        .relist
                        .get_or_insert_with(|| (Default::default(), HashMap::new()));
                    match obj.info().map(|i| i.map(|v| K::share(v, &self.interner))) {
                        Ok(Some(v)) => {
                            items.put(key, v);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            // Keep what was enforced for it; report the object and field.
                            if let Some(old) = cache.items.get(&key) {
                                items.put(key.clone(), old.clone());
                            }
                            errors
                                .insert(key.clone(), format!("{}: {e:#}", describe(K::KIND, &key)));
                        }
                    }
                }
                watcher::Event::InitDone => {
                    if let Some((items, errors)) = cache.relist.take() {
                        cache.items = items;
                        cache.errors = errors;
                    }
                    changed = true;
                }
                watcher::Event::Apply(obj) => {
                    let key = key_of(&obj);
                    match obj.info().map(|i| i.map(|v| K::share(v, &self.interner))) {
                        Ok(Some(v)) => {
                            cache.errors.remove(&key);
                            cache.items.put(key, v);
                        }
                        Ok(None) => {
                            cache.items.take(&key);
                            cache.errors.remove(&key);
                        }
                        Err(e) => {
                            cache
                                .errors
                                .insert(key.clone(), format!("{}: {e:#}", describe(K::KIND, &key)));
                        }
                    }
                    changed = true;
                }
                watcher::Event::Delete(obj) => {
                    let key = key_of(&obj);
                    cache.items.take(&key);
                    cache.errors.remove(&key);
                    changed = true;
                }
            }
            let n = cache.items.count();
            let mut st = self.status.lock().unwrap();
            let s = &mut st[K::INDEX];
            s.events += 1;
            s.objects = n;
            if changed && !s.synced {
                s.synced = true;
                info!(
                    resource = WATCHED[K::INDEX].resource,
                    objects = n,
                    "initial list complete"
                );
            }
            if changed && s.down_since.take().is_some() {
                info!(
                    resource = WATCHED[K::INDEX].resource,
                    "API server reachable again"
                );
            }
            if changed {
                s.connected = true;
            }
        }
        if changed {
            self.mark_changed();
        }
    }

    fn on_error(&self, index: usize, e: &str) {
        let mut st = self.status.lock().unwrap();
        let s = &mut st[index];
        s.errors += 1;
        s.connected = false;
        s.last_error = Some(e.to_string());
        if s.down_since.is_none() {
            s.down_since = Some(SystemTime::now());
            warn!(
                resource = WATCHED[index].resource,
                "{e}; keeping the last known state enforced and retrying"
            );
        }
    }

    /// A watch request was accepted: from here on the kind is current again.
    fn on_connected(&self, index: usize) {
        let mut st = self.status.lock().unwrap();
        let s = &mut st[index];
        if s.down_since.take().is_some() {
            info!(resource = WATCHED[index].resource, "watch up again");
        }
        s.connected = true;
    }
}

/// Server-side end of every watch request, so a silently dead connection is noticed.
const WATCH_TIMEOUT_S: u32 = 290;
const PAGE_SIZE: u32 = 500;

/// Retry delays after an error: doubling from 200 ms to at most 5 s, so a recovered API server
/// is back in use within seconds.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }
    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// Lists every object of the kind, page by page, into a relist buffer that replaces the cache
/// only when complete. Returns the list's resourceVersion to watch from.
async fn list_all<K: Watch>(kube: &Kube, api: &Api<K>) -> Result<String, kube::Error> {
    let mut lp = ListParams::default().limit(PAGE_SIZE);
    let mut rv = None;
    kube.on_event::<K>(watcher::Event::Init);
    loop {
        let page = api.list(&lp).await?;
        if rv.is_none() {
            rv = page.metadata.resource_version.clone();
        }
        for obj in page.items {
            kube.on_event(watcher::Event::InitApply(obj));
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    kube.status.lock().unwrap()[K::INDEX].lists += 1;
    kube.on_event::<K>(watcher::Event::InitDone);
    Ok(rv.unwrap_or_default())
}

/// List, then watch from the list's resourceVersion, resuming from the last version seen after
/// a timeout or a dropped connection, relisting only on 410 Gone. Our own loop rather than
/// kube-runtime's `watcher` because the status must know the moment a watch is up again, even
/// when no object changes.
async fn run_watch<K: Watch>(kube: Arc<Kube>, api: Api<K>) {
    let mut backoff = Backoff(Backoff::FIRST);
    'relist: loop {
        let mut rv = match list_all(&kube, &api).await {
            Ok(rv) => rv,
            Err(e) => {
                kube.on_error(K::INDEX, &format!("list: {e}"));
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        backoff.reset();
        loop {
            let mut wp = WatchParams::default().timeout(WATCH_TIMEOUT_S);
            wp.bookmarks = true;
            let stream = match api.watch(&wp, &rv).await {
                Ok(s) => s,
                Err(e) => {
                    kube.on_error(K::INDEX, &format!("watch: {e}"));
                    if is_gone(&e) {
                        continue 'relist;
                    }
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            };
            kube.on_connected(K::INDEX);
            backoff.reset();
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                        if let Some(v) = o.meta().resource_version.clone() {
                            rv = v;
                        }
                        kube.on_event(watcher::Event::Apply(o));
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        if let Some(v) = o.meta().resource_version.clone() {
                            rv = v;
                        }
                        kube.on_event(watcher::Event::Delete(o));
                    }
                    Ok(WatchEvent::Bookmark(b)) => rv = b.metadata.resource_version,
                    Ok(WatchEvent::Error(s)) if s.code == 410 => {
                        // The history we would resume from is gone: list again, keeping
                        // what is enforced until the new list is complete.
                        kube.on_error(
                            K::INDEX,
                            &format!("watch: {} (410 Gone); relisting", s.message),
                        );
                        continue 'relist;
                    }
                    Ok(WatchEvent::Error(s)) => {
                        kube.on_error(K::INDEX, &format!("watch: {} ({})", s.message, s.code));
                        tokio::time::sleep(backoff.next()).await;
                        break;
                    }
                    Err(e) => {
                        kube.on_error(K::INDEX, &format!("watch stream: {e}"));
                        tokio::time::sleep(backoff.next()).await;
                        break;
                    }
                }
            }
        }
    }
}

/// Lists every watched kind once: `observer policy matrix --kubeconfig`.
pub async fn snapshot(client: Client) -> Result<Cluster> {
    // The watchers' own list path, into caches nobody watches.
    let kube = Kube::default();
    async fn list<K: Watch>(kube: &Kube, client: &Client) -> Result<()> {
        list_all::<K>(kube, &Api::all(client.clone()))
            .await
            .with_context(|| format!("listing {}", WATCHED[K::INDEX].resource))?;
        Ok(())
    }
    list::<Namespace>(&kube, &client).await?;
    list::<Pod>(&kube, &client).await?;
    list::<Node>(&kube, &client).await?;
    list::<NetworkPolicy>(&kube, &client).await?;
    list::<Service>(&kube, &client).await?;
    list::<EndpointSlice>(&kube, &client).await?;
    let cluster = kube.caches.lock().unwrap().cluster();
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, phase: &str, ip: Option<&str>, app: &str) -> Pod {
        let mut status = json!({"phase": phase});
        if let Some(ip) = ip {
            status["podIP"] = json!(ip);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "x", "labels": {"app": app}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": status,
        }))
        .unwrap()
    }

    fn names(k: &Kube) -> Vec<String> {
        let c = k.caches.lock().unwrap().cluster();
        c.pods.iter().map(|p| p.name.to_string()).collect()
    }

    #[test]
    fn a_relist_replaces_the_cache_only_when_complete() {
        let k = Kube::default();
        k.on_event::<Pod>(watcher::Event::Init);
        k.on_event(watcher::Event::InitApply(pod(
            "a",
            "Running",
            Some("10.0.0.1"),
            "web",
        )));
        k.on_event(watcher::Event::InitApply(pod(
            "b",
            "Running",
            Some("10.0.0.2"),
            "web",
        )));
        assert!(names(&k).is_empty(), "nothing before InitDone");
        assert!(!k.status()[0].synced);
        k.on_event::<Pod>(watcher::Event::InitDone);
        assert_eq!(names(&k), ["a", "b"]);
        assert!(k.status()[0].synced);
        assert!(!k.all_synced(), "other kinds not listed yet");
        // A relist after 410 Gone: b is gone, c is new; until done, a and b stay enforced.
        k.on_event::<Pod>(watcher::Event::Init);
        k.on_event(watcher::Event::InitApply(pod(
            "a",
            "Running",
            Some("10.0.0.1"),
            "web",
        )));
        k.on_event(watcher::Event::InitApply(pod(
            "c",
            "Running",
            Some("10.0.0.3"),
            "web",
        )));
        assert_eq!(names(&k), ["a", "b"]);
        k.on_event::<Pod>(watcher::Event::InitDone);
        assert_eq!(names(&k), ["a", "c"]);
    }

    #[test]
    fn finished_pods_are_dropped_and_deletes_remove() {
        let k = Kube::default();
        k.on_event::<Pod>(watcher::Event::InitDone);
        k.on_event(watcher::Event::Apply(pod(
            "a",
            "Running",
            Some("10.0.0.1"),
            "web",
        )));
        k.on_event(watcher::Event::Apply(pod("p", "Pending", None, "web")));
        assert_eq!(names(&k), ["a", "p"]);
        k.on_event(watcher::Event::Apply(pod(
            "a",
            "Failed",
            Some("10.0.0.1"),
            "web",
        )));
        assert_eq!(names(&k), ["p"]);
        k.on_event(watcher::Event::Delete(pod("p", "Pending", None, "web")));
        assert!(names(&k).is_empty());
    }

    #[test]
    fn a_bad_update_keeps_the_enforced_object_and_names_the_field() {
        let k = Kube::default();
        k.on_event::<Pod>(watcher::Event::InitDone);
        k.on_event(watcher::Event::Apply(pod(
            "a",
            "Running",
            Some("10.0.0.1"),
            "web",
        )));
        k.on_event(watcher::Event::Apply(pod(
            "a",
            "Running",
            Some("not-an-ip"),
            "db",
        )));
        let c = k.caches.lock().unwrap().cluster();
        assert_eq!(c.pods.len(), 1);
        assert_eq!(c.pods[0].labels["app"], "web", "the last good state stays");
        assert!(
            c.errors
                .iter()
                .any(|e| e.contains("Pod x/a") && e.contains("status.podIP")),
            "{:?}",
            c.errors
        );
    }

    #[test]
    fn errors_mark_the_kind_stale_until_it_is_up_again() {
        let k = Kube::default();
        assert!(k.stale_since().is_none());
        k.on_error(0, "watch: connection refused");
        let since = k.stale_since().expect("stale");
        k.on_error(0, "watch: connection refused");
        assert_eq!(k.stale_since(), Some(since), "stale since the first error");
        assert_eq!(k.status()[0].errors, 2);
        assert!(!k.status()[0].connected);
        k.on_connected(0);
        assert!(k.stale_since().is_none());
        assert!(k.status()[0].connected);
    }
}
