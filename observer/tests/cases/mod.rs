//! Loading and checking the upstream e2e network-policy cases (`tests/policy/cases`) against
//! an engine. Shared by the reference-engine and kernel-engine tests.
#![allow(dead_code)]
use std::{collections::BTreeMap, path::PathBuf};

use observer::{
    cluster::{self, Cluster},
    policy::{
        matrix::{self, Cell},
        Options, Protocol,
    },
};
use serde::Deserialize;

#[derive(Deserialize)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub options: CaseOptions,
    pub policies: Vec<serde_json::Value>,
    pub expect: Vec<Probe>,
}

#[derive(Deserialize, Default)]
pub struct CaseOptions {
    #[serde(default)]
    pub ipblock_matches_pods: bool,
}

#[derive(Deserialize)]
pub struct Probe {
    pub probe: String,
    pub rules: Vec<String>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/policy")
}

fn glob(pattern: &str, s: &str) -> bool {
    let (pn, pp) = pattern.split_once('/').expect("ns/pod pattern");
    let (sn, sp) = s.split_once('/').unwrap();
    (pn == "*" || pn == sn) && (pp == "*" || pp == sp)
}

/// Expected verdicts: everything allowed, then each rule in order.
pub fn expected(pods: &[String], rules: &[String]) -> BTreeMap<(String, String), bool> {
    let mut m = BTreeMap::new();
    for a in pods {
        for b in pods {
            if a != b {
                m.insert((a.clone(), b.clone()), true);
            }
        }
    }
    for r in rules {
        let parts: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(parts.len(), 3, "rule {r:?}: expected `allow|deny FROM TO`");
        let allow = match parts[0] {
            "allow" => true,
            "deny" => false,
            other => panic!("rule {r:?}: {other:?} is not allow or deny"),
        };
        for ((a, b), v) in m.iter_mut() {
            if glob(parts[1], a) && glob(parts[2], b) {
                *v = allow;
            }
        }
    }
    m
}

pub fn load_case(path: &std::path::Path) -> Case {
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub type EngineFn<'a> = &'a dyn Fn(&Cluster, &Options, &[(Protocol, u16)]) -> Vec<Cell>;

pub fn case_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("cases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 15, "cases missing");
    files
}

/// Runs one case through `engine`; returns every mismatch with the expected truth table.
pub fn run_case(path: &std::path::Path, engine: EngineFn<'_>) -> Vec<String> {
    let case = load_case(path);
    let mut c = cluster::load_dir(&[root().join("model.yaml")]).unwrap();
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    for (i, p) in case.policies.into_iter().enumerate() {
        cluster::add_object(&mut c, &format!("{} policy {i}", case.name), p);
    }
    assert!(c.errors.is_empty(), "{}: {:?}", case.name, c.errors);
    let opts = Options {
        ipblock_matches_pods: case.options.ipblock_matches_pods,
        audit_all: false,
        deny_from_node: false,
    };
    let pods: Vec<String> = matrix::pods_sorted(&c)
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    let mut failures = Vec::new();
    let probes: Vec<(Protocol, u16)> = case
        .expect
        .iter()
        .map(|p| matrix::parse_port(&p.probe).unwrap())
        .collect();
    // One engine run per case: the kernel engine loads the programs once for all probes.
    let all = engine(&c, &opts, &probes);
    for (probe, (proto, port)) in case.expect.iter().zip(&probes) {
        let cells: Vec<&Cell> = all
            .iter()
            .filter(|c| c.protocol == proto.as_str() && c.port == *port)
            .collect();
        assert_eq!(
            cells.len(),
            pods.len() * (pods.len() - 1),
            "{}: every pair probed",
            case.name
        );
        let want = expected(&pods, &probe.rules);
        for cell in &cells {
            let w = want[&(cell.from.clone(), cell.to.clone())];
            let got = cell.verdict == "allowed";
            if w != got {
                failures.push(format!(
                    "{} {}: {} -> {} expected {} got {} ({})",
                    case.name,
                    probe.probe,
                    cell.from,
                    cell.to,
                    if w { "allowed" } else { "denied" },
                    cell.verdict,
                    cell.reason
                ));
            }
        }
    }
    failures
}
