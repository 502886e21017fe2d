//! The two address families behind one trait, so that the flow table, Maglev, full-NAT and the
//! next hop are written once: [`Ipv4Packet`] with 4-byte addresses (`u32`, exactly the code the
//! IPv4 path had before IPv6 existed) and [`Ipv6Packet`] with 16-byte ones. Every method is
//! inlined; each program gets its own monomorphised copy.

use core::ops::Deref;

use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use bpf_common::{Addr16, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, ct::CtKey};
use bpf_lib::frame::{XdpFrame, load16, store_addrs6, store16, store32};
use conntrack::canonical_key;
use lb_core::{
    csum,
    parse::{Ipv4Packet, ipv4, l4},
    parse6::{Ipv6Packet, ipv6},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A parsed packet of one family.
pub(crate) trait IpPacket {
    /// An address as the code passes it around: the `u32` itself for IPv4, a reference to the
    /// 16 bytes where they already lie (the parsed packet's or a map value's) for IPv6. Four
    /// words by value per address spill past the 512-byte stack.
    type Addr<'a>: Copy
    where
        Self: 'a;
    /// The 16-byte form the maps use, owned for IPv4 and borrowed for IPv6.
    type Wide<'a>: Deref<Target = Addr16>
    where
        Self: 'a;
    /// The flow's canonical key: built on the stack for IPv4, precomputed beside the parsed
    /// packet for IPv6 (its 16-byte halves would spill).
    type Key<'a>: Deref<Target = CtKey>
    where
        Self: 'a;
    /// `FAMILY_IPV4` or `FAMILY_IPV6`, as the maps' keys carry it.
    const FAMILY: u8;

    /// The canonical key of this TCP/UDP packet's flow (`proto` is its protocol) and the
    /// canonical side it was sent from.
    fn flow_key(&self, proto: u8) -> (Self::Key<'_>, u8);

    fn src(&self) -> Self::Addr<'_>;
    fn dst(&self) -> Self::Addr<'_>;
    fn wide_src(&self) -> Self::Wide<'_>;
    fn wide_dst(&self) -> Self::Wide<'_>;
    /// The family's address out of a map's 16-byte form.
    fn narrow(addr: &Addr16) -> Self::Addr<'_>;
    /// The whole IP packet's length, as conntrack counts it and `bpf_fib_lookup` checks it.
    fn ip_len(&self) -> u16;
    /// IPv4 options or IPv6 extension headers: forwarded unchanged, counted.
    fn has_options(&self) -> bool;
    fn l4_off(&self) -> usize;
    fn tcp_flags(&self) -> u8;
    /// TCP/UDP ports, network byte order.
    fn ports_be(&self) -> (u16, u16);

    /// Rewrites source and destination address and port, `(old, new)` each, keeping the IP
    /// (IPv4) and TCP/UDP checksums valid incrementally.
    fn rewrite_l3l4(
        &self,
        frame: &XdpFrame,
        proto: u8,
        src: (Self::Addr<'_>, Self::Addr<'_>),
        dst: (Self::Addr<'_>, Self::Addr<'_>),
        ports: ((u16, u16), (u16, u16)),
    ) -> Option<()>;

    /// A TCP (`udp` false) or UDP checksum after the pseudo-header's addresses changed.
    fn pseudo_header_fix(
        check: u16,
        udp: bool,
        src: (Self::Addr<'_>, Self::Addr<'_>),
        dst: (Self::Addr<'_>, Self::Addr<'_>),
    ) -> u16;

    /// Sets the family and addresses of a `bpf_fib_lookup`.
    fn fib_addresses(params: &mut FibParams, src: Self::Addr<'_>, dst: Self::Addr<'_>);
}

/// A value the code holds itself; the IPv4 form of [`IpPacket::Wide`] and [`IpPacket::Key`].
pub(crate) struct Own<T>(T);

impl<T> Deref for Own<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The per-CPU scratch `xdp_lb6` parses into (`LB6_PACKET`): the packet and, for TCP/UDP, its
/// flow key, computed once (the VIP's reverse lookup and the flow table share it).
#[repr(C)]
pub(crate) struct Packet6 {
    pub(crate) packet: Ipv6Packet,
    pub(crate) flow: CtKey,
    pub(crate) flow_side: u8,
}

impl Packet6 {
    /// Computes the flow key of the parsed TCP/UDP packet.
    #[inline(always)]
    pub(crate) fn key_flow(&mut self) {
        let p = &self.packet;
        let (key, side) = canonical_key(
            p.src,
            p.src_port_be,
            p.dst,
            p.dst_port_be,
            p.proto,
            FAMILY_IPV6,
        );
        self.flow = key;
        self.flow_side = side;
    }
}

/// A field's `(old, new)` values.
pub(crate) type Change<T> = (T, T);

/// Rewrites the TCP or UDP checksum and the ports after the addresses changed from `src.0` to
/// `src.1` and `dst.0` to `dst.1` (the pseudo-header's part is the family's
/// [`IpPacket::pseudo_header_fix`]).
#[inline(always)]
fn rewrite_l4<'a, P: IpPacket + ?Sized + 'a>(
    frame: &XdpFrame,
    l4_off: usize,
    proto: u8,
    (src, dst): (Change<P::Addr<'a>>, Change<P::Addr<'a>>),
    (src_port, dst_port): ((u16, u16), (u16, u16)),
) -> Option<()> {
    if proto == PROTO_TCP {
        let check = load16(frame, l4_off + l4::TCP_CHECK)?;
        let check = P::pseudo_header_fix(check, false, src, dst);
        let check = csum::replace_u16(check, src_port.0, src_port.1);
        let check = csum::replace_u16(check, dst_port.0, dst_port.1);
        store16(frame, l4_off + l4::TCP_CHECK, check)?;
    } else {
        let check = load16(frame, l4_off + l4::UDP_CHECK)?;
        let check = P::pseudo_header_fix(check, true, src, dst);
        let check = csum::udp_replace_u16(check, src_port.0, src_port.1);
        let check = csum::udp_replace_u16(check, dst_port.0, dst_port.1);
        store16(frame, l4_off + l4::UDP_CHECK, check)?;
    }
    store16(frame, l4_off + l4::SRC_PORT, src_port.1)?;
    store16(frame, l4_off + l4::DST_PORT, dst_port.1)?;
    Some(())
}

impl IpPacket for Ipv4Packet {
    type Addr<'a> = u32;
    type Wide<'a> = Own<Addr16>;
    type Key<'a> = Own<CtKey>;
    const FAMILY: u8 = FAMILY_IPV4;

    #[inline(always)]
    fn flow_key(&self, proto: u8) -> (Own<CtKey>, u8) {
        // `[addr, 0, 0, 0]`: LLVM keeps the three zero words as constants.
        let (key, side) = canonical_key(
            [self.src, 0, 0, 0],
            self.src_port_be,
            [self.dst, 0, 0, 0],
            self.dst_port_be,
            proto,
            FAMILY_IPV4,
        );
        (Own(key), side)
    }

    #[inline(always)]
    fn src(&self) -> u32 {
        self.src
    }
    #[inline(always)]
    fn dst(&self) -> u32 {
        self.dst
    }
    #[inline(always)]
    fn wide_src(&self) -> Own<Addr16> {
        Own([self.src, 0, 0, 0])
    }
    #[inline(always)]
    fn wide_dst(&self) -> Own<Addr16> {
        Own([self.dst, 0, 0, 0])
    }
    #[inline(always)]
    fn narrow(addr: &Addr16) -> u32 {
        addr[0]
    }
    #[inline(always)]
    fn ip_len(&self) -> u16 {
        self.total_len
    }
    #[inline(always)]
    fn has_options(&self) -> bool {
        self.has_options
    }
    #[inline(always)]
    fn l4_off(&self) -> usize {
        self.l4_off
    }
    #[inline(always)]
    fn tcp_flags(&self) -> u8 {
        self.tcp_flags
    }
    #[inline(always)]
    fn ports_be(&self) -> (u16, u16) {
        (self.src_port_be, self.dst_port_be)
    }

    #[inline(always)]
    fn rewrite_l3l4(
        &self,
        frame: &XdpFrame,
        proto: u8,
        src: (u32, u32),
        dst: (u32, u32),
        ports: ((u16, u16), (u16, u16)),
    ) -> Option<()> {
        let l3 = self.l3_off;
        let ip_check = load16(frame, l3 + ipv4::CHECK)?;
        let ip_check = csum::replace_u32(ip_check, src.0, src.1);
        let ip_check = csum::replace_u32(ip_check, dst.0, dst.1);
        store32(frame, l3 + ipv4::SRC, src.1)?;
        store32(frame, l3 + ipv4::DST, dst.1)?;
        store16(frame, l3 + ipv4::CHECK, ip_check)?;
        rewrite_l4::<Self>(frame, self.l4_off, proto, (src, dst), ports)
    }

    #[inline(always)]
    fn pseudo_header_fix(check: u16, udp: bool, src: (u32, u32), dst: (u32, u32)) -> u16 {
        if udp {
            let check = csum::udp_replace_u32(check, src.0, src.1);
            csum::udp_replace_u32(check, dst.0, dst.1)
        } else {
            let check = csum::replace_u32(check, src.0, src.1);
            csum::replace_u32(check, dst.0, dst.1)
        }
    }

    #[inline(always)]
    fn fib_addresses(params: &mut FibParams, src: u32, dst: u32) {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    }
}

impl IpPacket for Packet6 {
    type Addr<'a> = &'a Addr16;
    type Wide<'a> = &'a Addr16;
    type Key<'a> = &'a CtKey;
    const FAMILY: u8 = FAMILY_IPV6;

    /// Precomputed by [`Packet6::key_flow`] for the packet's own protocol.
    #[inline(always)]
    fn flow_key(&self, _proto: u8) -> (&CtKey, u8) {
        (&self.flow, self.flow_side)
    }

    #[inline(always)]
    fn src(&self) -> &Addr16 {
        &self.packet.src
    }
    #[inline(always)]
    fn dst(&self) -> &Addr16 {
        &self.packet.dst
    }
    #[inline(always)]
    fn wide_src(&self) -> &Addr16 {
        &self.packet.src
    }
    #[inline(always)]
    fn wide_dst(&self) -> &Addr16 {
        &self.packet.dst
    }
    #[inline(always)]
    fn narrow(addr: &Addr16) -> &Addr16 {
        addr
    }
    #[inline(always)]
    fn ip_len(&self) -> u16 {
        self.packet.ip_len()
    }
    #[inline(always)]
    fn has_options(&self) -> bool {
        self.packet.has_ext_headers
    }
    #[inline(always)]
    fn l4_off(&self) -> usize {
        self.packet.l4()
    }
    #[inline(always)]
    fn tcp_flags(&self) -> u8 {
        self.packet.tcp_flags
    }
    #[inline(always)]
    fn ports_be(&self) -> (u16, u16) {
        (self.packet.src_port_be, self.packet.dst_port_be)
    }

    /// IPv6 has no header checksum; the addresses count in the L4 pseudo-header only.
    #[inline(always)]
    fn rewrite_l3l4(
        &self,
        frame: &XdpFrame,
        proto: u8,
        src: (&Addr16, &Addr16),
        dst: (&Addr16, &Addr16),
        ports: ((u16, u16), (u16, u16)),
    ) -> Option<()> {
        // The checksum first, the addresses after: LLVM cannot tell the frame's stores from
        // the map values the words are read from, and words read ahead of the stores would
        // be spilled, 32 of them, past the 512-byte stack.
        rewrite_l4::<Self>(frame, self.packet.l4(), proto, (src, dst), ports)?;
        store_addrs6(frame, self.packet.l3() + ipv6::SRC, src.1, dst.1)
    }

    #[inline(always)]
    fn pseudo_header_fix(
        check: u16,
        udp: bool,
        src: (&Addr16, &Addr16),
        dst: (&Addr16, &Addr16),
    ) -> u16 {
        if udp {
            let check = csum::udp_replace_addr6(check, src.0, src.1);
            csum::udp_replace_addr6(check, dst.0, dst.1)
        } else {
            let check = csum::replace_addr6(check, src.0, src.1);
            csum::replace_addr6(check, dst.0, dst.1)
        }
    }

    #[inline(always)]
    fn fib_addresses(params: &mut FibParams, src: &Addr16, dst: &Addr16) {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = *src;
        params.__bindgen_anon_4.ipv6_dst = *dst;
    }
}
