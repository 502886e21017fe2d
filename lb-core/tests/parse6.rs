//! Host tests of the IPv6 parser that the XDP program runs, over whole frames built with
//! etherparse (extension headers spliced in by hand: etherparse writes them only with their
//! payloads re-encoded, which the tests want to control byte for byte).

use etherparse::PacketBuilder;
use lb_core::{
    parse::{L4, NonLinearFrame, Outcome, SliceFrame, parse},
    parse6::{
        IPV6_HLEN, MAX_EXT_HEADERS, NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING,
        Outcome6, Parsed6, is_icmpv6_error, is_neighbour_discovery, parse_icmp6_quote, parse6,
    },
};

const CLIENT: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const VIP: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0x64, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

fn builder() -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv6(CLIENT, VIP, 64)
}

fn tcp_syn6() -> Vec<u8> {
    let mut frame = Vec::new();
    builder()
        .tcp(40000, 80, 1000, 64240)
        .syn()
        .write(&mut frame, &[])
        .expect("build");
    frame
}

fn udp6() -> Vec<u8> {
    let mut frame = Vec::new();
    builder()
        .udp(50000, 53)
        .write(&mut frame, b"query")
        .expect("build");
    frame
}

fn words(bytes: [u8; 16]) -> [u32; 4] {
    core::array::from_fn(|i| u32::from_ne_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()))
}

fn parse_bytes(bytes: &mut [u8]) -> Parsed6 {
    parse6(&SliceFrame { bytes })
}

/// Inserts an extension header of `kind` (`len8` 8-octet units beyond the first 8) right
/// behind the fixed header, fixing the chain and the payload length.
fn with_ext(mut frame: Vec<u8>, kind: u8, len8: u8) -> Vec<u8> {
    let next = frame[14 + 6];
    let len = (len8 as usize + 1) * 8;
    let mut ext = vec![0u8; len];
    ext[0] = next;
    ext[1] = len8;
    if kind == NEXTHDR_HOP || kind == NEXTHDR_DEST {
        // One PadN option filling the header.
        ext[2] = 1;
        ext[3] = (len - 4) as u8;
    }
    frame.splice(14 + IPV6_HLEN..14 + IPV6_HLEN, ext);
    frame[14 + 6] = kind;
    let payload = u16::from_be_bytes([frame[18], frame[19]]) + len as u16;
    frame[18..20].copy_from_slice(&payload.to_be_bytes());
    frame
}

#[test]
fn parses_a_tcp_syn_over_ipv6() {
    let mut frame = tcp_syn6();
    // The IPv4 parser only recognises the frame.
    assert_eq!(
        parse(&SliceFrame { bytes: &mut frame }).outcome,
        Outcome::Ipv6
    );
    let parsed = parse_bytes(&mut frame);
    assert_eq!(parsed.outcome, Outcome6::Ipv6);
    let packet = parsed.ipv6().expect("ipv6");
    assert_eq!(packet.l3_off, 14);
    assert_eq!(packet.l4_off, 54);
    assert_eq!(packet.src, words(CLIENT));
    assert_eq!(packet.dst, words(VIP));
    assert_eq!(packet.proto, 6);
    assert_eq!(packet.payload_len, 20);
    assert_eq!(packet.ip_len(), 60);
    assert_eq!(packet.l4, L4::Tcp);
    assert_eq!(u16::from_be(packet.src_port_be), 40000);
    assert_eq!(u16::from_be(packet.dst_port_be), 80);
    assert_eq!(packet.tcp_flags & 0x02, 0x02);
    assert_eq!(packet.tcp_hlen, 20);
    assert!(!packet.has_ext_headers);
}

#[test]
fn parses_udp_over_ipv6() {
    let mut frame = udp6();
    let packet = *parse_bytes(&mut frame).ipv6().expect("ipv6");
    assert_eq!(packet.l4, L4::Udp);
    assert_eq!(u16::from_be(packet.src_port_be), 50000);
    assert_eq!(u16::from_be(packet.dst_port_be), 53);
}

