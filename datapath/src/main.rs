//! `datapathd`: parses its arguments and starts the daemon (`datapath::daemon`): the
//! controllers (XDP load balancer, tc policy, conntrack, program statistics) under one
//! supervisor, the HTTP/JSON API that `lb-ctl` talks to, and metrics and probes over HTTP.
use std::{io::IsTerminal, path::PathBuf, process::ExitCode, str::FromStr};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use datapath::{
    config::{self, Overrides, Settings, Source},
    dataplane::{self, XdpAttachMode},
};

const RUN_AFTER_HELP: &str = "\
Configuration: defaults, then the YAML file (--config, default /etc/datapath/config.yaml when
it exists; every key is in deploy/config.example.yaml), then the environment variables named
in brackets, then flags. Several interfaces go comma-separated (DATAPATH_IFACE=eth0,eth1).
Log verbosity follows RUST_LOG (default: info).

Metrics (Prometheus), /healthz and /readyz are served over HTTP on --metrics-listen (default
:9477); /readyz answers 200 once the enabled modules are attached and reconciled.

SIGHUP, or a change of the file, reloads the configuration: it is validated and the difference
applied (interfaces attached or detached, modules enabled or disabled); an invalid one leaves
the running configuration in force and is counted in datapath_config_reload_failures_total.

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
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing the arguments buys nothing"
)]
enum Command {
    /// Attach the load balancer, restore the saved services and serve the API.
    #[command(after_help = RUN_AFTER_HELP)]
    Run(RunArgs),
    /// Detach the XDP program and remove every pin under the pin root.
    Cleanup(CleanupArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// YAML configuration file [default: /etc/datapath/config.yaml, if it exists].
    #[arg(long, value_name = "PATH", env = "DATAPATH_CONFIG")]
    config: Option<PathBuf>,
    /// Interface (or glob pattern) to attach XDP to, client- and backend-facing alike (repeat
    /// for several) [config: interfaces].
    #[arg(
        long = "iface",
        value_name = "IF",
        env = "DATAPATH_IFACE",
        value_delimiter = ','
    )]
    ifaces: Option<Vec<String>>,
    /// Unix socket of the API [config: api_socket; default: /run/datapath/api.sock].
    #[arg(long, value_name = "PATH", env = "DATAPATH_SOCKET")]
    socket: Option<PathBuf>,
    /// Where the declared services are saved; restored on start [config: state_file;
    /// default: /var/lib/datapath/state.json].
    #[arg(long, value_name = "PATH", env = "DATAPATH_STATE_FILE")]
    state_file: Option<PathBuf>,
    /// bpffs directory holding the pinned maps and links [config: pin_root; default:
    /// /sys/fs/bpf/datapath].
    #[arg(long = "pin-root", value_name = "PATH", env = "DATAPATH_PIN_ROOT")]
    pin_root: Option<PathBuf>,
    /// XDP attach mode: auto tries native (driver) mode and falls back to generic [config:
    /// xdp_mode; default: auto].
    #[arg(long, value_enum, env = "DATAPATH_XDP_MODE")]
    xdp_mode: Option<XdpMode>,
    /// Metrics, /healthz and /readyz listener: ADDR:PORT, :PORT or off [config:
    /// metrics_listen; default: :9477].
    #[arg(long, value_name = "ADDR", env = "DATAPATH_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Entries of each service's Maglev table; a prime [config: maps.maglev_size].
    #[arg(long, value_name = "N", env = "DATAPATH_MAGLEV_SIZE", value_parser = parse_maglev_size)]
    maglev_size: Option<u32>,
    /// Services the datapath can hold [config: maps.max_services].
    #[arg(long, value_name = "N", env = "DATAPATH_MAX_SERVICES",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_services: Option<u32>,
    /// Backends the datapath can hold, across all services [config: maps.max_backends].
    #[arg(long, value_name = "N", env = "DATAPATH_MAX_BACKENDS",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_backends: Option<u32>,
    /// Flows the connection table can track (least recently used ones are evicted) [config:
    /// maps.max_flows].
    #[arg(long, value_name = "N", env = "DATAPATH_MAX_FLOWS",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_flows: Option<u32>,
    /// Source ports full-NAT allocates from [config: nat_port_range; default: 1024-65535].
    #[arg(long, value_name = "MIN-MAX", env = "DATAPATH_NAT_PORT_RANGE")]
    nat_port_range: Option<PortRange>,
    /// Milliseconds an established flow reuses its cached route and next-hop MAC before
    /// looking them up again. Neighbour and route changes that netlink announces take effect
    /// on the next packet anyway; this bounds what it does not (the daemon down or
    /// resyncing). 0 looks the route up for every packet [config: lb.fib_cache_ms;
    /// default: 30000].
    #[arg(long, value_name = "MS", env = "DATAPATH_FIB_CACHE_MS",
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    fib_cache_ms: Option<u64>,
    /// Seconds between flow-table garbage-collection sweeps; 0 disables them (the LRU maps
    /// then only evict when full). Timeouts: TCP SYN 60 s, established 6 h, closing 10 s,
    /// UDP and other 60 s [config: gc_interval_seconds; default: 5].
    #[arg(long, value_name = "SECONDS", env = "DATAPATH_GC_INTERVAL")]
    gc_interval: Option<u64>,
    /// Receive buffer of the netlink event socket, in bytes (SO_RCVBUFFORCE; the kernel
    /// doubles it); an overrun costs a full re-dump of interfaces, neighbours and routes
    /// [config: netlink.receive_buffer_bytes; default: 4194304].
    #[arg(long, value_name = "BYTES", env = "DATAPATH_NETLINK_RECEIVE_BUFFER",
          value_parser = clap::value_parser!(u64).range(4096..=(1 << 30)))]
    netlink_receive_buffer: Option<u64>,
    /// Log format on stderr [config: log_format; default: text].
    #[arg(long, value_enum, env = "DATAPATH_LOG_FORMAT")]
    log_format: Option<LogFormat>,
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
          default_value = bpf_common::defaults::PIN_ROOT)]
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

