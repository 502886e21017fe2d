//! Forwarding rate: packets per second delivered to the backends, through
//!
//! - `xdp-lb-fullnat`: the real `datapathd` in the LB namespace (full-NAT service over 4
//!   backends, configured with the real `lb-ctl`);
//! - `nft-dnat`: the LB node's kernel with nftables DNAT the way kube-proxy's nftables mode
//!   programs it (`numgen random mod 4 vmap` over per-endpoint chains), behind a trivial
//!   `xdp_pass` on the ingress so that the comparison is fair (the generated frames need an XDP
//!   program on the receiving veth either way);
//! - `xdp-drop`: `xdp_drop_count` on the LB's ingress: the floor of this machine (frames
//!   absorbed, not forwarded; its "delivered" rate is what the drop program counted).
//!
//! The topology is [`crate::topo::ForwardTopo`]; the generator is [`crate::pktgen`] (UDP) and
//! the backends are a counting XDP sink. Each run is bounded in time; every run is checked
//! (something delivered, every backend reached) and fails with a clear error otherwise.
//! Everything (namespaces, the daemon, its pins) is torn down on return, also on error.

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{HashMap, Map, MapData};
use bpf_common::{FlowEntry, ct::CtKey, map_names};
use netns_tests::{Binaries, Daemon, topology::exec_in};
use serde::Serialize;

use crate::{
    bpf::{PerfObject, Totals, programs},
    pktgen::{self, GenOptions, Protocol},
    report::Summary,
    topo::{self, ForwardTopo},
};

/// Scenario names, as they appear in [`ForwardRow::scenario`].
pub const XDP_LB_FULLNAT: &str = "xdp-lb-fullnat";
/// (a) again, with `prog_stats.enabled: true` (off by default): the kernel's BPF run-time
/// statistics are on while it runs, which costs every BPF program on the node two clock reads
/// per run.
pub const XDP_LB_FULLNAT_STATS: &str = "xdp-lb-fullnat+bpf-stats";
pub const NFT_DNAT: &str = "nft-dnat";
pub const XDP_DROP: &str = "xdp-drop";
/// (d) MAC rewrite and devmap redirect of every frame to the backend side: the least any XDP
/// forwarder pays on this path, the load balancer's own ceiling.
pub const XDP_REDIRECT_FLOOR: &str = "xdp-redirect";

/// How long the daemon's footprint is measured when idle.
const IDLE_WINDOW: Duration = Duration::from_secs(1);
/// Longest a forwarding run may last.
const MAX_RUN: Duration = Duration::from_secs(30);
/// Most runs per row.
const MAX_RUNS: usize = 50;

/// What to measure.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardOptions {
    /// Distinct flows of each row (each scenario runs every flow count).
    pub flow_counts: Vec<u32>,
    /// Runs per row; rows report medians.
    pub runs: usize,
    /// Generation time of each run.
    pub duration: Duration,
    /// Generator threads (each pinned to a CPU).
    pub threads: usize,
    /// Ethernet frame size with FCS (64 = minimum).
    pub frame_size: usize,
    pub datapathd: PathBuf,
    pub lb_ctl: PathBuf,
}

impl ForwardOptions {
    /// 1,000 and 100,000 flows, 5 runs of 2 s, 1 thread, 64-byte frames.
    pub fn new(datapathd: PathBuf, lb_ctl: PathBuf) -> Self {
        Self {
            flow_counts: vec![1_000, 100_000],
            runs: 5,
            duration: Duration::from_secs(2),
            threads: 1,
            frame_size: pktgen::MIN_FRAME_SIZE,
            datapathd,
            lb_ctl,
        }
    }

