//! An in-kernel packet generator on BPF_PROG_TEST_RUN's XDP live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`), in the spirit of xdp-trafficgen.
//!
//! The `xdp_pktgen` program runs with the context's ingress ifindex set to the generator's
//! interface (one end of a veth pair) and returns `XDP_TX`, which live mode turns into a
//! redirect out of that interface: every frame arrives at the veth's peer, the device under
//! test, through its XDP program. Live frames recycle their pages without resetting them, so
//! the program rewrites the headers from a template on every run and varies the flow (source
//! port, then source address) from a per-CPU sequence number modulo the flow count. The IPv4
//! header checksum and the TCP checksum are updated incrementally; UDP carries checksum 0.
//!
//! Each generator thread joins the generator's network namespace (`setns`, so the ingress
//! ifindex resolves there), pins itself to one CPU and runs its own test-run loop until the
//! duration or the packet budget is used up.
//!
//! On a veth pair the receiving end's XDP program (and whatever it hands the frame to: a
//! redirect into the next veth, the stack, the sink) runs in a NAPI poll on the CPU that
//! transmitted, after every live-frames batch. The generator is therefore closed-loop: it
//! cannot outrun the device under test, the offered rate is what the whole path sustains on
//! the generator's CPUs (generator included), and frames are lost only where the path drops
//! them (a full ring, a full table). Compare scenarios with the same generator.
//!
//! Every BPF_PROG_TEST_RUN call also has a fixed cost (the kernel's XDP dispatcher waits for
//! two RCU grace periods, tens of ms on a busy machine), so each thread makes few, long calls
//! (up to 0.5 s each) sized from the previous call's time per frame, and stops at the deadline.
//!
//! Sizes: `frame_size` counts the Ethernet frame *with* its 4-byte FCS, as frame sizes are
//! usually quoted (64 = the minimum frame); the generated buffer is `frame_size - 4` bytes,
//! and byte counters count those.

use std::{
    net::Ipv4Addr,
    sync::{
        Barrier,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};
use etherparse::PacketBuilder;
use serde::Serialize;

use crate::bpf::{GenConfig, HEADER_LEN, PerfObject, Totals, programs};

/// Longest a generator run may last.
pub const MAX_DURATION: Duration = Duration::from_secs(60);
/// Largest packet budget of one run.
pub const MAX_PACKETS: u64 = 1_000_000_000;
/// Smallest frame size (with FCS).
pub const MIN_FRAME_SIZE: usize = 64;
/// Largest frame size (with FCS): a standard 1500-byte MTU frame.
pub const MAX_FRAME_SIZE: usize = 1518;
/// Bytes of FCS counted in `frame_size` but not generated.
pub const FCS_LEN: usize = 4;
/// Most distinct flows.
pub const MAX_FLOWS: u32 = 16_777_216;
/// Frames per live-frames batch (the kernel's maximum is 256; its default is 64).
pub const DEFAULT_BATCH: u32 = 64;
/// Longest a single BPF_PROG_TEST_RUN call should generate for; the per-call repeat count
/// adapts to it (and to the time left). Every call has a fixed cost (the XDP dispatcher waits
/// for two RCU grace periods), so calls should be long.
const CALL_TARGET: Duration = Duration::from_millis(500);
/// Frames of the first call of each thread (calibrates the following ones).
const FIRST_CALL: u64 = 65_536;
/// No new call when less than this is left before the deadline.
const MIN_CALL: Duration = Duration::from_millis(10);
/// How long to wait after the generator stops before reading the sink (queues drain).
pub const SETTLE: Duration = Duration::from_millis(100);

/// The kernel refused `BPF_PROG_TEST_RUN` in live-frames mode with EPERM: no frame can be
/// generated on this machine. Seen on the 6.18 "fc-v1300" kernels of these VMs, which also
/// refuse LSM and fentry programs; the 6.18 "fc-v1098" kernels allowed it.
#[derive(Debug)]
pub struct LiveFramesRefused;

impl std::fmt::Display for LiveFramesRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this kernel refuses BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (EPERM), so \
             the XDP packet generator cannot run here"
        )
    }
}

impl std::error::Error for LiveFramesRefused {}

/// Whether `error` (anywhere in its chain) is [`LiveFramesRefused`].
pub fn live_frames_refused(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<LiveFramesRefused>())
}

