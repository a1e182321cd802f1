//! `observer flows`, `flow-tail` and `conntrack`: records from the daemon's API, filtered and
//! rendered.
use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context as _, Result};
use observer::{client, flows::FlowRecord};

use super::*;

#[derive(clap::Args)]
pub(super) struct FlowsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Show only the last N records (after filtering).
    #[arg(long)]
    last: Option<usize>,
    /// Keep printing new records as they arrive.
    #[arg(short, long)]
    follow: bool,
    /// Only records at or after this time: RFC 3339, or a duration ago (`5m`, `1h`).
    #[arg(long)]
    since: Option<String>,
    /// Only records before this time: RFC 3339, or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// Declared for parsing and `--help`; the filters are read back from the command line in
    /// order (see `ordered_filter_args`), since `--not` depends on position.
    #[command(flatten)]
    filters: FilterArgs,
}

/// Filters: repeated flags of one kind are alternatives (OR); different kinds must all hold
/// (AND); `--not` negates the filter that follows it.
#[derive(clap::Args, Default)]
#[command(next_help_heading = "Filters")]
pub(super) struct FilterArgs {
    /// Negate the next filter.
    #[arg(long, action = clap::ArgAction::Count)]
    not: u8,
    /// Either side in this namespace.
    #[arg(long)]
    namespace: Vec<String>,
    /// Either side is this pod: `[namespace/]pod`.
    #[arg(long)]
    pod: Vec<String>,
    /// The source (the side that opened the connection) is this pod.
    #[arg(long)]
    from_pod: Vec<String>,
    /// The destination is this pod.
    #[arg(long)]
    to_pod: Vec<String>,
    #[arg(long)]
    from_namespace: Vec<String>,
    #[arg(long)]
    to_namespace: Vec<String>,
    /// Either side's pod has this label: `key=value` or `key`.
    #[arg(long)]
    label: Vec<String>,
    /// Either side's address is in this CIDR (or is this IP).
    #[arg(long)]
    ip: Vec<String>,
    #[arg(long)]
    from_ip: Vec<String>,
    #[arg(long)]
    to_ip: Vec<String>,
    /// Either side's port.
    #[arg(long)]
    port: Vec<String>,
    /// TCP, UDP, SCTP, ICMP or ICMPv6.
    #[arg(long)]
    protocol: Vec<String>,
    /// forwarded, dropped or audit.
    #[arg(long)]
    verdict: Vec<String>,
    /// e.g. policy-denied.
    #[arg(long)]
    drop_reason: Vec<String>,
    /// A policy (`namespace/name`) that allowed or isolated the flow.
    #[arg(long)]
    policy: Vec<String>,
    /// Event type: new, report, close or drop.
    #[arg(long = "type")]
    event_type: Vec<String>,
    /// pod-to-pod-local, pod-to-pod-remote, pod-to-world, world-to-pod, node-to-pod, pod-to-node.
    #[arg(long)]
    traffic_class: Vec<String>,
    /// Local pods' connections with their SNAT: alone, every record that carries an `snat`
    /// object; with a value, `translated` (the wire carried another source) or an
    /// expectation: expected, none, unexpected, missing.
    #[arg(long, num_args = 0..=1, default_missing_value = "any", value_name = "WHICH")]
    snat: Vec<String>,
    /// Connections opened to a Service (`namespace/name` or `name`), whichever backend they
    /// reached.
    #[arg(long, alias = "to-service")]
    service: Vec<String>,
}

const FILTER_FLAGS: [&str; 21] = [
    "not",
    "namespace",
    "pod",
    "from-pod",
    "to-pod",
    "from-namespace",
    "to-namespace",
    "label",
    "ip",
    "from-ip",
    "to-ip",
    "port",
    "protocol",
    "verdict",
    "drop-reason",
    "policy",
    "type",
    "traffic-class",
    "snat",
    "service",
    "to-service",
];

/// Filter flags in the order given, so `--not` binds to the flag after it.
fn ordered_filter_args(argv: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        if let Some(flag) = argv[i].strip_prefix("--") {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            if FILTER_FLAGS.contains(&name) {
                let name = if name == "to-service" {
                    "service"
                } else {
                    name
                };
                if name == "not" {
                    out.push(("not".into(), String::new()));
                } else if name == "snat" && inline.is_none() {
                    // `observer flows` takes no positional arguments: whatever follows that is
                    // not a flag is the value (a misspelled one is rejected, not ignored).
                    match argv.get(i + 1) {
                        Some(v) if !v.starts_with('-') => {
                            out.push((name.into(), v.clone()));
                            i += 1;
                        }
                        _ => out.push((name.into(), "any".into())),
                    }
                } else if let Some(v) = inline {
                    out.push((name.into(), v));
                } else if let Some(v) = argv.get(i + 1) {
                    out.push((name.into(), v.clone()));
                    i += 1;
                }
            }
        }
        i += 1;
    }
    out
}

