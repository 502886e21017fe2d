//! The `policy` controller: the tc (TCX) policy. It owns the tc object (pins under
//! `pin_root/policy/`), the applied policy and its saved file, the policy routes and metrics.
//! It drains the programs' flow events onto the bus ([`crate::ct::FLOW_EVENTS`]) and lends its
//! conntrack table to the conntrack controller as a typed handle.
mod api;
mod metrics;
pub mod plane;
pub mod spec;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ::conntrack::Timeouts;
use bpf_common::{
    ct::{CtEntry, CtKey},
    policy::{FlowEvent, map_names},
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use crate::ct::table::{
    CtFilter, CtFlow, TABLE_LB, TABLE_POLICY, ct_state_names, original_tuple, proto_name,
    sort_flows,
};
use crate::{
    Error, Result,
    bpf::pins::{FlatPins, controller_dir, migrate_flat_pins},
    bus::{Bus, StateReader, StateWriter, Topic},
    config::{PolicySettings, Settings},
    controller::{Cancel, Controller, Health, Prepared, Requirements, RunFuture},
    ct::{EVENT_BUFFER, FLOW_EVENTS, FlowEventView, POLICY_TABLE, PolicyTable, PolicyTableHandle},
    features::Feature,
    persist,
};
pub use plane::*;
pub use spec::*;

pub const NAME: &str = "policy";
/// Version of the saved policy file (files of earlier builds, without one, are version 1).
const POLICY_FILE_VERSION: u32 = 1;

/// The body of `PUT /v1/policy`: the api crate's type.
pub use datapath_api::ApplyPolicy;

/// What the policy file holds on disk.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedPolicy {
    policy: PolicySpec,
}

/// The maps and links the flat layout of builds before controllers held for the policy.
const FLAT_PINS: FlatPins<'static> = FlatPins {
    maps: &[
        map_names::CT_FLOWS,
        map_names::GENERATION,
        map_names::ENDPOINTS,
        map_names::RULES_LPM,
        map_names::RULE_LISTS,
        map_names::RULE_STATS,
        map_names::EP_STATS,
        map_names::REASONS,
        map_names::EVENTS,
        map_names::EVENT_RATE,
    ],
    link_prefixes: &["tc_ingress_", "tc_egress_"],
};

struct Inner {
    plane: Option<PolicyPlane>,
    settings: PolicySettings,
    /// Why the module is off.
    reason: String,
}

