//! Benchmark harness (used by `cargo xtask bench` and its smoke test, never attached).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_smp_processor_id, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use bpf_common::{BENCH_FRAME_MAX, BenchTemplate};
use bpf_lib::frame::{XdpFrame, store16};
use lb_core::{
    parse::{self, Outcome, ipv4, l4},
    parse6::{self, ipv6},
};

#[map(name = "BENCH_TEMPLATE")]
static BENCH_TEMPLATE: Array<BenchTemplate> = Array::with_max_entries(1, 0);

#[map(name = "BENCH_COUNTER")]
static BENCH_COUNTER: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "BENCH_TARGET")]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Restores the frame from `BENCH_TEMPLATE` (BPF_PROG_TEST_RUN repeats share one buffer, so a
/// rewriting program would otherwise see its own output from the second repeat on) and
/// tail-calls the program under test in `BENCH_TARGET[0]`.
#[xdp]
pub fn xdp_bench_harness(ctx: XdpContext) -> u32 {
    let Some(template) = BENCH_TEMPLATE.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a valid map value.
    let template = unsafe { &mut *template };
    let len = template.len as usize;
    let frame_len = ctx.data_end() - ctx.data();
    if len == 0 || len > BENCH_FRAME_MAX || len != frame_len {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: `len` is bounded by BENCH_FRAME_MAX and lies within both buffers.
    let rc = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            0,
            template.frame.as_mut_ptr() as *mut _,
            len as u32,
        )
    };
    if rc != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if template.vary_flow != 0 && vary_flow(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: on success the tail call does not return.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Gives the restored frame a fresh 5-tuple: the source address's low 16 bits (IPv4 or IPv6)
/// and the L4 source port.
#[inline(always)]
fn vary_flow(ctx: &XdpContext) -> Option<()> {
    let counter = BENCH_COUNTER.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot.
    let value = unsafe {
        *counter = (*counter).wrapping_add(1);
        *counter
    };
    // Every CPU's counter starts at 0: with the CPU in the top byte, two runs that land on
    // different CPUs still send distinct tuples (a repeat of another CPU's tuple would find
    // that flow pinned, and not be a new flow).
    // SAFETY: bpf_get_smp_processor_id has no preconditions.
    let value = value.wrapping_add(unsafe { bpf_get_smp_processor_id() } << 24);
    let frame = XdpFrame::new(ctx);
    let parsed = parse::parse(&frame);
    // The low 16 bits of the source address and the source port, at each family's offsets.
    let (address_low, port) = match parsed.outcome {
        Outcome::Ipv4 => (
            parsed.packet.l3_off + ipv4::SRC + 2,
            parsed.packet.l4_off + l4::SRC_PORT,
        ),
        Outcome::Ipv6 => {
            let packet = parse6::parse6(&frame).ipv6().copied()?;
            (packet.l3() + ipv6::SRC + 14, packet.l4() + l4::SRC_PORT)
        }
        _ => return None,
    };
    store16(&frame, address_low, ((value >> 16) as u16).to_be())?;
    store16(&frame, port, ((value & 0xffff) as u16).to_be())?;
    Some(())
}
