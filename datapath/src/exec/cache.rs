//! The process cache: processes keyed by (pid, start time), built from the tracer's events
//! and, at start, a walk of `/proc`.
//!
//! - Start times are compared at clock-tick resolution: `/proc/<pid>/stat` gives the start in
//!   ticks since boot, the tracer the leader's `start_boottime` in nanoseconds.
//! - Events that arrive out of order still resolve: an exit before its fork or exec makes an
//!   entry that a later exec fills in, and a fork never overwrites what an exec said.
//! - An exited process is kept for a grace period (a flow's owner stays known a while after it
//!   ends), then dropped; the cache is bounded (exited processes go first, then the oldest).
//! - A process's strings are shared: its program and command with every other process that
//!   runs them (the cache's [`Interner`]), its arguments with the events on the bus. A record
//!   costs one allocation (its arguments) and a clone costs reference counts, which is what
//!   keeps an exec storm's ring readable at line rate.
use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::Arc,
};

use super::intern::Interner;

/// The identity of a process: its pid and its start in clock ticks since boot.
pub type ProcessKey = (u32, u64);

/// The cache's maps hash pids and start times the kernel chose, not keys a remote peer picks.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A pod's and container's identity, parsed from a cgroup path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub pod_uid: Option<Arc<str>>,
    pub container_id: Option<Arc<str>>,
}

/// A process's arguments as one shared string, NUL between them (an argument never holds a
/// NUL): one allocation per exec rather than one per argument, and a clone is a reference
/// count. Empty arguments are not kept.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Args(Option<Arc<str>>);

impl Args {
    /// From argv as the kernel lays it out: each argument NUL-terminated (the last one may be
    /// cut short). Invalid UTF-8 is replaced, as `String::from_utf8_lossy` does.
    pub fn from_nul_separated(bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(bytes);
        let trimmed = text.trim_matches('\0');
        if trimmed.is_empty() {
            return Self(None);
        }
        if trimmed.contains("\0\0") {
            // Empty arguments inside: rebuilt without them (rare).
            return trimmed.split('\0').collect();
        }
        Self(Some(Arc::from(trimmed)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.as_deref().into_iter().flat_map(|s| s.split('\0'))
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_string).collect()
    }
}

impl<S: AsRef<str>> FromIterator<S> for Args {
    fn from_iter<I: IntoIterator<Item = S>>(args: I) -> Self {
        let mut joined = String::new();
        for a in args {
            let a = a.as_ref();
            if a.is_empty() {
                continue;
            }
            if !joined.is_empty() {
                joined.push('\0');
            }
            joined.push_str(a);
        }
        Self((!joined.is_empty()).then(|| Arc::from(joined)))
    }
}

impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// Start, in clock ticks since boot.
    pub start_ticks: u64,
    pub ppid: u32,
    pub parent_start_ticks: u64,
    /// The program's path as execve got it (empty before an exec or a `/proc` walk says it).
    pub exe: Arc<str>,
    pub args: Args,
    pub comm: Arc<str>,
    pub uid: u32,
    pub cgroup_id: u64,
    /// The cgroup, when known.
    pub cgroup: Option<Arc<Cgroup>>,
    /// Boot-clock nanoseconds of the exit, and its code.
    pub exited: Option<(u64, u32)>,
    /// Boot-clock nanoseconds of the last event about it (for eviction).
    pub seen_ns: u64,
    /// Found by the `/proc` walk (existed before the daemon started).
    pub from_proc: bool,
    /// When the current program began (boot-clock nanoseconds of its exec) and the program
    /// the process ran before it: what a connect made before that exec is attributed to
    /// (a shell that opens a connection, then execs another program in its own pid).
    /// Boxed: rare, and a process record small enough for two cache lines is what keeps an
    /// exec storm's evictions cheap.
    pub program_before: Option<Box<(u64, Arc<str>)>>,
}

const _: () = assert!(std::mem::size_of::<Process>() <= 136);

/// A cgroup as its processes name it: its path under the cgroup2 root, and the pod and
/// container parsed from that; one copy, shared by every process in it.
#[derive(Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub path: Box<str>,
    pub workload: Workload,
}

