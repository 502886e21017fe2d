//! Connection-tracking logic shared by the BPF programs and the daemon.
//!
//! Everything here is pure, `const`, allocation-free and panic-free, because the same code is
//! compiled for `bpfel-unknown-none`, where the verifier rejects unbounded loops and a panic
//! has nowhere to go. The host side (the conntrack garbage collector, tests) uses the very
//! same functions, so what the daemon expires is exactly what the kernel side would.
#![no_std]

mod flags;
mod flow;
mod tcp;
mod timeout;
mod udp;

pub use flags::TcpFlags;
pub use flow::{
    CtUpdate, canonical_key, ct_timeout, direction_of, ipv4_key, new_entry, state_name,
    update_entry, update_entry_steady, with_port,
};
pub use tcp::{TcpState, opens_new_connection, tcp_transition, tcp_transition_one_way};
pub use timeout::{Timeouts, is_expired};
pub use udp::{IcmpState, UdpState, icmp_transition, udp_transition};

/// Which way a packet travels relative to the flow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Same direction as the first packet the tracker saw for this flow.
    Original = 0,
    /// The opposite direction.
    Reply = 1,
}

impl Direction {
    /// Decodes a stored direction byte; anything but 1 reads as `Original` so that a
    /// corrupted map value cannot make a transition function misbehave.
    #[must_use]
    pub const fn from_u8(v: u8) -> Direction {
        match v {
            1 => Direction::Reply,
            _ => Direction::Original,
        }
    }

    /// The other direction.
    #[must_use]
    pub const fn reverse(self) -> Direction {
        match self {
            Direction::Original => Direction::Reply,
            Direction::Reply => Direction::Original,
        }
    }
}
