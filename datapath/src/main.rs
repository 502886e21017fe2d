//! `datapathd`: loads and attaches the XDP load balancer, restores the declared services and
//! serves the HTTP/JSON API that `lb-ctl` talks to.
use std::{io::IsTerminal, path::PathBuf, process::ExitCode, str::FromStr, sync::Arc};

use anyhow::Context;
use bpf_common::defaults;
use clap::{Args, Parser, Subcommand, ValueEnum};
use datapath::{
    api::{self, Controller},
    dataplane::{self, Dataplane, DataplaneConfig, XdpAttachMode},
    state::{Limits, Store},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

const DEFAULT_STATE_FILE: &str = "/var/lib/datapath/state.json";

const RUN_AFTER_HELP: &str = "\
Every option can also be set through the environment variable named in brackets; several
interfaces go comma-separated (DATAPATH_IFACE=eth0,eth1). Log verbosity follows RUST_LOG
(default: info).

On SIGTERM or SIGINT datapathd stops accepting API requests, finishes those in flight and
exits 0. The XDP program stays attached and keeps forwarding from its pinned maps; the next
`datapathd run` takes them over. `datapathd cleanup` detaches it.";

/// The eBPF datapath daemon: an XDP L4 load balancer and its control API.
#[derive(Debug, Parser)]
#[command(name = "datapathd", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach the load balancer, restore the saved services and serve the API.
    #[command(after_help = RUN_AFTER_HELP)]
    Run(RunArgs),
    /// Detach the XDP program and remove every pin under the pin root.
    Cleanup(CleanupArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Interface to attach XDP to, client- and backend-facing alike (repeat for several).
    #[arg(
        long = "iface",
        value_name = "IF",
        env = "DATAPATH_IFACE",
        required = true,
        value_delimiter = ','
    )]
    ifaces: Vec<String>,
    /// Unix socket of the API.
    #[arg(long, value_name = "PATH", env = "DATAPATH_SOCKET",
          default_value = datapath_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where the declared services are saved; restored on start.
    #[arg(long, value_name = "PATH", env = "DATAPATH_STATE_FILE",
          default_value = DEFAULT_STATE_FILE)]
    state_file: PathBuf,
    #[command(flatten)]
    pin_root: PinRoot,
    /// XDP attach mode: auto tries native (driver) mode and falls back to generic.
    #[arg(long, value_enum, env = "DATAPATH_XDP_MODE", default_value_t = XdpMode::Auto)]
    xdp_mode: XdpMode,
    /// Entries of each service's Maglev table; a prime.
    #[arg(long, value_name = "N", env = "DATAPATH_MAGLEV_SIZE",
          default_value_t = defaults::MAGLEV_SIZE, value_parser = parse_maglev_size)]
    maglev_size: u32,
    /// Services the datapath can hold.
    #[arg(long, value_name = "N", env = "DATAPATH_MAX_SERVICES",
          default_value_t = defaults::MAX_SERVICES,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_services: u32,
    /// Backends the datapath can hold, across all services.
    #[arg(long, value_name = "N", env = "DATAPATH_MAX_BACKENDS",
          default_value_t = defaults::MAX_BACKENDS,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_backends: u32,
    /// Flows the connection table can track (least recently used ones are evicted).
    #[arg(long, value_name = "N", env = "DATAPATH_MAX_FLOWS",
          default_value_t = defaults::MAX_FLOWS,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_flows: u32,
    /// Source ports full-NAT allocates from.
    #[arg(long, value_name = "MIN-MAX", env = "DATAPATH_NAT_PORT_RANGE",
          default_value_t = PortRange { min: defaults::NAT_PORT_MIN, max: defaults::NAT_PORT_MAX })]
    nat_port_range: PortRange,
    /// Milliseconds an established flow reuses its cached route and next-hop MAC before
    /// looking them up again (bounds how long a neighbour change goes unnoticed; 0 looks
    /// the route up for every packet).
    #[arg(long, value_name = "MS", env = "DATAPATH_FIB_CACHE_MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    fib_cache_ms: u64,
    /// Log format on stderr.
    #[arg(long, value_enum, env = "DATAPATH_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Seconds between flow-table garbage-collection sweeps (0 disables them; the LRU maps
    /// then only evict when full). Timeouts: TCP SYN 60 s, established 6 h, closing 10 s,
    /// UDP and other 60 s.
    #[arg(long, value_name = "SECONDS", env = "DATAPATH_GC_INTERVAL",
          default_value_t = datapath::gc::DEFAULT_SWEEP_INTERVAL.as_secs())]
    gc_interval: u64,
}

