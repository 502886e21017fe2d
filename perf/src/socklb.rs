//! `dp-bench --only socklb`: what socket-level load balancing costs a `connect()` (issue 14),
//! with the real daemon, in namespaces made for the run:
//!
//! ```text
//!  node ns "<p>n" (datapathd, socklb on a child cgroup)     backends ns "<p>b"
//!  sl0 198.18.1.1/24  <------------- veth ------------->  sb0 198.18.1.11-14/24, TCP listeners
//! ```
//!
//! - **connect() cost**: the time of a blocking TCP `connect()` (it returns with the SYN-ACK)
//!   from the node to (a) a backend directly, (b) a VIP translated by the socket LB (the bench
//!   process sits in the socket LB's cgroup while it measures), (c) another VIP through an
//!   nftables DNAT rule on the output hook (`numgen random` over the same four backends). The
//!   paths are interleaved round by round. A round's figure is the median of its connects (a
//!   stall of the shared VM lands in one connect, not in the round), and a row is the median
//!   over rounds; "over direct" is the median of the rounds' paired differences, so that a
//!   drift of the machine between rounds cancels. The means are reported beside them.
//!   Sockets close with a reset (SO_LINGER 0), so no TIME_WAIT piles up. A fourth row is (a)
//!   from inside the cgroup: what every other `connect()` of a translated process pays for
//!   the programs looking.
//! - **the program alone**: `sock_connect4`'s own run time per call, from the kernel's BPF
//!   statistics (switched on for this part only), translating a VIP and passing a backend's
//!   address by. Free of the connect's noise, and what a change to the program moves.
//! - **connections per second** from the cgroup, single-threaded (connect, close), to the VIPs
//!   of 1, 10 and 1,000 services (declared in a services file), round-robin over the services.
//!
//! `DP_BENCH_SOCKLB_EVENT_RATE` sets the daemon's `socklb.event_rate` (default 10000), to see
//! what the decision events cost (0: none sent).
use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use netns_tests::{
    Binaries, Daemon, DaemonOptions,
    cgroup::{TestCgroup, cgroup2_root},
    netns::{self, OwnedNetns},
    topology::ip_in,
};
use serde::Serialize;

use crate::{report::Summary, topo::unique_prefix};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const BACKENDS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 1, 11),
    Ipv4Addr::new(198, 18, 1, 12),
    Ipv4Addr::new(198, 18, 1, 13),
    Ipv4Addr::new(198, 18, 1, 14),
];
const PORT: u16 = 8080;
/// The socket-LB VIPs: 198.18.100.0/22, routed nowhere.
const fn socklb_vip(i: u32) -> Ipv4Addr {
    let n = i + 1;
    Ipv4Addr::new(198, 18, 100 + (n / 250) as u8, (n % 250) as u8 + 1)
}
/// The nftables VIP, routed out of `sl0` so that the output hook sees it.
const NFT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 110, 1);
const SERVICE_COUNTS: [u32; 3] = [1, 10, 1000];

#[derive(Debug, Serialize)]
pub struct ConnectRow {
    pub path: &'static str,
    /// Median microseconds per `connect()`, per round.
    pub us: Summary,
    /// Mean microseconds per `connect()`, per round.
    pub mean_us: Summary,
    /// Per round: this path's median less the direct path's median of the same round.
    pub over_direct_us: Summary,
}

/// The socket LB's `sock_connect4` program alone, timed by the kernel's BPF statistics.
#[derive(Debug, Serialize)]
pub struct ProgramRow {
    pub path: &'static str,
    /// Nanoseconds per run, per round.
    pub ns: Summary,
}

#[derive(Debug, Serialize)]
pub struct CpsRow {
    pub services: u32,
    /// Connections (connect and close) per second, per round.
    pub cps: Summary,
}

#[derive(Debug, Serialize)]
pub struct SockLbReport {
    pub connects_per_round: usize,
    pub rounds: usize,
    pub connect: Vec<ConnectRow>,
    pub program: Vec<ProgramRow>,
    pub cps: Vec<CpsRow>,
}

/// This process's cgroup v2 directory (to come back to).
fn own_cgroup() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    Ok(cgroup2_root()?.join(rel.trim_start_matches('/')))
}

