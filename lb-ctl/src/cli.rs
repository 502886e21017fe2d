//! The command line, and its translation into API requests, checked before anything is sent.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use datapath_api::{
    AddBackend, ApplyPolicy, BackendKey, BackendState, CreateService, CtFilter, DnsNamesQuery,
    FlowsQuery, ForwardingMode, IpProtocol, Protocol, ServiceKey, UpdateBackend,
};

use crate::error::{Error, Result};

const AFTER_HELP: &str = "\
Addresses are ADDR:PORT; IPv6 ones in brackets: [2001:db8::10]:80.

Exit codes:
  0  success
  1  datapathd failed (dataplane, state file, internal error) or broke off the exchange
  2  invalid argument (found by lb-ctl, in the command line, or by datapathd)
  3  datapathd not reachable (socket missing, connection refused)
  4  service or backend not found
  5  service or backend already exists
  6  capacity exhausted (--max-services / --max-backends of datapathd)
  7  the module serving the command is off (lb-ctl status says why)
  8  the service belongs to another source (services file, Kubernetes); --force overrides";

/// Operate datapathd's XDP load balancer: services (VIP:PORT), their backends, counters.
#[derive(Debug, Parser)]
#[command(name = "lb-ctl", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// datapathd's API socket.
    #[arg(long, global = true, value_name = "PATH", env = "LB_CTL_SOCKET",
          default_value = datapath_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Output format: aligned tables for people, the API's JSON for scripts; `dot` (Graphviz)
    /// for `lb-ctl graph` only.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// With a change to a service or its backends: change it even though the services file or
    /// Kubernetes owns it (refused with exit code 8 otherwise). Its source puts it back at its
    /// next change of that service.
    #[arg(long, global = true)]
    pub force: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Dot,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add, remove and inspect services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Add, remove, drain and weigh a service's backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Packets and bytes per service and backend, and the datapath's verdict counters.
    Stats,
    /// The daemon's modules (and why one is off), probed kernel features, interfaces, reloads.
    Status,
    /// What the netlink controller learned of the node: interfaces (and what is attached),
    /// addresses, neighbours and routes.
    Node,
    /// The service sources (the services file, Kubernetes): whether each one synced, when,
    /// its errors, and what it skipped, could not apply or does not route as asked.
    Sources,
    /// The socket load balancer: whether it runs, the cgroup its programs are attached to,
    /// its outcome counters, sockets per service and the latest decisions.
    Socklb,
    /// The tc (TCX) policy: apply a policy file, show it with its counters, delete it.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The conntrack: list, count, flush tracked flows, of the policy module's table (`policy`)
    /// and of the load balancer's flow table (`lb`), which hold the same records.
    #[command(subcommand)]
    Conntrack(ConntrackCommand),
    /// Flow events (opened, logged, closed, denied, cut, expired): the recent ones, or live
    /// with --follow (one JSON object a line with -o json).
    Flows(FlowsArgs),
    /// Names learned from the DNS answers crossing the node (the `dns` module): the capture's
    /// counters, the name store, the names of an address.
    #[command(subcommand)]
    Dns(DnsCommand),
    /// Processes the exec module follows (exec, fork and exit through BTF tracepoints): the
    /// cache, one process, live events, the enforcement rules, the tracer's counters.
    #[command(subcommand)]
    Proc(ProcCommand),
    /// The service dependency graph: who called whom over a window, with connections, bytes,
    /// handshake RTT, failures and the programs that connected (`-o dot` for Graphviz).
    Graph(GraphArgs),
}

#[derive(Debug, clap::Args)]
pub struct GraphArgs {
    /// The window: 1m, 5m or 1h.
    #[arg(long, value_name = "WINDOW", default_value = datapath_api::DEFAULT_GRAPH_WINDOW,
          value_parser = ["1m", "5m", "1h"])]
    pub window: String,
    /// Only edges with an end in this Kubernetes namespace.
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// Leave out nodes by id, label, address or DNS name (comma-separated, or repeated).
    #[arg(long, value_name = "NODE", value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// At most this many edges, the busiest first.
    #[arg(long, value_name = "N", value_parser = number_in(1usize, 1_000_000))]
    pub top: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum ProcCommand {
    /// The processes in the cache, by pid (every filter given must match).
    #[command(visible_alias = "ls")]
    List {
        #[arg(long, value_name = "PID")]
        pid: Option<u32>,
        /// The cgroup v2 id (the cgroup directory's inode number).
        #[arg(long, value_name = "ID")]
        cgroup_id: Option<u64>,
    },
    /// One process (every one of that pid the cache holds: pids are reused).
    Show {
        #[arg(value_name = "PID")]
        pid: u32,
    },
    /// Whether the module runs, the tracer's counters, the cache's figures.
    Status,
    /// Exec, fork, exit and connect events as they happen (one JSON object a line with
    /// -o json), until --count, --timeout or Ctrl-C.
    Follow {
        /// Stop after this many events.
        #[arg(long, value_name = "N", allow_negative_numbers = true,
              value_parser = number_in(0u64, u64::MAX))]
        count: Option<u64>,
        /// Stop after this many seconds (datapathd stops at one day).
        #[arg(long, value_name = "SECONDS", allow_negative_numbers = true,
              value_parser = number_in(0u64, u64::MAX))]
        timeout: Option<u64>,
        /// Only events of processes in this cgroup (its id, the directory's inode number).
        #[arg(long, value_name = "ID")]
        cgroup_id: Option<u64>,
    },
    /// The enforcement (exec.enforcement): mode, cgroups, hooks, each rule and its matches.
    Rules,
}

