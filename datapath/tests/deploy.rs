//! deploy/daemonset.yaml, parsed into the Kubernetes API types (k8s-openapi): the RBAC of the
//! Kubernetes service source grants list and watch only, on exactly what it reads; the node
//! name comes from the downward API; the ConfigMap's config is one the daemon accepts.

use datapath::config::{Overrides, Settings, Source};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
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
