//! Table-driven tests of the conntrack state machines and timeouts.

use Direction::{Original as O, Reply as R};
use TcpState::*;
use conntrack::{
    Direction, IcmpState, TcpFlags, TcpState, Timeouts, UdpState, icmp_transition, is_expired,
    opens_new_connection, tcp_transition, tcp_transition_one_way, udp_transition,
};

const SYN: TcpFlags = TcpFlags::SYN;
const SYN_ACK: TcpFlags = TcpFlags::SYN_ACK;
const ACK: TcpFlags = TcpFlags::ACK;
const PSH_ACK: TcpFlags = TcpFlags(0x18);
const FIN_ACK: TcpFlags = TcpFlags::FIN_ACK;
const FIN: TcpFlags = TcpFlags::FIN;

/// Runs a packet sequence from `start` and checks the state after every packet, naming the
/// step that diverged.
fn run(name: &str, start: TcpState, steps: &[(Direction, TcpFlags, TcpState)]) {
    let mut state = start;
    for (i, &(dir, flags, want)) in steps.iter().enumerate() {
        let got = tcp_transition(state, dir, flags);
        assert_eq!(
            got, want,
            "{name}: step {i}: {state:?} + {dir:?} flags {:#04x}",
            flags.0
        );
        state = got;
    }
}

#[test]
fn normal_open_client_closes_first() {
    run(
        "client close",
        None,
        &[
            (O, SYN, SynSent),
            (R, SYN_ACK, SynRecv),
            (O, ACK, Established),
            (O, PSH_ACK, Established),
            (R, PSH_ACK, Established),
            (R, ACK, Established),
            (O, FIN_ACK, FinWait),
            (R, ACK, FinWait),
            // Half-close: the server may keep sending data.
            (R, PSH_ACK, FinWait),
            (O, ACK, FinWait),
            (R, FIN_ACK, TimeWait),
            // ACK of the last FIN.
            (O, ACK, TimeWait),
        ],
    );
}

#[test]
fn normal_open_server_closes_first() {
    run(
        "server close",
        None,
        &[
            (O, SYN, SynSent),
            (R, SYN_ACK, SynRecv),
            (O, ACK, Established),
            (R, FIN_ACK, CloseWait),
            (O, ACK, CloseWait),
            (O, PSH_ACK, CloseWait),
            // FIN retransmitted by the side that already closed changes nothing.
            (R, FIN_ACK, CloseWait),
            (O, FIN_ACK, TimeWait),
            (R, ACK, TimeWait),
        ],
    );
}

#[test]
fn bare_fin_counts_like_fin_ack() {
    run(
        "bare fin",
        Established,
        &[(O, FIN, FinWait), (O, FIN, FinWait), (R, FIN, TimeWait)],
    );
    run(
        "bare fin reply",
        Established,
        &[(R, FIN, CloseWait), (O, FIN, TimeWait)],
    );
}

#[test]
fn fin_completing_the_handshake() {
    // The client's third-ACK is piggybacked on its FIN.
    run("fin in syn_recv orig", SynRecv, &[(O, FIN_ACK, FinWait)]);
    run("fin in syn_recv reply", SynRecv, &[(R, FIN_ACK, CloseWait)]);
}

#[test]
fn retransmitted_syn_and_syn_ack() {
    run(
        "retransmits",
        None,
        &[
            (O, SYN, SynSent),
            (O, SYN, SynSent),
            (O, SYN, SynSent),
            (R, SYN_ACK, SynRecv),
            // SYN+ACK lost: the client retransmits SYN, the server its SYN+ACK.
            (O, SYN, SynRecv),
            (R, SYN_ACK, SynRecv),
            (O, ACK, Established),
        ],
    );
}

#[test]
fn simultaneous_open() {
    run(
        "simultaneous open",
        None,
        &[
            (O, SYN, SynSent),
            (R, SYN, SynRecv),
            (O, SYN_ACK, SynRecv),
            (R, SYN_ACK, SynRecv),
            (O, ACK, Established),
        ],
    );
}

#[test]
fn rst_closes_every_state_from_either_side() {
    for state in TcpState::ALL {
        for dir in [O, R] {
            for flags in [TcpFlags::RST, TcpFlags::RST_ACK, TcpFlags(0x1c)] {
                assert_eq!(
                    tcp_transition(state, dir, flags),
                    Closed,
                    "{state:?} {dir:?} {:#04x}",
                    flags.0
                );
            }
        }
    }
}

