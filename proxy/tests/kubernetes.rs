//! The Kubernetes manifests of `istio/`, checked without a cluster:
//! - every object against the Kubernetes JSON schemas, strictly (an unknown field fails), with
//!   `kubernetes-validate` (PyPI; `scripts/install-envoy` puts it in `target/envoy-venv`), for
//!   an older and the newest Kubernetes release it bundles;
//! - every `tollgate.yaml` embedded in a ConfigMap with `tollgate check`;
//! - that they fit together: each `secretKeyRef` names a Secret and key of `secrets.yaml` in the
//!   pod's namespace, no token is written inline, each variable a config names
//!   (`admin.token_env`, `chargeback.export.token_env`) is set in the container that mounts it,
//!   and the Redis and collector addresses name Services that exist, on their ports.
//!
//! The WasmPlugin and the EnvoyFilter are custom resources, which the Kubernetes schemas do not
//! cover: `scripts/validate-manifests` checks them (the WasmPlugin against
//! `istio/testdata/istio-wasmplugin-crd.yaml`).

use std::path::{Path, PathBuf};
use std::process::Command;

use tollgate_core::doc::{self, Node, Value};
use tollgate_e2e::harness::temp_dir;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// An older release (so that nothing relies on a field added lately) and the newest one the
/// package bundles.
const KUBERNETES: [&str; 2] = ["1.31.0", "1.37.0"];

/// Kinds defined by custom resource definitions, and where each is checked instead.
const CUSTOM_KINDS: [(&str, &str); 2] = [
    ("WasmPlugin", "scripts/validate-manifests, against istio/testdata/istio-wasmplugin-crd.yaml"),
    ("EnvoyFilter", "scripts/validate-manifests and wasm-filter/tests/manifests.rs"),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every Kubernetes manifest of `istio/` (`testdata/` holds a CRD, not a manifest).
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("istio"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn validator() -> PathBuf {
    let path = repo().join("target/envoy-venv/bin/kubernetes-validate");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/install-envoy (scripts/test does), which installs the PyPI \
         package kubernetes-validate there",
        path.display()
    );
    path
}

/// The YAML documents of a manifest file, parsed by the core's YAML loader.
fn documents(path: &Path) -> Vec<Node> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let node = doc::parse(&current).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if node.value != Value::Null {
                docs.push(node);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs
}

fn get<'a>(node: &'a Node, key: &str) -> Option<&'a Node> {
    match &node.value {
        Value::Map(entries) => {
            entries.iter().find(|(k, _)| k.scalar() == Some(key)).map(|(_, v)| v)
        }
        _ => None,
    }
}

/// The scalar at `path` (keys separated by `.`), or "".
fn text<'a>(node: &'a Node, path: &str) -> &'a str {
    let mut at = node;
    for key in path.split('.') {
        match get(at, key) {
            Some(next) => at = next,
            None => return "",
        }
    }
    at.scalar().unwrap_or("")
}

fn items(node: Option<&Node>) -> &[Node] {
    match node.map(|n| &n.value) {
        Some(Value::Seq(items)) => items,
        _ => &[],
    }
}

fn entries(node: Option<&Node>) -> &[(Node, Node)] {
    match node.map(|n| &n.value) {
        Some(Value::Map(entries)) => entries,
        _ => &[],
    }
}

