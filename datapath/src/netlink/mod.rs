//! The `netlink` controller: learns the node's interfaces, addresses, neighbours and routes
//! over rtnetlink and publishes them as states on the bus, with no polling. It subscribes to
//! the multicast groups first, then dumps, then applies what queued meanwhile, so that nothing
//! that changed during the dump is missed (each event carries the object's whole state, so
//! the last one for a key wins). An overrun of its receive buffer (ENOBUFS) costs a full
//! re-dump, counted.
//!
//! It also keeps every backend's next hop as a managed neighbour (NTF_EXT_MANAGED: the kernel
//! resolves it and keeps it resolved), marked with [`NEIGH_PROTOCOL`] so that it can tell its
//! own entries from the others' and remove those no longer needed, across restarts too.
//!
//! One controller serves the daemon's own network namespace (the one it runs in).
mod events;
pub mod model;
mod parse;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use datapath_api::{
    AddressView, LinkStatus, NeighbourStatus, NeighbourView, NetlinkStatus, NodeView, RouteView,
};
use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteMessage, RouteProtocol},
};
use tracing::{debug, info, warn};

use crate::{
    Error, Result,
    bus::{Bus, StateReader, StateWriter},
    config::Settings,
    controller::{self, Cancel, Controller, Health, Prepared, Requirements, RunFuture},
    features::Capability,
};
use model::{Addresses, Change, Links, Neighbours, Routes, Tables, Touched, mac_string, nud};

pub const NAME: &str = "netlink";
/// State: every interface, by ifindex.
pub const LINKS: &str = "netlink.links";
/// State: every interface address.
pub const ADDRESSES: &str = "netlink.addresses";
/// State: every neighbour entry, by (ifindex, address).
pub const NEIGHBOURS: &str = "netlink.neighbours";
/// State: every route of every table.
pub const ROUTES: &str = "netlink.routes";
/// State (written by the lb controller): the backends whose next hops must be managed
/// neighbours.
pub const NEXT_HOPS: &str = "lb.next_hops";
/// States (written by the lb and policy controllers): interface name -> ifindex of what each
/// has attached, for status.
pub const LB_ATTACHED: &str = "lb.attached";
pub const POLICY_ATTACHED: &str = "policy.attached";
/// States (written by the lb and policy controllers): links found detached by someone else
/// and attached again.
pub const LB_REATTACHMENTS: &str = "lb.reattachments";
pub const POLICY_REATTACHMENTS: &str = "policy.reattachments";

/// NDA_PROTOCOL of the neighbour entries this daemon creates (a value no routing daemon
/// uses; `ip neigh` shows it as `proto 215`).
pub const NEIGH_PROTOCOL: u8 = 215;

/// What an interface's attachments are, by name.
pub type Attached = BTreeMap<String, u32>;

#[derive(Default)]
struct Figures {
    messages: AtomicU64,
    resyncs: AtomicU64,
    parse_errors: AtomicU64,
    receive_buffer: AtomicU64,
    neighbour_errors: AtomicU64,
}

struct Inner {
    settings: Settings,
    health: Health,
    /// Whether the first dump is in and no resync is going on.
    ready: bool,
}

/// See the module documentation.
pub struct NetlinkController {
    links: StateWriter<Links>,
    addresses: StateWriter<Addresses>,
    neighbours: StateWriter<Neighbours>,
    routes: StateWriter<Routes>,
    next_hops: StateReader<BTreeSet<IpAddr>>,
    lb_attached: StateReader<Attached>,
    policy_attached: StateReader<Attached>,
    lb_reattachments: StateReader<u64>,
    policy_reattachments: StateReader<u64>,
    figures: Figures,
    inner: Mutex<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rtnl_error(what: &str) -> impl Fn(rtnetlink::Error) -> Error + '_ {
    move |e| Error::io(what.to_string(), std::io::Error::other(e.to_string()))
}

