//! The kernel/user ABI of the datapath.
//!
//! Every type here is `#[repr(C)]`, explicitly padded (no implicit holes, so the bytes the
//! daemon writes are exactly the bytes the kernel hashes), and size-asserted at compile time.
//! Addresses are family-agnostic: 16 bytes plus an explicit family, with IPv4 stored in the
//! first word, so IPv6 support extends the programs without changing any map layout.
//!
//! Multi-byte fields that hold packet data (addresses, ports) are kept in network byte order
//! exactly as they appear on the wire; the field docs say so with `_be`-style notes.
#![no_std]

pub mod ct;
pub mod dns;
pub mod policy;
pub mod reason;
pub mod ring;
pub mod sock;
pub mod trace;

/// `AF_INET` as stored in the `family` fields.
pub const FAMILY_IPV4: u8 = 2;
/// `AF_INET6` as stored in the `family` fields.
pub const FAMILY_IPV6: u8 = 10;

/// IP protocol numbers the datapath understands.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A 16-byte, family-agnostic address in network byte order. IPv4 uses word 0; words 1..4
/// are zero.
pub type Addr16 = [u32; 4];

/// Builds an [`Addr16`] from an IPv4 address held as wire-order bytes.
#[inline(always)]
pub const fn addr16_from_ipv4_octets(octets: [u8; 4]) -> Addr16 {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// The [`Addr16`] of an address of either family (host side: the daemon's map keys).
pub const fn addr16_from_ip(addr: core::net::IpAddr) -> Addr16 {
    match addr {
        core::net::IpAddr::V4(v4) => addr16_from_ipv4_octets(v4.octets()),
        core::net::IpAddr::V6(v6) => addr16_from_ipv6_octets(v6.octets()),
    }
}

/// The address an [`Addr16`] of family `family` holds (host side: the daemon's listings).
pub fn ip_from_addr16(addr: &Addr16, family: u8) -> core::net::IpAddr {
    if family == FAMILY_IPV6 {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(addr) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(octets))
    } else {
        core::net::IpAddr::V4(core::net::Ipv4Addr::from(addr[0].to_ne_bytes()))
    }
}

/// Builds an [`Addr16`] from an IPv6 address held as wire-order bytes.
#[inline(always)]
pub const fn addr16_from_ipv6_octets(o: [u8; 16]) -> Addr16 {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Key of `LB_VIPS`: a virtual service address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// VIP address, network byte order.
    pub addr: Addr16,
    /// VIP port, network byte order.
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// Forwarding mode of a service (`VipInfo::mode`).
pub const MODE_FULL_NAT: u8 = 0;
/// Direct server return: only the destination MAC is rewritten.
pub const MODE_DSR: u8 = 1;

/// Value of `LB_VIPS`.
///
/// The daemon replaces this value whole (a hash-map update swaps the element under RCU), which
/// is what makes a Maglev table switch atomic: the new table is written into the inactive slot
/// first, then `table_slot` flips in one update.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index of the service; selects its Maglev tables and its counters.
    pub service_id: u32,
    /// Which of the service's two Maglev tables is live (0 or 1).
    pub table_slot: u32,
    /// Number of backends in the live table; 0 means the service answers nothing (drop).
    pub active_backends: u32,
    /// `MODE_FULL_NAT` or `MODE_DSR`.
    pub mode: u8,
    /// `VIP_F_*` bits (0 in pins of builds before flags: the byte was padding).
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 16);

/// `VipInfo::flags`: new flows are taken only from the sources in `LB_SRC_RANGES` for this
/// service (Kubernetes `loadBalancerSourceRanges`); others are dropped as `drop_source_range`.
pub const VIP_F_SOURCE_RANGES: u8 = 1;

/// `VipInfo::flags`: a frontend on a node or load-balancer address (Kubernetes NodePort,
/// LoadBalancer ingress, externalIPs). The socket load balancer leaves it alone: only cluster
/// VIPs are translated at `connect()`.
pub const VIP_F_XDP_ONLY: u8 = 2;

