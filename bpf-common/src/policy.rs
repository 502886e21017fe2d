//! The kernel/user ABI of the tc (TCX) policy programs in `bpf-tc`.
//!
//! # Double buffering
//!
//! Every policy map is split in two *slots*. `TC_GENERATION[0]` holds the live generation; its
//! low bit is the live slot, and 0 means "no policy". The daemon writes a new policy whole
//! into the other slot, then flips the generation with one 4-byte array update; a packet reads
//! the generation once and sees only one slot, so it never meets a half-applied policy.
//!
//! # Rules
//!
//! `TC_RULES_LPM` maps (slot, direction, endpoint, remote address/prefix) to a rule list in
//! `TC_RULE_LISTS`. The list of a prefix holds, in the policy file's order, every rule of that
//! endpoint and direction whose CIDR contains the prefix, so the longest-prefix match followed
//! by a first-match walk of at most [`MAX_RULES_PER_LIST`] rules gives first-match semantics
//! over all rules.

use crate::Addr16;

/// Endpoints per slot (interfaces with a policy).
pub const MAX_ENDPOINTS: u32 = 256;
/// Rules per slot (rule ids are `0..MAX_RULES`).
pub const MAX_RULES: u32 = 1_024;
/// Rule lists per slot (one per distinct (endpoint, direction, prefix)).
pub const MAX_RULE_LISTS: u32 = 1_024;
/// Rules that can apply to one (endpoint, direction, prefix).
pub const MAX_RULES_PER_LIST: usize = 16;

/// Rule and default actions.
pub const ACTION_ALLOW: u8 = 0;
pub const ACTION_DENY: u8 = 1;
/// Allow, and report the new flow as a `log` event.
pub const ACTION_LOG: u8 = 2;

/// Key of `TC_ENDPOINTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub ifindex: u32,
    /// 0 or 1.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 8);

/// Value of `TC_ENDPOINTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Index of the endpoint in its slot (`0..MAX_ENDPOINTS`): selects its rules and counters.
    pub endpoint_id: u32,
    /// Default action for ingress (packets the interface receives) when no rule matches.
    pub default_ingress: u8,
    /// Default action for egress (packets the interface sends).
    pub default_egress: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<EndpointPolicy>() == 8);

/// Data part of a `TC_RULES_LPM` key. The first 32 bits (slot, direction, endpoint) are always
/// part of the prefix: a key's prefix length is `32 + CIDR length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RulePrefix {
    pub slot: u8,
    /// `ct::POLICY_DIR_INGRESS` or `ct::POLICY_DIR_EGRESS`, with [`RULE_DIR_IPV6`] set for an
    /// IPv6 prefix: the two families' prefixes live apart in the one trie.
    pub dir: u8,
    /// Endpoint id, big-endian (the trie compares bytes in order).
    pub endpoint_be: u16,
    /// The remote address (source for ingress, destination for egress), network byte order.
    pub addr: Addr16,
}
const _: () = assert!(core::mem::size_of::<RulePrefix>() == 20);

/// [`RulePrefix::dir`]'s flag of an IPv6 prefix.
pub const RULE_DIR_IPV6: u8 = 0x80;

/// Prefix bits of a [`RulePrefix`] before the address.
pub const RULE_PREFIX_HEADER_BITS: u32 = 32;

/// One rule of a [`RuleList`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Index in `TC_RULE_STATS` within the slot; stable name in `lb-ctl policy list`.
    pub rule_id: u32,
    /// Destination port range, inclusive, host byte order (0..=65535 for any port; ICMP
    /// packets have port 0).
    pub port_min: u16,
    pub port_max: u16,
    /// IP protocol, 0 for any.
    pub proto: u8,
    /// `ACTION_*`.
    pub action: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Rule>() == 12);

/// Value of `TC_RULE_LISTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleList {
    /// Rules in use (`<= MAX_RULES_PER_LIST`).
    pub count: u32,
    pub _pad: u32,
    pub rules: [Rule; MAX_RULES_PER_LIST],
}
const _: () = assert!(core::mem::size_of::<RuleList>() == 8 + 12 * MAX_RULES_PER_LIST);

/// Value of `TC_EP_STATS` (per CPU), indexed by `slot * MAX_ENDPOINTS + endpoint_id`. Arrays
/// are indexed by the packet's tc direction (`POLICY_DIR_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Packets of new flows admitted (by a rule or the default action).
    pub allowed: [u64; 2],
    /// Packets denied (by a rule or the default action).
    pub denied: [u64; 2],
    /// Packets decided by the default action (allowed or denied).
    pub default_hits: [u64; 2],
    /// Packets passed because they belong to a tracked flow (including related ICMP errors).
    pub tracked: [u64; 2],
    /// Tracked flows cut because the live policy no longer admits them.
    pub cut: [u64; 2],
}
const _: () = assert!(core::mem::size_of::<EndpointStats>() == 80);