impl NetlinkController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            links: bus.state::<Links>(LINKS)?.writer()?,
            addresses: bus.state::<Addresses>(ADDRESSES)?.writer()?,
            neighbours: bus.state::<Neighbours>(NEIGHBOURS)?.writer()?,
            routes: bus.state::<Routes>(ROUTES)?.writer()?,
            next_hops: bus.state::<BTreeSet<IpAddr>>(NEXT_HOPS)?.reader(),
            lb_attached: bus.state::<Attached>(LB_ATTACHED)?.reader(),
            policy_attached: bus.state::<Attached>(POLICY_ATTACHED)?.reader(),
            lb_reattachments: bus.state::<u64>(LB_REATTACHMENTS)?.reader(),
            policy_reattachments: bus.state::<u64>(POLICY_REATTACHMENTS)?.reader(),
            figures: Figures::default(),
            inner: Mutex::new(Inner {
                settings: settings.clone(),
                health: Health::default(),
                ready: false,
            }),
        }))
    }

    fn set_ready(&self, ready: bool) {
        lock(&self.inner).ready = ready;
    }

    /// Publishes the tables a batch touched (all four after a dump).
    fn publish(&self, tables: &Tables, touched: Touched) {
        if touched.links {
            self.links.publish(tables.links.clone());
        }
        if touched.addresses {
            self.addresses.publish(tables.addresses.clone());
        }
        if touched.neighbours {
            self.neighbours.publish(tables.neighbours.clone());
        }
        if touched.routes {
            self.routes.publish(tables.routes.clone());
        }
    }

    fn count_invalid(&self, what: &str, why: &str) {
        self.figures.parse_errors.fetch_add(1, Ordering::Relaxed);
        debug!(what, why, "netlink message skipped");
    }

    fn apply(
        &self,
        tables: &mut Tables,
        change: std::result::Result<Change, parse::Skip>,
        touched: &mut Touched,
    ) {
        self.figures.messages.fetch_add(1, Ordering::Relaxed);
        match change {
            Ok(c) => tables.apply(c, touched),
            Err(parse::Skip::Ignored) => {}
            Err(parse::Skip::Invalid(why)) => self.count_invalid("dump", &why),
        }
    }

    async fn dump_routes(
        &self,
        handle: &rtnetlink::Handle,
        tables: &mut Tables,
        touched: &mut Touched,
    ) -> Result<()> {
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let mut s = handle.route().get(msg).execute();
            while let Some(m) = s.try_next().await.map_err(rtnl_error("dump routes"))? {
                self.apply(tables, parse::route(&m).map(Change::Route), touched);
            }
        }
        Ok(())
    }

    /// Every table from the kernel, from scratch.
    async fn dump(&self, handle: &rtnetlink::Handle) -> Result<Tables> {
        let mut t = Tables::default();
        let mut touched = Touched::default();
        let mut s = handle.link().get().execute();
        while let Some(m) = s.try_next().await.map_err(rtnl_error("dump links"))? {
            self.apply(&mut t, parse::link(&m).map(Change::Link), &mut touched);
        }
        let mut s = handle.address().get().execute();
        while let Some(m) = s.try_next().await.map_err(rtnl_error("dump addresses"))? {
            self.apply(
                &mut t,
                parse::address(&m).map(Change::Address),
                &mut touched,
            );
        }
        let mut s = handle.neighbours().get().execute();
        while let Some(m) = s.try_next().await.map_err(rtnl_error("dump neighbours"))? {
            self.apply(
                &mut t,
                parse::neighbour(&m).map(Change::Neighbour),
                &mut touched,
            );
        }
        self.dump_routes(handle, &mut t, &mut touched).await?;
        Ok(t)
    }

    /// Re-dumps everything and publishes it; readers see "not ready" meanwhile.
    async fn resync(&self, handle: &rtnetlink::Handle, tables: &mut Tables) -> Result<()> {
        self.set_ready(false);
        for w in [
            &self.links as &dyn Resync,
            &self.addresses,
            &self.neighbours,
            &self.routes,
        ] {
            w.start();
        }
        *tables = self.dump(handle).await?;
        self.publish(
            tables,
            Touched {
                links: true,
                addresses: true,
                neighbours: true,
                routes: true,
                routes_flushed: false,
            },
        );
        self.set_ready(true);
        Ok(())
    }

    /// Brings the daemon's managed neighbours to what the backends need: one per next hop,
    /// created (or converted) with the managed flag, and ours that no backend needs removed.
    async fn reconcile_neighbours(&self, handle: &rtnetlink::Handle, tables: &mut Tables) {
        let mut changed = false;
        let wanted: BTreeSet<(u32, IpAddr)> = self
            .next_hops
            .get()
            .iter()
            .filter_map(|addr| model::next_hop(&tables.routes, *addr))
            .collect();
        for (ifindex, addr) in &wanted {
            let current = tables.neighbours.get(&(*ifindex, *addr));
            if current.is_some_and(|n| n.managed && n.protocol == NEIGH_PROTOCOL) {
                continue;
            }
            let mut req = handle
                .neighbours()
                .add(*ifindex, *addr)
                .state(NeighbourState::None)
                .replace();
            let m = req.message_mut();
            m.attributes
                .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            m.attributes
                .push(NeighbourAttribute::Protocol(RouteProtocol::from(
                    NEIGH_PROTOCOL,
                )));
            match req.execute().await {
                Ok(()) => {
                    changed = true;
                    debug!(%addr, ifindex, "managed neighbour added");
                }
                Err(e) => {
                    self.figures
                        .neighbour_errors
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(%addr, ifindex, error = %e, "cannot add a managed neighbour");
                }
            }
        }
        let stale: Vec<(u32, IpAddr)> = tables
            .neighbours
            .values()
            .filter(|n| n.protocol == NEIGH_PROTOCOL && !wanted.contains(&(n.ifindex, n.addr)))
            .map(|n| (n.ifindex, n.addr))
            .collect();
        for (ifindex, addr) in stale {
            let mut m = NeighbourMessage::default();
            m.header.family = if addr.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            m.header.ifindex = ifindex;
            m.attributes
                .push(NeighbourAttribute::Destination(match addr {
                    IpAddr::V4(a) => NeighbourAddress::Inet(a),
                    IpAddr::V6(a) => NeighbourAddress::Inet6(a),
                }));
            match handle.neighbours().del(m).execute().await {
                Ok(()) => {
                    changed = true;
                    debug!(%addr, ifindex, "managed neighbour removed");
                }
                Err(e) => {
                    self.figures
                        .neighbour_errors
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(%addr, ifindex, error = %e, "cannot remove a managed neighbour");
                }
            }
        }
        if changed {
            // The kernel announces a new entry only once it resolves (or fails): read the
            // neighbours back so that the view holds ours at once.
            if let Err(e) = self.dump_neighbours(handle, tables).await {
                warn!(error = %e, "cannot read the neighbours back");
            }
        }
    }

    async fn dump_neighbours(&self, handle: &rtnetlink::Handle, tables: &mut Tables) -> Result<()> {
        let mut fresh = Tables::default();
        let mut touched = Touched::default();
        let mut s = handle.neighbours().get().execute();
        while let Some(m) = s.try_next().await.map_err(rtnl_error("dump neighbours"))? {
            self.apply(
                &mut fresh,
                parse::neighbour(&m).map(Change::Neighbour),
                &mut touched,
            );
        }
        if fresh.neighbours != tables.neighbours {
            tables.neighbours = fresh.neighbours;
            self.neighbours.publish(tables.neighbours.clone());
        }
        Ok(())
    }

    async fn run_loop(self: Arc<Self>, mut cancel: Cancel) -> Result<()> {
        let receive_buffer = lock(&self.inner).settings.netlink.receive_buffer_bytes;
        // Subscribed before the dump: what changes during it queues here.
        let mut events = events::EventSocket::open(receive_buffer)?;
        self.figures
            .receive_buffer
            .store(events.receive_buffer() as u64, Ordering::Relaxed);
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::io("open an rtnetlink socket", e))?;
        // The request connection runs as long as this loop does.
        let _connection = AbortOnDrop(tokio::spawn(connection));
        let mut tables = Tables::default();
        self.resync(&handle, &mut tables).await?;
        info!(
            links = tables.links.len(),
            neighbours = tables.neighbours.len(),
            routes = tables.routes.len(),
            receive_buffer = events.receive_buffer(),
            "module netlink up: node learned"
        );
        let mut next_hops = self.next_hops.clone();
        self.reconcile_neighbours(&handle, &mut tables).await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = next_hops.changed() => {
                    self.reconcile_neighbours(&handle, &mut tables).await;
                }
                batch = events.next_batch() => {
                    let batch = batch?;
                    for why in &batch.invalid {
                        self.figures.messages.fetch_add(1, Ordering::Relaxed);
                        self.count_invalid("event", why);
                    }
                    if batch.overrun {
                        self.figures.resyncs.fetch_add(1, Ordering::Relaxed);
                        warn!("netlink receive buffer overran: dumping everything again");
                        // What queued before the overrun is older than the dump: dropped.
                        events.discard_queued();
                        self.resync(&handle, &mut tables).await?;
                        self.reconcile_neighbours(&handle, &mut tables).await;
                        continue;
                    }
                    let mut touched = Touched::default();
                    for change in batch.changes {
                        self.figures.messages.fetch_add(1, Ordering::Relaxed);
                        tables.apply(change, &mut touched);
                    }
                    if touched.routes_flushed {
                        // The kernel removed the routes of a link that went down or away
                        // without a message for each: read them again.
                        tables.routes.clear();
                        self.dump_routes(&handle, &mut tables, &mut touched).await?;
                        touched.routes = true;
                    }
                    self.publish(&tables, touched);
                    if touched.routes || touched.neighbours {
                        self.reconcile_neighbours(&handle, &mut tables).await;
                    }
                }
            }
        }
    }

    /// The `netlink` part of `lb-ctl status`.
    pub fn figures(&self) -> NetlinkStatus {
        let f = &self.figures;
        NetlinkStatus {
            messages: f.messages.load(Ordering::Relaxed),
            resyncs: f.resyncs.load(Ordering::Relaxed),
            parse_errors: f.parse_errors.load(Ordering::Relaxed),
            receive_buffer_bytes: f.receive_buffer.load(Ordering::Relaxed),
            reattachments: *self.lb_reattachments.get() + *self.policy_reattachments.get(),
        }
    }

    /// Every interface, with what is attached to it.
    pub fn link_status(&self) -> Vec<LinkStatus> {
        let lb = self.lb_attached.get();
        let policy = self.policy_attached.get();
        self.links
            .current()
            .values()
            .map(|l| {
                let mut attached = Vec::new();
                if lb.get(&l.name) == Some(&l.ifindex) {
                    attached.push("xdp".to_string());
                }
                if policy.get(&l.name) == Some(&l.ifindex) {
                    attached.push("tcx-ingress".to_string());
                    attached.push("tcx-egress".to_string());
                }
                LinkStatus {
                    ifindex: l.ifindex,
                    name: l.name.clone(),
                    mac: l.mac.as_deref().map(mac_string),
                    mtu: l.mtu,
                    up: l.up,
                    master: l.master,
                    attached,
                }
            })
            .collect()
    }

    /// The backends' next-hop neighbours.
    pub fn neighbour_status(&self) -> Vec<NeighbourStatus> {
        let links = self.links.current();
        let routes = self.routes.current();
        let neighbours = self.neighbours.current();
        self.next_hops
            .get()
            .iter()
            .map(|addr| backend_neighbour(&links, &routes, &neighbours, *addr))
            .collect()
    }

    /// `GET /v1/node`.
    pub fn node_view(&self) -> NodeView {
        let links = self.links.current();
        let name = |i: u32| links.get(&i).map(|l| l.name.clone()).unwrap_or_default();
        NodeView {
            ready: lock(&self.inner).ready,
            links: self.link_status(),
            addresses: self
                .addresses
                .current()
                .iter()
                .map(|a| AddressView {
                    ifindex: a.ifindex,
                    interface: name(a.ifindex),
                    addr: a.addr,
                    prefix_len: a.prefix_len,
                })
                .collect(),
            neighbours: self
                .neighbours
                .current()
                .values()
                .map(|n| NeighbourView {
                    ifindex: n.ifindex,
                    interface: name(n.ifindex),
                    addr: n.addr,
                    mac: n.mac.as_deref().map(mac_string),
                    state: nud::name(n.state).to_string(),
                    managed: n.managed,
                })
                .collect(),
            routes: self
                .routes
                .current()
                .values()
                .map(|r| RouteView {
                    table: r.key.table,
                    dst: if r.key.dst_len == 0 {
                        "default".to_string()
                    } else {
                        format!("{}/{}", r.key.dst, r.key.dst_len)
                    },
                    family: if r.key.dst.is_ipv4() { "inet" } else { "inet6" }.to_string(),
                    kind: route_kind(r.kind),
                    gateway: r.gateway,
                    ifindex: r.oif,
                    interface: r.oif.map(name),
                    prefsrc: r.prefsrc,
                    metric: (r.key.priority != 0).then_some(r.key.priority),
                })
                .collect(),
            netlink: self.figures(),
        }
    }
}

