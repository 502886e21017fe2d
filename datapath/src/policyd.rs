//! The policy module of `datapathd`: owns the [`PolicyPlane`] (TCX programs on the interfaces
//! of `policy.interfaces`), restores and saves the applied policy, sweeps the conntrack table,
//! reads flow events from the ring buffer and serves them, and answers the policy and
//! conntrack API routes.
//!
//! Flow events: one reader task drains `TC_EVENTS` into a bounded broadcast channel
//! ([`EVENT_CHANNEL`] events) and a short history ([`RECENT_EVENTS`]). A follower that falls
//! behind loses the events it missed; they are counted (`slow_reader`), as are the events the
//! programs could not send (`ring_full`, `rate_limited`).
use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bpf_common::{
    ct::{POLICY_DIR_INGRESS, RULE_DEFAULT},
    policy::{
        EVENT_CLOSED, EVENT_CUT, EVENT_DENIED, EVENT_EXPIRED, EVENT_LOGGED, EVENT_OPENED, FlowEvent,
    },
};
use conntrack::state_name;
use prometheus::{
    IntCounterVec, IntGaugeVec, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::{
    Error, Result,
    api::{ApiFailure, ApiJson},
    config::PolicySettings,
    gc::monotonic_now_ns,
    policy::{
        CtFilter, CtFlow, PolicyConfig, PolicyPlane, PolicySpec, PolicyStatus, original_tuple,
        proto_name,
    },
    runtime::Runtime,
};

/// Events a follower may fall behind by before it loses some.
pub const EVENT_CHANNEL: usize = 4096;
/// Events kept for `GET /v1/flows` without `follow`.
pub const RECENT_EVENTS: usize = 256;
/// Most conntrack entries one GC sweep removes (the rest wait for the next sweep).
pub const GC_MAX_DELETES: usize = 20_000;

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
}

/// `GET /v1/conntrack/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtStats {
    pub entries: u64,
    pub capacity: u64,
    pub by_state: BTreeMap<String, u64>,
    pub by_protocol: BTreeMap<String, u64>,
    pub gc_sweeps: u64,
    pub gc_expired: u64,
    pub events_received: u64,
    /// Events lost by cause: `ring_full`, `rate_limited`, `slow_reader`.
    pub events_lost: BTreeMap<String, u64>,
    /// Idle timeouts in seconds.
    pub timeouts: BTreeMap<String, u64>,
}

/// `PUT /v1/policy`: the policy file's text.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyPolicy {
    pub text: String,
}

/// What the policy file holds on disk.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedPolicy {
    policy: PolicySpec,
}

struct Inner {
    plane: Option<PolicyPlane>,
    settings: PolicySettings,
    /// Why the module is off.
    reason: String,
    reader: Option<tokio::task::JoinHandle<()>>,
}

/// The policy module, shared by the API, the metrics, the GC and the reload task.
pub struct PolicyModule {
    inner: Mutex<Inner>,
    pin_root: PathBuf,
    state_file: PathBuf,
    handle: tokio::runtime::Handle,
    events: broadcast::Sender<FlowEventView>,
    /// Set on shutdown: ends the followers' streams.
    stopping: tokio::sync::watch::Sender<bool>,
    recent: Mutex<VecDeque<FlowEventView>>,
    rule_names: Mutex<BTreeMap<u32, String>>,
    pub events_received: AtomicU64,
    pub events_slow_reader: AtomicU64,
    pub gc_sweeps: AtomicU64,
    pub gc_expired: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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
    fn from_event(e: &FlowEvent, rule_names: &BTreeMap<u32, String>) -> Self {
        let (src, src_port, dst, dst_port): (Ipv4Addr, u16, Ipv4Addr, u16) =
            original_tuple(&e.key, e.orig_side);
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
        }
    }
}

