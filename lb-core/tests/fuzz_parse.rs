//! Fuzz target `parse`: `lb_core::parse::parse` and `parse_icmp_quote` on arbitrary bytes and
//! on mutations of valid frames built with etherparse (see `docs/fuzzing.md`).
//!
//! Properties:
//! - never a panic; every offset reported lies inside the frame; every field reported is the
//!   bytes at that offset;
//! - the outcome equals an oracle made of etherparse's own per-layer parsers and the documented
//!   rules of `lb_core::parse` (at most one 802.1Q/802.1ad tag, UDP length field within the payload,
//!   ICMP needs 8 bytes): NotIpv4 / Truncated / Malformed, and for IPv4 the L4 verdict, ports,
//!   flags, ICMP type and code;
//! - whenever `parse` reports TCP or UDP, etherparse's whole-packet parser (`SlicedPacket`)
//!   reads the same ports: a header etherparse finds invalid or cut short is never a TCP packet;
//! - a TCP data offset below 5 or past the IP payload is `L4::Truncated`;
//! - `parse_icmp_quote` is valid exactly when the quoted IPv4 header (no options, TCP or UDP)
//!   and 8 transport bytes lie inside the frame, and then reports what they say.

mod fuzz_harness;

use etherparse::{
    Ethernet2HeaderSlice, IcmpEchoHeader, Icmpv4Slice, Icmpv4Type, IpHeaders, IpNumber, Ipv4Header,
    Ipv4HeaderSlice, Ipv4Options, Ipv4Slice, LaxSlicedPacket, PacketBuilder, SingleVlanHeaderSlice,
    SlicedPacket, TcpHeader, TcpSlice, TransportSlice, UdpHeaderSlice, err,
};
use lb_core::parse::{L4, NonLinearFrame, Outcome, Parsed, SliceFrame, parse, parse_icmp_quote};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

const ETH_P_IPV4: u16 = 0x0800;
const VLAN_TPIDS: [u16; 3] = [0x8100, 0x88a8, 0x9100];

fn parse_bytes(bytes: &[u8]) -> Parsed {
    let mut copy = bytes.to_vec();
    parse(&SliceFrame { bytes: &mut copy })
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

// ---------------------------------------------------------------------------------------------
// Frames: a description, built with etherparse, then mutated.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum L4Spec {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        options: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
    },
    /// Any protocol number with a raw payload (6, 17 and 1 included: random "headers").
    Raw {
        proto: u8,
    },
}

#[derive(Clone, Debug)]
struct FrameSpec {
    /// TPIDs of the VLAN tags in front of the IPv4 ethertype (0 to 2 of them).
    vlans: Vec<u16>,
    ip_options: Vec<u8>,
    /// The IPv4 flags + fragment offset word (mostly 0 or DF).
    frag: u16,
    src: [u8; 4],
    dst: [u8; 4],
    l4: L4Spec,
    payload: Vec<u8>,
}

/// Where the layers of a built frame start.
#[derive(Clone, Copy, Debug)]
struct Layout {
    l3_off: usize,
    l4_off: usize,
}

fn words(max_words: usize) -> impl Strategy<Value = Vec<u8>> {
    (0..=max_words).prop_flat_map(|n| proptest::collection::vec(any::<u8>(), 4 * n))
}

fn l4_spec() -> impl Strategy<Value = L4Spec> {
    prop_oneof![
        4 => (any::<u16>(), any::<u16>(), any::<u8>(), words(10)).prop_map(
            |(sport, dport, flags, options)| L4Spec::Tcp { sport, dport, flags, options }
        ),
        3 => (any::<u16>(), any::<u16>()).prop_map(|(sport, dport)| L4Spec::Udp { sport, dport }),
        2 => (prop_oneof![Just(0u8), Just(3), Just(8), Just(11), Just(13), any::<u8>()],
              any::<u8>(), any::<[u8; 4]>())
            .prop_map(|(icmp_type, code, rest)| L4Spec::Icmp { icmp_type, code, rest }),
        1 => prop_oneof![Just(1u8), Just(6), Just(17), Just(47), Just(51), Just(58), any::<u8>()]
            .prop_map(|proto| L4Spec::Raw { proto }),
    ]
}

