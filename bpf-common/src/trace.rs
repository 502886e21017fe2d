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
    /// `VERDICT_*`: what an enforcement rule did to this exec (exec only).
    pub verdict: u8,
    /// Bytes of `filename` and of `args` filled (exec only).
    pub filename_len: u16,
    pub args_len: u16,
    /// The rule that matched (`verdict` not `VERDICT_NONE`).
    pub rule: u16,
    pub comm: [u8; 16],
    pub filename: [u8; MAX_FILENAME],
    pub args: [u8; MAX_ARGS],
}
const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 840);

/// Bytes of a `ProcessEvent` sent for a fork or an exit: everything before `filename`.
pub const PROCESS_EVENT_HEADER: usize = core::mem::offset_of!(ProcessEvent, filename);
/// Bytes of a `ProcessEvent` before `args`: an exec sends these and its `args_len` bytes of
/// arguments (a record is only as long as what it says: less memory to move per event).
pub const PROCESS_EVENT_BEFORE_ARGS: usize = core::mem::offset_of!(ProcessEvent, args);
const _: () = assert!(PROCESS_EVENT_HEADER == 72);

/// `ProcessEvent::verdict` and `ConnectEvent::verdict`: no rule matched.
pub const VERDICT_NONE: u8 = 0;
/// A rule matched in audit mode: reported, not denied.
pub const VERDICT_AUDITED: u8 = 1;
/// A rule matched and the operation was denied (exec: the new program killed before it ran
/// an instruction; connect: `EPERM`).
pub const VERDICT_DENIED: u8 = 2;

/// `ConnectEvent::outcome`: the TCP handshake completed.
pub const CONNECT_ESTABLISHED: u8 = 1;
/// The TCP connect failed (refused, reset or timed out) before it was established.
pub const CONNECT_FAILED: u8 = 2;
/// A connect seen by an enforcement hook (`verdict` says what happened to it).
pub const CONNECT_CHECKED: u8 = 3;

/// `ConnectEvent::family`.
pub const FAMILY_INET: u8 = 4;
pub const FAMILY_INET6: u8 = 6;

/// Who opened a connection, and to where.
///
/// - `CONNECT_ESTABLISHED` and `CONNECT_FAILED` come from the `inet_sock_set_state`
///   tracepoint: the process is the one that moved the socket to SYN_SENT (in its `connect()`),
///   the addresses and ports are the socket's once the kernel chose the source port.
/// - `CONNECT_CHECKED` comes from a cgroup `connect4`/`connect6` enforcement hook, before the
///   kernel picks a source: `src`, `src_port` and `start_ns` are zero there.
///
/// IPv4 addresses are IPv4-mapped (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectEvent {
    pub ts_ns: u64,
    /// The process's start (its leader's `start_boottime`), 0 when unknown.
    pub start_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub uid: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host order.
    pub src_port: u16,
    pub dst_port: u16,
    /// `CONNECT_*`.
    pub outcome: u8,
    /// `VERDICT_*` (`CONNECT_CHECKED` only).
    pub verdict: u8,
    /// `FAMILY_*` of the socket.
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// The rule that matched (`verdict` not `VERDICT_NONE`).
    pub rule: u16,
    pub _pad: [u8; 6],
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnectEvent>() == 96);

/// What the tracer keeps of a socket between its SYN_SENT (in the connecting process) and
/// the end of its handshake (often in softirq, where the process is not current).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingConnect {
    pub start_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub uid: u32,
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PendingConnect>() == 40);

/// Sockets between SYN_SENT and the end of their handshake (an LRU: a socket freed without a
/// state change only ages out).
pub const PENDING_CONNECTS: u32 = 65_536;

/// `EXEC_DENY` key: the executable file's inode, as the kernel sees it (`s_dev` in the
/// kernel's `MKDEV` encoding, major << 20 | minor).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ExecRuleKey {
    pub ino: u64,
    pub dev: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ExecRuleKey>() == 16);

/// `CONNECT_DENY` LPM key data after the prefix length: the destination port (network
/// order, 0: any port) then the IPv4-mapped or IPv6 address. A rule for a CIDR on one port has
/// the prefix length 16 + the address prefix (IPv4: 96 + its bits).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ConnectRuleData {
    pub port_be: [u8; 2],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnectRuleData>() == 18);

/// Enforcement rules at most (each counted in `RULE_HITS` by its index).
pub const MAX_RULES: u32 = 256;
/// Cgroups enforcement may be scoped to.
pub const MAX_ENFORCED_CGROUPS: u32 = 64;

/// `ENFORCE_MODE` global.
pub const ENFORCE_OFF: u32 = 0;
pub const ENFORCE_AUDIT: u32 = 1;
pub const ENFORCE_DENY: u32 = 2;

/// Bytes of the connect ring buffer.
pub const CONNECT_RING_BYTES: u32 = 4 << 20;

