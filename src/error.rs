//! The one error type the command line maps to exit codes (the README's
//! "Exit codes").
//!
//! Library modules keep their own typed errors; at the command edge they are
//! sorted into "bad input found before anything ran" (exit 2) and "some work
//! failed" (exit 1).

use crate::sweep::SweepError;

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
    /// The one place exit codes are decided: by the variant, or for a
    /// library error by its type (a spec error, a sweep's bad input or
    /// interrupt).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
            CliError::Interrupted(_) => 130,
            CliError::Other(e) => {
                for cause in e.chain() {
                    if let Some(s) = cause.downcast_ref::<SweepError>() {
                        return match s {
                            SweepError::Interrupted => 130,
                            s if s.is_bad_input() => 2,
                            _ => 1,
                        };
                    }
                    if cause.is::<crate::spec::SpecError>() {
                        return 2;
                    }
                }
                1
            }
        }
    }

    /// The message and its causes, outermost first, each said once (a
    /// `{path}: {source}` error already says its source).
    pub fn chain(&self) -> Vec<String> {
        let CliError::Other(err) = self else {
            return vec![self.to_string()];
        };
        let mut out: Vec<String> = Vec::new();
        let mut last = String::new();
        for cause in err.chain() {
            let text = cause.to_string();
            if out.is_empty() || !last.ends_with(&text) {
                out.push(text.clone());
            }
            last = text;
        }
        out
    }
}

impl From<SweepError> for CliError {
    fn from(e: SweepError) -> Self {
        CliError::Other(e.into())
    }
}

pub type CliResult<T = ()> = Result<T, CliError>;
