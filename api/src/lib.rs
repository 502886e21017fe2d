//! The contract between `datapathd`'s HTTP/JSON API and its clients: every route's path,
//! method, query, request body and answer, and the error answers.
//!
//! Transport: HTTP/1.1 over a Unix socket (default [`DEFAULT_SOCKET`], mode 0600, owned by
//! root). Bodies are JSON, at most 2 MiB. Every error answers with a non-2xx status and an
//! [`ApiError`] body, 404 for an unknown route and 405 (with `Allow`) for a wrong method
//! included. Prose, examples and the errors of each route: docs/api.md.
//!
//! - [`routes`]: every route as a type ([`Route`]) and as a table ([`routes::ROUTES`]),
//!   with the path constants the daemon's router uses.
//! - [`lb`]: services, backends, counters (`/v1/services...`, `/v1/stats`); [`model`]: the
//!   load balancer's desired state, which the state file stores too.
//! - [`policy`]: `/v1/policy`, the policy file's types among them.
//! - [`conntrack`]: `/v1/conntrack` (its filters), `/v1/conntrack/stats`.
//! - [`flows`]: `/v1/flows`, the recent events and the follow stream.
//! - [`status`]: `/v1/status`, `/healthz`.
//! - [`socklb`]: `/v1/socklb`, the socket load balancer.
//! - [`dns`]: `/v1/dns`, `/v1/dns/names`, names learned from DNS answers.
//! - [`proc`]: `/v1/proc`, `/v1/proc/status`, processes the exec module follows.
//! - [`graph`]: `/v1/graph`, `/v1/graph/status`, the service dependency graph.
//! - [`error`]: [`ApiError`], [`ErrorCode`], and [`Error`], this crate's one error type (a
//!   value that does not parse).
//!
//! The types write exactly what the daemon answers (tests/wire.rs holds real answers):
//! changing a field's name, its optionality or an enum's spelling changes the API.

pub mod conntrack;
pub mod dns;
pub mod error;
pub mod flows;
pub mod graph;
pub mod lb;
pub mod model;
pub mod node;
pub mod policy;
pub mod proc;
pub mod routes;
pub mod socklb;
pub mod sources;
pub mod status;

// Every type at the crate's root too: `datapath_api::ServiceView` and friends are the paths the
// daemon, lb-ctl and the tests use.
pub use conntrack::*;
pub use dns::*;
pub use error::*;
pub use flows::*;
pub use graph::*;
pub use lb::*;
pub use model::*;
pub use node::*;
pub use policy::*;
pub use proc::*;
pub use routes::{Route, RouteInfo};
pub use socklb::*;
pub use sources::*;
pub use status::*;

/// Where `datapathd` listens and `lb-ctl` connects by default.
pub const DEFAULT_SOCKET: &str = "/run/datapath/api.sock";
