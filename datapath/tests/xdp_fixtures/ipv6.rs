//! The IPv6 fixtures: the IPv4 ones mirrored over 2001:db8::/32, through the same `xdp_lb`
//! (which tail-calls `xdp_lb6`), compared whole with frames built by etherparse.

use std::net::{IpAddr, Ipv6Addr};

use etherparse::{Icmpv6Header, Icmpv6Type, Ipv6FlowLabel, Ipv6Header};

use super::*;

const CLIENT6: [u8; 16] = v6(0, 0, 1);
const LB_FRONT6: [u8; 16] = v6(0, 0, 2);
const LB_BACK6: [u8; 16] = v6(1, 0, 1);
const VIP6: [u8; 16] = v6(0x64, 0, 0x10);
const BACKENDS6: [[u8; 16]; 4] = [
    v6(1, 0, 0x11),
    v6(1, 0, 0x12),
    v6(1, 0, 0x13),
    v6(1, 0, 0x14),
];
/// Another address on the client side, not a VIP.
const ELSEWHERE6: [u8; 16] = v6(7, 0, 7);

/// `2001:db8:<net>::<host>` (`<mid>` in the second-to-last word).
const fn v6(net: u8, mid: u8, host: u8) -> [u8; 16] {
    [
        0x20, 0x01, 0x0d, 0xb8, 0, net, 0, 0, 0, 0, 0, 0, 0, mid, 0, host,
    ]
}

fn ip6_str(addr: [u8; 16]) -> String {
    Ipv6Addr::from(addr).to_string()
}

fn backend6_mac(addr: [u8; 16]) -> [u8; 6] {
    backend_mac([0, 0, 0, addr[15]])
}

