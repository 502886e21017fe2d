//! The node's network as the netlink controller learned it: plain values, and the rules that
//! apply a netlink change to them. No I/O here, so that all of it is tested on the host.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

/// An interface (RTM_NEWLINK).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub mac: Option<Vec<u8>>,
    pub mtu: u32,
    /// IFF_UP.
    pub up: bool,
    pub master: Option<u32>,
}

/// An interface address (RTM_NEWADDR).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Address {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// NUD states (`include/uapi/linux/neighbour.h`).
pub mod nud {
    pub const INCOMPLETE: u16 = 0x01;
    pub const REACHABLE: u16 = 0x02;
    pub const STALE: u16 = 0x04;
    pub const DELAY: u16 = 0x08;
    pub const PROBE: u16 = 0x10;
    pub const FAILED: u16 = 0x20;
    pub const NOARP: u16 = 0x40;
    pub const PERMANENT: u16 = 0x80;
    pub const NONE: u16 = 0x00;

    /// The state's name as `ip neigh` writes it, in lower case.
    pub fn name(state: u16) -> &'static str {
        match state {
            INCOMPLETE => "incomplete",
            REACHABLE => "reachable",
            STALE => "stale",
            DELAY => "delay",
            PROBE => "probe",
            FAILED => "failed",
            NOARP => "noarp",
            PERMANENT => "permanent",
            NONE => "none",
            _ => "unknown",
        }
    }

    /// Packets to a neighbour in this state cannot be sent (yet).
    pub fn unresolved(state: u16) -> bool {
        matches!(state, INCOMPLETE | FAILED | NONE)
    }
}

/// A neighbour entry (RTM_NEWNEIGH), keyed by interface and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub mac: Option<Vec<u8>>,
    pub state: u16,
    /// NTF_EXT_MANAGED.
    pub managed: bool,
    /// NDA_PROTOCOL: who created it ([`super::NEIGH_PROTOCOL`] for the daemon's entries).
    pub protocol: u8,
}

/// A route's identity in the kernel: two routes with the same key replace each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub table: u32,
    pub dst: IpAddr,
    pub dst_len: u8,
    pub tos: u8,
    pub priority: u32,
    /// The output interface (0: none): IPv6 keeps `fe80::/64` once per interface, and IPv4
    /// can hold one prefix on several devices (`ip route append`).
    pub oif: u32,
}

/// A route (RTM_NEWROUTE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub key: RouteKey,
    /// RTN_* (1 unicast, 2 local, ...).
    pub kind: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub prefsrc: Option<IpAddr>,
}

/// One change that netlink announced (or that a dump listed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Link(Link),
    LinkGone(u32),
    Address(Address),
    AddressGone(Address),
    Neighbour(Neighbour),
    NeighbourGone(u32, IpAddr),
    Route(Route),
    RouteGone(RouteKey),
}

/// What kinds of table a batch of changes touched: who has to hear about it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub links: bool,
    pub addresses: bool,
    pub neighbours: bool,
    pub routes: bool,
    /// A link went away or down: the kernel drops its routes without announcing each one
    /// (IPv4's `fib_sync_down_dev`), so the routes must be dumped again.
    pub routes_flushed: bool,
}

impl Touched {
    pub fn any(&self) -> bool {
        self.links || self.addresses || self.neighbours || self.routes
    }
}

pub type Links = BTreeMap<u32, Link>;
pub type Addresses = BTreeSet<Address>;
pub type Neighbours = BTreeMap<(u32, IpAddr), Neighbour>;
pub type Routes = BTreeMap<RouteKey, Route>;

/// The four tables together, as the controller keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub links: Links,
    pub addresses: Addresses,
    pub neighbours: Neighbours,
    pub routes: Routes,
}

