//! The `kubernetes` controller: Services and EndpointSlices from an API server, mapped the way
//! kube-proxy maps them (`servicemap`), applied to the load balancer by difference through its
//! [`ServiceSink`]. It owns the services it declares (source `kubernetes`, owner
//! `namespace/name`).
//!
//! - Three watchers (kube-runtime) list, then watch from the list's resourceVersion with
//!   BOOKMARKs; on `410 Gone` (or any broken watch) the watcher lists again, and the stored
//!   set is replaced whole when that list is done, as a reflector's store is. The stores are
//!   compact ([`ServiceStore`], [`SliceStore`]): the API objects were most of the memory.
//!   Nothing is applied before the first lists are done, so a restart serves the saved services
//!   until then, and a relist applies only what differs: backends that stay keep their Maglev
//!   slots and their flows.
//! - The third watcher follows this node's own Node object (`fieldSelector=metadata.name=…`):
//!   its `topology.kubernetes.io/zone` label picks the topology hints, and its addresses serve
//!   NodePort when the netlink controller knows none. A Node watch that fails (no RBAC for
//!   nodes, say) does not hold the sync back: the zone stays unknown, the failure is counted,
//!   and a later Node re-maps every Service.
//! - A change of a Service or of one of its slices re-maps that Service only, and replaces only
//!   that Service's frontends (an update replaces its frontend set).
//! - API server unreachable: the watcher retries with backoff, every failure is counted in
//!   `lb-ctl sources` and `datapath_source_sync_errors_total`, and what was applied keeps
//!   serving. `/readyz` does not wait for the API server.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use datapath_api::{DeclaredBackend, DeclaredService, ServiceKey, ServiceSource, SkippedObject};
use futures_util::{FutureExt as _, StreamExt as _, stream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use servicemap::{
    NodeContext,
    compact::{CompactSlice, Names},
};
use tracing::{info, warn};

use crate::{
    Result,
    bus::{Bus, StateReader},
    config::{KubernetesSettings, Settings},
    controller::{Cancel, Controller, Health, NoChange, Prepared, RunFuture},
    lb::{
        sources::{SERVICE_SINK, ServiceSink, SourceTracker},
        store::Durability,
    },
    netlink::model::Addresses,
};

/// The controller's name: status and logs.
pub const NAME: &str = "kubernetes";

/// The state file is written once the source has been quiet this long...
const SAVE_QUIET: Duration = Duration::from_secs(1);
/// ...or at the latest this long after the first change it does not hold. (A crash before
/// loses nothing: the state file is what serves until the relist, which brings it up to date.)
const SAVE_AT_MOST: Duration = Duration::from_secs(10);

/// Longest wait before retrying a failed client setup or apply.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// See the module documentation.
pub struct KubernetesController {
    settings: Mutex<KubernetesSettings>,
    tracker: SourceTracker,
    sink: StateReader<Option<ServiceSink>>,
    addresses: StateReader<Addresses>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which watch an event came from.
#[expect(
    clippy::large_enum_variant,
    reason = "each event is moved once, from the stream to the batch; boxing would allocate per event"
)]
enum Watched {
    Service(watcher::Result<watcher::Event<Service>>),
    Slice(watcher::Result<watcher::Event<EndpointSlice>>),
    Node(watcher::Result<watcher::Event<NodeFacts>>),
}

/// The label that names a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What the mapping reads from this node's Node object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeFacts {
    zone: Option<String>,
    /// `status.addresses` of type InternalIP and ExternalIP, in the Node's order.
    addresses: Vec<IpAddr>,
}

impl NodeFacts {
    fn of(node: &Node) -> Self {
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .filter(|z| !z.is_empty())
            .cloned();
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        Self { zone, addresses }
    }
}

/// This node's Node as the watch last listed or changed it: `None` before its first list, and
/// `Some(None)` when the API server has no Node of this name.
#[derive(Default)]
struct NodeStore {
    current: Option<Option<NodeFacts>>,
    relisting: Option<Option<NodeFacts>>,
    /// The watch failed before its first list: the sync goes on without it.
    given_up_waiting: bool,
}

