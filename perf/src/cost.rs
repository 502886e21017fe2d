//! Per-program cost of `xdp_lb` in ns/packet through BPF_PROG_TEST_RUN.
//!
//! Repeats of BPF_PROG_TEST_RUN share one buffer, so a rewriting path would measure its own
//! output from the second repeat on. Every `xdp_lb` path is therefore measured through
//! `xdp_bench_harness`, which restores the frame from a template map on every repeat (and, for
//! the new-flow rows, gives each repeat a new 5-tuple) and tail-calls the program under test.
//! The harness's own cost is measured in the same run against `xdp_drop` as the tail-call
//! target, with the same template, and subtracted. `xdp_drop` alone is the machine's floor.
//!
//! Each row proves the path it measured: the verdict of the measured run, the program's own
//! reason counters (which must rise by exactly the repeat count), and, before measuring, the
//! output frame of a single run compared with the expected frame.
//!
//! Everything runs in a private network namespace with pins under a private bpffs directory,
//! both removed at the end.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use aya::{
    maps::{Array, MapData, ProgramArray},
    programs::{ProgramFd, TestRun as _, TestRunOptions, Xdp},
};
use bpf_common::{BENCH_FRAME_MAX, BenchTemplate, map_names};
use datapath::{
    dataplane::{Dataplane, DataplaneConfig, XdpAttachMode, cleanup},
    gc::{FlowGc, GcConfig},
};
use datapath_api::{BackendSpec, BackendState, ForwardingMode, Protocol, ServiceKey, ServiceSpec};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6Header, TcpHeader};
use netns_tests::{
    cmd::run_args,
    netns::{self, OwnedNetns},
};
use serde::Serialize;

use crate::report::Summary;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const LB_FRONT: [u8; 4] = [198, 18, 0, 2];
const LB_BACK: [u8; 4] = [198, 18, 1, 1];
const VIP: [u8; 4] = [198, 18, 100, 1];
const BACKENDS: [[u8; 4]; 3] = [[198, 18, 1, 11], [198, 18, 1, 12], [198, 18, 1, 13]];
/// The IPv6 rows' addresses (2001:db8::/32), the same roles as the IPv4 ones.
const CLIENT6: [u8; 16] = v6(0, 1);
const LB_FRONT6: [u8; 16] = v6(0, 2);
const LB_BACK6: [u8; 16] = v6(1, 1);
const VIP6: [u8; 16] = v6(0x64, 1);
const BACKENDS6: [[u8; 16]; 3] = [v6(1, 0x11), v6(1, 0x12), v6(1, 0x13)];

/// `2001:db8:<net>::<host>`.
const fn v6(net: u8, host: u8) -> [u8; 16] {
    [
        0x20, 0x01, 0x0d, 0xb8, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, 0, host,
    ]
}
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const FRONT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
/// New full-NAT flows per run: each takes a source port towards its backend, and a run must
/// stay well inside the ports of one SNAT address (about 64k per backend). A flow whose own
/// port is taken tries 7 hashed ones, which all fail with probability occupancy^7: at 60,000
/// flows over 3 backends (31%) that dropped about one flow in ten runs and failed the exact
/// counter check; at 20,000 (10%) it is about 1e-7 per such flow.
const FULL_NAT_NEW_FLOW_REPEAT: u32 = 20_000;

fn backend_mac(addr: [u8; 4]) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, addr[3]]
}

/// How long to measure.
#[derive(Clone, Debug)]
pub struct CostOptions {
    /// BPF_PROG_TEST_RUN repeats per run.
    pub repeat: u32,
    /// Runs per row; rows report the median.
    pub runs: usize,
}

impl CostOptions {
    /// The full benchmark: a million repeats, median of five runs.
    pub fn full() -> Self {
        Self {
            repeat: 1_000_000,
            runs: 5,
        }
    }

    /// The test suite's run: only checks that every path still works and is measured.
    pub fn smoke() -> Self {
        Self {
            repeat: 10_000,
            runs: 1,
        }
    }
}

/// One measured path.
#[derive(Clone, Debug, Serialize)]
pub struct CostRow {
    pub path: String,
    /// ns/packet, harness cost subtracted.
    pub ns: Summary,
    /// Median over the median of `xdp_drop` alone.
    pub ratio_to_xdp_drop: f64,
    pub verdict: &'static str,
    pub repeat: u32,
    /// The counters that proved the path.
    pub check: String,
}

