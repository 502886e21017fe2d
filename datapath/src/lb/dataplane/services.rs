//! Programming services into the maps (see the atomicity rules in `super`).
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    os::fd::AsFd,
};

use aya::util::nr_cpus;
use bpf_common::{
    BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_UNUSED, BackendInfo, MODE_DSR, MODE_FULL_NAT,
    SourceRangeKey, VIP_F_SOURCE_RANGES, VIP_F_XDP_ONLY, VipAddrKey, VipInfo, VipKey, maglev_index,
    reason, source_range_prefix_len,
};
use datapath_api::{
    BackendKey, BackendSpec, BackendState, DesiredState, ForwardingMode, ServiceSpec, StatsSnapshot,
};
use lb_core::maglev::{self, MaglevBackend};
use tracing::warn;

use crate::error::{Error, Result, map_error};

use super::*;

/// Whether a programmed backend gets an empty datagram to make the kernel resolve its
/// neighbour entry (see [`Dataplane::prime_neighbours`]). Only without the netlink controller,
/// which keeps the next hops as managed neighbours instead; fixed at start.
static PRIME_NEIGHBOURS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the neighbour priming on or off for this process.
pub fn set_neighbour_priming(on: bool) {
    PRIME_NEIGHBOURS.store(on, std::sync::atomic::Ordering::Relaxed);
}

