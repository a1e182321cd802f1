//! `observer flows` against a running daemon: filters, outputs, the policy behind each verdict,
//! the metrics endpoint, and the error when no daemon is there.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use observer_tests::{in_netns, spawn_in_netns, PodSpec, TestBed};
use serde_json::Value;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

fn cli(socket: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(OBSERVER)
        .arg("flows")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn flows_filters_outputs_and_metrics() {
    let mut bed = TestBed::overlay("cli").unwrap();
    bed.add_pod(PodSpec {
        namespace: "x",
        name: "a",
        labels: &[("app", "client")],
        ports: &[],
    })
    .unwrap();
    bed.add_pod(PodSpec {
        namespace: "y",
        name: "b",
        labels: &[("app", "server")],
        ports: &[("http", 80, "TCP")],
    })
    .unwrap();
    std::fs::write(
        bed.cluster_dir().join("policy.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-http, namespace: y}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{ports: [{port: 80}]}]\n",
    )
    .unwrap();
    // 20 more policies isolate b (each admits only a port nobody uses): a drop record names 16
    // of the 21 and counts the rest.
    let more: String = (0..20)
        .map(|i| format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: z-iso-{i:02}, namespace: y}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress: [{{ports: [{{port: 9999}}]}}]\n"))
        .collect();
    std::fs::write(bed.cluster_dir().join("more.yaml"), more).unwrap();
    let flow_log = bed.dir.join("log").join("flows.jsonl");
    let flow_log_arg = flow_log.display().to_string();
    let daemon = bed
        .start_daemon(
            OBSERVER.as_ref(),
            &[
                "--report-interval",
                "0",
                "--flow-log",
                &flow_log_arg,
                "--flow-log-include",
                "verdict=dropped",
            ],
        )
        .unwrap();
    let (a, b) = (bed.pod("a").clone(), bed.pod("b").clone());
    for port in [80u16, 81] {
        let l = in_netns(&b.netns, move || TcpListener::bind(("::", port)).unwrap()).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                drop(s)
            }
        });
    }
    let ok = spawn_in_netns(&a.netns, move || {
        TcpStream::connect_timeout(&SocketAddr::new(b.ip4, 80), Duration::from_secs(2)).is_ok()
    });
    assert!(ok.join().unwrap().unwrap(), "port 80 is allowed");
    let denied = spawn_in_netns(&a.netns, move || {
        TcpStream::connect_timeout(&SocketAddr::new(b.ip4, 81), Duration::from_millis(500)).is_ok()
    });
    assert!(!denied.join().unwrap().unwrap(), "port 81 is denied");
    std::thread::sleep(Duration::from_millis(1800));

    let sock = daemon.socket.clone();
    let (ok, out, err) = cli(&sock, &["-o", "json", "--verdict", "dropped"]);
    assert!(ok, "{err}");
    let dropped = json_lines(&out);
    assert!(!dropped.is_empty(), "no dropped records");
    for r in &dropped {
        assert_eq!(r["verdict"], "dropped");
        assert_eq!(r["destination"]["port"], 81);
        assert_eq!(r["drop_reason"], "policy-denied");
        assert_eq!(r["isolated_by"][0]["name"], "b-http", "{r}");
        let names = r["isolated_by"].as_array().unwrap();
        assert_eq!(names.len(), 16, "{r}");
        assert_eq!(names[15]["name"], "z-iso-14", "{r}");
        assert_eq!(r["isolated_by_more"], 5, "{r}");
    }

    let (_, out, _) = cli(
        &sock,
        &[
            "-o",
            "json",
            "--from-pod",
            "x/a",
            "--to-pod",
            "y/b",
            "--port",
            "80",
            "--type",
            "close",
        ],
    );
    let closes = json_lines(&out);
    assert_eq!(closes.len(), 1, "{out}");
    assert_eq!(closes[0]["policy"][0]["name"], "b-http");
    assert_eq!(closes[0]["policy"][0]["direction"], "ingress");
    assert!(closes[0]["counters"]["packets_in"].as_u64().unwrap() > 0);

    // --not binds to the next filter only.
    let (_, out, _) = cli(
        &sock,
        &[
            "-o",
            "json",
            "--to-pod",
            "y/b",
            "--not",
            "--verdict",
            "dropped",
        ],
    );
    let rest = json_lines(&out);
    assert!(
        !rest.is_empty()
            && rest
                .iter()
                .all(|r| r["verdict"] == "forwarded" && r["destination"]["port"] == 80),
        "{out}"
    );

    let (_, out, _) = cli(&sock, &["-o", "json", "--namespace", "nowhere"]);
    assert!(out.trim().is_empty(), "{out}");
    let (_, out, _) = cli(&sock, &["-o", "json", "--last", "1"]);
    assert_eq!(json_lines(&out).len(), 1);
    let (_, out, _) = cli(&sock, &["-o", "table", "--to-pod", "y/b"]);
    assert!(
        out.starts_with("TIME") && out.contains("y/b:81") && out.contains("dropped"),
        "{out}"
    );
    let (_, out, _) = cli(&sock, &["--since", "1h", "--from-ip", &a.ip4.to_string()]);
    assert!(
        out.contains("x/a") && out.contains("DROPPED by y/b-http,") && out.contains(",+5 more"),
        "{out}"
    );
    let (ok, _, err) = cli(&sock, &["--verdict", "maybe"]);
    assert!(!ok && err.contains("--verdict"), "{err}");

    // The flow log holds exactly the dropped records the API reports.
    let logged = json_lines(&std::fs::read_to_string(&flow_log).unwrap());
    assert_eq!(logged.len(), dropped.len(), "flow log: {logged:?}");
    assert!(logged.iter().all(|r| r["verdict"] == "dropped"));

    let metrics = daemon.get("/metrics").unwrap();
    let denied_line = metrics
        .lines()
        .find(|l| l.starts_with("observer_datapath_total{kind=\"policy_denied\"}"))
        .expect("policy_denied metric");
    assert!(
        denied_line
            .split_whitespace()
            .last()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1,
        "{denied_line}"
    );
    assert!(
        metrics.contains("observer_flow_records_total{event=\"drop\""),
        "{metrics}"
    );

    // No daemon: a clear error, non-zero exit.
    let (ok, _, err) = cli(&bed.dir.join("absent.sock"), &[]);
    assert!(!ok && err.contains("is the daemon running"), "{err}");
}
