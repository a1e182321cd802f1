//! `observer policy matrix` and `observer policy explain` over a cluster's state.
use std::{collections::BTreeSet, fmt::Write as _};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::{
    engine::{Decision, Engine, Peer, Side},
    Protocol,
};
use crate::cluster::{Cluster, PodInfo};

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub port: u16,
    pub verdict: String,
    pub reason: String,
}

/// Every (protocol, port) any pod serves, in order.
pub fn served_ports(cluster: &Cluster) -> Vec<(Protocol, u16)> {
    let set: BTreeSet<(Protocol, u16)> = cluster
        .pods
        .iter()
        .flat_map(|p| p.ports.iter().map(|(_, n, pr)| (*pr, *n)))
        .collect();
    set.into_iter().collect()
}

pub fn pods_sorted(cluster: &Cluster) -> Vec<&PodInfo> {
    let mut v: Vec<&PodInfo> = cluster
        .pods
        .iter()
        .filter(|p| !p.host_network)
        .map(|p| &**p)
        .collect();
    v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    v
}

/// Every probe for every ordered pair of distinct pods, in matrix order.
pub fn probes<'a>(
    pods: &'a [&'a PodInfo],
    probes: &'a [(Protocol, u16)],
) -> impl Iterator<Item = (Protocol, u16, &'a PodInfo, &'a PodInfo)> + 'a {
    probes.iter().flat_map(move |(proto, port)| {
        pods.iter().flat_map(move |a| {
            pods.iter()
                .filter(move |b| !(a.namespace == b.namespace && a.name == b.name))
                .map(move |b| (*proto, *port, *a, *b))
        })
    })
}

/// The verdict for every ordered pair of distinct pods on every probe.
pub fn matrix(engine: &Engine<'_>, probe_list: &[(Protocol, u16)]) -> Vec<Cell> {
    let pods = pods_sorted(engine.cluster);
    let mut out = Vec::new();
    for (proto, port, a, b) in probes(&pods, probe_list) {
        let (proto, port) = (&proto, &port);
        let d = engine.decide(Peer::Pod(a), Peer::Pod(b), *proto, *port);
        out.push(Cell {
            from: format!("{}/{}", a.namespace, a.name),
            to: format!("{}/{}", b.namespace, b.name),
            protocol: proto.to_string(),
            port: *port,
            verdict: d.verdict.as_str().to_string(),
            reason: d.reason(),
        });
    }
    out
}

/// Upstream-style truth tables: one per probe, `.` allowed, `X` denied, `A` audit (would be
/// denied), `-` the pod itself.
pub fn render_table(cells: &[Cell], pods: &[String]) -> String {
    let mut out = String::new();
    let mut probes: Vec<(String, u16)> =
        cells.iter().map(|c| (c.protocol.clone(), c.port)).collect();
    probes.dedup();
    let w = pods.iter().map(|p| p.len()).max().unwrap_or(4).max(4);
    for (proto, port) in probes {
        let _ = writeln!(
            out,
            "{proto}/{port}  (rows: from, columns: to; . allowed, X denied, A audit)"
        );
        let _ = write!(out, "{:w$}", "");
        for (i, _) in pods.iter().enumerate() {
            let _ = write!(out, " {:>3}", i + 1);
        }
        out.push('\n');
        for (i, from) in pods.iter().enumerate() {
            let _ = write!(out, "{from:w$}");
            for to in pods {
                let mark = if from == to {
                    "-"
                } else {
                    match cells.iter().find(|c| {
                        c.protocol == proto && c.port == port && &c.from == from && &c.to == to
                    }) {
                        Some(c) if c.verdict == "allowed" => ".",
                        Some(c) if c.verdict == "audit" => "A",
                        Some(_) => "X",
                        None => "?",
                    }
                };
                let _ = write!(out, " {mark:>3}");
            }
            let _ = writeln!(out, "   {}", i + 1);
        }
        out.push('\n');
    }
    out
}

/// Resolves `ns/pod` or an IP address to a peer.
pub fn peer<'a>(cluster: &'a Cluster, s: &str) -> Result<Peer<'a>> {
    if let Ok(ip) = s.parse() {
        return Ok(
            match cluster
                .pods
                .iter()
                .find(|p| !p.host_network && p.ips.contains(&ip))
            {
                Some(p) => Peer::Pod(p),
                None => Peer::External(ip),
            },
        );
    }
    let Some((ns, name)) = s.split_once('/') else {
        bail!("{s:?}: expected namespace/pod or an IP address");
    };
    cluster
        .pods
        .iter()
        .find(|p| &*p.namespace == ns && &*p.name == name)
        .map(|p| Peer::Pod(p))
        .with_context(|| format!("no pod {ns}/{name} in the cluster"))
}

