//! Socket-level load balancing: cgroup sock_addr programs that send a process's sockets to a
//! service backend when it connects, so east-west traffic never carries the VIP on the wire and
//! needs no per-packet NAT.
//!
//! - `sock_connect4` (TCP and connected UDP) and `sock_sendmsg4` (unconnected UDP) look the
//!   destination up in the XDP load balancer's own `LB_VIPS`; a VIP's backend is picked from
//!   the service's live Maglev table (`LB_MAGLEV`) by a hash of the socket cookie (the source
//!   port is not chosen yet at `connect()`), skipping any backend that is not active. The
//!   destination is rewritten, and the translation is kept in the socket's own storage
//!   (`SOCK_REVNAT`, an sk_storage map), which dies with the socket.
//! - `sock_recvmsg4` and `sock_getpeername4` show the VIP again for a peer that the socket was
//!   translated to, so UDP replies come "from the VIP" and `getpeername()` answers the VIP.
//! - The `*6` programs do the same for IPv6 VIPs, and for IPv6 sockets that reach an IPv4 VIP
//!   through its IPv4-mapped address.
//! - Left alone: what is not a VIP, callers in an opted-out cgroup (or below one), and, in the
//!   host-namespace-only mode, sockets of other network namespaces.
//!
//! Each call counts exactly one outcome (`bpf_common::sock::reason`) and answers 1 (carry on),
//! or 0 for a VIP with no active backend (the call fails with EPERM, as the kernel answers a
//! cgroup program's refusal). Decisions go to `SOCK_EVENTS` behind a per-CPU token bucket.
#![no_std]
#![no_main]

use core::cell::UnsafeCell;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_NO_PREALLOC, bpf_map_def, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_storage_get,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::SockAddrContext,
};
use bpf_common::{
    Addr16, BACKEND_ACTIVE, BackendInfo, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP,
    VIP_F_XDP_ONLY, VipInfo, VipKey, defaults, maglev_index,
    policy::RateBucket,
    sock::{
        DEFAULT_EVENT_RATE, HOOK_CONNECT, HOOK_SENDMSG, OPT_OUT_DEPTH, OUTCOME_NO_BACKEND,
        SockLbEvent, SockRevNat, SockRevNatSet, ipv4_of_mapped, reason,
    },
};
use bpf_lib::{coarse_now_ns, count::count_reason, event, global};
use lb_core::hash::{SEED_MAGLEV, cookie_hash, derive};

/// The XDP load balancer's maps, by the same names: the daemon hands this object the very maps
/// the XDP program uses (one service store, two datapaths).
#[map(name = "LB_VIPS")]
static LB_VIPS: HashMap<VipKey, VipInfo> = HashMap::pinned(defaults::MAX_SERVICES, 0);

#[map(name = "LB_BACKENDS")]
static LB_BACKENDS: Array<BackendInfo> = Array::pinned(defaults::MAX_BACKENDS, 0);

#[map(name = "LB_MAGLEV")]
static LB_MAGLEV: Array<u32> = Array::pinned(
    defaults::MAX_SERVICES * 2 * defaults::MAGLEV_SIZE,
    bpf_common::BPF_F_MMAPABLE,
);

#[map(name = "SOCK_REASONS")]
static SOCK_REASONS: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);

#[map(name = "SOCK_SVC_STATS")]
static SOCK_SVC_STATS: PerCpuArray<u64> = PerCpuArray::pinned(defaults::MAX_SERVICES, 0);

#[map(name = "SOCK_OPT_OUT")]
static SOCK_OPT_OUT: HashMap<u64, u8> = HashMap::pinned(1024, 0);

/// Connected UDP sockets' translations by socket cookie, for the daemon: sock_diag answers a
/// TCP socket with its `SOCK_REVNAT` value, but a UDP socket without, so this is how the daemon
/// tells which UDP sockets connected to a removed backend are the socket LB's to destroy. An
/// LRU: cookies are never reused, so an entry that outlives its socket only waits for eviction.
#[map(name = "SOCK_UDP_CONN")]
static SOCK_UDP_CONN: LruHashMap<u64, SockRevNat> =
    LruHashMap::pinned(bpf_common::sock::MAX_UDP_CONNECTED, 0);

#[map(name = "SOCK_EVENTS")]
static SOCK_EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

