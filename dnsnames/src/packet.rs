//! A captured frame (Ethernet II onwards) taken apart down to the DNS payload.
//!
//! Parsed by hand rather than with a general packet library: the rules that matter here are
//! few and exact (which tags, which extension headers, what counts as cut short), and a frame
//! cut at the snap length must still give what it holds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// DNS is served on this port; the capture only copies responses, so it is the source port.
pub const DNS_PORT: u16 = 53;

/// IPv6 extension headers walked before giving up (hop-by-hop, routing, destination options).
pub const MAX_IPV6_EXTENSIONS: usize = 4;

/// VLAN tags accepted in front of the IP header.
pub const MAX_VLAN_TAGS: usize = 2;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTIONS: u8 = 60;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

/// One DNS response segment or datagram as captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsPacket<'a> {
    pub transport: Transport,
    /// The resolver (the packet's source).
    pub src: IpAddr,
    /// The client (the packet's destination).
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// 0 for UDP.
    pub tcp_seq: u32,
    /// SYN, FIN or RST was set: TCP reassembly starts over.
    pub tcp_syn_or_fin: bool,
    /// The L4 payload as captured (shorter than the packet said when `cut`).
    pub payload: &'a [u8],
    /// The capture ended before the end of the payload (snap length).
    pub cut: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PacketError {
    /// The capture ends before the transport header (and its options) is complete.
    #[error("frame ends before the transport header")]
    FrameTruncated,
    /// Not IPv4 or IPv6 after at most two VLAN tags.
    #[error("not an IPv4 or IPv6 frame")]
    NotIp,
    /// Version, header length or packet length fields that cannot be right.
    #[error("malformed IP header")]
    BadIpHeader,
    /// An IPv4 fragment (offset or more-fragments set) or an IPv6 fragment header.
    #[error("IP fragment")]
    Fragment,
    #[error("more than {MAX_IPV6_EXTENSIONS} IPv6 extension headers")]
    TooManyExtensions,
    /// A UDP length or TCP data offset that does not fit the IP packet.
    #[error("malformed UDP or TCP header")]
    BadL4Header,
    /// Not UDP or TCP, or the source port is not 53.
    #[error("not a DNS response (UDP or TCP from port 53)")]
    NotDns,
}

/// Every [`PacketError::reason`], for metrics that list all labels up front.
pub const PACKET_REASONS: &[&str] = &[
    "frame_truncated",
    "not_ip",
    "bad_ip_header",
    "fragment",
    "too_many_extensions",
    "bad_l4_header",
    "not_dns",
];