/// While held, this whole process is in `cgroup`; dropped, it is back where it was.
struct InCgroup {
    home: PathBuf,
}

impl InCgroup {
    fn enter(cgroup: &Path) -> Result<Self> {
        let home = own_cgroup()?;
        move_self(cgroup)?;
        Ok(Self { home })
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = move_self(&self.home);
    }
}

fn move_self(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("open {}", procs.display()))?;
    // The process id moves every thread of the process.
    write!(f, "{}", std::process::id()).with_context(|| format!("write {}", procs.display()))?;
    Ok(())
}

/// Accepts and drops connections on the backends until stopped.
struct Listeners {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Listeners {
    fn start(ns: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for ip in BACKENDS {
            let listener = netns::run_in(ns, move || TcpListener::bind((ip, PORT)))??;
            listener.set_nonblocking(true)?;
            let stop = Arc::clone(&stop);
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => drop(s),
                        Err(_) => thread::sleep(Duration::from_micros(50)),
                    }
                }
            }));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP connect to `to`: its duration; the socket is reset on close.
fn one_connect(to: SocketAddr) -> Result<Duration> {
    let start = Instant::now();
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .with_context(|| format!("connect to {to}"))?;
    let took = start.elapsed();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and option of the stated size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    Ok(took)
}

/// One round of a path: the median and the mean microseconds per `connect()`.
#[derive(Clone, Copy)]
struct Round {
    median: f64,
    mean: f64,
}

/// `n` connects to the addresses `to` yields, in namespace `ns`.
fn connect_round(ns: &str, n: usize, to: impl Fn(usize) -> SocketAddr + Send) -> Result<Round> {
    netns::run_in(ns, move || -> Result<Round> {
        let mut us = Vec::with_capacity(n);
        for i in 0..n {
            us.push(one_connect(to(i))?.as_secs_f64() * 1e6);
        }
        let mean = us.iter().sum::<f64>() / n as f64;
        Ok(Round {
            median: summary(&us).median,
            mean,
        })
    })?
}

/// The row of `path` from its rounds, paired round by round with the direct path's.
fn connect_row(path: &'static str, rounds: &[Round], direct: &[Round]) -> ConnectRow {
    let medians: Vec<f64> = rounds.iter().map(|r| r.median).collect();
    let means: Vec<f64> = rounds.iter().map(|r| r.mean).collect();
    let over: Vec<f64> = rounds
        .iter()
        .zip(direct)
        .map(|(r, d)| r.median - d.median)
        .collect();
    ConnectRow {
        path,
        us: summary(&medians),
        mean_us: summary(&means),
        over_direct_us: summary(&over),
    }
}

/// Runs and run time so far of the programs named `sock_connect4` (the daemon's, and any
/// other socket LB's, which [`connect4_ns`] checks did not run).
fn connect4_runs() -> Result<(u64, Duration)> {
    let mut runs = 0;
    let mut time = Duration::ZERO;
    for info in aya::programs::loaded_programs() {
        let info = info.context("list the loaded BPF programs")?;
        if info.name_as_str() == Some("sock_connect4") {
            runs += info.run_count();
            time += info.run_time();
        }
    }
    Ok((runs, time))
}

/// Nanoseconds per run of `sock_connect4` over `n` connects to what `to` yields (BPF
/// statistics must be on).
fn connect4_ns(ns: &str, n: usize, to: impl Fn(usize) -> SocketAddr + Send) -> Result<f64> {
    let (runs0, time0) = connect4_runs()?;
    connect_round(ns, n, to)?;
    let (runs1, time1) = connect4_runs()?;
    ensure!(
        runs1 - runs0 == n as u64,
        "sock_connect4 programs ran {} times for {n} connects: another socket LB is running, \
         and its runs would be mixed in",
        runs1 - runs0
    );
    Ok((time1 - time0).as_nanos() as f64 / n as f64)
}

