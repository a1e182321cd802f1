//! observer's flow records as Hubble `flow.Flow` messages: what `hubble observe` prints and
//! filters on, with what Hubble itself leaves out filled in (the policy behind default-deny
//! drops and audit verdicts).
use std::{collections::BTreeMap, net::IpAddr};

use super::proto::flow::{
    self, layer4::Protocol, CiliumEventType, DropReason, Endpoint, FlowType, IpVersion, Layer4,
    Policy, TrafficDirection, Verdict, Workload,
};
use super::proto::observer::ext;
use crate::flows::{FlowRecord, Peer};

/// Hubble's monitor event types (`CiliumEventType.type`).
pub const EVENT_DROP: i32 = 1;
pub const EVENT_TRACE: i32 = 4;
pub const EVENT_POLICY_VERDICT: i32 = 5;

/// The Hubble flow for one record. `uuid` is the record's identity in this daemon's history.
/// `extensions` only for clients that ask for it (a field mask naming it): a client that
/// cannot resolve the Any's type cannot render the flow at all (the `hubble` CLI's JSON
/// output fails on it).
pub fn flow_of(rec: &FlowRecord, uuid: String, extensions: bool) -> flow::Flow {
    let dropped = rec.verdict == "dropped";
    let verdict = match rec.verdict.as_str() {
        "dropped" => Verdict::Dropped,
        "audit" => Verdict::Audit,
        _ => Verdict::Forwarded,
    };
    // Drops are drop events (policy denied); a connection's verdict is a policy-verdict event;
    // its later reports and close are traces of the same connection.
    let event_type = if dropped {
        CiliumEventType {
            r#type: EVENT_DROP,
            sub_type: DropReason::PolicyDenied as i32,
        }
    } else if rec.event == "new" {
        CiliumEventType {
            r#type: EVENT_POLICY_VERDICT,
            sub_type: 0,
        }
    } else {
        CiliumEventType {
            r#type: EVENT_TRACE,
            sub_type: 0,
        }
    };
    let (mut egress_allowed, mut ingress_allowed) = (Vec::new(), Vec::new());
    for r in &rec.policy {
        let p = policy(&r.namespace, &r.name);
        if r.direction == "egress" {
            egress_allowed.push(p);
        } else {
            ingress_allowed.push(p);
        }
    }
    let (mut egress_denied, mut ingress_denied) = (Vec::new(), Vec::new());
    for p in &rec.isolated_by {
        if !dropped && rec.verdict != "audit" {
            continue;
        }
        let pol = policy(&p.namespace, &p.name);
        if p.direction == "egress" {
            egress_denied.push(pol);
        } else {
            ingress_denied.push(pol);
        }
    }
    flow::Flow {
        time: parse_time(&rec.time),
        uuid,
        verdict: verdict as i32,
        drop_reason: if dropped {
            DropReason::PolicyDenied as u32
        } else {
            0
        },
        drop_reason_desc: if dropped {
            DropReason::PolicyDenied as i32
        } else {
            0
        },
        ip: Some(flow::Ip {
            source: rec.ip.src.to_string(),
            destination: rec.ip.dst.to_string(),
            ip_version: match rec.ip.dst {
                IpAddr::V4(_) => IpVersion::IPv4 as i32,
                IpAddr::V6(_) => IpVersion::IPv6 as i32,
            },
            source_xlated: rec
                .snat
                .as_ref()
                .filter(|s| s.translated_src_ip != s.original_src_ip)
                .map(|s| s.translated_src_ip.to_string())
                .unwrap_or_default(),
            ..Default::default()
        }),
        l4: Some(layer4(rec)),
        source: Some(endpoint(&rec.source)),
        destination: Some(endpoint(&rec.destination)),
        r#type: FlowType::L3L4 as i32,
        node_name: rec.node.clone(),
        event_type: Some(event_type),
        destination_service: rec.service.as_ref().map(|s| flow::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        }),
        traffic_direction: match rec.direction.as_str() {
            "ingress" => TrafficDirection::Ingress as i32,
            "egress" => TrafficDirection::Egress as i32,
            _ => TrafficDirection::Unknown as i32,
        },
        // A record describes a whole connection from its originator's side.
        is_reply: Some(false),
        egress_allowed_by: egress_allowed,
        ingress_allowed_by: ingress_allowed,
        egress_denied_by: egress_denied,
        ingress_denied_by: ingress_denied,
        summary: summary(rec),
        extensions: extensions.then(|| extension(rec)),
        ..Default::default()
    }
}

