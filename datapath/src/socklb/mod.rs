//! The `socklb` controller: socket-level load balancing for east-west traffic. It owns the
//! cgroup sock_addr programs of `bpf-sock` (pins under `pin_root/socklb/`), which translate a
//! VIP to a backend at `connect()`/`sendmsg()`, over the load balancer's own service maps, lent
//! by the `lb` controller as a typed handle ([`LbServiceMaps`]): one service store, two
//! datapaths, so `lb-ctl` and every service source drive both.
//!
//! - The programs attach to `socklb.cgroup` (default: the cgroup2 mount's root) through
//!   pinned links, which a restart adopts (the hooks never run without a program).
//! - Each decision (socket cookie, pid, cgroup, VIP, backend) is published on the bus topic
//!   [`DECISIONS`]; the latest are kept for `GET /v1/socklb`.
//! - When a backend leaves a service (the lb's [`SERVICE_BACKENDS`] state), the TCP and
//!   connected UDP sockets the programs sent to it are destroyed (`destroy`), so clients
//!   reconnect to a live one; at start, those of backends removed while the daemon was down.
//! - The section needs a restart to change (config refuses a reload that changes it).
mod destroy;
mod plane;

use std::{
    collections::{BTreeSet, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use datapath_api::{
    Protocol, RECENT_SOCKLB_DECISIONS, SockLbDecision, SockLbHook, SockLbServiceCount, SockLbStatus,
};
use tracing::warn;

use crate::{
    Result,
    bus::{Bus, StateReader, Topic},
    config::{Settings, SockLbSettings},
    controller::{Cancel, Controller, Health, NoChange, Prepared, Requirements, RunFuture},
    features::Capability,
    lb::{LbServiceMaps, SERVICE_BACKENDS, SERVICE_MAPS, ServiceBackends},
};
pub use plane::{SockLbPlane, cgroup_id, cgroup2_root};

/// The controller's name: status, logs, pin directory.
pub const NAME: &str = "socklb";
/// Event topic: every socket-LB decision.
pub const DECISIONS: &str = "socklb.decisions";
/// The longest a decision waits in the ring buffer before it is read (below the programs'
/// wake-up watermark).
const EVENT_TICK: std::time::Duration = std::time::Duration::from_millis(100);
/// Decisions a slow subscriber may fall behind by before it loses some.
pub const DECISION_BUFFER: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    settings: SockLbSettings,
    pin_root: std::path::PathBuf,
    plane: Option<SockLbPlane>,
    health: Health,
    /// Why it must stay off whatever the load balancer does (disabled, a missing capability).
    blocked: Option<String>,
    /// The version of the load balancer's handle the programs were last loaded over (`None`:
    /// not yet).
    lent: Option<u64>,
}

/// See the module documentation.
pub struct SockLbController {
    inner: Mutex<Inner>,
    maps: StateReader<Option<Arc<LbServiceMaps>>>,
    decisions: Arc<Topic<Arc<SockLbDecision>>>,
    recent: Mutex<VecDeque<SockLbDecision>>,
    members: StateReader<ServiceBackends>,
    destroyed: AtomicU64,
    destroy_errors: AtomicU64,
}

fn socket(addr: [u32; 4], family: u8, port_be: u16) -> SocketAddr {
    SocketAddr::new(
        bpf_common::ip_from_addr16(&addr, family),
        u16::from_be(port_be),
    )
}

impl SockLbController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                settings: settings.socklb.clone(),
                pin_root: settings.pin_root.clone(),
                plane: None,
                health: Health::default(),
                blocked: None,
                lent: None,
            }),
            maps: bus.state(SERVICE_MAPS)?.reader(),
            decisions: bus.topic(DECISIONS, DECISION_BUFFER)?,
            recent: Mutex::new(VecDeque::new()),
            members: bus.state(SERVICE_BACKENDS)?.reader(),
            destroyed: AtomicU64::new(0),
            destroy_errors: AtomicU64::new(0),
        }))
    }

    fn decision(&self, e: bpf_common::sock::SockLbEvent) -> Arc<SockLbDecision> {
        let d = SockLbDecision {
            cookie: e.cookie,
            pid: e.pid,
            cgroup_id: e.cgroup_id,
            hook: if e.hook == bpf_common::sock::HOOK_SENDMSG {
                SockLbHook::Sendmsg
            } else {
                SockLbHook::Connect
            },
            proto: if e.proto == bpf_common::PROTO_UDP {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
            vip: socket(e.vip, e.family, e.vip_port_be),
            backend: socket(e.backend, e.family, e.backend_port_be),
            outcome: if e.outcome == bpf_common::sock::OUTCOME_NO_BACKEND {
                datapath_api::SockLbOutcome::NoBackend
            } else {
                datapath_api::SockLbOutcome::Translated
            },
        };
        let mut recent = lock(&self.recent);
        if recent.len() >= RECENT_SOCKLB_DECISIONS {
            recent.pop_front();
        }
        recent.push_back(d.clone());
        Arc::new(d)
    }

    /// `GET /v1/socklb`.
    pub fn status(&self) -> SockLbStatus {
        let inner = lock(&self.inner);
        let mut st = SockLbStatus {
            enabled: inner.settings.enabled,
            up: inner.health.up,
            reason: inner.health.reason.clone(),
            host_netns_only: inner.settings.host_netns_only,
            opt_out_cgroups: inner
                .settings
                .opt_out_cgroups
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            recent: lock(&self.recent).iter().cloned().collect(),
            sockets_destroyed: self.destroyed.load(Ordering::Relaxed),
            ..Default::default()
        };
        if let Some(plane) = &inner.plane {
            st.cgroup = Some(plane.cgroup.display().to_string());
            st.programs = plane.programs();
            match plane.reasons() {
                Ok(r) => st.reasons = r,
                Err(e) => warn!(error = %e, "socklb: cannot read its counters"),
            }
            match plane.service_counts() {
                Ok(s) => {
                    st.services = s
                        .into_iter()
                        .map(|(service, sockets)| SockLbServiceCount { service, sockets })
                        .collect()
                }
                Err(e) => warn!(error = %e, "socklb: cannot read its service counters"),
            }
        }
        st
    }
}

