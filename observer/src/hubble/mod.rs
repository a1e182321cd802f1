//! The Hubble-compatible gRPC API: `observer.Observer` (GetFlows, ServerStatus, GetNodes,
//! GetNamespaces) and `grpc.health.v1.Health` on a unix socket, so `hubble observe` and
//! `hubble status` work against a node's observer. It reads the same history and live stream
//! as observer's own API.
pub mod convert;
mod filter;
mod peer;
mod select;

pub use select::FLOWS_REQUEST_TYPE;

use std::{
    collections::BTreeSet, os::unix::fs::PermissionsExt, path::PathBuf, pin::Pin, sync::Arc,
};

use anyhow::{Context as _, Result};
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{daemon::Shared, flows::FlowRecord};
use proto::{
    grpc::health::v1::{
        health_check_response::ServingStatus,
        health_server::{Health, HealthServer},
        HealthCheckRequest, HealthCheckResponse,
    },
    observer::{
        observer_server::{Observer, ObserverServer},
        GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse,
        GetNodesRequest, GetNodesResponse, Namespace, Node, ServerStatusRequest,
        ServerStatusResponse,
    },
    peer::peer_server::PeerServer,
};

/// Code generated from `proto/` (the wire contract of cilium's Hubble API, the subset observer
/// serves).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    pub mod flow {
        tonic::include_proto!("flow");
    }
    pub mod relay {
        tonic::include_proto!("relay");
    }
    pub mod observer {
        tonic::include_proto!("observer");
        /// observer's own additions, in `flow.Flow.extensions`.
        pub mod ext {
            tonic::include_proto!("observer.ext");
        }
    }
    pub mod peer {
        tonic::include_proto!("peer");
    }
    pub mod grpc {
        pub mod health {
            pub mod v1 {
                tonic::include_proto!("grpc.health.v1");
            }
        }
    }
}

/// The names `hubble status` asks the health service about: the gRPC service, and the name
/// Hubble's own server registers its health under.
const OBSERVER_SERVICES: [&str; 2] = ["observer.Observer", "hubble.server.Observer"];

/// The Hubble socket next to the API socket: `hubble.sock` beside the default `observer.sock`
/// (`/run/observer/hubble.sock`), `NAME-hubble.sock` beside any other `NAME.sock`, so two
/// daemons sharing a directory keep apart.
pub fn default_socket(api_socket: &std::path::Path) -> PathBuf {
    let stem = api_socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if stem == "observer" {
        api_socket.with_file_name("hubble.sock")
    } else {
        api_socket.with_file_name(format!("{stem}-hubble.sock"))
    }
}

/// Binds the socket (mode 0660, like the API's) and returns the server to run.
pub async fn serve(
    shared: Arc<Shared>,
    path: PathBuf,
) -> Result<impl std::future::Future<Output = Result<()>>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let uds = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding the Hubble API socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    let server = services(tonic::transport::Server::builder(), shared);
    Ok(async move {
        server
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(uds))
            .await
            .context("Hubble API server")
    })
}

/// What both listeners serve: the flows, the peers (Hubble Relay) and health.
fn services(
    mut builder: tonic::transport::Server,
    shared: Arc<Shared>,
) -> tonic::transport::server::Router {
    builder
        .add_service(ObserverServer::new(HubbleApi {
            shared: shared.clone(),
        }))
        .add_service(PeerServer::new(peer::PeerApi::new(shared)))
        .add_service(HealthServer::new(HealthApi))
}

/// The same services as routes of the daemon's own API, so `observer flows` reads its flows
/// over gRPC on the API socket and `--listen` (one flow API for observer's CLI and Hubble's).
pub fn routes(shared: Arc<Shared>) -> axum::Router {
    tonic::service::Routes::new(ObserverServer::new(HubbleApi {
        shared: shared.clone(),
    }))
    .add_service(PeerServer::new(peer::PeerApi::new(shared)))
    .add_service(HealthServer::new(HealthApi))
    .prepare()
    .into_axum_router()
}

