//! Client -> VIP: choose a backend (the flow table first, the service's Maglev table for a new
//! flow), rewrite (full-NAT) or not (DSR), forward.

use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use bpf_common::{
    BACKEND_ACTIVE, BACKEND_UNUSED, BackendInfo, FAMILY_IPV4, FlowEntry, MODE_DSR, PROTO_TCP,
    SourceRangeKey, VIP_F_SOURCE_RANGES, VipInfo,
    ct::{CT_F_ONE_WAY, CtKey},
    maglev_index, reason, source_range_prefix_len,
};
use bpf_lib::{
    count::count_bytes,
    frame::XdpFrame,
    global,
    verdict::xdp::{Verdict, drop, pass},
};
use conntrack::{Direction, TcpFlags, TcpState, direction_of, new_entry, opens_new_connection};
use lb_core::{
    flood::{note_new_flow, untracked_syn},
    hash::{SEED_MAGLEV, flow_hash},
};

use crate::{
    config::{MAGLEV_SIZE, SYN_FLOOD_RATE},
    count_reason,
    fib::forward_cached,
    l3::IpPacket,
    maps::{
        LB_BACKENDS, LB_BE_STATS, LB_FLOWS, LB_MAGLEV, LB_NEW_FLOW, LB_SRC_RANGES, LB_SYN_FLOOD,
        LB_VIP_STATS,
    },
    nat::{NO_NAT_PORT, allocate_nat_port},
    track::{packet_time, track},
};

/// Whether `src` is within one of service `service_id`'s source ranges. Source ranges are
/// IPv4 prefixes: the daemon refuses them on an IPv6 service, and an IPv6 source is never
/// within one.
#[inline(always)]
fn source_allowed(service_id: u32, family: u8, src: &[u32; 4]) -> bool {
    if family != FAMILY_IPV4 {
        return false;
    }
    let key = Key::new(
        source_range_prefix_len(32),
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr: src[0].to_ne_bytes(),
        },
    );
    LB_SRC_RANGES.get(&key).is_some()
}

/// Counts a new flow in this CPU's SYN-flood window; whether the CPU is over the rate.
#[inline(always)]
fn syn_flood(now: u64) -> bool {
    let rate = global(&SYN_FLOOD_RATE);
    if rate == 0 {
        return false;
    }
    match LB_SYN_FLOOD.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; XDP runs are not preempted on their CPU.
        Some(window) => note_new_flow(unsafe { &mut *window }, now, rate),
        None => false,
    }
}

/// A client -> VIP packet's 5-tuple as it arrived. Maglev and the NAT port allocator hash it
/// in this direction; the flow table is keyed by its canonical
/// [`CtKey`](bpf_common::ct::CtKey).
pub(crate) struct Tuple<'a> {
    pub(crate) src: &'a [u32; 4],
    pub(crate) dst: &'a [u32; 4],
    pub(crate) src_port_be: u16,
    pub(crate) dst_port_be: u16,
    pub(crate) proto: u8,
    pub(crate) family: u8,
}

impl Tuple<'_> {
    #[inline(always)]
    pub(crate) fn hash(&self, seed: u32) -> u32 {
        flow_hash(
            self.src,
            self.dst,
            self.src_port_be,
            self.dst_port_be,
            self.proto,
            seed,
        )
    }
}

/// A backend usable for a flow: its id, its current info.
pub(crate) struct Chosen {
    pub(crate) id: u32,
    /// Read in place from `LB_BACKENDS`: a 40-byte copy spills across the whole new-flow
    /// path and does not fit the stack. The daemon rewrites an entry only when it changes the
    /// backend, which a copy would not make atomic either.
    pub(crate) info: &'static BackendInfo,
}

#[inline(always)]
fn backend(id: u32) -> Option<&'static BackendInfo> {
    LB_BACKENDS.get(id)
}

/// Picks the backend of a new flow from the service's live Maglev table.
#[inline(always)]
fn maglev_pick(vip: &VipInfo, tuple: &Tuple) -> Option<Chosen> {
    let size = global(&MAGLEV_SIZE);
    if size == 0 || vip.active_backends == 0 {
        return None;
    }
    let hash = tuple.hash(SEED_MAGLEV);
    let slot = vip.table_slot & 1;
    let index = maglev_index(vip.service_id, slot, size, hash % size);
    let id = *LB_MAGLEV.get(index)?;
    let info = backend(id)?;
    if info.state != BACKEND_ACTIVE {
        return None;
    }
    Some(Chosen { id, info })
}

