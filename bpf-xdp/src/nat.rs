//! Full-NAT: source-port allocation for a new flow (with its reverse entry), the L3/L4 rewrite
//! with incremental checksums, and the backend -> load balancer direction: replies translated
//! back to VIP -> client.

use aya_ebpf::{bindings::BPF_NOEXIST, programs::XdpContext};
use bpf_common::{NatReverseEntry, VipInfo, ct::CtKey, reason};
use bpf_lib::{
    frame::{XdpFrame, load16},
    global,
    verdict::xdp::{Verdict, pass},
};
use conntrack::{Direction, TcpFlags, canonical_key, direction_of, with_port};
use lb_core::{
    hash::{SEED_NAT_PORT, derive},
    parse::l4,
};

use crate::{
    config::{NAT_PORT_MAX, NAT_PORT_MIN, NAT_PORT_TRIES},
    count_reason,
    fib::forward,
    forward::{Chosen, Tuple},
    l3::IpPacket,
    maps::{LB_FLOWS, LB_NAT_REV},
    track::{packet_time, track},
};

/// [`allocate_nat_port`]'s answer when every port it tried is taken.
pub(crate) const NO_NAT_PORT: u32 = u32::MAX;

/// Tries the client's own port, then a few hashed ports from the configured range, inserting
/// the reverse entry with `BPF_NOEXIST` so that another flow's entry is never overwritten.
/// Returns the port (network byte order) or [`NO_NAT_PORT`].
///
/// A BPF subprogram rather than inlined: its keys and entries would otherwise share
/// `xdp_lb`'s 512-byte stack frame with the new flow's state, which LLVM refuses. It runs once
/// per new full-NAT flow only.
#[inline(always)]
pub(crate) fn allocate_nat_port(
    flow: &Tuple,
    (owner, client_side): (&CtKey, u8),
    chosen: &Chosen,
    vip: &VipInfo,
    reverse: &mut NatReverseEntry,
) -> u32 {
    // Read through `global` so that LLVM cannot unroll the loop: eight unrolled copies of its
    // keys and entries exceed the 512-byte stack. The verifier still sees a constant bound
    // (`.rodata` is frozen), and `min` caps it whatever the global says.
    let tries = global(&NAT_PORT_TRIES).min(16);
    let min = global(&NAT_PORT_MIN) as u32;
    let max = global(&NAT_PORT_MAX) as u32;
    if max < min {
        return NO_NAT_PORT;
    }
    let span = max - min + 1;
    let client_port = u16::from_be(flow.src_port_be) as u32;
    reverse.owner = *owner;
    reverse.client_addr = *flow.src;
    reverse.vip_addr = *flow.dst;
    reverse.client_port_be = flow.src_port_be;
    reverse.vip_port_be = flow.dst_port_be;
    reverse.service_id = vip.service_id;
    reverse.backend_id = chosen.id;
    reverse.client_side = client_side;
    // The backend leg's key: backend address and port against the SNAT address and the port
    // being tried. Its canonical order depends on the two addresses alone when they differ
    // (the control plane never sets a backend's own address as its SNAT address), so it is
    // computed once and each attempt only sets the port.
    if chosen.info.addr == chosen.info.snat_addr {
        return NO_NAT_PORT;
    }
    let (backend_leg, backend_side) = canonical_key(
        chosen.info.addr,
        chosen.info.port_be,
        chosen.info.snat_addr,
        0,
        flow.proto,
        flow.family,
    );
    reverse.backend_side = backend_side;
    let port_hash = flow.hash(SEED_NAT_PORT);
    let mut attempt = 0;
    while attempt < tries {
        let port = if attempt == 0 && client_port >= min && client_port <= max {
            client_port
        } else {
            min + derive(port_hash, attempt) % span
        };
        let port_be = (port as u16).to_be();
        let reverse_key = with_port(backend_leg, backend_side ^ 1, port_be);
        if LB_NAT_REV
            .insert(&reverse_key, &*reverse, BPF_NOEXIST as u64)
            .is_ok()
        {
            return port_be as u32;
        }
        if claim_taken_port(&reverse_key, reverse, port_be) {
            return port_be as u32;
        }
        attempt += 1;
    }
    NO_NAT_PORT
}