#[derive(Debug, Subcommand)]
pub enum DnsCommand {
    /// Whether the module runs, where it captures, answers, parse errors by reason, losses,
    /// the store's entries and evictions.
    Status,
    /// Learned names, by address then client (every filter given must match).
    #[command(visible_alias = "ls")]
    List {
        /// The learned address.
        #[arg(long, value_name = "IP")]
        address: Option<String>,
        /// Who asked.
        #[arg(long, value_name = "IP")]
        client: Option<String>,
        /// A name of the entry (the name asked for, or one of its CNAMEs).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// The names of one address, as each client that asked was told.
    Lookup {
        /// An IPv4 or IPv6 address.
        #[arg(value_name = "ADDR")]
        address: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Apply a policy file (YAML, format in the README) whole. An invalid file is refused
    /// with its line and the reason, and the policy in force stays.
    Apply {
        /// The policy file.
        #[arg(short = 'f', long = "file", value_name = "FILE.yaml")]
        file: PathBuf,
    },
    /// The policy in force, its endpoints, rules and their counters.
    #[command(visible_alias = "ls")]
    List,
    /// Remove the policy: every policed interface passes everything again.
    #[command(visible_alias = "rm")]
    Delete,
}

/// Filters of `conntrack list` and `conntrack flush`: every one given must match.
#[derive(Debug, Default, Args)]
pub struct CtFilterArgs {
    /// Either end's IPv4 address.
    #[arg(long, value_name = "IP")]
    pub address: Option<String>,
    /// Either end's port.
    #[arg(long, value_name = "PORT", allow_negative_numbers = true,
          value_parser = number_in(0u16, u16::MAX))]
    pub port: Option<u16>,
    /// The flow's protocol (any case).
    #[arg(long, value_name = "PROTO", value_enum, ignore_case = true)]
    pub protocol: Option<CtProto>,
    /// The flow's state as `conntrack list` shows it (any case; `closed` is also accepted
    /// for `close`).
    #[arg(long, value_name = "STATE", value_enum, ignore_case = true)]
    pub state: Option<CtState>,
    /// One table only (any case).
    #[arg(long, value_name = "TABLE", value_enum, ignore_case = true)]
    pub table: Option<CtTable>,
}

/// Protocols of tracked flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CtProto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl From<CtProto> for IpProtocol {
    fn from(p: CtProto) -> Self {
        match p {
            CtProto::Tcp => IpProtocol::TCP,
            CtProto::Udp => IpProtocol::UDP,
            CtProto::Icmp => IpProtocol::ICMP,
            CtProto::Icmpv6 => IpProtocol::ICMPV6,
        }
    }
}

/// The conntrack states, named as the daemon shows them (`conntrack::state_name`), in lower
/// case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CtState {
    /// TCP, first seen mid-stream (no SYN): e.g. a load-balancer flow re-created by its next
    /// packet after a flush.
    #[value(name = "none")]
    None,
    /// TCP, SYN seen.
    #[value(name = "syn_sent")]
    SynSent,
    /// TCP, SYN+ACK seen.
    #[value(name = "syn_recv")]
    SynRecv,
    /// TCP, handshake completed.
    #[value(name = "established")]
    Established,
    /// TCP, the opening side sent FIN.
    #[value(name = "fin_wait")]
    FinWait,
    /// TCP, the other side sent FIN.
    #[value(name = "close_wait")]
    CloseWait,
    /// TCP, both sides sent FIN.
    #[value(name = "time_wait")]
    TimeWait,
    /// TCP, reset (alias: closed).
    #[value(name = "close", alias = "closed")]
    Close,
    /// UDP and ICMP, no reply yet.
    #[value(name = "new")]
    New,
    /// UDP and ICMP, answered.
    #[value(name = "replied")]
    Replied,
}

