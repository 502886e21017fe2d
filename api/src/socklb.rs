//! The socket load balancer (`GET /v1/socklb`, `lb-ctl socklb`): where its programs are
//! attached, what they decided, and the recent decisions.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

use crate::model::Protocol;

/// Which call a decision was made in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SockLbHook {
    /// `connect()`: TCP, or a connected UDP socket.
    Connect,
    /// `sendmsg()` on an unconnected UDP socket.
    Sendmsg,
}

/// What the socket LB did with a socket to a VIP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SockLbOutcome {
    /// Sent to `backend`.
    #[default]
    Translated,
    /// Refused (`ECONNREFUSED`): the service had no backend to give; `backend` is
    /// `0.0.0.0:0` (`[::]:0`).
    NoBackend,
}

impl SockLbOutcome {
    pub fn is_translated(&self) -> bool {
        *self == SockLbOutcome::Translated
    }
}

/// One socket-LB decision: which socket, of which process and cgroup, was sent where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockLbDecision {
    /// The socket's cookie (unique per socket for the kernel's uptime).
    pub cookie: u64,
    pub pid: u32,
    /// The caller's cgroup id (the cgroup directory's inode number).
    pub cgroup_id: u64,
    pub hook: SockLbHook,
    pub proto: Protocol,
    pub vip: SocketAddr,
    pub backend: SocketAddr,
    /// Absent: translated.
    #[serde(default, skip_serializing_if = "SockLbOutcome::is_translated")]
    pub outcome: SockLbOutcome,
}

/// Sockets translated to one service since its programs were loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockLbServiceCount {
    /// `proto/vip:port`.
    pub service: String,
    pub sockets: u64,
}

/// `GET /v1/socklb`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockLbStatus {
    pub enabled: bool,
    pub up: bool,
    /// Why it is off, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The cgroup v2 directory the programs are attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Only sockets of the daemon's own network namespace are translated.
    pub host_netns_only: bool,
    /// Cgroups left alone (with their descendants).
    pub opt_out_cgroups: Vec<String>,
    /// The attached programs (`sock_connect4`, ...).
    pub programs: Vec<String>,
    /// Outcomes of every call, by reason (`connect_translated`, `pass_not_vip`, ...).
    pub reasons: BTreeMap<String, u64>,
    /// Translated sockets per service, for the services that had any.
    pub services: Vec<SockLbServiceCount>,
    /// Sockets destroyed because their backend was removed.
    pub sockets_destroyed: u64,
    /// The latest decisions (at most [`RECENT_SOCKLB_DECISIONS`], oldest first).
    pub recent: Vec<SockLbDecision>,
}

/// How many decisions `GET /v1/socklb` keeps.
pub const RECENT_SOCKLB_DECISIONS: usize = 64;