/// What the generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// UDP, checksum 0.
    Udp,
    /// TCP SYN (a new connection attempt per frame, as far as a stateful box is concerned).
    TcpSyn,
    /// TCP ACK (mid-connection segments).
    TcpAck,
}

/// One generator run.
#[derive(Clone, Debug, Serialize)]
pub struct GenOptions {
    /// Network namespace of the generator's interface.
    pub ns: String,
    /// The generator's interface (one end of a veth pair; frames arrive at its peer).
    pub iface: String,
    pub protocol: Protocol,
    /// Ethernet frame size including the FCS (64..=1518).
    pub frame_size: usize,
    /// Distinct flows (source port first, then source address, vary).
    pub flows: u32,
    /// Run time bound (<= 60 s).
    #[serde(serialize_with = "seconds")]
    pub duration: Duration,
    /// Packet budget (<= 1e9); `None`: only the duration bounds the run.
    pub packets: Option<u64>,
    /// Generator threads, each pinned to its own CPU (round-robin over the online CPUs).
    pub threads: usize,
    /// The online CPU (by position) the first thread is pinned to; the others follow it. Two
    /// generators running at once give each other different ones.
    pub first_cpu: usize,
    #[serde(serialize_with = "mac")]
    pub src_mac: [u8; 6],
    #[serde(serialize_with = "mac")]
    pub dst_mac: [u8; 6],
    /// First source address; flows beyond the port range use the following addresses.
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    /// First source port.
    pub src_port: u16,
    pub dst_port: u16,
    /// Live-frames batch size (1..=256).
    pub batch: u32,
}

impl GenOptions {
    /// UDP, 64-byte frames, 1 thread, 1 s, 1,000 flows from 198.18.0.1:10000 to
    /// 198.18.100.1:80, locally administered MACs.
    pub fn new(ns: &str, iface: &str) -> Self {
        Self {
            ns: ns.to_string(),
            iface: iface.to_string(),
            protocol: Protocol::Udp,
            frame_size: MIN_FRAME_SIZE,
            flows: 1000,
            duration: Duration::from_secs(1),
            packets: None,
            threads: 1,
            first_cpu: 0,
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src_ip: Ipv4Addr::new(198, 18, 0, 1),
            dst_ip: Ipv4Addr::new(198, 18, 100, 1),
            src_port: 10_000,
            dst_port: 80,
            batch: DEFAULT_BATCH,
        }
    }

    /// Checks every bound; the error says which one.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&self.frame_size),
            "frame size {} outside {MIN_FRAME_SIZE}..={MAX_FRAME_SIZE}",
            self.frame_size
        );
        ensure!(
            (1..=MAX_FLOWS).contains(&self.flows),
            "flows {} outside 1..={MAX_FLOWS}",
            self.flows
        );
        ensure!(
            !self.duration.is_zero() && self.duration <= MAX_DURATION,
            "duration {:?} outside (0, {MAX_DURATION:?}]",
            self.duration
        );
        if let Some(packets) = self.packets {
            ensure!(
                (1..=MAX_PACKETS).contains(&packets),
                "packet count {packets} outside 1..={MAX_PACKETS}"
            );
        }
        ensure!(
            (1..=256).contains(&self.threads),
            "threads {} outside 1..=256",
            self.threads
        );
        ensure!(
            (1..=256).contains(&self.batch),
            "batch {} outside 1..=256",
            self.batch
        );
        let (_, addresses) = self.flow_space();
        u32::from(self.src_ip)
            .checked_add(addresses - 1)
            .with_context(|| {
                format!("{addresses} source addresses from {} overflow", self.src_ip)
            })?;
        Ok(())
    }

    /// (source ports per address, source addresses) the flows spread over.
    pub fn flow_space(&self) -> (u32, u32) {
        let ports = (65_536 - u32::from(self.src_port)).min(self.flows).max(1);
        (ports, self.flows.div_ceil(ports))
    }

    /// The generated buffer's length (frame size without FCS).
    pub fn frame_len(&self) -> usize {
        self.frame_size - FCS_LEN
    }
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn mac<S: serde::Serializer>(m: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::topo::mac_text(*m))
}