impl PolicyModule {
    /// The module, off until [`PolicyModule::configure`]. Call inside the tokio runtime.
    pub fn new(pin_root: &Path, state_file: PathBuf, settings: PolicySettings) -> Arc<Self> {
        let (events, _) = broadcast::channel(EVENT_CHANNEL);
        Arc::new(Self {
            inner: Mutex::new(Inner {
                plane: None,
                settings,
                reason: "starting".into(),
                reader: None,
            }),
            pin_root: pin_root.to_path_buf(),
            state_file,
            handle: tokio::runtime::Handle::current(),
            events,
            stopping: tokio::sync::watch::Sender::new(false),
            recent: Mutex::new(VecDeque::new()),
            rule_names: Mutex::new(BTreeMap::new()),
            events_received: AtomicU64::new(0),
            events_slow_reader: AtomicU64::new(0),
            gc_sweeps: AtomicU64::new(0),
            gc_expired: AtomicU64::new(0),
        })
    }

    /// Why the policy module cannot run with `features` (TCX and ring buffers are needed).
    pub fn blocker(features: &crate::features::Features) -> Option<String> {
        use crate::features::Feature;
        [Feature::Tcx, Feature::Ringbuf]
            .into_iter()
            .find(|f| !features.available(*f))
            .map(|f| format!("kernel feature {} missing or forced off", f.name()))
    }

