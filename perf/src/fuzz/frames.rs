//! Frame building (etherparse) and the raw byte-level layout helpers the mutators use.
//!
//! Seeds are built whole with etherparse's headers, so they are valid by construction. The
//! mutators work on raw bytes; [`Layout`] finds the headers again the way the programs' parser
//! does (Ethernet, VLAN tags, IPv4 by IHL), tolerating anything, and the `fix_*` functions
//! make a mutated frame consistent again (lengths, checksums) so that mutations reach past
//! the first sanity checks.

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpFragOffset, IpNumber, Ipv4Header,
    Ipv4Options, TcpHeader, UdpHeader, checksum::Sum16BitWords,
};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// The pre-standard QinQ TPID some switches still send.
pub const ETH_P_QINQ_OLD: u16 = 0x9100;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Ethernet header with `tags` (TPID, TCI) in front of `ether_type`.
pub fn eth(src: [u8; 6], dst: [u8; 6], tags: &[(u16, u16)], ether_type: u16) -> Vec<u8> {
    let first = tags.first().map_or(ether_type, |t| t.0);
    let mut out = Ethernet2Header {
        source: src,
        destination: dst,
        ether_type: EtherType(first),
    }
    .to_bytes()
    .to_vec();
    for (i, (_, tci)) in tags.iter().enumerate() {
        let next = tags.get(i + 1).map_or(ether_type, |t| t.0);
        out.extend_from_slice(&tci.to_be_bytes());
        out.extend_from_slice(&next.to_be_bytes());
    }
    out
}

/// IPv4 header fields beyond addresses and protocol.
#[derive(Clone, Copy, Debug, Default)]
pub struct IpOpts<'a> {
    /// Raw options (a multiple of 4 bytes, at most 40).
    pub options: &'a [u8],
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
}

fn ipv4_header(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    payload_len: usize,
    opts: IpOpts<'_>,
) -> Ipv4Header {
    let mut ip =
        Ipv4Header::new(payload_len as u16, 64, IpNumber(proto), src, dst).expect("ipv4 length");
    ip.identification = 0x1234;
    ip.options = Ipv4Options::try_from(opts.options).expect("ipv4 options length");
    // The total length counts the options too.
    ip.set_payload_len(payload_len).expect("ipv4 length");
    ip.more_fragments = opts.more_fragments;
    ip.dont_fragment = !opts.more_fragments && opts.frag_offset == 0;
    ip.fragment_offset = IpFragOffset::try_new(opts.frag_offset).expect("fragment offset");
    ip.header_checksum = ip.calc_header_checksum();
    ip
}

/// A TCP segment description.
#[derive(Clone, Copy, Debug)]
pub struct Tcp<'a> {
    pub src: ([u8; 4], u16),
    pub dst: ([u8; 4], u16),
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// Raw TCP options (a multiple of 4 bytes, at most 40).
    pub options: &'a [u8],
    pub payload: &'a [u8],
}

impl<'a> Tcp<'a> {
    pub fn new(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) -> Self {
        Self {
            src,
            dst,
            flags,
            seq: 1000,
            ack: if flags & TCP_ACK != 0 { 5000 } else { 0 },
            options: &[],
            payload: &[],
        }
    }
}

/// An IPv4 frame carrying the TCP segment `t`.
pub fn tcp_frame(l2: &[u8], t: &Tcp<'_>, ip: IpOpts<'_>) -> Vec<u8> {
    let mut tcp = TcpHeader::new(t.src.1, t.dst.1, t.seq, 64240);
    tcp.fin = t.flags & TCP_FIN != 0;
    tcp.syn = t.flags & TCP_SYN != 0;
    tcp.rst = t.flags & TCP_RST != 0;
    tcp.psh = t.flags & TCP_PSH != 0;
    tcp.ack = t.flags & TCP_ACK != 0;
    tcp.acknowledgment_number = t.ack;
    tcp.set_options_raw(t.options).expect("tcp options length");
    let header = ipv4_header(
        t.src.0,
        t.dst.0,
        PROTO_TCP,
        tcp.header_len() + t.payload.len(),
        ip,
    );
    tcp.checksum = tcp
        .calc_checksum_ipv4(&header, t.payload)
        .expect("tcp checksum");
    let mut frame = l2.to_vec();
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(&tcp.to_bytes());
    frame.extend_from_slice(t.payload);
    frame
}