/// Bytes of the ring buffer: about 10,000 execs at their longest, 116,000 forks or exits.
pub const RING_BYTES: u32 = 8 << 20;
/// The tracer wakes its reader only each time another this much waits in the ring (an eighth
/// of it: `bpf_lib::event::wake_flags`); the reader also reads on a tick (100 ms), for what
/// waits below the mark. A wake-up per event
/// (a self-IPI, a VM exit on a guest) cost more than a fork's whole event.
pub const RING_WAKE_BYTES: u64 = RING_BYTES as u64 / 8;
pub const CONNECT_RING_WAKE_BYTES: u64 = CONNECT_RING_BYTES as u64 / 8;
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
    /// Ring buffer of `ConnectEvent`.
    pub const CONNECTS: &str = "TRACE_CONNECTS";
    /// Per-CPU `RateBucket` of the connect events.
    pub const CONNECT_RATE: &str = "TRACE_CONNECT_RATE";
    /// LRU hash: socket address (`u64`) -> `PendingConnect`.
    pub const PENDING: &str = "TRACE_PENDING";
    /// Hash: cgroup id (`u64`) -> `u8` 1, the cgroups exec rules apply in.
    pub const ENFORCED_CGROUPS: &str = "ENFORCED_CGROUPS";
    /// Hash: `ExecRuleKey` -> rule index (`u32`).
    pub const EXEC_DENY: &str = "EXEC_DENY";
    /// LPM trie: `ConnectRuleData` -> rule index (`u32`).
    pub const CONNECT_DENY: &str = "CONNECT_DENY";
    /// Per-CPU `u64` per rule index: matches.
    pub const RULE_HITS: &str = "RULE_HITS";
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
    pub const BPRM_FILE: &str = "OFF_BPRM_FILE";
    pub const FILE_INODE: &str = "OFF_FILE_INODE";
    pub const INODE_INO: &str = "OFF_INODE_INO";
    pub const INODE_SB: &str = "OFF_INODE_SB";
    pub const SB_DEV: &str = "OFF_SB_DEV";
    pub const SK_PROTOCOL: &str = "OFF_SK_PROTOCOL";
    pub const SK_FAMILY: &str = "OFF_SK_FAMILY";
    pub const SK_DADDR: &str = "OFF_SK_DADDR";
    pub const SK_RCV_SADDR: &str = "OFF_SK_RCV_SADDR";
    pub const SK_V6_DADDR: &str = "OFF_SK_V6_DADDR";
    pub const SK_V6_RCV_SADDR: &str = "OFF_SK_V6_RCV_SADDR";
    pub const SK_DPORT: &str = "OFF_SK_DPORT";
    pub const SK_NUM: &str = "OFF_SK_NUM";
    /// `u32` `ENFORCE_*`: what exec and connect rules do.
    pub const ENFORCE_MODE: &str = "ENFORCE_MODE";
    /// `u32` 1: exec rules apply in every cgroup (configured explicitly, never a default).
    pub const ENFORCE_HOST_WIDE: &str = "ENFORCE_HOST_WIDE";

    /// Every offset global (`u32`), with the kernel struct and member it is the offset of.
    pub const OFFSETS: [(&str, &str, &[&str]); 24] = [
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
        (BPRM_FILE, "linux_binprm", &["file"]),
        (FILE_INODE, "file", &["f_inode"]),
        (INODE_INO, "inode", &["i_ino"]),
        (INODE_SB, "inode", &["i_sb"]),
        (SB_DEV, "super_block", &["s_dev"]),
        (SK_PROTOCOL, "sock", &["sk_protocol"]),
        (SK_FAMILY, "sock", &["__sk_common", "skc_family"]),
        (SK_DADDR, "sock", &["__sk_common", "skc_daddr"]),
        (SK_RCV_SADDR, "sock", &["__sk_common", "skc_rcv_saddr"]),
        (SK_V6_DADDR, "sock", &["__sk_common", "skc_v6_daddr"]),
        (
            SK_V6_RCV_SADDR,
            "sock",
            &["__sk_common", "skc_v6_rcv_saddr"],
        ),
        (SK_DPORT, "sock", &["__sk_common", "skc_dport"]),
        (SK_NUM, "sock", &["__sk_common", "skc_num"]),
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
    /// A connect event sent (established or failed).
    pub const CONNECT_SENT: u32 = 7;
    /// A TCP socket left SYN_SENT without the tracer having seen it enter it (opened before
    /// the module started, or evicted): nothing sent.
    pub const CONNECT_UNSEEN: u32 = 8;
    /// An exec matched a rule in audit mode.
    pub const EXEC_AUDITED: u32 = 9;
    /// An exec matched a rule and its process was killed.
    pub const EXEC_DENIED: u32 = 10;
    /// A connect matched a rule in audit mode.
    pub const CONNECT_AUDITED: u32 = 11;
    /// A connect matched a rule and was refused (`EPERM`).
    pub const CONNECT_DENIED: u32 = 12;
    /// An enforcement hook passed a connect no rule matched.
    pub const CONNECT_ALLOWED: u32 = 13;
    /// The kill of a denied exec could not be sent (`bpf_send_signal` failed).
    pub const SIGNAL_FAILED: u32 = 14;
    /// Other socket state changes (not a connect's SYN_SENT or its end): nothing to do.
    pub const STATE_IGNORED: u32 = 15;
    /// A TCP socket entered SYN_SENT: its process kept until the handshake ends.
    pub const CONNECT_STARTED: u32 = 16;

    pub const COUNT: u32 = 17;

    pub const NAMES: [&str; COUNT as usize] = [
        "exec_sent",
        "fork_sent",
        "exit_sent",
        "thread_skipped",
        "rate_limited",
        "lost",
        "read_failed",
        "connect_sent",
        "connect_unseen",
        "exec_audited",
        "exec_denied",
        "connect_audited",
        "connect_denied",
        "connect_allowed",
        "signal_failed",
        "state_ignored",
        "connect_started",
    ];
}
