//! `cargo xtask test`: every check, in order, stopping at the first failure.

use std::{
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use crate::{
    setup,
    upgrade_from::{self, UpgradeFrom},
    util::{self, command, is_root},
};

#[derive(Args)]
pub struct TestArgs {
    /// Don't run `cargo xtask setup` first.
    #[arg(long)]
    skip_setup: bool,
    /// Run only these checks (repeatable, or comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Check>,
}

/// The checks, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Check {
    /// `cargo fmt --check`
    Fmt,
    /// Host clippy and BPF clippy.
    Clippy,
    /// Host clippy only.
    HostClippy,
    /// BPF clippy only (nightly, bpfel-unknown-none).
    BpfClippy,
    /// `cargo test --workspace` without the namespace tests.
    Unit,
    /// The fuzz targets' smoke (a second or so per property; `cargo xtask fuzz` runs longer).
    Fuzz,
    /// The namespace integration tests with the real daemon and CLI, then the load-balancer
    /// tests again with the policy module on the LB node (`DATAPATH_TEST_LB_POLICY=allow-all`).
    /// First `upgrade-from`.
    Netns,
    /// Only build the previous landed build (`tests/netns/upgrade-from`) that the upgrade test
    /// starts from, unless it is already built (debug, under `target/upgrade-from/`).
    UpgradeFrom,
    /// The benchmark suite once, in smoke mode: pktgen, per-program cost, forwarding rate,
    /// criterion benches (figures meaningless, only proves they still run).
    BenchSmoke,
    /// `promtool check rules` on deploy/alerts' rules file and PrometheusRule (its `spec`),
    /// and `promtool test rules deploy/alerts/tests.yaml`.
    DeployRules,
}

struct Step {
    name: &'static str,
    selected_by: &'static [Check],
    /// Work done in this process, before the commands.
    call: Option<Box<dyn Fn() -> Result<()>>>,
    commands: Vec<Command>,
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = command("cargo");
    cmd.args(args);
    cmd
}

/// Workspace members that are not default members: the BPF crates, which only build for
/// `bpfel-unknown-none` (see the root `Cargo.toml`).
fn bpf_crates() -> Result<Vec<String>> {
    let out =
        util::capture(command("cargo").args(["metadata", "--no-deps", "--format-version", "1"]))
            .context("`cargo metadata` failed")?;
    let meta: serde_json::Value = serde_json::from_str(&out).context("parsing cargo metadata")?;
    let ids = |key: &str| -> Vec<String> {
        meta[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (members, defaults) = (ids("workspace_members"), ids("workspace_default_members"));
    if defaults.is_empty() {
        bail!("cargo metadata lists no workspace_default_members");
    }
    let mut names: Vec<String> = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["id"].as_str().is_some_and(|id| {
                members.iter().any(|m| m == id) && !defaults.iter().any(|d| d == id)
            })
        })
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    names.sort();
    Ok(names)
}