/// Data of an `LB_SRC_RANGES` key (an LPM trie): the service id, matched in full (its 32 bits
/// lead the prefix), then the IPv4 source prefix. A lookup uses prefix length 64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    /// `VipInfo::service_id`, big-endian so that its bytes are the prefix's leading bits.
    pub service_id_be: u32,
    /// The source address (prefix), wire order.
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 8);

/// Prefix length of an `LB_SRC_RANGES` key for an IPv4 range of `len` bits.
pub const fn source_range_prefix_len(len: u8) -> u32 {
    32 + len as u32
}

/// Key of `LB_VIP_ADDRS`: the set of addresses that carry at least one VIP. Used only on the
/// anomaly paths (fragments, truncated L4), where ports are unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipAddrKey {
    pub addr: Addr16,
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<VipAddrKey>() == 20);

/// `BackendInfo::state`: the slot is free (a removed backend).
pub const BACKEND_UNUSED: u8 = 0;
/// Receives new flows and keeps its existing ones.
pub const BACKEND_ACTIVE: u8 = 1;
/// Keeps its existing flows, receives no new ones (absent from the Maglev table).
pub const BACKEND_DRAINING: u8 = 2;

/// Value of `LB_BACKENDS`, an array indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// Backend address, network byte order.
    pub addr: Addr16,
    /// Source address used towards this backend in full-NAT mode, network byte order.
    pub snat_addr: Addr16,
    /// Backend port, network byte order.
    pub port_be: u16,
    pub family: u8,
    /// `BACKEND_UNUSED`, `BACKEND_ACTIVE` or `BACKEND_DRAINING`.
    pub state: u8,
    /// Bumped every time the id is (re)assigned, so a flow pinned to a removed backend whose id
    /// was reused is detected and moved.
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<BackendInfo>() == 40);

/// Value of `LB_SYN_FLOOD`, a per-CPU array of one entry: this CPU's count of new flows in the
/// current one-second window, and whether it is in SYN-flood mode. Above the `SYN_FLOOD_RATE`
/// global (new flows per second per CPU), a DSR TCP SYN is forwarded by Maglev alone and makes
/// no flow entry (as Katran's `is_under_flood`): a flood of SYNs that never complete cannot
/// evict established flows or pay the LRU's insert. The window logic is
/// `lb_core::flood::note_new_flow`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynFloodWindow {
    /// `bpf_ktime_get_ns` when the current window opened.
    pub window_start_ns: u64,
    /// New flows seen in the current window, tracked or not.
    pub new_flows: u64,
    /// Times this CPU entered flood mode (a window that crossed the rate).
    pub entered: u64,
    /// 1 while the current window is over the rate.
    pub flooding: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SynFloodWindow>() == 32);

