//! Project automation, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! - `setup`: install what builds and tests need (nightly + rust-src, bpf-linker, Debian
//!   packages); idempotent.
//! - `test`: every check, in order, stopping at the first failure.
//! - `demo`: the load balancer in a namespace topology, with real traffic.
//! - `bench`: per-program cost of the XDP load balancer (ns/packet beside `xdp_drop`).
//! - `fuzz`: the fuzz targets (parsers, checksums, conntrack) for longer than the test smoke.

mod bench;
mod demo;
mod fuzz;
mod setup;
mod test;
mod upgrade_from;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, test and demo automation for datapath"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain pieces and system packages the build and the tests need.
    Setup(setup::SetupArgs),
    /// Run every check: fmt, clippy, BPF clippy, unit tests, fuzz smoke, namespace tests.
    Test(test::TestArgs),
    /// Show the load balancer spreading real connections over three backends.
    Demo(demo::DemoArgs),
    /// Measure the XDP load balancer's ns/packet per path beside a trivial XDP_DROP program.
    Bench(bench::BenchArgs),
    /// Run the fuzz targets (packet parser, checksums, conntrack, policy and config parsers)
    /// longer than `cargo xtask test`'s smoke: --seconds per target, optimised build with
    /// overflow checks, fresh seeds (docs/fuzzing.md).
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(args) => setup::run(&args),
        Command::Test(args) => return test::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
