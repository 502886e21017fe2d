//! Whether this process can run a privileged test, and what to do when it cannot: the one
//! implementation every privileged test and benchmark of the workspace uses.

use crate::cmd;

/// When set to `1`, a test that cannot run fails instead of skipping.
pub const REQUIRE_ENV: &str = "DATAPATH_REQUIRE_PRIVILEGED";

/// Whether [`REQUIRE_ENV`] asks for failures instead of skips.
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// Why `what` cannot run here for want of root, or `None` as root.
pub fn root_reason(what: &str) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        None
    } else {
        Some(format!("not root: {what} needs root"))
    }
}

/// Why namespace tests cannot run here, or `None` when they can.
pub fn unavailable_reason() -> Option<String> {
    if let Some(reason) = root_reason("creating network namespaces") {
        return Some(reason);
    }
    if !cmd::available("ip", "-V") || cmd::run_args("ip", &["netns", "list"]).is_err() {
        return Some("`ip netns` is unavailable (install iproute2)".into());
    }
    for (tool, package) in [
        ("ethtool", "ethtool"),
        ("sysctl", "procps"),
        ("ping", "iputils-ping"),
    ] {
        let flag = if tool == "ping" { "-V" } else { "--version" };
        if !cmd::available(tool, flag) {
            return Some(format!(
                "`{tool}` not found (install the {package} package, or run `cargo xtask setup`)"
            ));
        }
    }
    None
}

/// Decides about a test that cannot run for `reason` (`None`: it can). `true` when the test
/// may go on. Otherwise panics with the reason if `DATAPATH_REQUIRE_PRIVILEGED=1`, else prints
/// `skipped: <reason>` and returns `false`.
pub fn may_run(reason: Option<String>) -> bool {
    match reason {
        None => true,
        Some(reason) if required() => panic!("{REQUIRE_ENV}=1 but {reason}"),
        Some(reason) => {
            eprintln!("skipped: {reason}");
            false
        }
    }
}

/// [`may_run`] for the namespace tests: root, `ip netns` and the tools the topologies use.
pub fn privileged() -> bool {
    may_run(unavailable_reason())
}

/// [`may_run`] for a test that needs root and nothing else this module can check (BPF maps,
/// BPF_PROG_TEST_RUN); `what` names what needs it, for the message.
pub fn privileged_as_root(what: &str) -> bool {
    may_run(root_reason(what))
}
