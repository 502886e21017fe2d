//! `datapathd`'s library: controllers on one bus under a supervisor (docs/architecture.md).
//!
//! - [`controller`], [`supervisor`], [`bus`]: the frame every module plugs into;
//! - [`lb`], [`policy`], [`ct`] (conntrack), [`prog_stats`], [`netlink`], the service sources
//!   [`service_file`] and [`kubernetes`]: the controllers;
//! - [`bpf`]: loading, pins, links, batch map operations, ring buffers;
//! - [`server`] (the API over a Unix socket), [`metrics`], [`config`], [`persist`].
pub mod bpf;
pub mod bpffs_check;
pub mod bus;
pub mod config;
pub mod controller;
pub mod ct;
pub mod daemon;
pub mod dns;
pub mod error;
pub mod exec;
pub mod features;
pub mod graph;
pub mod kubernetes;
pub mod lb;
pub mod metrics;
pub mod netlink;
pub mod persist;
pub mod policy;
pub mod prog_stats;
pub mod server;
pub mod service_file;
pub mod socklb;
pub mod supervisor;
pub mod text;
pub mod watch;

// The paths of the modules before controllers, used by the tests, benchmarks and fuzzers.
pub use ct::gc;
pub use lb::{dataplane, store as state};
pub use server as api;

pub use error::{Error, Result};