#[expect(
    clippy::too_many_arguments,
    reason = "flattened packet fields keep the verifier's view simple"
)]
#[inline(always)]
pub(crate) fn to_backend<P: IpPacket>(
    ctx: &XdpContext,
    frame: &XdpFrame,
    packet: &P,
    vip: &VipInfo,
    proto: u8,
    src_port_be: u16,
    dst_port_be: u16,
    tcp_flags: u8,
) -> Verdict {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count_bytes(&LB_VIP_STATS, vip.service_id, bytes);
    if packet.has_options() {
        // Forwarded with the options unchanged; counted beside the verdict.
        count_reason(reason::SEEN_IP_OPTIONS);
    }

    let (src16, dst16) = (packet.wide_src(), packet.wide_dst());
    let tuple = Tuple {
        src: &src16,
        dst: &dst16,
        src_port_be,
        dst_port_be,
        proto,
        family: P::FAMILY,
    };
    let (flow, client_side) = packet.flow_key(proto);
    let flow: &CtKey = &flow;
    let flags = TcpFlags(tcp_flags);
    let now = packet_time(proto, flags);
    let full_nat = vip.mode != MODE_DSR;
    let ip_len = packet.ip_len() as u64;

    let mut outcome = reason::NEW_FLOW;
    let mut reopened = false;
    let mut pinned: Option<(Chosen, u16)> = None;
    // The established flow's entry, whose cached FIB answer `forward` uses and refreshes.
    let mut cache: *mut FlowEntry = core::ptr::null_mut();
    if let Some(entry_ptr) = LB_FLOWS.get_ptr_mut(flow) {
        // SAFETY: a valid map value; concurrent updates of the same flow from two CPUs only race
        // on bookkeeping fields and on the cached FIB answer, which both write alike.
        let entry = unsafe { &mut *entry_ptr };
        if let Some(info) = backend(entry.backend_id) {
            // Draining backends keep their flows; a freed or reassigned slot does not. The key is
            // bidirectional, so the entry must also have been opened from the client's side
            // (a VIP-to-VIP exchange would otherwise find the other VIP's flow).
            // A SYN that opens a new connection on a record whose connection ended (a client
            // reusing its source port) is a new flow: a fresh backend choice, so a draining
            // backend gets none, and `new_flow` counted.
            let starts_new = proto == PROTO_TCP
                && opens_new_connection(
                    TcpState::from_u8(entry.ct.state),
                    flags,
                    entry.ct.flags & CT_F_ONE_WAY != 0,
                );
            if starts_new {
                reopened = true;
            } else if info.state != BACKEND_UNUSED
                && info.generation == entry.backend_generation
                && entry.service_id == vip.service_id
                && direction_of(entry.ct.orig_side, client_side) == Direction::Original
            {
                track(
                    &mut entry.ct,
                    proto,
                    Direction::Original,
                    flags,
                    ip_len,
                    now,
                );
                pinned = Some((
                    Chosen {
                        id: entry.backend_id,
                        info,
                    },
                    entry.nat_port_be,
                ));
                cache = entry_ptr;
            }
        }
        if pinned.is_none() && !reopened {
            outcome = reason::FLOW_RESCHEDULED;
        }
    }

    let (chosen, nat_port_be) = match pinned {
        Some(found) => found,
        None => {
            if vip.flags & VIP_F_SOURCE_RANGES != 0
                && !source_allowed(vip.service_id, P::FAMILY, tuple.src)
            {
                return drop(reason::DROP_SOURCE_RANGE);
            }
            let Some(chosen) = maglev_pick(vip, &tuple) else {
                return drop(reason::DROP_NO_BACKEND);
            };
            // Every new flow counts towards the rate; only a DSR SYN with no entry at all goes
            // untracked (full-NAT needs its entries for the replies). It shares the forwarding
            // tail below: a second inlined `forward_cached` would not fit the stack.
            let untracked = untracked_syn(
                syn_flood(now),
                full_nat,
                proto,
                tcp_flags,
                outcome == reason::NEW_FLOW && !reopened,
            );
            let Some(scratch) = LB_NEW_FLOW.get_ptr_mut(0) else {
                return drop(reason::DROP_INTERNAL);
            };
            // SAFETY: this CPU's slot of a one-entry per-CPU array, used only here and only
            // within this invocation.
            let scratch = unsafe { &mut *scratch };
            let nat_port_be = if full_nat {
                match allocate_nat_port(
                    &tuple,
                    (flow, client_side),
                    &chosen,
                    vip,
                    &mut scratch.reverse,
                ) {
                    NO_NAT_PORT => return drop(reason::DROP_NAT_PORTS_EXHAUSTED),
                    port_be => port_be as u16,
                }
            } else {
                0
            };
            if untracked {
                outcome = reason::NEW_FLOW_UNTRACKED;
            } else {
                let entry = &mut scratch.entry;
                entry.ct = new_entry(now, client_side);
                entry.ct.ifindex = ctx.ingress_ifindex() as u32;
                if !full_nat {
                    // Backends answer clients directly: this table never sees the replies.
                    entry.ct.flags |= CT_F_ONE_WAY;
                }
                track(
                    &mut entry.ct,
                    proto,
                    Direction::Original,
                    flags,
                    ip_len,
                    now,
                );
                entry.backend_id = chosen.id;
                entry.backend_generation = chosen.info.generation;
                entry.service_id = vip.service_id;
                entry.nat_port_be = nat_port_be;
                entry.fib_ifindex = 0;
                entry.fib_cached_ns = 0;
                // An LRU insert only fails on allocation failure; the packet is still forwarded
                // and the next one retries (Maglev picks the same backend while the table is
                // unchanged).
                let _ = LB_FLOWS.insert(flow, &*entry, 0);
            }
            count_reason(outcome);
            (chosen, nat_port_be)
        }
    };
    count_bytes(&LB_BE_STATS, chosen.id, bytes);

    let backend_addr = P::narrow(&chosen.info.addr);
    // One call site of the inlined forward_cached: two would each take their stack slots.
    let (src, ports) = if full_nat {
        let snat_addr = P::narrow(&chosen.info.snat_addr);
        if packet
            .rewrite_l3l4(
                frame,
                proto,
                (packet.src(), snat_addr),
                (packet.dst(), backend_addr),
                (
                    (src_port_be, nat_port_be),
                    (dst_port_be, chosen.info.port_be),
                ),
            )
            .is_none()
        {
            // Unreachable after a successful parse; the frame is untouched or fully rewritten
            // per field, and the stack gets it.
            return pass(reason::PASS_TRUNCATED_L3);
        }
        (snat_addr, (nat_port_be, chosen.info.port_be))
    } else {
        (packet.src(), (src_port_be, dst_port_be))
    };
    forward_cached(
        ctx,
        frame,
        packet,
        (src, backend_addr),
        proto,
        ports,
        cache,
        now,
    )
}
