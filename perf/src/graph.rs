//! `dp-bench --only graph`: what the service dependency graph costs (issue 17).
//!
//! The traffic, synthetic: a catalog of [`SERVICES`] services (a VIP and [`BACKENDS`] backends
//! each) and [`CLIENTS`] client addresses, each reaching [`PER_CLIENT`] services at their
//! backends (as the socket LB leaves them on the wire): [`EDGES`] edges, the default
//! `graph.max_edges`, which is reached but never passed, so nothing is evicted. Every flow is
//! one `opened` event, then one `closed` event with its bytes and RTT. Flows open 1 ms apart
//! on the graph's clock. Half end 100 ms later, before they are counted. The other half end
//! 30 s later: they are counted at settling and their bytes added at the end.
//!
//! - **Cost per flow event, one core**: the controller's own path, `GraphController::take_batch`
//!   for every [`WAKE_BATCH`] events (what its run loop does with one wake-up's events, the
//!   clock read once) and `settle` every [`SETTLE_EVERY`] events with the clock of the last one
//!   (what its tick does). Nanoseconds per event are the time spent in those calls (this
//!   thread's CPU time; the wall clock's too) divided by the events, for a fresh controller
//!   each round. Two rows, interleaved: services only (no names, no owners), and with names
//!   and owners on. For the second, the lookups are [`Names`] and [`Owners`], maps behind a
//!   mutex as the dns and exec modules' handles are, so the join's cost (the lookups and the
//!   clones of what they answer) is counted.
//! - **Memory at 10,000 edges**: heap bytes (glibc's `mallinfo2`) of a controller fed flows
//!   that make exactly [`EDGES`] edges, each edge with a flow in each of [`MEMORY_BUCKETS`]
//!   consecutive 10-second buckets, minus the heap before it was made. This is the whole
//!   controller: the graph, its index of the catalog, and the tuples of ended flows it
//!   remembers so that a late `expired` is not counted twice. The graph alone (a
//!   `graph::model::Graph` fed the same flows through the controller's resolver) is measured
//!   apart, and bytes per edge are given from it. The controller's heap at the end of each
//!   round of the cost is given too: its edges active over the whole round, and as many
//!   ended flows remembered as it keeps.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use datapath::{
    bus::{Bus, StateWriter},
    config::Settings,
    controller::Controller as _,
    ct::FlowEventView,
    dns::{NAMES, NameHandle, NameLookup},
    exec::{
        FlowOwnerLookup, OWNERS, OwnerHandle,
        owners::{Owner, Owners as OwnerTable},
    },
    graph::{GraphController, SETTLE, model::Graph, resolve::Resolver},
    lb::{CatalogEntry, SERVICE_CATALOG, ServiceCatalog},
};
use datapath_api::{GraphQuery, Protocol, ServiceKey, ServiceSource};
use serde::Serialize;

use crate::report::Summary;

pub const SERVICES: u32 = 1_000;
pub const BACKENDS: u32 = 4;
pub const CLIENTS: u32 = 2_000;
pub const PER_CLIENT: u32 = 5;
pub const EDGES: usize = (CLIENTS * PER_CLIENT) as usize;
/// Events between two calls of `settle`.
pub const SETTLE_EVERY: usize = 10_000;
/// Events the controller takes per wake-up of its run loop, at most (the bench gives it full
/// batches: the busy case).
const WAKE_BATCH: usize = datapath::graph::BATCH;
/// 10-second buckets each edge has a flow in, for the memory figures.
pub const MEMORY_BUCKETS: u32 = 6;
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// Graph clock between two flows' openings, and how long the short and long flows last.
const OPEN_EVERY_US: u64 = 1_000;
const SHORT_US: u64 = 100_000;
const LONG_US: u64 = 30_000_000;
/// What every flow's `closed` event carries.
const BYTES_SENT: u64 = 800;
const BYTES_RECEIVED: u64 = 16_000;

