//! `observer daemon` and `observer uninstall`.
use std::{io::IsTerminal, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use observer::daemon;

use super::*;

#[derive(clap::Args)]
pub(super) struct DaemonArgs {
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
    /// Leave the uplinks without programs (no wire-side counters, no early ingress policy).
    #[arg(long, env = "OBSERVER_NO_UPLINK_PROGRAMS")]
    no_uplink_programs: bool,
    /// XDP on the uplinks: `auto` (driver mode where the NIC's driver has it, never on a
    /// veth), `native`, `generic` or `off`. Without XDP, the uplink's tc ingress program drops
    /// a local pod's denied openers before the stack instead.
    #[arg(long, env = "OBSERVER_UPLINK_XDP", value_enum, default_value = "auto")]
    uplink_xdp: observer::bpf::UplinkXdp,
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
    /// No SNAT join: records carry no `snat` object.
    #[arg(long, env = "OBSERVER_NO_SNAT")]
    no_snat: bool,
    /// How long a new connection's record waits for its translation to be seen leaving the
    /// node before an exact lookup of the kernel's conntrack settles its SNAT.
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
    /// A TCP close is reported with the acknowledgement of its last FIN. One the kernel cannot
    /// follow that far (a RST, FINs that crossed) is reported this long after it, so the final
    /// ACKs are counted; one whose last acknowledgement never comes, this long after its last
    /// packet.
    #[arg(long, env = "OBSERVER_CLOSE_GRACE", default_value = "1s", value_parser = humantime::parse_duration)]
    close_grace: Duration,
    /// Keep packets between two pods of this node on the node's stack (routing, netfilter,
    /// the destination veth's qdisc). By default those of connections nothing translates
    /// (not a Service's) go from the source's veth straight into the destination pod.
    #[arg(long, env = "OBSERVER_NO_LOCAL_REDIRECT")]
    no_local_redirect: bool,
    /// Keep packets between pods of this node and pods of other nodes on the node's stack. By
    /// default, for a pod on a routed veth (not a bridge), those of connections nothing
    /// translates go from the pod's veth straight to the uplink, and from the uplink straight
    /// into the pod.
    #[arg(long, env = "OBSERVER_NO_REMOTE_REDIRECT")]
    no_remote_redirect: bool,
    /// Observe only: drop nothing. Every policy is audited (as with `--audit`): what policy
    /// would drop passes, recorded with verdict `audit`.
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
    /// Drop records per CPU and second for packets policy denies. A denied connection is
    /// dropped without a conntrack entry, so each dropped packet (a retransmitted opener
    /// included) is a record of its own; under a flood the rest are counted as
    /// `drop_events_suppressed` (`observer status`, metrics), their packets in
    /// `policy_denied`. 0: unlimited.
    #[arg(
        long,
        env = "OBSERVER_DROP_EVENTS_PER_CPU_SECOND",
        default_value_t = 1_000
    )]
    drop_events_per_cpu_second: u32,
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

fn hostname() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_string())
}

pub(super) fn run(a: DaemonArgs) -> Result<()> {
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
        node_name: node_name.into(),
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
        uplink_xdp: a.uplink_xdp,
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
        local_redirect: !a.no_local_redirect,
        remote_redirect: !a.no_remote_redirect,
        policy: observer::policy::Options {
            ipblock_matches_pods: a.ipblock_matches_pods,
            // What passes is not dropped, so it is not recorded `dropped` either.
            audit_all: a.audit || a.no_enforce,
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
        drop_events_per_cpu_second: a.drop_events_per_cpu_second,
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

pub(super) fn uninstall(pin_dir: PathBuf, state_dir: PathBuf) -> Result<()> {
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
