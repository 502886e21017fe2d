//! TCX policy programs: a stateful L3/L4 firewall per interface ("endpoint").
//!
//! `tc_ingress` runs on packets an endpoint interface receives, `tc_egress` on packets it
//! sends. Both share one conntrack table (`CT_FLOWS`, keyed by the canonical bidirectional
//! `CtKey`), so the reply of a flow admitted in one direction passes in the other:
//!
//! 1. The live policy generation is read once (`TC_GENERATION`); its low bit selects the slot
//!    of every policy map (see `bpf_common::policy` on double buffering). An interface without
//!    a policy in that slot passes everything.
//! 2. A packet of a tracked flow passes, and advances the entry through `conntrack` (the one
//!    TCP state machine). If the entry was admitted under an older generation, the flow is
//!    first re-checked against the live policy; a flow no longer admitted is removed and the
//!    packet dropped (`drop_policy_changed`), which cuts it.
//! 3. An ICMP error quoting a tracked flow passes (`pass_related`).
//! 4. Anything else is a new flow: the endpoint's rules for the direction decide (longest
//!    prefix of the remote address, then first match on protocol and destination port), else
//!    its default action. Admitted flows get an entry (TCP only from a SYN, so a cut flow
//!    cannot come back through a mid-stream packet); denied packets are dropped.
//!
//! Every path returns an explicit verdict (`TCX_NEXT` to let the packet continue, `TCX_DROP`)
//! and counts exactly one reason (`bpf_common::policy::reason`). Flow events (opened, closed,
//! denied, cut) go to the `TC_EVENTS` ring buffer through a per-CPU token bucket.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use bpf_common::{
    Addr16, Counter, FAMILY_IPV6, PROTO_TCP, PROTO_UDP,
    ct::{
        CT_F_CLOSE_REPORTED, CT_F_LOGGED, CT_F_OPEN_REPORTED, CtEntry, CtKey, POLICY_DIR_INGRESS,
        RULE_DEFAULT,
    },
    policy::{
        ACTION_DENY, ACTION_LOG, EVENT_CLOSED, EVENT_CUT, EVENT_DENIED, EVENT_LOGGED, EVENT_OPENED,
        EndpointKey, EndpointPolicy, EndpointStats, FlowEvent, MAX_ENDPOINTS, MAX_RULE_LISTS,
        MAX_RULES, MAX_RULES_PER_LIST, RULE_DIR_IPV6, RULE_PREFIX_HEADER_BITS, RateBucket,
        RuleList, RulePrefix, defaults, reason,
    },
};
use bpf_lib::{
    count::count_bytes,
    event::{self, Refused},
    frame::TcFrame,
    global, now_ns,
    verdict::tc::{Verdict, drop, pass},
};
use conntrack::{
    Direction, TcpFlags, TcpState, canonical_key, direction_of, ipv4_key, new_entry, update_entry,
};
use lb_core::{
    parse::{self, Frame, L4, Outcome},
    parse6::{self, Outcome6},
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAM_PROBLEM: u8 = 12;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Bytes pulled into the linear area when the headers are not all there.
const PULL_LEN: u32 = 128;

// ---------------------------------------------------------------------------------------------
// Load-time configuration.
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
static EVENT_RATE: u64 = defaults::EVENT_RATE;

// ---------------------------------------------------------------------------------------------
// Maps (pinned by name under the daemon's pin root).
// ---------------------------------------------------------------------------------------------

#[map(name = "CT_FLOWS")]
static CT_FLOWS: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(defaults::MAX_CT_FLOWS, 0);

#[map(name = "TC_GENERATION")]
static TC_GENERATION: Array<u32> = Array::pinned(1, 0);

#[map(name = "TC_ENDPOINTS")]
static TC_ENDPOINTS: HashMap<EndpointKey, EndpointPolicy> = HashMap::pinned(MAX_ENDPOINTS * 2, 0);

#[map(name = "TC_RULES_LPM")]
static TC_RULES_LPM: LpmTrie<RulePrefix, u32> = LpmTrie::pinned(MAX_RULE_LISTS * 2, 0);

#[map(name = "TC_RULE_LISTS")]
static TC_RULE_LISTS: Array<RuleList> = Array::pinned(MAX_RULE_LISTS * 2, 0);

#[map(name = "TC_RULE_STATS")]
static TC_RULE_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX_RULES * 2, 0);