fn frame_spec() -> impl Strategy<Value = FrameSpec> {
    (
        prop_oneof![
            4 => Just(Vec::new()),
            2 => proptest::sample::select(VLAN_TPIDS.to_vec()).prop_map(|t| vec![t]),
            1 => proptest::collection::vec(proptest::sample::select(VLAN_TPIDS.to_vec()), 2),
        ],
        prop_oneof![3 => Just(Vec::new()), 1 => words(10)],
        prop_oneof![
            4 => Just(0u16),
            2 => Just(0x4000u16),
            1 => Just(0x2000u16),
            1 => 1u16..0x2000,
            1 => any::<u16>(),
        ],
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        l4_spec(),
        proptest::collection::vec(any::<u8>(), 0..48),
    )
        .prop_map(
            |(vlans, ip_options, frag, src, dst, l4, payload)| FrameSpec {
                vlans,
                ip_options,
                frag,
                src,
                dst,
                l4,
                payload,
            },
        )
}

fn build(spec: &FrameSpec) -> (Vec<u8>, Layout) {
    let ip = Ipv4Header {
        source: spec.src,
        destination: spec.dst,
        time_to_live: 64,
        options: Ipv4Options::try_from(spec.ip_options.as_slice()).expect("<= 40 bytes, words"),
        ..Default::default()
    };
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let mut frame = Vec::new();
    match &spec.l4 {
        L4Spec::Tcp {
            sport,
            dport,
            flags,
            options,
        } => {
            let mut tcp = TcpHeader::new(*sport, *dport, 1000, 64240);
            tcp.fin = flags & 0x01 != 0;
            tcp.syn = flags & 0x02 != 0;
            tcp.rst = flags & 0x04 != 0;
            tcp.psh = flags & 0x08 != 0;
            tcp.ack = flags & 0x10 != 0;
            tcp.urg = flags & 0x20 != 0;
            tcp.ece = flags & 0x40 != 0;
            tcp.cwr = flags & 0x80 != 0;
            tcp.set_options_raw(options).expect("<= 40 bytes, words");
            eth.ip(IpHeaders::Ipv4(ip, Default::default()))
                .tcp_header(tcp)
                .write(&mut frame, &spec.payload)
        }
        L4Spec::Udp { sport, dport } => eth
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .udp(*sport, *dport)
            .write(&mut frame, &spec.payload),
        L4Spec::Icmp {
            icmp_type,
            code,
            rest,
        } => eth
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .icmpv4_raw(*icmp_type, *code, *rest)
            .write(&mut frame, &spec.payload),
        L4Spec::Raw { proto } => {
            let mut ip = ip;
            ip.protocol = IpNumber(*proto);
            ip.set_payload_len(spec.payload.len()).expect("small");
            ip.header_checksum = ip.calc_header_checksum();
            frame.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
            frame.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
            ip.write(&mut frame).expect("write");
            frame.extend_from_slice(&spec.payload);
            Ok(())
        }
    }
    .expect("build");
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[14 + 6..14 + 8].copy_from_slice(&spec.frag.to_be_bytes());
    let mut tags = Vec::new();
    for (i, tpid) in spec.vlans.iter().enumerate() {
        tags.extend_from_slice(&tpid.to_be_bytes());
        tags.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    frame.splice(12..12, tags);
    let l3_off = 14 + 4 * spec.vlans.len();
    (
        frame,
        Layout {
            l3_off,
            l4_off: l3_off + ihl,
        },
    )
}

#[derive(Clone, Debug)]
enum Mutation {
    Truncate(Index),
    FlipBit(Index, u8),
    SetByte(Index, u8),
    /// IPv4 IHL nibble.
    Ihl(u8),
    /// IPv4 total length, as an offset from the current one.
    TotalLen(i16),
    /// TCP data offset nibble (at `l4_off + 12`).
    DataOffset(u8),
    /// IPv4 flags and fragment offset.
    Frag(u16),
    Proto(u8),
    /// Bytes appended (Ethernet padding, or more than the IP length claims).
    Pad(Vec<u8>),
    /// The outermost ethertype / TPID.
    Ethertype(u16),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => any::<Index>().prop_map(Mutation::Truncate),
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        2 => (0u8..16).prop_map(Mutation::Ihl),
        2 => (-64i16..64).prop_map(Mutation::TotalLen),
        3 => (0u8..16).prop_map(Mutation::DataOffset),
        1 => any::<u16>().prop_map(Mutation::Frag),
        1 => prop_oneof![Just(1u8), Just(6), Just(17), any::<u8>()].prop_map(Mutation::Proto),
        1 => proptest::collection::vec(any::<u8>(), 1..24).prop_map(Mutation::Pad),
        1 => prop_oneof![
            Just(0x0800u16), Just(0x8100), Just(0x88a8), Just(0x9100), Just(0x86dd), Just(0x0806)
        ].prop_map(Mutation::Ethertype),
    ]
}