#[derive(Debug, Serialize)]
pub struct GraphReport {
    pub services: u32,
    pub clients: u32,
    pub edges: usize,
    pub flows_per_round: u32,
    pub events_per_round: u64,
    /// Nanoseconds per flow event, one core (this thread's CPU time), per round.
    pub ns_per_event_services: Summary,
    pub ns_per_event_joined: Summary,
    /// The same by the wall clock.
    pub wall_ns_per_event_services: Summary,
    pub wall_ns_per_event_joined: Summary,
    /// Edges forgotten for `graph.max_edges` over all rounds (none: the graph holds exactly
    /// `max_edges`).
    pub evicted: u64,
    /// Heap bytes of the controller at the end of a round of the cost per event: its edges
    /// active over the whole round, its remembered ended flows at their cap.
    pub round_heap_services: Summary,
    pub round_heap_joined: Summary,
    pub memory_flows: u32,
    /// Heap bytes of the whole controller, and of the graph alone, at [`EDGES`] edges.
    pub memory_controller_services: f64,
    pub memory_graph_services: f64,
    pub memory_controller_joined: f64,
    pub memory_graph_joined: f64,
}

fn client(c: u32) -> IpAddr {
    Ipv4Addr::from(0x0a01_0000 + c + 1).into() // 10.1.0.0/16
}

fn vip(s: u32) -> IpAddr {
    Ipv4Addr::from(0x0a60_0000 + s + 1).into() // 10.96.0.0/16
}

fn backend(s: u32, b: u32) -> IpAddr {
    Ipv4Addr::from(0x0af4_0000 + s * BACKENDS + b + 1).into() // 10.244.0.0/16
}

/// Flow `i`: client `i % CLIENTS`, the next of its services, then the next backend and
/// source port. Distinct tuples for every `i`; flows `0..EDGES` make every edge once.
#[derive(Clone, Copy)]
struct Flow {
    client: u32,
    service: u32,
    backend: u32,
    sport: u16,
}

fn flow(i: u32) -> Flow {
    let c = i % CLIENTS;
    let rest = i / CLIENTS;
    let k = rest / PER_CLIENT;
    Flow {
        client: c,
        service: (c * PER_CLIENT + rest % PER_CLIENT) % SERVICES,
        backend: k % BACKENDS,
        sport: 1024 + (k % 64_000) as u16,
    }
}

fn catalog() -> ServiceCatalog {
    (0..SERVICES)
        .map(|s| CatalogEntry {
            key: ServiceKey {
                vip: vip(s),
                port: SERVICE_PORT,
                proto: Protocol::Tcp,
            },
            source: ServiceSource::Kubernetes,
            owner: Some(format!("bench/svc-{s}")),
            backends: (0..BACKENDS)
                .map(|b| SocketAddr::new(backend(s, b), BACKEND_PORT))
                .collect(),
        })
        .collect()
}

/// The names the clients asked for the VIPs, by (client, address), else any client's name
/// for the address, as the name store answers. Behind a mutex, as the dns module's handle.
struct Names(Mutex<NameTables>);

struct NameTables {
    by_client: HashMap<(IpAddr, IpAddr), Arc<str>>,
    any: HashMap<IpAddr, Arc<str>>,
}

impl NameLookup for Names {
    fn name_of(&self, client: IpAddr, addr: IpAddr) -> Option<Arc<str>> {
        let names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        names
            .by_client
            .get(&(client, addr))
            .or_else(|| names.any.get(&addr))
            .cloned()
    }
}

/// Who opened each flow's connection, by tuple: a pod per client and one of ten programs.
/// The exec module's own table (`datapath::exec::owners::Owners`, which shares each program's
/// strings between its connections) behind a mutex, and cloned out, as the module's handle
/// does.
struct Owners(Mutex<OwnerTable>);

