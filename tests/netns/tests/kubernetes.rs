//! The Kubernetes service source end to end: datapathd watches the test suite's one stand-in
//! API server (`netns_tests::kube_api`, which replays recorded objects in the real wire
//! format; Kubernetes cannot run here), maps a recorded Service and its EndpointSlice, and real
//! TCP connections flow through XDP to the namespace backends. Everything but the API server is
//! real: namespaces, veths with their default offloads, the XDP program, TCP.
//!
//! The recorded `graceful-termination` Service (`test/graceful-term-svc`) has its ClusterIP
//! mapped onto the test VIP (198.18.100.1:80) and its endpoints onto the three backends; the
//! recorded `topology-aware` Service (`test/echo`) the same way, onto two backends, with this
//! node's zone taken from its Node object.

use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use datapath_api::{BackendState, Protocol, ServiceSource, ServiceView, SourcesView};
use netns_tests::{
    Daemon, Lab, LabOptions, TopologyOptions,
    client::{self, Conn, sock},
    http,
    kube_api::{self, KubeApi, Resource, yaml_object},
    lab::{BACKEND_PORT, TCP_SERVICE_PORT},
    netns, privileged,
    topology::{LB_CLIENT_IP, VIP, VIP6},
};
use serde_json::{Value, json};

const RECORDED: &str = "../../../shared/k8s-recorded/cilium/graceful-termination";
const TOPOLOGY_AWARE: &str = "../../../shared/k8s-recorded/cilium/topology-aware";
const DUAL_STACK: &str = "../../../shared/k8s-recorded/cilium/dualstack";
const NODE: &str = "graceful-term-control-plane";
const NEW_FLOWS: usize = 200;

fn recorded(file: &str) -> Value {
    recorded_in(RECORDED, file)
}

