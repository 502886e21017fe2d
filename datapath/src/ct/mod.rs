//! The `conntrack` controller: owns both conntrack tables as the daemon sees them (the load
//! balancer's `LB_FLOWS` with `LB_NAT_REV`, and the policy's `CT_FLOWS`), through typed
//! handles their owners publish on the bus. It lists and flushes them, sweeps them (GC), counts
//! their occupancy at every sweep (so `/metrics` never walks a map), publishes expired flows on
//! the flow-event topic, and serves the conntrack and flow-event routes.
mod api;
pub mod gc;
mod metrics;
pub mod table;

use std::{
    collections::{BTreeMap, VecDeque},
    os::fd::{AsFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ::conntrack::{Timeouts, state_name};
use bpf_common::{
    ct::{CtEntry, CtKey, POLICY_DIR_INGRESS, RULE_DEFAULT},
    policy::{
        EVENT_CLOSED, EVENT_CUT, EVENT_DENIED, EVENT_EXPIRED, EVENT_LOGGED, EVENT_OPENED, FlowEvent,
    },
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    Error, Result,
    bus::{Bus, StateReader, StateWriter, Subscriber, Topic},
    config::Settings,
    controller::{Cancel, Controller, Health, Prepared, RunFuture},
};
use gc::{FlowGc, GcConfig, monotonic_now_ns};
use table::{CtFilter, CtFlow, original_tuple, proto_name, sort_flows};

pub const NAME: &str = "conntrack";
/// State: the load balancer's flow tables (writer: lb).
pub const LB_TABLES: &str = "lb.flow_tables";
/// State: the policy's conntrack table (writer: policy).
pub const POLICY_TABLE: &str = "policy.ct_table";
/// State: entries of each table at the last sweep (writer: conntrack).
pub const OCCUPANCY: &str = "conntrack.occupancy";
/// Topic: flow opened, logged, closed, denied, cut (policy's ring buffer) and expired (GC),
/// as `Arc<FlowEventView>`: every subscriber shares one copy of an event.
pub const FLOW_EVENTS: &str = "flow_events";
/// Events a subscriber of [`FLOW_EVENTS`] may fall behind by before it loses some.
pub const EVENT_BUFFER: usize = 4096;
/// Events kept for `GET /v1/flows` without `follow`.
pub const RECENT_EVENTS: usize = 256;
/// Most entries one sweep of the policy's table removes (the rest wait for the next one).
pub const GC_MAX_DELETES: usize = 20_000;

/// The load balancer's flow tables: duplicates of its descriptors.
pub struct LbFlowTables {
    pub flows: OwnedFd,
    pub nat_reverse: OwnedFd,
    pub max_flows: u32,
}

/// The policy's conntrack table, as its owner lends it.
pub trait PolicyTable: Send + Sync {
    /// Every entry, read in batches.
    fn entries(&self) -> Result<Vec<(CtKey, CtEntry)>>;
    /// Deletes `keys`; answers how many were there.
    fn remove(&self, keys: &[CtKey]) -> Result<u64>;
    /// Removes flows idle past `timeouts` (at most `max_deletes`, never one refreshed since
    /// the scan); answers how many entries it read and the expired ones.
    fn sweep(
        &self,
        timeouts: &Timeouts,
        now_ns: u64,
        max_deletes: usize,
    ) -> Result<(u64, Vec<(CtKey, CtEntry)>)>;
    fn capacity(&self) -> u64;
    /// Rule names by id, to name the rule of an expired flow.
    fn rule_names(&self) -> BTreeMap<u32, String>;
    /// Flow events the programs could not send, by cause (`ring_full`, `rate_limited`).
    fn event_losses(&self) -> BTreeMap<String, u64>;
    /// Flow events read from the ring buffer.
    fn events_received(&self) -> u64;
}

/// The policy table's handle on the bus.
pub type PolicyTableHandle = Option<Arc<dyn PolicyTable>>;

/// Entries of each table, as the last sweep counted them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub lb_flows: u64,
    pub lb_nat_reverse: u64,
    pub policy_flows: u64,
}

/// One flow event, as `lb-ctl flows` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEventView {
    /// `opened`, `logged`, `closed`, `denied`, `cut`, `expired`.
    pub kind: String,
    /// Kernel monotonic time of the event.
    pub ts_ns: u64,
    pub protocol: String,
    pub src: String,
    pub src_port: u16,
    pub dst: String,
    pub dst_port: u16,
    pub interface: String,
    /// `ingress` or `egress` (of the interface) of the decision.
    pub direction: String,
    /// The rule that decided (`None`: the endpoint's default action).
    pub rule: Option<u32>,
    pub rule_name: Option<String>,
    pub state: String,
    pub packets_orig: u64,
    pub packets_reply: u64,
    pub bytes_orig: u64,
    pub bytes_reply: u64,
    pub duration_ns: u64,
    pub rtt_ns: u64,
    /// The name the source asked DNS for the destination (the `dns` module), if any.
    #[serde(default)]
    pub dst_name: Option<String>,
    /// The name the destination asked DNS for the source.
    #[serde(default)]
    pub src_name: Option<String>,
    /// The process that opened the connection (the `exec` module), if known.
    #[serde(default)]
    pub pid: Option<u32>,
    /// That process's program.
    #[serde(default)]
    pub exe: Option<String>,
}