impl FlowOwnerLookup for Owners {
    fn owner_of(&self, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Option<Owner> {
        let owners = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        owners.owner_of(&(src, sport, dst, dport)).cloned()
    }
}

/// The names and owners of the first `flows` flows.
fn modules(flows: u32) -> (Arc<Names>, Arc<Owners>) {
    let mut by_client = HashMap::new();
    let mut any = HashMap::new();
    for i in 0..EDGES as u32 {
        let f = flow(i);
        let name: Arc<str> = format!("svc-{}.bench.svc.cluster.local", f.service).into();
        any.insert(vip(f.service), name.clone());
        by_client.insert((client(f.client), vip(f.service)), name);
    }
    let mut owners = OwnerTable::new(flows as usize);
    for i in 0..flows {
        let f = flow(i);
        let tuple = (
            client(f.client),
            f.sport,
            backend(f.service, f.backend),
            BACKEND_PORT,
        );
        let app = f.client % 10;
        // Each connection's strings made apart, as the exec module makes them from its
        // connect event; the table shares them.
        owners.learn(
            tuple,
            Owner {
                pid: 10_000 + f.client,
                start_ticks: 1_000 + u64::from(f.client),
                exe: format!("/usr/bin/app-{app}").into(),
                comm: format!("app-{app}").into(),
                pod_uid: Some(format!("{:08x}-5f2c-4e1a-9b7d-{:012x}", f.client, f.client).into()),
            },
        );
    }
    (
        Arc::new(Names(Mutex::new(NameTables { by_client, any }))),
        Arc::new(Owners(Mutex::new(owners))),
    )
}

/// The writers of what the controller reads, kept alive while it runs.
struct Writers {
    _catalog: StateWriter<ServiceCatalog>,
    _names: Option<StateWriter<NameHandle>>,
    _owners: Option<StateWriter<OwnerHandle>>,
}

/// The catalog published on `bus`, and names and owners when given.
fn publish(bus: &Bus, joined: Option<&(Arc<Names>, Arc<Owners>)>) -> Result<Writers> {
    let catalog = bus.state::<ServiceCatalog>(SERVICE_CATALOG)?.writer()?;
    catalog.publish(self::catalog());
    let (mut names, mut owners) = (None, None);
    if let Some((n, o)) = joined {
        let w = bus.state::<NameHandle>(NAMES)?.writer()?;
        w.publish(Some(Arc::clone(n) as Arc<dyn NameLookup>));
        names = Some(w);
        let w = bus.state::<OwnerHandle>(OWNERS)?.writer()?;
        w.publish(Some(Arc::clone(o) as Arc<dyn FlowOwnerLookup>));
        owners = Some(w);
    }
    Ok(Writers {
        _catalog: catalog,
        _names: names,
        _owners: owners,
    })
}

/// The events of `flows` flows in the order of the graph's clock: (microseconds from the
/// start, closed, flow).
fn schedule(flows: u32) -> Vec<(u64, bool, u32)> {
    let mut events: Vec<(u64, bool, u32)> = (0..flows)
        .flat_map(|i| {
            let opened = u64::from(i) * OPEN_EVERY_US;
            let life = if i % 2 == 0 { SHORT_US } else { LONG_US };
            [(opened, false, i), (opened + life, true, i)]
        })
        .collect();
    events.sort_unstable();
    events
}

/// The flow event of `i` (as the conntrack would publish it).
fn event(i: u32, closed: bool, at_ms: u64, addrs: &Addresses) -> Arc<FlowEventView> {
    let f = flow(i);
    let rtt_ns = (100 + u64::from(i * 37 % 1_900)) * 1000;
    Arc::new(FlowEventView {
        kind: if closed { "closed" } else { "opened" }.into(),
        ts_ns: at_ms * 1_000_000,
        protocol: "tcp".into(),
        src: addrs.clients[f.client as usize].clone(),
        src_port: f.sport,
        dst: addrs.backends[(f.service * BACKENDS + f.backend) as usize].clone(),
        dst_port: BACKEND_PORT,
        interface: "eth0".into(),
        direction: "egress".into(),
        rule: None,
        rule_name: None,
        state: if closed { "TIME_WAIT" } else { "ESTABLISHED" }.into(),
        packets_orig: if closed { 12 } else { 2 },
        packets_reply: if closed { 14 } else { 1 },
        bytes_orig: if closed { BYTES_SENT } else { 120 },
        bytes_reply: if closed { BYTES_RECEIVED } else { 60 },
        duration_ns: if closed { 1_000_000 } else { 0 },
        rtt_ns,
        dst_name: None,
        src_name: None,
        pid: None,
        exe: None,
    })
}

/// The addresses as the events spell them.
struct Addresses {
    clients: Vec<String>,
    backends: Vec<String>,
}

impl Addresses {
    fn new() -> Self {
        Self {
            clients: (0..CLIENTS).map(|c| client(c).to_string()).collect(),
            backends: (0..SERVICES)
                .flat_map(|s| (0..BACKENDS).map(move |b| backend(s, b).to_string()))
                .collect(),
        }
    }
}

/// A started controller on `bus`, in the default settings.
fn started(bus: &Bus) -> Result<Arc<GraphController>> {
    let settings = Settings::default();
    ensure!(
        settings.graph.max_edges == EDGES,
        "graph.max_edges is {}, the bench is built for {EDGES}",
        settings.graph.max_edges
    );
    let ctl = GraphController::new(&settings, bus)?;
    ctl.start(&settings, None)?;
    Ok(ctl)
}

/// CPU time of this thread: what the graph costs its core, whatever else the shared machine
/// runs meanwhile (wall time is kept too, and printed).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Time spent in the controller: on this thread's CPU, and by the wall clock.
#[derive(Clone, Copy, Default)]
struct Spent {
    cpu: Duration,
    wall: Duration,
}

impl Spent {
    fn time(&mut self, f: impl FnOnce()) {
        let (cpu, wall) = (thread_cpu(), Instant::now());
        f();
        self.wall += wall.elapsed();
        self.cpu += thread_cpu().saturating_sub(cpu);
    }
}

/// Feeds `schedule` to `ctl` from `base_ms` on, settling every [`SETTLE_EVERY`] events and
/// once more at the end; answers the time spent in `take` and `settle`.
fn feed(
    ctl: &GraphController,
    schedule: &[(u64, bool, u32)],
    base_ms: u64,
    addrs: &Addresses,
) -> Spent {
    let mut spent = Spent::default();
    let mut now = base_ms;
    let mut events: Vec<Arc<FlowEventView>> = Vec::with_capacity(SETTLE_EVERY);
    let mut times: Vec<u64> = Vec::with_capacity(SETTLE_EVERY);
    for chunk in schedule.chunks(SETTLE_EVERY) {
        // Made outside the timed part: the conntrack's decoding, not the graph's.
        events.clear();
        times.clear();
        for &(t_us, closed, i) in chunk {
            let at = base_ms + t_us / 1000;
            events.push(event(i, closed, at, addrs));
            times.push(at);
        }
        now = times.last().copied().unwrap_or(now);
        spent.time(|| {
            // As the controller takes the events of one wake-up: up to its batch, with the
            // clock read once (here the last event's time).
            for (batch, at) in events.chunks(WAKE_BATCH).zip(times.chunks(WAKE_BATCH)) {
                ctl.take_batch(batch, at[at.len() - 1]);
            }
            ctl.settle(now);
        });
    }
    events.clear();
    // The flows that ended last are counted at the next tick.
    spent.time(|| ctl.settle(now + SETTLE.as_millis() as u64));
    spent
}

/// What a fed controller must hold: every edge, every flow counted once with its bytes, and
/// the ends named as the modules allow. Answers the edges evicted.
fn check(ctl: &GraphController, flows: u32, joined: bool) -> Result<u64> {
    let st = ctl.status();
    ensure!(
        st.events == 2 * u64::from(flows),
        "{} events taken of {}",
        st.events,
        2 * flows
    );
    let expected_edges = EDGES.min(flows as usize) as u64;
    ensure!(
        st.edges == expected_edges && st.open_flows == 0,
        "{} edges (expected {expected_edges}), {} flows still open",
        st.edges,
        st.open_flows
    );
    let view = ctl.view(&GraphQuery {
        window: Some("1h".into()),
        ..GraphQuery::default()
    })?;
    let connections: u64 = view.edges.iter().map(|e| e.connections).sum();
    let sent: u64 = view.edges.iter().map(|e| e.bytes_sent).sum();
    ensure!(
        connections == u64::from(flows) && sent == u64::from(flows) * BYTES_SENT,
        "{connections} connections and {sent} bytes counted for {flows} flows"
    );
    let e = view.edges.first().context("no edge")?;
    let caller = if joined { "workload:pod/" } else { "external:" };
    ensure!(
        e.caller.starts_with(caller)
            && e.callee.starts_with("service:bench/svc-")
            && e.port == SERVICE_PORT
            && e.processes.is_empty() != joined,
        "edge {e:?}"
    );
    Ok(st.edges_evicted)
}

/// One round of the cost per event.
struct Round {
    cpu_ns: f64,
    wall_ns: f64,
    evicted: u64,
    /// The controller's heap at the end of the round.
    heap: f64,
}

fn cost_round(
    flows: u32,
    schedule: &[(u64, bool, u32)],
    joined: Option<&(Arc<Names>, Arc<Owners>)>,
    addrs: &Addresses,
) -> Result<Round> {
    let bus = Bus::new();
    let _writers = publish(&bus, joined)?;
    let before = heap_in_use();
    let ctl = started(&bus)?;
    let spent = feed(&ctl, schedule, datapath::graph::now_ms(), addrs);
    let heap = heap_in_use() - before;
    let evicted = check(&ctl, flows, joined.is_some())?;
    let per_event = |d: Duration| d.as_secs_f64() * 1e9 / schedule.len() as f64;
    Ok(Round {
        cpu_ns: per_event(spent.cpu),
        wall_ns: per_event(spent.wall),
        evicted,
        heap,
    })
}

/// Bytes in use on the heap: glibc's arenas and its mmapped chunks (large tables are mmapped,
/// and `uordblks` alone would not count them).
fn heap_in_use() -> f64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as f64
}