impl From<LogFormat> for config::LogFormat {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Text => config::LogFormat::Text,
            LogFormat::Json => config::LogFormat::Json,
        }
    }
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
        let (min, max) = config::parse_nat_port_range(s)?;
        Ok(PortRange { min, max })
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
    fn overrides(&self) -> Overrides {
        Overrides {
            interfaces: self.ifaces.clone(),
            xdp_mode: self.xdp_mode.map(Into::into),
            api_socket: self.socket.clone(),
            state_file: self.state_file.clone(),
            pin_root: self.pin_root.clone(),
            metrics_listen: self.metrics_listen.clone(),
            log_format: self.log_format.map(Into::into),
            maglev_size: self.maglev_size,
            max_services: self.max_services,
            max_backends: self.max_backends,
            max_flows: self.max_flows,
            nat_port_range: self.nat_port_range.map(|r| (r.min, r.max)),
            fib_cache_ms: self.fib_cache_ms,
            gc_interval_seconds: self.gc_interval,
            netlink_receive_buffer: self.netlink_receive_buffer,
        }
    }

    /// The configuration file: `--config`, else the default path if it exists.
    fn config_file(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            let default = PathBuf::from(config::DEFAULT_CONFIG_FILE);
            default.exists().then_some(default)
        })
    }

    fn settings(&self) -> anyhow::Result<(Settings, Option<Source>)> {
        let source = match self.config_file() {
            Some(path) => Some(Source::read(&path)?),
            None => None,
        };
        let settings = Settings::resolve(source.as_ref(), &self.overrides())?;
        Ok((settings, source))
    }
}

fn init_tracing(format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal; journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        config::LogFormat::Text => builder.init(),
        config::LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (settings, source) = args.settings()?;
    init_tracing(settings.log_format);
    // The file was read before logging was set up: say now which of its keys are deprecated.
    if let Some(src) = &source {
        let (_, deprecated) = Settings::resolve_with_deprecations(Some(src), &args.overrides())?;
        for d in deprecated {
            tracing::warn!(file = %src.path.display(), "{d}");
        }
    }
    datapath::daemon::run(settings, source, args.overrides()).await?;
    Ok(())
}

/// glibc's defaults suit short programs, not a daemon whose syncs free as much as they keep:
/// an arena per thread (up to 8 per CPU) holds freed memory that only its own thread reuses,
/// and the mmap threshold grows after each large free, so later large buffers (a state file,
/// a list answer) land in the heap and stay resident. One arena (the daemon allocates little
/// outside a sync, so its lock is not contended) and a fixed threshold keep the daemon's
/// memory near what it holds (perf/RESULTS.md, 10,000 Services). `MALLOC_ARENA_MAX` in the
/// environment leaves glibc's settings to the operator.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; it runs before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run(_)) && std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        tune_allocator();
    }
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

    fn settings(r: &RunArgs) -> datapath::Result<Settings> {
        Settings::resolve(None, &r.overrides())
    }

    #[test]
    fn defaults() {
        let r = run_args(&[]).unwrap();
        let s = settings(&r).unwrap();
        let c = s.dataplane_config();
        assert_eq!(c.interfaces, ["veth0"]);
        assert_eq!(c.maglev_size, 65_537);
        assert_eq!((c.nat_port_min, c.nat_port_max), (1024, 65_535));
        assert_eq!(s.api_socket, PathBuf::from(datapath_api::DEFAULT_SOCKET));
        assert_eq!(s.lb.state_file, PathBuf::from(config::DEFAULT_STATE_FILE));
        assert_eq!(c.pin_root, PathBuf::from("/sys/fs/bpf/datapath"));
        assert_eq!(c.xdp_mode, XdpAttachMode::Auto);
        assert_eq!(s.metrics_listen, "0.0.0.0:9477".parse().ok());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            "lb:\n  interfaces: [a]\n  maps:\n    max_flows: 100\n    max_services: 7\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let r = run_args(&["--config", path, "--max-flows", "200"]).unwrap();
        let (s, _) = r.settings().unwrap();
        assert_eq!((s.lb.max_flows, s.lb.max_services), (200, 7));
        assert_eq!(s.lb.interfaces, ["veth0"], "--iface beats the file");
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
        assert!(settings(&r).is_err(), "too large for one map");
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
        assert_eq!(r.ifaces.unwrap(), ["veth0", "veth1", "veth2"]);
        assert_eq!(
            XdpAttachMode::from(r.xdp_mode.unwrap()),
            XdpAttachMode::Generic
        );
    }
}
