//! The raw syscalls of the fuzzer's per-frame loop: `BPF_PROG_TEST_RUN` on a program fd and
//! one `BPF_MAP_LOOKUP_BATCH` of a whole per-CPU reason array, with buffers reused from frame
//! to frame, and pinning the calling thread to one CPU.
//!
//! aya's `TestRun` borrows the program from its `Ebpf`; the fuzzer's workers hold their own
//! cloned descriptors instead. The batch read is `datapath::gc::lookup_batch` (aya 0.14 has
//! no batch map operations).

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use anyhow::{Context as _, Result, ensure};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `union bpf_attr` for `BPF_PROG_TEST_RUN` (the `test` member, up to `batch_size`).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is an initialised `#[repr(C)]` prefix of `union bpf_attr`; the buffers it
    // points to are kept alive (and large enough) by the caller for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What one test run returned.
#[derive(Clone, Copy, Debug)]
pub struct RunResult {
    pub retval: u32,
    /// Bytes of the output frame written to the output buffer.
    pub out_len: usize,
}

/// Runs `prog` once on `data` with context `ctx`; the output frame goes to `out`. An error is
/// the kernel refusing the input (EINVAL for a frame it will not build, say).
pub fn test_run(
    prog: BorrowedFd<'_>,
    data: &[u8],
    ctx: &[u8],
    out: &mut [u8],
) -> io::Result<RunResult> {
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ctx_size_in: ctx.len() as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(RunResult {
        retval: attr.retval,
        out_len: (attr.data_size_out as usize).min(out.len()),
    })
}

/// A per-CPU `u64` array (`LB_REASONS`, `TC_REASONS`) read whole with one
/// `BPF_MAP_LOOKUP_BATCH`, keeping one CPU's column.
pub struct PerCpuCounters {
    entries: u32,
    cpus: usize,
    keys: Vec<u32>,
    values: Vec<u64>,
}

impl PerCpuCounters {
    /// Buffers for a map of `entries` slots on `cpus` possible CPUs.
    pub fn new(entries: u32, cpus: usize) -> Self {
        Self {
            entries,
            cpus,
            keys: vec![0; entries as usize],
            values: vec![0; entries as usize * cpus],
        }
    }

    /// Reads every slot of `map` and writes CPU `cpu`'s values into `into`.
    pub fn read(&mut self, map: BorrowedFd<'_>, cpu: usize, into: &mut [u64]) -> Result<()> {
        ensure!(
            cpu < self.cpus,
            "CPU {cpu} beyond the {} possible",
            self.cpus
        );
        let mut token = 0u64;
        let (copied, _) = datapath::gc::lookup_batch(
            map,
            None,
            &mut token,
            &mut self.keys,
            &mut self.values,
            self.cpus,
        )
        .context("BPF_MAP_LOOKUP_BATCH of the reason counters")?;
        ensure!(
            copied == self.entries as usize,
            "BPF_MAP_LOOKUP_BATCH returned {copied} of {} reason slots",
            self.entries
        );
        for (i, key) in self.keys.iter().enumerate() {
            let key = *key as usize;
            ensure!(key < into.len(), "reason slot {key} out of range");
            into[key] = self.values[i * self.cpus + cpu];
        }
        Ok(())
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    netns_tests::cpu::pin_to(cpu).with_context(|| format!("sched_setaffinity to CPU {cpu}"))
}

/// The CPU the calling thread runs on.
pub fn current_cpu() -> Result<usize> {
    netns_tests::cpu::current().context("sched_getcpu")
}
