//! The Hubble API: the real `hubble` CLI (`../shared/tools/hubble`, or `$OBSERVER_HUBBLE_CLI`)
//! against a running daemon's `hubble.sock`: status, observe with filters, the policy behind
//! each verdict (default-deny drops included), and an older CLI too; plus a gRPC client of our
//! own, which runs wherever the CLI is not there.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use observer::hubble::proto::{
    flow::{FlowFilter, Verdict},
    observer::{
        ext::FlowExtension, get_flows_response::ResponseTypes, observer_client::ObserverClient,
        GetFlowsRequest, ServerStatusRequest,
    },
    peer::{peer_client::PeerClient, ChangeNotificationType, NotifyRequest},
};
use observer_tests::{in_netns, pki::Ca, spawn_in_netns, PodSpec, TestBed};
use serde_json::Value;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// The Hubble CLIs to test with: the current one and an old one (its protos predate the
/// policy fields).
fn hubble_clis() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("OBSERVER_HUBBLE_CLI") {
        return vec![PathBuf::from(p)];
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools");
    ["hubble", "hubble-0.11.6"]
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .collect()
}

fn hubble(cli: &Path, sock: &Path, args: &[&str]) -> String {
    let out = Command::new(cli)
        .args(args)
        .arg("--server")
        .arg(format!("unix://{}", sock.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        cli.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `hubble observe -o json` lines: the flows.
fn flows(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get("flow").cloned())
        .collect()
}

fn port(f: &Value) -> u64 {
    f["l4"]["TCP"]["destination_port"].as_u64().unwrap_or(0)
}

/// A pod x/a (app=client) and a server y/b (app=server) whose policy admits port 80 only; one
/// allowed and one denied connection.
fn scenario() -> (TestBed, observer_tests::Daemon) {
    let mut bed = TestBed::overlay("hub").unwrap();
    bed.add_pod(PodSpec {
        namespace: "x",
        name: "a",
        labels: &[("app", "client")],
        ports: &[],
    })
    .unwrap();
    bed.add_pod(PodSpec {
        namespace: "y",
        name: "b",
        labels: &[("app", "server")],
        ports: &[("http", 80, "TCP")],
    })
    .unwrap();
    std::fs::write(
        bed.cluster_dir().join("policy.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-http, namespace: y}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{ports: [{port: 80}]}]\n",
    )
    .unwrap();
    let daemon = bed
        .start_daemon(OBSERVER.as_ref(), &["--report-interval", "0"])
        .unwrap();
    let (a, b) = (bed.pod("a").clone(), bed.pod("b").clone());
    for port in [80u16, 81] {
        let l = in_netns(&b.netns, move || TcpListener::bind(("::", port)).unwrap()).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                drop(s)
            }
        });
    }
    let ok = spawn_in_netns(&a.netns, move || {
        TcpStream::connect_timeout(&SocketAddr::new(b.ip4, 80), Duration::from_secs(2)).is_ok()
    });
    assert!(ok.join().unwrap().unwrap(), "port 80 is allowed");
    let denied = spawn_in_netns(&a.netns, move || {
        TcpStream::connect_timeout(&SocketAddr::new(b.ip4, 81), Duration::from_millis(500)).is_ok()
    });
    assert!(!denied.join().unwrap().unwrap(), "port 81 is denied");
    std::thread::sleep(Duration::from_millis(1800));
    (bed, daemon)
}

fn hubble_sock(d: &observer_tests::Daemon) -> PathBuf {
    d.socket.with_file_name("hubble.sock")
}