#[map(name = "TC_EP_STATS")]
static TC_EP_STATS: PerCpuArray<EndpointStats> = PerCpuArray::pinned(MAX_ENDPOINTS * 2, 0);

#[map(name = "TC_REASONS")]
static TC_REASONS: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);

#[map(name = "TC_EVENTS")]
static TC_EVENTS: RingBuf = RingBuf::pinned(defaults::EVENTS_BYTES, 0);

/// The IPv6 packet being parsed, off the stack (16-byte addresses do not fit beside the
/// policy's state). Private to the program, never pinned.
#[map(name = "TC6_PACKET")]
static TC6_PACKET: PerCpuArray<parse6::Ipv6Packet> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "TC_EVENT_RATE")]
static TC_EVENT_RATE: PerCpuArray<RateBucket> = PerCpuArray::pinned(1, 0);

// ---------------------------------------------------------------------------------------------
// Counters (`bpf_lib::count` over this program's maps).
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn count_reason(reason: u32) {
    bpf_lib::count::count_reason(&TC_REASONS, reason);
}

/// Which counter of `EndpointStats` to bump.
#[derive(Clone, Copy)]
#[repr(u8)]
enum EpCounter {
    Allowed,
    Denied,
    DefaultHit,
    Tracked,
    Cut,
}

#[inline(always)]
fn count_endpoint(slot: u32, endpoint_id: u32, dir: u8, which: EpCounter) {
    if endpoint_id >= MAX_ENDPOINTS {
        return;
    }
    let d = (dir & 1) as usize;
    if let Some(stats) = TC_EP_STATS.get_ptr_mut(slot * MAX_ENDPOINTS + endpoint_id) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        let stats = unsafe { &mut *stats };
        match which {
            EpCounter::Allowed => stats.allowed[d] += 1,
            EpCounter::Denied => stats.denied[d] += 1,
            EpCounter::DefaultHit => stats.default_hits[d] += 1,
            EpCounter::Tracked => stats.tracked[d] += 1,
            EpCounter::Cut => stats.cut[d] += 1,
        }
    }
}

#[inline(always)]
fn count_rule(slot: u32, rule_id: u32, bytes: u64) {
    if rule_id >= MAX_RULES {
        return;
    }
    count_bytes(&TC_RULE_STATS, slot * MAX_RULES + rule_id, bytes);
}

// ---------------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------------

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    let verdict = try_policy(&ctx, POLICY_DIR_INGRESS);
    count_reason(verdict.reason);
    verdict.action
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    let verdict = try_policy(&ctx, bpf_common::ct::POLICY_DIR_EGRESS);
    count_reason(verdict.reason);
    verdict.action
}

/// What a packet looks like to the policy: its flow key and the fields rules match on.
#[derive(Clone, Copy)]
struct PacketInfo {
    key: CtKey,
    /// The key's side the packet was sent from (its source is `addr_a` on side 0).
    side: u8,
    proto: u8,
    /// Destination port, host byte order (0 for ICMP and other protocols).
    dst_port: u16,
    tcp_flags: u8,
    /// Whether an admitted packet of an untracked flow may open an entry.
    opens: bool,
    len: u64,
}

#[inline(always)]
fn try_policy(ctx: &TcContext, dir: u8) -> Verdict {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer is valid for the whole invocation.
    let ifindex = unsafe { (*skb).ifindex };
    let generation = TC_GENERATION.get(0).copied().unwrap_or(0);
    if generation == 0 {
        return pass(reason::PASS_NOT_ENDPOINT);
    }
    let slot = generation & 1;
    // SAFETY: copied out at once.
    let Some(endpoint) = (unsafe { TC_ENDPOINTS.get(EndpointKey { ifindex, slot }) }).copied()
    else {
        return pass(reason::PASS_NOT_ENDPOINT);
    };

    // Headers may sit in paged data (GRO); pull what parsing needs into the linear area.
    let len = ctx.len();
    let frame = TcFrame::new(ctx);
    let (start, end) = frame.bounds();
    let want = if len < PULL_LEN { len } else { PULL_LEN };
    if end.saturating_sub(start) < want as usize {
        let _ = ctx.pull_data(want);
    }

    let parsed = parse::parse(&frame);
    let info = match parsed.outcome {
        Outcome::Ipv4 => match info_v4(&frame, &parsed.packet, slot, &endpoint, dir) {
            Ok(info) => info,
            Err(verdict) => return verdict,
        },
        Outcome::Ipv6 => match info_v6(&frame, slot, &endpoint, dir) {
            Ok(info) => info,
            Err(verdict) => return verdict,
        },
        Outcome::NotIpv4 => return pass(reason::PASS_NOT_IPV4),
        Outcome::Truncated => return drop(reason::DROP_TRUNCATED),
        Outcome::Malformed => return drop(reason::DROP_MALFORMED),
    };
    if let Some(entry) = CT_FLOWS.get_ptr_mut(info.key) {
        // SAFETY: a valid map value pointer; concurrent updates from other CPUs only make
        // counters approximate.
        return tracked(unsafe { &mut *entry }, &info, generation, dir, &endpoint);
    }
    new_flow(&info, generation, dir, ifindex, &endpoint)
}

