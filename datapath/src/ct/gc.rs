//! Garbage collection of the load balancer's flow table (`LB_FLOWS`) and of the full-NAT
//! reverse entries (`LB_NAT_REV`) that no flow owns any more.
//!
//! Both maps are LRU hashes, so the kernel evicts entries when they are full; the collector
//! frees them earlier, by the conntrack idle timeouts (one definition, in the `conntrack`
//! crate, shared with the kernel side), so that a burst of short flows cannot push live ones
//! out and full-NAT source ports come back as soon as their flow is gone.
//!
//! A sweep reads the whole table with `BPF_MAP_LOOKUP_BATCH` (a few hundred syscalls for a
//! million entries instead of two per entry), picks the expired entries, and then, for each
//! one, reads it again and deletes it only if it is still expired. An entry a packet refreshed
//! after the batch read is therefore kept: the collector never removes a live entry, except in
//! the window of one syscall between that re-read and the delete, where the next packet of
//! the flow simply re-creates it (with the same backend while the Maglev table is unchanged).
//! Sweeps are throttled by a cap on deletions per sweep; what is left waits for the next one.

use std::{
    collections::HashSet,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use bpf_common::{FlowEntry, NatReverseEntry, ct::CtKey, map_names};
use conntrack::{Timeouts, canonical_key, ct_timeout, is_expired};

use crate::{Error, Result};

/// Collector settings.
#[derive(Clone, Copy, Debug)]
pub struct GcConfig {
    /// Idle timeouts per protocol and TCP state.
    pub timeouts: Timeouts,
    /// Most entries one sweep deletes (flows and orphaned reverse entries together); the rest
    /// wait for the next sweep, so a mass expiry never monopolises a CPU.
    pub max_deletes_per_sweep: usize,
    /// Entries per `BPF_MAP_LOOKUP_BATCH` call.
    pub batch_size: u32,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            timeouts: Timeouts::DEFAULT,
            max_deletes_per_sweep: 100_000,
            batch_size: 4_096,
        }
    }
}

/// What one sweep saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    /// Flow entries read.
    pub flows_scanned: u64,
    /// Flow entries deleted because they were idle past their timeout.
    pub flows_expired: u64,
    /// Flow entries that looked expired in the batch read but had been refreshed by a packet
    /// when re-read, and were kept.
    pub flows_kept_live: u64,
    /// Reverse entries read.
    pub nat_scanned: u64,
    /// Reverse entries deleted because no flow owns them any more.
    pub nat_orphans_removed: u64,
    /// Deletions left for a later sweep because of `max_deletes_per_sweep`.
    pub deferred: u64,
    /// Wall-clock time of the sweep, in microseconds.
    pub duration_us: u64,
}

/// Running totals over every sweep of one collector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcTotals {
    pub sweeps: u64,
    pub flows_expired: u64,
    pub flows_kept_live: u64,
    pub nat_orphans_removed: u64,
}

/// The flow-table collector. It owns its own descriptors of the two maps, so it can run beside
/// the dataplane controller without sharing its `Ebpf`.
pub struct FlowGc {
    flows: OwnedFd,
    nat_reverse: OwnedFd,
    config: GcConfig,
    totals: GcTotals,
}

