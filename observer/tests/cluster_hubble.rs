//! The Hubble component (`manifests/hubble/`, in a kustomization beside `manifests/`) on the
//! real cluster, walked the way Hubble Relay walks it: from a node, the hubble-peer Service lists every node's observer as a
//! peer, and each peer serves flows over mutual TLS under the server name Relay checks. A client
//! certificate of another CA is refused. The cluster goes back to plain `manifests/` after.
use std::{path::Path, time::Duration};

use observer::hubble::proto::{
    observer::{
        get_flows_response::ResponseTypes, observer_client::ObserverClient, GetFlowsRequest,
        ServerStatusRequest,
    },
    peer::{peer_client::PeerClient, ChangeNotification, NotifyRequest},
};
use observer_tests::{cluster::*, in_netns, pki::Ca};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

struct Pki {
    ca: String,
    client: (String, String),
}

async fn channel(pki: &Pki, addr: &str, server_name: &str) -> Result<Channel, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .identity(Identity::from_pem(&pki.client.0, &pki.client.1))
        .domain_name(server_name);
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connecting to {addr} as {server_name}: {e:?}"))
}

/// What Relay does from a node: the peers through hubble-peer, then each peer's flows.
async fn walk(
    pki: Pki,
    peer_service: String,
    node: String,
) -> Result<Vec<(ChangeNotification, u64, usize)>, String> {
    // The local node's observer answers; its certificate covers every node's server name.
    let ch = channel(
        &pki,
        &peer_service,
        &format!("{node}.default.hubble-grpc.cilium.io"),
    )
    .await?;
    let mut stream = PeerClient::new(ch)
        .notify(NotifyRequest {})
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut peers = Vec::new();
    while peers.len() < 2 {
        let c = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .map_err(|_| "no peers within 10 s".to_string())?
            .map_err(|e| e.to_string())?
            .ok_or("peer stream ended")?;
        peers.push(c);
    }
    let mut out = Vec::new();
    for p in peers {
        let name = p
            .tls
            .as_ref()
            .map(|t| t.server_name.clone())
            .unwrap_or_default();
        let mut client = ObserverClient::new(channel(&pki, &p.address, &name).await?);
        let status = client
            .server_status(ServerStatusRequest {})
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let mut flows = client
            .get_flows(GetFlowsRequest {
                number: 5,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let mut n = 0;
        while let Some(r) = flows.message().await.map_err(|e| e.to_string())? {
            if let Some(ResponseTypes::Flow(f)) = r.response_types {
                if f.node_name != p.name {
                    return Err(format!("{} served a flow of {}", p.name, f.node_name));
                }
                n += 1;
            }
        }
        out.push((p, status.seen_flows, n));
    }
    Ok(out)
}

fn in_node<T: Send + 'static>(
    n: &Node,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    in_netns(&n.netns, move || {
        tokio::runtime::Runtime::new().unwrap().block_on(f)
    })
    .unwrap()
}

#[test]
fn relay_finds_every_node_through_hubble_peer_over_mutual_tls() {
    let Some(c) = cluster_or_skip() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::temp_dir().join(format!("obs-hubble-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // One server certificate for every node (the wildcard of the cluster's server names).
    let ca1 = Ca::new("observer hubble CA");
    let server = ca1.leaf("observer", &["*.default.hubble-grpc.cilium.io"], false);
    let relay = ca1.leaf("relay", &[], true);
    for (f, text) in [
        ("tls.crt", &server.0),
        ("tls.key", &server.1),
        ("ca.crt", &ca1.pem()),
    ] {
        std::fs::write(dir.join(f), text).unwrap();
    }
    let from = |f: &str| format!("--from-file={f}={}", dir.join(f).display());
    let _ = c.kubectl_out(&[
        "-n",
        "observer",
        "delete",
        "secret",
        "observer-hubble-tls",
        "--ignore-not-found",
    ]);
    c.kubectl_out(&[
        "-n",
        "observer",
        "create",
        "secret",
        "generic",
        "observer-hubble-tls",
        &from("tls.crt"),
        &from("tls.key"),
        &from("ca.crt"),
    ])
    .unwrap();
    // A kustomization of the user's own with the component, as docs/deploy.md shows it
    // (kustomize takes relative paths only).
    let overlay = root.join("target/observer-hubble");
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "resources: [../../manifests]\ncomponents: [../../manifests/hubble]\n",
    )
    .unwrap();
    c.kubectl_out(&["apply", "-k", overlay.to_str().unwrap()])
        .unwrap();
    c.kubectl_out(&[
        "-n",
        "observer",
        "rollout",
        "status",
        "ds/observer",
        "--timeout=240s",
    ])
    .unwrap();
    let ip = c
        .kubectl_out(&[
            "-n",
            "observer",
            "get",
            "svc",
            "hubble-peer",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .unwrap();
    let peer_service = format!("{}:443", ip.trim());

    let node1 = c.nodes()[0].clone();
    let pki = Pki {
        ca: ca1.pem(),
        client: relay,
    };
    let walked = in_node(&node1, walk(pki, peer_service.clone(), node1.name.clone()));

    let rogue_ca = Ca::new("some other CA");
    let rogue = Pki {
        ca: ca1.pem(),
        client: rogue_ca.leaf("mallory", &[], true),
    };
    let refused = in_node(&node1, walk(rogue, peer_service, node1.name.clone()));

    // Back to plain manifests/ whatever happened, for the tests after this one.
    c.kubectl_out(&["apply", "-k", root.join("manifests").to_str().unwrap()])
        .unwrap();
    for what in [
        ["service", "hubble-peer"],
        ["secret", "observer-hubble-tls"],
    ] {
        let _ = c.kubectl_out(&[
            "-n",
            "observer",
            "delete",
            what[0],
            what[1],
            "--ignore-not-found",
        ]);
    }
    c.kubectl_out(&[
        "-n",
        "observer",
        "rollout",
        "status",
        "ds/observer",
        "--timeout=240s",
    ])
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let walked = walked.unwrap();
    let mut names: Vec<&str> = walked.iter().map(|(p, _, _)| p.name.as_str()).collect();
    names.sort();
    let mut want: Vec<&str> = c.nodes().iter().map(|n| n.name.as_str()).collect();
    want.sort();
    assert_eq!(names, want);
    for (p, seen, n) in &walked {
        let node = c.node(&p.name);
        assert_eq!(p.address, format!("{}:4244", node.ip), "{p:?}");
        assert_eq!(
            p.tls.as_ref().unwrap().server_name,
            format!("{}.default.hubble-grpc.cilium.io", p.name)
        );
        eprintln!("{}: {seen} flows seen, {n} served", p.name);
    }
    assert!(
        refused.is_err(),
        "a client certificate of another CA was served"
    );
}
