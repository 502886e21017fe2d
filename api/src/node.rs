//! `GET /v1/node`: what the netlink controller learned of the node's network namespace.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::status::{LinkStatus, NetlinkStatus};

/// An address of an interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AddressView {
    pub ifindex: u32,
    pub interface: String,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// A neighbour entry (ARP or NDP) of the kernel.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NeighbourView {
    pub ifindex: u32,
    pub interface: String,
    pub addr: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The NUD state in lower case (see `NeighbourStatus::state`).
    pub state: String,
    /// NTF_EXT_MANAGED: the kernel keeps it resolved.
    pub managed: bool,
}

/// A route of any table, IPv4 or IPv6.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteView {
    /// The routing table's id (254 is `main`, 255 `local`).
    pub table: u32,
    /// `198.18.0.0/24`, `2001:db8::/64`; `default` for a zero-length prefix, as `ip route`
    /// writes it (with `family` telling which).
    pub dst: String,
    /// `inet` or `inet6`.
    pub family: String,
    /// `unicast`, `local`, `broadcast`, `blackhole`, `unreachable`, `prohibit`, `multicast`,
    /// `anycast`, or the number of another type.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifindex: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefsrc: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// Body of `GET /v1/node`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Whether the view is complete: false until the first dump is in, and during a resync.
    pub ready: bool,
    pub links: Vec<LinkStatus>,
    pub addresses: Vec<AddressView>,
    pub neighbours: Vec<NeighbourView>,
    pub routes: Vec<RouteView>,
    pub netlink: NetlinkStatus,
}
