//! The service dependency graph (`GET /v1/graph`, `lb-ctl graph`): who calls whom on this node,
//! joined from the flow events, the names learned from DNS, the processes of the exec module
//! and the services of the service store.

use serde::{Deserialize, Serialize};

use crate::routes::query_string;

/// The windows a graph can be asked over.
pub const GRAPH_WINDOWS: [(&str, u64); 3] = [("1m", 60), ("5m", 300), ("1h", 3600)];
/// The window when none is asked.
pub const DEFAULT_GRAPH_WINDOW: &str = "5m";

/// Query of `GET /v1/graph`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphQuery {
    /// `1m`, `5m` (the default) or `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Only edges with an end in this Kubernetes namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Comma-separated: leave out every node whose id, label, address or name is one of these
    /// (and its edges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude: Option<String>,
    /// At most this many edges, the busiest first (default and cap: `graph.max_edges`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top: Option<usize>,
}

impl GraphQuery {
    pub fn to_query(&self) -> String {
        query_string(&[
            ("window", self.window.clone()),
            ("namespace", self.namespace.clone()),
            ("exclude", self.exclude.clone()),
            ("top", self.top.map(|t| t.to_string())),
        ])
    }
}

/// What a node stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraphNodeKind {
    /// A service of the store (a Kubernetes namespace/name, a file entry, or a VIP), with the
    /// addresses of its VIPs and backends.
    Service,
    /// A pod, from the cgroup of the process that made the connection.
    Workload,
    /// A program, when the caller is neither a service's backend nor a pod.
    Process,
    /// Anything else: a DNS name the caller asked for, else an address.
    External,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphNode {
    /// `<kind>:<label>`, unique in the graph.
    pub id: String,
    pub kind: GraphNodeKind,
    pub label: String,
    /// The Kubernetes namespace, for services from Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Addresses seen for it (VIPs and backends of a service; the address of an external
    /// endpoint), sorted, at most [`GRAPH_NODE_LIST_CAP`].
    pub addresses: Vec<String>,
    /// DNS names callers asked for it, sorted, at most [`GRAPH_NODE_LIST_CAP`].
    pub names: Vec<String>,
}

/// Most addresses, names or processes a node or an edge lists.
pub const GRAPH_NODE_LIST_CAP: usize = 16;

/// Failed connections of an edge, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphFailures {
    /// Reset after the handshake.
    pub reset: u64,
    /// Answered by a reset to the SYN (nothing listening).
    pub refused: u64,
    /// Denied by the policy (or cut by a policy change).
    pub denied: u64,
    /// Asked for a service that had no backend to give.
    pub no_backend: u64,
}

/// A program that made connections of an edge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphProcess {
    pub exe: String,
    pub connections: u64,
}

/// One edge: connections from `caller` to `callee` on one protocol and port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphEdge {
    /// `<caller> -> <callee> <protocol>/<port>`.
    pub id: String,
    pub caller: String,
    pub callee: String,
    pub protocol: String,
    /// The service port for a service, else the destination port.
    pub port: u16,
    /// Connections opened in the window.
    pub connections: u64,
    /// Bytes from caller to callee, of the connections that ended (or were swept) in the window.
    pub bytes_sent: u64,
    /// Bytes from callee to caller, likewise.
    pub bytes_received: u64,
    /// Handshake round-trip time, median and 99th percentile, in microseconds (`None`: no TCP
    /// handshake measured in the window). From a log-scale histogram: within 1/8 of the value.
    pub rtt_p50_us: Option<u64>,
    pub rtt_p99_us: Option<u64>,
    pub failures: GraphFailures,
    /// Programs that made these connections, the busiest first, at most
    /// [`GRAPH_NODE_LIST_CAP`].
    pub processes: Vec<GraphProcess>,
    /// Unix time of the last event of the edge, in milliseconds.
    pub last_seen_unix_ms: u64,
}

