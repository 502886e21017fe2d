//! deploy/alerts against a real Prometheus: a real datapathd in a lab, Debian's `prometheus`
//! scraping its metrics listener every second inside the LB node's namespace, traffic through
//! a full-NAT service, then every alert expression of deploy/alerts/datapath-rules.yaml sent
//! to `/api/v1/query`. Each must parse; the rate and occupancy parts (the expression without
//! its threshold) must return series while traffic flows; the health alerts must not fire on
//! a healthy daemon. Also: the PrometheusRule's `spec.groups` are the plain file's `groups`.
//!
//! Run after `cargo build -p datapath --bins -p lb-ctl`:
//! `cargo test -p netns-tests --test deploy_promql -- --test-threads=1` (as root).

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use datapath_api::Protocol;
use netns_tests::{
    Lab, LabOptions,
    client::sock,
    cmd, http,
    lab::UDP_SERVICE_PORT,
    netns,
    privilege::may_run,
    privileged,
    topology::{CLIENT_IP, TopologyOptions, VIP},
};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Prometheus's HTTP API, inside the LB namespace.
const PROM_PORT: u16 = 19090;
/// The daemon's default metrics listener, inside the LB namespace.
const METRICS_PORT: u16 = 9477;
/// Longest any wait in this test runs.
const WAIT: Duration = Duration::from_secs(60);

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

fn alerts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/alerts")
}

fn read_yaml(name: &str) -> Yaml {
    let path = alerts_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// (alert name, expression) of every rule of the plain rules file.
fn rules() -> Vec<(String, String)> {
    let doc = read_yaml("datapath-rules.yaml");
    let groups = doc["groups"].as_sequence().expect("`groups` is a list");
    let mut out = Vec::new();
    for group in groups {
        for rule in group["rules"].as_sequence().expect("`rules` is a list") {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("every rule has an `expr`");
            out.push((name.to_string(), expr.to_string()));
        }
    }
    out
}

#[test]
fn prometheusrule_spec_holds_the_rules_file_groups_and_every_rule_is_complete() {
    let plain = read_yaml("datapath-rules.yaml");
    let manifest = read_yaml("prometheusrule.yaml");
    assert_eq!(
        manifest["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(manifest["kind"].as_str(), Some("PrometheusRule"));
    assert!(manifest["metadata"]["name"].as_str().is_some());
    assert_eq!(
        manifest["spec"]["groups"], plain["groups"],
        "prometheusrule.yaml's spec.groups differ from datapath-rules.yaml's groups"
    );
    let tests = std::fs::read_to_string(alerts_dir().join("tests.yaml")).unwrap();
    let rules = plain["groups"][0]["rules"].as_sequence().unwrap();
    assert!(!rules.is_empty());
    for rule in rules {
        let name = rule["alert"].as_str().unwrap();
        assert!(
            rule["labels"]["severity"]
                .as_str()
                .is_some_and(|s| ["critical", "warning"].contains(&s)),
            "{name}: no severity label critical or warning"
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: no annotation {key}"
            );
        }
        assert!(rule["for"].as_str().is_some(), "{name}: no `for:`");
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{name}: no promtool test in tests.yaml"
        );
    }
}

/// Kills and reaps the Prometheus it holds.
struct Prometheus {
    child: Child,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_prometheus(ns: &str, prefix: &str) -> Prometheus {
    let dir = TempDir(std::env::temp_dir().join(format!("datapath-promql-{prefix}")));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(dir.0.join("data")).unwrap();
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: datapathd\n    static_configs:\n      - targets: ['127.0.0.1:{METRICS_PORT}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns, PROMETHEUS])
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{PROM_PORT}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {PROMETHEUS}: {e}"));
    Prometheus { child, _dir: dir }
}

fn log_of(p: &Prometheus) -> String {
    std::fs::read_to_string(p._dir.0.join("prometheus.log")).unwrap_or_default()
}

/// `/api/v1/query` in namespace `ns`: the HTTP status and the parsed answer.
fn query(ns: &str, expr: &str) -> anyhow::Result<(u16, Json)> {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, PROM_PORT));
    let (status, body) = http::get_in(
        ns,
        addr,
        &format!("/api/v1/query?query={}", http::encode_query(expr)),
    )?;
    let json = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("answer to {expr:?} is not JSON ({e}): {body}"))?;
    Ok((status, json))
}

