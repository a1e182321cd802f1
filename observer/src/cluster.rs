//! The daemon's view of the cluster: namespaces, pods and nodes, whatever the source (YAML on
//! disk now, the API server later), and what it means for the datapath maps.
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context as _, Result};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Namespace;
use observer_common::{IpKey, IpcacheKeyData};
use serde::Deserialize;

use crate::policy::{model, Policy, Protocol};

/// One copy of each distinct value pods repeat: label sets (a rollout's pods carry one),
/// namespace, node and workload names, container port lists. At 250,000 pods the copies were
/// most of the daemon's memory. Values no pod uses any more are dropped as new ones come.
#[derive(Debug, Default)]
pub struct Interner {
    labels: HashSet<Arc<BTreeMap<String, String>>>,
    names: HashSet<Arc<str>>,
    ports: HashSet<Arc<[ContainerPort]>>,
    added: usize,
}

impl Interner {
    /// The pod with every repeated value replaced by the shared copy.
    pub fn pod(&mut self, mut p: PodInfo) -> PodInfo {
        self.sweep();
        p.labels = share(&mut self.labels, p.labels, &mut self.added);
        p.namespace = share(&mut self.names, p.namespace, &mut self.added);
        p.node = share(&mut self.names, p.node, &mut self.added);
        p.workload = p
            .workload
            .map(|w| share(&mut self.names, w, &mut self.added));
        p.ports = share(&mut self.ports, p.ports, &mut self.added);
        p
    }

    /// Drops values only this interner holds, once it has taken in as many new ones as it keeps.
    fn sweep(&mut self) {
        if self.added > (self.labels.len() + self.names.len() + self.ports.len()).max(1024) {
            self.labels.retain(|s| Arc::strong_count(s) > 1);
            self.names.retain(|s| Arc::strong_count(s) > 1);
            self.ports.retain(|s| Arc::strong_count(s) > 1);
            self.added = 0;
        }
    }
}

fn share<T: ?Sized + Eq + std::hash::Hash>(
    set: &mut HashSet<Arc<T>>,
    v: Arc<T>,
    added: &mut usize,
) -> Arc<T> {
    if let Some(s) = set.get(&*v) {
        return s.clone();
    }
    *added += 1;
    set.insert(v.clone());
    v
}

/// (namespace, name) of a pod or policy, sharing the object's own copies of both.
pub type Key = (Arc<str>, Arc<str>);

/// A pod, ordered by (namespace, name): indexes hold the shared pod, not a copy of its key,
/// and find it by a [`Key`] through [`Named`].
#[derive(Clone, Debug)]
pub struct PodRef(pub Arc<PodInfo>);

/// Something with a (namespace, name), compared by it: a [`PodRef`] in an index is found
/// by a [`Key`].
pub trait Named {
    fn names(&self) -> (&str, &str);
}

impl Named for PodRef {
    fn names(&self) -> (&str, &str) {
        (&self.0.namespace, &self.0.name)
    }
}

// The same order as `dyn Named`'s, as `Borrow` requires.
impl PartialEq for PodRef {
    fn eq(&self, o: &Self) -> bool {
        self.names() == o.names()
    }
}

impl Eq for PodRef {}

impl PartialOrd for PodRef {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for PodRef {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.names().cmp(&o.names())
    }
}

impl Named for Key {
    fn names(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn Named + 'a> for PodRef {
    fn borrow(&self) -> &(dyn Named + 'a) {
        self
    }
}

impl PartialEq for dyn Named + '_ {
    fn eq(&self, o: &Self) -> bool {
        self.names() == o.names()
    }
}

impl Eq for dyn Named + '_ {}

impl PartialOrd for dyn Named + '_ {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for dyn Named + '_ {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.names().cmp(&o.names())
    }
}

/// A container port: (name, number, protocol), for named ports in policies.
pub type ContainerPort = (String, u16, Protocol);

