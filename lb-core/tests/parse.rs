//! Host tests of the parser that the XDP program runs, over whole frames built with etherparse.

use etherparse::{IpNumber, PacketBuilder};
use lb_core::parse::{
    Frame, L4, NonLinearFrame, Outcome, SliceFrame, parse, parse_icmp_quote, quote_within_packet,
};

fn tcp_syn() -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 1], [198, 18, 100, 1], 64)
        .tcp(40000, 80, 1000, 64240)
        .syn();
    let mut frame = Vec::new();
    builder.write(&mut frame, &[]).expect("build");
    frame
}

fn udp_with_payload() -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 1], [198, 18, 100, 1], 64)
        .udp(50000, 53);
    let mut frame = Vec::new();
    builder.write(&mut frame, b"query").expect("build");
    frame
}

fn parse_bytes(bytes: &mut [u8]) -> lb_core::parse::Parsed {
    parse(&SliceFrame { bytes })
}

#[test]
fn parses_a_tcp_syn() {
    let mut frame = tcp_syn();
    let parsed = parse_bytes(&mut frame);
    assert_eq!(parsed.outcome, Outcome::Ipv4);
    let packet = parsed.ipv4().expect("ipv4");
    assert_eq!(packet.l3_off, 14);
    assert_eq!(packet.l4_off, 34);
    assert_eq!(packet.src.to_ne_bytes(), [198, 18, 0, 1]);
    assert_eq!(packet.dst.to_ne_bytes(), [198, 18, 100, 1]);
    assert_eq!(packet.l4, L4::Tcp);
    assert_eq!(u16::from_be(packet.src_port_be), 40000);
    assert_eq!(u16::from_be(packet.dst_port_be), 80);
    assert_eq!(packet.tcp_flags & 0x02, 0x02, "SYN flag");
    assert!(!packet.has_options);
}

/// Every strict prefix of a valid frame is rejected (never parsed as a complete TCP/UDP
/// packet), without panicking, and with the outcome the documented rules give.
#[test]
fn every_truncation_of_a_valid_frame_is_rejected() {
    for original in [tcp_syn(), udp_with_payload()] {
        for len in 0..original.len() {
            let mut cut = original[..len].to_vec();
            let parsed = parse_bytes(&mut cut);
            let expected = if len < 34 {
                Outcome::Truncated
            } else {
                // The IPv4 header is whole but its total length runs past the frame.
                Outcome::Malformed
            };
            assert_eq!(parsed.outcome, expected, "cut at {len}");
            assert!(parsed.ipv4().is_none(), "cut at {len} must not parse");
        }
        let mut whole = original.clone();
        assert_eq!(parse_bytes(&mut whole).outcome, Outcome::Ipv4);
    }
}

#[test]
fn consistent_but_short_transport_header_is_truncated_l4() {
    let mut frame = tcp_syn();
    // Claim only 10 bytes of TCP in the IPv4 total length, and cut the frame there.
    frame.truncate(14 + 20 + 10);
    frame[16..18].copy_from_slice(&30u16.to_be_bytes());
    let parsed = parse_bytes(&mut frame);
    assert_eq!(parsed.outcome, Outcome::Ipv4);
    assert_eq!(parsed.packet.l4, L4::Truncated);
}

#[test]
fn ethernet_padding_beyond_the_ip_length_is_ignored() {
    let mut frame = tcp_syn();
    frame.extend_from_slice(&[0u8; 6]);
    let parsed = parse_bytes(&mut frame);
    assert_eq!(parsed.packet.l4, L4::Tcp);
    assert_eq!(parsed.packet.total_len, 40);
}