fn verdict_name(verdict: u32) -> &'static str {
    match verdict {
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "?",
    }
}

/// Measures every path in a private namespace and removes it, and the pins, afterwards.
pub fn run(options: &CostOptions) -> Result<Vec<CostRow>> {
    ensure!(
        options.repeat > 0 && options.runs > 0,
        "repeat and runs must be positive"
    );
    let name = format!("dpcost{}", std::process::id());
    let namespace = OwnedNetns::create(&name)?;
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/{name}"));
    let result = netns::run_in(&name, || {
        build_topology(&name).and_then(|()| measure_all(options, &pin_root))
    })
    .and_then(|inner| inner);
    let _ = cleanup(&pin_root);
    // The pins first: the namespace goes with the programs' interfaces.
    drop(namespace);
    result
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn if_index(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(index != 0, "no interface {name}");
    Ok(index)
}

/// The load-balancer node: `front` faces the client, `back` the backends; neighbours are
/// permanent so `bpf_fib_lookup` answers deterministically. Runs inside the namespace.
fn build_topology(ns: &str) -> Result<()> {
    let ip = |args: &[&str]| -> Result<()> {
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        run_args("ip", &full).map(drop)
    };
    let sysctl = |key: &str| -> Result<()> {
        run_args("ip", &["netns", "exec", ns, "sysctl", "-qw", key]).map(drop)
    };
    // The program is really attached: IPv6 router solicitations on the new links would move
    // the counters the rows check exactly. Off before any link exists.
    sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
    sysctl("net.ipv6.conf.default.disable_ipv6=1")?;
    for (dev, peer) in [("front", "front-peer"), ("back", "back-peer")] {
        ip(&["link", "add", dev, "type", "veth", "peer", "name", peer])?;
    }
    ip(&["link", "set", "front", "address", &mac_str(FRONT_MAC)])?;
    ip(&["link", "set", "back", "address", &mac_str(BACK_MAC)])?;
    for dev in ["front", "front-peer", "back", "back-peer"] {
        ip(&["link", "set", dev, "up"])?;
    }
    ip(&["addr", "add", "198.18.0.2/24", "dev", "front"])?;
    ip(&["addr", "add", "198.18.1.1/24", "dev", "back"])?;
    let neighbours = std::iter::once((CLIENT, CLIENT_MAC, "front"))
        .chain(BACKENDS.iter().map(|b| (*b, backend_mac(*b), "back")));
    for (addr, mac, dev) in neighbours {
        let addr = Ipv4Addr::from(addr).to_string();
        ip(&[
            "neigh",
            "replace",
            &addr,
            "lladdr",
            &mac_str(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    sysctl("net.ipv4.ip_forward=1")?;
    // IPv6 on the two LB interfaces only (the peers keep it off, so nothing solicits
    // towards the program), addresses without duplicate address detection.
    for dev in ["front", "back"] {
        for key in ["disable_ipv6=0", "accept_ra=0", "router_solicitations=0"] {
            sysctl(&format!("net.ipv6.conf.{dev}.{key}"))?;
        }
    }
    ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", Ipv6Addr::from(LB_FRONT6)),
        "dev",
        "front",
        "nodad",
    ])?;
    ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", Ipv6Addr::from(LB_BACK6)),
        "dev",
        "back",
        "nodad",
    ])?;
    let neighbours6 = std::iter::once((CLIENT6, CLIENT_MAC, "front")).chain(
        BACKENDS6
            .iter()
            .map(|b| (*b, backend_mac([0, 0, 0, b[15]]), "back")),
    );
    for (addr, mac, dev) in neighbours6 {
        let addr = Ipv6Addr::from(addr).to_string();
        ip(&[
            "-6",
            "neigh",
            "replace",
            &addr,
            "lladdr",
            &mac_str(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    sysctl("net.ipv6.conf.all.forwarding=1")
}

// ---------------------------------------------------------------------------------------------
// Frames.
// ---------------------------------------------------------------------------------------------

fn tcp_frame(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    syn: bool,
    ack: bool,
) -> Result<Vec<u8>> {
    let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
    tcp.syn = syn;
    tcp.ack = ack;
    let mut ip = Ipv4Header::new(tcp.header_len() as u16, 64, IpNumber::TCP, src.0, dst.0)?;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[])?;
    let eth = Ethernet2Header {
        source: macs.0,
        destination: macs.1,
        ether_type: EtherType::IPV4,
    };
    let mut frame = eth.to_bytes().to_vec();
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&tcp.to_bytes());
    Ok(frame)
}

fn tcp6_frame(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    syn: bool,
    ack: bool,
) -> Result<Vec<u8>> {
    let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
    tcp.syn = syn;
    tcp.ack = ack;
    tcp.checksum = tcp.calc_checksum_ipv6_raw(src.0, dst.0, &[])?;
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: tcp.header_len() as u16,
        next_header: IpNumber::TCP,
        hop_limit: 64,
        source: src.0,
        destination: dst.0,
    };
    let eth = Ethernet2Header {
        source: macs.0,
        destination: macs.1,
        ether_type: EtherType::IPV6,
    };
    let mut frame = eth.to_bytes().to_vec();
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&tcp.to_bytes());
    Ok(frame)
}

// ---------------------------------------------------------------------------------------------
// Measurement.
// ---------------------------------------------------------------------------------------------

struct Bench {
    dataplane: Dataplane,
    drop_fd: ProgramFd,
    lb_fd: ProgramFd,
    targets: ProgramArray<MapData>,
    template: Array<MapData, BenchTemplate>,
    gc: FlowGc,
}

struct Sample {
    verdict: u32,
    ns: f64,
    out: Vec<u8>,
}

fn xdp<'a>(dataplane: &'a mut Dataplane, name: &str) -> Result<&'a mut Xdp> {
    dataplane
        .bpf_mut()
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing"))?
        .try_into()
        .map_err(|e| anyhow!("{name} is not XDP: {e}"))
}

