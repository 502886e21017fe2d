//! The tc (TCX) policy and its conntrack, wired into the real daemon and CLI, with a real
//! endpoint behind a veth and real TCP and UDP traffic.
//!
//! ```text
//!  remote ns "<p>r"                node ns "<p>n" (datapathd)            endpoint ns "<p>e"
//!  eth0 198.18.0.1/24 <-veth-> up0 198.18.0.2/24
//!                              ep0 198.18.20.1/24 (TCX policy) <-veth-> eth0 198.18.20.2/24
//! ```
//!
//! The policy sits on `ep0`, the node's endpoint-facing veth: what the endpoint receives
//! leaves the node through `ep0` (the interface's `egress` rules), what the endpoint sends
//! arrives on `ep0` (its `ingress` rules).
use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netns_tests::{
    BackendServer, Binaries, Daemon, DaemonOptions, client, cmd, http,
    netns::{self, OwnedNetns},
    privileged,
    topology::{ip_in, sysctl_in, unique_prefix},
};
use serde_json::Value;

const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const ENDPOINT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 2);
const REMOTE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const ENDPOINT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 2);
/// The daemon's metrics listener, on the node namespace's own loopback.
const METRICS: &str = "127.0.0.1:9477";
/// Longest any wait below lasts.
const WAIT: Duration = Duration::from_secs(30);

/// The three namespaces, deleted on drop.
struct PolicyLab {
    node: String,
    endpoint: String,
    remote: String,
    prefix: String,
    config: PathBuf,
    servers: Vec<BackendServer>,
    daemon: Option<Daemon>,
    /// Deleted (as fields drop, after `drop` stopped the daemon and servers).
    _namespaces: Vec<OwnedNetns>,
}

impl Drop for PolicyLab {
    fn drop(&mut self) {
        self.daemon = None;
        for s in &mut self.servers {
            s.stop();
        }
        let _ = std::fs::remove_file(&self.config);
    }
}

const POLICY: &str = "\
endpoints:
  - interface: ep0
    default_ingress: allow   # what the endpoint sends
    default_egress: deny     # what the endpoint receives: default deny
    egress:
      - name: web
        protocol: tcp
        ports: 8080
        action: allow
      - name: alt
        protocol: tcp
        ports: 8081
        action: allow
      - name: web-udp
        protocol: udp
        ports: 8080
        action: allow
      - name: blocked
        protocol: tcp
        ports: 9090
        action: deny
";

fn config_text(interfaces: &str) -> String {
    format!(
        "modules:\n  lb: false\n  prog_stats: false\nreload:\n  watch: false\n\
         policy:\n  enabled: true\n  interfaces: [{interfaces}]\n  gc_interval_seconds: 1\n  \
         timeouts:\n    udp_seconds: 2\n"
    )
}

fn setup(name: &str) -> Result<PolicyLab> {
    setup_with(name, "\"ep*\"")
}

fn setup_with(name: &str, interfaces: &str) -> Result<PolicyLab> {
    build(name, interfaces, false)
}

/// [`setup`] with IPv6 too: 2001:db8:20::/64 behind `ep0`, 2001:db8::/64 on the remote side
/// (addresses without duplicate address detection), servers on the endpoint's IPv6 address.
fn setup_dual_stack(name: &str) -> Result<PolicyLab> {
    build(name, "\"ep*\"", true)
}