    /// A quick check that everything works: 1 run of 0.5 s, 1,000 flows only.
    pub fn smoke(datapathd: PathBuf, lb_ctl: PathBuf) -> Self {
        Self {
            flow_counts: vec![1_000],
            runs: 1,
            duration: Duration::from_millis(500),
            ..Self::new(datapathd, lb_ctl)
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(!self.flow_counts.is_empty(), "no flow count to measure");
        ensure!(
            (1..=MAX_RUNS).contains(&self.runs),
            "runs {} outside 1..={MAX_RUNS}",
            self.runs
        );
        ensure!(
            !self.duration.is_zero() && self.duration <= MAX_RUN,
            "run duration {:?} outside (0, {MAX_RUN:?}]",
            self.duration
        );
        for binary in [&self.datapathd, &self.lb_ctl] {
            ensure!(
                binary.is_file(),
                "{} not found (build it: `cargo build -p datapath -p lb-ctl`)",
                binary.display()
            );
        }
        Ok(())
    }
}

/// One scenario at one flow count.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardRow {
    /// `xdp-lb-fullnat` | `nft-dnat` | `xdp-drop`.
    pub scenario: &'static str,
    pub flows: u32,
    /// Frames the generator transmitted per second.
    pub offered_pps: Summary,
    /// Frames per second that reached the backends (for `xdp-drop`: that the drop program
    /// counted at the LB's ingress).
    pub delivered_pps: Summary,
}

/// `datapathd`'s resources: idle (service configured, no traffic, over 1 s) and loaded (CPU
/// over all the runs of the `xdp-lb-fullnat` row with the largest flow count, which span
/// several of the daemon's flow-table GC sweeps; RSS and flow count right after them). The
/// packets themselves are handled by the XDP program in softirq context, not by the daemon.
#[derive(Clone, Debug, Serialize)]
pub struct Footprint {
    pub idle_rss_kib: u64,
    pub idle_cpu_percent: f64,
    pub loaded_rss_kib: u64,
    pub loaded_cpu_percent: f64,
    /// Entries in the daemon's pinned `LB_FLOWS` map after that run.
    pub tracked_flows: u64,
}

/// The SYN-flood scenario, with the daemon's SYN-flood mode on (its default rate) or off: the
/// established UDP flows of the `xdp-lb-fullnat` row, 1,000 of them, from one generator CPU,
/// first alone and then while a second generator CPU sends TCP SYNs of distinct new flows to a
/// DSR service at the highest rate it can (a new 5-tuple every frame).
#[derive(Clone, Debug, Serialize)]
pub struct SynFloodRow {
    /// `on (lb.syn_flood_rate 125000)` or `off (lb.syn_flood_rate 0)`.
    pub mode: String,
    /// The established flows' rate with no flood.
    pub alone_pps: Summary,
    /// Offered and delivered by the established flows during the flood.
    pub offered_pps: Summary,
    pub delivered_pps: Summary,
    /// Delivered / offered of the established flows during the flood.
    pub delivered_ratio: Summary,
    /// The established flows whose flow entry outlived the flood (created before it and still
    /// in `LB_FLOWS` after it), as a fraction of them.
    pub entries_kept: Summary,
    /// SYNs per second the flood generator sent.
    pub syn_pps: Summary,
    /// SYNs forwarded without a flow entry (`new_flow_untracked`), over all runs.
    pub untracked: u64,
}

/// Everything [`run`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardReport {
    pub rows: Vec<ForwardRow>,
    pub syn_flood: Vec<SynFloodRow>,
    pub footprint: Option<Footprint>,
}

/// One measured run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    offered_pps: f64,
    delivered_pps: f64,
}

/// Where the frames are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    /// At the backends' sink; every backend must have been reached.
    Backends,
    /// By `xdp_drop_count` at the LB's ingress.
    Dropped,
    /// At the backends' sink, whatever the destination (nothing was balanced).
    Sink,
}

struct Bench<'a> {
    options: &'a ForwardOptions,
    topo: &'a ForwardTopo,
    object: PerfObject,
}

