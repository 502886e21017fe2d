//! ABI of the socket load balancer (`bpf-sock`): cgroup sock_addr programs that translate a
//! VIP to a backend at `connect()`/`sendmsg()` and back at `recvmsg()`/`getpeername()`, over the
//! XDP load balancer's own service maps (`LB_VIPS`, `LB_BACKENDS`, `LB_MAGLEV`).

use crate::Addr16;

/// Value of `SOCK_REVNAT`, a socket-local storage map (`BPF_MAP_TYPE_SK_STORAGE`): what the
/// socket's VIP was translated to, so that replies and `getpeername()` show the VIP again. It
/// lives in the socket and dies with it, so it can never go stale or be taken by another
/// socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNat {
    pub vip: Addr16,
    pub backend: Addr16,
    /// Network byte order.
    pub vip_port_be: u16,
    /// Network byte order.
    pub backend_port_be: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
    pub service_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevNat>() == 48);

/// Translations one socket remembers (an unconnected UDP socket may talk to several VIPs).
pub const REVNAT_SLOTS: usize = 4;

/// Value of `SOCK_REVNAT`: a socket's translations, the oldest replaced first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatSet {
    pub entries: [SockRevNat; REVNAT_SLOTS],
    /// Where the next new translation goes (modulo `REVNAT_SLOTS`).
    pub next: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevNatSet>() == 200);

impl SockRevNat {
    /// Whether `self` translates the same VIP to the same backend as `other`.
    #[inline(always)]
    pub fn same_pair(&self, other: &SockRevNat) -> bool {
        self.family == other.family
            && self.vip == other.vip
            && self.vip_port_be == other.vip_port_be
            && self.backend == other.backend
            && self.backend_port_be == other.backend_port_be
    }
}

impl SockRevNatSet {
    /// Keeps `r`: in the slot that holds the same VIP and backend already (a reconnect, the
    /// next datagram), else in the oldest slot. Answers whether it was there already.
    #[inline(always)]
    pub fn remember(&mut self, r: &SockRevNat) -> bool {
        let mut slot = REVNAT_SLOTS;
        for (i, e) in self.entries.iter().enumerate() {
            if e.same_pair(r) {
                slot = i;
            }
        }
        let known = slot < REVNAT_SLOTS;
        if !known {
            slot = self.next as usize % REVNAT_SLOTS;
            self.next = self.next.wrapping_add(1);
        }
        if let Some(e) = self.entries.get_mut(slot) {
            *e = *r;
        }
        known
    }

    /// The translation of family `family` whose backend is `addr:port_be` (wire order; an IPv4
    /// address in word 0).
    #[inline(always)]
    pub fn by_backend(&self, addr: &Addr16, family: u8, port_be: u16) -> Option<&SockRevNat> {
        self.entries
            .iter()
            .find(|e| e.family == family && e.backend == *addr && e.backend_port_be == port_be)
    }
}

/// The IPv4 address (wire order) in an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, words as
/// they sit in memory); `None` for any other IPv6 address.
#[inline(always)]
pub const fn ipv4_of_mapped(a: &[u32; 4]) -> Option<u32> {
    if a[0] == 0 && a[1] == 0 && a[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        Some(a[3])
    } else {
        None
    }
}

/// `SockLbEvent::hook`: a `connect()` translated.
pub const HOOK_CONNECT: u8 = 1;
/// `SockLbEvent::hook`: a `sendmsg()` on an unconnected UDP socket translated.
pub const HOOK_SENDMSG: u8 = 2;

/// `SockLbEvent::outcome`: the socket was sent to the backend.
pub const OUTCOME_TRANSLATED: u8 = 0;
/// `SockLbEvent::outcome`: refused, the service had no backend to give (no backend fields).
pub const OUTCOME_NO_BACKEND: u8 = 1;