/// The neighbour state of the entry a backend's packets need (see [`model::next_hop`]).
pub fn backend_neighbour(
    links: &Links,
    routes: &Routes,
    neighbours: &Neighbours,
    addr: IpAddr,
) -> NeighbourStatus {
    let hop = model::next_hop(routes, addr);
    let entry = hop.and_then(|(i, nh)| neighbours.get(&(i, nh)));
    let state = entry.map_or("missing", |n| nud::name(n.state)).to_string();
    NeighbourStatus {
        addr,
        interface: hop.and_then(|(i, _)| links.get(&i)).map(|l| l.name.clone()),
        unresolved: entry.is_none_or(|n| nud::unresolved(n.state)),
        state,
        mac: entry.and_then(|n| n.mac.as_deref()).map(mac_string),
        managed: entry.is_some_and(|n| n.managed),
    }
}

fn route_kind(kind: u8) -> String {
    match kind {
        1 => "unicast",
        2 => "local",
        3 => "broadcast",
        4 => "anycast",
        5 => "multicast",
        6 => "blackhole",
        7 => "unreachable",
        8 => "prohibit",
        9 => "throw",
        _ => return kind.to_string(),
    }
    .to_string()
}

/// A writer that can start a resync, whatever its value type.
trait Resync {
    fn start(&self);
}

