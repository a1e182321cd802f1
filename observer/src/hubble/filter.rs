//! Hubble's `FlowFilter` semantics on the flows observer serves: within one filter every field
//! that is set must match (values of one field are alternatives); a flow passes when some
//! whitelist filter matches (or there is none) and no blacklist filter does.
use std::net::IpAddr;

use ipnet::IpNet;

use super::proto::flow::{self, layer4::Protocol, Endpoint, Flow, FlowFilter};

/// Fields observer has no data for: a filter on them is refused rather than silently never
/// matching.
pub fn unsupported(f: &FlowFilter) -> Option<&'static str> {
    let checks: [(bool, &'static str); 14] = [
        (!f.source_fqdn.is_empty(), "source_fqdn"),
        (!f.destination_fqdn.is_empty(), "destination_fqdn"),
        (!f.http_status_code.is_empty(), "http_status_code"),
        (!f.http_method.is_empty(), "http_method"),
        (!f.http_path.is_empty(), "http_path"),
        (!f.http_url.is_empty(), "http_url"),
        (!f.http_header.is_empty(), "http_header"),
        (!f.dns_query.is_empty(), "dns_query"),
        (!f.source_identity.is_empty(), "source_identity"),
        (!f.destination_identity.is_empty(), "destination_identity"),
        (!f.trace_id.is_empty(), "trace_id"),
        (!f.interface.is_empty(), "interface"),
        (!f.node_labels.is_empty(), "node_labels"),
        (
            f.experimental
                .as_ref()
                .is_some_and(|e| !e.cel_expression.is_empty()),
            "experimental.cel_expression",
        ),
    ];
    checks.iter().find(|(set, _)| *set).map(|(_, n)| *n)
}

/// Whether `flow` passes the request's whitelist and blacklist.
pub fn passes(flow: &Flow, whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> bool {
    (whitelist.is_empty() || whitelist.iter().any(|f| matches(flow, f)))
        && !blacklist.iter().any(|f| matches(flow, f))
}

fn any<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

pub fn matches(flow: &Flow, f: &FlowFilter) -> bool {
    let ip = flow.ip.clone().unwrap_or_default();
    let (src, dst) = (
        flow.source.clone().unwrap_or_default(),
        flow.destination.clone().unwrap_or_default(),
    );
    let (sport, dport, proto) = ports(flow);
    any(&f.uuid, |u| *u == flow.uuid)
        && any(&f.source_ip, |c| ip_matches(&ip.source, c))
        && any(&f.destination_ip, |c| ip_matches(&ip.destination, c))
        && any(&f.source_ip_xlated, |c| ip_matches(&ip.source_xlated, c))
        && any(&f.ip_version, |v| *v == ip.ip_version)
        && any(&f.source_pod, |p| pod_matches(&src, p))
        && any(&f.destination_pod, |p| pod_matches(&dst, p))
        && any(&f.source_label, |s| labels_match(&src.labels, s))
        && any(&f.destination_label, |s| labels_match(&dst.labels, s))
        && any(&f.source_service, |s| {
            service_matches(&flow.source_service, s)
        })
        && any(&f.destination_service, |s| {
            service_matches(&flow.destination_service, s)
        })
        && any(&f.source_workload, |w| workload_matches(&src, w))
        && any(&f.destination_workload, |w| workload_matches(&dst, w))
        && any(&f.verdict, |v| *v == flow.verdict)
        && any(&f.drop_reason_desc, |d| *d == flow.drop_reason_desc)
        && any(&f.event_type, |e| event_matches(flow, e))
        && any(&f.protocol, |p| p.eq_ignore_ascii_case(proto))
        && any(&f.source_port, |p| p.parse::<u32>().ok() == Some(sport))
        && any(&f.destination_port, |p| {
            p.parse::<u32>().ok() == Some(dport)
        })
        && any(&f.reply, |r| Some(*r) == flow.is_reply)
        && any(&f.tcp_flags, |want| tcp_flags_match(flow, want))
        && any(&f.node_name, |n| glob(n, &flow.node_name))
        && any(&f.traffic_direction, |d| *d == flow.traffic_direction)
        && any(&f.source_cluster_name, |c| {
            c.is_empty() || *c == src.cluster_name
        })
        && any(&f.destination_cluster_name, |c| {
            c.is_empty() || *c == dst.cluster_name
        })
        && any(&f.encrypted, |e| *e == ip.encrypted)
}

/// (source port, destination port, protocol name as Hubble's filters spell it).
fn ports(flow: &Flow) -> (u32, u32, &'static str) {
    match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => (t.source_port, t.destination_port, "tcp"),
        Some(Protocol::Udp(u)) => (u.source_port, u.destination_port, "udp"),
        Some(Protocol::Sctp(s)) => (s.source_port, s.destination_port, "sctp"),
        Some(Protocol::IcmPv4(_)) => (0, 0, "icmpv4"),
        Some(Protocol::IcmPv6(_)) => (0, 0, "icmpv6"),
        _ => (0, 0, ""),
    }
}

