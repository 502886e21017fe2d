//! Watching the configuration file with inotify, so that a change is noticed when it happens
//! and nothing polls. The file's directory is watched, not the file: editors write a new file
//! and rename it over the old one, and a Kubernetes ConfigMap volume swaps a `..data` symlink
//! (the event then names `..data`). After any event in the directory the content is compared
//! with the last one seen, and only a different content counts as a change.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::io::unix::AsyncFd;

/// Events that arrive within this much of the first are one change (an editor's write, chmod
/// and rename).
const SETTLE: Duration = Duration::from_millis(50);

/// A watch on one file. See the module documentation.
pub struct FileWatch {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    dirs: Vec<PathBuf>,
    seen: Option<Vec<u8>>,
}

fn watch_dir(fd: &OwnedFd, dir: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mask = libc::IN_CLOSE_WRITE
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_ATTRIB
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF;
    // SAFETY: a valid inotify descriptor and a NUL-terminated path.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
    if wd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The directories whose events can change what `path` reads: its own, and that of its
/// resolved target when it is a symlink (a ConfigMap's `..data/config.yaml`).
fn dirs_of(path: &Path) -> Vec<PathBuf> {
    let parent = |p: &Path| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    };
    let mut dirs = vec![parent(path)];
    if let Ok(target) = std::fs::canonicalize(path) {
        let d = parent(&target);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

impl FileWatch {
    /// Starts watching `path` (which need not exist yet); its content now is the baseline.
    pub fn new(path: &Path) -> io::Result<Self> {
        // SAFETY: plain syscall; the descriptor is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let dirs = dirs_of(path);
        for d in &dirs {
            watch_dir(&fd, d)?;
        }
        // SAFETY: the OwnedFd keeps the descriptor open and the same for the AsyncFd's life.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
            dirs,
            seen: std::fs::read(path).ok(),
        })
    }

    /// Reads and drops every queued event; `Ok(false)` when none was queued.
    fn drain(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: the buffer is valid for writes of its length.
            let n = unsafe {
                libc::read(
                    self.fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(any),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n == 0 {
                return Ok(any);
            }
            // Which event it was does not matter (the content decides), not even
            // IN_Q_OVERFLOW: a lost event is covered by comparing the content.
            any = true;
        }
    }

    /// Re-adds the watches: a watched directory deleted or moved, or a symlink that now points
    /// elsewhere. Adding an existing watch again only updates it.
    fn rewatch(&mut self) {
        for d in dirs_of(&self.path) {
            if watch_dir(self.fd.get_ref(), &d).is_ok() && !self.dirs.contains(&d) {
                self.dirs.push(d);
            }
        }
    }

    /// Waits until the file's content differs from the last one seen (or from the start), and
    /// answers it. A missing file is no change; its creation is.
    pub async fn changed(&mut self) -> io::Result<Vec<u8>> {
        loop {
            let mut guard = self.fd.readable().await?;
            guard.clear_ready();
            drop(guard);
            if !self.drain()? {
                continue;
            }
            tokio::time::sleep(SETTLE).await;
            self.drain()?;
            self.rewatch();
            let now = std::fs::read(&self.path).ok();
            if now.is_some() && now != self.seen {
                self.seen = now.clone();
                return Ok(now.unwrap_or_default());
            }
        }
    }

    /// Makes `content` the baseline (after a SIGHUP reload read the file itself).
    pub fn saw(&mut self, content: Option<Vec<u8>>) {
        self.seen = content;
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::symlink, time::Duration};

    use super::*;

    const WAIT: Duration = Duration::from_secs(3);

    async fn next(w: &mut FileWatch) -> Option<Vec<u8>> {
        tokio::time::timeout(WAIT, w.changed())
            .await
            .ok()
            .map(|r| r.unwrap())
    }

    async fn none_within(w: &mut FileWatch, d: Duration) -> bool {
        tokio::time::timeout(d, w.changed()).await.is_err()
    }

    #[tokio::test]
    async fn an_in_place_write_is_seen_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "a: 1\n").unwrap();
        let mut w = FileWatch::new(&path).unwrap();
        std::fs::write(&path, "a: 2\n").unwrap();
        assert_eq!(next(&mut w).await.as_deref(), Some(&b"a: 2\n"[..]));
        assert!(
            none_within(&mut w, Duration::from_millis(300)).await,
            "seen once"
        );
    }

    #[tokio::test]
    async fn a_rename_over_the_file_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "a: 1\n").unwrap();
        let mut w = FileWatch::new(&path).unwrap();
        let tmp = dir.path().join(".config.yaml.swp");
        std::fs::write(&tmp, "a: 3\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(next(&mut w).await.as_deref(), Some(&b"a: 3\n"[..]));
    }

    #[tokio::test]
    async fn a_configmap_symlink_swap_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..2026_x")).unwrap();
        std::fs::write(d.join("..2026_x/config.yaml"), "a: 1\n").unwrap();
        symlink("..2026_x", d.join("..data")).unwrap();
        symlink("..data/config.yaml", d.join("config.yaml")).unwrap();
        let path = d.join("config.yaml");
        let mut w = FileWatch::new(&path).unwrap();
        std::fs::create_dir(d.join("..2026_y")).unwrap();
        std::fs::write(d.join("..2026_y/config.yaml"), "a: 2\n").unwrap();
        symlink("..2026_y", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        assert_eq!(next(&mut w).await.as_deref(), Some(&b"a: 2\n"[..]));
    }

    #[tokio::test]
    async fn the_same_content_again_is_no_change_and_a_missing_file_waits_for_its_creation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "a: 1\n").unwrap();
        let mut w = FileWatch::new(&path).unwrap();
        std::fs::write(&path, "a: 1\n").unwrap();
        assert!(
            none_within(&mut w, Duration::from_millis(300)).await,
            "same bytes"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(
            none_within(&mut w, Duration::from_millis(300)).await,
            "gone"
        );
        std::fs::write(&path, "a: 4\n").unwrap();
        assert_eq!(next(&mut w).await.as_deref(), Some(&b"a: 4\n"[..]));
    }
}
