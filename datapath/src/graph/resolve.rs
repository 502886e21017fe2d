//! Naming a flow's two ends from what the other modules publish (see the module above).
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use datapath_api::{GraphNodeKind, GraphSources, Protocol, ServiceKey, ServiceSource};

use super::model::{EndFigures, Failure, FastMap, FlowRecord, Label, NodeRef, Transport};
use crate::{
    bus::StateReader,
    ct::FlowEventView,
    exec::owners::Owner,
    lb::{CatalogEntry, ServiceCatalog},
};

/// A flow's tuple, as its events spell it: (protocol number, source, port, destination, port).
pub type FlowKey = (u8, IpAddr, u16, IpAddr, u16);

/// The event's tuple, parsed once (`None`: not TCP or UDP, or an address that does not parse:
/// nothing to draw).
pub fn flow_key(e: &FlowEventView) -> Option<FlowKey> {
    let proto = match e.protocol.as_str() {
        "tcp" => Protocol::Tcp.number(),
        "udp" => Protocol::Udp.number(),
        _ => return None,
    };
    Some((
        proto,
        parse_addr(&e.src)?,
        e.src_port,
        parse_addr(&e.dst)?,
        e.dst_port,
    ))
}

/// An address as the flow events spell it. A dotted quad in the canonical spelling (what the
/// conntrack writes) is read directly, at a fraction of the general parser's cost: two per
/// event; anything else goes through `IpAddr`'s parser, which refuses what it refuses.
fn parse_addr(s: &str) -> Option<IpAddr> {
    canonical_ipv4(s.as_bytes())
        .map(IpAddr::from)
        .or_else(|| s.parse().ok())
}

/// `a.b.c.d` with each part 0-255 and no leading zero, else `None` (then the caller asks the
/// general parser, so `None` here never refuses a valid address).
fn canonical_ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for octet in &mut out {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || (part.len() > 1 && part[0] == b'0') {
            return None;
        }
        let mut v: u16 = 0;
        for &d in part {
            if !d.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u16::from(d - b'0');
        }
        *octet = u8::try_from(v).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// One service as the graph names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub key: ServiceKey,
    pub label: Arc<str>,
    pub namespace: Option<Arc<str>>,
}

impl ServiceName {
    fn of(e: &CatalogEntry) -> Self {
        match (&e.owner, e.source) {
            // Kubernetes owners are `namespace/name`.
            (Some(owner), ServiceSource::Kubernetes) => Self {
                key: e.key,
                label: owner.as_str().into(),
                namespace: owner.split_once('/').map(|(ns, _)| ns.into()),
            },
            (Some(owner), _) if !owner.is_empty() => Self {
                key: e.key,
                label: owner.as_str().into(),
                namespace: None,
            },
            _ => Self {
                key: e.key,
                label: SocketAddr::new(e.key.vip, e.key.port).to_string().into(),
                namespace: None,
            },
        }
    }
}

/// The service catalog indexed for lookups by VIP, by backend and by backend address.
#[derive(Debug, Default)]
pub struct Directory {
    services: Vec<ServiceName>,
    by_vip: FastMap<(IpAddr, u16, u8), usize>,
    by_backend: FastMap<(IpAddr, u16, u8), usize>,
    /// A backend's address, whatever the port: the service a caller at that address serves.
    /// An address that backs several services names the first by key.
    by_address: FastMap<IpAddr, usize>,
}

impl Directory {
    pub fn new(catalog: &ServiceCatalog) -> Self {
        let mut d = Directory::default();
        for e in catalog {
            let i = d.services.len();
            d.services.push(ServiceName::of(e));
            let proto = e.key.proto.number();
            d.by_vip.insert((e.key.vip, e.key.port, proto), i);
            for b in &e.backends {
                d.by_backend.entry((b.ip(), b.port(), proto)).or_insert(i);
                d.by_address.entry(b.ip()).or_insert(i);
            }
        }
        d
    }

    fn vip(&self, addr: IpAddr, port: u16, proto: u8) -> Option<&ServiceName> {
        self.by_vip
            .get(&(addr, port, proto))
            .map(|i| &self.services[*i])
    }

    fn backend(&self, addr: IpAddr, port: u16, proto: u8) -> Option<&ServiceName> {
        self.by_backend
            .get(&(addr, port, proto))
            .map(|i| &self.services[*i])
    }

