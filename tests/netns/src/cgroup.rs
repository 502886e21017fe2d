//! Cgroup v2 directories made for a test or a benchmark (never the root: programs that attach
//! to a cgroup attach to one of these), removed on drop.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The cgroup2 mount point, from `/proc/self/mountinfo` (`/sys/fs/cgroup/unified` on a hybrid
/// host, `/sys/fs/cgroup` on a Kubernetes node).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|l| {
            // Fields: ... mount-point ... - fstype source options.
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .context("no cgroup2 file system is mounted")
}

/// A cgroup directory of ours; removed on drop (after its processes have exited; children
/// first, so drop them before their parent).
pub struct TestCgroup(PathBuf);

impl TestCgroup {
    /// `<cgroup2 root>/<name>`.
    pub fn create(name: &str) -> Result<Self> {
        let dir = cgroup2_root()?.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// A child cgroup of this one.
    pub fn child(&self, name: &str) -> Result<Self> {
        let dir = self.0.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Its cgroup id: the directory's inode number.
    pub fn id(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(std::fs::metadata(&self.0)
            .with_context(|| format!("stat {}", self.0.display()))?
            .ino())
    }

    /// Makes `cmd` join this cgroup between fork and exec (so the program runs in it from its
    /// first instruction).
    pub fn join_on_exec(&self, cmd: &mut std::process::Command) {
        join_on_exec(cmd, &self.0);
    }
}

/// Makes `cmd` join cgroup directory `cgroup` between fork and exec.
pub fn join_on_exec(cmd: &mut std::process::Command, cgroup: &Path) {
    use std::os::unix::process::CommandExt as _;
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").to_string_lossy().into_owned())
        .expect("a path without NUL");
    // SAFETY: between fork and exec only open(2), write(2) and close(2), which are
    // async-signal-safe; `procs` is owned by the closure.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let rc = libc::write(fd, b"0\n".as_ptr().cast(), 2);
            libc::close(fd);
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