impl<T> Resync for StateWriter<T> {
    fn start(&self) {
        self.resync();
    }
}

/// Aborts its task when dropped: a task that lives only as long as its owner.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Controller for NetlinkController {
    fn name(&self) -> &'static str {
        NAME
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            features: &[],
            // Managed neighbour entries are changed with CAP_NET_ADMIN, and SO_RCVBUFFORCE
            // needs it too.
            capabilities: &[Capability::NetAdmin],
        }
    }

    fn enabled(&self, settings: &Settings) -> bool {
        settings.netlink.enabled
    }

    fn start(&self, settings: &Settings, blocker: Option<String>) -> Result<()> {
        let mut inner = lock(&self.inner);
        let reason = if !settings.netlink.enabled {
            Some("disabled by the configuration".to_string())
        } else {
            blocker
        };
        inner.health = Health {
            enabled: settings.netlink.enabled,
            up: reason.is_none(),
            reason,
        };
        inner.settings = settings.clone();
        Ok(())
    }

    fn prepare(
        self: Arc<Self>,
        _settings: &Settings,
        _blocker: Option<String>,
    ) -> Result<Box<dyn Prepared>> {
        // Every key of the section needs a restart (`restart_only_changes`).
        Ok(Box::new(controller::NoChange))
    }

    fn run(self: Arc<Self>, cancel: Cancel) -> RunFuture {
        if !lock(&self.inner).health.up {
            return controller::idle(cancel);
        }
        Box::pin(self.run_loop(cancel))
    }

    fn health(&self) -> Health {
        lock(&self.inner).health.clone()
    }

    fn not_ready(&self) -> Option<String> {
        let inner = lock(&self.inner);
        (inner.health.up && !inner.ready).then(|| "learning the node over netlink".to_string())
    }

    fn routes(self: Arc<Self>) -> axum::Router {
        use axum::{Json, routing::get};
        let me = Arc::clone(&self);
        axum::Router::new().route(
            datapath_api::routes::NODE,
            get(move || {
                let me = Arc::clone(&me);
                async move { Json(me.node_view()) }
            }),
        )
    }

    fn collectors(self: Arc<Self>) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(metrics_collector(self))]
    }
}

