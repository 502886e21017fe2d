//! The graph's aggregation, with no bus and no clock of its own: resolved flows go in
//! ([`Graph::record`]), views over a window come out ([`Graph::view`]).
//!
//! Memory stays bounded whatever the traffic:
//! - an edge keeps sparse time buckets: 10-second buckets for the last 5 minutes, folded into
//!   5-minute buckets for the rest of the hour, and only for the intervals it was active in;
//! - round-trip times go into a sparse log-scale histogram (8 steps per power of two);
//! - processes per bucket and addresses and names per node are capped;
//! - at most `max_edges` edges: past that, the idlest are forgotten first, in batches;
//! - nodes live as long as an edge uses them.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use datapath_api::{
    GRAPH_NODE_LIST_CAP, GraphEdge, GraphFailures, GraphNode, GraphNodeKind, GraphProcess,
    GraphSources, GraphView,
};

/// The graph's maps: foldhash (see datapath/Cargo.toml).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Width of a fine bucket, and how long fine buckets are kept.
const FINE_SECONDS: u64 = 10;
const FINE_SPAN: u64 = 300;
/// Width of a coarse bucket, and how long any bucket is kept.
const COARSE_SECONDS: u64 = 300;
const LONGEST_WINDOW: u64 = 3600;
/// Processes one bucket counts separately (the rest are not named).
const BUCKET_PROCESSES: usize = 8;

/// Why a connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Reset,
    Refused,
    Denied,
    NoBackend,
}

/// An edge's transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// A node's label. Shared strings and plain values: naming a flow's ends allocates nothing,
/// and a known node is found by its label as is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Label {
    /// As spelled: a service, a program, a DNS name.
    Text(Arc<str>),
    /// A pod by uid, spelled `pod/<uid>`.
    Pod(Arc<str>),
    /// An endpoint known by its address only.
    Address(IpAddr),
    /// A process the exec module did not know, spelled `pid <n>`.
    Pid(u32),
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Label::Text(s) => f.write_str(s),
            Label::Pod(uid) => write!(f, "pod/{uid}"),
            Label::Address(a) => a.fmt(f),
            Label::Pid(pid) => write!(f, "pid {pid}"),
        }
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Label::Text(s.into())
    }
}

/// One end of a flow, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRef {
    pub kind: GraphNodeKind,
    pub label: Label,
    pub namespace: Option<Arc<str>>,
    /// An address to list on the node (a backend, an endpoint: what the wire carried).
    pub address: Option<IpAddr>,
    /// A service's VIP, listed too (the socket LB leaves only the backend on the wire).
    pub vip: Option<IpAddr>,
    /// A DNS name the caller asked for it.
    pub name: Option<Arc<str>>,
}

impl NodeRef {
    pub fn id(&self) -> String {
        format!("{}:{}", kind_name(self.kind), self.label)
    }
}

fn kind_index(kind: GraphNodeKind) -> usize {
    match kind {
        GraphNodeKind::Service => 0,
        GraphNodeKind::Workload => 1,
        GraphNodeKind::Process => 2,
        GraphNodeKind::External => 3,
    }
}

pub fn kind_name(kind: GraphNodeKind) -> &'static str {
    match kind {
        GraphNodeKind::Service => "service",
        GraphNodeKind::Workload => "workload",
        GraphNodeKind::Process => "process",
        GraphNodeKind::External => "external",
    }
}

/// A flow, resolved to its edge and what it adds there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    pub caller: NodeRef,
    pub callee: NodeRef,
    pub protocol: Transport,
    pub port: u16,
    /// 1 for a connection seen opening (or first seen at its end), 0 for a later report of it.
    pub connections: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rtt_us: Option<u64>,
    pub failure: Option<Failure>,
    pub exe: Option<Arc<str>>,
    /// Seconds of the graph's clock (monotonic).
    pub now_s: u64,
}

/// What a connection's end adds to the edge it was counted on (see [`Graph::record_end`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndFigures {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rtt_us: Option<u32>,
    pub failure: Option<Failure>,
}

/// Small counts by key: the first inline, more in a list allocated only when needed (most
/// buckets see one RTT bin and one program).
#[derive(Clone, Debug, Default)]
struct Counts<K> {
    first: Option<(K, u32)>,
    #[expect(
        clippy::box_collection,
        reason = "8 bytes in every bucket where a Vec takes 24, and the list is rarely needed"
    )]
    rest: Option<Box<Vec<(K, u32)>>>,
}

