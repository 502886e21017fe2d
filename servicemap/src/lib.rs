//! Kubernetes Services and EndpointSlices mapped to load-balancer frontends and backends, the
//! way kube-proxy maps them (issue 13). Pure logic over k8s-openapi objects: no API client,
//! no datapath. The Kubernetes source feeds it what its reflectors hold; the result is the
//! desired state of one Service, recomputed whole on every change, so an update replaces the
//! Service's frontend set instead of adding to it.
//!
//! Choices where Kubernetes leaves room, each tested on the recorded objects in
//! `../shared/k8s-recorded/`:
//!
//! - an endpoint with several addresses contributes its first one only (as kube-proxy does; the
//!   API gives the others no meaning);
//! - topology-aware routing (`service.kubernetes.io/topology-mode: auto` or
//!   `trafficDistribution: PreferClose`) follows kube-proxy: the endpoints hinted for this
//!   node's zone, and all endpoints when any ready endpoint has no hints or none is hinted for
//!   the zone (Cilium's test expects no backends in that case; an empty service is the worse
//!   failure);
//! - the Cilium-only annotation `service.cilium.io/type` is ignored: the Service's `type`
//!   decides;
//! - SCTP ports, FQDN slices and addresses that are not IPs are skipped and noted, never routed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use datapath_api::{BackendState, Protocol};
use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
};

pub mod compact;

/// The label that ties an EndpointSlice to its Service (with the namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label that makes a Service headless whatever its `clusterIP`.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The annotation that turns on topology-aware routing.
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";

/// What the mapping needs to know about the node it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// `spec.nodeName` of this node: endpoints on it are local.
    pub name: String,
    /// The node's `topology.kubernetes.io/zone`, if any.
    pub zone: Option<String>,
    /// The addresses NodePort frontends are made on.
    pub addresses: Vec<IpAddr>,
}

/// Why a frontend exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

impl FrontendKind {
    /// Frontends reached from outside the cluster: `externalTrafficPolicy` governs them.
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "cluster-ip",
            FrontendKind::ExternalIp => "external-ip",
            FrontendKind::LoadBalancer => "load-balancer",
            FrontendKind::NodePort => "node-port",
        })
    }
}

/// One backend of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    pub state: BackendState,
}

/// An address prefix (`loadBalancerSourceRanges`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One VIP:port/protocol, with its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// Sorted by address and port.
    pub backends: Vec<Backend>,
    /// New flows only from these sources (empty: from anywhere).
    pub source_ranges: Vec<Prefix>,
}

/// Why a Service has no frontends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// `clusterIP: None` (any case) or the headless label.
    Headless,
    /// `type: ExternalName`: DNS only.
    ExternalName,
    /// No address parsed from `clusterIPs`/`clusterIP` and nothing else to serve on.
    NoAddress,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::Headless => "headless Service: no VIP",
            SkipReason::ExternalName => "ExternalName Service: no VIP",
            SkipReason::NoAddress => "no cluster, external or load-balancer address",
        })
    }
}

/// The desired state of one Service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mapped {
    /// Sorted by kind, address, port and protocol.
    pub frontends: Vec<Frontend>,
    /// Set when the Service has no frontends on purpose.
    pub skipped: Option<SkipReason>,
    /// What was left out or is not supported, for status.
    pub notes: Vec<String>,
}

/// Errors of an object that cannot be mapped at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("Service without metadata.name")]
    NoName,
}

fn is_headless(svc: &Service) -> bool {
    let labelled = svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(HEADLESS_LABEL));
    let none = |ip: &str| ip.eq_ignore_ascii_case("none");
    let spec = svc.spec.as_ref();
    labelled
        || spec.and_then(|s| s.cluster_ip.as_deref()).is_some_and(none)
        || spec
            .and_then(|s| s.cluster_ips.as_ref())
            .is_some_and(|ips| ips.iter().any(|ip| none(ip)))
}

fn topology_aware(svc: &Service) -> bool {
    let mode = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TOPOLOGY_MODE_ANNOTATION))
        .is_some_and(|m| m.eq_ignore_ascii_case("auto"));
    let distribution = svc
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref())
        .is_some_and(|d| d == "PreferClose");
    mode || distribution
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.trim().parse().ok()
}