/// Validates `file` strictly against each of [`KUBERNETES`]: `Ok(objects validated)`, or the
/// validator's report. Custom kinds must be reported as such (no schema), nothing else may be.
fn validate(file: &Path) -> Result<usize, String> {
    let mut command = Command::new(validator());
    command.arg("--strict");
    for version in KUBERNETES {
        command.args(["-k", version]);
    }
    let out = command.arg(file).output().unwrap();
    let report =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(report);
    }
    let docs = documents(file);
    let custom = |kind: &str| CUSTOM_KINDS.iter().any(|(k, _)| *k == kind);
    let plain = docs.iter().filter(|d| !custom(text(d, "kind"))).count();
    let passed = report.lines().filter(|l| l.contains(" passed for resource ")).count();
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|l| !l.contains(" passed for resource "))
        .filter(|l| !CUSTOM_KINDS.iter().any(|(k, _)| l.contains(&format!("schema for kind {k} "))))
        .collect();
    if passed != plain * KUBERNETES.len() || !unexpected.is_empty() {
        return Err(format!(
            "{plain} object(s) x {} versions should pass, {passed} did:\n{report}",
            KUBERNETES.len()
        ));
    }
    Ok(plain)
}

#[test]
fn every_manifest_passes_the_kubernetes_schemas_strictly() {
    let mut kinds = Vec::new();
    for file in manifests() {
        if let Err(report) = validate(&file) {
            panic!("{}:\n{report}", file.display());
        }
        kinds.extend(documents(&file).iter().map(|d| text(d, "kind").to_string()));
    }
    for kind in [
        "Deployment",
        "ConfigMap",
        "Secret",
        "StatefulSet",
        "Service",
        "PersistentVolumeClaim",
        "NetworkPolicy",
        "WasmPlugin",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} among {kinds:?}");
    }
}

/// The check above fails on what `kubectl apply --validate=strict` would refuse: an unknown
/// field, a value of the wrong type, a missing required field; and does not take a document of
/// an unknown kind for a pass.
#[test]
fn the_schema_check_fails_on_a_broken_manifest() {
    let dir = temp_dir("k8s-bad");
    let good = std::fs::read_to_string(repo().join("istio/collector.yaml")).unwrap();
    let cases = [
        // An unknown field in the pod template (a typo of `readinessProbe`).
        ("readinessProbe:", "readynessProbe:", "readynessProbe"),
        // A port that must be a number.
        ("containerPort: 9090", "containerPort: \"nine\"", "nine"),
        // A Service port without its required number.
        ("port: 9090, targetPort: admin", "targetPort: admin", "port"),
    ];
    assert!(validate(&repo().join("istio/collector.yaml")).is_ok());
    for (i, (from, to, named)) in cases.iter().enumerate() {
        assert!(good.contains(from), "collector.yaml no longer has `{from}`");
        let file = dir.join(format!("bad-{i}.yaml"));
        std::fs::write(&file, good.replacen(from, to, 1)).unwrap();
        let report = validate(&file).expect_err(to);
        assert!(report.contains(named), "the report should name `{named}`:\n{report}");
    }
    // A kind with no schema is a warning to kubernetes-validate (exit 0), not a pass.
    let file = dir.join("unknown-kind.yaml");
    std::fs::write(&file, "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
        .unwrap();
    let report = validate(&file).expect_err("an unknown kind");
    assert!(report.contains("Widget"), "{report}");
}

/// Every `tollgate.yaml` embedded in a ConfigMap of `istio/`: its namespace and name, and the
/// text.
fn embedded_configs() -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for file in manifests() {
        for d in documents(&file).iter().filter(|d| text(d, "kind") == "ConfigMap") {
            for (key, value) in entries(get(d, "data")) {
                if key.scalar() == Some("tollgate.yaml") {
                    found.push((
                        text(d, "metadata.namespace").to_string(),
                        text(d, "metadata.name").to_string(),
                        value.scalar().unwrap().to_string(),
                    ));
                }
            }
        }
    }
    found
}

/// `tollgate check FILE`: its exit code and output.
fn check(dir: &Path, name: &str, yaml: &str) -> (Option<i32>, String) {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let out =
        Command::new(BIN).arg("check").arg(&file).env_remove("TOLLGATE_CONFIG").output().unwrap();
    let output =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), output)
}

