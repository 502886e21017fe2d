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
//! - The section needs a restart to change (config refuses a reload that changes it).
mod plane;

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
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
    lb::{LbServiceMaps, SERVICE_MAPS},
};
pub use plane::{SockLbPlane, cgroup_id, cgroup2_root};

/// The controller's name: status, logs, pin directory.
pub const NAME: &str = "socklb";
/// Event topic: every socket-LB decision.
pub const DECISIONS: &str = "socklb.decisions";
/// Decisions a slow subscriber may fall behind by before it loses some.
const DECISION_BUFFER: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    settings: SockLbSettings,
    pin_root: std::path::PathBuf,
    plane: Option<SockLbPlane>,
    health: Health,
}

/// See the module documentation.
pub struct SockLbController {
    inner: Mutex<Inner>,
    maps: StateReader<Option<Arc<LbServiceMaps>>>,
    decisions: Arc<Topic<Arc<SockLbDecision>>>,
    recent: Mutex<VecDeque<SockLbDecision>>,
}

fn socket(addr: [u32; 4], port_be: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes())),
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
            }),
            maps: bus.state(SERVICE_MAPS)?.reader(),
            decisions: bus.topic(DECISIONS, DECISION_BUFFER)?,
            recent: Mutex::new(VecDeque::new()),
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
            vip: socket(e.vip, e.vip_port_be),
            backend: socket(e.backend, e.backend_port_be),
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
        let mut inner = lock(&self.inner);
        inner.settings = settings.socklb.clone();
        inner.pin_root = settings.pin_root.clone();
        let reason = if !settings.socklb.enabled {
            Some("disabled by the configuration (socklb.enabled)".to_string())
        } else if let Some(b) = blocker {
            Some(b)
        } else {
            match &*self.maps.get() {
                None => Some("the load balancer (module lb) is off: no services to serve".into()),
                Some(maps) => {
                    match SockLbPlane::start(&settings.socklb, &settings.pin_root, maps) {
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
                    }
                }
            }
        };
        inner.health = Health {
            enabled: settings.socklb.enabled,
            up: reason.is_none(),
            reason,
        };
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
            let ring = lock(&self.inner)
                .plane
                .as_mut()
                .and_then(|p| p.events.take());
            let Some(ring) = ring else {
                cancel.cancelled().await;
                return Ok(());
            };
            let me = Arc::clone(&self);
            let topic = Arc::clone(&self.decisions);
            crate::bpf::ringbuf::drain(ring, topic, 1024, cancel, move |e| me.decision(e)).await
        })
    }

    fn health(&self) -> Health {
        lock(&self.inner).health.clone()
    }

    fn routes(self: Arc<Self>) -> axum::Router {
        use axum::{Json, routing::get};
        let me = Arc::clone(&self);
        axum::Router::new().route(
            datapath_api::routes::SOCKLB,
            get(move || {
                let me = Arc::clone(&me);
                async move {
                    Json(
                        tokio::task::spawn_blocking(move || me.status())
                            .await
                            .unwrap_or_default(),
                    )
                }
            }),
        )
    }
}
