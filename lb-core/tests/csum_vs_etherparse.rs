//! Cross-checks `lb_core::csum`'s incremental updates against etherparse's from-scratch
//! checksums: random TCP/UDP frames are rewritten in place the way the XDP program does it
//! (addresses and ports, checksums patched incrementally), then compared with a frame that
//! etherparse serialised directly with the new addresses and ports.

use etherparse::{
    IpFragOffset, IpHeaders, Ipv4Dscp, Ipv4Ecn, Ipv4Header, Ipv4Options, NetHeaders, PacketBuilder,
    PacketHeaders, TcpHeader, TransportHeader, ip_number,
};
use lb_core::csum;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ETH_LEN: usize = 14;
const IPV4_CHECK: usize = 10;
const IPV4_SRC: usize = 12;
const IPV4_DST: usize = 16;
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// Addresses and ports of one side of a rewrite.
#[derive(Clone, Copy, Debug)]
struct Tuple {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
}

impl Tuple {
    fn random(rng: &mut StdRng) -> Tuple {
        Tuple {
            src: rng.r#gen(),
            dst: rng.r#gen(),
            sport: rng.r#gen(),
            dport: rng.r#gen(),
        }
    }
}

/// Everything about a frame except its tuple, so the same frame can be serialised before and
/// after the rewrite.
#[derive(Clone, Debug)]
struct Template {
    proto: Proto,
    ip: Ipv4Header,
    tcp: TcpHeader,
    payload: Vec<u8>,
}

