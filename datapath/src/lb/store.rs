//! The desired-state store: what the operator asked for, validated, with ids assigned, kept in
//! memory and in the state file.
//!
//! Every change is a transaction over a copy of the state: the changed service is programmed
//! into the dataplane first, then the new state is written to the state file, and only then
//! does the copy replace the in-memory state. A change that fails at any step leaves the
//! dataplane, the file and the memory as they were, so what the daemon serves, what it shows
//! and what it restores after a restart never disagree.
//!
//! The state file is the JSON of [`DesiredState`] with a format version:
//!
//! ```json
//! { "version": 1, "next_generation": 3, "services": [ { "key": {...}, "backends": [...] } ] }
//! ```
//!
//! Services are stored as a list because JSON object keys must be strings and a
//! [`datapath_api::ServiceKey`] is a struct; each entry carries its own key.
use std::{
    collections::BTreeSet,
    fs::{self, DirBuilder},
    io,
    net::IpAddr,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use datapath_api::{
    AddBackend, BackendKey, BackendSpec, CreateService, DeclaredService, DesiredState,
    ForwardingMode, ServiceKey, ServiceSource, ServiceSpec, UpdateBackend,
};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{Dataplane, DataplaneConfig},
    error::{Error, Result},
};

/// Version of the state file format this daemon writes and understands.
pub const STATE_FILE_VERSION: u32 = 1;

/// What the dataplane can hold; the store refuses changes beyond it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Service ids are `0..max_services`.
    pub max_services: u32,
    /// Backend ids are `0..max_backends`, shared by all services.
    pub max_backends: u32,
}

impl Limits {
    pub fn from_config(config: &DataplaneConfig) -> Self {
        Self {
            max_services: config.max_services,
            max_backends: config.max_backends,
        }
    }
}

/// Where the store programs services: the BPF maps in the daemon.
pub trait ServicePlane {
    /// Programs a new or changed service; on error the previous version stays live.
    fn apply_service(&mut self, s: &ServiceSpec) -> Result<()>;
    /// Removes a service; on error it stays live.
    fn remove_service(&mut self, s: &ServiceSpec) -> Result<()>;
}

impl ServicePlane for Dataplane {
    fn apply_service(&mut self, s: &ServiceSpec) -> Result<()> {
        Dataplane::apply_service(self, s)
    }

    fn remove_service(&mut self, s: &ServiceSpec) -> Result<()> {
        Dataplane::remove_service(self, s)
    }
}

/// The state file's layout.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    #[serde(default)]
    next_generation: u32,
    services: Vec<ServiceSpec>,
}

/// The state file's layout as written, borrowing the services.
#[derive(Serialize)]
struct StateFileOut<'a> {
    version: u32,
    next_generation: u32,
    services: Vec<&'a ServiceSpec>,
}

/// Read first, alone, so that a file from a newer daemon is reported as such rather than as
/// whatever field it no longer has.
#[derive(Deserialize)]
struct VersionProbe {
    version: Option<u32>,
}

/// One change to the dataplane, with what undoes it.
enum Change {
    /// A service was created (`old` is `None`) or changed.
    Apply {
        new: ServiceSpec,
        old: Option<ServiceSpec>,
    },
    Remove(ServiceSpec),
}

/// Called with the new desired state after every committed change (the lb controller
/// publishes the backends' addresses from it).
pub type Observer = std::sync::Arc<dyn Fn(&DesiredState) + Send + Sync>;

