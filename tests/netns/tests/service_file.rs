//! The services-file source end to end: datapathd watches a YAML file, applies it by
//! difference, refuses an invalid version with its line and key (the old state keeps serving),
//! owns what it declares against lb-ctl, and restores it after a restart. Real namespaces,
//! veths, XDP and TCP.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use datapath_api::{BackendState, Protocol, ServiceSource, ServiceView, SourceStatus, SourcesView};
use netns_tests::{
    Daemon, Lab, LabOptions, TopologyOptions,
    client::{self, sock},
    lab::{BACKEND_PORT, TCP_SERVICE_PORT},
    privileged,
    topology::VIP,
};

fn ok<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// A services file with one service `web` on the VIP, over `backends` (ip, state).
fn file(backends: &[(IpAddr, &str)]) -> String {
    let mut s = format!(
        "services:\n  - name: web\n    vip: {VIP}\n    port: {TCP_SERVICE_PORT}\n    backends:\n"
    );
    for (ip, state) in backends {
        s.push_str(&format!(
            "      - addr: {ip}\n        port: {BACKEND_PORT}\n        state: {state}\n"
        ));
    }
    s
}

/// Replaces the file the way editors do: a new file renamed over the old one.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn vip_service(d: &Daemon) -> Option<ServiceView> {
    d.service(IpAddr::V4(VIP), TCP_SERVICE_PORT, Protocol::Tcp)
        .ok()
}

fn file_status(d: &Daemon) -> SourceStatus {
    let v: SourcesView =
        serde_json::from_value(ok("sources", d.lb_ctl_json(&["sources"]))).unwrap();
    v.sources
        .into_iter()
        .find(|s| s.source == ServiceSource::File)
        .unwrap()
}

fn wait_for<T>(what: &str, d: &Daemon, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not reached in 15 s; service {:#?}\nsource {:#?}\n{}",
                vip_service(d),
                file_status(d),
                d.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn states(v: &ServiceView) -> Vec<(IpAddr, BackendState, u32)> {
    v.backends.iter().map(|b| (b.addr, b.state, b.id)).collect()
}

#[test]
fn services_file_is_applied_by_difference_and_owns_its_services() {
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
    let services = ok("scratch", lab.scratch()).join("services.yaml");
    write(&services, &file(&[(b1, "active"), (b2, "active")]));
    ok(
        "daemon",
        lab.start_daemon_with_config(&format!(
            "reload:\n  watch: false\nservice_file:\n  path: {}\n",
            services.display()
        )),
    );
    let d = lab.daemon();

    let first = wait_for("the file applied", d, || {
        vip_service(d).filter(|v| v.backends.len() == 2)
    });
    assert_eq!(first.source, ServiceSource::File);
    assert_eq!(first.owner.as_deref(), Some("web"));
    let spread = ok("flows", client::tcp_spread_in(lab.client_ns(), vip, 100));
    assert!(spread.errors.is_empty(), "{}", spread.table());
    assert!(
        spread.count("b1") > 0 && spread.count("b2") > 0,
        "{}",
        spread.table()
    );
    let mut conns = ok(
        "long-lived connections",
        client::connect_until_each_in(lab.client_ns(), vip, &["b1", "b2"], 1, 40),
    );

    // Changed by difference: b1 drains and b3 joins; b2 keeps its slot, and b1's connections
    // continue.
    write(
        &services,
        &file(&[(b1, "draining"), (b2, "active"), (b3, "active")]),
    );
    let second = wait_for("the change applied", d, || {
        vip_service(d).filter(|v| v.backends.len() == 3)
    });
    let slot = |v: &ServiceView, ip: IpAddr| v.backends.iter().find(|b| b.addr == ip).map(|b| b.id);
    assert_eq!(slot(&second, b2), slot(&first, b2));
    assert_eq!(slot(&second, b1), slot(&first, b1));
    assert_eq!(
        second.backends.iter().find(|b| b.addr == b1).unwrap().state,
        BackendState::Draining
    );
    for c in conns.iter_mut() {
        ok("a connection across the change", c.ping());
    }

    // An invalid file is refused with its line and key; the service stays as it was.
    let errors = file_status(d).sync_errors;
    write(&services, &file(&[(b1, "active"), (b2, "sleeping")]));
    let st = wait_for("the refusal", d, || {
        Some(file_status(d)).filter(|s| s.sync_errors > errors)
    });
    let e = st.last_error.unwrap();
    assert!(
        e.contains("line 11") && e.contains("key `services[0].backends[1].state`"),
        "{e}"
    );
    assert_eq!(vip_service(d).map(|v| states(&v)), Some(states(&second)));

    // The file owns it: lb-ctl is refused with exit code 8, unless forced.
    let b3_arg = sock(lab.topo.backend("b3").ip, BACKEND_PORT).to_string();
    let o = ok(
        "lb-ctl",
        d.lb_ctl(&["backend", "remove", &vip.to_string(), &b3_arg]),
    );
    assert_eq!(o.status.code(), Some(8), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("belongs to the file source (web)"));
    ok(
        "forced",
        d.lb_ctl_ok(&["backend", "remove", &vip.to_string(), &b3_arg, "--force"]),
    );
    assert_eq!(vip_service(d).unwrap().backends.len(), 2);

    // A restart restores the file's services before the file is read again, with their slots.
    write(
        &services,
        &file(&[(b1, "draining"), (b2, "active"), (b3, "active")]),
    );
    let third = wait_for("the file again", d, || {
        vip_service(d).filter(|v| v.backends.len() == 3)
    });
    ok("restart", lab.daemon_mut().restart());
    let d = lab.daemon();
    let restored = vip_service(d).expect("restored at once");
    assert_eq!(restored.source, ServiceSource::File);
    assert_eq!(states(&restored), states(&third));
    for c in conns.iter_mut() {
        ok("a connection across the restart", c.ping());
    }

    // An empty declaration removes what the file declared.
    write(&services, "services: []\n");
    wait_for("the removal", d, || vip_service(d).is_none().then_some(()));
}