/// What an ICMP or ICMPv6 type means to the policy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Icmp {
    /// An error quoting a tracked flow: passed as related.
    RelatedError,
    EchoRequest,
    EchoReply,
    /// Any other type (an error about no tracked flow included): matched, never tracked.
    Other,
}

/// The transport header's part of the policy's view, shared by both families: the ports (ICMP
/// echo's identifier stands in for both) and whether an admitted packet may open an entry; or
/// the verdict that ends the packet's processing here.
#[expect(clippy::too_many_arguments, reason = "flattened packet fields")]
#[inline(always)]
fn transport(
    frame: &TcFrame,
    (l4, l4_off): (L4, usize),
    ports_be: (u16, u16),
    tcp_flags: u8,
    icmp: Icmp,
    slot: u32,
    endpoint: &EndpointPolicy,
    dir: u8,
) -> Result<(u16, u16, bool), Verdict> {
    match l4 {
        L4::Tcp => {
            let flags = TcpFlags(tcp_flags);
            let opens = flags.syn() && !flags.ack() && !flags.is_invalid_combination();
            Ok((ports_be.0, ports_be.1, opens))
        }
        L4::Udp => Ok((ports_be.0, ports_be.1, true)),
        L4::Icmp => match icmp {
            Icmp::RelatedError => {
                count_endpoint(slot, endpoint.endpoint_id, dir, EpCounter::Tracked);
                Err(pass(reason::PASS_RELATED))
            }
            Icmp::EchoRequest | Icmp::EchoReply => {
                let Some(id) = frame.read::<2>(l4_off + 4) else {
                    return Err(drop(reason::DROP_TRUNCATED));
                };
                let id = u16::from_ne_bytes(id);
                Ok((id, id, icmp == Icmp::EchoRequest))
            }
            Icmp::Other => Ok((0, 0, false)),
        },
        L4::Fragment => Err(drop(reason::DROP_FRAGMENT)),
        L4::Truncated => Err(drop(reason::DROP_TRUNCATED)),
        L4::ExtLimit => Err(drop(reason::DROP_EXT_HEADER_LIMIT)),
        L4::Other => Ok((0, 0, true)),
    }
}

/// The destination port rules match on: TCP's and UDP's, 0 for any other protocol.
#[inline(always)]
fn rule_port(proto: u8, dport_be: u16) -> u16 {
    if proto == PROTO_TCP || proto == PROTO_UDP {
        u16::from_be(dport_be)
    } else {
        0
    }
}

/// The policy's view of an IPv4 packet, or the verdict that ends its processing here.
#[inline(always)]
fn info_v4(
    frame: &TcFrame,
    packet: &parse::Ipv4Packet,
    slot: u32,
    endpoint: &EndpointPolicy,
    dir: u8,
) -> Result<PacketInfo, Verdict> {
    let t = packet.icmp_type;
    let icmp = if packet.l4 != L4::Icmp {
        Icmp::Other
    } else if t == ICMP_DEST_UNREACH || t == ICMP_TIME_EXCEEDED || t == ICMP_PARAM_PROBLEM {
        if related(frame, packet) {
            Icmp::RelatedError
        } else {
            Icmp::Other
        }
    } else if t == ICMP_ECHO_REQUEST {
        Icmp::EchoRequest
    } else if t == ICMP_ECHO_REPLY {
        Icmp::EchoReply
    } else {
        Icmp::Other
    };
    let (sport_be, dport_be, opens) = transport(
        frame,
        (packet.l4, packet.l4_off),
        (packet.src_port_be, packet.dst_port_be),
        packet.tcp_flags,
        icmp,
        slot,
        endpoint,
        dir,
    )?;
    let (key, side) = ipv4_key(packet.src, sport_be, packet.dst, dport_be, packet.proto);
    Ok(PacketInfo {
        key,
        side,
        proto: packet.proto,
        dst_port: rule_port(packet.proto, dport_be),
        tcp_flags: packet.tcp_flags,
        opens,
        len: u64::from(packet.total_len),
    })
}

