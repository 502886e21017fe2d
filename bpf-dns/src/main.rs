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
    dns::{
        DEFAULT_CAPTURE_RATE, DEFAULT_SNAP_LEN, DIR_EGRESS, DIR_INGRESS, DnsCaptureMeta,
        DnsScratch, MAX_SNAP_LEN, RING_BYTES, WAKE_BYTES, reason,
    },
    policy::RateBucket,
};
use bpf_lib::{
    event::{rate_allows, wake_flags},
    frame::TcFrame,
    global, now_ns,
    verdict::tc::TCX_NEXT,
};
use lb_core::parse::Frame as _;

#[unsafe(no_mangle)]
static CAPTURE_RATE: u64 = DEFAULT_CAPTURE_RATE;

#[unsafe(no_mangle)]
static SNAP_LEN: u32 = DEFAULT_SNAP_LEN;

#[map(name = "DNS_EVENTS")]
static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map(name = "DNS_SCRATCH")]
static DNS_SCRATCH: PerCpuArray<DnsScratch> = PerCpuArray::with_max_entries(1, 0);

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

/// The packet as the header walk reads it: the linear area when the bytes are there, else
/// `bpf_skb_load_bytes` (headers in a paged fragment).
struct Skb<'a> {
    ctx: &'a TcContext,
    frame: TcFrame,
}

impl lb_core::capture::Bytes for Skb<'_> {
    #[inline(always)]
    fn u8_at(&self, off: usize) -> Option<u8> {
        // A two-byte window: the verifier derives no range from a one-byte check at a variable
        // offset (`ptr >= end` with no constant part proves nothing to it).
        match self.frame.at::<2>(off) {
            // SAFETY: bounds-checked by `at`.
            Some(p) => Some(unsafe { (*p)[0] }),
            None => self.ctx.load::<u8>(off).ok(),
        }
    }

    #[inline(always)]
    fn be16_at(&self, off: usize) -> Option<u16> {
        match self.frame.at::<2>(off) {
            // SAFETY: bounds-checked by `at`.
            Some(p) => Some(u16::from_be_bytes(unsafe { *p })),
            None => self.ctx.load::<[u8; 2]>(off).ok().map(u16::from_be_bytes),
        }
    }
}

/// Sends the packet to user space if it comes from port 53.
#[inline(always)]
fn try_capture(ctx: &TcContext, direction: u8) -> Option<()> {
    let skb = Skb {
        ctx,
        frame: TcFrame::new(ctx),
    };
    let packet_len = ctx.len();
    lb_core::capture::dns_response(&skb, packet_len as usize)?;
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
            let flags = wake_flags(&DNS_EVENTS, META_LEN + len, WAKE_BYTES);
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
