//! `observer policy matrix --kubeconfig` reads the live cluster through the API server and must
//! give exactly the matrix `--cluster` gives for the same objects. The API server is the
//! in-process one of the tests, on loopback.
use std::process::Command;

use observer_tests::kubeapi::FakeApi;

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

fn run(args: &[&str]) -> String {
    let out = Command::new(OBSERVER).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "observer {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn matrix_from_the_api_server_equals_matrix_from_files() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("tests/policy/model.yaml");
    // A case with policies of every shape: pod and namespace selectors, ports, egress.
    let cases = root.join("tests/policy/cases");
    let mut case_files: Vec<_> = std::fs::read_dir(&cases)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    case_files.sort();
    assert!(!case_files.is_empty());
    let mut compared = 0;
    for case in &case_files {
        let api = FakeApi::start().unwrap();
        let docs = observer::cluster::read_documents(&[model.clone(), case.clone()]).unwrap();
        let mut objects = 0;
        for (_, v) in docs {
            // Only what the daemon reads from an API server.
            let kind = v["kind"].as_str().unwrap_or("").to_string();
            if ["Namespace", "Pod", "Node", "NetworkPolicy"].contains(&kind.as_str()) {
                api.apply(v);
                objects += 1;
            }
        }
        if objects == 0 {
            continue;
        }
        let dir = tempdir(case);
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        for output in ["table", "json"] {
            let files = run(&[
                "policy",
                "matrix",
                "--cluster",
                model.to_str().unwrap(),
                case.to_str().unwrap(),
                "-o",
                output,
            ]);
            let live = run(&[
                "policy",
                "matrix",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--context",
                "fake",
                "-o",
                output,
            ]);
            assert_eq!(live, files, "{} -o {output}", case.display());
            assert!(!live.is_empty());
        }
        assert!(
            api.requests()
                .iter()
                .any(|r| r.contains("/apis/networking.k8s.io/v1/networkpolicies")),
            "{:?}",
            api.requests()
        );
        compared += 1;
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(
        compared == case_files.len(),
        "only {compared} cases compared"
    );
}

#[test]
fn matrix_names_an_unreachable_api_server() {
    let api = FakeApi::start().unwrap();
    let dir = tempdir(std::path::Path::new("unreachable"));
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig_contexts(&kubeconfig, &["fake", "other"])
        .unwrap();
    let out = Command::new(OBSERVER)
        .args([
            "policy",
            "matrix",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--context",
            "other",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reading the cluster through") && err.contains("kubeconfig"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn tempdir(case: &std::path::Path) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "observer-kube-matrix-{}-{}",
        std::process::id(),
        case.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
