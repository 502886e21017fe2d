//! bpf-linker must be on PATH for the BPF target; fail early with a clear message otherwise.
fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.starts_with("bpf") && which::which("bpf-linker").is_err() {
        println!("cargo:warning=bpf-linker not found on PATH; run `cargo xtask setup` to build it");
    }
}
