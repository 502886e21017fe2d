//! BTF tracepoints that follow processes: `sched_process_exec`, `sched_process_fork` and
//! `sched_process_exit`. Each sends one `ProcessEvent` to `TRACE_EVENTS` (a ring buffer),
//! behind a per-CPU token bucket.
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
        bpf_get_current_cgroup_id, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
        bpf_probe_read_kernel, generated,
    },
    macros::{btf_tracepoint, map},
    maps::{PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use bpf_common::{
    policy::RateBucket,
    trace::{
        DEFAULT_EVENT_RATE, EVENT_EXEC, EVENT_EXIT, EVENT_FORK, MAX_ARGS, MAX_FILENAME,
        ProcessEvent, RING_BYTES, reason,
    },
};
use bpf_lib::{event::rate_allows, global};

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

#[map(name = "TRACE_EVENTS")]
static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map(name = "TRACE_SCRATCH")]
static TRACE_SCRATCH: PerCpuArray<ProcessEvent> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "TRACE_REASONS")]
static TRACE_REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

#[map(name = "TRACE_RATE")]
static TRACE_RATE: PerCpuArray<RateBucket> = PerCpuArray::with_max_entries(1, 0);

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
    TRACE_EVENTS
        .output::<ProcessEvent>(e, 0)
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
    send(e)
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