fn build(name: &str, interfaces: &str, ipv6: bool) -> Result<PolicyLab> {
    let prefix = unique_prefix();
    let mut lab = PolicyLab {
        node: format!("{prefix}n"),
        endpoint: format!("{prefix}e"),
        remote: format!("{prefix}r"),
        config: std::env::temp_dir().join(format!("datapath-{prefix}-{name}.yaml")),
        prefix,
        servers: Vec::new(),
        daemon: None,
        _namespaces: Vec::new(),
    };
    for ns in [lab.node.clone(), lab.endpoint.clone(), lab.remote.clone()] {
        lab._namespaces.push(OwnedNetns::create(&ns)?);
    }
    let (n, e, r) = (lab.node.clone(), lab.endpoint.clone(), lab.remote.clone());
    ip_in(
        &n,
        &[
            "link", "add", "ep0", "type", "veth", "peer", "name", "eth0", "netns", &e,
        ],
    )?;
    ip_in(
        &n,
        &[
            "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &r,
        ],
    )?;
    ip_in(&n, &["addr", "add", "198.18.20.1/24", "dev", "ep0"])?;
    ip_in(&n, &["addr", "add", "198.18.0.2/24", "dev", "up0"])?;
    ip_in(&n, &["link", "set", "ep0", "up"])?;
    ip_in(&n, &["link", "set", "up0", "up"])?;
    ip_in(&e, &["addr", "add", "198.18.20.2/24", "dev", "eth0"])?;
    ip_in(&e, &["link", "set", "eth0", "up"])?;
    ip_in(&e, &["route", "add", "default", "via", "198.18.20.1"])?;
    ip_in(&r, &["addr", "add", "198.18.0.1/24", "dev", "eth0"])?;
    ip_in(&r, &["link", "set", "eth0", "up"])?;
    ip_in(&r, &["route", "add", "default", "via", "198.18.0.2"])?;
    sysctl_in(&n, &[("net.ipv4.ip_forward", "1")])?;
    if ipv6 {
        for ns in [&n, &e, &r] {
            sysctl_in(
                ns,
                &[
                    ("net.ipv6.conf.all.disable_ipv6", "0"),
                    ("net.ipv6.conf.all.accept_dad", "0"),
                ],
            )?;
        }
        let addr = |ns: &str, a: &str, dev: &str| {
            ip_in(ns, &["-6", "addr", "add", a, "dev", dev, "nodad"])
        };
        addr(&n, "2001:db8:20::1/64", "ep0")?;
        addr(&n, "2001:db8::2/64", "up0")?;
        addr(&e, "2001:db8:20::2/64", "eth0")?;
        addr(&r, &format!("{REMOTE_IP6}/64"), "eth0")?;
        ip_in(
            &e,
            &["-6", "route", "add", "default", "via", "2001:db8:20::1"],
        )?;
        ip_in(&r, &["-6", "route", "add", "default", "via", "2001:db8::2"])?;
        sysctl_in(&n, &[("net.ipv6.conf.all.forwarding", "1")])?;
        for port in [8080u16, 8081, 9090, 7070] {
            lab.servers.push(BackendServer::start(
                &e,
                &format!("ep6-{port}"),
                SocketAddr::from((ENDPOINT_IP6, port)),
            )?);
        }
    }

    for port in [8080u16, 8081, 9090, 7070] {
        lab.servers.push(BackendServer::start(
            &e,
            &format!("ep{port}"),
            client::sock(ENDPOINT_IP, port),
        )?);
    }
    lab.servers.push(BackendServer::start(
        &r,
        "remote",
        client::sock(REMOTE_IP, 5000),
    )?);

    std::fs::write(&lab.config, config_text(interfaces))?;
    let config = lab.config.display().to_string();
    lab.daemon = Some(Daemon::start_with(
        &n,
        &lab.prefix,
        Binaries::from_env(),
        DaemonOptions {
            ifaces: false,
            wait_ready: true,
            extra_args: vec![
                "--config".into(),
                config,
                "--metrics-listen".into(),
                METRICS.to_string(),
            ],
        },
    )?);
    Ok(lab)
}

impl PolicyLab {
    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon started")
    }

    fn apply(&self, text: &str) -> Result<Value> {
        let file = self.daemon().dir.join("policy.yaml");
        std::fs::write(&file, text)?;
        self.daemon()
            .lb_ctl_json(&["policy", "apply", "-f", &file.display().to_string()])
    }

    fn status(&self) -> Result<Value> {
        self.daemon().lb_ctl_json(&["policy", "list"])
    }
}