/// The desired state, its file, and the rules every change must follow.
pub struct Store {
    path: PathBuf,
    limits: Limits,
    state: DesiredState,
    observer: Option<Observer>,
    /// Changes of a deferred batch not yet in the state file.
    unsaved: bool,
    /// Bumped by every committed change; the state file says which it holds (`file`).
    generation: u64,
    /// The generation the state file holds; locked while it is written.
    file: std::sync::Arc<std::sync::Mutex<u64>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Loads the state file at `path` (a missing file is an empty state), checks it against
    /// `limits`, and rewrites it, which also proves at start that the state can be saved.
    ///
    /// A file that cannot be parsed or breaks a rule is [`Error::CorruptState`]: the daemon
    /// must refuse to start rather than serve, and later save, less than what was declared.
    pub fn open(path: impl Into<PathBuf>, limits: Limits) -> Result<Self> {
        let path = path.into();
        let state = match fs::read(&path) {
            Ok(bytes) => decode(&bytes, limits).map_err(|reason| Error::CorruptState {
                path: path.clone(),
                reason,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => DesiredState::default(),
            Err(source) => return Err(Error::Persistence { path, source }),
        };
        let dir = parent_dir(&path);
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| Error::Persistence {
                path: path.clone(),
                source,
            })?;
        let store = Self {
            path,
            limits,
            state,
            observer: None,
            unsaved: false,
            generation: 0,
            file: Default::default(),
        };
        store.persist(&store.state, 0)?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Calls `observer` with the state now and after every committed change.
    pub fn observe(&mut self, observer: Observer) {
        observer(&self.state);
        self.observer = Some(observer);
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// The service `key`, or [`Error::NotFound`].
    pub fn service(&self, key: &ServiceKey) -> Result<&ServiceSpec> {
        self.state
            .services
            .get(key)
            .ok_or_else(|| service_not_found(key))
    }

    /// Creates a service without backends under the lowest free service id.
    pub fn create_service<P: ServicePlane + ?Sized>(
        &mut self,
        plane: &mut P,
        req: &CreateService,
    ) -> Result<ServiceSpec> {
        let key = ServiceKey {
            vip: req.vip,
            port: req.port,
            proto: req.proto,
        };
        check_service(&key, req.mode, req.snat_addr).map_err(Error::InvalidArgument)?;
        if self.state.services.contains_key(&key) {
            return Err(Error::AlreadyExists(format!("service {key}")));
        }
        let used: BTreeSet<u32> = self.state.services.values().map(|s| s.id).collect();
        let id = lowest_free(&used, self.limits.max_services).ok_or_else(|| {
            Error::CapacityExhausted(format!(
                "all {} service slots are in use (max_services)",
                self.limits.max_services
            ))
        })?;
        let spec = ServiceSpec {
            key,
            source: ServiceSource::Api,
            owner: None,
            source_ranges: Vec::new(),
            xdp_only: false,
            mode: req.mode,
            snat_addr: req.snat_addr,
            id,
            backends: Vec::new(),
        };
        let mut next = self.state.clone();
        next.services.insert(key, spec.clone());
        self.commit(
            plane,
            next,
            Change::Apply {
                new: spec.clone(),
                old: None,
            },
        )?;
        Ok(spec)
    }

    /// Deletes a service and frees its backend slots; returns it as it was.
    pub fn delete_service<P: ServicePlane + ?Sized>(
        &mut self,
        plane: &mut P,
        key: &ServiceKey,
    ) -> Result<ServiceSpec> {
        let old = self.service(key)?.clone();
        let mut next = self.state.clone();
        next.services.remove(key);
        self.commit(plane, next, Change::Remove(old.clone()))?;
        Ok(old)
    }

    /// Adds a backend to service `key` under the lowest free backend id and a new generation.
    pub fn add_backend<P: ServicePlane + ?Sized>(
        &mut self,
        plane: &mut P,
        key: &ServiceKey,
        req: &AddBackend,
    ) -> Result<ServiceSpec> {
        let old = self.service(key)?.clone();
        let bkey = BackendKey {
            addr: req.addr,
            port: req.port,
        };
        check_backend(key, &bkey, req.weight).map_err(Error::InvalidArgument)?;
        let pos = match old.backends.binary_search_by(|b| b.key().cmp(&bkey)) {
            Ok(_) => {
                return Err(Error::AlreadyExists(format!(
                    "backend {bkey} of service {key}"
                )));
            }
            Err(pos) => pos,
        };
        let used: BTreeSet<u32> = self
            .state
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();
        let id = lowest_free(&used, self.limits.max_backends).ok_or_else(|| {
            Error::CapacityExhausted(format!(
                "all {} backend slots are in use (max_backends)",
                self.limits.max_backends
            ))
        })?;
        let mut next = self.state.clone();
        let generation = next.next_generation;
        // Wrapping: a repeat needs 2^32 backend additions, and then only matters if a flow
        // pinned to the slot's use of that many changes ago is still alive.
        next.next_generation = next.next_generation.wrapping_add(1);
        let mut new = old.clone();
        check_total_weight(&new, req.weight).map_err(Error::InvalidArgument)?;
        new.backends.insert(
            pos,
            BackendSpec {
                addr: req.addr,
                port: req.port,
                weight: req.weight,
                state: req.state,
                id,
                generation,
            },
        );
        next.services.insert(*key, new.clone());
        self.commit(
            plane,
            next,
            Change::Apply {
                new: new.clone(),
                old: Some(old),
            },
        )?;
        Ok(new)
    }

    /// Removes a backend from service `key` and frees its slot.
    pub fn remove_backend<P: ServicePlane + ?Sized>(
        &mut self,
        plane: &mut P,
        key: &ServiceKey,
        backend: &BackendKey,
    ) -> Result<ServiceSpec> {
        let old = self.service(key)?.clone();
        let pos = find_backend(&old, backend)?;
        let mut new = old.clone();
        new.backends.remove(pos);
        let mut next = self.state.clone();
        next.services.insert(*key, new.clone());
        self.commit(
            plane,
            next,
            Change::Apply {
                new: new.clone(),
                old: Some(old),
            },
        )?;
        Ok(new)
    }

    /// Changes a backend's weight and/or state; its id and generation stay, so its established
    /// flows stay with it. A request that changes nothing touches nothing.
    pub fn update_backend<P: ServicePlane + ?Sized>(
        &mut self,
        plane: &mut P,
        key: &ServiceKey,
        backend: &BackendKey,
        req: &UpdateBackend,
    ) -> Result<ServiceSpec> {
        let old = self.service(key)?.clone();
        let pos = find_backend(&old, backend)?;
        if req.weight == Some(0) {
            return Err(Error::InvalidArgument(format!(
                "invalid weight 0 for backend {backend}: weights start at 1 (drain the backend to stop new flows)"
            )));
        }
        let mut new = old.clone();
        if let Some(weight) = req.weight {
            new.backends[pos].weight = 0;
            check_total_weight(&new, weight).map_err(Error::InvalidArgument)?;
            new.backends[pos].weight = weight;
        }
        if let Some(state) = req.state {
            new.backends[pos].state = state;
        }
        if new == old {
            return Ok(new);
        }
        let mut next = self.state.clone();
        next.services.insert(*key, new.clone());
        self.commit(
            plane,
            next,
            Change::Apply {
                new: new.clone(),
                old: Some(old),
            },
        )?;
        Ok(new)
    }

    /// Refuses an API change of service `key` when another source owns it, unless `force`.
    /// A forced change stays the owner's: its next sync of that service replaces it.
    pub fn check_api_may_change(&self, key: &ServiceKey, force: bool) -> Result<()> {
        let Some(spec) = self.state.services.get(key) else {
            return Ok(());
        };
        if spec.source.is_api() || force {
            return Ok(());
        }
        Err(Error::OwnedByOtherSource(format!(
            "service {key} belongs to the {} source ({}); change it there, or pass --force \
             (the {} source puts it back at its next change of it)",
            spec.source,
            spec.owner.as_deref().unwrap_or("unnamed"),
            spec.source,
        )))
    }

    /// Makes the services of `source` exactly `declared`, by difference: services it no longer
    /// declares are removed, new ones created, changed ones updated, and the rest not touched.
    /// With `scope`, only the services of those owners are replaced (one Kubernetes Service's
    /// change); the source's others stay as they are.
    /// A backend that stays keeps its id and generation, so its Maglev slots and its flows
    /// stay with it.
    ///
    /// Each service is one transaction with the dataplane: one that cannot be programmed (or
    /// is invalid, or is owned by another source, or finds no free id) keeps its previous
    /// version and is reported in [`SourceReport::rejected`]; the others apply. The state file
    /// is written once for the whole batch; if that fails, every change of the batch is undone
    /// and the error returned, so memory, file and dataplane still agree.
    ///
    /// Ids freed by this batch are not handed out again within it: the dataplane programs one
    /// service at a time, and a slot must not serve two services in between.
    pub fn replace_source<P: ServicePlane + ?Sized>(
        &mut self,
        plane: &mut P,
        source: ServiceSource,
        scope: Option<&BTreeSet<String>>,
        declared: Vec<DeclaredService>,
        durability: Durability,
    ) -> Result<SourceReport> {
        if source.is_api() {
            return Err(Error::Internal(
                "the API changes services one by one, not by replacement".into(),
            ));
        }
        let mut report = SourceReport::default();
        let mut wanted: std::collections::BTreeMap<ServiceKey, DeclaredService> =
            Default::default();
        for d in declared {
            let key = d.key;
            if let Some(first) = wanted.get(&key) {
                report.rejected.push(Rejected {
                    key,
                    owner: d.owner.clone(),
                    reason: format!("declared twice (also by {})", first.owner),
                });
                continue;
            }
            wanted.insert(key, d);
        }
        // Changes are made to the state in place, each with the value it replaced, so that a
        // failed save can put everything back (a copy of 10,000 services per change costs more
        // than the change).
        let mut undo_log: Vec<(ServiceKey, Option<ServiceSpec>)> = Vec::new();
        let mut applied: Vec<Change> = Vec::new();
        let generation_before = self.state.next_generation;
        let mut ids = Ids::default();

        // Removals first: what the source no longer declares.
        let gone: Vec<ServiceKey> = self
            .state
            .services
            .values()
            .filter(|s| {
                s.source == source
                    && !wanted.contains_key(&s.key)
                    && scope
                        .is_none_or(|owners| s.owner.as_deref().is_some_and(|o| owners.contains(o)))
            })
            .map(|s| s.key)
            .collect();
        for key in gone {
            let old = self.state.services[&key].clone();
            match plane.remove_service(&old) {
                Ok(()) => {
                    ids.freed(&old, None);
                    self.state.services.remove(&key);
                    report.removed += 1;
                    undo_log.push((key, Some(old.clone())));
                    applied.push(Change::Remove(old));
                }
                Err(e) => report.rejected.push(Rejected {
                    key: old.key,
                    owner: old.owner.clone().unwrap_or_default(),
                    reason: format!("cannot remove it: {e}"),
                }),
            }
        }

        for (key, d) in wanted {
            let old = self.state.services.get(&key).cloned();
            if let Some(old) = &old
                && old.source != source
            {
                report.rejected.push(Rejected {
                    key,
                    owner: d.owner,
                    reason: format!(
                        "service {key} belongs to the {} source ({})",
                        old.source,
                        old.owner.as_deref().unwrap_or("unnamed")
                    ),
                });
                continue;
            }
            let new = match self.build_declared(&d, source, old.as_ref(), &mut ids) {
                Ok(new) => new,
                Err(reason) => {
                    report.rejected.push(Rejected {
                        key,
                        owner: d.owner,
                        reason,
                    });
                    continue;
                }
            };
            if old.as_ref() == Some(&new) {
                report.unchanged += 1;
                continue;
            }
            match plane.apply_service(&new) {
                Ok(()) => {
                    if let Some(old) = &old {
                        ids.freed(old, Some(&new));
                        report.updated += 1;
                    } else {
                        report.created += 1;
                    }
                    self.state.services.insert(key, new.clone());
                    undo_log.push((key, old.clone()));
                    applied.push(Change::Apply { new, old });
                }
                Err(e) => report.rejected.push(Rejected {
                    key,
                    owner: d.owner,
                    reason: e.to_string(),
                }),
            }
        }
        if let Some((_, _, generation)) = &ids.pools {
            self.state.next_generation = *generation;
        }

        if applied.is_empty() {
            return Ok(report);
        }
        let addresses_changed = applied.iter().any(|c| match c {
            Change::Remove(_) => true,
            Change::Apply { new, old: None } => !new.backends.is_empty(),
            Change::Apply {
                new,
                old: Some(old),
            } => !new
                .backends
                .iter()
                .map(|b| b.addr)
                .eq(old.backends.iter().map(|b| b.addr)),
        });
        self.generation += 1;
        let saved = match durability {
            Durability::Now => self
                .persist(&self.state, self.generation)
                .map(|()| self.unsaved = false),
            Durability::Deferred => {
                self.unsaved = true;
                Ok(())
            }
        };
        if let Err(e) = saved {
            for change in applied.iter().rev() {
                if let Err(undo) = undo(plane, change) {
                    tracing::error!(error = %undo, "saving the state failed and undoing a \
                        source's change failed too: the dataplane differs from the saved state \
                        until the source's next sync or a restart");
                }
            }
            for (key, old) in undo_log.into_iter().rev() {
                match old {
                    Some(old) => self.state.services.insert(key, old),
                    None => self.state.services.remove(&key),
                };
            }
            self.state.next_generation = generation_before;
            self.generation -= 1;
            return Err(e);
        }
        // The observer wants the backends' addresses: a change of states or weights keeps
        // them (and a walk of 100,000 backends per endpoint change is not free).
        if addresses_changed && let Some(observer) = &self.observer {
            observer(&self.state);
        }
        Ok(report)
    }

    /// Whether changes are in memory and the dataplane but not yet in the state file (a
    /// source's deferred batch); [`Self::flush`] writes them.
    pub fn unsaved(&self) -> bool {
        self.unsaved
    }

    /// Writes the state file if a deferred batch left it behind.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(pending) = self.take_unsaved()
            && let Err(e) = pending.write()
        {
            self.unsaved = true;
            return Err(e);
        }
        Ok(())
    }

    /// What a deferred batch left unsaved, to write without holding the store (a state of
    /// 10,000 services takes tens of milliseconds to write): a copy of the state. If the write
    /// fails, [`Self::mark_unsaved`] says so, and the next flush tries again.
    pub fn take_unsaved(&mut self) -> Option<PendingWrite> {
        if !self.unsaved {
            return None;
        }
        self.unsaved = false;
        Some(PendingWrite {
            path: self.path.clone(),
            file: std::sync::Arc::clone(&self.file),
            generation: self.generation,
            state: self.state.clone(),
        })
    }

    /// A [`PendingWrite`] failed: the next flush writes again.
    pub fn mark_unsaved(&mut self) {
        self.unsaved = true;
    }

    /// The spec for declared service `d`: checked, with `old`'s ids and generations kept for
    /// the backends that stay and fresh ones (from the free ids, which it marks used) for new
    /// ones. The reason is one line.
    fn build_declared(
        &self,
        d: &DeclaredService,
        source: ServiceSource,
        old: Option<&ServiceSpec>,
        ids: &mut Ids,
    ) -> Result<ServiceSpec, String> {
        check_declared(d)?;
        let mut backends: Vec<&datapath_api::DeclaredBackend> = d.backends.iter().collect();
        backends.sort_by_key(|b| (b.addr, b.port));
        let kept = |bkey: &BackendKey| {
            old.and_then(|o| {
                o.backends
                    .binary_search_by(|x| x.key().cmp(bkey))
                    .ok()
                    .map(|i| &o.backends[i])
            })
        };
        let fresh = backends
            .iter()
            .filter(|b| {
                kept(&BackendKey {
                    addr: b.addr,
                    port: b.port,
                })
                .is_none()
            })
            .count();
        // The id pools are only built when an id is needed: most changes (an endpoint that
        // drains or returns) take none.
        let needs_ids = fresh > 0 || old.is_none();
        let pools = if needs_ids {
            Some(ids.pools(&self.state, self.limits))
        } else {
            None
        };
        let (service_ids, backend_ids, next_generation) = match pools {
            Some((s, b, g)) => (Some(s), Some(b), Some(g)),
            None => (None, None, None),
        };
        if let Some(backend_ids) = &backend_ids {
            let free_backends = backend_ids.free();
            if fresh > free_backends {
                return Err(format!(
                    "capacity exhausted: it needs {fresh} new backend slots and {free_backends} \
                     are free (max_backends {})",
                    self.limits.max_backends
                ));
            }
        }
        let id = match old {
            Some(o) => o.id,
            None => service_ids
                .expect("built for a new service")
                .take()
                .ok_or_else(|| {
                    format!(
                        "capacity exhausted: all {} service slots are in use (max_services)",
                        self.limits.max_services
                    )
                })?,
        };
        let mut backend_ids = backend_ids;
        let mut next_generation = next_generation;
        let mut specs = Vec::with_capacity(backends.len());
        for b in backends {
            let bkey = BackendKey {
                addr: b.addr,
                port: b.port,
            };
            let (id, generation) = match kept(&bkey) {
                Some(k) => (k.id, k.generation),
                None => {
                    let pool = backend_ids.as_mut().expect("built for a new backend");
                    let id = pool.take().expect("counted above");
                    let counter = next_generation.as_mut().expect("built with the pools");
                    let generation = **counter;
                    **counter = counter.wrapping_add(1);
                    (id, generation)
                }
            };
            specs.push(BackendSpec {
                addr: b.addr,
                port: b.port,
                weight: b.weight,
                state: b.state,
                id,
                generation,
            });
        }
        let mut source_ranges = d.source_ranges.clone();
        source_ranges.sort();
        source_ranges.dedup();
        Ok(ServiceSpec {
            key: d.key,
            source,
            owner: Some(d.owner.clone()),
            source_ranges,
            xdp_only: d.xdp_only,
            mode: d.mode,
            snat_addr: d.snat_addr,
            id,
            backends: specs,
        })
    }

    /// Programs `change`, saves `next`, and only then makes `next` the state. A failed save
    /// undoes the dataplane change.
    fn commit<P: ServicePlane + ?Sized>(
        &mut self,
        plane: &mut P,
        next: DesiredState,
        change: Change,
    ) -> Result<()> {
        match &change {
            Change::Apply { new, .. } => plane.apply_service(new)?,
            Change::Remove(old) => plane.remove_service(old)?,
        }
        if let Err(e) = self.persist(&next, self.generation + 1) {
            let (undo, what) = match &change {
                Change::Apply { old: Some(old), .. } => (plane.apply_service(old), old.key),
                Change::Apply { new, old: None } => (plane.remove_service(new), new.key),
                Change::Remove(old) => (plane.apply_service(old), old.key),
            };
            if let Err(undo_err) = undo {
                // The state file and memory still hold the old state, so a restart's
                // reconcile brings the dataplane back in line; say so loudly meanwhile.
                tracing::error!(
                    service = %what,
                    error = %undo_err,
                    "saving the state failed and undoing the dataplane change failed too: \
                     the dataplane differs from the saved state until the next change of \
                     this service or a restart"
                );
            }
            return Err(e);
        }
        // The write held every change so far, a deferred batch's included.
        self.unsaved = false;
        self.generation += 1;
        self.state = next;
        if let Some(observer) = &self.observer {
            observer(&self.state);
        }
        Ok(())
    }

    /// Writes `state` to the state file atomically: a temporary file in the same directory,
    /// flushed to disk, renamed over the old file, and the directory flushed.
    fn persist(&self, state: &DesiredState, generation: u64) -> Result<()> {
        write_state(&self.path, &self.file, generation, state)
    }
}

use crate::persist::parent_dir;

/// Writes `state` (of store generation `generation`) to `path`, unless a newer generation was
/// written already: writes made outside the store (a deferred batch's) may finish after a
/// later change's.
fn write_state(
    path: &Path,
    file: &std::sync::Mutex<u64>,
    generation: u64,
    state: &DesiredState,
) -> Result<()> {
    let mut written = file.lock().unwrap_or_else(|p| p.into_inner());
    if generation < *written {
        return Ok(());
    }
    let persistence = |source| Error::Persistence {
        path: path.to_path_buf(),
        source,
    };
    let out = StateFileOut {
        version: STATE_FILE_VERSION,
        next_generation: state.next_generation,
        services: state.services.values().collect(),
    };
    let started = std::time::Instant::now();
    // Compact: a state of 10,000 services is 20 MB pretty-printed, and twice as slow to write.
    let mut json = serde_json::to_vec(&out).map_err(|e| persistence(e.into()))?;
    json.push(b'\n');
    let encoded = started.elapsed();
    crate::persist::write_atomic(path, &json)?;
    *written = generation;
    tracing::debug!(services = state.services.len(), bytes = json.len(), ?encoded,
                    total = ?started.elapsed(), "state file written");
    Ok(())
}

/// A copy of the state to write outside the store (see [`Store::take_unsaved`]).
pub struct PendingWrite {
    path: PathBuf,
    file: std::sync::Arc<std::sync::Mutex<u64>>,
    generation: u64,
    state: DesiredState,
}

impl PendingWrite {
    pub fn write(&self) -> Result<()> {
        write_state(&self.path, &self.file, self.generation, &self.state)
    }
}

fn service_not_found(key: &ServiceKey) -> Error {
    Error::NotFound(format!("service {key}"))
}

fn find_backend(service: &ServiceSpec, backend: &BackendKey) -> Result<usize> {
    service
        .backends
        .binary_search_by(|b| b.key().cmp(backend))
        .map_err(|_| Error::NotFound(format!("backend {backend} of service {}", service.key)))
}

fn lowest_free(used: &BTreeSet<u32>, limit: u32) -> Option<u32> {
    (0..limit).find(|id| !used.contains(id))
}

/// The rules a declared service must follow (those of the API's changes): its own fields,
/// each backend's, no backend twice, and weights that add up within a `u32`. The reason is one
/// line. Sources check their input with it before they apply any of it.
pub fn check_declared(d: &DeclaredService) -> Result<(), String> {
    check_service(&d.key, d.mode, d.snat_addr)?;
    if d.key.vip.is_ipv6() && !d.source_ranges.is_empty() {
        return Err(format!(
            "invalid source ranges for VIP {}: source ranges are IPv4 prefixes in this release, \
             and an IPv6 service takes none",
            d.key.vip
        ));
    }
    if let Some(r) = d
        .source_ranges
        .iter()
        .find(|r| r.addr.is_ipv4() != d.key.vip.is_ipv4())
    {
        return Err(format!(
            "invalid source range {r}: it is {} but VIP {} is {}",
            family(r.addr),
            d.key.vip,
            family(d.key.vip)
        ));
    }
    let mut backends: Vec<&datapath_api::DeclaredBackend> = d.backends.iter().collect();
    backends.sort_by_key(|b| (b.addr, b.port));
    for pair in backends.windows(2) {
        if (pair[0].addr, pair[0].port) == (pair[1].addr, pair[1].port) {
            let dup = BackendKey {
                addr: pair[0].addr,
                port: pair[0].port,
            };
            return Err(format!("backend {dup} is listed twice"));
        }
    }
    let mut total: u64 = 0;
    for b in &backends {
        let bkey = BackendKey {
            addr: b.addr,
            port: b.port,
        };
        check_backend(&d.key, &bkey, b.weight)?;
        total += u64::from(b.weight);
    }
    if total > u64::from(u32::MAX) {
        return Err(format!(
            "the weights add up to {total}, above the maximum {}",
            u32::MAX
        ));
    }
    Ok(())
}

/// The id pools of one batch of [`Store::replace_source`], built at the first need from the
/// state as it is then plus the ids the batch freed before (which must not be handed out
/// again within the batch), and the batch's generation counter.
#[derive(Default)]
struct Ids {
    pools: Option<(IdPool, IdPool, u32)>,
    freed_services: Vec<u32>,
    freed_backends: Vec<u32>,
}

impl Ids {
    /// Notes what replacing `old` by `new` (or removing it) freed.
    fn freed(&mut self, old: &ServiceSpec, new: Option<&ServiceSpec>) {
        let kept: BTreeSet<u32> = new
            .map(|n| n.backends.iter().map(|b| b.id).collect())
            .unwrap_or_default();
        if new.is_none() {
            self.freed_services.push(old.id);
        }
        self.freed_backends.extend(
            old.backends
                .iter()
                .map(|b| b.id)
                .filter(|id| !kept.contains(id)),
        );
    }

    fn pools(
        &mut self,
        state: &DesiredState,
        limits: Limits,
    ) -> (&mut IdPool, &mut IdPool, &mut u32) {
        let pools = self.pools.get_or_insert_with(|| {
            let mut services: BTreeSet<u32> = state.services.values().map(|s| s.id).collect();
            services.extend(self.freed_services.iter().copied());
            let mut backends: BTreeSet<u32> = state
                .services
                .values()
                .flat_map(|s| s.backends.iter().map(|b| b.id))
                .collect();
            backends.extend(self.freed_backends.iter().copied());
            (
                IdPool::new(services, limits.max_services),
                IdPool::new(backends, limits.max_backends),
                state.next_generation,
            )
        });
        (&mut pools.0, &mut pools.1, &mut pools.2)
    }
}

/// When a source's batch reaches the state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Before the call returns; a failed write undoes the batch.
    Now,
    /// At the next [`Store::flush`] (or the next change through the API): the batch is live
    /// at once and its write is coalesced with the next ones. For a source that can give its
    /// state again (Kubernetes relists after a restart), so a crash in between loses nothing.
    Deferred,
}

/// Ids in use during one batch of [`Store::replace_source`]: it only takes ids, never frees
/// them, so the lowest free id only grows and a batch of 100,000 backends is one walk.
struct IdPool {
    used: BTreeSet<u32>,
    limit: u32,
    /// No id below it is free.
    floor: u32,
    free: usize,
}

impl IdPool {
    fn new(used: BTreeSet<u32>, limit: u32) -> Self {
        let in_range = used.range(..limit).count();
        Self {
            used,
            limit,
            floor: 0,
            free: (limit as usize).saturating_sub(in_range),
        }
    }