/// The answers of the conntrack routes: the api crate's types.
pub use datapath_api::{CtStats, FlushAnswer};

fn interface_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        EVENT_OPENED => "opened",
        EVENT_CLOSED => "closed",
        EVENT_DENIED => "denied",
        EVENT_CUT => "cut",
        EVENT_LOGGED => "logged",
        EVENT_EXPIRED => "expired",
        _ => "unknown",
    }
}

fn direction_name(dir: u8) -> &'static str {
    if dir == POLICY_DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

impl FlowEventView {
    pub fn from_event(e: &FlowEvent, rule_names: &BTreeMap<u32, String>) -> Self {
        let (src, src_port, dst, dst_port) = original_tuple(&e.key, e.orig_side);
        let rule = (e.rule_id != RULE_DEFAULT).then_some(e.rule_id);
        FlowEventView {
            kind: kind_name(e.kind).to_string(),
            ts_ns: e.ts_ns,
            protocol: proto_name(e.key.proto),
            src: src.to_string(),
            src_port,
            dst: dst.to_string(),
            dst_port,
            interface: interface_name(e.ifindex),
            direction: direction_name(e.policy_dir).to_string(),
            rule,
            rule_name: rule.and_then(|r| rule_names.get(&r).cloned()),
            state: state_name(e.key.proto, e.state).to_string(),
            packets_orig: e.packets[0],
            packets_reply: e.packets[1],
            bytes_orig: e.bytes[0],
            bytes_reply: e.bytes[1],
            duration_ns: e.duration_ns,
            rtt_ns: e.rtt_ns,
            dst_name: None,
            src_name: None,
            pid: None,
            exe: None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the sweeps keep between runs.
struct Sweeper {
    /// The collector over the load balancer's tables, and the handle it was opened from.
    lb: Option<(Arc<LbFlowTables>, FlowGc)>,
}

/// See the module documentation.
pub struct ConntrackController {
    settings: Mutex<Settings>,
    lb_tables: StateReader<Option<Arc<LbFlowTables>>>,
    policy_table: StateReader<PolicyTableHandle>,
    occupancy: StateWriter<Occupancy>,
    events: Arc<Topic<Arc<FlowEventView>>>,
    recent: Mutex<VecDeque<Arc<FlowEventView>>>,
    sweeper: Mutex<Sweeper>,
    /// Set on shutdown: ends the followers' streams.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Names learned from DNS answers, for the flows' ends (`dns` module).
    names: StateReader<crate::dns::NameHandle>,
    /// Who opened each connection (the `exec` module).
    owners: StateReader<crate::exec::OwnerHandle>,
    /// This controller's live flows, lent to the name store.
    live: StateWriter<crate::dns::LiveHandle>,
    pub gc_sweeps: AtomicU64,
    pub gc_expired: AtomicU64,
    pub lb_gc_expired: AtomicU64,
}

impl ConntrackController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        let occupancy = bus.state::<Occupancy>(OCCUPANCY)?.writer()?;
        Ok(Arc::new(Self {
            settings: Mutex::new(settings.clone()),
            lb_tables: bus.state::<Option<Arc<LbFlowTables>>>(LB_TABLES)?.reader(),
            policy_table: bus.state::<PolicyTableHandle>(POLICY_TABLE)?.reader(),
            occupancy,
            events: bus.topic::<Arc<FlowEventView>>(FLOW_EVENTS, EVENT_BUFFER)?,
            recent: Mutex::new(VecDeque::new()),
            sweeper: Mutex::new(Sweeper { lb: None }),
            stopping: tokio::sync::watch::Sender::new(false),
            names: bus
                .state::<crate::dns::NameHandle>(crate::dns::NAMES)?
                .reader(),
            live: bus
                .state::<crate::dns::LiveHandle>(crate::dns::LIVE_FLOWS)?
                .writer()?,
            owners: bus
                .state::<crate::exec::OwnerHandle>(crate::exec::OWNERS)?
                .reader(),
            gc_sweeps: AtomicU64::new(0),
            gc_expired: AtomicU64::new(0),
            lb_gc_expired: AtomicU64::new(0),
        }))
    }

    fn settings(&self) -> Settings {
        lock(&self.settings).clone()
    }

    /// Ends every follower's stream (on shutdown, so that in-flight requests can finish).
    pub fn stop_streams(&self) {
        self.stopping.send_replace(true);
    }

    fn policy(&self) -> PolicyTableHandle {
        (*self.policy_table.get()).clone()
    }

    fn policy_off() -> Error {
        Error::Unavailable(
            "the policy module is off and the load balancer has no flow table; enable one \
             (`policy.enabled: true`)"
                .into(),
        )
    }

    /// A collector over the load balancer's current tables, opened afresh when they change.
    fn lb_gc<T>(&self, f: impl FnOnce(&mut FlowGc) -> Result<T>) -> Option<Result<T>> {
        let tables = (*self.lb_tables.get()).clone()?;
        let mut sweeper = lock(&self.sweeper);
        let stale = sweeper
            .lb
            .as_ref()
            .is_none_or(|(t, _)| !Arc::ptr_eq(t, &tables));
        if stale {
            let dup = |fd: &OwnedFd| fd.as_fd().try_clone_to_owned();
            let opened = match (dup(&tables.flows), dup(&tables.nat_reverse)) {
                (Ok(flows), Ok(nat)) => FlowGc::from_fds(flows, nat, GcConfig::default()),
                (Err(e), _) | (_, Err(e)) => {
                    return Some(Err(Error::io("duplicate the flow tables' descriptors", e)));
                }
            };
            sweeper.lb = Some((Arc::clone(&tables), opened));
        }
        let (_, gc) = sweeper.lb.as_mut()?;
        Some(f(gc))
    }

    /// Tracked flows of both tables matching `filter`. With neither table, the "off" error.
    pub fn list(&self, filter: &CtFilter) -> Result<Vec<CtFlow>> {
        let now = monotonic_now_ns();
        let policy = self.policy();
        let lb = self.lb_gc(|gc| gc.entries());
        if policy.is_none() && lb.is_none() {
            return Err(Self::policy_off());
        }
        let mut flows = Vec::new();
        if let Some(p) = &policy {
            flows.extend(
                p.entries()?
                    .iter()
                    .map(|(k, e)| CtFlow::from_entry(k, e, now))
                    .filter(|f| filter.matches(f)),
            );
        }
        if let Some(lb) = lb {
            flows.extend(
                lb?.iter()
                    .map(|(k, e)| CtFlow::from_lb_entry(k, e, now))
                    .filter(|f| filter.matches(f)),
            );
        }
        sort_flows(&mut flows);
        if let Some(names) = self.names.get().as_ref() {
            for f in &mut flows {
                let (Ok(src), Ok(dst)) = (f.src.parse(), f.dst.parse()) else {
                    continue;
                };
                f.dst_name = names.name_of(src, dst).map(|n| n.to_string());
                f.src_name = names.name_of(dst, src).map(|n| n.to_string());
            }
        }
        if let Some(owners) = self.owners.get().as_ref() {
            for f in flows.iter_mut().filter(|f| f.protocol == "tcp") {
                let (Ok(src), Ok(dst)) = (f.src.parse(), f.dst.parse()) else {
                    continue;
                };
                if let Some(o) = owners.owner_of(src, f.src_port, dst, f.dst_port) {
                    f.pid = Some(o.pid);
                    f.exe = (!o.exe.is_empty()).then(|| o.exe.to_string());
                }
            }
        }
        Ok(flows)
    }

    /// `event` with the names of its ends, when the `dns` module knows them.
    pub fn named(&self, event: &FlowEventView) -> FlowEventView {
        let mut e = event.clone();
        if let Some(names) = self.names.get().as_ref()
            && let (Ok(src), Ok(dst)) = (e.src.parse(), e.dst.parse())
        {
            e.dst_name = names.name_of(src, dst).map(|n| n.to_string());
            e.src_name = names.name_of(dst, src).map(|n| n.to_string());
        }
        if e.protocol == "tcp"
            && let Some(owners) = self.owners.get().as_ref()
            && let (Ok(src), Ok(dst)) = (e.src.parse(), e.dst.parse())
            && let Some(o) = owners.owner_of(src, e.src_port, dst, e.dst_port)
        {
            e.pid = Some(o.pid);
            e.exe = (!o.exe.is_empty()).then(|| o.exe.to_string());
        }
        e
    }

    /// Removes the tracked flows of both tables matching `filter`.
    pub fn flush(&self, filter: &CtFilter) -> Result<u64> {
        let now = monotonic_now_ns();
        let policy = self.policy();
        let lb_entries = self.lb_gc(|gc| gc.entries());
        if policy.is_none() && lb_entries.is_none() {
            return Err(Self::policy_off());
        }
        let mut removed = 0;
        if let Some(p) = &policy {
            let victims: Vec<CtKey> = p
                .entries()?
                .iter()
                .filter(|(k, e)| filter.matches(&CtFlow::from_entry(k, e, now)))
                .map(|(k, _)| *k)
                .collect();
            removed += p.remove(&victims)?;
        }
        if let Some(entries) = lb_entries {
            let victims: Vec<CtKey> = entries?
                .iter()
                .filter(|(k, e)| filter.matches(&CtFlow::from_lb_entry(k, e, now)))
                .map(|(k, _)| *k)
                .collect();
            if !victims.is_empty() {
                removed += self.lb_gc(|gc| gc.remove(&victims)).unwrap_or(Ok(0))?;
            }
        }
        Ok(removed)
    }

    /// `GET /v1/conntrack/stats`: the policy's table (the module must be on).
    pub fn stats(&self) -> Result<CtStats> {
        let settings = self.settings();
        let policy = self.policy().ok_or_else(|| {
            Error::Unavailable(
                "the policy module is off; enable it with `policy.enabled: true`".into(),
            )
        })?;
        let now = monotonic_now_ns();
        let flows: Vec<CtFlow> = policy
            .entries()?
            .iter()
            .map(|(k, e)| CtFlow::from_entry(k, e, now))
            .collect();
        let mut stats = CtStats {
            entries: flows.len() as u64,
            capacity: policy.capacity(),
            gc_sweeps: self.gc_sweeps.load(Ordering::Relaxed),
            gc_expired: self.gc_expired.load(Ordering::Relaxed),
            events_received: policy.events_received(),
            events_lost: self.events_lost(policy.as_ref()),
            ..CtStats::default()
        };
        for f in &flows {
            *stats.by_state.entry(f.state.clone()).or_default() += 1;
            *stats.by_protocol.entry(f.protocol.clone()).or_default() += 1;
        }
        let t = settings.policy.timeouts;
        for (name, ns) in [
            ("tcp_syn", t.tcp_syn_ns),
            ("tcp_established", t.tcp_established_ns),
            ("tcp_closing", t.tcp_closing_ns),
            ("udp", t.udp_ns),
            ("other", t.other_ns),
        ] {
            stats.timeouts.insert(name.into(), ns / 1_000_000_000);
        }
        Ok(stats)
    }

    /// Events lost by cause: the programs' (`ring_full`, `rate_limited`) and the followers'
    /// that fell behind (`slow_reader`).
    fn events_lost(&self, policy: &dyn PolicyTable) -> BTreeMap<String, u64> {
        let mut lost = policy.event_losses();
        let slow: u64 = crate::bus::TopicStats::subscribers(self.events.as_ref())
            .get(api::FOLLOWER)
            .map(|c| c.lost)
            .unwrap_or(0);
        lost.insert("slow_reader".into(), slow);
        lost
    }

    fn remember(&self, event: Arc<FlowEventView>) {
        let mut recent = lock(&self.recent);
        if recent.len() >= RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(event);
    }

    /// The last events (oldest first).
    pub fn recent_events(&self) -> Vec<FlowEventView> {
        let recent: Vec<Arc<FlowEventView>> = lock(&self.recent).iter().cloned().collect();
        recent.iter().map(|e| self.named(e)).collect()
    }

    /// One sweep of the policy's table; publishes the expired flows.
    fn sweep_policy(&self) -> Result<Option<u64>> {
        let Some(policy) = self.policy() else {
            return Ok(None);
        };
        let timeouts = self.settings().policy.timeouts;
        let (scanned, expired) = policy.sweep(&timeouts, monotonic_now_ns(), GC_MAX_DELETES)?;
        self.gc_sweeps.fetch_add(1, Ordering::Relaxed);
        self.gc_expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        let names = policy.rule_names();
        let mut expired_events = Vec::with_capacity(expired.len());
        for (key, entry) in &expired {
            let event = FlowEvent {
                ts_ns: monotonic_now_ns(),
                duration_ns: entry.last_seen_ns.saturating_sub(entry.created_ns),
                packets: entry.packets,
                bytes: entry.bytes,
                rtt_ns: entry.rtt_ns,
                key: *key,
                ifindex: entry.ifindex,
                rule_id: entry.rule_id,
                kind: EVENT_EXPIRED,
                orig_side: entry.orig_side,
                policy_dir: entry.policy_dir,
                state: entry.state,
                _pad: [0; 4],
            };
            expired_events.push(Arc::new(FlowEventView::from_event(&event, &names)));
        }
        self.events.publish_batch(expired_events);
        if !expired.is_empty() {
            info!(
                expired = expired.len(),
                total = self.gc_expired.load(Ordering::Relaxed),
                "conntrack garbage collection"
            );
        }
        self.occupancy
            .modify(|o| o.policy_flows = scanned - expired.len() as u64);
        Ok(Some(scanned))
    }

    /// One sweep of the load balancer's tables.
    fn sweep_lb(&self) -> Result<()> {
        let Some(report) = self.lb_gc(|gc| gc.sweep(monotonic_now_ns())) else {
            return Ok(());
        };
        let report = report?;
        self.lb_gc_expired
            .fetch_add(report.flows_expired, Ordering::Relaxed);
        if report.flows_expired + report.nat_orphans_removed + report.deferred > 0 {
            info!(
                scanned = report.flows_scanned,
                expired = report.flows_expired,
                nat_orphans = report.nat_orphans_removed,
                deferred = report.deferred,
                kept_live = report.flows_kept_live,
                duration_us = report.duration_us,
                "flow garbage collection"
            );
        }
        self.occupancy.modify(|o| {
            o.lb_flows = report.flows_scanned - report.flows_expired;
            o.lb_nat_reverse = report.nat_scanned - report.nat_orphans_removed;
        });
        Ok(())
    }
}

impl crate::dns::LiveFlows for ConntrackController {
    fn live_addresses(&self) -> Result<std::collections::HashSet<std::net::IpAddr>> {
        let flows = match self.list(&CtFilter::default()) {
            Ok(f) => f,
            // Neither table: no flow is live.
            Err(Error::Unavailable(_)) => return Ok(Default::default()),
            Err(e) => return Err(e),
        };
        // A TCP flow that is closing or closed holds no name: its connection is over.
        Ok(flows
            .iter()
            .filter(|f| !matches!(f.state.as_str(), "TIME_WAIT" | "CLOSE"))
            .flat_map(|f| [f.src.parse().ok(), f.dst.parse().ok()])
            .flatten()
            .collect())
    }
}

/// Runs `f` on the blocking pool (sweeps read whole tables).
async fn blocking<T: Send + 'static>(
    ct: &Arc<ConntrackController>,
    f: impl FnOnce(&ConntrackController) -> T + Send + 'static,
) -> Result<T> {
    let ct = Arc::clone(ct);
    tokio::task::spawn_blocking(move || f(&ct))
        .await
        .map_err(|e| Error::Internal(format!("conntrack task failed: {e}")))
}

