use std::{
    io::{BufRead, IsTerminal, Write},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use observer::{api::Status, client, daemon, flows::FlowRecord};

const DEFAULT_SOCKET: &str = "/run/observer/observer.sock";

/// observer: counts, classifies and explains pod traffic with eBPF.
#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: load the kernel programs, attach to pod interfaces, serve flows.
    Daemon(DaemonArgs),
    /// Show flow records from the daemon's history, or follow them live.
    Flows(FlowsArgs),
    /// `observer flows --follow`.
    FlowTail(FlowsArgs),
    /// Print a shell completion script: `observer completion bash > /etc/bash_completion.d/observer`.
    Completion { shell: clap_complete::Shell },
    /// List the connections in the kernel's conntrack map with their current counters.
    Conntrack(ClientArgs),
    /// Show what the daemon is attached to, its kernel counters and its source's health.
    Status(ClientArgs),
    /// NetworkPolicy verdicts: a reachability matrix, or why one connection is allowed or not.
    Policy {
        #[command(subcommand)]
        what: PolicyCmd,
    },
    /// Take observer off this node: detach its programs from every interface and remove its
    /// pinned links and maps. Enforcement stops. (A stopped or killed daemon leaves its
    /// programs enforcing on purpose: restarts never fail open.)
    Uninstall {
        /// bpffs directory of the pins.
        #[arg(long, env = "OBSERVER_PIN_DIR", default_value = observer::bpf::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Also remove the daemon's state directory.
        #[arg(
            long,
            env = "OBSERVER_STATE_DIR",
            default_value = "/run/observer/state"
        )]
        state_dir: PathBuf,
    },
    /// Measure the datapath with BPF_PROG_TEST_RUN.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("state").required(true).args(["cluster", "kubeconfig"])))]
