//! The service dependency graph (issue 17) end to end: a chain of real TCP services, client ->
//! frontend -> api -> db, and one call from the frontend to an external name, every hop a copy
//! of `graph-hop` under its own name, every one in one cgroup made for the test. The socket
//! load balancer (on that cgroup only) sends each connect() to a VIP to its backend, the
//! services come from a services file (so they have names), a real dnsmasq on the LB node
//! answers the hops' A queries, and datapathd's policy (allow-all), DNS capture and exec
//! tracer feed the graph controller. Every hop crosses the LB node, where those run:
//!
//! ```text
//!  client ns: client 198.18.0.1, api 198.18.0.3:8082, external 198.18.0.4:8084
//!  LB node:   dnsmasq on 198.18.0.2 and 198.18.1.1, datapathd
//!  b1:        frontend 198.18.1.11:8081          b2: db 198.18.1.12:8083
//!
//!  client -> frontend.svc.test:80 (198.18.100.11) -> 198.18.1.11:8081   lbc -> lbb
//!  frontend -> api.svc.test:80 (198.18.100.12)    -> 198.18.0.3:8082    lbb -> lbc
//!  frontend -> ext.example.test:8084              -> 198.18.0.4:8084    lbb -> lbc
//!  api -> db.svc.test:80 (198.18.100.13)          -> 198.18.1.12:8083   lbc -> lbb
//! ```
//!
//! The graph is read through `lb-ctl` (JSON against a golden file, DOT through Graphviz), the
//! metrics (promtool) and the web view. A second test runs the same traffic with the dns and
//! exec modules off: the same edges, named by services and addresses only.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use datapath_api::{
    GraphEdge, GraphNode, GraphNodeKind, GraphView, ServiceSource, SockLbStatus, StatusView,
};
use netns_tests::{
    Lab, LabOptions, TopologyOptions,
    cgroup::TestCgroup,
    cmd, http, netns, privileged,
    topology::{LB_BACKEND_IP, LB_CLIENT_IP, ip_in},
    wait::eventually,
};
use serde_json::Value;

fn ok<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const API: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const FRONTEND: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const DB: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
const FRONTEND_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);
const API_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 12);
const DB_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 13);
const FRONTEND_PORT: u16 = 8081;
const API_PORT: u16 = 8082;
const DB_PORT: u16 = 8083;
const EXTERNAL_PORT: u16 = 8084;
const SERVICE_PORT: u16 = 80;
/// Requests the client makes.
const REQUESTS: u64 = 5;
/// The graph's web view, on the LB node's loopback.
const WEB: &str = "127.0.0.1:9466";
/// The metrics listener (the default port), scraped on the LB node's loopback so the scrape is
/// no flow of the graph.
const METRICS: &str = "127.0.0.1:9477";
/// The resolver's addresses: their (DNS) flows are left out of the graph the test reads.
const EXCLUDE: &str = "198.18.0.2,198.18.1.1";
/// How long the graph may take to show every connection with its bytes.
const GRAPH_WAIT: Duration = Duration::from_secs(20);
/// How long the graph must stay the same to count as settled (past the graph's tick and the
/// conntrack's sweep interval).
const SETTLED: Duration = Duration::from_millis(2500);
/// Longest a hop may run (its own deadline is shorter).
const HOP_TIMEOUT: Duration = Duration::from_secs(60);
const HOP_DEADLINE_SECONDS: &str = "50";

/// The allow-all policy on the LB node's interfaces: every flow is tracked and reported.
const POLICY: &str = "\
endpoints:
  - interface: \"lb*\"
    default_ingress: allow
    default_egress: allow
";

/// What the scenario runs with.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Modules {
    dns: bool,
    exec: bool,
}

/// A hop process; killed and reaped on drop, so that a failing test leaves nothing in the
/// test cgroup (which could not be removed then).
struct Hop {
    name: &'static str,
    child: Child,
    /// Its stdout's lines, from a reader thread.
    lines: mpsc::Receiver<String>,
}

impl Hop {
    /// Waits (bounded) for the hop to exit; answers its status and stderr.
    fn wait_exit(&mut self, within: Duration) -> Result<(std::process::ExitStatus, String)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut err);
                }
                return Ok((status, err));
            }
            ensure!(
                Instant::now() < deadline,
                "{} still runs after {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every line the hop printed, once its stdout is closed: the reader thread may still
    /// hold the last lines when the process has already exited.
    fn all_lines(&self, within: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(out),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{}: stdout still open after {within:?}: {out:?}", self.name)
                }
            }
        }
    }
}

