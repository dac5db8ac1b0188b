//! The one error type the command line maps to exit codes (the README's
//! "Exit codes").
//!
//! Library modules keep their own typed errors; at the command edge they are
//! sorted into "bad input found before anything ran" (exit 2) and "some work
//! failed" (exit 1).

/// An error as the command line reports it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage, bad spec or bad data found before anything ran: exit 2.
    #[error("{0}")]
    Usage(String),
    /// Some asked work failed: exit 1.
    #[error("{0}")]
    Failed(String),
    /// Stopped by Ctrl-C, SIGTERM or SIGHUP: exit 130, as shells report a
    /// command ended by SIGINT.
    #[error("{0}")]
    Interrupted(String),
    /// Anything else: exit 1.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CliError {
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError::Usage(msg.into())
    }
    pub fn failed(msg: impl Into<String>) -> Self {
        CliError::Failed(msg.into())
    }
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) | CliError::Other(_) => 1,
            CliError::Interrupted(_) => 130,
        }
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;
