//! Naming a flow's two ends from what the other modules publish (see the module above).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use datapath_api::{GraphNodeKind, GraphSources, Protocol, ServiceKey, ServiceSource};

use super::model::{Failure, FlowRecord, NodeRef};
use crate::{
    bus::StateReader,
    ct::FlowEventView,
    lb::{CatalogEntry, ServiceCatalog},
};

/// One service as the graph names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub key: ServiceKey,
    pub label: String,
    pub namespace: Option<String>,
}

impl ServiceName {
    fn of(e: &CatalogEntry) -> Self {
        let vip = SocketAddr::new(e.key.vip, e.key.port).to_string();
        match (&e.owner, e.source) {
            // Kubernetes owners are `namespace/name`.
            (Some(owner), ServiceSource::Kubernetes) => Self {
                key: e.key,
                label: owner.clone(),
                namespace: owner.split_once('/').map(|(ns, _)| ns.to_string()),
            },
            (Some(owner), _) if !owner.is_empty() => Self {
                key: e.key,
                label: owner.clone(),
                namespace: None,
            },
            _ => Self {
                key: e.key,
                label: vip,
                namespace: None,
            },
        }
    }
}

/// The service catalog indexed for lookups by VIP, by backend and by backend address.
#[derive(Debug, Default)]
pub struct Directory {
    services: Vec<ServiceName>,
    by_vip: HashMap<(IpAddr, u16, u8), usize>,
    by_backend: HashMap<(IpAddr, u16, u8), usize>,
    /// A backend's address, whatever the port: the service a caller at that address serves.
    /// An address that backs several services names the first by key.
    by_address: HashMap<IpAddr, usize>,
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

fn protocol_number(name: &str) -> Option<(u8, &'static str)> {
    match name {
        "tcp" => Some((Protocol::Tcp.number(), "tcp")),
        "udp" => Some((Protocol::Udp.number(), "udp")),
        _ => None,
    }
}

fn service_node(s: &ServiceName, address: IpAddr, name: Option<String>) -> NodeRef {
    NodeRef {
        kind: GraphNodeKind::Service,
        label: s.label.clone(),
        namespace: s.namespace.clone(),
        address: Some(address),
        vip: Some(s.key.vip),
        name,
    }
}

fn external_node(address: IpAddr, name: Option<String>) -> NodeRef {
    NodeRef {
        kind: GraphNodeKind::External,
        label: name.clone().unwrap_or_else(|| address.to_string()),
        namespace: None,
        address: Some(address),
        vip: None,
        name,
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
    pub fn refused(
        &self,
        dir: &Directory,
        d: &datapath_api::SockLbDecision,
        now_s: u64,
    ) -> FlowRecord {
        let proto = d.proto.number();
        let protocol = if d.proto == Protocol::Udp {
            "udp"
        } else {
            "tcp"
        };
        let vip = d.vip.ip();
        let unspecified = if vip.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u8; 16])
        };
        let names = self.names.get();
        let name = names
            .as_ref()
            .as_ref()
            .and_then(|n| n.name_of(unspecified, vip));
        let callee = match dir.vip(vip, d.vip.port(), proto) {
            Some(s) => service_node(s, vip, name),
            None => external_node(vip, name),
        };
        let owner = self
            .owners
            .get()
            .as_ref()
            .as_ref()
            .and_then(|o| o.process_of(d.pid))
            .filter(|o| !o.exe.is_empty());
        let caller = match &owner {
            Some(o) if o.pod_uid.is_some() => NodeRef {
                kind: GraphNodeKind::Workload,
                label: format!("pod/{}", o.pod_uid.as_deref().unwrap_or_default()),
                namespace: None,
                address: None,
                vip: None,
                name: None,
            },
            Some(o) => NodeRef {
                kind: GraphNodeKind::Process,
                label: o.exe.clone(),
                namespace: None,
                address: None,
                vip: None,
                name: None,
            },
            None => NodeRef {
                kind: GraphNodeKind::Process,
                label: format!("pid {}", d.pid),
                namespace: None,
                address: None,
                vip: None,
                name: None,
            },
        };
        FlowRecord {
            caller,
            callee,
            protocol,
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
    pub fn resolve(&self, dir: &Directory, e: &FlowEventView, now_s: u64) -> Option<FlowRecord> {
        let (proto, protocol) = protocol_number(&e.protocol)?;
        let src: IpAddr = e.src.parse().ok()?;
        let dst: IpAddr = e.dst.parse().ok()?;
        let names = self.names.get();
        let name_of = |client: IpAddr, addr: IpAddr| names.as_ref().as_ref()?.name_of(client, addr);
        let owner = if protocol == "tcp" {
            self.owners
                .get()
                .as_ref()
                .as_ref()
                .and_then(|o| o.owner_of(src, e.src_port, dst, e.dst_port))
                .filter(|o| !o.exe.is_empty())
        } else {
            None
        };
        let (callee, port) = if let Some(s) = dir.vip(dst, e.dst_port, proto) {
            (service_node(s, dst, name_of(src, dst)), e.dst_port)
        } else if let Some(s) = dir.backend(dst, e.dst_port, proto) {
            // Reached through the socket LB (or directly): named by its VIP.
            let name = name_of(src, s.key.vip).or_else(|| name_of(src, dst));
            (service_node(s, dst, name), s.key.port)
        } else {
            (external_node(dst, name_of(src, dst)), e.dst_port)
        };
        let caller = if let Some(s) = dir.serving(src) {
            service_node(s, src, None)
        } else if let Some(pod) = owner.as_ref().and_then(|o| o.pod_uid.as_ref()) {
            // A pod's cgroup names the pod by uid only; its name is Kubernetes' to say.
            NodeRef {
                kind: GraphNodeKind::Workload,
                label: format!("pod/{pod}"),
                namespace: None,
                address: Some(src),
                vip: None,
                name: None,
            }
        } else if let Some(o) = &owner {
            NodeRef {
                kind: GraphNodeKind::Process,
                label: o.exe.clone(),
                namespace: None,
                address: Some(src),
                vip: None,
                name: None,
            }
        } else {
            external_node(src, name_of(dst, src))
        };
        Some(FlowRecord {
            caller,
            callee,
            protocol,
            port,
            connections: 1,
            bytes_sent: e.bytes_orig,
            bytes_received: e.bytes_reply,
            rtt_us: (e.rtt_ns > 0).then_some(e.rtt_ns / 1000),
            failure: failure_of(e),
            exe: owner.map(|o| o.exe),
            now_s,
        })
    }
}