impl Drop for Hop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server hop: its program's name, where it runs and listens, its resolver, the calls it
/// makes for each request (and for its first only), and how many requests it serves.
struct Server {
    name: &'static str,
    ns: String,
    listen: (Ipv4Addr, u16),
    resolver: Ipv4Addr,
    each: Vec<String>,
    once: Vec<String>,
    requests: u64,
}

/// The whole test bed. Fields drop in order: the hops (out of the cgroup), dnsmasq, the lab
/// (daemon, then namespaces), then the cgroup.
struct Scenario {
    hops: Vec<Hop>,
    _dns: netns_tests::dns::Dnsmasq,
    lab: Lab,
    cgroup: TestCgroup,
    /// Where the hops' programs are (the lab's scratch directory): masked in goldens.
    bin_dir: PathBuf,
    modules: Modules,
}

/// The hop program as cargo built it.
fn hop_program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_graph-hop"))
}

/// The services file: the three services by name, each on its VIP and one backend.
fn services_file() -> String {
    let mut s = String::from("services:\n");
    for (name, vip, backend, port) in [
        ("frontend", FRONTEND_VIP, FRONTEND, FRONTEND_PORT),
        ("api", API_VIP, API, API_PORT),
        ("db", DB_VIP, DB, DB_PORT),
    ] {
        s.push_str(&format!(
            "  - name: {name}\n    vip: {vip}\n    port: {SERVICE_PORT}\n    protocol: tcp\n    \
             backends:\n      - addr: {backend}\n        port: {port}\n"
        ));
    }
    s
}

fn daemon_config(services: &Path, cgroup: &TestCgroup, m: Modules) -> String {
    format!(
        "reload:
  watch: false
metrics_listen: {METRICS}
service_file:
  path: {services}
policy:
  enabled: true
  interfaces: [lbc, lbb]
  gc_interval_seconds: 1
  timeouts:
    tcp_closing_seconds: 2
    udp_seconds: 3
dns:
  enabled: {dns}
  interfaces: [lbc, lbb]
exec:
  enabled: {exec}
socklb:
  enabled: true
  cgroup: {cgroup}
graph:
  enabled: true
  web:
    listen: {WEB}
",
        services = services.display(),
        cgroup = cgroup.path().display(),
        dns = m.dns,
        exec = m.exec,
    )
}

/// dnsmasq's records: the services' VIPs and the external endpoint.
fn dns_records() -> Vec<String> {
    [
        ("frontend.svc.test", FRONTEND_VIP),
        ("api.svc.test", API_VIP),
        ("db.svc.test", DB_VIP),
        ("ext.example.test", EXTERNAL),
    ]
    .iter()
    .map(|(name, ip)| format!("--host-record={name},{ip},300"))
    .collect()
}

