//! The `graph` controller: the live service dependency graph. A pure consumer of the bus, with
//! no BPF of its own: it takes the flow events ([`crate::ct::FLOW_EVENTS`]) and names each
//! end from what the other modules publish, degrading to addresses where one is off:
//!
//! - services from the service store ([`crate::lb::SERVICE_CATALOG`]): a VIP, or a backend
//!   (then the edge's port is the service's), is that service;
//! - names from the `dns` module ([`crate::dns::NAMES`]): the name the caller asked;
//! - processes from the `exec` module ([`crate::exec::OWNERS`]): the program that connected.
//!
//! A flow enters the graph when it ends, or [`SETTLE`] after it opened (the exec module learns
//! a connection's owner when its handshake completes), whichever comes first, and counts once.
//! Served as `GET /v1/graph` (JSON; DOT through `GraphView::to_dot`), Prometheus series of the
//! busiest edges, and a web view on an optional loopback listener (`graph.web.listen`).
pub mod model;
pub mod resolve;

use std::{
    collections::{BTreeSet, VecDeque},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use datapath_api::{DEFAULT_GRAPH_WINDOW, GRAPH_WINDOWS, GraphQuery, GraphStatus, GraphView};
use tracing::{info, warn};

use crate::{
    Error, Result,
    bus::{Bus, Subscriber, Topic},
    config::{GraphSettings, Settings},
    controller::{Cancel, Controller, Health, NoChange, Prepared, RunFuture},
    ct::{FLOW_EVENTS, FlowEventView, gc::monotonic_now_ns},
};
use model::{FastMap, FlowRecord, Graph, ViewFilter};
use resolve::{Directory, Resolver};

pub const NAME: &str = "graph";
/// How long after a flow opened it is counted if it has not ended.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How often settled flows are counted and old buckets folded.
const TICK: Duration = Duration::from_millis(500);
/// Open flows remembered (to count each once); past that a flow is counted when it ends.
pub const MAX_OPEN_FLOWS: usize = 65_536;
/// Events taken from the bus per wake-up.
const BATCH: usize = 1024;
/// The web view's page.
const PAGE: &str = include_str!("web/index.html");

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A flow's tuple, as its events spell it.
type FlowKey = (u8, IpAddr, u16, IpAddr, u16);

/// The event's tuple, parsed once (`None`: not TCP or UDP, or an address that does not parse:
/// nothing to draw).
fn flow_key(e: &FlowEventView) -> Option<FlowKey> {
    let proto = match e.protocol.as_str() {
        "tcp" => 6,
        "udp" => 17,
        _ => return None,
    };
    Some((
        proto,
        e.src.parse().ok()?,
        e.src_port,
        e.dst.parse().ok()?,
        e.dst_port,
    ))
}

/// A flow waiting to be counted, or counted and waiting for its end.
struct OpenFlow {
    /// When its first event came (graph clock, milliseconds).
    first_ms: u64,
    /// Its opening, or its end when that came first (let go once counted).
    first: Option<Arc<FlowEventView>>,
    /// Its end, when it came before the flow was counted.
    end: Option<Arc<FlowEventView>>,
    /// The edge it was counted on: its end's bytes go to the same edge.
    counted: Option<FlowRecord>,
}

/// Flows between their first event and their end, and flows that ended lately (a TCP flow's
/// `closed` is followed by the GC's `expired` of its closing entry: one end is counted).
#[derive(Default)]
struct OpenFlows {
    by_key: FastMap<FlowKey, OpenFlow>,
    /// (first_ms, key) in arrival order, for settling.
    order: VecDeque<(u64, FlowKey)>,
    ended: FastMap<FlowKey, u64>,
    ended_order: VecDeque<(u64, FlowKey)>,
}

/// How long an ended flow's tuple is remembered (past the longest closing timeout, so the
/// GC's late `expired` is recognised), and how many at most.
const ENDED_KEEP_MS: u64 = 10 * 60 * 1000;
const MAX_ENDED: usize = 65_536;

impl OpenFlows {
    fn mark_ended(&mut self, key: FlowKey, now_ms: u64) {
        if self.ended.insert(key, now_ms).is_none() {
            self.ended_order.push_back((now_ms, key));
        }
        while self.ended_order.len() > MAX_ENDED
            || self
                .ended_order
                .front()
                .is_some_and(|(t, _)| t + ENDED_KEEP_MS <= now_ms)
        {
            let Some((t, k)) = self.ended_order.pop_front() else {
                break;
            };
            if self.ended.get(&k) == Some(&t) {
                self.ended.remove(&k);
            }
        }
    }
}

/// The graph's clock in milliseconds (monotonic).
pub fn now_ms() -> u64 {
    monotonic_now_ns() / 1_000_000
}

/// The graph's clock: monotonic seconds.
fn now_s() -> u64 {
    monotonic_now_ns() / 1_000_000_000
}

/// Unix milliseconds of the graph's second `s`.
fn unix_ms_of(s: u64) -> u64 {
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let now_mono_ms = monotonic_now_ns() / 1_000_000;
    now_unix.saturating_sub(now_mono_ms.saturating_sub(s * 1000))
}

/// See the module documentation.
pub struct GraphController {
    settings: Mutex<GraphSettings>,
    health: Mutex<Health>,
    graph: Mutex<Graph>,
    open: Mutex<OpenFlows>,
    resolver: Resolver,
    events: Arc<Topic<Arc<FlowEventView>>>,
    /// The socket LB's decisions: its refusals for want of a backend are failed connections.
    decisions: Arc<Topic<Arc<datapath_api::SockLbDecision>>>,
    /// Refusals waiting for [`SETTLE`].
    refused: Mutex<VecDeque<(u64, Arc<datapath_api::SockLbDecision>)>>,
    /// The web view's listener, bound at start (so a busy port is a clear error there).
    web: Mutex<Option<std::net::TcpListener>>,
    pub events_taken: AtomicU64,
    pub events_lost: AtomicU64,
}

impl GraphController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            settings: Mutex::new(settings.graph.clone()),
            health: Mutex::new(Health::default()),
            graph: Mutex::new(Graph::new(settings.graph.max_edges)),
            open: Mutex::new(OpenFlows::default()),
            resolver: Resolver {
                catalog: bus
                    .state::<crate::lb::ServiceCatalog>(crate::lb::SERVICE_CATALOG)?
                    .reader(),
                names: bus
                    .state::<crate::dns::NameHandle>(crate::dns::NAMES)?
                    .reader(),
                owners: bus
                    .state::<crate::exec::OwnerHandle>(crate::exec::OWNERS)?
                    .reader(),
                directory: Mutex::new(None),
            },
            events: bus.topic::<Arc<FlowEventView>>(FLOW_EVENTS, crate::ct::EVENT_BUFFER)?,
            decisions: bus.topic::<Arc<datapath_api::SockLbDecision>>(
                crate::socklb::DECISIONS,
                crate::socklb::DECISION_BUFFER,
            )?,
            refused: Mutex::new(VecDeque::new()),
            web: Mutex::new(None),
            events_taken: AtomicU64::new(0),
            events_lost: AtomicU64::new(0),
        }))
    }

    fn settings(&self) -> GraphSettings {
        lock(&self.settings).clone()
    }

    /// Takes one flow event at `now_ms` (the graph's clock, [`now_ms`]). A flow is counted
    /// [`SETTLE`] after its first event, with its end's figures if it ended by then; an end
    /// that comes later adds its bytes to the edge the flow was counted on.
    pub fn take(&self, e: &Arc<FlowEventView>, now_ms: u64) {
        self.events_taken.fetch_add(1, Ordering::Relaxed);
        let Some(key) = flow_key(e) else {
            return;
        };
        let mut open = lock(&self.open);
        match e.kind.as_str() {
            "opened" | "logged" => {
                // The tuple used again: a new connection.
                open.ended.remove(&key);
                // Past the cap the flow is counted when it ends instead.
                if open.by_key.len() < MAX_OPEN_FLOWS && !open.by_key.contains_key(&key) {
                    open.order.push_back((now_ms, key));
                    open.by_key.insert(
                        key,
                        OpenFlow {
                            first_ms: now_ms,
                            first: Some(Arc::clone(e)),
                            end: None,
                            counted: None,
                        },
                    );
                }
            }
            "closed" | "expired" | "denied" | "cut" => {
                if open.ended.contains_key(&key) {
                    // A second end of an ended flow (expired after closed).
                    return;
                }
                if let Some(f) = open.by_key.get_mut(&key) {
                    let Some(edge) = f.counted.take() else {
                        // Counted at its settling, with these figures.
                        f.end = Some(Arc::clone(e));
                        return;
                    };
                    open.by_key.remove(&key);
                    open.mark_ended(key, now_ms);
                    drop(open);
                    let r = FlowRecord {
                        connections: 0,
                        bytes_sent: e.bytes_orig,
                        bytes_received: e.bytes_reply,
                        rtt_us: (e.rtt_ns > 0).then_some(e.rtt_ns / 1000),
                        failure: resolve::failure_of(e),
                        exe: None,
                        now_s: now_ms / 1000,
                        ..edge
                    };
                    lock(&self.graph).record(&r);
                } else if open.by_key.len() < MAX_OPEN_FLOWS {
                    // An end never seen opening (a denied SYN, a flow older than the
                    // daemon): counted after SETTLE too, when names and owners are known.
                    open.order.push_back((now_ms, key));
                    open.by_key.insert(
                        key,
                        OpenFlow {
                            first_ms: now_ms,
                            first: None,
                            end: Some(Arc::clone(e)),
                            counted: None,
                        },
                    );
                } else {
                    open.mark_ended(key, now_ms);
                    drop(open);
                    let dir = self.directory();
                    if let Some(r) = self.resolver.resolve(&dir, e, now_ms / 1000) {
                        lock(&self.graph).record(&r);
                    }
                }
            }
            _ => {}
        }
    }

    /// Takes one socket-LB decision: a refusal for want of a backend is a failed connection,
    /// counted [`SETTLE`] later (when the exec module knows the process).
    pub fn take_decision(&self, d: &Arc<datapath_api::SockLbDecision>, now_ms: u64) {
        if d.outcome != datapath_api::SockLbOutcome::NoBackend {
            return;
        }
        let mut refused = lock(&self.refused);
        if refused.len() < MAX_OPEN_FLOWS {
            refused.push_back((now_ms, Arc::clone(d)));
        }
    }

    fn directory(&self) -> Arc<Directory> {
        self.resolver.directory()
    }

    /// Counts the flows whose first event is [`SETTLE`] old; folds old buckets.
    pub fn settle(&self, now_ms: u64) {
        let settle = SETTLE.as_millis() as u64;
        let now_s = now_ms / 1000;
        let dir = self.directory();
        let mut records = Vec::new();
        {
            let mut open = lock(&self.open);
            while let Some((first, _)) = open.order.front() {
                if first + settle > now_ms {
                    break;
                }
                let (first, key) = open.order.pop_front().expect("front");
                let Some(f) = open.by_key.get_mut(&key) else {
                    continue;
                };
                if f.first_ms != first || f.counted.is_some() {
                    continue;
                }
                if let Some(end) = f.end.take() {
                    open.by_key.remove(&key);
                    open.mark_ended(key, now_ms);
                    if let Some(r) = self.resolver.resolve(&dir, &end, now_s) {
                        records.push(r);
                    }
                } else if let Some(mut r) = f
                    .first
                    .take()
                    .and_then(|first| self.resolver.resolve(&dir, &first, now_s))
                {
                    // Bytes and round-trip time come with the end.
                    r.bytes_sent = 0;
                    r.bytes_received = 0;
                    r.rtt_us = None;
                    r.failure = None;
                    r.connections = 1;
                    f.counted = Some(r.clone());
                    records.push(r);
                } else {
                    // Not TCP or UDP: nothing to draw.
                    open.by_key.remove(&key);
                }
            }
        }
        {
            let mut refused = lock(&self.refused);
            while refused.front().is_some_and(|(t, _)| t + settle <= now_ms) {
                let (_, d) = refused.pop_front().expect("front");
                records.push(self.resolver.refused(&dir, &d, now_s));
            }
        }
        let mut graph = lock(&self.graph);
        for r in &records {
            graph.record(r);
        }
        graph.age(now_s);
    }

    fn filter(&self, q: &GraphQuery) -> Result<ViewFilter> {
        let name = q.window.as_deref().unwrap_or(DEFAULT_GRAPH_WINDOW);
        let window = GRAPH_WINDOWS
            .iter()
            .find(|(w, _)| *w == name)
            .ok_or_else(|| {
                let all: Vec<&str> = GRAPH_WINDOWS.iter().map(|(w, _)| *w).collect();
                Error::InvalidArgument(format!("window {name:?} is not one of {}", all.join(", ")))
            })?;
        let cap = self.settings().max_edges;
        let top = q.top.unwrap_or(cap);
        if top == 0 {
            return Err(Error::InvalidArgument("top must be at least 1".into()));
        }
        let exclude: BTreeSet<String> = q
            .exclude
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(normalise_address)
            .collect();
        if let Some(ns) = &q.namespace
            && ns.trim().is_empty()
        {
            return Err(Error::InvalidArgument("namespace must not be empty".into()));
        }
        Ok(ViewFilter {
            window: (window.0.to_string(), window.1),
            namespace: q.namespace.clone(),
            exclude,
            top: top.min(cap),
        })
    }

    /// `GET /v1/graph`.
    pub fn view(&self, q: &GraphQuery) -> Result<GraphView> {
        if !lock(&self.health).up {
            return Err(Error::Unavailable(
                "the graph module is off; enable it with `graph.enabled: true`".into(),
            ));
        }
        let filter = self.filter(q)?;
        let sources = self.resolver.sources();
        Ok(lock(&self.graph).view(&filter, now_s(), sources, unix_ms_of))
    }

    /// `GET /v1/graph/status`.
    pub fn status(&self) -> GraphStatus {
        let graph = lock(&self.graph);
        GraphStatus {
            events: self.events_taken.load(Ordering::Relaxed),
            events_lost: self.events_lost.load(Ordering::Relaxed),
            edges: graph.edge_count() as u64,
            edges_evicted: graph.evicted,
            open_flows: lock(&self.open).by_key.len() as u64,
            web_listen: self.settings().web_listen.map(|a| a.to_string()),
        }
    }

    async fn consume(
        &self,
        mut sub: Subscriber<Arc<FlowEventView>>,
        mut decisions: Subscriber<Arc<datapath_api::SockLbDecision>>,
        mut cancel: Cancel,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        let mut refusals = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                _ = decisions.recv_many(&mut refusals, BATCH) => {
                    let now = now_ms();
                    for d in refusals.drain(..) {
                        self.take_decision(&d, now);
                    }
                }
                _ = sub.recv_many(&mut batch, BATCH) => {
                    let now = now_ms();
                    for e in batch.drain(..) {
                        self.take(&e, now);
                    }
                }
                _ = tick.tick() => {
                    self.settle(now_ms());
                    self.events_lost.store(sub.lost(), Ordering::Relaxed);
                }
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// The web view: the page, the graph as JSON and as DOT, nothing else.
    fn web_router(self: &Arc<Self>) -> axum::Router {
        use axum::{http::header, response::IntoResponse, routing::get};
        let me = Arc::clone(self);
        let graph = crate::server::get_query_blocking(move |q: GraphQuery| me.view(&q));
        let me = Arc::clone(self);
        let dot = get(move |q: axum::extract::Query<GraphQuery>| {
            let me = Arc::clone(&me);
            async move {
                match tokio::task::spawn_blocking(move || me.view(&q.0)).await {
                    Ok(Ok(v)) => (
                        [(header::CONTENT_TYPE, "text/vnd.graphviz; charset=utf-8")],
                        v.to_dot(),
                    )
                        .into_response(),
                    Ok(Err(e)) => crate::server::ApiFailure::from(e).into_response(),
                    Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        });
        let page = get(|| async {
            (
                [
                    (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                    // Nothing from elsewhere: the page is self-contained.
                    (
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
                    ),
                ],
                PAGE,
            )
        });
        axum::Router::new()
            .route("/", page)
            .route(datapath_api::routes::GRAPH, graph)
            .route("/graph.dot", dot)
    }
}

/// An address in its canonical spelling, anything else as given (so `2001:DB8::1` excludes
/// the node listed as `2001:db8::1`).
fn normalise_address(s: &str) -> String {
    s.parse::<IpAddr>()
        .map_or_else(|_| s.to_string(), |a| a.to_string())
}

impl Controller for GraphController {
    fn name(&self) -> &'static str {
        NAME
    }

    fn after(&self) -> &'static [&'static str] {
        &[crate::ct::NAME]
    }

    fn enabled(&self, settings: &Settings) -> bool {
        settings.graph.enabled
    }

    fn start(&self, settings: &Settings, blocker: Option<String>) -> Result<()> {
        *lock(&self.settings) = settings.graph.clone();
        *lock(&self.graph) = Graph::new(settings.graph.max_edges);
        *lock(&self.open) = OpenFlows::default();
        lock(&self.refused).clear();
        let mut reason = if !settings.graph.enabled {
            Some("disabled by the configuration (graph.enabled)".to_string())
        } else {
            blocker
        };
        *lock(&self.web) = None;
        if reason.is_none()
            && let Some(addr) = settings.graph.web_listen
        {
            match std::net::TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => *lock(&self.web) = Some(l),
                Err(e) => reason = Some(format!("cannot listen on {addr} for the web view: {e}")),
            }
        }
        match &reason {
            None => info!(
                web = ?settings.graph.web_listen,
                max_edges = settings.graph.max_edges,
                "module graph up"
            ),
            Some(r) if settings.graph.enabled => warn!(reason = %r, "module graph off"),
            Some(_) => {}
        }
        *lock(&self.health) = Health {
            enabled: settings.graph.enabled,
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

    fn run(self: Arc<Self>, cancel: Cancel) -> RunFuture {
        Box::pin(async move {
            if !lock(&self.health).up {
                let mut cancel = cancel;
                cancel.cancelled().await;
                return Ok(());
            }
            let sub = self.events.subscribe(NAME);
            let decisions = self.decisions.subscribe(NAME);
            let web = lock(&self.web)
                .as_ref()
                .map(|l| l.try_clone())
                .transpose()
                .map_err(|e| Error::io("keep the web view's listener", e))?;
            let server = async {
                let Some(l) = web else {
                    return Ok(());
                };
                let listener = tokio::net::TcpListener::from_std(l)
                    .map_err(|e| Error::io("serve the web view", e))?;
                let mut stop = cancel.clone();
                axum::serve(listener, self.web_router())
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
                    .map_err(|e| Error::io("serve the web view", e))
            };
            let (_, served) = tokio::join!(self.consume(sub, decisions, cancel.clone()), server);
            served
        })
    }

    fn health(&self) -> Health {
        lock(&self.health).clone()
    }

    fn collectors(self: Arc<Self>) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(metrics_collector(self))]
    }

    fn routes(self: Arc<Self>) -> axum::Router {
        use crate::server::{get_blocking, get_query_blocking};
        let me = Arc::clone(&self);
        let view = get_query_blocking(move |q: GraphQuery| me.view(&q));
        let me = Arc::clone(&self);
        let status = get_blocking(move || me.status());
        axum::Router::new()
            .route(datapath_api::routes::GRAPH, view)
            .route(datapath_api::routes::GRAPH_STATUS, status)
    }
}

