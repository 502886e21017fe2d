//! Pinning the calling thread to one CPU: BPF_PROG_TEST_RUN runs a program on the caller's CPU,
//! so per-CPU state (a rate window, a token bucket, a generator's sequence) is only exact when
//! every run happens on the same one.

use std::io;

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only touch
    // it (with its own size) and the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPU the calling thread runs on.
pub fn current() -> io::Result<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).map_err(|_| io::Error::last_os_error())
}

/// Pins the calling thread to the CPU it runs on now.
pub fn pin_here() -> io::Result<usize> {
    let cpu = current()?;
    pin_to(cpu)?;
    Ok(cpu)
}
