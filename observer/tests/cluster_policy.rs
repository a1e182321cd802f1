//! The upstream NetworkPolicy cases (tests/policy/cases, which the virtual-node test
//! e2e_policy_traffic.rs runs on every pair) on real pods of the two-node test cluster,
//! through the API server: a representative subset, checked the way a user would check it
//! (connections that open or not, same node and across nodes, both directions where it
//! matters) and in observer's records (a dropped connection's record on the node that dropped
//! it names the policies that isolate the denying side; an allowed one names the rule).
//!
//! Four tests, in parallel, each in its own namespaces:
//! - `ingress_selectors_and_ports`: default-deny-ingress, podSelector, namespaceSelector
//!   (matchExpressions), union of policies, podSelector AND namespaceSelector updated in place
//!   to OR while traffic runs, ports, named ports.
//! - `egress_with_dns_and_services`: default-deny-egress, egress to pod AND namespace with the
//!   upstream UDP/53 rule (DNS names and Services), egress allowed but ingress denied,
//!   default-deny-all.
//! - `ipblock_and_nodes`: ipBlock with except for ingress (world, the other node, the own
//!   node) and egress (nodes), ipBlock never selecting pods (default setting).
//! - `label_changes`: pod and namespace label changes through the API server while traffic
//!   runs, adding and removing a peer, and the selected pod leaving the policy.
//!
//! Timeouts are short: an allowed probe answers in milliseconds, a denied one costs
//! `DENY_SECS`; probes of one check run in parallel.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use observer_tests::cluster::*;
use serde_json::{json, Value};

/// A denied probe's timeout.
const DENY_SECS: u32 = 2;
/// An allowed probe's timeout (it is retried once before counting as denied).
const ALLOW_SECS: u32 = 3;
const RECORD_TIMEOUT: Duration = Duration::from_secs(15);
const ENFORCE_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Helpers (candidates for tests/src/cluster.rs).

/// Several pods of the upstream model at once (one apply, then each waited for): each serves
/// its own name over HTTP on TCP 80 and 81, declared as container ports `serve-80-tcp` and
/// `serve-81-tcp`, and carries `pod: <label>`.
fn model_pods(ns: &TestNs, pods: &[(&str, &str, &str)]) -> Result<Vec<PodRef>> {
    let mut yaml = String::new();
    for (name, label, node) in pods {
        let cmd = format!(
            "mkdir -p /www && echo {name} > /www/index.html && httpd -p 81 -h /www && \
             exec httpd -f -p 80 -h /www"
        );
        yaml += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    pod: \"{label}\"\n\
             \x20   test-pod: \"{name}\"\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 0\n\
             \x20 containers:\n    - name: main\n      image: {TOOLS_IMAGE}\n      command: [sh, -c, {cmd:?}]\n\
             \x20     ports:\n        - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}\n\
             \x20       - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}\n"
        );
    }
    ns.apply(&yaml)?;
    pods.iter()
        .map(|(name, _, _)| ns.wait_ready(name))
        .collect()
}

