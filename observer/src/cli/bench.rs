//! `observer bench`.

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub(super) enum BenchCmd {
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
        /// Runs per BPF_PROG_TEST_RUN call (the steady-state new connection always runs
        /// 10,000 a round, the connections a sweep removes before it).
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

pub(super) fn run(what: BenchCmd) -> Result<()> {
    match what {
        BenchCmd::Policy {
            json,
            repeat,
            rounds,
        } => {
            let mut ms = observer::bench::policy(repeat, rounds)?;
            ms.extend(observer::bench::compile_bench(rounds)?);
            print_measurements(&ms, json)
        }
        BenchCmd::Datapath {
            json,
            repeat,
            rounds,
            only,
        } => {
            let mut ms = Vec::new();
            if only.as_deref() != Some("uplink") {
                ms.extend(observer::bench::datapath(repeat, rounds)?);
            }
            if only.as_deref() != Some("from-pod") {
                ms.extend(observer::bench::uplink(repeat, rounds)?);
                ms.extend(observer::bench::uplink_tc(repeat, rounds)?);
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
