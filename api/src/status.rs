//! `GET /v1/status` and `GET /healthz`: what runs, what does not and why.

use serde::{Deserialize, Serialize};

/// One module of the daemon (the XDP load balancer, program statistics, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    pub name: String,
    /// Enabled by the configuration.
    pub enabled: bool,
    /// Loaded, attached and reconciled.
    pub up: bool,
    /// Why the module is not up (disabled by configuration, a missing feature, an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Times the supervisor restarted the module's run loop after a failure.
    #[serde(default)]
    pub restarts: u64,
    /// The last failure of its run loop (a panic or an error), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

/// A kernel feature as probed at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureStatus {
    pub name: String,
    pub available: bool,
    /// What was found, or why it is unavailable.
    pub detail: String,
}

/// An interface the XDP program is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// `native`, `generic`, or `adopted` (a link pinned by a previous run, whose mode that run
    /// chose).
    pub xdp_mode: String,
}

/// An interface as the netlink controller learned it, and what the daemon attached to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub ifindex: u32,
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`; absent for interfaces without a link-layer address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// The ifindex of its master (bridge, bond, VRF), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<u32>,
    /// What the daemon's programs hold on it: `xdp` (the load balancer), `tcx-ingress` and
    /// `tcx-egress` (the policy).
    #[serde(default)]
    pub attached: Vec<String>,
}

/// The neighbour entry of a backend or full-NAT next hop, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourStatus {
    /// The backend's (or next hop's) address.
    pub addr: std::net::IpAddr,
    /// The interface the entry is on; absent while no route leads to the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The NUD state in lower case: `reachable`, `stale`, `delay`, `probe`, `incomplete`,
    /// `failed`, `permanent`, `noarp`, `none`; `missing` when the kernel has no entry.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Created and kept resolved by the daemon (NTF_EXT_MANAGED).
    pub managed: bool,
    /// `incomplete`, `failed` or `missing`: packets to it cannot be forwarded.
    pub unresolved: bool,
}

/// The netlink controller's own figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetlinkStatus {
    /// Netlink messages applied since start (dumps and events).
    pub messages: u64,
    /// Full re-dumps after the receive buffer overran (ENOBUFS).
    pub resyncs: u64,
    /// Messages that could not be parsed and were skipped.
    pub parse_errors: u64,
    /// The socket's receive buffer as the kernel reports it (SO_RCVBUF), in bytes.
    pub receive_buffer_bytes: u64,
    /// Programs found detached by someone else and attached again.
    pub reattachments: u64,
}

/// Body of `GET /v1/status`: what runs, what does not and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    /// Every enabled module is up.
    pub ready: bool,
    /// The configuration file in use, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<String>,
    /// Configuration reloads applied since start.
    pub config_reloads: u64,
    /// Configuration reloads refused since start (the running configuration stayed).
    pub config_reload_failures: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload_error: Option<String>,
    pub interfaces: Vec<InterfaceStatus>,
    /// Every interface of the namespace, from the netlink controller (empty while it is off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkStatus>,
    /// The backends' and next hops' neighbour entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub neighbours: Vec<NeighbourStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netlink: Option<NetlinkStatus>,
    pub modules: Vec<ModuleStatus>,
    pub features: Vec<FeatureStatus>,
}

/// Body of `GET /healthz`: `{"status":"ok"}` as long as the API serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

impl Health {
    pub fn ok() -> Self {
        Self {
            status: "ok".into(),
        }
    }
}
