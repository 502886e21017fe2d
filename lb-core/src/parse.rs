//! Bounds-checked parsing of Ethernet (+ one 802.1Q tag), IPv4, TCP, UDP and ICMP.
//!
//! The same code runs in the XDP program (over `xdp_md`'s `data..data_end`), in the tc programs
//! (over an skb's linear area) and on the host (over a byte slice), through the [`Frame`] trait.
//! Every header access goes through [`Frame::at`], whose bounds check is the
//! `start + off + size <= end` comparison the verifier needs to see before a packet load.
//!
//! Lengths are judged against the packet's real length ([`Frame::fits`]), which for an skb
//! (`skb->len`) is usually more than its linear area: with scatter-gather or GRO the payload
//! sits in page fragments. Only the headers must be readable ([`Frame::at`]); a tc program
//! pulls them into the linear area first.
//!
//! # Rules for anomalies (each maps to one counter in `bpf_common::reason`)
//!
//! | input | outcome |
//! | --- | --- |
//! | ethertype IPv6 (after at most one VLAN tag) | [`Outcome::Ipv6`]: parsed by [`parse6`](crate::parse6::parse6) |
//! | any other ethertype | [`Outcome::NotIpv4`] |
//! | Ethernet, VLAN or IPv4 header cut short | [`Parsed::Truncated`] |
//! | IPv4 version != 4, IHL < 5, total length < IHL, or total length beyond the frame | [`Parsed::Malformed`] |
//! | IPv4 with options (IHL > 5) | parsed; the options are skipped and forwarded unchanged |
//! | a fragment (MF set or offset != 0) | [`L4::Fragment`]: ports are never read, not even from the first fragment, so all fragments of a datagram get the same treatment |
//! | TCP/UDP/ICMP header cut short (by the frame or by the IP total length) | [`L4::Truncated`] |
//! | TCP data offset below 5 words, or pointing past the end of the IP payload | [`L4::Truncated`]: the options are part of the header |
//! | UDP length field below 8 or past the end of the IP payload (shorter is fine: the rest is padding, as Linux trims it) | [`L4::Truncated`] |
//! | any other protocol | [`L4::Other`] |

/// Ethertypes (host byte order).
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_MIN_HLEN: usize = 20;
pub const TCP_MIN_HLEN: usize = 20;
/// Byte of the TCP header whose high nibble is the data offset (header length in words).
pub const TCP_DATA_OFFSET: usize = 12;
pub const UDP_HLEN: usize = 8;
/// ICMP header up to and including the 4 "rest of header" bytes.
pub const ICMP_HLEN: usize = 8;

/// Byte offsets inside an IPv4 header.
pub mod ipv4 {
    pub const TOTAL_LEN: usize = 2;
    pub const FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CHECK: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
}

/// Byte offsets inside TCP/UDP headers.
pub mod l4 {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CHECK: usize = 16;
    pub const UDP_CHECK: usize = 6;
    pub const ICMP_CHECK: usize = 2;
}

/// Largest offset a kernel frame hands out. A constant bound lets the verifier prove that
/// `start + off` cannot overflow the packet pointer's range.
pub const MAX_FRAME: usize = 16_384;

/// [`Frame::fits`] for a kernel frame whose data spans the addresses `start..end`.
#[inline(always)]
pub const fn span_fits(start: usize, end: usize, len: usize) -> bool {
    len <= MAX_FRAME && start + len <= end
}

/// [`Frame::at`] for a kernel frame whose data spans the addresses `start..end`: the address
/// of `N` bytes at `off`, when all of them lie inside. The programs reload `start` and `end`
/// from the context for every call (a verifier lesson: a bound checked against a stale
/// `data_end` is not trusted).
#[inline(always)]
pub const fn span_at<const N: usize>(start: usize, end: usize, off: usize) -> Option<usize> {
    if off > MAX_FRAME {
        return None;
    }
    let ptr = start + off;
    if ptr + N > end {
        return None;
    }
    Some(ptr)
}

/// A packet buffer that hands out bounds-checked pointers.
pub trait Frame {
    /// True when the packet is at least `len` bytes long. This is its real length, which may
    /// exceed the bytes [`Frame::at`] can reach (an skb's paged data).
    fn fits(&self, len: usize) -> bool;

    /// A pointer to `N` bytes at `off`, or `None` if they do not all lie inside the readable
    /// (linear) part of the frame.
    fn at<const N: usize>(&self, off: usize) -> Option<*mut [u8; N]>;

    /// Copies `N` bytes at `off`.
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let ptr = self.at::<N>(off)?;
        // SAFETY: `at` checked that the N bytes lie inside the frame; `[u8; N]` has alignment 1.
        Some(unsafe { *ptr })
    }
}