    /// The module's line of `lb-ctl status`.
    pub fn module_status(&self) -> datapath_api::ModuleStatus {
        let inner = lock(&self.inner);
        datapath_api::ModuleStatus {
            name: "policy".into(),
            enabled: inner.settings.enabled,
            up: inner.plane.is_some(),
            reason: (inner.plane.is_none()).then(|| inner.reason.clone()),
        }
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
        match std::fs::read_to_string(&self.state_file) {
            Ok(text) => serde_json::from_str::<SavedPolicy>(&text)
                .map(|s| s.policy)
                .map_err(|e| Error::CorruptState {
                    path: self.state_file.clone(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PolicySpec::default()),
            Err(e) => Err(Error::io(
                format!("cannot read the saved policy {}", self.state_file.display()),
                e,
            )),
        }
    }

    fn save(&self, spec: &PolicySpec) -> Result<()> {
        let persist = |e: std::io::Error| Error::Persistence {
            path: self.state_file.clone(),
            source: e,
        };
        if let Some(dir) = self.state_file.parent() {
            std::fs::create_dir_all(dir).map_err(persist)?;
        }
        let text = serde_json::to_string_pretty(&SavedPolicy {
            policy: spec.clone(),
        })
        .map_err(|e| persist(std::io::Error::other(e)))?;
        let tmp = self.state_file.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(persist)?;
        std::fs::rename(&tmp, &self.state_file).map_err(persist)
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

    /// Brings the module to `settings` (at start and on every reload): loads the programs and
    /// restores the saved policy when it turns on, attaches to the interfaces matching
    /// `settings.interfaces` and detaches from the others, unloads when it turns off.
    /// Returns what changed.
    /// `blocker`: why the module cannot run here (a kernel feature missing or forced off); it
    /// then stays off with that reason, as if disabled.
    pub fn configure(
        self: &Arc<Self>,
        settings: &PolicySettings,
        blocker: Option<String>,
    ) -> Result<String> {
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
            if let Err(e) = crate::policy::unpin_tcx_links(&self.pin_root, &[]) {
                warn!(error = %e, "could not unpin the TCX links of a previous run");
            }
            if let Some(reader) = inner.reader.take() {
                reader.abort();
            }
            inner.reason = if settings.enabled {
                let why = blocker.unwrap_or_default();
                warn!(reason = %why, "module policy off");
                why
            } else {
                "disabled by the configuration".into()
            };
            inner.settings = settings.clone();
            return Ok(changes.join(", "));
        }
        if inner.plane.is_none() {
            let saved = self.load_saved()?;
            let mut plane = PolicyPlane::start(&PolicyConfig {
                pin_root: self.pin_root.clone(),
                max_ct_flows: settings.max_flows,
                event_rate: settings.event_rate,
            })?;
            if !saved.endpoints.is_empty() {
                plane.apply(&saved)?;
            }
            if let Some(ring) = plane.take_events() {
                let me = Arc::clone(self);
                inner.reader = Some(self.handle.spawn(async move { me.read_events(ring).await }));
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

    /// Tracked flows of both conntrack tables matching `filter`: the policy module's
    /// `CT_FLOWS` when it is up, and the load balancer's `LB_FLOWS` when it is pinned. With
    /// neither, the module's "off" error.
    pub fn ct_list(&self, filter: &CtFilter) -> Result<Vec<CtFlow>> {
        let now = monotonic_now_ns();
        let lb = crate::gc::pinned_lb_flows(&self.pin_root)?;
        let mut flows = match (self.with_plane(|plane| plane.ct_list(filter, now)), &lb) {
            (Ok(flows), _) => flows,
            (Err(e), None) => return Err(e),
            (Err(_), Some(_)) => Vec::new(),
        };
        flows.extend(
            lb.iter()
                .flatten()
                .map(|(key, entry)| CtFlow::from_lb_entry(key, entry, now))
                .filter(|flow| filter.matches(flow)),
        );
        crate::policy::sort_flows(&mut flows);
        Ok(flows)
    }

    /// Removes the tracked flows of both tables matching `filter`; see [`Self::ct_list`].
    pub fn ct_flush(&self, filter: &CtFilter) -> Result<u64> {
        let now = monotonic_now_ns();
        let lb = crate::gc::pinned_lb_flows(&self.pin_root)?;
        let policy_removed = match (self.with_plane(|plane| plane.ct_flush(filter, now)), &lb) {
            (Ok(removed), _) => removed,
            (Err(e), None) => return Err(e),
            (Err(_), Some(_)) => 0,
        };
        let victims: Vec<bpf_common::ct::CtKey> = lb
            .iter()
            .flatten()
            .filter(|(key, entry)| filter.matches(&CtFlow::from_lb_entry(key, entry, now)))
            .map(|(key, _)| *key)
            .collect();
        let lb_removed = if victims.is_empty() {
            0
        } else {
            crate::gc::delete_pinned_lb_flows(&self.pin_root, &victims)?
        };
        Ok(policy_removed + lb_removed)
    }

    pub fn ct_stats(&self) -> Result<CtStats> {
        let settings = self.settings();
        let (flows, reasons) = self.with_plane(|plane| {
            Ok((
                plane.ct_list(&CtFilter::default(), monotonic_now_ns())?,
                plane.reasons()?,
            ))
        })?;
        let mut stats = CtStats {
            entries: flows.len() as u64,
            capacity: u64::from(settings.max_flows),
            gc_sweeps: self.gc_sweeps.load(Ordering::Relaxed),
            gc_expired: self.gc_expired.load(Ordering::Relaxed),
            events_received: self.events_received.load(Ordering::Relaxed),
            ..CtStats::default()
        };
        for f in &flows {
            *stats.by_state.entry(f.state.clone()).or_default() += 1;
            *stats.by_protocol.entry(f.protocol.clone()).or_default() += 1;
        }
        stats.events_lost = self.events_lost(&reasons);
        let t = settings.timeouts;
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

    fn events_lost(&self, reasons: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        BTreeMap::from([
            (
                "ring_full".to_string(),
                reasons.get("event_lost").copied().unwrap_or(0),
            ),
            (
                "rate_limited".to_string(),
                reasons.get("event_rate_limited").copied().unwrap_or(0),
            ),
            (
                "slow_reader".to_string(),
                self.events_slow_reader.load(Ordering::Relaxed),
            ),
        ])
    }

    /// One throttled sweep (at most [`GC_MAX_DELETES`] entries): removes idle flows past
    /// their timeout, never one refreshed since the scan. Returns how many expired.
    pub fn sweep(&self) -> Result<usize> {
        let timeouts = self.settings().timeouts;
        let expired =
            self.with_plane(|plane| plane.ct_sweep(&timeouts, monotonic_now_ns(), GC_MAX_DELETES))?;
        self.gc_sweeps.fetch_add(1, Ordering::Relaxed);
        self.gc_expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        let names = lock(&self.rule_names).clone();
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
            self.publish(FlowEventView::from_event(&event, &names));
        }
        Ok(expired.len())
    }

    fn publish(&self, view: FlowEventView) {
        {
            let mut recent = lock(&self.recent);
            if recent.len() >= RECENT_EVENTS {
                recent.pop_front();
            }
            recent.push_back(view.clone());
        }
        // No follower: nothing to send to.
        let _ = self.events.send(view);
    }

    /// The last events (oldest first).
    pub fn recent_events(&self) -> Vec<FlowEventView> {
        lock(&self.recent).iter().cloned().collect()
    }

    async fn read_events(self: Arc<Self>, ring: aya::maps::RingBuf<aya::maps::MapData>) {
        // SAFETY: the ring buffer owns its descriptor and moves into the AsyncFd, which
        // deregisters it before dropping it.
        let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(ring) } {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e.into_parts().1, "cannot poll the flow-event ring buffer; no flow events");
                return;
            }
        };
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    warn!(error = %e, "flow-event ring buffer failed; no more flow events");
                    return;
                }
            };
            let names = lock(&self.rule_names).clone();
            let ring = guard.get_inner_mut();
            let mut drained = false;
            // Bounded: at most the ring's capacity in records per wake-up; what is left is
            // read at once on the next turn (readiness is kept).
            for _ in 0..(bpf_common::policy::defaults::EVENTS_BYTES as usize / 8) {
                let Some(item) = ring.next() else {
                    drained = true;
                    break;
                };
                if item.len() < std::mem::size_of::<FlowEvent>() {
                    continue;
                }
                // SAFETY: the record holds at least one FlowEvent, a plain-old-data struct.
                let event: FlowEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) };
                drop(item);
                self.events_received.fetch_add(1, Ordering::Relaxed);
                self.publish(FlowEventView::from_event(&event, &names));
            }
            if drained {
                guard.clear_ready();
            } else {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Ends every follower's stream (on shutdown, so that in-flight requests can finish).
    pub fn stop_streams(&self) {
        self.stopping.send_replace(true);
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

    /// A receiver of the events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<FlowEventView> {
        self.events.subscribe()
    }
}

