//! The error type of the core crate.

use std::path::PathBuf;

/// Result alias of the core crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in `unilora-core`. Each variant carries a message
/// that names the offending value, so callers can show it as is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A bad argument: `d = 0`, `d > D`, an empty shape list, a non-positive dimension…
    #[error("{0}")]
    InvalidArgument(String),
    /// The trainable vector has the wrong length or holds NaN/Inf.
    #[error("{0}")]
    Vector(String),
    /// An unsupported or mismatched dtype.
    #[error("{0}")]
    Dtype(String),
    /// A malformed file: corrupt safetensors header, bad JSON, header size bomb…
    #[error("{path}: {msg}")]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// Adapter and base (or adapter and its own config) do not agree: missing or
    /// ambiguous target tensor, shape mismatch, fingerprint mismatch.
    #[error("{0}")]
    Mismatch(String),
    /// An I/O error, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The operation was cancelled (e.g. by a Python KeyboardInterrupt).
    #[error("interrupted")]
    Interrupted,
}

impl CoreError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        CoreError::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
