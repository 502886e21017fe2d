//! Fuzz target `csum`: `lb_core::csum`'s incremental updates against full recomputes (its own
//! `checksum` and etherparse's), see `docs/fuzzing.md`.
//!
//! Properties:
//! - `fold` keeps the value modulo 0xffff and is 0 only for 0;
//! - any chain of 16- and 32-bit word replacements in any buffer, applied incrementally to its
//!   checksum, gives the checksum computed from scratch over the final buffer;
//! - rewriting any fields of a random IPv4 header (with options) incrementally gives
//!   etherparse's header checksum;
//! - rewriting addresses and ports of a random TCP or UDP packet incrementally gives
//!   etherparse's transport checksum (UDP: 0 stays "no checksum", a computed 0 is 0xffff).

mod fuzz_harness;

use etherparse::{
    IpHeaders, Ipv4Dscp, Ipv4Ecn, Ipv4Header, Ipv4HeaderSlice, Ipv4Options, NetHeaders,
    PacketBuilder, PacketHeaders, TcpHeader, TransportHeader,
};
use lb_core::csum;
use proptest::prelude::*;
use proptest::sample::Index;

fn read16(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn read32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[test]
fn fuzz_csum_fold() {
    let sums = prop_oneof![
        any::<u64>(),
        0u64..0x3_0000,
        Just(0u64),
        Just(0xffff),
        Just(u64::MAX)
    ];
    fuzz_harness::check("csum_fold", sums, |sum| {
        let folded = csum::fold(sum);
        prop_assert_eq!(u64::from(folded) % 0xffff, sum % 0xffff);
        prop_assert_eq!(folded == 0, sum == 0);
        Ok(())
    });
}

#[derive(Clone, Debug)]
enum Update {
    Word(Index, u16),
    Dword(Index, u32),
}

/// A buffer of whole words, the word index of its checksum field, and updates to other words.
fn buffer_and_updates() -> impl Strategy<Value = (Vec<u8>, Index, Vec<Update>)> {
    (
        (2usize..=64).prop_flat_map(|words| proptest::collection::vec(any::<u8>(), 2 * words)),
        any::<Index>(),
        proptest::collection::vec(
            prop_oneof![
                (any::<Index>(), any::<u16>()).prop_map(|(i, v)| Update::Word(i, v)),
                (any::<Index>(), any::<u32>()).prop_map(|(i, v)| Update::Dword(i, v)),
                // Values that often produce the +0 / -0 edge cases.
                (any::<Index>(), prop_oneof![Just(0u16), Just(0xffff)])
                    .prop_map(|(i, v)| Update::Word(i, v)),
            ],
            1..8,
        ),
    )
}

#[test]
fn fuzz_csum_word_updates_match_a_full_recompute() {
    fuzz_harness::check(
        "csum_word_updates",
        buffer_and_updates(),
        |(mut buf, field, updates)| {
            let words = buf.len() / 2;
            let field = 2 * field.index(words);
            buf[field..field + 2].fill(0);
            let mut check = csum::checksum(&buf);
            for u in &updates {
                match *u {
                    Update::Word(i, new) => {
                        let off = 2 * i.index(words);
                        if off == field {
                            continue;
                        }
                        check = csum::replace_u16(check, read16(&buf, off), new);
                        buf[off..off + 2].copy_from_slice(&new.to_ne_bytes());
                    }
                    Update::Dword(i, new) => {
                        let off = 2 * i.index(words - 1);
                        if off == field || off + 2 == field {
                            continue;
                        }
                        check = csum::replace_u32(check, read32(&buf, off), new);
                        buf[off..off + 4].copy_from_slice(&new.to_ne_bytes());
                    }
                }
            }
            let full = csum::checksum(&buf);
            if buf.iter().all(|b| *b == 0) {
                // All-zero data: +0 and -0 are the same one's-complement sum.
                prop_assert!(check == 0 || check == 0xffff, "{check:#06x}");
            } else {
                prop_assert_eq!(check, full, "after {:?}", updates);
                buf[field..field + 2].copy_from_slice(&check.to_ne_bytes());
                prop_assert_eq!(csum::checksum(&buf), 0, "the updated buffer verifies");
            }
            Ok(())
        },
    );
}

#[derive(Clone, Debug)]
struct Ipv4Rewrite {
    header: Ipv4Header,
    src: Option<[u8; 4]>,
    dst: Option<[u8; 4]>,
    ttl: Option<u8>,
    identification: Option<u16>,
    total_len: Option<u16>,
    dscp: Option<u8>,
}

fn ipv4_header() -> impl Strategy<Value = Ipv4Header> {
    (
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        1u8..=255,
        any::<u8>(),
        any::<u16>(),
        0u8..=Ipv4Dscp::MAX_U8,
        0u8..=Ipv4Ecn::MAX_U8,
        (0usize..=10).prop_flat_map(|n| proptest::collection::vec(any::<u8>(), 4 * n)),
        0u16..1400,
    )
        .prop_map(
            |(source, destination, ttl, proto, identification, dscp, ecn, options, payload)| {
                let mut h = Ipv4Header {
                    source,
                    destination,
                    time_to_live: ttl,
                    protocol: etherparse::IpNumber(proto),
                    identification,
                    dscp: Ipv4Dscp::try_new(dscp).expect("in range"),
                    ecn: Ipv4Ecn::try_new(ecn).expect("in range"),
                    options: Ipv4Options::try_from(options.as_slice()).expect("words <= 40"),
                    ..Default::default()
                };
                h.set_payload_len(usize::from(payload)).expect("small");
                h.header_checksum = h.calc_header_checksum();
                h
            },
        )
}

#[test]
fn fuzz_csum_ipv4_header_rewrites_match_etherparse() {
    let strategy = (
        ipv4_header(),
        proptest::option::of(any::<[u8; 4]>()),
        proptest::option::of(any::<[u8; 4]>()),
        proptest::option::of(any::<u8>()),
        proptest::option::of(any::<u16>()),
        proptest::option::of(any::<u16>()),
        proptest::option::of(0u8..=Ipv4Dscp::MAX_U8),
    )
        .prop_map(
            |(header, src, dst, ttl, identification, total_len, dscp)| Ipv4Rewrite {
                header,
                src,
                dst,
                ttl,
                identification,
                total_len,
                dscp,
            },
        );
    fuzz_harness::check("csum_ipv4_header", strategy, |rw| {
        let mut bytes = Vec::new();
        rw.header.write(&mut bytes).expect("write");
        let mut check = read16(&bytes, 10);
        let mut set16 = |bytes: &mut Vec<u8>, off: usize, new: [u8; 2]| {
            let new = u16::from_ne_bytes(new);
            check = csum::replace_u16(check, read16(bytes, off), new);
            bytes[off..off + 2].copy_from_slice(&new.to_ne_bytes());
        };
        if let Some(v) = rw.total_len {
            set16(&mut bytes, 2, v.to_be_bytes());
        }
        if let Some(v) = rw.identification {
            set16(&mut bytes, 4, v.to_be_bytes());
        }
        if let Some(v) = rw.ttl {
            let word = [v, bytes[9]];
            set16(&mut bytes, 8, word);
        }
        if let Some(v) = rw.dscp {
            let word = [bytes[0], (v << 2) | (bytes[1] & 0x03)];
            set16(&mut bytes, 0, word);
        }
        for (off, new) in [(12, rw.src), (16, rw.dst)] {
            if let Some(new) = new {
                let new = u32::from_ne_bytes(new);
                check = csum::replace_u32(check, read32(&bytes, off), new);
                bytes[off..off + 4].copy_from_slice(&new.to_ne_bytes());
            }
        }
        bytes[10..12].copy_from_slice(&check.to_ne_bytes());
        let parsed = Ipv4HeaderSlice::from_slice(&bytes)
            .expect("still a header")
            .to_header();
        prop_assert_eq!(parsed.header_checksum, parsed.calc_header_checksum());
        Ok(())
    });
}

#[derive(Clone, Debug)]
struct L4Rewrite {
    tcp: bool,
    header: Ipv4Header,
    from: ([u8; 4], [u8; 4], u16, u16),
    to: ([u8; 4], [u8; 4], u16, u16),
    /// Which of src, dst, sport, dport change.
    mask: u8,
    payload: Vec<u8>,
    zero_udp_check: bool,
}

fn tuple() -> impl Strategy<Value = ([u8; 4], [u8; 4], u16, u16)> {
    (
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<u16>(),
    )
}

fn build_l4(rw: &L4Rewrite, t: ([u8; 4], [u8; 4], u16, u16)) -> Vec<u8> {
    let mut ip = rw.header.clone();
    (ip.source, ip.destination) = (t.0, t.1);
    let step = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ip(IpHeaders::Ipv4(ip, Default::default()));
    let mut frame = Vec::new();
    if rw.tcp {
        let mut tcp = TcpHeader::new(t.2, t.3, 7, 512);
        tcp.ack = true;
        step.tcp_header(tcp).write(&mut frame, &rw.payload)
    } else {
        step.udp(t.2, t.3).write(&mut frame, &rw.payload)
    }
    .expect("build");
    frame
}

#[test]
fn fuzz_csum_transport_rewrites_match_etherparse() {
    let strategy = (
        any::<bool>(),
        ipv4_header(),
        tuple(),
        tuple(),
        1u8..16,
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    )
        .prop_map(
            |(tcp, header, from, to, mask, payload, zero_udp_check)| L4Rewrite {
                tcp,
                header,
                from,
                to,
                mask,
                payload,
                zero_udp_check,
            },
        );
    fuzz_harness::check("csum_transport", strategy, |rw| {
        let to = (
            if rw.mask & 1 != 0 { rw.to.0 } else { rw.from.0 },
            if rw.mask & 2 != 0 { rw.to.1 } else { rw.from.1 },
            if rw.mask & 4 != 0 { rw.to.2 } else { rw.from.2 },
            if rw.mask & 8 != 0 { rw.to.3 } else { rw.from.3 },
        );
        let mut frame = build_l4(&rw, rw.from);
        let ip = 14;
        let l4 = ip + rw.header.header_len();
        let check_off = l4 + if rw.tcp { 16 } else { 6 };
        let no_udp_check = !rw.tcp && rw.zero_udp_check;
        if no_udp_check {
            frame[check_off..check_off + 2].fill(0);
        }
        let mut ip_check = read16(&frame, ip + 10);
        let mut l4_check = read16(&frame, check_off);
        for (off, new) in [(ip + 12, to.0), (ip + 16, to.1)] {
            let (old, new) = (read32(&frame, off), u32::from_ne_bytes(new));
            ip_check = csum::replace_u32(ip_check, old, new);
            l4_check = if rw.tcp {
                csum::replace_u32(l4_check, old, new)
            } else {
                csum::udp_replace_u32(l4_check, old, new)
            };
            frame[off..off + 4].copy_from_slice(&new.to_ne_bytes());
        }
        for (off, new) in [(l4, to.2), (l4 + 2, to.3)] {
            let (old, new) = (read16(&frame, off), u16::from_ne_bytes(new.to_be_bytes()));
            l4_check = if rw.tcp {
                csum::replace_u16(l4_check, old, new)
            } else {
                csum::udp_replace_u16(l4_check, old, new)
            };
            frame[off..off + 2].copy_from_slice(&new.to_ne_bytes());
        }
        frame[ip + 10..ip + 12].copy_from_slice(&ip_check.to_ne_bytes());
        frame[check_off..check_off + 2].copy_from_slice(&l4_check.to_ne_bytes());

        let mut expected = build_l4(&rw, to);
        if no_udp_check {
            expected[check_off..check_off + 2].fill(0);
        }
        prop_assert_eq!(
            &frame,
            &expected,
            "rewritten frame differs from etherparse's"
        );
        let headers = PacketHeaders::from_ethernet_slice(&frame).expect("parses");
        let Some(NetHeaders::Ipv4(h, _)) = &headers.net else {
            return Err(TestCaseError::fail("no IPv4"));
        };
        prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
        match &headers.transport {
            Some(TransportHeader::Tcp(t)) => prop_assert_eq!(
                t.checksum,
                t.calc_checksum_ipv4(h, headers.payload.slice())
                    .expect("fits")
            ),
            Some(TransportHeader::Udp(u)) if no_udp_check => prop_assert_eq!(u.checksum, 0),
            Some(TransportHeader::Udp(u)) => prop_assert_eq!(
                u.checksum,
                u.calc_checksum_ipv4(h, headers.payload.slice())
                    .expect("fits")
            ),
            other => prop_assert!(false, "unexpected transport {other:?}"),
        }
        Ok(())
    });
}

#[test]
fn fuzz_csum_udp_zero_rules() {
    let strategy = (
        prop_oneof![Just(0u16), Just(0xffff), any::<u16>()],
        any::<u32>(),
        any::<u32>(),
    );
    fuzz_harness::check("csum_udp_zero_rules", strategy, |(check, old, new)| {
        let (old16, new16) = (old as u16, new as u16);
        if check == 0 {
            prop_assert_eq!(csum::udp_replace_u16(0, old16, new16), 0);
            prop_assert_eq!(csum::udp_replace_u32(0, old, new), 0);
        } else {
            let plain16 = csum::replace_u16(check, old16, new16);
            let plain32 = csum::replace_u32(check, old, new);
            let udp16 = csum::udp_replace_u16(check, old16, new16);
            let udp32 = csum::udp_replace_u32(check, old, new);
            prop_assert_eq!(udp16, if plain16 == 0 { 0xffff } else { plain16 });
            prop_assert_eq!(udp32, if plain32 == 0 { 0xffff } else { plain32 });
        }
        Ok(())
    });
}