#[test]
fn every_truncation_of_a_valid_frame_is_rejected() {
    for original in [tcp_syn6(), udp6()] {
        for len in 0..original.len() {
            let mut cut = original[..len].to_vec();
            let parsed = parse_bytes(&mut cut);
            let expected = if len < 14 + IPV6_HLEN {
                Outcome6::Truncated
            } else {
                // The fixed header is whole but its payload length runs past the frame.
                Outcome6::Malformed
            };
            assert_eq!(parsed.outcome, expected, "cut at {len}");
            assert_eq!(parsed.packet, Default::default(), "cut at {len}");
        }
    }
}

#[test]
fn a_payload_length_that_cuts_the_transport_header_is_truncated_l4() {
    let mut frame = tcp_syn6();
    frame[18..20].copy_from_slice(&10u16.to_be_bytes());
    assert_eq!(parse_bytes(&mut frame).packet.l4, L4::Truncated);
}

#[test]
fn not_ipv6_and_a_wrong_version_are_told_apart() {
    let mut frame = tcp_syn6();
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    assert_eq!(parse_bytes(&mut frame).outcome, Outcome6::NotIpv6);
    let mut frame = tcp_syn6();
    frame[14] = 0x45;
    assert_eq!(parse_bytes(&mut frame).outcome, Outcome6::Malformed);
}

#[test]
fn one_vlan_tag_is_skipped() {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .single_vlan(7.try_into().unwrap())
        .ipv6(CLIENT, VIP, 64)
        .tcp(40000, 80, 1, 1024)
        .write(&mut frame, &[])
        .unwrap();
    let packet = *parse_bytes(&mut frame).ipv6().expect("ipv6");
    assert_eq!(packet.l3_off, 18);
    assert_eq!(packet.l4_off, 58);
    assert_eq!(packet.l4, L4::Tcp);
}

#[test]
fn hop_by_hop_routing_and_destination_headers_are_walked() {
    let mut frame = with_ext(
        with_ext(with_ext(tcp_syn6(), NEXTHDR_DEST, 1), NEXTHDR_ROUTING, 0),
        NEXTHDR_HOP,
        0,
    );
    let packet = *parse_bytes(&mut frame).ipv6().expect("ipv6");
    assert!(packet.has_ext_headers);
    assert_eq!(packet.l4_off, 54 + 8 + 8 + 16);
    assert_eq!(packet.proto, 6);
    assert_eq!(packet.l4, L4::Tcp);
    assert_eq!(u16::from_be(packet.dst_port_be), 80);
    assert_eq!(packet.payload_len, 20 + 32);
}

#[test]
fn the_walk_stops_at_its_bound() {
    let mut frame = tcp_syn6();
    for _ in 0..MAX_EXT_HEADERS {
        frame = with_ext(frame, NEXTHDR_DEST, 0);
    }
    assert_eq!(parse_bytes(&mut frame).packet.l4, L4::Tcp, "at the bound");
    let mut frame = with_ext(frame, NEXTHDR_DEST, 0);
    assert_eq!(parse_bytes(&mut frame).packet.l4, L4::ExtLimit);
}

#[test]
fn an_extension_header_past_the_payload_is_truncated() {
    let mut frame = with_ext(tcp_syn6(), NEXTHDR_HOP, 0);
    // Claims 16 more bytes than the packet has.
    frame[14 + IPV6_HLEN + 1] = 10;
    assert_eq!(parse_bytes(&mut frame).packet.l4, L4::Truncated);
    // Every cut inside the extension header: the payload length is fixed to the cut, so
    // the frame stays consistent and only the chain is short.
    let original = with_ext(tcp_syn6(), NEXTHDR_HOP, 0);
    for payload in 0..8u16 {
        let mut cut = original[..14 + IPV6_HLEN + payload as usize].to_vec();
        cut[18..20].copy_from_slice(&payload.to_be_bytes());
        let parsed = parse_bytes(&mut cut);
        assert_eq!(parsed.outcome, Outcome6::Ipv6, "payload {payload}");
        assert_eq!(parsed.packet.l4, L4::Truncated, "payload {payload}");
    }
}

