//! ABI of the process tracer (`bpf-trace`): BTF tracepoints on exec, fork and exit that send
//! one `ProcessEvent` each to a ring buffer. aya does no CO-RE relocation, so the kernel
//! struct offsets the programs read are `.rodata` globals the daemon sets from the kernel's
//! BTF (`globals`).

/// `ProcessEvent::kind`.
pub const EVENT_EXEC: u8 = 1;
pub const EVENT_FORK: u8 = 2;
pub const EVENT_EXIT: u8 = 3;

/// Bytes of the executable's path kept (as the caller passed it to execve).
pub const MAX_FILENAME: usize = 256;
/// Bytes of the argument vector kept (NUL-separated, as in the process's memory). A power of
/// two: the programs bound the copy with a mask.
pub const MAX_ARGS: usize = 512;
const _: () = assert!(MAX_ARGS.is_power_of_two());

/// One process event.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessEvent {
    /// `bpf_ktime_get_boot_ns` at the event: the clock of `start_ns`.
    pub ts_ns: u64,
    /// The process's start (its leader's `start_boottime`): with `pid`, its key.
    pub start_ns: u64,
    /// The parent's start (its leader's `start_boottime`).
    pub parent_start_ns: u64,
    /// The cgroup v2 id of the task that ran the hook (for fork: the parent, which the child
    /// shares).
    pub cgroup_id: u64,
    /// Thread-group ids: the process and its parent.
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    /// `task_struct.exit_code` (exit only).
    pub exit_code: u32,
    /// `EVENT_*`.
    pub kind: u8,
    pub _pad: u8,
    /// Bytes of `filename` and of `args` filled (exec only).
    pub filename_len: u16,
    pub args_len: u16,
    pub _pad2: u16,
    pub comm: [u8; 16],
    pub filename: [u8; MAX_FILENAME],
    pub args: [u8; MAX_ARGS],
}
const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 840);

/// Bytes of the ring buffer: about 10,000 events.
pub const RING_BYTES: u32 = 8 << 20;
/// Default ceiling of events per second per CPU.
pub const DEFAULT_EVENT_RATE: u64 = 100_000;

/// Map names of the tracer.
pub mod map_names {
    /// Ring buffer of `ProcessEvent`.
    pub const EVENTS: &str = "TRACE_EVENTS";
    /// Per-CPU `ProcessEvent`, where an event is assembled (it does not fit the stack).
    pub const SCRATCH: &str = "TRACE_SCRATCH";
    /// Per-CPU `u64` per reason (`reason`).
    pub const REASONS: &str = "TRACE_REASONS";
    /// Per-CPU `RateBucket` of the event rate.
    pub const RATE_BUCKET: &str = "TRACE_RATE";
}

/// `.rodata` globals: the event rate, then byte offsets of kernel struct fields, read from
/// `/sys/kernel/btf/vmlinux` at start (`(struct, member path)` in `OFFSETS`).
pub mod globals {
    /// `u64`: events per second per CPU (0: none).
    pub const EVENT_RATE: &str = "EVENT_RATE";
    pub const TASK_PID: &str = "OFF_TASK_PID";
    pub const TASK_TGID: &str = "OFF_TASK_TGID";
    pub const TASK_REAL_PARENT: &str = "OFF_TASK_REAL_PARENT";
    pub const TASK_GROUP_LEADER: &str = "OFF_TASK_GROUP_LEADER";
    pub const TASK_START_BOOTTIME: &str = "OFF_TASK_START_BOOTTIME";
    pub const TASK_MM: &str = "OFF_TASK_MM";
    pub const TASK_COMM: &str = "OFF_TASK_COMM";
    pub const TASK_EXIT_CODE: &str = "OFF_TASK_EXIT_CODE";
    pub const MM_ARG_START: &str = "OFF_MM_ARG_START";
    pub const MM_ARG_END: &str = "OFF_MM_ARG_END";
    pub const BPRM_FILENAME: &str = "OFF_BPRM_FILENAME";

    /// Every offset global (`u32`), with the kernel struct and member it is the offset of.
    pub const OFFSETS: [(&str, &str, &[&str]); 11] = [
        (TASK_PID, "task_struct", &["pid"]),
        (TASK_TGID, "task_struct", &["tgid"]),
        (TASK_REAL_PARENT, "task_struct", &["real_parent"]),
        (TASK_GROUP_LEADER, "task_struct", &["group_leader"]),
        (TASK_START_BOOTTIME, "task_struct", &["start_boottime"]),
        (TASK_MM, "task_struct", &["mm"]),
        (TASK_COMM, "task_struct", &["comm"]),
        (TASK_EXIT_CODE, "task_struct", &["exit_code"]),
        (MM_ARG_START, "mm_struct", &["arg_start"]),
        (MM_ARG_END, "mm_struct", &["arg_end"]),
        (BPRM_FILENAME, "linux_binprm", &["filename"]),
    ];
}

/// Counters of the tracer (`TRACE_REASONS`): every hook call counts one.
pub mod reason {
    pub const EXEC_SENT: u32 = 0;
    pub const FORK_SENT: u32 = 1;
    pub const EXIT_SENT: u32 = 2;
    /// A fork or exit of a thread (not a process): nothing sent.
    pub const THREAD_SKIPPED: u32 = 3;
    /// Not sent: over the rate.
    pub const RATE_LIMITED: u32 = 4;
    /// Not sent: the ring buffer was full.
    pub const LOST: u32 = 5;
    /// Not sent: a kernel read failed (the event would be wrong).
    pub const READ_FAILED: u32 = 6;

    pub const COUNT: u32 = 7;

    pub const NAMES: [&str; COUNT as usize] = [
        "exec_sent",
        "fork_sent",
        "exit_sent",
        "thread_skipped",
        "rate_limited",
        "lost",
        "read_failed",
    ];
}
