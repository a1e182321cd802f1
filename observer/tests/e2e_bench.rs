//! `observer bench datapath`, as BENCHMARKS.md runs it, in few and short rounds: every case is
//! measured in the real kernel and reported once as a JSON line, `--only` keeps to its
//! programs, and the bench's maps leave bpffs with it, those of a run killed midway with the
//! next run. The figures themselves are not checked: timings belong to the benchmark, not to
//! a test. One test: the runs share the scratch directories' names and clean-up.
use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// The run's JSON lines; it must leave none of its pin directories behind.
fn bench(only: &str) -> Vec<Value> {
    observer_tests::ensure_root().unwrap();
    let child = Command::new(OBSERVER)
        .args([
            "bench", "datapath", "--json", "--rounds", "1", "--repeat", "2000",
        ])
        .args(["--only", only])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench datapath --only {only}: {stderr}"
    );
    let left = pins_of(pid);
    assert!(
        left.is_empty(),
        "bench datapath --only {only} left {left:?} in bpffs"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The scratch pin directories of process `pid` (`bpf::ScratchPins`: named for their process).
fn pins_of(pid: u32) -> Vec<String> {
    let prefix = format!("observer-bench-{pid}-");
    std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// A run killed (`kill -9`, no clean-up of its own) once its maps are pinned: its pid.
fn interrupted_run() -> u32 {
    observer_tests::ensure_root().unwrap();
    let child = Command::new(OBSERVER)
        .args(["bench", "datapath", "--only", "from-pod", "--rounds", "50"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run = Killed(child);
    let pid = run.0.id();
    observer_tests::cluster::eventually("the bench's pins", Duration::from_secs(60), || {
        Ok(!pins_of(pid).is_empty())
    });
    drop(run);
    pid
}

/// Kills and reaps its process when dropped, a failed wait included.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cases(ms: &[Value]) -> Vec<String> {
    ms.iter()
        .map(|m| m["case"].as_str().unwrap().to_string())
        .collect()
}

fn assert_measured(ms: &[Value]) {
    for m in ms {
        for field in ["ns_per_packet", "baseline_ns_per_packet"] {
            let v = m[field].as_f64().unwrap_or(0.0);
            assert!(v > 0.0, "{}: {field} is {v}", m["case"]);
        }
        assert!(m["ns_above_baseline"].is_number(), "{m}");
    }
}

#[test]
fn every_case_is_reported_once_and_no_pins_are_left() {
    let killed = interrupted_run();
    assert!(
        !pins_of(killed).is_empty(),
        "a killed run's maps stay pinned until the next run"
    );
    pod_programs_report_every_case_once();
    assert_eq!(
        pins_of(killed),
        Vec::<String>::new(),
        "the next run removes a killed one's"
    );
    uplink_programs_report_only_theirs();
}

fn pod_programs_report_every_case_once() {
    let ms = bench("from-pod");
    let got = cases(&ms);
    let mut want = Vec::new();
    for proto in ["tcp", "udp"] {
        for case in [
            "conntrack_hit",
            "new_connection",
            "new_connection_table_full",
            "new_connection_steady",
        ] {
            want.push(format!("from_pod/{proto}/{case}"));
        }
    }
    want.extend(
        [
            "from_pod/tcp/syn_ack_reply",
            "from_pod/tcp/reopened_connection",
            "to_pod/tcp/local_established_handed_over",
            "to_pod/tcp/local_established_looked_up",
        ]
        .map(String::from),
    );
    assert_eq!(got, want);
    assert_measured(&ms);
}

fn uplink_programs_report_only_theirs() {
    let ms = bench("uplink");
    let got = cases(&ms);
    assert!(!got.is_empty());
    for case in &got {
        assert!(
            case.starts_with("uplink_xdp/") || case.starts_with("uplink_tc/"),
            "{case} under --only uplink"
        );
    }
    for case in [
        "uplink_xdp/tcp/to_pod_established",
        "uplink_xdp/tcp/to_node",
    ] {
        assert!(got.iter().any(|c| c == case), "{case} missing from {got:?}");
    }
    let unique: BTreeSet<_> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "a case twice: {got:?}");
    assert_measured(&ms);
}
