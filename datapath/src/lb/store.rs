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

/// The desired state, its file, and the rules every change must follow.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    limits: Limits,
    state: DesiredState,
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
        };
        store.persist(&store.state)?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
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
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use datapath_api::{BackendState, Protocol};

    use super::{testing::*, *};
    use crate::persist::tmp_path;

    const LIMITS: Limits = Limits {
        max_services: 3,
        max_backends: 4,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn svc(vip: &str, port: u16) -> CreateService {
        CreateService {
            vip: ip(vip),
            port,
            proto: Protocol::Tcp,
            mode: ForwardingMode::FullNat,
            snat_addr: None,
        }
    }

    fn key_of(req: &CreateService) -> ServiceKey {
        ServiceKey {
            vip: req.vip,
            port: req.port,
            proto: req.proto,
        }
    }

    fn be(addr: &str, port: u16) -> AddBackend {
        AddBackend {
            addr: ip(addr),
            port,
            weight: 1,
            state: BackendState::Active,
        }
    }

    fn bkey(addr: &str, port: u16) -> BackendKey {
        BackendKey {
            addr: ip(addr),
            port,
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        store: Store,
        plane: MemPlane,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = Store::open(&path, LIMITS).unwrap();
        Fixture {
            _dir: dir,
            path,
            store,
            plane: MemPlane::default(),
        }
    }

    fn invalid(r: Result<ServiceSpec>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn missing_file_is_empty_state_and_gets_written() {
        let f = fixture();
        assert!(f.store.state().services.is_empty());
        let text = fs::read_to_string(&f.path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["services"], serde_json::json!([]));
    }

    #[test]
    fn open_creates_missing_parent_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/state.json");
        Store::open(&path, LIMITS).unwrap();
        assert!(path.exists());
    }

    #[test]
    fn service_ids_are_lowest_free_and_capacity_is_enforced() {
        let mut f = fixture();
        let ids: Vec<u32> = ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
            .iter()
            .map(|v| {
                f.store
                    .create_service(&mut f.plane, &svc(v, 80))
                    .unwrap()
                    .id
            })
            .collect();
        assert_eq!(ids, [0, 1, 2]);
        match f.store.create_service(&mut f.plane, &svc("198.18.0.4", 80)) {
            Err(Error::CapacityExhausted(m)) => assert!(m.contains("3 service slots"), "{m}"),
            other => panic!("{other:?}"),
        }
        f.store
            .delete_service(&mut f.plane, &key_of(&svc("198.18.0.2", 80)))
            .unwrap();
        let again = f
            .store
            .create_service(&mut f.plane, &svc("198.18.0.4", 80))
            .unwrap();
        assert_eq!(again.id, 1, "the freed id is reused first");
    }

    #[test]
    fn backend_ids_are_shared_generations_grow_and_backends_stay_sorted() {
        let mut f = fixture();
        let a = key_of(&svc("198.18.0.1", 80));
        let b = key_of(&svc("198.18.0.2", 80));
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.1", 80))
            .unwrap();
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.2", 80))
            .unwrap();
        f.store
            .add_backend(&mut f.plane, &a, &be("198.18.1.9", 80))
            .unwrap();
        f.store
            .add_backend(&mut f.plane, &b, &be("198.18.1.1", 80))
            .unwrap();
        let s = f
            .store
            .add_backend(&mut f.plane, &a, &be("198.18.1.2", 80))
            .unwrap();
        let got: Vec<(String, u32, u32)> = s
            .backends
            .iter()
            .map(|b| (b.key().to_string(), b.id, b.generation))
            .collect();
        assert_eq!(
            got,
            [
                ("198.18.1.2:80".to_string(), 2, 2),
                ("198.18.1.9:80".to_string(), 0, 0)
            ]
        );
        // Freeing slot 0 and reusing it hands out a new generation.
        f.store
            .remove_backend(&mut f.plane, &a, &bkey("198.18.1.9", 80))
            .unwrap();
        let s = f
            .store
            .add_backend(&mut f.plane, &b, &be("198.18.1.3", 80))
            .unwrap();
        let reused = s.backends.iter().find(|b| b.id == 0).unwrap();
        assert_eq!(reused.generation, 3);
        assert_eq!(f.store.state().next_generation, 4);
        // The dataplane saw the same specs the store holds.
        assert_eq!(f.plane.live, f.store.state().services);
    }

    #[test]
    fn backend_capacity_is_across_services() {
        let mut f = fixture();
        let a = key_of(&svc("198.18.0.1", 80));
        let b = key_of(&svc("198.18.0.2", 80));
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.1", 80))
            .unwrap();
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.2", 80))
            .unwrap();
        for p in 1..=2 {
            f.store
                .add_backend(&mut f.plane, &a, &be("198.18.1.1", p))
                .unwrap();
            f.store
                .add_backend(&mut f.plane, &b, &be("198.18.1.1", p))
                .unwrap();
        }
        match f.store.add_backend(&mut f.plane, &a, &be("198.18.1.1", 3)) {
            Err(Error::CapacityExhausted(m)) => assert!(m.contains("4 backend slots"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn service_validation() {
        let mut f = fixture();
        let mut p = MemPlane::default();
        let m = invalid(f.store.create_service(&mut p, &svc("198.18.0.1", 0)));
        assert!(m.contains("port must not be 0"), "{m}");
        for (vip, why) in [
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("::", "unspecified"),
        ] {
            let m = invalid(f.store.create_service(&mut p, &svc(vip, 80)));
            assert!(m.contains(why), "{vip}: {m}");
        }
        let m = invalid(f.store.create_service(&mut p, &svc("2001:db8::1", 80)));
        assert!(m.contains("IPv6 VIPs are not supported yet"), "{m}");
        let mut req = svc("198.18.0.1", 80);
        req.snat_addr = Some(ip("2001:db8::1"));
        let m = invalid(f.store.create_service(&mut p, &req));
        assert!(m.contains("is IPv6 but VIP 198.18.0.1 is IPv4"), "{m}");
        req.snat_addr = Some(ip("198.18.0.100"));
        req.mode = ForwardingMode::Dsr;
        let m = invalid(f.store.create_service(&mut p, &req));
        assert!(m.contains("only full-nat"), "{m}");
        assert!(
            p.calls.is_empty(),
            "invalid requests never reach the dataplane"
        );

        f.store
            .create_service(&mut p, &svc("198.18.0.1", 80))
            .unwrap();
        match f.store.create_service(&mut p, &svc("198.18.0.1", 80)) {
            Err(e @ Error::AlreadyExists(_)) => {
                assert_eq!(e.to_string(), "service tcp/198.18.0.1:80 already exists")
            }
            other => panic!("{other:?}"),
        }
        let mut udp = svc("198.18.0.1", 80);
        udp.proto = Protocol::Udp;
        f.store.create_service(&mut p, &udp).unwrap();
        match f
            .store
            .delete_service(&mut p, &key_of(&svc("198.18.0.9", 80)))
        {
            Err(e @ Error::NotFound(_)) => {
                assert_eq!(e.to_string(), "service tcp/198.18.0.9:80 not found")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backend_validation() {
        let mut f = fixture();
        let k = key_of(&svc("198.18.0.1", 80));
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.1", 80))
            .unwrap();
        let calls = f.plane.calls.len();
        let p = &mut f.plane;
        let m = invalid(f.store.add_backend(p, &k, &be("198.18.1.1", 0)));
        assert!(m.contains("port must not be 0"), "{m}");
        let mut zero = be("198.18.1.1", 80);
        zero.weight = 0;
        let m = invalid(f.store.add_backend(p, &k, &zero));
        assert!(m.contains("weight 0"), "{m}");
        let m = invalid(f.store.add_backend(p, &k, &be("2001:db8::2", 80)));
        assert!(m.contains("is IPv6 but VIP 198.18.0.1 is IPv4"), "{m}");
        let m = invalid(f.store.add_backend(p, &k, &be("224.1.1.1", 80)));
        assert!(m.contains("multicast"), "{m}");
        let m = invalid(f.store.add_backend(p, &k, &be("198.18.0.1", 8080)));
        assert!(m.contains("own VIP"), "{m}");
        assert_eq!(f.plane.calls.len(), calls);

        f.store
            .add_backend(&mut f.plane, &k, &be("198.18.1.1", 80))
            .unwrap();
        match f.store.add_backend(&mut f.plane, &k, &be("198.18.1.1", 80)) {
            Err(e @ Error::AlreadyExists(_)) => assert_eq!(
                e.to_string(),
                "backend 198.18.1.1:80 of service tcp/198.18.0.1:80 already exists"
            ),
            other => panic!("{other:?}"),
        }
        match f
            .store
            .remove_backend(&mut f.plane, &k, &bkey("198.18.1.2", 80))
        {
            Err(e @ Error::NotFound(_)) => assert_eq!(
                e.to_string(),
                "backend 198.18.1.2:80 of service tcp/198.18.0.1:80 not found"
            ),
            other => panic!("{other:?}"),
        }
        let mut heavy = be("198.18.1.2", 80);
        heavy.weight = u32::MAX;
        let m = invalid(f.store.add_backend(&mut f.plane, &k, &heavy));
        assert!(m.contains("would add up to 4294967296"), "{m}");
        let max = UpdateBackend {
            weight: Some(u32::MAX),
            state: None,
        };
        f.store
            .update_backend(&mut f.plane, &k, &bkey("198.18.1.1", 80), &max)
            .unwrap();
        let zero = UpdateBackend {
            weight: Some(0),
            state: None,
        };
        let m = invalid(
            f.store
                .update_backend(&mut f.plane, &k, &bkey("198.18.1.1", 80), &zero),
        );
        assert!(m.contains("weight 0"), "{m}");
    }

    #[test]
    fn update_changes_weight_and_state_but_keeps_id_and_generation() {
        let mut f = fixture();
        let k = key_of(&svc("198.18.0.1", 80));
        let b = bkey("198.18.1.1", 80);
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.1", 80))
            .unwrap();
        let before = f
            .store
            .add_backend(&mut f.plane, &k, &be("198.18.1.1", 80))
            .unwrap()
            .backends[0]
            .clone();
        let drain = UpdateBackend {
            weight: Some(5),
            state: Some(BackendState::Draining),
        };
        let after = f
            .store
            .update_backend(&mut f.plane, &k, &b, &drain)
            .unwrap()
            .backends[0]
            .clone();
        assert_eq!((after.weight, after.state), (5, BackendState::Draining));
        assert_eq!((after.id, after.generation), (before.id, before.generation));
        // The same change again is a no-op that does not touch the dataplane.
        let calls = f.plane.calls.len();
        f.store
            .update_backend(&mut f.plane, &k, &b, &drain)
            .unwrap();
        assert_eq!(f.plane.calls.len(), calls);
    }

    #[test]
    fn dataplane_failure_changes_nothing() {
        let mut f = fixture();
        let k = key_of(&svc("198.18.0.1", 80));
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.1", 80))
            .unwrap();
        let state = f.store.state().clone();
        let file = fs::read(&f.path).unwrap();
        f.plane.fail_all = true;
        let results = [
            f.store
                .create_service(&mut f.plane, &svc("198.18.0.2", 80))
                .err(),
            f.store
                .add_backend(&mut f.plane, &k, &be("198.18.1.1", 80))
                .err(),
            f.store.delete_service(&mut f.plane, &k).err(),
        ];
        for r in results {
            assert!(matches!(r, Some(Error::Map { .. })), "{r:?}");
        }
        assert_eq!(f.store.state(), &state);
        assert_eq!(fs::read(&f.path).unwrap(), file);
        assert_eq!(f.store.state().next_generation, 0, "no generation spent");
    }

    #[test]
    fn persist_failure_rolls_the_dataplane_back() {
        let mut f = fixture();
        let k = key_of(&svc("198.18.0.1", 80));
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.1", 80))
            .unwrap();
        f.store
            .add_backend(&mut f.plane, &k, &be("198.18.1.1", 80))
            .unwrap();
        let state = f.store.state().clone();
        let live = f.plane.live.clone();
        // Root ignores permission bits, so the way to make saving fail is to take the
        // directory away.
        fs::remove_dir_all(f.path.parent().unwrap()).unwrap();

        let n = f.plane.calls.len();
        let e = f
            .store
            .add_backend(&mut f.plane, &k, &be("198.18.1.2", 80))
            .unwrap_err();
        assert!(matches!(e, Error::Persistence { .. }), "{e:?}");
        assert!(e.to_string().starts_with("state file "), "{e}");
        // Applied, then undone with the old spec.
        assert_eq!(f.plane.calls.len(), n + 2);
        assert_eq!(
            f.plane.calls[n + 1],
            Call::Apply(state.services[&k].clone())
        );

        let e = f
            .store
            .create_service(&mut f.plane, &svc("198.18.0.2", 80))
            .unwrap_err();
        assert!(matches!(e, Error::Persistence { .. }), "{e:?}");
        assert!(matches!(f.plane.calls.last(), Some(Call::Remove(_))));

        let e = f.store.delete_service(&mut f.plane, &k).unwrap_err();
        assert!(matches!(e, Error::Persistence { .. }), "{e:?}");
        assert!(matches!(f.plane.calls.last(), Some(Call::Apply(_))));

        assert_eq!(f.store.state(), &state);
        assert_eq!(f.plane.live, live);
    }

    #[test]
    fn failed_rollback_still_reports_persistence_and_keeps_memory() {
        let mut f = fixture();
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.1", 80))
            .unwrap();
        let state = f.store.state().clone();
        fs::remove_dir_all(f.path.parent().unwrap()).unwrap();
        let n = f.plane.calls.len();
        f.plane.fail_calls.insert(n + 1);
        let e = f
            .store
            .create_service(&mut f.plane, &svc("198.18.0.2", 80))
            .unwrap_err();
        assert!(matches!(e, Error::Persistence { .. }), "{e:?}");
        assert_eq!(f.store.state(), &state);
    }

    #[test]
    fn persist_is_atomic_and_reload_round_trips() {
        let mut f = fixture();
        let k = key_of(&svc("198.18.0.1", 80));
        let mut req = svc("198.18.0.1", 80);
        req.snat_addr = Some(ip("198.18.0.100"));
        f.store.create_service(&mut f.plane, &req).unwrap();
        f.store
            .create_service(&mut f.plane, &svc("198.18.0.2", 53))
            .unwrap();
        f.store
            .add_backend(&mut f.plane, &k, &be("198.18.1.1", 80))
            .unwrap();
        let mut heavy = be("198.18.1.2", 80);
        heavy.weight = 7;
        heavy.state = BackendState::Draining;
        f.store.add_backend(&mut f.plane, &k, &heavy).unwrap();
        assert!(
            !tmp_path(&f.path).exists(),
            "the temporary file is renamed away"
        );
        let reopened = Store::open(&f.path, LIMITS).unwrap();
        assert_eq!(reopened.state(), f.store.state());
        assert_eq!(reopened.state().next_generation, 2);
    }

    #[test]
    fn corrupt_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let backend = |id: u32, port: u16| {
            serde_json::json!({"addr": "198.18.1.1", "port": port, "weight": 1,
                               "state": "active", "id": id, "generation": 0})
        };
        let service = |vip: &str, id: u32, backends: Vec<serde_json::Value>| {
            serde_json::json!({"key": {"vip": vip, "port": 80, "proto": "tcp"},
                               "mode": "full-nat", "id": id, "backends": backends})
        };
        let cases = [
            ("{not json".to_string(), "not a state file"),
            ("{}".to_string(), "no \"version\""),
            (
                r#"{"version": 2, "services": []}"#.to_string(),
                "version 2 is not supported",
            ),
            (
                r#"{"version": 1, "services": [], "extra": 1}"#.to_string(),
                "unknown field",
            ),
            (
                serde_json::json!({"version": 1, "services": [service("198.18.0.1", 3, vec![])]})
                    .to_string(),
                "id 3 but max_services is 3",
            ),
            (
                serde_json::json!({"version": 1, "services": [
                    service("198.18.0.1", 0, vec![]), service("198.18.0.2", 0, vec![])]})
                .to_string(),
                "reuses service id 0",
            ),
            (
                serde_json::json!({"version": 1, "services": [
                    service("198.18.0.1", 0, vec![backend(1, 80)]),
                    service("198.18.0.2", 1, vec![backend(1, 81)])]})
                .to_string(),
                "reuses backend id 1",
            ),
            (
                serde_json::json!({"version": 1, "services": [
                    service("198.18.0.1", 0, vec![backend(1, 80), backend(2, 80)])]})
                .to_string(),
                "twice",
            ),
            (
                serde_json::json!({"version": 1, "services": [
                    service("198.18.0.1", 0, vec![backend(9, 80)])]})
                .to_string(),
                "max_backends is 4",
            ),
            (
                serde_json::json!({"version": 1, "services": [
                    service("0.0.0.0", 0, vec![])]})
                .to_string(),
                "unspecified",
            ),
        ];
        for (text, want) in cases {
            fs::write(&path, &text).unwrap();
            match Store::open(&path, LIMITS) {
                Err(e @ Error::CorruptState { .. }) => {
                    let m = e.to_string();
                    assert!(m.contains(want), "{text}: {m}");
                    assert!(!m.contains('\n'), "one line: {m}");
                }
                other => panic!("{text}: expected CorruptState, got {other:?}"),
            }
            assert_eq!(
                fs::read_to_string(&path).unwrap(),
                text,
                "a refused file is left untouched"
            );
        }
    }

    #[test]
    fn generation_counter_is_moved_past_saved_generations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let text = serde_json::json!({"version": 1, "services": [
            {"key": {"vip": "198.18.0.1", "port": 80, "proto": "tcp"}, "mode": "dsr", "id": 0,
             "backends": [{"addr": "198.18.1.1", "port": 80, "weight": 1, "state": "active",
                           "id": 0, "generation": 41}]}]});
        fs::write(&path, text.to_string()).unwrap();
        let store = Store::open(&path, LIMITS).unwrap();
        assert_eq!(store.state().next_generation, 42);
        let vip = Ipv4Addr::new(198, 18, 0, 1);
        assert_eq!(
            store
                .service(&ServiceKey {
                    vip: vip.into(),
                    port: 80,
                    proto: Protocol::Tcp
                })
                .unwrap()
                .mode,
            ForwardingMode::Dsr
        );
    }
}