/// Where a connection to a Service's port lands: each ready backend of its EndpointSlices with
/// the port kube-proxy translates to. Policy judges those, never the Service address.
pub fn service_backends<'a>(
    cluster: &'a Cluster,
    service: &str,
    proto: Protocol,
    port: u16,
) -> Result<Vec<(Peer<'a>, u16)>> {
    let Some((ns, name)) = service.split_once('/') else {
        bail!("--to-service {service:?}: expected namespace/name");
    };
    let svc = cluster
        .services
        .iter()
        .find(|s| s.namespace == ns && s.name == name)
        .with_context(|| format!("no service {ns}/{name} in the cluster"))?;
    let sp = svc
        .ports
        .iter()
        .find(|p| p.protocol == proto && (p.port == port || p.node_port == Some(port)))
        .with_context(|| {
            let have: Vec<String> = svc
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, p.protocol))
                .collect();
            format!(
                "service {ns}/{name} has no port {port}/{proto} (it has {})",
                have.join(", ")
            )
        })?;
    let mut out = Vec::new();
    for slice in cluster
        .endpoint_slices
        .iter()
        .filter(|s| s.namespace == ns && s.service == name)
    {
        // The slice port of the same name (the only one when unnamed).
        let Some((_, target, _)) = slice
            .ports
            .iter()
            .find(|(n, _, pr)| *n == sp.name && *pr == proto)
        else {
            continue;
        };
        for ip in &slice.addresses {
            out.push((peer(cluster, &ip.to_string())?, *target));
        }
    }
    Ok(out)
}

/// Every pod towards a Service on each of its `probes` (Service ports): one cell per backend,
/// its port the one kube-proxy translates to.
pub fn service_matrix(
    engine: &Engine<'_>,
    service: &str,
    probe_list: &[(Protocol, u16)],
) -> Result<Vec<Cell>> {
    let pods = pods_sorted(engine.cluster);
    let mut out = Vec::new();
    for (proto, port) in probe_list {
        let backends = service_backends(engine.cluster, service, *proto, *port)?;
        for a in &pods {
            for (b, target) in &backends {
                let d = engine.decide(Peer::Pod(a), *b, *proto, *target);
                out.push(Cell {
                    from: format!("{}/{}", a.namespace, a.name),
                    to: b.to_string(),
                    protocol: proto.to_string(),
                    port: *target,
                    verdict: d.verdict.as_str().to_string(),
                    reason: d.reason(),
                });
            }
        }
    }
    Ok(out)
}

/// `N`, `N/PROTO` or `PROTO/N` (default TCP).
pub fn parse_port(s: &str) -> Result<(Protocol, u16)> {
    let (n, proto) = match s.split_once('/') {
        Some((a, b)) if Protocol::parse(a).is_some() => (b, Protocol::parse(a).unwrap()),
        Some((n, p)) => (
            n,
            Protocol::parse(p).with_context(|| format!("{p:?} is not TCP, UDP or SCTP"))?,
        ),
        None => (s, Protocol::Tcp),
    };
    let port: u16 = n
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .with_context(|| format!("{n:?} is not a port"))?;
    Ok((proto, port))
}

/// The human explanation of one decision.
pub fn explain(
    engine: &Engine<'_>,
    src: Peer<'_>,
    dst: Peer<'_>,
    proto: Protocol,
    port: u16,
    d: &Decision,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{src} -> {dst} {proto}/{port}: {}",
        d.verdict.as_str().to_uppercase()
    );
    let mut side = |title: &str, pod: Option<&PodInfo>, s: &Side, ingress: bool| {
        let _ = write!(out, "  {title}: ");
        let _ = match s {
            Side::NotApplicable => {
                writeln!(out, "not a pod of the cluster, nothing enforced there")
            }
            Side::NotIsolated => writeln!(
                out,
                "not isolated (no policy selects {} for {})",
                pod.map(|p| format!("{}/{}", p.namespace, p.name))
                    .unwrap_or_default(),
                if ingress { "ingress" } else { "egress" }
            ),
            Side::Loopback => writeln!(out, "a pod talking to itself is always allowed"),
            Side::FromNode => writeln!(
                out,
                "from the pod's own node: always allowed (kubelet probes; --deny-from-node to judge it)"
            ),
            Side::Allowed { policy, rule } => writeln!(
                out,
                "allowed by {policy}, {} rule {rule}",
                if ingress { "ingress" } else { "egress" }
            ),
            Side::Denied {
                isolated_by,
                invalid,
                audit,
            } => {
                let _ = writeln!(
                    out,
                    "{}: isolated by {} and no rule allows it",
                    if *audit {
                        "would be denied (audit)"
                    } else {
                        "denied"
                    },
                    isolated_by.join(", ")
                );
                if !invalid.is_empty() {
                    let _ = writeln!(
                        out,
                        "    invalid policies among them allow nothing: {}",
                        invalid.join(", ")
                    );
                }
                Ok(())
            }
        };
        if let Some(p) = pod {
            let iso = engine.isolating(p, ingress);
            if !iso.is_empty() {
                let _ = writeln!(
                    out,
                    "    isolating policies: {}",
                    iso.iter().map(|p| p.id()).collect::<Vec<_>>().join(", ")
                );
            }
        }
    };
    let (sp, dp) = (
        match src {
            Peer::Pod(p) => Some(p),
            _ => None,
        },
        match dst {
            Peer::Pod(p) => Some(p),
            _ => None,
        },
    );
    side("egress at source", sp, &d.egress, false);
    side("ingress at destination", dp, &d.ingress, true);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cluster, policy::Options};

    const CLUSTER: &str = r#"