fn rule_packets(status: &Value, name: &str) -> u64 {
    status["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or_else(|| panic!("no rule {name} in {status:#}"))
}

fn reason(status: &Value, name: &str) -> u64 {
    status["reasons"][name].as_u64().unwrap_or(0)
}

fn ep0_egress(status: &Value, counter: &str) -> u64 {
    status["endpoints"][0]["egress"][counter]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {counter} in {status:#}"))
}

/// A TCP connection that must not open (its SYNs are dropped).
fn refused(ns: &str, port: u16) -> bool {
    client::connect_in(ns, client::sock(ENDPOINT_IP, port)).is_err()
}

#[test]
fn default_deny_allows_8080_counts_drops_and_lists_flows() {
    if !privileged() {
        return;
    }
    let lab = setup("deny").expect("building the policy topology");
    let d = lab.daemon();

    // An invalid file is refused with its line; nothing is in force yet.
    let bad = d.dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "endpoints:\n  - interface: ep0\n    egress:\n      - cidr: 198.18.0.0/40\n        action: deny\n",
    )
    .unwrap();
    let out = d
        .lb_ctl(&["policy", "apply", "-f", &bad.display().to_string()])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("line 4"), "{err}");
    assert!(
        !refused(&lab.remote, 9090),
        "no policy in force: 9090 still open"
    );

    let applied = lab.apply(POLICY).expect("applying the policy");
    let generation = applied["generation"].as_u64().unwrap();
    assert!(generation > 0);

    // 8080 connects and exchanges; 9090 (a deny rule) and 7070 (the default) do not.
    let mut web =
        client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 8080)).expect("8080 is allowed");
    assert_eq!(web.backend, "ep8080");
    for _ in 0..3 {
        web.ping().expect("echo on 8080");
    }
    assert!(refused(&lab.remote, 9090), "9090 is denied by a rule");
    assert!(refused(&lab.remote, 7070), "7070 is denied by the default");

    // The same invalid file again: refused, the policy in force stays.
    let out = d
        .lb_ctl(&["policy", "apply", "-f", &bad.display().to_string()])
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let status = lab.status().unwrap();
    assert_eq!(status["generation"].as_u64(), Some(generation));

    // Drops counted against the right rule and the default.
    assert!(rule_packets(&status, "web") >= 1, "{status:#}");
    assert!(rule_packets(&status, "blocked") >= 1, "{status:#}");
    assert_eq!(rule_packets(&status, "alt"), 0, "{status:#}");
    assert!(ep0_egress(&status, "denied") >= 2, "{status:#}");
    assert!(ep0_egress(&status, "default_hits") >= 1, "{status:#}");
    assert!(reason(&status, "drop_rule") >= 1, "{status:#}");
    assert!(reason(&status, "drop_default") >= 1, "{status:#}");

    // The live flow is listed with its state and counters.
    let flows = d
        .lb_ctl_json(&["conntrack", "list", "--port", "8080", "--protocol", "tcp"])
        .unwrap();
    let flow = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["src_port"].as_u64() == Some(u64::from(web.local.port())))
        .unwrap_or_else(|| panic!("flow of {web:?} not listed: {flows:#}"));
    assert_eq!(flow["state"], "ESTABLISHED", "{flow:#}");
    assert_eq!(flow["src"], REMOTE_IP.to_string());
    assert_eq!(flow["dst"], ENDPOINT_IP.to_string());
    assert!(flow["packets_orig"].as_u64().unwrap() >= 4, "{flow:#}");
    assert!(flow["packets_reply"].as_u64().unwrap() >= 4, "{flow:#}");
    assert!(flow["bytes_reply"].as_u64().unwrap() > 0, "{flow:#}");
    let table = d.lb_ctl_ok(&["conntrack", "list"]).unwrap();
    assert!(table.contains("ESTABLISHED"), "{table}");
    let stats = d.lb_ctl_json(&["conntrack", "stats"]).unwrap();
    assert!(stats["entries"].as_u64().unwrap() >= 1, "{stats:#}");
    assert_eq!(stats["timeouts"]["udp"].as_u64(), Some(2), "{stats:#}");

    // The same counters in Prometheus, labelled by rule and reason; promtool finds nothing.
    let (code, text) = http::get_in(&lab.node, METRICS.parse().unwrap(), "/metrics").unwrap();
    assert_eq!(code, 200);
    let blocked = text
        .lines()
        .find(|l| {
            l.starts_with("datapath_policy_rule_packets_total{") && l.contains("rule=\"blocked\"")
        })
        .unwrap_or_else(|| panic!("no sample of rule blocked in:\n{text}"));
    assert!(
        blocked
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v >= 1.0),
        "{blocked}"
    );
    for needle in [
        "datapath_policy_drops_total{reason=\"rule\"}",
        "datapath_policy_endpoint_verdicts_total{",
        "datapath_conntrack_entries ",
        "datapath_conntrack_max_entries 65536",
        "datapath_flow_events_received_total ",
        "datapath_flow_events_lost_total{cause=\"ring_full\"}",
    ] {
        assert!(text.contains(needle), "no {needle} in:\n{text}");
    }
    cmd::promtool_check(&text).unwrap_or_else(|e| panic!("{e:#}"));

    // Flushing by filter removes exactly the matching flows.
    let flushed = d
        .lb_ctl_json(&["conntrack", "flush", "--port", "8080"])
        .unwrap();
    assert!(flushed["removed"].as_u64().unwrap() >= 1, "{flushed:#}");
    let after = d
        .lb_ctl_json(&["conntrack", "list", "--port", "8080"])
        .unwrap();
    assert_eq!(after.as_array().map(Vec::len), Some(0), "{after:#}");
}