/// IPv6 on the load balancer's two interfaces only (the peers keep it off, so no router or
/// neighbour solicitation reaches the program and moves a counter), static addresses without
/// duplicate address detection, permanent neighbours and forwarding on.
pub(super) fn configure(netns: &TestNetns) {
    for dev in ["front", "back"] {
        for key in ["disable_ipv6=0", "accept_ra=0", "router_solicitations=0"] {
            run(&[
                "ip",
                "netns",
                "exec",
                netns.name(),
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{dev}.{key}"),
            ]);
        }
    }
    netns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", ip6_str(LB_FRONT6)),
        "dev",
        "front",
        "nodad",
    ]);
    netns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/64", ip6_str(LB_BACK6)),
        "dev",
        "back",
        "nodad",
    ]);
    let neighbours = std::iter::once((CLIENT6, CLIENT_MAC, "front"))
        .chain(BACKENDS6.iter().map(|b| (*b, backend6_mac(*b), "back")));
    for (addr, mac, dev) in neighbours {
        netns.ip(&[
            "-6",
            "neigh",
            "replace",
            &ip6_str(addr),
            "lladdr",
            &mac_str(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    run(&[
        "ip",
        "netns",
        "exec",
        netns.name(),
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.forwarding=1",
    ]);
}

fn service6(
    mode: ForwardingMode,
    proto: Protocol,
    port: u16,
    backends: &[[u8; 16]],
) -> ServiceSpec {
    let mut spec = service(mode, proto, port, &[]);
    spec.key.vip = IpAddr::V6(VIP6.into());
    spec.backends = backends
        .iter()
        .map(|addr| BackendSpec {
            addr: IpAddr::V6((*addr).into()),
            port: 8080,
            weight: 1,
            state: BackendState::Active,
            id: u32::from(addr[15]) - 0x10,
            generation: 1,
        })
        .collect();
    spec
}

fn addr16_6(a: [u8; 16]) -> [u32; 4] {
    bpf_common::addr16_from_ipv6_octets(a)
}

/// The backend the Maglev table (computed independently here) gives this flow.
fn expected_backend6(
    backends: &[[u8; 16]],
    client_port: u16,
    vip_port: u16,
    proto: u8,
) -> [u8; 16] {
    let identities: Vec<String> = backends
        .iter()
        .map(|b| format!("[{}]:8080", Ipv6Addr::from(*b)))
        .collect();
    let members: Vec<MaglevBackend<'_>> = identities
        .iter()
        .map(|id| MaglevBackend {
            key: id.as_bytes(),
            weight: 1,
        })
        .collect();
    let table = build_table(&members, MAGLEV_SIZE).expect("table");
    let hash = flow_hash(
        &addr16_6(CLIENT6),
        &addr16_6(VIP6),
        client_port.to_be(),
        vip_port.to_be(),
        proto,
        SEED_MAGLEV,
    );
    backends[table[(hash % MAGLEV_SIZE) as usize] as usize]
}

fn eth6(src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    Ethernet2Header {
        source: src,
        destination: dst,
        ether_type: EtherType::IPV6,
    }
    .to_bytes()
    .to_vec()
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next: IpNumber, payload_len: usize) -> Ipv6Header {
    Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::try_new(0x12345).expect("label"),
        payload_length: payload_len as u16,
        next_header: next,
        hop_limit: 64,
        source: src,
        destination: dst,
    }
}

/// A chain of extension headers in front of the transport header: `kinds` in order, each
/// 8 bytes (one PadN option filling it), the last one pointing at `upper`.
fn ext_chain(kinds: &[u8], upper: IpNumber) -> (IpNumber, Vec<u8>) {
    let mut bytes = Vec::new();
    for (i, _) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(upper.0);
        bytes.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    (kinds.first().map(|k| IpNumber(*k)).unwrap_or(upper), bytes)
}

/// A TCP frame over IPv6, behind the extension headers `ext` (their kinds, possibly none).
fn tcp6(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    (syn, ack): (bool, bool),
    payload: &[u8],
    ext: &[u8],
) -> Vec<u8> {
    let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
    tcp.syn = syn;
    tcp.ack = ack;
    if ack {
        tcp.acknowledgment_number = 5000;
    }
    let (first, chain) = ext_chain(ext, IpNumber::TCP);
    let ip = ipv6(
        src.0,
        dst.0,
        first,
        chain.len() + tcp.header_len() + payload.len(),
    );
    tcp.checksum = tcp
        .calc_checksum_ipv6_raw(src.0, dst.0, payload)
        .expect("tcp checksum");
    let mut frame = eth6(macs.0, macs.1);
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&chain);
    frame.extend_from_slice(&tcp.to_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn udp6(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    payload: &[u8],
) -> Vec<u8> {
    let ip = ipv6(src.0, dst.0, IpNumber::UDP, 8 + payload.len());
    let udp = UdpHeader::with_ipv6_checksum(src.1, dst.1, &ip, payload).expect("udp");
    assert_ne!(udp.checksum, 0, "IPv6 UDP always carries a checksum");
    let mut frame = eth6(macs.0, macs.1);
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&udp.to_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn icmp6(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 16],
    dst: [u8; 16],
    kind: Icmpv6Type,
    body: &[u8],
) -> Vec<u8> {
    let header = Icmpv6Header::with_checksum(kind, src, dst, body).expect("icmpv6");
    let ip = ipv6(
        src,
        dst,
        IpNumber::IPV6_ICMP,
        header.header_len() + body.len(),
    );
    let mut frame = eth6(macs.0, macs.1);
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(body);
    frame
}

fn syn6(port: u16) -> Vec<u8> {
    tcp6(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT6, port),
        (VIP6, 80),
        (true, false),
        &[],
        &[],
    )
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn ipv6_syn_to_vip_is_full_natted_and_replies_are_translated_back() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS6[..3];
    fx.apply(&service6(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        backends,
    ));
    let backend = expected_backend6(backends, 40000, 80, 6);
    // DNAT to the backend, SNAT to the back interface's address (the route's source); the
    // client port is free, so it is kept.
    let want = tcp6(
        (BACK_MAC, backend6_mac(backend)),
        (LB_BACK6, 40000),
        (backend, 8080),
        (true, false),
        &[],
        &[],
    );
    let before = fx.reason("new_flow");
    assert_frame(
        "SYN",
        fx.run(&syn6(40000), fx.front_index),
        XDP_REDIRECT,
        &want,
    );
    assert_eq!(fx.reason("new_flow"), before + 1);

    // The flow entry is an IPv6 conntrack record.
    let flows: Vec<(CtKey, FlowEntry)> = pinned_entries(&fx, "LB_FLOWS");
    let (key, entry) = flows
        .iter()
        .find(|(k, _)| k.family == bpf_common::FAMILY_IPV6)
        .expect("an IPv6 flow entry");
    let (want_key, _) = canonical_key(
        addr16_6(CLIENT6),
        40000u16.to_be(),
        addr16_6(VIP6),
        80u16.to_be(),
        6,
        bpf_common::FAMILY_IPV6,
    );
    assert_eq!(*key, want_key);
    assert_eq!(entry.backend_id, u32::from(backend[15]) - 0x10);

    let syn_ack = tcp6(
        (backend6_mac(backend), BACK_MAC),
        (backend, 8080),
        (LB_BACK6, 40000),
        (true, true),
        &[],
        &[],
    );
    let want = tcp6(
        (FRONT_MAC, CLIENT_MAC),
        (VIP6, 80),
        (CLIENT6, 40000),
        (true, true),
        &[],
        &[],
    );
    let before = fx.reason("nat_reply_translated");
    assert_frame(
        "SYN-ACK",
        fx.run(&syn_ack, fx.back_index),
        XDP_REDIRECT,
        &want,
    );
    assert_eq!(fx.reason("nat_reply_translated"), before + 1);

    // UDP both ways, its mandatory checksum valid after each rewrite (the expected frames
    // carry etherparse's own checksums).
    fx.apply(&service6(
        ForwardingMode::FullNat,
        Protocol::Udp,
        53,
        backends,
    ));
    let backend = expected_backend6(backends, 50000, 53, 17);
    let query = udp6(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT6, 50000),
        (VIP6, 53),
        b"query",
    );
    let want = udp6(
        (BACK_MAC, backend6_mac(backend)),
        (LB_BACK6, 50000),
        (backend, 8080),
        b"query",
    );
    assert_frame(
        "UDP query",
        fx.run(&query, fx.front_index),
        XDP_REDIRECT,
        &want,
    );
    let answer = udp6(
        (backend6_mac(backend), BACK_MAC),
        (backend, 8080),
        (LB_BACK6, 50000),
        b"answer",
    );
    let want = udp6(
        (FRONT_MAC, CLIENT_MAC),
        (VIP6, 53),
        (CLIENT6, 50000),
        b"answer",
    );
    assert_frame(
        "UDP answer",
        fx.run(&answer, fx.back_index),
        XDP_REDIRECT,
        &want,
    );
}

#[test]
fn ipv6_dsr_rewrites_only_the_mac_addresses() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS6[..3];
    fx.apply(&service6(ForwardingMode::Dsr, Protocol::Tcp, 80, backends));
    let payload = b"GET / HTTP/1.0\r\n\r\n";
    let packet = tcp6(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT6, 41000),
        (VIP6, 80),
        (false, true),
        payload,
        &[],
    );
    let backend = expected_backend6(backends, 41000, 80, 6);
    let want = tcp6(
        (BACK_MAC, backend6_mac(backend)),
        (CLIENT6, 41000),
        (VIP6, 80),
        (false, true),
        payload,
        &[],
    );
    assert_frame("DSR", fx.run(&packet, fx.front_index), XDP_REDIRECT, &want);
    let flows: Vec<(CtKey, FlowEntry)> = pinned_entries(&fx, "LB_FLOWS");
    assert!(
        flows
            .iter()
            .any(|(k, e)| k.family == bpf_common::FAMILY_IPV6 && e.ct.flags & CT_F_ONE_WAY != 0),
        "a one-way IPv6 record"
    );
}