#[test]
fn reopen_after_close() {
    run(
        "reopen time_wait",
        TimeWait,
        &[(O, SYN, SynSent), (R, SYN_ACK, SynRecv)],
    );
    run(
        "reopen closed",
        Closed,
        &[(O, SYN, SynSent), (R, SYN_ACK, SynRecv)],
    );
    // Only the original side may reopen, and only with a plain SYN.
    run("no reopen from reply", TimeWait, &[(R, SYN, TimeWait)]);
    run("no reopen with syn_ack", Closed, &[(O, SYN_ACK, Closed)]);
}

#[test]
fn packets_that_do_not_fit_keep_the_state() {
    let cases: &[(TcpState, Direction, TcpFlags)] = &[
        // Mid-stream pickup: no SYN seen, the tracker does not guess.
        (None, O, ACK),
        (None, O, FIN_ACK),
        (None, R, SYN),
        (None, O, SYN_ACK),
        // Reply side sending a bare ACK before its SYN+ACK.
        (SynSent, R, ACK),
        (SynSent, O, ACK),
        (SynSent, O, FIN_ACK),
        (SynRecv, R, ACK),
        // Stray SYNs on an established or closing flow.
        (Established, O, SYN),
        (Established, R, SYN_ACK),
        (FinWait, O, SYN),
        (CloseWait, R, SYN),
        (TimeWait, O, FIN_ACK),
        (Closed, O, ACK),
        (Closed, R, FIN),
    ];
    for &(state, dir, flags) in cases {
        assert_eq!(
            tcp_transition(state, dir, flags),
            state,
            "{state:?} {dir:?} {:#04x}",
            flags.0
        );
    }
}

#[test]
fn invalid_flag_combinations_are_ignored() {
    let syn_fin = SYN | FIN;
    let syn_rst = SYN | TcpFlags::RST;
    for state in TcpState::ALL {
        for dir in [O, R] {
            for flags in [syn_fin, syn_rst, syn_fin | ACK, syn_rst | ACK] {
                assert_eq!(
                    tcp_transition(state, dir, flags),
                    state,
                    "{state:?} {dir:?}"
                );
            }
        }
    }
}

#[test]
fn flags_without_control_bits_never_change_state() {
    // PSH, URG, ECE, CWR in every combination, but none of SYN/FIN/RST/ACK.
    for raw in 0u8..=255 {
        if raw & 0x17 != 0 {
            continue;
        }
        for state in TcpState::ALL {
            for dir in [O, R] {
                assert_eq!(tcp_transition(state, dir, TcpFlags(raw)), state);
            }
        }
    }
}

#[test]
fn closed_is_left_only_by_an_original_syn() {
    for raw in 0u8..=255 {
        let flags = TcpFlags(raw);
        for dir in [O, R] {
            let next = tcp_transition(Closed, dir, flags);
            let reopens =
                dir == O && flags.syn() && !flags.ack() && !flags.is_invalid_combination();
            assert_eq!(
                next,
                if reopens { SynSent } else { Closed },
                "{dir:?} {raw:#04x}"
            );
        }
    }
}

#[test]
fn ecn_bits_do_not_disturb_the_handshake() {
    // ECN-setup SYN (SYN|ECE|CWR) and SYN+ACK (SYN|ACK|ECE).
    run(
        "ecn",
        None,
        &[
            (O, TcpFlags(0xc2), SynSent),
            (R, TcpFlags(0x52), SynRecv),
            (O, ACK, Established),
        ],
    );
}

#[test]
fn state_bytes_round_trip() {
    for (i, state) in TcpState::ALL.into_iter().enumerate() {
        let byte = u8::try_from(i).expect("eight states");
        assert_eq!(state as u8, byte);
        assert_eq!(TcpState::from_u8(byte), state);
    }
    for unknown in [8u8, 9, 0x7f, 0xff] {
        assert_eq!(TcpState::from_u8(unknown), None);
    }
    let names: Vec<&str> = TcpState::ALL.iter().map(|s| s.name()).collect();
    for (i, a) in names.iter().enumerate() {
        assert!(!a.is_empty());
        assert!(
            names.iter().skip(i + 1).all(|b| b != a),
            "duplicate name {a}"
        );
    }
    assert_eq!(Established.name(), "ESTABLISHED");

    assert_eq!(Direction::from_u8(0), O);
    assert_eq!(Direction::from_u8(1), R);
    assert_eq!(Direction::from_u8(2), O);
    assert_eq!(O.reverse(), R);
    assert_eq!(R.reverse(), O);

    assert_eq!(UdpState::from_u8(1), UdpState::Replied);
    assert_eq!(UdpState::from_u8(7), UdpState::New);
    assert_eq!(IcmpState::from_u8(1), IcmpState::Replied);
    assert_eq!(IcmpState::from_u8(2), IcmpState::New);
}

