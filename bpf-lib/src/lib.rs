//! Kernel-side glue shared by every BPF crate of the datapath.
//!
//! - [`frame`]: packet access for the verifier (`XdpFrame`, `TcFrame`, the
//!   `lb_core::parse::Frame` impls) and bounds-checked 16/32-bit loads and stores;
//! - [`verdict`]: an action with the reason it is counted under, for XDP and TCX;
//! - [`count`]: per-CPU reason and packet/byte counters, the map passed in;
//! - [`event`]: ring-buffer output behind a per-CPU token bucket.
//!
//! Only what needs a BPF context, a map or a helper lives here. Logic the host can test (parsing,
//! checksums, conntrack) stays in `lb-core`, `conntrack` and `bpf-common`. Everything on a
//! packet path is `#[inline(always)]`: the programs' stack frames are within bytes of the
//! verifier's 512, and a BPF-to-BPF call would change what they spill.
//!
//! Built for the host too, as a dependency of the programs' empty host libraries (the daemon's
//! build-dependency); the helpers are only ever called in the BPF programs.
#![no_std]

pub mod count;
pub mod event;
pub mod frame;
pub mod verdict;

/// Reads a `.rodata` global (set by the daemon through `EbpfLoader::set_global`) so the
/// compiler cannot fold in its default value.
#[inline(always)]
pub fn global<T: Copy>(value: &'static T) -> T {
    // SAFETY: a valid, aligned static.
    unsafe { core::ptr::read_volatile(value) }
}

/// Monotonic time in nanoseconds (`bpf_ktime_get_ns`).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// Monotonic time at the last tick (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC_COARSE): a few
/// nanoseconds instead of a clock-source read (about 28 ns on these VMs), at most a jiffy
/// behind [`now_ns`]. For idle timeouts and cache ages, never for a round-trip time.
#[inline(always)]
pub fn coarse_now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() }
}