/// See the module documentation.
pub struct PolicyController {
    me: Weak<PolicyController>,
    inner: Mutex<Inner>,
    pin_root: PathBuf,
    state_file: PathBuf,
    rule_names: Mutex<BTreeMap<u32, String>>,
    events: Arc<Topic<Arc<FlowEventView>>>,
    table: StateWriter<PolicyTableHandle>,
    /// Bumped whenever the programs are loaded or unloaded: the event reader follows.
    loaded: tokio::sync::watch::Sender<u64>,
    events_received: AtomicU64,
    /// The interfaces the netlink controller learned; their changes drive attachment.
    links: StateReader<crate::netlink::model::Links>,
    /// Whether the netlink controller runs (fixed until restart); without it, interfaces are
    /// polled every second as before.
    netlink: bool,
    attached: StateWriter<crate::netlink::Attached>,
    reattachments: StateWriter<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PolicyController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        let events = bus.topic::<Arc<FlowEventView>>(FLOW_EVENTS, EVENT_BUFFER)?;
        let table = bus.state::<PolicyTableHandle>(POLICY_TABLE)?.writer()?;
        let links = bus.state::<crate::netlink::model::Links>(crate::netlink::LINKS)?;
        let attached = bus
            .state::<crate::netlink::Attached>(crate::netlink::POLICY_ATTACHED)?
            .writer()?;
        let reattachments = bus
            .state::<u64>(crate::netlink::POLICY_REATTACHMENTS)?
            .writer()?;
        Ok(Arc::new_cyclic(|me| Self {
            me: me.clone(),
            inner: Mutex::new(Inner {
                plane: None,
                settings: settings.policy.clone(),
                reason: "starting".into(),
            }),
            pin_root: settings.pin_root.clone(),
            state_file: settings.policy_state_file(),
            rule_names: Mutex::new(BTreeMap::new()),
            events,
            table,
            loaded: tokio::sync::watch::Sender::new(0),
            events_received: AtomicU64::new(0),
            links: links.reader(),
            netlink: settings.netlink.enabled,
            attached,
            reattachments,
        }))
    }

    fn pin_dir(&self) -> PathBuf {
        controller_dir(&self.pin_root, NAME)
    }

    /// Why the policy module cannot run with `features` (TCX and ring buffers are needed).
    pub fn blocker(features: &crate::features::Features) -> Option<String> {
        [Feature::Tcx, Feature::Ringbuf]
            .into_iter()
            .find(|f| !features.available(*f))
            .map(|f| format!("kernel feature {} missing or forced off", f.name()))
    }

    pub fn settings(&self) -> PolicySettings {
        lock(&self.inner).settings.clone()
    }

    /// Whether the programs are loaded, and why not.
    pub fn up(&self) -> (bool, String) {
        let inner = lock(&self.inner);
        (inner.plane.is_some(), inner.reason.clone())
    }

    fn load_saved(&self) -> Result<PolicySpec> {
        Ok(
            persist::load_versioned::<SavedPolicy>(&self.state_file, POLICY_FILE_VERSION, Some(1))?
                .map(|(_, saved)| saved.policy)
                .unwrap_or_default(),
        )
    }

    fn save(&self, spec: &PolicySpec) -> Result<()> {
        persist::save_versioned(
            &self.state_file,
            POLICY_FILE_VERSION,
            &SavedPolicy {
                policy: spec.clone(),
            },
        )
    }

    fn refresh_rule_names(&self, plane: &PolicyPlane) {
        if let Ok(status) = plane.status() {
            *lock(&self.rule_names) = status
                .rules
                .iter()
                .map(|r| {
                    let name = r.rule.name.clone().unwrap_or_else(|| {
                        format!("{}/{}[{}]", r.rule.endpoint, r.rule.direction, r.rule.index)
                    });
                    (r.rule.id, name)
                })
                .collect();
        }
    }

    /// Publishes (or withdraws) this controller's table on the bus.
    fn publish_table(&self, up: bool) {
        let handle: PolicyTableHandle = if up {
            self.me.upgrade().map(|me| me as Arc<dyn PolicyTable>)
        } else {
            None
        };
        self.table.publish(handle);
        self.loaded.send_modify(|g| *g += 1);
    }

    /// Brings the module to `settings` (at start and on every reload): loads the programs and
    /// restores the saved policy when it turns on, attaches to the interfaces matching
    /// `settings.interfaces` and detaches from the others, unloads when it turns off.
    /// Returns what changed. `blocker`: why the module cannot run here; it then stays off
    /// with that reason, as if disabled.
    pub fn configure(&self, settings: &PolicySettings, blocker: Option<String>) -> Result<String> {
        let mut inner = lock(&self.inner);
        let mut changes = Vec::new();
        if !settings.enabled || blocker.is_some() {
            if let Some(mut plane) = inner.plane.take() {
                for name in plane.interfaces() {
                    let _ = plane.detach(&name);
                }
                changes.push("module policy off".to_string());
            }
            // Also the links a previous run pinned: an off module enforces nothing.
            for dir in [self.pin_dir(), self.pin_root.clone()] {
                if let Err(e) = unpin_tcx_links(&dir, &[]) {
                    warn!(error = %e, "could not unpin the TCX links of a previous run");
                }
            }
            inner.reason = if settings.enabled {
                let why = blocker.unwrap_or_default();
                warn!(reason = %why, "module policy off");
                why
            } else {
                "disabled by the configuration".into()
            };
            inner.settings = settings.clone();
            drop(inner);
            self.publish_table(false);
            return Ok(changes.join(", "));
        }
        if inner.plane.is_none() {
            let saved = self.load_saved()?;
            migrate_flat_pins(&self.pin_root, &self.pin_dir(), &FLAT_PINS)?;
            let mut plane = PolicyPlane::start(&PolicyConfig {
                pin_root: self.pin_dir(),
                max_ct_flows: settings.max_flows,
                event_rate: settings.event_rate,
            })?;
            if !saved.endpoints.is_empty() {
                plane.apply(&saved)?;
            }
            self.refresh_rule_names(&plane);
            info!(
                endpoints = saved.endpoints.len(),
                "module policy up: tc programs loaded, saved policy restored"
            );
            changes.push("module policy up".to_string());
            inner.plane = Some(plane);
        }
        let plane = inner.plane.as_mut().expect("loaded above");
        let before = plane.interfaces();
        let after = plane.sync_interfaces(&settings.interfaces)?;
        for name in after.iter().filter(|n| !before.contains(n)) {
            changes.push(format!("policy attached {name}"));
        }
        for name in before.iter().filter(|n| !after.contains(n)) {
            changes.push(format!("policy detached {name}"));
        }
        if !changes.is_empty() {
            info!(interfaces = ?after, "policy interfaces (TCX)");
        }
        inner.reason.clear();
        inner.settings = settings.clone();
        drop(inner);
        self.publish_table(true);
        Ok(changes.join(", "))
    }

    fn with_plane<T>(&self, f: impl FnOnce(&mut PolicyPlane) -> Result<T>) -> Result<T> {
        let mut inner = lock(&self.inner);
        let reason = inner.reason.clone();
        let plane = inner.plane.as_mut().ok_or_else(|| {
            Error::Unavailable(format!(
                "the policy module is off ({reason}); enable it with `policy.enabled: true`"
            ))
        })?;
        f(plane)
    }

    /// Applies a policy file's text whole and saves it; on any error the old policy stays in
    /// force (and on disk).
    pub fn apply_text(&self, text: &str) -> Result<PolicyStatus> {
        let spec = PolicySpec::parse(text)?;
        self.with_plane(|plane| {
            let old = plane.policy().clone();
            plane.apply(&spec)?;
            if let Err(e) = self.save(&spec) {
                plane.apply(&old)?;
                return Err(e);
            }
            self.refresh_rule_names(plane);
            plane.status()
        })
    }

    /// Removes the policy (every interface passes everything) and saves that.
    pub fn delete(&self) -> Result<PolicyStatus> {
        self.with_plane(|plane| {
            let old = plane.policy().clone();
            plane.delete()?;
            if let Err(e) = self.save(&PolicySpec::default()) {
                plane.apply(&old)?;
                return Err(e);
            }
            self.refresh_rule_names(plane);
            plane.status()
        })
    }

    pub fn status(&self) -> Result<PolicyStatus> {
        self.with_plane(|plane| plane.status())
    }

    /// Attaches to interfaces that appeared since and match `policy.interfaces`, detaches from
    /// those gone (pod veths come and go between reloads). Returns what changed.
    pub fn resync_interfaces(&self) -> Result<Vec<String>> {
        let patterns = self.settings().interfaces;
        self.with_plane(|plane| {
            let before = plane.interfaces();
            let after = plane.sync_interfaces(&patterns)?;
            let mut changes: Vec<String> = after
                .iter()
                .filter(|n| !before.contains(n))
                .map(|n| format!("attached {n}"))
                .collect();
            changes.extend(
                before
                    .iter()
                    .filter(|n| !after.contains(n))
                    .map(|n| format!("detached {n}")),
            );
            Ok(changes)
        })
    }

    /// The flow-event ring buffer, opened from this controller's own pin (so a restarted run
    /// loop finds it again; records not yet read stay in the ring).
    fn open_ring(&self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let path = self.pin_dir().join(map_names::EVENTS);
        let data = aya::maps::MapData::from_pin(&path).map_err(|source| Error::Map {
            context: format!("open pinned map {}", path.display()),
            source: Box::new(source),
        })?;
        aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(data)).map_err(|source| Error::Map {
            context: "open the flow-event ring buffer".into(),
            source: Box::new(source),
        })
    }
}