impl Cgroup {
    pub fn new(path: &str) -> Arc<Self> {
        Arc::new(Self {
            path: path.into(),
            workload: workload_of(path),
        })
    }
}

impl Process {
    /// The program the process ran at `ts_ns` (boot clock), as far as the cache knows.
    pub fn exe_at(&self, ts_ns: u64) -> &Arc<str> {
        match self.program_before.as_deref() {
            Some((since, before)) if ts_ns < *since => before,
            _ => &self.exe,
        }
    }

    /// The cgroup's path under the cgroup2 root, when known.
    pub fn cgroup_path(&self) -> Option<&str> {
        self.cgroup.as_ref().map(|c| &*c.path)
    }

    /// The pod the process runs in (from its cgroup's path).
    pub fn pod_uid(&self) -> Option<&Arc<str>> {
        self.cgroup.as_ref()?.workload.pod_uid.as_ref()
    }
}

/// An enforcement rule's match on an exec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Denied (the process killed), else audited.
    pub denied: bool,
    pub rule: u16,
}

/// What the tracer said, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Exec {
        process: Process,
        /// What an enforcement rule did to it.
        verdict: Option<Verdict>,
    },
    Fork {
        process: Process,
    },
    Exit {
        pid: u32,
        start_ticks: u64,
        ts_ns: u64,
        code: u32,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub exited: usize,
    pub evicted: u64,
    pub expired: u64,
}

/// Index of a process's slot in the cache's slab.
type Slot = u32;

/// The processes of one pid in the cache, by start: pids are reused, but rarely while the
/// cache still holds the earlier process, so one is kept inline.
#[derive(Debug)]
enum Starts {
    One((u64, Slot)),
    Many(Vec<(u64, Slot)>),
}

impl Starts {
    fn as_slice(&self) -> &[(u64, Slot)] {
        match self {
            Self::One(one) => std::slice::from_ref(one),
            Self::Many(v) => v,
        }
    }

    fn slot_of(&self, start: u64) -> Option<Slot> {
        self.as_slice()
            .iter()
            .find(|(s, _)| *s == start)
            .map(|(_, slot)| *slot)
    }

    fn add(&mut self, start: u64, slot: Slot) {
        match self {
            Self::One(one) => *self = Self::Many(vec![*one, (start, slot)]),
            Self::Many(v) => v.push((start, slot)),
        }
    }

    /// Takes `start` out: its slot, and whether any start is left.
    fn take(&mut self, start: u64) -> (Option<Slot>, bool) {
        match self {
            Self::One((s, slot)) if *s == start => (Some(*slot), false),
            Self::One(_) => (None, true),
            Self::Many(v) => {
                let taken = v
                    .iter()
                    .position(|(s, _)| *s == start)
                    .map(|i| v.swap_remove(i).1);
                let left = match v[..] {
                    [] => return (taken, false),
                    [only] => only,
                    _ => return (taken, true),
                };
                *self = Self::One(left);
                (taken, true)
            }
        }
    }
}

/// The processes live in a slab: the index maps hold a pid's starts and slots, a few bytes
/// each, so an exec storm's insert and eviction move no process record and the maps stay
/// small enough for the CPU's caches.
pub struct ProcessCache {
    slots: Vec<Process>,
    /// Slots of removed processes, for the next ones.
    free: Vec<Slot>,
    /// Every cached process by pid, then start.
    by_pid: FastMap<u32, Starts>,
    live: usize,
    /// Exited processes by exit time, for expiry.
    exits: BTreeSet<(u64, ProcessKey)>,
    /// Every process by when it was last seen, for eviction.
    by_seen: BTreeSet<(u64, ProcessKey)>,
    /// The one copy of each program and command the cached processes share.
    strings: Interner,
    max: usize,
    grace_ns: u64,
    evicted: u64,
    expired: u64,
}