impl<K: Copy + Eq> Counts<K> {
    /// Adds `n` to `key`; a new key past `cap` keys is not counted.
    fn add(&mut self, key: K, n: u32, cap: usize) {
        match &mut self.first {
            None => {
                self.first = Some((key, n));
                return;
            }
            Some((k, c)) if *k == key => {
                *c = c.saturating_add(n);
                return;
            }
            Some(_) => {}
        }
        let rest = self.rest.get_or_insert_with(Box::default);
        if let Some((_, c)) = rest.iter_mut().find(|(k, _)| *k == key) {
            *c = c.saturating_add(n);
        } else if rest.len() + 1 < cap {
            rest.push((key, n));
        }
    }

    fn iter(&self) -> impl Iterator<Item = (K, u32)> + '_ {
        self.first
            .into_iter()
            .chain(self.rest.iter().flat_map(|r| r.iter().copied()))
    }
}

/// The bin of `v`: exact below 8, then 8 bins per power of two (within 1/8).
fn bin_of(v: u64) -> u16 {
    if v < 8 {
        return v as u16;
    }
    let e = 63 - v.leading_zeros() as u64; // v in [2^e, 2^(e+1))
    let sub = (v >> (e - 3)) & 7;
    (8 * (e - 2) + sub) as u16
}

/// The middle of bin `b`'s range.
fn value_of(b: u16) -> u64 {
    let b = u64::from(b);
    if b < 8 {
        return b;
    }
    let e = b / 8 + 2;
    let sub = b % 8;
    let low = (8 + sub) << (e - 3);
    let width = 1u64 << (e - 3);
    low + width / 2
}

/// What an edge did in one interval. RTTs are a sparse log-scale histogram (bin, count).
#[derive(Clone, Debug, Default)]
struct Bucket {
    connections: u64,
    bytes_sent: u64,
    bytes_received: u64,
    failures: [u32; 4],
    rtt: Counts<u16>,
    /// (process id in [`Graph::exes`], connections).
    processes: Counts<u32>,
}

impl Bucket {
    fn merge(&mut self, other: &Bucket) {
        self.connections += other.connections;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        for (a, b) in self.failures.iter_mut().zip(other.failures) {
            *a = a.saturating_add(b);
        }
        for (bin, n) in other.rtt.iter() {
            self.rtt.add(bin, n, usize::MAX);
        }
        for (exe, n) in other.processes.iter() {
            self.processes.add(exe, n, BUCKET_PROCESSES);
        }
    }
}

/// An edge's key: caller and callee node ids, transport, port. What a counted flow keeps to
/// add its end's figures later.
pub type EdgeKey = (u32, u32, Transport, u16);

struct Edge {
    /// The bucket flows go to now (start second, bucket), kept in the edge itself: a flow
    /// then touches the edge's own memory, not a list elsewhere on the heap.
    current: Option<(u64, Bucket)>,
    /// Older fine buckets (start second, bucket), oldest first.
    fine: Vec<(u64, Bucket)>,
    coarse: Vec<(u64, Bucket)>,
    last_seen_s: u64,
    /// Since the edge appeared, for the Prometheus counters.
    total: Totals,
}

/// An edge's counts since it appeared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub connections: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub failures: u64,
}

/// An edge as `/metrics` exports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricEdge {
    pub caller: String,
    pub callee: String,
    pub protocol: &'static str,
    pub port: u16,
    pub total: Totals,
}

/// When a fine bucket starting at `start` is folded into a coarse one.
fn fine_due_s(start: u64) -> u64 {
    start + FINE_SECONDS + FINE_SPAN
}

/// Pushes without the doubling slack, for the coarse list (it grows by one every 5 minutes at
/// most). The fine list doubles: it takes a bucket every 10 seconds of activity, and a copy of
/// the whole list on every one costs more than its slack.
fn push_exact<T>(v: &mut Vec<T>, item: T) {
    if v.len() == v.capacity() {
        v.reserve_exact(1);
    }
    v.push(item);
}

impl Edge {
    fn bucket(&mut self, now_s: u64) -> &mut Bucket {
        let start = now_s - now_s % FINE_SECONDS;
        if let Some((s, _)) = &self.current
            && *s != start
        {
            self.fine.extend(self.current.take());
        }
        &mut self
            .current
            .get_or_insert_with(|| (start, Bucket::default()))
            .1
    }

