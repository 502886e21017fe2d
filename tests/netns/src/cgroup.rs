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
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
