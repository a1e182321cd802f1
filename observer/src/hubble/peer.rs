//! `peer.Peer/Notify`: the cluster's nodes as Hubble peers, which Hubble Relay connects to.
//! Every node runs observer with the same `--hubble-listen` port, so a peer's address is its
//! node address and that port.
use std::{collections::BTreeMap, pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::proto::peer::{
    peer_server::Peer, ChangeNotification, ChangeNotificationType, NotifyRequest, Tls,
};
use crate::daemon::Shared;

pub struct PeerApi {
    shared: Arc<Shared>,
}

impl PeerApi {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// Peer name -> (address, TLS server name).
type Peers = BTreeMap<String, (String, Option<String>)>;

fn peers(shared: &Shared) -> Peers {
    let remote = shared.opts.hubble_remote.as_ref();
    let cluster = shared.opts.cluster_name.clone();
    let st = shared.state.lock().unwrap();
    st.cluster
        .nodes
        .iter()
        .filter_map(|n| {
            let ip = n.addresses.first()?;
            let address = match remote {
                Some((listen, _)) => std::net::SocketAddr::new(*ip, listen.port()).to_string(),
                None => ip.to_string(),
            };
            let tls = remote.map(|_| format!("{}.{cluster}.hubble-grpc.cilium.io", n.name));
            Some((n.name.clone(), (address, tls)))
        })
        .collect()
}

fn change(
    name: &str,
    (address, tls): &(String, Option<String>),
    t: ChangeNotificationType,
) -> ChangeNotification {
    ChangeNotification {
        name: name.to_string(),
        address: address.clone(),
        r#type: t as i32,
        tls: tls.as_ref().map(|s| Tls {
            server_name: s.clone(),
        }),
    }
}

/// What changed from `old` to `new`.
fn diff(old: &Peers, new: &Peers) -> Vec<ChangeNotification> {
    let mut out = Vec::new();
    for (name, p) in new {
        match old.get(name) {
            None => out.push(change(name, p, ChangeNotificationType::PeerAdded)),
            Some(o) if o != p => out.push(change(name, p, ChangeNotificationType::PeerUpdated)),
            Some(_) => {}
        }
    }
    for (name, p) in old {
        if !new.contains_key(name) {
            out.push(change(name, p, ChangeNotificationType::PeerDeleted));
        }
    }
    out
}

#[tonic::async_trait]
impl Peer for PeerApi {
    type NotifyStream = Pin<Box<dyn Stream<Item = Result<ChangeNotification, Status>> + Send>>;

    /// Every known node as added, then the changes as the cluster view follows the API server.
    async fn notify(
        &self,
        _: Request<NotifyRequest>,
    ) -> Result<Response<Self::NotifyStream>, Status> {
        let shared = self.shared.clone();
        let stream = async_stream::stream! {
            let mut known = Peers::new();
            loop {
                let now = peers(&shared);
                for c in diff(&known, &now) {
                    yield Ok(c);
                }
                known = now;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_added_updated_and_deleted() {
        let p = |a: &str| {
            (
                a.to_string(),
                Some(format!("{a}.default.hubble-grpc.cilium.io")),
            )
        };
        let old: Peers = [
            ("n1".into(), p("10.0.0.1:4244")),
            ("n2".into(), p("10.0.0.2:4244")),
        ]
        .into();
        let new: Peers = [
            ("n1".into(), p("10.0.0.9:4244")),
            ("n3".into(), p("10.0.0.3:4244")),
        ]
        .into();
        let d = diff(&old, &new);
        let kinds: Vec<(String, i32)> = d.iter().map(|c| (c.name.clone(), c.r#type)).collect();
        assert_eq!(
            kinds,
            vec![
                ("n1".into(), ChangeNotificationType::PeerUpdated as i32),
                ("n3".into(), ChangeNotificationType::PeerAdded as i32),
                ("n2".into(), ChangeNotificationType::PeerDeleted as i32),
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }
}
