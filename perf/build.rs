//! Compiles `bpf-perf` (the generator and sink programs) for `bpfel-unknown-none`; the tools
//! embed the object with `include_bytes_aligned!`.
use std::path::PathBuf;

use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let bpf_dir = manifest_dir.join("..").join("bpf-perf").canonicalize()?;
    let root_dir = bpf_dir.to_string_lossy().into_owned();
    aya_build::build_ebpf(
        [Package {
            name: "bpf-perf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )?;
    let object = PathBuf::from(std::env::var("OUT_DIR")?).join("bpf-perf");
    if !object.exists() {
        std::fs::write(&object, [])?;
    }
    Ok(())
}
