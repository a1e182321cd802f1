//! `observer status`.

use anyhow::Result;
use observer::{api::Status, client};

use super::*;

pub(super) fn run(a: ClientArgs) -> Result<()> {
    let body = client::get_string(&a.server()?, "/v1/status")?;
    if a.output == Output::Json {
        println!("{}", body.trim());
        return Ok(());
    }
    let s: Status = serde_json::from_str(&body)?;
    println!("node:          {}", s.node);
    println!("started:       {}", s.started);
    println!("attach mode:   {}   pins: {}", s.attach_mode, s.pin_dir);
    println!("features:      {}", s.kernel_features);
    println!(
        "interfaces:    {}",
        s.interfaces
            .iter()
            .map(|(i, n)| format!("{n}({i})"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "conntrack:     {} entries ({} IPv6)   history: {} records",
        s.conntrack_entries, s.conntrack_entries_ipv6, s.history
    );
    println!(
        "cluster:       {} pods, {} local endpoints, last sync {}",
        s.pods,
        s.local_endpoints,
        s.last_sync.as_deref().unwrap_or("never")
    );
    println!(
        "kernel:        {}",
        s.kernel
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "policies:      {}",
        if s.policies.is_empty() {
            "none".to_string()
        } else {
            s.policies.join(" ")
        }
    );
    println!(
        "records shed:  {} (node-wide record budget)",
        s.records_rate_limited
    );
    if let Some(n) = &s.network {
        println!(
            "network:       {} model{}   vnet: {}   cluster: {}",
            n.model,
            n.detected
                .as_deref()
                .map(|d| format!(" (detected: {d})"))
                .unwrap_or_default(),
            if n.vnet_cidrs.is_empty() {
                "-".into()
            } else {
                n.vnet_cidrs.join(",")
            },
            if n.cluster_cidrs.is_empty() {
                "-".into()
            } else {
                n.cluster_cidrs.join(",")
            },
        );
        if n.snat {
            println!(
                "snat:          {}",
                s.snat
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        } else {
            println!("snat:          off (--no-snat, or the kernel conntrack is unavailable: see the log)");
        }
    }
    for u in &s.uplinks {
        println!(
            "uplink:        {}({}) tc, xdp {}, ingress policy in {}",
            u.name, u.ifindex, u.xdp, u.ingress_policy
        );
    }
    for c in &s.uplink_counters {
        println!(
            "  {:<10} {:<5} <-> {:<5} {:>10} packets {:>14} bytes",
            c.point, c.local, c.remote, c.packets, c.bytes
        );
    }
    if let Some(k) = &s.kube {
        let state = match (&k.stale_since, k.synced) {
            (Some(t), _) => format!(
                "STALE since {t} ({:.0}s): the last known state stays enforced",
                k.stale_seconds.unwrap_or(0.0)
            ),
            (None, true) => "in sync".to_string(),
            (None, false) => "initial list in progress".to_string(),
        };
        println!("api server:    {state}");
        // Cilium's policy_implementation_delay, for every watched kind.
        match &k.propagation {
            Some(p) => println!(
                "  policy propagation: {} syncs, p50 {}, p99 {} (API event to maps written){}",
                p.syncs,
                millis(p.p50_seconds, p),
                millis(p.p99_seconds, p),
                if p.above_max_bound > 0 {
                    format!(
                        ", {} slower than {} s",
                        p.above_max_bound, p.max_bound_seconds
                    )
                } else {
                    String::new()
                }
            ),
            None => println!("  policy propagation: no change synced yet"),
        }
        for r in &k.resources {
            println!(
                "  {:<16} {:<5} {:>6} objects  {} events  {} lists  {} errors{}",
                r.resource,
                if r.connected { "up" } else { "DOWN" },
                r.objects,
                r.events,
                r.lists,
                r.errors,
                r.last_error
                    .as_deref()
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    for e in &s.source_errors {
        println!("source error:  {e}");
    }
    Ok(())
}

/// A propagation quantile in milliseconds; one at the largest bucket bound means "at least".
fn millis(v: f64, p: &observer::api::Propagation) -> String {
    let ms = v * 1e3;
    let prec = if ms < 10.0 { 2 } else { 1 };
    let at_least = if p.above_max_bound > 0 && v >= p.max_bound_seconds {
        ">= "
    } else {
        ""
    };
    format!("{at_least}{ms:.prec$} ms")
}