mod metrics {
    use prometheus::{IntCounterVec, IntGaugeVec, core::Collector};

    use crate::metrics::{Families, counter, gauge};

    pub(super) struct GraphFamilies {
        pub events: IntCounterVec,
        pub lost: IntCounterVec,
        pub edges: IntGaugeVec,
        pub evicted: IntCounterVec,
        pub edge_connections: IntCounterVec,
        pub edge_bytes: IntCounterVec,
        pub edge_failures: IntCounterVec,
    }

    const EDGE: &[&str] = &["caller", "callee", "protocol", "port"];

    impl Families for GraphFamilies {
        fn new() -> Self {
            Self {
                events: counter(
                    "datapath_graph_events_total",
                    "Flow events the graph took from the bus",
                    &[],
                ),
                lost: counter(
                    "datapath_graph_events_lost_total",
                    "Flow events the graph fell behind on",
                    &[],
                ),
                edges: gauge("datapath_graph_edges", "Edges held over the last hour", &[]),
                evicted: counter(
                    "datapath_graph_edges_evicted_total",
                    "Edges forgotten because graph.max_edges was reached",
                    &[],
                ),
                edge_connections: counter(
                    "datapath_graph_edge_connections_total",
                    "Connections of an edge since it appeared (the graph.metrics_edges busiest)",
                    EDGE,
                ),
                edge_bytes: counter(
                    "datapath_graph_edge_bytes_total",
                    "Bytes of an edge's ended connections, by direction (sent: caller to callee)",
                    &["caller", "callee", "protocol", "port", "direction"],
                ),
                edge_failures: counter(
                    "datapath_graph_edge_failures_total",
                    "Failed connections of an edge (reset, refused, denied, no backend)",
                    EDGE,
                ),
            }
        }

