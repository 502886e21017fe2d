//! BTF tracepoints that follow processes: `sched_process_exec`, `sched_process_fork` and
//! `sched_process_exit`. Each sends one `ProcessEvent` to `TRACE_EVENTS` (a ring buffer),
//! behind a per-CPU token bucket.
//!
//! Connections are attributed through `inet_sock_set_state`: the process that moves a TCP
//! socket to SYN_SENT (inside its `connect()`) is kept by socket address in `TRACE_PENDING`,
//! and when the handshake ends (often in softirq, another task current) one `ConnectEvent`
//! with the socket's final addresses and ports goes to `TRACE_CONNECTS`.
//!
//! Enforcement (off unless `ENFORCE_MODE` is set), on hooks this kernel loads (BPF-LSM and
//! fentry programs are refused here):
//! - exec: `trace_exec` looks the executed file's inode up in `EXEC_DENY` when the process's
//!   cgroup or one of its ancestors is in `ENFORCED_CGROUPS` (or host-wide, configured
//!   explicitly); denied, the process gets SIGKILL before its new program runs an
//!   instruction (the tracepoint fires after the point of no return of execve);
//! - connect: `enforce_connect4`/`enforce_connect6`, cgroup `connect` hooks attached only to
//!   the configured cgroups, look the destination up in `CONNECT_DENY` (an LPM trie of port
//!   and address) and refuse with `EPERM`.
//!
//! Audit mode reports the same matches and denies nothing.
//!
//! - aya does no CO-RE relocation: every kernel struct field is read at an offset the daemon
//!   found in the kernel's BTF and set as a `.rodata` global (`bpf_common::trace::globals`).
//!   The reads go through `bpf_probe_read_kernel`, so a wrong offset gives a wrong value or a
//!   failed read (counted, nothing sent), never a verifier refusal at start.
//! - Threads are not processes: a fork or an exit of a thread (pid != tgid) sends nothing.
//! - The event is assembled in a per-CPU scratch slot (840 bytes do not fit the stack).
//! - The argument vector is one bounded copy of the new process's `arg_start..arg_end`.
//! - Every call counts exactly one reason, and every program returns 0 (tracing only).
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel, generated,
    },
    macros::{btf_tracepoint, cgroup_sock_addr, map},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{BtfTracePointContext, SockAddrContext},
};
use bpf_common::{
    policy::RateBucket,
    trace::{
        CONNECT_CHECKED, CONNECT_ESTABLISHED, CONNECT_FAILED, CONNECT_RING_BYTES,
        CONNECT_RING_WAKE_BYTES, ConnectEvent, ConnectRuleData, DEFAULT_EVENT_RATE, ENFORCE_DENY,
        ENFORCE_OFF, EVENT_EXEC, EVENT_EXIT, EVENT_FORK, ExecRuleKey, FAMILY_INET, FAMILY_INET6,
        MAX_ARGS, MAX_ENFORCED_CGROUPS, MAX_FILENAME, MAX_RULES, PENDING_CONNECTS,
        PROCESS_EVENT_BEFORE_ARGS, PROCESS_EVENT_HEADER, PendingConnect, ProcessEvent, RING_BYTES,
        RING_WAKE_BYTES, VERDICT_AUDITED, VERDICT_DENIED, VERDICT_NONE, reason,
    },
};
use bpf_lib::{
    event::{rate_allows, wake_flags},
    global,
};

#[unsafe(no_mangle)]
static EVENT_RATE: u64 = DEFAULT_EVENT_RATE;

