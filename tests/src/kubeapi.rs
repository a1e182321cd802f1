//! An in-process fake Kubernetes API server for tests.
//!
//! It speaks enough of the real list/watch HTTP protocol for kube-rs clients (`Api::list`,
//! `Api::get`, `kube::runtime::watcher`) to run against it over plain `http://`:
//!
//! - one global, monotonically increasing resourceVersion (RV); every stored object carries
//!   `metadata.resourceVersion`, `metadata.uid` and `metadata.creationTimestamp`;
//! - paginated lists (`limit`, `continue`), answered with `Content-Length`;
//! - watches (`watch=true`) answered with `Transfer-Encoding: chunked`, one JSON event per line
//!   per chunk, replayed from a per-kind event history and then live; `allowWatchBookmarks`,
//!   `timeoutSeconds`, `sendInitialEvents` (streaming lists) and `410 Expired` once the history
//!   has been forgotten ([`FakeApi::expire_history`]);
//! - fault injection: [`FakeApi::drop_watches`], [`FakeApi::set_unavailable`].
//!
//! Query parameters: `limit`, `continue`, `resourceVersion` and `resourceVersionMatch`
//! (`NotOlderThan`, `Exact`) on lists; `watch`, `resourceVersion`, `timeoutSeconds`,
//! `allowWatchBookmarks`, `sendInitialEvents` and `resourceVersionMatch` on watches;
//! `labelSelector` and `fieldSelector` are accepted and ignored. Paths are also served for a
//! single object (`GET .../pods/NAME`).
//!
//! Served resources: Namespaces, Pods, Nodes, NetworkPolicies, Services and EndpointSlices, cluster-wide and (for the
//! namespaced kinds) per namespace.
//!
//! Built on std only: one thread accepts, one thread serves each connection (HTTP/1.1 with
//! keep-alive). Everything stays on 127.0.0.1.
use std::{
    collections::{BTreeMap, HashMap},
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    ops::Bound,
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Map, Value};

/// A resource type the fake server knows how to serve.
#[derive(Debug)]
struct KindInfo {
    kind: &'static str,
    plural: &'static str,
    api_version: &'static str,
    /// Path prefix of the group version, e.g. `/api/v1`.
    prefix: &'static str,
    namespaced: bool,
}

const KINDS: &[KindInfo] = &[
    KindInfo {
        kind: "Namespace",
        plural: "namespaces",
        api_version: "v1",
        prefix: "/api/v1",
        namespaced: false,
    },
    KindInfo {
        kind: "Pod",
        plural: "pods",
        api_version: "v1",
        prefix: "/api/v1",
        namespaced: true,
    },
    KindInfo {
        kind: "Node",
        plural: "nodes",
        api_version: "v1",
        prefix: "/api/v1",
        namespaced: false,
    },
    KindInfo {
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        api_version: "networking.k8s.io/v1",
        prefix: "/apis/networking.k8s.io/v1",
        namespaced: true,
    },
    KindInfo {
        kind: "Service",
        plural: "services",
        api_version: "v1",
        prefix: "/api/v1",
        namespaced: true,
    },
    KindInfo {
        kind: "EndpointSlice",
        plural: "endpointslices",
        api_version: "discovery.k8s.io/v1",
        prefix: "/apis/discovery.k8s.io/v1",
        namespaced: true,
    },
];

fn kind_info(kind: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.kind == kind)
}

/// (kind, namespace or "", name)
type Key = (String, String, String);

/// One entry of the event history: the serialized watch event line (no newline).
struct HistEvent {
    rv: u64,
    kind: String,
    namespace: String,
    line: Arc<str>,
}

struct State {
    rv: u64,
    uids: u64,
    objects: BTreeMap<Key, Value>,
    /// Events sorted by RV; everything after `history_start` is here.
    history: Vec<HistEvent>,
    /// Watches from an RV below this one get 410 Expired.
    history_start: u64,
    expire_gen: u64,
    drop_gen: u64,
    bookmark_gen: u64,
    down: bool,
    closed: bool,
    /// Open watch streams: connection id -> kind.
    watches: HashMap<u64, &'static str>,
    /// Open connections (clones, for shutting them down from outside).
    conns: HashMap<u64, TcpStream>,
    next_conn: u64,
    /// Connections accepted and served (not those refused while down).
    accepted: usize,
    requests: Vec<String>,
}

struct Inner {
    state: Mutex<State>,
    /// Signalled on every state change watches or waiters may care about.
    cond: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    uid_tag: u32,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        dur: Duration,
    ) -> MutexGuard<'a, State> {
        match self.cond.wait_timeout(guard, dur) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        }
    }
}