impl PolicyTable for PolicyController {
    fn entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        self.with_plane(|plane| plane.ct_entries())
    }

    fn remove(&self, keys: &[CtKey]) -> Result<u64> {
        self.with_plane(|plane| plane.ct_remove(keys))
    }

    fn sweep(
        &self,
        timeouts: &Timeouts,
        now_ns: u64,
        max_deletes: usize,
    ) -> Result<(u64, Vec<(CtKey, CtEntry)>)> {
        self.with_plane(|plane| plane.ct_sweep_counted(timeouts, now_ns, max_deletes))
    }

    fn capacity(&self) -> u64 {
        u64::from(self.settings().max_flows)
    }

    fn rule_names(&self) -> BTreeMap<u32, String> {
        lock(&self.rule_names).clone()
    }

    fn event_losses(&self) -> BTreeMap<String, u64> {
        let reasons = self.with_plane(|plane| plane.reasons()).unwrap_or_default();
        BTreeMap::from([
            (
                "ring_full".to_string(),
                reasons.get("event_lost").copied().unwrap_or(0),
            ),
            (
                "rate_limited".to_string(),
                reasons.get("event_rate_limited").copied().unwrap_or(0),
            ),
        ])
    }

    fn events_received(&self) -> u64 {
        self.events_received.load(Ordering::Relaxed)
    }
}

