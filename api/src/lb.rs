//! The load balancer's routes: services, their backends and their counters.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::model::{BackendState, Counter, ForwardingMode, Protocol, ServiceSource, SourceRange};

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
    /// The NUD state of its neighbour entry (see `NeighbourStatus::state`), when the netlink
    /// controller runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbour: Option<String>,
}

/// A service as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    pub mode: ForwardingMode,
    /// Who declared it: `api`, `file` or `kubernetes`.
    #[serde(default)]
    pub source: ServiceSource,
    /// What its source calls it, for file and Kubernetes services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_addr: Option<IpAddr>,
    /// New flows only from these sources (absent: from anywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<SourceRange>,
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
    /// The XDP program's SYN-flood mode (absent from daemons that have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_flood: Option<SynFloodView>,
}

/// SYN-flood mode: above `rate_per_cpu` new flows per second on a CPU, DSR TCP SYNs are
/// forwarded by Maglev alone, without a flow entry (counted as `new_flow_untracked`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynFloodView {
    /// New flows per second per CPU that start the mode; 0: the mode is off.
    pub rate_per_cpu: u64,
    /// CPUs over the rate in their current one-second window.
    pub cpus_flooding: u32,
    /// CPUs the program runs on.
    pub cpus: u32,
    /// Times a CPU entered the mode, summed over CPUs.
    pub entered: u64,
}