fn recorded_in(scenario: &str, file: &str) -> Value {
    let path = format!("{}/{scenario}/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    yaml_object(&text).unwrap()
}

/// The recorded Service, its ClusterIP on the test VIP and its port on the service port.
fn service() -> Value {
    on_test_vip(recorded("service.yaml"))
}

fn on_test_vip(mut svc: Value) -> Value {
    let vip = VIP.to_string();
    svc["spec"]["clusterIP"] = json!(vip);
    svc["spec"]["clusterIPs"] = json!([vip]);
    svc["spec"]["ports"][0]["port"] = json!(TCP_SERVICE_PORT);
    svc["spec"]["ports"][0]["targetPort"] = json!(BACKEND_PORT);
    svc
}

/// The recorded slice with one endpoint per backend `(ip, conditions)`, on the backend port.
fn slice(endpoints: &[(IpAddr, Value)]) -> Value {
    let mut s = recorded("endpointslice.yaml");
    let template = s["endpoints"][0].clone();
    s["endpoints"] = endpoints
        .iter()
        .map(|(ip, conditions)| {
            let mut e = template.clone();
            e["addresses"] = json!([ip.to_string()]);
            e["conditions"] = conditions.clone();
            e
        })
        .collect();
    s["ports"][0]["port"] = json!(BACKEND_PORT);
    s
}

fn ready() -> Value {
    json!({"ready": true, "serving": true, "terminating": false})
}

fn terminating() -> Value {
    json!({"ready": false, "serving": true, "terminating": true})
}

fn ok<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// Starts the daemon on the lab's LB node with the Kubernetes source reading `api` as node
/// `node`.
fn start_daemon(lab: &mut Lab, api: &KubeApi, node: &str) {
    let kc = ok(
        "kubeconfig",
        lab.write_file("kubeconfig", &kube_api::kubeconfig(&api.url())),
    );
    let config = format!(
        "reload:\n  watch: false\nkubernetes:\n  enabled: true\n  kubeconfig: {}\n  node_name: {node}\n",
        kc.display()
    );
    ok("daemon", lab.start_daemon_with_config(&config));
}

fn vip_service(d: &Daemon) -> Option<ServiceView> {
    d.service(IpAddr::V4(VIP), TCP_SERVICE_PORT, Protocol::Tcp)
        .ok()
}

/// Polls (bounded) until the VIP's service satisfies `want`.
fn wait_service(d: &Daemon, what: &str, want: impl Fn(&ServiceView) -> bool) -> ServiceView {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = vip_service(d)
            && want(&v)
        {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not reached in 20 s; service now {:#?}\nsources {:#?}\n{}",
                vip_service(d),
                sources(d).ok(),
                d.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sources(d: &Daemon) -> Result<SourcesView> {
    Ok(serde_json::from_value(d.lb_ctl_json(&["sources"])?)?)
}

fn kubernetes_status(d: &Daemon) -> datapath_api::SourceStatus {
    ok("lb-ctl sources", sources(d))
        .sources
        .into_iter()
        .find(|s| s.source == ServiceSource::Kubernetes)
        .expect("a kubernetes source")
}

fn state_of(v: &ServiceView, ip: IpAddr) -> Option<BackendState> {
    v.backends.iter().find(|b| b.addr == ip).map(|b| b.state)
}

fn ping_all(what: &str, conns: &mut [Conn]) {
    for c in conns.iter_mut() {
        c.ping()
            .unwrap_or_else(|e| panic!("{what}: connection {c:?} stopped: {e:#}"));
    }
}

/// Listens inside the LB namespace, where the daemon's client connects.
fn listen_in(ns: &str, port: u16) -> Result<TcpListener> {
    netns::run_in(ns, || TcpListener::bind(("127.0.0.1", port)))?
        .context("binding the stand-in API server")
}

#[test]
fn kubernetes_service_flows_through_xdp_and_survives_the_api_server() {
    if !privileged() {
        return;
    }
    let mut lab = ok(
        "lab",
        Lab::start(LabOptions {
            topology: TopologyOptions {
                backends: 3,
                dsr: false,
                ipv6: false,
            },
            daemon: None,
        }),
    );
    let ip = |name: &str| IpAddr::V4(lab.topo.backend(name).ip);
    let (b1, b2, b3) = (ip("b1"), ip("b2"), ip("b3"));
    let vip: SocketAddr = sock(VIP, TCP_SERVICE_PORT);

    let api = ok(
        "stand-in",
        listen_in(&lab.topo.lb, 0).and_then(KubeApi::serve),
    );
    let port = api.addr().port();
    ok(
        "service",
        api.apply(Resource::Services, service()).map(drop),
    );
    let three = [(b1, ready()), (b2, ready()), (b3, ready())];
    ok(
        "slice",
        api.apply(Resource::EndpointSlices, slice(&three)).map(drop),
    );

    start_daemon(&mut lab, &api, NODE);
    let d = lab.daemon();

    // Synced: the Service's one frontend, its three endpoints active, owned by Kubernetes.
    let first = wait_service(d, "initial sync", |v| {
        v.backends.len() == 3 && v.backends.iter().all(|b| b.state == BackendState::Active)
    });
    assert_eq!(first.source, ServiceSource::Kubernetes);
    assert_eq!(first.owner.as_deref(), Some("test/graceful-term-svc"));
    assert!(first.backends.iter().all(|b| b.port == BACKEND_PORT));
    let st = kubernetes_status(d);
    assert!(st.synced && st.services == 1 && st.objects == 1, "{st:#?}");

    let mut conns = ok(
        "long-lived connections",
        client::connect_until_each_in(lab.client_ns(), vip, &["b1", "b2", "b3"], 2, 60),
    );
    ping_all("after the sync", &mut conns);

    // lb-ctl refuses to change what Kubernetes owns, with its own exit code.
    let b2_arg = sock(lab.topo.backend("b2").ip, BACKEND_PORT).to_string();
    let o = ok(
        "lb-ctl backend drain",
        d.lb_ctl(&["backend", "drain", &vip.to_string(), &b2_arg]),
    );
    assert_eq!(o.status.code(), Some(8), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("belongs to the kubernetes source"), "{err}");

    // b2 terminating: it drains, its connections continue, new flows avoid it.
    let terminating_b2 = [(b1, ready()), (b2, terminating()), (b3, ready())];
    ok(
        "slice update",
        api.apply(Resource::EndpointSlices, slice(&terminating_b2))
            .map(drop),
    );
    let drained = wait_service(d, "b2 draining", |v| {
        state_of(v, b2) == Some(BackendState::Draining)
    });
    let ids = |v: &ServiceView| -> Vec<(IpAddr, u32)> {
        v.backends.iter().map(|b| (b.addr, b.id)).collect()
    };
    assert_eq!(ids(&drained), ids(&first), "every backend kept its slot");
    ping_all("after b2 began terminating", &mut conns);
    let spread = ok(
        "new flows",
        client::tcp_spread_in(lab.client_ns(), vip, NEW_FLOWS),
    );
    assert!(spread.errors.is_empty(), "{}", spread.table());
    assert_eq!(spread.count("b2"), 0, "{}", spread.table());

    // b2 deleted from the slice: removed; the others' connections continue.
    let two = [(b1, ready()), (b3, ready())];
    ok(
        "slice without b2",
        api.apply(Resource::EndpointSlices, slice(&two)).map(drop),
    );
    let after_delete = wait_service(d, "b2 removed", |v| v.backends.len() == 2);
    assert!(state_of(&after_delete, b2).is_none());
    conns.retain(|c| c.backend != "b2");
    ping_all("after b2 was removed", &mut conns);

    // The API server dies: traffic keeps flowing, and the source says it cannot reach it.
    let rv_before = api.resource_version();
    let syncs_before = kubernetes_status(d).syncs;
    drop(api);
    let deadline = Instant::now() + Duration::from_secs(20);
    while kubernetes_status(d).last_error.is_none() {
        assert!(Instant::now() < deadline, "no sync error reported in 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    ping_all("with the API server down", &mut conns);
    let spread = ok(
        "new flows with the API server down",
        client::tcp_spread_in(lab.client_ns(), vip, NEW_FLOWS),
    );
    assert!(spread.errors.is_empty(), "{}", spread.table());
    assert!(
        spread.count("b1") > 0 && spread.count("b3") > 0,
        "{}",
        spread.table()
    );
    ok("the daemon stays up", d.lb_ctl_ok(&["status"]).map(drop));
    // Ready for the datapath, and the metrics say the source is failing.
    let metrics = sock(LB_CLIENT_IP, 9477);
    let (code, body) = ok("/readyz", http::get_in(lab.client_ns(), metrics, "/readyz"));
    assert_eq!(code, 200, "/readyz with the API server down: {body}");
    let (_, text) = ok(
        "/metrics",
        http::get_in(lab.client_ns(), metrics, "/metrics"),
    );
    let errors: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("datapath_source_sync_errors_total{source=\"kubernetes\"} "))
        .expect("the source's error counter")
        .parse()
        .unwrap();
    assert!(errors >= 1.0, "{text}");
    assert!(
        text.contains("datapath_source_synced{source=\"kubernetes\"} 1"),
        "{text}"
    );
    assert!(text.contains("datapath_source_last_sync_age_seconds{source=\"kubernetes\"}"));
    assert_eq!(vip_service(d).map(|v| ids(&v)), Some(ids(&after_delete)));

    // It comes back compacted: the client's resourceVersion is gone (410), it lists again,
    // and applies only the difference: nothing changes, no flow breaks.
    // Kept alive to the end: the daemon restart below lists from it.
    let _api = ok(
        "stand-in again",
        listen_in(&lab.topo.lb, port).and_then(|l| {
            KubeApi::serve_prepared(l, |api| {
                api.apply(Resource::Services, service())?;
                while api.resource_version() <= rv_before + 1 {
                    api.apply(Resource::EndpointSlices, slice(&two))?;
                }
                api.compact();
                Ok(())
            })
        }),
    );
    // Relisted, and then quiet: the watch from the new list's resourceVersion holds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_since: Option<(Instant, u64)> = None;
    loop {
        let st = kubernetes_status(d);
        let relisted = st.syncs > syncs_before && st.last_error.is_none();
        match quiet_since {
            Some((since, errors)) if relisted && st.sync_errors == errors => {
                if since.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
            _ if relisted => quiet_since = Some((Instant::now(), st.sync_errors)),
            _ => quiet_since = None,
        }
        if Instant::now() > deadline {
            panic!(
                "no steady relist after the API server came back: {st:#?}\n{}",
                d.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        d.log().contains("Expired"),
        "the watch from the old resourceVersion was answered 410 Gone (Expired)"
    );
    let relisted = vip_service(d).expect("service after the relist");
    assert_eq!(ids(&relisted), ids(&after_delete), "nothing flapped");
    ping_all("after the relist", &mut conns);
    // A restart serves the Kubernetes services from the state file at once, before the first
    // list, with their slots; the connections continue.
    ok("restart", lab.daemon_mut().restart());
    let d = lab.daemon();
    let restored = vip_service(d).expect("restored at once");
    assert_eq!(restored.source, ServiceSource::Kubernetes);
    assert_eq!(ids(&restored), ids(&after_delete));
    ping_all("after the daemon's restart", &mut conns);
    let table = ok("lb-ctl sources", d.lb_ctl_ok(&["sources"]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("kubernetes") && l.contains(" yes ")),
        "{table}"
    );
}

/// A Node in the API's shape (the recordings hold none): kind's labels and addresses, with
/// `zone` as its `topology.kubernetes.io/zone`.
fn node(name: &str, zone: Option<&str>, internal_ip: &str) -> Value {
    let mut labels = json!({
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
    });
    if let Some(z) = zone {
        labels["topology.kubernetes.io/zone"] = json!(z);
    }
    json!({
        "metadata": {"name": name, "labels": labels, "uid": format!("uid-{name}"),
                     "creationTimestamp": "2026-12-04T10:00:00Z"},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": internal_ip},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastHeartbeatTime": "2026-12-04T10:00:00Z",
                            "lastTransitionTime": "2026-12-04T10:00:00Z"}],
        },
    })
}

fn backend_ips(v: &ServiceView) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = v.backends.iter().map(|b| b.addr).collect();
    ips.sort();
    ips
}

/// Topology-aware routing with a known zone: this node's Node (found by name with a field
/// selector, beside another node in another zone) says zone `foo`, and only the endpoint
/// hinted for `foo` gets new flows; the Node moving to `quux` moves them to the other; the
/// Node gone leaves the zone unknown and every endpoint serving (kube-proxy's fallback), with
/// the reason in `lb-ctl sources`.
#[test]
fn kubernetes_topology_hints_follow_this_nodes_zone() {
    if !privileged() {
        return;
    }
    const THIS_NODE: &str = "topo-node";
    let mut lab = ok(
        "lab",
        Lab::start(LabOptions {
            topology: TopologyOptions {
                backends: 2,
                dsr: false,
                ipv6: false,
            },
            daemon: None,
        }),
    );
    let b1 = IpAddr::V4(lab.topo.backend("b1").ip);
    let b2 = IpAddr::V4(lab.topo.backend("b2").ip);
    let vip: SocketAddr = sock(VIP, TCP_SERVICE_PORT);
    let api = ok(
        "stand-in",
        listen_in(&lab.topo.lb, 0).and_then(KubeApi::serve),
    );
    ok(
        "service",
        api.apply(
            Resource::Services,
            on_test_vip(recorded_in(TOPOLOGY_AWARE, "service.yaml")),
        )
        .map(drop),
    );
    // eps1's endpoint (hinted for foo and bar) on b1, eps2's (hinted for quux) on b2.
    for (file, ip) in [("endpointslice.yaml", b1), ("endpointslice2.yaml", b2)] {
        let mut s = recorded_in(TOPOLOGY_AWARE, file);
        s["endpoints"][0]["addresses"] = json!([ip.to_string()]);
        s["ports"][0]["port"] = json!(BACKEND_PORT);
        ok("slice", api.apply(Resource::EndpointSlices, s).map(drop));
    }
    // Listed after this node by name, so a client that read every Node would end on it.
    ok(
        "this node",
        api.apply(Resource::Nodes, node(THIS_NODE, Some("foo"), "198.18.0.10"))
            .map(drop),
    );
    ok(
        "another node",
        api.apply(
            Resource::Nodes,
            node("zz-other", Some("quux"), "198.18.0.11"),
        )
        .map(drop),
    );

    start_daemon(&mut lab, &api, THIS_NODE);
    let d = lab.daemon();
    let spread_only = |what: &str, backend: &str| {
        let spread = ok(what, client::tcp_spread_in(lab.client_ns(), vip, NEW_FLOWS));
        assert!(spread.errors.is_empty(), "{what}: {}", spread.table());
        assert_eq!(
            spread.count(backend),
            NEW_FLOWS,
            "{what}: {}",
            spread.table()
        );
    };

    // Zone foo: b1 only.
    let v = wait_service(d, "zone foo", |v| backend_ips(v) == vec![b1]);
    assert_eq!(v.owner.as_deref(), Some("test/echo"));
    assert!(
        kubernetes_status(d).notes.is_empty(),
        "{:#?}",
        kubernetes_status(d)
    );
    spread_only("new flows in zone foo", "b1");

    // The Node moves to zone quux: b2 only.
    ok(
        "this node in quux",
        api.apply(
            Resource::Nodes,
            node(THIS_NODE, Some("quux"), "198.18.0.10"),
        )
        .map(drop),
    );
    wait_service(d, "zone quux", |v| backend_ips(v) == vec![b2]);
    spread_only("new flows in zone quux", "b2");

    // The other node changing changes nothing here.
    ok(
        "the other node in foo",
        api.apply(
            Resource::Nodes,
            node("zz-other", Some("foo"), "198.18.0.11"),
        )
        .map(drop),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vip_service(d).map(|v| backend_ips(&v)), Some(vec![b2]));

    // The Node gone: the zone is unknown, every endpoint serves, and the source says why.
    ok(
        "this node deleted",
        api.delete(Resource::Nodes, "", THIS_NODE).map(drop),
    );
    let mut both = vec![b1, b2];
    both.sort();
    wait_service(d, "zone unknown", |v| backend_ips(v) == both);
    let st = kubernetes_status(d);
    assert!(
        st.notes
            .iter()
            .any(|n| n.contains(THIS_NODE) && n.contains("zone is unknown")),
        "{st:#?}"
    );
    let spread = ok(
        "new flows with the zone unknown",
        client::tcp_spread_in(lab.client_ns(), vip, NEW_FLOWS),
    );
    assert!(spread.errors.is_empty(), "{}", spread.table());
    assert!(
        spread.count("b1") > 0 && spread.count("b2") > 0,
        "{}",
        spread.table()
    );
}

/// The recorded dual-stack Service (`default/echo-dualstack`, `RequireDualStack`, one
/// ClusterIP per family) and its two EndpointSlices (one per address type), mapped onto the
/// test VIPs and the three backends' addresses of each family: both ClusterIPs are programmed,
/// each with its own family's backends, and both carry real connections.
#[test]
fn kubernetes_dual_stack_service_programs_both_cluster_ips() {
    if !privileged() {
        return;
    }
    let mut lab = ok(
        "lab",
        Lab::start(LabOptions {
            topology: TopologyOptions {
                backends: 3,
                dsr: false,
                ipv6: true,
            },
            daemon: None,
        }),
    );
    let mut svc = recorded_in(DUAL_STACK, "service1.yaml");
    svc["spec"]["type"] = json!("ClusterIP");
    svc["spec"]["clusterIP"] = json!(VIP.to_string());
    svc["spec"]["clusterIPs"] = json!([VIP.to_string(), VIP6.to_string()]);
    let http = json!({"name": "http", "port": TCP_SERVICE_PORT, "protocol": "TCP", "targetPort": BACKEND_PORT});
    svc["spec"]["ports"] = json!([http]);
    let slice_of = |file: &str, addrs: Vec<String>| {
        let mut s = recorded_in(DUAL_STACK, file);
        let template = s["endpoints"][0].clone();
        s["endpoints"] = addrs
            .into_iter()
            .map(|a| {
                let mut e = template.clone();
                e["addresses"] = json!([a]);
                e
            })
            .collect();
        s["ports"] = json!([{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}]);
        s
    };
    let names = ["b1", "b2", "b3"];
    let v6: Vec<String> = names
        .iter()
        .map(|b| lab.topo.backend(b).ip6.to_string())
        .collect();
    let v4: Vec<String> = names
        .iter()
        .map(|b| lab.topo.backend(b).ip.to_string())
        .collect();
    let api = ok(
        "stand-in",
        listen_in(&lab.topo.lb, 0).and_then(KubeApi::serve),
    );
    ok("service", api.apply(Resource::Services, svc).map(drop));
    for slice in [
        slice_of("endpointslice1.yaml", v6),
        slice_of("endpointslice2.yaml", v4),
    ] {
        ok(
            "slice",
            api.apply(Resource::EndpointSlices, slice).map(drop),
        );
    }
    start_daemon(&mut lab, &api, "dual-stack-worker");
    let d = lab.daemon();

    let deadline = Instant::now() + Duration::from_secs(20);
    let views = loop {
        let views: Vec<ServiceView> = [IpAddr::V4(VIP), IpAddr::V6(VIP6)]
            .into_iter()
            .filter_map(|vip| d.service(vip, TCP_SERVICE_PORT, Protocol::Tcp).ok())
            .filter(|v| v.backends.len() == 3)
            .collect();
        if views.len() == 2 {
            break views;
        }
        assert!(
            Instant::now() < deadline,
            "both ClusterIPs not programmed in 20 s: {:#?}\n{}",
            sources(d).ok(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for v in &views {
        assert_eq!(v.source, ServiceSource::Kubernetes);
        assert_eq!(v.owner.as_deref(), Some("default/echo-dualstack"));
        assert!(
            v.backends
                .iter()
                .all(|b| b.addr.is_ipv6() == v.vip.is_ipv6()),
            "each ClusterIP has its own family's backends: {v:#?}"
        );
    }
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let spread = ok(
            "connections",
            client::tcp_spread_in(
                lab.client_ns(),
                SocketAddr::from((vip, TCP_SERVICE_PORT)),
                60,
            ),
        );
        assert!(spread.errors.is_empty(), "{vip}: {}", spread.table());
        for b in names {
            assert!(spread.count(b) > 0, "{vip}: {}", spread.table());
        }
    }
}
