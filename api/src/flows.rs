//! Flow events: `GET /v1/flows` (the recent ones, a JSON array) and
//! `GET /v1/flows?follow=true` (a stream, [`NDJSON_CONTENT_TYPE`]: one [`FlowEventView`] a
//! line, as they happen).

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{
    conntrack::{CtState, IpProtocol},
    policy::Direction,
    routes::query_string,
};

/// How many events `GET /v1/flows` without `follow` answers at most (the latest).
pub const RECENT_FLOW_EVENTS: usize = 256;
/// The longest a follow stream lasts, and how long it lasts without `timeout_seconds`.
pub const MAX_FOLLOW_SECONDS: u64 = 86_400;
/// The content type of the follow stream.
pub const NDJSON_CONTENT_TYPE: &str = "application/x-ndjson";

/// What happened to a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowKind {
    /// Admitted and tracked.
    Opened,
    /// Admitted by a `log` rule.
    Logged,
    /// Ended (FIN or RST seen), with its counters.
    Closed,
    /// Refused by a rule or a default.
    Denied,
    /// Tracked, then no longer allowed by the policy in force: removed.
    Cut,
    /// Removed idle by the conntrack's garbage collection.
    Expired,
    /// A kind code the daemon does not know (a newer tc program): shown rather than dropped.
    Unknown,
}

impl FlowKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowKind::Opened => "opened",
            FlowKind::Logged => "logged",
            FlowKind::Closed => "closed",
            FlowKind::Denied => "denied",
            FlowKind::Cut => "cut",
            FlowKind::Expired => "expired",
            FlowKind::Unknown => "unknown",
        }
    }

    /// Whether the flow is over, so that its counters and duration are final.
    pub fn ends_flow(self) -> bool {
        matches!(self, FlowKind::Closed | FlowKind::Cut | FlowKind::Expired)
    }
}

impl fmt::Display for FlowKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, as every name's `Display` here: a width (`{:<8}`) aligns it in a table.
        f.pad(self.as_str())
    }
}

/// One flow event. Every field is always present (`rule` and `rule_name` may be `null`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEventView {
    pub kind: FlowKind,
    /// Kernel monotonic time of the event.
    pub ts_ns: u64,
    pub protocol: IpProtocol,
    /// Original direction: source and destination.
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    /// The interface's name (`if<index>` when it has none any more).
    pub interface: String,
    /// The direction of the decision on that interface.
    pub direction: Direction,
    /// The rule that decided; `null` for the endpoint's default action.
    pub rule: Option<u32>,
    /// Its name, or `endpoint/direction[index]` for an unnamed rule; `null` with `rule`.
    pub rule_name: Option<String>,
    pub state: CtState,
    pub packets_orig: u64,
    pub packets_reply: u64,
    pub bytes_orig: u64,
    pub bytes_reply: u64,
    pub duration_ns: u64,
    pub rtt_ns: u64,
    /// The name the source asked DNS for the destination (the `dns` module), if any.
    #[serde(default)]
    pub dst_name: Option<String>,
    /// The name the destination asked DNS for the source.
    #[serde(default)]
    pub src_name: Option<String>,
    /// The process that opened the connection (the `exec` module), if known.
    #[serde(default)]
    pub pid: Option<u32>,
    /// That process's program.
    #[serde(default)]
    pub exe: Option<String>,
}

/// Query of `GET /v1/flows`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowsQuery {
    /// Stream events as they come (JSON lines) instead of answering the recent ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
    /// With `follow`: stop after this many events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// With `follow`: stop after this many seconds (at most [`MAX_FOLLOW_SECONDS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

impl FlowsQuery {
    /// A follow stream's query.
    pub fn follow(count: Option<u64>, timeout_seconds: Option<u64>) -> Self {
        Self {
            follow: true,
            count,
            timeout_seconds,
        }
    }

    /// The query string (`?follow=true&count=3`), `""` for the recent events.
    pub fn to_query(&self) -> String {
        query_string(&[
            ("follow", self.follow.then(|| "true".to_string())),
            ("count", self.count.map(|n| n.to_string())),
            (
                "timeout_seconds",
                self.timeout_seconds.map(|n| n.to_string()),
            ),
        ])
    }
}