/// `FlowEvent::kind`.
pub const EVENT_OPENED: u8 = 1;
pub const EVENT_CLOSED: u8 = 2;
pub const EVENT_DENIED: u8 = 3;
/// A tracked flow cut by a policy change.
pub const EVENT_CUT: u8 = 4;
/// A flow admitted by a `log` rule (sent instead of `EVENT_OPENED`).
pub const EVENT_LOGGED: u8 = 5;
/// A flow removed by the daemon's garbage collector after its idle timeout (sent by the
/// daemon, never by the programs).
pub const EVENT_EXPIRED: u8 = 6;

/// A record of `TC_EVENTS` (ring buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` of the event.
    pub ts_ns: u64,
    /// For closed/cut flows: last-seen minus created.
    pub duration_ns: u64,
    /// Per direction (original, reply); zero for denied packets.
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub rtt_ns: u64,
    pub key: crate::ct::CtKey,
    pub ifindex: u32,
    /// Rule that decided, or `ct::RULE_DEFAULT`.
    pub rule_id: u32,
    /// `EVENT_*`.
    pub kind: u8,
    /// Canonical side that opened the flow (for a denied packet: its sender).
    pub orig_side: u8,
    /// `POLICY_DIR_*` of the decision.
    pub policy_dir: u8,
    /// Conntrack state byte.
    pub state: u8,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 112);

/// Value of `TC_EVENT_RATE` (per CPU): the token bucket bounding the event rate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateBucket {
    /// Tokens left, scaled by 1e9 (one event costs 1e9).
    pub tokens: u64,
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RateBucket>() == 16);

impl RateBucket {
    /// One event's worth of tokens.
    pub const TOKEN: u64 = 1_000_000_000;
    /// The highest rate a bucket grants, events per second.
    pub const MAX_RATE: u64 = 1_000_000;

