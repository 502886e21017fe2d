//! The policy over IPv6: IPv6 prefixes in rules, one endpoint policy governing both
//! families, conntrack of IPv6 flows, neighbour discovery and related ICMPv6 errors.

use etherparse::{Icmpv6Header, Icmpv6Type, Ipv6FlowLabel, Ipv6Header};

use super::*;

const CLIENT6: [u8; 16] = v6(0, 1);
const ENDPOINT6: [u8; 16] = v6(0, 0x0a);
const ROUTER6: [u8; 16] = v6(0, 0xfe);
/// Outside 2001:db8::/32.
const OUTSIDER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb9, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

/// `2001:db8:<net>::<host>`.
const fn v6(net: u8, host: u8) -> [u8; 16] {
    [
        0x20, 0x01, 0x0d, 0xb8, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, 0, host,
    ]
}

const POLICY6: &str = r#"
endpoints:
  - interface: "ep*"
    default_ingress: deny
    default_egress: deny
    ingress:
      - name: web6
        cidr: 2001:db8::/32
        protocol: tcp
        ports: 8080
        action: allow
      - name: web4
        cidr: 198.18.0.0/16
        protocol: tcp
        ports: 9090
        action: allow
      - name: no-telnet
        protocol: tcp
        ports: 23
        action: deny
      - name: ssh6
        cidr: ::/0
        protocol: tcp
        ports: 22
        action: allow
      - name: ping6
        cidr: 2001:db8::1/128
        protocol: icmpv6
        action: allow
    egress:
      - name: out-web
        protocol: tcp
        ports: 80-443
        action: allow
"#;

fn eth6() -> Vec<u8> {
    Ethernet2Header {
        source: CLIENT_MAC,
        destination: EP_MAC,
        ether_type: EtherType::IPV6,
    }
    .to_bytes()
    .to_vec()
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next: IpNumber, payload_len: usize) -> Ipv6Header {
    Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: payload_len as u16,
        next_header: next,
        hop_limit: 64,
        source: src,
        destination: dst,
    }
}

