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
use model::{EdgeKey, EndFigures, FastMap, Graph, ViewFilter};
use resolve::{FlowKey, Resolver, flow_key};

pub const NAME: &str = "graph";
/// How long after a flow opened it is counted if it has not ended.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How often settled flows are counted and old buckets folded.
const TICK: Duration = Duration::from_millis(500);
/// Open flows remembered (to count each once); past that a flow is counted when it ends.
pub const MAX_OPEN_FLOWS: usize = 65_536;
/// Events taken from the bus per wake-up.
pub const BATCH: usize = 1024;
/// The web view's page.
const PAGE: &str = include_str!("web/index.html");

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A flow's tuple, as it is remembered: its 64-bit hash (see [`OpenFlows::id_of`]).
type FlowId = u64;

/// What an open flow waits for. The events themselves are not kept: only what counting
/// needs, so that a flow event is freed as soon as the bus's other readers are done with it.
enum Pending {
    /// Its opening: counted at settling, its bytes with its end.
    Opened(FlowKey),
    /// Its end, come before it was counted: counted at settling with these figures.
    Ended(FlowKey, EndFigures),
    /// Counted on this edge: its end's figures go there.
    Counted(EdgeKey),
}

/// A flow waiting to be counted, or counted and waiting for its end.
struct OpenFlow {
    /// When its first event came (graph clock, milliseconds).
    first_ms: u64,
    pending: Pending,
}

/// Flows between their first event and their end, and flows that ended lately (a TCP flow's
/// `closed` is followed by the GC's `expired` of its closing entry: one end is counted).
/// Both know a flow by the 64-bit hash of its tuple, not the 40-byte tuple: two live tuples
/// sharing a hash (about 1 in 10^10 at these sizes) would only merge two flows' counts.
#[derive(Default)]
struct OpenFlows {
    hasher: foldhash::fast::RandomState,
    by_id: FastMap<FlowId, OpenFlow>,
    /// (first_ms, id) in arrival order, for settling.
    order: VecDeque<(u64, FlowId)>,
    ended: EndedFlows,
}

/// How long an ended flow is remembered: past the longest closing timeout, so that the GC's
/// late `expired` is recognised.
const ENDED_KEEP_S: u32 = 10 * 60;
/// The ended flows' table: sets of [`ENDED_WAYS`] slots, 131,072 slots in all (1 MiB).
const ENDED_SETS: usize = 32_768;
const ENDED_WAYS: usize = 4;

/// Flows that ended lately, as a set-associative table of (fingerprint, second it ended):
/// one cache line per lookup, and a fixed 1 MiB, where a map and an expiry queue took twice
/// that and three scattered accesses per flow. A set that is full forgets its oldest, so
/// past about 100,000 flows ended within [`ENDED_KEEP_S`] some late `expired` are not
/// recognised and count once more (a map capped at the same memory would forget as many).
struct EndedFlows {
    /// Fingerprint (never 0; 0 is an empty slot) and the second the flow ended.
    slots: Box<[(u32, u32)]>,
}

impl Default for EndedFlows {
    fn default() -> Self {
        Self {
            slots: vec![(0, 0); ENDED_SETS * ENDED_WAYS].into_boxed_slice(),
        }
    }
}

impl EndedFlows {
    /// The flow's set of slots, and its fingerprint there.
    fn set_of(&mut self, id: FlowId) -> (&mut [(u32, u32)], u32) {
        let set = (id as usize) & (ENDED_SETS - 1);
        let fingerprint = ((id >> 32) as u32) | 1;
        (
            &mut self.slots[set * ENDED_WAYS..(set + 1) * ENDED_WAYS],
            fingerprint,
        )
    }

    fn contains(&mut self, id: FlowId, now_s: u32) -> bool {
        let (set, fp) = self.set_of(id);
        set.iter()
            .any(|&(f, t)| f == fp && now_s.saturating_sub(t) < ENDED_KEEP_S)
    }

