//! Integration-test harness for `datapathd` and `lb-ctl` in real network namespaces.
//!
//! The library holds the one implementation of the test topology (namespaces, veths, bridge,
//! addresses), the backend servers and clients that run inside those namespaces, and a handle
//! on the real daemon binary. The integration tests in `tests/` and `cargo xtask demo` both use
//! it.
//!
//! ```text
//!  client ns "<p>c"          LB ns "<p>lb"              switch ns "<p>sw"      backend ns "<p>bN"
//!  eth0 198.18.0.1/24 <-veth-> lbc 198.18.0.2/24
//!                              lbb 198.18.1.1/24 <-veth-> p0 (br0)   pN (br0) <-veth-> eth0 198.18.1.1N/24
//! ```
//!
//! Every topology has its own name prefix, so tests never share state, and a `Drop` guard that
//! stops processes and deletes the namespaces, also when a test fails. Traffic only ever flows
//! between namespaces the harness created, on addresses from 198.18.0.0/15.

pub mod browser;
pub mod cgroup;
pub mod client;
pub mod cmd;
pub mod cpu;
pub mod daemon;
pub mod dns;
pub mod http;
pub mod kube_api;
pub mod lab;
pub mod netns;
pub mod privilege;
pub mod servers;
pub mod topology;
pub mod wait;

pub use client::{Conn, Spread};
pub use daemon::{Binaries, Daemon, DaemonOptions};
pub use lab::{Lab, LabOptions};
pub use privilege::privileged;
pub use servers::BackendServer;
pub use topology::{Topology, TopologyOptions};
