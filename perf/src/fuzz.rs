//! Kernel-level fuzzing of `xdp_lb`, `tc_ingress` and `tc_egress` through BPF_PROG_TEST_RUN
//! (`dp-fuzz`).
//!
//! A run builds the fixtures' kind of state in a private network namespace ([`setup`]: the real
//! dataplane with eight services over full-NAT and DSR, TCP and UDP, backends behind every
//! kind of next hop; the real policy plane with allow, deny and log rules on two endpoints),
//! then sends frames ([`corpus`]: a seed corpus built with etherparse, a deterministic sweep over
//! it, then mutated and random frames) one by one through the programs. For every frame it
//! reads the program's per-CPU reason counters before and after (one `BPF_MAP_LOOKUP_BATCH`
//! of the whole array per frame, this CPU's slots; the thread is pinned to its CPU) and runs
//! the checks of [`check`] on the verdict, the counters and the output frame.
//!
//! Findings are kept per (program, check, verdict reason) with the first frame that showed
//! them, which is minimized at the end (shortest cut, then as many bytes zeroed as still
//! reproduce the same finding). The run is bounded by a frame count and, optionally, by time.

pub mod check;
pub mod corpus;
pub mod frames;
pub mod mutate;
pub mod setup;
pub mod sys;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;

use check::{CheckEnv, CheckStats, Observed, Program, Violation};
use corpus::Gen;
use mutate::{Dictionary, Labels, MAX_FRAME, Rng};
use setup::{Ifaces, Setup};
use sys::PerCpuCounters;

/// What to run.
#[derive(Clone, Debug)]
pub struct FuzzOptions {
    /// Frames in all (split over the programs and the workers).
    pub frames: u64,
    pub seed: u64,
    /// Stop after this long even if frames are left.
    pub max_seconds: Option<f64>,
    pub programs: Vec<Program>,
    /// Worker threads, each pinned to its own CPU.
    pub jobs: usize,
    /// CPU of the first worker (default: the last online CPU).
    pub cpu: Option<usize>,
    /// Minimize the frame of each finding at the end.
    pub minimize: bool,
    /// Print progress to stderr every this many seconds (0: never).
    pub progress_seconds: f64,
    /// Checks whose findings are reported but accepted (they do not fail the run).
    pub allowed: Vec<String>,
}

/// Per-program figures.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramReport {
    pub program: Program,
    pub frames: u64,
    /// Time spent on this program's frames (generation, test run, counters, checks).
    pub seconds: f64,
    pub frames_per_second: f64,
    /// Frames the kernel refused to run (too short for the program type, say).
    pub kernel_rejected: u64,
    /// The kernel's answers to the refused frames.
    pub rejected_errors: BTreeMap<String, u64>,
    pub verdicts: BTreeMap<String, u64>,
    /// Every reason counter's total rise over the run.
    pub reasons: BTreeMap<String, u64>,
    pub checks: CheckStats,
}

/// One distinct finding (program, check, verdict reason).
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub program: Program,
    pub check: &'static str,
    /// The verdict reason(s) that moved, `none` when none did.
    pub reason: String,
    /// Frames that showed it.
    pub frames: u64,
    pub verdict: String,
    /// The interface the frame arrived on (XDP ingress, tc skb ifindex).
    pub interface: String,
    pub frame_hex: String,
    pub output_hex: String,
    /// How the frame was made.
    pub mutations: String,
    pub counters_moved: Vec<String>,
    pub detail: String,
    /// Whether running the frame again showed the finding again.
    pub reproduced: bool,
    /// The smallest frame found that still shows it (same program, interface, check, reason).
    pub minimized_hex: Option<String>,
    /// Accepted with `--allow`: reported, but does not fail the run.
    pub allowed: bool,
}

/// The result of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub frames_requested: u64,
    pub frames: u64,
    pub setup_seconds: f64,
    pub seconds: f64,
    pub frames_per_second: f64,
    pub stopped_by_time_limit: bool,
    pub cpus: Vec<usize>,
    pub seed_frames: usize,
    pub policy_flips: u64,
    /// Times the backends of TCP 80 changed during the run.
    pub service_flips: u64,
    pub programs: Vec<ProgramReport>,
    /// Distinct findings beyond the ones kept.
    pub findings_dropped: u64,
    pub findings: Vec<Finding>,
}

