//! The benchmark tools' programs (XDP, and two classifiers).
//!
//! - `xdp_pktgen`: the packet generator. Run through BPF_PROG_TEST_RUN in live-frames mode
//!   (`BPF_F_TEST_XDP_LIVE_FRAMES`) with the context's ingress ifindex set to one end of a veth
//!   pair; it rewrites the frame's headers from the `PKTGEN_CONFIG` template on every run (live
//!   frames recycle their pages without resetting them), varies the flow, and returns `XDP_TX`,
//!   which live mode turns into a redirect out of that veth, so the frame arrives at its peer.
//! - `xdp_count_sink`: counts IPv4 frames (in total and by the last byte of the destination
//!   address) and drops them; everything else passes (ARP keeps working).
//! - `xdp_drop_count`: counts and drops everything: the floor of this machine.
//! - `xdp_pass`: lets everything through (a veth only accepts XDP redirects when its receiving
//!   end runs XDP or GRO).
//! - `tc_trace_producer` (a classifier): run through BPF_PROG_TEST_RUN with a repeat count, writes one
//!   process-exec record (the tracer's `ProcessEvent`, as long as the tracer sends it: up to
//!   its five arguments, 369 bytes) per run into `TRACE_RING`, a
//!   ring buffer of the tracer's size, as the tracer does (flags 0); counts what fit and what
//!   did not in `TRACE_PRODUCED`; always `TC_ACT_OK`. The generator of the exec module's
//!   ring-to-bus benchmark (fork+exec is far too slow to feed it).
//!
//! Every path returns an explicit verdict. The map value layouts are mirrored, `#[repr(C)]`,
//! in `perf/src/bpf.rs`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_store_bytes,
    macros::{classifier, map, xdp},
    maps::{Array, DevMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use bpf_common::Counter;
use bpf_lib::{count::count_bytes, frame::XdpFrame};

/// Bytes of the template the generator writes at the start of every frame: Ethernet + IPv4 +
/// TCP (54) rounded up to 8; the smallest frame (60 bytes without FCS) holds it.
const HEADER_LEN: usize = 56;
/// Offset of the IPv4 header checksum.
const IP_CSUM_OFF: u32 = 24;
/// Offset of the IPv4 source address.
const IP_SRC_OFF: u32 = 26;
/// Offset of the L4 source port.
const L4_SPORT_OFF: u32 = 34;
/// Offset of the TCP checksum.
const TCP_CSUM_OFF: usize = 50;

/// What the generator writes (value of `PKTGEN_CONFIG[0]`, written by the tool before a run).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenConfig {
    /// The first [`HEADER_LEN`] bytes of the frame, with `src_ip` and `src_port` filled in and
    /// both checksums valid for them.
    pub header: [u8; HEADER_LEN],
    /// Distinct flows (>= 1).
    pub flows: u32,
    /// Source ports per source address (>= 1): flow `f` uses source address
    /// `src_ip + f / ports` and source port `src_port + f % ports`.
    pub ports: u32,
    /// The template's source address, host order.
    pub src_ip: u32,
    /// The template's source port, host order.
    pub src_port: u32,
    /// 50 (the TCP checksum's offset) to update the TCP checksum incrementally; 0 when there
    /// is none to fix (UDP with checksum 0). No other value is supported.
    pub l4_csum_off: u32,
    /// Frame length (without FCS), counted into the byte counter.
    pub frame_len: u32,
}
const _: () = assert!(core::mem::size_of::<GenConfig>() == HEADER_LEN + 24);

#[map(name = "PKTGEN_CONFIG")]
static PKTGEN_CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);

/// Per CPU: [0] frames generated (also the flow sequence), [1] frames refused (no config).
#[map(name = "PKTGEN_STATS")]
static PKTGEN_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(2, 0);

/// Per CPU: [0] every IPv4 frame, [1] every other frame.
#[map(name = "SINK_STATS")]
static SINK_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(2, 0);

/// Per CPU, by the last byte of the IPv4 destination address.
#[map(name = "SINK_BY_DST")]
static SINK_BY_DST: PerCpuArray<Counter> = PerCpuArray::with_max_entries(256, 0);

/// Per CPU: [0] every frame dropped by `xdp_drop_count`.
#[map(name = "DROP_STATS")]
static DROP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);

/// Folds a 32-bit one's-complement sum to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 incremental update of checksum `csum` (as read, big-endian value) for 16-bit words
/// changing from `old` to `new`.
#[inline(always)]
fn csum_replace(csum: u16, old: [u16; 3], new: [u16; 3]) -> u16 {
    let mut sum = u32::from(!csum);
    let mut i = 0;
    while i < 3 {
        sum += u32::from(!old[i]) + u32::from(new[i]);
        i += 1;
    }
    !fold(sum)
}

#[inline(always)]
fn store(ctx: &XdpContext, offset: u32, bytes: &mut [u8]) -> Option<()> {
    // SAFETY: the helper bounds-checks `offset + len` against the frame itself.
    let rc = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            offset,
            bytes.as_mut_ptr().cast(),
            bytes.len() as u32,
        )
    };
    (rc == 0).then_some(())
}

