//! The daemon's configuration: one YAML file (default [`DEFAULT_CONFIG_FILE`]), overridden by
//! environment variables and flags.
//!
//! Precedence, lowest first: built-in defaults, the file, `DATAPATH_*` environment variables,
//! command-line flags (`main.rs` turns the last two into an [`Overrides`]). Every key of the
//! file is documented in the README and in `deploy/config.example.yaml`.
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

/// `xdp_mode` in the file.
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

/// Longest `fib_cache_ms`: a next hop that changed goes unnoticed for at most this long.
const MAX_FIB_CACHE_MS: u64 = 60_000;

/// The file's layout. Every field is optional: what the file leaves out keeps its default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    interfaces: Option<Vec<String>>,
    xdp_mode: Option<XdpModeName>,
    interface_wait_seconds: Option<u64>,
    api_socket: Option<PathBuf>,
    state_file: Option<PathBuf>,
    pin_root: Option<PathBuf>,
    metrics_listen: Option<String>,
    log_format: Option<LogFormat>,
    nat_port_range: Option<String>,
    fib_cache_ms: Option<u64>,
    gc_interval_seconds: Option<u64>,
    maps: Option<MapsFile>,
    modules: Option<ModulesFile>,
    features: Option<FeaturesFile>,
    reload: Option<ReloadFile>,
    policy: Option<PolicyFile>,
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

/// The `policy` section: the tc (TCX) policy module and its conntrack.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySettings {
    /// Whether the policy module runs.
    pub enabled: bool,
    /// Interface names or glob patterns to attach the TCX programs to (those present).
    pub interfaces: Vec<String>,
    /// Where the applied policy is saved (restored on start); `None`: `policy.json` beside
    /// the state file.
    pub state_file: Option<PathBuf>,
    /// Between conntrack garbage-collection sweeps; zero disables them.
    pub gc_interval: Duration,
    /// Entries of the conntrack table `CT_FLOWS`.
    pub max_flows: u32,
    /// Flow events per second and CPU.
    pub event_rate: u64,
    /// Idle timeouts of tracked flows.
    pub timeouts: conntrack::Timeouts,
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
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapsFile {
    maglev_size: Option<u32>,
    max_services: Option<u32>,
    max_backends: Option<u32>,
    max_flows: Option<u32>,
}

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
}

