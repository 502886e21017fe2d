//! The `exec` controller: processes followed through the kernel's exec, fork and exit
//! tracepoints (`bpf-trace`, BTF tracepoints: this kernel has no kprobes), kept in a cache
//! keyed by (pid, start time), with their program, arguments, uid, cgroup and pod.
//!
//! - Kernel struct offsets come from the kernel's BTF (`exec.btf_path`, read with `kbtf`);
//!   a field or tracepoint the kernel lacks keeps the module off with that reason, before any
//!   program is loaded, and the rest of the daemon runs.
//! - Processes that existed before the daemon started are found by a walk of `/proc`.
//! - Each event goes on the bus topic [`EVENTS`].
//! - The section needs a restart to change.
pub mod cache;
pub mod plane;

use std::{
    collections::HashMap,
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use bpf_common::trace::{EVENT_EXEC, EVENT_EXIT, EVENT_FORK, ProcessEvent};
use datapath_api::{ProcQuery, ProcStatus, ProcessView};
use tracing::{info, warn};

use crate::{
    Error, Result,
    bus::{Bus, Topic},
    config::{ExecSettings, Settings},
    controller::{Cancel, Controller, Health, NoChange, Prepared, Requirements, RunFuture},
    features::Capability,
};
use cache::{Event, Process, ProcessCache};
use plane::TracePlane;

pub const NAME: &str = "exec";
/// Topic: every process event, decoded (`Arc<cache::Event>`).
pub const EVENTS: &str = "exec.events";
const EVENT_BUFFER: usize = 4096;
const READ_TICK: Duration = Duration::from_millis(100);
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Cgroup directories looked through to name a cgroup id (a bound on one search).
const CGROUP_SEARCH_MAX: usize = 20_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    settings: ExecSettings,
    plane: Option<TracePlane>,
    ring: Option<std::os::fd::OwnedFd>,
    health: Health,
    found_at_start: u64,
}

pub struct ExecController {
    inner: Mutex<Inner>,
    cache: Mutex<ProcessCache>,
    /// Cgroup id -> its path under the cgroup2 root (`None`: looked for, not found).
    cgroups: Mutex<HashMap<u64, Option<String>>>,
    events: Arc<Topic<Arc<Event>>>,
    ticks: u64,
}