impl Bench<'_> {
    fn gen_options(&self, flows: u32) -> GenOptions {
        let mut g = GenOptions::new(&self.topo.gen_ns, topo::GEN_IFACE);
        g.protocol = Protocol::Udp;
        g.frame_size = self.options.frame_size;
        g.flows = flows;
        g.duration = self.options.duration;
        g.threads = self.options.threads;
        g.src_mac = self.topo.gen_mac;
        g.dst_mac = self.topo.lb_front_mac;
        g.src_ip = topo::FLOW_SRC_IP;
        g.dst_ip = topo::VIP;
        g.src_port = 10_000;
        g.dst_port = topo::VIP_PORT;
        g
    }

    fn counted(&self, counted: Counted) -> Result<(Totals, Vec<Totals>)> {
        match counted {
            Counted::Backends => Ok((
                self.object.sink_ipv4()?,
                self.object.sink_by_dst(&topo::BACKENDS)?,
            )),
            Counted::Dropped => Ok((self.object.dropped()?, Vec::new())),
            Counted::Sink => Ok((self.object.sink_ipv4()?, Vec::new())),
        }
    }

    /// One bounded run: generate, let the queues drain, read the counters, check them.
    fn sample(&mut self, scenario: &str, flows: u32, counted: Counted) -> Result<Sample> {
        let generator = self.gen_options(flows);
        let (before, before_by) = self.counted(counted)?;
        let generated = pktgen::generate(&mut self.object, &generator)
            .with_context(|| format!("{scenario}, {flows} flows: generator"))?;
        thread::sleep(pktgen::SETTLE);
        let (after, after_by) = self.counted(counted)?;
        let delivered = after.since(before);
        let seconds = generated.elapsed.as_secs_f64();
        ensure!(
            generated.packets > 0,
            "{scenario}, {flows} flows: the generator sent nothing"
        );
        ensure!(
            delivered.packets > 0,
            "{scenario}, {flows} flows: {} frames offered, none {}",
            generated.packets,
            match counted {
                Counted::Backends | Counted::Sink => "reached the backends",
                Counted::Dropped => "counted by xdp_drop_count",
            }
        );
        ensure!(
            delivered.packets <= generated.packets,
            "{scenario}, {flows} flows: {} frames counted but only {} offered (stray traffic?)",
            delivered.packets,
            generated.packets
        );
        if counted == Counted::Backends {
            let per_backend: Vec<u64> = after_by
                .iter()
                .zip(&before_by)
                .map(|(a, b)| a.since(*b).packets)
                .collect();
            if per_backend.contains(&0) && flows >= topo::BACKENDS.len() as u32 {
                bail!(
                    "{scenario}, {flows} flows: not every backend was reached: {:?} frames to {:?}",
                    per_backend,
                    topo::BACKENDS
                );
            }
        }
        Ok(Sample {
            offered_pps: generated.packets as f64 / seconds,
            delivered_pps: delivered.packets as f64 / seconds,
        })
    }

    fn row(
        &mut self,
        scenario: &'static str,
        flows: u32,
        counted: Counted,
        mut hook: impl FnMut(usize, bool) -> Result<()>,
    ) -> Result<ForwardRow> {
        let mut samples = Vec::with_capacity(self.options.runs);
        for run in 0..self.options.runs {
            hook(run, false)?;
            samples.push(self.sample(scenario, flows, counted)?);
            hook(run, true)?;
        }
        let offered: Vec<f64> = samples.iter().map(|s| s.offered_pps).collect();
        let delivered: Vec<f64> = samples.iter().map(|s| s.delivered_pps).collect();
        let row = ForwardRow {
            scenario,
            flows,
            offered_pps: Summary::of(&offered).context("no samples")?,
            delivered_pps: Summary::of(&delivered).context("no samples")?,
        };
        eprintln!(
            "forward: {scenario:<15} {flows:>7} flows: offered {:>10.0} pps, delivered {:>10.0} pps (median of {})",
            row.offered_pps.median,
            row.delivered_pps.median,
            samples.len()
        );
        Ok(row)
    }
}