#[test]
fn ipv6_established_flow_sticks_to_its_backend_and_drain_keeps_it() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let old_set = &BACKENDS6[..3];
    let new_set = &BACKENDS6[..4];
    let port = (42000u16..43000)
        .find(|p| expected_backend6(old_set, *p, 80, 6) != expected_backend6(new_set, *p, 80, 6))
        .expect("some flow moves when a backend is added");
    let old_backend = expected_backend6(old_set, port, 80, 6);
    fx.apply(&service6(ForwardingMode::Dsr, Protocol::Tcp, 80, old_set));
    let packet = |syn: bool| {
        tcp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT6, port),
            (VIP6, 80),
            (syn, !syn),
            &[],
            &[],
        )
    };
    let to = |backend: [u8; 16], syn: bool| {
        tcp6(
            (BACK_MAC, backend6_mac(backend)),
            (CLIENT6, port),
            (VIP6, 80),
            (syn, !syn),
            &[],
            &[],
        )
    };
    assert_frame(
        "SYN",
        fx.run(&packet(true), fx.front_index),
        XDP_REDIRECT,
        &to(old_backend, true),
    );
    // A fourth backend: the table now sends this flow elsewhere, the entry keeps it.
    fx.apply(&service6(ForwardingMode::Dsr, Protocol::Tcp, 80, new_set));
    assert_frame(
        "ACK after the change",
        fx.run(&packet(false), fx.front_index),
        XDP_REDIRECT,
        &to(old_backend, false),
    );
    // Its backend draining: the flow stays.
    let mut drained = service6(ForwardingMode::Dsr, Protocol::Tcp, 80, new_set);
    for b in &mut drained.backends {
        if b.addr == IpAddr::V6(old_backend.into()) {
            b.state = BackendState::Draining;
        }
    }
    fx.apply(&drained);
    assert_frame(
        "ACK while draining",
        fx.run(&packet(false), fx.front_index),
        XDP_REDIRECT,
        &to(old_backend, false),
    );
}

