//! Fuzz target `conntrack`: random packet sequences (protocols, directions, flags, lengths,
//! clocks that sometimes step back, corrupted stored entries) through `conntrack::new_entry`,
//! `update_entry` and `update_entry_steady`, and random endpoints through the key helpers.
//! See `docs/fuzzing.md`.
//!
//! Properties, after every packet:
//! - no panic; the state byte is a valid state of the protocol;
//! - TCP: the new state is what the rules of `conntrack/src/tcp.rs`'s documentation give
//!   (written out again here as a model) and the move is an edge of the allowed transition
//!   graph (two-way, or one-way for `CT_F_ONE_WAY` entries); UDP/ICMP/other: `REPLIED` exactly
//!   once a reply was seen (or was stored);
//! - `CtUpdate` reports the old and new state bytes, and `closed` exactly when a TCP flow
//!   enters a closing state from a non-closing one;
//! - packets and bytes per direction equal what was fed, the other direction untouched;
//!   `last_seen_ns` is the latest clock seen (never back), never before `created_ns`; flags only
//!   gain `CT_F_SEEN_REPLY`; TCP flags seen are the OR of the flags fed per direction; no other
//!   field changes; an entry is never expired at its own last-seen time;
//! - the handshake RTT is the time from the SYN that entered `SYN_SENT` to the first
//!   `SYN_SENT` -> `SYN_RECV` move after it;
//! - `update_entry_steady` applies a packet exactly when it documents (`ESTABLISHED` TCP, no
//!   SYN/FIN/RST), and then leaves the entry exactly as `update_entry` would; otherwise it leaves
//!   the entry untouched.
//!
//! Keys: a packet and its reply share `canonical_key`, from opposite sides (endpoint `a` the
//! smaller); `ipv4_key` is `canonical_key` of the IPv4 endpoints; `with_port` between distinct
//! addresses is the canonical key of the new endpoints.

#[path = "../../lb-core/tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