    /// The fine buckets, oldest first.
    fn fine_buckets(&self) -> impl Iterator<Item = &(u64, Bucket)> {
        self.fine.iter().chain(self.current.as_ref())
    }

    /// Folds fine buckets older than the fine span into coarse ones, drops buckets past the
    /// longest window; answers whether anything is left.
    fn age(&mut self, now_s: u64) -> bool {
        // A current bucket of an earlier interval is an old one now.
        if self
            .current
            .as_ref()
            .is_some_and(|(s, _)| *s + FINE_SECONDS <= now_s)
        {
            self.fine.extend(self.current.take());
        }
        let fine_from = now_s.saturating_sub(FINE_SPAN);
        let keep = self
            .fine
            .partition_point(|(s, _)| *s + FINE_SECONDS <= fine_from);
        for (start, b) in self.fine.drain(..keep) {
            let cstart = start - start % COARSE_SECONDS;
            match self.coarse.last_mut() {
                Some((s, c)) if *s == cstart => c.merge(&b),
                _ => push_exact(&mut self.coarse, (cstart, b)),
            }
        }
        let from = now_s.saturating_sub(LONGEST_WINDOW);
        let drop = self
            .coarse
            .partition_point(|(s, _)| *s + COARSE_SECONDS <= from);
        self.coarse.drain(..drop);
        !(self.current.is_none() && self.fine.is_empty() && self.coarse.is_empty())
    }

    /// When [`Edge::age`] next has something to do for this edge (`u64::MAX`: nothing left).
    fn due_s(&self) -> u64 {
        let fine = self.fine_buckets().next().map(|(s, _)| fine_due_s(*s));
        let coarse = self
            .coarse
            .first()
            .map(|(s, _)| s + COARSE_SECONDS + LONGEST_WINDOW);
        fine.into_iter().chain(coarse).min().unwrap_or(u64::MAX)
    }

    /// The sum of the buckets that overlap the last `window` seconds.
    fn sum(&self, now_s: u64, window: u64) -> Option<Bucket> {
        let from = now_s.saturating_sub(window);
        let mut total: Option<Bucket> = None;
        let fine = self
            .fine_buckets()
            .filter(|(s, _)| *s + FINE_SECONDS > from);
        // The fine buckets cover the last FINE_SPAN whole: shorter windows read only them.
        let coarse = self
            .coarse
            .iter()
            .filter(|(s, _)| window > FINE_SPAN && *s + COARSE_SECONDS > from);
        for (_, b) in coarse.chain(fine) {
            total.get_or_insert_with(Bucket::default).merge(b);
        }
        total
    }
}

struct Node {
    kind: GraphNodeKind,
    label: Label,
    namespace: Option<Arc<str>>,
    /// Sorted, at most [`GRAPH_NODE_LIST_CAP`] each.
    addresses: Vec<IpAddr>,
    names: Vec<Arc<str>>,
    /// Edges that use it.
    edges: u32,
}

/// Inserts `item` into the sorted `list` unless it is there or the list is full.
fn insert_sorted<T: Ord>(list: &mut Vec<T>, item: T) {
    if list.len() < GRAPH_NODE_LIST_CAP
        && let Err(i) = list.binary_search(&item)
    {
        list.insert(i, item);
    }
}

/// The whole graph. See the module documentation.
pub struct Graph {
    max_edges: usize,
    nodes: FastMap<u32, Node>,
    /// Node ids by label, one map per kind.
    node_ids: [FastMap<Label, u32>; 4],
    next_node: u32,
    edges: FastMap<EdgeKey, Edge>,
    /// Programs by id, and ids by program (never forgotten: a node's set is small).
    exes: Vec<Arc<str>>,
    exe_ids: FastMap<Arc<str>, u32>,
    pub evicted: u64,
    /// Ends of counted connections whose edge and nodes were forgotten meanwhile (their
    /// bytes had nowhere to go).
    pub ends_dropped: u64,
    /// The earliest second at which [`Graph::age`] has something to do: the oldest fine
    /// bucket's fold, the oldest coarse bucket's end. Lowered as buckets are made.
    age_due_s: u64,
}

/// What a view is asked for.
#[derive(Clone, Debug, Default)]
pub struct ViewFilter {
    pub window: (String, u64),
    pub namespace: Option<String>,
    pub exclude: BTreeSet<String>,
    pub top: usize,
}