        fn all(&self) -> Vec<&dyn Collector> {
            vec![
                &self.events,
                &self.lost,
                &self.edges,
                &self.evicted,
                &self.edge_connections,
                &self.edge_bytes,
                &self.edge_failures,
            ]
        }
    }
}

fn metrics_collector(
    ctl: Arc<GraphController>,
) -> crate::metrics::FamilyCollector<metrics::GraphFamilies> {
    crate::metrics::FamilyCollector::new(move |f: &metrics::GraphFamilies| {
        if !lock(&ctl.health).up {
            return;
        }
        let none: &[&str] = &[];
        let st = ctl.status();
        f.events.with_label_values(none).inc_by(st.events);
        f.lost.with_label_values(none).inc_by(st.events_lost);
        f.edges.with_label_values(none).set(st.edges as i64);
        f.evicted.with_label_values(none).inc_by(st.edges_evicted);
        let n = ctl.settings().metrics_edges;
        let edges = lock(&ctl.graph).metric_edges(n, now_s());
        for e in edges {
            let port = e.port.to_string();
            let labels = [e.caller.as_str(), &e.callee, e.protocol, &port];
            f.edge_connections
                .with_label_values(&labels)
                .inc_by(e.total.connections);
            f.edge_failures
                .with_label_values(&labels)
                .inc_by(e.total.failures);
            for (dir, v) in [
                ("sent", e.total.bytes_sent),
                ("received", e.total.bytes_received),
            ] {
                f.edge_bytes
                    .with_label_values(&[e.caller.as_str(), &e.callee, e.protocol, &port, dir])
                    .inc_by(v);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use datapath_api::{GraphNodeKind, GraphSources, Protocol, ServiceKey, ServiceSource};

    use super::*;
    use crate::{
        dns::NameLookup,
        exec::{FlowOwnerLookup, owners::Owner},
        lb::{CatalogEntry, SERVICE_CATALOG, ServiceCatalog},
    };

    /// The name the client asked for the frontend's VIP.
    struct Names;
    impl NameLookup for Names {
        fn name_of(&self, _client: IpAddr, addr: IpAddr) -> Option<String> {
            (addr.to_string() == "198.18.100.11").then(|| "frontend.svc.test".into())
        }
    }

    /// Every connection from 198.18.0.1 is the client program's.
    struct Owners;
    impl FlowOwnerLookup for Owners {
        fn owner_of(&self, src: IpAddr, _: u16, _: IpAddr, _: u16) -> Option<Owner> {
            (src.to_string() == "198.18.0.1").then(|| Owner {
                pid: 42,
                start_ticks: 1,
                exe: "/bin/client".into(),
                comm: "client".into(),
                pod_uid: None,
            })
        }
    }

    fn event(kind: &str, src: &str, sport: u16, dst: &str, dport: u16) -> Arc<FlowEventView> {
        Arc::new(FlowEventView {
            kind: kind.into(),
            ts_ns: 0,
            protocol: "tcp".into(),
            src: src.into(),
            src_port: sport,
            dst: dst.into(),
            dst_port: dport,
            interface: "lbc".into(),
            direction: "ingress".into(),
            rule: None,
            rule_name: None,
            state: "TIME_WAIT".into(),
            packets_orig: 5,
            packets_reply: 4,
            bytes_orig: 300,
            bytes_reply: 2000,
            duration_ns: 1,
            rtt_ns: 150_000,
            dst_name: None,
            src_name: None,
            pid: None,
            exe: None,
        })
    }

    fn controller(with_modules: bool) -> Arc<GraphController> {
        let bus = Bus::new();
        let ctl = GraphController::new(&Settings::default(), &bus).unwrap();
        ctl.start(&Settings::default(), None).unwrap();
        let catalog: ServiceCatalog = vec![CatalogEntry {
            key: ServiceKey {
                vip: "198.18.100.11".parse().unwrap(),
                port: 80,
                proto: Protocol::Tcp,
            },
            source: ServiceSource::File,
            owner: Some("frontend".into()),
            backends: vec!["198.18.1.11:8081".parse::<SocketAddr>().unwrap()],
        }];
        let writer = bus
            .state::<ServiceCatalog>(SERVICE_CATALOG)
            .unwrap()
            .writer()
            .unwrap();
        writer.publish(catalog);
        std::mem::forget(writer);
        if with_modules {
            let names = bus
                .state::<crate::dns::NameHandle>(crate::dns::NAMES)
                .unwrap();
            let w = names.writer().unwrap();
            w.publish(Some(Arc::new(Names) as Arc<dyn NameLookup>));
            std::mem::forget(w);
            let owners = bus
                .state::<crate::exec::OwnerHandle>(crate::exec::OWNERS)
                .unwrap();
            let w = owners.writer().unwrap();
            w.publish(Some(Arc::new(Owners) as Arc<dyn FlowOwnerLookup>));
            std::mem::forget(w);
        }
        ctl
    }

    fn graph(ctl: &GraphController) -> GraphView {
        ctl.view(&GraphQuery::default()).unwrap()
    }

    #[test]
    fn a_flow_counts_once_from_open_to_close_named_by_its_service_and_process() {
        let ctl = controller(true);
        let now = now_ms();
        let ev = |kind, port| event(kind, "198.18.0.1", port, "198.18.1.11", 8081);
        ctl.take(&ev("opened", 40000), now);
        ctl.settle(now + 999);
        assert!(graph(&ctl).edges.is_empty(), "not yet settled");
        ctl.settle(now + 1000);
        let g = graph(&ctl);
        assert_eq!(g.edges.len(), 1, "{g:#?}");
        assert_eq!(
            g.edges[0].id,
            "process:/bin/client -> service:frontend tcp/80"
        );
        assert_eq!((g.edges[0].connections, g.edges[0].bytes_sent), (1, 0));
        ctl.take(&ev("closed", 40000), now + 2000);
        // The GC's expiry of the closing entry is the same end: not counted again.
        ctl.take(&ev("expired", 40000), now + 9000);
        // A flow seen only at its end counts too, once settled, and once.
        ctl.take(&ev("closed", 40001), now + 2000);
        ctl.take(&ev("expired", 40001), now + 2500);
        ctl.settle(now + 3000);
        ctl.take(&ev("expired", 40001), now + 9000);
        let g = graph(&ctl);
        let e = &g.edges[0];
        assert_eq!(
            (e.connections, e.bytes_sent, e.bytes_received),
            (2, 600, 4000),
            "{e:#?}"
        );
        assert_eq!(e.processes[0].exe, "/bin/client");
        assert!((140..=160).contains(&e.rtt_p50_us.unwrap()), "{e:#?}");
        let frontend = g.nodes.iter().find(|n| n.id == "service:frontend").unwrap();
        assert_eq!(frontend.names, ["frontend.svc.test"]);
        assert_eq!(frontend.addresses, ["198.18.1.11", "198.18.100.11"]);
        assert_eq!(
            g.sources,
            GraphSources {
                names: true,
                processes: true,
                services: true
            }
        );
        assert_eq!(ctl.status().open_flows, 0);
        // The tuple used again after its end is a new connection.
        ctl.take(&ev("opened", 40000), now + 10_000);
        ctl.settle(now + 11_000);
        assert_eq!(graph(&ctl).edges[0].connections, 3);
    }

    #[test]
    fn without_names_and_processes_the_ends_are_addresses_and_failures_are_counted() {
        let ctl = controller(false);
        let now = now_ms();
        let ev = |kind, port| event(kind, "198.18.0.1", port, "198.18.0.4", 8084);
        let mut refused = (*ev("closed", 1)).clone();
        refused.state = "CLOSE".into();
        refused.rtt_ns = 0;
        ctl.take(&Arc::new(refused), now);
        let mut reset = (*ev("closed", 2)).clone();
        reset.state = "CLOSE".into();
        ctl.take(&Arc::new(reset), now);
        ctl.take(&ev("denied", 3), now);
        // A retransmitted SYN denied again is the same attempt.
        ctl.take(&ev("denied", 3), now + 500);
        ctl.settle(now + 1000);
        ctl.take(&ev("denied", 3), now + 1500);
        let g = graph(&ctl);
        assert_eq!(g.edges.len(), 1, "{g:#?}");
        let e = &g.edges[0];
        assert_eq!(e.id, "external:198.18.0.1 -> external:198.18.0.4 tcp/8084");
        assert_eq!(e.connections, 3);
        assert_eq!(
            (e.failures.refused, e.failures.reset, e.failures.denied),
            (1, 1, 1)
        );
        assert!(e.processes.is_empty());
        assert_eq!(g.nodes[0].kind, GraphNodeKind::External);
        assert!(!g.sources.names && !g.sources.processes);
        // Bad queries are refused with the reason.
        for q in [
            GraphQuery {
                window: Some("2m".into()),
                ..Default::default()
            },
            GraphQuery {
                top: Some(0),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(ctl.view(&q), Err(Error::InvalidArgument(_))),
                "{q:?}"
            );
        }
        let dot = g.to_dot();
        assert!(dot.starts_with("digraph datapath {"), "{dot}");
        assert!(
            dot.contains("\"external:198.18.0.1\" -> \"external:198.18.0.4\""),
            "{dot}"
        );
    }

    #[test]
    fn a_connect_refused_for_want_of_a_backend_is_a_no_backend_failure() {
        let ctl = controller(false);
        let now = now_ms();
        let d = |outcome| {
            Arc::new(datapath_api::SockLbDecision {
                cookie: 1,
                pid: 7,
                cgroup_id: 9,
                hook: datapath_api::SockLbHook::Connect,
                proto: Protocol::Tcp,
                vip: "198.18.100.11:80".parse().unwrap(),
                backend: "0.0.0.0:0".parse().unwrap(),
                outcome,
            })
        };
        // A translation is not a flow: the flow events carry it.
        ctl.take_decision(&d(datapath_api::SockLbOutcome::Translated), now);
        ctl.take_decision(&d(datapath_api::SockLbOutcome::NoBackend), now);
        ctl.settle(now + 999);
        assert!(graph(&ctl).edges.is_empty());
        ctl.settle(now + 1000);
        let g = graph(&ctl);
        assert_eq!(g.edges.len(), 1, "{g:#?}");
        let e = &g.edges[0];
        assert_eq!(e.id, "process:pid 7 -> service:frontend tcp/80");
        assert_eq!((e.connections, e.failures.no_backend), (1, 1));
    }
}
