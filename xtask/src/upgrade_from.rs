//! The previous landed build, for the upgrade test (`tests/netns/tests/upgrade.rs`): its
//! `datapathd` and `lb-ctl`, built from the commit named in `tests/netns/upgrade-from`.
//!
//! The commit's tree is extracted with `git archive` (no worktree is registered) into
//! `target/upgrade-from/src` and built there, debug, with its own target directory
//! (`target/upgrade-from/target`, kept across commits so a new commit rebuilds only what
//! changed). The binaries are copied to `target/upgrade-from/bin/<commit>/`; when both are
//! there, nothing is extracted or built. The old tree builds its own BPF objects through its
//! `datapath/build.rs`, with the nightly toolchain and bpf-linker `cargo xtask setup` installs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

use crate::util::{self, command};

/// The file naming the previous landed build's commit (the full hash; `#` lines are comments).
pub const COMMIT_FILE: &str = "tests/netns/upgrade-from";
/// The environment variable that hands the upgrade test the directory of the old binaries.
pub const BIN_ENV: &str = "DATAPATH_UPGRADE_FROM_BIN";
/// The binaries the upgrade test runs from the old build.
const BINARIES: [&str; 2] = ["datapathd", "lb-ctl"];

/// The old build's commit and where its pieces live.
#[derive(Clone, Debug)]
pub struct UpgradeFrom {
    pub commit: String,
    /// `target/upgrade-from`.
    root: PathBuf,
}

impl UpgradeFrom {
    /// Reads [`COMMIT_FILE`].
    pub fn read() -> Result<UpgradeFrom> {
        let path = util::workspace_root().join(COMMIT_FILE);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let commit = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .with_context(|| format!("{} names no commit", path.display()))?
            .to_string();
        ensure!(
            commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}: {commit:?} is not a full 40-digit commit hash",
            path.display()
        );
        Ok(UpgradeFrom {
            commit,
            root: util::target_dir().join("upgrade-from"),
        })
    }

    /// The directory the test finds the old `datapathd` and `lb-ctl` in ([`BIN_ENV`]).
    pub fn bin_dir(&self) -> PathBuf {
        self.root.join("bin").join(&self.commit)
    }

    fn src_dir(&self) -> PathBuf {
        self.root.join("src")
    }

    fn target_dir(&self) -> PathBuf {
        self.root.join("target")
    }

    /// Builds the old binaries unless they are already there for this commit.
    pub fn ensure_built(&self) -> Result<()> {
        let bin_dir = self.bin_dir();
        if BINARIES.iter().all(|b| bin_dir.join(b).is_file()) {
            println!(
                "upgrade-from: {} already built ({})",
                self.commit,
                bin_dir.display()
            );
            return Ok(());
        }
        self.check_commit_present()?;
        let started = Instant::now();
        self.extract()?;
        let mut build = command("cargo");
        build
            .args(["build", "-p", "datapath", "-p", "lb-ctl"])
            .current_dir(self.src_dir())
            .env("CARGO_TARGET_DIR", self.target_dir())
            // The old tree's real programs, whatever the caller's environment asks for.
            .env_remove("DATAPATH_BPF_VARIANT")
            .env_remove("AYA_BUILD_SKIP");
        util::run(&mut build).with_context(|| {
            format!(
                "building the previous landed build {} (from {COMMIT_FILE})",
                self.commit
            )
        })?;
        fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
        for name in BINARIES {
            let built = self.target_dir().join("debug").join(name);
            // Copied under a temporary name and renamed: a half-copied binary never counts as
            // built.
            let partial = bin_dir.join(format!(".{name}.partial"));
            fs::copy(&built, &partial)
                .with_context(|| format!("copying {} to {}", built.display(), bin_dir.display()))?;
            fs::rename(&partial, bin_dir.join(name))?;
        }
        println!(
            "upgrade-from: built {} in {:.1}s ({})",
            self.commit,
            started.elapsed().as_secs_f64(),
            bin_dir.display()
        );
        Ok(())
    }

    /// Fails with a clear message when the commit is not in this clone (a shallow clone).
    fn check_commit_present(&self) -> Result<()> {
        let present = command("git")
            .args(["cat-file", "-e", &format!("{}^{{commit}}", self.commit)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run git")?
            .success();
        if !present {
            let shallow =
                util::capture(command("git").args(["rev-parse", "--is-shallow-repository"]))
                    .is_some_and(|s| s.trim() == "true");
            bail!(
                "commit {commit} (the previous landed build, {COMMIT_FILE}) is not in this clone{why}; \
                 the upgrade test needs it: fetch it (`git fetch origin {commit}`{unshallow}) and run again",
                commit = self.commit,
                why = if shallow { ", which is shallow" } else { "" },
                unshallow = if shallow {
                    " or `git fetch --unshallow`"
                } else {
                    ""
                },
            );
        }
        Ok(())
    }

    /// `git archive <commit> | tar -x -C target/upgrade-from/src`, unless the tree there is
    /// already this commit's (a stamp file says which commit it holds).
    fn extract(&self) -> Result<()> {
        let src = self.src_dir();
        let stamp = self.root.join("src.commit");
        if src.is_dir() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == self.commit) {
            return Ok(());
        }
        if src.exists() {
            fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
        }
        let _ = fs::remove_file(&stamp);
        fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
        println!(
            "$ git archive {} | tar -x -C {}",
            self.commit,
            src.display()
        );
        let mut archive = command("git")
            .args(["archive", &self.commit])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot run git archive")?;
        let tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&src)
            .stdin(archive.stdout.take().expect("stdout is piped"))
            .status()
            .context("cannot run tar")?;
        let archived = archive.wait().context("waiting for git archive")?;
        ensure!(
            archived.success() && tar.success(),
            "extracting {} into {} failed (git archive: {archived}, tar: {tar})",
            self.commit,
            src.display()
        );
        write_stamp(&stamp, &self.commit)
    }
}

fn write_stamp(path: &Path, commit: &str) -> Result<()> {
    fs::write(path, format!("{commit}\n")).with_context(|| format!("writing {}", path.display()))
}