/// A pod as the datapath and the flow logs need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// The shared fields ([`Interner`]) are one copy for all the pods that repeat them.
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub node: Arc<str>,
    pub ips: Box<[IpAddr]>,
    pub labels: Arc<BTreeMap<String, String>>,
    /// `Kind/name` of the controlling owner, if any.
    pub workload: Option<Arc<str>>,
    pub host_network: bool,
    pub ports: Arc<[ContainerPort]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
}

/// A Service as policy and flow records need it: where pods reach it (frontends) and under
/// which ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs`, `spec.externalIPs` and `status.loadBalancer.ingress[].ip`.
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// NodePort and LoadBalancer Services: reached on every node's addresses too.
    pub node_port: Option<u16>,
}

impl ServiceInfo {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The id the kernel's Service maps carry: FNV-1a of `namespace/name`, never 0.
    pub fn kernel_id(&self) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for b in self.id().bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        h.max(1)
    }
}

/// An EndpointSlice: the backends kube-proxy spreads a Service's connections over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    pub namespace: String,
    pub name: String,
    /// Label `kubernetes.io/service-name`.
    pub service: String,
    /// Ready endpoints' addresses.
    pub addresses: Vec<IpAddr>,
    /// (name, port, protocol).
    pub ports: Vec<(String, u16, Protocol)>,
}

#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Shared, not copied, between the watch caches, the compiler and the flow enricher.
    pub pods: Vec<std::sync::Arc<PodInfo>>,
    pub nodes: Vec<NodeInfo>,
    /// Shared, not copied, like the pods: a sync hands the same policies to the compiler and
    /// the enricher.
    pub policies: Vec<std::sync::Arc<Policy>>,
    pub services: Vec<ServiceInfo>,
    pub endpoint_slices: Vec<EndpointSliceInfo>,
    /// Namespaces annotated `observer.dev/audit: "true"`: their policies are in audit mode.
    pub audit_namespaces: std::collections::BTreeSet<String>,
    /// Objects that could not be used, each with the reason naming object and field.
    pub errors: Vec<String>,
}

impl PodInfo {
    pub fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

impl Cluster {
    /// One copy of each value the pods repeat ([`Interner`]).
    pub fn share(&mut self) {
        let mut interner = Interner::default();
        for p in &mut self.pods {
            *p = Arc::new(interner.pod(Arc::unwrap_or_clone(p.clone())));
        }
    }
}

pub fn pod_info(pod: &crate::trimmed::Pod) -> Result<PodInfo> {
    let meta = &pod.metadata;
    let name = meta.name.clone().context("metadata.name missing")?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips = Vec::new();
    if let Some(st) = status {
        let listed = st.pod_ips.iter().flatten().map(|p| p.ip.as_str());
        for s in st.pod_ip.as_deref().into_iter().chain(listed) {
            let ip: IpAddr = s.parse().with_context(|| {
                format!("pod {namespace}/{name}: status.podIP {s:?} is not an IP")
            })?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    let mut ports = Vec::new();
    for (ci, c) in spec
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let proto = match p.protocol.as_deref() {
                None => Protocol::Tcp,
                Some(s) => Protocol::parse(s).with_context(|| {
                    format!("pod {namespace}/{name}: spec.containers[{ci}].ports[{pi}].protocol {s:?} is not TCP, UDP or SCTP")
                })?,
            };
            let number = u16::try_from(p.container_port).ok().filter(|n| *n > 0).with_context(|| {
                format!("pod {namespace}/{name}: spec.containers[{ci}].ports[{pi}].containerPort {} is not a port", p.container_port)
            })?;
            ports.push((p.name.clone().unwrap_or_default(), number, proto));
        }
    }
    let workload = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| format!("{}/{}", o.kind, o.name));
    Ok(PodInfo {
        namespace: namespace.into(),
        name: name.into(),
        node: spec
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default()
            .into(),
        ips: ips.into(),
        labels: Arc::new(meta.labels.clone().unwrap_or_default()),
        workload: workload.map(Into::into),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        ports: ports.into(),
    })
}

