//! The `exec` controller: processes followed through the kernel's exec, fork and exit
//! tracepoints (`bpf-trace`, BTF tracepoints: this kernel has no kprobes), kept in a cache
//! keyed by (pid, start time), with their program, arguments, uid, cgroup and pod.
//!
//! - Kernel struct offsets come from the kernel's BTF (`exec.btf_path`, read with `kbtf`);
//!   a field or tracepoint the kernel lacks keeps the module off with that reason, before any
//!   program is loaded, and the rest of the daemon runs.
//! - Processes that existed before the daemon started are found by a walk of `/proc`.
//! - Each event goes on the bus topic [`EVENTS`].
//! - TCP connects are attributed to their process (`inet_sock_set_state`): each goes on the
//!   topic [`CONNECTS`], and the conntrack asks the [`OWNERS`] handle who opened a flow.
//! - Enforcement (`exec.enforcement`, off by default): see [`rules`].
//! - The section needs a restart to change.
pub mod cache;
mod cgroups;
mod intern;
pub mod owners;
pub mod plane;
pub mod rules;

use std::{
    net::IpAddr,
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use bpf_common::trace::{
    CONNECT_CHECKED, CONNECT_ESTABLISHED, CONNECT_FAILED, ConnectEvent, EVENT_EXEC, EVENT_EXIT,
    EVENT_FORK, ProcessEvent, VERDICT_AUDITED, VERDICT_DENIED,
};
use datapath_api::{
    ConnectView, EnforcedCgroupView, ProcEventView, ProcEventsQuery, ProcQuery, ProcRuleView,
    ProcRulesView, ProcStatus, ProcessView,
};
use tracing::{info, warn};

use crate::{
    Error, Result,
    bus::{Bus, StateWriter, Topic},
    config::{ExecSettings, Settings},
    controller::{Cancel, Controller, Health, NoChange, Prepared, Requirements, RunFuture},
    features::Capability,
};
use cache::{Event, Process, ProcessCache, Verdict};
use owners::{Owner, Owners, Tuple};
use plane::TracePlane;
use rules::{Mode, Resolved};

pub const NAME: &str = "exec";
/// Topic: every process event, decoded (`Arc<cache::Event>`): the ProcessEvent topic.
pub const EVENTS: &str = "exec.events";
/// Topic: every connect attributed or checked (`Arc<ConnectView>`): the ConnectEvent topic.
pub const CONNECTS: &str = "exec.connects";
/// State: who opened a TCP connection ([`OwnerHandle`]; writer: exec).
pub const OWNERS: &str = "exec.owners";
const FOLLOWER: &str = "proc follow";

/// What a module may ask about connections' processes.
pub trait FlowOwnerLookup: Send + Sync {
    /// The process that opened the TCP connection `src:sport -> dst:dport`, if known.
    fn owner_of(&self, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Option<Owner>;
    /// The latest process of `pid` the cache knows (for what has no tuple yet: a connect the
    /// socket LB refused).
    fn process_of(&self, pid: u32) -> Option<Owner> {
        let _ = pid;
        None
    }
}

/// The owners' handle on the bus (`None`: the module is off).
pub type OwnerHandle = Option<Arc<dyn FlowOwnerLookup>>;

struct OwnersHandle(Arc<Mutex<Owners>>, Arc<Mutex<ProcessCache>>);

impl FlowOwnerLookup for OwnersHandle {
    fn owner_of(&self, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Option<Owner> {
        lock(&self.0).owner_of(&(src, sport, dst, dport)).cloned()
    }

    fn process_of(&self, pid: u32) -> Option<Owner> {
        let cache = lock(&self.1);
        let p = cache.by_pid(pid)?;
        Some(Owner {
            pid,
            start_ticks: p.start_ticks,
            exe: Arc::clone(&p.exe),
            comm: Arc::clone(&p.comm),
            pod_uid: p.pod_uid().cloned(),
        })
    }
}
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
    connect_ring: Option<std::os::fd::OwnedFd>,
    /// The enforcement as applied (its cgroups and files found).
    rules: Resolved,
    health: Health,
    found_at_start: u64,
}

pub struct ExecController {
    inner: Mutex<Inner>,
    cache: Arc<Mutex<ProcessCache>>,
    /// The cgroups' paths and pods by id, bounded.
    cgroups: Mutex<cgroups::CgroupNames>,
    events: Arc<Topic<Arc<Event>>>,
    connects: Arc<Topic<Arc<ConnectView>>>,
    owners: Arc<Mutex<Owners>>,
    owner_handle: StateWriter<OwnerHandle>,
    /// True once the module's loop stops: follow streams end.
    stopping: tokio::sync::watch::Sender<bool>,
    ticks: u64,
}

/// A NUL-padded C string.
fn c_str_lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end])
}

