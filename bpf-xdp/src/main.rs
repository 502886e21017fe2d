//! XDP L4 load balancer.
//!
//! `xdp_lb` runs on every interface the daemon manages (client-facing and backend-facing):
//!
//! - a TCP/UDP packet to a VIP is pinned to a backend (flow table first, Maglev table for a new
//!   flow) and forwarded, in full-NAT (DNAT + SNAT) or DSR (MAC rewrite) mode;
//! - a TCP/UDP packet matching a full-NAT reverse entry (a backend's reply) is translated back
//!   to VIP -> client and forwarded;
//! - an ICMP error quoting a full-NAT flow is translated back to the client (path-MTU discovery);
//! - everything else goes to the stack untouched.
//!
//! IPv6 frames are tail-called into `xdp_lb6` (`LB_PROGS`), which runs the same paths over
//! 16-byte addresses with a stack frame of its own: `xdp_lb`'s is nearly full. The shared
//! paths are generic over the family ([`l3::IpPacket`]); neighbour discovery always passes.
//!
//! Every path ends in an explicit verdict and counts exactly one reason (`bpf_common::reason`).
//! The parsing, checksum and hashing logic lives in `lb-core` and is unit-tested on the host.
//!
//! Layout: the entry points and the dispatch by protocol are here; [`forward`] is the client ->
//! VIP path (backend choice, flow table), [`nat`] the full-NAT port allocation, rewrite and
//! reply translation, [`icmp`] the ICMP error translation, [`fib`] the next hop and its cache,
//! [`track`] the flow table's conntrack records, [`bench`] the benchmark harness programs.
//! Frame access, verdicts and counters come from `bpf-lib`.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: by value, a key or entry \
              that lives in a map (a scratch slot, a reverse entry's owner) is first copied onto \
              the stack, and xdp_lb's frame is within a few bytes of the verifier's 512"
)]

mod bench;
mod config;
mod fib;
mod forward;
mod icmp;
mod icmp6;
mod l3;
mod maps;
mod nat;
mod track;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use bpf_common::{PROG_LB6, PROTO_TCP, PROTO_UDP, VipAddrKey, VipKey, defaults, reason};
use bpf_lib::{
    count::count_bytes,
    frame::XdpFrame,
    verdict::xdp::{Verdict, drop, pass},
};
use lb_core::{
    parse::{self, L4, Outcome},
    parse6::{self, Outcome6},
};

use crate::{
    forward::to_backend,
    icmp::try_icmp,
    icmp6::try_icmp6,
    l3::IpPacket,
    maps::{LB_IF_STATS, LB_NAT_REV, LB_PROGS, LB_REASONS, LB_VIP_ADDRS, LB_VIPS, LB6_PACKET},
    nat::reply_to_client,
};
#[cfg(feature = "upgrade-test-variant")]
use {crate::config::MAGLEV_SIZE, bpf_lib::global};

// ---------------------------------------------------------------------------------------------
// Counters (`bpf_lib::count` over this program's maps).
// ---------------------------------------------------------------------------------------------

#[inline(always)]
pub(crate) fn count_reason(reason: u32) {
    bpf_lib::count::count_reason(&LB_REASONS, reason);
}

// ---------------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------------

#[xdp]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    // The upgrade test's "rebuilt program": one extra, harmless load, so its bytecode (and
    // the kernel's tag of it) differs from the normal build.
    #[cfg(feature = "upgrade-test-variant")]
    let _ = global(&MAGLEV_SIZE);
    // Every frame an attached interface receives, whatever becomes of it: a per-CPU array
    // slot the verifier inlines, no hash lookup on the fast path.
    let ifindex = ctx.ingress_ifindex() as u32;
    let slot = if ifindex < defaults::MAX_IFINDEX {
        ifindex
    } else {
        0
    };
    count_bytes(&LB_IF_STATS, slot, (ctx.data_end() - ctx.data()) as u64);
    let verdict = try_xdp_lb(&ctx);
    count_reason(verdict.reason);
    verdict.action
}

/// The IPv6 load balancer, entered only by `xdp_lb`'s tail call (which counted the frame in
/// `LB_IF_STATS`); it counts its own verdict.
#[xdp]
pub fn xdp_lb6(ctx: XdpContext) -> u32 {
    let verdict = try_xdp_lb6(&ctx);
    count_reason(verdict.reason);
    verdict.action
}

/// The floor of any XDP measurement on this machine: drops everything. Also the trivial
/// tail-call target the benchmark uses to measure the harness's own cost.
#[xdp]
pub fn xdp_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Lets everything through. Attached to the receiving end of a veth so that frames redirected
/// into it are delivered (a veth only accepts XDP redirects when its peer runs XDP or GRO).
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