pub fn service_info(svc: &crate::trimmed::Service) -> Result<ServiceInfo> {
    let meta = &svc.metadata;
    let name = meta.name.clone().context("Service metadata.name missing")?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let what = format!("service {namespace}/{name}");
    let spec = svc.spec.clone().unwrap_or_default();
    let mut ips = Vec::new();
    let listed = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(|s| ("spec.clusterIPs", s));
    let cluster_ip = spec.cluster_ip.iter().map(|s| ("spec.clusterIP", s));
    let external = spec
        .external_ips
        .iter()
        .flatten()
        .map(|s| ("spec.externalIPs", s));
    let lb = svc
        .status
        .iter()
        .flat_map(|s| s.load_balancer.iter())
        .flat_map(|l| l.ingress.iter().flatten())
        .filter_map(|i| i.ip.as_ref())
        .map(|s| ("status.loadBalancer.ingress[].ip", s));
    for (field, s) in cluster_ip.chain(listed).chain(external).chain(lb) {
        if s.is_empty() || s == "None" {
            continue; // headless: clients reach the pods directly
        }
        let ip: IpAddr = s
            .parse()
            .with_context(|| format!("{what}: {field} {s:?} is not an IP"))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(s) => Protocol::parse(s).with_context(|| {
                format!("{what}: spec.ports[{i}].protocol {s:?} is not TCP, UDP or SCTP")
            })?,
        };
        let port = u16::try_from(p.port)
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("{what}: spec.ports[{i}].port {} is not a port", p.port))?;
        let node_port =
            match p.node_port {
                None | Some(0) => None,
                Some(n) => Some(u16::try_from(n).ok().filter(|n| *n > 0).with_context(|| {
                    format!("{what}: spec.ports[{i}].nodePort {n} is not a port")
                })?),
            };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port,
            protocol,
            node_port,
        });
    }
    Ok(ServiceInfo {
        namespace,
        name,
        ips,
        ports,
    })
}

pub fn endpoint_slice_info(slice: &crate::trimmed::EndpointSlice) -> Result<EndpointSliceInfo> {
    let meta = &slice.metadata;
    let name = meta
        .name
        .clone()
        .context("EndpointSlice metadata.name missing")?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let what = format!("endpointslice {namespace}/{name}");
    let service = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .cloned()
        .unwrap_or_default();
    let mut addresses = Vec::new();
    for (i, e) in slice.endpoints.iter().flatten().enumerate() {
        // Unready endpoints get no traffic from kube-proxy.
        if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        for a in &e.addresses {
            let ip: IpAddr = a
                .parse()
                .with_context(|| format!("{what}: endpoints[{i}].addresses {a:?} is not an IP"))?;
            addresses.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(s) => Protocol::parse(s).with_context(|| {
                format!("{what}: ports[{i}].protocol {s:?} is not TCP, UDP or SCTP")
            })?,
        };
        if let Some(n) = p.port.and_then(|n| u16::try_from(n).ok()) {
            ports.push((p.name.clone().unwrap_or_default(), n, protocol));
        }
    }
    Ok(EndpointSliceInfo {
        namespace,
        name,
        service,
        addresses,
        ports,
    })
}

pub fn node_info(node: &crate::trimmed::Node) -> Result<NodeInfo> {
    let name = node
        .metadata
        .name
        .clone()
        .context("Node metadata.name missing")?;
    let mut addresses = Vec::new();
    for a in node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
    {
        if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
            let ip = a.address.parse().with_context(|| {
                format!("node {name}: status.addresses {:?} is not an IP", a.address)
            })?;
            addresses.push(ip);
        }
    }
    let mut pod_cidrs = Vec::new();
    if let Some(spec) = &node.spec {
        for c in spec.pod_cidr.iter().chain(spec.pod_cidrs.iter().flatten()) {
            let net: IpNet = c
                .parse()
                .with_context(|| format!("node {name}: spec.podCIDR {c:?} is not a CIDR"))?;
            if !pod_cidrs.contains(&net) {
                pod_cidrs.push(net);
            }
        }
    }
    Ok(NodeInfo {
        name,
        addresses,
        pod_cidrs,
    })
}