impl Scenario {
    /// Topology with two backends, the extra client addresses, the test cgroup, the hops'
    /// programs, the daemon (with `m`), the allow-all policy, dnsmasq on the LB node and the
    /// three servers and the external endpoint, listening.
    fn start(m: Modules) -> Result<Scenario> {
        let mut lab = Lab::start(LabOptions {
            topology: TopologyOptions {
                backends: 2,
                dsr: false,
                ipv6: false,
            },
            daemon: None,
        })?;
        let client_ns = lab.client_ns().to_string();
        for ip in [API, EXTERNAL] {
            ip_in(
                &client_ns,
                &["addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            )?;
        }
        let cgroup = TestCgroup::create(&format!("datapath-graph-{}", lab.topo.prefix))?;
        // Each hop its own program (its own exe path), so the exec module tells them apart.
        let bin_dir = lab.scratch()?;
        for name in ["client", "frontend", "api", "db", "external"] {
            std::fs::copy(hop_program(), bin_dir.join(name))
                .with_context(|| format!("copying graph-hop to {}", bin_dir.display()))?;
        }
        let services = lab.write_file("services.yaml", &services_file())?;
        let config = daemon_config(&services, &cgroup, m);
        lab.start_daemon_with_config(&config)?;
        let policy = lab.write_file("policy.yaml", POLICY)?;
        let d = lab.daemon();
        d.lb_ctl_ok(&["policy", "apply", "-f", &policy.display().to_string()])?;
        let dns = netns_tests::dns::Dnsmasq::start(
            &lab.topo.lb,
            &[IpAddr::V4(LB_CLIENT_IP), IpAddr::V4(LB_BACKEND_IP)],
            netns_tests::dns::DNS_PORT,
            &dns_records(),
            ("frontend.svc.test", &FRONTEND_VIP.to_string()),
        )?;
        let mut s = Scenario {
            hops: Vec::new(),
            _dns: dns,
            lab,
            cgroup,
            bin_dir,
            modules: m,
        };
        s.wait_ready()?;
        let b1 = s.lab.topo.backend("b1").ns.clone();
        let b2 = s.lab.topo.backend("b2").ns.clone();
        let svc_port = format!(":{SERVICE_PORT}");
        let servers = [
            Server {
                name: "frontend",
                ns: b1.clone(),
                listen: (FRONTEND, FRONTEND_PORT),
                resolver: LB_BACKEND_IP,
                each: vec![format!("api.svc.test{svc_port}")],
                once: vec![format!("ext.example.test:{EXTERNAL_PORT}")],
                requests: REQUESTS,
            },
            Server {
                name: "api",
                ns: client_ns.clone(),
                listen: (API, API_PORT),
                resolver: LB_CLIENT_IP,
                each: vec![format!("db.svc.test{svc_port}")],
                once: vec![],
                requests: REQUESTS,
            },
            Server {
                name: "db",
                ns: b2,
                listen: (DB, DB_PORT),
                resolver: LB_BACKEND_IP,
                each: vec![],
                once: vec![],
                requests: REQUESTS,
            },
            Server {
                name: "external",
                ns: client_ns,
                listen: (EXTERNAL, EXTERNAL_PORT),
                resolver: LB_CLIENT_IP,
                each: vec![],
                once: vec![],
                requests: 1,
            },
        ];
        for server in servers {
            let hop = s.start_server(&server)?;
            s.hops.push(hop);
        }
        Ok(s)
    }

    /// Starts `server` and waits (bounded) until it listens.
    fn start_server(&self, server: &Server) -> Result<Hop> {
        let (ip, port) = server.listen;
        let mut args = vec![
            "server".to_string(),
            "--listen".into(),
            SocketAddr::from((ip, port)).to_string(),
            "--bind".into(),
            ip.to_string(),
            "--resolver".into(),
            server.resolver.to_string(),
            "--max-requests".into(),
            server.requests.to_string(),
            "--deadline-seconds".into(),
            HOP_DEADLINE_SECONDS.into(),
        ];
        for (flag, targets) in [("--each", &server.each), ("--once", &server.once)] {
            for t in targets {
                args.extend([flag.to_string(), t.clone()]);
            }
        }
        let mut hop = self.spawn(server.name, &server.ns, &args)?;
        match hop.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.starts_with("listening") => Ok(hop),
            other => {
                let err = hop.wait_exit(Duration::from_secs(1)).map(|(_, e)| e);
                bail!("{} did not start listening: {other:?} {err:?}", server.name);
            }
        }
    }

    /// Waits until the services file is applied and the modules asked for are up.
    fn wait_ready(&self) -> Result<()> {
        let d = self.lab.daemon();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let services = d.services()?;
            let named = services
                .iter()
                .filter(|v| v.source == ServiceSource::File && v.backends.len() == 1)
                .count();
            if named == 3 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the services file is not applied: {services:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let st: SockLbStatus = serde_json::from_value(d.lb_ctl_json(&["socklb"])?)?;
        ensure!(st.up, "the socket LB is not up: {st:#?}");
        let status: StatusView = serde_json::from_value(d.lb_ctl_json(&["status"])?)?;
        for (module, want) in [
            ("policy", true),
            ("dns", self.modules.dns),
            ("exec", self.modules.exec),
            ("graph", true),
        ] {
            let up = module_up(&status, module);
            ensure!(
                up == Some(want),
                "module {module}: up {up:?}, expected {want}: {:#?}",
                status.modules
            );
        }
        Ok(())
    }

    /// Starts hop `name` (its own copy of the program) in namespace `ns` and the test cgroup.
    fn spawn(&self, name: &'static str, ns: &str, args: &[String]) -> Result<Hop> {
        let mut cmd = Command::new(self.bin_dir.join(name));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        netns::command_in(&mut cmd, ns)?;
        self.cgroup.join_on_exec(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Hop { name, child, lines })
    }

    /// The client's requests; then every server has served its count and exited cleanly.
    fn run_traffic(&mut self) -> Result<Vec<String>> {
        let client_ns = self.lab.client_ns().to_string();
        let args: Vec<String> = [
            "client",
            "--bind",
            &CLIENT.to_string(),
            "--resolver",
            &LB_CLIENT_IP.to_string(),
            "--call",
            &format!("frontend.svc.test:{SERVICE_PORT}"),
            "--count",
            &REQUESTS.to_string(),
            "--deadline-seconds",
            HOP_DEADLINE_SECONDS,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut client = self.spawn("client", &client_ns, &args)?;
        let (status, err) = client.wait_exit(HOP_TIMEOUT)?;
        let replies = client.all_lines(Duration::from_secs(5))?;
        ensure!(
            status.success(),
            "the client failed ({status}): {err}\nreplies: {replies:?}\n{}",
            self.hop_errors()
        );
        for hop in &mut self.hops {
            let (status, err) = hop.wait_exit(Duration::from_secs(10))?;
            ensure!(status.success(), "{} failed ({status}): {err}", hop.name);
        }
        Ok(replies)
    }

    /// What the servers printed on stderr so far (those that exited), for a failure message.
    fn hop_errors(&mut self) -> String {
        let mut out = String::new();
        for hop in &mut self.hops {
            if let Ok((status, err)) = hop.wait_exit(Duration::from_millis(1)) {
                out.push_str(&format!("{}: {status}: {err}\n", hop.name));
            }
        }
        out
    }

    /// Waits (bounded) until the policy's conntrack holds no TCP flow any more: every
    /// connection of the scenario ended and its closing entry was swept (and reported as
    /// expired), so nothing more can change the graph's counts.
    fn wait_for_swept_flows(&self) {
        let d = self.lab.daemon();
        let mut last = Vec::new();
        let swept = std::panic::catch_unwind(AssertUnwindSafe(|| {
            eventually("the TCP flows swept", Duration::from_secs(20), || {
                let v = d
                    .lb_ctl_json(&["conntrack", "list", "--protocol", "tcp"])
                    .ok()?;
                last = v.as_array().cloned().unwrap_or_default();
                last.is_empty().then_some(())
            })
        }));
        if swept.is_err() {
            panic!("TCP flows still tracked: {last:#?}\n{}", self.diagnostics());
        }
    }

    /// `lb-ctl -o json graph --window 5m --exclude <the resolver>`, raw and typed.
    fn graph(&self) -> Result<(Value, GraphView)> {
        let v =
            self.lab
                .daemon()
                .lb_ctl_json(&["graph", "--window", "5m", "--exclude", EXCLUDE])?;
        let g = serde_json::from_value(v.clone()).context("a GraphView")?;
        Ok((v, g))
    }

    /// Polls (bounded) until every expected edge is in the graph with its bytes (its
    /// connections ended) and the graph has stopped changing (the same edges, counts and bytes
    /// for [`SETTLED`]); answers that graph. The counts are the tests' to compare.
    fn wait_for_graph(&self, edges: &[(String, u64)]) -> (Value, GraphView) {
        let mut last = String::new();
        let mut seen: Option<(Vec<EdgeSummary>, Instant)> = None;
        let found = std::panic::catch_unwind(AssertUnwindSafe(|| {
            eventually("the graph's edges", GRAPH_WAIT, || {
                let (v, g) = match self.graph() {
                    Ok(x) => x,
                    Err(e) => {
                        last = format!("{e:#}");
                        return None;
                    }
                };
                last = format!("{v:#}");
                let complete = edges
                    .iter()
                    .all(|(id, _)| g.edges.iter().any(|e| &e.id == id && e.bytes_received > 0));
                let now = summary(&g);
                match &seen {
                    Some((before, since)) if *before == now => {
                        (complete && since.elapsed() >= SETTLED).then_some((v, g))
                    }
                    _ => {
                        seen = Some((now, Instant::now()));
                        None
                    }
                }
            })
        }));
        match found {
            Ok(x) => x,
            Err(_) => panic!(
                "the graph did not settle with the expected edges {edges:#?} within \
                 {GRAPH_WAIT:?}; the last graph:\n{last}\n{}",
                self.diagnostics()
            ),
        }
    }

    /// What the daemon saw, for a failure message.
    fn diagnostics(&self) -> String {
        let d = self.lab.daemon();
        let mut out = String::new();
        for args in [
            &["graph", "--window", "5m"][..],
            &["flows"][..],
            &["conntrack", "list"][..],
            &["socklb"][..],
            &["dns", "list"][..],
        ] {
            match d.lb_ctl(args) {
                Ok(o) => out.push_str(&format!(
                    "----- lb-ctl {} ({}) -----\n{}{}\n",
                    args.join(" "),
                    o.status,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )),
                Err(e) => out.push_str(&format!("lb-ctl {}: {e:#}\n", args.join(" "))),
            }
        }
        out
    }

    /// `GET path` on `addr` in the LB node's namespace.
    fn get_on_node(&self, addr: &str, path: &str) -> Result<String> {
        let (status, body) = http::get_in(&self.lab.topo.lb, addr.parse()?, path)?;
        ensure!(status == 200, "GET {path} on {addr}: {status}: {body}");
        Ok(body)
    }

    /// The scratch directory as it appears in exe paths (masked in goldens).
    fn bin_prefix(&self) -> String {
        self.bin_dir.display().to_string()
    }
}

/// Whether module `name` is up in `lb-ctl status` (`None`: not listed).
fn module_up(status: &StatusView, name: &str) -> Option<bool> {
    status.modules.iter().find(|m| m.name == name).map(|m| m.up)
}

/// An edge's id, connections and bytes each way.
type EdgeSummary = (String, u64, u64, u64);

fn summary(g: &GraphView) -> Vec<EdgeSummary> {
    g.edges
        .iter()
        .map(|e| (e.id.clone(), e.connections, e.bytes_sent, e.bytes_received))
        .collect()
}

/// The graph's edges as (id, connections), against the expected ones, both sorted.
fn check_edge_counts(g: &GraphView, want: &[(String, u64)]) {
    let got: Vec<(String, u64)> = g
        .edges
        .iter()
        .map(|e| (e.id.clone(), e.connections))
        .collect();
    let mut want = want.to_vec();
    want.sort();
    if got != want {
        eprintln!("the graph: {g:#?}");
    }
    assert_eq!(
        got, want,
        "the edges and their connections (the graph is above)"
    );
}

fn edge_id(caller: &str, callee: &str, port: u16) -> String {
    format!("{caller} -> {callee} tcp/{port}")
}

/// An expected node.
fn node(kind: GraphNodeKind, label: &str, addresses: &[Ipv4Addr], names: &[&str]) -> GraphNode {
    let kind_name = match kind {
        GraphNodeKind::Service => "service",
        GraphNodeKind::Workload => "workload",
        GraphNodeKind::Process => "process",
        GraphNodeKind::External => "external",
    };
    GraphNode {
        id: format!("{kind_name}:{label}"),
        kind,
        label: label.to_string(),
        namespace: None,
        addresses: {
            // Sorted as strings, as the view lists them.
            let mut a: Vec<String> = addresses.iter().map(Ipv4Addr::to_string).collect();
            a.sort();
            a
        },
        names: names.iter().map(|n| n.to_string()).collect(),
    }
}

/// The edges' checks common to both tests: the count, bytes both ways, a measured handshake,
/// no failure, and the programs (by file name) that made the connections.
fn check_edge(g: &GraphView, id: &str, connections: u64, processes: &[(&str, u64)]) -> GraphEdge {
    let e = g
        .edges
        .iter()
        .find(|e| e.id == id)
        .unwrap_or_else(|| panic!("no edge {id}: {g:#?}"))
        .clone();
    assert_eq!(e.connections, connections, "{e:#?}");
    assert!(e.bytes_sent > 0 && e.bytes_received > 0, "{e:#?}");
    assert!(e.rtt_p50_us.is_some() && e.rtt_p99_us.is_some(), "{e:#?}");
    assert_eq!(e.failures, datapath_api::GraphFailures::default(), "{e:#?}");
    assert_eq!(e.protocol, "tcp");
    assert!(e.last_seen_unix_ms > 0, "{e:#?}");
    let got: Vec<(String, u64)> = e
        .processes
        .iter()
        .map(|p| {
            let base = Path::new(&p.exe)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            (base, p.connections)
        })
        .collect();
    let want: Vec<(String, u64)> = processes.iter().map(|(p, n)| (p.to_string(), *n)).collect();
    assert_eq!(got, want, "the programs of {id}: {e:#?}");
    e
}

/// The nodes, compared whole (in the view's order, by id).
fn check_nodes(g: &GraphView, mut want: Vec<GraphNode>) {
    want.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(g.nodes, want, "the nodes");
}

/// `v` with what changes from run to run masked: times, bytes, RTTs and the scratch
/// directory in exe paths.
fn masked(v: &Value, prefix: &str) -> Value {
    fn walk(v: &mut Value, prefix: &str) {
        match v {
            Value::Object(map) => {
                for (k, x) in map.iter_mut() {
                    match k.as_str() {
                        "generated_unix_ms" | "last_seen_unix_ms" | "bytes_sent"
                        | "bytes_received" => *x = Value::from(0),
                        "rtt_p50_us" | "rtt_p99_us" if !x.is_null() => *x = Value::from("<rtt>"),
                        _ => walk(x, prefix),
                    }
                }
            }
            Value::Array(list) => list.iter_mut().for_each(|x| walk(x, prefix)),
            Value::String(s) if s.contains(prefix) => *s = s.replace(prefix, "<scratch>"),
            _ => {}
        }
    }
    let mut v = v.clone();
    walk(&mut v, prefix);
    v
}

/// Compares `actual` with the golden file `name` (tests/golden/); with `LB_CTL_BLESS=1` it
/// writes `actual` as the new golden first (review the diff before committing it).
fn golden(name: &str, actual: &Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let text = format!("{}\n", serde_json::to_string_pretty(actual).unwrap());
    if std::env::var_os("LB_CTL_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with LB_CTL_BLESS=1 to write it)",
            path.display()
        )
    });
    assert_eq!(
        text,
        want,
        "{} differs (LB_CTL_BLESS=1 rewrites it)",
        path.display()
    );
}

/// `lb-ctl graph -o dot` (the same filter) through `dot -Tsvg`: it draws, and every node's
/// label is in the drawing.
fn check_dot(s: &Scenario, g: &GraphView) {
    let d = s.lab.daemon();
    let dot = ok(
        "lb-ctl graph -o dot",
        d.lb_ctl_ok(&["graph", "-o", "dot", "--window", "5m", "--exclude", EXCLUDE]),
    );
    assert!(dot.starts_with("digraph"), "{dot}");
    let file = s.lab.daemon().dir.join("graph.dot");
    std::fs::write(&file, &dot).unwrap();
    let out = ok(
        "dot -Tsvg",
        cmd::output_timeout(
            Command::new("dot").arg("-Tsvg").arg(&file),
            Duration::from_secs(30),
        ),
    );
    assert!(
        out.status.success(),
        "dot -Tsvg failed ({}): {}\n{dot}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = netns_tests::http::unescape_entities(&String::from_utf8_lossy(&out.stdout));
    assert!(svg.contains("<svg"), "{svg}");
    for n in &g.nodes {
        assert!(
            svg.contains(&format!(">{}</text>", n.label)),
            "node label {} missing from the SVG:\n{svg}",
            n.label
        );
    }
}

/// The metrics: promtool clean, and an edge counter for each edge with its connections.
fn check_metrics(s: &Scenario, g: &GraphView) {
    let metrics = ok("/metrics", s.get_on_node(METRICS, "/metrics"));
    ok("promtool", cmd::promtool_check(&metrics));
    for e in &g.edges {
        let port = e.port.to_string();
        let labels = [
            ("caller", e.caller.as_str()),
            ("callee", e.callee.as_str()),
            ("protocol", e.protocol.as_str()),
            ("port", port.as_str()),
        ];
        let line = metrics.lines().find(|l| {
            l.starts_with("datapath_graph_edge_connections_total{")
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        });
        let value = line.and_then(|l| l.rsplit(' ').next()).map(str::to_string);
        assert_eq!(
            value,
            Some(e.connections.to_string()),
            "datapath_graph_edge_connections_total of {}: {line:?}\n{metrics}",
            e.id
        );
    }
}

/// The web view's listener serves the same graph (and the page) on the node's loopback.
fn check_web(s: &Scenario, raw: &Value) {
    let page = ok("the web view's page", s.get_on_node(WEB, "/"));
    assert!(
        page.contains("<html") || page.contains("<!doctype"),
        "{page}"
    );
    let body = ok(
        "the web view's /v1/graph",
        s.get_on_node(WEB, &format!("/v1/graph?window=5m&exclude={EXCLUDE}")),
    );
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let prefix = s.bin_prefix();
    let strip = |v: &Value| masked(v, &prefix);
    assert_eq!(strip(&v)["edges"], strip(raw)["edges"], "{body}");
    assert_eq!(strip(&v)["nodes"], strip(raw)["nodes"], "{body}");
}

/// The web view in headless Chromium, in the LB node's namespace (the listener is on its
/// loopback): every node and edge of the graph is in the DOM, and a screenshot is saved as a
/// test artifact (`target/graph-artifacts/graph-scenario.png`).
fn check_browser(s: &Scenario, g: &GraphView) {
    if let Some(why) = netns_tests::browser::unavailable_reason() {
        panic!("the web view needs Chromium: {why}");
    }
    let url = format!("http://{WEB}/?window=5m&exclude={EXCLUDE}");
    let ns = s.lab.topo.lb.clone();
    let dom = ok(
        "dump the web view's DOM",
        netns_tests::browser::dump_dom(Some(&ns), &url),
    );
    let dom = netns_tests::http::unescape_entities(&dom);
    for n in &g.nodes {
        assert!(
            dom.contains(&format!("data-node-id=\"{}\"", n.id)),
            "node {} not in the DOM:\n{dom}",
            n.id
        );
    }
    for e in &g.edges {
        assert!(
            dom.contains(&format!("data-edge-id=\"{}\"", e.id)),
            "edge {} not in the DOM:\n{dom}",
            e.id
        );
    }
    // The edge's figures in the panel, preselected.
    let first = &g.edges[0];
    let selected = ok(
        "dump the web view with an edge selected",
        netns_tests::browser::dump_dom(
            Some(&ns),
            &format!(
                "{url}&select={}",
                netns_tests::http::encode_query(&first.id)
            ),
        ),
    );
    let selected = netns_tests::http::unescape_entities(&selected);
    let panel = selected
        .split("id=\"details\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no details panel:\n{selected}"));
    for p in &first.processes {
        assert!(
            panel.contains(&p.exe),
            "{} not in the panel:\n{panel}",
            p.exe
        );
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("target/graph-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact directory");
    let shot = dir.join("graph-scenario.png");
    ok(
        "screenshot",
        netns_tests::browser::screenshot(
            Some(&ns),
            &format!(
                "{url}&select={}",
                netns_tests::http::encode_query("service:frontend")
            ),
            &shot,
            1280,
            800,
        ),
    );
}

/// The edges the test expects, with their connections: the client's calls to the frontend
/// (from `client`), the frontend's to the api, the api's to the db, and the frontend's one
/// call to `external`.
fn expected_edges(client: &str, external: &str) -> Vec<(String, u64)> {
    let (f, a, db) = ("service:frontend", "service:api", "service:db");
    vec![
        (edge_id(client, f, SERVICE_PORT), REQUESTS),
        (edge_id(f, a, SERVICE_PORT), REQUESTS),
        (edge_id(a, db, SERVICE_PORT), REQUESTS),
        (edge_id(f, external, EXTERNAL_PORT), 1),
    ]
}

/// The client's replies: the whole chain answered each request, the external call once.
fn check_replies(replies: &[String]) {
    let mut want = vec!["frontend(api(db()),external())".to_string()];
    want.extend((1..REQUESTS).map(|_| "frontend(api(db()))".to_string()));
    assert_eq!(replies, want);
}

/// The socket LB translated every connect() to a VIP (and nothing else): the wire carried
/// backend addresses only.
fn check_socklb(s: &Scenario) {
    let st: SockLbStatus =
        serde_json::from_value(ok("lb-ctl socklb", s.lab.daemon().lb_ctl_json(&["socklb"])))
            .unwrap();
    assert_eq!(
        st.reasons.get("connect_translated").copied(),
        Some(3 * REQUESTS),
        "{st:#?}"
    );
}

#[test]
fn the_graph_joins_flows_names_processes_and_services() {
    if !privileged() {
        return;
    }
    let mut s = ok(
        "scenario",
        Scenario::start(Modules {
            dns: true,
            exec: true,
        }),
    );
    let replies = ok("traffic", s.run_traffic());
    check_replies(&replies);
    check_socklb(&s);
    s.wait_for_swept_flows();

    let prefix = s.bin_prefix();
    let client = format!("process:{prefix}/client");
    let want = expected_edges(&client, "external:ext.example.test");
    let (raw, g) = s.wait_for_graph(&want);
    check_edge_counts(&g, &want);
    assert_eq!(g.window, "5m");
    assert_eq!(g.window_seconds, 300);
    assert_eq!(g.edges_omitted, 0);
    assert!(
        g.sources.names && g.sources.processes && g.sources.services,
        "{:?}",
        g.sources
    );
    let n = REQUESTS;
    check_edge(&g, &want[0].0, n, &[("client", n)]);
    check_edge(&g, &want[1].0, n, &[("frontend", n)]);
    check_edge(&g, &want[2].0, n, &[("api", n)]);
    check_edge(&g, &want[3].0, 1, &[("frontend", 1)]);
    check_nodes(
        &g,
        vec![
            node(
                GraphNodeKind::Process,
                &format!("{prefix}/client"),
                &[CLIENT],
                &[],
            ),
            node(
                GraphNodeKind::Service,
                "frontend",
                &[FRONTEND_VIP, FRONTEND],
                &["frontend.svc.test"],
            ),
            node(
                GraphNodeKind::Service,
                "api",
                &[API, API_VIP],
                &["api.svc.test"],
            ),
            node(
                GraphNodeKind::Service,
                "db",
                &[DB, DB_VIP],
                &["db.svc.test"],
            ),
            node(
                GraphNodeKind::External,
                "ext.example.test",
                &[EXTERNAL],
                &["ext.example.test"],
            ),
        ],
    );
    golden("graph.json", &masked(&raw, &prefix));
    check_dot(&s, &g);
    check_metrics(&s, &g);
    check_web(&s, &raw);
    check_browser(&s, &g);
    check_table(&s, &g);
    check_no_backend(&s);
}

/// A connect to a VIP whose service has no backend: the socket LB refuses it, and the graph
/// counts a `no_backend` failure on the edge from the program to that service.
fn check_no_backend(s: &Scenario) {
    const EMPTY_VIP: &str = "198.18.100.14:80";
    let d = s.lab.daemon();
    ok(
        "empty service",
        d.lb_ctl_ok(&["service", "add", EMPTY_VIP]).map(drop),
    );
    let mut cmd = Command::new("/bin/bash");
    cmd.args(["-c", "exec 3<>/dev/tcp/198.18.100.14/80"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ok(
        "in the client ns",
        netns::command_in(&mut cmd, s.lab.client_ns()).map(drop),
    );
    s.cgroup.join_on_exec(&mut cmd);
    let status = cmd.status().expect("run bash");
    assert!(
        !status.success(),
        "the connect to a VIP without backends must fail"
    );
    let id = format!("process:/bin/bash -> service:{EMPTY_VIP} tcp/80");
    let edge = eventually("the refused connect in the graph", GRAPH_WAIT, || {
        let (_, g) = s.graph().ok()?;
        g.edges.into_iter().find(|e| e.id == id)
    });
    assert_eq!(edge.connections, 1, "{edge:#?}");
    assert_eq!(
        edge.failures,
        datapath_api::GraphFailures {
            no_backend: 1,
            ..Default::default()
        },
        "{edge:#?}"
    );
    assert_eq!(edge.processes[0].exe, "/bin/bash", "{edge:#?}");
}

/// `lb-ctl graph`'s table: a line per edge with its ends, port and connections.
fn check_table(s: &Scenario, g: &GraphView) {
    let table = ok(
        "lb-ctl graph",
        s.lab.daemon().lb_ctl_ok(&["graph", "--exclude", EXCLUDE]),
    );
    assert!(
        table.starts_with("window 5m (4 edges): sources: names on, processes on, services on\n"),
        "{table}"
    );
    for e in &g.edges {
        let line = table
            .lines()
            .find(|l| {
                l.starts_with(&format!("{} ", e.caller)) && l.contains(&format!(" {} ", e.callee))
            })
            .unwrap_or_else(|| panic!("no line for {}:\n{table}", e.id));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[2], format!("{}/{}", e.protocol, e.port), "{line}");
        assert_eq!(cells[3], e.connections.to_string(), "{line}");
    }
    eprintln!("{table}");
}

#[test]
fn the_graph_degrades_to_addresses_without_dns_and_exec() {
    if !privileged() {
        return;
    }
    let mut s = ok(
        "scenario",
        Scenario::start(Modules {
            dns: false,
            exec: false,
        }),
    );
    let replies = ok("traffic", s.run_traffic());
    check_replies(&replies);
    check_socklb(&s);
    s.wait_for_swept_flows();

    let want = expected_edges("external:198.18.0.1", "external:198.18.0.4");
    let (raw, g) = s.wait_for_graph(&want);
    check_edge_counts(&g, &want);
    assert!(
        !g.sources.names && !g.sources.processes && g.sources.services,
        "{:?}",
        g.sources
    );
    for (id, n) in &want {
        check_edge(&g, id, *n, &[]);
    }
    check_nodes(
        &g,
        vec![
            node(GraphNodeKind::External, "198.18.0.1", &[CLIENT], &[]),
            node(
                GraphNodeKind::Service,
                "frontend",
                &[FRONTEND_VIP, FRONTEND],
                &[],
            ),
            node(GraphNodeKind::Service, "api", &[API, API_VIP], &[]),
            node(GraphNodeKind::Service, "db", &[DB, DB_VIP], &[]),
            node(GraphNodeKind::External, "198.18.0.4", &[EXTERNAL], &[]),
        ],
    );
    golden("graph-degraded.json", &masked(&raw, &s.bin_prefix()));
    check_dot(&s, &g);
    check_metrics(&s, &g);
}