impl NodeStore {
    fn listed(&self) -> bool {
        self.current.is_some() || self.given_up_waiting
    }

    fn facts(&self) -> Option<&NodeFacts> {
        self.current.as_ref().and_then(Option::as_ref)
    }

    /// Notes one event; answers whether what the mapping reads may have changed.
    fn update(&mut self, event: watcher::Event<NodeFacts>) -> bool {
        let before = self.current.clone();
        match event {
            watcher::Event::Init => self.relisting = Some(None),
            watcher::Event::InitApply(n) => self.relisting = Some(Some(n)),
            watcher::Event::InitDone => {
                self.current = Some(self.relisting.take().flatten());
            }
            watcher::Event::Apply(n) => self.current = Some(Some(n)),
            watcher::Event::Delete(_) => self.current = Some(None),
        }
        self.current != before
    }
}

/// `namespace/name` of an object.
fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

/// Drops what no mapping reads from an object's metadata (kept: name, namespace, labels, the
/// annotations, resourceVersion and creation time).
fn strip_meta(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(a) = &mut meta.annotations {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Gives the memory of a large (re)list back to the system: glibc keeps freed heap in its
/// arenas otherwise, and a sync of 10,000 Services frees as much as it keeps.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The node's name: configured, else `$NODE_NAME` (the downward API), else the host name.
pub fn node_name(settings: &KubernetesSettings) -> String {
    if let Some(n) = &settings.node_name {
        return n.clone();
    }
    if let Ok(n) = std::env::var("NODE_NAME")
        && !n.is_empty()
    {
        return n;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// What one Service maps to.
#[derive(Default)]
struct ServiceMapping {
    declared: Vec<DeclaredService>,
    skipped: Option<String>,
    notes: Vec<String>,
}

/// The mapped state of every Service, kept between changes so that a change re-maps one.
#[derive(Default)]
struct Mapper {
    by_service: BTreeMap<String, ServiceMapping>,
}

impl Mapper {
    /// Maps `name` again from the stores; answers whether its frontends changed.
    fn remap(
        &mut self,
        name: &str,
        services: &ServiceStore,
        slices: &SliceStore,
        node: &NodeContext,
        mode: datapath_api::ForwardingMode,
    ) {
        let svc = match services.get(name) {
            None => {
                self.by_service.remove(name);
                return;
            }
            Some(Err(e)) => {
                self.by_service.insert(
                    name.to_string(),
                    ServiceMapping {
                        skipped: Some(e),
                        ..Default::default()
                    },
                );
                return;
            }
            Some(Ok(svc)) => svc,
        };
        let held = slices.slices_of(name);
        let own: Vec<&EndpointSlice> = held.iter().collect();
        let mapping = match servicemap::map_service(&svc, &own, node) {
            Err(e) => ServiceMapping {
                skipped: Some(e.to_string()),
                ..Default::default()
            },
            Ok(m) => {
                let notes: Vec<String> = m.notes.iter().map(|n| format!("{name}: {n}")).collect();
                ServiceMapping {
                    declared: m
                        .frontends
                        .iter()
                        .map(|f| DeclaredService {
                            key: ServiceKey {
                                vip: f.addr,
                                port: f.port,
                                proto: f.proto,
                            },
                            mode,
                            snat_addr: None,
                            // The socket LB serves cluster VIPs only.
                            xdp_only: f.kind != servicemap::FrontendKind::ClusterIp,
                            owner: name.to_string(),
                            source_ranges: f
                                .source_ranges
                                .iter()
                                .filter_map(|p| datapath_api::SourceRange::new(p.addr, p.len))
                                .collect(),
                            backends: f
                                .backends
                                .iter()
                                .map(|b| DeclaredBackend {
                                    addr: b.addr,
                                    port: b.port,
                                    weight: 1,
                                    state: b.state,
                                })
                                .collect(),
                        })
                        .collect(),
                    skipped: m.skipped.map(|r| r.to_string()),
                    notes,
                }
            }
        };
        self.by_service.insert(name.to_string(), mapping);
    }

    fn declared_of(&self, names: &BTreeSet<String>) -> Vec<DeclaredService> {
        names
            .iter()
            .filter_map(|n| self.by_service.get(n))
            .flat_map(|m| m.declared.iter().cloned())
            .collect()
    }

    fn skipped(&self) -> Vec<SkippedObject> {
        self.by_service
            .iter()
            .filter_map(|(n, m)| {
                m.skipped.as_ref().map(|r| SkippedObject {
                    object: n.clone(),
                    reason: r.clone(),
                })
            })
            .collect()
    }

    fn notes(&self) -> Vec<String> {
        self.by_service
            .values()
            .flat_map(|m| m.notes.iter().cloned())
            .collect()
    }
}

/// The Services by `namespace/name`, each kept as its JSON (what `strip_meta` leaves) and
/// decoded when it is mapped: a decoded `Service` is over a kilobyte of mostly empty fields, its
/// JSON a few hundred bytes, and a decode costs microseconds. A (re)list replaces the set when
/// it is done, as a reflector's store does.
#[derive(Default)]
struct ServiceStore {
    by_name: HashMap<String, Box<[u8]>>,
    relisting: Option<HashMap<String, Box<[u8]>>>,
}

impl ServiceStore {
    fn encode(svc: &Service) -> Box<[u8]> {
        serde_json::to_vec(svc)
            .expect("a Service always encodes")
            .into_boxed_slice()
    }

    fn update(&mut self, svc: &Service, deleted: bool) -> String {
        let name = object_name(&svc.metadata);
        if deleted {
            self.by_name.remove(&name);
        } else {
            self.by_name.insert(name.clone(), Self::encode(svc));
        }
        name
    }

    fn relist_started(&mut self) {
        self.relisting = Some(HashMap::new());
    }

    fn relisted(&mut self, svc: &Service) {
        self.relisting
            .get_or_insert_with(HashMap::new)
            .insert(object_name(&svc.metadata), Self::encode(svc));
    }

    fn relist_done(&mut self) {
        self.by_name = self.relisting.take().unwrap_or_default();
        self.by_name.shrink_to_fit();
    }

    fn names(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }

    fn len(&self) -> usize {
        self.by_name.len()
    }

    /// `None`: no such Service; `Err`: what it held no longer decodes (it cannot, short of a
    /// bug, since it was encoded from a `Service`).
    fn get(&self, name: &str) -> Option<Result<Service, String>> {
        self.by_name.get(name).map(|json| {
            serde_json::from_slice(json).map_err(|e| format!("cannot decode the kept Service: {e}"))
        })
    }
}

/// The EndpointSlices by Service, as compact copies (`servicemap::compact`): the API objects
/// would be most of the daemon's memory at 10,000 Services. Filled from the watch events; a
/// (re)list builds a new set that replaces the old one when it is done, as a reflector's store
/// does, so a change during a relist is mapped against the last complete list.
#[derive(Default)]
struct SliceStore {
    /// A Service has one slice per address family and 100 endpoints, rarely more: a short
    /// list costs less than a map per Service.
    by_owner: HashMap<String, Vec<CompactSlice>>,
    owner_of: HashMap<String, String>,
    names: Names,
    relisting: Option<Vec<CompactSlice>>,
}

impl SliceStore {
    fn key(slice: &CompactSlice) -> String {
        format!(
            "{}/{}",
            slice.namespace().unwrap_or("default"),
            slice.name().unwrap_or("")
        )
    }

    fn owner(slice: &CompactSlice) -> Option<String> {
        let name = slice.service_name()?;
        Some(format!("{}/{name}", slice.namespace().unwrap_or("default")))
    }

    /// Forgets the slice `key`; answers the Service it belonged to.
    fn forget(&mut self, key: &str) -> Option<String> {
        let old = self.owner_of.remove(key)?;
        if let Some(held) = self.by_owner.get_mut(&old) {
            held.retain(|s| Self::key(s) != key);
            if held.is_empty() {
                self.by_owner.remove(&old);
            }
        }
        Some(old)
    }

    fn insert(&mut self, slice: CompactSlice) -> Option<String> {
        let owner = Self::owner(&slice)?;
        let key = Self::key(&slice);
        self.owner_of.insert(key.clone(), owner.clone());
        let held = self.by_owner.entry(owner.clone()).or_default();
        held.push(slice);
        held.shrink_to_fit();
        Some(owner)
    }

    /// Notes `slice` as it is now (`deleted`: gone); answers the Services whose slices changed
    /// (the one it left too, when its label moved it). A slice without the service-name
    /// label belongs to no Service and is not kept.
    fn update(&mut self, slice: &EndpointSlice, deleted: bool) -> Vec<String> {
        let compact = CompactSlice::new(slice, &mut self.names);
        let mut touched: Vec<String> = self.forget(&Self::key(&compact)).into_iter().collect();
        if !deleted
            && let Some(owner) = self.insert(compact)
            && !touched.contains(&owner)
        {
            touched.push(owner);
        }
        touched
    }

    fn relist_started(&mut self) {
        self.relisting = Some(Vec::new());
    }

    fn relisted(&mut self, slice: &EndpointSlice) {
        let compact = CompactSlice::new(slice, &mut self.names);
        self.relisting.get_or_insert_with(Vec::new).push(compact);
    }

    /// The relist is done: its slices replace the store's.
    fn relist_done(&mut self) {
        let listed = self.relisting.take().unwrap_or_default();
        self.by_owner.clear();
        self.owner_of.clear();
        for s in listed {
            self.insert(s);
        }
        self.names.prune();
    }

    fn len(&self) -> usize {
        self.owner_of.len()
    }

    /// The slices of Service `owner`, rebuilt with what the mapping reads.
    fn slices_of(&self, owner: &str) -> Vec<EndpointSlice> {
        self.by_owner
            .get(owner)
            .map(|held| held.iter().map(CompactSlice::expand).collect())
            .unwrap_or_default()
    }
}

impl KubernetesController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        let me = Arc::new(Self {
            settings: Mutex::new(settings.kubernetes.clone()),
            tracker: SourceTracker::new(bus, ServiceSource::Kubernetes)?,
            sink: bus.state(SERVICE_SINK)?.reader(),
            addresses: bus.state(crate::netlink::ADDRESSES)?.reader(),
        });
        me.configured(&settings.kubernetes);
        Ok(me)
    }

    fn configured(&self, k: &KubernetesSettings) {
        let location = k
            .kubeconfig
            .as_ref()
            .map(|p| format!("kubeconfig {}", p.display()));
        self.tracker.configured(k.enabled, location);
        *lock(&self.settings) = k.clone();
    }

    async fn client(settings: &KubernetesSettings) -> Result<Client, String> {
        let config = match &settings.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| format!("no Kubernetes configuration found: {e}"))?,
        };
        Client::try_from(config).map_err(|e| format!("cannot build the API client: {e}"))
    }

    /// The node as the mapping needs it: the zone from its Node object; NodePort is served on
    /// the node's own unicast addresses (loopback and link-local excluded), as the netlink
    /// controller knows them, else on the Node's InternalIP and ExternalIP addresses.
    fn node(&self, settings: &KubernetesSettings, facts: Option<&NodeFacts>) -> NodeContext {
        let mut addresses: Vec<IpAddr> = self
            .addresses
            .get()
            .iter()
            .map(|a| a.addr)
            .filter(|a| match a {
                IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
                IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
            })
            .collect();
        if addresses.is_empty()
            && let Some(f) = facts
        {
            addresses = f.addresses.clone();
        }
        addresses.sort();
        addresses.dedup();
        NodeContext {
            name: node_name(settings),
            zone: facts.and_then(|f| f.zone.clone()),
            addresses,
        }
    }

    async fn apply(
        &self,
        mapper: &Mapper,
        scope: Option<&BTreeSet<String>>,
        node_note: Option<&str>,
    ) -> Result<(), String> {
        let sink = (*self.sink.get())
            .clone()
            .ok_or_else(|| "the load balancer is not running".to_string())?;
        let all: BTreeSet<String>;
        let names = match scope {
            Some(s) => s,
            None => {
                all = mapper.by_service.keys().cloned().collect();
                &all
            }
        };
        let started = std::time::Instant::now();
        let declared = mapper.declared_of(names);
        // Deferred: the change is live at once, and the state file is written when the source
        // is quiet (see `follow`). After a crash the relist gives the state again.
        let (report, owned) = sink
            .replace(
                ServiceSource::Kubernetes,
                scope.cloned(),
                declared,
                Durability::Deferred,
            )
            .await
            .map_err(|e| e.to_string())?;
        for r in &report.rejected {
            warn!(service = %r.key, owner = %r.owner, reason = %r.reason,
                  "kubernetes: service not applied");
        }
        if scope.is_none() {
            info!(
                created = report.created,
                updated = report.updated,
                removed = report.removed,
                unchanged = report.unchanged,
                rejected = report.rejected.len(),
                apply_ms = started.elapsed().as_millis() as u64,
                "kubernetes: services synced"
            );
        }
        let mut notes = mapper.notes();
        if let Some(n) = node_note {
            notes.insert(0, n.to_string());
        }
        self.tracker.applied(
            &report,
            owned,
            mapper.by_service.len(),
            mapper.skipped(),
            notes,
        );
        Ok(())
    }

    async fn flush(&self) -> Result<(), String> {
        let sink = (*self.sink.get())
            .clone()
            .ok_or_else(|| "the load balancer is not running".to_string())?;
        sink.flush().await.map_err(|e| e.to_string())
    }

    async fn follow(
        &self,
        settings: KubernetesSettings,
        cancel: &mut Cancel,
    ) -> Result<(), String> {
        let client = Self::client(&settings).await?;
        // What the mapping never reads is dropped before the store keeps it: managedFields
        // alone are most of a real object.
        let svc_stream = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(|s: &mut Service| {
            strip_meta(&mut s.metadata);
            s.status = s.status.take().map(|mut st| {
                st.conditions = None;
                st
            });
        })
        .default_backoff()
        .map(Watched::Service)
        .boxed();
        // Slices are kept compact (`SliceStore`), not in a reflector's store.
        let eps_stream = watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(Watched::Slice)
        .boxed();
        // This node's Node only, reduced to what the mapping reads as it arrives.
        let node_name = node_name(&settings);
        let node_stream = watcher(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        )
        .default_backoff()
        .map(|r| {
            Watched::Node(r.map(|e| match e {
                watcher::Event::Apply(n) => watcher::Event::Apply(NodeFacts::of(&n)),
                watcher::Event::Delete(n) => watcher::Event::Delete(NodeFacts::of(&n)),
                watcher::Event::Init => watcher::Event::Init,
                watcher::Event::InitApply(n) => watcher::Event::InitApply(NodeFacts::of(&n)),
                watcher::Event::InitDone => watcher::Event::InitDone,
            }))
        })
        .boxed();
        let mut events = stream::select(stream::select(svc_stream, eps_stream), node_stream);

        let mode = settings.mode;
        let mut mapper = Mapper::default();
        let mut services = ServiceStore::default();
        let mut slices = SliceStore::default();
        let (mut services_listed, mut slices_listed) = (false, false);
        let mut node_store = NodeStore::default();
        let mut node_changed = false;
        let mut synced = false;
        let mut node = self.node(&settings, None);
        let mut addresses = self.addresses.version();
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        let mut full = false;
        let mut retry = Duration::from_millis(500);
        let mut failed_apply = false;
        // Applied but not yet in the state file, since when.
        let mut unsaved_since: Option<std::time::Instant> = None;
        // The background write in progress, if any.
        let mut saving: Option<tokio::task::JoinHandle<Result<(), String>>> = None;
        // For the log line of each (re)list: how long the lists and the mapping took.
        let mut listing_since = Some(std::time::Instant::now());
        loop {
            // Saved when the source has been quiet for a moment, or has not been for a while.
            let save_in = unsaved_since
                .map(|since| SAVE_QUIET.min(SAVE_AT_MOST.saturating_sub(since.elapsed())));
            let first = tokio::select! {
                e = events.next() => e,
                _ = tokio::time::sleep(retry), if failed_apply => None,
                _ = tokio::time::sleep(save_in.unwrap_or(Duration::MAX)),
                    if save_in.is_some() && saving.is_none() =>
                {
                    // Written in the background: the next events are applied meanwhile.
                    let sink = (*self.sink.get()).clone();
                    saving = Some(tokio::spawn(async move {
                        match sink {
                            Some(sink) => sink.flush().await.map_err(|e| e.to_string()),
                            None => Err("the load balancer is not running".to_string()),
                        }
                    }));
                    unsaved_since = None;
                    continue;
                }
                done = async { saving.as_mut().expect("guarded").await }, if saving.is_some() => {
                    saving = None;
                    let failed = match done {
                        Ok(Ok(())) => {
                            // The state file's buffers are freed now.
                            release_freed_memory();
                            None
                        }
                        Ok(Err(e)) => Some(e),
                        Err(e) => Some(format!("the state-file write failed: {e}")),
                    };
                    if let Some(e) = failed {
                        warn!(error = %e, "kubernetes: cannot save the services; retrying");
                        self.tracker.failed(e);
                        unsaved_since.get_or_insert_with(std::time::Instant::now);
                    }
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => None,
                _ = cancel.cancelled() => {
                    if let Some(w) = saving.take() {
                        let _ = w.await;
                    }
                    let _ = self.flush().await;
                    return Ok(());
                }
            };
            // Everything that is ready now is one batch.
            let mut batch: Vec<Watched> = first.into_iter().collect();
            while let Some(Some(e)) = events.next().now_or_never() {
                batch.push(e);
                if batch.len() >= 10_000 {
                    break;
                }
            }
            for e in batch {
                match e {
                    Watched::Service(Ok(ev)) => match ev {
                        watcher::Event::Apply(s) => {
                            dirty.insert(services.update(&s, false));
                        }
                        watcher::Event::Delete(s) => {
                            dirty.insert(services.update(&s, true));
                        }
                        watcher::Event::InitDone => {
                            services.relist_done();
                            services_listed = true;
                            full = true;
                        }
                        watcher::Event::Init => {
                            services.relist_started();
                            listing_since.get_or_insert_with(std::time::Instant::now);
                        }
                        watcher::Event::InitApply(s) => services.relisted(&s),
                    },
                    Watched::Slice(Ok(ev)) => match ev {
                        watcher::Event::Apply(s) => dirty.extend(slices.update(&s, false)),
                        watcher::Event::Delete(s) => dirty.extend(slices.update(&s, true)),
                        watcher::Event::InitDone => {
                            slices.relist_done();
                            slices_listed = true;
                            full = true;
                        }
                        watcher::Event::Init => {
                            slices.relist_started();
                            listing_since.get_or_insert_with(std::time::Instant::now);
                        }
                        watcher::Event::InitApply(s) => slices.relisted(&s),
                    },
                    Watched::Node(Ok(ev)) => node_changed |= node_store.update(ev),
                    Watched::Node(Err(e)) => {
                        if !node_store.listed() {
                            node_store.given_up_waiting = true;
                        }
                        let e = format!("watch of Node {node_name}: {e}");
                        warn!(error = %e, "kubernetes: cannot read this node's Node; its zone stays unknown");
                        self.tracker.failed(e);
                    }
                    Watched::Service(Err(e)) | Watched::Slice(Err(e)) => {
                        let e = format!("watch: {e}");
                        warn!(error = %e, "kubernetes: the API server failed; the services applied keep serving");
                        self.tracker.failed(e);
                    }
                }
            }
            if self.addresses.version() != addresses || node_changed {
                addresses = self.addresses.version();
                node_changed = false;
                let now = self.node(&settings, node_store.facts());
                if now != node {
                    info!(
                        zone = now.zone.as_deref().unwrap_or("unknown"),
                        addresses = now.addresses.len(),
                        "kubernetes: this node changed"
                    );
                    node = now;
                    full = true;
                }
            }
            if !(services_listed && slices_listed && node_store.listed()) {
                continue;
            }
            let node_note = match &node_store.current {
                Some(None) => Some(format!(
                    "Node {node_name} is not in the API server: its zone is unknown, topology hints are not used"
                )),
                None => Some(format!(
                    "Node {node_name} cannot be read: its zone is unknown, topology hints are not used"
                )),
                Some(Some(_)) => None,
            };
            if !synced || full || failed_apply {
                // A (re)list: every Service again, and the source's whole set replaced.
                let mapping_since = std::time::Instant::now();
                if let Some(since) = listing_since.take() {
                    info!(
                        services = services.len(),
                        slices = slices.len(),
                        list_ms = since.elapsed().as_millis() as u64,
                        "kubernetes: listed"
                    );
                }
                let mut names: BTreeSet<String> = services.names().cloned().collect();
                names.extend(mapper.by_service.keys().cloned());
                for n in &names {
                    mapper.remap(n, &services, &slices, &node, mode);
                }
                info!(
                    services = names.len(),
                    map_ms = mapping_since.elapsed().as_millis() as u64,
                    "kubernetes: mapped"
                );
                match self.apply(&mapper, None, node_note.as_deref()).await {
                    Ok(()) => {
                        unsaved_since.get_or_insert_with(std::time::Instant::now);
                        release_freed_memory();
                        synced = true;
                        full = false;
                        failed_apply = false;
                        retry = Duration::from_millis(500);
                        dirty.clear();
                    }
                    Err(e) => {
                        warn!(error = %e, "kubernetes: services not applied; retrying");
                        self.tracker.failed(e);
                        failed_apply = true;
                        retry = (retry * 2).min(MAX_RETRY);
                    }
                }
            } else if !dirty.is_empty() {
                let scope = std::mem::take(&mut dirty);
                for n in &scope {
                    mapper.remap(n, &services, &slices, &node, mode);
                }
                match self
                    .apply(&mapper, Some(&scope), node_note.as_deref())
                    .await
                {
                    Ok(()) => {
                        unsaved_since.get_or_insert_with(std::time::Instant::now);
                    }
                    Err(e) => {
                        warn!(error = %e, "kubernetes: services not applied; retrying");
                        self.tracker.failed(e);
                        failed_apply = true;
                        retry = (retry * 2).min(MAX_RETRY);
                    }
                }
            }
        }
    }
}

impl Controller for KubernetesController {
    fn name(&self) -> &'static str {
        NAME
    }

    fn after(&self) -> &'static [&'static str] {
        &[crate::lb::NAME]
    }

    fn enabled(&self, settings: &Settings) -> bool {
        settings.kubernetes.enabled
    }

    fn start(&self, settings: &Settings, _blocker: Option<String>) -> Result<()> {
        self.configured(&settings.kubernetes);
        Ok(())
    }

    fn prepare(
        self: Arc<Self>,
        _settings: &Settings,
        _blocker: Option<String>,
    ) -> Result<Box<dyn Prepared>> {
        // Its section needs a restart (config refuses a reload that changes it).
        Ok(Box::new(NoChange))
    }

    fn run(self: Arc<Self>, mut cancel: Cancel) -> RunFuture {
        Box::pin(async move {
            let mut retry = Duration::from_millis(500);
            loop {
                let settings = lock(&self.settings).clone();
                if !settings.enabled {
                    cancel.cancelled().await;
                    return Ok(());
                }
                match self.follow(settings, &mut cancel).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        warn!(error = %e, "kubernetes source cannot start; retrying");
                        self.tracker.failed(e);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        })
    }

    fn health(&self) -> Health {
        let on = lock(&self.settings).enabled;
        Health {
            enabled: on,
            up: on,
            reason: if on {
                None
            } else {
                Some("disabled by the configuration (kubernetes.enabled)".into())
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn node_facts_are_the_zone_label_and_the_internal_and_external_addresses() {
        let n = node(serde_json::json!({
            "metadata": {"name": "n1", "labels": {ZONE_LABEL: "zone-a", "other": "x"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "InternalIP", "address": "198.18.0.10"},
                {"type": "ExternalIP", "address": "2001:db8::10"},
                {"type": "InternalDNS", "address": "n1.cluster.local"},
                {"type": "InternalIP", "address": "not-an-ip"},
            ]},
        }));
        assert_eq!(
            NodeFacts::of(&n),
            NodeFacts {
                zone: Some("zone-a".into()),
                addresses: vec![
                    "198.18.0.10".parse().unwrap(),
                    "2001:db8::10".parse().unwrap()
                ],
            }
        );
        // No labels, an empty zone label, no status: nothing known.
        assert_eq!(
            NodeFacts::of(&node(serde_json::json!({"metadata": {"name": "n1"}}))),
            NodeFacts::default()
        );
        let empty =
            node(serde_json::json!({"metadata": {"name": "n1", "labels": {ZONE_LABEL: ""}}}));
        assert_eq!(NodeFacts::of(&empty).zone, None);
    }

    fn recorded<T: serde::de::DeserializeOwned>(file: &str) -> T {
        let path = format!(
            "{}/../../shared/k8s-recorded/cilium/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_yaml_ng::from_str(&text).unwrap()
    }

    #[test]
    fn only_cluster_ips_are_left_to_the_socket_lb() {
        let mut services = ServiceStore::default();
        let mut slices = SliceStore::default();
        let name = services.update(&recorded("loadbalancer/service.yaml"), false);
        slices.update(&recorded("loadbalancer/endpointslice.yaml"), false);
        let node = NodeContext {
            name: "n1".into(),
            zone: None,
            addresses: vec!["198.18.0.10".parse().unwrap()],
        };
        let mut mapper = Mapper::default();
        mapper.remap(&name, &services, &slices, &node, Default::default());
        let declared = mapper.declared_of(&BTreeSet::from([name]));
        let by_vip: BTreeMap<String, bool> = declared
            .iter()
            .map(|d| (format!("{}:{}", d.key.vip, d.key.port), d.xdp_only))
            .collect();
        assert_eq!(
            by_vip,
            BTreeMap::from([
                ("10.96.50.104:80".to_string(), false),
                ("172.16.1.1:80".to_string(), true),
                ("198.18.0.10:30781".to_string(), true),
            ])
        );
    }

    #[test]
    fn node_store_follows_lists_changes_and_deletion() {
        let zone = |z: &str| NodeFacts {
            zone: Some(z.into()),
            addresses: vec![],
        };
        let mut s = NodeStore::default();
        assert!(!s.listed());
        // A list that finds no Node of this name: listed, nothing known.
        assert!(!s.update(watcher::Event::Init));
        assert!(s.update(watcher::Event::InitDone));
        assert!(s.listed() && s.facts().is_none());
        assert_eq!(s.current, Some(None));
        assert!(s.update(watcher::Event::Apply(zone("a"))));
        assert_eq!(s.facts(), Some(&zone("a")));
        assert!(
            !s.update(watcher::Event::Apply(zone("a"))),
            "the same facts again: no change"
        );
        // A relist keeps the old facts until it is done.
        s.update(watcher::Event::Init);
        s.update(watcher::Event::InitApply(zone("b")));
        assert_eq!(s.facts(), Some(&zone("a")));
        assert!(s.update(watcher::Event::InitDone));
        assert_eq!(s.facts(), Some(&zone("b")));
        assert!(s.update(watcher::Event::Delete(zone("b"))));
        assert!(s.listed() && s.facts().is_none());
        // A watch that failed before its first list does not hold the sync back.
        let failed = NodeStore {
            given_up_waiting: true,
            ..Default::default()
        };
        assert!(failed.listed() && failed.facts().is_none());
    }
}