#[test]
fn flag_helpers() {
    assert!(SYN_ACK.syn() && SYN_ACK.ack() && !SYN_ACK.fin() && !SYN_ACK.rst());
    assert!(FIN_ACK.fin() && FIN_ACK.ack());
    assert!(TcpFlags::RST_ACK.rst());
    assert!(TcpFlags(0xff).contains(TcpFlags::SYN_ACK));
    assert!(!ACK.contains(SYN_ACK));
    assert_eq!(SYN.union(ACK), SYN_ACK);
    assert_eq!(SYN | ACK, SYN_ACK);
    assert!((SYN | FIN).is_invalid_combination());
    assert!((SYN | TcpFlags::RST).is_invalid_combination());
    assert!(!SYN_ACK.is_invalid_combination());
    assert!(!(FIN | TcpFlags::RST).is_invalid_combination());
}

#[test]
fn closing_states() {
    let closing: Vec<TcpState> = TcpState::ALL
        .into_iter()
        .filter(|s| s.is_closing())
        .collect();
    assert_eq!(closing, [FinWait, CloseWait, TimeWait, Closed]);
}

#[test]
fn transition_is_usable_in_const_context() {
    const S: TcpState = tcp_transition(TcpState::None, Direction::Original, TcpFlags::SYN);
    const T: u64 = Timeouts::DEFAULT.for_tcp_state(S);
    assert_eq!(S, SynSent);
    assert_eq!(T, 60_000_000_000);
}

#[test]
fn default_timeouts() {
    let t = Timeouts::DEFAULT;
    assert_eq!(t.tcp_syn_ns, 60_000_000_000);
    assert_eq!(t.tcp_established_ns, 6 * 3600 * 1_000_000_000);
    assert_eq!(t.tcp_closing_ns, 10_000_000_000);
    assert_eq!(t.udp_ns, 60_000_000_000);
    assert_eq!(t.other_ns, 60_000_000_000);
    assert_eq!(Timeouts::default(), t);
}

#[test]
fn timeout_per_tcp_state() {
    // Distinct values so a wrong field is caught.
    let t = Timeouts {
        tcp_syn_ns: 1,
        tcp_established_ns: 2,
        tcp_closing_ns: 3,
        udp_ns: 4,
        other_ns: 5,
    };
    let table = [
        (None, 1),
        (SynSent, 1),
        (SynRecv, 1),
        (Established, 2),
        (FinWait, 3),
        (CloseWait, 3),
        (TimeWait, 3),
        (Closed, 3),
    ];
    assert_eq!(table.len(), TcpState::ALL.len());
    for (state, want) in table {
        assert_eq!(t.for_tcp_state(state), want, "{state:?}");
    }
}

#[test]
fn expiry() {
    let sec = 1_000_000_000u64;
    let cases: &[(u64, u64, u64, bool)] = &[
        // (last_seen, now, timeout, expired)
        (100 * sec, 159 * sec, 60 * sec, false),
        (100 * sec, 160 * sec, 60 * sec, false),
        (100 * sec, 160 * sec + 1, 60 * sec, true),
        (0, u64::MAX, u64::MAX - 1, true),
        (0, u64::MAX, u64::MAX, false),
        // Seen "in the future" (another CPU stamped it after we read the clock).
        (200 * sec, 100 * sec, 60 * sec, false),
        (u64::MAX, 0, 0, false),
        (5, 5, 0, false),
        (5, 6, 0, true),
    ];
    for &(last, now, timeout, want) in cases {
        assert_eq!(
            is_expired(last, now, timeout),
            want,
            "{last} {now} {timeout}"
        );
    }
}

#[test]
fn expiry_follows_the_state_timeout() {
    // A flow idle for 30 s: alive while established, expired once closing.
    let t = Timeouts::DEFAULT;
    let last = 1_000 * 1_000_000_000u64;
    let now = last + 30 * 1_000_000_000;
    assert!(!is_expired(last, now, t.for_tcp_state(Established)));
    assert!(!is_expired(last, now, t.for_tcp_state(SynSent)));
    assert!(is_expired(last, now, t.for_tcp_state(TimeWait)));
    assert!(is_expired(last, now, t.for_tcp_state(Closed)));
}