impl Bench {
    fn test_run(
        &mut self,
        program: &str,
        frame: &[u8],
        ingress: u32,
        repeat: u32,
    ) -> Result<Sample> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex; data_end must be the frame's length.
        let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ingress, 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        let result = xdp(&mut self.dataplane, program)?
            .test_run(opts)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))?;
        out.truncate(result.data_size_out as usize);
        // The kernel reports the mean time per repeat (bpf_test_timer divides by the count).
        Ok(Sample {
            verdict: result.return_value,
            ns: result.duration.as_nanos() as f64,
            out,
        })
    }

    fn set_template(&mut self, frame: &[u8], vary_flow: bool) -> Result<()> {
        ensure!(frame.len() <= BENCH_FRAME_MAX, "template too long");
        let mut bytes = [0u8; BENCH_FRAME_MAX];
        bytes[..frame.len()].copy_from_slice(frame);
        let value = BenchTemplate {
            len: frame.len() as u32,
            vary_flow: u32::from(vary_flow),
            frame: bytes,
        };
        self.template.set(0, value, 0)?;
        Ok(())
    }

    fn set_target(&mut self, lb: bool) -> Result<()> {
        let fd = if lb { &self.lb_fd } else { &self.drop_fd };
        self.targets.set(0, fd, 0)?;
        Ok(())
    }

    fn reasons(&self) -> Result<BTreeMap<String, u64>> {
        Ok(self.dataplane.stats()?.reasons)
    }
}

/// One measured `xdp_lb` path.
struct Path_ {
    name: String,
    frame: Vec<u8>,
    ingress: u32,
    vary_flow: bool,
    verdict: u32,
    /// Reason counters and how much each must rise per packet.
    counters: &'static [(&'static str, u64)],
    /// Repeats per run (capped for paths that consume a finite resource per packet).
    repeat: u32,
    /// Empty the flow tables before every run (new full-NAT flows use up source ports).
    flush_between_runs: bool,
}