impl FlowGc {
    /// Opens the maps pinned under `pin_root` by the dataplane.
    pub fn open(pin_root: &Path, config: GcConfig) -> Result<Self> {
        let open = |name: &str| -> Result<OwnedFd> {
            let path = pin_root.join(name);
            let map = aya::maps::MapData::from_pin(&path).map_err(|source| Error::Map {
                context: format!("open pinned map {}", path.display()),
                source: Box::new(source),
            })?;
            map.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::io(format!("duplicate the descriptor of {name}"), e))
        };
        Ok(Self::from_fds(
            open(map_names::FLOWS)?,
            open(map_names::NAT_REV)?,
            config,
        ))
    }

    /// A collector over already-open maps (`flows`: `CtKey -> FlowEntry`, `nat_reverse`:
    /// `CtKey -> NatReverseEntry`).
    pub fn from_fds(flows: OwnedFd, nat_reverse: OwnedFd, config: GcConfig) -> Self {
        Self {
            flows,
            nat_reverse,
            config,
            totals: GcTotals::default(),
        }
    }

    pub fn totals(&self) -> GcTotals {
        self.totals
    }

    pub fn config(&self) -> &GcConfig {
        &self.config
    }

    /// The flow table's descriptor.
    pub fn flows_fd(&self) -> &OwnedFd {
        &self.flows
    }

    /// The reverse table's descriptor.
    pub fn nat_reverse_fd(&self) -> &OwnedFd {
        &self.nat_reverse
    }

    /// The idle timeout that applies to `entry` of protocol `proto`: the conntrack's own
    /// [`ct_timeout`] of the entry's state, as for the tc programs' `CT_FLOWS`.
    pub fn timeout_for(&self, proto: u8, entry: &FlowEntry) -> u64 {
        ct_timeout(&self.config.timeouts, proto, entry.ct.state)
    }

    /// One sweep at `now_ns` (CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`; see
    /// [`monotonic_now_ns`]).
    pub fn sweep(&mut self, now_ns: u64) -> Result<SweepReport> {
        let started = Instant::now();
        let mut report = SweepReport::default();
        let mut budget = self.config.max_deletes_per_sweep;

        let flows: Vec<(CtKey, FlowEntry)> =
            lookup_all(self.flows.as_fd(), self.config.batch_size)?;
        report.flows_scanned = flows.len() as u64;
        // Read before the flows are judged: the set of live flows is only needed to find
        // orphaned reverse entries, and is not built when there are none (DSR-only nodes).
        let reverse: Vec<(CtKey, NatReverseEntry)> =
            lookup_all(self.nat_reverse.as_fd(), self.config.batch_size)?;
        let track_live = !reverse.is_empty();
        let mut live: HashSet<CtKey> =
            HashSet::with_capacity(if track_live { flows.len() } else { 0 });
        for (key, entry) in &flows {
            if !is_expired(
                entry.ct.last_seen_ns,
                now_ns,
                self.timeout_for(key.proto, entry),
            ) {
                if track_live {
                    live.insert(*key);
                }
                continue;
            }
            if budget == 0 {
                report.deferred += 1;
                if track_live {
                    live.insert(*key);
                }
                continue;
            }
            // Re-read: a packet may have refreshed the entry since the batch read.
            let Some(current) = lookup::<CtKey, FlowEntry>(self.flows.as_fd(), key)? else {
                continue;
            };
            let still_expired = is_expired(
                current.ct.last_seen_ns,
                now_ns,
                self.timeout_for(key.proto, &current),
            );
            if !still_expired {
                report.flows_kept_live += 1;
                if track_live {
                    live.insert(*key);
                }
            } else if delete(self.flows.as_fd(), key)? {
                report.flows_expired += 1;
                budget -= 1;
            }
        }

        report.nat_scanned = reverse.len() as u64;
        for (key, entry) in &reverse {
            let owner = owner_of(key, entry);
            if live.contains(&owner) {
                continue;
            }
            if budget == 0 {
                report.deferred += 1;
                continue;
            }
            // The owner may have been created after the flow table was read (the kernel
            // inserts the reverse entry first): look again before deleting.
            if lookup::<CtKey, FlowEntry>(self.flows.as_fd(), &owner)?.is_some() {
                continue;
            }
            if delete(self.nat_reverse.as_fd(), key)? {
                report.nat_orphans_removed += 1;
                budget -= 1;
            }
        }

        report.duration_us = started.elapsed().as_micros() as u64;
        self.totals.sweeps += 1;
        self.totals.flows_expired += report.flows_expired;
        self.totals.flows_kept_live += report.flows_kept_live;
        self.totals.nat_orphans_removed += report.nat_orphans_removed;
        Ok(report)
    }
}

impl FlowGc {
    /// Every entry of the flow table (`lb-ctl conntrack list`), read in batches.
    pub fn entries(&self) -> Result<Vec<(CtKey, FlowEntry)>> {
        lookup_all(self.flows.as_fd(), self.config.batch_size)
    }

    /// Deletes `keys` from the flow table; answers how many were there. A deleted flow's next
    /// packet re-creates it on the same backend (while the Maglev table is unchanged), and a
    /// full-NAT flow finds its reverse entry and keeps its port.
    pub fn remove(&self, keys: &[CtKey]) -> Result<u64> {
        let mut deleted = 0;
        for key in keys {
            deleted += u64::from(delete(self.flows.as_fd(), key)?);
        }
        Ok(deleted)
    }

    /// Deletes every flow and reverse entry (`lb-ctl`'s flush, and benchmarks that need an
    /// empty table between runs). Returns how many entries were deleted. Established
    /// connections survive a flush: their next packet re-creates the flow with the same
    /// backend while the Maglev table is unchanged, but full-NAT flows get a new source port.
    pub fn flush(&mut self) -> Result<u64> {
        let mut deleted = 0;
        for (key, _) in lookup_all::<CtKey, FlowEntry>(self.flows.as_fd(), self.config.batch_size)?
        {
            deleted += u64::from(delete(self.flows.as_fd(), &key)?);
        }
        for (key, _) in
            lookup_all::<CtKey, NatReverseEntry>(self.nat_reverse.as_fd(), self.config.batch_size)?
        {
            deleted += u64::from(delete(self.nat_reverse.as_fd(), &key)?);
        }
        Ok(deleted)
    }
}

/// The client flow's key that owns the reverse entry `key -> entry`: the same canonical key the
/// kernel side computes for the client <-> VIP flow.
pub fn owner_of(key: &CtKey, entry: &NatReverseEntry) -> CtKey {
    canonical_key(
        entry.client_addr,
        entry.client_port_be,
        entry.vip_addr,
        entry.vip_port_be,
        key.proto,
        key.family,
    )
    .0
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_BOOTTIME in nanoseconds: the clock of `bpf_ktime_get_boot_ns` and of a task's
/// `start_boottime` (the process tracer's).
pub fn boottime_now_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// How often the daemon sweeps by default.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

// The raw map operations moved to `crate::bpf::maps`; kept here under their old paths for the
// tests and tools that use them.
pub use crate::bpf::maps::{
    BPF_MAP_TYPE_LRU_HASH, MapLayout, create_hash_map, lookup_batch, lookup_batch_all, map_layout,
    read_all, update, update_all,
};
use crate::bpf::maps::{delete, lookup, lookup_all};
