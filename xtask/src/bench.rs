//! `cargo xtask bench`: the benchmark suite (see `perf/`).
//!
//! 1. Builds `datapathd`, `lb-ctl` and the `perf` tools in release mode.
//! 2. Runs the control-plane criterion benches (`perf/benches/control_plane.rs`): Maglev
//!    builds, a garbage-collection sweep over 1,000,000 flows, and `lb-ctl` change-to-live
//!    latency against a real daemon.
//! 3. Runs `dp-bench`: per-program cost, forwarding rate against nftables DNAT and the
//!    XDP_DROP floor, and the daemon's footprint; it prints one table and writes it to
//!    `perf/RESULTS.md` and to `target/bench/results.json`.
//! 4. Checks that nothing was left behind: no new network namespace, bpffs entry or
//!    `datapathd` process.
//!
//! `--smoke` runs everything once, briefly, from a debug build, and writes nothing: the test
//! suite does that so the tools cannot rot.

use std::{collections::BTreeSet, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    setup,
    util::{self, command},
};

#[derive(Args)]
pub struct BenchArgs {
    /// Short run of everything from a debug build, writing nothing (what `cargo xtask test`
    /// runs).
    #[arg(long)]
    pub smoke: bool,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    pub skip_setup: bool,
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = command("cargo");
    cmd.args(args);
    cmd
}

const BINARIES: [&str; 6] = ["-p", "datapath", "-p", "lb-ctl", "-p", "dp-perf"];

/// The commands of a run: build, criterion, dp-bench.
fn commands(smoke: bool) -> Vec<Command> {
    let profile = if smoke { "debug" } else { "release" };
    let bin_dir = util::target_dir().join(profile);
    let bench_dir = util::target_dir().join("bench");
    let mut build = cargo(&["build"]);
    build.args(BINARIES);
    let mut criterion = if smoke {
        // Criterion runs every benchmark once when not started with `--bench`.
        cargo(&["test", "-p", "dp-perf", "--benches"])
    } else {
        build.arg("--release");
        cargo(&["bench", "-p", "dp-perf", "--bench", "control_plane"])
    };
    criterion
        .env("DATAPATHD_BIN", bin_dir.join("datapathd"))
        .env("LB_CTL_BIN", bin_dir.join("lb-ctl"))
        .env("DP_BENCH_OUT", &bench_dir);
    let mut dp_bench = command(&bin_dir.join("dp-bench").to_string_lossy());
    dp_bench
        .arg("--datapathd")
        .arg(bin_dir.join("datapathd"))
        .arg("--lb-ctl")
        .arg(bin_dir.join("lb-ctl"))
        .arg("--target-dir")
        .arg(util::target_dir());
    if smoke {
        dp_bench.arg("--smoke");
    } else {
        dp_bench
            .arg("--write-results")
            .arg("--json")
            .arg(bench_dir.join("results.json"));
    }
    vec![build, criterion, dp_bench]
}

/// The smoke run, as steps of `cargo xtask test`: the suite, then the benches that are not
/// part of it, briefly: the Kubernetes source at 500 Services (`dp-bench --only kubernetes`)
/// the socket LB (`dp-bench --only socklb`), the DNS module (`dp-bench --only dns`), the
/// exec module (`dp-bench --only exec`) and the graph module (`dp-bench --only graph`).
pub fn smoke_commands() -> Vec<Command> {
    let mut all = commands(true);
    let bin_dir = util::target_dir().join("debug");
    for part in ["kubernetes", "socklb", "dns", "exec", "graph"] {
        let mut alone = command(&bin_dir.join("dp-bench").to_string_lossy());
        alone
            .arg("--datapathd")
            .arg(bin_dir.join("datapathd"))
            .arg("--lb-ctl")
            .arg(bin_dir.join("lb-ctl"))
            .args(["--only", part, "--smoke"]);
        all.push(alone);
    }
    all
}

/// Name prefixes of everything the benchmarks create: the forwarding topology (`pf`), the
/// per-program cost namespace (`dpcost`) and the latency bench's namespace (`dplat`). Only
/// these are checked, so that other work on a shared machine cannot fail the check.
const OURS: [&str; 3] = ["pf", "dpcost", "dplat"];

fn ours(name: &str) -> bool {
    OURS.iter().any(|prefix| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    })
}

/// What a benchmark could leave behind: network namespaces, bpffs entries, daemons.
fn leftovers() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    if let Some(list) = util::capture(Command::new("ip").args(["netns", "list"])) {
        for line in list.lines() {
            if let Some(name) = line.split_whitespace().next()
                && ours(name)
            {
                found.insert(format!("netns {name}"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if ours(&name) {
                found.insert(format!("bpffs {name}"));
            }
        }
    }
    // A daemon of ours runs with its pins under /sys/fs/bpf/<one of our prefixes>.
    if let Some(lines) = util::capture(Command::new("pgrep").args(["-a", "-x", "datapathd"])) {
        for line in lines.lines() {
            let mine = line
                .split_whitespace()
                .any(|arg| arg.strip_prefix("/sys/fs/bpf/").is_some_and(ours));
            if mine {
                found.insert(format!("process {line}"));
            }
        }
    }
    found
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if !args.skip_setup {
        setup::run(&setup::SetupArgs {
            rebuild_bpf_linker: false,
        })?;
    }
    std::fs::create_dir_all(util::target_dir().join("bench")).context("creating target/bench")?;
    let before = leftovers();
    for mut cmd in commands(args.smoke) {
        util::run(&mut cmd)?;
    }
    let after = leftovers();
    let left: Vec<&String> = after.difference(&before).collect();
    if !left.is_empty() {
        bail!("the benchmarks left these behind: {left:?}");
    }
    println!("==> bench: nothing left behind (namespaces, bpffs entries, datapathd processes)");
    if !args.smoke {
        println!("==> bench: table written to perf/RESULTS.md and target/bench/results.json");
    }
    Ok(())
}