/// The result vector of a query that must succeed.
fn series(ns: &str, expr: &str) -> Vec<Json> {
    let (status, json) = ok(&format!("querying {expr:?}"), query(ns, expr));
    assert_eq!(
        (status, json["status"].as_str()),
        (200, Some("success")),
        "query {expr:?} failed: {json}"
    );
    assert_eq!(
        json["data"]["resultType"].as_str(),
        Some("vector"),
        "{json}"
    );
    json["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The expression without its trailing threshold (`... > 100`, `... == 0`), when it has one at
/// the top level: the rate or occupancy Prometheus computes before comparing.
fn without_threshold(expr: &str) -> Option<&str> {
    for op in [" >= ", " > ", " == "] {
        if let Some((left, right)) = expr.rsplit_once(op)
            && right.trim().parse::<f64>().is_ok()
            && left.matches('(').count() == left.matches(')').count()
        {
            return Some(left.trim());
        }
    }
    None
}

/// `A` of `A and on (...) B` or `A unless on (...) B` at the top level, without its outer
/// parentheses: the series the set operation filters.
fn left_operand(expr: &str) -> Option<&str> {
    for op in [" and on ", " unless on "] {
        if let Some((left, _)) = expr.split_once(op)
            && left.matches('(').count() == left.matches(')').count()
        {
            let left = left.trim();
            return Some(
                left.strip_prefix('(')
                    .and_then(|l| l.strip_suffix(')'))
                    .unwrap_or(left),
            );
        }
    }
    None
}

/// The `datapath_*` metric names an expression reads.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("datapath_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(&tail[..end]);
        rest = &tail[end..];
    }
    out
}

/// Datagrams on one flow through the UDP full-NAT service, each waiting for its answer;
/// returns how many were answered.
fn udp_traffic(ns: &str, count: usize) -> usize {
    let vip = sock(VIP, UDP_SERVICE_PORT);
    ok(
        "UDP traffic",
        netns::run_in(ns, || -> anyhow::Result<usize> {
            let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT_IP, 0))?;
            socket.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut answered = 0;
            let mut buf = [0u8; 2048];
            for i in 0..count {
                socket.send_to(format!("promql {i:04}").as_bytes(), vip)?;
                match socket.recv_from(&mut buf) {
                    Ok(_) => answered += 1,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(answered)
        })
        .and_then(|r| r),
    )
}

/// The lab's daemon: the LB module (the default), the policy and the DNS capture on the LB
/// node's interfaces, BPF statistics on, and the Kubernetes source pointed at `kubeconfig`:
/// every module whose families the rules read.
fn config(kubeconfig: &Path) -> String {
    format!(
        "reload:\n  watch: false\nprog_stats:\n  enabled: true\npolicy:\n  enabled: true\n  \
         interfaces: [lbc, lbb]\ndns:\n  enabled: true\n  interfaces: [lbc, lbb]\n\
         kubernetes:\n  enabled: true\n  kubeconfig: {}\n  node_name: lb\n",
        kubeconfig.display()
    )
}

/// A kubeconfig naming an API server where nothing listens (port 9 on the LB namespace's
/// loopback): the Kubernetes source fails for real, for its alert to fire.
const UNREACHABLE_KUBECONFIG: &str = "\
apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster:
    server: http://127.0.0.1:9
users:
- name: nobody
  user: {}
contexts:
- name: nowhere
  context:
    cluster: nowhere
    user: nobody
current-context: nowhere
";

/// Alerts whose full expression must return series here: the Kubernetes source cannot reach
/// its API server.
const MUST_FIRE: &[&str] = &["DatapathKubernetesSyncFailing"];

/// Alerts whose rate or occupancy part must return series on this lab's daemon (LB module,
/// policy, DNS and Kubernetes source on, a full-NAT service, traffic): for those with a
/// threshold, the expression without it; for `A and on (...) B` and `A unless on (...) B`, `A`.
const MUST_HAVE_SERIES: &[&str] = &[
    "DatapathdDown",
    "DatapathdNotReady",
    "DatapathModuleDown",
    "DatapathControllerRestarting",
    "DatapathProgramDetached",
    "DatapathNoInterfaceAttached",
    "DatapathXdpDropsHigh",
    "DatapathPolicyDropsHigh",
    "DatapathNatPortsNearExhaustion",
    "DatapathMapNearlyFull",
    "DatapathConntrackNearlyFull",
    "DatapathFlowEventsLost",
    "DatapathDnsEventsLost",
    "DatapathBusEventsLost",
    "DatapathKubernetesSyncFailing",
];

/// Alerts that must return nothing on a healthy daemon with traffic.
const MUST_NOT_FIRE: &[&str] = &[
    "DatapathdDown",
    "DatapathdNotReady",
    "DatapathModuleDown",
    "DatapathNoInterfaceAttached",
    "DatapathXdpDropsHigh",
    "DatapathNatPortsNearExhaustion",
    "DatapathMapNearlyFull",
    "DatapathConntrackNearlyFull",
    "DatapathPolicyDropsHigh",
];