/// Every second: attaches the policy to interfaces that appeared (and forgets those gone).
pub async fn watch_interfaces(module: Arc<PolicyModule>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if !module.up().0 {
            continue;
        }
        let m = Arc::clone(&module);
        match tokio::task::spawn_blocking(move || m.resync_interfaces()).await {
            Ok(Ok(changes)) if !changes.is_empty() => {
                info!(changes = %changes.join(", "), "policy interfaces (TCX)");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot sync the policy's interfaces"),
            Err(e) => warn!(error = %e, "policy interface sync task failed"),
        }
    }
}

/// The periodic conntrack sweep: one sweep per `policy.gc_interval_seconds` (read again after
/// every sweep, so a reload changes it), on a blocking thread.
pub async fn collect_conntrack(module: Arc<PolicyModule>) {
    loop {
        let interval = module.settings().gc_interval;
        tokio::time::sleep(if interval.is_zero() {
            Duration::from_secs(1)
        } else {
            interval
        })
        .await;
        if interval.is_zero() || !module.up().0 {
            continue;
        }
        let m = Arc::clone(&module);
        match tokio::task::spawn_blocking(move || m.sweep()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(
                expired = n,
                total = module.gc_expired.load(Ordering::Relaxed),
                "conntrack garbage collection"
            ),
            Ok(Err(e)) => warn!(error = %e, "conntrack garbage collection failed"),
            Err(e) => warn!(error = %e, "conntrack garbage collection task failed"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// API
// ---------------------------------------------------------------------------------------------

type Shared = Arc<PolicyModule>;

async fn blocking<T: Send + 'static>(
    m: &Shared,
    f: impl FnOnce(&PolicyModule) -> Result<T> + Send + 'static,
) -> std::result::Result<Json<T>, ApiFailure> {
    let m = Arc::clone(m);
    match tokio::task::spawn_blocking(move || f(&m)).await {
        Ok(r) => r.map(Json).map_err(ApiFailure::from),
        Err(e) => Err(ApiFailure::from(Error::io(
            "request task failed",
            std::io::Error::other(e.to_string()),
        ))),
    }
}

async fn get_policy(State(m): State<Shared>) -> impl IntoResponse {
    blocking(&m, |m| m.status()).await
}

async fn put_policy(
    State(m): State<Shared>,
    ApiJson(req): ApiJson<ApplyPolicy>,
) -> impl IntoResponse {
    blocking(&m, move |m| m.apply_text(&req.text)).await
}

async fn delete_policy(State(m): State<Shared>) -> impl IntoResponse {
    blocking(&m, |m| m.delete()).await
}

/// Query of the conntrack routes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CtQuery {
    address: Option<String>,
    port: Option<u16>,
    protocol: Option<String>,
    state: Option<String>,
    table: Option<String>,
}

impl From<CtQuery> for CtFilter {
    fn from(q: CtQuery) -> Self {
        CtFilter {
            address: q.address,
            port: q.port,
            protocol: q.protocol,
            state: q.state,
            table: q.table,
        }
    }
}

/// `DELETE /v1/conntrack`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlushAnswer {
    pub removed: u64,
}

fn ct_query(
    q: std::result::Result<Query<CtQuery>, axum::extract::rejection::QueryRejection>,
) -> std::result::Result<CtFilter, ApiFailure> {
    let filter: CtFilter = q.map(|Query(q)| q.into()).map_err(|e| {
        ApiFailure::from(Error::InvalidArgument(format!(
            "invalid filter: {}",
            e.body_text()
        )))
    })?;
    filter
        .validate()
        .map_err(|e| ApiFailure::from(Error::InvalidArgument(format!("invalid filter: {e}"))))?;
    Ok(filter)
}

async fn list_conntrack(
    State(m): State<Shared>,
    q: std::result::Result<Query<CtQuery>, axum::extract::rejection::QueryRejection>,
) -> std::result::Result<Json<Vec<CtFlow>>, ApiFailure> {
    let filter = ct_query(q)?;
    blocking(&m, move |m| m.ct_list(&filter)).await
}

async fn flush_conntrack(
    State(m): State<Shared>,
    q: std::result::Result<Query<CtQuery>, axum::extract::rejection::QueryRejection>,
) -> std::result::Result<Json<FlushAnswer>, ApiFailure> {
    let filter = ct_query(q)?;
    blocking(&m, move |m| {
        m.ct_flush(&filter).map(|removed| FlushAnswer { removed })
    })
    .await
}

async fn conntrack_stats(State(m): State<Shared>) -> impl IntoResponse {
    blocking(&m, |m| m.ct_stats()).await
}

/// Query of `GET /v1/flows`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowsQuery {
    /// Stream events as they come (JSON lines) instead of the recent ones.
    #[serde(default)]
    follow: bool,
    /// Stop after this many events.
    count: Option<u64>,
    /// Stop after this many seconds (default and most: one day).
    timeout_seconds: Option<u64>,
}