/// A host-side frame over a mutable byte slice (tests and tools): linear, its length is the
/// slice's.
pub struct SliceFrame<'a> {
    pub bytes: &'a mut [u8],
}

impl Frame for SliceFrame<'_> {
    fn fits(&self, len: usize) -> bool {
        len <= self.bytes.len()
    }

    fn at<const N: usize>(&self, off: usize) -> Option<*mut [u8; N]> {
        let end = off.checked_add(N)?;
        if end > self.bytes.len() {
            return None;
        }
        Some(self.bytes[off..end].as_ptr() as *mut [u8; N])
    }
}

/// A host-side model of a non-linear skb: `linear` is what the program can read, `len` the
/// packet's real length (`linear.len()` plus the paged bytes, which are never read).
pub struct NonLinearFrame<'a> {
    pub linear: &'a mut [u8],
    pub len: usize,
}

impl Frame for NonLinearFrame<'_> {
    fn fits(&self, len: usize) -> bool {
        len <= self.len
    }

    fn at<const N: usize>(&self, off: usize) -> Option<*mut [u8; N]> {
        let end = off.checked_add(N)?;
        if end > self.linear.len() || end > self.len {
            return None;
        }
        Some(self.linear[off..end].as_ptr() as *mut [u8; N])
    }
}

/// What the transport header of an IPv4 packet turned out to be.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum L4 {
    /// TCP: ports and flags are valid.
    Tcp,
    /// UDP: ports are valid.
    Udp,
    /// ICMP: type and code are valid.
    Icmp,
    /// A fragment: the transport header is not looked at.
    Fragment,
    /// TCP, UDP or ICMP whose header is cut short.
    Truncated,
    /// Another protocol.
    #[default]
    Other,
    /// IPv6 only: more extension headers than [`parse6`](crate::parse6::parse6) walks
    /// ([`MAX_EXT_HEADERS`](crate::parse6::MAX_EXT_HEADERS)), so the transport header was not
    /// reached.
    ExtLimit,
}

/// Outcome of parsing a frame.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// An IPv4 packet: [`Parsed::packet`] is valid.
    Ipv4,
    /// Neither IPv4 nor IPv6.
    #[default]
    NotIpv4,
    /// An IPv6 frame (ethertype 0x86dd), for [`parse6`](crate::parse6::parse6).
    Ipv6,
    Truncated,
    Malformed,
}

/// A parsed IPv4 packet.
///
/// A plain struct whose fields are always initialised (zero where they do not apply), and
/// field-less tags instead of enums with payloads: when an enum payload is undefined on some
/// path, LLVM may fill it from whatever register is at hand (a packet pointer, say) and mask or
/// shift it, and the verifier rejects arithmetic on pointers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv4Packet {
    /// Offset of the IPv4 header (14, or 18 behind a VLAN tag).
    pub l3_off: usize,
    /// Offset of the transport header (`l3_off + IHL * 4`).
    pub l4_off: usize,
    /// Source and destination addresses as wire bytes read in memory order.
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    /// IPv4 total length (host byte order).
    pub total_len: u16,
    /// The header carries options (IHL > 5).
    pub has_options: bool,
    pub l4: L4,
    /// TCP/UDP ports in network byte order (as on the wire).
    pub src_port_be: u16,
    pub dst_port_be: u16,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// TCP header length in bytes, options included (0 unless TCP).
    pub tcp_hlen: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
}

/// The result of [`parse`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub outcome: Outcome,
    /// Valid when `outcome == Outcome::Ipv4`; all zero otherwise.
    pub packet: Ipv4Packet,
}

impl Parsed {
    #[inline(always)]
    fn fail(outcome: Outcome) -> Self {
        Self {
            outcome,
            packet: Ipv4Packet::default(),
        }
    }

    /// The packet, when the frame is IPv4.
    pub fn ipv4(&self) -> Option<&Ipv4Packet> {
        (self.outcome == Outcome::Ipv4).then_some(&self.packet)
    }
}

/// The ethertype behind at most one VLAN tag, and the offset of the L3 header; `None` when
/// the Ethernet or VLAN header is cut short. Shared by [`parse`] and
/// [`parse6`](crate::parse6::parse6).
#[inline(always)]
pub(crate) fn l3_start<F: Frame>(frame: &F) -> Option<(u16, usize)> {
    let eth = frame.at::<ETH_HLEN>(0)?;
    // SAFETY: bounds-checked by `at`; `[u8; N]` has alignment 1.
    let eth = unsafe { &*eth };
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag = frame.at::<VLAN_HLEN>(ETH_HLEN)?;
        // SAFETY: as above.
        let tag = unsafe { &*tag };
        return Some((u16::from_be_bytes([tag[2], tag[3]]), ETH_HLEN + VLAN_HLEN));
    }
    Some((ethertype, ETH_HLEN))
}

