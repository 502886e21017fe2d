//! Compiles the BPF crates for `bpfel-unknown-none` with the nightly toolchain; the daemon
//! embeds the resulting objects with `include_bytes_aligned!`.
use std::path::PathBuf;

use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let bpf_xdp_dir = manifest_dir.join("..").join("bpf-xdp").canonicalize()?;
    let root_dir = bpf_xdp_dir.to_string_lossy().into_owned();
    // `DATAPATH_BPF_VARIANT=upgrade-test` builds the program variant the upgrade test restarts
    // the daemon onto (different bytecode, same behaviour). Never set for a real build.
    println!("cargo:rerun-if-env-changed=DATAPATH_BPF_VARIANT");
    let features: &[&str] = match std::env::var("DATAPATH_BPF_VARIANT").as_deref() {
        Ok("upgrade-test") => &["upgrade-test-variant"],
        _ => &[],
    };
    let bpf_tc_dir = manifest_dir.join("..").join("bpf-tc").canonicalize()?;
    let tc_root_dir = bpf_tc_dir.to_string_lossy().into_owned();
    let bpf_sock_dir = manifest_dir.join("..").join("bpf-sock").canonicalize()?;
    let sock_root_dir = bpf_sock_dir.to_string_lossy().into_owned();
    let bpf_dns_dir = manifest_dir.join("..").join("bpf-dns").canonicalize()?;
    let dns_root_dir = bpf_dns_dir.to_string_lossy().into_owned();
    let bpf_trace_dir = manifest_dir.join("..").join("bpf-trace").canonicalize()?;
    let trace_root_dir = bpf_trace_dir.to_string_lossy().into_owned();
    aya_build::build_ebpf(
        [
            Package {
                name: "bpf-xdp",
                root_dir: &root_dir,
                features,
                ..Default::default()
            },
            Package {
                name: "bpf-tc",
                root_dir: &tc_root_dir,
                ..Default::default()
            },
            Package {
                name: "bpf-sock",
                root_dir: &sock_root_dir,
                ..Default::default()
            },
            Package {
                name: "bpf-dns",
                root_dir: &dns_root_dir,
                ..Default::default()
            },
            Package {
                name: "bpf-trace",
                root_dir: &trace_root_dir,
                ..Default::default()
            },
        ],
        Toolchain::default(),
    )?;
    // With AYA_BUILD_SKIP (host-only work), leave an empty object so the crate still compiles;
    // the loader refuses to start with a clear message.
    for name in ["bpf-xdp", "bpf-tc", "bpf-sock", "bpf-dns", "bpf-trace"] {
        let object = PathBuf::from(std::env::var("OUT_DIR")?).join(name);
        if !object.exists() {
            std::fs::write(&object, [])?;
        }
    }
    Ok(())
}
