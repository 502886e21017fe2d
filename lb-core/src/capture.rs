//! Which packets the DNS capture (`bpf-dns`) copies to user space: the header walk, shared by
//! the program and the host tests.
//!
//! The walk reads through [`Bytes`], so the program can read the linear area directly and fall
//! back to `bpf_skb_load_bytes` for headers in a paged fragment. Everything is
//! `#[inline(always)]` and loops only to constant bounds, for the verifier.

use crate::parse::{ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, IPV4_MIN_HLEN, VLAN_HLEN};

pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV6_HLEN: usize = 40;
/// IPv6 extension headers walked (hop-by-hop, routing, destination options), at most.
pub const MAX_IPV6_EXTENSIONS: usize = 2;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const DNS_PORT: u16 = 53;
const UDP_HLEN: usize = 8;
const DNS_HLEN: usize = 12;

/// Reads of a packet at byte offsets; `None` past its end.
pub trait Bytes {
    fn u8_at(&self, off: usize) -> Option<u8>;
    /// A big-endian 16-bit field.
    fn be16_at(&self, off: usize) -> Option<u16>;
}

impl Bytes for [u8] {
    fn u8_at(&self, off: usize) -> Option<u8> {
        self.get(off).copied()
    }

    fn be16_at(&self, off: usize) -> Option<u16> {
        Some(u16::from_be_bytes([*self.get(off)?, *self.get(off + 1)?]))
    }
}

/// The L4 header's offset and protocol of an IPv4 or IPv6 frame (one VLAN tag allowed); `None`
/// for anything else, for an IPv4 header shorter than 20 bytes, and for IPv4 fragments after
/// the first (they carry no ports).
#[inline(always)]
pub fn l4_header<B: Bytes + ?Sized>(b: &B) -> Option<(usize, u8)> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = b.be16_at(12)?;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = b.be16_at(l3 + 2)?;
        l3 += VLAN_HLEN;
    }
    if ethertype == ETH_P_IPV4 {
        let ihl = usize::from(b.u8_at(l3)? & 0x0f) * 4;
        if ihl < IPV4_MIN_HLEN {
            return None;
        }
        // Offset bits: a later fragment has no L4 header.
        if b.be16_at(l3 + 6)? & 0x1fff != 0 {
            return None;
        }
        let proto = b.u8_at(l3 + 9)?;
        return Some((l3 + ihl, proto));
    }
    if ethertype != ETH_P_IPV6 {
        return None;
    }
    let mut next = b.u8_at(l3 + 6)?;
    let mut l4 = l3 + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        if next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST {
            break;
        }
        let len = (usize::from(b.u8_at(l4 + 1)?) + 1) * 8;
        next = b.u8_at(l4)?;
        l4 += len;
    }
    Some((l4, next))
}

/// The L4 offset and protocol of a packet of `packet_len` bytes that may carry a DNS answer: UDP
/// or TCP from port 53, UDP long enough for a UDP and a DNS header, TCP with payload (a later
/// segment of a message may hold any part of it). `None` for anything else.
#[inline(always)]
pub fn dns_response<B: Bytes + ?Sized>(b: &B, packet_len: usize) -> Option<(usize, u8)> {
    let (l4, proto) = l4_header(b)?;
    if proto != PROTO_UDP && proto != PROTO_TCP {
        return None;
    }
    if b.be16_at(l4)? != DNS_PORT {
        return None;
    }
    if proto == PROTO_TCP {
        // Data offset in 32-bit words.
        let header = usize::from(b.u8_at(l4 + 12)? >> 4) * 4;
        if header < 20 || packet_len <= l4 + header {
            return None;
        }
    } else if packet_len < l4 + UDP_HLEN + DNS_HLEN {
        return None;
    }
    Some((l4, proto))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use etherparse::PacketBuilder;

    use super::*;

    /// Offset of the IPv4 flags and fragment offset in an untagged frame.
    const FRAG_OFF: usize = 20;
    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const V4: ([u8; 4], [u8; 4]) = ([198, 18, 1, 11], [198, 18, 0, 1]);
    const V6: ([u8; 16], [u8; 16]) = (
        [
            0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11,
        ],
        [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    );

    fn check(frame: &[u8]) -> Option<(usize, u8)> {
        dns_response(frame, frame.len())
    }

    #[test]
    fn answers_over_udp_and_tcp_v4_and_v6_with_a_vlan_and_extension_headers() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4(V4.0, V4.1, 64)
            .udp(53, 40_000)
            .write(&mut f, &[0; 12])
            .unwrap();
        assert_eq!(check(&f), Some((34, PROTO_UDP)));
        // The UDP header alone, or the header and less than a DNS header: nothing.
        assert_eq!(dns_response(&f[..], 34 + 8 + 11), None);

        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .single_vlan(7.try_into().unwrap())
            .ipv4(V4.0, V4.1, 64)
            .udp(53, 40_000)
            .write(&mut f, &[0; 12])
            .unwrap();
        assert_eq!(check(&f), Some((38, PROTO_UDP)));

        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4(V4.0, V4.1, 64)
            .tcp(53, 40_000, 1, 1000)
            .write(&mut f, &[1, 2])
            .unwrap();
        assert_eq!(check(&f), Some((34, PROTO_TCP)));
        // The same segment without payload.
        assert_eq!(dns_response(&f[..], f.len() - 2), None);

        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv6(V6.0, V6.1, 64)
            .udp(53, 40_000)
            .write(&mut f, &[0; 12])
            .unwrap();
        assert_eq!(check(&f), Some((54, PROTO_UDP)));
        // A hop-by-hop header of 8 bytes before UDP.
        let mut hbh = f[..54].to_vec();
        hbh[20] = NEXTHDR_HOP;
        hbh.extend([PROTO_UDP, 0, 1, 4, 0, 0, 0, 0]);
        hbh.extend(&f[54..]);
        assert_eq!(check(&hbh), Some((62, PROTO_UDP)));
    }

    #[test]
    fn everything_else_is_left_alone() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4(V4.0, V4.1, 64)
            .udp(40_000, 53)
            .write(&mut f, &[0; 12])
            .unwrap();
        assert_eq!(check(&f), None, "a query");
        let mut frag = f.clone();
        frag[FRAG_OFF] = 0;
        frag[FRAG_OFF + 1] = 185;
        assert_eq!(l4_header(&frag[..]), None, "a later fragment");
        let mut short_ihl = f.clone();
        short_ihl[14] = 0x44;
        assert_eq!(l4_header(&short_ihl[..]), None);
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(l4_header(&arp[..]), None);
        // Cut anywhere in the headers: nothing, never a panic.
        for cut in 0..42 {
            assert_eq!(check(&f[..cut]), None, "cut at {cut}");
        }
    }
}
