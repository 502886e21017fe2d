//! A compact copy of an EndpointSlice: only what [`crate::map_service`] reads. A source that
//! watches 100,000 endpoints keeps these instead of the API objects, whose `Endpoint` alone is
//! some 350 bytes before its strings (most of the daemon's memory at 10,000 Services), and
//! rebuilds the reduced object of the few slices it maps at a time ([`CompactSlice::expand`]).
//!
//! Kept: name, namespace, the service-name label, resourceVersion and creation time (the
//! newest slice wins a duplicate), the address type, the ports, and per endpoint its first
//! address (the only one the mapping reads), conditions, node, zone and hints. Node and zone
//! names repeat across endpoints, so they are shared through a [`Names`] table.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use k8s_openapi::{
    api::discovery::v1::{
        Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};

use crate::SERVICE_NAME_LABEL;

/// Shared copies of the node and zone names that endpoints repeat.
#[derive(Default)]
pub struct Names(HashSet<Arc<str>>);

impl Names {
    fn share(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.0.get(name) {
            return known.clone();
        }
        let new: Arc<str> = Arc::from(name);
        self.0.insert(new.clone());
        new
    }

    /// Forgets the names no slice holds any more.
    pub fn prune(&mut self) {
        self.0.retain(|n| Arc::strong_count(n) > 1);
    }
}

/// One endpoint, as the mapping reads it.
#[derive(Debug, Clone, PartialEq)]
struct CompactEndpoint {
    address: Option<Box<str>>,
    conditions: Option<EndpointConditions>,
    node_name: Option<Arc<str>>,
    zone: Option<Arc<str>>,
    hints: Option<Box<EndpointHints>>,
}

/// See the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactSlice {
    name: Option<Box<str>>,
    namespace: Option<Box<str>>,
    service_name: Option<Box<str>>,
    resource_version: Option<Box<str>>,
    creation_timestamp: Option<Time>,
    address_type: Box<str>,
    ports: Option<Box<[EndpointPort]>>,
    endpoints: Box<[CompactEndpoint]>,
}

impl CompactSlice {
    /// The compact copy of `slice`, its node and zone names shared through `names`.
    pub fn new(slice: &EndpointSlice, names: &mut Names) -> Self {
        let meta = &slice.metadata;
        Self {
            name: meta.name.as_deref().map(Box::from),
            namespace: meta.namespace.as_deref().map(Box::from),
            service_name: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(|s| Box::from(s.as_str())),
            resource_version: meta.resource_version.as_deref().map(Box::from),
            creation_timestamp: meta.creation_timestamp.clone(),
            address_type: Box::from(slice.address_type.as_str()),
            ports: slice.ports.as_ref().map(|p| p.clone().into_boxed_slice()),
            endpoints: slice
                .endpoints
                .iter()
                .map(|e| CompactEndpoint {
                    address: e.addresses.first().map(|a| Box::from(a.as_str())),
                    conditions: e.conditions.clone(),
                    node_name: e.node_name.as_deref().map(|n| names.share(n)),
                    zone: e.zone.as_deref().map(|z| names.share(z)),
                    hints: e.hints.clone().map(Box::new),
                })
                .collect(),
        }
    }

    /// The value of the `kubernetes.io/service-name` label.
    pub fn service_name(&self) -> Option<&str> {
        self.service_name.as_deref()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The slice with what the mapping reads, and nothing else: maps exactly as the original.
    pub fn expand(&self) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: self.name.as_deref().map(String::from),
                namespace: self.namespace.as_deref().map(String::from),
                labels: self
                    .service_name
                    .as_deref()
                    .map(|s| BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), s.to_string())])),
                resource_version: self.resource_version.as_deref().map(String::from),
                creation_timestamp: self.creation_timestamp.clone(),
                ..ObjectMeta::default()
            },
            address_type: self.address_type.to_string(),
            ports: self.ports.as_deref().map(<[EndpointPort]>::to_vec),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    addresses: e.address.as_deref().map(String::from).into_iter().collect(),
                    conditions: e.conditions.clone(),
                    node_name: e.node_name.as_deref().map(String::from),
                    zone: e.zone.as_deref().map(String::from),
                    hints: e.hints.as_deref().cloned(),
                    ..Endpoint::default()
                })
                .collect(),
        }
    }
}