    fn free(&self) -> usize {
        self.free
    }

    /// The lowest free id, now used.
    fn take(&mut self) -> Option<u32> {
        while self.floor < self.limit && self.used.contains(&self.floor) {
            self.floor += 1;
        }
        if self.floor >= self.limit {
            return None;
        }
        self.used.insert(self.floor);
        self.free -= 1;
        Some(self.floor)
    }
}

/// Undoes one applied change of a batch.
fn undo<P: ServicePlane + ?Sized>(plane: &mut P, change: &Change) -> Result<()> {
    match change {
        Change::Apply { old: Some(old), .. } => plane.apply_service(old),
        Change::Apply { new, old: None } => plane.remove_service(new),
        Change::Remove(old) => plane.apply_service(old),
    }
}

/// A service a source declared that was not applied, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub key: ServiceKey,
    pub owner: String,
    pub reason: String,
}

/// What [`Store::replace_source`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceReport {
    pub created: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub rejected: Vec<Rejected>,
}

/// Why `addr` cannot be a VIP, backend or source address, if it cannot.
fn unusable(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) if a.is_unspecified() => Some("unspecified"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
        IpAddr::V4(a) if a.is_multicast() => Some("multicast"),
        IpAddr::V6(a) if a.is_unspecified() => Some("unspecified"),
        IpAddr::V6(a) if a.is_multicast() => Some("multicast"),
        _ => None,
    }
}

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// The rules for a service's own fields; the reason is one line.
fn check_service(
    key: &ServiceKey,
    mode: ForwardingMode,
    snat_addr: Option<IpAddr>,
) -> Result<(), String> {
    if let Some(why) = unusable(key.vip) {
        return Err(format!("invalid VIP {}: {why} address", key.vip));
    }
    if key.port == 0 {
        return Err(format!("invalid service {key}: port must not be 0"));
    }
    if let Some(snat) = snat_addr {
        if mode == ForwardingMode::Dsr {
            return Err(format!(
                "invalid SNAT address {snat}: only full-nat services rewrite the source, dsr services keep the client's"
            ));
        }
        if let Some(why) = unusable(snat) {
            return Err(format!("invalid SNAT address {snat}: {why} address"));
        }
        if snat.is_ipv4() != key.vip.is_ipv4() {
            return Err(format!(
                "invalid SNAT address {snat}: it is {} but VIP {} is {}",
                family(snat),
                key.vip,
                family(key.vip)
            ));
        }
    }
    Ok(())
}

