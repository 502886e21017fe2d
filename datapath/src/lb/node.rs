//! The load balancer's side of the node, driven by the netlink controller's states:
//! - XDP follows the interfaces that match `lb.interfaces` as they appear, go, or come back
//!   under the same name with a new ifindex;
//! - a watchdog attaches again a link that someone else detached (no event announces that);
//! - every neighbour or route change that can change a cached forwarding decision bumps the
//!   FIB generation, so the next packet of every flow looks its next hop up again;
//! - the backends' addresses go to the netlink controller, which keeps their next hops as
//!   managed neighbours.
//!
//! Without the netlink controller (`netlink.enabled: false`) the interfaces are fixed at start
//! and reloads, and the old neighbour priming on `pass_fib_no_neigh` stands in.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use datapath_api::DesiredState;
use tracing::{info, warn};

use super::{LbController, lock};
use crate::{
    Result,
    controller::Cancel,
    lb::dataplane::{Dataplane, interface_index},
    netlink::model::{neighbours_changed_forwarding, routes_changed_forwarding},
    text::glob_match,
};

/// The backends' addresses of `state`: what the netlink controller keeps neighbours for.
pub(super) fn next_hops(state: &DesiredState) -> BTreeSet<IpAddr> {
    state
        .services
        .values()
        .flat_map(|s| s.backends.iter().map(|b| b.addr))
        .collect()
}

/// Every service of `state` with its owner and backends (see [`super::SERVICE_CATALOG`]).
pub(super) fn service_catalog(state: &DesiredState) -> super::ServiceCatalog {
    state
        .services
        .values()
        .map(|s| super::CatalogEntry {
            key: s.key,
            source: s.source,
            owner: s.owner.clone(),
            backends: s
                .backends
                .iter()
                .map(|b| std::net::SocketAddr::new(b.addr, b.port))
                .collect(),
        })
        .collect()
}

/// Every (service, backend) of `state` (see [`super::SERVICE_BACKENDS`]).
pub(super) fn service_backends(state: &DesiredState) -> super::ServiceBackends {
    state
        .services
        .values()
        .flat_map(|s| {
            s.backends
                .iter()
                .map(|b| (s.key, std::net::SocketAddr::new(b.addr, b.port)))
        })
        .collect()
}

/// Name -> ifindex of what `dp` has attached, as the kernel numbers those names now.
pub(super) fn attached_indexes(dp: &Dataplane) -> BTreeMap<String, u32> {
    dp.interfaces()
        .into_iter()
        .filter_map(|(name, _)| interface_index(&name).ok().map(|i| (name, i)))
        .collect()
}

impl LbController {
    /// Attaches to the matching interfaces that appeared, detaches (and unpins) those gone
    /// or re-created.
    pub(super) async fn sync_interfaces(&self) {
        if !self.links.is_ready() || self.reloading.load(Ordering::SeqCst) {
            return;
        }
        // The controller lock first, then the settings: a reload's commit holds the lock
        // while it installs new settings, so they are read as committed.
        let mut guard = self.ctl.lock().await;
        let settings = lock(&self.inner).settings.clone();
        let links = self.links.get();
        let wanted: BTreeMap<String, u32> = links
            .values()
            .filter(|l| {
                settings
                    .lb
                    .interfaces
                    .iter()
                    .any(|p| glob_match(p, &l.name))
            })
            .map(|l| (l.name.clone(), l.ifindex))
            .collect();
        let names: Vec<String> = links.values().map(|l| l.name.clone()).collect();
        // Readiness waits for the interfaces named; a glob (pod veths) may match nothing yet.
        let missing: Vec<&str> = crate::config::unmatched(&settings.lb.interfaces, &names)
            .into_iter()
            .filter(|p| !crate::config::is_glob(p))
            .collect();
        let (_, plane) = guard.parts_mut();
        let Some(dp) = plane.dataplane_mut() else {
            return;
        };
        lock(&self.inner).waiting = (!missing.is_empty() && settings.lb.enabled)
            .then(|| format!("waiting for interfaces {}", missing.join(", ")));
        let mut have = lock(&self.ifindexes);
        for (name, _) in dp.interfaces() {
            let keep = wanted
                .get(&name)
                .is_some_and(|i| have.get(&name) == Some(i));
            if keep {
                continue;
            }
            match dp.detach_interface(&name) {
                Ok(()) => info!(interface = %name, "XDP detached: the interface is gone or new"),
                Err(e) => warn!(interface = %name, error = %e, "cannot detach"),
            }
            have.remove(&name);
        }
        for (name, index) in &wanted {
            if have.contains_key(name) {
                continue;
            }
            match dp.attach_interface(name) {
                Ok(()) => {
                    info!(interface = %name, ifindex = index, "XDP attached");
                    have.insert(name.clone(), *index);
                }
                Err(e) => warn!(interface = %name, error = %e, "cannot attach XDP"),
            }
        }
        self.attached.publish(have.clone());
    }

