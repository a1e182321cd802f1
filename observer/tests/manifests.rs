//! The deployment manifests in `manifests/` agree with the code: RBAC grants exactly what the
//! watchers use, the DaemonSet grants exactly the capabilities the daemon checks for, mounts
//! where the daemon pins and listens, and probes the endpoints the metrics listener serves; the
//! ConfigMap only sets settings the daemon reads. No cluster and no root needed.
//!
//! Every check is a function returning the first violation, and each is also run on a broken
//! copy of the manifest to show it can fail.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use observer::{
    caps,
    k8s::{VERBS, WATCHED},
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};

type Check = Result<(), String>;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("manifests")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    out.sort();
}

/// Path relative to `manifests/`, with `/` separators.
fn rel(p: &Path) -> String {
    p.strip_prefix(manifests_dir())
        .unwrap()
        .to_string_lossy()
        .replace('\\', "/")
}

struct Doc {
    origin: String,
    value: Value,
}

fn parse_docs(origin: &str, text: &str) -> Result<Vec<Doc>, String> {
    let mut out = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value =
            Value::deserialize(de).map_err(|e| format!("{origin} document {}: {e}", i + 1))?;
        if !value.is_null() {
            out.push(Doc {
                origin: format!("{origin} document {}", i + 1),
                value,
            });
        }
    }
    Ok(out)
}

fn all_docs() -> Vec<Doc> {
    let mut files = Vec::new();
    yaml_files(&manifests_dir(), &mut files);
    assert!(!files.is_empty());
    files
        .iter()
        .flat_map(|f| parse_docs(&rel(f), &std::fs::read_to_string(f).unwrap()).unwrap())
        .collect()
}

fn find(kind: &str, name: &str) -> Value {
    let found: Vec<Value> = all_docs()
        .into_iter()
        .filter(|d| d.value["kind"] == kind && d.value["metadata"]["name"] == name)
        .map(|d| d.value)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}");
    found.into_iter().next().unwrap()
}

fn daemonset() -> Value {
    find("DaemonSet", "observer")
}

fn container(ds: &Value) -> &Value {
    let cs = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(cs.len(), 1, "one container");
    &cs[0]
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or("<not a string>").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `observer daemon --help`: the environment variables it reads and its flags' defaults.
fn daemon_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_observer"))
        .args(["daemon", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn daemon_env_vars() -> BTreeSet<String> {
    let help = daemon_help();
    let vars: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|s| s.split(['=', ']']).next().unwrap().to_string())
        .collect();
    assert!(
        vars.contains("OBSERVER_LOG") && vars.contains("NODE_NAME"),
        "{help}"
    );
    vars
}

/// The default of a daemon flag as `--help` shows it.
fn daemon_default(flag: &str) -> String {
    let help = daemon_help();
    let at = help
        .find(&format!("--{flag} "))
        .unwrap_or_else(|| panic!("--{flag} in {help}"));
    let rest = &help[at..];
    let d = &rest[rest.find("[default: ").expect("a default") + "[default: ".len()..];
    d[..d.find(']').unwrap()].to_string()
}

// ---------------------------------------------------------------------------------------------
// Every document

/// The name of a document: `metadata.name`, or for a kind cluster config (whose schema has no
/// metadata) its top-level `name`.
fn doc_name(v: &Value) -> Result<String, String> {
    let api = v["apiVersion"].as_str().unwrap_or_default();
    if api.is_empty() {
        return Err("no apiVersion".into());
    }
    if v["kind"].as_str().unwrap_or_default().is_empty() {
        return Err("no kind".into());
    }
    let name = if api.starts_with("kind.x-k8s.io/") {
        &v["name"]
    } else {
        &v["metadata"]["name"]
    };
    match name.as_str() {
        Some(n) if !n.is_empty() => Ok(n.to_string()),
        _ => Err("no metadata.name".into()),
    }
}

#[test]
fn every_document_parses_and_is_named() {
    let mut seen = BTreeSet::new();
    for d in all_docs() {
        let name = doc_name(&d.value).unwrap_or_else(|e| panic!("{}: {e}", d.origin));
        seen.insert((d.value["kind"].as_str().unwrap().to_string(), name));
    }
    for (kind, name) in [
        ("Namespace", "observer"),
        ("ServiceAccount", "observer"),
        ("ClusterRole", "observer"),
        ("ClusterRoleBinding", "observer"),
        ("ConfigMap", "observer-config"),
        ("DaemonSet", "observer"),
        ("Kustomization", "observer"),
        ("Cluster", "observer"),
    ] {
        assert!(
            seen.contains(&(kind.to_string(), name.to_string())),
            "{kind} {name} missing: {seen:?}"
        );
    }
    // Broken copies are rejected.
    assert!(doc_name(&json!({"kind": "ConfigMap", "metadata": {"name": "x"}})).is_err());
    assert!(doc_name(&json!({"apiVersion": "v1", "metadata": {"name": "x"}})).is_err());
    assert!(doc_name(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}})).is_err());
    assert!(doc_name(&json!({"apiVersion": "kind.x-k8s.io/v1alpha4", "kind": "Cluster"})).is_err());
    assert!(parse_docs("broken", "a: [1, 2\n").is_err());
}