/// The rules for a backend of service `service`; the reason is one line.
fn check_backend(service: &ServiceKey, backend: &BackendKey, weight: u32) -> Result<(), String> {
    if let Some(why) = unusable(backend.addr) {
        return Err(format!(
            "invalid backend address {}: {why} address",
            backend.addr
        ));
    }
    if backend.addr.is_ipv4() != service.vip.is_ipv4() {
        return Err(format!(
            "invalid backend address {}: it is {} but VIP {} is {}",
            backend.addr,
            family(backend.addr),
            service.vip,
            family(service.vip)
        ));
    }
    if backend.addr == service.vip {
        return Err(format!(
            "invalid backend address {}: it is the service's own VIP",
            backend.addr
        ));
    }
    if backend.port == 0 {
        return Err(format!("invalid backend {backend}: port must not be 0"));
    }
    if weight == 0 {
        return Err(format!(
            "invalid weight 0 for backend {backend}: weights start at 1"
        ));
    }
    Ok(())
}

/// Maglev shares a table out by weight over the service's total, which must fit in a `u32`;
/// `service` is checked as if it had one more backend of weight `extra`.
fn check_total_weight(service: &ServiceSpec, extra: u32) -> Result<(), String> {
    let total: u64 = service
        .backends
        .iter()
        .map(|b| u64::from(b.weight))
        .sum::<u64>()
        + u64::from(extra);
    if total > u64::from(u32::MAX) {
        return Err(format!(
            "the weights of service {} would add up to {total}, above the maximum {}",
            service.key,
            u32::MAX
        ));
    }
    Ok(())
}

