//! The conntrack routes: `GET` and `DELETE /v1/conntrack` (with a [`CtFilter`] as query),
//! `GET /v1/conntrack/stats`.
//!
//! There is one conntrack with two tables of the same records: the policy module's `CT_FLOWS`
//! ([`CtTable::Policy`]) and the XDP load balancer's `LB_FLOWS` ([`CtTable::Lb`]).

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{error::Error, policy::Direction, routes::query_string};

/// The conntrack table holding a flow.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CtTable {
    /// The tc programs' `CT_FLOWS`. The default: answers from before the load balancer's
    /// table was listed have no `table`.
    #[default]
    Policy,
    /// The XDP load balancer's `LB_FLOWS`.
    Lb,
}

impl CtTable {
    pub const ALL: [CtTable; 2] = [CtTable::Policy, CtTable::Lb];

    pub fn as_str(self) -> &'static str {
        match self {
            CtTable::Policy => "policy",
            CtTable::Lb => "lb",
        }
    }
}

impl fmt::Display for CtTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for CtTable {
    type Err = Error;

    /// Any case, as the filter compares.
    fn from_str(s: &str) -> Result<Self, Error> {
        CtTable::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::Table(s.to_owned()))
    }
}

/// The state of a tracked flow, named as the conntrack names it (`conntrack::TcpState::name`,
/// `UdpState::name`, `IcmpState::name`): TCP's states, then the pseudo-states of UDP and ICMP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CtState {
    /// TCP, first seen mid-stream (no SYN).
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    TimeWait,
    /// TCP, reset or closed; spelled `CLOSE`.
    #[serde(rename = "CLOSE")]
    Close,
    /// UDP and ICMP: no reply yet.
    New,
    /// UDP and ICMP: answered.
    Replied,
}

impl CtState {
    /// Every state, in the order the daemon lists them when it refuses an unknown one.
    pub const ALL: [CtState; 10] = [
        CtState::None,
        CtState::SynSent,
        CtState::SynRecv,
        CtState::Established,
        CtState::FinWait,
        CtState::CloseWait,
        CtState::TimeWait,
        CtState::Close,
        CtState::New,
        CtState::Replied,
    ];

    /// The name a flow shows (`ESTABLISHED`); a filter takes it in any case.
    pub fn name(self) -> &'static str {
        match self {
            CtState::None => "NONE",
            CtState::SynSent => "SYN_SENT",
            CtState::SynRecv => "SYN_RECV",
            CtState::Established => "ESTABLISHED",
            CtState::FinWait => "FIN_WAIT",
            CtState::CloseWait => "CLOSE_WAIT",
            CtState::TimeWait => "TIME_WAIT",
            CtState::Close => "CLOSE",
            CtState::New => "NEW",
            CtState::Replied => "REPLIED",
        }
    }

    /// The accepted names, lower case, as the refusal of an unknown state lists them.
    pub fn accepted() -> String {
        CtState::ALL
            .iter()
            .map(|s| s.name().to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for CtState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl FromStr for CtState {
    type Err = Error;

    /// Any case, as the filter compares.
    fn from_str(s: &str) -> Result<Self, Error> {
        CtState::ALL
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::State(s.to_owned(), CtState::accepted()))
    }
}

/// An IP protocol number; on the wire its name (`tcp`, `udp`, `icmp`, `icmpv6`) or, for another
/// protocol, its number as a string (`"47"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpProtocol(pub u8);

impl IpProtocol {
    pub const ICMP: IpProtocol = IpProtocol(1);
    pub const TCP: IpProtocol = IpProtocol(6);
    pub const UDP: IpProtocol = IpProtocol(17);
    pub const ICMPV6: IpProtocol = IpProtocol(58);

    /// The name of a protocol the datapath knows.
    pub fn name(self) -> Option<&'static str> {
        match self {
            IpProtocol::TCP => Some("tcp"),
            IpProtocol::UDP => Some("udp"),
            IpProtocol::ICMP => Some("icmp"),
            IpProtocol::ICMPV6 => Some("icmpv6"),
            _ => None,
        }
    }
}

impl fmt::Display for IpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.pad(name),
            None => f.pad(&self.0.to_string()),
        }
    }
}

impl FromStr for IpProtocol {
    type Err = Error;

    /// A name in any case, or a number 0-255.
    fn from_str(s: &str) -> Result<Self, Error> {
        [
            IpProtocol::TCP,
            IpProtocol::UDP,
            IpProtocol::ICMP,
            IpProtocol::ICMPV6,
        ]
        .into_iter()
        .find(|p| p.name().is_some_and(|n| n.eq_ignore_ascii_case(s)))
        .or_else(|| s.parse().ok().map(IpProtocol))
        .ok_or_else(|| Error::Protocol(s.to_owned()))
    }
}

impl Serialize for IpProtocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `CtFlow::policy_direction`: the direction of the policy decision, `-` for a flow no
/// policy decided (the load balancer's).
mod dash_if_none {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::policy::Direction;