/// Per run: (harness -> xdp_lb) - (harness -> xdp_drop), checking the verdict and that the
/// reason counters rose by exactly the repeat count.
fn measure(bench: &mut Bench, options: &CostOptions, path: &Path_) -> Result<CostRow> {
    bench.set_template(&path.frame, path.vary_flow)?;
    let mut ns = Vec::new();
    for _ in 0..options.runs {
        if path.flush_between_runs {
            bench.gc.flush()?;
        }
        bench.set_target(false)?;
        let harness =
            bench.test_run("xdp_bench_harness", &path.frame, path.ingress, path.repeat)?;
        ensure!(
            harness.verdict == XDP_DROP,
            "{}: harness->drop returned {}",
            path.name,
            harness.verdict
        );
        bench.set_target(true)?;
        let before = bench.reasons()?;
        let measured =
            bench.test_run("xdp_bench_harness", &path.frame, path.ingress, path.repeat)?;
        let after = bench.reasons()?;
        ensure!(
            measured.verdict == path.verdict,
            "{}: verdict {} instead of {}",
            path.name,
            measured.verdict,
            path.verdict
        );
        for (name, per_packet) in path.counters {
            let rose = after[*name] - before[*name];
            let want = u64::from(path.repeat) * per_packet;
            if rose != want {
                // Name every counter that moved: the one that rose instead says why.
                let moved: Vec<String> = after
                    .iter()
                    .filter(|(k, v)| **v != before.get(*k).copied().unwrap_or(0))
                    .map(|(k, v)| format!("{k} +{}", v - before.get(k).copied().unwrap_or(0)))
                    .collect();
                anyhow::bail!(
                    "{}: counter {name} rose by {rose}, expected {want} (moved: {})",
                    path.name,
                    moved.join(", ")
                );
            }
        }
        ns.push(measured.ns - harness.ns);
    }
    let check = path
        .counters
        .iter()
        .map(|(name, n)| format!("{name} +{}", u64::from(path.repeat) * n))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(CostRow {
        path: path.name.clone(),
        ns: Summary::of(&ns).context("no runs")?,
        ratio_to_xdp_drop: 0.0,
        verdict: verdict_name(path.verdict),
        repeat: path.repeat,
        check,
    })
}

/// The frames of the tracked paths, of one family.
struct PathFrames {
    /// A SYN to the DSR service (port 81).
    dsr_syn: Vec<u8>,
    /// The pinned full-NAT flow's ACK, and its backend's SYN+ACK.
    ack: Vec<u8>,
    syn_ack: Vec<u8>,
    /// A SYN to the load balancer's own address.
    non_vip: Vec<u8>,
    /// A SYN of another client port to the full-NAT service.
    new_syn: Vec<u8>,
}

/// The tracked paths of one family (`family` prefixes the names: "" or "IPv6 "), the full-NAT
/// new-flow row last: it empties the flow tables between its runs.
fn lb_paths(
    family: &str,
    f: PathFrames,
    (front, back): (u32, u32),
    options: &CostOptions,
) -> Vec<Path_> {
    let path = |name: &str, frame, ingress, vary_flow, verdict, counters| Path_ {
        name: format!("xdp_lb {family}{name}"),
        frame,
        ingress,
        vary_flow,
        verdict,
        counters,
        repeat: options.repeat,
        flush_between_runs: false,
    };
    let new_flow: &'static [(&'static str, u64)] = &[("new_flow", 1), ("fwd_redirect", 1)];
    vec![
        path(
            "new flow, DSR (SYN, new 5-tuple every repeat)",
            f.dsr_syn,
            front,
            true,
            XDP_REDIRECT,
            new_flow,
        ),
        path(
            "established flow, full-NAT (ACK)",
            f.ack,
            front,
            false,
            XDP_REDIRECT,
            &[("fwd_redirect", 1), ("new_flow", 0)],
        ),
        path(
            "full-NAT reply translation",
            f.syn_ack,
            back,
            false,
            XDP_REDIRECT,
            &[("nat_reply_translated", 1), ("fwd_redirect", 1)],
        ),
        path(
            "non-VIP (pass)",
            f.non_vip,
            front,
            false,
            XDP_PASS,
            &[("pass_not_vip", 1)],
        ),
        Path_ {
            repeat: options.repeat.min(FULL_NAT_NEW_FLOW_REPEAT),
            flush_between_runs: true,
            ..path(
                "new flow, full-NAT (SYN, new 5-tuple every repeat)",
                f.new_syn,
                front,
                true,
                XDP_REDIRECT,
                new_flow,
            )
        },
    ]
}