/// The same services on TCP with mutual TLS (clients must present a certificate signed by the
/// configured CA), for Hubble Relay and remote `hubble` CLIs.
pub fn serve_tls(
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    files: &crate::tls::Files,
) -> Result<impl std::future::Future<Output = Result<()>>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?))
        .client_ca_root(Certificate::from_pem(read(&files.ca)?));
    let builder = tonic::transport::Server::builder()
        .tls_config(tls)
        .with_context(|| format!("--hubble-listen {addr}: TLS setup"))?;
    let server = services(builder, shared);
    Ok(async move {
        server
            .serve(addr)
            .await
            .with_context(|| format!("Hubble API on {addr}"))
    })
}

struct HubbleApi {
    shared: Arc<Shared>,
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for HubbleApi {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<FlowStream>, Status> {
        let req = request.into_inner();
        let sel = select::Selection::of(&req, &self.shared.opts.node_name)?;
        // Subscribe before reading the history, so nothing falls in between. The history is
        // copied as pointers under the lock and converted while the client reads.
        let rx = self.shared.tx.subscribe();
        let history: Vec<Arc<FlowRecord>> = {
            let st = self.shared.state.lock().unwrap();
            st.history.iter().cloned().collect()
        };
        let head = sel.clone().head(history, &req);
        if !req.follow {
            return Ok(Response::new(head));
        }
        Ok(Response::new(Box::pin(head.chain(sel.live(rx)))))
    }

    async fn server_status(
        &self,
        _: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let (num, seen) = self.counts();
        let uptime = self.uptime_ns();
        Ok(Response::new(ServerStatusResponse {
            num_flows: num,
            max_flows: self.shared.opts.history as u64,
            seen_flows: seen,
            uptime_ns: uptime,
            num_connected_nodes: Some(1),
            num_unavailable_nodes: Some(0),
            unavailable_nodes: Vec::new(),
            version: format!("observer {}", env!("CARGO_PKG_VERSION")),
            flows_rate: if uptime > 0 {
                seen as f64 / (uptime as f64 / 1e9)
            } else {
                0.0
            },
        }))
    }

    async fn get_nodes(
        &self,
        _: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let (num, seen) = self.counts();
        Ok(Response::new(GetNodesResponse {
            nodes: vec![Node {
                name: self.shared.opts.node_name.to_string(),
                version: format!("observer {}", env!("CARGO_PKG_VERSION")),
                state: proto::relay::NodeState::NodeConnected as i32,
                uptime_ns: self.uptime_ns(),
                num_flows: num,
                max_flows: self.shared.opts.history as u64,
                seen_flows: seen,
                ..Default::default()
            }],
        }))
    }

    async fn get_namespaces(
        &self,
        _: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        let st = self.shared.state.lock().unwrap();
        let names: BTreeSet<&std::sync::Arc<str>> = st
            .history
            .iter()
            .flat_map(|r| [&r.source.namespace, &r.destination.namespace])
            .flatten()
            .collect();
        Ok(Response::new(GetNamespacesResponse {
            namespaces: names
                .into_iter()
                .map(|n| Namespace {
                    namespace: n.to_string(),
                    cluster: String::new(),
                })
                .collect(),
        }))
    }
}

impl HubbleApi {
    /// Records in the history, and records published since start.
    fn counts(&self) -> (u64, u64) {
        let st = self.shared.state.lock().unwrap();
        (st.history.len() as u64, st.metrics.records.values().sum())
    }

    fn uptime_ns(&self) -> u64 {
        self.shared
            .started
            .elapsed()
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}

struct HealthApi;

#[tonic::async_trait]
impl Health for HealthApi {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        if service.is_empty() || OBSERVER_SERVICES.contains(&service.as_str()) {
            Ok(Response::new(HealthCheckResponse {
                status: ServingStatus::Serving as i32,
            }))
        } else {
            Err(Status::not_found(format!("unknown service {service}")))
        }
    }

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let now = self.check(request).await?.into_inner();
        let once = futures_util::stream::once(async move { Ok(now) });
        Ok(Response::new(Box::pin(
            once.chain(futures_util::stream::pending()),
        )))
    }
}
