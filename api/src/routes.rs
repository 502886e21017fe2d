//! Every route of the API: its path, method, path parameters, query, request body, success
//! status and answer, once as a type ([`Route`], one marker struct per route, for clients and
//! the daemon's router) and once as a table ([`ROUTES`], for listings and tests). Both come
//! from the one list in this file, so they cannot disagree.
//!
//! The paths use the `{name}` placeholders of the daemon's router (axum).

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    conntrack::{CtFilter, CtFlow, CtStats, FlushAnswer},
    dns::{DnsEntryView, DnsNamesQuery, DnsStatus},
    flows::{FlowEventView, FlowsQuery},
    graph::{GraphQuery, GraphStatus, GraphView},
    lb::{AddBackend, CreateService, ServiceView, StatsView, UpdateBackend},
    model::{BackendKey, ServiceKey},
    node::NodeView,
    policy::{ApplyPolicy, PolicyStatus},
    proc::{ProcEventView, ProcEventsQuery, ProcQuery, ProcRulesView, ProcStatus, ProcessView},
    socklb::SockLbStatus,
    sources::SourcesView,
    status::{Health, StatusView},
};

pub const HEALTHZ: &str = "/healthz";
pub const STATUS: &str = "/v1/status";
pub const SERVICES: &str = "/v1/services";
pub const SERVICE: &str = "/v1/services/{proto}/{vip}/{port}";
pub const BACKENDS: &str = "/v1/services/{proto}/{vip}/{port}/backends";
pub const BACKEND: &str = "/v1/services/{proto}/{vip}/{port}/backends/{addr}/{backend_port}";
pub const STATS: &str = "/v1/stats";
pub const POLICY: &str = "/v1/policy";
pub const CONNTRACK: &str = "/v1/conntrack";
pub const CONNTRACK_STATS: &str = "/v1/conntrack/stats";
pub const FLOWS: &str = "/v1/flows";
pub const NODE: &str = "/v1/node";
pub const SOURCES: &str = "/v1/sources";
pub const SOCKLB: &str = "/v1/socklb";
pub const DNS: &str = "/v1/dns";
pub const DNS_NAMES: &str = "/v1/dns/names";
pub const PROC: &str = "/v1/proc";
pub const PROC_STATUS: &str = "/v1/proc/status";
pub const PROC_RULES: &str = "/v1/proc/rules";
pub const PROC_EVENTS: &str = "/v1/proc/events";
pub const GRAPH: &str = "/v1/graph";
pub const GRAPH_STATUS: &str = "/v1/graph/status";

/// The HTTP methods the API uses (every `GET` route also answers `HEAD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// How a successful answer's body is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// One JSON value, the route's answer.
    Json,
    /// A stream of JSON lines ([`crate::NDJSON_CONTENT_TYPE`]), one answer a line, until the
    /// daemon ends it.
    NdJson,
}

/// A request body type. Routes without a body take [`NoBody`].
pub trait Body: Serialize + DeserializeOwned {
    /// False for [`NoBody`]: the request is sent with an empty body.
    const PRESENT: bool = true;
}

/// The request body of a route that takes none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoBody;

impl Body for NoBody {
    const PRESENT: bool = false;
}
impl Body for CreateService {}
impl Body for AddBackend {}
impl Body for UpdateBackend {}
impl Body for ApplyPolicy {}

/// A query type: what follows the path.
pub trait Query {
    /// `?name=value&...`, or `""` when there is nothing to say.
    fn to_query(&self) -> String;
}

/// The query of a route that takes none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoQuery;

impl Query for NoQuery {
    fn to_query(&self) -> String {
        String::new()
    }
}

/// The query of a change to a service: `force=true` changes one another source (the services
/// file, Kubernetes) owns, which is refused (409 `owned_by_other_source`) otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeQuery {
    #[serde(default)]
    pub force: bool,
}

impl Query for ChangeQuery {
    fn to_query(&self) -> String {
        if self.force {
            "?force=true".into()
        } else {
            String::new()
        }
    }
}

impl Query for CtFilter {
    fn to_query(&self) -> String {
        CtFilter::to_query(self)
    }
}

impl Query for ProcQuery {
    fn to_query(&self) -> String {
        ProcQuery::to_query(self)
    }
}

impl Query for GraphQuery {
    fn to_query(&self) -> String {
        GraphQuery::to_query(self)
    }
}

