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
    net::IpAddr,
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

/// One end of a flow, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeRef {
    pub kind: GraphNodeKind,
    pub label: String,
    pub namespace: Option<String>,
    /// An address to list on the node (a backend, an endpoint: what the wire carried).
    pub address: Option<IpAddr>,
    /// A service's VIP, listed too (the socket LB leaves only the backend on the wire).
    pub vip: Option<IpAddr>,
    /// A DNS name the caller asked for it.
    pub name: Option<String>,
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
    pub protocol: &'static str,
    pub port: u16,
    /// 1 for a connection seen opening (or first seen at its end), 0 for a later report of it.
    pub connections: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rtt_us: Option<u64>,
    pub failure: Option<Failure>,
    pub exe: Option<String>,
    /// Seconds of the graph's clock (monotonic).
    pub now_s: u64,
}

/// Sparse log-scale histogram: (bin, count), sorted by bin.
#[derive(Clone, Debug, Default)]
struct Histogram(Vec<(u16, u32)>);

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

impl Histogram {
    fn add(&mut self, bin: u16, n: u32) {
        match self.0.binary_search_by_key(&bin, |(b, _)| *b) {
            Ok(i) => self.0[i].1 = self.0[i].1.saturating_add(n),
            Err(i) => self.0.insert(i, (bin, n)),
        }
    }
}

/// What an edge did in one interval.
#[derive(Clone, Debug, Default)]
struct Bucket {
    connections: u64,
    bytes_sent: u64,
    bytes_received: u64,
    failures: [u32; 4],
    rtt: Histogram,
    /// (process id in [`Graph::exes`], connections).
    processes: Vec<(u32, u32)>,
}

impl Bucket {
    fn merge(&mut self, other: &Bucket) {
        self.connections += other.connections;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        for (a, b) in self.failures.iter_mut().zip(other.failures) {
            *a = a.saturating_add(b);
        }
        for &(bin, n) in &other.rtt.0 {
            self.rtt.add(bin, n);
        }
        for &(exe, n) in &other.processes {
            self.add_process(exe, n);
        }
    }

    fn add_process(&mut self, exe: u32, n: u32) {
        if let Some(p) = self.processes.iter_mut().find(|(e, _)| *e == exe) {
            p.1 = p.1.saturating_add(n);
        } else if self.processes.len() < BUCKET_PROCESSES {
            self.processes.push((exe, n));
        }
    }
}