impl Tables {
    /// Applies one change; answers what it touched (nothing when it changed nothing).
    pub fn apply(&mut self, change: Change, touched: &mut Touched) {
        match change {
            Change::Link(link) => {
                let old = self.links.get(&link.ifindex);
                if old.is_some_and(|o| o.up && !link.up) {
                    touched.routes_flushed = true;
                }
                if old != Some(&link) {
                    touched.links = true;
                    self.links.insert(link.ifindex, link);
                }
            }
            Change::LinkGone(ifindex) => {
                if self.links.remove(&ifindex).is_some() {
                    touched.links = true;
                    touched.routes_flushed = true;
                }
                // The kernel announces these deletions too, but not always before the link's.
                let before = (self.addresses.len(), self.neighbours.len());
                self.addresses.retain(|a| a.ifindex != ifindex);
                self.neighbours.retain(|(i, _), _| *i != ifindex);
                touched.addresses |= self.addresses.len() != before.0;
                touched.neighbours |= self.neighbours.len() != before.1;
                let routes = self.routes.len();
                self.routes.retain(|_, r| r.oif != Some(ifindex));
                touched.routes |= self.routes.len() != routes;
            }
            Change::Address(a) => touched.addresses |= self.addresses.insert(a),
            Change::AddressGone(a) => touched.addresses |= self.addresses.remove(&a),
            Change::Neighbour(n) => {
                let key = (n.ifindex, n.addr);
                if self.neighbours.get(&key) != Some(&n) {
                    touched.neighbours = true;
                    self.neighbours.insert(key, n);
                }
            }
            Change::NeighbourGone(ifindex, addr) => {
                touched.neighbours |= self.neighbours.remove(&(ifindex, addr)).is_some();
            }
            Change::Route(r) => {
                if self.routes.get(&r.key) != Some(&r) {
                    touched.routes = true;
                    self.routes.insert(r.key, r);
                }
            }
            Change::RouteGone(key) => touched.routes |= self.routes.remove(&key).is_some(),
        }
    }

    /// The interface named `name`, if it exists.
    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.values().find(|l| l.name == name)
    }
}

/// The main routing table's id.
pub const MAIN_TABLE: u32 = 254;

/// The neighbour that packets to `dst` need: `(ifindex, next hop)`, from the longest prefix of
/// the main table that matches (a gateway route's gateway, else `dst` itself on the route's
/// interface). `None` when no unicast route leads there. Policy routing rules are not
/// consulted: the load balancer's `bpf_fib_lookup` uses the main table too.
pub fn next_hop(routes: &Routes, dst: IpAddr) -> Option<(u32, IpAddr)> {
    let mut best: Option<&Route> = None;
    for r in routes.values() {
        if r.key.table != MAIN_TABLE || r.kind != RTN_UNICAST || !contains(r, dst) {
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => {
                r.key.dst_len > b.key.dst_len
                    || (r.key.dst_len == b.key.dst_len && r.key.priority < b.key.priority)
            }
        };
        if better {
            best = Some(r);
        }
    }
    let r = best?;
    Some((r.oif?, r.gateway.unwrap_or(dst)))
}

pub const RTN_UNICAST: u8 = 1;