/// UDP from inside `ns` to `to`, one socket; the answers.
fn udp_from(ns: &str, to: SocketAddr, count: usize) -> Result<usize> {
    netns::run_in(ns, || -> Result<usize> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut answered = 0;
        let mut buf = [0u8; 1500];
        for i in 0..count {
            socket.send_to(format!("datagram {i}").as_bytes(), to)?;
            if socket.recv_from(&mut buf).is_ok() {
                answered += 1;
            }
        }
        Ok(answered)
    })?
}

#[test]
fn replies_pass_through_conntrack_and_a_policy_change_cuts_only_the_disallowed_flow() {
    if !privileged() {
        return;
    }
    let lab = setup("change").expect("building the policy topology");
    lab.apply(POLICY).expect("applying the policy");
    let remote = client::sock(REMOTE_IP, 5000);

    // Outbound from the endpoint: its replies come back through ep0's egress, whose default
    // is deny; only the conntrack lets them in.
    let mut out = client::connect_in(&lab.endpoint, remote).expect("outbound TCP");
    out.ping().expect("outbound echo");
    assert_eq!(
        udp_from(&lab.endpoint, remote, 3).unwrap(),
        3,
        "outbound UDP answered"
    );
    let status = lab.status().unwrap();
    assert!(reason(&status, "pass_reply") >= 3, "{status:#}");
    assert!(
        refused(&lab.remote, 7070),
        "the default still denies new flows towards the endpoint"
    );

    // Live traffic on two allowed ports.
    let mut web = client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 8080)).unwrap();
    let mut alt = client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 8081)).unwrap();
    web.ping().unwrap();
    alt.ping().unwrap();

    // The same policy without the `alt` rule: 8081 is no longer allowed.
    let changed: String = POLICY.replace(
        "      - name: alt\n        protocol: tcp\n        ports: 8081\n        action: allow\n",
        "",
    );
    assert_ne!(changed, POLICY);
    let before = lab.status().unwrap()["generation"].as_u64().unwrap();
    let applied = lab.apply(&changed).unwrap();
    assert!(applied["generation"].as_u64().unwrap() > before);

    for _ in 0..3 {
        web.ping()
            .expect("the still-allowed connection keeps working");
        out.ping().expect("the outbound connection keeps working");
    }
    assert!(alt.ping().is_err(), "the disallowed connection is cut");
    let status = lab.status().unwrap();
    assert!(ep0_egress(&status, "cut") >= 1, "{status:#}");
    assert!(reason(&status, "drop_policy_changed") >= 1, "{status:#}");
    assert!(
        refused(&lab.remote, 8081),
        "new connections to 8081 are denied"
    );

    // While the daemon is down (killed), the policy is still enforced: the TCX links are
    // pinned, with the programs and their maps. Allowed connections keep working.
    let mut lab = lab;
    lab.daemon
        .as_mut()
        .unwrap()
        .kill_9()
        .expect("kill -9 datapathd");
    assert!(
        refused(&lab.remote, 8081),
        "still denied while the daemon is down"
    );
    web.ping()
        .expect("the allowed connection keeps working while the daemon is down");
    out.ping()
        .expect("the outbound connection keeps working while the daemon is down");

    // The policy survives a restart of the daemon (saved like the services), which swaps its
    // programs into the pinned links.
    let d = lab.daemon.as_mut().unwrap();
    d.restart().expect("restarting datapathd");
    let status = lab.status().unwrap();
    assert_eq!(
        status["policy"]["endpoints"][0]["egress"]
            .as_array()
            .map(Vec::len),
        Some(3),
        "{status:#}"
    );
    assert!(refused(&lab.remote, 8081), "still denied after a restart");
    client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 8080))
        .expect("8080 still allowed after a restart");
}