impl Query for ProcEventsQuery {
    fn to_query(&self) -> String {
        ProcEventsQuery::to_query(self)
    }
}

impl Query for DnsNamesQuery {
    fn to_query(&self) -> String {
        DnsNamesQuery::to_query(self)
    }
}

impl Query for FlowsQuery {
    fn to_query(&self) -> String {
        FlowsQuery::to_query(self)
    }
}

/// What fills a route's path placeholders.
pub trait PathParams {
    fn fill(&self, template: &str) -> String;
}

/// No placeholder.
impl PathParams for () {
    fn fill(&self, template: &str) -> String {
        template.to_owned()
    }
}

/// `{proto}/{vip}/{port}`. `IpAddr`'s `Display` writes IPv6 without brackets, as paths want.
impl PathParams for ServiceKey {
    fn fill(&self, template: &str) -> String {
        template
            .replace("{proto}", &self.proto.to_string())
            .replace("{vip}", &self.vip.to_string())
            .replace("{port}", &self.port.to_string())
    }
}

/// A service's placeholders, then `{addr}/{backend_port}`.
impl PathParams for (ServiceKey, BackendKey) {
    fn fill(&self, template: &str) -> String {
        self.0
            .fill(template)
            .replace("{addr}", &self.1.addr.to_string())
            .replace("{backend_port}", &self.1.port.to_string())
    }
}

/// One route of the API, as a type.
pub trait Route {
    /// The marker's name (`GetPolicy`).
    const NAME: &'static str;
    const METHOD: Method;
    /// The path with its `{placeholders}`.
    const PATH: &'static str;
    /// The status of a successful answer.
    const STATUS: u16;
    const ENCODING: Encoding;
    type Params: PathParams;
    type Query: Query;
    type Request: Body;
    /// The answer (for [`Encoding::NdJson`], the type of one line).
    type Answer: Serialize + DeserializeOwned;

    /// The request target: the path filled in, then the query.
    fn uri(params: &Self::Params, query: &Self::Query) -> String {
        params.fill(Self::PATH) + &query.to_query()
    }
}

/// One route of the API, as a row of [`ROUTES`]; the types by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    pub name: &'static str,
    pub method: Method,
    pub path: &'static str,
    pub query: &'static str,
    pub request: &'static str,
    pub status: u16,
    pub answer: &'static str,
    pub encoding: Encoding,
}

