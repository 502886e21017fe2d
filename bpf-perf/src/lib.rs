//! Empty host library so `dp-perf` can declare a build-dependency on this crate (cargo then
//! rebuilds the benchmark tools when the programs change). The programs are the `bpf-perf`
//! binary, built for `bpfel-unknown-none`.
#![no_std]
