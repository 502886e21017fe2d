//! Whether this process can build namespace topologies, and what to do when it cannot.

use crate::cmd;

/// When set to `1`, a test that cannot run fails instead of skipping.
pub const REQUIRE_ENV: &str = "DATAPATH_REQUIRE_PRIVILEGED";

/// Whether [`REQUIRE_ENV`] asks for failures instead of skips.
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// Why namespace tests cannot run here, or `None` when they can.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("namespace tests need root (creating network namespaces)".into());
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

/// `true` when the test may go on. Otherwise panics with the reason if
/// `DATAPATH_REQUIRE_PRIVILEGED=1`, else prints `skipped: <reason>` and returns `false`.
pub fn privileged() -> bool {
    match unavailable_reason() {
        None => true,
        Some(reason) if required() => panic!("{REQUIRE_ENV}=1 but {reason}"),
        Some(reason) => {
            eprintln!("skipped: {reason}");
            false
        }
    }
}
