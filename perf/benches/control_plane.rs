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

criterion_group!(benches, maglev_build, flow_gc, lb_ctl_to_live);
criterion_main!(benches);
