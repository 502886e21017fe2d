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
//!   three are interleaved round by round; each round is the mean over its connects, and the
//!   rows are medians over rounds. Sockets close with a reset (SO_LINGER 0), so no TIME_WAIT
//!   piles up. A fourth row is (a) from inside the cgroup: what every other `connect()` of a
//!   translated process pays for the programs looking.
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
    /// Mean microseconds per `connect()`, per round.
    pub us: Summary,
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

/// Mean microseconds of `n` connects to the addresses `to` yields, in namespace `ns`.
fn mean_connect_us(ns: &str, n: usize, to: impl Fn(usize) -> SocketAddr + Send) -> Result<f64> {
    netns::run_in(ns, move || -> Result<f64> {
        let mut total = Duration::ZERO;
        for i in 0..n {
            total += one_connect(to(i))?;
        }
        Ok(total.as_secs_f64() * 1e6 / n as f64)
    })?
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
        let (rounds, n) = if smoke { (3, 200) } else { (15, 2_000) };
        let ns = node.name().to_string();
        let mut direct = Vec::new();
        let mut direct_in_cgroup = Vec::new();
        let mut socklb = Vec::new();
        let mut nft = Vec::new();
        // Warm up every path once (neighbours, the programs' first runs).
        {
            let _in = InCgroup::enter(cgroup.path())?;
            mean_connect_us(&ns, 50, |_| SocketAddr::from((socklb_vip(0), 80)))?;
        }
        mean_connect_us(&ns, 50, |i| SocketAddr::from((BACKENDS[i % 4], PORT)))?;
        mean_connect_us(&ns, 50, |_| SocketAddr::from((NFT_VIP, 80)))?;
        for _ in 0..rounds {
            direct.push(mean_connect_us(&ns, n, |i| {
                SocketAddr::from((BACKENDS[i % 4], PORT))
            })?);
            {
                let _in = InCgroup::enter(cgroup.path())?;
                socklb.push(mean_connect_us(&ns, n, |_| {
                    SocketAddr::from((socklb_vip(0), 80))
                })?);
                direct_in_cgroup.push(mean_connect_us(&ns, n, |i| {
                    SocketAddr::from((BACKENDS[i % 4], PORT))
                })?);
            }
            nft.push(mean_connect_us(&ns, n, |_| {
                SocketAddr::from((NFT_VIP, 80))
            })?);
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
                ConnectRow {
                    path: "direct to the backend",
                    us: summary(&direct),
                },
                ConnectRow {
                    path: "VIP, socket LB",
                    us: summary(&socklb),
                },
                ConnectRow {
                    path: "direct to the backend, from the socket LB's cgroup (not a VIP: the programs only look)",
                    us: summary(&direct_in_cgroup),
                },
                ConnectRow {
                    path: "VIP, nftables DNAT (output hook)",
                    us: summary(&nft),
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