/// Parses a frame. Never panics; every read is bounds-checked. An IPv6 frame is only
/// recognised ([`Outcome::Ipv6`]); [`parse6`](crate::parse6::parse6) parses it.
#[inline(always)]
pub fn parse<F: Frame>(frame: &F) -> Parsed {
    let Some((ethertype, l3_off)) = l3_start(frame) else {
        return Parsed::fail(Outcome::Truncated);
    };
    if ethertype == ETH_P_IPV6 {
        return Parsed::fail(Outcome::Ipv6);
    }
    if ethertype != ETH_P_IPV4 {
        return Parsed::fail(Outcome::NotIpv4);
    }
    let Some(ip) = frame.at::<IPV4_MIN_HLEN>(l3_off) else {
        return Parsed::fail(Outcome::Truncated);
    };
    // SAFETY: as above.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 4 {
        return Parsed::fail(Outcome::Malformed);
    }
    let header_len = ((ip[0] & 0x0f) as usize) * 4;
    if header_len < IPV4_MIN_HLEN {
        return Parsed::fail(Outcome::Malformed);
    }
    let total_len = u16::from_be_bytes([ip[ipv4::TOTAL_LEN], ip[ipv4::TOTAL_LEN + 1]]);
    let ip_end = l3_off + total_len as usize;
    if (total_len as usize) < header_len || !frame.fits(ip_end) {
        return Parsed::fail(Outcome::Malformed);
    }
    let proto = ip[ipv4::PROTO];
    let frag = u16::from_be_bytes([ip[ipv4::FRAG], ip[ipv4::FRAG + 1]]);
    // More-fragments flag or a non-zero offset.
    let is_fragment = frag & 0x3fff != 0;
    let l4_off = l3_off + header_len;
    let mut packet = Ipv4Packet {
        l3_off,
        l4_off,
        src: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        dst: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        proto,
        total_len,
        has_options: header_len > IPV4_MIN_HLEN,
        l4: L4::Fragment,
        src_port_be: 0,
        dst_port_be: 0,
        tcp_flags: 0,
        tcp_hlen: 0,
        icmp_type: 0,
        icmp_code: 0,
    };
    if !is_fragment {
        let fields = parse_l4(frame, proto, bpf_common::PROTO_ICMP, l4_off, ip_end);
        packet.l4 = fields.l4;
        packet.src_port_be = fields.src_port_be;
        packet.dst_port_be = fields.dst_port_be;
        packet.tcp_flags = fields.tcp_flags;
        packet.tcp_hlen = fields.tcp_hlen;
        packet.icmp_type = fields.icmp_type;
        packet.icmp_code = fields.icmp_code;
    }
    Parsed {
        outcome: Outcome::Ipv4,
        packet,
    }
}

/// The transport header's fields, all initialised (zero where they do not apply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L4Fields {
    pub l4: L4,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub tcp_flags: u8,
    pub tcp_hlen: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
}

/// Parses the transport header at `l4_off` of a packet whose IP payload ends at `ip_end`;
/// `icmp_proto` is ICMP's protocol number in this family (1, or 58 for ICMPv6). Shared by
/// both families.
#[inline(always)]
pub(crate) fn parse_l4<F: Frame>(
    frame: &F,
    proto: u8,
    icmp_proto: u8,
    l4_off: usize,
    ip_end: usize,
) -> L4Fields {
    // Fields are extracted inside the bounds-checked branch rather than by copying the header
    // out by value (see [`Ipv4Packet`] on why values must never be partly undefined).
    let mut out = L4Fields {
        l4: L4::Truncated,
        ..L4Fields::default()
    };
    if proto == bpf_common::PROTO_TCP {
        if l4_off + TCP_MIN_HLEN > ip_end {
            return out;
        }
        if let Some(tcp) = frame.at::<TCP_MIN_HLEN>(l4_off) {
            // SAFETY: bounds-checked by `at`; `[u8; N]` has alignment 1.
            let tcp = unsafe { &*tcp };
            // The data offset is part of the header: below 5 words, or past the end of
            // the segment, the header is cut short whatever the first 20 bytes say.
            let tcp_hlen = ((tcp[TCP_DATA_OFFSET] >> 4) as usize) * 4;
            if tcp_hlen < TCP_MIN_HLEN || l4_off + tcp_hlen > ip_end {
                return out;
            }
            out.tcp_hlen = tcp_hlen as u8;
            out.src_port_be = u16::from_ne_bytes([tcp[0], tcp[1]]);
            out.dst_port_be = u16::from_ne_bytes([tcp[2], tcp[3]]);
            out.tcp_flags = tcp[l4::TCP_FLAGS];
            out.l4 = L4::Tcp;
        }
    } else if proto == bpf_common::PROTO_UDP {
        if let Some(udp) = frame.at::<UDP_HLEN>(l4_off) {
            // SAFETY: as above.
            let udp = unsafe { &*udp };
            // The length field covers the header and a datagram longer than the packet
            // is cut short (the receiving kernel would drop it, so it must not open a flow
            // or be NATed here either); a shorter one leaves padding, which Linux trims.
            // This also covers "the IP total length cuts the header short".
            let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
            if udp_len < UDP_HLEN || l4_off + udp_len > ip_end {
                return out;
            }
            out.src_port_be = u16::from_ne_bytes([udp[0], udp[1]]);
            out.dst_port_be = u16::from_ne_bytes([udp[2], udp[3]]);
            out.l4 = L4::Udp;
        }
    } else if proto == icmp_proto {
        if l4_off + ICMP_HLEN > ip_end {
            return out;
        }
        if let Some(icmp) = frame.at::<ICMP_HLEN>(l4_off) {
            // SAFETY: as above.
            let icmp = unsafe { &*icmp };
            out.icmp_type = icmp[0];
            out.icmp_code = icmp[1];
            out.l4 = L4::Icmp;
        }
    } else {
        out.l4 = L4::Other;
    }
    out
}