#[derive(Deserialize)]
struct TypeMeta {
    kind: Option<String>,
}

#[derive(Deserialize)]
struct List {
    items: Vec<serde_json::Value>,
}

/// Adds one Kubernetes object (or List) to the cluster; problems land in `cluster.errors`.
pub fn add_object(cluster: &mut Cluster, origin: &str, value: serde_json::Value) {
    let kind = match serde_json::from_value::<TypeMeta>(value.clone()) {
        Ok(TypeMeta { kind: Some(k) }) => k,
        _ => {
            cluster
                .errors
                .push(format!("{origin}: object without a kind"));
            return;
        }
    };
    let result: Result<()> = (|| {
        match kind.as_str() {
            "List" | "PodList" | "NamespaceList" | "NodeList" | "NetworkPolicyList"
            | "ServiceList" | "EndpointSliceList" => {
                let list: List = serde_json::from_value(value)?;
                for item in list.items {
                    add_object(cluster, origin, item);
                }
            }
            "Namespace" => {
                let ns: Namespace = serde_json::from_value(value)?;
                let name = ns
                    .metadata
                    .name
                    .context("Namespace metadata.name missing")?;
                let audit = ns
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(model::AUDIT_ANNOTATION));
                if audit.is_some_and(|v| v == "true") {
                    cluster.audit_namespaces.insert(name.clone());
                }
                cluster
                    .namespaces
                    .insert(name, ns.metadata.labels.unwrap_or_default());
            }
            "Pod" => {
                let pod: crate::trimmed::Pod = serde_json::from_value(value)?;
                cluster.pods.push(std::sync::Arc::new(pod_info(&pod)?));
            }
            "Node" => {
                let node: crate::trimmed::Node = serde_json::from_value(value)?;
                cluster.nodes.push(node_info(&node)?);
            }
            "Service" => {
                let svc: crate::trimmed::Service = serde_json::from_value(value)?;
                cluster.services.push(service_info(&svc)?);
            }
            "EndpointSlice" => {
                let slice: crate::trimmed::EndpointSlice = serde_json::from_value(value)?;
                cluster.endpoint_slices.push(endpoint_slice_info(&slice)?);
            }
            "NetworkPolicy" => {
                let np: k8s_openapi::api::networking::v1::NetworkPolicy =
                    serde_json::from_value(value)?;
                let p = model::compile(&np);
                for e in &p.errors {
                    cluster.errors.push(format!("{origin}: {e}"));
                }
                cluster.policies.push(std::sync::Arc::new(p));
            }
            other => bail!("kind {other} is not used by observer"),
        }
        Ok(())
    })();
    if let Err(e) = result {
        cluster.errors.push(format!("{origin}: {e:#}"));
    }
}

/// Every YAML/JSON document under `paths` (files or folders, recursively), as JSON values.
pub fn read_documents(paths: &[PathBuf]) -> Result<Vec<(String, serde_json::Value)>> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for (i, de) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let origin = format!("{} (document {})", f.display(), i + 1);
            let value = serde_json::Value::deserialize(de)
                .with_context(|| format!("{origin}: not valid YAML"))?;
            if value.is_null() {
                continue;
            }
            docs.push((origin, value));
        }
    }
    Ok(docs)
}

fn collect_files(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(p)? {
            let path = entry?.path();
            if path.is_dir() {
                collect_files(&path, out)?;
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(path);
            }
        }
    } else {
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// What the source's files look like now (path, modification time, size): unchanged files need
/// not be parsed and compiled again.
pub fn fingerprint(paths: &[PathBuf]) -> Result<Vec<(PathBuf, std::time::SystemTime, u64)>> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(&f).with_context(|| format!("reading {}", f.display()))?;
            Ok((f, m.modified()?, m.len()))
        })
        .collect()
}