impl ProcessCache {
    pub fn new(max: usize, grace_ns: u64) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            by_pid: FastMap::default(),
            live: 0,
            exits: BTreeSet::new(),
            by_seen: BTreeSet::new(),
            strings: Interner::default(),
            max: max.clamp(1, Slot::MAX as usize),
            grace_ns,
            evicted: 0,
            expired: 0,
        }
    }

    /// The shared copy of a program's path or command: what [`super::ingest`] builds
    /// processes with.
    pub fn intern(&mut self, s: &str) -> Arc<str> {
        self.strings.intern_str(s)
    }

    fn slot_of(&self, key: ProcessKey) -> Option<Slot> {
        self.by_pid.get(&key.0)?.slot_of(key.1)
    }

    fn remove(&mut self, key: ProcessKey) {
        let Some(starts) = self.by_pid.get_mut(&key.0) else {
            return;
        };
        let (slot, left) = starts.take(key.1);
        if !left {
            self.by_pid.remove(&key.0);
        }
        let Some(slot) = slot else { return };
        // Its strings dropped now; the slot waits for the next process.
        let p = std::mem::take(&mut self.slots[slot as usize]);
        self.by_seen.remove(&(p.seen_ns, key));
        if let Some((ts, _)) = p.exited {
            self.exits.remove(&(ts, key));
        }
        self.free.push(slot);
        self.live -= 1;
    }

    /// Room for one more: the oldest exited process goes first, else the least recently seen.
    fn make_room(&mut self) {
        while self.live >= self.max {
            let victim = self
                .exits
                .first()
                .or_else(|| self.by_seen.first())
                .map(|(_, k)| *k);
            let Some(key) = victim else { return };
            self.remove(key);
            self.evicted += 1;
        }
    }

    /// A slot for a new process `key`, filled with what is known of it so far.
    fn insert(&mut self, key: ProcessKey) -> Slot {
        self.make_room();
        let fresh = Process {
            pid: key.0,
            start_ticks: key.1,
            ..Process::default()
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = fresh;
                slot
            }
            None => {
                self.slots.push(fresh);
                (self.slots.len() - 1) as Slot
            }
        };
        self.by_pid
            .entry(key.0)
            .and_modify(|s| s.add(key.1, slot))
            .or_insert(Starts::One((key.1, slot)));
        self.live += 1;
        slot
    }

    fn upsert(&mut self, key: ProcessKey, seen_ns: u64, fill: impl FnOnce(&mut Process, bool)) {
        let (slot, fresh) = match self.slot_of(key) {
            Some(slot) => (slot, false),
            None => (self.insert(key), true),
        };
        let p = &mut self.slots[slot as usize];
        let seen_before = p.seen_ns;
        fill(p, fresh);
        p.seen_ns = seen_before.max(seen_ns).max(p.seen_ns);
        let seen_now = p.seen_ns;
        if !fresh {
            if seen_now == seen_before {
                return;
            }
            self.by_seen.remove(&(seen_before, key));
        }
        self.by_seen.insert((seen_now, key));
    }

    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Exec { process, .. } => {
                let key = (process.pid, process.start_ticks);
                self.upsert(key, process.seen_ns, |p, _| {
                    let exited = p.exited;
                    let before = if !p.exe.is_empty() && p.exe != process.exe {
                        Some(Box::new((process.seen_ns, std::mem::take(&mut p.exe))))
                    } else {
                        p.program_before.take()
                    };
                    *p = Process {
                        exited,
                        program_before: before,
                        ..process
                    };
                });
            }
            Event::Fork { process } => {
                let key = (process.pid, process.start_ticks);
                // The child runs its parent's program until it execs.
                let parent = (process.ppid, process.parent_start_ticks);
                let inherited = self
                    .get(parent)
                    .map(|pp| (pp.exe.clone(), pp.args.clone(), pp.cgroup.clone()));
                self.upsert(key, process.seen_ns, |p, fresh| {
                    if fresh || p.exe.is_empty() {
                        let exited = p.exited;
                        *p = Process { exited, ..process };
                        if let Some((exe, args, cgroup)) = inherited {
                            p.exe = exe;
                            p.args = args;
                            if p.cgroup.is_none() {
                                p.cgroup = cgroup;
                            }
                        }
                    }
                });
            }
            Event::Exit {
                pid,
                start_ticks,
                ts_ns,
                code,
            } => {
                let key = (pid, start_ticks);
                let old = self.get(key).and_then(|p| p.exited);
                if let Some((ts, _)) = old {
                    self.exits.remove(&(ts, key));
                }
                self.upsert(key, ts_ns, |p, _| p.exited = Some((ts_ns, code)));
                self.exits.insert((ts_ns, key));
            }
        }
    }

    /// Drops processes that exited more than the grace period before `now_ns`.
    pub fn expire(&mut self, now_ns: u64) -> usize {
        let due: Vec<ProcessKey> = self
            .exits
            .iter()
            .take_while(|(ts, _)| now_ns.saturating_sub(*ts) > self.grace_ns)
            .map(|(_, k)| *k)
            .collect();
        for key in &due {
            self.remove(*key);
        }
        self.expired += due.len() as u64;
        due.len()
    }

    /// The newest process with `pid`.
    pub fn by_pid(&self, pid: u32) -> Option<&Process> {
        let (_, slot) = self.by_pid.get(&pid)?.as_slice().iter().max()?;
        self.slots.get(*slot as usize)
    }

    pub fn get(&self, key: ProcessKey) -> Option<&Process> {
        self.slots.get(self.slot_of(key)? as usize)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Process> {
        self.by_pid
            .values()
            .flat_map(|s| s.as_slice())
            .map(|(_, slot)| &self.slots[*slot as usize])
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.live,
            exited: self.exits.len(),
            evicted: self.evicted,
            expired: self.expired,
        }
    }
}

