//! observer deployed from `manifests/` as users deploy it (`kubectl apply -k`, by `cargo xtask
//! cluster up`): Ready on both nodes within its probes, each node with its own bpffs and pins,
//! the ClusterRole exactly sufficient.
use std::collections::BTreeSet;

use observer_tests::cluster::*;

fn jsonpath(c: &Layout, args: &[&str], path: &str) -> String {
    let p = format!("jsonpath={path}");
    let mut a = args.to_vec();
    a.extend(["-o", &p]);
    c.kubectl_out(&a).unwrap()
}

#[test]
fn daemonset_ready_on_every_node_with_its_own_pins() {
    let Some(c) = cluster_or_skip() else { return };
    let ds = ["-n", "observer", "get", "ds", "observer"];
    let status = jsonpath(
        &c,
        &ds,
        "{.status.desiredNumberScheduled} {.status.numberReady} {.status.updatedNumberScheduled}",
    );
    assert_eq!(status, "2 2 2", "desired, ready, updated");
    let restarts = jsonpath(
        &c,
        &["-n", "observer", "get", "pods"],
        "{.items[*].status.containerStatuses[0].restartCount}",
    );
    assert_eq!(
        restarts, "0 0",
        "no observer pod restarted (probes passed first time)"
    );

    let mut all_links = BTreeSet::new();
    for n in c.nodes() {
        let st = observer_status(&c, &n.name).unwrap();
        assert!(st.contains(&format!("node:          {}", n.name)), "{st}");
        assert!(st.contains("api server:    in sync"), "{st}");
        assert!(
            st.contains("uplink:        eth0"),
            "the uplink programs are on: {st}"
        );
        // The pins are in the node's own bpffs: the links pinned there exist only once.
        let ids = pinned_links(&c, n);
        assert!(!ids.is_empty(), "{} has pinned links", n.name);
        for id in ids {
            assert!(all_links.insert(id), "link {id} pinned on two nodes' bpffs");
        }
    }
}

#[test]
fn clusterrole_is_exactly_sufficient() {
    let Some(c) = cluster_or_skip() else { return };
    let sa = "--as=system:serviceaccount:observer:observer";
    let list = c.kubectl_out(&["auth", "can-i", "--list", sa]).unwrap();
    let granted: BTreeSet<String> = list
        .lines()
        .skip(1)
        .filter(|l| !l.trim_start().starts_with('['))
        .filter(|l| !l.contains("selfsubject"))
        .map(|l| {
            let mut f = l.split_whitespace();
            let res = f.next().unwrap_or_default().to_string();
            let verbs = l[l.rfind('[').unwrap()..].to_string();
            format!("{res} {verbs}")
        })
        .collect();
    let want: BTreeSet<String> = [
        "namespaces",
        "nodes",
        "pods",
        "services",
        "endpointslices.discovery.k8s.io",
        "networkpolicies.networking.k8s.io",
    ]
    .iter()
    .map(|r| format!("{r} [get list watch]"))
    .collect();
    assert_eq!(
        granted, want,
        "what observer's service account may do:\n{list}"
    );
    for (verb, res) in [
        ("get", "secrets"),
        ("create", "pods"),
        ("update", "networkpolicies"),
        ("get", "configmaps"),
    ] {
        let out = c.kubectl_out(&["auth", "can-i", verb, res, sa]);
        assert!(
            out.is_err() || out.unwrap().trim() == "no",
            "{verb} {res} must be denied"
        );
    }
    // Sufficient: every watch is up, nothing was refused.
    for n in c.nodes() {
        let pod = observer_pod(&c, &n.name).unwrap();
        let logs = c.kubectl_out(&["-n", "observer", "logs", &pod]).unwrap();
        assert!(
            !logs.to_lowercase().contains("forbidden"),
            "{}: {logs}",
            n.name
        );
        let st = observer_status(&c, &n.name).unwrap();
        for kind in [
            "pods",
            "namespaces",
            "nodes",
            "networkpolicies",
            "services",
            "endpointslices",
        ] {
            let line = st
                .lines()
                .find(|l| l.trim_start().starts_with(kind))
                .unwrap_or_else(|| panic!("no {kind} watcher in status:\n{st}"));
            assert!(
                line.contains(" up ") && line.contains(" 0 errors"),
                "{}: {line}",
                n.name
            );
        }
    }
}
