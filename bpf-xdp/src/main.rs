//! XDP L4 load balancer.
//!
//! `xdp_lb` runs on every interface the daemon manages (client-facing and backend-facing):
//!
//! - a TCP/UDP packet to a VIP is pinned to a backend (flow table first, Maglev table for a new
//!   flow) and forwarded, in full-NAT (DNAT + SNAT) or DSR (MAC rewrite) mode;
//! - a TCP/UDP packet matching a full-NAT reverse entry (a backend's reply) is translated back
//!   to VIP -> client and forwarded;
//! - an ICMP error quoting a full-NAT flow is translated back to the client (path-MTU discovery);
//! - everything else goes to the stack untouched.
//!
//! Every path ends in an explicit verdict and counts exactly one reason (`bpf_common::reason`).
//! The parsing, checksum and hashing logic lives in `lb-core` and is unit-tested on the host.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: by value, a key or entry \
              that lives in a map (a scratch slot, a reverse entry's owner) is first copied onto \
              the stack, and xdp_lb's frame is within a few bytes of the verifier's 512"
)]

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_NOEXIST, bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use bpf_common::{
    BACKEND_ACTIVE, BACKEND_UNUSED, BENCH_FRAME_MAX, BackendInfo, BenchTemplate, Counter,
    FAMILY_IPV4, FlowEntry, MODE_DSR, NatReverseEntry, PROTO_TCP, PROTO_UDP, VipAddrKey, VipInfo,
    VipKey,
    ct::{CT_F_ONE_WAY, CtEntry, CtKey},
    defaults, maglev_index, reason,
};
use bpf_lib::{
    count::count_bytes,
    frame::{XdpFrame, load16, store16, store32},
    global,
    verdict::xdp::{Verdict, drop, pass},
};
use conntrack::{
    Direction, TcpFlags, TcpState, canonical_key, direction_of, ipv4_key, new_entry,
    opens_new_connection, update_entry, update_entry_steady, with_port,
};
use lb_core::{
    csum,
    hash::{SEED_MAGLEV, SEED_NAT_PORT, derive, flow_hash},
    parse::{self, Frame, Ipv4Packet, L4, Outcome, ipv4, l4},
};

// ---------------------------------------------------------------------------------------------
// Load-time configuration (`.rodata`, set by the daemon through `EbpfLoader::set_global`).
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
static MAGLEV_SIZE: u32 = defaults::MAGLEV_SIZE;
#[unsafe(no_mangle)]
static NAT_PORT_MIN: u16 = defaults::NAT_PORT_MIN;
#[unsafe(no_mangle)]
static NAT_PORT_MAX: u16 = defaults::NAT_PORT_MAX;
#[unsafe(no_mangle)]
static FIB_CACHE_NS: u64 = defaults::FIB_CACHE_NS;
/// Source ports a new full-NAT flow tries before it is dropped as `nat_ports_exhausted`.
#[unsafe(no_mangle)]
static NAT_PORT_TRIES: u32 = 8;

// ---------------------------------------------------------------------------------------------
// Maps. All pinned by name under the daemon's pin root so the datapath keeps forwarding (and
// keeps its flows) across a daemon restart. Sizes are defaults; the daemon sets the real ones.
// ---------------------------------------------------------------------------------------------

#[map(name = "LB_VIPS")]
static LB_VIPS: HashMap<VipKey, VipInfo> = HashMap::pinned(defaults::MAX_SERVICES, 0);

#[map(name = "LB_VIP_ADDRS")]
static LB_VIP_ADDRS: HashMap<VipAddrKey, u32> = HashMap::pinned(defaults::MAX_SERVICES, 0);

#[map(name = "LB_BACKENDS")]
static LB_BACKENDS: Array<BackendInfo> = Array::pinned(defaults::MAX_BACKENDS, 0);

/// `max_services * 2` Maglev tables of `MAGLEV_SIZE` backend ids (two per service: one live,
/// one being rebuilt).
#[map(name = "LB_MAGLEV")]
static LB_MAGLEV: Array<u32> = Array::pinned(defaults::MAX_SERVICES * 2 * defaults::MAGLEV_SIZE, 0);

#[map(name = "LB_FLOWS")]
static LB_FLOWS: LruHashMap<CtKey, FlowEntry> = LruHashMap::pinned(defaults::MAX_FLOWS, 0);