/// Measures every scenario at every flow count; see the module documentation.
pub fn run(options: &ForwardOptions) -> Result<ForwardReport> {
    options.validate()?;
    let topo = ForwardTopo::create()?;
    let mut object = PerfObject::load()?;
    object.attach(programs::COUNT_SINK, &topo.sink_ns, topo::SINK_IFACE)?;
    let mut bench = Bench {
        options,
        topo: &topo,
        object,
    };
    let mut rows = Vec::new();

    // (c) The floor: count and drop at the LB's ingress.
    let link = bench
        .object
        .attach(programs::DROP_COUNT, &topo.lb_ns, topo::LB_FRONT_IFACE)?;
    for &flows in &options.flow_counts {
        rows.push(bench.row(XDP_DROP, flows, Counted::Dropped, |_, _| Ok(()))?);
    }
    bench.object.detach(programs::DROP_COUNT, link)?;

    // (d) The forwarding floor: rewrite the MACs and redirect to the backend side, no lookup.
    let back_index = netns_tests::netns::run_in(&topo.lb_ns, || if_index(topo::LB_BACK_IFACE))??;
    bench.object.set_redirect(
        &topo.lb_ns,
        back_index,
        topo::mac_of(&topo.sink_ns, topo::SINK_IFACE)?,
        topo::mac_of(&topo.lb_ns, topo::LB_BACK_IFACE)?,
    )?;
    let link = bench
        .object
        .attach(programs::REDIRECT_FLOOR, &topo.lb_ns, topo::LB_FRONT_IFACE)?;
    for &flows in &options.flow_counts {
        rows.push(bench.row(XDP_REDIRECT_FLOOR, flows, Counted::Sink, |_, _| Ok(()))?);
    }
    bench.object.detach(programs::REDIRECT_FLOOR, link)?;

    // (b) nftables DNAT, kube-proxy style, behind xdp_pass.
    let link = bench
        .object
        .attach(programs::PASS, &topo.lb_ns, topo::LB_FRONT_IFACE)?;
    nft_load(&topo.lb_ns, &nft_ruleset())?;
    for &flows in &options.flow_counts {
        rows.push(bench.row(NFT_DNAT, flows, Counted::Backends, |_, _| Ok(()))?);
    }
    exec_in(&topo.lb_ns, "nft", &["delete", "table", "ip", NFT_TABLE])
        .context("delete the nftables table")?;
    bench.object.detach(programs::PASS, link)?;

    // (a) The real datapathd, full-NAT over the 4 backends: first with `prog_stats` on (kernel
    // BPF statistics; the footprint is measured here), then in its default configuration,
    // with them off, as (b)-(d) run: the comparable figure.
    let bins = Binaries {
        datapathd: options.datapathd.clone(),
        lb_ctl: options.lb_ctl.clone(),
    };
    let daemon = start_with_config(&topo, &bins, "prog-stats", "prog_stats:\n  enabled: true\n")
        .context("start datapathd (prog_stats on) in the LB namespace")?;
    let result = xdp_lb_rows(&mut bench, &daemon, &mut rows, XDP_LB_FULLNAT_STATS);
    if result.is_err() {
        eprintln!("{}", daemon_log_tail(&daemon));
    }
    let footprint = result?;
    drop(daemon);

    let daemon = Daemon::start(&topo.lb_ns, &topo.prefix, bins.clone(), &[])
        .context("start datapathd in the LB namespace")?;
    let result = xdp_lb_rows(&mut bench, &daemon, &mut rows, XDP_LB_FULLNAT).and_then(|_| {
        syn_flood_row(
            &mut bench,
            &daemon,
            format!(
                "on (lb.syn_flood_rate {})",
                bpf_common::defaults::SYN_FLOOD_RATE
            ),
        )
    });
    if result.is_err() {
        eprintln!("{}", daemon_log_tail(&daemon));
    }
    let mut syn_flood = vec![result?];
    drop(daemon);

    // The same with the mode off: every SYN makes a flow entry.
    let daemon = start_with_config(&topo, &bins, "no-flood-mode", "lb:\n  syn_flood_rate: 0\n")
        .context("start datapathd (SYN-flood mode off) in the LB namespace")?;
    let result = add_fullnat_service(&daemon)
        .and_then(|()| syn_flood_row(&mut bench, &daemon, "off (lb.syn_flood_rate 0)".to_string()));
    if result.is_err() {
        eprintln!("{}", daemon_log_tail(&daemon));
    }
    syn_flood.push(result?);
    drop(daemon);
    Ok(ForwardReport {
        rows,
        syn_flood,
        footprint: Some(footprint),
    })
}

