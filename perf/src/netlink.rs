//! `dp-bench --only netlink`: how fast the daemon follows the node (issue 12), with the real
//! daemon in the forwarding topology's LB namespace:
//!
//! - **link appears -> program attached**: 100 veths matching `lb.interfaces`, created one by
//!   one; the time from `ip link add` returning until the XDP link's pin exists (the daemon
//!   pins right after attaching);
//! - **neighbour change -> FIB generation bumped**: `ip neigh replace` of a backend with a new
//!   MAC, 200 times; the time until `LB_FIB_GEN` (read from its pin with aya) moved. Measured
//!   from `ip` starting (an upper bound: it includes starting the process) and from `ip`
//!   returning (a lower bound: the kernel changed the entry before it returned);
//! - **idle CPU** of the daemon over 60 s (10 s with `--smoke`), measured first: XDP on the
//!   two LB interfaces, the policy on one, a UDP service of 4 backends; `/proc/<pid>/stat`.
use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use netns_tests::{Binaries, Daemon, DaemonOptions, topology::ip_in};
use serde::Serialize;

use crate::{forward::cpu_percent_over, report::Summary, topo};

/// Longest wait for one attachment or one bump before the bench fails.
const LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct NetlinkReport {
    /// Milliseconds from `ip link add` returning to the XDP pin, per interface.
    pub attach_ms: Summary,
    /// Milliseconds from `ip neigh replace` starting to the bump (upper bound).
    pub bump_from_start_ms: Summary,
    /// Milliseconds from `ip neigh replace` returning to the bump (lower bound).
    pub bump_from_exit_ms: Summary,
    pub idle_window_s: u64,
    pub idle_cpu_percent: f64,
}

fn wait_for(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<Instant> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(Instant::now());
        }
        if start.elapsed() > LIMIT {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_micros(100));
    }
}

fn fib_generation(pin: &Path) -> Result<u32> {
    let data =
        aya::maps::MapData::from_pin(pin).with_context(|| format!("open {}", pin.display()))?;
    let array: aya::maps::Array<_, u32> = aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
    Ok(array.get(&0, 0)?)
}

/// The 99th percentile (nearest rank) of `s`.
pub fn p99(s: &Summary) -> f64 {
    let mut v = s.samples.clone();
    v.sort_by(f64::total_cmp);
    let rank = ((v.len() as f64) * 0.99).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn run(datapathd: PathBuf, lb_ctl: PathBuf, smoke: bool) -> Result<NetlinkReport> {
    let topo = topo::ForwardTopo::create()?;
    let config = std::env::temp_dir().join(format!("dp-bench-netlink-{}.yaml", topo.prefix));
    std::fs::write(
        &config,
        "lb:\n  interfaces: [lbc, lbb, \"nlb*\"]\npolicy:\n  enabled: true\n  interfaces: [lbb, \"nlb*\"]\n",
    )?;
    let daemon = Daemon::start_with(
        &topo.lb_ns,
        &topo.prefix,
        Binaries { datapathd, lb_ctl },
        DaemonOptions {
            ifaces: false,
            wait_ready: true,
            extra_args: vec!["--config".into(), config.display().to_string()],
        },
    )
    .context("start datapathd")?;
    let result = (|| -> Result<NetlinkReport> {
        let service = format!("{}:{}", topo::VIP, topo::VIP_PORT);
        daemon.lb_ctl_ok(&[
            "service", "add", &service, "--proto", "udp", "--mode", "full-nat",
        ])?;
        for backend in topo::BACKENDS {
            let backend = format!("{backend}:{}", topo::BACKEND_PORT);
            daemon.lb_ctl_ok(&["backend", "add", &service, &backend, "--proto", "udp"])?;
        }
        // Idle first, as a node runs: two interfaces with XDP, TCX on one, the service.
        let window = Duration::from_secs(if smoke { 10 } else { 60 });
        let pid = daemon.pid().context("datapathd is not running")?;
        let idle = cpu_percent_over(pid, window)?;
        let links = daemon.pin_root.join("lb/links");
        let count = if smoke { 10 } else { 100 };
        let mut attach = Vec::new();
        for i in 0..count {
            let name = format!("nlb{i}");
            ip_in(
                &topo.lb_ns,
                &[
                    "link",
                    "add",
                    &name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &format!("pnl{i}"),
                ],
            )?;
            let created = Instant::now();
            let pin = links.join(format!("xdp_lb_{name}"));
            let done = wait_for(&format!("XDP on {name}"), || Ok(pin.exists()))?;
            attach.push(ms(done - created));
        }
        let gen_pin = daemon
            .pin_root
            .join("lb")
            .join(bpf_common::map_names::FIB_GEN);
        let backend = topo::BACKENDS[0].to_string();
        let rounds = if smoke { 20 } else { 200 };
        let (mut from_start, mut from_exit) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            let before = fib_generation(&gen_pin)?;
            let mac = format!("02:00:00:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff);
            let start = Instant::now();
            let status = Command::new("ip")
                .args([
                    "-n",
                    &topo.lb_ns,
                    "neigh",
                    "replace",
                    &backend,
                    "lladdr",
                    &mac,
                ])
                .args(["dev", "lbb", "nud", "reachable"])
                .status()?;
            let exited = Instant::now();
            ensure!(status.success(), "ip neigh replace failed");
            let done = wait_for("the FIB generation to move", || {
                Ok(fib_generation(&gen_pin)? != before)
            })?;
            from_start.push(ms(done - start));
            from_exit.push(ms(done.saturating_duration_since(exited)));
        }
        Ok(NetlinkReport {
            attach_ms: Summary::of(&attach).context("no attachment")?,
            bump_from_start_ms: Summary::of(&from_start).context("no bump")?,
            bump_from_exit_ms: Summary::of(&from_exit).context("no bump")?,
            idle_window_s: window.as_secs(),
            idle_cpu_percent: idle,
        })
    })();
    if result.is_err() {
        eprintln!("{}", daemon.log());
    }
    drop(daemon);
    let _ = std::fs::remove_file(&config);
    result
}
