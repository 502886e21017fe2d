//! `cargo xtask fuzz`: the fuzz targets for longer than the smoke that `cargo xtask test` runs.
//!
//! A target is one property-test file (`*/tests/fuzz_*.rs`, on proptest, see
//! `docs/fuzzing.md`). Here each target gets `--seconds` (default 60), shared evenly by its
//! properties, from fresh random seeds, in an optimised build that keeps overflow checks and
//! debug assertions (the `fuzz` profile, defined through the environment so nothing else
//! changes; it builds into `target/fuzz/`). The BPF programs are not built for it
//! (`AYA_BUILD_SKIP`): no target loads them. A failure prints the shrunk input and the seed that
//! replays it (`--seed`); the input then becomes a unit test in the target's file.

use std::{process::Command, time::Instant};

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use crate::util::{self, command};

/// The fuzz targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// `lb_core::parse`: frames, VLAN tags, IPv4/TCP/UDP/ICMP headers, ICMP quotes.
    Parse,
    /// `lb_core::parse6`: IPv6 frames, extension headers, ICMPv6 quotes.
    Parse6,
    /// `lb_core::csum`: incremental checksum updates.
    Csum,
    /// `conntrack`: packet sequences through the state machine and entry updates, keys.
    Conntrack,
    /// The policy file parser and its compilation (`datapath::policy`).
    Policy,
    /// The daemon's configuration file and its reload (`datapath::config`, `runtime`).
    Config,
    /// `dnsnames`: captured DNS responses to learned names (frames, TCP reassembly, decoding,
    /// the name store).
    Dns,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Parse,
        Target::Parse6,
        Target::Csum,
        Target::Conntrack,
        Target::Policy,
        Target::Config,
        Target::Dns,
    ];

    /// (package, test target).
    fn location(self) -> (&'static str, &'static str) {
        match self {
            Target::Parse => ("lb-core", "fuzz_parse"),
            Target::Parse6 => ("lb-core", "fuzz_parse6"),
            Target::Csum => ("lb-core", "fuzz_csum"),
            Target::Conntrack => ("conntrack", "fuzz_conntrack"),
            Target::Policy => ("datapath", "fuzz_policy"),
            Target::Config => ("datapath", "fuzz_config"),
            Target::Dns => ("dnsnames", "fuzz_dns"),
        }
    }

    fn name(self) -> &'static str {
        self.location().1.trim_start_matches("fuzz_")
    }
}

#[derive(Args)]
pub struct FuzzArgs {
    /// Seconds per target, shared evenly by its properties.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Only these targets (repeatable, or comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    target: Vec<Target>,
    /// Replay a run: the seed a failure printed (DATAPATH_FUZZ_SEED).
    #[arg(long)]
    seed: Option<u64>,
}

/// `cargo test -p ... --test ...` for `targets`.
fn cargo_test(targets: &[Target]) -> Command {
    let mut cmd = command("cargo");
    cmd.arg("test");
    let mut packages: Vec<&str> = targets.iter().map(|t| t.location().0).collect();
    packages.dedup();
    for p in packages {
        cmd.args(["-p", p]);
    }
    for t in targets {
        cmd.args(["--test", t.location().1]);
    }
    cmd
}

/// The smoke `cargo xtask test` runs: every target, debug build, the tests' own small budget
/// (a second or so per property).
pub fn smoke_command() -> Command {
    cargo_test(&Target::ALL)
}

/// `cargo test` in the `fuzz` profile: release optimisations with overflow checks and debug
/// assertions, without the BPF build.
fn fuzz_profile(cmd: &mut Command) {
    cmd.args(["--profile", "fuzz"])
        .env("CARGO_PROFILE_FUZZ_INHERITS", "release")
        .env("CARGO_PROFILE_FUZZ_OVERFLOW_CHECKS", "true")
        .env("CARGO_PROFILE_FUZZ_DEBUG_ASSERTIONS", "true")
        .env("AYA_BUILD_SKIP", "1");
}

/// The property tests of `target` (tests named `fuzz_*`; the regression tests beside them run
/// in the smoke).
fn properties(target: Target) -> Result<Vec<String>> {
    let mut list = cargo_test(&[target]);
    fuzz_profile(&mut list);
    list.args(["--", "--list", "--format", "terse"]);
    let Some(out) = util::capture(&mut list) else {
        bail!("cannot list the tests of {}", util::describe(&list));
    };
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|name| name.starts_with("fuzz_"))
        .map(String::from)
        .collect())
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    let targets: Vec<Target> = if args.target.is_empty() {
        Target::ALL.to_vec()
    } else {
        Target::ALL
            .into_iter()
            .filter(|t| args.target.contains(t))
            .collect()
    };
    let mut results = Vec::new();
    for target in targets {
        // Built per target, as it runs: packages built together unify their features (lb-core
        // with datapath's `alloc`), which would give another binary than the run's.
        let mut build = cargo_test(&[target]);
        fuzz_profile(&mut build);
        build.arg("--no-run");
        util::run(&mut build)?;
        let props = properties(target)?;
        if props.is_empty() {
            bail!("target {} has no fuzz_* properties", target.name());
        }
        let per_property = args.seconds as f64 / props.len() as f64;
        println!();
        println!(
            "==> fuzz: {} ({} properties, {per_property:.1} s each)",
            target.name(),
            props.len()
        );
        let mut cmd = cargo_test(&[target]);
        fuzz_profile(&mut cmd);
        cmd.env("DATAPATH_FUZZ_SECONDS", format!("{per_property}"));
        if let Some(seed) = args.seed {
            cmd.env("DATAPATH_FUZZ_SEED", seed.to_string());
        }
        cmd.args(["--", "--test-threads=1", "--nocapture", "fuzz_"]);
        let started = Instant::now();
        let outcome = util::run(&mut cmd);
        if let Err(e) = &outcome {
            eprintln!("error: fuzz target {} failed: {e:#}", target.name());
        }
        results.push((
            target.name(),
            outcome.is_ok(),
            started.elapsed().as_secs_f64(),
        ));
    }
    println!();
    println!("==> fuzz summary");
    for (name, ok, secs) in &results {
        println!(
            "  {:<4} {name:<10} {secs:>7.1}s",
            if *ok { "ok" } else { "FAIL" }
        );
    }
    let failed = results.iter().filter(|r| !r.1).count();
    if failed > 0 {
        bail!("{failed} fuzz target(s) failed; see the shrunk inputs above");
    }
    Ok(())
}
