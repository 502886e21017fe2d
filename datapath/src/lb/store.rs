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
    AddBackend, BackendKey, BackendSpec, CreateService, DesiredState, ForwardingMode, ServiceKey,
    ServiceSpec, UpdateBackend,
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
        };
        store.persist(&store.state)?;
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
        if let Err(e) = self.persist(&next) {
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
        self.state = next;
        if let Some(observer) = &self.observer {
            observer(&self.state);
        }
        Ok(())
    }

    /// Writes `state` to the state file atomically: a temporary file in the same directory,
    /// flushed to disk, renamed over the old file, and the directory flushed.
    fn persist(&self, state: &DesiredState) -> Result<()> {
        let persistence = |source| Error::Persistence {
            path: self.path.clone(),
            source,
        };
        let file = StateFile {
            version: STATE_FILE_VERSION,
            next_generation: state.next_generation,
            services: state.services.values().cloned().collect(),
        };
        let mut json = serde_json::to_vec_pretty(&file).map_err(|e| persistence(e.into()))?;
        json.push(b'\n');
        crate::persist::write_atomic(&self.path, &json)?;
        Ok(())
    }
}

use crate::persist::parent_dir;

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
    if key.vip.is_ipv6() {
        return Err(format!(
            "invalid VIP {}: IPv6 VIPs are not supported yet (the XDP program handles IPv4 only in this release)",
            key.vip
        ));
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