#[xdp]
pub fn xdp_pktgen(ctx: XdpContext) -> u32 {
    match try_pktgen(&ctx) {
        Some(action) => action,
        None => {
            count_bytes(&PKTGEN_STATS, 1, 0);
            xdp_action::XDP_DROP
        }
    }
}

fn try_pktgen(ctx: &XdpContext) -> Option<u32> {
    let config = PKTGEN_CONFIG.get(0)?;
    let stats = PKTGEN_STATS.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot.
    let seq = unsafe { (*stats).packets };
    let flows = if config.flows == 0 { 1 } else { config.flows };
    let ports = if config.ports == 0 { 1 } else { config.ports };
    let flow = (seq % u64::from(flows)) as u32;
    let src_ip = config.src_ip.wrapping_add(flow / ports);
    let src_port = config.src_port.wrapping_add(flow % ports) as u16;

    let mut header = config.header;
    let old_ip = [
        (config.src_ip >> 16) as u16,
        config.src_ip as u16,
        config.src_port as u16,
    ];
    let new_ip = [(src_ip >> 16) as u16, src_ip as u16, src_port];
    let at = |off: u32| off as usize;
    // IPv4 header checksum: only the address changes.
    let ip_csum = u16::from_be_bytes([header[at(IP_CSUM_OFF)], header[at(IP_CSUM_OFF) + 1]]);
    let ip_csum = csum_replace(
        ip_csum,
        [old_ip[0], old_ip[1], 0],
        [new_ip[0], new_ip[1], 0],
    );
    header[at(IP_CSUM_OFF)..at(IP_CSUM_OFF) + 2].copy_from_slice(&ip_csum.to_be_bytes());
    header[at(IP_SRC_OFF)..at(IP_SRC_OFF) + 4].copy_from_slice(&src_ip.to_be_bytes());
    header[at(L4_SPORT_OFF)..at(L4_SPORT_OFF) + 2].copy_from_slice(&src_port.to_be_bytes());
    // L4 checksum: the pseudo-header's source address and the source port change.
    // (A constant offset: the verifier rejects variable-offset stack reads.)
    if config.l4_csum_off == TCP_CSUM_OFF as u32 {
        let l4 = TCP_CSUM_OFF;
        let old = u16::from_be_bytes([header[l4], header[l4 + 1]]);
        let new = csum_replace(old, old_ip, new_ip);
        header[l4..l4 + 2].copy_from_slice(&new.to_be_bytes());
    }
    store(ctx, 0, &mut header)?;
    // SAFETY: this CPU's slot.
    unsafe {
        (*stats).packets = seq + 1;
        (*stats).bytes += u64::from(config.frame_len);
    }
    Some(xdp_action::XDP_TX)
}

#[xdp]
pub fn xdp_count_sink(ctx: XdpContext) -> u32 {
    try_count_sink(&ctx)
}

fn try_count_sink(ctx: &XdpContext) -> u32 {
    let (start, end) = XdpFrame::new(ctx).bounds();
    let len = end.saturating_sub(start) as u64;
    // Ethernet (14) + IPv4 up to the destination address (20).
    if start + 34 > end {
        count_bytes(&SINK_STATS, 1, len);
        return xdp_action::XDP_PASS;
    }
    // SAFETY: `start + 34 <= end` was checked just above.
    let (ethertype, version, dst_last) = unsafe {
        (
            [*((start + 12) as *const u8), *((start + 13) as *const u8)],
            *((start + 14) as *const u8) >> 4,
            *((start + 33) as *const u8),
        )
    };
    if ethertype != [0x08, 0x00] || version != 4 {
        count_bytes(&SINK_STATS, 1, len);
        return xdp_action::XDP_PASS;
    }
    count_bytes(&SINK_STATS, 0, len);
    count_bytes(&SINK_BY_DST, u32::from(dst_last), len);
    xdp_action::XDP_DROP
}

/// The floor: counts and drops every frame.
#[xdp]
pub fn xdp_drop_count(ctx: XdpContext) -> u32 {
    let (start, end) = XdpFrame::new(&ctx).bounds();
    count_bytes(&DROP_STATS, 0, end.saturating_sub(start) as u64);
    xdp_action::XDP_DROP
}

#[map(name = "REDIRECT_MACS")]
static REDIRECT_MACS: Array<[u8; 12]> = Array::with_max_entries(1, 0);

#[map(name = "REDIRECT_PORT")]
static REDIRECT_PORT: DevMap = DevMap::with_max_entries(1, 0);

