//! `cargo xtask demo`: the load balancer at work in a namespace topology.
//!
//! Uses the test harness (`netns-tests`) for the topology, the backend servers, the client and
//! the daemon handle, so the demo and the tests exercise the same code.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use netns_tests::{
    Binaries, Lab, LabOptions, TopologyOptions, client,
    daemon::service_arg,
    lab::TCP_SERVICE_PORT,
    privilege,
    topology::{CLIENT_IP, VIP},
};

use crate::util::{self, command};

#[derive(Args)]
pub struct DemoArgs {
    /// TCP connections to open through the load balancer (at most 5000).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=5000))]
    connections: u32,
    /// Don't build the binaries first (use what is in target/debug).
    #[arg(long)]
    skip_build: bool,
    /// Don't run `cargo xtask setup` first (the toolchain pieces are already installed).
    #[arg(long)]
    skip_setup: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn run(args: &DemoArgs) -> Result<()> {
    // The build needs nightly's rust-src and bpf-linker: install them first, as the tests do.
    if !args.skip_setup && !args.skip_build {
        crate::setup::run(&crate::setup::SetupArgs::default()).context("setup failed")?;
    }
    if !args.skip_build {
        println!("==> demo: building datapathd and lb-ctl");
        util::run(command("cargo").args(["build", "-p", "datapath", "-p", "lb-ctl"]))?;
    }
    if let Some(reason) = privilege::unavailable_reason() {
        bail!("the demo needs network namespaces: {reason}");
    }
    let target = util::target_dir().join("debug");
    let bins = Binaries {
        datapathd: target.join("datapathd"),
        lb_ctl: target.join("lb-ctl"),
    };
    for b in [&bins.datapathd, &bins.lb_ctl] {
        if !b.is_file() {
            bail!("{} not found; run without --skip-build", b.display());
        }
    }
    // Ctrl-C: finish the current stage, then tear everything down (Drop guards).
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }

    let started = Instant::now();
    println!("==> demo: building the topology and starting datapathd");
    let lab = Lab::start(LabOptions {
        topology: TopologyOptions {
            backends: 3,
            dsr: false,
            ipv6: false,
        },
        daemon: Some(bins),
    })
    .context("setting up the lab")?;
    let result = show(&lab, args.connections as usize);
    if result.is_err() {
        let mut lab = lab;
        eprintln!("{}", lab.diagnostics());
        drop(lab);
    } else {
        println!("==> demo: tearing down");
        drop(lab);
    }
    println!("==> demo: took {:.1}s", started.elapsed().as_secs_f64());
    result
}

fn show(lab: &Lab, connections: usize) -> Result<()> {
    let t = &lab.topo;
    println!("client   {} ({CLIENT_IP})", t.client);
    println!("lb node  {} (datapathd on lbc, lbb)", t.lb);
    for b in &t.backends {
        println!("backend  {} ({}:8080)", b.ns, b.ip);
    }
    check_interrupt()?;

    let svc = service_arg(IpAddr::V4(VIP), TCP_SERVICE_PORT);
    println!("==> demo: service {svc}/tcp, full-NAT, backends b1 b2 b3 (weight 1)");
    lab.add_service(
        TCP_SERVICE_PORT,
        datapath_api::Protocol::Tcp,
        "full-nat",
        &["b1", "b2", "b3"],
    )?;
    check_interrupt()?;

    println!("==> demo: {connections} TCP connections from the client to {svc}");
    let spread = client::tcp_spread_within(
        lab.client_ns(),
        client::sock(VIP, TCP_SERVICE_PORT),
        connections,
        Duration::from_secs(30),
    )?;
    println!();
    print!("{}", spread.table());
    println!();
    for e in spread.errors.iter().take(5) {
        println!("failed: {e}");
    }
    check_interrupt()?;

    let d = lab.daemon();
    println!("==> demo: lb-ctl service list");
    print!("{}", d.lb_ctl_ok(&["service", "list"])?);
    println!("==> demo: lb-ctl stats");
    print!("{}", d.lb_ctl_ok(&["stats"])?);
    if !spread.errors.is_empty() {
        bail!(
            "{} of {} connections failed",
            spread.errors.len(),
            spread.attempted
        );
    }
    Ok(())
}
