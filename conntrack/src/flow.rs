//! Bidirectional flow keys and the per-packet update of a conntrack entry.
//!
//! [`canonical_key`] orders the two endpoints of a packet so that the packet and its reply
//! produce the same [`CtKey`]; it also says which canonical side sent the packet. The entry
//! stores the side that opened the flow, so [`direction_of`] tells original from reply for
//! every later packet. [`update_entry`] is the one place that advances an entry: counters,
//! last-seen time, the protocol's state machine ([`crate::tcp_transition`] for TCP, the
//! pseudo-states for UDP and ICMP) and the handshake round-trip time.

use bpf_common::{
    Addr16, FAMILY_IPV4, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
    ct::{CT_F_ONE_WAY, CT_F_SEEN_REPLY, CtEntry, CtKey},
};

use crate::{
    Direction, IcmpState, TcpFlags, TcpState, Timeouts, UdpState, icmp_transition, tcp_transition,
    tcp_transition_one_way, udp_transition,
};

/// True when `(a, pa)` sorts strictly before `(b, pb)`: addresses word by word as stored,
/// then ports as stored. Any fixed total order works; this one needs no byte swapping.
#[inline(always)]
const fn endpoint_lt(a: &Addr16, pa: u16, b: &Addr16, pb: u16) -> bool {
    let mut i = 0;
    while i < 4 {
        if a[i] != b[i] {
            return a[i] < b[i];
        }
        i += 1;
    }
    pa < pb
}

/// The canonical key of a packet from `(src, src_port_be)` to `(dst, dst_port_be)`, and the
/// canonical side the packet was sent from (0: `a`, 1: `b`). A packet and its reply get the
/// same key and opposite sides.
#[must_use]
#[inline(always)]
pub const fn canonical_key(
    src: Addr16,
    src_port_be: u16,
    dst: Addr16,
    dst_port_be: u16,
    proto: u8,
    family: u8,
) -> (CtKey, u8) {
    if endpoint_lt(&dst, dst_port_be, &src, src_port_be) {
        (
            CtKey {
                addr_a: dst,
                addr_b: src,
                port_a_be: dst_port_be,
                port_b_be: src_port_be,
                proto,
                family,
                _pad: [0; 2],
            },
            1,
        )
    } else {
        (
            CtKey {
                addr_a: src,
                addr_b: dst,
                port_a_be: src_port_be,
                port_b_be: dst_port_be,
                proto,
                family,
                _pad: [0; 2],
            },
            0,
        )
    }
}

/// `key` with the port of canonical side `side` (0: `a`, 1: `b`) replaced by `port_be`. When the
/// two addresses differ the order is decided by the addresses alone, so the result is exactly
/// the canonical key of the new endpoints: a caller that tries many ports between the same two
/// addresses (full-NAT port allocation) computes the order once.
#[must_use]
#[inline(always)]
pub const fn with_port(mut key: CtKey, side: u8, port_be: u16) -> CtKey {
    if side == 0 {
        key.port_a_be = port_be;
    } else {
        key.port_b_be = port_be;
    }
    key
}

/// [`canonical_key`] of an IPv4 packet (or of the packet an ICMP error quotes), addresses as
/// the wire bytes read in memory order: the form the BPF parsers hand out.
#[must_use]
#[inline(always)]
pub const fn ipv4_key(
    src: u32,
    src_port_be: u16,
    dst: u32,
    dst_port_be: u16,
    proto: u8,
) -> (CtKey, u8) {
    canonical_key(
        [src, 0, 0, 0],
        src_port_be,
        [dst, 0, 0, 0],
        dst_port_be,
        proto,
        FAMILY_IPV4,
    )
}

/// Direction of a packet sent from canonical `side`, in a flow opened from `orig_side`.
#[must_use]
#[inline(always)]
pub const fn direction_of(orig_side: u8, side: u8) -> Direction {
    if orig_side == side {
        Direction::Original
    } else {
        Direction::Reply
    }
}

/// A fresh entry for a flow whose first packet was sent from canonical `side`. The first
/// packet itself is applied with [`update_entry`] afterwards, like every other one.
#[must_use]
#[inline(always)]
pub const fn new_entry(now_ns: u64, side: u8) -> CtEntry {
    CtEntry {
        created_ns: now_ns,
        last_seen_ns: now_ns,
        syn_ns: 0,
        rtt_ns: 0,
        packets: [0; 2],
        bytes: [0; 2],
        ifindex: 0,
        rule_id: 0,
        generation: 0,
        state: 0,
        orig_side: side,
        policy_dir: 0,
        flags: 0,
        tcp_flags_seen: [0; 2],
        _pad: [0; 6],
    }
}