/// The policy's view of an IPv6 packet, or the verdict that ends its processing here: the
/// IPv4 rules, with neighbour discovery always passed and ICMPv6's own types.
#[inline(always)]
fn info_v6(
    frame: &TcFrame,
    slot: u32,
    endpoint: &EndpointPolicy,
    dir: u8,
) -> Result<PacketInfo, Verdict> {
    let Some(packet) = TC6_PACKET.get_ptr_mut(0) else {
        return Err(drop(reason::DROP_MALFORMED));
    };
    // SAFETY: this CPU's slot of a one-entry per-CPU array, used only within this invocation
    // (tc programs are not preempted on their CPU).
    let packet = unsafe { &mut *packet };
    match parse6::parse6_into(frame, packet) {
        Outcome6::Ipv6 => {}
        Outcome6::NotIpv6 => return Err(pass(reason::PASS_NOT_IPV4)),
        Outcome6::Truncated => return Err(drop(reason::DROP_TRUNCATED)),
        Outcome6::Malformed => return Err(drop(reason::DROP_MALFORMED)),
    }
    let packet = &*packet;
    let t = packet.icmp_type;
    let icmp = if packet.l4 != L4::Icmp {
        Icmp::Other
    } else if parse6::is_neighbour_discovery(t) {
        return Err(pass(reason::PASS_NEIGHBOUR_DISCOVERY));
    } else if parse6::is_icmpv6_error(t) {
        if related6(frame, packet) {
            Icmp::RelatedError
        } else {
            Icmp::Other
        }
    } else if t == ICMPV6_ECHO_REQUEST {
        Icmp::EchoRequest
    } else if t == ICMPV6_ECHO_REPLY {
        Icmp::EchoReply
    } else {
        Icmp::Other
    };
    let (sport_be, dport_be, opens) = transport(
        frame,
        (packet.l4, packet.l4()),
        (packet.src_port_be, packet.dst_port_be),
        packet.tcp_flags,
        icmp,
        slot,
        endpoint,
        dir,
    )?;
    let (key, side) = canonical_key(
        packet.src,
        sport_be,
        packet.dst,
        dport_be,
        packet.proto,
        FAMILY_IPV6,
    );
    Ok(PacketInfo {
        key,
        side,
        proto: packet.proto,
        dst_port: rule_port(packet.proto, dport_be),
        tcp_flags: packet.tcp_flags,
        opens,
        len: u64::from(packet.ip_len()),
    })
}

/// True when the ICMPv6 error `packet` quotes a tracked TCP/UDP flow.
#[inline(always)]
fn related6(frame: &TcFrame, packet: &parse6::Ipv6Packet) -> bool {
    let quote = parse6::parse_icmp6_quote(frame, packet);
    if !quote.valid {
        return false;
    }
    let (key, _) = canonical_key(
        quote.src,
        quote.src_port_be,
        quote.dst,
        quote.dst_port_be,
        quote.proto,
        FAMILY_IPV6,
    );
    // SAFETY: only checked for presence.
    unsafe { CT_FLOWS.get(key) }.is_some()
}

/// True when the ICMP error at `icmp_off` quotes a tracked TCP/UDP flow.
#[inline(always)]
fn related(frame: &TcFrame, packet: &parse::Ipv4Packet) -> bool {
    // The quote must lie inside the ICMP packet, not in the padding behind it.
    if !parse::quote_within_packet(packet) {
        return false;
    }
    let quote = parse::parse_icmp_quote(frame, packet.l4_off);
    if !quote.valid {
        return false;
    }
    let (key, _) = ipv4_key(
        quote.src,
        quote.src_port_be,
        quote.dst,
        quote.dst_port_be,
        quote.proto,
    );
    // SAFETY: only checked for presence.
    unsafe { CT_FLOWS.get(key) }.is_some()
}