impl Template {
    fn random(rng: &mut StdRng, proto: Proto) -> Template {
        // IP options vary the header length, so the rewrite must find the L4 header itself.
        let ip_options: Vec<u8> = (0..4 * rng.gen_range(0..=10))
            .map(|_| rng.r#gen())
            .collect();
        let ip = Ipv4Header {
            dscp: Ipv4Dscp::try_new(rng.gen_range(0..=Ipv4Dscp::MAX_U8)).expect("in range"),
            ecn: Ipv4Ecn::try_new(rng.gen_range(0..=Ipv4Ecn::MAX_U8)).expect("in range"),
            identification: rng.r#gen(),
            dont_fragment: rng.r#gen(),
            more_fragments: false,
            fragment_offset: IpFragOffset::ZERO,
            time_to_live: rng.gen_range(1..=255),
            options: Ipv4Options::try_from(ip_options.as_slice()).expect("multiple of 4, <= 40"),
            ..Default::default()
        };
        let mut tcp = TcpHeader::new(0, 0, rng.r#gen(), rng.r#gen());
        let flags: u8 = rng.r#gen();
        tcp.fin = flags & 0x01 != 0;
        tcp.syn = flags & 0x02 != 0;
        tcp.rst = flags & 0x04 != 0;
        tcp.psh = flags & 0x08 != 0;
        tcp.ack = flags & 0x10 != 0;
        tcp.urg = flags & 0x20 != 0;
        tcp.ece = flags & 0x40 != 0;
        tcp.cwr = flags & 0x80 != 0;
        tcp.acknowledgment_number = rng.r#gen();
        tcp.urgent_pointer = rng.r#gen();
        let tcp_options: Vec<u8> = (0..4 * rng.gen_range(0..=10))
            .map(|_| rng.r#gen())
            .collect();
        tcp.set_options_raw(&tcp_options)
            .expect("multiple of 4, <= 40");
        // Odd and even lengths: an odd payload ends in a zero-padded word.
        let len = rng.gen_range(0..=1400);
        let payload = (0..len).map(|_| rng.r#gen()).collect();
        Template {
            proto,
            ip,
            tcp,
            payload,
        }
    }

    /// The frame etherparse serialises for this template and tuple, checksums computed from
    /// scratch.
    fn build(&self, t: Tuple) -> Vec<u8> {
        let mut ip = self.ip.clone();
        ip.source = t.src;
        ip.destination = t.dst;
        let l3 = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ip(IpHeaders::Ipv4(ip, Default::default()));
        let mut frame = Vec::new();
        match self.proto {
            Proto::Tcp => {
                let mut tcp = self.tcp.clone();
                tcp.source_port = t.sport;
                tcp.destination_port = t.dport;
                l3.tcp_header(tcp).write(&mut frame, &self.payload)
            }
            Proto::Udp => l3.udp(t.sport, t.dport).write(&mut frame, &self.payload),
        }
        .expect("serialise");
        frame
    }

    fn l4_offset(&self) -> usize {
        ETH_LEN + self.ip.header_len()
    }

    fn l4_check_offset(&self) -> usize {
        self.l4_offset()
            + match self.proto {
                Proto::Tcp => TCP_CHECK,
                Proto::Udp => UDP_CHECK,
            }
    }
}

fn read16(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn read32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn write16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_ne_bytes());
}

fn write32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

/// Rewrites the tuple of an Ethernet/IPv4/TCP-or-UDP frame in place, patching the IPv4 and
/// L4 checksums incrementally, as the XDP program does. Offsets come from the frame itself.
fn rewrite(frame: &mut [u8], to: Tuple) {
    let ip = ETH_LEN;
    let l4 = ip + usize::from(frame[ip] & 0x0f) * 4;
    let udp = match frame[ip + 9] {
        6 => false,
        17 => true,
        p => panic!("unexpected protocol {p}"),
    };
    let l4_check_off = l4 + if udp { UDP_CHECK } else { TCP_CHECK };
    let mut ip_check = read16(frame, ip + IPV4_CHECK);
    let mut l4_check = read16(frame, l4_check_off);

    for (off, new) in [(ip + IPV4_SRC, to.src), (ip + IPV4_DST, to.dst)] {
        let old = read32(frame, off);
        let new = u32::from_ne_bytes(new);
        ip_check = csum::replace_u32(ip_check, old, new);
        // The addresses are part of the L4 pseudo-header.
        l4_check = if udp {
            csum::udp_replace_u32(l4_check, old, new)
        } else {
            csum::replace_u32(l4_check, old, new)
        };
        write32(frame, off, new);
    }
    for (off, new) in [(l4, to.sport), (l4 + 2, to.dport)] {
        let old = read16(frame, off);
        let new = u16::from_ne_bytes(new.to_be_bytes());
        l4_check = if udp {
            csum::udp_replace_u16(l4_check, old, new)
        } else {
            csum::replace_u16(l4_check, old, new)
        };
        write16(frame, off, new);
    }
    write16(frame, ip + IPV4_CHECK, ip_check);
    write16(frame, l4_check_off, l4_check);
}

/// Re-parses `frame` and checks its tuple and that both checksums equal what etherparse
/// computes from scratch. Returns the L4 checksum field (host order).
fn check_parsed(frame: &[u8], want: Tuple, context: &str) -> u16 {
    let headers = PacketHeaders::from_ethernet_slice(frame).expect("parse");
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        panic!("{context}: no IPv4 header");
    };
    assert_eq!(
        (ip.source, ip.destination),
        (want.src, want.dst),
        "{context}"
    );
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "{context}: IPv4 header checksum"
    );
    let payload = headers.payload.slice();
    match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            assert_eq!(
                (tcp.source_port, tcp.destination_port),
                (want.sport, want.dport)
            );
            let expected = tcp.calc_checksum_ipv4(ip, payload).expect("length fits");
            assert_eq!(tcp.checksum, expected, "{context}: TCP checksum");
            tcp.checksum
        }
        Some(TransportHeader::Udp(udp)) => {
            assert_eq!(
                (udp.source_port, udp.destination_port),
                (want.sport, want.dport)
            );
            let expected = udp.calc_checksum_ipv4(ip, payload).expect("length fits");
            assert_eq!(udp.checksum, expected, "{context}: UDP checksum");
            udp.checksum
        }
        other => panic!("{context}: unexpected transport {other:?}"),
    }
}

/// Builds `template` with `from`, rewrites it to `to`, and checks the result byte for byte
/// against etherparse's own serialisation with `to`, and field by field after re-parsing.
/// Returns the rewritten frame's L4 checksum.
fn rewrite_and_compare(template: &Template, from: Tuple, to: Tuple, context: &str) -> u16 {
    let mut frame = template.build(from);
    check_parsed(&frame, from, context);
    rewrite(&mut frame, to);
    let expected = template.build(to);
    assert_eq!(
        frame, expected,
        "{context}: frame differs from etherparse's"
    );
    check_parsed(&frame, to, context)
}

#[test]
fn random_tcp_and_udp_rewrites_match_etherparse() {
    let mut rng = StdRng::seed_from_u64(0x00c5_0001);
    for i in 0..4000 {
        let proto = if i % 2 == 0 { Proto::Tcp } else { Proto::Udp };
        let template = Template::random(&mut rng, proto);
        let from = Tuple::random(&mut rng);
        // Full-NAT rewrites all four fields; DNAT only the destination; the reply path only
        // the source. Cover each shape.
        let mut to = Tuple::random(&mut rng);
        match i % 3 {
            0 => {}
            1 => (to.src, to.sport) = (from.src, from.sport),
            _ => (to.dst, to.dport) = (from.dst, from.dport),
        }
        rewrite_and_compare(&template, from, to, &format!("case {i} {proto:?}"));
    }
}

