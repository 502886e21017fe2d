//! Fuzz target `parse6`: `lb_core::parse6::parse6` and `parse_icmp6_quote` on arbitrary bytes
//! and on mutations of valid IPv6 frames built with etherparse, extension headers included (see
//! `docs/fuzzing.md`).
//!
//! Properties:
//! - never a panic; every offset reported lies inside the frame; the addresses, ports and
//!   flags reported are the bytes at those offsets;
//! - whenever `parse6` reports TCP or UDP, etherparse's whole-packet parser reads the same
//!   ports: a header etherparse finds invalid or cut short is never a TCP or UDP packet;
//! - an unmutated valid frame (up to [`MAX_EXT_HEADERS`] hop-by-hop, routing or destination
//!   options headers) parses completely, ports and all;
//! - a packet with the headers in the linear part of a non-linear frame parses as the linear
//!   one.

mod fuzz_harness;

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use lb_core::{
    parse::{L4, NonLinearFrame, SliceFrame},
    parse6::{IPV6_HLEN, MAX_EXT_HEADERS, Outcome6, Parsed6, parse_icmp6_quote, parse6},
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn parse_bytes(bytes: &[u8]) -> Parsed6 {
    let mut copy = bytes.to_vec();
    parse6(&SliceFrame { bytes: &mut copy })
}

fn words(b: &[u8]) -> [u32; 4] {
    core::array::from_fn(|i| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().unwrap()))
}

/// A valid frame: TCP or UDP over IPv6 behind `ext` extension headers (kinds 0, 43, 60; each
/// `(kind, 8-octet units beyond the first)`), spliced in by hand.
#[derive(Clone, Debug)]
struct Spec {
    tcp: bool,
    sport: u16,
    dport: u16,
    ext: Vec<(u8, u8)>,
    payload: Vec<u8>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        any::<bool>(),
        any::<u16>(),
        any::<u16>(),
        proptest::collection::vec((prop_oneof![Just(0u8), Just(43), Just(60)], 0u8..3), 0..=4),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(tcp, sport, dport, ext, payload)| Spec {
            tcp,
            sport,
            dport,
            // Hop-by-hop may only come first (RFC 8200); etherparse holds it to that.
            ext: ext
                .into_iter()
                .enumerate()
                .map(|(i, (k, n))| if i > 0 && k == 0 { (60, n) } else { (k, n) })
                .collect(),
            payload,
        })
}

fn build(s: &Spec) -> Vec<u8> {
    let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let dst = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv6(src, dst, 64);
    let mut frame = Vec::new();
    if s.tcp {
        b.tcp(s.sport, s.dport, 1, 1024)
            .syn()
            .write(&mut frame, &s.payload)
            .unwrap();
    } else {
        b.udp(s.sport, s.dport)
            .write(&mut frame, &s.payload)
            .unwrap();
    }
    // Splice the chain in front of the transport header, last header first.
    for (kind, units) in s.ext.iter().rev() {
        let len = (*units as usize + 1) * 8;
        let mut ext = vec![0u8; len];
        ext[0] = frame[14 + 6];
        ext[1] = *units;
        if *kind != 43 {
            ext[2] = 1;
            ext[3] = (len - 4) as u8;
        } else {
            // Routing type 0 would be refused; type 253 (experimental), 0 segments left.
            ext[2] = 253;
        }
        frame.splice(14 + IPV6_HLEN..14 + IPV6_HLEN, ext);
        frame[14 + 6] = *kind;
        let payload = u16::from_be_bytes([frame[18], frame[19]]) + len as u16;
        frame[18..20].copy_from_slice(&payload.to_be_bytes());
    }
    frame
}

