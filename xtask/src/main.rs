//! Project automation, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! - `setup`: install what builds and tests need (nightly + rust-src, bpf-linker, Debian
//!   packages); idempotent.
//! - `test`: every check, in order, stopping at the first failure.
//! - `demo`: the load balancer in a namespace topology, with real traffic.
//! - `bench`: not implemented yet.

mod demo;
mod setup;
mod test;
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
    /// Run every check: fmt, clippy, BPF clippy, unit tests, namespace tests.
    Test(test::TestArgs),
    /// Show the load balancer spreading real connections over three backends.
    Demo(demo::DemoArgs),
    /// Benchmarks (not implemented yet).
    Bench,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(args) => setup::run(&args),
        Command::Test(args) => return test::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench => {
            eprintln!("cargo xtask bench: not implemented yet");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