#[test]
fn every_config_in_a_configmap_passes_tollgate_check() {
    let dir = temp_dir("k8s-check");
    let configs = embedded_configs();
    let names: Vec<&str> = configs.iter().map(|(_, name, _)| name.as_str()).collect();
    assert!(names.contains(&"tollgate-config"), "{names:?}");
    assert!(names.contains(&"tollgate-collector-config"), "{names:?}");
    for (namespace, name, yaml) in &configs {
        let (code, output) = check(&dir, name, yaml);
        assert_eq!(code, Some(0), "{namespace}/{name}: tollgate check:\n{output}");
        assert!(output.starts_with("OK: "), "{output}");
    }
    // The check refuses what `tollgate run` would: a key the config does not know (an env var
    // for the Redis URL, say), named with its line.
    let (_, _, sidecar) = configs.iter().find(|(_, name, _)| name == "tollgate-config").unwrap();
    let bad = sidecar.replacen("  redis:\n", "  redis:\n    url_env: REDIS_URL\n", 1);
    assert_ne!(&bad, sidecar);
    let (code, output) = check(&dir, "bad", &bad);
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("store.redis.url_env"), "{output}");
}

/// The containers of every workload (Deployment, StatefulSet) with its namespace and volumes.
fn workloads() -> Vec<(String, Node)> {
    let mut found = Vec::new();
    for file in manifests() {
        for d in documents(&file) {
            if matches!(text(&d, "kind"), "Deployment" | "StatefulSet") {
                found.push((text(&d, "metadata.namespace").to_string(), d));
            }
        }
    }
    found
}

fn pod_spec(workload: &Node) -> &Node {
    get(get(get(workload, "spec").unwrap(), "template").unwrap(), "spec").unwrap()
}

#[test]
fn tokens_come_from_the_secrets_and_every_named_variable_is_set() {
    // The Secrets: (namespace, name, key).
    let mut secrets = Vec::new();
    for d in documents(&repo().join("istio/secrets.yaml")) {
        assert_eq!(text(&d, "kind"), "Secret");
        for (key, _) in entries(get(&d, "stringData")) {
            secrets.push((
                text(&d, "metadata.namespace").to_string(),
                text(&d, "metadata.name").to_string(),
                key.scalar().unwrap().to_string(),
            ));
        }
    }
    let configs = embedded_configs();
    let mut referenced = 0;
    let mut configured = 0;
    for (namespace, workload) in workloads() {
        let spec = pod_spec(&workload);
        let config_maps: Vec<(&str, &str)> = items(get(spec, "volumes"))
            .iter()
            .filter_map(|v| Some((text(v, "name"), get(v, "configMap").map(|c| text(c, "name"))?)))
            .collect();
        for container in items(get(spec, "containers")) {
            let who = format!(
                "{namespace}/{}: {}",
                text(&workload, "metadata.name"),
                text(container, "name")
            );
            let mut set = Vec::new();
            for var in items(get(container, "env")) {
                let name = text(var, "name");
                set.push(name.to_string());
                if ["TOKEN", "PASSWORD", "SECRET", "KEY"].iter().any(|s| name.contains(s)) {
                    let secret = get(var, "valueFrom").and_then(|v| get(v, "secretKeyRef"));
                    let secret =
                        secret.unwrap_or_else(|| panic!("{who}: {name} is not from a Secret"));
                    let wanted = (
                        namespace.clone(),
                        text(secret, "name").to_string(),
                        text(secret, "key").to_string(),
                    );
                    assert!(
                        secrets.contains(&wanted),
                        "{who}: {name}: no Secret {wanted:?} in secrets.yaml"
                    );
                    referenced += 1;
                }
            }
            // The config it mounts names the variables it reads: they must be set.
            for mount in items(get(container, "volumeMounts")) {
                let Some((_, map)) = config_maps.iter().find(|(v, _)| *v == text(mount, "name"))
                else {
                    continue;
                };
                let (_, _, yaml) = configs
                    .iter()
                    .find(|(ns, name, _)| *ns == namespace && name == map)
                    .unwrap_or_else(|| {
                        panic!("{who}: no ConfigMap {namespace}/{map} with a tollgate.yaml")
                    });
                let config = tollgate::config::Config::from_str(yaml).unwrap();
                let mut needed = vec![config.admin_token_env.clone()];
                needed.extend(config.export.as_ref().and_then(|e| e.token_env.clone()));
                for var in needed {
                    assert!(set.contains(&var), "{who}: its config reads ${var}, which is not set");
                }
                configured += 1;
            }
        }
    }
    assert!(referenced >= 3, "expected the sidecar's two tokens and the collector's");
    assert_eq!(configured, 2, "the sidecar and the collector mount a tollgate.yaml");

    // The WasmPlugin takes its token from the Envoy sidecar's environment, never inline.
    for d in documents(&repo().join("istio/wasmplugin.yaml")) {
        let env = get(get(get(&d, "spec").unwrap(), "vmConfig").unwrap(), "env");
        assert!(!items(env).is_empty());
        for var in items(env) {
            assert_eq!(text(var, "valueFrom"), "HOST", "{}: not from the host", text(var, "name"));
            assert!(get(var, "value").is_none(), "{}: an inline value", text(var, "name"));
        }
    }
}

