//! Debian's headless Chromium (`chromium`), run inside a network namespace the test created, for
//! tests of the daemon's web view: the DOM after the page's scripts ran, and screenshots.
//!
//! Every run has its own profile in a fresh temporary directory, its own process group (so a
//! run that overstays [`BROWSER_TIMEOUT`] is killed with all its helper processes) and a
//! virtual-time budget, after which Chromium dumps or shoots the page as its scripts left it.

use std::{
    io::Read,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::cmd;

/// The browser binary (Debian package `chromium`).
pub const CHROMIUM: &str = "chromium";

/// Longest one browser run may take before it is killed, with its whole process group.
pub const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// Virtual time the page's scripts get before the dump or the screenshot (fetches pause it,
/// so a page that fetches on load and then every 2 s has fetched at least twice).
pub const VIRTUAL_TIME_BUDGET_MS: u64 = 5_000;

/// The first bytes of every PNG file.
pub const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Why the browser tests cannot run here, or `None` when `chromium` runs.
pub fn unavailable_reason() -> Option<String> {
    if cmd::available(CHROMIUM, "--version") {
        None
    } else {
        Some(format!(
            "`{CHROMIUM}` not found (install the Debian package chromium)"
        ))
    }
}

/// The DOM of `url` serialized after the page's scripts ran for [`VIRTUAL_TIME_BUDGET_MS`],
/// with Chromium run in namespace `netns` (`None`: this process's namespace).
pub fn dump_dom(netns: Option<&str>, url: &str) -> Result<String> {
    let out = run(netns, &["--dump-dom".to_string()], url)?;
    let dom = String::from_utf8(out).context("the dumped DOM is not UTF-8")?;
    ensure!(
        dom.contains("<html") || dom.contains("<body"),
        "chromium dumped no document for {url}: {dom:?}"
    );
    Ok(dom)
}

/// A `width`x`height` PNG screenshot of `url` at `path` (its directory must exist), taken after
/// the page's scripts ran for [`VIRTUAL_TIME_BUDGET_MS`], with Chromium run in namespace
/// `netns` (`None`: this process's namespace). Fails unless the file is then a PNG.
pub fn screenshot(
    netns: Option<&str>,
    url: &str,
    path: &Path,
    width: u32,
    height: u32,
) -> Result<()> {
    let path = std::path::absolute(path).with_context(|| format!("{}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    run(
        netns,
        &[
            format!("--screenshot={}", path.display()),
            format!("--window-size={width},{height}"),
            "--hide-scrollbars".to_string(),
        ],
        url,
    )?;
    let mut head = [0u8; 8];
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut head))
        .with_context(|| format!("chromium wrote no screenshot at {}", path.display()))?;
    ensure!(
        head == PNG_SIGNATURE,
        "{} is not a PNG (starts with {head:02x?})",
        path.display()
    );
    Ok(())
}

/// A fresh, empty directory for one run's profile; removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "datapath-chromium-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs Chromium headless on `url` with `extra` flags; returns its stdout. Kills its process
/// group when it is done or after [`BROWSER_TIMEOUT`], whichever comes first.
fn run(netns: Option<&str>, extra: &[String], url: &str) -> Result<Vec<u8>> {
    let profile = TempDir::new()?;
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, CHROMIUM]);
            c
        }
        None => Command::new(CHROMIUM),
    };
    command
        .arg("--headless")
        .arg("--no-sandbox")
        .arg("--disable-gpu")
        .arg("--disable-dev-shm-usage")
        .arg("--no-first-run")
        .arg("--no-default-browser-check")
        .arg("--disable-extensions")
        .arg("--disable-background-networking")
        .arg("--disable-component-update")
        .arg("--disable-sync")
        .arg("--disable-breakpad")
        .arg("--disable-crash-reporter")
        .arg("--mute-audio")
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}"))
        .args(extra)
        .arg(url)
        .env("HOME", &profile.0)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = cmd::describe(&command);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    let group = child.id() as libc::pid_t;
    let (out_reader, err_reader) = cmd::read_pipes(&mut child);
    // Waits for the exit without reaping the child: while it is a zombie its pid, the id of
    // its process group, cannot be reused, so killing the group below hits this run only.
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let exited = loop {
        match exited_unreaped(group) {
            Ok(true) => break Ok(()),
            Ok(false) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(false) => break Err(anyhow::anyhow!("did not finish within {BROWSER_TIMEOUT:?}")),
            Err(e) => break Err(e),
        }
    };
    // Whatever is left of the run's process group (renderers, zygotes) goes with it.
    // SAFETY: kill(2) on the process group made for this run, whose leader is not reaped yet.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"));
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    exited.with_context(|| format!("`{line}` was killed"))?;
    let status = status?;
    if !status.success() {
        bail!(
            "`{line}` failed ({status}): {}",
            tail(&String::from_utf8_lossy(&stderr), 2000)
        );
    }
    Ok(stdout)
}

/// Whether child `pid` has exited, leaving it unreaped (`waitid` with `WNOWAIT`).
fn exited_unreaped(pid: libc::pid_t) -> Result<bool> {
    // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with a valid siginfo_t pointer.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("waitid on chromium");
    }
    // SAFETY: waitid filled `info` in; si_pid stays 0 while the child runs.
    Ok(unsafe { info.si_pid() } != 0)
}

/// The last `max` bytes of `text` (on a character boundary), for messages.
fn tail(text: &str, max: usize) -> &str {
    let text = text.trim();
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}