impl PacketError {
    pub fn reason(&self) -> &'static str {
        match self {
            PacketError::FrameTruncated => "frame_truncated",
            PacketError::NotIp => "not_ip",
            PacketError::BadIpHeader => "bad_ip_header",
            PacketError::Fragment => "fragment",
            PacketError::TooManyExtensions => "too_many_extensions",
            PacketError::BadL4Header => "bad_l4_header",
            PacketError::NotDns => "not_dns",
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Where the IP layer says the transport header starts and the packet ends.
struct IpLayer {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    l4_start: usize,
    /// Frame offset of the end of the IP packet by its length field (may lie past the capture).
    ip_end: usize,
}

fn ipv4(frame: &[u8], l3: usize) -> Result<IpLayer, PacketError> {
    let h = frame.get(l3..).unwrap_or_default();
    if h.len() < 20 {
        return Err(PacketError::FrameTruncated);
    }
    if h[0] >> 4 != 4 {
        return Err(PacketError::BadIpHeader);
    }
    let header_len = usize::from(h[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if header_len < 20 || total_len < header_len {
        return Err(PacketError::BadIpHeader);
    }
    if h.len() < header_len {
        return Err(PacketError::FrameTruncated);
    }
    let fragment = u16::from_be_bytes([h[6], h[7]]);
    let more_fragments = fragment & 0x2000 != 0;
    if more_fragments || fragment & 0x1fff != 0 {
        return Err(PacketError::Fragment);
    }
    Ok(IpLayer {
        src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
        dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
        protocol: h[9],
        l4_start: l3 + header_len,
        ip_end: l3 + total_len,
    })
}

fn ipv6(frame: &[u8], l3: usize) -> Result<IpLayer, PacketError> {
    let h = frame.get(l3..).unwrap_or_default();
    if h.len() < 40 {
        return Err(PacketError::FrameTruncated);
    }
    if h[0] >> 4 != 6 {
        return Err(PacketError::BadIpHeader);
    }
    let payload_len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    let ip_end = l3 + 40 + payload_len;
    let mut next = h[6];
    let mut at = l3 + 40;
    let mut walked = 0;
    loop {
        match next {
            PROTO_TCP | PROTO_UDP => break,
            IPV6_FRAGMENT => return Err(PacketError::Fragment),
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                walked += 1;
                if walked > MAX_IPV6_EXTENSIONS {
                    return Err(PacketError::TooManyExtensions);
                }
                let (Some(&header), Some(&len_units)) = (frame.get(at), frame.get(at + 1)) else {
                    return Err(PacketError::FrameTruncated);
                };
                let len = (usize::from(len_units) + 1) * 8;
                if at + len > ip_end {
                    return Err(PacketError::BadIpHeader);
                }
                next = header;
                at += len;
            }
            // Anything else (no next header, ESP, AH, ICMPv6, ...) carries no DNS we can read.
            _ => return Err(PacketError::NotDns),
        }
    }
    let src: [u8; 16] = h[8..24]
        .try_into()
        .map_err(|_| PacketError::FrameTruncated)?;
    let dst: [u8; 16] = h[24..40]
        .try_into()
        .map_err(|_| PacketError::FrameTruncated)?;
    Ok(IpLayer {
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        protocol: next,
        l4_start: at,
        ip_end,
    })
}

/// Takes a captured frame apart down to its DNS payload.
///
/// Ethernet II with up to two VLAN tags (802.1Q, 802.1ad, 0x9100), IPv4 with options or IPv6
/// with up to four hop-by-hop, routing or destination-options headers; fragments are refused.
/// A frame cut short still gives what it holds (`cut`) once the transport header is whole.
pub fn dns_packet(frame: &[u8]) -> Result<DnsPacket<'_>, PacketError> {
    let mut ethertype = be16(frame, 12).ok_or(PacketError::FrameTruncated)?;
    let mut l3 = 14;
    let mut tags = 0;
    while ETHERTYPE_VLAN.contains(&ethertype) {
        tags += 1;
        if tags > MAX_VLAN_TAGS {
            return Err(PacketError::NotIp);
        }
        ethertype = be16(frame, l3 + 2).ok_or(PacketError::FrameTruncated)?;
        l3 += 4;
    }
    let ip = match ethertype {
        ETHERTYPE_IPV4 => ipv4(frame, l3)?,
        ETHERTYPE_IPV6 => ipv6(frame, l3)?,
        _ => return Err(PacketError::NotIp),
    };
    let (transport, base_len) = match ip.protocol {
        PROTO_UDP => (Transport::Udp, 8),
        PROTO_TCP => (Transport::Tcp, 20),
        _ => return Err(PacketError::NotDns),
    };
    let l4 = ip.l4_start;
    // The IP packet's own length must hold the header; only then is a short capture a cut.
    if l4 + base_len > ip.ip_end {
        return Err(PacketError::BadL4Header);
    }
    if l4 + base_len > frame.len() {
        return Err(PacketError::FrameTruncated);
    }
    let h = &frame[l4..];
    let src_port = u16::from_be_bytes([h[0], h[1]]);
    let dst_port = u16::from_be_bytes([h[2], h[3]]);
    if src_port != DNS_PORT {
        return Err(PacketError::NotDns);
    }
    let (payload_start, payload_end, tcp_seq, tcp_syn_or_fin) = match transport {
        Transport::Udp => {
            let udp_len = usize::from(u16::from_be_bytes([h[4], h[5]]));
            // As Linux does: a UDP length below the header or past the IP packet is refused.
            if udp_len < 8 || l4 + udp_len > ip.ip_end {
                return Err(PacketError::BadL4Header);
            }
            (l4 + 8, l4 + udp_len, 0, false)
        }
        Transport::Tcp => {
            let header_len = usize::from(h[12] >> 4) * 4;
            if header_len < 20 || l4 + header_len > ip.ip_end {
                return Err(PacketError::BadL4Header);
            }
            if l4 + header_len > frame.len() {
                return Err(PacketError::FrameTruncated);
            }
            let seq = be32(h, 4).ok_or(PacketError::FrameTruncated)?;
            let resets = h[13] & (TCP_SYN | TCP_FIN | TCP_RST) != 0;
            (l4 + header_len, ip.ip_end, seq, resets)
        }
    };
    let captured_end = payload_end.min(frame.len());
    Ok(DnsPacket {
        transport,
        src: ip.src,
        dst: ip.dst,
        src_port,
        dst_port,
        tcp_seq,
        tcp_syn_or_fin,
        payload: &frame[payload_start..captured_end],
        cut: payload_end > frame.len(),
    })
}

#[cfg(test)]
mod tests {
    use etherparse::{
        IpHeaders, IpNumber, Ipv4Header, Ipv6Extensions, Ipv6Header, Ipv6RawExtHeader,
        PacketBuilder, TcpHeader, VlanId,
    };

    use super::*;

    const SRC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const DST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const RESOLVER: [u8; 4] = [192, 0, 2, 53];
    const CLIENT: [u8; 4] = [198, 51, 100, 10];
    const PAYLOAD: &[u8] = b"0123456789abcdef";

    fn udp4(src_port: u16) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ipv4(RESOLVER, CLIENT, 64)
            .udp(src_port, 40000);
        let mut frame = Vec::new();
        builder.write(&mut frame, PAYLOAD).unwrap();
        frame
    }

    fn expected_udp4(payload: &[u8], cut: bool) -> DnsPacket<'_> {
        DnsPacket {
            transport: Transport::Udp,
            src: IpAddr::from(RESOLVER),
            dst: IpAddr::from(CLIENT),
            src_port: 53,
            dst_port: 40000,
            tcp_seq: 0,
            tcp_syn_or_fin: false,
            payload,
            cut,
        }
    }

