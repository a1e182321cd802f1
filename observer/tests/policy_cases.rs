//! The upstream e2e network-policy cases (`tests/policy/cases`) through the reference engine.
mod cases;

use observer::policy::{matrix, Engine};

#[test]
fn upstream_cases_match_the_reference_engine() {
    let engine = |c: &_, o: &observer::policy::Options, probes: &[_]| {
        matrix::matrix(&Engine::new(c, o.clone()), probes)
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
