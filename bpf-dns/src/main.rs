//! TCX programs that copy DNS responses to user space, for passive name learning.
//!
//! `dns_ingress` and `dns_egress` run on the interfaces the `dns` controller is configured for
//! (and `dns_ingress` on `lo`, for local stub resolvers). A packet from UDP or TCP port 53,
//! over IPv4 or IPv6, is sent to `DNS_EVENTS`, a ring buffer, as a `DnsCaptureMeta` followed by
//! the packet's first `SNAP_LEN` bytes: `bpf_skb_load_bytes` copies them (paged fragments
//! included) into a per-CPU scratch record, and one `bpf_ringbuf_output` sends its real length.
//! The reader is woken only past `WAKE_BYTES` (it also reads on a tick): a perf buffer, which
//! wakes its reader at every sample, cost 30 times more per answer here (perf/RESULTS.md).
//!
//! - Every program returns `TCX_NEXT`: the capture never changes a packet's fate.
//! - Anything else costs a few loads and counts nothing.
//! - A response is sent within a per-CPU token bucket (`CAPTURE_RATE`), and counted once as
//!   captured, rate-limited or lost to a full buffer. One cut at the snap length also counts
//!   `snap_cut`.
//! - TCP segments without payload are not sent.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_ringbuf_output, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{PerCpuArray, RingBuf},
    programs::TcContext,
};
use bpf_common::{
    PROTO_TCP, PROTO_UDP,
    dns::{
        DEFAULT_CAPTURE_RATE, DEFAULT_SNAP_LEN, DIR_EGRESS, DIR_INGRESS, DnsCaptureMeta,
        DnsScratch, MAX_SNAP_LEN, RING_BYTES, WAKE_BYTES, reason,
    },
    policy::RateBucket,
};
use bpf_lib::{event::rate_allows, frame::TcFrame, global, now_ns, verdict::tc::TCX_NEXT};
use lb_core::parse::Frame as _;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const DNS_PORT: u16 = 53;
const UDP_HLEN: usize = 8;
const DNS_HLEN: usize = 12;

#[unsafe(no_mangle)]
static CAPTURE_RATE: u64 = DEFAULT_CAPTURE_RATE;

#[unsafe(no_mangle)]
static SNAP_LEN: u32 = DEFAULT_SNAP_LEN;

#[map(name = "DNS_EVENTS")]
static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map(name = "DNS_SCRATCH")]
static DNS_SCRATCH: PerCpuArray<DnsScratch> = PerCpuArray::with_max_entries(1, 0);

/// `BPF_RB_NO_WAKEUP`, `BPF_RB_FORCE_WAKEUP`, `BPF_RB_AVAIL_DATA`.
const RB_NO_WAKEUP: u64 = 1;
const RB_FORCE_WAKEUP: u64 = 2;
const RB_AVAIL_DATA: u64 = 0;
const META_LEN: u64 = core::mem::size_of::<DnsCaptureMeta>() as u64;

#[map(name = "DNS_REASONS")]
static DNS_REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

#[map(name = "DNS_RATE")]
static DNS_RATE: PerCpuArray<RateBucket> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn count(reason: u32) {
    bpf_lib::count::count_reason(&DNS_REASONS, reason);
}

#[classifier]
pub fn dns_ingress(ctx: TcContext) -> i32 {
    try_capture(&ctx, DIR_INGRESS);
    TCX_NEXT
}

#[classifier]
pub fn dns_egress(ctx: TcContext) -> i32 {
    try_capture(&ctx, DIR_EGRESS);
    TCX_NEXT
}

/// A byte of the packet: from the linear area when it is there, else through
/// `bpf_skb_load_bytes` (headers in a paged fragment).
#[inline(always)]
fn byte_at(ctx: &TcContext, frame: &TcFrame, off: usize) -> Option<u8> {
    // A two-byte window: the verifier derives no range from a one-byte check at a variable
    // offset (`ptr >= end` with no constant part proves nothing to it).
    match frame.at::<2>(off) {
        // SAFETY: bounds-checked by `at`.
        Some(p) => Some(unsafe { (*p)[0] }),
        None => ctx.load::<u8>(off).ok(),
    }
}

/// A big-endian 16-bit field, as [`byte_at`].
#[inline(always)]
fn be16_at(ctx: &TcContext, frame: &TcFrame, off: usize) -> Option<u16> {
    match frame.at::<2>(off) {
        // SAFETY: bounds-checked by `at`.
        Some(p) => Some(u16::from_be_bytes(unsafe { *p })),
        None => ctx.load::<[u8; 2]>(off).ok().map(u16::from_be_bytes),
    }
}