impl From<CtState> for datapath_api::CtState {
    fn from(s: CtState) -> Self {
        use datapath_api::CtState as S;
        match s {
            CtState::None => S::None,
            CtState::SynSent => S::SynSent,
            CtState::SynRecv => S::SynRecv,
            CtState::Established => S::Established,
            CtState::FinWait => S::FinWait,
            CtState::CloseWait => S::CloseWait,
            CtState::TimeWait => S::TimeWait,
            CtState::Close => S::Close,
            CtState::New => S::New,
            CtState::Replied => S::Replied,
        }
    }
}

/// The two conntrack tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CtTable {
    /// The tc programs' CT_FLOWS.
    Policy,
    /// The load balancer's LB_FLOWS.
    Lb,
}

impl From<CtTable> for datapath_api::CtTable {
    fn from(t: CtTable) -> Self {
        match t {
            CtTable::Policy => datapath_api::CtTable::Policy,
            CtTable::Lb => datapath_api::CtTable::Lb,
        }
    }
}

/// A value parser for a number from `min` to `max` whose error says so.
pub fn number_in<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |s: &str| match s.parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(format!("accepted: a whole number from {min} to {max}")),
    }
}

#[derive(Debug, Subcommand)]
pub enum ConntrackCommand {
    /// Tracked flows with their state, packets and bytes per direction, age and idle time.
    #[command(visible_alias = "ls")]
    List(CtFilterArgs),
    /// Entries and capacity, entries by state and protocol, garbage collection, flow events
    /// received and lost, timeouts.
    Stats,
    /// Remove tracked flows (those matching the filters; all without one).
    Flush(CtFilterArgs),
}

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Follow new events as they happen instead of listing the recent ones.
    #[arg(long)]
    pub follow: bool,
    /// With --follow: stop after this many events.
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = number_in(0u64, u64::MAX))]
    pub count: Option<u64>,
    /// With --follow: stop after this many seconds (datapathd stops at one day).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true,
          value_parser = number_in(0u64, u64::MAX))]
    pub timeout: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Add a service; it has no backend until you add one (packets to it are dropped).
    Add {
        /// The service's VIP:PORT.
        #[arg(value_name = "VIP:PORT")]
        service: String,
        /// The service's L4 protocol.
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        proto: Proto,
        /// full-nat: rewrite destination and source, replies return through the balancer.
        /// dsr: rewrite the MAC only, backends hold the VIP and reply directly.
        #[arg(long, value_enum, default_value_t = Mode::FullNat)]
        mode: Mode,
        /// Source address for full-NAT (default: per backend, the address the kernel would use
        /// to reach it).
        #[arg(long, value_name = "IP")]
        snat_addr: Option<String>,
    },
    /// Remove a service and all its backends.
    #[command(visible_alias = "rm")]
    Remove(ServiceArg),
    /// List services and their backends.
    #[command(visible_alias = "ls")]
    List,
    /// Show one service and its backends.
    Show(ServiceArg),
}

#[derive(Debug, Args)]
pub struct ServiceArg {
    /// The service's VIP:PORT.
    #[arg(value_name = "VIP:PORT")]
    pub service: String,
    /// The service's L4 protocol.
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    pub proto: Proto,
}

#[derive(Debug, Args)]
pub struct BackendArg {
    /// The service's VIP:PORT.
    #[arg(value_name = "VIP:PORT")]
    pub service: String,
    /// The backend's ADDR:PORT.
    #[arg(value_name = "ADDR:PORT")]
    pub backend: String,
    /// The service's L4 protocol.
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    pub proto: Proto,
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a service.
    Add {
        #[command(flatten)]
        target: BackendArg,
        /// Relative share of new flows (1 or more).
        #[arg(
            long,
            value_name = "N",
            default_value = "1",
            allow_negative_numbers = true
        )]
        weight: String,
    },
    /// Remove a backend; its established flows move to the remaining backends.
    #[command(visible_alias = "rm")]
    Remove(BackendArg),
    /// Stop sending new flows to a backend; its established flows stay.
    Drain(BackendArg),
    /// Send new flows to a drained backend again.
    Activate(BackendArg),
    /// Change a backend's weight.
    SetWeight {
        #[command(flatten)]
        target: BackendArg,
        /// New weight (1 or more).
        #[arg(value_name = "WEIGHT", allow_negative_numbers = true)]
        weight: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

impl From<Proto> for Protocol {
    fn from(p: Proto) -> Self {
        match p {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    FullNat,
    Dsr,
}

impl From<Mode> for ForwardingMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::FullNat => ForwardingMode::FullNat,
            Mode::Dsr => ForwardingMode::Dsr,
        }
    }
}

