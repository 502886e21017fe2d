//! Next hop: `bpf_fib_lookup`, its answer cached in the flow entry for `FIB_CACHE_NS`, the MAC
//! rewrite and the transmit (`XDP_TX` or a devmap redirect).

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_map_lookup_elem},
    programs::XdpContext,
};
use bpf_common::{FlowEntry, reason};
use bpf_lib::{
    frame::XdpFrame,
    global,
    verdict::xdp::{Verdict, drop, pass},
};
use lb_core::parse::Frame;

use crate::{
    config::FIB_CACHE_NS,
    l3::IpPacket,
    maps::{LB_FIB_GEN, LB_FIB_SCRATCH, LB_TX_PORTS},
};

/// Resolves the next hop with `bpf_fib_lookup`, rewrites the MAC addresses and sends the frame:
/// `XDP_TX` when the egress interface is the ingress one, a devmap redirect otherwise.
#[expect(clippy::too_many_arguments, reason = "mirrors bpf_fib_lookup's inputs")]
#[inline(always)]
pub(crate) fn forward<P: IpPacket>(
    ctx: &XdpContext,
    frame: &XdpFrame,
    packet: &P,
    src: P::Addr<'_>,
    dst: P::Addr<'_>,
    proto: u8,
    src_port_be: u16,
    dst_port_be: u16,
) -> Verdict {
    forward_cached(
        ctx,
        frame,
        packet,
        (src, dst),
        proto,
        (src_port_be, dst_port_be),
        core::ptr::null_mut(),
        0,
    )
}

/// Sends the rewritten frame to its next hop. With a flow entry (`cache` non-null), a FIB
/// answer cached less than the `FIB_CACHE_NS` global ago for a packet at least this long is reused, and a
/// fresh answer is cached: an established flow then costs no `bpf_fib_lookup` per packet.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the flow's addresses, ports and cache, passed by value for the verifier"
)]
pub(crate) fn forward_cached<P: IpPacket>(
    ctx: &XdpContext,
    frame: &XdpFrame,
    packet: &P,
    (src, dst): (P::Addr<'_>, P::Addr<'_>),
    proto: u8,
    (src_port_be, dst_port_be): (u16, u16),
    cache: *mut FlowEntry,
    now: u64,
) -> Verdict {
    if !cache.is_null() {
        // SAFETY: a live map value from `get_ptr_mut`, valid for this program run.
        let entry = unsafe { &*cache };
        // One array lookup per packet with a flow entry, far cheaper than the
        // `bpf_fib_lookup` it saves.
        if entry.fib_cache_usable(
            now,
            global(&FIB_CACHE_NS),
            packet.ip_len(),
            fib_generation(),
        ) {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&entry.fib_dmac);
            macs[6..].copy_from_slice(&entry.fib_smac);
            return egress(ctx, frame, macs, entry.fib_ifindex);
        }
    }
    // The lookup's 64-byte parameters live in a per-CPU scratch slot, not on the stack,
    // which is at the verifier's 512-byte limit. XDP runs are not preempted on their CPU, so
    // nothing else uses the slot meanwhile.
    let Some(params) = fib_scratch() else {
        return drop(reason::DROP_FIB_FAILED);
    };
    // SAFETY: a live per-CPU map value of this type, valid for this program run.
    let params = unsafe { &mut *params };
    // SAFETY: plain-old-data C struct; all-zero is a valid initial value.
    *params = unsafe { core::mem::zeroed() };
    params.l4_protocol = proto;
    params.sport = src_port_be;
    params.dport = dst_port_be;
    params.__bindgen_anon_1.tot_len = packet.ip_len();
    params.ifindex = ctx.ingress_ifindex() as u32;
    P::fib_addresses(params, src, dst);

    // SAFETY: `params` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return pass(reason::PASS_FIB_NO_NEIGH),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return pass(reason::PASS_FRAG_NEEDED),
        _ => return drop(reason::DROP_FIB_FAILED),
    }
    if !cache.is_null() {
        // SAFETY: as above.
        let entry = unsafe { &mut *cache };
        entry.fib_ifindex = params.ifindex;
        entry.fib_dmac = params.dmac;
        entry.fib_smac = params.smac;
        entry.fib_cached_ns = now;
        // Read after the lookup, so that no value lives across the helper call. Safe: the
        // daemon bumps the generation only after the kernel changed the neighbour or route,
        // so a lookup this close before the read already saw the change.
        entry.set_fib_generation(fib_generation());
        // A fresh answer resets the length it was checked against; within its lifetime the
        // longest packet seen so far is the bound.
        entry.fib_max_len = packet.ip_len();
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    egress(ctx, frame, macs, params.ifindex)
}

/// The per-CPU `bpf_fib_lookup` parameters (see `forward_cached`).
#[inline(always)]
fn fib_scratch() -> Option<*mut FibParams> {
    // SAFETY: as in `fib_generation`: the map's definition, and a key in read-only data.
    let value = unsafe {
        bpf_map_lookup_elem(
            (&raw const LB_FIB_SCRATCH).cast_mut().cast(),
            (&raw const FIB_GEN_KEY).cast(),
        )
    };
    (!value.is_null()).then_some(value.cast::<FibParams>())
}

/// Index 0 of `LB_FIB_GEN`, in read-only data: a key on the stack would push `xdp_lb` past
/// the verifier's 512 bytes (the helper accepts a key in a map value, which `.rodata` is).
static FIB_GEN_KEY: u32 = 0;

/// The FIB cache's generation; 0 if unreadable (an empty array cannot be, but the verifier
/// wants the null check).
#[inline(always)]
fn fib_generation() -> u32 {
    // SAFETY: `Array` is a transparent wrapper of its map definition, which is what the helper
    // takes; the key lives for the program's life.
    let value = unsafe {
        bpf_map_lookup_elem(
            (&raw const LB_FIB_GEN).cast_mut().cast(),
            (&raw const FIB_GEN_KEY).cast(),
        )
    };
    if value.is_null() {
        return 0;
    }
    // SAFETY: a non-null value of an Array<u32>.
    unsafe { core::ptr::read_volatile(value.cast::<u32>()) }
}

/// Writes the next hop's and our MAC addresses and transmits on `ifindex`.
#[inline(always)]
fn egress(ctx: &XdpContext, frame: &XdpFrame, macs: [u8; 12], ifindex: u32) -> Verdict {
    let Some(eth) = frame.at::<12>(0) else {
        return pass(reason::PASS_TRUNCATED_L3);
    };
    // SAFETY: bounds-checked by `at`.
    unsafe { *eth = macs };

    if ifindex == ctx.ingress_ifindex() as u32 {
        return Verdict {
            action: xdp_action::XDP_TX,
            reason: reason::FWD_TX,
        };
    }
    match LB_TX_PORTS.redirect(ifindex, 0) {
        Ok(action) => Verdict {
            action,
            reason: reason::FWD_REDIRECT,
        },
        Err(_) => pass(reason::PASS_NO_TX_PORT),
    }
}