impl Dataplane {
    /// Programs one service (new or changed) so that the datapath switches from its previous
    /// table to the new one in a single map update. On error the previous table stays live.
    pub fn apply_service(&mut self, service: &ServiceSpec) -> Result<()> {
        let key = vip_key(&service.key)?;
        if service.id >= self.config.max_services {
            return Err(Error::CapacityExhausted(format!(
                "service id {} beyond the configured {} services",
                service.id, self.config.max_services
            )));
        }
        let previous: BTreeMap<BackendKey, BackendSpec> = self
            .programmed
            .get(&service.key)
            .map(|p| {
                p.spec
                    .backends
                    .iter()
                    .map(|b| (b.key(), b.clone()))
                    .collect()
            })
            .unwrap_or_default();

        // Resolve every backend's datapath record first: nothing is written if one fails.
        let prime = PRIME_NEIGHBOURS.load(std::sync::atomic::Ordering::Relaxed);
        let mut records = Vec::with_capacity(service.backends.len());
        for backend in &service.backends {
            if backend.id >= self.config.max_backends {
                return Err(Error::CapacityExhausted(format!(
                    "backend id {} beyond the configured {} backends",
                    backend.id, self.config.max_backends
                )));
            }
            let addr = backend.addr;
            let snat = match service.snat_addr {
                Some(snat) => {
                    if prime {
                        let _ = self.probe.source_towards(addr, true);
                    }
                    snat
                }
                None => self.probe.source_towards(addr, prime)?,
            };
            if snat.is_ipv4() != addr.is_ipv4() {
                return Err(Error::InvalidArgument(format!(
                    "the route to backend {addr} uses source {snat}, of the other family"
                )));
            }
            records.push((
                backend,
                BackendInfo {
                    addr: addr16(addr),
                    snat_addr: addr16(snat),
                    port_be: backend.port.to_be(),
                    family: family_of(addr),
                    state: match backend.state {
                        BackendState::Active => BACKEND_ACTIVE,
                        BackendState::Draining => BACKEND_DRAINING,
                    },
                    generation: backend.generation,
                },
            ));
        }

        // The new table, over active backends only.
        let active: Vec<&BackendSpec> = service
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .collect();
        let identities: Vec<String> = active.iter().map(|b| b.key().to_string()).collect();
        let table = if active.is_empty() {
            Vec::new()
        } else {
            let members: Vec<MaglevBackend<'_>> = active
                .iter()
                .zip(&identities)
                .map(|(b, identity)| MaglevBackend {
                    key: identity.as_bytes(),
                    weight: b.weight,
                })
                .collect();
            maglev::build_table(&members, self.config.maglev_size)
                .map_err(|e| Error::InvalidArgument(format!("maglev table: {e}")))?
                .into_iter()
                .map(|index| active[index as usize].id)
                .collect::<Vec<u32>>()
        };

        // Step 1: backends that are new, or that become active, before the table can point at
        // them. New slots start with zeroed counters. Each is one batch: a sync of 10,000
        // services would otherwise make three syscalls per backend.
        let mut zeroed = Vec::new();
        let mut writes = Vec::new();
        let mut written_new = Vec::new();
        for (backend, info) in &records {
            let old = previous.get(&backend.key());
            let is_new = old.is_none_or(|o| o.id != backend.id);
            let becomes_active = old.is_some_and(|o| o.state != BackendState::Active)
                && backend.state == BackendState::Active;
            // Before the start's reconcile, a slot already pinned with this generation is the
            // same backend from before a restart: keep its counters.
            let already_pinned = is_new
                && !self.reconciled
                && self.backends.get(&backend.id, 0).is_ok_and(|pinned| {
                    pinned.state != BACKEND_UNUSED && pinned.generation == backend.generation
                });
            if is_new && !already_pinned {
                zeroed.push(backend.id);
            }
            if is_new || becomes_active {
                writes.push((backend.id, *info));
                if is_new {
                    written_new.push(backend.id);
                }
            }
        }
        if !zeroed.is_empty() {
            self.zero_counters(CounterKind::Backend, &zeroed)?;
        }
        if !writes.is_empty() {
            let fd = aya::maps::IterableMap::map(&self.backends).fd().as_fd();
            if let Err(e) = crate::bpf::maps::update_all(fd, &writes) {
                self.free_backends(&written_new);
                return Err(e.context(format!("write the backends of {}", service.key)));
            }
        }

        // Step 2: the inactive table slot.
        let current = self.vips.get(&key, 0).ok();
        let slot = match current {
            Some(info) if info.service_id == service.id => 1 - (info.table_slot & 1),
            _ => 0,
        };
        if current.is_none_or(|info| info.service_id != service.id) {
            self.zero_counters(CounterKind::Service, &[service.id])?;
        }
        // Written in place through the mapping (or, in a map an older build pinned, one
        // BPF_MAP_UPDATE_BATCH per 8192 entries): a 65537-entry table goes live in well under a
        // millisecond, where a syscall per entry took a tenth of a second.
        let first = maglev_index(service.id, slot, self.config.maglev_size, 0);
        let written = match &self.maglev_mapped {
            Some(mapped) => mapped.write_range(first, &table),
            None => {
                let entries: Vec<(u32, u32)> = (first..).zip(table.iter().copied()).collect();
                crate::bpf::maps::update_all(
                    aya::maps::IterableMap::map(&self.maglev).fd().as_fd(),
                    &entries,
                )
            }
        };
        if let Err(e) = written {
            self.free_backends(&written_new);
            return Err(e.context(format!("write the Maglev table of {}", service.key)));
        }

        // Step 3: the source ranges the flip turns on, then the flip.
        let old_ranges: Vec<datapath_api::SourceRange> = self
            .programmed
            .get(&service.key)
            .filter(|p| p.spec.id == service.id)
            .map(|p| p.spec.source_ranges.clone())
            .unwrap_or_default();
        if let Err(e) = self.write_source_ranges(service.id, &service.source_ranges) {
            self.free_backends(&written_new);
            return Err(e);
        }
        let info = VipInfo {
            service_id: service.id,
            table_slot: slot,
            active_backends: if table.is_empty() {
                0
            } else {
                active.len() as u32
            },
            mode: match service.mode {
                ForwardingMode::FullNat => MODE_FULL_NAT,
                ForwardingMode::Dsr => MODE_DSR,
            },
            flags: if service.source_ranges.is_empty() {
                0
            } else {
                VIP_F_SOURCE_RANGES
            } | if service.xdp_only { VIP_F_XDP_ONLY } else { 0 },
            _pad: [0; 2],
        };
        if let Err(e) = self.vips.insert(key, info, 0).map_err(map_error(format!(
            "switch {} to its new table",
            service.key
        ))) {
            self.free_backends(&written_new);
            return Err(e);
        }
        // Ranges the service no longer has (after the flip, which stopped consulting them).
        let stale: Vec<datapath_api::SourceRange> = old_ranges
            .into_iter()
            .filter(|r| !service.source_ranges.contains(r))
            .collect();
        self.remove_source_ranges(service.id, &stale);
        // Counts services per VIP address for the anomaly paths; an error here only affects
        // how fragments to this address are counted.
        let _ = self.vip_addrs.insert(vip_addr_key(service.key.vip)?, 1, 0);

        // Step 4: backends leaving the active set, then removed backends.
        let leaving: Vec<(u32, BackendInfo)> = records
            .iter()
            .filter(|(backend, _)| {
                previous.get(&backend.key()).is_some_and(|old| {
                    old.id == backend.id
                        && (old.state != backend.state || old.generation != backend.generation)
                        && backend.state != BackendState::Active
                })
            })
            .map(|(backend, info)| (backend.id, *info))
            .collect();
        if !leaving.is_empty() {
            let fd = aya::maps::IterableMap::map(&self.backends).fd().as_fd();
            crate::bpf::maps::update_all(fd, &leaving)
                .map_err(|e| e.context(format!("update the backends of {}", service.key)))?;
        }
        let kept: BTreeSet<u32> = service.backends.iter().map(|b| b.id).collect();
        let removed: Vec<u32> = previous
            .values()
            .map(|b| b.id)
            .filter(|id| !kept.contains(id))
            .collect();
        self.free_backends(&removed);

        let mut table_entries = BTreeMap::new();
        for backend_id in &table {
            *table_entries.entry(*backend_id).or_insert(0) += 1;
        }
        self.programmed.insert(
            service.key,
            Programmed {
                spec: service.clone(),
                table_entries,
            },
        );
        Ok(())
    }