fn parse_when(s: &str) -> Result<std::time::SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let d = humantime::parse_duration(s)
        .with_context(|| format!("{s:?}: expected RFC 3339 time or a duration like 5m"))?;
    Ok(std::time::SystemTime::now() - d)
}

fn print_records(r: impl BufRead, output: Output) -> Result<()> {
    let stdout = std::io::stdout();
    let color = stdout.is_terminal();
    let mut out = stdout.lock();
    if output == Output::Table {
        writeln!(
            out,
            "{:<12} {:<6} {:<42} {:<42} {:<7} {:<10} {:>16} {:>16} {}",
            "TIME",
            "EVENT",
            "SOURCE",
            "DESTINATION",
            "PROTO",
            "VERDICT",
            "OUT pkts/bytes",
            "IN pkts/bytes",
            "SNAT"
        )?;
    }
    for line in r.lines() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        let res = match output {
            Output::Json => writeln!(out, "{line}"),
            Output::Table => match serde_json::from_str::<FlowRecord>(&line) {
                Ok(rec) => {
                    let side = |p: &observer::flows::Peer| match (&p.namespace, &p.pod) {
                        (Some(ns), Some(pod)) => format!("{ns}/{pod}:{}", p.port),
                        _ => format!(
                            "{}:{}",
                            p.ip.map(|i| i.to_string()).unwrap_or_default(),
                            p.port
                        ),
                    };
                    let c = &rec.counters;
                    let snat = match &rec.snat {
                        Some(n) => format!(
                            "{} {}",
                            std::net::SocketAddr::new(n.translated_src_ip, n.translated_src_port),
                            n.expectation.as_str()
                        ),
                        None => "-".into(),
                    };
                    writeln!(
                        out,
                        "{:<12} {:<6} {:<42} {:<42} {:<7} {:<10} {:>16} {:>16} {}",
                        rec.time.get(11..23).unwrap_or(&rec.time),
                        rec.event,
                        side(&rec.source),
                        side(&rec.destination),
                        rec.l4.protocol,
                        rec.verdict,
                        format!("{}/{}", c.packets_out, c.bytes_out),
                        format!("{}/{}", c.packets_in, c.bytes_in),
                        snat
                    )
                }
                Err(_) => writeln!(out, "{line}"),
            },
            Output::Compact => match serde_json::from_str::<FlowRecord>(&line) {
                Ok(rec) => {
                    let l = rec.compact();
                    if color {
                        let c = match rec.event.as_str() {
                            "new" => "32",
                            "close" => "90",
                            _ => "0",
                        };
                        writeln!(out, "\x1b[{c}m{l}\x1b[0m")
                    } else {
                        writeln!(out, "{l}")
                    }
                }
                Err(_) => writeln!(out, "{line}"),
            },
        };
        if res.is_err() {
            break; // closed pipe
        }
        if output == Output::Json || color {
            let _ = out.flush();
        }
    }
    Ok(())
}

pub(super) fn run(a: FlowsArgs) -> Result<()> {
    let follow = a.follow || std::env::args().nth(1).as_deref() == Some("flow-tail");
    let argv: Vec<String> = std::env::args().collect();
    let filters = observer::filter::from_args(&ordered_filter_args(&argv))?;
    let since = a.since.as_deref().map(parse_when).transpose()?;
    let until = a.until.as_deref().map(parse_when).transpose()?;
    let mut q = String::from("/v1/flows?");
    // With a time window the last N are counted inside it, on this side.
    if let (Some(n), None, None) = (a.last, since, until) {
        q.push_str(&format!("last={n}&"));
    }
    if follow {
        q.push_str("follow=true&");
    }
    if !filters.is_empty() {
        q.push_str(&format!(
            "filter={}",
            observer::filter::encode(&serde_json::to_string(&filters)?)
        ));
    }
    let r = client::get(&a.client.server()?, &q)?;
    if since.is_none() && until.is_none() {
        return print_records(r, a.client.output);
    }
    let keep = |rec: &FlowRecord| {
        let t = humantime::parse_rfc3339_weak(&rec.time).ok();
        t.is_some_and(|t| since.is_none_or(|s| t >= s) && until.is_none_or(|u| t < u))
    };
    let mut lines: Vec<String> = Vec::new();
    for line in r.lines() {
        let line = line?;
        if serde_json::from_str::<FlowRecord>(&line).is_ok_and(|rec| keep(&rec)) {
            lines.push(line);
        }
    }
    if let Some(n) = a.last {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    print_records(std::io::Cursor::new(lines.join("\n")), a.client.output)
}

pub(super) fn conntrack(a: ClientArgs) -> Result<()> {
    let r = client::get(&a.server()?, "/v1/conntrack")?;
    print_records(r, a.output)
}