fn parse_prefix(s: &str) -> Option<Prefix> {
    let s = s.trim();
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (parse_ip(a)?, l.parse().ok()?),
        None => {
            let a = parse_ip(s)?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some(Prefix { addr, len })
}

/// An endpoint's conditions as a backend state; `None`: not a backend. A missing `ready`
/// means ready, a missing `serving` means what `ready` says, a missing `terminating` false.
fn endpoint_state(e: &Endpoint) -> Option<BackendState> {
    let c = e.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    if ready && !terminating {
        Some(BackendState::Active)
    } else if serving && terminating {
        Some(BackendState::Draining)
    } else {
        None
    }
}

/// The slice port that backs `port`: same name (unnamed matches unnamed), same protocol.
fn slice_port<'a>(slice: &'a EndpointSlice, port: &ServicePort) -> Option<&'a EndpointPort> {
    let want = port.name.as_deref().unwrap_or("");
    let proto = port.protocol.as_deref().unwrap_or("TCP");
    slice.ports.as_ref()?.iter().find(|p| {
        p.name.as_deref().unwrap_or("") == want && p.protocol.as_deref().unwrap_or("TCP") == proto
    })
}

/// A candidate backend before the policies pick: where it runs and its hints.
struct Candidate<'a> {
    backend: Backend,
    endpoint: &'a Endpoint,
}

/// Orders slices newest first: creation time, then resourceVersion, then name.
fn newest_first(slices: &mut [&EndpointSlice]) {
    let key = |s: &EndpointSlice| {
        let rv: u64 = s
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        (
            s.metadata.creation_timestamp.as_ref().map(|t| t.0),
            rv,
            s.metadata.name.clone().unwrap_or_default(),
        )
    };
    slices.sort_by_key(|s| std::cmp::Reverse(key(s)));
}

/// The backends for one Service port and one address family, before traffic policies.
fn candidates<'a>(
    slices: &[&'a EndpointSlice],
    port: &ServicePort,
    ipv4: bool,
    notes: &mut BTreeSet<String>,
) -> Vec<Candidate<'a>> {
    let family = if ipv4 { "IPv4" } else { "IPv6" };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let Some(sp) = slice_port(slice, port) else {
            continue;
        };
        let Some(number) = sp
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            notes.insert(format!(
                "slice {}: port {:?} has no usable number",
                slice.metadata.name.as_deref().unwrap_or("?"),
                sp.name.as_deref().unwrap_or("")
            ));
            continue;
        };
        for e in &slice.endpoints {
            let Some(first) = e.addresses.first() else {
                continue;
            };
            let Some(addr) = parse_ip(first).filter(|a| a.is_ipv4() == ipv4) else {
                notes.insert(format!(
                    "endpoint address {first:?} is not an {family} address"
                ));
                continue;
            };
            let Some(state) = endpoint_state(e) else {
                continue;
            };
            // The newest slice wins a duplicate address:port (slices are sorted newest first).
            if seen.insert((addr, number)) {
                out.push(Candidate {
                    backend: Backend {
                        addr,
                        port: number,
                        state,
                    },
                    endpoint: e,
                });
            }
        }
    }
    out
}

/// Topology-aware routing (see the crate documentation).
fn by_zone<'a>(all: Vec<Candidate<'a>>, zone: Option<&str>) -> Vec<Candidate<'a>> {
    let Some(zone) = zone else { return all };
    let hinted = |c: &Candidate| {
        c.endpoint
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .is_some_and(|zones| zones.iter().any(|z| z.name == zone))
    };
    let every_ready_hinted = all
        .iter()
        .filter(|c| c.backend.state == BackendState::Active)
        .all(|c| {
            c.endpoint
                .hints
                .as_ref()
                .is_some_and(|h| h.for_zones.is_some())
        });
    if every_ready_hinted && all.iter().any(hinted) {
        all.into_iter().filter(|c| hinted(c)).collect()
    } else {
        all
    }
}

/// New flows go to draining endpoints only when none is ready: then they serve as active.
fn fallback_to_draining(mut backends: Vec<Backend>) -> Vec<Backend> {
    if !backends.iter().any(|b| b.state == BackendState::Active) {
        for b in &mut backends {
            b.state = BackendState::Active;
        }
    }
    backends.sort();
    backends
}