/// `datapathd`'s idle footprint on its own (`dp-bench --only footprint`): the real daemon in
/// the LB namespace with its default configuration and the same UDP full-NAT service over 4
/// backends as [`run`] configures, no traffic. The first window is the one [`run`] measures;
/// the others (taken right after it) show how steady that is.
#[derive(Clone, Debug, Serialize)]
pub struct IdleFootprint {
    /// CPU use (percent of one CPU) of each consecutive [`IDLE_WINDOW`].
    pub cpu_percent: Summary,
    /// First window's CPU use, as [`Footprint::idle_cpu_percent`].
    pub first_window_cpu_percent: f64,
    /// RSS (KiB) at the end of each window.
    pub rss_kib: Summary,
    /// RSS right after the first window, as [`Footprint::idle_rss_kib`].
    pub first_window_rss_kib: u64,
}

/// Measures [`IdleFootprint`] over `windows` windows of [`IDLE_WINDOW`].
pub fn idle_footprint(
    datapathd: PathBuf,
    lb_ctl: PathBuf,
    windows: usize,
) -> Result<IdleFootprint> {
    ensure!(
        (1..=MAX_RUNS).contains(&windows),
        "windows {windows} outside 1..={MAX_RUNS}"
    );
    for binary in [&datapathd, &lb_ctl] {
        ensure!(
            binary.is_file(),
            "{} not found (build it: `cargo build -p datapath -p lb-ctl`)",
            binary.display()
        );
    }
    let topo = ForwardTopo::create()?;
    let bins = Binaries { datapathd, lb_ctl };
    let daemon = Daemon::start(&topo.lb_ns, &topo.prefix, bins, &[])
        .context("start datapathd in the LB namespace")?;
    let measured = (|| -> Result<IdleFootprint> {
        let service = format!("{}:{}", topo::VIP, topo::VIP_PORT);
        daemon.lb_ctl_ok(&[
            "service", "add", &service, "--proto", "udp", "--mode", "full-nat",
        ])?;
        for backend in topo::BACKENDS {
            let backend = format!("{backend}:{}", topo::BACKEND_PORT);
            daemon.lb_ctl_ok(&["backend", "add", &service, &backend, "--proto", "udp"])?;
        }
        let pid = daemon.pid().context("datapathd is not running")?;
        let mut cpu = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..windows {
            cpu.push(cpu_percent_over(pid, IDLE_WINDOW)?);
            rss.push(rss_kib(pid)?);
        }
        Ok(IdleFootprint {
            first_window_cpu_percent: cpu[0],
            first_window_rss_kib: rss[0],
            cpu_percent: Summary::of(&cpu).context("no window")?,
            rss_kib: Summary::of(&rss.iter().map(|&r| r as f64).collect::<Vec<_>>())
                .context("no window")?,
        })
    })();
    if measured.is_err() {
        eprintln!("{}", daemon_log_tail(&daemon));
    }
    drop(daemon);
    measured
}

fn if_index(name: &str) -> Result<u32> {
    let c_name = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    ensure!(index != 0, "no interface {name}");
    Ok(index)
}

fn daemon_log_tail(daemon: &Daemon) -> String {
    let log = daemon.log();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    format!("----- datapathd log (last lines) -----\n{tail}")
}

/// Starts datapathd in the LB namespace with `yaml` as its configuration file (written to a
/// temporary file named after `name`, removed once the daemon has read it).
fn start_with_config(
    topo: &ForwardTopo,
    bins: &Binaries,
    name: &str,
    yaml: &str,
) -> Result<Daemon> {
    let config = std::env::temp_dir().join(format!("{}-{name}.yaml", topo.prefix));
    std::fs::write(&config, yaml).with_context(|| format!("write {}", config.display()))?;
    let started = Daemon::start(
        &topo.lb_ns,
        &topo.prefix,
        bins.clone(),
        &["--config", &config.to_string_lossy()],
    );
    let _ = std::fs::remove_file(&config);
    started
}