/// The fake API server. Stops serving when dropped.
pub struct FakeApi {
    inner: Arc<Inner>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Listens on 127.0.0.1:0 in the current network namespace.
    pub fn start() -> Result<FakeApi> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fake API server")?;
        Self::serve(listener)
    }

    /// Listens on 127.0.0.1:0 inside network namespace `ns` (`/run/netns/<ns>`). Only the
    /// listener is created there; connections it accepts stay in that namespace while being
    /// served from ordinary threads.
    pub fn start_in_netns(ns: &str) -> Result<FakeApi> {
        let listener = crate::in_netns(ns, || TcpListener::bind("127.0.0.1:0"))?
            .with_context(|| format!("binding the fake API server in netns {ns}"))?;
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> Result<FakeApi> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 0,
                uids: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                history_start: 0,
                expire_gen: 0,
                drop_gen: 0,
                bookmark_gen: 0,
                down: false,
                closed: false,
                watches: HashMap::new(),
                conns: HashMap::new(),
                next_conn: 0,
                accepted: 0,
                requests: Vec::new(),
            }),
            cond: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            uid_tag: std::process::id() ^ (u32::from(addr.port()) << 16),
        });
        let inner2 = inner.clone();
        let accept = std::thread::Builder::new()
            .name("fakeapi-accept".into())
            .spawn(move || accept_loop(inner2, listener))?;
        Ok(FakeApi {
            inner,
            addr,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose only context, `fake` (also the current context), points at
    /// this server with a dummy bearer token.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        self.write_kubeconfig_contexts(path, &["fake"])
    }

    /// Writes a kubeconfig with one context (and cluster and user) per name: the first points at
    /// this server and is the current context, the others at a closed port on 127.0.0.1.
    pub fn write_kubeconfig_contexts(&self, path: &Path, contexts: &[&str]) -> Result<()> {
        anyhow::ensure!(!contexts.is_empty(), "at least one context is needed");
        let closed = if contexts.len() > 1 {
            closed_port()?
        } else {
            0
        };
        let mut y = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
        for (i, c) in contexts.iter().enumerate() {
            let server = if i == 0 {
                self.url()
            } else {
                format!("http://127.0.0.1:{closed}")
            };
            y += &format!("- name: {c:?}\n  cluster:\n    server: {server:?}\n");
        }
        y += "contexts:\n";
        for c in contexts {
            y += &format!(
                "- name: {c:?}\n  context:\n    cluster: {c:?}\n    user: {c:?}\n    namespace: default\n"
            );
        }
        y += "users:\n";
        for c in contexts {
            y += &format!("- name: {c:?}\n  user:\n    token: \"fake-token-{c}\"\n");
        }
        y += &format!("current-context: {:?}\npreferences: {{}}\n", contexts[0]);
        std::fs::write(path, y).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates or replaces an object (JSON with `kind`, `metadata.name`, and for namespaced
    /// kinds `metadata.namespace`, defaulting to `default`; `apiVersion` is filled in for known
    /// kinds). Emits ADDED or MODIFIED and returns the object's new RV. A replaced object keeps
    /// its uid and creation timestamp.
    ///
    /// Panics if `kind` or `metadata.name` is missing.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let kind = obj["kind"]
            .as_str()
            .expect("FakeApi::apply: object without kind")
            .to_string();
        let info = kind_info(&kind);
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if let Some(info) = info {
            if obj["apiVersion"].as_str().is_none() {
                obj["apiVersion"] = json!(info.api_version);
            }
        }
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("FakeApi::apply: object without metadata.name")
            .to_string();
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        let namespace = match info {
            Some(i) if i.namespaced => {
                let ns = meta
                    .get("namespace")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .unwrap_or("default")
                    .to_string();
                meta.insert("namespace".into(), json!(ns));
                ns
            }
            Some(_) => {
                meta.remove("namespace");
                String::new()
            }
            None => meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        };
        let key = (kind.clone(), namespace.clone(), name);

        let mut st = self.inner.lock();
        st.rv += 1;
        let rv = st.rv;
        let old = st.objects.get(&key).map(|o| o["metadata"].clone());
        let etype = if old.is_some() { "MODIFIED" } else { "ADDED" };
        let uid = match old.as_ref().and_then(|m| m["uid"].as_str()) {
            Some(u) => u.to_string(),
            None => {
                st.uids += 1;
                format!("{:08x}-fa4e-4a91-8000-{:012x}", self.inner.uid_tag, st.uids)
            }
        };
        let created = old
            .as_ref()
            .and_then(|m| m["creationTimestamp"].as_str())
            .map(str::to_string)
            .unwrap_or_else(now_rfc3339);
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        if !meta.get("uid").is_some_and(Value::is_string) {
            meta.insert("uid".into(), json!(uid));
        }
        if !meta.get("creationTimestamp").is_some_and(Value::is_string) {
            meta.insert("creationTimestamp".into(), json!(created));
        }
        record(&mut st, rv, &kind, &namespace, etype, &obj);
        st.objects.insert(key, obj);
        drop(st);
        self.inner.cond.notify_all();
        rv
    }

    /// Deletes an object, emitting DELETED with its last state under a fresh RV. Returns
    /// whether it existed.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let key = self.key(kind, namespace, name);
        let mut st = self.inner.lock();
        let Some(mut obj) = st.objects.remove(&key) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        record(&mut st, rv, kind, &key.1, "DELETED", &obj);
        drop(st);
        self.inner.cond.notify_all();
        true
    }

    /// The current state of an object, if it exists.
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let key = self.key(kind, namespace, name);
        self.inner.lock().objects.get(&key).cloned()
    }

    /// All current objects of a kind (and namespace, if given), sorted by namespace and name.
    pub fn objects(&self, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        let st = self.inner.lock();
        objects_of(&st, kind, namespace).cloned().collect()
    }

    fn key(&self, kind: &str, namespace: Option<&str>, name: &str) -> Key {
        let ns = match kind_info(kind) {
            Some(i) if !i.namespaced => "",
            Some(_) => namespace.unwrap_or("default"),
            None => namespace.unwrap_or(""),
        };
        (kind.to_string(), ns.to_string(), name.to_string())
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }

    /// Forgets the event history: every open watch gets a `410 Expired` ERROR event and ends,
    /// and every later watch from an RV below the current one gets the same (forcing a relist).
    pub fn expire_history(&self) {
        let mut st = self.inner.lock();
        st.history.clear();
        st.history_start = st.rv;
        st.expire_gen += 1;
        let ids: Vec<u64> = st.watches.keys().copied().collect();
        drop(st);
        self.inner.cond.notify_all();
        self.wait_watches_gone(&ids);
    }

    /// Abruptly closes every open watch connection: TCP shutdown in the middle of the chunked
    /// stream, without the terminating chunk.
    pub fn drop_watches(&self) {
        let mut st = self.inner.lock();
        st.drop_gen += 1;
        let ids: Vec<u64> = st.watches.keys().copied().collect();
        for id in &ids {
            if let Some(c) = st.conns.get(id) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        drop(st);
        self.inner.cond.notify_all();
        self.wait_watches_gone(&ids);
    }

    /// While `down`, every connection (open ones included) is closed and new connections are
    /// accepted and immediately closed, as if the API server were unreachable; `false`
    /// restores service.
    pub fn set_unavailable(&self, down: bool) {
        let mut st = self.inner.lock();
        st.down = down;
        let ids: Vec<u64> = st.watches.keys().copied().collect();
        if down {
            for c in st.conns.values() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        drop(st);
        self.inner.cond.notify_all();
        if down {
            self.wait_watches_gone(&ids);
        }
    }

    /// Sends a BOOKMARK with the current RV to every open watch that allowed bookmarks.
    pub fn bookmark(&self) {
        self.inner.lock().bookmark_gen += 1;
        self.inner.cond.notify_all();
    }

    /// Number of currently open watch streams.
    pub fn open_watches(&self) -> usize {
        self.inner.lock().watches.len()
    }

    /// Number of currently open watch streams of one kind, e.g. `"Pod"`.
    pub fn open_watches_of(&self, kind: &str) -> usize {
        self.inner
            .lock()
            .watches
            .values()
            .filter(|k| **k == kind)
            .count()
    }

    /// Waits until at least `n` watch streams are open; false on timeout.
    pub fn wait_for_watches(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.lock();
        loop {
            if st.watches.len() >= n {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.inner.wait_timeout(st, deadline - now);
        }
    }

    /// Number of TCP connections accepted and served so far (keep-alive reuses them).
    pub fn connections(&self) -> usize {
        self.inner.lock().accepted
    }

    /// Every request served, as `METHOD TARGET`, in order. The target is as sent: kube-rs 5
    /// starts its query with `?&`, e.g. `GET /api/v1/pods?&limit=500` for the watcher's first
    /// list and `GET /api/v1/pods?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=12`
    /// for its watches.
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().requests.clone()
    }

    /// Waits (up to 2 s) until the given watch streams have ended.
    fn wait_watches_gone(&self, ids: &[u64]) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut st = self.inner.lock();
        while ids.iter().any(|id| st.watches.contains_key(id)) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self.inner.wait_timeout(st, deadline - now);
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        {
            let mut st = self.inner.lock();
            st.closed = true;
            for c in st.conns.values() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        self.inner.cond.notify_all();
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        // Connection threads end as soon as they notice; leave behind any that do not.
        let handles =
            std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = Instant::now() + Duration::from_secs(2);
        for h in handles {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// Appends an event to the history.
fn record(st: &mut State, rv: u64, kind: &str, namespace: &str, etype: &str, obj: &Value) {
    let line = event_line(etype, obj);
    st.history.push(HistEvent {
        rv,
        kind: kind.to_string(),
        namespace: namespace.to_string(),
        line: line.into(),
    });
}

fn objects_of<'a>(
    st: &'a State,
    kind: &'a str,
    namespace: Option<&'a str>,
) -> impl Iterator<Item = &'a Value> + 'a {
    st.objects
        .range((kind.to_string(), String::new(), String::new())..)
        .take_while(move |(k, _)| k.0 == kind)
        .filter(move |(k, _)| namespace.is_none_or(|ns| k.1 == ns))
        .map(|(_, v)| v)
}

/// A port on 127.0.0.1 nothing listens on (bound, then released).
fn closed_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        if inner.lock().closed {
            return;
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => continue,
        };
        let mut st = inner.lock();
        if st.closed {
            return;
        }
        if st.down {
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        let (Ok(()), Ok(clone)) = (stream.set_nonblocking(false), stream.try_clone()) else {
            continue;
        };
        let id = st.next_conn;
        st.next_conn += 1;
        st.accepted += 1;
        st.conns.insert(id, clone);
        drop(st);
        let inner2 = inner.clone();
        let spawned = std::thread::Builder::new()
            .name("fakeapi-conn".into())
            .spawn(move || serve_conn(inner2, id, stream));
        match spawned {
            Ok(h) => {
                let mut threads = inner.threads.lock().unwrap_or_else(|e| e.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.push(h);
            }
            Err(_) => {
                if let Some(c) = inner.lock().conns.remove(&id) {
                    let _ = c.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

struct Request {
    method: String,
    target: String,
    close: bool,
}

/// Reads one request head (and discards any body). `None` at end of stream.
fn read_request(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let version = parts.next().unwrap_or("HTTP/1.0");
    let mut close = version == "HTTP/1.0";
    let mut body = 0u64;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((k, v)) = h.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            body = v.parse().unwrap_or(0);
        } else if k.eq_ignore_ascii_case("connection") {
            if v.eq_ignore_ascii_case("close") {
                close = true;
            } else if v.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            // Request bodies are never chunked for the GETs served here.
            return Ok(None);
        }
    }
    io::copy(&mut r.by_ref().take(body), &mut io::sink())?;
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        close,
    }))
}

fn serve_conn(inner: Arc<Inner>, id: u64, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    if let Ok(read_half) = stream.try_clone() {
        let mut reader = BufReader::new(read_half);
        let mut out = stream;
        while let Ok(Some(req)) = read_request(&mut reader) {
            {
                let mut st = inner.lock();
                if st.closed || st.down {
                    break;
                }
                st.requests.push(format!("{} {}", req.method, req.target));
            }
            match handle(&inner, id, &mut out, &req) {
                Ok(true) if !req.close => {}
                _ => break,
            }
        }
        let _ = out.shutdown(Shutdown::Both);
    }
    inner.lock().conns.remove(&id);
    inner.cond.notify_all();
}

/// Decoded query parameters, in order.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Query {
        Query(
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> Option<bool> {
        self.get(name).map(|v| v == "true" || v == "1")
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

enum Route {
    Collection {
        res: &'static KindInfo,
        ns: Option<String>,
    },
    Object {
        res: &'static KindInfo,
        ns: Option<String>,
        name: String,
    },
}

fn route(path: &str) -> Option<Route> {
    for res in KINDS {
        let Some(rest) = path.strip_prefix(res.prefix) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('/') else {
            continue;
        };
        let segs: Vec<String> = rest
            .trim_end_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        if segs.iter().any(String::is_empty) {
            continue;
        }
        let s: Vec<&str> = segs.iter().map(String::as_str).collect();
        let r = match s.as_slice() {
            [p] if *p == res.plural => Route::Collection { res, ns: None },
            [p, name] if *p == res.plural && !res.namespaced => Route::Object {
                res,
                ns: None,
                name: name.to_string(),
            },
            ["namespaces", ns, p] if *p == res.plural && res.namespaced => Route::Collection {
                res,
                ns: Some(ns.to_string()),
            },
            ["namespaces", ns, p, name] if *p == res.plural && res.namespaced => Route::Object {
                res,
                ns: Some(ns.to_string()),
                name: name.to_string(),
            },
            _ => continue,
        };
        return Some(r);
    }
    None
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        422 => "Unprocessable Entity",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn write_json(out: &mut TcpStream, code: u16, body: &Value) -> io::Result<bool> {
    let body = body.to_string();
    let mut buf = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\nContent-Length: {}\r\n\r\n",
        reason_phrase(code),
        body.len()
    )
    .into_bytes();
    buf.extend_from_slice(body.as_bytes());
    out.write_all(&buf)?;
    out.flush()?;
    Ok(true)
}

fn write_status(out: &mut TcpStream, code: u16, reason: &str, message: &str) -> io::Result<bool> {
    write_json(out, code, &status(code, reason, message))
}

fn handle(inner: &Inner, id: u64, out: &mut TcpStream, req: &Request) -> io::Result<bool> {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let q = Query::parse(query);
    if req.method != "GET" {
        return write_status(
            out,
            405,
            "MethodNotAllowed",
            &format!("the fake API server only serves GET, not {}", req.method),
        );
    }
    match route(path) {
        None => write_status(
            out,
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
        Some(Route::Object { res, ns, name }) => {
            let key = (
                res.kind.to_string(),
                ns.unwrap_or_default(),
                name.to_string(),
            );
            let obj = inner.lock().objects.get(&key).cloned();
            match obj {
                Some(o) => write_json(out, 200, &o),
                None => {
                    let mut s = status(
                        404,
                        "NotFound",
                        &format!("{} \"{name}\" not found", res.plural),
                    );
                    s["details"] = json!({"name": name, "kind": res.plural});
                    write_json(out, 404, &s)
                }
            }
        }
        Some(Route::Collection { res, ns }) => {
            if q.flag("watch") == Some(true) {
                serve_watch(inner, id, out, res, ns.as_deref(), &q)
            } else {
                serve_list(inner, out, res, ns.as_deref(), &q)
            }
        }
    }
}

fn too_old(rv: u64, oldest: u64) -> String {
    format!("too old resource version: {rv} ({oldest})")
}

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    format!("{rv}/{ns}/{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(tok: &str) -> Option<(u64, String, String)> {
    if !tok.len().is_multiple_of(2) || !tok.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..tok.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&tok[i..i + 2], 16).ok())
        .collect();
    let s = String::from_utf8(bytes?).ok()?;
    let mut it = s.splitn(3, '/');
    let rv = it.next()?.parse().ok()?;
    Some((rv, it.next()?.to_string(), it.next()?.to_string()))
}

fn serve_list(
    inner: &Inner,
    out: &mut TcpStream,
    res: &'static KindInfo,
    ns: Option<&str>,
    q: &Query,
) -> io::Result<bool> {
    let limit = match q.get("limit").filter(|s| !s.is_empty()) {
        None => 0,
        Some(v) => match v.parse::<usize>() {
            Ok(n) => n,
            Err(_) => return write_status(out, 400, "BadRequest", &format!("invalid limit {v:?}")),
        },
    };
    let st = inner.lock();
    let (snapshot, after) = match q.get("continue").filter(|s| !s.is_empty()) {
        Some(tok) => match decode_continue(tok) {
            None => {
                drop(st);
                return write_status(out, 400, "BadRequest", "continue key is not valid");
            }
            Some((rv, _, _)) if rv < st.history_start => {
                drop(st);
                return write_status(
                    out,
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                );
            }
            Some((rv, kns, kname)) => (rv, Some((kns, kname))),
        },
        None => {
            let rv = q.get("resourceVersion").unwrap_or("");
            if !rv.is_empty() && rv != "0" {
                let Ok(n) = rv.parse::<u64>() else {
                    drop(st);
                    return write_status(
                        out,
                        400,
                        "BadRequest",
                        &format!("invalid resource version {rv:?}"),
                    );
                };
                let exact = q.get("resourceVersionMatch") == Some("Exact");
                if n > st.rv {
                    let msg = format!("Too large resource version: {n}, current: {}", st.rv);
                    drop(st);
                    return write_status(out, 504, "Timeout", &msg);
                }
                if exact && n < st.rv {
                    let msg = too_old(n, st.rv);
                    drop(st);
                    return write_status(out, 410, "Expired", &msg);
                }
            }
            (st.rv, None)
        }
    };
    // From the continue key on (not from the kind's first object: pages of a large list would
    // cost the whole list each); a namespace's objects are contiguous in the key order.
    let from = match &after {
        Some((ans, aname)) => Bound::Excluded((res.kind.to_string(), ans.clone(), aname.clone())),
        None => Bound::Included((
            res.kind.to_string(),
            ns.unwrap_or_default().to_string(),
            String::new(),
        )),
    };
    let mut matching = st
        .objects
        .range((from, Bound::Unbounded))
        .take_while(|(k, _)| k.0 == res.kind && ns.is_none_or(|n| k.1.as_str() <= n))
        .filter(|(k, _)| ns.is_none_or(|n| k.1 == n));
    let page: Vec<(&Key, &Value)> = if limit == 0 {
        matching.by_ref().collect()
    } else {
        matching.by_ref().take(limit).collect()
    };
    // `remainingItemCount` is optional (the API server leaves it out with selectors); counting
    // would walk the rest of a large list for every page.
    let more = matching.next().is_some();
    let mut meta = Map::new();
    meta.insert("resourceVersion".into(), json!(snapshot.to_string()));
    if let Some((last, _)) = page.last().filter(|_| more) {
        meta.insert(
            "continue".into(),
            json!(encode_continue(snapshot, &last.1, &last.2)),
        );
    }
    let items: Vec<Value> = page.into_iter().map(|(_, v)| v.clone()).collect();
    drop(st);
    let body = json!({
        "kind": format!("{}List", res.kind),
        "apiVersion": res.api_version,
        "metadata": meta,
        "items": items,
    });
    write_json(out, 200, &body)
}

/// `{"type":...,"object":...}`, written straight from `obj` (no copy of it).
fn event_line(etype: &str, obj: &Value) -> String {
    format!("{{\"type\":{},\"object\":{obj}}}", Value::from(etype))
}

fn bookmark_line(res: &KindInfo, rv: u64, initial_end: bool) -> String {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}),
    )
}

fn expired_line(rv: u64, oldest: u64) -> String {
    event_line("ERROR", &status(410, "Expired", &too_old(rv, oldest)))
}

fn push_chunk(buf: &mut Vec<u8>, line: &str) {
    buf.extend_from_slice(format!("{:x}\r\n", line.len() + 1).as_bytes());
    buf.extend_from_slice(line.as_bytes());
    buf.extend_from_slice(b"\n\r\n");
}

const WATCH_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\nTransfer-Encoding: chunked\r\n\r\n";

/// Whether the peer has closed its side (or the socket is broken), without blocking.
fn peer_closed(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: a valid socket and a one-byte buffer.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => {
            let e = io::Error::last_os_error();
            !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            )
        }
    }
}

