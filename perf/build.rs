//! Compiles `bpf-perf` (the generator and sink programs) for `bpfel-unknown-none` (`bpf-build`);
//! the tools embed the object with `include_bytes_aligned!`.
fn main() -> Result<(), bpf_build::Error> {
    bpf_build::build(
        &[bpf_build::Program {
            package: "bpf-perf",
            features: &[],
        }],
        "default",
    )
}
