//! Error answers: the [`ApiError`] body every route answers on failure, and its [`ErrorCode`].

use serde::{Deserialize, Serialize};

/// Machine-readable class of an API error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed request or invalid value (HTTP 400; also the code of a 405 for a method the
    /// route does not have and of a 413 for a body over the size limit).
    InvalidArgument,
    /// Unknown service or backend (HTTP 404).
    NotFound,
    /// Duplicate service or backend (HTTP 409).
    AlreadyExists,
    /// A configured capacity (services, backends) is exhausted (HTTP 507).
    CapacityExhausted,
    /// Programming the BPF maps failed; the previous state keeps serving (HTTP 500).
    DataplaneFailure,
    /// Writing the state file failed; the change was rolled back (HTTP 500).
    PersistenceFailure,
    /// Anything else (HTTP 500).
    Internal,
    /// The module that serves the route is off (disabled, or a kernel feature it needs is
    /// missing); `GET /v1/status` says why (HTTP 503).
    Unavailable,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists => 409,
            ErrorCode::CapacityExhausted => 507,
            ErrorCode::DataplaneFailure | ErrorCode::PersistenceFailure | ErrorCode::Internal => {
                500
            }
            ErrorCode::Unavailable => 503,
        }
    }
}

/// Body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    /// One line, meant for people.
    pub error: String,
}