/// An IPv4 frame carrying a UDP datagram; `zero_checksum` sends it without a checksum.
pub fn udp_frame(
    l2: &[u8],
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    payload: &[u8],
    zero_checksum: bool,
    ip: IpOpts<'_>,
) -> Vec<u8> {
    let header = ipv4_header(src.0, dst.0, PROTO_UDP, 8 + payload.len(), ip);
    let mut udp = UdpHeader::with_ipv4_checksum(src.1, dst.1, &header, payload).expect("udp");
    if zero_checksum {
        udp.checksum = 0;
    }
    let mut frame = l2.to_vec();
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(&udp.to_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An IPv4 frame carrying an ICMP message of any type and code; `rest` is bytes 5-8 of the
/// ICMP header (identifier and sequence, next-hop MTU, ...), `body` what follows.
pub fn icmp_frame(
    l2: &[u8],
    src: [u8; 4],
    dst: [u8; 4],
    (type_u8, code_u8): (u8, u8),
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::Unknown {
            type_u8,
            code_u8,
            bytes5to8: rest,
        },
        body,
    );
    let header = ipv4_header(
        src,
        dst,
        PROTO_ICMP,
        icmp.header_len() + body.len(),
        IpOpts::default(),
    );
    let mut frame = l2.to_vec();
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(&icmp.to_bytes());
    frame.extend_from_slice(body);
    frame
}

/// The quote of an ICMP error: the IPv4 header of a TCP/UDP packet `src -> dst` (claiming
/// `claimed_payload` more bytes than quoted) and the first `l4_bytes` bytes of its transport
/// header (8 is what RFC 792 guarantees; TCP headers are 20, UDP 8).
pub fn quote(
    proto: u8,
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    l4_bytes: usize,
    claimed_payload: usize,
) -> Vec<u8> {
    let l4: Vec<u8> = if proto == PROTO_TCP {
        let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
        tcp.ack = true;
        tcp.acknowledgment_number = 5000;
        let ip = ipv4_header(
            src.0,
            dst.0,
            proto,
            tcp.header_len() + claimed_payload,
            IpOpts::default(),
        );
        let payload = vec![0x42u8; claimed_payload];
        tcp.checksum = tcp.calc_checksum_ipv4(&ip, &payload).expect("checksum");
        tcp.to_bytes().to_vec()
    } else {
        let ip = ipv4_header(src.0, dst.0, proto, 8 + claimed_payload, IpOpts::default());
        let payload = vec![0x42u8; claimed_payload];
        UdpHeader::with_ipv4_checksum(src.1, dst.1, &ip, &payload)
            .expect("udp")
            .to_bytes()
            .to_vec()
    };
    let l4_len = l4.len();
    let ip = ipv4_header(
        src.0,
        dst.0,
        proto,
        l4_len + claimed_payload,
        IpOpts::default(),
    );
    let mut out = ip.to_bytes().to_vec();
    out.extend_from_slice(&l4[..l4_bytes.min(l4_len)]);
    out
}

// ---------------------------------------------------------------------------------------------
// Raw layout.
// ---------------------------------------------------------------------------------------------

fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(off)?, *b.get(off + 1)?]))
}

