//! The datapath's benchmark tools (`cargo xtask bench`).
//!
//! - [`pktgen`]: an in-kernel packet generator on BPF_PROG_TEST_RUN's XDP live-frames mode.
//! - [`forward`]: forwarding rate through the XDP load balancer against nftables DNAT and the
//!   machine's XDP_DROP floor, and the daemon's footprint.
//! - [`cost`]: per-program ns/packet through BPF_PROG_TEST_RUN.
//! - [`report`]: medians, the results table and its JSON.
//! - [`socklb`]: what the socket LB costs a `connect()`, against direct and nftables DNAT.
//! - [`fuzz`]: `dp-fuzz`, mutated and random frames through `xdp_lb` and the tc programs with
//!   BPF_PROG_TEST_RUN, every verdict, counter and output frame checked.
//!
//! Benchmarks print figures; nothing here asserts a timing.

pub mod bpf;
pub mod cost;
pub mod dns;
pub mod exec;
pub mod forward;
pub mod fuzz;
pub mod graph;
pub mod kubernetes;
pub mod netlink;
pub mod pktgen;
pub mod report;
pub mod socklb;
pub mod topo;