const MAX_FINDINGS: usize = 200;
const MAX_MINIMIZED: usize = 64;

/// What the workers share: descriptors (cloned, so the workers borrow nothing of the setup),
/// and what the checks and generators know of the topology.
struct Shared {
    xdp_prog: OwnedFd,
    tc_ingress_prog: OwnedFd,
    tc_egress_prog: OwnedFd,
    lb_reasons: OwnedFd,
    tc_reasons: OwnedFd,
    env: CheckEnv,
    dict: Dictionary,
    ifaces: Ifaces,
    possible_cpus: usize,
}

impl Shared {
    fn of(setup: &Setup) -> Result<Self> {
        Ok(Self {
            xdp_prog: setup.xdp_prog.try_clone()?,
            tc_ingress_prog: setup.tc_ingress_prog.try_clone()?,
            tc_egress_prog: setup.tc_egress_prog.try_clone()?,
            lb_reasons: setup.lb_reasons.try_clone()?,
            tc_reasons: setup.tc_reasons.try_clone()?,
            env: setup.env.clone(),
            dict: setup.dict.clone(),
            ifaces: setup.ifaces,
            possible_cpus: aya::util::nr_cpus().map_err(|(p, e)| anyhow::anyhow!("{p}: {e}"))?,
        })
    }

    fn prog(&self, p: Program) -> BorrowedFd<'_> {
        match p {
            Program::Xdp => self.xdp_prog.as_fd(),
            Program::TcIngress => self.tc_ingress_prog.as_fd(),
            Program::TcEgress => self.tc_egress_prog.as_fd(),
        }
    }

    fn reasons(&self, p: Program) -> BorrowedFd<'_> {
        if p.is_tc() {
            self.tc_reasons.as_fd()
        } else {
            self.lb_reasons.as_fd()
        }
    }

    fn interface_name(&self, ifindex: u32) -> String {
        let i = self.ifaces;
        let name = [
            (i.lo, "lo"),
            (i.front, "front"),
            (i.back, "back"),
            (i.side, "side"),
            (i.ep0, "ep0"),
            (i.ep1, "ep1"),
        ]
        .iter()
        .find(|(x, _)| *x == ifindex)
        .map_or("?", |(_, n)| n);
        format!("{name} (ifindex {ifindex})")
    }
}