/// The run loop: the sweeps of both tables at their intervals, and the recent-events history.
async fn run(ct: Arc<ConntrackController>, mut cancel: Cancel) -> Result<()> {
    let mut history: Subscriber<Arc<FlowEventView>> = ct.events.subscribe("recent");
    let mut lb_next = tokio::time::Instant::now();
    let mut policy_next = tokio::time::Instant::now();
    let idle = Duration::from_secs(1);
    loop {
        let settings = ct.settings();
        let (lb_every, policy_every) =
            (settings.conntrack.gc_interval, settings.policy.gc_interval);
        // Zero disables a sweep; the loop then only wakes to read the settings again.
        let lb_at = if lb_every.is_zero() {
            tokio::time::Instant::now() + idle
        } else {
            lb_next
        };
        let policy_at = if policy_every.is_zero() {
            tokio::time::Instant::now() + idle
        } else {
            policy_next
        };
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            event = history.recv() => ct.remember(event),
            _ = tokio::time::sleep_until(lb_at) => {
                if !lb_every.is_zero() {
                    if let Err(e) = blocking(&ct, |ct| ct.sweep_lb()).await? {
                        warn!(error = %e, "flow garbage collection failed");
                        // The tables may be gone (`datapathd cleanup`): reopen next time.
                        lock(&ct.sweeper).lb = None;
                    }
                    lb_next = tokio::time::Instant::now() + lb_every;
                }
            }
            _ = tokio::time::sleep_until(policy_at) => {
                if !policy_every.is_zero() {
                    if let Err(e) = blocking(&ct, |ct| ct.sweep_policy()).await? {
                        warn!(error = %e, "conntrack garbage collection failed");
                    }
                    policy_next = tokio::time::Instant::now() + policy_every;
                }
            }
        }
    }
}