/// One socket-LB decision, sent to `SOCK_EVENTS` (a ring buffer) behind a token bucket: who
/// (socket cookie, pid, cgroup) was sent where (VIP to backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbEvent {
    pub cookie: u64,
    pub cgroup_id: u64,
    /// Thread-group id (the process id as user space knows it).
    pub pid: u32,
    pub service_id: u32,
    pub backend_id: u32,
    /// `HOOK_*`.
    pub hook: u8,
    pub proto: u8,
    pub family: u8,
    /// `OUTCOME_*`.
    pub outcome: u8,
    pub vip: Addr16,
    pub backend: Addr16,
    /// Network byte order.
    pub vip_port_be: u16,
    /// Network byte order.
    pub backend_port_be: u16,
    pub _pad2: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<SockLbEvent>() == 72);

/// How many levels of ancestors an opt-out cgroup is looked for above the caller's own cgroup
/// (a bounded loop: `bpf_get_current_ancestor_cgroup_id` per level).
pub const OPT_OUT_DEPTH: u32 = 12;

/// Entries of `SOCK_UDP_CONN` (an LRU of connected UDP sockets).
pub const MAX_UDP_CONNECTED: u32 = 65_536;

/// Default ceiling of decision events per second per CPU.
pub const DEFAULT_EVENT_RATE: u64 = 10_000;

/// Map names of the socket-LB programs (besides the LB's, which they share).
pub mod map_names {
    /// `SK_STORAGE<u32, SockRevNat>`, created by the daemon (the kernel wants BTF for it).
    pub const REVNAT: &str = "SOCK_REVNAT";
    /// Per-CPU `u64` per reason (`reason`).
    pub const REASONS: &str = "SOCK_REASONS";
    /// Per-CPU `u64` per service id: sockets translated to the service.
    pub const SERVICE_STATS: &str = "SOCK_SVC_STATS";
    /// `Hash<u64, u8>`: cgroup ids whose processes (and their descendants') are left alone.
    pub const OPT_OUT: &str = "SOCK_OPT_OUT";
    /// `LruHash<u64, SockRevNat>`: connected UDP sockets' translations by socket cookie.
    pub const UDP_CONNECTED: &str = "SOCK_UDP_CONN";
    /// Ring buffer of `SockLbEvent`.
    pub const EVENTS: &str = "SOCK_EVENTS";
    /// Per-CPU `RateBucket` of the event rate.
    pub const EVENT_BUCKET: &str = "SOCK_EV_BUCKET";
}

/// `.rodata` globals of the socket-LB programs.
pub mod globals {
    /// `u32`: as the XDP program's (`crate::globals::MAGLEV_SIZE`).
    pub const MAGLEV_SIZE: &str = "MAGLEV_SIZE";
    /// `u64`: when non-zero, only sockets of the network namespace with this cookie are
    /// translated (the host-namespace-only mode: in-pod proxies keep seeing VIPs).
    pub const ONLY_NETNS_COOKIE: &str = "ONLY_NETNS_COOKIE";
    /// `u64`: decision events per second per CPU (0: none).
    pub const EVENT_RATE: &str = "EVENT_RATE";
    /// `u32`: non-zero when any cgroup opted out (else the ancestor walk is skipped).
    pub const OPT_OUT_ANY: &str = "OPT_OUT_ANY";
}

/// Outcome counters of the socket-LB programs (`SOCK_REASONS`). Every call of a program counts
/// exactly one.
pub mod reason {
    /// `connect()` to a VIP, translated to a backend.
    pub const CONNECT_TRANSLATED: u32 = 0;
    /// `sendmsg()` to a VIP on an unconnected UDP socket, translated.
    pub const SENDMSG_TRANSLATED: u32 = 1;
    /// `recvmsg()` from a backend the socket was translated to, shown as from the VIP.
    pub const RECVMSG_REVERSED: u32 = 2;
    /// `getpeername()` of a translated socket, answered with the VIP.
    pub const GETPEERNAME_REVERSED: u32 = 3;
    /// Not a VIP (or not IPv4, TCP or UDP): left alone.
    pub const PASS_NOT_VIP: u32 = 4;
    /// The caller's cgroup, or an ancestor of it, opted out: left alone.
    pub const PASS_OPTED_OUT: u32 = 5;
    /// Host-namespace-only mode, and the socket is in another namespace: left alone.
    pub const PASS_OTHER_NETNS: u32 = 6;
    /// A VIP with no active backend: `connect()`/`sendmsg()` refused (EPERM).
    pub const REFUSE_NO_BACKEND: u32 = 7;
    /// The translation could not be stored in the socket: left alone (the VIP goes to XDP,
    /// if it is routed there).
    pub const PASS_NO_STORAGE: u32 = 8;
    /// `recvmsg()`/`getpeername()` of a socket that was not translated, or from another peer.
    pub const PASS_NOT_TRANSLATED: u32 = 9;
    /// A frontend served by XDP only (`VIP_F_XDP_ONLY`: a NodePort, LoadBalancer or external
    /// address): left alone.
    pub const PASS_XDP_ONLY: u32 = 10;
    /// Decision events not sent: over the rate.
    pub const EVENT_RATE_LIMITED: u32 = 11;
    /// Decision events not sent: the ring buffer was full.
    pub const EVENT_LOST: u32 = 12;