    pub fn serialize<S: Serializer>(d: &Option<Direction>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.map_or("-", Direction::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Direction>, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "-" => Ok(None),
            "ingress" => Ok(Some(Direction::Ingress)),
            "egress" => Ok(Some(Direction::Egress)),
            other => Err(serde::de::Error::unknown_variant(
                other,
                &["ingress", "egress", "-"],
            )),
        }
    }
}

/// A tracked flow (an element of the answer of `GET /v1/conntrack`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtFlow {
    #[serde(default)]
    pub table: CtTable,
    pub protocol: IpProtocol,
    /// Original direction: source and destination.
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub state: CtState,
    pub packets_orig: u64,
    pub bytes_orig: u64,
    pub packets_reply: u64,
    pub bytes_reply: u64,
    /// First SYN to SYN+ACK (0 when not measured).
    pub rtt_ns: u64,
    pub age_ns: u64,
    pub idle_ns: u64,
    /// Where the flow was decided (policy) or its first packet arrived (load balancer).
    pub ifindex: u32,
    /// The admitting rule's id; `null` for the default action and for load-balancer flows.
    pub rule: Option<u32>,
    /// `ingress` or `egress`; `-` (here `None`) for load-balancer flows.
    #[serde(with = "dash_if_none")]
    pub policy_direction: Option<Direction>,
    /// The name the source asked DNS for the destination (the `dns` module), if any.
    #[serde(default)]
    pub dst_name: Option<String>,
    /// The name the destination asked DNS for the source (a flow seen in reply order).
    #[serde(default)]
    pub src_name: Option<String>,
    /// The process that opened the connection (the `exec` module), if known.
    #[serde(default)]
    pub pid: Option<u32>,
    /// That process's program.
    #[serde(default)]
    pub exe: Option<String>,
}

/// Query of `GET` and `DELETE /v1/conntrack`: every filter given must match.
///
/// The values stay text: the daemon compares them in any case, takes a protocol number too,
/// and refuses an unknown value with the accepted ones ([`CtFilter::validate`]), which a
/// typed field would turn into a generic decoding error.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtFilter {
    /// Either end's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Either end's port, 0-65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `tcp`, `udp`, `icmp` or a protocol number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// A [`CtState`] name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `policy` or `lb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}

impl CtFilter {
    /// Refuses a filter that can match nothing because a value is not one a table can hold:
    /// an unknown state, protocol or table is an invalid argument, not an empty answer.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(state) = &self.state {
            state.parse::<CtState>()?;
        }
        if let Some(protocol) = &self.protocol {
            protocol.parse::<IpProtocol>()?;
        }
        if let Some(table) = &self.table {
            table.parse::<CtTable>()?;
        }
        Ok(())
    }

    /// Whether `flow` passes every filter given.
    pub fn matches(&self, flow: &CtFlow) -> bool {
        self.address.as_ref().is_none_or(|a| {
            a.parse::<IpAddr>()
                .is_ok_and(|a| a == flow.src || a == flow.dst)
        }) && self
            .port
            .is_none_or(|p| p == flow.src_port || p == flow.dst_port)
            && self
                .protocol
                .as_ref()
                .is_none_or(|p| p.parse::<IpProtocol>().is_ok_and(|p| p == flow.protocol))
            && self
                .state
                .as_ref()
                .is_none_or(|s| s.eq_ignore_ascii_case(flow.state.name()))
            && self
                .table
                .as_ref()
                .is_none_or(|t| t.eq_ignore_ascii_case(flow.table.as_str()))
    }

    /// The query string: `?address=...&port=...` in field order, `""` without a filter.
    pub fn to_query(&self) -> String {
        query_string(&[
            ("address", self.address.clone()),
            ("port", self.port.map(|p| p.to_string())),
            ("protocol", self.protocol.clone()),
            ("state", self.state.clone()),
            ("table", self.table.clone()),
        ])
    }
}

/// Answer of `DELETE /v1/conntrack`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushAnswer {
    /// Flows removed, of both tables.
    pub removed: u64,
}

/// Answer of `GET /v1/conntrack/stats`, for the policy table.
///
/// The maps are keyed by name (states as [`CtState::name`], protocols as [`IpProtocol`]
/// shows them) so that they list in name order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtStats {
    pub entries: u64,
    pub capacity: u64,
    pub by_state: BTreeMap<String, u64>,
    pub by_protocol: BTreeMap<String, u64>,
    pub gc_sweeps: u64,
    pub gc_expired: u64,
    pub events_received: u64,
    /// Flow events lost by cause: `ring_full`, `rate_limited`, `slow_reader`.
    pub events_lost: BTreeMap<String, u64>,
    /// Idle timeouts in seconds: `tcp_syn`, `tcp_established`, `tcp_closing`, `udp`, `other`.
    pub timeouts: BTreeMap<String, u64>,
}