/// Parses `v` as the Kubernetes type `T` and back: a field the API does not know (a typo) or a
/// value of the wrong type is lost or refused on the way.
fn roundtrip<T: DeserializeOwned + Serialize>(v: &Value) -> Check {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back == v {
        return Ok(());
    }
    Err(format!(
        "fields unknown to the Kubernetes API: {}",
        diff(v, &back)
    ))
}

/// The first path where `a` has something `b` does not.
fn diff(a: &Value, b: &Value) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    None => return format!(".{k}"),
                    Some(w) if v != w => return format!(".{k}{}", diff(v, w)),
                    _ => {}
                }
            }
            String::new()
        }
        (Value::Array(x), Value::Array(y)) => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                if v != w {
                    return format!("[{i}]{}", diff(v, w));
                }
            }
            String::new()
        }
        _ => format!(" = {a} (read back as {b})"),
    }
}

fn known_fields(v: &Value) -> Check {
    use k8s_openapi::api::{apps, core, networking, rbac};
    match v["kind"].as_str().unwrap_or_default() {
        "Namespace" => roundtrip::<core::v1::Namespace>(v),
        "ServiceAccount" => roundtrip::<core::v1::ServiceAccount>(v),
        "ConfigMap" => roundtrip::<core::v1::ConfigMap>(v),
        "Service" => roundtrip::<core::v1::Service>(v),
        "Pod" => roundtrip::<core::v1::Pod>(v),
        "ClusterRole" => roundtrip::<rbac::v1::ClusterRole>(v),
        "ClusterRoleBinding" => roundtrip::<rbac::v1::ClusterRoleBinding>(v),
        "DaemonSet" => roundtrip::<apps::v1::DaemonSet>(v),
        "Deployment" => roundtrip::<apps::v1::Deployment>(v),
        "NetworkPolicy" => roundtrip::<networking::v1::NetworkPolicy>(v),
        // Not Kubernetes API objects: kustomize's and kind's own configuration.
        "Kustomization" | "Component" | "Cluster" => Ok(()),
        other => Err(format!("unexpected kind {other}: add it to known_fields")),
    }
}