struct Gens {
    drop: u64,
    expire: u64,
    bookmark: u64,
}

fn serve_watch(
    inner: &Inner,
    id: u64,
    out: &mut TcpStream,
    res: &'static KindInfo,
    ns: Option<&str>,
    q: &Query,
) -> io::Result<bool> {
    let bookmarks = q.flag("allowWatchBookmarks") == Some(true);
    let send_initial = q.flag("sendInitialEvents");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .unwrap_or(1800);
    if send_initial == Some(true) {
        if !bookmarks {
            return write_status(
                out,
                422,
                "Invalid",
                "sendInitialEvents requires allowWatchBookmarks=true",
            );
        }
        if q.get("resourceVersionMatch") != Some("NotOlderThan") {
            return write_status(
                out,
                422,
                "Invalid",
                "sendInitialEvents requires resourceVersionMatch=NotOlderThan",
            );
        }
    }
    let rv_param = q.get("resourceVersion").unwrap_or("");
    let from = if rv_param.is_empty() || rv_param == "0" {
        None
    } else {
        match rv_param.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return write_status(
                    out,
                    400,
                    "BadRequest",
                    &format!("invalid resource version {rv_param:?}"),
                )
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(timeout);

    let mut st = inner.lock();
    if st.closed || st.down {
        return Ok(false);
    }
    let initial = |st: &State| -> Vec<String> {
        objects_of(st, res.kind, ns)
            .map(|o| event_line("ADDED", o))
            .collect()
    };
    let (pending, cursor) = match (send_initial, from) {
        (Some(true), _) => {
            let mut p = initial(&st);
            p.push(bookmark_line(res, st.rv, true));
            (p, st.rv)
        }
        (Some(false), None) => (Vec::new(), st.rv),
        (None, None) => (initial(&st), st.rv),
        (_, Some(n)) if n < st.history_start => {
            let line = expired_line(n, st.history_start);
            drop(st);
            let mut buf = WATCH_HEAD.to_vec();
            push_chunk(&mut buf, &line);
            buf.extend_from_slice(b"0\r\n\r\n");
            out.write_all(&buf)?;
            out.flush()?;
            return Ok(true);
        }
        (_, Some(n)) => (Vec::new(), n),
    };
    let gens = Gens {
        drop: st.drop_gen,
        expire: st.expire_gen,
        bookmark: st.bookmark_gen,
    };
    st.watches.insert(id, res.kind);
    drop(st);
    inner.cond.notify_all();
    let r = watch_loop(
        inner, out, res, ns, bookmarks, deadline, cursor, gens, pending,
    );
    inner.lock().watches.remove(&id);
    inner.cond.notify_all();
    r
}

#[allow(clippy::too_many_arguments)]
fn watch_loop(
    inner: &Inner,
    out: &mut TcpStream,
    res: &'static KindInfo,
    ns: Option<&str>,
    bookmarks: bool,
    deadline: Instant,
    mut cursor: u64,
    mut gens: Gens,
    mut pending: Vec<String>,
) -> io::Result<bool> {
    let mut buf = WATCH_HEAD.to_vec();
    loop {
        for l in pending.drain(..) {
            push_chunk(&mut buf, &l);
        }
        if !buf.is_empty() {
            out.write_all(&buf)?;
            out.flush()?;
            buf.clear();
        }
        let mut st = inner.lock();
        loop {
            if st.closed || st.down || st.drop_gen != gens.drop {
                drop(st);
                let _ = out.shutdown(Shutdown::Both);
                return Ok(false);
            }
            if st.expire_gen != gens.expire {
                let line = expired_line(cursor, st.history_start);
                drop(st);
                push_chunk(&mut buf, &line);
                buf.extend_from_slice(b"0\r\n\r\n");
                out.write_all(&buf)?;
                out.flush()?;
                return Ok(true);
            }
            let start = st.history.partition_point(|e| e.rv <= cursor);
            for e in &st.history[start..] {
                if e.kind == res.kind && ns.is_none_or(|n| n == e.namespace) {
                    pending.push(e.line.to_string());
                }
            }
            cursor = cursor.max(st.rv);
            if st.bookmark_gen != gens.bookmark {
                gens.bookmark = st.bookmark_gen;
                if bookmarks {
                    pending.push(bookmark_line(res, cursor, false));
                }
            }
            if !pending.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                out.write_all(b"0\r\n\r\n")?;
                out.flush()?;
                return Ok(true);
            }
            if peer_closed(out) {
                return Ok(false);
            }
            st = inner.wait_timeout(st, (deadline - now).min(Duration::from_millis(100)));
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for now (UTC).
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut days = secs / 86_400;
    let rem = secs % 86_400;
    let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let mut year = 1970;
    loop {
        let len = if leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let feb = if leap(year) { 29 } else { 28 };
    let mut month = 1;
    for len in [31, feb, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31] {
        if days < len {
            break;
        }
        days -= len;
        month += 1;
    }
    format!(
        "{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}Z",
        days + 1,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

/// A Namespace object.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut l = labels_json(labels);
    l["kubernetes.io/metadata.name"] = json!(name);
    json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": l},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// A Pod scheduled on `node` with one container; `Running` with `ip` as its pod IP, or
/// `Pending` without one.
pub fn pod(ns: &str, name: &str, node: &str, ip: Option<&str>, labels: &[(&str, &str)]) -> Value {
    let ips: Vec<&str> = ip.into_iter().collect();
    pod_with_ports(ns, name, node, &ips, labels, &[])
}

/// A Pod with several IPs (dual stack) and container ports `(name, port, protocol)`; an empty
/// port name leaves the port unnamed.
pub fn pod_with_ports(
    ns: &str,
    name: &str,
    node: &str,
    ips: &[&str],
    labels: &[(&str, &str)],
    ports: &[(&str, u16, &str)],
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| {
            let mut v = json!({"containerPort": p, "protocol": proto});
            if !n.is_empty() {
                v["name"] = json!(n);
            }
            v
        })
        .collect();
    let mut container = json!({"name": "main", "image": "registry.k8s.io/pause:3.10"});
    if !ports.is_empty() {
        container["ports"] = json!(ports);
    }
    let mut spec = json!({"containers": [container]});
    if !node.is_empty() {
        spec["nodeName"] = json!(node);
    }
    let mut status = json!({"phase": if ips.is_empty() { "Pending" } else { "Running" }});
    if let Some(first) = ips.first() {
        status["podIP"] = json!(first);
        status["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
    }
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "labels": labels_json(labels)},
        "spec": spec,
        "status": status,
    })
}

/// A Node with an InternalIP and a pod CIDR (`spec.podCIDR` and `spec.podCIDRs`).
pub fn node(name: &str, internal_ip: &str, pod_cidr: &str) -> Value {
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": internal_ip},
            {"type": "Hostname", "address": name},
        ]},
    })
}