/// Where a new flow's entries are built before they are inserted: on the stack, beside the
/// packet's state, the 136-byte flow entry and the 88-byte reverse entry exceed the verifier's
/// 512-byte limit. Private to the program (never pinned, never read by the daemon): nothing in
/// it outlives one invocation, and XDP programs are not preempted on their CPU.
#[repr(C)]
struct NewFlowScratch {
    entry: FlowEntry,
    reverse: NatReverseEntry,
}

#[map(name = "LB_NEW_FLOW")]
static LB_NEW_FLOW: PerCpuArray<NewFlowScratch> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "LB_NAT_REV")]
static LB_NAT_REV: LruHashMap<CtKey, NatReverseEntry> = LruHashMap::pinned(defaults::MAX_FLOWS, 0);

/// Interfaces the program may redirect to, keyed by ifindex.
#[map(name = "LB_TX_PORTS")]
static LB_TX_PORTS: DevMapHash = DevMapHash::pinned(defaults::MAX_TX_PORTS, 0);

#[map(name = "LB_VIP_STATS")]
static LB_VIP_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(defaults::MAX_SERVICES, 0);

#[map(name = "LB_BE_STATS")]
static LB_BE_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(defaults::MAX_BACKENDS, 0);

#[map(name = "LB_IF_STATS")]
static LB_IF_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(defaults::MAX_IFINDEX, 0);

#[map(name = "LB_REASONS")]
static LB_REASONS: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);

// ---------------------------------------------------------------------------------------------
// Counters (`bpf_lib::count` over this program's maps).
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn count_reason(reason: u32) {
    bpf_lib::count::count_reason(&LB_REASONS, reason);
}

// ---------------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------------

#[xdp]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    // The upgrade test's "rebuilt program": one extra, harmless load, so its bytecode (and
    // the kernel's tag of it) differs from the normal build.
    #[cfg(feature = "upgrade-test-variant")]
    let _ = global(&MAGLEV_SIZE);
    // Every frame an attached interface receives, whatever becomes of it: a per-CPU array
    // slot the verifier inlines, no hash lookup on the fast path.
    let ifindex = ctx.ingress_ifindex() as u32;
    let slot = if ifindex < defaults::MAX_IFINDEX {
        ifindex
    } else {
        0
    };
    count_bytes(&LB_IF_STATS, slot, (ctx.data_end() - ctx.data()) as u64);
    let verdict = try_xdp_lb(&ctx);
    count_reason(verdict.reason);
    verdict.action
}

/// The floor of any XDP measurement on this machine: drops everything. Also the trivial
/// tail-call target the benchmark uses to measure the harness's own cost.
#[xdp]
pub fn xdp_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Lets everything through. Attached to the receiving end of a veth so that frames redirected
/// into it are delivered (a veth only accepts XDP redirects when its peer runs XDP or GRO).
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

fn try_xdp_lb(ctx: &XdpContext) -> Verdict {
    let frame = XdpFrame::new(ctx);
    let parsed = parse::parse(&frame);
    let packet = parsed.packet;
    match parsed.outcome {
        Outcome::Ipv4 => {}
        Outcome::NotIpv4 => return pass(reason::PASS_NOT_IPV4),
        Outcome::Truncated => return pass(reason::PASS_TRUNCATED_L3),
        Outcome::Malformed => return pass(reason::PASS_MALFORMED_IPV4),
    }
    match packet.l4 {
        L4::Tcp => try_l4(ctx, &frame, &packet, PROTO_TCP),
        L4::Udp => try_l4(ctx, &frame, &packet, PROTO_UDP),
        L4::Icmp => try_icmp(ctx, &frame, &packet),
        L4::Fragment => anomaly(&packet, drop(reason::DROP_FRAGMENT)),
        L4::Truncated => anomaly(&packet, drop(reason::DROP_TRUNCATED_L4)),
        L4::Other => anomaly(&packet, pass(reason::PASS_VIP_ADDR_OTHER)),
    }
}

/// Applies `verdict` when the packet is addressed to a VIP address; passes it otherwise. Only
/// anomalous packets pay for this lookup.
#[inline(always)]
fn anomaly(packet: &Ipv4Packet, verdict: Verdict) -> Verdict {
    let key = VipAddrKey {
        addr: [packet.dst, 0, 0, 0],
        family: FAMILY_IPV4,
        _pad: [0; 3],
    };
    // SAFETY: the value is only checked for presence.
    if unsafe { LB_VIP_ADDRS.get(key) }.is_some() {
        verdict
    } else {
        pass(reason::PASS_NOT_VIP)
    }
}