#[test]
fn kubernetes_objects_use_only_known_fields() {
    for d in all_docs() {
        known_fields(&d.value).unwrap_or_else(|e| panic!("{}: {e}", d.origin));
    }
    let mut ds = daemonset();
    ds["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    let e = known_fields(&ds).unwrap_err();
    assert!(e.contains("hostNetwrok"), "{e}");
    let mut ds = daemonset();
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = json!("no");
    assert!(known_fields(&ds).is_err());
}

// ---------------------------------------------------------------------------------------------
// RBAC

/// The ClusterRole grants exactly `WATCHED` with exactly `VERBS`: no other resource, verb,
/// wildcard, resourceNames or non-resource URL.
fn check_role(role: &Value) -> Check {
    let want_verbs: BTreeSet<String> = VERBS.iter().map(|v| v.to_string()).collect();
    let want: BTreeSet<(String, String)> = WATCHED
        .iter()
        .map(|w| (w.group.to_string(), w.resource.to_string()))
        .collect();
    let mut granted = BTreeSet::new();
    let rules = role["rules"].as_array().ok_or("no rules")?;
    for (i, r) in rules.iter().enumerate() {
        for key in r.as_object().ok_or("rule is not a map")?.keys() {
            if !["apiGroups", "resources", "verbs"].contains(&key.as_str()) {
                return Err(format!("rule {i}: unexpected {key}"));
            }
        }
        let verbs: BTreeSet<String> = strs(&r["verbs"]).into_iter().collect();
        if verbs != want_verbs || strs(&r["verbs"]).len() != verbs.len() {
            return Err(format!(
                "rule {i}: verbs {verbs:?}, want exactly {want_verbs:?}"
            ));
        }
        for g in strs(&r["apiGroups"]) {
            for res in strs(&r["resources"]) {
                if g.contains('*') || res.contains('*') {
                    return Err(format!("rule {i}: wildcard {g:?}/{res:?}"));
                }
                if !granted.insert((g.clone(), res.clone())) {
                    return Err(format!("rule {i}: {g:?}/{res} granted twice"));
                }
            }
        }
    }
    if granted != want {
        return Err(format!(
            "grants {granted:?}, the daemon watches exactly {want:?}"
        ));
    }
    Ok(())
}

#[test]
fn cluster_role_grants_exactly_the_watched_resources_read_only() {
    let role = find("ClusterRole", "observer");
    check_role(&role).unwrap();

    let broken = |f: &dyn Fn(&mut Value)| {
        let mut r = role.clone();
        f(&mut r);
        check_role(&r).unwrap_err()
    };
    let e = broken(&|r| {
        r["rules"][0]["verbs"]
            .as_array_mut()
            .unwrap()
            .push(json!("create"))
    });
    assert!(e.contains("verbs"), "{e}");
    broken(&|r| r["rules"][0]["verbs"] = json!(["*"]));
    broken(&|r| r["rules"][0]["verbs"] = json!(["get", "list"]));
    let e = broken(&|r| {
        r["rules"][0]["resources"]
            .as_array_mut()
            .unwrap()
            .push(json!("secrets"))
    });
    assert!(e.contains("secrets"), "{e}");
    broken(&|r| r["rules"][0]["resources"] = json!(["*"]));
    broken(&|r| r["rules"][1]["apiGroups"] = json!(["*"]));
    broken(&|r| r["rules"][0]["resourceNames"] = json!(["x"]));
    let e = broken(&|r| {
        r["rules"].as_array_mut().unwrap().pop();
    });
    assert!(e.contains("networkpolicies"), "{e}");
    broken(&|r| {
        r["rules"].as_array_mut().unwrap().push(json!({
            "nonResourceURLs": ["/metrics"], "verbs": ["get", "list", "watch"]
        }))
    });
}

#[test]
fn the_binding_gives_the_role_to_the_daemonsets_service_account() {
    let b = find("ClusterRoleBinding", "observer");
    let ds = daemonset();
    let sa = find("ServiceAccount", "observer");
    assert_eq!(b["roleRef"]["kind"], "ClusterRole");
    assert_eq!(b["roleRef"]["name"], "observer");
    assert_eq!(b["roleRef"]["apiGroup"], "rbac.authorization.k8s.io");
    assert_eq!(
        b["subjects"],
        json!([{"kind": "ServiceAccount", "name": "observer", "namespace": "observer"}])
    );
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "observer"
    );
    assert_eq!(sa["metadata"]["namespace"], "observer");
    assert_eq!(ds["metadata"]["namespace"], "observer");
    find("Namespace", "observer");
}

// ---------------------------------------------------------------------------------------------
// DaemonSet

/// Capabilities add exactly `caps::REQUIRED`, drop ALL, and nothing privileged.
fn check_security(ds: &Value) -> Check {
    let pod = &ds["spec"]["template"]["spec"];
    let sc = &container(ds)["securityContext"];
    let want: Vec<&str> = caps::REQUIRED.iter().map(|c| c.k8s_name()).collect();
    let mut add = strs(&sc["capabilities"]["add"]);
    add.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    if add != want_sorted {
        return Err(format!("capabilities.add {add:?}, want exactly {want:?}"));
    }
    if strs(&sc["capabilities"]["drop"]) != ["ALL"] {
        return Err("capabilities.drop must be [ALL]".into());
    }
    if sc["privileged"] != json!(false) {
        return Err("privileged must be false".into());
    }
    if sc["allowPrivilegeEscalation"] != json!(false) {
        return Err("allowPrivilegeEscalation must be false".into());
    }
    if sc["readOnlyRootFilesystem"] != json!(true) {
        return Err("readOnlyRootFilesystem must be true".into());
    }
    for k in ["hostPID", "hostIPC"] {
        if pod[k] == json!(true) {
            return Err(format!("{k} is not needed"));
        }
    }
    if pod["hostNetwork"] != json!(true) {
        return Err("hostNetwork: the pod veths are in the node's network namespace".into());
    }
    Ok(())
}