#[test]
fn identity_rewrite_leaves_the_frame_unchanged() {
    let mut rng = StdRng::seed_from_u64(0x00c5_0002);
    for proto in [Proto::Tcp, Proto::Udp] {
        for _ in 0..100 {
            let template = Template::random(&mut rng, proto);
            let t = Tuple::random(&mut rng);
            let original = template.build(t);
            let mut frame = original.clone();
            rewrite(&mut frame, t);
            assert_eq!(frame, original);
        }
    }
}

#[test]
fn udp_without_checksum_stays_without_checksum() {
    // RFC 768: a zero UDP checksum means "none"; the helpers must not invent one.
    let mut rng = StdRng::seed_from_u64(0x00c5_0003);
    for i in 0..500 {
        let template = Template::random(&mut rng, Proto::Udp);
        let (from, to) = (Tuple::random(&mut rng), Tuple::random(&mut rng));
        let check_off = template.l4_check_offset();
        let mut frame = template.build(from);
        write16(&mut frame, check_off, 0);
        rewrite(&mut frame, to);
        let mut expected = template.build(to);
        write16(&mut expected, check_off, 0);
        assert_eq!(frame, expected, "case {i}");
        let headers = PacketHeaders::from_ethernet_slice(&frame).expect("parse");
        let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
            panic!("no IPv4 header");
        };
        assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "case {i}");
        let Some(TransportHeader::Udp(udp)) = &headers.transport else {
            panic!("no UDP header");
        };
        assert_eq!(udp.checksum, 0, "case {i}");
    }
}

/// A template whose frame, built with `target`, has a one's-complement sum of 0xffff over the
/// L4 checksum's coverage, i.e. a computed checksum of 0: TCP sends that as 0, UDP as 0xffff.
/// The first payload word is chosen to get there: adding the word `~S` to a sum `S` gives
/// 0xffff.
fn template_with_zero_checksum(rng: &mut StdRng, proto: Proto, target: Tuple) -> Template {
    let mut template = Template::random(rng, proto);
    if template.payload.len() < 2 {
        template.payload.resize(2, 0);
    }
    template.payload[0] = 0;
    template.payload[1] = 0;
    let frame = template.build(target);
    let check_off = template.l4_check_offset();
    // The checksum field is `~S` as stored; a UDP `~S` of 0 is stored as 0xffff, which adds
    // the same value (one's complement -0) to the sum.
    template.payload[..2].copy_from_slice(&frame[check_off..check_off + 2]);
    template
}

#[test]
fn rewrite_to_a_zero_computed_checksum() {
    let mut rng = StdRng::seed_from_u64(0x00c5_0004);
    for proto in [Proto::Tcp, Proto::Udp] {
        for i in 0..200 {
            let (from, to) = (Tuple::random(&mut rng), Tuple::random(&mut rng));
            let template = template_with_zero_checksum(&mut rng, proto, to);
            let check = rewrite_and_compare(&template, from, to, &format!("{proto:?} {i}"));
            // Confirms the construction hit the edge case the test is about.
            let want = match proto {
                Proto::Tcp => 0,
                Proto::Udp => 0xffff,
            };
            assert_eq!(check, want, "{proto:?} {i}");
        }
    }
}

#[test]
fn rewrite_from_a_zero_computed_checksum() {
    let mut rng = StdRng::seed_from_u64(0x00c5_0005);
    for proto in [Proto::Tcp, Proto::Udp] {
        for i in 0..200 {
            let (from, to) = (Tuple::random(&mut rng), Tuple::random(&mut rng));
            let template = template_with_zero_checksum(&mut rng, proto, from);
            let original = template.build(from);
            let off = template.l4_check_offset();
            let stored = u16::from_be_bytes([original[off], original[off + 1]]);
            assert_eq!(stored, if proto == Proto::Tcp { 0 } else { 0xffff });
            rewrite_and_compare(&template, from, to, &format!("{proto:?} {i}"));
        }
    }
}

#[test]
fn protocol_numbers_match_the_rewrite() {
    // `rewrite` keys off the protocol byte; make sure the templates produce what it expects.
    let mut rng = StdRng::seed_from_u64(0x00c5_0006);
    for (proto, number) in [(Proto::Tcp, ip_number::TCP), (Proto::Udp, ip_number::UDP)] {
        let template = Template::random(&mut rng, proto);
        let frame = template.build(Tuple::random(&mut rng));
        assert_eq!(frame[ETH_LEN + 9], number.0);
        assert_eq!(
            template.l4_offset(),
            ETH_LEN + usize::from(frame[ETH_LEN] & 0x0f) * 4
        );
    }
}