fn c_string(bytes: &[u8]) -> String {
    c_str_lossy(bytes).into_owned()
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

/// A header field of a `ProcessEvent` record, read in place: `bytes` holds at least the
/// header, which the field lies in.
macro_rules! header_field {
    ($bytes:expr, $field:ident: $ty:ty) => {{
        const AT: usize = core::mem::offset_of!(ProcessEvent, $field);
        const LEN: usize = core::mem::size_of::<$ty>();
        const _: () = assert!(AT + LEN <= bpf_common::trace::PROCESS_EVENT_HEADER);
        let mut raw = [0u8; LEN];
        raw.copy_from_slice(&$bytes[AT..AT + LEN]);
        <$ty>::from_ne_bytes(raw)
    }};
}

/// The filled bytes of a variable part of a record (`at`, `max` long, `len` of it filled),
/// cut to what the record holds.
fn record_part(bytes: &[u8], at: usize, max: usize, len: u16) -> &[u8] {
    let end = at + usize::from(len).min(max);
    bytes.get(at..end.min(bytes.len())).unwrap_or_default()
}

/// A tracer record as the daemon takes it, the one path of both the controller and the
/// bench: decoded (`ticks` per second for the start times, `cgroup_of` to name a cgroup id,
/// asked before the cache is locked since it may search the cgroup tree), its program and
/// command shared with the cache's copies, and applied to the cache. The event for the bus;
/// `None` for a record that is too short or of an unknown kind.
pub fn ingest(
    cache: &Mutex<ProcessCache>,
    bytes: &[u8],
    ticks: u64,
    cgroup_of: &dyn Fn(u64) -> Option<Arc<cache::Cgroup>>,
) -> Option<Event> {
    use bpf_common::trace::{
        MAX_ARGS, MAX_FILENAME, PROCESS_EVENT_BEFORE_ARGS, PROCESS_EVENT_HEADER,
    };
    // Read in place, not copied out whole: the record was written on another CPU, and its path
    // and arguments rarely fill more than a few of their cache lines.
    if bytes.len() < PROCESS_EVENT_HEADER {
        return None;
    }
    let kind = header_field!(bytes, kind: u8);
    let ticks = |ns| cache::ticks_of_ns(ns, ticks);
    let pid = header_field!(bytes, pid: u32);
    let start_ticks = ticks(header_field!(bytes, start_ns: u64));
    let ts_ns = header_field!(bytes, ts_ns: u64);
    if kind == EVENT_EXIT {
        let exit = Event::Exit {
            pid,
            start_ticks,
            ts_ns,
            code: header_field!(bytes, exit_code: u32),
        };
        lock(cache).apply(exit.clone());
        return Some(exit);
    }
    if kind != EVENT_EXEC && kind != EVENT_FORK {
        return None;
    }
    let cgroup_id = header_field!(bytes, cgroup_id: u64);
    let cgroup = cgroup_of(cgroup_id);
    let filename = header_field!(bytes, filename_len: u16);
    let exe = String::from_utf8_lossy(record_part(
        bytes,
        PROCESS_EVENT_HEADER,
        MAX_FILENAME,
        filename,
    ));
    let args_len = header_field!(bytes, args_len: u16);
    let args = cache::Args::from_nul_separated(record_part(
        bytes,
        PROCESS_EVENT_BEFORE_ARGS,
        MAX_ARGS,
        args_len,
    ));
    let comm_at = core::mem::offset_of!(ProcessEvent, comm);
    let comm = c_str_lossy(&bytes[comm_at..comm_at + 16]);
    let mut cache = lock(cache);
    let process = Process {
        pid,
        start_ticks,
        ppid: header_field!(bytes, ppid: u32),
        parent_start_ticks: ticks(header_field!(bytes, parent_start_ns: u64)),
        exe: cache.intern(&exe),
        args,
        comm: cache.intern(&comm),
        uid: header_field!(bytes, uid: u32),
        cgroup_id,
        cgroup,
        exited: None,
        seen_ns: ts_ns,
        from_proc: false,
        program_before: None,
    };
    let event = if kind == EVENT_EXEC {
        let rule = header_field!(bytes, rule: u16);
        Event::Exec {
            process,
            verdict: match header_field!(bytes, verdict: u8) {
                VERDICT_DENIED => Some(Verdict { denied: true, rule }),
                VERDICT_AUDITED => Some(Verdict {
                    denied: false,
                    rule,
                }),
                _ => None,
            },
        }
    } else {
        Event::Fork { process }
    };
    cache.apply(event.clone());
    Some(event)
}

fn verdict_name(v: u8) -> Option<String> {
    match v {
        VERDICT_DENIED => Some("denied".into()),
        VERDICT_AUDITED => Some("audited".into()),
        _ => None,
    }
}

/// A connect record of the tracer, decoded (the program not filled in yet).
pub fn decode_connect(bytes: &[u8], ticks: u64) -> Option<ConnectView> {
    if bytes.len() < std::mem::size_of::<ConnectEvent>() {
        return None;
    }
    // SAFETY: a POD of the ABI, read unaligned from a record at least its size.
    let e: ConnectEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let outcome = match e.outcome {
        CONNECT_ESTABLISHED => "established",
        CONNECT_FAILED => "failed",
        CONNECT_CHECKED => "checked",
        _ => return None,
    };
    let verdict = verdict_name(e.verdict);
    Some(ConnectView {
        ts_ns: e.ts_ns,
        pid: e.pid,
        start_ticks: if e.start_ns == 0 {
            0
        } else {
            cache::ticks_of_ns(e.start_ns, ticks)
        },
        exe: None,
        comm: c_string(&e.comm),
        uid: e.uid,
        cgroup_id: e.cgroup_id,
        protocol: crate::ct::table::proto_name(e.protocol),
        src: rules::address_of(e.src),
        src_port: e.src_port,
        dst: rules::address_of(e.dst),
        dst_port: e.dst_port,
        outcome: outcome.into(),
        rule: verdict.is_some().then_some(e.rule),
        verdict,
    })
}

impl ExecController {
    pub fn new(settings: &Settings, bus: &Bus) -> Result<Arc<Self>> {
        let s = &settings.exec;
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                settings: s.clone(),
                plane: None,
                ring: None,
                connect_ring: None,
                rules: Resolved::default(),
                health: Health::default(),
                found_at_start: 0,
            }),
            cache: Arc::new(Mutex::new(ProcessCache::new(
                s.max_processes,
                s.exit_grace.as_nanos() as u64,
            ))),
            // Twice the process cache: its processes' cgroups always fit, and a prune of a
            // full table frees at least half.
            cgroups: Mutex::new(cgroups::CgroupNames::new(s.max_processes.saturating_mul(2))),
            events: bus.topic(EVENTS, EVENT_BUFFER)?,
            connects: bus.topic(CONNECTS, EVENT_BUFFER)?,
            owners: Arc::new(Mutex::new(Owners::new(s.max_connections))),
            owner_handle: bus.state::<OwnerHandle>(OWNERS)?.writer()?,
            stopping: tokio::sync::watch::channel(false).0,
            ticks: cache::clock_ticks(),
        }))
    }

    fn cgroup_of(&self, id: u64) -> Option<Arc<cache::Cgroup>> {
        if let Some(known) = lock(&self.cgroups).get(id) {
            return known;
        }
        let root = crate::socklb::cgroup2_root().ok()?;
        let found = cgroup_path(&root, id).map(|path| cache::Cgroup::new(&path));
        lock(&self.cgroups).remember(id, found.clone());
        found
    }

    fn record(&self, bytes: &[u8], out: &mut Vec<Arc<Event>>) {
        if let Some(event) = ingest(&self.cache, bytes, self.ticks, &|id| self.cgroup_of(id)) {
            if let Event::Exec {
                process,
                verdict: Some(v),
            } = &event
            {
                warn!(
                    pid = process.pid,
                    exe = %process.exe,
                    cgroup = ?process.cgroup,
                    rule = v.rule,
                    denied = v.denied,
                    "exec: an exec rule matched"
                );
            }
            out.push(Arc::new(event));
        }
    }

    /// The program of process (`pid`, `start_ticks`), else of the pid's latest process, with
    /// the pod it runs in.
    /// The process's start, program at `ts_ns` (boot clock) and pod.
    fn program_of(
        &self,
        pid: u32,
        start_ticks: u64,
        ts_ns: u64,
    ) -> Option<(u64, Arc<str>, Option<Arc<str>>)> {
        let cache = lock(&self.cache);
        let p = (start_ticks != 0)
            .then(|| cache.get((pid, start_ticks)))
            .flatten()
            .or_else(|| cache.by_pid(pid))?;
        let exe = p.exe_at(ts_ns);
        (!exe.is_empty()).then(|| (p.start_ticks, Arc::clone(exe), p.pod_uid().cloned()))
    }

    /// Reads both rings in one task, processes before connects: a connect's exec or fork is
    /// committed before the connect is, so the process ring drained after the connects were
    /// taken holds it, and the connect is named by its program. (The tracer wakes the reader
    /// only every eighth of a ring, so two readers would race by up to a tick.)
    async fn read_rings(
        self: Arc<Self>,
        processes: plane::Ring,
        connects: plane::Ring,
        mut cancel: Cancel,
    ) -> Result<()> {
        use crate::bpf::ringbuf::{RecordSource as _, RingReader};
        let register = |ring: plane::Ring| -> Result<tokio::io::unix::AsyncFd<RingReader>> {
            let reader = RingReader::from_aya(ring)?;
            // SAFETY: the reader owns its descriptor and moves into the AsyncFd, which
            // deregisters it before dropping it.
            unsafe { tokio::io::unix::AsyncFd::register(reader) }
                .map_err(|e| Error::io("poll a tracer ring buffer", e.into_parts().1))
        };
        let mut processes = register(processes)?;
        let mut connects = register(connects)?;
        let mut tick = tokio::time::interval(READ_TICK);
        // At most 16 batches a call: a flood cannot hold the runtime; what is left is read
        // in the next round, which then does not wait.
        let drain_processes = |fd: &mut tokio::io::unix::AsyncFd<RingReader>| {
            for _ in 0..16 {
                let mut batch = Vec::new();
                let drained = fd
                    .get_mut()
                    .read_batch(1024, &mut |bytes| self.record(bytes, &mut batch));
                self.events.publish_batch(batch);
                if drained {
                    return true;
                }
            }
            false
        };
        let mut more = false;
        loop {
            // Readiness is cleared before the rings are read: a record written meanwhile wakes
            // the next round.
            tokio::select! {
                ready = processes.readable_mut() => {
                    ready.map_err(|e| Error::io("tracer ring buffer failed", e))?.clear_ready();
                }
                ready = connects.readable_mut() => {
                    ready.map_err(|e| Error::io("tracer ring buffer failed", e))?.clear_ready();
                }
                _ = tick.tick() => {}
                () = tokio::task::yield_now(), if more => {}
                _ = cancel.cancelled() => return Ok(()),
            }
            more = !drain_processes(&mut processes);
            for _ in 0..16 {
                let mut taken = Vec::new();
                let drained = connects.get_mut().read_batch(1024, &mut |bytes| {
                    taken.extend(decode_connect(bytes, self.ticks));
                });
                // The processes of these connects are in the process ring by now.
                more |= !drain_processes(&mut processes);
                let named: Vec<Arc<ConnectView>> =
                    taken.into_iter().map(|c| self.name_connect(c)).collect();
                self.connects.publish_batch(named);
                if drained {
                    break;
                }
                more = true;
            }
        }
    }

    /// A connect attributed to its program, its owner learned for an established TCP one.
    fn name_connect(&self, mut c: ConnectView) -> Arc<ConnectView> {
        let mut owner = None;
        if let Some((start, exe, pod)) = self.program_of(c.pid, c.start_ticks, c.ts_ns) {
            c.start_ticks = start;
            c.exe = Some(exe.to_string());
            owner = Some((exe, pod));
        }
        if c.outcome == "established" && c.protocol == "tcp" {
            let tuple: Tuple = (c.src, c.src_port, c.dst, c.dst_port);
            lock(&self.owners).learn(
                tuple,
                Owner {
                    pid: c.pid,
                    start_ticks: c.start_ticks,
                    comm: c.comm.as_str().into(),
                    pod_uid: owner.as_ref().and_then(|(_, pod)| pod.clone()),
                    exe: owner.map(|(exe, _)| exe).unwrap_or_default(),
                },
            );
        }
        if let Some(v) = &c.verdict {
            warn!(pid = c.pid, exe = ?c.exe, dst = %c.dst, port = c.dst_port,
                verdict = %v, rule = ?c.rule, "exec: a connect rule matched");
        }
        Arc::new(c)
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
        let resolved = if s.enforcement.mode == Mode::Off {
            Resolved::default()
        } else {
            let root = crate::socklb::cgroup2_root()
                .map_err(|e| format!("cannot find the cgroup2 mount for enforcement: {e}"))?;
            rules::resolve(&s.enforcement, &root)?
        };
        let (plane, rings) = TracePlane::start(s.event_rate, &offsets, &resolved)
            .map_err(|e| format!("cannot load: {e}"))?;
        let keep = |ring: &plane::Ring| {
            ring.as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("cannot keep the ring buffer: {e}"))
        };
        let (fd, connect_fd) = (keep(&rings.processes)?, keep(&rings.connects)?);
        let mut inner = lock(&self.inner);
        inner.plane = Some(plane);
        inner.ring = Some(fd);
        inner.connect_ring = Some(connect_fd);
        inner.rules = resolved;
        Ok(())
    }

    fn open_rings(&self) -> Result<Option<(plane::Ring, plane::Ring)>> {
        let inner = lock(&self.inner);
        let (Some(p), Some(c)) = (&inner.ring, &inner.connect_ring) else {
            return Ok(None);
        };
        Ok(Some((
            crate::bpf::ringbuf::reopen(p, "TRACE_EVENTS")?,
            crate::bpf::ringbuf::reopen(c, "TRACE_CONNECTS")?,
        )))
    }

    /// `GET /v1/proc/rules`.
    pub fn rules(&self) -> ProcRulesView {
        let inner = lock(&self.inner);
        let configured = &inner.settings.enforcement;
        let r = &inner.rules;
        let hits = inner
            .plane
            .as_ref()
            .map(|p| p.rule_hits(r.exec.len() + r.connect.len()))
            .transpose()
            .unwrap_or_else(|e| {
                warn!(error = %e, "exec: cannot read the rule counters");
                None
            })
            .unwrap_or_default();
        let hit = |i: u16| hits.get(usize::from(i)).copied().unwrap_or(0);
        let mut rules: Vec<ProcRuleView> = r
            .exec
            .iter()
            .map(|e| ProcRuleView {
                index: e.index,
                kind: "exec".into(),
                target: e.path.display().to_string(),
                inode: Some(format!("{}:{}", e.key.dev, e.key.ino)),
                hits: hit(e.index),
            })
            .collect();
        rules.extend(r.connect.iter().map(|(i, c)| ProcRuleView {
            index: *i,
            kind: "connect".into(),
            target: c.to_string(),
            inode: None,
            hits: hit(*i),
        }));
        let mut verdicts = std::collections::BTreeMap::new();
        if let Some(plane) = &inner.plane
            && let Ok(reasons) = plane.reasons()
        {
            for k in [
                "exec_denied",
                "exec_audited",
                "connect_denied",
                "connect_audited",
                "signal_failed",
            ] {
                verdicts.insert(k.to_string(), reasons.get(k).copied().unwrap_or(0));
            }
        }
        ProcRulesView {
            mode: configured.mode.as_str().into(),
            host_wide: configured.host_wide,
            cgroups: r
                .cgroups
                .iter()
                .map(|c| EnforcedCgroupView {
                    path: c.path.clone(),
                    id: c.id,
                })
                .collect(),
            hooks: inner
                .plane
                .as_ref()
                .map(|p| p.hooks().iter().map(|h| h.to_string()).collect())
                .unwrap_or_default(),
            rules,
            verdicts,
        }
    }

    fn view(p: &Process) -> ProcessView {
        ProcessView {
            pid: p.pid,
            start_ticks: p.start_ticks,
            ppid: p.ppid,
            exe: p.exe.to_string(),
            args: p.args.to_vec(),
            comm: p.comm.to_string(),
            uid: p.uid,
            cgroup_id: p.cgroup_id,
            cgroup: p.cgroup_path().map(str::to_string),
            pod_uid: p.pod_uid().map(|u| u.to_string()),
            container_id: p
                .cgroup
                .as_ref()
                .and_then(|c| c.workload.container_id.as_deref())
                .map(str::to_string),
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
        let o = lock(&self.owners);
        st.connections = o.len() as u64;
        st.connections_forgotten = o.forgotten();
        drop(o);
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
            for mut p in found {
                p.exe = c.intern(&p.exe);
                p.comm = c.intern(&p.comm);
                c.apply(Event::Exec {
                    process: p,
                    verdict: None,
                });
            }
            drop(c);
            lock(&self.inner).found_at_start = n;
            self.owner_handle.publish(Some(Arc::new(OwnersHandle(
                Arc::clone(&self.owners),
                Arc::clone(&self.cache),
            )) as Arc<dyn FlowOwnerLookup>));
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
            let Some((ring, connect_ring)) = self.open_rings()? else {
                let mut cancel = cancel;
                cancel.cancelled().await;
                return Ok(());
            };
            self.stopping.send_replace(false);
            let reader = Arc::clone(&self).read_rings(ring, connect_ring, cancel.clone());
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
            self.stopping.send_replace(true);
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
        let me = Arc::clone(&self);
        let rules = get_blocking(move || me.rules());
        let me = Arc::clone(&self);
        let follow = axum::routing::get(
            move |q: std::result::Result<
                axum::extract::Query<ProcEventsQuery>,
                axum::extract::rejection::QueryRejection,
            >| {
                let me = Arc::clone(&me);
                async move { follow_route(me, q) }
            },
        );
        axum::Router::new()
            .route(datapath_api::routes::PROC, list)
            .route(datapath_api::routes::PROC_STATUS, status)
            .route(datapath_api::routes::PROC_RULES, rules)
            .route(datapath_api::routes::PROC_EVENTS, follow)
    }
}