/// `spec` moved onto the IPv6 VIP and the backends' IPv6 addresses (same ids).
fn service6(mut spec: ServiceSpec) -> ServiceSpec {
    spec.key.vip = IpAddr::V6(VIP6.into());
    for (backend, addr) in spec.backends.iter_mut().zip(BACKENDS6) {
        backend.addr = IpAddr::V6(addr.into());
    }
    spec
}

fn service(port: u16, mode: ForwardingMode, id: u32, first_backend_id: u32) -> ServiceSpec {
    ServiceSpec {
        key: ServiceKey {
            vip: IpAddr::V4(VIP.into()),
            port,
            proto: Protocol::Tcp,
        },
        source: Default::default(),
        owner: None,
        source_ranges: Vec::new(),
        xdp_only: false,
        mode,
        snat_addr: None,
        id,
        backends: BACKENDS
            .iter()
            .zip(first_backend_id..)
            .map(|(b, id)| BackendSpec {
                addr: IpAddr::V4((*b).into()),
                port: 8080,
                weight: 1,
                state: BackendState::Active,
                id,
                generation: 1,
            })
            .collect(),
    }
}

/// Starts the dataplane with its two services, and the harness around it. `syn_flood_rate`:
/// the SYN-flood mode's rate (0: every SYN tracked, as the new-flow rows measure).
fn open_bench(pin_root: &Path, syn_flood_rate: u64) -> Result<Bench> {
    let config = DataplaneConfig {
        pin_root: pin_root.to_path_buf(),
        interfaces: vec!["front".into(), "back".into()],
        xdp_mode: XdpAttachMode::Auto,
        max_services: 4,
        max_backends: 16,
        syn_flood_rate,
        ..DataplaneConfig::default()
    };
    let mut dataplane = Dataplane::start(&config)?;
    // Port 80: full-NAT (established, reply and new-flow rows). Port 81: DSR, for a new-flow
    // row of a million distinct flows, which one SNAT address could not hold in full-NAT.
    dataplane.apply_service(&service(80, ForwardingMode::FullNat, 0, 0))?;
    dataplane.apply_service(&service(81, ForwardingMode::Dsr, 1, 3))?;
    // The same two on the IPv6 VIP, over the backends' IPv6 addresses.
    dataplane.apply_service(&service6(service(80, ForwardingMode::FullNat, 2, 6)))?;
    dataplane.apply_service(&service6(service(81, ForwardingMode::Dsr, 3, 9)))?;

    for program in ["xdp_bench_harness", "xdp_drop"] {
        let program = xdp(&mut dataplane, program)?;
        datapath::bpf::load_retrying(|| program.load())?;
    }
    let drop_fd = xdp(&mut dataplane, "xdp_drop")?.fd()?.try_clone()?;
    let lb_fd = dataplane.program_mut()?.fd()?.try_clone()?;
    let bpf = dataplane.bpf_mut();
    let targets = ProgramArray::try_from(
        bpf.take_map(map_names::BENCH_TARGET)
            .context("BENCH_TARGET")?,
    )?;
    let template = Array::try_from(
        bpf.take_map(map_names::BENCH_TEMPLATE)
            .context("BENCH_TEMPLATE")?,
    )?;
    let gc = FlowGc::open(pin_root, GcConfig::default())?;
    Ok(Bench {
        dataplane,
        drop_fd,
        lb_fd,
        targets,
        template,
        gc,
    })
}

/// Puts every CPU of the dataplane under `pin_root` in SYN-flood mode for the next hour: a
/// window opened an hour ahead (the program compares saturating, so every packet falls in it)
/// and already over any rate.
fn force_syn_flood(pin_root: &Path) -> Result<()> {
    use aya::maps::{PerCpuArray, PerCpuValues};
    let map = MapData::from_pin(pin_root.join(map_names::SYN_FLOOD)).context("LB_SYN_FLOOD")?;
    let mut windows: PerCpuArray<MapData, bpf_common::SynFloodWindow> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map))?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| anyhow!("count CPUs: {e}"))?;
    let window = bpf_common::SynFloodWindow {
        window_start_ns: datapath::gc::monotonic_now_ns() + 3_600_000_000_000,
        new_flows: u64::MAX / 2,
        entered: 1,
        flooding: 1,
        _pad: 0,
    };
    windows.set(0, PerCpuValues::try_from(vec![window; cpus])?, 0)?;
    Ok(())
}