#[test]
fn ipv6_service_without_backends_drops_and_counts() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service6(ForwardingMode::FullNat, Protocol::Tcp, 80, &[]));
    let syn = syn6(40000);
    let before = fx.reason("drop_no_backend");
    assert_frame("no backend", fx.run(&syn, fx.front_index), XDP_DROP, &syn);
    assert_eq!(fx.reason("drop_no_backend"), before + 1);
}

#[test]
fn ipv6_non_vip_packets_and_neighbour_discovery_pass_unchanged() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service6(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        &BACKENDS6[..3],
    ));
    let cases = [
        // Same VIP, other port.
        tcp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT6, 40000),
            (VIP6, 81),
            (true, false),
            &[],
            &[],
        ),
        // Same port, other protocol.
        udp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT6, 40000),
            (VIP6, 80),
            b"dns?",
        ),
        // The load balancer's own address.
        tcp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT6, 40000),
            (LB_FRONT6, 22),
            (true, false),
            &[],
            &[],
        ),
        // The same 5-tuple as an IPv4 service's would be, in the other family: not ours.
        tcp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT6, 40000),
            (ELSEWHERE6, 80),
            (true, false),
            &[],
            &[],
        ),
    ];
    for frame in cases {
        let before = fx.reason("pass_not_vip");
        assert_frame("non-VIP", fx.run(&frame, fx.front_index), XDP_PASS, &frame);
        assert_eq!(fx.reason("pass_not_vip"), before + 1);
    }

    // Neighbour discovery passes, to the VIP address too: router solicitation and
    // advertisement, neighbour solicitation and advertisement, redirect.
    for nd_type in 133u8..=137 {
        let mut body = vec![0u8; 16];
        body[..16].copy_from_slice(&VIP6);
        let frame = icmp6(
            (CLIENT_MAC, FRONT_MAC),
            CLIENT6,
            VIP6,
            Icmpv6Type::Unknown {
                type_u8: nd_type,
                code_u8: 0,
                bytes5to8: [0; 4],
            },
            &body,
        );
        let before = fx.reason("pass_neighbour_discovery");
        assert_frame(
            &format!("ND type {nd_type}"),
            fx.run(&frame, fx.front_index),
            XDP_PASS,
            &frame,
        );
        assert_eq!(fx.reason("pass_neighbour_discovery"), before + 1);
    }

    // An echo request to the VIP address is another protocol on a VIP address.
    let echo = icmp6(
        (CLIENT_MAC, FRONT_MAC),
        CLIENT6,
        VIP6,
        Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 7, seq: 1 }),
        b"ping",
    );
    let before = fx.reason("pass_vip_addr_other");
    assert_frame("echo", fx.run(&echo, fx.front_index), XDP_PASS, &echo);
    assert_eq!(fx.reason("pass_vip_addr_other"), before + 1);
}