/// An event of the follow stream.
fn event_view(e: &Event) -> ProcEventView {
    match e {
        Event::Exec { process, verdict } => ProcEventView::Exec {
            process: ExecController::view(process),
            verdict: verdict.map(|v| if v.denied { "denied" } else { "audited" }.to_string()),
            rule: verdict.map(|v| v.rule),
        },
        Event::Fork { process } => ProcEventView::Fork {
            process: ExecController::view(process),
        },
        Event::Exit {
            pid,
            start_ticks,
            code,
            ..
        } => ProcEventView::Exit {
            pid: *pid,
            start_ticks: *start_ticks,
            code: *code,
        },
    }
}

/// The cgroup of an event's process (an exit's from the cache, which keeps exited processes
/// for the grace period).
fn event_cgroup(me: &ExecController, e: &Event) -> Option<u64> {
    match e {
        Event::Exec { process, .. } | Event::Fork { process } => Some(process.cgroup_id),
        Event::Exit {
            pid, start_ticks, ..
        } => lock(&me.cache)
            .get((*pid, *start_ticks))
            .map(|p| p.cgroup_id),
    }
}

/// `GET /v1/proc/events?follow=true`: process and connect events as they come, one JSON a
/// line, until the count, the timeout or the module's stop.
fn follow_route(
    me: Arc<ExecController>,
    q: std::result::Result<
        axum::extract::Query<ProcEventsQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let q = match q {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => {
            return crate::server::ApiFailure::from(Error::InvalidArgument(format!(
                "invalid query: {}",
                e.body_text()
            )))
            .into_response();
        }
    };
    if !q.follow {
        return crate::server::ApiFailure::from(Error::InvalidArgument(
            "GET /v1/proc/events streams: add follow=true (lb-ctl proc follow)".into(),
        ))
        .into_response();
    }
    if !lock(&me.inner).health.up {
        return crate::server::ApiFailure::from(Error::InvalidArgument(
            "the exec module is off (GET /v1/proc/status says why)".into(),
        ))
        .into_response();
    }
    let max = Duration::from_secs(datapath_api::MAX_FOLLOW_SECONDS);
    let deadline = tokio::time::Instant::now()
        + q.timeout_seconds
            .map(Duration::from_secs)
            .unwrap_or(max)
            .min(max);
    let limit = q.count.unwrap_or(u64::MAX);
    let cgroup = q.cgroup_id;
    let state = (
        me.events.subscribe(FOLLOWER),
        me.connects.subscribe(FOLLOWER),
        me.stopping.subscribe(),
        0u64,
    );
    let stream =
        futures_util::stream::unfold(state, move |(mut events, mut connects, mut stop, sent)| {
            let me = Arc::clone(&me);
            async move {
                if sent >= limit || *stop.borrow() {
                    return None;
                }
                loop {
                    let view = tokio::select! {
                        e = events.recv() => {
                            if cgroup.is_some() && event_cgroup(&me, &e) != cgroup {
                                continue;
                            }
                            event_view(&e)
                        }
                        c = connects.recv() => {
                            if cgroup.is_some_and(|id| id != c.cgroup_id) {
                                continue;
                            }
                            ProcEventView::Connect { connect: (*c).clone() }
                        }
                        _ = tokio::time::sleep_until(deadline) => return None,
                        _ = stop.changed() => return None,
                    };
                    let mut line = serde_json::to_vec(&view).unwrap_or_default();
                    line.push(b'\n');
                    return Some((
                        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(line)),
                        (events, connects, stop, sent + 1),
                    ));
                }
            }
        });
    (
        axum::http::StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            datapath_api::NDJSON_CONTENT_TYPE,
        )],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

