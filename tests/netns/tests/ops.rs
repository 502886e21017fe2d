//! Operating datapathd like production: metrics and probes over HTTP, the YAML config and its
//! hot reload, feature probing with per-module degradation, restart onto a new program under
//! traffic, SIGTERM, and cleanup. Real daemon, namespaces, veths, sockets and HTTP.
//!
//! Run with `cargo xtask test --only netns`, or after `cargo build -p datapath -p lb-ctl`:
//! `cargo test -p netns-tests --test ops -- --test-threads=1` (as root).

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use datapath_api::{Protocol, StatusView};
use netns_tests::{
    Binaries, Daemon, DaemonOptions, Lab, LabOptions,
    client::{self, sock},
    cmd, http,
    lab::{TCP_SERVICE_PORT, UDP_SERVICE_PORT},
    netns, privileged,
    topology::{CLIENT_IP, LB_CLIENT_IP, TopologyOptions, VIP, ip_in},
};

const THREE: [&str; 3] = ["b1", "b2", "b3"];
/// The daemon's default metrics port, inside the LB namespace.
const METRICS_PORT: u16 = 9477;
/// Longest any wait-until loop in these tests runs.
const WAIT: Duration = Duration::from_secs(30);
/// UDP datagrams the upgrade may lose: none. The program is swapped inside the pinned link by
/// one `bpf_link_update`, the maps (flow table included) are the same pinned maps, and the
/// services are reprogrammed with the same ids and tables, so every datagram finds a program
/// and its flow's backend.
const UPGRADE_MAX_UDP_LOST: u64 = 0;

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// The metrics listener as Prometheus on another node sees it: the LB node's client-side
/// address. Scrapes run from the client namespace.
fn metrics_addr() -> SocketAddr {
    sock(LB_CLIENT_IP, METRICS_PORT)
}

/// A lab with topology and servers but no daemon yet.
fn bare_lab() -> Option<Lab> {
    if !privileged() {
        return None;
    }
    Some(ok(
        "setting up the lab",
        Lab::start(LabOptions {
            topology: TopologyOptions::default(),
            daemon: None,
        }),
    ))
}

/// A config file in the daemon's directory (created before the daemon).
fn config_path(lab: &Lab) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("datapath-netns-{}.yaml", lab.topo.prefix))
}

fn start_daemon(lab: &mut Lab, opts: DaemonOptions) {
    let d = ok(
        "starting datapathd",
        Daemon::start_with(&lab.topo.lb, &lab.topo.prefix, Binaries::from_env(), opts),
    );
    lab.daemon = Some(d);
}

fn with_config(path: &std::path::Path, wait_ready: bool) -> DaemonOptions {
    DaemonOptions {
        ifaces: false,
        wait_ready,
        extra_args: vec!["--config".into(), path.display().to_string()],
    }
}

fn scrape(lab: &Lab) -> String {
    let (status, body) = ok(
        "GET /metrics",
        http::get_in(&lab.topo.client, metrics_addr(), "/metrics"),
    );
    assert_eq!(status, 200, "{body}");
    body
}

/// Parses the text exposition format into `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sample(text: &str, key: &str) -> f64 {
    *samples(text)
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in:\n{text}"))
}

fn status(d: &Daemon) -> StatusView {
    ok(
        "lb-ctl status",
        d.lb_ctl_json(&["status"])
            .and_then(|v| Ok(serde_json::from_value(v)?)),
    )
}

fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `count` datagrams on one flow, one at a time, each waiting (bounded) for its answer.
/// Returns (sent, answered, bytes of the frames sent).
fn udp_exchange(ns: &str, count: usize) -> (u64, u64, u64) {
    let vip = sock(VIP, UDP_SERVICE_PORT);
    ok(
        "UDP exchange",
        netns::run_in(ns, || -> anyhow::Result<(u64, u64, u64)> {
            let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT_IP, 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(1)))?;
            let (mut sent, mut answered, mut bytes) = (0u64, 0u64, 0u64);
            let mut buf = [0u8; 2048];
            for i in 0..count {
                let payload = format!("metrics {i:04}");
                socket.send_to(payload.as_bytes(), vip)?;
                sent += 1;
                // Ethernet + IPv4 + UDP headers + payload: what XDP counts.
                bytes += (14 + 20 + 8 + payload.len()) as u64;
                match socket.recv_from(&mut buf) {
                    Ok(_) => answered += 1,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok((sent, answered, bytes))
        })
        .and_then(|r| r),
    )
}