#[derive(Debug, Args)]
struct CleanupArgs {
    #[command(flatten)]
    pin_root: PinRoot,
}

#[derive(Debug, Args)]
struct PinRoot {
    /// bpffs directory holding the pinned maps and links.
    #[arg(long = "pin-root", value_name = "PATH", env = "DATAPATH_PIN_ROOT",
          default_value = defaults::PIN_ROOT)]
    path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum XdpMode {
    Auto,
    Native,
    Generic,
}

impl From<XdpMode> for XdpAttachMode {
    fn from(m: XdpMode) -> Self {
        match m {
            XdpMode::Auto => XdpAttachMode::Auto,
            XdpMode::Native => XdpAttachMode::Native,
            XdpMode::Generic => XdpAttachMode::Generic,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// An inclusive port range, `MIN-MAX` on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PortRange {
    min: u16,
    max: u16,
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (min, max) = s
            .split_once('-')
            .ok_or_else(|| format!("expected MIN-MAX, e.g. 1024-65535, not {s:?}"))?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("{p:?} is not a port from 1 to 65535"))
        };
        let range = PortRange {
            min: port(min)?,
            max: port(max)?,
        };
        if range.min > range.max {
            return Err(format!("{s:?} is empty: MIN is above MAX"));
        }
        Ok(range)
    }
}

fn parse_maglev_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !lb_core::maglev::is_prime(n) {
        return Err(format!(
            "{n} is not prime; Maglev needs a prime table size (e.g. 251, 4093, 65537)"
        ));
    }
    Ok(n)
}

impl RunArgs {
    fn dataplane_config(&self) -> anyhow::Result<DataplaneConfig> {
        let config = DataplaneConfig {
            pin_root: self.pin_root.path.clone(),
            interfaces: self.ifaces.clone(),
            xdp_mode: self.xdp_mode.into(),
            maglev_size: self.maglev_size,
            max_services: self.max_services,
            max_backends: self.max_backends,
            max_flows: self.max_flows,
            nat_port_min: self.nat_port_range.min,
            nat_port_max: self.nat_port_range.max,
            fib_cache_ns: self.fib_cache_ms * 1_000_000,
        };
        config.validate()?;
        Ok(config)
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal; journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    let config = args.dataplane_config()?;

    // Registered before anything is attached, so a signal during start-up ends the daemon
    // through the same orderly path instead of killing it half-way.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    // The state file first: a corrupt one must stop us before we touch the datapath, which
    // would otherwise be reconciled down to less than what was declared.
    let store = Store::open(&args.state_file, Limits::from_config(&config))
        .context("cannot load the saved services")?;
    // Then the socket: it refuses to start while another daemon is serving, before we take
    // its XDP program and maps over.
    let listener = api::bind(&args.socket).await?;

    let mut dp = Dataplane::start(&config).context("cannot start the dataplane")?;
    info!(interfaces = ?config.interfaces, xdp_mode = ?config.xdp_mode, "XDP load balancer attached");
    dp.reconcile(store.state())
        .context("cannot restore the saved services into the dataplane")?;
    info!(
        services = store.state().services.len(),
        state_file = %args.state_file.display(),
        "restored the saved services"
    );

    let ctl = Arc::new(tokio::sync::Mutex::new(Controller::new(store, dp)));
    tokio::spawn(warm_neighbours(Arc::clone(&ctl)));
    if args.gc_interval > 0 {
        let gc = datapath::gc::FlowGc::open(&config.pin_root, datapath::gc::GcConfig::default())
            .context("cannot open the flow tables for garbage collection")?;
        tokio::spawn(collect_flows(
            gc,
            std::time::Duration::from_secs(args.gc_interval),
        ));
    }
    info!(socket = %args.socket.display(), "serving the API");
    let shutdown = async move {
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        };
        info!(
            signal = name,
            "stopping: finishing in-flight requests; the datapath stays attached"
        );
    };
    let served = api::serve(listener, ctl, shutdown).await;
    // Gone rather than refusing connections: lb-ctl then says plainly that nobody is there.
    if let Err(e) = std::fs::remove_file(&args.socket)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %args.socket.display(), error = %e, "cannot remove the API socket");
    }
    served?;
    info!("stopped");
    Ok(())
}

