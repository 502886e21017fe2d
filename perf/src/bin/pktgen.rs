//! `pktgen`: an in-kernel packet generator on XDP live frames (BPF_PROG_TEST_RUN with
//! `BPF_F_TEST_XDP_LIVE_FRAMES`), measured at a counting XDP sink.
//!
//! ```sh
//! # veth pair g0 (namespace gen) <-> s0 (namespace sink): frames leave g0 and arrive at s0
//! pktgen --ns gen --iface g0 --sink-ns sink --sink-iface s0 --flows 1000 --duration 2
//! ```

use std::{net::Ipv4Addr, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use dp_perf::pktgen::{self, GenOptions, Protocol, SinkAt};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Generates frames with BPF_PROG_TEST_RUN's XDP live-frames mode out of one end of a veth pair
/// (`--iface`, in `--ns`), so they arrive at its peer (the device under test), and counts what
/// reaches an XDP counting sink (`--sink-iface` in `--sink-ns`, usually that peer itself).
///
/// On veths the receiving side runs on the generating CPU, so the generator is closed-loop: the
/// offered rate is what the whole path sustains. Every run is bounded: at most 60 s and 1e9
/// packets. Needs root. Prints the offered rate
/// (frames the generator transmitted / elapsed) and the received rate (IPv4 frames counted at
/// the sink until 100 ms after the end / elapsed).
#[derive(Debug, Parser)]
#[command(name = "pktgen", version)]
struct Cli {
    /// Network namespace holding the generator's interface (created with `ip netns add`).
    #[arg(long)]
    ns: String,
    /// The generator's interface: one end of a veth pair.
    #[arg(long)]
    iface: String,
    /// Namespace of the counting sink [default: the generator's namespace].
    #[arg(long)]
    sink_ns: Option<String>,
    /// Interface the counting sink XDP program is attached to (counts and drops IPv4, passes
    /// everything else). Usually the peer of --iface, or an interface behind the device under
    /// test.
    #[arg(long)]
    sink_iface: String,
    /// What to send.
    #[arg(long, value_enum, default_value_t = Protocol::Udp)]
    protocol: Protocol,
    /// Ethernet frame size in bytes, counting the 4-byte FCS (64..=1518); the generated buffer
    /// is 4 bytes shorter, and byte counters count the buffer.
    #[arg(long, default_value_t = 64)]
    frame_size: usize,
    /// Distinct flows: the source port varies first (from --src-port up to 65535), then the
    /// source address (from --src-ip up).
    #[arg(long, default_value_t = 1000)]
    flows: u32,
    /// Run time in seconds (at most 60).
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Stop after this many packets (at most 1e9); the duration still bounds the run.
    #[arg(long)]
    count: Option<u64>,
    /// Generator threads, each pinned to its own CPU and running its own test-run loop.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Live-frames batch size (1..=256).
    #[arg(long, default_value_t = pktgen::DEFAULT_BATCH)]
    batch: u32,
    /// Source MAC [default: the generator interface's own].
    #[arg(long)]
    src_mac: Option<String>,
    /// Destination MAC [default: the sink interface's, right when the sink is the peer of
    /// --iface].
    #[arg(long)]
    dst_mac: Option<String>,
    /// First source address (flows beyond the port range use the next addresses).
    #[arg(long, default_value = "198.18.0.1")]
    src_ip: Ipv4Addr,
    /// Destination address (a VIP, or whatever the device under test expects).
    #[arg(long, default_value = "198.18.100.1")]
    dst_ip: Ipv4Addr,
    /// First source port.
    #[arg(long, default_value_t = 10_000)]
    src_port: u16,
    /// Destination port.
    #[arg(long, default_value_t = 80)]
    dst_port: u16,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("MAC address {text:?} is not six hex bytes separated by ':'");
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC address {text:?}"))?;
    }
    Ok(mac)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pktgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if !(cli.duration > 0.0 && cli.duration <= pktgen::MAX_DURATION.as_secs_f64()) {
        bail!(
            "--duration {} outside (0, {}]",
            cli.duration,
            pktgen::MAX_DURATION.as_secs()
        );
    }
    let sink_ns = cli.sink_ns.clone().unwrap_or_else(|| cli.ns.clone());
    let src_mac = match &cli.src_mac {
        Some(text) => parse_mac(text)?,
        None => dp_perf::topo::mac_of(&cli.ns, &cli.iface)?,
    };
    let dst_mac = match &cli.dst_mac {
        Some(text) => parse_mac(text)?,
        None => dp_perf::topo::mac_of(&sink_ns, &cli.sink_iface)?,
    };
    let mut options = GenOptions::new(&cli.ns, &cli.iface);
    options.protocol = cli.protocol;
    options.frame_size = cli.frame_size;
    options.flows = cli.flows;
    options.duration = Duration::from_secs_f64(cli.duration);
    options.packets = cli.count;
    options.threads = cli.threads;
    options.batch = cli.batch;
    options.src_mac = src_mac;
    options.dst_mac = dst_mac;
    options.src_ip = cli.src_ip;
    options.dst_ip = cli.dst_ip;
    options.src_port = cli.src_port;
    options.dst_port = cli.dst_port;
    let report = pktgen::run(
        &options,
        &SinkAt {
            ns: sink_ns,
            iface: cli.sink_iface.clone(),
        },
    )?;
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => {
            let g = &report.generated;
            println!(
                "{:?} {}-byte frames, {} flows, {} thread(s), {:.3} s",
                options.protocol,
                options.frame_size,
                options.flows,
                g.threads,
                g.elapsed.as_secs_f64()
            );
            println!(
                "offered:  {:>12} packets  {:>12.0} pps  {:>8.1} Mbit/s (frame bytes w/o FCS)",
                g.packets,
                g.offered_pps,
                g.bytes as f64 * 8.0 / g.elapsed.as_secs_f64() / 1e6
            );
            println!(
                "received: {:>12} packets  {:>12.0} pps  ({:.1}% of offered)",
                report.received.packets,
                report.received_pps,
                if g.packets == 0 {
                    0.0
                } else {
                    report.received.packets as f64 * 100.0 / g.packets as f64
                }
            );
            if report.received.packets == 0 && g.packets > 0 {
                println!(
                    "note: nothing reached the sink. Frames transmitted into a veth are only \
                     delivered when its receiving end runs an XDP program (or has GRO on), and \
                     the sink only counts IPv4 frames."
                );
            }
        }
    }
    Ok(())
}
