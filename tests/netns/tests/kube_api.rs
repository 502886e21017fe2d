//! The Kubernetes API stand-in (`netns_tests::kube_api`, the test suite's one stand-in) checked
//! against the real `kubectl` and the recorded wire data of a real API server, inside a network
//! namespace made for the test (its loopback only).
//!
//! Run with `cargo test -p netns-tests --test kube_api` (as root).

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use netns_tests::{
    kube_api::{KubeApi, Resource, yaml_object},
    netns::{self, OwnedNetns},
    privileged,
    topology::unique_prefix,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn recorded(path: &str) -> String {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/k8s-recorded")
        .join(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn object(path: &str) -> Value {
    yaml_object(&recorded(&format!("cilium/{path}"))).unwrap()
}

/// The test's namespace (deleted on drop, also on a panic) and the stand-in serving in it,
/// with the two recorded Services both tests start from.
fn start() -> (OwnedNetns, KubeApi) {
    let ns = OwnedNetns::create(&format!("{}k", unique_prefix())).unwrap();
    let listener = netns::run_in(ns.name(), || TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let api = KubeApi::serve(listener).unwrap();
    api.apply(Resource::Services, object("clusterip/service.yaml"))
        .unwrap();
    api.apply(Resource::Services, object("dualstack/service1.yaml"))
        .unwrap();
    (ns, api)
}
/// A connection made inside the namespace.
fn connect(ns: &OwnedNetns, api: &KubeApi) -> TcpStream {
    let addr = api.addr();
    let s = netns::run_in(ns.name(), move || TcpStream::connect(addr))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// GET `target` and read the whole (unchunked) answer: (status, body).
fn get(ns: &OwnedNetns, api: &KubeApi, target: &str) -> (u16, String) {
    let mut s = connect(ns, api);
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// The first `n` events of a watch, decoded from the chunked stream.
fn watch_events(ns: &OwnedNetns, api: &KubeApi, target: &str, n: usize) -> Vec<Value> {
    let s = connect(ns, api);
    let mut w = s.try_clone().unwrap();
    write!(w, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut events = Vec::new();
    while events.len() < n {
        line.clear();
        r.read_line(&mut line).unwrap();
        let size = usize::from_str_radix(line.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        let mut data = vec![0; size + 2];
        r.read_exact(&mut data).unwrap();
        events.push(serde_json::from_slice(&data[..size]).unwrap());
    }
    events
}

fn top_keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn kube_api_stand_in_speaks_the_recorded_wire_format() {
    if !privileged() {
        return;
    }
    let (ns, api) = start();

    // A List as the real server answers one (k8s-openapi's recorded PodList).
    let real: Value = serde_json::from_str(&recorded("k8s-openapi/v1-33/pod-list.json")).unwrap();
    let real_list: Value =
        serde_json::from_str(real[0]["response_body"].as_str().unwrap()).unwrap();
    let (code, body) = get(&ns, &api, "/api/v1/services");
    assert_eq!(code, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(top_keys(&list), top_keys(&real_list), "{list:#}");
    assert_eq!(list["kind"], "ServiceList");
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let rv: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (_, body) = get(&ns, &api, "/api/v1/namespaces/test/services");
    let in_test: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(in_test["items"].as_array().unwrap().len(), 1);

    // A watch from the list's resourceVersion sees only what came after it.
    let mut svc = object("clusterip/service.yaml");
    svc["metadata"]["labels"] = serde_json::json!({"changed": "yes"});
    api.apply(Resource::Services, svc).unwrap();
    let events = watch_events(
        &ns,
        &api,
        &format!("/api/v1/services?allowWatchBookmarks=true&resourceVersion={rv}&watch=true"),
        1,
    );
    assert_eq!(events[0]["type"], "MODIFIED");
    assert_eq!(events[0]["object"]["metadata"]["labels"]["changed"], "yes");

    // The streaming list: ADDED for each object, then the initial-events-end BOOKMARK, as in
    // the recorded exchange.
    let real: Value = serde_json::from_str(&recorded(
        "k8s-openapi/v1-33/watch_event-watch_pods_without_initial_events.json",
    ))
    .unwrap();
    let real_events: Vec<Value> = real[0]["response_body"]
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let real_bookmark = real_events.last().unwrap();
    let events = watch_events(
        &ns,
        &api,
        "/api/v1/services?allowWatchBookmarks=true&resourceVersion=0&\
         resourceVersionMatch=NotOlderThan&sendInitialEvents=true&watch=true",
        3,
    );
    assert_eq!(
        events
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["ADDED", "ADDED", "BOOKMARK"]
    );
    assert_eq!(top_keys(&events[0]), top_keys(&real_events[0]));
    assert_eq!(
        events[2]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        real_bookmark["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"]
    );

    // After a compaction, a watch from an old resourceVersion gets 410 Gone.
    api.compact();
    let events = watch_events(
        &ns,
        &api,
        &format!("/api/v1/services?resourceVersion={rv}&watch=true"),
        1,
    );
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["code"], 410);
    // EndpointSlices are served under their group.
    api.apply(
        Resource::EndpointSlices,
        object("clusterip/endpointslice.yaml"),
    )
    .unwrap();
    let (code, body) = get(&ns, &api, "/apis/discovery.k8s.io/v1/endpointslices");
    assert_eq!(code, 200);
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["kind"], "EndpointSliceList");
    assert_eq!(list["items"][0]["metadata"]["name"], "echo-kvlm2");

    // Nodes are cluster-scoped, and a field selector on the name picks one (kube's watcher
    // sends it percent-encoded); a field the server does not index is refused with 400.
    for name in ["node-a", "node-b"] {
        api.apply(Resource::Nodes, node(name)).unwrap();
    }
    let (code, body) = get(
        &ns,
        &api,
        "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-b",
    );
    assert_eq!(code, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["kind"], "NodeList");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["node-b"]);
    let (_, body) = get(
        &ns,
        &api,
        "/api/v1/nodes?fieldSelector=metadata.name!%3Dnode-b",
    );
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["items"][0]["metadata"]["name"], "node-a");
    let (code, body) = get(
        &ns,
        &api,
        "/api/v1/nodes?fieldSelector=spec.unschedulable%3Dtrue",
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("field label not supported"), "{body}");
    let (code, _) = get(&ns, &api, "/api/v1/namespaces/test/nodes");
    assert_eq!(code, 404, "Nodes have no namespace");
    let rv = api.resource_version();
    let mut changed = node("node-a");
    changed["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-2".into();
    api.apply(Resource::Nodes, changed).unwrap();
    let mut changed = node("node-b");
    changed["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-3".into();
    api.apply(Resource::Nodes, changed).unwrap();
    let events = watch_events(
        &ns,
        &api,
        &format!(
            "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-b&resourceVersion={rv}&watch=true"
        ),
        1,
    );
    assert_eq!(events[0]["type"], "MODIFIED");
    assert_eq!(
        events[0]["object"]["metadata"]["name"], "node-b",
        "node-a's change is not selected"
    );
    assert_eq!(
        events[0]["object"]["metadata"]["labels"]["topology.kubernetes.io/zone"],
        "zone-3"
    );
}

/// A Node in the API's shape (the recordings hold none), in zone `zone-1`.
fn node(name: &str) -> Value {
    serde_json::json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                               "topology.kubernetes.io/zone": "zone-1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.10"}]},
    })
}

#[test]
fn kube_api_stand_in_speaks_to_kubectl() {
    if !privileged() {
        return;
    }
    let (ns, api) = start();
    // `-o json` with watch events: kubectl prints each event it decoded as a JSON document.
    let mut kubectl = Command::new("kubectl");
    netns::command_in(&mut kubectl, ns.name()).unwrap();
    let mut kubectl = kubectl
        .args(["--server", &api.url()])
        .args([
            "get",
            "services",
            "-A",
            "--watch",
            "--output-watch-events",
            "-o",
            "json",
        ])
        .env("KUBECONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    let (tx, rx) = mpsc::channel::<Value>();
    let stdout = kubectl.stdout.take().unwrap();
    thread::spawn(move || {
        for v in serde_json::Deserializer::from_reader(stdout).into_iter::<Value>() {
            let Ok(v) = v else { break };
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<(String, String, String, Value)> = Vec::new();
    // Waits until kubectl has shown an event of `kind` for `ns/name` that passes `check`.
    let mut wait_for = |kind: &str, ns: &str, name: &str, check: &dyn Fn(&Value) -> bool| {
        let deadline = Instant::now() + WAIT;
        loop {
            let hit = seen
                .iter()
                .any(|(k, n, m, o)| k == kind && n == ns && m == name && check(o));
            if hit {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kubectl never showed {kind} {ns}/{name}; it showed: {:#?}",
                seen.iter()
                    .map(|(k, n, m, _)| format!("{k} {n}/{m}"))
                    .collect::<Vec<_>>()
            );
            if let Ok(e) = rx.recv_timeout(Duration::from_millis(200)) {
                let o = e["object"].clone();
                seen.push((
                    e["type"].as_str().unwrap_or("").to_string(),
                    o["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    o["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    o,
                ));
            }
        }
    };
    let any = |_: &Value| true;
    wait_for("ADDED", "test", "echo", &any);
    wait_for("ADDED", "default", "echo-dualstack", &|o| {
        o["spec"]["clusterIPs"][1] == "fd00:10:96::b050"
    });
    // The same events the watch stream carries, as the real kubectl decodes them.
    let mut lb = object("loadbalancer/service.yaml");
    lb["metadata"]["name"] = "echo-lb".into();
    api.apply(Resource::Services, lb).unwrap();
    wait_for("ADDED", "test", "echo-lb", &|o| {
        o["spec"]["type"] == "LoadBalancer"
            && o["status"]["loadBalancer"]["ingress"][0]["ip"] == "172.16.1.1"
    });
    let mut changed = object("clusterip/service.yaml");
    changed["spec"]["clusterIP"] = "10.96.50.105".into();
    api.apply(Resource::Services, changed).unwrap();
    wait_for("MODIFIED", "test", "echo", &|o| {
        o["spec"]["clusterIP"] == "10.96.50.105"
    });
    api.delete(Resource::Services, "test", "echo-lb").unwrap();
    wait_for("DELETED", "test", "echo-lb", &any);
    let _ = kubectl.kill();
    let _ = kubectl.wait();

    // Cluster-scoped Nodes by a field selector, as kubectl asks for them.
    for name in ["node-a", "node-b"] {
        api.apply(Resource::Nodes, node(name)).unwrap();
    }
    let mut get = Command::new("kubectl");
    netns::command_in(&mut get, ns.name()).unwrap();
    let out = get
        .args(["--server", &api.url()])
        .args([
            "get",
            "nodes",
            "--field-selector",
            "metadata.name=node-a",
            "-o",
            "json",
        ])
        .env("KUBECONFIG", "/dev/null")
        .output()
        .expect("kubectl get nodes");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list:#}");
    assert_eq!(items[0]["metadata"]["name"], "node-a");
    assert_eq!(items[0]["kind"], "Node");
}