/// Builds the first frame (flow 0) and the generator's configuration.
pub fn build_frame(options: &GenOptions) -> Result<(Vec<u8>, GenConfig)> {
    options.validate()?;
    let len = options.frame_len();
    let base = PacketBuilder::ethernet2(options.src_mac, options.dst_mac).ipv4(
        options.src_ip.octets(),
        options.dst_ip.octets(),
        64,
    );
    let mut frame = Vec::with_capacity(len);
    let l4_csum_off = match options.protocol {
        Protocol::Udp => {
            let builder = base.udp(options.src_port, options.dst_port);
            let payload = vec![0u8; len - 42];
            builder.write(&mut frame, &payload)?;
            // Checksum 0: valid for UDP over IPv4, and stays valid whatever the flow.
            frame[40] = 0;
            frame[41] = 0;
            0
        }
        Protocol::TcpSyn | Protocol::TcpAck => {
            let builder = base.tcp(options.src_port, options.dst_port, 1, 64_240);
            let builder = if options.protocol == Protocol::TcpSyn {
                builder.syn()
            } else {
                builder.ack(1)
            };
            let payload = vec![0u8; len - 54];
            builder.write(&mut frame, &payload)?;
            50
        }
    };
    ensure!(
        frame.len() == len,
        "built {} bytes, wanted {len}",
        frame.len()
    );
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&frame[..HEADER_LEN]);
    let (ports, _) = options.flow_space();
    let config = GenConfig {
        header,
        flows: options.flows,
        ports,
        src_ip: u32::from(options.src_ip),
        src_port: u32::from(options.src_port),
        l4_csum_off,
        frame_len: len as u32,
    };
    Ok((frame, config))
}

/// What one generator run did.
#[derive(Clone, Debug, Serialize)]
pub struct GenResult {
    /// Frames the generator program produced (its own per-CPU counter).
    pub packets: u64,
    pub bytes: u64,
    /// Frames asked for through BPF_PROG_TEST_RUN's repeat counts (equals `packets` unless a
    /// run failed inside the program).
    pub requested: u64,
    /// Wall time from the start of the first thread to the end of the last (seconds in JSON).
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
    /// `packets / elapsed`.
    pub offered_pps: f64,
    pub threads: usize,
}

/// `xdp_md` as BPF_PROG_TEST_RUN takes it as `ctx_in`.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