/// Nothing to prepare: the new intervals and timeouts apply from the next sweep.
struct NewSettings(Arc<ConntrackController>, Settings);

impl Prepared for NewSettings {
    fn commit(self: Box<Self>) -> Vec<String> {
        *lock(&self.0.settings) = self.1;
        Vec::new()
    }

    fn rollback(self: Box<Self>) {}
}

impl Controller for ConntrackController {
    fn name(&self) -> &'static str {
        NAME
    }

    fn after(&self) -> &'static [&'static str] {
        &[crate::lb::NAME, crate::policy::NAME]
    }

    fn enabled(&self, _: &Settings) -> bool {
        true
    }

    fn start(&self, settings: &Settings, _: Option<String>) -> Result<()> {
        *lock(&self.settings) = settings.clone();
        self.occupancy.publish(Occupancy::default());
        Ok(())
    }

    fn prepare(
        self: Arc<Self>,
        settings: &Settings,
        _: Option<String>,
    ) -> Result<Box<dyn Prepared>> {
        Ok(Box::new(NewSettings(self, settings.clone())))
    }

    fn run(self: Arc<Self>, cancel: Cancel) -> RunFuture {
        self.live
            .publish(Some(Arc::clone(&self) as Arc<dyn crate::dns::LiveFlows>));
        Box::pin(run(self, cancel))
    }

    fn health(&self) -> Health {
        Health {
            enabled: true,
            up: true,
            reason: None,
        }
    }

    fn routes(self: Arc<Self>) -> axum::Router {
        api::router(self)
    }

    fn collectors(self: Arc<Self>) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(metrics::collector(self))]
    }

    fn stop(&self) {
        self.stop_streams();
    }
}