/// Value of `LB_FLOWS`, whose key is the conntrack's canonical [`ct::CtKey`] of the
/// client <-> VIP flow: the conntrack record of the flow, what its first packet resolved, and
/// the forwarding decision (`bpf_fib_lookup`'s answer) cached for the packets after it.
///
/// The record is the very [`ct::CtEntry`] of the tc programs' `CT_FLOWS`, advanced by the same
/// `conntrack::update_entry`: in full-NAT mode with client packets as the original direction and
/// backend replies (found through `LB_NAT_REV`) as the reply direction; in DSR mode, where
/// replies bypass the load balancer, flagged `CT_F_ONE_WAY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// State, counters per direction, last-seen time and handshake RTT of the flow.
    pub ct: ct::CtEntry,
    pub backend_id: u32,
    /// `BackendInfo::generation` when the flow was pinned.
    pub backend_generation: u32,
    pub service_id: u32,
    /// Source port allocated for full-NAT, network byte order (0 in DSR mode).
    pub nat_port_be: u16,
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_ns` when the FIB answer was cached; it is trusted for
    /// the `FIB_CACHE_NS` global (default [`defaults::FIB_CACHE_NS`]) only, which bounds how
    /// long a neighbour or route change goes unnoticed by an established flow.
    pub fib_cached_ns: u64,
    /// Egress interface of the cached FIB answer; 0 when nothing is cached.
    pub fib_ifindex: u32,
    /// Largest IPv4 total length the cached answer was checked against (the MTU check of
    /// `bpf_fib_lookup`); a longer packet looks the route up again.
    pub fib_max_len: u16,
    /// Next hop's MAC address of the cached FIB answer.
    pub fib_dmac: [u8; 6],
    /// Egress interface's MAC address of the cached FIB answer.
    pub fib_smac: [u8; 6],
    /// The `LB_FIB_GEN` generation the cached answer was looked up under, low half first: a
    /// neighbour or route change bumps the generation and so invalidates every cached answer
    /// at once. Two halves because a `u32` at this offset would move every field after it
    /// (it was padding, so entries of older builds read generation 0).
    pub fib_generation: [u16; 2],
    pub _pad2: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 136);
const _: () = assert!(core::mem::offset_of!(FlowEntry, fib_cached_ns) == 104);
const _: () = assert!(core::mem::offset_of!(FlowEntry, fib_generation) == 130);

impl FlowEntry {
    /// The generation the cached FIB answer was looked up under.
    #[inline(always)]
    pub const fn cached_fib_generation(&self) -> u32 {
        self.fib_generation[0] as u32 | (self.fib_generation[1] as u32) << 16
    }

    #[inline(always)]
    pub fn set_fib_generation(&mut self, generation: u32) {
        self.fib_generation = [generation as u16, (generation >> 16) as u16];
    }

    /// Whether the cached FIB answer may forward a packet of IPv4 total length `total_len` at
    /// `now_ns`: one is cached, it is younger than `ttl_ns` (0 disables the cache), and it was
    /// checked against a packet at least this long (the route's MTU).
    #[inline(always)]
    pub const fn fib_cache_usable(
        &self,
        now_ns: u64,
        ttl_ns: u64,
        total_len: u16,
        generation: u32,
    ) -> bool {
        self.fib_ifindex != 0
            && self.fib_generation[0] == generation as u16
            && self.fib_generation[1] == (generation >> 16) as u16
            // Saturating: packets read the coarse clock, which lags the fine one a SYN read by
            // up to a tick, so an answer cached "in the future" is a fresh one.
            && now_ns.saturating_sub(self.fib_cached_ns) < ttl_ns
            && total_len <= self.fib_max_len
    }
}

/// Value of `LB_NAT_REV`: how to translate a full-NAT reply back to the client. The key is the
/// canonical [`ct::CtKey`] of the load balancer <-> backend leg (backend address and port,
/// SNAT address and allocated port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReverseEntry {
    /// The key of the client flow in `LB_FLOWS` that owns this entry.
    pub owner: ct::CtKey,
    pub client_addr: Addr16,
    pub vip_addr: Addr16,
    /// Network byte order.
    pub client_port_be: u16,
    /// Network byte order.
    pub vip_port_be: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// Canonical side of the key (0: `addr_a`, 1: `addr_b`) that is the backend: only packets
    /// sent from it are replies to translate.
    pub backend_side: u8,
    /// Canonical side of `owner` that is the client.
    pub client_side: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<NatReverseEntry>() == 88);

/// Value of the per-CPU counter arrays (`LB_VIP_STATS`, `LB_BE_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Largest frame the benchmark harness can restore.
pub const BENCH_FRAME_MAX: usize = 256;