    #[test]
    fn udp_over_ipv4() {
        let frame = udp4(53);
        assert_eq!(dns_packet(&frame), Ok(expected_udp4(PAYLOAD, false)));
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut frame = udp4(53);
        frame.extend([0; 12]);
        assert_eq!(dns_packet(&frame), Ok(expected_udp4(PAYLOAD, false)));
    }

    #[test]
    fn vlan_tags() {
        for double in [false, true] {
            let step = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
            let step = if double {
                step.double_vlan(VlanId::try_new(10).unwrap(), VlanId::try_new(20).unwrap())
            } else {
                step.single_vlan(VlanId::try_new(10).unwrap())
            };
            let builder = step.ipv4(RESOLVER, CLIENT, 64).udp(53, 40000);
            let mut frame = Vec::new();
            builder.write(&mut frame, PAYLOAD).unwrap();
            assert_eq!(dns_packet(&frame), Ok(expected_udp4(PAYLOAD, false)));
        }
    }

    #[test]
    fn three_vlan_tags_are_refused() {
        let plain = udp4(53);
        let mut frame = plain[..12].to_vec();
        for _ in 0..3 {
            frame.extend([0x81, 0x00, 0x00, 0x0a]);
        }
        frame.extend(&plain[12..]);
        assert_eq!(dns_packet(&frame), Err(PacketError::NotIp));
    }