/// The full-NAT UDP service of the `xdp-lb-fullnat` rows, over the 4 backends.
pub(crate) fn add_fullnat_service(daemon: &Daemon) -> Result<()> {
    let service = format!("{}:{}", topo::VIP, topo::VIP_PORT);
    daemon.lb_ctl_ok(&[
        "service", "add", &service, "--proto", "udp", "--mode", "full-nat",
    ])?;
    for backend in topo::BACKENDS {
        let backend = format!("{backend}:{}", topo::BACKEND_PORT);
        daemon.lb_ctl_ok(&["backend", "add", &service, &backend, "--proto", "udp"])?;
    }
    Ok(())
}

/// The DSR service the SYN flood is sent to (a second VIP, whose last byte no backend has, so
/// the sink counts its frames apart), over the same 4 backends.
const FLOOD_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 100, 2);
/// The flood's first source address: 16M flows span ~300 addresses from here, inside
/// 198.18.0.0/15 and clear of the topology's own subnets.
const FLOOD_SRC_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 19, 0, 1);
/// Established flows of the SYN-flood scenario.
const FLOOD_ESTABLISHED_FLOWS: u32 = 1_000;

/// The SYN-flood scenario (see [`SynFloodRow`]) on `daemon`, whose full-NAT UDP service is
/// already configured.
fn syn_flood_row(bench: &mut Bench<'_>, daemon: &Daemon, mode: String) -> Result<SynFloodRow> {
    let service = format!("{FLOOD_VIP}:{}", topo::VIP_PORT);
    daemon.lb_ctl_ok(&[
        "service", "add", &service, "--proto", "tcp", "--mode", "dsr",
    ])?;
    for backend in topo::BACKENDS {
        let backend = format!("{backend}:{}", topo::VIP_PORT);
        daemon.lb_ctl_ok(&["backend", "add", &service, &backend, "--proto", "tcp"])?;
    }
    // A second copy of the generator, so that both run at once with their own configuration.
    let mut flood_object = PerfObject::load()?;
    let mut flood = GenOptions::new(&bench.topo.gen_ns, topo::GEN_IFACE);
    flood.protocol = Protocol::TcpSyn;
    flood.frame_size = bench.options.frame_size;
    flood.flows = pktgen::MAX_FLOWS;
    flood.threads = 1;
    flood.first_cpu = 1;
    flood.src_mac = bench.topo.gen_mac;
    flood.dst_mac = bench.topo.lb_front_mac;
    flood.src_ip = FLOOD_SRC_IP;
    flood.dst_ip = FLOOD_VIP;
    flood.src_port = 10_000;
    flood.dst_port = topo::VIP_PORT;
    // Covers the established run from before its start to after its end.
    flood.duration = bench.options.duration + FLOOD_MARGIN * 2;
    let untracked_before = untracked(daemon)?;
    let pin_root = daemon.pin_root.clone();
    let (mut alone, mut offered, mut delivered, mut ratio, mut kept, mut syn) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..bench.options.runs {
        // Alone: the established flows (their entries made or refreshed here).
        let sample = bench.sample(
            "syn-flood (alone)",
            FLOOD_ESTABLISHED_FLOWS,
            Counted::Backends,
        )?;
        alone.push(sample.delivered_pps);
        let flood_start = datapath::gc::monotonic_now_ns();
        let before = established_entries(&pin_root, flood_start)?;
        ensure!(
            before > 0,
            "no established flow entry before the flood ({mode})"
        );
        let (flooded, generated) = thread::scope(|scope| -> Result<_> {
            let flooder = scope.spawn(|| pktgen::generate(&mut flood_object, &flood));
            thread::sleep(FLOOD_MARGIN);
            let during = bench.sample(
                "syn-flood (flooded)",
                FLOOD_ESTABLISHED_FLOWS,
                Counted::Backends,
            );
            let generated = flooder
                .join()
                .map_err(|_| anyhow::anyhow!("the flood generator panicked"))?
                .context("the flood generator")?;
            Ok((during?, generated))
        })?;
        let after = established_entries(&pin_root, flood_start)?;
        offered.push(flooded.offered_pps);
        delivered.push(flooded.delivered_pps);
        ratio.push(flooded.delivered_pps / flooded.offered_pps);
        kept.push(after as f64 / before as f64);
        syn.push(generated.offered_pps);
    }
    let untracked = untracked(daemon)? - untracked_before;
    let summary = |v: &[f64]| Summary::of(v).context("no samples");
    let row = SynFloodRow {
        mode,
        alone_pps: summary(&alone)?,
        offered_pps: summary(&offered)?,
        delivered_pps: summary(&delivered)?,
        delivered_ratio: summary(&ratio)?,
        entries_kept: summary(&kept)?,
        syn_pps: summary(&syn)?,
        untracked,
    };
    eprintln!(
        "forward: syn flood, mode {}: established {:.0} pps alone, {:.0} of {:.0} pps delivered \
         under {:.0} SYN/s ({:.4}), entries kept {:.4}, {} SYNs untracked",
        row.mode,
        row.alone_pps.median,
        row.delivered_pps.median,
        row.offered_pps.median,
        row.syn_pps.median,
        row.delivered_ratio.median,
        row.entries_kept.median,
        row.untracked
    );
    Ok(row)
}

