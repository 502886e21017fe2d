//! netlink-packet-route messages to the controller's [`Change`]s, and raw datagrams to
//! messages. A message that does not parse is an error the caller counts; the rest of its
//! datagram still counts.
use std::net::IpAddr;

use netlink_packet_core::{
    NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};

use super::model::{Address, Change, Link, Neighbour, Route, RouteKey};

/// Why a message was not applied.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not a message the controller follows (another family, a table change, ...).
    Ignored,
    /// Malformed: counted.
    Invalid(String),
}

pub fn link(m: &LinkMessage) -> Result<Link, Skip> {
    let mut name = None;
    let mut mac = None;
    let mut mtu = 0;
    let mut master = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) if !a.is_empty() => mac = Some(a.clone()),
            LinkAttribute::Mtu(v) => mtu = *v,
            LinkAttribute::Controller(v) => master = Some(*v),
            _ => {}
        }
    }
    let name =
        name.ok_or_else(|| Skip::Invalid(format!("link {} without a name", m.header.index)))?;
    Ok(Link {
        ifindex: m.header.index,
        name,
        mac,
        mtu,
        up: m.header.flags.contains(LinkFlags::Up),
        master,
    })
}

pub fn address(m: &AddressMessage) -> Result<Address, Skip> {
    let mut addr = None;
    let mut local = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Address(ip) => addr = Some(*ip),
            AddressAttribute::Local(ip) => local = Some(*ip),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point
    // links (and the same as IFA_LOCAL elsewhere), which is what `ip addr` shows too.
    let addr = local.or(addr).ok_or(Skip::Ignored)?;
    Ok(Address {
        ifindex: m.header.index,
        addr,
        prefix_len: m.header.prefix_len,
    })
}

pub fn neighbour(m: &NeighbourMessage) -> Result<Neighbour, Skip> {
    if !matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6) {
        // Bridge forwarding entries share the message type.
        return Err(Skip::Ignored);
    }
    let mut addr = None;
    let mut mac = None;
    let mut managed = false;
    let mut protocol = 0;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                addr = Some(IpAddr::V4(*ip))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                addr = Some(IpAddr::V6(*ip))
            }
            NeighbourAttribute::LinkLayerAddress(l) if !l.is_empty() => mac = Some(l.clone()),
            NeighbourAttribute::ExtFlags(f) => managed = f.contains(NeighbourExtFlags::Managed),
            NeighbourAttribute::Protocol(p) => protocol = u8::from(*p),
            _ => {}
        }
    }
    let addr = addr.ok_or_else(|| Skip::Invalid("neighbour without an address".into()))?;
    if u16::from(m.header.state) == super::model::nud::NOARP {
        // Multicast and broadcast mappings: the kernel creates them without announcing them,
        // no next hop is one, and `ip neigh` hides them too.
        return Err(Skip::Ignored);
    }
    Ok(Neighbour {
        ifindex: m.header.ifindex,
        addr,
        mac,
        state: u16::from(m.header.state),
        managed,
        protocol,
    })
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

pub fn route(m: &RouteMessage) -> Result<Route, Skip> {
    let unspecified = match m.header.address_family {
        AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => return Err(Skip::Ignored),
    };
    let mut table = u32::from(m.header.table);
    let mut dst = unspecified;
    let mut gateway = None;
    let mut oif = None;
    let mut prefsrc = None;
    let mut priority = 0;
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => {
                dst = route_addr(d).ok_or_else(|| Skip::Invalid("route destination".into()))?
            }
            RouteAttribute::Gateway(g) => gateway = route_addr(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(p) => prefsrc = route_addr(p),
            RouteAttribute::Priority(p) => priority = *p,
            _ => {}
        }
    }
    let max = if dst.is_ipv4() { 32 } else { 128 };
    if m.header.destination_prefix_length > max {
        return Err(Skip::Invalid(format!(
            "route prefix length {}",
            m.header.destination_prefix_length
        )));
    }
    Ok(Route {
        key: RouteKey {
            table,
            dst,
            dst_len: m.header.destination_prefix_length,
            tos: m.header.tos,
            priority,
            oif: oif.unwrap_or(0),
        },
        kind: u8::from(m.header.kind),
        gateway,
        oif,
        prefsrc,
    })
}

/// The change one rtnetlink message announces.
pub fn change(m: &RouteNetlinkMessage) -> Result<Change, Skip> {
    Ok(match m {
        RouteNetlinkMessage::NewLink(l) => Change::Link(link(l)?),
        RouteNetlinkMessage::DelLink(l) => Change::LinkGone(l.header.index),
        RouteNetlinkMessage::NewAddress(a) => Change::Address(address(a)?),
        RouteNetlinkMessage::DelAddress(a) => Change::AddressGone(address(a)?),
        RouteNetlinkMessage::NewNeighbour(n) => Change::Neighbour(neighbour(n)?),
        RouteNetlinkMessage::DelNeighbour(n) => {
            let n = neighbour(n)?;
            Change::NeighbourGone(n.ifindex, n.addr)
        }
        RouteNetlinkMessage::NewRoute(r) => Change::Route(route(r)?),
        RouteNetlinkMessage::DelRoute(r) => Change::RouteGone(route(r)?.key),
        _ => return Err(Skip::Ignored),
    })
}

