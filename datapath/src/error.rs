//! The daemon library's one error type.
use std::path::PathBuf;

/// Everything that can go wrong in the daemon library.
///
/// aya's errors are large; they are boxed so that every `Result` of the crate stays small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request or configuration value is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// A service or backend does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A service or backend already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The service belongs to another source; the API changes it only when forced.
    #[error("{0}")]
    OwnedByOtherSource(String),
    /// The module serving the request is off (disabled or missing a kernel feature).
    #[error("{0}")]
    Unavailable(String),
    /// A configured capacity is exhausted.
    #[error("capacity exhausted: {0}")]
    CapacityExhausted(String),
    /// Loading or attaching a BPF program failed.
    #[error("{context}: {source}")]
    Program {
        context: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// Loading the BPF object failed.
    #[error("{context}: {source}")]
    Load {
        context: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// Reading or writing a BPF map failed.
    #[error("{context}: {source}")]
    Map {
        context: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// Pinning or opening a pinned object failed.
    #[error("{context}: {source}")]
    Pin {
        context: String,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    /// Writing or reading the state file failed.
    #[error("state file {}: {source}", path.display())]
    Persistence {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state file exists but cannot be understood.
    #[error("state file {}: {reason}", path.display())]
    CorruptState { path: PathBuf, reason: String },
    /// The configuration file is invalid: names the file, the line (when known) and the key.
    #[error("config {}{}: key `{key}`: {reason}", file.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Config {
        file: PathBuf,
        line: Option<usize>,
        key: String,
        reason: String,
    },
    /// The services file is invalid: names the file, the line (when known) and the key.
    #[error("services file {}{}: key `{key}`: {reason}", file.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    ServicesFile {
        file: PathBuf,
        line: Option<usize>,
        key: String,
        reason: String,
    },
    /// A policy file is invalid: the line (when known) and the reason.
    #[error("policy{}: {reason}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Policy { line: Option<usize>, reason: String },
    /// A bug or an unexpected failure inside the daemon (a task that panicked, say).
    #[error("internal: {0}")]
    Internal(String),
    /// `source`, with what was being done.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
    /// Another I/O failure.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// This error with what was being done in front of it; the kind (and so the API status)
    /// stays the inner error's.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The error under every [`Error::Context`].
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            other => other,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// `map_err` adapter: an aya map error with what was being done.
pub(crate) fn map_error(context: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> Error {
    let context = context.into();
    move |source| Error::Map {
        context,
        source: Box::new(source),
    }
}

/// `map_err` adapter: an aya program error with what was being done.
pub(crate) fn program_error(
    context: impl Into<String>,
) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    let context = context.into();
    move |source| Error::Program {
        context,
        source: Box::new(source),
    }
}

/// Result with the daemon library's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `reason` on one line: control characters (a line break inside a quoted key, say) are
/// written as escapes, so an error stays one line on a terminal and in a log.
pub(crate) fn single_line(reason: &str) -> String {
    if !reason.chars().any(char::is_control) {
        return reason.to_string();
    }
    reason
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