/// How long the flood runs before and after the established flows' run.
const FLOOD_MARGIN: Duration = Duration::from_millis(200);

/// The daemon's `new_flow_untracked` counter.
fn untracked(daemon: &Daemon) -> Result<u64> {
    let stats = daemon.lb_ctl_json(&["stats"])?;
    Ok(stats["reasons"]["new_flow_untracked"].as_u64().unwrap_or(0))
}

/// The UDP entries of `LB_FLOWS` (the established flows; the flood is TCP) created before
/// `created_before_ns`.
fn established_entries(pin_root: &Path, created_before_ns: u64) -> Result<u64> {
    use std::os::fd::AsFd as _;
    let data = flows_pin(pin_root)?;
    let entries = datapath::gc::read_all::<CtKey, FlowEntry>(data.fd().as_fd())?;
    Ok(entries
        .iter()
        .filter(|(k, v)| k.proto == bpf_common::PROTO_UDP && v.ct.created_ns < created_before_ns)
        .count() as u64)
}

fn xdp_lb_rows(
    bench: &mut Bench<'_>,
    daemon: &Daemon,
    rows: &mut Vec<ForwardRow>,
    scenario: &'static str,
) -> Result<Footprint> {
    add_fullnat_service(daemon)?;
    let pid = daemon.pid().context("datapathd is not running")?;

    // Idle: service configured, no traffic.
    let idle_cpu = cpu_percent_over(pid, IDLE_WINDOW)?;
    let idle_rss = rss_kib(pid)?;

    let largest = *bench
        .options
        .flow_counts
        .iter()
        .max()
        .context("no flow count")?;
    let last_run = bench.options.runs - 1;
    let pin_root = daemon.pin_root.clone();
    let mut loaded: Option<(f64, u64, u64)> = None;
    let flow_counts = bench.options.flow_counts.clone();
    for flows in flow_counts {
        let measure = flows == largest;
        let mut window = None;
        let row = bench.row(scenario, flows, Counted::Backends, |run, done| {
            if !measure {
                return Ok(());
            }
            if !done && run == 0 {
                window = Some((cpu_ticks(pid)?, Instant::now()));
            } else if done
                && run == last_run
                && let Some((ticks, at)) = window
            {
                let cpu = cpu_percent_since(pid, ticks, at)?;
                loaded = Some((cpu, rss_kib(pid)?, tracked_flows(&pin_root)?));
            }
            Ok(())
        })?;
        rows.push(row);
    }
    let (loaded_cpu_percent, loaded_rss_kib, tracked_flows) =
        loaded.context("the loaded footprint was not measured")?;
    ensure!(
        tracked_flows > 0,
        "datapathd's flow table {} is empty after the run",
        pin_root.join("lb").join(map_names::FLOWS).display()
    );
    Ok(Footprint {
        idle_rss_kib: idle_rss,
        idle_cpu_percent: idle_cpu,
        loaded_rss_kib,
        loaded_cpu_percent,
        tracked_flows,
    })
}