struct ClusterArgs {
    /// Kubernetes YAML files or folders (Namespace, Pod with labels, container ports and
    /// status.podIP, NetworkPolicy). Repeatable.
    #[arg(long, num_args = 1..)]
    cluster: Vec<PathBuf>,
    /// Read the live cluster instead: Pods, Namespaces, Nodes and NetworkPolicies listed from
    /// the API server of this kubeconfig.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: its current context).
    #[arg(long, requires = "kubeconfig")]
    context: Option<String>,
    /// Let ipBlock peers match pod IPs (default: ipBlock selects only non-pod addresses).
    #[arg(long)]
    ipblock_matches_pods: bool,
    /// Treat every policy as audited: would-be drops show as `audit`.
    #[arg(long)]
    audit: bool,
    /// Judge traffic from a pod's own node by policy (default: always allowed, as Kubernetes
    /// requires for kubelet probes), as a daemon with `--deny-from-node` does.
    #[arg(long)]
    deny_from_node: bool,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// The verdict for every ordered pair of distinct pods on each protocol and port.
    Matrix {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Protocols to probe (default: those of the ports probed).
        #[arg(long = "protocol")]
        protocols: Vec<String>,
        /// Ports to probe (default: every port any pod serves); with `--to-service`, the
        /// Service's port.
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// Every pod towards a Service (`namespace/name`): the verdict for each backend its
        /// EndpointSlices list, on the port kube-proxy translates `--port` to.
        #[arg(long, requires = "ports")]
        to_service: Option<String>,
        /// `table`: upstream-style truth tables; `json`: one object per pair and port.
        #[arg(short, long, default_value = "table")]
        output: MatrixOutput,
        /// `reference`: the semantics engine; `kernel`: the real programs on BPF_PROG_TEST_RUN
        /// with maps filled by the compiler (needs root).
        #[arg(long, default_value = "reference")]
        engine: EngineKind,
    },
    /// Explain one connection: isolation on each side, and the rule that allows it or why none does.
    Explain {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Source: namespace/pod or an IP address.
        #[arg(long)]
        from: String,
        /// Destination: namespace/pod or an IP address.
        #[arg(
            long,
            required_unless_present = "to_service",
            conflicts_with = "to_service"
        )]
        to: Option<String>,
        /// Destination: a Service (`namespace/name`); `--port` is the Service's port (or
        /// NodePort), and each backend is explained on the port it is translated to.
        #[arg(long)]
        to_service: Option<String>,
        /// Destination port, `N` or `N/PROTO` (TCP by default).
        #[arg(long)]
        port: String,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum EngineKind {
    Reference,
    Kernel,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum MatrixOutput {
    Table,
    Json,
}

fn load_cluster(
    a: &ClusterArgs,
) -> Result<(observer::cluster::Cluster, observer::policy::Options)> {
    let c = match &a.kubeconfig {
        Some(path) => {
            let conn = observer::k8s::Connection {
                kubeconfig: Some(path.clone()),
                context: a.context.clone(),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async { observer::k8s::snapshot(conn.client().await?).await })
                .with_context(|| format!("reading the cluster through {}", path.display()))?
        }
        None => observer::cluster::load_dir(&a.cluster)?,
    };
    for e in &c.errors {
        eprintln!("warning: {e}");
    }
    Ok((
        c,
        observer::policy::Options {
            ipblock_matches_pods: a.ipblock_matches_pods,
            audit_all: a.audit,
            deny_from_node: a.deny_from_node,
        },
    ))
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Policy: new connections through from_pod/to_pod with 1, 100 and 10,000 rules; compile
    /// of 1,000 policies over 10,000 pods; one label change to maps updated.
    Policy {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 60_000)]
        repeat: u32,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// from_pod per-packet cost (conntrack hit and new connection) against an empty tc program,
    /// and the uplink's XDP program against an empty XDP program.
    Datapath {
        /// One JSON object per measurement.
        #[arg(long)]
        json: bool,
        /// Runs per BPF_PROG_TEST_RUN call.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        /// Rounds per case; the median is reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Only the pod veth programs (`from-pod`) or only the uplink's XDP program (`uplink`).
        #[arg(long, value_parser = ["from-pod", "uplink"])]
        only: Option<String>,
    },
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// This node's name: pods with this `spec.nodeName` are local endpoints.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Where cluster state comes from: `kube` (the API server: in-cluster credentials, or
    /// `--kubeconfig`), `dir:PATH[,PATH...]` (Kubernetes YAML files or folders, re-read when they
    /// change) or `none`. Default: `kube` inside a pod (KUBERNETES_SERVICE_HOST is set) or with
    /// `--kubeconfig`, otherwise `none`.
    #[arg(long, env = "OBSERVER_SOURCE")]
    source: Option<daemon::Source>,
    /// Kubeconfig for `--source kube` outside a pod (default: in-cluster, then $KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, env = "OBSERVER_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: its current context).
    #[arg(long, env = "OBSERVER_CONTEXT")]
    context: Option<String>,
    /// Where the daemon keeps what must survive its own restarts (identity numbering); keep it on
    /// a tmpfs such as /run so it lives exactly as long as the pinned maps.
    #[arg(
        long,
        env = "OBSERVER_STATE_DIR",
        default_value = "/run/observer/state"
    )]
    state_dir: PathBuf,
    /// Run inside the named network namespace (`/run/netns/NAME`), e.g. a virtual node.
    #[arg(long)]
    netns: Option<String>,
    /// bpffs directory where maps are pinned and re-adopted across restarts.
    #[arg(long, env = "OBSERVER_PIN_DIR", default_value = observer::bpf::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Unix socket of the local API (flows, status, metrics).
    #[arg(long, env = "OBSERVER_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Unix socket of the Hubble-compatible gRPC API, for `hubble observe --server
    /// unix://PATH` and `hubble status` (default: `hubble.sock` next to --socket, or
    /// `NAME-hubble.sock` for a --socket other than `observer.sock`; `none`: off).
    #[arg(long, env = "OBSERVER_HUBBLE_SOCKET")]
    hubble_socket: Option<PathBuf>,
    /// Also serve /metrics, /healthz and /readyz on this TCP address.
    #[arg(long, env = "OBSERVER_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Interfaces that are the node's uplinks, never pod interfaces (repeatable).
    #[arg(
        long = "uplink",
        env = "OBSERVER_UPLINKS",
        value_delimiter = ',',
        default_value = "eth0"
    )]
    uplinks: Vec<String>,
    /// Leave the uplinks without programs (no wire-side counters, no XDP ingress policy).
    #[arg(long, env = "OBSERVER_NO_UPLINK_PROGRAMS")]
    no_uplink_programs: bool,
    /// How tc programs attach: `auto` (TCX on Linux >= 6.6, clsact before), or `tcx` /
    /// `clsact` to choose (clsact works on every kernel: what nodes before 6.6 run).
    #[arg(long, env = "OBSERVER_ATTACH_MODE", default_value = "auto", value_parser = ["auto", "tcx", "clsact"])]
    attach_mode: String,
    /// The node's network model, for SNAT expectations: overlay (kubenet, Azure CNI Overlay),
    /// flat (Azure CNI), or auto (flat when this node's pod IPs are inside the VNet).
    #[arg(
        long,
        env = "OBSERVER_NETWORK_MODEL",
        value_enum,
        default_value = "auto"
    )]
    network_model: observer::snat::ModelSetting,
    /// The VNet's address ranges (repeatable; default: the subnets on the uplinks).
    #[arg(long = "vnet-cidr", env = "OBSERVER_VNET_CIDRS", value_delimiter = ',')]
    vnet_cidrs: Vec<ipnet::IpNet>,
    /// The cluster's pod address ranges (repeatable; default: every Node's spec.podCIDRs).
    #[arg(
        long = "cluster-cidr",
        env = "OBSERVER_CLUSTER_CIDRS",
        value_delimiter = ','
    )]
    cluster_cidrs: Vec<ipnet::IpNet>,
    /// Do not follow the kernel's connection tracking: records carry no `snat` object.
    #[arg(long, env = "OBSERVER_NO_SNAT")]
    no_snat: bool,
    /// How long a new connection's record waits for the kernel's conntrack entry before an
    /// exact lookup settles its SNAT.
    #[arg(long, env = "OBSERVER_SNAT_WAIT", default_value = "250ms", value_parser = humantime::parse_duration)]
    snat_wait: Duration,
    /// Report live connections this often (0 disables reports).
    #[arg(long, env = "OBSERVER_REPORT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    report_interval: Duration,
    /// Flow records kept for `observer flows`.
    #[arg(long, env = "OBSERVER_HISTORY", default_value_t = 16_384)]
    history: usize,
    /// Idle TCP connections are forgotten after this long.
    #[arg(long, env = "OBSERVER_TCP_TIMEOUT", default_value = "6h", value_parser = humantime::parse_duration)]
    tcp_timeout: Duration,
    /// Idle UDP, ICMP and other connections are forgotten after this long.
    #[arg(long, env = "OBSERVER_OTHER_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    other_timeout: Duration,
    /// Wait this long after a TCP close before reporting it, so the final ACK is counted.
    #[arg(long, env = "OBSERVER_CLOSE_GRACE", default_value = "1s", value_parser = humantime::parse_duration)]
    close_grace: Duration,
    /// Observe only: report what policy would drop, drop nothing.
    #[arg(long, env = "OBSERVER_NO_ENFORCE")]
    no_enforce: bool,
    /// Let ipBlock peers match pod IPs (default: ipBlock selects only non-pod addresses).
    #[arg(long, env = "OBSERVER_IPBLOCK_MATCHES_PODS")]
    ipblock_matches_pods: bool,
    /// Audit every policy: would-be drops pass and are reported with verdict `audit`.
    #[arg(long, env = "OBSERVER_AUDIT")]
    audit: bool,
    /// Hardened clusters: judge traffic from this node's own addresses (kubelet probes,
    /// hostNetwork pods) to its pods by policy like any other source. By default it passes
    /// ingress isolation, as Kubernetes requires, and its records say so (`allowed-from-node`).
    #[arg(long, env = "OBSERVER_DENY_FROM_NODE")]
    deny_from_node: bool,
    /// Also write flow records to this file as JSON lines.
    #[arg(long, env = "OBSERVER_FLOW_LOG")]
    flow_log: Option<PathBuf>,
    /// Rotate the flow log when it would exceed this many bytes.
    #[arg(long, env = "OBSERVER_FLOW_LOG_MAX_BYTES", default_value_t = 100 * 1024 * 1024)]
    flow_log_max_bytes: u64,
    /// Rotated flow log files kept (FILE.1 newest).
    #[arg(long, env = "OBSERVER_FLOW_LOG_MAX_FILES", default_value_t = 5)]
    flow_log_max_files: usize,
    /// Only log records matching FILTER=VALUE (repeatable; e.g. verdict=dropped).
    #[arg(long, env = "OBSERVER_FLOW_LOG_INCLUDE")]
    flow_log_include: Vec<String>,
    /// Leave out records matching FILTER=VALUE (repeatable; e.g. namespace=kube-system).
    #[arg(long, env = "OBSERVER_FLOW_LOG_EXCLUDE")]
    flow_log_exclude: Vec<String>,
    /// Node-wide budget of flow records per second; what exceeds it is counted
    /// (`observer status`, metrics), not produced. 0: unlimited.
    #[arg(
        long,
        env = "OBSERVER_MAX_RECORDS_PER_SECOND",
        default_value_t = 50_000
    )]
    max_records_per_second: u64,
    /// Also serve the whole API (flows, status, conntrack, metrics) on this TCP address, with
    /// mutual TLS only: needs --tls-cert, --tls-key and --tls-client-ca.
    #[arg(long, env = "OBSERVER_LISTEN", requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    listen: Option<std::net::SocketAddr>,
    /// Also serve the Hubble API (with `peer.Peer` for Hubble Relay) on this TCP address, e.g.
    /// `0.0.0.0:4244`, mutual TLS only with the same --tls-cert, --tls-key and --tls-client-ca.
    #[arg(long, env = "OBSERVER_HUBBLE_LISTEN", requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    hubble_listen: Option<std::net::SocketAddr>,
    /// The cluster's name in the Hubble peers' TLS server names
    /// (`<node>.<cluster>.hubble-grpc.cilium.io`, what Hubble Relay checks).
    #[arg(long, env = "OBSERVER_CLUSTER_NAME", default_value = "default")]
    cluster_name: String,
    /// The daemon's certificate for --listen (PEM, chain first).
    #[arg(long, env = "OBSERVER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The daemon's private key for --listen (PEM).
    #[arg(long, env = "OBSERVER_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Clients of --listen must present a certificate signed by this CA (PEM).
    #[arg(long, env = "OBSERVER_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Leave out the per-pod bytes and packets metrics (observer_pod_*).
    #[arg(long, env = "OBSERVER_NO_POD_METRICS")]
    no_pod_metrics: bool,
    /// Per-pod metrics for at most this many local pods; more are counted in
    /// observer_pod_metrics_overflow_total.
    #[arg(long, env = "OBSERVER_POD_METRICS_MAX", default_value_t = 1_000)]
    pod_metrics_max: usize,
    /// How often a `dir:` source is re-read.
    #[arg(long, env = "OBSERVER_SOURCE_POLL", default_value = "1s", value_parser = humantime::parse_duration)]
    source_poll: Duration,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "OBSERVER_LOG", default_value = "info")]
    log: String,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// The daemon's API socket.
    #[arg(long, env = "OBSERVER_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// A remote daemon instead, HOST:PORT of its `--listen` (mutual TLS: needs --tls-ca,
    /// --tls-cert, --tls-key).
    #[arg(long, env = "OBSERVER_SERVER", requires_all = ["tls_ca", "tls_cert", "tls_key"])]
    server: Option<String>,
    /// CA that signed the daemon's certificate.
    #[arg(long, env = "OBSERVER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (signed by the daemon's --tls-client-ca).
    #[arg(long, env = "OBSERVER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This client's private key.
    #[arg(long, env = "OBSERVER_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Name to check the daemon's certificate against (default: the host of --server).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Compact)]
    output: Output,
}