/// `host:port` of a URL such as `redis://host:6379/0`.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = authority.rsplit_once(':').unwrap();
    (host.to_string(), port.parse().unwrap())
}

#[test]
fn the_redis_and_collector_addresses_name_services_that_exist() {
    // (namespace, name, ports) of every Service.
    let mut services = Vec::new();
    for file in manifests() {
        for d in documents(&file).iter().filter(|d| text(d, "kind") == "Service") {
            let ports: Vec<u16> = items(get(get(d, "spec").unwrap(), "ports"))
                .iter()
                .map(|p| text(p, "port").parse().unwrap())
                .collect();
            services.push((
                text(d, "metadata.namespace").to_string(),
                text(d, "metadata.name").to_string(),
                ports,
            ));
        }
    }
    let exists = |host: &str, port: u16| {
        let (name, namespace) = host
            .strip_suffix(".svc.cluster.local")
            .and_then(|h| h.split_once('.'))
            .unwrap_or_else(|| panic!("{host}: not a Service's cluster name"));
        services.iter().any(|(ns, n, ports)| ns == namespace && n == name && ports.contains(&port))
    };
    let configs = embedded_configs();
    let (_, _, sidecar) = configs.iter().find(|(_, name, _)| name == "tollgate-config").unwrap();
    let sidecar = tollgate::config::Config::from_str(sidecar).unwrap();

    let redis = &sidecar.store.as_ref().expect("fleet mode").redis;
    assert!(!redis.cluster && redis.nodes.len() == 1, "one Redis, by `url`");
    let (host, port) = host_port(&redis.nodes[0]);
    assert!(exists(&host, port), "store.redis.url: no Service {host}:{port} in {services:?}");
    let export = sidecar.export.as_ref().expect("chargeback.export");
    let (host, port) = host_port(&export.url.to_string());
    assert!(exists(&host, port), "chargeback.export.url: no Service {host}:{port}");
    assert_eq!(export.url.path(), "/v1/usage/events");

    // The WasmPlugin's collector cluster, `outbound|PORT||HOST`.
    let plugin = std::fs::read_to_string(repo().join("istio/wasmplugin.yaml")).unwrap();
    let cluster = plugin
        .lines()
        .find_map(|l| l.trim().strip_prefix("cluster: \"outbound|"))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    let (port, host) = cluster.split_once("||").unwrap();
    assert!(
        exists(host, port.parse().unwrap()),
        "the WasmPlugin's collector: no Service {host}:{port}"
    );
    // ... the same collector the sidecars ship to.
    assert_eq!(host_port(&export.url.to_string()), (host.to_string(), port.parse().unwrap()));
}