fn steps(bpf: &[String], upgrade_from: UpgradeFrom) -> Vec<Step> {
    let target = util::target_dir().join("debug");
    let upgrade_bin = util::target_dir().join("upgrade-variant").join("datapathd");
    let mut netns = cargo(&["test", "-p", "netns-tests", "--", "--test-threads=1"]);
    netns
        .env("DATAPATHD_BIN", target.join("datapathd"))
        .env("DATAPATHD_UPGRADE_BIN", &upgrade_bin)
        .env(upgrade_from::BIN_ENV, upgrade_from.bin_dir())
        .env("LB_CTL_BIN", target.join("lb-ctl"));
    // The load-balancer tests once more with the policy module on the LB node's interfaces
    // (allow-all): the traffic the kernel forwards past XDP then crosses tc programs too.
    let mut netns_policed = cargo(&[
        "test",
        "-p",
        "netns-tests",
        "--test",
        "lb",
        "--",
        "--test-threads=1",
    ]);
    netns_policed
        .env("DATAPATHD_BIN", target.join("datapathd"))
        .env("LB_CTL_BIN", target.join("lb-ctl"))
        .env("DATAPATH_TEST_LB_POLICY", "allow-all");

    // --workspace includes every member: leave out the BPF crates (checked on their own).
    let mut host_clippy = cargo(&["clippy", "--workspace"]);
    let mut unit = cargo(&["test", "--workspace", "--exclude", "netns-tests"]);
    for name in bpf {
        host_clippy.args(["--exclude", name]);
        unit.args(["--exclude", name]);
    }
    host_clippy.args(["--all-targets", "--", "-D", "warnings"]);

    let mut bpf_clippy = cargo(&["+nightly", "clippy"]);
    for name in bpf {
        bpf_clippy.args(["-p", name]);
    }
    bpf_clippy.args([
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--bins",
        "--release",
        "--",
        "-D",
        "warnings",
    ]);

    let alerts = util::workspace_root().join("deploy").join("alerts");
    let rule_groups = util::target_dir()
        .join("deploy-rules")
        .join("prometheusrule-spec.yaml");
    let rule_groups_arg = rule_groups.clone();
    let rule_manifest = alerts.join("prometheusrule.yaml");

    vec![
        Step {
            name: "fmt",
            selected_by: &[Check::Fmt],
            call: None,
            commands: vec![cargo(&["fmt", "--all", "--", "--check"])],
        },
        Step {
            name: "clippy",
            selected_by: &[Check::Clippy, Check::HostClippy],
            call: None,
            commands: vec![host_clippy],
        },
        Step {
            name: "bpf-clippy",
            selected_by: &[Check::Clippy, Check::BpfClippy],
            call: None,
            commands: if bpf.is_empty() {
                Vec::new()
            } else {
                vec![bpf_clippy]
            },
        },
        Step {
            name: "unit",
            selected_by: &[Check::Unit],
            call: None,
            commands: vec![unit],
        },
        Step {
            name: "fuzz",
            selected_by: &[Check::Fuzz],
            call: None,
            commands: vec![crate::fuzz::smoke_command(), kernel_fuzz_smoke()],
        },
        Step {
            name: "upgrade-from",
            selected_by: &[Check::Netns, Check::UpgradeFrom],
            call: Some(Box::new(move || upgrade_from.ensure_built())),
            commands: Vec::new(),
        },
        Step {
            name: "netns",
            selected_by: &[Check::Netns],
            call: None,
            commands: {
                // The upgrade test restarts the daemon onto a rebuilt program: a datapathd whose
                // XDP bytecode differs by one harmless instruction, built first and set aside.
                let mut variant = cargo(&["build", "-p", "datapath"]);
                variant.env("DATAPATH_BPF_VARIANT", "upgrade-test");
                let mut set_aside = command("install");
                set_aside
                    .arg("-D")
                    .arg(target.join("datapathd"))
                    .arg(&upgrade_bin);
                vec![
                    variant,
                    set_aside,
                    cargo(&["build", "-p", "datapath", "-p", "lb-ctl"]),
                    netns,
                    netns_policed,
                ]
            },
        },
        Step {
            name: "deploy-rules",
            selected_by: &[Check::DeployRules],
            call: Some(Box::new(move || {
                write_prometheusrule_groups(&rule_manifest, &rule_groups)
            })),
            commands: {
                let mut check = command("promtool");
                check
                    .args(["check", "rules"])
                    .arg(alerts.join("datapath-rules.yaml"))
                    .arg(&rule_groups_arg);
                let mut unit_tests = command("promtool");
                unit_tests
                    .args(["test", "rules"])
                    .arg(alerts.join("tests.yaml"));
                vec![check, unit_tests]
            },
        },
        Step {
            name: "bench-smoke",
            selected_by: &[Check::BenchSmoke],
            call: None,
            commands: crate::bench::smoke_commands(),
        },
    ]
}