const EVENTS_BYTES: u32 = 256 * 1024;
/// The reader is woken once a quarter of the ring is waiting (about 800 decisions); below
/// that it reads on its own tick.
const EVENTS_WAKE_BYTES: u64 = EVENTS_BYTES as u64 / 4;

#[map(name = "SOCK_EV_BUCKET")]
static SOCK_EV_BUCKET: PerCpuArray<RateBucket> = PerCpuArray::with_max_entries(1, 0);

/// A legacy map definition for the one map type aya-ebpf has no wrapper for. The kernel wants
/// BTF for an sk_storage map, which this object does not carry: the daemon creates and pins
/// the map first, and the loader adopts that pin by name.
#[repr(transparent)]
struct SkStorageDef(UnsafeCell<bpf_map_def>);
// SAFETY: the definition is only read, by the loader; programs pass its address to helpers.
unsafe impl Sync for SkStorageDef {}

#[unsafe(link_section = "maps")]
#[unsafe(export_name = "SOCK_REVNAT")]
static SOCK_REVNAT: SkStorageDef = SkStorageDef(UnsafeCell::new(bpf_map_def {
    type_: BPF_MAP_TYPE_SK_STORAGE,
    key_size: 4,
    value_size: core::mem::size_of::<SockRevNatSet>() as u32,
    max_entries: 0,
    map_flags: BPF_F_NO_PREALLOC,
    id: 0,
    pinning: 1,
}));

/// `BPF_SK_STORAGE_GET_F_CREATE`.
const SK_STORAGE_CREATE: u64 = 1;

#[unsafe(no_mangle)]
static MAGLEV_SIZE: u32 = defaults::MAGLEV_SIZE;
#[unsafe(no_mangle)]
static ONLY_NETNS_COOKIE: u64 = 0;
#[unsafe(no_mangle)]
static EVENT_RATE: u64 = DEFAULT_EVENT_RATE;
/// Non-zero when `SOCK_OPT_OUT` holds any cgroup: without opt-outs the ancestor walk is
/// skipped.
#[unsafe(no_mangle)]
static OPT_OUT_ANY: u32 = 0;

/// Carry on with the call (translated or not).
const ALLOW: i32 = 1;
/// Refuse the call (EPERM).
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    finish(try_translate::<false>(&ctx, HOOK_CONNECT))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    finish(try_translate::<false>(&ctx, HOOK_SENDMSG))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    finish(try_reverse::<false>(&ctx, reason::RECVMSG_REVERSED))
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    finish(try_reverse::<false>(&ctx, reason::GETPEERNAME_REVERSED))
}

/// The IPv6 hooks serve IPv6 VIPs, and IPv6 sockets talking to IPv4 VIPs through IPv4-mapped
/// addresses.
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    finish(try_translate::<true>(&ctx, HOOK_CONNECT))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    finish(try_translate::<true>(&ctx, HOOK_SENDMSG))
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    finish(try_reverse::<true>(&ctx, reason::RECVMSG_REVERSED))
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    finish(try_reverse::<true>(&ctx, reason::GETPEERNAME_REVERSED))
}

/// Counts the outcome and answers the verdict.
#[inline(always)]
fn finish((verdict, why): (i32, u32)) -> i32 {
    count_reason(&SOCK_REASONS, why);
    verdict
}

#[inline(always)]
fn opted_out() -> bool {
    // SAFETY: helpers without preconditions.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if SOCK_OPT_OUT.get_ptr(own).is_some() {
        return true;
    }
    for level in 1..OPT_OUT_DEPTH {
        // SAFETY: as above; 0 past the caller's own depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return false;
        }
        if SOCK_OPT_OUT.get_ptr(id).is_some() {
            return true;
        }
    }
    false
}

/// A backend of `vip` for the socket with `cookie`: its Maglev bucket, or (when that backend is
/// no longer active: the table is being replaced) up to three derived buckets.
#[inline(always)]
fn pick(vip: &VipInfo, key: &VipKey, cookie: u64) -> Option<(u32, &'static BackendInfo)> {
    let size = global(&MAGLEV_SIZE);
    if size == 0 || vip.active_backends == 0 {
        return None;
    }
    // The address's words folded: an IPv4 VIP's three zero words leave its hash as it was.
    let folded = key.addr[0] ^ key.addr[1] ^ key.addr[2] ^ key.addr[3];
    let hash = cookie_hash(cookie, folded, key.port_be, key.proto, SEED_MAGLEV);
    let slot = vip.table_slot & 1;
    for n in 0..4u32 {
        let h = if n == 0 { hash } else { derive(hash, n) };
        let id = *LB_MAGLEV.get(maglev_index(vip.service_id, slot, size, h % size))?;
        let info = LB_BACKENDS.get(id)?;
        if info.state == BACKEND_ACTIVE {
            return Some((id, info));
        }
    }
    None
}