// Field offsets, set by the daemon from the kernel's BTF (the defaults mean nothing).
#[unsafe(no_mangle)]
static OFF_TASK_PID: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_TGID: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_REAL_PARENT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_GROUP_LEADER: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_START_BOOTTIME: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_MM: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_COMM: u32 = 0;
#[unsafe(no_mangle)]
static OFF_TASK_EXIT_CODE: u32 = 0;
#[unsafe(no_mangle)]
static OFF_MM_ARG_START: u32 = 0;
#[unsafe(no_mangle)]
static OFF_MM_ARG_END: u32 = 0;
#[unsafe(no_mangle)]
static OFF_BPRM_FILENAME: u32 = 0;
#[unsafe(no_mangle)]
static OFF_BPRM_FILE: u32 = 0;
#[unsafe(no_mangle)]
static OFF_FILE_INODE: u32 = 0;
#[unsafe(no_mangle)]
static OFF_INODE_INO: u32 = 0;
#[unsafe(no_mangle)]
static OFF_INODE_SB: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SB_DEV: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_PROTOCOL: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_FAMILY: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_RCV_SADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_V6_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_V6_RCV_SADDR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_DPORT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_NUM: u32 = 0;

#[unsafe(no_mangle)]
static ENFORCE_MODE: u32 = ENFORCE_OFF;
#[unsafe(no_mangle)]
static ENFORCE_HOST_WIDE: u32 = 0;

#[map(name = "TRACE_EVENTS")]
static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map(name = "TRACE_SCRATCH")]
static TRACE_SCRATCH: PerCpuArray<ProcessEvent> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "TRACE_REASONS")]
static TRACE_REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

#[map(name = "TRACE_RATE")]
static TRACE_RATE: PerCpuArray<RateBucket> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "TRACE_CONNECTS")]
static TRACE_CONNECTS: RingBuf = RingBuf::with_byte_size(CONNECT_RING_BYTES, 0);

#[map(name = "TRACE_CONNECT_RATE")]
static TRACE_CONNECT_RATE: PerCpuArray<RateBucket> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "TRACE_PENDING")]
static TRACE_PENDING: LruHashMap<u64, PendingConnect> =
    LruHashMap::with_max_entries(PENDING_CONNECTS, 0);

#[map(name = "ENFORCED_CGROUPS")]
static ENFORCED_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_ENFORCED_CGROUPS, 0);

#[map(name = "EXEC_DENY")]
static EXEC_DENY: HashMap<ExecRuleKey, u32> = HashMap::with_max_entries(MAX_RULES, 0);

#[map(name = "CONNECT_DENY")]
static CONNECT_DENY: LpmTrie<ConnectRuleData, u32> = LpmTrie::with_max_entries(MAX_RULES, 0);

#[map(name = "RULE_HITS")]
static RULE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_RULES, 0);

/// Cgroup levels above the current one searched for an enforced cgroup.
const ENFORCED_DEPTH: i32 = 16;

const SIGKILL: u32 = 9;
const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
// include/net/tcp_states.h
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;

#[inline(always)]
fn count(reason: u32) {
    bpf_lib::count::count_reason(&TRACE_REASONS, reason);
}

/// Why an event was not sent (each counted under its reason).
enum Skip {
    Thread,
    ReadFailed,
    RateLimited,
    Lost,
}

impl Skip {
    fn reason(&self) -> u32 {
        match self {
            Skip::Thread => reason::THREAD_SKIPPED,
            Skip::ReadFailed => reason::READ_FAILED,
            Skip::RateLimited => reason::RATE_LIMITED,
            Skip::Lost => reason::LOST,
        }
    }
}