fn contains(r: &Route, dst: IpAddr) -> bool {
    match (r.key.dst, dst) {
        (IpAddr::V4(net), IpAddr::V4(a)) => {
            let len = u32::from(r.key.dst_len.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(net) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(a)) => {
            let len = u32::from(r.key.dst_len.min(128));
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(net) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// Whether the change from `old` to `new` can change a forwarding decision that the XDP
/// program cached: a neighbour's MAC or resolvability, or any main-table route. A neighbour
/// going REACHABLE -> STALE -> REACHABLE with the same MAC changes nothing.
pub fn neighbours_changed_forwarding(old: &Neighbours, new: &Neighbours) -> bool {
    fn usable(n: &Neighbour) -> Option<Option<&[u8]>> {
        (!nud::unresolved(n.state)).then_some(n.mac.as_deref())
    }
    old.len() != new.len()
        || old
            .iter()
            .zip(new.iter())
            .any(|((ka, a), (kb, b))| ka != kb || usable(a) != usable(b))
}

/// See [`neighbours_changed_forwarding`]: any change of the main table counts.
pub fn routes_changed_forwarding(old: &Routes, new: &Routes) -> bool {
    let main = |r: &Routes| {
        r.iter()
            .filter(|(k, _)| k.table == MAIN_TABLE)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    main(old) != main(new)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn route(dst: &str, len: u8, gw: Option<&str>, oif: u32) -> Route {
        Route {
            key: RouteKey {
                table: MAIN_TABLE,
                dst: v4(dst),
                dst_len: len,
                tos: 0,
                priority: 0,
                oif,
            },
            kind: RTN_UNICAST,
            gateway: gw.map(v4),
            oif: Some(oif),
            prefsrc: None,
        }
    }

    fn neigh(ifindex: u32, addr: &str, mac: u8, state: u16) -> Neighbour {
        Neighbour {
            ifindex,
            addr: v4(addr),
            mac: Some(vec![2, 0, 0, 0, 0, mac]),
            state,
            managed: false,
            protocol: 0,
        }
    }

    #[test]
    fn the_longest_prefix_gives_the_next_hop() {
        let mut routes = Routes::new();
        for r in [
            route("0.0.0.0", 0, Some("198.18.0.1"), 1),
            route("198.18.1.0", 24, None, 2),
            route("198.18.1.128", 25, Some("198.18.1.1"), 3),
        ] {
            routes.insert(r.key, r);
        }
        assert_eq!(
            next_hop(&routes, v4("198.18.1.7")),
            Some((2, v4("198.18.1.7")))
        );
        assert_eq!(
            next_hop(&routes, v4("198.18.1.200")),
            Some((3, v4("198.18.1.1")))
        );
        assert_eq!(
            next_hop(&routes, v4("203.0.113.9")),
            Some((1, v4("198.18.0.1")))
        );
        assert_eq!(next_hop(&Routes::new(), v4("198.18.1.7")), None);
        // Another family never matches an IPv4 prefix.
        assert_eq!(next_hop(&routes, "2001:db8::1".parse().unwrap()), None);
        // Only the main table counts.
        let mut local = route("198.18.9.0", 24, None, 9);
        local.key.table = 255;
        routes.insert(local.key, local);
        assert_eq!(
            next_hop(&routes, v4("198.18.9.1")),
            Some((1, v4("198.18.0.1")))
        );
    }

    #[test]
    fn a_link_that_goes_takes_its_entries_and_asks_for_a_route_dump() {
        let mut t = Tables::default();
        let mut touched = Touched::default();
        let link = Link {
            ifindex: 4,
            name: "veth0".into(),
            mac: None,
            mtu: 1500,
            up: true,
            master: None,
        };
        t.apply(Change::Link(link.clone()), &mut touched);
        t.apply(
            Change::Neighbour(neigh(4, "198.18.0.2", 1, nud::REACHABLE)),
            &mut touched,
        );
        t.apply(
            Change::Route(route("198.18.0.0", 24, None, 4)),
            &mut touched,
        );
        t.apply(
            Change::Address(Address {
                ifindex: 4,
                addr: v4("198.18.0.1"),
                prefix_len: 24,
            }),
            &mut touched,
        );
        assert!(touched.links && touched.neighbours && touched.routes && touched.addresses);
        assert!(!touched.routes_flushed);

        // The same value again touches nothing.
        let mut again = Touched::default();
        t.apply(Change::Link(link.clone()), &mut again);
        assert!(!again.any());

        let mut down = Touched::default();
        t.apply(Change::Link(Link { up: false, ..link }), &mut down);
        assert!(down.links && down.routes_flushed);

        let mut gone = Touched::default();
        t.apply(Change::LinkGone(4), &mut gone);
        assert!(gone.links && gone.neighbours && gone.routes && gone.addresses);
        assert_eq!(t, Tables::default());
    }

    #[test]
    fn only_a_new_mac_or_resolvability_changes_forwarding() {
        let table = |ns: &[Neighbour]| -> Neighbours {
            ns.iter()
                .map(|n| ((n.ifindex, n.addr), n.clone()))
                .collect()
        };
        let reachable = table(&[neigh(2, "198.18.0.2", 1, nud::REACHABLE)]);
        let stale = table(&[neigh(2, "198.18.0.2", 1, nud::STALE)]);
        let moved = table(&[neigh(2, "198.18.0.2", 9, nud::REACHABLE)]);
        let failed = table(&[neigh(2, "198.18.0.2", 1, nud::FAILED)]);
        assert!(!neighbours_changed_forwarding(&reachable, &stale));
        assert!(neighbours_changed_forwarding(&reachable, &moved));
        assert!(neighbours_changed_forwarding(&stale, &failed));
        assert!(neighbours_changed_forwarding(
            &reachable,
            &Neighbours::new()
        ));

        let mut a = Routes::new();
        let r = route("198.18.0.0", 24, None, 2);
        a.insert(r.key, r);
        let mut b = a.clone();
        assert!(!routes_changed_forwarding(&a, &b));
        let mut other = route("198.18.0.0", 24, None, 3);
        other.key.table = 100;
        b.insert(other.key, other);
        assert!(!routes_changed_forwarding(&a, &b), "another table");
        let r2 = route("198.18.0.0", 24, Some("198.18.0.9"), 2);
        b.insert(r2.key, r2);
        assert!(routes_changed_forwarding(&a, &b));
    }

    #[test]
    fn names_of_states_and_macs() {
        assert_eq!(nud::name(nud::REACHABLE), "reachable");
        assert_eq!(nud::name(nud::FAILED), "failed");
        assert!(nud::unresolved(nud::INCOMPLETE));
        assert!(!nud::unresolved(nud::STALE));
        assert_eq!(
            mac_string(&[0x02, 0, 0xab, 1, 2, 0xff]),
            "02:00:ab:01:02:ff"
        );
        let _ = Ipv4Addr::LOCALHOST;
    }
}
