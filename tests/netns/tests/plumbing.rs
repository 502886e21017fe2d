//! The topology itself, without the load balancer: the LB node's kernel forwards between the
//! client and the backends, the servers answer, and teardown removes everything.

use netns_tests::{
    Lab, LabOptions, TopologyOptions, client, netns, privileged,
    topology::{self, CLIENT_IP, LB_BACKEND_IP, VIP},
};

fn lab_without_daemon(backends: usize, dsr: bool) -> Lab {
    Lab::start(LabOptions {
        topology: TopologyOptions {
            backends,
            dsr,
            ipv6: false,
        },
        daemon: None,
    })
    .expect("building the topology")
}

#[test]
fn topology_plumbing_direct() {
    if !privileged() {
        return;
    }
    let lab = lab_without_daemon(4, false);
    let client_ns = lab.client_ns().to_string();
    for b in &lab.topo.backends {
        let addr = lab.backend_addr(&b.name);

        // TCP straight to the backend, routed by the LB node's kernel.
        let mut conn = client::connect_in(&client_ns, addr).expect("direct TCP connection");
        assert_eq!(conn.backend, b.name, "greeting from {addr}");
        assert_eq!(conn.peer, addr);
        assert_eq!(conn.local.ip(), CLIENT_IP);
        for _ in 0..3 {
            conn.ping().expect("echo over a direct connection");
        }
        // The server saw the client's own address: nothing translated it.
        assert!(
            lab.server(&b.name)
                .local_addrs()
                .iter()
                .all(|a| a.ip() == b.ip),
            "server {} local addresses",
            b.name
        );

        // UDP: several flows, all answered by this backend.
        let spread =
            client::udp_spread_in(&client_ns, addr, 5, 30000 + 100 * b.ip.octets()[3] as u16)
                .expect("udp burst");
        assert!(spread.errors.is_empty(), "udp errors: {:?}", spread.errors);
        assert_eq!(spread.count(&b.name), 5, "udp answers: {:?}", spread.counts);
    }
    // The backends route back through the LB node, not around it.
    assert!(lab.topo.backends.iter().all(|b| b.ip != LB_BACKEND_IP));
}

#[test]
fn topology_plumbing_direct_dsr_variant() {
    if !privileged() {
        return;
    }
    let lab = lab_without_daemon(3, true);
    for s in &lab.servers {
        assert_eq!(
            s.addr,
            client::sock(VIP, 80),
            "DSR servers listen on the VIP"
        );
    }
    // Without the load balancer, let the LB node's kernel route the VIP to b1: b1 accepts it
    // (the VIP is on its lo) and answers from the VIP, back through the LB node's kernel.
    topology::ip_in(
        &lab.topo.lb,
        &[
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            &lab.topo.backends[0].ip.to_string(),
        ],
    )
    .expect("route for the VIP");
    let vip = client::sock(VIP, 80);
    let mut conn = client::connect_in(lab.client_ns(), vip).expect("connect to the VIP");
    assert_eq!(conn.backend, "b1");
    assert_eq!(conn.peer, vip);
    conn.ping().expect("echo");
    assert_eq!(
        lab.server("b1")
            .local_addrs()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![vip]
    );

    // b2's own address has no listener on port 80 (its servers bound the VIP only): a RST,
    // which also proves the round trip through the LB node.
    let addr = client::sock(lab.topo.backends[1].ip, 80);
    let refused = netns::run_in(lab.client_ns(), || std::net::TcpStream::connect(addr))
        .expect("entering client namespace");
    let err = refused.expect_err("nothing listens on the backend's own address");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn topology_teardown_removes_namespaces() {
    if !privileged() {
        return;
    }
    let lab = lab_without_daemon(3, false);
    let names: Vec<String> = lab
        .topo
        .namespaces()
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names.len(), 6, "client, lb, switch, 3 backends: {names:?}");
    assert!(names.iter().all(|n| netns::exists(n)));
    drop(lab);
    for n in &names {
        assert!(!netns::exists(n), "namespace {n} still exists after drop");
    }
}
