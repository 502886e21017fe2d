//! ICMP errors quoting a full-NAT flow (path-MTU discovery): translated back to the client.

use aya_ebpf::programs::XdpContext;
use bpf_common::{NatReverseEntry, PROTO_UDP, reason};
use bpf_lib::{
    frame::{XdpFrame, load16, store16, store32},
    verdict::xdp::{Verdict, pass},
};
use conntrack::ipv4_key;
use lb_core::{
    csum,
    parse::{self, Ipv4Packet, ipv4, l4},
};

use crate::{anomaly, count_reason, fib::forward, maps::LB_NAT_REV};

/// An ICMP error (destination unreachable, including "fragmentation needed", or time exceeded)
/// quoting a packet the load balancer sent to a backend in full-NAT mode is rewritten so that
/// it quotes the client's original packet to the VIP, comes from the VIP, and goes to the
/// client. ICMP has no pseudo-header, so the ICMP checksum covers exactly the rewritten quote.
#[inline(always)]
pub(crate) fn try_icmp(ctx: &XdpContext, frame: &XdpFrame, packet: &Ipv4Packet) -> Verdict {
    let icmp_type = packet.icmp_type;
    if icmp_type != parse::ICMP_DEST_UNREACH && icmp_type != parse::ICMP_TIME_EXCEEDED {
        return anomaly(packet, pass(reason::PASS_VIP_ADDR_OTHER));
    }
    // The quote must lie inside the ICMP packet's IP total length, not in the padding behind
    // it: a translation of bytes past the packet's end would leave its checksum wrong.
    if !parse::quote_within_packet(packet) {
        return pass(reason::PASS_NOT_VIP);
    }
    let quote = parse::parse_icmp_quote(frame, packet.l4_off);
    if !quote.valid {
        return pass(reason::PASS_NOT_VIP);
    }
    // The quote is our packet to the backend: snat:nat_port -> backend:port, sent from the
    // side of the reverse key that is not the backend.
    let (reverse_key, quote_sender_side) = ipv4_key(
        quote.src,
        quote.src_port_be,
        quote.dst,
        quote.dst_port_be,
        quote.proto,
    );
    // SAFETY: read in place, as in `try_l4`.
    let Some(reverse) = (unsafe { LB_NAT_REV.get(&reverse_key) }) else {
        return pass(reason::PASS_NOT_VIP);
    };
    if reverse.backend_side == quote_sender_side {
        return pass(reason::PASS_NOT_VIP);
    }
    if translate_icmp(frame, packet, &quote, reverse).is_none() {
        return pass(reason::PASS_TRUNCATED_L3);
    }
    count_reason(reason::ICMP_TRANSLATED);
    forward(
        ctx,
        frame,
        packet,
        reverse.vip_addr[0],
        reverse.client_addr[0],
        bpf_common::PROTO_ICMP,
        0,
        0,
    )
}

#[inline(always)]
fn translate_icmp(
    frame: &XdpFrame,
    packet: &Ipv4Packet,
    quote: &parse::QuotedPacket,
    reverse: &NatReverseEntry,
) -> Option<()> {
    let client = reverse.client_addr[0];
    let vip = reverse.vip_addr[0];
    let icmp_check_off = packet.l4_off + l4::ICMP_CHECK;
    let mut icmp_check = load16(frame, icmp_check_off)?;

    // Quoted IPv4 header: src snat -> client, dst backend -> VIP.
    let (q3, q4) = parse::quote_offsets(packet.l4_off);
    let old_quote_ip_check = load16(frame, q3 + ipv4::CHECK)?;
    let quote_ip_check = csum::replace_u32(old_quote_ip_check, quote.src, client);
    let quote_ip_check = csum::replace_u32(quote_ip_check, quote.dst, vip);
    store32(frame, q3 + ipv4::SRC, client)?;
    store32(frame, q3 + ipv4::DST, vip)?;
    store16(frame, q3 + ipv4::CHECK, quote_ip_check)?;
    icmp_check = csum::replace_u32(icmp_check, quote.src, client);
    icmp_check = csum::replace_u32(icmp_check, quote.dst, vip);
    icmp_check = csum::replace_u16(icmp_check, old_quote_ip_check, quote_ip_check);

    // Quoted ports: nat_port -> client port, backend port -> VIP port.
    store16(frame, q4 + l4::SRC_PORT, reverse.client_port_be)?;
    store16(frame, q4 + l4::DST_PORT, reverse.vip_port_be)?;
    icmp_check = csum::replace_u16(icmp_check, quote.src_port_be, reverse.client_port_be);
    icmp_check = csum::replace_u16(icmp_check, quote.dst_port_be, reverse.vip_port_be);

    // A quoted UDP header always carries its checksum (within the 8 guaranteed bytes); keep it
    // consistent. A quoted TCP checksum may be cut off and receivers do not verify it.
    if quote.proto == PROTO_UDP {
        let old = load16(frame, q4 + l4::UDP_CHECK)?;
        let mut new = csum::udp_replace_u32(old, quote.src, client);
        new = csum::udp_replace_u32(new, quote.dst, vip);
        new = csum::udp_replace_u16(new, quote.src_port_be, reverse.client_port_be);
        new = csum::udp_replace_u16(new, quote.dst_port_be, reverse.vip_port_be);
        store16(frame, q4 + l4::UDP_CHECK, new)?;
        icmp_check = csum::replace_u16(icmp_check, old, new);
    }
    store16(frame, icmp_check_off, icmp_check)?;

    // Outer header: from the VIP to the client.
    let l3 = packet.l3_off;
    let ip_check = load16(frame, l3 + ipv4::CHECK)?;
    let ip_check = csum::replace_u32(ip_check, packet.src, vip);
    let ip_check = csum::replace_u32(ip_check, packet.dst, client);
    store32(frame, l3 + ipv4::SRC, vip)?;
    store32(frame, l3 + ipv4::DST, client)?;
    store16(frame, l3 + ipv4::CHECK, ip_check)?;
    Some(())
}