fn set16(b: &mut [u8], off: usize, v: u16) {
    if off + 2 <= b.len() {
        b[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// Where the headers of a frame are, found the lenient way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// VLAN tags in front of the IPv4 header.
    pub tags: usize,
    pub l3: usize,
    /// IPv4 header length from the IHL (may be nonsense after a mutation).
    pub ihl_bytes: usize,
    pub total_len: usize,
    pub proto: u8,
    pub fragment: bool,
    pub l4: usize,
    /// End of the IP packet: `l3 + total_len`, capped at the frame's end.
    pub ip_end: usize,
}

impl Layout {
    /// Finds the IPv4 header behind up to `max_tags` VLAN tags; `None` when the frame is not
    /// IPv4 or holds less than a minimal IPv4 header.
    pub fn of(frame: &[u8], max_tags: usize) -> Option<Layout> {
        let mut off = 12;
        let mut tags = 0;
        let mut ethertype = be16(frame, off)?;
        while matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_OLD) && tags < max_tags {
            off += 4;
            tags += 1;
            ethertype = be16(frame, off)?;
        }
        if ethertype != ETH_P_IPV4 {
            return None;
        }
        let l3 = off + 2;
        if frame.len() < l3 + 20 {
            return None;
        }
        let ihl_bytes = usize::from(frame[l3] & 0x0f) * 4;
        let total_len = usize::from(be16(frame, l3 + 2)?);
        let frag = be16(frame, l3 + 6)?;
        Some(Layout {
            tags,
            l3,
            ihl_bytes,
            total_len,
            proto: frame[l3 + 9],
            fragment: frag & 0x3fff != 0,
            l4: l3 + ihl_bytes.max(20),
            ip_end: (l3 + total_len).min(frame.len()),
        })
    }
}

/// One's-complement residual of `data` summed with `start`: 0 when a checksum over exactly
/// these words verifies, and equal before and after a correct incremental update.
pub fn residual(start: Sum16BitWords, data: &[u8]) -> u16 {
    match start.add_slice(data).ones_complement() {
        0xffff => 0,
        r => r,
    }
}

/// The pseudo-header sum of a TCP/UDP checksum.
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> Sum16BitWords {
    Sum16BitWords::new()
        .add_4bytes(src)
        .add_4bytes(dst)
        .add_2bytes([0, proto])
        .add_2bytes(len.to_be_bytes())
}

/// Sets the IPv4 total length to what the frame holds after the IPv4 header's start.
pub fn fix_total_len(frame: &mut [u8]) {
    if let Some(l) = Layout::of(frame, 3) {
        set16(frame, l.l3 + 2, (frame.len() - l.l3).min(0xffff) as u16);
    }
}

/// Recomputes the IPv4 header checksum over the IHL's bytes (when they are in the frame).
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let Some(l) = Layout::of(frame, 3) else {
        return;
    };
    let hlen = l.ihl_bytes.max(20);
    if l.l3 + hlen > frame.len() {
        return;
    }
    set16(frame, l.l3 + 10, 0);
    let sum = Sum16BitWords::new()
        .add_slice(&frame[l.l3..l.l3 + hlen])
        .ones_complement();
    frame[l.l3 + 10..l.l3 + 12].copy_from_slice(&sum.to_ne_bytes());
}

/// Recomputes the TCP, UDP or ICMP checksum over the IP payload (unfragmented packets only).
pub fn fix_l4_checksum(frame: &mut [u8]) {
    let Some(l) = Layout::of(frame, 3) else {
        return;
    };
    if l.fragment || l.ihl_bytes < 20 || l.l4 >= l.ip_end {
        return;
    }
    let (src, dst) = (
        <[u8; 4]>::try_from(&frame[l.l3 + 12..l.l3 + 16]).expect("4 bytes"),
        <[u8; 4]>::try_from(&frame[l.l3 + 16..l.l3 + 20]).expect("4 bytes"),
    );
    let seg_len = l.ip_end - l.l4;
    let (check_off, start, end) = match l.proto {
        PROTO_TCP if seg_len >= 20 => (
            l.l4 + 16,
            pseudo_header(src, dst, PROTO_TCP, seg_len as u16),
            l.ip_end,
        ),
        PROTO_UDP if seg_len >= 8 => {
            let udp_len = usize::from(be16(frame, l.l4 + 4).unwrap_or(0));
            let covered = if (8..=seg_len).contains(&udp_len) {
                udp_len
            } else {
                seg_len
            };
            (
                l.l4 + 6,
                pseudo_header(src, dst, PROTO_UDP, covered as u16),
                l.l4 + covered,
            )
        }
        PROTO_ICMP if seg_len >= 8 => (l.l4 + 2, Sum16BitWords::new(), l.ip_end),
        _ => return,
    };
    set16(frame, check_off, 0);
    let mut sum = start.add_slice(&frame[l.l4..end]).ones_complement();
    if l.proto == PROTO_UDP && sum == 0 {
        sum = 0xffff;
    }
    frame[check_off..check_off + 2].copy_from_slice(&sum.to_ne_bytes());
}