    /// Takes one event's token at `now` (ns) when `rate` events per second (capped at
    /// [`Self::MAX_RATE`], burst of `rate`) allow it; rate 0 allows nothing. Tokens are scaled by
    /// 1e9 so that each nanosecond adds `rate` units.
    #[inline(always)]
    pub fn take(&mut self, rate: u64, now: u64) -> bool {
        if rate == 0 {
            return false;
        }
        let rate = if rate > Self::MAX_RATE {
            Self::MAX_RATE
        } else {
            rate
        };
        let cap = rate * Self::TOKEN;
        // A second refills the whole bucket: capping the gap keeps the product in range
        // (at most 1e9 * 1e6) without a 128-bit multiply, which BPF does not have.
        let mut elapsed = now.saturating_sub(self.last_ns);
        if elapsed > Self::TOKEN {
            elapsed = Self::TOKEN;
        }
        let tokens = self.tokens.saturating_add(elapsed * rate);
        self.tokens = if tokens > cap { cap } else { tokens };
        self.last_ns = now;
        if self.tokens >= Self::TOKEN {
            self.tokens -= Self::TOKEN;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod rate_bucket_tests {
    use super::RateBucket;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_full_bucket_grants_its_burst_then_refills_at_the_rate() {
        let mut b = RateBucket::default();
        // After a second (or more) idle the bucket is full: `rate` events at once.
        let t = 5 * SECOND;
        let granted = (0..20).filter(|_| b.take(10, t)).count();
        assert_eq!(granted, 10);
        // A tenth of a second refills one event at 10/s, not two.
        assert!(b.take(10, t + SECOND / 10));
        assert!(!b.take(10, t + SECOND / 10));
    }

    #[test]
    fn rate_zero_grants_nothing_and_huge_rates_are_capped() {
        let mut b = RateBucket::default();
        assert!(!b.take(0, 10 * SECOND));
        let t = 10 * SECOND;
        let granted = (0..2_000_000).filter(|_| b.take(u64::MAX, t)).count();
        assert_eq!(granted, RateBucket::MAX_RATE as usize);
    }

    #[test]
    fn a_clock_that_goes_back_refills_nothing() {
        let mut b = RateBucket::default();
        let t = 3 * SECOND;
        while b.take(5, t) {}
        assert!(!b.take(5, t - SECOND));
    }
}

/// Map names of the tc programs.
pub mod map_names {
    pub const CT_FLOWS: &str = "CT_FLOWS";
    pub const GENERATION: &str = "TC_GENERATION";
    pub const ENDPOINTS: &str = "TC_ENDPOINTS";
    pub const RULES_LPM: &str = "TC_RULES_LPM";
    pub const RULE_LISTS: &str = "TC_RULE_LISTS";
    pub const RULE_STATS: &str = "TC_RULE_STATS";
    pub const EP_STATS: &str = "TC_EP_STATS";
    pub const REASONS: &str = "TC_REASONS";
    pub const EVENTS: &str = "TC_EVENTS";
    pub const EVENT_RATE: &str = "TC_EVENT_RATE";
}

/// `.rodata` globals of the tc programs.
pub mod globals {
    /// `u64`: flow events per second and CPU (also the burst).
    pub const EVENT_RATE: &str = "EVENT_RATE";
}

/// Defaults of the tc programs.
pub mod defaults {
    /// Tracked flows in `CT_FLOWS` (LRU).
    pub const MAX_CT_FLOWS: u32 = 65_536;
    /// Ring buffer bytes (a power of two, page multiple).
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// Events per second and CPU.
    pub const EVENT_RATE: u64 = 1_000;
}

/// Per-packet outcome counters of the tc programs (`TC_REASONS`, per CPU).
pub mod reason {
    /// The interface has no policy in the live generation: passed.
    pub const PASS_NOT_ENDPOINT: u32 = 0;
    /// Neither IPv4 nor IPv6 (ARP, ...): passed.
    pub const PASS_NOT_IPV4: u32 = 1;
    /// Ethernet/IP or TCP/UDP/ICMP header cut short (an IPv6 extension header too): dropped.
    pub const DROP_TRUNCATED: u32 = 2;
    /// IPv4 or IPv6 header malformed: dropped.
    pub const DROP_MALFORMED: u32 = 3;
    /// IPv4 or IPv6 fragment (no ports to match): dropped.
    pub const DROP_FRAGMENT: u32 = 4;
    /// Original-direction packet of a tracked flow: passed.
    pub const PASS_TRACKED: u32 = 5;
    /// Reply-direction packet of a tracked flow: passed.
    pub const PASS_REPLY: u32 = 6;
    /// ICMP or ICMPv6 error quoting a tracked flow: passed.
    pub const PASS_RELATED: u32 = 7;
    /// New flow admitted by a rule.
    pub const ALLOW_RULE: u32 = 8;
    /// New flow admitted by the endpoint's default action.
    pub const ALLOW_DEFAULT: u32 = 9;
    /// Denied by a rule.
    pub const DROP_RULE: u32 = 10;
    /// Denied by the endpoint's default action.
    pub const DROP_DEFAULT: u32 = 11;
    /// A tracked flow the live policy no longer admits: its entry removed, packet dropped.
    pub const DROP_POLICY_CHANGED: u32 = 12;
    /// A flow event not sent because the rate bound was reached.
    pub const EVENT_RATE_LIMITED: u32 = 13;
    /// A flow event lost because the ring buffer was full.
    pub const EVENT_LOST: u32 = 14;
    /// A tracked flow re-checked against a new policy generation and still admitted.
    pub const FLOW_RECHECKED: u32 = 15;
    /// A TCP packet without SYN of an untracked flow admitted by the policy without creating
    /// an entry (only a SYN opens a TCP flow).
    pub const ALLOW_UNTRACKED: u32 = 16;

    /// ICMPv6 neighbour discovery (types 133-137): always passed, or the endpoint could not
    /// resolve its neighbours.
    pub const PASS_NEIGHBOUR_DISCOVERY: u32 = 17;
    /// IPv6 whose transport header lies behind more extension headers than the program walks
    /// (`lb_core::parse6::MAX_EXT_HEADERS`): dropped.
    pub const DROP_EXT_HEADER_LIMIT: u32 = 18;

    pub const COUNT: u32 = 19;

    /// Whether `reason` is a verdict: every packet counts exactly one verdict reason. The
    /// others (`event_rate_limited`, `event_lost`, `flow_rechecked`) are counted beside it.
    pub const fn is_verdict(reason: u32) -> bool {
        !matches!(reason, EVENT_RATE_LIMITED | EVENT_LOST | FLOW_RECHECKED) && reason < COUNT
    }

    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_endpoint",
        "pass_not_ipv4",
        "drop_truncated",
        "drop_malformed",
        "drop_fragment",
        "pass_tracked",
        "pass_reply",
        "pass_related",
        "allow_rule",
        "allow_default",
        "drop_rule",
        "drop_default",
        "drop_policy_changed",
        "event_rate_limited",
        "event_lost",
        "flow_rechecked",
        "allow_untracked",
        "pass_neighbour_discovery",
        "drop_ext_header_limit",
    ];
}