mod metrics {
    use prometheus::{IntCounterVec, IntGaugeVec, core::Collector};

    use crate::metrics::{Families, counter, gauge};

    pub(super) struct NetlinkFamilies {
        pub messages: IntCounterVec,
        pub resyncs: IntCounterVec,
        pub parse_errors: IntCounterVec,
        pub neighbour_errors: IntCounterVec,
        pub receive_buffer: IntGaugeVec,
        pub unresolved: IntGaugeVec,
        pub reattachments: IntCounterVec,
    }

    impl Families for NetlinkFamilies {
        fn new() -> Self {
            Self {
                messages: counter(
                    "datapath_netlink_messages_total",
                    "Netlink messages the netlink controller read (dumps and events)",
                    &[],
                ),
                resyncs: counter(
                    "datapath_netlink_resyncs_total",
                    "Full re-dumps after the netlink receive buffer overran (ENOBUFS)",
                    &[],
                ),
                parse_errors: counter(
                    "datapath_netlink_parse_errors_total",
                    "Netlink messages that could not be parsed and were skipped",
                    &[],
                ),
                neighbour_errors: counter(
                    "datapath_netlink_neighbour_errors_total",
                    "Managed neighbour entries that could not be added or removed",
                    &[],
                ),
                receive_buffer: gauge(
                    "datapath_netlink_receive_buffer_bytes",
                    "The netlink event socket's receive buffer as the kernel reports it",
                    &[],
                ),
                unresolved: gauge(
                    "datapath_backend_neighbour_unresolved",
                    "1 when a backend's next-hop neighbour is incomplete, failed or missing",
                    &["addr"],
                ),
                reattachments: counter(
                    "datapath_reattachments_total",
                    "Program links found detached by someone else and attached again",
                    &["controller"],
                ),
            }
        }