/// The forwarding floor: what any XDP forwarder pays at least. Writes the next hop's and the
/// egress interface's MAC addresses (from `REDIRECT_MACS[0]`) and redirects every frame to the
/// interface in `REDIRECT_PORT[0]`, with no lookup of its own.
#[xdp]
pub fn xdp_redirect_floor(ctx: XdpContext) -> u32 {
    try_redirect_floor(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

fn try_redirect_floor(ctx: &XdpContext) -> Option<u32> {
    let macs = *REDIRECT_MACS.get(0)?;
    let (start, end) = XdpFrame::new(ctx).bounds();
    if start + 12 > end {
        return Some(xdp_action::XDP_PASS);
    }
    // SAFETY: `start + 12 <= end` was checked just above.
    unsafe { *(start as *mut [u8; 12]) = macs };
    REDIRECT_PORT.redirect(0, 0).ok()
}

/// 0: every record with flags 0 (the kernel wakes the reader whenever it had caught up: what
/// the ring-reader test needs); N: wake-ups only on every Nth record (`BPF_RB_FORCE_WAKEUP`, the others
/// `BPF_RB_NO_WAKEUP`), the reader's tick catching the rest.
#[unsafe(no_mangle)]
static TRACE_WAKE_EVERY: u64 = 0;

/// 1: wake-ups as the tracer makes them (`bpf_lib::event::wake_flags`: each time another
/// `RING_WAKE_BYTES` wait in the ring), whatever `TRACE_WAKE_EVERY` says.
#[unsafe(no_mangle)]
static TRACE_WAKE_AS_TRACER: u32 = 0;

#[map(name = "TRACE_RING")]
static TRACE_RING: RingBuf = RingBuf::with_byte_size(bpf_common::trace::RING_BYTES, 0);

/// Index 0: records written; 1: records that did not fit (the ring was full).
#[map(name = "TRACE_PRODUCED")]
static TRACE_PRODUCED: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[map(name = "TRACE_PRODUCER_SCRATCH")]
static TRACE_PRODUCER_SCRATCH: PerCpuArray<bpf_common::trace::ProcessEvent> =
    PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn bump(index: u32) -> u64 {
    match TRACE_PRODUCED.get_ptr_mut(index) {
        // SAFETY: this CPU's slot.
        Some(n) => unsafe {
            *n += 1;
            *n
        },
        None => 0,
    }
}

/// One exec record into `TRACE_RING` per run. A classifier, not XDP: an XDP test run with a
/// repeat count swaps the kernel's XDP dispatcher in and out (`bpf_prog_change_xdp`), which
/// waits for RCU grace periods, about 16 ms a call here, so the producer wrote only ~400k
/// records a second whatever the reader did.
#[classifier]
pub fn tc_trace_producer(_ctx: TcContext) -> i32 {
    produce_trace_record();
    aya_ebpf::bindings::TC_ACT_OK
}

#[inline(always)]
fn produce_trace_record() {
    let Some(e) = TRACE_PRODUCER_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; the program is not migrated while it runs.
    let e = unsafe { &mut *e };
    // A new process each run (the counter of written records makes the pid), so the reader's
    // cache inserts and evicts as it does under a real exec storm.
    // SAFETY: a slot of this CPU's array, read for its value.
    let n = TRACE_PRODUCED
        .get_ptr(0)
        .map(|p| unsafe { *p })
        .unwrap_or(0);
    e.kind = bpf_common::trace::EVENT_EXEC;
    e.pid = (n as u32) | 0x4000_0000;
    e.ppid = 1;
    e.ts_ns = 1_000_000 + n;
    e.start_ns = 10_000_000_000 + n * 10_000_000;
    e.parent_start_ns = 1_000_000_000;
    e.cgroup_id = 4242;
    e.uid = 1000;
    e.filename_len = 16;
    e.filename[..16].copy_from_slice(b"/usr/bin/python3");
    // Five arguments, as the userspace decode bench has them.
    const ARGS: &[u8] = b"python3\x00-m\x00http.server\x00--bind\x00198.18.0.1\x00";
    e.args[..ARGS.len()].copy_from_slice(ARGS);
    e.args_len = ARGS.len() as u16;
    // As long as the tracer sends an exec: up to its arguments.
    let len = bpf_common::trace::PROCESS_EVENT_BEFORE_ARGS + ARGS.len();
    let every = bpf_lib::global(&TRACE_WAKE_EVERY);
    let flags = if bpf_lib::global(&TRACE_WAKE_AS_TRACER) != 0 {
        bpf_lib::event::wake_flags(&TRACE_RING, len as u64, bpf_common::trace::RING_WAKE_BYTES)
    } else if every == 0 {
        0
    } else if n % every == every - 1 {
        aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64
    } else {
        aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64
    };
    // SAFETY: `len` is less than the event's size: the bytes are the event's own.
    let bytes = unsafe {
        core::slice::from_raw_parts(
            (e as *const bpf_common::trace::ProcessEvent).cast::<u8>(),
            len,
        )
    };
    if TRACE_RING.output::<[u8]>(bytes, flags).is_ok() {
        bump(0);
    } else {
        bump(1);
    }
}

/// Lets everything through.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// An empty TCX program (every packet continues): the floor TCX programs are measured against.
#[classifier]
pub fn tc_next(_ctx: TcContext) -> i32 {
    -1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
