//! Bounds-checked parsing of Ethernet (+ one 802.1Q tag), IPv6 with its extension headers, and
//! TCP, UDP and ICMPv6, over the same [`Frame`] trait as [`parse`](crate::parse).
//!
//! # Rules for anomalies
//!
//! | input | outcome |
//! | --- | --- |
//! | ethertype other than IPv6 (after at most one VLAN tag) | [`Outcome6::NotIpv6`] |
//! | Ethernet, VLAN or the 40-byte IPv6 header cut short | [`Outcome6::Truncated`] |
//! | version != 6, or a payload length beyond the frame | [`Outcome6::Malformed`] |
//! | hop-by-hop, routing or destination options headers | walked, up to [`MAX_EXT_HEADERS`] of them, and forwarded unchanged |
//! | an extension header cut short by the payload length or the frame | [`L4::Truncated`] |
//! | more extension headers than [`MAX_EXT_HEADERS`] | [`L4::ExtLimit`] |
//! | a fragment header (any offset, atomic fragments included) | [`L4::Fragment`]: ports are never read, so all fragments of a datagram are treated alike |
//! | TCP/UDP/ICMPv6 header cut short | [`L4::Truncated`], by the same rules as IPv4 |
//! | any other next header (AH, ESP, no next header, ...) | [`L4::Other`] |

use crate::parse::{Frame, ICMP_HLEN, L4, L4Fields, l3_start, parse_l4};

pub use crate::parse::ETH_P_IPV6;

pub const IPV6_HLEN: usize = 40;

/// Byte offsets inside an IPv6 header.
pub mod ipv6 {
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
}

/// Next-header values.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_DEST: u8 = 60;
pub const PROTO_ICMPV6: u8 = 58;

/// Extension headers walked before giving up ([`L4::ExtLimit`]). Real traffic carries zero or
/// one; each walked header is one unrolled step for the verifier.
pub const MAX_EXT_HEADERS: usize = 4;

/// ICMPv6 error types that quote the offending packet and that the load balancer translates.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAM_PROBLEM: u8 = 4;

/// Whether an ICMPv6 type is neighbour discovery (router solicitation and advertisement,
/// neighbour solicitation and advertisement, redirect: RFC 4861, types 133-137), which always
/// goes to the stack untouched.
#[inline(always)]
pub const fn is_neighbour_discovery(icmp_type: u8) -> bool {
    icmp_type >= 133 && icmp_type <= 137
}

/// Whether an ICMPv6 type is an error that quotes a packet (types 1-4; RFC 4443).
#[inline(always)]
pub const fn is_icmpv6_error(icmp_type: u8) -> bool {
    icmp_type >= ICMPV6_DEST_UNREACH && icmp_type <= ICMPV6_PARAM_PROBLEM
}

/// Outcome of [`parse6`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome6 {
    /// An IPv6 packet: [`Parsed6::packet`] is valid.
    Ipv6,
    #[default]
    NotIpv6,
    Truncated,
    Malformed,
}

/// A parsed IPv6 packet; a plain, always initialised struct for the same reasons as
/// [`Ipv4Packet`](crate::parse::Ipv4Packet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv6Packet {
    /// Offset of the IPv6 header (14, or 18 behind a VLAN tag). `u16`, not `usize`: the XDP
    /// program keeps the packet in a map value, and a 16-bit load is a bounded, non-negative
    /// offset to the verifier where a 64-bit one is any scalar.
    pub l3_off: u16,
    /// Offset of the transport header, behind the extension headers.
    pub l4_off: u16,
    /// Source and destination addresses as wire bytes read in memory order, four words each.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// The upper-layer protocol (the last next header).
    pub proto: u8,
    /// The payload length field (host byte order): extension headers and transport.
    pub payload_len: u16,
    /// At least one extension header was walked.
    pub has_ext_headers: bool,
    pub l4: L4,
    /// TCP/UDP ports in network byte order (as on the wire).
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub tcp_flags: u8,
    pub tcp_hlen: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
}

