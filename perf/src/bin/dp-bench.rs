//! `dp-bench`: the benchmark suite behind `cargo xtask bench`.
//!
//! Runs, in one invocation, the per-program cost rows, the forwarding-rate rows (XDP load
//! balancer, nftables DNAT, XDP_DROP floor) and the daemon's footprint, reads the control-plane
//! criterion results that `cargo xtask bench` produced just before, and prints one table. With
//! `--write-results` the table goes to `perf/RESULTS.md`, with `--json` to a JSON file.
//! Benchmarks print figures; nothing here asserts a timing.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use dp_perf::{
    cost::{self, CostOptions, CostRow},
    forward::{self, ForwardOptions, ForwardReport},
    report::Summary,
};
use serde::Serialize;

/// The datapath's benchmark suite (root only). Prefer `cargo xtask bench`, which builds
/// everything in release mode and runs the criterion benches first.
#[derive(Parser)]
#[command(name = "dp-bench", version)]
struct Args {
    /// Short run that only proves every benchmark still works (the test suite uses it).
    #[arg(long)]
    smoke: bool,
    /// BPF_PROG_TEST_RUN repeats per cost run (default 1,000,000; smoke 10,000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    repeat: Option<u32>,
    /// Runs per row; rows report the median (default 5; smoke 1).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..=50))]
    runs: Option<u64>,
    /// Seconds per forwarding run (default 2; smoke 0.5).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Which parts to run.
    #[arg(long, value_enum, default_value_t = Part::All)]
    only: Part,
    /// `datapathd` binary (default: next to this one).
    #[arg(long, env = "DATAPATHD_BIN", value_name = "PATH")]
    datapathd: Option<PathBuf>,
    /// `lb-ctl` binary (default: next to this one).
    #[arg(long, env = "LB_CTL_BIN", value_name = "PATH")]
    lb_ctl: Option<PathBuf>,
    /// Where the criterion results are (`target/criterion`) and where the latency JSON is
    /// (`target/bench`); both are optional, rows are left out when missing.
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Write the table to perf/RESULTS.md.
    #[arg(long)]
    write_results: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    All,
    Cost,
    Forward,
    /// Only the daemon's idle footprint (one window per `--runs`, default 5), printed; not
    /// part of `all`, which measures it with the forwarding rows.
    Footprint,
    /// Only how fast the daemon follows the node over netlink (link -> attached, neighbour ->
    /// FIB generation, idle CPU over 60 s), printed; not part of `all`.
    Netlink,
    /// Only the Kubernetes service source at scale (initial sync of 10,000 Services x 10
    /// endpoints, one EndpointSlice change until live, RSS), printed; not part of `all`.
    Kubernetes,
    /// Only the socket LB: one `connect()` through it against direct and nftables DNAT, and
    /// connections per second at 1, 10 and 1,000 services, printed; not part of `all`.
    Socklb,
    /// Only the DNS module: answers parsed per second on one core, kernel to store with loss
    /// counted, the capture's cost on other packets against an empty TCX program, memory per
    /// 100,000 names, printed; not part of `all`.
    Dns,
    /// Only the exec module: ring records decoded into the process cache per second, the
    /// fork+exec overhead with the tracer on against off, memory at 10,000 processes, printed;
    /// not part of `all`.
    Exec,
    /// Only the service dependency graph: the cost of one flow event in the graph controller
    /// on one core, with and without names and owners, and memory at 10,000 edges, printed;
    /// no daemon, no BPF; not part of `all`.
    Graph,
}

#[derive(Serialize)]
struct ControlPlaneRow {
    benchmark: String,
    median_ms: f64,
}

