//! A simplified TCP connection state machine in the spirit of Linux `nf_conntrack_proto_tcp`.
//!
//! It looks at flags and direction only, never at sequence numbers: the tracker's job here is
//! to pick an idle timeout and to tell the load balancer when a flow is over, not to police
//! TCP windows. Exact rules, in priority order:
//!
//! 1. SYN together with FIN or RST: ignored (state kept). No conforming stack sends these, and
//!    ignoring them stops a crafted packet from resetting or reopening a flow.
//! 2. RST (from either side, in any state): `Closed`.
//! 3. SYN (with or without ACK):
//!    - SYN without ACK from the original side in `None`, `SynSent`, `TimeWait` or `Closed`:
//!      `SynSent` (first SYN, retransmitted SYN, or the port being reused for a new flow).
//!    - SYN from the reply side in `SynSent`: `SynRecv` (with ACK: the normal SYN+ACK;
//!      without ACK: simultaneous open).
//!    - any SYN in `SynRecv`: `SynRecv` (retransmissions while the handshake completes).
//!    - otherwise the state is kept (e.g. a stray SYN on an established flow).
//! 4. FIN (with or without ACK):
//!    - in `Established` (or `SynRecv`, where the FIN's ACK completes the handshake): from the
//!      original side `FinWait`, from the reply side `CloseWait`. The state therefore records
//!      *which* side closed first.
//!    - the other side's FIN in `FinWait` / `CloseWait`: `TimeWait`. Without sequence numbers
//!      the ACK of the last FIN cannot be told apart from any other ACK, so the flow moves to
//!      `TimeWait` as soon as both sides have sent FIN; `TimeWait` uses the short closing
//!      timeout, which also covers the remaining LAST_ACK exchange.
//!    - otherwise kept (FIN retransmissions, FIN before the handshake finished).
//! 5. ACK without SYN/FIN/RST: from the original side in `SynRecv`: `Established` (the third
//!    packet of the handshake). Otherwise kept: data and ACKs during a half-close stay in
//!    `FinWait`/`CloseWait`, ACKs in `TimeWait` (including the ACK of the last FIN) stay there.
//! 6. Anything else keeps the state.
//!
//! Consequences worth knowing: a flow first seen mid-stream (no SYN) stays `None`, which the
//! caller may treat as "unknown"; a simultaneous open only reaches `Established` once the
//! original side sends a packet with ACK and without SYN.

use crate::{Direction, TcpFlags};

/// Tracked TCP state, stored as one byte in the flow entry.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TcpState {
    /// Nothing that opens a connection seen yet.
    #[default]
    None = 0,
    /// The original side sent SYN.
    SynSent = 1,
    /// The reply side answered with SYN+ACK (or SYN, simultaneous open).
    SynRecv = 2,
    /// Handshake completed.
    Established = 3,
    /// The original side sent FIN first.
    FinWait = 4,
    /// The reply side sent FIN first.
    CloseWait = 5,
    /// Both sides sent FIN.
    TimeWait = 6,
    /// Reset by either side.
    Closed = 7,
}

impl TcpState {
    /// Every state, in discriminant order.
    pub const ALL: [TcpState; 8] = [
        TcpState::None,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait,
        TcpState::CloseWait,
        TcpState::TimeWait,
        TcpState::Closed,
    ];

    /// Decodes a stored state byte; unknown values read as `None` so that a corrupted or
    /// future map value degrades to "untracked" rather than to an arbitrary state.
    #[must_use]
    pub const fn from_u8(v: u8) -> TcpState {
        match v {
            1 => TcpState::SynSent,
            2 => TcpState::SynRecv,
            3 => TcpState::Established,
            4 => TcpState::FinWait,
            5 => TcpState::CloseWait,
            6 => TcpState::TimeWait,
            7 => TcpState::Closed,
            _ => TcpState::None,
        }
    }

