//! The netlink controller with the real daemon, namespaces, veths and traffic (issue 12):
//!
//! - interfaces that match the patterns get XDP and TCX when they appear, lose them (and their
//!   pins) when they go, and get them again when re-created under the same name;
//! - a program detached by hand is attached again, and counted;
//! - a backend's new MAC takes effect on the next packet, with a 60 s FIB cache;
//! - backends' next hops are managed neighbours, removed with the backend;
//! - an overrun of a tiny receive buffer is resynced: the daemon's view equals the kernel's.
//!
//! Run with `cargo xtask test --only netns`, or after `cargo build -p datapath -p lb-ctl`:
//! `cargo test -p netns-tests --test netlink -- --test-threads=1` (as root).

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use datapath_api::{NodeView, Protocol, ServiceView, StatusView};
use netns_tests::{
    Binaries, Daemon, DaemonOptions, Lab, LabOptions, client, cmd, http,
    lab::UDP_SERVICE_PORT,
    netns, privileged,
    topology::{CLIENT_IP, LB_CLIENT_IP, TopologyOptions, VIP, ip_in},
};

const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
const METRICS_PORT: u16 = 9477;

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// Polls `f` every 20 ms until it answers, for at most 10 s; answers the value and how long
/// it took.
fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        thread::sleep(POLL);
    }
}

fn status(d: &Daemon) -> StatusView {
    ok(
        "lb-ctl status",
        d.lb_ctl_json(&["status"])
            .and_then(|v| Ok(serde_json::from_value(v)?)),
    )
}

fn node(d: &Daemon) -> NodeView {
    ok(
        "lb-ctl node",
        d.lb_ctl_json(&["node"])
            .and_then(|v| Ok(serde_json::from_value(v)?)),
    )
}

fn attached(st: &StatusView, name: &str) -> Option<(u32, Vec<String>)> {
    st.links
        .iter()
        .find(|l| l.name == name)
        .map(|l| (l.ifindex, l.attached.clone()))
}

fn scrape(lab: &Lab) -> String {
    let (code, body) = ok(
        "GET /metrics",
        http::get_in(
            &lab.topo.client,
            client::sock(LB_CLIENT_IP, METRICS_PORT),
            "/metrics",
        ),
    );
    assert_eq!(code, 200, "{body}");
    body
}

fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(k, _)| *k == key))
        .and_then(|(_, v)| v.parse().ok())
}

/// A lab whose daemon runs with `config`, written to a file.
fn lab_with(config: &str) -> Option<(Lab, PathBuf)> {
    if !privileged() {
        return None;
    }
    let mut lab = ok(
        "setting up the lab",
        Lab::start(LabOptions {
            topology: TopologyOptions::default(),
            daemon: None,
        }),
    );
    let path = std::env::temp_dir().join(format!("datapath-netns-{}.yaml", lab.topo.prefix));
    std::fs::write(&path, config).unwrap();
    let opts = DaemonOptions {
        ifaces: false,
        wait_ready: true,
        extra_args: vec!["--config".into(), path.display().to_string()],
    };
    let started = Daemon::start_with(&lab.topo.lb, &lab.topo.prefix, Binaries::from_env(), opts);
    lab.daemon = Some(ok("starting datapathd", started));
    Some((lab, path))
}

fn xdp_pin(d: &Daemon, iface: &str) -> PathBuf {
    d.pin_root.join("lb/links").join(format!("xdp_lb_{iface}"))
}

fn tcx_pins(d: &Daemon, iface: &str) -> [PathBuf; 2] {
    ["tc_ingress", "tc_egress"]
        .map(|p| d.pin_root.join("policy/links").join(format!("{p}_{iface}")))
}