#[inline(always)]
fn try_l4(ctx: &XdpContext, frame: &XdpFrame, packet: &Ipv4Packet, proto: u8) -> Verdict {
    let src_port_be = packet.src_port_be;
    let dst_port_be = packet.dst_port_be;
    let tcp_flags = packet.tcp_flags;
    let vip_key = VipKey {
        addr: [packet.dst, 0, 0, 0],
        port_be: dst_port_be,
        proto,
        family: FAMILY_IPV4,
    };
    // SAFETY: copied out at once; the daemon replaces values whole.
    if let Some(vip) = unsafe { LB_VIPS.get(vip_key) }.copied() {
        return to_backend(
            ctx,
            frame,
            packet,
            &vip,
            proto,
            src_port_be,
            dst_port_be,
            tcp_flags,
        );
    }
    let (reverse_key, sender_side) =
        ipv4_key(packet.src, src_port_be, packet.dst, dst_port_be, proto);
    // SAFETY: read in place (an 88-byte copy would not fit the stack); a concurrent update
    // replaces the element whole, under RCU.
    if let Some(reverse) = unsafe { LB_NAT_REV.get(&reverse_key) } {
        // The key is bidirectional; only the backend's packets are replies to translate.
        if reverse.backend_side == sender_side {
            return reply_to_client(ctx, frame, packet, reverse, proto);
        }
    }
    pass(reason::PASS_NOT_VIP)
}

// ---------------------------------------------------------------------------------------------
// Client -> VIP: choose a backend, rewrite, forward.
// ---------------------------------------------------------------------------------------------

/// A client -> VIP packet's 5-tuple as it arrived. Maglev and the NAT port allocator hash it
/// in this direction; the flow table is keyed by its canonical [`CtKey`].
struct Tuple {
    src: [u32; 4],
    dst: [u32; 4],
    src_port_be: u16,
    dst_port_be: u16,
    proto: u8,
}

impl Tuple {
    #[inline(always)]
    fn hash(&self, seed: u32) -> u32 {
        flow_hash(
            &self.src,
            &self.dst,
            self.src_port_be,
            self.dst_port_be,
            self.proto,
            seed,
        )
    }
}

