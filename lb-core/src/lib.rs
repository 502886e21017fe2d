//! Load-balancer logic that the XDP program and the daemon share, unit-tested on the host.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod capture;
pub mod csum;
pub mod flood;
pub mod hash;
#[cfg(feature = "alloc")]
pub mod maglev;
pub mod parse;
pub mod parse6;