/// A packet of a tracked flow.
#[inline(always)]
fn tracked(
    entry: &mut CtEntry,
    info: &PacketInfo,
    generation: u32,
    dir: u8,
    endpoint: &EndpointPolicy,
) -> Verdict {
    let slot = generation & 1;
    let now = now_ns();
    if entry.generation != generation {
        let (action, rule_id, endpoint_id) = recheck(entry, &info.key, slot);
        if action == ACTION_DENY {
            let mut event = event_from(entry, &info.key, EVENT_CUT, now);
            event.rule_id = rule_id;
            emit(&event, now);
            count_endpoint(slot, endpoint_id, entry.policy_dir, EpCounter::Cut);
            count_rule(slot, rule_id, info.len);
            let _ = CT_FLOWS.remove(info.key);
            return drop(reason::DROP_POLICY_CHANGED);
        }
        entry.generation = generation;
        entry.rule_id = rule_id;
        count_reason(reason::FLOW_RECHECKED);
    }
    let pkt_dir = direction_of(entry.orig_side, info.side);
    update_entry(
        entry,
        info.proto,
        pkt_dir,
        TcpFlags(info.tcp_flags),
        info.len,
        now,
    );
    if info.proto == PROTO_TCP && entry.flags & CT_F_CLOSE_REPORTED == 0 {
        let state = TcpState::from_u8(entry.state);
        if matches!(state, TcpState::TimeWait | TcpState::Closed) {
            entry.flags |= CT_F_CLOSE_REPORTED;
            let event = event_from(entry, &info.key, EVENT_CLOSED, now);
            emit(&event, now);
        }
    }
    count_endpoint(slot, endpoint.endpoint_id, dir, EpCounter::Tracked);
    match pkt_dir {
        Direction::Original => pass(reason::PASS_TRACKED),
        Direction::Reply => pass(reason::PASS_REPLY),
    }
}

/// Re-checks a tracked flow against slot `slot`: the endpoint and direction that admitted it,
/// with the flow's original tuple. Returns the action, the deciding rule and the endpoint id.
/// An endpoint without a policy in the live slot no longer polices the flow: allowed.
#[inline(always)]
fn recheck(entry: &CtEntry, key: &CtKey, slot: u32) -> (u8, u32, u32) {
    // SAFETY: copied out at once.
    let Some(endpoint) = (unsafe {
        TC_ENDPOINTS.get(EndpointKey {
            ifindex: entry.ifindex,
            slot,
        })
    })
    .copied() else {
        return (0, RULE_DEFAULT, MAX_ENDPOINTS);
    };
    let (src, dst, dst_port_be) = if entry.orig_side == 0 {
        (&key.addr_a, &key.addr_b, key.port_b_be)
    } else {
        (&key.addr_b, &key.addr_a, key.port_a_be)
    };
    let remote = if entry.policy_dir == POLICY_DIR_INGRESS {
        src
    } else {
        dst
    };
    let port = rule_port(key.proto, dst_port_be);
    let (action, rule_id) = evaluate(
        slot,
        &endpoint,
        entry.policy_dir,
        (remote, key.family),
        key.proto,
        port,
    );
    (action, rule_id, endpoint.endpoint_id)
}