#[test]
fn daemonset_grants_exactly_the_required_capabilities() {
    let ds = daemonset();
    check_security(&ds).unwrap();
    let broken = |f: &dyn Fn(&mut Value)| {
        let mut d = ds.clone();
        f(&mut d["spec"]["template"]["spec"]["containers"][0]["securityContext"]);
        check_security(&d).unwrap_err()
    };
    broken(&|s| {
        s["capabilities"]["add"]
            .as_array_mut()
            .unwrap()
            .push(json!("SYS_ADMIN"))
    });
    broken(&|s| {
        s["capabilities"]["add"].as_array_mut().unwrap().pop();
    });
    broken(&|s| s["capabilities"]["add"] = json!(["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]));
    broken(&|s| s["capabilities"]["drop"] = json!([]));
    broken(&|s| s["privileged"] = json!(true));
    broken(&|s| {
        s.as_object_mut().unwrap().remove("privileged");
    });
    broken(&|s| s["allowPrivilegeEscalation"] = json!(true));
    broken(&|s| s["readOnlyRootFilesystem"] = json!(false));
}

/// The hostPath behind a container's mount at `path`.
fn host_path_at(ds: &Value, path: &str) -> Result<String, String> {
    let m = container(ds)["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == path)
        .ok_or(format!("nothing mounted at {path}"))?;
    if m["mountPropagation"] == "Bidirectional" {
        return Err(format!(
            "{path}: Bidirectional propagation needs a privileged container"
        ));
    }
    if m["readOnly"] == json!(true) {
        return Err(format!("{path} must be writable"));
    }
    let vol = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == m["name"])
        .ok_or(format!("no volume {}", m["name"]))?;
    vol["hostPath"]["path"]
        .as_str()
        .map(str::to_string)
        .ok_or(format!("{path} is not a hostPath volume"))
}

fn env_value(ds: &Value, name: &str) -> Option<Value> {
    container(ds)["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .cloned()
}

/// The node's bpffs (parent of the pin dir) and the socket's directory are the host's, and the
/// daemon is told to use exactly those.
fn check_mounts(ds: &Value, pin_dir: &str, socket: &str, state_dir: &str) -> Check {
    let bpffs = Path::new(pin_dir).parent().unwrap().to_str().unwrap();
    let run = Path::new(socket).parent().unwrap().to_str().unwrap();
    for (dir, what) in [(bpffs, "bpffs"), (run, "socket dir")] {
        let host = host_path_at(ds, dir)?;
        if host != dir {
            return Err(format!("{what} {dir} mounted from the host's {host}"));
        }
    }
    if !Path::new(state_dir).starts_with(run) {
        return Err(format!("state dir {state_dir} is not on the {run} mount"));
    }
    for (var, want) in [
        ("OBSERVER_PIN_DIR", pin_dir),
        ("OBSERVER_SOCKET", socket),
        ("OBSERVER_STATE_DIR", state_dir),
    ] {
        match env_value(ds, var) {
            Some(e) if e["value"] == want => {}
            Some(e) => return Err(format!("{var} is {}, want {want}", e["value"])),
            None => {} // the daemon's default applies
        }
    }
    Ok(())
}

#[test]
fn daemonset_mounts_the_bpffs_and_the_socket_dir_of_the_host() {
    let ds = daemonset();
    let pin = observer::bpf::DEFAULT_PIN_DIR;
    let socket = daemon_default("socket");
    let state = daemon_default("state-dir");
    assert_eq!(Path::new(pin).parent().unwrap(), Path::new("/sys/fs/bpf"));
    assert_eq!(socket, "/run/observer/observer.sock");
    check_mounts(&ds, pin, &socket, &state).unwrap();

    let vols = &ds["spec"]["template"]["spec"]["volumes"];
    let by_path = |p: &str| {
        vols.as_array()
            .unwrap()
            .iter()
            .find(|v| v["hostPath"]["path"] == p)
            .cloned()
            .unwrap()
    };
    // bpffs must already be mounted by the node (the container cannot mount it).
    assert_eq!(by_path("/sys/fs/bpf")["hostPath"]["type"], "Directory");

    // A moved pin dir, a missing mount, a private copy of the socket dir are rejected.
    assert!(check_mounts(&ds, "/var/lib/observer/pins", &socket, &state).is_err());
    assert!(check_mounts(&ds, pin, &socket, "/var/lib/observer/state").is_err());
    let mut d = ds.clone();
    d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["mountPath"] != "/sys/fs/bpf");
    assert!(check_mounts(&d, pin, &socket, &state).is_err());
    let mut d = ds.clone();
    for v in d["spec"]["template"]["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
    {
        if v["hostPath"]["path"] == "/run/observer" {
            v["hostPath"]["path"] = json!("/var/run/other");
        }
    }
    assert!(check_mounts(&d, pin, &socket, &state).is_err());
    let mut d = ds.clone();
    d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPropagation"] =
        json!("Bidirectional");
    assert!(check_mounts(&d, pin, &socket, &state).is_err());
}

/// NODE_NAME from the downward API, `--source kube`, and probes on `/healthz` and `/readyz` at
/// the port `--metrics-addr` binds.
fn check_daemon_args_and_probes(ds: &Value) -> Check {
    let c = container(ds);
    let node = env_value(ds, "NODE_NAME").ok_or("no NODE_NAME")?;
    if node["valueFrom"]["fieldRef"]["fieldPath"] != "spec.nodeName" {
        return Err("NODE_NAME must come from spec.nodeName".into());
    }
    let args = strs(&c["args"]);
    if args.first().map(String::as_str) != Some("daemon") {
        return Err(format!("args {args:?} do not start with `daemon`"));
    }
    let source = args
        .iter()
        .position(|a| a == "--source")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--source=").map(str::to_string))
        });
    if source.as_deref() != Some("kube") {
        return Err(format!("--source is {source:?}, want kube"));
    }
    let addr = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .ok_or("no --metrics-addr=")?;
    let (host, port) = addr.rsplit_once(':').ok_or("--metrics-addr without port")?;
    if host != "$(HOST_IP)" {
        return Err(format!(
            "--metrics-addr host {host}: bind the node's IP only"
        ));
    }
    let host_ip = env_value(ds, "HOST_IP").ok_or("no HOST_IP")?;
    if host_ip["valueFrom"]["fieldRef"]["fieldPath"] != "status.hostIP" {
        return Err("HOST_IP must come from status.hostIP".into());
    }
    let port: i64 = port.parse().map_err(|_| format!("port {port}"))?;
    let resolve = |p: &Value| -> Option<i64> {
        p.as_i64().or_else(|| {
            c["ports"].as_array()?.iter().find(|cp| cp["name"] == *p)?["containerPort"].as_i64()
        })
    };
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        if get.is_null() && probe == "startupProbe" {
            continue;
        }
        if get["path"] != path {
            return Err(format!("{probe} path {}, want {path}", get["path"]));
        }
        if resolve(&get["port"]) != Some(port) {
            return Err(format!("{probe} port {} is not {port}", get["port"]));
        }
        if !get["host"].is_null() {
            return Err(format!(
                "{probe}: with hostNetwork the pod IP is the node IP"
            ));
        }
    }
    Ok(())
}

#[test]
fn daemonset_runs_the_kube_source_with_node_name_and_probes_the_metrics_port() {
    let ds = daemonset();
    check_daemon_args_and_probes(&ds).unwrap();
    let broken = |f: &dyn Fn(&mut Value)| {
        let mut d = ds.clone();
        f(&mut d["spec"]["template"]["spec"]["containers"][0]);
        check_daemon_args_and_probes(&d).unwrap_err()
    };
    broken(&|c| c["readinessProbe"]["httpGet"]["path"] = json!("/healthz"));
    broken(&|c| c["livenessProbe"]["httpGet"]["path"] = json!("/metrics"));
    broken(&|c| c["livenessProbe"]["httpGet"]["port"] = json!(9100));
    broken(&|c| c["ports"][0]["containerPort"] = json!(9100));
    broken(&|c| {
        for a in c["args"].as_array_mut().unwrap() {
            if a == "kube" {
                *a = json!("none");
            }
        }
    });
    broken(&|c| {
        for a in c["args"].as_array_mut().unwrap() {
            if a.as_str().unwrap().starts_with("--metrics-addr") {
                *a = json!("--metrics-addr=0.0.0.0:9965");
            }
        }
    });
    broken(&|c| {
        for e in c["env"].as_array_mut().unwrap() {
            if e["name"] == "NODE_NAME" {
                e["valueFrom"]["fieldRef"]["fieldPath"] = json!("metadata.name");
            }
        }
    });
}

#[test]
fn daemonset_runs_on_every_linux_node() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert!(pod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t == &json!({"operator": "Exists"})));
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    let c = container(&ds);
    assert!(c["resources"]["limits"]["cpu"].is_null(), "no CPU limit");
    assert!(!c["resources"]["limits"]["memory"].is_null());
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
}