#[test]
fn the_hubble_cli_observes_flows_with_their_policies() {
    let clis = hubble_clis();
    if clis.is_empty() {
        eprintln!("SKIPPED: no hubble CLI (../shared/tools/hubble or OBSERVER_HUBBLE_CLI)");
        return;
    }
    let (_bed, daemon) = scenario();
    let sock = hubble_sock(&daemon);
    let current = &clis[0];

    let status = hubble(current, &sock, &["status"]);
    assert!(
        status.contains("Healthcheck") && status.contains("Ok"),
        "{status}"
    );
    assert!(status.contains("Flows"), "{status}");

    let all = flows(&hubble(
        current,
        &sock,
        &["observe", "-o", "json", "--last", "100"],
    ));
    let drop = all
        .iter()
        .find(|f| f["verdict"] == "DROPPED")
        .unwrap_or_else(|| panic!("no dropped flow: {all:?}"));
    assert_eq!(port(drop), 81, "{drop}");
    assert_eq!(drop["source"]["namespace"], "x", "{drop}");
    assert_eq!(drop["source"]["pod_name"], "a", "{drop}");
    assert_eq!(drop["destination"]["pod_name"], "b", "{drop}");
    assert_eq!(drop["drop_reason_desc"], "POLICY_DENIED", "{drop}");
    assert_eq!(drop["event_type"]["type"], 1, "{drop}");
    // What Hubble leaves empty on a default-deny drop: the policy that isolates the pod.
    assert_eq!(drop["ingress_denied_by"][0]["name"], "b-http", "{drop}");
    assert_eq!(drop["ingress_denied_by"][0]["namespace"], "y", "{drop}");
    assert_eq!(
        drop["ingress_denied_by"][0]["kind"], "NetworkPolicy",
        "{drop}"
    );
    let labels = drop["source"]["labels"].as_array().unwrap();
    assert!(labels.iter().any(|l| l == "k8s:app=client"), "{drop}");
    let allowed = all
        .iter()
        .find(|f| f["verdict"] == "FORWARDED" && port(f) == 80)
        .unwrap_or_else(|| panic!("no forwarded flow to port 80: {all:?}"));
    assert_eq!(
        allowed["ingress_allowed_by"][0]["name"], "b-http",
        "{allowed}"
    );
    // One record per connection, seen from the pod that opened it (both pods are local).
    assert_eq!(allowed["traffic_direction"], "EGRESS", "{allowed}");

    // Filters as `hubble observe` sends them.
    let only_drops = flows(&hubble(
        current,
        &sock,
        &["observe", "-o", "json", "--verdict", "DROPPED"],
    ));
    assert!(!only_drops.is_empty() && only_drops.iter().all(|f| f["verdict"] == "DROPPED"));
    let to_80 = flows(&hubble(
        current,
        &sock,
        &[
            "observe",
            "-o",
            "json",
            "--to-pod",
            "y/b",
            "--to-port",
            "80",
        ],
    ));
    assert!(
        !to_80.is_empty() && to_80.iter().all(|f| port(f) == 80),
        "{to_80:?}"
    );
    let by_label = flows(&hubble(
        current,
        &sock,
        &[
            "observe",
            "-o",
            "json",
            "--from-label",
            "app=client",
            "--last",
            "100",
        ],
    ));
    let has_label = |f: &Value| {
        f["source"]["labels"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l == "k8s:app=client"))
    };
    assert!(by_label.iter().all(has_label), "{by_label:?}");
    let uuids: Vec<&Value> = by_label.iter().map(|f| &f["uuid"]).collect();
    for f in all.iter().filter(|f| has_label(f)) {
        assert!(
            uuids.contains(&&f["uuid"]),
            "{f} missing from --from-label app=client"
        );
    }
    let none = flows(&hubble(
        current,
        &sock,
        &["observe", "-o", "json", "--namespace", "nowhere"],
    ));
    assert!(none.is_empty(), "{none:?}");
    // The compact output people read.
    let compact = hubble(current, &sock, &["observe", "--verdict", "DROPPED"]);
    eprintln!("hubble observe --verdict DROPPED:\n{compact}");
    assert!(
        compact.contains("x/a") && compact.contains("y/b:81"),
        "{compact}"
    );
    assert!(compact.contains("DROPPED"), "{compact}");

    // An older CLI, whose protos know neither the policy fields nor the translated source.
    if let Some(old) = clis.get(1) {
        let out = flows(&hubble(
            old,
            &sock,
            &["observe", "-o", "json", "--last", "100"],
        ));
        // Its protos predate `uuid`: flows are told apart by time, addresses and ports.
        let key = |f: &Value| (f["time"].clone(), f["IP"].clone(), f["l4"].clone());
        let seen: Vec<_> = out.iter().map(key).collect();
        for f in &all {
            assert!(seen.contains(&key(f)), "the old CLI misses {f}");
        }
        assert!(out.iter().any(|f| f["verdict"] == "DROPPED"));
    }
}

