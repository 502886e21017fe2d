//! The `lb` controller: the XDP L4 load balancer. It owns the XDP object (pins under
//! `pin_root/lb/`), the desired services and their state file, the service API routes and
//! the load balancer's metrics, and hands the conntrack controller a typed handle of its flow
//! tables.
pub mod dataplane;
mod metrics;
mod node;
pub mod sources;
pub mod store;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use datapath_api::{ServiceSpec, StatsSnapshot};
use tracing::{info, warn};

use crate::{
    Error, Result,
    bpf::pins::{FlatPins, controller_dir, migrate_flat_pins},
    bus::{Bus, StateReader, StateWriter},
    config::{self, Settings},
    controller::{Cancel, Controller, Health, NoChange, Prepared, Requirements, RunFuture},
    ct::{LB_TABLES, LbFlowTables, OCCUPANCY, Occupancy},
    features::{Capability, Feature},
    server::{self, PlaneStats, SharedController},
};
use dataplane::{Dataplane, DataplaneConfig};
use store::{Limits, ServicePlane, Store};

/// The controller's name: status, metrics, pin directory.
pub const NAME: &str = "lb";

/// State: the handle of the service maps, for the socket load balancer (`None` while the load
/// balancer is off).
pub const SERVICE_MAPS: &str = "lb.service_maps";

/// State: every (service, backend address) of the desired state, draining backends included:
/// what the socket load balancer destroys sockets by when a backend leaves.
pub const SERVICE_BACKENDS: &str = "lb.service_backends";

/// See [`SERVICE_BACKENDS`].
pub type ServiceBackends = BTreeSet<(datapath_api::ServiceKey, std::net::SocketAddr)>;

/// State: every service with who declared it, what it is called there and its backends
/// ([`ServiceCatalog`]; writer: lb), for the modules that name flows (the graph).
pub const SERVICE_CATALOG: &str = "lb.service_catalog";

/// One service of [`SERVICE_CATALOG`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    pub key: datapath_api::ServiceKey,
    pub source: datapath_api::ServiceSource,
    pub owner: Option<String>,
    pub backends: Vec<std::net::SocketAddr>,
}

/// See [`SERVICE_CATALOG`]: sorted by key.
pub type ServiceCatalog = Vec<CatalogEntry>;

/// The load balancer's service maps as it lends them: one service store, two datapaths.
#[derive(Debug)]
pub struct LbServiceMaps {
    pub vips: std::os::fd::OwnedFd,
    pub backends: std::os::fd::OwnedFd,
    pub maglev: std::os::fd::OwnedFd,
    pub maglev_size: u32,
    pub max_services: u32,
}

/// The load balancer module: the attached dataplane, or why there is none.
pub struct LbPlane {
    dp: Option<Dataplane>,
    off_reason: String,
}

impl LbPlane {
    pub fn on(dp: Dataplane) -> Self {
        Self {
            dp: Some(dp),
            off_reason: String::new(),
        }
    }

    pub fn off(reason: impl Into<String>) -> Self {
        Self {
            dp: None,
            off_reason: reason.into(),
        }
    }

    pub fn dataplane(&self) -> Option<&Dataplane> {
        self.dp.as_ref()
    }

    pub fn dataplane_mut(&mut self) -> Option<&mut Dataplane> {
        self.dp.as_mut()
    }

    fn require(&mut self) -> Result<&mut Dataplane> {
        let reason = &self.off_reason;
        self.dp.as_mut().ok_or_else(|| {
            Error::Unavailable(format!("module lb is off ({reason}); see `lb-ctl status`"))
        })
    }
}

impl ServicePlane for LbPlane {
    fn apply_service(&mut self, s: &ServiceSpec) -> Result<()> {
        self.require()?.apply_service(s)
    }

    fn remove_service(&mut self, s: &ServiceSpec) -> Result<()> {
        self.require()?.remove_service(s)
    }
}

impl PlaneStats for LbPlane {
    fn stats(&self) -> Result<StatsSnapshot> {
        match &self.dp {
            Some(dp) => dp.stats(),
            None => Ok(StatsSnapshot::default()),
        }
    }

    fn service_stats(&self, service: &ServiceSpec) -> Result<StatsSnapshot> {
        match &self.dp {
            Some(dp) => dp.service_stats(service),
            None => Ok(StatsSnapshot::default()),
        }
    }

