//! A handle on the real `datapathd`, running in the LB namespace, and on `lb-ctl`.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use datapath_api::{Protocol, ServiceView, StatsView};

use crate::{cmd, netns, topology::LB_IFACES};

/// Longest the daemon may take to answer its API after start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest the daemon may take to exit after SIGTERM before it gets SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one `lb-ctl` invocation may take.
pub const LB_CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// Paths of the binaries under test.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub datapathd: PathBuf,
    pub lb_ctl: PathBuf,
}

impl Binaries {
    /// From `DATAPATHD_BIN` / `LB_CTL_BIN`, else `<workspace>/target/debug/{datapathd,lb-ctl}`.
    /// Panics with a clear message when one is missing.
    pub fn from_env() -> Binaries {
        let pick = |var: &str, name: &str| -> PathBuf {
            let path = std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target").join("debug").join(name));
            assert!(
                path.is_file(),
                "{name} binary not found at {} (set {var}, or build it: \
                 `cargo build -p datapath -p lb-ctl`; `cargo xtask test` does both)",
                path.display()
            );
            path
        };
        Binaries {
            datapathd: pick("DATAPATHD_BIN", "datapathd"),
            lb_ctl: pick("LB_CTL_BIN", "lb-ctl"),
        }
    }

    /// `datapathd` and `lb-ctl` in directory `dir` (another build's); fails when one is
    /// missing.
    pub fn in_dir(dir: &Path) -> Result<Binaries> {
        let bins = Binaries {
            datapathd: dir.join("datapathd"),
            lb_ctl: dir.join("lb-ctl"),
        };
        for path in [&bins.datapathd, &bins.lb_ctl] {
            ensure!(path.is_file(), "{} is missing", path.display());
        }
        Ok(bins)
    }
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/netns is two levels deep")
        .to_path_buf()
}

/// `service`'s identity on the command line and in JSON.
pub fn service_arg(vip: IpAddr, port: u16) -> String {
    match vip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// A running (or stopped) `datapathd run` in namespace `ns`.
pub struct Daemon {
    pub ns: String,
    pub bins: Binaries,
    /// Private directory: socket, state file, log.
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_file: PathBuf,
    pub pin_root: PathBuf,
    pub log_path: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
    starts: usize,
    /// Pass `--iface` for the LB interfaces (off when a config file names them).
    pass_ifaces: bool,
}

/// How [`Daemon::start_with`] starts the daemon.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// Pass `--iface lbc --iface lbb` (turn off to take the interfaces from a config file).
    pub ifaces: bool,
    /// Wait until the API answers before returning.
    pub wait_ready: bool,
    pub extra_args: Vec<String>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            ifaces: true,
            wait_ready: true,
            extra_args: Vec::new(),
        }
    }
}

impl Daemon {
    /// Starts the daemon in namespace `ns`, attached to the LB interfaces, with its files in
    /// a fresh directory and its pins under `/sys/fs/bpf/<prefix>`; waits until its API
    /// answers.
    pub fn start(ns: &str, prefix: &str, bins: Binaries, extra_args: &[&str]) -> Result<Daemon> {
        Daemon::start_with(
            ns,
            prefix,
            bins,
            DaemonOptions {
                extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
                ..DaemonOptions::default()
            },
        )
    }

    /// Like [`Daemon::start`], with options.
    pub fn start_with(
        ns: &str,
        prefix: &str,
        bins: Binaries,
        opts: DaemonOptions,
    ) -> Result<Daemon> {
        let dir = std::env::temp_dir().join(format!("datapath-netns-{prefix}"));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut daemon = Daemon {
            ns: ns.to_string(),
            bins,
            socket: dir.join("api.sock"),
            state_file: dir.join("state.json"),
            pin_root: PathBuf::from("/sys/fs/bpf").join(prefix),
            log_path: dir.join("datapathd.log"),
            dir,
            extra_args: opts.extra_args,
            child: None,
            starts: 0,
            pass_ifaces: opts.ifaces,
        };
        if daemon.pin_root.exists() {
            // Pins left by a run that died with the same pid: clear them first.
            daemon.cleanup();
        }
        if opts.wait_ready {
            daemon.spawn()?;
        } else {
            daemon.spawn_only()?;
        }
        Ok(daemon)
    }

    fn spawn(&mut self) -> Result<()> {
        self.spawn_only()?;
        self.wait_ready()
    }

    fn spawn_only(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "daemon already running");
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        writeln!(log, "===== harness: start #{} =====", self.starts)?;
        let mut command = Command::new(&self.bins.datapathd);
        command.arg("run");
        if self.pass_ifaces {
            for iface in LB_IFACES {
                command.args(["--iface", iface]);
            }
        }
        command
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-file")
            .arg(&self.state_file)
            .arg("--pin-root")
            .arg(&self.pin_root)
            .args(["--log-format", "text"])
            .args(&self.extra_args)
            // A log file, not a terminal: no colour codes.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        // Joins only the network namespace (see `netns::command_in`): pins must land in the
        // host's bpffs so that they outlive this process, as on a real node.
        netns::command_in(&mut command, &self.ns)?;
        let child = command.spawn().with_context(|| {
            format!(
                "starting {} in namespace {}",
                cmd::describe(&command),
                self.ns
            )
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits (bounded) until the API answers.
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "datapathd exited during start-up ({status}); its log:\n{}",
                    self.log()
                );
            }
            if self.socket.exists()
                && let Ok(out) = self.lb_ctl(&["service", "list"])
                && out.status.success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "datapathd did not answer `lb-ctl service list` within {READY_TIMEOUT:?}; \
                     its log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the process is (still) running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reap it.
    pub fn kill_9(&mut self) -> Result<()> {
        let mut child = self.child.take().context("daemon not running")?;
        child.kill().context("SIGKILL datapathd")?;
        child.wait().context("reaping datapathd")?;
        Ok(())
    }