/// The type URL of observer's flow extension.
pub const EXTENSION_TYPE: &str = "type.googleapis.com/observer.ext.FlowExtension";

/// What Hubble's Flow has no field for, as the flow's `extensions`.
fn extension(rec: &FlowRecord) -> prost_types::Any {
    let c = &rec.counters;
    let ext = ext::FlowExtension {
        event: rec.event.clone(),
        traffic_class: rec.traffic_class.clone(),
        counters: Some(ext::Counters {
            packets_out: c.packets_out,
            bytes_out: c.bytes_out,
            packets_in: c.packets_in,
            bytes_in: c.bytes_in,
        }),
        snat: rec.snat.as_ref().map(|s| ext::Snat {
            original_ip: s.original_src_ip.to_string(),
            original_port: s.original_src_port as u32,
            translated_ip: s.translated_src_ip.to_string(),
            translated_port: s.translated_src_port as u32,
            expectation: serde_json::to_value(s.expectation)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        }),
        service_ip: rec
            .service
            .as_ref()
            .map(|s| s.ip.to_string())
            .unwrap_or_default(),
        service_port: rec.service.as_ref().map_or(0, |s| s.port as u32),
        original_source: rec
            .original_source
            .map(|a| a.to_string())
            .unwrap_or_default(),
        allowed_by: rec.allowed_by.clone().unwrap_or_default(),
        first_seen: rec.first_seen.clone(),
        last_seen: rec.last_seen.clone(),
    };
    prost_types::Any {
        type_url: EXTENSION_TYPE.into(),
        value: prost::Message::encode_to_vec(&ext),
    }
}

fn policy(namespace: &str, name: &str) -> Policy {
    Policy {
        name: name.to_string(),
        namespace: namespace.to_string(),
        kind: "NetworkPolicy".into(),
        ..Default::default()
    }
}

fn parse_time(t: &str) -> Option<prost_types::Timestamp> {
    let st = humantime::parse_rfc3339(t).ok()?;
    Some(prost_types::Timestamp::from(st))
}

fn tcp_flags(names: &[String]) -> flow::TcpFlags {
    let has = |n: &str| names.iter().any(|f| f == n);
    flow::TcpFlags {
        fin: has("FIN"),
        syn: has("SYN"),
        rst: has("RST"),
        psh: has("PSH"),
        ack: has("ACK"),
        urg: has("URG"),
        ece: has("ECE"),
        cwr: has("CWR"),
        ns: false,
    }
}

fn layer4(rec: &FlowRecord) -> Layer4 {
    let l4 = &rec.l4;
    let icmp = l4.icmp.as_ref();
    let protocol = match l4.protocol.as_str() {
        "TCP" => Protocol::Tcp(flow::Tcp {
            source_port: l4.src_port as u32,
            destination_port: l4.dst_port as u32,
            flags: Some(tcp_flags(&l4.tcp_flags)),
        }),
        "UDP" => Protocol::Udp(flow::Udp {
            source_port: l4.src_port as u32,
            destination_port: l4.dst_port as u32,
        }),
        "SCTP" => Protocol::Sctp(flow::Sctp {
            source_port: l4.src_port as u32,
            destination_port: l4.dst_port as u32,
            ..Default::default()
        }),
        "ICMPv6" => Protocol::IcmPv6(flow::IcmPv6 {
            r#type: icmp.map_or(0, |i| i.icmp_type as u32),
            code: icmp.map_or(0, |i| i.code as u32),
        }),
        _ => Protocol::IcmPv4(flow::IcmPv4 {
            r#type: icmp.map_or(0, |i| i.icmp_type as u32),
            code: icmp.map_or(0, |i| i.code as u32),
        }),
    };
    Layer4 {
        protocol: Some(protocol),
    }
}