#[test]
fn ipv6_truncated_frames_follow_the_documented_rules() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service6(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        &BACKENDS6[..3],
    ));
    let syn = syn6(40000);
    // Every cut: the fixed header cut -> pass (truncated); whole but shorter than its payload
    // length -> pass (malformed). Never forwarded, never changed.
    for len in 14..syn.len() {
        let cut = &syn[..len];
        let counter = if len < 14 + 40 {
            "pass_truncated_l3"
        } else {
            "pass_malformed_ipv6"
        };
        let before = fx.reason(counter);
        assert_frame(
            &format!("cut at {len}"),
            fx.run(cut, fx.front_index),
            XDP_PASS,
            cut,
        );
        assert_eq!(
            fx.reason(counter),
            before + 1,
            "cut at {len} counted as {counter}"
        );
    }

    // A consistent packet whose TCP header is cut short, to the VIP address: dropped.
    let mut short = syn[..14 + 40 + 10].to_vec();
    short[18..20].copy_from_slice(&10u16.to_be_bytes());
    let before = fx.reason("drop_truncated_l4");
    assert_frame(
        "short TCP to VIP",
        fx.run(&short, fx.front_index),
        XDP_DROP,
        &short,
    );
    assert_eq!(fx.reason("drop_truncated_l4"), before + 1);
    // The same to another address: passed.
    let mut other = short.clone();
    other[14 + 24..14 + 40].copy_from_slice(&ELSEWHERE6);
    assert_frame(
        "short TCP elsewhere",
        fx.run(&other, fx.front_index),
        XDP_PASS,
        &other,
    );

    // A wrong version behind the IPv6 ethertype.
    let mut bad = syn.clone();
    bad[14] = 0x45;
    let before = fx.reason("pass_malformed_ipv6");
    assert_frame("version 4", fx.run(&bad, fx.front_index), XDP_PASS, &bad);
    assert_eq!(fx.reason("pass_malformed_ipv6"), before + 1);
}

#[test]
fn ipv6_extension_headers_are_walked_and_too_many_are_dropped() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS6[..3];
    fx.apply(&service6(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        backends,
    ));
    let backend = expected_backend6(backends, 40000, 80, 6);
    // Hop-by-hop, destination options and a routing header with no segments left: the
    // transport header is found behind them, rewritten, and the headers forwarded unchanged.
    let ext = [0u8, 60, 43];
    let syn = tcp6(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT6, 40000),
        (VIP6, 80),
        (true, false),
        &[],
        &ext,
    );
    let want = tcp6(
        (BACK_MAC, backend6_mac(backend)),
        (LB_BACK6, 40000),
        (backend, 8080),
        (true, false),
        &[],
        &ext,
    );
    let before = fx.reason("seen_ip_options");
    assert_frame(
        "SYN behind 3 headers",
        fx.run(&syn, fx.front_index),
        XDP_REDIRECT,
        &want,
    );
    assert_eq!(fx.reason("seen_ip_options"), before + 1);

    // Five headers, one more than the walk's bound: to a VIP address, dropped.
    let too_many = [60u8, 60, 60, 60, 60];
    let syn = tcp6(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT6, 40001),
        (VIP6, 80),
        (true, false),
        &[],
        &too_many,
    );
    let before = fx.reason("drop_ext_header_limit");
    assert_frame(
        "SYN behind 5 headers",
        fx.run(&syn, fx.front_index),
        XDP_DROP,
        &syn,
    );
    assert_eq!(fx.reason("drop_ext_header_limit"), before + 1);
    // Elsewhere: passed.
    let other = tcp6(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT6, 40001),
        (ELSEWHERE6, 80),
        (true, false),
        &[],
        &too_many,
    );
    assert_frame(
        "5 headers elsewhere",
        fx.run(&other, fx.front_index),
        XDP_PASS,
        &other,
    );
}

