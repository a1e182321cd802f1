//! The `observer` command line: a module per command; here the top-level parser, the arguments
//! several commands share, and the dispatch.
mod bench;
mod daemon;
mod flows;
mod policy;
mod status;

use std::{io::IsTerminal, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use observer::client;

pub(crate) const DEFAULT_SOCKET: &str = "/run/observer/observer.sock";

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
    Daemon(daemon::DaemonArgs),
    /// Show flow records from the daemon's history, or follow them live.
    Flows(flows::FlowsArgs),
    /// `observer flows --follow`.
    FlowTail(flows::FlowsArgs),
    /// Print a shell completion script: `observer completion bash > /etc/bash_completion.d/observer`.
    Completion { shell: clap_complete::Shell },
    /// List the connections in the kernel's conntrack map with their current counters.
    Conntrack(ClientArgs),
    /// Show what the daemon is attached to, its kernel counters and its source's health.
    Status(ClientArgs),
    /// NetworkPolicy verdicts: a reachability matrix, or why one connection is allowed or not.
    Policy {
        #[command(subcommand)]
        what: policy::PolicyCmd,
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
        what: bench::BenchCmd,
    },
}

#[derive(clap::Args)]
pub(super) struct ClientArgs {
    /// The daemon's API socket.
    #[arg(long, env = "OBSERVER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub(super) socket: PathBuf,
    /// A remote daemon instead, HOST:PORT of its `--listen` (mutual TLS: needs --tls-ca,
    /// --tls-cert, --tls-key).
    #[arg(long, env = "OBSERVER_SERVER", requires_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub(super) server: Option<String>,
    /// CA that signed the daemon's certificate.
    #[arg(long, env = "OBSERVER_TLS_CA")]
    pub(super) tls_ca: Option<PathBuf>,
    /// This client's certificate (signed by the daemon's --tls-client-ca).
    #[arg(long, env = "OBSERVER_TLS_CERT")]
    pub(super) tls_cert: Option<PathBuf>,
    /// This client's private key.
    #[arg(long, env = "OBSERVER_TLS_KEY")]
    pub(super) tls_key: Option<PathBuf>,
    /// Name to check the daemon's certificate against (default: the host of --server).
    #[arg(long)]
    pub(super) tls_server_name: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Compact)]
    pub(super) output: Output,
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

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(super) enum Output {
    /// One readable line per record.
    Compact,
    /// One JSON object per line.
    Json,
    /// Aligned columns.
    Table,
}

pub fn run() -> Result<()> {
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
        Cmd::Daemon(a) => daemon::run(a),
        Cmd::Uninstall { pin_dir, state_dir } => daemon::uninstall(pin_dir, state_dir),
        Cmd::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "observer",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Flows(a) | Cmd::FlowTail(a) => flows::run(a),
        Cmd::Conntrack(a) => flows::conntrack(a),
        Cmd::Status(a) => status::run(a),
        Cmd::Policy { what } => policy::run(what),
        Cmd::Bench { what } => bench::run(what),
    }
}
