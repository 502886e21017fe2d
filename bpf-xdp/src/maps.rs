//! Maps. All pinned by name under the daemon's pin root so the datapath keeps forwarding (and
//! keeps its flows) across a daemon restart. Sizes are defaults; the daemon sets the real ones.
//! Names, types and sizes are ABI: a daemon adopts the pins of the previous build.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use bpf_common::{
    BackendInfo, Counter, FlowEntry, NatReverseEntry, SourceRangeKey, SynFloodWindow, VipAddrKey,
    VipInfo, VipKey, ct::CtKey, defaults, reason,
};

#[map(name = "LB_VIPS")]
pub(crate) static LB_VIPS: HashMap<VipKey, VipInfo> = HashMap::pinned(defaults::MAX_SERVICES, 0);

#[map(name = "LB_VIP_ADDRS")]
pub(crate) static LB_VIP_ADDRS: HashMap<VipAddrKey, u32> =
    HashMap::pinned(defaults::MAX_SERVICES, 0);

/// The source prefixes of the services with `VIP_F_SOURCE_RANGES` (see `SourceRangeKey`).
#[map(name = "LB_SRC_RANGES")]
pub(crate) static LB_SRC_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::pinned(defaults::MAX_SOURCE_RANGES, 0);

#[map(name = "LB_BACKENDS")]
pub(crate) static LB_BACKENDS: Array<BackendInfo> = Array::pinned(defaults::MAX_BACKENDS, 0);

/// `max_services * 2` Maglev tables of `MAGLEV_SIZE` backend ids (two per service: one live,
/// one being rebuilt). Mappable: the daemon writes the tables in place.
#[map(name = "LB_MAGLEV")]
pub(crate) static LB_MAGLEV: Array<u32> = Array::pinned(
    defaults::MAX_SERVICES * 2 * defaults::MAGLEV_SIZE,
    bpf_common::BPF_F_MMAPABLE,
);

#[map(name = "LB_FLOWS")]
pub(crate) static LB_FLOWS: LruHashMap<CtKey, FlowEntry> =
    LruHashMap::pinned(defaults::MAX_FLOWS, 0);

/// Where a new flow's entries are built before they are inserted: on the stack, beside the
/// packet's state, the 136-byte flow entry and the 88-byte reverse entry exceed the verifier's
/// 512-byte limit. Private to the program (never pinned, never read by the daemon): nothing in
/// it outlives one invocation, and XDP programs are not preempted on their CPU.
#[repr(C)]
pub(crate) struct NewFlowScratch {
    pub(crate) entry: FlowEntry,
    pub(crate) reverse: NatReverseEntry,
}

#[map(name = "LB_NEW_FLOW")]
pub(crate) static LB_NEW_FLOW: PerCpuArray<NewFlowScratch> = PerCpuArray::with_max_entries(1, 0);

/// The IPv6 packet `xdp_lb6` parses, off its stack (16-byte addresses do not fit beside the
/// new-flow path's state). Private to the program, never pinned.
#[map(name = "LB6_PACKET")]
pub(crate) static LB6_PACKET: PerCpuArray<crate::l3::Packet6> = PerCpuArray::with_max_entries(1, 0);

/// The FIB cache's generation (index 0), bumped by the daemon on every neighbour or route
/// change that can change a forwarding decision: a cached answer of another generation is
/// looked up again.
#[map(name = "LB_FIB_GEN")]
pub(crate) static LB_FIB_GEN: Array<u32> = Array::pinned(1, 0);

/// `bpf_fib_lookup`'s parameters, off the stack (see `fib::forward_cached`). Private to the
/// program, never pinned.
#[map(name = "LB_FIB_SCRATCH")]
pub(crate) static LB_FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// This CPU's new flows in the current second and its SYN-flood mode (`lb_core::flood`).
/// Pinned so the daemon can report the mode.
#[map(name = "LB_SYN_FLOOD")]
pub(crate) static LB_SYN_FLOOD: PerCpuArray<SynFloodWindow> = PerCpuArray::pinned(1, 0);

#[map(name = "LB_NAT_REV")]
pub(crate) static LB_NAT_REV: LruHashMap<CtKey, NatReverseEntry> =
    LruHashMap::pinned(defaults::MAX_FLOWS, 0);

/// `xdp_lb6` at `PROG_LB6`, for `xdp_lb`'s tail call on IPv6 frames (see
/// `bpf_common::map_names::PROGS` on why it is pinned).
#[map(name = "LB_PROGS")]
pub(crate) static LB_PROGS: ProgramArray = ProgramArray::pinned(1, 0);

/// Interfaces the program may redirect to, keyed by ifindex.
#[map(name = "LB_TX_PORTS")]
pub(crate) static LB_TX_PORTS: DevMapHash = DevMapHash::pinned(defaults::MAX_TX_PORTS, 0);

#[map(name = "LB_VIP_STATS")]
pub(crate) static LB_VIP_STATS: PerCpuArray<Counter> =
    PerCpuArray::pinned(defaults::MAX_SERVICES, 0);

#[map(name = "LB_BE_STATS")]
pub(crate) static LB_BE_STATS: PerCpuArray<Counter> =
    PerCpuArray::pinned(defaults::MAX_BACKENDS, 0);

#[map(name = "LB_IF_STATS")]
pub(crate) static LB_IF_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(defaults::MAX_IFINDEX, 0);

#[map(name = "LB_REASONS")]
pub(crate) static LB_REASONS: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);