/// Reads `lb-ctl flows --follow -o json` lines in the background.
struct Follower {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Follower {
    fn start(d: &Daemon) -> Result<Follower> {
        let mut child = Command::new(&d.bins.lb_ctl)
            .arg("--socket")
            .arg(&d.socket)
            .args([
                "-o",
                "json",
                "flows",
                "--follow",
                "--count",
                "500",
                "--timeout",
                "60",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting lb-ctl flows --follow")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Ok(Follower { child, lines })
    }

    /// Waits (bounded) until an event satisfies `pred`.
    fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = self.lines.lock().unwrap().iter().find(|v| pred(v)) {
                return Ok(v.clone());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no {what} event within {WAIT:?}; got {:#?}",
                    self.lines.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn flow_events_are_followed_and_idle_entries_expire_through_gc() {
    if !privileged() {
        return;
    }
    let lab = setup("events").expect("building the policy topology");
    lab.apply(POLICY).expect("applying the policy");
    let d = lab.daemon();
    let follower = Follower::start(d).unwrap();
    // The follower is subscribed once its request is in: wait for one event of ours first.
    let deadline = Instant::now() + WAIT;
    let mut probe_port = 0;
    while Instant::now() < deadline {
        let mut c = client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 8080)).unwrap();
        c.ping().unwrap();
        let port = c.local.port();
        drop(c);
        let seen = follower
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|v| v["kind"] == "opened" && v["src_port"].as_u64() == Some(u64::from(port)));
        if seen {
            probe_port = port;
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert_ne!(probe_port, 0, "no opened event reached the follower");

    // Opened and closed for a short TCP connection, with its counters.
    let mut c = client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 8080)).unwrap();
    c.ping().unwrap();
    let port = u64::from(c.local.port());
    drop(c);
    let opened = follower
        .wait_for("opened", |v| v["kind"] == "opened" && v["src_port"] == port)
        .unwrap();
    assert_eq!(opened["dst_port"], 8080);
    assert_eq!(opened["interface"], "ep0");
    assert_eq!(opened["rule_name"], "web");
    let closed = follower
        .wait_for("closed", |v| v["kind"] == "closed" && v["src_port"] == port)
        .unwrap();
    assert!(closed["packets_orig"].as_u64().unwrap() >= 3, "{closed:#}");
    assert!(closed["packets_reply"].as_u64().unwrap() >= 3, "{closed:#}");

    // Denied, by the rule that denied it.
    assert!(refused(&lab.remote, 9090));
    let denied = follower
        .wait_for("denied", |v| v["kind"] == "denied" && v["dst_port"] == 9090)
        .unwrap();
    assert_eq!(denied["rule_name"], "blocked");

    // A UDP flow is tracked, then expires idle (policy.timeouts.udp_seconds: 2) through the
    // garbage collector, which reports it.
    // One socket keeps the flow alive until it is listed (a loaded machine may take longer
    // than the timeout between two commands).
    let listed = netns::run_in(&lab.remote, || -> Result<Value> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 1500];
        for i in 0..20 {
            socket.send_to(
                format!("datagram {i}").as_bytes(),
                client::sock(ENDPOINT_IP, 8080),
            )?;
            socket.recv_from(&mut buf).context("UDP answer")?;
            let udp = d.lb_ctl_json(&["conntrack", "list", "--protocol", "udp"])?;
            if udp.as_array().is_some_and(|a| a.len() == 1) {
                return Ok(udp);
            }
        }
        bail!("the UDP flow was never listed")
    })
    .unwrap()
    .unwrap();
    assert_eq!(listed[0]["state"], "REPLIED", "{listed:#}");
    assert_eq!(listed[0]["dst_port"], 8080, "{listed:#}");
    let deadline = Instant::now() + WAIT;
    loop {
        let left = d
            .lb_ctl_json(&["conntrack", "list", "--protocol", "udp"])
            .unwrap();
        if left.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle UDP flow was not collected within {WAIT:?}: {left:#}"
        );
        thread::sleep(Duration::from_millis(250));
    }
    let stats = d.lb_ctl_json(&["conntrack", "stats"]).unwrap();
    assert!(stats["gc_expired"].as_u64().unwrap() >= 1, "{stats:#}");
    assert!(stats["events_received"].as_u64().unwrap() >= 3, "{stats:#}");
    follower
        .wait_for("expired", |v| {
            v["kind"] == "expired" && v["protocol"] == "udp"
        })
        .unwrap();
    // The established TCP flows of this test are not idle long enough to go.
    assert!(stats["gc_sweeps"].as_u64().unwrap() >= 1, "{stats:#}");
}

#[test]
fn a_reload_attaches_the_policy_to_newly_configured_interfaces() {
    if !privileged() {
        return;
    }
    // Configured for an interface that does not exist: the policy is stored, not enforced.
    let lab = setup_with("reload", "\"none9\"").expect("building the policy topology");
    lab.apply(POLICY).expect("applying the policy");
    let mut open = client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 9090))
        .expect("9090 open while ep0 is not policed");
    open.ping().unwrap();
    assert!(
        lab.status().unwrap()["endpoints"][0]["interfaces"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );

    // The configuration now names ep0: SIGHUP attaches the programs to it.
    std::fs::write(&lab.config, config_text("\"ep0\"")).unwrap();
    lab.daemon().signal(libc::SIGHUP).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let status = lab.status().unwrap();
        if status["endpoints"][0]["interfaces"] == serde_json::json!(["ep0"]) {
            break;
        }
        assert!(Instant::now() < deadline, "ep0 not attached: {status:#}");
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        refused(&lab.remote, 9090),
        "9090 denied once ep0 is policed"
    );
    client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 8080))
        .expect("8080 allowed once ep0 is policed")
        .ping()
        .unwrap();
    let module = |st: &Value| -> Value {
        st["modules"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == "policy")
            .cloned()
            .unwrap_or_else(|| panic!("no policy module in {st:#}"))
    };
    let st = lab.daemon().lb_ctl_json(&["status"]).unwrap();
    assert_eq!(module(&st)["up"], true, "{st:#}");

    // TCX forced off: a reload turns the module off with that reason; ep0 passes again.
    let text = config_text("\"ep0\"") + "features:\n  force_off: [tcx]\n";
    std::fs::write(&lab.config, text).unwrap();
    lab.daemon().signal(libc::SIGHUP).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let st = lab.daemon().lb_ctl_json(&["status"]).unwrap();
        let m = module(&st);
        if m["up"] == false {
            assert!(
                m["reason"].as_str().is_some_and(|r| r.contains("tcx")),
                "{m:#}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "policy module still up: {st:#}");
        thread::sleep(Duration::from_millis(200));
    }
    client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 9090))
        .expect("9090 open again once the policy module is off");
    let out = lab.daemon().lb_ctl(&["policy", "list"]).unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "the module is off: unavailable: {out:?}"
    );
}

