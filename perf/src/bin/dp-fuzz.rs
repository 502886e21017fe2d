//! `dp-fuzz`: sends mutated and random frames through `xdp_lb`, `tc_ingress` and `tc_egress`
//! with BPF_PROG_TEST_RUN and checks every verdict, counter and output frame (root only; see
//! `dp_perf::fuzz` and docs/fuzzing.md).
//!
//! Exit status: 0 without findings (or only findings of `--allow`ed checks), 1 with findings,
//! 2 when the run itself failed.

use std::process::ExitCode;

use clap::Parser;
use dp_perf::fuzz::{self, FuzzOptions, check::Program};

#[derive(Parser)]
#[command(name = "dp-fuzz", version)]
struct Args {
    /// Frames to send in all (split evenly over the programs).
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    frames: u64,
    /// Seed of the frame generator.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Stop after this many seconds even if frames are left.
    #[arg(long, value_name = "MAX")]
    seconds: Option<f64>,
    /// Which programs.
    #[arg(long, value_enum, default_value_t = Which::All)]
    program: Which,
    /// Worker threads, each pinned to its own CPU (the first on --cpu).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    jobs: u64,
    /// CPU of the first worker (default: the last online CPU).
    #[arg(long)]
    cpu: Option<usize>,
    /// Do not minimize the findings' frames.
    #[arg(long)]
    no_minimize: bool,
    /// Progress line on stderr every this many seconds (0: none).
    #[arg(long, default_value_t = 10.0)]
    progress: f64,
    /// Report the findings of this check (e.g. `forwarded-frame-parses:udp`) but do not fail
    /// the run on them; repeatable.
    #[arg(long, value_name = "CHECK")]
    allow: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    output: Format,
    /// Instead of fuzzing, run these frames (hex, comma-separated, each optionally prefixed
    /// with its interface, `back:0200...`) one after the other through --program (xdp,
    /// tc-ingress or tc-egress) in a fresh state and print what happened to each.
    #[arg(long, value_name = "[IFACE:]HEX,...")]
    replay: Option<String>,
    /// With --replay: the interface of frames without a prefix (front, back, side, lo, ep0,
    /// ep1).
    #[arg(long, default_value = "front")]
    iface: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    Xdp,
    TcIngress,
    TcEgress,
    /// Both tc programs.
    Tc,
    All,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let programs = match args.program {
        Which::Xdp => vec![Program::Xdp],
        Which::TcIngress => vec![Program::TcIngress],
        Which::TcEgress => vec![Program::TcEgress],
        Which::Tc => vec![Program::TcIngress, Program::TcEgress],
        Which::All => Program::ALL.to_vec(),
    };
    if let Some(hex) = &args.replay {
        if programs.len() != 1 {
            eprintln!("dp-fuzz: --replay needs one --program (xdp, tc-ingress or tc-egress)");
            return ExitCode::from(2);
        }
        return match fuzz::replay(programs[0], &args.iface, hex) {
            Ok(text) => {
                print!("{text}");
                if text.contains("FAILED") {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("dp-fuzz: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let options = FuzzOptions {
        frames: args.frames,
        seed: args.seed,
        max_seconds: args.seconds,
        programs,
        jobs: args.jobs as usize,
        cpu: args.cpu,
        minimize: !args.no_minimize,
        progress_seconds: args.progress,
        allowed: args.allow.clone(),
    };
    let report = match fuzz::run(&options) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dp-fuzz: {e:#}");
            return ExitCode::from(2);
        }
    };
    match args.output {
        Format::Text => print!("{}", report.text()),
        Format::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("dp-fuzz: {e}");
                return ExitCode::from(2);
            }
        },
    }
    if report.failing() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
