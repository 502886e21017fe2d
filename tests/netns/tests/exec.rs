//! Process tracing end to end: datapathd with the exec module on follows a program run in a
//! cgroup made for the test (its exec with argv, parent and cgroup id, then its exit), names
//! the process that opened a connection through the load balancer in `lb-ctl conntrack list`,
//! denies exec and connect in the test cgroup only (and only reports them in audit mode), keeps
//! itself off with a clear reason when the kernel's BTF lacks a field it needs (a copy of the
//! real BTF with one member renamed), and leaves no program behind when it stops. The kernel,
//! its tracepoints, the cgroup hooks, the BTF, the namespaces and the processes are real.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use datapath_api::{ProcEventView, ProcRulesView, ProcStatus, ProcessView, Protocol};
use netns_tests::{
    Daemon, Lab, LabOptions, TopologyOptions, cgroup::TestCgroup, lab::TCP_SERVICE_PORT,
    privileged, topology::VIP, wait::eventually,
};

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

const CONFIG: &str = "reload:\n  watch: false\nexec:\n  enabled: true\n  exit_grace_seconds: 60\n";

fn lab() -> Lab {
    ok(
        "lab",
        Lab::start(LabOptions {
            topology: TopologyOptions {
                backends: 1,
                dsr: false,
                ipv6: false,
            },
            daemon: None,
        }),
    )
}

fn status(d: &Daemon) -> ProcStatus {
    let v = d
        .lb_ctl_json(&["proc", "status"])
        .unwrap_or_else(|e| panic!("proc status: {e:#}\n{}", d.log()));
    ok(
        "proc status json",
        serde_json::from_value(v).map_err(Into::into),
    )
}

fn processes(d: &Daemon, args: &[&str]) -> Vec<ProcessView> {
    let mut all = vec!["proc", "list"];
    all.extend(args);
    let v = ok("proc list", d.lb_ctl_json(&all));
    ok(
        "proc list json",
        serde_json::from_value(v).map_err(Into::into),
    )
}

fn rules(d: &Daemon) -> ProcRulesView {
    let v = ok("proc rules", d.lb_ctl_json(&["proc", "rules"]));
    ok(
        "proc rules json",
        serde_json::from_value(v).map_err(Into::into),
    )
}

/// `lb-ctl -o json proc follow` of cgroup `id` for `seconds`, its events.
fn follow(d: &Daemon, id: u64, seconds: u64) -> Vec<ProcEventView> {
    let (id, secs) = (id.to_string(), seconds.to_string());
    let out = ok(
        "proc follow",
        d.lb_ctl_ok(&[
            "-o",
            "json",
            "proc",
            "follow",
            "--cgroup-id",
            &id,
            "--timeout",
            &secs,
        ]),
    );
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Runs `program args` to its end, in `cgroup` when given, in namespace `ns` when given.
fn run(cgroup: Option<&TestCgroup>, ns: Option<&str>, program: &str, args: &[&str]) -> Output {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args).stdin(Stdio::null());
    if let Some(c) = cgroup {
        c.join_on_exec(&mut cmd);
    }
    netns_tests::cmd::output_timeout(&mut cmd, Duration::from_secs(20)).expect(program)
}

/// Bash connects to the VIP (`/dev/tcp`, in its own process) and closes.
fn connect_vip_args() -> Vec<String> {
    vec![
        "-c".into(),
        format!("exec 3<>/dev/tcp/{VIP}/{TCP_SERVICE_PORT}"),
    ]
}

/// Names of the BPF programs loaded in the kernel (`bpftool prog list`).
fn loaded_programs() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "list"])
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect()
}

