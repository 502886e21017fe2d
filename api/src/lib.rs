//! The contract between `datapathd`'s HTTP/JSON API and its clients.
//!
//! Transport: HTTP/1.1 over a Unix socket (default [`DEFAULT_SOCKET`], mode 0600, owned by
//! root). Bodies are JSON, at most 2 MiB. Every error answers with a non-2xx status and an
//! [`ApiError`] body, 404 for an unknown route and 405 (with `Allow`) for a wrong method
//! included. Every route (those of the policy module too), its bodies and its errors:
//! docs/api.md.
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | `/v1/services` | - | `Vec<ServiceView>` |
//! | POST | `/v1/services` | [`CreateService`] | 201, [`ServiceView`] |
//! | GET | `/v1/services/{proto}/{vip}/{port}` | - | [`ServiceView`] |
//! | DELETE | `/v1/services/{proto}/{vip}/{port}` | - | [`ServiceView`] (as removed) |
//! | POST | `/v1/services/{proto}/{vip}/{port}/backends` | [`AddBackend`] | 201, [`ServiceView`] |
//! | PATCH | `/v1/services/{proto}/{vip}/{port}/backends/{addr}/{port}` | [`UpdateBackend`] | [`ServiceView`] |
//! | DELETE | `/v1/services/{proto}/{vip}/{port}/backends/{addr}/{port}` | - | [`ServiceView`] |
//! | GET | `/v1/stats` | - | [`StatsView`] |
//! | GET | `/v1/status` | - | [`StatusView`] |
//! | GET | `/healthz` | - | `{"status":"ok"}` |
//!
//! `{proto}` is `tcp` or `udp`; IPv6 addresses appear in paths without brackets.

pub mod model;

use std::{collections::BTreeMap, net::IpAddr};

pub use model::*;
use serde::{Deserialize, Serialize};

/// Where `datapathd` listens and `lb-ctl` connects by default.
pub const DEFAULT_SOCKET: &str = "/run/datapath/api.sock";

fn default_weight() -> u32 {
    1
}

/// Body of `POST /v1/services`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateService {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    #[serde(default)]
    pub mode: ForwardingMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_addr: Option<IpAddr>,
}

/// Body of `POST .../backends`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBackend {
    pub addr: IpAddr,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub state: BackendState,
}

/// Body of `PATCH .../backends/{addr}/{port}`: the fields to change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBackend {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<BackendState>,
}

/// A backend as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
    pub id: u32,
    /// Entries of the live Maglev table pointing at this backend (0 when draining).
    pub table_entries: u32,
    pub counters: Counter,
}

/// A service as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    pub mode: ForwardingMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_addr: Option<IpAddr>,
    pub id: u32,
    pub backends: Vec<BackendView>,
    pub counters: Counter,
}

/// Body of `GET /v1/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    pub services: Vec<ServiceView>,
    /// Datapath outcome counters by reason (passes, drops by cause, forwards).
    pub reasons: BTreeMap<String, u64>,
}

/// Machine-readable class of an API error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed request or invalid value (HTTP 400; also the code of a 405 for a method the
    /// route does not have and of a 413 for a body over the size limit).
    InvalidArgument,
    /// Unknown service or backend (HTTP 404).
    NotFound,
    /// Duplicate service or backend (HTTP 409).
    AlreadyExists,
    /// A configured capacity (services, backends) is exhausted (HTTP 507).
    CapacityExhausted,
    /// Programming the BPF maps failed; the previous state keeps serving (HTTP 500).
    DataplaneFailure,
    /// Writing the state file failed; the change was rolled back (HTTP 500).
    PersistenceFailure,
    /// Anything else (HTTP 500).
    Internal,
    /// The module that serves the route is off (disabled, or a kernel feature it needs is
    /// missing); `GET /v1/status` says why (HTTP 503).
    Unavailable,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists => 409,
            ErrorCode::CapacityExhausted => 507,
            ErrorCode::DataplaneFailure | ErrorCode::PersistenceFailure | ErrorCode::Internal => {
                500
            }
            ErrorCode::Unavailable => 503,
        }
    }
}

/// Body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    /// One line, meant for people.
    pub error: String,
}

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
    /// `native` or `generic`.
    pub xdp_mode: String,
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
    pub modules: Vec<ModuleStatus>,
    pub features: Vec<FeatureStatus>,
}
