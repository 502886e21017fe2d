//! ICMPv6: neighbour discovery passes; errors quoting a full-NAT flow (Packet Too Big above
//! all, which IPv6 path-MTU discovery depends on: routers never fragment) are translated back
//! to the client.

use aya_ebpf::programs::XdpContext;
use bpf_common::{FAMILY_IPV6, NatReverseEntry, PROTO_UDP, reason};
use bpf_lib::{
    frame::{XdpFrame, load16, store_addrs6, store16},
    verdict::xdp::{Verdict, pass},
};
use conntrack::canonical_key;
use lb_core::{
    csum,
    parse::l4,
    parse6::{
        self, Ipv6Packet, PROTO_ICMPV6, QuotedPacket6, ipv6, is_icmpv6_error,
        is_neighbour_discovery,
    },
};

use crate::{anomaly, count_reason, fib::forward, l3::Packet6, maps::LB_NAT_REV};

/// An ICMPv6 error quoting a packet the load balancer sent to a backend in full-NAT mode is
/// rewritten so that it quotes the client's original packet to the VIP, comes from the VIP,
/// and goes to the client. Unlike ICMP, the ICMPv6 checksum covers a pseudo-header, so the
/// outer addresses count in it too.
#[inline(always)]
pub(crate) fn try_icmp6(ctx: &XdpContext, frame: &XdpFrame, scratch: &Packet6) -> Verdict {
    let packet = &scratch.packet;
    let icmp_type = packet.icmp_type;
    if is_neighbour_discovery(icmp_type) {
        return pass(reason::PASS_NEIGHBOUR_DISCOVERY);
    }
    if !is_icmpv6_error(icmp_type) {
        return anomaly(scratch, pass(reason::PASS_VIP_ADDR_OTHER));
    }
    let quote = parse6::parse_icmp6_quote(frame, packet);
    if !quote.valid {
        return pass(reason::PASS_NOT_VIP);
    }
    // The quote is our packet to the backend: snat:nat_port -> backend:port, sent from the
    // side of the reverse key that is not the backend.
    let (reverse_key, quote_sender_side) = canonical_key(
        quote.src,
        quote.src_port_be,
        quote.dst,
        quote.dst_port_be,
        quote.proto,
        FAMILY_IPV6,
    );
    // SAFETY: read in place, as in `try_l4`.
    let Some(reverse) = (unsafe { LB_NAT_REV.get(&reverse_key) }) else {
        return pass(reason::PASS_NOT_VIP);
    };
    if reverse.backend_side == quote_sender_side {
        return pass(reason::PASS_NOT_VIP);
    }
    if translate_icmp6(frame, packet, &quote, reverse).is_none() {
        return pass(reason::PASS_TRUNCATED_L3);
    }
    count_reason(reason::ICMP_TRANSLATED);
    forward(
        ctx,
        frame,
        scratch,
        &reverse.vip_addr,
        &reverse.client_addr,
        PROTO_ICMPV6,
        0,
        0,
    )
}

#[inline(always)]
fn translate_icmp6(
    frame: &XdpFrame,
    packet: &Ipv6Packet,
    quote: &QuotedPacket6,
    reverse: &NatReverseEntry,
) -> Option<()> {
    let client = &reverse.client_addr;
    let vip = &reverse.vip_addr;
    let icmp_check_off = packet.l4() + l4::ICMP_CHECK;
    let (q3, q4) = parse6::quote6_offsets(packet.l4());
    // Every checksum is computed before any address is written (see `Packet6::rewrite_l3l4`).
    let mut icmp_check = load16(frame, icmp_check_off)?;
    // Outer header (in the pseudo-header): from the VIP to the client.
    icmp_check = csum::replace_addr6(icmp_check, &packet.src, vip);
    icmp_check = csum::replace_addr6(icmp_check, &packet.dst, client);
    // Quoted header: src snat -> client, dst backend -> VIP.
    icmp_check = csum::replace_addr6(icmp_check, &quote.src, client);
    icmp_check = csum::replace_addr6(icmp_check, &quote.dst, vip);
    // Quoted ports: nat_port -> client port, backend port -> VIP port.
    icmp_check = csum::replace_u16(icmp_check, quote.src_port_be, reverse.client_port_be);
    icmp_check = csum::replace_u16(icmp_check, quote.dst_port_be, reverse.vip_port_be);
    // The quoted UDP checksum sits in the 8 guaranteed bytes; keep it consistent (over its own
    // pseudo-header). A quoted TCP checksum may be cut off and receivers do not verify it.
    if quote.proto == PROTO_UDP {
        let old = load16(frame, q4 + l4::UDP_CHECK)?;
        let mut new = csum::udp_replace_addr6(old, &quote.src, client);
        new = csum::udp_replace_addr6(new, &quote.dst, vip);
        new = csum::udp_replace_u16(new, quote.src_port_be, reverse.client_port_be);
        new = csum::udp_replace_u16(new, quote.dst_port_be, reverse.vip_port_be);
        store16(frame, q4 + l4::UDP_CHECK, new)?;
        icmp_check = csum::replace_u16(icmp_check, old, new);
    }
    store16(frame, q4 + l4::SRC_PORT, reverse.client_port_be)?;
    store16(frame, q4 + l4::DST_PORT, reverse.vip_port_be)?;
    store_addrs6(frame, packet.l3() + ipv6::SRC, vip, client)?;
    store_addrs6(frame, q3 + ipv6::SRC, client, vip)?;
    store16(frame, icmp_check_off, icmp_check)
}
