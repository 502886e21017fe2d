//! The daemon as controllers under one supervisor (docs/architecture.md), with the real daemon,
//! namespaces, veths and TCP traffic:
//!
//! - a controller whose run loop panics is restarted and reported, while the others keep
//!   serving and traffic keeps flowing;
//! - a reload that one controller refuses leaves every controller as it was, including those
//!   that had already prepared their part.
//!
//! Faults are injected with `DATAPATH_FAILPOINTS` (see `datapath::supervisor`).
//!
//! Run with `cargo xtask test --only netns`, or after `cargo build -p datapath -p lb-ctl`:
//! `cargo test -p netns-tests --test controllers -- --test-threads=1` (as root).

use std::{
    thread,
    time::{Duration, Instant},
};

use datapath_api::{ModuleStatus, Protocol, StatusView};
use netns_tests::{
    Binaries, Daemon, DaemonOptions, Lab, LabOptions, client, cmd, http,
    lab::TCP_SERVICE_PORT,
    privileged,
    topology::{LB_CLIENT_IP, TopologyOptions, VIP, ip_in},
};

const THREE: [&str; 3] = ["b1", "b2", "b3"];
const WAIT: Duration = Duration::from_secs(30);
const METRICS_PORT: u16 = 9477;

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn status(d: &Daemon) -> StatusView {
    ok(
        "lb-ctl status",
        d.lb_ctl_json(&["status"])
            .and_then(|v| Ok(serde_json::from_value(v)?)),
    )
}

fn module<'a>(st: &'a StatusView, name: &str) -> &'a ModuleStatus {
    st.modules
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("no module {name} in {st:#?}"))
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

/// A lab whose daemon runs with `config` (written to a file) and `failpoints` in its
/// environment.
fn lab_with(config: &str, failpoints: &str) -> Option<(Lab, std::path::PathBuf)> {
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
    // SAFETY: the netns tests run with --test-threads=1, and no other thread of this process
    // reads the environment while the daemon is spawned; the variable is removed right after.
    unsafe { std::env::set_var("DATAPATH_FAILPOINTS", failpoints) };
    let started = Daemon::start_with(&lab.topo.lb, &lab.topo.prefix, Binaries::from_env(), opts);
    // SAFETY: as above.
    unsafe { std::env::remove_var("DATAPATH_FAILPOINTS") };
    lab.daemon = Some(ok("starting datapathd", started));
    Some((lab, path))
}