fn measure_all(options: &CostOptions, pin_root: &Path) -> Result<Vec<CostRow>> {
    let mut rows = measure_tracked(options, pin_root)?;
    // The SYN-flood row: a dataplane of its own, whose every CPU is over the rate.
    cleanup(pin_root)?;
    let mut bench = open_bench(pin_root, 1)?;
    force_syn_flood(pin_root)?;
    let front = if_index("front")?;
    let dsr_syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 81),
        true,
        false,
    )?;
    let mut row = measure(
        &mut bench,
        options,
        &Path_ {
            name:
                "xdp_lb new flow under a SYN flood, DSR (SYN, new 5-tuple every repeat, untracked)"
                    .into(),
            frame: dsr_syn,
            ingress: front,
            vary_flow: true,
            verdict: XDP_REDIRECT,
            counters: &[
                ("new_flow_untracked", 1),
                ("new_flow", 0),
                ("fwd_redirect", 1),
            ],
            repeat: options.repeat,
            flush_between_runs: false,
        },
    )?;
    let floor = rows.first().map(|r| r.ns.median).context("no floor row")?;
    row.ratio_to_xdp_drop = row.ns.median / floor;
    // Beside the tracked DSR new-flow row.
    rows.insert(2, row);
    Ok(rows)
}

fn measure_tracked(options: &CostOptions, pin_root: &Path) -> Result<Vec<CostRow>> {
    let mut bench = open_bench(pin_root, 0)?;
    let (front, back) = (if_index("front")?, if_index("back")?);

    let client_side = (CLIENT_MAC, FRONT_MAC);
    let dsr_syn = tcp_frame(client_side, (CLIENT, 40000), (VIP, 81), true, false)?;
    let syn = tcp_frame(client_side, (CLIENT, 40000), (VIP, 80), true, false)?;
    let new_syn = tcp_frame(client_side, (CLIENT, 50000), (VIP, 80), true, false)?;
    let ack = tcp_frame(client_side, (CLIENT, 40000), (VIP, 80), false, true)?;
    let non_vip = tcp_frame(client_side, (CLIENT, 40000), (LB_FRONT, 22), true, false)?;

    // Pin the flow once, directly, and learn its backend from the output frame.
    let first = bench.test_run("xdp_lb", &syn, front, 1)?;
    ensure!(
        first.verdict == XDP_REDIRECT,
        "first SYN: verdict {}",
        first.verdict
    );
    let backend: [u8; 4] = first.out[30..34].try_into()?;
    ensure!(BACKENDS.contains(&backend), "first SYN went to {backend:?}");
    let nat_port = u16::from_be_bytes(first.out[34..36].try_into()?);
    let backend_side = (BACK_MAC, backend_mac(backend));
    let want_ack = tcp_frame(
        backend_side,
        (LB_BACK, nat_port),
        (backend, 8080),
        false,
        true,
    )?;
    let syn_ack = tcp_frame(
        (backend_mac(backend), BACK_MAC),
        (backend, 8080),
        (LB_BACK, nat_port),
        true,
        true,
    )?;
    let want_reply = tcp_frame(
        (FRONT_MAC, CLIENT_MAC),
        (VIP, 80),
        (CLIENT, 40000),
        true,
        true,
    )?;

    // Output frames of single runs through the harness: each path rewrites as expected.
    bench.set_target(true)?;
    for (what, frame, ingress, want) in [
        ("established", &ack, front, &want_ack),
        ("non-VIP", &non_vip, front, &non_vip),
        ("reply", &syn_ack, back, &want_reply),
    ] {
        bench.set_template(frame, false)?;
        let one = bench.test_run("xdp_bench_harness", frame, ingress, 1)?;
        ensure!(
            one.out == *want,
            "{what}: output frame differs from the expected frame"
        );
    }

    let mut floor = Vec::new();
    for _ in 0..options.runs {
        let sample = bench.test_run("xdp_drop", &syn, front, options.repeat)?;
        ensure!(
            sample.verdict == XDP_DROP,
            "xdp_drop verdict {}",
            sample.verdict
        );
        floor.push(sample.ns);
    }
    let floor = Summary::of(&floor).context("no runs")?;
    let floor_median = floor.median;
    // The full-NAT new-flow row runs last: it empties the flow tables between its runs, which
    // would remove the flow the established and reply rows use.
    let mut rows = vec![CostRow {
        path: "xdp_drop (floor, no harness)".into(),
        ns: floor,
        ratio_to_xdp_drop: 1.0,
        verdict: "XDP_DROP",
        repeat: options.repeat,
        check: "verdict".into(),
    }];
    let paths = lb_paths(
        "",
        PathFrames {
            dsr_syn,
            ack,
            syn_ack,
            non_vip,
            new_syn,
        },
        (front, back),
        options,
    );
    for path in &paths {
        let mut row = measure(&mut bench, options, path)?;
        row.ratio_to_xdp_drop = row.ns.median / floor_median;
        rows.push(row);
    }
    for mut row in measure_ipv6(&mut bench, options)? {
        row.ratio_to_xdp_drop = row.ns.median / floor_median;
        rows.push(row);
    }
    Ok(rows)
}