/// A NUL-padded C string.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The path (under `root`) of the cgroup directory whose inode is `id`, searched breadth
/// first and bounded.
fn cgroup_path(root: &std::path::Path, id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    let mut seen = 0;
    while let Some(dir) = queue.pop_front() {
        seen += 1;
        if seen > CGROUP_SEARCH_MAX {
            return None;
        }
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            let rel = dir.strip_prefix(root).ok()?;
            return Some(format!("/{}", rel.display()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            queue.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

/// A ring record of the tracer, decoded: `ticks` per second for the start times, `cgroup_of`
/// to name a cgroup id.
pub fn decode(
    bytes: &[u8],
    ticks: u64,
    cgroup_of: &dyn Fn(u64) -> Option<String>,
) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<ProcessEvent>() {
        return None;
    }
    // SAFETY: a POD of the ABI, read unaligned from a record at least its size.
    let e: ProcessEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let ticks = |ns| cache::ticks_of_ns(ns, ticks);
    let process = || {
        let cgroup = cgroup_of(e.cgroup_id);
        let args_len = usize::from(e.args_len).min(e.args.len());
        let args = e.args[..args_len]
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let name_len = usize::from(e.filename_len).min(e.filename.len());
        Process {
            pid: e.pid,
            start_ticks: ticks(e.start_ns),
            ppid: e.ppid,
            parent_start_ticks: ticks(e.parent_start_ns),
            exe: String::from_utf8_lossy(&e.filename[..name_len]).into_owned(),
            args,
            comm: c_string(&e.comm),
            uid: e.uid,
            cgroup_id: e.cgroup_id,
            workload: cgroup
                .as_deref()
                .map(cache::workload_of)
                .unwrap_or_default(),
            cgroup,
            exited: None,
            seen_ns: e.ts_ns,
            from_proc: false,
        }
    };
    match e.kind {
        EVENT_EXEC => Some(Event::Exec { process: process() }),
        EVENT_FORK => Some(Event::Fork { process: process() }),
        EVENT_EXIT => Some(Event::Exit {
            pid: e.pid,
            start_ticks: ticks(e.start_ns),
            ts_ns: e.ts_ns,
            code: e.exit_code,
        }),
        _ => None,
    }
}

impl ExecController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        let s = &settings.exec;
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                settings: s.clone(),
                plane: None,
                ring: None,
                health: Health::default(),
                found_at_start: 0,
            }),
            cache: Mutex::new(ProcessCache::new(
                s.max_processes,
                s.exit_grace.as_nanos() as u64,
            )),
            cgroups: Mutex::new(HashMap::new()),
            events: bus.topic(EVENTS, EVENT_BUFFER)?,
            ticks: cache::clock_ticks(),
        }))
    }

    fn cgroup_of(&self, id: u64) -> Option<String> {
        if let Some(known) = lock(&self.cgroups).get(&id) {
            return known.clone();
        }
        let root = crate::socklb::cgroup2_root().ok()?;
        let found = cgroup_path(&root, id);
        lock(&self.cgroups).insert(id, found.clone());
        found
    }

    fn record(&self, bytes: &[u8], out: &mut Vec<Arc<Event>>) {
        if let Some(event) = decode(bytes, self.ticks, &|id| self.cgroup_of(id)) {
            lock(&self.cache).apply(event.clone());
            out.push(Arc::new(event));
        }
    }

    fn load(&self, s: &ExecSettings) -> std::result::Result<(), String> {
        let bytes = std::fs::read(&s.btf_path)
            .map_err(|e| format!("cannot read the kernel's BTF {}: {e}", s.btf_path.display()))?;
        let btf = kbtf::Btf::parse(&bytes).map_err(|e| {
            format!(
                "cannot parse the kernel's BTF {}: {e}",
                s.btf_path.display()
            )
        })?;
        let offsets = plane::offsets(&btf)?;
        let (plane, ring) =
            TracePlane::start(s.event_rate, &offsets).map_err(|e| format!("cannot load: {e}"))?;
        let fd = ring
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot keep the ring buffer: {e}"))?;
        let mut inner = lock(&self.inner);
        inner.plane = Some(plane);
        inner.ring = Some(fd);
        Ok(())
    }

    fn open_ring(&self) -> Result<Option<plane::Ring>> {
        let inner = lock(&self.inner);
        inner
            .ring
            .as_ref()
            .map(|fd| crate::bpf::ringbuf::reopen(fd, "TRACE_EVENTS"))
            .transpose()
    }

    fn view(p: &Process) -> ProcessView {
        ProcessView {
            pid: p.pid,
            start_ticks: p.start_ticks,
            ppid: p.ppid,
            exe: p.exe.clone(),
            args: p.args.clone(),
            comm: p.comm.clone(),
            uid: p.uid,
            cgroup_id: p.cgroup_id,
            cgroup: p.cgroup.clone(),
            pod_uid: p.workload.pod_uid.clone(),
            container_id: p.workload.container_id.clone(),
            exit_code: p.exited.map(|(_, c)| c),
            exited: p.exited.is_some(),
            from_proc: p.from_proc,
        }
    }

    /// `GET /v1/proc`.
    pub fn processes(&self, q: &ProcQuery) -> Vec<ProcessView> {
        let cache = lock(&self.cache);
        let mut out: Vec<ProcessView> = cache
            .iter()
            .filter(|p| q.pid.is_none_or(|pid| pid == p.pid))
            .filter(|p| q.cgroup_id.is_none_or(|c| c == p.cgroup_id))
            .map(Self::view)
            .collect();
        out.sort_by_key(|p| (p.pid, p.start_ticks));
        out
    }

    /// `GET /v1/proc/status`.
    pub fn status(&self) -> ProcStatus {
        let inner = lock(&self.inner);
        let mut st = ProcStatus {
            enabled: inner.settings.enabled,
            up: inner.health.up,
            reason: inner.health.reason.clone(),
            found_at_start: inner.found_at_start,
            ..Default::default()
        };
        if let Some(plane) = &inner.plane {
            match plane.reasons() {
                Ok(r) => st.events = r.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                Err(e) => warn!(error = %e, "exec: cannot read its counters"),
            }
        }
        drop(inner);
        let s = lock(&self.cache).stats();
        st.entries = s.entries as u64;
        st.exited = s.exited as u64;
        st.evicted = s.evicted;
        st.expired = s.expired;
        st
    }
}