/// One API request, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    ServiceAdd(CreateService),
    ServiceRemove(ServiceKey),
    ServiceList,
    ServiceShow(ServiceKey),
    BackendAdd(ServiceKey, AddBackend),
    BackendRemove(ServiceKey, BackendKey),
    BackendUpdate(ServiceKey, BackendKey, UpdateBackend),
    Stats,
    Status,
    Node,
    Sources,
    SockLb,
    /// The policy file's text.
    PolicyApply(ApplyPolicy),
    PolicyList,
    PolicyDelete,
    ConntrackList(CtFilter),
    ConntrackStats,
    ConntrackFlush(CtFilter),
    /// `follow` false: the recent events; true: follow them.
    Flows(FlowsQuery),
    DnsStatus,
    DnsList(DnsNamesQuery),
    ProcList(datapath_api::ProcQuery),
    /// `proc show`: an error when the cache has no such pid.
    ProcShow(u32),
    ProcStatus,
    ProcFollow(datapath_api::ProcEventsQuery),
    ProcRules,
    /// `lb-ctl dns lookup`: the query holds the address.
    DnsLookup(DnsNamesQuery),
    Graph(datapath_api::GraphQuery),
}

/// An address argument, parsed (IPv4 or IPv6; brackets allowed around IPv6).
fn ip_arg(what: &'static str, value: &str) -> Result<String> {
    let bare = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    bare.parse::<std::net::IpAddr>()
        .map(|a| a.to_string())
        .map_err(|_| Error::invalid(what, value, "not an IPv4 or IPv6 address"))
}

/// The filter sent: canonical spellings (the address as parsed, names in lower case), which
/// the daemon accepts in any case.
fn ct_filter(f: &CtFilterArgs) -> Result<CtFilter> {
    let address = match &f.address {
        Some(a) => Some(ip_arg("address", a)?),
        None => None,
    };
    Ok(CtFilter {
        address,
        port: f.port,
        protocol: f.protocol.map(|p| IpProtocol::from(p).to_string()),
        state: f
            .state
            .map(|s| datapath_api::CtState::from(s).name().to_ascii_lowercase()),
        table: f
            .table
            .map(|t| datapath_api::CtTable::from(t).as_str().to_owned()),
    })
}

/// Parses `ADDR:PORT` (IPv6 as `[ADDR]:PORT`) with a port from 1 to 65535.
pub fn parse_endpoint(what: &'static str, input: &str) -> Result<(IpAddr, u16)> {
    let addr: SocketAddr = input
        .parse()
        .map_err(|_| Error::invalid(what, input, endpoint_problem(input)))?;
    if let SocketAddr::V6(v6) = addr
        && v6.scope_id() != 0
    {
        return Err(Error::invalid(what, input, "scope ids are not supported"));
    }
    if addr.port() == 0 {
        return Err(Error::invalid(
            what,
            input,
            "port must not be 0 (accepted: 1-65535)",
        ));
    }
    Ok((addr.ip(), addr.port()))
}

/// Why `input` is not an `ADDR:PORT`.
fn endpoint_problem(input: &str) -> String {
    if input.parse::<std::net::Ipv4Addr>().is_ok() {
        return "the port is missing (expected ADDR:PORT)".into();
    }
    if input.parse::<std::net::Ipv6Addr>().is_ok() {
        return "the port is missing, or the brackets: IPv6 is [ADDR]:PORT".into();
    }
    // A valid address with a bad port: say which ports there are.
    if let Some((host, port)) = input.rsplit_once(':') {
        let host_ok = host.parse::<std::net::Ipv4Addr>().is_ok()
            || host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
        if host_ok {
            return if port.parse::<i128>().is_ok() {
                format!("port {port} is out of range (accepted: 1-65535)")
            } else {
                format!("port {port:?} is not a number (accepted: 1-65535)")
            };
        }
    }
    if input.matches(':').count() > 1 && !input.starts_with('[') {
        "IPv6 addresses go in brackets: [ADDR]:PORT".into()
    } else {
        "expected ADDR:PORT, e.g. 198.18.0.10:80 or [2001:db8::10]:80".into()
    }
}

fn parse_weight(input: &str) -> Result<u32> {
    let weight: u32 = input
        .parse()
        .map_err(|_| Error::invalid("weight", input, "expected a number from 1 to 4294967295"))?;
    if weight == 0 {
        return Err(Error::invalid(
            "weight",
            input,
            "weights start at 1 (use `lb-ctl backend drain` to stop new flows)",
        ));
    }
    Ok(weight)
}

fn service_key(service: &str, proto: Proto) -> Result<ServiceKey> {
    let (vip, port) = parse_endpoint("service address", service)?;
    Ok(ServiceKey {
        vip,
        port,
        proto: proto.into(),
    })
}

fn backend_target(arg: &BackendArg) -> Result<(ServiceKey, BackendKey)> {
    let key = service_key(&arg.service, arg.proto)?;
    let (addr, port) = parse_endpoint("backend address", &arg.backend)?;
    Ok((key, BackendKey { addr, port }))
}

