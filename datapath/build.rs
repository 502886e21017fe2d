//! Compiles the BPF crates for `bpfel-unknown-none` with the nightly toolchain (`bpf-build`); the
//! daemon embeds the resulting objects with `include_bytes_aligned!`.
use bpf_build::Program;

fn main() -> Result<(), bpf_build::Error> {
    // `DATAPATH_BPF_VARIANT=upgrade-test` builds the program variant the upgrade test restarts
    // the daemon onto (different bytecode, same behaviour). Never set for a real build.
    println!("cargo:rerun-if-env-changed=DATAPATH_BPF_VARIANT");
    let (variant, xdp_features): (&str, &[&str]) =
        match std::env::var("DATAPATH_BPF_VARIANT").as_deref() {
            Ok("upgrade-test") => ("upgrade-test", &["upgrade-test-variant"]),
            _ => ("default", &[]),
        };
    let program = |package| Program {
        package,
        features: &[],
    };
    bpf_build::build(
        &[
            Program {
                package: "bpf-xdp",
                features: xdp_features,
            },
            program("bpf-tc"),
            program("bpf-sock"),
            program("bpf-dns"),
            program("bpf-trace"),
        ],
        variant,
    )
}