/// Value of `BENCH_TEMPLATE`: the frame the benchmark harness program restores before every
/// repeat of BPF_PROG_TEST_RUN (repeats share one buffer, so a rewriting program would
/// otherwise see its own output from the second repeat on).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchTemplate {
    /// Bytes of `frame` in use; must equal the test-run frame's length.
    pub len: u32,
    /// When non-zero, every repeat gets a new 5-tuple: a per-CPU counter is written into the
    /// TCP/UDP source port and the low 16 bits of the IPv4 or IPv6 source address (checksums are not
    /// fixed up; the program does not verify them).
    pub vary_flow: u32,
    pub frame: [u8; BENCH_FRAME_MAX],
}
const _: () = assert!(core::mem::size_of::<BenchTemplate>() == 8 + BENCH_FRAME_MAX);

/// `BPF_F_MMAPABLE`: an array the daemon maps into its memory and writes directly (`LB_MAGLEV`:
/// a sync of 10,000 tables is 2.5 million entries, about 150 ns each through
/// `BPF_MAP_UPDATE_BATCH`).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Map names, shared by the programs (`#[map]` statics carry these names) and the daemon.
/// BPF object names are limited to 15 characters.
pub mod map_names {
    pub const VIPS: &str = "LB_VIPS";
    pub const VIP_ADDRS: &str = "LB_VIP_ADDRS";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const MAGLEV: &str = "LB_MAGLEV";
    pub const FLOWS: &str = "LB_FLOWS";
    pub const NAT_REV: &str = "LB_NAT_REV";
    pub const TX_PORTS: &str = "LB_TX_PORTS";
    pub const VIP_STATS: &str = "LB_VIP_STATS";
    pub const BACKEND_STATS: &str = "LB_BE_STATS";
    pub const REASONS: &str = "LB_REASONS";
    /// `LpmTrie<SourceRangeKey, u8>`: the source prefixes each service with
    /// `VIP_F_SOURCE_RANGES` takes new flows from.
    pub const SOURCE_RANGES: &str = "LB_SRC_RANGES";
    /// `Array<u32>` of one entry: the FIB cache's generation (see `FlowEntry::fib_generation`).
    pub const FIB_GEN: &str = "LB_FIB_GEN";
    /// Per-CPU [`SynFloodWindow`](super::SynFloodWindow) of one entry.
    pub const SYN_FLOOD: &str = "LB_SYN_FLOOD";
    /// Per-CPU `Counter` of the frames each attached interface received, indexed by ingress
    /// ifindex (index 0 collects ifindexes of `defaults::MAX_IFINDEX` and above).
    pub const INTERFACE_STATS: &str = "LB_IF_STATS";
    /// `ProgramArray` of one entry, [`PROG_LB6`](super::PROG_LB6): `xdp_lb` tail-calls it for
    /// every IPv6 frame. Pinned, so IPv6 keeps forwarding while the daemon restarts (an
    /// unpinned program array is emptied when its last descriptor closes).
    pub const PROGS: &str = "LB_PROGS";
    /// Benchmark harness only (not pinned).
    pub const BENCH_TEMPLATE: &str = "BENCH_TEMPLATE";
    pub const BENCH_COUNTER: &str = "BENCH_COUNTER";
    pub const BENCH_TARGET: &str = "BENCH_TARGET";
}

/// Index of `xdp_lb6` in `LB_PROGS`.
pub const PROG_LB6: u32 = 0;

/// Names of the `.rodata` globals the daemon sets at load time.
pub mod globals {
    /// `u32`: entries per Maglev table (prime).
    pub const MAGLEV_SIZE: &str = "MAGLEV_SIZE";
    /// `u16`: lowest source port full-NAT may allocate (host byte order).
    pub const NAT_PORT_MIN: &str = "NAT_PORT_MIN";
    /// `u16`: highest source port full-NAT may allocate (host byte order).
    pub const NAT_PORT_MAX: &str = "NAT_PORT_MAX";
    /// `u64`: how long an established flow trusts its cached FIB answer, in nanoseconds
    /// (0: look the route up for every packet).
    pub const FIB_CACHE_NS: &str = "FIB_CACHE_NS";
    /// `u64`: new flows per second per CPU above which DSR TCP SYNs make no flow entry (0: never).
    pub const SYN_FLOOD_RATE: &str = "SYN_FLOOD_RATE";
}