/// The id of the link pinned at `pin` (`bpftool link show pinned`).
fn link_id(pin: &Path) -> u64 {
    let out = ok(
        "bpftool link show pinned",
        cmd::run_args(
            "bpftool",
            &["-j", "link", "show", "pinned", &pin.display().to_string()],
        ),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["id"].as_u64().unwrap_or_else(|| panic!("no id in {out}"))
}

/// Whether an XDP program is attached to `dev` in `ns`, as `ip link` shows it (this
/// machine's bpftool predates TCX; the TCX links are checked through their pins and the
/// kernel's link info, which the daemon's status reports).
fn xdp_on(ns: &str, dev: &str) -> bool {
    ok(
        "ip link show",
        ip_in(ns, &["-d", "link", "show", "dev", dev]),
    )
    .contains("prog/xdp")
}

const LINKS_CONFIG: &str = "lb:\n  interfaces: [lbc, lbb, \"lbx*\"]\n\
                            policy:\n  enabled: true\n  interfaces: [\"lbx*\"]\n";

#[test]
fn interfaces_that_appear_go_and_come_back_are_attached_detached_and_attached_again() {
    let Some((lab, path)) = lab_with(LINKS_CONFIG) else {
        return;
    };
    let d = lab.daemon();
    let ns = lab.topo.lb.clone();
    ok(
        "adding lbx0",
        ip_in(
            &ns,
            &[
                "link", "add", "lbx0", "type", "veth", "peer", "name", "plbx0",
            ],
        ),
    );
    let ((first, kinds), took) = wait_until("lbx0 attached", || {
        attached(&status(d), "lbx0").filter(|(_, a)| a.len() == 3)
    });
    assert_eq!(kinds, ["xdp", "tcx-ingress", "tcx-egress"]);
    eprintln!("lbx0 attached {took:?} after it appeared");
    assert!(xdp_pin(d, "lbx0").exists());
    for pin in tcx_pins(d, "lbx0") {
        assert!(pin.exists(), "{}", pin.display());
    }
    assert!(xdp_on(&ns, "lbx0"));
    // The peer does not match the pattern.
    assert_eq!(attached(&status(d), "plbx0").map(|(_, a)| a), Some(vec![]));

    ok("deleting lbx0", ip_in(&ns, &["link", "del", "lbx0"]));
    wait_until("lbx0 detached and unpinned", || {
        let gone = attached(&status(d), "lbx0").is_none()
            && !xdp_pin(d, "lbx0").exists()
            && tcx_pins(d, "lbx0").iter().all(|p| !p.exists());
        gone.then_some(())
    });

    ok(
        "re-creating lbx0",
        ip_in(
            &ns,
            &[
                "link", "add", "lbx0", "type", "veth", "peer", "name", "plbx0",
            ],
        ),
    );
    let ((again, _), _) = wait_until("lbx0 attached again", || {
        attached(&status(d), "lbx0").filter(|(_, a)| a.len() == 3)
    });
    assert_ne!(first, again, "a new ifindex");
    assert!(xdp_on(&ns, "lbx0"));
    assert!(xdp_pin(d, "lbx0").exists());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_program_detached_by_hand_is_attached_again_and_counted() {
    let config = "lb:\n  interfaces: [lbc, lbb]\n  attach_watchdog_ms: 200\n\
                  policy:\n  enabled: true\n  interfaces: [lbb]\n  attach_watchdog_ms: 200\n";
    let Some((lab, path)) = lab_with(config) else {
        return;
    };
    let d = lab.daemon();
    let xdp = xdp_pin(d, "lbc");
    let [ingress, _] = tcx_pins(d, "lbb");
    let (xdp_before, tcx_before) = (link_id(&xdp), link_id(&ingress));
    ok(
        "bpftool link detach (XDP)",
        cmd::run_args(
            "bpftool",
            &["link", "detach", "id", &xdp_before.to_string()],
        ),
    );
    ok(
        "bpftool link detach (TCX)",
        cmd::run_args(
            "bpftool",
            &["link", "detach", "id", &tcx_before.to_string()],
        ),
    );
    let (st, took) = wait_until("both re-attached", || {
        let st = status(d);
        (st.netlink.as_ref().is_some_and(|n| n.reattachments == 2)).then_some(st)
    });
    eprintln!("re-attached within {took:?}");
    assert_ne!(link_id(&xdp), xdp_before, "a new XDP link");
    assert_ne!(link_id(&ingress), tcx_before, "a new TCX link");
    assert!(xdp_on(&lab.topo.lb, "lbc"));
    assert_eq!(
        attached(&st, "lbc").map(|(_, a)| a),
        Some(vec!["xdp".to_string()])
    );
    let text = scrape(&lab);
    assert_eq!(
        sample(&text, "datapath_reattachments_total{controller=\"lb\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "datapath_reattachments_total{controller=\"policy\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(d.log().contains("detached by someone else"), "{}", d.log());
    let _ = std::fs::remove_file(&path);
}

/// A UDP socket in the client namespace, bound to one port: every request is the same flow.
fn client_socket(ns: &str) -> UdpSocket {
    let s = ok(
        "client socket",
        netns::run_in(ns, || UdpSocket::bind(SocketAddrV4::new(CLIENT_IP, 0))),
    );
    let s = s.expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s
}

/// One request, one try, one second: who answered, or `None`.
fn ask_once(s: &UdpSocket, to: SocketAddr, payload: &str) -> Option<String> {
    s.send_to(payload.as_bytes(), to).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.split_once(' ').map(|(b, _)| b.to_string())
}

#[test]
fn a_backend_mac_change_takes_effect_on_the_next_packet_despite_a_minute_of_fib_cache() {
    let config = "lb:\n  interfaces: [lbc, lbb]\n  fib_cache_ms: 60000\n";
    let Some((lab, path)) = lab_with(config) else {
        return;
    };
    ok(
        "adding the UDP service",
        lab.add_service(UDP_SERVICE_PORT, Protocol::Udp, "full-nat", &["b1"]),
    );
    let vip = client::sock(VIP, UDP_SERVICE_PORT);
    let s = client_socket(&lab.topo.client);
    // The flow is established and its next hop cached (the first answers may wait for the
    // neighbour to resolve).
    wait_until("a first answer", || ask_once(&s, vip, "warm-up"));
    for i in 0..5 {
        assert_eq!(
            ask_once(&s, vip, &format!("before {i}")).as_deref(),
            Some("b1")
        );
    }
    let b1 = lab.topo.backend("b1").clone();
    let before = sample(&scrape(&lab), "datapath_fib_generation").unwrap_or(0.0);
    let new_mac = "02:00:5e:12:34:56";
    ok(
        "changing b1's MAC",
        ip_in(&b1.ns, &["link", "set", "dev", "eth0", "address", new_mac]),
    );
    // The node learns the new MAC (here told at once, as a gratuitous ARP would).
    ok(
        "updating the neighbour",
        ip_in(
            &lab.topo.lb,
            &[
                "neigh",
                "replace",
                &b1.ip.to_string(),
                "lladdr",
                new_mac,
                "dev",
                "lbb",
                "nud",
                "reachable",
            ],
        ),
    );
    let (_, took) = wait_until("the FIB generation to move", || {
        let now = sample(&scrape(&lab), "datapath_fib_generation")?;
        (now > before).then_some(())
    });
    eprintln!("FIB generation bumped, seen {took:?} after the neighbour update");
    // The very next packet of the same flow goes to the new MAC: with the old one the
    // backend's interface would drop it, and the cache would keep it for a minute.
    assert_eq!(ask_once(&s, vip, "after").as_deref(), Some("b1"));
    for i in 0..5 {
        assert_eq!(
            ask_once(&s, vip, &format!("after {i}")).as_deref(),
            Some("b1")
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// `ip -d neigh show` lines in `ns` for `addr`.
fn neigh_lines(ns: &str, addr: &str) -> Vec<String> {
    ok("ip neigh", ip_in(ns, &["-d", "neigh", "show"]))
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(addr))
        .map(str::to_string)
        .collect()
}

#[test]
fn backends_get_managed_neighbours_that_go_with_them() {
    let Some((lab, path)) = lab_with("lb:\n  interfaces: [lbc, lbb]\n") else {
        return;
    };
    let d = lab.daemon();
    ok(
        "adding the service",
        lab.add_service(UDP_SERVICE_PORT, Protocol::Udp, "full-nat", &["b1", "b2"]),
    );
    let ns = lab.topo.lb.clone();
    for name in ["b1", "b2"] {
        let ip = lab.topo.backend(name).ip.to_string();
        let (lines, _) = wait_until("a managed entry", || {
            let l = neigh_lines(&ns, &ip);
            l.iter().any(|l| l.contains("managed")).then_some(l)
        });
        assert!(lines[0].contains("proto 215"), "{lines:?}");
        assert!(lines[0].contains("dev lbb"), "{lines:?}");
    }
    let (st, _) = wait_until("both neighbours in status", || {
        let st = status(d);
        (st.neighbours.len() == 2 && st.neighbours.iter().all(|n| n.managed)).then_some(st)
    });
    for n in &st.neighbours {
        assert_eq!(n.interface.as_deref(), Some("lbb"), "{n:?}");
    }
    let svc = format!("{VIP}:{UDP_SERVICE_PORT}");
    // `service show` carries each backend's neighbour state, the one status reports.
    let show = |d: &Daemon| -> ServiceView {
        ok(
            "lb-ctl service show",
            d.lb_ctl_json(&["service", "show", &svc, "--proto", "udp"])
                .and_then(|v| Ok(serde_json::from_value(v)?)),
        )
    };
    let st = status(d);
    for b in show(d).backends {
        let n = st.neighbours.iter().find(|n| n.addr == b.addr).unwrap();
        assert_eq!(
            b.neighbour.as_deref(),
            Some(n.state.as_str()),
            "{b:?} {n:?}"
        );
    }
    // A backend nobody answers for: its managed entry fails to resolve, and status, `service
    // show` and the metric say so.
    let ghost = "198.18.1.99";
    ok(
        "adding an unanswered backend",
        d.lb_ctl_ok(&[
            "backend",
            "add",
            &svc,
            &format!("{ghost}:8080"),
            "--proto",
            "udp",
        ]),
    );
    let (state, _) = wait_until("the unanswered backend shown unresolved", || {
        let st = status(d);
        let n = st
            .neighbours
            .iter()
            .find(|n| n.addr.to_string() == ghost && n.unresolved)?;
        Some(n.state.clone())
    });
    assert!(
        ["incomplete", "failed", "missing"].contains(&state.as_str()),
        "{state}"
    );
    let view = show(d);
    let b = view
        .backends
        .iter()
        .find(|b| b.addr.to_string() == ghost)
        .unwrap();
    assert!(
        matches!(
            b.neighbour.as_deref(),
            Some("incomplete" | "failed" | "missing")
        ),
        "{b:?}"
    );
    let key = format!("datapath_backend_neighbour_unresolved{{addr=\"{ghost}\"}}");
    wait_until("the unresolved metric", || {
        (sample(&scrape(&lab), &key) == Some(1.0)).then_some(())
    });
    let b1_key = format!(
        "datapath_backend_neighbour_unresolved{{addr=\"{}\"}}",
        lab.topo.backend("b1").ip
    );
    assert_eq!(sample(&scrape(&lab), &b1_key), Some(0.0));
    ok(
        "removing the unanswered backend",
        d.lb_ctl_ok(&[
            "backend",
            "remove",
            &svc,
            &format!("{ghost}:8080"),
            "--proto",
            "udp",
        ]),
    );
    wait_until("the unanswered backend's entry removed", || {
        neigh_lines(&ns, ghost).is_empty().then_some(())
    });
    let b2 = lab.topo.backend("b2").ip.to_string();
    ok(
        "removing b2",
        d.lb_ctl_ok(&[
            "backend",
            "remove",
            &svc,
            &format!("{b2}:8080"),
            "--proto",
            "udp",
        ]),
    );
    wait_until("b2's entry removed", || {
        neigh_lines(&ns, &b2).is_empty().then_some(())
    });
    let b1 = lab.topo.backend("b1").ip.to_string();
    assert!(
        neigh_lines(&ns, &b1).iter().any(|l| l.contains("managed")),
        "b1 keeps its entry"
    );
    let _ = std::fs::remove_file(&path);
}

/// Route facts both `ip -j route` and the daemon give: (table, dst, gateway, dev).
type RouteFact = (u32, String, Option<String>, Option<String>);

fn kernel_routes(ns: &str, family: &str) -> BTreeSet<RouteFact> {
    let out = ok(
        "ip -j route",
        ip_in(ns, &["-j", family, "route", "show", "table", "all"]),
    );
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    v.iter()
        .filter(|r| r["type"].as_str().is_none_or(|t| t == "unicast"))
        .map(|r| {
            let table = match r["table"].as_str() {
                None | Some("main") => 254,
                Some("local") => 255,
                Some(t) => t.parse().unwrap_or(0),
            };
            (
                table,
                r["dst"].as_str().unwrap_or_default().to_string(),
                r["gateway"].as_str().map(str::to_string),
                r["dev"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn daemon_routes(v: &NodeView, family: &str) -> BTreeSet<RouteFact> {
    v.routes
        .iter()
        .filter(|r| r.family == family && r.kind == "unicast")
        .map(|r| {
            // `ip route` writes a host route without its /32 (/128).
            let dst = r
                .dst
                .strip_suffix(if family == "inet" { "/32" } else { "/128" })
                .unwrap_or(&r.dst)
                .to_string();
            (
                r.table,
                dst,
                r.gateway.map(|g| g.to_string()),
                r.interface.clone(),
            )
        })
        .collect()
}

/// Neighbour facts: (dst, dev, lladdr), as both list them.
fn kernel_neighbours(ns: &str) -> BTreeSet<(String, String, Option<String>)> {
    // `ip neigh` hides NOARP entries (multicast mappings the kernel never announces), and so
    // does the daemon.
    let out = ok("ip -j neigh", ip_in(ns, &["-j", "neigh", "show"]));
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    v.iter()
        .map(|n| {
            (
                n["dst"].as_str().unwrap_or_default().to_string(),
                n["dev"].as_str().unwrap_or_default().to_string(),
                n["lladdr"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn an_overrun_of_a_small_receive_buffer_is_resynced_to_the_kernel_view() {
    let config = "lb:\n  interfaces: [lbc, lbb]\nnetlink:\n  receive_buffer_bytes: 4096\n";
    let Some((lab, path)) = lab_with(config) else {
        return;
    };
    let d = lab.daemon();
    let ns = lab.topo.lb.clone();
    // (This kernel has no dummy interfaces: a veth pair.)
    ok(
        "veth",
        ip_in(
            &ns,
            &[
                "link", "add", "nlx0", "type", "veth", "peer", "name", "nlx1",
            ],
        ),
    );
    ok("veth up", ip_in(&ns, &["link", "set", "nlx0", "up"]));
    ok("peer up", ip_in(&ns, &["link", "set", "nlx1", "up"]));
    // 1,500 routes added and 500 of them deleted: 2,000 changes in one burst.
    let mut batch = String::new();
    for i in 0..1500u32 {
        batch.push_str(&format!(
            "route add 198.19.{}.{}/32 dev nlx0\n",
            i / 250,
            i % 250
        ));
    }
    for i in 0..500u32 {
        batch.push_str(&format!(
            "route del 198.19.{}.{}/32 dev nlx0\n",
            i / 250,
            i % 250
        ));
    }
    let file = std::env::temp_dir().join(format!("{}-routes.batch", lab.topo.prefix));
    std::fs::write(&file, batch).unwrap();
    ok(
        "ip -batch",
        ip_in(&ns, &["-batch", &file.display().to_string()]),
    );
    let _ = std::fs::remove_file(&file);
    let (st, _) = wait_until("a resync", || {
        let st = status(d);
        st.netlink
            .as_ref()
            .is_some_and(|n| n.resyncs >= 1)
            .then_some(st)
    });
    eprintln!("netlink after the burst: {:?}", st.netlink);
    let start = Instant::now();
    let view = loop {
        let v = node(d);
        let (mine4, theirs4) = (daemon_routes(&v, "inet"), kernel_routes(&ns, "-4"));
        let (mine6, theirs6) = (daemon_routes(&v, "inet6"), kernel_routes(&ns, "-6"));
        let neighbours: BTreeSet<_> = v
            .neighbours
            .iter()
            .map(|n| (n.addr.to_string(), n.interface.clone(), n.mac.clone()))
            .collect();
        let kernel_neigh = kernel_neighbours(&ns);
        if v.ready && mine4 == theirs4 && mine6 == theirs6 && neighbours == kernel_neigh {
            break v;
        }
        assert!(
            start.elapsed() < WAIT,
            "the daemon's view differs from the kernel's: only the daemon's {:?} {:?} {:?}, \
             only the kernel's {:?} {:?} {:?}",
            mine4.difference(&theirs4).take(5).collect::<Vec<_>>(),
            mine6.difference(&theirs6).take(5).collect::<Vec<_>>(),
            neighbours.difference(&kernel_neigh).collect::<Vec<_>>(),
            theirs4.difference(&mine4).take(5).collect::<Vec<_>>(),
            theirs6.difference(&mine6).take(5).collect::<Vec<_>>(),
            kernel_neigh.difference(&neighbours).collect::<Vec<_>>(),
        );
        thread::sleep(POLL);
    };
    assert_eq!(
        daemon_routes(&view, "inet")
            .iter()
            .filter(|r| r.1.starts_with("198.19."))
            .count(),
        1000
    );
    assert!(view.ready);
    let text = scrape(&lab);
    assert!(
        sample(&text, "datapath_netlink_resyncs_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    let _ = std::fs::remove_file(&path);
}
