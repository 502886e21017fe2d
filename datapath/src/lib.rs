//! `datapathd`'s library: the dataplane (BPF loading and map programming), the desired-state
//! store and the HTTP/JSON API.
pub mod api;
pub mod bpffs_check;
pub mod config;
pub mod dataplane;
pub mod error;
pub mod features;
pub mod gc;
pub mod metrics;
pub mod policy;
pub mod policyd;
pub mod runtime;
pub mod state;
pub mod text;

pub use error::{Error, Result};
