//! Table-driven tests of the bidirectional flow key and of entry updates: the same entry
//! serves both directions, counters and states follow the packets, and the handshake RTT is
//! taken from the opening SYN to the SYN+ACK.

use bpf_common::{
    FAMILY_IPV4, PROTO_ICMP, PROTO_TCP, PROTO_UDP, addr16_from_ipv4_octets,
    ct::{CT_F_ONE_WAY, CT_F_SEEN_REPLY, CtEntry},
};
use conntrack::{
    Direction, TcpFlags, TcpState, Timeouts, canonical_key, ct_timeout, direction_of, ipv4_key,
    new_entry, state_name, update_entry, update_entry_steady, with_port,
};

const CLIENT: [u8; 4] = [198, 18, 0, 10];
const SERVER: [u8; 4] = [198, 18, 1, 20];

fn be(port: u16) -> u16 {
    port.to_be()
}

#[test]
fn both_directions_share_one_key() {
    type Case = ([u8; 4], u16, [u8; 4], u16, u8);
    let cases: &[Case] = &[
        (CLIENT, 40_000, SERVER, 8080, PROTO_TCP),
        (SERVER, 8080, CLIENT, 40_000, PROTO_TCP),
        (CLIENT, 53, SERVER, 53, PROTO_UDP),
        // Same address both ends (loopback-like): ports decide.
        (CLIENT, 1, CLIENT, 2, PROTO_UDP),
        (CLIENT, 2, CLIENT, 1, PROTO_UDP),
        // Same endpoint both ends: side 0.
        (CLIENT, 7, CLIENT, 7, PROTO_ICMP),
    ];
    for &(src, sp, dst, dp, proto) in cases {
        let s = addr16_from_ipv4_octets(src);
        let d = addr16_from_ipv4_octets(dst);
        let (fwd, fwd_side) = canonical_key(s, be(sp), d, be(dp), proto, FAMILY_IPV4);
        let (rev, rev_side) = canonical_key(d, be(dp), s, be(sp), proto, FAMILY_IPV4);
        assert_eq!(fwd, rev, "{src:?}:{sp} -> {dst:?}:{dp}");
        if src == dst && sp == dp {
            assert_eq!((fwd_side, rev_side), (0, 0));
        } else {
            assert_ne!(fwd_side, rev_side, "{src:?}:{sp} -> {dst:?}:{dp}");
        }
        assert_eq!(fwd.proto, proto);
        assert_eq!(fwd.family, FAMILY_IPV4);
        assert_eq!(fwd._pad, [0; 2]);
        // The sender's endpoint is at its side.
        let (addr, port) = if fwd_side == 0 {
            (fwd.addr_a, fwd.port_a_be)
        } else {
            (fwd.addr_b, fwd.port_b_be)
        };
        assert_eq!((addr, port), (s, be(sp)));
    }
    // Different flows get different keys.
    let a = canonical_key(
        addr16_from_ipv4_octets(CLIENT),
        be(1),
        addr16_from_ipv4_octets(SERVER),
        be(2),
        PROTO_TCP,
        FAMILY_IPV4,
    );
    let b = canonical_key(
        addr16_from_ipv4_octets(CLIENT),
        be(1),
        addr16_from_ipv4_octets(SERVER),
        be(2),
        PROTO_UDP,
        FAMILY_IPV4,
    );
    assert_ne!(a.0, b.0);
}

#[test]
fn direction_follows_the_opening_side() {
    assert_eq!(direction_of(0, 0), Direction::Original);
    assert_eq!(direction_of(0, 1), Direction::Reply);
    assert_eq!(direction_of(1, 1), Direction::Original);
    assert_eq!(direction_of(1, 0), Direction::Reply);
}

use Direction::{Original as O, Reply as R};

