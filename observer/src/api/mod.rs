//! The daemon's API on its unix socket (and on `--listen` with mutual TLS): the flows over
//! gRPC (the Hubble-compatible `observer.Observer`, see `hubble`), and HTTP for conntrack,
//! status, metrics and health. Optionally the metrics and health endpoints on a TCP address.
use std::{os::unix::fs::PermissionsExt, sync::Arc};

use anyhow::{Context as _, Result};
use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde::{Deserialize, Serialize};

use crate::daemon::Shared;

mod prometheus;

#[derive(Serialize, Deserialize, Debug)]
pub struct Status {
    pub node: String,
    pub attach_mode: String,
    /// The kernel probe's summary (required features present, TCX).
    #[serde(default)]
    pub kernel_features: String,
    pub pin_dir: String,
    pub interfaces: Vec<(u32, String)>,
    pub conntrack_entries: usize,
    /// Of `conntrack_entries`, the IPv6 table's.
    #[serde(default)]
    pub conntrack_entries_ipv6: usize,
    pub history: usize,
    pub kernel: Vec<(String, u64)>,
    pub pods: usize,
    pub local_endpoints: usize,
    pub source_errors: Vec<String>,
    /// Flow records shed by the node-wide record budget.
    #[serde(default)]
    pub records_rate_limited: u64,
    /// NetworkPolicies in force, `namespace/name`, sorted.
    #[serde(default)]
    pub policies: Vec<String>,
    pub last_sync: Option<String>,
    pub started: String,
    /// The API server watch, with `--source kube`.
    #[serde(default)]
    pub kube: Option<KubeStatus>,
    #[serde(default)]
    pub network: Option<NetworkStatus>,
    /// The node's uplinks with programs attached.
    #[serde(default)]
    pub uplinks: Vec<UplinkStatus>,
    /// Wire-side counters of the uplinks (non-zero ones).
    #[serde(default)]
    pub uplink_counters: Vec<UplinkCount>,
    /// Local pods' connections by SNAT expectation.
    #[serde(default)]
    pub snat: Vec<(String, u64)>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NetworkStatus {
    pub model: String,
    /// Why, when the model was detected.
    pub detected: Option<String>,
    pub vnet_cidrs: Vec<String>,
    pub cluster_cidrs: Vec<String>,
    /// Following the kernel's conntrack for SNAT.
    pub snat: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct UplinkStatus {
    pub ifindex: u32,
    pub name: String,
    /// XDP's mode: native, generic, or off.
    pub xdp: String,
    /// Which program drops a local pod's denied openers before the stack: `xdp`, or `tc`
    /// (ingress) where XDP is off. The pod's veth judges them again either way.
    #[serde(default)]
    pub ingress_policy: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct UplinkCount {
    pub point: String,
    pub local: String,
    pub remote: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KubeStatus {
    /// Every resource has been listed and the result written to the maps.
    pub synced: bool,
    /// Since when some watch is down (the maps keep the last known state meanwhile).
    pub stale_since: Option<String>,
    pub stale_seconds: Option<f64>,
    pub resources: Vec<crate::k8s::ResourceStatus>,
    /// API event to maps written (`observer_kube_sync_latency_seconds`).
    #[serde(default)]
    pub propagation: Option<Propagation>,
}

/// Policy propagation: from the first API event a sync takes in to the maps written, over
/// the daemon's life; quantiles estimated from the histogram's buckets, as Prometheus'
/// `histogram_quantile` would from /metrics.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Propagation {
    pub syncs: u64,
    pub p50_seconds: f64,
    pub p99_seconds: f64,
    /// Syncs slower than the largest bucket bound, `max_bound_seconds` (a quantile among
    /// them reads as that bound).
    pub above_max_bound: u64,
    pub max_bound_seconds: f64,
}

impl Propagation {
    pub fn of(h: &crate::daemon::Histogram) -> Option<Self> {
        Some(Self {
            syncs: h.count,
            p50_seconds: h.quantile(0.5)?,
            p99_seconds: h.quantile(0.99)?,
            above_max_bound: h.above_bounds(),
            max_bound_seconds: h.bounds.last().copied().unwrap_or(0.0),
        })
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/conntrack", get(conntrack))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared.clone())
        .merge(crate::hubble::routes(shared))
        .fallback(not_found)
}

/// Unknown paths: a 404 for HTTP clients, gRPC's UNIMPLEMENTED for gRPC clients (which read
/// the status from the trailers, not the HTTP code).
async fn not_found(req: axum::extract::Request) -> Response {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        tonic::Status::unimplemented(format!("{} is not served here", req.uri().path()))
            .into_http::<axum::body::Body>()
            .into_response()
    } else {
        (StatusCode::NOT_FOUND, "not found\n").into_response()
    }
}

/// Binds the unix socket (mode 0660: root and the socket's group) and, if configured, the TCP
/// metrics listener. Returns the future that serves them.
pub async fn serve(shared: Arc<Shared>) -> Result<impl std::future::Future<Output = Result<()>>> {
    let path = shared.opts.socket.clone();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let uds = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding API socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    let tcp = match shared.opts.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding metrics address {addr}"))?,
        ),
        None => None,
    };
    let remote = match &shared.opts.remote {
        Some((addr, files)) => {
            let cfg = crate::tls::server_config(files)
                .with_context(|| format!("--listen {addr}: TLS setup"))?;
            Some(crate::tls::Listener::bind(*addr, cfg).await?)
        }
        None => None,
    };
    let remote_app = router(shared.clone());
    let app = router(shared.clone());
    let metrics_app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(shared);
    Ok(async move {
        let unix = axum::serve(uds, app);
        let metrics = async move {
            match tcp {
                Some(t) => axum::serve(t, metrics_app).await,
                None => std::future::pending().await,
            }
        };
        let remote = async move {
            match remote {
                Some(l) => axum::serve(l, remote_app).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = unix => r?,
            r = metrics => r?,
            r = remote => r?,
        }
        Ok(())
    })
}

fn ndjson<T: Serialize>(items: impl IntoIterator<Item = T>) -> String {
    let mut s = String::new();
    for i in items {
        s.push_str(&serde_json::to_string(&i).unwrap_or_default());
        s.push('\n');
    }
    s
}

async fn conntrack(State(shared): State<Arc<Shared>>) -> Response {
    match shared.conntrack() {
        Ok(recs) => (
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            ndjson(recs),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

/// How `status_of` counts the kernel's connections.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Read the table now (`observer status`, asked for now and then).
    Exact,
    /// As of the last conntrack sweep, at most a few seconds old (the metrics, scraped
    /// periodically: a full read at every scrape costs more than the rest of the daemon).
    Swept,
}

pub fn status_of(shared: &Shared, count: Count) -> Status {
    let (kernel, (ct, ct6), mode, uplink) = {
        let dp = shared.dp.lock().unwrap();
        let kernel = dp
            .stats()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let ct = match count {
            Count::Exact => dp.conntrack_len().unwrap_or((0, 0)),
            Count::Swept => {
                let n = |a: &std::sync::atomic::AtomicUsize| {
                    a.load(std::sync::atomic::Ordering::Relaxed)
                };
                (n(&shared.conntrack_swept), n(&shared.conntrack_swept_v6))
            }
        };
        let uplink = dp.uplink_counters().unwrap_or_default();
        (kernel, ct, format!("{:?}", dp.mode).to_lowercase(), uplink)
    };
    let uplink_counters = {
        use observer_common::uplink as u;
        let mut v = Vec::new();
        for point in 0..u::POINTS {
            for local in 0..u::LOCALS {
                for remote in 0..u::REMOTES {
                    let c = uplink.get(u::index(point, local, remote) as usize);
                    if let Some(c) = c.filter(|c| c.packets > 0) {
                        v.push(UplinkCount {
                            point: u::POINT_NAMES[point as usize].into(),
                            local: u::LOCAL_NAMES[local as usize].into(),
                            remote: u::REMOTE_NAMES[remote as usize].into(),
                            packets: c.packets,
                            bytes: c.bytes,
                        });
                    }
                }
            }
        }
        v
    };
    let st = shared.state.lock().unwrap();
    let mut interfaces: Vec<(u32, String)> =
        st.interfaces.iter().map(|(i, n)| (*i, n.clone())).collect();
    interfaces.sort();
    Status {
        node: shared.opts.node_name.to_string(),
        attach_mode: mode,
        kernel_features: shared.kernel_features.clone(),
        pin_dir: shared.opts.pin_dir.display().to_string(),
        interfaces,
        conntrack_entries: ct,
        conntrack_entries_ipv6: ct6,
        history: st.history.len(),
        kernel,
        pods: st.cluster.pods.len(),
        local_endpoints: st
            .cluster
            .pods
            .iter()
            .filter(|p| *p.node == *shared.opts.node_name && !p.host_network)
            .count(),
        source_errors: st.metrics.source_errors.clone(),
        records_rate_limited: st.metrics.records_rate_limited_total,
        policies: {
            let mut v: Vec<String> = st.cluster.policies.iter().map(|p| p.id()).collect();
            v.sort();
            v
        },
        last_sync: st.last_sync.map(crate::flows::rfc3339),
        started: crate::flows::rfc3339(shared.started),
        kube: shared.kube.as_ref().map(|k| {
            let stale = k.stale_since();
            KubeStatus {
                synced: k.all_synced() && st.last_sync.is_some(),
                stale_since: stale.map(crate::flows::rfc3339),
                stale_seconds: stale.map(|t| t.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0)),
                resources: k.status(),
                propagation: Propagation::of(&st.metrics.sync_latency),
            }
        }),
        network: Some(NetworkStatus {
            model: st.model.model.as_str().into(),
            detected: st.model.detected.clone(),
            vnet_cidrs: st.model.vnet_cidrs.iter().map(|n| n.to_string()).collect(),
            cluster_cidrs: st
                .model
                .cluster_cidrs
                .iter()
                .map(|n| n.to_string())
                .collect(),
            snat: st.snat_live(),
        }),
        uplinks: {
            let mut v: Vec<UplinkStatus> = st
                .uplinks
                .iter()
                .map(|(i, (n, x))| UplinkStatus {
                    ifindex: *i,
                    name: n.clone(),
                    xdp: x.to_string(),
                    ingress_policy: if *x == "off" { "tc" } else { "xdp" }.into(),
                })
                .collect();
            v.sort_by_key(|u| u.ifindex);
            v
        },
        uplink_counters,
        snat: crate::snat::Expectation::ALL
            .iter()
            .map(|e| {
                (
                    e.as_str().to_string(),
                    st.metrics.snat_flows.get(e).copied().unwrap_or(0),
                )
            })
            .collect(),
    }
}

/// Ready once the cluster source has been written to the maps: before that, a fresh node would
/// not enforce its policies yet.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.state.lock().unwrap().last_sync.is_some() {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the cluster source has not been written to the maps yet\n",
        )
            .into_response()
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(status_of(&shared, Count::Exact)).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus::render(&shared),
    )
        .into_response()
}
