//! Uninstall exactly as docs/deploy.md tells users: delete the DaemonSet, `observer uninstall`
//! on every node through `kubectl debug node/...`, then `kubectl delete -k manifests/`. Nothing
//! of observer is left on either node: no pins, no attached programs, no XDP on the uplink.
//! Runs last (it takes observer off the cluster).
use std::time::Duration;

use observer_tests::cluster::*;

const IMAGE: &str = "ghcr.io/observer-dev/observer:0.1.0";

#[test]
fn uninstall_as_documented_leaves_nothing() {
    let Some(c) = cluster_or_skip() else { return };
    let nodes: Vec<Node> = c.nodes().to_vec();
    let links: Vec<Vec<u64>> = nodes.iter().map(|n| pinned_links(&c, n)).collect();
    for (n, l) in nodes.iter().zip(&links) {
        assert!(
            !l.is_empty(),
            "observer has pinned links on {} before the uninstall",
            n.name
        );
        // kind's uplink is a veth: tc ingress judges there, XDP stays off.
        let pins = c
            .node_out(n, &["ls", "/sys/fs/bpf/observer/links"])
            .unwrap();
        assert!(
            pins.contains("-uplink-ingress") && pins.contains("-uplink-egress"),
            "{}'s uplink has observer's tc links: {pins}",
            n.name
        );
        let eth0 = c
            .node_out(n, &["ip", "-d", "link", "show", "eth0"])
            .unwrap();
        assert!(
            !eth0.contains("xdp") && !pins.contains("xdp"),
            "{}'s veth uplink has no XDP: {eth0}",
            n.name
        );
        let status = observer_tests::cluster::observer_status(&c, &n.name).unwrap();
        assert!(
            status.contains("xdp off, ingress policy in tc"),
            "{}: {status}",
            n.name
        );
    }

    c.kubectl_out(&["-n", "observer", "delete", "ds", "observer"])
        .unwrap();
    c.kubectl_out(&[
        "-n",
        "observer",
        "wait",
        "--for=delete",
        "pod",
        "-l",
        "app.kubernetes.io/name=observer",
        "--timeout=60s",
    ])
    .unwrap();
    // Deleting the pods leaves enforcement in place on purpose (docs/deploy.md).
    for (n, l) in nodes.iter().zip(&links) {
        assert_eq!(
            &pinned_links(&c, n),
            l,
            "{}: the links outlive the pods",
            n.name
        );
    }

    for n in &nodes {
        let out = c
            .kubectl_out(&[
                "debug",
                &format!("node/{}", n.name),
                "--profile=sysadmin",
                &format!("--image={IMAGE}"),
                "--",
                "observer",
                "uninstall",
                "--pin-dir",
                "/host/sys/fs/bpf/observer",
                "--state-dir",
                "/host/run/observer/state",
            ])
            .unwrap();
        let pod = out
            .split_whitespace()
            .find(|w| w.starts_with("node-debugger-"))
            .unwrap_or_else(|| panic!("no debug pod named in {out:?}"))
            .to_string();
        c.wait(
            &[
                "--for=jsonpath={.status.phase}=Succeeded",
                &format!("pod/{pod}"),
            ],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| {
            let logs = c.kubectl_out(&["logs", &pod]).unwrap_or_default();
            panic!("observer uninstall on {}: {e:#}\n{logs}", n.name)
        });
        let logs = c.kubectl_out(&["logs", &pod]).unwrap();
        eprintln!("{}: {logs}", n.name);
        c.kubectl_out(&["delete", "pod", &pod, "--wait=false"])
            .unwrap();
    }
    let manifests = format!("{}/../manifests", env!("CARGO_MANIFEST_DIR"));
    c.kubectl_out(&["delete", "-k", &manifests, "--ignore-not-found"])
        .unwrap();

    for (n, l) in nodes.iter().zip(&links) {
        let pins = c
            .node_out(n, &["sh", "-c", "ls -A /sys/fs/bpf/observer 2>&1; true"])
            .unwrap();
        assert!(
            pins.contains("No such file"),
            "{}: pins left: {pins}",
            n.name
        );
        for id in l {
            assert!(
                c.node_out(n, &["bpftool", "link", "show", "id", &id.to_string()])
                    .is_err(),
                "{}: link {id} still exists",
                n.name
            );
        }
        let eth0 = c
            .node_out(n, &["ip", "-d", "link", "show", "eth0"])
            .unwrap();
        assert!(
            !eth0.contains("xdp"),
            "{}: XDP left on the uplink: {eth0}",
            n.name
        );
        let net = c.node_out(n, &["bpftool", "net", "show"]).unwrap();
        assert!(
            !net.contains("observer"),
            "{}: programs left: {net}",
            n.name
        );
    }
    eventually(
        "the observer namespace to go",
        Duration::from_secs(60),
        || Ok(c.kubectl_out(&["get", "namespace", "observer"]).is_err()),
    );
}