/// [`fix_total_len`], then both checksums.
pub fn fix_all(frame: &mut [u8]) {
    fix_total_len(frame);
    fix_l4_checksum(frame);
    fix_ip_checksum(frame);
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Bytes of a hex string (for replaying a finding).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::SlicedPacket;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    #[test]
    fn builders_produce_frames_etherparse_accepts() {
        let l2 = eth(A, B, &[(ETH_P_8021Q, 7)], ETH_P_IPV4);
        let options = [2u8, 4, 5, 0xb4, 1, 1, 1, 0];
        let mut t = Tcp::new(([198, 18, 0, 1], 40000), ([198, 18, 100, 1], 80), TCP_SYN);
        t.options = &options;
        let frame = tcp_frame(
            &l2,
            &t,
            IpOpts {
                options: &[1, 1, 1, 0],
                ..Default::default()
            },
        );
        let parsed = SlicedPacket::from_ethernet(&frame).expect("parses");
        assert!(parsed.vlan.is_some());
        let l = Layout::of(&frame, 3).expect("layout");
        assert_eq!((l.tags, l.l3, l.ihl_bytes, l.proto), (1, 18, 24, PROTO_TCP));

        let udp = udp_frame(
            &eth(A, B, &[], ETH_P_IPV4),
            ([1, 2, 3, 4], 5),
            ([5, 6, 7, 8], 53),
            b"q",
            false,
            IpOpts::default(),
        );
        SlicedPacket::from_ethernet(&udp).expect("udp parses");
        let q = quote(PROTO_UDP, ([1, 2, 3, 4], 5), ([5, 6, 7, 8], 53), 8, 100);
        let icmp = icmp_frame(
            &eth(A, B, &[], ETH_P_IPV4),
            [9, 9, 9, 9],
            [1, 2, 3, 4],
            (3, 4),
            [0, 0, 5, 0x78],
            &q,
        );
        SlicedPacket::from_ethernet(&icmp).expect("icmp parses");
    }

    #[test]
    fn fixups_restore_valid_checksums() {
        let l2 = eth(A, B, &[], ETH_P_IPV4);
        let t = Tcp {
            payload: b"hello",
            ..Tcp::new(([198, 18, 0, 1], 1), ([198, 18, 0, 2], 2), TCP_ACK)
        };
        let good = tcp_frame(&l2, &t, IpOpts::default());
        let mut bad = good.clone();
        bad[14 + 20 + 4] ^= 0xff; // sequence number
        bad[14 + 8] ^= 0x10; // TTL
        bad.extend_from_slice(b"xyz");
        fix_all(&mut bad);
        let l = Layout::of(&bad, 3).expect("layout");
        assert_eq!(l.total_len, bad.len() - 14);
        assert_eq!(residual(Sum16BitWords::new(), &bad[14..34]), 0);
        let seg = &bad[34..];
        let src = [198, 18, 0, 1];
        let dst = [198, 18, 0, 2];
        assert_eq!(
            residual(pseudo_header(src, dst, PROTO_TCP, seg.len() as u16), seg),
            0
        );
        assert_eq!(unhex(&hex(&bad)).expect("hex"), bad);
    }
}