mod metrics {
    use prometheus::{IntCounterVec, IntGaugeVec, core::Collector};

    use crate::metrics::{Families, counter, gauge};

    pub(super) struct ExecFamilies {
        pub events: IntCounterVec,
        pub entries: IntGaugeVec,
        pub evicted: IntCounterVec,
        pub connections: IntGaugeVec,
        pub rule_hits: IntCounterVec,
    }

    impl Families for ExecFamilies {
        fn new() -> Self {
            Self {
                events: counter(
                    "datapath_exec_events_total",
                    "Tracer hook calls by outcome (exec_sent, fork_sent, exit_sent, \
                     thread_skipped, rate_limited, lost, read_failed, connect_started, \
                     connect_sent, connect_unseen, state_ignored, exec_audited, exec_denied, \
                     connect_audited, connect_denied, connect_allowed, signal_failed)",
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
                connections: gauge(
                    "datapath_exec_connections",
                    "TCP connections attributed to their process, kept",
                    &[],
                ),
                rule_hits: counter(
                    "datapath_exec_rule_hits_total",
                    "Matches of each enforcement rule (denied in enforce mode, reported in \
                     audit mode)",
                    &["rule", "kind", "mode"],
                ),
            }
        }

        fn all(&self) -> Vec<&dyn Collector> {
            vec![
                &self.events,
                &self.entries,
                &self.evicted,
                &self.connections,
                &self.rule_hits,
            ]
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
        f.connections
            .with_label_values(none)
            .set(st.connections as i64);
        let rules = ctl.rules();
        for r in &rules.rules {
            f.rule_hits
                .with_label_values(&[r.index.to_string().as_str(), &r.kind, &rules.mode])
                .inc_by(r.hits);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tracer record as the kernel sends it: an exec up to its arguments, a fork or an exit
    /// as its header only.
    fn record(kind: u8, pid: u32, start_ns: u64, exe: &[u8], args: &[u8]) -> Vec<u8> {
        // SAFETY: a ProcessEvent of zeros is valid (a POD of the ABI).
        let mut e: ProcessEvent = unsafe { std::mem::zeroed() };
        e.kind = kind;
        e.pid = pid;
        e.ppid = 1;
        e.start_ns = start_ns;
        e.parent_start_ns = 10_000_000;
        e.ts_ns = start_ns + 5;
        e.cgroup_id = 77;
        e.uid = 1000;
        e.exit_code = 3;
        e.comm[..4].copy_from_slice(b"true");
        e.filename[..exe.len()].copy_from_slice(exe);
        e.filename_len = exe.len() as u16;
        e.args[..args.len()].copy_from_slice(args);
        e.args_len = args.len() as u16;
        let len = match kind {
            EVENT_EXEC => bpf_common::trace::PROCESS_EVENT_BEFORE_ARGS + args.len(),
            _ => bpf_common::trace::PROCESS_EVENT_HEADER,
        };
        // SAFETY: the event's own bytes, `len` at most its size.
        unsafe { std::slice::from_raw_parts(std::ptr::addr_of!(e).cast::<u8>(), len) }.to_vec()
    }

    #[test]
    fn records_are_decoded_applied_and_share_their_program() {
        let cache = Mutex::new(ProcessCache::new(100, 1_000));
        let pod = "/kubepods/besteffort/pod0f6e37b8-8f0f-4c8e-9a5b-1c2d3e4f5a6b";
        let name = cache::Cgroup::new(pod);
        let cgroup_of = |id: u64| (id == 77).then(|| name.clone());
        let exec = record(
            EVENT_EXEC,
            40,
            2_000_000_000,
            b"/bin/true",
            b"true\0-x\0\xff\0",
        );
        let Some(Event::Exec { process, verdict }) = ingest(&cache, &exec, 100, &cgroup_of) else {
            panic!("an exec");
        };
        assert_eq!(verdict, None);
        assert_eq!(
            (
                process.pid,
                process.start_ticks,
                process.ppid,
                process.parent_start_ticks
            ),
            (40, 200, 1, 1)
        );
        assert_eq!((&*process.exe, &*process.comm), ("/bin/true", "true"));
        assert_eq!(process.args.to_vec(), ["true", "-x", "\u{fffd}"]);
        assert_eq!(process.cgroup_path(), Some(pod));
        assert!(Arc::ptr_eq(process.cgroup.as_ref().unwrap(), &name));
        assert_eq!(
            process.pod_uid().map(|u| &**u),
            Some("0f6e37b8-8f0f-4c8e-9a5b-1c2d3e4f5a6b")
        );
        assert_eq!(lock(&cache).get((40, 200)), Some(&process));
        // A second process of the same program holds the same copy of its path.
        let other = record(EVENT_EXEC, 41, 3_000_000_000, b"/bin/true", b"true\0");
        let Some(Event::Exec { process: p2, .. }) = ingest(&cache, &other, 100, &cgroup_of) else {
            panic!("an exec");
        };
        assert!(Arc::ptr_eq(&process.exe, &p2.exe) && Arc::ptr_eq(&process.comm, &p2.comm));
        let exit = record(EVENT_EXIT, 40, 2_000_000_000, b"", b"");
        assert_eq!(
            ingest(&cache, &exit, 100, &cgroup_of),
            Some(Event::Exit {
                pid: 40,
                start_ticks: 200,
                ts_ns: 2_000_000_005,
                code: 3
            })
        );
        assert_eq!(
            lock(&cache).get((40, 200)).unwrap().exited,
            Some((2_000_000_005, 3))
        );
        // A header-only fork: no program of its own yet.
        let fork = record(EVENT_FORK, 42, 4_000_000_000, b"", b"");
        let Some(Event::Fork { process: f }) = ingest(&cache, &fork, 100, &|_| None) else {
            panic!("a fork");
        };
        assert!(f.exe.is_empty() && f.args.is_empty() && f.cgroup.is_none());
        // Too short, or of no kind the tracer sends: nothing decoded, nothing applied.
        assert_eq!(ingest(&cache, &exec[..10], 100, &cgroup_of), None);
        let odd = record(99, 43, 5_000_000_000, b"/bin/x", b"");
        assert_eq!(ingest(&cache, &odd, 100, &cgroup_of), None);
        assert_eq!(lock(&cache).stats().entries, 3);
        // A record cut inside its path: what it holds, no NULs read past its end.
        let cut = &exec[..bpf_common::trace::PROCESS_EVENT_HEADER + 4];
        let Some(Event::Exec { process: c, .. }) = ingest(&cache, cut, 100, &cgroup_of) else {
            panic!("an exec");
        };
        assert_eq!((&*c.exe, c.args.is_empty()), ("/bin", true));
    }
}