/// Writes the `spec` of the PrometheusRule at `src` to `dst`: a rules file with its `groups`,
/// which `promtool check rules` reads. The manifest is block-style YAML whose top-level
/// `spec:` key holds everything indented by two spaces; anything else is refused.
fn write_prometheusrule_groups(src: &std::path::Path, dst: &std::path::Path) -> Result<()> {
    let text =
        std::fs::read_to_string(src).with_context(|| format!("reading {}", src.display()))?;
    if !text.lines().any(|l| l == "kind: PrometheusRule") {
        bail!(
            "{}: not a PrometheusRule (no `kind: PrometheusRule`)",
            src.display()
        );
    }
    let mut lines = text.lines().enumerate().skip_while(|(_, l)| *l != "spec:");
    if lines.next().is_none() {
        bail!("{}: no top-level `spec:`", src.display());
    }
    let mut spec = String::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            spec.push('\n');
        } else if let Some(inner) = line.strip_prefix("  ") {
            spec.push_str(inner);
            spec.push('\n');
        } else if line.starts_with('#') {
            continue;
        } else {
            bail!(
                "{}:{}: a top-level key after `spec:` ({line:?}); keep `spec` last",
                src.display(),
                n + 1
            );
        }
    }
    if !spec.lines().any(|l| l == "groups:") {
        bail!("{}: `spec` has no `groups:`", src.display());
    }
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(dst, spec).with_context(|| format!("writing {}", dst.display()))
}

/// The kernel-level fuzzer's smoke: 10,000 mutated frames through `xdp_lb`, `tc_ingress` and
/// `tc_egress` with BPF_PROG_TEST_RUN (`perf/src/fuzz.rs`, docs/fuzzing.md). Any finding
/// fails the step.
fn kernel_fuzz_smoke() -> Command {
    cargo(&[
        "run",
        "--release",
        "-p",
        "dp-perf",
        "--bin",
        "dp-fuzz",
        "--",
        "--frames",
        "10000",
        "--progress",
        "0",
    ])
}

/// `DATAPATH_REQUIRE_PRIVILEGED=1` for the test steps in CI and as root (privileged tests
/// must fail, not skip, where they are expected to run), unless the caller set it.
fn require_privileged() -> Option<&'static str> {
    if std::env::var_os("DATAPATH_REQUIRE_PRIVILEGED").is_some() {
        return None;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    (ci || is_root()).then_some("1")
}

fn summary(results: &[(&str, bool, f64)]) {
    println!();
    println!("==> summary");
    for (name, ok, secs) in results {
        println!(
            "  {:<4} {name:<12} {secs:>7.1}s",
            if *ok { "ok" } else { "FAIL" }
        );
    }
    let passed = results.iter().filter(|r| r.1).count();
    let failed = results.len() - passed;
    println!("{passed} passed, {failed} failed");
}

pub fn run(args: &TestArgs) -> ExitCode {
    if !args.skip_setup
        && let Err(e) = setup::run(&setup::SetupArgs::default())
    {
        eprintln!("error: setup failed: {e:#}");
        summary(&[("setup", false, 0.0)]);
        return ExitCode::FAILURE;
    }
    let require = require_privileged();
    let bpf = match bpf_crates() {
        Ok(bpf) => bpf,
        Err(e) => {
            eprintln!("error: listing the workspace's BPF crates: {e:#}");
            summary(&[("metadata", false, 0.0)]);
            return ExitCode::FAILURE;
        }
    };
    let upgrade_from = match UpgradeFrom::read() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: the upgrade test's previous landed build: {e:#}");
            summary(&[("upgrade-from", false, 0.0)]);
            return ExitCode::FAILURE;
        }
    };
    let mut results: Vec<(&str, bool, f64)> = Vec::new();
    for mut step in steps(&bpf, upgrade_from) {
        if !args.only.is_empty() && !step.selected_by.iter().any(|c| args.only.contains(c)) {
            continue;
        }
        println!();
        println!("==> test: {}", step.name);
        let started = Instant::now();
        let outcome: Result<()> = step
            .call
            .as_ref()
            .map_or(Ok(()), |call| call())
            .and_then(|()| {
                step.commands.iter_mut().try_for_each(|cmd| {
                    if let Some(v) = require {
                        cmd.env("DATAPATH_REQUIRE_PRIVILEGED", v);
                    }
                    util::run_reporting(cmd)
                })
            });
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => results.push((step.name, true, secs)),
            Err(e) => {
                eprintln!("error: step {} failed: {e:#}", step.name);
                results.push((step.name, false, secs));
                summary(&results);
                return ExitCode::FAILURE;
            }
        }
    }
    summary(&results);
    ExitCode::SUCCESS
}
