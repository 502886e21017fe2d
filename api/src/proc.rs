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
    /// `rate_limited`, `lost`, `read_failed`, `connect_started`, `connect_sent`,
    /// `connect_unseen`, `state_ignored`, and the enforcement's `exec_audited`, `exec_denied`,
    /// `connect_audited`, `connect_denied`, `connect_allowed`, `signal_failed`.
    pub events: BTreeMap<String, u64>,
    /// Processes in the cache, of them exited (kept for the grace period).
    pub entries: u64,
    pub exited: u64,
    pub evicted: u64,
    pub expired: u64,
    /// Found by the walk of `/proc` at start.
    pub found_at_start: u64,
    /// TCP connections attributed to their process, kept (the oldest forgotten first).
    #[serde(default)]
    pub connections: u64,
    #[serde(default)]
    pub connections_forgotten: u64,
}

/// A connection the exec module attributed to a process, or a connect an enforcement rule
/// matched (`GET /v1/proc/events?follow=true`, topic `exec.connects`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectView {
    /// `bpf_ktime_get_boot_ns` at the event.
    pub ts_ns: u64,
    pub pid: u32,
    /// With the pid, the process's identity (0: not known, a connect seen by a cgroup hook).
    pub start_ticks: u64,
    /// The process's program, from the cache, when it knows the process.
    pub exe: Option<String>,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The local end (unspecified and 0 for `checked`: the kernel has not picked it yet).
    pub src: std::net::IpAddr,
    pub src_port: u16,
    pub dst: std::net::IpAddr,
    pub dst_port: u16,
    /// `established`, `failed` (refused, reset or timed out in the handshake) or `checked`
    /// (seen by an enforcement rule before the kernel connects).
    pub outcome: String,
    /// `audited` or `denied` when a rule matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u16>,
}

/// One event of `GET /v1/proc/events?follow=true` (`lb-ctl proc follow`), one a line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProcEventView {
    /// A program started (`verdict`: what an exec rule did to it).
    Exec {
        process: ProcessView,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        verdict: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<u16>,
    },
    Fork {
        process: ProcessView,
    },
    Exit {
        pid: u32,
        start_ticks: u64,
        code: u32,
    },
    Connect {
        connect: ConnectView,
    },
}

/// Query of `GET /v1/proc/events`: `follow` must be true.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcEventsQuery {
    #[serde(default)]
    pub follow: bool,
    /// Stop after this many events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Stop after this many seconds (at most [`crate::MAX_FOLLOW_SECONDS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Only events of processes in this cgroup (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

impl ProcEventsQuery {
    pub fn to_query(&self) -> String {
        query_string(&[
            ("follow", self.follow.then(|| "true".to_string())),
            ("count", self.count.map(|c| c.to_string())),
            (
                "timeout_seconds",
                self.timeout_seconds.map(|c| c.to_string()),
            ),
            ("cgroup_id", self.cgroup_id.map(|c| c.to_string())),
        ])
    }
}

/// One enforcement rule and how often it matched.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRuleView {
    /// Its index: the `rule` of the events it matched.
    pub index: u16,
    /// `exec` or `connect`.
    pub kind: String,
    /// The path (exec) or `CIDR:port` (connect) as configured.
    pub target: String,
    /// For exec rules: the inode the path resolved to at start (`dev:ino`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<String>,
    pub hits: u64,
}

/// A cgroup enforcement applies in (with its descendants).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcedCgroupView {
    pub path: String,
    pub id: u64,
}

/// `GET /v1/proc/rules`: the enforcement of the exec module.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRulesView {
    /// `off`, `audit` or `enforce`.
    pub mode: String,
    pub host_wide: bool,
    pub cgroups: Vec<EnforcedCgroupView>,
    /// The hooks enforcing: `exec` is the kill at the exec tracepoint, `connect` the cgroup
    /// connect4/connect6 programs (BPF-LSM, where the kernel loads it, is not used yet).
    pub hooks: Vec<String>,
    pub rules: Vec<ProcRuleView>,
    /// Matches by verdict: `exec_denied`, `exec_audited`, `connect_denied`,
    /// `connect_audited`, `signal_failed`.
    pub verdicts: BTreeMap<String, u64>,
}