/// Where a probe starts: a pod, the router (a client outside the cluster on the VNet,
/// 10.224.0.1) or a node's own network namespace.
#[derive(Clone, Debug)]
enum Src {
    Pod(PodRef),
    Router,
    Node(&'static str),
}

impl Src {
    fn name(&self) -> String {
        match self {
            Src::Pod(p) => format!("{}/{}", p.namespace, p.name),
            Src::Router => "router".into(),
            Src::Node(n) => (*n).into(),
        }
    }
}

/// What a probe should see.
#[derive(Clone, Debug, PartialEq)]
enum Want {
    /// The connection opens and the server answers this body (the pod's name).
    Body(String),
    /// The connection opens and anything answers (a node's kube-proxy health port).
    Open,
    Denied,
}

#[derive(Clone, Debug)]
struct Probe {
    src: Src,
    /// An address or a name.
    ip: String,
    port: u16,
    path: &'static str,
    want: Want,
}

fn to_pod(src: &Src, dst: &PodRef, port: u16, allowed: bool) -> Probe {
    Probe {
        src: src.clone(),
        ip: dst.ip.clone(),
        port,
        path: "/",
        want: if allowed {
            Want::Body(dst.name.clone())
        } else {
            Want::Denied
        },
    }
}

fn pod(p: &PodRef) -> Src {
    Src::Pod(p.clone())
}

/// One HTTP GET from `src`; the body's first line when the connection opened.
fn reach(c: &Layout, src: &Src, url: &str, secs: u32) -> Option<String> {
    let t = secs.to_string();
    let curl = ["curl", "-s", "-m", &t, url];
    match src {
        Src::Pod(p) => http_get(c, p, url, secs),
        Src::Router => c.router_out(&curl).ok(),
        Src::Node(n) => c.node_out(c.node(n), &curl).ok(),
    }
    .map(|s| s.lines().next().unwrap_or("").trim().to_string())
}

fn url(ip: &str, port: u16) -> String {
    format!("http://{ip}:{port}/")
}

fn probe_url(p: &Probe) -> String {
    format!("http://{}:{}{}", p.ip, p.port, p.path)
}

/// Runs one probe; None when it saw what it should, else what it saw.
fn run_probe(c: &Layout, p: &Probe) -> Option<String> {
    let u = probe_url(p);
    let got = match p.want {
        Want::Denied => reach(c, &p.src, &u, DENY_SECS),
        // An allowed connection on this cluster answers in milliseconds; one retry covers a
        // hiccup of kubectl exec.
        _ => reach(c, &p.src, &u, ALLOW_SECS).or_else(|| {
            eprintln!("  retrying {} -> {u}", p.src.name());
            reach(c, &p.src, &u, ALLOW_SECS)
        }),
    };
    let ok = match (&p.want, &got) {
        (Want::Denied, None) => true,
        (Want::Open, Some(_)) => true,
        (Want::Body(b), Some(g)) => b == g,
        _ => false,
    };
    (!ok).then(|| format!("{got:?}"))
}

/// Runs every probe in parallel and panics listing each one that saw the wrong thing.
fn check(c: &Layout, case: &str, probes: &[Probe]) {
    let t = Instant::now();
    let results: Vec<Option<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = probes.iter().map(|p| s.spawn(|| run_probe(c, p))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let bad: Vec<String> = probes
        .iter()
        .zip(&results)
        .filter_map(|(p, r)| {
            r.as_ref().map(|got| {
                format!(
                    "  {} -> {} expected {:?}, got {got}",
                    p.src.name(),
                    probe_url(p),
                    p.want
                )
            })
        })
        .collect();
    eprintln!("[{case}] {} probes in {:.1?}", probes.len(), t.elapsed());
    if !bad.is_empty() {
        diagnose(c, probes, &results);
    }
    assert!(
        bad.is_empty(),
        "[{case}] {} of {} probes wrong:\n{}",
        bad.len(),
        probes.len(),
        bad.join("\n")
    );
}

/// Prints what a wrong probe needs explained: where its pods are now (a recreated sandbox
/// has another address), and what observer on each node recorded for its destination.
fn diagnose(c: &Layout, probes: &[Probe], results: &[Option<String>]) {
    let wide = ["get", "pods", "-A", "-o", "wide", "--no-headers"];
    match c.kubectl_out(&wide) {
        Ok(out) => eprintln!("pods now:\n{out}"),
        Err(e) => eprintln!("kubectl get pods: {e:#}"),
    }
    for n in c.nodes() {
        match observer_status(c, &n.name) {
            Ok(out) => eprintln!("observer status on {}:\n{out}", n.name),
            Err(e) => eprintln!("observer status on {}: {e:#}", n.name),
        }
    }
    for (p, _) in probes.iter().zip(results).filter(|(_, r)| r.is_some()) {
        for n in c.nodes() {
            let args = ["--ip", p.ip.as_str(), "--last", "12"];
            match observer_flows(c, &n.name, &args) {
                Ok(recs) => {
                    eprintln!(
                        "observer on {} for {}: {} records",
                        n.name,
                        p.ip,
                        recs.len()
                    );
                    for r in recs {
                        eprintln!("  {r}");
                    }
                }
                Err(e) => eprintln!("observer flows on {}: {e:#}", n.name),
            }
        }
    }
}

/// Waits until every probe of `ps` sees what it should in one round (run in parallel): the
/// policy change just made is enforced. Short timeouts, so a still-open connection returns at
/// once and a round with a denied one costs 1 s. The probes are chosen so that only the final
/// state passes them all, not a state in between (policies deleted before others are applied
/// go through the API server, and so to observer, in that order).
fn wait_enforced(c: &Layout, what: &str, ps: &[Probe]) {
    let t = Instant::now();
    eventually(what, ENFORCE_TIMEOUT, || {
        Ok(std::thread::scope(|s| {
            let hs: Vec<_> = ps
                .iter()
                .map(|p| {
                    s.spawn(move || {
                        let got = reach(c, &p.src, &probe_url(p), 1);
                        match &p.want {
                            Want::Denied => got.is_none(),
                            Want::Open => got.is_some(),
                            Want::Body(b) => got.as_deref() == Some(b.as_str()),
                        }
                    })
                })
                .collect();
            hs.into_iter().all(|h| h.join().unwrap())
        }))
    });
    eprintln!("[{what}] enforced after {:.1?}", t.elapsed());
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn policy(name: &str, spec: Value) -> String {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    })
    .to_string()
}

fn label_namespace(c: &Layout, ns: &TestNs, kv: &str) {
    c.kubectl_out(&["label", "namespace", &ns.name, kv, "--overwrite"])
        .unwrap();
}

/// `observer flows` on `node` with `filters` (and `--since`), polled until a record satisfies
/// `ok`; panics with what the node had.
fn expect_record(
    c: &Layout,
    node: &str,
    what: &str,
    since: &str,
    filters: &[&str],
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let mut args = vec!["--since", since];
    args.extend_from_slice(filters);
    let deadline = Instant::now() + RECORD_TIMEOUT;
    let mut last = Vec::new();
    loop {
        match observer_flows(c, node, &args) {
            Ok(recs) => {
                if let Some(r) = recs.iter().find(|r| ok(r)) {
                    return r.clone();
                }
                last = recs;
            }
            Err(e) => eprintln!("observer flows on {node}: {e:#}"),
        }
        if Instant::now() > deadline {
            let shown: Vec<String> = last.iter().rev().take(8).map(|r| r.to_string()).collect();
            panic!(
                "no record on {node} for {what} (observer flows -o json {}); {} records matched the \
                 filters, the last ones:\n{}",
                args.join(" "),
                last.len(),
                shown.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

type PolicyId = (String, String, String);

fn id(ns: &TestNs, name: &str, direction: &str) -> PolicyId {
    (ns.name.clone(), name.to_string(), direction.to_string())
}

fn names(v: &Value) -> BTreeSet<PolicyId> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let s = |k: &str| p[k].as_str().unwrap_or("").to_string();
                    (s("namespace"), s("name"), s("direction"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The dropped connection's record on `node` (the node that dropped it): verdict `dropped`,
/// reason `policy-denied`, and `isolated_by` exactly `isolated`.
fn expect_drop(
    c: &Layout,
    node: &str,
    since: &str,
    filters: &[&str],
    isolated: &[&PolicyId],
) -> Value {
    let want: BTreeSet<PolicyId> = isolated.iter().map(|p| (*p).clone()).collect();
    let mut f = vec!["--verdict", "dropped"];
    f.extend_from_slice(filters);
    let r = expect_record(
        c,
        node,
        &format!("a drop isolated by {want:?}"),
        since,
        &f,
        |r| names(&r["isolated_by"]) == want,
    );
    assert_eq!(r["verdict"], "dropped", "{r}");
    assert_eq!(r["event"], "drop", "{r}");
    assert_eq!(r["drop_reason"], "policy-denied", "{r}");
    assert_eq!(r["node"], node, "{r}");
    r
}

/// An allowed connection's record on `node`: verdict `forwarded` and `policy` naming `rule_of`.
fn expect_allowed_by(
    c: &Layout,
    node: &str,
    since: &str,
    filters: &[&str],
    rule_of: &PolicyId,
) -> Value {
    let mut f = vec!["--verdict", "forwarded"];
    f.extend_from_slice(filters);
    expect_record(
        c,
        node,
        &format!("a connection allowed by {rule_of:?}"),
        since,
        &f,
        |r| names(&r["policy"]).contains(rule_of),
    )
}

fn pod_arg(p: &PodRef) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// A loop of probes from `src` to `dst` in the background, to see a change through the API
/// server take effect while traffic runs. Each probe waits 2 s: a SYN lost on the way (seen
/// once, after the change, with no trace at the server node's hooks: lost before them, not
/// judged) is retransmitted after 1 s, and a denied connection never answers however long it
/// waits.
struct Traffic {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(Instant, Instant, bool)>>>,
    handle: Option<std::thread::JoinHandle<()>>,
    what: String,
}

impl Traffic {
    fn start(c: &Layout, src: &PodRef, dst: &PodRef, port: u16) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let what = format!(
            "{}/{} -> {}/{}:{port}",
            src.namespace, src.name, dst.namespace, dst.name
        );
        let (c, src, want, u) = (c.clone(), src.clone(), dst.name.clone(), url(&dst.ip, port));
        let (st, lg) = (stop.clone(), log.clone());
        let handle = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let ok = http_get(&c, &src, &u, 2).as_deref() == Some(want.as_str());
                lg.lock().unwrap().push((t0, Instant::now(), ok));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Traffic {
            stop,
            log,
            handle: Some(handle),
            what,
        }
    }

    /// Waits until the latest probes give `to` (the change took effect), stops, and checks the
    /// history: before `changed_at` every probe gave the old verdict, and from the first probe
    /// with the new one on, every later probe gave the new one (no flapping back).
    fn finish(mut self, changed_at: Instant, to: bool) {
        let log = self.log.clone();
        eventually(
            &format!("{} to become {}", self.what, verdict(to)),
            ENFORCE_TIMEOUT,
            || {
                let l = log.lock().unwrap();
                Ok(l.iter().rev().take(2).filter(|e| e.2 == to).count() == 2)
            },
        );
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        let l = log.lock().unwrap();
        let before: Vec<_> = l.iter().filter(|e| e.1 < changed_at).collect();
        let first_new = l
            .iter()
            .position(|e| e.0 >= changed_at && e.2 == to)
            .unwrap();
        let flapped = l[first_new..].iter().filter(|e| e.2 != to).count();
        let took = l[first_new].1.saturating_duration_since(changed_at);
        eprintln!(
            "[{}] {} probes, {} before the change; {} after {took:.1?}",
            self.what,
            l.len(),
            before.len(),
            verdict(to)
        );
        assert!(
            before.iter().all(|e| e.2 != to),
            "{}: before the change some probes were already {}",
            self.what,
            verdict(to)
        );
        assert_eq!(
            flapped, 0,
            "{}: flapped back after the change took effect",
            self.what
        );
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn verdict(allowed: bool) -> &'static str {
    if allowed {
        "allowed"
    } else {
        "denied"
    }
}

// ---------------------------------------------------------------------------------------

/// Upstream cases 01, 03, 04, 05, 06, 07, 08 and 13 on namespaces x, y, z (labelled `ns`),
/// targeting x/a on node-1 from pods on both nodes.
#[test]
fn ingress_selectors_and_ports() {
    let Some(c) = cluster_or_skip() else { return };
    let t0 = Instant::now();
    // Namespace labels unique to this run: `ns: <its own name>`.
    let x = TestNs::new(&c, "polx", &[]).unwrap();
    let y = TestNs::new(&c, "poly", &[]).unwrap();
    let z = TestNs::new(&c, "polz", &[]).unwrap();
    for n in [&x, &y, &z] {
        label_namespace(&c, n, &format!("ns={}", n.name));
    }
    let xs = model_pods(&x, &[("a", "a", "node-1"), ("b", "b", "node-2")]).unwrap();
    let ys = model_pods(&y, &[("a", "a", "node-1"), ("b", "b", "node-2")]).unwrap();
    let zs = model_pods(&z, &[("b", "b", "node-1")]).unwrap();
    let (xa, xb, ya, yb, zb) = (&xs[0], &xs[1], &ys[0], &ys[1], &zs[0]);
    eprintln!(
        "pods ready after {:.1?}: x/a {} x/b {} y/a {} y/b {} z/b {}",
        t0.elapsed(),
        xa.ip,
        xb.ip,
        ya.ip,
        yb.ip,
        zb.ip
    );
    let into_xa = |port: u16, allowed: [bool; 4]| -> Vec<Probe> {
        [xb, ya, yb, zb]
            .iter()
            .zip(allowed)
            .map(|(s, a)| to_pod(&pod(s), xa, port, a))
            .collect()
    };

    // No policy: everything connects, both ports, both directions.
    let mut p = into_xa(80, [true; 4]);
    p.extend(into_xa(81, [true; 4]));
    p.extend([
        to_pod(&pod(xa), yb, 80, true),
        to_pod(&pod(xa), xb, 81, true),
    ]);
    check(&c, "no policy", &p);

    // 01 default-deny-ingress: nothing reaches x (same node and across), x still reaches out
    // and gets its replies.
    x.apply(&policy(
        "deny-ingress",
        json!({"podSelector": {}, "ingress": []}),
    ))
    .unwrap();
    wait_enforced(&c, "deny-ingress", &[to_pod(&pod(ya), xa, 80, false)]);
    let since = now_rfc3339();
    let mut p = into_xa(80, [false; 4]);
    p.extend([
        to_pod(&pod(ya), xb, 80, false),
        to_pod(&pod(xa), ya, 80, true),
        to_pod(&pod(xa), yb, 80, true),
        to_pod(&pod(xb), yb, 81, true),
    ]);
    check(&c, "01 default-deny-ingress", &p);
    let deny = id(&x, "deny-ingress", "ingress");
    // Same node: dropped at x/a's veth on node-1; across: on node-2 for x/b.
    let r = expect_drop(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(ya), "--to-pod", &pod_arg(xa)],
        &[&deny],
    );
    assert_eq!(r["destination"]["pod"], "a", "{r}");
    assert_eq!(r["destination"]["namespace"], x.name.as_str(), "{r}");
    assert_eq!(r["source"]["namespace"], y.name.as_str(), "{r}");
    expect_drop(
        &c,
        "node-2",
        &since,
        &["--from-pod", &pod_arg(ya), "--to-pod", &pod_arg(xb)],
        &[&deny],
    );
    expect_drop(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(yb), "--to-pod", &pod_arg(xa)],
        &[&deny],
    );
    x.delete("networkpolicy/deny-ingress").unwrap();

    // 03 podSelector: x/a from pod=b of its own namespace only (y/b and z/b are pod=b too).
    x.apply(&policy(
        "x-a-from-b",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ))
    .unwrap();
    wait_enforced(
        &c,
        "x-a-from-b",
        &[
            to_pod(&pod(ya), xa, 80, false),
            to_pod(&pod(xb), xa, 80, true),
        ],
    );
    let since = now_rfc3339();
    let mut p = into_xa(80, [true, false, false, false]);
    // x/b is not selected: still open to everyone.
    p.push(to_pod(&pod(ya), xb, 80, true));
    check(&c, "03 pod-selector", &p);
    expect_allowed_by(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(xb), "--to-pod", &pod_arg(xa)],
        &id(&x, "x-a-from-b", "ingress"),
    );
    expect_drop(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(yb), "--to-pod", &pod_arg(xa)],
        &[&id(&x, "x-a-from-b", "ingress")],
    );

    // 04 + 13: add x/a from namespaces In [y] (matchExpressions): the union of both.
    x.apply(&policy(
        "x-a-from-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                   {"key": "ns", "operator": "In", "values": [y.name]}]}}]}]}),
    ))
    .unwrap();
    wait_enforced(&c, "x-a-from-y", &[to_pod(&pod(ya), xa, 80, true)]);
    let since = now_rfc3339();
    check(
        &c,
        "04+13 namespace-selector, union",
        &into_xa(80, [true, true, true, false]),
    );
    expect_allowed_by(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(ya), "--to-pod", &pod_arg(xa)],
        &id(&x, "x-a-from-y", "ingress"),
    );
    expect_drop(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(zb), "--to-pod", &pod_arg(xa)],
        &[
            &id(&x, "x-a-from-b", "ingress"),
            &id(&x, "x-a-from-y", "ingress"),
        ],
    );
    x.delete("networkpolicy/x-a-from-b").unwrap();
    x.delete("networkpolicy/x-a-from-y").unwrap();

    // 06 podSelector AND namespaceSelector: pod=b in a namespace other than x.
    let and = json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{
            "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": [x.name]}]},
            "podSelector": {"matchLabels": {"pod": "b"}}}]}]});
    x.apply(&policy("x-a-peers", and)).unwrap();
    wait_enforced(
        &c,
        "x-a-peers (AND)",
        &[
            to_pod(&pod(ya), xa, 80, false),
            to_pod(&pod(zb), xa, 80, true),
        ],
    );
    let since = now_rfc3339();
    check(
        &c,
        "06 pod-and-namespace",
        &into_xa(80, [false, false, true, true]),
    );
    expect_drop(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(xb), "--to-pod", &pod_arg(xa)],
        &[&id(&x, "x-a-peers", "ingress")],
    );

    // 05: the same policy updated in place to OR (two peers) while y/a keeps connecting.
    let traffic = Traffic::start(&c, ya, xa, 80);
    std::thread::sleep(Duration::from_millis(1500));
    let or = json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [
            {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": [x.name]}]}},
            {"podSelector": {"matchLabels": {"pod": "b"}}}]}]});
    let changed = Instant::now();
    x.apply(&policy("x-a-peers", or)).unwrap();
    traffic.finish(changed, true);
    check(&c, "05 pod-or-namespace (updated)", &into_xa(80, [true; 4]));
    x.delete("networkpolicy/x-a-peers").unwrap();

    // 07 ports: x/a only on 81, only from other namespaces.
    x.apply(&policy(
        "x-a-81",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                   {"key": "ns", "operator": "NotIn", "values": [x.name]}]}}],
                   "ports": [{"port": 81}]}]}),
    ))
    .unwrap();
    wait_enforced(&c, "x-a-81", &[to_pod(&pod(ya), xa, 80, false)]);
    let since = now_rfc3339();
    let mut p = into_xa(81, [false, true, true, true]);
    p.extend([to_pod(&pod(yb), xa, 80, false)]);
    check(&c, "07 ports", &p);
    expect_drop(
        &c,
        "node-1",
        &since,
        &[
            "--from-pod",
            &pod_arg(yb),
            "--to-pod",
            &pod_arg(xa),
            "--port",
            "80",
        ],
        &[&id(&x, "x-a-81", "ingress")],
    );
    x.delete("networkpolicy/x-a-81").unwrap();

    // 08 named port: every pod of x only on the port its container names serve-81-tcp.
    x.apply(&policy(
        "x-named-81",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-tcp", "protocol": "TCP"}]}]}),
    ))
    .unwrap();
    wait_enforced(
        &c,
        "x-named-81",
        &[
            to_pod(&pod(ya), xa, 80, false),
            to_pod(&pod(xb), xa, 81, true),
        ],
    );
    let since = now_rfc3339();
    let mut p = into_xa(81, [true; 4]);
    p.extend([
        to_pod(&pod(yb), xa, 80, false),
        to_pod(&pod(ya), xb, 81, true),
        to_pod(&pod(ya), xb, 80, false),
        to_pod(&pod(xa), yb, 80, true),
    ]);
    check(&c, "08 named-port", &p);
    expect_allowed_by(
        &c,
        "node-2",
        &since,
        &[
            "--from-pod",
            &pod_arg(ya),
            "--to-pod",
            &pod_arg(xb),
            "--port",
            "81",
        ],
        &id(&x, "x-named-81", "ingress"),
    );
    expect_drop(
        &c,
        "node-2",
        &since,
        &[
            "--from-pod",
            &pod_arg(ya),
            "--to-pod",
            &pod_arg(xb),
            "--port",
            "80",
        ],
        &[&id(&x, "x-named-81", "ingress")],
    );
    eprintln!("ingress_selectors_and_ports: {:.1?}", t0.elapsed());
}