/// The part of a packet's update that does not depend on the protocol: counters per
/// direction, last-seen time (never back), the "reply seen" flag. Returns the direction index.
#[inline(always)]
fn count_packet(entry: &mut CtEntry, dir: Direction, len: u64, now_ns: u64) -> usize {
    let d = dir as usize & 1;
    entry.packets[d] = entry.packets[d].wrapping_add(1);
    entry.bytes[d] = entry.bytes[d].wrapping_add(len);
    if now_ns > entry.last_seen_ns {
        entry.last_seen_ns = now_ns;
    }
    if let Direction::Reply = dir {
        entry.flags |= CT_F_SEEN_REPLY;
    }
    d
}

/// What one packet did to an entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtUpdate {
    /// State byte before the packet.
    pub old_state: u8,
    /// State byte after the packet.
    pub new_state: u8,
    /// The packet moved a TCP flow into a closing state (`FIN_WAIT`, `CLOSE_WAIT`,
    /// `TIME_WAIT`) or `CLOSE` from a state that was not closing.
    pub closed: bool,
}

/// Applies one packet of `len` bytes travelling in `dir` at `now_ns` to `entry`. `tcp_flags`
/// is ignored for protocols other than TCP. An entry flagged `CT_F_ONE_WAY` advances its TCP
/// state with [`crate::tcp_transition_one_way`]. Pure: the caller stores the entry.
#[inline(always)]
pub fn update_entry(
    entry: &mut CtEntry,
    proto: u8,
    dir: Direction,
    tcp_flags: TcpFlags,
    len: u64,
    now_ns: u64,
) -> CtUpdate {
    let d = count_packet(entry, dir, len, now_ns);
    let old = entry.state;
    let new = match proto {
        PROTO_TCP => {
            entry.tcp_flags_seen[d] |= tcp_flags.0;
            let before = TcpState::from_u8(old);
            let after = if entry.flags & CT_F_ONE_WAY != 0 && matches!(dir, Direction::Original) {
                tcp_transition_one_way(before, tcp_flags)
            } else {
                tcp_transition(before, dir, tcp_flags)
            };
            // The handshake RTT: first SYN to the first SYN+ACK (or simultaneous-open SYN).
            if matches!(after, TcpState::SynSent) && !matches!(before, TcpState::SynSent) {
                entry.syn_ns = now_ns;
                entry.rtt_ns = 0;
            }
            if matches!(before, TcpState::SynSent)
                && matches!(after, TcpState::SynRecv)
                && entry.syn_ns != 0
                && entry.rtt_ns == 0
            {
                entry.rtt_ns = now_ns.saturating_sub(entry.syn_ns);
            }
            after as u8
        }
        PROTO_UDP => udp_transition(UdpState::from_u8(old), dir) as u8,
        _ => icmp_transition(IcmpState::from_u8(old), dir) as u8,
    };
    entry.state = new;
    CtUpdate {
        old_state: old,
        new_state: new,
        closed: proto == PROTO_TCP
            && !TcpState::from_u8(old).is_closing()
            && TcpState::from_u8(new).is_closing(),
    }
}

/// [`update_entry`] for the one case that is most of a busy flow's packets and cannot change its
/// state: an `ESTABLISHED` TCP flow and a packet without SYN, FIN or RST. Applies the packet and
/// returns `true` then; returns `false` and leaves `entry` untouched otherwise, for the caller to
/// call [`update_entry`]. It is small enough to inline into a BPF program whose stack cannot
/// take the whole state machine (the XDP load balancer calls `update_entry` as a subprogram).
#[inline(always)]
pub fn update_entry_steady(
    entry: &mut CtEntry,
    proto: u8,
    dir: Direction,
    tcp_flags: TcpFlags,
    len: u64,
    now_ns: u64,
) -> bool {
    let control = TcpFlags::SYN.0 | TcpFlags::FIN.0 | TcpFlags::RST.0;
    if proto != PROTO_TCP
        || entry.state != TcpState::Established as u8
        || tcp_flags.0 & control != 0
    {
        return false;
    }
    let d = count_packet(entry, dir, len, now_ns);
    entry.tcp_flags_seen[d] |= tcp_flags.0;
    true
}

/// The idle timeout of a flow of protocol `proto` in state byte `state`.
#[must_use]
#[inline(always)]
pub const fn ct_timeout(t: &Timeouts, proto: u8, state: u8) -> u64 {
    match proto {
        PROTO_TCP => t.for_tcp_state(TcpState::from_u8(state)),
        PROTO_UDP => t.udp_ns,
        _ => t.other_ns,
    }
}

/// Display name of state byte `state` for protocol `proto` (`ESTABLISHED`, `REPLIED`, ...).
#[must_use]
pub const fn state_name(proto: u8, state: u8) -> &'static str {
    match proto {
        PROTO_TCP => TcpState::from_u8(state).name(),
        PROTO_UDP => UdpState::from_u8(state).name(),
        PROTO_ICMP => IcmpState::from_u8(state).name(),
        _ => IcmpState::from_u8(state).name(),
    }
}
