//! Processes as the exec module follows them (`GET /v1/proc`, `GET /v1/proc/status`,
//! `lb-ctl proc`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::routes::query_string;

/// One process of the cache.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessView {
    pub pid: u32,
    /// Start in clock ticks since boot: with the pid, the process's identity.
    pub start_ticks: u64,
    pub ppid: u32,
    /// The program as execve was given it (`/proc/<pid>/exe` for processes found at start).
    pub exe: String,
    pub args: Vec<String>,
    pub comm: String,
    pub uid: u32,
    /// The cgroup v2 id (its directory's inode); 0 when not known (found at start).
    pub cgroup_id: u64,
    /// The cgroup's path under the cgroup2 root, when known.
    pub cgroup: Option<String>,
    /// The pod and container, parsed from the cgroup path.
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    /// The exit code once it exited (it stays listed for the grace period).
    pub exit_code: Option<u32>,
    pub exited: bool,
    /// Found by the walk of `/proc` at start.
    pub from_proc: bool,
}

/// Query of `GET /v1/proc`: every filter given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

impl ProcQuery {
    pub fn to_query(&self) -> String {
        query_string(&[
            ("pid", self.pid.map(|p| p.to_string())),
            ("cgroup_id", self.cgroup_id.map(|c| c.to_string())),
        ])
    }
}

/// `GET /v1/proc/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcStatus {
    pub enabled: bool,
    pub up: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The tracer's counters: `exec_sent`, `fork_sent`, `exit_sent`, `thread_skipped`,
    /// `rate_limited`, `lost`, `read_failed`.
    pub events: BTreeMap<String, u64>,
    /// Processes in the cache, of them exited (kept for the grace period).
    pub entries: u64,
    pub exited: u64,
    pub evicted: u64,
    pub expired: u64,
    /// Found by the walk of `/proc` at start.
    pub found_at_start: u64,
}
