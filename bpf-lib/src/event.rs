//! Events to user space through a ring buffer, behind a per-CPU token bucket so that a flood
//! of events cannot starve the ring (or the reader) of the ones that matter.

use aya_ebpf::maps::{PerCpuArray, RingBuf};
use bpf_common::policy::RateBucket;

/// Why [`emit`] sent nothing; the caller counts it under its own reason.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The token bucket is empty (or the rate is 0).
    RateLimited,
    /// The ring buffer is full.
    Lost,
}

/// Sends `event` to `ring` when the token bucket in `bucket[0]` allows `rate` events per second.
#[inline(always)]
pub fn emit<T>(
    ring: &RingBuf,
    bucket: &PerCpuArray<RateBucket>,
    rate: u64,
    event: &T,
    now: u64,
) -> Result<(), Refused> {
    if !rate_allows(bucket, rate, now) {
        return Err(Refused::RateLimited);
    }
    if ring.output::<T>(event, 0).is_err() {
        return Err(Refused::Lost);
    }
    Ok(())
}

/// `BPF_RB_NO_WAKEUP`, `BPF_RB_FORCE_WAKEUP`, `BPF_RB_AVAIL_DATA`.
const RB_NO_WAKEUP: u64 = 1;
const RB_FORCE_WAKEUP: u64 = 2;
const RB_AVAIL_DATA: u64 = 0;

/// The output flags for a record of `len` bytes that wake `ring`'s reader only when the record
/// takes what waits in the ring past a multiple of `step` bytes: a few wake-ups per ring's
/// worth of data, however fast it comes. A wake-up queues irq work, a self-IPI (a VM exit on a
/// guest), which costs more than a fork's whole event; waking on every record past a mark
/// would pay it per record exactly when events flood. Two CPUs that cross a mark together may
/// both miss it: the next mark, or the reader's timer, which it must have, reads the rest.
#[inline(always)]
pub fn wake_flags(ring: &RingBuf, len: u64, step: u64) -> u64 {
    if bpf_common::ring::crosses_wake_mark(ring.query(RB_AVAIL_DATA), len, step) {
        RB_FORCE_WAKEUP
    } else {
        RB_NO_WAKEUP
    }
}

/// Sends `event` to `ring`, waking the reader only each time `wake_bytes` more are waiting
/// ([`wake_flags`]): for events of a hot path (a `connect()`), where a wake-up each would cost
/// more than the work. The reader must also read on a timer, for what waits below the mark.
/// The caller asks [`rate_allows`] first, before it gathers the event's fields.
#[inline(always)]
pub fn send_batched<T>(ring: &RingBuf, event: &T, wake_bytes: u64) -> Result<(), Refused> {
    let flags = wake_flags(ring, core::mem::size_of::<T>() as u64, wake_bytes);
    if ring.output::<T>(event, flags).is_err() {
        return Err(Refused::Lost);
    }
    Ok(())
}

/// Token bucket in `bucket[0]`: `rate` events per second ([`RateBucket::take`]).
#[inline(always)]
pub fn rate_allows(bucket: &PerCpuArray<RateBucket>, rate: u64, now: u64) -> bool {
    if rate == 0 {
        return false;
    }
    let Some(bucket) = bucket.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    unsafe { &mut *bucket }.take(rate, now)
}