/// A backend usable for a flow: its id, its current info.
struct Chosen {
    id: u32,
    /// Read in place from `LB_BACKENDS`: a 40-byte copy spills across the whole new-flow
    /// path and does not fit the stack. The daemon rewrites an entry only when it changes the
    /// backend, which a copy would not make atomic either.
    info: &'static BackendInfo,
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
fn to_backend(
    ctx: &XdpContext,
    frame: &XdpFrame,
    packet: &Ipv4Packet,
    vip: &VipInfo,
    proto: u8,
    src_port_be: u16,
    dst_port_be: u16,
    tcp_flags: u8,
) -> Verdict {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count_bytes(&LB_VIP_STATS, vip.service_id, bytes);
    if packet.has_options {
        // Forwarded with the options unchanged; counted beside the verdict.
        count_reason(reason::SEEN_IP_OPTIONS);
    }

    let tuple = Tuple {
        src: [packet.src, 0, 0, 0],
        dst: [packet.dst, 0, 0, 0],
        src_port_be,
        dst_port_be,
        proto,
    };
    let (flow, client_side) = canonical_key(
        tuple.src,
        src_port_be,
        tuple.dst,
        dst_port_be,
        proto,
        FAMILY_IPV4,
    );
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let full_nat = vip.mode != MODE_DSR;
    let flags = TcpFlags(tcp_flags);
    let ip_len = packet.total_len as u64;

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
            let Some(chosen) = maglev_pick(vip, &tuple) else {
                return drop(reason::DROP_NO_BACKEND);
            };
            let Some(scratch) = LB_NEW_FLOW.get_ptr_mut(0) else {
                return drop(reason::DROP_INTERNAL);
            };
            // SAFETY: this CPU's slot of a one-entry per-CPU array, used only here and only
            // within this invocation.
            let scratch = unsafe { &mut *scratch };
            let nat_port_be = if full_nat {
                match allocate_nat_port(
                    &tuple,
                    (&flow, client_side),
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
            {
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

    let backend_addr = chosen.info.addr[0];
    if full_nat {
        let snat_addr = chosen.info.snat_addr[0];
        if rewrite_l3l4(
            frame,
            packet,
            proto,
            (packet.src, snat_addr),
            (packet.dst, backend_addr),
            (src_port_be, nat_port_be),
            (dst_port_be, chosen.info.port_be),
        )
        .is_none()
        {
            // Unreachable after a successful parse; the frame is untouched or fully rewritten
            // per field, and the stack gets it.
            return pass(reason::PASS_TRUNCATED_L3);
        }
        forward_cached(
            ctx,
            frame,
            packet,
            (snat_addr, backend_addr),
            proto,
            (nat_port_be, chosen.info.port_be),
            cache,
            now,
        )
    } else {
        forward_cached(
            ctx,
            frame,
            packet,
            (packet.src, backend_addr),
            proto,
            (src_port_be, dst_port_be),
            cache,
            now,
        )
    }
}

/// [`allocate_nat_port`]'s answer when every port it tried is taken.
const NO_NAT_PORT: u32 = u32::MAX;

/// Tries the client's own port, then a few hashed ports from the configured range, inserting
/// the reverse entry with `BPF_NOEXIST` so that another flow's entry is never overwritten.
/// Returns the port (network byte order) or [`NO_NAT_PORT`].
///
/// A BPF subprogram rather than inlined: its keys and entries would otherwise share
/// `xdp_lb`'s 512-byte stack frame with the new flow's state, which LLVM refuses. It runs once
/// per new full-NAT flow only.
#[inline(always)]
fn allocate_nat_port(
    flow: &Tuple,
    (owner, client_side): (&CtKey, u8),
    chosen: &Chosen,
    vip: &VipInfo,
    reverse: &mut NatReverseEntry,
) -> u32 {
    // Read through `global` so that LLVM cannot unroll the loop: eight unrolled copies of its
    // keys and entries exceed the 512-byte stack. The verifier still sees a constant bound
    // (`.rodata` is frozen), and `min` caps it whatever the global says.
    let tries = global(&NAT_PORT_TRIES).min(16);
    let min = global(&NAT_PORT_MIN) as u32;
    let max = global(&NAT_PORT_MAX) as u32;
    if max < min {
        return NO_NAT_PORT;
    }
    let span = max - min + 1;
    let client_port = u16::from_be(flow.src_port_be) as u32;
    reverse.owner = *owner;
    reverse.client_addr = flow.src;
    reverse.vip_addr = flow.dst;
    reverse.client_port_be = flow.src_port_be;
    reverse.vip_port_be = flow.dst_port_be;
    reverse.service_id = vip.service_id;
    reverse.backend_id = chosen.id;
    reverse.client_side = client_side;
    // The backend leg's key: backend address and port against the SNAT address and the port
    // being tried. Its canonical order depends on the two addresses alone when they differ
    // (the control plane never sets a backend's own address as its SNAT address), so it is
    // computed once and each attempt only sets the port.
    if chosen.info.addr == chosen.info.snat_addr {
        return NO_NAT_PORT;
    }
    let (backend_leg, backend_side) = canonical_key(
        chosen.info.addr,
        chosen.info.port_be,
        chosen.info.snat_addr,
        0,
        flow.proto,
        FAMILY_IPV4,
    );
    reverse.backend_side = backend_side;
    let port_hash = flow.hash(SEED_NAT_PORT);
    let mut attempt = 0;
    while attempt < tries {
        let port = if attempt == 0 && client_port >= min && client_port <= max {
            client_port
        } else {
            min + derive(port_hash, attempt) % span
        };
        let port_be = (port as u16).to_be();
        let reverse_key = with_port(backend_leg, backend_side ^ 1, port_be);
        if LB_NAT_REV
            .insert(&reverse_key, &*reverse, BPF_NOEXIST as u64)
            .is_ok()
        {
            return port_be as u32;
        }
        if claim_taken_port(&reverse_key, reverse, port_be) {
            return port_be as u32;
        }
        attempt += 1;
    }
    NO_NAT_PORT
}

/// Whether the taken port of `reverse_key` may still be used by the flow that owns `reverse`:
/// it is that very flow's (its flow entry was evicted or rescheduled), or its owner is gone
/// from `LB_FLOWS` and the stale reverse entry is taken over. Without the take-over the finite
/// port space towards one backend fills up with dead flows' entries between GC sweeps, because
/// reverse entries are refreshed by replies and can outlive their flow entries.
#[inline(always)]
fn claim_taken_port(reverse_key: &CtKey, reverse: &NatReverseEntry, port_be: u16) -> bool {
    // SAFETY: read in place; a concurrent update replaces the element whole, under RCU.
    let Some(existing) = (unsafe { LB_NAT_REV.get(reverse_key) }) else {
        return false;
    };
    if existing.owner == reverse.owner {
        return true;
    }
    // SAFETY: read in place. The owner's key is looked up straight from the reverse entry.
    let owner_alive = unsafe { LB_FLOWS.get(&existing.owner) }.is_some_and(|entry| {
        entry.nat_port_be == port_be && entry.backend_id == existing.backend_id
    });
    if !owner_alive && LB_NAT_REV.insert(reverse_key, reverse, 0).is_ok() {
        count_reason(reason::NAT_PORT_RECLAIMED);
        return true;
    }
    false
}

/// Rewrites source and destination address and port, `(old, new)` each, updating the IPv4 and
/// TCP/UDP checksums incrementally (addresses are part of the L4 pseudo-header).
#[inline(always)]
fn rewrite_l3l4(
    frame: &XdpFrame,
    packet: &Ipv4Packet,
    proto: u8,
    src: (u32, u32),
    dst: (u32, u32),
    src_port: (u16, u16),
    dst_port: (u16, u16),
) -> Option<()> {
    let l3 = packet.l3_off;
    let l4_off = packet.l4_off;
    let ip_check = load16(frame, l3 + ipv4::CHECK)?;
    let ip_check = csum::replace_u32(ip_check, src.0, src.1);
    let ip_check = csum::replace_u32(ip_check, dst.0, dst.1);
    store32(frame, l3 + ipv4::SRC, src.1)?;
    store32(frame, l3 + ipv4::DST, dst.1)?;
    store16(frame, l3 + ipv4::CHECK, ip_check)?;

    if proto == PROTO_TCP {
        let check = load16(frame, l4_off + l4::TCP_CHECK)?;
        let check = csum::replace_u32(check, src.0, src.1);
        let check = csum::replace_u32(check, dst.0, dst.1);
        let check = csum::replace_u16(check, src_port.0, src_port.1);
        let check = csum::replace_u16(check, dst_port.0, dst_port.1);
        store16(frame, l4_off + l4::TCP_CHECK, check)?;
    } else {
        let check = load16(frame, l4_off + l4::UDP_CHECK)?;
        let check = csum::udp_replace_u32(check, src.0, src.1);
        let check = csum::udp_replace_u32(check, dst.0, dst.1);
        let check = csum::udp_replace_u16(check, src_port.0, src_port.1);
        let check = csum::udp_replace_u16(check, dst_port.0, dst_port.1);
        store16(frame, l4_off + l4::UDP_CHECK, check)?;
    }
    store16(frame, l4_off + l4::SRC_PORT, src_port.1)?;
    store16(frame, l4_off + l4::DST_PORT, dst_port.1)?;
    Some(())
}

// ---------------------------------------------------------------------------------------------
// Backend -> load balancer (full-NAT replies and ICMP errors): translate back to the client.
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn reply_to_client(
    ctx: &XdpContext,
    frame: &XdpFrame,
    packet: &Ipv4Packet,
    reverse: &NatReverseEntry,
    proto: u8,
) -> Verdict {
    let Some((src_port_be, dst_port_be)) = ports(frame, packet) else {
        return pass(reason::PASS_TRUNCATED_L3);
    };
    let vip_addr = reverse.vip_addr[0];
    let client_addr = reverse.client_addr[0];
    if rewrite_l3l4(
        frame,
        packet,
        proto,
        (packet.src, vip_addr),
        (packet.dst, client_addr),
        (src_port_be, reverse.vip_port_be),
        (dst_port_be, reverse.client_port_be),
    )
    .is_none()
    {
        return pass(reason::PASS_TRUNCATED_L3);
    }
    count_reason(reason::NAT_REPLY_TRANSLATED);
    track_reply(packet, reverse, proto);
    forward(
        ctx,
        frame,
        packet,
        vip_addr,
        client_addr,
        proto,
        reverse.vip_port_be,
        reverse.client_port_be,
    )
}

/// Applies one packet to a flow's conntrack record with the shared `conntrack::update_entry`.
#[inline(always)]
fn track(ct: &mut CtEntry, proto: u8, dir: Direction, flags: TcpFlags, ip_len: u64, now: u64) {
    // Most packets of a busy flow: no subprogram call.
    if update_entry_steady(ct, proto, dir, flags, ip_len, now) {
        return;
    }
    let packed = proto as u32 | (dir as u32) << 8 | (flags.0 as u32) << 16;
    track_packed(ct, packed, ip_len, now);
}

/// [`track`]'s body as one BPF subprogram instead of three inlined copies: inlined into every
/// path that tracks a packet, the state machine's registers spill past the 512-byte stack.
/// BPF calls take at most five arguments, hence the packing of protocol, direction and flags.
#[inline(never)]
fn track_packed(ct: &mut CtEntry, packed: u32, ip_len: u64, now: u64) {
    let proto = packed as u8;
    let dir = Direction::from_u8((packed >> 8) as u8);
    let flags = TcpFlags((packed >> 16) as u8);
    let _ = update_entry(ct, proto, dir, flags, ip_len, now);
}

/// Advances the client flow's conntrack record with a backend reply, in the reply direction:
/// full-NAT flows see both directions, so their TCP state follows the whole handshake and
/// close, exactly as in the tc programs' `CT_FLOWS`. A reply whose flow entry is gone (evicted)
/// is still translated; there is just no record left to advance.
#[inline(always)]
fn track_reply(packet: &Ipv4Packet, reverse: &NatReverseEntry, proto: u8) {
    let Some(entry_ptr) = LB_FLOWS.get_ptr_mut(&reverse.owner) else {
        return;
    };
    // SAFETY: a valid map value; see `to_backend` on concurrent updates.
    let entry = unsafe { &mut *entry_ptr };
    if entry.backend_id != reverse.backend_id
        || direction_of(entry.ct.orig_side, reverse.client_side) != Direction::Original
    {
        return;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    track(
        &mut entry.ct,
        proto,
        Direction::Reply,
        TcpFlags(packet.tcp_flags),
        packet.total_len as u64,
        now,
    );
}

#[inline(always)]
fn ports(frame: &XdpFrame, packet: &Ipv4Packet) -> Option<(u16, u16)> {
    Some((
        load16(frame, packet.l4_off + l4::SRC_PORT)?,
        load16(frame, packet.l4_off + l4::DST_PORT)?,
    ))
}

/// An ICMP error (destination unreachable, including "fragmentation needed", or time exceeded)
/// quoting a packet the load balancer sent to a backend in full-NAT mode is rewritten so that
/// it quotes the client's original packet to the VIP, comes from the VIP, and goes to the
/// client. ICMP has no pseudo-header, so the ICMP checksum covers exactly the rewritten quote.
#[inline(always)]
fn try_icmp(ctx: &XdpContext, frame: &XdpFrame, packet: &Ipv4Packet) -> Verdict {
    let icmp_type = packet.icmp_type;
    if icmp_type != parse::ICMP_DEST_UNREACH && icmp_type != parse::ICMP_TIME_EXCEEDED {
        return anomaly(packet, pass(reason::PASS_VIP_ADDR_OTHER));
    }
    let quote = parse::parse_icmp_quote(frame, packet.l4_off);
    if !quote.valid {
        return pass(reason::PASS_NOT_VIP);
    }
    // The quote is our packet to the backend: snat:nat_port -> backend:port, sent from the
    // side of the reverse key that is not the backend.
    let (reverse_key, quote_sender_side) = ipv4_key(
        quote.src,
        quote.src_port_be,
        quote.dst,
        quote.dst_port_be,
        quote.proto,
    );
    // SAFETY: read in place, as in `try_l4`.
    let Some(reverse) = (unsafe { LB_NAT_REV.get(&reverse_key) }) else {
        return pass(reason::PASS_NOT_VIP);
    };
    if reverse.backend_side == quote_sender_side {
        return pass(reason::PASS_NOT_VIP);
    }
    if translate_icmp(frame, packet, &quote, reverse).is_none() {
        return pass(reason::PASS_TRUNCATED_L3);
    }
    count_reason(reason::ICMP_TRANSLATED);
    forward(
        ctx,
        frame,
        packet,
        reverse.vip_addr[0],
        reverse.client_addr[0],
        bpf_common::PROTO_ICMP,
        0,
        0,
    )
}

#[inline(always)]
fn translate_icmp(
    frame: &XdpFrame,
    packet: &Ipv4Packet,
    quote: &parse::QuotedPacket,
    reverse: &NatReverseEntry,
) -> Option<()> {
    let client = reverse.client_addr[0];
    let vip = reverse.vip_addr[0];
    let icmp_check_off = packet.l4_off + l4::ICMP_CHECK;
    let mut icmp_check = load16(frame, icmp_check_off)?;

    // Quoted IPv4 header: src snat -> client, dst backend -> VIP.
    let (q3, q4) = parse::quote_offsets(packet.l4_off);
    let old_quote_ip_check = load16(frame, q3 + ipv4::CHECK)?;
    let quote_ip_check = csum::replace_u32(old_quote_ip_check, quote.src, client);
    let quote_ip_check = csum::replace_u32(quote_ip_check, quote.dst, vip);
    store32(frame, q3 + ipv4::SRC, client)?;
    store32(frame, q3 + ipv4::DST, vip)?;
    store16(frame, q3 + ipv4::CHECK, quote_ip_check)?;
    icmp_check = csum::replace_u32(icmp_check, quote.src, client);
    icmp_check = csum::replace_u32(icmp_check, quote.dst, vip);
    icmp_check = csum::replace_u16(icmp_check, old_quote_ip_check, quote_ip_check);

    // Quoted ports: nat_port -> client port, backend port -> VIP port.
    store16(frame, q4 + l4::SRC_PORT, reverse.client_port_be)?;
    store16(frame, q4 + l4::DST_PORT, reverse.vip_port_be)?;
    icmp_check = csum::replace_u16(icmp_check, quote.src_port_be, reverse.client_port_be);
    icmp_check = csum::replace_u16(icmp_check, quote.dst_port_be, reverse.vip_port_be);

    // A quoted UDP header always carries its checksum (within the 8 guaranteed bytes); keep it
    // consistent. A quoted TCP checksum may be cut off and receivers do not verify it.
    if quote.proto == PROTO_UDP {
        let old = load16(frame, q4 + l4::UDP_CHECK)?;
        let mut new = csum::udp_replace_u32(old, quote.src, client);
        new = csum::udp_replace_u32(new, quote.dst, vip);
        new = csum::udp_replace_u16(new, quote.src_port_be, reverse.client_port_be);
        new = csum::udp_replace_u16(new, quote.dst_port_be, reverse.vip_port_be);
        store16(frame, q4 + l4::UDP_CHECK, new)?;
        icmp_check = csum::replace_u16(icmp_check, old, new);
    }
    store16(frame, icmp_check_off, icmp_check)?;

    // Outer header: from the VIP to the client.
    let l3 = packet.l3_off;
    let ip_check = load16(frame, l3 + ipv4::CHECK)?;
    let ip_check = csum::replace_u32(ip_check, packet.src, vip);
    let ip_check = csum::replace_u32(ip_check, packet.dst, client);
    store32(frame, l3 + ipv4::SRC, vip)?;
    store32(frame, l3 + ipv4::DST, client)?;
    store16(frame, l3 + ipv4::CHECK, ip_check)?;
    Some(())
}

// ---------------------------------------------------------------------------------------------
// Forwarding.
// ---------------------------------------------------------------------------------------------

const AF_INET: u8 = 2;

/// Resolves the next hop with `bpf_fib_lookup`, rewrites the MAC addresses and sends the frame:
/// `XDP_TX` when the egress interface is the ingress one, a devmap redirect otherwise.
#[expect(clippy::too_many_arguments, reason = "mirrors bpf_fib_lookup's inputs")]
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    frame: &XdpFrame,
    packet: &Ipv4Packet,
    src: u32,
    dst: u32,
    proto: u8,
    src_port_be: u16,
    dst_port_be: u16,
) -> Verdict {
    forward_cached(
        ctx,
        frame,
        packet,
        (src, dst),
        proto,
        (src_port_be, dst_port_be),
        core::ptr::null_mut(),
        0,
    )
}

/// Sends the rewritten frame to its next hop. With a flow entry (`cache` non-null), a FIB
/// answer cached less than the `FIB_CACHE_NS` global ago for a packet at least this long is reused, and a
/// fresh answer is cached: an established flow then costs no `bpf_fib_lookup` per packet.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the flow's addresses, ports and cache, passed by value for the verifier"
)]
fn forward_cached(
    ctx: &XdpContext,
    frame: &XdpFrame,
    packet: &Ipv4Packet,
    (src, dst): (u32, u32),
    proto: u8,
    (src_port_be, dst_port_be): (u16, u16),
    cache: *mut FlowEntry,
    now: u64,
) -> Verdict {
    if !cache.is_null() {
        // SAFETY: a live map value from `get_ptr_mut`, valid for this program run.
        let entry = unsafe { &*cache };
        if entry.fib_cache_usable(now, global(&FIB_CACHE_NS), packet.total_len) {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&entry.fib_dmac);
            macs[6..].copy_from_slice(&entry.fib_smac);
            return egress(ctx, frame, macs, entry.fib_ifindex);
        }
    }
    // SAFETY: plain-old-data C struct; all-zero is a valid initial value.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.sport = src_port_be;
    params.dport = dst_port_be;
    params.__bindgen_anon_1.tot_len = packet.total_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;

    // SAFETY: `params` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return pass(reason::PASS_FIB_NO_NEIGH),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return pass(reason::PASS_FRAG_NEEDED),
        _ => return drop(reason::DROP_FIB_FAILED),
    }
    if !cache.is_null() {
        // SAFETY: as above.
        let entry = unsafe { &mut *cache };
        entry.fib_ifindex = params.ifindex;
        entry.fib_dmac = params.dmac;
        entry.fib_smac = params.smac;
        entry.fib_cached_ns = now;
        // A fresh answer resets the length it was checked against; within its lifetime the
        // longest packet seen so far is the bound.
        entry.fib_max_len = packet.total_len;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&params.dmac);
    macs[6..].copy_from_slice(&params.smac);
    egress(ctx, frame, macs, params.ifindex)
}

