//! Services, DNS, kubelet probes, `observer flows` and the metrics endpoint on the real
//! two-node cluster (`cargo xtask cluster up`), with observer deployed from manifests/: the
//! real-cluster counterpart of e2e_services.rs. Each test works in its own namespace, deleted
//! at the end; nothing cluster-wide is changed.
//!
//! Layout used below: node-1 10.224.0.4 (pods 10.244.0.0/24), node-2 10.224.0.5 (pods
//! 10.244.1.0/24, and the DNS pod behind kube-dns 10.96.0.10), the router 10.224.0.1 outside
//! the cluster on the VNet.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use observer_tests::cluster::*;
use observer_tests::default_deny_with_dns;
use serde_json::Value;

/// A denied connection costs its whole timeout: keep it short.
const DENY_SECS: u32 = 2;

const NODE1: &str = "node-1";
const NODE2: &str = "node-2";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A kernel counter of `observer status`'s text (`name=value`).
fn kernel_counter(status: &str, name: &str) -> u64 {
    let key = format!("{name}=");
    status
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no kernel counter {name} in:\n{status}"))
}

fn node_ip(c: &Layout, node: &str) -> String {
    c.node(node).ip.clone()
}

/// Work for `par`.
type Job<'a, T> = Box<dyn FnOnce() -> T + Send + 'a>;

/// Runs closures on threads at once (pod creation, denied connections): results in order.
fn par<'a, T: Send + 'a>(fs: Vec<Job<'a, T>>) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = fs.into_iter().map(|f| s.spawn(f)).collect();
        hs.into_iter()
            .map(|h| h.join().expect("worker thread panicked"))
            .collect()
    })
}

/// A Service selecting `app: <app>`, port 80 to the pods' `target` (TCP); `NodePort` type when
/// `node_port`, with the port chosen by the API server.
fn service_yaml(name: &str, app: &str, target: u16, node_port: bool) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: {ty}\n  \
         selector: {{app: {app}}}\n  ports: [{{name: http, port: 80, targetPort: {target}, protocol: TCP}}]\n---\n",
        ty = if node_port { "NodePort" } else { "ClusterIP" }
    )
}

fn jsonpath(c: &Layout, ns: &str, kind_name: &str, path: &str) -> Result<String> {
    let out = c.kubectl_out(&[
        "-n",
        ns,
        "get",
        kind_name,
        "-o",
        &format!("jsonpath={path}"),
    ])?;
    Ok(out.trim().to_string())
}

/// The ClusterIP and (NodePort Services) the nodePort of a Service.
fn service_frontend(c: &Layout, ns: &str, name: &str) -> (String, Option<u16>) {
    let ip = jsonpath(c, ns, &format!("service/{name}"), "{.spec.clusterIP}").unwrap();
    let np = jsonpath(
        c,
        ns,
        &format!("service/{name}"),
        "{.spec.ports[0].nodePort}",
    )
    .unwrap()
    .parse()
    .ok();
    (ip, np)
}

/// Waits until kube-proxy on `node` has programmed the Service's ClusterIP with a backend
/// (and its NodePort when given): before that a connection would be refused for lack of
/// rules, not for policy.
fn wait_programmed(
    c: &Layout,
    node: &str,
    ns: &str,
    svc: &str,
    cluster_ip: &str,
    node_port: Option<u16>,
) {
    let comment = format!("{ns}/{svc}:http");
    eventually(
        &format!("kube-proxy on {node} programming {comment}"),
        Duration::from_secs(30),
        || {
            if c.proxy == ProxyMode::Nftables {
                let t = c.node_out(c.node(node), &["nft", "list", "table", "ip", "kube-proxy"])?;
                let chain = format!("{ns}/{svc}/tcp/http");
                let vip = t.contains(&format!("{cluster_ip} . tcp . 80 : goto service-"))
                    && t.contains(&chain);
                let sep = t.contains(&format!("{chain}__"));
                let np =
                    node_port.is_none_or(|p| t.contains(&format!("tcp . {p} : goto external-")));
                return Ok(vip && sep && np);
            }
            let nat = c.node_out(c.node(node), &["iptables-save", "-t", "nat"])?;
            let lines: Vec<&str> = nat.lines().filter(|l| l.contains(&comment)).collect();
            let vip = lines
                .iter()
                .any(|l| l.contains(&format!("-d {cluster_ip}/32")) && l.contains("-j KUBE-SVC-"));
            let sep = lines.iter().any(|l| l.contains("-j DNAT"));
            let np = node_port.is_none_or(|p| {
                lines.iter().any(|l| {
                    l.starts_with("-A KUBE-NODEPORTS") && l.contains(&format!("--dport {p} "))
                })
            });
            Ok(vip && sep && np)
        },
    );
}

/// What the node did to NodePort connections (for failure messages): kube-proxy's masquerade
/// rule and the kernel's conntrack entries of the nodePort, original and reply tuples.
fn nodeport_nat(c: &Layout, node: &str, node_port: u16) -> String {
    let masq = c
        .node_out(c.node(node), &["iptables-save", "-t", "nat"])
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("-j MASQUERADE"))
                .collect::<Vec<_>>()
                .join("\n    ")
        })
        .unwrap_or_else(|e| format!("{e:#}"));
    let ct = c
        .node_out(
            c.node(node),
            &[
                "conntrack",
                "-L",
                "-p",
                "tcp",
                "--orig-port-dst",
                &node_port.to_string(),
            ],
        )
        .unwrap_or_else(|e| format!("{e:#}"));
    format!(
        "{node}'s masquerade:\n    {masq}\n  {node}'s conntrack for :{node_port}:\n    {}",
        ct.trim().replace('\n', "\n    ")
    )
}

/// The body's first line of `url` fetched from the router (outside the cluster), or None.
fn router_get(c: &Layout, url: &str, secs: u32) -> Option<String> {
    c.router_out(&["curl", "-s", "-f", "-m", &secs.to_string(), url])
        .ok()
        .map(|s| s.lines().next().unwrap_or("").to_string())
}