/// The configuration in force: every value resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Interface names or glob patterns (`*`, `?`) to attach XDP to.
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpAttachMode,
    /// How long to wait at start for configured interfaces to appear.
    pub interface_wait: Duration,
    pub api_socket: PathBuf,
    pub state_file: PathBuf,
    pub pin_root: PathBuf,
    /// `None`: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub maglev_size: u32,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_flows: u32,
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// How long an established flow reuses its cached route and next hop.
    pub fib_cache: Duration,
    /// Between flow-table garbage-collection sweeps; zero disables them.
    pub gc_interval: Duration,
    pub lb_enabled: bool,
    pub prog_stats_enabled: bool,
    pub force_off: Vec<Feature>,
    pub watch: bool,
    pub poll_interval: Duration,
    pub policy: PolicySettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            xdp_mode: XdpAttachMode::Auto,
            interface_wait: Duration::ZERO,
            api_socket: PathBuf::from(datapath_api::DEFAULT_SOCKET),
            state_file: PathBuf::from(DEFAULT_STATE_FILE),
            pin_root: PathBuf::from(defaults::PIN_ROOT),
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().ok(),
            log_format: LogFormat::Text,
            maglev_size: defaults::MAGLEV_SIZE,
            max_services: defaults::MAX_SERVICES,
            max_backends: defaults::MAX_BACKENDS,
            max_flows: defaults::MAX_FLOWS,
            nat_port_min: defaults::NAT_PORT_MIN,
            nat_port_max: defaults::NAT_PORT_MAX,
            fib_cache: Duration::from_nanos(defaults::FIB_CACHE_NS),
            gc_interval: crate::gc::DEFAULT_SWEEP_INTERVAL,
            lb_enabled: true,
            prog_stats_enabled: true,
            force_off: Vec::new(),
            watch: true,
            poll_interval: Duration::from_millis(DEFAULT_POLL_INTERVAL_MS),
            policy: PolicySettings::default(),
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

    /// Like [`Self::error`], for an item of a list key (`interfaces`): the line of the item.
    fn item_error(&self, key: &str, item: &str, reason: impl Into<String>) -> Error {
        let line = text::line_of(&self.text, &[key]).map(|start| {
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

    fn parse(&self) -> Result<FileConfig> {
        if self.text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        let de = serde_yaml_ng::Deserializer::from_str(&self.text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let line = e.inner().location().map(|l| l.line());
            let mut key = e.path().to_string();
            let mut reason = e.inner().to_string();
            // serde_yaml_ng appends " at line L column C"; the error says it separately.
            if let Some(at) = reason.find(" at line ") {
                reason.truncate(at);
            }
            // An unknown key is reported at its parent: name the key itself.
            if let Some(rest) = reason.strip_prefix("unknown field `")
                && let Some(end) = rest.find('`')
            {
                let name = &rest[..end];
                if key == "." || key.is_empty() {
                    key = name.to_string();
                } else if !key.ends_with(name) {
                    key = format!("{key}.{name}");
                }
            }
            if key == "." {
                key = "(top level)".to_string();
            }
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
    /// Defaults, then `file`, then `overrides`, checked.
    pub fn resolve(file: Option<&Source>, overrides: &Overrides) -> Result<Self> {
        let mut s = Settings::default();
        if let Some(src) = file {
            s.apply_file(src)?;
        }
        s.apply_overrides(overrides)?;
        Ok(s)
    }

    fn apply_file(&mut self, src: &Source) -> Result<()> {
        let f = src.parse()?;
        if let Some(v) = f.interfaces {
            for pattern in &v {
                if pattern.trim().is_empty() || pattern.len() > 15 {
                    return Err(src.item_error(
                        "interfaces",
                        pattern,
                        format!("{pattern:?} is not an interface name or pattern"),
                    ));
                }
            }
            self.interfaces = v;
        }
        if let Some(v) = f.xdp_mode {
            self.xdp_mode = v.into();
        }
        if let Some(v) = f.interface_wait_seconds {
            self.interface_wait = Duration::from_secs(v);
        }
        if let Some(v) = f.api_socket {
            self.api_socket = v;
        }
        if let Some(v) = f.state_file {
            self.state_file = v;
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
        if let Some(v) = f.nat_port_range {
            (self.nat_port_min, self.nat_port_max) =
                parse_nat_port_range(&v).map_err(|e| src.error("nat_port_range", e))?;
        }
        if let Some(v) = f.fib_cache_ms {
            if v > MAX_FIB_CACHE_MS {
                return Err(src.error(
                    "fib_cache_ms",
                    format!("{v} is more than {MAX_FIB_CACHE_MS} (a minute)"),
                ));
            }
            self.fib_cache = Duration::from_millis(v);
        }
        if let Some(v) = f.gc_interval_seconds {
            self.gc_interval = Duration::from_secs(v);
        }
        if let Some(maps) = f.maps {
            for (key, value, target) in [
                ("maps.maglev_size", maps.maglev_size, &mut self.maglev_size),
                (
                    "maps.max_services",
                    maps.max_services,
                    &mut self.max_services,
                ),
                (
                    "maps.max_backends",
                    maps.max_backends,
                    &mut self.max_backends,
                ),
                ("maps.max_flows", maps.max_flows, &mut self.max_flows),
            ] {
                if let Some(v) = value {
                    if v == 0 {
                        return Err(src.error(key, "a map size of 0 cannot hold anything"));
                    }
                    *target = v;
                }
            }
            if maps.maglev_size.is_some() && !lb_core::maglev::is_prime(self.maglev_size) {
                return Err(src.error(
                    "maps.maglev_size",
                    format!(
                        "{} is not prime; Maglev needs a prime table size (e.g. 251, 4093, 65537)",
                        self.maglev_size
                    ),
                ));
            }
        }
        if let Some(m) = f.modules {
            if let Some(v) = m.lb {
                self.lb_enabled = v;
            }
            if let Some(v) = m.prog_stats {
                self.prog_stats_enabled = v;
            }
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
        if let Some(p) = f.policy {
            self.apply_policy_file(src, p)?;
        }
        if let Err(e) = self.dataplane_config().validate() {
            return Err(src.error("maps", e.to_string()));
        }
        Ok(())
    }

    fn apply_policy_file(&mut self, src: &Source, p: PolicyFile) -> Result<()> {
        let out = &mut self.policy;
        if let Some(v) = p.enabled {
            out.enabled = v;
        }
        if let Some(v) = p.interfaces {
            for pattern in &v {
                if pattern.trim().is_empty() || pattern.len() > 15 {
                    return Err(src.item_error(
                        "policy.interfaces",
                        pattern,
                        format!("{pattern:?} is not an interface name or pattern"),
                    ));
                }
            }
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
            .unwrap_or_else(|| self.state_file.with_file_name("policy.json"))
    }

    fn apply_overrides(&mut self, o: &Overrides) -> Result<()> {
        if let Some(v) = &o.interfaces {
            self.interfaces = v.clone();
        }
        if let Some(v) = o.xdp_mode {
            self.xdp_mode = v;
        }
        if let Some(v) = &o.api_socket {
            self.api_socket = v.clone();
        }
        if let Some(v) = &o.state_file {
            self.state_file = v.clone();
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
        if let Some(v) = o.maglev_size {
            self.maglev_size = v;
        }
        if let Some(v) = o.max_services {
            self.max_services = v;
        }
        if let Some(v) = o.max_backends {
            self.max_backends = v;
        }
        if let Some(v) = o.max_flows {
            self.max_flows = v;
        }
        if let Some((min, max)) = o.nat_port_range {
            self.nat_port_min = min;
            self.nat_port_max = max;
        }
        if let Some(v) = o.fib_cache_ms {
            if v > MAX_FIB_CACHE_MS {
                return Err(Error::InvalidArgument(format!(
                    "--fib-cache-ms: {v} is more than {MAX_FIB_CACHE_MS} (a minute)"
                )));
            }
            self.fib_cache = Duration::from_millis(v);
        }
        if let Some(v) = o.gc_interval_seconds {
            self.gc_interval = Duration::from_secs(v);
        }
        self.dataplane_config().validate()
    }

    /// The dataplane's part of the settings, with `interfaces` as given (patterns unexpanded).
    pub fn dataplane_config(&self) -> DataplaneConfig {
        DataplaneConfig {
            pin_root: self.pin_root.clone(),
            interfaces: self.interfaces.clone(),
            xdp_mode: self.xdp_mode,
            maglev_size: self.maglev_size,
            max_services: self.max_services,
            max_backends: self.max_backends,
            max_flows: self.max_flows,
            nat_port_min: self.nat_port_min,
            nat_port_max: self.nat_port_max,
            fib_cache_ns: self.fib_cache.as_nanos() as u64,
        }
    }

    /// Whether `module` is enabled by the configuration.
    pub fn module_enabled(&self, module: Module) -> bool {
        match module {
            Module::Lb => self.lb_enabled,
            Module::ProgStats => self.prog_stats_enabled,
        }
    }

    /// Keys whose change needs a restart: they size kernel maps, are compiled into the loaded
    /// program, or are sockets and files already open. A reload that changes one is refused.
    pub fn restart_only_changes(&self, new: &Settings) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |changed: bool, key: &'static str| {
            if changed {
                out.push(key);
            }
        };
        check(self.api_socket != new.api_socket, "api_socket");
        check(self.state_file != new.state_file, "state_file");
        check(self.pin_root != new.pin_root, "pin_root");
        check(self.metrics_listen != new.metrics_listen, "metrics_listen");
        check(self.log_format != new.log_format, "log_format");
        check(self.maglev_size != new.maglev_size, "maps.maglev_size");
        check(self.max_services != new.max_services, "maps.max_services");
        check(self.max_backends != new.max_backends, "maps.max_backends");
        check(self.max_flows != new.max_flows, "maps.max_flows");
        check(
            (self.nat_port_min, self.nat_port_max) != (new.nat_port_min, new.nat_port_max),
            "nat_port_range",
        );
        check(self.fib_cache != new.fib_cache, "fib_cache_ms");
        check(self.gc_interval != new.gc_interval, "gc_interval_seconds");
        check(
            self.policy.state_file != new.policy.state_file,
            "policy.state_file",
        );
        check(
            self.policy.max_flows != new.policy.max_flows,
            "policy.max_flows",
        );
        check(
            self.policy.event_rate != new.policy.event_rate,
            "policy.event_rate",
        );
        out
    }
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
        let reason = "no interface configured (set `interfaces` or --iface)";
        return Err(match file {
            Some(src) => src.error("interfaces", reason),
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
                Some(src) => src.item_error("interfaces", pattern, reason),
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

/// Patterns of `patterns` that match nothing in `existing`.
pub fn unmatched<'a>(patterns: &'a [String], existing: &[String]) -> Vec<&'a str> {
    patterns
        .iter()
        .filter(|p| !existing.iter().any(|n| glob_match(p, n)))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> Result<Settings> {
        Settings::resolve(
            Some(&Source::from_text("/etc/datapath/config.yaml", text)),
            &Overrides::default(),
        )
    }

    fn err(text: &str) -> (Option<usize>, String, String) {
        match resolve(text).unwrap_err() {
            Error::Config {
                line, key, reason, ..
            } => (line, key, reason),
            other => panic!("not a config error: {other}"),
        }
    }

    #[test]
    fn full_example_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/config.example.yaml"
        ))
        .unwrap();
        let s = resolve(&text).unwrap();
        assert_eq!(s.interfaces, ["eth0", "eth1"]);
        assert_eq!(s.metrics_listen, "0.0.0.0:9477".parse().ok());
        assert!(s.lb_enabled);
    }

    #[test]
    fn precedence_defaults_file_overrides() {
        let src = Source::from_text(
            "c.yaml",
            "interfaces: [a, b]\nmaps:\n  max_flows: 1000\n  max_services: 8\n",
        );
        let s = Settings::resolve(Some(&src), &Overrides::default()).unwrap();
        assert_eq!((s.max_flows, s.max_services), (1000, 8));
        assert_eq!(s.max_backends, defaults::MAX_BACKENDS);
        let o = Overrides {
            max_flows: Some(2000),
            interfaces: Some(vec!["c".into()]),
            ..Overrides::default()
        };
        let s = Settings::resolve(Some(&src), &o).unwrap();
        assert_eq!((s.max_flows, s.max_services), (2000, 8));
        assert_eq!(s.interfaces, ["c"]);
    }

    #[test]
    fn errors_name_line_and_key() {
        assert_eq!(
            err("interfaces: [a]\nmaps:\n  max_flows: 0\n"),
            (
                Some(3),
                "maps.max_flows".into(),
                "a map size of 0 cannot hold anything".into()
            )
        );
        let (line, key, reason) = err("interfaces: [a]\nmaps:\n  max_flowz: 10\n");
        assert_eq!((line, key.as_str()), (Some(3), "maps.max_flowz"));
        assert!(reason.contains("unknown field `max_flowz`"), "{reason}");
        let (line, key, reason) = err("interfaces: [a]\ncolour: red\n");
        assert_eq!((line, key.as_str()), (Some(2), "colour"));
        assert!(reason.contains("unknown field"), "{reason}");
        let (line, key, reason) = err("interfaces: [a]\nmaps:\n  max_flows: many\n");
        assert_eq!((line, key.as_str()), (Some(3), "maps.max_flows"));
        assert!(reason.contains("invalid type"), "{reason}");
        let (line, key, _) = err("interfaces: [a]\nmaps:\n  maglev_size: 100\n");
        assert_eq!((line, key.as_str()), (Some(3), "maps.maglev_size"));
        let (line, key, _) = err("xdp_mode: turbo\n");
        assert_eq!((line, key.as_str()), (Some(1), "xdp_mode"));
        let (line, key, _) = err("features:\n  force_off: [lsm, warp]\n");
        assert_eq!((line, key.as_str()), (Some(2), "features.force_off[1]"));
        let (line, key, _) = err("a: 1\nnat_port_range: 9-3\n");
        assert_eq!((line, key.as_str()), (Some(1), "a"));
        let (line, key, _) = err("nat_port_range: 9-3\n");
        assert_eq!((line, key.as_str()), (Some(1), "nat_port_range"));
    }

    #[test]
    fn interface_patterns() {
        let have: Vec<String> = ["lo", "eth0", "eth1", "lbc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let got = expand_interfaces(&["eth*".into(), "lbc".into()], &have, None).unwrap();
        assert_eq!(got, ["eth0", "eth1", "lbc"]);
        let src = Source::from_text("c.yaml", "interfaces:\n  - eth0\n  - wlan*\n");
        match expand_interfaces(&["eth0".into(), "wlan*".into()], &have, Some(&src)) {
            Err(Error::Config { line, key, .. }) => {
                assert_eq!((line, key.as_str()), (Some(3), "interfaces"))
            }
            other => panic!("{other:?}"),
        }
        assert!(glob_match("e?h*", "eth12"));
        assert!(!glob_match("eth", "eth0"));
    }

    #[test]
    fn policy_section() {
        let s = resolve(
            "policy:\n  enabled: true\n  interfaces: [\"ep*\"]\n  gc_interval_seconds: 1\n  timeouts:\n    udp_seconds: 2\n",
        )
        .unwrap();
        assert!(s.policy.enabled);
        assert_eq!(s.policy.interfaces, ["ep*"]);
        assert_eq!(s.policy.gc_interval, Duration::from_secs(1));
        assert_eq!(s.policy.timeouts.udp_ns, 2_000_000_000);
        assert_eq!(
            s.policy.timeouts.tcp_established_ns,
            conntrack::Timeouts::DEFAULT.tcp_established_ns
        );
        assert_eq!(
            s.policy_state_file(),
            PathBuf::from("/var/lib/datapath/policy.json")
        );
        let (line, key, reason) = err("policy:\n  enabled: true\n  timeouts:\n    udp_secs: 2\n");
        assert_eq!((line, key.as_str()), (Some(4), "policy.timeouts.udp_secs"));
        assert!(reason.contains("unknown field"), "{reason}");
        let (line, key, _) = err("policy:\n  timeouts:\n    udp_seconds: 0\n");
        assert_eq!(
            (line, key.as_str()),
            (Some(3), "policy.timeouts.udp_seconds")
        );
        let a = resolve("policy:\n  max_flows: 10\n").unwrap();
        let b = resolve("policy:\n  max_flows: 20\n  interfaces: [x]\n").unwrap();
        assert_eq!(a.restart_only_changes(&b), ["policy.max_flows"]);
    }

    #[test]
    fn reload_refuses_restart_only_keys() {
        let a = resolve("interfaces: [a]\n").unwrap();
        let b = resolve("interfaces: [a, b]\nmaps:\n  max_flows: 77\n").unwrap();
        assert_eq!(a.restart_only_changes(&b), ["maps.max_flows"]);
    }
}