macro_rules! routes {
    ($(
        $(#[$doc:meta])*
        $name:ident: $method:ident $path:ident, params $params:ty, query $query:ty,
            body $request:ty => $status:literal $answer:ty, $encoding:ident;
    )*) => {
        $(
            $(#[$doc])*
            #[derive(Clone, Copy, Debug)]
            pub struct $name;

            impl Route for $name {
                const NAME: &'static str = stringify!($name);
                const METHOD: Method = Method::$method;
                const PATH: &'static str = $path;
                const STATUS: u16 = $status;
                const ENCODING: Encoding = Encoding::$encoding;
                type Params = $params;
                type Query = $query;
                type Request = $request;
                type Answer = $answer;
            }
        )*

        /// Every route, in the order of docs/api.md's table.
        pub const ROUTES: &[RouteInfo] = &[$(
            RouteInfo {
                name: stringify!($name),
                method: Method::$method,
                path: $path,
                query: stringify!($query),
                request: stringify!($request),
                status: $status,
                answer: stringify!($answer),
                encoding: Encoding::$encoding,
            },
        )*];
    };
}

routes! {
    /// Whether the API serves: `{"status":"ok"}`.
    GetHealth: Get HEALTHZ, params (), query NoQuery, body NoBody => 200 Health, Json;
    /// What runs, what does not and why.
    GetStatus: Get STATUS, params (), query NoQuery, body NoBody => 200 StatusView, Json;
    /// Every service, in key order.
    ListServices: Get SERVICES, params (), query NoQuery, body NoBody
        => 200 Vec<ServiceView>, Json;
    PostService: Post SERVICES, params (), query NoQuery, body CreateService
        => 201 ServiceView, Json;
    GetService: Get SERVICE, params ServiceKey, query NoQuery, body NoBody
        => 200 ServiceView, Json;
    /// Answers the service as it was before its removal.
    DeleteService: Delete SERVICE, params ServiceKey, query ChangeQuery, body NoBody
        => 200 ServiceView, Json;
    PostBackend: Post BACKENDS, params ServiceKey, query ChangeQuery, body AddBackend
        => 201 ServiceView, Json;
    PatchBackend: Patch BACKEND, params (ServiceKey, BackendKey), query ChangeQuery,
        body UpdateBackend => 200 ServiceView, Json;
    DeleteBackend: Delete BACKEND, params (ServiceKey, BackendKey), query ChangeQuery,
        body NoBody => 200 ServiceView, Json;
    /// What each service source (the services file, Kubernetes) last did.
    GetSources: Get SOURCES, params (), query NoQuery, body NoBody => 200 SourcesView, Json;
    /// The socket load balancer: attachment, outcomes, decisions per service, recent ones.
    GetSockLb: Get SOCKLB, params (), query NoQuery, body NoBody => 200 SockLbStatus, Json;
    /// The DNS module: capture counters, parse errors by reason, the store's figures.
    GetDns: Get DNS, params (), query NoQuery, body NoBody => 200 DnsStatus, Json;
    /// Learned names, by address then client.
    ListDnsNames: Get DNS_NAMES, params (), query DnsNamesQuery, body NoBody
        => 200 Vec<DnsEntryView>, Json;
    /// Processes of the exec module's cache, by pid.
    ListProcesses: Get PROC, params (), query ProcQuery, body NoBody
        => 200 Vec<ProcessView>, Json;
    /// The exec module: tracer counters and the cache's figures.
    GetProcStatus: Get PROC_STATUS, params (), query NoQuery, body NoBody
        => 200 ProcStatus, Json;
    /// The exec module's enforcement: mode, cgroups, rules and their matches.
    GetProcRules: Get PROC_RULES, params (), query NoQuery, body NoBody
        => 200 ProcRulesView, Json;
    /// Exec, fork, exit and connect events as they happen, one a line; `follow` must be true.
    FollowProc: Get PROC_EVENTS, params (), query ProcEventsQuery, body NoBody
        => 200 ProcEventView, NdJson;
    /// The service dependency graph over a window (DOT: `GraphView::to_dot`).
    GetGraph: Get GRAPH, params (), query GraphQuery, body NoBody => 200 GraphView, Json;
    /// The graph controller: events taken, lost, edges held and evicted.
    GetGraphStatus: Get GRAPH_STATUS, params (), query NoQuery, body NoBody
        => 200 GraphStatus, Json;
    /// Interfaces, addresses, neighbours and routes as the netlink controller learned them.
    GetNode: Get NODE, params (), query NoQuery, body NoBody => 200 NodeView, Json;
    GetStats: Get STATS, params (), query NoQuery, body NoBody => 200 StatsView, Json;
    GetPolicy: Get POLICY, params (), query NoQuery, body NoBody => 200 PolicyStatus, Json;
    PutPolicy: Put POLICY, params (), query NoQuery, body ApplyPolicy => 200 PolicyStatus, Json;
    DeletePolicy: Delete POLICY, params (), query NoQuery, body NoBody
        => 200 PolicyStatus, Json;
    ListConntrack: Get CONNTRACK, params (), query CtFilter, body NoBody
        => 200 Vec<CtFlow>, Json;
    FlushConntrack: Delete CONNTRACK, params (), query CtFilter, body NoBody
        => 200 FlushAnswer, Json;
    GetConntrackStats: Get CONNTRACK_STATS, params (), query NoQuery, body NoBody
        => 200 CtStats, Json;
    /// The recent events (at most [`crate::RECENT_FLOW_EVENTS`], oldest first). Takes a
    /// [`FlowsQuery`] without `follow`, whose other fields it ignores.
    GetFlows: Get FLOWS, params (), query FlowsQuery, body NoBody
        => 200 Vec<FlowEventView>, Json;
    /// The events as they happen, one a line; `follow` must be true
    /// ([`FlowsQuery::follow`]).
    FollowFlows: Get FLOWS, params (), query FlowsQuery, body NoBody
        => 200 FlowEventView, NdJson;
}

/// `?a=1&b=2` of the pairs that have a value, values percent-encoded; `""` when none has.
pub(crate) fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Percent-encodes all but RFC 3986's unreserved characters, so that a value holding `&`, `=`
/// or a space stays one value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