/// Writes the next hop's and our MAC addresses and transmits on `ifindex`.
#[inline(always)]
fn egress(ctx: &XdpContext, frame: &XdpFrame, macs: [u8; 12], ifindex: u32) -> Verdict {
    let Some(eth) = frame.at::<12>(0) else {
        return pass(reason::PASS_TRUNCATED_L3);
    };
    // SAFETY: bounds-checked by `at`.
    unsafe { *eth = macs };

    if ifindex == ctx.ingress_ifindex() as u32 {
        return Verdict {
            action: xdp_action::XDP_TX,
            reason: reason::FWD_TX,
        };
    }
    match LB_TX_PORTS.redirect(ifindex, 0) {
        Ok(action) => Verdict {
            action,
            reason: reason::FWD_REDIRECT,
        },
        Err(_) => pass(reason::PASS_NO_TX_PORT),
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark harness (used by `cargo xtask bench` and its smoke test, never attached).
// ---------------------------------------------------------------------------------------------

#[map(name = "BENCH_TEMPLATE")]
static BENCH_TEMPLATE: Array<BenchTemplate> = Array::with_max_entries(1, 0);

#[map(name = "BENCH_COUNTER")]
static BENCH_COUNTER: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "BENCH_TARGET")]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Restores the frame from `BENCH_TEMPLATE` (BPF_PROG_TEST_RUN repeats share one buffer, so a
/// rewriting program would otherwise see its own output from the second repeat on) and
/// tail-calls the program under test in `BENCH_TARGET[0]`.
#[xdp]
pub fn xdp_bench_harness(ctx: XdpContext) -> u32 {
    let Some(template) = BENCH_TEMPLATE.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a valid map value.
    let template = unsafe { &mut *template };
    let len = template.len as usize;
    let frame_len = ctx.data_end() - ctx.data();
    if len == 0 || len > BENCH_FRAME_MAX || len != frame_len {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: `len` is bounded by BENCH_FRAME_MAX and lies within both buffers.
    let rc = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            0,
            template.frame.as_mut_ptr() as *mut _,
            len as u32,
        )
    };
    if rc != 0 {
        return xdp_action::XDP_ABORTED;
    }
    if template.vary_flow != 0 && vary_flow(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: on success the tail call does not return.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Gives the restored frame a fresh 5-tuple: IPv4 source low half and L4 source port.
#[inline(always)]
fn vary_flow(ctx: &XdpContext) -> Option<()> {
    let counter = BENCH_COUNTER.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot.
    let value = unsafe {
        *counter = (*counter).wrapping_add(1);
        *counter
    };
    // Every CPU's counter starts at 0: with the CPU in the top byte, two runs that land on
    // different CPUs still send distinct tuples (a repeat of another CPU's tuple would find
    // that flow pinned, and not be a new flow).
    // SAFETY: bpf_get_smp_processor_id has no preconditions.
    let value = value.wrapping_add(unsafe { bpf_get_smp_processor_id() } << 24);
    let frame = XdpFrame::new(ctx);
    let parsed = parse::parse(&frame);
    if parsed.outcome != Outcome::Ipv4 {
        return None;
    }
    let packet = parsed.packet;
    store16(
        &frame,
        packet.l3_off + ipv4::SRC + 2,
        ((value >> 16) as u16).to_be(),
    )?;
    store16(
        &frame,
        packet.l4_off + l4::SRC_PORT,
        ((value & 0xffff) as u16).to_be(),
    )?;
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