/// The pod and container of a cgroup path, as the kubelet lays them out (cgroupfs:
/// `/kubepods/burstable/pod<uid>/<id>`; systemd: `.../kubepods-burstable-pod<uid with _>.slice/
/// cri-containerd-<id>.scope`, also `docker-` and `crio-`).
pub fn workload_of(cgroup: &str) -> Workload {
    let mut w = Workload::default();
    let parts: Vec<&str> = cgroup.split('/').filter(|p| !p.is_empty()).collect();
    let Some(at) = parts.iter().position(|p| p.contains("kubepods")) else {
        return w;
    };
    for (i, part) in parts.iter().enumerate().skip(at) {
        let name = part.strip_suffix(".slice").unwrap_or(part);
        if let Some(pos) = name.rfind("pod")
            && w.pod_uid.is_none()
        {
            let uid = &name[pos + 3..];
            if uid.len() >= 32
                && uid
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
            {
                w.pod_uid = Some(uid.replace('_', "-").into());
                // The container is the next level, if there is one.
                if let Some(next) = parts.get(i + 1) {
                    let id = next.strip_suffix(".scope").unwrap_or(next);
                    let id = id.rsplit(['-', ':']).next().unwrap_or(id);
                    if id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit()) {
                        w.container_id = Some(id.into());
                    }
                }
            }
        }
    }
    w
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Boot-clock nanoseconds to clock ticks.
pub fn ticks_of_ns(ns: u64, ticks_per_second: u64) -> u64 {
    ns / (1_000_000_000 / ticks_per_second.max(1))
}

/// `/proc/<pid>/stat`: (ppid, start in ticks, comm). The comm may hold spaces and parentheses:
/// the fields follow the last `)`.
pub fn parse_stat(stat: &str) -> Option<(u32, u64, String)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the comm: state (3), ppid (4), ..., starttime (22).
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, start, comm))
}