#[test]
fn a_refused_reload_leaves_the_policy_module_as_it_was() {
    if !privileged() {
        return;
    }
    let lab = setup_with("rollback", "\"none9\"").expect("building the policy topology");
    lab.apply(POLICY).expect("applying the policy");
    // A bridge: it exists (the configuration is valid), but takes no native (driver) XDP.
    ip_in(&lab.node, &["link", "add", "br9", "type", "bridge"]).unwrap();
    ip_in(&lab.node, &["link", "set", "br9", "up"]).unwrap();
    let failures = |lab: &PolicyLab| -> u64 {
        lab.daemon().lb_ctl_json(&["status"]).unwrap()["config_reload_failures"]
            .as_u64()
            .expect("config_reload_failures")
    };
    let before = failures(&lab);

    // One reload that polices ep0 and also starts the load balancer on br9 in native mode.
    // The policy half applies first; the load-balancer half fails; the whole reload is refused
    // and the policy module is put back: ep0 stays unpoliced.
    let text = config_text("\"ep0\"").replace("  lb: false\n", "  lb: true\n")
        + "interfaces: [br9]\nxdp_mode: native\n";
    assert!(text.contains("  lb: true\n"), "{text}");
    std::fs::write(&lab.config, text).unwrap();
    lab.daemon().signal(libc::SIGHUP).unwrap();
    let deadline = Instant::now() + WAIT;
    while failures(&lab) == before {
        assert!(Instant::now() < deadline, "the reload was not refused");
        thread::sleep(Duration::from_millis(200));
    }
    let st = lab.daemon().lb_ctl_json(&["status"]).unwrap();
    assert!(
        st["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("br9")),
        "{st:#}"
    );
    let status = lab.status().unwrap();
    assert!(
        status["endpoints"][0]["interfaces"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "ep0 policed by a refused reload: {status:#}"
    );
    client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 9090))
        .expect("9090 still open: the refused reload changed nothing")
        .ping()
        .unwrap();
}

