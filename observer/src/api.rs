//! The daemon's local API: HTTP on a unix socket (flows, conntrack, status, metrics, health),
//! optionally the metrics and health endpoints on a TCP address too.
use std::{
    convert::Infallible,
    fmt::Write as _,
    os::unix::fs::PermissionsExt,
    sync::Arc,
};

use anyhow::{Context as _, Result};
use axum::{
    body::Body,
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::BroadcastStream;

use crate::daemon::Shared;

#[derive(Deserialize, Default)]
pub struct FlowQuery {
    pub last: Option<usize>,
    #[serde(default)]
    pub follow: bool,
    /// JSON array of [`crate::filter::Filter`].
    pub filter: Option<String>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Status {
    pub node: String,
    pub attach_mode: String,
    pub pin_dir: String,
    pub interfaces: Vec<(u32, String)>,
    pub conntrack_entries: usize,
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
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/flows", get(flows))
        .route("/v1/conntrack", get(conntrack))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .with_state(shared)
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
    let app = router(shared.clone());
    let metrics_app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .with_state(shared);
    Ok(async move {
        let unix = axum::serve(uds, app);
        match tcp {
            Some(t) => {
                let (a, b) = tokio::join!(unix, axum::serve(t, metrics_app));
                a?;
                b?;
            }
            None => unix.await?,
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

async fn flows(State(shared): State<Arc<Shared>>, Query(q): Query<FlowQuery>) -> Response {
    let filters: Vec<crate::filter::Filter> = match q.filter.as_deref().map(serde_json::from_str).transpose() {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => return (StatusCode::BAD_REQUEST, format!("filter: {e}\n")).into_response(),
    };
    // Subscribe before reading history so nothing falls in between.
    let rx = shared.tx.subscribe();
    let backlog: Vec<_> = {
        let st = shared.state.lock().unwrap();
        let matching: Vec<_> = st.history.iter().filter(|r| crate::filter::accepts(&filters, r)).cloned().collect();
        let n = q.last.unwrap_or(if q.follow { 0 } else { matching.len() });
        let skip = matching.len().saturating_sub(n);
        matching.into_iter().skip(skip).collect()
    };
    let head = ndjson(backlog.iter().map(|r| r.as_ref()));
    if !q.follow {
        return ([(header::CONTENT_TYPE, "application/x-ndjson")], head).into_response();
    }
    let filters = Arc::new(filters);
    let live = BroadcastStream::new(rx).filter_map(move |r| {
        let filters = filters.clone();
        async move {
        match r {
            Ok(rec) if !crate::filter::accepts(&filters, &rec) => None,
            Ok(rec) => Some(Ok::<_, Infallible>(format!("{}\n", serde_json::to_string(rec.as_ref()).unwrap_or_default()))),
            // A slow reader skipped records: say so in-band rather than silently.
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Some(Ok(format!("{{\"lost_records\":{n}}}\n")))
            }
        }
        }
    });
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(head) }).chain(live);
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}

async fn conntrack(State(shared): State<Arc<Shared>>) -> Response {
    match shared.conntrack() {
        Ok(recs) => ([(header::CONTENT_TYPE, "application/x-ndjson")], ndjson(recs)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

pub fn status_of(shared: &Shared) -> Status {
    let (kernel, ct, mode, mut interfaces) = {
        let dp = shared.dp.lock().unwrap();
        let kernel = dp.stats().unwrap_or_default().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let ct = dp.conntrack().map(|m| m.keys().count()).unwrap_or(0);
        (kernel, ct, format!("{:?}", dp.mode).to_lowercase(), Vec::new())
    };
    let st = shared.state.lock().unwrap();
    interfaces.extend(st.interfaces.iter().map(|(i, n)| (*i, n.clone())));
    interfaces.sort();
    Status {
        node: shared.opts.node_name.clone(),
        attach_mode: mode,
        pin_dir: shared.opts.pin_dir.display().to_string(),
        interfaces,
        conntrack_entries: ct,
        history: st.history.len(),
        kernel,
        pods: st.cluster.pods.len(),
        local_endpoints: st.cluster.pods.iter().filter(|p| p.node == shared.opts.node_name && !p.host_network).count(),
        source_errors: st.metrics.source_errors.clone(),
        records_rate_limited: st.metrics.records_rate_limited_total,
        policies: {
            let mut v: Vec<String> = st.cluster.policies.iter().map(|p| p.id()).collect();
            v.sort();
            v
        },
        last_sync: st.last_sync.map(crate::flows::rfc3339),
        started: crate::flows::rfc3339(shared.started),
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(status_of(&shared)).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let s = status_of(&shared);
    let mut out = String::new();
    let _ = writeln!(out, "# HELP observer_datapath_total Kernel datapath counters by kind (packets seen, and every packet or event not fully accounted).");
    let _ = writeln!(out, "# TYPE observer_datapath_total counter");
    for (k, v) in &s.kernel {
        let _ = writeln!(out, "observer_datapath_total{{kind=\"{k}\"}} {v}");
    }
    let _ = writeln!(out, "# HELP observer_conntrack_entries Connections in the kernel conntrack map.");
    let _ = writeln!(out, "# TYPE observer_conntrack_entries gauge");
    let _ = writeln!(out, "observer_conntrack_entries {}", s.conntrack_entries);
    let _ = writeln!(out, "# HELP observer_attached_interfaces Pod interfaces the programs are attached to.");
    let _ = writeln!(out, "# TYPE observer_attached_interfaces gauge");
    let _ = writeln!(out, "observer_attached_interfaces {}", s.interfaces.len());
    let st = shared.state.lock().unwrap();
    let _ = writeln!(out, "# HELP observer_flow_records_total Flow records produced, by event, traffic class and protocol.");
    let _ = writeln!(out, "# TYPE observer_flow_records_total counter");
    let mut recs: Vec<_> = st.metrics.records.iter().collect();
    recs.sort();
    for ((ev, class, proto, verdict), n) in recs {
        let _ = writeln!(out, "observer_flow_records_total{{event=\"{ev}\",traffic_class=\"{class}\",protocol=\"{proto}\",verdict=\"{verdict}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP observer_policy_verdicts_total Flow records by the policy that allowed (direction set) or isolated (direction empty) them.");
    let _ = writeln!(out, "# TYPE observer_policy_verdicts_total counter");
    let mut pv: Vec<_> = st.metrics.policy_verdicts.iter().collect();
    pv.sort();
    for ((policy, dir, verdict), n) in pv {
        let _ = writeln!(out, "observer_policy_verdicts_total{{policy=\"{policy}\",direction=\"{dir}\",verdict=\"{verdict}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP observer_records_rate_limited_total Flow records not produced because of the node-wide record budget.");
    let _ = writeln!(out, "# TYPE observer_records_rate_limited_total counter");
    let _ = writeln!(out, "observer_records_rate_limited_total {}", st.metrics.records_rate_limited_total);
    let _ = writeln!(out, "# HELP observer_flow_log_errors_total Records that could not be written to the flow log.");
    let _ = writeln!(out, "# TYPE observer_flow_log_errors_total counter");
    let _ = writeln!(out, "observer_flow_log_errors_total {}", st.metrics.flow_log_errors_total);
    let _ = writeln!(out, "# HELP observer_conntrack_capacity Size of the kernel conntrack map.");
    let _ = writeln!(out, "# TYPE observer_conntrack_capacity gauge");
    let _ = writeln!(out, "observer_conntrack_capacity {}", observer_common::CT_MAX_ENTRIES);
    if let Some(t) = st.last_sync {
        let _ = writeln!(out, "# HELP observer_source_sync_age_seconds Time since the cluster source was last applied to the maps.");
        let _ = writeln!(out, "# TYPE observer_source_sync_age_seconds gauge");
        let _ = writeln!(out, "observer_source_sync_age_seconds {:.3}", t.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0));
    }
    let _ = writeln!(out, "# HELP observer_attach_errors_total Failed attach attempts on pod interfaces.");
    let _ = writeln!(out, "# TYPE observer_attach_errors_total counter");
    let _ = writeln!(out, "observer_attach_errors_total {}", st.metrics.attach_errors_total);
    let _ = writeln!(out, "# HELP observer_conntrack_expired_total Idle connections removed by the daemon.");
    let _ = writeln!(out, "# TYPE observer_conntrack_expired_total counter");
    let _ = writeln!(out, "observer_conntrack_expired_total {}", st.metrics.conntrack_expired_total);
    let _ = writeln!(out, "# HELP observer_source_errors Objects in the cluster source that could not be used.");
    let _ = writeln!(out, "# TYPE observer_source_errors gauge");
    let _ = writeln!(out, "observer_source_errors {}", st.metrics.source_errors.len());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
