//! The daemon's configuration: one YAML file (default [`DEFAULT_CONFIG_FILE`]), overridden by
//! environment variables and flags.
//!
//! The file has the daemon-wide keys at the top and one section per controller: `lb` (the XDP
//! load balancer), `conntrack` (the GC of its flow tables), `policy` (the tc policy and its
//! own conntrack) and `prog_stats`; [`Settings`] has the same shape. The previous build's
//! layout (`interfaces`, `maps`, `modules`, ... at the top level) is still read: each old key
//! ([`DEPRECATED_KEYS`]) moves to its section with a warning, and a file giving an old key and
//! its new one is refused, since which value was meant cannot be known.
//!
//! Precedence, lowest first: built-in defaults, the file, `DATAPATH_*` environment variables,
//! command-line flags (`main.rs` turns the last two into an [`Overrides`]). Every key of the
//! file is documented in docs/operations.md and in `deploy/config.example.yaml`.
//!
//! An unknown key, a value of the wrong type or an impossible value (a map size of 0, a
//! non-prime Maglev size, an interface pattern that matches nothing) is an
//! [`Error::Config`] naming the file, the line and the key.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bpf_common::defaults;
use serde::Deserialize;

use crate::{
    dataplane::{DataplaneConfig, XdpAttachMode},
    error::{Error, Result, single_line},
    features::{Feature, Module},
    text,
};

/// Where the daemon looks for its configuration when no `--config` is given.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/datapath/config.yaml";
/// Default state file.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/datapath/state.json";
/// Default metrics listener (all addresses of the node's namespace).
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9477";
/// Default interval of the config file's modification check.
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 1000;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `lb.xdp_mode` in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum XdpModeName {
    Auto,
    Native,
    Generic,
}

impl From<XdpModeName> for XdpAttachMode {
    fn from(m: XdpModeName) -> Self {
        match m {
            XdpModeName::Auto => XdpAttachMode::Auto,
            XdpModeName::Native => XdpAttachMode::Native,
            XdpModeName::Generic => XdpAttachMode::Generic,
        }
    }
}

/// Longest `lb.fib_cache_ms`: a next hop that changed goes unnoticed for at most this long.
const MAX_FIB_CACHE_MS: u64 = 60_000;

/// Keys of the previous build's layout, each with the key that replaces it (old, new). A file
/// may still use them: each is read into its new place with a warning, and a file giving both
/// an old key and its new one is refused. `maps` and `modules` are the sections: an empty one
/// is warned about as a whole.
pub const DEPRECATED_KEYS: &[(&str, &str)] = &[
    ("interfaces", "lb.interfaces"),
    ("xdp_mode", "lb.xdp_mode"),
    ("interface_wait_seconds", "lb.interface_wait_seconds"),
    ("state_file", "lb.state_file"),
    ("nat_port_range", "lb.nat_port_range"),
    ("fib_cache_ms", "lb.fib_cache_ms"),
    ("gc_interval_seconds", "conntrack.gc_interval_seconds"),
    ("maps", "lb.maps"),
    ("maps.maglev_size", "lb.maps.maglev_size"),
    ("maps.max_services", "lb.maps.max_services"),
    ("maps.max_backends", "lb.maps.max_backends"),
    ("maps.max_flows", "lb.maps.max_flows"),
    ("modules", "lb.enabled and prog_stats.enabled"),
    ("modules.lb", "lb.enabled"),
    ("modules.prog_stats", "prog_stats.enabled"),
];

/// A key of the previous layout that a file used, and the key that replaces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deprecated {
    pub old: &'static str,
    pub new: &'static str,
}

