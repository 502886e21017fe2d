//! `cargo xtask setup`: everything a fresh machine needs, each step skipped when already done.

use std::{fs, os::unix::fs::symlink, path::PathBuf};

use anyhow::{Context, Result, bail};

use crate::util::{self, capture, command, is_root};

/// The bpf-linker release the BPF build uses.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The PyPI kubernetes-validate release the deploy tests validate rendered manifests with
/// (datapath/tests/deploy.rs), installed into a venv at target/kubernetes-validate.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// The PyPI helm-python-sdk release (Helm's Go SDK as a C library, with Python bindings) the
/// deploy tests render the Helm chart with (deploy/helm/render.py), in the same venv.
const HELM_PYTHON_SDK_VERSION: &str = "0.2.2";

/// Debian packages the tests use.
pub const PACKAGES: [&str; 18] = [
    "iproute2",
    "nftables",
    "iputils-ping",
    "tcpdump",
    "bpftool",
    "ethtool",
    "procps",
    // promtool, for `promtool check metrics` in the namespace tests.
    "prometheus",
    // The socket-LB tests' clients (python3) and DNS backends (dnsmasq, dig). Not `dnsmasq`,
    // which starts a system service.
    "python3",
    "dnsmasq-base",
    "bind9-dnsutils",
    // The venv kubernetes-validate (PyPI) is installed into, for the deploy tests.
    "python3-venv",
    // The graph tests: `dot -Tsvg` parses the DOT export, headless Chromium opens the web view.
    "graphviz",
    // The image test (tests/netns/tests/image.rs): podman builds deploy/image offline, runc
    // runs it (crun refuses this kernel's hybrid cgroups), busybox-static is the image's shell.
    // netavark is only a recommendation of podman's, but podman will not start without a
    // network backend, even for `--network=none`.
    "podman",
    "netavark",
    "runc",
    "busybox-static",
    "chromium",
];

fn step(title: &str) {
    println!("==> setup: {title}");
}

/// `cargo xtask setup` options.
#[derive(clap::Args, Default)]
pub struct SetupArgs {
    /// Rebuild bpf-linker even if the right version is installed (e.g. after a nightly
    /// update changed LLVM).
    #[arg(long)]
    pub rebuild_bpf_linker: bool,
}

pub fn run(args: &SetupArgs) -> Result<()> {
    step("nightly toolchain with rust-src and clippy (BPF programs build on nightly)");
    nightly().context("setting up the nightly toolchain")?;
    step("rustfmt and clippy for the default toolchain");
    util::run(command("rustup").args(["component", "add", "rustfmt", "clippy"]))
        .context("adding rustfmt and clippy")?;
    step(&format!("bpf-linker {BPF_LINKER_VERSION}"));
    bpf_linker(args.rebuild_bpf_linker).context("installing bpf-linker")?;
    step("Debian packages");
    packages().context("installing Debian packages")?;
    step(&format!(
        "kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (PyPI) in target/kubernetes-validate"
    ));
    kubernetes_validate().context("installing kubernetes-validate")?;
    step(&format!(
        "helm-python-sdk {HELM_PYTHON_SDK_VERSION} (PyPI: the Helm engine) in target/kubernetes-validate"
    ));
    helm_python_sdk().context("installing helm-python-sdk")?;
    step("bpffs at /sys/fs/bpf");
    bpffs();
    println!("==> setup: done");
    Ok(())
}