    fn table_entries(&self, service: &ServiceSpec) -> Result<BTreeMap<u32, u32>> {
        match &self.dp {
            Some(dp) => dp.table_entries(service),
            None => Ok(BTreeMap::new()),
        }
    }
}

/// The maps and links the flat layout of builds before controllers held for the load balancer.
const FLAT_PINS: FlatPins<'static> = FlatPins {
    maps: &[
        bpf_common::map_names::VIPS,
        bpf_common::map_names::VIP_ADDRS,
        bpf_common::map_names::BACKENDS,
        bpf_common::map_names::MAGLEV,
        bpf_common::map_names::FLOWS,
        bpf_common::map_names::NAT_REV,
        bpf_common::map_names::TX_PORTS,
        bpf_common::map_names::VIP_STATS,
        bpf_common::map_names::BACKEND_STATS,
        bpf_common::map_names::INTERFACE_STATS,
        bpf_common::map_names::REASONS,
    ],
    link_prefixes: &["xdp_lb_"],
};

struct Inner {
    settings: Settings,
    health: Health,
    /// Why `/readyz` must wait (the configured interfaces have not appeared yet).
    waiting: Option<String>,
}

/// See the module documentation.
pub struct LbController {
    ctl: SharedController<LbPlane>,
    inner: Mutex<Inner>,
    tables: Mutex<StateWriter<Option<Arc<LbFlowTables>>>>,
    service_maps: Mutex<StateWriter<Option<Arc<LbServiceMaps>>>>,
    occupancy: StateReader<Occupancy>,
    prog_stats: StateReader<bool>,
    /// Set at shutdown: a start still waiting for interfaces gives up.
    stopping: std::sync::atomic::AtomicBool,
    /// Whether the netlink controller runs (fixed until restart): interfaces then follow its
    /// link state, and it keeps the backends' neighbours.
    netlink: bool,
    links: StateReader<crate::netlink::model::Links>,
    neighbours: StateReader<crate::netlink::model::Neighbours>,
    routes: StateReader<crate::netlink::model::Routes>,
    attached: StateWriter<crate::netlink::Attached>,
    reattachments: StateWriter<u64>,
    /// Name -> ifindex of each interface XDP is attached to (a new ifindex: re-created).
    ifindexes: Mutex<BTreeMap<String, u32>>,
    /// Wakes the run loop to sync the interfaces (after a reload).
    resync: tokio::sync::Notify,
    /// The FIB generation as last bumped (for `/metrics`).
    fib_generation: AtomicU64,
    /// A reload is between prepare and commit (see `prepare`).
    reloading: std::sync::atomic::AtomicBool,
    /// What each service source published about itself (`GET /v1/sources`).
    source_readers: sources::SourceReaders,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LbController {
    /// Opens the state file (a corrupt one stops the daemon here, before the datapath is
    /// touched: it would otherwise be reconciled down to less than what was declared).
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        let dp_config = settings.dataplane_config();
        let mut store = Store::open(&settings.lb.state_file, Limits::from_config(&dp_config))?;
        dataplane::set_neighbour_priming(!settings.netlink.enabled);
        let next_hops = Arc::new(
            bus.state::<BTreeSet<IpAddr>>(crate::netlink::NEXT_HOPS)?
                .writer()?,
        );
        let members = Arc::new(bus.state::<ServiceBackends>(SERVICE_BACKENDS)?.writer()?);
        let catalog = Arc::new(bus.state::<ServiceCatalog>(SERVICE_CATALOG)?.writer()?);
        store.observe(Arc::new(move |state| {
            next_hops.publish(node::next_hops(state));
            members.publish(node::service_backends(state));
            catalog.publish(node::service_catalog(state));
        }));
        let links: StateReader<crate::netlink::model::Links> =
            bus.state(crate::netlink::LINKS)?.reader();
        let neighbours: StateReader<crate::netlink::model::Neighbours> =
            bus.state(crate::netlink::NEIGHBOURS)?.reader();
        let routes: StateReader<crate::netlink::model::Routes> =
            bus.state(crate::netlink::ROUTES)?.reader();
        let mut ctl = server::Controller::new(store, LbPlane::off("starting"));
        if settings.netlink.enabled {
            let (l, n, r) = (links.clone(), neighbours.clone(), routes.clone());
            ctl.set_neighbour_lookup(Arc::new(move |addr| {
                Some(crate::netlink::backend_neighbour(&l.get(), &r.get(), &n.get(), addr).state)
            }));
        }
        let ctl = Arc::new(tokio::sync::Mutex::new(ctl));
        bus.state::<Option<sources::ServiceSink>>(sources::SERVICE_SINK)?
            .writer()?
            .publish(Some(sources::ServiceSink::new(Arc::clone(&ctl))));
        let source_readers = sources::SourceReaders::new(bus)?;
        Ok(Arc::new(Self {
            source_readers,
            ctl,
            inner: Mutex::new(Inner {
                settings: settings.clone(),
                health: Health::default(),
                waiting: Self::missing_interfaces(settings),
            }),
            tables: Mutex::new(
                bus.state::<Option<Arc<LbFlowTables>>>(LB_TABLES)?
                    .writer()?,
            ),
            service_maps: Mutex::new(
                bus.state::<Option<Arc<LbServiceMaps>>>(SERVICE_MAPS)?
                    .writer()?,
            ),
            occupancy: bus.state::<Occupancy>(OCCUPANCY)?.reader(),
            prog_stats: bus.state::<bool>(crate::prog_stats::ENABLED)?.reader(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            netlink: settings.netlink.enabled,
            links,
            neighbours,
            routes,
            attached: bus.state(crate::netlink::LB_ATTACHED)?.writer()?,
            reattachments: bus.state(crate::netlink::LB_REATTACHMENTS)?.writer()?,
            ifindexes: Mutex::new(BTreeMap::new()),
            resync: tokio::sync::Notify::new(),
            fib_generation: AtomicU64::new(0),
            reloading: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The services and the dataplane, as the API changes them.
    pub fn shared(&self) -> SharedController<LbPlane> {
        Arc::clone(&self.ctl)
    }

    fn pin_dir(settings: &Settings) -> std::path::PathBuf {
        controller_dir(&settings.pin_root, NAME)
    }

    fn dataplane_config(settings: &Settings, interfaces: Vec<String>) -> DataplaneConfig {
        DataplaneConfig {
            interfaces,
            pin_root: Self::pin_dir(settings),
            ..settings.dataplane_config()
        }
    }

    /// Publishes (or withdraws) the flow tables' handle for the conntrack controller.
    fn publish_tables(&self, plane: &LbPlane, max_flows: u32) {
        let handle = plane.dataplane().and_then(|dp| match dp.flow_table_fds() {
            Ok((flows, nat_reverse)) => Some(Arc::new(LbFlowTables {
                flows,
                nat_reverse,
                max_flows,
            })),
            Err(e) => {
                warn!(error = %e, "cannot hand the flow tables to the conntrack controller");
                None
            }
        });
        lock(&self.tables).publish(handle);
        let maps = plane.dataplane().and_then(|dp| match dp.service_map_fds() {
            Ok([vips, backends, maglev]) => Some(Arc::new(LbServiceMaps {
                vips,
                backends,
                maglev,
                maglev_size: dp.config().maglev_size,
                max_services: dp.config().max_services,
            })),
            Err(e) => {
                warn!(error = %e, "cannot hand the service maps to the socket load balancer");
                None
            }
        });
        lock(&self.service_maps).publish(maps);
    }

    /// Why `/readyz` waits for the interfaces, from the start (before the controller starts).
    fn missing_interfaces(settings: &Settings) -> Option<String> {
        if !settings.lb.enabled {
            return None;
        }
        let missing: Vec<&str> =
            config::unmatched(&settings.lb.interfaces, &config::interface_names())
                .into_iter()
                .filter(|p| !(settings.netlink.enabled && config::is_glob(p)))
                .collect();
        (!missing.is_empty()).then(|| format!("waiting for interfaces {}", missing.join(", ")))
    }

    /// Waits (bounded by `interface_wait`) until every configured pattern matches an
    /// interface, then expands the patterns.
    fn wait_for_interfaces(&self, settings: &Settings) -> Result<Vec<String>> {
        if self.netlink {
            // No wait: the run loop attaches to the others as they appear.
            return self.present_interfaces(settings);
        }
        let deadline = Instant::now() + settings.lb.interface_wait;
        loop {
            let existing = config::interface_names();
            let missing = config::unmatched(&settings.lb.interfaces, &existing);
            let stopping = self.stopping.load(std::sync::atomic::Ordering::SeqCst);
            if missing.is_empty() || Instant::now() >= deadline || stopping {
                lock(&self.inner).waiting = None;
                return config::expand_interfaces(
                    &settings.lb.interfaces,
                    &existing,
                    settings.origin.source(),
                );
            }
            lock(&self.inner).waiting =
                Some(format!("waiting for interfaces {}", missing.join(", ")));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The configured interfaces that exist now (with the netlink controller a pattern that
    /// matches nothing yet is no error: `/readyz` waits for it).
    fn present_interfaces(&self, settings: &Settings) -> Result<Vec<String>> {
        if settings.lb.interfaces.is_empty() {
            return config::expand_interfaces(&[], &[], settings.origin.source());
        }
        let existing = config::interface_names();
        // Readiness waits for the interfaces named; a glob may match nothing yet.
        let missing: Vec<&str> = config::unmatched(&settings.lb.interfaces, &existing)
            .into_iter()
            .filter(|p| !config::is_glob(p))
            .collect();
        lock(&self.inner).waiting =
            (!missing.is_empty()).then(|| format!("waiting for interfaces {}", missing.join(", ")));
        Ok(existing
            .into_iter()
            .filter(|n| {
                settings
                    .lb
                    .interfaces
                    .iter()
                    .any(|p| crate::text::glob_match(p, n))
            })
            .collect())
    }

    /// Remembers what `dp` attached (after a start or a reload), for status and for telling a
    /// re-created interface.
    fn note_attached(&self, dp: &Dataplane) {
        let now = node::attached_indexes(dp);
        *lock(&self.ifindexes) = now.clone();
        self.attached.publish(now);
        self.resync.notify_one();
    }

    fn set_health(&self, settings: &Settings, plane: &LbPlane, reason: Option<String>) {
        let up = plane.dataplane().is_some();
        lock(&self.inner).health = Health {
            enabled: settings.lb.enabled,
            up,
            reason: if up { None } else { reason },
        };
    }

    fn off_reason(settings: &Settings, blocker: Option<String>) -> Option<String> {
        if !settings.lb.enabled {
            Some("disabled by the configuration".into())
        } else {
            blocker
        }
    }
}

/// A prepared reload of the load balancer.
enum LbChange {
    /// Attached to `added` already; `removed` are detached on commit.
    Interfaces {
        ctl: Arc<LbController>,
        added: Vec<String>,
        removed: Vec<String>,
        settings: Settings,
    },
    /// A dataplane started for the new settings, installed on commit.
    Up {
        ctl: Arc<LbController>,
        dp: Box<Dataplane>,
        settings: Settings,
    },
    /// Turned off on commit.
    Off {
        ctl: Arc<LbController>,
        reason: String,
        settings: Settings,
    },
}

impl Prepared for LbChange {
    fn commit(self: Box<Self>) -> Vec<String> {
        match *self {
            LbChange::Interfaces {
                ctl,
                added,
                removed,
                settings,
            } => {
                let mut changes: Vec<String> =
                    added.iter().map(|n| format!("attached {n}")).collect();
                let mut guard = ctl.ctl.blocking_lock();
                let (_, plane) = guard.parts_mut();
                if let Some(dp) = plane.dataplane_mut() {
                    for name in &removed {
                        match dp.detach_interface(name) {
                            Ok(()) => changes.push(format!("detached {name}")),
                            Err(e) => warn!(interface = %name, error = %e, "cannot detach"),
                        }
                    }
                }
                ctl.set_health(&settings, plane, None);
                // The settings first: `note_attached` wakes the node sync, which must judge
                // what is attached by the new patterns (else it detaches what was just added).
                lock(&ctl.inner).settings = settings;
                if let Some(dp) = plane.dataplane() {
                    ctl.note_attached(dp);
                }
                changes
            }
            LbChange::Up { ctl, dp, settings } => {
                let mut guard = ctl.ctl.blocking_lock();
                let (_, plane) = guard.parts_mut();
                *plane = LbPlane::on(*dp);
                ctl.publish_tables(plane, settings.lb.max_flows);
                ctl.set_health(&settings, plane, None);
                lock(&ctl.inner).settings = settings;
                if let Some(dp) = plane.dataplane() {
                    ctl.note_attached(dp);
                }
                vec!["module lb up".into()]
            }
            LbChange::Off {
                ctl,
                reason,
                settings,
            } => {
                let mut guard = ctl.ctl.blocking_lock();
                let (_, plane) = guard.parts_mut();
                if let Some(dp) = plane.dataplane_mut() {
                    for (name, _) in dp.interfaces() {
                        if let Err(e) = dp.detach_interface(&name) {
                            warn!(interface = %name, error = %e, "cannot detach");
                        }
                    }
                }
                *plane = LbPlane::off(reason.clone());
                ctl.publish_tables(plane, settings.lb.max_flows);
                ctl.set_health(&settings, plane, Some(reason.clone()));
                lock(&ctl.inner).settings = settings;
                vec![format!("module lb off ({reason})")]
            }
        }
    }

    fn rollback(self: Box<Self>) {
        match *self {
            LbChange::Interfaces { ctl, added, .. } => {
                let mut guard = ctl.ctl.blocking_lock();
                if let Some(dp) = guard.parts_mut().1.dataplane_mut() {
                    for name in &added {
                        if let Err(e) = dp.detach_interface(name) {
                            warn!(interface = %name, error = %e, "cannot undo an attachment");
                        }
                    }
                }
            }
            LbChange::Up { mut dp, .. } => {
                // Its links are pinned: unpin them, or they would outlive the rollback.
                for (name, _) in dp.interfaces() {
                    if let Err(e) = dp.detach_interface(&name) {
                        warn!(interface = %name, error = %e, "cannot undo an attachment");
                    }
                }
            }
            LbChange::Off { .. } => {}
        }
    }
}

impl LbController {
    /// The reload itself (see `prepare`).
    fn prepare_change(
        self: Arc<Self>,
        new: &Settings,
        blocker: Option<String>,
    ) -> Result<Box<dyn Prepared>> {
        let me = Arc::clone(&self);
        let reason = Self::off_reason(new, blocker);
        let mut guard = self.ctl.blocking_lock();
        let (store, plane) = guard.parts_mut();
        let change: Box<dyn Prepared> = match (plane.dataplane_mut(), reason) {
            (Some(dp), None) => {
                let interfaces = if self.netlink {
                    self.present_interfaces(new)?
                } else {
                    config::expand_interfaces(
                        &new.lb.interfaces,
                        &config::interface_names(),
                        new.origin.source(),
                    )?
                };
                let current: Vec<String> = dp.interfaces().into_iter().map(|(n, _)| n).collect();
                let removed = current
                    .iter()
                    .filter(|i| !interfaces.contains(i))
                    .cloned()
                    .collect();
                let mut added: Vec<String> = Vec::new();
                for name in interfaces.iter().filter(|i| !current.contains(i)) {
                    if let Err(e) = dp.attach_interface(name) {
                        for done in &added {
                            let _ = dp.detach_interface(done);
                        }
                        return Err(e);
                    }
                    added.push(name.clone());
                }
                Box::new(LbChange::Interfaces {
                    ctl: me,
                    added,
                    removed,
                    settings: new.clone(),
                })
            }
            (Some(_), Some(reason)) => Box::new(LbChange::Off {
                ctl: me,
                reason,
                settings: new.clone(),
            }),
            (None, None) => {
                let interfaces = if self.netlink {
                    self.present_interfaces(new)?
                } else {
                    config::expand_interfaces(
                        &new.lb.interfaces,
                        &config::interface_names(),
                        new.origin.source(),
                    )?
                };
                migrate_flat_pins(&new.pin_root, &Self::pin_dir(new), &FLAT_PINS)?;
                let mut dp = Dataplane::start(&Self::dataplane_config(new, interfaces))?;
                if let Err(e) = dp.reconcile(store.state()) {
                    for (name, _) in dp.interfaces() {
                        let _ = dp.detach_interface(&name);
                    }
                    return Err(e);
                }
                Box::new(LbChange::Up {
                    ctl: me,
                    dp: Box::new(dp),
                    settings: new.clone(),
                })
            }
            (None, Some(reason)) => {
                drop(guard);
                let mut inner = lock(&self.inner);
                inner.health.enabled = new.lb.enabled;
                inner.health.reason = Some(reason);
                inner.settings = new.clone();
                return Ok(Box::new(NoChange));
            }
        };
        Ok(change)
    }
}

/// Clears `reloading` and wakes the node sync when dropped: after commit, rollback, a failed
/// prepare, or a prepared change never used.
struct Reloading(Arc<LbController>);

impl Drop for Reloading {
    fn drop(&mut self) {
        self.0
            .reloading
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.0.resync.notify_one();
    }
}

/// A prepared change that holds the node sync back until it is committed or rolled back.
struct ReloadGuarded {
    change: Option<Box<dyn Prepared>>,
    _pending: Reloading,
}

impl Prepared for ReloadGuarded {
    fn commit(mut self: Box<Self>) -> Vec<String> {
        self.change.take().map(|c| c.commit()).unwrap_or_default()
    }

    fn rollback(mut self: Box<Self>) {
        if let Some(c) = self.change.take() {
            c.rollback();
        }
    }
}

impl Controller for LbController {
    fn name(&self) -> &'static str {
        NAME
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            features: &[Feature::Xdp],
            // Loading programs and maps (CAP_BPF), attaching XDP and reading interfaces
            // (CAP_NET_ADMIN), the verifier's pointer arithmetic on packet data (CAP_PERFMON).
            capabilities: &[Capability::Bpf, Capability::NetAdmin, Capability::Perfmon],
        }
    }

    fn enabled(&self, settings: &Settings) -> bool {
        settings.lb.enabled
    }

    fn start(&self, settings: &Settings, blocker: Option<String>) -> Result<()> {
        let reason = Self::off_reason(settings, blocker);
        // Waited for without the lock: a scrape of /metrics meanwhile must not block on it.
        let interfaces = match reason {
            None => Some(self.wait_for_interfaces(settings)?),
            Some(_) => None,
        };
        let mut guard = self.ctl.blocking_lock();
        let (store, plane) = guard.parts_mut();
        if let Some(interfaces) = interfaces {
            let dir = Self::pin_dir(settings);
            migrate_flat_pins(&settings.pin_root, &dir, &FLAT_PINS)?;
            let mut dp = Dataplane::start(&Self::dataplane_config(settings, interfaces.clone()))?;
            dp.reconcile(store.state())?;
            info!(interfaces = ?interfaces, services = store.state().services.len(),
                  "module lb up: XDP load balancer attached and reconciled");
            self.note_attached(&dp);
            *plane = LbPlane::on(dp);
        } else {
            lock(&self.inner).waiting = None;
            *plane = LbPlane::off(reason.clone().unwrap_or_default());
        }
        self.publish_tables(plane, settings.lb.max_flows);
        self.set_health(settings, plane, reason);
        lock(&self.inner).settings = settings.clone();
        Ok(())
    }

    fn prepare(
        self: Arc<Self>,
        new: &Settings,
        blocker: Option<String>,
    ) -> Result<Box<dyn Prepared>> {
        // The node sync waits while a reload is between prepare and commit: it would judge
        // the interfaces prepare attached by the old patterns, and detach them (attaching
        // XDP itself announces the link, which wakes the sync).
        self.reloading
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let pending = Reloading(Arc::clone(&self));
        let change = Arc::clone(&self).prepare_change(new, blocker)?;
        Ok(Box::new(ReloadGuarded {
            change: Some(change),
            _pending: pending,
        }))
    }

    fn run(self: Arc<Self>, cancel: Cancel) -> RunFuture {
        if self.netlink {
            Box::pin(node::follow_node(self, cancel))
        } else {
            Box::pin(warm_neighbours(self, cancel))
        }
    }

    fn health(&self) -> Health {
        lock(&self.inner).health.clone()
    }

    fn not_ready(&self) -> Option<String> {
        lock(&self.inner).waiting.clone()
    }

    fn routes(self: Arc<Self>) -> axum::Router {
        server::router(Arc::clone(&self.ctl)).merge(sources::router(self.source_readers.clone()))
    }

    fn collectors(self: Arc<Self>) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(metrics::LbCollector::new(
                Arc::clone(&self.ctl),
                self.occupancy.clone(),
                self.prog_stats.clone(),
            )),
            Box::new(sources::collector(self.source_readers.clone())),
            Box::new(metrics::fib_collector(self)),
        ]
    }

    fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Without the netlink controller only: re-resolves backend neighbours whenever the datapath
/// reports packets that found none (see `Dataplane::prime_neighbours`). Polls a per-CPU
/// counter twice a second; with the netlink controller the next hops are managed neighbours
/// and nothing polls.
async fn warm_neighbours(lb: Arc<LbController>, mut cancel: Cancel) -> Result<()> {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut seen = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = cancel.cancelled() => return Ok(()),
        }
        let mut ctl = lb.ctl.lock().await;
        let Some(dp) = ctl.parts_mut().1.dataplane_mut() else {
            seen = None;
            continue;
        };
        let Ok(misses) = dp.neighbour_misses() else {
            continue;
        };
        if seen.is_some_and(|seen| misses > seen) {
            info!(
                misses,
                "next hops without a neighbour entry: priming backend neighbours"
            );
            dp.prime_neighbours();
        }
        seen = Some(misses);
    }
}
