//! The contract between `datapathd`'s HTTP/JSON API and its clients.
//!
//! Transport: HTTP/1.1 over a Unix socket (default [`DEFAULT_SOCKET`], mode 0600, owned by
//! root). Bodies are JSON, at most 2 MiB. Every error answers with a non-2xx status and an
//! [`ApiError`] body, 404 for an unknown route and 405 (with `Allow`) for a wrong method
//! included. Every route (those of the policy module too), its bodies and its errors:
//! docs/api.md.
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | `/v1/services` | - | `Vec<ServiceView>` |
//! | POST | `/v1/services` | [`CreateService`] | 201, [`ServiceView`] |
//! | GET | `/v1/services/{proto}/{vip}/{port}` | - | [`ServiceView`] |
//! | DELETE | `/v1/services/{proto}/{vip}/{port}` | - | [`ServiceView`] (as removed) |
//! | POST | `/v1/services/{proto}/{vip}/{port}/backends` | [`AddBackend`] | 201, [`ServiceView`] |
//! | PATCH | `/v1/services/{proto}/{vip}/{port}/backends/{addr}/{port}` | [`UpdateBackend`] | [`ServiceView`] |
//! | DELETE | `/v1/services/{proto}/{vip}/{port}/backends/{addr}/{port}` | - | [`ServiceView`] |
//! | GET | `/v1/stats` | - | [`StatsView`] |
//! | GET | `/v1/status` | - | [`StatusView`] |
//! | GET | `/healthz` | - | `{"status":"ok"}` |
//!
//! `{proto}` is `tcp` or `udp`; IPv6 addresses appear in paths without brackets.

pub mod error;
pub mod lb;
pub mod model;
pub mod status;

// Every type at the crate's root too: `datapath_api::ServiceView` and friends are the paths the
// daemon, lb-ctl and the tests use.
pub use error::*;
pub use lb::*;
pub use model::*;
pub use status::*;

/// Where `datapathd` listens and `lb-ctl` connects by default.
pub const DEFAULT_SOCKET: &str = "/run/datapath/api.sock";