const MAX_FOLLOW: Duration = Duration::from_secs(86_400);

async fn flows(
    State(m): State<Shared>,
    q: std::result::Result<Query<FlowsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return ApiFailure::from(Error::InvalidArgument(format!(
                "invalid query: {}",
                e.body_text()
            )))
            .into_response();
        }
    };
    if !q.follow {
        return Json(m.recent_events()).into_response();
    }
    let rx = m.subscribe();
    let limit = q.count.unwrap_or(u64::MAX);
    let deadline = tokio::time::Instant::now()
        + q.timeout_seconds
            .map(Duration::from_secs)
            .unwrap_or(MAX_FOLLOW)
            .min(MAX_FOLLOW);
    let stop = m.stopping.subscribe();
    let state = (rx, 0u64, m, stop);
    let stream =
        futures_util::stream::unfold(state, move |(mut rx, sent, m, mut stop)| async move {
            if sent >= limit || *stop.borrow() {
                return None;
            }
            loop {
                let got = tokio::select! {
                    got = tokio::time::timeout_at(deadline, rx.recv()) => got,
                    _ = stop.changed() => return None,
                };
                match got {
                    Err(_) => return None,
                    Ok(Ok(event)) => {
                        let mut line = serde_json::to_vec(&event).unwrap_or_default();
                        line.push(b'\n');
                        return Some((
                            Ok::<_, Infallible>(Bytes::from(line)),
                            (rx, sent + 1, m, stop),
                        ));
                    }
                    Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                        m.events_slow_reader.fetch_add(n, Ordering::Relaxed);
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                }
            }
        });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The policy, conntrack and flow routes.