    /// Attaches again every link whose kernel info shows it detached.
    async fn repair_links(&self) {
        let mut guard = self.ctl.lock().await;
        let Some(dp) = guard.parts_mut().1.dataplane_mut() else {
            return;
        };
        let have = lock(&self.ifindexes).clone();
        let mut repaired = 0u64;
        for (name, pin) in dp.link_pins() {
            let Some(index) = have.get(&name) else {
                continue;
            };
            if crate::bpf::links::attached_ifindex(&pin).ok() == Some(*index) {
                continue;
            }
            let _ = dp.detach_interface(&name);
            match dp.attach_interface(&name) {
                Ok(()) => {
                    repaired += 1;
                    warn!(interface = %name, "the XDP link was detached by someone else: attached again");
                }
                Err(e) => {
                    lock(&self.ifindexes).remove(&name);
                    warn!(interface = %name, error = %e, "cannot attach XDP again");
                }
            }
        }
        if repaired > 0 {
            self.reattachments.modify(|n| *n += repaired);
            self.attached.publish(lock(&self.ifindexes).clone());
        }
    }

    async fn bump_fib_generation(&self, why: &str) {
        let mut guard = self.ctl.lock().await;
        let Some(dp) = guard.parts_mut().1.dataplane_mut() else {
            return;
        };
        match dp.bump_fib_generation() {
            Ok(generation) => {
                self.fib_generation
                    .store(u64::from(generation), Ordering::Relaxed);
                tracing::debug!(generation, why, "FIB generation bumped");
            }
            Err(e) => warn!(error = %e, "cannot bump the FIB generation"),
        }
    }
}

/// The run loop with the netlink controller (see the module documentation).
pub(super) async fn follow_node(lb: Arc<LbController>, mut cancel: Cancel) -> Result<()> {
    let watchdog = lock(&lb.inner).settings.lb.attach_watchdog;
    // A zero watchdog: a timer that never fires in practice.
    let period = if watchdog.is_zero() {
        Duration::from_secs(86_400 * 365)
    } else {
        watchdog
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut links = lb.links.clone();
    let mut neighbours = lb.neighbours.clone();
    let mut routes = lb.routes.clone();
    let mut seen_neighbours = lb.neighbours.get();
    let mut seen_routes = lb.routes.get();
    lb.sync_interfaces().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = links.changed() => lb.sync_interfaces().await,
            _ = lb.resync.notified() => lb.sync_interfaces().await,
            _ = neighbours.changed() => {
                let now = lb.neighbours.get();
                if neighbours_changed_forwarding(&seen_neighbours, &now) {
                    lb.bump_fib_generation("neighbour").await;
                }
                seen_neighbours = now;
            }
            _ = routes.changed() => {
                let now = lb.routes.get();
                if routes_changed_forwarding(&seen_routes, &now) {
                    lb.bump_fib_generation("route").await;
                }
                seen_routes = now;
            }
            _ = ticker.tick(), if !watchdog.is_zero() => lb.repair_links().await,
        }
    }
}