/// Re-resolves backend neighbours whenever the datapath reports packets that found none (see
/// `Dataplane::prime_neighbours`). Polls a per-CPU counter twice a second: cheap, and a lost
/// first SYN is retransmitted by the client after one second.
async fn warm_neighbours(ctl: Arc<tokio::sync::Mutex<Controller<Dataplane>>>) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut seen = None;
    loop {
        ticker.tick().await;
        let ctl = ctl.lock().await;
        let Ok(misses) = ctl.plane().neighbour_misses() else {
            continue;
        };
        if seen.is_some_and(|seen| misses > seen) {
            info!(
                misses,
                "next hops without a neighbour entry: priming backend neighbours"
            );
            ctl.plane().prime_neighbours();
        }
        seen = Some(misses);
    }
}

/// The flow-table garbage collector (see `datapath::gc`): one throttled sweep per interval, on
/// a blocking thread so a sweep over a large table never stalls the API.
async fn collect_flows(gc: datapath::gc::FlowGc, interval: std::time::Duration) {
    let gc = Arc::new(std::sync::Mutex::new(gc));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let gc = Arc::clone(&gc);
        let swept = tokio::task::spawn_blocking(move || {
            let mut gc = gc
                .lock()
                .map_err(|_| "the collector panicked".to_string())?;
            let report = gc
                .sweep(datapath::gc::monotonic_now_ns())
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((report, gc.totals()))
        })
        .await;
        match swept {
            Ok(Ok((report, totals))) => {
                if report.flows_expired + report.nat_orphans_removed + report.deferred > 0 {
                    info!(
                        scanned = report.flows_scanned,
                        expired = report.flows_expired,
                        nat_orphans = report.nat_orphans_removed,
                        deferred = report.deferred,
                        kept_live = report.flows_kept_live,
                        duration_us = report.duration_us,
                        total_expired = totals.flows_expired,
                        "flow garbage collection"
                    );
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "flow garbage collection failed"),
            Err(e) => tracing::warn!(error = %e, "flow garbage collection task failed"),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(run(args))),
        Command::Cleanup(args) => dataplane::cleanup(&args.pin_root.path)
            .with_context(|| format!("cannot clean up {}", args.pin_root.path.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("datapathd: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. The library's errors already show their source in
/// their own message, so a cause whose text is already there is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["datapathd", "run", "--iface", "veth0"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| match c.command {
            Command::Run(r) => r,
            Command::Cleanup(_) => unreachable!(),
        })
    }

    #[test]
    fn defaults() {
        let r = run_args(&[]).unwrap();
        let c = r.dataplane_config().unwrap();
        assert_eq!(c.interfaces, ["veth0"]);
        assert_eq!(c.maglev_size, 65_537);
        assert_eq!((c.nat_port_min, c.nat_port_max), (1024, 65_535));
        assert_eq!(r.socket, PathBuf::from(datapath_api::DEFAULT_SOCKET));
        assert_eq!(r.state_file, PathBuf::from(DEFAULT_STATE_FILE));
        assert_eq!(c.pin_root, PathBuf::from("/sys/fs/bpf/datapath"));
        assert_eq!(c.xdp_mode, XdpAttachMode::Auto);
    }

    #[test]
    fn invalid_values_are_refused() {
        for (args, want) in [
            (&["--maglev-size", "65536"][..], "not prime"),
            (&["--nat-port-range", "2000-1000"], "MIN is above MAX"),
            (&["--nat-port-range", "0-10"], "not a port"),
            (&["--nat-port-range", "1024"], "expected MIN-MAX"),
            (&["--max-services", "0"], "0"),
            (&["--xdp-mode", "turbo"], "turbo"),
        ] {
            let e = run_args(args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        let r = run_args(&["--max-services", "40000", "--maglev-size", "65537"]).unwrap();
        assert!(r.dataplane_config().is_err(), "too large for one map");
    }

    #[test]
    fn errors_print_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "taken");
        let e = anyhow::Error::new(datapath::Error::io("cannot listen on /x", io))
            .context("cannot serve");
        assert_eq!(one_line(&e), "cannot serve: cannot listen on /x: taken");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(one_line(&e), "outer: inner");
    }

    #[test]
    fn several_interfaces() {
        let r = run_args(&["--iface", "veth1,veth2", "--xdp-mode", "generic"]).unwrap();
        assert_eq!(r.ifaces, ["veth0", "veth1", "veth2"]);
        assert_eq!(XdpAttachMode::from(r.xdp_mode), XdpAttachMode::Generic);
    }
}