pub fn router(module: Arc<PolicyModule>) -> Router {
    Router::new()
        .route(
            "/v1/policy",
            get(get_policy).put(put_policy).delete(delete_policy),
        )
        .route("/v1/conntrack", get(list_conntrack).delete(flush_conntrack))
        .route("/v1/conntrack/stats", get(conntrack_stats))
        .route("/v1/flows", get(flows))
        .with_state(module)
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

struct Families {
    up: IntGaugeVec,
    generation: IntGaugeVec,
    rule_packets: IntCounterVec,
    rule_bytes: IntCounterVec,
    endpoint_verdicts: IntCounterVec,
    packets: IntCounterVec,
    drops: IntCounterVec,
    events_received: IntCounterVec,
    events_lost: IntCounterVec,
    ct_entries: IntGaugeVec,
    ct_capacity: IntGaugeVec,
    gc_sweeps: IntCounterVec,
    gc_expired: IntCounterVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

impl Families {
    fn new() -> Self {
        Self {
            up: gauge(
                "datapath_policy_up",
                "1 while the tc policy programs are loaded",
                &[],
            ),
            generation: gauge(
                "datapath_policy_generation",
                "Generation of the live policy (0: none applied yet)",
                &[],
            ),
            rule_packets: counter(
                "datapath_policy_rule_packets_total",
                "Packets decided by each rule of the live policy, totalled over applies by \
                 (endpoint, direction, rule name)",
                &["endpoint", "direction", "rule", "action"],
            ),
            rule_bytes: counter(
                "datapath_policy_rule_bytes_total",
                "Bytes decided by each rule of the live policy, totalled over applies by \
                 (endpoint, direction, rule name)",
                &["endpoint", "direction", "rule", "action"],
            ),
            endpoint_verdicts: counter(
                "datapath_policy_endpoint_verdicts_total",
                "Verdicts per endpoint and direction, totalled over applies by endpoint",
                &["endpoint", "direction", "verdict"],
            ),
            packets: counter(
                "datapath_policy_packets_total",
                "Packets seen by the tc programs, by outcome (TC_REASONS)",
                &["reason"],
            ),
            drops: counter(
                "datapath_policy_drops_total",
                "Packets dropped by the tc programs, by reason",
                &["reason"],
            ),
            events_received: counter(
                "datapath_flow_events_received_total",
                "Flow events read from the ring buffer",
                &[],
            ),
            events_lost: counter(
                "datapath_flow_events_lost_total",
                "Flow events lost: ring_full, rate_limited (programs), slow_reader (daemon)",
                &["cause"],
            ),
            ct_entries: gauge(
                "datapath_conntrack_entries",
                "Entries of the conntrack table CT_FLOWS",
                &[],
            ),
            ct_capacity: gauge(
                "datapath_conntrack_max_entries",
                "Capacity of the conntrack table CT_FLOWS",
                &[],
            ),
            gc_sweeps: counter(
                "datapath_conntrack_gc_sweeps_total",
                "Conntrack garbage-collection sweeps",
                &[],
            ),
            gc_expired: counter(
                "datapath_conntrack_gc_expired_total",
                "Conntrack entries removed by garbage collection after their idle timeout",
                &[],
            ),
        }
    }

    fn collectors(&self) -> Vec<&dyn Collector> {
        vec![
            &self.up,
            &self.generation,
            &self.rule_packets,
            &self.rule_bytes,
            &self.endpoint_verdicts,
            &self.packets,
            &self.drops,
            &self.events_received,
            &self.events_lost,
            &self.ct_entries,
            &self.ct_capacity,
            &self.gc_sweeps,
            &self.gc_expired,
        ]
    }
}

/// Reads the policy module's counters at scrape time.
pub struct PolicyCollector {
    runtime: Arc<Runtime>,
    descs: Vec<Desc>,
}

impl PolicyCollector {
    pub fn new(runtime: Arc<Runtime>) -> Self {
        let descs = Families::new()
            .collectors()
            .into_iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Self { runtime, descs }
    }

    fn fill(&self, f: &Families) {
        let Some(m) = self.runtime.policy.get() else {
            return;
        };
        let (up, _) = m.up();
        f.up.with_label_values::<&str>(&[]).set(i64::from(up));
        if !up {
            return;
        }
        let status = m.status();
        let stats = m.ct_stats();
        if let Ok(status) = status {
            f.generation
                .with_label_values::<&str>(&[])
                .set(i64::from(status.generation));
            for r in &status.rules {
                let name = r.rule.label();
                let action = format!("{:?}", r.rule.action).to_lowercase();
                let labels = [
                    r.rule.endpoint.as_str(),
                    r.rule.direction.as_str(),
                    name.as_str(),
                    action.as_str(),
                ];
                f.rule_packets.with_label_values(&labels).inc_by(r.packets);
                f.rule_bytes.with_label_values(&labels).inc_by(r.bytes);
            }
            for ep in &status.endpoints {
                for (dir, c) in [("ingress", &ep.ingress), ("egress", &ep.egress)] {
                    for (verdict, n) in [
                        ("allowed", c.allowed),
                        ("denied", c.denied),
                        ("default", c.default_hits),
                        ("tracked", c.tracked),
                        ("cut", c.cut),
                    ] {
                        f.endpoint_verdicts
                            .with_label_values(&[ep.endpoint.as_str(), dir, verdict])
                            .inc_by(n);
                    }
                }
            }
            for (name, n) in &status.reasons {
                f.packets.with_label_values(&[name.as_str()]).inc_by(*n);
                if let Some(cause) = name.strip_prefix("drop_") {
                    f.drops.with_label_values(&[cause]).inc_by(*n);
                }
            }
        }
        if let Ok(stats) = stats {
            f.events_received
                .with_label_values::<&str>(&[])
                .inc_by(stats.events_received);
            for (cause, n) in &stats.events_lost {
                f.events_lost
                    .with_label_values(&[cause.as_str()])
                    .inc_by(*n);
            }
            f.ct_entries
                .with_label_values::<&str>(&[])
                .set(stats.entries as i64);
            f.ct_capacity
                .with_label_values::<&str>(&[])
                .set(stats.capacity as i64);
            f.gc_sweeps
                .with_label_values::<&str>(&[])
                .inc_by(stats.gc_sweeps);
            f.gc_expired
                .with_label_values::<&str>(&[])
                .inc_by(stats.gc_expired);
        }
    }
}

impl Collector for PolicyCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let families = Families::new();
        self.fill(&families);
        families
            .collectors()
            .into_iter()
            .flat_map(|c| c.collect())
            .filter(|mf| !mf.get_metric().is_empty())
            .collect()
    }
}