/// A TCP segment over IPv6 behind `ext` 8-byte destination-options headers.
fn tcp6_ext(
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    syn: bool,
    ack: bool,
    ext: usize,
) -> Vec<u8> {
    let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
    tcp.syn = syn;
    tcp.ack = ack;
    if ack {
        tcp.acknowledgment_number = 5000;
    }
    tcp.checksum = tcp
        .calc_checksum_ipv6_raw(src.0, dst.0, &[])
        .expect("tcp checksum");
    let first = if ext == 0 {
        IpNumber::TCP
    } else {
        IpNumber(60)
    };
    let ip = ipv6(src.0, dst.0, first, ext * 8 + tcp.header_len());
    let mut frame = eth6();
    frame.extend_from_slice(&ip.to_bytes());
    for i in 0..ext {
        let next = if i + 1 == ext { 6 } else { 60 };
        frame.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    frame.extend_from_slice(&tcp.to_bytes());
    frame
}

fn tcp6(src: ([u8; 16], u16), dst: ([u8; 16], u16), syn: bool, ack: bool) -> Vec<u8> {
    tcp6_ext(src, dst, syn, ack, 0)
}

fn icmp6(src: [u8; 16], dst: [u8; 16], kind: Icmpv6Type, body: &[u8]) -> Vec<u8> {
    let header = Icmpv6Header::with_checksum(kind, src, dst, body).expect("icmpv6");
    let ip = ipv6(
        src,
        dst,
        IpNumber::IPV6_ICMP,
        header.header_len() + body.len(),
    );
    let mut frame = eth6();
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(body);
    frame
}

/// A Packet Too Big from `ROUTER6` to `to`, quoting a TCP segment `quoted_src ->
/// quoted_dst` (its IPv6 header and 8 bytes).
fn packet_too_big(
    to: [u8; 16],
    quoted_src: ([u8; 16], u16),
    quoted_dst: ([u8; 16], u16),
) -> Vec<u8> {
    let t = TcpHeader::new(quoted_src.1, quoted_dst.1, 1000, 64240);
    let qip = ipv6(
        quoted_src.0,
        quoted_dst.0,
        IpNumber::TCP,
        t.header_len() + 1400,
    );
    let mut quoted = qip.to_bytes().to_vec();
    quoted.extend_from_slice(&t.to_bytes()[..8]);
    icmp6(ROUTER6, to, Icmpv6Type::PacketTooBig { mtu: 1280 }, &quoted)
}

#[test]
fn ipv6_rules_allow_and_deny_and_one_policy_governs_both_families() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY6);
    // An IPv6 prefix rule.
    assert_eq!(
        fx.ingress(&tcp6((CLIENT6, 40000), (ENDPOINT6, 8080), true, false)),
        NEXT
    );
    assert_eq!(fx.rule_packets("web6"), 1);
    assert_eq!(fx.reason("allow_rule"), 1);
    let flows = fx.flows();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let f = &flows[0];
    assert_eq!((f.src.as_str(), f.src_port), ("2001:db8::1", 40000));
    assert_eq!((f.dst.as_str(), f.dst_port), ("2001:db8::a", 8080));
    assert_eq!(f.state, "SYN_SENT");
    assert_eq!(f.bytes_orig, 60);
    // Outside the prefix: the default (deny).
    assert_eq!(
        fx.ingress(&tcp6((OUTSIDER6, 40001), (ENDPOINT6, 8080), true, false)),
        DROP
    );
    assert_eq!(fx.reason("drop_default"), 1);
    // A rule without a CIDR holds for both families.
    assert_eq!(
        fx.ingress(&tcp6((CLIENT6, 40002), (ENDPOINT6, 23), true, false)),
        DROP
    );
    assert_eq!(
        fx.ingress(&tcp((CLIENT, 40002), (ENDPOINT, 23), true, false)),
        DROP
    );
    assert_eq!(fx.rule_packets("no-telnet"), 2);
    assert_eq!(fx.reason("drop_rule"), 2);
    // ::/0 is every IPv6 address and no IPv4 one.
    assert_eq!(
        fx.ingress(&tcp6((OUTSIDER6, 40003), (ENDPOINT6, 22), true, false)),
        NEXT
    );
    assert_eq!(
        fx.ingress(&tcp((OUTSIDER, 40003), (ENDPOINT, 22), true, false)),
        DROP
    );
    assert_eq!(fx.rule_packets("ssh6"), 1);
    // An IPv4 prefix rule holds for IPv4 only.
    assert_eq!(
        fx.ingress(&tcp((CLIENT, 40004), (ENDPOINT, 9090), true, false)),
        NEXT
    );
    assert_eq!(
        fx.ingress(&tcp6((CLIENT6, 40004), (ENDPOINT6, 9090), true, false)),
        DROP
    );
    assert_eq!(fx.rule_packets("web4"), 1);
    assert_eq!(fx.reason("drop_default"), 3);
    // Egress, a rule without a CIDR: 443 allowed, 8443 not.
    assert_eq!(
        fx.egress(&tcp6((ENDPOINT6, 50000), (OUTSIDER6, 443), true, false)),
        NEXT
    );
    assert_eq!(
        fx.egress(&tcp6((ENDPOINT6, 50001), (OUTSIDER6, 8443), true, false)),
        DROP
    );
    assert_eq!(fx.rule_packets("out-web"), 1);
}

#[test]
fn ipv6_replies_pass_through_conntrack() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY6);
    let reply = tcp6((ENDPOINT6, 8080), (CLIENT6, 40000), true, true);
    assert_eq!(fx.egress(&reply), DROP, "no flow yet: egress default deny");
    assert_eq!(
        fx.ingress(&tcp6((CLIENT6, 40000), (ENDPOINT6, 8080), true, false)),
        NEXT
    );
    assert_eq!(fx.egress(&reply), NEXT);
    assert_eq!(fx.reason("pass_reply"), 1);
    assert_eq!(
        fx.ingress(&tcp6((CLIENT6, 40000), (ENDPOINT6, 8080), false, true)),
        NEXT
    );
    assert_eq!(fx.reason("pass_tracked"), 1);
    let flows = fx.flows();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].state, "ESTABLISHED");
    assert_eq!((flows[0].packets_orig, flows[0].packets_reply), (2, 1));
    // Filtered by address, in another spelling of it.
    let filter = CtFilter {
        address: Some("2001:0db8:0::a".into()),
        ..CtFilter::default()
    };
    assert_eq!(fx.plane().ct_list(&filter, 0).expect("list").len(), 1);
}