/// The test-run context of a frame: `struct xdp_md` or `struct __sk_buff`.
fn context(program: Program, len: usize, ifindex: u32, buf: &mut [u8; 192]) -> usize {
    buf.fill(0);
    if program.is_tc() {
        // __sk_buff: the kernel lets a test set `ifindex` (offset 40).
        buf[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        192
    } else {
        // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        buf[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
        buf[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        24
    }
}

/// Runs frames through the programs of one CPU and checks each.
struct Runner<'a> {
    shared: &'a Shared,
    cpu: usize,
    lb_counters: PerCpuCounters,
    tc_counters: PerCpuCounters,
    lb_before: Vec<u64>,
    tc_before: Vec<u64>,
    after: Vec<u64>,
    deltas: Vec<i64>,
    out: Vec<u8>,
    ctx: [u8; 192],
    violations: Vec<Violation>,
}

/// One frame's outcome.
enum Outcome {
    Ran { retval: u32, out_len: usize },
    Rejected(std::io::Error),
}

impl<'a> Runner<'a> {
    fn new(shared: &'a Shared, cpu: usize) -> Result<Self> {
        let lb_n = bpf_common::reason::COUNT;
        let tc_n = bpf_common::policy::reason::COUNT;
        let mut r = Self {
            shared,
            cpu,
            lb_counters: PerCpuCounters::new(lb_n, shared.possible_cpus),
            tc_counters: PerCpuCounters::new(tc_n, shared.possible_cpus),
            lb_before: vec![0; lb_n as usize],
            tc_before: vec![0; tc_n as usize],
            after: vec![0; lb_n.max(tc_n) as usize],
            deltas: vec![0; lb_n.max(tc_n) as usize],
            out: vec![0; MAX_FRAME + 512],
            ctx: [0; 192],
            violations: Vec::new(),
        };
        r.lb_counters
            .read(shared.lb_reasons.as_fd(), cpu, &mut r.lb_before)?;
        r.tc_counters
            .read(shared.tc_reasons.as_fd(), cpu, &mut r.tc_before)?;
        Ok(r)
    }

    /// Runs `frame` once; afterwards `deltas` holds how every reason counter moved.
    fn run(&mut self, program: Program, frame: &[u8], ifindex: u32) -> Result<Outcome> {
        let ctx_len = context(program, frame.len(), ifindex, &mut self.ctx);
        let result = sys::test_run(
            self.shared.prog(program),
            frame,
            &self.ctx[..ctx_len],
            &mut self.out,
        );
        let (counters, before) = if program.is_tc() {
            (&mut self.tc_counters, &mut self.tc_before)
        } else {
            (&mut self.lb_counters, &mut self.lb_before)
        };
        let n = before.len();
        counters.read(self.shared.reasons(program), self.cpu, &mut self.after[..n])?;
        for ((delta, after), before) in self
            .deltas
            .iter_mut()
            .zip(&self.after[..n])
            .zip(before.iter())
        {
            *delta = after.wrapping_sub(*before) as i64;
        }
        before.copy_from_slice(&self.after[..n]);
        Ok(match result {
            Ok(r) => Outcome::Ran {
                retval: r.retval,
                out_len: r.out_len,
            },
            Err(e) => Outcome::Rejected(e),
        })
    }

    fn deltas(&self, program: Program) -> &[i64] {
        &self.deltas[..program.reason_names().len()]
    }

    /// Runs and checks `frame`; the violations are in `self.violations`. `Err(errno)` when
    /// the kernel refused the frame.
    fn run_and_check(
        &mut self,
        program: Program,
        frame: &[u8],
        ifindex: u32,
        stats: &mut CheckStats,
    ) -> Result<std::result::Result<(u32, usize), i32>> {
        self.violations.clear();
        let outcome = self.run(program, frame, ifindex)?;
        match outcome {
            Outcome::Ran { retval, out_len } => {
                let obs = Observed {
                    program,
                    input: frame,
                    output: &self.out[..out_len],
                    retval,
                    deltas: &self.deltas[..program.reason_names().len()],
                };
                check::check(&obs, &self.shared.env, &mut self.violations, stats);
                Ok(Ok((retval, out_len)))
            }
            Outcome::Rejected(e) => {
                if self.deltas(program).iter().any(|d| *d != 0) {
                    let names = program.reason_names();
                    let moved: Vec<String> = self
                        .deltas(program)
                        .iter()
                        .enumerate()
                        .filter(|(_, d)| **d != 0)
                        .map(|(i, d)| format!("{} {d:+}", names[i]))
                        .collect();
                    self.violations.push(Violation {
                        check: "rejected-frame-counts-nothing",
                        detail: format!(
                            "the kernel refused the frame ({e}) but counters moved: {}",
                            moved.join(", ")
                        ),
                    });
                }
                Ok(Err(e.raw_os_error().unwrap_or(0)))
            }
        }
    }

    fn reason_label(&self, program: Program) -> String {
        let names = program.reason_names();
        let moved: Vec<&str> = self
            .deltas(program)
            .iter()
            .enumerate()
            .filter(|(i, d)| **d != 0 && program.is_verdict(*i))
            .map(|(i, _)| names[i])
            .collect();
        if moved.is_empty() {
            "none".into()
        } else {
            moved.join("+")
        }
    }
}

/// Per-program tallies of one worker.
#[derive(Clone, Debug, Default)]
struct Tally {
    frames: u64,
    seconds: f64,
    rejected: u64,
    rejected_errors: BTreeMap<i32, u64>,
    verdicts: BTreeMap<u32, u64>,
    reasons: Vec<u64>,
    checks: CheckStats,
}

impl Tally {
    fn merge(&mut self, other: &Tally) {
        self.frames += other.frames;
        self.seconds += other.seconds;
        self.rejected += other.rejected;
        for (k, v) in &other.rejected_errors {
            *self.rejected_errors.entry(*k).or_default() += v;
        }
        for (k, v) in &other.verdicts {
            *self.verdicts.entry(*k).or_default() += v;
        }
        if self.reasons.len() < other.reasons.len() {
            self.reasons.resize(other.reasons.len(), 0);
        }
        for (i, v) in other.reasons.iter().enumerate() {
            self.reasons[i] += v;
        }
        self.checks.forwarded += other.checks.forwarded;
        self.checks.rewritten_and_passed += other.checks.rewritten_and_passed;
        self.checks.forwarded_with_bad_ipv4_checksum +=
            other.checks.forwarded_with_bad_ipv4_checksum;
        self.checks.forwarded_with_bad_l4_checksum += other.checks.forwarded_with_bad_l4_checksum;
    }
}

type FindingKey = (Program, &'static str, String);

/// What one worker produced.
#[derive(Default)]
struct WorkerResult {
    tallies: BTreeMap<Program, Tally>,
    findings: BTreeMap<FindingKey, (Finding, u32)>,
    findings_dropped: u64,
    frames: u64,
    stopped_by_time: bool,
    policy_flips: u64,
    service_flips: u64,
}

struct WorkerSpec {
    index: usize,
    cpu: usize,
    frames: u64,
    seed: u64,
    programs: Vec<Program>,
    budget: [u64; 3],
    deadline: Option<Instant>,
    progress: Option<Duration>,
}

fn worker(
    shared: &Shared,
    spec: &WorkerSpec,
    mut control: Option<&mut Setup>,
) -> Result<WorkerResult> {
    sys::pin_to_cpu(spec.cpu)?;
    let on = sys::current_cpu()?;
    ensure!(
        on == spec.cpu,
        "pinned to CPU {} but running on {on}",
        spec.cpu
    );
    let mut runner = Runner::new(shared, spec.cpu)?;
    let mut source = Gen::new(
        shared.ifaces,
        shared.dict.clone(),
        spec.index == 0,
        spec.budget,
    );
    let mut rng = Rng::new(spec.seed);
    let mut frame = Vec::with_capacity(MAX_FRAME);
    let mut labels = Labels::default();
    let mut result = WorkerResult::default();
    for p in &spec.programs {
        result.tallies.insert(
            *p,
            Tally {
                reasons: vec![0; p.reason_names().len()],
                ..Tally::default()
            },
        );
    }
    let tc_frames = spec.budget[1] + spec.budget[2];
    let flip_every = (tc_frames / 6).max(2_000);
    let mut tc_seen = 0u64;
    let mut xdp_seen = 0u64;
    let mut policy = 0usize;
    let mut service = 0usize;
    let xdp_flip_every = (spec.budget[0] / 6).max(2_000);
    let started = Instant::now();
    let mut last = started;
    let mut last_progress = started;
    for i in 0..spec.frames {
        if i % 1024 == 0
            && let Some(deadline) = spec.deadline
            && Instant::now() >= deadline
        {
            result.stopped_by_time = true;
            break;
        }
        let program = spec.programs[(i % spec.programs.len() as u64) as usize];
        if program.is_tc() {
            tc_seen += 1;
            if let Some(setup) = control.as_deref_mut() {
                if tc_seen.is_multiple_of(flip_every) {
                    policy += 1;
                    setup.apply_policy(policy)?;
                    result.policy_flips += 1;
                }
                if tc_seen.is_multiple_of(32_768) {
                    setup.drain_events(100_000);
                }
            }
        } else {
            xdp_seen += 1;
            if let Some(setup) = control.as_deref_mut()
                && xdp_seen.is_multiple_of(xdp_flip_every)
            {
                service += 1;
                setup.flip_service(service)?;
                result.service_flips += 1;
            }
        }
        let ifindex = source.next(program, &mut rng, &mut frame, &mut labels);
        let tally = result.tallies.get_mut(&program).expect("tally");
        let ran = runner.run_and_check(program, &frame, ifindex, &mut tally.checks)?;
        tally.frames += 1;
        for (i, d) in runner.deltas(program).iter().enumerate() {
            tally.reasons[i] = tally.reasons[i].wrapping_add(*d as u64);
        }
        match ran {
            Ok((retval, out_len)) => {
                *tally.verdicts.entry(retval).or_default() += 1;
                source.observe(
                    program,
                    &frame,
                    ifindex,
                    &runner.out[..out_len],
                    retval,
                    runner.deltas(program),
                );
                if !runner.violations.is_empty() {
                    record(
                        &mut result,
                        shared,
                        &runner,
                        program,
                        &frame,
                        ifindex,
                        Ok((retval, out_len)),
                        &labels,
                    );
                }
            }
            Err(errno) => {
                tally.rejected += 1;
                *tally.rejected_errors.entry(errno).or_default() += 1;
                if !runner.violations.is_empty() {
                    record(
                        &mut result,
                        shared,
                        &runner,
                        program,
                        &frame,
                        ifindex,
                        Err(errno),
                        &labels,
                    );
                }
            }
        }
        let now = Instant::now();
        result.tallies.get_mut(&program).expect("tally").seconds += (now - last).as_secs_f64();
        last = now;
        result.frames += 1;
        if let Some(every) = spec.progress
            && now - last_progress >= every
        {
            last_progress = now;
            let secs = (now - started).as_secs_f64();
            eprintln!(
                "dp-fuzz: worker {} on CPU {}: {} of {} frames, {:.0} frames/s, {} distinct findings",
                spec.index,
                spec.cpu,
                result.frames,
                spec.frames,
                result.frames as f64 / secs,
                result.findings.len()
            );
        }
    }
    Ok(result)
}

#[expect(clippy::too_many_arguments, reason = "one finding's whole context")]
fn record(
    result: &mut WorkerResult,
    shared: &Shared,
    runner: &Runner<'_>,
    program: Program,
    frame: &[u8],
    ifindex: u32,
    ran: std::result::Result<(u32, usize), i32>,
    labels: &Labels,
) {
    let reason = runner.reason_label(program);
    for v in &runner.violations {
        let key = (program, v.check, reason.clone());
        if let Some((f, _)) = result.findings.get_mut(&key) {
            f.frames += 1;
            continue;
        }
        if result.findings.len() >= MAX_FINDINGS {
            result.findings_dropped += 1;
            continue;
        }
        let names = program.reason_names();
        let moved = runner
            .deltas(program)
            .iter()
            .enumerate()
            .filter(|(_, d)| **d != 0)
            .map(|(i, d)| format!("{} {d:+}", names[i]))
            .collect();
        let finding = Finding {
            program,
            check: v.check,
            reason: reason.clone(),
            frames: 1,
            verdict: match ran {
                Ok((r, _)) => program.verdict_name(r),
                Err(errno) => format!(
                    "rejected by the kernel ({})",
                    std::io::Error::from_raw_os_error(errno)
                ),
            },
            interface: shared.interface_name(ifindex),
            frame_hex: frames::hex(frame),
            output_hex: ran.map_or_else(|_| String::new(), |(_, n)| frames::hex(&runner.out[..n])),
            mutations: labels.join(),
            counters_moved: moved,
            detail: v.detail.clone(),
            reproduced: false,
            minimized_hex: None,
            allowed: false,
        };
        result.findings.insert(key, (finding, ifindex));
    }
}

/// Whether running `frame` shows a finding with this check and reason again.
fn shows(
    runner: &mut Runner<'_>,
    program: Program,
    frame: &[u8],
    ifindex: u32,
    check: &str,
    reason: &str,
) -> Result<bool> {
    let mut stats = CheckStats::default();
    let _ran = runner.run_and_check(program, frame, ifindex, &mut stats)?;
    Ok(
        runner.reason_label(program) == reason
            && runner.violations.iter().any(|v| v.check == check),
    )
}

/// The shortest cut (raw, or with lengths and checksums fixed up) that still shows the
/// finding, then as many of its bytes zeroed as keep it. At most 4,000 runs.
fn minimize(
    runner: &mut Runner<'_>,
    program: Program,
    frame: &[u8],
    ifindex: u32,
    check: &str,
    reason: &str,
) -> Result<Vec<u8>> {
    let mut budget = 4_000usize;
    let mut best = frame.to_vec();
    'cut: for len in 14..frame.len() {
        for fix in [false, true] {
            if budget == 0 {
                break 'cut;
            }
            budget -= 1;
            let mut candidate = frame[..len].to_vec();
            if fix {
                frames::fix_all(&mut candidate);
            }
            if shows(runner, program, &candidate, ifindex, check, reason)? {
                best = candidate;
                break 'cut;
            }
        }
    }
    // Zero runs of bytes, long runs first (a 1,400-byte payload goes in a few tries).
    for block in [256usize, 64, 16, 4, 1] {
        let mut start = 12;
        while start < best.len() {
            let end = (start + block).min(best.len());
            if budget == 0 {
                return Ok(best);
            }
            if best[start..end].iter().any(|b| *b != 0) {
                budget -= 1;
                let mut candidate = best.clone();
                candidate[start..end].fill(0);
                if shows(runner, program, &candidate, ifindex, check, reason)? {
                    best = candidate;
                }
            }
            start = end;
        }
    }
    Ok(best)
}

/// Builds the state, runs the frames, minimizes the findings, and tears everything down.
pub fn run(options: &FuzzOptions) -> Result<Report> {
    ensure!(!options.programs.is_empty(), "no program to fuzz");
    ensure!(options.jobs >= 1, "at least one worker");
    let online = crate::bpf::online_cpus()?;
    ensure!(
        options.jobs <= online.len(),
        "{} workers but only {} online CPUs",
        options.jobs,
        online.len()
    );
    let first = options
        .cpu
        .unwrap_or(*online.last().expect("an online CPU") as usize);
    ensure!(
        online.contains(&(first as u32)),
        "CPU {first} is not online"
    );
    // The first worker's CPU, then the others in order.
    let mut cpus = vec![first];
    cpus.extend(
        online
            .iter()
            .map(|c| *c as usize)
            .filter(|c| *c != first)
            .take(options.jobs - 1),
    );

    let setup_started = Instant::now();
    // The main thread enters the namespace; the workers it spawns start in it too.
    let mut setup = Setup::build().context("build the fuzzing state")?;
    let shared = Shared::of(&setup)?;
    let setup_seconds = setup_started.elapsed().as_secs_f64();

    let per_worker = options.frames / options.jobs as u64;
    let deadline = options
        .max_seconds
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let progress =
        (options.progress_seconds > 0.0).then(|| Duration::from_secs_f64(options.progress_seconds));
    let specs: Vec<WorkerSpec> = cpus
        .iter()
        .enumerate()
        .map(|(i, cpu)| {
            let frames = if i == 0 {
                options.frames - per_worker * (options.jobs as u64 - 1)
            } else {
                per_worker
            };
            let mut budget = [0u64; 3];
            for p in &options.programs {
                let idx = Program::ALL.iter().position(|x| x == p).expect("program");
                budget[idx] = frames / options.programs.len() as u64;
            }
            WorkerSpec {
                index: i,
                cpu: *cpu,
                frames,
                seed: options.seed.wrapping_add(i as u64 * 0x1_0000_0001),
                programs: options.programs.clone(),
                budget,
                deadline,
                progress,
            }
        })
        .collect();
    let seed_frames =
        corpus::xdp_seeds(&shared.ifaces).len() + corpus::tc_seeds(&shared.ifaces).len();

    let started = Instant::now();
    let results: Vec<Result<WorkerResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = specs[1..]
            .iter()
            .map(|spec| {
                let shared = &shared;
                scope.spawn(move || worker(shared, spec, None))
            })
            .collect();
        let mut results = vec![worker(&shared, &specs[0], Some(&mut setup))];
        for h in handles {
            results.push(match h.join() {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("a worker panicked")),
            });
        }
        results
    });
    let seconds = started.elapsed().as_secs_f64();

    let mut merged = WorkerResult::default();
    for r in results {
        let r = r?;
        merged.frames += r.frames;
        merged.stopped_by_time |= r.stopped_by_time;
        merged.policy_flips += r.policy_flips;
        merged.service_flips += r.service_flips;
        merged.findings_dropped += r.findings_dropped;
        for (p, t) in &r.tallies {
            merged.tallies.entry(*p).or_default().merge(t);
        }
        for (k, (f, ifindex)) in r.findings {
            match merged.findings.get_mut(&k) {
                Some((existing, _)) => existing.frames += f.frames,
                None => {
                    merged.findings.insert(k, (f, ifindex));
                }
            }
        }
    }

    // Replay and minimize on the first worker's CPU (this thread is still pinned there).
    let mut runner = Runner::new(&shared, cpus[0])?;
    let mut findings = Vec::new();
    for (n, ((program, check, reason), (mut finding, ifindex))) in
        merged.findings.into_iter().enumerate()
    {
        let frame = frames::unhex(&finding.frame_hex).context("finding frame")?;
        finding.allowed = options.allowed.iter().any(|a| a == check);
        finding.reproduced = shows(&mut runner, program, &frame, ifindex, check, &reason)?;
        if options.minimize && finding.reproduced && n < MAX_MINIMIZED {
            let small = minimize(&mut runner, program, &frame, ifindex, check, &reason)?;
            finding.minimized_hex = Some(frames::hex(&small));
        }
        findings.push(finding);
    }
    findings.sort_by_key(|f| std::cmp::Reverse(f.frames));

    let programs = options
        .programs
        .iter()
        .map(|p| {
            let t = merged.tallies.get(p).cloned().unwrap_or_default();
            let names = p.reason_names();
            ProgramReport {
                program: *p,
                frames: t.frames,
                seconds: t.seconds,
                frames_per_second: if t.seconds > 0.0 {
                    t.frames as f64 / t.seconds
                } else {
                    0.0
                },
                kernel_rejected: t.rejected,
                rejected_errors: t
                    .rejected_errors
                    .iter()
                    .map(|(e, n)| (std::io::Error::from_raw_os_error(*e).to_string(), *n))
                    .collect(),
                verdicts: t
                    .verdicts
                    .iter()
                    .map(|(r, n)| (p.verdict_name(*r), *n))
                    .collect(),
                reasons: t
                    .reasons
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n != 0)
                    .map(|(i, n)| (names[i].to_string(), *n))
                    .collect(),
                checks: t.checks,
            }
        })
        .collect();
    drop(setup);
    Ok(Report {
        seed: options.seed,
        frames_requested: options.frames,
        frames: merged.frames,
        setup_seconds,
        seconds,
        frames_per_second: if seconds > 0.0 {
            merged.frames as f64 / seconds
        } else {
            0.0
        },
        stopped_by_time_limit: merged.stopped_by_time,
        cpus,
        seed_frames,
        policy_flips: merged.policy_flips,
        service_flips: merged.service_flips,
        programs,
        findings_dropped: merged.findings_dropped,
        findings,
    })
}