/// What the parser reported is the frame's own bytes at the offsets it reported.
fn check_consistent(bytes: &[u8], p: &Parsed6) -> Result<(), TestCaseError> {
    if p.outcome != Outcome6::Ipv6 {
        prop_assert_eq!(p.packet, Default::default());
        return Ok(());
    }
    let q = &p.packet;
    prop_assert!(q.l3() + IPV6_HLEN <= bytes.len());
    prop_assert!(q.l4() <= q.l3() + q.ip_len() as usize);
    prop_assert!(q.l3() + q.ip_len() as usize <= bytes.len());
    prop_assert_eq!(q.src, words(&bytes[q.l3() + 8..]));
    prop_assert_eq!(q.dst, words(&bytes[q.l3() + 24..]));
    if matches!(q.l4, L4::Tcp | L4::Udp) {
        let l4 = &bytes[q.l4()..];
        prop_assert_eq!(q.src_port_be, u16::from_ne_bytes([l4[0], l4[1]]));
        prop_assert_eq!(q.dst_port_be, u16::from_ne_bytes([l4[2], l4[3]]));
        // etherparse reads the same transport header.
        let sliced = SlicedPacket::from_ethernet(bytes);
        let ports = match sliced.as_ref().map(|s| s.transport.as_ref()) {
            Ok(Some(TransportSlice::Tcp(t))) => Some((t.source_port(), t.destination_port())),
            Ok(Some(TransportSlice::Udp(u))) => Some((u.source_port(), u.destination_port())),
            _ => None,
        };
        prop_assert_eq!(
            ports,
            Some((u16::from_be(q.src_port_be), u16::from_be(q.dst_port_be))),
            "etherparse: {:?}",
            sliced.map(|s| s.transport)
        );
    }
    if q.l4 == L4::Icmp {
        let mut copy = bytes.to_vec();
        let quote = parse_icmp6_quote(&SliceFrame { bytes: &mut copy }, q);
        if quote.valid {
            let q3 = q.l4() + 8;
            prop_assert!(q3 + IPV6_HLEN + 8 <= q.l3() + q.ip_len() as usize);
            prop_assert_eq!(quote.src, words(&bytes[q3 + 8..]));
        }
    }
    Ok(())
}

#[test]
fn fuzz_parse6_arbitrary_bytes() {
    let frames = proptest::collection::vec(any::<u8>(), 0..200).prop_map(|mut b| {
        // Mostly IPv6 behind the ethertype, so the bytes reach the parser past it.
        if b.len() >= 15 {
            b[12] = 0x86;
            b[13] = 0xdd;
            b[14] = 0x60 | (b[14] & 0x0f);
        }
        b
    });
    fuzz_harness::check("parse6_arbitrary_bytes", frames, |bytes| {
        check_consistent(&bytes, &parse_bytes(&bytes))
    });
}

#[test]
fn fuzz_parse6_valid_frames() {
    fuzz_harness::check("parse6_valid_frames", spec(), |s| {
        let frame = build(&s);
        let p = parse_bytes(&frame);
        check_consistent(&frame, &p)?;
        let q = p.ipv6().expect("a valid frame is IPv6");
        prop_assert!(s.ext.len() <= MAX_EXT_HEADERS);
        prop_assert_eq!(q.l4, if s.tcp { L4::Tcp } else { L4::Udp });
        prop_assert_eq!(u16::from_be(q.src_port_be), s.sport);
        prop_assert_eq!(u16::from_be(q.dst_port_be), s.dport);
        prop_assert_eq!(q.has_ext_headers, !s.ext.is_empty());
        Ok(())
    });
}

#[test]
fn fuzz_parse6_mutated_frames() {
    let mutated = (
        spec(),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    );
    fuzz_harness::check("parse6_mutated_frames", mutated, |(s, edits)| {
        let mut frame = build(&s);
        for (at, value) in edits {
            let i = at % frame.len();
            frame[i] = value;
        }
        check_consistent(&frame, &parse_bytes(&frame))
    });
}

#[test]
fn fuzz_parse6_non_linear() {
    let cut = (spec(), any::<usize>());
    fuzz_harness::check("parse6_non_linear", cut, |(s, at)| {
        let frame = build(&s);
        let linear = parse_bytes(&frame);
        let q = linear.ipv6().expect("valid");
        let headers_end = q.l4() + if s.tcp { 20 } else { 8 };
        let keep = headers_end + at % (frame.len() - headers_end + 1);
        let mut head = frame[..keep].to_vec();
        let paged = parse6(&NonLinearFrame {
            linear: &mut head,
            len: frame.len(),
        });
        prop_assert_eq!(paged, linear);
        Ok(())
    });
}