/// The IPv6 rows: the same paths over the IPv6 VIP (through `xdp_lb`'s tail call into
/// `xdp_lb6`). Run after the IPv4 full-NAT new-flow row, whose flushes would remove the flow
/// the established and reply rows pin here.
fn measure_ipv6(bench: &mut Bench, options: &CostOptions) -> Result<Vec<CostRow>> {
    let (front, back) = (if_index("front")?, if_index("back")?);
    let client_side = (CLIENT_MAC, FRONT_MAC);
    let syn = tcp6_frame(client_side, (CLIENT6, 40000), (VIP6, 80), true, false)?;
    let first = bench.test_run("xdp_lb", &syn, front, 1)?;
    ensure!(
        first.verdict == XDP_REDIRECT,
        "first IPv6 SYN: verdict {}",
        first.verdict
    );
    let backend: [u8; 16] = first.out[38..54].try_into()?;
    ensure!(
        BACKENDS6.contains(&backend),
        "first IPv6 SYN went to {backend:?}"
    );
    let nat_port = u16::from_be_bytes(first.out[54..56].try_into()?);
    let mac = backend_mac([0, 0, 0, backend[15]]);
    let ack = tcp6_frame(client_side, (CLIENT6, 40000), (VIP6, 80), false, true)?;
    let want_ack = tcp6_frame(
        (BACK_MAC, mac),
        (LB_BACK6, nat_port),
        (backend, 8080),
        false,
        true,
    )?;
    let syn_ack = tcp6_frame(
        (mac, BACK_MAC),
        (backend, 8080),
        (LB_BACK6, nat_port),
        true,
        true,
    )?;
    let want_reply = tcp6_frame(
        (FRONT_MAC, CLIENT_MAC),
        (VIP6, 80),
        (CLIENT6, 40000),
        true,
        true,
    )?;
    let non_vip = tcp6_frame(client_side, (CLIENT6, 40000), (LB_FRONT6, 22), true, false)?;
    bench.set_target(true)?;
    for (what, frame, ingress, want) in [
        ("IPv6 established", &ack, front, &want_ack),
        ("IPv6 non-VIP", &non_vip, front, &non_vip),
        ("IPv6 reply", &syn_ack, back, &want_reply),
    ] {
        bench.set_template(frame, false)?;
        let one = bench.test_run("xdp_bench_harness", frame, ingress, 1)?;
        ensure!(
            one.out == *want,
            "{what}: output frame differs from the expected frame"
        );
    }
    let frames = PathFrames {
        dsr_syn: tcp6_frame(client_side, (CLIENT6, 40000), (VIP6, 81), true, false)?,
        ack,
        syn_ack,
        non_vip,
        new_syn: tcp6_frame(client_side, (CLIENT6, 50000), (VIP6, 80), true, false)?,
    };
    let paths = lb_paths("IPv6 ", frames, (front, back), options);
    paths
        .iter()
        .map(|path| measure(bench, options, path))
        .collect()
}