#[test]
fn one_vlan_tag_is_skipped() {
    let plain = tcp_syn();
    let mut tagged = plain[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
    tagged.extend_from_slice(&plain[12..]);
    let parsed = parse_bytes(&mut tagged);
    assert_eq!(parsed.outcome, Outcome::Ipv4);
    assert_eq!(parsed.packet.l3_off, 18);
    assert_eq!(parsed.packet.l4, L4::Tcp);
    // A tag cut short.
    let mut cut = tagged[..16].to_vec();
    assert_eq!(parse_bytes(&mut cut).outcome, Outcome::Truncated);
}

#[test]
fn non_ipv4_is_reported_as_such() {
    let mut frame = tcp_syn();
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(parse_bytes(&mut frame).outcome, Outcome::NotIpv4);
    // IPv6 is recognised, for `parse6`.
    frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    assert_eq!(parse_bytes(&mut frame).outcome, Outcome::Ipv6);
}

#[test]
fn malformed_ipv4_headers_are_rejected() {
    // Version 6 in an IPv4 ethertype.
    let mut frame = tcp_syn();
    frame[14] = 0x65;
    assert_eq!(parse_bytes(&mut frame).outcome, Outcome::Malformed);
    // IHL below 5.
    let mut frame = tcp_syn();
    frame[14] = 0x44;
    assert_eq!(parse_bytes(&mut frame).outcome, Outcome::Malformed);
    // Total length shorter than the header.
    let mut frame = tcp_syn();
    frame[16..18].copy_from_slice(&10u16.to_be_bytes());
    assert_eq!(parse_bytes(&mut frame).outcome, Outcome::Malformed);
}

#[test]
fn ip_options_are_skipped_by_ihl() {
    let plain = tcp_syn();
    // Insert 4 bytes of options (NOP NOP NOP EOL) and fix IHL and total length.
    let mut frame = plain[..34].to_vec();
    frame.extend_from_slice(&[1, 1, 1, 0]);
    frame.extend_from_slice(&plain[34..]);
    frame[14] = 0x46;
    let total = u16::from_be_bytes([frame[16], frame[17]]) + 4;
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    let parsed = parse_bytes(&mut frame);
    assert_eq!(parsed.outcome, Outcome::Ipv4);
    assert!(parsed.packet.has_options);
    assert_eq!(parsed.packet.l4_off, 38);
    assert_eq!(parsed.packet.l4, L4::Tcp);
    assert_eq!(u16::from_be(parsed.packet.dst_port_be), 80);
}

#[test]
fn fragments_never_expose_ports() {
    for (flags_and_offset, what) in [
        (0x2000u16, "first fragment"),
        (0x0001, "last fragment"),
        (0x2001, "middle fragment"),
    ] {
        let mut frame = udp_with_payload();
        frame[20..22].copy_from_slice(&flags_and_offset.to_be_bytes());
        let parsed = parse_bytes(&mut frame);
        assert_eq!(parsed.packet.l4, L4::Fragment, "{what}");
        assert_eq!(parsed.packet.src_port_be, 0, "{what}: ports not read");
        assert_eq!(parsed.packet.dst_port_be, 0, "{what}: ports not read");
    }
    // Don't-fragment alone is not a fragment.
    let mut frame = udp_with_payload();
    frame[20..22].copy_from_slice(&0x4000u16.to_be_bytes());
    assert_eq!(parse_bytes(&mut frame).packet.l4, L4::Udp);
}

#[test]
fn other_protocols_are_other() {
    let mut frame = tcp_syn();
    frame[14 + 9] = u8::from(IpNumber::GRE);
    assert_eq!(parse_bytes(&mut frame).packet.l4, L4::Other);
}

#[test]
fn icmp_quotes_parse_and_every_cut_is_invalid() {
    // ICMP destination unreachable quoting a TCP packet's IPv4 header + 8 bytes.
    let quoted = tcp_syn()[14..14 + 28].to_vec();
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 3], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 1, 254], [198, 18, 1, 1], 64)
        .icmpv4_raw(3, 4, [0, 0, 5, 120]);
    let mut frame = Vec::new();
    builder.write(&mut frame, &quoted).expect("build");
    let parsed = parse_bytes(&mut frame);
    assert_eq!(parsed.packet.l4, L4::Icmp);
    assert_eq!(parsed.packet.icmp_type, 3);
    assert_eq!(parsed.packet.icmp_code, 4);
    let icmp_off = parsed.packet.l4_off;
    let quote = parse_icmp_quote(&SliceFrame { bytes: &mut frame }, icmp_off);
    assert!(quote.valid);
    assert_eq!(quote.src.to_ne_bytes(), [198, 18, 0, 1]);
    assert_eq!(quote.dst.to_ne_bytes(), [198, 18, 100, 1]);
    assert_eq!(u16::from_be(quote.src_port_be), 40000);
    assert_eq!(u16::from_be(quote.dst_port_be), 80);
    for len in 0..frame.len() {
        let mut cut = frame[..len].to_vec();
        let quote = parse_icmp_quote(&SliceFrame { bytes: &mut cut }, icmp_off);
        assert!(!quote.valid, "quote cut at {len} must be invalid");
    }
    // The quote lies inside the packet; with a total length that ends inside the quote (the
    // rest of the frame as padding), it does not.
    assert!(quote_within_packet(&parsed.packet));
    let mut short = parsed.packet;
    short.total_len -= 1;
    assert!(!quote_within_packet(&short));
}

/// A UDP length field past the end of the IP payload, or below the 8 header bytes, is a header
/// cut short; a shorter datagram inside a longer packet is fine (the rest is padding).
#[test]
fn udp_length_field_past_the_payload_is_truncated() {
    let set_len = |frame: &mut [u8], len: u16| frame[38..40].copy_from_slice(&len.to_be_bytes());
    for len in [0u16, 7, 14, 200, u16::MAX] {
        let mut frame = udp_with_payload();
        set_len(&mut frame, len);
        assert_eq!(
            parse_bytes(&mut frame).packet.l4,
            L4::Truncated,
            "length {len}"
        );
    }
    for len in [8u16, 12, 13] {
        let mut frame = udp_with_payload();
        set_len(&mut frame, len);
        let parsed = parse_bytes(&mut frame);
        assert_eq!(parsed.packet.l4, L4::Udp, "length {len}");
        assert_eq!(u16::from_be(parsed.packet.dst_port_be), 53);
    }
}

