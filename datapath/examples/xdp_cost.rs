//! Per-program cost of `xdp_lb` in ns/packet through BPF_PROG_TEST_RUN
//! (`cargo xtask bench` runs this; `--smoke` is the test suite's short run).
//!
//! Repeats of BPF_PROG_TEST_RUN share one buffer, so a rewriting path would measure its own
//! output from the second repeat on. Every `xdp_lb` path is therefore measured through
//! `xdp_bench_harness`, which restores the frame from a template map on every repeat (and, for
//! the new-flow row, gives each repeat a new 5-tuple) and tail-calls the program under test.
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
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    maps::{Array, MapData, ProgramArray},
    programs::{ProgramFd, TestRun as _, TestRunOptions, Xdp},
};
use bpf_common::{BENCH_FRAME_MAX, BenchTemplate, map_names};
use datapath::dataplane::{Dataplane, DataplaneConfig, XdpAttachMode, cleanup};
use datapath_api::{BackendSpec, BackendState, ForwardingMode, Protocol, ServiceKey, ServiceSpec};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, TcpHeader};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const LB_FRONT: [u8; 4] = [198, 18, 0, 2];
const LB_BACK: [u8; 4] = [198, 18, 1, 1];
const VIP: [u8; 4] = [198, 18, 100, 1];
const BACKENDS: [[u8; 4]; 3] = [[198, 18, 1, 11], [198, 18, 1, 12], [198, 18, 1, 13]];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const FRONT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];

fn backend_mac(addr: [u8; 4]) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, addr[3]]
}