/// Labels in Hubble's form: `k8s:key=value`, sorted.
fn labels(l: &BTreeMap<String, String>) -> Vec<String> {
    l.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect()
}

fn endpoint(p: &Peer) -> Endpoint {
    let mut lab = labels(&p.labels);
    if let Some(ns) = &p.namespace {
        lab.push(format!("k8s:io.kubernetes.pod.namespace={ns}"));
        lab.sort();
    }
    Endpoint {
        namespace: p.namespace.clone().unwrap_or_default(),
        pod_name: p.pod.clone().unwrap_or_default(),
        labels: lab,
        workloads: p
            .workload
            .iter()
            .map(|w| {
                let (kind, name) = w.split_once('/').unwrap_or(("", w.as_str()));
                Workload {
                    name: name.to_string(),
                    kind: kind.to_string(),
                }
            })
            .collect(),
        ..Default::default()
    }
}

/// Hubble's one-line summary: protocol and flags.
fn summary(rec: &FlowRecord) -> String {
    match rec.l4.protocol.as_str() {
        "TCP" if !rec.l4.tcp_flags.is_empty() => {
            format!("TCP Flags: {}", rec.l4.tcp_flags.join(", "))
        }
        p => p.to_string(),
    }
}

#[cfg(test)]
mod tests {
    //! The wire, read without our generated code: a flow encoded here, decoded field by field
    //! with the numbers of cilium's public `flow.proto` and `observer.proto` (what every Hubble
    //! client decodes with).
    use std::collections::BTreeMap;

    use prost::Message;

    use super::*;
    use crate::flows::{Counters, IpInfo, L4Info, PolicyName};
    use crate::hubble::proto::observer::{get_flows_response::ResponseTypes, GetFlowsResponse};

    /// Field number -> raw values (varints as numbers, length-delimited as bytes).
    fn fields(mut b: &[u8]) -> BTreeMap<u64, Vec<Result<u64, Vec<u8>>>> {
        fn varint(b: &mut &[u8]) -> u64 {
            let (mut v, mut shift) = (0u64, 0);
            loop {
                let byte = b[0];
                *b = &b[1..];
                v |= ((byte & 0x7f) as u64) << shift;
                if byte & 0x80 == 0 {
                    return v;
                }
                shift += 7;
            }
        }
        let mut out: BTreeMap<u64, Vec<Result<u64, Vec<u8>>>> = BTreeMap::new();
        while !b.is_empty() {
            let key = varint(&mut b);
            let value = match key & 7 {
                0 => Ok(varint(&mut b)),
                2 => {
                    let n = varint(&mut b) as usize;
                    let v = b[..n].to_vec();
                    b = &b[n..];
                    Err(v)
                }
                t => panic!("wire type {t}"),
            };
            out.entry(key >> 3).or_default().push(value);
        }
        out
    }

    fn bytes(f: &BTreeMap<u64, Vec<Result<u64, Vec<u8>>>>, n: u64) -> Vec<u8> {
        f[&n][0].clone().unwrap_err()
    }

    fn string(f: &BTreeMap<u64, Vec<Result<u64, Vec<u8>>>>, n: u64) -> String {
        String::from_utf8(bytes(f, n)).unwrap()
    }

