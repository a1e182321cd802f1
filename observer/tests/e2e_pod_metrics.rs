//! Per-pod bytes and packets on /metrics: exact for known traffic, forwarded traffic only,
//! bounded by --pod-metrics-max (the rest counted), and switched off by --no-pod-metrics.
use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use observer_tests::{in_netns, TestBed};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

fn sample(metrics: &str, name: &str, labels: &str) -> Option<u64> {
    let prefix = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

/// `rounds` UDP exchanges of 100-byte payloads from `src` to an echo server at `dst`.
fn udp_rounds(ns: &str, dst: SocketAddr, rounds: usize, expect_reply: bool) {
    in_netns(ns, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 256];
        for _ in 0..rounds {
            s.send_to(&[7u8; 100], dst).unwrap();
            assert_eq!(s.recv_from(&mut buf).is_ok(), expect_reply);
        }
    })
    .unwrap();
}

#[test]
fn per_pod_traffic_is_exact_bounded_and_switchable() {
    let mut bed = TestBed::overlay("pm").unwrap();
    bed.add_app_pods("x", &[("a", "client"), ("b", "server"), ("c", "locked")])
        .unwrap();
    // c accepts nothing.
    std::fs::write(
        bed.cluster_dir().join("deny-c.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-c, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: locked}}\n",
    )
    .unwrap();
    let (a, b, c) = (
        bed.pod("a").clone(),
        bed.pod("b").clone(),
        bed.pod("c").clone(),
    );
    for p in [&b, &c] {
        let echo = in_netns(&p.netns, || UdpSocket::bind(("0.0.0.0", 7000)).unwrap()).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
    }
    let args = ["--report-interval", "0", "--other-timeout", "1s"];
    let d = bed.start_daemon(OBSERVER.as_ref(), &args).unwrap();
    udp_rounds(&a.netns, SocketAddr::new(b.ip4, 7000), 10, true);
    udp_rounds(&a.netns, SocketAddr::new(c.ip4, 7000), 5, false);

    // The idle connections expire after 1 s; their close records carry the final counters.
    let t0 = Instant::now();
    let pkts = |m: &str, pod: &str, dir: &str| {
        sample(
            m,
            "observer_pod_packets_total",
            &format!("namespace=\"x\",pod=\"{pod}\",direction=\"{dir}\""),
        )
    };
    let metrics = loop {
        let m = d.get("/metrics").unwrap();
        if pkts(&m, "a", "ingress") == Some(10) && pkts(&m, "b", "egress") == Some(10) {
            break m;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // 10 datagrams each way, 20 + 8 + 100 bytes each; the 5 dropped ones count nowhere.
    for (pod, dir) in [
        ("a", "egress"),
        ("a", "ingress"),
        ("b", "ingress"),
        ("b", "egress"),
    ] {
        assert_eq!(
            pkts(&metrics, pod, dir),
            Some(10),
            "{pod} {dir}:\n{metrics}"
        );
        let bytes = sample(
            &metrics,
            "observer_pod_bytes_total",
            &format!("namespace=\"x\",pod=\"{pod}\",direction=\"{dir}\""),
        );
        assert_eq!(bytes, Some(1280), "{pod} {dir}");
    }
    assert_eq!(
        pkts(&metrics, "c", "ingress"),
        None,
        "denied traffic is not c's traffic"
    );
    assert!(metrics.contains("observer_pod_metrics_overflow_total 0"));
    bed.stop_daemon(&d);

    // At most one pod's series: the other end of the connection is counted as overflow.
    let mut capped = args.to_vec();
    capped.extend(["--pod-metrics-max", "1"]);
    let d = bed.start_daemon(OBSERVER.as_ref(), &capped).unwrap();
    udp_rounds(&a.netns, SocketAddr::new(b.ip4, 7000), 3, true);
    let t0 = Instant::now();
    let m = loop {
        let m = d.get("/metrics").unwrap();
        let overflow = m
            .lines()
            .find_map(|l| l.strip_prefix("observer_pod_metrics_overflow_total "))
            .map(|v| v.trim().parse::<u64>().unwrap());
        if overflow.is_some_and(|n| n >= 1) {
            break m;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let series = m
        .lines()
        .filter(|l| l.starts_with("observer_pod_packets_total{"))
        .count();
    assert_eq!(series, 2, "one pod, two directions:\n{m}");
    bed.stop_daemon(&d);

    let mut off = args.to_vec();
    off.push("--no-pod-metrics");
    let d = bed.start_daemon(OBSERVER.as_ref(), &off).unwrap();
    udp_rounds(&a.netns, SocketAddr::new(b.ip4, 7000), 3, true);
    std::thread::sleep(Duration::from_millis(2500));
    let m = d.get("/metrics").unwrap();
    assert!(!m.contains("observer_pod_"), "{m}");
    assert!(m.contains("observer_flow_records_total"), "{m}");
}
