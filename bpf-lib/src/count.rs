//! Per-CPU counters. The map is the caller's: each program keeps its own, pinned under its own
//! name, and a reason id means something only against its program's reason list.

use aya_ebpf::maps::PerCpuArray;
use bpf_common::Counter;

/// Bumps reason `reason` in a per-CPU reason array (one `u64` per reason).
#[inline(always)]
pub fn count_reason(reasons: &PerCpuArray<u64>, reason: u32) {
    if let Some(slot) = reasons.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds one packet of `bytes` to slot `index` of a per-CPU packet/byte counter array.
#[inline(always)]
pub fn count_bytes(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(counter) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}