/// Name of the nftables table the `nft-dnat` scenario loads.
const NFT_TABLE: &str = "pfbench";

/// The kube-proxy (nftables mode) shape of one UDP service with 4 endpoints: a service map
/// `daddr . proto . dport` -> service chain, which picks an endpoint chain with
/// `numgen random mod 4 vmap`, which DNATs.
fn nft_ruleset() -> String {
    let mut out = format!("table ip {NFT_TABLE} {{\n");
    let mut vmap = Vec::new();
    for (i, backend) in topo::BACKENDS.iter().enumerate() {
        out.push_str(&format!(
            "  chain endpoint-{i} {{\n    meta l4proto udp dnat to {backend}:{}\n  }}\n",
            topo::BACKEND_PORT
        ));
        vmap.push(format!("{i} : goto endpoint-{i}"));
    }
    out.push_str(&format!(
        "  chain service-bench {{\n    numgen random mod {} vmap {{ {} }}\n  }}\n",
        topo::BACKENDS.len(),
        vmap.join(", ")
    ));
    out.push_str(&format!(
        "  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    \
         elements = {{ {} . udp . {} : goto service-bench }}\n  }}\n",
        topo::VIP,
        topo::VIP_PORT
    ));
    out.push_str(
        "  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n  \
         chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         jump services\n  }\n}\n",
    );
    out
}

/// `nft -f -` inside namespace `ns`.
fn nft_load(ns: &str, ruleset: &str) -> Result<()> {
    use std::io::Write as _;
    let mut command = std::process::Command::new("nft");
    command
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    netns_tests::netns::command_in(&mut command, ns)?;
    let mut child = command
        .spawn()
        .context("run nft (install Debian's nftables package: `cargo xtask setup`)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft -f - failed ({}): {}\nruleset:\n{ruleset}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Resident memory of `pid` (VmRSS), KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces and parentheses).
    let rest = &stat[stat.rfind(')').context("odd /proc/PID/stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), i.e. 11 and 12 after the state (3rd).
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU use of `pid` (percent of one CPU) between `(ticks, at)` and now.
fn cpu_percent_since(pid: u32, ticks: u64, at: Instant) -> Result<f64> {
    let now = cpu_ticks(pid)?;
    let seconds = at.elapsed().as_secs_f64();
    Ok(now.saturating_sub(ticks) as f64 / ticks_per_second() / seconds * 100.0)
}

/// CPU use of `pid` over the next `window` (percent of one CPU).
pub(crate) fn cpu_percent_over(pid: u32, window: Duration) -> Result<f64> {
    let (ticks, at) = (cpu_ticks(pid)?, Instant::now());
    thread::sleep(window);
    cpu_percent_since(pid, ticks, at)
}

/// Entries in a daemon's pinned flow table: `pin_root/lb/` is the load balancer
/// controller's pin directory (docs/architecture.md, "Pins"). A benchmark may read it; the
/// daemon's own controllers never open another's pins.
pub fn tracked_flows(pin_root: &Path) -> Result<u64> {
    let map = Map::from_map_data(flows_pin(pin_root)?)?;
    let flows: HashMap<MapData, CtKey, FlowEntry> = HashMap::try_from(map)?;
    Ok(flows.keys().filter(Result::is_ok).count() as u64)
}

/// The daemon's pinned `LB_FLOWS` under its pin root (see [`tracked_flows`] on reading it).
fn flows_pin(pin_root: &Path) -> Result<MapData> {
    let path = pin_root.join("lb").join(map_names::FLOWS);
    MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))
}
