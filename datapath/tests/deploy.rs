//! deploy/daemonset.yaml, parsed into the Kubernetes API types (k8s-openapi): the RBAC of the
//! Kubernetes service source grants list and watch only, on exactly what it reads; the node
//! name comes from the downward API; the ConfigMap's config is one the daemon accepts.
//!
//! deploy/kustomize: the base and each overlay rendered with the real `kubectl kustomize`,
//! validated with the real `kubernetes-validate --strict`, parsed into k8s-openapi types and
//! round-tripped, then checked against the rules of issue 20 and what each overlay claims to
//! change (deploy/README.md, "Kustomize").

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use datapath::config::{Overrides, Settings, Source};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

fn documents() -> Vec<serde_json::Value> {
    let text = include_str!("../../deploy/daemonset.yaml");
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_json::Value::deserialize(d).expect("a YAML document"))
        .collect()
}

fn one<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let docs: Vec<_> = documents()
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(docs.len(), 1, "one {kind}");
    serde_json::from_value(docs[0].clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn rbac_is_list_and_watch_on_what_the_source_reads() {
    let role: ClusterRole = one("ClusterRole");
    let mut granted: Vec<(String, String, String)> = Vec::new();
    for rule in role.rules.unwrap() {
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.push((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted.sort();
    let want: Vec<(String, String, String)> = [
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
    ]
    .iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    assert_eq!(granted, want);

    let sa: ServiceAccount = one("ServiceAccount");
    let binding: ClusterRoleBinding = one("ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace, sa.metadata.namespace);

    let ds: DaemonSet = one("DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let container = &pod.containers[0];
    let node_name = container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME in the environment");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("from the downward API");
    assert_eq!(field.field_path, "spec.nodeName");
}

#[test]
fn the_configmap_config_is_accepted_with_the_kubernetes_source_on() {
    let cm: ConfigMap = one("ConfigMap");
    let text = cm.data.unwrap()["config.yaml"].clone();
    let settings = Settings::resolve(
        Some(&Source::from_text("/etc/datapath/config.yaml", text)),
        &Overrides::default(),
    )
    .unwrap();
    assert!(settings.kubernetes.enabled);
    assert_eq!(settings.kubernetes.node_name, None, "left to NODE_NAME");
}

// ---- deploy/kustomize: rendered with the real `kubectl kustomize`, validated with the real
// `kubernetes-validate --strict`, parsed into k8s-openapi types and round-tripped. ----

/// The Kubernetes version k8s-openapi is built for (feature `v1_33`), and so the schemas used.
const KUBERNETES_VERSION: &str = "1.33.0";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// CI, or a run that asked for every test: a missing tool is a failure, not a skip.
fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("DATAPATH_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
}

fn runs(program: &Path, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The first candidate that runs with `probe`; `env` overrides.
fn find_tool(env: &str, candidates: Vec<PathBuf>, probe: &[&str]) -> Option<PathBuf> {
    let candidates = match std::env::var_os(env) {
        Some(p) => vec![PathBuf::from(p)],
        None => candidates,
    };
    candidates.into_iter().find(|p| runs(p, probe))
}

struct Tools {
    kubectl: PathBuf,
    validate: PathBuf,
}

/// `kubectl` and `kubernetes-validate` (`cargo xtask setup` installs the latter into
/// target/kubernetes-validate), or `None` with the reason printed; a panic where
/// [`required`].
fn tools() -> Option<Tools> {
    let kubectl = find_tool(
        "KUBECTL",
        vec!["/usr/bin/kubectl".into(), "kubectl".into()],
        &["version", "--client"],
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let validate = find_tool(
        "KUBERNETES_VALIDATE",
        vec![
            target.join("kubernetes-validate/bin/kubernetes-validate"),
            "kubernetes-validate".into(),
        ],
        &["--version"],
    );
    match (kubectl, validate) {
        (Some(kubectl), Some(validate)) => Some(Tools { kubectl, validate }),
        (k, v) => {
            let mut missing = Vec::new();
            if k.is_none() {
                missing.push("kubectl (Debian/upstream kubectl, for `kubectl kustomize`)");
            }
            if v.is_none() {
                missing.push("kubernetes-validate (PyPI; `cargo xtask setup` installs it)");
            }
            let reason = format!("missing {}", missing.join(" and "));
            assert!(
                !required(),
                "{reason} (CI or DATAPATH_REQUIRE_PRIVILEGED=1)"
            );
            eprintln!("skipping: {reason}");
            None
        }
    }
}

fn yaml_documents(text: &str) -> Vec<serde_json::Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_json::Value::deserialize(d).expect("a YAML document"))
        .filter(|d| !d.is_null())
        .collect()
}

/// `kubectl kustomize deploy/kustomize/DIR`.
fn render(tools: &Tools, dir: &str) -> String {
    let path = workspace().join("deploy/kustomize").join(dir);
    let out = Command::new(&tools.kubectl)
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn name(doc: &serde_json::Value) -> String {
    doc["metadata"]["name"].as_str().unwrap().to_string()
}

/// `kubernetes-validate --strict` over the rendered text: every object passes against its
/// schema. It has schemas for the Kubernetes API only, and reports a kind it has none for with
/// a warning (exit 0): that is accepted for the ServiceMonitor alone, checked by
/// [`check_service_monitor`] instead.
fn validate(tools: &Tools, text: &str) -> Vec<String> {
    let mut child = Command::new(&tools.validate)
        .args(["--strict", "-k", KUBERNETES_VERSION, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubernetes-validate");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    if !out.status.success() {
        return lines;
    }
    let mut problems = Vec::new();
    let version = KUBERNETES_VERSION.rsplit_once('.').unwrap().0;
    for doc in yaml_documents(text) {
        let kind = doc["kind"].as_str().unwrap();
        let want = if kind == "ServiceMonitor" {
            "WARN - Couldn't find schema for kind ServiceMonitor with api version \
             monitoring.coreos.com/v1"
                .to_string()
        } else {
            format!(
                "INFO - passed for resource {}/{} against version {version}",
                kind.to_lowercase(),
                name(&doc)
            )
        };
        if !lines.iter().any(|l| l.starts_with(&want)) {
            problems.push(format!("no `{want}` in:\n{stdout}"));
        }
    }
    for l in &lines {
        let expected = l.starts_with("INFO - passed")
            || l.starts_with("WARN - Couldn't find schema for kind ServiceMonitor ");
        if !expected {
            problems.push(l.clone());
        }
    }
    problems
}

/// Parses `doc` as `T` and serializes it back: a field k8s-openapi does not know (a typo, a
/// wrong level) is dropped on parse and shows as a difference.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    doc: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

fn check_round_trip(doc: &serde_json::Value) -> Result<(), String> {
    let back = match doc["kind"].as_str().unwrap() {
        "ServiceAccount" => round_trip::<ServiceAccount>(doc),
        "ClusterRole" => round_trip::<ClusterRole>(doc),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc),
        "ConfigMap" => round_trip::<ConfigMap>(doc),
        "Service" => round_trip::<Service>(doc),
        "DaemonSet" => round_trip::<DaemonSet>(doc),
        // Not a Kubernetes API type: checked by check_service_monitor.
        "ServiceMonitor" => return Ok(()),
        other => return Err(format!("{other}: no k8s-openapi type mapped in this test")),
    }?;
    if &back == doc {
        Ok(())
    } else {
        Err(format!(
            "{}/{}: the round trip through k8s-openapi differs:\nrendered: {}\nround trip: {}",
            doc["kind"],
            name(doc),
            serde_json::to_string_pretty(doc).unwrap(),
            serde_json::to_string_pretty(&back).unwrap()
        ))
    }
}

/// No schema for the CRD here: the ServiceMonitor has exactly the fields this base uses, at the
/// places the Prometheus Operator reads them, and selects the metrics Service's port.
fn check_service_monitor(doc: &serde_json::Value, service: &Service) {
    assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1");
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(doc), ["apiVersion", "kind", "metadata", "spec"]);
    assert_eq!(keys(&doc["spec"]), ["endpoints", "selector"]);
    let spec = service.spec.as_ref().unwrap();
    let labels = service.metadata.labels.clone().unwrap();
    for (k, v) in doc["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(labels.get(k).map(String::as_str), v.as_str(), "label {k}");
    }
    let endpoints = doc["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(keys(&endpoints[0]), ["interval", "path", "port"]);
    assert_eq!(endpoints[0]["path"], "/metrics");
    let port = endpoints[0]["port"].as_str().unwrap();
    assert!(
        spec.ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some(port)),
        "the Service has a port named {port}"
    );
    assert_eq!(doc["metadata"]["namespace"], "kube-system");
}

/// Renders `dir`, validates and round-trips every object; the documents.
fn rendered_and_checked(tools: &Tools, dir: &str) -> Vec<serde_json::Value> {
    checked(tools, &render(tools, dir), dir)
}

/// Validates and round-trips every object of `text` (rendered from `what`); the documents.
fn checked(tools: &Tools, text: &str, what: &str) -> Vec<serde_json::Value> {
    let problems = validate(tools, text);
    assert!(
        problems.is_empty(),
        "{what}: kubernetes-validate --strict:\n{}",
        problems.join("\n")
    );
    let docs = yaml_documents(text);
    for doc in &docs {
        if let Err(e) = check_round_trip(doc) {
            panic!("{what}: {e}");
        }
    }
    if let Some(sm) = docs.iter().find(|d| d["kind"] == "ServiceMonitor") {
        check_service_monitor(sm, &typed(&docs, "Service"));
    }
    docs
}

fn typed<T: serde::de::DeserializeOwned>(docs: &[serde_json::Value], kind: &str) -> T {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    serde_json::from_value(found[0].clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn settings_of(docs: &[serde_json::Value]) -> Settings {
    let cm: ConfigMap = typed(docs, "ConfigMap");
    let text = cm.data.unwrap()["config.yaml"].clone();
    Settings::resolve(
        Some(&Source::from_text("/etc/datapath/config.yaml", text)),
        &Overrides::default(),
    )
    .unwrap_or_else(|e| panic!("the ConfigMap's config.yaml: {e:#}"))
}

/// The capabilities deploy/README.md documents (its table's `CAP_*` names, without `CAP_`).
fn documented_capabilities() -> Vec<String> {
    include_str!("../../deploy/README.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `CAP_"))
        .map(|l| l.split('`').next().unwrap().to_string())
        .collect()
}

fn pod(docs: &[serde_json::Value]) -> PodSpec {
    let ds: DaemonSet = typed(docs, "DaemonSet");
    ds.spec.unwrap().template.spec.unwrap()
}

fn daemon(pod: &PodSpec) -> &Container {
    let c = pod
        .containers
        .iter()
        .find(|c| c.name == "datapathd")
        .expect("the datapathd container");
    assert_eq!(pod.containers.len(), 1);
    c
}

/// The rules of issue 20 for the pod, on one rendering.
fn assert_pod_rules(dir: &str, docs: &[serde_json::Value]) {
    let ds: DaemonSet = typed(docs, "DaemonSet");
    let settings = settings_of(docs);
    let spec = ds.spec.clone().unwrap();
    let strategy = spec.update_strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "{dir}");
    assert_eq!(
        strategy.rolling_update.unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
        "{dir}"
    );
    let pod = pod(docs);
    assert_eq!(pod.host_network, Some(true), "{dir}");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let c = daemon(&pod);

    // Capabilities, not privileged; read-only root.
    let sc = c.security_context.clone().unwrap();
    assert_ne!(
        sc.privileged,
        Some(true),
        "{dir}: the daemon is not privileged"
    );
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{dir}");
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{dir}");
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{dir}");
    let mut added = caps.add.unwrap();
    added.sort();
    let documented = documented_capabilities();
    assert!(
        !documented.is_empty(),
        "deploy/README.md lists capabilities"
    );
    for cap in &added {
        assert!(
            documented.contains(cap),
            "{dir}: {cap} is not in deploy/README.md"
        );
    }
    // Without CAP_SYS_ADMIN: prog_stats must be off (the README's table), and bpffs is mounted
    // by the init container.
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON"], "{dir}");
    assert!(
        !settings.prog_stats.enabled,
        "{dir}: prog_stats needs SYS_ADMIN"
    );

    // Resources.
    let res = c.resources.clone().unwrap();
    assert!(res.requests.unwrap().contains_key("memory"), "{dir}");
    assert!(res.limits.unwrap().contains_key("memory"), "{dir}");

    // Mounts: (mount path, host path, propagation, read only) of the daemon.
    let volumes = pod.volumes.clone().unwrap();
    let host_path = |volume: &str| -> Option<String> {
        volumes
            .iter()
            .find(|v| v.name == volume)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    let mounts = c.volume_mounts.clone().unwrap();
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("{dir}: a mount at {path}"))
    };
    for (path, host, propagation, read_only) in [
        ("/sys/fs/bpf", "/sys/fs/bpf", "HostToContainer", None),
        (
            "/host/sys/fs/cgroup",
            "/sys/fs/cgroup",
            "HostToContainer",
            None,
        ),
        ("/run/netns", "/run/netns", "HostToContainer", Some(true)),
    ] {
        let m = mount(path);
        assert_eq!(host_path(&m.name).as_deref(), Some(host), "{dir}: {path}");
        assert_eq!(m.mount_propagation.as_deref(), Some(propagation), "{dir}");
        assert_eq!(m.read_only, read_only, "{dir}: {path}");
    }
    let pin_root = settings.pin_root.to_str().unwrap();
    assert!(
        pin_root.starts_with("/sys/fs/bpf/"),
        "{dir}: pin_root {pin_root} is on the host's bpffs"
    );
    // The state and the API socket are writable host directories (the root is read-only).
    for path in ["/var/lib/datapath", "/run/datapath"] {
        assert_eq!(host_path(&mount(path).name).as_deref(), Some(path), "{dir}");
    }
    assert!(settings.lb.state_file.starts_with("/var/lib/datapath"));
    assert!(settings.api_socket.starts_with("/run/datapath"));
    // The config is the ConfigMap's, read-only.
    let config = mount("/etc/datapath");
    assert_eq!(config.read_only, Some(true));
    let cm: ConfigMap = typed(docs, "ConfigMap");
    let config_volume = volumes.iter().find(|v| v.name == config.name).unwrap();
    assert_eq!(
        config_volume.config_map.as_ref().unwrap().name,
        cm.metadata.name.unwrap(),
        "{dir}"
    );
    assert_eq!(
        c.args.clone().unwrap(),
        ["run", "--config", "/etc/datapath/config.yaml"]
    );

    // Bidirectional only in the privileged init container that mounts bpffs, and only there:
    // the API server refuses Bidirectional in a container that is not privileged.
    let inits = pod.init_containers.clone().unwrap();
    assert_eq!(inits.len(), 1, "{dir}");
    let init = &inits[0];
    assert_eq!(
        init.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    let init_mounts = init.volume_mounts.clone().unwrap();
    assert_eq!(
        init_mounts.len(),
        1,
        "{dir}: the init container sees bpffs only"
    );
    assert_eq!(init_mounts[0].mount_path, "/sys/fs/bpf");
    assert_eq!(
        host_path(&init_mounts[0].name).as_deref(),
        Some("/sys/fs/bpf")
    );
    assert_eq!(
        init_mounts[0].mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    assert!(
        init.command
            .iter()
            .flatten()
            .any(|a| a.contains("mount -t bpf bpf /sys/fs/bpf")),
        "{dir}: the init container mounts bpffs"
    );

    // Probes on the metrics listener's /healthz and /readyz (datapath/src/metrics.rs routes).
    let port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(
        Some(port.container_port as u16),
        settings.metrics_listen.map(|a| a.port()),
        "{dir}: the container port is metrics_listen's"
    );
    let metrics_rs = include_str!("../src/metrics.rs");
    for (probe, path) in [
        (c.liveness_probe.clone(), "/healthz"),
        (c.readiness_probe.clone(), "/readyz"),
    ] {
        let get = probe.and_then(|p| p.http_get).expect("an httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path), "{dir}");
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())
        );
        assert!(
            metrics_rs.contains(&format!(".route(\"{path}\"")),
            "metrics.rs serves {path}"
        );
    }

    // NODE_NAME from the downward API.
    let env = c.env.clone().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node.value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    assert_eq!(settings.kubernetes.node_name, None, "left to NODE_NAME");

    // The metrics Service selects the pods and targets the metrics port.
    let svc: Service = typed(docs, "Service");
    let svc_spec = svc.spec.unwrap();
    let pod_labels = ds.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    for (k, v) in svc_spec.selector.unwrap() {
        assert_eq!(pod_labels.get(&k), Some(&v), "{dir}: selector {k}");
    }
    let svc_port = &svc_spec.ports.unwrap()[0];
    assert_eq!(svc_port.port, port.container_port);
    assert_eq!(
        svc_port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into()))
    );
}

/// The base's RBAC: list and watch only, on services, nodes and endpointslices, bound to the
/// pod's ServiceAccount in its namespace.
fn assert_rbac(docs: &[serde_json::Value]) {
    let role: ClusterRole = typed(docs, "ClusterRole");
    let mut granted: Vec<(String, String, String)> = Vec::new();
    for rule in role.rules.clone().unwrap() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.push((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted.sort();
    let mut want = Vec::new();
    for (g, r) in [
        ("", "nodes"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for v in ["list", "watch"] {
            want.push((g.to_string(), r.to_string(), v.to_string()));
        }
    }
    assert_eq!(granted, want);
    let sa: ServiceAccount = typed(docs, "ServiceAccount");
    let binding: ClusterRoleBinding = typed(docs, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some("kube-system"));
    assert_eq!(sa.metadata.namespace.as_deref(), Some("kube-system"));
    assert_eq!(pod(docs).service_account_name, sa.metadata.name);
}

/// The documents other than `kinds`, for comparing an overlay with the base.
fn without(docs: &[serde_json::Value], kinds: &[&str]) -> Vec<serde_json::Value> {
    docs.iter()
        .filter(|d| !kinds.contains(&d["kind"].as_str().unwrap()))
        .cloned()
        .collect()
}

#[test]
fn kustomize_base_renders_validates_and_follows_the_rules() {
    let Some(tools) = tools() else { return };
    let docs = rendered_and_checked(&tools, "base");
    let mut kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );
    for doc in &docs {
        if doc["kind"] != "ClusterRole" && doc["kind"] != "ClusterRoleBinding" {
            assert_eq!(doc["metadata"]["namespace"], "kube-system", "{}", name(doc));
        }
    }
    assert_pod_rules("base", &docs);
    assert_rbac(&docs);
    let settings = settings_of(&docs);
    assert!(settings.kubernetes.enabled);
    assert_eq!(
        settings.kubernetes.mode,
        datapath_api::ForwardingMode::FullNat
    );
    assert_ne!(pod(&docs).automount_service_account_token, Some(false));
}

#[test]
fn kustomize_dsr_overlay_changes_the_forwarding_mode_only() {
    let Some(tools) = tools() else { return };
    let base = rendered_and_checked(&tools, "base");
    let dsr = rendered_and_checked(&tools, "overlays/dsr");
    assert_pod_rules("overlays/dsr", &dsr);
    assert_rbac(&dsr);
    let mut want = settings_of(&base);
    assert_eq!(want.kubernetes.mode, datapath_api::ForwardingMode::FullNat);
    want.kubernetes.mode = datapath_api::ForwardingMode::Dsr;
    assert_eq!(
        settings_of(&dsr),
        want,
        "the config differs in kubernetes.mode only"
    );
    assert_eq!(
        without(&dsr, &["ConfigMap"]),
        without(&base, &["ConfigMap"])
    );
}

#[test]
fn kustomize_minimal_overlay_has_no_kubernetes_source_rbac_or_servicemonitor() {
    let Some(tools) = tools() else { return };
    let base = rendered_and_checked(&tools, "base");
    let minimal = rendered_and_checked(&tools, "overlays/minimal");
    assert_pod_rules("overlays/minimal", &minimal);
    let mut want = settings_of(&base);
    assert!(want.kubernetes.enabled);
    want.kubernetes.enabled = false;
    assert_eq!(
        settings_of(&minimal),
        want,
        "the config differs in kubernetes.enabled only"
    );
    for kind in ["ClusterRole", "ClusterRoleBinding", "ServiceMonitor"] {
        assert!(
            minimal.iter().all(|d| d["kind"] != kind),
            "no {kind} in overlays/minimal"
        );
    }
    assert_eq!(pod(&minimal).automount_service_account_token, Some(false));
    // The DaemonSet is the base's with the token not mounted; the rest is the base's.
    let mut ds = base
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap()
        .clone();
    ds["spec"]["template"]["spec"]["automountServiceAccountToken"] = false.into();
    assert_eq!(minimal.iter().find(|d| d["kind"] == "DaemonSet"), Some(&ds));
    let removed = [
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceMonitor",
        "ConfigMap",
        "DaemonSet",
    ];
    assert_eq!(without(&minimal, &removed), without(&base, &removed));
}

/// deploy/daemonset.yaml, the single-file manifest, is the base rendered: the same objects.
#[test]
fn the_single_file_manifest_is_the_kustomize_base_rendered() {
    let Some(tools) = tools() else { return };
    assert_eq!(
        documents(),
        yaml_documents(&render(&tools, "base")),
        "deploy/daemonset.yaml is stale: regenerate it from deploy/kustomize/base (its header)"
    );
}

/// The checks are not vacuous: a misspelt field in the rendered DaemonSet fails both the strict
/// schema validation and the k8s-openapi round trip.
#[test]
fn a_misspelt_field_fails_validation_and_the_round_trip() {
    let Some(tools) = tools() else { return };
    let text = render(&tools, "base");
    assert!(text.contains("hostNetwork: true"));
    let typo = text.replace("hostNetwork: true", "hostNetwrok: true");
    let problems = validate(&tools, &typo);
    assert!(
        problems.iter().any(|p| p.contains("hostNetwrok")),
        "kubernetes-validate --strict refuses the typo: {problems:?}"
    );
    let ds = yaml_documents(&typo)
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    assert!(check_round_trip(&ds).is_err());
}

#[test]
fn kustomize_grafana_renders_the_dashboard_in_its_own_configmap() {
    let Some(tools) = tools() else { return };
    let docs = rendered_and_checked(&tools, "grafana");
    assert_eq!(docs.len(), 1, "one dashboard, one ConfigMap: {docs:?}");
    let cm: k8s_openapi::api::core::v1::ConfigMap = typed(&docs, "ConfigMap");
    let labels = cm.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("grafana_dashboard").map(String::as_str),
        Some("1")
    );
    let data = cm.data.unwrap_or_default();
    let file = workspace().join("deploy/kustomize/grafana/datapath-dashboard.json");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let got: serde_json::Value = serde_json::from_str(&data["datapath-dashboard.json"])
        .expect("the ConfigMap's dashboard is JSON");
    assert_eq!(got, want);
    // Every panel has a query, and every query reads a metric of this daemon.
    let panels = want["panels"].as_array().unwrap();
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");
    assert!(exprs.iter().all(|e| e.contains("datapath_")), "{exprs:?}");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "{p}"
        );
    }
}

// ---- The Helm chart (deploy/helm/datapath), rendered by the real Helm engine. ----

/// The deploy tests' venv python with helm-python-sdk (`cargo xtask setup` installs it), or
/// `None` with the reason printed; a panic where [`required`].
fn helm_python() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let found = find_tool(
        "DATAPATH_HELM_PYTHON",
        vec![target.join("kubernetes-validate/bin/python")],
        &["-c", "import helm_python"],
    );
    if found.is_none() {
        let reason = "missing helm-python-sdk (PyPI; `cargo xtask setup` installs it)";
        assert!(
            !required(),
            "{reason} (CI or DATAPATH_REQUIRE_PRIVILEGED=1)"
        );
        eprintln!("skipping: {reason}");
    }
    found
}

/// `deploy/helm/render.py` (lint, then render, offline) over the chart, with the values files
/// `values` (paths under deploy/helm), in namespace kube-system.
fn helm_render(python: &Path, values: &[&str]) -> String {
    let helm = workspace().join("deploy/helm");
    let mut cmd = Command::new(python);
    cmd.arg(helm.join("render.py")).arg(helm.join("datapath"));
    for v in values {
        cmd.arg("--values").arg(helm.join(v));
    }
    cmd.args(["--namespace", "kube-system"]);
    let out = cmd.output().expect("running deploy/helm/render.py");
    assert!(
        out.status.success(),
        "render.py {values:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The documents as objects to compare, ordered by kind and name. The ConfigMap's `config.yaml`
/// is taken as the YAML it holds: Helm writes the values' map, kustomize the file as written,
/// comments and all.
fn comparable(mut docs: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    for doc in docs.iter_mut().filter(|d| d["kind"] == "ConfigMap") {
        let text = doc["data"]["config.yaml"].as_str().unwrap().to_string();
        let parsed: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        doc["data"]["config.yaml"] = parsed;
    }
    docs.sort_by_key(|d| (d["kind"].as_str().unwrap().to_string(), name(d)));
    docs
}

#[test]
fn the_helm_chart_renders_the_kustomize_objects_with_the_real_helm_engine() {
    let Some(tools) = tools() else { return };
    let Some(python) = helm_python() else { return };
    let mut seen = Vec::new();
    for (values, dir) in [
        (&[][..], "base"),
        (&["examples/dsr.yaml"][..], "overlays/dsr"),
        (&["examples/minimal.yaml"][..], "overlays/minimal"),
    ] {
        let what = format!("helm chart with {values:?}");
        let docs = checked(&tools, &helm_render(&python, values), &what);
        assert_pod_rules(&what, &docs);
        settings_of(&docs);
        let kustomize = rendered_and_checked(&tools, dir);
        let docs = comparable(docs);
        assert_eq!(
            serde_json::to_string_pretty(&docs).unwrap(),
            serde_json::to_string_pretty(&comparable(kustomize)).unwrap(),
            "{what} renders what kustomize renders for {dir}"
        );
        seen.push(docs);
    }
    // The values do change what is rendered: three different sets of objects.
    assert!(seen[0] != seen[1] && seen[1] != seen[2] && seen[0] != seen[2]);
}
