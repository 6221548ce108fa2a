//! The crate-level error type. Each module has its own error enum with structured fields; this
//! enum wraps them at the crate boundary.

use std::path::PathBuf;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the plugin.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model could not be fingerprinted.
    #[error(transparent)]
    Fingerprint(#[from] crate::fingerprint::FingerprintError),
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The engine failed.
    #[error("engine: {0:#}")]
    Engine(anyhow::Error),
    /// A model file is missing or unreadable.
    #[error("model file {path}: {reason}")]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Input the caller gave is unusable (the message says why).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An I/O error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
