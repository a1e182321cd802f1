//! One connection's packets through the real programs on two CPUs at the same moment: two
//! threads pinned apart, each with the programs loaded over the same pinned maps, meet at a
//! spin rendezvous and run one packet each with BPF_PROG_TEST_RUN. What one CPU writes into the
//! connection's entry must not undo what the other wrote.
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use aya::programs::{TestRun, TestRunOptions};
use observer::bpf::{Datapath, ScratchPins};
use observer_common::{ct_flags, programs};
use observer_tests::bench::wait_until;

const CLIENT: [u8; 4] = [10, 244, 1, 10];
const SERVER: [u8; 4] = [10, 244, 1, 11];
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn tcp(from_client: bool, port: u16, flags: u8) -> Vec<u8> {
    let (src, dst, sport, dport) = if from_client {
        (CLIENT, SERVER, port, 80)
    } else {
        (SERVER, CLIENT, 80, port)
    };
    observer::bench::packet64_between(src, dst, 6, sport, dport, flags)
}

fn run(dp: &mut Datapath, pkt: &[u8]) {
    let mut o = TestRunOptions::new();
    o.data_in = Some(pkt);
    let r = dp.prog(programs::FROM_POD).unwrap().test_run(o).unwrap();
    assert_eq!(r.return_value as i32, -1, "passed");
}

/// A policy change makes the next packet of each direction take the connection's verdicts
/// again. When that packet is the client's FIN and the server's FIN is counted on the other
/// CPU at the same moment, the re-judgment must not write back the flags it read before the
/// server's FIN was ORed in: the close would never be seen, never reported, and its entry would
/// stay for the TCP timeout.
#[test]
fn a_policy_change_at_a_close_keeps_both_fins() {
    observer_tests::ensure_root().unwrap();
    const CONNS: u32 = 10_000;
    let pins = ScratchPins::new("test-cpus-rejudge");
    let mut dp = Datapath::load(pins.path()).expect("load programs");
    // Each CPU's programs over the same pinned maps (conntrack, config, events).
    let workers: Vec<Datapath> = (0..2)
        .map(|_| Datapath::load(pins.path()).expect("load programs again"))
        .collect();
    // `round`: the connection both workers are to close; `arrived` and `done` count them in.
    let (round, arrived, done) = (AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0));
    std::thread::scope(|s| {
        for (cpu, mut w) in workers.into_iter().enumerate() {
            let (round, arrived, done) = (&round, &arrived, &done);
            s.spawn(move || {
                observer_tests::bench::pin_thread(0, cpu);
                for i in 1..=CONNS {
                    wait_until(round, i, true);
                    arrived.fetch_add(1, SeqCst);
                    // Spinning: both leave at the same moment.
                    wait_until(arrived, 2 * i, false);
                    run(&mut w, &tcp(cpu == 0, 20000 + i as u16, FIN | ACK));
                    done.fetch_add(1, SeqCst);
                }
            });
        }
        for i in 1..=CONNS {
            let port = 20000 + i as u16;
            run(&mut dp, &tcp(true, port, SYN));
            run(&mut dp, &tcp(false, port, SYN | ACK));
            run(&mut dp, &tcp(true, port, ACK));
            dp.bump_policy_gen().unwrap();
            round.store(i, SeqCst);
            wait_until(&done, 2 * i, true);
        }
    });
    let entries = dp.conntrack_entries().unwrap();
    let fins = ct_flags::FIN_ORIG | ct_flags::FIN_REPLY;
    let open: Vec<_> = entries
        .iter()
        .filter(|(_, e)| e.flags & fins != fins || e.flags & ct_flags::CLOSED == 0)
        .map(|(k, e)| (k.port_a, k.port_b, e.flags))
        .collect();
    assert_eq!(entries.len(), CONNS as usize, "one entry per connection");
    assert!(
        open.is_empty(),
        "{} of {CONNS} connections closed by FINs on two CPUs at once are not closed \
         (ports, flags): {:?}",
        open.len(),
        &open[..open.len().min(10)]
    );
}
