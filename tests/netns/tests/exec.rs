//! Process tracing end to end: datapathd with the exec module on follows a program run in a
//! cgroup made for the test (its exec with argv, parent and cgroup id, then its exit), keeps
//! itself off with a clear reason when the kernel's BTF lacks a field it needs (a copy of the
//! real BTF with one member renamed), and leaves no program behind when it stops. The kernel,
//! its tracepoints, the BTF and the processes are real.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use datapath_api::{ProcStatus, ProcessView};
use netns_tests::{
    Daemon, Lab, LabOptions, TopologyOptions, cgroup::TestCgroup, privileged, wait::eventually,
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
            },
            daemon: None,
        }),
    )
}

fn status(d: &Daemon) -> ProcStatus {
    let v = ok("proc status", d.lb_ctl_json(&["proc", "status"]));
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