/// Parses and checks a state file; the error is the reason it is unusable.
fn decode(bytes: &[u8], limits: Limits) -> Result<DesiredState, String> {
    let probe: VersionProbe =
        serde_json::from_slice(bytes).map_err(|e| format!("not a state file: {e}"))?;
    match probe.version {
        Some(STATE_FILE_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "format version {v} is not supported (this datapathd reads version {STATE_FILE_VERSION})"
            ));
        }
        None => return Err("not a state file: no \"version\" field".into()),
    }
    let file: StateFile =
        serde_json::from_slice(bytes).map_err(|e| format!("not a state file: {e}"))?;
    if file.services.len() > limits.max_services as usize {
        return Err(format!(
            "it holds {} services but max_services is {}",
            file.services.len(),
            limits.max_services
        ));
    }
    let mut state = DesiredState {
        services: Default::default(),
        next_generation: file.next_generation,
    };
    let mut service_ids = BTreeSet::new();
    let mut backend_ids = BTreeSet::new();
    let mut max_generation = None;
    for mut spec in file.services {
        let key = spec.key;
        check_service(&key, spec.mode, spec.snat_addr)
            .map_err(|e| format!("service {key}: {e}"))?;
        if spec.id >= limits.max_services {
            return Err(format!(
                "service {key} has id {} but max_services is {}",
                spec.id, limits.max_services
            ));
        }
        if !service_ids.insert(spec.id) {
            return Err(format!("service {key} reuses service id {}", spec.id));
        }
        spec.backends.sort_by_key(|b| b.key());
        for (i, b) in spec.backends.iter().enumerate() {
            let bkey = b.key();
            if i > 0 && spec.backends[i - 1].key() == bkey {
                return Err(format!("service {key} lists backend {bkey} twice"));
            }
            check_backend(&key, &bkey, b.weight).map_err(|e| format!("service {key}: {e}"))?;
            if b.id >= limits.max_backends {
                return Err(format!(
                    "backend {bkey} of service {key} has id {} but max_backends is {}",
                    b.id, limits.max_backends
                ));
            }
            if !backend_ids.insert(b.id) {
                return Err(format!(
                    "backend {bkey} of service {key} reuses backend id {}",
                    b.id
                ));
            }
            max_generation = max_generation.max(Some(b.generation));
        }
        check_total_weight(&spec, 0).map_err(|e| format!("service {key}: {e}"))?;
        if state.services.insert(key, spec).is_some() {
            return Err(format!("service {key} is listed twice"));
        }
    }
    // A file edited by hand (or from before generations were saved) may hold a counter behind
    // the generations it hands out; moving it past them keeps generations from repeating.
    if let Some(g) = max_generation
        && state.next_generation <= g
    {
        state.next_generation = g.wrapping_add(1);
    }
    Ok(state)
}

