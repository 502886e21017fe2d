//! The service sources (the services file, Kubernetes): what each one last did, for
//! `GET /v1/sources` and `lb-ctl sources`.

use serde::{Deserialize, Serialize};

use crate::model::ServiceSource;

/// An object a source read and did not turn into services, and why (a headless Service, an
/// ExternalName Service, a Service without any address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedObject {
    /// `namespace/name` for Kubernetes, the entry's name for the file.
    pub object: String,
    pub reason: String,
}

/// A service a source declared that the load balancer did not take, and why (another source
/// owns it, a capacity is exhausted, it could not be programmed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedService {
    /// `proto/vip:port`.
    pub service: String,
    pub owner: String,
    pub reason: String,
}

/// One source's state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub source: ServiceSource,
    pub enabled: bool,
    /// Where it reads from: the file's path, the API server's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Whether its desired state has been applied at least once since the daemon started.
    /// Until then the services saved in the state file keep serving.
    pub synced: bool,
    /// Seconds since its last successful apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_age_seconds: Option<f64>,
    /// Successful applies since the daemon started.
    pub syncs: u64,
    /// Failed reads or applies since the daemon started.
    pub sync_errors: u64,
    /// The last failure, until the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Services (frontends) it owns in the load balancer.
    pub services: u64,
    /// Objects it read (Kubernetes Services, file entries).
    pub objects: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedObject>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedService>,
    /// What was read but is not routed, or routed differently than asked (an SCTP port,
    /// `sessionAffinity: ClientIP`, `loadBalancerSourceRanges`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Body of `GET /v1/sources`: every source, in the order of [`ServiceSource::ALL`] (the API
/// itself excluded).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourcesView {
    pub sources: Vec<SourceStatus>,
}
