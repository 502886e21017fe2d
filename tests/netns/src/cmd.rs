//! Running external commands (`ip`, `ethtool`, `sysctl`, the daemon's binaries) with bounded
//! waits and error messages that say what was run.

use std::{
    io::Read,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Longest any helper command may run before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Threads reading the child's piped stdout and stderr to their end (so a chatty child never
/// blocks on a full pipe while it is waited for); join them for the bytes.
pub fn read_pipes(
    child: &mut std::process::Child,
) -> (thread::JoinHandle<Vec<u8>>, thread::JoinHandle<Vec<u8>>) {
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    (out, err)
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` with captured output; kills it if it runs longer than `timeout`.
pub fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    let (out_reader, err_reader) = read_pipes(&mut child);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{line}` did not finish within {timeout:?} and was killed");
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Runs `cmd`, failing with its stderr when it exits non-zero; returns its stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let out = output_timeout(cmd, DEFAULT_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `run` for a program and a list of arguments.
pub fn run_args(program: &str, args: &[&str]) -> Result<String> {
    run(Command::new(program).args(args))
}

/// Whether `program --version` (or another harmless argument) runs at all.
pub fn available(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `promtool check metrics` over a scrape's `text` (Debian package prometheus, which
/// `cargo xtask setup` installs): `Err` with its report unless it passes and reports nothing.
pub fn promtool_check(text: &str) -> Result<()> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file =
        std::env::temp_dir().join(format!("datapath-promtool-{}-{n}.txt", std::process::id()));
    std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    let out = output_timeout(
        Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < {}", file.display())),
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_file(&file);
    let out = out.context("running promtool (Debian package prometheus)")?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !report.trim().is_empty() {
        bail!("promtool check metrics: {}: {report}", out.status);
    }
    Ok(())
}
