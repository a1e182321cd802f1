//! `observer flows`, `flow-tail` and `conntrack`: records from the daemon's API, filtered and
//! rendered.
use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context as _, Result};
use observer::{
    client,
    flows::FlowRecord,
    hubble::{
        convert,
        proto::observer::{
            get_flows_response::ResponseTypes, observer_client::ObserverClient, GetFlowsRequest,
        },
    },
};

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

/// Writes records in the chosen format; one per line, flushed per record when someone may be
/// watching (a terminal, or JSON consumers of a followed stream).
struct Render<W: Write> {
    out: W,
    output: Output,
    color: bool,
    flush: bool,
}

const TABLE_HEAD: [&str; 9] = [
    "TIME",
    "EVENT",
    "SOURCE",
    "DESTINATION",
    "PROTO",
    "VERDICT",
    "OUT pkts/bytes",
    "IN pkts/bytes",
    "SNAT",
];

impl<W: Write> Render<W> {
    fn new(out: W, output: Output, color: bool, flush: bool) -> std::io::Result<Self> {
        let mut r = Self {
            out,
            output,
            color,
            flush,
        };
        if output == Output::Table {
            r.row(&TABLE_HEAD.map(String::from))?;
        }
        Ok(r)
    }

    fn row(&mut self, c: &[String; 9]) -> std::io::Result<()> {
        writeln!(
            self.out,
            "{:<12} {:<6} {:<42} {:<42} {:<7} {:<10} {:>16} {:>16} {}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
        )
    }

    fn record(&mut self, rec: &FlowRecord) -> std::io::Result<()> {
        match self.output {
            Output::Json => {
                serde_json::to_writer(&mut self.out, rec)?;
                self.out.write_all(b"\n")?;
            }
            Output::Table => self.row(&table_row(rec))?,
            Output::Compact if self.color => {
                let c = match &*rec.event {
                    "new" => "32",
                    "close" => "90",
                    _ => "0",
                };
                writeln!(self.out, "\x1b[{c}m{}\x1b[0m", rec.compact())?
            }
            Output::Compact => writeln!(self.out, "{}", rec.compact())?,
        }
        if self.flush {
            self.out.flush()?;
        }
        Ok(())
    }

    /// Records the daemon could not send because this reader fell behind: said in the output
    /// for JSON consumers, on stderr otherwise.
    fn lost(&mut self, n: u64) -> std::io::Result<()> {
        match self.output {
            Output::Json => writeln!(self.out, "{{\"lost_records\":{n}}}")?,
            _ => eprintln!("observer: {n} records lost: this reader fell behind"),
        }
        Ok(())
    }
}

fn table_row(rec: &FlowRecord) -> [String; 9] {
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
    [
        rec.time.time_of_day(),
        rec.event.to_string(),
        side(&rec.source),
        side(&rec.destination),
        rec.l4.protocol.to_string(),
        rec.verdict.to_string(),
        format!("{}/{}", c.packets_out, c.bytes_out),
        format!("{}/{}", c.packets_in, c.bytes_in),
        snat,
    ]
}

/// The request `observer flows` sends: Hubble's GetFlows with observer's own filters in its
/// extensions (they filter on what Hubble's FlowFilter has no field for).
fn request(
    a: &FlowsArgs,
    follow: bool,
    filters: &[observer::filter::Filter],
) -> Result<GetFlowsRequest> {
    use observer::hubble::proto::observer::ext;
    let since = a.since.as_deref().map(parse_when).transpose()?;
    let until = a.until.as_deref().map(parse_when).transpose()?;
    let argv: Vec<String> = std::env::args().collect();
    let mut wire = Vec::new();
    let mut negate = false;
    for (flag, value) in ordered_filter_args(&argv) {
        if flag == "not" {
            negate = true;
            continue;
        }
        wire.push(ext::Filter {
            negate,
            flag,
            value,
        });
        negate = false;
    }
    debug_assert_eq!(wire.len(), filters.len());
    Ok(GetFlowsRequest {
        number: a.last.unwrap_or(0) as u64,
        follow,
        since: since.map(Into::into),
        until: until.map(Into::into),
        // Only what the records are made of: less to encode, send and decode per flow.
        field_mask: Some(prost_types::FieldMask {
            paths: convert::RECORD_FIELDS.map(String::from).to_vec(),
        }),
        extensions: Some(prost_types::Any {
            type_url: observer::hubble::FLOWS_REQUEST_TYPE.into(),
            value: prost::Message::encode_to_vec(&ext::FlowsRequest { filters: wire }),
        }),
        ..Default::default()
    })
}

pub(super) fn run(a: FlowsArgs) -> Result<()> {
    let follow = a.follow || std::env::args().nth(1).as_deref() == Some("flow-tail");
    let argv: Vec<String> = std::env::args().collect();
    // Checked here too, so a bad value is reported before connecting.
    let filters = observer::filter::from_args(&ordered_filter_args(&argv))?;
    let req = request(&a, follow, &filters)?;
    let server = a.client.server()?;
    let stdout = std::io::stdout();
    let color = stdout.is_terminal();
    let flush = color || follow;
    let mut render = Render::new(
        std::io::BufWriter::with_capacity(1 << 16, stdout.lock()),
        a.client.output,
        color,
        flush,
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let channel = client::channel(&server).await?;
        let mut api = ObserverClient::new(channel).max_decoding_message_size(64 << 20);
        let refused = |e: tonic::Status| match &server {
            // The connection failing after the handshake: TLS 1.3 refuses a client
            // certificate only then.
            client::Server::Tls { addr, .. }
                if matches!(
                    e.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
            {
                client::tls_refused(addr, &e)
            }
            _ => anyhow::anyhow!("the daemon refused the request: {}", e.message()),
        };
        let mut stream = api.get_flows(req).await.map_err(refused)?.into_inner();
        loop {
            let item = match stream.message().await {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(e) => return Err(refused(e)),
            };
            let written = match item.response_types {
                Some(ResponseTypes::Flow(f)) => match convert::record_of(&f) {
                    Some(rec) => render.record(&rec),
                    None => anyhow::bail!(
                        "the server sent a flow without observer's record: is it observer?"
                    ),
                },
                Some(ResponseTypes::LostEvents(l)) => render.lost(l.num_events_lost),
                _ => Ok(()),
            };
            if written.is_err() {
                return Ok(()); // closed pipe
            }
        }
        let _ = render.out.flush();
        Ok(())
    })
}

/// Records as JSON lines from the HTTP API, rendered like the flows.
fn print_lines(r: impl BufRead, output: Output) -> Result<()> {
    let stdout = std::io::stdout();
    let color = stdout.is_terminal();
    let mut render = Render::new(stdout.lock(), output, color, color)?;
    for line in r.lines() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        let res = match serde_json::from_str::<FlowRecord>(&line) {
            Ok(rec) if output != Output::Json => render.record(&rec),
            _ => writeln!(render.out, "{line}"),
        };
        if res.is_err() {
            break; // closed pipe
        }
    }
    Ok(())
}

pub(super) fn conntrack(a: ClientArgs) -> Result<()> {
    let r = client::get(&a.server()?, "/v1/conntrack")?;
    print_lines(r, a.output)
}
