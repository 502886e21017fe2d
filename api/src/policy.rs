//! The policy module's routes: `GET`, `PUT` and `DELETE /v1/policy`.
//!
//! [`PolicySpec`] is both the policy file (YAML, parsed by the daemon with these types) and the
//! `policy` an answer shows; [`PolicyStatus`] is every answer of the three routes.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// Body of `PUT /v1/policy`: the policy file's text (YAML), applied whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyPolicy {
    pub text: String,
}

/// What a rule or a default does with a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Allow and report the flow as a `logged` event.
    Log,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Log => "log",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Protocol a rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    #[default]
    Any,
    Tcp,
    Udp,
    /// ICMP (IPv4).
    Icmp,
    /// ICMPv6 (neighbour discovery always passes whatever the rules say).
    Icmpv6,
}

impl RuleProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleProtocol::Any => "any",
            RuleProtocol::Tcp => "tcp",
            RuleProtocol::Udp => "udp",
            RuleProtocol::Icmp => "icmp",
            RuleProtocol::Icmpv6 => "icmpv6",
        }
    }
}

impl fmt::Display for RuleProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The direction of a rule, a decision or an event, as the interface sees the packet:
/// `ingress` (it receives it; rules match the source) or `egress` (it sends it; rules match
/// the destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// An address prefix, written `a.b.c.d/len` or `2001:db8::/32`, or a bare address (the whole
/// address: `/32` or `/128`); on the wire always `ADDR/LEN`.
///
/// [`Cidr::ANY`], `0.0.0.0/0` (what a rule without `cidr` matches), is every address of both
/// families, so a policy written before IPv6 governs IPv6 alike; `::/0` is every IPv6 address,
/// and any other prefix matches its own family only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// `0.0.0.0/0`: every address, IPv4 and IPv6.
    pub const ANY: Cidr = Cidr {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        len: 0,
    };
    /// `::/0`: every IPv6 address. [`Cidr::ANY`] stands for it, beside `0.0.0.0/0`, in the
    /// IPv6 half of the rule tables.
    pub const ANY_V6: Cidr = Cidr {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        len: 0,
    };

    /// The address as a 128-bit number (an IPv4 address in the low 32 bits) and the family's
    /// width in bits.
    fn bits(addr: IpAddr) -> (u128, u8) {
        match addr {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        }
    }

    /// The network mask of a `len`-bit prefix in a family `width` bits wide.
    fn mask(len: u8, width: u8) -> u128 {
        // A shift by the full width overflows, hence the special case.
        if len == 0 {
            0
        } else {
            (u128::MAX << (128 - u32::from(len))) >> (128 - u32::from(width))
        }
    }

    /// True when `self` contains every address of `other`.
    pub fn contains(&self, other: &Cidr) -> bool {
        if *self == Cidr::ANY {
            return true;
        }
        if self.addr.is_ipv4() != other.addr.is_ipv4() || self.len > other.len {
            return false;
        }
        let (a, width) = Self::bits(self.addr);
        let (b, _) = Self::bits(other.addr);
        let mask = Self::mask(self.len, width);
        a & mask == b & mask
    }
}

impl Default for Cidr {
    fn default() -> Self {
        Cidr::ANY
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| Error::CidrAddress(s.to_owned()))?;
        let (bits, width) = Cidr::bits(addr);
        let len = match len {
            None => width,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= width)
                .ok_or_else(|| Error::CidrPrefix(s.to_owned()))?,
        };
        // Refused rather than masked: `10.0.0.1/8` is more likely a typo than a wish.
        if bits & !Cidr::mask(len, width) & (u128::MAX >> (128 - u32::from(width))) != 0 {
            return Err(Error::CidrHostBits(s.to_owned()));
        }
        Ok(Cidr { addr, len })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An inclusive destination port range. Written `8080` (a number or a string) or
/// `"8000-8100"`; on the wire always a string (`"8080"`, `"8000-8100"`, `"0-65535"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    /// Every port, what a rule without `ports` matches.
    pub const ALL: PortRange = PortRange {
        min: 0,
        max: u16::MAX,
    };
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange::ALL
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

impl FromStr for PortRange {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| Error::Port(p.to_owned(), s.to_owned()))
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if min > max {
            return Err(Error::EmptyPortRange(s.to_owned()));
        }
        Ok(PortRange { min, max })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortRange;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (0-65535) or a range \"lo-hi\"")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<PortRange, E> {
                u16::try_from(n)
                    .map(|p| PortRange { min: p, max: p })
                    .map_err(|_| E::custom(Error::PortNumber(i128::from(n))))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<PortRange, E> {
                u16::try_from(n)
                    .map(|p| PortRange { min: p, max: p })
                    .map_err(|_| E::custom(Error::PortNumber(i128::from(n))))
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PortRange, E> {
                s.parse().map_err(E::custom)
            }
        }

        d.deserialize_any(Visitor)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One rule of a policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The remote address: the source of an ingress packet, the destination of an egress one.
    #[serde(default)]
    pub cidr: Cidr,
    #[serde(default)]
    pub protocol: RuleProtocol,
    /// Destination ports (only with `tcp` or `udp`); absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    pub action: Action,
}

/// The policy of one endpoint: an interface name or pattern (`*` and `?`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub interface: String,
    #[serde(default)]
    pub default_ingress: Action,
    #[serde(default)]
    pub default_egress: Action,
    #[serde(default)]
    pub ingress: Vec<RuleSpec>,
    #[serde(default)]
    pub egress: Vec<RuleSpec>,
}

/// A whole policy file; in an answer, the policy in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

/// A rule of the policy in force, as compiled: where it sits and what it matches, defaults
/// filled in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    /// Index in the rule counters.
    pub id: u32,
    /// The endpoint's interface pattern.
    pub endpoint: String,
    pub direction: Direction,
    /// Position in the endpoint's rules of that direction (0-based).
    pub index: u32,
    /// `null` for an unnamed rule (never absent).
    pub name: Option<String>,
    pub cidr: Cidr,
    pub protocol: RuleProtocol,
    pub ports: PortRange,
    pub action: Action,
}

impl RuleInfo {
    /// The rule's user-visible name: its `name`, else `#<index>`. What identifies it across
    /// policy changes (its counters keep counting under that name) and the `rule` label of
    /// the metrics.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("#{}", self.index))
    }
}

/// A rule and its counters (summed over CPUs, totalled over applies by the rule's identity).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStats {
    /// On the wire the rule's fields sit next to `packets` and `bytes`, in one object.
    #[serde(flatten)]
    pub rule: RuleInfo,
    pub packets: u64,
    pub bytes: u64,
}

/// Counters of one endpoint (summed over CPUs), by direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCounters {
    /// The endpoint's interface pattern.
    pub endpoint: String,
    /// The interfaces it matched.
    pub interfaces: Vec<String>,
    pub ingress: DirCounters,
    pub egress: DirCounters,
}

/// New-flow verdicts of one endpoint in one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirCounters {
    pub allowed: u64,
    pub denied: u64,
    /// Decided by the endpoint's default action (no rule matched).
    pub default_hits: u64,
    pub tracked: u64,
    /// Tracked flows removed because the policy in force no longer allows them.
    pub cut: u64,
}

/// Answer of every policy route: the policy in force and its counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// The live half of the double-buffered maps (0: no policy applied yet).
    pub generation: u32,
    pub policy: PolicySpec,
    pub endpoints: Vec<EndpointCounters>,
    pub rules: Vec<RuleStats>,
    /// The tc programs' outcome counters (`TC_REASONS`) by name.
    pub reasons: BTreeMap<String, u64>,
}