/// Whether the taken port of `reverse_key` may still be used by the flow that owns `reverse`:
/// it is that very flow's (its flow entry was evicted or rescheduled), or its owner is gone
/// from `LB_FLOWS` and the stale reverse entry is taken over. Without the take-over the finite
/// port space towards one backend fills up with dead flows' entries between GC sweeps, because
/// reverse entries are refreshed by replies and can outlive their flow entries.
#[inline(always)]
fn claim_taken_port(reverse_key: &CtKey, reverse: &NatReverseEntry, port_be: u16) -> bool {
    // SAFETY: read in place; a concurrent update replaces the element whole, under RCU.
    let Some(existing) = (unsafe { LB_NAT_REV.get(reverse_key) }) else {
        return false;
    };
    if existing.owner == reverse.owner {
        return true;
    }
    // SAFETY: read in place. The owner's key is looked up straight from the reverse entry.
    let owner_alive = unsafe { LB_FLOWS.get(&existing.owner) }.is_some_and(|entry| {
        entry.nat_port_be == port_be && entry.backend_id == existing.backend_id
    });
    if !owner_alive && LB_NAT_REV.insert(reverse_key, reverse, 0).is_ok() {
        count_reason(reason::NAT_PORT_RECLAIMED);
        return true;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Backend -> load balancer (full-NAT replies and ICMP errors): translate back to the client.
// ---------------------------------------------------------------------------------------------

#[inline(always)]
pub(crate) fn reply_to_client<P: IpPacket>(
    ctx: &XdpContext,
    frame: &XdpFrame,
    packet: &P,
    reverse: &NatReverseEntry,
    proto: u8,
) -> Verdict {
    let Some((src_port_be, dst_port_be)) = ports(frame, packet.l4_off()) else {
        return pass(reason::PASS_TRUNCATED_L3);
    };
    let vip_addr = P::narrow(&reverse.vip_addr);
    let client_addr = P::narrow(&reverse.client_addr);
    if packet
        .rewrite_l3l4(
            frame,
            proto,
            (packet.src(), vip_addr),
            (packet.dst(), client_addr),
            (
                (src_port_be, reverse.vip_port_be),
                (dst_port_be, reverse.client_port_be),
            ),
        )
        .is_none()
    {
        return pass(reason::PASS_TRUNCATED_L3);
    }
    count_reason(reason::NAT_REPLY_TRANSLATED);
    track_reply(packet, reverse, proto);
    forward(
        ctx,
        frame,
        packet,
        vip_addr,
        client_addr,
        proto,
        reverse.vip_port_be,
        reverse.client_port_be,
    )
}

/// Advances the client flow's conntrack record with a backend reply, in the reply direction:
/// full-NAT flows see both directions, so their TCP state follows the whole handshake and
/// close, exactly as in the tc programs' `CT_FLOWS`. A reply whose flow entry is gone (evicted)
/// is still translated; there is just no record left to advance.
#[inline(always)]
fn track_reply<P: IpPacket>(packet: &P, reverse: &NatReverseEntry, proto: u8) {
    let Some(entry_ptr) = LB_FLOWS.get_ptr_mut(&reverse.owner) else {
        return;
    };
    // SAFETY: a valid map value; see `to_backend` on concurrent updates.
    let entry = unsafe { &mut *entry_ptr };
    if entry.backend_id != reverse.backend_id
        || direction_of(entry.ct.orig_side, reverse.client_side) != Direction::Original
    {
        return;
    }
    let flags = TcpFlags(packet.tcp_flags());
    track(
        &mut entry.ct,
        proto,
        Direction::Reply,
        flags,
        packet.ip_len() as u64,
        packet_time(proto, flags),
    );
}

#[inline(always)]
fn ports(frame: &XdpFrame, l4_off: usize) -> Option<(u16, u16)> {
    Some((
        load16(frame, l4_off + l4::SRC_PORT)?,
        load16(frame, l4_off + l4::DST_PORT)?,
    ))
}