/// A test double for the BPF maps: records what the store programs and fails on request, so
/// the store's transactions can be tested without BPF. The namespace tests exercise the real
/// maps.
#[cfg(test)]
pub(crate) mod testing {
    use std::{
        collections::{BTreeMap, BTreeSet},
        sync::mpsc,
    };

    use datapath_api::{BackendState, ServiceKey, ServiceSpec, StatsSnapshot};

    use super::ServicePlane;
    use crate::error::{Error, Result};

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Call {
        Apply(ServiceSpec),
        Remove(ServiceSpec),
    }

    #[derive(Debug, Default)]
    pub struct MemPlane {
        /// What the "maps" hold now.
        pub live: BTreeMap<ServiceKey, ServiceSpec>,
        /// Every call, failed ones included, in order.
        pub calls: Vec<Call>,
        /// Indexes (into `calls`) of the calls that must fail.
        pub fail_calls: BTreeSet<usize>,
        /// Fail every call.
        pub fail_all: bool,
        /// What `stats` answers.
        pub stats: StatsSnapshot,
        /// If set, `stats` reports on the first channel that it was called and waits on the
        /// second before answering (to hold a request in flight).
        #[allow(clippy::type_complexity)]
        pub stats_gate: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
    }

    impl MemPlane {
        fn fails(&mut self, call: Call) -> Result<()> {
            let n = self.calls.len();
            self.calls.push(call);
            if self.fail_all || self.fail_calls.contains(&n) {
                return Err(Error::Map {
                    context: format!("injected failure of dataplane call {n}"),
                    source: Box::new(aya::maps::MapError::KeyNotFound),
                });
            }
            Ok(())
        }

        /// Stands in for the Maglev table: each active backend owns `weight` entries.
        pub fn entries(&self, service_id: u32) -> BTreeMap<u32, u32> {
            self.live
                .values()
                .filter(|s| s.id == service_id)
                .flat_map(|s| &s.backends)
                .filter(|b| b.state == BackendState::Active)
                .map(|b| (b.id, b.weight))
                .collect()
        }
    }

    impl ServicePlane for MemPlane {
        fn apply_service(&mut self, s: &ServiceSpec) -> Result<()> {
            self.fails(Call::Apply(s.clone()))?;
            self.live.insert(s.key, s.clone());
            Ok(())
        }

        fn remove_service(&mut self, s: &ServiceSpec) -> Result<()> {
            self.fails(Call::Remove(s.clone()))?;
            self.live.remove(&s.key);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