use bpf_common::{
    Addr16, FAMILY_IPV4, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
    ct::{CT_F_ONE_WAY, CT_F_SEEN_REPLY, CtEntry},
};
use conntrack::{
    Direction, TcpFlags, TcpState, Timeouts, canonical_key, ct_timeout, direction_of, ipv4_key,
    is_expired, new_entry, tcp_transition, tcp_transition_one_way, update_entry,
    update_entry_steady, with_port,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// The documented TCP rules, as a model.
// ---------------------------------------------------------------------------------------------

/// Rules 1-6 of the `conntrack::tcp` module documentation, in priority order.
fn doc_transition(s: TcpState, dir: Direction, f: u8) -> TcpState {
    use Direction::{Original as O, Reply as R};
    use TcpState::*;
    let (fin, syn, rst, ack) = (f & 0x01 != 0, f & 0x02 != 0, f & 0x04 != 0, f & 0x10 != 0);
    if syn && (fin || rst) {
        return s;
    }
    if rst {
        return Closed;
    }
    if syn {
        return match (s, dir) {
            (None | SynSent | TimeWait | Closed, O) if !ack => SynSent,
            (SynSent, R) => SynRecv,
            (SynRecv, _) => SynRecv,
            _ => s,
        };
    }
    if fin {
        return match (s, dir) {
            (Established | SynRecv, O) => FinWait,
            (Established | SynRecv, R) => CloseWait,
            (FinWait, R) | (CloseWait, O) => TimeWait,
            _ => s,
        };
    }
    if ack && s == SynRecv && dir == O {
        return Established;
    }
    s
}

/// `tcp_transition_one_way`'s documentation: in `SynSent`, an ACK without SYN or RST (and not
/// an invalid combination) proves the handshake; then the packet is applied normally.
fn doc_transition_one_way(s: TcpState, f: u8) -> TcpState {
    let proved = s == TcpState::SynSent
        && f & 0x10 != 0
        && f & 0x02 == 0
        && f & 0x04 == 0
        && !TcpFlags(f).is_invalid_combination();
    let s = if proved { TcpState::Established } else { s };
    doc_transition(s, Direction::Original, f)
}

/// The edges of the transition graph the documentation allows (self-loops included).
fn allowed(from: TcpState, to: TcpState, one_way: bool) -> bool {
    use TcpState::*;
    if from == to || to == Closed {
        return true;
    }
    let two_way = match from {
        None => matches!(to, SynSent),
        SynSent => matches!(to, SynRecv),
        SynRecv => matches!(to, Established | FinWait | CloseWait),
        Established => matches!(to, FinWait | CloseWait),
        FinWait | CloseWait => matches!(to, TimeWait),
        TimeWait => matches!(to, SynSent),
        Closed => matches!(to, SynSent),
    };
    // One way: SYN_SENT's first ACK establishes, and the same packet may carry a FIN.
    two_way || (one_way && from == SynSent && matches!(to, Established | FinWait))
}

#[test]
fn the_model_is_the_transition_function() {
    // Exhaustive: the model above is what the crate implements, so the sequences below check
    // the crate against its documentation, not against itself.
    for s in TcpState::ALL {
        for dir in [Direction::Original, Direction::Reply] {
            for f in 0..=u8::MAX {
                assert_eq!(
                    tcp_transition(s, dir, TcpFlags(f)),
                    doc_transition(s, dir, f),
                    "{s:?} {dir:?} {f:#04x}"
                );
            }
        }
        for f in 0..=u8::MAX {
            assert_eq!(
                tcp_transition_one_way(s, TcpFlags(f)),
                doc_transition_one_way(s, f),
                "one way {s:?} {f:#04x}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packet sequences.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Pkt {
    reply: bool,
    flags: u8,
    len: u64,
    /// Clock step before the packet, in ns (sometimes negative: another CPU's older clock).
    dt: i64,
}

#[derive(Clone, Debug)]
struct Scenario {
    proto: u8,
    one_way: bool,
    /// `None`: a fresh entry (`new_entry`); `Some`: an entry as stored, possibly corrupted.
    stored: Option<CtEntry>,
    side: u8,
    t0: u64,
    /// Open with SYN, SYN+ACK, ACK first (reaches `ESTABLISHED`, the steady path).
    handshake: bool,
    packets: Vec<Pkt>,
}

fn flags() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(0x02u8), // SYN
        Just(0x12),   // SYN+ACK
        Just(0x10),   // ACK
        Just(0x18),   // PSH+ACK
        Just(0x11),   // FIN+ACK
        Just(0x01),   // FIN
        Just(0x04),   // RST
        Just(0x14),   // RST+ACK
        Just(0x03),   // SYN+FIN (invalid)
        Just(0x06),   // SYN+RST (invalid)
        Just(0x00),
        Just(0xd0), // ACK with ECE/CWR
        any::<u8>(),
    ]
}

fn pkt() -> impl Strategy<Value = Pkt> {
    (
        any::<bool>(),
        flags(),
        prop_oneof![Just(0u64), 20u64..1500, 0u64..=u64::from(u32::MAX)],
        prop_oneof![
            8 => 0i64..2_000_000_000,
            1 => Just(0i64),
            1 => -1_000_000_000i64..0,
        ],
    )
        .prop_map(|(reply, flags, len, dt)| Pkt {
            reply,
            flags,
            len,
            dt,
        })
}

fn stored_entry() -> impl Strategy<Value = CtEntry> {
    (
        any::<u8>(),
        prop_oneof![0u8..8, any::<u8>()],
        any::<u8>(),
        any::<[u8; 2]>(),
        0u64..1_000_000,
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(orig_side, state, flags, seen, counters, ifindex, rule_id, generation)| {
                let mut e = new_entry(5_000_000_000, orig_side);
                e.state = state;
                e.flags = flags;
                e.tcp_flags_seen = seen;
                e.packets = [counters, counters / 2];
                e.bytes = [counters * 60, counters * 30];
                e.ifindex = ifindex;
                e.rule_id = rule_id;
                e.generation = generation;
                e.policy_dir = (ifindex & 1) as u8;
                e.syn_ns = u64::from(rule_id) * 3;
                e
            },
        )
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop_oneof![
            6 => Just(PROTO_TCP),
            2 => Just(PROTO_UDP),
            1 => Just(PROTO_ICMP),
            1 => any::<u8>()
        ],
        any::<bool>(),
        prop_oneof![3 => Just(None), 1 => stored_entry().prop_map(Some)],
        0u8..2,
        prop_oneof![Just(0u64), 1u64..1 << 62],
        any::<bool>(),
        proptest::collection::vec(pkt(), 1..40),
    )
        .prop_map(
            |(proto, one_way, stored, side, t0, handshake, packets)| Scenario {
                proto,
                one_way,
                stored,
                side,
                t0,
                handshake,
                packets,
            },
        )
}

/// What the entry must hold, kept beside it from the inputs alone.
struct Model {
    state: u8,
    packets: [u64; 2],
    bytes: [u64; 2],
    last_seen: u64,
    flags: u8,
    seen: [u8; 2],
    replied: bool,
    syn_ns: u64,
    rtt_ns: u64,
}

fn check_scenario(sc: &Scenario) -> Result<(), TestCaseError> {
    let start = match sc.stored {
        Some(mut e) => {
            e.created_ns = sc.t0;
            e.last_seen_ns = sc.t0;
            if sc.one_way {
                e.flags |= CT_F_ONE_WAY;
            } else {
                e.flags &= !CT_F_ONE_WAY;
            }
            e
        }
        None => {
            let mut e = new_entry(sc.t0, sc.side);
            if sc.one_way {
                e.flags |= CT_F_ONE_WAY;
            }
            e
        }
    };
    let one_way = start.flags & CT_F_ONE_WAY != 0;
    let mut entry = start;
    let mut m = Model {
        state: start.state,
        packets: start.packets,
        bytes: start.bytes,
        last_seen: start.last_seen_ns,
        flags: start.flags,
        seen: start.tcp_flags_seen,
        replied: start.state == 1,
        syn_ns: start.syn_ns,
        rtt_ns: start.rtt_ns,
    };
    let handshake = [
        Pkt {
            reply: false,
            flags: 0x02,
            len: 60,
            dt: 1_000,
        },
        Pkt {
            reply: true,
            flags: 0x12,
            len: 60,
            dt: 250_000,
        },
        Pkt {
            reply: false,
            flags: 0x10,
            len: 52,
            dt: 1_000,
        },
    ];
    let prefix: &[Pkt] = if sc.handshake { &handshake } else { &[] };
    let mut now = sc.t0;
    let mut fed = 0u64;
    for (i, p) in prefix.iter().chain(&sc.packets).enumerate() {
        now = now.saturating_add_signed(p.dt);
        let dir = if p.reply {
            Direction::Reply
        } else {
            Direction::Original
        };
        let d = dir as usize;
        let before = entry;

        // The steady shortcut first, as the XDP program calls it.
        let mut fast = entry;
        let handled = update_entry_steady(&mut fast, sc.proto, dir, TcpFlags(p.flags), p.len, now);
        let applies = sc.proto == PROTO_TCP
            && entry.state == TcpState::Established as u8
            && p.flags & 0x07 == 0;
        prop_assert_eq!(handled, applies, "packet {}: steady shortcut applies", i);
        let update = update_entry(&mut entry, sc.proto, dir, TcpFlags(p.flags), p.len, now);
        if handled {
            prop_assert_eq!(fast, entry, "packet {}: steady shortcut == update_entry", i);
        } else {
            prop_assert_eq!(
                fast,
                before,
                "packet {}: steady shortcut left it untouched",
                i
            );
        }
        fed += 1;

        // Model.
        m.packets[d] = m.packets[d].wrapping_add(1);
        m.bytes[d] = m.bytes[d].wrapping_add(p.len);
        m.last_seen = m.last_seen.max(now);
        if p.reply {
            m.flags |= CT_F_SEEN_REPLY;
            m.replied = true;
        }
        let old = TcpState::from_u8(m.state);
        if sc.proto == PROTO_TCP {
            m.seen[d] |= p.flags;
            let new = if one_way && !p.reply {
                doc_transition_one_way(old, p.flags)
            } else {
                doc_transition(old, dir, p.flags)
            };
            prop_assert!(
                allowed(old, new, one_way),
                "packet {i}: {old:?} -> {new:?} is not an allowed transition"
            );
            if new == TcpState::SynSent && old != TcpState::SynSent {
                (m.syn_ns, m.rtt_ns) = (now, 0);
            }
            if old == TcpState::SynSent
                && new == TcpState::SynRecv
                && m.syn_ns != 0
                && m.rtt_ns == 0
            {
                m.rtt_ns = now.saturating_sub(m.syn_ns);
            }
            prop_assert_eq!(
                update.closed,
                !old.is_closing() && new.is_closing(),
                "packet {}: closed",
                i
            );
            m.state = new as u8;
        } else {
            m.state = u8::from(m.replied);
            prop_assert!(!update.closed);
        }

        prop_assert_eq!(update.old_state, before.state, "packet {}", i);
        prop_assert_eq!(update.new_state, entry.state, "packet {}", i);
        prop_assert_eq!(entry.state, m.state, "packet {}: state", i);
        prop_assert_eq!(entry.packets, m.packets, "packet {}: packets", i);
        prop_assert_eq!(entry.bytes, m.bytes, "packet {}: bytes", i);
        prop_assert_eq!(entry.last_seen_ns, m.last_seen, "packet {}: last seen", i);
        prop_assert!(entry.last_seen_ns >= before.last_seen_ns);
        prop_assert!(entry.last_seen_ns >= entry.created_ns);
        prop_assert_eq!(entry.flags, m.flags, "packet {}: flags", i);
        prop_assert_eq!(entry.tcp_flags_seen, m.seen, "packet {}: TCP flags seen", i);
        prop_assert_eq!(
            (entry.syn_ns, entry.rtt_ns),
            (m.syn_ns, m.rtt_ns),
            "packet {}: SYN time and RTT",
            i
        );
        let untouched = |e: &CtEntry| {
            (
                e.created_ns,
                e.ifindex,
                e.rule_id,
                e.generation,
                e.orig_side,
                e.policy_dir,
                e._pad,
            )
        };
        prop_assert_eq!(untouched(&entry), untouched(&start), "packet {}", i);
        let timeout = ct_timeout(&Timeouts::DEFAULT, sc.proto, entry.state);
        prop_assert!(!is_expired(entry.last_seen_ns, entry.last_seen_ns, timeout));
        prop_assert!(!is_expired(entry.last_seen_ns, now, timeout) || now > entry.last_seen_ns);
    }
    if sc.stored.is_none() {
        prop_assert_eq!(
            entry.packets[0] + entry.packets[1],
            fed,
            "every packet counted"
        );
    }
    Ok(())
}

#[test]
fn fuzz_conntrack_packet_sequences() {
    fuzz_harness::check("conntrack_sequences", scenario(), |sc| check_scenario(&sc));
}

// ---------------------------------------------------------------------------------------------
// Keys.
// ---------------------------------------------------------------------------------------------

fn addr() -> impl Strategy<Value = Addr16> {
    prop_oneof![
        any::<u32>().prop_map(|a| [a, 0, 0, 0]),
        any::<[u32; 4]>(),
        // Few distinct values, so equal addresses and ports come up.
        (0u32..3).prop_map(|a| [a, 0, 0, 0]),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![any::<u16>(), 0u16..3]
}

/// `(a, pa) < (b, pb)` in the documented order: addresses word by word as stored, then ports.
fn endpoint_lt(a: &Addr16, pa: u16, b: &Addr16, pb: u16) -> bool {
    (a, pa) < (b, pb)
}

#[test]
fn fuzz_conntrack_keys() {
    let strategy = (addr(), port(), addr(), port(), any::<u8>(), port(), 0u8..2);
    fuzz_harness::check(
        "conntrack_keys",
        strategy,
        |(src, sp, dst, dp, proto, new_port, which)| {
            let (key, side) = canonical_key(src, sp, dst, dp, proto, FAMILY_IPV4);
            let (rkey, rside) = canonical_key(dst, dp, src, sp, proto, FAMILY_IPV4);
            prop_assert_eq!(key, rkey, "a packet and its reply share the key");
            prop_assert!(!endpoint_lt(
                &key.addr_b,
                key.port_b_be,
                &key.addr_a,
                key.port_a_be
            ));
            if (src, sp) == (dst, dp) {
                prop_assert_eq!((side, rside), (0, 0));
            } else {
                prop_assert_eq!(side, 1 - rside, "opposite sides");
                prop_assert_eq!(direction_of(side, rside), Direction::Reply);
            }
            prop_assert_eq!(direction_of(side, side), Direction::Original);
            let (sent_a, sent_pa) = if side == 0 { (src, sp) } else { (dst, dp) };
            prop_assert_eq!((key.addr_a, key.port_a_be), (sent_a, sent_pa));
            prop_assert_eq!(key.proto, proto);

            let (k4, s4) = ipv4_key(src[0], sp, dst[0], dp, proto);
            let (c4, cs4) = canonical_key(
                [src[0], 0, 0, 0],
                sp,
                [dst[0], 0, 0, 0],
                dp,
                proto,
                FAMILY_IPV4,
            );
            prop_assert_eq!((k4, s4), (c4, cs4));

            // with_port: replace the port of canonical side `which`.
            if key.addr_a != key.addr_b {
                let moved = with_port(key, which, new_port);
                let (a, pa, b, pb) = if which == 0 {
                    (key.addr_a, new_port, key.addr_b, key.port_b_be)
                } else {
                    (key.addr_a, key.port_a_be, key.addr_b, new_port)
                };
                let (expected, _) = canonical_key(a, pa, b, pb, proto, FAMILY_IPV4);
                prop_assert_eq!(moved, expected);
            }
            Ok(())
        },
    );
}