impl Command {
    /// The request this command makes, or why it is invalid.
    pub fn action(&self) -> Result<Action> {
        Ok(match self {
            Command::Service(ServiceCommand::Add {
                service,
                proto,
                mode,
                snat_addr,
            }) => {
                let key = service_key(service, *proto)?;
                let snat_addr = snat_addr
                    .as_deref()
                    .map(|s| {
                        s.parse::<IpAddr>()
                            .map_err(|e| Error::invalid("SNAT address", s, e.to_string()))
                    })
                    .transpose()?;
                Action::ServiceAdd(CreateService {
                    vip: key.vip,
                    port: key.port,
                    proto: key.proto,
                    mode: (*mode).into(),
                    snat_addr,
                })
            }
            Command::Service(ServiceCommand::Remove(a)) => {
                Action::ServiceRemove(service_key(&a.service, a.proto)?)
            }
            Command::Service(ServiceCommand::List) => Action::ServiceList,
            Command::Service(ServiceCommand::Show(a)) => {
                Action::ServiceShow(service_key(&a.service, a.proto)?)
            }
            Command::Backend(BackendCommand::Add { target, weight }) => {
                let (key, backend) = backend_target(target)?;
                let weight = parse_weight(weight)?;
                Action::BackendAdd(
                    key,
                    AddBackend {
                        addr: backend.addr,
                        port: backend.port,
                        weight,
                        state: BackendState::Active,
                    },
                )
            }
            Command::Backend(BackendCommand::Remove(t)) => {
                let (key, backend) = backend_target(t)?;
                Action::BackendRemove(key, backend)
            }
            Command::Backend(BackendCommand::Drain(t)) => {
                let (key, backend) = backend_target(t)?;
                Action::BackendUpdate(
                    key,
                    backend,
                    UpdateBackend {
                        weight: None,
                        state: Some(BackendState::Draining),
                    },
                )
            }
            Command::Backend(BackendCommand::Activate(t)) => {
                let (key, backend) = backend_target(t)?;
                Action::BackendUpdate(
                    key,
                    backend,
                    UpdateBackend {
                        weight: None,
                        state: Some(BackendState::Active),
                    },
                )
            }
            Command::Backend(BackendCommand::SetWeight { target, weight }) => {
                let (key, backend) = backend_target(target)?;
                let weight = parse_weight(weight)?;
                Action::BackendUpdate(
                    key,
                    backend,
                    UpdateBackend {
                        weight: Some(weight),
                        state: None,
                    },
                )
            }
            Command::Stats => Action::Stats,
            Command::Status => Action::Status,
            Command::Node => Action::Node,
            Command::Sources => Action::Sources,
            Command::Socklb => Action::SockLb,
            Command::Dns(DnsCommand::Status) => Action::DnsStatus,
            Command::Graph(g) => {
                if let Some(bad) = g.exclude.iter().find(|e| e.trim().is_empty()) {
                    return Err(Error::invalid("exclude", bad, "an empty node name"));
                }
                Action::Graph(datapath_api::GraphQuery {
                    window: Some(g.window.clone()),
                    namespace: g.namespace.clone(),
                    exclude: (!g.exclude.is_empty()).then(|| g.exclude.join(",")),
                    top: g.top,
                })
            }
            Command::Proc(ProcCommand::List { pid, cgroup_id }) => {
                Action::ProcList(datapath_api::ProcQuery {
                    pid: *pid,
                    cgroup_id: *cgroup_id,
                })
            }
            Command::Proc(ProcCommand::Show { pid }) => Action::ProcShow(*pid),
            Command::Proc(ProcCommand::Status) => Action::ProcStatus,
            Command::Proc(ProcCommand::Follow {
                count,
                timeout,
                cgroup_id,
            }) => Action::ProcFollow(datapath_api::ProcEventsQuery {
                follow: true,
                count: *count,
                timeout_seconds: *timeout,
                cgroup_id: *cgroup_id,
            }),
            Command::Proc(ProcCommand::Rules) => Action::ProcRules,
            Command::Dns(DnsCommand::List {
                address,
                client,
                name,
            }) => Action::DnsList(DnsNamesQuery {
                address: address
                    .as_deref()
                    .map(|a| ip_arg("address", a))
                    .transpose()?,
                client: client.as_deref().map(|a| ip_arg("client", a)).transpose()?,
                name: name.clone(),
            }),
            Command::Dns(DnsCommand::Lookup { address }) => Action::DnsLookup(DnsNamesQuery {
                address: Some(ip_arg("address", address)?),
                ..Default::default()
            }),
            Command::Policy(PolicyCommand::Apply { file }) => {
                let shown = file.display().to_string();
                let text = std::fs::read_to_string(file)
                    .map_err(|e| Error::invalid("policy file", &shown, e.to_string()))?;
                Action::PolicyApply(ApplyPolicy { text })
            }
            Command::Policy(PolicyCommand::List) => Action::PolicyList,
            Command::Policy(PolicyCommand::Delete) => Action::PolicyDelete,
            Command::Conntrack(ConntrackCommand::List(f)) => Action::ConntrackList(ct_filter(f)?),
            Command::Conntrack(ConntrackCommand::Stats) => Action::ConntrackStats,
            Command::Conntrack(ConntrackCommand::Flush(f)) => Action::ConntrackFlush(ct_filter(f)?),
            Command::Flows(f) => Action::Flows(FlowsQuery {
                follow: f.follow,
                count: f.count,
                timeout_seconds: f.timeout,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn action(args: &[&str]) -> Result<Action> {
        let mut argv = vec!["lb-ctl"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().command.action()
    }

    fn invalid(args: &[&str]) -> String {
        match action(args) {
            Err(e @ Error::InvalidInput { .. }) => {
                assert_eq!(e.exit_code(), 2);
                e.to_string()
            }
            other => panic!("{args:?}: expected InvalidInput, got {other:?}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The canonical name clap accepts for `v`.
    fn value_name(v: impl ValueEnum) -> String {
        v.to_possible_value()
            .map(|p| p.get_name().to_owned())
            .unwrap_or_default()
    }

    /// What a filter sends is the name `--help` shows for the value.
    #[test]
    fn filter_values_are_sent_as_named_in_the_help() {
        for s in CtState::value_variants() {
            let sent = datapath_api::CtState::from(*s).name().to_ascii_lowercase();
            assert_eq!(value_name(*s), sent);
        }
        for p in CtProto::value_variants() {
            assert_eq!(value_name(*p), IpProtocol::from(*p).to_string());
        }
        for t in CtTable::value_variants() {
            assert_eq!(value_name(*t), datapath_api::CtTable::from(*t).as_str());
        }
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn service_add_defaults_and_options() {
        assert_eq!(
            action(&["service", "add", "198.18.0.10:80"]).unwrap(),
            Action::ServiceAdd(CreateService {
                vip: ip("198.18.0.10"),
                port: 80,
                proto: Protocol::Tcp,
                mode: ForwardingMode::FullNat,
                snat_addr: None,
            })
        );
        assert_eq!(
            action(&[
                "service",
                "add",
                "[2001:db8::10]:53",
                "--proto",
                "udp",
                "--mode",
                "dsr",
                "--snat-addr",
                "2001:db8::1"
            ])
            .unwrap(),
            Action::ServiceAdd(CreateService {
                vip: ip("2001:db8::10"),
                port: 53,
                proto: Protocol::Udp,
                mode: ForwardingMode::Dsr,
                snat_addr: Some(ip("2001:db8::1")),
            })
        );
    }

    #[test]
    fn aliases_and_backend_commands() {
        let key = ServiceKey {
            vip: ip("198.18.0.10"),
            port: 80,
            proto: Protocol::Tcp,
        };
        let be = BackendKey {
            addr: ip("198.18.1.1"),
            port: 8080,
        };
        assert_eq!(
            action(&["service", "rm", "198.18.0.10:80"]).unwrap(),
            Action::ServiceRemove(key)
        );
        assert_eq!(action(&["service", "ls"]).unwrap(), Action::ServiceList);
        assert_eq!(
            action(&[
                "backend",
                "add",
                "198.18.0.10:80",
                "198.18.1.1:8080",
                "--weight",
                "3"
            ])
            .unwrap(),
            Action::BackendAdd(
                key,
                AddBackend {
                    addr: be.addr,
                    port: be.port,
                    weight: 3,
                    state: BackendState::Active
                }
            )
        );
        assert_eq!(
            action(&["backend", "drain", "198.18.0.10:80", "198.18.1.1:8080"]).unwrap(),
            Action::BackendUpdate(
                key,
                be,
                UpdateBackend {
                    weight: None,
                    state: Some(BackendState::Draining)
                }
            )
        );
        assert_eq!(
            action(&[
                "backend",
                "set-weight",
                "198.18.0.10:80",
                "198.18.1.1:8080",
                "7"
            ])
            .unwrap(),
            Action::BackendUpdate(
                key,
                be,
                UpdateBackend {
                    weight: Some(7),
                    state: None
                }
            )
        );
        assert_eq!(
            action(&["backend", "rm", "198.18.0.10:80", "198.18.1.1:8080"]).unwrap(),
            Action::BackendRemove(key, be)
        );
    }

    #[test]
    fn local_validation() {
        let m = invalid(&["service", "add", "198.18.0.10"]);
        assert_eq!(
            m,
            r#"invalid service address "198.18.0.10": the port is missing (expected ADDR:PORT)"#
        );
        let m = invalid(&["service", "add", "198.18.0.10:0"]);
        assert_eq!(
            m,
            r#"invalid service address "198.18.0.10:0": port must not be 0 (accepted: 1-65535)"#
        );
        let m = invalid(&["service", "show", "2001:db8::1:80"]);
        assert!(m.contains("IPv6 is [ADDR]:PORT"), "{m}");
        let m = invalid(&["service", "show", "2001:db8::1::80"]);
        assert!(m.contains("brackets"), "{m}");
        let m = invalid(&["backend", "add", "198.18.0.10:80", "x"]);
        assert!(
            m.starts_with(r#"invalid backend address "x": expected ADDR:PORT"#),
            "{m}"
        );
        let m = invalid(&[
            "backend",
            "add",
            "198.18.0.10:80",
            "198.18.1.1:8080",
            "--weight",
            "0",
        ]);
        assert!(
            m.starts_with(r#"invalid weight "0": weights start at 1"#),
            "{m}"
        );
        let m = invalid(&[
            "backend",
            "set-weight",
            "198.18.0.10:80",
            "198.18.1.1:8080",
            "lots",
        ]);
        assert!(
            m.starts_with(r#"invalid weight "lots": expected a number"#),
            "{m}"
        );
        let m = invalid(&["service", "add", "198.18.0.10:80", "--snat-addr", "nope"]);
        assert!(m.starts_with(r#"invalid SNAT address "nope""#), "{m}");
        let m = invalid(&["service", "add", "[fe80::1%2]:80"]);
        assert!(m.contains("scope ids"), "{m}");
    }

    #[test]
    fn policy_conntrack_and_flows_commands() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, "endpoints: []\n").unwrap();
        let path = file.to_str().unwrap();
        assert!(matches!(
            action(&["policy", "apply", "-f", path]).unwrap(),
            Action::PolicyApply(t) if t.text == "endpoints: []\n"
        ));
        assert!(invalid(&["policy", "apply", "-f", "/nonexistent/p.yaml"]).contains("policy file"));
        assert!(matches!(
            action(&["policy", "ls"]).unwrap(),
            Action::PolicyList
        ));
        assert!(matches!(
            action(&["policy", "rm"]).unwrap(),
            Action::PolicyDelete
        ));
        assert!(matches!(
            action(&["conntrack", "list", "--address", "198.18.0.1", "--port", "80",
                     "--protocol", "TCP", "--state", "ESTABLISHED"]).unwrap(),
            Action::ConntrackList(q)
                if q.to_query() == "?address=198.18.0.1&port=80&protocol=tcp&state=established"
        ));
        assert!(matches!(
            action(&["conntrack", "list", "--table", "LB"]).unwrap(),
            Action::ConntrackList(q) if q.to_query() == "?table=lb"
        ));
        assert!(matches!(
            action(&["conntrack", "flush"]).unwrap(),
            Action::ConntrackFlush(q) if q.to_query().is_empty()
        ));
        assert!(invalid(&["conntrack", "list", "--address", "nope"]).contains("IPv4"));
        // Aliases and any case, sent by their canonical name.
        assert!(matches!(
            action(&["conntrack", "flush", "--state", "Closed", "--protocol", "ICMP"]).unwrap(),
            Action::ConntrackFlush(q) if q.to_query() == "?protocol=icmp&state=close"
        ));
        assert!(matches!(
            action(&["conntrack", "list", "--state", "syn_recv", "--port", "0"]).unwrap(),
            Action::ConntrackList(q) if q.to_query() == "?port=0&state=syn_recv"
        ));
        assert_eq!(
            action(&["flows", "--follow", "--count", "3"]).unwrap(),
            Action::Flows(FlowsQuery::follow(Some(3), None))
        );
        assert_eq!(
            action(&["flows"]).unwrap(),
            Action::Flows(FlowsQuery::default())
        );
    }

    #[test]
    fn graph_command() {
        assert_eq!(
            action(&["graph"]).unwrap(),
            Action::Graph(datapath_api::GraphQuery {
                window: Some("5m".into()),
                ..Default::default()
            })
        );
        let Action::Graph(q) = action(&[
            "graph",
            "--window",
            "1h",
            "--exclude",
            "198.18.0.2,198.18.1.1",
            "--exclude",
            "service:db",
            "--namespace",
            "shop",
            "--top",
            "5",
        ])
        .unwrap() else {
            panic!("not a graph action");
        };
        assert_eq!(
            q.to_query(),
            "?window=1h&namespace=shop&exclude=198.18.0.2%2C198.18.1.1%2Cservice%3Adb&top=5"
        );
        assert!(action(&["graph", "--exclude", ""]).is_err());
        assert!(Cli::try_parse_from(["lb-ctl", "graph", "--top", "0"]).is_err());
    }

    #[test]
    fn dns_commands() {
        assert_eq!(action(&["dns", "status"]).unwrap(), Action::DnsStatus);
        assert_eq!(
            action(&["dns", "lookup", "[2001:DB8::12]"]).unwrap(),
            Action::DnsLookup(DnsNamesQuery {
                address: Some("2001:db8::12".into()),
                ..Default::default()
            })
        );
        assert!(matches!(
            action(&["dns", "ls", "--client", "198.18.0.1", "--name", "web.test"]).unwrap(),
            Action::DnsList(q) if q.to_query() == "?client=198.18.0.1&name=web.test"
        ));
        assert!(invalid(&["dns", "lookup", "web.test"]).contains("address"));
        assert!(invalid(&["dns", "list", "--client", "1.2.3"]).contains("client"));
    }

    /// Every value clap refuses in a filter is a clap error (exit 2): nothing is sent.
    #[test]
    fn unknown_filter_values_are_usage_errors() {
        for args in [
            &["lb-ctl", "conntrack", "list", "--state", "bogus"][..],
            &["lb-ctl", "conntrack", "flush", "--state", "bogus"],
            &["lb-ctl", "conntrack", "list", "--state", "a&b=c"],
            &["lb-ctl", "conntrack", "list", "--state", "syn-sent"],
            &["lb-ctl", "conntrack", "flush", "--table", "nat"],
            &["lb-ctl", "conntrack", "flush", "--protocol", "sctp"],
            &["lb-ctl", "conntrack", "list", "--port", "65536"],
            &["lb-ctl", "conntrack", "list", "--port", "-1"],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(
                matches!(
                    e.kind(),
                    clap::error::ErrorKind::InvalidValue | clap::error::ErrorKind::ValueValidation
                ),
                "{args:?}: {:?}",
                e.kind()
            );
        }
    }

    /// The state names `--state` accepts are exactly those the daemon shows (the conntrack
    /// crate's `TcpState::name`, `UdpState::name`, `IcmpState::name`, which the daemon lists
    /// as `state`), in lower case, plus the alias `closed` that its help mentions.
    #[test]
    fn state_names_are_the_conntracks() {
        const SHOWN: [&str; 10] = [
            "NONE",
            "SYN_SENT",
            "SYN_RECV",
            "ESTABLISHED",
            "FIN_WAIT",
            "CLOSE_WAIT",
            "TIME_WAIT",
            "CLOSE",
            "NEW",
            "REPLIED",
        ];
        // The conntrack's sources name each of them (a renamed state fails here).
        let sources = [
            include_str!("../../conntrack/src/tcp.rs"),
            include_str!("../../conntrack/src/udp.rs"),
        ]
        .concat();
        for name in SHOWN {
            assert!(sources.contains(&format!("=> \"{name}\"")), "{name}");
        }
        let accepted: Vec<String> = CtState::value_variants()
            .iter()
            .map(|v| value_name(*v))
            .collect();
        let lower: Vec<String> = SHOWN.iter().map(|n| n.to_ascii_lowercase()).collect();
        assert_eq!(accepted, lower);
        for name in &lower {
            for spelled in [name.clone(), name.to_ascii_uppercase()] {
                let q = ct_filter(&CtFilterArgs {
                    state: Some(CtState::from_str(&spelled, true).unwrap()),
                    ..CtFilterArgs::default()
                })
                .unwrap();
                assert_eq!(q.to_query(), format!("?state={name}"));
            }
        }
        assert_eq!(CtState::from_str("closed", true), Ok(CtState::Close));
    }

    #[test]
    fn ports_out_of_range_say_the_range() {
        for (input, want) in [
            (
                "198.18.0.10:65536",
                "port 65536 is out of range (accepted: 1-65535)",
            ),
            (
                "198.18.0.10:-1",
                "port -1 is out of range (accepted: 1-65535)",
            ),
            (
                "[2001:db8::1]:70000",
                "port 70000 is out of range (accepted: 1-65535)",
            ),
            (
                "198.18.0.10:http",
                r#"port "http" is not a number (accepted: 1-65535)"#,
            ),
            ("198.18.0.10:0", "port must not be 0 (accepted: 1-65535)"),
        ] {
            let e = parse_endpoint("service address", input).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("invalid service address {input:?}: {want}")
            );
        }
        assert_eq!(
            parse_endpoint("backend address", "198.18.0.10:65535").unwrap(),
            (ip("198.18.0.10"), 65535)
        );
    }

    #[test]
    fn usage_errors_are_clap_errors_with_exit_2() {
        for args in [
            &[
                "lb-ctl",
                "service",
                "add",
                "198.18.0.10:80",
                "--proto",
                "sctp",
            ][..],
            &["lb-ctl", "service"],
            &["lb-ctl", "-o", "yaml", "stats"],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}