/// The offloads on every interface of this topology are the kernel's defaults (GRO, GSO, TSO,
/// scatter-gather): the endpoint's and the remote's TCP send 64 KiB GSO segments, which cross
/// `ep0` as non-linear skbs. One megabyte each way, inbound (the remote's connection to the
/// endpoint's 8080) and outbound (the endpoint's connection to the remote), with an allow-all
/// policy and with the default-deny one: every byte arrives, and the policy never counts one
/// of these packets as malformed or truncated.
#[test]
fn a_megabyte_each_way_crosses_a_policed_interface_with_default_offloads() {
    if !privileged() {
        return;
    }
    const MEGABYTE: usize = 1 << 20;
    let lab = setup("bulk").expect("building the policy topology");
    // The topology keeps the kernel's offloads: check, so that nobody turns them off unseen.
    let features = netns_tests::topology::exec_in(&lab.endpoint, "ethtool", &["-k", "eth0"])
        .expect("ethtool -k");
    for feature in [
        "scatter-gather: on",
        "tcp-segmentation-offload: on",
        "generic-segmentation-offload: on",
    ] {
        assert!(
            features.contains(feature),
            "endpoint eth0: {feature}\n{features}"
        );
    }
    let allow_all =
        "endpoints:\n  - interface: ep0\n    default_ingress: allow\n    default_egress: allow\n";
    for (name, policy) in [("allow-all", allow_all), ("default-deny", POLICY)] {
        lab.apply(policy)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let before = lab.status().unwrap();
        let mut inbound = client::connect_in(&lab.remote, client::sock(ENDPOINT_IP, 8080))
            .unwrap_or_else(|e| panic!("{name}: 8080: {e:#}"));
        let mut outbound = client::connect_in(&lab.endpoint, client::sock(REMOTE_IP, 5000))
            .unwrap_or_else(|e| panic!("{name}: the remote: {e:#}"));
        for (way, conn) in [("inbound", &mut inbound), ("outbound", &mut outbound)] {
            conn.bulk_download(MEGABYTE)
                .unwrap_or_else(|e| panic!("{name}, {way} download: {e:#}"));
            conn.bulk_upload(MEGABYTE)
                .unwrap_or_else(|e| panic!("{name}, {way} upload: {e:#}"));
            conn.ping()
                .unwrap_or_else(|e| panic!("{name}, {way} ping: {e:#}"));
        }
        let status = lab.status().unwrap();
        for counter in ["drop_malformed", "drop_truncated"] {
            assert_eq!(
                reason(&status, counter),
                reason(&before, counter),
                "{name}: {counter} moved\n{status:#}"
            );
        }
        assert!(
            reason(&status, "pass_tracked") + reason(&status, "pass_reply")
                > reason(&before, "pass_tracked") + reason(&before, "pass_reply") + 50,
            "{name}: the transfers passed as tracked traffic\n{status:#}"
        );
    }
}

