//! observer's flow records as Hubble `flow.Flow` messages: what `hubble observe` prints and
//! filters on, with what Hubble itself leaves out filled in (the policy behind default-deny
//! drops and audit verdicts).
use std::{collections::BTreeMap, net::IpAddr};

use super::proto::flow::{
    self, layer4::Protocol, CiliumEventType, DropReason, Endpoint, FlowType, IpVersion, Layer4,
    Policy, TrafficDirection, Verdict, Workload,
};
use super::proto::observer::ext;
use crate::flows::{FlowRecord, Peer, Word};

/// Hubble's monitor event types (`CiliumEventType.type`).
pub const EVENT_DROP: i32 = 1;
pub const EVENT_TRACE: i32 = 4;
pub const EVENT_POLICY_VERDICT: i32 = 5;

/// The Hubble flow for one record. `uuid` is the record's identity in this daemon's history.
/// `extensions` only for clients that ask for it (a field mask naming it): a client that
/// cannot resolve the Any's type cannot render the flow at all (the `hubble` CLI's JSON
/// output fails on it).
pub fn flow_of(rec: &FlowRecord, uuid: String, extensions: bool) -> flow::Flow {
    flow_masked(rec, uuid, extensions, FieldMask::ALL)
}

/// [`flow_of`] without the fields `mask` leaves out that no filter reads (the policies, the
/// summary): not built just to be cleared.
pub fn flow_masked(
    rec: &FlowRecord,
    uuid: String,
    extensions: bool,
    mask: FieldMask,
) -> flow::Flow {
    let dropped = rec.verdict == "dropped";
    let verdict = match &*rec.verdict {
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
    let policies = [
        "egress_allowed_by",
        "ingress_allowed_by",
        "egress_denied_by",
        "ingress_denied_by",
    ]
    .iter()
    .any(|f| mask.keeps(f));
    let (mut egress_allowed, mut ingress_allowed) = (Vec::new(), Vec::new());
    for r in rec.policy.iter().filter(|_| policies) {
        let p = policy(&r.namespace, &r.name);
        if &*r.direction == "egress" {
            egress_allowed.push(p);
        } else {
            ingress_allowed.push(p);
        }
    }
    let (mut egress_denied, mut ingress_denied) = (Vec::new(), Vec::new());
    for p in rec.isolated_by.iter().filter(|_| policies) {
        if !dropped && rec.verdict != "audit" {
            continue;
        }
        let pol = policy(&p.namespace, &p.name);
        if &*p.direction == "egress" {
            egress_denied.push(pol);
        } else {
            ingress_denied.push(pol);
        }
    }
    flow::Flow {
        time: Some(prost_types::Timestamp::from(rec.time.0)),
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
        l4: layer4(rec),
        source: Some(endpoint(&rec.source)),
        destination: Some(endpoint(&rec.destination)),
        r#type: FlowType::L3L4 as i32,
        node_name: rec.node.to_string(),
        event_type: Some(event_type),
        destination_service: rec.service.as_ref().map(|s| flow::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        }),
        traffic_direction: match &*rec.direction {
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
        interface: Some(flow::NetworkInterface {
            index: rec.interface,
            name: String::new(),
        }),
        summary: if mask.keeps("Summary") {
            summary(rec)
        } else {
            String::new()
        },
        extensions: extensions.then(|| extension(rec)),
        ..Default::default()
    }
}

/// The flow fields observer fills, and their names in flow.proto: what a field mask can name.
/// One list makes both [`MASKABLE`] (bit i of a [`FieldMask`] is `MASKABLE[i]`) and
/// [`clear_unmasked`].
macro_rules! maskable {
    ($($field:ident = $name:literal),* $(,)?) => {
        const MASKABLE: &[&str] = &[$($name),*];

        fn clear_unmasked(bits: u32, f: &mut flow::Flow) {
            let mut bit = 1u32;
            $(
                if bits & bit == 0 {
                    f.$field = Default::default();
                }
                bit <<= 1;
            )*
            let _ = bit;
        }
    };
}

maskable!(
    time = "time",
    uuid = "uuid",
    verdict = "verdict",
    drop_reason = "drop_reason",
    drop_reason_desc = "drop_reason_desc",
    ip = "IP",
    l4 = "l4",
    source = "source",
    destination = "destination",
    r#type = "Type",
    node_name = "node_name",
    event_type = "event_type",
    source_service = "source_service",
    destination_service = "destination_service",
    is_reply = "is_reply",
    interface = "interface",
    summary = "Summary",
    extensions = "extensions",
    egress_allowed_by = "egress_allowed_by",
    ingress_allowed_by = "ingress_allowed_by",
    egress_denied_by = "egress_denied_by",
    ingress_denied_by = "ingress_denied_by",
);

/// Hubble's field mask (`GetFlowsRequest.field_mask`), read once per request: the flows keep
/// the top-level fields it names (a path into a field, `source.pod_name`, keeps the whole
/// field); no paths keep everything. `traffic_direction` always stays: the masks hubble sends
/// for its compact output leave it out, then print its policy verdicts as
/// `TRAFFIC_DIRECTION_UNKNOWN`.
#[derive(Clone, Copy, Debug)]
pub struct FieldMask(u32);

impl FieldMask {
    pub const ALL: FieldMask = FieldMask(u32::MAX);

    pub fn new(paths: &[String]) -> FieldMask {
        if paths.is_empty() {
            return FieldMask::ALL;
        }
        let named = |field: &str| {
            paths.iter().any(|p| {
                p.strip_prefix(field)
                    .is_some_and(|r| r.is_empty() || r.starts_with('.'))
            })
        };
        FieldMask(
            MASKABLE
                .iter()
                .enumerate()
                .filter(|(_, f)| named(f))
                .fold(0, |bits, (i, _)| bits | 1 << i),
        )
    }

    /// Whether the flows keep `field` (a name of [`MASKABLE`]).
    pub fn keeps(&self, field: &str) -> bool {
        let i = MASKABLE.iter().position(|f| *f == field);
        i.is_none_or(|i| self.0 & 1 << i != 0)
    }

    /// Clears the fields the mask leaves out; the filters have seen the whole flow.
    pub fn apply(&self, f: &mut flow::Flow) {
        if self.0 != u32::MAX {
            clear_unmasked(self.0, f);
        }
    }
}

/// The fields [`record_of`] reads: what observer's own CLI asks for.
pub const RECORD_FIELDS: [&str; 10] = [
    "interface",
    "time",
    "node_name",
    "verdict",
    "IP",
    "l4",
    "source",
    "destination",
    "destination_service",
    "extensions",
];

/// The type URL of observer's flow extension.
pub const EXTENSION_TYPE: &str = "type.googleapis.com/observer.ext.FlowExtension";

/// What Hubble's Flow has no field for, as the flow's `extensions`.
fn extension(rec: &FlowRecord) -> prost_types::Any {
    let c = &rec.counters;
    let ext = ext::FlowExtension {
        event: rec.event.to_string(),
        traffic_class: rec.traffic_class.to_string(),
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
        allowed_by: rec.allowed_by.as_deref().unwrap_or_default().to_string(),
        first_seen: rec.first_seen.to_string(),
        last_seen: rec.last_seen.to_string(),
        rules: rec
            .policy
            .iter()
            .map(|r| ext::Rule {
                namespace: r.namespace.to_string(),
                name: r.name.to_string(),
                direction: r.direction.to_string(),
                rule: r.rule as u32,
            })
            .collect(),
        isolated_by: rec
            .isolated_by
            .iter()
            .map(|p| ext::PolicyRef {
                namespace: p.namespace.to_string(),
                name: p.name.to_string(),
                direction: p.direction.to_string(),
            })
            .collect(),
        isolated_by_more: rec.isolated_by_more,
        direction: rec.direction.to_string(),
        icmp_id: rec.l4.icmp.as_ref().and_then(|i| i.id).map(u32::from),
        drop_reason: rec.drop_reason.as_deref().unwrap_or_default().to_string(),
        protocol: rec.l4.protocol.to_string(),
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

fn tcp_flags(f: crate::flows::TcpFlags) -> flow::TcpFlags {
    let bit = |i: u8| f.0 & (1 << i) != 0;
    flow::TcpFlags {
        fin: bit(0),
        syn: bit(1),
        rst: bit(2),
        psh: bit(3),
        ack: bit(4),
        urg: bit(5),
        ece: bit(6),
        cwr: bit(7),
        ns: false,
    }
}

/// None for protocols Hubble's Layer4 has no case for.
fn layer4(rec: &FlowRecord) -> Option<Layer4> {
    let l4 = &rec.l4;
    let icmp = l4.icmp.as_ref();
    let protocol = match &*l4.protocol {
        "TCP" => Protocol::Tcp(flow::Tcp {
            source_port: l4.src_port as u32,
            destination_port: l4.dst_port as u32,
            flags: Some(tcp_flags(l4.tcp_flags)),
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
        "ICMP" => Protocol::IcmPv4(flow::IcmPv4 {
            r#type: icmp.map_or(0, |i| i.icmp_type as u32),
            code: icmp.map_or(0, |i| i.code as u32),
        }),
        _ => return None,
    };
    Some(Layer4 {
        protocol: Some(protocol),
    })
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
        namespace: p.namespace.as_deref().unwrap_or_default().to_string(),
        pod_name: p.pod.as_deref().unwrap_or_default().to_string(),
        labels: lab,
        workloads: p
            .workload
            .iter()
            .map(|w| {
                let (kind, name) = w.split_once('/').unwrap_or(("", w));
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
    match &*rec.l4.protocol {
        "TCP" if !rec.l4.tcp_flags.is_empty() => {
            format!("TCP Flags: {}", rec.l4.tcp_flags.join(", "))
        }
        p => p.to_string(),
    }
}

/// observer's record back from a flow that carries observer's extension: what `observer flows`
/// renders, so its output over the gRPC API is the record the daemon published. None for a
/// flow without the extension (another server, or a request without the field mask).
pub fn record_of(f: &flow::Flow) -> Option<FlowRecord> {
    use crate::flows::{Counters, IcmpInfo, IpInfo, L4Info, PolicyName, ServiceRef, Timestamp};
    use crate::policy::compile::RuleRef;
    let any = f
        .extensions
        .as_ref()
        .filter(|a| a.type_url == EXTENSION_TYPE)?;
    let x = <ext::FlowExtension as prost::Message>::decode(any.value.as_slice()).ok()?;
    let ip = f.ip.as_ref()?;
    let (src, dst): (IpAddr, IpAddr) = (ip.source.parse().ok()?, ip.destination.parse().ok()?);
    let (sport, dport, tcp_flags, icmp) = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => (
            t.source_port,
            t.destination_port,
            t.flags.as_ref().map(flags_of).unwrap_or_default(),
            None,
        ),
        Some(Protocol::Udp(u)) => (u.source_port, u.destination_port, Default::default(), None),
        Some(Protocol::Sctp(s)) => (s.source_port, s.destination_port, Default::default(), None),
        Some(Protocol::IcmPv4(i)) => (0, 0, Default::default(), Some((i.r#type, i.code))),
        Some(Protocol::IcmPv6(i)) => (0, 0, Default::default(), Some((i.r#type, i.code))),
        _ => (0, 0, Default::default(), None),
    };
    let c = x.counters.unwrap_or_default();
    let nonempty = |s: String| (!s.is_empty()).then(|| Word::from(s));
    Some(FlowRecord {
        // A flow from observer always has its times; the epoch (the default) stands for none.
        time: f
            .time
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .map_or_else(Timestamp::default, Timestamp),
        node: f.node_name.as_str().into(),
        event: x.event.into(),
        verdict: match Verdict::try_from(f.verdict) {
            Ok(Verdict::Dropped) => "dropped",
            Ok(Verdict::Audit) => "audit",
            _ => "forwarded",
        }
        .into(),
        drop_reason: nonempty(x.drop_reason),
        policy: x
            .rules
            .into_iter()
            .map(|r| RuleRef {
                namespace: r.namespace.into(),
                name: r.name.into(),
                direction: r.direction.into(),
                rule: r.rule as usize,
            })
            .collect(),
        isolated_by: x
            .isolated_by
            .into_iter()
            .map(|p| PolicyName {
                namespace: p.namespace.into(),
                name: p.name.into(),
                direction: p.direction.into(),
            })
            .collect(),
        isolated_by_more: x.isolated_by_more,
        allowed_by: nonempty(x.allowed_by),
        service: match (&f.destination_service, x.service_ip.parse()) {
            (Some(s), Ok(ip)) => Some(ServiceRef {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                ip,
                port: x.service_port as u16,
            }),
            _ => None,
        },
        original_source: x.original_source.parse().ok(),
        direction: x.direction.into(),
        traffic_class: x.traffic_class.into(),
        ip: IpInfo {
            version: if src.is_ipv4() { 4 } else { 6 },
            src,
            dst,
        },
        l4: L4Info {
            protocol: x.protocol.into(),
            src_port: sport as u16,
            dst_port: dport as u16,
            tcp_flags,
            icmp: icmp.map(|(t, code)| IcmpInfo {
                icmp_type: t as u8,
                code: code as u8,
                id: x.icmp_id.map(|i| i as u16),
            }),
        },
        source: peer_of(f.source.as_ref(), src, sport as u16),
        destination: peer_of(f.destination.as_ref(), dst, dport as u16),
        counters: Counters {
            packets_out: c.packets_out,
            bytes_out: c.bytes_out,
            packets_in: c.packets_in,
            bytes_in: c.bytes_in,
        },
        snat: x.snat.and_then(|s| {
            Some(crate::snat::SnatInfo {
                original_src_ip: s.original_ip.parse().ok()?,
                original_src_port: s.original_port as u16,
                translated_src_ip: s.translated_ip.parse().ok()?,
                translated_src_port: s.translated_port as u16,
                expectation: serde_json::from_value(serde_json::Value::String(s.expectation))
                    .ok()?,
            })
        }),
        first_seen: x.first_seen.parse().unwrap_or_default(),
        last_seen: x.last_seen.parse().unwrap_or_default(),
        interface: f.interface.as_ref().map_or(0, |i| i.index),
    })
}

fn flags_of(f: &flow::TcpFlags) -> crate::flows::TcpFlags {
    let bits = [f.fin, f.syn, f.rst, f.psh, f.ack, f.urg, f.ece, f.cwr]
        .iter()
        .enumerate()
        .fold(0u8, |b, (i, set)| b | (u8::from(*set) << i));
    crate::flows::TcpFlags(bits)
}

/// The inverse of `endpoint`: Hubble's `k8s:key=value` labels without the namespace label it
/// adds.
fn peer_of(e: Option<&Endpoint>, ip: IpAddr, port: u16) -> Peer {
    let Some(e) = e else {
        return Peer {
            ip: Some(ip),
            port,
            ..Default::default()
        };
    };
    let nonempty = |s: &String| (!s.is_empty()).then(|| s.clone());
    let namespace = nonempty(&e.namespace);
    Peer {
        ip: Some(ip),
        port,
        labels: e
            .labels
            .iter()
            .filter_map(|l| l.strip_prefix("k8s:")?.split_once('='))
            .filter(|(k, _)| namespace.is_none() || *k != "io.kubernetes.pod.namespace")
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
            .into(),
        namespace: namespace.map(Into::into),
        pod: nonempty(&e.pod_name).map(Into::into),
        workload: e.workloads.first().map(|w| match w.kind.as_str() {
            "" => w.name.as_str().into(),
            kind => format!("{kind}/{}", w.name).into(),
        }),
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
            labels: BTreeMap::from([("app".to_string(), pod.to_string())]).into(),
            workload: None,
        };
        let rec = FlowRecord {
            time: "2026-12-02T10:00:00Z".parse().unwrap(),
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
            isolated_by_more: 0,
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
                tcp_flags: crate::flows::TcpFlags::from_names(["SYN"]).unwrap(),
                icmp: None,
            },
            source: peer("shop", "web", "10.244.0.5", 40000),
            destination: peer("shop", "db", "10.244.0.6", 5432),
            counters: Counters::default(),
            snat: None,
            first_seen: "2026-12-02T10:00:00Z".parse().unwrap(),
            last_seen: "2026-12-02T10:00:00Z".parse().unwrap(),
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

    /// `observer flows` renders what it reads back from the gRPC API: every kind of record must
    /// come back exactly as the daemon published it.
    #[test]
    fn records_come_back_whole_from_the_flow_and_its_extension() {
        use crate::flows::{IcmpInfo, ServiceRef};
        use crate::policy::compile::RuleRef;
        use crate::snat::{Expectation, SnatInfo};
        let t: crate::flows::Timestamp = "2026-12-02T10:00:00.123456789Z".parse().unwrap();
        let pod = |ns: &str, pod: &str, ip: &str, port| Peer {
            ip: Some(ip.parse().unwrap()),
            port,
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            labels: BTreeMap::from([
                ("app".to_string(), pod.to_string()),
                ("tier".into(), "x".into()),
            ])
            .into(),
            workload: Some(format!("Deployment/{pod}").into()),
        };
        let world = |ip: &str, port| Peer {
            ip: Some(ip.parse().unwrap()),
            port,
            ..Default::default()
        };
        let base = FlowRecord {
            time: t,
            node: "node-1".into(),
            event: "new".into(),
            verdict: "forwarded".into(),
            drop_reason: None,
            policy: vec![RuleRef {
                namespace: "shop".into(),
                name: "web-egress".into(),
                direction: "egress".into(),
                rule: 2,
            }],
            isolated_by: vec![PolicyName {
                namespace: "shop".into(),
                name: "web-egress".into(),
                direction: "egress".into(),
            }],
            isolated_by_more: 0,
            allowed_by: Some("from-node".into()),
            service: Some(ServiceRef {
                namespace: "shop".into(),
                name: "db".into(),
                ip: "10.0.0.10".parse().unwrap(),
                port: 5432,
            }),
            original_source: Some("192.0.2.7:41000".parse().unwrap()),
            direction: "egress".into(),
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
                tcp_flags: crate::flows::TcpFlags::from_names(["FIN", "SYN", "ACK"]).unwrap(),
                icmp: None,
            },
            source: pod("shop", "web", "10.244.0.5", 40000),
            destination: pod("shop", "db", "10.244.0.6", 5432),
            counters: Counters {
                packets_out: 5,
                bytes_out: 600,
                packets_in: 4,
                bytes_in: 5000,
            },
            snat: Some(SnatInfo {
                original_src_ip: "10.244.0.5".parse().unwrap(),
                original_src_port: 40000,
                translated_src_ip: "10.224.0.4".parse().unwrap(),
                translated_src_port: 61000,
                expectation: Expectation::Expected,
            }),
            first_seen: t,
            last_seen: "2026-12-02T10:00:01.5Z".parse().unwrap(),
            interface: 7,
        };
        let dropped = FlowRecord {
            event: "drop".into(),
            verdict: "dropped".into(),
            drop_reason: Some("policy-denied".into()),
            policy: vec![],
            allowed_by: None,
            service: None,
            original_source: None,
            snat: None,
            l4: L4Info {
                protocol: "UDP".into(),
                src_port: 5353,
                dst_port: 53,
                tcp_flags: Default::default(),
                icmp: None,
            },
            source: pod("shop", "web", "10.244.0.5", 5353),
            destination: pod("shop", "db", "10.244.0.6", 53),
            ..base.clone()
        };
        let echo = FlowRecord {
            verdict: "audit".into(),
            traffic_class: "pod-to-world".into(),
            ip: IpInfo {
                version: 6,
                src: "fd00::5".parse().unwrap(),
                dst: "2001:db8::1".parse().unwrap(),
            },
            l4: L4Info {
                protocol: "ICMPv6".into(),
                src_port: 0,
                dst_port: 0,
                tcp_flags: Default::default(),
                icmp: Some(IcmpInfo {
                    icmp_type: 128,
                    code: 0,
                    id: Some(77),
                }),
            },
            source: pod("shop", "web", "fd00::5", 0),
            destination: world("2001:db8::1", 0),
            ..dropped.clone()
        };
        let unreachable = FlowRecord {
            ip: IpInfo {
                version: 4,
                src: "192.0.2.1".parse().unwrap(),
                dst: "10.244.0.5".parse().unwrap(),
            },
            l4: L4Info {
                protocol: "ICMP".into(),
                src_port: 0,
                dst_port: 0,
                tcp_flags: Default::default(),
                icmp: Some(IcmpInfo {
                    icmp_type: 3,
                    code: 1,
                    id: None,
                }),
            },
            source: world("192.0.2.1", 0),
            destination: pod("shop", "web", "10.244.0.5", 0),
            ..base.clone()
        };
        let gre = FlowRecord {
            l4: L4Info {
                protocol: "proto-47".into(),
                src_port: 0,
                dst_port: 0,
                tcp_flags: Default::default(),
                icmp: None,
            },
            source: pod("shop", "web", "10.244.0.5", 0),
            destination: world("10.244.0.6", 0),
            ..base.clone()
        };
        let sctp = FlowRecord {
            l4: L4Info {
                protocol: "SCTP".into(),
                src_port: 9,
                dst_port: 9,
                tcp_flags: Default::default(),
                icmp: None,
            },
            source: Peer {
                labels: Default::default(),
                workload: None,
                ..pod("a", "b", "10.244.0.5", 9)
            },
            destination: pod("shop", "db", "10.244.0.6", 9),
            ..base.clone()
        };
        let cli = FieldMask::new(&RECORD_FIELDS.map(String::from));
        for rec in [base, dropped, echo, unreachable, gre, sctp] {
            // Built and trimmed as for `observer flows`, which asks for RECORD_FIELDS.
            let mut flow = flow_masked(&rec, String::new(), true, cli);
            cli.apply(&mut flow);
            // Through the wire, as the CLI receives it.
            let flow = flow::Flow::decode(flow.encode_to_vec().as_slice()).unwrap();
            let back = record_of(&flow).expect("observer's extension");
            assert_eq!(back, rec);
        }
        assert!(record_of(&flow_of(&dropped_sample(), "u".into(), false)).is_none());
    }

    #[test]
    fn a_field_mask_keeps_what_it_names_and_the_direction() {
        let mut rec = dropped_sample();
        rec.isolated_by = vec![crate::flows::PolicyName {
            namespace: "shop".into(),
            name: "default-deny".into(),
            direction: "egress".into(),
        }];
        let full = flow_of(&rec, "u".into(), false);
        let mask = FieldMask::new(&["source.pod_name".into(), "time".into()]);
        let mut f = full.clone();
        mask.apply(&mut f);
        assert_eq!(f.source, full.source, "a nested path keeps the whole field");
        assert_eq!(f.time, full.time);
        assert!(f.ip.is_none() && f.destination.is_none() && f.uuid.is_empty());
        assert!(f.egress_denied_by.is_empty() && f.verdict == 0);
        assert_eq!(f.traffic_direction, full.traffic_direction);
        // Not built where the mask drops them, the same flow otherwise.
        let lean = flow_masked(&rec, "u".into(), false, mask);
        let mut lean_applied = lean.clone();
        mask.apply(&mut lean_applied);
        assert_eq!(lean_applied, f);
        assert!(lean.summary.is_empty() && lean.egress_denied_by.is_empty());
        // No paths: everything.
        let mut all = full.clone();
        FieldMask::new(&[]).apply(&mut all);
        assert_eq!(all, full);
        assert!(!full.egress_denied_by.is_empty() && !full.summary.is_empty());
    }

    fn dropped_sample() -> FlowRecord {
        FlowRecord {
            time: "2026-12-02T10:00:00Z".parse().unwrap(),
            node: "n".into(),
            event: "drop".into(),
            verdict: "dropped".into(),
            drop_reason: None,
            policy: vec![],
            isolated_by: vec![],
            isolated_by_more: 0,
            allowed_by: None,
            service: None,
            original_source: None,
            direction: "egress".into(),
            traffic_class: "pod-to-world".into(),
            ip: IpInfo {
                version: 4,
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
            },
            l4: L4Info {
                protocol: "UDP".into(),
                src_port: 1,
                dst_port: 2,
                tcp_flags: Default::default(),
                icmp: None,
            },
            source: Peer::default(),
            destination: Peer::default(),
            counters: Counters::default(),
            snat: None,
            first_seen: Default::default(),
            last_seen: Default::default(),
            interface: 0,
        }
    }
}
