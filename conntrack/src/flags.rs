//! TCP header flags as they appear in byte 13 of the TCP header.

use core::ops::BitOr;

/// The flags byte of a TCP header (byte 13), kept raw so the BPF side can load it with a
/// single byte read and pass it straight to [`crate::tcp_transition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const NONE: TcpFlags = TcpFlags(0);
    pub const FIN: TcpFlags = TcpFlags(0x01);
    pub const SYN: TcpFlags = TcpFlags(0x02);
    pub const RST: TcpFlags = TcpFlags(0x04);
    pub const PSH: TcpFlags = TcpFlags(0x08);
    pub const ACK: TcpFlags = TcpFlags(0x10);
    pub const URG: TcpFlags = TcpFlags(0x20);
    pub const ECE: TcpFlags = TcpFlags(0x40);
    pub const CWR: TcpFlags = TcpFlags(0x80);
    pub const SYN_ACK: TcpFlags = TcpFlags(0x12);
    pub const FIN_ACK: TcpFlags = TcpFlags(0x11);
    pub const RST_ACK: TcpFlags = TcpFlags(0x14);

    /// True when every bit of `other` is set in `self`.
    #[must_use]
    #[inline(always)]
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets of bits (`const` counterpart of `|`).
    #[must_use]
    #[inline(always)]
    pub const fn union(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | other.0)
    }

    #[must_use]
    #[inline(always)]
    pub const fn fin(self) -> bool {
        self.contains(TcpFlags::FIN)
    }

    #[must_use]
    #[inline(always)]
    pub const fn syn(self) -> bool {
        self.contains(TcpFlags::SYN)
    }

    #[must_use]
    #[inline(always)]
    pub const fn rst(self) -> bool {
        self.contains(TcpFlags::RST)
    }

    #[must_use]
    #[inline(always)]
    pub const fn ack(self) -> bool {
        self.contains(TcpFlags::ACK)
    }

    /// SYN together with FIN or RST is never sent by a conforming stack (Linux conntrack
    /// marks it invalid too); the state machine ignores such packets instead of letting a
    /// crafted packet reset or reopen a flow.
    #[must_use]
    #[inline(always)]
    pub const fn is_invalid_combination(self) -> bool {
        self.syn() && (self.fin() || self.rst())
    }
}

impl BitOr for TcpFlags {
    type Output = TcpFlags;

    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        self.union(rhs)
    }
}