    #[test]
    fn ipv4_options() {
        let mut ip = Ipv4Header::new(0, 64, IpNumber::UDP, RESOLVER, CLIENT).unwrap();
        ip.options = [1u8, 1, 1, 0][..].try_into().unwrap();
        let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .udp(53, 40000);
        let mut frame = Vec::new();
        builder.write(&mut frame, PAYLOAD).unwrap();
        assert_eq!(frame[14] & 0x0f, 6);
        assert_eq!(dns_packet(&frame), Ok(expected_udp4(PAYLOAD, false)));
    }

    #[test]
    fn ipv6_with_a_hop_by_hop_header() {
        let resolver: [u8; 16] = "2001:db8::53".parse::<Ipv6Addr>().unwrap().octets();
        let client: [u8; 16] = "2001:db8::10".parse::<Ipv6Addr>().unwrap().octets();
        let header = Ipv6Header {
            hop_limit: 64,
            source: resolver,
            destination: client,
            ..Default::default()
        };
        let extensions = Ipv6Extensions {
            hop_by_hop_options: Some(
                Ipv6RawExtHeader::new_raw(IpNumber::UDP, &[1, 4, 0, 0, 0, 0]).unwrap(),
            ),
            ..Default::default()
        };
        let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ip(IpHeaders::Ipv6(header, extensions))
            .udp(53, 5353);
        let mut frame = Vec::new();
        builder.write(&mut frame, PAYLOAD).unwrap();
        assert_eq!(frame[14 + 6], 0, "next header is hop-by-hop");
        assert_eq!(
            dns_packet(&frame),
            Ok(DnsPacket {
                transport: Transport::Udp,
                src: IpAddr::from(resolver),
                dst: IpAddr::from(client),
                src_port: 53,
                dst_port: 5353,
                tcp_seq: 0,
                tcp_syn_or_fin: false,
                payload: PAYLOAD,
                cut: false,
            })
        );

        // Five extension headers: one too many.
        let mut long = frame[..54].to_vec();
        long[20] = 60;
        for i in 0..5 {
            let next = if i == 4 { 17 } else { 60 };
            long.extend([next, 0, 1, 4, 0, 0, 0, 0]);
        }
        long.extend(&frame[62..]);
        let payload_len = (long.len() - 54) as u16;
        long[18..20].copy_from_slice(&payload_len.to_be_bytes());
        assert_eq!(dns_packet(&long), Err(PacketError::TooManyExtensions));
        // Four are walked.
        let mut four = long.clone();
        four.drain(54..62);
        let payload_len = (four.len() - 54) as u16;
        four[18..20].copy_from_slice(&payload_len.to_be_bytes());
        assert_eq!(dns_packet(&four).map(|p| p.payload), Ok(PAYLOAD));

        // A fragment header is refused.
        let mut fragment = frame.clone();
        fragment[54] = 44;
        assert_eq!(dns_packet(&fragment), Err(PacketError::Fragment));
    }

    #[test]
    fn ipv4_fragments_are_refused() {
        let plain = udp4(53);
        let mut more = plain.clone();
        more[20] |= 0x20;
        assert_eq!(dns_packet(&more), Err(PacketError::Fragment));
        let mut offset = plain.clone();
        offset[21] = 0x10;
        assert_eq!(dns_packet(&offset), Err(PacketError::Fragment));
        let mut dont = plain;
        dont[20] = 0x40;
        assert!(dns_packet(&dont).is_ok());
    }

    #[test]
    fn a_cut_payload_gives_what_is_there() {
        let frame = udp4(53);
        let header_end = 14 + 20 + 8;
        assert_eq!(
            dns_packet(&frame[..header_end + 5]),
            Ok(expected_udp4(&PAYLOAD[..5], true))
        );
        assert_eq!(
            dns_packet(&frame[..header_end]),
            Ok(expected_udp4(&[], true))
        );
        for len in [0, 13, 14, 33, header_end - 1] {
            assert_eq!(
                dns_packet(&frame[..len]),
                Err(PacketError::FrameTruncated),
                "{len}"
            );
        }
    }

