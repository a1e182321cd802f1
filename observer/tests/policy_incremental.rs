//! Property: the incremental compile always equals a full compile of the same cluster. Random
//! clusters go through random sequences of single changes (a pod relabelled, added, deleted,
//! moved, re-addressed or put on the host network; a namespace relabelled or audited; a
//! policy added, replaced or deleted; a node's addresses or pod CIDR; a Service); after each,
//! the incremental state is compared with a fresh full compile, and its change log with the
//! difference between the two states it moved between.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use observer::{
    cluster::{self, Cluster},
    policy::{
        compile::{self, Allocator, Desired},
        incremental::{Changes, Hints, Incremental},
        Options,
    },
};
use observer_tests::policy_gen::{self as gen, Rng, World, NODE};
use serde_json::Value;

/// The cluster as the watch caches give it: pods and policies in (namespace, name) order.
fn cluster_of(w: &World) -> Cluster {
    let mut c = Cluster::default();
    for o in w.objects.values() {
        cluster::add_object(&mut c, "gen", o.clone());
    }
    c.pods
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    c.policies
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    c
}

/// The pods and policies whose objects differ, as the watch events name them.
fn hints_between(
    a: &BTreeMap<(String, String, String), Value>,
    b: &BTreeMap<(String, String, String), Value>,
) -> Hints {
    let changed = |kind: &str| -> BTreeSet<observer::cluster::Key> {
        a.keys()
            .chain(b.keys())
            .filter(|k| k.0 == kind && a.get(*k) != b.get(*k))
            .map(|k| (k.1.as_str().into(), k.2.as_str().into()))
            .collect()
    };
    Hints {
        pods: Some(changed("Pod")),
        policies: Some(changed("NetworkPolicy")),
    }
}

fn host(c: &Cluster) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = vec!["10.224.0.1".parse().unwrap()];
    for n in c.nodes.iter().filter(|n| n.name == NODE) {
        addrs.extend(n.addresses.iter().copied());
    }
    addrs
}

/// Applies a change log to the state it started from; fails if a recorded earlier value is
/// not what that state held.
fn replay(before: &Desired, changes: &Changes, after: &Desired) -> Result<Desired, String> {
    fn step<K: Ord + Copy + std::fmt::Debug, V: PartialEq + Copy + std::fmt::Debug>(
        map: &mut BTreeMap<K, V>,
        log: &BTreeMap<K, Option<V>>,
        want: &BTreeMap<K, V>,
        what: &str,
    ) -> Result<(), String> {
        for (k, old) in log {
            if map.get(k) != old.as_ref() {
                return Err(format!(
                    "{what} {k:?}: log says it held {old:?}, it held {:?}",
                    map.get(k)
                ));
            }
            match want.get(k) {
                Some(v) => map.insert(*k, *v),
                None => map.remove(k),
            };
        }
        Ok(())
    }
    let mut d = Desired {
        endpoints: before.endpoints.clone(),
        ipcache: before.ipcache.clone(),
        policy: before.policy.clone(),
        services: before.services.clone(),
    };
    step(
        &mut d.endpoints,
        &changes.endpoints,
        &after.endpoints,
        "endpoint",
    )?;
    step(&mut d.ipcache, &changes.ipcache, &after.ipcache, "ipcache")?;
    step(&mut d.policy, &changes.policy, &after.policy, "policy")?;
    step(
        &mut d.services,
        &changes.services,
        &after.services,
        "service",
    )?;
    Ok(d)
}

fn differences(a: &Desired, b: &Desired) -> String {
    fn diff<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
        what: &str,
        a: &BTreeMap<K, V>,
        b: &BTreeMap<K, V>,
    ) -> Vec<String> {
        let keys: BTreeSet<&K> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| a.get(k) != b.get(k))
            .take(5)
            .map(|k| {
                format!(
                    "{what} {k:?}: incremental {:?}, full {:?}",
                    a.get(k),
                    b.get(k)
                )
            })
            .collect()
    }
    [
        diff("endpoint", &a.endpoints, &b.endpoints),
        diff("ipcache", &a.ipcache, &b.ipcache),
        diff("policy", &a.policy, &b.policy),
        diff("service", &a.services, &b.services),
    ]
    .concat()
    .join("\n")
}

#[test]
fn incremental_compile_equals_full_compile_after_every_change() {
    let sequences: u64 = gen::env_or("OBSERVER_PROPERTY_SEQUENCES", 300);
    let steps = 40;
    let seed: u64 = gen::env_or("OBSERVER_PROPERTY_SEED", 0x1ac7_e5ed);
    let mut r = Rng(seed);
    let (mut checked, mut nonempty) = (0u64, 0u64);
    for s in 0..sequences {
        let opts = Options {
            ipblock_matches_pods: r.chance(30),
            audit_all: r.chance(10),
            deny_from_node: false,
        };
        let mut w = World::random(&mut r);
        let mut alloc = Allocator::default();
        let mut inc = Incremental::new(NODE, &opts);
        // Half the sequences name the changed pods and policies, as the watch caches do.
        let hinted = s % 2 == 1;
        let mut before = Desired::default();
        let mut history = vec!["initial cluster".to_string()];
        for step in 0..=steps {
            let before_objects = w.objects.clone();
            if step > 0 {
                history.push(w.change(&mut r));
            }
            let hints = if hinted && step > 0 {
                hints_between(&before_objects, &w.objects)
            } else {
                Hints::everything()
            };
            let c = cluster_of(&w);
            let addrs = host(&c);
            inc.update_with(&c, &hints, &addrs, &mut alloc);
            let changes = inc.take_changes();
            let full = compile::compile(&c, NODE, &addrs, &opts, &mut alloc.clone());
            let ctx = || {
                format!(
                    "sequence {s} step {step} (seed {seed:#x}, {opts:?}); changes so far:\n  {}",
                    history.join("\n  ")
                )
            };
            assert!(
                inc.desired() == &full,
                "{}\n{}",
                differences(inc.desired(), &full),
                ctx()
            );
            let replayed = replay(&before, &changes, &full)
                .unwrap_or_else(|e| panic!("change log: {e}\n{}", ctx()));
            assert!(
                replayed == full,
                "the change log misses entries:\n{}\n{}",
                differences(&replayed, &full),
                ctx()
            );
            checked += 1;
            nonempty += u64::from(!changes.is_empty());
            before = full;
        }
    }
    eprintln!("{checked} states compared, {nonempty} with map changes");
    assert!(
        nonempty > checked / 3,
        "too few changes reached the maps: {nonempty}/{checked}"
    );
}
