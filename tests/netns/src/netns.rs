//! Entering network namespaces created with `ip netns add`.
//!
//! Sockets belong to the namespace they were created in, whichever thread uses them later. So
//! servers and clients create their sockets in a short-lived thread that joined the namespace
//! with `setns(2)`, and may then hand them to ordinary threads.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context, Result};

/// Where `ip netns add` bind-mounts its namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// The file that names namespace `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Whether namespace `name` exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

fn open(name: &str) -> Result<File> {
    File::open(path(name)).with_context(|| format!("cannot open network namespace {name}"))
}

/// Moves the calling thread into network namespace `name`. Only use on a thread that ends
/// afterwards (see [`run_in`]).
fn enter(name: &str) -> Result<()> {
    let file = open(name)?;
    // SAFETY: setns on a valid, open namespace file descriptor; it only affects this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setns into network namespace {name}"));
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside network namespace `name` and returns its result. A panic
/// in `f` is propagated to the caller.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> Result<T> {
            enter(name)?;
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Makes `cmd` start inside network namespace `name` (and only that: unlike `ip netns exec`,
/// the child keeps the caller's mount namespace, so it sees the host's bpffs at /sys/fs/bpf
/// and its pins outlive it).
pub fn command_in(cmd: &mut Command, name: &str) -> Result<()> {
    let file = open(name)?;
    // SAFETY: the hook runs between fork and exec and only calls setns(2), which is
    // async-signal-safe; `file` is owned by the closure and open at fork time.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A network namespace this process created with `ip netns add`, with `lo` up. Dropping it
/// deletes the namespace, and with it its interfaces, their addresses and routes, and the
/// programs attached to them: the one guard every test and benchmark holds its namespaces by,
/// so they are gone also when a test panics half-way through its setup.
#[derive(Debug)]
pub struct OwnedNetns {
    name: String,
}

impl OwnedNetns {
    /// Creates namespace `name` and brings `lo` up. A namespace of that name left by a run
    /// that died (with the same pid, since names carry it) is deleted first: it is ours.
    pub fn create(name: &str) -> Result<Self> {
        if exists(name) {
            let _ = crate::cmd::run_args("ip", &["netns", "del", name]);
        }
        crate::cmd::run_args("ip", &["netns", "add", name])?;
        // From here on, dropping `owned` deletes the namespace again.
        let owned = OwnedNetns {
            name: name.to_string(),
        };
        owned.ip(&["link", "set", "lo", "up"])?;
        Ok(owned)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> args...`; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        crate::cmd::run_args("ip", &full)
    }
}

impl Drop for OwnedNetns {
    fn drop(&mut self) {
        if let Err(e) = crate::cmd::run_args("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// An [`OwnedNetns`] that the calling thread has entered (for fixtures that load and
/// test-run BPF programs in it). Dropping it moves the thread back to where it was, then
/// deletes the namespace.
pub struct EnteredNetns {
    /// Where the thread was before; restored on drop.
    original: File,
    /// Dropped after `drop` restored the thread: a namespace is deleted once nobody is in it.
    netns: OwnedNetns,
}

impl EnteredNetns {
    /// Creates `<prefix><pid>-<n>`, brings `lo` up and enters it on this thread.
    pub fn create(prefix: &str) -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "{prefix}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let netns = OwnedNetns::create(&name)?;
        let original = File::open("/proc/thread-self/ns/net")
            .context("cannot open this thread's network namespace")?;
        let entered = EnteredNetns { original, netns };
        enter(entered.name())?;
        Ok(entered)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        self.netns.name()
    }

    /// `ip -n <name> args...`; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        self.netns.ip(args)
    }
}

impl Drop for EnteredNetns {
    fn drop(&mut self) {
        // SAFETY: setns on the thread's original namespace, kept open since `create`.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}