fn set_byte(frame: &mut [u8], off: usize, f: impl FnOnce(u8) -> u8) {
    if let Some(b) = frame.get_mut(off) {
        *b = f(*b);
    }
}

fn apply(frame: &mut Vec<u8>, layout: Layout, m: &Mutation) {
    let ip = layout.l3_off;
    match m {
        Mutation::Truncate(i) => {
            let at = i.index(frame.len() + 1);
            frame.truncate(at);
        }
        Mutation::FlipBit(i, bit) if !frame.is_empty() => {
            let at = i.index(frame.len());
            frame[at] ^= 1 << bit;
        }
        Mutation::SetByte(i, v) if !frame.is_empty() => {
            let at = i.index(frame.len());
            frame[at] = *v;
        }
        Mutation::FlipBit(..) | Mutation::SetByte(..) => {}
        Mutation::Ihl(ihl) => set_byte(frame, ip, |b| (b & 0xf0) | ihl),
        Mutation::TotalLen(delta) => {
            if frame.len() >= ip + 4 {
                let v = be16(frame, ip + 2).wrapping_add_signed(*delta);
                frame[ip + 2..ip + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        Mutation::DataOffset(words) => {
            set_byte(frame, layout.l4_off + 12, |b| (words << 4) | (b & 0x0f))
        }
        Mutation::Frag(v) => {
            if frame.len() >= ip + 8 {
                frame[ip + 6..ip + 8].copy_from_slice(&v.to_be_bytes());
            }
        }
        Mutation::Proto(p) => set_byte(frame, ip + 9, |_| *p),
        Mutation::Pad(bytes) => frame.extend_from_slice(bytes),
        Mutation::Ethertype(t) => {
            if frame.len() >= 14 {
                frame[12..14].copy_from_slice(&t.to_be_bytes());
            }
        }
    }
}

fn mutated_frame() -> impl Strategy<Value = (FrameSpec, Vec<Mutation>)> {
    (
        frame_spec(),
        prop_oneof![
            1 => Just(Vec::new()),
            4 => proptest::collection::vec(mutation(), 1..4),
        ],
    )
}

fn materialise(spec: &FrameSpec, mutations: &[Mutation]) -> Vec<u8> {
    let (mut frame, layout) = build(spec);
    for m in mutations {
        apply(&mut frame, layout, m);
    }
    frame
}

/// Arbitrary bytes, half of them behind a plausible Ethernet (+ VLAN) and IPv4 start so the
/// parser gets past its first checks.
fn raw_frame() -> impl Strategy<Value = Vec<u8>> {
    let prefix = (
        any::<[u8; 12]>(),
        prop_oneof![
            Just(vec![0x08, 0x00]),
            Just(vec![0x81, 0x00, 0x00, 0x64, 0x08, 0x00]),
            Just(vec![0x88, 0xa8, 0x00, 0x64, 0x08, 0x00]),
            Just(vec![
                0x88, 0xa8, 0x00, 0x64, 0x81, 0x00, 0x00, 0x65, 0x08, 0x00
            ]),
            proptest::collection::vec(any::<u8>(), 2),
        ],
        prop_oneof![Just(0x45u8), 0x40u8..0x50, any::<u8>()],
    )
        .prop_map(|(macs, ethertype, vihl)| {
            let mut v = macs.to_vec();
            v.extend(ethertype);
            v.push(vihl);
            v
        });
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..96),
        (
            prefix,
            proptest::collection::vec(any::<u8>(), 0..96),
            prop_oneof![Just(None), any::<Index>().prop_map(Some)],
        )
            .prop_map(|(mut p, rest, total_len)| {
                let l3_off = p.len() - 1;
                p.extend(rest);
                // Often a total length that fits the frame, so the transport header is reached.
                if let Some(i) = total_len
                    && p.len() >= l3_off + 4
                {
                    let len = i.index(p.len() - l3_off + 1) as u16;
                    p[l3_off + 2..l3_off + 4].copy_from_slice(&len.to_be_bytes());
                }
                p
            }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The checks.
// ---------------------------------------------------------------------------------------------

/// What `parse` must say about a frame, from etherparse's per-layer parsers and the rules of
/// `lb_core::parse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    NotIpv4,
    /// Recognised as IPv6 and left to `parse6`.
    Ipv6,
    Truncated,
    Malformed,
    Ipv4 {
        l3_off: usize,
        l4_off: usize,
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        total_len: u16,
        l4: ExpectL4,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExpectL4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    Icmp { icmp_type: u8, code: u8 },
    Fragment,
    Truncated,
    Other,
}

fn oracle(bytes: &[u8]) -> Expect {
    let Ok(eth) = Ethernet2HeaderSlice::from_slice(bytes) else {
        return Expect::Truncated;
    };
    let mut ethertype = eth.ether_type().0;
    let mut l3_off = 14;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        // One tag only (documented); a second tag's TPID is just another ethertype.
        let Ok(tag) = SingleVlanHeaderSlice::from_slice(&bytes[14..]) else {
            return Expect::Truncated;
        };
        ethertype = tag.ether_type().0;
        l3_off = 18;
    }
    if ethertype == 0x86dd {
        return Expect::Ipv6;
    }
    if ethertype != ETH_P_IPV4 {
        return Expect::NotIpv4;
    }
    let mut ip_bytes = bytes[l3_off..].to_vec();
    if ip_bytes.len() < 20 {
        return Expect::Truncated;
    }
    // etherparse walks an IPv4 authentication header (protocol 51); the load balancer treats
    // it as any other protocol. Show etherparse an unassigned protocol number instead.
    let proto = ip_bytes[9];
    if proto == 51 {
        ip_bytes[9] = 253;
    }
    let ip = match Ipv4Slice::from_slice(&ip_bytes) {
        Ok(ip) => ip,
        Err(_) => return Expect::Malformed,
    };
    let header = ip.header();
    let payload = ip.payload();
    let l4 = if payload.fragmented {
        ExpectL4::Fragment
    } else {
        let p = payload.payload;
        match proto {
            6 => match TcpSlice::from_slice(p) {
                Ok(tcp) => ExpectL4::Tcp {
                    sport: tcp.source_port(),
                    dport: tcp.destination_port(),
                    flags: tcp.header_slice()[13],
                },
                Err(_) => ExpectL4::Truncated,
            },
            // The UDP length field must cover the header and stay inside the IP payload (a
            // shorter datagram leaves padding, which is fine).
            17 => match UdpHeaderSlice::from_slice(p) {
                Ok(udp) if udp.length() < 8 || usize::from(udp.length()) > p.len() => {
                    ExpectL4::Truncated
                }
                Ok(udp) => ExpectL4::Udp {
                    sport: udp.source_port(),
                    dport: udp.destination_port(),
                },
                Err(_) => ExpectL4::Truncated,
            },
            // Neither are type-specific ICMP lengths (etherparse checks timestamps').
            1 => match Icmpv4Slice::from_slice(p) {
                Ok(icmp) => ExpectL4::Icmp {
                    icmp_type: icmp.type_u8(),
                    code: icmp.code_u8(),
                },
                Err(e) if e.layer != err::Layer::Icmpv4 && p.len() >= 8 => ExpectL4::Icmp {
                    icmp_type: p[0],
                    code: p[1],
                },
                Err(_) => ExpectL4::Truncated,
            },
            _ => ExpectL4::Other,
        }
    };
    Expect::Ipv4 {
        l3_off,
        l4_off: l3_off + header.slice().len(),
        src: header.source(),
        dst: header.destination(),
        proto,
        total_len: header.total_len(),
        l4,
    }
}

/// What `parse` said, in the oracle's terms.
fn observed(p: &Parsed) -> Expect {
    match p.outcome {
        Outcome::NotIpv4 => Expect::NotIpv4,
        Outcome::Ipv6 => Expect::Ipv6,
        Outcome::Truncated => Expect::Truncated,
        Outcome::Malformed => Expect::Malformed,
        Outcome::Ipv4 => {
            let q = &p.packet;
            let l4 = match q.l4 {
                L4::Tcp => ExpectL4::Tcp {
                    sport: u16::from_be(q.src_port_be),
                    dport: u16::from_be(q.dst_port_be),
                    flags: q.tcp_flags,
                },
                L4::Udp => ExpectL4::Udp {
                    sport: u16::from_be(q.src_port_be),
                    dport: u16::from_be(q.dst_port_be),
                },
                L4::Icmp => ExpectL4::Icmp {
                    icmp_type: q.icmp_type,
                    code: q.icmp_code,
                },
                L4::Fragment => ExpectL4::Fragment,
                L4::Truncated => ExpectL4::Truncated,
                L4::Other => ExpectL4::Other,
                L4::ExtLimit => unreachable!("only parse6 walks extension headers"),
            };
            Expect::Ipv4 {
                l3_off: q.l3_off,
                l4_off: q.l4_off,
                src: q.src.to_ne_bytes(),
                dst: q.dst.to_ne_bytes(),
                proto: q.proto,
                total_len: q.total_len,
                l4,
            }
        }
    }
}

/// Offsets inside the frame, fields equal to the bytes they come from, zeros where a field does
/// not apply.
fn check_invariants(bytes: &[u8], p: &Parsed) -> Result<(), TestCaseError> {
    let Some(q) = p.ipv4() else {
        prop_assert_eq!(
            p.packet,
            Default::default(),
            "a frame that is not IPv4 reports no packet fields"
        );
        return Ok(());
    };
    prop_assert!(q.l3_off == 14 || q.l3_off == 18, "l3_off {}", q.l3_off);
    let ip_end = q.l3_off + usize::from(q.total_len);
    prop_assert!(
        q.l3_off + 20 <= q.l4_off && q.l4_off <= ip_end && ip_end <= bytes.len(),
        "l3_off {} l4_off {} ip_end {ip_end} frame {}",
        q.l3_off,
        q.l4_off,
        bytes.len()
    );
    let ip = &bytes[q.l3_off..];
    prop_assert_eq!(q.l4_off - q.l3_off, usize::from(ip[0] & 0x0f) * 4);
    prop_assert_eq!(q.has_options, ip[0] & 0x0f > 5);
    prop_assert_eq!(q.proto, ip[9]);
    prop_assert_eq!(q.total_len, be16(ip, 2));
    prop_assert_eq!(q.src.to_ne_bytes(), [ip[12], ip[13], ip[14], ip[15]]);
    prop_assert_eq!(q.dst.to_ne_bytes(), [ip[16], ip[17], ip[18], ip[19]]);
    let l4 = &bytes[q.l4_off..ip_end];
    let ports_read = matches!(q.l4, L4::Tcp | L4::Udp);
    if ports_read {
        prop_assert_eq!(q.src_port_be, u16::from_ne_bytes([l4[0], l4[1]]));
        prop_assert_eq!(q.dst_port_be, u16::from_ne_bytes([l4[2], l4[3]]));
    } else {
        prop_assert_eq!(
            (q.src_port_be, q.dst_port_be),
            (0, 0),
            "no ports for {:?}",
            q.l4
        );
    }
    match q.l4 {
        L4::Tcp => {
            let hlen = usize::from(l4[12] >> 4) * 4;
            prop_assert!(
                hlen >= 20 && hlen <= l4.len(),
                "TCP header of {hlen} bytes in {} bytes of IP payload",
                l4.len()
            );
            prop_assert_eq!(q.tcp_flags, l4[13]);
            prop_assert_eq!(usize::from(q.tcp_hlen), hlen);
        }
        L4::Udp => prop_assert!(l4.len() >= 8),
        L4::Icmp => {
            prop_assert!(l4.len() >= 8);
            prop_assert_eq!((q.icmp_type, q.icmp_code), (l4[0], l4[1]));
        }
        _ => {}
    }
    if q.l4 != L4::Tcp {
        prop_assert_eq!((q.tcp_flags, q.tcp_hlen), (0, 0));
    }
    if q.l4 != L4::Icmp {
        prop_assert_eq!((q.icmp_type, q.icmp_code), (0, 0));
    }
    Ok(())
}

/// When `parse` reports TCP or UDP, etherparse's whole-packet parser agrees on the ports. UDP
/// falls back to etherparse's lax parser when only the UDP length field is off (`parse` accepts a
/// length shorter than the payload, the rest being padding).
fn check_against_sliced_packet(bytes: &[u8], p: &Parsed) -> Result<(), TestCaseError> {
    let Some(q) = p.ipv4() else { return Ok(()) };
    let ports = (u16::from_be(q.src_port_be), u16::from_be(q.dst_port_be));
    match q.l4 {
        L4::Tcp => match SlicedPacket::from_ethernet(bytes) {
            Ok(SlicedPacket {
                transport: Some(TransportSlice::Tcp(tcp)),
                ..
            }) => prop_assert_eq!(ports, (tcp.source_port(), tcp.destination_port())),
            other => prop_assert!(
                false,
                "parse reports TCP {ports:?}, etherparse says {other:?}"
            ),
        },
        L4::Udp => {
            let strict = SlicedPacket::from_ethernet(bytes);
            let udp_len_only = matches!(
                &strict,
                Err(err::packet::SliceError::Len(e))
                    if e.layer == err::Layer::UdpPayload
                        || e.len_source == etherparse::LenSource::UdpHeaderLen
            );
            let seen = match &strict {
                Ok(SlicedPacket {
                    transport: Some(TransportSlice::Udp(udp)),
                    ..
                }) => Some((udp.source_port(), udp.destination_port())),
                _ if udp_len_only => match LaxSlicedPacket::from_ethernet(bytes) {
                    Ok(LaxSlicedPacket {
                        transport: Some(TransportSlice::Udp(udp)),
                        ..
                    }) => Some((udp.source_port(), udp.destination_port())),
                    _ => None,
                },
                _ => None,
            };
            prop_assert_eq!(
                Some(ports),
                seen,
                "parse reports UDP, etherparse says {:?}",
                strict
            );
        }
        _ => {}
    }
    Ok(())
}

fn check_frame(bytes: &[u8]) -> Result<(), TestCaseError> {
    let parsed = parse_bytes(bytes);
    check_invariants(bytes, &parsed)?;
    prop_assert_eq!(observed(&parsed), oracle(bytes), "frame {:02x?}", bytes);
    check_against_sliced_packet(bytes, &parsed)
}

#[test]
fn fuzz_parse_arbitrary_bytes() {
    fuzz_harness::check("parse_arbitrary_bytes", raw_frame(), |bytes| {
        check_frame(&bytes)
    });
}

#[test]
fn fuzz_parse_mutated_frames() {
    fuzz_harness::check(
        "parse_mutated_frames",
        mutated_frame(),
        |(spec, mutations)| check_frame(&materialise(&spec, &mutations)),
    );
}

/// Unmutated frames: every valid frame with at most one tag parses completely, ports and all.
#[test]
fn fuzz_parse_valid_frames() {
    fuzz_harness::check("parse_valid_frames", frame_spec(), |spec| {
        let (frame, layout) = build(&spec);
        check_frame(&frame)?;
        let parsed = parse_bytes(&frame);
        let one_tag = match spec.vlans.as_slice() {
            [] => true,
            [t] => *t != 0x9100,
            _ => false,
        };
        if !one_tag {
            prop_assert_eq!(parsed.outcome, Outcome::NotIpv4);
            return Ok(());
        }
        let q = parsed.ipv4().expect("a valid frame is IPv4");
        prop_assert_eq!((q.l3_off, q.l4_off), (layout.l3_off, layout.l4_off));
        let expected = if spec.frag & 0x3fff != 0 {
            L4::Fragment
        } else {
            match spec.l4 {
                L4Spec::Tcp { .. } => L4::Tcp,
                L4Spec::Udp { .. } => L4::Udp,
                L4Spec::Icmp { .. } => L4::Icmp,
                L4Spec::Raw { .. } => q.l4,
            }
        };
        prop_assert_eq!(q.l4, expected);
        Ok(())
    });
}

/// A TCP header's data offset is part of the header: below 5 words or past the IP payload, the
/// header is cut short (`L4::Truncated`), whatever the first 20 bytes say.
///
/// Fails on an lb-core without the data-offset check (before commit 8377281, which reports
/// such headers as `L4::Truncated`); see `regression_tcp_data_offset_15`.
#[test]
fn fuzz_parse_tcp_data_offset() {
    let strategy = (frame_spec(), words(10), 0u8..16).prop_map(|(mut spec, options, d)| {
        spec.frag = 0;
        spec.vlans.retain(|t| *t != 0x9100);
        spec.vlans.truncate(1);
        let (sport, dport, flags) = match spec.l4 {
            L4Spec::Tcp {
                sport,
                dport,
                flags,
                ..
            } => (sport, dport, flags),
            _ => (40000, 80, 0x02),
        };
        spec.l4 = L4Spec::Tcp {
            sport,
            dport,
            flags,
            options,
        };
        (spec, d)
    });
    fuzz_harness::check("parse_tcp_data_offset", strategy, |(spec, words)| {
        let (mut frame, layout) = build(&spec);
        apply(&mut frame, layout, &Mutation::DataOffset(words));
        let parsed = parse_bytes(&frame);
        let q = parsed.ipv4().expect("IPv4");
        let segment = usize::from(q.total_len) - (q.l4_off - q.l3_off);
        let whole = words >= 5 && usize::from(words) * 4 <= segment;
        let want = if whole { L4::Tcp } else { L4::Truncated };
        prop_assert_eq!(
            q.l4,
            want,
            "data offset {} in a {}-byte segment",
            words,
            segment
        );
        check_frame(&frame)
    });
}

/// The minimized input of the data-offset bug: a SYN whose data offset is 15 (60 bytes of
/// header) with 20 bytes of TCP on the wire and nothing after. Reported as a well-formed TCP
/// packet by lb-core before commit 8377281.
#[test]
fn regression_tcp_data_offset_15() {
    let spec = FrameSpec {
        vlans: Vec::new(),
        ip_options: Vec::new(),
        frag: 0,
        src: [198, 18, 0, 1],
        dst: [198, 18, 100, 1],
        l4: L4Spec::Tcp {
            sport: 40000,
            dport: 80,
            flags: 0x02,
            options: Vec::new(),
        },
        payload: Vec::new(),
    };
    let frame = materialise(&spec, &[Mutation::DataOffset(15)]);
    assert_eq!(frame.len(), 14 + 20 + 20);
    let parsed = parse_bytes(&frame);
    assert_eq!(parsed.outcome, Outcome::Ipv4);
    assert_eq!(parsed.packet.l4, L4::Truncated);
    assert!(
        SlicedPacket::from_ethernet(&frame).is_err(),
        "etherparse refuses it too"
    );
}

/// How many leading bytes the linear parse of a frame read (what a tc program must have pulled
/// into the linear area for the non-linear parse to see the same).
fn headers_end(p: &Parsed) -> usize {
    match p.outcome {
        Outcome::Truncated => 0,
        Outcome::NotIpv4 | Outcome::Ipv6 => 18,
        Outcome::Malformed => 18 + 20,
        Outcome::Ipv4 => {
            let q = &p.packet;
            q.l4_off
                + match q.l4 {
                    L4::Tcp => 20,
                    L4::Udp | L4::Icmp => 8,
                    L4::Fragment | L4::Truncated | L4::Other | L4::ExtLimit => 0,
                }
        }
    }
}

/// A non-linear packet (only `linear` bytes readable, the rest paged) parses exactly like the
/// whole packet once its headers are in the linear area, and never more successfully before:
/// a header the linear area cuts is reported truncated, not guessed.
#[test]
fn fuzz_parse_non_linear() {
    let strategy = (mutated_frame(), any::<Index>());
    fuzz_harness::check(
        "parse_non_linear",
        strategy,
        |((spec, mutations), split)| {
            let frame = materialise(&spec, &mutations);
            let full = parse_bytes(&frame);
            let k = split.index(frame.len() + 1);
            let mut linear = frame[..k].to_vec();
            let nl = parse(&NonLinearFrame {
                linear: &mut linear,
                len: frame.len(),
            });
            if k >= headers_end(&full).min(frame.len()) {
                prop_assert_eq!(nl, full, "linear part of {} bytes", k);
            }
            if let Some(q) = nl.ipv4() {
                let f = full.ipv4().expect("the whole packet is IPv4 too");
                prop_assert_eq!(
                    (q.l3_off, q.l4_off, q.src, q.dst, q.proto, q.total_len),
                    (f.l3_off, f.l4_off, f.src, f.dst, f.proto, f.total_len)
                );
                if q.l4 != L4::Truncated {
                    prop_assert_eq!(nl, full, "linear part of {} bytes", k);
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// ICMP quotes.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct QuoteSpec {
    icmp_type: u8,
    inner: FrameSpec,
    /// Bytes of the inner packet quoted (from its IPv4 header on).
    quoted: Index,
    mutations: Vec<Mutation>,
    /// Where the caller says the ICMP header is, relative to the real one.
    icmp_off_delta: i8,
}

fn quote_spec() -> impl Strategy<Value = QuoteSpec> {
    (
        prop_oneof![Just(3u8), Just(11), Just(12), any::<u8>()],
        frame_spec(),
        any::<Index>(),
        proptest::collection::vec(mutation(), 0..3),
        prop_oneof![4 => Just(0i8), 1 => -12i8..12],
    )
        .prop_map(
            |(icmp_type, inner, quoted, mutations, icmp_off_delta)| QuoteSpec {
                icmp_type,
                inner,
                quoted,
                mutations,
                icmp_off_delta,
            },
        )
}

fn build_icmp_error(spec: &QuoteSpec) -> (Vec<u8>, usize) {
    let mut inner = spec.inner.clone();
    inner.vlans.clear();
    let (inner_frame, _) = build(&inner);
    let ip = &inner_frame[14..];
    let quote = &ip[..spec.quoted.index(ip.len().min(68) + 1)];
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 3], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 1, 254], [198, 18, 1, 1], 64)
        .icmpv4_raw(spec.icmp_type, 4, [0, 0, 5, 120]);
    let mut frame = Vec::new();
    builder.write(&mut frame, quote).expect("build");
    let layout = Layout {
        l3_off: 14,
        l4_off: 34,
    };
    for m in &spec.mutations {
        apply(&mut frame, layout, m);
    }
    (frame, 34)
}

#[test]
fn fuzz_parse_icmp_quote() {
    fuzz_harness::check("parse_icmp_quote", quote_spec(), |spec| {
        let (frame, icmp_off) = build_icmp_error(&spec);
        check_frame(&frame)?;
        let icmp_off = icmp_off.saturating_add_signed(isize::from(spec.icmp_off_delta));
        let mut copy = frame.clone();
        let quote = parse_icmp_quote(&SliceFrame { bytes: &mut copy }, icmp_off);
        let l3 = icmp_off + 8;
        let l4 = l3 + 20;
        let readable = l4 + 8 <= frame.len();
        let header_ok =
            l3 + 20 <= frame.len() && frame[l3] == 0x45 && matches!(frame[l3 + 9], 6 | 17);
        prop_assert_eq!(quote.valid, readable && header_ok, "quote at {}", icmp_off);
        if quote.valid {
            prop_assert_eq!(lb_core::parse::quote_offsets(icmp_off), (l3, l4));
            let ip = Ipv4HeaderSlice::from_slice(&frame[l3..]).expect("etherparse reads it");
            prop_assert_eq!(quote.src.to_ne_bytes(), ip.source());
            prop_assert_eq!(quote.dst.to_ne_bytes(), ip.destination());
            prop_assert_eq!(quote.proto, ip.protocol().0);
            prop_assert_eq!(u16::from_be(quote.src_port_be), be16(&frame, l4));
            prop_assert_eq!(u16::from_be(quote.dst_port_be), be16(&frame, l4 + 2));
        } else {
            prop_assert_eq!((quote.src_port_be, quote.dst_port_be), (0, 0));
        }
        Ok(())
    });
}

/// Sanity of the oracle itself on a known frame (an echo request): etherparse's typed view
/// agrees with the raw bytes the oracle uses.
#[test]
fn oracle_reads_an_echo_request() {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 1], [198, 18, 100, 1], 64)
        .icmpv4_echo_request(7, 1);
    let mut frame = Vec::new();
    builder.write(&mut frame, b"ping").expect("build");
    let sliced = SlicedPacket::from_ethernet(&frame).expect("valid");
    let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else {
        panic!("not ICMP");
    };
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 7, seq: 1 })
    );
    assert_eq!(
        oracle(&frame),
        observed(&parse_bytes(&frame)),
        "echo request"
    );
    check_frame(&frame).expect("consistent");
}