/// An address or a CIDR.
fn ip_matches(addr: &str, filter: &str) -> bool {
    let Ok(a) = addr.parse::<IpAddr>() else {
        return false;
    };
    match filter.parse::<IpNet>() {
        Ok(net) => net.contains(&a),
        Err(_) => filter.parse::<IpAddr>().is_ok_and(|f| f == a),
    }
}

/// `namespace/` (any pod of it), `namespace/prefix`, or a pod name prefix in any namespace.
fn pod_matches(ep: &Endpoint, filter: &str) -> bool {
    match filter.split_once('/') {
        Some((ns, prefix)) => {
            ep.namespace == ns && (prefix.is_empty() || ep.pod_name.starts_with(prefix))
        }
        None => !ep.pod_name.is_empty() && ep.pod_name.starts_with(filter),
    }
}

/// `namespace/name` (or a bare name in any namespace) of the flow's Service.
fn service_matches(svc: &Option<flow::Service>, filter: &str) -> bool {
    let Some(s) = svc else {
        return false;
    };
    match filter.split_once('/') {
        Some((ns, name)) => s.namespace == ns && (name.is_empty() || s.name.starts_with(name)),
        None => s.name.starts_with(filter),
    }
}

fn workload_matches(ep: &Endpoint, w: &flow::Workload) -> bool {
    ep.workloads
        .iter()
        .any(|x| (w.name.is_empty() || x.name == w.name) && (w.kind.is_empty() || x.kind == w.kind))
}

fn event_matches(flow: &Flow, f: &flow::EventTypeFilter) -> bool {
    let Some(e) = &flow.event_type else {
        return false;
    };
    e.r#type == f.r#type && (!f.match_sub_type || e.sub_type == f.sub_type)
}

fn tcp_flags_match(flow: &Flow, want: &flow::TcpFlags) -> bool {
    let Some(Protocol::Tcp(t)) = flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) else {
        return false;
    };
    let Some(have) = &t.flags else {
        return false;
    };
    let pairs = [
        (want.fin, have.fin),
        (want.syn, have.syn),
        (want.rst, have.rst),
        (want.psh, have.psh),
        (want.ack, have.ack),
        (want.urg, have.urg),
        (want.ece, have.ece),
        (want.cwr, have.cwr),
        (want.ns, have.ns),
    ];
    pairs.iter().all(|(w, h)| !*w || *h)
}

/// A label selector as Hubble's `--label`: requirements separated by commas, each `key=value`
/// (or `==`), `key!=value`, `key` (present) or `!key` (absent); keys may carry the `k8s:`
/// source prefix of the flow's labels or leave it out.
fn labels_match(labels: &[String], selector: &str) -> bool {
    let value_of = |key: &str| -> Option<&str> {
        let key = key.strip_prefix("k8s:").unwrap_or(key);
        labels.iter().find_map(|l| {
            let l = l.strip_prefix("k8s:").unwrap_or(l);
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            (k == key).then_some(v)
        })
    };
    selector.split(',').map(str::trim).all(|req| {
        if let Some((k, v)) = req.split_once("!=") {
            value_of(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
            value_of(k.trim()) == Some(v.trim())
        } else if let Some(k) = req.strip_prefix('!') {
            value_of(k.trim()).is_none()
        } else {
            req.is_empty() || value_of(req).is_some()
        }
    })
}

/// `*` matches any run of characters.
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_hubble_selectors() {
        let l = vec!["k8s:app=web".to_string(), "k8s:tier=front".to_string()];
        assert!(labels_match(&l, "app=web"));
        assert!(labels_match(&l, "k8s:app=web,tier=front"));
        assert!(!labels_match(&l, "app=db"));
        assert!(labels_match(&l, "app!=db"));
        assert!(labels_match(&l, "tier"));
        assert!(!labels_match(&l, "!tier"));
    }

    #[test]
    fn pods_ips_and_globs() {
        let ep = Endpoint {
            namespace: "shop".into(),
            pod_name: "web-5d8f".into(),
            ..Default::default()
        };
        assert!(pod_matches(&ep, "shop/"));
        assert!(pod_matches(&ep, "shop/web"));
        assert!(!pod_matches(&ep, "other/web"));
        assert!(pod_matches(&ep, "web"));
        assert!(ip_matches("10.244.0.5", "10.244.0.0/16"));
        assert!(ip_matches("10.244.0.5", "10.244.0.5"));
        assert!(!ip_matches("10.244.0.5", "10.245.0.0/16"));
        assert!(glob("node-*", "node-1"));
        assert!(glob("*", "x"));
        assert!(!glob("node-*", "kind-1"));
    }
}