#[test]
fn ipv6_fragments_to_a_vip_are_dropped_and_others_pass() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service6(
        ForwardingMode::FullNat,
        Protocol::Udp,
        53,
        &BACKENDS6[..3],
    ));
    let fragment = |dst: [u8; 16], more: bool, offset: u16| {
        let payload = [0xabu8; 64];
        let ip = ipv6(
            CLIENT6,
            dst,
            IpNumber::IPV6_FRAGMENTATION_HEADER,
            8 + payload.len(),
        );
        let mut frame = eth6(CLIENT_MAC, FRONT_MAC);
        frame.extend_from_slice(&ip.to_bytes());
        let offset_flags = (offset << 3) | u16::from(more);
        frame.extend_from_slice(&[17, 0]);
        frame.extend_from_slice(&offset_flags.to_be_bytes());
        frame.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        // The first fragment starts with a UDP header to port 53 - still not hashed on.
        frame.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35]);
        frame.extend_from_slice(&payload[4..]);
        frame
    };
    for (more, offset) in [(true, 0), (true, 8), (false, 8)] {
        let frame = fragment(VIP6, more, offset);
        let before = fx.reason("drop_fragment");
        assert_frame(
            "fragment to VIP",
            fx.run(&frame, fx.front_index),
            XDP_DROP,
            &frame,
        );
        assert_eq!(fx.reason("drop_fragment"), before + 1);
        let frame = fragment(ELSEWHERE6, more, offset);
        assert_frame(
            "fragment elsewhere",
            fx.run(&frame, fx.front_index),
            XDP_PASS,
            &frame,
        );
    }
}

/// A Packet Too Big from a router on the backend side, quoting the packet the load balancer
/// sent, reaches the client as if the VIP had sent it about the client's own packet: IPv6
/// path-MTU discovery through full-NAT.
#[test]
fn ipv6_packet_too_big_is_translated_to_the_client() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS6[..3];
    for (proto, port, number) in [(Protocol::Tcp, 80, 6u8), (Protocol::Udp, 53, 17)] {
        fx.apply(&service6(ForwardingMode::FullNat, proto, port, backends));
        let backend = expected_backend6(backends, 40000, port, number);
        let opener = if number == 6 {
            syn6(40000)
        } else {
            udp6(
                (CLIENT_MAC, FRONT_MAC),
                (CLIENT6, 40000),
                (VIP6, port),
                b"q",
            )
        };
        assert_eq!(fx.run(&opener, fx.front_index).0, XDP_REDIRECT);

        let payload = [0x55u8; 1400];
        // The quote: as much of the offending packet as fits, here its IPv6 header and the
        // first 8 bytes of its transport header, checksum included for UDP.
        let quote = |src: ([u8; 16], u16), dst: ([u8; 16], u16)| {
            let mut bytes = if number == 6 {
                let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
                tcp.ack = true;
                let ip = ipv6(
                    src.0,
                    dst.0,
                    IpNumber::TCP,
                    tcp.header_len() + payload.len(),
                );
                tcp.checksum = tcp.calc_checksum_ipv6(&ip, &payload).expect("checksum");
                let mut b = ip.to_bytes().to_vec();
                b.extend_from_slice(&tcp.to_bytes()[..8]);
                b
            } else {
                let ip = ipv6(src.0, dst.0, IpNumber::UDP, 8 + payload.len());
                let udp = UdpHeader::with_ipv6_checksum(src.1, dst.1, &ip, &payload).expect("udp");
                let mut b = ip.to_bytes().to_vec();
                b.extend_from_slice(&udp.to_bytes());
                b
            };
            bytes.extend_from_slice(&payload[..16]);
            bytes
        };
        let router = v6(1, 0, 0xfe);
        let too_big = Icmpv6Type::PacketTooBig { mtu: 1280 };
        let error = icmp6(
            (backend6_mac(backend), BACK_MAC),
            router,
            LB_BACK6,
            too_big,
            &quote((LB_BACK6, 40000), (backend, 8080)),
        );
        let want = icmp6(
            (FRONT_MAC, CLIENT_MAC),
            VIP6,
            CLIENT6,
            too_big,
            &quote((CLIENT6, 40000), (VIP6, port)),
        );
        let before = fx.reason("icmp_translated");
        assert_frame(
            &format!("Packet Too Big, {proto:?}"),
            fx.run(&error, fx.back_index),
            XDP_REDIRECT,
            &want,
        );
        assert_eq!(fx.reason("icmp_translated"), before + 1);

        // About a flow the load balancer does not know: passed untouched.
        let error = icmp6(
            (backend6_mac(backend), BACK_MAC),
            router,
            LB_BACK6,
            too_big,
            &quote((LB_BACK6, 40001), (backend, 8080)),
        );
        assert_frame(
            "unknown flow",
            fx.run(&error, fx.back_index),
            XDP_PASS,
            &error,
        );
    }
}

