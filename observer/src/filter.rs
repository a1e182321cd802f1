//! Flow filters, `hubble observe` style: filters of the same kind are alternatives (OR), filters
//! of different kinds must all hold (AND), and `--not` negates the filter that follows it.
//! Evaluated by the daemon (server side); the CLI sends them as JSON.
use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{bail, Context as _, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::flows::{FlowRecord, Peer};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Match {
    Namespace(String),
    FromNamespace(String),
    ToNamespace(String),
    /// `[namespace/]pod`; either side.
    Pod(String),
    FromPod(String),
    ToPod(String),
    /// `key=value` or `key`, on either side's labels.
    Label(String),
    Ip(IpNet),
    FromIp(IpNet),
    ToIp(IpNet),
    Port(u16),
    Protocol(String),
    Verdict(String),
    DropReason(String),
    /// `namespace/name` of an allowing or isolating policy.
    Policy(String),
    /// Event type: new, report, close, drop.
    Type(String),
    TrafficClass(String),
    /// `any` (the record has an `snat` object), `translated` (the wire carried another
    /// source), or an expectation: expected, none, unexpected, missing.
    Snat(String),
    /// `[namespace/]name` of the Service a pod connected to.
    Service(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub negate: bool,
    #[serde(rename = "match")]
    pub m: Match,
}

fn kind(m: &Match) -> std::mem::Discriminant<Match> {
    std::mem::discriminant(m)
}

fn pod_is(p: &Peer, spec: &str) -> bool {
    match spec.split_once('/') {
        Some((ns, pod)) => p.namespace.as_deref() == Some(ns) && p.pod.as_deref() == Some(pod),
        None => p.pod.as_deref() == Some(spec),
    }
}

fn label_is(labels: &BTreeMap<String, String>, spec: &str) -> bool {
    match spec.split_once('=') {
        Some((k, v)) => labels.get(k).is_some_and(|x| x == v),
        None => labels.contains_key(spec),
    }
}

fn ip_in(p: &Peer, net: &IpNet) -> bool {
    p.ip.is_some_and(|ip: IpAddr| net.contains(&ip))
}

impl Match {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let (s, d) = (&r.source, &r.destination);
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match self {
            Match::Namespace(ns) => {
                s.namespace.as_deref() == Some(ns) || d.namespace.as_deref() == Some(ns)
            }
            Match::FromNamespace(ns) => s.namespace.as_deref() == Some(ns),
            Match::ToNamespace(ns) => d.namespace.as_deref() == Some(ns),
            Match::Pod(p) => pod_is(s, p) || pod_is(d, p),
            Match::FromPod(p) => pod_is(s, p),
            Match::ToPod(p) => pod_is(d, p),
            Match::Label(l) => label_is(&s.labels, l) || label_is(&d.labels, l),
            Match::Ip(n) => ip_in(s, n) || ip_in(d, n),
            Match::FromIp(n) => ip_in(s, n),
            Match::ToIp(n) => ip_in(d, n),
            Match::Port(p) => s.port == *p || d.port == *p,
            Match::Protocol(p) => eq(&r.l4.protocol, p),
            Match::Verdict(v) => eq(&r.verdict, v),
            Match::DropReason(x) => r.drop_reason.as_deref().is_some_and(|d| eq(d, x)),
            Match::Policy(p) => {
                r.policy
                    .iter()
                    .any(|x| format!("{}/{}", x.namespace, x.name) == *p)
                    || r.isolated_by
                        .iter()
                        .any(|x| format!("{}/{}", x.namespace, x.name) == *p)
            }
            Match::Type(t) => eq(&r.event, t),
            Match::TrafficClass(c) => eq(&r.traffic_class, c),
            Match::Service(spec) => {
                r.service
                    .as_ref()
                    .is_some_and(|v| match spec.split_once('/') {
                        Some((ns, name)) => v.namespace == ns && v.name == name,
                        None => v.name == *spec,
                    })
            }
            Match::Snat(x) => match (&r.snat, x.as_str()) {
                (None, _) => false,
                (Some(_), "any") => true,
                (Some(n), "translated") => {
                    (n.translated_src_ip, n.translated_src_port)
                        != (n.original_src_ip, n.original_src_port)
                }
                (Some(n), e) => n.expectation.as_str() == e,
            },
        }
    }
}

/// Whether a record passes every kind of filter given (OR within a kind, AND across kinds).
pub fn accepts(filters: &[Filter], r: &FlowRecord) -> bool {
    let mut kinds: Vec<std::mem::Discriminant<Match>> =
        filters.iter().map(|f| kind(&f.m)).collect();
    kinds.dedup();
    kinds.sort_by_key(|k| format!("{k:?}"));
    kinds.dedup();
    kinds.iter().all(|k| {
        let of_kind: Vec<&Filter> = filters.iter().filter(|f| kind(&f.m) == *k).collect();
        let positives: Vec<&&Filter> = of_kind.iter().filter(|f| !f.negate).collect();
        let negatives: Vec<&&Filter> = of_kind.iter().filter(|f| f.negate).collect();
        (positives.is_empty() || positives.iter().any(|f| f.m.matches(r)))
            && negatives.iter().all(|f| !f.m.matches(r))
    })
}

/// Parses one CLI filter value for `flag` (`--namespace`, `--from-ip`, ...).
pub fn parse(flag: &str, value: &str) -> Result<Match> {
    let net = |v: &str| -> Result<IpNet> {
        if let Ok(n) = v.parse::<IpNet>() {
            return Ok(n);
        }
        let ip: IpAddr = v
            .parse()
            .with_context(|| format!("--{flag} {v:?}: expected an IP address or CIDR"))?;
        Ok(IpNet::from(ip))
    };
    Ok(match flag {
        "namespace" => Match::Namespace(value.into()),
        "from-namespace" => Match::FromNamespace(value.into()),
        "to-namespace" => Match::ToNamespace(value.into()),
        "pod" => Match::Pod(value.into()),
        "from-pod" => Match::FromPod(value.into()),
        "to-pod" => Match::ToPod(value.into()),
        "label" => Match::Label(value.into()),
        "ip" => Match::Ip(net(value)?),
        "from-ip" => Match::FromIp(net(value)?),
        "to-ip" => Match::ToIp(net(value)?),
        "port" => Match::Port(
            value
                .parse()
                .with_context(|| format!("--port {value:?}: expected a port number"))?,
        ),
        "protocol" => {
            let p = value.to_ascii_uppercase();
            if !["TCP", "UDP", "SCTP", "ICMP", "ICMPV6"].contains(&p.as_str()) {
                bail!("--protocol {value:?}: expected TCP, UDP, SCTP, ICMP or ICMPv6");
            }
            Match::Protocol(value.into())
        }
        "verdict" => {
            if !["forwarded", "dropped", "audit"].contains(&value.to_ascii_lowercase().as_str()) {
                bail!("--verdict {value:?}: expected forwarded, dropped or audit");
            }
            Match::Verdict(value.into())
        }
        "drop-reason" => Match::DropReason(value.into()),
        "policy" => {
            if !value.contains('/') {
                bail!("--policy {value:?}: expected namespace/name");
            }
            Match::Policy(value.into())
        }
        "type" => {
            if !["new", "report", "close", "drop"].contains(&value.to_ascii_lowercase().as_str()) {
                bail!("--type {value:?}: expected new, report, close or drop");
            }
            Match::Type(value.into())
        }
        "traffic-class" => Match::TrafficClass(value.into()),
        "service" => Match::Service(value.into()),
        "snat" => {
            let v = value.to_ascii_lowercase();
            let known = ["any", "translated"].contains(&v.as_str())
                || crate::snat::Expectation::parse(&v).is_some();
            if !known {
                bail!(
                    "--snat {value:?}: expected any, translated, expected, none, unexpected or missing"
                );
            }
            Match::Snat(v)
        }
        other => bail!("unknown filter --{other}"),
    })
}

/// Filters from raw arguments in order, so `--not` applies to the filter right after it.
/// `args` holds `(flag, value)` pairs as given; `--not` appears as `("not", "")`.
pub fn from_args(args: &[(String, String)]) -> Result<Vec<Filter>> {
    let mut out = Vec::new();
    let mut negate = false;
    for (flag, value) in args {
        if flag == "not" {
            negate = true;
            continue;
        }
        out.push(Filter {
            negate,
            m: parse(flag, value)?,
        });
        negate = false;
    }
    if negate {
        bail!("--not must be followed by a filter");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::{Counters, IpInfo, L4Info};

    fn rec(src_pod: &str, dst_ns: &str, verdict: &str, port: u16) -> FlowRecord {
        let peer = |ns: &str, pod: &str, ip: &str, port: u16| Peer {
            ip: Some(ip.parse().unwrap()),
            port,
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            labels: BTreeMap::from([("app".to_string(), pod.to_string())]).into(),
            workload: None,
        };
        FlowRecord {
            time: Default::default(),
            node: "n".into(),
            event: "new".into(),
            verdict: verdict.to_string().into(),
            drop_reason: (verdict == "dropped").then(|| "policy-denied".into()),
            policy: vec![],
            isolated_by: vec![],
            isolated_by_more: 0,
            allowed_by: None,
            service: None,
            original_source: None,
            direction: "egress".into(),
            traffic_class: "pod-to-pod-local".into(),
            ip: IpInfo {
                version: 4,
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
            },
            l4: L4Info {
                protocol: "TCP".into(),
                src_port: 40000,
                dst_port: port,
                tcp_flags: Default::default(),
                icmp: None,
            },
            source: peer("x", src_pod, "10.0.0.1", 40000),
            destination: peer(dst_ns, "db", "10.0.0.2", port),
            counters: Counters::default(),
            snat: None,
            first_seen: Default::default(),
            last_seen: Default::default(),
            interface: 0,
        }
    }

    fn f(args: &[(&str, &str)]) -> Vec<Filter> {
        from_args(
            &args
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn same_kind_ors_different_kinds_and() {
        let r = rec("web", "y", "dropped", 5432);
        assert!(accepts(
            &f(&[("from-pod", "x/web"), ("from-pod", "x/api")]),
            &r
        ));
        assert!(!accepts(&f(&[("from-pod", "x/api")]), &r));
        assert!(accepts(
            &f(&[("from-pod", "web"), ("verdict", "dropped")]),
            &r
        ));
        assert!(!accepts(
            &f(&[("from-pod", "web"), ("verdict", "forwarded")]),
            &r
        ));
        assert!(accepts(
            &f(&[
                ("to-namespace", "y"),
                ("port", "5432"),
                ("ip", "10.0.0.0/24")
            ]),
            &r
        ));
        assert!(accepts(&f(&[("label", "app=db"), ("protocol", "tcp")]), &r));
        assert!(accepts(&f(&[("drop-reason", "policy-denied")]), &r));
    }

    #[test]
    fn not_negates_only_the_next_filter() {
        let r = rec("web", "y", "forwarded", 80);
        assert!(!accepts(&f(&[("not", ""), ("from-pod", "web")]), &r));
        assert!(accepts(
            &f(&[("not", ""), ("from-pod", "api"), ("to-namespace", "y")]),
            &r
        ));
        assert!(from_args(&[("not".into(), "".into())]).is_err());
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert!(parse("verdict", "maybe")
            .unwrap_err()
            .to_string()
            .contains("--verdict"));
        assert!(parse("from-ip", "nope")
            .unwrap_err()
            .to_string()
            .contains("--from-ip"));
        assert!(parse("port", "http")
            .unwrap_err()
            .to_string()
            .contains("--port"));
    }
}