/// Upstream cases 10, 09 and 02 with DNS and Services: e's pods isolated for egress; e/a allowed
/// to f's pod=b only (plus UDP 53, as upstream), by IP and through a Service name.
#[test]
fn egress_with_dns_and_services() {
    let Some(c) = cluster_or_skip() else { return };
    let t0 = Instant::now();
    let e = TestNs::new(&c, "pole", &[]).unwrap();
    let f = TestNs::new(&c, "polf", &[]).unwrap();
    for n in [&e, &f] {
        label_namespace(&c, n, &format!("ns={}", n.name));
    }
    let es = model_pods(&e, &[("a", "a", "node-1"), ("b", "b", "node-2")]).unwrap();
    let fs = model_pods(&f, &[("a", "a", "node-1"), ("b", "b", "node-2")]).unwrap();
    let (ea, eb, fa, fb) = (&es[0], &es[1], &fs[0], &fs[1]);
    f.apply(
        &[
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                   "spec": {"selector": {"pod": "b"}, "ports": [{"port": 8080, "targetPort": "serve-80-tcp"}]}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "other"},
                   "spec": {"selector": {"pod": "a"}, "ports": [{"port": 8080, "targetPort": "serve-80-tcp"}]}}),
        ]
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("\n---\n"),
    )
    .unwrap();
    let web = format!("web.{}.svc.cluster.local", f.name);
    let other = format!("other.{}.svc.cluster.local", f.name);
    let svc = |name: &str, want: Want| Probe {
        src: pod(ea),
        ip: name.to_string(),
        port: 8080,
        path: "/",
        want,
    };
    eprintln!("pods ready after {:.1?}", t0.elapsed());
    // The Services' names resolve once the DNS hosts file has them (a second or so).
    eventually(
        "the Services' names to resolve and answer",
        Duration::from_secs(30),
        || {
            Ok(
                reach(&c, &pod(ea), &url(&web, 8080), 2).as_deref() == Some("b")
                    && reach(&c, &pod(ea), &url(&other, 8080), 2).as_deref() == Some("a"),
            )
        },
    );
    check(
        &c,
        "no policy",
        &[
            to_pod(&pod(ea), fb, 80, true),
            to_pod(&pod(ea), fa, 80, true),
            to_pod(&pod(ea), eb, 81, true),
            to_pod(&pod(fa), ea, 80, true),
        ],
    );

    // 10 default-deny-egress: e reaches nothing (not even DNS); e is still reachable.
    e.apply(&policy(
        "deny-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": []}),
    ))
    .unwrap();
    wait_enforced(&c, "deny-egress", &[to_pod(&pod(ea), fb, 80, false)]);
    let since = now_rfc3339();
    check(
        &c,
        "10 default-deny-egress",
        &[
            to_pod(&pod(ea), fb, 80, false),
            to_pod(&pod(ea), fa, 80, false),
            to_pod(&pod(eb), ea, 80, false),
            to_pod(&pod(fa), ea, 80, true),
            to_pod(&pod(fb), eb, 81, true),
            svc(&web, Want::Denied),
        ],
    );
    let deny = id(&e, "deny-egress", "egress");
    // Dropped where it left: node-1 for e/a, node-2 for e/b.
    let r = expect_drop(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(ea), "--to-pod", &pod_arg(fb)],
        &[&deny],
    );
    assert_eq!(r["direction"], "egress", "{r}");
    expect_drop(
        &c,
        "node-2",
        &since,
        &["--from-pod", &pod_arg(eb), "--to-pod", &pod_arg(ea)],
        &[&deny],
    );
    // The name lookup of the Service probe: UDP to kube-dns, dropped before the lookup left.
    let r = expect_drop(
        &c,
        "node-1",
        &since,
        &[
            "--from-pod",
            &pod_arg(ea),
            "--protocol",
            "UDP",
            "--service",
            "kube-system/kube-dns",
        ],
        &[&deny],
    );
    assert_eq!(r["l4"]["dst_port"], 53, "{r}");

    // 09: e/a may reach pod=b in f (AND) and UDP 53 anywhere (so DNS), in addition.
    let allow_b = "e-a-to-f-b";
    e.apply(&policy(
        allow_b,
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
               "egress": [
                   {"to": [{"namespaceSelector": {"matchLabels": {"ns": f.name}},
                            "podSelector": {"matchLabels": {"pod": "b"}}}]},
                   {"ports": [{"port": 53, "protocol": "UDP"}]}]}),
    ))
    .unwrap();
    wait_enforced(&c, allow_b, &[to_pod(&pod(ea), fb, 80, true)]);
    let since = now_rfc3339();
    check(
        &c,
        "09 egress pod-and-namespace",
        &[
            to_pod(&pod(ea), fb, 80, true),
            to_pod(&pod(ea), fb, 81, true),
            to_pod(&pod(ea), fa, 80, false),
            to_pod(&pod(ea), eb, 80, false),
            to_pod(&pod(eb), fb, 80, false),
            // Through the Service and DNS: policy judges the backend.
            svc(&web, Want::Body("b".into())),
            svc(&other, Want::Denied),
        ],
    );
    let allow_id = id(&e, allow_b, "egress");
    let both = [&deny, &allow_id];
    // DNS now passes by the upstream rule 1 (UDP 53 anywhere).
    let r = expect_allowed_by(
        &c,
        "node-1",
        &since,
        &[
            "--from-pod",
            &pod_arg(ea),
            "--protocol",
            "UDP",
            "--service",
            "kube-system/kube-dns",
        ],
        &id(&e, allow_b, "egress"),
    );
    let rule = r["policy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == allow_b)
        .unwrap()["rule"]
        .clone();
    assert_eq!(rule, 1, "{r}");
    expect_allowed_by(
        &c,
        "node-1",
        &since,
        &[
            "--from-pod",
            &pod_arg(ea),
            "--to-pod",
            &pod_arg(fb),
            "--port",
            "80",
        ],
        &id(&e, allow_b, "egress"),
    );
    let r = expect_drop(
        &c,
        "node-1",
        &since,
        &[
            "--from-pod",
            &pod_arg(ea),
            "--service",
            &format!("{}/other", f.name),
        ],
        &both,
    );
    assert_eq!(r["destination"]["pod"], "a", "{r}");
    assert_eq!(r["service"]["name"], "other", "{r}");
    expect_drop(
        &c,
        "node-1",
        &since,
        &[
            "--from-pod",
            &pod_arg(ea),
            "--to-pod",
            &pod_arg(fa),
            "--port",
            "80",
        ],
        &both,
    );

    // Egress allowed at the source, ingress denied at the destination: f/b's own policy
    // drops it on node-2, by IP and through the Service.
    f.apply(&policy(
        "f-b-deny",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": []}),
    ))
    .unwrap();
    wait_enforced(&c, "f-b-deny", &[to_pod(&pod(ea), fb, 80, false)]);
    let since = now_rfc3339();
    check(
        &c,
        "egress allowed, ingress denied",
        &[
            to_pod(&pod(ea), fb, 80, false),
            svc(&web, Want::Denied),
            to_pod(&pod(fb), fa, 80, true),
        ],
    );
    let r = expect_drop(
        &c,
        "node-2",
        &since,
        &[
            "--from-pod",
            &pod_arg(ea),
            "--to-pod",
            &pod_arg(fb),
            "--port",
            "80",
        ],
        &[&id(&f, "f-b-deny", "ingress")],
    );
    assert_eq!(r["direction"], "ingress", "{r}");
    // The connection through the Service: node-1 (where kube-proxy translated it) names the
    // Service and let it out; node-2, which sees only pod to pod, drops it: the same
    // connection, by its source port.
    let out = expect_allowed_by(
        &c,
        "node-1",
        &since,
        &[
            "--from-pod",
            &pod_arg(ea),
            "--service",
            &format!("{}/web", f.name),
        ],
        &id(&e, allow_b, "egress"),
    );
    assert_eq!(out["destination"]["pod"], "b", "{out}");
    let sport = out["l4"]["src_port"].as_u64().unwrap().to_string();
    expect_drop(
        &c,
        "node-2",
        &since,
        &[
            "--from-pod",
            &pod_arg(ea),
            "--to-pod",
            &pod_arg(fb),
            "--port",
            &sport,
        ],
        &[&id(&f, "f-b-deny", "ingress")],
    );

    // 02 default-deny-all in f: f neither sends (same namespace across nodes, or to e) nor
    // receives; f/b's sender is stopped at its own node by the egress side.
    f.apply(&policy(
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    ))
    .unwrap();
    wait_enforced(&c, "deny-all", &[to_pod(&pod(fb), fa, 80, false)]);
    let since = now_rfc3339();
    check(
        &c,
        "02 default-deny-all",
        &[
            to_pod(&pod(fb), fa, 80, false),
            to_pod(&pod(fa), ea, 80, false),
            to_pod(&Src::Router, fa, 80, false),
        ],
    );
    expect_drop(
        &c,
        "node-2",
        &since,
        &["--from-pod", &pod_arg(fb), "--to-pod", &pod_arg(fa)],
        &[&id(&f, "deny-all", "egress")],
    );
    expect_drop(
        &c,
        "node-1",
        &since,
        &["--from-ip", ROUTER_IP, "--to-pod", &pod_arg(fa)],
        &[&id(&f, "deny-all", "ingress")],
    );
    eprintln!("egress_with_dns_and_services: {:.1?}", t0.elapsed());
}