fn quantile(hist: &Counts<u16>, q: f64) -> Option<u64> {
    let mut bins: Vec<(u16, u32)> = hist.iter().collect();
    bins.sort_unstable();
    let total: u64 = bins.iter().map(|(_, n)| u64::from(*n)).sum();
    if total == 0 {
        return None;
    }
    // The smallest bin whose cumulative count reaches q of the total.
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for &(bin, n) in &bins {
        seen += u64::from(n);
        if seen >= rank {
            return Some(value_of(bin));
        }
    }
    bins.last().map(|(b, _)| value_of(*b))
}

/// What one call adds to an edge.
struct Addition {
    connections: u64,
    bytes_sent: u64,
    bytes_received: u64,
    rtt_us: Option<u64>,
    failure: Option<Failure>,
    exe: Option<u32>,
    now_s: u64,
}

impl Graph {
    pub fn new(max_edges: usize) -> Self {
        Self {
            max_edges: max_edges.max(1),
            nodes: FastMap::default(),
            node_ids: Default::default(),
            next_node: 0,
            edges: FastMap::default(),
            exes: Vec::new(),
            exe_ids: FastMap::default(),
            evicted: 0,
            ends_dropped: 0,
            age_due_s: u64::MAX,
        }
    }

    pub fn edge_count(&self) -> usize {
        self.edges.len()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn node(&mut self, r: &NodeRef) -> u32 {
        // Looked up by the label as is: a flow of a known node allocates nothing here.
        let ids = &mut self.node_ids[kind_index(r.kind)];
        let id = match ids.get(&r.label) {
            Some(id) => *id,
            None => {
                let id = self.next_node;
                self.next_node = self.next_node.wrapping_add(1);
                ids.insert(r.label.clone(), id);
                self.nodes.insert(
                    id,
                    Node {
                        kind: r.kind,
                        label: r.label.clone(),
                        namespace: r.namespace.clone(),
                        addresses: Vec::new(),
                        names: Vec::new(),
                        edges: 0,
                    },
                );
                id
            }
        };
        self.learn(id, r);
        id
    }

    /// Adds the addresses and name of `r` to node `id`.
    fn learn(&mut self, id: u32, r: &NodeRef) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        for a in [r.vip, r.address].into_iter().flatten() {
            insert_sorted(&mut node.addresses, a);
        }
        if let Some(name) = &r.name {
            insert_sorted(&mut node.names, Arc::clone(name));
        }
    }

    fn exe_id(&mut self, exe: &Arc<str>) -> u32 {
        if let Some(id) = self.exe_ids.get(exe) {
            return *id;
        }
        let id = self.exes.len() as u32;
        self.exes.push(Arc::clone(exe));
        self.exe_ids.insert(Arc::clone(exe), id);
        id
    }

