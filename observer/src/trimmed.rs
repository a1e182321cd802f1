//! Kubernetes objects decoded with only the fields observer reads.
//!
//! A pod as the API server sends it carries kilobytes observer never looks at: managedFields,
//! annotations, the container specs, conditions, container statuses. Decoding each one into
//! k8s-openapi's full `Pod` allocates all of it for every object of every list page and every
//! watch event, and the freed pieces stay behind as holes between the long-lived pod records.
//! Nodes are the same with their image lists. These types let the JSON parser skip the rest
//! instead. A field they keep has the API's type,
//! so a value of the wrong type is still an error naming the object.

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

impl Resource for Pod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
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

impl Resource for Node {
    type DynamicType = ();
    type Scope = ClusterResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        "Node".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "nodes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

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
}