/// The socket's translation storage; `create` makes it when it is missing.
#[inline(always)]
fn revnat_of(ctx: &SockAddrContext, create: bool) -> Option<&'static mut SockRevNatSet> {
    // SAFETY: the context is the kernel's bpf_sock_addr; `sk` is its socket (never null in
    // these hooks, checked anyway).
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a map of type sk_storage and the hook's own socket; the kernel zeroes new
    // storage.
    let value = unsafe {
        bpf_sk_storage_get(
            SOCK_REVNAT.0.get().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            if create { SK_STORAGE_CREATE } else { 0 },
        )
    };
    if value.is_null() {
        None
    } else {
        // SAFETY: the kernel answers a value of the map's value size, owned by the socket.
        Some(unsafe { &mut *value.cast::<SockRevNatSet>() })
    }
}

#[inline(always)]
fn try_translate<const V6: bool>(ctx: &SockAddrContext, hook: u8) -> (i32, u32) {
    // SAFETY: the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return (ALLOW, reason::PASS_NOT_VIP);
    }
    let Some((addr, family)) = destination::<V6>(sa) else {
        return (ALLOW, reason::PASS_NOT_VIP);
    };
    let key = VipKey {
        addr,
        // The port's two bytes, in network order, are the low half of the u32.
        port_be: sa.user_port as u16,
        proto,
        family,
    };
    let Some(vip) = LB_VIPS.get_ptr(key) else {
        return (ALLOW, reason::PASS_NOT_VIP);
    };
    // SAFETY: a map value, read in place.
    let vip = unsafe { &*vip };
    if vip.flags & VIP_F_XDP_ONLY != 0 {
        return (ALLOW, reason::PASS_XDP_ONLY);
    }
    let only = global(&ONLY_NETNS_COOKIE);
    // SAFETY: the hook's own context.
    if only != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != only {
        return (ALLOW, reason::PASS_OTHER_NETNS);
    }
    if global(&OPT_OUT_ANY) != 0 && opted_out() {
        return (ALLOW, reason::PASS_OPTED_OUT);
    }
    // SAFETY: the hook's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some((backend_id, backend)) = pick(vip, &key, cookie) else {
        // Published too: who asked for a service that had nothing to give.
        if events_allowed() {
            let mut ev = decision_event(cookie, hook, proto, family, vip.service_id, &key.addr);
            ev.vip_port_be = key.port_be;
            ev.outcome = OUTCOME_NO_BACKEND;
            send_decision(&ev);
        }
        return (REFUSE, reason::REFUSE_NO_BACKEND);
    };
    let Some(set) = revnat_of(ctx, true) else {
        return (ALLOW, reason::PASS_NO_STORAGE);
    };
    let translation = SockRevNat {
        vip: key.addr,
        backend: backend.addr,
        vip_port_be: key.port_be,
        backend_port_be: backend.port_be,
        family,
        proto,
        _pad: [0; 2],
        service_id: vip.service_id,
        backend_id,
    };
    let known = set.remember(&translation);
    if hook == HOOK_CONNECT && proto == PROTO_UDP {
        // Best effort: without it this socket is not destroyed with its backend.
        let _ = SOCK_UDP_CONN.insert(cookie, translation, 0);
    }
    set_peer::<V6>(sa, &backend.addr, family, backend.port_be);
    if let Some(n) = SOCK_SVC_STATS.get_ptr_mut(vip.service_id) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *n += 1 };
    }
    let why = if hook == HOOK_CONNECT {
        reason::CONNECT_TRANSLATED
    } else {
        reason::SENDMSG_TRANSLATED
    };
    // A datagram to a VIP this socket already sends to is the same decision again.
    if known && hook == HOOK_SENDMSG {
        return (ALLOW, why);
    }
    if events_allowed() {
        let mut ev = decision_event(cookie, hook, proto, family, vip.service_id, &key.addr);
        ev.backend_id = backend_id;
        ev.backend = backend.addr;
        ev.vip_port_be = key.port_be;
        ev.backend_port_be = backend.port_be;
        send_decision(&ev);
    }
    (ALLOW, why)
}