/// The same API through a gRPC client of our own over the unix socket.
#[test]
fn the_hubble_api_answers_a_grpc_client() {
    let (_bed, daemon) = scenario();
    let sock = hubble_sock(&daemon);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let channel = unix_channel(sock).await;
        let mut client = ObserverClient::new(channel);
        let status = client
            .server_status(ServerStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(
            status.num_flows >= 2 && status.seen_flows >= status.num_flows,
            "{status:?}"
        );
        assert_eq!(status.num_connected_nodes, Some(1));

        let req = GetFlowsRequest {
            number: 10,
            whitelist: vec![FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut stream = client.get_flows(req).await.unwrap().into_inner();
        let mut dropped = Vec::new();
        // A non-follow request ends the stream.
        while let Some(r) = stream.message().await.unwrap() {
            if let Some(ResponseTypes::Flow(f)) = r.response_types {
                dropped.push(f);
            }
        }
        assert!(!dropped.is_empty());
        for f in &dropped {
            assert_eq!(f.verdict, Verdict::Dropped as i32);
            assert_eq!(f.ingress_denied_by[0].name, "b-http");
        }
        // What Hubble has no field for, in `extensions`, for a client that asks for it.
        let req = GetFlowsRequest {
            number: 100,
            field_mask: Some(prost_types::FieldMask {
                paths: vec!["extensions".into()],
            }),
            whitelist: vec![FlowFilter {
                destination_port: vec!["80".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut stream = client.get_flows(req).await.unwrap().into_inner();
        let mut exts = Vec::new();
        while let Some(r) = stream.message().await.unwrap() {
            if let Some(ResponseTypes::Flow(f)) = r.response_types {
                // The mask keeps only what it names; the filter saw the whole flow.
                assert!(
                    f.ip.is_none() && f.l4.is_none() && f.uuid.is_empty() && f.source.is_none(),
                    "masked out but sent: {f:?}"
                );
                let any = f.extensions.expect("extensions asked for");
                assert_eq!(
                    any.type_url,
                    "type.googleapis.com/observer.ext.FlowExtension"
                );
                exts.push(<FlowExtension as prost::Message>::decode(&any.value[..]).unwrap());
            }
        }
        assert!(
            exts.iter().all(|e| e.traffic_class == "pod-to-pod-local"),
            "{exts:?}"
        );
        let close = exts
            .iter()
            .find(|e| e.event == "close")
            .unwrap_or_else(|| panic!("no close record of the port-80 connection: {exts:?}"));
        let c = close.counters.unwrap();
        assert!(c.packets_out >= 2 && c.packets_in >= 2, "{c:?}");
        // Not asked for: not sent (a client that cannot resolve it could not render the flow).
        let req = GetFlowsRequest {
            number: 1,
            ..Default::default()
        };
        let mut stream = client.get_flows(req).await.unwrap().into_inner();
        while let Some(r) = stream.message().await.unwrap() {
            if let Some(ResponseTypes::Flow(f)) = r.response_types {
                assert!(f.extensions.is_none());
            }
        }

        // A filter on what observer has no data for is refused, naming the field.
        let req = GetFlowsRequest {
            whitelist: vec![FlowFilter {
                http_method: vec!["GET".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = client.get_flows(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("http_method"), "{}", err.message());
    });
}

/// `--hubble-listen`: the Hubble API over TCP with mutual TLS, server names as Hubble Relay
/// expects them, and `peer.Peer/Notify` listing the cluster's nodes at that port.
#[test]
fn the_hubble_api_over_mutual_tls_and_its_peers() {
    let mut bed = TestBed::overlay("hubtls").unwrap();
    bed.add_app_pods("x", &[("a", "client"), ("b", "server")])
        .unwrap();
    let dir = bed.dir.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let ca1 = Ca::new("observer test CA");
    std::fs::write(dir.join("ca.pem"), ca1.pem()).unwrap();
    let server_name = format!(
        "{}.default.hubble-grpc.cilium.io",
        observer_tests::NODE_NAME
    );
    ca1.write_leaf(&dir, "daemon", &[&server_name], false);
    ca1.write_leaf(&dir, "relay", &[], true);
    let rogue = Ca::new("some other CA");
    rogue.write_leaf(&dir, "mallory", &[], true);
    let p = |f: &str| dir.join(f).display().to_string();
    let daemon = bed
        .start_daemon(
            OBSERVER.as_ref(),
            &[
                "--hubble-listen",
                "127.0.0.1:4244",
                "--tls-cert",
                &p("daemon.pem"),
                "--tls-key",
                &p("daemon.key"),
                "--tls-client-ca",
                &p("ca.pem"),
            ],
        )
        .unwrap();

    if let Some(cli) = hubble_clis().first() {
        let run = |client: &str| {
            Command::new("ip")
                .args(["netns", "exec", &bed.node_ns])
                .arg(cli)
                .args(["status", "--server", "127.0.0.1:4244", "--tls"])
                .args(["--tls-ca-cert-files", &p("ca.pem")])
                .args(["--tls-client-cert-file", &p(&format!("{client}.pem"))])
                .args(["--tls-client-key-file", &p(&format!("{client}.key"))])
                .args(["--tls-server-name", &server_name])
                .output()
                .unwrap()
        };
        let ok = run("relay");
        let out = String::from_utf8_lossy(&ok.stdout);
        assert!(
            ok.status.success() && out.contains("Ok"),
            "{out}{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let refused = run("mallory");
        assert!(
            !refused.status.success(),
            "a client of another CA was served"
        );
    } else {
        eprintln!("SKIPPED (TLS with the hubble CLI): no hubble CLI");
    }

    // The peers, over the unix socket (what Hubble Relay reads through the hubble-peer Service).
    let sock = hubble_sock(&daemon);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let peers = rt.block_on(async move {
        let channel = unix_channel(sock).await;
        let mut client = PeerClient::new(channel);
        let mut stream = client.notify(NotifyRequest {}).await.unwrap().into_inner();
        let mut peers = Vec::new();
        // Every node of the test bed's cluster, added.
        while peers.len() < 2 {
            peers.push(stream.message().await.unwrap().unwrap());
        }
        peers
    });
    let mut names: Vec<&str> = peers.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [observer_tests::NODE_NAME, observer_tests::NODE2_NAME]
    );
    for c in &peers {
        assert_eq!(c.r#type, ChangeNotificationType::PeerAdded as i32, "{c:?}");
        assert!(c.address.ends_with(":4244"), "{c:?}");
        assert_eq!(
            c.tls.as_ref().unwrap().server_name,
            format!("{}.default.hubble-grpc.cilium.io", c.name)
        );
    }
}

async fn unix_channel(sock: PathBuf) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// The flows a non-follow request returns (the stream must end).
async fn collect(
    client: &mut ObserverClient<tonic::transport::Channel>,
    req: GetFlowsRequest,
) -> Vec<observer::hubble::proto::flow::Flow> {
    let mut stream = client.get_flows(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        if let Some(ResponseTypes::Flow(f)) = r.response_types {
            out.push(f);
        }
    }
    out
}

fn filtered(f: FlowFilter) -> GetFlowsRequest {
    GetFlowsRequest {
        whitelist: vec![f],
        ..Default::default()
    }
}

/// GetFlows' request fields and filter fields against the known traffic of `scenario`, and
/// follow mode with a connection made while the stream is open.
#[test]
fn get_flows_fields_and_filters_keep_what_they_promise() {
    use observer::hubble::proto::flow::{
        layer4::Protocol, EventTypeFilter, Flow, TrafficDirection,
    };
    let (bed, daemon) = scenario();
    let (a, b) = (bed.pod("a").clone(), bed.pod("b").clone());
    let sock = hubble_sock(&daemon);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut client = ObserverClient::new(unix_channel(sock).await);
        let all = collect(&mut client, GetFlowsRequest::default()).await;
        assert!(all.len() >= 3, "{all:?}");
        let time = |f: &Flow| std::time::SystemTime::try_from(f.time.unwrap()).unwrap();
        let dport = |f: &Flow| match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(Protocol::Tcp(t)) => t.destination_port,
            _ => 0,
        };

        // number, first, since, until.
        let first = collect(
            &mut client,
            GetFlowsRequest {
                number: 1,
                first: true,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(first.len(), 1);
        assert!(all.iter().all(|f| time(f) >= time(&first[0])));
        let last = collect(
            &mut client,
            GetFlowsRequest {
                number: 2,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(last.len(), 2);
        // The newest, in order (a pod's IPv6 multicast report may have come since `all`).
        assert!(time(&last[0]) <= time(&last[1]));
        assert!(time(&last[1]) >= time(all.last().unwrap()));
        let later = std::time::SystemTime::now() + Duration::from_secs(3600);
        let since_later = GetFlowsRequest {
            since: Some(later.into()),
            ..Default::default()
        };
        assert!(collect(&mut client, since_later).await.is_empty());
        let until_epoch = GetFlowsRequest {
            until: Some(std::time::UNIX_EPOCH.into()),
            ..Default::default()
        };
        assert!(collect(&mut client, until_epoch).await.is_empty());

        // Filter fields, each against what the traffic was.
        let drops = collect(
            &mut client,
            filtered(FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..Default::default()
            }),
        )
        .await;
        assert!(!drops.is_empty() && drops.iter().all(|f| dport(f) == 81));
        let not_drops = collect(
            &mut client,
            GetFlowsRequest {
                blacklist: vec![FlowFilter {
                    verdict: vec![Verdict::Dropped as i32],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await;
        assert!(not_drops
            .iter()
            .all(|f| f.verdict != Verdict::Dropped as i32));
        assert!(not_drops.len() + drops.len() >= all.len());
        let by_event = collect(
            &mut client,
            filtered(FlowFilter {
                event_type: vec![EventTypeFilter {
                    r#type: 1,
                    match_sub_type: true,
                    sub_type: 133,
                }],
                ..Default::default()
            }),
        )
        .await;
        assert_eq!(by_event.len(), drops.len(), "drop events, policy denied");
        let to_81 = collect(
            &mut client,
            filtered(FlowFilter {
                destination_port: vec!["81".into()],
                protocol: vec!["TCP".into()],
                ..Default::default()
            }),
        )
        .await;
        assert_eq!(to_81.len(), drops.len());
        let from_a = collect(
            &mut client,
            filtered(FlowFilter {
                source_ip: vec![format!("{}/32", a.ip4)],
                destination_pod: vec!["y/b".into()],
                source_pod: vec!["x/".into()],
                traffic_direction: vec![TrafficDirection::Egress as i32],
                ..Default::default()
            }),
        )
        .await;
        assert!(!from_a.is_empty());
        assert!(from_a.iter().all(|f| {
            let ip = f.ip.as_ref().unwrap();
            ip.source == a.ip4.to_string() && ip.destination == b.ip4.to_string()
        }));
        let nowhere = collect(
            &mut client,
            filtered(FlowFilter {
                source_pod: vec!["y/".into()],
                destination_ip: vec![a.ip4.to_string()],
                ..Default::default()
            }),
        )
        .await;
        assert!(nowhere.is_empty(), "{nowhere:?}");

        // Follow: nothing from the history (number 0), then a connection made now.
        let mut stream = client
            .get_flows(GetFlowsRequest {
                follow: true,
                whitelist: vec![FlowFilter {
                    destination_port: vec!["80".into()],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let dst = SocketAddr::new(b.ip4, 80);
        let ok = spawn_in_netns(&a.netns, move || {
            std::thread::sleep(Duration::from_millis(300));
            TcpStream::connect_timeout(&dst, Duration::from_secs(2)).is_ok()
        });
        let got = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a followed flow within 10 s")
            .unwrap()
            .unwrap();
        assert!(ok.join().unwrap().unwrap());
        let Some(ResponseTypes::Flow(f)) = got.response_types else {
            panic!("{got:?}")
        };
        assert_eq!(dport(&f), 80);
        assert!(
            time(&f) > time(all.last().unwrap()),
            "a new flow, not history"
        );
    });
}