/// The heap of a controller fed the memory flows, and of a graph alone fed the same.
fn memory(joined: Option<&(Arc<Names>, Arc<Owners>)>, addrs: &Addresses) -> Result<(f64, f64)> {
    let flows = EDGES as u32 * MEMORY_BUCKETS;
    let schedule = schedule(flows);
    let bus = Bus::new();
    // The catalog, names and owners are the other modules' memory.
    let writers = publish(&bus, joined)?;
    let before = heap_in_use();
    let ctl = started(&bus)?;
    feed(&ctl, &schedule, datapath::graph::now_ms(), addrs);
    let controller_bytes = heap_in_use() - before;
    let evicted = check(&ctl, flows, joined.is_some())?;
    ensure!(evicted == 0, "{evicted} edges evicted");
    drop(std::hint::black_box(ctl));
    drop(writers);

    // The graph alone: every flow resolved at its end, as the controller resolves a flow that
    // ended before it was counted.
    let bus = Bus::new();
    let _writers = publish(&bus, joined)?;
    let resolver = Resolver {
        catalog: bus.state::<ServiceCatalog>(SERVICE_CATALOG)?.reader(),
        names: bus.state::<NameHandle>(NAMES)?.reader(),
        owners: bus.state::<OwnerHandle>(OWNERS)?.reader(),
        directory: Mutex::new(None),
    };
    let lookups = resolver.lookups();
    let base_ms = datapath::graph::now_ms();
    let before = heap_in_use();
    let mut graph = Graph::new(EDGES);
    for chunk in schedule.chunks(SETTLE_EVERY) {
        let mut now_s = 0;
        for &(t_us, closed, i) in chunk.iter().filter(|(_, closed, _)| *closed) {
            let at = base_ms + t_us / 1000;
            now_s = at / 1000;
            let e = event(i, closed, at, addrs);
            let r = resolver.resolve(&lookups, &e, now_s).context("resolve")?;
            graph.record(&r);
        }
        graph.age(now_s);
    }
    let graph_bytes = heap_in_use() - before;
    ensure!(
        graph.edge_count() == EDGES && graph.evicted == 0,
        "{} edges in the graph alone, {} evicted",
        graph.edge_count(),
        graph.evicted
    );
    drop(std::hint::black_box(graph));
    Ok((controller_bytes, graph_bytes))
}