    /// Removes a service: its VIP stops matching at once; its backend slots are freed.
    pub fn remove_service(&mut self, service: &ServiceSpec) -> Result<()> {
        let key = vip_key(&service.key)?;
        match self.vips.remove(&key) {
            Ok(()) => {}
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_error(format!("remove {}", service.key))(e)),
        }
        let address_still_used = self
            .programmed
            .keys()
            .any(|k| *k != service.key && k.vip == service.key.vip);
        if !address_still_used {
            let _ = self.vip_addrs.remove(&vip_addr_key(service.key.vip)?);
        }
        self.remove_source_ranges(service.id, &service.source_ranges);
        let mut ids: Vec<u32> = service.backends.iter().map(|b| b.id).collect();
        if let Some(programmed) = self.programmed.remove(&service.key) {
            self.remove_source_ranges(programmed.spec.id, &programmed.spec.source_ranges);
            ids.extend(programmed.spec.backends.iter().map(|b| b.id));
        }
        self.free_backends(&ids);
        Ok(())
    }

    /// At start: programs every service of `state` and removes whatever the pinned maps hold
    /// that `state` does not.
    pub fn reconcile(&mut self, state: &DesiredState) -> Result<()> {
        for service in state.services.values() {
            self.apply_service(service)?;
        }
        let wanted: HashSet<VipKey> = state.services.keys().map(vip_key).collect::<Result<_>>()?;
        let stale: Vec<VipKey> = self
            .vips
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            warn!(?key, "removing a VIP the state file does not know");
            let _ = self.vips.remove(&key);
        }
        let wanted_addrs: HashSet<VipAddrKey> = state
            .services
            .keys()
            .map(|k| vip_addr_key(k.vip))
            .collect::<Result<_>>()?;
        let stale_addrs: Vec<VipAddrKey> = self
            .vip_addrs
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted_addrs.contains(k))
            .collect();
        for key in stale_addrs {
            let _ = self.vip_addrs.remove(&key);
        }
        // Source ranges a previous run left for services that no longer have them.
        let wanted_ranges: HashSet<(u32, [u8; 4], u32)> = state
            .services
            .values()
            .flat_map(|s| {
                s.source_ranges
                    .iter()
                    .filter_map(|r| range_key(s.id, r).ok())
                    .map(|k| (k.prefix_len(), k.data().addr, k.data().service_id_be))
            })
            .collect();
        let stale_ranges: Vec<aya::maps::lpm_trie::Key<bpf_common::SourceRangeKey>> = self
            .source_ranges
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| {
                !wanted_ranges.contains(&(k.prefix_len(), k.data().addr, k.data().service_id_be))
            })
            .collect();
        for key in stale_ranges {
            let _ = self.source_ranges.remove(&key);
        }
        let used: BTreeSet<u32> = state
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        let unused: Vec<u32> = (0..self.config.max_backends)
            .filter(|id| !used.contains(id))
            .filter(|id| {
                self.backends
                    .get(id, 0)
                    .is_ok_and(|info| info.state != BACKEND_UNUSED)
            })
            .collect();
        self.free_backends(&unused);
        self.reconciled = true;
        Ok(())
    }

    /// Writes service `id`'s source ranges (all or nothing: the ones written are removed if one
    /// fails).
    fn write_source_ranges(&mut self, id: u32, ranges: &[datapath_api::SourceRange]) -> Result<()> {
        let mut written = Vec::new();
        for r in ranges {
            let key = range_key(id, r)?;
            if let Err(e) = self
                .source_ranges
                .insert(&key, 1, 0)
                .map_err(map_error(format!(
                    "write source range {r} (LB_SRC_RANGES full?)"
                )))
            {
                for k in &written {
                    let _ = self.source_ranges.remove(k);
                }
                return Err(e);
            }
            written.push(key);
        }
        Ok(())
    }

    fn remove_source_ranges(&mut self, id: u32, ranges: &[datapath_api::SourceRange]) {
        for r in ranges {
            if let Ok(key) = range_key(id, r) {
                let _ = self.source_ranges.remove(&key);
            }
        }
    }

    /// Reads every counter, summed over CPUs.
    pub fn stats(&self) -> Result<StatsSnapshot> {
        let services = sum_all_counters(&self.vip_stats, self.config.max_services)?;
        let backends = sum_all_counters(&self.backend_stats, self.config.max_backends)?;
        let mut snapshot = self.reason_counters()?;
        for programmed in self.programmed.values() {
            let id = programmed.spec.id;
            snapshot
                .services
                .insert(id, services.get(id as usize).copied().unwrap_or_default());
            for backend in &programmed.spec.backends {
                snapshot.backends.insert(
                    backend.id,
                    backends
                        .get(backend.id as usize)
                        .copied()
                        .unwrap_or_default(),
                );
            }
        }
        Ok(snapshot)
    }

    /// The counters of one service and its backends, and the reasons: what `lb-ctl service
    /// show` needs, without reading every other service's.
    pub fn service_stats(&self, service: &ServiceSpec) -> Result<StatsSnapshot> {
        let mut snapshot = self.reason_counters()?;
        snapshot
            .services
            .insert(service.id, sum_counter(&self.vip_stats, service.id)?);
        for backend in &service.backends {
            snapshot
                .backends
                .insert(backend.id, sum_counter(&self.backend_stats, backend.id)?);
        }
        Ok(snapshot)
    }

    fn reason_counters(&self) -> Result<StatsSnapshot> {
        let mut snapshot = StatsSnapshot::default();
        for (index, name) in reason::NAMES.iter().enumerate() {
            let values = self
                .reasons
                .get(&(index as u32), 0)
                .map_err(map_error("read LB_REASONS"))?;
            snapshot
                .reasons
                .insert((*name).to_string(), values.iter().sum());
        }
        snapshot.syn_flood = self.syn_flood_view()?;
        Ok(snapshot)
    }

    /// The SYN-flood mode of every CPU (`LB_SYN_FLOOD`).
    fn syn_flood_view(&self) -> Result<datapath_api::SynFloodView> {
        let windows = self
            .syn_flood
            .get(&0, 0)
            .map_err(map_error("read LB_SYN_FLOOD"))?;
        let now = crate::ct::gc::monotonic_now_ns();
        let mut view = datapath_api::SynFloodView {
            rate_per_cpu: self.config.syn_flood_rate,
            ..Default::default()
        };
        for window in windows.iter() {
            view.cpus += 1;
            view.entered += window.entered;
            if lb_core::flood::flooding_at(window, now) {
                view.cpus_flooding += 1;
            }
        }
        Ok(view)
    }

    /// Number of entries of `service`'s live Maglev table that point at each backend id.
    pub fn table_entries(&self, service: &ServiceSpec) -> Result<BTreeMap<u32, u32>> {
        Ok(self
            .programmed
            .get(&service.key)
            .filter(|p| p.spec.id == service.id)
            .map(|p| p.table_entries.clone())
            .unwrap_or_default())
    }

    /// How many packets found no neighbour entry for their next hop (`pass_fib_no_neigh`).
    pub fn neighbour_misses(&self) -> Result<u64> {
        let values = self
            .reasons
            .get(&reason::PASS_FIB_NO_NEIGH, 0)
            .map_err(map_error("read LB_REASONS"))?;
        Ok(values.iter().sum())
    }

    /// Makes the kernel resolve every programmed backend's neighbour entry again.
    ///
    /// Why: without a neighbour entry `bpf_fib_lookup` cannot give the next hop's MAC, and the
    /// packet's fallback to the stack does not resolve it either - in full-NAT the rewritten
    /// packet carries one of this node's own addresses as source, which the kernel drops as a
    /// martian before it would send an ARP request, and in DSR the kernel has no route for the
    /// VIP. The daemon calls this when `pass_fib_no_neigh` rises (a flushed or expired entry);
    /// the client's retransmission then finds the neighbour.
    pub fn prime_neighbours(&mut self) {
        for programmed in self.programmed.values() {
            for backend in &programmed.spec.backends {
                if let Err(e) = self.probe.source_towards(backend.addr, true) {
                    warn!(backend = %backend.addr, error = %e, "could not prime the neighbour entry");
                }
            }
        }
    }

    fn free_backends(&mut self, ids: &[u32]) {
        if ids.is_empty() {
            return;
        }
        let freed: Vec<(u32, BackendInfo)> =
            ids.iter().map(|id| (*id, BackendInfo::default())).collect();
        let fd = aya::maps::IterableMap::map(&self.backends).fd().as_fd();
        if let Err(e) = crate::bpf::maps::update_all(fd, &freed) {
            warn!(backends = ids.len(), error = %e, "could not free backend slots");
        }
    }

    /// Zeroes the per-CPU counters of `ids`, in one batch.
    fn zero_counters(&mut self, kind: CounterKind, ids: &[u32]) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| Error::io("count possible CPUs", e))?;
        let map = match kind {
            CounterKind::Service => &self.vip_stats,
            CounterKind::Backend => &self.backend_stats,
        };
        let fd = aya::maps::IterableMap::map(map).fd().as_fd();
        crate::bpf::maps::update_all_per_cpu(fd, ids, bpf_common::Counter::default(), cpus)
            .map_err(|e| e.context(format!("reset the counters of {} ids", ids.len())))
    }
}