impl Ipv6Packet {
    /// [`Ipv6Packet::l3_off`] as an offset.
    #[inline(always)]
    pub const fn l3(&self) -> usize {
        self.l3_off as usize
    }

    /// [`Ipv6Packet::l4_off`] as an offset.
    #[inline(always)]
    pub const fn l4(&self) -> usize {
        self.l4_off as usize
    }

    /// The whole IP packet's length (header and payload), as conntrack counts bytes and as
    /// `bpf_fib_lookup` checks the MTU.
    #[inline(always)]
    pub const fn ip_len(&self) -> u16 {
        self.payload_len.saturating_add(IPV6_HLEN as u16)
    }
}

/// The result of [`parse6`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed6 {
    pub outcome: Outcome6,
    /// Valid when `outcome == Outcome6::Ipv6`; all zero otherwise.
    pub packet: Ipv6Packet,
}

impl Parsed6 {
    /// The packet, when the frame is IPv6.
    pub fn ipv6(&self) -> Option<&Ipv6Packet> {
        (self.outcome == Outcome6::Ipv6).then_some(&self.packet)
    }
}

#[inline(always)]
fn words(bytes: &[u8; IPV6_HLEN], at: usize) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let o = at + i * 4;
        out[i] = u32::from_ne_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        i += 1;
    }
    out
}

/// Parses an IPv6 frame. Never panics; every read is bounds-checked.
#[inline(always)]
pub fn parse6<F: Frame>(frame: &F) -> Parsed6 {
    let mut packet = Ipv6Packet::default();
    let outcome = parse6_into(frame, &mut packet);
    Parsed6 { outcome, packet }
}

/// [`parse6`] into a packet the caller holds: the XDP program keeps it in a per-CPU map value,
/// off its stack. `packet` is only written, wholly, when the outcome is [`Outcome6::Ipv6`]
/// (not zeroed first: a 100-byte `memset` is a loop the verifier walks byte by byte).
#[inline(always)]
pub fn parse6_into<F: Frame>(frame: &F, packet: &mut Ipv6Packet) -> Outcome6 {
    let Some((ethertype, l3_off)) = l3_start(frame) else {
        return Outcome6::Truncated;
    };
    if ethertype != ETH_P_IPV6 {
        return Outcome6::NotIpv6;
    }
    let Some(ip) = frame.at::<IPV6_HLEN>(l3_off) else {
        return Outcome6::Truncated;
    };
    // SAFETY: bounds-checked by `at`; `[u8; N]` has alignment 1.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Outcome6::Malformed;
    }
    let payload_len = u16::from_be_bytes([ip[ipv6::PAYLOAD_LEN], ip[ipv6::PAYLOAD_LEN + 1]]);
    let ip_end = l3_off + IPV6_HLEN + payload_len as usize;
    // Beyond 64 KiB only on the host (a kernel frame is at most `MAX_FRAME`): the offsets are
    // 16-bit.
    if !frame.fits(ip_end) || ip_end > u16::MAX as usize {
        return Outcome6::Malformed;
    }
    packet.l3_off = l3_off as u16;
    packet.l4_off = (l3_off + IPV6_HLEN) as u16;
    packet.src = words(ip, ipv6::SRC);
    packet.dst = words(ip, ipv6::DST);
    packet.proto = ip[ipv6::NEXT_HEADER];
    packet.payload_len = payload_len;
    packet.has_ext_headers = false;
    let fields = match walk_extension_headers(frame, packet, ip_end) {
        None => parse_l4(frame, packet.proto, PROTO_ICMPV6, packet.l4(), ip_end),
        Some(l4) => L4Fields {
            l4,
            ..L4Fields::default()
        },
    };
    packet.l4 = fields.l4;
    packet.src_port_be = fields.src_port_be;
    packet.dst_port_be = fields.dst_port_be;
    packet.tcp_flags = fields.tcp_flags;
    packet.tcp_hlen = fields.tcp_hlen;
    packet.icmp_type = fields.icmp_type;
    packet.icmp_code = fields.icmp_code;
    Outcome6::Ipv6
}