impl Controller for ExecController {
    fn name(&self) -> &'static str {
        NAME
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            features: &[],
            capabilities: &[Capability::Bpf, Capability::Perfmon],
        }
    }

    fn enabled(&self, settings: &Settings) -> bool {
        settings.exec.enabled
    }

    fn start(&self, settings: &Settings, blocker: Option<String>) -> Result<()> {
        let s = settings.exec.clone();
        lock(&self.inner).settings = s.clone();
        let reason = if !s.enabled {
            Some("disabled by the configuration (exec.enabled)".to_string())
        } else if let Some(b) = blocker {
            Some(b)
        } else {
            self.load(&s).err()
        };
        if reason.is_none() {
            // Before the tracer's first events are read: an event always wins over the walk.
            let found = cache::walk_proc(std::path::Path::new("/proc"), s.max_processes);
            let n = found.len() as u64;
            let mut c = lock(&self.cache);
            for p in found {
                c.apply(Event::Exec { process: p });
            }
            drop(c);
            lock(&self.inner).found_at_start = n;
            info!(
                processes = n,
                "module exec up: following exec, fork and exit"
            );
        } else if s.enabled {
            warn!(reason = ?reason, "module exec off");
        }
        lock(&self.inner).health = Health {
            enabled: s.enabled,
            up: reason.is_none(),
            reason,
        };
        Ok(())
    }

    fn prepare(
        self: Arc<Self>,
        _settings: &Settings,
        _blocker: Option<String>,
    ) -> Result<Box<dyn Prepared>> {
        Ok(Box::new(NoChange))
    }

    fn run(self: Arc<Self>, cancel: Cancel) -> RunFuture {
        Box::pin(async move {
            let Some(ring) = self.open_ring()? else {
                let mut cancel = cancel;
                cancel.cancelled().await;
                return Ok(());
            };
            let me = Arc::clone(&self);
            let reader = crate::bpf::ringbuf::drain_records(
                ring,
                Arc::clone(&self.events),
                1024,
                Some(READ_TICK),
                cancel.clone(),
                move |bytes, out| me.record(bytes, out),
            );
            let me = Arc::clone(&self);
            let mut stop = cancel.clone();
            let expiry = async move {
                let mut tick = tokio::time::interval(EXPIRE_EVERY);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return Ok::<(), Error>(()),
                    }
                    let now = crate::ct::gc::boottime_now_ns();
                    lock(&me.cache).expire(now);
                }
            };
            let (a, b) = tokio::join!(reader, expiry);
            a.and(b)
        })
    }

    fn health(&self) -> Health {
        lock(&self.inner).health.clone()
    }

    fn collectors(self: Arc<Self>) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(metrics_collector(self))]
    }

    fn routes(self: Arc<Self>) -> axum::Router {
        use crate::server::{get_blocking, get_query_blocking};
        let me = Arc::clone(&self);
        let status = get_blocking(move || me.status());
        let me = Arc::clone(&self);
        let list = get_query_blocking(move |q: ProcQuery| Ok(me.processes(&q)));
        axum::Router::new()
            .route(datapath_api::routes::PROC, list)
            .route(datapath_api::routes::PROC_STATUS, status)
    }
}

mod metrics {
    use prometheus::{IntCounterVec, IntGaugeVec, core::Collector};

    use crate::metrics::{Families, counter, gauge};

    pub(super) struct ExecFamilies {
        pub events: IntCounterVec,
        pub entries: IntGaugeVec,
        pub evicted: IntCounterVec,
    }

    impl Families for ExecFamilies {
        fn new() -> Self {
            Self {
                events: counter(
                    "datapath_exec_events_total",
                    "Tracer hook calls by outcome (exec_sent, fork_sent, exit_sent, \
                     thread_skipped, rate_limited, lost, read_failed)",
                    &["outcome"],
                ),
                entries: gauge(
                    "datapath_exec_cache_entries",
                    "Processes in the exec module's cache",
                    &[],
                ),
                evicted: counter(
                    "datapath_exec_cache_evicted_total",
                    "Processes evicted from a full cache",
                    &[],
                ),
            }
        }

        fn all(&self) -> Vec<&dyn Collector> {
            vec![&self.events, &self.entries, &self.evicted]
        }
    }
}

fn metrics_collector(
    ctl: Arc<ExecController>,
) -> crate::metrics::FamilyCollector<metrics::ExecFamilies> {
    crate::metrics::FamilyCollector::new(move |f: &metrics::ExecFamilies| {
        if !lock(&ctl.inner).health.up {
            return;
        }
        let st = ctl.status();
        for (outcome, n) in &st.events {
            f.events.with_label_values(&[outcome.as_str()]).inc_by(*n);
        }
        let none: &[&str] = &[];
        f.entries.with_label_values(none).set(st.entries as i64);
        f.evicted.with_label_values(none).inc_by(st.evicted);
    })
}