    pub const COUNT: u32 = 13;

    /// Whether `reason` is an outcome (one per call); the others are counted beside it.
    pub const fn is_outcome(reason: u32) -> bool {
        reason < EVENT_RATE_LIMITED
    }

    pub const NAMES: [&str; COUNT as usize] = [
        "connect_translated",
        "sendmsg_translated",
        "recvmsg_reversed",
        "getpeername_reversed",
        "pass_not_vip",
        "pass_opted_out",
        "pass_other_netns",
        "refuse_no_backend",
        "pass_no_storage",
        "pass_not_translated",
        "pass_xdp_only",
        "event_rate_limited",
        "event_lost",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(vip: u8, backend: u8) -> SockRevNat {
        SockRevNat {
            vip: crate::addr16_from_ipv4_octets([198, 18, 100, vip]),
            backend: crate::addr16_from_ipv4_octets([198, 18, 1, backend]),
            vip_port_be: 80u16.to_be(),
            backend_port_be: 8080u16.to_be(),
            family: crate::FAMILY_IPV4,
            proto: crate::PROTO_TCP,
            ..Default::default()
        }
    }

    #[test]
    fn a_socket_remembers_four_translations_replacing_the_oldest() {
        let mut set = SockRevNatSet::default();
        assert!(!set.remember(&pair(1, 11)));
        assert!(
            set.remember(&pair(1, 11)),
            "the same pair again keeps its slot"
        );
        assert_eq!(set.next, 1);
        for (vip, backend) in [(2, 12), (3, 13), (4, 14)] {
            assert!(!set.remember(&pair(vip, backend)));
        }
        let backend = |n: u8| crate::addr16_from_ipv4_octets([198, 18, 1, n]);
        assert_eq!(
            set.by_backend(&backend(11), crate::FAMILY_IPV4, 8080u16.to_be()),
            Some(&pair(1, 11))
        );
        // A fifth replaces the oldest (the first).
        assert!(!set.remember(&pair(5, 15)));
        assert_eq!(
            set.by_backend(&backend(11), crate::FAMILY_IPV4, 8080u16.to_be()),
            None
        );
        assert_eq!(
            set.by_backend(&backend(15), crate::FAMILY_IPV4, 8080u16.to_be()),
            Some(&pair(5, 15))
        );
        assert_eq!(
            set.by_backend(&backend(12), crate::FAMILY_IPV4, 8080u16.to_be()),
            Some(&pair(2, 12))
        );
        assert_eq!(
            set.by_backend(&backend(12), crate::FAMILY_IPV4, 8081u16.to_be()),
            None,
            "the port counts"
        );
        assert_eq!(
            set.by_backend(&backend(12), crate::FAMILY_IPV6, 8080u16.to_be()),
            None,
            "the family counts"
        );
    }

    #[test]
    fn only_ipv4_mapped_addresses_give_an_ipv4_address() {
        let v4 = u32::from_ne_bytes([198, 18, 100, 1]);
        let mapped = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), v4];
        assert_eq!(ipv4_of_mapped(&mapped), Some(v4));
        // 2001:db8::c612:6401 and ::c612:6401 (IPv4-compatible, deprecated) are not mapped.
        assert_eq!(
            ipv4_of_mapped(&[u32::from_ne_bytes([0x20, 1, 0xd, 0xb8]), 0, 0, v4]),
            None
        );
        assert_eq!(ipv4_of_mapped(&[0, 0, 0, v4]), None);
    }
}