/// The processes of `/proc` (those that existed before the daemon started), bounded by `max`.
pub fn walk_proc(proc: &Path, max: usize) -> Vec<Process> {
    let Ok(dir) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        if out.len() >= max {
            break;
        }
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let base = entry.path();
        let Some((ppid, start_ticks, comm)) = std::fs::read_to_string(base.join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        else {
            // Gone meanwhile.
            continue;
        };
        let args = std::fs::read(base.join("cmdline"))
            .map(|b| Args::from_nul_separated(&b))
            .unwrap_or_default();
        let exe = std::fs::read_link(base.join("exe"))
            .map(|p| Arc::from(p.display().to_string()))
            .unwrap_or_default();
        let uid = std::fs::read_to_string(base.join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().next())
                    .and_then(|u| u.parse().ok())
            })
            .unwrap_or(0);
        let cgroup = std::fs::read_to_string(base.join("cgroup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .map(Cgroup::new)
            });
        let parent_start_ticks = std::fs::read_to_string(proc.join(ppid.to_string()).join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
            .map(|(_, s, _)| s)
            .unwrap_or(0);
        out.push(Process {
            pid,
            start_ticks,
            ppid,
            parent_start_ticks,
            exe,
            args,
            comm: comm.into(),
            uid,
            cgroup_id: 0,
            cgroup,
            exited: None,
            seen_ns: 0,
            from_proc: true,
            program_before: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: u32, start: u64, exe: &str, seen: u64) -> Process {
        Process {
            pid,
            start_ticks: start,
            ppid: 1,
            parent_start_ticks: 1,
            exe: exe.into(),
            args: [exe, "-x"].into_iter().collect(),
            comm: "c".into(),
            seen_ns: seen,
            ..Process::default()
        }
    }

    #[test]
    fn out_of_order_events_resolve_and_exits_expire_after_the_grace() {
        let mut c = ProcessCache::new(100, 10);
        // Exit first, then the exec that preceded it: one entry, the exec's, exited.
        c.apply(Event::Exit {
            pid: 7,
            start_ticks: 50,
            ts_ns: 100,
            code: 3,
        });
        c.apply(Event::Exec {
            process: proc(7, 50, "/bin/true", 90),
            verdict: None,
        });
        let p = c.get((7, 50)).unwrap();
        assert_eq!(&*p.exe, "/bin/true");
        assert_eq!(p.exited, Some((100, 3)));
        // A fork arriving after its exec does not overwrite what the exec said.
        c.apply(Event::Fork {
            process: proc(7, 50, "", 80),
        });
        assert_eq!(&*c.get((7, 50)).unwrap().exe, "/bin/true");
        assert_eq!(c.expire(105), 0, "still within the grace");
        assert_eq!(c.expire(111), 1);
        assert!(c.get((7, 50)).is_none());
        assert!(c.by_pid(7).is_none());
        assert_eq!(c.stats().expired, 1);
    }

    #[test]
    fn a_connect_made_before_an_exec_in_the_same_pid_is_the_earlier_programs() {
        let mut c = ProcessCache::new(100, 10);
        c.apply(Event::Exec {
            process: proc(20, 3, "/bin/bash", 100),
            verdict: None,
        });
        // bash connects at 150, then execs sleep in its own pid at 200.
        c.apply(Event::Exec {
            process: proc(20, 3, "/usr/bin/sleep", 200),
            verdict: None,
        });
        let p = c.get((20, 3)).unwrap();
        assert_eq!(&*p.exe, "/usr/bin/sleep");
        assert_eq!(&**p.exe_at(150), "/bin/bash");
        assert_eq!(&**p.exe_at(200), "/usr/bin/sleep");
        assert_eq!(&**p.exe_at(250), "/usr/bin/sleep");
        // An exec of the same program keeps what it ran before.
        c.apply(Event::Exec {
            process: proc(20, 3, "/usr/bin/sleep", 300),
            verdict: None,
        });
        assert_eq!(&**c.get((20, 3)).unwrap().exe_at(150), "/bin/bash");
    }

    #[test]
    fn a_fork_inherits_its_parents_program_and_pids_are_reused() {
        let mut c = ProcessCache::new(100, 10);
        let mut parent = proc(10, 5, "/usr/bin/bash", 1);
        parent.cgroup = Some(Cgroup::new("/test"));
        c.apply(Event::Exec {
            process: parent,
            verdict: None,
        });
        let mut child = proc(11, 9, "", 2);
        child.ppid = 10;
        child.parent_start_ticks = 5;
        child.args = Args::default();
        c.apply(Event::Fork { process: child });
        let p = c.by_pid(11).unwrap();
        assert_eq!((&*p.exe, p.cgroup_path()), ("/usr/bin/bash", Some("/test")));
        // Pid 11 again, later: the newer one answers by pid, the older stays by key.
        c.apply(Event::Exec {
            process: proc(11, 20, "/bin/sleep", 3),
            verdict: None,
        });
        assert_eq!(&*c.by_pid(11).unwrap().exe, "/bin/sleep");
        assert_eq!(&*c.get((11, 9)).unwrap().exe, "/usr/bin/bash");
    }

    #[test]
    fn the_cache_is_bounded_exited_processes_first() {
        let mut c = ProcessCache::new(3, 1_000);
        for pid in 1..=3 {
            c.apply(Event::Exec {
                process: proc(pid, 1, "/bin/x", u64::from(pid)),
                verdict: None,
            });
        }
        c.apply(Event::Exit {
            pid: 3,
            start_ticks: 1,
            ts_ns: 10,
            code: 0,
        });
        c.apply(Event::Exec {
            process: proc(4, 1, "/bin/y", 20),
            verdict: None,
        });
        assert!(c.get((3, 1)).is_none(), "the exited one went first");
        c.apply(Event::Exec {
            process: proc(5, 1, "/bin/z", 21),
            verdict: None,
        });
        assert!(c.get((1, 1)).is_none(), "then the least recently seen");
        assert_eq!(c.stats().entries, 3);
        assert_eq!(c.stats().evicted, 2);
    }

    #[test]
    fn pods_and_containers_from_cgroup_paths() {
        let uid = "0f6e37b8-8f0f-4c8e-9a5b-1c2d3e4f5a6b";
        let cid = "4b8d1f0c2e3a5b6c7d8e9f00112233445566778899aabbccddeeff0011223344";
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
             cri-containerd-{cid}.scope",
            uid.replace('-', "_")
        );
        let want = Workload {
            pod_uid: Some(uid.into()),
            container_id: Some(cid.into()),
        };
        assert_eq!(workload_of(&systemd), want);
        assert_eq!(
            workload_of(&format!("/kubepods/besteffort/pod{uid}/{cid}")),
            want
        );
        assert_eq!(
            workload_of(&format!(
                "/kubepods.slice/kubepods-pod{}.slice",
                uid.replace('-', "_")
            )),
            Workload {
                pod_uid: Some(uid.into()),
                container_id: None
            }
        );
        assert_eq!(
            workload_of("/user.slice/user-0.slice/session-1.scope"),
            Workload::default()
        );
        assert_eq!(workload_of("/kubepods/podnot-a-uid/x"), Workload::default());
    }

    #[test]
    fn arguments_are_one_string_split_at_nuls() {
        let a = Args::from_nul_separated(b"python3\0-m\0\0http.server\0");
        assert_eq!(a.to_vec(), ["python3", "-m", "http.server"]);
        assert_eq!((a.len(), a.is_empty()), (3, false));
        assert_eq!(a, ["python3", "-m", "http.server"].into_iter().collect());
        assert_eq!(format!("{a:?}"), r#"["python3", "-m", "http.server"]"#);
        // A cut-short last argument, and invalid UTF-8, as the kernel may hand them over.
        assert_eq!(
            Args::from_nul_separated(b"sh\0-c\0ech\xff").to_vec(),
            ["sh", "-c", "ech\u{fffd}"]
        );
        for empty in [&b""[..], b"\0", b"\0\0\0"] {
            let a = Args::from_nul_separated(empty);
            assert!(a.is_empty() && a.iter().count() == 0 && a == Args::default());
        }
    }

    #[test]
    fn a_pids_starts_follow_its_processes_in_and_out_of_the_cache() {
        let mut c = ProcessCache::new(100, 10);
        for (start, seen) in [(1, 1), (2, 2), (3, 3)] {
            c.apply(Event::Exec {
                process: proc(9, start, &format!("/bin/s{start}"), seen),
                verdict: None,
            });
        }
        assert_eq!(&*c.by_pid(9).unwrap().exe, "/bin/s3");
        for (start, ts, newest) in [
            (3, 10, Some("/bin/s2")),
            (1, 11, Some("/bin/s2")),
            (2, 12, None),
        ] {
            c.apply(Event::Exit {
                pid: 9,
                start_ticks: start,
                ts_ns: ts,
                code: 0,
            });
            c.expire(ts + 11);
            assert_eq!(
                c.by_pid(9).map(|p| &*p.exe),
                newest,
                "after start {start} went"
            );
        }
        assert!(c.by_pid.is_empty() && c.by_seen.is_empty() && c.exits.is_empty());
        assert_eq!((c.live, c.free.len(), c.iter().count()), (0, 3, 0));
    }

    /// The slab and its indexes against a plain list that does the same by scanning: random
    /// execs, forks and exits over few pids (reused), with a small bound and expiry.
    #[test]
    fn the_indexes_agree_with_a_plain_scan_under_churn() {
        let (max, grace) = (8, 50);
        let mut c = ProcessCache::new(max, grace);
        let mut model: Vec<Process> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for now in 1..4_000u64 {
            // Then fewer processes than the bound: exits stay until they expire.
            let key = if now < 2_000 {
                (next(6) as u32, 1 + next(3))
            } else {
                (next(3) as u32, 1 + next(2))
            };
            let pos = model.iter().position(|p| (p.pid, p.start_ticks) == key);
            if next(4) == 0 {
                c.apply(Event::Exit {
                    pid: key.0,
                    start_ticks: key.1,
                    ts_ns: now,
                    code: 1,
                });
                let i = pos.unwrap_or_else(|| {
                    model_make_room(&mut model, max);
                    model.push(proc(key.0, key.1, "", 0));
                    model.len() - 1
                });
                model[i].exited = Some((now, 1));
                model[i].seen_ns = model[i].seen_ns.max(now);
            } else {
                let exe = format!("/bin/p{}", next(3));
                c.apply(Event::Exec {
                    process: proc(key.0, key.1, &exe, now),
                    verdict: None,
                });
                let i = pos.unwrap_or_else(|| {
                    model_make_room(&mut model, max);
                    model.push(proc(key.0, key.1, "", 0));
                    model.len() - 1
                });
                model[i].exe = exe.into();
                model[i].seen_ns = now;
            }
            if now % 37 == 0 {
                c.expire(now);
                model.retain(|p| p.exited.is_none_or(|(ts, _)| now - ts <= grace));
            }
            assert_eq!(c.stats().entries, model.len(), "at {now}");
            assert_eq!(c.iter().count(), model.len());
            for p in &model {
                let got = c.get((p.pid, p.start_ticks)).expect("cached");
                assert_eq!((&got.exe, got.exited), (&p.exe, p.exited), "at {now}");
            }
            for pid in 0..6 {
                let newest = model
                    .iter()
                    .filter(|p| p.pid == pid)
                    .map(|p| p.start_ticks)
                    .max();
                assert_eq!(
                    c.by_pid(pid).map(|p| p.start_ticks),
                    newest,
                    "pid {pid} at {now}"
                );
            }
        }
        let stats = c.stats();
        assert!(stats.evicted > 0 && stats.expired > 0, "{stats:?}");
    }

    /// The model's eviction: the oldest exit first, else the least recently seen.
    fn model_make_room(model: &mut Vec<Process>, max: usize) {
        while model.len() >= max {
            let victim = model
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.exited.map(|(ts, _)| ((ts, p.pid, p.start_ticks), i)))
                .min()
                .or_else(|| {
                    model
                        .iter()
                        .enumerate()
                        .map(|(i, p)| ((p.seen_ns, p.pid, p.start_ticks), i))
                        .min()
                })
                .map(|(_, i)| i)
                .expect("not empty");
            model.remove(victim);
        }
    }

    #[test]
    fn stat_lines_with_odd_commands() {
        let stat = "1234 (my (odd) cmd) S 42 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((42, 987654, "my (odd) cmd".into())));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(ticks_of_ns(1_500_000_000, 100), 150);
    }

    #[test]
    fn the_proc_walk_finds_this_process() {
        let me = std::process::id();
        let found = walk_proc(Path::new("/proc"), 100_000);
        let p = found
            .iter()
            .find(|p| p.pid == me)
            .expect("this test's process");
        assert!(p.from_proc);
        assert!(!p.args.is_empty());
        assert!(p.start_ticks > 0);
    }
}