/// Runs frames through `program` in a fresh state, one after the other, and describes what
/// happened to each and which checks failed. `frames` is a comma-separated list of hex frames,
/// each optionally prefixed with the interface it arrives on (`back:0200...`; default
/// `iface`), so that a frame that needs a flow can follow the frame that opens it.
pub fn replay(program: Program, iface: &str, frames_arg: &str) -> Result<String> {
    let setup = Setup::build()?;
    let shared = Shared::of(&setup)?;
    let i = shared.ifaces;
    let index_of = |name: &str| -> Result<u32> {
        Ok(match name {
            "lo" => i.lo,
            "front" => i.front,
            "back" => i.back,
            "side" => i.side,
            "ep0" => i.ep0,
            "ep1" => i.ep1,
            other => bail!("no interface {other} (lo, front, back, side, ep0, ep1)"),
        })
    };
    let cpu = sys::current_cpu()?;
    sys::pin_to_cpu(cpu)?;
    let mut runner = Runner::new(&shared, cpu)?;
    let mut text = String::new();
    for (n, item) in frames_arg.split(',').enumerate() {
        let (name, hex) = match item.split_once(':') {
            Some((name, hex)) => (name.trim(), hex),
            None => (iface, item),
        };
        let ifindex = index_of(name)?;
        let frame = frames::unhex(hex).with_context(|| format!("frame {} is not hex", n + 1))?;
        let mut stats = CheckStats::default();
        let ran = runner.run_and_check(program, &frame, ifindex, &mut stats)?;
        match ran {
            Ok((retval, out_len)) => {
                text += &format!(
                    "frame {}: {} on {}: {}\ncounters moved: {}\noutput: {}\n",
                    n + 1,
                    program.name(),
                    name,
                    program.verdict_name(retval),
                    runner_moved(&runner, program).join(", "),
                    frames::hex(&runner.out[..out_len])
                );
            }
            Err(errno) => {
                text += &format!(
                    "frame {}: the kernel refused it: {}\n",
                    n + 1,
                    std::io::Error::from_raw_os_error(errno)
                )
            }
        }
        if runner.violations.is_empty() {
            text += "all checks passed\n";
        }
        for v in &runner.violations {
            text += &format!("FAILED {}: {}\n", v.check, v.detail);
        }
    }
    drop(setup);
    Ok(text)
}