#[test]
fn every_alert_expression_runs_on_a_real_prometheus_scraping_a_real_daemon() {
    if !privileged() {
        return;
    }
    let missing = (!Path::new(PROMETHEUS).exists() || !cmd::available(PROMETHEUS, "--version"))
        .then(|| format!("{PROMETHEUS} not found (install the Debian package prometheus)"));
    if !may_run(missing) {
        return;
    }
    let rules = rules();
    assert!(rules.len() >= 10, "{rules:?}");

    let mut lab = ok(
        "setting up the lab",
        Lab::start(LabOptions {
            topology: TopologyOptions::default(),
            daemon: None,
        }),
    );
    let kubeconfig = ok(
        "writing the kubeconfig",
        lab.write_file("kubeconfig", UNREACHABLE_KUBECONFIG),
    );
    ok(
        "starting datapathd",
        lab.start_daemon_with_config(&config(&kubeconfig)),
    );
    let policy = ok(
        "writing the policy",
        lab.write_file("allow-all.yaml", netns_tests::lab::ALLOW_ALL_POLICY),
    );
    ok(
        "applying the allow-all policy",
        lab.daemon()
            .lb_ctl_ok(&["policy", "apply", "-f", &policy.display().to_string()]),
    );
    ok(
        "adding the UDP service",
        lab.add_service(
            UDP_SERVICE_PORT,
            Protocol::Udp,
            "full-nat",
            &["b1", "b2", "b3"],
        ),
    );
    let ns = lab.topo.lb.clone();
    let client = lab.topo.client.clone();
    let prom = start_prometheus(&ns, &lab.topo.prefix);

    // Traffic while Prometheus scrapes, until it has rates of the service's packets (two
    // samples or more of the counter inside the window).
    let deadline = Instant::now() + WAIT;
    let mut answered = 0;
    loop {
        answered += udp_traffic(&client, 20);
        let ready = query(&ns, "rate(datapath_service_packets_total[30s]) > 0")
            .ok()
            .is_some_and(|(s, j)| {
                s == 200
                    && j["data"]["result"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty())
            });
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw the service's packets rise; answered {answered}; its log:\n{}",
            log_of(&prom)
        );
        thread::sleep(Duration::from_millis(500));
    }
    assert!(answered > 0, "no datagram through the service was answered");
    // Another scrape or two, for the 5m windows to hold two samples of every family.
    udp_traffic(&client, 20);
    thread::sleep(Duration::from_secs(3));

    let up = series(&ns, "up{job=\"datapathd\"}");
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0]["value"][1].as_str(), Some("1"), "{up:?}");

    let mut report = Vec::new();
    for (name, expr) in &rules {
        let full = series(&ns, expr);
        let part = without_threshold(expr)
            .or_else(|| left_operand(expr))
            .map(|p| (p, series(&ns, p)));
        report.push(format!(
            "{name}: {} series{}",
            full.len(),
            part.as_ref()
                .map(|(_, s)| format!(", {} in its rate, occupancy or operand", s.len()))
                .unwrap_or_default()
        ));
        if MUST_NOT_FIRE.contains(&name.as_str()) {
            assert!(
                full.is_empty(),
                "{name} fires on a healthy daemon: {expr}: {full:?}"
            );
        }
        if MUST_FIRE.contains(&name.as_str()) {
            assert!(!full.is_empty(), "{name} does not fire: {expr}");
        }
        if MUST_HAVE_SERIES.contains(&name.as_str()) {
            let (part, got) =
                part.unwrap_or_else(|| panic!("{name}: no threshold to strip: {expr}"));
            assert!(
                !got.is_empty(),
                "{name}: {part} returns no series while traffic flows"
            );
        }
    }
    eprintln!("{}", report.join("\n"));

    // Every metric the rules name is one this daemon exports: Prometheus holds series of it.
    let mut names: Vec<&str> = rules
        .iter()
        .flat_map(|(_, expr)| metric_names(expr))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 15, "{names:?}");
    for name in names {
        let got = series(&ns, &format!("{{__name__=\"{name}\"}}"));
        assert!(
            !got.is_empty(),
            "the rules read {name}, which the daemon does not export"
        );
    }
    check_dashboard(&ns);
    drop(prom);
}

/// Every query of the Grafana dashboard (deploy/kustomize/grafana) parses on the real
/// Prometheus and returns series while traffic flows. Grafana's `$__rate_interval` is given
/// the value Grafana would pick for this 1 s scrape interval's data: a 30 s window.
fn check_dashboard(ns: &str) {
    let path = alerts_dir().join("../kustomize/grafana/datapath-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: Json = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let expr = expr.replace("$__rate_interval", "30s");
            let got = series(ns, &expr);
            assert!(
                !got.is_empty(),
                "dashboard panel {:?}: {expr} returns no series while traffic flows",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 15, "{checked} dashboard queries");
    eprintln!("dashboard: {checked} queries, each with series");
}