#[test]
fn ipv6_removed_backend_flows_move_to_a_remaining_one() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let all = &BACKENDS6[..3];
    let mut spec = service6(ForwardingMode::FullNat, Protocol::Tcp, 80, all);
    fx.apply(&spec);
    let ports: Vec<u16> = all
        .iter()
        .map(|b| {
            (45000u16..46000)
                .find(|p| expected_backend6(all, *p, 80, 6) == *b)
                .expect("a port for each backend")
        })
        .collect();
    for port in &ports {
        assert_eq!(fx.run(&syn6(*port), fx.front_index).0, XDP_REDIRECT);
    }
    // Backend 0 draining, backend 1 removed: its flow moves to backend 2.
    spec.backends[0].state = BackendState::Draining;
    spec.backends.remove(1);
    fx.apply(&spec);
    let before = fx.reason("flow_rescheduled");
    let ack = tcp6(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT6, ports[1]),
        (VIP6, 80),
        (false, true),
        b"y",
        &[],
    );
    let want = tcp6(
        (BACK_MAC, backend6_mac(all[2])),
        (LB_BACK6, ports[1]),
        (all[2], 8080),
        (false, true),
        b"y",
        &[],
    );
    assert_frame(
        "flow of a removed backend",
        fx.run(&ack, fx.front_index),
        XDP_REDIRECT,
        &want,
    );
    assert_eq!(fx.reason("flow_rescheduled"), before + 1);
}

#[test]
fn ipv6_vlan_tagged_vip_traffic_is_parsed() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS6[..3];
    fx.apply(&service6(ForwardingMode::Dsr, Protocol::Tcp, 80, backends));
    let tag = |frame: Vec<u8>| {
        let mut tagged = frame[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        tagged.extend_from_slice(&frame[12..]);
        tagged
    };
    // Through the tag to the flow: DSR rewrites the MACs only, the tag stays.
    let backend = expected_backend6(backends, 40000, 80, 6);
    let want = tag(tcp6(
        (BACK_MAC, backend6_mac(backend)),
        (CLIENT6, 40000),
        (VIP6, 80),
        (true, false),
        &[],
        &[],
    ));
    assert_frame(
        "tagged SYN",
        fx.run(&tag(syn6(40000)), fx.front_index),
        XDP_REDIRECT,
        &want,
    );
    // A tagged frame to another port passes as not-VIP: parsed through the tag.
    let other = tag(tcp6(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT6, 40000),
        (VIP6, 81),
        (true, false),
        &[],
        &[],
    ));
    let before = fx.reason("pass_not_vip");
    assert_frame(
        "tagged non-VIP",
        fx.run(&other, fx.front_index),
        XDP_PASS,
        &other,
    );
    assert_eq!(fx.reason("pass_not_vip"), before + 1);
}

#[test]
fn ipv6_tcp_data_offset_past_the_segment_is_dropped_as_truncated() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    fx.apply(&service6(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        &BACKENDS6[..3],
    ));
    for words in [15u8, 6, 4, 0] {
        let mut syn = syn6(40777);
        syn[54 + 12] = (words << 4) | (syn[54 + 12] & 0x0f);
        let (dropped, new_flow) = (fx.reason("drop_truncated_l4"), fx.reason("new_flow"));
        assert_frame(
            &format!("data offset {words}"),
            fx.run(&syn, fx.front_index),
            XDP_DROP,
            &syn,
        );
        assert_eq!(
            fx.reason("drop_truncated_l4"),
            dropped + 1,
            "offset {words}"
        );
        assert_eq!(fx.reason("new_flow"), new_flow, "offset {words}: no flow");
    }
}

