//! Empty host library so the daemon can declare a build-dependency on this crate (cargo then
//! rebuilds the daemon when the programs change). The programs are the `bpf-trace` binary, built
//! for `bpfel-unknown-none`.
#![no_std]