/// ipBlock with except (upstream 14, on addresses that are not pods, as the default setting
/// wants) and 15 (ipBlock covering pod IPs selects no pods): ingress from the router (world)
/// and the nodes, egress to the nodes.
#[test]
fn ipblock_and_nodes() {
    let Some(c) = cluster_or_skip() else { return };
    let t0 = Instant::now();
    let ns = TestNs::new(&c, "poli", &[]).unwrap();
    let ps = model_pods(&ns, &[("a", "a", "node-1"), ("b", "b", "node-2")]).unwrap();
    let (a, b) = (&ps[0], &ps[1]);
    let node1 = c.node("node-1").ip.clone();
    let node2 = c.node("node-2").ip.clone();
    let health = |from: &PodRef, node: &str, want: Want| Probe {
        src: pod(from),
        ip: node.to_string(),
        port: 10256,
        path: "/healthz",
        want,
    };
    check(
        &c,
        "no policy",
        &[
            to_pod(&Src::Router, b, 80, true),
            to_pod(&Src::Node("node-1"), b, 80, true),
            to_pod(&pod(a), b, 80, true),
            health(a, &node1, Want::Open),
            health(a, &node2, Want::Open),
        ],
    );

    // Ingress of b: the VNet except node-1, and the whole pod range (which selects no pod).
    ns.apply(&policy(
        "b-from-cidr",
        json!({"podSelector": {"matchLabels": {"pod": "b"}},
               "ingress": [{"from": [
                   {"ipBlock": {"cidr": VNET_CIDR, "except": [format!("{node1}/32")]}},
                   {"ipBlock": {"cidr": CLUSTER_CIDR}}]}]}),
    ))
    .unwrap();
    // Egress of a: the VNet except its own node, and the pod range (selecting no pod).
    ns.apply(&policy(
        "a-to-cidr",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [
                   {"ipBlock": {"cidr": VNET_CIDR, "except": [format!("{node1}/32")]}},
                   {"ipBlock": {"cidr": CLUSTER_CIDR}}]}]}),
    ))
    .unwrap();
    wait_enforced(
        &c,
        "b-from-cidr, a-to-cidr",
        &[
            to_pod(&Src::Node("node-1"), b, 80, false),
            health(a, &node1, Want::Denied),
        ],
    );
    let since = now_rfc3339();
    check(
        &c,
        "14/15 ipBlock",
        &[
            // The world (the router, 10.224.0.1) is in the block.
            to_pod(&Src::Router, b, 80, true),
            to_pod(&Src::Router, a, 80, true),
            // Another node is judged by policy: excepted.
            to_pod(&Src::Node("node-1"), b, 80, false),
            // b's own node always passes (kubelet probes).
            to_pod(&Src::Node("node-2"), b, 80, true),
            // Pods are not matched by ipBlock, even inside the block: a's egress and b's
            // ingress both deny a -> b.
            to_pod(&pod(a), b, 80, false),
            // b's egress and a's ingress are not isolated.
            to_pod(&pod(b), a, 81, true),
            // a's egress to the nodes: node-2 in the block, its own node excepted.
            health(a, &node2, Want::Open),
            health(a, &node1, Want::Denied),
        ],
    );
    let b_in = id(&ns, "b-from-cidr", "ingress");
    let a_out = id(&ns, "a-to-cidr", "egress");
    let r = expect_allowed_by(
        &c,
        "node-2",
        &since,
        &["--from-ip", ROUTER_IP, "--to-pod", &pod_arg(b)],
        &b_in,
    );
    assert_eq!(r["traffic_class"], "world-to-pod", "{r}");
    let r = expect_drop(
        &c,
        "node-2",
        &since,
        &["--from-ip", &node1, "--to-pod", &pod_arg(b)],
        &[&b_in],
    );
    assert_eq!(r["source"]["ip"], node1.as_str(), "{r}");
    // node-2 reaches its own pods from cbr0's address.
    let gw2 = c.node("node-2").pod_gateway.clone();
    let r = expect_record(
        &c,
        "node-2",
        "node-2 -> b allowed as from-node",
        &since,
        &[
            "--from-ip",
            &gw2,
            "--to-pod",
            &pod_arg(b),
            "--verdict",
            "forwarded",
        ],
        |r| r["allowed_by"] == "from-node",
    );
    assert_eq!(r["traffic_class"], "node-to-pod", "{r}");
    // a -> b never leaves node-1: a's egress drops it.
    expect_drop(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(a), "--to-pod", &pod_arg(b)],
        &[&a_out],
    );
    expect_drop(
        &c,
        "node-1",
        &since,
        &[
            "--from-pod",
            &pod_arg(a),
            "--to-ip",
            &node1,
            "--port",
            "10256",
        ],
        &[&a_out],
    );
    expect_allowed_by(
        &c,
        "node-1",
        &since,
        &[
            "--from-pod",
            &pod_arg(a),
            "--to-ip",
            &node2,
            "--port",
            "10256",
        ],
        &a_out,
    );
    eprintln!("ipblock_and_nodes: {:.1?}", t0.elapsed());
}