/// Default sizes. All are configurable in the daemon and exported as capacity metrics.
pub mod defaults {
    /// Maglev table size: a prime, as Maglev requires.
    pub const MAGLEV_SIZE: u32 = 65_537;
    /// An established flow re-checks its route and next hop every 30 s at the latest. The
    /// changes netlink announces take effect on the next packet through `LB_FIB_GEN`; this
    /// bounds what it does not (the daemon down, or a change it missed).
    pub const FIB_CACHE_NS: u64 = 30_000_000_000;
    /// New flows per second per CPU above which a CPU is in SYN-flood mode (Katran's default
    /// `max_conn_rate`).
    pub const SYN_FLOOD_RATE: u64 = 125_000;
    /// Services (VIP, port, protocol) the datapath can hold.
    pub const MAX_SERVICES: u32 = 64;
    /// Backend slots across all services.
    pub const MAX_BACKENDS: u32 = 4_096;
    /// Source prefixes across all services (`LB_SRC_RANGES`).
    pub const MAX_SOURCE_RANGES: u32 = 16_384;
    /// Tracked flows (LRU).
    pub const MAX_FLOWS: u32 = 262_144;
    /// Interfaces the programs can redirect to: every attached interface is one, and with
    /// pod veths followed over netlink a node can have hundreds. (A node upgraded from a build
    /// with 64 keeps its pinned map of 64 until `datapathd cleanup`.)
    pub const MAX_TX_PORTS: u32 = 1024;
    /// Entries of `LB_IF_STATS`: interfaces with a smaller ifindex get their own counter.
    pub const MAX_IFINDEX: u32 = 1_024;
    pub const NAT_PORT_MIN: u16 = 1_024;
    pub const NAT_PORT_MAX: u16 = 65_535;
    /// Default pin root under bpffs.
    pub const PIN_ROOT: &str = "/sys/fs/bpf/datapath";
}

/// Index of service `service_id`'s table `slot` in `LB_MAGLEV` (a flat array of
/// `max_services * 2` tables of `maglev_size` backend ids each).
#[inline(always)]
pub const fn maglev_index(service_id: u32, slot: u32, maglev_size: u32, bucket: u32) -> u32 {
    (service_id * 2 + slot) * maglev_size + bucket
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is `#[repr(C)]`, `Copy`, explicitly padded (size asserted above) and
    // valid for any bit pattern.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for crate::trace::ExecRuleKey {}
    unsafe impl aya::Pod for crate::trace::ConnectRuleData {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for VipAddrKey {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for SynFloodWindow {}
    unsafe impl aya::Pod for NatReverseEntry {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for BenchTemplate {}
    unsafe impl aya::Pod for ct::CtKey {}
    unsafe impl aya::Pod for ct::CtEntry {}
    unsafe impl aya::Pod for policy::EndpointKey {}
    unsafe impl aya::Pod for policy::EndpointPolicy {}
    unsafe impl aya::Pod for policy::RulePrefix {}
    unsafe impl aya::Pod for policy::Rule {}
    unsafe impl aya::Pod for policy::RuleList {}
    unsafe impl aya::Pod for policy::EndpointStats {}
    unsafe impl aya::Pod for policy::FlowEvent {}
    unsafe impl aya::Pod for policy::RateBucket {}
    unsafe impl aya::Pod for sock::SockRevNat {}
    unsafe impl aya::Pod for sock::SockRevNatSet {}
    unsafe impl aya::Pod for sock::SockLbEvent {}
    unsafe impl aya::Pod for dns::DnsCaptureMeta {}
    unsafe impl aya::Pod for trace::ProcessEvent {}
}