    /// A new, empty edge (room made first: the idlest edges go when the graph is full).
    fn insert_edge(&mut self, key: EdgeKey, now_s: u64) {
        for id in [key.0, key.1] {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.edges += 1;
            }
        }
        self.edges.insert(
            key,
            Edge {
                current: None,
                fine: Vec::new(),
                coarse: Vec::new(),
                last_seen_s: now_s,
                total: Totals::default(),
            },
        );
    }

    /// Adds one resolved flow; answers its edge (where its end's figures go later).
    pub fn record(&mut self, f: &FlowRecord) -> EdgeKey {
        let known = |r: &NodeRef| self.node_ids[kind_index(r.kind)].get(&r.label).copied();
        let key = match (known(&f.caller), known(&f.callee)) {
            (Some(a), Some(b)) if self.edges.contains_key(&(a, b, f.protocol, f.port)) => {
                // A known edge: its nodes only learn what is new about them.
                self.learn(a, &f.caller);
                self.learn(b, &f.callee);
                (a, b, f.protocol, f.port)
            }
            _ => {
                // Room is made before the new edge's nodes exist, so no eviction takes them
                // away.
                if self.edges.len() >= self.max_edges {
                    self.evict();
                }
                let key = (
                    self.node(&f.caller),
                    self.node(&f.callee),
                    f.protocol,
                    f.port,
                );
                if !self.edges.contains_key(&key) {
                    self.insert_edge(key, f.now_s);
                }
                key
            }
        };
        let exe = f.exe.as_ref().map(|e| self.exe_id(e));
        self.add(
            &key,
            &Addition {
                connections: f.connections,
                bytes_sent: f.bytes_sent,
                bytes_received: f.bytes_received,
                rtt_us: f.rtt_us,
                failure: f.failure,
                exe,
                now_s: f.now_s,
            },
        );
        key
    }

    /// Adds a counted connection's end to its edge `key` (from [`Graph::record`]). An edge
    /// forgotten meanwhile comes back while both its nodes are there; else the figures are
    /// dropped and counted in [`Graph::ends_dropped`].
    pub fn record_end(&mut self, key: EdgeKey, end: &EndFigures, now_s: u64) {
        if !self.edges.contains_key(&key) {
            if self.edges.len() >= self.max_edges {
                self.evict();
            }
            if !(self.nodes.contains_key(&key.0) && self.nodes.contains_key(&key.1)) {
                self.ends_dropped += 1;
                return;
            }
            self.insert_edge(key, now_s);
        }
        self.add(
            &key,
            &Addition {
                connections: 0,
                bytes_sent: end.bytes_sent,
                bytes_received: end.bytes_received,
                rtt_us: end.rtt_us.map(u64::from),
                failure: end.failure,
                exe: None,
                now_s,
            },
        );
    }

    fn add(&mut self, key: &EdgeKey, a: &Addition) {
        let Some(edge) = self.edges.get_mut(key) else {
            return;
        };
        edge.last_seen_s = edge.last_seen_s.max(a.now_s);
        // A bucket made now is due after every older one: only a graph with no bucket left
        // learns an earlier time here.
        self.age_due_s = self
            .age_due_s
            .min(fine_due_s(a.now_s - a.now_s % FINE_SECONDS));
        let t = &mut edge.total;
        t.connections += a.connections;
        t.bytes_sent += a.bytes_sent;
        t.bytes_received += a.bytes_received;
        t.failures += u64::from(a.failure.is_some());
        let b = edge.bucket(a.now_s);
        b.connections += a.connections;
        b.bytes_sent += a.bytes_sent;
        b.bytes_received += a.bytes_received;
        if let Some(rtt) = a.rtt_us {
            b.rtt.add(bin_of(rtt), 1, usize::MAX);
        }
        if let Some(failure) = a.failure {
            let i = match failure {
                Failure::Reset => 0,
                Failure::Refused => 1,
                Failure::Denied => 2,
                Failure::NoBackend => 3,
            };
            b.failures[i] = b.failures[i].saturating_add(1);
        }
        if let Some(exe) = a.exe
            && a.connections > 0
        {
            b.processes.add(exe, a.connections as u32, BUCKET_PROCESSES);
        }
    }

    fn drop_unused_nodes_of(&mut self, ids: &[u32]) {
        for id in ids {
            if self.nodes.get(id).is_some_and(|n| n.edges == 0) {
                let n = self.nodes.remove(id).expect("present");
                self.node_ids[kind_index(n.kind)].remove(&n.label);
            }
        }
    }

    fn remove_edge(&mut self, key: &EdgeKey) {
        if self.edges.remove(key).is_some() {
            for id in [key.0, key.1] {
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.edges = n.edges.saturating_sub(1);
                }
            }
            self.drop_unused_nodes_of(&[key.0, key.1]);
        }
    }

    /// Forgets the idlest sixteenth of the edges (at least one), so that a full graph pays
    /// for the sort once per many new edges.
    fn evict(&mut self) {
        let mut by_idle: Vec<(u64, EdgeKey)> = self
            .edges
            .iter()
            .map(|(k, e)| (e.last_seen_s, *k))
            .collect();
        let n = (self.edges.len() / 16).max(1);
        by_idle.select_nth_unstable_by_key(n - 1, |(t, _)| *t);
        for (_, key) in by_idle.into_iter().take(n) {
            self.remove_edge(&key);
            self.evicted += 1;
        }
    }

    /// Folds old buckets, forgets edges idle past the longest window. A pass over the edges
    /// is made only when some bucket is due (see [`Graph::age_due_s`]): with 10,000 edges a
    /// pass costs about a millisecond, and most ticks have nothing to fold.
    pub fn age(&mut self, now_s: u64) {
        if now_s < self.age_due_s {
            return;
        }
        let mut due = u64::MAX;
        let idle: Vec<_> = self
            .edges
            .iter_mut()
            .filter_map(|(k, e)| {
                let left = e.age(now_s);
                due = due.min(e.due_s());
                (!left).then_some(*k)
            })
            .collect();
        self.age_due_s = due;
        for key in idle {
            self.remove_edge(&key);
        }
    }

    fn node_id(&self, node: u32) -> String {
        self.nodes
            .get(&node)
            .map(|n| format!("{}:{}", kind_name(n.kind), n.label))
            .unwrap_or_default()
    }

    /// The `n` edges with the most connections over the last 5 minutes (then by id), with
    /// their lifetime totals: a bounded set of label values for `/metrics`.
    pub fn metric_edges(&self, n: usize, now_s: u64) -> Vec<MetricEdge> {
        let mut ranked: Vec<(u64, MetricEdge)> = self
            .edges
            .iter()
            .filter_map(|(k, e)| {
                let recent = e.sum(now_s, FINE_SPAN)?.connections;
                Some((
                    recent,
                    MetricEdge {
                        caller: self.node_id(k.0),
                        callee: self.node_id(k.1),
                        protocol: k.2.name(),
                        port: k.3,
                        total: e.total,
                    },
                ))
            })
            .collect();
        ranked.sort_by(|a, b| {
            b.0.cmp(&a.0).then_with(|| {
                (&a.1.caller, &a.1.callee, a.1.port).cmp(&(&b.1.caller, &b.1.callee, b.1.port))
            })
        });
        ranked.into_iter().take(n).map(|(_, e)| e).collect()
    }

    fn node_view(&self, id: u32) -> Option<GraphNode> {
        let n = self.nodes.get(&id)?;
        let label = n.label.to_string();
        Some(GraphNode {
            id: format!("{}:{label}", kind_name(n.kind)),
            kind: n.kind,
            label,
            namespace: n.namespace.as_deref().map(str::to_string),
            addresses: {
                let mut a: Vec<String> = n.addresses.iter().map(IpAddr::to_string).collect();
                a.sort();
                a
            },
            names: n.names.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// The graph over `filter.window` (seconds up to `now_s`), filtered, the busiest
    /// `filter.top` edges. `to_unix_ms` turns the graph's seconds into Unix milliseconds.
    pub fn view(
        &self,
        filter: &ViewFilter,
        now_s: u64,
        sources: GraphSources,
        to_unix_ms: impl Fn(u64) -> u64,
    ) -> GraphView {
        let mut nodes: BTreeMap<u32, GraphNode> = BTreeMap::new();
        let keep_node = |id: u32, nodes: &mut BTreeMap<u32, GraphNode>| -> Option<bool> {
            if let Some(n) = nodes.get(&id) {
                return Some(!excluded(n, &filter.exclude));
            }
            let n = self.node_view(id)?;
            let keep = !excluded(&n, &filter.exclude);
            nodes.insert(id, n);
            Some(keep)
        };
        let mut edges: Vec<(GraphEdge, u32, u32)> = Vec::new();
        for (&(caller_id, callee_id, protocol, port), e) in &self.edges {
            let Some(b) = e.sum(now_s, filter.window.1) else {
                continue;
            };
            if !(keep_node(caller_id, &mut nodes).unwrap_or(false)
                && keep_node(callee_id, &mut nodes).unwrap_or(false))
            {
                continue;
            }
            if let Some(ns) = &filter.namespace {
                let in_ns = |id| nodes.get(&id).and_then(|n| n.namespace.as_ref()) == Some(ns);
                if !(in_ns(caller_id) || in_ns(callee_id)) {
                    continue;
                }
            }
            let (caller, callee) = (&nodes[&caller_id].id, &nodes[&callee_id].id);
            let mut processes: Vec<GraphProcess> = b
                .processes
                .iter()
                .map(|(exe, n)| GraphProcess {
                    exe: self.exes[exe as usize].to_string(),
                    connections: u64::from(n),
                })
                .collect();
            processes.sort_by(|a, b| b.connections.cmp(&a.connections).then(a.exe.cmp(&b.exe)));
            processes.truncate(GRAPH_NODE_LIST_CAP);
            let f = b.failures.map(u64::from);
            let protocol = protocol.name();
            edges.push((
                GraphEdge {
                    id: format!("{caller} -> {callee} {protocol}/{port}"),
                    caller: caller.clone(),
                    callee: callee.clone(),
                    protocol: protocol.to_string(),
                    port,
                    connections: b.connections,
                    bytes_sent: b.bytes_sent,
                    bytes_received: b.bytes_received,
                    rtt_p50_us: quantile(&b.rtt, 0.5),
                    rtt_p99_us: quantile(&b.rtt, 0.99),
                    failures: GraphFailures {
                        reset: f[0],
                        refused: f[1],
                        denied: f[2],
                        no_backend: f[3],
                    },
                    processes,
                    last_seen_unix_ms: to_unix_ms(e.last_seen_s),
                },
                caller_id,
                callee_id,
            ));
        }
        // The busiest first, then by id, for a stable cut.
        edges.sort_by(|a, b| {
            b.0.connections
                .cmp(&a.0.connections)
                .then_with(|| a.0.id.cmp(&b.0.id))
        });
        let omitted = edges.len().saturating_sub(filter.top) as u64;
        edges.truncate(filter.top);
        let used: BTreeSet<u32> = edges.iter().flat_map(|(_, a, b)| [*a, *b]).collect();
        let mut node_list: Vec<GraphNode> = nodes
            .into_iter()
            .filter(|(id, _)| used.contains(id))
            .map(|(_, n)| n)
            .collect();
        node_list.sort_by(|a, b| a.id.cmp(&b.id));
        let mut edge_list: Vec<GraphEdge> = edges.into_iter().map(|(e, _, _)| e).collect();
        edge_list.sort_by(|a, b| a.id.cmp(&b.id));
        GraphView {
            window: filter.window.0.clone(),
            window_seconds: filter.window.1,
            generated_unix_ms: to_unix_ms(now_s),
            sources,
            nodes: node_list,
            edges: edge_list,
            edges_omitted: omitted,
        }
    }
}

fn excluded(n: &GraphNode, exclude: &BTreeSet<String>) -> bool {
    !exclude.is_empty()
        && (exclude.contains(&n.id)
            || exclude.contains(&n.label)
            || n.addresses.iter().any(|a| exclude.contains(a))
            || n.names.iter().any(|a| exclude.contains(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(kind: GraphNodeKind, label: &str) -> NodeRef {
        NodeRef {
            kind,
            label: Label::from(label),
            namespace: None,
            address: None,
            vip: None,
            name: None,
        }
    }

    fn flow(caller: &str, callee: &str, now_s: u64) -> FlowRecord {
        FlowRecord {
            caller: node(GraphNodeKind::Process, caller),
            callee: node(GraphNodeKind::Service, callee),
            protocol: Transport::Tcp,
            port: 80,
            connections: 1,
            bytes_sent: 100,
            bytes_received: 1000,
            rtt_us: Some(250),
            failure: None,
            exe: Some(format!("/bin/{caller}").into()),
            now_s,
        }
    }

    fn view(g: &Graph, window: u64, now_s: u64) -> GraphView {
        let filter = ViewFilter {
            window: (format!("{window}s"), window),
            top: usize::MAX,
            ..Default::default()
        };
        g.view(&filter, now_s, GraphSources::default(), |s| s * 1000)
    }

    #[test]
    fn bins_are_exact_below_8_and_within_an_eighth_above() {
        for v in 0..8 {
            assert_eq!(value_of(bin_of(v)), v);
        }
        for v in [8u64, 9, 15, 16, 100, 1000, 12_345, 1 << 30, u64::MAX >> 2] {
            let back = value_of(bin_of(v));
            let err = back.abs_diff(v) as f64 / v as f64;
            assert!(err <= 0.125, "{v} -> {back}");
        }
        // Bins grow with the value.
        let bins: Vec<u16> = (0..5000).map(bin_of).collect();
        assert!(bins.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn an_edge_sums_its_flows_and_names_its_processes() {
        let mut g = Graph::new(100);
        for i in 0..10 {
            let mut f = flow("client", "frontend", 1000 + i);
            f.rtt_us = Some(100 * (i + 1));
            if i == 9 {
                f.failure = Some(Failure::Reset);
            }
            g.record(&f);
        }
        let mut other = flow("client", "frontend", 1005);
        other.exe = Some("/bin/curl".into());
        g.record(&other);
        let v = view(&g, 60, 1010);
        assert_eq!(v.nodes.len(), 2, "{v:#?}");
        assert_eq!(v.edges.len(), 1);
        let e = &v.edges[0];
        assert_eq!(e.id, "process:client -> service:frontend tcp/80");
        assert_eq!(e.connections, 11);
        assert_eq!((e.bytes_sent, e.bytes_received), (1100, 11_000));
        assert_eq!(e.failures.reset, 1);
        assert_eq!(
            e.processes,
            vec![
                GraphProcess {
                    exe: "/bin/client".into(),
                    connections: 10
                },
                GraphProcess {
                    exe: "/bin/curl".into(),
                    connections: 1
                }
            ]
        );
        // RTTs 100..=1000 (and 250 once): the median near 500, the 99th near 1000.
        let p50 = e.rtt_p50_us.unwrap();
        let p99 = e.rtt_p99_us.unwrap();
        assert!((440..=560).contains(&p50), "{p50}");
        assert!((900..=1100).contains(&p99), "{p99}");
        assert_eq!(e.last_seen_unix_ms, 1_009_000);
    }

    #[test]
    fn windows_see_only_their_span_and_old_buckets_fold_without_loss() {
        let mut g = Graph::new(100);
        // One connection a minute for an hour.
        for m in 0..60u64 {
            g.record(&flow("c", "s", 10_000 + m * 60));
            g.age(10_000 + m * 60);
        }
        // Windows count the 10-second buckets they overlap.
        let now = 10_000 + 59 * 60 + 15;
        g.age(now);
        let count = |w| view(&g, w, now).edges.first().map_or(0, |e| e.connections);
        assert_eq!(count(60), 1);
        assert_eq!(count(300), 5);
        assert_eq!(count(3600), 60);
        // An hour and more later, the edge and its nodes are gone.
        g.age(now + 3600 + COARSE_SECONDS);
        assert_eq!(g.edge_count(), 0);
        assert_eq!(g.node_count(), 0);
    }

    #[test]
    fn a_full_graph_forgets_its_idlest_edges_and_their_nodes() {
        let mut g = Graph::new(32);
        for i in 0..32u64 {
            g.record(&flow(&format!("c{i}"), "s", 100 + i));
        }
        assert_eq!(g.edge_count(), 32);
        g.record(&flow("newcomer", "s", 200));
        assert!(g.edge_count() <= 32);
        assert_eq!(g.evicted, 2, "a sixteenth of 32");
        let v = view(&g, 3600, 200);
        let ids: Vec<&str> = v.nodes.iter().map(|n| n.id.as_str()).collect();
        assert!(ids.contains(&"process:newcomer"), "{ids:?}");
        assert!(!ids.contains(&"process:c0") && !ids.contains(&"process:c1"));
        assert!(ids.contains(&"process:c2"));
        assert_eq!(g.node_count(), 32, "31 callers and the service");
    }

    #[test]
    fn filters_exclude_nodes_by_any_spelling_cut_to_the_top_and_keep_a_namespace() {
        let mut g = Graph::new(100);
        let mut f = flow("client", "frontend", 50);
        f.callee.namespace = Some("shop".into());
        f.callee.address = Some("198.18.100.11".parse().unwrap());
        f.callee.name = Some("frontend.svc.test".into());
        g.record(&f);
        g.record(&f);
        let dns = FlowRecord {
            callee: NodeRef {
                kind: GraphNodeKind::External,
                label: "198.18.0.2".into(),
                namespace: None,
                address: Some("198.18.0.2".parse().unwrap()),
                vip: None,
                name: None,
            },
            protocol: Transport::Udp,
            port: 53,
            ..flow("client", "x", 50)
        };
        g.record(&dns);
        let mut filter = ViewFilter {
            window: ("5m".into(), 300),
            top: usize::MAX,
            ..Default::default()
        };
        let src = GraphSources::default();
        assert_eq!(g.view(&filter, 55, src, |s| s).edges.len(), 2);
        for spelling in ["198.18.0.2", "external:198.18.0.2"] {
            filter.exclude = [spelling.to_string()].into();
            let v = g.view(&filter, 55, src, |s| s);
            assert_eq!(v.edges.len(), 1, "{spelling}");
            assert_eq!(v.nodes.len(), 2);
        }
        filter.exclude = ["frontend.svc.test".to_string()].into();
        assert_eq!(g.view(&filter, 55, src, |s| s).edges.len(), 1);
        filter.exclude.clear();
        filter.namespace = Some("shop".into());
        let v = g.view(&filter, 55, src, |s| s);
        assert_eq!(v.edges.len(), 1);
        assert_eq!(v.nodes[1].names, ["frontend.svc.test"]);
        filter.namespace = None;
        filter.top = 1;
        let v = g.view(&filter, 55, src, |s| s);
        assert_eq!((v.edges.len(), v.edges_omitted), (1, 1));
        assert_eq!(v.edges[0].connections, 2, "the busiest kept");
    }
}