    fn insert(&mut self, id: FlowId, now_s: u32) {
        let (set, fp) = self.set_of(id);
        // The same flow's slot, else an empty or expired one, else the oldest.
        let slot = set
            .iter()
            .position(|&(f, _)| f == fp)
            .or_else(|| {
                set.iter()
                    .position(|&(f, t)| f == 0 || now_s.saturating_sub(t) >= ENDED_KEEP_S)
            })
            .unwrap_or_else(|| {
                (0..ENDED_WAYS)
                    .max_by_key(|&i| now_s.saturating_sub(set[i].1))
                    .unwrap_or(0)
            });
        set[slot] = (fp, now_s);
    }

    fn remove(&mut self, id: FlowId) {
        let (set, fp) = self.set_of(id);
        for slot in set.iter_mut().filter(|(f, _)| *f == fp) {
            *slot = (0, 0);
        }
    }
}

/// Gives memory back after a peak (a burst of flows), with room to grow again.
fn shrink_map<K: Eq + std::hash::Hash, V>(m: &mut FastMap<K, V>) {
    if m.capacity() > 4096 && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

fn shrink_deque<T>(d: &mut VecDeque<T>) {
    if d.capacity() > 4096 && d.len() * 4 < d.capacity() {
        d.shrink_to(d.len() * 2);
    }
}

/// Seconds of the graph's clock, as the ended flows' table keeps them.
fn seconds_u32(now_ms: u64) -> u32 {
    (now_ms / 1000) as u32
}

impl OpenFlows {
    fn id_of(&self, key: &FlowKey) -> FlowId {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    fn mark_ended(&mut self, id: FlowId, now_ms: u64) {
        self.ended.insert(id, seconds_u32(now_ms));
    }

    fn shrink(&mut self) {
        shrink_map(&mut self.by_id);
        shrink_deque(&mut self.order);
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
        self.take_batch(std::slice::from_ref(e), now_ms);
    }

    /// [`GraphController::take`] of each event, in order, taking the locks once: what the
    /// controller does with the events of one wake-up.
    pub fn take_batch(&self, events: &[Arc<FlowEventView>], now_ms: u64) {
        self.events_taken
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        // The same order as `settle`: the open flows, then the graph.
        let mut open = lock(&self.open);
        let mut graph = lock(&self.graph);
        let mut lookups = None;
        for e in events {
            let Some(key) = flow_key(e) else {
                continue;
            };
            let id = open.id_of(&key);
            match e.kind.as_str() {
                "opened" | "logged" => {
                    // The tuple used again: a new connection.
                    open.ended.remove(id);
                    // Past the cap the flow is counted when it ends instead.
                    if open.by_id.len() < MAX_OPEN_FLOWS
                        && let std::collections::hash_map::Entry::Vacant(slot) =
                            open.by_id.entry(id)
                    {
                        slot.insert(OpenFlow {
                            first_ms: now_ms,
                            pending: Pending::Opened(key),
                        });
                        open.order.push_back((now_ms, id));
                    }
                }
                "closed" | "expired" | "denied" | "cut" => {
                    if open.ended.contains(id, seconds_u32(now_ms)) {
                        // A second end of an ended flow (expired after closed).
                        continue;
                    }
                    if let Some(f) = open.by_id.get_mut(&id) {
                        let Pending::Counted(edge) = f.pending else {
                            // Counted at its settling, with these figures.
                            f.pending = Pending::Ended(key, resolve::end_figures(e));
                            continue;
                        };
                        open.by_id.remove(&id);
                        open.mark_ended(id, now_ms);
                        graph.record_end(edge, &resolve::end_figures(e), now_ms / 1000);
                    } else if open.by_id.len() < MAX_OPEN_FLOWS {
                        // An end never seen opening (a denied SYN, a flow older than the
                        // daemon): counted after SETTLE too, when names and owners are known.
                        open.order.push_back((now_ms, id));
                        open.by_id.insert(
                            id,
                            OpenFlow {
                                first_ms: now_ms,
                                pending: Pending::Ended(key, resolve::end_figures(e)),
                            },
                        );
                    } else {
                        open.mark_ended(id, now_ms);
                        let l = lookups.get_or_insert_with(|| self.resolver.lookups());
                        let end = resolve::end_figures(e);
                        graph.record(&self.resolver.resolve_key(l, key, &end, now_ms / 1000));
                    }
                }
                _ => {}
            }
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

    /// Counts the flows whose first event is [`SETTLE`] old; folds old buckets.
    pub fn settle(&self, now_ms: u64) {
        let settle = SETTLE.as_millis() as u64;
        let now_s = now_ms / 1000;
        let lookups = self.resolver.lookups();
        // The same order as `take`: the open flows, then the graph.
        let mut open = lock(&self.open);
        let mut graph = lock(&self.graph);
        while let Some(&(first, id)) = open.order.front() {
            if first + settle > now_ms {
                break;
            }
            open.order.pop_front();
            let Some(f) = open.by_id.get_mut(&id) else {
                continue;
            };
            if f.first_ms != first {
                continue;
            }
            match &f.pending {
                Pending::Counted(_) => {}
                Pending::Opened(key) => {
                    // Bytes and round-trip time come with the end.
                    let r =
                        self.resolver
                            .resolve_key(&lookups, *key, &EndFigures::default(), now_s);
                    f.pending = Pending::Counted(graph.record(&r));
                }
                Pending::Ended(key, end) => {
                    let r = self.resolver.resolve_key(&lookups, *key, end, now_s);
                    graph.record(&r);
                    open.by_id.remove(&id);
                    open.mark_ended(id, now_ms);
                }
            }
        }
        open.shrink();
        drop(open);
        {
            let mut refused = lock(&self.refused);
            while refused.front().is_some_and(|(t, _)| t + settle <= now_ms) {
                let (_, d) = refused.pop_front().expect("front");
                graph.record(&self.resolver.refused(&lookups, &d, now_s));
            }
            shrink_deque(&mut refused);
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
        // Never the graph's lock, then the open flows' (`settle` takes them the other way).
        let open_flows = lock(&self.open).by_id.len() as u64;
        let graph = lock(&self.graph);
        GraphStatus {
            events: self.events_taken.load(Ordering::Relaxed),
            events_lost: self.events_lost.load(Ordering::Relaxed),
            edges: graph.edge_count() as u64,
            edges_evicted: graph.evicted,
            open_flows,
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
                    self.take_batch(&batch, now_ms());
                    batch.clear();
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
        fn name_of(&self, _client: IpAddr, addr: IpAddr) -> Option<Arc<str>> {
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
    fn ended_flows_are_remembered_for_a_while_and_a_full_set_forgets_its_oldest() {
        let mut ended = EndedFlows::default();
        // Ids of one set (the low bits pick it), told apart by their high bits (the
        // fingerprint sets bit 0, so the high half is even here).
        let id = |n: u64| ((2 * n) << 32) | 7;
        ended.insert(id(1), 100);
        assert!(ended.contains(id(1), 100 + ENDED_KEEP_S - 1));
        assert!(!ended.contains(id(1), 100 + ENDED_KEEP_S), "expired");
        assert!(!ended.contains(id(2), 100));
        ended.remove(id(1));
        assert!(!ended.contains(id(1), 101), "the tuple used again");
        for n in 1..=ENDED_WAYS as u64 {
            ended.insert(id(n), 200 + n as u32);
        }
        ended.insert(id(99), 300);
        assert!(!ended.contains(id(1), 300), "the oldest of the set went");
        assert!((2..=ENDED_WAYS as u64).all(|n| ended.contains(id(n), 300)));
        assert!(ended.contains(id(99), 300));
        // Another set is untouched.
        ended.insert(id(5) + 1, 300);
        assert!(ended.contains(id(99), 300) && ended.contains(id(5) + 1, 300));
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