    fn serving(&self, addr: IpAddr) -> Option<&ServiceName> {
        self.by_address.get(&addr).map(|i| &self.services[*i])
    }
}

/// What the resolver reads: the other modules' handles.
pub struct Resolver {
    pub catalog: StateReader<ServiceCatalog>,
    pub names: StateReader<crate::dns::NameHandle>,
    pub owners: StateReader<crate::exec::OwnerHandle>,
    /// The directory of the catalog's last version.
    pub directory: Mutex<Option<(u64, Arc<Directory>)>>,
}

/// The other modules' state as it is now, taken once for a batch of flows.
pub struct Lookups {
    pub directory: Arc<Directory>,
    names: Arc<crate::dns::NameHandle>,
    owners: Arc<crate::exec::OwnerHandle>,
}

impl Lookups {
    fn name_of(&self, client: IpAddr, addr: IpAddr) -> Option<Arc<str>> {
        self.names.as_ref().as_ref()?.name_of(client, addr)
    }
}

fn service_node(s: &ServiceName, address: IpAddr, name: Option<Arc<str>>) -> NodeRef {
    NodeRef {
        kind: GraphNodeKind::Service,
        label: Label::Text(Arc::clone(&s.label)),
        namespace: s.namespace.clone(),
        address: Some(address),
        vip: Some(s.key.vip),
        name,
    }
}

fn external_node(address: IpAddr, name: Option<Arc<str>>) -> NodeRef {
    NodeRef {
        kind: GraphNodeKind::External,
        label: match &name {
            Some(n) => Label::Text(Arc::clone(n)),
            None => Label::Address(address),
        },
        namespace: None,
        address: Some(address),
        vip: None,
        name,
    }
}

/// A pod or a program: the caller the exec module names (no address for a socket with none).
fn owner_node(o: &Owner, address: Option<IpAddr>) -> NodeRef {
    NodeRef {
        // A pod's cgroup names the pod by uid only; its name is Kubernetes' to say.
        kind: if o.pod_uid.is_some() {
            GraphNodeKind::Workload
        } else {
            GraphNodeKind::Process
        },
        label: match &o.pod_uid {
            Some(uid) => Label::Pod(Arc::clone(uid)),
            None => Label::Text(Arc::clone(&o.exe)),
        },
        namespace: None,
        address,
        vip: None,
        name: None,
    }
}

fn transport(proto: u8) -> Transport {
    if proto == Protocol::Udp.number() {
        Transport::Udp
    } else {
        Transport::Tcp
    }
}

/// What a flow event says about how its connection ended.
pub fn failure_of(e: &FlowEventView) -> Option<Failure> {
    match e.kind.as_str() {
        "denied" | "cut" => Some(Failure::Denied),
        // A TCP flow that ended in a reset: refused when the handshake never completed.
        "closed" if e.state == "CLOSE" => Some(if e.rtt_ns == 0 {
            Failure::Refused
        } else {
            Failure::Reset
        }),
        _ => None,
    }
}

/// The figures an end event adds to its edge.
pub fn end_figures(e: &FlowEventView) -> EndFigures {
    EndFigures {
        bytes_sent: e.bytes_orig,
        bytes_received: e.bytes_reply,
        rtt_us: (e.rtt_ns > 0).then(|| u32::try_from(e.rtt_ns / 1000).unwrap_or(u32::MAX)),
        failure: failure_of(e),
    }
}

impl Resolver {
    /// The directory of the catalog as it is now (rebuilt when the catalog changed).
    pub fn directory(&self) -> Arc<Directory> {
        let (catalog, version) = self.catalog.get_versioned();
        let mut cached = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        match &*cached {
            Some((v, d)) if *v == version => Arc::clone(d),
            _ => {
                let d = Arc::new(Directory::new(&catalog));
                *cached = Some((version, Arc::clone(&d)));
                d
            }
        }
    }

    /// The directory, names and owners as they are now.
    pub fn lookups(&self) -> Lookups {
        Lookups {
            directory: self.directory(),
            names: self.names.get(),
            owners: self.owners.get(),
        }
    }

    pub fn sources(&self) -> GraphSources {
        GraphSources {
            names: self.names.get().is_some(),
            processes: self.owners.get().is_some(),
            services: self.catalog.is_ready(),
        }
    }