/// Which sources fed the graph when it was answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphSources {
    /// The dns module's names.
    pub names: bool,
    /// The exec module's processes.
    pub processes: bool,
    /// The service store.
    pub services: bool,
}

/// `GET /v1/graph`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphView {
    pub window: String,
    pub window_seconds: u64,
    /// Unix time of the answer, in milliseconds.
    pub generated_unix_ms: u64,
    pub sources: GraphSources,
    /// Sorted by id.
    pub nodes: Vec<GraphNode>,
    /// Sorted by id.
    pub edges: Vec<GraphEdge>,
    /// Edges of the window left out by `top` (the filters' are not counted).
    pub edges_omitted: u64,
}

/// `GET /v1/graph/status`: the graph controller's own figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphStatus {
    /// Flow events taken from the bus.
    pub events: u64,
    /// Flow events the graph fell behind on (its bus buffer was full).
    pub events_lost: u64,
    /// Edges held (over the longest window).
    pub edges: u64,
    /// Edges forgotten because `graph.max_edges` was reached (the idlest first).
    pub edges_evicted: u64,
    /// Open connections remembered, to count each once from open to close.
    pub open_flows: u64,
    /// Where the web view listens, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_listen: Option<String>,
}

/// A DOT string literal: quotes and backslashes escaped, control characters dropped.
fn dot_quote(s: &str) -> String {
    format!("\"{}\"", dot_escape(s))
}

/// The inside of a DOT string literal (see [`dot_quote`]).
fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

impl GraphView {
    /// The graph in Graphviz's DOT: one node statement per node (shape by kind), one edge
    /// statement per edge, labelled with its port, connections and failures.
    pub fn to_dot(&self) -> String {
        let mut out =
            String::from("digraph datapath {\n  rankdir=LR;\n  node [fontname=\"sans-serif\"];\n");
        for n in &self.nodes {
            let shape = match n.kind {
                GraphNodeKind::Service => "box",
                GraphNodeKind::Workload => "component",
                GraphNodeKind::Process => "ellipse",
                GraphNodeKind::External => "diamond",
            };
            // The first DNS name on a line of its own (DOT's `\n` escape).
            let label = match n.names.first() {
                Some(name) if name != &n.label => {
                    format!("\"{}\\n{}\"", dot_escape(&n.label), dot_escape(name))
                }
                _ => dot_quote(&n.label),
            };
            out.push_str(&format!(
                "  {} [label={label}, shape={shape}];\n",
                dot_quote(&n.id),
            ));
        }
        for e in &self.edges {
            let f = &e.failures;
            let failed = f.reset + f.refused + f.denied + f.no_backend;
            let mut label = format!("{}/{} ×{}", e.protocol, e.port, e.connections);
            if failed > 0 {
                label.push_str(&format!(" ✗{failed}"));
            }
            out.push_str(&format!(
                "  {} -> {} [label={}{}];\n",
                dot_quote(&e.caller),
                dot_quote(&e.callee),
                dot_quote(&label),
                if failed > 0 { ", color=red" } else { "" }
            ));
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_quotes_escapes_and_puts_the_name_on_its_own_line() {
        let node = |id: &str, label: &str, names: &[&str]| GraphNode {
            id: id.into(),
            kind: GraphNodeKind::Service,
            label: label.into(),
            namespace: None,
            addresses: vec![],
            names: names.iter().map(|n| n.to_string()).collect(),
        };
        let g = GraphView {
            window: "5m".into(),
            window_seconds: 300,
            generated_unix_ms: 0,
            sources: GraphSources::default(),
            nodes: vec![
                node("service:a\"b", "a\"b\\", &["a.test"]),
                node("service:c", "c", &["c"]),
            ],
            edges: vec![],
            edges_omitted: 0,
        };
        let dot = g.to_dot();
        assert!(
            dot.contains(r#""service:a\"b" [label="a\"b\\\na.test", shape=box];"#),
            "{dot}"
        );
        assert!(
            dot.contains(r#""service:c" [label="c", shape=box];"#),
            "{dot}"
        );
    }
}
