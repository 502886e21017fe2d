//! lb-ctl's one error type, and the exit code of each kind.
use std::{io, path::PathBuf};

use datapath_api::{ApiError, ErrorCode};

/// Exit codes (also in `--help` and docs/cli.md).
pub mod exit {
    pub const SUCCESS: u8 = 0;
    /// A failure of the daemon (dataplane, persistence, internal) or of the exchange with it.
    pub const FAILURE: u8 = 1;
    /// Invalid argument: found locally, by clap, or by the daemon.
    pub const INVALID_ARGUMENT: u8 = 2;
    /// The daemon cannot be reached.
    pub const UNREACHABLE: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const ALREADY_EXISTS: u8 = 5;
    pub const CAPACITY_EXHAUSTED: u8 = 6;
    /// The module serving the command is off (`lb-ctl status` says why).
    pub const UNAVAILABLE: u8 = 7;
    /// The service belongs to another source (the services file, Kubernetes); `--force`
    /// changes it anyway.
    pub const OWNED_BY_OTHER_SOURCE: u8 = 8;
}

/// Everything that can go wrong in lb-ctl; each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument failed local validation; nothing was sent.
    #[error("invalid {what} {input:?}: {reason}")]
    InvalidInput {
        what: &'static str,
        input: String,
        reason: String,
    },
    /// The socket could not be connected to.
    #[error("cannot reach datapathd at {}: {source} ({hint})", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    /// The daemon answered with an error.
    #[error("{}", .0.error)]
    Api(ApiError),
    /// The exchange with the daemon broke off or made no sense.
    #[error("{0}")]
    Protocol(String),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[source] io::Error),
}

impl Error {
    pub fn invalid(what: &'static str, input: &str, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            what,
            input: input.to_owned(),
            reason: reason.into(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Error::InvalidInput { .. } => exit::INVALID_ARGUMENT,
            Error::Unreachable { .. } => exit::UNREACHABLE,
            Error::Api(e) => match e.code {
                ErrorCode::InvalidArgument => exit::INVALID_ARGUMENT,
                ErrorCode::NotFound => exit::NOT_FOUND,
                ErrorCode::AlreadyExists => exit::ALREADY_EXISTS,
                ErrorCode::CapacityExhausted => exit::CAPACITY_EXHAUSTED,
                ErrorCode::Unavailable => exit::UNAVAILABLE,
                ErrorCode::OwnedByOtherSource => exit::OWNED_BY_OTHER_SOURCE,
                ErrorCode::DataplaneFailure
                | ErrorCode::PersistenceFailure
                | ErrorCode::Internal => exit::FAILURE,
            },
            Error::Protocol(_) | Error::Output(_) => exit::FAILURE,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code the daemon can answer has its documented exit code (docs/cli.md).
    #[test]
    fn every_error_code_has_its_exit_code() {
        for code in ErrorCode::ALL {
            let want = match code {
                ErrorCode::InvalidArgument => 2,
                ErrorCode::NotFound => 4,
                ErrorCode::AlreadyExists => 5,
                ErrorCode::CapacityExhausted => 6,
                ErrorCode::Unavailable => 7,
                ErrorCode::OwnedByOtherSource => 8,
                ErrorCode::DataplaneFailure
                | ErrorCode::PersistenceFailure
                | ErrorCode::Internal => 1,
            };
            let e = Error::Api(ApiError {
                code,
                error: "why".into(),
            });
            assert_eq!(e.exit_code(), want, "{code}");
        }
    }
}