/// A NetworkPolicy with the given `spec`.
pub fn network_policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "kind": "NetworkPolicy",
        "apiVersion": "networking.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(api: &FakeApi) -> (BufReader<TcpStream>, TcpStream) {
        let s = TcpStream::connect(api.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (BufReader::new(s.try_clone().unwrap()), s)
    }

    fn send(w: &mut TcpStream, target: &str) {
        write!(
            w,
            "GET {target} HTTP/1.1\r\nHost: fake\r\nAccept: application/json\r\n\r\n"
        )
        .unwrap();
    }

    /// Reads a response head: (status, lowercase headers).
    fn head(r: &mut BufReader<TcpStream>) -> (u16, HashMap<String, String>) {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let code = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut h = HashMap::new();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            h.insert(k.to_ascii_lowercase(), v.trim().to_string());
        }
        (code, h)
    }

    fn get(r: &mut BufReader<TcpStream>, w: &mut TcpStream, target: &str) -> (u16, Value) {
        send(w, target);
        let (code, h) = head(r);
        let n: usize = h["content-length"].parse().unwrap();
        let mut body = vec![0; n];
        r.read_exact(&mut body).unwrap();
        (code, serde_json::from_slice(&body).unwrap())
    }

    /// Next chunk's payload; `None` for the terminating chunk; `Err` if the stream broke.
    fn chunk(r: &mut BufReader<TcpStream>) -> io::Result<Option<String>> {
        let mut size = String::new();
        if r.read_line(&mut size)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        let mut data = vec![0; n + 2];
        r.read_exact(&mut data)?;
        assert_eq!(&data[n..], b"\r\n");
        if n == 0 {
            return Ok(None);
        }
        data.truncate(n);
        Ok(Some(String::from_utf8(data).unwrap()))
    }

    fn event(r: &mut BufReader<TcpStream>) -> Value {
        let c = chunk(r)
            .unwrap()
            .expect("an event, not the end of the stream");
        assert!(c.ends_with('\n') && c.matches('\n').count() == 1, "{c:?}");
        serde_json::from_str(&c).unwrap()
    }

    #[test]
    fn list_pagination_is_consistent_and_keeps_alive() {
        let api = FakeApi::start().unwrap();
        for (ns, name) in [
            ("b", "p1"),
            ("a", "p2"),
            ("a", "p1"),
            ("c", "p0"),
            ("b", "p0"),
        ] {
            api.apply(pod(ns, name, "node-1", Some("10.0.0.1"), &[("app", "x")]));
        }
        api.apply(namespace("a", &[]));
        let snapshot = api.resource_version();
        let (mut r, mut w) = connect(&api);
        let mut names = Vec::new();
        let mut target = "/api/v1/pods?limit=2&labelSelector=app%3Dx".to_string();
        let mut pages = 0;
        loop {
            let (code, list) = get(&mut r, &mut w, &target);
            assert_eq!(code, 200);
            pages += 1;
            assert_eq!(list["kind"], "PodList");
            assert_eq!(list["apiVersion"], "v1");
            assert_eq!(list["metadata"]["resourceVersion"], snapshot.to_string());
            for i in list["items"].as_array().unwrap() {
                names.push(format!(
                    "{}/{}",
                    i["metadata"]["namespace"].as_str().unwrap(),
                    i["metadata"]["name"].as_str().unwrap()
                ));
                assert!(i["metadata"]["uid"].is_string());
            }
            if pages == 1 {
                // Later pages come from the current state but keep the snapshot's RV.
                api.apply(pod("z", "late", "node-1", None, &[]));
            }
            match list["metadata"]["continue"].as_str() {
                Some(c) => target = format!("/api/v1/pods?limit=2&continue={c}"),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(names, ["a/p1", "a/p2", "b/p0", "b/p1", "c/p0", "z/late"]);

        let (code, list) = get(&mut r, &mut w, "/api/v1/namespaces/b/pods");
        assert_eq!(code, 200);
        assert_eq!(list["items"].as_array().unwrap().len(), 2);
        let (code, ns) = get(&mut r, &mut w, "/api/v1/namespaces/a");
        assert_eq!((code, ns["kind"].as_str()), (200, Some("Namespace")));
        let (code, np) = get(&mut r, &mut w, "/apis/networking.k8s.io/v1/networkpolicies");
        assert_eq!(
            (code, np["apiVersion"].as_str()),
            (200, Some("networking.k8s.io/v1"))
        );
        assert_eq!(np["kind"], "NetworkPolicyList");
        let (code, st) = get(&mut r, &mut w, "/api/v1/secrets");
        assert_eq!(
            (code, st["kind"].as_str(), st["code"].as_u64()),
            (404, Some("Status"), Some(404))
        );
        let (code, st) = get(&mut r, &mut w, "/api/v1/namespaces/a/pods/nope");
        assert_eq!((code, st["reason"].as_str()), (404, Some("NotFound")));
        assert_eq!(api.requests().len(), 8);
        assert_eq!(
            api.requests()[0],
            "GET /api/v1/pods?limit=2&labelSelector=app%3Dx"
        );
    }

    #[test]
    fn watch_streams_history_then_live_events_in_chunks() {
        let api = FakeApi::start().unwrap();
        api.apply(pod("a", "p1", "n", Some("10.0.0.1"), &[]));
        let from = api.resource_version();
        api.apply(pod("a", "p2", "n", Some("10.0.0.2"), &[]));
        api.apply(pod("b", "p3", "n", Some("10.0.0.3"), &[]));
        api.apply(node("n", "10.224.0.4", "10.244.1.0/24"));
        let (mut r, mut w) = connect(&api);
        send(
            &mut w,
            &format!("/api/v1/namespaces/a/pods?watch=true&timeoutSeconds=2&allowWatchBookmarks=true&resourceVersion={from}"),
        );
        let (code, h) = head(&mut r);
        assert_eq!(code, 200);
        assert_eq!(h["transfer-encoding"], "chunked");
        assert!(!h.contains_key("content-length"));
        let e = event(&mut r);
        assert_eq!(
            (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
            (Some("ADDED"), Some("p2"))
        );
        assert_eq!(e["object"]["kind"], "Pod");
        assert!(api.wait_for_watches(1, Duration::from_secs(5)));
        assert_eq!(api.open_watches_of("Pod"), 1);
        api.apply(pod("a", "p2", "n", Some("10.0.0.9"), &[]));
        api.apply(pod("b", "p3", "n", None, &[])); // other namespace: not seen
        let e = event(&mut r);
        assert_eq!(e["type"], "MODIFIED");
        assert_eq!(e["object"]["status"]["podIP"], "10.0.0.9");
        api.bookmark();
        let e = event(&mut r);
        assert_eq!(e["type"], "BOOKMARK");
        assert_eq!(
            e["object"]["metadata"]["resourceVersion"],
            api.resource_version().to_string()
        );
        assert!(api.delete("Pod", Some("a"), "p1"));
        assert!(!api.delete("Pod", Some("a"), "p1"));
        let e = event(&mut r);
        assert_eq!(e["type"], "DELETED");
        assert_eq!(
            e["object"]["metadata"]["resourceVersion"],
            api.resource_version().to_string()
        );
        // timeoutSeconds ends the stream with the terminating chunk; the connection stays usable.
        assert_eq!(chunk(&mut r).unwrap(), None);
        let (code, list) = get(&mut r, &mut w, "/api/v1/nodes");
        assert_eq!(code, 200);
        assert_eq!(list["items"][0]["metadata"]["name"], "n");
        assert_eq!(api.open_watches(), 0);
    }

    #[test]
    fn watch_gets_410_after_expire_history() {
        let api = FakeApi::start().unwrap();
        api.apply(pod("a", "p1", "n", None, &[]));
        let old = api.resource_version();
        let (mut r, mut w) = connect(&api);
        send(
            &mut w,
            &format!("/api/v1/pods?watch=true&resourceVersion={old}"),
        );
        assert_eq!(head(&mut r).0, 200);
        assert!(api.wait_for_watches(1, Duration::from_secs(5)));
        api.apply(pod("a", "p2", "n", None, &[]));
        assert_eq!(event(&mut r)["type"], "ADDED");
        // An open watch gets the ERROR event and the end of the stream.
        api.expire_history();
        let e = event(&mut r);
        assert_eq!(e["type"], "ERROR");
        assert_eq!(e["object"]["code"], 410);
        assert_eq!(e["object"]["reason"], "Expired");
        assert_eq!(chunk(&mut r).unwrap(), None);
        assert_eq!(api.open_watches(), 0);
        // So does a new watch from before the expiry ...
        send(
            &mut w,
            &format!("/api/v1/pods?watch=true&resourceVersion={old}"),
        );
        assert_eq!(head(&mut r).0, 200);
        let e = event(&mut r);
        assert_eq!(e["type"], "ERROR");
        assert_eq!(
            e["object"]["message"],
            format!(
                "too old resource version: {old} ({})",
                api.resource_version()
            )
        );
        assert_eq!(chunk(&mut r).unwrap(), None);
        // ... but not one from the current RV.
        let now = api.resource_version();
        send(
            &mut w,
            &format!("/api/v1/pods?watch=true&resourceVersion={now}&timeoutSeconds=1"),
        );
        assert_eq!(head(&mut r).0, 200);
        api.apply(pod("a", "p3", "n", None, &[]));
        assert_eq!(event(&mut r)["object"]["metadata"]["name"], "p3");
        assert_eq!(chunk(&mut r).unwrap(), None);
    }

    #[test]
    fn watch_from_zero_and_streaming_list() {
        let api = FakeApi::start().unwrap();
        api.apply(network_policy(
            "a",
            "deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ));
        api.apply(network_policy("b", "deny", json!({"podSelector": {}})));
        let (mut r, mut w) = connect(&api);
        send(
            &mut w,
            "/apis/networking.k8s.io/v1/namespaces/b/networkpolicies?watch=true&timeoutSeconds=1",
        );
        assert_eq!(head(&mut r).0, 200);
        let e = event(&mut r);
        assert_eq!(
            (
                e["type"].as_str(),
                e["object"]["metadata"]["namespace"].as_str()
            ),
            (Some("ADDED"), Some("b"))
        );
        assert_eq!(chunk(&mut r).unwrap(), None);
        send(&mut w, "/apis/networking.k8s.io/v1/networkpolicies?watch=true&timeoutSeconds=1&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0");
        assert_eq!(head(&mut r).0, 200);
        assert_eq!(event(&mut r)["type"], "ADDED");
        assert_eq!(event(&mut r)["type"], "ADDED");
        let e = event(&mut r);
        assert_eq!(e["type"], "BOOKMARK");
        assert_eq!(
            e["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
            "true"
        );
        assert_eq!(e["object"]["metadata"]["resourceVersion"], "2");
        assert_eq!(chunk(&mut r).unwrap(), None);
        send(
            &mut w,
            "/apis/networking.k8s.io/v1/networkpolicies?watch=true&sendInitialEvents=true",
        );
        assert_eq!(head(&mut r).0, 422);
    }

    #[test]
    fn drop_watches_and_unavailable_close_connections() {
        let api = FakeApi::start().unwrap();
        let (mut r, mut w) = connect(&api);
        send(&mut w, "/api/v1/namespaces?watch=true&resourceVersion=0");
        assert_eq!(head(&mut r).0, 200);
        assert!(api.wait_for_watches(1, Duration::from_secs(5)));
        api.drop_watches();
        assert_eq!(api.open_watches(), 0);
        // No terminating chunk: the stream just ends.
        assert!(chunk(&mut r).is_err());

        api.set_unavailable(true);
        let (mut r, mut w) = connect(&api);
        // The server may already have closed the connection.
        let _ = w.write_all(b"GET /api/v1/nodes HTTP/1.1\r\nHost: fake\r\n\r\n");
        let mut buf = Vec::new();
        assert_eq!(r.read_to_end(&mut buf).unwrap_or(0), 0);
        api.set_unavailable(false);
        let (mut r, mut w) = connect(&api);
        assert_eq!(get(&mut r, &mut w, "/api/v1/nodes").0, 200);
    }

    #[test]
    fn kubeconfig_and_timestamps() {
        let api = FakeApi::start().unwrap();
        let dir = std::env::temp_dir().join(format!("fakeapi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubeconfig");
        api.write_kubeconfig_contexts(&path, &["fake", "other"])
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("server: \"{}\"", api.url())));
        assert!(text.contains("current-context: \"fake\""));
        std::fs::remove_dir_all(&dir).unwrap();
        let rv = api.apply(namespace("x", &[]));
        let o = api.get("Namespace", None, "x").unwrap();
        assert_eq!(o["metadata"]["resourceVersion"], rv.to_string());
        let ts = o["metadata"]["creationTimestamp"].as_str().unwrap();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'), "{ts}");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Db%2Cc+d%"), "a=b,c d%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn serves_from_a_network_namespace() {
        if unsafe { libc::geteuid() } != 0 || crate::run(&["ip", "netns", "list"]).is_err() {
            eprintln!("skipped: needs root and iproute2");
            return;
        }
        let ns = crate::unique_prefix("api");
        crate::run(&["ip", "netns", "add", &ns]).unwrap();
        struct Del(String);
        impl Drop for Del {
            fn drop(&mut self) {
                let _ = crate::run(&["ip", "netns", "del", &self.0]);
            }
        }
        let _del = Del(ns.clone());
        crate::run(&["ip", "-n", &ns, "link", "set", "lo", "up"]).unwrap();
        let api = FakeApi::start_in_netns(&ns).unwrap();
        api.apply(node("n1", "10.224.0.4", "10.244.1.0/24"));
        let addr = api.addr();
        let code = crate::in_netns(&ns, move || {
            let s = TcpStream::connect(addr).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            get(&mut r, &mut w, "/api/v1/nodes/n1").0
        })
        .unwrap();
        assert_eq!(code, 200);
    }
}