/// A packet of no tracked flow: the policy decides.
#[inline(always)]
fn new_flow(
    info: &PacketInfo,
    generation: u32,
    dir: u8,
    ifindex: u32,
    endpoint: &EndpointPolicy,
) -> Verdict {
    let slot = generation & 1;
    // The source of an ingress packet, the destination of an egress one, read from the key
    // (a copy beside it does not fit the stack).
    let remote_is_a = (dir == POLICY_DIR_INGRESS) == (info.side == 0);
    let remote = if remote_is_a {
        &info.key.addr_a
    } else {
        &info.key.addr_b
    };
    let (action, rule_id) = evaluate(
        slot,
        endpoint,
        dir,
        (remote, info.key.family),
        info.proto,
        info.dst_port,
    );
    let by_rule = rule_id != RULE_DEFAULT;
    if by_rule {
        count_rule(slot, rule_id, info.len);
    } else {
        count_endpoint(slot, endpoint.endpoint_id, dir, EpCounter::DefaultHit);
    }
    let now = now_ns();
    if action == ACTION_DENY {
        count_endpoint(slot, endpoint.endpoint_id, dir, EpCounter::Denied);
        let mut entry = new_entry(now, info.side);
        entry.ifindex = ifindex;
        entry.policy_dir = dir;
        let mut event = event_from(&entry, &info.key, EVENT_DENIED, now);
        event.rule_id = rule_id;
        emit(&event, now);
        return drop(if by_rule {
            reason::DROP_RULE
        } else {
            reason::DROP_DEFAULT
        });
    }
    count_endpoint(slot, endpoint.endpoint_id, dir, EpCounter::Allowed);
    if !info.opens {
        return pass(reason::ALLOW_UNTRACKED);
    }
    let mut entry = new_entry(now, info.side);
    entry.ifindex = ifindex;
    entry.rule_id = rule_id;
    entry.generation = generation;
    entry.policy_dir = dir;
    update_entry(
        &mut entry,
        info.proto,
        Direction::Original,
        TcpFlags(info.tcp_flags),
        info.len,
        now,
    );
    let kind = if action == ACTION_LOG {
        entry.flags |= CT_F_LOGGED;
        EVENT_LOGGED
    } else {
        EVENT_OPENED
    };
    let event = event_from(&entry, &info.key, kind, now);
    if emit(&event, now) {
        entry.flags |= CT_F_OPEN_REPORTED;
    }
    let _ = CT_FLOWS.insert(info.key, entry, 0);
    pass(if by_rule {
        reason::ALLOW_RULE
    } else {
        reason::ALLOW_DEFAULT
    })
}

/// The endpoint's verdict on a new flow: (action, deciding rule or `RULE_DEFAULT`).
#[inline(always)]
fn evaluate(
    slot: u32,
    endpoint: &EndpointPolicy,
    dir: u8,
    (remote, family): (&Addr16, u8),
    proto: u8,
    port: u16,
) -> (u8, u32) {
    let default = if dir == POLICY_DIR_INGRESS {
        endpoint.default_ingress
    } else {
        endpoint.default_egress
    };
    let key = Key::new(
        RULE_PREFIX_HEADER_BITS + 128,
        RulePrefix {
            slot: slot as u8,
            dir: if family == FAMILY_IPV6 {
                dir | RULE_DIR_IPV6
            } else {
                dir
            },
            endpoint_be: (endpoint.endpoint_id as u16).to_be(),
            addr: *remote,
        },
    );
    let Some(index) = TC_RULES_LPM.get(&key).copied() else {
        return (default, RULE_DEFAULT);
    };
    if index >= MAX_RULE_LISTS {
        return (default, RULE_DEFAULT);
    }
    let Some(list) = TC_RULE_LISTS.get(slot * MAX_RULE_LISTS + index) else {
        return (default, RULE_DEFAULT);
    };
    let count = list.count as usize;
    for i in 0..MAX_RULES_PER_LIST {
        if i >= count {
            break;
        }
        let rule = &list.rules[i];
        if (rule.proto == 0 || rule.proto == proto)
            && port >= rule.port_min
            && port <= rule.port_max
        {
            return (rule.action, rule.rule_id);
        }
    }
    (default, RULE_DEFAULT)
}

// ---------------------------------------------------------------------------------------------
// Flow events.
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn event_from(entry: &CtEntry, key: &CtKey, kind: u8, now: u64) -> FlowEvent {
    FlowEvent {
        ts_ns: now,
        duration_ns: entry.last_seen_ns.saturating_sub(entry.created_ns),
        packets: entry.packets,
        bytes: entry.bytes,
        rtt_ns: entry.rtt_ns,
        key: *key,
        ifindex: entry.ifindex,
        rule_id: entry.rule_id,
        kind,
        orig_side: entry.orig_side,
        policy_dir: entry.policy_dir,
        state: entry.state,
        _pad: [0; 4],
    }
}

/// Sends `event` when the per-CPU token bucket allows (`EVENT_RATE` per second); counts what
/// is not sent.
#[inline(always)]
fn emit(event: &FlowEvent, now: u64) -> bool {
    match event::emit(&TC_EVENTS, &TC_EVENT_RATE, global(&EVENT_RATE), event, now) {
        Ok(()) => true,
        Err(Refused::RateLimited) => {
            count_reason(reason::EVENT_RATE_LIMITED);
            false
        }
        Err(Refused::Lost) => {
            count_reason(reason::EVENT_LOST);
            false
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