/// One packet: direction, TCP flags, length, time (ns); then the expected state name and
/// whether this packet closed the flow.
type Step = (Direction, u8, u64, u64, &'static str, bool);

fn run(name: &str, proto: u8, start: Option<CtEntry>, steps: &[Step]) -> CtEntry {
    let mut e = start.unwrap_or_else(|| new_entry(steps.first().map_or(0, |s| s.3), 0));
    for (i, &(dir, flags, len, now, want, closed)) in steps.iter().enumerate() {
        let u = update_entry(&mut e, proto, dir, TcpFlags(flags), len, now);
        assert_eq!(state_name(proto, e.state), want, "{name}: step {i}");
        assert_eq!(u.closed, closed, "{name}: step {i} closed");
        assert_eq!(u.new_state, e.state);
    }
    e
}

const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

#[test]
fn normal_open_and_close_with_counters_and_rtt() {
    let e = run(
        "open/close",
        PROTO_TCP,
        None,
        &[
            (O, SYN, 60, 1_000, "SYN_SENT", false),
            (R, SYN_ACK, 60, 1_700, "SYN_RECV", false),
            (O, ACK, 52, 1_800, "ESTABLISHED", false),
            (O, PSH_ACK, 152, 1_900, "ESTABLISHED", false),
            (R, PSH_ACK, 1_052, 2_000, "ESTABLISHED", false),
            (O, FIN_ACK, 52, 2_100, "FIN_WAIT", true),
            (R, FIN_ACK, 52, 2_200, "TIME_WAIT", false),
            (O, ACK, 52, 2_300, "TIME_WAIT", false),
        ],
    );
    assert_eq!(e.packets, [5, 3]);
    assert_eq!(e.bytes, [60 + 52 + 152 + 52 + 52, 60 + 1_052 + 52]);
    assert_eq!(e.rtt_ns, 700);
    assert_eq!(e.syn_ns, 1_000);
    assert_eq!(e.created_ns, 1_000);
    assert_eq!(e.last_seen_ns, 2_300);
    assert_eq!(
        e.tcp_flags_seen,
        [SYN | PSH_ACK | FIN_ACK, SYN_ACK | PSH_ACK | FIN_ACK]
    );
    assert_ne!(e.flags & CT_F_SEEN_REPLY, 0);
}

#[test]
fn fin_from_either_side() {
    let established = run(
        "est",
        PROTO_TCP,
        None,
        &[
            (O, SYN, 1, 1, "SYN_SENT", false),
            (R, SYN_ACK, 1, 2, "SYN_RECV", false),
            (O, ACK, 1, 3, "ESTABLISHED", false),
        ],
    );
    let table: &[(&str, &[Step])] = &[
        (
            "original first",
            &[
                (O, FIN_ACK, 1, 4, "FIN_WAIT", true),
                (R, ACK, 1, 5, "FIN_WAIT", false),
                (R, FIN_ACK, 1, 6, "TIME_WAIT", false),
            ],
        ),
        (
            "reply first",
            &[
                (R, FIN_ACK, 1, 4, "CLOSE_WAIT", true),
                (O, ACK, 1, 5, "CLOSE_WAIT", false),
                (O, FIN_ACK, 1, 6, "TIME_WAIT", false),
            ],
        ),
    ];
    for (name, steps) in table {
        run(name, PROTO_TCP, Some(established), steps);
    }
}

#[test]
fn rst_in_every_state_closes_and_reports_once() {
    for state in TcpState::ALL {
        for dir in [O, R] {
            let mut e = new_entry(0, 0);
            e.state = state as u8;
            let u = update_entry(&mut e, PROTO_TCP, dir, TcpFlags(RST), 40, 5);
            assert_eq!(
                TcpState::from_u8(e.state),
                TcpState::Closed,
                "{state:?} {dir:?}"
            );
            assert_eq!(u.closed, !state.is_closing(), "{state:?} {dir:?}");
        }
    }
}

#[test]
fn simultaneous_open_and_retransmitted_syn() {
    let e = run(
        "simultaneous",
        PROTO_TCP,
        None,
        &[
            (O, SYN, 1, 10, "SYN_SENT", false),
            (R, SYN, 1, 25, "SYN_RECV", false),
            (O, SYN_ACK, 1, 30, "SYN_RECV", false),
            (R, SYN_ACK, 1, 31, "SYN_RECV", false),
            (O, ACK, 1, 40, "ESTABLISHED", false),
        ],
    );
    assert_eq!(e.rtt_ns, 15);
    // Retransmitted SYNs keep the first SYN's time: the RTT includes the retransmission wait.
    let e = run(
        "retransmit",
        PROTO_TCP,
        None,
        &[
            (O, SYN, 1, 100, "SYN_SENT", false),
            (O, SYN, 1, 1_100, "SYN_SENT", false),
            (R, SYN_ACK, 1, 1_150, "SYN_RECV", false),
            (O, SYN, 1, 1_200, "SYN_RECV", false),
            (R, SYN_ACK, 1, 1_300, "SYN_RECV", false),
            (O, ACK, 1, 1_400, "ESTABLISHED", false),
        ],
    );
    assert_eq!(e.syn_ns, 100);
    assert_eq!(e.rtt_ns, 1_050);
    assert_eq!(e.packets, [4, 2]);
}

#[test]
fn reopened_port_measures_a_new_rtt() {
    let mut e = run(
        "first",
        PROTO_TCP,
        None,
        &[
            (O, SYN, 1, 10, "SYN_SENT", false),
            (R, SYN_ACK, 1, 20, "SYN_RECV", false),
            (O, RST, 1, 30, "CLOSE", true),
        ],
    );
    assert_eq!(e.rtt_ns, 10);
    e = run(
        "reopen",
        PROTO_TCP,
        Some(e),
        &[
            (O, SYN, 1, 100, "SYN_SENT", false),
            (R, SYN_ACK, 1, 130, "SYN_RECV", false),
        ],
    );
    assert_eq!(e.rtt_ns, 30);
}

#[test]
fn udp_and_icmp_pseudo_states() {
    let e = run(
        "udp",
        PROTO_UDP,
        None,
        &[
            (O, 0xff, 30, 1, "NEW", false),
            (O, 0, 30, 2, "NEW", false),
            (R, 0, 40, 3, "REPLIED", false),
            (O, 0, 30, 4, "REPLIED", false),
        ],
    );
    assert_eq!(e.packets, [3, 1]);
    assert_eq!(e.rtt_ns, 0);
    assert_eq!(e.tcp_flags_seen, [0, 0], "TCP flags ignored for UDP");
    run(
        "icmp",
        PROTO_ICMP,
        None,
        &[(O, 0, 84, 1, "NEW", false), (R, 0, 84, 2, "REPLIED", false)],
    );
}

#[test]
fn last_seen_never_goes_back() {
    let mut e = new_entry(100, 0);
    update_entry(&mut e, PROTO_UDP, O, TcpFlags(0), 1, 200);
    // Another CPU stamped a later time first.
    update_entry(&mut e, PROTO_UDP, O, TcpFlags(0), 1, 150);
    assert_eq!(e.last_seen_ns, 200);
}

#[test]
fn timeouts_per_state_and_protocol() {
    let t = Timeouts {
        tcp_syn_ns: 1,
        tcp_established_ns: 2,
        tcp_closing_ns: 3,
        udp_ns: 4,
        other_ns: 5,
    };
    let table: &[(u8, u8, u64)] = &[
        (PROTO_TCP, TcpState::None as u8, 1),
        (PROTO_TCP, TcpState::SynSent as u8, 1),
        (PROTO_TCP, TcpState::SynRecv as u8, 1),
        (PROTO_TCP, TcpState::Established as u8, 2),
        (PROTO_TCP, TcpState::FinWait as u8, 3),
        (PROTO_TCP, TcpState::CloseWait as u8, 3),
        (PROTO_TCP, TcpState::TimeWait as u8, 3),
        (PROTO_TCP, TcpState::Closed as u8, 3),
        (PROTO_UDP, 0, 4),
        (PROTO_UDP, 1, 4),
        (PROTO_ICMP, 0, 5),
        (PROTO_ICMP, 1, 5),
        (47, 0, 5),
    ];
    for &(proto, state, want) in table {
        assert_eq!(ct_timeout(&t, proto, state), want, "{proto} {state}");
    }
    // The documented defaults.
    let d = Timeouts::DEFAULT;
    assert_eq!(
        ct_timeout(&d, PROTO_TCP, TcpState::SynSent as u8),
        60_000_000_000
    );
    assert_eq!(
        ct_timeout(&d, PROTO_TCP, TcpState::Established as u8),
        21_600_000_000_000
    );
    assert_eq!(
        ct_timeout(&d, PROTO_TCP, TcpState::TimeWait as u8),
        10_000_000_000
    );
    assert_eq!(ct_timeout(&d, PROTO_UDP, 0), 60_000_000_000);
    assert_eq!(ct_timeout(&d, PROTO_ICMP, 0), 60_000_000_000);
}

#[test]
fn one_way_entries_advance_on_original_packets_only() {
    // The load balancer in DSR mode: backends answer clients directly, so the entry only ever
    // sees the original direction, and is flagged so.
    let mut start = new_entry(1_000, 0);
    start.flags |= CT_F_ONE_WAY;
    let e = run(
        "dsr",
        PROTO_TCP,
        Some(start),
        &[
            (O, SYN, 60, 1_000, "SYN_SENT", false),
            (O, ACK, 52, 1_500, "ESTABLISHED", false),
            (O, PSH_ACK, 152, 1_600, "ESTABLISHED", false),
            (O, FIN_ACK, 52, 1_700, "FIN_WAIT", true),
        ],
    );
    assert_eq!(e.packets, [4, 0]);
    assert_eq!(e.rtt_ns, 0, "no SYN+ACK seen, no RTT");
    assert_eq!(e.flags & CT_F_SEEN_REPLY, 0);
    // The same packets on a two-way entry stay in SYN_SENT: the machine waits for the reply.
    run(
        "two-way",
        PROTO_TCP,
        None,
        &[
            (O, SYN, 60, 1_000, "SYN_SENT", false),
            (O, ACK, 52, 1_500, "SYN_SENT", false),
        ],
    );
}

#[test]
fn with_port_keeps_the_key_canonical_between_distinct_addresses() {
    // Full-NAT port allocation computes the backend leg's key once and then only sets the
    // SNAT port of each attempt; that must equal the canonical key of the new endpoints.
    let pairs = [
        ([198, 18, 1, 11], [198, 18, 1, 1]),
        ([198, 18, 1, 1], [198, 18, 1, 11]),
        ([198, 19, 0, 1], [198, 18, 255, 255]),
    ];
    for (backend, snat) in pairs {
        let backend = addr16_from_ipv4_octets(backend);
        let snat = addr16_from_ipv4_octets(snat);
        let (base, backend_side) =
            canonical_key(backend, be(8080), snat, 0, PROTO_TCP, FAMILY_IPV4);
        for port in [1, 1024, 40_000, 65_535] {
            let (want, side) =
                canonical_key(backend, be(8080), snat, be(port), PROTO_TCP, FAMILY_IPV4);
            assert_eq!(side, backend_side);
            assert_eq!(with_port(base, backend_side ^ 1, be(port)), want, "{port}");
        }
    }
}

#[test]
fn the_steady_shortcut_does_exactly_what_update_entry_does_or_nothing() {
    // Every TCP state, both directions, every flags byte, one-way or not: when the shortcut
    // applies a packet, the entry is what update_entry makes of it; otherwise it is untouched.
    let mut applied = 0;
    for state in TcpState::ALL {
        for dir in [O, R] {
            for one_way in [false, true] {
                for flags in 0..=u8::MAX {
                    let mut start = new_entry(1_000, 0);
                    start.state = state as u8;
                    start.packets = [3, 2];
                    start.bytes = [300, 200];
                    if one_way {
                        start.flags |= CT_F_ONE_WAY;
                    }
                    let (mut fast, mut full) = (start, start);
                    let handled =
                        update_entry_steady(&mut fast, PROTO_TCP, dir, TcpFlags(flags), 52, 2_000);
                    let _ = update_entry(&mut full, PROTO_TCP, dir, TcpFlags(flags), 52, 2_000);
                    if handled {
                        applied += 1;
                        assert_eq!(fast, full, "{state:?} {dir:?} {flags:#04x}");
                        assert_eq!(full.state, start.state);
                    } else {
                        assert_eq!(fast, start, "{state:?} {dir:?} {flags:#04x}: untouched");
                    }
                }
            }
        }
    }
    // ESTABLISHED x 2 directions x 2 modes x the 32 flag bytes without SYN, FIN, RST.
    assert_eq!(applied, 2 * 2 * 32);
    let mut udp = new_entry(1_000, 0);
    assert!(!update_entry_steady(
        &mut udp,
        PROTO_UDP,
        O,
        TcpFlags(0),
        52,
        2_000
    ));
}

#[test]
fn ipv4_key_is_the_canonical_key_of_the_ipv4_endpoints() {
    let client = u32::from_ne_bytes(CLIENT);
    let server = u32::from_ne_bytes(SERVER);
    for (src, sp, dst, dp) in [(client, 40_000, server, 80), (server, 80, client, 40_000)] {
        assert_eq!(
            ipv4_key(src, be(sp), dst, be(dp), PROTO_TCP),
            canonical_key(
                [src, 0, 0, 0],
                be(sp),
                [dst, 0, 0, 0],
                be(dp),
                PROTO_TCP,
                FAMILY_IPV4
            )
        );
    }
}