/// One endpoint policy over both families: rules without a CIDR hold for IPv4 and IPv6, an
/// IPv6 prefix only for IPv6, and IPv6 flows are tracked and listed. Neighbour discovery keeps
/// working through the default-deny direction (the endpoint still reaches its router).
#[test]
fn an_ipv6_policy_allows_and_denies_ipv6_ports() {
    if !privileged() {
        return;
    }
    let lab = setup_dual_stack("ipv6").expect("building the dual-stack policy topology");
    lab.apply(
        "\
endpoints:
  - interface: ep0
    default_ingress: allow
    default_egress: deny
    egress:
      - name: web
        protocol: tcp
        ports: 8080
        action: allow
      - name: alt-v6
        cidr: 2001:db8:20::/64
        protocol: tcp
        ports: 8081
        action: allow
      - name: blocked
        protocol: tcp
        ports: 9090
        action: deny
",
    )
    .expect("applying the policy");
    let v6 = |port: u16| SocketAddr::from((ENDPOINT_IP6, port));
    let v4 = |port: u16| client::sock(ENDPOINT_IP, port);
    let refused_at = |to: SocketAddr| client::connect_in(&lab.remote, to).is_err();

    let mut web6 = client::connect_in(&lab.remote, v6(8080)).expect("8080 over IPv6 is allowed");
    assert_eq!(web6.backend, "ep6-8080");
    for _ in 0..3 {
        web6.ping().expect("echo on [::]:8080");
    }
    let mut web4 = client::connect_in(&lab.remote, v4(8080)).expect("8080 over IPv4 is allowed");
    web4.ping().expect("echo on 8080");
    // An IPv6 prefix rule (an egress rule's CIDR is the destination's): IPv6 to inside it
    // only.
    let mut alt6 = client::connect_in(&lab.remote, v6(8081)).expect("8081 to 2001:db8:20::/64");
    alt6.ping().expect("echo on [::]:8081");
    assert!(refused_at(v4(8081)), "the IPv6 rule does not admit IPv4");
    assert!(refused_at(v6(9090)), "9090 over IPv6 is denied by a rule");
    assert!(
        refused_at(v6(7070)),
        "7070 over IPv6 is denied by the default"
    );

    let status = lab.status().unwrap();
    assert!(rule_packets(&status, "web") >= 2, "{status:#}");
    assert!(rule_packets(&status, "alt-v6") >= 1, "{status:#}");
    assert!(rule_packets(&status, "blocked") >= 1, "{status:#}");
    assert!(
        reason(&status, "pass_neighbour_discovery") >= 1,
        "{status:#}"
    );

    let flows = lab
        .daemon()
        .lb_ctl_json(&["conntrack", "list", "--address", &ENDPOINT_IP6.to_string()])
        .unwrap();
    let flow = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["src_port"].as_u64() == Some(u64::from(web6.local.port())))
        .unwrap_or_else(|| panic!("flow of {web6:?} not listed: {flows:#}"));
    assert_eq!(flow["src"], REMOTE_IP6.to_string(), "{flow:#}");
    assert_eq!(flow["dst"], ENDPOINT_IP6.to_string(), "{flow:#}");
    assert_eq!(flow["state"], "ESTABLISHED", "{flow:#}");
    assert!(flow["packets_reply"].as_u64().unwrap() >= 4, "{flow:#}");
}