        fn all(&self) -> Vec<&dyn Collector> {
            vec![
                &self.messages,
                &self.resyncs,
                &self.parse_errors,
                &self.neighbour_errors,
                &self.receive_buffer,
                &self.unresolved,
                &self.reattachments,
            ]
        }
    }
}

fn metrics_collector(
    ctl: Arc<NetlinkController>,
) -> crate::metrics::FamilyCollector<metrics::NetlinkFamilies> {
    crate::metrics::FamilyCollector::new(move |f: &metrics::NetlinkFamilies| {
        let fig = &ctl.figures;
        let none: &[&str] = &[];
        f.messages
            .with_label_values(none)
            .inc_by(fig.messages.load(Ordering::Relaxed));
        f.resyncs
            .with_label_values(none)
            .inc_by(fig.resyncs.load(Ordering::Relaxed));
        f.parse_errors
            .with_label_values(none)
            .inc_by(fig.parse_errors.load(Ordering::Relaxed));
        f.neighbour_errors
            .with_label_values(none)
            .inc_by(fig.neighbour_errors.load(Ordering::Relaxed));
        f.receive_buffer
            .with_label_values(none)
            .set(fig.receive_buffer.load(Ordering::Relaxed) as i64);
        f.reattachments
            .with_label_values(&["lb"])
            .inc_by(*ctl.lb_reattachments.get());
        f.reattachments
            .with_label_values(&["policy"])
            .inc_by(*ctl.policy_reattachments.get());
        for n in ctl.neighbour_status() {
            f.unresolved
                .with_label_values(&[n.addr.to_string().as_str()])
                .set(i64::from(n.unresolved));
        }
    })
}