/// The L4 header's offset and protocol of an IPv4 or IPv6 packet; `None` for anything else,
/// and for IPv4 fragments after the first.
#[inline(always)]
fn l4_of(ctx: &TcContext, frame: &TcFrame) -> Option<(usize, u8)> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16_at(ctx, frame, 12)?;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16_at(ctx, frame, l3 + 2)?;
        l3 += 4;
    }
    if ethertype == ETH_P_IP {
        let ihl = usize::from(byte_at(ctx, frame, l3)? & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        // Offset bits: a later fragment has no L4 header.
        if be16_at(ctx, frame, l3 + 6)? & 0x1fff != 0 {
            return None;
        }
        let proto = byte_at(ctx, frame, l3 + 9)?;
        return Some((l3 + ihl, proto));
    }
    if ethertype != ETH_P_IPV6 {
        return None;
    }
    let mut next = byte_at(ctx, frame, l3 + 6)?;
    let mut l4 = l3 + IPV6_HLEN;
    // Two extension headers at most (hop-by-hop, then destination options or routing):
    // unrolled, a bounded walk the verifier sees whole.
    for _ in 0..2 {
        if next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST {
            break;
        }
        let len = (usize::from(byte_at(ctx, frame, l4 + 1)?) + 1) * 8;
        next = byte_at(ctx, frame, l4)?;
        l4 += len;
    }
    Some((l4, next))
}

/// Sends the packet to user space if it comes from port 53.
#[inline(always)]
fn try_capture(ctx: &TcContext, direction: u8) -> Option<()> {
    let frame = TcFrame::new(ctx);
    let (l4, proto) = l4_of(ctx, &frame)?;
    if proto != PROTO_UDP && proto != PROTO_TCP {
        return None;
    }
    if be16_at(ctx, &frame, l4)? != DNS_PORT {
        return None;
    }
    let packet_len = ctx.len();
    if proto == PROTO_TCP {
        // Data offset in 32-bit words: a segment that ends with its header has no answer (a
        // later segment of a message may hold any part of it).
        let header = usize::from(byte_at(ctx, &frame, l4 + 12)? >> 4) * 4;
        if header < 20 || packet_len as usize <= l4 + header {
            return None;
        }
    } else if (packet_len as usize) < l4 + UDP_HLEN + DNS_HLEN {
        // Not even a UDP header and a DNS header: nothing an answer could be.
        return None;
    }
    let now = now_ns();
    if !rate_allows(&DNS_RATE, global(&CAPTURE_RATE), now) {
        count(reason::RATE_LIMITED);
        return None;
    }
    let snap = global(&SNAP_LEN);
    let captured_len = if packet_len > snap { snap } else { packet_len };
    let Some(scratch) = DNS_SCRATCH.get_ptr_mut(0) else {
        count(reason::BUFFER_FULL);
        return None;
    };
    // 1..=MAX_SNAP_LEN in a form the verifier follows (a mask, then +1: a test against 0
    // becomes an unsigned subtraction it loses track of). `captured_len` is never 0 here (the
    // packet holds its headers) and never above the maximum (the daemon checks the global).
    let len = (u64::from(captured_len).wrapping_sub(1) & u64::from(MAX_SNAP_LEN - 1)) + 1;
    // SAFETY: the scratch slot is this CPU's (a TCX program is not migrated while it runs);
    // the copy stays within its `data`, whose size bounds `len`; the context and map pointers
    // are the program's own.
    let sent = unsafe {
        (*scratch).meta = DnsCaptureMeta {
            ts_ns: now,
            packet_len,
            captured_len,
            ifindex: (*ctx.skb.skb).ifindex,
            direction,
            _pad: [0; 3],
        };
        let data = core::ptr::addr_of_mut!((*scratch).data).cast();
        if bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, data, len as u32) < 0 {
            -1
        } else {
            let flags = if DNS_EVENTS.query(RB_AVAIL_DATA) >= WAKE_BYTES {
                RB_FORCE_WAKEUP
            } else {
                RB_NO_WAKEUP
            };
            bpf_ringbuf_output(
                core::ptr::addr_of!(DNS_EVENTS).cast_mut().cast(),
                scratch.cast(),
                META_LEN + len,
                flags,
            )
        }
    };
    if sent < 0 {
        count(reason::BUFFER_FULL);
        return None;
    }
    count(reason::CAPTURED);
    if packet_len > snap {
        count(reason::SNAP_CUT);
    }
    Some(())
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_perf_event_output is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