#[test]
fn frame_bounds_are_exact() {
    let mut bytes = [0u8; 10];
    let frame = SliceFrame { bytes: &mut bytes };
    assert!(frame.at::<10>(0).is_some());
    assert!(frame.at::<10>(1).is_none());
    assert!(frame.at::<1>(9).is_some());
    assert!(frame.at::<1>(10).is_none());
    assert!(frame.at::<1>(usize::MAX).is_none(), "no overflow");
    assert!(frame.fits(10));
    assert!(!frame.fits(11));
}

#[test]
fn kernel_frame_spans_hand_out_only_in_bounds_addresses() {
    use lb_core::parse::{MAX_FRAME, span_at, span_fits};
    let (start, end) = (0x1000usize, 0x1000usize + 64);
    assert!(span_fits(start, end, 64));
    assert!(!span_fits(start, end, 65));
    assert!(!span_fits(start, start + MAX_FRAME + 1, MAX_FRAME + 1));
    assert_eq!(span_at::<4>(start, end, 0), Some(start));
    assert_eq!(span_at::<4>(start, end, 60), Some(start + 60));
    assert_eq!(span_at::<4>(start, end, 61), None);
    assert_eq!(span_at::<1>(start, end, 64), None);
    // Past the constant bound even when the frame would be long enough.
    let long_end = start + 2 * MAX_FRAME;
    assert_eq!(
        span_at::<1>(start, long_end, MAX_FRAME),
        Some(start + MAX_FRAME)
    );
    assert_eq!(span_at::<1>(start, long_end, MAX_FRAME + 1), None);
}

/// Sets the TCP data offset (in 32-bit words) of a frame built by [`tcp_syn`].
fn with_tcp_data_offset(mut frame: Vec<u8>, words: u8) -> Vec<u8> {
    frame[34 + 12] = (words << 4) | (frame[34 + 12] & 0x0f);
    frame
}

/// A SYN whose data offset points past the end of the segment (offset 15 = 60 bytes of header,
/// 20 on the wire) has a header cut short; so has one whose offset is below the minimum.
#[test]
fn tcp_data_offset_past_the_segment_or_below_five_is_truncated() {
    for words in [15u8, 6, 0, 4] {
        let mut frame = with_tcp_data_offset(tcp_syn(), words);
        let parsed = parse_bytes(&mut frame);
        assert_eq!(parsed.outcome, Outcome::Ipv4, "offset {words}");
        assert_eq!(parsed.packet.l4, L4::Truncated, "offset {words}");
        assert_eq!(parsed.packet.src_port_be, 0, "no ports from a cut header");
    }
    // Offset 5 is the plain header; offset 8 with 12 bytes of options (here: payload the
    // header claims) is whole.
    let mut frame = tcp_syn();
    assert_eq!(parse_bytes(&mut frame).packet.tcp_hlen, 20);
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 1], [198, 18, 100, 1], 64)
        .tcp(40000, 80, 1000, 64240)
        .syn();
    let mut with_12 = Vec::new();
    builder.write(&mut with_12, &[1u8; 12]).expect("build");
    let mut with_12 = with_tcp_data_offset(with_12, 8);
    let parsed = parse_bytes(&mut with_12);
    assert_eq!(parsed.packet.l4, L4::Tcp);
    assert_eq!(parsed.packet.tcp_hlen, 32);
}

/// A non-linear skb (headers in the linear area, payload in page fragments) parses exactly like
/// the same packet fully linear: lengths are judged against the packet's real length.
#[test]
fn a_non_linear_packet_parses_like_the_linear_one() {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 1], [198, 18, 100, 1], 64)
        .tcp(40000, 80, 1000, 64240)
        .ack(1);
    let mut frame = Vec::new();
    builder.write(&mut frame, &[7u8; 1400]).expect("build");
    let mut linear = frame.clone();
    let expected = parse_bytes(&mut linear);
    assert_eq!(expected.packet.l4, L4::Tcp);
    for linear_len in [54usize, 64, 128, 600, frame.len()] {
        let len = frame.len();
        let mut head = frame[..linear_len].to_vec();
        let parsed = parse(&NonLinearFrame {
            linear: &mut head,
            len,
        });
        assert_eq!(parsed, expected, "linear part of {linear_len} bytes");
    }
    // A packet whose real length is short of the IP total length is still malformed.
    let mut head = frame[..128].to_vec();
    let parsed = parse(&NonLinearFrame {
        linear: &mut head,
        len: frame.len() - 1,
    });
    assert_eq!(parsed.outcome, Outcome::Malformed);
    // Headers the linear area does not hold cannot be read: truncated, never guessed.
    let mut head = frame[..40].to_vec();
    let parsed = parse(&NonLinearFrame {
        linear: &mut head,
        len: frame.len(),
    });
    assert_eq!(parsed.packet.l4, L4::Truncated);
}