struct Args {
    repeat: u32,
    runs: usize,
    json: Option<PathBuf>,
    write_results: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        repeat: 1_000_000,
        runs: 5,
        json: None,
        write_results: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--repeat" => args.repeat = it.next().context("--repeat N")?.parse()?,
            "--runs" => args.runs = it.next().context("--runs K")?.parse()?,
            "--json" => args.json = Some(it.next().context("--json PATH")?.into()),
            "--write-results" => args.write_results = true,
            "--smoke" => {
                args.repeat = 10_000;
                args.runs = 1;
            }
            "-h" | "--help" => {
                println!(
                    "xdp_cost [--repeat N (1000000)] [--runs K (5)] [--smoke] [--json PATH] \
                     [--write-results]\n\nMeasures xdp_lb's ns/packet per path through \
                     BPF_PROG_TEST_RUN, beside xdp_drop (root only)."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    ensure!(
        args.repeat > 0 && args.runs > 0,
        "--repeat and --runs must be positive"
    );
    Ok(args)
}

// ---------------------------------------------------------------------------------------------
// Namespace.
// ---------------------------------------------------------------------------------------------

fn run(args: &[&str]) -> Result<()> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawn {args:?}"))?;
    ensure!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// A named network namespace this thread has entered; dropping it goes back and deletes it.
struct Netns {
    name: String,
    original: File,
}

impl Netns {
    fn enter(name: String) -> Result<Self> {
        run(&["ip", "netns", "add", &name])?;
        let original = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(format!("/var/run/netns/{name}"))?;
        // SAFETY: setns on valid namespace fds affects only this thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        ensure!(rc == 0, "setns: {}", std::io::Error::last_os_error());
        Ok(Self { name, original })
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["ip", "-n", self.name.as_str()];
        full.extend_from_slice(args);
        run(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // SAFETY: as in `enter`.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
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
/// permanent so `bpf_fib_lookup` answers deterministically.
fn build_topology(ns: &Netns) -> Result<()> {
    ns.ip(&["link", "set", "lo", "up"])?;
    // The program is really attached: IPv6 router solicitations on the new links would move
    // the counters the rows check exactly. Off before any link exists.
    for key in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        run(&["ip", "netns", "exec", &ns.name, "sysctl", "-qw", key])?;
    }
    ns.ip(&[
        "link",
        "add",
        "front",
        "type",
        "veth",
        "peer",
        "name",
        "front-peer",
    ])?;
    ns.ip(&[
        "link",
        "add",
        "back",
        "type",
        "veth",
        "peer",
        "name",
        "back-peer",
    ])?;
    ns.ip(&["link", "set", "front", "address", &mac_str(FRONT_MAC)])?;
    ns.ip(&["link", "set", "back", "address", &mac_str(BACK_MAC)])?;
    for dev in ["front", "front-peer", "back", "back-peer"] {
        ns.ip(&["link", "set", dev, "up"])?;
    }
    ns.ip(&["addr", "add", "198.18.0.2/24", "dev", "front"])?;
    ns.ip(&["addr", "add", "198.18.1.1/24", "dev", "back"])?;
    let client_mac = mac_str(CLIENT_MAC);
    ns.ip(&[
        "neigh",
        "replace",
        "198.18.0.1",
        "lladdr",
        &client_mac,
        "dev",
        "front",
        "nud",
        "permanent",
    ])?;
    for b in BACKENDS {
        let addr = Ipv4Addr::from(b).to_string();
        let mac = mac_str(backend_mac(b));
        ns.ip(&[
            "neigh",
            "replace",
            &addr,
            "lladdr",
            &mac,
            "dev",
            "back",
            "nud",
            "permanent",
        ])?;
    }
    run(&[
        "ip",
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ])
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

// ---------------------------------------------------------------------------------------------
// Measurement.
// ---------------------------------------------------------------------------------------------

struct Bench {
    dataplane: Dataplane,
    drop_fd: ProgramFd,
    lb_fd: ProgramFd,
    targets: ProgramArray<MapData>,
    template: Array<MapData, BenchTemplate>,
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

struct Row {
    path: &'static str,
    ns: Vec<f64>,
    verdict: u32,
    check: String,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// One measured `xdp_lb` path.
struct Path_ {
    name: &'static str,
    frame: Vec<u8>,
    ingress: u32,
    vary_flow: bool,
    verdict: u32,
    /// Reason counters and how much each must rise per packet.
    counters: &'static [(&'static str, u64)],
}

/// Per run: (harness -> xdp_lb) - (harness -> xdp_drop), checking the verdict and that the
/// reason counters rose by exactly the repeat count.
fn measure(bench: &mut Bench, args: &Args, path: &Path_) -> Result<Row> {
    bench.set_template(&path.frame, path.vary_flow)?;
    let mut ns = Vec::new();
    for _ in 0..args.runs {
        bench.set_target(false)?;
        let harness =
            bench.test_run("xdp_bench_harness", &path.frame, path.ingress, args.repeat)?;
        ensure!(
            harness.verdict == XDP_DROP,
            "{}: harness->drop returned {}",
            path.name,
            harness.verdict
        );
        bench.set_target(true)?;
        let before = bench.reasons()?;
        let measured =
            bench.test_run("xdp_bench_harness", &path.frame, path.ingress, args.repeat)?;
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
            let want = u64::from(args.repeat) * per_packet;
            ensure!(
                rose == want,
                "{}: counter {name} rose by {rose}, expected {want}",
                path.name
            );
        }
        ns.push(measured.ns - harness.ns);
    }
    let check = path
        .counters
        .iter()
        .map(|(name, n)| format!("{name} +{}", u64::from(args.repeat) * n))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Row {
        path: path.name,
        ns,
        verdict: path.verdict,
        check,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "xdp_cost needs root (BPF, network namespaces)"
    );
    let name = format!("dpbench{}", std::process::id());
    let netns = Netns::enter(name.clone())?;
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/{name}"));
    let result = build_topology(&netns).and_then(|()| bench(&args, &pin_root));
    let _ = cleanup(&pin_root);
    drop(netns);
    result
}

fn bench(args: &Args, pin_root: &Path) -> Result<()> {
    let config = DataplaneConfig {
        pin_root: pin_root.to_path_buf(),
        interfaces: vec!["front".into(), "back".into()],
        xdp_mode: XdpAttachMode::Auto,
        max_services: 4,
        max_backends: 16,
        ..DataplaneConfig::default()
    };
    let mut dataplane = Dataplane::start(&config)?;
    let service = ServiceSpec {
        key: ServiceKey {
            vip: IpAddr::V4(VIP.into()),
            port: 80,
            proto: Protocol::Tcp,
        },
        mode: ForwardingMode::FullNat,
        snat_addr: None,
        id: 0,
        backends: BACKENDS
            .iter()
            .zip(0u32..)
            .map(|(b, id)| BackendSpec {
                addr: IpAddr::V4((*b).into()),
                port: 8080,
                weight: 1,
                state: BackendState::Active,
                id,
                generation: 1,
            })
            .collect(),
    };
    dataplane.apply_service(&service)?;
    // The new-flow row uses a DSR service: a million distinct full-NAT flows from one SNAT
    // address would exhaust its ~64k source ports per backend (a real capacity limit, counted
    // as drop_nat_ports_exhausted), which is not the path this row measures.
    let mut dsr = service.clone();
    dsr.key.port = 81;
    dsr.mode = ForwardingMode::Dsr;
    dsr.id = 1;
    for backend in &mut dsr.backends {
        backend.id += 3;
    }
    dataplane.apply_service(&dsr)?;

    for program in ["xdp_bench_harness", "xdp_drop"] {
        xdp(&mut dataplane, program)?.load()?;
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
    let mut bench = Bench {
        dataplane,
        drop_fd,
        lb_fd,
        targets,
        template,
    };
    let (front, back) = (if_index("front")?, if_index("back")?);

    let dsr_syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 81),
        true,
        false,
    )?;
    let syn = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 80),
        true,
        false,
    )?;
    let ack = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (VIP, 80),
        false,
        true,
    )?;
    let non_vip = tcp_frame(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT, 40000),
        (LB_FRONT, 22),
        true,
        false,
    )?;

    // Pin the flow once, directly, and learn its backend from the output frame.
    let first = bench.test_run("xdp_lb", &syn, front, 1)?;
    ensure!(
        first.verdict == XDP_REDIRECT,
        "first SYN: verdict {}",
        first.verdict
    );
    let backend: [u8; 4] = first.out[30..34].try_into()?;
    ensure!(BACKENDS.contains(&backend), "first SYN went to {backend:?}");
    let backend_side = (BACK_MAC, backend_mac(backend));
    let want_ack = tcp_frame(backend_side, (LB_BACK, 40000), (backend, 8080), false, true)?;
    let syn_ack = tcp_frame(
        (backend_mac(backend), BACK_MAC),
        (backend, 8080),
        (LB_BACK, 40000),
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

    let mut rows = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..args.runs {
        let sample = bench.test_run("xdp_drop", &syn, front, args.repeat)?;
        ensure!(
            sample.verdict == XDP_DROP,
            "xdp_drop verdict {}",
            sample.verdict
        );
        floor.push(sample.ns);
    }
    rows.push(Row {
        path: "xdp_drop (floor, no harness)",
        ns: floor,
        verdict: XDP_DROP,
        check: "verdict".into(),
    });
    let paths = [
        Path_ {
            name: "xdp_lb new flow, DSR (SYN, new 5-tuple every repeat)",
            frame: dsr_syn,
            ingress: front,
            vary_flow: true,
            verdict: XDP_REDIRECT,
            counters: &[("new_flow", 1), ("fwd_redirect", 1)],
        },
        Path_ {
            name: "xdp_lb established flow (ACK)",
            frame: ack,
            ingress: front,
            vary_flow: false,
            verdict: XDP_REDIRECT,
            counters: &[("fwd_redirect", 1), ("new_flow", 0)],
        },
        Path_ {
            name: "xdp_lb full-NAT reply translation",
            frame: syn_ack,
            ingress: back,
            vary_flow: false,
            verdict: XDP_REDIRECT,
            counters: &[("nat_reply_translated", 1), ("fwd_redirect", 1)],
        },
        Path_ {
            name: "xdp_lb non-VIP (pass)",
            frame: non_vip,
            ingress: front,
            vary_flow: false,
            verdict: XDP_PASS,
            counters: &[("pass_not_vip", 1)],
        },
    ];
    for path in &paths {
        rows.push(measure(&mut bench, args, path)?);
    }
    report(args, &rows)
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn report(args: &Args, rows: &[Row]) -> Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let machine = format!(
        "{} | {cpu} | {} CPUs | kernel {}",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        command_line("uname", &["-r"]),
    );
    let floor = median(&rows[0].ns);
    let mut table = format!(
        "xdp_lb cost per packet: BPF_PROG_TEST_RUN, repeat {}, median of {} runs. Rewriting \
         paths go through the template-restoring harness; its cost, measured against xdp_drop \
         in the same run, is subtracted.\n{machine}\n\n\
         | path | ns/packet (median) | min | max | x xdp_drop | verdict | path check |\n\
         | --- | ---: | ---: | ---: | ---: | --- | --- |\n",
        args.repeat, args.runs
    );
    let verdict_name = |v| match v {
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "?",
    };
    let mut json_rows = Vec::new();
    for row in rows {
        let med = median(&row.ns);
        let min = row.ns.iter().copied().fold(f64::INFINITY, f64::min);
        let max = row.ns.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        table.push_str(&format!(
            "| {} | {med:.1} | {min:.1} | {max:.1} | {:.2} | {} | {} |\n",
            row.path,
            med / floor,
            verdict_name(row.verdict),
            row.check
        ));
        json_rows.push(serde_json::json!({
            "path": row.path,
            "ns_median": med,
            "ns_min": min,
            "ns_max": max,
            "ratio_to_xdp_drop": med / floor,
            "verdict": verdict_name(row.verdict),
            "check": row.check,
            "runs_ns": row.ns,
        }));
    }
    print!("{table}");
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "machine": machine,
            "repeat": args.repeat,
            "runs": args.runs,
            "rows": json_rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    if args.write_results {
        let body = format!(
            "# perf results\n\nReproduce: `cargo xtask bench` (as root).\n\n{table}\n\
             The machine is shared and noisy: compare medians, and ratios within one run.\n"
        );
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../perf/RESULTS.md"),
            body,
        )?;
    }
    Ok(())
}