fn runner_moved(runner: &Runner<'_>, program: Program) -> Vec<String> {
    let names = program.reason_names();
    runner
        .deltas(program)
        .iter()
        .enumerate()
        .filter(|(_, d)| **d != 0)
        .map(|(i, d)| format!("{} {d:+}", names[i]))
        .collect()
}

impl Report {
    /// Findings not accepted with `--allow`: what fails the run.
    pub fn failing(&self) -> usize {
        self.findings.iter().filter(|f| !f.allowed).count()
    }

    /// The human-readable summary.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "dp-fuzz: seed {}, {} of {} frames in {:.1} s ({:.0} frames/s) on CPU {:?}, setup {:.1} s{}",
            self.seed,
            self.frames,
            self.frames_requested,
            self.seconds,
            self.frames_per_second,
            self.cpus,
            self.setup_seconds,
            if self.stopped_by_time_limit {
                " - stopped by the time limit"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "{} seed frames, {} policy flips, {} backend set changes",
            self.seed_frames, self.policy_flips, self.service_flips
        );
        let _ = writeln!(
            s,
            "\n{:<11} {:>10} {:>10} {:>9}  verdicts",
            "program", "frames", "frames/s", "rejected"
        );
        for p in &self.programs {
            let verdicts: Vec<String> =
                p.verdicts.iter().map(|(v, n)| format!("{v} {n}")).collect();
            let _ = writeln!(
                s,
                "{:<11} {:>10} {:>10.0} {:>9}  {}",
                p.program.name(),
                p.frames,
                p.frames_per_second,
                p.kernel_rejected,
                verdicts.join(", ")
            );
        }
        for p in &self.programs {
            let reasons: Vec<String> = p.reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
            let _ = writeln!(s, "\n{} reasons: {}", p.program.name(), reasons.join(", "));
            if !p.rejected_errors.is_empty() {
                let errors: Vec<String> = p
                    .rejected_errors
                    .iter()
                    .map(|(e, n)| format!("{e}: {n}"))
                    .collect();
                let _ = writeln!(s, "refused by the kernel: {}", errors.join(", "));
            }
            if p.program == Program::Xdp {
                let c = p.checks;
                let _ = writeln!(
                    s,
                    "{} forwarded ({} of them already with a bad IPv4 header checksum, {} with a \
                     bad TCP/UDP/ICMP checksum, both kept as they were), {} rewritten and passed",
                    c.forwarded,
                    c.forwarded_with_bad_ipv4_checksum,
                    c.forwarded_with_bad_l4_checksum,
                    c.rewritten_and_passed
                );
            }
        }
        if self.findings.is_empty() {
            let _ = writeln!(s, "\nno findings");
            return s;
        }
        let total: u64 = self.findings.iter().map(|f| f.frames).sum();
        let _ = writeln!(
            s,
            "\n{} distinct findings ({} frames){}:",
            self.findings.len(),
            total,
            if self.findings_dropped > 0 {
                format!(", {} more not kept", self.findings_dropped)
            } else {
                String::new()
            }
        );
        for (i, f) in self.findings.iter().enumerate() {
            let _ = writeln!(
                s,
                "\n[{}] {} {} (reason {}, verdict {}): {} frames{}{}",
                i + 1,
                f.program.name(),
                f.check,
                f.reason,
                f.verdict,
                f.frames,
                if f.reproduced {
                    ""
                } else {
                    " (did not reproduce on replay)"
                },
                if f.allowed { " [allowed]" } else { "" }
            );
            let _ = writeln!(s, "    {}", f.detail);
            let _ = writeln!(s, "    counters moved: {}", f.counters_moved.join(", "));
            let _ = writeln!(
                s,
                "    interface: {}, made by: {}",
                f.interface, f.mutations
            );
            let _ = writeln!(s, "    frame:     {}", f.frame_hex);
            if let Some(m) = &f.minimized_hex {
                let _ = writeln!(s, "    minimized: {m}");
            }
        }
        s
    }
}
