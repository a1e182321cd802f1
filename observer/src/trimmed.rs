//! Kubernetes objects decoded with only the fields observer reads.
//!
//! A pod as the API server sends it carries kilobytes observer never looks at: managedFields,
//! annotations, the container specs, conditions, container statuses. Decoding each one into
//! k8s-openapi's full `Pod` allocates all of it for every object of every list page and every
//! watch event, and the freed pieces stay behind as holes between the long-lived pod records.
//! Nodes, Services and EndpointSlices are the same (a node's image list, an endpoint's target
//! reference and zone). These types let the JSON parser skip the rest instead. A field they keep
//! has the API's type, so a value of the wrong type is still an error naming the object.

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    ClusterResourceScope, NamespaceResourceScope,
};
use kube::Resource;
use serde::{Deserialize, Deserializer};

/// A Pod: name, labels, controller, node, host networking, container ports, phase and IPs.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default, deserialize_with = "object_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<PodSpec>,
    pub status: Option<PodStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Container {
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: Option<String>,
    pub container_port: i32,
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

/// A Node: name, addresses and pod CIDRs. A real node's status also lists every image it
/// holds, often tens of kilobytes.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Node {
    #[serde(default, deserialize_with = "object_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<NodeSpec>,
    pub status: Option<NodeStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeSpec {
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeStatus {
    pub addresses: Option<Vec<NodeAddress>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub type_: String,
    pub address: String,
}

/// A Service: its addresses (cluster, external, load balancer) and ports.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Service {
    #[serde(default, deserialize_with = "object_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
    pub status: Option<ServiceStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: i32,
    pub protocol: Option<String>,
    pub node_port: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LoadBalancerStatus {
    pub ingress: Option<Vec<LoadBalancerIngress>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LoadBalancerIngress {
    pub ip: Option<String>,
}

/// An EndpointSlice: its service, ready addresses and ports. Real slices also carry a target
/// reference, node name, zone and hints per endpoint.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "object_meta")]
    pub metadata: ObjectMeta,
    pub endpoints: Option<Vec<Endpoint>>,
    pub ports: Option<Vec<EndpointPort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

/// `kube::Resource` for a trimmed type: the API path of the kind it stands for.
macro_rules! resource {
    ($ty:ident, $scope:ident, $group:literal, $plural:literal) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(_: &()) -> Cow<'_, str> {
                stringify!($ty).into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                $group.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                "v1".into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource!(Pod, NamespaceResourceScope, "", "pods");
resource!(Node, ClusterResourceScope, "", "nodes");
resource!(Service, NamespaceResourceScope, "", "services");
resource!(
    EndpointSlice,
    NamespaceResourceScope,
    "discovery.k8s.io",
    "endpointslices"
);

/// The metadata observer reads; the rest (managedFields above all) is skipped while parsing.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<OwnerReference>>,
}

fn object_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Meta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        labels: m.labels,
        owner_references: m.owner_references,
        ..ObjectMeta::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as a real API server sends it, managedFields and all: what observer reads comes
    /// through, a wrong type is still an error.
    #[test]
    fn reads_the_fields_observer_uses() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-1", "namespace": "shop", "resourceVersion": "42",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubelet", "operation": "Update",
                                   "fieldsV1": {"f:status": {"f:podIP": {}}}}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "web-5d9", "uid": "u1", "controller": true}]
            },
            "spec": {
                "nodeName": "node-1", "hostNetwork": false,
                "containers": [{"name": "main", "image": "nginx",
                                "ports": [{"name": "http", "containerPort": 8080,
                                           "protocol": "TCP"}],
                                "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}}]
            },
            "status": {"phase": "Running", "podIP": "10.0.0.7",
                       "podIPs": [{"ip": "10.0.0.7"}, {"ip": "fd00::7"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("web-1"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(pod.metadata.labels.as_ref().unwrap()["app"], "web");
        assert_eq!(
            pod.metadata.owner_references.as_ref().unwrap()[0].name,
            "web-5d9"
        );
        assert!(pod.metadata.managed_fields.is_none() && pod.metadata.annotations.is_none());
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        let port = &spec.containers[0].ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 8080)
        );
        let status = pod.status.unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(status.pod_ips.unwrap()[1].ip, "fd00::7");

        let bad = serde_json::json!({"metadata": {"name": "x"},
            "spec": {"containers": [{"ports": [{"containerPort": "http"}]}]}});
        assert!(serde_json::from_value::<Pod>(bad).is_err());
    }
    #[test]
    fn a_node_keeps_addresses_and_pod_cidrs() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "resourceVersion": "7", "labels": {"a": "b"}},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"],
                     "providerID": "azure:///x"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.224.0.4"},
                                     {"type": "Hostname", "address": "n1"}],
                       "images": [{"names": ["nginx@sha256:0"], "sizeBytes": 1}]}
        }))
        .unwrap();
        assert_eq!(node.metadata.name.as_deref(), Some("n1"));
        let spec = node.spec.unwrap();
        assert_eq!(spec.pod_cidr.as_deref(), Some("10.244.1.0/24"));
        assert_eq!(spec.pod_cidrs.unwrap().len(), 2);
        let a = node.status.unwrap().addresses.unwrap();
        assert_eq!(
            (a[0].type_.as_str(), a[0].address.as_str()),
            ("InternalIP", "10.224.0.4")
        );
    }
    #[test]
    fn services_and_endpoint_slices_keep_addresses_and_ports() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "type": "NodePort",
                     "ports": [{"name": "sql", "port": 80, "targetPort": 5432, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "20.1.2.3", "ipMode": "VIP"}]}}
        }))
        .unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.20"));
        let p = &spec.ports.unwrap()[0];
        assert_eq!((p.port, p.node_port), (80, Some(30080)));
        let lb = svc.status.unwrap().load_balancer.unwrap().ingress.unwrap();
        assert_eq!(lb[0].ip.as_deref(), Some("20.1.2.3"));

        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db-x1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": false},
                           "nodeName": "n1", "zone": "1",
                           "targetRef": {"kind": "Pod", "name": "db-0", "namespace": "shop"}}],
            "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}]
        }))
        .unwrap();
        let e = &slice.endpoints.unwrap()[0];
        assert_eq!(
            (
                e.addresses[0].as_str(),
                e.conditions.as_ref().unwrap().ready
            ),
            ("10.0.0.5", Some(false))
        );
        assert_eq!(slice.ports.unwrap()[0].port, Some(5432));
        // An empty slice comes with `"endpoints": null`.
        let empty: EndpointSlice = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "e"}, "endpoints": null}),
        )
        .unwrap();
        assert!(empty.endpoints.is_none());
    }
}