    #[test]
    fn a_dropped_flow_decodes_with_the_public_field_numbers() {
        let peer = |ns: &str, pod: &str, ip: &str, port| Peer {
            ip: Some(ip.parse().unwrap()),
            port,
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            labels: [("app".to_string(), pod.to_string())].into(),
            workload: None,
        };
        let rec = FlowRecord {
            time: "2026-12-02T10:00:00Z".into(),
            node: "node-1".into(),
            event: "drop".into(),
            verdict: "dropped".into(),
            drop_reason: Some("policy-denied".into()),
            policy: vec![],
            isolated_by: vec![PolicyName {
                namespace: "shop".into(),
                name: "db-ingress".into(),
                direction: "ingress".into(),
            }],
            allowed_by: None,
            service: None,
            original_source: None,
            direction: "ingress".into(),
            traffic_class: "pod-to-pod-local".into(),
            ip: IpInfo {
                version: 4,
                src: "10.244.0.5".parse().unwrap(),
                dst: "10.244.0.6".parse().unwrap(),
            },
            l4: L4Info {
                protocol: "TCP".into(),
                src_port: 40000,
                dst_port: 5432,
                tcp_flags: vec!["SYN".into()],
                icmp: None,
            },
            source: peer("shop", "web", "10.244.0.5", 40000),
            destination: peer("shop", "db", "10.244.0.6", 5432),
            counters: Counters::default(),
            snat: None,
            first_seen: "2026-12-02T10:00:00Z".into(),
            last_seen: "2026-12-02T10:00:00Z".into(),
            interface: 3,
        };
        let resp = GetFlowsResponse {
            time: None,
            node_name: "node-1".into(),
            response_types: Some(ResponseTypes::Flow(flow_of(&rec, "u-1".into(), false))),
        };
        // observer.proto GetFlowsResponse: flow = 1, node_name = 1000.
        let r = fields(&resp.encode_to_vec());
        assert_eq!(string(&r, 1000), "node-1");
        let f = fields(&bytes(&r, 1));
        // flow.proto Flow: verdict = 2 (DROPPED = 2), drop_reason_desc = 25 (POLICY_DENIED =
        // 133), node_name = 11, uuid = 34, Type = 10 (L3_L4 = 1), traffic_direction = 22
        // (INGRESS = 1), Summary = 100000.
        assert_eq!(f[&2][0], Ok(2));
        assert_eq!(f[&25][0], Ok(133));
        assert_eq!(string(&f, 11), "node-1");
        assert_eq!(string(&f, 34), "u-1");
        assert_eq!(f[&10][0], Ok(1));
        assert_eq!(f[&22][0], Ok(1));
        assert_eq!(string(&f, 100000), "TCP Flags: SYN");
        // IP = 5: source 1, destination 2, ipVersion 3 (IPv4 = 1).
        let ip = fields(&bytes(&f, 5));
        assert_eq!(string(&ip, 1), "10.244.0.5");
        assert_eq!(string(&ip, 2), "10.244.0.6");
        assert_eq!(ip[&3][0], Ok(1));
        // l4 = 6: TCP = 1: source_port 1, destination_port 2, flags 3 (SYN = 2).
        let tcp = fields(&bytes(&fields(&bytes(&f, 6)), 1));
        assert_eq!(tcp[&1][0], Ok(40000));
        assert_eq!(tcp[&2][0], Ok(5432));
        assert_eq!(fields(&bytes(&tcp, 3))[&2][0], Ok(1));
        // source = 8, destination = 9: namespace 3, labels 4, pod_name 5.
        let dst = fields(&bytes(&f, 9));
        assert_eq!(string(&dst, 3), "shop");
        assert_eq!(string(&dst, 5), "db");
        let labels: Vec<String> = dst[&4]
            .iter()
            .map(|v| String::from_utf8(v.clone().unwrap_err()).unwrap())
            .collect();
        assert!(labels.contains(&"k8s:app=db".to_string()), "{labels:?}");
        // event_type = 19: type 1 (drop), sub_type 2 (133).
        let ev = fields(&bytes(&f, 19));
        assert_eq!(ev[&1][0], Ok(1));
        assert_eq!(ev[&2][0], Ok(133));
        // ingress_denied_by = 21005: Policy name 1, namespace 2, kind 5.
        let pol = fields(&bytes(&f, 21005));
        assert_eq!(string(&pol, 1), "db-ingress");
        assert_eq!(string(&pol, 2), "shop");
        assert_eq!(string(&pol, 5), "NetworkPolicy");
        // No extensions (150000) unless asked for.
        assert!(!f.contains_key(&150000));
    }
}