#[derive(Serialize)]
struct Results {
    machine: String,
    date: String,
    smoke: bool,
    cost: Vec<CostRow>,
    forward: Option<ForwardReport>,
    /// Why the forwarding rows were not measured (the kernel refused live frames).
    forward_skipped: Option<String>,
    control_plane: Vec<ControlPlaneRow>,
    lb_ctl_latency: Option<serde_json::Value>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "dp-bench needs root (BPF, network namespaces)"
    );
    let runs = args.runs.map(|r| r as usize);
    if args.only == Part::Footprint {
        // A partial run: the results file is only rewritten from a whole one.
        ensure!(
            !args.write_results,
            "--write-results needs the whole suite (--only all)"
        );
        return footprint_alone(&args, runs.unwrap_or(if args.smoke { 1 } else { 5 }));
    }
    if args.only == Part::Kubernetes {
        ensure!(
            !args.write_results,
            "--write-results needs the whole suite (--only all)"
        );
        return kubernetes_alone(&args);
    }
    if args.only == Part::Socklb {
        ensure!(
            !args.write_results,
            "--write-results needs the whole suite (--only all)"
        );
        return socklb_alone(&args);
    }
    if args.only == Part::Exec {
        ensure!(
            !args.write_results,
            "--write-results needs the whole suite (--only all)"
        );
        return exec_alone(&args);
    }
    if args.only == Part::Graph {
        ensure!(
            !args.write_results,
            "--write-results needs the whole suite (--only all)"
        );
        return graph_alone(&args);
    }
    if args.only == Part::Dns {
        ensure!(
            !args.write_results,
            "--write-results needs the whole suite (--only all)"
        );
        return dns_alone(&args);
    }
    if args.only == Part::Netlink {
        ensure!(
            !args.write_results,
            "--write-results needs the whole suite (--only all)"
        );
        return netlink_alone(&args);
    }
    let (datapathd, lb_ctl) = binaries(&args)?;

    let cost_rows = if args.only == Part::All || args.only == Part::Cost {
        let mut options = if args.smoke {
            CostOptions::smoke()
        } else {
            CostOptions::full()
        };
        options.repeat = args.repeat.unwrap_or(options.repeat);
        options.runs = runs.unwrap_or(options.runs);
        eprintln!(
            "dp-bench: per-program cost ({} repeats x {} runs)",
            options.repeat, options.runs
        );
        cost::run(&options).context("per-program cost")?
    } else {
        Vec::new()
    };

    let forward = if args.only == Part::All || args.only == Part::Forward {
        for binary in [&datapathd, &lb_ctl] {
            ensure!(
                binary.is_file(),
                "{} not found (build it, or pass --datapathd/--lb-ctl)",
                binary.display()
            );
        }
        let mut options = if args.smoke {
            ForwardOptions::smoke(datapathd.clone(), lb_ctl.clone())
        } else {
            ForwardOptions::new(datapathd.clone(), lb_ctl.clone())
        };
        options.runs = runs.unwrap_or(options.runs);
        if let Some(seconds) = args.duration {
            ensure!(
                (0.1..=30.0).contains(&seconds),
                "--duration must be between 0.1 and 30 seconds"
            );
            options.duration = Duration::from_secs_f64(seconds);
        }
        eprintln!(
            "dp-bench: forwarding rate ({:?} flows, {} runs of {:?})",
            options.flow_counts, options.runs, options.duration
        );
        match forward::run(&options) {
            Ok(report) => (Some(report), None),
            // The generator cannot run on this kernel: nothing here can be measured, and
            // the rest of the suite can. Said loudly, and in the results.
            Err(e) if dp_perf::pktgen::live_frames_refused(&e) => {
                eprintln!("dp-bench: forwarding rate NOT MEASURED: {e:#}");
                (None, Some(format!("{e:#}")))
            }
            Err(e) => return Err(e.context("forwarding rate")),
        }
    } else {
        (None, None)
    };
    let (forward, forward_skipped) = forward;

    let target_dir = args
        .target_dir
        .clone()
        .unwrap_or_else(|| netns_tests::daemon::workspace_root().join("target"));
    let control_plane = criterion_rows(&target_dir.join("criterion"));
    let lb_ctl_latency =
        std::fs::read_to_string(target_dir.join("bench/control_plane_latency.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok());

    let results = Results {
        machine: machine(),
        date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        smoke: args.smoke,
        cost: cost_rows,
        forward,
        forward_skipped,
        control_plane,
        lb_ctl_latency,
    };
    let table = render(&results);
    print!("{table}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.write_results {
        let path = netns_tests::daemon::workspace_root().join("perf/RESULTS.md");
        // Sections written by hand (other tools' figures) follow the marker and are kept.
        let kept = std::fs::read_to_string(&path)
            .ok()
            .and_then(|old| old.find(KEPT_MARKER).map(|at| old[at..].to_string()))
            .unwrap_or_else(|| format!("{KEPT_MARKER}\n"));
        let body = format!(
            "# perf results\n\nReproduce: `cargo xtask bench` (as root, on an idle machine; \
             about 10 minutes).\n\n{table}\n{kept}"
        );
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The `datapathd` and `lb-ctl` to run: as given, else next to this binary.
fn binaries(args: &Args) -> Result<(PathBuf, PathBuf)> {
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("binary without a directory")?
        .to_path_buf();
    let datapathd = args
        .datapathd
        .clone()
        .unwrap_or_else(|| exe_dir.join("datapathd"));
    let lb_ctl = args
        .lb_ctl
        .clone()
        .unwrap_or_else(|| exe_dir.join("lb-ctl"));
    Ok((datapathd, lb_ctl))
}

/// `--only kubernetes`: see `dp_perf::kubernetes`.
fn kubernetes_alone(args: &Args) -> Result<()> {
    let (datapathd, lb_ctl) = binaries(args)?;
    eprintln!("dp-bench: kubernetes (initial sync, slice change to live, RSS)");
    let r = dp_perf::kubernetes::run(datapathd, lb_ctl, args.smoke)?;
    let p99 = dp_perf::netlink::p99;
    print!(
        "{} | {}\n\n### The Kubernetes source: {} Services x {} endpoints\n\n\
         | measure | value |\n| --- | ---: |\n\
         | initial sync, daemon start -> all programmed | {:.2} s |\n\
         | initial sync, API answering -> all programmed | {:.2} s |\n\
         | one EndpointSlice change -> live in LB_BACKENDS, p50 / p99 / max ({} changes) | {:.2} / {:.2} / {:.2} ms |\n\
         | daemon RSS after the changes (peak) | {:.1} MiB ({:.1} MiB) |\n\
         | of which heap and stacks / mapped files and maps | {:.1} / {:.1} MiB |\n",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine(),
        r.services,
        r.endpoints_per_service,
        r.sync_from_start_s,
        r.sync_from_ready_s,
        r.change_ms.samples.len(),
        r.change_ms.median,
        p99(&r.change_ms),
        r.change_ms.max,
        r.rss.total,
        r.rss.peak,
        r.rss.anon,
        r.rss.file,
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `--only socklb`: see `dp_perf::socklb`.
fn socklb_alone(args: &Args) -> Result<()> {
    let (datapathd, lb_ctl) = binaries(args)?;
    eprintln!(
        "dp-bench: socklb (connect() cost, the program's own run time, connections per second)"
    );
    let r = dp_perf::socklb::run(datapathd, lb_ctl, args.smoke)?;
    print!(
        "{} | {}\n\n### Socket LB: one TCP connect() from the node ({} rounds of {} connects; \
         a round's figure is the median of its connects, a row's the median over rounds; \
         \"over direct\" is the median of the rounds' paired differences)\n\n\
         | path | us per connect() | over direct | ratio | median of the round means |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine(),
        r.rounds,
        r.connects_per_round,
    );
    let direct = r.connect[0].us.median;
    for row in &r.connect {
        println!(
            "| {} | {:.2} | {:+.2} | {:.3} | {:.2} |",
            row.path,
            row.us.median,
            row.over_direct_us.median,
            row.us.median / direct,
            row.mean_us.median,
        );
    }
    print!(
        "\n| program (kernel BPF statistics, about one clock read included) | ns per run |\n\
         | --- | ---: |\n"
    );
    for row in &r.program {
        println!("| {} | {:.0} |", row.path, row.ns.median);
    }
    print!(
        "\n| services | connections per second (connect and close, one thread) |\n| ---: | ---: |\n"
    );
    for row in &r.cps {
        println!("| {} | {:.0} |", row.services, row.cps.median);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `--only exec`: see `dp_perf::exec`.
fn exec_alone(args: &Args) -> Result<()> {
    eprintln!("dp-bench: exec (records to cache, kernel ring to bus, fork+exec overhead, memory)");
    let r = dp_perf::exec::run(args.smoke)?;
    let (off, on) = (r.spawn_us_off.median, r.spawn_us_on.median);
    print!(
        "{} | {}\n\n### Processes followed (exec module)\n\n| measure | median | min | max |\n\
         | --- | ---: | ---: | ---: |\n",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine(),
    );
    println!(
        "| ring records decoded into the cache per second, one core ({} a round, {} rounds) | {:.0}/s | {:.0} | {:.0} |",
        r.records_per_round,
        r.records_per_second.samples.len(),
        r.records_per_second.median,
        r.records_per_second.min,
        r.records_per_second.max
    );
    println!(
        "| kernel ring buffer to the bus: records delivered to a subscriber per second ({} written a round, {} rounds; {} delivered, {} lost to a full ring) | {:.0}/s | {:.0} | {:.0} |",
        r.ring_records_per_round,
        r.ring_to_bus_per_second.samples.len(),
        r.ring_delivered,
        r.ring_lost,
        r.ring_to_bus_per_second.median,
        r.ring_to_bus_per_second.min,
        r.ring_to_bus_per_second.max
    );
    println!(
        "| baseline, same run: the same drain with aya's RingBuf::next as the reader ({} delivered, {} lost) | {:.0}/s | {:.0} | {:.0} |",
        r.ring_aya_delivered,
        r.ring_aya_lost,
        r.ring_aya_per_second.median,
        r.ring_aya_per_second.min,
        r.ring_aya_per_second.max
    );
    println!(
        "| ratio of the medians, daemon's reader / aya's | {:.2} | | |",
        r.ring_to_bus_per_second.median / r.ring_aya_per_second.median
    );
    for (what, s) in [
        (
            "spawn and wait of /bin/true, tracer off (us)",
            &r.spawn_us_off,
        ),
        (
            "spawn and wait of /bin/true, tracer on (us)",
            &r.spawn_us_on,
        ),
    ] {
        println!("| {what} | {:.1} | {:.1} | {:.1} |", s.median, s.min, s.max);
    }
    println!(
        "\nfork+exec overhead with the tracer on: {:+.1}% ({} spawns a round, interleaved); \
         {} events traced, {} not sent\n\nmemory: {:.2} MiB for 10,000 processes (heap)",
        (on / off - 1.0) * 100.0,
        r.spawns_per_round,
        r.traced_events,
        r.lost_events,
        r.memory_bytes_10k / (1024.0 * 1024.0),
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `--only graph`: see `dp_perf::graph`.
fn graph_alone(args: &Args) -> Result<()> {
    eprintln!("dp-bench: graph (cost per flow event, memory at 10,000 edges)");
    let r = dp_perf::graph::run(args.smoke)?;
    print!(
        "{} | {}\n\n### Service dependency graph (graph module)\n\n\
         | measure | median | min | max |\n| --- | ---: | ---: | ---: |\n",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine(),
    );
    for (what, s, wall) in [
        (
            "services only",
            &r.ns_per_event_services,
            &r.wall_ns_per_event_services,
        ),
        (
            "names and owners joined",
            &r.ns_per_event_joined,
            &r.wall_ns_per_event_joined,
        ),
    ] {
        println!(
            "| ns per flow event, one core (CPU time), {what} ({} events a round, {} rounds; wall clock median {:.0} ns) | {:.0} ns | {:.0} | {:.0} |",
            r.events_per_round,
            s.samples.len(),
            wall.median,
            s.median,
            s.min,
            s.max
        );
    }
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let per_edge = |b: f64| b / r.edges as f64;
    println!(
        "\n{} services, {} clients, {} edges (graph.max_edges: {} evicted over all rounds)\n\n\
         memory at {} edges ({} flows, heap):\n\n\
         | | services only | names and owners joined |\n| --- | ---: | ---: |\n\
         | the controller | {:.2} MiB | {:.2} MiB |\n\
         | the graph alone | {:.2} MiB ({:.0} B an edge) | {:.2} MiB ({:.0} B an edge) |\n\
         | the controller after a round of the cost ({} flows; median) | {:.2} MiB | {:.2} MiB |",
        r.services,
        r.clients,
        r.edges,
        r.evicted,
        r.edges,
        r.memory_flows,
        mib(r.memory_controller_services),
        mib(r.memory_controller_joined),
        mib(r.memory_graph_services),
        per_edge(r.memory_graph_services),
        mib(r.memory_graph_joined),
        per_edge(r.memory_graph_joined),
        r.flows_per_round,
        mib(r.round_heap_services.median),
        mib(r.round_heap_joined.median),
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `--only dns`: see `dp_perf::dns`.
fn dns_alone(args: &Args) -> Result<()> {
    eprintln!("dp-bench: dns (parse rate, kernel to store, capture cost, memory)");
    let r = dp_perf::dns::run(args.smoke)?;
    let over = r.capture_other_ns.median - r.empty_ns.median;
    print!(
        "{} | {}\n\n### DNS names from captured answers\n\n| measure | median | min | max |\n\
         | --- | ---: | ---: | ---: |\n",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine(),
    );
    let row = |what: &str, s: &Summary, unit: &str| {
        println!(
            "| {what} | {:.0} {unit} | {:.0} | {:.0} |",
            s.median, s.min, s.max
        )
    };
    row(
        &format!(
            "answers parsed and stored per second, one core ({} frames a round, {} rounds)",
            r.frames_per_round,
            r.parse_per_second.samples.len()
        ),
        &r.parse_per_second,
        "/s",
    );
    let ns = |what: &str, s: &Summary| {
        println!(
            "| {what} | {:.1} ns | {:.1} | {:.1} |",
            s.median, s.min, s.max
        )
    };
    ns(
        "non-DNS TCP packet through dns_ingress",
        &r.capture_other_ns,
    );
    ns(
        "the same through an empty TCX program (tc_next)",
        &r.empty_ns,
    );
    ns(
        "a DNS answer through dns_ingress (its copy into the ring included)",
        &r.capture_answer_ns,
    );
    println!(
        "\ncapture over the empty program on non-DNS packets: {over:+.1} ns (median of each)\n\n\
         kernel to store ({:.1} s, dns_ingress by BPF_PROG_TEST_RUN on one CPU, the reader on \
         another): {} sent, {} learned ({:.0}/s), lost: {} to a full ring\n\n\
         memory: {:.1} MiB per 100,000 names (heap, each a name, a CNAME and an address)",
        r.pipeline_seconds,
        r.pipeline_sent,
        r.pipeline_learned,
        r.pipeline_per_second,
        r.pipeline_lost_buffer_full,
        r.memory_bytes_per_100k_names / (1024.0 * 1024.0),
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `--only netlink`: see `dp_perf::netlink`.
fn netlink_alone(args: &Args) -> Result<()> {
    let (datapathd, lb_ctl) = binaries(args)?;
    eprintln!("dp-bench: netlink (links, neighbours, idle CPU)");
    let r = dp_perf::netlink::run(datapathd, lb_ctl, args.smoke)?;
    let p99 = dp_perf::netlink::p99;
    print!(
        "{} | {}\n\n### datapathd following the node over netlink\n\n\
         | measure | samples | p50 (ms) | p99 (ms) | max (ms) |\n| --- | ---: | ---: | ---: | ---: |\n\
         | link appears -> XDP attached (pinned) | {} | {:.2} | {:.2} | {:.2} |\n\
         | neighbour change -> FIB generation, from RTM_NEWNEIGH sent (upper bound) | {} | {:.2} | {:.2} | {:.2} |\n\
         | neighbour change -> FIB generation, from its sendmsg returning (lower bound) | {} | {:.2} | {:.2} | {:.2} |\n\n\
         Idle CPU over {} s (XDP on lbc and lbb, TCX policy on lbb, a UDP service with 4 \
         backends; before the {} extra interfaces): {:.3} %\n",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine(),
        r.attach_ms.samples.len(),
        r.attach_ms.median,
        p99(&r.attach_ms),
        r.attach_ms.max,
        r.bump_from_send_ms.samples.len(),
        r.bump_from_send_ms.median,
        p99(&r.bump_from_send_ms),
        r.bump_from_send_ms.max,
        r.bump_from_sent_ms.samples.len(),
        r.bump_from_sent_ms.median,
        p99(&r.bump_from_sent_ms),
        r.bump_from_sent_ms.max,
        r.idle_window_s,
        r.attach_ms.samples.len(),
        r.idle_cpu_percent,
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `--only footprint`: the idle daemon over `windows` windows of 1 s.
fn footprint_alone(args: &Args, windows: usize) -> Result<()> {
    let (datapathd, lb_ctl) = binaries(args)?;
    eprintln!("dp-bench: idle footprint ({windows} windows of 1 s)");
    let idle = forward::idle_footprint(datapathd, lb_ctl, windows).context("idle footprint")?;
    print!(
        "{} | {}\n\n### datapathd idle footprint (service configured)\n\n\
         | window | RSS (KiB) | CPU (%) |\n| --- | ---: | ---: |\n\
         | first (as `dp-bench` measures it) | {} | {:.2} |\n\
         | median of {} | {:.0} | {:.2} |\n\
         | max of {} | {:.0} | {:.2} |\n",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine(),
        idle.first_window_rss_kib,
        idle.first_window_cpu_percent,
        windows,
        idle.rss_kib.median,
        idle.cpu_percent.median,
        windows,
        idle.rss_kib.max,
        idle.cpu_percent.max,
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&idle)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// In perf/RESULTS.md, everything from this line on is written by hand and kept by
/// `--write-results`.
const KEPT_MARKER: &str = "<!-- dp-bench --write-results keeps everything below this line -->";

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{cpu} | {} CPUs | kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        command_line("uname", &["-r"]),
    )
}

/// Medians of every criterion benchmark of the `control_plane` bench, from
/// `target/criterion/**/new/{benchmark,estimates}.json`.
fn criterion_rows(root: &Path) -> Vec<ControlPlaneRow> {
    let mut rows = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_some_and(|n| n == "new") {
                let read = |file: &str| -> Option<serde_json::Value> {
                    serde_json::from_str(&std::fs::read_to_string(path.join(file)).ok()?).ok()
                };
                if let (Some(benchmark), Some(estimates)) =
                    (read("benchmark.json"), read("estimates.json"))
                    && let (Some(title), Some(median_ns)) = (
                        benchmark["title"].as_str(),
                        estimates["median"]["point_estimate"].as_f64(),
                    )
                {
                    rows.push(ControlPlaneRow {
                        benchmark: title.to_string(),
                        median_ms: median_ns / 1e6,
                    });
                }
            } else {
                stack.push(path);
            }
        }
    }
    rows.sort_by(|a, b| a.benchmark.cmp(&b.benchmark));
    rows
}

fn fmt_pps(summary: &Summary) -> String {
    format!("{:.0}", summary.median)
}

fn render(results: &Results) -> String {
    let mut out = format!(
        "{} | {}{}\n\n",
        results.date,
        results.machine,
        if results.smoke {
            " | SMOKE RUN (figures meaningless)"
        } else {
            ""
        }
    );
    if let Some(first) = results.cost.first() {
        out.push_str(&format!(
            "### Per-program cost (BPF_PROG_TEST_RUN)\n\nns/packet, median of {} runs of {} \
             repeats. Rewriting paths run through the template-restoring harness; its cost, \
             measured against xdp_drop in the same run, is subtracted.\n\n\
             | path | ns/packet (median) | min | max | x xdp_drop | verdict | repeats | path check |\n\
             | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |\n",
            first.ns.samples.len(),
            first.repeat
        ));
        for row in &results.cost {
            out.push_str(&format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {} | {} |\n",
                row.path,
                row.ns.median,
                row.ns.min,
                row.ns.max,
                row.ratio_to_xdp_drop,
                row.verdict,
                row.repeat,
                row.check
            ));
        }
        out.push('\n');
    }
    if let Some(why) = &results.forward_skipped {
        out.push_str(&format!(
            "### Forwarding rate (pktgen, XDP live frames)\n\nNot measured: {why}.\n\n"
        ));
    }
    if let Some(forward) = &results.forward {
        out.push_str(
            "### Forwarding rate (pktgen, XDP live frames, UDP 64 bytes)\n\n\
             Packets per second delivered to the backends' counting sink, median of the runs; \
             (a) the XDP load balancer, full-NAT: the real datapathd in its default \
             configuration, as (b)-(d) run (`+bpf-stats` is the same with \
             `prog_stats.enabled: true`: the kernel's BPF run-time statistics on); (b) nftables DNAT (numgen map, as kube-proxy's \
             nftables mode) behind an XDP_PASS ingress; (c) XDP_DROP at the LB ingress (the \
             machine's floor: packets absorbed, not forwarded); (d) an XDP program that only \
             rewrites the MACs and redirects every frame to the backend side (the forwarding \
             floor: what any XDP forwarder pays on this path, with no lookup at all).\n\n\
             | scenario | flows | offered pps | delivered pps | min | max | runs |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for row in &forward.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.0} | {:.0} | {} |\n",
                row.scenario,
                row.flows,
                fmt_pps(&row.offered_pps),
                fmt_pps(&row.delivered_pps),
                row.delivered_pps.min,
                row.delivered_pps.max,
                row.delivered_pps.samples.len()
            ));
        }
        let mut flows: Vec<u32> = forward.rows.iter().map(|row| row.flows).collect();
        flows.sort_unstable();
        flows.dedup();
        out.push_str(
            "\n| flows | (a)/(b) xdp-lb / nft-dnat | (a)/(c) xdp-lb / xdp-drop | (a)/(d) xdp-lb / xdp-redirect | (d)/(b) best any XDP forwarder could reach | (a with BPF stats)/(b) |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for flow_count in flows {
            let pps = |scenario: &str| {
                forward
                    .rows
                    .iter()
                    .find(|row| row.scenario == scenario && row.flows == flow_count)
                    .map(|row| row.delivered_pps.median)
            };
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "n/a".to_string(),
            };
            let a = pps("xdp-lb-fullnat");
            out.push_str(&format!(
                "| {flow_count} | {} | {} | {} | {} | {} |\n",
                ratio(a, pps("nft-dnat")),
                ratio(a, pps("xdp-drop")),
                ratio(a, pps("xdp-redirect")),
                ratio(pps("xdp-redirect"), pps("nft-dnat")),
                ratio(pps("xdp-lb-fullnat+bpf-stats"), pps("nft-dnat")),
            ));
        }
        out.push('\n');
        if !forward.syn_flood.is_empty() {
            out.push_str(
                "### Under a SYN flood\n\n\
                 The 1,000 established UDP flows of (a), full-NAT, from one generator CPU: first \
                 alone, then while a second generator CPU sends TCP SYNs of distinct new flows \
                 (a new 5-tuple every frame) to a DSR service at the highest rate it can, with \
                 the daemon's SYN-flood mode on (its default) and off. Medians of the runs; \
                 entries kept: the established flows whose flow entry outlived the flood.\n\n\
                 | SYN-flood mode | established alone (pps) | offered under flood (pps) | delivered under flood (pps) | delivered / offered | entries kept | SYNs/s | SYNs untracked |\n\
                 | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            );
            for row in &forward.syn_flood {
                out.push_str(&format!(
                    "| {} | {:.0} | {:.0} | {:.0} | {:.4} | {:.4} | {:.0} | {} |
",
                    row.mode,
                    row.alone_pps.median,
                    row.offered_pps.median,
                    row.delivered_pps.median,
                    row.delivered_ratio.median,
                    row.entries_kept.median,
                    row.syn_pps.median,
                    row.untracked
                ));
            }
            out.push('\n');
        }
        if let Some(footprint) = &forward.footprint {
            out.push_str(&format!(
                "### datapathd footprint\n\n| state | RSS (KiB) | CPU (%) |\n| --- | ---: | ---: |\n\
                 | idle, service configured | {} | {:.2} |\n\
                 | {} flows tracked, under load | {} | {:.2} |\n\n",
                footprint.idle_rss_kib,
                footprint.idle_cpu_percent,
                footprint.tracked_flows,
                footprint.loaded_rss_kib,
                footprint.loaded_cpu_percent
            ));
        }
    }
    if !results.control_plane.is_empty() || results.lb_ctl_latency.is_some() {
        out.push_str(
            "### Control plane (criterion, median)\n\n| benchmark | median (ms) |\n| --- | ---: |\n",
        );
        for row in &results.control_plane {
            out.push_str(&format!("| {} | {:.3} |\n", row.benchmark, row.median_ms));
        }
        if let Some(latency) = &results.lb_ctl_latency {
            out.push_str(&format!(
                "\n`lb-ctl backend add/rm` to new table live in the map, over {} changes: \
                 p50 {:.2} ms, p99 {:.2} ms.\n",
                latency["changes"],
                latency["p50_ms"].as_f64().unwrap_or(f64::NAN),
                latency["p99_ms"].as_f64().unwrap_or(f64::NAN),
            ));
        }
        out.push('\n');
    }
    out.push_str("The machine is shared and noisy: compare medians, and ratios within one run.\n");
    out
}
