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