/// Every id's counter of a per-CPU counter array, summed over CPUs, read in batches
/// (`BPF_MAP_LOOKUP_BATCH`): a scrape of 100,000 backends would otherwise be 100,000 syscalls
/// under the controller lock.
fn sum_all_counters(
    map: &PerCpuArray<aya::maps::MapData, bpf_common::Counter>,
    entries: u32,
) -> Result<Vec<Counter>> {
    const BATCH: usize = 4_096;
    let cpus = nr_cpus().map_err(|(_, e)| Error::io("count possible CPUs", e))?;
    let fd = aya::maps::IterableMap::map(map).fd().as_fd();
    let mut sums = Vec::with_capacity(entries as usize);
    let mut keys = vec![0u32; BATCH];
    let mut values = vec![bpf_common::Counter::default(); BATCH * cpus];
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    // Bounded: every call reads at least one entry or ends the walk.
    for _ in 0..=(entries as usize / BATCH + 1) {
        let (filled, done) = crate::bpf::maps::lookup_batch(
            fd,
            (!first).then_some(&mut token_in),
            &mut token_out,
            &mut keys,
            &mut values,
            cpus,
        )
        .map_err(|e| Error::io("read the counters (BPF_MAP_LOOKUP_BATCH)", e))?;
        first = false;
        for per_cpu in values[..filled * cpus].chunks_exact(cpus) {
            sums.push(sum_over_cpus(per_cpu));
        }
        if done || filled == 0 {
            break;
        }
        token_in = token_out;
    }
    Ok(sums)
}

/// The `LB_SRC_RANGES` key of service `id`'s range `r`.
fn range_key(
    id: u32,
    r: &datapath_api::SourceRange,
) -> Result<aya::maps::lpm_trie::Key<SourceRangeKey>> {
    let addr = ipv4_of(r.addr, "source range")?;
    Ok(aya::maps::lpm_trie::Key::new(
        source_range_prefix_len(r.len),
        SourceRangeKey {
            service_id_be: id.to_be(),
            addr: addr.octets(),
        },
    ))
}
