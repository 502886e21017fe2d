//! Per-packet outcome counters (`LB_REASONS`, a per-CPU array indexed by these constants).
//!
//! Each rule of the XDP program's parsing and forwarding counts under exactly one reason, so
//! the counters explain every verdict. `NAMES[i]` is the metric label of reason `i`.

/// Neither IPv4 nor IPv6 (ARP, other ethertypes): passed to the stack untouched.
pub const PASS_NOT_IPV4: u32 = 0;
/// IPv4 but not addressed to a VIP and not a full-NAT reply: passed untouched.
pub const PASS_NOT_VIP: u32 = 1;
/// Ethernet, VLAN or IPv4 header truncated: passed untouched (the kernel drops it).
pub const PASS_TRUNCATED_L3: u32 = 2;
/// IPv4 header malformed (IHL < 5, total length shorter than the header or longer than the
/// frame): passed untouched (the kernel drops it).
pub const PASS_MALFORMED_IPV4: u32 = 3;
/// Addressed to a VIP address but the TCP/UDP header is truncated: dropped.
pub const DROP_TRUNCATED_L4: u32 = 4;
/// A fragment addressed to a VIP address: dropped, since non-first fragments carry no ports
/// to hash on and the first one alone cannot be forwarded consistently.
pub const DROP_FRAGMENT: u32 = 5;
/// The service has no active backend: dropped.
pub const DROP_NO_BACKEND: u32 = 6;
/// Full-NAT found no free source port within its tries: dropped.
pub const DROP_NAT_PORTS_EXHAUSTED: u32 = 7;
/// `bpf_fib_lookup` found the route but no neighbour entry: passed to the stack (already
/// rewritten in full-NAT) so the kernel resolves the neighbour.
pub const PASS_FIB_NO_NEIGH: u32 = 8;
/// `bpf_fib_lookup` found no usable route (unreachable, blackhole, forwarding disabled): dropped.
pub const DROP_FIB_FAILED: u32 = 9;
/// The egress interface is not one the daemon manages (not in `LB_TX_PORTS`): passed to the
/// stack (already rewritten in full-NAT).
pub const PASS_NO_TX_PORT: u32 = 10;
/// Forwarded with `XDP_TX` (egress interface == ingress interface).
pub const FWD_TX: u32 = 11;
/// Forwarded with a devmap redirect.
pub const FWD_REDIRECT: u32 = 12;
/// A full-NAT reply translated back towards the client.
pub const NAT_REPLY_TRANSLATED: u32 = 13;
/// An ICMP error about a full-NAT flow translated back towards the client.
pub const ICMP_TRANSLATED: u32 = 14;
/// The egress MTU is too small for the packet: passed to the stack (already rewritten in
/// full-NAT), which answers with ICMP "fragmentation needed" or fragments it.
pub const PASS_FRAG_NEEDED: u32 = 15;
/// A packet to a VIP address with a protocol other than TCP/UDP (an ICMP echo, say), or an
/// ICMP message that is not an error about a full-NAT flow: passed untouched.
pub const PASS_VIP_ADDR_OTHER: u32 = 16;
/// IPv4 header with options on a VIP flow: forwarded with the options unchanged (counted only).
pub const SEEN_IP_OPTIONS: u32 = 17;
/// A new flow pinned to a backend.
pub const NEW_FLOW: u32 = 18;
/// A flow whose backend was removed, moved to another backend.
pub const FLOW_RESCHEDULED: u32 = 19;

/// A full-NAT source port whose reverse entry belonged to a flow no longer in the flow table,
/// reclaimed for a new flow.
pub const NAT_PORT_RECLAIMED: u32 = 20;

/// The program's own per-CPU scratch slot was missing. A one-entry array's lookup cannot fail,
/// but the verifier requires the check, and the packet is dropped rather than half-processed.
pub const DROP_INTERNAL: u32 = 21;

/// A new flow to a service with source ranges (`loadBalancerSourceRanges`) from a source
/// outside them: dropped.
pub const DROP_SOURCE_RANGE: u32 = 22;

/// A DSR TCP SYN forwarded to its Maglev backend without a flow entry, because its CPU was over
/// the SYN-flood rate (`bpf_common::SynFloodWindow`). The flow's entry is made by its first
/// packet that is not a SYN.
pub const NEW_FLOW_UNTRACKED: u32 = 23;

/// IPv6 header malformed (version not 6, payload length beyond the frame): passed untouched
/// (the kernel drops it).
pub const PASS_MALFORMED_IPV6: u32 = 24;
/// ICMPv6 neighbour discovery (types 133-137): always passed untouched, VIP addresses
/// included, or the node would stop resolving its neighbours.
pub const PASS_NEIGHBOUR_DISCOVERY: u32 = 25;
/// An IPv6 packet to a VIP address whose transport header lies behind more extension headers
/// than the program walks (`lb_core::parse6::MAX_EXT_HEADERS`): dropped.
pub const DROP_EXT_HEADER_LIMIT: u32 = 26;
/// An IPv6 frame while the IPv6 program is missing from `LB_PROGS` (the tail call failed):
/// passed untouched. Only a daemon that failed half-way through its start leaves this.
pub const PASS_IPV6_UNAVAILABLE: u32 = 27;

/// Number of reasons; the size of `LB_REASONS`.
pub const COUNT: u32 = 28;

/// Whether `reason` is a verdict: every packet counts exactly one verdict reason. The others
/// (`nat_reply_translated`, `icmp_translated`, `seen_ip_options`, `new_flow`,
/// `flow_rescheduled`, `nat_port_reclaimed`, `new_flow_untracked`) are events counted beside the
/// verdict.
pub const fn is_verdict(reason: u32) -> bool {
    !matches!(
        reason,
        NAT_REPLY_TRANSLATED
            | ICMP_TRANSLATED
            | SEEN_IP_OPTIONS
            | NEW_FLOW
            | FLOW_RESCHEDULED
            | NAT_PORT_RECLAIMED
            | NEW_FLOW_UNTRACKED
    ) && reason < COUNT
}

/// Metric label of each reason, indexed by its constant.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_ipv4",
    "pass_not_vip",
    "pass_truncated_l3",
    "pass_malformed_ipv4",
    "drop_truncated_l4",
    "drop_fragment",
    "drop_no_backend",
    "drop_nat_ports_exhausted",
    "pass_fib_no_neigh",
    "drop_fib_failed",
    "pass_no_tx_port",
    "fwd_tx",
    "fwd_redirect",
    "nat_reply_translated",
    "icmp_translated",
    "pass_frag_needed",
    "pass_vip_addr_other",
    "seen_ip_options",
    "new_flow",
    "flow_rescheduled",
    "nat_port_reclaimed",
    "drop_internal",
    "drop_source_range",
    "new_flow_untracked",
    "pass_malformed_ipv6",
    "pass_neighbour_discovery",
    "drop_ext_header_limit",
    "pass_ipv6_unavailable",
];