impl std::fmt::Display for Deprecated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` is deprecated: use `{}`", self.old, self.new)
    }
}

/// The file's layout: daemon-wide keys, one section per controller, and the previous build's
/// keys (read, warned about and moved into their sections by [`FileConfig::migrate`]). Every
/// field is optional: what the file leaves out keeps its default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    api_socket: Option<PathBuf>,
    pin_root: Option<PathBuf>,
    metrics_listen: Option<String>,
    log_format: Option<LogFormat>,
    features: Option<FeaturesFile>,
    reload: Option<ReloadFile>,
    lb: Option<LbFile>,
    conntrack: Option<ConntrackFile>,
    policy: Option<PolicyFile>,
    prog_stats: Option<ProgStatsFile>,
    netlink: Option<NetlinkFile>,
    service_file: Option<ServiceFileSection>,
    kubernetes: Option<KubernetesFile>,
    socklb: Option<SockLbFile>,
    dns: Option<DnsFile>,
    exec: Option<ExecFile>,
    graph: Option<GraphFile>,
    // The previous layout (see DEPRECATED_KEYS).
    interfaces: Option<Vec<String>>,
    xdp_mode: Option<XdpModeName>,
    interface_wait_seconds: Option<u64>,
    state_file: Option<PathBuf>,
    nat_port_range: Option<String>,
    fib_cache_ms: Option<u64>,
    gc_interval_seconds: Option<u64>,
    maps: Option<MapsFile>,
    modules: Option<ModulesFile>,
}

/// The `lb` section: the XDP load balancer controller.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LbFile {
    enabled: Option<bool>,
    interfaces: Option<Vec<String>>,
    xdp_mode: Option<XdpModeName>,
    interface_wait_seconds: Option<u64>,
    state_file: Option<PathBuf>,
    nat_port_range: Option<String>,
    fib_cache_ms: Option<u64>,
    syn_flood_rate: Option<u64>,
    attach_watchdog_ms: Option<u64>,
    maps: Option<MapsFile>,
}

/// The `netlink` section: the controller that learns interfaces, addresses, neighbours and
/// routes over rtnetlink.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetlinkFile {
    enabled: Option<bool>,
    receive_buffer_bytes: Option<u64>,
}

/// The `service_file` section: the watched services file (docs/service-maps.md).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFileSection {
    path: Option<PathBuf>,
}

/// The `kubernetes` section: Services and EndpointSlices from an API server.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KubernetesFile {
    enabled: Option<bool>,
    kubeconfig: Option<PathBuf>,
    node_name: Option<String>,
    mode: Option<String>,
}

/// The `socklb` section: socket-level load balancing (docs/socket-lb.md).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SockLbFile {
    enabled: Option<bool>,
    cgroup: Option<PathBuf>,
    host_netns_only: Option<bool>,
    opt_out_cgroups: Option<Vec<PathBuf>>,
    event_rate: Option<u64>,
}

/// The `dns` section: names learned from DNS answers (docs/dns.md).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsFile {
    enabled: Option<bool>,
    interfaces: Option<Vec<String>>,
    loopback: Option<bool>,
    capture_rate: Option<u64>,
    snap_bytes: Option<u32>,
    ttl_floor_seconds: Option<u64>,
    ttl_cap_seconds: Option<u64>,
    grace_seconds: Option<u64>,
    max_entries: Option<usize>,
    max_addresses_per_name: Option<usize>,
}

/// The `graph` section: the service dependency graph (docs/graph.md).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GraphFile {
    enabled: Option<bool>,
    max_edges: Option<usize>,
    metrics_edges: Option<usize>,
    web: Option<GraphWebFile>,
}

/// `graph.web`: the web view's listener.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GraphWebFile {
    listen: Option<String>,
}

/// The `exec` section: processes followed through exec, fork and exit (docs/exec.md).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecFile {
    enabled: Option<bool>,
    event_rate: Option<u64>,
    max_processes: Option<usize>,
    exit_grace_seconds: Option<u64>,
    btf_path: Option<PathBuf>,
    max_connections: Option<usize>,
    enforcement: Option<EnforcementFile>,
}

/// `exec.enforcement`: exec and connect rules, off unless configured (docs/exec.md).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnforcementFile {
    mode: Option<String>,
    cgroups: Option<Vec<String>>,
    host_wide: Option<bool>,
    deny_exec: Option<Vec<PathBuf>>,
    deny_connect: Option<Vec<String>>,
}

/// The `conntrack` section: the GC of the load balancer's flow tables.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConntrackFile {
    gc_interval_seconds: Option<u64>,
}

/// The `prog_stats` section: kernel BPF run count/time.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgStatsFile {
    enabled: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    enabled: Option<bool>,
    interfaces: Option<Vec<String>>,
    state_file: Option<PathBuf>,
    gc_interval_seconds: Option<u64>,
    max_flows: Option<u32>,
    event_rate: Option<u64>,
    attach_watchdog_ms: Option<u64>,
    timeouts: Option<TimeoutsFile>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutsFile {
    tcp_syn_seconds: Option<u64>,
    tcp_established_seconds: Option<u64>,
    tcp_closing_seconds: Option<u64>,
    udp_seconds: Option<u64>,
    other_seconds: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapsFile {
    maglev_size: Option<u32>,
    max_services: Option<u32>,
    max_backends: Option<u32>,
    max_flows: Option<u32>,
}

/// The previous layout's `modules` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModulesFile {
    lb: Option<bool>,
    prog_stats: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeaturesFile {
    #[serde(default)]
    force_off: Vec<Feature>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadFile {
    watch: Option<bool>,
    poll_interval_ms: Option<u64>,
}

/// The deprecated key `old` and its replacement, from [`DEPRECATED_KEYS`].
fn deprecated(old: &'static str) -> Deprecated {
    // Every caller passes a listed key (the unit tests use each); unlisted, it names itself.
    let new = DEPRECATED_KEYS
        .iter()
        .find(|(o, _)| *o == old)
        .map_or(old, |(_, n)| n);
    Deprecated { old, new }
}

/// Moves an old key's value into its new place, or refuses the file when both are given.
fn migrate_key<T>(
    src: &Source,
    moved: &mut Vec<Deprecated>,
    old: Option<T>,
    new: &mut Option<T>,
    old_key: &'static str,
) -> Result<()> {
    let Some(value) = old else {
        return Ok(());
    };
    let Deprecated {
        old: old_key,
        new: new_key,
    } = deprecated(old_key);
    if new.is_some() {
        return Err(src.conflict(old_key, new_key));
    }
    *new = Some(value);
    moved.push(deprecated(old_key));
    Ok(())
}

impl FileConfig {
    /// Moves the previous layout's keys into their sections, and says which were used.
    fn migrate(&mut self, src: &Source) -> Result<Vec<Deprecated>> {
        let mut moved = Vec::new();
        let lb = self.lb.get_or_insert_with(LbFile::default);
        let m = &mut moved;
        migrate_key(
            src,
            m,
            self.interfaces.take(),
            &mut lb.interfaces,
            "interfaces",
        )?;
        migrate_key(src, m, self.xdp_mode.take(), &mut lb.xdp_mode, "xdp_mode")?;
        migrate_key(
            src,
            m,
            self.interface_wait_seconds.take(),
            &mut lb.interface_wait_seconds,
            "interface_wait_seconds",
        )?;
        migrate_key(
            src,
            m,
            self.state_file.take(),
            &mut lb.state_file,
            "state_file",
        )?;
        migrate_key(
            src,
            m,
            self.nat_port_range.take(),
            &mut lb.nat_port_range,
            "nat_port_range",
        )?;
        migrate_key(
            src,
            m,
            self.fib_cache_ms.take(),
            &mut lb.fib_cache_ms,
            "fib_cache_ms",
        )?;
        let conntrack = self.conntrack.get_or_insert_with(ConntrackFile::default);
        migrate_key(
            src,
            m,
            self.gc_interval_seconds.take(),
            &mut conntrack.gc_interval_seconds,
            "gc_interval_seconds",
        )?;
        if let Some(old) = self.maps.take() {
            let new = lb.maps.get_or_insert_with(MapsFile::default);
            let before = m.len();
            migrate_key(
                src,
                m,
                old.maglev_size,
                &mut new.maglev_size,
                "maps.maglev_size",
            )?;
            migrate_key(
                src,
                m,
                old.max_services,
                &mut new.max_services,
                "maps.max_services",
            )?;
            migrate_key(
                src,
                m,
                old.max_backends,
                &mut new.max_backends,
                "maps.max_backends",
            )?;
            migrate_key(src, m, old.max_flows, &mut new.max_flows, "maps.max_flows")?;
            // An empty `maps:` still is an old key the operator should rename.
            if m.len() == before {
                m.push(deprecated("maps"));
            }
        }
        if let Some(old) = self.modules.take() {
            let before = m.len();
            migrate_key(src, m, old.lb, &mut lb.enabled, "modules.lb")?;
            let stats = self.prog_stats.get_or_insert_with(ProgStatsFile::default);
            migrate_key(
                src,
                m,
                old.prog_stats,
                &mut stats.enabled,
                "modules.prog_stats",
            )?;
            if m.len() == before {
                m.push(deprecated("modules"));
            }
        }
        Ok(moved)
    }
}

/// Values from the environment and the command line; `None` leaves the file's (or the
/// default) value.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub interfaces: Option<Vec<String>>,
    pub xdp_mode: Option<XdpAttachMode>,
    pub api_socket: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
    pub pin_root: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub log_format: Option<LogFormat>,
    pub maglev_size: Option<u32>,
    pub max_services: Option<u32>,
    pub max_backends: Option<u32>,
    pub max_flows: Option<u32>,
    pub nat_port_range: Option<(u16, u16)>,
    pub fib_cache_ms: Option<u64>,
    pub gc_interval_seconds: Option<u64>,
    pub netlink_receive_buffer: Option<u64>,
}

/// The `lb` section: the XDP load balancer controller.
#[derive(Clone, Debug, PartialEq)]
pub struct LbSettings {
    /// Whether the load balancer runs.
    pub enabled: bool,
    /// Interface names or glob patterns (`*`, `?`) to attach XDP to.
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpAttachMode,
    /// How long to wait at start for configured interfaces to appear.
    pub interface_wait: Duration,
    /// Where declared services are saved.
    pub state_file: PathBuf,
    pub maglev_size: u32,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_flows: u32,
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// How long an established flow reuses its cached route and next hop.
    pub fib_cache: Duration,
    /// New flows per second per CPU above which DSR TCP SYNs make no flow entry; 0: never.
    pub syn_flood_rate: u64,
    /// Between checks that the XDP links are still attached (nobody announces a detach);
    /// zero turns the check off.
    pub attach_watchdog: Duration,
}

impl Default for LbSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interfaces: Vec::new(),
            xdp_mode: XdpAttachMode::Auto,
            interface_wait: Duration::ZERO,
            state_file: PathBuf::from(DEFAULT_STATE_FILE),
            maglev_size: defaults::MAGLEV_SIZE,
            max_services: defaults::MAX_SERVICES,
            max_backends: defaults::MAX_BACKENDS,
            max_flows: defaults::MAX_FLOWS,
            nat_port_min: defaults::NAT_PORT_MIN,
            nat_port_max: defaults::NAT_PORT_MAX,
            fib_cache: Duration::from_nanos(defaults::FIB_CACHE_NS),
            syn_flood_rate: defaults::SYN_FLOOD_RATE,
            attach_watchdog: DEFAULT_ATTACH_WATCHDOG,
        }
    }
}

/// The `conntrack` section: garbage collection of the load balancer's flow tables (the
/// policy's table has its own, under `policy`).
#[derive(Clone, Debug, PartialEq)]
pub struct ConntrackSettings {
    /// Between flow-table garbage-collection sweeps; zero disables them.
    pub gc_interval: Duration,
}

impl Default for ConntrackSettings {
    fn default() -> Self {
        Self {
            gc_interval: crate::gc::DEFAULT_SWEEP_INTERVAL,
        }
    }
}

/// The `policy` section: the tc (TCX) policy controller and its conntrack.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySettings {
    /// Whether the policy module runs.
    pub enabled: bool,
    /// Interface names or glob patterns to attach the TCX programs to (those present).
    pub interfaces: Vec<String>,
    /// Where the applied policy is saved (restored on start); `None`: `policy.json` beside
    /// the load balancer's state file.
    pub state_file: Option<PathBuf>,
    /// Between conntrack garbage-collection sweeps; zero disables them.
    pub gc_interval: Duration,
    /// Entries of the conntrack table `CT_FLOWS`.
    pub max_flows: u32,
    /// Flow events per second and CPU.
    pub event_rate: u64,
    /// Idle timeouts of tracked flows.
    pub timeouts: conntrack::Timeouts,
    /// See [`LbSettings::attach_watchdog`]: the same for the TCX links.
    pub attach_watchdog: Duration,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            enabled: false,
            interfaces: Vec::new(),
            state_file: None,
            gc_interval: Duration::from_secs(5),
            max_flows: bpf_common::policy::defaults::MAX_CT_FLOWS,
            event_rate: bpf_common::policy::defaults::EVENT_RATE,
            timeouts: conntrack::Timeouts::DEFAULT,
            attach_watchdog: DEFAULT_ATTACH_WATCHDOG,
        }
    }
}

/// The `netlink` section.
#[derive(Clone, Debug, PartialEq)]
pub struct NetlinkSettings {
    /// Whether the netlink controller runs. Off, interfaces are only found at start and
    /// reloads, and backends' neighbours are not managed.
    pub enabled: bool,
    /// The event socket's receive buffer (SO_RCVBUFFORCE; the kernel doubles it). The
    /// default rmem is small, and a burst of route changes overruns it: each overrun costs a
    /// full re-dump.
    pub receive_buffer_bytes: u64,
}

/// The `service_file` section.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceFileSettings {
    /// The services file; `None`: the file source is off.
    pub path: Option<PathBuf>,
}

/// The `kubernetes` section.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KubernetesSettings {
    pub enabled: bool,
    /// A kubeconfig file; `None`: the in-cluster service account, else `$KUBECONFIG` or
    /// `~/.kube/config` (kube's inference).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (traffic policies Local, topology hints, NodePort addresses);
    /// `None`: `$NODE_NAME` (the downward API in deploy/), else the host name.
    pub node_name: Option<String>,
    /// How the Services' VIPs forward.
    pub mode: datapath_api::ForwardingMode,
}

/// The `socklb` section.
#[derive(Clone, Debug, PartialEq)]
pub struct SockLbSettings {
    pub enabled: bool,
    /// The cgroup v2 directory the programs attach to; `None`: the cgroup2 mount's root, found
    /// in `/proc/self/mountinfo`.
    pub cgroup: Option<PathBuf>,
    /// Translate only sockets of the daemon's own network namespace (the host's), so in-pod
    /// proxies keep seeing VIPs.
    pub host_netns_only: bool,
    /// Cgroup directories whose processes (and their descendants') are left alone.
    pub opt_out_cgroups: Vec<PathBuf>,
    /// Decision events per second per CPU (0: none).
    pub event_rate: u64,
}

impl Default for SockLbSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            cgroup: None,
            host_netns_only: false,
            opt_out_cgroups: Vec::new(),
            event_rate: bpf_common::sock::DEFAULT_EVENT_RATE,
        }
    }
}

/// The `dns` section.
#[derive(Clone, Debug, PartialEq)]
pub struct DnsSettings {
    pub enabled: bool,
    /// Interfaces (names or patterns) whose ingress and egress are captured.
    pub interfaces: Vec<String>,
    /// Capture `lo` too (ingress: every loopback packet crosses it once), for answers of local
    /// stub resolvers.
    pub loopback: bool,
    /// Responses captured per second per CPU (0: none).
    pub capture_rate: u64,
    /// Most bytes of a packet copied.
    pub snap_bytes: u32,
    /// An answer lives at least this long (TTL 0 is common), and at most `ttl_cap`.
    pub ttl_floor: Duration,
    pub ttl_cap: Duration,
    /// How long an entry outlives the last live flow to its address seen past its TTL.
    pub grace: Duration,
    /// Entries in the store (least recently answered evicted first).
    pub max_entries: usize,
    /// Addresses one client keeps for one name (the oldest evicted first).
    pub max_addresses_per_name: usize,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            interfaces: Vec::new(),
            loopback: true,
            capture_rate: bpf_common::dns::DEFAULT_CAPTURE_RATE,
            snap_bytes: bpf_common::dns::DEFAULT_SNAP_LEN,
            ttl_floor: Duration::from_secs(5),
            ttl_cap: Duration::from_secs(86_400),
            grace: Duration::from_secs(60),
            max_entries: 100_000,
            max_addresses_per_name: 64,
        }
    }
}

/// The `exec` section.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecSettings {
    pub enabled: bool,
    /// Events per second per CPU (0: none).
    pub event_rate: u64,
    /// Processes in the cache (exited ones evicted first).
    pub max_processes: usize,
    /// How long an exited process stays known.
    pub exit_grace: Duration,
    /// The kernel's BTF, where the tracer's struct offsets are read.
    pub btf_path: PathBuf,
    /// Connections kept attributed to their process (the oldest forgotten first).
    pub max_connections: usize,
    pub enforcement: crate::exec::rules::Enforcement,
}

impl Default for ExecSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            event_rate: bpf_common::trace::DEFAULT_EVENT_RATE,
            max_processes: 65_536,
            exit_grace: Duration::from_secs(30),
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
            max_connections: 65_536,
            enforcement: crate::exec::rules::Enforcement::default(),
        }
    }
}

/// The `graph` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphSettings {
    pub enabled: bool,
    /// Edges held over the longest window (the idlest forgotten first).
    pub max_edges: usize,
    /// Edges exported as Prometheus series (the busiest over 5 minutes).
    pub metrics_edges: usize,
    /// The web view's listener (`None`: off). Loopback only: the API is a Unix socket, and the
    /// page has no authentication.
    pub web_listen: Option<std::net::SocketAddr>,
}

/// Largest `graph.max_edges`.
pub const GRAPH_MAX_EDGES: usize = 1_000_000;
/// Largest `graph.metrics_edges`.
pub const GRAPH_MAX_METRICS_EDGES: usize = 10_000;

impl Default for GraphSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_edges: 10_000,
            metrics_edges: 100,
            web_listen: None,
        }
    }
}

/// Default of `netlink.receive_buffer_bytes`: 4 MiB.
pub const DEFAULT_NETLINK_RECEIVE_BUFFER: u64 = 4 << 20;
/// Smallest and largest `netlink.receive_buffer_bytes`.
pub const NETLINK_RECEIVE_BUFFER_RANGE: (u64, u64) = (4096, 1 << 30);
/// Default of `lb.attach_watchdog_ms` and `policy.attach_watchdog_ms`.
pub const DEFAULT_ATTACH_WATCHDOG: Duration = Duration::from_secs(2);

impl Default for NetlinkSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            receive_buffer_bytes: DEFAULT_NETLINK_RECEIVE_BUFFER,
        }
    }
}

/// The `prog_stats` section: kernel BPF run count/time. Off by default: while the kernel's
/// statistics are on, every BPF program on the node pays two clock reads per run (about 30% of
/// the XDP forwarding rate measured here, perf/RESULTS.md).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ProgStatsSettings {
    pub enabled: bool,
}

/// The configuration in force: every value resolved. Daemon-wide values at the top, then one
/// section per controller.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub api_socket: PathBuf,
    pub pin_root: PathBuf,
    /// `None`: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub force_off: Vec<Feature>,
    pub watch: bool,
    pub poll_interval: Duration,
    pub lb: LbSettings,
    pub conntrack: ConntrackSettings,
    pub policy: PolicySettings,
    pub prog_stats: ProgStatsSettings,
    pub netlink: NetlinkSettings,
    pub service_file: ServiceFileSettings,
    pub kubernetes: KubernetesSettings,
    pub socklb: SockLbSettings,
    pub dns: DnsSettings,
    pub exec: ExecSettings,
    pub graph: GraphSettings,
    /// The file the values came from, to name its lines in errors found later (an interface
    /// pattern that matches nothing when a controller starts or reloads).
    pub origin: Origin,
}

/// Where a [`Settings`] came from. Not part of its value: two settings with equal values are
/// equal whatever file (or none) they were read from.
#[derive(Clone, Debug, Default)]
pub struct Origin(pub Option<Source>);

impl PartialEq for Origin {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Origin {
    pub fn source(&self) -> Option<&Source> {
        self.0.as_ref()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            api_socket: PathBuf::from(datapath_api::DEFAULT_SOCKET),
            pin_root: PathBuf::from(defaults::PIN_ROOT),
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().ok(),
            log_format: LogFormat::Text,
            force_off: Vec::new(),
            watch: true,
            poll_interval: Duration::from_millis(DEFAULT_POLL_INTERVAL_MS),
            lb: LbSettings::default(),
            conntrack: ConntrackSettings::default(),
            policy: PolicySettings::default(),
            prog_stats: ProgStatsSettings::default(),
            netlink: NetlinkSettings::default(),
            service_file: ServiceFileSettings::default(),
            kubernetes: KubernetesSettings::default(),
            socklb: SockLbSettings::default(),
            dns: DnsSettings::default(),
            exec: ExecSettings::default(),
            graph: GraphSettings::default(),
            origin: Origin::default(),
        }
    }
}

/// A configuration file as read: its path and text, for locating keys in errors.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    text: String,
}

impl Source {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read config file {}", path.display()), e))?;
        Ok(Self {
            path: path.to_path_buf(),
            text,
        })
    }

    /// From text (tests).
    pub fn from_text(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            text: text.into(),
        }
    }

    fn error(&self, key: &str, reason: impl Into<String>) -> Error {
        let segments: Vec<&str> = key.split('.').collect();
        Error::Config {
            file: self.path.clone(),
            line: text::line_of(&self.text, &segments),
            key: single_line(key),
            reason: single_line(&reason.into()),
        }
    }

    /// Like [`Self::error`], for an item of a list key (`lb.interfaces`): the line of the
    /// item.
    fn item_error(&self, key: &str, item: &str, reason: impl Into<String>) -> Error {
        let segments: Vec<&str> = key.split('.').collect();
        let line = text::line_of(&self.text, &segments).map(|start| {
            self.text
                .lines()
                .enumerate()
                .skip(start - 1)
                .find(|(_, l)| l.contains(item))
                .map_or(start, |(i, _)| i + 1)
        });
        Error::Config {
            file: self.path.clone(),
            line,
            key: single_line(key),
            reason: single_line(&reason.into()),
        }
    }

    /// A file giving both the deprecated key `old` and its replacement `new`: refused at the
    /// new key, since which of the two values was meant cannot be known.
    fn conflict(&self, old: &str, new: &str) -> Error {
        let segments: Vec<&str> = old.split('.').collect();
        let at = text::line_of(&self.text, &segments)
            .map(|l| format!(" (line {l})"))
            .unwrap_or_default();
        self.error(
            new,
            format!("also given as the deprecated `{old}`{at}: keep only `{new}`"),
        )
    }

    /// The key the load balancer's interfaces were written under: the deprecated top-level
    /// `interfaces` when the file has it, else `lb.interfaces`.
    fn lb_interfaces_key(&self) -> &'static str {
        let old = self
            .text
            .lines()
            .any(|l| l.starts_with("interfaces:") || l.starts_with("\"interfaces\":"));
        if old { "interfaces" } else { "lb.interfaces" }
    }

    fn parse(&self) -> Result<FileConfig> {
        if self.text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        let de = serde_yaml_ng::Deserializer::from_str(&self.text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let (line, key, reason) = text::yaml_error(&e, false);
            Error::Config {
                file: self.path.clone(),
                line,
                key: single_line(&key),
                reason: single_line(&reason),
            }
        })
    }
}

/// The full-NAT source port range, `MIN-MAX` (file key `lb.nat_port_range` and
/// `--nat-port-range`): [`text::parse_port_range`] plus the rules of a range to allocate from.
/// Port 0 is no source port a packet can carry, and the dash is required so that a lone port
/// (more likely a typo than a range of one) is not taken as the whole range.
pub fn parse_nat_port_range(s: &str) -> std::result::Result<(u16, u16), String> {
    if !s.contains('-') {
        return Err(format!("expected MIN-MAX, e.g. 1024-65535, not {s:?}"));
    }
    let (min, max) = text::parse_port_range(s)?;
    if min == 0 {
        return Err(format!(
            "{s:?}: 0 is not a port full-NAT can allocate (1 to 65535)"
        ));
    }
    Ok((min, max))
}

/// `off` disables the listener; otherwise an `ADDR:PORT` (or `:PORT` for every address).
pub fn parse_listen(s: &str) -> std::result::Result<Option<SocketAddr>, String> {
    let s = s.trim();
    if s == "off" || s.is_empty() {
        return Ok(None);
    }
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse()
        .map(Some)
        .map_err(|_| format!("{s:?} is not ADDR:PORT, :PORT or off"))
}

impl Settings {
    /// Defaults, then `file`, then `overrides`, checked. Each deprecated key the file uses is
    /// logged as a warning naming its replacement.
    pub fn resolve(file: Option<&Source>, overrides: &Overrides) -> Result<Self> {
        let (settings, deprecated) = Self::resolve_with_deprecations(file, overrides)?;
        for d in &deprecated {
            let file = file.map(|f| f.path.display().to_string());
            tracing::warn!(file, "{d}");
        }
        Ok(settings)
    }

    /// [`Self::resolve`], returning the deprecated keys the file used instead of logging them.
    pub fn resolve_with_deprecations(
        file: Option<&Source>,
        overrides: &Overrides,
    ) -> Result<(Self, Vec<Deprecated>)> {
        let mut s = Settings::default();
        let deprecated = match file {
            Some(src) => s.apply_file(src)?,
            None => Vec::new(),
        };
        s.apply_overrides(overrides)?;
        s.origin = Origin(file.cloned());
        Ok((s, deprecated))
    }

    fn apply_file(&mut self, src: &Source) -> Result<Vec<Deprecated>> {
        let mut f = src.parse()?;
        let moved = f.migrate(src)?;
        // Errors name the key as the file wrote it: the old one when it used the old layout.
        let key = |new: &'static str| -> &'static str {
            moved.iter().find(|d| d.new == new).map_or(new, |d| d.old)
        };
        if let Some(v) = f.api_socket {
            self.api_socket = v;
        }
        if let Some(v) = f.pin_root {
            self.pin_root = v;
        }
        if let Some(v) = f.metrics_listen {
            self.metrics_listen = parse_listen(&v).map_err(|e| src.error("metrics_listen", e))?;
        }
        if let Some(v) = f.log_format {
            self.log_format = v;
        }
        if let Some(features) = f.features {
            self.force_off = features.force_off;
        }
        if let Some(r) = f.reload {
            if let Some(v) = r.watch {
                self.watch = v;
            }
            if let Some(v) = r.poll_interval_ms {
                if v == 0 {
                    return Err(src.error("reload.poll_interval_ms", "must be at least 1"));
                }
                self.poll_interval = Duration::from_millis(v);
            }
        }
        if let Some(lb) = f.lb {
            self.apply_lb_file(src, lb, &key)?;
        }
        if let Some(v) = f.conntrack.and_then(|c| c.gc_interval_seconds) {
            self.conntrack.gc_interval = Duration::from_secs(v);
        }
        if let Some(p) = f.policy {
            self.apply_policy_file(src, p)?;
        }
        if let Some(v) = f.prog_stats.and_then(|p| p.enabled) {
            self.prog_stats.enabled = v;
        }
        if let Some(n) = f.netlink {
            if let Some(v) = n.enabled {
                self.netlink.enabled = v;
            }
            if let Some(v) = n.receive_buffer_bytes {
                check_receive_buffer(v)
                    .map_err(|e| src.error("netlink.receive_buffer_bytes", e))?;
                self.netlink.receive_buffer_bytes = v;
            }
        }
        if let Some(sf) = f.service_file {
            if let Some(p) = &sf.path
                && p.as_os_str().is_empty()
            {
                return Err(src.error("service_file.path", "must not be empty"));
            }
            self.service_file.path = sf.path;
        }
        if let Some(k) = f.kubernetes {
            if let Some(v) = k.enabled {
                self.kubernetes.enabled = v;
            }
            self.kubernetes.kubeconfig = k.kubeconfig.or(self.kubernetes.kubeconfig.take());
            if let Some(n) = k.node_name {
                if n.is_empty() {
                    return Err(src.error("kubernetes.node_name", "must not be empty"));
                }
                self.kubernetes.node_name = Some(n);
            }
            if let Some(m) = k.mode {
                self.kubernetes.mode = m
                    .parse()
                    .map_err(|e: String| src.error("kubernetes.mode", e))?;
            }
        }
        if let Some(s) = f.socklb {
            if let Some(v) = s.enabled {
                self.socklb.enabled = v;
            }
            if let Some(c) = s.cgroup {
                if !c.is_absolute() {
                    return Err(src.error("socklb.cgroup", "must be an absolute path"));
                }
                self.socklb.cgroup = Some(c);
            }
            if let Some(v) = s.host_netns_only {
                self.socklb.host_netns_only = v;
            }
            if let Some(list) = s.opt_out_cgroups {
                if let Some(bad) = list.iter().find(|c| !c.is_absolute()) {
                    return Err(src.error(
                        "socklb.opt_out_cgroups",
                        format!("{} is not an absolute path", bad.display()),
                    ));
                }
                self.socklb.opt_out_cgroups = list;
            }
            if let Some(r) = s.event_rate {
                if r > 1_000_000 {
                    return Err(src.error("socklb.event_rate", "at most 1000000 per second"));
                }
                self.socklb.event_rate = r;
            }
        }
        if let Some(d) = f.dns {
            self.apply_dns(src, d)?;
        }
        if let Some(e) = f.exec {
            self.apply_exec(src, e)?;
        }
        if let Some(g) = f.graph {
            self.apply_graph(src, g)?;
        }
        if let Err(e) = self.dataplane_config().validate() {
            // The only rule across keys left: the Maglev tables of every service in one map.
            let old_maps = moved
                .iter()
                .any(|d| d.old.split('.').next() == Some("maps"));
            let maps = if old_maps { "maps" } else { "lb.maps" };
            return Err(src.error(maps, e.to_string()));
        }
        Ok(moved)
    }

    fn apply_lb_file(
        &mut self,
        src: &Source,
        f: LbFile,
        key: &dyn Fn(&'static str) -> &'static str,
    ) -> Result<()> {
        let out = &mut self.lb;
        if let Some(v) = f.enabled {
            out.enabled = v;
        }
        if let Some(v) = f.interfaces {
            check_patterns(src, key("lb.interfaces"), &v)?;
            out.interfaces = v;
        }
        if let Some(v) = f.xdp_mode {
            out.xdp_mode = v.into();
        }
        if let Some(v) = f.interface_wait_seconds {
            out.interface_wait = Duration::from_secs(v);
        }
        if let Some(v) = f.state_file {
            out.state_file = v;
        }
        if let Some(v) = f.nat_port_range {
            (out.nat_port_min, out.nat_port_max) =
                parse_nat_port_range(&v).map_err(|e| src.error(key("lb.nat_port_range"), e))?;
        }
        if let Some(v) = f.fib_cache_ms {
            if v > MAX_FIB_CACHE_MS {
                return Err(src.error(
                    key("lb.fib_cache_ms"),
                    format!("{v} is more than {MAX_FIB_CACHE_MS} (a minute)"),
                ));
            }
            out.fib_cache = Duration::from_millis(v);
        }
        if let Some(v) = f.syn_flood_rate {
            out.syn_flood_rate = v;
        }
        if let Some(v) = f.attach_watchdog_ms {
            out.attach_watchdog = Duration::from_millis(v);
        }
        if let Some(maps) = f.maps {
            for (new, value, target) in [
                (
                    "lb.maps.maglev_size",
                    maps.maglev_size,
                    &mut out.maglev_size,
                ),
                (
                    "lb.maps.max_services",
                    maps.max_services,
                    &mut out.max_services,
                ),
                (
                    "lb.maps.max_backends",
                    maps.max_backends,
                    &mut out.max_backends,
                ),
                ("lb.maps.max_flows", maps.max_flows, &mut out.max_flows),
            ] {
                if let Some(v) = value {
                    if v == 0 {
                        return Err(src.error(key(new), "a map size of 0 cannot hold anything"));
                    }
                    *target = v;
                }
            }
            if maps.maglev_size.is_some() && !lb_core::maglev::is_prime(out.maglev_size) {
                return Err(src.error(
                    key("lb.maps.maglev_size"),
                    format!(
                        "{} is not prime; Maglev needs a prime table size (e.g. 251, 4093, 65537)",
                        out.maglev_size
                    ),
                ));
            }
        }
        Ok(())
    }

    fn apply_policy_file(&mut self, src: &Source, p: PolicyFile) -> Result<()> {
        let out = &mut self.policy;
        if let Some(v) = p.enabled {
            out.enabled = v;
        }
        if let Some(v) = p.interfaces {
            check_patterns(src, "policy.interfaces", &v)?;
            out.interfaces = v;
        }
        if let Some(v) = p.state_file {
            out.state_file = Some(v);
        }
        if let Some(v) = p.gc_interval_seconds {
            out.gc_interval = Duration::from_secs(v);
        }
        if let Some(v) = p.max_flows {
            if v == 0 {
                return Err(src.error("policy.max_flows", "a map size of 0 cannot hold anything"));
            }
            out.max_flows = v;
        }
        if let Some(v) = p.event_rate {
            out.event_rate = v;
        }
        if let Some(v) = p.attach_watchdog_ms {
            out.attach_watchdog = Duration::from_millis(v);
        }
        if let Some(t) = p.timeouts {
            const NS: u64 = 1_000_000_000;
            for (key, value, target) in [
                (
                    "policy.timeouts.tcp_syn_seconds",
                    t.tcp_syn_seconds,
                    &mut out.timeouts.tcp_syn_ns,
                ),
                (
                    "policy.timeouts.tcp_established_seconds",
                    t.tcp_established_seconds,
                    &mut out.timeouts.tcp_established_ns,
                ),
                (
                    "policy.timeouts.tcp_closing_seconds",
                    t.tcp_closing_seconds,
                    &mut out.timeouts.tcp_closing_ns,
                ),
                (
                    "policy.timeouts.udp_seconds",
                    t.udp_seconds,
                    &mut out.timeouts.udp_ns,
                ),
                (
                    "policy.timeouts.other_seconds",
                    t.other_seconds,
                    &mut out.timeouts.other_ns,
                ),
            ] {
                if let Some(v) = value {
                    if v == 0 || v > 30 * 86_400 {
                        return Err(
                            src.error(key, format!("{v} is not from 1 to 2592000 (30 days)"))
                        );
                    }
                    *target = v * NS;
                }
            }
        }
        Ok(())
    }

    /// Where the applied policy is saved.
    pub fn policy_state_file(&self) -> PathBuf {
        self.policy
            .state_file
            .clone()
            .unwrap_or_else(|| self.lb.state_file.with_file_name("policy.json"))
    }

    fn apply_overrides(&mut self, o: &Overrides) -> Result<()> {
        let lb = &mut self.lb;
        if let Some(v) = &o.interfaces {
            lb.interfaces = v.clone();
        }
        if let Some(v) = o.xdp_mode {
            lb.xdp_mode = v;
        }
        if let Some(v) = &o.state_file {
            lb.state_file = v.clone();
        }
        if let Some(v) = o.maglev_size {
            lb.maglev_size = v;
        }
        if let Some(v) = o.max_services {
            lb.max_services = v;
        }
        if let Some(v) = o.max_backends {
            lb.max_backends = v;
        }
        if let Some(v) = o.max_flows {
            lb.max_flows = v;
        }
        if let Some((min, max)) = o.nat_port_range {
            lb.nat_port_min = min;
            lb.nat_port_max = max;
        }
        if let Some(v) = o.fib_cache_ms {
            if v > MAX_FIB_CACHE_MS {
                return Err(Error::InvalidArgument(format!(
                    "--fib-cache-ms: {v} is more than {MAX_FIB_CACHE_MS} (a minute)"
                )));
            }
            lb.fib_cache = Duration::from_millis(v);
        }
        if let Some(v) = o.gc_interval_seconds {
            self.conntrack.gc_interval = Duration::from_secs(v);
        }
        if let Some(v) = o.netlink_receive_buffer {
            check_receive_buffer(v)
                .map_err(|e| Error::InvalidArgument(format!("--netlink-receive-buffer: {e}")))?;
            self.netlink.receive_buffer_bytes = v;
        }
        if let Some(v) = &o.api_socket {
            self.api_socket = v.clone();
        }
        if let Some(v) = &o.pin_root {
            self.pin_root = v.clone();
        }
        if let Some(v) = &o.metrics_listen {
            self.metrics_listen = parse_listen(v)
                .map_err(|e| Error::InvalidArgument(format!("--metrics-listen: {e}")))?;
        }
        if let Some(v) = o.log_format {
            self.log_format = v;
        }
        self.dataplane_config().validate()
    }

    /// The dataplane's part of the settings, with `lb.interfaces` as given (patterns
    /// unexpanded).
    pub fn dataplane_config(&self) -> DataplaneConfig {
        let lb = &self.lb;
        DataplaneConfig {
            pin_root: self.pin_root.clone(),
            interfaces: lb.interfaces.clone(),
            xdp_mode: lb.xdp_mode,
            maglev_size: lb.maglev_size,
            max_services: lb.max_services,
            max_backends: lb.max_backends,
            max_flows: lb.max_flows,
            nat_port_min: lb.nat_port_min,
            nat_port_max: lb.nat_port_max,
            fib_cache_ns: lb.fib_cache.as_nanos() as u64,
            syn_flood_rate: lb.syn_flood_rate,
        }
    }

    /// Whether `module` is enabled by the configuration.
    pub fn module_enabled(&self, module: Module) -> bool {
        match module {
            Module::Lb => self.lb.enabled,
            Module::ProgStats => self.prog_stats.enabled,
        }
    }

    /// Keys whose change needs a restart: they size kernel maps, are compiled into the loaded
    /// program, or are sockets and files already open. A reload that changes one is refused.
    /// The keys are the current layout's, whichever layout the files used.
    pub fn restart_only_changes(&self, new: &Settings) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |changed: bool, key: &'static str| {
            if changed {
                out.push(key);
            }
        };
        check(self.api_socket != new.api_socket, "api_socket");
        check(self.pin_root != new.pin_root, "pin_root");
        check(self.metrics_listen != new.metrics_listen, "metrics_listen");
        check(self.log_format != new.log_format, "log_format");
        let (a, b) = (&self.lb, &new.lb);
        check(a.state_file != b.state_file, "lb.state_file");
        check(a.maglev_size != b.maglev_size, "lb.maps.maglev_size");
        check(a.max_services != b.max_services, "lb.maps.max_services");
        check(a.max_backends != b.max_backends, "lb.maps.max_backends");
        check(a.max_flows != b.max_flows, "lb.maps.max_flows");
        check(
            (a.nat_port_min, a.nat_port_max) != (b.nat_port_min, b.nat_port_max),
            "lb.nat_port_range",
        );
        check(a.fib_cache != b.fib_cache, "lb.fib_cache_ms");
        check(a.syn_flood_rate != b.syn_flood_rate, "lb.syn_flood_rate");
        check(
            self.conntrack.gc_interval != new.conntrack.gc_interval,
            "conntrack.gc_interval_seconds",
        );
        let (a, b) = (&self.policy, &new.policy);
        check(a.state_file != b.state_file, "policy.state_file");
        check(a.max_flows != b.max_flows, "policy.max_flows");
        check(a.event_rate != b.event_rate, "policy.event_rate");
        check(self.netlink != new.netlink, "netlink");
        check(self.kubernetes != new.kubernetes, "kubernetes");
        check(self.socklb != new.socklb, "socklb");
        check(self.dns != new.dns, "dns");
        check(self.exec != new.exec, "exec");
        check(self.graph != new.graph, "graph");
        out
    }
}

impl Settings {
    /// The `graph` section over the defaults.
    fn apply_graph(&mut self, src: &Source, g: GraphFile) -> Result<()> {
        let graph = &mut self.graph;
        if let Some(v) = g.enabled {
            graph.enabled = v;
        }
        if let Some(n) = g.max_edges {
            if !(1..=GRAPH_MAX_EDGES).contains(&n) {
                return Err(src.error(
                    "graph.max_edges",
                    format!("between 1 and {GRAPH_MAX_EDGES}"),
                ));
            }
            graph.max_edges = n;
        }
        if let Some(n) = g.metrics_edges {
            if n > GRAPH_MAX_METRICS_EDGES {
                return Err(src.error(
                    "graph.metrics_edges",
                    format!("at most {GRAPH_MAX_METRICS_EDGES} (label cardinality)"),
                ));
            }
            graph.metrics_edges = n;
        }
        if let Some(listen) = g.web.and_then(|w| w.listen) {
            let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
                src.error(
                    "graph.web.listen",
                    format!("{listen:?} is not an address:port such as 127.0.0.1:9466"),
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(src.error(
                    "graph.web.listen",
                    format!(
                        "{addr} is not a loopback address: the web view has no authentication, \
                         reach it through an SSH tunnel or kubectl port-forward"
                    ),
                ));
            }
            graph.web_listen = Some(addr);
        }
        Ok(())
    }

    /// The `exec` section over the defaults.
    fn apply_exec(&mut self, src: &Source, e: ExecFile) -> Result<()> {
        let exec = &mut self.exec;
        if let Some(v) = e.enabled {
            exec.enabled = v;
        }
        if let Some(r) = e.event_rate {
            if r > 1_000_000 {
                return Err(src.error("exec.event_rate", "at most 1000000 per second"));
            }
            exec.event_rate = r;
        }
        if let Some(n) = e.max_processes {
            if !(16..=10_000_000).contains(&n) {
                return Err(src.error("exec.max_processes", "between 16 and 10000000"));
            }
            exec.max_processes = n;
        }
        if let Some(v) = e.exit_grace_seconds {
            exec.exit_grace = Duration::from_secs(v);
        }
        if let Some(p) = e.btf_path {
            if !p.is_absolute() {
                return Err(src.error("exec.btf_path", "must be an absolute path"));
            }
            exec.btf_path = p;
        }
        if let Some(n) = e.max_connections {
            if !(16..=10_000_000).contains(&n) {
                return Err(src.error("exec.max_connections", "between 16 and 10000000"));
            }
            exec.max_connections = n;
        }
        if let Some(f) = e.enforcement {
            let mut en = exec.enforcement.clone();
            if let Some(m) = f.mode {
                en.mode = m
                    .parse()
                    .map_err(|e: String| src.error("exec.enforcement.mode", &e))?;
            }
            if let Some(v) = f.host_wide {
                en.host_wide = v;
            }
            if let Some(c) = f.cgroups {
                en.cgroups = c;
            }
            if let Some(d) = f.deny_exec {
                en.deny_exec = d;
            }
            if let Some(d) = f.deny_connect {
                en.deny_connect = d
                    .iter()
                    .map(|r| r.parse())
                    .collect::<std::result::Result<_, String>>()
                    .map_err(|e| src.error("exec.enforcement.deny_connect", &e))?;
            }
            en.validate()
                .map_err(|(field, e)| src.error(&format!("exec.enforcement.{field}"), &e))?;
            exec.enforcement = en;
        }
        Ok(())
    }

    /// The `dns` section over the defaults.
    fn apply_dns(&mut self, src: &Source, d: DnsFile) -> Result<()> {
        let dns = &mut self.dns;
        if let Some(v) = d.enabled {
            dns.enabled = v;
        }
        if let Some(list) = d.interfaces {
            check_patterns(src, "dns.interfaces", &list)?;
            dns.interfaces = list;
        }
        if let Some(v) = d.loopback {
            dns.loopback = v;
        }
        if let Some(r) = d.capture_rate {
            if r > 1_000_000 {
                return Err(src.error("dns.capture_rate", "at most 1000000 per second"));
            }
            dns.capture_rate = r;
        }
        if let Some(n) = d.snap_bytes {
            let max = bpf_common::dns::MAX_SNAP_LEN;
            if !(512..=max).contains(&n) {
                return Err(src.error("dns.snap_bytes", format!("between 512 and {max}")));
            }
            dns.snap_bytes = n;
        }
        let seconds = Duration::from_secs;
        if let Some(v) = d.ttl_floor_seconds {
            dns.ttl_floor = seconds(v);
        }
        if let Some(v) = d.ttl_cap_seconds {
            if v == 0 {
                return Err(src.error("dns.ttl_cap_seconds", "must be at least 1"));
            }
            dns.ttl_cap = seconds(v);
        }
        if dns.ttl_floor > dns.ttl_cap {
            let key = if d.ttl_floor_seconds.is_some() {
                "dns.ttl_floor_seconds"
            } else {
                "dns.ttl_cap_seconds"
            };
            return Err(src.error(key, "the TTL floor is above the TTL cap"));
        }
        if let Some(v) = d.grace_seconds {
            dns.grace = seconds(v);
        }
        if let Some(n) = d.max_entries {
            if !(1..=10_000_000).contains(&n) {
                return Err(src.error("dns.max_entries", "between 1 and 10000000"));
            }
            dns.max_entries = n;
        }
        if let Some(n) = d.max_addresses_per_name {
            if !(1..=4096).contains(&n) {
                return Err(src.error("dns.max_addresses_per_name", "between 1 and 4096"));
            }
            dns.max_addresses_per_name = n;
        }
        Ok(())
    }
}

fn check_receive_buffer(v: u64) -> std::result::Result<(), String> {
    let (min, max) = NETLINK_RECEIVE_BUFFER_RANGE;
    if (min..=max).contains(&v) {
        Ok(())
    } else {
        Err(format!("{v} is not between {min} and {max} bytes"))
    }
}

/// Interface names and patterns of a list key: non-empty, and no longer than an interface
/// name can be (15 bytes).
fn check_patterns(src: &Source, key: &str, patterns: &[String]) -> Result<()> {
    for pattern in patterns {
        if pattern.trim().is_empty() || pattern.len() > 15 {
            return Err(src.item_error(
                key,
                pattern,
                format!("{pattern:?} is not an interface name or pattern"),
            ));
        }
    }
    Ok(())
}

/// Names of the interfaces of this network namespace.
pub fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            names.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    names.sort();
    names
}

/// Re-exported for the users that still import it from here (`tests/fuzz_policy.rs`).
pub use crate::text::glob_match;

/// Expands `patterns` against `existing` interface names. A pattern that matches nothing is
/// an error naming it (with its line when it came from `file`).
pub fn expand_interfaces(
    patterns: &[String],
    existing: &[String],
    file: Option<&Source>,
) -> Result<Vec<String>> {
    if patterns.is_empty() {
        let reason = "no interface configured (set `lb.interfaces` or --iface)";
        return Err(match file {
            Some(src) => src.error(src.lb_interfaces_key(), reason),
            None => Error::InvalidArgument(reason.into()),
        });
    }
    let mut out: Vec<String> = Vec::new();
    for pattern in patterns {
        let matched: Vec<&String> = existing.iter().filter(|n| glob_match(pattern, n)).collect();
        if matched.is_empty() {
            let reason = format!(
                "interface pattern {pattern:?} matches no interface (have: {})",
                existing.join(", ")
            );
            return Err(match file {
                Some(src) => src.item_error(src.lb_interfaces_key(), pattern, reason),
                None => Error::InvalidArgument(reason),
            });
        }
        for name in matched {
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
    }
    Ok(out)
}

/// Whether `pattern` is a glob (`*`, `?`) rather than one interface's name.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Patterns of `patterns` that match nothing in `existing`.
pub fn unmatched<'a>(patterns: &'a [String], existing: &[String]) -> Vec<&'a str> {
    patterns
        .iter()
        .filter(|p| !existing.iter().any(|n| glob_match(p, n)))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests;