    /// Stable upper-case name for metrics labels and the CLI (Linux conntrack spelling).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Closed => "CLOSE",
        }
    }

    /// True once either side has started closing or the flow was reset: the load balancer
    /// may then stop preferring this flow's cached backend for a reopened connection.
    #[must_use]
    pub const fn is_closing(self) -> bool {
        matches!(
            self,
            TcpState::FinWait | TcpState::CloseWait | TcpState::TimeWait | TcpState::Closed
        )
    }
}

/// Whether a packet with `flags` from the original side starts a new connection on a record
/// in `state`, instead of continuing it: a SYN without ACK (a valid combination) on a record
/// whose connection has ended. As in Linux's conntrack, that is `TimeWait` and `Closed` for a
/// two-way tracker. A one-way tracker (`one_way`, DSR) never sees the server's FIN, so its
/// records of closed connections stop in `FinWait` or `CloseWait`: there, any closing state
/// counts, since a client sends a bare SYN only to open a connection (a retransmitted SYN
/// comes in `SynSent`). The caller then treats the packet as the first of a new flow: a fresh
/// backend choice and record, so a draining backend gets no new connection through a recycled
/// 5-tuple.
#[must_use]
#[inline(always)]
pub const fn opens_new_connection(state: TcpState, flags: TcpFlags, one_way: bool) -> bool {
    let bare_syn = flags.syn() && !flags.ack() && !flags.rst() && !flags.is_invalid_combination();
    if !bare_syn {
        return false;
    }
    if one_way {
        state.is_closing()
    } else {
        matches!(state, TcpState::TimeWait | TcpState::Closed)
    }
}

/// Next state after an original-direction packet with `flags`, for a tracker that never sees
/// the reply direction (`CT_F_ONE_WAY`: the load balancer in DSR mode). It is
/// [`tcp_transition`] with one inference added first: in `SynSent`, an ACK without SYN or RST
/// from the original side proves that the SYN+ACK reached the client (a client ACKs nothing
/// before it), so the flow is taken as `Established`. The packet is then applied normally, so
/// an ACK+FIN right after the handshake lands in `FinWait`. A two-way tracker must not use
/// this: it would let a forged ACK establish a flow whose SYN+ACK never came.
#[must_use]
#[inline(always)]
pub const fn tcp_transition_one_way(state: TcpState, flags: TcpFlags) -> TcpState {
    let handshake_proved = matches!(state, TcpState::SynSent)
        && flags.ack()
        && !flags.syn()
        && !flags.rst()
        && !flags.is_invalid_combination();
    let state = if handshake_proved {
        TcpState::Established
    } else {
        state
    };
    tcp_transition(state, Direction::Original, flags)
}

/// Next state after a packet with `flags` travelling in `dir`. Pure and total: every input
/// yields a state, packets that do not fit the rules keep the current one. See the module
/// documentation for the exact rules.
#[must_use]
#[inline(always)]
pub const fn tcp_transition(state: TcpState, dir: Direction, flags: TcpFlags) -> TcpState {
    use Direction::{Original, Reply};
    use TcpState::{CloseWait, Closed, Established, FinWait, None, SynRecv, SynSent, TimeWait};

    if flags.is_invalid_combination() {
        return state;
    }
    if flags.rst() {
        return Closed;
    }
    if flags.syn() {
        return match (state, dir, flags.ack()) {
            (None | SynSent | TimeWait | Closed, Original, false) => SynSent,
            (SynSent, Reply, _) => SynRecv,
            (SynRecv, _, _) => SynRecv,
            _ => state,
        };
    }
    if flags.fin() {
        return match (state, dir) {
            (Established | SynRecv, Original) => FinWait,
            (Established | SynRecv, Reply) => CloseWait,
            (FinWait, Reply) | (CloseWait, Original) => TimeWait,
            _ => state,
        };
    }
    if flags.ack() {
        return match (state, dir) {
            (SynRecv, Original) => Established,
            _ => state,
        };
    }
    state
}