/// What one datagram of the event socket held.
#[derive(Debug, Default)]
pub struct Datagram {
    pub changes: Vec<Change>,
    /// Messages that did not parse.
    pub invalid: Vec<String>,
    /// The kernel (or netlink-proto's convention) reported an overrun.
    pub overrun: bool,
}

const HEADER_LEN: usize = 16;

/// Splits a datagram into messages by their headers and parses each. A message whose payload
/// does not parse is skipped; a header whose length is impossible ends the datagram (the
/// rest cannot be framed).
pub fn datagram(mut bytes: &[u8]) -> Datagram {
    let mut out = Datagram::default();
    while bytes.len() >= HEADER_LEN {
        let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if len < HEADER_LEN || len > bytes.len() {
            out.invalid.push(format!(
                "message length {len} of {} bytes left",
                bytes.len()
            ));
            return out;
        }
        let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
        let message = &bytes[..len];
        // Messages are 4-byte aligned within a datagram.
        bytes = &bytes[(len + 3).min(bytes.len()) & !3usize..];
        match kind {
            NLMSG_NOOP | NLMSG_DONE => continue,
            NLMSG_OVERRUN => {
                out.overrun = true;
                continue;
            }
            NLMSG_ERROR => continue,
            _ => {}
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
            Ok(msg) => match msg.payload {
                NetlinkPayload::InnerMessage(inner) => match change(&inner) {
                    Ok(c) => out.changes.push(c),
                    Err(Skip::Ignored) => {}
                    Err(Skip::Invalid(why)) => out.invalid.push(why),
                },
                NetlinkPayload::Overrun(_) => out.overrun = true,
                _ => {}
            },
            Err(e) => out.invalid.push(format!("message type {kind}: {e}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage};
    use netlink_packet_route::{
        neighbour::{NeighbourHeader, NeighbourState},
        route::{RouteHeader, RouteType},
    };

    use super::*;
    use crate::netlink::model::nud;

    fn bytes(payload: RouteNetlinkMessage) -> Vec<u8> {
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(payload));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn neigh_msg(mac: u8) -> RouteNetlinkMessage {
        let mut n = NeighbourMessage::default();
        n.header = NeighbourHeader {
            family: AddressFamily::Inet,
            ifindex: 3,
            state: NeighbourState::Reachable,
            ..Default::default()
        };
        n.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet("198.18.0.2".parse().unwrap())),
            NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, mac]),
            NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed),
        ];
        RouteNetlinkMessage::NewNeighbour(n)
    }

    #[test]
    fn a_datagram_of_several_messages_keeps_what_parses() {
        let mut route = RouteMessage::default();
        route.header = RouteHeader {
            address_family: AddressFamily::Inet,
            destination_prefix_length: 24,
            table: 254,
            kind: RouteType::Unicast,
            ..Default::default()
        };
        route.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet("198.19.1.0".parse().unwrap())),
            RouteAttribute::Oif(7),
        ];
        let mut dgram = bytes(neigh_msg(1));
        // A message whose payload is garbage, framed correctly (type RTM_NEWROUTE, 4 bytes).
        let mut junk = vec![0u8; 20];
        junk[0..4].copy_from_slice(&20u32.to_ne_bytes());
        junk[4..6].copy_from_slice(&24u16.to_ne_bytes());
        dgram.extend_from_slice(&junk);
        dgram.extend(bytes(RouteNetlinkMessage::NewRoute(route)));
        let got = datagram(&dgram);
        assert_eq!(got.invalid.len(), 1, "{:?}", got.invalid);
        assert!(!got.overrun);
        assert_eq!(got.changes.len(), 2);
        match &got.changes[0] {
            Change::Neighbour(n) => {
                assert_eq!(n.addr, "198.18.0.2".parse::<IpAddr>().unwrap());
                assert_eq!(n.state, nud::REACHABLE);
                assert!(n.managed);
                assert_eq!(n.mac.as_deref(), Some(&[2, 0, 0, 0, 0, 1][..]));
            }
            other => panic!("{other:?}"),
        }
        match &got.changes[1] {
            Change::Route(r) => {
                assert_eq!((r.key.table, r.key.dst_len, r.oif), (254, 24, Some(7)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_length_ends_the_datagram_and_is_counted() {
        let mut dgram = bytes(neigh_msg(1));
        let mut bad = vec![0u8; 16];
        bad[0..4].copy_from_slice(&4000u32.to_ne_bytes());
        dgram.extend_from_slice(&bad);
        let got = datagram(&dgram);
        assert_eq!(got.changes.len(), 1);
        assert_eq!(got.invalid.len(), 1);
        // Fewer bytes than a header: nothing, and no panic.
        assert!(datagram(&[1, 2, 3]).changes.is_empty());
    }

    #[test]
    fn an_overrun_marker_is_reported() {
        let mut over = vec![0u8; 16];
        over[0..4].copy_from_slice(&16u32.to_ne_bytes());
        over[4..6].copy_from_slice(&NLMSG_OVERRUN.to_ne_bytes());
        assert!(datagram(&over).overrun);
    }

    #[test]
    fn bridge_entries_are_ignored_not_counted() {
        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Bridge;
        assert_eq!(neighbour(&n), Err(Skip::Ignored));
    }
}