/// Bytes from an ICMP error's header to the end of the part of the quote that is parsed: the
/// ICMP header, the quoted IPv4 header (without options) and 8 bytes of its transport header.
pub const ICMP_QUOTE_LEN: usize = ICMP_HLEN + IPV4_MIN_HLEN + 8;

/// Whether the ICMP packet `icmp` (as [`parse`] found it) holds a quote of the minimum size
/// ([`ICMP_QUOTE_LEN`]) inside its IP total length, not in padding behind it.
#[inline(always)]
pub const fn quote_within_packet(icmp: &Ipv4Packet) -> bool {
    icmp.l4_off + ICMP_QUOTE_LEN <= icmp.l3_off + icmp.total_len as usize
}

/// The offsets of the quoted IPv4 header and of its transport header in an ICMP error whose
/// ICMP header is at `icmp_off` (fixed: quotes with IP options are not parsed). Not stored in
/// [`QuotedPacket`]: 16 bytes more of it did not fit `xdp_lb`'s stack.
#[inline(always)]
pub const fn quote_offsets(icmp_off: usize) -> (usize, usize) {
    (icmp_off + ICMP_HLEN, icmp_off + ICMP_HLEN + IPV4_MIN_HLEN)
}

/// ICMP types that carry a quoted packet and that the load balancer translates.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;

/// The packet quoted inside an ICMP error: its IPv4 header (without options) and the first 8
/// bytes of its transport header, which is all RFC 792 guarantees. Always fully initialised
/// (see [`Ipv4Packet`]); `valid` says whether the quote could be parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotedPacket {
    pub valid: bool,
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    pub src_port_be: u16,
    pub dst_port_be: u16,
}

/// Parses the packet quoted by an ICMP error whose ICMP header is at `icmp_off`. The result is
/// not `valid` when the quote is truncated by the frame, carries IP options, or is not TCP/UDP.
/// Whether the quote also lies inside the ICMP packet's IP total length (not in padding behind
/// it) is the caller's check, [`quote_within_packet`], which the tc programs and `xdp_lb` make.
#[inline(always)]
pub fn parse_icmp_quote<F: Frame>(frame: &F, icmp_off: usize) -> QuotedPacket {
    let mut quote = QuotedPacket::default();
    let l3_off = icmp_off + ICMP_HLEN;
    let l4_off = l3_off + IPV4_MIN_HLEN;
    let Some(ip) = frame.at::<IPV4_MIN_HLEN>(l3_off) else {
        return quote;
    };
    // SAFETY: bounds-checked by `at`; `[u8; N]` has alignment 1.
    let ip = unsafe { &*ip };
    // Quoted headers with options would put the ports at a variable offset inside an already
    // variable-offset packet; such quotes are rare and are left alone.
    let proto = ip[ipv4::PROTO];
    if ip[0] != 0x45 || (proto != bpf_common::PROTO_TCP && proto != bpf_common::PROTO_UDP) {
        return quote;
    }
    quote.src = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    quote.dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    quote.proto = proto;
    // The 8 bytes RFC 792 promises must be there; the checksum fields beyond may not be.
    let Some(ports) = frame.at::<8>(l4_off) else {
        return quote;
    };
    // SAFETY: as above.
    let ports = unsafe { &*ports };
    quote.src_port_be = u16::from_ne_bytes([ports[0], ports[1]]);
    quote.dst_port_be = u16::from_ne_bytes([ports[2], ports[3]]);
    quote.valid = true;
    quote
}
