//! The container image (deploy/image), built and run for real with Debian's `podman`, offline:
//! `deploy/image/rootfs.sh` assembles the root filesystem from the binaries under test, and
//! `podman build --build-context rootfs=DIR` builds the Containerfile's final stage from it on
//! scratch (its build stage, which needs a Rust image and crates.io, is skipped).
//!
//! - The image holds the daemon, lb-ctl, their shared libraries and busybox, and nothing else.
//! - `datapathd --version` and `lb-ctl --help` run in it, as root and lb-ctl as `datapath`.
//! - The DaemonSet's init container command (from deploy/kustomize/base) mounts bpffs on an
//!   empty `/sys/fs/bpf`, and leaves one that is already bpffs alone.
//!
//! Containers run with runc: crun refuses this kernel's hybrid cgroup layout. The open files
//! and processes limits are set explicitly, below the host's: podman's defaults are above what
//! this machine allows.
//!
//! Run after `cargo build -p datapath --bins -p lb-ctl`:
//! `cargo test -p netns-tests --test image` (as root).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use netns_tests::{cmd, daemon::Binaries, privilege};

const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn output(cmd: &mut Command, timeout: Duration) -> Output {
    cmd::output_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e:#}"))
}

fn ok(cmd: &mut Command, timeout: Duration) -> String {
    let line = cmd::describe(cmd);
    let out = output(cmd, timeout);
    assert!(
        out.status.success(),
        "`{line}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Why the test cannot run here, or `None`.
fn unavailable() -> Option<String> {
    if let Some(r) = privilege::root_reason("building and running images with podman") {
        return Some(r);
    }
    for (tool, flag, package) in [
        ("podman", "--version", "podman"),
        ("runc", "--version", "runc"),
        ("/bin/busybox", "--help", "busybox-static"),
    ] {
        if !cmd::available(tool, flag) {
            return Some(format!(
                "`{tool}` not found (install the {package} package, or run `cargo xtask setup`)"
            ));
        }
    }
    None
}

/// The image, removed when dropped.
struct Image {
    tag: String,
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = cmd::output_timeout(
            Command::new("podman").args(["rmi", "--force", &self.tag]),
            RUN_TIMEOUT,
        );
    }
}

impl Image {
    /// `podman run` of the image with `args` after the image name, and `options` before it;
    /// its stdout, or a panic with both outputs.
    fn run_ok(&self, options: &[&str], args: &[&str]) -> String {
        let mut c = Command::new("podman");
        c.args(["--runtime", "runc", "run", "--rm", "--network=none"])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=4096:4096",
            ])
            .args(options)
            .arg(&self.tag)
            .args(args);
        ok(&mut c, RUN_TIMEOUT)
    }
}

/// The files the image must hold: the two programs, the libraries `ldd` lists for them (the
/// loader too), busybox and its applets, and the user database.
fn expected_files(bins: &Binaries) -> BTreeSet<String> {
    let mut want: BTreeSet<String> = [
        "/usr/local/bin/datapathd",
        "/usr/local/bin/lb-ctl",
        "/bin/busybox",
        "/bin/sh",
        "/bin/grep",
        "/bin/mount",
        "/etc/passwd",
        "/etc/group",
    ]
    .map(String::from)
    .into();
    for bin in [&bins.datapathd, &bins.lb_ctl] {
        let listed = ok(Command::new("ldd").arg(bin), RUN_TIMEOUT);
        for line in listed.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => want.insert(path.to_string()),
                [path, ..] if path.starts_with('/') => want.insert(path.to_string()),
                _ => false,
            };
        }
    }
    want
}

/// Every file and symlink under `dir`, as a path from `root` (`/usr/local/bin/lb-ctl`).
fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            walk(root, &entry.path(), out);
        } else {
            let rel = entry.path().strip_prefix(root).unwrap().to_path_buf();
            out.insert(format!("/{}", rel.display()));
        }
    }
}

/// The init container's shell command in deploy/kustomize/base/daemonset.yaml.
fn init_script() -> String {
    let text =
        std::fs::read_to_string(workspace().join("deploy/kustomize/base/daemonset.yaml")).unwrap();
    let ds: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let command = &ds["spec"]["template"]["spec"]["initContainers"][0]["command"];
    assert_eq!(command[0].as_str(), Some("/bin/sh"), "{command:?}");
    assert_eq!(command[1].as_str(), Some("-c"), "{command:?}");
    command[2].as_str().unwrap().to_string()
}

