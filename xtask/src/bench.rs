//! `cargo xtask bench`: the per-program cost of the XDP load balancer.
//!
//! Builds (release) and runs `datapath`'s `xdp_cost` example, which measures ns/packet per
//! path through BPF_PROG_TEST_RUN beside `xdp_drop`, in a private namespace, and writes the
//! table to `perf/RESULTS.md` and JSON to `target/bench/xdp_cost.json`.

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{
    setup,
    util::{self, command},
};

#[derive(Args)]
pub struct BenchArgs {
    /// Short run (10,000 repeats, one run) that only checks the harness still works; writes
    /// nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    pub skip_setup: bool,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if !args.skip_setup {
        setup::run(&setup::SetupArgs {
            rebuild_bpf_linker: false,
        })?;
    }
    util::run(command("cargo").args([
        "build",
        "--release",
        "-p",
        "datapath",
        "--example",
        "xdp_cost",
    ]))
    .context("building the benchmark")?;
    let binary = util::target_dir().join("release/examples/xdp_cost");
    let mut cmd = command(binary.to_str().context("non-UTF-8 target dir")?);
    if args.smoke {
        cmd.arg("--smoke");
    } else {
        let json_dir = util::target_dir().join("bench");
        std::fs::create_dir_all(&json_dir).context("creating target/bench")?;
        cmd.arg("--write-results")
            .arg("--json")
            .arg(json_dir.join("xdp_cost.json"));
    }
    util::run(&mut cmd).context("running the benchmark")
}