#[test]
fn exec_and_exit_of_a_program_in_a_test_cgroup_are_followed() {
    if !privileged() {
        return;
    }
    let mut lab = lab();
    ok("daemon", lab.start_daemon_with_config(CONFIG));
    let d = lab.daemon();
    let st = status(d);
    assert!(st.up, "{st:#?}\n{}", d.log());
    assert!(
        st.found_at_start > 0,
        "the /proc walk found nothing: {st:#?}"
    );
    // The daemon itself was there before its tracer: found by the walk.
    let me = d.pid().expect("daemon pid");
    let daemon = processes(d, &["--pid", &me.to_string()]);
    assert!(
        daemon
            .iter()
            .any(|p| p.from_proc && p.exe.ends_with("datapathd")),
        "{daemon:#?}"
    );

    let cgroup = ok(
        "cgroup",
        TestCgroup::create(&format!("datapath-exec-{}", std::process::id())),
    );
    let id = ok("cgroup id", cgroup.id());
    // A distinctive argument: the sleep's length.
    let mut cmd = Command::new("/bin/sleep");
    cmd.arg("1.37").stdout(Stdio::null()).stderr(Stdio::null());
    cgroup.join_on_exec(&mut cmd);
    let mut child = cmd.spawn().expect("spawn sleep");
    let pid = child.id();
    let id_arg = id.to_string();
    let seen = eventually("the exec event", Duration::from_secs(5), || {
        processes(d, &["--cgroup-id", &id_arg])
            .into_iter()
            .find(|p| p.pid == pid)
    });
    assert_eq!(seen.exe, "/bin/sleep");
    assert_eq!(seen.args, ["/bin/sleep", "1.37"]);
    assert_eq!(seen.ppid, std::process::id(), "{seen:#?}");
    assert_eq!(seen.cgroup_id, id);
    assert_eq!(
        seen.cgroup.as_deref(),
        Some(format!("/datapath-exec-{}", std::process::id()).as_str())
    );
    assert_eq!(seen.comm, "sleep");
    assert!(!seen.exited && !seen.from_proc, "{seen:#?}");
    // `proc show` answers the same process.
    let shown: Vec<ProcessView> = serde_json::from_value(ok(
        "proc show",
        d.lb_ctl_json(&["proc", "show", &pid.to_string()]),
    ))
    .unwrap();
    assert!(shown.iter().any(|p| p == &seen), "{shown:#?}");

    let status_code = child.wait().expect("wait sleep");
    assert!(status_code.success());
    let gone = eventually("the exit event", Duration::from_secs(5), || {
        processes(d, &["--pid", &pid.to_string()])
            .into_iter()
            .find(|p| p.start_ticks == seen.start_ticks && p.exited)
    });
    assert_eq!(gone.exit_code, Some(0));
    assert_eq!(gone.exe, "/bin/sleep", "the exit keeps what the exec said");
    let st = status(d);
    for counter in ["exec_sent", "exit_sent"] {
        assert!(st.events.get(counter).copied().unwrap_or(0) > 0, "{st:#?}");
    }
    // A program unknown to the daemon is refused as not found (exit code 4).
    let out = ok("proc show", d.lb_ctl(&["proc", "show", "4000000"]));
    assert_eq!(out.status.code(), Some(4));

    // Stopped, it leaves no program of ours loaded.
    assert!(loaded_programs().iter().any(|n| n == "trace_exec"));
    ok("stop", lab.daemon_mut().stop());
    // The kernel frees a program once its last reference is gone, after a grace period.
    eventually(
        "the tracer's programs unloaded",
        Duration::from_secs(10),
        || {
            let left: Vec<String> = loaded_programs()
                .into_iter()
                .filter(|n| n.starts_with("trace_"))
                .collect();
            left.is_empty().then_some(())
        },
    );
}

#[test]
fn a_kernel_without_a_needed_btf_field_keeps_the_module_off_and_the_rest_running() {
    if !privileged() {
        return;
    }
    let mut lab = lab();
    // The real BTF with `start_boottime` renamed (the same length: the file stays valid).
    let mut btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("the kernel's BTF");
    let name = b"\0start_boottime\0";
    let at = btf
        .windows(name.len())
        .position(|w| w == name)
        .expect("the member's name in the string table");
    btf[at + 1..at + name.len() - 1].copy_from_slice(b"start_bootXime");
    let path = ok("scratch", lab.scratch()).join("vmlinux-without-start_boottime");
    std::fs::write(&path, &btf).unwrap();
    let config = format!("{CONFIG}  btf_path: {}\n", path.display());
    ok("daemon", lab.start_daemon_with_config(&config));
    let d = lab.daemon();
    let st = status(d);
    assert!(!st.up, "{st:#?}");
    let reason = st.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("task_struct.start_boottime"),
        "the reason names the field: {reason}"
    );
    // The rest of the daemon runs: the load balancer serves.
    let status: serde_json::Value = ok("status", d.lb_ctl_json(&["status"]));
    let lb = status["modules"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "lb")
        .cloned()
        .unwrap_or_default();
    assert_eq!(lb["up"], true, "{status:#}");
    assert!(
        !loaded_programs().iter().any(|n| n == "trace_exec"),
        "nothing of the tracer was loaded"
    );
}