/// The desired frontends of `svc`, from the `slices` of its namespace (slices of other
/// Services are ignored: they are joined by label and namespace, not by name).
pub fn map_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Result<Mapped, Error> {
    let name = svc.metadata.name.as_deref().ok_or(Error::NoName)?;
    let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
    let spec = svc.spec.clone().unwrap_or_default();
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return Ok(Mapped {
            skipped: Some(SkipReason::ExternalName),
            ..Mapped::default()
        });
    }
    if is_headless(svc) {
        return Ok(Mapped {
            skipped: Some(SkipReason::Headless),
            ..Mapped::default()
        });
    }
    let mut notes = BTreeSet::new();
    let mut own: Vec<&EndpointSlice> = slices
        .iter()
        .copied()
        .filter(|s| {
            s.metadata.namespace.as_deref().unwrap_or("default") == namespace
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .is_some_and(|n| n == name)
        })
        .collect();
    newest_first(&mut own);
    for s in &own {
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
            notes.insert(format!(
                "slice {}: addressType {} is not served",
                s.metadata.name.as_deref().unwrap_or("?"),
                s.address_type
            ));
        }
    }

    // The addresses, per kind.
    let mut addresses: Vec<(FrontendKind, IpAddr)> = Vec::new();
    let cluster_ips = spec
        .cluster_ips
        .clone()
        .filter(|ips| !ips.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default();
    for ip in &cluster_ips {
        match parse_ip(ip) {
            Some(a) => addresses.push((FrontendKind::ClusterIp, a)),
            None => {
                notes.insert(format!("clusterIP {ip:?} is not an address"));
            }
        }
    }
    for ip in spec.external_ips.iter().flatten() {
        match parse_ip(ip) {
            Some(a) => addresses.push((FrontendKind::ExternalIp, a)),
            None => {
                notes.insert(format!("externalIP {ip:?} is not an address"));
            }
        }
    }
    if kind == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for i in ingress.into_iter().flatten() {
            match i.ip.as_deref().map(|ip| (ip, parse_ip(ip))) {
                Some((_, Some(a))) => addresses.push((FrontendKind::LoadBalancer, a)),
                Some((ip, None)) => {
                    notes.insert(format!("load-balancer ingress {ip:?} is not an address"));
                }
                None => {
                    notes.insert("load-balancer ingress by hostname only is not served".into());
                }
            }
        }
    }
    let node_ports = matches!(kind, "NodePort" | "LoadBalancer");
    let serves_node_ports = node_ports && !node.addresses.is_empty();
    if addresses.is_empty() && !serves_node_ports {
        return Ok(Mapped {
            skipped: Some(SkipReason::NoAddress),
            notes: notes.into_iter().collect(),
            ..Mapped::default()
        });
    }

    let source_ranges: Vec<Prefix> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| {
            let p = parse_prefix(r);
            if p.is_none() {
                notes.insert(format!("loadBalancerSourceRange {r:?} is not a prefix"));
            }
            p
        })
        .collect();
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        notes.insert(
            "sessionAffinity ClientIP is not supported: flows are spread by 5-tuple".into(),
        );
    }
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let topology = topology_aware(svc);

    let mut frontends = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some(proto) = protocol(port.protocol.as_deref()) else {
            notes.insert(format!(
                "port {} ({}) is not TCP or UDP",
                port.port,
                port.protocol.as_deref().unwrap_or("")
            ));
            continue;
        };
        let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            notes.insert(format!("port {} is out of range", port.port));
            continue;
        };
        let mut at: Vec<(FrontendKind, IpAddr, u16)> =
            addresses.iter().map(|(k, a)| (*k, *a, number)).collect();
        if node_ports && let Some(np) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
            at.extend(
                node.addresses
                    .iter()
                    .map(|a| (FrontendKind::NodePort, *a, np)),
            );
        }
        // Backends per family and per locality, computed once each.
        let mut cache: BTreeMap<(bool, bool), Vec<Backend>> = BTreeMap::new();
        for (fkind, addr, fport) in at {
            let local = if fkind.is_external() {
                external_local
            } else {
                internal_local
            };
            let backends = cache
                .entry((addr.is_ipv4(), local))
                .or_insert_with(|| {
                    let mut c = candidates(&own, port, addr.is_ipv4(), &mut notes);
                    if local {
                        c.retain(|c| c.endpoint.node_name.as_deref() == Some(node.name.as_str()));
                    } else if topology {
                        c = by_zone(c, node.zone.as_deref());
                    }
                    fallback_to_draining(c.into_iter().map(|c| c.backend).collect())
                })
                .clone();
            frontends.push(Frontend {
                kind: fkind,
                addr,
                port: fport,
                proto,
                port_name: port.name.clone().unwrap_or_default(),
                backends,
                source_ranges: if fkind == FrontendKind::LoadBalancer {
                    source_ranges.clone()
                } else {
                    Vec::new()
                },
            });
        }
    }
    frontends.sort_by_key(|f| (f.kind, f.addr, f.port, f.proto));
    // One frontend per address:port/protocol: the first kind in order wins (an externalIP that
    // is also the load-balancer address is served once).
    let mut taken = BTreeSet::new();
    frontends.retain(|f| taken.insert((f.addr, f.port, f.proto)));
    Ok(Mapped {
        frontends,
        skipped: None,
        notes: notes.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests;