/// A field of a kernel struct at `base + off`.
#[inline(always)]
fn field<T>(base: *const u8, off: &'static u32) -> Result<T, Skip> {
    // SAFETY: a probe read of kernel memory: a bad address fails, it does not fault.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(global(off) as usize).cast::<T>()) }
        .map_err(|_| Skip::ReadFailed)
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn trace_exec(ctx: BtfTracePointContext) -> i32 {
    finish(try_exec(&ctx), reason::EXEC_SENT);
    0
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn trace_fork(ctx: BtfTracePointContext) -> i32 {
    finish(try_fork(&ctx), reason::FORK_SENT);
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn trace_exit(ctx: BtfTracePointContext) -> i32 {
    finish(try_exit(&ctx), reason::EXIT_SENT);
    0
}

#[inline(always)]
fn finish(result: Result<(), Skip>, sent: u32) {
    match result {
        Ok(()) => count(sent),
        Err(skip) => count(skip.reason()),
    }
}

/// The scratch event, its header filled from `task` (a process leader) for `kind`.
#[inline(always)]
fn start_event(kind: u8, task: *const u8) -> Result<&'static mut ProcessEvent, Skip> {
    let pid: u32 = field(task, &OFF_TASK_TGID)?;
    let parent: *const u8 = field(task, &OFF_TASK_REAL_PARENT)?;
    let parent_leader: *const u8 = field(parent, &OFF_TASK_GROUP_LEADER)?;
    let leader: *const u8 = field(task, &OFF_TASK_GROUP_LEADER)?;
    let e = TRACE_SCRATCH.get_ptr_mut(0).ok_or(Skip::Lost)?;
    // SAFETY: this CPU's slot; a tracepoint program is not migrated while it runs.
    let e = unsafe { &mut *e };
    e.kind = kind;
    e.verdict = VERDICT_NONE;
    e.rule = 0;
    e.ts_ns = bpf_ktime_get_boot_ns_safe();
    e.pid = pid;
    e.ppid = field(parent, &OFF_TASK_TGID)?;
    e.start_ns = field(leader, &OFF_TASK_START_BOOTTIME)?;
    e.parent_start_ns = field(parent_leader, &OFF_TASK_START_BOOTTIME)?;
    // SAFETY: no preconditions.
    e.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    e.uid = bpf_get_current_uid_gid() as u32;
    e.exit_code = 0;
    e.filename_len = 0;
    e.args_len = 0;
    e.comm = field(task, &OFF_TASK_COMM)?;
    Ok(e)
}

#[inline(always)]
fn bpf_ktime_get_boot_ns_safe() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Sends `e` within the rate.
#[inline(always)]
fn send(e: &ProcessEvent) -> Result<(), Skip> {
    if !rate_allows(&TRACE_RATE, global(&EVENT_RATE), e.ts_ns) {
        return Err(Skip::RateLimited);
    }
    // Only the bytes the event fills: a fork or an exit is its header (72 bytes, not 840),
    // an exec stops after its arguments. The bound is a branch the verifier follows.
    let len = if e.kind == EVENT_EXEC {
        let args = u64::from(e.args_len);
        let args = if args > MAX_ARGS as u64 {
            MAX_ARGS as u64
        } else {
            args
        };
        PROCESS_EVENT_BEFORE_ARGS + args as usize
    } else {
        PROCESS_EVENT_HEADER
    };
    // SAFETY: `len` is at most the event's size, so the bytes are the event's own.
    let bytes =
        unsafe { core::slice::from_raw_parts((e as *const ProcessEvent).cast::<u8>(), len) };
    TRACE_EVENTS
        .output::<[u8]>(
            bytes,
            wake_flags(&TRACE_EVENTS, len as u64, RING_WAKE_BYTES),
        )
        .map_err(|_| Skip::Lost)
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`:
/// `p` is the process, now running its new program.
fn try_exec(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    // The tracepoint's arguments, as its prototype gives them.
    let (task, bprm): (*const u8, *const u8) = (ctx.arg(0), ctx.arg(2));
    let e = start_event(EVENT_EXEC, task)?;
    let filename: *const u8 = field(bprm, &OFF_BPRM_FILENAME)?;
    // SAFETY: a probe read into the event's own buffer, bounded by its size.
    let n = unsafe {
        generated::bpf_probe_read_kernel_str(
            e.filename.as_mut_ptr().cast(),
            MAX_FILENAME as u32,
            filename.cast(),
        )
    };
    // The length with its NUL; 0 or less: nothing read.
    e.filename_len = if n > 1 { (n - 1) as u16 } else { 0 };
    let mm: *const u8 = field(task, &OFF_TASK_MM)?;
    let arg_start: u64 = field(mm, &OFF_MM_ARG_START)?;
    let arg_end: u64 = field(mm, &OFF_MM_ARG_END)?;
    let len = arg_end.saturating_sub(arg_start);
    if len > 0 {
        // 1..=MAX_ARGS in a form the verifier follows (a mask, then +1).
        let len = ((len.min(MAX_ARGS as u64) - 1) & (MAX_ARGS as u64 - 1)) + 1;
        // SAFETY: a probe read of the new program's argument area into the event's buffer,
        // bounded by its size.
        let read = unsafe {
            generated::bpf_probe_read_user(
                e.args.as_mut_ptr().cast(),
                len as u32,
                arg_start as *const core::ffi::c_void,
            )
        };
        if read == 0 {
            e.args_len = len as u16;
        }
    }
    // Before the rate limit: a denied exec is killed whether or not its event is sent.
    enforce_exec(e, bprm)?;
    send(e)
}

/// Whether exec rules apply to the current task: host-wide, or its cgroup or an ancestor
/// enforced.
#[inline(always)]
fn exec_rules_apply(cgroup_id: u64) -> bool {
    if global(&ENFORCE_HOST_WIDE) == 1 {
        return true;
    }
    if ENFORCED_CGROUPS.get_ptr(cgroup_id).is_some() {
        return true;
    }
    for level in 1..ENFORCED_DEPTH {
        // SAFETY: no preconditions; 0 above the cgroup's own depth.
        let id = unsafe { generated::bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        if ENFORCED_CGROUPS.get_ptr(id).is_some() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn hit(rule: u32) {
    if let Some(n) = RULE_HITS.get_ptr_mut(rule) {
        // SAFETY: this CPU's slot.
        unsafe { *n += 1 };
    }
}

/// Applies the exec rules to the program `bprm` runs, recording the verdict in `e`.
#[inline(always)]
fn enforce_exec(e: &mut ProcessEvent, bprm: *const u8) -> Result<(), Skip> {
    let mode = global(&ENFORCE_MODE);
    if mode == ENFORCE_OFF || !exec_rules_apply(e.cgroup_id) {
        return Ok(());
    }
    // The file executed (for a script: its interpreter, the program that runs).
    let file: *const u8 = field(bprm, &OFF_BPRM_FILE)?;
    let inode: *const u8 = field(file, &OFF_FILE_INODE)?;
    let sb: *const u8 = field(inode, &OFF_INODE_SB)?;
    let key = ExecRuleKey {
        ino: field(inode, &OFF_INODE_INO)?,
        dev: field(sb, &OFF_SB_DEV)?,
        _pad: 0,
    };
    // SAFETY: a hash map read; the value is copied out at once.
    let Some(rule) = (unsafe { EXEC_DENY.get(key) }).copied() else {
        return Ok(());
    };
    hit(rule);
    e.rule = rule as u16;
    if mode != ENFORCE_DENY {
        e.verdict = VERDICT_AUDITED;
        count(reason::EXEC_AUDITED);
        return Ok(());
    }
    // SAFETY: signals the current task, the process that just exec'ed.
    if unsafe { generated::bpf_send_signal(SIGKILL) } == 0 {
        e.verdict = VERDICT_DENIED;
        count(reason::EXEC_DENIED);
    } else {
        count(reason::SIGNAL_FAILED);
    }
    Ok(())
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn trace_sock_state(ctx: BtfTracePointContext) -> i32 {
    let why = match try_sock_state(&ctx) {
        Ok(why) => why,
        Err(skip) => skip.reason(),
    };
    count(why);
    0
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`.
fn try_sock_state(ctx: &BtfTracePointContext) -> Result<u32, Skip> {
    let (sk, old, new): (*const u8, i32, i32) = (ctx.arg(0), ctx.arg(1), ctx.arg(2));
    let starting = old == TCP_CLOSE && new == TCP_SYN_SENT;
    let ending = old == TCP_SYN_SENT && (new == TCP_ESTABLISHED || new == TCP_CLOSE);
    if !starting && !ending {
        return Ok(reason::STATE_IGNORED);
    }
    let protocol: u16 = field(sk, &OFF_SK_PROTOCOL)?;
    if protocol != IPPROTO_TCP {
        return Ok(reason::STATE_IGNORED);
    }
    let key = sk as u64;
    if starting {
        // In the connecting process's connect(): it is current.
        // SAFETY: no preconditions.
        let task = unsafe { generated::bpf_get_current_task() } as *const u8;
        let leader: *const u8 = field(task, &OFF_TASK_GROUP_LEADER)?;
        let pending = PendingConnect {
            start_ns: field(leader, &OFF_TASK_START_BOOTTIME)?,
            // SAFETY: no preconditions.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            uid: bpf_get_current_uid_gid() as u32,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        };
        TRACE_PENDING
            .insert(key, pending, 0)
            .map_err(|_| Skip::Lost)?;
        return Ok(reason::CONNECT_STARTED);
    }
    // SAFETY: a hash map read; the value is copied out at once.
    let Some(p) = (unsafe { TRACE_PENDING.get(key) }).copied() else {
        return Ok(reason::CONNECT_UNSEEN);
    };
    let _ = TRACE_PENDING.remove(key);
    let family: u16 = field(sk, &OFF_SK_FAMILY)?;
    let mut e = ConnectEvent {
        ts_ns: bpf_ktime_get_boot_ns_safe(),
        start_ns: p.start_ns,
        cgroup_id: p.cgroup_id,
        pid: p.pid,
        uid: p.uid,
        src: [0; 16],
        dst: [0; 16],
        src_port: field(sk, &OFF_SK_NUM)?,
        dst_port: u16::from_be(field(sk, &OFF_SK_DPORT)?),
        outcome: if new == TCP_ESTABLISHED {
            CONNECT_ESTABLISHED
        } else {
            CONNECT_FAILED
        },
        verdict: VERDICT_NONE,
        family: FAMILY_INET,
        protocol: IPPROTO_TCP as u8,
        rule: 0,
        _pad: [0; 6],
        comm: p.comm,
    };
    if family == AF_INET6 {
        e.family = FAMILY_INET6;
        e.src = field(sk, &OFF_SK_V6_RCV_SADDR)?;
        e.dst = field(sk, &OFF_SK_V6_DADDR)?;
    } else if family == AF_INET {
        let src: [u8; 4] = field(sk, &OFF_SK_RCV_SADDR)?;
        let dst: [u8; 4] = field(sk, &OFF_SK_DADDR)?;
        e.src = mapped(src);
        e.dst = mapped(dst);
    } else {
        return Ok(reason::STATE_IGNORED);
    }
    send_connect(&e)?;
    Ok(reason::CONNECT_SENT)
}

/// `a.b.c.d` as `::ffff:a.b.c.d`.
#[inline(always)]
fn mapped(v4: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12] = v4[0];
    out[13] = v4[1];
    out[14] = v4[2];
    out[15] = v4[3];
    out
}

#[inline(always)]
fn send_connect(e: &ConnectEvent) -> Result<(), Skip> {
    if !rate_allows(&TRACE_CONNECT_RATE, global(&EVENT_RATE), e.ts_ns) {
        return Err(Skip::RateLimited);
    }
    TRACE_CONNECTS
        .output::<ConnectEvent>(
            e,
            wake_flags(
                &TRACE_CONNECTS,
                core::mem::size_of::<ConnectEvent>() as u64,
                CONNECT_RING_WAKE_BYTES,
            ),
        )
        .map_err(|_| Skip::Lost)
}

/// Carry on with the connect.
const ALLOW: i32 = 1;
/// Refuse the connect (`EPERM`).
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn enforce_connect4(ctx: SockAddrContext) -> i32 {
    enforce_connect::<false>(&ctx)
}

/// IPv6 sockets, IPv4-mapped destinations included (they meet the IPv4 rules).
#[cgroup_sock_addr(connect6)]
pub fn enforce_connect6(ctx: SockAddrContext) -> i32 {
    enforce_connect::<true>(&ctx)
}

#[inline(always)]
fn enforce_connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let (verdict, why) = try_enforce_connect::<V6>(ctx);
    count(why);
    verdict
}

#[inline(always)]
fn try_enforce_connect<const V6: bool>(ctx: &SockAddrContext) -> (i32, u32) {
    let mode = global(&ENFORCE_MODE);
    if mode == ENFORCE_OFF {
        return (ALLOW, reason::CONNECT_ALLOWED);
    }
    // SAFETY: the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &*ctx.sock_addr };
    let addr = if V6 {
        let w = sa.user_ip6;
        let mut out = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        out
    } else {
        mapped(sa.user_ip4.to_ne_bytes())
    };
    // The port is in network order in the low 16 bits.
    let port_be = (sa.user_port as u16).to_ne_bytes();
    let exact = Key::new(144, ConnectRuleData { port_be, addr });
    let any = Key::new(
        144,
        ConnectRuleData {
            port_be: [0; 2],
            addr,
        },
    );
    let Some(rule) = CONNECT_DENY
        .get(&exact)
        .or_else(|| CONNECT_DENY.get(&any))
        .copied()
    else {
        return (ALLOW, reason::CONNECT_ALLOWED);
    };
    hit(rule);
    let denied = mode == ENFORCE_DENY;
    let pid_tgid = bpf_get_current_pid_tgid();
    let e = ConnectEvent {
        ts_ns: bpf_ktime_get_boot_ns_safe(),
        start_ns: 0,
        // SAFETY: no preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: (pid_tgid >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        src: [0; 16],
        dst: addr,
        src_port: 0,
        dst_port: u16::from_be_bytes(port_be),
        outcome: CONNECT_CHECKED,
        verdict: if denied {
            VERDICT_DENIED
        } else {
            VERDICT_AUDITED
        },
        family: if V6 { FAMILY_INET6 } else { FAMILY_INET },
        protocol: sa.protocol as u8,
        rule: rule as u16,
        _pad: [0; 6],
        comm: [0; 16],
    };
    // The verdict stands whether or not its report fits the rate and the ring.
    let _ = send_connect(&e);
    if denied {
        (REFUSE, reason::CONNECT_DENIED)
    } else {
        (ALLOW, reason::CONNECT_AUDITED)
    }
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`.
fn try_fork(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let child: *const u8 = ctx.arg(1);
    let (pid, tgid): (u32, u32) = (field(child, &OFF_TASK_PID)?, field(child, &OFF_TASK_TGID)?);
    if pid != tgid {
        return Err(Skip::Thread);
    }
    let e = start_event(EVENT_FORK, child)?;
    send(e)
}

/// `sched_process_exit(struct task_struct *p, ...)`: only the leader's exit ends a process
/// (decided on pid == tgid, not on the `group_dead` argument older kernels lack).
fn try_exit(ctx: &BtfTracePointContext) -> Result<(), Skip> {
    let task: *const u8 = ctx.arg(0);
    let (pid, tgid): (u32, u32) = (field(task, &OFF_TASK_PID)?, field(task, &OFF_TASK_TGID)?);
    if pid != tgid {
        return Err(Skip::Thread);
    }
    let exit_code: u32 = field(task, &OFF_TASK_EXIT_CODE)?;
    let e = start_event(EVENT_EXIT, task)?;
    e.exit_code = exit_code;
    send(e)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_kernel and the tracing program type are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
