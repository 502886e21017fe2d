//! Running commands visibly.

use std::{
    ffi::OsString,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Where cargo puts build outputs.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `$CARGO_HOME`, default `~/.cargo`.
pub fn cargo_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| OsString::from("/root"));
    PathBuf::from(home).join(".cargo")
}

/// `PATH` with `$CARGO_HOME/bin` in it (where `cargo install` puts bpf-linker), so child
/// processes find what setup installed even if the caller's PATH lacks it.
pub fn path_env() -> OsString {
    let bin = cargo_home().join("bin");
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut parts: Vec<PathBuf> = std::env::split_paths(&current).collect();
    if !parts.contains(&bin) {
        parts.push(bin);
    }
    std::env::join_paths(parts).unwrap_or(current)
}

/// A command with the augmented PATH, run from the workspace root.
pub fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", path_env()).current_dir(workspace_root());
    cmd
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v
            && k != "PATH"
        {
            line.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    line.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Prints the command, runs it with inherited stdio, fails if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    println!("$ {line}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Panic messages, errors and failed tests kept from a step's output, at most this many lines: a
/// CI log keeps only its tail, and a backtrace can push the message out of it.
const KEPT_LINES: usize = 80;
/// Lines kept after a panic or error line (its message and cause; a backtrace ends them).
const PANIC_CONTEXT: usize = 12;

/// What [`run_reporting`] keeps of a command's output.
#[derive(Default)]
struct Kept {
    lines: Vec<String>,
    /// Lines still to keep after a `panicked at`.
    following: usize,
}

impl Kept {
    fn see(&mut self, line: &str) {
        if self.lines.len() >= KEPT_LINES {
            return;
        }
        let trimmed = line.trim_start();
        // A panic, an error of cargo or rustc, or an `Err` returned from a main (a build
        // script's shows indented, inside cargo's "failed to run custom build command").
        let starts_failure = line.contains("panicked at")
            || ["error:", "error[", "Error:"]
                .iter()
                .any(|p| trimmed.starts_with(p));
        let test_failed = line.starts_with("test ") && line.ends_with("FAILED");
        if starts_failure {
            self.following = PANIC_CONTEXT;
        } else if trimmed.starts_with("stack backtrace:")
            || trimmed.starts_with("Stack backtrace:")
            || trimmed.starts_with("0: ")
        {
            self.following = 0;
        }
        if starts_failure || test_failed || self.following > 0 {
            self.lines.push(line.to_string());
            self.following = self.following.saturating_sub(usize::from(!starts_failure));
        }
    }
}

/// Forwards `from` line by line to `to`, keeping what [`Kept`] wants.
fn forward(from: impl Read, mut to: impl Write, kept: &Mutex<Kept>) {
    let mut reader = BufReader::new(from);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let _ = to.write_all(&buf);
                let _ = to.flush();
                let line = String::from_utf8_lossy(&buf);
                kept.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .see(line.trim_end());
            }
        }
    }
}

/// Like [`run`], and when the command fails, its error repeats the panic messages and failed
/// tests of its output (so they are at the end of the log, next to the summary).
pub fn run_reporting(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    println!("$ {line}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    let kept = Arc::new(Mutex::new(Kept::default()));
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let (k1, k2) = (Arc::clone(&kept), Arc::clone(&kept));
    let threads = [
        std::thread::spawn(move || forward(out, std::io::stdout(), &k1)),
        std::thread::spawn(move || forward(err, std::io::stderr(), &k2)),
    ];
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    for t in threads {
        let _ = t.join();
    }
    if !status.success() {
        let kept = kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.lines.is_empty() {
            bail!("`{line}` failed ({status})");
        }
        bail!(
            "`{line}` failed ({status}); what failed in its output:\n{}",
            kept.lines.join("\n")
        );
    }
    Ok(())
}

/// Runs the command quietly and returns its stdout, or `None` if it cannot run or fails.
pub fn capture(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::Kept;

    fn kept_of(lines: &[&str]) -> Vec<String> {
        let mut kept = Kept::default();
        for line in lines {
            kept.see(line);
        }
        kept.lines
    }

    #[test]
    fn a_panic_message_and_failed_tests_are_kept_not_the_backtrace() {
        let kept = kept_of(&[
            "Compiling x",
            "test a ... ok",
            "test b ... FAILED",
            "thread 'main' panicked at perf/benches/x.rs:1:2:",
            "start datapathd: the API never answered",
            "stack backtrace:",
            "   0: std::panicking::begin_panic",
            "   1: main",
        ]);
        assert_eq!(
            kept,
            [
                "test b ... FAILED",
                "thread 'main' panicked at perf/benches/x.rs:1:2:",
                "start datapathd: the API never answered",
            ]
        );
    }

    #[test]
    fn a_build_script_error_is_kept_with_its_cause_not_its_backtrace() {
        let kept = kept_of(&[
            "   Compiling datapath v0.1.0",
            "error: failed to run custom build command for `datapath v0.1.0`",
            "Caused by:",
            "  process didn't exit successfully: `build-script-build` (exit status: 1)",
            "  --- stderr",
            "  Error: cannot write /x: No space left on device (os error 28)",
            "",
            "  Stack backtrace:",
            "     0: anyhow::error::<impl anyhow::Error>::msg",
            "    13: std::panicking::catch_unwind",
        ]);
        assert_eq!(
            kept,
            [
                "error: failed to run custom build command for `datapath v0.1.0`",
                "Caused by:",
                "  process didn't exit successfully: `build-script-build` (exit status: 1)",
                "  --- stderr",
                "  Error: cannot write /x: No space left on device (os error 28)",
                "",
            ]
        );
    }
}
