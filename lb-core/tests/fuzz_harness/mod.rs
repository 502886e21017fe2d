//! Time-boxed property runs on proptest, shared by the `fuzz_*` test targets of `lb-core`,
//! `conntrack` and `datapath` (they include this file with `#[path]`). See `docs/fuzzing.md`.
//!
//! A property runs batches of generated cases until its budget is spent:
//!
//! - plain `cargo test` (the smoke that `cargo xtask test` runs): at most [`SMOKE_CASES`] cases
//!   (`PROPTEST_CASES` overrides) and at most [`SMOKE_SECONDS`], from a seed fixed per property,
//!   so the smoke is short and repeatable;
//! - `DATAPATH_FUZZ_SECONDS=N` (what `cargo xtask fuzz` sets): N seconds, no case limit unless
//!   `PROPTEST_CASES` is set, from a fresh random seed.
//!
//! `DATAPATH_FUZZ_SEED=S` replays a run: the same seed gives the same cases in the same order.
//! A failure (a `prop_assert!` or a panic) is shrunk by proptest and reported with the minimal
//! input and the seed; such an input then becomes a unit test in the target's file.

use std::{
    fmt::Debug,
    time::{Duration, Instant},
};

use proptest::{
    strategy::Strategy,
    test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner},
};

/// Time cap of one property in the smoke.
pub const SMOKE_SECONDS: f64 = 1.0;
/// Case cap of one property in the smoke.
pub const SMOKE_CASES: u64 = 2_000;
/// Cases per batch: the budget is checked between batches.
const BATCH: u64 = 32;

/// How long, how many cases and from which seed one property runs.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub time: Duration,
    pub cases: Option<u64>,
    pub seed: u64,
    /// `DATAPATH_FUZZ_SECONDS` was set.
    pub long: bool,
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={value:?} is not a valid value"),
    }
}

/// FNV-1a of the property's name: the smoke's fixed seed.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

impl Budget {
    /// The budget of property `name` from the environment.
    pub fn from_env(name: &str) -> Budget {
        let seconds: Option<f64> = env_parse("DATAPATH_FUZZ_SECONDS");
        let cases: Option<u64> = env_parse("PROPTEST_CASES");
        let seed: Option<u64> = env_parse("DATAPATH_FUZZ_SEED");
        match seconds {
            Some(s) => Budget {
                time: Duration::from_secs_f64(s.max(0.0)),
                cases,
                seed: seed.unwrap_or_else(random_seed),
                long: true,
            },
            None => Budget {
                time: Duration::from_secs_f64(SMOKE_SECONDS),
                cases: Some(cases.unwrap_or(SMOKE_CASES)),
                seed: seed.unwrap_or_else(|| name_seed(name)),
                long: false,
            },
        }
    }
}

/// Runs property `test` over values of `strategy` within the budget of `name` (see the module
/// documentation), at least one batch. Panics with the shrunk input when the property fails.
/// Returns the number of cases run.
pub fn check<S>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64
where
    S: Strategy,
    S::Value: Debug,
{
    let budget = Budget::from_env(name);
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&budget.seed.to_le_bytes());
    let config = Config {
        cases: BATCH as u32,
        failure_persistence: None,
        // Shrinking a failure may take a while; it is bounded too.
        max_shrink_time: 120_000,
        max_shrink_iters: 100_000,
        ..Config::default()
    };
    let mut master = TestRunner::new_with_rng(
        config.clone(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    );
    // Printed first: if the process dies (abort, stack overflow), the seed replays it.
    eprintln!(
        "fuzz {name}: seed {} ({}; replay with DATAPATH_FUZZ_SEED={})",
        budget.seed,
        if budget.long { "long run" } else { "smoke" },
        budget.seed
    );
    let started = Instant::now();
    let mut cases = 0u64;
    loop {
        let batch = budget.cases.map_or(BATCH, |c| BATCH.min(c - cases));
        let mut runner = TestRunner::new_with_rng(
            Config {
                cases: batch as u32,
                ..config.clone()
            },
            master.new_rng(),
        );
        match runner.run(&strategy, &test) {
            Ok(()) => {}
            Err(TestError::Fail(reason, value)) => panic!(
                "fuzz {name}: property failed after {cases}+ cases: {reason}\n\
                 minimal failing input: {value:#?}\n\
                 replay with DATAPATH_FUZZ_SEED={}",
                budget.seed
            ),
            Err(TestError::Abort(reason)) => panic!("fuzz {name}: aborted: {reason}"),
        }
        cases += batch;
        if started.elapsed() >= budget.time || budget.cases.is_some_and(|c| cases >= c) {
            break;
        }
    }
    eprintln!(
        "fuzz {name}: {cases} cases in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    cases
}