// ---------------------------------------------------------------------------------------------
// ConfigMap

/// Every key is an environment variable the daemon reads, with a value of the right form, and
/// every variable the daemon reads is set by the DaemonSet or the ConfigMap or mentioned in the
/// ConfigMap's comments.
fn check_config(cm: &Value, cm_text: &str, ds: &Value, vars: &BTreeSet<String>) -> Check {
    let data = cm["data"].as_object().ok_or("no data")?;
    for (k, v) in data {
        if !vars.contains(k) {
            return Err(format!("{k} is not read by `observer daemon`"));
        }
        let v = v.as_str().ok_or(format!("{k}: not a string"))?;
        let ok = if k.ends_with("_INTERVAL") || k.ends_with("_TIMEOUT") || k.ends_with("_GRACE") {
            humantime::parse_duration(v).is_ok()
        } else if [
            "OBSERVER_NO_ENFORCE",
            "OBSERVER_AUDIT",
            "OBSERVER_IPBLOCK_MATCHES_PODS",
            "OBSERVER_NO_POD_METRICS",
        ]
        .contains(&k.as_str())
        {
            v == "true" || v == "false"
        } else if k == "OBSERVER_HISTORY" || k.starts_with("OBSERVER_MAX_") || k.contains("_MAX_") {
            v.parse::<u64>().is_ok()
        } else {
            !v.is_empty()
        };
        if !ok {
            return Err(format!("{k}: {v:?} is not a valid value"));
        }
    }
    let in_ds: BTreeSet<String> = container(ds)["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect();
    let in_args = strs(&container(ds)["args"]).join(" ");
    for var in vars {
        let flag_in_args = match var.as_str() {
            "OBSERVER_SOURCE" => in_args.contains("--source"),
            "OBSERVER_METRICS_ADDR" => in_args.contains("--metrics-addr"),
            _ => false,
        };
        if !data.contains_key(var)
            && !in_ds.contains(var)
            && !flag_in_args
            && !cm_text.contains(var.as_str())
        {
            return Err(format!("{var} is neither set nor documented"));
        }
    }
    let from = &container(ds)["envFrom"];
    if !from
        .as_array()
        .into_iter()
        .flatten()
        .any(|f| f["configMapRef"]["name"] == cm["metadata"]["name"])
    {
        return Err("the DaemonSet does not load the ConfigMap".into());
    }
    Ok(())
}

#[test]
fn configmap_sets_only_settings_the_daemon_reads() {
    let cm = find("ConfigMap", "observer-config");
    let text = std::fs::read_to_string(manifests_dir().join("configmap.yaml")).unwrap();
    let ds = daemonset();
    let vars = daemon_env_vars();
    check_config(&cm, &text, &ds, &vars).unwrap();
    assert_eq!(cm["data"]["OBSERVER_UPLINKS"], "eth0");
    assert_eq!(cm["data"]["OBSERVER_AUDIT"], "false");

    let broken = |f: &dyn Fn(&mut Value)| {
        let mut c = cm.clone();
        f(&mut c);
        check_config(&c, &text, &ds, &vars).unwrap_err()
    };
    let e = broken(&|c| c["data"]["OBSERVER_REPORT_INTERVALL"] = json!("10s"));
    assert!(e.contains("OBSERVER_REPORT_INTERVALL"), "{e}");
    broken(&|c| c["data"]["OBSERVER_REPORT_INTERVAL"] = json!("ten seconds"));
    broken(&|c| c["data"]["OBSERVER_AUDIT"] = json!("no"));
    broken(&|c| c["data"]["OBSERVER_HISTORY"] = json!("lots"));
    broken(&|c| c["metadata"]["name"] = json!("renamed"));
    let mut more = vars.clone();
    more.insert("OBSERVER_NEW_SETTING".into());
    assert!(check_config(&cm, &text, &ds, &more).is_err());
}

// ---------------------------------------------------------------------------------------------
// kustomize and kind

/// Files that are not applied with `kubectl apply -k manifests/`: kind's cluster config, the
/// sample app of manifests/kind/README.md, and the Hubble component (`manifests/hubble/`, which
/// users add to a kustomization of their own).
const NOT_IN_KUSTOMIZATION: &[&str] = &[
    "kind/cluster.yaml",
    "kind/sample-app.yaml",
    "hubble/kustomization.yaml",
    "hubble/hubble-peer.yaml",
];

fn check_listing(listed: &[String], present: &BTreeSet<String>) -> Check {
    let set: BTreeSet<String> = listed.iter().cloned().collect();
    if set.len() != listed.len() {
        return Err(format!("duplicates in {listed:?}"));
    }
    let want: BTreeSet<String> = present
        .iter()
        .filter(|f| *f != "kustomization.yaml" && !NOT_IN_KUSTOMIZATION.contains(&f.as_str()))
        .cloned()
        .collect();
    if set != want {
        return Err(format!(
            "kustomization lists {set:?}; the manifests are {want:?}"
        ));
    }
    Ok(())
}

#[test]
fn kustomization_lists_every_manifest_and_only_those() {
    let k = find("Kustomization", "observer");
    let mut files = Vec::new();
    yaml_files(&manifests_dir(), &mut files);
    let present: BTreeSet<String> = files.iter().map(|f| rel(f)).collect();
    for f in NOT_IN_KUSTOMIZATION {
        assert!(present.contains(*f), "{f}");
    }
    let listed = strs(&k["resources"]);
    check_listing(&listed, &present).unwrap();

    let mut extra = present.clone();
    extra.insert("networkpolicy.yaml".into());
    assert!(check_listing(&listed, &extra).is_err());
    assert!(check_listing(&listed[1..], &present).is_err());
    let mut dup = listed.clone();
    dup.push(listed[0].clone());
    assert!(check_listing(&dup, &present).is_err());

    // `images:` overrides the DaemonSet's image.
    let image = container(&daemonset())["image"]
        .as_str()
        .unwrap()
        .to_string();
    let (name, tag) = image.rsplit_once(':').unwrap();
    assert_eq!(k["images"][0]["name"], name);
    assert_eq!(k["images"][0]["newTag"], tag);
    assert_eq!(image, "ghcr.io/observer-dev/observer:0.1.0");
}

#[test]
fn kind_cluster_has_one_control_plane_two_workers_and_no_bundled_kindnet() {
    let c = all_docs()
        .into_iter()
        .find(|d| d.value["kind"] == "Cluster")
        .unwrap()
        .value;
    assert_eq!(c["apiVersion"], "kind.x-k8s.io/v1alpha4");
    let roles = strs(
        &c["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["role"].clone())
            .collect::<Value>(),
    );
    assert_eq!(roles, ["control-plane", "worker", "worker"]);
    // The bundled kindnet enforces NetworkPolicy with no switch to turn it off: the README
    // installs the standalone kindnet with --network-policy=false instead.
    assert_eq!(c["networking"]["disableDefaultCNI"], true);
    let readme = std::fs::read_to_string(manifests_dir().join("kind/README.md")).unwrap();
    assert!(readme.contains("--network-policy=false"));
    assert!(readme.contains("kind create cluster --config manifests/kind/cluster.yaml"));
}

// ---------------------------------------------------------------------------------------------
// docs/deploy.md

/// The capability table of docs/deploy.md: one row per `caps::REQUIRED` entry, saying what the
/// code says it is for, and no other row.
fn check_caps_table(doc: &str) -> Check {
    let section = doc
        .split("### Capabilities")
        .nth(1)
        .ok_or("no ### Capabilities section")?;
    let section = section.split("\n### ").next().unwrap();
    let rows: Vec<&str> = section.lines().filter(|l| l.starts_with("| `")).collect();
    if rows.len() != caps::REQUIRED.len() {
        return Err(format!(
            "{} capability rows, REQUIRED has {}",
            rows.len(),
            caps::REQUIRED.len()
        ));
    }
    for c in caps::REQUIRED {
        let start = format!("| `{}` | {} |", c.k8s_name(), c.why);
        if !rows.iter().any(|r| r.starts_with(&start)) {
            return Err(format!("no row starting {start:?}"));
        }
    }
    Ok(())
}

#[test]
fn deploy_docs_list_exactly_the_required_capabilities_with_their_reasons() {
    let doc = std::fs::read_to_string(manifests_dir().join("../docs/deploy.md")).unwrap();
    check_caps_table(&doc).unwrap();
    assert!(check_caps_table(&doc.replace("| `PERFMON` |", "| `SYS_ADMIN` |")).is_err());
    assert!(check_caps_table(&doc.replace(caps::BPF.why, "eBPF")).is_err());
    let extra = doc.replacen(
        "| `BPF` |",
        "| `SYS_RESOURCE` | memlock | - |\n| `BPF` |",
        1,
    );
    assert!(check_caps_table(&extra).is_err());
}

/// The Hubble component: the daemon gets --hubble-listen on its node address with the TLS files
/// of the mounted Secret (variables the daemon reads), the port is declared, and hubble-peer
/// reaches that port on the observer pods of the caller's node.
#[test]
fn hubble_overlay_serves_the_api_with_mutual_tls_and_the_peer_service() {
    let k = find("Component", "observer-hubble");
    assert_eq!(strs(&k["resources"]), ["hubble-peer.yaml"]);
    let patch = &k["patches"][0];
    assert_eq!(patch["target"]["kind"], "DaemonSet");
    assert_eq!(patch["target"]["name"], "observer");
    let ops: Vec<Value> = serde_norway::from_str(patch["patch"].as_str().unwrap()).unwrap();
    let added = |path: &str| -> Vec<Value> {
        ops.iter()
            .filter(|o| o["op"] == "add" && o["path"] == path)
            .map(|o| o["value"].clone())
            .collect()
    };
    let env = added("/spec/template/spec/containers/0/env/-");
    let vars = daemon_env_vars();
    let value_of = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{name} not set"))
            .to_string()
    };
    for e in &env {
        let name = e["name"].as_str().unwrap();
        assert!(vars.contains(name), "the daemon does not read {name}");
    }
    // On the node's own address, like the metrics (HOST_IP is defined before it).
    assert_eq!(value_of("OBSERVER_HUBBLE_LISTEN"), "$(HOST_IP):4244");
    let mounts = added("/spec/template/spec/containers/0/volumeMounts/-");
    let volumes = added("/spec/template/spec/volumes/-");
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0]["readOnly"], true);
    let dir = mounts[0]["mountPath"].as_str().unwrap();
    assert_eq!(volumes[0]["name"], mounts[0]["name"]);
    assert_eq!(volumes[0]["secret"]["secretName"], "observer-hubble-tls");
    for (var, file) in [
        ("OBSERVER_TLS_CERT", "tls.crt"),
        ("OBSERVER_TLS_KEY", "tls.key"),
        ("OBSERVER_TLS_CLIENT_CA", "ca.crt"),
    ] {
        assert_eq!(value_of(var), format!("{dir}/{file}"));
    }
    let ports = added("/spec/template/spec/containers/0/ports/-");
    assert_eq!(ports[0]["containerPort"], 4244);

    let svc = find("Service", "hubble-peer");
    assert_eq!(svc["metadata"]["namespace"], "observer");
    assert_eq!(svc["spec"]["internalTrafficPolicy"], "Local");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 4244);
    let pod_labels = &daemonset()["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "hubble-peer selects {k}={v}");
    }
}