fn nightly() -> Result<()> {
    let toolchains = capture(command("rustup").args(["toolchain", "list"]))
        .context("`rustup toolchain list` failed: is rustup installed?")?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("nightly toolchain present");
    } else {
        util::run(command("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("the BPF build needs a nightly toolchain and rustup could not install one")?;
    }
    util::run(command("rustup").args([
        "component",
        "add",
        "rust-src",
        "clippy",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker_version() -> Option<String> {
    capture(command("bpf-linker").arg("--version")).map(|s| s.trim().to_string())
}

fn bpf_linker(rebuild: bool) -> Result<()> {
    match bpf_linker_version() {
        Some(v) if !rebuild && v.split_whitespace().any(|w| w == BPF_LINKER_VERSION) => {
            println!("{v} already installed");
            return Ok(());
        }
        Some(v) => println!("found {v}; building {BPF_LINKER_VERSION}"),
        None => println!("bpf-linker missing or not runnable; building {BPF_LINKER_VERSION}"),
    }

    // bpf-linker links dynamically against the nightly toolchain's own libLLVM.
    let sysroot = capture(command("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot` failed")?;
    let libdir = PathBuf::from(sysroot.trim()).join("lib");
    let mut candidates: Vec<PathBuf> = fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so"))
        })
        .collect();
    candidates.sort();
    let Some(lib) = candidates.pop() else {
        bail!(
            "no libLLVM.so* in {}: the nightly toolchain ships no shared LLVM",
            libdir.display()
        );
    };
    let file_name = lib
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM file name")?
        .to_string();
    let major =
        llvm_major(&file_name).context("cannot tell the nightly toolchain's LLVM version")?;
    println!("using {} (LLVM {major})", lib.display());

    // The prefix's lib/ ends up in bpf-linker's RUNPATH, so it must outlive this work tree
    // (CI runs in fresh clones; `cargo clean` empties target/): keep it under $CARGO_HOME,
    // next to the installed binary. If nightly is updated, the links dangle, `bpf-linker
    // --version` fails, and the next setup rebuilds against the new LLVM.
    let prefix = util::cargo_home().join("bpf-linker-llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", file_name.as_str()] {
        let link = prefix_lib.join(name);
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(&lib, &link).with_context(|| format!("linking {}", link.display()))?;
    }

    let feature = format!("llvm-{major}");
    util::run(
        command("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args(["+nightly", "install", "bpf-linker", "--force", "--version"])
            .arg(BPF_LINKER_VERSION)
            .args(["--no-default-features", "--features", &feature]),
    )?;
    match bpf_linker_version() {
        Some(v) if v.contains(BPF_LINKER_VERSION) => {
            println!("installed {v}");
            Ok(())
        }
        other => bail!("bpf-linker was built but `bpf-linker --version` says {other:?}"),
    }
}

/// LLVM major version: from `rustc +nightly -vV`'s `LLVM version:` line, else from the
/// library's name (`libLLVM.so.22.1-rust-...`).
fn llvm_major(file_name: &str) -> Option<u32> {
    let from_rustc = capture(command("rustc").args(["+nightly", "-vV"])).and_then(|out| {
        out.lines()
            .find_map(|l| l.strip_prefix("LLVM version:"))
            .and_then(|v| v.trim().split('.').next()?.parse().ok())
    });
    from_rustc.or_else(|| {
        file_name
            .strip_prefix("libLLVM.so.")?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

fn installed(package: &str) -> bool {
    capture(command("dpkg-query").args(["-W", "-f", "${Status}", package]))
        .is_some_and(|s| s.trim() == "install ok installed")
}

fn packages() -> Result<()> {
    if capture(command("dpkg-query").arg("--version")).is_none() {
        bail!(
            "dpkg not found: this is not a Debian-based machine; install the equivalents of {} by hand",
            PACKAGES.join(" ")
        );
    }
    let missing: Vec<&str> = PACKAGES.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("all present: {}", PACKAGES.join(" "));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {} and not root: run setup as root",
            missing.join(" ")
        );
    }
    util::run(
        command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-q"]),
    )?;
    util::run(
        command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// The venv datapath/tests/deploy.rs looks in for `kubernetes-validate`.
fn kubernetes_validate_venv() -> PathBuf {
    util::target_dir().join("kubernetes-validate")
}

/// `kubernetes-validate` from PyPI, with pip, in its own venv (python3 is a Debian package
/// above; pip needs to reach PyPI).
fn kubernetes_validate() -> Result<()> {
    let venv = kubernetes_validate_venv();
    let bin = venv.join("bin/kubernetes-validate");
    let installed = capture(command(bin.to_str().context("venv path")?).arg("--version"));
    if let Some(v) = installed.as_deref().map(str::trim)
        && v == KUBERNETES_VALIDATE_VERSION
    {
        println!("kubernetes-validate {v} already installed");
        return Ok(());
    }
    if !venv.join("bin/pip").exists() {
        util::run(command("python3").args(["-m", "venv"]).arg(&venv))
            .context("creating the venv (Debian: python3-venv)")?;
    }
    util::run(
        command(venv.join("bin/pip").to_str().context("venv path")?)
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )),
    )?;
    match capture(command(bin.to_str().context("venv path")?).arg("--version")) {
        Some(v) if v.trim() == KUBERNETES_VALIDATE_VERSION => {
            println!("installed kubernetes-validate {}", v.trim());
            Ok(())
        }
        other => bail!("kubernetes-validate was installed but `--version` says {other:?}"),
    }
}

/// helm-python-sdk from PyPI into the deploy tests' venv (made by [`kubernetes_validate`]).
fn helm_python_sdk() -> Result<()> {
    let python = kubernetes_validate_venv().join("bin/python");
    let python = python.to_str().context("venv path")?;
    let version = || {
        capture(command(python).args([
            "-c",
            "import helm_python; print(helm_python.__version__, helm_python.helm_sdk_version())",
        ]))
    };
    if let Some(v) = version()
        && v.split_whitespace().next() == Some(HELM_PYTHON_SDK_VERSION)
    {
        println!("helm-python-sdk {} already installed", v.trim());
        return Ok(());
    }
    util::run(
        command(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(format!("helm-python-sdk=={HELM_PYTHON_SDK_VERSION}")),
    )?;
    match version() {
        Some(v) if v.split_whitespace().next() == Some(HELM_PYTHON_SDK_VERSION) => {
            println!("installed helm-python-sdk {}", v.trim());
            Ok(())
        }
        other => bail!("helm-python-sdk was installed but reports {other:?}"),
    }
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there (the daemon does it too when it
/// starts; this makes pins visible to tools like bpftool from the start).
fn bpffs() {
    let mounted = fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    });
    if mounted {
        println!("already mounted");
        return;
    }
    if !is_root() {
        println!("not root; leaving it to the daemon");
        return;
    }
    if let Err(e) = util::run(command("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
        println!("warning: {e:#} (the daemon mounts it itself)");
    }
}