/// Reads a cluster from YAML on disk. Unusable objects are reported in `errors`; the rest loads.
pub fn load_dir(paths: &[PathBuf]) -> Result<Cluster> {
    let mut cluster = Cluster::default();
    for (origin, value) in read_documents(paths)? {
        add_object(&mut cluster, &origin, value);
    }
    cluster.share();
    Ok(cluster)
}

pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            family: observer_common::AF_INET,
            _pad: [0; 3],
        },
        IpAddr::V6(v6) => IpKey {
            addr: v6_words(&v6.octets()),
            family: observer_common::AF_INET6,
            _pad: [0; 3],
        },
    }
}

fn v6_words(o: &[u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, c) in o.chunks(4).enumerate() {
        w[i] = u32::from_ne_bytes(c.try_into().unwrap());
    }
    w
}

/// Address from a key word array, as the kernel stored it (network byte order in memory).
pub fn addr_from(family: u8, addr: &[u32; 4]) -> IpAddr {
    if family == observer_common::AF_INET {
        IpAddr::V4(std::net::Ipv4Addr::from(addr[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(std::net::Ipv6Addr::from(o))
    }
}

/// An ipcache prefix: (prefix length including the 32-bit family tag, key data).
pub fn ipcache_key(net: IpNet) -> (u32, IpcacheKeyData) {
    let k = ip_key(net.network());
    let fam = k.family as u32;
    (
        32 + net.prefix_len() as u32,
        IpcacheKeyData {
            data: [fam, k.addr[0], k.addr[1], k.addr[2], k.addr[3]],
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_common::RemoteKind;

    const YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: x
  labels: {pod: a}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: a-123, uid: u, controller: true}]
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: "fd00:10:244:1::a"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x}
spec: {nodeName: n2, containers: [{name: c, image: i}]}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: x}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: not-an-ip}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: InternalIP, address: 10.224.0.5}]}
"#;

    fn cluster() -> Cluster {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("observer-cluster-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("c.yaml"), YAML).unwrap();
        let c = load_dir(&[dir.clone()]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        c
    }

    #[test]
    fn loads_pods_with_both_families_and_reports_bad_objects() {
        let c = cluster();
        assert_eq!(c.pods.len(), 2);
        let a = &c.pods[0];
        assert_eq!(a.ips.len(), 2);
        assert_eq!(a.workload.as_deref(), Some("ReplicaSet/a-123"));
        assert_eq!(c.namespaces["x"]["ns"], "x");
        assert_eq!(c.errors.len(), 1);
        assert!(
            c.errors[0].contains("x/broken") && c.errors[0].contains("status.podIP"),
            "{}",
            c.errors[0]
        );
    }

    #[test]
    fn compile_splits_local_endpoints_from_remote_identities() {
        let c = cluster();
        let mut alloc = crate::policy::compile::Allocator::default();
        let d = crate::policy::compile::compile(
            &c,
            "n1",
            &["10.224.0.4".parse().unwrap()],
            &Default::default(),
            &mut alloc,
        );
        assert_eq!(d.endpoints.len(), 2);
        let kind = |s: &str| d.ipcache[&s.parse::<IpNet>().unwrap()].kind;
        assert_eq!(kind("10.244.2.10/32"), RemoteKind::RemotePod as u8);
        assert_eq!(kind("10.244.2.0/24"), RemoteKind::RemotePod as u8);
        assert_eq!(kind("10.244.1.10/32"), RemoteKind::LocalPod as u8);
        assert_eq!(kind("0.0.0.0/0"), RemoteKind::World as u8);
        assert_eq!(kind("10.224.0.5/32"), RemoteKind::RemoteNode as u8);
        assert_eq!(kind("10.224.0.4/32"), RemoteKind::Host as u8);
    }

    #[test]
    fn keys_round_trip() {
        for s in ["10.1.2.3", "fd00::1:2"] {
            let ip: IpAddr = s.parse().unwrap();
            let k = ip_key(ip);
            assert_eq!(addr_from(k.family, &k.addr), ip);
        }
    }
}