impl SockLbController {
    /// Loads the programs over the service maps the load balancer lends (again, when it lent
    /// new ones: the pinned links are adopted, so the hooks never run without a program), or
    /// detaches them when it lends none (the load balancer is off: no services to serve).
    fn load_over(&self) {
        let (lent, version) = self.maps.get_versioned();
        let mut inner = lock(&self.inner);
        inner.lent = Some(version);
        let maps = lent.as_ref().as_ref();
        let reason = if let Some(b) = &inner.blocked {
            Some(b.clone())
        } else {
            match maps {
                None => {
                    if let Some(old) = inner.plane.take() {
                        let pin_root = inner.pin_root.clone();
                        if let Err(e) = old.detach(&pin_root) {
                            warn!(error = %e, "socklb: cannot detach");
                        }
                    }
                    Some("the load balancer (module lb) is off: no services to serve".into())
                }
                Some(maps) => match SockLbPlane::start(&inner.settings, &inner.pin_root, maps) {
                    Ok(plane) => {
                        tracing::info!(
                            adopted = plane.adopted(),
                            "module socklb up: socket LB programs attached"
                        );
                        inner.plane = Some(plane);
                        None
                    }
                    Err(e) => {
                        warn!(error = %e, "module socklb off: cannot attach");
                        Some(format!("cannot attach: {e}"))
                    }
                },
            }
        };
        inner.health = Health {
            enabled: inner.settings.enabled,
            up: reason.is_none(),
            reason,
        };
    }

    /// Destroys the sockets sent to a pair `doomed` picks (see `destroy`), counting them.
    fn destroy(
        &self,
        peers: Option<&BTreeSet<SocketAddr>>,
        doomed: impl Fn(&(datapath_api::ServiceKey, SocketAddr)) -> bool + Sync,
    ) {
        let inner = lock(&self.inner);
        let Some(plane) = &inner.plane else { return };
        let sweep = || destroy::destroy_where(&plane.revnat, &plane.udp_connected, peers, &doomed);
        // The daemon's namespace, then those of the processes in the cgroup (pods).
        let mut result = sweep();
        for ns in destroy::member_namespaces(&plane.cgroup) {
            let theirs = destroy::in_namespace(&ns, sweep);
            result = match (result, theirs) {
                (Ok(a), Ok(b)) => Ok(a + b),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        match result {
            Ok(n) => {
                self.destroyed.fetch_add(n, Ordering::Relaxed);
                if n > 0 {
                    tracing::info!(
                        sockets = n,
                        "socklb: destroyed the sockets of removed backends"
                    );
                }
            }
            Err(e) => {
                self.destroy_errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "socklb: cannot destroy the sockets of removed backends");
            }
        }
    }

    /// Follows the services' backends until `cancel`: each backend that leaves a service has
    /// its sockets destroyed.
    async fn follow_backends(self: Arc<Self>, mut cancel: Cancel) -> Result<()> {
        let mut members = self.members.clone();
        let mut known = members.get();
        // Backends removed while the daemon was down.
        {
            let me = Arc::clone(&self);
            let now = Arc::clone(&known);
            let _ =
                tokio::task::spawn_blocking(move || me.destroy(None, |p| !now.contains(p))).await;
        }
        loop {
            tokio::select! {
                _ = members.changed() => {}
                _ = cancel.cancelled() => return Ok(()),
            }
            let now = members.get();
            let removed: BTreeSet<_> = known.difference(&now).cloned().collect();
            known = now;
            if removed.is_empty() {
                continue;
            }
            let me = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || {
                let peers: BTreeSet<SocketAddr> = removed.iter().map(|(_, b)| *b).collect();
                me.destroy(Some(&peers), |p| removed.contains(p))
            })
            .await;
        }
    }
}