    /// SIGTERM, wait (bounded), then SIGKILL if it is still there.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = i32::try_from(child.id()).context("pid")?;
        // SAFETY: signalling our own child, which we have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait()?;
        bail!("datapathd ignored SIGTERM for {STOP_TIMEOUT:?} and was killed")
    }

    /// Sends `signal` to the running daemon.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = i32::try_from(self.pid().context("daemon not running")?).context("pid")?;
        // SAFETY: signalling our own child, which we have not reaped yet.
        ensure!(
            unsafe { libc::kill(pid, signal) } == 0,
            "kill({pid}, {signal}) failed"
        );
        Ok(())
    }

    /// Waits up to `timeout` for the daemon to exit by itself; returns its status and how long
    /// it took, or `None` if it still runs (it is left running).
    pub fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<(std::process::ExitStatus, Duration)>> {
        let started = Instant::now();
        let child = self.child.as_mut().context("daemon not running")?;
        while started.elapsed() < timeout {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some((status, started.elapsed())));
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(None)
    }

    /// Replaces the extra arguments used by the next start.
    pub fn set_extra_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|s| s.to_string()).collect();
    }

    /// `datapathd cleanup` now (the daemon must be stopped); fails if it fails.
    pub fn run_cleanup(&self) -> Result<()> {
        let mut command = Command::new(&self.bins.datapathd);
        command.arg("cleanup").arg("--pin-root").arg(&self.pin_root);
        netns::command_in(&mut command, &self.ns)?;
        let out = cmd::output_timeout(&mut command, Duration::from_secs(30))?;
        ensure!(
            out.status.success(),
            "`datapathd cleanup` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Starts it again with the same socket, state file and pin root (stopping it first if it
    /// still runs).
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn()
    }

    /// Runs `lb-ctl --socket <socket> args...`.
    pub fn lb_ctl(&self, args: &[&str]) -> Result<Output> {
        let mut command = Command::new(&self.bins.lb_ctl);
        command.arg("--socket").arg(&self.socket).args(args);
        cmd::output_timeout(&mut command, LB_CTL_TIMEOUT)
    }

    /// Runs `lb-ctl`, failing unless it exits 0; returns its stdout.
    pub fn lb_ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.lb_ctl(args)?;
        if !out.status.success() {
            bail!(
                "`lb-ctl {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `lb-ctl -o json args...` and parses its output.
    pub fn lb_ctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let out = self.lb_ctl_ok(&full)?;
        serde_json::from_str(&out)
            .with_context(|| format!("`lb-ctl {}` printed no JSON: {out}", full.join(" ")))
    }

    /// `service list`, typed.
    pub fn services(&self) -> Result<Vec<ServiceView>> {
        Ok(serde_json::from_value(
            self.lb_ctl_json(&["service", "list"])?,
        )?)
    }

    /// `service show`, typed.
    pub fn service(&self, vip: IpAddr, port: u16, proto: Protocol) -> Result<ServiceView> {
        let svc = service_arg(vip, port);
        let proto = proto.to_string();
        Ok(serde_json::from_value(self.lb_ctl_json(&[
            "service", "show", &svc, "--proto", &proto,
        ])?)?)
    }

    /// `stats`, typed.
    pub fn stats(&self) -> Result<StatsView> {
        Ok(serde_json::from_value(self.lb_ctl_json(&["stats"])?)?)
    }

    /// Everything the daemon logged so far (all starts).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// Log and counters, for failure messages.
    pub fn diagnostics(&mut self) -> String {
        let mut out = format!(
            "----- datapathd log ({}) -----\n{}\n",
            self.log_path.display(),
            self.log()
        );
        if self.is_running() {
            for args in [&["stats"][..], &["service", "list"][..]] {
                match self.lb_ctl(args) {
                    Ok(o) => out.push_str(&format!(
                        "----- lb-ctl {} ({}) -----\n{}{}\n",
                        args.join(" "),
                        o.status,
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )),
                    Err(e) => out.push_str(&format!("lb-ctl {}: {e:#}\n", args.join(" "))),
                }
            }
        } else {
            out.push_str("(datapathd is not running)\n");
        }
        out
    }

    /// `datapathd cleanup --pin-root ...`, in the LB namespace while it exists.
    fn cleanup(&self) {
        let mut command = Command::new(&self.bins.datapathd);
        command.arg("cleanup").arg("--pin-root").arg(&self.pin_root);
        if netns::exists(&self.ns) {
            let _ = netns::command_in(&mut command, &self.ns);
        }
        match cmd::output_timeout(&mut command, Duration::from_secs(30)) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: `{}` failed ({}): {}",
                cmd::describe(&command),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let failing = thread::panicking();
        if failing {
            eprintln!("{}", self.diagnostics());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cleanup();
        if failing {
            eprintln!("(daemon files kept in {})", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