#[test]
fn a_controller_that_panics_is_restarted_and_the_others_keep_serving_traffic() {
    // The conntrack controller's run loop (its GC sweeps) panics once, 2 s after start.
    let config = "lb:\n  interfaces: [lbc, lbb]\nconntrack:\n  gc_interval_seconds: 1\n\
                  policy:\n  enabled: true\n  interfaces: [lbb]\nprog_stats:\n  enabled: true\n";
    let Some((lab, path)) = lab_with(config, "conntrack.run=panic-after-ms:2000") else {
        return;
    };
    ok(
        "adding the TCP service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &THREE),
    );
    let vip = client::sock(VIP, TCP_SERVICE_PORT);
    let mut conns = ok(
        "opening connections",
        client::connect_many_in(&lab.topo.client, vip, 10),
    );

    // The connections carry data before, during and after the panic and the restart.
    let st = wait_until("the conntrack controller to be restarted", || {
        ok("pinging while it fails", client::ping_all(&mut conns));
        let st = status(lab.daemon());
        (module(&st, "conntrack").restarts >= 1).then_some(st)
    });
    let ct = module(&st, "conntrack");
    assert_eq!(ct.restarts, 1, "{ct:?}");
    assert!(
        ct.last_failure
            .as_deref()
            .is_some_and(|f| f.contains("panicked") && f.contains("injected panic")),
        "{ct:?}"
    );
    for name in ["lb", "policy", "prog_stats"] {
        let m = module(&st, name);
        assert!(m.up, "{name} keeps serving: {m:?}");
        assert_eq!(m.restarts, 0, "{name} was not restarted: {m:?}");
    }
    assert!(st.ready, "the daemon stays ready: {st:#?}");
    ok("pinging after the restart", client::ping_all(&mut conns));
    let mut fresh = ok(
        "a new connection",
        client::connect_in(&lab.topo.client, vip),
    );
    ok("ping on the new connection", fresh.ping());
    assert_eq!(
        ok("lb-ctl service list", lab.daemon().services()).len(),
        1,
        "the API keeps answering"
    );

    // The restarted loop works: its next sweeps count the flow table again.
    let text = wait_until("a sweep of the restarted conntrack controller", || {
        let text = scrape(&lab);
        (sample(&text, "datapath_map_entries{map=\"LB_FLOWS\"}").unwrap_or(0.0) >= 11.0)
            .then_some(text)
    });
    assert_eq!(
        sample(
            &text,
            "datapath_controller_restarts_total{controller=\"conntrack\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "datapath_controller_restarts_total{controller=\"lb\"}"
        ),
        Some(0.0),
        "{text}"
    );
    assert!(
        lab.daemon()
            .log()
            .contains("controller failed; restarting it, the others keep serving"),
        "{}",
        lab.daemon().log()
    );
    let _ = std::fs::remove_file(&path);
}

/// Whether any BPF program (XDP or TCX) is attached to `dev` in `ns`.
fn programs_on(ns: &str, dev: &str) -> String {
    let out = ok(
        "bpftool net show",
        cmd::run_args(
            "ip",
            &[
                "netns", "exec", ns, "bpftool", "-j", "net", "show", "dev", dev,
            ],
        ),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut found = Vec::new();
    for section in v.as_array().into_iter().flatten() {
        for (kind, entries) in section.as_object().into_iter().flatten() {
            if entries.as_array().is_some_and(|a| !a.is_empty()) {
                found.push(kind.clone());
            }
        }
    }
    found.join(",")
}

#[test]
fn a_reload_refused_by_one_controller_leaves_every_controller_as_it_was() {
    let config = "lb:\n  interfaces: [lbc, lbb]\npolicy:\n  enabled: true\n  interfaces: [lbb]\n\
                  reload:\n  poll_interval_ms: 100\n";
    // The policy refuses every reload; the load balancer, started before it, prepares first.
    let Some((lab, path)) = lab_with(config, "policy.prepare=error") else {
        return;
    };
    ok(
        "adding the TCP service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &THREE),
    );
    let mut conns = ok(
        "opening connections",
        client::connect_many_in(&lab.topo.client, client::sock(VIP, TCP_SERVICE_PORT), 10),
    );
    let lb = lab.topo.lb.clone();
    ok(
        "creating lbn",
        ip_in(
            &lb,
            &["link", "add", "lbn", "type", "veth", "peer", "name", "lbn2"],
        ),
    );
    ok("lbn up", ip_in(&lb, &["link", "set", "lbn", "up"]));
    let before = status(lab.daemon());
    let policy_before = ok(
        "lb-ctl policy list",
        lab.daemon().lb_ctl_json(&["policy", "list"]),
    );
    let lbb_before = programs_on(&lb, "lbb");
    assert!(
        lbb_before.contains("xdp"),
        "the load balancer is attached to lbb: {lbb_before}"
    );

    // Both controllers would attach to lbn; the policy refuses, so the load balancer must
    // undo its attachment.
    std::fs::write(
        &path,
        "lb:\n  interfaces: [lbc, lbb, lbn]\npolicy:\n  enabled: true\n  interfaces: [lbb, lbn]\n\
         reload:\n  poll_interval_ms: 100\n",
    )
    .unwrap();
    let st = wait_until("the reload to be refused", || {
        ok("pinging during the reload", client::ping_all(&mut conns));
        let st = status(lab.daemon());
        (st.config_reload_failures == 1).then_some(st)
    });
    let error = st.last_reload_error.clone().unwrap_or_default();
    assert!(
        error.contains("controller policy refused the reload") && error.contains("failpoint"),
        "{error}"
    );
    assert_eq!(st.config_reloads, 0);
    let names = |s: &StatusView| {
        s.interfaces
            .iter()
            .map(|i| i.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&st), names(&before), "the load balancer's interfaces");
    assert_eq!(
        programs_on(&lb, "lbn"),
        "",
        "the load balancer's attachment to lbn was rolled back"
    );
    let policy_after = ok(
        "lb-ctl policy list",
        lab.daemon().lb_ctl_json(&["policy", "list"]),
    );
    // The policy and its generation; its packet counters move with the traffic.
    for key in ["policy", "generation", "endpoints"] {
        assert_eq!(policy_after[key], policy_before[key], "the policy's {key}");
    }
    assert_eq!(
        programs_on(&lb, "lbb"),
        lbb_before,
        "lbb keeps the programs it had"
    );
    for name in ["lb", "policy", "prog_stats", "conntrack"] {
        assert_eq!(
            (module(&st, name).up, module(&st, name).enabled),
            (module(&before, name).up, module(&before, name).enabled),
            "{name}"
        );
    }
    ok(
        "connections after the refused reload",
        client::ping_all(&mut conns),
    );
    let _ = std::fs::remove_file(&path);
}
