//! The upstream e2e network-policy cases through the kernel engine: the compiler fills the real
//! maps, and the real `from_pod`/`to_pod` programs decide each connection-opening packet
//! (BPF_PROG_TEST_RUN). Must agree with the truth tables exactly as the reference engine does.
mod cases;

use observer::policy::kernel;

#[test]
fn upstream_cases_match_the_kernel_engine() {
    observer_tests::ensure_root().unwrap();
    let engine = |c: &_, o: &observer::policy::Options, probes: &[_]| {
        kernel::matrix(c, o, probes).expect("kernel engine")
    };
    let failures: Vec<String> = cases::case_files()
        .iter()
        .flat_map(|f| cases::run_case(f, &engine))
        .collect();
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
