//! The restart guarantee on a real kubelet: `kubectl rollout restart ds/observer` while traffic
//! runs lets no denied connection through and keeps allowed established connections alive.
//! Runs alone (it restarts the DaemonSet every other cluster test relies on).
use std::time::Duration;

use observer_tests::cluster::*;

const POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
"#;

fn count_lines(c: &Layout, pod: &PodRef, file: &str) -> usize {
    c.exec(
        &pod.namespace,
        &pod.name,
        &["sh", "-c", &format!("cat {file} 2>/dev/null | wc -l")],
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// Starts `script` in the pod, detached from `kubectl exec` (which otherwise waits for every
/// process holding its output, and ends its session: a new session survives).
fn background(c: &Layout, pod: &PodRef, script: &str) {
    let detached = format!("setsid sh -c '{script}' </dev/null >/dev/null 2>&1 &");
    c.exec(&pod.namespace, &pod.name, &["sh", "-c", &detached])
        .unwrap();
}

#[test]
fn rollout_restart_under_traffic() {
    let Some(c) = cluster_or_skip() else { return };
    // The tests before this one delete their namespaces as they end. While their pods were
    // still being torn down, this test's cross-node connection stalled (the client's segments
    // went unacknowledged, with no drop in observer's counters or records), with or without
    // the restart (5 of 6 runs without it): start once they are gone.
    eventually(
        "the namespaces of earlier tests to be gone",
        Duration::from_secs(180),
        || {
            let phases =
                c.kubectl_out(&["get", "ns", "-o", "jsonpath={.items[*].status.phase}"])?;
            Ok(!phases.contains("Terminating"))
        },
    );
    let ns = TestNs::new(&c, "restart", &[]).unwrap();
    // An echo server across the VNet from both clients, and a web server.
    let echo = ns
        .pod("web", &[("app", "web")], "node-2", "mkdir -p /www && echo web > /www/index.html && httpd -p 8080 -h /www && exec nc -ll -p 9000 -e cat")
        .unwrap();
    ns.apply(POLICY).unwrap();
    let client = ns.client("client", &[("app", "client")], "node-1").unwrap();
    let intruder = ns
        .client("intruder", &[("app", "intruder")], "node-1")
        .unwrap();
    let url = format!("http://{}:8080/", echo.ip);
    eventually(
        "the policy to deny the intruder",
        Duration::from_secs(20),
        || Ok(http_get(&c, &intruder, &url, 2).is_none()),
    );
    assert_eq!(
        http_get(&c, &client, &url, 3).as_deref(),
        Some("web"),
        "allowed before the restart"
    );

    // One long-lived allowed connection, echoing a line every 200 ms into /tmp/echo.
    background(
        &c,
        &client,
        &format!(
            "while :; do echo ping; sleep 0.2; done | nc {} 9000 > /tmp/echo",
            echo.ip
        ),
    );
    // The intruder tries a new connection every 300 ms; any answer is a leak.
    background(
        &c,
        &intruder,
        &format!("while :; do timeout 1 wget -q -O - {url} >> /tmp/leaks; sleep 0.3; done"),
    );
    eventually(
        "the echo connection to carry lines",
        Duration::from_secs(10),
        || Ok(count_lines(&c, &client, "/tmp/echo") > 3),
    );

    let before: Vec<String> = ["node-1", "node-2"]
        .iter()
        .map(|n| observer_pod(&c, n).unwrap())
        .collect();
    c.kubectl_out(&["-n", "observer", "rollout", "restart", "ds/observer"])
        .unwrap();
    c.kubectl_out(&[
        "-n",
        "observer",
        "rollout",
        "status",
        "ds/observer",
        "--timeout=180s",
    ])
    .expect("the restarted DaemonSet becomes Ready on both nodes");
    let after: Vec<String> = ["node-1", "node-2"]
        .iter()
        .map(|n| observer_pod(&c, n).unwrap())
        .collect();
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b, a, "every node's observer pod was replaced");
    }

    // The established connection lived through both restarts and still carries lines.
    let n1 = count_lines(&c, &client, "/tmp/echo");
    std::thread::sleep(Duration::from_secs(2));
    let n2 = count_lines(&c, &client, "/tmp/echo");
    assert!(
        n2 > n1 + 3,
        "the echo connection stalled after the restart: {n1} -> {n2} lines"
    );
    let alive = c
        .exec(&client.namespace, &client.name, &["sh", "-c", "pidof nc"])
        .unwrap_or_default();
    assert!(
        !alive.trim().is_empty(),
        "the client's nc (its one connection) was closed"
    );

    // Not one of the intruder's attempts got an answer during the rollout, and it is still
    // denied by the new daemons; the client still gets new connections.
    let leaks = c
        .exec(
            &intruder.namespace,
            &intruder.name,
            &["sh", "-c", "cat /tmp/leaks 2>/dev/null; true"],
        )
        .unwrap();
    assert!(
        leaks.trim().is_empty(),
        "denied connections got through during the restart: {leaks:?}"
    );
    assert_eq!(
        http_get(&c, &intruder, &url, 2),
        None,
        "denied after the restart"
    );
    assert_eq!(
        http_get(&c, &client, &url, 3).as_deref(),
        Some("web"),
        "allowed after the restart"
    );

    // The new daemon on the server's node knows the policy that dropped the intruder.
    eventually(
        "a drop record naming the policy from the new daemon",
        Duration::from_secs(10),
        || {
            let recs = observer_flows(&c, "node-2", &["--namespace", &ns.name])?;
            Ok(recs.iter().any(|r| {
                r["verdict"] == "dropped"
                    && r["source"]["pod"] == "intruder"
                    && r["isolated_by"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|p| p["name"] == "web-from-client"))
            }))
        },
    );
}