/// An edge's key: caller and callee node ids, protocol, port.
type EdgeKey = (u32, u32, &'static str, u16);

struct Edge {
    caller: u32,
    callee: u32,
    protocol: &'static str,
    port: u16,
    /// (start second, bucket), oldest first.
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

impl Edge {
    fn bucket(&mut self, now_s: u64) -> &mut Bucket {
        let start = now_s - now_s % FINE_SECONDS;
        if self.fine.last().is_none_or(|(s, _)| *s != start) {
            self.fine.push((start, Bucket::default()));
        }
        &mut self.fine.last_mut().expect("pushed").1
    }

    /// Folds fine buckets older than the fine span into coarse ones, drops buckets past the
    /// longest window; answers whether anything is left.
    fn age(&mut self, now_s: u64) -> bool {
        let fine_from = now_s.saturating_sub(FINE_SPAN);
        let keep = self
            .fine
            .partition_point(|(s, _)| *s + FINE_SECONDS <= fine_from);
        for (start, b) in self.fine.drain(..keep) {
            let cstart = start - start % COARSE_SECONDS;
            match self.coarse.last_mut() {
                Some((s, c)) if *s == cstart => c.merge(&b),
                _ => self.coarse.push((cstart, b)),
            }
        }
        let from = now_s.saturating_sub(LONGEST_WINDOW);
        let drop = self
            .coarse
            .partition_point(|(s, _)| *s + COARSE_SECONDS <= from);
        self.coarse.drain(..drop);
        !(self.fine.is_empty() && self.coarse.is_empty())
    }

    /// The sum of the buckets that overlap the last `window` seconds.
    fn sum(&self, now_s: u64, window: u64) -> Option<Bucket> {
        let from = now_s.saturating_sub(window);
        let mut total: Option<Bucket> = None;
        let fine = self.fine.iter().filter(|(s, _)| *s + FINE_SECONDS > from);
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
    label: String,
    namespace: Option<String>,
    addresses: BTreeSet<IpAddr>,
    names: BTreeSet<String>,
    /// Edges that use it.
    edges: u32,
}

/// The whole graph. See the module documentation.
pub struct Graph {
    max_edges: usize,
    nodes: FastMap<u32, Node>,
    /// Node ids by label, one map per kind.
    node_ids: [FastMap<String, u32>; 4],
    next_node: u32,
    edges: FastMap<EdgeKey, Edge>,
    /// Programs by id, and ids by program (never forgotten: a node's set is small).
    exes: Vec<String>,
    exe_ids: FastMap<String, u32>,
    pub evicted: u64,
}

/// What a view is asked for.
#[derive(Clone, Debug, Default)]
pub struct ViewFilter {
    pub window: (String, u64),
    pub namespace: Option<String>,
    pub exclude: BTreeSet<String>,
    pub top: usize,
}

fn quantile(hist: &Histogram, q: f64) -> Option<u64> {
    let total: u64 = hist.0.iter().map(|(_, n)| u64::from(*n)).sum();
    if total == 0 {
        return None;
    }
    // The smallest bin whose cumulative count reaches q of the total.
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for &(bin, n) in &hist.0 {
        seen += u64::from(n);
        if seen >= rank {
            return Some(value_of(bin));
        }
    }
    hist.0.last().map(|(b, _)| value_of(*b))
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
        }
    }

    pub fn edge_count(&self) -> usize {
        self.edges.len()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn node(&mut self, r: &NodeRef) -> u32 {
        // Looked up by reference: a flow of a known node allocates nothing here.
        let ids = &mut self.node_ids[kind_index(r.kind)];
        let id = match ids.get(r.label.as_str()) {
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
                        addresses: BTreeSet::new(),
                        names: BTreeSet::new(),
                        edges: 0,
                    },
                );
                id
            }
        };
        let node = self.nodes.get_mut(&id).expect("interned");
        for a in [r.vip, r.address].into_iter().flatten() {
            if node.addresses.len() < GRAPH_NODE_LIST_CAP {
                node.addresses.insert(a);
            }
        }
        if let Some(name) = &r.name
            && node.names.len() < GRAPH_NODE_LIST_CAP
            && !node.names.contains(name)
        {
            node.names.insert(name.clone());
        }
        id
    }

    fn exe_id(&mut self, exe: &str) -> u32 {
        if let Some(id) = self.exe_ids.get(exe) {
            return *id;
        }
        let id = self.exes.len() as u32;
        self.exes.push(exe.to_string());
        self.exe_ids.insert(exe.to_string(), id);
        id
    }

    /// Adds one resolved flow.
    pub fn record(&mut self, f: &FlowRecord) {
        let known = |r: &NodeRef| {
            self.node_ids[kind_index(r.kind)]
                .get(r.label.as_str())
                .copied()
        };
        let exists = match (known(&f.caller), known(&f.callee)) {
            (Some(a), Some(b)) => self.edges.contains_key(&(a, b, f.protocol, f.port)),
            _ => false,
        };
        // Room is made before the new edge's nodes exist, so no eviction takes them away.
        if !exists && self.edges.len() >= self.max_edges {
            self.evict();
        }
        let caller = self.node(&f.caller);
        let callee = self.node(&f.callee);
        let key = (caller, callee, f.protocol, f.port);
        if !exists {
            for id in [caller, callee] {
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.edges += 1;
                }
            }
            self.edges.insert(
                key,
                Edge {
                    caller,
                    callee,
                    protocol: f.protocol,
                    port: f.port,
                    fine: Vec::new(),
                    coarse: Vec::new(),
                    last_seen_s: f.now_s,
                    total: Totals::default(),
                },
            );
        }
        let exe = f.exe.as_deref().map(|e| self.exe_id(e));
        let edge = self.edges.get_mut(&key).expect("inserted");
        edge.last_seen_s = edge.last_seen_s.max(f.now_s);
        let t = &mut edge.total;
        t.connections += f.connections;
        t.bytes_sent += f.bytes_sent;
        t.bytes_received += f.bytes_received;
        t.failures += u64::from(f.failure.is_some());
        let b = edge.bucket(f.now_s);
        b.connections += f.connections;
        b.bytes_sent += f.bytes_sent;
        b.bytes_received += f.bytes_received;
        if let Some(rtt) = f.rtt_us {
            b.rtt.add(bin_of(rtt), 1);
        }
        if let Some(failure) = f.failure {
            let i = match failure {
                Failure::Reset => 0,
                Failure::Refused => 1,
                Failure::Denied => 2,
                Failure::NoBackend => 3,
            };
            b.failures[i] = b.failures[i].saturating_add(1);
        }
        if let Some(exe) = exe
            && f.connections > 0
        {
            b.add_process(exe, f.connections as u32);
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
        if let Some(e) = self.edges.remove(key) {
            for id in [e.caller, e.callee] {
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.edges = n.edges.saturating_sub(1);
                }
            }
            self.drop_unused_nodes_of(&[e.caller, e.callee]);
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

    /// Folds old buckets, forgets edges idle past the longest window.
    pub fn age(&mut self, now_s: u64) {
        let idle: Vec<_> = self
            .edges
            .iter_mut()
            .filter_map(|(k, e)| (!e.age(now_s)).then_some(*k))
            .collect();
        for key in idle {
            self.remove_edge(&key);
        }
    }

    /// The `n` edges with the most connections over the last 5 minutes (then by id), with
    /// their lifetime totals: a bounded set of label values for `/metrics`.
    pub fn metric_edges(&self, n: usize, now_s: u64) -> Vec<MetricEdge> {
        let id = |node: u32| {
            self.nodes
                .get(&node)
                .map(|n| format!("{}:{}", kind_name(n.kind), n.label))
                .unwrap_or_default()
        };
        let mut ranked: Vec<(u64, MetricEdge)> = self
            .edges
            .values()
            .filter_map(|e| {
                let recent = e.sum(now_s, FINE_SPAN)?.connections;
                Some((
                    recent,
                    MetricEdge {
                        caller: id(e.caller),
                        callee: id(e.callee),
                        protocol: e.protocol,
                        port: e.port,
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
        Some(GraphNode {
            id: format!("{}:{}", kind_name(n.kind), n.label),
            kind: n.kind,
            label: n.label.clone(),
            namespace: n.namespace.clone(),
            addresses: {
                let mut a: Vec<String> = n.addresses.iter().map(IpAddr::to_string).collect();
                a.sort();
                a
            },
            names: n.names.iter().cloned().collect(),
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
        for e in self.edges.values() {
            let Some(b) = e.sum(now_s, filter.window.1) else {
                continue;
            };
            if !(keep_node(e.caller, &mut nodes).unwrap_or(false)
                && keep_node(e.callee, &mut nodes).unwrap_or(false))
            {
                continue;
            }
            if let Some(ns) = &filter.namespace {
                let in_ns = |id| nodes.get(&id).and_then(|n| n.namespace.as_ref()) == Some(ns);
                if !(in_ns(e.caller) || in_ns(e.callee)) {
                    continue;
                }
            }
            let (caller, callee) = (&nodes[&e.caller].id, &nodes[&e.callee].id);
            let mut processes: Vec<GraphProcess> = b
                .processes
                .iter()
                .map(|(exe, n)| GraphProcess {
                    exe: self.exes[*exe as usize].clone(),
                    connections: u64::from(*n),
                })
                .collect();
            processes.sort_by(|a, b| b.connections.cmp(&a.connections).then(a.exe.cmp(&b.exe)));
            processes.truncate(GRAPH_NODE_LIST_CAP);
            let f = b.failures.map(u64::from);
            edges.push((
                GraphEdge {
                    id: format!("{caller} -> {callee} {}/{}", e.protocol, e.port),
                    caller: caller.clone(),
                    callee: callee.clone(),
                    protocol: e.protocol.to_string(),
                    port: e.port,
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
                e.caller,
                e.callee,
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
            label: label.into(),
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
            protocol: "tcp",
            port: 80,
            connections: 1,
            bytes_sent: 100,
            bytes_received: 1000,
            rtt_us: Some(250),
            failure: None,
            exe: Some(format!("/bin/{caller}")),
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
            protocol: "udp",
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
