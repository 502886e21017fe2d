//! Builds the BPF program crates from a build script.
//!
//! aya-build 0.2.0 (the newest that builds with this toolchain) compiles into a target directory
//! under the build script's `OUT_DIR`. Cargo gives every feature set of the calling crate its
//! own `OUT_DIR`, so each `cargo test -p …` with a different package selection rebuilt every
//! program from scratch (core included), about two minutes and 1 GB each time. Here all build
//! scripts of a workspace share one nested target directory per variant, under the outer target
//! directory: when a build script reruns, the nested cargo finds the programs fresh.
//!
//! The nested cargo's output goes to the build script's stderr, which cargo shows when the build
//! script fails.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The environment variable that skips the BPF build (host-only work: fuzzing, docs); the
/// objects are then left empty and the loaders refuse to start with a clear message.
pub const SKIP_VAR: &str = "AYA_BUILD_SKIP";

/// Why the programs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not set (bpf-build runs only from a build script)")]
    MissingEnv(&'static str),
    #[error("unsupported target endianness {0:?}")]
    Endian(String),
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}); its output is above")]
    Cargo {
        command: String,
        status: std::process::ExitStatus,
    },
}

/// One BPF crate of the workspace; its binary has the crate's name.
pub struct Program<'a> {
    /// The package name, which is also its directory under the workspace root and the name of
    /// the object written to `OUT_DIR`.
    pub package: &'a str,
    /// Features of that package to enable.
    pub features: &'a [&'a str],
}

/// Builds `programs` in release for the BPF target of this host's endianness, with the nightly
/// toolchain and `-Z build-std=core`, and copies each object to `OUT_DIR/<package>`.
///
/// `variant` names the nested target directory: builds with different features (the upgrade
/// test's variant) keep their own, so they never rebuild each other.
pub fn build(programs: &[Program<'_>], variant: &str) -> Result<(), Error> {
    println!("cargo:rerun-if-env-changed={SKIP_VAR}");
    let out_dir = PathBuf::from(var("OUT_DIR")?);
    let workspace = workspace_root()?;
    for program in programs {
        // The build-dependency on each program crate reruns us when its library or the crates
        // it uses change; this covers its binary's sources.
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(program.package).display()
        );
    }
    if env::var_os(SKIP_VAR).is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:warning={SKIP_VAR} is set: the BPF programs are not built");
        for program in programs {
            let object = out_dir.join(program.package);
            if !object.exists() {
                fs::write(&object, []).map_err(io("cannot write", &object))?;
            }
        }
        return Ok(());
    }

    let endian = var("CARGO_CFG_TARGET_ENDIAN")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => return Err(Error::Endian(other.to_string())),
    };
    let arch = var("CARGO_CFG_TARGET_ARCH")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        arch.as_str()
    };

    let target_dir = shared_target_dir(&out_dir).join(variant);
    let mut cmd = nightly_cargo();
    cmd.current_dir(&workspace).args([
        "build",
        "--release",
        "--bins",
        "--target",
        target,
        "-Z",
        "build-std=core",
    ]);
    cmd.arg("--target-dir").arg(&target_dir);
    let mut features = Vec::new();
    for program in programs {
        cmd.args(["--package", program.package]);
        features.extend(
            program
                .features
                .iter()
                .map(|f| format!("{}/{f}", program.package)),
        );
    }
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    // BTF is what the loader and the verifier need from the debug info.
    let flags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
    ];
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    // The outer build's compiler and wrappers are the stable toolchain's.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    // Our stdout is read by cargo as build-script directives; the nested output goes to stderr.
    cmd.stdin(Stdio::null()).stdout(std::io::stderr());
    let command = format!("{cmd:?}");
    let status = cmd.status().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if !status.success() {
        return Err(Error::Cargo { command, status });
    }
    for program in programs {
        let built = target_dir
            .join(target)
            .join("release")
            .join(program.package);
        let object = out_dir.join(program.package);
        fs::copy(&built, &object).map_err(io("cannot copy the built program", &built))?;
    }
    Ok(())
}

fn var(name: &'static str) -> Result<String, Error> {
    env::var(name).map_err(|_| Error::MissingEnv(name))
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

/// The workspace root: the parent of the calling crate's directory (every crate that builds
/// programs sits at the top level of the workspace).
fn workspace_root() -> Result<PathBuf, Error> {
    let manifest = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let parent = manifest.parent().unwrap_or(&manifest);
    parent
        .canonicalize()
        .map_err(io("cannot resolve the workspace root", parent))
}

/// `bpf-programs/` in the outer target directory (the nearest ancestor of `OUT_DIR` that cargo
/// marked with `CACHEDIR.TAG`), or under `OUT_DIR` when there is none.
fn shared_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .unwrap_or(out_dir)
        .join("bpf-programs")
}

/// `rustup run nightly cargo`, or plain `cargo` where rustup is missing (its toolchain must then
/// be a nightly).
fn nightly_cargo() -> Command {
    let rustup_found = env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join("rustup").is_file()));
    if rustup_found {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo"]);
        // rustup's proxies pick the toolchain from this when set by an outer `cargo +toolchain`.
        cmd.env_remove("RUSTUP_TOOLCHAIN");
        cmd
    } else {
        Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
    }
}