/// Steps over hop-by-hop, routing and destination options headers, leaving `packet.proto` and
/// `packet.l4_off` at the upper-layer header. Returns `None` when the upper-layer header is
/// reached, or the anomaly that stopped the walk.
#[inline(always)]
fn walk_extension_headers<F: Frame>(
    frame: &F,
    packet: &mut Ipv6Packet,
    ip_end: usize,
) -> Option<L4> {
    let mut step = 0;
    while step <= MAX_EXT_HEADERS {
        let next = packet.proto;
        if next == NEXTHDR_FRAGMENT {
            return Some(L4::Fragment);
        }
        if next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST {
            return None;
        }
        if step == MAX_EXT_HEADERS {
            return Some(L4::ExtLimit);
        }
        // Every one of the three starts with (next header, length in 8-octet units beyond the
        // first 8), and is at least 8 bytes long.
        let off = packet.l4();
        if off + 8 > ip_end {
            return Some(L4::Truncated);
        }
        let Some(ext) = frame.at::<2>(off) else {
            return Some(L4::Truncated);
        };
        // SAFETY: bounds-checked by `at`; `[u8; N]` has alignment 1.
        let ext = unsafe { &*ext };
        let len = (ext[1] as usize + 1) * 8;
        if off + len > ip_end {
            return Some(L4::Truncated);
        }
        packet.proto = ext[0];
        // Within `ip_end`, so within 16 bits.
        packet.l4_off = (off + len) as u16;
        packet.has_ext_headers = true;
        step += 1;
    }
    Some(L4::ExtLimit)
}

/// Bytes from an ICMPv6 error's header to the end of the part of its quote that is parsed: the
/// ICMPv6 header, the quoted IPv6 header (without extension headers) and 8 bytes of its
/// transport header.
pub const ICMPV6_QUOTE_LEN: usize = ICMP_HLEN + IPV6_HLEN + 8;

/// The offsets of the quoted IPv6 header and of its transport header in an ICMPv6 error whose
/// ICMPv6 header is at `icmp_off`.
#[inline(always)]
pub const fn quote6_offsets(icmp_off: usize) -> (usize, usize) {
    (icmp_off + ICMP_HLEN, icmp_off + ICMP_HLEN + IPV6_HLEN)
}

/// The packet quoted inside an ICMPv6 error; `valid` says whether it could be parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotedPacket6 {
    pub valid: bool,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub proto: u8,
    pub src_port_be: u16,
    pub dst_port_be: u16,
}

/// Parses the packet quoted by the ICMPv6 error `icmp` (as [`parse6`] found it). Not `valid`
/// when the quote is cut short by the frame or by the outer payload length, carries extension
/// headers, or is not TCP/UDP.
#[inline(always)]
pub fn parse_icmp6_quote<F: Frame>(frame: &F, icmp: &Ipv6Packet) -> QuotedPacket6 {
    let mut quote = QuotedPacket6::default();
    let (q3, q4) = quote6_offsets(icmp.l4());
    if icmp.l4() + ICMPV6_QUOTE_LEN > icmp.l3() + icmp.ip_len() as usize {
        return quote;
    }
    let Some(ip) = frame.at::<IPV6_HLEN>(q3) else {
        return quote;
    };
    // SAFETY: bounds-checked by `at`; `[u8; N]` has alignment 1.
    let ip = unsafe { &*ip };
    let proto = ip[ipv6::NEXT_HEADER];
    if ip[0] >> 4 != 6 || (proto != bpf_common::PROTO_TCP && proto != bpf_common::PROTO_UDP) {
        return quote;
    }
    let Some(ports) = frame.at::<8>(q4) else {
        return quote;
    };
    // SAFETY: as above.
    let ports = unsafe { &*ports };
    quote.src = words(ip, ipv6::SRC);
    quote.dst = words(ip, ipv6::DST);
    quote.proto = proto;
    quote.src_port_be = u16::from_ne_bytes([ports[0], ports[1]]);
    quote.dst_port_be = u16::from_ne_bytes([ports[2], ports[3]]);
    quote.valid = true;
    quote
}
