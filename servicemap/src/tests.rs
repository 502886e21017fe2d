//! Every scenario of `../shared/k8s-recorded/cilium/` mapped, against the frontends and
//! backends kube-proxy would program (the scenario notes in that folder's README). The objects
//! are read as recorded; only the graceful-termination template is substituted here.

use std::{net::IpAddr, path::PathBuf};

use datapath_api::{BackendState, Protocol};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::*;

fn recorded(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/k8s-recorded/cilium");
    let file = root.join(path);
    std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "{} (../shared must sit beside the clone): {e}",
            file.display()
        )
    })
}

fn service(path: &str) -> Service {
    serde_yaml_ng::from_str(&recorded(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn slice(path: &str) -> EndpointSlice {
    serde_yaml_ng::from_str(&recorded(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn node(name: &str) -> NodeContext {
    NodeContext {
        name: name.into(),
        zone: None,
        addresses: vec![ip("172.18.0.2")],
    }
}

fn map(svc: &Service, slices: &[EndpointSlice], node: &NodeContext) -> Mapped {
    let refs: Vec<&EndpointSlice> = slices.iter().collect();
    let mapped = map_service(svc, &refs, node).unwrap();
    // Every scenario maps the same from the compact copies the Kubernetes source keeps.
    let mut names = compact::Names::default();
    let expanded: Vec<EndpointSlice> = slices
        .iter()
        .map(|s| compact::CompactSlice::new(s, &mut names).expand())
        .collect();
    let refs: Vec<&EndpointSlice> = expanded.iter().collect();
    assert_eq!(
        map_service(svc, &refs, node).unwrap(),
        mapped,
        "mapped differently from the compact slices"
    );
    mapped
}

/// (kind, addr, port, proto) of each frontend, and its backends as (addr, port, state).
type Row = (
    FrontendKind,
    IpAddr,
    u16,
    Protocol,
    Vec<(IpAddr, u16, BackendState)>,
);

fn rows(m: &Mapped) -> Vec<Row> {
    m.frontends
        .iter()
        .map(|f| {
            (
                f.kind,
                f.addr,
                f.port,
                f.proto,
                f.backends
                    .iter()
                    .map(|b| (b.addr, b.port, b.state))
                    .collect(),
            )
        })
        .collect()
}

fn active(addr: &str, port: u16) -> (IpAddr, u16, BackendState) {
    (ip(addr), port, BackendState::Active)
}

fn draining(addr: &str, port: u16) -> (IpAddr, u16, BackendState) {
    (ip(addr), port, BackendState::Draining)
}

use FrontendKind::*;
use Protocol::*;

#[test]
fn clusterip_joins_the_slice_by_label_and_matches_the_port_by_name() {
    let m = map(
        &service("clusterip/service.yaml"),
        &[slice("clusterip/endpointslice.yaml")],
        &node("x"),
    );
    assert_eq!(
        rows(&m),
        vec![(
            ClusterIp,
            ip("10.96.50.104"),
            80,
            Tcp,
            vec![active("10.244.1.1", 80)]
        )]
    );
    assert_eq!(m.skipped, None);
}

#[test]
fn dualstack_makes_one_vip_per_family_with_that_family_backends_only() {
    let m = map(
        &service("dualstack/service1.yaml"),
        &[
            slice("dualstack/endpointslice1.yaml"),
            slice("dualstack/endpointslice2.yaml"),
        ],
        &NodeContext {
            name: "dual-stack-worker".into(),
            zone: None,
            addresses: vec![ip("172.18.0.2")],
        },
    );
    let v4: Vec<_> = m
        .frontends
        .iter()
        .filter(|f| f.kind == ClusterIp && f.addr.is_ipv4())
        .collect();
    let v6: Vec<_> = m
        .frontends
        .iter()
        .filter(|f| f.kind == ClusterIp && f.addr.is_ipv6())
        .collect();
    assert_eq!(v4.len(), 2, "http/TCP and tftp/UDP: {m:#?}");
    assert_eq!(v6.len(), 2, "{m:#?}");
    for f in v4.iter().chain(&v6) {
        assert_eq!(f.backends.len(), 2, "{f:#?}");
        assert!(
            f.backends
                .iter()
                .all(|b| b.addr.is_ipv4() == f.addr.is_ipv4()),
            "families mixed: {f:#?}"
        );
    }
    let tftp6 = v6.iter().find(|f| f.proto == Udp).unwrap();
    assert_eq!((tftp6.addr, tftp6.port), (ip("fd00:10:96::b050"), 69));
    assert!(tftp6.backends.iter().all(|b| b.port == 69));
    // NodePort on the node's (IPv4) address: both ports, IPv4 backends.
    let np: Vec<_> = m.frontends.iter().filter(|f| f.kind == NodePort).collect();
    assert_eq!(
        np.iter()
            .map(|f| (f.addr, f.port, f.proto))
            .collect::<Vec<_>>(),
        vec![
            (ip("172.18.0.2"), 30181, Tcp),
            (ip("172.18.0.2"), 32757, Udp)
        ]
    );
    assert!(np.iter().all(|f| f.backends.len() == 2));
}

fn graceful(ready1: bool, term1: bool, ready2: bool, term2: bool) -> EndpointSlice {
    let text = recorded("graceful-termination/endpointslice.yaml.tmpl")
        .replace("$READY1", &ready1.to_string())
        .replace("$TERM1", &term1.to_string())
        .replace("$READY2", &ready2.to_string())
        .replace("$TERM2", &term2.to_string());
    serde_yaml_ng::from_str(&text).unwrap()
}

#[test]
fn graceful_termination_drains_and_falls_back_when_no_endpoint_is_ready() {
    let svc = service("graceful-termination/service.yaml");
    let n = node("graceful-term-control-plane");
    let backends = |s: EndpointSlice| {
        let m = map(&svc, &[s], &n);
        let cluster: Vec<_> = rows(&m).into_iter().filter(|r| r.0 == ClusterIp).collect();
        assert_eq!(cluster.len(), 1, "{m:#?}");
        cluster[0].4.clone()
    };
    // The recorded slice: one endpoint, serving and terminating, none ready.
    let recorded = map(
        &svc,
        &[slice("graceful-termination/endpointslice.yaml")],
        &n,
    );
    assert!(
        recorded.frontends.iter().all(|f| f.backends.len() == 1),
        "{recorded:#?}"
    );
    // Upstream's sequence: active/active -> terminating/active -> terminating/terminating.
    assert_eq!(
        backends(graceful(true, false, true, false)),
        vec![active("10.244.0.112", 8081), active("10.244.0.113", 8081)]
    );
    assert_eq!(
        backends(graceful(false, true, true, false)),
        vec![draining("10.244.0.112", 8081), active("10.244.0.113", 8081)]
    );
    // Nothing ready: the terminating endpoints take new flows rather than none.
    assert_eq!(
        backends(graceful(false, true, false, true)),
        vec![active("10.244.0.112", 8081), active("10.244.0.113", 8081)]
    );
}

#[test]
fn graceful_termination_unnamed_port_matches_unnamed_slice_port() {
    let svc = service("graceful-termination/service.yaml");
    let m = map(
        &svc,
        &[graceful(true, false, true, false)],
        &node("graceful-term-control-plane"),
    );
    let f = m.frontends.iter().find(|f| f.kind == ClusterIp).unwrap();
    assert_eq!(f.port_name, "");
    assert!(f.backends.iter().all(|b| b.port == 8081));
}

#[test]
fn multiport_takes_each_backend_port_from_the_slice_port_of_the_same_name() {
    let m = map(
        &service("multiport/service.yaml"),
        &[slice("multiport/endpointslice.yaml")],
        &node("x"),
    );
    let mut got: Vec<(u16, String, Vec<u16>)> = m
        .frontends
        .iter()
        .map(|f| {
            (
                f.port,
                f.port_name.clone(),
                f.backends.iter().map(|b| b.port).collect(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got.len(), 2, "{m:#?}");
    assert_eq!((got[0].0, got[0].1.as_str()), (80, "http"));
    assert_eq!((got[1].0, got[1].1.as_str()), (443, "https"));
    // The slice lists the ports in its own order: the numbers follow the names.
    let s = slice("multiport/endpointslice.yaml");
    for (port, name, backend_ports) in &got {
        let want = s
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .unwrap()
            .port
            .unwrap();
        assert!(
            backend_ports.iter().all(|p| i32::from(*p) == want),
            "port {port} ({name}) got {backend_ports:?}, want {want}"
        );
    }
}

#[test]
fn nodeport_endpoints_without_conditions_are_ready_and_slices_join_by_label() {
    let n = node("nodeport-worker");
    let slices = [
        slice("nodeport-simple/endpointslice.yaml"),
        slice("nodeport-simple/endpointslice2.yaml"),
    ];
    let echo = map(&service("nodeport-simple/service.yaml"), &slices, &n);
    let echo2 = map(&service("nodeport-simple/service2.yaml"), &slices, &n);
    for (m, nodeport) in [(&echo, 30781), (&echo2, 30782)] {
        let np = m.frontends.iter().find(|f| f.kind == NodePort).unwrap();
        assert_eq!((np.addr, np.port), (ip("172.18.0.2"), nodeport));
        assert_eq!(np.backends.len(), 9, "{np:#?}");
        assert!(np.backends.iter().all(|b| b.state == BackendState::Active));
        let cluster = m.frontends.iter().find(|f| f.kind == ClusterIp).unwrap();
        assert_eq!(cluster.backends, np.backends);
    }
    // Same selector, different slices: the two Services do not share backends by accident.
    assert_eq!(
        echo.frontends[0].backends.len() + echo2.frontends[0].backends.len(),
        18
    );
}

#[test]
fn an_endpoint_with_several_addresses_contributes_its_first_only() {
    let s = slice("nodeport-simple/endpointslice.2014d174.yaml");
    assert!(s.endpoints.iter().any(|e| e.addresses.len() > 1));
    let first = s.endpoints[0].addresses[0].clone();
    let m = map(
        &service("nodeport-simple/service.yaml"),
        &[s],
        &node("nodeport-worker"),
    );
    let cluster = m.frontends.iter().find(|f| f.kind == ClusterIp).unwrap();
    assert_eq!(
        cluster.backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
        vec![ip(&first)]
    );
}

#[test]
fn source_ranges_guard_the_load_balancer_address_and_cluster_ip_falls_back() {
    let m = map(
        &service("source-ranges/service.yaml"),
        &[slice("source-ranges/endpointslice.yaml")],
        &node("x"),
    );
    let lb = m.frontends.iter().find(|f| f.kind == LoadBalancer).unwrap();
    assert_eq!(lb.addr, ip("10.0.0.2"));
    assert_eq!(
        lb.source_ranges,
        vec![Prefix {
            addr: ip("10.0.0.0"),
            len: 8
        }]
    );
    let cluster = m.frontends.iter().find(|f| f.kind == ClusterIp).unwrap();
    assert_eq!(
        cluster.addr,
        ip("10.0.0.1"),
        "from clusterIP: no clusterIPs"
    );
    assert!(cluster.source_ranges.is_empty());
    assert!(
        !m.frontends.iter().any(|f| f.kind == NodePort),
        "no nodePort"
    );
    assert!(!lb.backends.is_empty());
}

#[test]
fn headless_services_get_no_vip_by_clusterip_none_or_by_label() {
    let slices = [slice("headless/endpointslice.yaml")];
    let none = map(
        &service("headless/service_clusterip_none.yaml"),
        &slices,
        &node("x"),
    );
    assert_eq!(none.skipped, Some(SkipReason::Headless));
    assert!(none.frontends.is_empty());
    // The same Service with a VIP, then with the headless label in place of the placeholder.
    let plain = service("headless/service.yaml");
    assert_eq!(map(&plain, &slices, &node("x")).frontends.len(), 1);
    let labelled: Service = serde_yaml_ng::from_str(
        &recorded("headless/service.yaml")
            .replace("placeholder: \"\"", "service.kubernetes.io/headless: \"\""),
    )
    .unwrap();
    let m = map(&labelled, &slices, &node("x"));
    assert_eq!(m.skipped, Some(SkipReason::Headless));
    assert!(m.frontends.is_empty());
}

#[test]
fn only_slices_labelled_for_the_service_in_its_namespace_back_it() {
    let svc = service("clusterip/service.yaml");
    let own = slice("clusterip/endpointslice.yaml");
    let mut elsewhere = own.clone();
    elsewhere.metadata.namespace = Some("other".into());
    let mut other_service = own.clone();
    other_service
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(SERVICE_NAME_LABEL.into(), "not-echo".into());
    // Named like a slice of echo, but without the label: names do not join.
    let mut unlabelled = own.clone();
    unlabelled.metadata.labels = None;
    let m = map(&svc, &[elsewhere, other_service, unlabelled], &node("x"));
    assert_eq!(m.frontends.len(), 1, "the VIP stays: {m:#?}");
    assert!(m.frontends[0].backends.is_empty(), "{m:#?}");
    assert_eq!(map(&svc, &[own], &node("x")).frontends[0].backends.len(), 1);
}

#[test]
fn external_clusterip_minimal_objects_need_no_optional_metadata() {
    let m = map(
        &service("external-clusterip/service.yaml"),
        &[slice("external-clusterip/endpointslice.yaml")],
        &node("x"),
    );
    assert_eq!(m.skipped, None, "{m:#?}");
    assert!(!m.frontends.is_empty());
    assert!(m.frontends.iter().all(|f| !f.backends.is_empty()), "{m:#?}");
}

#[test]
fn loadbalancer_yields_cluster_node_port_and_ingress_frontends() {
    let svc = service("loadbalancer/service.yaml");
    let s = slice("loadbalancer/endpointslice.yaml");
    let n = NodeContext {
        name: "x".into(),
        zone: None,
        addresses: vec![ip("172.18.0.2"), ip("172.19.0.3")],
    };
    let m = map(&svc, std::slice::from_ref(&s), &n);
    assert_eq!(
        m.frontends
            .iter()
            .map(|f| (f.kind, f.addr, f.port))
            .collect::<Vec<_>>(),
        vec![
            (ClusterIp, ip("10.96.50.104"), 80),
            (LoadBalancer, ip("172.16.1.1"), 80),
            (NodePort, ip("172.18.0.2"), 30781),
            (NodePort, ip("172.19.0.3"), 30781),
        ]
    );
    let backends = &m.frontends[0].backends;
    assert!(!backends.is_empty());
    assert!(m.frontends.iter().all(|f| &f.backends == backends));
    // The slice deleted first: the frontends stay, with no backends.
    let gone = map(&svc, &[], &n);
    assert_eq!(gone.frontends.len(), 4);
    assert!(gone.frontends.iter().all(|f| f.backends.is_empty()));
}

#[test]
fn traffic_policy_local_keeps_only_this_node_endpoints() {
    let m = map(
        &service("trafficpolicy/service.yaml"),
        &[slice("trafficpolicy/endpointslice.yaml")],
        &node("testnode"),
    );
    assert!(!m.frontends.is_empty());
    for f in &m.frontends {
        assert_eq!(
            f.backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
            vec![ip("10.244.1.1")],
            "{f:#?}"
        );
    }
    // On the other node, the other endpoint.
    let other = map(
        &service("trafficpolicy/service.yaml"),
        &[slice("trafficpolicy/endpointslice.yaml")],
        &node("othernode"),
    );
    assert!(
        other.frontends.iter().all(
            |f| f.backends.iter().map(|b| b.addr).collect::<Vec<_>>() == vec![ip("10.244.2.1")]
        )
    );
}

#[test]
fn topology_aware_uses_the_zone_hints_and_falls_back_to_all() {
    let svc = service("topology-aware/service.yaml");
    let slices = [
        slice("topology-aware/endpointslice.yaml"),
        slice("topology-aware/endpointslice2.yaml"),
    ];
    let in_zone = |zone: Option<&str>| {
        let m = map(
            &svc,
            &slices,
            &NodeContext {
                name: "x".into(),
                zone: zone.map(str::to_string),
                addresses: vec![],
            },
        );
        let mut addrs: Vec<IpAddr> = m.frontends[0].backends.iter().map(|b| b.addr).collect();
        addrs.sort();
        addrs
    };
    assert_eq!(in_zone(Some("foo")), vec![ip("10.244.1.1")]);
    assert_eq!(in_zone(Some("bar")), vec![ip("10.244.1.1")]);
    assert_eq!(in_zone(Some("quux")), vec![ip("10.244.2.1")]);
    // No endpoint hinted for the zone, or no zone known: every endpoint (kube-proxy's choice).
    assert_eq!(
        in_zone(Some("elsewhere")),
        vec![ip("10.244.1.1"), ip("10.244.2.1")]
    );
    assert_eq!(in_zone(None), vec![ip("10.244.1.1"), ip("10.244.2.1")]);
    // trafficDistribution: PreferClose turns it on as the annotation does.
    let text = recorded("topology-aware/service.yaml")
        .replace("  #trafficDistribution", "  trafficDistribution")
        .replace(
            "    service.kubernetes.io/topology-mode: auto\n",
            "    x: y\n",
        );
    let prefer: Service = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(
        prefer
            .spec
            .as_ref()
            .unwrap()
            .traffic_distribution
            .as_deref(),
        Some("PreferClose")
    );
    let m = map(
        &prefer,
        &slices,
        &NodeContext {
            name: "x".into(),
            zone: Some("quux".into()),
            addresses: vec![],
        },
    );
    assert_eq!(
        m.frontends[0]
            .backends
            .iter()
            .map(|b| b.addr)
            .collect::<Vec<_>>(),
        vec![ip("10.244.2.1")]
    );
}

#[test]
fn svc_type_annotation_is_ignored_and_each_update_replaces_the_frontend_set() {
    let s = slice("svc-type-annotation/endpointslice.yaml");
    let n = node("x");
    let sets: Vec<Vec<(FrontendKind, IpAddr, u16)>> = [
        "svc-type-annotation/service.yaml",
        "svc-type-annotation/service-loadbalancer.yaml",
        "svc-type-annotation/service-nodeport.yaml",
        "svc-type-annotation/service-clusterip.yaml",
    ]
    .iter()
    .map(|p| {
        map(&service(p), std::slice::from_ref(&s), &n)
            .frontends
            .iter()
            .map(|f| (f.kind, f.addr, f.port))
            .collect()
    })
    .collect();
    for set in &sets {
        assert_eq!(set, &sets[0], "the Cilium annotation changed the frontends");
    }
    assert_eq!(sets[0].len(), 3, "{:?}", sets[0]);
    // The mapping is of the whole current object: the 742 update's set is the set, not a union
    // with 741's. A ClusterIP update of the same Service drops the other two.
    let narrowed: Service = serde_yaml_ng::from_str(
        &recorded("svc-type-annotation/service-clusterip.yaml")
            .replace("type: LoadBalancer", "type: ClusterIP"),
    )
    .unwrap();
    let m = map(&narrowed, &[s], &n);
    assert_eq!(
        m.frontends
            .iter()
            .map(|f| (f.kind, f.addr, f.port))
            .collect::<Vec<_>>(),
        vec![(ClusterIp, ip("10.96.50.104"), 80)]
    );
}

#[test]
fn duplicate_endpoints_across_slices_keep_the_newest_slice() {
    let old = slice("clusterip/endpointslice.yaml");
    let mut new = old.clone();
    new.metadata.name = Some("echo-newer".into());
    new.metadata.resource_version = Some("9999".into());
    new.endpoints[0].conditions = Some(k8s_openapi::api::discovery::v1::EndpointConditions {
        ready: Some(false),
        serving: Some(true),
        terminating: Some(true),
    });
    // A second ready endpoint so that the draining one is not promoted by the fallback.
    let mut other = new.endpoints[0].clone();
    other.addresses = vec!["10.244.1.2".into()];
    other.conditions = None;
    new.endpoints.push(other);
    let m = map(&service("clusterip/service.yaml"), &[old, new], &node("x"));
    assert_eq!(
        rows(&m)[0].4,
        vec![draining("10.244.1.1", 80), active("10.244.1.2", 80)]
    );
}

#[test]
fn bad_values_are_skipped_and_noted_never_routed() {
    // k8s.io/api's round-trip fixtures: every field set, with placeholder enum values.
    let root =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/k8s-recorded/kubernetes");
    let svc: Service =
        serde_json::from_str(&std::fs::read_to_string(root.join("core.v1.Service.json")).unwrap())
            .unwrap();
    let s: EndpointSlice = serde_json::from_str(
        &std::fs::read_to_string(root.join("discovery.k8s.io.v1.EndpointSlice.json")).unwrap(),
    )
    .unwrap();
    let m = map_service(&svc, &[&s], &node("x")).unwrap();
    assert!(m.frontends.is_empty(), "{m:#?}");
    assert!(m.skipped.is_some() || !m.notes.is_empty(), "{m:#?}");
    // SCTP and an unparsable address in an otherwise good Service.
    let mut svc = service("clusterip/service.yaml");
    let spec = svc.spec.as_mut().unwrap();
    let mut sctp = spec.ports.as_ref().unwrap()[0].clone();
    sctp.protocol = Some("SCTP".into());
    sctp.name = Some("s".into());
    spec.ports.as_mut().unwrap().push(sctp);
    spec.cluster_ips = Some(vec!["10.96.50.104".into(), "not-an-ip".into()]);
    let m = map(&svc, &[slice("clusterip/endpointslice.yaml")], &node("x"));
    assert_eq!(m.frontends.len(), 1, "{m:#?}");
    assert!(m.notes.iter().any(|n| n.contains("SCTP")), "{:?}", m.notes);
    assert!(
        m.notes.iter().any(|n| n.contains("not-an-ip")),
        "{:?}",
        m.notes
    );
}

#[test]
fn session_affinity_client_ip_is_reported_not_ignored() {
    let mut svc = service("clusterip/service.yaml");
    svc.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    let m = map(&svc, &[slice("clusterip/endpointslice.yaml")], &node("x"));
    assert!(
        m.notes
            .iter()
            .any(|n| n.contains("sessionAffinity ClientIP")),
        "{:?}",
        m.notes
    );
}

#[test]
fn external_name_gets_no_vip() {
    let mut svc = service("clusterip/service.yaml");
    svc.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
    let m = map(&svc, &[], &node("x"));
    assert_eq!(m.skipped, Some(SkipReason::ExternalName));
}