/// The lab with the daemon (exec on, with `extra` config lines under `exec:`) and one
/// full-NAT TCP service on the VIP.
fn service_lab(extra: &str) -> Lab {
    let mut lab = lab();
    ok(
        "daemon",
        lab.start_daemon_with_config(&format!("{CONFIG}{extra}")),
    );
    let st = status(lab.daemon());
    assert!(st.up, "{st:#?}\n{}", lab.daemon().log());
    ok(
        "service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &["b1"])
            .map(drop),
    );
    lab
}

#[test]
fn a_connection_to_the_vip_carries_its_process_in_the_conntrack() {
    if !privileged() {
        return;
    }
    let lab = service_lab("");
    let d = lab.daemon();
    let cgroup = ok(
        "cgroup",
        TestCgroup::create(&format!("datapath-exec-ct-{}", std::process::id())),
    );
    let id = ok("cgroup id", cgroup.id());
    let client_ns = lab.client_ns().to_string();
    std::thread::scope(|s| {
        let events = s.spawn(|| follow(d, id, 8));
        // The stream is open before the program runs.
        std::thread::sleep(Duration::from_millis(500));
        // Bash opens the connection in its own process (no fork: /dev/tcp is a redirection of
        // the shell itself), then execs `sleep` in the same pid, which holds it open. The
        // connection is bash's: the cache may already know the pid as `sleep` when it names
        // the connect, and must go by when each happened (an earlier build named it
        // `/usr/bin/sleep` under load).
        let script = format!("exec 3<>/dev/tcp/{VIP}/{TCP_SERVICE_PORT} && exec sleep 3");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &client_ns, "/bin/bash", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cgroup.join_on_exec(&mut cmd);
        let mut child = cmd.spawn().expect("spawn bash");
        let pid = child.id();
        let port = TCP_SERVICE_PORT.to_string();
        let row = eventually("the flow's process", Duration::from_secs(5), || {
            let rows = ok(
                "conntrack list",
                d.lb_ctl_json(&["conntrack", "list", "--table", "lb", "--port", &port]),
            );
            // The entry's state follows the packets: the handshake's last ACK can reach the
            // XDP program after the owner is learned, so wait for both.
            rows.as_array()
                .into_iter()
                .flatten()
                .find(|r| {
                    r["pid"] == pid && r["dst"] == VIP.to_string() && r["state"] == "ESTABLISHED"
                })
                .cloned()
        });
        assert_eq!(row["exe"], "/bin/bash", "{row:#}");
        assert_eq!(row["state"], "ESTABLISHED", "{row:#}");
        let table = ok("conntrack table", d.lb_ctl_ok(&["conntrack", "list"]));
        assert!(
            table.contains("PROCESS") && table.contains(&format!("bash[{pid}]")),
            "{table}"
        );
        let st = status(d);
        assert!(st.connections >= 1, "{st:#?}");
        assert!(child.wait().expect("wait bash").success());

        // The follow stream had the program's exec and its connect, attributed.
        let events = events.join().expect("follow");
        assert!(
            events.iter().any(|e| matches!(e,
                ProcEventView::Exec { process, verdict: None, .. }
                    if process.pid == pid && process.exe == "/bin/bash")),
            "{events:#?}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, ProcEventView::Exit { pid: p, code: 0, .. } if *p == pid)),
            "the exit, found in the cgroup through the cache: {events:#?}"
        );
        let connect = events
            .iter()
            .find_map(|e| match e {
                ProcEventView::Connect { connect } if connect.pid == pid => Some(connect),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no connect event of {pid}: {events:#?}"));
        assert_eq!(
            (
                connect.outcome.as_str(),
                connect.protocol.as_str(),
                connect.dst,
                connect.dst_port,
                connect.exe.as_deref(),
                connect.cgroup_id
            ),
            (
                "established",
                "tcp",
                std::net::IpAddr::V4(VIP),
                TCP_SERVICE_PORT,
                Some("/bin/bash"),
                id
            ),
            "{connect:#?}"
        );
        assert_eq!(
            row["src_port"], connect.src_port,
            "the event's tuple is the flow's"
        );
    });
}

/// `exec.enforcement` in `mode` for `cgroup`, denying `program` and connects to the VIP.
fn enforcement(mode: &str, cgroup: &TestCgroup, program: &Path) -> String {
    let name = cgroup
        .path()
        .file_name()
        .expect("cgroup name")
        .to_string_lossy()
        .into_owned();
    format!(
        "  enforcement:\n    mode: {mode}\n    cgroups: [/{name}]\n    deny_exec: [{}]\n    \
         deny_connect: [\"{VIP}:{TCP_SERVICE_PORT}\"]\n",
        program.display()
    )
}

#[test]
fn enforcement_denies_exec_and_connect_in_the_test_cgroup_only_and_audit_only_reports() {
    if !privileged() {
        return;
    }
    let cgroup = ok(
        "cgroup",
        TestCgroup::create(&format!("datapath-exec-enf-{}", std::process::id())),
    );
    let id = ok("cgroup id", cgroup.id());
    let mut lab = lab();
    // A copy of the shell: its own inode, so the rule matches it and not /bin/sh.
    let dir = ok("scratch", lab.scratch());
    let denied = dir.join("denied-sh");
    std::fs::copy("/bin/sh", &denied).expect("copy /bin/sh");
    let marker = |n: &str| dir.join(format!("ran-{n}"));
    let touch = |n: &str| format!("echo ran > {}", marker(n).display());
    let denied_s = denied.display().to_string();
    let client_ns = lab.client_ns().to_string();
    let connect = connect_vip_args();
    let connect: Vec<&str> = connect.iter().map(String::as_str).collect();

    ok(
        "daemon",
        lab.start_daemon_with_config(&format!(
            "{CONFIG}{}",
            enforcement("enforce", &cgroup, &denied)
        )),
    );
    let st = status(lab.daemon());
    assert!(st.up, "{st:#?}\n{}", lab.daemon().log());
    ok(
        "service",
        lab.add_service(TCP_SERVICE_PORT, Protocol::Tcp, "full-nat", &["b1"])
            .map(drop),
    );
    let d = lab.daemon();
    let r = rules(d);
    assert_eq!(
        (
            r.mode.as_str(),
            r.host_wide,
            r.cgroups.len(),
            r.hooks.clone()
        ),
        (
            "enforce",
            false,
            1,
            vec!["exec".to_string(), "connect".to_string()]
        ),
        "{r:#?}"
    );
    assert_eq!(r.cgroups[0].id, id);

    // Exec: killed before it ran an instruction in the cgroup; runs outside it.
    let inside = run(Some(&cgroup), None, &denied_s, &["-c", &touch("inside")]);
    assert_eq!(inside.status.signal(), Some(9), "{inside:?}");
    assert!(!marker("inside").exists(), "the denied program ran");
    let outside = run(None, None, &denied_s, &["-c", &touch("outside")]);
    assert!(outside.status.success(), "{outside:?}");
    assert!(marker("outside").exists());
    // Another program runs in the cgroup.
    let other = run(Some(&cgroup), None, "/bin/sh", &["-c", &touch("other")]);
    assert!(
        other.status.success() && marker("other").exists(),
        "{other:?}"
    );

    // Connect: EPERM in the cgroup; outside it the VIP answers.
    let inside = run(Some(&cgroup), Some(&client_ns), "/bin/bash", &connect);
    assert!(!inside.status.success(), "{inside:?}");
    let err = String::from_utf8_lossy(&inside.stderr);
    assert!(err.contains("Operation not permitted"), "{err}");
    let outside = run(None, Some(&client_ns), "/bin/bash", &connect);
    assert!(outside.status.success(), "{outside:?}");
    // An IPv6 socket to the IPv4-mapped VIP meets the IPv4 rule (connect6).
    let mapped = format!("exec 3<>/dev/tcp/::ffff:{VIP}/{TCP_SERVICE_PORT}");
    let inside6 = run(
        Some(&cgroup),
        Some(&client_ns),
        "/bin/bash",
        &["-c", &mapped],
    );
    let err = String::from_utf8_lossy(&inside6.stderr);
    assert!(
        !inside6.status.success() && err.contains("Operation not permitted"),
        "{inside6:?}"
    );

    let r = rules(d);
    let hits: Vec<(String, u64)> = r.rules.iter().map(|x| (x.kind.clone(), x.hits)).collect();
    assert_eq!(
        hits,
        [("exec".to_string(), 1), ("connect".to_string(), 2)],
        "{r:#?}"
    );
    assert_eq!(r.verdicts.get("exec_denied"), Some(&1), "{r:#?}");
    assert_eq!(r.verdicts.get("connect_denied"), Some(&2), "{r:#?}");
    assert_eq!(r.verdicts.get("exec_audited"), Some(&0), "{r:#?}");
    let shown = ok("rules table", d.lb_ctl_ok(&["proc", "rules"]));
    assert!(
        shown.contains("enforcement: enforce in /datapath-exec-enf-"),
        "{shown}"
    );

    // Audit: the same programs run and connect, and the same matches are reported.
    // The same daemon files (a new Daemon's would be removed by the old one's drop).
    ok(
        "audit config",
        lab.write_file(
            "config.yaml",
            &format!("{CONFIG}{}", enforcement("audit", &cgroup, &denied)),
        )
        .map(drop),
    );
    ok("restart (audit)", lab.daemon_mut().restart());
    let d = lab.daemon();
    assert!(status(d).up);
    let (inside_exec, inside_connect, events) = std::thread::scope(|s| {
        let events = s.spawn(|| follow(d, id, 6));
        std::thread::sleep(Duration::from_millis(500));
        let e = run(Some(&cgroup), None, &denied_s, &["-c", &touch("audited")]);
        let c = run(Some(&cgroup), Some(&client_ns), "/bin/bash", &connect);
        (e, c, events.join().expect("follow"))
    });
    assert!(inside_exec.status.success(), "{inside_exec:?}");
    assert!(marker("audited").exists(), "audit denied an exec");
    assert!(inside_connect.status.success(), "{inside_connect:?}");
    assert!(
        events.iter().any(|e| matches!(e,
            ProcEventView::Exec { process, verdict: Some(v), rule: Some(0) }
                if v == "audited" && process.exe == denied_s)),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| matches!(e,
            ProcEventView::Connect { connect }
                if connect.verdict.as_deref() == Some("audited")
                    && connect.outcome == "checked"
                    && connect.rule == Some(1)
                    && connect.dst == std::net::IpAddr::V4(VIP))),
        "{events:#?}"
    );
    let r = rules(d);
    assert_eq!(r.verdicts.get("exec_audited"), Some(&1), "{r:#?}");
    assert_eq!(r.verdicts.get("connect_audited"), Some(&1), "{r:#?}");
    assert_eq!(r.verdicts.get("exec_denied"), Some(&0), "{r:#?}");
    assert_eq!(r.verdicts.get("connect_denied"), Some(&0), "{r:#?}");

    // Stopped: no program of ours left, nothing attached to the cgroup.
    ok("stop", lab.daemon_mut().stop());
    eventually("the tracer unloaded", Duration::from_secs(10), || {
        let left: Vec<String> = loaded_programs()
            .into_iter()
            .filter(|n| n.starts_with("trace_") || n.starts_with("enforce_"))
            .collect();
        left.is_empty().then_some(())
    });
    let attached = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup.path())
        .output()
        .expect("bpftool cgroup show");
    let v: serde_json::Value = serde_json::from_slice(&attached.stdout).unwrap_or_default();
    assert!(
        v.as_array().is_none_or(|a| a.is_empty()),
        "left on the cgroup: {v:#}"
    );
}

#[test]
fn bad_enforcement_settings_are_refused_with_the_field_named() {
    if !privileged() {
        return;
    }
    let mut lab = lab();
    // Enforcement without a scope never starts.
    let path = ok(
        "config",
        lab.write_file(
            "bad.yaml",
            &format!("{CONFIG}  enforcement:\n    mode: enforce\n    deny_exec: [/bin/true]\n"),
        ),
    );
    let dir = ok("scratch", lab.scratch());
    let mut cmd = Command::new(netns_tests::Binaries::from_env().datapathd);
    cmd.args(["run", "--config"])
        .arg(&path)
        .arg("--socket")
        .arg(dir.join("bad.sock"))
        .arg("--state-file")
        .arg(dir.join("bad-state.json"))
        .arg("--pin-root")
        .arg(format!(
            "/sys/fs/bpf/datapath-bad-config-{}",
            std::process::id()
        ));
    let out = ok(
        "datapathd with a bad config",
        netns_tests::cmd::output_timeout(&mut cmd, Duration::from_secs(20)),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("exec.enforcement.cgroups"), "{err}");
    // A rule whose file is missing keeps the module off with the path named, and the daemon
    // runs.
    let missing = format!(
        "{CONFIG}  enforcement:\n    mode: enforce\n    cgroups: [/]\n    deny_exec: [/nonexistent/prog]\n"
    );
    ok("daemon", lab.start_daemon_with_config(&missing));
    let st = status(lab.daemon());
    assert!(!st.up, "{st:#?}");
    let reason = st.reason.unwrap_or_default();
    assert!(reason.contains("/nonexistent/prog"), "{reason}");
    assert!(!loaded_programs().iter().any(|n| n == "trace_exec"));
}