- {apiVersion: v1, kind: Namespace, metadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}}
- {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: shop, labels: {app: web}}, spec: {containers: [{name: c, image: i}]}, status: {podIP: 10.0.0.1}}
- {apiVersion: v1, kind: Pod, metadata: {name: db-0, namespace: shop, labels: {app: db}}, spec: {containers: [{name: c, image: i}]}, status: {podIP: 10.0.0.2}}
- {apiVersion: v1, kind: Pod, metadata: {name: db-1, namespace: shop, labels: {app: db, tier: old}}, spec: {containers: [{name: c, image: i}]}, status: {podIP: 10.0.0.3}}
- {apiVersion: v1, kind: Service, metadata: {name: db, namespace: shop}, spec: {clusterIP: 10.96.0.20, ports: [{name: sql, port: 80, targetPort: 5432, nodePort: 30080}]}}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: db-abc, namespace: shop, labels: {kubernetes.io/service-name: db}}
  addressType: IPv4
  ports: [{name: sql, port: 5432}]
  endpoints:
  - {addresses: [10.0.0.2], conditions: {ready: true}}
  - {addresses: [10.0.0.3], conditions: {ready: true}}
  - {addresses: [10.0.0.9], conditions: {ready: false}}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: db-new-only, namespace: shop}
  spec:
    podSelector: {matchLabels: {app: db}}
    ingress:
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{port: 5432}]
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: old-closed, namespace: shop}
  spec:
    podSelector: {matchLabels: {tier: old}}
    policyTypes: [Egress]
"#;

    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        let v: Vec<serde_json::Value> = serde_norway::from_str(CLUSTER).unwrap();
        for o in v {
            cluster::add_object(&mut c, "test", o);
        }
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        c
    }

    #[test]
    fn a_service_is_answered_backend_by_backend_on_the_translated_port() {
        let c = cluster();
        let b = service_backends(&c, "shop/db", Protocol::Tcp, 80).unwrap();
        let names: Vec<(String, u16)> = b.iter().map(|(p, t)| (p.to_string(), *t)).collect();
        assert_eq!(
            names,
            [
                ("shop/db-0".to_string(), 5432),
                ("shop/db-1".to_string(), 5432)
            ],
            "ready backends only, on the target port"
        );
        // The NodePort leads to the same backends.
        assert_eq!(
            service_backends(&c, "shop/db", Protocol::Tcp, 30080)
                .unwrap()
                .len(),
            2
        );
        let err = service_backends(&c, "shop/db", Protocol::Udp, 80).unwrap_err();
        assert!(err.to_string().contains("no port 80/UDP"), "{err}");
        assert!(service_backends(&c, "shop/nope", Protocol::Tcp, 80).is_err());

        let e = Engine::new(&c, Options::default());
        let cells = service_matrix(&e, "shop/db", &[(Protocol::Tcp, 80)]).unwrap();
        let v = |from: &str, to: &str| {
            cells
                .iter()
                .find(|x| x.from == from && x.to == to)
                .map(|x| x.verdict.clone())
                .unwrap()
        };
        assert_eq!(v("shop/web", "shop/db-0"), "allowed");
        assert_eq!(v("shop/web", "shop/db-1"), "allowed");
        // db-1 may not open anything (egress isolated): its own Service is no way out.
        assert_eq!(v("shop/db-1", "shop/db-0"), "denied");
        assert!(cells.iter().all(|x| x.port == 5432));
    }
}