/// Attaches the policy to interfaces that appear (and forgets those gone) as the netlink
/// controller announces them, and every `policy.attach_watchdog_ms` attaches again a link that
/// someone else detached (the kernel announces no detach). Without the netlink controller,
/// interfaces are looked up every second instead.
async fn watch_interfaces(policy: Arc<PolicyController>) -> Result<()> {
    let watchdog = policy.settings().attach_watchdog;
    let period = match (policy.netlink, watchdog.is_zero()) {
        (false, _) => Duration::from_secs(1),
        (true, false) => watchdog,
        // Nothing periodic to do: a timer that never fires in practice.
        (true, true) => Duration::from_secs(86_400 * 365),
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut links = policy.links.clone();
    loop {
        let sync = tokio::select! {
            _ = links.changed(), if policy.netlink => true,
            _ = ticker.tick() => !policy.netlink,
        };
        if !policy.up().0 {
            continue;
        }
        let p = Arc::clone(&policy);
        let repair = policy.netlink && !watchdog.is_zero() && !sync;
        let done = tokio::task::spawn_blocking(move || {
            if sync && p.netlink && !p.links.is_ready() {
                return Ok(Vec::new());
            }
            let mut changes = if sync { p.resync_interfaces()? } else { Vec::new() };
            if repair {
                let repaired = p.with_plane(|plane| plane.repair_detached())?;
                if !repaired.is_empty() {
                    p.reattachments
                        .modify(|n| *n += repaired.len() as u64);
                    warn!(interfaces = ?repaired, "policy links were detached by someone else: attached again");
                    changes.extend(repaired.iter().map(|n| format!("re-attached {n}")));
                }
            }
            p.attached.publish(p.with_plane(|plane| Ok(plane.attached())).unwrap_or_default());
            Ok::<_, Error>(changes)
        })
        .await;
        match done {
            Ok(Ok(changes)) if !changes.is_empty() => {
                info!(changes = %changes.join(", "), "policy interfaces (TCX)");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot sync the policy's interfaces"),
            Err(e) => {
                return Err(Error::Internal(format!(
                    "policy interface sync failed: {e}"
                )));
            }
        }
    }
}

/// Drains the flow-event ring buffer onto the bus while the programs are loaded.
async fn read_events(policy: Arc<PolicyController>, cancel: Cancel) -> Result<()> {
    let mut loaded = policy.loaded.subscribe();
    loop {
        loaded.borrow_and_update();
        if policy.up().0 {
            let ring = policy.open_ring()?;
            let p = Arc::clone(&policy);
            let drain = crate::bpf::ringbuf::drain(
                ring,
                Arc::clone(&policy.events),
                bpf_common::policy::defaults::EVENTS_BYTES as usize / 8,
                None,
                cancel.clone(),
                move |event: FlowEvent| {
                    p.events_received.fetch_add(1, Ordering::Relaxed);
                    Arc::new(FlowEventView::from_event(&event, &lock(&p.rule_names)))
                },
            );
            tokio::select! {
                done = drain => return done,
                // Reloaded or unloaded: open the ring of what is loaded now.
                _ = loaded.changed() => continue,
            }
        }
        let mut cancel = cancel.clone();
        tokio::select! {
            _ = loaded.changed() => {}
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

/// A prepared reload: the module is at the new settings already; a rollback configures it
/// back exactly as it was.
struct Reconfigured {
    policy: Arc<PolicyController>,
    old: PolicySettings,
    old_blocker: Option<String>,
    changes: String,
}

impl Prepared for Reconfigured {
    fn commit(self: Box<Self>) -> Vec<String> {
        if self.changes.is_empty() {
            Vec::new()
        } else {
            vec![self.changes]
        }
    }

    fn rollback(self: Box<Self>) {
        if let Err(e) = self.policy.configure(&self.old, self.old_blocker) {
            tracing::error!(error = %e, "could not restore the policy module after a refused reload");
        }
    }
}

impl Controller for PolicyController {
    fn name(&self) -> &'static str {
        NAME
    }

    fn after(&self) -> &'static [&'static str] {
        // The policy sits beside the load balancer; it is started after it so that a start-up
        // failure of the load balancer never leaves a half-configured policy.
        &[crate::lb::NAME]
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            features: &[Feature::Tcx, Feature::Ringbuf],
            capabilities: &[
                crate::features::Capability::Bpf,
                crate::features::Capability::NetAdmin,
                crate::features::Capability::Perfmon,
            ],
        }
    }

    fn enabled(&self, settings: &Settings) -> bool {
        settings.policy.enabled
    }

    fn start(&self, settings: &Settings, blocker: Option<String>) -> Result<()> {
        let said = self.configure(&settings.policy, blocker)?;
        if !said.is_empty() {
            info!(changes = %said, "policy module configured");
        }
        Ok(())
    }

    fn prepare(
        self: Arc<Self>,
        settings: &Settings,
        blocker: Option<String>,
    ) -> Result<Box<dyn Prepared>> {
        let old = self.settings();
        let (was_up, old_reason) = self.up();
        let old_blocker = (!was_up && old.enabled).then_some(old_reason);
        let changes = self.configure(&settings.policy, blocker)?;
        Ok(Box::new(Reconfigured {
            policy: self,
            old,
            old_blocker,
            changes,
        }))
    }

    fn run(self: Arc<Self>, cancel: Cancel) -> RunFuture {
        Box::pin(async move {
            let mut stop = cancel.clone();
            tokio::select! {
                r = watch_interfaces(Arc::clone(&self)) => r,
                r = read_events(Arc::clone(&self), cancel) => r,
                _ = stop.cancelled() => Ok(()),
            }
        })
    }

    fn health(&self) -> Health {
        let inner = lock(&self.inner);
        Health {
            enabled: inner.settings.enabled,
            up: inner.plane.is_some(),
            reason: inner.plane.is_none().then(|| inner.reason.clone()),
        }
    }

    fn routes(self: Arc<Self>) -> axum::Router {
        api::router(self)
    }

    fn collectors(self: Arc<Self>) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(metrics::collector(self))]
    }
}