    /// A connect the socket LB refused for want of a backend, as a failed connection from the
    /// process to the service. The caller is its pod or program when the exec module knows the
    /// pid, else the pid (the socket has no address yet).
    pub fn refused(&self, l: &Lookups, d: &datapath_api::SockLbDecision, now_s: u64) -> FlowRecord {
        let proto = d.proto.number();
        let vip = d.vip.ip();
        let unspecified = if vip.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u8; 16])
        };
        let name = l.name_of(unspecified, vip);
        let callee = match l.directory.vip(vip, d.vip.port(), proto) {
            Some(s) => service_node(s, vip, name),
            None => external_node(vip, name),
        };
        let owner = l
            .owners
            .as_ref()
            .as_ref()
            .and_then(|o| o.process_of(d.pid))
            .filter(|o| !o.exe.is_empty());
        let caller = match &owner {
            Some(o) => owner_node(o, None),
            None => NodeRef {
                kind: GraphNodeKind::Process,
                label: Label::Pid(d.pid),
                namespace: None,
                address: None,
                vip: None,
                name: None,
            },
        };
        FlowRecord {
            caller,
            callee,
            protocol: transport(proto),
            port: d.vip.port(),
            connections: 1,
            bytes_sent: 0,
            bytes_received: 0,
            rtt_us: None,
            failure: Some(Failure::NoBackend),
            exe: owner.map(|o| o.exe),
            now_s,
        }
    }

    /// The flow of `e` as an edge's record: one connection, its bytes, round-trip time and
    /// failure. `None` for what is not TCP or UDP, or an address that does not parse.
    pub fn resolve(&self, l: &Lookups, e: &FlowEventView, now_s: u64) -> Option<FlowRecord> {
        Some(self.resolve_key(l, flow_key(e)?, &end_figures(e), now_s))
    }

    /// [`Resolver::resolve`] of a tuple already parsed, with its end's figures (zero for a
    /// flow counted before its end). Shares what the catalog, the names and the owners hold:
    /// no string is copied.
    pub fn resolve_key(
        &self,
        l: &Lookups,
        key: FlowKey,
        end: &EndFigures,
        now_s: u64,
    ) -> FlowRecord {
        let (proto, src, src_port, dst, dst_port) = key;
        let dir = &l.directory;
        let owner = if proto == Protocol::Tcp.number() {
            l.owners
                .as_ref()
                .as_ref()
                .and_then(|o| o.owner_of(src, src_port, dst, dst_port))
                .filter(|o| !o.exe.is_empty())
        } else {
            None
        };
        let (callee, port) = if let Some(s) = dir.vip(dst, dst_port, proto) {
            (service_node(s, dst, l.name_of(src, dst)), dst_port)
        } else if let Some(s) = dir.backend(dst, dst_port, proto) {
            // Reached through the socket LB (or directly): named by its VIP.
            let name = l.name_of(src, s.key.vip).or_else(|| l.name_of(src, dst));
            (service_node(s, dst, name), s.key.port)
        } else {
            (external_node(dst, l.name_of(src, dst)), dst_port)
        };
        let caller = if let Some(s) = dir.serving(src) {
            service_node(s, src, None)
        } else if let Some(o) = &owner {
            owner_node(o, Some(src))
        } else {
            external_node(src, l.name_of(dst, src))
        };
        FlowRecord {
            caller,
            callee,
            protocol: transport(proto),
            port,
            connections: 1,
            bytes_sent: end.bytes_sent,
            bytes_received: end.bytes_received,
            rtt_us: end.rtt_us.map(u64::from),
            failure: end.failure,
            exe: owner.map(|o| o.exe),
            now_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direct_ipv4_reader_agrees_with_the_general_parser() {
        for s in [
            "198.18.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.244.3.17",
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3",
            "1.2.3.4.5",
            "1..2.3",
            "1.2.3.4 ",
            "+1.2.3.4",
            "",
            "2001:db8::1",
            "::ffff:198.18.0.1",
            "1.2.3.1000",
        ] {
            assert_eq!(parse_addr(s), s.parse::<IpAddr>().ok(), "{s:?}");
            if let Some(direct) = canonical_ipv4(s.as_bytes()) {
                assert_eq!(Some(IpAddr::from(direct)), s.parse().ok(), "{s:?}");
            }
        }
    }
}
