//! Control-plane benchmarks (criterion):
//!
//! - `maglev_build`: one Maglev table of M = 65537 for 10, 100 and 1,000 backends.
//! - `flow_gc`: one garbage-collection sweep over a real kernel LRU hash of 1,000,000 flow
//!   entries (the type and size of `LB_FLOWS` on a busy node), with nothing to expire and with
//!   10% expired.
//! - `lb_ctl_to_live`: from starting `lb-ctl backend add|rm` to the service's new Maglev table
//!   being live in the pinned `LB_VIPS` map of a real `datapathd` in a private namespace. Each
//!   change's latency is also recorded, and p50/p99 are written to
//!   `$DP_BENCH_OUT/control_plane_latency.json` (default `target/bench/`).
//!
//! - `metrics_scrape`: `GET /metrics` of a real `datapathd` (load balancer and policy module
//!   on) with 1,000,000 flows in each of `LB_FLOWS` and `CT_FLOWS`, after a GC sweep counted
//!   them; p50/p99 to `$DP_BENCH_OUT/metrics_latency.json`.
//!
//! `cargo test --benches` (the test suite's smoke run) runs each once. The BPF parts need root.

use std::{
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::PathBuf,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use bpf_common::{FAMILY_IPV4, FlowEntry, NatReverseEntry, PROTO_TCP, VipInfo, VipKey, ct::CtKey};
use conntrack::{TcpState, canonical_key, new_entry};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use datapath::gc::{
    BPF_MAP_TYPE_LRU_HASH, FlowGc, GcConfig, create_hash_map, monotonic_now_ns, update_all,
};
use lb_core::maglev::{MaglevBackend, build_table};
use netns_tests::{Binaries, Daemon, cmd::run_args, netns::OwnedNetns};

const MAGLEV_SIZE: u32 = 65_537;
const GC_ENTRIES: u32 = 1_000_000;
const SEC: u64 = 1_000_000_000;

/// Skips a root-only bench with a message, or panics under `DATAPATH_REQUIRE_PRIVILEGED=1`
/// (see [`netns_tests::privilege::may_run`]).
fn privileged(bench: &str) -> bool {
    netns_tests::privilege::privileged_as_root(&format!(
        "the {bench} bench (BPF maps and namespaces)"
    ))
}

fn out_dir() -> PathBuf {
    std::env::var_os("DP_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| netns_tests::daemon::workspace_root().join("target/bench"))
}

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    group.sample_size(10);
    for count in [10usize, 100, 1_000] {
        let keys: Vec<String> = (0..count)
            .map(|i| format!("198.18.{}.{}:8080", 1 + i / 250, 1 + i % 250))
            .collect();
        let backends: Vec<MaglevBackend<'_>> = keys
            .iter()
            .map(|key| MaglevBackend {
                key: key.as_bytes(),
                weight: 1,
            })
            .collect();
        group.bench_with_input(
            BenchmarkId::new("M=65537", count),
            &backends,
            |b, backends| {
                b.iter(|| build_table(backends, MAGLEV_SIZE).expect("table"));
            },
        );
    }
    group.finish();
}

fn flow_key(i: u32) -> CtKey {
    canonical_key(
        [
            u32::from_ne_bytes([198, 18, (i >> 16) as u8, (i >> 8) as u8]),
            0,
            0,
            0,
        ],
        ((i & 0xff) as u16 + 1024).to_be(),
        [u32::from_ne_bytes([198, 18, 100, 1]), 0, 0, 0],
        80u16.to_be(),
        PROTO_TCP,
        FAMILY_IPV4,
    )
    .0
}

fn flow_entry(last_seen_ns: u64) -> FlowEntry {
    let mut ct = new_entry(last_seen_ns, 0);
    // Established: 6 h timeout.
    ct.state = TcpState::Established as u8;
    FlowEntry {
        ct,
        backend_id: 1,
        backend_generation: 1,
        ..FlowEntry::default()
    }
}

fn flow_gc(c: &mut Criterion) {
    if !privileged("flow_gc") {
        return;
    }
    let flows = create_hash_map::<CtKey, FlowEntry>(BPF_MAP_TYPE_LRU_HASH, GC_ENTRIES + 65_536)
        .expect("create the flow map");
    let reverse = create_hash_map::<CtKey, NatReverseEntry>(BPF_MAP_TYPE_LRU_HASH, 65_536)
        .expect("create the reverse map");
    // A clock a day ahead: the machine may have been up for less than the 6 h timeout.
    let now = monotonic_now_ns() + 24 * 3600 * SEC;
    let all: Vec<(CtKey, FlowEntry)> = (0..GC_ENTRIES)
        .map(|i| (flow_key(i), flow_entry(now)))
        .collect();
    update_all(flows.as_fd(), &all).expect("fill 1,000,000 flows");
    // Every tenth entry idle for longer than the established timeout.
    let stale: Vec<(CtKey, FlowEntry)> = (0..GC_ENTRIES)
        .step_by(10)
        .map(|i| (flow_key(i), flow_entry(now - 7 * 3600 * SEC)))
        .collect();
    let mut gc = FlowGc::from_fds(
        flows,
        reverse,
        GcConfig {
            max_deletes_per_sweep: usize::MAX,
            ..GcConfig::default()
        },
    );

    // A second descriptor of the flow map, so re-ageing entries does not borrow the collector.
    let flows_fd = gc
        .flows_fd()
        .try_clone()
        .expect("duplicate the flow map descriptor");
    let mut group = c.benchmark_group("flow_gc");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("sweep 1M entries, none expired", |b| {
        b.iter(|| {
            let report = gc.sweep(now).expect("sweep");
            assert_eq!(report.flows_scanned, u64::from(GC_ENTRIES));
            assert_eq!(report.flows_expired, 0);
        });
    });
    group.bench_function("sweep 1M entries, 100k expired", |b| {
        b.iter_batched(
            || update_all(flows_fd.as_fd(), &stale).expect("re-age entries"),
            |()| {
                let report = gc.sweep(now).expect("sweep");
                assert_eq!(report.flows_expired, stale.len() as u64);
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

/// A running daemon in the latency bench's namespace; dropped before the namespace's guard.
struct LiveDaemon {
    daemon: Daemon,
}

impl Drop for LiveDaemon {
    fn drop(&mut self) {
        let _ = self.daemon.stop();
        let _ = run_args(
            &self.daemon.bins.datapathd.to_string_lossy(),
            &[
                "cleanup",
                "--pin-root",
                &self.daemon.pin_root.to_string_lossy(),
            ],
        );
    }
}

/// The latency bench's namespace (deleted when dropped, also when setting it up panics) and
/// the daemon in it.
fn start_daemon() -> (OwnedNetns, LiveDaemon) {
    // Before anything can panic: the binaries must exist.
    let bins = Binaries::from_env();
    let namespace =
        OwnedNetns::create(&format!("dplat{}", std::process::id())).expect("create namespace");
    let ns = namespace.name().to_string();
    let ip = |args: &[&str]| {
        namespace.ip(args).expect("ip");
    };
    for (dev, peer, addr) in [
        ("lbc", "lbc-p", "198.18.0.2/24"),
        ("lbb", "lbb-p", "198.18.1.1/24"),
    ] {
        ip(&["link", "add", dev, "type", "veth", "peer", "name", peer]);
        ip(&["link", "set", dev, "up"]);
        ip(&["link", "set", peer, "up"]);
        ip(&["addr", "add", addr, "dev", dev]);
    }
    let daemon = Daemon::start(&ns, &ns, bins, &[]).expect("start datapathd");
    let live = LiveDaemon { daemon };
    live.daemon
        .lb_ctl_ok(&["service", "add", "198.18.100.1:80"])
        .expect("service add");
    for i in 11..15 {
        live.daemon
            .lb_ctl_ok(&[
                "backend",
                "add",
                "198.18.100.1:80",
                &format!("198.18.1.{i}:8080"),
            ])
            .expect("backend add");
    }
    (namespace, live)
}

fn lb_ctl_to_live(c: &mut Criterion) {
    if !privileged("lb_ctl_to_live") {
        return;
    }
    // Drop order: the daemon (declared last) first, then the namespace.
    let (_namespace, live) = start_daemon();
    let map =
        MapData::from_pin(live.daemon.pin_root.join("lb").join("LB_VIPS")).expect("pinned LB_VIPS");
    let vips: BpfHashMap<MapData, VipKey, VipInfo> =
        BpfHashMap::try_from(Map::HashMap(map)).expect("LB_VIPS is a hash");
    let key = VipKey {
        addr: [
            u32::from_ne_bytes(Ipv4Addr::new(198, 18, 100, 1).octets()),
            0,
            0,
            0,
        ],
        port_be: 80u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_IPV4,
    };
    let slot = || vips.get(&key, 0).expect("VIP entry").table_slot;
    let lb_ctl = live.daemon.bins.lb_ctl.clone();
    let socket = live.daemon.socket.clone();
    let samples: Mutex<Vec<Duration>> = Mutex::new(Vec::new());
    let mut present = false;

    let mut group = c.benchmark_group("lb_ctl_to_live");
    group.sample_size(20);
    group.bench_function("backend add/rm to live table", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let verb = if present { "rm" } else { "add" };
                let before = slot();
                let started = Instant::now();
                let status = Command::new(&lb_ctl)
                    .arg("--socket")
                    .arg(&socket)
                    .args(["backend", verb, "198.18.100.1:80", "198.18.1.20:8080"])
                    .stdout(std::process::Stdio::null())
                    .status()
                    .expect("run lb-ctl");
                assert!(status.success(), "lb-ctl backend {verb} failed");
                // Bounded: the flip must be visible within 5 s of the command.
                while slot() == before {
                    assert!(
                        started.elapsed() < Duration::from_secs(5),
                        "the new table never went live"
                    );
                    std::hint::spin_loop();
                }
                let latency = started.elapsed();
                present = !present;
                total += latency;
                samples.lock().expect("samples").push(latency);
            }
            total
        });
    });
    group.finish();

    let mut all = samples.into_inner().expect("samples");
    if all.is_empty() {
        // A criterion filter left this bench out: there is nothing to report.
        return;
    }
    all.sort_unstable();
    let percentile = |p: f64| {
        let index = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[index].as_secs_f64() * 1e3
    };
    let doc = serde_json::json!({
        "changes": all.len(),
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "max_ms": percentile(1.0),
    });
    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("create the output directory");
    std::fs::write(
        dir.join("control_plane_latency.json"),
        serde_json::to_string_pretty(&doc).expect("json"),
    )
    .expect("write latency results");
    println!("lb_ctl_to_live: {doc}");
}

/// Flows put in each of `LB_FLOWS` and `CT_FLOWS` by `metrics_scrape` under `cargo bench`;
/// the smoke run (`cargo test --benches`) uses far fewer, only to prove the bench works.
const SCRAPE_FLOWS: u32 = 1_000_000;
const SCRAPE_FLOWS_SMOKE: u32 = 10_000;
/// The scrape bench's metrics listener, on its namespace's loopback.
const SCRAPE_METRICS: &str = "127.0.0.1:9477";

/// Whether criterion measures (`cargo bench` passes `--bench`) rather than smoke-tests.
fn measuring() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// A daemon with both tables sized for `max_flows`, the policy module on (TCX on `lbb`) and
/// the default GC interval, in a namespace of its own (`dplat<pid>m`).
fn start_daemon_for_scrapes(max_flows: u32) -> (OwnedNetns, LiveDaemon) {
    let bins = Binaries::from_env();
    let ns = format!("dplat{}m", std::process::id());
    let guard = OwnedNetns::create(&ns).expect("create namespace");
    let ip = |args: &[&str]| {
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        run_args("ip", &full).expect("ip");
    };
    ip(&["link", "set", "lo", "up"]);
    for (dev, peer, addr) in [
        ("lbc", "lbc-p", "198.18.0.2/24"),
        ("lbb", "lbb-p", "198.18.1.1/24"),
    ] {
        ip(&["link", "add", dev, "type", "veth", "peer", "name", peer]);
        ip(&["link", "set", dev, "up"]);
        ip(&["link", "set", peer, "up"]);
        ip(&["addr", "add", addr, "dev", dev]);
    }
    let config = std::env::temp_dir().join(format!("{ns}-config.yaml"));
    std::fs::write(
        &config,
        format!(
            "metrics_listen: \"{SCRAPE_METRICS}\"\n\
             lb:\n  maps: {{ max_flows: {max_flows} }}\n\
             conntrack:\n  gc_interval_seconds: 5\n\
             policy:\n  enabled: true\n  interfaces: [lbb]\n  max_flows: {max_flows}\n"
        ),
    )
    .expect("write the daemon's config");
    let started = Daemon::start(&ns, &ns, bins, &["--config", &config.to_string_lossy()]);
    let _ = std::fs::remove_file(&config);
    let live = LiveDaemon {
        daemon: started.expect("start datapathd"),
    };
    live.daemon
        .lb_ctl_ok(&["service", "add", "198.18.100.1:80"])
        .expect("service add");
    for i in 11..15 {
        live.daemon
            .lb_ctl_ok(&[
                "backend",
                "add",
                "198.18.100.1:80",
                &format!("198.18.1.{i}:8080"),
            ])
            .expect("backend add");
    }
    (guard, live)
}

/// The value of the sample `series` (name and labels, as the text format writes them).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// One `GET /metrics` from inside the bench's namespace; the body.
fn scrape(addr: std::net::SocketAddr) -> String {
    let (status, body) = netns_tests::http::get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// `/metrics` latency of a real `datapathd` tracking `SCRAPE_FLOWS` flows in each of its two
/// tables (`LB_FLOWS`, the policy's `CT_FLOWS`), once a GC sweep has counted them. Every
/// scrape's latency is recorded; p50/p99 go to `$DP_BENCH_OUT/metrics_latency.json`.
fn metrics_scrape(c: &mut Criterion) {
    if !privileged("metrics_scrape") {
        return;
    }
    let flows = if measuring() {
        SCRAPE_FLOWS
    } else {
        SCRAPE_FLOWS_SMOKE
    };
    // Room above the flows: an LRU hash may evict before it is quite full.
    let max_flows = flows + 65_536;
    let (namespace, live) = start_daemon_for_scrapes(max_flows);
    let pins = |controller: &str, map: &str| {
        datapath::bpf::pins::controller_dir(&live.daemon.pin_root, controller).join(map)
    };
    // Fill both tables as a busy node would have them: established TCP flows, seen just now
    // (idle timeout 6 h, so no sweep expires them during the bench).
    let now = monotonic_now_ns();
    let lb_flows = MapData::from_pin(pins("lb", "LB_FLOWS")).expect("pinned LB_FLOWS");
    let entries: Vec<(CtKey, FlowEntry)> =
        (0..flows).map(|i| (flow_key(i), flow_entry(now))).collect();
    update_all(lb_flows.fd().as_fd(), &entries).expect("fill LB_FLOWS");
    drop(entries);
    let ct_flows = MapData::from_pin(pins("policy", "CT_FLOWS")).expect("pinned CT_FLOWS");
    let mut ct = new_entry(now, 0);
    ct.state = TcpState::Established as u8;
    let entries: Vec<(CtKey, bpf_common::ct::CtEntry)> =
        (0..flows).map(|i| (flow_key(i), ct)).collect();
    update_all(ct_flows.fd().as_fd(), &entries).expect("fill CT_FLOWS");
    drop(entries);

    // Occupancy comes from the conntrack sweep (never a walk at scrape time): wait, bounded,
    // until a sweep has counted (nearly) every flow of both tables. 99%: the LRU may have
    // evicted a few.
    let addr: std::net::SocketAddr = SCRAPE_METRICS.parse().expect("address");
    let want = f64::from(flows) * 0.99;
    let (lb_seen, ct_seen) = netns_tests::netns::run_in(namespace.name(), || {
        let started = Instant::now();
        loop {
            let text = scrape(addr);
            let lb = sample(&text, "datapath_map_entries{map=\"LB_FLOWS\"}").unwrap_or(0.0);
            let ct = sample(&text, "datapath_conntrack_entries").unwrap_or(0.0);
            if lb >= want && ct >= want {
                return (lb, ct);
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no sweep counted the flows within 60 s: LB_FLOWS {lb}, CT_FLOWS {ct}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .expect("enter the namespace");
    println!("metrics_scrape: the sweep counted LB_FLOWS {lb_seen}, CT_FLOWS {ct_seen}");

    let samples: Mutex<Vec<Duration>> = Mutex::new(Vec::new());
    let mut group = c.benchmark_group("metrics_scrape");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function(format!("GET /metrics, {flows} flows per table"), |b| {
        b.iter_custom(|iters| {
            // One thread in the namespace for all the scrapes of this sample.
            netns_tests::netns::run_in(namespace.name(), || {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let text = scrape(addr);
                    let latency = started.elapsed();
                    // Each scrape still shows the table as the sweeps counted it.
                    let lb = sample(&text, "datapath_map_entries{map=\"LB_FLOWS\"}");
                    assert!(
                        lb.is_some_and(|n| n >= want),
                        "LB_FLOWS in a scrape: {lb:?}"
                    );
                    total += latency;
                    samples.lock().expect("samples").push(latency);
                }
                total
            })
            .expect("enter the namespace")
        });
    });
    group.finish();
    drop(live);
    drop(namespace);

    let mut all = samples.into_inner().expect("samples");
    if all.is_empty() {
        // A criterion filter left this bench out: there is nothing to report.
        return;
    }
    all.sort_unstable();
    let percentile = |p: f64| {
        let index = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[index].as_secs_f64() * 1e3
    };
    let doc = serde_json::json!({
        "flows_per_table": flows,
        "lb_flows_counted": lb_seen,
        "ct_flows_counted": ct_seen,
        "scrapes": all.len(),
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "max_ms": percentile(1.0),
    });
    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("create the output directory");
    std::fs::write(
        dir.join("metrics_latency.json"),
        serde_json::to_string_pretty(&doc).expect("json"),
    )
    .expect("write scrape latency results");
    println!("metrics_scrape: {doc}");
}

criterion_group!(benches, maglev_build, flow_gc, lb_ctl_to_live);
// A group of its own, run first: its daemon and its 2M map entries are set up only here.
criterion_group!(scrapes, metrics_scrape);
criterion_main!(scrapes, benches);
