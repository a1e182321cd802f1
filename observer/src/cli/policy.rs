//! `observer policy matrix|explain`.
use std::{io::Write, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Subcommand, ValueEnum};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("state").required(true).args(["cluster", "kubeconfig"])))]
pub(super) struct ClusterArgs {
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
pub(super) enum PolicyCmd {
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
pub(super) enum EngineKind {
    Reference,
    Kernel,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(super) enum MatrixOutput {
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

pub(super) fn run(what: PolicyCmd) -> Result<()> {
    match what {
        PolicyCmd::Matrix {
            cluster,
            protocols,
            ports,
            output,
            engine: engine_kind,
            to_service,
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
        PolicyCmd::Explain {
            cluster,
            from,
            to,
            to_service,
            port,
            json,
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
    }
}
