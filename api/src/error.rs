//! Error answers: the [`ApiError`] body every route answers on failure, and its [`ErrorCode`].

use std::fmt;

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
    /// The service belongs to another source (the services file, Kubernetes); the API changes
    /// it only with `force` (HTTP 409).
    OwnedByOtherSource,
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
    /// Every code, in the order of docs/api.md's table.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::DataplaneFailure,
        ErrorCode::PersistenceFailure,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::CapacityExhausted,
        ErrorCode::OwnedByOtherSource,
    ];

    /// The code as the wire spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::OwnedByOtherSource => "owned_by_other_source",
            ErrorCode::CapacityExhausted => "capacity_exhausted",
            ErrorCode::DataplaneFailure => "dataplane_failure",
            ErrorCode::PersistenceFailure => "persistence_failure",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    /// The code of an error answer that came without one (the HTTP layer's own 404, 405,
    /// 413, a handler's plain-text answer): what the daemon puts in the body it makes for it.
    pub fn for_http_status(status: u16) -> ErrorCode {
        match status {
            404 => ErrorCode::NotFound,
            409 => ErrorCode::AlreadyExists,
            503 => ErrorCode::Unavailable,
            507 => ErrorCode::CapacityExhausted,
            400..=499 => ErrorCode::InvalidArgument,
            _ => ErrorCode::Internal,
        }
    }

    /// The status an answer with this code has. The exceptions are the daemon's: a method the
    /// route does not have is 405 and a body over the limit 413, both `invalid_argument`.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists | ErrorCode::OwnedByOtherSource => 409,
            ErrorCode::CapacityExhausted => 507,
            ErrorCode::DataplaneFailure | ErrorCode::PersistenceFailure | ErrorCode::Internal => {
                500
            }
            ErrorCode::Unavailable => 503,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    /// One line, meant for people.
    pub error: String,
}

/// The crate's one error type: a value of the API that does not parse (a CIDR, a port range,
/// a protocol, a conntrack state or table). Each displays as the one line the daemon answers
/// in its 400 (policy file refused, filter refused), so the texts are part of the contract.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid prefix length in CIDR {0:?}")]
    CidrPrefix(String),
    #[error("invalid CIDR {0:?} (expected ADDR/LEN: a.b.c.d/len or an IPv6 prefix)")]
    CidrAddress(String),
    #[error("CIDR {0:?} has host bits set")]
    CidrHostBits(String),
    /// A port of a range: (the port as written, the whole range as written).
    #[error("invalid port {0:?} in {1:?} (0-65535)")]
    Port(String, String),
    /// A port given as a number (YAML `ports: 70000`).
    #[error("port {0} out of range 0-65535")]
    PortNumber(i128),
    #[error("port range {0:?} is empty (start > end)")]
    EmptyPortRange(String),
    #[error("unknown protocol {0:?}: accepted: tcp, udp, icmp, icmpv6, or a number 0-255")]
    Protocol(String),
    /// An unknown conntrack state: (the state as written, the accepted names).
    #[error("unknown state {0:?}: accepted: {1}")]
    State(String, String),
    #[error("unknown table {0:?}: accepted: policy, lb")]
    Table(String),
    /// An address of a query: (the field, the value as written).
    #[error("{0} {1:?} is not an IP address")]
    Address(&'static str, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status of every code, and its spelling on the wire (lb-ctl's exit codes and the
    /// daemon's answers depend on both).
    #[test]
    fn every_code_has_its_status_and_spelling() {
        let want = [
            (ErrorCode::InvalidArgument, 400, "invalid_argument"),
            (ErrorCode::NotFound, 404, "not_found"),
            (ErrorCode::AlreadyExists, 409, "already_exists"),
            (ErrorCode::DataplaneFailure, 500, "dataplane_failure"),
            (ErrorCode::PersistenceFailure, 500, "persistence_failure"),
            (ErrorCode::Internal, 500, "internal"),
            (ErrorCode::Unavailable, 503, "unavailable"),
            (ErrorCode::CapacityExhausted, 507, "capacity_exhausted"),
            (ErrorCode::OwnedByOtherSource, 409, "owned_by_other_source"),
        ];
        assert_eq!(want.map(|w| w.0), ErrorCode::ALL);
        for (code, status, spelling) in want {
            assert_eq!(code.http_status(), status, "{code:?}");
            assert_eq!(code.as_str(), spelling);
            assert_eq!(code.to_string(), spelling);
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{spelling}\"")
            );
            assert_eq!(
                serde_json::from_str::<ErrorCode>(&format!("\"{spelling}\"")).unwrap(),
                code
            );
        }
    }

    /// A code's own status gives the code back where the status has one code; the 500s
    /// without a code are `internal`, the other 4xx `invalid_argument`.
    #[test]
    fn codes_for_answers_without_one() {
        for code in ErrorCode::ALL {
            let back = ErrorCode::for_http_status(code.http_status());
            match code {
                ErrorCode::DataplaneFailure | ErrorCode::PersistenceFailure => {
                    assert_eq!(back, ErrorCode::Internal)
                }
                // A bare 409 is a duplicate; ownership conflicts always carry their code.
                ErrorCode::OwnedByOtherSource => assert_eq!(back, ErrorCode::AlreadyExists),
                _ => assert_eq!(back, code),
            }
        }
        for (status, code) in [
            (405, ErrorCode::InvalidArgument),
            (413, ErrorCode::InvalidArgument),
            (502, ErrorCode::Internal),
            (504, ErrorCode::Internal),
        ] {
            assert_eq!(ErrorCode::for_http_status(status), code, "{status}");
        }
    }
}