    #[test]
    fn tcp_segment() {
        let mut tcp = TcpHeader::new(53, 41000, 0xdead_beef, 1000);
        tcp.ack = true;
        tcp.psh = true;
        let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ipv4(RESOLVER, CLIENT, 64)
            .tcp_header(tcp.clone());
        let mut frame = Vec::new();
        builder.write(&mut frame, PAYLOAD).unwrap();
        let expected = DnsPacket {
            transport: Transport::Tcp,
            src: IpAddr::from(RESOLVER),
            dst: IpAddr::from(CLIENT),
            src_port: 53,
            dst_port: 41000,
            tcp_seq: 0xdead_beef,
            tcp_syn_or_fin: false,
            payload: PAYLOAD,
            cut: false,
        };
        assert_eq!(dns_packet(&frame), Ok(expected));

        tcp.fin = true;
        let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ipv4(RESOLVER, CLIENT, 64)
            .tcp_header(tcp);
        let mut fin = Vec::new();
        builder.write(&mut fin, PAYLOAD).unwrap();
        assert_eq!(
            dns_packet(&fin),
            Ok(DnsPacket {
                tcp_syn_or_fin: true,
                ..expected
            })
        );

        // Data offset 4 words: below the header.
        let mut bad = frame.clone();
        bad[14 + 20 + 12] = 0x40;
        assert_eq!(dns_packet(&bad), Err(PacketError::BadL4Header));
        // Data offset past the IP packet.
        bad[14 + 20 + 12] = 0xf0;
        assert_eq!(dns_packet(&bad), Err(PacketError::BadL4Header));
    }

    #[test]
    fn not_dns() {
        assert_eq!(dns_packet(&udp4(5353)), Err(PacketError::NotDns));
        let mut icmp = udp4(53);
        icmp[14 + 9] = 1;
        assert_eq!(dns_packet(&icmp), Err(PacketError::NotDns));
        let mut arp = udp4(53);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(dns_packet(&arp), Err(PacketError::NotIp));
    }

    #[test]
    fn lengths_that_cannot_be_right() {
        let plain = udp4(53);
        let mut version = plain.clone();
        version[14] = 0x65;
        assert_eq!(dns_packet(&version), Err(PacketError::BadIpHeader));
        let mut ihl = plain.clone();
        ihl[14] = 0x44;
        assert_eq!(dns_packet(&ihl), Err(PacketError::BadIpHeader));
        let mut total = plain.clone();
        total[16..18].copy_from_slice(&24u16.to_be_bytes());
        assert_eq!(dns_packet(&total), Err(PacketError::BadL4Header));
        let mut udp_len = plain.clone();
        udp_len[38..40].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(dns_packet(&udp_len), Err(PacketError::BadL4Header));
        udp_len[38..40].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(dns_packet(&udp_len), Err(PacketError::BadL4Header));
        // A UDP length shorter than the IP payload: the rest is not DNS.
        let mut short = plain;
        short[38..40].copy_from_slice(&12u16.to_be_bytes());
        assert_eq!(dns_packet(&short), Ok(expected_udp4(&PAYLOAD[..4], false)));
    }

    #[test]
    fn every_reason_is_listed() {
        let all = [
            PacketError::FrameTruncated,
            PacketError::NotIp,
            PacketError::BadIpHeader,
            PacketError::Fragment,
            PacketError::TooManyExtensions,
            PacketError::BadL4Header,
            PacketError::NotDns,
        ];
        let reasons: Vec<&str> = all.iter().map(PacketError::reason).collect();
        assert_eq!(reasons, PACKET_REASONS);
    }
}
