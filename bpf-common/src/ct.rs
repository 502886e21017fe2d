//! The conntrack record of the datapath: one entry per flow, for both directions. The tc
//! programs keep it in `CT_FLOWS`; the XDP load balancer keys `LB_FLOWS` and `LB_NAT_REV` by the
//! same [`CtKey`] and embeds a [`CtEntry`] in every `FlowEntry`, advanced by the same
//! `conntrack::update_entry`.
//!
//! The key is *canonical*: the two endpoints (address, port) are stored in a fixed order (the
//! smaller one first, see `conntrack::flow`), so a packet and its reply find the same entry.
//! The entry remembers which side opened the flow (`orig_side`), from which the direction of
//! every later packet follows.

use crate::Addr16;

/// Key of `CT_FLOWS`: a canonical, family-agnostic flow key.
///
/// Endpoint `a` is the smaller of the two `(address, port)` pairs (addresses compared word by
/// word as stored, then ports), endpoint `b` the other. For ICMP echo both ports hold the echo
/// identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Network byte order.
    pub addr_a: Addr16,
    /// Network byte order.
    pub addr_b: Addr16,
    /// Network byte order.
    pub port_a_be: u16,
    /// Network byte order.
    pub port_b_be: u16,
    pub proto: u8,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);

/// `CtEntry::flags`: an "opened" event was emitted for this flow.
pub const CT_F_OPEN_REPORTED: u8 = 0x01;
/// `CtEntry::flags`: a "closed" event was emitted for this flow.
pub const CT_F_CLOSE_REPORTED: u8 = 0x02;
/// `CtEntry::flags`: a packet in the reply direction was seen.
pub const CT_F_SEEN_REPLY: u8 = 0x04;
/// `CtEntry::flags`: the flow was admitted by a rule with action `log`.
pub const CT_F_LOGGED: u8 = 0x08;
/// `CtEntry::flags`: the tracker sits on a one-way path and never sees the reply direction
/// (the load balancer in DSR mode: backends answer clients directly). The TCP state machine
/// then takes the original side's first ACK as proof of the handshake
/// (`conntrack::tcp_transition_one_way`).
pub const CT_F_ONE_WAY: u8 = 0x10;

/// `CtEntry::policy_dir` / `FlowEvent::policy_dir`: the endpoint's ingress rules admitted it.
pub const POLICY_DIR_INGRESS: u8 = 0;
/// The endpoint's egress rules admitted it.
pub const POLICY_DIR_EGRESS: u8 = 1;

/// `CtEntry::rule_id` when the endpoint's default action admitted the flow.
pub const RULE_DEFAULT: u32 = u32::MAX;

/// Value of `CT_FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` of the first packet.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet, either direction.
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_ns` of the SYN that opened a TCP flow (0 otherwise).
    pub syn_ns: u64,
    /// TCP handshake round-trip time as seen at this node: from the opening SYN to the
    /// SYN+ACK. 0 until observed.
    pub rtt_ns: u64,
    /// Packets per direction, indexed by `conntrack::Direction` (original, reply).
    pub packets: [u64; 2],
    /// Bytes (IP total length) per direction.
    pub bytes: [u64; 2],
    /// Interface whose policy admitted the flow (in `LB_FLOWS`: the interface the first packet
    /// arrived on).
    pub ifindex: u32,
    /// Rule that admitted the flow, or [`RULE_DEFAULT`] (0 in `LB_FLOWS`).
    pub rule_id: u32,
    /// Policy generation the admission was last checked against. When the live generation
    /// differs, the next packet re-checks the flow against the live policy (0 in `LB_FLOWS`).
    pub generation: u32,
    /// A `conntrack::TcpState`, `UdpState` or `IcmpState` as a byte, by `CtKey::proto`.
    pub state: u8,
    /// Canonical side (0: endpoint `a`, 1: endpoint `b`) that sent the first packet.
    pub orig_side: u8,
    /// [`POLICY_DIR_INGRESS`] or [`POLICY_DIR_EGRESS`].
    pub policy_dir: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// TCP flags seen, OR-ed, per direction.
    pub tcp_flags_seen: [u8; 2],
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 88);