fn try_xdp_lb(ctx: &XdpContext) -> Verdict {
    let frame = XdpFrame::new(ctx);
    let parsed = parse::parse(&frame);
    let packet = parsed.packet;
    match parsed.outcome {
        Outcome::Ipv4 => {}
        Outcome::Ipv6 => {
            // SAFETY: a tail call into a program of the same type over the same context;
            // on success control never returns here.
            unsafe { LB_PROGS.tail_call(ctx, PROG_LB6) };
            return pass(reason::PASS_IPV6_UNAVAILABLE);
        }
        Outcome::NotIpv4 => return pass(reason::PASS_NOT_IPV4),
        Outcome::Truncated => return pass(reason::PASS_TRUNCATED_L3),
        Outcome::Malformed => return pass(reason::PASS_MALFORMED_IPV4),
    }
    match packet.l4 {
        L4::Tcp => try_l4(ctx, &frame, &packet, PROTO_TCP),
        L4::Udp => try_l4(ctx, &frame, &packet, PROTO_UDP),
        L4::Icmp => try_icmp(ctx, &frame, &packet),
        L4::Fragment => anomaly(&packet, drop(reason::DROP_FRAGMENT)),
        L4::Truncated => anomaly(&packet, drop(reason::DROP_TRUNCATED_L4)),
        L4::ExtLimit => anomaly(&packet, drop(reason::DROP_EXT_HEADER_LIMIT)),
        L4::Other => anomaly(&packet, pass(reason::PASS_VIP_ADDR_OTHER)),
    }
}

#[inline(always)]
fn try_xdp_lb6(ctx: &XdpContext) -> Verdict {
    let frame = XdpFrame::new(ctx);
    let Some(scratch) = LB6_PACKET.get_ptr_mut(0) else {
        return drop(reason::DROP_INTERNAL);
    };
    // SAFETY: this CPU's slot of a one-entry per-CPU array, used only within this invocation
    // (XDP runs are not preempted on their CPU).
    let scratch = unsafe { &mut *scratch };
    let outcome = parse6::parse6_into(&frame, &mut scratch.packet);
    let l4 = scratch.packet.l4;
    if l4 == L4::Tcp || l4 == L4::Udp {
        scratch.key_flow();
    }
    let packet = &*scratch;
    match outcome {
        Outcome6::Ipv6 => {}
        // Only a bad `LB_PROGS` entry or a caller other than `xdp_lb` gets here.
        Outcome6::NotIpv6 => return pass(reason::PASS_NOT_IPV4),
        Outcome6::Truncated => return pass(reason::PASS_TRUNCATED_L3),
        Outcome6::Malformed => return pass(reason::PASS_MALFORMED_IPV6),
    }
    match l4 {
        L4::Tcp => try_l4(ctx, &frame, packet, PROTO_TCP),
        L4::Udp => try_l4(ctx, &frame, packet, PROTO_UDP),
        L4::Icmp => try_icmp6(ctx, &frame, packet),
        L4::Fragment => anomaly(packet, drop(reason::DROP_FRAGMENT)),
        L4::Truncated => anomaly(packet, drop(reason::DROP_TRUNCATED_L4)),
        L4::ExtLimit => anomaly(packet, drop(reason::DROP_EXT_HEADER_LIMIT)),
        L4::Other => anomaly(packet, pass(reason::PASS_VIP_ADDR_OTHER)),
    }
}

/// Applies `verdict` when the packet is addressed to a VIP address; passes it otherwise. Only
/// anomalous packets pay for this lookup.
#[inline(always)]
pub(crate) fn anomaly<P: IpPacket>(packet: &P, verdict: Verdict) -> Verdict {
    let key = VipAddrKey {
        addr: *packet.wide_dst(),
        family: P::FAMILY,
        _pad: [0; 3],
    };
    // SAFETY: the value is only checked for presence.
    if unsafe { LB_VIP_ADDRS.get(key) }.is_some() {
        verdict
    } else {
        pass(reason::PASS_NOT_VIP)
    }
}

#[inline(always)]
fn try_l4<P: IpPacket>(ctx: &XdpContext, frame: &XdpFrame, packet: &P, proto: u8) -> Verdict {
    let (src_port_be, dst_port_be) = packet.ports_be();
    let tcp_flags = packet.tcp_flags();
    let vip_key = VipKey {
        addr: *packet.wide_dst(),
        port_be: dst_port_be,
        proto,
        family: P::FAMILY,
    };
    // SAFETY: copied out at once; the daemon replaces values whole.
    if let Some(vip) = unsafe { LB_VIPS.get(vip_key) }.copied() {
        return to_backend(
            ctx,
            frame,
            packet,
            &vip,
            proto,
            src_port_be,
            dst_port_be,
            tcp_flags,
        );
    }
    let (reverse_key, sender_side) = packet.flow_key(proto);
    // SAFETY: read in place (an 88-byte copy would not fit the stack); a concurrent update
    // replaces the element whole, under RCU.
    if let Some(reverse) = unsafe { LB_NAT_REV.get(&*reverse_key) } {
        // The key is bidirectional; only the backend's packets are replies to translate.
        if reverse.backend_side == sender_side {
            return reply_to_client(ctx, frame, packet, reverse, proto);
        }
    }
    pass(reason::PASS_NOT_VIP)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