impl SockLbController {
    /// The decisions onto the bus and the removed backends' sockets destroyed, until `cancel`.
    async fn serve(self: Arc<Self>, cancel: Cancel) -> Result<()> {
        let follow = Arc::clone(&self).follow_backends(cancel.clone());
        let ring = lock(&self.inner)
            .plane
            .as_mut()
            .and_then(|p| p.events.take());
        let me = Arc::clone(&self);
        let topic = Arc::clone(&self.decisions);
        let drain = async move {
            match ring {
                // The programs wake the reader only past a watermark (a wake-up per connect()
                // would cost more than the translation): the rest is read on this tick.
                Some(ring) => {
                    crate::bpf::ringbuf::drain(
                        ring,
                        topic,
                        1024,
                        Some(EVENT_TICK),
                        cancel,
                        move |e| me.decision(e),
                    )
                    .await
                }
                // Taken by an earlier run of this loop: decisions are read again after the
                // next load.
                None => {
                    let mut cancel = cancel;
                    cancel.cancelled().await;
                    Ok(())
                }
            }
        };
        let (a, b) = tokio::join!(follow, drain);
        a.and(b)
    }
}

impl Controller for SockLbController {
    fn name(&self) -> &'static str {
        NAME
    }

    fn after(&self) -> &'static [&'static str] {
        &[crate::lb::NAME]
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            features: &[],
            // Attaching cgroup programs and creating the sk_storage map.
            capabilities: &[Capability::Bpf, Capability::NetAdmin],
        }
    }

    fn enabled(&self, settings: &Settings) -> bool {
        settings.socklb.enabled
    }

    fn start(&self, settings: &Settings, blocker: Option<String>) -> Result<()> {
        {
            let mut inner = lock(&self.inner);
            inner.settings = settings.socklb.clone();
            inner.pin_root = settings.pin_root.clone();
            inner.blocked = if !settings.socklb.enabled {
                Some("disabled by the configuration (socklb.enabled)".to_string())
            } else {
                blocker
            };
        }
        self.load_over();
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
            let mut maps = self.maps.clone();
            loop {
                let loaded = lock(&self.inner).lent;
                let current = maps.version();
                if loaded == Some(current) {
                    // Wait until the load balancer lends other maps (or none), serving
                    // meanwhile.
                    let relent = async {
                        while maps.version() == current {
                            maps.changed().await;
                        }
                    };
                    if lock(&self.inner).plane.is_some() {
                        let serve = Arc::clone(&self).serve(cancel.clone());
                        tokio::select! {
                            done = serve => return done,
                            _ = relent => {}
                        }
                    } else {
                        tokio::select! {
                            _ = relent => {}
                            _ = cancel.cancelled() => return Ok(()),
                        }
                    }
                    if cancel.is_cancelled() {
                        return Ok(());
                    }
                    continue;
                }
                let me = Arc::clone(&self);
                let _ = tokio::task::spawn_blocking(move || me.load_over()).await;
            }
        })
    }

    fn health(&self) -> Health {
        lock(&self.inner).health.clone()
    }

    fn collectors(self: Arc<Self>) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(metrics_collector(self))]
    }

    fn routes(self: Arc<Self>) -> axum::Router {
        let me = Arc::clone(&self);
        axum::Router::new().route(
            datapath_api::routes::SOCKLB,
            crate::server::get_blocking(move || me.status()),
        )
    }
}

mod metrics {
    use prometheus::{IntCounterVec, core::Collector};

    use crate::metrics::{Families, counter};

    pub(super) struct SockLbFamilies {
        pub outcomes: IntCounterVec,
        pub destroyed: IntCounterVec,
        pub destroy_errors: IntCounterVec,
    }

    impl Families for SockLbFamilies {
        fn new() -> Self {
            Self {
                outcomes: counter(
                    "datapath_socklb_outcomes_total",
                    "Calls of the socket-LB programs by outcome (translated, passed and why, \
                     refused), and decision events not sent",
                    &["outcome"],
                ),
                destroyed: counter(
                    "datapath_socklb_sockets_destroyed_total",
                    "Sockets destroyed because the backend they were sent to was removed",
                    &[],
                ),
                destroy_errors: counter(
                    "datapath_socklb_destroy_errors_total",
                    "Sweeps for the sockets of removed backends that failed",
                    &[],
                ),
            }
        }

        fn all(&self) -> Vec<&dyn Collector> {
            vec![&self.outcomes, &self.destroyed, &self.destroy_errors]
        }
    }
}

fn metrics_collector(
    ctl: Arc<SockLbController>,
) -> crate::metrics::FamilyCollector<metrics::SockLbFamilies> {
    crate::metrics::FamilyCollector::new(move |f: &metrics::SockLbFamilies| {
        let inner = lock(&ctl.inner);
        let Some(plane) = &inner.plane else { return };
        // One per-CPU read per reason: a small array, never a walk of a large map.
        if let Ok(reasons) = plane.reasons() {
            for (outcome, n) in reasons {
                f.outcomes.with_label_values(&[outcome.as_str()]).inc_by(n);
            }
        }
        let none: &[&str] = &[];
        f.destroyed
            .with_label_values(none)
            .inc_by(ctl.destroyed.load(Ordering::Relaxed));
        f.destroy_errors
            .with_label_values(none)
            .inc_by(ctl.destroy_errors.load(Ordering::Relaxed));
    })
}