pub fn run(smoke: bool) -> Result<GraphReport> {
    let (flows, rounds) = if smoke { (20_000, 3) } else { (200_000, 9) };
    let addrs = Addresses::new();
    let joined = modules(flows.max(EDGES as u32 * MEMORY_BUCKETS));
    let schedule = schedule(flows);
    let mut services = Vec::new();
    let mut with_modules = Vec::new();
    for _ in 0..rounds {
        services.push(cost_round(flows, &schedule, None, &addrs)?);
        with_modules.push(cost_round(flows, &schedule, Some(&joined), &addrs)?);
    }
    let summary = |rounds: &[Round], f: fn(&Round) -> f64| {
        Summary::of(&rounds.iter().map(f).collect::<Vec<_>>()).context("no rounds")
    };
    let evicted = services
        .iter()
        .chain(&with_modules)
        .map(|r| r.evicted)
        .sum();
    let (memory_controller_services, memory_graph_services) = memory(None, &addrs)?;
    let (memory_controller_joined, memory_graph_joined) = memory(Some(&joined), &addrs)?;
    Ok(GraphReport {
        services: SERVICES,
        clients: CLIENTS,
        edges: EDGES,
        flows_per_round: flows,
        events_per_round: schedule.len() as u64,
        ns_per_event_services: summary(&services, |r| r.cpu_ns)?,
        ns_per_event_joined: summary(&with_modules, |r| r.cpu_ns)?,
        wall_ns_per_event_services: summary(&services, |r| r.wall_ns)?,
        wall_ns_per_event_joined: summary(&with_modules, |r| r.wall_ns)?,
        round_heap_services: summary(&services, |r| r.heap)?,
        round_heap_joined: summary(&with_modules, |r| r.heap)?,
        evicted,
        memory_flows: EDGES as u32 * MEMORY_BUCKETS,
        memory_controller_services,
        memory_graph_services,
        memory_controller_joined,
        memory_graph_joined,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn flows_are_distinct_and_the_first_ones_make_every_edge_once() {
        let tuples: HashSet<_> = (0..50_000)
            .map(|i| {
                let f = flow(i);
                (f.client, f.sport, f.service, f.backend)
            })
            .collect();
        assert_eq!(tuples.len(), 50_000);
        let edges: HashSet<_> = (0..EDGES as u32)
            .map(|i| {
                let f = flow(i);
                (f.client, f.service)
            })
            .collect();
        assert_eq!(edges.len(), EDGES);
        assert!((0..EDGES as u32).all(|i| flow(i + EDGES as u32).service == flow(i).service));
    }

    #[test]
    fn a_small_feed_counts_every_flow_on_its_edge() {
        let addrs = Addresses::new();
        let flows = 2 * EDGES as u32;
        let joined = modules(flows);
        for modules in [None, Some(&joined)] {
            let bus = Bus::new();
            let _writers = publish(&bus, modules).unwrap();
            let ctl = started(&bus).unwrap();
            feed(&ctl, &schedule(flows), datapath::graph::now_ms(), &addrs);
            assert_eq!(check(&ctl, flows, modules.is_some()).unwrap(), 0);
        }
    }
}