/// `observer flows -o json` on `node` restricted to a namespace, as records.
fn flows(c: &Layout, node: &str, ns: &str) -> Vec<Value> {
    observer_flows(c, node, &["--namespace", ns])
        .unwrap_or_else(|e| panic!("observer flows on {node}: {e:#}"))
}

/// A record in a line, for failure messages.
fn brief(r: &Value) -> String {
    let side = |s: &Value| match (s["namespace"].as_str(), s["pod"].as_str()) {
        (Some(n), Some(p)) => format!("{n}/{p}({}:{})", s["ip"].as_str().unwrap_or("?"), s["port"]),
        _ => format!("{}:{}", s["ip"].as_str().unwrap_or("?"), s["port"]),
    };
    format!(
        "{} {} {} {} {} -> {} svc={} orig={} class={} policy={} isolated_by={} allowed_by={}",
        r["time"]
            .as_str()
            .and_then(|t| t.get(11..23))
            .unwrap_or("?"),
        r["node"].as_str().unwrap_or("?"),
        r["event"].as_str().unwrap_or("?"),
        r["verdict"].as_str().unwrap_or("?"),
        side(&r["source"]),
        side(&r["destination"]),
        r["service"],
        r["original_source"],
        r["traffic_class"].as_str().unwrap_or("?"),
        r["policy"],
        r["isolated_by"],
        r["allowed_by"],
    )
}

fn briefs(rs: &[Value]) -> String {
    rs.iter().map(brief).collect::<Vec<_>>().join("\n  ")
}

/// The records of `ns` on `node` that match `f`, waiting up to `timeout` for one (records
/// are published shortly after the packets; a `close` a second after the end); with every
/// record of `ns` there, for failure messages.
fn find_records(
    c: &Layout,
    node: &str,
    ns: &str,
    timeout: Duration,
    f: impl Fn(&Value) -> bool,
) -> (Vec<Value>, Vec<Value>) {
    let deadline = Instant::now() + timeout;
    loop {
        let all = flows(c, node, ns);
        let hits: Vec<Value> = all.iter().filter(|r| f(r)).cloned().collect();
        if !hits.is_empty() || Instant::now() > deadline {
            return (hits, all);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Like `find_records` (15 s), panicking when nothing matches.
fn wait_records(
    c: &Layout,
    node: &str,
    ns: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let (hits, all) = find_records(c, node, ns, Duration::from_secs(15), f);
    if hits.is_empty() {
        panic!(
            "no record on {node} for {what}; the namespace's records there:\n  {}",
            briefs(&all)
        );
    }
    hits
}

fn names_policy(list: &Value, ns: &str, name: &str, direction: &str) -> bool {
    list.as_array().is_some_and(|a| {
        a.iter()
            .any(|p| p["namespace"] == ns && p["name"] == name && p["direction"] == direction)
    })
}

fn is_pod(side: &Value, p: &PodRef) -> bool {
    side["pod"] == p.name.as_str()
        && side["namespace"] == p.namespace.as_str()
        && side["ip"] == p.ip.as_str()
}

/// The values of the samples of metric `name` whose labels include `labels`, from a
/// Prometheus text page (`name{k="v",...} value`).
fn samples<'a>(
    page: &'a str,
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = f64> + 'a {
    page.lines().filter_map(move |l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        let rest = rest.trim_end_matches('}');
        let has = |(k, v): &(&str, &str)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\""));
        (n == name && labels.iter().all(has))
            .then(|| value.parse().ok())
            .flatten()
    })
}

/// The one sample of `name` with `labels`, if the page has it.
fn metric(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(page, name, labels).next()
}

/// The sum of the samples of `name` whose labels include `labels`.
fn metric_sum(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(page, name, labels).sum()
}