/// Pod and namespace label changes through the API server while traffic runs: a client pod
/// gaining and losing the label a policy's peer selects, a namespace gaining the label of a
/// namespaceSelector, and the protected pod losing the label of the policy's podSelector.
#[test]
fn label_changes() {
    let Some(c) = cluster_or_skip() else { return };
    let t0 = Instant::now();
    let l = TestNs::new(&c, "poll", &[]).unwrap();
    let m = TestNs::new(&c, "polm", &[]).unwrap();
    let team = format!("team-{}", l.name);
    let ls = model_pods(&l, &[("srv", "srv", "node-1"), ("cli", "cli", "node-2")]).unwrap();
    let ms = model_pods(&m, &[("cli", "cli", "node-1")]).unwrap();
    let (srv, lcli, mcli) = (&ls[0], &ls[1], &ms[0]);
    check(
        &c,
        "no policy",
        &[
            to_pod(&pod(lcli), srv, 80, true),
            to_pod(&pod(mcli), srv, 80, true),
        ],
    );

    l.apply(&policy(
        "srv-from-friends",
        json!({"podSelector": {"matchLabels": {"pod": "srv"}},
               "ingress": [{"from": [
                   {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "friend"}}},
                   {"namespaceSelector": {"matchLabels": {team.as_str(): "friend"}}}]}]}),
    ))
    .unwrap();
    wait_enforced(
        &c,
        "srv-from-friends",
        &[to_pod(&pod(lcli), srv, 80, false)],
    );
    let pol = id(&l, "srv-from-friends", "ingress");
    check(
        &c,
        "nobody is a friend",
        &[
            to_pod(&pod(lcli), srv, 80, false),
            to_pod(&pod(mcli), srv, 80, false),
            to_pod(&pod(srv), lcli, 80, true),
        ],
    );

    // The client pod (across nodes) gains role=friend while it keeps connecting.
    let traffic = Traffic::start(&c, lcli, srv, 80);
    std::thread::sleep(Duration::from_millis(1500));
    let changed = Instant::now();
    let since = now_rfc3339();
    l.label("cli", "role=friend").unwrap();
    traffic.finish(changed, true);
    check(
        &c,
        "l/cli labelled friend",
        &[
            to_pod(&pod(lcli), srv, 80, true),
            to_pod(&pod(mcli), srv, 80, false),
        ],
    );
    expect_allowed_by(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(lcli), "--to-pod", &pod_arg(srv)],
        &pol,
    );

    // The other namespace (same node) gains the team label.
    let traffic = Traffic::start(&c, mcli, srv, 80);
    std::thread::sleep(Duration::from_millis(1500));
    let changed = Instant::now();
    label_namespace(&c, &m, &format!("{team}=friend"));
    traffic.finish(changed, true);

    // The client pod loses its label: denied again, and the drop names the policy.
    let traffic = Traffic::start(&c, lcli, srv, 80);
    std::thread::sleep(Duration::from_millis(1000));
    let changed = Instant::now();
    let since = now_rfc3339();
    l.label("cli", "role-").unwrap();
    traffic.finish(changed, false);
    check(
        &c,
        "l/cli no longer a friend",
        &[
            to_pod(&pod(lcli), srv, 80, false),
            to_pod(&pod(mcli), srv, 80, true),
        ],
    );
    expect_drop(
        &c,
        "node-1",
        &since,
        &["--from-pod", &pod_arg(lcli), "--to-pod", &pod_arg(srv)],
        &[&pol],
    );

    // The server leaves the policy's podSelector: no longer isolated, open to all.
    let traffic = Traffic::start(&c, lcli, srv, 80);
    std::thread::sleep(Duration::from_millis(1000));
    let changed = Instant::now();
    l.label("srv", "pod=other").unwrap();
    traffic.finish(changed, true);
    check(
        &c,
        "srv unselected",
        &[
            to_pod(&pod(lcli), srv, 80, true),
            to_pod(&pod(mcli), srv, 80, true),
        ],
    );
    eprintln!("label_changes: {:.1?}", t0.elapsed());
}