#[test]
fn ipv6_neighbour_discovery_passes_and_related_icmpv6_errors_pass() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY6);
    // Router and neighbour solicitation and advertisement, redirect: never policed.
    for nd_type in 133u8..=137 {
        let nd = icmp6(
            CLIENT6,
            ENDPOINT6,
            Icmpv6Type::Unknown {
                type_u8: nd_type,
                code_u8: 0,
                bytes5to8: [0; 4],
            },
            &ENDPOINT6,
        );
        assert_eq!(fx.ingress(&nd), NEXT, "ND type {nd_type} in");
        assert_eq!(fx.egress(&nd), NEXT, "ND type {nd_type} out");
    }
    assert_eq!(fx.reason("pass_neighbour_discovery"), 10);
    assert!(fx.flows().is_empty(), "neighbour discovery tracks nothing");
    // A Packet Too Big about a flow nobody opened: the ingress default.
    let too_big = packet_too_big(ENDPOINT6, (ENDPOINT6, 50000), (OUTSIDER6, 443));
    assert_eq!(fx.ingress(&too_big), DROP);
    // The endpoint opens it; the router's error about it now passes.
    assert_eq!(
        fx.egress(&tcp6((ENDPOINT6, 50000), (OUTSIDER6, 443), true, false)),
        NEXT
    );
    assert_eq!(fx.ingress(&too_big), NEXT);
    assert_eq!(fx.reason("pass_related"), 1);
    // Echo is a flow keyed by its identifier: admitted by the icmpv6 rule from the client, and
    // its reply passes back; from anywhere else, the default denies it.
    let echo = |from: [u8; 16]| {
        icmp6(
            from,
            ENDPOINT6,
            Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 9, seq: 1 }),
            b"ping",
        )
    };
    assert_eq!(fx.ingress(&echo(CLIENT6)), NEXT);
    assert_eq!(fx.rule_packets("ping6"), 1);
    let reply = icmp6(
        ENDPOINT6,
        CLIENT6,
        Icmpv6Type::EchoReply(etherparse::IcmpEchoHeader { id: 9, seq: 1 }),
        b"ping",
    );
    assert_eq!(fx.egress(&reply), NEXT);
    assert_eq!(fx.reason("pass_reply"), 1);
    assert_eq!(fx.ingress(&echo(OUTSIDER6)), DROP);
}

#[test]
fn ipv6_fragments_truncations_and_extension_headers() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new(POLICY6);
    // Behind two extension headers: parsed, allowed by its rule.
    assert_eq!(
        fx.ingress(&tcp6_ext(
            (CLIENT6, 40000),
            (ENDPOINT6, 8080),
            true,
            false,
            2
        )),
        NEXT
    );
    assert_eq!(fx.rule_packets("web6"), 1);
    // Behind five: more than the walk's bound, dropped.
    assert_eq!(
        fx.ingress(&tcp6_ext(
            (CLIENT6, 40001),
            (ENDPOINT6, 8080),
            true,
            false,
            5
        )),
        DROP
    );
    assert_eq!(fx.reason("drop_ext_header_limit"), 1);
    // A fragment.
    let mut fragment = eth6();
    fragment.extend_from_slice(&ipv6(CLIENT6, ENDPOINT6, IpNumber(44), 8 + 16).to_bytes());
    fragment.extend_from_slice(&[6, 0, 0, 1, 0, 0, 0, 9]);
    fragment.extend_from_slice(&[0u8; 16]);
    assert_eq!(fx.ingress(&fragment), DROP);
    assert_eq!(fx.reason("drop_fragment"), 1);
    // The TCP header cut short by the payload length; the payload length past the frame.
    let syn = tcp6((CLIENT6, 40002), (ENDPOINT6, 8080), true, false);
    let mut short = syn.clone();
    short[18..20].copy_from_slice(&10u16.to_be_bytes());
    assert_eq!(fx.ingress(&short), DROP);
    assert_eq!(fx.reason("drop_truncated"), 1);
    assert_eq!(fx.ingress(&syn[..14 + 40 + 10]), DROP);
    assert_eq!(fx.reason("drop_malformed"), 1);
    assert_eq!(fx.flows().len(), 1, "only the allowed SYN is tracked");
}