impl ClientArgs {
    fn server(&self) -> Result<client::Server> {
        let Some(addr) = &self.server else {
            return Ok(client::Server::Unix(self.socket.clone()));
        };
        let files = observer::tls::Files {
            cert: self.tls_cert.clone().context("--tls-cert")?,
            key: self.tls_key.clone().context("--tls-key")?,
            ca: self.tls_ca.clone().context("--tls-ca")?,
        };
        Ok(client::Server::Tls {
            addr: addr.clone(),
            name: observer::tls::server_name(addr, self.tls_server_name.as_deref())?,
            config: observer::tls::client_config(&files)?,
        })
    }
}

#[derive(clap::Args)]
struct FlowsArgs {
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
struct FilterArgs {
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

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    /// One readable line per record.
    Compact,
    /// One JSON object per line.
    Json,
    /// Aligned columns.
    Table,
}

fn enter_netns(name: &str) -> Result<()> {
    let path = if name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("/run/netns").join(name)
    };
    let f = std::fs::File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    use std::os::fd::AsRawFd;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!(
            "entering network namespace {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn main() {
    match run() {
        Ok(()) => {}
        // A closed pipe (`observer flows | head`) is a normal end, as for any Unix filter.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Bench { .. }) {
        // Quiet unless asked (`OBSERVER_LOG=info` shows what each program cost the verifier).
        let filter = std::env::var("OBSERVER_LOG").unwrap_or_else(|_| "warn".into());
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter)?)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
    match cli.cmd {
        Cmd::Daemon(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&a.log)?)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .init();
            observer::caps::check(if a.netns.is_some() {
                &[observer::caps::SYS_ADMIN]
            } else {
                &[]
            })?;
            // Before the runtime starts: threads inherit the namespace of their creator.
            if let Some(ns) = &a.netns {
                enter_netns(ns)?;
            }
            let node_name = match a.node_name {
                Some(n) => n,
                None => hostname()?,
            };
            let kube_conn = observer::k8s::Connection {
                kubeconfig: a.kubeconfig.clone(),
                context: a.context.clone(),
            };
            let opts = daemon::Options {
                node_name,
                source: match a.source {
                    Some(daemon::Source::Kube(_)) => daemon::Source::Kube(kube_conn.clone()),
                    Some(s) => s,
                    None if kube_conn.kubeconfig.is_some()
                        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() =>
                    {
                        daemon::Source::Kube(kube_conn.clone())
                    }
                    None => daemon::Source::None,
                },
                pin_dir: a.pin_dir,
                hubble_socket: match a.hubble_socket {
                    Some(p) if p.as_os_str() == "none" => None,
                    Some(p) => Some(p),
                    None => Some(observer::hubble::default_socket(&a.socket)),
                },
                socket: a.socket,
                state_dir: a.state_dir,
                metrics_addr: a.metrics_addr,
                uplinks: a.uplinks,
                uplink_programs: !a.no_uplink_programs,
                attach_mode: match a.attach_mode.as_str() {
                    "tcx" => Some(observer::bpf::AttachMode::Tcx),
                    "clsact" => Some(observer::bpf::AttachMode::Clsact),
                    _ => None,
                },
                model: observer::snat::ModelConfig {
                    setting: a.network_model,
                    cluster_cidrs: a.cluster_cidrs,
                    vnet_cidrs: a.vnet_cidrs,
                },
                snat: !a.no_snat,
                snat_wait: a.snat_wait,
                report_interval: a.report_interval,
                history: a.history,
                tcp_timeout: a.tcp_timeout,
                other_timeout: a.other_timeout,
                close_grace: a.close_grace,
                source_poll: a.source_poll,
                enforce: !a.no_enforce,
                policy: observer::policy::Options {
                    ipblock_matches_pods: a.ipblock_matches_pods,
                    audit_all: a.audit,
                    deny_from_node: a.deny_from_node,
                },
                flow_log: match &a.flow_log {
                    Some(path) => Some(observer::flowlog::Config {
                        path: path.clone(),
                        max_bytes: a.flow_log_max_bytes,
                        max_files: a.flow_log_max_files,
                        include: a
                            .flow_log_include
                            .iter()
                            .map(|s| observer::flowlog::parse_spec(s))
                            .collect::<Result<_>>()?,
                        exclude: a
                            .flow_log_exclude
                            .iter()
                            .map(|s| observer::flowlog::parse_spec(s))
                            .collect::<Result<_>>()?,
                    }),
                    None => None,
                },
                max_records_per_second: a.max_records_per_second,
                remote: match a.listen {
                    Some(addr) => Some((
                        addr,
                        observer::tls::Files {
                            cert: a.tls_cert.clone().context("--tls-cert")?,
                            key: a.tls_key.clone().context("--tls-key")?,
                            ca: a.tls_client_ca.clone().context("--tls-client-ca")?,
                        },
                    )),
                    None => None,
                },
                pod_metrics: !a.no_pod_metrics,
                pod_metrics_max: a.pod_metrics_max,
                hubble_remote: match a.hubble_listen {
                    Some(addr) => Some((
                        addr,
                        observer::tls::Files {
                            cert: a.tls_cert.clone().context("--tls-cert")?,
                            key: a.tls_key.clone().context("--tls-key")?,
                            ca: a.tls_client_ca.clone().context("--tls-client-ca")?,
                        },
                    )),
                    None => None,
                },
                cluster_name: a.cluster_name.clone(),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(opts))
        }
        Cmd::Uninstall { pin_dir, state_dir } => {
            for line in observer::bpf::uninstall(&pin_dir)? {
                println!("{line}");
            }
            if state_dir.exists() {
                std::fs::remove_dir_all(&state_dir)
                    .with_context(|| format!("removing {}", state_dir.display()))?;
                println!("removed state {}", state_dir.display());
            }
            Ok(())
        }
        Cmd::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "observer",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Flows(a) | Cmd::FlowTail(a) => {
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
        Cmd::Conntrack(a) => {
            let r = client::get(&a.server()?, "/v1/conntrack")?;
            print_records(r, a.output)
        }
        Cmd::Status(a) => {
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
                "conntrack:     {} entries   history: {} records",
                s.conntrack_entries, s.history
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
                    "uplink:        {}({}) tc + xdp {}",
                    u.name, u.ifindex, u.xdp
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
        Cmd::Policy {
            what:
                PolicyCmd::Matrix {
                    cluster,
                    protocols,
                    ports,
                    output,
                    engine: engine_kind,
                    to_service,
                },
        } => {
            use observer::policy::{matrix, Engine, Protocol};
            let (c, opts) = load_cluster(&cluster)?;
            let engine = Engine::new(&c, opts);
            let mut protos = Vec::new();
            for p in &protocols {
                protos.push(
                    Protocol::parse(p)
                        .with_context(|| format!("--protocol {p:?}: expected TCP, UDP or SCTP"))?,
                );
            }
            let probes: Vec<(Protocol, u16)> = if ports.is_empty() {
                matrix::served_ports(&c)
                    .into_iter()
                    .filter(|(pr, _)| protos.is_empty() || protos.contains(pr))
                    .collect()
            } else {
                let protos = if protos.is_empty() {
                    vec![Protocol::Tcp]
                } else {
                    protos
                };
                protos
                    .iter()
                    .flat_map(|pr| ports.iter().map(move |p| (*pr, *p)))
                    .collect()
            };
            if probes.is_empty() {
                anyhow::bail!("no ports to probe: no pod declares container ports; pass --port");
            }
            if let Some(svc) = &to_service {
                if engine_kind == EngineKind::Kernel {
                    anyhow::bail!("--to-service is answered by the reference engine only");
                }
                let cells = matrix::service_matrix(&engine, svc, &probes)?;
                let mut out = std::io::stdout().lock();
                for cell in &cells {
                    match output {
                        MatrixOutput::Json => writeln!(out, "{}", serde_json::to_string(cell)?)?,
                        MatrixOutput::Table => writeln!(
                            out,
                            "{} -> {svc} = {} {}/{}: {} ({})",
                            cell.from,
                            cell.to,
                            cell.port,
                            cell.protocol,
                            cell.verdict.to_uppercase(),
                            cell.reason
                        )?,
                    }
                }
                return Ok(());
            }
            let cells = match engine_kind {
                EngineKind::Reference => matrix::matrix(&engine, &probes),
                EngineKind::Kernel => observer::policy::kernel::matrix(&c, &engine.opts, &probes)?,
            };
            match output {
                MatrixOutput::Json => {
                    let mut out = std::io::stdout().lock();
                    for cell in &cells {
                        writeln!(out, "{}", serde_json::to_string(cell)?)?;
                    }
                }
                MatrixOutput::Table => {
                    let pods: Vec<String> = matrix::pods_sorted(&c)
                        .iter()
                        .map(|p| format!("{}/{}", p.namespace, p.name))
                        .collect();
                    print!("{}", matrix::render_table(&cells, &pods));
                }
            }
            Ok(())
        }
        Cmd::Policy {
            what:
                PolicyCmd::Explain {
                    cluster,
                    from,
                    to,
                    to_service,
                    port,
                    json,
                },
        } => {
            use observer::policy::{matrix, Engine};
            let (c, opts) = load_cluster(&cluster)?;
            let engine = Engine::new(&c, opts);
            let src = matrix::peer(&c, &from)?;
            let (proto, port) = matrix::parse_port(&port)?;
            let targets = match (&to, &to_service) {
                (Some(to), _) => vec![(matrix::peer(&c, to)?, port)],
                (None, Some(svc)) => {
                    let b = matrix::service_backends(&c, svc, proto, port)?;
                    if b.is_empty() {
                        println!("service {svc} port {port}/{proto}: no ready backends, kube-proxy rejects the connection");
                    } else if !json {
                        println!("service {svc} port {port}/{proto}: {} backend(s), each judged by policy", b.len());
                    }
                    b
                }
                (None, None) => anyhow::bail!("--to or --to-service is required"),
            };
            for (dst, port) in targets {
                let d = engine.decide(src, dst, proto, port);
                if json {
                    println!("{}", serde_json::to_string(&d)?);
                } else {
                    print!("{}", matrix::explain(&engine, src, dst, proto, port, &d));
                }
            }
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Policy {
                    json,
                    repeat,
                    rounds,
                },
        } => {
            let mut ms = observer::bench::policy(repeat, rounds)?;
            ms.extend(observer::bench::compile_bench(rounds)?);
            print_measurements(&ms, json)
        }
        Cmd::Bench {
            what:
                BenchCmd::Datapath {
                    json,
                    repeat,
                    rounds,
                    only,
                },
        } => {
            let mut ms = Vec::new();
            if only.as_deref() != Some("uplink") {
                ms.extend(observer::bench::datapath(repeat, rounds)?);
            }
            if only.as_deref() != Some("from-pod") {
                ms.extend(observer::bench::uplink(repeat, rounds)?);
            }
            for m in ms {
                if json {
                    println!("{}", serde_json::to_string(&m)?);
                } else {
                    println!(
                        "{:<36} {:>8.1} ns/pkt  baseline {:>6.1}  above {:>7.1}  ({})",
                        m.case,
                        m.ns_per_packet,
                        m.baseline_ns_per_packet,
                        m.ns_above_baseline,
                        m.method
                    );
                }
            }
            Ok(())
        }
    }
}

fn print_measurements(ms: &[observer::bench::Measurement], json: bool) -> Result<()> {
    for m in ms {
        if json {
            println!("{}", serde_json::to_string(m)?);
        } else {
            println!(
                "{:<36} {:>12.1} ns  baseline {:>6.1}  above {:>12.1}  ({})",
                m.case, m.ns_per_packet, m.baseline_ns_per_packet, m.ns_above_baseline, m.method
            );
        }
    }
    Ok(())
}

fn hostname() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_string())
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