#[test]
fn udp_and_icmp() {
    let udp = [
        (UdpState::New, O, UdpState::New),
        (UdpState::New, R, UdpState::Replied),
        (UdpState::Replied, O, UdpState::Replied),
        (UdpState::Replied, R, UdpState::Replied),
    ];
    for (state, dir, want) in udp {
        assert_eq!(udp_transition(state, dir), want, "{state:?} {dir:?}");
    }
    let icmp = [
        (IcmpState::New, O, IcmpState::New),
        (IcmpState::New, R, IcmpState::Replied),
        (IcmpState::Replied, O, IcmpState::Replied),
        (IcmpState::Replied, R, IcmpState::Replied),
    ];
    for (state, dir, want) in icmp {
        assert_eq!(icmp_transition(state, dir), want, "{state:?} {dir:?}");
    }
    assert_eq!(UdpState::Replied.name(), "REPLIED");
    assert_eq!(IcmpState::New.name(), "NEW");
}

/// The one-way tracker (DSR load balancer): only original-direction packets, from `start`.
fn run_one_way(name: &str, start: TcpState, steps: &[(TcpFlags, TcpState)]) {
    let mut state = start;
    for (i, &(flags, want)) in steps.iter().enumerate() {
        let got = tcp_transition_one_way(state, flags);
        assert_eq!(
            got, want,
            "{name}: step {i}: {state:?} flags {:#04x}",
            flags.0
        );
        state = got;
    }
}

#[test]
fn one_way_tracker_takes_the_first_ack_as_the_handshake() {
    run_one_way(
        "open, data, client closes",
        None,
        &[
            (SYN, SynSent),
            (SYN, SynSent),
            (ACK, Established),
            (PSH_ACK, Established),
            (FIN_ACK, FinWait),
            (ACK, FinWait),
        ],
    );
    run_one_way(
        "ACK+FIN right after the handshake",
        None,
        &[(SYN, SynSent), (FIN_ACK, FinWait)],
    );
    run_one_way(
        "reset before and after the handshake",
        None,
        &[
            (SYN, SynSent),
            (TcpFlags::RST_ACK, Closed),
            (SYN, SynSent),
            (ACK, Established),
            (TcpFlags::RST, Closed),
        ],
    );
    run_one_way(
        "port reuse after close",
        TimeWait,
        &[(SYN, SynSent), (ACK, Established)],
    );
}

#[test]
fn one_way_tracker_agrees_with_the_two_way_machine_outside_syn_sent() {
    // The inference applies to SynSent only; everywhere else the one-way tracker is exactly
    // the shared machine seen from the original side.
    for state in TcpState::ALL {
        for flags in 0..=u8::MAX {
            let flags = TcpFlags(flags);
            let one_way = tcp_transition_one_way(state, flags);
            let two_way = tcp_transition(state, O, flags);
            let inferred = state == SynSent && flags.ack() && !flags.syn() && !flags.rst();
            if inferred {
                assert_eq!(
                    one_way,
                    tcp_transition(Established, O, flags),
                    "{state:?} {:#04x}",
                    flags.0
                );
            } else {
                assert_eq!(one_way, two_way, "{state:?} {:#04x}", flags.0);
            }
        }
    }
}

/// A bare SYN on a record whose connection ended opens a new connection (new backend choice in
/// the load balancer); anything else on any record, and a SYN on a live one, continues it.
#[test]
fn a_bare_syn_on_an_ended_record_opens_a_new_connection() {
    for state in TcpState::ALL {
        for flags in 0..=255u8 {
            let flags = TcpFlags(flags);
            let bare_syn =
                flags.syn() && !flags.ack() && !flags.rst() && !flags.is_invalid_combination();
            let two_way = bare_syn && matches!(state, TimeWait | Closed);
            assert_eq!(
                opens_new_connection(state, flags, false),
                two_way,
                "{state:?} {flags:?} two-way"
            );
            let one_way = bare_syn && matches!(state, FinWait | CloseWait | TimeWait | Closed);
            assert_eq!(
                opens_new_connection(state, flags, true),
                one_way,
                "{state:?} {flags:?} one-way"
            );
        }
    }
    // And the reopened record starts over in SYN_SENT.
    assert!(opens_new_connection(TimeWait, SYN, false));
    assert_eq!(tcp_transition(None, O, SYN), SynSent);
    assert!(!opens_new_connection(Established, SYN, false));
    assert!(
        !opens_new_connection(SynSent, SYN, true),
        "a retransmitted SYN"
    );
    assert!(!opens_new_connection(Closed, SYN_ACK, false));
}