#[test]
fn ipv6_udp_length_past_the_packet_is_dropped_as_truncated() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS6[..3];
    fx.apply(&service6(ForwardingMode::Dsr, Protocol::Udp, 53, backends));
    for len in [200u16, 7, 0] {
        let mut frame = udp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT6, 40600),
            (VIP6, 53),
            b"query",
        );
        frame[58..60].copy_from_slice(&len.to_be_bytes());
        let (dropped, new_flow) = (fx.reason("drop_truncated_l4"), fx.reason("new_flow"));
        assert_frame(
            &format!("UDP length {len}"),
            fx.run(&frame, fx.front_index),
            XDP_DROP,
            &frame,
        );
        assert_eq!(fx.reason("drop_truncated_l4"), dropped + 1, "length {len}");
        assert_eq!(fx.reason("new_flow"), new_flow, "length {len}: no flow");
    }
    // Shorter than the payload leaves padding: forwarded.
    let mut short = udp6(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT6, 40601),
        (VIP6, 53),
        b"query",
    );
    short[58..60].copy_from_slice(&10u16.to_be_bytes());
    assert_eq!(fx.run(&short, fx.front_index).0, XDP_REDIRECT);
}

/// The IPv6 full-NAT flow's record is a conntrack record advanced by both directions, its
/// reverse entry keyed by the backend leg (IPv6) and owned by the flow's key; bytes count the
/// whole IPv6 packet (40-byte header included).
#[test]
fn ipv6_full_nat_flow_entries_are_conntrack_records_advanced_in_both_directions() {
    if !privileged() {
        return;
    }
    let mut fx = Fixture::new();
    let backends = &BACKENDS6[..3];
    fx.apply(&service6(
        ForwardingMode::FullNat,
        Protocol::Tcp,
        80,
        backends,
    ));
    let backend = expected_backend6(backends, 40100, 80, 6);
    let client = |syn, ack| {
        tcp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT6, 40100),
            (VIP6, 80),
            (syn, ack),
            &[],
            &[],
        )
    };
    let from_backend = |syn, ack| {
        tcp6(
            (backend6_mac(backend), BACK_MAC),
            (backend, 8080),
            (LB_BACK6, 40100),
            (syn, ack),
            &[],
            &[],
        )
    };
    let (flow_key, client_side) = canonical_key(
        addr16_6(CLIENT6),
        40100u16.to_be(),
        addr16_6(VIP6),
        80u16.to_be(),
        6,
        bpf_common::FAMILY_IPV6,
    );
    let record = |fx: &Fixture| {
        pinned_entries::<FlowEntry>(fx, bpf_common::map_names::FLOWS)
            .into_iter()
            .find(|(k, _)| *k == flow_key)
            .expect("the flow's record under its canonical IPv6 key")
            .1
    };
    assert_eq!(fx.run(&client(true, false), fx.front_index).0, XDP_REDIRECT);
    assert_eq!(state_name(6, record(&fx).ct.state), "SYN_SENT");
    assert_eq!(
        fx.run(&from_backend(true, true), fx.back_index).0,
        XDP_REDIRECT
    );
    assert_eq!(state_name(6, record(&fx).ct.state), "SYN_RECV");
    assert_eq!(fx.run(&client(false, true), fx.front_index).0, XDP_REDIRECT);
    let entry = record(&fx);
    let ct = entry.ct;
    assert_eq!(state_name(6, ct.state), "ESTABLISHED");
    assert_eq!(ct.orig_side, client_side);
    assert_eq!(ct.packets, [2, 1]);
    assert_eq!(ct.bytes, [2 * 60, 60], "IPv6 header + 20-byte TCP header");
    assert_ne!(ct.flags & CT_F_SEEN_REPLY, 0);
    assert!(ct.rtt_ns > 0, "{ct:?}");
    assert_eq!(entry.nat_port_be, 40100u16.to_be());
    let (backend_leg, backend_side) = canonical_key(
        addr16_6(backend),
        8080u16.to_be(),
        addr16_6(LB_BACK6),
        40100u16.to_be(),
        6,
        bpf_common::FAMILY_IPV6,
    );
    let reverse = pinned_entries::<NatReverseEntry>(&fx, bpf_common::map_names::NAT_REV);
    let (_, value) = reverse
        .iter()
        .find(|(k, _)| *k == backend_leg)
        .unwrap_or_else(|| panic!("no reverse entry for the IPv6 backend leg in {reverse:?}"));
    assert_eq!(value.backend_side, backend_side);
    assert_eq!(value.owner, flow_key);
    assert_eq!(value.client_addr, addr16_6(CLIENT6));
    assert_eq!(value.vip_addr, addr16_6(VIP6));
}
