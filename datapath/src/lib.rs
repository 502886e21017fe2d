//! `datapathd`'s library: the dataplane (BPF loading and map programming), the desired-state
//! store and the HTTP/JSON API.
pub mod dataplane;
pub mod error;
pub mod state;
pub mod api;

pub use error::{Error, Result};