#[test]
fn fragments_never_expose_ports() {
    for (offset_and_flags, what) in [(1u16, "first"), (8 << 3, "later"), (0, "atomic")] {
        let mut frame = with_ext(tcp_syn6(), NEXTHDR_FRAGMENT, 0);
        frame[14 + IPV6_HLEN + 1] = 0;
        frame[14 + IPV6_HLEN + 2..14 + IPV6_HLEN + 4]
            .copy_from_slice(&offset_and_flags.to_be_bytes());
        let packet = *parse_bytes(&mut frame).ipv6().expect("ipv6");
        assert_eq!(packet.l4, L4::Fragment, "{what}");
        assert_eq!(packet.src_port_be, 0, "{what}");
        assert_eq!(packet.dst_port_be, 0, "{what}");
    }
}

#[test]
fn icmpv6_types_are_classified() {
    for t in 133..=137 {
        assert!(is_neighbour_discovery(t));
        assert!(!is_icmpv6_error(t));
    }
    for t in [128, 129, 132, 138] {
        assert!(!is_neighbour_discovery(t));
    }
    for t in 1..=4 {
        assert!(is_icmpv6_error(t));
    }
    assert!(!is_icmpv6_error(0));
    assert!(!is_icmpv6_error(128));
}

/// A Packet Too Big from a router towards the load balancer, quoting the full-NAT leg.
fn packet_too_big(quoted: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(VIP, CLIENT, 64)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut frame, quoted)
        .unwrap();
    frame
}

#[test]
fn icmpv6_quotes_parse_and_every_cut_is_invalid() {
    let syn = tcp_syn6();
    let quoted = &syn[14..];
    let mut frame = packet_too_big(quoted);
    let icmp = *parse_bytes(&mut frame).ipv6().expect("ipv6");
    assert_eq!(icmp.l4, L4::Icmp);
    assert_eq!(icmp.icmp_type, 2);
    let quote = parse_icmp6_quote(&SliceFrame { bytes: &mut frame }, &icmp);
    assert!(quote.valid);
    assert_eq!(quote.src, words(CLIENT));
    assert_eq!(quote.dst, words(VIP));
    assert_eq!(quote.proto, 6);
    assert_eq!(u16::from_be(quote.src_port_be), 40000);
    assert_eq!(u16::from_be(quote.dst_port_be), 80);
    // A quote cut anywhere before its 8 transport bytes is invalid, by the payload length
    // even when the frame's padding would hold the bytes.
    for keep in 0..IPV6_HLEN + 8 {
        let mut frame = packet_too_big(&quoted[..keep]);
        let icmp = *parse_bytes(&mut frame).ipv6().expect("ipv6");
        assert!(
            !parse_icmp6_quote(&SliceFrame { bytes: &mut frame }, &icmp).valid,
            "kept {keep}"
        );
        let mut padded = frame.clone();
        padded.extend_from_slice(&syn[14 + keep..]);
        assert!(
            !parse_icmp6_quote(&SliceFrame { bytes: &mut padded }, &icmp).valid,
            "padded after {keep}"
        );
    }
}

#[test]
fn a_non_linear_packet_parses_like_the_linear_one() {
    let mut payload = vec![0u8; 1000];
    payload[0] = 1;
    let mut frame = Vec::new();
    builder()
        .tcp(40000, 80, 1, 1024)
        .ack(1)
        .write(&mut frame, &payload)
        .unwrap();
    let len = frame.len();
    let linear = parse_bytes(&mut frame.clone());
    let mut head = frame[..14 + IPV6_HLEN + 20].to_vec();
    let paged = parse6(&NonLinearFrame {
        linear: &mut head,
        len,
    });
    assert_eq!(paged, linear);
    assert_eq!(paged.packet.l4, L4::Tcp);
}