#[test]
fn metrics_scraped_during_traffic_match_the_packets_sent() {
    let Some(lab) = (|| {
        let lab = bare_lab()?;
        Some(lab)
    })() else {
        return;
    };
    let mut lab = lab;
    // BPF statistics are off by default; this test reads the per-program counters.
    let path = config_path(&lab);
    std::fs::write(&path, "prog_stats:\n  enabled: true\n").unwrap();
    start_daemon(
        &mut lab,
        DaemonOptions {
            extra_args: vec!["--config".into(), path.display().to_string()],
            ..DaemonOptions::default()
        },
    );
    ok(
        "adding the UDP service",
        lab.add_service(UDP_SERVICE_PORT, Protocol::Udp, "full-nat", &THREE),
    );
    ok(
        "adding the TCP service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &THREE),
    );

    // Scrapes while traffic flows: each must be well-formed and never go backwards.
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let ns = lab.topo.client.clone();
    let scraper = {
        let (stop, scrapes) = (stop.clone(), scrapes.clone());
        thread::spawn(move || -> Result<(), String> {
            let key = format!(
                "datapath_service_packets_total{{port=\"{UDP_SERVICE_PORT}\",proto=\"udp\",vip=\"{VIP}\"}}"
            );
            let mut last = 0.0;
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(120) {
                let (code, body) =
                    http::get_in(&ns, metrics_addr(), "/metrics").map_err(|e| format!("{e:#}"))?;
                if code != 200 {
                    return Err(format!("status {code}: {body}"));
                }
                let now = samples(&body).get(&key).copied().unwrap_or(0.0);
                if now < last {
                    return Err(format!("{key} went back from {last} to {now}"));
                }
                last = now;
                scrapes.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })
    };
    let (sent, answered, bytes) = udp_exchange(&lab.topo.client, 300);
    let tcp = ok(
        "TCP connections",
        client::tcp_spread_in(&lab.topo.client, sock(VIP, TCP_SERVICE_PORT), 30),
    );
    stop.store(true, Ordering::SeqCst);
    ok(
        "scraping during traffic",
        scraper
            .join()
            .expect("scraper thread")
            .map_err(anyhow::Error::msg),
    );
    assert!(
        scrapes.load(Ordering::SeqCst) > 0,
        "no scrape ran during traffic"
    );
    assert_eq!(answered, sent, "every datagram answered");
    assert_eq!(tcp.answered(), 30, "{}", tcp.table());

    let text = scrape(&lab);
    let svc = format!("port=\"{UDP_SERVICE_PORT}\",proto=\"udp\",vip=\"{VIP}\"");
    assert_eq!(
        sample(&text, &format!("datapath_service_packets_total{{{svc}}}")),
        sent as f64
    );
    assert_eq!(
        sample(&text, &format!("datapath_service_bytes_total{{{svc}}}")),
        bytes as f64
    );
    // One flow: one backend got every datagram, the others none.
    let mut per_backend = Vec::new();
    for name in THREE {
        let backend = lab.backend_addr(name);
        let key = format!("datapath_backend_packets_total{{backend=\"{backend}\",{svc}}}");
        per_backend.push(sample(&text, &key));
    }
    per_backend.sort_by(|a, b| a.total_cmp(b));
    assert_eq!(per_backend, [0.0, 0.0, sent as f64], "{text}");
    // The API reads the same maps.
    let stats = ok("lb-ctl stats", lab.daemon().stats());
    let udp = stats
        .services
        .iter()
        .find(|s| s.proto == Protocol::Udp)
        .expect("UDP service in stats");
    assert_eq!(udp.counters.packets, sent);

    for line in [
        "datapath_module_up{module=\"lb\"} 1",
        "datapath_feature{name=\"xdp\"} 1",
        "datapath_ready 1",
        "datapath_map_max_entries{map=\"LB_FLOWS\"}",
        "datapath_map_entries{map=\"LB_BACKENDS\"} 6",
        "datapath_xdp_drops_total{reason=\"no_backend\"}",
        "datapath_xdp_packets_total{reason=\"new_flow\"}",
        "datapath_bpf_program_runs_total{program=\"xdp_lb\"}",
        "datapath_config_reloads_total 0",
        "datapath_build_info{version=",
        "datapath_interface_attached{interface=\"lbc\"",
    ] {
        assert!(text.contains(line), "metrics lack {line:?}:\n{text}");
    }
    assert!(
        sample(&text, "datapath_bpf_program_runs_total{program=\"xdp_lb\"}") >= sent as f64,
        "BPF stats count every run"
    );
    // Every datagram entered through the client-facing interface, every reply through the
    // backend-facing one (plus the TCP traffic and any ARP).
    for iface in ["lbc", "lbb"] {
        let received = sample(
            &text,
            &format!("datapath_interface_received_packets_total{{interface=\"{iface}\"}}"),
        );
        assert!(
            received >= sent as f64,
            "{iface} received {received} frames, fewer than the {sent} datagrams"
        );
    }
    cmd::promtool_check(&text).unwrap_or_else(|e| panic!("{e:#}"));

    // A restarted daemon reads the same pinned counters: nothing doubles, nothing resets.
    ok("restart", lab.daemon_mut().restart());
    let again = scrape(&lab);
    assert_eq!(
        sample(&again, &format!("datapath_service_packets_total{{{svc}}}")),
        sent as f64
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn readyz_is_not_ready_until_the_program_is_attached() {
    let Some(mut lab) = bare_lab() else {
        return;
    };
    let path = config_path(&lab);
    // lbw does not exist yet: the daemon waits for it, alive but not ready.
    std::fs::write(
        &path,
        "interfaces: [lbc, lbb, lbw]\ninterface_wait_seconds: 120\n",
    )
    .unwrap();
    start_daemon(&mut lab, with_config(&path, false));
    let lb = lab.topo.lb.clone();
    let client_ns = lab.topo.client.clone();
    wait_until("/healthz", || {
        http::get_in(&client_ns, metrics_addr(), "/healthz")
            .ok()
            .filter(|(c, _)| *c == 200)
    });
    // Until its first dump is in, the netlink controller is the one not ready; then the lb
    // controller, waiting for lbw. It stays not ready: lbw does not exist.
    let (code, body) = wait_until("/readyz to wait for lbw", || {
        http::get_in(&client_ns, metrics_addr(), "/readyz")
            .ok()
            .filter(|(_, b)| b.contains("waiting for interfaces lbw"))
    });
    assert_eq!(code, 503, "{body}");
    let text = scrape(&lab);
    assert!(text.contains("datapath_ready 0"), "{text}");
    // The interfaces that exist are served meanwhile (the netlink controller attaches lbw
    // when it appears); lbw has no link yet.
    assert!(
        text.contains("datapath_module_up{module=\"lb\"} 1"),
        "{text}"
    );
    let links_dir = lab.daemon().pin_root.join("lb").join("links");
    assert!(links_dir.join("xdp_lb_lbc").exists());
    assert!(!links_dir.join("xdp_lb_lbw").exists());

    ok(
        "creating lbw",
        ip_in(
            &lb,
            &["link", "add", "lbw", "type", "veth", "peer", "name", "lbw2"],
        ),
    );
    ok("lbw up", ip_in(&lb, &["link", "set", "lbw", "up"]));
    ok("lbw2 up", ip_in(&lb, &["link", "set", "lbw2", "up"]));
    wait_until("/readyz 200", || {
        http::get_in(&client_ns, metrics_addr(), "/readyz")
            .ok()
            .filter(|(c, _)| *c == 200)
    });
    ok("API after ready", lab.daemon_mut().wait_ready());
    let st = status(lab.daemon());
    assert!(st.ready);
    let names: Vec<&str> = st.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["lbb", "lbc", "lbw"]);
    let _ = std::fs::remove_file(&path);
}

/// Invalid configurations, each with the line and the key its error must name.
const INVALID: [(&str, &str, &str); 5] = [
    (
        "interfaces: [lbc, lbb]\nmaps:\n  max_flows: 0\n",
        "line 3",
        "maps.max_flows",
    ),
    (
        "interfaces: [lbc, lbb]\nmodules:\n  lb: true\n  colour: blue\n",
        "line 4",
        "modules.colour",
    ),
    (
        "interfaces: [lbc, lbb]\nmaps:\n  max_services: lots\n",
        "line 3",
        "maps.max_services",
    ),
    // (A pattern that matches nothing is no error since the netlink controller: the
    // interface is attached when it appears. An item that cannot be an interface name is.)
    (
        "interfaces:\n  - lbc\n  - lbb\n  - \"an interface name far too long\"\n",
        "line 4",
        "interfaces",
    ),
    (
        "interfaces: [lbc, lbb]\nfeatures:\n  force_off: [warp_drive]\n",
        "line 3",
        "features.force_off",
    ),
];

#[test]
fn invalid_config_stops_the_daemon_at_start_naming_line_and_key() {
    let Some(lab) = bare_lab() else {
        return;
    };
    let bins = Binaries::from_env();
    let path = config_path(&lab);
    // A case the daemon wrongly accepted would leave pins behind: the root is removed after.
    let pin_root = std::path::PathBuf::from(format!("/sys/fs/bpf/{}bad", lab.topo.prefix));
    for (yaml, line, key) in INVALID {
        std::fs::write(&path, yaml).unwrap();
        let mut command = Command::new(&bins.datapathd);
        command
            .arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--socket")
            .arg(std::env::temp_dir().join(format!("{}-bad.sock", lab.topo.prefix)))
            .arg("--state-file")
            .arg(std::env::temp_dir().join(format!("{}-bad.json", lab.topo.prefix)))
            .arg("--pin-root")
            .arg(&pin_root);
        ok(
            "entering the LB namespace",
            netns::command_in(&mut command, &lab.topo.lb),
        );
        let out = ok(
            "running datapathd",
            cmd::output_timeout(&mut command, Duration::from_secs(30)),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let _ = std::fs::remove_dir_all(&pin_root);
        assert!(!out.status.success(), "{yaml}: started anyway: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string())
                && stderr.contains(line)
                && stderr.contains(&format!("`{key}")),
            "{yaml}: error must name the file, {line} and {key}: {stderr}"
        );
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn invalid_reload_keeps_the_running_config_and_is_counted() {
    let Some(mut lab) = bare_lab() else {
        return;
    };
    let path = config_path(&lab);
    std::fs::write(&path, "interfaces: [lbc, lbb]\n").unwrap();
    start_daemon(&mut lab, with_config(&path, true));
    ok(
        "adding the TCP service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &THREE),
    );
    let mut conns = ok(
        "opening connections",
        client::connect_many_in(&lab.topo.client, sock(VIP, TCP_SERVICE_PORT), 10),
    );
    for (i, (yaml, line, key)) in INVALID.iter().enumerate() {
        std::fs::write(&path, yaml).unwrap();
        ok("SIGHUP", lab.daemon().signal(libc::SIGHUP));
        let st = wait_until("the reload to be refused", || {
            let st = status(lab.daemon());
            (st.config_reload_failures == i as u64 + 1).then_some(st)
        });
        let err = st.last_reload_error.clone().unwrap_or_default();
        assert!(
            err.contains(line) && err.contains(&format!("`{key}")),
            "{yaml}: {err}"
        );
        assert_eq!(st.config_reloads, 0);
        assert!(st.ready);
        let names: Vec<&str> = st.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["lbb", "lbc"], "the running interfaces stay");
        ok(
            "connections after a refused reload",
            client::ping_all(&mut conns),
        );
    }
    let text = scrape(&lab);
    assert_eq!(
        sample(&text, "datapath_config_reload_failures_total"),
        INVALID.len() as f64
    );
    assert!(
        lab.daemon().log().contains("configuration reload refused"),
        "logged with its reason"
    );
    let spread = ok(
        "new connections",
        client::tcp_spread_in(&lab.topo.client, sock(VIP, TCP_SERVICE_PORT), 30),
    );
    assert_eq!(spread.answered(), 30, "{}", spread.table());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn reload_adding_an_interface_attaches_it_without_disturbing_open_connections() {
    let Some(mut lab) = bare_lab() else {
        return;
    };
    let path = config_path(&lab);
    std::fs::write(
        &path,
        "interfaces: [lbc, lbb]\nreload:\n  poll_interval_ms: 100\n",
    )
    .unwrap();
    start_daemon(&mut lab, with_config(&path, true));
    ok(
        "adding the TCP service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &THREE),
    );
    let mut conns = ok(
        "opening connections",
        client::connect_many_in(&lab.topo.client, sock(VIP, TCP_SERVICE_PORT), 20),
    );
    let lb = lab.topo.lb.clone();
    let links_before = link_ids(&lab);
    ok(
        "creating lbn",
        ip_in(
            &lb,
            &["link", "add", "lbn", "type", "veth", "peer", "name", "lbn2"],
        ),
    );
    ok("lbn up", ip_in(&lb, &["link", "set", "lbn", "up"]));
    // Exchanges keep running on the open connections while the file changes (no SIGHUP: the
    // daemon notices the change itself).
    std::fs::write(
        &path,
        "interfaces: [lbc, lbb, lbn]\nreload:\n  poll_interval_ms: 100\n",
    )
    .unwrap();
    let st = wait_until("lbn to be attached", || {
        ok("pinging during the reload", client::ping_all(&mut conns));
        let st = status(lab.daemon());
        st.interfaces.iter().any(|i| i.name == "lbn").then_some(st)
    });
    assert_eq!(st.config_reloads, 1);
    assert_eq!(st.config_reload_failures, 0);
    let shown = ok(
        "ip link show lbn",
        ip_in(&lb, &["link", "show", "dev", "lbn"]),
    );
    assert!(shown.contains("xdp"), "lbn has no XDP program: {shown}");
    let links_after = link_ids(&lab);
    for (iface, id) in &links_before {
        assert_eq!(
            links_after.get(iface),
            Some(id),
            "the link on {iface} was not touched"
        );
    }
    ok("connections after the reload", client::ping_all(&mut conns));
    assert!(scrape(&lab).contains("datapath_config_reloads_total 1"));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_feature_forced_off_disables_only_its_module() {
    let Some(mut lab) = bare_lab() else {
        return;
    };
    let path = config_path(&lab);
    std::fs::write(
        &path,
        "lb:\n  interfaces: [lbc, lbb]\nprog_stats:\n  enabled: true\nfeatures:\n  force_off: [bpf_stats]\n",
    )
    .unwrap();
    start_daemon(&mut lab, with_config(&path, true));
    let st = status(lab.daemon());
    let module = |st: &StatusView, name: &str| {
        st.modules
            .iter()
            .find(|m| m.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no module {name}: {st:?}"))
    };
    let stats = module(&st, "prog_stats");
    assert!(!stats.up && stats.enabled, "{stats:?}");
    let why = stats.reason.unwrap_or_default();
    assert!(
        why.contains("bpf_stats") && why.contains("forced off"),
        "{why}"
    );
    assert!(module(&st, "lb").up);
    assert!(st.ready);
    let table = ok("lb-ctl status", lab.daemon().lb_ctl_ok(&["status"]));
    assert!(
        table.contains("prog_stats") && table.contains("forced off"),
        "{table}"
    );
    // The load balancer works.
    ok(
        "adding the TCP service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &THREE),
    );
    let spread = ok(
        "connections",
        client::tcp_spread_in(&lab.topo.client, sock(VIP, TCP_SERVICE_PORT), 30),
    );
    assert_eq!(spread.answered(), 30, "{}", spread.table());
    let text = scrape(&lab);
    assert!(
        text.contains("datapath_feature{name=\"bpf_stats\"} 0"),
        "{text}"
    );
    assert!(text.contains("datapath_module_up{module=\"prog_stats\"} 0"));
    assert!(text.contains("datapath_module_up{module=\"lb\"} 1"));
    assert!(!text.contains("datapath_bpf_program_runs_total"));

    // XDP forced off: the load balancer is off, with its reason; the daemon serves on.
    ok("stopping", lab.daemon_mut().stop());
    ok("cleanup", lab.daemon().run_cleanup());
    std::fs::write(
        &path,
        "lb:\n  interfaces: [lbc, lbb]\nprog_stats:\n  enabled: true\nfeatures:\n  force_off: [xdp]\n",
    )
    .unwrap();
    ok("restarting", lab.daemon_mut().restart());
    let st = status(lab.daemon());
    let lbm = module(&st, "lb");
    assert!(!lbm.up, "{lbm:?}");
    assert!(lbm.reason.unwrap_or_default().contains("xdp"));
    assert!(module(&st, "prog_stats").up);
    assert!(st.interfaces.is_empty());
    let out = ok(
        "service add with lb off",
        lab.daemon()
            .lb_ctl(&["service", "add", "198.18.100.1:81", "--proto", "tcp"]),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("module lb is off"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _) = ok(
        "readyz",
        http::get_in(&lab.topo.client, metrics_addr(), "/readyz"),
    );
    assert_eq!(code, 200, "ready: every module that can run is up");
    let _ = std::fs::remove_file(&path);
}

/// `bpftool link show pinned` of each LB interface's link: interface -> (link id, prog id).
fn link_ids(lab: &Lab) -> BTreeMap<String, (u64, u64)> {
    // The load balancer controller's links (docs/architecture.md, "Pins").
    let dir = lab.daemon().pin_root.join("lb").join("links");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let iface = name.trim_start_matches("xdp_lb_").to_string();
        let json = ok(
            "bpftool link show",
            cmd::run_args(
                "bpftool",
                &[
                    "-j",
                    "link",
                    "show",
                    "pinned",
                    &entry.path().display().to_string(),
                ],
            ),
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        out.insert(
            iface,
            (
                v["id"].as_u64().expect("link id"),
                v["prog_id"].as_u64().expect("prog id"),
            ),
        );
    }
    out
}

#[test]
fn upgrade_under_tcp_and_udp_traffic_swaps_the_program_in_place() {
    let Some(lab) = (|| {
        if !privileged() {
            return None;
        }
        Some(ok("lab", Lab::start(LabOptions::with_daemon(3))))
    })() else {
        return;
    };
    let mut lab = lab;
    ok(
        "TCP service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &THREE),
    );
    ok(
        "UDP service",
        lab.add_service(UDP_SERVICE_PORT, Protocol::Udp, "full-nat", &THREE),
    );
    let mut conns = ok(
        "opening connections",
        client::connect_many_in(&lab.topo.client, sock(VIP, TCP_SERVICE_PORT), 20),
    );
    let before = link_ids(&lab);
    // The old programs are freed once replaced: read their bytecode tags now.
    let tags_before: BTreeMap<String, String> = before
        .iter()
        .map(|(iface, (_, prog))| (iface.clone(), prog_tag(*prog)))
        .collect();

    // Continuous UDP: one datagram every 2 ms, each answered or counted lost.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let udp = {
        let (stop, sent, lost) = (stop.clone(), sent.clone(), lost.clone());
        let ns = lab.topo.client.clone();
        thread::spawn(move || {
            netns::run_in(&ns, || -> anyhow::Result<()> {
                let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT_IP, 0))?;
                socket.set_read_timeout(Some(Duration::from_millis(500)))?;
                let mut buf = [0u8; 2048];
                let started = Instant::now();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(120) {
                    socket.send_to(
                        format!("upgrade {i}").as_bytes(),
                        sock(VIP, UDP_SERVICE_PORT),
                    )?;
                    sent.fetch_add(1, Ordering::SeqCst);
                    match socket.recv_from(&mut buf) {
                        Ok(_) => {}
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            lost.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => return Err(e.into()),
                    }
                    i += 1;
                    thread::sleep(Duration::from_millis(2));
                }
                Ok(())
            })
        })
    };
    // Continuous TCP on the open connections, across the restart.
    let tcp_stop = stop.clone();
    let ns = lab.topo.client.clone();
    let tcp = thread::spawn(move || -> anyhow::Result<(Vec<netns_tests::Conn>, u64)> {
        let mut rounds = 0;
        let started = Instant::now();
        let _ = &ns;
        while !tcp_stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(120) {
            client::ping_all(&mut conns)?;
            rounds += 1;
            thread::sleep(Duration::from_millis(10));
        }
        Ok((conns, rounds))
    });
    thread::sleep(Duration::from_millis(500));
    let sent_before = sent.load(Ordering::SeqCst);
    // The upgrade: the daemon comes back as a rebuilt binary whose XDP program differs.
    lab.daemon_mut().bins.datapathd = upgrade_binary();
    ok("restarting datapathd", lab.daemon_mut().restart());
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    ok(
        "UDP sender",
        udp.join().expect("udp thread").and_then(|r| r),
    );
    let (mut conns, rounds) = ok("TCP pings", tcp.join().expect("tcp thread"));
    let after = link_ids(&lab);
    let (sent, lost) = (sent.load(Ordering::SeqCst), lost.load(Ordering::SeqCst));
    println!(
        "upgrade: {sent} UDP datagrams sent ({sent_before} before the restart), {lost} lost; \
         {rounds} TCP ping rounds over {} connections, none broken",
        conns.len()
    );
    assert!(sent > sent_before, "UDP kept flowing");
    assert_eq!(
        lost.saturating_sub(UPGRADE_MAX_UDP_LOST),
        0,
        "{lost} UDP datagrams lost over the upgrade (at most {UPGRADE_MAX_UDP_LOST} allowed)"
    );
    ok(
        "connections after the upgrade",
        client::ping_all(&mut conns),
    );
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (iface, (link, prog)) in &before {
        let (link_after, prog_after) = after[iface];
        assert_eq!(
            link_after, *link,
            "{iface}: the same pinned link (never detached)"
        );
        assert_ne!(
            prog_after, *prog,
            "{iface}: a newly loaded program replaced the old one"
        );
        if std::env::var_os("DATAPATHD_UPGRADE_BIN").is_some() {
            assert_ne!(
                tags_before[iface],
                prog_tag(prog_after),
                "{iface}: the program after the upgrade has different bytecode"
            );
        }
    }
}

/// The rebuilt daemon the upgrade restarts onto (`DATAPATHD_UPGRADE_BIN`, which
/// `cargo xtask test` builds with `DATAPATH_BPF_VARIANT=upgrade-test`). Without it the test
/// restarts onto the same binary, unless privileged tests are required.
fn upgrade_binary() -> std::path::PathBuf {
    match std::env::var_os("DATAPATHD_UPGRADE_BIN") {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            assert!(
                path.is_file(),
                "DATAPATHD_UPGRADE_BIN {} is missing",
                path.display()
            );
            path
        }
        None => {
            assert!(
                !netns_tests::privilege::required(),
                "DATAPATHD_UPGRADE_BIN is not set: build the upgrade variant with \
                 `DATAPATH_BPF_VARIANT=upgrade-test cargo build -p datapath` (cargo xtask test does)"
            );
            eprintln!("DATAPATHD_UPGRADE_BIN not set: upgrading onto the same binary");
            netns_tests::Binaries::from_env().datapathd
        }
    }
}

/// The kernel's tag (a hash of the bytecode) of program `id`.
fn prog_tag(id: u64) -> String {
    let json = ok(
        "bpftool prog show",
        cmd::run_args("bpftool", &["-j", "prog", "show", "id", &id.to_string()]),
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["tag"].as_str().expect("program tag").to_string()
}

#[test]
fn sigterm_exits_within_5s_leaving_traffic_flowing_and_cleanup_removes_everything() {
    let Some(lab) = (|| {
        if !privileged() {
            return None;
        }
        Some(ok("lab", Lab::start(LabOptions::with_daemon(3))))
    })() else {
        return;
    };
    let mut lab = lab;
    ok(
        "TCP service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &THREE),
    );
    let mut conns = ok(
        "opening connections",
        client::connect_many_in(&lab.topo.client, sock(VIP, TCP_SERVICE_PORT), 10),
    );
    let links = link_ids(&lab);
    let pin_root = lab.daemon().pin_root.clone();
    let maps: Vec<u64> = std::fs::read_dir(pin_root.join("lb"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| {
            let json = cmd::run_args(
                "bpftool",
                &[
                    "-j",
                    "map",
                    "show",
                    "pinned",
                    &e.path().display().to_string(),
                ],
            )
            .ok()?;
            serde_json::from_str::<serde_json::Value>(&json).ok()?["id"].as_u64()
        })
        .collect();
    assert!(!maps.is_empty(), "pinned maps under {}", pin_root.display());

    ok("SIGTERM", lab.daemon().signal(libc::SIGTERM));
    let (exit, took) = ok(
        "waiting",
        lab.daemon_mut().wait_exit(Duration::from_secs(5)),
    )
    .expect("datapathd did not exit within 5 s of SIGTERM");
    println!("SIGTERM: datapathd exited in {took:?} ({exit})");
    assert!(exit.success(), "{exit}");

    // The datapath forwards without the daemon.
    ok(
        "open connections without the daemon",
        client::ping_all(&mut conns),
    );
    let spread = ok(
        "new connections without the daemon",
        client::tcp_spread_in(&lab.topo.client, sock(VIP, TCP_SERVICE_PORT), 30),
    );
    assert_eq!(spread.answered(), 30, "{}", spread.table());
    drop(conns);

    ok("datapathd cleanup", lab.daemon().run_cleanup());
    assert!(!pin_root.exists(), "{} remains", pin_root.display());
    let gone = |kind: &str, id: u64| {
        !Command::new("bpftool")
            .args([kind, "show", "id", &id.to_string()])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(true)
    };
    for (iface, (link, _)) in &links {
        assert!(gone("link", *link), "{iface}: link {link} still exists");
        // Unpinning drops the link's last reference; the kernel releases it, detaching the
        // program, in deferred work, so the interface may show XDP for a moment after the
        // link's id is gone.
        wait_until(&format!("{iface} to lose its XDP program"), || {
            let shown = ok(
                "ip link show",
                ip_in(&lab.topo.lb, &["link", "show", "dev", iface]),
            );
            (!shown.contains("xdp")).then_some(())
        });
    }
    // Programs and maps go when their last reference does; the kernel frees them
    // asynchronously (after an RCU grace period).
    wait_until("the program to be freed", || {
        links
            .values()
            .all(|(_, prog)| gone("prog", *prog))
            .then_some(())
    });
    // Maps go when their last reference does; the kernel frees them asynchronously.
    wait_until("the pinned maps to be freed", || {
        maps.iter()
            .all(|id| {
                !Command::new("bpftool")
                    .args(["map", "show", "id", &id.to_string()])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(true)
            })
            .then_some(())
    });
}

#[test]
fn missing_capabilities_are_named_and_only_their_modules_stay_off() {
    let Some(mut lab) = bare_lab() else {
        return;
    };
    // Run datapathd with CAP_BPF and CAP_SYS_ADMIN removed from its bounding set (root's
    // capabilities after exec): the load balancer and BPF statistics need them.
    let real = Binaries::from_env();
    let wrapper = std::env::temp_dir().join(format!("datapath-netns-{}-nocap.sh", lab.topo.prefix));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set -bpf,-sys_admin -- {} \"$@\"\n",
            real.datapathd.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bins = Binaries {
        datapathd: wrapper.clone(),
        lb_ctl: real.lb_ctl.clone(),
    };
    // BPF statistics are off by default: ask for them, so that CAP_SYS_ADMIN is needed.
    let path = config_path(&lab);
    std::fs::write(&path, "prog_stats:\n  enabled: true\n").unwrap();
    let d = ok(
        "starting datapathd without CAP_BPF and CAP_SYS_ADMIN",
        Daemon::start_with(
            &lab.topo.lb,
            &lab.topo.prefix,
            bins,
            DaemonOptions {
                extra_args: vec!["--config".into(), path.display().to_string()],
                ..DaemonOptions::default()
            },
        ),
    );
    lab.daemon = Some(d);
    let st = status(lab.daemon());
    let reason = |name: &str| {
        st.modules
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.reason.clone())
            .unwrap_or_default()
    };
    assert_eq!(reason("lb"), "missing capability CAP_BPF", "{st:?}");
    assert_eq!(
        reason("prog_stats"),
        "missing capability CAP_SYS_ADMIN",
        "{st:?}"
    );
    let log = lab.daemon().log();
    assert!(
        log.contains("missing capabilities") && log.contains("CAP_BPF, CAP_SYS_ADMIN"),
        "{log}"
    );
    // The daemon still serves: status, metrics, probes.
    let text = scrape(&lab);
    assert!(
        text.contains("datapath_module_up{module=\"lb\"} 0"),
        "{text}"
    );
    drop(lab);
    let _ = std::fs::remove_file(&wrapper);
    let _ = std::fs::remove_file(&path);
}