/// Connections per second over `window`, round-robin over `services` VIPs.
fn cps(ns: &str, services: u32, window: Duration) -> Result<f64> {
    netns::run_in(ns, move || -> Result<f64> {
        let start = Instant::now();
        let mut n = 0u64;
        // Bounded by time and count.
        while start.elapsed() < window && n < 10_000_000 {
            let vip = socklb_vip((n % u64::from(services)) as u32);
            one_connect(SocketAddr::from((vip, 80)))?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })?
}

fn summary(samples: &[f64]) -> Summary {
    Summary::of(samples).expect("at least one round")
}

fn services_file(count: u32) -> String {
    let mut out = String::from("services:\n");
    for i in 0..count {
        out.push_str(&format!(
            "  - name: s{i}\n    vip: {}\n    port: 80\n    backends:\n",
            socklb_vip(i)
        ));
        for b in BACKENDS {
            out.push_str(&format!("      - {{ addr: {b}, port: {PORT} }}\n"));
        }
    }
    out
}

fn wait_services(daemon: &Daemon, count: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = daemon.lb_ctl_json(&["service", "list"])?;
        if list.as_array().map(Vec::len) == Some(count) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{count} services not programmed in 60 s");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(datapathd: PathBuf, lb_ctl: PathBuf, smoke: bool) -> Result<SockLbReport> {
    let prefix = unique_prefix();
    let node = OwnedNetns::create(&format!("{prefix}n"))?;
    let backends = OwnedNetns::create(&format!("{prefix}b"))?;
    ip_in(
        node.name(),
        &[
            "link",
            "add",
            "sl0",
            "type",
            "veth",
            "peer",
            "name",
            "sb0",
            "netns",
            backends.name(),
        ],
    )?;
    ip_in(
        node.name(),
        &["addr", "add", &format!("{NODE_IP}/24"), "dev", "sl0"],
    )?;
    ip_in(node.name(), &["link", "set", "sl0", "up"])?;
    ip_in(node.name(), &["link", "set", "lo", "up"])?;
    ip_in(
        node.name(),
        &["route", "add", &format!("{NFT_VIP}/32"), "dev", "sl0"],
    )?;
    for b in BACKENDS {
        ip_in(
            backends.name(),
            &["addr", "add", &format!("{b}/24"), "dev", "sb0"],
        )?;
    }
    ip_in(backends.name(), &["link", "set", "sb0", "up"])?;
    ip_in(backends.name(), &["link", "set", "lo", "up"])?;
    // nftables DNAT of NFT_VIP as kube-proxy's nftables mode programs it (a service map ->
    // `numgen random mod 4 vmap` -> endpoint chains), on the output hook for the node's own
    // connections, over the same four backends.
    let mut rules = String::from("table ip bench {\n");
    let mut vmap = Vec::new();
    for (i, b) in BACKENDS.iter().enumerate() {
        rules.push_str(&format!(
            "  chain endpoint-{i} {{\n    meta l4proto tcp dnat to {b}:{PORT}\n  }}\n"
        ));
        vmap.push(format!("{i} : goto endpoint-{i}"));
    }
    rules.push_str(&format!(
        "  chain service-bench {{\n    numgen random mod 4 vmap {{ {} }}\n  }}\n  \
         map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    \
         elements = {{ {NFT_VIP} . tcp . 80 : goto service-bench }}\n  }}\n  \
         chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n  \
         chain nat-output {{\n    type nat hook output priority -100; policy accept;\n    \
         jump services\n  }}\n}}\n",
        vmap.join(", ")
    ));
    let mut nft = std::process::Command::new("nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    netns::command_in(&mut nft, node.name())?;
    let mut child = nft.spawn().context("nft")?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    ensure!(child.wait()?.success(), "nft -f: {rules}");
    let _listeners = Listeners::start(backends.name())?;

    let cgroup = TestCgroup::create(&format!("dp-bench-{prefix}"))?;
    let services = std::env::temp_dir().join(format!("dp-bench-socklb-{prefix}-services.yaml"));
    std::fs::write(&services, services_file(1))?;
    let config = std::env::temp_dir().join(format!("dp-bench-socklb-{prefix}.yaml"));
    std::fs::write(
        &config,
        format!(
            "reload:\n  watch: false\nlb:\n  interfaces: [sl0]\n  maps:\n    max_services: 1024\n    \
             maglev_size: 1021\nservice_file:\n  path: {}\nsocklb:\n  enabled: true\n  event_rate: {}\n  cgroup: {}\n",
            services.display(),
            std::env::var("DP_BENCH_SOCKLB_EVENT_RATE").unwrap_or_else(|_| "10000".into()),
            cgroup.path().display()
        ),
    )?;
    let daemon = Daemon::start_with(
        node.name(),
        &prefix,
        Binaries { datapathd, lb_ctl },
        DaemonOptions {
            ifaces: false,
            wait_ready: true,
            extra_args: vec!["--config".into(), config.display().to_string()],
        },
    )
    .context("start datapathd")?;
    let result = (|| -> Result<SockLbReport> {
        wait_services(&daemon, 1)?;
        let (rounds, n) = if smoke { (3, 200) } else { (41, 500) };
        let ns = node.name().to_string();
        let mut direct = Vec::new();
        let mut direct_in_cgroup = Vec::new();
        let mut socklb = Vec::new();
        let mut nft = Vec::new();
        let backend = |i: usize| SocketAddr::from((BACKENDS[i % 4], PORT));
        let vip = |_| SocketAddr::from((socklb_vip(0), 80));
        let nft_vip = |_| SocketAddr::from((NFT_VIP, 80));
        // Warm up every path once (neighbours, the programs' first runs).
        {
            let _in = InCgroup::enter(cgroup.path())?;
            connect_round(&ns, 50, vip)?;
        }
        connect_round(&ns, 50, backend)?;
        connect_round(&ns, 50, nft_vip)?;
        for round in 0..rounds {
            direct.push(connect_round(&ns, n, backend)?);
            let in_cgroup = InCgroup::enter(cgroup.path())?;
            // Alternate which of the two cgroup paths goes first, so that neither always
            // follows the move into the cgroup.
            if round % 2 == 0 {
                socklb.push(connect_round(&ns, n, vip)?);
                direct_in_cgroup.push(connect_round(&ns, n, backend)?);
            } else {
                direct_in_cgroup.push(connect_round(&ns, n, backend)?);
                socklb.push(connect_round(&ns, n, vip)?);
            }
            drop(in_cgroup);
            nft.push(connect_round(&ns, n, nft_vip)?);
        }
        // The program alone, with the kernel's run-time statistics on only for this part (they
        // cost every BPF program two clock reads a run, so the rounds above ran without).
        let mut program_translated = Vec::new();
        let mut program_pass = Vec::new();
        {
            let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("enable the kernel's BPF statistics")?;
            let _in = InCgroup::enter(cgroup.path())?;
            for _ in 0..if smoke { 2 } else { 9 } {
                program_translated.push(connect4_ns(&ns, n, vip)?);
                program_pass.push(connect4_ns(&ns, n, backend)?);
            }
        }
        let st = daemon.lb_ctl_json(&["socklb"])?;
        let translated = st["reasons"]["connect_translated"].as_u64().unwrap_or(0);
        ensure!(
            translated >= (rounds * n) as u64,
            "the socket LB translated {translated} connects, fewer than measured: {st}"
        );
        let window = Duration::from_millis(if smoke { 300 } else { 2_000 });
        let mut cps_rows = Vec::new();
        for count in SERVICE_COUNTS {
            if smoke && count > 10 {
                continue;
            }
            std::fs::write(&services, services_file(count))?;
            wait_services(&daemon, count as usize)?;
            let mut samples = Vec::new();
            for _ in 0..if smoke { 1 } else { 5 } {
                let _in = InCgroup::enter(cgroup.path())?;
                samples.push(cps(&ns, count, window)?);
            }
            cps_rows.push(CpsRow {
                services: count,
                cps: summary(&samples),
            });
        }
        Ok(SockLbReport {
            connects_per_round: n,
            rounds,
            connect: vec![
                connect_row("direct to the backend", &direct, &direct),
                connect_row("VIP, socket LB", &socklb, &direct),
                connect_row(
                    "direct to the backend, from the socket LB's cgroup (not a VIP: the programs only look)",
                    &direct_in_cgroup,
                    &direct,
                ),
                connect_row("VIP, nftables DNAT (output hook)", &nft, &direct),
            ],
            program: vec![
                ProgramRow {
                    path: "sock_connect4, a VIP translated",
                    ns: summary(&program_translated),
                },
                ProgramRow {
                    path: "sock_connect4, not a VIP",
                    ns: summary(&program_pass),
                },
            ],
            cps: cps_rows,
        })
    })();
    drop(daemon);
    let _ = std::fs::remove_file(&services);
    let _ = std::fs::remove_file(&config);
    result
}