#[test]
fn the_image_holds_the_daemon_and_lb_ctl_only_and_they_run_in_it() {
    if !privilege::may_run(unavailable()) {
        return;
    }
    let bins = Binaries::from_env();
    let root = workspace();
    let work = std::env::temp_dir().join(format!("datapath-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let bin_dir = work.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    for (name, path) in [("datapathd", &bins.datapathd), ("lb-ctl", &bins.lb_ctl)] {
        std::os::unix::fs::symlink(path, bin_dir.join(name)).unwrap();
    }
    let rootfs = work.join("rootfs");
    ok(
        Command::new(root.join("deploy/image/rootfs.sh"))
            .arg(&bin_dir)
            .arg(&rootfs),
        RUN_TIMEOUT,
    );
    let image = Image {
        tag: format!("localhost/datapathd-test:{}", std::process::id()),
    };
    ok(
        Command::new("podman")
            .args(["build", "--network=none", "--build-context"])
            .arg(format!("rootfs={}", rootfs.display()))
            .arg("-f")
            .arg(root.join("deploy/image/Containerfile"))
            .args(["-t", &image.tag])
            .arg(root.join("deploy/image")),
        BUILD_TIMEOUT,
    );

    // What the image runs, as whom.
    let config = ok(
        Command::new("podman").args([
            "image",
            "inspect",
            "--format",
            "{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{.Config.User}}",
            &image.tag,
        ]),
        RUN_TIMEOUT,
    );
    assert_eq!(
        config.trim(),
        r#"["/usr/local/bin/datapathd"] ["run","--config","/etc/datapath/config.yaml"] 0:0"#
    );

    // The programs under test, in the image.
    let host_version = ok(Command::new(&bins.datapathd).arg("--version"), RUN_TIMEOUT);
    assert_eq!(image.run_ok(&[], &["--version"]), host_version);
    let help = image.run_ok(&["--entrypoint", "/usr/local/bin/lb-ctl"], &["--help"]);
    assert!(help.contains("Usage: lb-ctl"), "{help}");
    let as_user = image.run_ok(
        &["--user", "65532", "--entrypoint", "/usr/local/bin/lb-ctl"],
        &["--version"],
    );
    assert!(as_user.starts_with("lb-ctl "), "{as_user}");

    // Nothing else: every file of the image is one it must hold (read from the image's own
    // tree, mounted, not from a container the runtime has added to).
    let tree = ok(
        Command::new("podman").args(["image", "mount", &image.tag]),
        RUN_TIMEOUT,
    );
    let tree = PathBuf::from(tree.trim());
    let mut files = BTreeSet::new();
    walk(&tree, &tree, &mut files);
    ok(
        Command::new("podman").args(["image", "unmount", &image.tag]),
        RUN_TIMEOUT,
    );
    let want = expected_files(&bins);
    let extra: Vec<&String> = files.difference(&want).collect();
    assert!(
        extra.is_empty(),
        "files the image should not hold: {extra:?}"
    );
    let missing: Vec<&String> = want.difference(&files).collect();
    assert!(missing.is_empty(), "files the image lacks: {missing:?}");

    // The init container's command: it mounts bpffs on an empty /sys/fs/bpf ...
    let script = init_script();
    let empty = work.join("bpffs-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mounted = format!("{script} && grep -c ' /sys/fs/bpf bpf ' /proc/mounts");
    let volume = format!("{}:/sys/fs/bpf", empty.display());
    let count = image.run_ok(
        &["--privileged", "-v", &volume, "--entrypoint", "/bin/sh"],
        &["-c", &mounted],
    );
    assert_eq!(
        count.trim(),
        "1",
        "bpffs mounted once on an empty /sys/fs/bpf"
    );
    // ... and leaves the host's bpffs as it is (no second mount over its pins).
    let count = image.run_ok(
        &[
            "--privileged",
            "-v",
            "/sys/fs/bpf:/sys/fs/bpf",
            "--entrypoint",
            "/bin/sh",
        ],
        &["-c", &mounted],
    );
    assert_eq!(count.trim(), "1", "the host's bpffs left alone");
    let _ = std::fs::remove_dir_all(&work);
}