/// A decision of the calling process about `vip` (backend fields zero).
#[inline(always)]
fn decision_event(
    cookie: u64,
    hook: u8,
    proto: u8,
    family: u8,
    service_id: u32,
    vip: &Addr16,
) -> SockLbEvent {
    // SAFETY: helpers without preconditions.
    let (pid_tgid, cgroup_id) =
        unsafe { (bpf_get_current_pid_tgid(), bpf_get_current_cgroup_id()) };
    SockLbEvent {
        cookie,
        cgroup_id,
        pid: (pid_tgid >> 32) as u32,
        service_id,
        hook,
        proto,
        family,
        vip: *vip,
        ..SockLbEvent::default()
    }
}

/// Whether the token bucket lets one more decision event out; a refusal is counted. Asked
/// before the event's fields are gathered, so that a refused event costs no helper calls. The
/// coarse clock is enough for a bucket that refills over a second, and costs a few ns instead
/// of a clock-source read.
#[inline(always)]
fn events_allowed() -> bool {
    let allowed = event::rate_allows(&SOCK_EV_BUCKET, global(&EVENT_RATE), coarse_now_ns());
    if !allowed {
        count_reason(&SOCK_REASONS, reason::EVENT_RATE_LIMITED);
    }
    allowed
}

/// Sends `ev` to `SOCK_EVENTS` (the bucket has allowed it); a full ring is counted.
#[inline(always)]
fn send_decision(ev: &SockLbEvent) {
    if event::send_batched(&SOCK_EVENTS, ev, EVENTS_WAKE_BYTES).is_err() {
        count_reason(&SOCK_REASONS, reason::EVENT_LOST);
    }
}

/// A peer (the datagram's source, or the connected peer) that this socket was translated to is
/// shown as its VIP.
#[inline(always)]
fn try_reverse<const V6: bool>(ctx: &SockAddrContext, reversed: u32) -> (i32, u32) {
    // SAFETY: the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some((addr, family)) = destination::<V6>(sa) else {
        return (ALLOW, reason::PASS_NOT_TRANSLATED);
    };
    let Some(set) = revnat_of(ctx, false) else {
        return (ALLOW, reason::PASS_NOT_TRANSLATED);
    };
    match set.by_backend(&addr, family, sa.user_port as u16) {
        Some(e) => {
            set_peer::<V6>(sa, &e.vip, family, e.vip_port_be);
            (ALLOW, reversed)
        }
        None => (ALLOW, reason::PASS_NOT_TRANSLATED),
    }
}

/// The call's peer address in the maps' 16-byte form and its family: `user_ip4` in the v4
/// hooks; in the v6 ones `user_ip6`, an IPv6 address, or an IPv4-mapped one (an IPv6 socket
/// talking to an IPv4 VIP) as IPv4. `V6` is a constant so that each program only touches the
/// fields its hook may (the verifier refuses `user_ip6` in a v4 hook and the reverse).
#[inline(always)]
fn destination<const V6: bool>(sa: &bpf_sock_addr) -> Option<(Addr16, u8)> {
    if V6 {
        if sa.user_family != AF_INET6 {
            return None;
        }
        let ip6 = sa.user_ip6;
        Some(match ipv4_of_mapped(&ip6) {
            Some(v4) => ([v4, 0, 0, 0], FAMILY_IPV4),
            None => (ip6, FAMILY_IPV6),
        })
    } else {
        (sa.user_family == AF_INET).then_some(([sa.user_ip4, 0, 0, 0], FAMILY_IPV4))
    }
}

/// Sets the call's peer to `addr:port` (wire order) of `family`, in the hook's own form (an
/// IPv4 peer of an IPv6 socket stays IPv4-mapped).
#[inline(always)]
fn set_peer<const V6: bool>(sa: &mut bpf_sock_addr, addr: &Addr16, family: u8, port_be: u16) {
    if !V6 {
        sa.user_ip4 = addr[0];
    } else if family == FAMILY_IPV4 {
        sa.user_ip6[3] = addr[0];
    } else {
        // One 4-byte store per word: the kernel takes only those (or 8-byte ones) into the
        // context, and a whole-array assignment becomes a byte-wise `memmove`.
        for (i, word) in addr.iter().enumerate() {
            // SAFETY: an in-bounds field of the hook's own context.
            unsafe { core::ptr::write_volatile(&mut sa.user_ip6[i], *word) };
        }
    }
    sa.user_port = port_be as u32;
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
