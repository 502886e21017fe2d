//! Pseudo-states for connectionless protocols: all the tracker learns is whether the other
//! side ever answered, which is what a stateful policy needs to admit reply traffic.

use crate::Direction;

/// UDP flow state, stored as one byte in the flow entry.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum UdpState {
    /// Only original-direction packets seen so far.
    #[default]
    New = 0,
    /// At least one reply-direction packet seen.
    Replied = 1,
}

impl UdpState {
    /// Decodes a stored byte; unknown values read as `New`.
    #[must_use]
    pub const fn from_u8(v: u8) -> UdpState {
        match v {
            1 => UdpState::Replied,
            _ => UdpState::New,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            UdpState::New => "NEW",
            UdpState::Replied => "REPLIED",
        }
    }
}

/// Next UDP state: a reply-direction packet marks the flow replied; nothing goes back.
#[must_use]
#[inline(always)]
pub const fn udp_transition(state: UdpState, dir: Direction) -> UdpState {
    match dir {
        Direction::Reply => UdpState::Replied,
        Direction::Original => state,
    }
}

/// ICMP (echo and friends) pseudo-state, stored as one byte in the flow entry.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum IcmpState {
    /// Only requests (original direction) seen so far.
    #[default]
    New = 0,
    /// At least one reply seen.
    Replied = 1,
}

impl IcmpState {
    /// Decodes a stored byte; unknown values read as `New`.
    #[must_use]
    pub const fn from_u8(v: u8) -> IcmpState {
        match v {
            1 => IcmpState::Replied,
            _ => IcmpState::New,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            IcmpState::New => "NEW",
            IcmpState::Replied => "REPLIED",
        }
    }
}

/// Next ICMP state: a reply-direction packet marks the flow replied; nothing goes back.
#[must_use]
#[inline(always)]
pub const fn icmp_transition(state: IcmpState, dir: Direction) -> IcmpState {
    match dir {
        Direction::Reply => IcmpState::Replied,
        Direction::Original => state,
    }
}