/// observer's /metrics on `node`'s address, scraped from the router (outside the cluster).
fn scrape(c: &Layout, node: &str) -> String {
    let url = format!("http://{}:9965/metrics", node_ip(c, node));
    c.router_out(&["curl", "-s", "-f", "-m", "5", &url])
        .unwrap_or_else(|e| panic!("scraping {url}: {e:#}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Services and DNS under default-deny
// ---------------------------------------------------------------------------------------------

/// Added to `default_deny_with_dns(ns)`: web may reach db on 8080; db admits web, and the
/// router (outside the cluster) on 8080; `other` admits nobody.
fn shop_policies(ns: &str) -> String {
    default_deny_with_dns(ns)
        + &format!(
            r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-to-db, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{podSelector: {{matchLabels: {{app: db}}}}}}]
    ports: [{{port: 8080}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: db-from-web, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]
    ports: [{{port: 8080}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: db-from-outside, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{ipBlock: {{cidr: {ROUTER_IP}/32}}}}]
    ports: [{{port: 8080}}]
---
"#
        )
}

/// Clients web (node-1) and web2 (node-2), backends db (node-1, Service `db`) and other
/// (node-2, Service `other`), both Services NodePorts too. Under default-deny + allow-DNS +
/// web->db: names resolve from both nodes, web reaches db through its Service by name and by
/// ClusterIP from the same node and across nodes, nothing reaches other (ClusterIP, pod IP,
/// name); from outside, db's NodePort admits the router (ipBlock) and other's does not. The
/// records name the Service, the backend and the policies.
#[test]
fn services_and_dns_under_default_deny() {
    let Some(c) = cluster_or_skip() else { return };
    let t0 = Instant::now();
    let ns = TestNs::new(&c, "csvc", &[]).unwrap();
    let n = ns.name.clone();
    ns.apply(
        &(shop_policies(&n)
            + &service_yaml("db", "db", 8080, true)
            + &service_yaml("other", "other", 8080, true)),
    )
    .unwrap();

    let pods = par(vec![
        Box::new(|| ns.client("web", &[("app", "web")], NODE1)),
        Box::new(|| ns.client("web2", &[("app", "web")], NODE2)),
        Box::new(|| ns.server("db", &[("app", "db")], NODE1, 8080)),
        Box::new(|| ns.server("other", &[("app", "other")], NODE2, 8080)),
    ]);
    let [web, web2, db, other]: [PodRef; 4] = pods
        .into_iter()
        .map(|p| p.unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let (db_vip, db_np) = service_frontend(&c, &n, "db");
    let (other_vip, other_np) = service_frontend(&c, &n, "other");
    let (db_np, other_np) = (db_np.unwrap(), other_np.unwrap());
    for node in [NODE1, NODE2] {
        wait_programmed(&c, node, &n, "db", &db_vip, Some(db_np));
        wait_programmed(&c, node, &n, "other", &other_vip, Some(other_np));
    }
    eprintln!(
        "[{:.1?}] pods up: web {} web2 {} db {} other {}; db {db_vip} :{db_np}, other {other_vip} :{other_np}",
        t0.elapsed(),
        web.ip,
        web2.ip,
        db.ip,
        other.ip
    );

    // DNS through the kube-dns Service under default-deny + allow-dns: from node-2 (the DNS
    // pod's node) and from node-1 (across the VNet). Every lookup answered, with the ClusterIP.
    let fqdn = format!("db.{n}.svc.cluster.local");
    eventually(
        &format!("{fqdn} resolving from web"),
        Duration::from_secs(20),
        || Ok(resolve(&c, &web, &fqdn, 3).as_deref() == Some(db_vip.as_str())),
    );
    for (client, node) in [(&web, NODE1), (&web2, NODE2)] {
        for i in 0..5 {
            assert_eq!(
                resolve(&c, client, &fqdn, 3).as_deref(),
                Some(db_vip.as_str()),
                "lookup {i} of {fqdn} from {} on {node}",
                client.name
            );
        }
    }
    assert_eq!(
        resolve(&c, &web, &format!("other.{n}.svc.cluster.local"), 3).as_deref(),
        Some(other_vip.as_str()),
        "resolving other's Service"
    );
    eprintln!("[{:.1?}] DNS ok", t0.elapsed());

    // web -> db through its Service by name (search list) and by ClusterIP: same node (web)
    // and across nodes (web2); and directly.
    let by_name = format!("http://db.{n}:80/");
    let by_vip = format!("http://{db_vip}:80/");
    for (client, where_) in [(&web, "same node"), (&web2, "across nodes")] {
        for url in [&by_name, &by_vip] {
            eventually(
                &format!("{} -> {url} ({where_})", client.name),
                Duration::from_secs(20),
                || Ok(http_get(&c, client, url, 3).as_deref() == Some("db")),
            );
        }
    }
    assert_eq!(
        http_get(&c, &web, &format!("http://{}:8080/", db.ip), 3).as_deref(),
        Some("db")
    );
    assert_eq!(
        http_get(&c, &web2, &format!("http://{}:8080/", db.ip), 3).as_deref(),
        Some("db")
    );
    // That connection, between two pods across nodes: past both nodes' stacks where each pod
    // has a routed veth (the ptp CNI, Azure CNI's shape); never for a bridge's ports.
    let to = kernel_counter(&observer_status(&c, NODE2).unwrap(), "redirected_to_uplink");
    let from = kernel_counter(
        &observer_status(&c, NODE1).unwrap(),
        "redirected_from_uplink",
    );
    match c.cni {
        Cni::Ptp => assert!(
            to > 0 && from > 0,
            "redirected: {to} to, {from} from the uplink"
        ),
        Cni::Bridge => assert_eq!((to, from), (0, 0), "redirected on a bridge"),
    }
    // Hairpin: db through its own Service (kube-proxy masquerades it; a pod talking to
    // itself is always allowed, though db's egress is default-deny).
    let hairpin = http_get(&c, &db, &by_vip, 3);
    eprintln!(
        "[{:.1?}] allowed Service connections ok; hairpin {hairpin:?}",
        t0.elapsed()
    );

    // other serves (its own node reaches it: kubelet-style, allowed from the node) ...
    let node2 = c.node(NODE2).clone();
    assert_eq!(
        c.node_out(
            &node2,
            &[
                "curl",
                "-s",
                "-m",
                "3",
                &format!("http://{}:8080/", other.ip)
            ]
        )
        .unwrap()
        .trim(),
        "other",
        "other serves, seen from its node"
    );
    // ... and the router reaches db's NodePort at node-1 (local backend, ipBlock admits it).
    let db_nodeport = format!("http://{}:{db_np}/", node_ip(&c, NODE1));
    eventually(
        &format!("router -> {db_nodeport}"),
        Duration::from_secs(20),
        || Ok(router_get(&c, &db_nodeport, 3).as_deref() == Some("db")),
    );

    // ... but nobody reaches other: not through its ClusterIP, its name or its pod IP, from
    // the same node (web2) or across nodes (web); and not from outside through its NodePort
    // at node-2 (local backend: kube-proxy masquerades the router to a node address, which
    // must not pass as "the node", docs/policy.md).
    let other_np_url = format!("http://{}:{other_np}/", node_ip(&c, NODE2));
    let other_vip_url = format!("http://{other_vip}:80/");
    let other_name_url = format!("http://other.{n}:80/");
    let other_ip_url = format!("http://{}:8080/", other.ip);
    let checks: Vec<(String, Job<'_, Option<String>>)> = vec![
        (
            format!("web -> other by ClusterIP {other_vip_url}"),
            Box::new(|| http_get(&c, &web, &other_vip_url, DENY_SECS)),
        ),
        (
            format!("web -> other by pod IP {other_ip_url}"),
            Box::new(|| http_get(&c, &web, &other_ip_url, DENY_SECS)),
        ),
        (
            format!("web2 -> other by ClusterIP (same node) {other_vip_url}"),
            Box::new(|| http_get(&c, &web2, &other_vip_url, DENY_SECS)),
        ),
        (
            format!("web2 -> other by name {other_name_url}"),
            Box::new(|| http_get(&c, &web2, &other_name_url, DENY_SECS)),
        ),
        (
            format!("web2 -> other by pod IP {other_ip_url}"),
            Box::new(|| http_get(&c, &web2, &other_ip_url, DENY_SECS)),
        ),
    ];
    let mut checks = checks;
    checks.push((
        format!("router -> other's NodePort {other_np_url}"),
        Box::new(|| router_get(&c, &other_np_url, DENY_SECS)),
    ));
    let (whats, fs): (Vec<String>, Vec<_>) = checks.into_iter().unzip();
    let results = par(fs);
    let opened: Vec<String> = whats
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_some())
        .map(|(w, r)| format!("{w}: answered {r:?}"))
        .collect();
    eprintln!(
        "[{:.1?}] denied connections tried: {:?}",
        t0.elapsed(),
        whats.iter().zip(&results).collect::<Vec<_>>()
    );

    // The records.
    let dst_is_vip = |r: &Value| {
        r["ip"]["dst"]
            .as_str()
            .is_some_and(|d| d.starts_with("10.96."))
    };
    let svc_is = |r: &Value, name: &str, ip: &str, port: u16| {
        r["service"]["namespace"] == n.as_str()
            && r["service"]["name"] == name
            && r["service"]["ip"] == ip
            && r["service"]["port"] == port
    };
    let mut problems = opened;
    if hairpin.as_deref() != Some("db") {
        problems.push(format!(
            "db -> its own Service {by_vip} (hairpin): {hairpin:?}"
        ));
    }
    let mut check = |ok: bool, msg: String| {
        if !ok {
            problems.push(msg)
        }
    };

    // node-1: web -> db's Service, same node: one connection named after the Service, the
    // backend as destination, allowed by web-to-db (egress) and db-from-web (ingress).
    let r1 = wait_records(&c, NODE1, &n, "web -> db via its ClusterIP", |r| {
        r["event"] == "new" && is_pod(&r["source"], &web) && svc_is(r, "db", &db_vip, 80)
    });
    // One connection, one `new` record.
    let mut ports: Vec<u64> = r1
        .iter()
        .filter_map(|r| r["l4"]["src_port"].as_u64())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    check(
        ports.len() == r1.len(),
        format!(
            "web -> db (Service) connections recorded more than once: {}",
            briefs(&r1)
        ),
    );
    let r = &r1[0];
    check(
        is_pod(&r["destination"], &db),
        format!("destination is db: {}", brief(r)),
    );
    check(
        r["l4"]["dst_port"] == 8080 && r["ip"]["dst"] == db.ip.as_str(),
        format!("backend port/IP: {}", brief(r)),
    );
    check(
        r["verdict"] == "forwarded",
        format!("verdict: {}", brief(r)),
    );
    check(
        r["traffic_class"] == "pod-to-pod-local",
        format!("class: {}", brief(r)),
    );
    check(
        names_policy(&r["policy"], &n, "web-to-db", "egress")
            && names_policy(&r["policy"], &n, "db-from-web", "ingress"),
        format!("web -> db (Service) policies: {}", brief(r)),
    );
    // node-2: web2 -> db's Service across nodes, judged at node-2's uplink against db.
    let r2 = wait_records(
        &c,
        NODE2,
        &n,
        "web2 -> db via its ClusterIP (across nodes)",
        |r| r["event"] == "new" && is_pod(&r["source"], &web2) && svc_is(r, "db", &db_vip, 80),
    );
    let r = &r2[0];
    check(
        is_pod(&r["destination"], &db)
            && r["verdict"] == "forwarded"
            && r["traffic_class"] == "pod-to-pod-remote",
        format!("web2 -> db (Service, remote backend): {}", brief(r)),
    );
    check(
        names_policy(&r["policy"], &n, "web-to-db", "egress"),
        format!("web2 -> db egress policy: {}", brief(r)),
    );
    // node-1 sees web2's connection arrive at db: allowed by db-from-web.
    let r3 = wait_records(&c, NODE1, &n, "web2 -> db arriving at db", |r| {
        r["event"] == "new" && is_pod(&r["source"], &web2) && is_pod(&r["destination"], &db)
    });
    check(
        r3.iter().all(|r| {
            r["verdict"] == "forwarded" && names_policy(&r["policy"], &n, "db-from-web", "ingress")
        }),
        format!("web2 -> db at db's node: {}", briefs(&r3)),
    );

    // DNS: UDP to the DNS pod named after kube-dns, allowed by allow-dns, from both nodes.
    let dns_pod_ip = c
        .kubectl_out(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "k8s-app=kube-dns",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])
        .unwrap();
    for (client, node) in [(&web, NODE1), (&web2, NODE2)] {
        let recs = wait_records(
            &c,
            node,
            &n,
            &format!("{}'s DNS lookups", client.name),
            |r| {
                r["event"] == "new"
                    && is_pod(&r["source"], client)
                    && r["service"]["namespace"] == "kube-system"
                    && r["service"]["name"] == "kube-dns"
            },
        );
        check(
            recs.iter().all(|r| {
                r["l4"]["protocol"] == "UDP"
                    && r["service"]["ip"] == DNS_SVC_IP
                    && r["service"]["port"] == 53
                    && r["ip"]["dst"] == dns_pod_ip.as_str()
                    && r["destination"]["namespace"] == "kube-system"
                    && r["verdict"] == "forwarded"
                    && names_policy(&r["policy"], &n, "allow-dns", "egress")
            }),
            format!("{}'s DNS records on {node}: {}", client.name, briefs(&recs)),
        );
        check(
            recs.len() >= 5,
            format!(
                "{} lookups from {} recorded: {}",
                recs.len(),
                client.name,
                briefs(&recs)
            ),
        );
    }

    // The denied Service connection: dropped at web's egress (default-deny isolates it),
    // named after the Service, with other as the destination.
    let d1 = wait_records(&c, NODE1, &n, "web -> other's ClusterIP dropped", |r| {
        r["verdict"] == "dropped" && is_pod(&r["source"], &web) && r["service"]["name"] == "other"
    });
    let r = &d1[0];
    check(
        svc_is(r, "other", &other_vip, 80)
            && is_pod(&r["destination"], &other)
            && r["drop_reason"] == "policy-denied"
            && names_policy(&r["isolated_by"], &n, "default-deny", "egress"),
        format!("web -> other (Service) drop record: {}", brief(r)),
    );
    let d2 = wait_records(
        &c,
        NODE2,
        &n,
        "web2 -> other's ClusterIP dropped (same node)",
        |r| {
            r["verdict"] == "dropped"
                && is_pod(&r["source"], &web2)
                && r["service"]["name"] == "other"
        },
    );
    check(
        d2.iter().all(|r| {
            is_pod(&r["destination"], &other)
                && names_policy(&r["isolated_by"], &n, "default-deny", "egress")
        }),
        format!("web2 -> other (Service) drop records: {}", briefs(&d2)),
    );
    // The pod-IP attempt: dropped too, without a Service.
    let d3 = wait_records(&c, NODE1, &n, "web -> other's pod IP dropped", |r| {
        r["verdict"] == "dropped"
            && is_pod(&r["source"], &web)
            && r["ip"]["dst"] == other.ip.as_str()
            && r["service"].is_null()
    });
    check(
        d3.iter().all(|r| {
            is_pod(&r["destination"], &other)
                && names_policy(&r["isolated_by"], &n, "default-deny", "egress")
        }),
        format!("web -> other (pod IP) drop records: {}", briefs(&d3)),
    );

    // NodePorts from outside: the original client (the router), the Service with the node
    // address and nodePort, the backend, and the policy that admitted it.
    let router_client = |r: &Value| {
        r["original_source"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("{ROUTER_IP}:")))
    };
    // What reached a backend from outside a pod, for the messages below.
    let from_outside = |all: &[Value], backend: &PodRef| -> String {
        briefs(
            &all.iter()
                .filter(|r| is_pod(&r["destination"], backend) && r["source"]["pod"].is_null())
                .cloned()
                .collect::<Vec<_>>(),
        )
    };
    let (np1, all1) = find_records(&c, NODE1, &n, Duration::from_secs(5), |r| {
        r["event"] == "new"
            && r["service"]["name"] == "db"
            && r["service"]["ip"] == node_ip(&c, NODE1).as_str()
    });
    check(
    !np1.is_empty(),
    format!(
        "no record of router -> db's NodePort {db_nodeport} naming the Service and the router as original_source; \
         what reached db from outside a pod on node-1:\n  {}\n  {}",
        from_outside(&all1, &db),
        nodeport_nat(&c, NODE1, db_np)
    ),
    );
    for r in &np1 {
        check(
            svc_is(r, "db", &node_ip(&c, NODE1), db_np)
                && router_client(r)
                && is_pod(&r["destination"], &db)
                && r["verdict"] == "forwarded"
                && r["traffic_class"] == "world-to-pod"
                && r["allowed_by"].is_null()
                && names_policy(&r["policy"], &n, "db-from-outside", "ingress"),
            format!("router -> db NodePort record: {}", brief(r)),
        );
    }
    let (np2, all2) = find_records(&c, NODE2, &n, Duration::from_secs(5), |r| {
        r["service"]["name"] == "other" && r["service"]["ip"] == node_ip(&c, NODE2).as_str()
    });
    check(
    !np2.is_empty(),
    format!(
        "no record of router -> other's NodePort {other_np_url} naming the Service and the router as original_source; \
         what reached other from outside a pod on node-2:\n  {}\n  {}",
        from_outside(&all2, &other),
        nodeport_nat(&c, NODE2, other_np)
    ),
    );
    for r in &np2 {
        check(
            r["verdict"] == "dropped"
                && svc_is(r, "other", &node_ip(&c, NODE2), other_np)
                && router_client(r)
                && is_pod(&r["destination"], &other)
                && r["allowed_by"].is_null()
                && names_policy(&r["isolated_by"], &n, "default-deny", "ingress"),
            format!("router -> other NodePort record: {}", brief(r)),
        );
    }
    // Whatever the linking, nothing from outside may reach other as "the node": the only
    // connection let into other as from the node is the test's own curl from node-2.
    let as_node: Vec<Value> = all2
        .iter()
        .filter(|r| {
            r["event"] == "new"
                && is_pod(&r["destination"], &other)
                && r["allowed_by"] == "from-node"
        })
        .cloned()
        .collect();
    check(
    as_node.len() == 1,
    format!(
        "{} connections let into other as from the node; only the test's curl from node-2 should be:\n  {}",
        as_node.len(),
        briefs(&as_node)
    ),
    );

    // One connection, one set of records: nothing recorded towards a ClusterIP.
    for node in [NODE1, NODE2] {
        let to_vip: Vec<Value> = flows(&c, node, &n)
            .into_iter()
            .filter(|r| dst_is_vip(r))
            .collect();
        check(
            to_vip.is_empty(),
            format!("records towards a ClusterIP on {node}: {}", briefs(&to_vip)),
        );
    }

    eprintln!("[{:.1?}] done", t0.elapsed());
    assert!(
        problems.is_empty(),
        "{} problem(s):\n- {}",
        problems.len(),
        problems.join("\n- ")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Probes under default-deny ingress
// ---------------------------------------------------------------------------------------------

/// Every pod of the namespace isolated for ingress, nothing allowed.
const DENY_INGRESS: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

fn probe_yaml(kind: &str, port: u16) -> String {
    let action = match kind {
        "http" => format!("httpGet: {{path: /, port: {port}}}"),
        _ => format!("tcpSocket: {{port: {port}}}"),
    };
    // A single failed probe shows: NotReady (readiness), a restart (liveness), and an
    // `Unhealthy` event either way. Liveness waits 2 s so that a slow start is no restart.
    format!(
        "        ports: [{{containerPort: {port}}}]\n\
         \x20       readinessProbe:\n          {action}\n          periodSeconds: 1\n          timeoutSeconds: 2\n          failureThreshold: 1\n\
         \x20       livenessProbe:\n          {action}\n          initialDelaySeconds: 2\n          periodSeconds: 1\n          timeoutSeconds: 2\n          failureThreshold: 1\n"
    )
}

/// kubelet's `Unhealthy` events of a namespace: "pod count message" each.
fn unhealthy_events(c: &Layout, ns: &str) -> Vec<String> {
    let out = c
        .kubectl_out(&[
            "-n",
            ns,
            "get",
            "events",
            "--field-selector",
            "reason=Unhealthy",
            "-o",
            "jsonpath={range .items[*]}{.involvedObject.name} {.count} {.message}{\"\\n\"}{end}",
        ])
        .unwrap();
    let mut v: Vec<String> = out.lines().map(str::to_string).collect();
    v.sort();
    v
}

/// Ready status, restart count and the Ready condition's last transition of a pod.
fn pod_health(c: &Layout, ns: &str, pod: &str) -> Result<(String, u64, String)> {
    let out = jsonpath(
        c,
        ns,
        &format!("pod/{pod}"),
        "{.status.conditions[?(@.type==\"Ready\")].status} {.status.containerStatuses[0].restartCount} {.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}",
    )?;
    let mut it = out.split_whitespace();
    Ok((
        it.next().context("no Ready")?.to_string(),
        it.next().context("no restartCount")?.parse()?,
        it.next().context("no lastTransitionTime")?.to_string(),
    ))
}

/// httpGet and tcpSocket readiness and liveness probes every second, on both nodes, in a
/// namespace with default-deny ingress: the pods become Ready and stay Ready without a
/// restart or a failed probe for ~20 s, while another pod of the namespace is denied; observer
/// records the probes as node-to-pod, allowed by `from-node`.
#[test]
fn probes_pass_default_deny_ingress() {
    let Some(c) = cluster_or_skip() else { return };
    let t0 = Instant::now();
    let ns = TestNs::new(&c, "cprobe", &[]).unwrap();
    let n = ns.name.clone();
    ns.apply(DENY_INGRESS).unwrap();
    let http_cmd = "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www";
    let tcp_cmd = "exec nc -ll -p 9000 -e cat";
    let http_probe = probe_yaml("http", 8080);
    let tcp_probe = probe_yaml("tcp", 9000);
    let pods = par(vec![
        Box::new(|| ns.pod_with("http1", &[("app", "probed")], NODE1, http_cmd, &http_probe)),
        Box::new(|| ns.pod_with("tcp1", &[("app", "probed")], NODE1, tcp_cmd, &tcp_probe)),
        Box::new(|| ns.pod_with("http2", &[("app", "probed")], NODE2, http_cmd, &http_probe)),
        Box::new(|| ns.pod_with("tcp2", &[("app", "probed")], NODE2, tcp_cmd, &tcp_probe)),
        Box::new(|| ns.client("cli", &[("app", "cli")], NODE1)),
    ]);
    let pods: Vec<PodRef> = pods.into_iter().map(|p| p.unwrap()).collect();
    let (probed, cli) = (&pods[..4], &pods[4]);
    eprintln!("[{:.1?}] probed pods Ready", t0.elapsed());

    // The namespace is isolated: another pod of it is denied (local and remote), so what
    // passes below passes because it comes from the node.
    let denied = par(vec![
        Box::new(|| {
            http_get(
                &c,
                cli,
                &format!("http://{}:8080/", probed[0].ip),
                DENY_SECS,
            )
        }),
        Box::new(|| tcp_opens(&c, cli, &probed[3].ip, 9000, DENY_SECS).then(String::new)),
    ]);
    assert_eq!(
        denied,
        vec![None, None],
        "cli -> http1:8080 and cli -> tcp2:9000 must be denied"
    );

    // Stay Ready, without restarts or a flip of the Ready condition, for ~20 s. (A probe may
    // fail while a container starts; none may fail from here on.)
    let events_before = unhealthy_events(&c, &n);
    if !events_before.is_empty() {
        eprintln!("note: probes that failed while the pods started: {events_before:?}");
    }
    let first: Vec<_> = probed
        .iter()
        .map(|p| pod_health(&c, &n, &p.name).unwrap())
        .collect();
    let until = Instant::now() + Duration::from_secs(20);
    let mut samples = 0;
    while Instant::now() < until {
        for (p, f) in probed.iter().zip(&first) {
            let h = pod_health(&c, &n, &p.name).unwrap();
            assert_eq!(
                h.0, "True",
                "{} on {} not Ready after {samples} samples: {h:?}",
                p.name, p.node
            );
            assert_eq!(
                h.1, 0,
                "{} on {} restarted (liveness failed): {h:?}",
                p.name, p.node
            );
            assert_eq!(
                h.2, f.2,
                "{}'s Ready condition flipped meanwhile: {h:?}",
                p.name
            );
        }
        samples += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    // kubelet reports each failed probe as an event (one per pod and kind, counted).
    let events_after = unhealthy_events(&c, &n);
    assert_eq!(
        events_after, events_before,
        "probes failed during the 20 s (before, after)"
    );
    eprintln!(
        "[{:.1?}] {samples} samples: all Ready, no restart, no failed probe",
        t0.elapsed()
    );

    // observer's records of the probes: from the pod's own node, allowed by from-node.
    for p in probed {
        let node = c.node(&p.node).clone();
        let port = if p.name.starts_with("http") {
            8080
        } else {
            9000
        };
        let recs = wait_records(&c, &p.node, &n, &format!("probes of {}", p.name), |r| {
            r["event"] == "new" && is_pod(&r["destination"], p) && r["l4"]["dst_port"] == port
        });
        // Every probe passes. The first one, at the container's start, can come before the
        // daemon has made the new pod an isolated endpoint: it passes without needing
        // `from-node`. Every later one is let in as from the node.
        let early = |r: &Value| r["time"] == recs[0]["time"];
        let all_from_node = recs.iter().all(|r| {
            r["verdict"] == "forwarded"
                && (r["allowed_by"] == "from-node" || (early(r) && r["allowed_by"].is_null()))
                && r["traffic_class"] == "node-to-pod"
                && r["source"]["pod"].is_null()
                && [node.ip.as_str(), node.pod_gateway.as_str()]
                    .contains(&r["source"]["ip"].as_str().unwrap_or(""))
        });
        if recs[0]["allowed_by"].is_null() {
            eprintln!(
                "note: {}'s first probe passed before it was isolated: {}",
                p.name,
                brief(&recs[0])
            );
        }
        assert!(
            all_from_node,
            "probe records of {} on {}:\n  {}",
            p.name,
            p.node,
            briefs(&recs)
        );
        // Two probes a second for 20 s: far more than 10 connections.
        assert!(
            recs.len() >= 10,
            "only {} probe records of {}:\n  {}",
            recs.len(),
            p.name,
            briefs(&recs)
        );
        let dropped: Vec<Value> = flows(&c, &p.node, &n)
            .into_iter()
            .filter(|r| {
                r["verdict"] == "dropped"
                    && is_pod(&r["destination"], p)
                    && r["source"]["pod"].is_null()
            })
            .collect();
        assert!(
            dropped.is_empty(),
            "node traffic to {} dropped:\n  {}",
            p.name,
            briefs(&dropped)
        );
    }
    // The denied attempt is recorded as such, isolated by the namespace's policy.
    let d = wait_records(&c, NODE1, &n, "cli -> http1 dropped", |r| {
        r["verdict"] == "dropped"
            && is_pod(&r["source"], cli)
            && is_pod(&r["destination"], &probed[0])
    });
    assert!(
        d.iter().all(
            |r| names_policy(&r["isolated_by"], &n, "default-deny-ingress", "ingress")
                && r["allowed_by"].is_null()
        ),
        "{}",
        briefs(&d)
    );
    eprintln!("[{:.1?}] done", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 3. `observer flows` through kubectl exec, and /metrics on the node address
// ---------------------------------------------------------------------------------------------

/// Default-deny ingress, and srv admits app=cli on 8080.
const FLOWS_POLICIES: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-cli}
spec:
  podSelector: {matchLabels: {app: srv}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: cli}}}]
    ports: [{port: 8080}]
"#;

/// srv admits only app=cli (allow-cli) under default-deny ingress; cli is allowed, intruder
/// denied. `kubectl exec <observer pod> -- observer flows` shows both with pod names, verdicts
/// and policies (compact and JSON), and the node's /metrics, scraped from outside, counts the
/// drop against the isolating policy.
#[test]
fn flows_cli_and_metrics_show_the_verdicts() {
    let Some(c) = cluster_or_skip() else { return };
    let t0 = Instant::now();
    let ns = TestNs::new(&c, "cflows", &[]).unwrap();
    let n = ns.name.clone();
    ns.apply(FLOWS_POLICIES).unwrap();
    let pods = par(vec![
        Box::new(|| ns.server("srv", &[("app", "srv")], NODE1, 8080)),
        Box::new(|| ns.client("cli", &[("app", "cli")], NODE1)),
        Box::new(|| ns.client("intruder", &[("app", "intruder")], NODE2)),
    ]);
    let [srv, cli, intruder]: [PodRef; 3] = pods
        .into_iter()
        .map(|p| p.unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    eprintln!("[{:.1?}] pods up", t0.elapsed());

    let deny_policy = format!("{n}/default-deny");
    let allow_policy = format!("{n}/allow-cli");
    let before = scrape(&c, NODE1);
    let dropped_before = metric(
        &before,
        "observer_policy_verdicts_total",
        &[
            ("policy", &deny_policy),
            ("direction", "ingress"),
            ("verdict", "dropped"),
        ],
    )
    .unwrap_or(0.0);
    let denied_before = metric(
        &before,
        "observer_datapath_total",
        &[("kind", "policy_denied")],
    )
    .expect("observer_datapath_total{kind=policy_denied}");
    let drop_records_before = metric_sum(
        &before,
        "observer_flow_records_total",
        &[("verdict", "dropped")],
    );

    let url = format!("http://{}:8080/", srv.ip);
    eventually("cli -> srv", Duration::from_secs(20), || {
        Ok(http_get(&c, &cli, &url, 3).as_deref() == Some("srv"))
    });
    assert_eq!(
        http_get(&c, &intruder, &url, DENY_SECS),
        None,
        "intruder -> srv must be denied"
    );

    // Compact output: one readable line per record, pods by namespace/name, the verdict and
    // the policies.
    let pod = observer_pod(&c, NODE1).unwrap();
    let mut compact = String::new();
    eventually(
        "compact records of cli and intruder",
        Duration::from_secs(15),
        || {
            compact = c.kubectl_out(&[
                "-n",
                "observer",
                "exec",
                &pod,
                "--",
                "observer",
                "flows",
                "--namespace",
                &n,
            ])?;
            Ok(compact
                .lines()
                .any(|l| l.contains(&format!("{n}/intruder")) && l.contains("DROPPED")))
        },
    );
    let cli_line = compact.lines().find(|l| {
        l.contains(&format!("{n}/cli ({}:", cli.ip))
            && l.contains(&format!("-> {n}/srv ({}:8080)", srv.ip))
    });
    assert!(
        cli_line.is_some_and(
            |l| l.contains("FORWARDED") && l.contains(&format!("{allow_policy}[ingress"))
        ),
        "no compact line of cli -> srv, FORWARDED by {allow_policy}:\n{compact}"
    );
    let drop_line = compact
        .lines()
        .find(|l| l.contains(&format!("{n}/intruder ({}:", intruder.ip)) && l.contains("DROPPED"));
    assert!(
        drop_line
            .is_some_and(|l| l.contains(&format!("-> {n}/srv ({}:8080)", srv.ip))
                && l.contains(&deny_policy)),
        "no compact line of intruder -> srv, DROPPED by {deny_policy}:\n{compact}"
    );
    eprintln!("compact:\n{compact}");

    // JSON, with the CLI's filters.
    let ok = observer_flows(
        &c,
        NODE1,
        &["--from-pod", &format!("{n}/cli"), "--verdict", "forwarded"],
    )
    .unwrap();
    assert!(!ok.is_empty(), "no forwarded record of cli on node-1");
    assert!(
        ok.iter()
            .all(|r| is_pod(&r["source"], &cli) && r["verdict"] == "forwarded"),
        "the filters hold: {}",
        briefs(&ok)
    );
    let to_srv: Vec<&Value> = ok
        .iter()
        .filter(|r| is_pod(&r["destination"], &srv))
        .collect();
    assert!(
        !to_srv.is_empty()
            && to_srv
                .iter()
                .all(|r| names_policy(&r["policy"], &n, "allow-cli", "ingress")
                    && r["traffic_class"] == "pod-to-pod-local"
                    && r["l4"]["protocol"] == "TCP"
                    && r["source"]["labels"]["app"] == "cli"),
        "cli -> srv records: {}",
        briefs(&ok)
    );
    let drops = observer_flows(
        &c,
        NODE1,
        &["--policy", &deny_policy, "--verdict", "dropped"],
    )
    .unwrap();
    assert!(
        !drops.is_empty()
            && drops.iter().all(|r| is_pod(&r["source"], &intruder)
                && is_pod(&r["destination"], &srv)
                && r["drop_reason"] == "policy-denied"
                && r["direction"] == "ingress"
                && r["traffic_class"] == "pod-to-pod-remote"
                && r["policy"].as_array().is_none_or(|a| a.is_empty())
                && names_policy(&r["isolated_by"], &n, "default-deny", "ingress")),
        "drop records on node-1: {}",
        briefs(&drops)
    );
    // The client's node records its attempt too (it sent it; the drop happened at srv's node).
    let sent = wait_records(&c, NODE2, &n, "intruder's attempt on node-2", |r| {
        is_pod(&r["source"], &intruder) && is_pod(&r["destination"], &srv)
    });
    eprintln!("intruder's attempt on node-2:\n  {}", briefs(&sent));

    // /metrics on the node address, from outside and from the other node: the drop counted
    // against the policy that isolates srv, the allowed connection against allow-cli.
    let mut after = String::new();
    eventually(
        "the drop in node-1's metrics",
        Duration::from_secs(10),
        || {
            after = scrape(&c, NODE1);
            Ok(metric(
                &after,
                "observer_policy_verdicts_total",
                &[
                    ("policy", &deny_policy),
                    ("direction", "ingress"),
                    ("verdict", "dropped"),
                ],
            )
            .unwrap_or(0.0)
                > dropped_before)
        },
    );
    let show = |page: &str| {
        page.lines()
            .filter(|l| {
                l.contains(&n)
                    || l.contains("policy_denied")
                    || (l.starts_with("observer_flow_records_total") && l.contains("dropped"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        metric(
            &after,
            "observer_policy_verdicts_total",
            &[
                ("policy", &allow_policy),
                ("direction", "ingress"),
                ("verdict", "forwarded")
            ]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "allow-cli's forwarded count:\n{}",
        show(&after)
    );
    let denied_after = metric(
        &after,
        "observer_datapath_total",
        &[("kind", "policy_denied")],
    )
    .unwrap();
    assert!(
        denied_after > denied_before,
        "datapath policy_denied {denied_before} -> {denied_after}"
    );
    let drop_records_after = metric_sum(
        &after,
        "observer_flow_records_total",
        &[("verdict", "dropped")],
    );
    assert!(
        drop_records_after > drop_records_before,
        "dropped flow records {drop_records_before} -> {drop_records_after}\n{}",
        show(&after)
    );
    let srv_in = metric(
        &after,
        "observer_pod_packets_total",
        &[("namespace", &n), ("pod", "srv"), ("direction", "ingress")],
    );
    assert!(
        srv_in.unwrap_or(0.0) > 0.0,
        "srv's ingress packets: {srv_in:?}\n{}",
        show(&after)
    );
    let from_node2 = c
        .node_out(
            c.node(NODE2),
            &[
                "curl",
                "-s",
                "-f",
                "-m",
                "5",
                &format!("http://{}:9965/metrics", node_ip(&c, NODE1)),
            ],
        )
        .unwrap();
    assert!(
        metric(
            &from_node2,
            "observer_policy_verdicts_total",
            &[
                ("policy", &deny_policy),
                ("direction", "ingress"),
                ("verdict", "dropped")
            ]
        )
        .is_some(),
        "node-1's metrics scraped from node-2:\n{}",
        show(&from_node2)
    );
    // Every policy verdict names its direction.
    assert!(
        !after.contains("direction=\"\""),
        "policy verdicts without a direction:\n{}",
        after
            .lines()
            .filter(|l| l.contains("direction=\"\""))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("metrics:\n{}", show(&after));
    eprintln!("[{:.1?}] done", t0.elapsed());
}