fn ifindex_in(ns: &str, iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface).context("interface name")?;
    let index = netns_tests::netns::run_in(ns, || {
        // SAFETY: a valid C string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    })?;
    ensure!(index != 0, "no interface {iface} in namespace {ns}");
    Ok(index)
}

fn pin_to_cpu(cpu: u32) -> Result<()> {
    netns_tests::cpu::pin_to(cpu as usize)
        .with_context(|| format!("pin generator thread to CPU {cpu}"))
}

/// Runs the generator of `object` (loaded with [`PerfObject::load`]) as `options` says, and
/// returns when the duration or the packet budget is used up. The receiving side (the veth
/// peer of `options.iface`) must run an XDP program, or the frames are dropped.
pub fn generate(object: &mut PerfObject, options: &GenOptions) -> Result<GenResult> {
    let (frame, config) = build_frame(options)?;
    object.set_gen_config(&config)?;
    let ifindex = ifindex_in(&options.ns, &options.iface)?;
    let cpus = crate::bpf::online_cpus()?;
    let before = object.generated()?;
    let errors_before = object.generator_errors()?;
    let program = object.program(programs::PKTGEN)?;

    let ctx = XdpMd {
        data: 0,
        data_end: frame.len() as u32,
        data_meta: 0,
        ingress_ifindex: ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    // SAFETY: `XdpMd` is `#[repr(C)]` plain integers without padding.
    let ctx_bytes = unsafe {
        std::slice::from_raw_parts(
            (&ctx as *const XdpMd).cast::<u8>(),
            std::mem::size_of::<XdpMd>(),
        )
    };
    let budget = AtomicU64::new(options.packets.unwrap_or(u64::MAX));
    let requested = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(options.threads + 1);
    let deadline_cell = std::sync::OnceLock::<Instant>::new();

    let (elapsed, results) = thread::scope(|scope| {
        let handles: Vec<_> = (0..options.threads)
            .map(|i| {
                let cpu = cpus[(options.first_cpu + i) % cpus.len()];
                let (frame, ctx_bytes, budget, requested, stop, barrier, deadline_cell) = (
                    &frame,
                    ctx_bytes,
                    &budget,
                    &requested,
                    &stop,
                    &barrier,
                    &deadline_cell,
                );
                let ns = options.ns.as_str();
                let batch = options.batch;
                scope.spawn(move || -> Result<()> {
                    let prepared = netns_tests::netns::run_in(ns, || -> Result<()> {
                        let setup = pin_to_cpu(cpu);
                        barrier.wait();
                        setup?;
                        let deadline = *deadline_cell.wait();
                        let mut chunk: u64 = FIRST_CALL;
                        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                            // Take up to `chunk` packets from the shared budget.
                            let mut take = 0;
                            let _ =
                                budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                                    take = b.min(chunk);
                                    Some(b - take)
                                });
                            if take == 0 {
                                break;
                            }
                            let opts = TestRunOptions {
                                data_in: Some(frame),
                                data_out: None,
                                ctx_in: Some(ctx_bytes),
                                ctx_out: None,
                                repeat: take as u32,
                                attrs: TestRunAttrs::new().xdp_live_frames(batch),
                            };
                            let started = Instant::now();
                            let result = program.test_run(opts);
                            let took = started.elapsed();
                            let result = match result {
                                Ok(result) => result,
                                Err(aya::programs::ProgramError::SyscallError(
                                    aya::sys::SyscallError { io_error, .. },
                                )) if io_error.raw_os_error() == Some(libc::EPERM) => {
                                    stop.store(true, Ordering::Relaxed);
                                    return Err(anyhow::Error::new(LiveFramesRefused));
                                }
                                Err(e) => {
                                    stop.store(true, Ordering::Relaxed);
                                    return Err(anyhow::anyhow!("{e}").context(format!(
                                        "BPF_PROG_TEST_RUN (live frames, ifindex {})",
                                        ctx_ifindex(ctx_bytes)
                                    )));
                                }
                            };
                            requested.fetch_add(take, Ordering::Relaxed);
                            // Size the next call from the wall time per frame of this one (each
                            // call also pays a fixed set-up cost, two RCU grace periods for
                            // the XDP dispatcher, tens of ms on a busy machine, so calls should
                            // be long): up to CALL_TARGET, without passing the deadline.
                            let per_frame = took.as_nanos() as f64 / take as f64;
                            let left = deadline.saturating_duration_since(Instant::now());
                            if left < MIN_CALL {
                                break;
                            }
                            let target = left.min(CALL_TARGET).as_nanos() as f64;
                            chunk = ((target / per_frame.max(1.0)) as u64).clamp(64, 1 << 26);
                            if std::env::var_os("PKTGEN_DEBUG").is_some() {
                                eprintln!(
                                    "pktgen: {take} frames in {took:?} (kernel: {:?}/frame); \
                                     next {chunk}",
                                    result.duration
                                );
                            }
                        }
                        Ok(())
                    });
                    match prepared {
                        Ok(inner) => inner,
                        Err(e) => {
                            // Could not even enter the namespace: stop the others, and
                            // still meet them at the start line so that nobody waits forever.
                            stop.store(true, Ordering::Relaxed);
                            barrier.wait();
                            Err(e)
                        }
                    }
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let _ = deadline_cell.set(start + options.duration);
        let results: Vec<Result<()>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("generator thread panicked")))
            })
            .collect();
        (start.elapsed(), results)
    });
    for result in results {
        result?;
    }
    let after = object.generated()?.since(before);
    let errors = object.generator_errors()? - errors_before;
    ensure!(
        errors == 0,
        "the generator program failed {errors} times (no configuration or frame too short)"
    );
    let requested = requested.load(Ordering::Relaxed);
    if after.packets != requested {
        bail!(
            "the generator counted {} frames but {requested} were requested",
            after.packets
        );
    }
    Ok(GenResult {
        packets: after.packets,
        bytes: after.bytes,
        requested,
        elapsed,
        offered_pps: after.packets as f64 / elapsed.as_secs_f64(),
        threads: options.threads,
    })
}

