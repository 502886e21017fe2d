//! The desired state of the load balancer, as the operator declared it.
//!
//! This is what the API edits, what the state file stores and what the dataplane programs.
//! Ids (`ServiceSpec::id`, `BackendSpec::id`, `BackendSpec::generation`) are assigned by the
//! state store and persisted, so that after a restart the daemon reprograms the pinned maps
//! with the very same ids and established flows keep pointing at the right backend.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// L4 protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(format!("unknown protocol {other:?} (expected tcp or udp)")),
        }
    }
}

/// How a service forwards to its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardingMode {
    /// DNAT to the backend and SNAT to the load balancer's address; replies come back through
    /// the load balancer and are translated in XDP.
    #[default]
    FullNat,
    /// Only the destination MAC is rewritten; backends hold the VIP on their loopback and reply
    /// directly.
    Dsr,
}

impl fmt::Display for ForwardingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardingMode::FullNat => "full-nat",
            ForwardingMode::Dsr => "dsr",
        })
    }
}

impl FromStr for ForwardingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "full-nat" | "fullnat" | "fnat" => Ok(ForwardingMode::FullNat),
            "dsr" => Ok(ForwardingMode::Dsr),
            other => Err(format!("unknown mode {other:?} (expected full-nat or dsr)")),
        }
    }
}

/// Administrative state of a backend.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Receives new flows.
    #[default]
    Active,
    /// Keeps its established flows, receives no new ones.
    Draining,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
        })
    }
}

/// Identity of a service: VIP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vip {
            IpAddr::V4(v4) => write!(f, "{}/{}:{}", self.proto, v4, self.port),
            IpAddr::V6(v6) => write!(f, "{}/[{}]:{}", self.proto, v6, self.port),
        }
    }
}

/// Identity of a backend within a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackendKey {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(v4) => write!(f, "{}:{}", v4, self.port),
            IpAddr::V6(v6) => write!(f, "[{}]:{}", v6, self.port),
        }
    }
}

/// One backend of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub port: u16,
    /// Relative weight, >= 1.
    pub weight: u32,
    pub state: BackendState,
    /// Slot in `LB_BACKENDS`, assigned by the state store.
    pub id: u32,
    /// Generation of the slot, assigned by the state store (bumped on every reuse).
    pub generation: u32,
}

impl BackendSpec {
    pub fn key(&self) -> BackendKey {
        BackendKey {
            addr: self.addr,
            port: self.port,
        }
    }
}

/// A source prefix a service takes new flows from (Kubernetes `loadBalancerSourceRanges`),
/// written `addr/len`; host bits are cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SourceRange {
    pub addr: IpAddr,
    pub len: u8,
}

impl SourceRange {
    /// `addr/len` with the host bits of `addr` cleared; `None` if `len` is too long.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(a) if len <= 32 => {
                let mask = if len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(len))
                };
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) if len <= 128 => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(len))
                };
                IpAddr::V6((u128::from(a) & mask).into())
            }
            _ => return None,
        };
        Some(Self { addr, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::new(ip, self.len).is_some_and(|p| p.addr == self.addr)
    }
}

impl fmt::Display for SourceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for SourceRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid source range {s:?} (expected ADDR/LEN)");
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        Self::new(addr, len).ok_or_else(|| format!("invalid prefix length in source range {s:?}"))
    }
}

impl TryFrom<String> for SourceRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SourceRange> for String {
    fn from(r: SourceRange) -> String {
        r.to_string()
    }
}

/// Who declared a service: the API (`lb-ctl`), the services file, or Kubernetes. Only its
/// source changes a service; the API may override with `force`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ServiceSource {
    #[default]
    Api,
    File,
    Kubernetes,
}

impl ServiceSource {
    pub const ALL: [ServiceSource; 3] = [
        ServiceSource::Api,
        ServiceSource::File,
        ServiceSource::Kubernetes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceSource::Api => "api",
            ServiceSource::File => "file",
            ServiceSource::Kubernetes => "kubernetes",
        }
    }

    pub fn is_api(&self) -> bool {
        *self == ServiceSource::Api
    }
}

impl fmt::Display for ServiceSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One service and its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub key: ServiceKey,
    /// Who declared it (absent in the state file: the API, as before sources existed).
    #[serde(default, skip_serializing_if = "ServiceSource::is_api")]
    pub source: ServiceSource,
    /// What the source calls it (`namespace/name:port (kind)` for Kubernetes, the entry's name
    /// for the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub mode: ForwardingMode,
    /// Full-NAT source address override; `None` lets the daemon pick, per backend, the address
    /// the kernel would use to reach that backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_addr: Option<IpAddr>,
    /// New flows only from these sources (none: from anywhere). Sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<SourceRange>,
    /// Served by the XDP load balancer only, never by the socket load balancer (see
    /// [`DeclaredService::xdp_only`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub xdp_only: bool,
    /// Slot in the service-indexed maps, assigned by the state store.
    pub id: u32,
    /// Sorted by `BackendKey`.
    pub backends: Vec<BackendSpec>,
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// A backend as a source declares it (ids and generations are the store's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredBackend {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
}

/// A service as a source declares it: the whole of it, so applying it replaces what was there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredService {
    pub key: ServiceKey,
    pub mode: ForwardingMode,
    pub snat_addr: Option<IpAddr>,
    pub owner: String,
    /// New flows only from these sources (empty: from anywhere).
    #[serde(default)]
    pub source_ranges: Vec<SourceRange>,
    /// Served by the XDP load balancer only, never by the socket load balancer (a node or
    /// load-balancer address: NodePort, LoadBalancer ingress, externalIPs).
    #[serde(default)]
    pub xdp_only: bool,
    pub backends: Vec<DeclaredBackend>,
}

/// Everything the operator asked for. Persisted as the state file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub services: BTreeMap<ServiceKey, ServiceSpec>,
    /// Next generation number handed to a backend slot; persisted so generations never repeat.
    #[serde(default)]
    pub next_generation: u32,
}

/// Packet and byte counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// A reading of every datapath counter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// By service id.
    pub services: BTreeMap<u32, Counter>,
    /// By backend id.
    pub backends: BTreeMap<u32, Counter>,
    /// Outcome counters by reason name (see the XDP program's reason counters).
    pub reasons: BTreeMap<String, u64>,
    /// The SYN-flood mode's state.
    #[serde(default)]
    pub syn_flood: crate::lb::SynFloodView,
}
