//! Idle timeouts, in nanoseconds of `bpf_ktime_get_ns` (CLOCK_MONOTONIC), so the kernel side
//! and the daemon's garbage collector compare like with like.

use crate::TcpState;

const NS_PER_SEC: u64 = 1_000_000_000;

/// Idle timeout per protocol/state. An entry is expired once it has been idle for longer than
/// the timeout that applies to its current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Timeouts {
    /// `None`, `SynSent`, `SynRecv`: a handshake that does not complete should not pin an
    /// entry for long.
    pub tcp_syn_ns: u64,
    /// `Established`.
    pub tcp_established_ns: u64,
    /// `FinWait`, `CloseWait`, `TimeWait`, `Closed`.
    pub tcp_closing_ns: u64,
    /// UDP flows, whether or not a reply was seen.
    pub udp_ns: u64,
    /// ICMP and any other protocol.
    pub other_ns: u64,
}

impl Timeouts {
    /// SYN 60 s, established 6 h, closing 10 s, UDP 60 s, other 60 s.
    pub const DEFAULT: Timeouts = Timeouts {
        tcp_syn_ns: 60 * NS_PER_SEC,
        tcp_established_ns: 6 * 3600 * NS_PER_SEC,
        tcp_closing_ns: 10 * NS_PER_SEC,
        udp_ns: 60 * NS_PER_SEC,
        other_ns: 60 * NS_PER_SEC,
    };

    /// The idle timeout for a TCP flow in state `s`. `None` (a flow first seen without a SYN)
    /// gets the SYN timeout: the tracker knows nothing about it, so it should not linger.
    #[must_use]
    #[inline(always)]
    pub const fn for_tcp_state(&self, s: TcpState) -> u64 {
        match s {
            TcpState::None | TcpState::SynSent | TcpState::SynRecv => self.tcp_syn_ns,
            TcpState::Established => self.tcp_established_ns,
            TcpState::FinWait | TcpState::CloseWait | TcpState::TimeWait | TcpState::Closed => {
                self.tcp_closing_ns
            }
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts::DEFAULT
    }
}

/// True when an entry last seen at `last_seen_ns` has been idle for strictly longer than
/// `timeout_ns` at `now_ns`. The subtraction saturates: an entry stamped after `now_ns` (another
/// CPU updated it after the caller read the clock) counts as idle for zero time and is never
/// expired, not even with a zero timeout.
#[must_use]
#[inline(always)]
pub const fn is_expired(last_seen_ns: u64, now_ns: u64, timeout_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeout_ns
}