fn ctx_ifindex(ctx: &[u8]) -> u32 {
    u32::from_ne_bytes([ctx[12], ctx[13], ctx[14], ctx[15]])
}

/// A generator run measured at a counting sink.
#[derive(Clone, Debug, Serialize)]
pub struct PktgenReport {
    pub options: GenOptions,
    pub generated: GenResult,
    /// IPv4 frames the sink counted from the start of the run until [`SETTLE`] after its end.
    pub received: Totals,
    /// `received.packets / generated.elapsed`.
    pub received_pps: f64,
}

/// Where the counting sink runs.
#[derive(Clone, Debug)]
pub struct SinkAt {
    pub ns: String,
    pub iface: String,
}

/// Loads the programs, attaches `xdp_count_sink` at `sink` (normally the peer of the
/// generator's interface), generates, and reads the sink. Programs are detached when this
/// returns.
pub fn run(options: &GenOptions, sink: &SinkAt) -> Result<PktgenReport> {
    options.validate()?;
    let mut object = PerfObject::load()?;
    object.attach(programs::COUNT_SINK, &sink.ns, &sink.iface)?;
    let before = object.sink_ipv4()?;
    let generated = generate(&mut object, options)?;
    thread::sleep(SETTLE);
    let received = object.sink_ipv4()?.since(before);
    Ok(PktgenReport {
        options: options.clone(),
        received_pps: received.packets as f64 / generated.elapsed.as_secs_f64(),
        generated,
        received,
    })
}

#[cfg(test)]
mod tests {
    use etherparse::{SlicedPacket, TransportSlice};

    use super::*;

    fn options(protocol: Protocol, frame_size: usize, flows: u32) -> GenOptions {
        let mut o = GenOptions::new("ns", "g0");
        o.protocol = protocol;
        o.frame_size = frame_size;
        o.flows = flows;
        o
    }

    #[test]
    fn frames_have_the_size_and_valid_checksums() {
        for protocol in [Protocol::Udp, Protocol::TcpSyn, Protocol::TcpAck] {
            for size in [64, 65, 128, 1518] {
                let (frame, config) = build_frame(&options(protocol, size, 1000)).expect("frame");
                assert_eq!(frame.len(), size - FCS_LEN);
                assert_eq!(&frame[..HEADER_LEN], &config.header[..]);
                assert_eq!(config.frame_len as usize, frame.len());
                let packet = SlicedPacket::from_ethernet(&frame).expect("parses");
                let Some(etherparse::NetSlice::Ipv4(ip)) = packet.net else {
                    panic!("not IPv4");
                };
                let header = ip.header().to_header();
                assert_eq!(header.header_checksum, header.calc_header_checksum());
                match packet.transport {
                    Some(TransportSlice::Udp(udp)) => {
                        assert_eq!(protocol, Protocol::Udp);
                        assert_eq!(udp.checksum(), 0);
                        assert_eq!(config.l4_csum_off, 0);
                    }
                    Some(TransportSlice::Tcp(tcp)) => {
                        assert_ne!(protocol, Protocol::Udp);
                        assert_eq!(tcp.syn(), protocol == Protocol::TcpSyn);
                        assert_eq!(tcp.ack(), protocol == Protocol::TcpAck);
                        let expected = tcp
                            .to_header()
                            .calc_checksum_ipv4(&header, tcp.payload())
                            .expect("checksum");
                        assert_eq!(tcp.checksum(), expected);
                        assert_eq!(config.l4_csum_off, 50);
                    }
                    other => panic!("unexpected transport {other:?}"),
                }
            }
        }
    }

    #[test]
    fn flows_spread_over_ports_then_addresses() {
        let o = options(Protocol::Udp, 64, 100_000);
        assert_eq!(o.flow_space(), (55_536, 2));
        let mut o = options(Protocol::Udp, 64, 10);
        o.src_port = 65_533;
        assert_eq!(o.flow_space(), (3, 4));
        assert!(options(Protocol::Udp, 63, 1).validate().is_err());
        assert!(options(Protocol::Udp, 1519, 1).validate().is_err());
        assert!(options(Protocol::Udp, 64, 0).validate().is_err());
        let mut o = options(Protocol::Udp, 64, 1);
        o.duration = Duration::from_secs(61);
        assert!(o.validate().is_err());
    }
}
